"""`log_history.jsonl`: the training log as JSON Lines, one object per logging step.

Each line (written by the main process every `run.log_every` steps and at the last step) is

    {"step": 20, "lr": 0.0098, "loss": 1.23, "<term>": ..., "fotf/sigma_mean": ..., "fotf/sigma_p99": ...,
     "fotf/weight_kd_mean": ..., "fotf/weight_kd_p99": ..., "fotf/weight_kd_max": ..., ...}

`loss` is the sum of the loss terms (named as `StepOutput.terms`); `fotf/<stat>` are the
`FotfResult.stats` (absent without FOTF); `data/skipped` (with `data.on_bad_sample: skip`) is the
number of training samples skipped so far in this session. Every value is the mean over the micro-steps since the
previous line, except keys ending in `_max`, which hold the maximum over them. `lr` is the
learning rate after the step's scheduler update (as `train/lr` in TensorBoard).

Each line goes out in one write + flush, so a killed run leaves whole lines, at worst plus one
truncated last line, which `read_log_history` skips. A resumed run first drops the lines after
its checkpoint's step (logged, then killed before the next checkpoint) and keeps appending, so
no step appears twice.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Union

LOG_HISTORY_FILE = "log_history.jsonl"

PathLike = Union[str, os.PathLike]


def read_log_history(path: PathLike) -> List[Dict[str, Any]]:
    """The lines of `path` as dicts, in file order; skips a truncated (unparsable) last line."""
    lines = [line for line in Path(path).read_text().split("\n") if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break  # cut off by a kill mid-write
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


def append_log_line(path: PathLike, record: Dict[str, Any]) -> None:
    """Append `record` as one JSON line, in a single write + flush (a killed process loses no whole line)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def truncate_log_history(path: PathLike, last_step: int) -> None:
    """Atomically rewrite `path` keeping only the lines with `step <= last_step` (and no truncated tail)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_log_history(path) if r.get("step", -1) <= last_step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
