"""Models: CIRKD-v1 DeepLabV3 / PSPNet as transformers models, SegFormer via create_model, SegmentationAdapter.

Tiny widths (backbone_base_width 8, head 16, SegFormer hidden 8..64) and 64 x 64 inputs keep it
CPU-fast; the one full-size check builds DeepLabV3-R18 / PSPNet-R18 / DeepLabV3-R101 once.
"""

import collections.abc
import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSemanticSegmentation, SegformerForSemanticSegmentation

import fotf_hf  # noqa: F401  (registers the Auto classes)
from fotf_hf.fotf import FOTF, MODES, FotfConfig
from fotf_hf.models import (
    FotfDeepLabV3Config,
    FotfDeepLabV3ForSemanticSegmentation,
    FotfPSPNetConfig,
    FotfPSPNetForSemanticSegmentation,
    SegmentationModelOutput,
    SegmentationAdapter,
    create_model,
)
from fotf_hf.models.segformer import MIT_VARIANTS, segformer_config

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


# -------------------------------------------------------------------------- SegmentationAdapter


def same_modules(a, b):
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class QueuedMask(nn.Module):
    """Stands in for an MC site: `x * keep / (1 - p)` with the next keep-mask of a queue shared by all sites."""

    def __init__(self, p, queue):
        super().__init__()
        self.p, self.queue = p, queue

    def forward(self, x):
        return x * self.queue.pop(0).to(x.dtype) / (1 - self.p)


def hook_counts(module):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in module.modules()]


def site_inputs(model, sites, x):
    """Inputs of `sites`, in call order, during one plain forward of `model` (no sampling code involved)."""
    seen = []
    handles = [site.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone())) for site in sites]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def masked_reference(model, sites, masks, x):
    """The plain model's logits with `sites` applying the given keep-masks (call order) and every other
    dropout / DropPath off: what one MC pass with those masks must give."""
    reference = copy.deepcopy(model)
    names = {id(module): name for name, module in model.named_modules()}
    for module in reference.modules():
        if isinstance(module, nn.Dropout) or type(module).__name__.endswith("DropPath"):
            module.eval()
    queue = list(masks)
    for site in sites:
        parent, _, child = names[id(site)].rpartition(".")
        setattr(reference.get_submodule(parent), child, QueuedMask(site.p, queue))
    with torch.no_grad():
        logits = reference(x).logits
    assert not queue, "the reference left masks unused"
    return logits


def test_mc_sites_are_the_dropouts_of_the_prediction_path():
    dlv3, psp, seg = tiny("deeplabv3"), tiny("pspnet"), tiny("segformer")
    # DeepLabV3: ASPP projection dropout (0.5), then the head's (0.1); never the aux head's
    assert same_modules(SegmentationAdapter(dlv3).mc_dropout_sites(), [dlv3.head.aspp.project[3], dlv3.head.block[3]])
    assert same_modules(SegmentationAdapter(psp).mc_dropout_sites(), [psp.head.block[3]])
    assert same_modules(SegmentationAdapter(seg).mc_dropout_sites(), [seg.decode_head.dropout])
    # SegFormer with hidden dropout: every encoder dropout that runs with p > 0, then the decode head's
    enc = tiny("segformer", hidden_dropout_prob=0.2)
    sites = SegmentationAdapter(enc).mc_dropout_sites()
    called = []
    handles = [m.register_forward_pre_hook(lambda module, args: called.append(module))
               for m in enc.modules() if isinstance(m, nn.Dropout)]
    with torch.no_grad():
        enc(torch.randn(1, 3, 64, 64))
    for handle in handles:
        handle.remove()
    active = list({id(m): m for m in called if m.p > 0}.values())
    assert sites[-1] is enc.decode_head.dropout and len(sites) == len(active) == 9  # 4 stages x 2, + head
    assert {id(m) for m in sites} == {id(m) for m in active} and all(m.p == 0.2 for m in sites[:-1])
    with_attention_dropout = SegmentationAdapter(tiny("segformer", attention_probs_dropout_prob=0.1))
    assert with_attention_dropout(torch.randn(1, 3, 32, 32)).logits.shape[1] == enc.config.num_labels  # plain use works
    with pytest.raises(ValueError, match="attention_probs_dropout_prob = 0.1 is not supported with MC dropout"):
        with_attention_dropout.mc_dropout_sites()


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
# SegFormer without encoder sites re-runs only the head on the cached features; with stochastic depth
# in a train-mode main forward those carry that forward's DropPath draw, so it is off here.
@pytest.mark.parametrize("arch, overrides", [("deeplabv3", {}), ("pspnet", {}), ("segformer", {"drop_path_rate": 0.0}),
                                             ("segformer", {"hidden_dropout_prob": 0.1})],
                         ids=["deeplabv3", "pspnet", "segformer", "segformer-encoder-dropout"])
