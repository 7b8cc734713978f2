"""`fotf_hf.report`: run folders -> grouped mean +- std tables, checked against hand-computed values."""

import json
import math

import pytest
import yaml

from fotf_hf.report import (
    difference_table,
    load_run,
    markdown_tables,
    minimum_detectable_effect,
    paired_ci,
    pairs_needed,
    run_label,
    seed_differences,
    summarize,
    t_quantile,
)


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


def test_seed_differences_pair_by_seed_and_compute_welch_t(tmp_path):
    fotf = {"enabled": True, "kappa": 1.0, "m": 1.0}
    base = [(0, 0.30, 0.08), (1, 0.34, 0.06), (2, 0.32, 0.07)]
    other = [(0, 0.33, 0.05), (1, 0.35, 0.05), (3, 0.40, 0.04)]  # seed 3 has no partner
    for seed, miou, ece in base:
        _write_run(tmp_path / "kd" / f"seed{seed}", seed, miou, ece, [miou])
    for seed, miou, ece in other:
        _write_run(tmp_path / "kd_fotf" / f"seed{seed}", seed, miou, ece, [miou], fotf=fotf)
    runs = [load_run(f) for f in sorted(tmp_path.glob("*/seed*"))]
    label = "kd + FOTF (kappa 1, m 1)"

    d = seed_differences(runs, "kd", label)
    assert d["seeds"] == [0, 1]
    assert d["differences"] == pytest.approx([0.03, 0.01])
    assert d["mean"] == pytest.approx(0.02) and d["std"] == pytest.approx(math.sqrt(2 * 0.01 ** 2))
    # by hand: means 0.32 / 0.36, variances 0.0004 / 0.0013, n = 3 each
    assert d["welch_t"] == pytest.approx(0.04 / math.sqrt(0.0004 / 3 + 0.0013 / 3))
    assert d["base_std"] == pytest.approx(0.02)

    table = difference_table(runs, [("kd", label)]).splitlines()
    assert table[2].startswith(f"| {label} vs kd | mIoU | 0: +3.00, 1: +1.00 | +2.00 +- 1.41 | 2.00 / 3.61 |")
    assert table[3].startswith(f"| {label} vs kd | ECE | 0: -3.00, 1: -1.00 | -2.00 +- 1.41 |")
    assert table[2].endswith("| [-10.71, +14.71] |")  # 2.00 +- 12.706 * 1.41 / sqrt(2)


def test_load_run_picks_one_evaluation_by_key(tmp_path):
    folder = tmp_path / "kd" / "seed0"
    _write_run(folder, 0, 0.40, 0.10, [0.4], evaluated=False)
    data = json.loads((folder / "metrics.json").read_text())
    data["evaluations"] = {
        "validation@180x240": {"settings": {}, "metrics": {**data["final"], "mean_iou": 0.41}},
        "test@180x240": {"settings": {}, "metrics": {**data["final"], "mean_iou": 0.37}},
    }
    (folder / "metrics.json").write_text(json.dumps(data))
    assert load_run(folder, "test@180x240").mean_iou == 0.37
    assert load_run(folder, "validation@180x240").mean_iou == 0.41
    assert load_run(folder, "test@360x480") is None  # not scored there yet
    with pytest.raises(ValueError, match="several evaluations.*test@180x240"):
        load_run(folder)


@pytest.mark.parametrize("sd,effect", [(1.0, 1.0), (4.5, 1.0), (2.0, 1.0), (1.0, 0.5)])
def test_pairs_needed_matches_the_exact_paired_t_test(sd, effect):
    """Against the exact power of a two-sided paired t-test (noncentral t, scipy)."""
    stats = pytest.importorskip("scipy.stats")

    def power(n):
        df, nc = n - 1, effect / sd * math.sqrt(n)
        crit = stats.t.ppf(0.975, df)
        return stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)

    exact = next(n for n in range(2, 10_000) if power(n) >= 0.8)
    assert abs(pairs_needed(sd, effect) - exact) <= 1
    if sd == effect == 1.0:
        assert exact == 10  # the textbook value for a standardised effect of 1
    mde = minimum_detectable_effect(sd, exact)
    assert mde <= effect * 1.05
    df = exact - 1
    crit = stats.t.ppf(0.975, df)
    assert stats.nct.sf(crit, df, mde / sd * math.sqrt(exact)) == pytest.approx(0.8, abs=0.03)


def test_t_quantile_and_paired_ci_against_scipy_and_by_hand():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30):
        for q in (0.9, 0.975, 0.995):
            assert t_quantile(q, df) == pytest.approx(stats.t.ppf(q, df), rel=1e-6)
    # two pairs: mean 0.02, sd 0.01 * sqrt(2), t_{0.975, 1} = 12.7062 (tables)
    low, high = paired_ci([0.03, 0.01])
    assert (low, high) == pytest.approx((0.02 - 12.7062 * 0.01, 0.02 + 12.7062 * 0.01), abs=1e-5)
    assert all(math.isnan(v) for v in paired_ci([0.03]))
    with pytest.raises(ValueError, match="0.5 < q < 1"):
        t_quantile(0.2, 3)


def test_labels_keep_fotf_variants_apart():
    base = {"enabled": True, "kappa": 10.0, "m": 1.0}
    assert run_label({"method": {"name": "kd"}, "fotf": {**base, "mode": "exact", "merge_kd": "per_pixel",
                                                         "merge_ce": "per_class"}}) == "kd + FOTF (kappa 10, m 1)"
    assert run_label({"method": {"name": "kd"}, "fotf": {**base, "mode": "classifier"}}) == \
        "kd + FOTF (kappa 10, m 1, mode classifier)"
    assert run_label({"method": {"name": "kd"}, "fotf": {**base, "merge_kd": "per_class", "merge_ce": "per_pixel"}}) == \
        "kd + FOTF (kappa 10, m 1, merges kd per_class / ce per_pixel)"
