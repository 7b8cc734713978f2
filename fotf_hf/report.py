"""Tables of finished runs: mean +- std over seeds of mIoU and ECE, per-class IoU, wall time.

A run is an output folder of `scripts/distill.py` (`metrics.json` + `fotf_config.yaml`). Its
reported metrics are those of `scripts/evaluate.py` (`metrics.json["evaluations"][key]`, see
`fotf_hf.evaluation.evaluation_key`; files written before per-split entries hold one `"evaluation"`)
when present, else the training loop's final evaluation. Runs are grouped by a label (the method and its FOTF
setting); every run found is listed, none is dropped.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import yaml

from .fotf import FotfConfig

__all__ = ["RunRecord", "load_run", "run_label", "summarize", "markdown_tables", "seed_differences",
           "difference_table", "pairs_needed", "minimum_detectable_effect", "t_quantile", "paired_ci"]

# Scalar uncertainty metrics of `SegmentationMetrics` a run's evaluation may hold (MC ones need T >= 2).
UNCERTAINTY_METRICS = ("nll", "brier", "auroc_msp", "aurc_msp", "auroc_sigma", "aurc_sigma")


@dataclass
class RunRecord:
    """One finished run.

    Args:
        folder: the run's output folder.
        label: group name, e.g. `kd + FOTF (kappa 5, m 1)`.
        seed: `run.seed`.
        mean_iou, ece, pixel_accuracy: fractions in [0, 1].
        per_class_iou: one IoU per class (NaN where the class is absent from truth and prediction).
        wall_time_s: training wall time in seconds (evaluation and saving included).
        steps: optimiser steps.
        source: `evaluate.py` or `training loop`: where the metrics come from.
    """

    folder: Path
    label: str
    seed: int
    mean_iou: float
    ece: float
    pixel_accuracy: float
    per_class_iou: List[float]
    wall_time_s: float
    steps: int
    source: str
    extra: Dict[str, object] = field(default_factory=dict)


def run_label(config: Mapping) -> str:
    """`<method>` or `<method> + FOTF (kappa K, m M)` from a resolved config dict, with the sampling
    mode and the merges appended where they differ from `FotfConfig`'s defaults (e.g.
    `kd + FOTF (kappa 10, m 1, mode classifier)`), so that variants at one (kappa, m) stay apart."""
    method = config["method"]["name"]
    fotf = config.get("fotf") or {}
    if not fotf.get("enabled"):
        return method
    default = FotfConfig()
    parts = [f"kappa {fotf['kappa']:g}", f"m {fotf['m']:g}"]
    if fotf.get("mode", default.mode) != default.mode:
        parts.append(f"mode {fotf['mode']}")
    merges = (fotf.get("merge_kd", default.merge_kd), fotf.get("merge_ce", default.merge_ce))
    if merges != (default.merge_kd, default.merge_ce):
        parts.append(f"merges kd {merges[0]} / ce {merges[1]}")
    return f"{method} + FOTF ({', '.join(parts)})"


def load_run(folder: str | Path, evaluation: Optional[str] = None) -> Optional[RunRecord]:
    """Read a run folder; None when it has no `metrics.json` (not finished), or when `evaluation`
    (a `metrics.json["evaluations"]` key such as `test@180x240`) is asked for and not there yet.
    Without `evaluation`: the only `evaluate.py` entry, else the training loop's final one."""
    folder = Path(folder)
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        return None
    data = json.loads(metrics_file.read_text())
    config = yaml.safe_load((folder / "fotf_config.yaml").read_text())
    entries = dict(data.get("evaluations") or {})
    if "evaluation" in data:  # written before per-split entries
        entries.setdefault("evaluation", data["evaluation"])
    if evaluation is not None:
        if evaluation not in entries:
            return None
        metrics, source = entries[evaluation]["metrics"], f"evaluate.py {evaluation}"
    elif len(entries) == 1:
        (key, entry), = entries.items()
        metrics, source = entry["metrics"], "evaluate.py" + ("" if key == "evaluation" else f" {key}")
    elif entries:
        raise ValueError(f"{folder} holds several evaluations ({', '.join(sorted(entries))}); pass evaluation=<key>")
    else:
        metrics, source = data["final"], "training loop"
    return RunRecord(
        folder=folder,
        label=run_label(config),
        seed=int(config["run"]["seed"]),
        mean_iou=float(metrics["mean_iou"]),
        ece=float(metrics["ece"]),
        pixel_accuracy=float(metrics["pixel_accuracy"]),
        per_class_iou=[float("nan") if v is None else float(v) for v in metrics["per_class_iou"]],
        wall_time_s=float(data["wall_time_s"]),
        steps=int(data["steps"]),
        source=source,
        extra={k: float(metrics[k]) for k in UNCERTAINTY_METRICS if metrics.get(k) is not None},
    )


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def summarize(runs: Iterable[RunRecord]) -> Dict[str, dict]:
    """Group runs by label: `{label: {n, seeds, mean_iou: (mean, std), ece: (...), per_class_iou: [means],
    wall_time_s: mean}}`; std is the sample standard deviation over seeds (NaN for a single run)."""
    groups: Dict[str, List[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    summary = {}
    for label, group in groups.items():
        num_classes = len(group[0].per_class_iou)
        summary[label] = {
            "n": len(group),
            "seeds": sorted(r.seed for r in group),
            "mean_iou": _mean_std([r.mean_iou for r in group]),
            "ece": _mean_std([r.ece for r in group]),
            "per_class_iou": [_mean_std([r.per_class_iou[c] for r in group])[0] for c in range(num_classes)],
            "wall_time_s": statistics.fmean(r.wall_time_s for r in group),
        }
    return summary


def _pct(mean: float, std: Optional[float] = None) -> str:
    if math.isnan(mean):
        return "n/a"
    if std is None:
        return f"{100 * mean:.2f}"
    return f"{100 * mean:.2f} +- {100 * std:.2f}" if not math.isnan(std) else f"{100 * mean:.2f}"


def markdown_tables(runs: Sequence[RunRecord], class_names: Optional[Sequence[str]] = None,
                    order: Optional[Sequence[str]] = None) -> str:
    """Three Markdown tables: per group (mean +- std), per-class IoU means per group, every run."""
    summary = summarize(runs)
    labels = [label for label in (order or []) if label in summary] + sorted(set(summary) - set(order or []))
    lines = [
        "| method | runs (seeds) | mIoU (%) mean +- std | ECE (%) mean +- std | wall time per run (min) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label in labels:
        s = summary[label]
        lines.append(
            f"| {label} | {s['n']} ({', '.join(map(str, s['seeds']))}) | {_pct(*s['mean_iou'])} | "
            f"{_pct(*s['ece'])} | {s['wall_time_s'] / 60:.1f} |"
        )
    num_classes = max(len(r.per_class_iou) for r in runs) if runs else 0
    names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
    lines += ["", "| method | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(_pct(v) for v in summary[label]["per_class_iou"]) + " |")
    lines += ["", "| run folder | method | seed | mIoU (%) | ECE (%) | pixel acc. (%) | steps | wall (min) | metrics from |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(runs, key=lambda r: (labels.index(r.label), r.seed)):
        lines.append(
            f"| {r.folder.parent.name}/{r.folder.name} "
            f"| {r.label} | {r.seed} | {_pct(r.mean_iou)} | {_pct(r.ece)} | {_pct(r.pixel_accuracy)} | {r.steps} | "
            f"{r.wall_time_s / 60:.1f} | {r.source} |"
        )
    return "\n".join(lines) + "\n"


def seed_differences(runs: Sequence[RunRecord], base: str, other: str, metric: str = "mean_iou") -> Dict[str, object]:
    """`other - base` for one metric, paired by seed, next to the seed spread of each group.

    Why pairs: runs with the same seed share the initialisation and the batch order, so their
    difference removes part of the seed noise. Why the spread beside it: an effect smaller than the
    run-to-run standard deviation is not evidence with three seeds.

    Returns `{seeds, differences (one per shared seed, fraction), mean, std (sample std of the
    differences, NaN below 2 pairs), base_std, other_std (over each group's seeds), welch_t}`;
    `welch_t` = (mean(other) - mean(base)) / sqrt(var_b/n_b + var_o/n_o) over all runs of each group.
    """
    by_label: Dict[str, Dict[int, float]] = {base: {}, other: {}}
    for run in runs:
        if run.label in by_label:
            by_label[run.label][run.seed] = getattr(run, metric)
    seeds = sorted(set(by_label[base]) & set(by_label[other]))
    diffs = [by_label[other][s] - by_label[base][s] for s in seeds]
    b, o = list(by_label[base].values()), list(by_label[other].values())
    mean_diff, std_diff = _mean_std(diffs)
    t = float("nan")
    if len(b) > 1 and len(o) > 1:
        se = math.sqrt(statistics.variance(b) / len(b) + statistics.variance(o) / len(o))
        t = (statistics.fmean(o) - statistics.fmean(b)) / se if se > 0 else float("nan")
    return {"seeds": seeds, "differences": diffs, "mean": mean_diff, "std": std_diff,
            "base_std": _mean_std(b)[1], "other_std": _mean_std(o)[1], "welch_t": t}


_ALPHA_Z = statistics.NormalDist().inv_cdf


def pairs_needed(sd_diff: float, effect: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Seed pairs a two-sided paired t-test needs to detect `effect` with probability `power`.

    Guenther's (1981) approximation to the exact noncentral-t answer,
    `n = ((z_{1-alpha/2} + z_{power}) * sd_diff / effect)^2 + z_{1-alpha/2}^2 / 2`, rounded up;
    `sd_diff` and `effect` in the same unit (e.g. mIoU points). At least 2.
    """
    if sd_diff <= 0 or effect <= 0:
        raise ValueError(f"sd_diff and effect must be > 0, got {sd_diff} and {effect}")
    za, zb = _ALPHA_Z(1 - alpha / 2), _ALPHA_Z(power)
    return max(2, math.ceil(((za + zb) * sd_diff / effect) ** 2 + za ** 2 / 2))


def minimum_detectable_effect(sd_diff: float, pairs: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest paired effect `pairs` seed pairs detect with probability `power` (two-sided
    `alpha`): `pairs_needed` solved for the effect, in `sd_diff`'s unit."""
    za, zb = _ALPHA_Z(1 - alpha / 2), _ALPHA_Z(power)
    if pairs - za ** 2 / 2 <= 0:
        return float("inf")
    return (za + zb) * sd_diff / math.sqrt(pairs - za ** 2 / 2)


def t_quantile(q: float, df: int) -> float:
    """The `q`-quantile of Student's t with `df` degrees of freedom, for q in (0.5, 1): bisection on
    its CDF, integrated from the density with Simpson's rule (error < 1e-6 for the CIs used here)."""
    if not 0.5 < q < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < q < 1 and df >= 1, got q = {q}, df = {df}")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float, steps: int = 2000) -> float:
        h = x / steps
        f = [math.exp(log_c - (df + 1) / 2 * math.log1p((i * h) ** 2 / df)) for i in range(steps + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    low, high = 0.0, 1.0
    while cdf(high) < q:
        low, high = high, 2 * high
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < q else (low, mid)
    return (low + high) / 2


def paired_ci(differences: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided t confidence interval `(low, high)` of the mean of seed-paired differences:
    `mean +- t_{(1+level)/2, n-1} * sd / sqrt(n)`; NaNs below 2 pairs."""
    n = len(differences)
    if n < 2:
        return float("nan"), float("nan")
    mean, sd = statistics.fmean(differences), statistics.stdev(differences)
    half = t_quantile((1 + level) / 2, n - 1) * sd / math.sqrt(n)
    return mean - half, mean + half


def difference_table(runs: Sequence[RunRecord], pairs: Sequence[tuple]) -> str:
    """Markdown: for each `(base, other)` label pair and metric, the seed-paired differences
    (percentage points), their mean +- std, each group's seed std, Welch's t and the 95% t
    confidence interval of the paired mean."""
    lines = ["| comparison | metric | per-seed difference (pp) | mean +- std (pp) | seed std base / other (pp) | Welch t "
             "| paired 95% CI (pp) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for base, other in pairs:
        for metric, name in (("mean_iou", "mIoU"), ("ece", "ECE")):
            d = seed_differences(runs, base, other, metric)
            per_seed = ", ".join(f"{s}: {100 * v:+.2f}" for s, v in zip(d["seeds"], d["differences"])) or "no shared seeds"
            mean = "n/a" if math.isnan(d["mean"]) else f"{100 * d['mean']:+.2f}" + (
                "" if math.isnan(d["std"]) else f" +- {100 * d['std']:.2f}")
            t = "n/a" if math.isnan(d["welch_t"]) else f"{d['welch_t']:+.2f}"
            low, high = paired_ci(d["differences"])
            ci = "n/a" if math.isnan(low) else f"[{100 * low:+.2f}, {100 * high:+.2f}]"
            lines.append(f"| {other} vs {base} | {name} | {per_seed} | {mean} | "
                         f"{_pct(d['base_std'])} / {_pct(d['other_std'])} | {t} | {ci} |")
    return "\n".join(lines) + "\n"
