"""FOTF (eq. 6-7, merges, the per-step object) and the MC-dropout passes it asks the models for.

References: NumPy (`np.std`, loops with `math.pow` / `math.exp`), hand-applied dropout masks, and
the literal computation of the paper, T full forwards of the student with dropout (`naive`),
against which the fast `exact` re-run must agree for the same masks.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fotf_hf.fotf import FOTF, MERGES, FotfConfig, FotfResult, merge_sigma, predictive_std, streamed_std, uncertainty_weights
from fotf_hf.losses.ce import ce_loss
from fotf_hf.losses.kd import kd_loss
from fotf_hf.models import SegmentationAdapter, create_model, eval_mode

TINY_RESNET = dict(backbone_base_width=8, head_channels=16)
TINY_MIT = dict(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], decoder_hidden_size=32)
MERGE_SHAPES = {"none": (2, 3, 4, 5), "per_pixel": (2, 1, 4, 5), "per_class": (2, 3, 1, 1),
                "per_image": (2, 1, 1, 1), "batch_mean": (1, 3, 4, 5)}


def tiny(arch, num_labels=5, **overrides):
    backbone, base = ("mit-b0", TINY_MIT) if arch == "segformer" else ("resnet18", TINY_RESNET)
    return SegmentationAdapter(create_model(arch, backbone, num_labels=num_labels, **{**base, **overrides}))


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


def test_streamed_std_of_logits_equals_std_of_their_softmax():
    logits = torch.randn(5, 2, 4, 3, 5) * 3
    expected = np.std(np_softmax(logits.numpy().astype(np.float64), 2), axis=0, ddof=1)
    np.testing.assert_allclose(streamed_std(iter(logits.unbind(0))).numpy(), expected, rtol=1e-4, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert streamed_std(logits.bfloat16().unbind(0)).dtype == torch.float32


def test_predictive_std_edge_cases():
    same = torch.full((5, 2, 3, 4, 4), 1 / 3)
    same[:, :, 0] = 0.1
    assert torch.all(predictive_std(same) == 0)  # identical samples: exactly zero
    half = torch.zeros(4, 1, 1, 1, 1)
    half[:2] = 1.0
    assert predictive_std(half).item() == pytest.approx(math.sqrt(4 / 12))
    base = torch.full((5, 1, 1, 1, 1), 0.9) + torch.tensor([0.0, 1e-6, -1e-6, 2e-6, -2e-6]).view(5, 1, 1, 1, 1)
    np.testing.assert_allclose(predictive_std(base).numpy(), np.std(base.numpy().astype(np.float64), 0, ddof=1), rtol=0.1)
    with pytest.raises(ValueError, match="correction"):
        predictive_std(torch.rand(1, 2, 3, 4, 4))


# ------------------------------------------------------------------ merges + eq. 7


def _loop_weights(sigma, m, kappa, weighting, merge):
    """Average over the dimensions the merge removes with explicit loops, then f element by element."""
    averaged = {"none": (), "per_pixel": (1,), "per_class": (2, 3), "per_image": (1, 2, 3), "batch_mean": (0,)}[merge]
    shape = tuple(1 if d in averaged else n for d, n in enumerate(sigma.shape))
    out = np.zeros(shape)
    for index in np.ndindex(*shape):
        ranges = [range(sigma.shape[d]) if d in averaged else [index[d]] for d in range(4)]
        vals = [sigma[b, c, i, j] for b in ranges[0] for c in ranges[1] for i in ranges[2] for j in ranges[3]]
        s = sum(vals) / len(vals)
        out[index] = math.pow(1 + m * s, kappa) if weighting == "power" else math.exp(kappa * m * s)
    return out


@pytest.mark.parametrize("merge", MERGES)
@pytest.mark.parametrize("weighting", ["power", "exp"])
@pytest.mark.parametrize("m,kappa", [(1.0, 1.0), (3.0, 5.0), (10.0, 10.0)])
def test_uncertainty_weights_match_loop_reference(merge, weighting, m, kappa):
    sigma = torch.rand(2, 3, 4, 5) * 0.5
    w = uncertainty_weights(sigma, m=m, kappa=kappa, weighting=weighting, merge=merge)
    assert w.shape == MERGE_SHAPES[merge] and w.dtype == torch.float32 and not w.requires_grad
    np.testing.assert_allclose(w.numpy(), _loop_weights(sigma.numpy().astype(np.float64), m, kappa, weighting, merge), rtol=2e-5)
    assert torch.broadcast_shapes(w.shape, (2, 3, 4, 5)) == (2, 3, 4, 5)


sigmas = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
positive = st.floats(min_value=0.01, max_value=10.0)


@settings(max_examples=200, deadline=None)
@given(a=sigmas, b=sigmas, m=positive, kappa=positive, weighting=st.sampled_from(["power", "exp"]))
def test_weights_are_finite_monotone_and_one_at_zero(a, b, m, kappa, weighting):
    lo, hi = min(a, b), max(a, b)
    w = uncertainty_weights(torch.tensor([lo, hi, 0.0]).view(1, 3, 1, 1), m, kappa, weighting).flatten().tolist()
    assert all(math.isfinite(x) and x >= 1.0 for x in w) and w[2] == 1.0 and w[0] <= w[1]


def test_weights_for_the_largest_paper_setting_are_exact():
    sigma = torch.tensor(math.sqrt(0.5)).view(1, 1, 1, 1)
    assert uncertainty_weights(sigma, 10, 10, "power").item() == pytest.approx((1 + 10 * math.sqrt(0.5)) ** 10, rel=1e-5)
    assert uncertainty_weights(sigma, 10, 10, "exp").item() == pytest.approx(math.exp(100 * math.sqrt(0.5)), rel=1e-5)


@pytest.mark.parametrize("word,literal,other", [("channel", "per_pixel", "per_class"), ("pixel", "per_class", "per_pixel"),
                                                ("sample", "batch_mean", "per_image")])
def test_the_papers_merge_words_are_refused_with_the_mapping(word, literal, other):
    with pytest.raises(ValueError) as err:
        FotfConfig(merge_kd=word).validate()
    text = str(err.value)
    assert f"fotf.merge_kd = {word!r}" in text and "per_pixel" in text and "batch_mean" in text
    assert any(literal in line and other in line for line in text.splitlines() if line.strip().startswith(word))
    with pytest.raises(ValueError, match="paper's word"):
        merge_sigma(torch.rand(1, 2, 3, 3), word)


@pytest.mark.parametrize("field,value,message", [
    ("num_samples", 1, "num_samples = 1 must be an integer >= 2"),
    ("p", 0.0, r"p = 0.0 must be null .* or in \(0, 1\)"),
    ("kappa", 0.0, "kappa = 0.0 must be"),
    ("m", float("nan"), "m = nan must be"),
    ("weighting", "sigmoid", "weighting = 'sigmoid' is not valid; choose one of: power, exp"),
    ("merge_ce", "logits", "merge_ce = 'logits' is not valid; choose one of: none, per_pixel, per_class, per_image, batch_mean"),
    ("mode", "head", "mode = 'head' is not valid; choose one of: exact, naive, classifier"),
    ("source", "both", "source = 'both' is not valid"),
])
def test_config_validation_names_the_field_and_choices(field, value, message):
    with pytest.raises(ValueError, match=message):
        FotfConfig(**{field: value}).validate()


def test_defaults_are_the_literal_reading_and_exact_sampling():
    c = FotfConfig()
    assert (c.merge_kd, c.merge_ce, c.mode, c.p, c.num_samples) == ("per_pixel", "per_class", "exact", None, 5)


# ------------------------------------------------------------------ MC passes: exact == naive


def _masks(student, x, num_samples, seed):
    """Random keep-masks for every site call of each pass, with the sites' input shapes."""
    g = torch.Generator().manual_seed(seed)
    shapes = []
    hooks = [s.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape))) for s in student.mc_dropout_sites()]
    with torch.no_grad(), eval_mode(student):
        student.forward(x)
    for h in hooks:
        h.remove()
    return [[torch.rand(shape, generator=g) >= 0.3 for shape in shapes] for _ in range(num_samples)]


