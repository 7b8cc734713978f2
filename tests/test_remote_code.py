"""Saved students carry their code: loading where fotf_hf cannot be imported (`trust_remote_code=True`).

The subprocesses block `import fotf_hf` with a `sys.meta_path` finder (the package is installed
editable in the venv, so a clean path alone would not hide it); their results are compared with
what the installed package computes in this process.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

import fotf_hf  # noqa: F401  (registers the Auto classes)
from fotf_hf.data import SegmentationTransform
from fotf_hf.evaluation import load_student
from fotf_hf.hub import DEFAULT_IGNORE_PATTERNS, push_to_hub, write_model_card
from fotf_hf.models import (
    FotfDeepLabV3ForSemanticSegmentation,
    FotfImageProcessor,
    FotfPSPNetForSemanticSegmentation,
    convert_cirkd_checkpoint,
    create_model,
    write_inference_files,
)
from fotf_hf.training.release import finish

TINY = {"backbone_base_width": 8, "head_channels": 16}
C = 5
INSTALLED = {"deeplabv3": FotfDeepLabV3ForSemanticSegmentation, "pspnet": FotfPSPNetForSemanticSegmentation}
SAVED_BY_0_1_0 = Path(__file__).parent / "data" / "saved_by_0.1.0"

BLOCK_FOTF_HF = textwrap.dedent(
    """
    import sys

    class BlockFotfHf:
        def find_spec(self, name, path=None, target=None):
            if name == "fotf_hf" or name.startswith("fotf_hf."):
                raise ImportError(f"{name} is blocked in this test")

    sys.meta_path.insert(0, BlockFotfHf())
    try:
        import fotf_hf  # noqa: F401
        sys.exit("the blocker did not hide fotf_hf")
    except ImportError:
        pass
    """
)


def run_without_fotf_hf(code, *args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_MODULES_CACHE": str(Path(cwd) / "hf_modules")}
    done = subprocess.run([sys.executable, "-c", BLOCK_FOTF_HF + textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=cwd, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def save_tiny(folder, arch, normalization="imagenet", size=None):
    torch.manual_seed(0)
    model = create_model(arch, "resnet18", num_labels=C, image_normalization=normalization, **TINY)
    model.save_pretrained(folder)
    write_inference_files(folder, normalization=normalization, size=size)
    return folder


def evaluation_pixels(image, normalization, resize=None):
    label = Image.fromarray(np.zeros((image.height, image.width), np.uint8))
    transform = SegmentationTransform(train=False, num_labels=C, normalization=normalization, resize=resize)
    return transform({"image": [image], "label": [label]})["pixel_values"][0]


def random_image(height=40, width=56, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


REMOTE_LOAD = """
    import json
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

    inputs_file, image_file, *folders = sys.argv[1:]
    x = load_file(inputs_file)["x"]
    image = Image.open(image_file)
    report = {}
    for folder in folders:
        model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits = model(x).logits
        masks = pipeline("image-segmentation", model=folder, trust_remote_code=True)(image)
        save_file({"logits": logits, "pixel_values": processor(images=image, return_tensors="pt")["pixel_values"]},
                  folder + "/remote_outputs.safetensors")
        report[folder] = {
            "model_module": type(model).__module__,
            "processor_module": type(processor).__module__,
            "masks": {m["label"]: np.asarray(m["mask"]).tolist() for m in masks},
        }
    report["fotf_hf_imported"] = any(name.split(".")[0] == "fotf_hf" for name in sys.modules)
    print(json.dumps(report))
