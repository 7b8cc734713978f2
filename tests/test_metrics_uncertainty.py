"""NLL, Brier, AUROC and AURC of `SegmentationMetrics` against independent references.

References: hand-computed cases, SciPy softmax + NumPy per-pixel formulas, torch's
`cross_entropy`, `sklearn.metrics.roc_auc_score` and torchmetrics' `BinaryAUROC` (both count
tied scores as 1/2), a sort-and-cumsum NumPy risk-coverage curve, and an exhaustive enumeration
of the orders of tied pixels (what "AURC of the binned score" means).
"""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import softmax
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import BinaryAUROC

from fotf_hf.metrics import ACCUMULATORS, SegmentationMetrics, metrics_from_accumulators

IGNORE = 255
UNCERTAINTY_KEYS = ("nll", "brier", "auroc_msp", "aurc_msp", "auroc_sigma", "aurc_sigma")


def _batch(b=2, c=5, h=16, w=20, gen=None, flip=0.3, ignore_frac=0.2):
    """Labels, and logits that favour the label except on a `flip` fraction of pixels (so that
    confidence carries information about errors and AUROC is far from 0.5)."""
    labels = torch.randint(0, c, (b, h, w), generator=gen)
    target = labels.clone()
    noisy = torch.rand(b, h, w, generator=gen) < flip
    target[noisy] = torch.randint(0, c, (int(noisy.sum()),), generator=gen)
    logits = F.one_hot(target, c).permute(0, 3, 1, 2).float() * 2.0 + torch.randn(b, c, h, w, generator=gen) * 1.5
    labels[torch.rand(b, h, w, generator=gen) < ignore_frac] = IGNORE
    return logits, labels


def _pixels(probs, labels):
    """Per labelled pixel (NumPy, float64): probabilities (N, C), label, prediction, confidence."""
    p = np.moveaxis(np.asarray(probs, dtype=np.float64), 1, -1).reshape(-1, probs.shape[1])
    y = np.asarray(labels).reshape(-1)
    keep = y != IGNORE
    p, y = p[keep], y[keep]
    return p, y, p.argmax(1), p.max(1)


def _aurc_sorted(confidence, wrong):
    """Risk-coverage curve the direct way: most confident first, risk of the k retained, mean over k."""
    order = np.argsort(-np.asarray(confidence), kind="stable")
    risk = np.cumsum(np.asarray(wrong, dtype=np.float64)[order]) / np.arange(1, len(order) + 1)
    return float(risk.mean())


def _bin(score, k, high=1.0):
    return np.clip(np.floor(np.asarray(score, dtype=np.float64) * (k / high)), 0, k - 1)


def _tie_bounds(bins, wrong):
    """The module docstring's bounds on |binned - unbinned| for AUROC and AURC, from per-pixel bins."""
    k = int(bins.max()) + 1
    w = np.bincount(bins.astype(int), weights=wrong.astype(float), minlength=k)
    n = np.bincount(bins.astype(int), minlength=k).astype(float)
    c = n - w
    big_w, big_c, total = w.sum(), c.sum(), n.sum()
    before = np.cumsum(n) - n
    harmonic = np.array([sum(1.0 / j for j in range(int(m) + 1, int(m + nb) + 1)) for m, nb in zip(before, n)])
    return (w * c).sum() / (2 * big_w * big_c), (np.minimum(w, c) * harmonic).sum() / total


def _stream(batches, **kwargs):
    m = SegmentationMetrics(num_classes=kwargs.pop("num_classes", 5), **kwargs)
    for batch in batches:
        m.update(*batch[:2], **(batch[2] if len(batch) > 2 else {}))
    return m


# --------------------------------------------------------------------------- hand-computed


