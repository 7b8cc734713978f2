"""Model card (model-index round trip, licence) and the push path (fake API; real HfApi offline)."""

import hashlib
import http.server
import json
import threading
import traceback
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from fotf_hf.hub import (
    DEFAULT_IGNORE_PATTERNS,
    HubUploadError,
    build_model_card,
    card_license,
    push_to_hub,
    write_model_card,
)


METRICS = {
    "mean_iou": 0.6125,
    "mean_iou_cirkd": 0.6125,
    "per_class_iou": [0.9, 0.5, float("nan"), 0.4375],
    "pixel_accuracy": 0.875,
    "mean_accuracy": 0.7,
    "per_class_accuracy": [0.95, 0.6, float("nan"), 0.55],
    "ece": 0.0431,
    "reliability": {"accuracy": [0.5] * 10, "confidence": [0.5] * 10, "count": [1] * 10,
                    "bin_edges": [i / 10 for i in range(11)]},
    "num_pixels": 1000,
}
FOTF = {"enabled": True, "num_samples": 5, "p": None, "m": 3.0, "kappa": 5.0, "weighting": "power",
        "merge_kd": "per_pixel", "merge_ce": "per_class", "apply_to": "both", "mode": "exact", "source": "student"}


def write_card(folder, **overrides):
    kwargs = dict(metrics=METRICS, dataset_name="camvid", split="validation", method="kd+fotf",
                  teacher="outputs/teacher", fotf=FOTF, steps=40000,
                  command="accelerate launch scripts/distill.py --config kd_fotf.yaml", base_model=None,
                  id2label={0: "Sky", 1: "Building", 2: "Pole", 3: "Road"})
    kwargs.update(overrides)
    return write_model_card(folder, **kwargs)


def test_card_round_trips_mean_iou_and_ece_with_dataset_and_split(tmp_path):
    path = write_card(tmp_path / "kd_fotf")
    assert path == tmp_path / "kd_fotf" / "README.md"
    card = ModelCard.load(path)
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["mean_iou"].metric_value == pytest.approx(0.6125)
    assert results["ece"].metric_value == pytest.approx(0.0431)
    assert results["ece"].metric_config == "10-bins"
    for r in results.values():
        assert (r.task_type, r.dataset_type, r.dataset_name, r.dataset_split) == (
            "image-segmentation", "camvid", "camvid", "validation")
    assert card.data.model_name == "kd_fotf" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "image-segmentation" and card.data.library_name == "transformers"
    body = card.text
    for expected in ("| mIoU (%) | 61.25 |", "| ECE (%, 10 bins) | 4.31 |", "| pixel accuracy (%) | 87.50 |",
                     "| Sky | 90.00 |", "| Pole | n/a |", "| FOTF kappa | 5.0 |", "| FOTF m | 3.0 |",
                     "| FOTF T (MC samples) | 5 |", "| FOTF dropout p | the model's own dropout |",
                     "| FOTF merge (KD) | per_pixel |", "| FOTF merge (CE) | per_class |", "| FOTF sampling mode | exact |",
                     "| training steps | 40000 |", "`outputs/teacher`",
                     "accelerate launch scripts/distill.py --config kd_fotf.yaml", "Apache-2.0"):
        assert expected in body, expected
    assert not list((tmp_path / "kd_fotf").glob(".tmp*"))


@pytest.mark.parametrize("teacher, base_model", [
    ("nvidia/segformer-b1-finetuned-cityscapes-1024-1024", None),
    ("outputs/teacher", "nvidia/mit-b0"),
])
def test_nvidia_segformer_teacher_or_base_model_gives_license_other(tmp_path, teacher, base_model):
    card = ModelCard.load(write_card(tmp_path, teacher=teacher, base_model=base_model))
    assert card.data.license == "other"
    assert card.data.license_link == "https://github.com/NVlabs/SegFormer/blob/master/LICENSE"
    assert "NVIDIA" in card.text and "license: other" in card.text
    if base_model:
        assert card.data.base_model == base_model  # a Hub id: kept in the metadata


