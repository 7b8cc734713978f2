"""Seeded `DataLoader` construction for transformed segmentation datasets."""

from __future__ import annotations

import random
from typing import Dict, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader


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


__all__ = ["collate_segmentation", "create_dataloader", "seed_worker"]
