"""Pictures: reliability diagrams, uncertainty panels and t-SNE figures are valid PNGs of the documented size."""


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fotf_hf.data import DatasetInfo
from fotf_hf.fotf import FOTF, FotfConfig
from fotf_hf.models.outputs import SegmentationFeatures, SegmentationModelOutput
from fotf_hf.viz import colorize, palette_for, reliability_diagram, tsne_embeddings, tsne_figure, write_uncertainty_panels


class FakeStudent(nn.Module):
    """`SegmentationAdapter` interface: stride-s trunk -> dropout -> 1x1 classifier (one MC site)."""

    def __init__(self, num_labels=4, width=6, stride=2, mc_dropout_p=0.1):
        super().__init__()
        self.trunk = nn.Conv2d(3, width, stride, stride=stride)
        self.classifier = nn.Conv2d(width, num_labels, 1)
        self.num_labels = num_labels
        self.mc_dropout_p = mc_dropout_p
        self.sample_calls = []  # (T, mode, p) of every sample_logits call
        self.dropout = nn.Dropout(mc_dropout_p)

    def mc_dropout_sites(self):
        return [self.dropout]

    def forward_features(self, pixel_values):
        return SegmentationFeatures(head_input=torch.relu(self.trunk(pixel_values)))

    def forward(self, pixel_values, labels=None):
        head_input = self.forward_features(pixel_values).head_input
        emb = F.dropout(head_input, self.mc_dropout_p or 0.0, training=self.training)
        return SegmentationModelOutput(logits=self.classifier(emb), head_input=head_input, embedding=emb)

    def sample_logits(self, num_samples, mode="exact", features=None, pixel_values=None, p=None, generator=None,
                      masks=None):
        self.sample_calls.append((num_samples, mode, p))
        rate = self.mc_dropout_p if p is None else p
        head_input = (self.forward_features(pixel_values) if mode == "naive" else features).head_input
        for t in range(num_samples):
            keep = torch.rand(head_input.shape, generator=generator) >= rate if masks is None else masks[t][0]
            yield self.classifier(head_input * keep / (1 - rate))


def make_eval_set(n=3, size=(16, 24), num_labels=4):
    g = torch.Generator().manual_seed(0)
    items = []
    for _ in range(n):
        labels = torch.randint(0, num_labels, size, generator=g)
        labels[:2] = 255
        items.append({"pixel_values": torch.randn(3, *size, generator=g), "labels": labels})
    return items


INFO = DatasetInfo(name="toy", num_labels=4, id2label={0: "sky", 1: "road", 2: "car", 3: "person"},
                   palette=[(10, 20, 30), (40, 50, 60), (70, 80, 90), (100, 110, 120)], ignore_color=(255, 0, 255))


def png_size(path):
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        return im.size


# ------------------------------------------------------------------ palettes


def test_palette_and_colorize():
    assert palette_for(4, INFO).tolist() == [[10, 20, 30], [40, 50, 60], [70, 80, 90], [100, 110, 120]]
    generated = palette_for(21)
    assert generated.shape == (21, 3) and generated.dtype == np.uint8 and len({tuple(c) for c in generated}) == 21
    rgb = colorize(np.array([[0, 3, 255]]), INFO.palette, ignore_color=INFO.ignore_color)
    assert rgb.tolist() == [[[10, 20, 30], [100, 110, 120], [255, 0, 255]]]
    assert np.array_equal(rgb, INFO.colorize(np.array([[0, 3, 255]])))


# ------------------------------------------------------------------ reliability diagram


def test_reliability_diagram_is_a_png_of_the_documented_size_and_skips_empty_bins(tmp_path):
    nan = float("nan")
    acc = [nan, nan, 0.2, 0.35, nan, 0.5, 0.66, 0.7, 0.85, 0.97]
    conf = [nan, nan, 0.25, 0.34, nan, 0.55, 0.65, 0.75, 0.85, 0.98]
    count = [0, 0, 5, 10, 0, 20, 40, 80, 160, 1000]
    path = reliability_diagram(acc, conf, count, 0.0123, tmp_path / "sub" / "reliability.png")
    assert path == tmp_path / "sub" / "reliability.png"
    assert png_size(path) == (500, 600)
    assert [p.name for p in path.parent.iterdir()] == ["reliability.png"]  # no temporary file left


