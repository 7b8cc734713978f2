#!/usr/bin/env python
"""Study v2's report: tables and a figure from the small artefacts the runner keeps in results/camvid_v2/.

    python scripts/camvid_v2_report.py     # -> results/camvid_v2/report.md, results/camvid_v2/fotf_weights.png

Reads only `results/camvid_v2/` (the kept copies of every run: metrics.json with its val / test /
MC evaluations, fotf_config.yaml, log_history.jsonl, mechanism_test.json), so it runs in any session
and shows whatever has finished: the power statement from the paired runs, every arm on test
(mean +- std, per-class IoU), seed-paired differences with 95% CIs on test and val, the uncertainty
metrics (NLL, Brier, AUROC / AURC of max-softmax and of MC sigma), the mechanism (FOTF weights on
boundary vs interior pixels) and the KD weights over training. `scripts/camvid_study_v2.py --stage
report` calls it.
"""

import json
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

# The runner and the mechanism script sit beside this file. The folder is on sys.path only while they
# are imported: it holds scripts/evaluate.py, which would shadow the `evaluate` library afterwards.
_HERE = str(Path(__file__).resolve().parent)
sys.path.insert(0, _HERE)
try:
    import camvid_study_v2 as study  # noqa: E402
    from fotf_mechanism import REGIONS  # noqa: E402
finally:
    sys.path.remove(_HERE)

from fotf_hf.data.info import CAMVID_CLASSES  # noqa: E402
from fotf_hf.training import LOG_HISTORY_FILE, read_log_history  # noqa: E402
from fotf_hf.report import (  # noqa: E402
    UNCERTAINTY_METRICS,
    difference_table,
    load_run,
    markdown_tables,
    minimum_detectable_effect,
    pairs_needed,
    seed_differences,
)

SEEDS = [*study.FIRST_SEEDS, *study.MORE_PAIRS]
COMPARISONS = (("kd", "kd_fotf"), ("ce", "ce_fotf"), ("kd_fotf", "kd_fotf_other_merge"),
               ("kd_fotf", "kd_fotf_classifier"))


def runs_by_arm(point: tuple, key: str) -> dict:
    """`{arm: [RunRecord]}` of every kept run scored under evaluation `key`."""
    found = {}
    for arm in study.ARMS:
        folders = [study.REPO / study.kept(study.arm_folder(arm, seed, point)) for seed in SEEDS]
        runs = [r for r in (load_run(f, key) for f in folders if (f / "metrics.json").is_file()) if r is not None]
        if runs:
            found[arm] = runs
    return found