def test_license_other_is_inherited_from_a_local_teacher_folder(tmp_path):
    teacher = tmp_path / "teacher"
    write_card(teacher, teacher=None, base_model="nvidia/mit-b2", method="ce")
    assert card_license(str(teacher))["license"] == "other"
    assert card_license(str(tmp_path / "no-such-folder"))["license"] == "apache-2.0"
    assert card_license("microsoft/resnet-50", "nvidia-like/segformer")["license"] == "apache-2.0"


@pytest.mark.parametrize("form", ["config", "module"])
def test_fotf_rows_from_a_fotf_config_or_the_fotf_module_equal_those_from_its_dict(tmp_path, form):
    from dataclasses import asdict

    from fotf_hf.fotf import FOTF as FotfModule
    from fotf_hf.fotf import FotfConfig

    config = FotfConfig(enabled=True, num_samples=7, p=0.2, m=3.0, kappa=5.0, weighting="exp", merge_kd="per_image",
                        merge_ce="batch_mean", apply_to="ce", mode="classifier")
    as_dict = ModelCard.load(write_card(tmp_path / "dict", fotf=asdict(config))).text
    given = ModelCard.load(write_card(tmp_path / form, fotf=config if form == "config" else FotfModule(config))).text
    rows = [line for line in given.splitlines() if line.startswith("| FOTF ")]
    assert rows == [line for line in as_dict.splitlines() if line.startswith("| FOTF ")]
    for expected in ("| FOTF T (MC samples) | 7 |", "| FOTF dropout p | 0.2 |", "| FOTF weighting | exp |",
                     "| FOTF merge (KD) | per_image |", "| FOTF merge (CE) | batch_mean |", "| FOTF applied to | ce |",
                     "| FOTF sampling mode | classifier |", "| FOTF uncertainty source | student |"):
        assert expected in rows, expected
    # a disabled config states that FOTF was not used
    off = ModelCard.load(write_card(tmp_path / "off", fotf=FotfConfig(kappa=5.0))).text
    assert "| FOTF | not used |" in off


def test_local_paths_stay_out_of_the_metadata_and_fotf_off_is_stated(tmp_path):
    card = ModelCard.load(write_card(tmp_path, base_model=str(tmp_path), fotf=None, method="kd", command=None))
    assert card.data.base_model is None and card.data.datasets is None
    assert "| FOTF | not used |" in card.text and "# not recorded" in card.text


def test_defaults_come_from_the_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b", "2": "c", "3": "d"}}))
    (tmp_path / "fotf_config.yaml").write_text("method: {name: kd}\n")
    card = ModelCard.load(write_card(tmp_path, id2label=None, command=None))
    assert "| a | 90.00 |" in card.text
    assert "accelerate launch scripts/distill.py --config fotf_config.yaml" in card.text


def test_build_model_card_accepts_a_custom_template(tmp_path):
    template = tmp_path / "mine.md"
    template.write_text("---\n{{ card_data }}\n---\n\n# {{ model_name }}: {{ results[0].value }}\n")
    card = build_model_card(METRICS, "camvid", "test", model_name="x", template_path=template)
    assert card.text.strip() == "# x: 61.25"
    assert {r.metric_type for r in card.data.eval_results} >= {"mean_iou", "ece"}


# ------------------------------------------------------------------ push


def folder_state(folder):
    """{relative path: sha256} of every file below `folder`."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def release_folder(tmp_path):
    folder = tmp_path / "run"
    write_card(folder)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "panels").mkdir()
    (folder / "panels" / "step_0000004_00.png").write_bytes(b"png")
    (folder / "checkpoints" / "step_0000004").mkdir(parents=True)
    (folder / "checkpoints" / "step_0000004" / "optimizer.bin").write_bytes(b"x")
    (folder / "logs").mkdir()
    (folder / "logs" / "events").write_bytes(b"x")
    (folder / ".tmp_final").mkdir()
    (folder / ".tmp_final" / "partial").write_bytes(b"x")
    return folder


class FakeApi:
    """Records the calls; `upload_folder` lists what the real one would upload (same pattern filter)."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return type("RepoUrl", (), {"repo_id": "someone/" + repo_id.split("/")[-1]})()

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        folder = Path(kwargs["folder_path"])
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        uploaded = list(filter_repo_objects(files, ignore_patterns=kwargs["ignore_patterns"]))
        self.calls.append(("upload_folder", kwargs, uploaded))
        return "commit-info"