def test_reliability_diagram_rejects_mismatched_bins(tmp_path):
    with pytest.raises(ValueError):
        reliability_diagram([0.5, 0.6], [0.5], [1, 1], 0.1, tmp_path / "r.png")


def test_reliability_diagram_from_real_metrics(tmp_path):
    from fotf_hf.metrics import SegmentationMetrics

    metrics = SegmentationMetrics(5)
    metrics.update(torch.randn(2, 5, 8, 8) * 3, torch.randint(0, 5, (2, 8, 8)))
    result = metrics.compute()
    rel = result["reliability"]
    path = reliability_diagram(rel["accuracy"], rel["confidence"], rel["count"], result["ece"], tmp_path / "r.png", dpi=50)
    assert png_size(path) == (250, 300)


# ------------------------------------------------------------------ uncertainty panels


def expected_panel_size(h, w, panel_width=2.6, dpi=100):
    return round(5 * panel_width * dpi), round((panel_width * h / w + 0.8) * dpi)


def test_panels_one_png_per_image_with_the_step_in_the_name(tmp_path):
    student = FakeStudent()
    student.train()
    fotf = FOTF(FotfConfig(enabled=True, num_samples=3, p=0.2, m=3.0, kappa=5.0, mode="naive"))
    paths = write_uncertainty_panels(student, make_eval_set(3), INFO, tmp_path / "panels", step=40, num_images=2,
                                     fotf=fotf)
    assert [p.name for p in paths] == ["step_0000040_00.png", "step_0000040_01.png"]
    assert sorted(p.name for p in (tmp_path / "panels").iterdir()) == [p.name for p in paths]
    for path in paths:
        width, height = png_size(path)
        ew, eh = expected_panel_size(16, 24)
        assert width == ew and abs(height - eh) <= 1
    assert student.training  # restored
    assert student.sample_calls == [(3, "naive", 0.2)] * 2  # FOTF's T, mode and p drive the MC passes


def test_panels_without_fotf_use_the_default_fotf_settings(tmp_path):
    student = FakeStudent().eval()
    paths = write_uncertainty_panels(student, make_eval_set(1), None, tmp_path, step=0, num_images=5)
    assert len(paths) == 1 and png_size(paths[0])[0] == expected_panel_size(16, 24)[0]
    defaults = FotfConfig()
    assert student.sample_calls == [(defaults.num_samples, defaults.mode, defaults.p)] == [(5, "exact", None)]
    assert not student.training
    # a student trained without dropout still gets panels: the passes use the paper's rate 0.1
    no_dropout = FakeStudent(mc_dropout_p=0.0)
    write_uncertainty_panels(no_dropout, make_eval_set(1), None, tmp_path / "nodrop", step=0, num_images=1)
    assert no_dropout.sample_calls == [(5, "exact", 0.1)]


@pytest.mark.parametrize("as_module, terms", [(False, {"apply_to": "both", "merge_ce": "per_pixel"}),
                                              (True, {"apply_to": "kd", "merge_kd": "per_pixel"})])