def mean_std(values) -> str:
    values = list(values)
    if not values:
        return "n/a"
    return f"{statistics.fmean(values):.4f}" + (f" +- {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def power_section(test: dict) -> list:
    lines = ["## Power", ""]
    pilot = study.REPO / study.RESULTS / "pilot.md"
    if pilot.is_file():
        lines += ["From the pilot (`pilot.md`): " + " ".join(
            line for line in pilot.read_text().splitlines() if line.startswith(("KD test", "Seed pairs"))), ""]
    if "kd" in test and "kd_fotf" in test:
        label_b, label_o = test["kd"][0].label, test["kd_fotf"][0].label
        d = seed_differences(test["kd"] + test["kd_fotf"], label_b, label_o)
        n = len(d["seeds"])
        if n >= 2 and d["std"] > 0:
            sd = 100 * d["std"]
            lines += [f"Measured on the {n} KD / KD + FOTF seed pairs run so far: paired-difference std of test "
                      f"mIoU {sd:.2f} points; seed pairs needed for 1.0 point at 80% power (two-sided 5%): "
                      f"**{pairs_needed(sd, 1.0)}**; minimum detectable effect with {n} pairs: "
                      f"**{minimum_detectable_effect(sd, n):.2f} points**.", ""]
    return lines


def uncertainty_section(point: tuple) -> list:
    lines = ["## Uncertainty metrics on test (mean +- std over seeds)", "",
             "Deterministic prediction: NLL (nats), Brier, AUROC / AURC of 1 - max softmax for the model's own "
             f"errors. MC: the T = {study.MC_SAMPLES} MC-dropout predictive mean and the AUROC / AURC of its sigma.", "",
             "| arm | runs | NLL | Brier | AUROC msp | AURC msp | MC NLL | MC AUROC sigma | MC AURC sigma |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    det = runs_by_arm(point, study.eval_key("test"))
    mc = runs_by_arm(point, study.eval_key("test", study.MC_SAMPLES))
    for arm, runs in det.items():
        cells = [mean_std(r.extra[k] for r in runs if k in r.extra) for k in ("nll", "brier", "auroc_msp", "aurc_msp")]
        cells += [mean_std(r.extra[k] for r in mc.get(arm, []) if k in r.extra)
                  for k in ("nll", "auroc_sigma", "aurc_sigma")]
        lines.append(f"| {runs[0].label} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines + [""]


def mechanism_section(point: tuple) -> list:
    lines = ["## Where the weights go (test)", "",
             f"`scripts/fotf_mechanism.py`: FOTF's KD weight (kappa {point[0]:g}, m {point[1]:g}, `per_pixel`, "
             f"T = {study.MC_SAMPLES}, eval mode) of each labelled pixel; boundary = within 3 px of a label edge. "
             "Mean over seeds of the per-run means.", "",
             "| student | runs | weight boundary | weight interior | sigma boundary | sigma interior | "
             "error boundary | error interior |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    per_class = {}
    for arm in ("kd", "kd_fotf"):
        tables = []
        for seed in SEEDS:
            path = study.REPO / study.kept(study.arm_folder(arm, seed, point)) / "mechanism_test.json"
            if path.is_file():
                tables.append(json.loads(path.read_text())["regions"])
        if not tables:
            continue
        cells = [mean_std(t["overall"][region][stat] for t in tables)
                 for stat in ("weight_mean", "sigma_mean", "error_rate") for region in REGIONS]
        lines.append(f"| {arm} | {len(tables)} | " + " | ".join(cells) + " |")
        per_class[arm] = tables
    for arm, tables in per_class.items():
        lines += ["", f"Per class ({arm}, mean over {len(tables)} runs): weight boundary / interior, error boundary / "
                  "interior, share of the class's pixels on boundaries.", "",
                  "| class | weight boundary | weight interior | error boundary | error interior | boundary share |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name in CAMVID_CLASSES:
            rows = [t[name] for t in tables if name in t]
            b = [r["boundary"] for r in rows if r["boundary"]["pixels"]]
            i = [r["interior"] for r in rows if r["interior"]["pixels"]]
            share = statistics.fmean(r["boundary"]["pixels"] / max(1, r["boundary"]["pixels"] + r["interior"]["pixels"])
                                     for r in rows) if rows else float("nan")
            lines.append(f"| {name} | {mean_std(c['weight_mean'] for c in b)} | {mean_std(c['weight_mean'] for c in i)} | "
                         f"{mean_std(c['error_rate'] for c in b)} | {mean_std(c['error_rate'] for c in i)} | {share:.3f} |")
    return lines + [""]


def weights_figure(point: tuple, path: Path) -> bool:
    """KD-term weight mean and p99 over training for every kept KD + FOTF run; False when none."""
    series = {}
    for kappa, m in study.SWEEP:
        for seed in SEEDS:
            log = study.REPO / study.kept(study.fotf_folder(kappa, m, seed)) / LOG_HISTORY_FILE
            if log.is_file():
                rows = [r for r in read_log_history(log) if "fotf/weight_kd_mean" in r]
                if rows:
                    series[(kappa, m, seed)] = rows
    if not series:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
    for (kappa, m, seed), rows in sorted(series.items()):
        style = "-" if (kappa, m) == tuple(point) else ":"
        for ax, stat in zip(axes, ("mean", "p99")):
            ax.plot([r["step"] for r in rows], [r[f"fotf/weight_kd_{stat}"] for r in rows], style,
                    label=f"kappa {kappa:g}, m {m:g}, seed {seed}")
    for ax, stat in zip(axes, ("mean", "p99")):
        ax.set(xlabel="step", ylabel=f"KD weight {stat} (per logged interval)",
               title=f"KD + FOTF: weight {stat} over training")
    axes[1].legend(fontsize=6)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_report() -> str:
    point = study.chosen_point()
    test = runs_by_arm(point, study.eval_key("test"))
    val = runs_by_arm(point, study.eval_key("validation"))
    label = {arm: runs[0].label for arm, runs in test.items()}
    pairs = [(label[a], label[b]) for a, b in COMPARISONS if a in label and b in label]
    lines = ["# Study v2 report (generated)", "",
             "Generated by `python scripts/camvid_v2_report.py` from `results/camvid_v2/`; protocol in RESULTS.md. "
             f"KD + FOTF arms at kappa {point[0]:g}, m {point[1]:g} (best val mIoU of `sweep.md`).", ""]
    lines += power_section(test)
    lines += ["## Test (233 images, 180x240)", "",
              markdown_tables([r for runs in test.values() for r in runs], CAMVID_CLASSES, list(label.values())), "",
              "## Seed-paired differences, test", "", difference_table([r for rs in test.values() for r in rs], pairs),
              "## Seed-paired differences, val (where kappa / m were chosen)", "",
              difference_table([r for rs in val.values() for r in rs], pairs)]
    lines += uncertainty_section(point) + mechanism_section(point)
    if weights_figure(point, study.REPO / study.RESULTS / "fotf_weights.png"):
        lines += ["## KD weights over training", "", "![KD weights over training](fotf_weights.png)", ""]
    return "\n".join(lines) + "\n"


def main() -> int:
    path = study.REPO / study.RESULTS / "report.md"
    path.write_text(build_report())
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
