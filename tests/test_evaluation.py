"""`evaluate_model` / `run_evaluation` against NumPy references and a real 2-process run.

References: NumPy softmax / argmax / confusion matrix / ECE bins written here from the definitions
(Guo et al. 2017 for the ECE), on a tiny fake `SegmentationAdapter` (1x1 convs, so its logits are
known and flip-equivariant). Tests with the real models are at the end (they need
`fotf_hf.models.create_model`).
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fotf_hf.evaluation import evaluate_model, format_metrics_table, parse_key_values, run_evaluation
from fotf_hf.models.outputs import SegmentationFeatures, SegmentationModelOutput


class FakeStudent(nn.Module):
    """The documented `SegmentationAdapter` interface on a pointwise net: trunk (1x1 conv + BN) -> dropout -> 1x1."""

    def __init__(self, num_labels=4, width=6, stride=1, mc_dropout_p=0.1):
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.trunk = nn.Sequential(nn.Conv2d(3, width, 1), nn.BatchNorm2d(width))
        self.classifier = nn.Conv2d(width, num_labels, 1)
        self.num_labels = num_labels
        self.mc_dropout_p = mc_dropout_p
        self.seen_training = []
        self.samples = []
        with torch.no_grad():  # non-trivial BN statistics, so train vs eval mode would differ
            self.trunk[1].running_mean.uniform_(-0.5, 0.5)
            self.trunk[1].running_var.uniform_(0.5, 2.0)

    def forward_features(self, pixel_values):
        self.seen_training.append(self.training)
        return SegmentationFeatures(head_input=torch.relu(self.trunk(self.pool(pixel_values))))

    def forward(self, pixel_values, labels=None):
        head_input = self.forward_features(pixel_values).head_input
        emb = F.dropout(head_input, self.mc_dropout_p, training=self.training)
        return SegmentationModelOutput(logits=self.classifier(emb), head_input=head_input, embedding=emb)

    def sample_logits(self, num_samples, mode="exact", features=None, pixel_values=None, p=None, generator=None,
                      masks=None):
        """Yields T logits, one pass at a time; `self.samples` gets the (T, B, C, h, w) stack of each call."""
        rate = self.mc_dropout_p if p is None else p
        head_input = (self.forward_features(pixel_values) if mode == "naive" else features).head_input
        drawn = []
        self.samples.append(drawn)
        for t in range(num_samples):
            keep = torch.rand(head_input.shape, generator=generator) >= rate if masks is None else masks[t][0]
            out = self.classifier(head_input * keep / (1 - rate))
            drawn.append(out.detach().clone())
            yield out


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def make_items(n=5, size=(6, 8), num_labels=4, seed=0, ignore_frac=0.15):
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        labels = torch.randint(0, num_labels, size, generator=g)
        labels[torch.rand(size, generator=g) < ignore_frac] = 255
        items.append({"pixel_values": torch.randn(3, *size, generator=g), "labels": labels})
    return items


def make_loader(items, batch_size=2):
    from fotf_hf.data import create_dataloader

    return create_dataloader(ListDataset(items), batch_size=batch_size, train=False)


# ------------------------------------------------------------------ NumPy reference


def np_softmax(z, axis):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_metrics(probs, labels, num_classes, bins=10):
    """probs (N, C, H, W) float64, labels (N, H, W) -> mean_iou, per-class IoU, pixel acc, ECE."""
    conf = probs.max(1)
    pred = probs.argmax(1)
    valid = labels != 255
    lab, pr, cf = labels[valid], pred[valid], conf[valid]
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (lab, pr), 1)
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        in_bin = (cf >= lo) & ((cf < hi) if b < bins - 1 else (cf <= hi))
        if in_bin.any():
            ece += in_bin.sum() / cf.size * abs((pr[in_bin] == lab[in_bin]).mean() - cf[in_bin].mean())
    return {"mean_iou": np.nanmean(iou), "per_class_iou": iou, "pixel_accuracy": tp.sum() / lab.size, "ece": ece}


def np_logits(student, items):
    """The fake's eval-mode logits computed in NumPy from its weights (1x1 conv -> BN -> relu -> 1x1 conv)."""
    conv, bn = student.trunk
    w1 = conv.weight.detach().double().numpy()[:, :, 0, 0]
    b1 = conv.bias.detach().double().numpy()
    scale = bn.weight.detach().double().numpy() / np.sqrt(bn.running_var.double().numpy() + bn.eps)
    shift = bn.bias.detach().double().numpy() - bn.running_mean.double().numpy() * scale
    w2 = student.classifier.weight.detach().double().numpy()[:, :, 0, 0]
    b2 = student.classifier.bias.detach().double().numpy()
    x = np.stack([it["pixel_values"].double().numpy() for it in items])
    h = np.einsum("dc,nchw->ndhw", w1, x) + b1[None, :, None, None]
    h = np.maximum(h * scale[None, :, None, None] + shift[None, :, None, None], 0)
    return np.einsum("kd,ndhw->nkhw", w2, h) + b2[None, :, None, None]


