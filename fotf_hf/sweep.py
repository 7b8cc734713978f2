"""Grid sweeps over FOTF's kappa and m (paper 4.1: kappa in 1..10, m in {1, 3, 10}) and seeds.

`run_sweep` trains one run per grid point (in this process, or as separate `accelerate launch`
jobs), skips runs whose `metrics.json` already exists (so an interrupted sweep resumes), and
`collect_results` writes one CSV and the Markdown tables of `fotf_hf.report` (per run, and mean
+- std over seeds per kappa/m).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from .config import load_config
from .report import load_run, markdown_tables, summarize
from .training import train

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


def collect_results(folders: Iterable[str | Path], csv_path: str | Path, markdown_path: str | Path) -> Dict[str, dict]:
    """Read each finished run (`fotf_hf.report.load_run`); write a CSV (one row per run) and the
    Markdown tables of `fotf_hf.report.markdown_tables` (one aggregation for sweeps and studies).

    Returns `fotf_hf.report.summarize` of the runs: `{label: {n, seeds, mean_iou: (mean, std), ...}}`
    with fractions, std NaN for a single run; labels name kappa and m.
    """
    runs = [r for r in map(load_run, folders) if r is not None]
    csv_path, markdown_path = Path(csv_path), Path(markdown_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run", "label", "seed", "mean_iou", "ece", "wall_time_s", "metrics_from"])
        writer.writerows([[r.folder.name, r.label, r.seed, r.mean_iou, r.ece, r.wall_time_s, r.source] for r in runs])
    markdown_path.write_text(markdown_tables(runs) if runs else "no finished runs\n")
    return summarize(runs)


def main(argv: Optional[Sequence[str]] = None) -> int:
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