def test_mc_passes_with_given_masks_equal_the_plain_model_with_those_masks(arch, overrides, training, x):
    """exact: every site of the prediction path, from the cached first-site input; classifier: the last
    site + classifier on head_input only. BatchNorm keeps the model's mode (train: batch statistics)."""
    student = SegmentationAdapter(tiny(arch, **overrides)).train(training)
    sites = student.mc_dropout_sites()
    shapes = [tuple(t.shape) for t in site_inputs(student.model, sites, x)]
    assert len(shapes) >= len(sites)
    g = torch.Generator().manual_seed(0)
    T = 2
    masks = [[torch.rand(shape, generator=g) >= 0.3 for shape in shapes] for _ in range(T)]
    features = student.forward_features(x)
    exact = list(student.sample_logits(T, features=features, masks=masks))
    last = [[m[-1]] for m in masks]
    approx = list(student.sample_logits(T, mode="classifier", features=features, masks=last))
    classifier, p_last = student.get_classifier(), sites[-1].p
    for t in range(T):
        torch.testing.assert_close(exact[t], masked_reference(student.model, sites, masks[t], x), rtol=1e-4, atol=1e-5)
        by_hand = F.conv2d(features.head_input * last[t][0] / (1 - p_last), classifier.weight, classifier.bias)
        torch.testing.assert_close(approx[t], by_hand.detach(), rtol=1e-5, atol=1e-6)
        if not training:  # no dropout in the cached head_input: the approximation = the model with only the last site
            torch.testing.assert_close(approx[t], masked_reference(student.model, sites[-1:], last[t], x),
                                       rtol=1e-4, atol=1e-5)
    if len(sites) > 1 and not training:  # the earlier sites matter: the approximation misses them
        assert not torch.allclose(exact[0], approx[0], rtol=1e-3, atol=1e-7)
    assert student.training == training


