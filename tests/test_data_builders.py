"""Dataset builders on small layouts written by the tests; decoded labels checked value by value."""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from fotf_hf.data import SegmentationTransform, build_dataset, decode_image, pascal_palette


def _png(path, array, mode=None, palette=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array), mode=mode)
    if palette is not None:
        image.putpalette(palette)
    image.save(path)
    return path


def _eval_labels(dataset, info):
    tf = SegmentationTransform(train=False, num_labels=info.num_labels)
    return [row["labels"].numpy() for row in dataset.with_transform(tf)]


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


# --------------------------------------------------------------------------- CamVid (SegNet layout)


def _camvid(root, names=("a", "b"), lists=True, with_test=False):
    label = np.array([[0, 3, 11], [10, 8, 11]], np.uint8)
    splits = ["train", "val"] + (["test"] if with_test else [])
    for split in splits:
        for n in names:
            _png(root / split / f"{split}_{n}.png", _rgb(2, 3))
            _png(root / f"{split}annot" / f"{split}_{n}.png", label)
        if lists:
            # SegNet's own lists prefix the label paths with /SegNet/CamVid/
            (root / f"{split}.txt").write_text(
                "".join(f"{split}/{split}_{n}.png /SegNet/CamVid/{split}annot/{split}_{n}.png\n" for n in names)
            )
    return label


@pytest.mark.parametrize("lists", [True, False])
def test_camvid_layout_and_void_to_ignore(tmp_path, lists):
    _camvid(tmp_path, lists=lists, with_test=True)
    dd, info = build_dataset("camvid", root=tmp_path)
    assert set(dd) == {"train", "validation", "test"}
    assert info.num_labels == 11 and info.id2label[0] == "Sky" and info.id2label[10] == "Bicyclist"
    assert info.palette.shape == (11, 3) and info.palette.dtype == np.uint8
    # lazy columns: rows hold {"path", "bytes"}; SegmentationTransform decodes (and names broken files)
    lazy = datasets.Image(decode=False)
    assert dd["train"].features["image"] == lazy and dd["train"].features["label"] == lazy
    assert dd["validation"].cache_files == []  # in memory: paths only
    rows = dd["validation"]
    assert [Path(r["image"]["path"]).name for r in rows] == ["val_a.png", "val_b.png"]
    assert [Path(r["label"]["path"]).parent.name for r in rows] == ["valannot", "valannot"]
    for lab in _eval_labels(dd["validation"], info):
        np.testing.assert_array_equal(lab, [[0, 3, 255], [10, 8, 255]])


def test_camvid_without_test_split(tmp_path):
    _camvid(tmp_path)
    dd, _ = build_dataset("camvid", root=tmp_path)
    assert set(dd) == {"train", "validation"} and len(dd["train"]) == 2


