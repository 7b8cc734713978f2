"""CIRKD checkpoint conversion.

The checkpoints here are written INDEPENDENTLY of our modules: `cirkd_layout` spells out the
state-dict key scheme of CIRKD-v1 (notes/reference-cirkd-afdcd.md §2.6) with explicit shapes, and
random tensors of those shapes stand in for the real weights.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSemanticSegmentation

import fotf_hf  # noqa: F401  (registers the Auto classes)
from fotf_hf.models import FotfDeepLabV3ForSemanticSegmentation, FotfPSPNetForSemanticSegmentation, create_model
from fotf_hf.models.convert import (
    convert_cirkd_checkpoint,
    convert_cirkd_state_dict,
    detect_checkpoint_kind,
    load_cirkd_state_dict,
)

REPO = Path(__file__).resolve().parents[1]
BLOCKS = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
CITYSCAPES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
              "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


def _bn(shapes, prefix, channels):
    for name in BN:
        shapes[f"{prefix}.{name}"] = () if name == "num_batches_tracked" else (channels,)


def backbone_layout(depth, w=64, prefix="pretrained."):
    """ResNetV1b deep stem: conv1 3->w s2, conv2 w->w, conv3 w->2w; stages of w, 2w, 4w, 8w planes."""
    s = {}
    s[f"{prefix}conv1.weight"] = (w, 3, 3, 3)
    _bn(s, f"{prefix}bn1", w)
    s[f"{prefix}conv2.weight"] = (w, w, 3, 3)
    _bn(s, f"{prefix}bn2", w)
    s[f"{prefix}conv3.weight"] = (2 * w, w, 3, 3)
    _bn(s, f"{prefix}bn3", 2 * w)
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    inplanes = 2 * w
    for stage, n in enumerate(BLOCKS[depth]):
        planes = w * 2**stage
        for j in range(n):
            p = f"{prefix}layer{stage + 1}.{j}"
            cin = inplanes if j == 0 else planes * expansion
            if bottleneck:
                s[f"{p}.conv1.weight"] = (planes, cin, 1, 1)
                _bn(s, f"{p}.bn1", planes)
                s[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                _bn(s, f"{p}.bn2", planes)
                s[f"{p}.conv3.weight"] = (planes * expansion, planes, 1, 1)
                _bn(s, f"{p}.bn3", planes * expansion)
            else:
                s[f"{p}.conv1.weight"] = (planes, cin, 3, 3)
                _bn(s, f"{p}.bn1", planes)
                s[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
                _bn(s, f"{p}.bn2", planes)
            if j == 0:  # every stage's first block has a downsample (notes: layer{1-4}.0.downsample)
                s[f"{p}.downsample.0.weight"] = (planes * expansion, cin, 1, 1)
                _bn(s, f"{p}.downsample.1", planes * expansion)
        inplanes = planes * expansion
    return s


def cirkd_layout(arch, depth, num_classes=19, w=64, head=None, aux=True):
    """`{key: shape}` of a CIRKD-v1 segmentation checkpoint (notes §2.6)."""
    s = backbone_layout(depth, w)
    expansion = 4 if depth >= 50 else 1
    c3, c4 = 4 * w * expansion, 8 * w * expansion
    if arch == "deeplabv3":
        C = head or (128 if depth == 18 else 256) * w // 64
        s["head.aspp.b0.0.weight"] = (C, c4, 1, 1)
        _bn(s, "head.aspp.b0.1", C)
        for b in (1, 2, 3):
            s[f"head.aspp.b{b}.block.0.weight"] = (C, c4, 3, 3)
            _bn(s, f"head.aspp.b{b}.block.1", C)
        s["head.aspp.b4.gap.1.weight"] = (C, c4, 1, 1)
        _bn(s, "head.aspp.b4.gap.2", C)
        s["head.aspp.project.0.weight"] = (C, 5 * C, 1, 1)
        _bn(s, "head.aspp.project.1", C)
        s["head.block.0.weight"] = (C, C, 3, 3)
        _bn(s, "head.block.1", C)
        s["head.block.4.weight"] = (num_classes, C, 1, 1)
        s["head.block.4.bias"] = (num_classes,)
    else:
        C = head or (128 if depth == 18 else 512) * w // 64
        for k in (1, 2, 3, 4):
            s[f"head.psp.conv{k}.0.weight"] = (c4 // 4, c4, 1, 1)
            _bn(s, f"head.psp.conv{k}.1", c4 // 4)
        s["head.block.0.weight"] = (C, 2 * c4, 3, 3)
        _bn(s, "head.block.1", C)
        s["head.classifier.weight"] = (num_classes, C, 1, 1)
        s["head.classifier.bias"] = (num_classes,)
    if aux:
        A = c3 // 4
        s["auxlayer.block.0.weight"] = (A, c3, 3, 3)
        _bn(s, "auxlayer.block.1", A)
        s["auxlayer.block.4.weight"] = (num_classes, A, 1, 1)
        s["auxlayer.block.4.bias"] = (num_classes,)
    return s


def random_state_dict(layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout.items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(4000, dtype=torch.long)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(shape, generator=g) * 0.05
    return out


def assert_same_tensors(model, state_dict):
    own = model.state_dict()
    for key, value in state_dict.items():
        assert torch.equal(own[key], value), key


# ------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize(
    "arch, depth, w, tensors",
    [("deeplabv3", 18, 64, 190), ("pspnet", 18, 64, 178), ("deeplabv3", 101, 8, 688),
     ("deeplabv3", 50, 8, None), ("pspnet", 101, 8, None)],
)
def test_our_state_dict_is_cirkds_key_scheme(arch, depth, w, tensors):
    layout = cirkd_layout(arch, depth, w=w)
    if tensors is not None:
        assert len(layout) == tensors  # the independent layout agrees with the notes' counts
    model = create_model(arch, f"resnet{depth}", num_labels=19, backbone_base_width=w)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(own) == sorted(layout)
    assert own == layout


# ---------------------------------------------------------------------------------- conversion


def test_full_width_deeplabv3_r18_checkpoint_round_trip(tmp_path):
    state = random_state_dict(cirkd_layout("deeplabv3", 18))
    ckpt = tmp_path / "deeplabv3_resnet18_citys_best_model.pth"
    torch.save(state, ckpt)
    report = convert_cirkd_checkpoint(ckpt, tmp_path / "out", "deeplabv3", "resnet18",
                                      id2label=dict(enumerate(CITYSCAPES)))
    assert report.kind == "segmentation" and report.num_labels == 19  # inferred from head.block.4.bias
    assert report.loaded == 190 and report.aux_head
    assert report.missing_keys == report.unexpected_keys == report.randomly_initialized == []
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out")
    assert isinstance(model, FotfDeepLabV3ForSemanticSegmentation)
    assert model.config.image_normalization == "cirkd_bgr"
    assert model.config.id2label[13] == "car" and model.config.label2id["road"] == 0
    assert model.config.classifier_dropout_prob == 0.1
    assert_same_tensors(model, state)
    assert model(torch.randn(1, 3, 32, 48)).logits.shape == (1, 19, 4, 6)


def test_module_prefixes_and_wrappers_are_unwrapped(tmp_path):
    state = random_state_dict(cirkd_layout("pspnet", 18, num_classes=11, w=8), seed=1)
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "a.pth")
    torch.save({"model": {f"module.module.{k}": v for k, v in state.items()}}, tmp_path / "b.pth")
    for name in ("a.pth", "b.pth"):
        loaded = load_cirkd_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys()
        report = convert_cirkd_checkpoint(tmp_path / name, tmp_path / name.replace(".pth", ""), "pspnet", "resnet18",
                                          num_labels=11)
        assert report.loaded == 178 and not report.missing_keys and not report.unexpected_keys
        model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / name.replace(".pth", ""))
        assert isinstance(model, FotfPSPNetForSemanticSegmentation) and model.config.backbone_base_width == 8
        assert_same_tensors(model, state)
    torch.save({"epoch": 7, "optimizer": 3}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match="checkpoint entry 'epoch' is a int, not a tensor"):
        load_cirkd_state_dict(tmp_path / "c.pth")


@pytest.mark.parametrize(
    "arch, backbone, width, head, v1",
    [("deeplabv3", "resnet18", 64, 512, 128), ("deeplabv3", "resnet101", 8, 64, 32), ("pspnet", "resnet101", 8, 32, 64)],
)
def test_cirkdv2_head_widths_are_refused(arch, backbone, width, head, v1):
    # CIRKD-HEAD (2025): DeepLabV3 heads 512 wide (R18 and R101), PSPNet-R101 256 (here at base width 8: x 1/8)
    layout = cirkd_layout(arch, int(backbone[6:]), w=width, head=head)
    state = {k: torch.zeros(s) for k, s in layout.items()}
    with pytest.raises(ValueError, match=rf"has {head} output channels, but CIRKD-v1 {arch}-{backbone} has {v1}: .*2025 CIRKDv2"):
        convert_cirkd_state_dict(state, arch, backbone)


def test_shape_mismatch_names_the_key_and_both_shapes():
    state = random_state_dict(cirkd_layout("deeplabv3", 18, num_classes=5, w=8))
    state["pretrained.layer2.0.conv1.weight"] = torch.zeros(16, 8, 1, 1)
    with pytest.raises(ValueError, match=r"pretrained\.layer2\.0\.conv1\.weight: checkpoint \(16, 8, 1, 1\) vs model \(16, 8, 3, 3\)"):
        convert_cirkd_state_dict(state, "deeplabv3", "resnet18")


def test_disagreements_with_the_request_are_refused():
    state = random_state_dict(cirkd_layout("deeplabv3", 18, num_classes=5, w=8))
    with pytest.raises(ValueError, match=r"num_labels = 19, but .*head\.block\.4\.bias has shape \(5,\)"):
        convert_cirkd_state_dict(state, "deeplabv3", "resnet18", num_labels=19)
    with pytest.raises(ValueError, match=r"is a deeplabv3 model .*arch = 'pspnet'"):
        convert_cirkd_state_dict(state, "pspnet", "resnet18")
    with pytest.raises(ValueError, match=r"backbone is resnet18, but backbone = 'resnet101'"):
        convert_cirkd_state_dict(state, "deeplabv3", "resnet101")
    with pytest.raises(ValueError, match="unrecognised checkpoint layout"):
        detect_checkpoint_kind({"encoder.weight": torch.zeros(1)})


def test_imagenet_backbone_checkpoint_fills_only_the_backbone(tmp_path):
    layout = backbone_layout(101, w=8, prefix="")
    layout["fc.weight"], layout["fc.bias"] = (1000, 256), (1000,)
    state = random_state_dict(layout, seed=2)
    torch.save(state, tmp_path / "resnet101-imagenet.pth")
    with pytest.raises(ValueError, match="pass num_labels"):
        convert_cirkd_checkpoint(tmp_path / "resnet101-imagenet.pth", tmp_path / "x", "deeplabv3", "resnet101")
    report = convert_cirkd_checkpoint(tmp_path / "resnet101-imagenet.pth", tmp_path / "out", "deeplabv3", "resnet101",
                                      num_labels=19)
    assert report.kind == "imagenet_backbone" and report.dropped_keys == ["fc.bias", "fc.weight"]
    assert report.randomly_initialized == ["auxlayer", "head"] and report.aux_head
    assert report.unexpected_keys == [] and all(k.startswith(("head.", "auxlayer.")) for k in report.missing_keys)
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out")
    assert model.config.image_normalization == "cirkd_bgr" and model.config.num_labels == 19
    assert_same_tensors(model, {f"pretrained.{k}": v for k, v in state.items() if not k.startswith("fc.")})
    assert "random" in report.summary()


def test_missing_and_unexpected_keys_are_reported_and_strict_refuses():
    layout = cirkd_layout("deeplabv3", 18, num_classes=5, w=8, aux=False)
    state = random_state_dict(layout)
    model, report = convert_cirkd_state_dict(state, "deeplabv3", "resnet18")
    assert not report.aux_head and model.auxlayer is None and not report.missing_keys  # no aux keys -> no aux head
    del state["pretrained.layer3.1.conv2.weight"]
    state["head.extra.weight"] = torch.zeros(3)
    for key in [k for k in state if k.endswith("num_batches_tracked")]:
        del state[key]  # pre-1.0 PyTorch checkpoints have none: not worth reporting
    model, report = convert_cirkd_state_dict(state, "deeplabv3", "resnet18")
    assert report.missing_keys == ["pretrained.layer3.1.conv2.weight"] and report.unexpected_keys == ["head.extra.weight"]
    assert report.randomly_initialized == ["pretrained"]
    with pytest.raises(ValueError, match=r"strict conversion: missing keys \['pretrained.layer3.1.conv2.weight'\]"):
        convert_cirkd_state_dict(state, "deeplabv3", "resnet18", strict=True)


def test_converted_folder_loads_through_create_model(tmp_path):
    state = random_state_dict(cirkd_layout("deeplabv3", 18, num_classes=5, w=8))
    model, _ = convert_cirkd_state_dict(state, "deeplabv3", "resnet18")
    model.save_pretrained(tmp_path)
    teacher = create_model("deeplabv3", "resnet18", num_labels=5, pretrained=str(tmp_path), mc_dropout_p=0.1,
                           backbone_base_width=8)
    assert_same_tensors(teacher, state)


def test_cli(tmp_path):
    state = random_state_dict(cirkd_layout("deeplabv3", 18, num_classes=3, w=8))
    torch.save(state, tmp_path / "ckpt.pth")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(REPO / "scripts" / "convert_cirkd_checkpoint.py"), str(tmp_path / "ckpt.pth"),
           "--arch", "deeplabv3", "--backbone", "resnet18", "--num_labels", "3",
           "--id2label", '{"0": "sky", "1": "road", "2": "car"}', "--output", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "190 tensors loaded" in done.stdout
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "out")
    assert model.config.id2label == {0: "sky", 1: "road", 2: "car"}
    assert_same_tensors(model, state)
    cmd[cmd.index("--backbone") + 1] = "resnet50"
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 1 and "backbone is resnet18" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------- checkpoints that are not plain tensors

# torch's own error advises re-loading unsafely; ours must never repeat that advice.
UNSAFE_ADVICE = ("weights_only=False", "set to `False`", "safe_globals")


class RunsCode:
    """Unpickling this runs a shell command (the marker file proves it ran)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch '{self.marker}'",)