def test_hand_example_nll_brier_auroc_aurc():
    # Two classes, probabilities [p, 1 - p] with p >= 1/2, so prediction 0 and confidence p.
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    probs = torch.stack([conf, 1 - conf]).view(1, 2, 1, 5)
    labels = torch.tensor([[[0, 1, 0, 1, IGNORE]]])  # correct, wrong, correct, wrong, ignored
    m = SegmentationMetrics(num_classes=2)
    m.update(probs, labels, is_probs=True)
    out = m.compute()
    # NLL: -log .9, -log .2, -log .7, -log .4 ; Brier = 2 (1 - p_y)^2 with two classes.
    assert out["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.2) + math.log(0.7) + math.log(0.4)) / 4, rel=1e-6)
    assert out["brier"] == pytest.approx(2 * (0.1**2 + 0.8**2 + 0.3**2 + 0.6**2) / 4, rel=1e-6)
    # Errors at u = .2 and .4, correct at u = .1 and .3: the pairs (.2 > .1), (.4 > .1), (.4 > .3) -> 3/4.
    assert out["auroc_msp"] == pytest.approx(0.75, abs=1e-12)
    # Most confident first: c w c w -> risks 0, 1/2, 1/3, 2/4.
    assert out["aurc_msp"] == pytest.approx((0 + 1 / 2 + 1 / 3 + 2 / 4) / 4, abs=1e-12)
    assert out["auroc_sigma"] is None and out["aurc_sigma"] is None
    assert out["num_pixels"] == 4 and sum(m.msp_hist.sum(0).tolist()) == 4


def test_all_tied_pixels_give_chance_auroc_and_error_rate_aurc():
    # Every pixel has the same confidence: AUROC 1/2; in a random order every prefix has, on
    # average, the overall error rate, so the expected AURC is that rate (3 errors of 8).
    probs = torch.tensor([0.75, 0.25]).view(1, 2, 1, 1).expand(1, 2, 2, 4).contiguous()
    labels = torch.tensor([[[0, 0, 1, 0], [1, 0, 1, 0]]])
    m = SegmentationMetrics(num_classes=2)
    m.update(probs, labels, is_probs=True)
    out = m.compute()
    assert out["auroc_msp"] == pytest.approx(0.5, abs=1e-12)
    assert out["aurc_msp"] == pytest.approx(3 / 8, abs=1e-12)


def test_aurc_of_binned_score_is_the_mean_over_orders_of_tied_pixels():
    # 9 pixels in 4 bins of a coarse histogram (K = 4): average the sorted-curve AURC over every
    # order of the pixels inside each bin (2! 3! 1! 3! = 72 orders). Sigma values: bin = floor(4 u / .5).
    sigma = np.array([0.01, 0.05, 0.2, 0.15, 0.24, 0.3, 0.45, 0.4, 0.49])
    wrong = np.array([0, 1, 1, 0, 0, 1, 1, 0, 1])
    bins = _bin(sigma, 4, 0.5)
    groups = [np.flatnonzero(bins == b) for b in range(4)]
    values = []
    for orders in itertools.product(*[itertools.permutations(g) for g in groups]):
        ranked = wrong[np.concatenate([np.array(o, dtype=int) for o in orders])]
        values.append(_aurc_sorted(-np.arange(len(ranked)), ranked))
    labels = torch.zeros(1, 1, 9, dtype=torch.long)
    labels[0, 0] = torch.from_numpy(wrong)  # prediction is class 0 everywhere: label 1 = error
    probs = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1).expand(1, 2, 1, 9).contiguous()
    m = SegmentationMetrics(num_classes=2, uncertainty_bins=4)
    m.update(probs, labels, is_probs=True, uncertainty=torch.tensor(sigma, dtype=torch.float32).view(1, 1, 9))
    out = m.compute()
    assert len(values) == 72
    assert out["aurc_sigma"] == pytest.approx(np.mean(values), abs=1e-12)
    assert out["auroc_sigma"] == pytest.approx(roc_auc_score(wrong, bins), abs=1e-12)


# --------------------------------------------------------------------------- NLL / Brier


@pytest.mark.parametrize("num_classes", [2, 7, 19])
def test_nll_and_brier_match_numpy_and_torch_cross_entropy(num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    batches = [_batch(c=num_classes, gen=gen) for _ in range(3)]
    out = _stream(batches, num_classes=num_classes).compute()
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    p, y, _, _ = _pixels(softmax(logits.double().numpy(), axis=1), labels.numpy())
    onehot = np.eye(num_classes)[y]
    assert out["nll"] == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-6)
    assert out["nll"] == pytest.approx(float(F.cross_entropy(logits.double(), labels, ignore_index=IGNORE)), rel=1e-6)
    assert out["brier"] == pytest.approx(((p - onehot) ** 2).sum(1).mean(), rel=1e-6)
    # Probabilities in: the same numbers.
    probs_out = _stream([(torch.softmax(lg, 1), lb, {"is_probs": True}) for lg, lb in batches],
                        num_classes=num_classes).compute()
    assert probs_out["nll"] == pytest.approx(out["nll"], rel=1e-6)
    assert probs_out["brier"] == pytest.approx(out["brier"], rel=1e-6)


