"""`synthetic-streets`: a generated street-scene segmentation dataset (no download, deterministic).

Each sample is rendered with NumPy from its own seed `(seed, split, index)`, so a sample does not
depend on how many others are generated. The scene has a perspective road with sidewalks, a
skyline of buildings with window grids, trees, and cars, people and poles placed at depths that
set their size and occlude each other far-to-near.

It is built to be hard in the places FOTF cares about:
- colour alone does not separate classes: every image draws its class colours from overlapping
  ranges (grey road vs grey tiled sidewalk, overcast sky vs grey facades with sky-reflecting
  windows, green cars and clothes vs foliage, grey poles vs walls), so texture and context decide;
- thin structures (1-3 px poles), small far objects, occlusions, and optional fog that washes out
  contrast near the horizon;
- label noise: about 5 % of boundary pixels take a neighbour's class; ignored pixels (255): the
  ego-vehicle bonnet in some frames and unlabelled clutter on the sidewalks.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import datasets
import numpy as np
from PIL import Image

from .info import IGNORE_INDEX, DatasetInfo

SYNTHETIC_CLASSES = ("sky", "road", "sidewalk", "building", "vegetation", "car", "pole", "person")
SYNTHETIC_PALETTE = (
    (70, 130, 180), (128, 64, 128), (244, 35, 232), (70, 70, 70),
    (107, 142, 35), (0, 0, 142), (153, 153, 153), (220, 20, 60),
)
SKY, ROAD, SIDEWALK, BUILDING, VEGETATION, CAR, POLE, PERSON = range(len(SYNTHETIC_CLASSES))
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}
BOUNDARY_NOISE = 0.05


def synthetic_streets_info() -> DatasetInfo:
    """Classes and palette of `synthetic-streets` (8 classes, Cityscapes colours)."""
    return DatasetInfo(
        name="synthetic-streets",
        num_labels=len(SYNTHETIC_CLASSES),
        id2label=dict(enumerate(SYNTHETIC_CLASSES)),
        palette=np.asarray(SYNTHETIC_PALETTE, dtype=np.uint8),
    )


class _Canvas:
    """An RGB float image and its label map, painted in place."""

    def __init__(self, rng: np.random.Generator, h: int, w: int):
        self.rng, self.h, self.w = rng, h, w
        self.yy, self.xx = np.mgrid[0:h, 0:w].astype(np.float32)
        self.rgb = np.zeros((h, w, 3), dtype=np.float32)
        self.label = np.zeros((h, w), dtype=np.uint8)

    def noise(self, cell: float) -> np.ndarray:
        """`(h, w)` smooth Gaussian noise with features about `cell` pixels wide, unit std."""
        gh = max(2, int(np.ceil(self.h / cell)) + 1)
        gw = max(2, int(np.ceil(self.w / cell)) + 1)
        grid = self.rng.standard_normal((gh, gw)).astype(np.float32)
        field = np.asarray(Image.fromarray(grid, mode="F").resize((self.w, self.h), Image.BILINEAR))
        return (field - field.mean()) / (field.std() + 1e-6)

    def paint(self, mask: np.ndarray, cls: int, colour) -> None:
        """Set the class and the colour (an `(3,)` colour or an `(h, w, 3)` field) where `mask`."""
        self.label[mask] = cls
        colour = np.asarray(colour, dtype=np.float32)
        self.rgb[mask] = colour[mask] if colour.ndim == 3 else colour


def _grey(rng, lo, hi, tint=8.0):
    return rng.uniform(lo, hi) + rng.uniform(-tint, tint, 3)


def _textured(base, amplitude, field) -> np.ndarray:
    """`(h, w, 3)` colour field: base colour modulated by a noise field."""
    return np.asarray(base, np.float32)[None, None, :] + amplitude * field[:, :, None]


def render_street(rng: np.random.Generator, height: int = 96, width: int = 128) -> Tuple[np.ndarray, np.ndarray]:
    """Render one scene.

    Returns:
        `(H, W, 3)` uint8 RGB image and `(H, W)` uint8 label (class ids `0..7`, 255 = ignore).
    """
    c = _Canvas(rng, height, width)
    h, w, yy, xx = height, width, c.yy, c.xx
    horizon = rng.uniform(0.35, 0.55) * h
    below = yy >= horizon
    depth = np.clip((yy - horizon) / (h - horizon), 0.0, 1.0)  # 0 at the horizon, 1 at the bottom row

    # Sky: blue or overcast grey, a vertical gradient and soft clouds.
    if rng.random() < 0.5:
        sky = np.array([rng.uniform(90, 150), rng.uniform(140, 190), rng.uniform(195, 250)])
    else:
        sky = _grey(rng, 150, 215, tint=6)
    gradient = (yy / max(horizon, 1.0))[:, :, None] * rng.uniform(10, 35)
    c.paint(~below, SKY, _textured(sky, rng.uniform(4, 14), c.noise(w / 4)) + gradient)

    # Road (fine grain) and sidewalks (tiles) meeting at the vanishing point.
    vx = rng.uniform(0.3, 0.7) * w
    left_bottom = vx - rng.uniform(0.35, 0.75) * w
    right_bottom = vx + rng.uniform(0.35, 0.75) * w
    road_left = vx + (left_bottom - vx) * depth
    road_right = vx + (right_bottom - vx) * depth
    road = below & (xx >= road_left) & (xx <= road_right)
    road_grey = rng.uniform(75, 140)
    road_rgb = _textured(_grey(rng, road_grey, road_grey + 1, 6), 9, rng.standard_normal((h, w)).astype(np.float32))
    road_rgb += 6 * c.noise(6)[:, :, None]
    c.paint(road, ROAD, road_rgb)
    # Dashed centre line in perspective: dashes are regular in 1/depth.
    centre = vx + ((left_bottom + right_bottom) / 2 - vx) * depth
    dashes = np.mod(rng.uniform(0, 1) + 3.0 / np.maximum(depth, 1e-3), 1.0) < 0.5
    marking = road & (np.abs(xx - centre) < 0.3 + 1.5 * depth) & dashes & (depth > 0.05)
    if rng.random() < 0.7:
        c.paint(marking, ROAD, _grey(rng, 190, 235, 5))

    side = below & ~road
    period = rng.uniform(5, 10)
    # Tile joints: horizontal joints spaced in depth, vertical joints radiating from the vanishing point.
    joints = (np.mod(3.0 / np.maximum(depth, 1e-3), period / 6) < 0.18 * period / 6) | (
        np.mod((xx - vx) / np.maximum(depth, 0.05), period * 1.5) < 1.2
    )
    side_grey = road_grey + rng.uniform(-25, 40)
    side_rgb = _textured(_grey(rng, side_grey, side_grey + 1, 8), 4, rng.standard_normal((h, w)).astype(np.float32))
    side_rgb -= joints[:, :, None] * rng.uniform(15, 35)
    c.paint(side, SIDEWALK, side_rgb)
    curb = side & ((np.abs(xx - road_left) < 1 + depth) | (np.abs(xx - road_right) < 1 + depth))
    c.paint(curb, SIDEWALK, _grey(rng, 150, 215, 5))

    # Buildings: a skyline of segments with their own wall colour and a window grid.
    edges = [0]
    while edges[-1] < w:
        edges.append(edges[-1] + int(rng.integers(max(4, w // 16), max(6, w // 3))))
    segment = np.searchsorted(np.asarray(edges[1:]), np.arange(w), side="right")
    n_seg = segment.max() + 1
    present = rng.random(n_seg) < 0.8
    tops = horizon - rng.uniform(0.15, 1.0, n_seg) * horizon
    walls = np.stack([_grey(rng, 70, 200, 20) for _ in range(n_seg)])
    warm = rng.random(n_seg) < 0.3
    walls[warm] += np.array([35, 10, -20])  # brick and sandstone
    top_col, wall_col = tops[segment], walls[segment]
    start_col = np.asarray(edges)[segment]
    building = (~below) & present[segment][None, :] & (yy >= top_col[None, :])
    px, py = rng.uniform(5, 10), rng.uniform(6, 12)
    window = (
        (np.mod(xx - start_col[None, :] - 1, px) < px * rng.uniform(0.35, 0.6))
        & (np.mod(yy - top_col[None, :] - 2, py) < py * rng.uniform(0.35, 0.6))
        & (yy > top_col[None, :] + 2)
    )
    reflect = rng.random() < 0.5  # windows that mirror the sky make facades look like sky
    window_rgb = sky * 0.85 if reflect else _grey(rng, 25, 70, 6)
    wall_rgb = wall_col[None, :, :] + 5 * c.noise(3)[:, :, None]
    wall_rgb = np.where(window[:, :, None], window_rgb, wall_rgb)
    c.paint(building, BUILDING, wall_rgb)

    # Vegetation: irregular crowns near the horizon and hedges along the sidewalk.
    foliage = _textured(
        np.array([rng.uniform(40, 110), rng.uniform(80, 150), rng.uniform(20, 80)]),
        rng.uniform(18, 30), 0.6 * c.noise(2) + 0.4 * rng.standard_normal((h, w)).astype(np.float32),
    )
    boundary = c.noise(3)
    for _ in range(int(rng.integers(1, 5))):
        cx = rng.uniform(0, w)
        cy = horizon - rng.uniform(0.0, 0.5) * horizon
        rx, ry = rng.uniform(0.05, 0.18) * w, rng.uniform(0.08, 0.25) * h
        crown = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 + 0.35 * boundary < 1.0
        trunk = (np.abs(xx - cx) < max(1.0, rx * 0.12)) & (yy > cy) & (yy < horizon + 0.05 * h)
        c.paint(crown | trunk, VEGETATION, foliage)
    if rng.random() < 0.5:
        hedge_top = horizon - rng.uniform(0.02, 0.12) * h
        hedge = (yy >= hedge_top + 1.5 * boundary) & (yy < horizon + 0.04 * h) & (~road)
        c.paint(hedge, VEGETATION, foliage)

    # Things, drawn far to near so that nearer ones occlude farther ones.
    things: List[Tuple[float, str, float]] = []
    for _ in range(int(rng.integers(1, 6)) if rng.random() < 0.92 else 0):
        things.append((rng.uniform(0.08, 1.0), "car", rng.random()))
    for _ in range(int(rng.integers(1, 5)) if rng.random() < 0.9 else 0):
        things.append((rng.uniform(0.1, 1.0), "pole", rng.random()))
    for _ in range(int(rng.integers(1, 5)) if rng.random() < 0.85 else 0):
        things.append((rng.uniform(0.1, 1.0), "person", rng.random()))
    if rng.random() < 0.4:
        things.append((rng.uniform(0.2, 0.9), "clutter", rng.random()))
    for t, kind, u in sorted(things):
        base = horizon + t * (h - horizon)
        left, right = vx + (left_bottom - vx) * t, vx + (right_bottom - vx) * t
        if kind == "car":
            _draw_car(c, rng, base, t, left, right, u)
        else:
            on_road = kind == "person" and rng.random() < 0.2
            if on_road:
                x = left + u * (right - left)
            elif rng.random() < 0.5:
                x = left - u * max(left + 0.1 * w, 2.0)
            else:
                x = right + u * max(w * 1.1 - right, 2.0)
            {"pole": _draw_pole, "person": _draw_person, "clutter": _draw_clutter}[kind](c, rng, x, base, t)

    # Fog washes out contrast near the horizon, where objects are small and far away.
    if rng.random() < 0.4:
        haze = rng.uniform(0.3, 0.8) * np.exp(-np.abs(yy - horizon) / (rng.uniform(0.1, 0.3) * h))
        c.rgb = c.rgb * (1 - haze[:, :, None]) + _grey(rng, 170, 220, 4) * haze[:, :, None]

    # Shadows on the ground, then the ego-vehicle bonnet (ignored) in some frames.
    if rng.random() < 0.5:
        shadow = (c.noise(w / 5) > rng.uniform(0.3, 1.0)) & below
        c.rgb[shadow] *= rng.uniform(0.5, 0.75)
    if rng.random() < 0.25:
        bonnet_top = h - rng.uniform(0.06, 0.15) * h * (1 - ((xx - w / 2) / (0.9 * w)) ** 2)
        bonnet = yy > bonnet_top
        car_rgb = _grey(rng, 20, 120, 25) + (yy - bonnet_top)[:, :, None] * rng.uniform(1, 4)
        c.paint(bonnet, IGNORE_INDEX, car_rgb)

    label = _jitter_boundaries(rng, c.label, BOUNDARY_NOISE)
    light = rng.uniform(0.6, 1.25) * (1 + rng.uniform(-0.06, 0.06, 3))
    rgb = c.rgb * light + rng.normal(0.0, 3.0, (h, w, 3))
    return np.clip(rgb, 0, 255).astype(np.uint8), label


def _draw_car(c: _Canvas, rng, base, t, left, right, u):
    cw = t * rng.uniform(0.3, 0.5) * c.w
    ch = cw * rng.uniform(0.45, 0.65)
    lo, hi = left + cw / 2, right - cw / 2
    cx = lo + u * (hi - lo) if hi > lo else (left + right) / 2
    yy, xx = c.yy, c.xx
    dx = np.abs(xx - cx)
    body = (dx < cw / 2) & (yy < base) & (yy >= base - 0.55 * ch)
    cabin_y = base - 0.55 * ch
    cabin = (yy >= base - ch) & (yy < cabin_y) & (dx < cw * 0.36 - (cabin_y - yy) * 0.35)
    wheel_r = max(0.7, 0.12 * cw)
    wheels = ((np.minimum(np.abs(xx - cx + 0.3 * cw), np.abs(xx - cx - 0.3 * cw))) ** 2 + (yy - base + 0.5 * wheel_r) ** 2
              < wheel_r**2)
    palette = [_grey(rng, 20, 60, 5), _grey(rng, 120, 220, 5), [150, 30, 30], [30, 50, 140], [50, 100, 45]]
    paint = np.asarray(palette[int(rng.integers(len(palette)))], np.float32) + rng.uniform(-15, 15, 3)
    shine = (base - yy)[:, :, None] / max(ch, 1.0) * rng.uniform(10, 40)
    c.paint(body, CAR, paint + shine)
    glass = _grey(rng, 35, 90, 10) + (yy - base + ch)[:, :, None] * 2.0
    c.paint(cabin, CAR, glass)
    c.paint(wheels & (yy < base + wheel_r), CAR, _grey(rng, 15, 35, 3))


def _draw_pole(c: _Canvas, rng, x, base, t):
    width = max(1.0, round(3 * t * rng.uniform(0.6, 1.2)))
    top = base - t * rng.uniform(0.8, 1.8) * c.h
    yy, xx = c.yy, c.xx
    pole = (xx >= x) & (xx < x + width) & (yy >= top) & (yy < base)
    grey = _grey(rng, 80, 180, 6)
    c.paint(pole, POLE, grey + (yy - top)[:, :, None] * 0.1)
    if rng.random() < 0.5:  # a sign or lamp head, same class as the pole
        sw, sh = max(2.0, 5 * t * c.w / 128), max(2.0, 4 * t * c.h / 96)
        sign = (np.abs(xx - x - width / 2) < sw / 2) & (yy >= top) & (yy < top + sh)
        c.paint(sign, POLE, _grey(rng, 60, 230, 60))


def _draw_person(c: _Canvas, rng, x, base, t):
    ph = t * rng.uniform(0.3, 0.5) * c.h
    yy, xx = c.yy, c.xx
    head = (xx - x) ** 2 + (yy - (base - 0.9 * ph)) ** 2 < (0.09 * ph + 0.4) ** 2
    torso = ((xx - x) / (0.15 * ph + 0.5)) ** 2 + ((yy - (base - 0.6 * ph)) / (0.23 * ph + 0.5)) ** 2 < 1.0
    legs = (np.abs(np.abs(xx - x) - 0.06 * ph) < 0.04 * ph + 0.5) & (yy >= base - 0.42 * ph) & (yy < base)
    shirt = [_grey(rng, 30, 200, 10), [60, 110, 50], [160, 40, 40], [40, 60, 150], [200, 180, 60]]
    c.paint(legs, PERSON, _grey(rng, 20, 90, 15))
    c.paint(torso, PERSON, np.asarray(shirt[int(rng.integers(len(shirt)))], np.float32) + rng.uniform(-15, 15, 3))
    c.paint(head, PERSON, [rng.uniform(120, 220), rng.uniform(90, 170), rng.uniform(70, 140)])


def _draw_clutter(c: _Canvas, rng, x, base, t):
    """Unlabelled street furniture (bins, boxes): ignored in loss and metrics."""
    bw, bh = t * rng.uniform(0.04, 0.12) * c.w + 1, t * rng.uniform(0.06, 0.15) * c.h + 1
    box = (np.abs(c.xx - x) < bw / 2) & (c.yy >= base - bh) & (c.yy < base)
    rgb = _textured(_grey(rng, 40, 200, 40), 10, c.rng.standard_normal((c.h, c.w)).astype(np.float32))
    c.paint(box, IGNORE_INDEX, rgb)


def _jitter_boundaries(rng, label: np.ndarray, fraction: float) -> np.ndarray:
    """Give `fraction` of the boundary pixels the class of a random 4-neighbour (annotation noise)."""
    padded = np.pad(label, 1, mode="edge")
    h, w = label.shape
    neighbours = np.stack([padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
    boundary = (neighbours != label[None]).any(axis=0)
    pick = boundary & (rng.random((h, w)) < fraction)
    direction = rng.integers(0, 4, (h, w))
    jittered = np.take_along_axis(neighbours, direction[None], axis=0)[0]
    return np.where(pick, jittered, label).astype(np.uint8)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def generate_split(
    split: str, num_samples: int, image_size: Sequence[int] = (96, 128), seed: int = 0
) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """Render `num_samples` scenes of a split as arrays (`(H, W, 3)` uint8 images, `(H, W)` uint8 labels).

    Sample `i` of a split depends only on `(seed, split, i)` and the image size.
    """
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; valid choices: {', '.join(_SPLIT_CODES)}")
    h, w = int(image_size[0]), int(image_size[1])
    images, labels = [], []
    for i in range(num_samples):
        rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], i])
        image, label = render_street(rng, h, w)
        images.append(image)
        labels.append(label)
    return images, labels


def build_synthetic_streets(
    num_train: int = 256,
    num_val: int = 64,
    num_test: int = 0,
    image_size: Sequence[int] = (96, 128),
    seed: int = 0,
    cache_dir: Optional[str] = None,
):
    """Build `synthetic-streets` as a `DatasetDict` (train / validation [/ test]).

    Args:
        num_train, num_val, num_test: samples per split (a split with 0 samples is left out).
        image_size: `(H, W)` in pixels; at least 32 x 32.
        seed: the same seed gives identical images and labels.
        cache_dir: None keeps the PNG bytes in memory; a folder writes them there once (a
            sub-folder per option set) and later builds only read the paths.

    Returns:
        `(DatasetDict, DatasetInfo)`; lazy columns `image`, `label` (`datasets.Image(decode=False)`:
        rows hold `{"path", "bytes"}`, `SegmentationTransform` decodes them).
    """
    if len(image_size) != 2 or min(int(s) for s in image_size) < 32:
        raise ValueError(f"image_size must be (H, W) with both >= 32, got {tuple(image_size)}")
    counts = {"train": num_train, "validation": num_val, "test": num_test}
    for split, n in counts.items():
        if int(n) < 0:
            raise ValueError(f"num_{'val' if split == 'validation' else split} must be >= 0, got {n}")
    if int(num_train) == 0 and int(num_val) == 0:
        raise ValueError("synthetic-streets needs num_train > 0 or num_val > 0")
    h, w = int(image_size[0]), int(image_size[1])
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Image(decode=False)})
    folder = None
    if cache_dir is not None:
        key = json.dumps({"size": [h, w], "seed": int(seed), "version": 1}, sort_keys=True)
        folder = Path(cache_dir) / f"synthetic-streets-{hashlib.sha1(key.encode()).hexdigest()[:10]}"

    splits: Dict[str, "datasets.Dataset"] = {}
    for split, n in counts.items():
        n = int(n)
        if n == 0:
            continue
        if folder is None:
            images, labels = generate_split(split, n, (h, w), seed)
            rows = {
                "image": [{"bytes": _png(im), "path": f"synthetic-streets/{split}/{i:05d}.png"}
                          for i, im in enumerate(images)],
                "label": [{"bytes": _png(lab), "path": f"synthetic-streets/{split}/{i:05d}_label.png"}
                          for i, lab in enumerate(labels)],
            }
        else:
            rows = _cached_split(folder / split, split, n, (h, w), seed)
        splits[split] = datasets.Dataset.from_dict(rows, features=features, split=datasets.NamedSplit(split))
    return datasets.DatasetDict(splits), synthetic_streets_info()


def _cached_split(folder: Path, split: str, n: int, size, seed: int) -> Dict[str, List[str]]:
    """Write the missing samples of a split as PNGs under `folder` and return their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    image_paths = [folder / f"{i:05d}.png" for i in range(n)]
    label_paths = [folder / f"{i:05d}_label.png" for i in range(n)]
    for i in range(n):
        if image_paths[i].is_file() and label_paths[i].is_file():
            continue
        rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], i])
        image, label = render_street(rng, size[0], size[1])
        # Write to a temporary name first so that an interrupted build never leaves a truncated PNG.
        for path, array in ((image_paths[i], image), (label_paths[i], label)):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(_png(array))
            tmp.replace(path)
    return {"image": [str(p) for p in image_paths], "label": [str(p) for p in label_paths]}


__all__ = [
    "SYNTHETIC_CLASSES",
    "SYNTHETIC_PALETTE",
    "build_synthetic_streets",
    "generate_split",
    "render_street",
    "synthetic_streets_info",
]
