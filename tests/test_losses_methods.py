"""Af-DCD, SKD, IFVD and CWD losses against loop-based NumPy references written from their formulas."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fotf_hf.losses.afdcd import AFDCD_DATASET_WEIGHTS, AfDCDLoss, fit_to_patches, omni_contrastive_loss
from fotf_hf.losses.base import FotfWeights, LossInputs
from fotf_hf.losses.cwd import CWDLoss
from fotf_hf.losses.ifvd import IFVDLoss
from fotf_hf.losses.skd import SKDPairwiseLoss


def np_normalize(x, axis):
    return x / np.maximum(np.sqrt((x**2).sum(axis=axis, keepdims=True)), 1e-12)


def np_log_softmax(x):
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def np_max_pool_ceil(x, k):
    b, c, h, w = x.shape
    oh, ow = -(-h // k), -(-w // k)
    out = np.zeros((b, c, oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * k : (i + 1) * k, j * k : (j + 1) * k].max(axis=(2, 3))
    return out


def np_conv3x3(x, weight, bias):
    """Naive 3x3 convolution with zero padding 1."""
    b, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((b, weight.shape[0], h, w))
    for di in range(3):
        for dj in range(3):
            out += np.einsum("oc,bchw->bohw", weight[:, :, di, dj], xp[:, :, di : di + h, dj : dj + w])
    return out + bias[None, :, None, None]


def t2n(x):
    return x.detach().double().numpy()


def feature_inputs(b=2, ds=4, dt=6, h=6, w=6, num_classes=3, label_size=None, **extra):
    label_size = label_size or (h, w)
    fields = dict(
        student_logits=torch.randn(b, num_classes, h, w, requires_grad=True),
        labels=torch.randint(0, num_classes, (b, *label_size)),
        teacher_logits=torch.randn(b, num_classes, h, w, requires_grad=True),
        student_embedding=torch.randn(b, ds, h, w, requires_grad=True),
        teacher_embedding=torch.randn(b, dt, h, w, requires_grad=True),
    )
    fields.update(extra)
    return LossInputs(**fields)


def replace(inputs, **changes):
    return LossInputs(**{**inputs.__dict__, **changes})


# ----------------------------------------------------------------------------- Af-DCD


def np_omni_contrastive(pred, target, groups, p, tau):
    """Loop over batch, patches, positions q and groups m; maps already pooled/fitted."""
    b, c, h, w = pred.shape
    g = c // groups
    total = 0.0
    for bi in range(b):
        for pi in range(0, h, p):
            for pj in range(0, w, p):
                positions = [(pi + r, pj + s) for r in range(p) for s in range(p)]

                def vec(x, pos, m):
                    return x[bi, m * g : (m + 1) * g, pos[0], pos[1]]

                for q in positions:
                    for m in range(groups):
                        anchor = vec(pred, q, m)
                        pos_logit = -np.abs(anchor - vec(target, q, m)).sum() / tau
                        neg = [
                            -np.abs(anchor - vec(target, q2, m2)).sum() / tau
                            for q2 in positions
                            for m2 in range(groups)
                            if m2 != m
                        ]
                        logits = np.array([pos_logit] + neg)
                        total += -np_log_softmax(logits)[0]
    return total / (h * w) / b


@pytest.mark.parametrize("groups,tau", [(2, 0.07), (3, 0.5)])
def test_omni_contrastive_matches_loop_reference(groups, tau):
    pred, target = torch.randn(2, 6, 4, 8), torch.randn(2, 6, 4, 8)
    got = omni_contrastive_loss(pred, target, channel_groups=groups, patch_size=2, temperature=tau, pool=None)
    assert got.item() == pytest.approx(np_omni_contrastive(t2n(pred), t2n(target), groups, 2, tau), rel=1e-5)


@pytest.mark.parametrize("size,fit,expected_size", [(9, "crop", 4), (9, "pad", 8), (8, "crop", 4)])
def test_omni_contrastive_pooling_and_fitting(size, fit, expected_size):
    pred, target = torch.randn(1, 4, size, size), torch.randn(1, 4, size, size)
    got = omni_contrastive_loss(
        pred, target, channel_groups=2, patch_size=4, temperature=0.1, pool=2, fit=fit
    )
    p_np, t_np = np_max_pool_ceil(t2n(pred), 2), np_max_pool_ceil(t2n(target), 2)  # 9 -> 5 (ceil), 8 -> 4
    if fit == "crop":
        p_np, t_np = p_np[..., :4, :4], t_np[..., :4, :4]
    elif p_np.shape[-1] % 4:
        pad = ((0, 0), (0, 0), (0, 3), (0, 3))
        p_np, t_np = np.pad(p_np, pad, mode="edge"), np.pad(t_np, pad, mode="edge")
    assert p_np.shape[-1] == expected_size
    assert got.item() == pytest.approx(np_omni_contrastive(p_np, t_np, 2, 4, 0.1), rel=1e-5)


def test_fit_to_patches_reproduces_afdcd_camvid_crop_and_errors():
    x = torch.randn(1, 2, 45, 45)
    assert torch.equal(fit_to_patches(x, 4, "crop"), x[..., :44, :44])
    assert fit_to_patches(x, 4, "pad").shape[-2:] == (48, 48)
    with pytest.raises(ValueError, match="smaller than one 4x4 patch"):
        fit_to_patches(torch.randn(1, 2, 3, 8), 4, "crop")
    with pytest.raises(ValueError, match=r"not one of \('crop', 'pad'\)"):
        fit_to_patches(x, 4, "reflect")


def test_afdcd_matches_reference_with_given_mask():
    loss = AfDCDLoss(
        3, 4, patch_size=2, channel_groups=2, temperature=0.2, fd_weight=0.5, contrast_weight=2.0, pool=2
    )
    s, t = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(2, 4, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    out = loss(feature_inputs(student_backbone=s, teacher_backbone=t), mask=mask)
    assert set(out) == {"afdcd_fd", "afdcd_contrast"}
    a = (
        np.einsum("oc,bchw->bohw", t2n(loss.align.weight)[:, :, 0, 0], t2n(s))
        + t2n(loss.align.bias)[None, :, None, None]
    )
    hidden = np.maximum(
        np_conv3x3(a * t2n(mask), t2n(loss.projector[0].weight), t2n(loss.projector[0].bias)), 0
    )
    g = np_conv3x3(hidden, t2n(loss.projector[2].weight), t2n(loss.projector[2].bias))
    fd = ((g - t2n(t)) ** 2).sum() / 2
    ctr = np_omni_contrastive(np_max_pool_ceil(g, 2), np_max_pool_ceil(t2n(t), 2), 2, 2, 0.2)
    assert out["afdcd_fd"].item() == pytest.approx(0.5 * fd, rel=1e-5)
    assert out["afdcd_contrast"].item() == pytest.approx(2.0 * ctr, rel=1e-5)


def test_afdcd_fd_is_zero_when_the_generator_reproduces_the_teacher():
    # Cs == Ct (align is the identity), no masking, projector = identity kernels: G = relu(f) = f for f >= 0.
    loss = AfDCDLoss(4, 4, mask_ratio=0.0, channel_groups=2, pool=None)
    with torch.no_grad():
        for conv in (loss.projector[0], loss.projector[2]):
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[torch.arange(4), torch.arange(4), 1, 1] = 1.0
    f = torch.rand(2, 4, 8, 8)
    out = loss(feature_inputs(student_backbone=f, teacher_backbone=f))
    assert isinstance(loss.align, torch.nn.Identity)
    assert out["afdcd_fd"].item() == pytest.approx(0.0, abs=1e-10)


def test_afdcd_random_mask_ratio_and_gradients():
    loss = AfDCDLoss(3, 4, channel_groups=2, pool=2)
    mask = loss.random_mask(1, 200, 200, torch.device("cpu"))
    assert set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask.mean().item() == pytest.approx(0.25, abs=0.01)  # 75% of the positions are zeroed
    s = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = loss(feature_inputs(student_backbone=s, teacher_backbone=t))
    (out["afdcd_fd"] + out["afdcd_contrast"]).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None
    for name, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_afdcd_dataset_weights_and_errors():
    assert AFDCD_DATASET_WEIGHTS["cityscapes"] == {"fd_weight": 2e-6, "contrast_weight": 0.005}
    assert AFDCD_DATASET_WEIGHTS["camvid"] == {"fd_weight": 8e-6, "contrast_weight": 0.01}
    assert AFDCD_DATASET_WEIGHTS["voc"] == {"fd_weight": 1e-6, "contrast_weight": 0.005}
    loss = AfDCDLoss(8, 32, **AFDCD_DATASET_WEIGHTS["camvid"])
    assert (loss.fd_weight, loss.contrast_weight) == (8e-6, 0.01)
    with pytest.raises(ValueError, match="teacher_channels = 30 is not divisible by channel_groups = 16"):
        AfDCDLoss(8, 30)
    with pytest.raises(ValueError, match="mask_ratio"):
        AfDCDLoss(8, 32, mask_ratio=1.0)
    with pytest.raises(ValueError, match="fit"):
        AfDCDLoss(8, 32, fit="wrap")
    small = AfDCDLoss(3, 4, channel_groups=2)
    base = feature_inputs(student_backbone=torch.randn(2, 3, 8, 8), teacher_backbone=torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="needs LossInputs.teacher_backbone, got None.*SegFormer"):
        small(replace(base, teacher_backbone=None))
    with pytest.raises(ValueError, match="student_backbone has 5 channels but the loss was built for 3"):
        small(replace(base, student_backbone=torch.randn(2, 5, 8, 8)))
    with pytest.raises(ValueError, match="mask must be"):
        small(base, mask=torch.ones(2, 8, 8))


# ----------------------------------------------------------------------------- SKD


def np_skd(fs, ft):
    fs, ft = np_normalize(np_max_pool_ceil(fs, 2), 1), np_normalize(np_max_pool_ceil(ft, 2), 1)
    b, _, h, w = fs.shape
    fs, ft = fs.reshape(b, -1, h * w), ft.reshape(b, -1, h * w)
    total = 0.0
    for bi in range(b):
        for p in range(h * w):
            for q in range(h * w):
                total += (fs[bi, :, p] @ fs[bi, :, q] - ft[bi, :, p] @ ft[bi, :, q]) ** 2
    return total / (b * (h * w) ** 2)


def test_skd_matches_loop_reference_on_odd_sizes():
    inputs = feature_inputs(h=7, w=5)
    out = SKDPairwiseLoss(weight=3.0)(inputs)
    assert set(out) == {"skd_pairwise"}
    assert out["skd_pairwise"].item() == pytest.approx(
        3.0 * np_skd(t2n(inputs.student_embedding), t2n(inputs.teacher_embedding)), rel=1e-5
    )


def test_skd_identical_is_zero_and_grads_student_only():
    f = torch.randn(2, 4, 6, 6)
    assert SKDPairwiseLoss()(feature_inputs(ds=4, dt=4, student_embedding=f, teacher_embedding=f.clone()))[
        "skd_pairwise"
    ].item() == pytest.approx(0, abs=1e-10)
    inputs = feature_inputs()
    SKDPairwiseLoss()(inputs)["skd_pairwise"].backward()
    assert inputs.student_embedding.grad.abs().sum() > 0 and inputs.teacher_embedding.grad is None
    with pytest.raises(ValueError, match="SKDPairwiseLoss needs LossInputs.teacher_embedding"):
        SKDPairwiseLoss()(replace(inputs, teacher_embedding=None))


# ----------------------------------------------------------------------------- IFVD


def np_ifvd_cos(f, labels, num_classes):
    b, d, h, w = f.shape
    out = np.zeros((b, h, w))
    for bi in range(b):
        protos = {}
        for k in range(num_classes):
            members = [f[bi, :, i, j] for i in range(h) for j in range(w) if labels[bi, i, j] == k]
            protos[k] = np.sum(members, axis=0) / (len(members) + 1e-6) if members else np.zeros(d)
        for i in range(h):
            for j in range(w):
                v = f[bi, :, i, j]
                c = v if labels[bi, i, j] == 255 else protos[labels[bi, i, j]]
                out[bi, i, j] = v @ c / max(np.linalg.norm(v) * np.linalg.norm(c), 1e-8)
    return out


def test_ifvd_matches_loop_reference_with_resized_labels_and_ignore():
    inputs = feature_inputs(h=4, w=5, num_classes=4, label_size=(8, 10))
    inputs.labels[0, :4] = 255
    out = IFVDLoss(4, weight=2.0)(inputs)
    assert set(out) == {"ifvd"}
    small = inputs.labels[:, ::2, ::2].numpy()  # nearest 8x10 -> 4x5
    cs = np_ifvd_cos(t2n(inputs.student_embedding), small, 4)
    ct = np_ifvd_cos(t2n(inputs.teacher_embedding), small, 4)
    assert out["ifvd"].item() == pytest.approx(2.0 * ((cs - ct) ** 2).mean(), rel=1e-5)


def test_ifvd_zero_cases_and_gradients():
    f = torch.randn(2, 4, 5, 5)
    same = feature_inputs(ds=4, dt=4, h=5, w=5, student_embedding=f, teacher_embedding=f.clone())
    assert IFVDLoss(3)(same)["ifvd"].item() == pytest.approx(0.0, abs=1e-10)
    # every pixel ignored: both cosines are 1 whatever the features
    ignored = feature_inputs(h=5, w=5)
    ignored.labels.fill_(255)
    assert IFVDLoss(3)(ignored)["ifvd"].item() == pytest.approx(0.0, abs=1e-10)
    inputs = feature_inputs()
    IFVDLoss(3)(inputs)["ifvd"].backward()
    assert inputs.student_embedding.grad.abs().sum() > 0 and inputs.teacher_embedding.grad is None


def test_ifvd_errors():
    inputs = feature_inputs(num_classes=3)
    with pytest.raises(ValueError, match="outside the 2 classes"):
        IFVDLoss(2)(replace(inputs, labels=torch.full_like(inputs.labels, 2)))
    with pytest.raises(ValueError, match="integer"):
        IFVDLoss(3)(replace(inputs, labels=inputs.labels.float()))
    with pytest.raises(ValueError, match="IFVDLoss needs LossInputs.student_embedding"):
        IFVDLoss(3)(replace(inputs, student_embedding=None))
    with pytest.raises(ValueError, match="num_classes"):
        IFVDLoss(0)


# ----------------------------------------------------------------------------- CWD


def np_cwd(fs, ft, tau, normaliser_channels):
    b, c, h, w = ft.shape
    total = 0.0
    for n in range(b):
        for ch in range(c):
            ls = np_log_softmax(fs[n, ch].reshape(-1) / tau)
            lt = np_log_softmax(ft[n, ch].reshape(-1) / tau)
            total += sum(np.exp(lt[i]) * (lt[i] - ls[i]) for i in range(h * w))
    return tau**2 * total / (b * normaliser_channels)


def test_cwd_features_with_projection_matches_loop_reference():
    loss = CWDLoss(4, 6, temperature=2.0)
    assert loss.weight == 50.0 and loss.term == "cwd_feat"
    inputs = feature_inputs()
    out = loss(inputs)
    assert set(out) == {"cwd_feat"}
    proj = np.einsum("oc,bchw->bohw", t2n(loss.conv.weight)[:, :, 0, 0], t2n(inputs.student_embedding))
    # CIRKD normalises by n * (student channels), here 4, though the sum runs over 6 teacher channels.
    expected = 50.0 * np_cwd(proj, t2n(inputs.teacher_embedding), 2.0, 4)
    assert out["cwd_feat"].item() == pytest.approx(expected, rel=1e-5)


def test_cwd_logits_matches_reference_identical_is_zero_and_grads():
    loss = CWDLoss(3, 3, on="logits")
    assert loss.weight == 3.0 and isinstance(loss.conv, torch.nn.Identity)
    inputs = feature_inputs(num_classes=3)
    out = loss(inputs)
    assert set(out) == {"cwd_logits"}
    expected = 3.0 * np_cwd(t2n(inputs.student_logits), t2n(inputs.teacher_logits), 4.0, 3)
    assert out["cwd_logits"].item() == pytest.approx(expected, rel=1e-5)
    out["cwd_logits"].backward()
    assert inputs.student_logits.grad.abs().sum() > 0 and inputs.teacher_logits.grad is None
    same = replace(inputs, teacher_logits=inputs.student_logits.detach().clone())
    assert loss(same)["cwd_logits"].item() == pytest.approx(0.0, abs=1e-6)


def test_cwd_projection_gets_gradients_and_errors():
    loss = CWDLoss(4, 6, weight=1.0)
    inputs = feature_inputs()
    loss(inputs)["cwd_feat"].backward()
    assert loss.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"on = 'feat' is not one of \('embedding', 'logits'\)"):
        CWDLoss(4, 6, on="feat")
    with pytest.raises(ValueError, match="student predicts 3 classes but the teacher 4"):
        CWDLoss(3, 4, on="logits")
    with pytest.raises(ValueError, match="on='logits'.*teacher_logits, got None"):
        CWDLoss(3, 3, on="logits")(replace(inputs, teacher_logits=None))
    with pytest.raises(ValueError, match="teacher_embedding has 5 channels but the loss was built for 6"):
        loss(replace(inputs, teacher_embedding=torch.randn(2, 5, 6, 6)))


# ----------------------------------------------------------------------------- shared behaviour


def _all_losses():
    return [
        (AfDCDLoss(3, 4, channel_groups=2, pool=2), ("afdcd_fd", "afdcd_contrast")),
        (SKDPairwiseLoss(), ("skd_pairwise",)),
        (IFVDLoss(3), ("ifvd",)),
        (CWDLoss(4, 6), ("cwd_feat",)),
        (CWDLoss(3, 3, on="logits"), ("cwd_logits",)),
    ]


def _full_inputs(dtype=torch.float32, teacher_size=8):
    return feature_inputs(
        h=8,
        w=8,
        label_size=(16, 16),
        student_embedding=torch.randn(2, 4, 8, 8).to(dtype),
        teacher_embedding=torch.randn(2, 6, teacher_size, teacher_size).to(dtype),
        student_logits=torch.randn(2, 3, 8, 8).to(dtype),
        teacher_logits=torch.randn(2, 3, teacher_size, teacher_size).to(dtype),
        student_backbone=torch.randn(2, 3, 8, 8).to(dtype),
        teacher_backbone=torch.randn(2, 4, teacher_size, teacher_size).to(dtype),
    )


def test_bf16_inputs_under_autocast_give_fp32_terms_close_to_fp32():
    inputs = _full_inputs()
    bf16 = _full_inputs(torch.bfloat16)
    bf16 = replace(
        bf16,
        labels=inputs.labels,
        **{
            k: getattr(inputs, k).bfloat16()
            for k in (
                "student_embedding",
                "teacher_embedding",
                "student_logits",
                "teacher_logits",
                "student_backbone",
                "teacher_backbone",
            )
        }
    )
    for loss, terms in _all_losses():
        mask = torch.ones(2, 1, 8, 8)
        kwargs = {"mask": mask} if isinstance(loss, AfDCDLoss) else {}
        ref = loss(inputs, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = loss(bf16, **kwargs)
        for term in terms:
            assert out[term].dtype == torch.float32 and torch.isfinite(out[term]), (loss, term)
            assert out[term].item() == pytest.approx(ref[term].item(), rel=0.05, abs=1e-4), (loss, term)


def test_teacher_maps_of_another_size_are_resized_to_the_student():
    big = _full_inputs(teacher_size=16)
    resized = replace(
        big,
        **{
            k: F.interpolate(getattr(big, k), size=(8, 8), mode="bilinear", align_corners=False)
            for k in ("teacher_embedding", "teacher_logits", "teacher_backbone")
        }
    )
    for loss, terms in _all_losses():
        kwargs = {"mask": torch.ones(2, 1, 8, 8)} if isinstance(loss, AfDCDLoss) else {}
        a, b = loss(big, **kwargs), loss(resized, **kwargs)
        for term in terms:
            assert a[term].item() == pytest.approx(b[term].item(), rel=1e-6), (loss, term)


def test_fotf_weights_do_not_change_feature_losses():
    inputs = _full_inputs()
    weighted = replace(inputs, weights=FotfWeights(kd=torch.rand(2, 3, 8, 8), ce=torch.rand(2, 3, 8, 8)))
    for loss, terms in _all_losses():
        kwargs = {"mask": torch.ones(2, 1, 8, 8)} if isinstance(loss, AfDCDLoss) else {}
        a, b = loss(inputs, **kwargs), loss(weighted, **kwargs)
        for term in terms:
            assert a[term].item() == b[term].item()


def test_readme_lists_exactly_the_registered_methods():
    from pathlib import Path

    from fotf_hf.losses import methods_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "\n".join("  " + line for line in methods_table().splitlines()) in readme
