"""The README's main command, `scripts/demo.py`, end to end on a shrunken built-in dataset."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_three_models_and_the_reloaded_student_reproduces_its_scores(tmp_path):
    options = json.dumps({"num_train": 16, "num_val": 8, "image_size": [96, 128], "seed": 0})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "scripts/demo.py", "--output_dir", str(tmp_path), "--steps", "2",
         "--data.options", options, "--run.progress_bar", "false"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "): same" in proc.stdout  # AutoModelForSemanticSegmentation reload == the loop's evaluation
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert set(summary) == {"teacher", "kd", "kd_fotf", "reloaded_kd_fotf_mean_iou", "total_wall_time_s", "host"}
    assert summary["total_wall_time_s"] >= sum(summary[n]["wall_time_s"] for n in ("teacher", "kd", "kd_fotf"))
    assert "demo wall time:" in proc.stdout and "flags" in summary["host"]
    assert summary["reloaded_kd_fotf_mean_iou"] == pytest.approx(summary["kd_fotf"]["mean_iou"], abs=1e-6)
    for name in ("teacher", "kd", "kd_fotf"):
        for file in ("model.safetensors", "config.json", "README.md", "reliability.png"):
            assert (tmp_path / name / file).is_file(), f"{name}/{file}"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| student") or line.startswith("| teacher")]
    assert len(rows) == 3
