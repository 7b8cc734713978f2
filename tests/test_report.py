"""`fotf_hf.report`: run folders -> grouped mean +- std tables, checked against hand-computed values."""

import json
import math

import pytest
import yaml

from fotf_hf.report import load_run, markdown_tables, run_label, summarize


def _write_run(folder, seed, miou, ece, per_class, fotf=None, evaluated=True, wall=120.0):
    folder.mkdir(parents=True)
    config = {"method": {"name": "kd"}, "fotf": fotf or {"enabled": False, "kappa": 1.0, "m": 1.0}, "run": {"seed": seed}}
    (folder / "fotf_config.yaml").write_text(yaml.safe_dump(config))
    final = {"mean_iou": miou - 0.5, "ece": ece, "pixel_accuracy": 0.9, "per_class_iou": per_class}
    data = {"final": final, "steps": 500, "wall_time_s": wall}
    if evaluated:
        data["evaluation"] = {"settings": {}, "metrics": {**final, "mean_iou": miou}}
    (folder / "metrics.json").write_text(json.dumps(data))


def test_labels_group_and_statistics(tmp_path):
    fotf = {"enabled": True, "kappa": 5.0, "m": 1.0}
    _write_run(tmp_path / "kd" / "seed0", 0, 0.40, 0.10, [0.5, None])
    _write_run(tmp_path / "kd" / "seed1", 1, 0.44, 0.06, [0.7, 0.2])
    _write_run(tmp_path / "kd_fotf" / "seed0", 0, 0.50, 0.05, [0.6, 0.3], fotf=fotf, evaluated=False, wall=60.0)
    (tmp_path / "unfinished").mkdir()
    runs = [r for r in map(load_run, [tmp_path / "kd" / "seed0", tmp_path / "kd" / "seed1",
                                      tmp_path / "kd_fotf" / "seed0", tmp_path / "unfinished"]) if r is not None]
    assert len(runs) == 3
    assert runs[0].source == "evaluate.py" and runs[0].mean_iou == 0.40  # evaluate.py's number wins
    assert runs[2].source == "training loop" and runs[2].mean_iou == 0.0  # final (0.50 - 0.5)
    assert runs[2].label == "kd + FOTF (kappa 5, m 1)" == run_label({"method": {"name": "kd"}, "fotf": fotf})

    s = summarize(runs)
    mean, std = s["kd"]["mean_iou"]
    assert mean == pytest.approx(0.42) and std == pytest.approx(math.sqrt(((0.02) ** 2 * 2) / 1))
    assert s["kd"]["ece"][0] == pytest.approx(0.08)
    assert s["kd"]["per_class_iou"] == pytest.approx([0.6, 0.2])  # NaN (absent class) skipped
    assert s["kd"]["seeds"] == [0, 1] and s["kd"]["n"] == 2
    assert math.isnan(s["kd + FOTF (kappa 5, m 1)"]["mean_iou"][1])  # one run: no std

    text = markdown_tables(runs, ["sky", "road"], order=["kd"])
    lines = text.splitlines()
    assert lines[2] == "| kd | 2 (0, 1) | 42.00 +- 2.83 | 8.00 +- 2.83 | 2.0 |"
    assert "| kd + FOTF (kappa 5, m 1) | 1 (0) | 0.00 | 5.00 | 1.0 |" in lines
    assert "| method | sky | road |" in lines
    assert sum(line.startswith("| kd/seed") or line.startswith("| kd_fotf/seed") for line in lines) == 3
