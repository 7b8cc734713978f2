"""Streaming segmentation metrics: mIoU, accuracies, calibration (ECE) and uncertainty quality.

`SegmentationMetrics` keeps only small accumulators, never per-pixel data:

- a `(C, C)` int64 confusion matrix (rows = ground truth, columns = prediction), filled with one
  fused `torch.bincount` of `label * C + prediction` per batch;
- for the ECE over max-softmax confidence, per equal-width bin: the pixel count (int64), the
  number of correct pixels (int64) and the sum of confidences (float64);
- float64 sums of the per-pixel NLL and Brier score (`nll_sum`, `brier_sum`, 0-d);
- two `(K, 2)` int64 histograms of an uncertainty score (column 0: correctly classified pixels,
  column 1: misclassified ones) over K = `uncertainty_bins` equal-width bins: `msp_hist` for
  u = 1 - max softmax probability on [0, 1], and `sigma_hist` for the optional per-pixel score
  passed as `update(..., uncertainty=...)` (e.g. MC-dropout sigma) on [0, `uncertainty_max`].

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

Uncertainty metrics (in the spirit of TorchUncertainty's segmentation metrics), over the pixels
accumulated with `update` (those of `update_predictions` have no probabilities and are left out;
with no such pixel at all the values are NaN):

- `nll`: mean of `-log p_y` (nats), p = softmax of the logits (log-sum-exp in fp32, summed in
  float64) or the given probabilities, clamped to >= `float32.tiny` (so at most 87.3 nats a pixel).
- `brier`: mean of `sum_c (p_c - [c == y])^2` (in [0, 2]).
- `auroc_msp`: AUROC of u = 1 - max p as a detector of the model's own errors (positive = the
  argmax is not the label); 0.5 = uninformative. NaN when there is no error or no correct pixel.
- `aurc_msp`: area under the risk-coverage curve, pixels sorted by confidence, most confident
  first: `(1/N) sum_{k=1..N} e_k / k`, e_k = errors among the k most confident pixels (the mean
  of the risk over the coverages k/N; lower is better; a random ranking gives the error rate).
- `auroc_sigma`, `aurc_sigma`: the same for the score given as `uncertainty` (higher = less
  sure); None when no update passed one. If only some updates did, they cover those pixels only.

Binning. AUROC and AURC are computed exactly for the *binned* score b = min(floor(u / u_max * K),
K - 1) (u_max = 1 for MSP, `uncertainty_max` for the extra score; values below 0 go to bin 0,
values above u_max to the last bin). Pixels in the same bin are ties: AUROC counts a tied
(error, correct) pair as 1/2 (Mann-Whitney, as `sklearn.metrics.roc_auc_score` does on the
binned score), and AURC is the expectation over a uniformly random order within each bin. Both
are thus the unbinned metric averaged over random orders of the pixels within each bin, so the
binning can only move them through pixels that share a bin. With w_b, c_b the errors and correct pixels of
bin b (W, C their totals, N = W + C, M_b the pixels in lower bins, H the harmonic numbers):

    |AUROC_binned - AUROC| <= sum_b w_b c_b / (2 W C)
    |AURC_binned - AURC|   <= (1/N) sum_b min(w_b, c_b) (H(M_b + n_b) - H(M_b))

(both computable from the histograms). With K = 10 000 bins of width 1e-4 this is ~1e-4 on
scores that spread over the range (tested), but it grows when most pixels pile into one bin,
e.g. a very over-confident model whose u < 1e-4 for most pixels: raise `uncertainty_bins` then.
The histograms are integer counts, so AUROC/AURC are bit-identical however the data are split
across processes; `nll_sum`/`brier_sum` differ only by float64 summation order.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "SegmentationMetrics",
    "ACCUMULATORS",
    "CIRKD_EPS",
    "EVALUATE_INPUTS",
    "binned_auroc_aurc",
    "metrics_from_accumulators",
    "metric_module_path",
    "UNCERTAINTY_ROWS",
]

# CIRKD's `utils/score.py` adds numpy's machine epsilon to every union.
CIRKD_EPS = 2.220446049250313e-16

# Names of the accumulator tensors, in the order `state_tensors` returns them.
ACCUMULATORS = (
    "confusion_matrix", "bin_count", "bin_correct", "bin_conf_sum",
    "nll_sum", "brier_sum", "msp_hist", "sigma_hist",
)
# The ones the `mean_iou_ece` evaluate module takes (`to_evaluate_inputs`).
EVALUATE_INPUTS = ACCUMULATORS[:4]


def metric_module_path(name: str = "mean_iou_ece") -> str:
    """Absolute path of one of the `evaluate` metric modules shipped in `fotf_hf/metrics_modules/`.

    Use it as `evaluate.load(metric_module_path())`; loading a local folder works offline.
    """
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics_modules")
    available = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, f"{d}.py")))
    if name not in available:
        raise ValueError(f"unknown metric module {name!r}; available: {available}")
    return os.path.join(root, name)


def binned_auroc_aurc(hist: torch.Tensor) -> Tuple[float, float]:
    """AUROC and AURC of a binned uncertainty score, from its histogram (module docstring).

    Args:
        hist: `(K, 2)` counts per score bin, bins in increasing score (decreasing confidence);
            column 0 = correctly classified pixels, column 1 = misclassified.

    Returns:
        `(auroc, aurc)`: AUROC of the score for "misclassified" with ties (same bin) counted 1/2,
        NaN without both classes; AURC = `(1/N) sum_k e_k / k` in expectation over random orders
        within bins, NaN for N = 0.
    """
    h = hist.detach().to("cpu", torch.float64)
    correct, wrong = h[:, 0], h[:, 1]
    n = correct + wrong
    total, n_wrong = float(n.sum()), float(wrong.sum())
    n_correct = total - n_wrong
    # Each error beats the correct pixels of lower bins and ties with those of its own bin.
    auroc = float((wrong * (correct.cumsum(0) - 0.5 * correct)).sum() / (n_wrong * n_correct)) \
        if n_wrong > 0 and n_correct > 0 else math.nan
    if total == 0:
        return auroc, math.nan
    # Bin b holds ranks k = M+1 .. M+n; in a random order of its pixels the expected error count
    # among its first j is j * r (r = w / n), so its ranks add sum_j (E + j r) / (M + j)
    # = w + (E - M r) (H(M + n) - H(M)), with H(x) = digamma(x + 1) + Euler's gamma.
    before = n.cumsum(0) - n
    errors_before = wrong.cumsum(0) - wrong
    rate = wrong / n.clamp_min(1)
    harmonic = torch.digamma(before + n + 1) - torch.digamma(before + 1)
    aurc = float((wrong + (errors_before - before * rate) * harmonic).sum() / total)
    return auroc, aurc


def metrics_from_accumulators(
    confusion_matrix: torch.Tensor,
    bin_count: torch.Tensor,
    bin_correct: torch.Tensor,
    bin_conf_sum: torch.Tensor,
    nll_sum: Optional[torch.Tensor] = None,
    brier_sum: Optional[torch.Tensor] = None,
    msp_hist: Optional[torch.Tensor] = None,
    sigma_hist: Optional[torch.Tensor] = None,
) -> Dict[str, object]:
    """Dataset-level metrics from summed accumulators (see the module docstring for definitions).

    Args:
        confusion_matrix: `(C, C)` integer counts, rows = ground truth, columns = prediction.
        bin_count: `(bins,)` pixels per confidence bin.
        bin_correct: `(bins,)` correctly classified pixels per bin.
        bin_conf_sum: `(bins,)` sum of the max-softmax confidences per bin.
        nll_sum, brier_sum: 0-d sums of the per-pixel NLL (nats) and Brier score over the
            `bin_count.sum()` pixels that had probabilities; None = not accumulated (NaN out).
        msp_hist, sigma_hist: `(K, 2)` histograms of 1 - max p and of the extra score
            (`binned_auroc_aurc`); None or all zero = not accumulated.

    Returns:
        dict of Python numbers and lists: `mean_iou`, `mean_iou_cirkd`, `per_class_iou` (NaN for
        classes absent from ground truth and prediction), `pixel_accuracy`, `mean_accuracy`,
        `per_class_accuracy` (NaN for classes absent from the ground truth), `ece`,
        `reliability` (`accuracy`, `confidence` (NaN for empty bins), `count`, `bin_edges`),
        `num_pixels`, `nll`, `brier`, `auroc_msp`, `aurc_msp` (NaN without probabilities),
        `auroc_sigma`, `aurc_sigma` (None without an extra score).
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
    return {
        **_class_metrics(cm),
        **_calibration_metrics(count, correct, conf_sum),
        "num_pixels": int(total),
        **_uncertainty_metrics(float(count.sum()), nll_sum, brier_sum, msp_hist, sigma_hist),
    }


