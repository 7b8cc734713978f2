"""On-the-fly segmentation transforms for `datasets.Dataset.with_transform` (PIL + NumPy + torch).

The training variant reproduces CIRKD's augmentation (the FOTF paper, appendix A.2): random scale
`f in {0.5, 0.6, ..., 2.0}` (image bilinear, label nearest) -> normalise -> pad bottom/right to the
crop size (image with 0 *after* normalisation, label with 255) -> uniform random crop -> horizontal
flip with p = 0.5. The evaluation variant only normalises (and optionally resizes).

Work order is chosen for speed, with results identical to that sequence: the crop window is drawn
on the padded extent first, then only the pixels inside it are normalised and label-mapped.

All randomness comes from `torch` (an explicit `torch.Generator`, or the global generator that
`DataLoader` seeds in each worker), so a seeded `create_dataloader` reproduces its batches.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps

from .info import IGNORE_INDEX, LABEL_MAP_COLUMN, invalid_label_values, map_labels

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Caffe BGR mean used by CIRKD / Af-DCD (0-255 scale, no std division).
CIRKD_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)

# Each normalisation is `out[c] = rgb_uint8[source[c]] * scale[c] + offset[c]`.
_NORMALIZATIONS: Dict[str, Dict[str, Tuple[float, ...]]] = {
    "imagenet": {
        "source": (0, 1, 2),
        "scale": tuple(1.0 / (255.0 * s) for s in IMAGENET_STD),
        "offset": tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)),
    },
    "cirkd_bgr": {"source": (2, 1, 0), "scale": (1.0, 1.0, 1.0), "offset": tuple(-m for m in CIRKD_BGR_MEAN)},
}
NORMALIZATIONS = tuple(_NORMALIZATIONS)
ON_BAD_SAMPLE = ("raise", "skip")

ImageLike = Union[Image.Image, Dict[str, Any], str]


class BadSampleError(ValueError):
    """A sample that cannot be used: undecodable file, image/label size mismatch, invalid label ids."""


class TooManyBadSamplesError(BadSampleError):
    """`on_bad_sample="skip"` dropped more rows of a split than its `max_skip_fraction` allows."""


def _check_normalization(normalization: str) -> Dict[str, Tuple[float, ...]]:
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"unknown normalization {normalization!r}; valid choices: {', '.join(NORMALIZATIONS)}")
    return _NORMALIZATIONS[normalization]


def normalize_image(rgb: np.ndarray, normalization: str = "imagenet") -> np.ndarray:
    """uint8 RGB `(H, W, 3)` -> float32 `(3, H, W)` network input.

    `imagenet`: RGB, `(x / 255 - mean) / std` (SegFormer / transformers convention).
    `cirkd_bgr`: BGR, `x - [104.007, 116.669, 122.679]` on the 0-255 scale, no std (CIRKD checkpoints).
    """
    norm = _check_normalization(normalization)
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    out = np.empty((3,) + rgb.shape[:2], dtype=np.float32)
    for c in range(3):
        np.multiply(rgb[:, :, norm["source"][c]], np.float32(norm["scale"][c]), out=out[c], casting="unsafe")
        out[c] += np.float32(norm["offset"][c])
    return out


def denormalize(pixel_values: torch.Tensor, normalization: str = "imagenet") -> np.ndarray:
    """Inverse of the normalisation, for pictures.

    Args:
        pixel_values: `(3, H, W)` or `(B, 3, H, W)` network input.

    Returns:
        `(H, W, 3)` or `(B, H, W, 3)` uint8 RGB (rounded, clipped to 0..255; padding shows the mean colour).
    """
    norm = _check_normalization(normalization)
    x = torch.as_tensor(pixel_values).detach().float().cpu()
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"expected (3, H, W) or (B, 3, H, W) pixel values, got shape {tuple(x.shape)}")
    scale = torch.tensor(norm["scale"]).view(3, 1, 1)
    offset = torch.tensor(norm["offset"]).view(3, 1, 1)
    rgb_order = [norm["source"].index(c) for c in range(3)]
    x = ((x - offset) / scale)[..., rgb_order, :, :]
    return x.round().clamp(0, 255).to(torch.uint8).movedim(-3, -1).numpy()


def _describe(value: Any) -> str:
    """A file name for error messages, from a PIL image, a `{"path", "bytes"}` dict or a path."""
    path = None
    if isinstance(value, Image.Image):
        path = getattr(value, "filename", None)
    elif isinstance(value, dict):
        path = value.get("path")
    elif isinstance(value, str):
        path = value
    return repr(str(path)) if path else "an in-memory image without a file name"


def decode_image(value: ImageLike) -> Image.Image:
    """Open a PIL image, a `datasets.Image(decode=False)` dict or a path; errors name the file.

    Follows `datasets.Image.decode_example`: fully loaded, EXIF orientation applied.
    """
    if isinstance(value, Image.Image):
        return value
    try:
        if isinstance(value, str):
            image = Image.open(value)
        elif isinstance(value, dict) and value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            image = Image.open(value["path"])
        else:
            raise BadSampleError(f"expected a PIL image, a path or a {{'path', 'bytes'}} dict, got {type(value).__name__}")
        image.load()
    except BadSampleError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:  # PIL uses all of these
        raise BadSampleError(f"cannot decode {_describe(value)}: {exc}") from exc
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image


def _label_array(label: Image.Image, where: str) -> np.ndarray:
    """Single-channel label image -> `(H, W)` integer array of raw ids (palette PNGs give indices)."""
    if label.mode in ("L", "P"):
        return np.asarray(label)
    if label.mode == "1":
        return np.asarray(label, dtype=np.uint8)
    if label.mode in ("I", "I;16", "I;16B", "I;16L"):
        return np.asarray(label).astype(np.int32, copy=False)
    raise BadSampleError(
        f"label {where} has mode {label.mode!r}; expected a single-channel class-id image "
        "(mode L, P or I). Colour-coded masks must be converted to class ids first."
    )


def check_label(
    label: np.ndarray,
    image_size_wh: Tuple[int, int],
    label_map: Optional[str],
    num_labels: int,
    image_name: str = "the image",
    label_name: str = "the label",
) -> None:
    """Raise a `BadSampleError` naming the files when the `(H, W)` raw label does not match the
    image size `(W, H)` or holds values whose train id is neither in `[0, num_labels)` nor 255."""
    if tuple(image_size_wh) != (label.shape[1], label.shape[0]):
        raise BadSampleError(
            f"image {image_name} is {image_size_wh[1]}x{image_size_wh[0]} (HxW) but its label "
            f"{label_name} is {label.shape[0]}x{label.shape[1]}"
        )
    bad = invalid_label_values(label, label_map, num_labels)
    if bad:
        mapped = map_labels(np.asarray(bad[:20]), label_map).tolist() if label_map else bad[:20]
        raise BadSampleError(
            f"label {label_name} has values outside [0, {num_labels}) and not {IGNORE_INDEX}: "
            f"raw {bad[:20]}{' ...' if len(bad) > 20 else ''}"
            + (f" (after the dataset's label_map: {mapped})" if label_map else "")
            + f" (image {image_name})"
        )


def _resize_label(label: np.ndarray, size_wh: Tuple[int, int]) -> np.ndarray:
    if label.dtype == np.uint8:
        return np.asarray(Image.fromarray(label).resize(size_wh, Image.NEAREST))
    return np.asarray(Image.fromarray(label.astype(np.int32)).resize(size_wh, Image.NEAREST))


class SegmentationTransform:
    """Batch transform for `Dataset.with_transform`: `{"image", "label"[, "label_map"]}` lists ->
    `{"pixel_values": [(3, H, W) float32], "labels": [(H, W) int64]}`.

    Args:
        train: random scale / pad / crop / flip (True) or deterministic evaluation (False).
        num_labels: C; every label value (after the row's `label_map`) must be in `[0, C)` or 255.
        crop_size: `(h, w)` training crop in pixels (required when `train`).
        scale_range: `(min, max)` training scale factor.
        scale_step: scales are drawn from `min, min + step, ..., max` as CIRKD (0.1 gives
            {0.5, 0.6, ..., 2.0}); None draws uniformly from the interval.
        flip_prob: probability of a horizontal flip when training.
        resize: applied to every sample before augmentation: None, an int (shorter side in pixels,
            aspect kept) or `(h, w)`. Image bilinear, label nearest.
        normalization: one of `NORMALIZATIONS` (`imagenet` or `cirkd_bgr`).
        on_bad_sample: `raise` (default): a `BadSampleError` naming the file. `skip`: drop the sample
            from its batch and log a warning naming the file; under `SeededTransformDataset` (the
            training set) a deterministic replacement keeps the batch full and too many bad rows
            stop the run (`max_skip_fraction`). Either way nothing passes silently.
        image_column, label_column: input column names.

    The per-sample checks: image and label sizes match; label ids valid; files decodable. Files are
    decoded here, inside a check that names them, when the rows carry `{"path", "bytes"}` dicts:
    `build_dataset` returns such lazy `Image(decode=False)` columns (see `defer_decoding`). Already
    decoded PIL images (a dataset with decoding `Image()` columns) are accepted too, but then
    `datasets` has opened the files before this runs and a broken one fails there, unnamed.
    """

    def __init__(
        self,
        train: bool,
        num_labels: int,
        crop_size: Optional[Sequence[int]] = None,
        scale_range: Sequence[float] = (0.5, 2.0),
        scale_step: Optional[float] = 0.1,
        flip_prob: float = 0.5,
        resize: Union[None, int, Sequence[int]] = None,
        normalization: str = "imagenet",
        on_bad_sample: str = "raise",
        image_column: str = "image",
        label_column: str = "label",
    ):
        _check_normalization(normalization)
        if on_bad_sample not in ON_BAD_SAMPLE:
            raise ValueError(f"unknown on_bad_sample {on_bad_sample!r}; valid choices: {', '.join(ON_BAD_SAMPLE)}")
        if not isinstance(num_labels, (int, np.integer)) or not 0 < num_labels <= IGNORE_INDEX:
            raise ValueError(f"num_labels must be an integer in [1, {IGNORE_INDEX}], got {num_labels!r}")
        self.train = bool(train)
        self.num_labels = int(num_labels)
        self.normalization = normalization
        self.on_bad_sample = on_bad_sample
        self.image_column = image_column
        self.label_column = label_column
        self.flip_prob = float(flip_prob)
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.resize = self._check_resize(resize)
        self.crop_size: Optional[Tuple[int, int]] = None
        self.scales: Optional[np.ndarray] = None
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        if self.train:
            if crop_size is None or len(crop_size) != 2 or min(int(s) for s in crop_size) < 1:
                raise ValueError(f"a training transform needs crop_size=(h, w) with positive sizes, got {crop_size!r}")
            self.crop_size = (int(crop_size[0]), int(crop_size[1]))
            lo, hi = self.scale_range
            if not 0 < lo <= hi:
                raise ValueError(f"scale_range must satisfy 0 < min <= max, got {tuple(scale_range)}")
            if scale_step is not None:
                if scale_step <= 0:
                    raise ValueError(f"scale_step must be positive or None, got {scale_step}")
                count = int(math.floor((hi - lo) / scale_step + 1e-6)) + 1
                self.scales = np.round(lo + scale_step * np.arange(count), 6)

    @staticmethod
    def _check_resize(resize) -> Union[None, int, Tuple[int, int]]:
        if resize is None:
            return None
        if isinstance(resize, (int, np.integer)) and resize > 0:
            return int(resize)
        if isinstance(resize, (list, tuple)) and len(resize) == 2 and min(resize) > 0:
            return (int(resize[0]), int(resize[1]))
        raise ValueError(f"resize must be None, a positive int (shorter side) or (h, w), got {resize!r}")

    def __repr__(self) -> str:
        mode = f"train, crop_size={self.crop_size}, scale_range={self.scale_range}" if self.train else "eval"
        return (f"SegmentationTransform({mode}, resize={self.resize}, normalization={self.normalization!r}, "
                f"num_labels={self.num_labels}, on_bad_sample={self.on_bad_sample!r})")

    def apply(self, dataset):
        """`dataset` (Dataset or DatasetDict) with this transform, decoding files inside it (see `defer_decoding`)."""
        return defer_decoding(dataset, (self.image_column, self.label_column)).with_transform(self)

    def __call__(
        self,
        batch: Dict[str, List[Any]],
        generator: Optional[torch.Generator] = None,
        where: Optional[Sequence[str]] = None,
    ) -> Dict[str, list]:
        """Transform a batch as `with_transform` passes it.

        Args:
            batch: dict of equal-length lists: `image` and `label` (PIL images, `{"path", "bytes"}`
                dicts or paths) and optionally `label_map` (JSON strings, see `info.make_label_map`).
            generator: torch generator for the random draws (default: torch's global generator).
            where: optional description of each sample (e.g. `"split 'train' row 17"`, as
                `SeededTransformDataset` passes it), put in front of bad-sample errors and warnings
                next to the file names (the only name a row of in-memory bytes has).

        Returns:
            `{"pixel_values": [(3, H, W) float32], "labels": [(H, W) int64]}`; shorter than the
            input when `on_bad_sample="skip"` dropped samples.
        """
        for column in (self.image_column, self.label_column):
            if column not in batch:
                raise KeyError(f"the batch has no column {column!r}; it has: {', '.join(batch)}")
        images, labels = batch[self.image_column], batch[self.label_column]
        label_maps = batch.get(LABEL_MAP_COLUMN) or [None] * len(images)
        wheres = list(where) if where is not None else [None] * len(images)
        if len(wheres) != len(images):
            raise ValueError(f"where= has {len(wheres)} entries for a batch of {len(images)} samples")
        out: Dict[str, list] = {"pixel_values": [], "labels": []}
        for image, label, label_map, at in zip(images, labels, label_maps, wheres):
            try:
                pixel_values, target = self._transform_one(image, label, label_map, generator)
            except BadSampleError as exc:
                if self.on_bad_sample == "raise":
                    if at:
                        raise type(exc)(f"{at}: {exc}") from exc
                    raise
                logger.warning("skipping a bad sample%s: %s", f" ({at})" if at else "", exc)
                continue
            out["pixel_values"].append(pixel_values)
            out["labels"].append(target)
        return out

    # ------------------------------------------------------------------ one sample

    def _transform_one(self, image, label, label_map, generator):
        image_name, label_name = _describe(image), _describe(label)
        image = decode_image(image)
        label_img = decode_image(label)
        lab = _label_array(label_img, label_name)
        check_label(lab, image.size, label_map, self.num_labels, image_name, label_name)
        if image.mode != "RGB":
            image = image.convert("RGB")

        if self.resize is not None:
            w, h = image.size
            if isinstance(self.resize, int):
                f = self.resize / min(h, w)
                size_wh = (max(1, round(w * f)), max(1, round(h * f)))
            else:
                size_wh = (self.resize[1], self.resize[0])
            if size_wh != image.size:
                image = image.resize(size_wh, Image.BILINEAR)
                lab = _resize_label(lab, size_wh)

        if not self.train:
            pixel_values = normalize_image(np.asarray(image), self.normalization)
            return torch.from_numpy(pixel_values), torch.from_numpy(map_labels(lab, label_map))
        return self._augment(image, lab, label_map, generator)

    def _augment(self, image: Image.Image, lab: np.ndarray, label_map, generator):
        if self.scales is not None:
            f = float(self.scales[int(torch.randint(len(self.scales), (1,), generator=generator))])
        else:
            lo, hi = self.scale_range
            f = lo + (hi - lo) * float(torch.rand(1, generator=generator))
        w, h = image.size
        # cv2.resize(fx=f) rounds the output size to the nearest integer.
        size_wh = (max(1, int(round(w * f))), max(1, int(round(h * f))))
        if size_wh != image.size:
            image = image.resize(size_wh, Image.BILINEAR)
            lab = _resize_label(lab, size_wh)
        w, h = size_wh

        ch, cw = self.crop_size
        # The crop is drawn on the image padded bottom/right to at least the crop size.
        y0 = int(torch.randint(max(h, ch) - ch + 1, (1,), generator=generator))
        x0 = int(torch.randint(max(w, cw) - cw + 1, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < self.flip_prob)

        y1, x1 = min(y0 + ch, h), min(x0 + cw, w)
        rgb = np.asarray(image)[y0:y1, x0:x1]
        pixel_values = np.zeros((3, ch, cw), dtype=np.float32)
        pixel_values[:, : y1 - y0, : x1 - x0] = normalize_image(rgb, self.normalization)
        target = np.full((ch, cw), IGNORE_INDEX, dtype=np.int64)
        target[: y1 - y0, : x1 - x0] = map_labels(lab[y0:y1, x0:x1], label_map)
        if flip:
            pixel_values = np.ascontiguousarray(pixel_values[:, :, ::-1])
            target = np.ascontiguousarray(target[:, ::-1])
        return torch.from_numpy(pixel_values), torch.from_numpy(target)


def defer_decoding(dataset, columns: Optional[Sequence[str]] = ("image", "label")):
    """Cast image columns to `datasets.Image(decode=False)` so `SegmentationTransform` opens the files.

    Rows then carry `{"path", "bytes"}` dicts and a corrupt file raises a `BadSampleError` naming it
    (or is skipped with `on_bad_sample="skip"`) instead of failing inside `datasets`. Works on a
    `Dataset` or a `DatasetDict`; nothing is copied. `columns=None` casts every `Image()` column.
    Columns that are already lazy are left alone (then the same dataset object comes back).
    """
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict({split: defer_decoding(ds, columns) for split, ds in dataset.items()})
    features = dataset.features
    if columns is None:
        columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    for column in columns:
        if column not in features:
            raise KeyError(f"the dataset has no column {column!r}; it has: {', '.join(features)}")
        feature = features[column]
        if isinstance(feature, datasets.Image) and not feature.decode:
            continue
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


__all__ = [
    "BadSampleError",
    "CIRKD_BGR_MEAN",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "ON_BAD_SAMPLE",
    "SegmentationTransform",
    "TooManyBadSamplesError",
    "check_label",
    "decode_image",
    "defer_decoding",
    "denormalize",
    "normalize_image",
]