def assert_metrics_close(ours, ref, atol=1e-6):
    assert ours["mean_iou"] == pytest.approx(ref["mean_iou"], abs=atol)
    assert ours["per_class_iou"] == pytest.approx(list(ref["per_class_iou"]), abs=atol, nan_ok=True)
    assert ours["pixel_accuracy"] == pytest.approx(ref["pixel_accuracy"], abs=atol)
    assert ours["ece"] == pytest.approx(ref["ece"], abs=atol)


# ------------------------------------------------------------------ single process


def test_matches_numpy_reference_and_restores_modes():
    student = FakeStudent()
    student.train()
    student.trunk[1].eval()  # a frozen BN inside a training model must stay frozen afterwards
    items = make_items(n=5)
    metrics = evaluate_model(student, make_loader(items), num_classes=4)

    ref = np_metrics(np_softmax(np_logits(student, items), 1), np.stack([it["labels"].numpy() for it in items]), 4)
    assert_metrics_close(metrics, ref)
    assert metrics["num_pixels"] == sum(int((it["labels"] != 255).sum()) for it in items)
    assert set(student.seen_training) == {False}
    assert student.training and student.classifier.training and not student.trunk[1].training


def test_low_resolution_logits_are_upsampled_with_align_corners_before_softmax():
    student = FakeStudent(stride=2).eval()
    items = make_items(n=3, size=(8, 12))
    metrics = evaluate_model(student, make_loader(items))
    with torch.no_grad():
        x = torch.stack([it["pixel_values"] for it in items])
        logits = F.interpolate(student(x).logits, size=(8, 12), mode="bilinear", align_corners=True)
    ref = np_metrics(np_softmax(logits.double().numpy(), 1), np.stack([it["labels"].numpy() for it in items]), 4)
    assert_metrics_close(metrics, ref)


def test_flip_with_a_flip_equivariant_student_changes_nothing():
    student = FakeStudent().eval()
    loader = make_loader(make_items(n=4))
    plain = evaluate_model(student, loader)
    flipped = evaluate_model(student, loader, flip=True)
    assert flipped["mean_iou"] == plain["mean_iou"]
    assert flipped["per_class_iou"] == pytest.approx(plain["per_class_iou"], nan_ok=True)
    assert flipped["ece"] == pytest.approx(plain["ece"], abs=1e-12)


class RampStudent(FakeStudent):
    """Adds a horizontal ramp to class 0's logits: position-dependent, so flipping matters."""

    def forward(self, pixel_values, labels=None):
        out = super().forward(pixel_values)
        out.logits[:, 0] += torch.linspace(-3, 3, out.logits.shape[-1])
        return out


def test_flip_averages_the_flipped_back_logits():
    """ramp(w) + ramp(W-1-w) = 0, so the flip average of RampStudent is exactly the ramp-free logits."""
    student = RampStudent().eval()
    items = make_items(n=3)
    loader = make_loader(items)
    ref = np_metrics(np_softmax(np_logits(student, items), 1), np.stack([it["labels"].numpy() for it in items]), 4)
    assert_metrics_close(evaluate_model(student, loader, flip=True), ref)
    assert evaluate_model(student, loader)["mean_iou"] != pytest.approx(ref["mean_iou"], abs=1e-3)


def test_multiscale_on_constant_images_equals_single_scale():
    """A constant image has the same (pointwise) logits at every scale, so averaging over scales is a no-op."""
    student = FakeStudent().eval()
    items = make_items(n=3, size=(8, 12))
    for it in items:
        it["pixel_values"] = torch.randn(3, 1, 1).expand(3, 8, 12).clone()
    loader = make_loader(items)
    single = evaluate_model(student, loader)
    multi = evaluate_model(student, loader, scales=(0.5, 1.0, 1.5))
    assert multi["mean_iou"] == single["mean_iou"]
    assert multi["ece"] == pytest.approx(single["ece"], abs=1e-6)