def _class_metrics(cm: torch.Tensor) -> Dict[str, object]:
    """IoU and accuracy entries of `metrics_from_accumulators` from a float64 `(C, C)` confusion
    matrix (rows = ground truth) with at least one pixel."""
    tp = cm.diagonal()
    gt = cm.sum(1)
    pred = cm.sum(0)
    union = gt + pred - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    return {
        "mean_iou": float(iou.nanmean()),
        "mean_iou_cirkd": float((tp / (union + CIRKD_EPS)).mean()),
        "per_class_iou": iou.tolist(),
        "pixel_accuracy": float(tp.sum() / cm.sum()),
        "mean_accuracy": float(acc.nanmean()),
        "per_class_accuracy": acc.tolist(),
    }


def _calibration_metrics(
    count: torch.Tensor, correct: torch.Tensor, conf_sum: torch.Tensor
) -> Dict[str, object]:
    """`ece` and `reliability` from the float64 `(bins,)` per-bin pixel counts, correct pixels and
    confidence sums."""
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    edges = torch.linspace(0, 1, count.numel() + 1, dtype=torch.float64)
    return {
        "ece": float((correct - conf_sum).abs().sum() / count.sum().clamp_min(1)),
        "reliability": {
            "accuracy": torch.where(count > 0, correct / count.clamp_min(1), nan).tolist(),
            "confidence": torch.where(count > 0, conf_sum / count.clamp_min(1), nan).tolist(),
            "count": [int(c) for c in count.tolist()],
            "bin_edges": edges.tolist(),
        },
    }