@pytest.mark.parametrize("arch,overrides,num_sites", [
    ("deeplabv3", {}, 2),
    ("pspnet", {}, 1),
    ("segformer", {"drop_path_rate": 0.0}, 1),
    ("segformer", {"drop_path_rate": 0.0, "hidden_dropout_prob": 0.2}, 9),
])
@pytest.mark.parametrize("train", [True, False])
def test_exact_passes_equal_full_forwards_for_the_same_masks(arch, overrides, num_sites, train):
    torch.manual_seed(0)
    student = tiny(arch, **overrides).train(train)
    x = torch.randn(2, 3, 48, 64)
    assert len(student.mc_dropout_sites()) == num_sites
    masks = _masks(student, x, 3, seed=1)
    features = student(x)
    exact = list(student.sample_logits(3, "exact", features=features, masks=masks))
    naive = list(student.sample_logits(3, "naive", pixel_values=x, masks=masks))
    for e, n in zip(exact, naive):
        torch.testing.assert_close(e, n, rtol=0, atol=1e-5)
    assert not torch.allclose(exact[0], exact[1])  # different masks, different passes


def test_one_site_pass_is_the_hand_applied_mask():
    student = tiny("pspnet").eval()
    x = torch.randn(2, 3, 48, 64)
    features = student.forward_features(x)
    masks = _masks(student, x, 2, seed=3)
    (first, _), p = list(student.sample_logits(2, "exact", features=features, masks=masks)), 0.1
    expected = student.get_classifier()(features.head_input * masks[0][0] / (1 - p))
    torch.testing.assert_close(first, expected)
    # an explicit rate overrides the site's own for the passes only
    again = next(iter(student.sample_logits(1, "exact", features=features, masks=masks[:1], p=0.5)))
    torch.testing.assert_close(again, student.get_classifier()(features.head_input * masks[0][0] / 0.5))
    assert student.mc_dropout_sites()[0].p == 0.1


