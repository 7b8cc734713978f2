"""The distillation loop end to end on tiny models and the built-in synthetic data.

Covers: every method (+FOTF) runs a few steps; output folder contents and the Auto-class round
trip; kill -9 + resume gives bit-identical weights; a real 2-process gloo run equals a 1-process
evaluation of the same weights; non-finite loss and bad configs fail clearly and early.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fotf_hf.config import ConfigError, load_config
from fotf_hf.training import NonFiniteLossError, train

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = {"arch": "deeplabv3", "backbone": "resnet18", "overrides": {"backbone_base_width": 8, "head_channels": 16}}
TINY_DATA = {"name": "synthetic-streets", "options": {"num_train": 8, "num_val": 4, "image_size": [32, 48]},
             "crop_size": [32, 48], "scale_range": [0.75, 1.25]}


def tiny_config(tmp_path, name="run", **sections):
    data = {
        "student": dict(TINY_MODEL),
        "data": dict(TINY_DATA),
        "optim": {"lr": 0.01, "max_steps": 4, "batch_size": 2},
        "run": {"output_dir": str(tmp_path / name), "eval_every": 2, "save_every": 2, "log_every": 1,
                "report_to": [], "num_panels": 1, "eval_batch_size": 2, "progress_bar": False},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny CE-trained teacher folder, made once by the loop itself."""
    tmp = tmp_path_factory.mktemp("teacher")
    cfg = load_config(tiny_config(tmp, "teacher", student={**TINY_MODEL, "overrides": {"backbone_base_width": 16, "head_channels": 16}}))
    train(cfg)
    return tmp / "teacher"


def test_ce_run_writes_a_complete_output_folder(tmp_path):
    from transformers import AutoModelForSemanticSegmentation

    cfg = load_config(tiny_config(tmp_path, "ce"))
    result = train(cfg)
    out = tmp_path / "ce"
    for name in ("config.json", "model.safetensors", "fotf_config.yaml", "metrics.json", "README.md"):
        assert (out / name).is_file(), name
    assert (out / "best" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000004"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0.0 <= metrics["final"]["mean_iou"] <= 1.0
    assert result["final"]["mean_iou"] == pytest.approx(metrics["final"]["mean_iou"])
    model = AutoModelForSemanticSegmentation.from_pretrained(out)
    assert model.config.num_labels == len(model.config.id2label)


@pytest.mark.parametrize(
    "method, fotf",
    [
        ("ce", {"enabled": True, "apply_to": "ce", "kappa": 3.0}),
        ("kd", {"enabled": False}),
        ("kd", {"enabled": True, "kappa": 5.0, "m": 1.0}),
        ("kd", {"enabled": True, "mode": "naive", "weighting": "exp", "merge_kd": "per_class"}),
        ("kd", {"enabled": True, "source": "teacher", "apply_to": "kd"}),
        ("cirkd", {"enabled": True, "kappa": 1.0}),
        ("afdcd", {"enabled": True, "kappa": 7.0, "mode": "classifier", "merge_kd": "per_image", "merge_ce": "batch_mean"}),
        ("skd", {"enabled": False}),
        ("ifvd", {"enabled": False}),
        ("cwd", {"enabled": False}),
    ],
)
def test_every_method_trains_and_logs_its_terms(tmp_path, teacher_dir, method, fotf):
    teacher = {**TINY_MODEL, "overrides": {"backbone_base_width": 16, "head_channels": 16}, "pretrained": str(teacher_dir)}
    if fotf.get("source") == "teacher":
        teacher["mc_dropout_p"] = 0.1
    sections = {"method": {"name": method}, "fotf": fotf, "optim": {"max_steps": 2},
                "run": {"eval_every": 2, "save_every": 2, "num_panels": 0}}
    if method != "ce":
        sections["teacher"] = teacher
    if method == "cirkd":
        sections["method"]["options"] = {"cirkd_memory": {"pixel_memory_size": 64, "region_memory_size": 16}}
    if method == "afdcd":
        # 32x48 inputs give 4x6 backbone maps: pad them to whole 4x4 patches instead of cropping to none.
        sections["method"]["options"] = {"afdcd": {"pool": None, "fit": "pad"}}
    cfg = load_config(tiny_config(tmp_path, method, **sections))
    result = train(cfg)
    assert result["steps"] == 2
    assert all(torch.isfinite(torch.tensor(v)) for k, v in result["final"].items() if isinstance(v, float))
    # The log names the method's own terms (what the paper's tables add up), finite, summing to the loss.
    from fotf_hf.training import read_log_history

    expected = {"ce": {"ce"}, "kd": {"ce", "kd"}, "cirkd": {"ce", "kd", "cirkd_pair", "cirkd_pixel", "cirkd_region"},
                "afdcd": {"ce", "kd", "afdcd_fd", "afdcd_contrast"}, "skd": {"ce", "kd", "skd_pairwise"},
                "ifvd": {"ce", "kd", "ifvd"}, "cwd": {"ce", "kd", "cwd_feat", "cwd_logits"}}[method]
    for line in read_log_history(tmp_path / method / "log_history.jsonl"):
        terms = {k for k in line if "/" not in k} - {"step", "lr", "loss"}
        assert terms >= expected and all(math.isfinite(line[t]) for t in terms), (terms, expected)
        assert line["loss"] == pytest.approx(sum(line[t] for t in terms), rel=1e-6)
        assert any(k.startswith("fotf/") for k in line) == bool(fotf.get("enabled"))


def test_resumed_run_reports_the_wall_time_of_every_session(tmp_path):
    first = train(load_config(tiny_config(tmp_path, "ce", run={"num_panels": 0})))
    checkpoint = tmp_path / "ce" / "checkpoints" / "step_0000004"
    saved_wall = json.loads((checkpoint / "trainer_state.json").read_text())["state"]["wall_time_s"]
    assert saved_wall >= sum(first["step_times_s"])

    resumed = train(load_config(tiny_config(tmp_path, "ce", optim={"max_steps": 6}, run={"num_panels": 0, "resume": "latest"})))
    assert len(resumed["step_times_s"]) == 2  # only steps 5 and 6 ran in this session
    assert resumed["wall_time_s"] >= saved_wall + sum(resumed["step_times_s"])
    assert json.loads((tmp_path / "ce" / "metrics.json").read_text())["wall_time_s"] == pytest.approx(resumed["wall_time_s"])


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def _run_cli(args, env_extra=None, **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, str(REPO / "scripts" / "distill.py"), *args], env=env, cwd=REPO, **popen)