def _uncertainty_metrics(
    scored: float,
    nll_sum: Optional[torch.Tensor],
    brier_sum: Optional[torch.Tensor],
    msp_hist: Optional[torch.Tensor],
    sigma_hist: Optional[torch.Tensor],
) -> Dict[str, object]:
    """`nll`, `brier` (means over the `scored` pixels that came with probabilities) and the
    AUROC/AURC entries from the `(K, 2)` histograms; arguments as in `metrics_from_accumulators`."""

    def mean(value: Optional[torch.Tensor]) -> float:
        return float(value) / scored if value is not None and scored > 0 else math.nan

    auroc_msp, aurc_msp = binned_auroc_aurc(msp_hist) if msp_hist is not None else (math.nan, math.nan)
    auroc_sigma = aurc_sigma = None
    if sigma_hist is not None and int(sigma_hist.sum()) > 0:
        if msp_hist is not None and int(sigma_hist.sum()) != int(msp_hist.sum()):
            warnings.warn(
                f"the uncertainty score covers {int(sigma_hist.sum())} of the {int(msp_hist.sum())} pixels "
                "with probabilities (passed to some updates only): auroc_sigma/aurc_sigma cover those only",
                stacklevel=3,  # the caller of metrics_from_accumulators
            )
        auroc_sigma, aurc_sigma = binned_auroc_aurc(sigma_hist)
    return {
        "nll": mean(nll_sum),
        "brier": mean(brier_sum),
        "auroc_msp": auroc_msp,
        "aurc_msp": aurc_msp,
        "auroc_sigma": auroc_sigma,
        "aurc_sigma": aurc_sigma,
    }