def test_confident_pixels_keep_relative_precision():
    # Logit margins 10..16: 1 - p_y ~ 1e-5..1e-7, below fp32's resolution around 1. The NLL and
    # Brier of these pixels must still match the float64 reference to ~1e-6 relative.
    gen = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 5, (1, 8, 8), generator=gen)
    margin = 10 + 6 * torch.rand(1, 1, 8, 8, generator=gen)
    logits = F.one_hot(labels, 5).permute(0, 3, 1, 2).float() * margin + torch.rand(1, 5, 8, 8, generator=gen)
    out = _stream([(logits, labels)]).compute()
    p, y, _, _ = _pixels(softmax(logits.double().numpy(), axis=1), labels.numpy())
    assert out["nll"] == pytest.approx(-np.log(p[np.arange(len(y)), y]).mean(), rel=1e-5)
    assert out["brier"] == pytest.approx(((p - np.eye(5)[y]) ** 2).sum(1).mean(), rel=1e-5)
    assert 0 < out["brier"] < 1e-8


def test_zero_probability_of_the_label_is_clamped():
    probs = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    m = SegmentationMetrics(num_classes=2)
    m.update(probs, torch.ones(1, 1, 1, dtype=torch.long), is_probs=True)
    out = m.compute()
    assert out["nll"] == pytest.approx(-math.log(torch.finfo(torch.float32).tiny), rel=1e-6)  # 87.3 nats
    assert out["brier"] == pytest.approx(2.0)


# --------------------------------------------------------------------------- AUROC / AURC


def test_auroc_msp_is_exact_on_the_binned_score_and_close_to_the_unbinned_one():
    # Probabilities in, so the reference sees bit-identical confidences (float32 max probability).
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.softmax(lg, 1), lb, {"is_probs": True}) for lg, lb in (_batch(c=6, gen=gen) for _ in range(3))]
    probs, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    conf, pred = probs.max(1)
    valid = labels != IGNORE
    conf = conf[valid].double().numpy()
    wrong = (pred != labels)[valid].numpy().astype(int)
    u = 1 - conf
    for bins in (10_000, 4):
        out = _stream(batches, num_classes=6, uncertainty_bins=bins).compute()
        binned = _bin(u, bins)
        tm = BinaryAUROC(thresholds=None)
        tm.update(torch.from_numpy(binned / bins).float(), torch.from_numpy(wrong))  # scores in [0, 1]: no sigmoid
        assert out["auroc_msp"] == pytest.approx(roc_auc_score(wrong, binned), abs=1e-12)
        assert out["auroc_msp"] == pytest.approx(float(tm.compute()), abs=1e-6)  # torchmetrics computes in fp32
        assert out["aurc_msp"] <= wrong.mean() and out["auroc_msp"] > 0.6  # informative confidences
        # Unbinned: within the documented bounds (here 7e-5 / 2e-4 for 10 000 bins). Ties broken
        # at random err in both directions, so the actual gap is well inside; 4 bins: visibly off.
        bound_auroc, bound_aurc = _tie_bounds(binned, wrong)
        diff_auroc = abs(out["auroc_msp"] - roc_auc_score(wrong, u))
        diff_aurc = abs(out["aurc_msp"] - _aurc_sorted(conf, wrong))
        assert diff_auroc <= bound_auroc + 1e-12 and diff_aurc <= bound_aurc + 1e-12
        if bins == 10_000:
            assert bound_auroc < 1e-3 and diff_auroc < 2e-4 and diff_aurc < 2e-4
        else:
            assert diff_auroc > 1e-2 and diff_aurc > 1e-2  # the binning does matter when bins are coarse


def test_logits_path_auroc_aurc_close_to_float64_reference():
    # Logits in: per-pixel confidences differ from a float64 softmax by ~1e-7, which moves a few
    # pixels across the 1e-4 bin edges; the result stays within the tie bound of the exact value.
    gen = torch.Generator().manual_seed(4)
    batches = [_batch(c=5, gen=gen) for _ in range(3)]
    out = _stream(batches).compute()
    logits = torch.cat([b[0] for b in batches]).double().numpy()
    _, y, pred, conf = _pixels(softmax(logits, axis=1), torch.cat([b[1] for b in batches]).numpy())
    wrong = (pred != y).astype(int)
    bound_auroc, bound_aurc = _tie_bounds(_bin(1 - conf, 10_000), wrong)
    assert out["auroc_msp"] == pytest.approx(roc_auc_score(wrong, 1 - conf), abs=bound_auroc + 1e-6)
    assert out["aurc_msp"] == pytest.approx(_aurc_sorted(conf, wrong), abs=bound_aurc + 1e-6)