def test_deeplabv3_samples_its_aspp_dropout_and_classifier_mode_does_not():
    torch.manual_seed(0)
    student = tiny("deeplabv3").train()
    aspp, head = student.mc_dropout_sites()
    assert (aspp.p, head.p) == (0.5, 0.1) and aspp is student.model.head.aspp.project[3]
    assert all(site is not m for site in (aspp, head) for m in student.model.auxlayer.modules())
    x = torch.randn(4, 3, 64, 64)
    features = student(x)
    exact = streamed_std(student.sample_logits(20, "exact", features=features, generator=torch.Generator().manual_seed(1)))
    approx = streamed_std(student.sample_logits(20, "classifier", features=features,
                                                generator=torch.Generator().manual_seed(1)))
    assert exact.mean() > 1.3 * approx.mean()


def test_passes_leave_batchnorm_statistics_and_other_randomness_alone():
    torch.manual_seed(0)
    student = tiny("segformer", drop_path_rate=0.5).train()  # stochastic depth is on in training...
    x = torch.randn(2, 3, 48, 64)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    masks = _masks(student, x, 1, seed=2) * 2
    a, b = student.sample_logits(2, "naive", pixel_values=x, masks=masks)
    torch.testing.assert_close(a, b)  # ...but not in the passes: same masks, same logits
    dlv3 = tiny("deeplabv3").train()
    features = dlv3(x)  # the main forward updates the running statistics; the passes must not
    bn_before = {k: v.clone() for k, v in dlv3.state_dict().items()}
    list(dlv3.sample_logits(3, "naive", pixel_values=x))
    list(dlv3.sample_logits(3, "exact", features=features))
    for name, value in dlv3.state_dict().items():
        if "num_batches_tracked" not in name and ("running" in name):
            torch.testing.assert_close(value, bn_before[name], msg=name)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert dlv3.training and all(m.training for m in dlv3.mc_dropout_sites())  # flags restored