def _probs_scores(x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Per-pixel `(conf, pred, nll, brier)`, each `(B, H, W)`, from fp32 class probabilities `x`
    `(B, C, H, W)` and the `(B, 1, H, W)` int64 label ids `target`; NLL in nats."""
    conf, pred = x.max(dim=1)
    p_y = x.gather(1, target).squeeze(1)
    nll = -p_y.clamp_min(torch.finfo(torch.float32).tiny).log()
    others = x.scatter(1, target, 0.0)  # a copy: x may be the caller's tensor
    brier = (1 - p_y).square() + others.square_().sum(dim=1)
    return conf, pred, nll, brier


def _logits_scores(x: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Per-pixel `(conf, pred, nll, brier)`, each `(B, H, W)`, from fp32 logits `x` `(B, C, H, W)`
    and the `(B, 1, H, W)` int64 label ids `target`, p = softmax(x); NLL in nats."""
    # max softmax = 1 / sum_c exp(x_c - max): one exp pass, no normalised copy.
    top, pred = x.max(dim=1)
    e = (x - top.unsqueeze(1)).exp_()
    total = e.sum(dim=1)
    conf = total.reciprocal()
    gap = top - x.gather(1, target).squeeze(1)  # max - x_y >= 0
    # From here on e holds the other classes' terms only: their sum `rest` gives
    # 1 - p_y = rest / total without the cancellation of 1 - p_y (or of
    # sum_c p_c^2 - 2 p_y + 1), which would be fp32 noise for confident pixels.
    e.scatter_(1, target, 0.0)
    rest = e.sum(dim=1)
    # -log p_y = log(total) + max - x_y (log-sum-exp); when y is the argmax, total =
    # 1 + rest and log1p keeps the small NLL of confident correct pixels accurate.
    nll = torch.where(gap == 0, rest.log1p(), total.log() + gap)
    brier = (rest / total).square() + e.square_().sum(dim=1) / total.square()
    return conf, pred, nll, brier


class SegmentationMetrics:
    """Streaming mIoU / accuracy / ECE / NLL / Brier / AUROC / AURC, exact under data parallelism.

    Args:
        num_classes: C, number of classes (labels are in `[0, C)` or `ignore_index`).
        ignore_index: label value excluded from every metric (255 in this project).
        ece_bins: number of equal-width confidence bins for the ECE (the paper uses 10).
        align_corners: bilinear resize of logits/probabilities smaller than the labels (1/8 or
            1/4 resolution) to the label size before argmax/softmax. True follows CIRKD's
            evaluation (and its CE); transformers' SegFormer uses False. Both are "correct"; the
            choice shifts mIoU by a few hundredths of a point.
        device: where to create the accumulators; default: the device of the first batch.
        uncertainty_bins: K, equal-width bins of the uncertainty histograms behind AUROC/AURC
            (module docstring: the binned values differ from the exact ones only through pixels
            sharing a bin). Must be the same in every process.
        uncertainty_max: upper end of the fixed range [0, uncertainty_max] binned for the extra
            `uncertainty` score (higher values go to the last bin). 0.5 bounds the standard
            deviation of any probability, e.g. MC-dropout sigma of the predicted class.

    Usage::

        metrics = SegmentationMetrics(num_classes=19)
        for batch in loader:
            metrics.update(model(batch["pixel_values"]).logits, batch["labels"])
        metrics.reduce(accelerator)        # sum across processes (no-op with one process)
        results = metrics.compute()

    Accumulator dtypes: int64 counts (exact for any dataset size) and float64 sums (confidences,
    NLL, Brier), so sums over processes equal the one-process sums up to float64 rounding of the
    order. State size: `C*C + 3*bins + 2 + 4*K` numbers.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        ece_bins: int = 10,
        align_corners: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        uncertainty_bins: int = 10_000,
        uncertainty_max: float = 0.5,
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes = {num_classes!r} must be an integer >= 2")
        if isinstance(ece_bins, bool) or not isinstance(ece_bins, int) or ece_bins < 1:
            raise ValueError(f"ece_bins = {ece_bins!r} must be an integer >= 1")
        if isinstance(uncertainty_bins, bool) or not isinstance(uncertainty_bins, int) or uncertainty_bins < 1:
            raise ValueError(f"uncertainty_bins = {uncertainty_bins!r} must be an integer >= 1")
        if not (isinstance(uncertainty_max, (int, float)) and 0 < uncertainty_max < math.inf):
            raise ValueError(f"uncertainty_max = {uncertainty_max!r} must be a finite number > 0")
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
        self.uncertainty_bins = uncertainty_bins
        self.uncertainty_max = float(uncertainty_max)
        self.reset()

    # ------------------------------------------------------------------ state

    def reset(self) -> None:
        """Forget everything accumulated so far (also the "already reduced" mark)."""
        self.confusion_matrix: Optional[torch.Tensor] = None
        self.bin_count: Optional[torch.Tensor] = None
        self.bin_correct: Optional[torch.Tensor] = None
        self.bin_conf_sum: Optional[torch.Tensor] = None
        self.nll_sum: Optional[torch.Tensor] = None
        self.brier_sum: Optional[torch.Tensor] = None
        self.msp_hist: Optional[torch.Tensor] = None
        self.sigma_hist: Optional[torch.Tensor] = None
        self._reduced = False

    def _init_state(self, device: torch.device) -> None:
        c, b = self.num_classes, self.ece_bins
        self.confusion_matrix = torch.zeros(c, c, dtype=torch.int64, device=device)
        self.bin_count = torch.zeros(b, dtype=torch.int64, device=device)
        self.bin_correct = torch.zeros(b, dtype=torch.int64, device=device)
        self.bin_conf_sum = torch.zeros(b, dtype=torch.float64, device=device)
        self.nll_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.brier_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.msp_hist = torch.zeros(self.uncertainty_bins, 2, dtype=torch.int64, device=device)
        self.sigma_hist = torch.zeros(self.uncertainty_bins, 2, dtype=torch.int64, device=device)

    def state_tensors(self) -> Dict[str, torch.Tensor]:
        """The live accumulators by name (`ACCUMULATORS` order), created as zeros if no update ran.

        `confusion_matrix` `(C, C)` int64, `bin_count` `(bins,)` int64, `bin_correct` `(bins,)`
        int64, `bin_conf_sum` `(bins,)` float64, `nll_sum` and `brier_sum` `()` float64,
        `msp_hist` and `sigma_hist` `(K, 2)` int64. Summing these over disjoint data splits gives
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
            "nll_sum": (),
            "brier_sum": (),
            "msp_hist": (self.uncertainty_bins, 2),
            "sigma_hist": (self.uncertainty_bins, 2),
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

        Only the `C*C + 3*bins + 2 + 4*K` accumulator numbers travel, never per-pixel data. Every
        process must call it (it is a collective), also one that saw no data.
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

    def _check_batch(
        self, logits_or_probs: torch.Tensor, labels: torch.Tensor, uncertainty: Optional[torch.Tensor]
    ) -> None:
        """The shape/dtype checks of `update` (arguments as there), before anything is computed."""
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
        if uncertainty is not None and (
            uncertainty.dim() != 3 or uncertainty.shape[0] != b or not uncertainty.dtype.is_floating_point
        ):
            raise ValueError(
                f"uncertainty must be a float (B, H, W) or (B, h, w) map with B = {b}, got shape "
                f"{tuple(uncertainty.shape)} and dtype {uncertainty.dtype}"
            )

    def _resize(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        """`(B, C, h, w)` float -> `(B, C, H, W)` for `size = (H, W)`: bilinear with the constructor's
        `align_corners`; `x` itself when it already has that size."""
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)
        return x

    @torch.no_grad()
    def update(
        self,
        logits_or_probs: torch.Tensor,
        labels: torch.Tensor,
        is_probs: bool = False,
        uncertainty: Optional[torch.Tensor] = None,
    ) -> None:
        """Accumulate one batch.

        Args:
            logits_or_probs: `(B, C, h, w)` class logits (`is_probs=False`) or class probabilities
                summing to 1 over C (`is_probs=True`, e.g. an MC-dropout predictive mean). Any
                float dtype (computed in fp32). Resized to the label size `(H, W)` (bilinear,
                `align_corners` as in the constructor) when smaller or larger.
            labels: `(B, H, W)` int64 class ids, `ignore_index` for unlabelled pixels.
            is_probs: see above. Confidences are the max probability (max softmax for logits).
            uncertainty: optional `(B, H, W)` or `(B, h, w)` finite per-pixel score, higher = less
                sure (e.g. MC-dropout sigma), resized like the logits; gives `auroc_sigma` and
                `aurc_sigma`, binned on [0, `uncertainty_max`].
        """
        self._check_batch(logits_or_probs, labels, uncertainty)
        labels = labels.to(logits_or_probs.device)
        self._check_labels(labels)
        if self.confusion_matrix is None:
            self._init_state(self.device or logits_or_probs.device)

        size = labels.shape[-2:]
        valid = labels != self.ignore_index
        # Any class id for the unlabelled pixels, so that gather works; they are dropped below.
        target = torch.where(valid, labels, 0).unsqueeze(1)
        x = logits_or_probs.detach()
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = self._resize(x.float(), size)
            conf, pred, nll, brier = (_probs_scores if is_probs else _logits_scores)(x, target)
            if uncertainty is not None:
                u = self._resize(uncertainty.detach().to(x.device).float().unsqueeze(1), size).squeeze(1)

        lab = labels[valid]
        pred = pred[valid]
        # Binning in float64 so that c * bins never rounds across a bin edge.
        conf = conf[valid].double()
        correct = (pred == lab).long()
        if uncertainty is not None:
            u = u[valid].double()
            if not bool(torch.isfinite(u).all()):  # checked before any accumulator changes
                raise ValueError("uncertainty contains NaN or inf at labelled pixels")
        dev = self.confusion_matrix.device
        self._add_confusion(lab, pred)
        self._add_calibration(conf, correct)
        self.nll_sum += nll[valid].double().sum().to(dev)
        self.brier_sum += brier[valid].double().sum().to(dev)
        self.msp_hist += self._error_histogram(1 - conf, 1.0, correct).to(dev)  # 1 - conf is exact in float64
        if uncertainty is not None:
            self.sigma_hist += self._error_histogram(u, self.uncertainty_max, correct).to(dev)

    def _add_confusion(self, lab: torch.Tensor, pred: torch.Tensor) -> None:
        """Add `(N,)` int64 labels / predicted class ids of labelled pixels to the confusion matrix
        (one fused bincount of `label * C + prediction`)."""
        num_c = self.num_classes
        cm = torch.bincount(lab * num_c + pred, minlength=num_c * num_c).view(num_c, num_c)
        self.confusion_matrix += cm.to(self.confusion_matrix.device)

    def _add_calibration(self, conf: torch.Tensor, correct: torch.Tensor) -> None:
        """Add `(N,)` float64 max-probability confidences in [0, 1] and `(N,)` int64 0/1 correctness
        to the ECE bins (pixel count, correct pixels, confidence sum)."""
        bins = self.ece_bins
        bin_idx = (conf * bins).long().clamp_(0, bins - 1)
        # One bincount gives both the per-bin count (sum over correct in {0, 1}) and the hits.
        hits = torch.bincount(bin_idx * 2 + correct, minlength=2 * bins).view(bins, 2)
        conf_sum = torch.bincount(bin_idx, weights=conf, minlength=bins)
        dev = self.bin_count.device
        self.bin_count += hits.sum(1).to(dev)
        self.bin_correct += hits[:, 1].to(dev)
        self.bin_conf_sum += conf_sum.to(dev)

    def _error_histogram(self, score: torch.Tensor, high: float, correct: torch.Tensor) -> torch.Tensor:
        """`(K, 2)` int64 counts of (correct, wrong) pixels per equal-width bin of the `(N,)` float64
        `score` on [0, high] (values outside go to the end bins); `correct` `(N,)` int64 0/1."""
        k = self.uncertainty_bins
        idx = (score * (k / high)).floor_().clamp_(0, k - 1).long()
        return torch.bincount(idx * 2 + (1 - correct), minlength=2 * k).view(k, 2)

    @torch.no_grad()
    def update_predictions(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Accumulate hard predictions `(B, H, W)` (int64) only: IoU/accuracy, no ECE contribution.

        Meant for predictions that have no confidence (e.g. loaded PNGs). They give no NLL, Brier,
        AUROC or AURC either: with only this, those are NaN (and the `*_sigma` ones None). Mixing
        this with `update` makes ECE and uncertainty metrics cover a subset of the IoU's pixels.
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
        self._add_confusion(labels[valid], pred)

    # ------------------------------------------------------------------ results

    def compute(self) -> Dict[str, object]:
        """Metrics of everything accumulated (after `reduce` in multi-process runs).

        Returns:
            `metrics_from_accumulators` of the current state: `mean_iou`, `mean_iou_cirkd`,
            `per_class_iou` (list of C, NaN for absent classes), `pixel_accuracy`,
            `mean_accuracy`, `per_class_accuracy`, `ece`, `reliability` (per-bin `accuracy`,
            `confidence`, `count`, `bin_edges`), `num_pixels`, `nll` (nats), `brier`, `auroc_msp`,
            `aurc_msp` (NaN if no `update` ran), `auroc_sigma`, `aurc_sigma` (None unless an
            `uncertainty` map was passed). All Python numbers/lists (fractions, not %).
        """
        return metrics_from_accumulators(**self.state_tensors())

    def to_evaluate_inputs(self) -> Dict[str, list]:
        """The accumulators as plain lists, for `evaluate.load(metric_module_path()).add(**inputs)`.

        Only `EVALUATE_INPUTS` (confusion matrix and ECE bins): the `mean_iou_ece` module computes
        mIoU/accuracy/ECE, not the uncertainty metrics.
        """
        state = self.state_tensors()
        return {name: state[name].tolist() for name in EVALUATE_INPUTS}

    def __repr__(self) -> str:
        pixels = 0 if self.confusion_matrix is None else int(self.confusion_matrix.sum())
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"ece_bins={self.ece_bins}, align_corners={self.align_corners}, uncertainty_bins={self.uncertainty_bins}, "
            f"uncertainty_max={self.uncertainty_max}, pixels={pixels}, reduced={self._reduced})"
        )


# How reports show the uncertainty metrics: (compute() key, row name, formatter). Older metrics.json
# records lack them; the MC rows need T >= 2 samples.
UNCERTAINTY_ROWS = (
    ("nll", "NLL (nats per pixel)", lambda v: f"{v:.4f}"),
    ("brier", "Brier score", lambda v: f"{v:.4f}"),
    ("auroc_msp", "AUROC of 1 - max softmax for errors (%)", lambda v: f"{100 * v:.2f}"),
    ("aurc_msp", "AURC, max softmax (%, lower is better)", lambda v: f"{100 * v:.2f}"),
    ("auroc_sigma", "AUROC of MC sigma for errors (%)", lambda v: f"{100 * v:.2f}"),
    ("aurc_sigma", "AURC, MC sigma (%, lower is better)", lambda v: f"{100 * v:.2f}"),
)
