"""Checkpoints and output files of a run: never half-written, never another run's, never code.

A checkpoint `checkpoints/step_NNNNNNN/` is the Accelerate state (student + loss modules,
optimiser, RNG, data position; tensors only, read with `weights_only=True`) plus
`trainer_state.json`: the loop's counters, the scheduler state and the run's identity, the
fingerprint of its config (`run_fingerprint`). It is written to a temporary folder and renamed into
place, so a run killed at any moment leaves the previous checkpoint loadable. Nothing in a
checkpoint folder is unpickled with arbitrary classes: a planted pickle is refused, never run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from accelerate import Accelerator
from accelerate.utils import load as accelerate_load

from ..config import ConfigError, ExperimentConfig, flatten_config

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
BEST_DIR = "best"
STATE_FILE = "trainer_state.json"
# Config fields that may change between the sessions of one run: where and how often it writes,
# how long it runs (extending max_steps continues the same run) and the precision of the host.
RUN_ONLY_FIELDS = (
    "run.output_dir", "run.resume", "run.overwrite", "run.eval_every", "run.save_every", "run.log_every",
    "run.keep_checkpoints", "run.report_to", "run.num_panels", "run.eval_batch_size", "run.progress_bar",
    "run.mixed_precision", "optim.max_steps", "data.num_workers", "hub.",
)
# What a finished or running output folder holds; a new run refuses to mix its files with these.
RUN_FILES = ("model.safetensors", "metrics.json", BEST_DIR, CHECKPOINT_DIR)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used (incomplete, another config's, unsafe); the message says why."""


@dataclass
class TrainerState:
    """Loop counters saved with every checkpoint (in `trainer_state.json`)."""

    step: int = 0
    best_miou: float = -1.0
    best_step: int = -1
    history: List[Dict[str, Any]] = field(default_factory=list)
    # Training wall time up to the last checkpoint, so a resumed run reports its whole cost.
    wall_time_s: float = 0.0

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def run_identity(cfg: ExperimentConfig) -> Dict[str, Any]:
    """The flattened config minus `RUN_ONLY_FIELDS`: what makes two sessions the same run."""
    return {k: v for k, v in flatten_config(cfg.to_dict()).items()
            if not any(k == f or (f.endswith(".") and k.startswith(f)) for f in RUN_ONLY_FIELDS)}


def run_fingerprint(cfg: ExperimentConfig) -> str:
    """sha256 (16 hex digits) of `run_identity`."""
    text = json.dumps(run_identity(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _differences(saved: Dict[str, Any], now: Dict[str, Any], limit: int = 8) -> str:
    keys = sorted(k for k in set(saved) | set(now) if saved.get(k, "<absent>") != now.get(k, "<absent>"))
    shown = [f"{k}: {saved.get(k, '<absent>')!r} there, {now.get(k, '<absent>')!r} now" for k in keys[:limit]]
    return "; ".join(shown) + (f"; and {len(keys) - limit} more" if len(keys) > limit else "")


def _checkpoint_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.run.output_dir) / CHECKPOINT_DIR


def _step_folders(root: Path) -> List[Path]:
    return sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1])) if root.is_dir() else []


def read_checkpoint_record(path: Path) -> Dict[str, Any]:
    """`trainer_state.json` of a checkpoint folder, with a message for anything that is not one."""
    if path.name.startswith(".tmp_step_"):
        raise CheckpointError(f"{path} is an incomplete checkpoint (its save was interrupted); resume with "
                              f"--resume latest or a complete step_* folder")
    if not path.is_dir():
        raise CheckpointError(f"run.resume = {str(path)!r} is not a checkpoint folder (or use 'latest')")
    try:
        record = json.loads((path / STATE_FILE).read_text())
        record["fingerprint"], record["identity"], record["state"], record["scheduler"]  # noqa: B018
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{path} is not a checkpoint of this fotf-hf version (no readable {STATE_FILE}); "
                              f"resume from a step_* folder written by scripts/distill.py") from None
    return record


def find_checkpoint(cfg: ExperimentConfig) -> Optional[Path]:
    """Resolve `run.resume` (`latest`, a path, or None) to a checkpoint folder of this run's config.

    Raises:
        CheckpointError: an incomplete or foreign folder, or a checkpoint written by another config
            (the message names the keys that differ).
    """
    resume = cfg.run.resume
    if not resume:
        return None
    if resume == "latest":
        done = _step_folders(_checkpoint_root(cfg))
        if not done:
            logger.warning("run.resume = latest but %s holds no checkpoint: starting from scratch", _checkpoint_root(cfg))
            return None
        path = done[-1]
    else:
        path = Path(resume)
    record = read_checkpoint_record(path)
    if record["fingerprint"] != run_fingerprint(cfg):
        raise CheckpointError(
            f"{path} was written by another config ({_differences(record['identity'], run_identity(cfg))}); resume "
            f"with the config it was written with (fotf_config.yaml beside it) or start a new run elsewhere"
        )
    return path


