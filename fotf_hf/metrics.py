"""Streaming segmentation metrics: mIoU, accuracies and expected calibration error (ECE).

`SegmentationMetrics` keeps only small accumulators, never per-pixel data:

- a `(C, C)` int64 confusion matrix (rows = ground truth, columns = prediction), filled with one
  fused `torch.bincount` of `label * C + prediction` per batch;
- for the ECE over max-softmax confidence, per equal-width bin: the pixel count (int64), the
  number of correct pixels (int64) and the sum of confidences (float64).

Sums of these tensors over batches or processes give exactly the dataset-level metrics, so a
multi-process evaluation reduces them by summation (`reduce`) instead of gathering predictions.

Definitions (pixels whose label is `ignore_index` are excluded from everything):

- `IoU_c = TP_c / (TP_c + FP_c + FN_c)`; NaN when class c occurs neither in the ground truth nor
  in the prediction.
- `mean_iou`: mean of the IoUs over classes that occur in the ground truth or the prediction (the
  NaN-excluding mean of `evaluate`'s `mean_iou` and mmsegmentation).
- `mean_iou_cirkd`: CIRKD's `SegmentationMetric` convention, `mean_c TP_c / (U_c + 2.22e-16)` over
  all C classes, so a class absent from both counts as 0. It equals `mean_iou` whenever every
  class occurs; on small or partial evaluation sets it is lower.
- `pixel_accuracy = sum_c TP_c / N`; `mean_accuracy`: mean over classes present in the ground
  truth of `TP_c / N_c` (N_c = pixels labelled c).
- `ece = sum_b n_b / N * |acc_b - conf_b|` (Guo et al. 2017) with confidence = max softmax
  probability, `bins` equal-width bins on [0, 1]. A pixel with confidence c goes to bin
  `min(floor(c * bins), bins - 1)`: bins are closed on the left, the last one also on the right
  (torchmetrics puts c == 1.0 exactly into an extra bin of its own; nothing else differs).
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Union

import torch
import torch.nn.functional as F

__all__ = [
    "SegmentationMetrics",
    "ACCUMULATORS",
    "CIRKD_EPS",
    "metrics_from_accumulators",
    "metric_module_path",
]

# CIRKD's `utils/score.py` adds numpy's machine epsilon to every union.
CIRKD_EPS = 2.220446049250313e-16

# Names of the accumulator tensors, in the order `state_tensors` returns them.
ACCUMULATORS = ("confusion_matrix", "bin_count", "bin_correct", "bin_conf_sum")


def metric_module_path(name: str = "mean_iou_ece") -> str:
    """Absolute path of one of the `evaluate` metric modules shipped in `fotf_hf/metrics_modules/`.

    Use it as `evaluate.load(metric_module_path())`; loading a local folder works offline.
    """
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics_modules")
    available = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, f"{d}.py")))
    if name not in available:
        raise ValueError(f"unknown metric module {name!r}; available: {available}")
    return os.path.join(root, name)


def metrics_from_accumulators(
    confusion_matrix: torch.Tensor,
    bin_count: torch.Tensor,
    bin_correct: torch.Tensor,
    bin_conf_sum: torch.Tensor,
) -> Dict[str, object]:
    """Dataset-level metrics from summed accumulators (see the module docstring for definitions).

    Args:
        confusion_matrix: `(C, C)` integer counts, rows = ground truth, columns = prediction.
        bin_count: `(bins,)` pixels per confidence bin.
        bin_correct: `(bins,)` correctly classified pixels per bin.
        bin_conf_sum: `(bins,)` sum of the max-softmax confidences per bin.

    Returns:
        dict of Python numbers and lists: `mean_iou`, `mean_iou_cirkd`, `per_class_iou` (NaN for
        classes absent from ground truth and prediction), `pixel_accuracy`, `mean_accuracy`,
        `per_class_accuracy` (NaN for classes absent from the ground truth), `ece`,
        `reliability` (`accuracy`, `confidence` (NaN for empty bins), `count`, `bin_edges`),
        `num_pixels`.
    """
    cm = confusion_matrix.detach().to("cpu", torch.float64)
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion_matrix must be square (C, C), got shape {tuple(cm.shape)}")
    count = bin_count.detach().to("cpu", torch.float64)
    correct = bin_correct.detach().to("cpu", torch.float64)
    conf_sum = bin_conf_sum.detach().to("cpu", torch.float64)
    if not (count.shape == correct.shape == conf_sum.shape and count.dim() == 1):
        raise ValueError(
            f"bin_count, bin_correct and bin_conf_sum must be 1-D of the same length, got "
            f"{tuple(count.shape)}, {tuple(correct.shape)}, {tuple(conf_sum.shape)}"
        )
    total = cm.sum()
    if total <= 0:
        raise ValueError("no labelled pixel was accumulated (every label was ignore_index, or no update ran)")

    tp = cm.diagonal()
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    n_bins = count.numel()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    return {
        "mean_iou": float(iou.nanmean()),
        "mean_iou_cirkd": float((tp / (union + CIRKD_EPS)).mean()),
        "per_class_iou": iou.tolist(),
        "pixel_accuracy": float(tp.sum() / total),
        "mean_accuracy": float(acc.nanmean()),
        "per_class_accuracy": acc.tolist(),
        "ece": float((correct - conf_sum).abs().sum() / count.sum().clamp_min(1)),
        "reliability": {
            "accuracy": torch.where(count > 0, correct / count.clamp_min(1), nan).tolist(),
            "confidence": torch.where(count > 0, conf_sum / count.clamp_min(1), nan).tolist(),
            "count": [int(c) for c in count.tolist()],
            "bin_edges": edges.tolist(),
        },
        "num_pixels": int(total),
    }


class SegmentationMetrics:
    """Streaming mIoU / accuracy / ECE for semantic segmentation, exact under data parallelism.

    Args:
        num_classes: C, number of classes (labels are in `[0, C)` or `ignore_index`).
        ignore_index: label value excluded from every metric (255 in this project).
        ece_bins: number of equal-width confidence bins for the ECE (the paper uses 10).
        align_corners: bilinear resize of logits/probabilities smaller than the labels (1/8 or
            1/4 resolution) to the label size before argmax/softmax. True follows CIRKD's
            evaluation (and its CE); transformers' SegFormer uses False. Both are "correct"; the
            choice shifts mIoU by a few hundredths of a point.
        device: where to create the accumulators; default: the device of the first batch.

    Usage::

        metrics = SegmentationMetrics(num_classes=19)
        for batch in loader:
            metrics.update(model(batch["pixel_values"]).logits, batch["labels"])
        metrics.reduce(accelerator)        # sum across processes (no-op with one process)
        results = metrics.compute()

    Accumulator dtypes: int64 counts (exact for any dataset size) and float64 confidence sums,
    so sums over processes equal the one-process sums up to float64 rounding of the order.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        ece_bins: int = 10,
        align_corners: bool = True,
        device: Optional[Union[str, torch.device]] = None,
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes = {num_classes!r} must be an integer >= 2")
        if isinstance(ece_bins, bool) or not isinstance(ece_bins, int) or ece_bins < 1:
            raise ValueError(f"ece_bins = {ece_bins!r} must be an integer >= 1")
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index = {ignore_index!r} must be an integer (255 in this project)")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index = {ignore_index} is a valid class id for num_classes = {num_classes}; "
                f"use a value outside [0, {num_classes}) such as 255"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.ece_bins = ece_bins
        self.align_corners = bool(align_corners)
        self.device = None if device is None else torch.device(device)
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget everything accumulated so far (also the "already reduced" mark)."""
        self.confusion_matrix: Optional[torch.Tensor] = None
        self.bin_count: Optional[torch.Tensor] = None
        self.bin_correct: Optional[torch.Tensor] = None
        self.bin_conf_sum: Optional[torch.Tensor] = None
        self._reduced = False

    def _init_state(self, device: torch.device) -> None:
        c, b = self.num_classes, self.ece_bins
        self.confusion_matrix = torch.zeros(c, c, dtype=torch.int64, device=device)
        self.bin_count = torch.zeros(b, dtype=torch.int64, device=device)
        self.bin_correct = torch.zeros(b, dtype=torch.int64, device=device)
        self.bin_conf_sum = torch.zeros(b, dtype=torch.float64, device=device)

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """The live accumulators by name (`ACCUMULATORS` order), created as zeros if no update ran.

        `confusion_matrix` `(C, C)` int64, `bin_count` `(bins,)` int64, `bin_correct` `(bins,)`
        int64, `bin_conf_sum` `(bins,)` float64. Summing these over disjoint data splits gives
        the accumulators of the union.
        """
        if self.confusion_matrix is None:
            self._init_state(self.device or torch.device("cpu"))
        return {name: getattr(self, name) for name in ACCUMULATORS}

    def load_state_tensors(self, state: Dict[str, torch.Tensor], add: bool = False) -> "SegmentationMetrics":
        """Set (or, with `add=True`, add) accumulators from a `state_tensors()`-like dict; returns self."""
        missing = [name for name in ACCUMULATORS if name not in state]
        if missing:
            raise ValueError(f"state is missing {missing}; expected keys {list(ACCUMULATORS)}")
        expected = {
            "confusion_matrix": (self.num_classes, self.num_classes),
            "bin_count": (self.ece_bins,),
            "bin_correct": (self.ece_bins,),
            "bin_conf_sum": (self.ece_bins,),
        }
        current = self.state_tensors()
        for name in ACCUMULATORS:
            value = torch.as_tensor(state[name])
            if tuple(value.shape) != expected[name]:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {expected[name]}")
            value = value.to(current[name].device, current[name].dtype)
            setattr(self, name, current[name] + value if add else value.clone())
        return self

    def reduce(self, accelerator_or_fn: Union[None, Callable[[torch.Tensor], torch.Tensor], object] = None) -> None:
        """Sum the accumulators across processes, in place. Call once, after the last `update`.

        Args:
            accelerator_or_fn: an `accelerate.Accelerator` (uses `accelerator.reduce(t, "sum")`),
                any callable `fn(tensor) -> summed tensor` (or None after an in-place sum), or
                None: `torch.distributed.all_reduce` when a process group is initialised, else
                nothing to do.

        Only the `C*C + 3*bins` accumulator numbers travel, never per-pixel data. Every process
        must call it (it is a collective), also one that saw no data.
        """
        if self._reduced:
            raise RuntimeError(
                "reduce() was already called since the last reset(); a second sum would count every "
                "other process's pixels again"
            )
        if self.confusion_matrix is None:
            device = getattr(accelerator_or_fn, "device", None) if accelerator_or_fn is not None else None
            self._init_state(torch.device(device) if device is not None else (self.device or torch.device("cpu")))
        if accelerator_or_fn is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                self._reduced = True
                return

            def fn(t):
                torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
                return t

        elif hasattr(accelerator_or_fn, "reduce") and hasattr(accelerator_or_fn, "num_processes"):
            accelerator = accelerator_or_fn

            def fn(t):
                return accelerator.reduce(t, reduction="sum")

        elif callable(accelerator_or_fn):
            fn = accelerator_or_fn
        else:
            raise TypeError(
                f"reduce() takes an accelerate.Accelerator, a callable or None, got {type(accelerator_or_fn).__name__}"
            )
        for name in ACCUMULATORS:
            tensor = getattr(self, name)
            out = fn(tensor)
            setattr(self, name, tensor if out is None else out)
        self._reduced = True

    # ------------------------------------------------------------------ update

    def _check_labels(self, labels: torch.Tensor) -> None:
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
        bad = ((labels < 0) | (labels >= self.num_classes)) & (labels != self.ignore_index)
        if bool(bad.any()):
            values = torch.unique(labels[bad])[:10].tolist()
            raise ValueError(
                f"labels contain {values} outside [0, {self.num_classes}) that are not ignore_index = "
                f"{self.ignore_index}; remap them at load time"
            )

    @torch.no_grad()
    def update(self, logits_or_probs: torch.Tensor, labels: torch.Tensor, is_probs: bool = False) -> None:
        """Accumulate one batch.

        Args:
            logits_or_probs: `(B, C, h, w)` class logits (`is_probs=False`) or class probabilities
                summing to 1 over C (`is_probs=True`, e.g. an MC-dropout predictive mean). Any
                float dtype (computed in fp32). Resized to the label size `(H, W)` (bilinear,
                `align_corners` as in the constructor) when smaller or larger.
            labels: `(B, H, W)` int64 class ids, `ignore_index` for unlabelled pixels.
            is_probs: see above. Confidences are the max probability (max softmax for logits).
        """
        if self._reduced:
            raise RuntimeError("update() after reduce(): call reset() first to start a new evaluation")
        if logits_or_probs.dim() != 4:
            raise ValueError(f"logits_or_probs must be (B, C, h, w), got shape {tuple(logits_or_probs.shape)}")
        if labels.dim() != 3:
            raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
        b, c = logits_or_probs.shape[:2]
        if c != self.num_classes:
            raise ValueError(f"logits_or_probs has {c} classes (dim 1), expected num_classes = {self.num_classes}")
        if labels.shape[0] != b:
            raise ValueError(f"batch sizes differ: logits_or_probs {b}, labels {labels.shape[0]}")
        if not logits_or_probs.dtype.is_floating_point:
            raise ValueError(f"logits_or_probs must be floating point, got dtype {logits_or_probs.dtype}")
        labels = labels.to(logits_or_probs.device)
        self._check_labels(labels)
        if self.confusion_matrix is None:
            self._init_state(self.device or logits_or_probs.device)

        x = logits_or_probs.detach()
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if x.shape[-2:] != labels.shape[-2:]:
                x = F.interpolate(x, size=labels.shape[-2:], mode="bilinear", align_corners=self.align_corners)
            if is_probs:
                conf, pred = x.max(dim=1)
            else:
                # max softmax = 1 / sum_c exp(x_c - max): one exp pass, no normalised copy.
                top, pred = x.max(dim=1)
                conf = (x - top.unsqueeze(1)).exp_().sum(dim=1).reciprocal_()

        num_c, bins = self.num_classes, self.ece_bins
        valid = labels != self.ignore_index
        lab = labels[valid]
        pred = pred[valid]
        # Binning in float64 so that c * bins never rounds across a bin edge.
        conf = conf[valid].double()
        cm = torch.bincount(lab * num_c + pred, minlength=num_c * num_c).view(num_c, num_c)
        bin_idx = (conf * bins).long().clamp_(0, bins - 1)
        correct = (pred == lab).long()
        # One bincount gives both the per-bin count (sum over correct in {0, 1}) and the hits.
        hits = torch.bincount(bin_idx * 2 + correct, minlength=2 * bins).view(bins, 2)
        conf_sum = torch.bincount(bin_idx, weights=conf, minlength=bins)

        dev = self.confusion_matrix.device
        self.confusion_matrix += cm.to(dev)
        self.bin_count += hits.sum(1).to(dev)
        self.bin_correct += hits[:, 1].to(dev)
        self.bin_conf_sum += conf_sum.to(dev)

    @torch.no_grad()
    def update_predictions(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate hard predictions `(B, H, W)` (int64) only: IoU/accuracy, no ECE contribution.

        Meant for predictions that have no confidence (e.g. loaded PNGs). Mixing this with
        `update` makes the ECE cover a subset of the pixels of the IoU.
        """
        if self._reduced:
            raise RuntimeError("update_predictions() after reduce(): call reset() first")
        if preds.shape != labels.shape or preds.dim() != 3:
            raise ValueError(f"preds and labels must both be (B, H, W), got {tuple(preds.shape)} and {tuple(labels.shape)}")
        labels = labels.to(preds.device)
        self._check_labels(labels)
        valid = labels != self.ignore_index
        pred = preds[valid].long()
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= self.num_classes):
            raise ValueError(f"preds must be class ids in [0, {self.num_classes})")
        if self.confusion_matrix is None:
            self._init_state(self.device or preds.device)
        num_c = self.num_classes
        cm = torch.bincount(labels[valid] * num_c + pred, minlength=num_c * num_c).view(num_c, num_c)
        self.confusion_matrix += cm.to(self.confusion_matrix.device)

    # ------------------------------------------------------------------ results

    def compute(self) -> Dict[str, object]:
        """Metrics of everything accumulated (after `reduce` in multi-process runs).

        Returns:
            `metrics_from_accumulators` of the current state: `mean_iou`, `mean_iou_cirkd`,
            `per_class_iou` (list of C, NaN for absent classes), `pixel_accuracy`,
            `mean_accuracy`, `per_class_accuracy`, `ece`, `reliability` (per-bin `accuracy`,
            `confidence`, `count`, `bin_edges`), `num_pixels`. All Python numbers/lists.
        """
        return metrics_from_accumulators(**self.state_tensors())

    def to_evaluate_inputs(self) -> Dict[str, list]:
        """The accumulators as plain lists, for `evaluate.load(metric_module_path()).add(**inputs)`."""
        return {name: tensor.tolist() for name, tensor in self.state_tensors().items()}

    def __repr__(self) -> str:
        pixels = 0 if self.confusion_matrix is None else int(self.confusion_matrix.sum())
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"ece_bins={self.ece_bins}, align_corners={self.align_corners}, pixels={pixels}, reduced={self._reduced})"
        )
