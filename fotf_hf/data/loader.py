"""Seeded `DataLoader` construction for transformed segmentation datasets."""

from __future__ import annotations

import inspect
import math
import random
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from .transforms import BadSampleError, TooManyBadSamplesError, defer_decoding

__all__ = ["SeededTransformDataset", "collate_segmentation", "create_dataloader", "seed_worker"]


def seed_worker(worker_id: int) -> None:
    """`worker_init_fn`: derive NumPy's and `random`'s seeds from the worker's torch seed.

    `DataLoader` already gives each worker the torch seed `base_seed + worker_id`, where `base_seed`
    comes from the loader's `generator`; the other libraries are seeded from it here.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def collate_segmentation(samples: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack `{"pixel_values": (3, H, W), "labels": (H, W)}` samples into `(B, 3, H, W)` / `(B, H, W)`."""
    if not samples:
        raise RuntimeError(
            "every sample of this batch was dropped by on_bad_sample='skip' (see the warnings above for the files)"
        )
    shapes = {tuple(s["pixel_values"].shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(
            f"samples of one batch have different sizes {sorted(shapes)}: use batch_size=1 for evaluation at "
            "native resolution, or a fixed resize / crop_size"
        )
    return torch.utils.data.default_collate(samples)


def create_dataloader(
    dataset,
    batch_size: int,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: Optional[bool] = None,
    pin_memory: Optional[bool] = None,
) -> DataLoader:
    """A `DataLoader` over a transformed dataset (a `datasets.Dataset` after `with_transform`, or any
    map-style dataset of `{"pixel_values", "labels"}` samples).

    Args:
        dataset: the dataset.
        batch_size: samples per batch B.
        train: shuffle, and drop the last incomplete batch unless `drop_last` says otherwise.
        num_workers: worker processes (0 = load in the main process).
        seed: seeds the shuffling order and every worker's torch/NumPy/random generators, so the
            same seed gives the same batches, augmentations included.
        drop_last: default `train`.
        pin_memory: default: only when CUDA is available.

    Returns:
        a loader yielding `{"pixel_values": (B, 3, H, W) float32, "labels": (B, H, W) int64}`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    # No persistent workers: they would keep a stale copy of the dataset, and a wrapper's
    # per-epoch state (set_epoch) would never reach them.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=bool(train),
        num_workers=num_workers,
        drop_last=bool(train) if drop_last is None else bool(drop_last),
        pin_memory=torch.cuda.is_available() if pin_memory is None else bool(pin_memory),
        collate_fn=collate_segmentation,
        worker_init_fn=seed_worker,
        generator=generator,
    )


_SKIP_SLOTS = 257  # skip counters: slot 0 = the main process, 1 + worker id for DataLoader workers


def _default_split_name(dataset) -> Optional[str]:
    split = getattr(dataset, "split", None)
    return None if split is None else str(split)


class SeededTransformDataset(torch.utils.data.Dataset):
    """Applies a random transform with a seed derived from (run seed, epoch, sample index).

    Augmentations then do not depend on how many batches were drawn before, or in which worker,
    so a resumed run that skips the batches of the interrupted epoch sees exactly the same
    crops and flips as an uninterrupted one.

    Files are decoded inside the transform: a `datasets.Dataset` whose image columns still decode
    (`Image()`) is cast to `Image(decode=False)` here (`build_dataset` already returns lazy columns),
    so a broken file becomes a `BadSampleError` that names it, the split and the row.

    Bad samples, by the transform's `on_bad_sample`:
      * `raise`: the `BadSampleError` names the split, the row and the file.
      * `skip`: the transform logs a warning naming them; this dataset then returns a replacement
        so batches keep their size: row `(index + k) % len` for the smallest `k >= 1` whose row is
        usable, transformed with a seed of (run seed, epoch, index, k). The replacement is thereby
        a deterministic function of the index and the data, and a resumed run stays bit-exact.
        Rows found bad are remembered and not decoded again. When more than `max_skip_fraction` of
        the split's rows have been found bad, a `TooManyBadSamplesError` stops the run.

    Args:
        dataset: map-style dataset of rows (`datasets.Dataset` of `image` / `label` [/ `label_map`]).
        transform: batch transform called as `transform({column: [value]}, generator=...)`, e.g.
            `SegmentationTransform`; when it accepts `where=`, the split and row are passed to it.
        seed: run seed.
        max_skip_fraction: the largest fraction of the split's rows that `skip` may drop, in
            `[0, 1]` (default 0.05: more than 5 % bad rows stops the run). The rows allowed are
            `floor(max_skip_fraction * len(dataset))`, so 0 stops at the first bad row.
        split: the split's name for messages (default: `dataset.split`, which `build_dataset` sets).

    Attributes (read them in the main process; DataLoader workers write through shared memory):
        num_skipped: samples dropped so far by this process and its workers (every epoch counts).
        bad_indices: rows found bad so far, sorted.
    Counts are per process (per rank under DDP: each rank applies `max_skip_fraction` to the bad
    rows it met itself) and start from 0 in a resumed run. `scan_split` on the training split
    before the run finds every bad row at once instead.
    """

    def __init__(self, dataset, transform, seed: int = 0, max_skip_fraction: float = 0.05,
                 split: Optional[str] = None):
        if not 0.0 <= float(max_skip_fraction) <= 1.0:
            raise ValueError(f"max_skip_fraction must be in [0, 1], got {max_skip_fraction}")
        if hasattr(dataset, "features") and hasattr(dataset, "cast_column"):
            dataset = defer_decoding(dataset, None)
        self.split = split if split is not None else _default_split_name(dataset)
        self.dataset = dataset
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.max_skip_fraction = float(max_skip_fraction)
        self._accepts_where = _accepts_keyword(transform, "where")
        # Shared memory: DataLoader workers (forked or spawned) update the tensors the main process reads.
        self._bad_rows = torch.zeros(len(dataset), dtype=torch.uint8).share_memory_()
        self._skips = torch.zeros(_SKIP_SLOTS, dtype=torch.int64).share_memory_()
        self._bad_names: Dict[int, str] = {}  # this process's descriptions of the bad rows it found

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_skipped(self) -> int:
        """Samples dropped so far (each drop of a bad row counts, in every epoch)."""
        return int(self._skips.sum())

    @property
    def bad_indices(self) -> List[int]:
        """Rows found bad so far, sorted."""
        return torch.nonzero(self._bad_rows).flatten().tolist()

    @property
    def max_bad_rows(self) -> int:
        """How many bad rows `skip` tolerates before it stops the run."""
        return int(math.floor(self.max_skip_fraction * len(self) + 1e-9))

    def _split_text(self) -> str:
        return f"split {self.split!r}" if self.split else "the split"

    def _where(self, index: int) -> str:
        return (f"split {self.split!r} " if self.split else "") + f"row {index}"

    def _sample_seed(self, index: int, attempt: int) -> int:
        # attempt 0 is the seed this class has always used; replacements get their own.
        return (self.seed * 1_000_003 + self.epoch * 7_919 + index * 104_729 + attempt * 15_485_863) % (2**31 - 1)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        index = int(index)
        n = len(self)
        for attempt in range(n):
            row_index = (index + attempt) % n
            if self._bad_rows[row_index]:  # found bad before (here or in another worker)
                self._count_skip()
                continue
            row = self.dataset[row_index]
            batch = {key: [value] for key, value in row.items()}
            generator = torch.Generator().manual_seed(self._sample_seed(index, attempt))
            where = self._where(row_index)
            if self._accepts_where:
                out = self.transform(batch, generator=generator, where=[where])
            else:
                try:
                    out = self.transform(batch, generator=generator)
                except BadSampleError as exc:
                    raise type(exc)(f"{where}: {exc}") from exc
            if out and all(len(value) for value in out.values()):
                return {key: value[0] for key, value in out.items()}
            self._mark_bad(row_index, row)
            self._count_skip()
        raise TooManyBadSamplesError(
            f"on_bad_sample='skip': all {n} rows of {self._split_text()} are bad (see the warnings above for the files)"
        )

    def _count_skip(self) -> None:
        info = torch.utils.data.get_worker_info()
        slot = 0 if info is None else 1 + info.id % (_SKIP_SLOTS - 1)
        self._skips[slot] += 1

    def _mark_bad(self, row_index: int, row) -> None:
        self._bad_rows[row_index] = 1
        self._bad_names[row_index] = _row_files(row)
        bad = self.bad_indices
        if len(bad) > self.max_bad_rows:
            listed = ", ".join(
                f"{i}" + (f" ({self._bad_names[i]})" if i in self._bad_names else "") for i in bad[:_MAX_LISTED]
            )
            more = f" ... ({len(bad)} in all)" if len(bad) > _MAX_LISTED else ""
            raise TooManyBadSamplesError(
                f"on_bad_sample='skip' found {len(bad)} bad rows of {len(self)} in "
                f"{self._split_text()}, more than "
                f"max_skip_fraction={self.max_skip_fraction:g} allows ({self.max_bad_rows}); bad rows: {listed}{more}. "
                "Fix or remove those files (scan_split lists every bad row at once), or raise max_skip_fraction."
            )


_MAX_LISTED = 10


def _row_files(row) -> str:
    """The file names of a raw row, for messages."""
    names = []
    for value in row.values():
        path = value.get("path") if isinstance(value, dict) else getattr(value, "filename", None)
        if path:
            names.append(str(path))
    return ", ".join(names) if names else "in-memory row"


def _accepts_keyword(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
