"""Models: CIRKD-v1 DeepLabV3 / PSPNet as transformers models, SegFormer via create_model, SegmentationStudent.

Tiny widths (backbone_base_width 8, head 16, SegFormer hidden 8..64) and 64 x 64 inputs keep it
CPU-fast; the one full-size check builds DeepLabV3-R18 / PSPNet-R18 / DeepLabV3-R101 once.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSemanticSegmentation, SegformerForSemanticSegmentation

import fotf_hf  # noqa: F401  (registers the Auto classes)
from fotf_hf.models import (
    FotfDeepLabV3Config,
    FotfDeepLabV3ForSemanticSegmentation,
    FotfPSPNetConfig,
    FotfPSPNetForSemanticSegmentation,
    SegmentationModelOutput,
    SegmentationStudent,
    create_model,
)
from fotf_hf.models.segformer import MIT_VARIANTS, segformer_config
from fotf_hf.uncertainty import FOTF, mc_dropout_probs

TINY = {"backbone_base_width": 8, "head_channels": 16}
TINY_SEGFORMER = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64], "num_attention_heads": [1, 1, 2, 4],
                  "decoder_hidden_size": 32}
C = 5


def tiny(arch, **kwargs):
    if arch == "segformer":
        return create_model("segformer", "mit-b0", num_labels=C, **{**TINY_SEGFORMER, **kwargs})
    return create_model(arch, "resnet18", num_labels=C, **{**TINY, **kwargs})


def head_width(model):
    return model.config.decoder_hidden_size if isinstance(model, SegformerForSemanticSegmentation) else model.config.head_width


@pytest.fixture
def x():
    return torch.randn(2, 3, 64, 64)


# ---------------------------------------------------------------------------------- architecture


def test_full_size_parameter_and_tensor_counts_match_cirkd():
    # notes §2.6 (CIRKD-v1 models instantiated with 19 classes and the aux head)
    for arch, backbone, params, tensors in [
        ("deeplabv3", "resnet18", 13.608e6, 190),
        ("pspnet", "resnet18", 12.919e6, 178),
        ("deeplabv3", "resnet101", 61.119e6, 688),
    ]:
        model = create_model(arch, backbone, num_labels=19)
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - params) < 0.1e6, (arch, backbone, count)
        assert len(model.state_dict()) == tensors, (arch, backbone)
        assert model.config.aux_head and model.config.image_normalization == "imagenet"


def test_dropout_inventory_and_cirkd_module_names():
    dlv3 = tiny("deeplabv3")
    assert isinstance(dlv3.head.aspp.project[3], nn.Dropout) and dlv3.head.aspp.project[3].p == 0.5
    assert isinstance(dlv3.head.block[3], nn.Dropout) and dlv3.head.block[3].p == 0.1
    assert isinstance(dlv3.auxlayer.block[3], nn.Dropout) and dlv3.auxlayer.block[3].p == 0.1
    assert dlv3.head.block[4].out_channels == C and dlv3.head.block[4].bias is not None
    psp = tiny("pspnet")
    assert isinstance(psp.head.block[3], nn.Dropout) and psp.head.block[3].p == 0.1
    assert psp.head.classifier.out_channels == C
    keys = set(dlv3.state_dict()) | set(psp.state_dict())
    for key in ["pretrained.conv1.weight", "pretrained.bn3.running_var", "pretrained.layer1.0.downsample.0.weight",
                "pretrained.layer1.0.downsample.1.weight", "head.aspp.b0.0.weight", "head.aspp.b3.block.1.bias",
                "head.aspp.b4.gap.1.weight", "head.aspp.b4.gap.2.running_mean", "head.aspp.project.1.weight",
                "head.block.0.weight", "head.block.4.bias", "head.psp.conv4.0.weight", "head.classifier.weight",
                "auxlayer.block.0.weight", "auxlayer.block.4.bias"]:
        assert key in keys, key
    # no biases on convs except the classifiers (CIRKD)
    biased = sorted(n for n, m in dlv3.named_modules() if isinstance(m, nn.Conv2d) and m.bias is not None)
    assert biased == ["auxlayer.block.4", "head.block.4"]


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_dilation_rule_of_the_first_dilated_blocks(backbone):
    model = create_model("deeplabv3", backbone, num_labels=C, backbone_base_width=4, head_channels=8)
    net = model.pretrained
    if backbone == "resnet18":  # BasicBlock: conv1 / conv2
        got = [(net.layer3[0].conv1.dilation[0], net.layer3[0].conv2.dilation[0]),
               (net.layer3[1].conv1.dilation[0], net.layer3[1].conv2.dilation[0]),
               (net.layer4[0].conv1.dilation[0], net.layer4[0].conv2.dilation[0]),
               (net.layer4[1].conv1.dilation[0], net.layer4[1].conv2.dilation[0])]
        assert got == [(1, 2), (2, 2), (2, 4), (4, 4)]
    else:  # Bottleneck: the 3x3 conv2
        got = [net.layer3[0].conv2.dilation[0], net.layer3[1].conv2.dilation[0],
               net.layer4[0].conv2.dilation[0], net.layer4[1].conv2.dilation[0]]
        assert got == [1, 2, 2, 4]
        assert net.layer1[0].downsample is not None and net.layer1[0].conv2.stride == (1, 1)
    for m in net.modules():  # padding = dilation keeps the grid
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            assert m.padding == m.dilation
    assert net.layer2[0].conv1.stride == (2, 2) if backbone == "resnet18" else net.layer2[0].conv2.stride == (2, 2)
    assert net.conv1.stride == (2, 2) and net.conv3.out_channels == 8  # deep stem w, w, 2w


def test_kaiming_fan_out_init_and_batchnorm_init():
    model = create_model("deeplabv3", "resnet18", num_labels=C, backbone_base_width=32)
    conv = model.pretrained.layer4[1].conv2  # 256 -> 256, 3x3
    expected = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.all(model.head.block[4].bias == 0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)


@pytest.mark.parametrize("arch", ["deeplabv3", "pspnet"])
def test_forward_shapes_and_fields(arch, x):
    model = tiny(arch).eval()
    out = model(x, output_hidden_states=True)
    assert isinstance(out, SegmentationModelOutput)
    assert out.logits.shape == (2, C, 8, 8)  # 1/8, not upsampled
    assert out.aux_logits.shape == (2, C, 8, 8)
    assert out.embedding.shape == out.head_input.shape == (2, 16, 8, 8)
    assert out.backbone_features.shape == (2, 64, 8, 8)  # layer4 of a width-8 R18
    assert [h.shape[1] for h in out.hidden_states] == [8, 16, 32, 64]
    assert out.hidden_states[3] is out.backbone_features and out.loss is None
    torch.testing.assert_close(out.embedding, out.head_input)  # eval: no dropout
    torch.testing.assert_close(out.logits, model.get_classifier()(out.head_input))
    odd = model(torch.randn(1, 3, 40, 56))
    assert odd.logits.shape == (1, C, 5, 7)
    as_tuple = model(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.logits)
    no_aux = tiny(arch, aux_head=False).eval()
    assert no_aux(x).aux_logits is None and not any(k.startswith("auxlayer") for k in no_aux.state_dict())


@pytest.mark.parametrize("arch", ["deeplabv3", "pspnet"])
def test_loss_is_ce_upsampled_align_corners_plus_weighted_aux(arch, x):
    model = tiny(arch, aux_loss_weight=0.25).eval()
    labels = torch.randint(0, C, (2, 64, 64))
    labels[:, :10] = 255
    out = model(x, labels=labels)

    def ce(z):
        return F.cross_entropy(F.interpolate(z, size=(64, 64), mode="bilinear", align_corners=True), labels, ignore_index=255)

    torch.testing.assert_close(out.loss, ce(out.logits) + 0.25 * ce(out.aux_logits))
    out.loss.backward()
    assert model.pretrained.conv1.weight.grad is not None


def test_train_mode_applies_the_head_dropout(x):
    model = tiny("deeplabv3").train()
    torch.manual_seed(1)
    out = model(x)
    positive = out.head_input > 0
    dropped = (out.embedding == 0) & positive
    assert 0.03 < (dropped.sum() / positive.sum()).item() < 0.2  # ~p = 0.1 of the positive ReLU outputs
    kept = positive & ~dropped
    torch.testing.assert_close(out.embedding[kept], out.head_input[kept] / 0.9)


@pytest.mark.parametrize(
    "shape", [(3, 64, 64), (2, 1, 64, 64), (2, 3, 8, 64), (2, 3, 64, 15), (2, 3, 64, 64, 1)]
)
def test_bad_input_shapes_are_named(shape):
    model = tiny("deeplabv3")
    with pytest.raises(ValueError, match=rf"got shape \({shape[0]}, .*\(B, 3, H, W\)|\(B, 3, H, W\).*got shape"):
        model(torch.randn(*shape))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backbone_depth": 34}, r"backbone_depth = 34 .*accepted: \[18, 50, 101\]"),
        ({"num_labels": 0}, r"num_labels = 0 .*integer >= 1"),
        ({"id2label": {0: "a", 1: "b"}, "num_labels": 3}, r"id2label has 2 entries but num_labels = 3"),
        ({"id2label": {0: "a", 2: "b"}}, r"keys \[0, 2\] are not 0..1"),
        ({"output_stride": 16}, r"output_stride = 16 .*accepted: \[8\]"),
        ({"image_normalization": "bgr"}, r"image_normalization = 'bgr' .*accepted: \['imagenet', 'cirkd_bgr'\]"),
        ({"classifier_dropout_prob": 1.0}, r"classifier_dropout_prob = 1.0 .*\[0, 1\)"),
        ({"backbone_base_width": 0}, r"backbone_base_width = 0"),
        ({"head_channels": -4}, r"head_channels = -4"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FotfDeepLabV3Config(**kwargs)


def test_config_labels_and_defaults():
    config = FotfPSPNetConfig(backbone_depth=101, id2label={"0": "road", "1": "car"})
    assert config.num_labels == 2 and config.id2label == {0: "road", 1: "car"} and config.label2id == {"road": 0, "car": 1}
    assert config.head_width == 512 and config.aux_channels == 256
    assert FotfDeepLabV3Config(backbone_depth=101).head_width == 256
    assert FotfDeepLabV3Config(backbone_base_width=16).head_width == 32  # scaled with the width
    assert FotfDeepLabV3Config(num_labels=4).label2id == {f"LABEL_{i}": i for i in range(4)}


# -------------------------------------------------------------------------- save / Auto classes


@pytest.mark.parametrize("arch", ["deeplabv3", "pspnet"])
def test_save_pretrained_and_auto_reload_bit_identical(arch, tmp_path, x):
    model = create_model(arch, "resnet18", num_labels=3, id2label={0: "sky", 1: "road", 2: "car"},
                         mc_dropout_p=0.2, **TINY).eval()
    model(x)  # nothing changes in eval mode, but make sure BN buffers are real values
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"fotf_{arch}" and saved["label2id"] == {"sky": 0, "road": 1, "car": 2}
    assert isinstance(AutoConfig.from_pretrained(tmp_path), FotfDeepLabV3Config if arch == "deeplabv3" else FotfPSPNetConfig)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    assert loaded.config.id2label == {0: "sky", 1: "road", 2: "car"} and loaded.config.classifier_dropout_prob == 0.2
    assert loaded.head.dropout.p == 0.2
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    # Same weights; the loaded tensors are not 64-byte aligned (safetensors buffers), so CPU conv kernels
    # take other SIMD paths: equal up to float rounding, not bitwise.
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)


def test_from_pretrained_overrides_dropout_and_reheads_with_id2label(tmp_path):
    tiny("pspnet").save_pretrained(tmp_path)
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path, classifier_dropout_prob=0.3)
    assert model.config.classifier_dropout_prob == 0.3 and model.head.dropout.p == 0.3
    names = {i: f"c{i}" for i in range(7)}
    model = AutoModelForSemanticSegmentation.from_pretrained(
        tmp_path, id2label=names, label2id={v: k for k, v in names.items()}, ignore_mismatched_sizes=True
    )
    assert model.config.num_labels == 7 and model.head.classifier.out_channels == 7
    assert model.auxlayer.block[4].out_channels == 7
    with pytest.raises(ValueError, match="pass id2label= and label2id= to from_pretrained, not num_labels="):
        AutoModelForSemanticSegmentation.from_pretrained(tmp_path, num_labels=7)


def test_auto_reload_in_a_fresh_process(tmp_path):
    model = tiny("deeplabv3")
    model.save_pretrained(tmp_path)
    code = (
        "import sys, torch, fotf_hf; from transformers import AutoModelForSemanticSegmentation as A; "
        "from safetensors.torch import load_file; "
        f"m = A.from_pretrained({str(tmp_path)!r}); ref = load_file({str(tmp_path / 'model.safetensors')!r}); "
        "sd = m.state_dict(); "
        "assert all(torch.equal(sd[k], v) for k, v in ref.items()) and sd.keys() == ref.keys(); "
        "print(type(m).__name__, m.training)"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["FotfDeepLabV3ForSemanticSegmentation", "False"]


# ----------------------------------------------------------------------------------- create_model


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        (("deeplab", "resnet18"), {}, r"arch = 'deeplab' is not one of \['deeplabv3', 'pspnet', 'segformer'\]; did you mean 'deeplabv3'"),
        (("deeplabv3", "resnet34"), {}, r"backbone .*'resnet34' is not one of \['resnet18', 'resnet50', 'resnet101'\]"),
        (("segformer", "mit-b7"), {}, r"'mit-b7' is not one of \['mit-b0', .*'mit-b5'\]; did you mean"),
        (("segformer", "resnet18"), {}, r"backbone \(for arch 'segformer'\)"),
        (("deeplabv3", "resnet18"), {"backbone_widht": 8}, r"unknown override 'backbone_widht' .*did you mean 'backbone_base_width'\? valid fields: \[.*'head_channels'"),
        (("segformer", "mit-b0"), {"hiden_sizes": [8]}, r"unknown override 'hiden_sizes' .*did you mean 'hidden_sizes'"),
        (("deeplabv3", "resnet18"), {"classifier_dropout_prob": 0.2}, r"use the mc_dropout_p argument"),
        (("deeplabv3", "resnet18"), {"backbone_depth": 50}, r"use the backbone argument"),
        (("deeplabv3", "resnet18"), {"id2label": {0: "a"}}, r"id2label has ids \[0\] but num_labels = 5"),
        (("deeplabv3", "resnet18"), {"mc_dropout_p": 1.5}, r"mc_dropout_p = 1.5"),
        (("pspnet", "resnet18"), {"output_stride": 16}, r"output_stride = 16"),
    ],
)
def test_create_model_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(*args, num_labels=C, **kwargs)


def test_create_model_defaults_and_overrides():
    model = tiny("deeplabv3", mc_dropout_p=0.3, aux_loss_weight=0.5)
    assert isinstance(model, FotfDeepLabV3ForSemanticSegmentation) and model.training
    assert model.config.id2label == {i: f"class_{i}" for i in range(C)}
    assert model.config.label2id == {f"class_{i}": i for i in range(C)}
    assert model.config.classifier_dropout_prob == 0.3 and model.head.dropout.p == 0.3
    assert model.config.aux_loss_weight == 0.5
    assert isinstance(tiny("pspnet"), FotfPSPNetForSemanticSegmentation)
    # the exact call of tests/test_training.py
    create_model("deeplabv3", "resnet18", num_labels=5, backbone_base_width=8, head_channels=16)


def test_create_model_from_our_folder_checks_and_applies(tmp_path):
    folder = tmp_path / "teacher"
    tiny("deeplabv3").save_pretrained(folder)
    model = create_model("deeplabv3", "resnet18", num_labels=C, pretrained=str(folder), mc_dropout_p=0.25,
                         aux_loss_weight=0.1, aspp_dropout_prob=0.2, **TINY)
    assert isinstance(model, FotfDeepLabV3ForSemanticSegmentation)
    assert model.config.classifier_dropout_prob == 0.25 and model.head.dropout.p == 0.25
    assert model.config.aux_loss_weight == 0.1 and model.head.aspp.project[3].p == 0.2
    with pytest.raises(ValueError, match=r"has 5 classes, but num_labels = 6"):
        create_model("deeplabv3", "resnet18", num_labels=6, pretrained=str(folder))
    with pytest.raises(ValueError, match=r"is a 'fotf_deeplabv3' model, but arch = 'pspnet'"):
        create_model("pspnet", "resnet18", num_labels=C, pretrained=str(folder))
    with pytest.raises(ValueError, match=r"has a resnet18 backbone, but backbone = 'resnet50'"):
        create_model("deeplabv3", "resnet50", num_labels=C, pretrained=str(folder))
    with pytest.raises(ValueError, match=r"override head_channels = 32 disagrees .*head_channels = 16"):
        create_model("deeplabv3", "resnet18", num_labels=C, pretrained=str(folder), head_channels=32)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        create_model("deeplabv3", "resnet18", num_labels=C, pretrained=str(tmp_path / "nope"))


def test_segformer_variants_table():
    for name, spec in MIT_VARIANTS.items():
        config = segformer_config(name, 19, {i: str(i) for i in range(19)}, {str(i): i for i in range(19)}, 0.1)
        assert list(config.depths) == spec["depths"] and list(config.hidden_sizes) == spec["hidden_sizes"]
        assert config.decoder_hidden_size == spec["decoder_hidden_size"]
        assert list(config.num_attention_heads) == [1, 2, 5, 8] and list(config.sr_ratios) == [8, 4, 2, 1]
    assert MIT_VARIANTS["mit-b5"]["depths"] == [3, 6, 40, 3] and MIT_VARIANTS["mit-b2"]["decoder_hidden_size"] == 768
    b0 = create_model("segformer", "mit-b0", num_labels=19, mc_dropout_p=0.1)
    assert abs(sum(p.numel() for p in b0.parameters()) - 3.72e6) < 0.1e6  # MiT-b0 + 19-class head (CIRKD: 3.719 M)
    assert b0.decode_head.dropout.p == 0.1 and b0.config.label2id == {f"class_{i}": i for i in range(19)}


def test_segformer_from_a_local_folder(tmp_path):
    tiny("segformer").save_pretrained(tmp_path)
    model = create_model("segformer", "mit-b0", num_labels=3, pretrained=str(tmp_path), mc_dropout_p=0.3, **TINY_SEGFORMER)
    assert isinstance(model, SegformerForSemanticSegmentation) and not model.training
    assert model.decode_head.classifier.weight.shape == (3, 32, 1, 1)  # re-initialised for 3 classes
    assert model.config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert model.config.classifier_dropout_prob == 0.3 and model.decode_head.dropout.p == 0.3
    with pytest.raises(ValueError, match=r"has depths = \[1, 1, 1, 1\], .*num_attention_heads = \[1, 1, 2, 4\].*, but backbone = 'mit-b0' .*needs depths = \[2, 2, 2, 2\]"):
        create_model("segformer", "mit-b0", num_labels=3, pretrained=str(tmp_path))
    with pytest.raises(ValueError, match=r"is a 'segformer' model, but arch = 'deeplabv3'"):
        create_model("deeplabv3", "resnet18", num_labels=3, pretrained=str(tmp_path))


# -------------------------------------------------------------------------- SegmentationStudent


@pytest.mark.parametrize("arch", ["deeplabv3", "pspnet", "segformer"])
def test_student_head_mode_equals_naive_mode_for_the_same_masks(arch, x):
    student = SegmentationStudent(tiny(arch)).eval()
    features = student.forward_features(x)
    T, (B, D, h, w) = 4, features.head_input.shape
    masks = torch.rand(T, B, D, h, w, generator=torch.Generator().manual_seed(0)) >= student.mc_dropout_p
    head = student.sample_logits(features.head_input, T, masks=masks)
    naive = student.sample_logits_naive(x, T, masks=masks)
    assert head.shape == naive.shape == (T, B, C, h, w)
    torch.testing.assert_close(head, naive, rtol=1e-5, atol=1e-5)
    # and both equal the explicit forward_head with that mask
    torch.testing.assert_close(student.forward_head(features.head_input, mask=masks[2])[0], naive[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch, stride", [("deeplabv3", 8), ("pspnet", 8), ("segformer", 4)])
def test_student_forward_matches_the_plain_model_and_has_every_field(arch, stride, x):
    model = tiny(arch).eval()
    student = SegmentationStudent(model)
    assert not student.training and student.num_labels == C and student.mc_dropout_p == pytest.approx(0.1)
    assert student.config is model.config
    out = student(x)
    torch.testing.assert_close(out.logits, model(x).logits, rtol=1e-6, atol=1e-6)
    assert out.logits.shape == (2, C, 64 // stride, 64 // stride)
    assert out.head_input.shape == out.embedding.shape == (2, head_width(model), 64 // stride, 64 // stride)
    torch.testing.assert_close(out.embedding, out.head_input)
    assert out.backbone_features is not None
    if arch == "segformer":
        assert out.aux_logits is None and out.backbone_features.shape == (2, 64, 2, 2)
    else:
        assert out.aux_logits.shape == out.logits.shape and out.backbone_features.shape == (2, 64, 8, 8)
    labels = torch.randint(0, C, (2, 64, 64))
    labels[0, :5] = 255
    torch.testing.assert_close(student(x, labels=labels).loss, model(x, labels=labels).loss)


def test_student_train_mode_samples_the_head_dropout(x):
    student = SegmentationStudent(tiny("pspnet")).train()
    assert student.model.training
    out = student(x)
    assert not torch.equal(out.embedding, out.head_input)
    logits, embedding = student.forward_head(out.head_input, dropout=False)
    torch.testing.assert_close(embedding, out.head_input)
    student.eval()
    assert not student.model.training
    _, embedding = student.forward_head(out.head_input, dropout=True)
    assert not torch.equal(embedding, out.head_input)


def test_from_pretrained_student_samples_differ_and_forward_is_deterministic(tmp_path, x):
    tiny("deeplabv3").save_pretrained(tmp_path)
    student = SegmentationStudent(AutoModelForSemanticSegmentation.from_pretrained(tmp_path))
    assert not student.training and student.mc_dropout_p == pytest.approx(0.1)
    features = student.forward_features(x)
    samples = student.sample_logits(features.head_input, 5)
    assert samples.shape == (5, 2, C, 8, 8) and samples.dtype == torch.float32
    assert not torch.allclose(samples[0], samples[1])
    naive = student.sample_logits_naive(x, 3)
    assert not torch.allclose(naive[0], naive[1])
    torch.testing.assert_close(student(x).logits, student(x).logits, rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    torch.testing.assert_close(student.sample_logits(features.head_input, 3, generator=g1),
                               student.sample_logits(features.head_input, 3, generator=g2), rtol=0, atol=0)
    # the streaming std is eq. 6 of the same draws
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    probs = torch.softmax(student.sample_logits(features.head_input, 4, generator=g1), dim=2).double().numpy()
    sigma = student.sample_std(features.head_input, 4, generator=g2)
    assert sigma.shape == (2, C, 8, 8)
    np.testing.assert_allclose(sigma.numpy(), np.std(probs, axis=0, ddof=1), rtol=1e-4, atol=1e-6)
    # the samples scatter around the deterministic logits
    mean = student.sample_logits(features.head_input, 400, generator=g1).mean(0)
    assert (mean - student(x).logits).abs().mean() < 0.1 * student(x).logits.abs().mean()


@pytest.mark.parametrize("arch", ["deeplabv3", "segformer"])
def test_naive_sampling_in_train_mode_keeps_batchnorm_statistics(arch, x):
    student = SegmentationStudent(tiny(arch)).train()
    student(x)  # move the running stats away from their init
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    samples = student.sample_logits_naive(x, 3)
    assert samples.shape[0] == 3 and not samples.requires_grad
    assert not torch.allclose(samples[0], samples[1])
    after = student.model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert student.training


def test_mc_dropout_p_zero_is_reported_and_fotf_refuses(x):
    student = SegmentationStudent(tiny("deeplabv3", mc_dropout_p=0.0)).eval()
    assert student.mc_dropout_p == 0.0
    head_input = student.forward_features(x).head_input
    with pytest.raises(ValueError, match="no active dropout site"):
        mc_dropout_probs(student, head_input, num_samples=3)
    with pytest.raises(ValueError, match="no active dropout site"):
        student.sample_logits_naive(x, 2)
    assert mc_dropout_probs(student, head_input, num_samples=3, p=0.2).shape == (3, 2, C, 8, 8)  # explicit p works


@pytest.mark.parametrize("arch", ["deeplabv3", "segformer"])
def test_fotf_runs_on_real_students_in_both_modes(arch, x):
    student = SegmentationStudent(tiny(arch)).train()
    out = student(x)
    for mode in ("head", "naive"):
        result = FOTF(num_samples=3, p=None, mode=mode)(student, out.head_input.detach(), pixel_values=x)
        assert result.sigma.shape == out.logits.shape and float(result.stats["sigma_mean"]) > 0
        assert result.weights.kd.shape == (2, C, 1, 1) and result.weights.ce.shape == (2, 1) + out.logits.shape[-2:]


def test_student_rejects_unsupported_models_and_bad_masks(x):
    with pytest.raises(TypeError, match="Conv2d is not supported; accepted: FotfDeepLabV3ForSemanticSegmentation"):
        SegmentationStudent(nn.Conv2d(3, 3, 1))
    student = SegmentationStudent(tiny("deeplabv3")).eval()
    head_input = student.forward_features(x).head_input
    with pytest.raises(ValueError, match="mask must have head_input's shape"):
        student.forward_head(head_input, mask=torch.ones(1, 16, 8, 8))
    with pytest.raises(ValueError, match=r"masks must be \(T, B, D, h, w\)"):
        student.sample_logits_naive(x, 2, masks=torch.ones(3, 2, 16, 8, 8))
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 8, 8\)"):
        SegmentationStudent(tiny("segformer")).forward_features(torch.randn(2, 3, 8, 8))
