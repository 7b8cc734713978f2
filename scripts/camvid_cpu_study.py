#!/usr/bin/env python
"""The CPU-scale CamVid study behind RESULTS.md, as the sequence of commands a user would type.

    FOTF_CAMVID_ROOT=<camvid folder> python scripts/camvid_cpu_study.py [--seeds 0 1 2] [--sweep_seed 100] [--dry_run]

1. Teacher: `scripts/distill.py --config scripts/configs/camvid_cpu/teacher.yaml`, then
   `scripts/evaluate.py` on it.
2. kappa/m sweep on one seed (--sweep_seed, not one of the table's seeds) for CE + FOTF and
   KD + FOTF; the best final mIoU of each picks its kappa/m. A sweep point whose training fails
   (e.g. a non-finite loss) is recorded in its folder's FAILED file and reported, not retried.
3. For every seed: CE, CE + FOTF, KD, KD + FOTF, CIRKD, CIRKD + FOTF students (--methods), each
   trained with `scripts/distill.py` and scored with `scripts/evaluate.py`. CIRKD + FOTF has no
   sweep of its own: it takes the kappa/m chosen for KD + FOTF (FOTF weights the same KD term).
4. The small artefacts (metrics.json, resolved config, model card, reliability diagram, last
   panels, log) are copied to results/camvid_cpu/, with the commands (commands.sh) and the tables
   (summary.md, from `fotf_hf.report`).

Resumable: a finished run (metrics.json with evaluate.py's val entry) is skipped, an interrupted one
continues from its last checkpoint. Weights and checkpoints stay under outputs/camvid_cpu/.

The FOTF configs now use `mode: exact` and the literal merges (KD `per_pixel`, CE `per_class`);
the runs in RESULTS.md were made before that with the old `head` mode (now `classifier`) and the
other reading (KD `per_class`, CE `per_pixel`), so a rerun is not the same experiment. The YAML
comments in scripts/configs/camvid_cpu/ give the overrides that restore the old runs.
"""

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = Path("scripts/configs/camvid_cpu")
OUT = Path("outputs/camvid_cpu")
RESULTS = Path("results/camvid_cpu")
SWEEPS = {"ce_fotf": [(1, 1), (3, 1), (7, 1)], "kd_fotf": [(1, 1), (5, 1), (10, 10)]}
METHODS = ("ce", "ce_fotf", "kd", "kd_fotf", "cirkd", "cirkd_fotf")
KAPPA_FROM = {"ce_fotf": "ce_fotf", "kd_fotf": "kd_fotf", "cirkd_fotf": "kd_fotf"}
FAILED = "FAILED"
EVAL = ["--dataset", "camvid", "--eval_size", "180", "240", "--batch_size", "4"]


def run(cmd, log: Path, dry_run: bool) -> None:
    """Run one command from the repo root, appending it to commands.sh and its output to `log`."""
    line = shlex.join(cmd)
    print(f"$ {line}", flush=True)
    if dry_run:
        return
    with open(RESULTS / "commands.sh", "a") as f:
        f.write(line + "\n")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"\n$ {line}\n")
        f.flush()
        subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, check=True)


def val_metrics(folder: Path):
    """evaluate.py's val metrics of a run (None before it ran); older files hold one "evaluation"."""
    metrics = REPO / folder / "metrics.json"
    record = json.loads(metrics.read_text()) if metrics.is_file() else {}
    entry = record.get("evaluations", {}).get("validation@180x240") or record.get("evaluation")
    return None if entry is None else entry["metrics"]


def done(folder: Path) -> bool:
    return (REPO / folder / FAILED).is_file() or val_metrics(folder) is not None


def train_and_evaluate(name: str, config: str, folder: Path, overrides, dry_run: bool, may_fail: bool = False) -> None:
    """Train + evaluate one run; with `may_fail` (sweep points) a failed training is recorded in
    `<folder>/FAILED` (and results/) and the study goes on, otherwise it stops the study."""
    if done(folder):
        print(f"[study] {folder}: done already", flush=True)
        return
    log = RESULTS / "logs" / f"{str(folder.relative_to(OUT)).replace('/', '_')}.log"
    resume = ["--resume", "latest"] if (REPO / folder / "checkpoints").is_dir() else []
    py = sys.executable if not dry_run else "python"
    try:
        run([py, "scripts/distill.py", "--config", str(CONFIGS / config), "--run.output_dir", str(folder),
             *overrides, *resume], log, dry_run)
    except subprocess.CalledProcessError:
        if not may_fail:
            raise
        reason = (REPO / log).read_text().strip().splitlines()[-1]
        for where in (REPO / folder, REPO / RESULTS / folder.relative_to(OUT)):
            where.mkdir(parents=True, exist_ok=True)
            (where / FAILED).write_text(reason + "\n")
        print(f"[study] {folder}: training failed, recorded and skipped: {reason}", flush=True)
        return
    run([py, "scripts/evaluate.py", "--model", str(folder), *EVAL], log, dry_run)
    if not dry_run:
        keep(folder)


def keep(folder: Path) -> None:
    """Copy the run's small artefacts into results/ (never weights or checkpoints)."""
    src, dst = REPO / folder, REPO / RESULTS / folder.relative_to(OUT)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("metrics.json", "fotf_config.yaml", "README.md", "reliability.png"):
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    panels = sorted((src / "panels").glob("*.png"))
    if panels:
        last_step = panels[-1].name.split("_")[1]
        (dst / "panels").mkdir(exist_ok=True)
        for panel in panels:
            if panel.name.split("_")[1] == last_step:
                shutil.copy2(panel, dst / "panels" / panel.name)