def test_panel_maps_follow_the_fotf_formula(tmp_path, monkeypatch, as_module, terms):
    """The weight map drawn is (1 + m * mean_c sigma)^kappa of the sigma drawn: the CE weight (else the
    KD weight) with merge per_pixel, which averages sigma over the classes as the sigma panel does."""
    import matplotlib.axes

    shown = []
    real_imshow = matplotlib.axes.Axes.imshow

    def spy(self, array, *args, **kwargs):
        shown.append(np.asarray(array))
        return real_imshow(self, array, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", spy)
    student = FakeStudent(stride=1).eval()  # logit resolution = image resolution: no resize in the maps
    config = FotfConfig(enabled=True, num_samples=4, m=3.0, kappa=2.0, **{"merge_kd": "none", "merge_ce": "none", **terms})
    write_uncertainty_panels(student, make_eval_set(1), INFO, tmp_path, fotf=FOTF(config) if as_module else config)
    assert student.sample_calls == [(4, "exact", None)]
    image, truth, pred, sigma, weight = shown
    assert image.shape == (16, 24, 3) and truth.shape == (16, 24, 3)
    assert (truth[:2] == [255, 0, 255]).all()  # ignored rows in the ignore colour
    assert sigma.min() >= 0 and sigma.max() > 0
    np.testing.assert_allclose(weight, (1 + 3.0 * sigma) ** 2.0, rtol=1e-5)


# ------------------------------------------------------------------ t-SNE


def make_loader(n=4, size=(16, 24)):
    from fotf_hf.data import create_dataloader

    return create_dataloader(make_eval_set(n, size), batch_size=2, train=False)


def test_tsne_embeddings_sample_labelled_pixels_per_class():
    student = FakeStudent().eval()
    x, y = tsne_embeddings(student, make_loader(), points_per_class=10)
    assert x.shape == (len(y), 6) and x.dtype == np.float32
    assert set(y.tolist()) <= {0, 1, 2, 3} and np.bincount(y).max() <= 10
    again_x, again_y = tsne_embeddings(student, make_loader(), points_per_class=10)
    assert np.array_equal(x, again_x) and np.array_equal(y, again_y)  # seeded


def test_tsne_figure_two_students_side_by_side(tmp_path):
    torch.manual_seed(1)
    students = {"CIRKD": FakeStudent().eval(), "CIRKD+FOTF": FakeStudent().eval()}
    path = tsne_figure(students, make_loader(), tmp_path / "tsne.png", id2label=INFO.id2label, palette=INFO.palette,
                       points_per_class=15)
    assert png_size(path) == (900, 500)


# ------------------------------------------------------------------ the real models


def test_real_student_panels_and_tsne(tmp_path):
    models = pytest.importorskip("fotf_hf.models")
    if not hasattr(models, "create_model"):
        pytest.skip("fotf_hf.models.create_model is not written yet")
    torch.manual_seed(0)
    student = models.SegmentationAdapter(
        models.create_model("deeplabv3", "resnet18", num_labels=4, backbone_base_width=8, head_channels=16))
    student.train()
    eval_set = make_eval_set(2, size=(32, 48))
    paths = write_uncertainty_panels(student, eval_set, INFO, tmp_path / "panels", step=3, num_images=2,
                                     fotf=FOTF(FotfConfig(enabled=True, num_samples=2, kappa=3.0)))
    assert len(paths) == 2 and png_size(paths[0])[0] == expected_panel_size(32, 48)[0]
    assert student.training
    from fotf_hf.data import create_dataloader

    loader = create_dataloader(eval_set, batch_size=2, train=False)
    path = tsne_figure([("a", student), ("b", student)], loader, tmp_path / "tsne.png", points_per_class=10)
    assert png_size(path) == (900, 500)


class _Recording(list):
    """A list dataset that records which items were read."""

    def __init__(self, items):
        super().__init__(items)
        self.read = []

    def __getitem__(self, i):
        self.read.append(i)
        return super().__getitem__(i)


def test_panels_spread_over_the_set_or_follow_given_indices(tmp_path):
    student = FakeStudent().eval()
    data = _Recording(make_eval_set(7))
    paths = write_uncertainty_panels(student, data, INFO, tmp_path / "a", num_images=3)
    assert data.read == [0, 3, 6]  # first, middle, last: not three neighbouring video frames
    assert [p.name for p in paths] == ["step_0000000_00.png", "step_0000000_01.png", "step_0000000_02.png"]
    data.read.clear()
    write_uncertainty_panels(student, data, INFO, tmp_path / "b", indices=[5, 1])
    assert data.read == [5, 1]


def test_panels_leave_the_global_rng_alone_and_repeat_with_the_same_seed(tmp_path):
    # Panels are written between training steps: drawing their MC-dropout masks from the global RNG
    # would make the rest of the training run depend on whether (and how many) panels were drawn.
    student = FakeStudent().eval()
    data = make_eval_set(2)
    state = torch.random.get_rng_state()
    first = write_uncertainty_panels(student, data, INFO, tmp_path / "a", num_images=2)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = write_uncertainty_panels(student, data, INFO, tmp_path / "b", num_images=2)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