def test_uncertainty_map_without_ties_equals_sklearn_and_sorted_curve_exactly():
    # Each labelled pixel gets its own bin of the extra score (the centre of bin r for rank r), so
    # the binned score has no ties and AUROC/AURC equal the unbinned references exactly.
    gen = torch.Generator().manual_seed(5)
    logits, labels = _batch(b=2, c=4, h=30, w=40, gen=gen)
    valid = labels != IGNORE
    wrong = (logits.argmax(1) != labels)[valid].numpy().astype(int)
    noisy = wrong + np.random.default_rng(0).normal(0, 0.7, wrong.size)  # an imperfect error detector
    ranks = np.argsort(np.argsort(noisy))
    k = 4000
    assert wrong.size <= k
    sigma = torch.zeros(labels.shape)
    sigma[valid] = torch.from_numpy((ranks + 0.5) / k * 0.5).float()
    m = SegmentationMetrics(num_classes=4, uncertainty_bins=k)
    m.update(logits, labels, uncertainty=sigma)
    out = m.compute()
    assert int((m.sigma_hist.sum(1) > 1).sum()) == 0  # really no ties
    assert out["auroc_sigma"] == pytest.approx(roc_auc_score(wrong, noisy), abs=1e-12)
    assert out["aurc_sigma"] == pytest.approx(_aurc_sorted(-noisy, wrong), abs=1e-12)


def test_uncertainty_map_at_logit_resolution_is_upsampled_like_the_logits():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(2, 3, 8, 10, generator=gen) * 2
    sigma = torch.rand(2, 8, 10, generator=gen) * 0.4
    labels = torch.randint(0, 3, (2, 32, 40), generator=gen)
    labels[:, :3] = IGNORE
    small = SegmentationMetrics(num_classes=3)
    small.update(logits, labels, uncertainty=sigma)
    up = lambda t: F.interpolate(t, size=(32, 40), mode="bilinear", align_corners=True)  # noqa: E731
    full = SegmentationMetrics(num_classes=3)
    full.update(up(logits), labels, uncertainty=up(sigma[:, None])[:, 0])
    for name in ACCUMULATORS:
        torch.testing.assert_close(small.state_tensors()[name], full.state_tensors()[name], rtol=1e-12, atol=0)
    out = small.compute()
    _, y, pred, _ = _pixels(up(logits).numpy(), labels.numpy())
    s = up(sigma[:, None])[:, 0][labels != IGNORE].double().numpy()
    assert out["auroc_sigma"] == pytest.approx(roc_auc_score((pred != y).astype(int), _bin(s, 10_000, 0.5)), abs=1e-12)


def test_uncertainty_outside_the_range_goes_to_the_end_bins():
    probs = torch.tensor([0.9, 0.1]).view(1, 2, 1, 1).expand(1, 2, 1, 4).contiguous()
    labels = torch.tensor([[[0, 1, 0, 1]]])
    sigma = torch.tensor([[[-0.3, 7.0, 0.5, 0.25]]])
    m = SegmentationMetrics(num_classes=2, uncertainty_bins=4, uncertainty_max=0.5)
    m.update(probs, labels, is_probs=True, uncertainty=sigma)
    # Bins: -0.3 -> 0 (correct), 7.0 -> 3 (wrong), 0.5 -> 3 (correct), 0.25 -> 2 (wrong).
    assert m.sigma_hist.tolist() == [[1, 0], [0, 0], [0, 1], [1, 1]]
    # (error, correct) pairs: (3, 0) 1, (3, 3) tie 1/2, (2, 0) 1, (2, 3) 0.
    assert m.compute()["auroc_sigma"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)


# --------------------------------------------------------------------------- streaming / splits