@pytest.mark.parametrize("arch, stride", [("deeplabv3", 8), ("pspnet", 8), ("segformer", 4)])
def test_student_forward_matches_the_plain_model_and_has_every_field(arch, stride, x):
    model = tiny(arch).eval()
    student = SegmentationAdapter(model)
    assert not student.training and student.num_labels == C and student.mc_dropout_p == pytest.approx(0.1)
    assert student.config is model.config
    out = student(x)
    torch.testing.assert_close(out.logits, model(x).logits, rtol=1e-6, atol=1e-6)
    assert out.logits.shape == (2, C, 64 // stride, 64 // stride)
    assert out.head_input.shape == out.embedding.shape == (2, head_width(model), 64 // stride, 64 // stride)
    torch.testing.assert_close(out.embedding, out.head_input)
    # mc_input / head_input are what the first / last MC site receive in the plain model's forward
    sites = student.mc_dropout_sites()
    first, *_, last = site_inputs(model, [sites[0]], x) + site_inputs(model, [sites[-1]], x)
    torch.testing.assert_close(out.mc_input, first, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.head_input, last, rtol=1e-6, atol=1e-6)
    features = student.forward_features(x)
    torch.testing.assert_close(features.mc_input, out.mc_input, rtol=0, atol=0)
    torch.testing.assert_close(features.head_input, out.head_input, rtol=0, atol=0)
    assert out.backbone_features is not None
    if arch == "segformer":
        assert out.aux_logits is None and out.backbone_features.shape == (2, 64, 2, 2)
    else:
        assert out.aux_logits.shape == out.logits.shape and out.backbone_features.shape == (2, 64, 8, 8)
    labels = torch.randint(0, C, (2, 64, 64))
    labels[0, :5] = 255
    torch.testing.assert_close(student(x, labels=labels).loss, model(x, labels=labels).loss)


def test_segformer_with_encoder_sites_caches_the_pixels_as_mc_input(x):
    student = SegmentationAdapter(tiny("segformer", hidden_dropout_prob=0.1)).eval()
    assert torch.equal(student.forward_features(x).mc_input, x)


def test_forward_head_applies_the_last_site_as_its_own_flag_says(x):
    student = SegmentationAdapter(tiny("pspnet")).train()
    assert student.model.training
    out = student(x)
    assert not torch.equal(out.embedding, out.head_input)
    torch.manual_seed(3)
    logits, embedding = student.forward_head(out.head_input)
    positive = out.head_input > 0
    dropped = (embedding == 0) & positive
    assert 0.03 < (dropped.sum() / positive.sum()).item() < 0.2  # p = 0.1
    torch.testing.assert_close(embedding[~dropped], out.head_input[~dropped] / 0.9)
    classifier = student.get_classifier()
    torch.testing.assert_close(logits, F.conv2d(embedding, classifier.weight, classifier.bias))
    # the site's own flag decides, not the student's: the site alone in eval mode keeps everything
    student.model.get_mc_dropout().eval()
    logits, embedding = student.forward_head(out.head_input)
    assert student.training and torch.equal(embedding, out.head_input)
    torch.testing.assert_close(logits, F.conv2d(out.head_input, classifier.weight, classifier.bias))
    student.eval()
    _, embedding = student.forward_head(out.head_input)
    assert torch.equal(embedding, out.head_input)


def test_from_pretrained_student_samples_differ_and_forward_is_deterministic(tmp_path, x):
    tiny("deeplabv3").save_pretrained(tmp_path)
    student = SegmentationAdapter(AutoModelForSemanticSegmentation.from_pretrained(tmp_path))
    assert not student.training and student.mc_dropout_p == pytest.approx(0.1)
    features = student.forward_features(x)
    samples = student.sample_logits(5, features=features)
    assert isinstance(samples, collections.abc.Iterator)  # one pass at a time
    samples = list(samples)
    assert len(samples) == 5
    assert all(s.shape == (2, C, 8, 8) and s.dtype == torch.float32 and not s.requires_grad for s in samples)
    assert not torch.allclose(samples[0], samples[1])  # eval mode, but the MC passes still sample
    naive = list(student.sample_logits(3, mode="naive", pixel_values=x))
    assert not torch.allclose(naive[0], naive[1])
    torch.testing.assert_close(student(x).logits, student(x).logits, rtol=0, atol=0)
    inputs = {"exact": {"features": features}, "naive": {"pixel_values": x}, "classifier": {"features": features}}
    for mode, given in inputs.items():
        g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        state = torch.random.get_rng_state()
        first = list(student.sample_logits(3, mode=mode, generator=g1, **given))
        assert torch.equal(torch.random.get_rng_state(), state), mode  # masks come from the generator only
        again = list(student.sample_logits(3, mode=mode, generator=g2, **given))
        for a, b in zip(first, again):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # inverted dropout before a linear classifier is unbiased: the classifier-mode samples scatter
    # around the deterministic logits
    g = torch.Generator().manual_seed(5)
    mean = torch.stack(list(student.sample_logits(200, mode="classifier", features=features, generator=g))).mean(0)
    deterministic = student(x).logits
    assert (mean - deterministic).abs().mean() < 0.1 * deterministic.abs().mean()


@pytest.mark.parametrize("arch", ["deeplabv3", "segformer"])
def test_sampling_in_train_mode_keeps_batchnorm_statistics_and_module_flags(arch, x):
    student = SegmentationAdapter(tiny(arch, **({"drop_path_rate": 0.3} if arch == "segformer" else {}))).train()
    frozen = "decode_head.linear_fuse" if arch == "segformer" else "head.block.1"
    student.model.get_submodule(frozen).eval()  # a frozen submodule must stay frozen
    out = student(x)  # move the running stats away from their init
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    flags = {name: m.training for name, m in student.named_modules()}
    hooks = hook_counts(student)
    for mode in MODES:
        given = {"pixel_values": x} if mode == "naive" else {"features": out}
        samples = list(student.sample_logits(3, mode=mode, **given))
        assert len(samples) == 3 and not any(s.requires_grad for s in samples), mode
        assert not torch.allclose(samples[0], samples[1]), mode
        # nothing but the MC sites is random (not the global RNG's DropPath / other dropouts)
        torch.manual_seed(1)
        a = list(student.sample_logits(2, mode=mode, generator=torch.Generator().manual_seed(7), **given))
        torch.manual_seed(2)
        b = list(student.sample_logits(2, mode=mode, generator=torch.Generator().manual_seed(7), **given))
        for s, t in zip(a, b):
            torch.testing.assert_close(s, t, rtol=0, atol=0)
    after = student.model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key
    assert {name: m.training for name, m in student.named_modules()} == flags
    assert hook_counts(student) == hooks


def test_a_model_without_active_mc_sites_is_refused_and_an_explicit_p_samples_it(x):
    psp = SegmentationAdapter(tiny("pspnet", mc_dropout_p=0.0)).eval()
    assert psp.mc_dropout_p == 0.0
    out = psp(x)
    for mode in MODES:
        with pytest.raises(ValueError, match="no active MC dropout site"):
            list(psp.sample_logits(2, mode=mode, features=out, pixel_values=x))
    with pytest.raises(ValueError, match="no active MC dropout site"):
        FOTF(FotfConfig(enabled=True, num_samples=3))(psp, out, pixel_values=x)
    samples = list(psp.sample_logits(3, features=out, p=0.2))  # an explicit p works
    assert len(samples) == 3 and not torch.allclose(samples[0], samples[1])
    # DeepLabV3 without head dropout keeps its ASPP site: exact passes sample it, the classifier approximation cannot
    dlv3 = SegmentationAdapter(tiny("deeplabv3", mc_dropout_p=0.0)).eval()
    out = dlv3(x)
    exact = list(dlv3.sample_logits(2, features=out))
    assert not torch.allclose(exact[0], exact[1])
    with pytest.raises(ValueError, match="no active MC dropout site"):
        list(dlv3.sample_logits(2, mode="classifier", features=out))


@pytest.mark.parametrize("arch", ["deeplabv3", "segformer"])
def test_fotf_runs_on_real_students_in_every_mode(arch, x):
    student = SegmentationAdapter(tiny(arch)).train()
    out = student(x)
    for mode in MODES:
        fotf = FOTF(FotfConfig(enabled=True, num_samples=3, mode=mode))
        # naive student sampling runs on the pixels alone, as the training step calls it
        result = fotf(student, out if mode != "naive" else None, pixel_values=x)
        assert result.sigma.shape == out.logits.shape and float(result.stats["sigma_mean"]) > 0, mode
        # the defaults: KD weight per pixel, CE weight per class
        assert result.weights.kd.shape == (2, 1) + out.logits.shape[-2:] and result.weights.ce.shape == (2, C, 1, 1)
    assert student.training


def test_student_rejects_unsupported_models_and_bad_arguments(x):
    with pytest.raises(TypeError, match="Conv2d is not supported; accepted: FotfDeepLabV3ForSemanticSegmentation"):
        SegmentationAdapter(nn.Conv2d(3, 3, 1))
    student = SegmentationAdapter(tiny("deeplabv3")).eval()
    expected = student(x).logits
    hooks = hook_counts(student)
    features = student.forward_features(x)
    keep = torch.ones(2, 16, 8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="mode = 'head' is not valid; choose one of: exact, naive, classifier"):
        list(student.sample_logits(2, mode="head", features=features))
    with pytest.raises(ValueError, match=r"sample_logits\(mode='exact'\) needs features"):
        list(student.sample_logits(2, pixel_values=x))
    with pytest.raises(ValueError, match=r"sample_logits\(mode='naive'\) needs pixel_values"):
        list(student.sample_logits(2, mode="naive", features=features))
    with pytest.raises(ValueError, match="masks holds 3 passes but num_samples = 2"):
        list(student.sample_logits(2, features=features, masks=[[keep, keep]] * 3))
    with pytest.raises(ValueError, match=r"mask of shape \(1, 16, 8, 8\) given for a site whose input is \(2, 16, 8, 8\)"):
        list(student.sample_logits(1, features=features, masks=[[torch.ones(1, 16, 8, 8), keep]]))
    with pytest.raises(ValueError, match="masks ran out"):  # DeepLabV3 calls two sites per pass
        list(student.sample_logits(1, features=features, masks=[[keep]]))
    with pytest.raises(ValueError, match="1 of the given masks were not used"):
        list(student.sample_logits(1, mode="classifier", features=features, masks=[[keep, keep]]))
    # after the errors: no hooks left, dropout flags and grad mode as before, the same deterministic forward
    assert hook_counts(student) == hooks
    assert not any(m.training for m in student.modules()) and torch.is_grad_enabled()
    torch.testing.assert_close(student(x).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"got shape \(2, 3, 8, 8\)"):
        SegmentationAdapter(tiny("segformer")).forward_features(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("arch", ["deeplabv3", "pspnet"])
def test_folder_saved_by_version_0_1_0_loads_with_the_same_logits(arch):
    """tests/data/saved_by_0.1.0/<arch>: saved (with its logits on a fixed input) by the package as it
    was before the model files were renamed; loading by `model_type` must keep giving those logits."""
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(__file__).parent / "data" / "saved_by_0.1.0" / arch
    model = AutoModelForSemanticSegmentation.from_pretrained(str(folder)).eval()
    assert model.config.model_type == f"fotf_{arch}"
    expected = load_file(str(folder / "expected_logits.safetensors"))
    with torch.no_grad():
        logits = model(expected["pixel_values"]).logits
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)
