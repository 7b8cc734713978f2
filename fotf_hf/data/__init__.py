"""Data through `datasets`: builders, on-the-fly transforms and seeded dataloaders.

    datasets, info = build_dataset("camvid", root="data/camvid")   # lazy image columns
    scan_splits(datasets, info, ["validation"])                    # every row checked once, up front
    train = datasets["train"].with_transform(
        SegmentationTransform(train=True, crop_size=(360, 360), num_labels=info.num_labels))
    loader = create_dataloader(train, batch_size=8, train=True, num_workers=2, seed=0)

Files are decoded in `SegmentationTransform`, never by `datasets`, so a broken one is named.
"""

from .builders import (
    BUILDERS,
    DATASETS,
    build_camvid,
    build_cityscapes,
    build_dataset,
    build_hub,
    build_voc,
)
from .checks import scan_split, scan_splits
from .info import (
    IGNORE_INDEX,
    LABEL_MAP_COLUMN,
    DatasetInfo,
    make_label_map,
    map_labels,
    pascal_palette,
)
from .loader import SeededTransformDataset, collate_segmentation, create_dataloader, seed_worker
from .synthetic import SYNTHETIC_CLASSES, SYNTHETIC_PALETTE, build_synthetic_streets, render_street
from .transforms import (
    NORMALIZATIONS,
    ON_BAD_SAMPLE,
    BadSampleError,
    SegmentationTransform,
    TooManyBadSamplesError,
    decode_image,
    defer_decoding,
    denormalize,
    normalize_image,
)

__all__ = [
    "BUILDERS",
    "BadSampleError",
    "DATASETS",
    "DatasetInfo",
    "IGNORE_INDEX",
    "LABEL_MAP_COLUMN",
    "NORMALIZATIONS",
    "ON_BAD_SAMPLE",
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "SeededTransformDataset",
    "SegmentationTransform",
    "TooManyBadSamplesError",
    "build_camvid",
    "build_cityscapes",
    "build_dataset",
    "build_hub",
    "build_synthetic_streets",
    "build_voc",
    "collate_segmentation",
    "create_dataloader",
    "decode_image",
    "defer_decoding",
    "denormalize",
    "make_label_map",
    "map_labels",
    "normalize_image",
    "pascal_palette",
    "render_street",
    "scan_split",
    "scan_splits",
    "seed_worker",
]