def test_push_creates_a_private_repo_and_uploads_the_folder_without_checkpoints(release_folder):
    api = FakeApi()
    before = folder_state(release_folder)
    assert push_to_hub(release_folder, "me/dlv3-r18-fotf", api=api) == "commit-info"
    (create, repo_id, kwargs), (upload, upload_kwargs, uploaded) = api.calls
    assert (create, repo_id, kwargs) == ("create_repo", "me/dlv3-r18-fotf", {"private": True, "exist_ok": True})
    assert upload == "upload_folder"
    assert upload_kwargs["folder_path"] == str(release_folder)
    assert upload_kwargs["repo_id"] == "someone/dlv3-r18-fotf"  # the id create_repo resolved
    assert upload_kwargs["ignore_patterns"] == list(DEFAULT_IGNORE_PATTERNS)
    assert uploaded == ["README.md", "config.json", "model.safetensors", "panels/step_0000004_00.png"]
    assert folder_state(release_folder) == before


def test_push_public_when_asked(release_folder):
    api = FakeApi()
    push_to_hub(release_folder, "me/x", private=False, api=api)
    assert api.calls[0][2]["private"] is False


def test_push_offline_with_the_real_api_fails_clearly_and_leaves_the_folder_alone(release_folder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import; conftest set it, make sure
    monkeypatch.setenv("HF_TOKEN", "hf_secretsecretsecret")
    before = folder_state(release_folder)
    with pytest.raises(HubUploadError) as info:
        push_to_hub(release_folder, "me/dlv3-r18-fotf")
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "failed" in message and "local folder is intact" in message and "hf upload me/dlv3-r18-fotf" in message
    assert "HF_HUB_OFFLINE" in message and "hf_secret" not in message
    assert folder_state(release_folder) == before


def test_push_wraps_any_api_error_and_names_the_cause(release_folder):
    class Broken(FakeApi):
        def upload_folder(self, **kwargs):
            raise ConnectionError("connection reset while uploading model.safetensors")

    with pytest.raises(HubUploadError, match="connection reset"):
        push_to_hub(release_folder, "me/x", api=Broken())


def test_push_checks_its_arguments(tmp_path):
    with pytest.raises(FileNotFoundError):
        push_to_hub(tmp_path / "missing", "me/x", api=FakeApi())
    with pytest.raises(ValueError):
        push_to_hub(tmp_path, "", api=FakeApi())


# ------------------------------------------------------------- no token in what a failed push prints


class _EchoHub(http.server.BaseHTTPRequestHandler):
    """A Hub that refuses every request (401) and quotes the request headers, Authorization included,
    in its error, as a misconfigured proxy or a debugging server may. `create_ok` lets create_repo pass,
    so the failure comes from the upload itself."""

    create_ok = False

    def _answer(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.create_ok and self.path.startswith("/api/repos/create"):
            status, body = 200, {"url": f"http://{self.headers['Host']}/me/x", "name": "me/x"}
        else:
            status, body = 401, {"error": f"rejected {self.command} {self.path} with headers:\n{self.headers}"}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_HEAD = _answer

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def echo_hub(monkeypatch):
    """Start the echoing Hub; the real HfApi talks to it (HF_ENDPOINT), online. Yields the handler class."""
    from huggingface_hub import constants

    handler = type("Handler", (_EchoHub,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    yield handler
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.parametrize("create_ok", [False, True], ids=["create_repo_fails", "upload_fails"])
@pytest.mark.parametrize("via", ["argument", "HF_TOKEN"])
def test_a_failed_push_never_shows_the_token_even_when_the_hub_echoes_it(release_folder, echo_hub, monkeypatch,
                                                                        via, create_ok):
    echo_hub.create_ok = create_ok
    # Not hf_-shaped when passed as an argument: only masking the known value can catch it.
    secret = "tok-SECRET-4711-argument" if via == "argument" else "hf_" + "Q7x" * 12
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if via == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", secret)
    else:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(HubUploadError) as info:
        push_to_hub(release_folder, "me/x", token=secret if via == "argument" else None)
    err = info.value
    message = str(err)
    # The fake Hub did get the token and echoed it (else this test proves nothing) ...
    assert "rejected" in message and "Bearer ***" in message and "401" in message
    # ... but nothing a user sees carries it: not the message, not a chained cause or context.
    printed = "".join(traceback.format_exception(err))
    assert secret not in printed and "SECRET" not in printed and "Q7xQ7x" not in printed
    assert err.__cause__ is None and err.__context__ is None
    assert "local folder is intact" in message and "hf upload me/x" in message


def test_token_shaped_strings_are_masked_even_when_the_token_is_unknown(release_folder, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    leaked = "hf_" + "AbC123xyz" * 4

    class Leaky(FakeApi):
        def upload_folder(self, **kwargs):
            raise RuntimeError(f"proxy said: {{'authorization': 'Bearer opaque.jwt-token_9'}}, stored {leaked}")

    with pytest.raises(HubUploadError) as info:
        push_to_hub(release_folder, "me/x", api=Leaky())
    printed = "".join(traceback.format_exception(info.value))
    assert "opaque.jwt" not in printed and leaked not in printed
    assert "'Bearer ***'" in printed and "stored hf_***" in printed
    assert "hf upload me/x" in printed  # the retry command (`hf upload`) is not mistaken for a token


def test_card_shows_the_latency_rows_of_its_own_architecture_only(tmp_path):
    """A student folder finds the benchmark's rows for its architecture (whatever its classes); another
    architecture, or no table, gives no speed section."""
    import torch

    from fotf_hf.hub import architecture_key, speed_rows
    from fotf_hf.models import create_model

    with torch.device("meta"):  # configs only: no weights are computed or written
        r18 = create_model("deeplabv3", "resnet18", num_labels=11)
        bench_r18 = create_model("deeplabv3", "resnet18", num_labels=19)
        psp = create_model("pspnet", "resnet18", num_labels=11)
    assert architecture_key(r18.config) == architecture_key(bench_r18.config) == "fotf_deeplabv3/r18/w64/h128"  # CIRKD R18 heads: 128 wide
    assert architecture_key(psp.config) != architecture_key(r18.config)
    table = tmp_path / "latency.json"
    table.write_text(json.dumps({"machine": "test host", "command": "python benchmarks/latency.py", "pairs": [
        {"teacher": "DeepLabV3-R101", "student": "DeepLabV3-R18", "student_key": architecture_key(bench_r18.config),
         "size": "512x1024", "batch": 1, "teacher_ms": {"eager": 2000.0, "onnx": 1500.0},
         "student_ms": {"eager": 500.0, "onnx": 300.0}, "flops_ratio": 0.2581}]}))
    for folder, model in (("r18", r18), ("psp", psp)):
        model.config.save_pretrained(tmp_path / folder)
    speed = speed_rows(tmp_path / "r18", table)
    assert speed["machine"] == "test host" and len(speed["rows"]) == 1
    row = speed["rows"][0]
    assert (row["teacher_ms"], row["student_ms"], row["speedup"]) == ("2000 / 1500", "500 / 300", "4.00x / 5.00x")
    assert speed_rows(tmp_path / "psp", table) is None
    assert speed_rows(tmp_path / "r18", tmp_path / "missing.json") is None
    card = str(build_model_card(METRICS, "camvid", "test", speed=speed))
    assert "| DeepLabV3-R101 | 512x1024 | 1 | 2000 / 1500 | 500 / 300 | 4.00x / 5.00x | 0.258 |" in card
    assert "Speed: what the student buys" not in str(build_model_card(METRICS, "camvid", "test"))