def test_mc_dropout_uses_the_predictive_mean_of_the_samples():
    student = FakeStudent(mc_dropout_p=0.3).eval()
    items = make_items(n=3)
    metrics = evaluate_model(student, make_loader(items, batch_size=3), mc_samples=4,
                             generator=torch.Generator().manual_seed(1))
    (samples,) = student.samples  # one batch
    samples = torch.stack(samples)  # (T, B, C, h, w)
    assert samples.shape == (4, 3, 4, 6, 8)
    mean = np_softmax(samples.double().numpy(), 2).mean(0)
    ref = np_metrics(mean, np.stack([it["labels"].numpy() for it in items]), 4)
    assert_metrics_close(metrics, ref)
    deterministic = evaluate_model(student, make_loader(items, batch_size=3))
    assert metrics["ece"] != deterministic["ece"]
    assert deterministic["auroc_sigma"] is None  # no MC samples, no sigma

    # Uncertainty metrics against NumPy / sklearn: the NLL of the mean probability, and the AUROC of
    # sigma = std over the T passes (population) of the predicted class's probability for the errors.
    from sklearn.metrics import roc_auc_score

    probs = np_softmax(samples.double().numpy(), 2)  # (T, B, C, h, w)
    labels = np.stack([it["labels"].numpy() for it in items])
    top = mean.argmax(1)
    p_top = np.take_along_axis(probs, top[None, :, None], axis=2)[:, :, 0]  # (T, B, h, w)
    sigma, valid = p_top.std(0), labels != 255
    p_true = np.take_along_axis(mean, np.where(valid, labels, 0)[:, None], axis=1)[:, 0]
    assert metrics["nll"] == pytest.approx(-np.log(p_true[valid]).mean(), rel=1e-5)
    errors = (top != labels)[valid]
    assert metrics["auroc_sigma"] == pytest.approx(roc_auc_score(errors, sigma[valid]), abs=2e-3)
    assert metrics["auroc_msp"] == pytest.approx(roc_auc_score(errors, 1 - mean.max(1)[valid]), abs=2e-3)


def test_runs_inside_autocast_and_returns_fp32_metrics():
    student = FakeStudent().eval()
    loader = make_loader(make_items(n=4))
    reference = evaluate_model(student, loader)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = evaluate_model(student, loader, flip=True, mc_samples=2)
        amp_plain = evaluate_model(student, loader)
    assert isinstance(amp["ece"], float) and 0 <= amp["ece"] <= 1
    assert amp_plain["pixel_accuracy"] == pytest.approx(reference["pixel_accuracy"], abs=0.05)


@pytest.mark.parametrize("kwargs", [{"mc_samples": 1}, {"mc_samples": -2}, {"scales": ()}, {"scales": (0.0,)}])
def test_bad_options_are_refused(kwargs):
    with pytest.raises(ValueError):
        evaluate_model(FakeStudent(), make_loader(make_items(n=1)), **kwargs)


def test_single_process_accelerator_gives_the_same_numbers():
    from accelerate import Accelerator

    student = FakeStudent().eval()
    loader = make_loader(make_items(n=5))
    with_acc = evaluate_model(student, loader, accelerator=Accelerator(cpu=True))
    without = evaluate_model(student, loader)
    assert with_acc["mean_iou"] == without["mean_iou"] and with_acc["ece"] == pytest.approx(without["ece"], abs=1e-15)
    assert with_acc["reliability"]["count"] == without["reliability"]["count"]


def test_format_and_parse_helpers():
    student = FakeStudent().eval()
    metrics = evaluate_model(student, make_loader(make_items(n=2)))
    table = format_metrics_table(metrics, {0: "sky", 1: "road", 2: "car", 3: "person"})
    assert table.splitlines()[0] == "| class | IoU (%) |"
    assert "| sky |" in table and "**mIoU**" in table and "ECE (10 bins)" in table
    assert parse_key_values(["num_val=3", "image_size=[32, 48]", "name=x"]) == {
        "num_val": 3, "image_size": [32, 48], "name": "x"}
    with pytest.raises(ValueError):
        parse_key_values(["novalue"])


# ------------------------------------------------------------------ two processes


