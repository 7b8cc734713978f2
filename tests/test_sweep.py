"""Sweep grid construction and result aggregation (against hand-computed mean/std)."""

import json
import math

import pytest
import yaml

from fotf_hf.sweep import GridPoint, collect_results, grid, overrides_for


def test_grid_is_the_full_product_and_rejects_non_positive_values():
    points = grid([1, 5], [1, 10], [0, 1, 2])
    assert len(points) == 12 and GridPoint(5.0, 10.0, 2) in points
    with pytest.raises(ValueError, match="must be > 0"):
        grid([0], [1], [0])
    with pytest.raises(ValueError, match="empty"):
        grid([], [1], [0])


def test_overrides_enable_fotf_with_the_point_values(tmp_path):
    args = overrides_for(GridPoint(3.0, 10.0, 1), tmp_path)
    pairs = dict(zip(args[::2], args[1::2]))
    assert pairs["--fotf.kappa"] == "3" and pairs["--fotf.m"] == "10" and pairs["--run.seed"] == "1"
    assert pairs["--fotf.enabled"] == "true" and pairs["--run.output_dir"].endswith("kappa3_m10_seed1")


def _fake_run(root, kappa, m, seed, miou, ece):
    folder = root / f"kappa{kappa}_m{m}_seed{seed}"
    folder.mkdir()
    final = {"mean_iou": miou, "ece": ece, "pixel_accuracy": 0.9, "per_class_iou": [miou]}
    (folder / "metrics.json").write_text(json.dumps(
        {"final": final, "best_mean_iou": miou, "wall_time_s": 10.0, "steps": 100}))
    (folder / "fotf_config.yaml").write_text(yaml.safe_dump(
        {"method": {"name": "kd"}, "fotf": {"enabled": True, "kappa": kappa, "m": m}, "run": {"seed": seed}}))
    return folder


def test_collect_results_aggregates_mean_and_sample_std(tmp_path):
    folders = [
        _fake_run(tmp_path, 1, 1, 0, 0.50, 0.04),
        _fake_run(tmp_path, 1, 1, 1, 0.54, 0.06),
        _fake_run(tmp_path, 1, 1, 2, 0.58, 0.05),
        _fake_run(tmp_path, 5, 1, 0, 0.60, 0.03),
    ]
    folders.append(tmp_path / "missing")  # a run that never finished is left out, not an error
    summary = collect_results(folders, tmp_path / "s.csv", tmp_path / "s.md")
    mean, std = summary["kd + FOTF (kappa 1, m 1)"]["mean_iou"]
    assert mean == pytest.approx(0.54) and std == pytest.approx(0.04)  # stdev of 0.50, 0.54, 0.58
    one_seed = summary["kd + FOTF (kappa 5, m 1)"]["mean_iou"]
    assert one_seed[0] == pytest.approx(0.60) and math.isnan(one_seed[1])  # one run: no spread, not 0
    assert summary["kd + FOTF (kappa 1, m 1)"]["n"] == 3
    assert len((tmp_path / "s.csv").read_text().strip().splitlines()) == 5
    assert "| kd + FOTF (kappa 1, m 1) | 3 (0, 1, 2) | 54.00 +- 4.00 | 5.00 +- 1.00 | 0.2 |" in (tmp_path / "s.md").read_text()
