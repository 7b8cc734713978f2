"""`build_dataset(name, root, **options) -> (DatasetDict, DatasetInfo)` for every supported dataset.

Folder datasets become `datasets.Dataset.from_dict` tables of file paths. Every builder returns
lazy `datasets.Image(decode=False)` columns `image` and `label`: rows carry `{"path", "bytes"}`
dicts and nothing is decoded until `SegmentationTransform` opens the files, inside a check that
names a broken one (`fotf_hf.data.decode_image` opens a row by hand; `scan_split` checks a split).
Splits are named `train`, `validation` and, where present, `test`.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np

from .info import (
    CAMVID_CLASSES,
    CAMVID_PALETTE,
    IGNORE_INDEX,
    LABEL_MAP_COLUMN,
    VOC_CLASSES,
    DatasetInfo,
    as_id2label,
    cityscapes_tables,
    make_label_map,
    pascal_palette,
)
from .synthetic import build_synthetic_streets
from .transforms import defer_decoding

Pairs = Tuple[List[str], List[str]]
_MAX_LISTED = 10


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(str(i) for i in list(items)[:_MAX_LISTED])
    return shown + (f" ... ({len(items)} in all)" if len(items) > _MAX_LISTED else "")


def _paths_dataset(images: Sequence[str], labels: Sequence[str], label_map: Optional[str] = None,
                   split: Optional[str] = None):
    """A lazy `Dataset` over image/label paths (`Image(decode=False)`; plus the `label_map` column when needed)."""
    columns = {"image": list(images), "label": list(labels)}
    features = {"image": datasets.Image(decode=False), "label": datasets.Image(decode=False)}
    if label_map:
        columns[LABEL_MAP_COLUMN] = [label_map] * len(columns["image"])
        features[LABEL_MAP_COLUMN] = datasets.Value("string")
    return datasets.Dataset.from_dict(
        columns, features=datasets.Features(features), split=None if split is None else datasets.NamedSplit(split)
    )


def root_env_var(name: str) -> str:
    """The environment variable that gives dataset `name`'s folder when no root is passed, e.g.
    `FOTF_CAMVID_ROOT` (so configs and tests never hard-code a path outside the project)."""
    return f"FOTF_{name.upper()}_ROOT"


def _check_root(root, name: str, required: Sequence[str], layout: str) -> Path:
    if root is None:
        root = os.environ.get(root_env_var(name)) or None
    if root is None:
        raise ValueError(
            f"dataset {name!r} needs its folder: pass it (--data.root <folder> for training, --root <folder> "
            f"for evaluation) or set {root_env_var(name)}=<folder> (expected layout: {layout})"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"{name} root {str(root)!r} does not exist or is not a folder (expected layout: {layout})")
    missing = [sub for sub in required if not (root / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{name} root {str(root)!r} lacks the sub-folder(s) {', '.join(missing)} (expected layout: {layout})"
        )
    return root


def _check_files_exist(images: Sequence[str], labels: Sequence[str], source: str) -> None:
    missing_images = [p for p in images if not os.path.isfile(p)]
    missing_labels = [p for p in labels if not os.path.isfile(p)]
    if missing_images or missing_labels:
        parts = []
        if missing_images:
            parts.append(f"images not found: {_examples(missing_images)}")
        if missing_labels:
            parts.append(f"labels not found: {_examples(missing_labels)}")
        raise FileNotFoundError(f"{source}: " + "; ".join(parts))


def _match_by_key(images: Dict[str, str], labels: Dict[str, str], source: str) -> Pairs:
    """Pair files that share a key; name every image without a label and every label without an image."""
    lonely_images = sorted(images[k] for k in images.keys() - labels.keys())
    lonely_labels = sorted(labels[k] for k in labels.keys() - images.keys())
    if lonely_images or lonely_labels:
        parts = []
        if lonely_images:
            parts.append(f"images without a label: {_examples(lonely_images)}")
        if lonely_labels:
            parts.append(f"labels without an image: {_examples(lonely_labels)}")
        raise FileNotFoundError(f"{source}: " + "; ".join(parts))
    if not images:
        raise FileNotFoundError(f"{source}: no image/label pairs found")
    keys = sorted(images)
    return [images[k] for k in keys], [labels[k] for k in keys]


def _read_list(path: Path) -> List[List[str]]:
    lines = [line.split() for line in path.read_text().splitlines()]
    return [tokens for tokens in lines if tokens]


# --------------------------------------------------------------------------- CamVid

CAMVID_LAYOUT = "train/ trainannot/ val/ valannot/ [test/ testannot/] + optional train.txt val.txt test.txt"


def build_camvid(root) -> Tuple[datasets.DatasetDict, DatasetInfo]:
    """CamVid in the SegNet layout: 11 classes, label 11 (void) -> 255.

    List files (`train/X.png trainannot/X.png` per line; only the last two path components of each
    entry are used, so SegNet's `/SegNet/CamVid/...` prefixes work) define the splits; without one,
    the images of `{split}/` are matched by name to `{split}annot/`. The test split is optional.
    """
    root = _check_root(root, "camvid", ["train", "trainannot", "val", "valannot"], CAMVID_LAYOUT)
    label_map = make_label_map({11: IGNORE_INDEX})
    splits = {}
    for split, out_name in (("train", "train"), ("val", "validation"), ("test", "test")):
        list_file = root / f"{split}.txt"
        if list_file.is_file():
            images, labels = [], []
            for number, tokens in enumerate(_read_list(list_file), 1):
                if len(tokens) != 2:
                    raise ValueError(f"{list_file}:{number}: expected 'image label' paths, got {' '.join(tokens)!r}")
                image, label = (root.joinpath(*Path(t).parts[-2:]) for t in tokens)
                images.append(str(image))
                labels.append(str(label))
            _check_files_exist(images, labels, f"camvid list {list_file}")
        elif (root / split).is_dir() and (root / f"{split}annot").is_dir():
            images, labels = _match_by_key(
                {p.name: str(p) for p in (root / split).glob("*.png")},
                {p.name: str(p) for p in (root / f"{split}annot").glob("*.png")},
                f"camvid {split}/ vs {split}annot/ in {root}",
            )
        else:
            continue  # only the test split may be absent; train/val folders were checked above
        splits[out_name] = _paths_dataset(images, labels, label_map, split=out_name)
    info = DatasetInfo(
        name="camvid", num_labels=len(CAMVID_CLASSES), id2label=dict(enumerate(CAMVID_CLASSES)),
        palette=np.asarray(CAMVID_PALETTE, dtype=np.uint8),
    )
    return datasets.DatasetDict(splits), info


# --------------------------------------------------------------------------- Cityscapes

CITYSCAPES_LAYOUT = "leftImg8bit/{train,val[,test]}/CITY/*_leftImg8bit.png + gtFine/{train,val[,test]}/CITY/*_gtFine_labelIds.png"


def build_cityscapes(root) -> Tuple[datasets.DatasetDict, DatasetInfo]:
    """Cityscapes (official layout, fine annotations): label ids -> the 19 train ids of
    `cityscapesscripts.helpers.labels`; every other id (trainId 255 / -1, ignoreInEval) -> 255."""
    root = _check_root(
        root, "cityscapes", ["leftImg8bit/train", "leftImg8bit/val", "gtFine/train", "gtFine/val"], CITYSCAPES_LAYOUT
    )
    id2label, palette, label_map = cityscapes_tables()
    image_suffix, label_suffix = "_leftImg8bit.png", "_gtFine_labelIds.png"
    splits = {}
    for split, out_name in (("train", "train"), ("val", "validation"), ("test", "test")):
        image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        if not (image_dir.is_dir() and label_dir.is_dir()):
            continue
        images = {str(p.relative_to(image_dir))[: -len(image_suffix)]: str(p) for p in image_dir.glob(f"*/*{image_suffix}")}
        labels = {str(p.relative_to(label_dir))[: -len(label_suffix)]: str(p) for p in label_dir.glob(f"*/*{label_suffix}")}
        pairs = _match_by_key(images, labels, f"cityscapes {split} in {root}")
        splits[out_name] = _paths_dataset(*pairs, label_map, split=out_name)
    info = DatasetInfo(name="cityscapes", num_labels=len(id2label), id2label=id2label, palette=palette)
    return datasets.DatasetDict(splits), info


# --------------------------------------------------------------------------- Pascal VOC 2012 + SBD

VOC_LAYOUT = (
    "JPEGImages/*.jpg, SegmentationClassAug/*.png (grey train ids) and/or SegmentationClass/*.png (palette), "
    "list files train_aug.txt / val.txt at the root or in ImageSets/Segmentation/"
)


def _find_list(root: Path, given: Union[str, os.PathLike], name: str) -> Path:
    given_path = Path(given)
    candidates = [given_path] if given_path.is_absolute() else [
        root / given_path, root / f"{given}.txt", root / "ImageSets" / "Segmentation" / f"{given}.txt",
        root / "ImageSets" / "Segmentation" / str(given),
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"voc {name} list {str(given)!r} not found; looked at: {', '.join(str(p) for p in candidates)} "
        "(give train_list= / val_list= as a path)"
    )


def build_voc(root, train_list: str = "train_aug", val_list: str = "val") -> Tuple[datasets.DatasetDict, DatasetInfo]:
    """Pascal VOC 2012 with the SBD augmented training set: 21 classes, 255 already the ignore value.

    List lines are either a name (`2007_000032`: image `JPEGImages/NAME.jpg`, label
    `SegmentationClassAug/NAME.png` for training, `SegmentationClass/NAME.png` for validation, each
    falling back to the other folder) or an `/JPEGImages/x.jpg /SegmentationClassAug/x.png` pair.
    Palette PNGs decode to their indices (no colour conversion).
    """
    root = _check_root(root, "voc", ["JPEGImages"], VOC_LAYOUT)
    label_dirs = [d for d in ("SegmentationClassAug", "SegmentationClass") if (root / d).is_dir()]
    if not label_dirs:
        raise FileNotFoundError(
            f"voc root {str(root)!r} lacks the sub-folder(s) SegmentationClassAug, SegmentationClass "
            f"(at least one is needed; expected layout: {VOC_LAYOUT})"
        )
    splits = {}
    for out_name, given, preferred in (("train", train_list, "SegmentationClassAug"),
                                       ("validation", val_list, "SegmentationClass")):
        list_file = _find_list(root, given, out_name)
        label_dir = preferred if preferred in label_dirs else label_dirs[0]
        images, labels = [], []
        for number, tokens in enumerate(_read_list(list_file), 1):
            if len(tokens) == 1:
                images.append(str(root / "JPEGImages" / f"{tokens[0]}.jpg"))
                labels.append(str(root / label_dir / f"{tokens[0]}.png"))
            elif len(tokens) == 2:
                images.append(str(root / tokens[0].lstrip("/")))
                labels.append(str(root / tokens[1].lstrip("/")))
            else:
                raise ValueError(f"{list_file}:{number}: expected a name or an 'image label' pair, got {' '.join(tokens)!r}")
        _check_files_exist(images, labels, f"voc list {list_file}")
        splits[out_name] = _paths_dataset(images, labels, split=out_name)
    info = DatasetInfo(name="voc", num_labels=len(VOC_CLASSES), id2label=dict(enumerate(VOC_CLASSES)),
                       palette=pascal_palette(len(VOC_CLASSES)), ignore_color=(224, 224, 192))
    return datasets.DatasetDict(splits), info


# --------------------------------------------------------------------------- Hub / local `datasets`

_SPLIT_ALIASES = {"val": "validation", "valid": "validation", "eval": "validation"}


def build_hub(
    path: Optional[str] = None,
    name: Optional[str] = None,
    data_dir: Optional[str] = None,
    data_files=None,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    image_column: str = "image",
    label_column: str = "label",
    id2label: Union[Mapping, Sequence[str], None] = None,
    num_labels: Optional[int] = None,
    label_map: Union[Mapping, str, None] = None,
    ignore_value: Optional[int] = None,
    val_fraction: Optional[float] = None,
    seed: int = 0,
    palette: Optional[Sequence[Sequence[int]]] = None,
    dataset_name: Optional[str] = None,
    root=None,
) -> Tuple[datasets.DatasetDict, DatasetInfo]:
    """Any dataset `datasets.load_dataset` (or `load_from_disk`) can open, as image/label columns.

    Args:
        path: Hub id, builder name (`imagefolder`) or local folder; a folder written by
            `save_to_disk` is opened with `load_from_disk`. `root` is accepted as its alias.
        name, data_dir, data_files, revision, cache_dir: passed to `load_dataset`.
        image_column, label_column: columns holding the image and the class-id mask (both
            `datasets.Image` features); renamed to `image` / `label`, other columns dropped.
        id2label: `{id: name}` or a list of names; default: `id2label.json` next to a local
            dataset, else `num_labels` generic names.
        label_map: `{old: new}` (other values unchanged) or `"reduce_labels"` (0 -> 255, x -> x - 1).
        ignore_value: raw value that means "ignore" in this dataset; remapped to 255.
        val_fraction: carve a validation split out of `train` when the dataset has none.
        dataset_name: name recorded in `DatasetInfo` (default: `path`).
    """
    path = path if path is not None else (str(root) if root is not None else None)
    if path is None:
        raise ValueError("dataset 'hub' needs path=<Hub id, builder name or local folder> (or root=)")
    local = Path(str(path)).expanduser()
    loaded = _load_hub_splits(path, local, name, data_dir, data_files, revision, cache_dir)
    _check_image_columns(loaded, path, image_column, label_column)

    if "validation" not in loaded and val_fraction is not None:
        if not 0 < val_fraction < 1 or "train" not in loaded:
            raise ValueError(f"val_fraction must be in (0, 1) and the dataset needs a train split, got {val_fraction}")
        parts = loaded["train"].train_test_split(test_size=val_fraction, seed=seed)
        loaded = datasets.DatasetDict({**loaded, "train": parts["train"], "validation": parts["test"]})

    spec = _hub_label_map(label_map, ignore_value)
    out = {}
    for split, ds in loaded.items():
        ds = ds.select_columns([image_column, label_column])
        if image_column != "image" or label_column != "label":
            ds = ds.rename_columns({image_column: "image", label_column: "label"})
        if spec:
            ds = ds.add_column(LABEL_MAP_COLUMN, [spec] * len(ds), feature=datasets.Value("string"))
        out[split] = defer_decoding(ds, ("image", "label"))

    if id2label is None and local.is_dir() and (local / "id2label.json").is_file():
        id2label = json.loads((local / "id2label.json").read_text())
    id2label = as_id2label(id2label, num_labels, f"dataset {path!r}")
    info = DatasetInfo(name=dataset_name or str(path), num_labels=len(id2label), id2label=id2label,
                       palette=None if palette is None else np.asarray(palette, dtype=np.uint8))
    return datasets.DatasetDict(out), info


def _load_hub_splits(path, local: Path, name, data_dir, data_files, revision,
                     cache_dir) -> datasets.DatasetDict:
    """`load_from_disk` for a `save_to_disk` folder, else `load_dataset`; a lone `Dataset` becomes the
    `train` split, and `val` / `valid` / `eval` are renamed `validation` unless that name is taken."""
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        loaded = datasets.load_from_disk(str(local))
    else:
        loaded = datasets.load_dataset(
            str(path), name, data_dir=data_dir, data_files=data_files, revision=revision, cache_dir=cache_dir
        )
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    renamed = {}
    for split, ds in loaded.items():
        alias = _SPLIT_ALIASES.get(split)
        renamed[alias if alias and alias not in loaded else split] = ds
    return datasets.DatasetDict(renamed)


def _check_image_columns(loaded: datasets.DatasetDict, path, image_column: str, label_column: str) -> None:
    """Every split has both columns, and both are `datasets.Image` features."""
    for split, ds in loaded.items():
        missing = [c for c in (image_column, label_column) if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"dataset {path!r} split {split!r} has no column(s) {', '.join(map(repr, missing))}; it has: "
                f"{', '.join(ds.column_names)} (set options image_column= / label_column=)"
            )
        for column in (image_column, label_column):
            if not isinstance(ds.features[column], datasets.Image):
                raise ValueError(
                    f"dataset {path!r} column {column!r} is {ds.features[column]!r}, not an image; a segmentation "
                    "dataset needs datasets.Image() columns for both the image and the class-id mask"
                )


def _hub_label_map(label_map, ignore_value) -> Optional[str]:
    pairs: Dict[int, int] = {}
    offset = 0
    if isinstance(label_map, str):
        if label_map != "reduce_labels":
            raise ValueError(f"unknown label_map {label_map!r}; valid: a dict {{old: new}} or 'reduce_labels'")
        pairs, offset = {0: IGNORE_INDEX, IGNORE_INDEX: IGNORE_INDEX}, -1
    elif isinstance(label_map, Mapping):
        try:
            pairs = {int(k): int(v) for k, v in label_map.items()}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"label_map keys and values must be integers, got {dict(label_map)}") from exc
    elif label_map is not None:
        raise ValueError(f"label_map must be a dict {{old: new}}, 'reduce_labels' or None, got {label_map!r}")
    if ignore_value is not None:
        pairs[int(ignore_value)] = IGNORE_INDEX
    if not pairs and offset == 0:
        return None
    return make_label_map(pairs, offset)


# --------------------------------------------------------------------------- entry point

BUILDERS: Dict[str, Callable] = {
    "camvid": build_camvid,
    "cityscapes": build_cityscapes,
    "voc": build_voc,
    "hub": build_hub,
    "synthetic-streets": build_synthetic_streets,
}
DATASETS = tuple(BUILDERS)


def build_dataset(name: str, root=None, **options) -> Tuple[datasets.DatasetDict, DatasetInfo]:
    """Build a segmentation dataset.

    Args:
        name: one of `DATASETS`: camvid | cityscapes | voc | hub | synthetic-streets.
        root: the dataset folder (camvid, cityscapes, voc; `path` for hub; cache folder for
            synthetic-streets, optional).
        **options: builder options, see `build_camvid`, `build_cityscapes`, `build_voc`,
            `build_hub`, `build_synthetic_streets`.

    Returns:
        `(DatasetDict, DatasetInfo)`: splits `train` / `validation` [/ `test`] with lazy
        `datasets.Image(decode=False)` columns `image` and `label` (rows hold `{"path", "bytes"}`;
        `SegmentationTransform` decodes them and names a broken file) + a `label_map` string column
        when raw ids need remapping (`SegmentationTransform` applies it).
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    builder = BUILDERS[name]
    accepted = [p for p in inspect.signature(builder).parameters if p != "root"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; valid options: {', '.join(accepted) or 'none'}"
        )
    if name == "synthetic-streets":
        if root is not None and "cache_dir" in options:
            raise ValueError("synthetic-streets: give the cache folder as root= or cache_dir=, not both")
        if root is not None:
            options["cache_dir"] = root
        dataset_dict, info = builder(**options)
    elif name == "hub":
        dataset_dict, info = builder(root=root, **options)
    else:
        dataset_dict, info = builder(root, **options)
    # Every built-in builder already returns lazy columns; this covers any other registered one.
    return defer_decoding(dataset_dict, ("image", "label")), info


__all__ = [
    "BUILDERS",
    "DATASETS",
    "build_camvid",
    "build_cityscapes",
    "build_dataset",
    "build_hub",
    "build_synthetic_streets",
    "build_voc",
]
