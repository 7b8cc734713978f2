"""`log_history.jsonl`: one JSON line per logging step, mean/max aggregation, resume without duplicates.

Tiny random DeepLabV3 student and teacher on `synthetic-streets`, a few CPU steps each.
"""

import json

import pytest
import yaml

from fotf_hf.config import load_config
from fotf_hf.training import LOG_HISTORY_FILE, read_log_history, train

TINY_MODEL = {"arch": "deeplabv3", "backbone": "resnet18",
              "overrides": {"backbone_base_width": 8, "head_channels": 16}}
TINY_DATA = {"name": "synthetic-streets", "options": {"num_train": 8, "num_val": 4, "image_size": [32, 48]},
             "crop_size": [32, 48], "scale_range": [0.75, 1.25]}
FOTF_STATS = ("sigma_mean", "sigma_p99", "weight_kd_mean", "weight_kd_p99", "weight_kd_max",
              "weight_ce_mean", "weight_ce_p99", "weight_ce_max")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A random tiny teacher saved with `save_pretrained` (no training needed to test logging)."""
    from fotf_hf.data import build_dataset
    from fotf_hf.models import create_model

    _, info = build_dataset(TINY_DATA["name"], root=None, **TINY_DATA["options"])
    folder = tmp_path_factory.mktemp("teacher") / "teacher"
    create_model("deeplabv3", "resnet18", num_labels=info.num_labels, id2label=info.id2label,
                 backbone_base_width=16, head_channels=16).save_pretrained(folder)
    return folder


def config(tmp_path, teacher_dir, name, fotf=True, **run):
    data = {
        "student": dict(TINY_MODEL),
        "teacher": {**TINY_MODEL, "overrides": {"backbone_base_width": 16, "head_channels": 16},
                    "pretrained": str(teacher_dir)},
        "method": {"name": "kd"},
        "fotf": {"enabled": True, "kappa": 3.0} if fotf else {"enabled": False},
        "data": dict(TINY_DATA),
        "optim": {"lr": 0.01, "max_steps": run.pop("max_steps", 4), "batch_size": 2},
        "run": {"output_dir": str(tmp_path / name), "eval_every": 100, "save_every": 100, "log_every": 1,
                "report_to": [], "num_panels": 0, "eval_batch_size": 2, "progress_bar": False, "seed": 0,
                **run},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


@pytest.fixture(scope="module")
def fotf_runs(tmp_path_factory, teacher_dir):
    """The same 4-step KD+FOTF run logged every step and every 2 steps; also what went to the trackers."""
    from accelerate import Accelerator

    tmp = tmp_path_factory.mktemp("fotf_runs")
    runs = {}
    for every in (1, 2):
        tracked = []
        real_log = Accelerator.log

        def log(self, values, step=None, **kwargs):
            tracked.append((step, dict(values)))
            return real_log(self, values, step=step, **kwargs)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Accelerator, "log", log)
            train(config(tmp, teacher_dir, f"every{every}", log_every=every))
        runs[every] = (read_log_history(tmp / f"every{every}" / LOG_HISTORY_FILE), tracked)
    return runs


def test_one_line_per_logging_step_with_terms_and_fotf_stats(fotf_runs):
    lines, tracked = fotf_runs[2]
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        terms = {k: v for k, v in line.items()
                 if k not in ("step", "lr", "loss") and not k.startswith("fotf/")}
        assert terms, line
        assert line["loss"] == pytest.approx(sum(terms.values()), rel=1e-6)
        assert 0.0 <= line["lr"] < 0.01  # poly schedule: 0 after the last step
        for stat in FOTF_STATS:
            assert isinstance(line[f"fotf/{stat}"], float), stat
    # TensorBoard (the trackers) gets the same numbers: terms under train/, FOTF under fotf/.
    train_logs = [(step, values) for step, values in tracked if "train/loss" in values]
    assert [step for step, _ in train_logs] == [2, 4]
    for line, (_, values) in zip(lines, train_logs):
        assert not any(k.startswith("train/fotf") for k in values)
        for key, value in line.items():
            if key != "step":
                assert values[key if key.startswith("fotf/") else f"train/{key}"] == pytest.approx(value), key


def test_max_is_the_max_over_the_interval_and_the_rest_the_mean(fotf_runs):
    every_step, _ = fotf_runs[1]
    every_two, _ = fotf_runs[2]
    assert [line["step"] for line in every_step] == [1, 2, 3, 4]
    for pair, line in zip((every_step[0:2], every_step[2:4]), every_two):
        assert line.keys() == pair[0].keys()
        for key, value in line.items():
            if key == "step":
                continue
            if key.endswith("_max"):
                expected = max(p[key] for p in pair)
            elif key == "lr":
                expected = pair[1][key]  # the rate after the interval's last step
            else:
                expected = (pair[0][key] + pair[1][key]) / 2
            assert value == pytest.approx(expected, rel=1e-5), key
    # the per-step maxima differ within an interval, so max and mean aggregation give different numbers
    pairs = (every_step[0:2], every_step[2:4])
    assert any(a["fotf/weight_kd_max"] != b["fotf/weight_kd_max"] for a, b in pairs)


def test_run_without_fotf_logs_no_fotf_keys(tmp_path, teacher_dir):
    train(config(tmp_path, teacher_dir, "plain", fotf=False, max_steps=2))
    lines = read_log_history(tmp_path / "plain" / LOG_HISTORY_FILE)
    assert [line["step"] for line in lines] == [1, 2]
    assert not any(k.startswith("fotf/") for line in lines for k in line)
    assert all({"lr", "loss"} < line.keys() for line in lines)


def test_resume_drops_lines_after_the_checkpoint_and_keeps_appending(tmp_path, teacher_dir):
    train(config(tmp_path, teacher_dir, "run", max_steps=2, save_every=2))
    path = tmp_path / "run" / LOG_HISTORY_FILE
    logged = read_log_history(path)
    assert [line["step"] for line in logged] == [1, 2]
    # killed after logging step 3 but before its checkpoint, mid-way through writing step 4
    with open(path, "a") as f:
        f.write(json.dumps({**logged[-1], "step": 3, "loss": -1.0}) + "\n" + '{"step": 4, "lr": 0.0')

    train(config(tmp_path, teacher_dir, "run", max_steps=4, save_every=2, resume="latest"))
    lines = read_log_history(path)
    assert [line["step"] for line in lines] == [1, 2, 3, 4]
    assert lines[:2] == logged  # the lines up to the checkpoint are kept as they were
    assert lines[2]["loss"] != -1.0  # the stale step-3 line was replaced by the resumed run's
    assert path.read_text().endswith("\n") and not (tmp_path / "run" / (LOG_HISTORY_FILE + ".tmp")).exists()


def test_reader_skips_a_truncated_last_line_only(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
    assert read_log_history(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    path.write_text('{"step": 1, "loss": 0.5}\n')
    assert read_log_history(path) == [{"step": 1, "loss": 0.5}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 0.4}\n')
    with pytest.raises(ValueError, match="line 1"):
        read_log_history(path)


def test_tensorboard_gets_the_config_and_the_same_scalars(tmp_path, teacher_dir):
    """With `report_to: [tensorboard]` (the default) the config goes in as hparams (lists and None
    as text) and each logged value as a scalar at its step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(config(tmp_path, teacher_dir, "tb", report_to=["tensorboard"]))
    events = next((tmp_path / "tb" / "logs").rglob("events.out.tfevents.*")).parent
    acc = EventAccumulator(str(events))
    acc.Reload()
    lines = read_log_history(tmp_path / "tb" / LOG_HISTORY_FILE)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [line["step"] for line in lines]
    assert [e.value for e in loss] == pytest.approx([line["loss"] for line in lines], rel=1e-6)
    assert "fotf/weight_kd_max" in acc.Tags()["scalars"]
