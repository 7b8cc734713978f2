"""What a segmentation dataset is (classes, colours) and how its raw label values become train ids.

`DatasetInfo` travels with every `DatasetDict` that `build_dataset` returns. Raw label files are
never rewritten: when a dataset's stored ids are not already `0..num_labels-1` + 255 (Cityscapes
label ids, CamVid's void = 11, a Hub dataset with `reduce_labels`), each row carries a small
`label_map` string column (the same JSON spec in every row) and `SegmentationTransform` applies it
with a lookup table while decoding. The rows thereby say how to read their own labels, and every
consumer of the transform (training, evaluation, pictures) sees the same train ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

IGNORE_INDEX = 255
LABEL_MAP_COLUMN = "label_map"


@dataclass
class DatasetInfo:
    """Classes and colours of a segmentation dataset.

    Args:
        name: dataset name as given to `build_dataset` (e.g. `"camvid"`).
        num_labels: number of evaluated classes C; train ids are `0..C-1`.
        id2label: `{train id: class name}` for all C classes.
        ignore_index: label value excluded from losses and metrics (always 255 in this project).
        palette: `(C, 3)` uint8 RGB colour of each class, for pictures.
        ignore_color: RGB colour that `colorize` paints ignored pixels with.
    """

    name: str
    num_labels: int
    id2label: Dict[int, str]
    ignore_index: int = IGNORE_INDEX
    palette: Optional[np.ndarray] = None
    ignore_color: Tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self):
        self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
        if sorted(self.id2label) != list(range(self.num_labels)):
            raise ValueError(
                f"id2label of {self.name!r} must have exactly the keys 0..{self.num_labels - 1}, "
                f"got {sorted(self.id2label)}"
            )
        if self.palette is None:
            self.palette = pascal_palette(self.num_labels)
        self.palette = np.asarray(self.palette, dtype=np.uint8)
        if self.palette.shape != (self.num_labels, 3):
            raise ValueError(f"palette of {self.name!r} must be ({self.num_labels}, 3), got {self.palette.shape}")

    @property
    def label2id(self) -> Dict[str, int]:
        return {name: idx for idx, name in self.id2label.items()}

    def colorize(self, labels: np.ndarray) -> np.ndarray:
        """Paint train ids with the palette.

        Args:
            labels: `(H, W)` integer train ids; `ignore_index` and any value >= C get `ignore_color`.

        Returns:
            `(H, W, 3)` uint8 RGB picture.
        """
        labels = np.asarray(labels)
        table = np.concatenate([self.palette, np.asarray([self.ignore_color], dtype=np.uint8)])
        idx = np.where((labels >= 0) & (labels < self.num_labels), labels, self.num_labels)
        return table[idx]


def pascal_palette(num_labels: int) -> np.ndarray:
    """The Pascal VOC colour map (bits of the class id spread over R, G, B), `(num_labels, 3)` uint8."""
    ids = np.arange(num_labels)
    palette = np.zeros((num_labels, 3), dtype=np.int64)
    for shift in range(8):
        for channel in range(3):
            palette[:, channel] |= ((ids >> (3 * shift + channel)) & 1) << (7 - shift)
    return palette.astype(np.uint8)


# --------------------------------------------------------------------------- label maps


def make_label_map(
    pairs: Union[Mapping[int, int], Iterable[Tuple[int, int]], None] = None, offset: int = 0
) -> str:
    """Encode a raw-id -> train-id mapping as the string stored in the `label_map` column.

    A raw value `v` becomes `pairs[v]` when listed, else `v + offset` (offset 0 = unchanged,
    -1 = the "reduce labels" convention where 0 is background/ignore).

    Returns:
        canonical JSON, e.g. `'{"offset": 0, "pairs": [[11, 255]]}'`.
    """
    items = pairs.items() if isinstance(pairs, Mapping) else (pairs or ())
    clean = sorted((int(old), int(new)) for old, new in items)
    for old, new in clean:
        if old < 0 or new < 0:
            raise ValueError(f"label_map entries must be non-negative integers, got {old} -> {new}")
    if offset not in (0, -1):
        raise ValueError(f"label_map offset must be 0 or -1, got {offset}")
    return json.dumps({"offset": offset, "pairs": [list(p) for p in clean]}, sort_keys=True)


@lru_cache(maxsize=64)
def _parse_label_map(spec: str) -> Tuple[Dict[int, int], int]:
    try:
        data = json.loads(spec)
        pairs = {int(old): int(new) for old, new in data["pairs"]}
        offset = int(data["offset"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"malformed label_map {spec!r}: expected the JSON written by make_label_map") from exc
    return pairs, offset


@lru_cache(maxsize=64)
def label_lookup_table(spec: Optional[str], size: int = 256) -> np.ndarray:
    """`(size,)` int64 table `lut[raw] = train id` for the spec (None or "" = identity)."""
    lut = np.arange(size, dtype=np.int64)
    if spec:
        pairs, offset = _parse_label_map(spec)
        lut += offset
        for old, new in pairs.items():
            if old < size:
                lut[old] = new
        # A negative result (0 under offset -1 without a pair) can only come from a bad spec.
        lut[lut < 0] = IGNORE_INDEX
    lut.setflags(write=False)
    return lut


def map_labels(label: np.ndarray, label_map: Optional[str]) -> np.ndarray:
    """Raw label ids -> train ids.

    Args:
        label: `(H, W)` non-negative integer array (uint8 / uint16 / int32).
        label_map: the row's `label_map` string, or None for labels that are already train ids.

    Returns:
        `(H, W)` int64 train ids (255 = ignore).
    """
    label = np.asarray(label)
    if label.dtype == np.uint8:
        return label_lookup_table(label_map or None, 256)[label]
    if label.size and label.min() < 0:
        raise ValueError(f"label ids must be non-negative, found {int(label.min())}")
    size = 256 if label.size == 0 else max(256, int(label.max()) + 1)
    return label_lookup_table(label_map or None, size)[label]


def invalid_label_values(label: np.ndarray, label_map: Optional[str], num_labels: int) -> Sequence[int]:
    """Raw values present in `label` whose train id is neither in `[0, num_labels)` nor 255 (sorted)."""
    label = np.asarray(label)
    if label.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    else:
        present = np.unique(label)
    negative = present[present < 0]
    present = present[present >= 0]
    size = max(256, int(present.max()) + 1) if present.size else 256
    mapped = label_lookup_table(label_map or None, size)[present]
    bad = present[(mapped >= num_labels) & (mapped != IGNORE_INDEX)]
    return sorted(int(v) for v in np.concatenate([negative, bad]))


# --------------------------------------------------------------------------- built-in class lists

CAMVID_CLASSES = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)
# Colours of the SegNet CamVid tutorial, in the same class order.
CAMVID_PALETTE = (
    (128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
    (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192),
)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def cityscapes_tables() -> Tuple[Dict[int, str], np.ndarray, str]:
    """id2label, palette and the labelIds -> trainIds map, all from `cityscapesscripts.helpers.labels`.

    Every label id whose trainId is 255 or -1, or that is `ignoreInEval`, maps to 255.
    """
    from cityscapesscripts.helpers.labels import labels

    train = sorted(
        (lab for lab in labels if 0 <= lab.trainId < 255 and not lab.ignoreInEval), key=lambda lab: lab.trainId
    )
    id2label = {lab.trainId: lab.name for lab in train}
    palette = np.asarray([lab.color for lab in train], dtype=np.uint8)
    pairs = {}
    for lab in labels:
        if lab.id < 0:
            continue  # "license plate" has id -1; it never appears in the uint8 labelIds PNGs
        keep = 0 <= lab.trainId < 255 and not lab.ignoreInEval
        pairs[lab.id] = lab.trainId if keep else IGNORE_INDEX
    return id2label, palette, make_label_map(pairs)


def as_id2label(value: Union[Mapping, Sequence[str], None], num_labels: Optional[int], where: str) -> Dict[int, str]:
    """Accept `{id: name}` (keys may be strings, as in JSON/YAML), a list of names, or None + num_labels."""
    if value is None:
        if num_labels is None:
            raise ValueError(f"{where}: give id2label (a dict or list of class names) or num_labels")
        return {i: str(i) for i in range(int(num_labels))}
    if isinstance(value, Mapping):
        try:
            out = {int(k): str(v) for k, v in value.items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{where}: id2label keys must be integers, got {list(value)}") from exc
    else:
        out = {i: str(name) for i, name in enumerate(value)}
    if num_labels is not None and len(out) != int(num_labels):
        raise ValueError(f"{where}: id2label has {len(out)} classes but num_labels={num_labels}")
    return out


__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "DatasetInfo",
    "IGNORE_INDEX",
    "LABEL_MAP_COLUMN",
    "VOC_CLASSES",
    "as_id2label",
    "cityscapes_tables",
    "invalid_label_values",
    "label_lookup_table",
    "make_label_map",
    "map_labels",
    "pascal_palette",
]
