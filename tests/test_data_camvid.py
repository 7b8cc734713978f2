"""The real CamVid files (skipped when absent): pairing, class histogram, a full pass through the loader."""

from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from fotf_hf.data import SegmentationTransform, build_dataset, create_dataloader

pytestmark = pytest.mark.camvid


def test_camvid_splits_and_pairing(camvid_root):
    dd, info = build_dataset("camvid", root=camvid_root)
    assert {k: len(v) for k, v in dd.items()} == {"train": 367, "validation": 101, "test": 233}
    for split, folder in (("train", "train"), ("validation", "val"), ("test", "test")):
        rows = dd[split].cast_column("image", datasets.Image(decode=False)).cast_column(
            "label", datasets.Image(decode=False)
        )
        image_paths = [Path(p["path"]) for p in rows["image"]]
        label_paths = [Path(p["path"]) for p in rows["label"]]
        assert [p.name for p in image_paths] == [p.name for p in label_paths]
        assert {p.parent.name for p in image_paths} == {folder}
        assert {p.parent.name for p in label_paths} == {folder + "annot"}
        assert all(p.is_file() for p in image_paths + label_paths)


def test_camvid_val_full_pass_and_class_histogram(camvid_root):
    # Independent reference: every PNG in valannot/, read with PIL, counted with NumPy; 11 = void.
    raw = np.zeros(256, np.int64)
    files = sorted((camvid_root / "valannot").glob("*.png"))
    assert len(files) == 101
    for path in files:
        raw += np.bincount(np.asarray(Image.open(path)).ravel(), minlength=256)
    assert raw[12:].sum() == 0
    expected = np.concatenate([raw[:11], [raw[11]]])

    dd, info = build_dataset("camvid", root=camvid_root)
    tf = SegmentationTransform(train=False, num_labels=info.num_labels)
    loader = create_dataloader(dd["validation"].with_transform(tf), batch_size=8, train=False, num_workers=2)
    seen, counts = 0, np.zeros(12, np.int64)
    for batch in loader:
        assert batch["pixel_values"].shape[1:] == (3, 360, 480) and batch["labels"].shape[1:] == (360, 480)
        labels = batch["labels"].numpy()
        seen += labels.shape[0]
        counts[:11] += np.bincount(labels[labels != 255], minlength=11)
        counts[11] += int((labels == 255).sum())
    assert seen == 101
    np.testing.assert_array_equal(counts, expected)


def test_camvid_train_crops(camvid_root):
    dd, info = build_dataset("camvid", root=camvid_root)
    tf = SegmentationTransform(train=True, crop_size=(360, 360), num_labels=info.num_labels, normalization="cirkd_bgr")
    loader = create_dataloader(dd["train"].with_transform(tf), batch_size=4, train=True, seed=0)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 3, 360, 360) and batch["labels"].shape == (4, 360, 360)
    values = set(batch["labels"].unique().tolist())
    assert values <= set(range(11)) | {255} and len(values) > 3