def test_passes_are_reproducible_from_a_generator_and_need_an_active_site():
    student = tiny("deeplabv3").eval()
    features = student.forward_features(torch.randn(1, 3, 48, 48))
    draw = lambda seed: streamed_std(student.sample_logits(4, features=features, generator=torch.Generator().manual_seed(seed)))  # noqa: E731
    state = torch.get_rng_state()
    torch.testing.assert_close(draw(5), draw(5))
    assert not torch.equal(draw(5), draw(6)) and torch.equal(torch.get_rng_state(), state)
    no_dropout = tiny("pspnet", mc_dropout_p=0.0).eval()
    with pytest.raises(ValueError, match="no active MC dropout site"):
        no_dropout.sample_logits(3, features=no_dropout.forward_features(torch.randn(1, 3, 32, 32)))
    with pytest.raises(ValueError, match="needs pixel_values"):
        student.sample_logits(3, "naive")
    with pytest.raises(ValueError, match="mode = 'head' is not valid"):
        student.sample_logits(3, "head", features=features)


# ------------------------------------------------------------------ the per-step object


@pytest.mark.parametrize("merge_kd,merge_ce", [("per_pixel", "per_class"), ("none", "batch_mean"), ("per_image", "per_pixel")])
@pytest.mark.parametrize("weighting", ["power", "exp"])
def test_fotf_weights_and_stats_equal_the_numpy_pipeline(merge_kd, merge_ce, weighting):
    student = tiny("deeplabv3").train()
    x = torch.randn(2, 3, 48, 64)
    features = student(x)
    fotf = FOTF(FotfConfig(enabled=True, num_samples=5, m=3.0, kappa=5.0, weighting=weighting,
                           merge_kd=merge_kd, merge_ce=merge_ce))
    result = fotf(student, features, x, generator=torch.Generator().manual_seed(11))
    assert isinstance(result, FotfResult)
    logits = torch.stack(list(student.sample_logits(5, features=features, generator=torch.Generator().manual_seed(11))))
    sigma = np.std(np_softmax(logits.numpy().astype(np.float64), 2), axis=0, ddof=1)
    np.testing.assert_allclose(result.sigma.numpy(), sigma, rtol=1e-4, atol=1e-6)
    stats = {k: float(v) for k, v in result.stats.items()}
    assert stats["sigma_p99"] == pytest.approx(np.percentile(sigma, 99, method="inverted_cdf"), rel=1e-4)
    for term, merge, w in (("kd", merge_kd, result.weights.kd), ("ce", merge_ce, result.weights.ce)):
        expected = _loop_weights(sigma, 3.0, 5.0, weighting, merge)
        np.testing.assert_allclose(w.numpy(), expected, rtol=1e-4)
        assert stats[f"weight_{term}_max"] == pytest.approx(expected.max(), rel=1e-4)
        assert stats[f"weight_{term}_mean"] == pytest.approx(expected.mean(), rel=1e-4)
        assert stats[f"weight_{term}_p99"] == pytest.approx(np.percentile(expected, 99, method="inverted_cdf"), rel=1e-4)


@pytest.mark.parametrize("apply_to,has_kd,has_ce", [("kd", True, False), ("ce", False, True), ("both", True, True)])
def test_fotf_apply_to(apply_to, has_kd, has_ce):
    student = tiny("pspnet")
    x = torch.randn(2, 3, 32, 32)
    result = FOTF(FotfConfig(apply_to=apply_to))(student, student(x), x)
    assert (result.weights.kd is not None) == has_kd and (result.weights.ce is not None) == has_ce
    assert ("weight_kd_max" in result.stats) == has_kd and ("weight_ce_max" in result.stats) == has_ce


