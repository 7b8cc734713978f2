"""Grid sweeps over FOTF's kappa and m (paper 4.1: kappa in 1..10, m in {1, 3, 10}) and seeds.

`run_sweep` trains one run per grid point (in this process, or as separate `accelerate launch`
jobs), skips runs whose `metrics.json` already exists (so an interrupted sweep resumes), and
`collect_results` writes one CSV and a Markdown table with per-run and aggregated (mean +- std
over seeds) mIoU and ECE.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

PAPER_KAPPAS = tuple(range(1, 11))
PAPER_MS = (1.0, 3.0, 10.0)


@dataclass(frozen=True)
class GridPoint:
    kappa: float
    m: float
    seed: int

    @property
    def name(self) -> str:
        return f"kappa{self.kappa:g}_m{self.m:g}_seed{self.seed}"


def grid(kappas: Iterable[float], ms: Iterable[float], seeds: Iterable[int]) -> List[GridPoint]:
    """All (kappa, m, seed) combinations; kappa and m must be > 0 (eq. 7)."""
    points = [GridPoint(float(k), float(m), int(s)) for k, m, s in itertools.product(kappas, ms, seeds)]
    bad = [p for p in points if p.kappa <= 0 or p.m <= 0]
    if bad:
        raise ValueError(f"kappa and m must be > 0; got {bad[0]}")
    if not points:
        raise ValueError("the sweep grid is empty: give at least one kappa, one m and one seed")
    return points


def overrides_for(point: GridPoint, output_root: Path) -> List[str]:
    return [
        "--fotf.enabled", "true",
        "--fotf.kappa", f"{point.kappa:g}",
        "--fotf.m", f"{point.m:g}",
        "--run.seed", str(point.seed),
        "--run.output_dir", str(output_root / point.name),
    ]


def run_sweep(
    config: str,
    points: Sequence[GridPoint],
    output_root: str | Path,
    extra_overrides: Sequence[str] = (),
    launcher: Optional[Sequence[str]] = None,
) -> List[Path]:
    """Train every grid point; returns the run folders.

    Args:
        config: base experiment YAML (its method gets `fotf.enabled = true` and the point's values).
        launcher: None to train in this process, one after the other; otherwise the command that
            starts `scripts/distill.py`, e.g. `["accelerate", "launch", "--config_file", "x.yaml"]`.
    """
    from .config import load_config
    from .training import train

    output_root = Path(output_root)
    folders = []
    for point in points:
        folder = output_root / point.name
        folders.append(folder)
        if (folder / "metrics.json").is_file():
            print(f"[sweep] {point.name}: done already, skipped", flush=True)
            continue
        overrides = overrides_for(point, output_root) + list(extra_overrides)
        if (folder / "checkpoints").is_dir():
            overrides += ["--run.resume", "latest"]
        print(f"[sweep] {point.name}: {shlex.join(overrides)}", flush=True)
        if launcher is None:
            train(load_config(config, overrides))
        else:
            script = Path(__file__).resolve().parents[1] / "scripts" / "distill.py"
            subprocess.run([*launcher, str(script), "--config", str(config), *overrides], check=True)
    return folders


def _mean_std(values: List[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect_results(folders: Iterable[str | Path], csv_path: str | Path, markdown_path: str | Path) -> Dict[str, dict]:
    """Read `metrics.json` and `fotf_config.yaml` of each run; write a CSV and a Markdown table.

    Returns `{"(kappa, m)": {"mean_iou": (mean, std), "ece": (mean, std), "n": seeds}}`.
    """
    import yaml

    rows = []
    for folder in map(Path, folders):
        metrics_file = folder / "metrics.json"
        if not metrics_file.is_file():
            continue
        metrics = json.loads(metrics_file.read_text())
        cfg = yaml.safe_load((folder / "fotf_config.yaml").read_text())
        rows.append({
            "run": folder.name,
            "kappa": cfg["fotf"]["kappa"],
            "m": cfg["fotf"]["m"],
            "seed": cfg["run"]["seed"],
            "mean_iou": metrics["final"]["mean_iou"],
            "ece": metrics["final"]["ece"],
            "best_mean_iou": metrics["best_mean_iou"],
            "wall_time_s": metrics["wall_time_s"],
        })
    csv_path, markdown_path = Path(csv_path), Path(markdown_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["run"])
        writer.writeheader()
        writer.writerows(rows)
    groups: Dict[tuple, List[dict]] = {}
    for row in rows:
        groups.setdefault((row["kappa"], row["m"]), []).append(row)
    summary = {}
    lines = [
        "| kappa | m | seeds | mIoU (%) mean +- std | ECE (%) mean +- std |",
        "| --- | --- | --- | --- | --- |",
    ]
    for (kappa, m), group in sorted(groups.items()):
        miou = _mean_std([100 * r["mean_iou"] for r in group])
        ece = _mean_std([100 * r["ece"] for r in group])
        summary[f"({kappa:g}, {m:g})"] = {"mean_iou": miou, "ece": ece, "n": len(group)}
        lines.append(f"| {kappa:g} | {m:g} | {len(group)} | {miou[0]:.2f} +- {miou[1]:.2f} | {ece[0]:.2f} +- {ece[1]:.2f} |")
    lines += ["", "| run | mIoU (%) | ECE (%) | wall (s) |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['run']} | {100 * r['mean_iou']:.2f} | {100 * r['ece']:.2f} | {r['wall_time_s']:.0f} |" for r in rows]
    markdown_path.write_text("\n".join(lines) + "\n")
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="FOTF kappa/m grid sweep (paper 4.1).")
    parser.add_argument("--config", required=True, help="base experiment YAML")
    parser.add_argument("--kappa", type=float, nargs="+", default=list(PAPER_KAPPAS))
    parser.add_argument("--m", type=float, nargs="+", default=list(PAPER_MS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--output_root", required=True)
    parser.add_argument("--launcher", default=None, help="e.g. 'accelerate launch --config_file accelerate_configs/single_gpu.yaml'")
    args, extra = parser.parse_known_args(argv)
    points = grid(args.kappa, args.m, args.seeds)
    folders = run_sweep(args.config, points, args.output_root, extra, shlex.split(args.launcher) if args.launcher else None)
    root = Path(args.output_root)
    summary = collect_results(folders, root / "sweep.csv", root / "sweep.md")
    print((root / "sweep.md").read_text())
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
