"""What a run guarantees about its output folder: run identity, resume, divergence, safe checkpoints.

Each test is a case an attack on the loop broke before: resuming another config's checkpoint, a
new run mixing its files with an old one's, `--resume latest` on a finished run, bad `--resume`
paths, non-finite state saved silently, and checkpoints that run code when loaded.
"""

import dataclasses
import json
import os
import pickle

import pytest
import torch
import yaml

from fotf_hf.config import ConfigError, ExperimentConfig, _build, load_config, parse_overrides
from fotf_hf.training import CheckpointError, NonFiniteLossError, train

from test_training import tiny_config


def _files(folder):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_resume_refuses_a_checkpoint_of_another_config_and_names_the_keys(tmp_path):
    train(load_config(tiny_config(tmp_path, "run", optim={"max_steps": 2}, run={"num_panels": 0, "save_every": 2})))
    other = load_config(tiny_config(tmp_path, "run", optim={"max_steps": 4, "lr": 0.05},
                                    run={"num_panels": 0, "resume": "latest"}, data={"scale_range": [1.0, 1.0]}))
    with pytest.raises(CheckpointError, match=r"another config \(data.scale_range: \[0.75, 1.25\] there, \[1.0, 1.0\] now; "
                                              r"optim.lr: 0.01 there, 0.05 now\)"):
        train(other)
    # Run-only fields (longer max_steps, cadence) do not make it another run: it resumes.
    longer = load_config(tiny_config(tmp_path, "run", optim={"max_steps": 3},
                                     run={"num_panels": 0, "resume": "latest", "log_every": 3}))
    assert train(longer)["steps"] == 3


def test_a_new_run_does_not_mix_its_files_with_an_old_one(tmp_path):
    first = tiny_config(tmp_path, "run", optim={"max_steps": 4}, run={"num_panels": 0})
    train(load_config(first))
    out = tmp_path / "run"
    before = _files(out)
    second = tiny_config(tmp_path, "run", optim={"max_steps": 2, "lr": 0.02}, run={"num_panels": 0})
    with pytest.raises(ConfigError, match=r"already holds a run \(model.safetensors, metrics.json, best, checkpoints\).*"
                                          r"--resume latest.*--run.overwrite true"):
        train(load_config(second))
    assert _files(out) == before  # nothing touched, the config beside the weights still describes them

    train(load_config(second, ["--run.overwrite", "true"]))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1
    old_ckpt = aside[0] / "checkpoints" / "step_0000004"
    assert old_ckpt.is_dir() and (aside[0] / "model.safetensors").is_file()  # moved, not deleted
    assert json.loads((aside[0] / "metrics.json").read_text())["steps"] == 4
    # The new run's checkpoints are its own: the old step_4 did not survive pruning in its place.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    assert yaml.safe_load((out / "fotf_config.yaml").read_text())["optim"]["lr"] == 0.02


def test_resume_latest_on_a_finished_run_changes_nothing(tmp_path, capsys):
    path = tiny_config(tmp_path, "run", optim={"max_steps": 2}, run={"num_panels": 0})
    first = train(load_config(path))
    out = tmp_path / "run"
    before = _files(out)
    again = train(load_config(path, ["--run.resume", "latest"]))
    assert "holds a finished run (step 2); nothing to do" in capsys.readouterr().out
    assert _files(out) == before
    assert again["final"]["mean_iou"] == pytest.approx(first["final"]["mean_iou"])


@pytest.mark.parametrize("target,message", [
    (".tmp_step_0000002", "is an incomplete checkpoint"),
    ("nowhere", "is not a checkpoint folder"),
    ("empty", "is not a checkpoint of this fotf-hf version"),
])
def test_bad_resume_paths_get_a_message(tmp_path, target, message):
    (tmp_path / ".tmp_step_0000002").mkdir()
    (tmp_path / "empty").mkdir()
    cfg = load_config(tiny_config(tmp_path, "run", run={"resume": str(tmp_path / target)}))
    with pytest.raises(CheckpointError, match=message):
        train(cfg)


class _Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl"])
def test_a_planted_pickle_in_a_checkpoint_never_runs(tmp_path, victim):
    path = tiny_config(tmp_path, "run", optim={"max_steps": 2}, run={"num_panels": 0, "save_every": 1})
    cfg = load_config(path, ["--optim.max_steps", "1"])
    train(cfg)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_0000001"
    marker = tmp_path / "PWNED"
    with open(checkpoint / victim, "wb") as f:
        pickle.dump(_Payload(marker), f)
    with pytest.raises(CheckpointError, match=r"refusing to unpickle it because that could run code") as err:
        train(load_config(path, ["--run.resume", "latest"]))
    assert "weights_only=False" not in str(err.value) and str(checkpoint) in str(err.value)
    assert not marker.exists()