def figures(methods, seed: int, num_images: int = 3) -> None:
    """Uncertainty panels of each FOTF student of `seed` on `num_images` val images spread over
    the split (the loop's own panels show its first, near-identical video frames), into
    results/camvid_cpu/figures/<method>/."""
    from fotf_hf.config import load_config
    from fotf_hf.evaluation import load_student
    from fotf_hf.training.build import build_data
    from fotf_hf.viz import write_uncertainty_panels

    for method in methods:
        folder = REPO / OUT / method / f"seed{seed}"
        if not (folder / "model.safetensors").is_file():
            continue
        cfg = load_config(folder / "fotf_config.yaml")
        if cfg.data.root is not None:  # relative to the repo; an absolute root stays as it is
            cfg.data.root = str(REPO / cfg.data.root)
        _, eval_set, info = build_data(cfg)
        paths = write_uncertainty_panels(load_student(folder), eval_set, info, REPO / RESULTS / "figures" / method,
                                         step=cfg.optim.max_steps, num_images=num_images,
                                         fotf=cfg.fotf if cfg.fotf.enabled else None, num_samples=cfg.fotf.num_samples,
                                         normalization=cfg.data.normalization, device="cpu")
        print(f"[study] figures: {[str(p.relative_to(REPO)) for p in paths]}", flush=True)


def best_point(method: str) -> tuple:
    """(kappa, m) of the sweep run with the highest final mIoU (evaluate.py's)."""
    scores = {}
    for kappa, m in SWEEPS[method]:
        folder = REPO / OUT / "sweep" / f"{method}_kappa{kappa}_m{m}"
        if (folder / FAILED).is_file():
            continue
        scores[(kappa, m)] = val_metrics(folder.relative_to(REPO))["mean_iou"]
    return max(scores, key=scores.get)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep_seed", type=int, default=100)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--figures_only", action="store_true", help="only redraw the figures of finished runs")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    if not os.environ.get("FOTF_CAMVID_ROOT"):
        parser.error("set FOTF_CAMVID_ROOT to CamVid's folder (training and evaluation read it from there)")
    (REPO / RESULTS).mkdir(parents=True, exist_ok=True)
    start = time.time()
    fotf_methods = [m for m in args.methods if m in KAPPA_FROM]
    if args.figures_only:
        figures(fotf_methods, args.seeds[0])
        return 0

    train_and_evaluate("teacher", "teacher.yaml", OUT / "teacher", [], args.dry_run)
    chosen = {}
    for method, points in SWEEPS.items():
        for kappa, m in points:
            folder = OUT / "sweep" / f"{method}_kappa{kappa}_m{m}"
            overrides = ["--fotf.kappa", str(kappa), "--fotf.m", str(m), "--run.seed", str(args.sweep_seed)]
            train_and_evaluate(method, f"{method}.yaml", folder, overrides, args.dry_run, may_fail=True)
        chosen[method] = (3, 1) if args.dry_run else best_point(method)
        print(f"[study] {method}: kappa, m = {chosen[method]} (best of the seed-{args.sweep_seed} sweep)", flush=True)
    for seed in args.seeds:
        for method in args.methods:
            overrides = ["--run.seed", str(seed)]
            if method in KAPPA_FROM:
                kappa, m = chosen[KAPPA_FROM[method]]
                overrides += ["--fotf.kappa", str(kappa), "--fotf.m", str(m)]
            train_and_evaluate(method, f"{method}.yaml", OUT / method / f"seed{seed}", overrides, args.dry_run)

    if not args.dry_run:
        from fotf_hf.data.info import CAMVID_CLASSES
        from fotf_hf.report import difference_table, load_run, markdown_tables

        runs = [r for r in map(load_run, sorted((REPO / OUT).glob("*/seed*"))) if r is not None]
        sweep = [r for r in map(load_run, sorted((REPO / OUT / "sweep").glob("*"))) if r is not None]
        teacher = load_run(REPO / OUT / "teacher")
        label = {r.folder.parent.name: r.label for r in runs}  # e.g. kd_fotf -> "kd + FOTF (kappa 1, m 1)"
        pairs = [(label[b], label[f"{b}_fotf"]) for b in ("ce", "kd", "cirkd") if b in label and f"{b}_fotf" in label]
        failed = [f"- `{f.parent.relative_to(REPO / OUT)}`: {f.read_text().strip()}"
                  for f in sorted((REPO / OUT).glob("**/" + FAILED))]
        text = ["# CamVid CPU-scale study: generated by scripts/camvid_cpu_study.py", "",
                f"kappa/m chosen on the seed-{args.sweep_seed} sweep: {json.dumps({k: list(v) for k, v in chosen.items()})}", "",
                "## Teacher", "", markdown_tables([teacher], CAMVID_CLASSES), "## Students", "",
                markdown_tables(runs, CAMVID_CLASSES), "## FOTF minus its baseline, paired by seed", "",
                difference_table(runs, pairs), "## Sweep", "", markdown_tables(sweep, CAMVID_CLASSES),
                "Runs that stopped (reported, not scored):", "", *(failed or ["- none"]), ""]
        (REPO / RESULTS / "summary.md").write_text("\n".join(text))
        figures(fotf_methods, args.seeds[0])
        print((REPO / RESULTS / "summary.md").read_text())
    print(f"[study] finished in {(time.time() - start) / 60:.1f} min", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