def _two_process_worker(out_dir):
    """Runs in each of the 2 ranks: plain loader (own sharding) and an Accelerate-prepared padded loader."""
    import torch as _torch
    from accelerate import Accelerator
    _torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    _torch.manual_seed(0)
    student = FakeStudent(stride=2).eval()
    items = make_items(n=7, size=(8, 12))  # 7 samples, batch 2, 2 ranks: even_batches pads 1 sample
    loader = make_loader(items, batch_size=2)
    results = {
        "plain": evaluate_model(student, loader, accelerator=accelerator, flip=True),
        "prepared": evaluate_model(student, accelerator.prepare_data_loader(loader), accelerator=accelerator, flip=True),
        "mc": evaluate_model(student, loader, accelerator=accelerator, mc_samples=3),
        "world": accelerator.num_processes,
        # the 1-process reference, computed with this process's thread settings and weights
        "single": evaluate_model(student, make_loader(items, batch_size=2), flip=True),
    }
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(results))
    accelerator.wait_for_everyone()
    _torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process_despite_even_batches_padding(tmp_path, run_two_processes):
    run_two_processes(__file__, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == 2

    items = make_items(n=7, size=(8, 12))
    one = ranks[0]["single"]
    total_pixels = sum(int((it["labels"] != 255).sum()) for it in items)
    assert one["num_pixels"] == total_pixels
    for rank in ranks:
        for key in ("plain", "prepared"):
            got = rank[key]
            assert got["num_pixels"] == total_pixels, key  # no padded sample counted twice
            assert got["mean_iou"] == one["mean_iou"], key
            assert got["per_class_iou"] == pytest.approx(one["per_class_iou"], abs=0, nan_ok=True), key
            assert got["reliability"]["count"] == one["reliability"]["count"], key
            assert got["ece"] == pytest.approx(one["ece"], abs=1e-12), key
        assert rank["mc"]["num_pixels"] == total_pixels
    assert ranks[0]["mc"] == ranks[1]["mc"]  # every process returns the reduced result


# ------------------------------------------------------------------ run_evaluation


def _synthetic_student():
    from fotf_hf.data import build_dataset

    _, info = build_dataset("synthetic-streets", num_train=0, num_val=3, image_size=[32, 48])
    return FakeStudent(num_labels=info.num_labels, stride=4).eval(), info


def test_run_evaluation_writes_metrics_reliability_and_card(tmp_path, capsys):
    from huggingface_hub import ModelCard
    from PIL import Image

    student, info = _synthetic_student()
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"steps": 7, "final": {"mean_iou": 0.5}}))
    metrics = run_evaluation(student, "synthetic-streets", output_dir=out, flip=True, batch_size=2,
                             dataset_options={"num_train": 0, "num_val": 3, "image_size": [32, 48]})
    printed = capsys.readouterr().out
    assert "| sky |" in printed and "**mIoU**" in printed

    record = json.loads((out / "metrics.json").read_text())
    assert record["steps"] == 7 and record["final"] == {"mean_iou": 0.5}  # the training record is kept
    entry = record["evaluations"]["validation@native+flip"]
    assert entry["metrics"]["mean_iou"] == pytest.approx(metrics["mean_iou"])
    assert entry["settings"]["flip"] is True and entry["settings"]["num_images"] == 3
    with Image.open(out / "reliability.png") as im:
        assert im.format == "PNG" and im.size == (500, 600)
    card = ModelCard.load(out / "README.md")
    by_type = {r.metric_type: r for r in card.data.eval_results}
    assert by_type["mean_iou"].metric_value == pytest.approx(metrics["mean_iou"])
    assert by_type["ece"].metric_value == pytest.approx(metrics["ece"])
    assert by_type["ece"].dataset_type == "synthetic-streets" and by_type["ece"].dataset_split == "validation"
    assert "horizontal flip" in card.text

    # Another split and setting is added beside the first, not over it; the card lists both.
    test_metrics = run_evaluation(student, "synthetic-streets", output_dir=out, split="test", batch_size=2,
                                  eval_size=[24, 32], print_table=False,
                                  dataset_options={"num_train": 0, "num_val": 3, "num_test": 2, "image_size": [32, 48]})
    record = json.loads((out / "metrics.json").read_text())
    assert sorted(record["evaluations"]) == ["test@24x32", "validation@native+flip"]
    assert record["evaluations"]["validation@native+flip"]["metrics"]["mean_iou"] == pytest.approx(metrics["mean_iou"])
    assert record["evaluations"]["test@24x32"]["metrics"]["mean_iou"] == pytest.approx(test_metrics["mean_iou"])
    assert record["evaluations"]["test@24x32"]["settings"]["num_images"] == 2
    card = ModelCard.load(out / "README.md")
    assert "`test@24x32` | test | whole image resized to 24x32, single scale |" in card.text
    assert "`validation@native+flip` | validation | whole image at native resolution, single scale, + horizontal flip |" in card.text
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")]


