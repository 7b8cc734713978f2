"""KD (eq. 3) and CE (eq. 8) losses against independent references.

References: `F.kl_div(..., reduction="batchmean")` (CIRKD's CriterionKD), `F.cross_entropy`, and
plain NumPy loops over pixels with a hand-written bilinear (align_corners=True) interpolation.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fotf_hf.fotf import MERGES
from fotf_hf.losses.base import FotfWeights, LossInputs
from fotf_hf.losses.ce import CELoss, ce_loss
from fotf_hf.losses.kd import KDLoss, kd_loss

# The weight shape each FOTF merge produces (fotf_hf/fotf.py): what the losses must broadcast.
WEIGHT_SHAPES = {
    "none": lambda b, c, h, w: (b, c, h, w),
    "per_pixel": lambda b, c, h, w: (b, 1, h, w),
    "per_class": lambda b, c, h, w: (b, c, 1, 1),
    "per_image": lambda b, c, h, w: (b, 1, 1, 1),
    "batch_mean": lambda b, c, h, w: (1, c, h, w),
}


def test_every_merge_has_a_weight_shape_here():
    assert set(WEIGHT_SHAPES) == set(MERGES)


# ------------------------------------------------------------------ NumPy references


def np_log_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def np_kd_loop(s, t, w, temperature):
    """T^2 / (B h w) * sum_{b,i,j} sum_c w * pt * (log pt - log ps), one pixel at a time."""
    s, t = s.astype(np.float64) / temperature, t.astype(np.float64) / temperature
    B, C, H, W = s.shape
    total = 0.0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                ls = np_log_softmax(s[b, :, i, j], 0)
                lt = np_log_softmax(t[b, :, i, j], 0)
                for c in range(C):
                    wc = 1.0 if w is None else w[b % w.shape[0], c % w.shape[1], i % w.shape[2], j % w.shape[3]]
                    total += wc * math.exp(lt[c]) * (lt[c] - ls[c])
    return temperature**2 * total / (B * H * W)


def np_bilinear_align_corners(x, out_h, out_w):
    """Bilinear resize of (..., h, w) with align_corners=True, written out per output pixel."""
    h, w = x.shape[-2:]
    out = np.zeros(x.shape[:-2] + (out_h, out_w))
    for i in range(out_h):
        y = i * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
        y0 = int(math.floor(y))
        y1 = min(y0 + 1, h - 1)
        fy = y - y0
        for j in range(out_w):
            xx = j * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
            x0 = int(math.floor(xx))
            x1 = min(x0 + 1, w - 1)
            fx = xx - x0
            out[..., i, j] = (
                (1 - fy) * (1 - fx) * x[..., y0, x0]
                + (1 - fy) * fx * x[..., y0, x1]
                + fy * (1 - fx) * x[..., y1, x0]
                + fy * fx * x[..., y1, x1]
            )
    return out


def np_ce_loop(logits, labels, w, ignore=255):
    """Eq. 8 at the label resolution: mean over valid pixels of w(i, y_i) * -log q_{i, y_i}."""
    B, C, h, wd = logits.shape
    H, W = labels.shape[-2:]
    up = np_bilinear_align_corners(logits.astype(np.float64), H, W) if (h, wd) != (H, W) else logits.astype(np.float64)
    if w is not None and w.shape[-2:] != (1, 1) and w.shape[-2:] != (H, W):
        w = np_bilinear_align_corners(w.astype(np.float64), H, W)
    total, count = 0.0, 0
    for b in range(B):
        for i in range(H):
            for j in range(W):
                y = int(labels[b, i, j])
                if y == ignore:
                    continue
                lq = np_log_softmax(up[b, :, i, j], 0)
                wy = 1.0 if w is None else w[b % w.shape[0], y % w.shape[1], i % w.shape[2], j % w.shape[3]]
                total += wy * -lq[y]
                count += 1
    return total / max(count, 1)


# ------------------------------------------------------------------ KD


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_unweighted_equals_cirkd_criterion_kd(temperature):
    s, t = torch.randn(2, 5, 6, 7) * 3, torch.randn(2, 5, 6, 7) * 3
    view = lambda z: z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # noqa: E731
    ref = F.kl_div(F.log_softmax(view(s) / temperature, 1), F.softmax(view(t) / temperature, 1), reduction="batchmean")
    ref = ref * temperature**2
    torch.testing.assert_close(kd_loss(s, t, temperature=temperature), ref, rtol=1e-5, atol=1e-6)
    # all-ones weights recover plain KD
    torch.testing.assert_close(kd_loss(s, t, torch.ones(2, 5, 6, 7), temperature), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(kd_loss(s, t, torch.ones(2, 1, 1, 1), temperature), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merge", list(WEIGHT_SHAPES))
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_kd_weighted_matches_numpy_loop(merge, temperature):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 3, 5, generator=g) * 2, torch.randn(2, 4, 3, 5, generator=g) * 2
    w = 1 + 3 * torch.rand(*WEIGHT_SHAPES[merge](2, 4, 3, 5), generator=g)
    expected = np_kd_loop(s.numpy(), t.numpy(), w.numpy(), temperature)
    assert kd_loss(s, t, w, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_zero_for_identical_logits_and_positive_otherwise():
    s = torch.randn(2, 3, 4, 4)
    assert kd_loss(s, s.clone(), torch.full((2, 3, 4, 4), 7.0)).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, torch.randn(2, 3, 4, 4)).item() > 0


def test_kd_gradient_reaches_student_only_and_matches_closed_form():
    s = torch.randn(2, 4, 3, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, 3, requires_grad=True)
    w = (1 + torch.rand(2, 4, 3, 3)).requires_grad_(True)
    kd_loss(s, t, w).backward()
    assert t.grad is None and w.grad is None
    # d/ds_c sum_k w_k pt_k (log pt_k - log ps_k) = ps_c * sum_k w_k pt_k - w_c pt_c, divided by N = B h w
    ps, pt, wn = F.softmax(s.detach(), 1).numpy(), F.softmax(t.detach(), 1).numpy(), w.detach().numpy()
    expected = (ps * (wn * pt).sum(1, keepdims=True) - wn * pt) / (2 * 3 * 3)
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_kd_resizes_teacher_logits_bilinearly_to_student_size():
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 16, 16)
    t_small = F.interpolate(t, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(kd_loss(s, t), kd_loss(s, t_small))
    # a teacher that is constant over space resizes exactly: the loss must equal the same-size one
    t_const = torch.randn(2, 3, 1, 1)
    torch.testing.assert_close(kd_loss(s, t_const.expand(2, 3, 16, 16)), kd_loss(s, t_const.expand(2, 3, 8, 8)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kd_and_ce_low_precision_inputs_are_finite_fp32(dtype):
    s, t = torch.randn(2, 19, 16, 16).to(dtype), torch.randn(2, 19, 16, 16).to(dtype)
    labels = torch.randint(0, 19, (2, 64, 64))
    w = (1 + torch.rand(2, 19, 16, 16)).to(dtype)
    for loss in (kd_loss(s, t, w), ce_loss(s, labels, w)):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # computed in fp32 from the (rounded) inputs: equals the fp32 loss of the upcast tensors
    torch.testing.assert_close(kd_loss(s, t, w), kd_loss(s.float(), t.float(), w.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = kd_loss(s.float(), t.float(), w.float())
        ce_inside = ce_loss(s.float(), labels, w.float())
    assert inside.dtype == torch.float32 and ce_inside.dtype == torch.float32
    torch.testing.assert_close(inside, kd_loss(s.float(), t.float(), w.float()))
    torch.testing.assert_close(ce_inside, ce_loss(s.float(), labels, w.float()))


def test_kd_errors():
    s = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="number of classes"):
        kd_loss(s, torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="batch size"):
        kd_loss(s, torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 2\) do not broadcast"):
        kd_loss(s, s, torch.ones(2, 3, 2, 2))
    with pytest.raises(ValueError, match="B, C, h, w"):
        kd_loss(s[0], s[0])


def test_kd_module():
    s, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    labels = torch.zeros(2, 16, 16, dtype=torch.long)
    w = 1 + torch.rand(2, 3, 1, 1)
    module = KDLoss(weight=2.5, temperature=2.0)
    out = module(LossInputs(student_logits=s, labels=labels, teacher_logits=t, weights=FotfWeights(kd=w)))
    assert set(out) == {"kd"}
    torch.testing.assert_close(out["kd"], 2.5 * kd_loss(s, t, w, 2.0))
    plain = module(LossInputs(student_logits=s, labels=labels, teacher_logits=t))["kd"]
    torch.testing.assert_close(plain, 2.5 * kd_loss(s, t, None, 2.0))
    # FotfWeights without KD weights (apply_to="ce") is plain KD
    torch.testing.assert_close(
        module(LossInputs(student_logits=s, labels=labels, teacher_logits=t, weights=FotfWeights(ce=w)))["kd"], plain
    )
    with pytest.raises(ValueError, match="teacher_logits"):
        module(LossInputs(student_logits=s, labels=labels))
    with pytest.raises(ValueError, match="3 classes but the teacher 5"):
        module(LossInputs(student_logits=s, labels=labels, teacher_logits=torch.randn(2, 5, 4, 4)))
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=-1.0)


# ------------------------------------------------------------------ CE


@pytest.mark.parametrize("stride", [4, 8])  # SegFormer-like 1/4 and dilated-ResNet 1/8 logits
def test_ce_unweighted_equals_cross_entropy_on_upsampled_logits(stride):
    logits = torch.randn(2, 5, 64 // stride, 64 // stride)
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :10] = 255
    up = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=True)
    ref = F.cross_entropy(up, labels, ignore_index=255)
    torch.testing.assert_close(ce_loss(logits, labels), ref)
    torch.testing.assert_close(ce_loss(logits, labels, torch.ones(2, 5, 64 // stride, 64 // stride)), ref)
    torch.testing.assert_close(ce_loss(logits, labels, torch.ones(2, 1, 1, 1)), ref)


@pytest.mark.parametrize("merge", list(WEIGHT_SHAPES))
def test_ce_weighted_matches_numpy_loop(merge):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 4, 3, 4, generator=g) * 2
    labels = torch.randint(0, 4, (2, 7, 9), generator=g)
    labels[0, 2:4, 3:7] = 255
    w = 1 + 2 * torch.rand(*WEIGHT_SHAPES[merge](2, 4, 3, 4), generator=g)
    expected = np_ce_loop(logits.numpy(), labels.numpy(), w.numpy())
    assert ce_loss(logits, labels, w).item() == pytest.approx(expected, rel=1e-5)
    # the reference itself reproduces the unweighted CE (checks the hand-written interpolation)
    unweighted = F.cross_entropy(F.interpolate(logits, (7, 9), mode="bilinear", align_corners=True), labels, ignore_index=255)
    assert np_ce_loop(logits.numpy(), labels.numpy(), None) == pytest.approx(unweighted.item(), rel=1e-5)


def test_ce_ignored_pixels_contribute_nothing():
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[1, :, :4] = 255
    w = 1 + torch.rand(2, 3, 8, 8)
    loss = ce_loss(logits, labels, w)
    loss.backward()
    # same-size labels: no interpolation, so ignored pixels get exactly zero gradient
    assert torch.all(logits.grad[1, :, :, :4] == 0)
    assert torch.any(logits.grad[1, :, :, 4:] != 0)
    # changing the logits / weights under ignored pixels does not change the loss
    logits2 = logits.detach().clone()
    logits2[1, :, :, :4] = 100 * torch.randn(3, 8, 4)
    w2 = w.clone()
    w2[1, :, :, :4] = 50.0
    torch.testing.assert_close(ce_loss(logits2, labels, w2), loss.detach())
    valid = labels != 255
    nll = -F.log_softmax(logits.detach(), 1).gather(1, labels.clamp(max=2).unsqueeze(1)).squeeze(1)
    wy = w.gather(1, labels.clamp(max=2).unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(loss.detach(), (nll * wy)[valid].sum() / valid.sum())


def test_ce_all_ignored_is_zero_with_gradient():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    labels = torch.full((2, 16, 16), 255, dtype=torch.long)
    loss = ce_loss(logits, labels, 1 + torch.rand(2, 1, 4, 4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_ce_gradient_does_not_reach_weights():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = (1 + torch.rand(2, 1, 4, 4)).requires_grad_(True)
    ce_loss(logits, torch.randint(0, 3, (2, 16, 16)), w).backward()
    assert w.grad is None and logits.grad is not None


def test_ce_label_errors():
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 16, 16))
    labels[0, 0, 0], labels[1, 1, 1], labels[0, 2, 2] = 7, 254, -1
    with pytest.raises(ValueError, match=r"values \[-1, 7, 254\] outside the 3 classes"):
        ce_loss(logits, labels)
    with pytest.raises(ValueError, match="integer"):
        ce_loss(logits, torch.zeros(2, 16, 16))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        ce_loss(logits, torch.zeros(2, 1, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="batch size"):
        ce_loss(logits, torch.zeros(3, 16, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="do not broadcast"):
        ce_loss(logits, torch.zeros(2, 16, 16, dtype=torch.long), torch.ones(2, 2, 4, 4))
    # a custom ignore index is honoured, 255 then counts as an invalid class
    ok = torch.zeros(2, 16, 16, dtype=torch.long)
    ok[0, 0, 0] = 9
    ce_loss(logits, ok, ignore_index=9)
    ok[0, 0, 1] = 255
    with pytest.raises(ValueError, match=r"\[255\]"):
        ce_loss(logits, ok, ignore_index=9)


def test_ce_module_aux_term_is_unweighted():
    logits, aux = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 16, 16))
    w = 1 + torch.rand(2, 1, 4, 4)
    out = CELoss()(LossInputs(student_logits=logits, labels=labels, student_aux_logits=aux, weights=FotfWeights(ce=w)))
    assert set(out) == {"ce", "aux_ce"}
    torch.testing.assert_close(out["ce"], ce_loss(logits, labels, w))
    torch.testing.assert_close(out["aux_ce"], 0.4 * ce_loss(aux, labels))
    assert not torch.allclose(out["ce"], ce_loss(logits, labels))
    out = CELoss(aux_weight=0.0)(LossInputs(student_logits=logits, labels=labels, weights=FotfWeights(kd=w)))
    assert set(out) == {"ce"}
    torch.testing.assert_close(out["ce"], ce_loss(logits, labels))
    with pytest.raises(ValueError, match="aux_weight"):
        CELoss(aux_weight=-0.1)
