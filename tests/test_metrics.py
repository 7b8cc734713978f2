"""SegmentationMetrics and the `mean_iou_ece` evaluate module against independent references.

References: hand-computed tiny cases, a per-pixel Python/NumPy loop, and torchmetrics'
`MulticlassJaccardIndex` / `MulticlassCalibrationError` on random data and on real CamVid labels.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fotf_hf.metrics import ACCUMULATORS, SegmentationMetrics, metric_module_path

IGNORE = 255


def _random_batch(b=2, c=5, h=16, w=20, ignore_frac=0.2, scale=2.0, gen=None):
    logits = torch.randn(b, c, h, w, generator=gen) * scale
    labels = torch.randint(0, c, (b, h, w), generator=gen)
    labels[torch.rand(b, h, w, generator=gen) < ignore_frac] = IGNORE
    return logits, labels


def _loop_reference(logits, labels, num_classes, bins=10):
    """Per-pixel Python loop: confusion matrix, ECE bins (bin = min(floor(conf*bins), bins-1))."""
    probs = torch.softmax(logits.double(), dim=1).numpy()
    lab = labels.numpy()
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    count = np.zeros(bins)
    correct = np.zeros(bins)
    conf_sum = np.zeros(bins)
    for b in range(lab.shape[0]):
        for i in range(lab.shape[1]):
            for j in range(lab.shape[2]):
                y = lab[b, i, j]
                if y == IGNORE:
                    continue
                p = probs[b, :, i, j]
                k = int(np.argmax(p))
                cm[y, k] += 1
                idx = min(int(math.floor(p[k] * bins)), bins - 1)
                count[idx] += 1
                correct[idx] += k == y
                conf_sum[idx] += p[k]
    return cm, count, correct, conf_sum


def _torchmetrics(logits, labels, num_classes, bins=10):
    from torchmetrics.classification import MulticlassCalibrationError, MulticlassJaccardIndex

    jac = MulticlassJaccardIndex(num_classes=num_classes, average=None, ignore_index=IGNORE)
    ece = MulticlassCalibrationError(num_classes=num_classes, n_bins=bins, norm="l1", ignore_index=IGNORE)
    jac.update(logits, labels)
    ece.update(logits, labels)
    return jac.compute().double(), float(ece.compute())


# --------------------------------------------------------------------------- hand-computed


def test_tiny_case_by_hand():
    # 1 image, 2 x 3 pixels, 3 classes. Logits chosen so that the confidences are known:
    # a logit vector (L, 0, 0) has max softmax e^L / (e^L + 2).
    labels = torch.tensor([[[0, 0, 1], [1, 2, IGNORE]]])
    pred_cls = [[0, 1, 1], [1, 1, 0]]
    big = [[math.log(8.0), math.log(2.0), math.log(8.0)], [math.log(2.0), math.log(8.0), 0.0]]
    logits = torch.zeros(1, 3, 2, 3)
    for i in range(2):
        for j in range(3):
            logits[0, pred_cls[i][j], i, j] = big[i][j]
    m = SegmentationMetrics(num_classes=3, ece_bins=10)
    m.update(logits, labels)
    out = m.compute()
    # Confusion (rows gt): class0: pred 0,1 ; class1: pred 1,1 ; class2: pred 1. (ignored pixel dropped)
    # IoU0 = 1/(2+0-1+...): TP0=1, gt0=2, pred0=1 -> U=2 -> 0.5
    # IoU1: TP1=2, gt1=2, pred1=4 -> U=4 -> 0.5 ; IoU2: TP2=0, gt2=1, pred2=0 -> 0
    assert out["per_class_iou"] == pytest.approx([0.5, 0.5, 0.0])
    assert out["mean_iou"] == pytest.approx(1 / 3)
    assert out["pixel_accuracy"] == pytest.approx(3 / 5)
    assert out["mean_accuracy"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert out["num_pixels"] == 5
    # Confidences: L=log 8 -> 0.8 (bin 8), L=log 2 -> 0.5 (bin 5).
    # Pixels (conf, correct): (0.8,1) (0.5,0) (0.8,1) (0.5,1) (0.8,0)
    # bin 5: n=2, acc=0.5, conf=0.5 -> 0 ; bin 8: n=3, acc=2/3, conf=0.8 -> |0.6667-0.8| * 3/5
    assert out["ece"] == pytest.approx(abs(2 / 3 - 0.8) * 3 / 5)
    rel = out["reliability"]
    assert rel["count"] == [0, 0, 0, 0, 0, 2, 0, 0, 3, 0]
    assert rel["accuracy"][8] == pytest.approx(2 / 3)
    assert rel["confidence"][5] == pytest.approx(0.5)
    assert math.isnan(rel["accuracy"][0]) and math.isnan(rel["confidence"][9])


def test_absent_class_is_nan_and_cirkd_counts_it_as_zero():
    labels = torch.tensor([[[0, 0], [1, 1]]])
    logits = F.one_hot(torch.tensor([[[0, 1], [1, 1]]]), 4).permute(0, 3, 1, 2).float() * 5
    m = SegmentationMetrics(num_classes=4)
    m.update(logits, labels)
    out = m.compute()
    # IoU0 = 1/2, IoU1 = 2/3, classes 2 and 3 occur nowhere.
    assert out["per_class_iou"][:2] == pytest.approx([0.5, 2 / 3])
    assert math.isnan(out["per_class_iou"][2]) and math.isnan(out["per_class_iou"][3])
    assert out["mean_iou"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert out["mean_iou_cirkd"] == pytest.approx((0.5 + 2 / 3) / 4)
    assert math.isnan(out["per_class_accuracy"][3])


def test_confidence_one_lands_in_last_bin():
    # Logit gap of 200: the fp32 max softmax is exactly 1.0.
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 0] = 200.0
    labels = torch.tensor([[[0, 1]]])
    m = SegmentationMetrics(num_classes=2, ece_bins=4)
    m.update(logits, labels)
    out = m.compute()
    assert out["reliability"]["count"] == [0, 0, 0, 2]
    assert out["ece"] == pytest.approx(0.5)  # acc 1/2, conf 1


def test_probabilities_input_uses_max_probability():
    probs = torch.tensor([[0.7, 0.2], [0.3, 0.8]]).view(1, 2, 1, 2)  # pixel 0: class 0 @0.7, pixel 1: class 1 @0.8
    labels = torch.tensor([[[0, 0]]])
    m = SegmentationMetrics(num_classes=2, ece_bins=10)
    m.update(probs, labels, is_probs=True)
    out = m.compute()
    # bin 7: conf .7 correct ; bin 8: conf .8 wrong -> ECE = (0.3 + 0.8) / 2
    assert out["ece"] == pytest.approx((0.3 + 0.8) / 2)
    assert out["pixel_accuracy"] == pytest.approx(0.5)


# --------------------------------------------------------------------------- references


def test_matches_python_loop_reference():
    gen = torch.Generator().manual_seed(1)
    m = SegmentationMetrics(num_classes=4, ece_bins=10)
    cms, counts, corrects, confs = [], [], [], []
    for _ in range(2):
        logits, labels = _random_batch(b=2, c=4, h=6, w=7, gen=gen)
        m.update(logits, labels)
        ref = _loop_reference(logits, labels, 4)
        cms.append(ref[0]), counts.append(ref[1]), corrects.append(ref[2]), confs.append(ref[3])
    state = m.state_tensors()
    np.testing.assert_array_equal(state["confusion_matrix"].numpy(), sum(cms))
    np.testing.assert_array_equal(state["bin_count"].numpy(), sum(counts))
    np.testing.assert_array_equal(state["bin_correct"].numpy(), sum(corrects))
    np.testing.assert_allclose(state["bin_conf_sum"].numpy(), sum(confs), rtol=1e-6)
    assert state["confusion_matrix"].dtype == torch.int64 and state["bin_conf_sum"].dtype == torch.float64


@pytest.mark.parametrize("num_classes", [2, 7, 19])
def test_matches_torchmetrics_on_random_data(num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    m = SegmentationMetrics(num_classes=num_classes)
    all_logits, all_labels = [], []
    for _ in range(3):
        logits, labels = _random_batch(b=2, c=num_classes, h=24, w=32, gen=gen)
        m.update(logits, labels)
        all_logits.append(logits), all_labels.append(labels)
    out = m.compute()
    iou_ref, ece_ref = _torchmetrics(torch.cat(all_logits), torch.cat(all_labels), num_classes)
    np.testing.assert_allclose(out["per_class_iou"], iou_ref.numpy(), atol=1e-6)
    assert out["mean_iou"] == pytest.approx(float(iou_ref.mean()), abs=1e-6)
    assert out["ece"] == pytest.approx(ece_ref, abs=1e-6)


def test_low_resolution_logits_are_upsampled_with_align_corners_true():
    gen = torch.Generator().manual_seed(3)
    small = torch.randn(2, 6, 8, 10, generator=gen) * 3
    labels = torch.randint(0, 6, (2, 64, 80), generator=gen)
    labels[:, :5] = IGNORE
    m = SegmentationMetrics(num_classes=6)
    m.update(small, labels)
    up = F.interpolate(small, size=(64, 80), mode="bilinear", align_corners=True)
    iou_ref, ece_ref = _torchmetrics(up, labels, 6)
    out = m.compute()
    np.testing.assert_allclose(out["per_class_iou"], iou_ref.numpy(), atol=1e-6)
    assert out["ece"] == pytest.approx(ece_ref, abs=1e-6)
    # align_corners=False gives a (slightly) different result: the option is honoured.
    m2 = SegmentationMetrics(num_classes=6, align_corners=False)
    m2.update(small, labels)
    up2 = F.interpolate(small, size=(64, 80), mode="bilinear", align_corners=False)
    assert m2.compute()["ece"] == pytest.approx(_torchmetrics(up2, labels, 6)[1], abs=1e-6)


def test_bf16_logits_are_accepted_and_computed_in_fp32():
    gen = torch.Generator().manual_seed(4)
    logits, labels = _random_batch(c=3, gen=gen)
    m = SegmentationMetrics(num_classes=3)
    m.update(logits.bfloat16(), labels)
    iou_ref, ece_ref = _torchmetrics(logits.bfloat16().float(), labels, 3)
    out = m.compute()
    np.testing.assert_allclose(out["per_class_iou"], iou_ref.numpy(), atol=1e-6)
    assert out["ece"] == pytest.approx(ece_ref, abs=1e-6)


def test_real_camvid_labels_with_noisy_predictions(camvid_root):
    from PIL import Image

    names = sorted((camvid_root / "valannot").glob("*.png"))[:3]
    labels = torch.stack([torch.from_numpy(np.array(Image.open(p), dtype=np.int64)) for p in names])
    labels[labels == 11] = IGNORE  # CamVid's void class
    labels = labels[:, ::2, ::2].contiguous()  # 180 x 240 keeps the test fast
    num_classes = 11
    gen = torch.Generator().manual_seed(5)
    # Predictions = ground truth with 30% of the pixels flipped to random classes, as noisy logits.
    noisy = labels.clone()
    flip = torch.rand(noisy.shape, generator=gen) < 0.3
    noisy[flip] = torch.randint(0, num_classes, (int(flip.sum()),), generator=gen)
    noisy[noisy == IGNORE] = 0
    logits = F.one_hot(noisy, num_classes).permute(0, 3, 1, 2).float() * 2.5
    logits += torch.randn(logits.shape, generator=gen)
    m = SegmentationMetrics(num_classes=num_classes)
    for i in range(len(names)):
        m.update(logits[i : i + 1], labels[i : i + 1])
    out = m.compute()
    iou_ref, ece_ref = _torchmetrics(logits, labels, num_classes)
    present = [c for c in range(num_classes) if not math.isnan(out["per_class_iou"][c])]
    assert len(present) >= 8
    np.testing.assert_allclose([out["per_class_iou"][c] for c in present], iou_ref[present].numpy(), atol=1e-6)
    assert out["ece"] == pytest.approx(ece_ref, abs=1e-6)
    assert out["num_pixels"] == int((labels != IGNORE).sum())


# --------------------------------------------------------------------------- reduction / state


def test_sum_of_split_states_equals_whole():
    gen = torch.Generator().manual_seed(6)
    batches = [_random_batch(c=5, gen=gen) for _ in range(4)]
    whole = SegmentationMetrics(num_classes=5)
    parts = [SegmentationMetrics(num_classes=5), SegmentationMetrics(num_classes=5)]
    for i, (logits, labels) in enumerate(batches):
        whole.update(logits, labels)
        parts[i % 2].update(logits, labels)
    # A fake "all-reduce" that adds the other shard's accumulators.
    other = parts[1].state_tensors()
    parts[0].reduce(lambda t: t + next(v for k, v in other.items() if parts[0].state_tensors()[k] is t))
    for name in ACCUMULATORS:
        torch.testing.assert_close(parts[0].state_tensors()[name], whole.state_tensors()[name], rtol=1e-12, atol=0)
    assert parts[0].compute()["mean_iou"] == whole.compute()["mean_iou"]
    merged = SegmentationMetrics(num_classes=5).load_state_tensors(parts[1].state_tensors())
    merged.load_state_tensors(SegmentationMetrics(num_classes=5).state_tensors(), add=True)
    assert merged.compute()["num_pixels"] == parts[1].compute()["num_pixels"]


def test_reduce_without_process_group_is_identity_and_guards_double_use():
    logits, labels = _random_batch(c=3)
    m = SegmentationMetrics(num_classes=3)
    m.update(logits, labels)
    before = {k: v.clone() for k, v in m.state_tensors().items()}
    m.reduce()
    for name in ACCUMULATORS:
        assert torch.equal(m.state_tensors()[name], before[name])
    with pytest.raises(RuntimeError, match="already called"):
        m.reduce()
    with pytest.raises(RuntimeError, match="reset"):
        m.update(logits, labels)
    m.reset()
    m.update(logits, labels)
    with pytest.raises(TypeError, match="Accelerator"):
        m.reduce(42)


def test_reduce_with_single_process_accelerator():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    logits, labels = _random_batch(c=3)
    m = SegmentationMetrics(num_classes=3)
    m.update(logits, labels)
    ref = m.compute()
    m.reduce(acc)
    out = m.compute()
    _reset_accelerate_state()
    assert out["mean_iou"] == ref["mean_iou"] and out["ece"] == ref["ece"]


def _reset_accelerate_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _two_process_metrics_worker():
    from accelerate import Accelerator

    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    gen = torch.Generator().manual_seed(11)
    batches = [_random_batch(c=4, h=12, w=12, gen=gen) for _ in range(5)]
    m = SegmentationMetrics(num_classes=4)
    for logits, labels in batches[acc.process_index :: acc.num_processes]:
        m.update(logits, labels)
    m.reduce(acc)
    ref = SegmentationMetrics(num_classes=4)
    for logits, labels in batches:
        ref.update(logits, labels)
    for name in ACCUMULATORS:
        torch.testing.assert_close(m.state_tensors()[name], ref.state_tensors()[name], rtol=1e-12, atol=0)
    assert acc.num_processes == 2
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_reduce_equals_one_process(run_two_processes):
    run_two_processes(__file__)


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors():
    m = SegmentationMetrics(num_classes=3)
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="3 classes.*expected num_classes = 4"):
        SegmentationMetrics(num_classes=4).update(logits, labels)
    bad = labels.clone()
    bad[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\].*ignore_index = 255"):
        m.update(logits, bad)
    with pytest.raises(ValueError, match="integer tensor"):
        m.update(logits, labels.float())
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        m.update(logits, labels[0])
    with pytest.raises(ValueError, match="batch sizes differ"):
        m.update(logits, torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index = 1 is a valid class id"):
        SegmentationMetrics(num_classes=3, ignore_index=1)
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(num_classes=1)
    with pytest.raises(ValueError, match="ece_bins"):
        SegmentationMetrics(num_classes=3, ece_bins=0)
    with pytest.raises(ValueError, match="no labelled pixel"):
        m.update(logits, torch.full((1, 4, 4), IGNORE))
        m.compute()
    with pytest.raises(ValueError, match="unknown metric module 'nope'.*mean_iou_ece"):
        metric_module_path("nope")


def test_update_predictions_counts_iou_only():
    labels = torch.tensor([[[0, 1], [1, IGNORE]]])
    preds = torch.tensor([[[0, 0], [1, 1]]])
    m = SegmentationMetrics(num_classes=2)
    m.update_predictions(preds, labels)
    out = m.compute()
    assert out["per_class_iou"] == pytest.approx([0.5, 0.5])
    assert out["reliability"]["count"] == [0] * 10


# --------------------------------------------------------------------------- evaluate module


def test_evaluate_module_loads_offline_and_agrees(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    metric = evaluate.load(metric_module_path("mean_iou_ece"), keep_in_memory=True)
    gen = torch.Generator().manual_seed(8)
    whole = SegmentationMetrics(num_classes=6)
    for _ in range(3):
        logits, labels = _random_batch(c=6, gen=gen)
        part = SegmentationMetrics(num_classes=6)
        part.update(logits, labels)
        whole.update(logits, labels)
        metric.add(**part.to_evaluate_inputs())
    out = metric.compute()
    ref = whole.compute()
    for key in ("mean_iou", "mean_iou_cirkd", "pixel_accuracy", "mean_accuracy", "ece", "num_pixels"):
        assert out[key] == pytest.approx(ref[key], rel=1e-12), key
    np.testing.assert_allclose(out["per_class_iou"], ref["per_class_iou"], rtol=1e-12)
    assert out["bin_count"] == ref["reliability"]["count"]


def test_evaluate_module_hand_example(tmp_path, monkeypatch):
    import evaluate

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    metric = evaluate.load(metric_module_path(), keep_in_memory=True)
    out = metric.compute(
        confusion_matrix=[[[3, 1], [0, 4]], [[1, 0], [0, 0]]],
        bin_count=[[0, 8], [0, 1]],
        bin_correct=[[0, 7], [0, 1]],
        bin_conf_sum=[[0.0, 7.2], [0.0, 0.5]],
    )
    # Summed: [[4, 1], [0, 4]] -> IoU 4/5, 4/5; ECE = |8 - 7.7| / 9
    assert out["per_class_iou"] == pytest.approx([0.8, 0.8])
    assert out["ece"] == pytest.approx(0.3 / 9)
    assert out["num_pixels"] == 9


if __name__ == "__main__":  # each rank of test_two_process_reduce_equals_one_process (started by torchrun)
    _two_process_metrics_worker()
