"""FOTF core (eq. 6-7, merges, the per-step object) against independent references.

References are NumPy (`np.std`, loops over elements with `math.pow` / `math.exp`) and a tiny fake
`SegmentationStudent` (dropout + 1x1 classifier) whose samples we can redraw with the same seed.
Tests with the real models live at the end (they need `fotf_hf.models.create_model`).
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fotf_hf import _mc_kernel
from fotf_hf.losses.base import FotfWeights
from fotf_hf.losses.ce import ce_loss
from fotf_hf.losses.kd import kd_loss
from fotf_hf.uncertainty import (
    FOTF,
    MERGES,
    FotfResult,
    bernoulli_positions,
    dropout_keep_mask,
    mc_dropout_linear,
    mc_dropout_linear_std,
    mc_dropout_std,
    mc_dropout_logits,
    mc_dropout_probs,
    merge_sigma,
    predictive_std,
    uncertainty_weights,
)

MERGE_SHAPES = {"none": (2, 3, 4, 5), "pixel": (2, 1, 4, 5), "channel": (2, 3, 1, 1), "sample": (2, 1, 1, 1)}


class FakeStudent(nn.Module):
    """Implements the documented `SegmentationStudent` sampling API with dropout + 1x1 conv."""

    def __init__(self, in_channels=3, width=6, num_labels=4, mc_dropout_p=0.1, stride=4):
        super().__init__()
        self.trunk = nn.Conv2d(in_channels, width, stride, stride=stride)
        self.classifier = nn.Conv2d(width, num_labels, 1)
        self.mc_dropout_p = mc_dropout_p
        self.num_labels = num_labels
        self.calls = []

    def forward_features(self, pixel_values):
        return torch.relu(self.trunk(pixel_values))

    def sample_logits(self, head_input, num_samples, p=None, masks=None, generator=None):
        self.calls.append(("head", num_samples, p))
        p = self.mc_dropout_p if p is None else p
        x = head_input.unsqueeze(0).expand(num_samples, *head_input.shape)
        if masks is None:
            masks = torch.rand(x.shape, generator=generator) >= p
        y = (x * masks / (1 - p)).flatten(0, 1)
        return self.classifier(y).unflatten(0, (num_samples, head_input.shape[0]))

    def sample_logits_naive(self, pixel_values, num_samples, masks=None):
        self.calls.append(("naive", num_samples, None))
        return self.sample_logits(self.forward_features(pixel_values), num_samples, masks=masks)


def np_softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ------------------------------------------------------------------ eq. 6


@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("num_samples", [2, 5, 20])
def test_predictive_std_matches_numpy(num_samples, correction):
    probs = torch.softmax(torch.randn(num_samples, 2, 4, 3, 5) * 2, dim=2)
    expected = np.std(probs.numpy().astype(np.float64), axis=0, ddof=correction)
    sigma = predictive_std(probs, correction=correction)
    assert sigma.shape == (2, 4, 3, 5) and sigma.dtype == torch.float32
    np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-4, atol=1e-6)
    if correction == 1:
        torch.testing.assert_close(predictive_std(probs), torch.std(probs, dim=0), rtol=1e-4, atol=1e-6)


def test_predictive_std_loop_reference_and_edge_cases():
    probs = torch.softmax(torch.randn(5, 1, 3, 2, 2, dtype=torch.float64), dim=2)
    sigma = predictive_std(probs)
    assert sigma.dtype == torch.float64
    for c in range(3):
        for i in range(2):
            for j in range(2):
                xs = [probs[t, 0, c, i, j].item() for t in range(5)]
                mean = sum(xs) / 5
                ref = math.sqrt(sum((x - mean) ** 2 for x in xs) / 4)
                assert sigma[0, c, i, j].item() == pytest.approx(ref, rel=1e-12, abs=1e-15)
    # identical samples: exactly zero, also for values where mean-based formulas round
    same = torch.full((5, 2, 3, 4, 4), 1 / 3).expand(5, 2, 3, 4, 4).contiguous()
    same[:, :, 0] = 0.1
    assert torch.all(predictive_std(same) == 0)
    # maximal spread of a probability: half the samples 0, half 1
    half = torch.zeros(4, 1, 1, 1, 1)
    half[:2] = 1.0
    assert predictive_std(half).item() == pytest.approx(math.sqrt(4 / 12))
    # bf16 probabilities are upcast, result fp32
    assert predictive_std(probs.bfloat16()).dtype == torch.float32


def test_predictive_std_small_sigma_is_accurate():
    # sigma ~1e-6 around q ~ 0.9: a raw sum-of-squares formula in fp32 would lose it entirely
    base = torch.full((5, 1, 1, 1, 1), 0.9)
    noise = torch.tensor([0.0, 1e-6, -1e-6, 2e-6, -2e-6]).view(5, 1, 1, 1, 1)
    probs = base + noise
    expected = np.std(probs.numpy().astype(np.float64), axis=0, ddof=1)
    np.testing.assert_allclose(predictive_std(probs).numpy(), expected, rtol=0.1)


def test_predictive_std_errors():
    with pytest.raises(ValueError, match="correction"):
        predictive_std(torch.rand(1, 2, 3, 4, 4))
    with pytest.raises(ValueError, match="correction"):
        predictive_std(torch.rand(3, 2, 3, 4, 4), correction=3)
    with pytest.raises(ValueError, match="samples first"):
        predictive_std(torch.rand(3))


# ------------------------------------------------------------------ merge + eq. 7


def _loop_weights(sigma, m, kappa, weighting, merge):
    """Merge by explicit loops over the named dims, then apply f element by element."""
    B, C, H, W = sigma.shape
    keep_c = merge in ("none", "channel")
    keep_px = merge in ("none", "pixel")
    out = np.zeros((B, C if keep_c else 1, H if keep_px else 1, W if keep_px else 1))
    for b in range(B):
        for c in range(out.shape[1]):
            for i in range(out.shape[2]):
                for j in range(out.shape[3]):
                    vals = [
                        sigma[b, cc, ii, jj]
                        for cc in (range(C) if not keep_c else [c])
                        for ii in (range(H) if not keep_px else [i])
                        for jj in (range(W) if not keep_px else [j])
                    ]
                    s = sum(vals) / len(vals)
                    out[b, c, i, j] = math.pow(1 + m * s, kappa) if weighting == "power" else math.exp(kappa * m * s)
    return out


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("weighting", ["power", "exp"])
@pytest.mark.parametrize("m,kappa", [(1.0, 1.0), (3.0, 5.0), (10.0, 10.0)])
def test_uncertainty_weights_match_loop_reference(merge, weighting, m, kappa):
    sigma = torch.rand(2, 3, 4, 5) * 0.5
    w = uncertainty_weights(sigma, m=m, kappa=kappa, weighting=weighting, merge=merge)
    assert w.shape == MERGE_SHAPES[merge] and w.dtype == torch.float32 and not w.requires_grad
    np.testing.assert_allclose(w.numpy(), _loop_weights(sigma.numpy().astype(np.float64), m, kappa, weighting, merge), rtol=2e-5)
    # merge is taken before f: equals f of the merged sigma, and broadcasts to the logits
    torch.testing.assert_close(w, uncertainty_weights(merge_sigma(sigma, merge), m, kappa, weighting, "none"))
    assert torch.broadcast_shapes(w.shape, (2, 3, 4, 5)) == (2, 3, 4, 5)


def test_uncertainty_weights_detached_and_dtypes():
    sigma = (torch.rand(2, 3, 4, 4) * 0.3).requires_grad_(True)
    w = uncertainty_weights(sigma)
    assert not w.requires_grad
    assert uncertainty_weights(sigma.detach().bfloat16()).dtype == torch.float32
    assert uncertainty_weights(sigma.detach().double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert uncertainty_weights(sigma.detach()).dtype == torch.float32


sigmas = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
kappas = st.floats(min_value=0.01, max_value=10.0)
ms = st.floats(min_value=0.01, max_value=10.0)


@settings(max_examples=200, deadline=None)
@given(a=sigmas, b=sigmas, m=ms, kappa=kappas, weighting=st.sampled_from(["power", "exp"]))
def test_weights_properties(a, b, m, kappa, weighting):
    lo, hi = min(a, b), max(a, b)
    w = uncertainty_weights(torch.tensor([lo, hi, 0.0], dtype=torch.float32).view(1, 3, 1, 1), m, kappa, weighting)
    w = w.flatten().tolist()
    assert all(math.isfinite(x) and x >= 1.0 for x in w)
    assert w[2] == 1.0  # exactly 1 at sigma = 0
    assert w[0] <= w[1]  # monotone (ties only from float rounding or the finiteness cap)


@settings(max_examples=100, deadline=None)
@given(a=st.floats(0.0, 1.0), gap=st.floats(1e-4, 1.0), m=ms, kappa=kappas, weighting=st.sampled_from(["power", "exp"]))
def test_weights_strictly_increasing_in_float64(a, gap, m, kappa, weighting):
    w = uncertainty_weights(torch.tensor([a, a + gap], dtype=torch.float64).view(1, 2, 1, 1), m, kappa, weighting)
    assert w[0, 0].item() < w[0, 1].item()


def test_weights_for_realistic_extremes_are_exact():
    # the largest (m, kappa) of the paper's grid at the largest possible sigma of probabilities
    sigma = torch.tensor(math.sqrt(0.5)).view(1, 1, 1, 1)
    assert uncertainty_weights(sigma, 10, 10, "power").item() == pytest.approx((1 + 10 * math.sqrt(0.5)) ** 10, rel=1e-5)
    assert uncertainty_weights(sigma, 10, 10, "exp").item() == pytest.approx(math.exp(100 * math.sqrt(0.5)), rel=1e-5)


def test_weights_errors():
    sigma = torch.rand(1, 2, 3, 3)
    for kwargs, message in [
        ({"m": 0.0}, "m = 0.0 must be"),
        ({"m": -1.0}, "m = -1.0 must be"),
        ({"kappa": 0}, "kappa = 0 must be"),
        ({"kappa": float("nan")}, "kappa = nan must be"),
        ({"weighting": "linear"}, r"weighting = 'linear' is not one of \['power', 'exp'\]"),
        ({"merge": "logits"}, r"merge = 'logits' is not one of \['none', 'pixel', 'channel', 'sample'\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            uncertainty_weights(sigma, **kwargs)
    with pytest.raises(ValueError, match=r"\(B, C, h, w\)"):
        uncertainty_weights(torch.rand(2, 3, 4))


# ------------------------------------------------------------------ sampling with a fake student


def test_mc_dropout_probs_reproducible_fp32_no_grad():
    student = FakeStudent()
    head_input = student.forward_features(torch.randn(2, 3, 32, 32))
    probs = mc_dropout_probs(student, head_input, num_samples=4, generator=torch.Generator().manual_seed(3))
    assert probs.shape == (4, 2, 4, 8, 8) and probs.dtype == torch.float32 and not probs.requires_grad
    torch.testing.assert_close(probs.sum(2), torch.ones(4, 2, 8, 8))
    again = student.sample_logits(head_input, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(probs, torch.softmax(again.detach(), 2))
    assert not torch.allclose(probs[0], probs[1])  # the samples differ
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs_bf16 = mc_dropout_probs(student, head_input, num_samples=3)
    assert probs_bf16.dtype == torch.float32
    # p is passed through to the model
    mc_dropout_logits(student, head_input, num_samples=2, p=0.3)
    assert student.calls[-1] == ("head", 2, 0.3)


def test_mc_dropout_naive_mode_and_errors():
    student = FakeStudent()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    naive = mc_dropout_probs(student, x, num_samples=3, mode="naive")
    assert [c[0] for c in student.calls] == ["naive", "head"]
    torch.manual_seed(5)
    ref = torch.softmax(student.sample_logits(student.forward_features(x), 3).detach(), 2)
    torch.testing.assert_close(naive, ref)
    with pytest.raises(ValueError, match="naive.*own dropout"):
        mc_dropout_probs(student, x, num_samples=3, p=0.3, mode="naive")
    mc_dropout_probs(student, x, num_samples=3, p=0.1, mode="naive")  # equal to the model's own: fine
    with pytest.raises(ValueError, match="generator"):
        mc_dropout_probs(student, x, num_samples=3, mode="naive", generator=torch.Generator())
    with pytest.raises(ValueError, match=r"mode = 'full' is not one of \['head', 'naive'\]"):
        mc_dropout_probs(student, x, mode="full")
    with pytest.raises(ValueError, match="num_samples = 1 must be an integer >= 2"):
        mc_dropout_probs(student, x, num_samples=1)
    with pytest.raises(ValueError, match="no active dropout site"):
        mc_dropout_probs(FakeStudent(mc_dropout_p=0.0), x)
    with pytest.raises(ValueError, match="no Monte-Carlo dropout site"):
        mc_dropout_probs(nn.Conv2d(3, 3, 1), x)


# ------------------------------------------------------------------ the FOTF object


def _fotf_inputs(seed=0, stride=4):
    torch.manual_seed(seed)
    student = FakeStudent(stride=stride)
    pixel_values = torch.randn(2, 3, 32, 32)
    return student, pixel_values, student.forward_features(pixel_values).detach()


@pytest.mark.parametrize("merge_kd", MERGES)
@pytest.mark.parametrize("merge_ce", ["pixel", "sample"])
@pytest.mark.parametrize("weighting", ["power", "exp"])
def test_fotf_weights_equal_reference_pipeline(merge_kd, merge_ce, weighting):
    student, _, head_input = _fotf_inputs()
    fotf = FOTF(num_samples=5, p=0.2, m=3.0, kappa=5.0, weighting=weighting, merge_kd=merge_kd, merge_ce=merge_ce)
    torch.manual_seed(11)
    result = fotf(student, head_input)
    assert isinstance(result, FotfResult) and isinstance(result.weights, FotfWeights)
    # redraw the same samples and compute eq. 6-7 in NumPy
    torch.manual_seed(11)
    logits = student.sample_logits(head_input, 5, p=0.2).detach().numpy().astype(np.float64)
    sigma = np.std(np_softmax(logits, 2), axis=0, ddof=1)
    np.testing.assert_allclose(result.sigma.numpy(), sigma, rtol=1e-4, atol=1e-6)
    for merge, w in ((merge_kd, result.weights.kd), (merge_ce, result.weights.ce)):
        expected = _loop_weights(sigma, 3.0, 5.0, weighting, merge)
        assert w.shape == {"none": (2, 4, 8, 8), "pixel": (2, 1, 8, 8), "channel": (2, 4, 1, 1), "sample": (2, 1, 1, 1)}[merge]
        assert not w.requires_grad
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-4)
    assert set(result.stats) == {"sigma_mean", "sigma_max", "weight_kd_mean", "weight_kd_max", "weight_ce_mean", "weight_ce_max"}
    assert float(result.stats["sigma_mean"]) == pytest.approx(sigma.mean(), rel=1e-4)
    assert float(result.stats["sigma_max"]) == pytest.approx(sigma.max(), rel=1e-4)
    assert float(result.stats["weight_kd_mean"]) == pytest.approx(_loop_weights(sigma, 3.0, 5.0, weighting, merge_kd).mean(), rel=1e-4)
    assert float(result.stats["weight_ce_max"]) == pytest.approx(_loop_weights(sigma, 3.0, 5.0, weighting, merge_ce).max(), rel=1e-4)


@pytest.mark.parametrize("apply_to,has_kd,has_ce", [("kd", True, False), ("ce", False, True), ("both", True, True)])
def test_fotf_apply_to(apply_to, has_kd, has_ce):
    student, _, head_input = _fotf_inputs()
    result = FOTF(apply_to=apply_to)(student, head_input)
    assert (result.weights.kd is not None) == has_kd and (result.weights.ce is not None) == has_ce
    assert ("weight_kd_mean" in result.stats) == has_kd and ("weight_ce_mean" in result.stats) == has_ce
    if has_kd:
        assert result.weights.kd.shape == (2, 4, 1, 1)  # default KD merge: channel
    if has_ce:
        assert result.weights.ce.shape == (2, 1, 8, 8)  # default CE merge: pixel


def test_fotf_no_uncertainty_recovers_plain_losses():
    student, _, head_input = _fotf_inputs()
    with torch.no_grad():
        student.classifier.weight.zero_()  # logits no longer depend on the dropped features
    result = FOTF(merge_kd="none", merge_ce="none", kappa=10, m=10)(student, head_input)
    assert torch.all(result.sigma == 0) and torch.all(result.weights.kd == 1) and torch.all(result.weights.ce == 1)
    s, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    labels = torch.randint(0, 4, (2, 32, 32))
    assert kd_loss(s, t, result.weights.kd).item() == kd_loss(s, t).item()
    assert ce_loss(s, labels, result.weights.ce).item() == ce_loss(s, labels).item()


def test_fotf_weighted_losses_exceed_plain_and_keep_gradients_on_student_only():
    student, pixel_values, _ = _fotf_inputs()
    head_input = student.forward_features(pixel_values)  # attached: FOTF must not backprop into it
    logits = student.classifier(head_input)
    result = FOTF(apply_to="both", kappa=5)(student, head_input)
    assert not result.weights.kd.requires_grad and not result.weights.ce.requires_grad
    teacher_logits = torch.randn_like(logits)
    labels = torch.randint(0, 4, (2, 32, 32))
    kd_w, kd_plain = kd_loss(logits, teacher_logits, result.weights.kd), kd_loss(logits, teacher_logits)
    ce_w, ce_plain = ce_loss(logits, labels, result.weights.ce), ce_loss(logits, labels)
    assert kd_w.item() > kd_plain.item() and ce_w.item() > ce_plain.item()  # weights >= 1, some > 1
    (kd_w + ce_w).backward()
    assert student.classifier.weight.grad is not None and student.trunk.weight.grad is not None


def test_fotf_naive_mode_uses_pixel_values():
    student, pixel_values, head_input = _fotf_inputs()
    fotf = FOTF(mode="naive", p=None)
    torch.manual_seed(4)
    result = fotf(student, head_input, pixel_values=pixel_values)
    assert student.calls[-2][0] == "naive"
    torch.manual_seed(4)
    ref = predictive_std(torch.softmax(student.sample_logits_naive(pixel_values, 5).detach(), 2))
    torch.testing.assert_close(result.sigma, ref)
    with pytest.raises(ValueError, match="needs pixel_values"):
        fotf(student, head_input)
    with pytest.raises(ValueError, match="naive.*own dropout"):
        FOTF(mode="naive", p=0.3)(student, head_input, pixel_values=pixel_values)


def test_fotf_teacher_source():
    student, pixel_values, head_input = _fotf_inputs()
    torch.manual_seed(1)
    teacher = FakeStudent(width=8, stride=2)  # finer teacher logits (16x16) than the student's (8x8)
    teacher_head_input = teacher.forward_features(pixel_values).detach()
    fotf = FOTF(source="teacher", merge_kd="none")
    torch.manual_seed(7)
    result = fotf(student, head_input, teacher=teacher, teacher_head_input=teacher_head_input)
    assert teacher.calls and not student.calls
    torch.manual_seed(7)
    t_sigma = predictive_std(torch.softmax(teacher.sample_logits(teacher_head_input, 5, p=0.1).detach(), 2))
    expected = F.interpolate(t_sigma, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(result.sigma, expected)
    assert result.weights.kd.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="needs the teacher"):
        fotf(student, head_input)
    with pytest.raises(ValueError, match="needs teacher_head_input"):
        fotf(student, head_input, teacher=teacher)
    with pytest.raises(ValueError, match="4 classes but the teacher 5"):
        fotf(student, head_input, teacher=FakeStudent(num_labels=5), teacher_head_input=teacher_head_input)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_samples": 1}, "num_samples = 1 must be an integer >= 2"),
        ({"num_samples": 2.5}, "num_samples = 2.5"),
        ({"p": 0.0}, r"p = 0.0 must be in the open interval \(0, 1\)"),
        ({"p": 1.0}, r"p = 1.0 must be in the open interval"),
        ({"kappa": 0.0}, "kappa = 0.0 must be"),
        ({"m": -3}, "m = -3 must be"),
        ({"weighting": "sigmoid"}, r"weighting = 'sigmoid' is not one of \['power', 'exp'\]"),
        ({"merge_kd": "logits"}, r"merge_kd = 'logits' is not one of \['none', 'pixel', 'channel', 'sample'\]"),
        ({"merge_ce": "image"}, r"merge_ce = 'image' is not one of"),
        ({"apply_to": "all"}, r"apply_to = 'all' is not one of \['kd', 'ce', 'both'\]"),
        ({"mode": "full"}, r"mode = 'full' is not one of \['head', 'naive'\]"),
        ({"source": "both"}, r"source = 'both' is not one of \['student', 'teacher'\]"),
    ],
)
def test_fotf_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FOTF(**kwargs)


def test_fotf_model_without_dropout_site():
    student, _, head_input = _fotf_inputs()
    student.mc_dropout_p = 0.0
    with pytest.raises(ValueError, match="no active dropout site"):
        FOTF(p=None)(student, head_input)
    FOTF(p=0.1)(student, head_input)  # an explicit p re-enables the head site
    with pytest.raises(ValueError, match="no Monte-Carlo dropout site"):
        FOTF()(nn.Identity(), head_input)


# ------------------------------------------------------------------ fast masks


@pytest.mark.parametrize("p", [0.1, 0.5, 0.03])
def test_dropout_keep_mask_is_iid_bernoulli(p):
    g = torch.Generator().manual_seed(0)
    mask = dropout_keep_mask((8, 50, 250), p, generator=g)
    assert mask.dtype == torch.bool and mask.shape == (8, 50, 250)
    n = mask.numel()
    keep = mask.double().mean().item()
    assert abs(keep - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5-sigma binomial bound
    # neighbours (same 64-bit word and across words) are uncorrelated
    flat = mask.flatten().double()
    for lag in (1, 2, 3, 4, 5):
        corr = np.corrcoef(flat[:-lag].numpy(), flat[lag:].numpy())[0, 1]
        assert abs(corr) < 5 / math.sqrt(n)
    # reproducible with a generator, different draws otherwise
    again = dropout_keep_mask((8, 50, 250), p, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    assert not torch.equal(mask, dropout_keep_mask((8, 50, 250), p, generator=g))


def test_dropout_keep_mask_edges_and_errors():
    assert dropout_keep_mask((3, 7), 0.0).all()
    assert dropout_keep_mask((0, 5), 0.1).shape == (0, 5)
    assert dropout_keep_mask((1, 1, 1), 0.999).shape == (1, 1, 1)
    with pytest.raises(ValueError, match="must be in"):
        dropout_keep_mask((2, 2), 1.0)
    with pytest.raises(ValueError, match="must be in"):
        dropout_keep_mask((2, 2), -0.1)


# ------------------------------------------------------------------ fast head sampling


@pytest.mark.parametrize("p", [0.1, 0.5, 0.02])
def test_bernoulli_positions_is_a_bernoulli_process(p):
    n = 400_000
    pos = bernoulli_positions(n, p, generator=torch.Generator().manual_seed(1)).long()
    assert pos.numel() == 0 or (pos.min() >= 0 and pos.max() < n)
    assert torch.all(pos[1:] > pos[:-1])  # sorted, no duplicates
    k = pos.numel()
    assert abs(k - n * p) < 5 * math.sqrt(n * p * (1 - p))
    # gaps between successes are Geometric(p): P(gap = g) = (1 - p)^(g - 1) p
    gaps = torch.diff(pos).numpy()
    for g in (1, 2, 3):
        expected = (1 - p) ** (g - 1) * p
        observed = (gaps == g).mean()
        assert abs(observed - expected) < 5 * math.sqrt(expected * (1 - expected) / len(gaps))
    # counts per block of 256 trials: Binomial(256, p) mean and variance
    counts = torch.bincount(pos // 256, minlength=n // 256)[: n // 256].double()
    assert counts.mean().item() == pytest.approx(256 * p, rel=0.02)
    assert counts.var().item() == pytest.approx(256 * p * (1 - p), rel=0.1)


def test_bernoulli_positions_small_and_extension():
    g = torch.Generator().manual_seed(0)
    for n in (1, 5, 37):
        pos = bernoulli_positions(n, 0.3, generator=g)
        assert pos.numel() <= n and (pos.numel() == 0 or pos.max() < n)
    # tiny p: the first batch of gaps often falls short and must be extended; never past the end
    hits = sum(bernoulli_positions(1000, 0.001, generator=g).numel() for _ in range(300))
    assert abs(hits - 300) < 5 * math.sqrt(300)
    with pytest.raises(ValueError, match="must be in"):
        bernoulli_positions(10, 0.0)


def _dense_reference(x, weight, bias, keep, p):
    """classifier(x * mask / (1 - p)) written as a float64 conv per sample."""
    out = []
    for t in range(keep.shape[0]):
        out.append(F.conv2d(x.double() * keep[t].double() / (1 - p), weight.double(), bias.double()))
    return torch.stack(out)


def _replay_sparse_keep(T, shape, p, seed):
    """The sparse path's keep-masks `(T, B, D, h, w)`: one `bernoulli_positions` call per sample, in
    order, on one generator, over pixel-major `(B, h, w, D)`."""
    B, D, h, w = shape
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(T, B * h * w * D, dtype=torch.bool)
    for t in range(T):
        keep[t, bernoulli_positions(B * h * w * D, p, generator=g).long()] = False
    return keep.view(T, B, h, w, D).permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("D", [16, 12])  # power of two (bit mask) and not (remainder)
def test_mc_dropout_linear_sparse_equals_dense_for_the_same_drops(D):
    x = torch.relu(torch.randn(2, D, 5, 7))
    conv = nn.Conv2d(D, 3, 1)
    T, p = 4, 0.2
    sparse = mc_dropout_linear(x, conv.weight, conv.bias, T, p, generator=torch.Generator().manual_seed(9), method="sparse")
    keep = _replay_sparse_keep(T, (2, D, 5, 7), p, seed=9)
    expected = _dense_reference(x, conv.weight, conv.bias, keep, p)
    assert sparse.shape == (T, 2, 3, 5, 7) and sparse.dtype == torch.float32
    torch.testing.assert_close(sparse.double(), expected, rtol=1e-5, atol=1e-5)
    dense = mc_dropout_linear(x, conv.weight, conv.bias, T, p, masks=keep)
    torch.testing.assert_close(dense.double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sparse[0], sparse[1])


@pytest.mark.parametrize("method", [
    "sparse", "dense",
    pytest.param("fused", marks=pytest.mark.skipif(not _mc_kernel.available(), reason="fused kernel unavailable")),
])
def test_mc_dropout_linear_moments_match_dropout_theory(method):
    # Per pixel and class, logit = b + sum_d W_d x_d m_d / (1 - p), m_d ~ Bernoulli(1 - p) i.i.d.:
    # mean = b + W x and variance = p / (1 - p) * sum_d W_d^2 x_d^2.
    torch.manual_seed(0)
    D, p, T = 8, 0.3, 4000
    x = torch.rand(1, D, 2, 2) + 0.5
    conv = nn.Conv2d(D, 2, 1)
    z = mc_dropout_linear(x, conv.weight, conv.bias, T, p, generator=torch.Generator().manual_seed(2), method=method)
    W = conv.weight.detach().view(2, D)
    mean = (torch.einsum("cd,bdhw->bchw", W, x) + conv.bias.detach().view(1, 2, 1, 1))[0]
    var = (p / (1 - p)) * torch.einsum("cd,bdhw->bchw", W**2, x**2)[0]
    se = (var / T).sqrt()
    assert torch.all((z.mean(0)[0] - mean).abs() < 5 * se)
    torch.testing.assert_close(z.var(0)[0], var, rtol=0.12, atol=1e-6)


def test_mc_dropout_linear_errors_and_autocast():
    x = torch.randn(1, 4, 3, 3)
    w = torch.randn(2, 4, 1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mc_dropout_linear(x.bfloat16(), w, None, 2, 0.1).dtype == torch.float32
    with pytest.raises(ValueError, match=r"method = 'fast' is not one of \['auto', 'fused', 'sparse', 'dense'\]"):
        mc_dropout_linear(x, w, method="fast")
    with pytest.raises(ValueError, match="does not take 4 input channels"):
        mc_dropout_linear(x, torch.randn(2, 5, 1, 1))
    with pytest.raises(ValueError, match=r"masks must be \(T, B, D, h, w\)"):
        mc_dropout_linear(x, w, num_samples=2, masks=torch.ones(3, 1, 4, 3, 3))
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        mc_dropout_linear(x, w, p=0.0)


@pytest.mark.parametrize("correction", [0, 1])
@pytest.mark.parametrize("D", [16, 12])
def test_mc_dropout_linear_std_streams_the_same_draws(D, correction):
    # Independent expectation: replay the sparse draws as keep-masks, float64 conv per sample,
    # NumPy softmax over classes and np.std over samples.
    x = torch.relu(torch.randn(2, D, 5, 7))
    conv = nn.Conv2d(D, 3, 1)
    T, p = 6, 0.2
    sigma = mc_dropout_linear_std(x, conv.weight, conv.bias, T, p, generator=torch.Generator().manual_seed(9),
                                  method="sparse", correction=correction)
    keep = _replay_sparse_keep(T, (2, D, 5, 7), p, seed=9)
    logits = _dense_reference(x, conv.weight, conv.bias, keep, p).detach().numpy()
    expected = np.std(np_softmax(logits, 2), axis=0, ddof=correction)
    assert sigma.shape == (2, 3, 5, 7) and sigma.dtype == torch.float32 and sigma.is_contiguous()
    np.testing.assert_allclose(sigma.numpy(), expected, rtol=1e-4, atol=1e-6)
    assert expected.min() > 0  # every pixel/class actually varied, so the comparison means something


def test_mc_dropout_linear_std_dense_path_and_errors():
    x = torch.relu(torch.randn(1, 8, 3, 4))
    conv = nn.Conv2d(8, 5, 1)
    sigma = mc_dropout_linear_std(x, conv.weight, conv.bias, 4, 0.3, generator=torch.Generator().manual_seed(2), method="dense")
    probs = torch.softmax(mc_dropout_linear(x, conv.weight, conv.bias, 4, 0.3, generator=torch.Generator().manual_seed(2), method="dense"), 2)
    np.testing.assert_allclose(sigma.numpy(), np.std(probs.double().numpy(), axis=0, ddof=1), rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert mc_dropout_linear_std(x.bfloat16(), conv.weight, None, 3, 0.1).dtype == torch.float32
    with pytest.raises(ValueError, match="num_samples = 1 must be an integer >= 2"):
        mc_dropout_linear_std(x, conv.weight, num_samples=1)
    with pytest.raises(ValueError, match=r"correction = 3 needs to be an integer in \[0, T\) with T = 3"):
        mc_dropout_linear_std(x, conv.weight, num_samples=3, correction=3)
    with pytest.raises(ValueError, match=r"method = 'fast' is not one of"):
        mc_dropout_linear_std(x, conv.weight, method="fast")
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        mc_dropout_linear_std(x, conv.weight, p=1.0)


def test_mc_dropout_std_uses_the_models_streaming_std_in_head_mode():
    student, pixel_values, head_input = _fotf_inputs()
    calls = []

    def sample_std(features, num_samples, p=None, generator=None):
        calls.append((num_samples, p))
        return torch.full((2, 4, 8, 8), 0.25)

    student.sample_std = sample_std
    assert torch.equal(mc_dropout_std(student, head_input, 3, p=0.2), torch.full((2, 4, 8, 8), 0.25))
    assert calls == [(3, 0.2)] and student.calls == []
    sigma = FOTF(num_samples=3, p=0.2)(student, head_input).sigma
    assert torch.equal(sigma, torch.full((2, 4, 8, 8), 0.25)) and len(calls) == 2
    # naive mode and models without sample_std: std of the stored samples
    torch.manual_seed(3)
    naive = mc_dropout_std(student, pixel_values, 3, mode="naive")
    torch.manual_seed(3)
    torch.testing.assert_close(naive, predictive_std(mc_dropout_probs(student, pixel_values, 3, mode="naive")))
    with pytest.raises(ValueError, match="num_samples = 1"):
        mc_dropout_std(student, head_input, 1)


@pytest.mark.parametrize("p", [0.9, 0.5, 0.25, 0.1, 1e-3])
def test_geometric_table_is_the_rounded_inverse_cdf(p):
    from fotf_hf.uncertainty import _geometric_table

    table = _geometric_table(p, torch.device("cpu"))
    assert table.shape == (2**16,) and table.dtype == torch.int32
    assert int(table.min()) == 1  # no zero gaps: no duplicate drops
    # Every 16-bit index is equally likely, so P(gap > j) is the fraction of entries above j;
    # it must be (1 - p)^j rounded (half up) to a multiple of 2^-16.
    counts = np.bincount(table.numpy(), minlength=int(table.max()) + 2)
    above = 2**16 - np.cumsum(counts)  # above[j] = #entries > j
    for j in range(1, int(table.max()) + 1):
        assert above[j] == math.floor(2**16 * (1 - p) ** j + 0.5), j  # half up: u_k <= q counts k = 0 at q = 2^-17
    assert above[int(table.max())] == 0


def test_bernoulli_positions_dtype_and_extension_rounds():
    g = torch.Generator().manual_seed(3)
    assert bernoulli_positions(1000, 0.2, generator=g).dtype == torch.int32
    # p so small that the first round of gaps often ends short of numel: the extra rounds
    # must keep the dtype and the sorted, in-range positions
    for _ in range(50):
        pos = bernoulli_positions(5000, 0.0005, generator=g)
        assert pos.dtype == torch.int32
        assert pos.numel() == 0 or (int(pos.max()) < 5000 and bool(torch.all(pos[1:] > pos[:-1])))


def test_sparse_path_gives_embedding_bag_matching_index_dtypes(monkeypatch):
    # embedding_bag promotes mixed int32/int64 indices and offsets to int64, i.e. copies every
    # sample's ~p*B*h*w*D indices; the sparse path must hand it one dtype (int32 at these sizes).
    seen = []
    real = F.embedding_bag

    def spy(input, weight, offsets=None, *args, **kwargs):
        seen.append((input.dtype, offsets.dtype))
        return real(input, weight, offsets, *args, **kwargs)

    monkeypatch.setattr(F, "embedding_bag", spy)
    x = torch.relu(torch.randn(2, 16, 5, 7))
    conv = nn.Conv2d(16, 3, 1)
    mc_dropout_linear_std(x, conv.weight, conv.bias, 3, 0.2, method="sparse")
    assert seen == [(torch.int32, torch.int32)] * 3


@pytest.mark.parametrize("mode,source,first", [("naive", "student", "fotf"), ("head", "student", "forward"),
                                               ("naive", "teacher", "forward")])
def test_distillation_module_runs_naive_student_sampling_before_the_forward(mode, source, first):
    # Naive student passes need only the pixels: run before the graph exists, their transient
    # activations do not stack on the forward's saved ones. Everything else needs head features.
    from fotf_hf.models.outputs import SegmentationModelOutput
    from fotf_hf.training import DistillationModule

    order = []

    class Student(FakeStudent):
        def forward(self, pixel_values):
            order.append("forward")
            head_input = self.forward_features(pixel_values)
            return SegmentationModelOutput(logits=self.classifier(head_input), head_input=head_input)

    class Recording(FOTF):
        def forward(self, *args, **kwargs):
            order.append("fotf")
            return super().forward(*args, **kwargs)

    class Criterion(nn.Module):
        def forward(self, inputs):
            assert inputs.weights.kd.shape == (2, 4, 1, 1)  # channel merge at the logits' resolution
            return {"kd": (inputs.student_logits * inputs.weights.kd).mean()}

    student, teacher = Student(), Student()
    module = DistillationModule(student, Criterion(), Recording(num_samples=3, mode=mode, source=source, apply_to="kd",
                                                                merge_kd="channel"))
    x = torch.randn(2, 3, 16, 20)
    t_out = teacher(x)
    order.clear()
    out = module(x, labels=torch.zeros(2, 16, 20, dtype=torch.long), teacher_out=t_out, teacher=teacher)
    assert order[0] == first and sorted(order) == ["forward", "fotf"], order
    out.terms["kd"].backward()
    assert student.classifier.weight.grad is not None