@pytest.mark.slow
def test_kill_9_and_resume_is_bit_identical(tmp_path, teacher_dir):
    sections = dict(
        teacher={**TINY_MODEL, "overrides": {"backbone_base_width": 16, "head_channels": 16}, "pretrained": str(teacher_dir)},
        method={"name": "kd"},
        fotf={"enabled": True, "kappa": 5.0},
        optim={"max_steps": 12},
        run={"save_every": 3, "eval_every": 6, "num_panels": 0},
    )
    ref_cfg = tiny_config(tmp_path, "reference", **sections)
    assert _run_cli(["--config", str(ref_cfg)]).wait(timeout=600) == 0

    cut_cfg = tiny_config(tmp_path, "interrupted", **sections)
    proc = _run_cli(["--config", str(cut_cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = tmp_path / "interrupted" / "checkpoints" / "step_0000006"
    deadline = time.time() + 600
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "interrupted" / "model.safetensors").exists()

    assert _run_cli(["--config", str(cut_cfg), "--resume", "latest"]).wait(timeout=600) == 0
    ref, resumed = _weights(tmp_path / "reference"), _weights(tmp_path / "interrupted")
    assert ref.keys() == resumed.keys()
    for key in ref:
        assert torch.equal(ref[key], resumed[key]), key


@pytest.mark.slow
def test_two_process_run_matches_one_process_evaluation(tmp_path, teacher_dir):
    from fotf_hf.data import SegmentationTransform, build_dataset, create_dataloader
    from fotf_hf.evaluation import evaluate_model, load_student

    cfg_path = tiny_config(
        tmp_path, "ddp",
        teacher={**TINY_MODEL, "overrides": {"backbone_base_width": 16, "head_channels": 16}, "pretrained": str(teacher_dir)},
        method={"name": "kd"}, fotf={"enabled": True, "kappa": 3.0},
        optim={"max_steps": 3}, run={"eval_every": 3, "save_every": 3, "num_panels": 0},
        data={**TINY_DATA, "options": {"num_train": 8, "num_val": 5, "image_size": [32, 48]}},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", "29533", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "scripts" / "distill.py"), "--config", str(cfg_path)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    two_proc = json.loads((tmp_path / "ddp" / "metrics.json").read_text())["final"]

    cfg = load_config(cfg_path)
    datasets, info = build_dataset(cfg.data.name, root=None, **cfg.data.options)
    loader = create_dataloader(
        datasets["validation"].with_transform(SegmentationTransform(train=False, normalization="imagenet", num_labels=info.num_labels)),
        batch_size=2, train=False,
    )
    student = load_student(tmp_path / "ddp")  # AutoModelForSemanticSegmentation.from_pretrained + a weight copy
    one_proc = evaluate_model(student, loader, num_classes=info.num_labels)
    # Every validation pixel counted exactly once across the two processes (no padded duplicates,
    # none dropped), and the same scores: both ranks evaluate rank 0's BatchNorm statistics. Only
    # float rounding may differ (another batch composition, weights reloaded from disk).
    assert two_proc["num_pixels"] == one_proc["num_pixels"] > 0
    assert two_proc["mean_iou"] == pytest.approx(one_proc["mean_iou"], abs=1e-6)
    assert two_proc["ece"] == pytest.approx(one_proc["ece"], abs=1e-6)
    assert two_proc["per_class_iou"] == pytest.approx(one_proc["per_class_iou"], abs=1e-6, nan_ok=True)


@pytest.mark.parametrize("fotf", [False, True])
def test_non_finite_loss_names_step_and_term_and_keeps_last_checkpoint(tmp_path, monkeypatch, fotf):
    import fotf_hf.training.loop as loop

    real = loop.build_criterion_and_fotf

    def poisoned(*args, **kwargs):
        criterion, fotf = real(*args, **kwargs)

        class Poison(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = criterion
                self.calls = 0

            def forward(self, inputs):
                self.calls += 1
                terms = self.inner(inputs)
                if self.calls == 3:
                    terms["ce"] = terms["ce"] * float("nan")
                return terms

        return Poison(), fotf

    monkeypatch.setattr(loop, "build_criterion_and_fotf", poisoned)
    cfg = load_config(tiny_config(tmp_path, "nan", optim={"max_steps": 4}, run={"save_every": 2, "eval_every": 4},
                                  fotf={"enabled": fotf, "apply_to": "ce", "kappa": 3.0}))
    with pytest.raises(NonFiniteLossError, match=r"step 3.*\['ce'\]") as error:
        train(cfg)
    # With FOTF on, the message names the largest weight; kappa / m advice only when weights were large.
    assert ("largest FOTF weight" in str(error.value)) == fotf
    assert "lower fotf.kappa" not in str(error.value)
    good = tmp_path / "nan" / "checkpoints" / "step_0000002"
    assert good.is_dir()
    assert not (tmp_path / "nan" / "model.safetensors").exists()


def test_missing_teacher_weights_fail_before_training(tmp_path):
    cfg = load_config(tiny_config(tmp_path, "noteacher", method={"name": "kd"},
                                  teacher={**TINY_MODEL, "pretrained": str(tmp_path / "does-not-exist")}))
    with pytest.raises(ConfigError, match=r"teacher.pretrained = .*does-not-exist': no such folder; see README.md, "
                                          r"section \"Paper setting\".*train one with method ce"):
        train(cfg)
    assert not (tmp_path / "noteacher" / "checkpoints").exists()


def test_teacher_with_other_classes_is_refused(tmp_path):
    from fotf_hf.models import create_model

    other = tmp_path / "teacher5"
    create_model("deeplabv3", "resnet18", num_labels=5, backbone_base_width=8, head_channels=16).save_pretrained(other)
    cfg = load_config(tiny_config(tmp_path, "mismatch", method={"name": "kd"}, teacher={**TINY_MODEL, "pretrained": str(other)}))
    with pytest.raises(ConfigError, match="teacher has 5 classes"):
        train(cfg)


def test_cli_reports_config_typos_without_traceback(tmp_path):
    proc = _run_cli(["--config", str(tiny_config(tmp_path, "typo")), "--fotf.kapa", "3"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "did you mean 'kappa'" in err and "Traceback" not in err


def test_a_method_from_its_own_module_and_yaml_trains(tmp_path, teacher_dir):
    """Adding a method = one module that registers it (tests/toy_method.py) + a YAML naming it."""
    with pytest.raises(ConfigError, match="method.name = 'toy' is not valid"):
        load_config(overrides=["--method.name", "toy"])
    import toy_method  # noqa: F401  (registers `toy`)
    from fotf_hf.losses import method_names

    assert "toy" in method_names()
    cfg = load_config(tiny_config(tmp_path, "toy", method={"name": "toy", "options": {"toy_l1": {"weight": 2.0}}},
                                  teacher={**TINY_MODEL, "overrides": {"backbone_base_width": 16, "head_channels": 16},
                                           "pretrained": str(teacher_dir)},
                                  optim={"max_steps": 2}, run={"num_panels": 0}))
    assert cfg.needs_teacher
    result = train(cfg)
    from fotf_hf.training import read_log_history

    log = read_log_history(tmp_path / "toy" / "log_history.jsonl")
    assert result["steps"] == 2 and {"ce", "kd", "toy_l1"} <= set(log[-1])
    terms = [k for k in log[-1] if "/" not in k and k not in ("step", "lr", "loss")]
    assert log[-1]["loss"] == pytest.approx(sum(log[-1][k] for k in terms), rel=1e-6)
