"""scripts/camvid_v2_report.py on hand-made kept runs: the power line, the paired test differences,
the uncertainty and mechanism tables and the weights figure come from the right runs."""

import json
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from fotf_hf.report import minimum_detectable_effect, pairs_needed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # only while importing: scripts/evaluate.py shadows `evaluate`
try:
    import camvid_study_v2 as study  # noqa: E402
    import camvid_v2_report as report  # noqa: E402
finally:
    sys.path.pop(0)

KD_TEST = {0: 0.300, 1: 0.290, 2: 0.296}
FOTF_TEST = {0: 0.310, 1: 0.292, 2: 0.301}  # differences +1.0, +0.2, +0.5 points


def _metrics(miou, **extra):
    return {"mean_iou": miou, "ece": 0.05, "pixel_accuracy": 0.8, "per_class_iou": [miou] * 11, **extra}


def _kept_run(folder: Path, seed: int, fotf: dict, evaluations: dict, mechanism=None, log=None):
    folder.mkdir(parents=True)
    config = {"method": {"name": "kd"}, "fotf": fotf, "run": {"seed": seed}}
    (folder / "fotf_config.yaml").write_text(yaml.safe_dump(config))
    data = {"final": _metrics(0.0), "steps": 500, "wall_time_s": 600.0,
            "evaluations": {k: {"settings": {}, "metrics": v} for k, v in evaluations.items()}}
    (folder / "metrics.json").write_text(json.dumps(data))
    if mechanism is not None:
        regions = {name: {"boundary": {"weight_mean": 2.0, "sigma_mean": 0.1, "error_rate": 0.5, "pixels": 10},
                          "interior": {"weight_mean": 1.0, "sigma_mean": 0.0, "error_rate": 0.1, "pixels": 30}}
                   for name in ["overall", *report.CAMVID_CLASSES]}
        regions["overall"]["boundary"]["weight_mean"] = mechanism
        (folder / "mechanism_test.json").write_text(json.dumps({"settings": {}, "regions": regions}))
    if log is not None:
        (folder / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "REPO", tmp_path)
    val, test, mc = study.eval_key("validation"), study.eval_key("test"), study.eval_key("test", study.MC_SAMPLES)
    fotf = {"enabled": True, "kappa": 10.0, "m": 1.0, "mode": "exact", "merge_kd": "per_pixel", "merge_ce": "per_class"}
    log = [{"step": 10 * i, "fotf/weight_kd_mean": 1.0 + i, "fotf/weight_kd_p99": 2.0 + i,
            "fotf/weight_kd_max": 3.0 + i, "fotf/sigma_mean": 0.01} for i in range(1, 4)]
    for kappa, m in study.SWEEP:  # seed 0 of each sweep point; (10, 1) wins on val
        _kept_run(tmp_path / study.kept(study.fotf_folder(kappa, m, 0)), 0, {**fotf, "kappa": kappa, "m": m},
                  {val: _metrics(0.40 if (kappa, m) == (10, 1) else 0.35)}, log=log)
    for seed, miou in KD_TEST.items():
        _kept_run(tmp_path / study.kept(study.arm_folder("kd", seed, (10, 1))), seed, {"enabled": False},
                  {val: _metrics(0.37), test: _metrics(miou, nll=1.0 + seed, auroc_msp=0.8),
                   mc: _metrics(miou, auroc_sigma=0.7)}, mechanism=1.5)
    for seed, miou in FOTF_TEST.items():
        folder = tmp_path / study.kept(study.arm_folder("kd_fotf", seed, (10, 1)))
        if seed == 0:
            data = json.loads((folder / "metrics.json").read_text())
            data["evaluations"][test] = {"settings": {}, "metrics": _metrics(miou, nll=0.5)}
            data["evaluations"][mc] = {"settings": {}, "metrics": _metrics(miou, auroc_sigma=0.9)}
            (folder / "metrics.json").write_text(json.dumps(data))
        else:
            _kept_run(folder, seed, fotf, {val: _metrics(0.38), test: _metrics(miou, nll=0.5),
                                           mc: _metrics(miou, auroc_sigma=0.9)}, log=log)
    return tmp_path


def test_report_pairs_runs_by_seed_and_states_the_power(results):
    text = report.build_report()
    assert "kappa 10, m 1 (best val mIoU" in text
    diffs = [100 * (FOTF_TEST[s] - KD_TEST[s]) for s in sorted(KD_TEST)]
    sd = statistics.stdev(diffs)
    assert f"paired-difference std of test mIoU {sd:.2f} points" in text
    assert f"**{pairs_needed(sd, 1.0)}**" in text and f"**{minimum_detectable_effect(sd, 3):.2f} points**" in text
    test_part = text.split("## Seed-paired differences, test")[1].split("## Seed-paired differences, val")[0]
    row = next(line for line in test_part.splitlines() if "| mIoU |" in line)
    assert row.startswith("| kd + FOTF (kappa 10, m 1) vs kd | mIoU | 0: +1.00, 1: +0.20, 2: +0.50 |")
    assert f"{statistics.fmean(diffs):+.2f} +- {sd:.2f}" in row
    assert not math.isnan(float(row.split("[")[1].split(",")[0]))  # a CI with 3 pairs


def test_report_tables_uncertainty_mechanism_and_figure(results):
    text = report.build_report()
    unc = text.split("## Uncertainty metrics")[1].split("## Where")[0]
    kd_row = next(line for line in unc.splitlines() if line.startswith("| kd |"))
    assert "| 3 | 2.0000 +- 1.0000 |" in kd_row  # NLL over seeds 1, 2, 3
    assert "0.7000" in kd_row and "0.9000" not in kd_row
    mech = text.split("## Where the weights go")[1]
    assert "| kd | 3 | 1.5000 +- 0.0000 | 1.0000 +- 0.0000 |" in mech
    assert "| kd_fotf |" not in mech  # no mechanism file kept for the FOTF runs here
    assert (results / study.RESULTS / "fotf_weights.png").stat().st_size > 10_000