"""


def test_folders_load_without_fotf_hf_and_match_the_installed_package(tmp_path):
    folders = {"deeplabv3": save_tiny(tmp_path / "dlv3", "deeplabv3"),
               "pspnet": save_tiny(tmp_path / "psp", "pspnet", normalization="cirkd_bgr", size=(32, 48))}
    x = torch.randn(2, 3, 48, 64)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    image = random_image()
    image.save(tmp_path / "image.png")

    report = run_without_fotf_hf(REMOTE_LOAD, tmp_path / "x.safetensors", tmp_path / "image.png",
                                 *map(str, folders.values()), cwd=tmp_path)
    assert report["fotf_hf_imported"] is False
    for arch, folder in folders.items():
        got = report[str(folder)]
        assert got["model_module"].startswith("transformers_modules.") and got["model_module"].endswith(
            "modeling_" + arch)
        assert got["processor_module"].startswith("transformers_modules.")
        remote = load_file(str(folder / "remote_outputs.safetensors"))

        installed = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()  # no trust_remote_code
        assert type(installed) is INSTALLED[arch]
        with torch.no_grad():
            torch.testing.assert_close(remote["logits"], installed(x).logits, rtol=0, atol=1e-6)

        normalization, size = ("imagenet", None) if arch == "deeplabv3" else ("cirkd_bgr", (32, 48))
        torch.testing.assert_close(remote["pixel_values"][0], evaluation_pixels(image, normalization, size),
                                   rtol=0, atol=1e-5)
        # The pipeline's masks: the installed model's argmax, upsampled to the image as the evaluation does.
        with torch.no_grad():
            logits = installed(evaluation_pixels(image, normalization, size)[None]).logits
        expected = torch.nn.functional.interpolate(logits, size=(image.height, image.width), mode="bilinear",
                                                   align_corners=True).argmax(1)[0].numpy()
        names = installed.config.id2label
        assert sorted(got["masks"]) == sorted(names[int(c)] for c in np.unique(expected))
        for label, mask in got["masks"].items():
            assert np.array_equal(np.asarray(mask) > 0, expected == installed.config.label2id[label]), label


EACH_FOLDER_OWN_CODE = """
    import json
    from transformers import AutoModelForSemanticSegmentation

    first, second = (AutoModelForSemanticSegmentation.from_pretrained(f, trust_remote_code=True) for f in sys.argv[1:3])
    print(json.dumps([getattr(m.config, "folder_marker", None) for m in (first, second)]))