def test_streaming_equals_one_batch_and_split_states_sum_to_the_whole():
    gen = torch.Generator().manual_seed(7)
    batches = [(lg, lb, {"uncertainty": torch.rand(lb.shape, generator=gen) * 0.3})
               for lg, lb in (_batch(c=5, gen=gen) for _ in range(4))]
    whole = _stream([(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]),
                      {"uncertainty": torch.cat([b[2]["uncertainty"] for b in batches])})])
    streamed = _stream(batches)
    parts = [_stream(batches[0::2]), _stream(batches[1::2])]
    other = parts[1].state_tensors()
    # A fake all-reduce that adds the other shard's accumulators (what `reduce` does with N processes).
    parts[0].reduce(lambda t: t + next(v for k, v in other.items() if parts[0].state_tensors()[k] is t))
    merged = SegmentationMetrics(num_classes=5).load_state_tensors(parts[1].state_tensors())
    merged.load_state_tensors(_stream(batches[0::2]).state_tensors(), add=True)
    ref = whole.compute()
    for m in (streamed, parts[0], merged):
        for name in ACCUMULATORS:
            torch.testing.assert_close(m.state_tensors()[name], whole.state_tensors()[name], rtol=1e-12, atol=0)
        out = m.compute()
        for key in ("auroc_msp", "aurc_msp", "auroc_sigma", "aurc_sigma"):
            assert out[key] == ref[key], key  # integer histograms: bit-identical
        assert out["nll"] == pytest.approx(ref["nll"], rel=1e-12)
        assert out["brier"] == pytest.approx(ref["brier"], rel=1e-12)


def test_ignored_pixels_do_not_count():
    gen = torch.Generator().manual_seed(8)
    logits, labels = _batch(c=4, gen=gen, ignore_frac=0.4)
    sigma = torch.rand(labels.shape, generator=gen) * 0.5
    a = _stream([(logits, labels, {"uncertainty": sigma})], num_classes=4)
    # Anything at the ignored pixels: other logits and scores give the same state.
    ignored = (labels == IGNORE).unsqueeze(1)
    logits2 = torch.where(ignored, torch.randn(logits.shape, generator=gen) * 50, logits)
    sigma2 = torch.where(labels == IGNORE, torch.full_like(sigma, 1e6), sigma)
    b = _stream([(logits2, labels, {"uncertainty": sigma2})], num_classes=4)
    for name in ACCUMULATORS:
        torch.testing.assert_close(a.state_tensors()[name], b.state_tensors()[name], rtol=0, atol=0)
    n = int((labels != IGNORE).sum())
    assert int(a.msp_hist.sum()) == int(a.sigma_hist.sum()) == n == a.compute()["num_pixels"]


# --------------------------------------------------------------------------- absent / partial / errors


def test_hard_predictions_give_nan_and_none():
    labels = torch.tensor([[[0, 1], [1, IGNORE]]])
    m = SegmentationMetrics(num_classes=2)
    m.update_predictions(torch.tensor([[[0, 0], [1, 1]]]), labels)
    out = m.compute()
    assert all(math.isnan(out[k]) for k in ("nll", "brier", "auroc_msp", "aurc_msp"))
    assert out["auroc_sigma"] is None and out["aurc_sigma"] is None
    # Old-style callers that pass only the first four accumulators still work.
    state = m.state_tensors()
    old = metrics_from_accumulators(*(state[k] for k in ACCUMULATORS[:4]))
    assert math.isnan(old["nll"]) and old["auroc_sigma"] is None and old["mean_iou"] == out["mean_iou"]


def test_uncertainty_on_some_updates_only_warns():
    gen = torch.Generator().manual_seed(9)
    (l1, y1), (l2, y2) = _batch(c=3, gen=gen), _batch(c=3, gen=gen)
    m = SegmentationMetrics(num_classes=3)
    m.update(l1, y1, uncertainty=torch.rand(y1.shape, generator=gen))
    m.update(l2, y2)
    with pytest.warns(UserWarning, match="covers"):
        out = m.compute()
    assert set(UNCERTAINTY_KEYS) <= set(out) and out["auroc_sigma"] is not None


def test_bad_uncertainty_inputs_raise_and_leave_the_state_unchanged():
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    m = SegmentationMetrics(num_classes=3)
    m.update(logits, labels)
    before = {k: v.clone() for k, v in m.state_tensors().items()}
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        m.update(logits, labels, uncertainty=torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="float"):
        m.update(logits, labels, uncertainty=torch.ones(1, 4, 4, dtype=torch.long))
    bad = torch.rand(1, 4, 4)
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        m.update(logits, labels, uncertainty=bad)
    for name in ACCUMULATORS:
        assert torch.equal(m.state_tensors()[name], before[name]), name
    with pytest.raises(ValueError, match="uncertainty_bins"):
        SegmentationMetrics(num_classes=3, uncertainty_bins=0)
    with pytest.raises(ValueError, match="uncertainty_max"):
        SegmentationMetrics(num_classes=3, uncertainty_max=0.0)
    with pytest.raises(ValueError, match="msp_hist has shape"):
        SegmentationMetrics(num_classes=3, uncertainty_bins=10).load_state_tensors(m.state_tensors())
