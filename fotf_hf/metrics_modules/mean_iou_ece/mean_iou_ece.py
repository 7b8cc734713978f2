"""mIoU and expected calibration error from streaming accumulators (an `evaluate` metric module).

Load it offline from its folder: `evaluate.load(fotf_hf.metrics.metric_module_path("mean_iou_ece"))`.

Unlike `evaluate`'s `mean_iou`, it never receives pixels: each `add` / `add_batch` row is one set
of accumulators (a confusion matrix and per-bin calibration counts) computed in torch, e.g. by
`fotf_hf.metrics.SegmentationMetrics.to_evaluate_inputs()` per batch, per shard or per process.
`compute` sums the rows, so the result is the dataset-level metric of the union. The module is
self-contained (numpy only) so that it can be published on its own; `fotf_hf.metrics` holds the
torch twin of the same formulas and the tests check that both agree.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Semantic segmentation mIoU, pixel accuracy, mean accuracy and expected calibration error (ECE)
computed from summed accumulators:

- confusion_matrix: (C, C) int64 counts, rows = ground truth, columns = prediction, ignored pixels
  excluded.
- bin_count / bin_correct / bin_conf_sum: per equal-width confidence bin, the pixel count, the number
  of correct pixels and the sum of max-softmax confidences.

IoU_c = TP_c / (TP_c + FP_c + FN_c), NaN for a class absent from ground truth and prediction;
mean_iou averages the non-NaN ones; mean_iou_cirkd averages TP_c / (U_c + 2.22e-16) over all
classes (CIRKD's convention, absent classes count as 0). ECE = sum_b |correct_b - conf_sum_b| / N
= sum_b n_b / N |acc_b - conf_b| (Guo et al., 2017).
"""

_KWARGS_DESCRIPTION = """
Args:
    confusion_matrix: one (C, C) nested list of integer counts per row.
    bin_count: one list of per-bin pixel counts per row.
    bin_correct: one list of per-bin correct-pixel counts per row.
    bin_conf_sum: one list of per-bin confidence sums per row.
Returns:
    mean_iou, mean_iou_cirkd, per_class_iou (list), pixel_accuracy, mean_accuracy,
    per_class_accuracy (list), ece, bin_accuracy (list), bin_confidence (list), bin_count (list),
    num_pixels.
Examples:
    >>> metric = evaluate.load("path/to/mean_iou_ece")
    >>> metric.add(confusion_matrix=[[3, 1], [0, 4]], bin_count=[0, 8], bin_correct=[0, 7], bin_conf_sum=[0.0, 7.2])
    >>> round(metric.compute()["mean_iou"], 4)  # IoUs 3/4 and 4/5
    0.775
"""

_CITATION = """
@inproceedings{guo2017calibration,
  title={On Calibration of Modern Neural Networks},
  author={Guo, Chuan and Pleiss, Geoff and Sun, Yu and Weinberger, Kilian Q.},
  booktitle={ICML},
  year={2017}
}
"""

_CIRKD_EPS = 2.220446049250313e-16


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIouEce(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "confusion_matrix": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "bin_count": datasets.Sequence(datasets.Value("int64")),
                    "bin_correct": datasets.Sequence(datasets.Value("int64")),
                    "bin_conf_sum": datasets.Sequence(datasets.Value("float64")),
                }
            ),
        )

    def _compute(self, confusion_matrix, bin_count, bin_correct, bin_conf_sum):
        shapes = {np.asarray(m).shape for m in confusion_matrix}
        if len(shapes) != 1:
            raise ValueError(f"all confusion matrices must have the same shape, got {sorted(shapes)}")
        cm = np.sum([np.asarray(m, dtype=np.int64) for m in confusion_matrix], axis=0).astype(np.float64)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
            raise ValueError(f"confusion_matrix must be square (C, C), got shape {cm.shape}")
        count = np.sum([np.asarray(b, dtype=np.int64) for b in bin_count], axis=0).astype(np.float64)
        correct = np.sum([np.asarray(b, dtype=np.int64) for b in bin_correct], axis=0).astype(np.float64)
        conf_sum = np.sum([np.asarray(b, dtype=np.float64) for b in bin_conf_sum], axis=0)
        total = cm.sum()
        if total <= 0:
            raise ValueError("the accumulators hold no labelled pixel")
        tp = np.diag(cm)
        gt = cm.sum(axis=1)
        union = gt + cm.sum(axis=0) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            acc = np.where(gt > 0, tp / gt, np.nan)
            bin_acc = np.where(count > 0, correct / count, np.nan)
            bin_conf = np.where(count > 0, conf_sum / count, np.nan)
        return {
            "mean_iou": float(np.nanmean(iou)),
            "mean_iou_cirkd": float(np.mean(tp / (union + _CIRKD_EPS))),
            "per_class_iou": iou.tolist(),
            "pixel_accuracy": float(tp.sum() / total),
            "mean_accuracy": float(np.nanmean(acc)),
            "per_class_accuracy": acc.tolist(),
            "ece": float(np.abs(correct - conf_sum).sum() / max(count.sum(), 1.0)),
            "bin_accuracy": bin_acc.tolist(),
            "bin_confidence": bin_conf.tolist(),
            "bin_count": [int(c) for c in count],
            "num_pixels": int(total),
        }
