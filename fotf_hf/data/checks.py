"""Check every row of a split once, before a run depends on it: `scan_split` / `scan_splits`.

Training only meets a broken file when it draws it, and evaluation only at its first evaluation,
possibly hours in. A scan opens every row up front and lists all problems at once:

* the image's header opens (PIL `Image.open`: size, mode, EXIF orientation) and, for PNG, its
  chunks are complete with valid checksums (`Image.verify`, no decompression); for JPEG the file
  ends with the end-of-image marker. A file that fails these quick tests is fully decoded before
  it is reported, so the quick tests never reject a file that training could read;
* the label decodes (labels are small single-channel PNGs), is single-channel, has the image's
  size, and every value is a train id in `[0, num_labels)` or 255 after the row's `label_map`;
* the split is not empty.

`full=True` also decodes every image completely (what training does), which additionally finds
files whose compressed pixel data is damaged while their structure is intact.
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import datasets
from PIL import Image

from .info import LABEL_MAP_COLUMN
from .transforms import BadSampleError, _describe, _label_array, check_label, decode_image, defer_decoding

__all__ = ["SPLIT_CHECKS", "scan_split", "scan_splits"]

_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_JPEG_FORMATS = ("JPEG", "MPO")
_BATCH = 64


# `data.check` values: how the evaluation splits are checked before training.
SPLIT_CHECKS = ("quick", "full", "off")

def _open_header(value: Any) -> Tuple[Image.Image, Any]:
    """`Image.open` (header only) of a `{"path", "bytes"}` dict, a path or a PIL image; errors name the file."""
    if isinstance(value, Image.Image):
        return value, None
    try:
        if isinstance(value, str):
            source = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            source = io.BytesIO(value["bytes"])
        elif isinstance(value, dict) and value.get("path"):
            source = value["path"]
        else:
            raise BadSampleError(f"expected a PIL image, a path or a {{'path', 'bytes'}} dict, got {type(value).__name__}")
        return Image.open(source), source
    except BadSampleError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadSampleError(f"cannot open {_describe(value)}: {exc}") from exc


def _ends_with_jpeg_eoi(source) -> bool:
    if isinstance(source, io.BytesIO):
        return source.getvalue().rstrip(b"\0")[-2:] == b"\xff\xd9"
    with open(source, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64))
        return f.read().rstrip(b"\0")[-2:] == b"\xff\xd9"


def _image_size(value: Any, full: bool) -> Tuple[int, int]:
    """`(W, H)` of the image as training sees it (EXIF orientation applied); raises `BadSampleError`."""
    if full:
        return decode_image(value).size
    image, source = _open_header(value)
    if source is None:  # already a PIL image
        return image.size
    with image:
        size = image.size
        # PNG's getexif() decodes the whole image unless the eXIf chunk came before the pixels.
        if image.format != "PNG" or "exif" in image.info:
            try:
                if image.getexif().get(Image.ExifTags.Base.Orientation) in _ROTATING_ORIENTATIONS:
                    size = size[::-1]
            except Exception:  # noqa: BLE001 - a broken EXIF block: the full decode below decides
                return decode_image(value).size
        intact = True
        try:
            if image.format == "PNG":
                image.verify()  # every chunk present with a valid CRC, up to IEND; no decompression
            elif image.format in _JPEG_FORMATS:
                intact = _ends_with_jpeg_eoi(source)
        except Exception:  # noqa: BLE001 - PIL reports broken files with many types
            intact = False
    if not intact:
        return decode_image(value).size  # confirm: raises (naming the file) only if training would fail
    return size


def _check_row(image: Any, label: Any, label_map: Optional[str], num_labels: int, full: bool) -> Optional[str]:
    """None for a usable row, else what is wrong with it (file names included)."""
    problems = []
    image_size = None
    try:
        image_size = _image_size(image, full)
    except BadSampleError as exc:
        problems.append(f"image: {exc}")
    except Exception as exc:  # noqa: BLE001 - anything else still gets the file's name
        problems.append(f"image {_describe(image)}: {type(exc).__name__}: {exc}")
    label_name = _describe(label)
    try:
        lab = decode_image(label)
    except BadSampleError as exc:
        problems.append(f"label: {exc}")
    except Exception as exc:  # noqa: BLE001
        problems.append(f"label {label_name}: {type(exc).__name__}: {exc}")
    else:
        try:
            lab = _label_array(lab, label_name)  # messages from here on name both files
            size = image_size if image_size is not None else (lab.shape[1], lab.shape[0])
            check_label(lab, size, label_map, num_labels, _describe(image), label_name)
        except BadSampleError as exc:
            problems.append(str(exc))
    return "; ".join(problems) if problems else None


def scan_split(
    dataset,
    info,
    split_name: Optional[str] = None,
    full: bool = False,
    max_listed: int = 10,
    num_threads: Optional[int] = None,
    image_column: str = "image",
    label_column: str = "label",
) -> int:
    """Check every row of a split once; raise a `BadSampleError` listing the bad rows.

    Args:
        dataset: the split, a `datasets.Dataset` as `build_dataset` returns it (lazy or decoding
            image columns, with or without a transform: the raw rows are read).
        info: the dataset's `DatasetInfo` (its `num_labels` bounds the label values).
        split_name: name for messages (default: `dataset.split`).
        full: also decode every image completely (slower; what training does).
        max_listed: at most this many bad rows are described in the error (all are counted).
        num_threads: threads that open files (default: `min(4, os.cpu_count())`); PIL releases
            the GIL while decoding.
        image_column, label_column: column names.

    Returns:
        the number of rows checked (all of them usable).

    Raises:
        BadSampleError: the split is empty, or rows are unusable; the message names each bad
            row's index and files and says what is wrong (truncated/undecodable file, image/label
            size mismatch, non-single-channel label, label values out of range after the label map).
    """
    split = split_name or (None if getattr(dataset, "split", None) is None else str(dataset.split)) or "?"
    where = f"split {split!r} of {info.name!r}"
    n = len(dataset)
    if n == 0:
        raise BadSampleError(f"{where} is empty: it has no rows to train or evaluate on")
    for column in (image_column, label_column):
        if column not in dataset.column_names:
            raise KeyError(f"{where} has no column {column!r}; it has: {', '.join(dataset.column_names)}")
    raw = dataset.with_format(None) if isinstance(dataset, datasets.Dataset) else dataset
    lazy = [c for c in (image_column, label_column) if isinstance(raw.features.get(c), datasets.Image)]
    raw = defer_decoding(raw, lazy)
    has_map = LABEL_MAP_COLUMN in raw.column_names
    threads = num_threads if num_threads is not None else min(4, os.cpu_count() or 1)

    bad: List[str] = []
    num_bad = 0

    def check(args):
        return _check_row(*args, info.num_labels, full)

    with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
        for start in range(0, n, _BATCH):
            rows = raw[start:start + _BATCH]
            images, labels = rows[image_column], rows[label_column]
            maps = rows[LABEL_MAP_COLUMN] if has_map else [None] * len(images)
            for offset, problem in enumerate(pool.map(check, zip(images, labels, maps))):
                if problem is None:
                    continue
                num_bad += 1
                if len(bad) < max_listed:
                    bad.append(f"  row {start + offset}: {problem}")
    if num_bad:
        more = f"\n  ... and {num_bad - len(bad)} more" if num_bad > len(bad) else ""
        raise BadSampleError(
            f"{num_bad} of {n} rows of {where} are unusable{' (full decode)' if full else ''}:\n"
            + "\n".join(bad) + more
            + "\nFix or remove these files (or their list entries) and run again."
        )
    return n


def scan_splits(
    dataset_dict: Mapping[str, Any],
    info,
    splits: Optional[Sequence[str]] = None,
    full: bool = False,
    **options,
) -> Dict[str, int]:
    """`scan_split` on each named split (default: all) of a `DatasetDict`; `{split: rows checked}`.

    Every split is scanned before anything is raised, so one error lists the problems of all of
    them. `options` go to `scan_split` (`max_listed`, `num_threads`, column names).
    """
    names = list(dataset_dict) if splits is None else [splits] if isinstance(splits, str) else list(splits)
    missing = [s for s in names if s not in dataset_dict]
    if missing:
        raise KeyError(f"dataset {info.name!r} has no split(s) {', '.join(map(repr, missing))}; it has: "
                       f"{', '.join(dataset_dict)}")
    counts: Dict[str, int] = {}
    errors: List[str] = []
    for name in names:
        try:
            counts[name] = scan_split(dataset_dict[name], info, split_name=name, full=full, **options)
        except BadSampleError as exc:
            errors.append(str(exc))
    if errors:
        raise BadSampleError("\n".join(errors))
    return counts