def test_camvid_missing_root_and_subfolders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*trainannot"):
        build_dataset("camvid", root=tmp_path / "nope")
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks the sub-folder\(s\) trainannot, valannot \(expected layout: train/ trainannot/"):
        build_dataset("camvid", root=tmp_path)


def test_camvid_root_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("FOTF_CAMVID_ROOT", raising=False)
    with pytest.raises(ValueError, match="needs its folder: pass it .*--data.root.* or set FOTF_CAMVID_ROOT=<folder>"):
        build_dataset("camvid")
    _camvid(tmp_path)
    monkeypatch.setenv("FOTF_CAMVID_ROOT", str(tmp_path))
    dd, _ = build_dataset("camvid")  # no root: the variable gives it
    assert len(dd["train"]) == 2
    monkeypatch.setenv("FOTF_CAMVID_ROOT", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        build_dataset("camvid")


def test_camvid_image_without_label_and_label_without_image(tmp_path):
    _camvid(tmp_path, lists=False)
    (tmp_path / "valannot" / "val_b.png").unlink()
    _png(tmp_path / "valannot" / "val_z.png", np.zeros((2, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match=r"images without a label: .*val_b\.png.*labels without an image: .*val_z\.png"):
        build_dataset("camvid", root=tmp_path)


def test_camvid_list_entry_without_file(tmp_path):
    _camvid(tmp_path)
    (tmp_path / "trainannot" / "train_a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels not found: .*trainannot/train_a\.png"):
        build_dataset("camvid", root=tmp_path)


# --------------------------------------------------------------------------- Cityscapes


def _cityscapes(root):
    # real Cityscapes label ids: 7 road, 26 car, 0 unlabeled, 1 ego vehicle, 24 person, 33 bicycle,
    # 9 parking (ignoreInEval), 14 guard rail (trainId 255), 23 sky, 21 vegetation
    label_ids = np.array([[7, 26, 0, 1, 24], [33, 9, 14, 23, 21]], np.uint8)
    for split, city in (("train", "aachen"), ("val", "lindau")):
        for i in range(2):
            stem = f"{city}_000000_00001{i}"
            _png(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", _rgb(2, 5, i))
            _png(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label_ids)
            _png(root / "gtFine" / split / city / f"{stem}_gtFine_color.png", _rgb(2, 5))  # present in the release
    return label_ids


def test_cityscapes_label_ids_to_train_ids(tmp_path):
    _cityscapes(tmp_path)
    dd, info = build_dataset("cityscapes", root=tmp_path)
    assert set(dd) == {"train", "validation"} and len(dd["train"]) == 2
    assert info.num_labels == 19
    assert info.id2label[0] == "road" and info.id2label[13] == "car" and info.id2label[18] == "bicycle"
    assert tuple(info.palette[0]) == (128, 64, 128)
    expected = [[0, 13, 255, 255, 11], [18, 255, 255, 10, 8]]
    for lab in _eval_labels(dd["validation"], info):
        np.testing.assert_array_equal(lab, expected)


def test_cityscapes_unpaired_and_missing_folders(tmp_path):
    _cityscapes(tmp_path)
    (tmp_path / "gtFine" / "val" / "lindau" / "lindau_000000_000011_gtFine_labelIds.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"images without a label: .*lindau_000000_000011_leftImg8bit\.png"):
        build_dataset("cityscapes", root=tmp_path)
    other = tmp_path / "other"
    (other / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val, gtFine/train, gtFine/val.*_gtFine_labelIds"):
        build_dataset("cityscapes", root=other)


# --------------------------------------------------------------------------- Pascal VOC 2012 + SBD


def _voc(root, list_dir="", pair_lines=False):
    palette = pascal_palette(256).ravel().tolist()
    train_label = np.array([[0, 15, 15], [255, 20, 1]], np.uint8)
    val_label = np.array([[255, 255, 255], [0, 12, 255]], np.uint8)  # VOC's 255 object borders
    names = {"train": ["2008_000001", "2008_000002"], "val": ["2007_000033"]}
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    for n in names["train"] + names["val"]:
        Image.fromarray(_rgb(2, 3)).save(root / "JPEGImages" / f"{n}.jpg", quality=95)
        _png(root / "SegmentationClassAug" / f"{n}.png", train_label if n in names["train"] else val_label)
    for n in names["val"]:
        _png(root / "SegmentationClass" / f"{n}.png", val_label, mode="P", palette=palette)
    (root / list_dir).mkdir(parents=True, exist_ok=True)
    for stem, split in (("train_aug", "train"), ("val", "val")):
        folder = "SegmentationClassAug" if split == "train" else "SegmentationClass"
        lines = [f"/JPEGImages/{n}.jpg /{folder}/{n}.png" if pair_lines else n for n in names[split]]
        (root / list_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    return train_label, val_label


@pytest.mark.parametrize("list_dir,pair_lines", [("", False), ("ImageSets/Segmentation", True)])
def test_voc_lists_palette_labels_and_ignore(tmp_path, list_dir, pair_lines):
    train_label, val_label = _voc(tmp_path, list_dir, pair_lines)
    dd, info = build_dataset("voc", root=tmp_path)
    assert info.num_labels == 21 and info.id2label[15] == "person" and tuple(info.palette[15]) == (192, 128, 128)
    assert len(dd["train"]) == 2 and len(dd["validation"]) == 1
    assert decode_image(dd["validation"][0]["label"]).mode == "P"
    val_paths = dd["validation"][0]["label"]["path"]
    assert Path(val_paths).parent.name == "SegmentationClass"
    np.testing.assert_array_equal(_eval_labels(dd["validation"], info)[0], val_label)
    for lab in _eval_labels(dd["train"], info):
        np.testing.assert_array_equal(lab, train_label)
    # a palette PNG converted through mode "L" would have been corrupted: that is what we avoid
    assert not np.array_equal(np.asarray(decode_image(dd["validation"][0]["label"]).convert("L")), val_label)


def test_voc_explicit_list_paths_and_missing_list(tmp_path):
    _voc(tmp_path, "lists")
    with pytest.raises(FileNotFoundError, match=r"train list 'train_aug' not found; looked at: .*ImageSets/Segmentation"):
        build_dataset("voc", root=tmp_path)
    dd, _ = build_dataset("voc", root=tmp_path, train_list=str(tmp_path / "lists" / "train_aug.txt"),
                          val_list=str(tmp_path / "lists" / "val.txt"))
    assert len(dd["train"]) == 2


def test_voc_missing_subfolders_and_missing_label(tmp_path):
    (tmp_path / "JPEGImages").mkdir()
    with pytest.raises(FileNotFoundError, match="SegmentationClassAug, SegmentationClass"):
        build_dataset("voc", root=tmp_path)
    other = tmp_path / "o"
    _voc(other)
    (other / "SegmentationClass" / "2007_000033.png").unlink()
    (other / "SegmentationClassAug" / "2007_000033.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels not found: .*2007_000033\.png"):
        build_dataset("voc", root=other)


# --------------------------------------------------------------------------- Hub / local datasets


def _imagefolder(root):
    labels = {"train": np.array([[0, 1, 2], [3, 0, 9]], np.uint8), "validation": np.array([[3, 3, 9]], np.uint8)}
    for split, label in labels.items():
        rows = []
        for i in range(2):
            _png(root / split / "images" / f"{i}.png", _rgb(*label.shape, i))
            _png(root / split / "masks" / f"{i}.png", label)
            rows.append({"file_name": f"images/{i}.png", "label_file_name": f"masks/{i}.png", "city": "x"})
        (root / split / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return labels


def test_hub_imagefolder_reduce_labels_and_ignore_value(tmp_path):
    _imagefolder(tmp_path / "data")
    dd, info = build_dataset(
        "hub", path="imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"),
        label_map="reduce_labels", ignore_value=9, id2label=["a", "b", "c"],
    )
    assert set(dd) == {"train", "validation"}
    assert dd["train"].column_names == ["image", "label", "label_map"]
    assert info.id2label == {0: "a", 1: "b", 2: "c"} and info.num_labels == 3
    np.testing.assert_array_equal(_eval_labels(dd["train"], info)[0], [[255, 0, 1], [2, 255, 255]])
    np.testing.assert_array_equal(_eval_labels(dd["validation"], info)[1], [[2, 2, 255]])


def test_hub_missing_columns_are_listed(tmp_path):
    _imagefolder(tmp_path / "data")
    with pytest.raises(ValueError, match=r"no column\(s\) 'mask'; it has: image, label, city"):
        build_dataset("hub", path="imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"),
                      label_column="mask", num_labels=3)
    with pytest.raises(ValueError, match="'city' is .*not an image"):
        build_dataset("hub", path="imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"),
                      label_column="city", num_labels=3)


def test_hub_save_to_disk_with_other_column_names_and_label_dict(tmp_path):
    features = datasets.Features({"pixel_values": datasets.Image(), "annotation": datasets.Image(),
                                  "extra": datasets.Value("int32")})
    label = np.array([[0, 5, 6], [1, 2, 0]], np.uint8)
    paths = [str(_png(tmp_path / "src" / "i.png", _rgb(2, 3))), str(_png(tmp_path / "src" / "m.png", label))]
    ds = datasets.Dataset.from_dict({"pixel_values": [paths[0]] * 3, "annotation": [paths[1]] * 3, "extra": [1, 2, 3]},
                                    features=features)
    datasets.DatasetDict({"train": ds, "val": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved" / "id2label.json").write_text(json.dumps({"0": "bg", "1": "x", "2": "y", "3": "z"}))
    dd, info = build_dataset("hub", root=str(tmp_path / "saved"), image_column="pixel_values",
                             label_column="annotation", label_map={5: 3, 6: 255})
    assert set(dd) == {"train", "validation"}  # "val" is renamed
    assert info.id2label == {0: "bg", 1: "x", 2: "y", 3: "z"}
    assert dd["train"].column_names == ["image", "label", "label_map"]
    np.testing.assert_array_equal(_eval_labels(dd["validation"], info)[0], [[0, 3, 255], [1, 2, 0]])


def test_hub_needs_class_names_or_count(tmp_path):
    _imagefolder(tmp_path / "data")
    with pytest.raises(ValueError, match="id2label.*num_labels"):
        build_dataset("hub", path="imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ValueError, match="'flip'.*reduce_labels"):
        build_dataset("hub", path="imagefolder", data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"),
                      num_labels=3, label_map="flip")


# --------------------------------------------------------------------------- entry point


def test_unknown_dataset_and_option():
    with pytest.raises(ValueError, match="'kitti'.*camvid, cityscapes, voc, hub, synthetic-streets"):
        build_dataset("kitti")
    with pytest.raises(ValueError, match="unknown option.*n_trian.*num_train"):
        build_dataset("synthetic-streets", n_trian=3)