def test_run_evaluation_refuses_a_class_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="classes"):
        run_evaluation(FakeStudent(num_labels=3), "synthetic-streets", output_dir=tmp_path,
                       dataset_options={"num_train": 0, "num_val": 1, "image_size": [32, 48]})


# ------------------------------------------------------------------ the real models


def _tiny_real_student(num_labels=5, **overrides):
    models = pytest.importorskip("fotf_hf.models")
    if not hasattr(models, "create_model"):
        pytest.skip("fotf_hf.models.create_model is not written yet")
    torch.manual_seed(0)
    return models.SegmentationAdapter(
        models.create_model("deeplabv3", "resnet18", num_labels=num_labels, backbone_base_width=8, head_channels=16,
                            **overrides)
    )


def test_real_student_flip_scales_mc_and_mode_restore():
    student = _tiny_real_student()
    student.train()
    items = make_items(n=3, size=(32, 48), num_labels=5)
    loader = make_loader(items)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    plain = evaluate_model(student, loader)
    fancy = evaluate_model(student, loader, flip=True, scales=(0.75, 1.0), mc_samples=3)
    for result in (plain, fancy):
        assert 0 <= result["mean_iou"] <= 1 and 0 <= result["ece"] <= 1
        assert result["num_pixels"] == sum(int((it["labels"] != 255).sum()) for it in items)
    assert student.training
    for key, value in student.state_dict().items():  # eval mode: BN running stats untouched
        assert torch.equal(value, before[key]), key


def test_real_student_mc_samples_every_dropout_site_also_under_autocast():
    """The MC passes are exact ones: DeepLabV3 without head dropout still samples its ASPP dropout (a
    head-only pass would have nothing to sample); under bf16 autocast the passes run in bf16 too."""
    student = _tiny_real_student(mc_dropout_p=0.0).eval()
    loader = make_loader(make_items(n=2, size=(32, 48), num_labels=5))
    deterministic = evaluate_model(student, loader)
    mc = evaluate_model(student, loader, mc_samples=3, generator=torch.Generator().manual_seed(0))
    again = evaluate_model(student, loader, mc_samples=3, generator=torch.Generator().manual_seed(0))
    # the generator fixes the masks
    assert (mc["mean_iou"], mc["ece"], mc["reliability"]["count"]) == (again["mean_iou"], again["ece"],
                                                                      again["reliability"]["count"])
    assert mc["num_pixels"] == deterministic["num_pixels"] and mc["ece"] != deterministic["ece"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = evaluate_model(student, loader, mc_samples=3, generator=torch.Generator().manual_seed(0))
    assert amp["num_pixels"] == mc["num_pixels"] and isinstance(amp["ece"], float) and 0 <= amp["ece"] <= 1
    assert amp["pixel_accuracy"] == pytest.approx(mc["pixel_accuracy"], abs=0.05)


def test_run_evaluation_from_a_saved_folder_uses_the_auto_classes(tmp_path):
    from fotf_hf.data import build_dataset

    _, info = build_dataset("synthetic-streets", num_train=0, num_val=2, image_size=[32, 48])
    student = _tiny_real_student(num_labels=info.num_labels)
    folder = tmp_path / "student"
    student.model.save_pretrained(folder)
    metrics = run_evaluation(str(folder), "synthetic-streets", batch_size=2, print_table=False,
                             dataset_options={"num_train": 0, "num_val": 2, "image_size": [32, 48]})
    for name in ("metrics.json", "reliability.png", "README.md", "config.json"):
        assert (folder / name).is_file(), name
    again = evaluate_model(student, make_loader_from_dataset(info, 2))
    assert metrics["mean_iou"] == pytest.approx(again["mean_iou"], abs=1e-6)


def make_loader_from_dataset(info, num_val):
    from fotf_hf.data import SegmentationTransform, build_dataset, create_dataloader

    datasets, _ = build_dataset("synthetic-streets", num_train=0, num_val=num_val, image_size=[32, 48])
    transform = SegmentationTransform(train=False, num_labels=info.num_labels)
    return create_dataloader(datasets["validation"].with_transform(transform), batch_size=2, train=False)


if __name__ == "__main__":  # one rank of the 2-process test above (started by torchrun)
    import sys

    _two_process_worker(sys.argv[1])