def claim_output_dir(cfg: ExperimentConfig) -> None:
    """Make sure a new run (no checkpoint to resume) does not mix its files with another run's.

    An output folder that already holds weights, metrics or checkpoints is refused, unless
    `run.overwrite` is true: then those files are moved, not deleted, to the sibling folder
    `<output_dir>.replaced-<YYYYmmdd-HHMMSS>` (which the message names).
    """
    out = Path(cfg.run.output_dir)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return
    if not cfg.run.overwrite:
        raise ConfigError(
            f"run.output_dir {str(out)!r} already holds a run ({', '.join(found)}): continue it with --resume latest, "
            f"choose another --run.output_dir, or pass --run.overwrite true to move those files aside"
        )
    aside = out.with_name(f"{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir(parents=True)
    for name in (*RUN_FILES, "fotf_config.yaml", "README.md", "reliability.png", "panels", "log_history.jsonl"):
        if (out / name).exists():
            os.replace(out / name, aside / name)
    logger.warning("run.overwrite: the previous run's files in %s were moved to %s", out, aside)
    print(f"run.overwrite: the previous run's files were moved to {aside}")


def save_checkpoint(accelerator: Accelerator, cfg: ExperimentConfig, state: TrainerState, scheduler) -> Path:
    """Save into a temporary folder, then rename: the previous checkpoint stays valid until then.
    Prunes to `run.keep_checkpoints`, counting only this run's checkpoints."""
    root = _checkpoint_root(cfg)
    final = root / f"step_{state.step:07d}"
    tmp = root / f".tmp_step_{state.step:07d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fingerprint = run_fingerprint(cfg)
        record = {"fingerprint": fingerprint, "identity": run_identity(cfg), "state": state.state_dict(),
                  "scheduler": scheduler.state_dict()}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=1, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ours = [p for p in _step_folders(root) if _fingerprint_of(p) == fingerprint]
        for old in ours[: -cfg.run.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in root.glob(".tmp_step_*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fingerprint_of(path: Path) -> Optional[str]:
    try:
        return read_checkpoint_record(path)["fingerprint"]
    except CheckpointError:
        return None


def load_checkpoint(accelerator: Accelerator, path: Path, state: TrainerState, scheduler) -> None:
    """Restore a checkpoint found by `find_checkpoint`. Every file is read as data: the Accelerate
    state with `weights_only=True` (tensors and plain containers), the loop's own state as JSON."""
    record = read_checkpoint_record(path)
    foreign = sorted(p.name for p in path.glob("custom_checkpoint_*"))
    if foreign:  # Accelerate would unpickle these with weights_only=False; this loop never writes them
        raise CheckpointError(f"{path} holds {', '.join(foreign)}, which scripts/distill.py does not write; refusing to "
                              f"unpickle it because that could run code. Remove it if you trust nothing in it")
    try:
        # Accelerate skips RNG files it cannot read (a resume would silently lose bit-exactness):
        # read them first, as Accelerate does (weights_only=True and its allow-list), to fail loudly.
        for rng_file in sorted(path.glob("random_states_*.pkl")):
            accelerate_load(rng_file)
        accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as err:
        # torch's message suggests weights_only=False, i.e. running whatever the file holds: not here.
        culprit = str(err).split("Unsupported global: ")[-1].split(" ")[0] if "Unsupported global" in str(err) else ""
        raise CheckpointError(
            f"{path} holds a file that is not plain tensor data{f' (it needs {culprit})' if culprit else ''}; "
            f"refusing to unpickle it because that could run code. Use a checkpoint written by scripts/distill.py"
        ) from None
    state.load_state_dict(record["state"])
    scheduler.load_state_dict(record["scheduler"])


def finished_run(cfg: ExperimentConfig, checkpoint: Optional[Path]) -> Optional[Dict[str, Any]]:
    """The saved `metrics.json` when `checkpoint` is the end of a run whose weights are published."""
    out = Path(cfg.run.output_dir)
    if checkpoint is None or not (out / "model.safetensors").is_file() or not (out / "metrics.json").is_file():
        return None
    step = read_checkpoint_record(checkpoint)["state"]["step"]
    if step < cfg.optim.max_steps:
        return None
    return json.loads((out / "metrics.json").read_text())


def save_student(student, folder: Path) -> None:
    """`save_pretrained` into `folder` via a temporary sibling and a rename (never half-written)."""
    folder = Path(folder)
    tmp = folder.parent / f".tmp_{folder.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    student.model.save_pretrained(tmp)
    if folder.exists():
        old = folder.parent / f".old_{folder.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def publish_files(src: Path, dst: Path) -> None:
    """Move every file of `src` into `dst` with atomic renames (for the final output folder)."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        os.replace(item, dst / item.name)
    src.rmdir()


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary file + rename)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)
