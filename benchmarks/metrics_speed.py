#!/usr/bin/env python
"""Update + compute time of `SegmentationMetrics` against torchmetrics on the same batches, in one run.

torchmetrics side: `MulticlassJaccardIndex(average=None, ignore_index=255)` +
`MulticlassCalibrationError(n_bins=10, norm="l1", ignore_index=255)`, both fed the raw logits
(torchmetrics takes the argmax, and the softmax for calibration, itself). Our side:
`SegmentationMetrics(num_classes, ece_bins=10)` fed the same logits. Both give per-class IoU,
mIoU and the ECE over the same pixels.

Data: --batches batches of `(B, C, H, W)` fp32 logits (default 20 x 2 x 19 x 256 x 512) and int64
labels with ~10% ignore (255) pixels, generated once from a fixed seed, logits at label resolution
(no resize on either side). Timing: --repeats rounds; each round times a full pass (fresh
metric objects, update over all batches, compute) of both implementations, in alternating order;
the reported times are the medians over rounds and the speedup is the median of the per-round
ratios (robust to the load drift of a shared machine).

Prints ONE JSON object:
    {"machine": ..., "ours_s": t, "torchmetrics_s": t, "speedup": median over rounds of torchmetrics / ours,
     "max_abs_diff": {"miou": d, "ece": d},                      # ours vs torchmetrics
     "abs_diff_to_fp64_reference": {"ours": {...}, "torchmetrics": {...}}, "settings": {...}}

The fp64 reference (softmax, binning and sums in float64, untimed) says which side a
disagreement comes from: torchmetrics accumulates its calibration bins in float32.

    python benchmarks/metrics_speed.py [--repeats 7] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fotf_hf.training.precision import describe_host  # noqa: E402


def make_batches(num_batches: int, batch_size: int, num_classes: int, height: int, width: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(num_batches):
        # Scaled logits so the confidences spread over all ECE bins instead of piling up near 1/C.
        logits = torch.randn(batch_size, num_classes, height, width, generator=g) * 3.0
        labels = torch.randint(0, num_classes, (batch_size, height, width), generator=g)
        labels[torch.rand(batch_size, height, width, generator=g) < 0.1] = 255
        batches.append((logits, labels))
    return batches


def run_ours(batches, num_classes: int):
    from fotf_hf.metrics import SegmentationMetrics

    metrics = SegmentationMetrics(num_classes, ignore_index=255, ece_bins=10)
    for logits, labels in batches:
        metrics.update(logits, labels)
    result = metrics.compute()
    return result["mean_iou"], result["ece"]


def run_torchmetrics(batches, num_classes: int):
    from torchmetrics.classification import MulticlassCalibrationError, MulticlassJaccardIndex

    jaccard = MulticlassJaccardIndex(num_classes=num_classes, average=None, ignore_index=255)
    calibration = MulticlassCalibrationError(num_classes=num_classes, n_bins=10, norm="l1", ignore_index=255)
    for logits, labels in batches:
        jaccard.update(logits, labels)
        calibration.update(logits, labels)
    per_class = jaccard.compute()
    return float(per_class.double().mean()), float(calibration.compute())


def run_fp64_reference(batches, num_classes: int, bins: int = 10):
    """The definitions evaluated in float64 end to end (softmax included): the yardstick for both."""
    cm = torch.zeros(num_classes * num_classes, dtype=torch.float64)
    count = torch.zeros(bins, dtype=torch.float64)
    correct = torch.zeros(bins, dtype=torch.float64)
    conf_sum = torch.zeros(bins, dtype=torch.float64)
    for logits, labels in batches:
        conf, pred = torch.softmax(logits.double(), dim=1).max(dim=1)
        valid = labels != 255
        lab, pred, conf = labels[valid], pred[valid], conf[valid]
        cm += torch.bincount(lab * num_classes + pred, minlength=num_classes**2).double()
        idx = (conf * bins).long().clamp(max=bins - 1)
        count += torch.bincount(idx, minlength=bins).double()
        correct += torch.bincount(idx, weights=(pred == lab).double(), minlength=bins)
        conf_sum += torch.bincount(idx, weights=conf, minlength=bins)
    cm = cm.view(num_classes, num_classes)
    tp = cm.diagonal()
    iou = tp / (cm.sum(0) + cm.sum(1) - tp)
    return float(iou.nanmean()), float((correct - conf_sum).abs().sum() / count.sum())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_classes", type=int, default=19)
    parser.add_argument("--size", type=int, nargs=2, default=[256, 512], metavar=("H", "W"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="3 batches of 64 x 128, 2 repeats (smoke test)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.size, args.repeats = 3, [64, 128], 2

    batches = make_batches(args.batches, args.batch_size, args.num_classes, *args.size)
    runners = {"ours": run_ours, "torchmetrics": run_torchmetrics}
    results = {name: fn(batches[:1], args.num_classes) for name, fn in runners.items()}  # warm-up
    times = {name: [] for name in runners}
    for rnd in range(args.repeats):
        order = list(runners) if rnd % 2 == 0 else list(reversed(list(runners)))
        for name in order:
            start = time.perf_counter()
            results[name] = runners[name](batches, args.num_classes)
            times[name].append(time.perf_counter() - start)
    ours_s = statistics.median(times["ours"])
    theirs_s = statistics.median(times["torchmetrics"])
    # Per-round ratios cancel load drift on a shared machine (both sides of a round see the same load).
    speedup = statistics.median(t / o for t, o in zip(times["torchmetrics"], times["ours"]))
    (our_miou, our_ece), (tm_miou, tm_ece) = results["ours"], results["torchmetrics"]
    ref_miou, ref_ece = run_fp64_reference(batches, args.num_classes)
    print(json.dumps({
        "machine": describe_host(),
        "ours_s": round(ours_s, 4),
        "torchmetrics_s": round(theirs_s, 4),
        "speedup": round(speedup, 2),
        "max_abs_diff": {"miou": abs(our_miou - tm_miou), "ece": abs(our_ece - tm_ece)},
        "abs_diff_to_fp64_reference": {
            "ours": {"miou": abs(our_miou - ref_miou), "ece": abs(our_ece - ref_ece)},
            "torchmetrics": {"miou": abs(tm_miou - ref_miou), "ece": abs(tm_ece - ref_ece)},
        },
        "settings": {"batches": args.batches, "batch_size": args.batch_size, "num_classes": args.num_classes,
                     "size": args.size, "ignore_fraction": 0.1, "repeats": args.repeats,
                     "times_s": {k: [round(t, 4) for t in v] for k, v in times.items()}},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