"""


def test_each_folder_runs_its_own_remote_code(tmp_path):
    """Remote code loaded from one folder must not serve the next folder of the same model type (it would
    if the copied modeling files registered their classes with the Auto classes)."""
    first = save_tiny(tmp_path / "first", "deeplabv3")
    second = save_tiny(tmp_path / "second", "deeplabv3")
    with open(second / "configuration_fotf.py", "a") as f:
        f.write('\nFotfDeepLabV3Config.folder_marker = "second"\n')
    assert run_without_fotf_hf(EACH_FOLDER_OWN_CODE, first, second, cwd=tmp_path) == [None, "second"]


def test_installed_classes_win_over_the_copied_code(tmp_path):
    folder = save_tiny(tmp_path / "m", "pspnet")
    for trust in (None, True):
        model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=trust)
        processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust)
        assert type(model) is FotfPSPNetForSemanticSegmentation and type(processor) is FotfImageProcessor


def test_written_files_and_auto_map(tmp_path):
    folder = save_tiny(tmp_path / "m", "deeplabv3")
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_fotf.FotfDeepLabV3Config",
        "AutoImageProcessor": "image_processing_fotf.FotfImageProcessor",
        "AutoModelForSemanticSegmentation": "modeling_deeplabv3.FotfDeepLabV3ForSemanticSegmentation",
    }
    for name in ("configuration_fotf.py", "image_processing_fotf.py", "modeling_cirkd.py", "modeling_deeplabv3.py",
                 "outputs.py", "resnet.py", "preprocessor_config.json"):
        assert (folder / name).is_file(), name
    with pytest.raises(FileNotFoundError, match=r"config.json not found: write_inference_files needs a folder"):
        write_inference_files(tmp_path / "empty")


def test_push_uploads_the_processor_and_the_code(tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    folder = save_tiny(tmp_path / "m", "deeplabv3")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "step_1.bin").write_text("x")

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, folder_path, ignore_patterns, **kwargs):
            files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
            return set(filter_repo_objects(files, ignore_patterns=ignore_patterns))

    uploaded = push_to_hub(folder, "me/m", api=FakeApi(), ignore_patterns=DEFAULT_IGNORE_PATTERNS)
    local = {p.name for p in folder.iterdir() if p.is_file()}
    assert uploaded == local and "checkpoints/step_1.bin" not in uploaded
    assert {"preprocessor_config.json", "image_processing_fotf.py", "modeling_deeplabv3.py"} <= uploaded


def test_folder_without_processor_loads_with_a_warning_that_says_how_to_add_one(tmp_path, caplog):
    folder = tmp_path / "old"
    shutil.copytree(SAVED_BY_0_1_0 / "deeplabv3", folder)
    expected = load_file(str(folder / "expected_logits.safetensors"))
    with caplog.at_level(logging.WARNING):
        student = load_student(folder)
    assert "has no preprocessor_config.json" in caplog.text and "write_inference_files" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(student.model.eval()(expected["pixel_values"]).logits, expected["logits"],
                                   rtol=0, atol=1e-6)

    write_inference_files(folder)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        student = load_student(folder)
    assert "preprocessor_config.json" not in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(student.model.eval()(expected["pixel_values"]).logits, expected["logits"],
                                   rtol=0, atol=1e-6)
    image = random_image()
    torch.testing.assert_close(AutoImageProcessor.from_pretrained(folder)(images=image, return_tensors="pt")[
        "pixel_values"][0], evaluation_pixels(image, "imagenet"), rtol=0, atol=1e-5)


def test_converted_cirkd_folder_gets_the_bgr_processor_and_the_code(tmp_path):
    torch.manual_seed(0)
    state = create_model("deeplabv3", "resnet18", num_labels=C, **TINY).state_dict()
    torch.save(state, tmp_path / "deeplabv3_resnet18_camvid_best_model.pth")
    convert_cirkd_checkpoint(tmp_path / "deeplabv3_resnet18_camvid_best_model.pth", tmp_path / "out", "deeplabv3",
                             "resnet18")
    image = random_image()
    processor = AutoImageProcessor.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(processor(images=image, return_tensors="pt")["pixel_values"][0],
                               evaluation_pixels(image, "cirkd_bgr"), rtol=0, atol=1e-5)
    assert "auto_map" in json.loads((tmp_path / "out" / "config.json").read_text())
    assert (tmp_path / "out" / "modeling_deeplabv3.py").is_file()


def test_release_step_writes_the_runs_normalisation_and_eval_size(tmp_path, monkeypatch):
    monkeypatch.delenv("FOTF_COMMAND", raising=False)
    cfg = SimpleNamespace(
        run=SimpleNamespace(output_dir=str(tmp_path / "run")),
        data=SimpleNamespace(normalization="cirkd_bgr", eval_size=[32, 40], name="camvid", eval_split="validation"),
        method=SimpleNamespace(name="kd"), fotf=SimpleNamespace(enabled=False),
        teacher=SimpleNamespace(pretrained=None), student=SimpleNamespace(pretrained=None),
        hub=SimpleNamespace(push_to_hub=False),
    )
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    state = SimpleNamespace(best_miou=0.5, best_step=1, step=1, history=[])
    metrics = {"mean_iou": 0.5, "ece": 0.1, "pixel_accuracy": 0.7, "per_class_iou": [0.5] * C}
    student = SimpleNamespace(model=create_model("pspnet", "resnet18", num_labels=C, **TINY))
    finish(cfg, accelerator, student, None, metrics, state, None, 1.0)

    out = tmp_path / "run"
    image = random_image(50, 70)
    processor = AutoImageProcessor.from_pretrained(out)
    torch.testing.assert_close(processor(images=image, return_tensors="pt")["pixel_values"][0],
                               evaluation_pixels(image, "cirkd_bgr", resize=(32, 40)), rtol=0, atol=1e-5)
    assert (out / "modeling_pspnet.py").is_file() and not (out / ".tmp_final").exists()
    assert 'pipeline("image-segmentation", model="path/to/run", trust_remote_code=True)' in (out / "README.md").read_text()


def test_model_card_shows_trust_remote_code_only_for_models_that_need_it(tmp_path):
    metrics = {"mean_iou": 0.5, "ece": 0.1, "per_class_iou": [0.5] * C}
    fotf_folder = save_tiny(tmp_path / "dlv3", "deeplabv3")
    card = write_model_card(fotf_folder, metrics, "camvid", "test").read_text()
    assert 'pipeline("image-segmentation", model="path/to/dlv3", trust_remote_code=True)' in card
    assert "import fotf_hf" in card and "post_process_semantic_segmentation" in card

    segformer = create_model("segformer", "mit-b0", num_labels=C, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64],
                             num_attention_heads=[1, 1, 2, 4], decoder_hidden_size=32)
    segformer.save_pretrained(tmp_path / "seg")
    write_inference_files(tmp_path / "seg")
    card = write_model_card(tmp_path / "seg", metrics, "camvid", "test").read_text()
    assert 'pipeline("image-segmentation", model="path/to/seg")' in card and "trust_remote_code" not in card