def test_state_that_turns_non_finite_stops_the_run_before_it_is_saved(tmp_path, monkeypatch):
    """The loss stays finite but an update leaves an inf BatchNorm variance (what kappa 30, m 10
    did): the run stops, names the step, saves nothing after the last good checkpoint."""
    import fotf_hf.training.loop as loop

    real = loop.build_optimizer

    def poisoning(cfg, module):
        optimizer, scheduler = real(cfg, module)
        step = optimizer.step
        calls = {"n": 0}

        def poisoned_step(*args, **kwargs):
            out = step(*args, **kwargs)
            calls["n"] += 1
            if calls["n"] == 3:
                bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))
                bn.running_var.fill_(float("inf"))
            return out

        optimizer.step = poisoned_step
        return optimizer, scheduler

    monkeypatch.setattr(loop, "build_optimizer", poisoning)
    cfg = load_config(tiny_config(tmp_path, "inf", optim={"max_steps": 6},
                                  run={"save_every": 2, "eval_every": 6, "log_every": 4, "num_panels": 0},
                                  fotf={"enabled": True, "apply_to": "ce", "kappa": 2.0}))
    with pytest.raises(NonFiniteLossError, match=r"non-finite values at step 3 \(noticed at step 4\): the parameters or "
                                                 r"buffers after the optimiser step\. The last good checkpoint \(step 2\)"
                                                 r" is kept") as err:
        train(cfg)
    assert "lower fotf.kappa" not in str(err.value)  # the weights were small: no advice about them
    out = tmp_path / "inf"
    assert not (out / "model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000002"]
    from safetensors.torch import load_file

    saved = load_file(str(out / "checkpoints" / "step_0000002" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values() if t.is_floating_point())


def test_an_infinite_learning_rate_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optim.lr = inf must be a finite number > 0"):
        load_config(overrides=["--optim.lr", ".inf"])


def _choice_fields():
    defaults = ExperimentConfig()
    for section in dataclasses.fields(defaults):
        value = getattr(defaults, section.name)
        for f in dataclasses.fields(value) if dataclasses.is_dataclass(value) else ():
            choices = f.metadata.get("choices", ())
            for choice in choices() if callable(choices) else choices:
                yield f"{section.name}.{f.name}", choice


@pytest.mark.parametrize("key,choice", list(_choice_fields()))
def test_every_choice_of_every_string_field_reads_as_itself(tmp_path, key, choice):
    """YAML reads unquoted no/off/yes/on as booleans; a field's own choices still arrive as strings,
    from the command line and from a file."""
    section, name = key.split(".")
    from_cli = _build(ExperimentConfig, parse_overrides([f"--{key}", choice]), "")
    (tmp_path / "c.yaml").write_text(f"{section}:\n  {name}: {choice}\n")
    from_file = _build(ExperimentConfig, yaml.safe_load((tmp_path / "c.yaml").read_text()), "")
    assert getattr(getattr(from_cli, section), name) == choice == getattr(getattr(from_file, section), name)


def test_paper_weights_that_are_not_here_fail_at_once_offline(tmp_path, monkeypatch):
    """The paper configs name `pretrained/...` folders; offline, a missing one is one clear error
    before anything runs (no retries against the Hub, no output folder)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = load_config(tiny_config(tmp_path, "paper", student={"arch": "deeplabv3", "backbone": "resnet18",
                                                              "pretrained": "pretrained/deeplabv3-r18-imagenet-camvid"}))
    with pytest.raises(ConfigError, match=r"student.pretrained = 'pretrained/deeplabv3-r18-imagenet-camvid' is neither a "
                                          r"local folder nor a Hub model in this machine's cache.*Paper setting"):
        train(cfg)
    assert not (tmp_path / "paper").exists()
    (tmp_path / "empty").mkdir()
    cfg = load_config(tiny_config(tmp_path, "paper", student={"pretrained": str(tmp_path / "empty")}))
    with pytest.raises(ConfigError, match="is a folder without config.json"):
        train(cfg)


def _cached_synthetic(tmp_path, **options):
    """TINY_DATA's synthetic-streets, written as PNG files (so a test can damage one)."""
    return {"name": "synthetic-streets", "crop_size": [32, 48], "scale_range": [0.75, 1.25],
            "options": {"num_train": 8, "num_val": 4, "image_size": [32, 48], "cache_dir": str(tmp_path / "cache"), **options}}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_bad_validation_file_stops_the_run_before_the_first_step(tmp_path):
    from fotf_hf.data import BadSampleError, build_dataset

    data = _cached_synthetic(tmp_path)
    build_dataset("synthetic-streets", **data["options"])  # writes the files
    bad = next((tmp_path / "cache").glob("*/validation/00002.png"))
    _truncate(bad)
    cfg = load_config(tiny_config(tmp_path, "run", data=data, run={"eval_every": 100}))
    with pytest.raises(BadSampleError, match=r"validation.*00002\.png"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()  # found before any step, nothing to lose


def test_skip_trains_on_with_full_batches_and_logs_the_count(tmp_path):
    from fotf_hf.data import build_dataset
    from fotf_hf.training import read_log_history

    data = {**_cached_synthetic(tmp_path), "on_bad_sample": "skip", "max_skip_fraction": 0.2}
    build_dataset("synthetic-streets", **data["options"])
    _truncate(next((tmp_path / "cache").glob("*/train/00003.png")))
    cfg = load_config(tiny_config(tmp_path, "run", data=data, optim={"max_steps": 4, "batch_size": 4},
                                  run={"num_panels": 0}))
    assert train(cfg)["steps"] == 4  # two epochs over 8 samples: the bad one is met twice
    log = read_log_history(tmp_path / "run" / "log_history.jsonl")
    assert log[-1]["data/skipped"] == 2 and log[0]["data/skipped"] in (0, 1)


def test_a_run_killed_after_its_last_checkpoint_is_published_on_resume(tmp_path):
    """The last checkpoint was written but the final folder was not (killed in between): resuming
    evaluates and publishes it, with real metrics (not an empty `final`)."""
    import shutil

    path = tiny_config(tmp_path, "run", optim={"max_steps": 2}, run={"num_panels": 0})
    first = train(load_config(path))
    out = tmp_path / "run"
    for name in ("model.safetensors", "config.json", "metrics.json", "README.md"):
        (out / name).unlink()
    shutil.rmtree(out / "best")
    again = train(load_config(path, ["--run.resume", "latest"]))
    assert again["final"]["mean_iou"] == pytest.approx(first["final"]["mean_iou"], abs=1e-6)
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2 and (out / "model.safetensors").is_file()