def test_zero_uncertainty_recovers_the_plain_losses_and_weights_carry_no_gradient():
    student = tiny("pspnet").eval()
    with torch.no_grad():
        student.get_classifier().weight.zero_()  # logits no longer depend on the dropped features
    x = torch.randn(2, 3, 32, 32)
    result = FOTF(FotfConfig(merge_kd="none", merge_ce="none", kappa=10, m=10))(student, student(x), x)
    assert torch.all(result.sigma == 0) and torch.all(result.weights.kd == 1) and torch.all(result.weights.ce == 1)
    s, t, labels = torch.randn(2, 5, 4, 4, requires_grad=True), torch.randn(2, 5, 4, 4), torch.randint(0, 5, (2, 32, 32))
    assert kd_loss(s, t, result.weights.kd).item() == kd_loss(s, t).item()
    assert ce_loss(s, labels, result.weights.ce).item() == ce_loss(s, labels).item()


def test_naive_mode_and_teacher_source():
    torch.manual_seed(0)
    student = tiny("segformer", drop_path_rate=0.0).eval()  # logits at 1/4
    teacher = tiny("deeplabv3").eval()  # logits at 1/8
    x = torch.randn(2, 3, 64, 64)
    naive = FOTF(FotfConfig(mode="naive"))
    assert not naive.needs_features and FOTF(FotfConfig()).needs_features
    result = naive(student, None, x, generator=torch.Generator().manual_seed(2))
    expected = streamed_std(student.sample_logits(5, "naive", pixel_values=x, generator=torch.Generator().manual_seed(2)))
    torch.testing.assert_close(result.sigma, expected)
    features, t_features = student(x), teacher(x)
    by_teacher = FOTF(FotfConfig(source="teacher", merge_kd="none"))
    result = by_teacher(student, features, x, teacher=teacher, teacher_features=t_features,
                        generator=torch.Generator().manual_seed(3))
    t_sigma = streamed_std(teacher.sample_logits(5, features=t_features, generator=torch.Generator().manual_seed(3)))
    torch.testing.assert_close(result.sigma, F.interpolate(t_sigma, size=(16, 16), mode="bilinear", align_corners=False))
    with pytest.raises(ValueError, match="needs the teacher"):
        by_teacher(student, features, x)
    with pytest.raises(ValueError, match="5 classes but the teacher 3"):
        by_teacher(student, features, x, teacher=tiny("pspnet", num_labels=3), teacher_features=t_features)


@pytest.mark.parametrize("mode,source,first", [("naive", "student", "fotf"), ("exact", "student", "forward"),
                                               ("naive", "teacher", "forward")])
def test_distillation_module_samples_naive_student_passes_before_the_forward(mode, source, first):
    # Naive student passes need only the pixels: run before the graph exists, so their transient
    # activations do not stack on the forward's saved ones. Everything else needs this step's features.
    from fotf_hf.training import DistillationModule

    order = []

    class Recording(FOTF):
        def forward(self, *args, **kwargs):
            order.append("fotf")
            return super().forward(*args, **kwargs)

    class Criterion(torch.nn.Module):
        def forward(self, inputs):
            assert inputs.weights.kd.shape == (2, 1, 4, 4)  # per_pixel merge at the logits' resolution
            return {"kd": (inputs.student_logits * inputs.weights.kd).mean()}

    student, teacher = tiny("pspnet"), tiny("pspnet").eval()
    student.register_forward_pre_hook(lambda *_: order.append("forward"))
    fotf = Recording(FotfConfig(num_samples=3, mode=mode, source=source, apply_to="kd"))
    module = DistillationModule(student, Criterion(), fotf)
    x = torch.randn(2, 3, 32, 32)
    t_out = teacher(x)
    out = module(x, labels=torch.zeros(2, 32, 32, dtype=torch.long), teacher_out=t_out, teacher=teacher)
    assert order[0] == first and sorted(order) == ["forward", "fotf"], order
    out.terms["kd"].backward()
    assert student.get_classifier().weight.grad is not None