def _code_checkpoint(path, marker, writer):
    state = {"pretrained.conv1.weight": torch.zeros(1), "payload": RunsCode(marker)}
    if writer == "torch.save":
        torch.save(state, path)
    elif writer == "pickle":
        import pickle

        path.write_bytes(pickle.dumps(state))
    else:
        path.write_bytes(b"not a checkpoint at all")
    return path


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, on the plain-pickle file
@pytest.mark.parametrize("writer", ["torch.save", "pickle", "garbage"])
def test_a_checkpoint_that_is_not_plain_tensors_is_refused_without_running_it(tmp_path, writer):
    import traceback

    marker = tmp_path / "code_ran"
    path = _code_checkpoint(tmp_path / "evil.pth", marker, writer)
    with pytest.raises(ValueError, match="is not a plain tensor checkpoint") as info:
        load_cirkd_state_dict(path)
    with pytest.raises(ValueError, match="is not a plain tensor checkpoint"):
        convert_cirkd_checkpoint(path, tmp_path / "out", "deeplabv3", "resnet18")
    assert not marker.exists() and not (tmp_path / "out").exists()
    err = info.value
    assert str(path) in str(err) and "state dict of tensors" in str(err)
    if writer == "torch.save":
        assert "(here: posix.system)" in str(err)  # which object was refused
    printed = "".join(traceback.format_exception(err))
    assert err.__cause__ is None and err.__context__ is None
    assert not any(advice in printed for advice in UNSAFE_ADVICE)


def test_cli_refuses_a_checkpoint_that_is_not_plain_tensors(tmp_path):
    marker = tmp_path / "code_ran"
    path = _code_checkpoint(tmp_path / "evil.pth", marker, "torch.save")
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(REPO / "scripts" / "convert_cirkd_checkpoint.py"), str(path),
           "--arch", "deeplabv3", "--backbone", "resnet18", "--output", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode == 1 and "conversion failed" in done.stderr and "not a plain tensor checkpoint" in done.stderr
    assert "Traceback" not in done.stderr and not any(a in done.stderr + done.stdout for a in UNSAFE_ADVICE)
    assert not marker.exists() and not (tmp_path / "out").exists()
