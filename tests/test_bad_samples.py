"""Nothing lost, nothing silently wrong: broken files are named, `skip` keeps batches full and
deterministic, too many skips stop the run, and `scan_split` finds every bad row up front."""

import io
import logging
import struct
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from test_data_builders import _png

from fotf_hf.data import (
    BadSampleError,
    SeededTransformDataset,
    SegmentationTransform,
    TooManyBadSamplesError,
    build_dataset,
    create_dataloader,
    scan_split,
    scan_splits,
)

H, W = 24, 32
NAMES = ("a", "b", "c", "d", "e", "f")


def _camvid_rows(root, names=NAMES):
    """A CamVid (SegNet layout) folder: row i's label is the constant class i (void 11 around the border)."""
    for split in ("train", "val"):
        for i, n in enumerate(names):
            rgb = np.random.default_rng(i).integers(0, 256, (H, W, 3)).astype(np.uint8)
            label = np.full((H, W), i % 11, np.uint8)
            label[0, :] = 11
            _png(root / split / f"{split}_{n}.png", rgb)
            _png(root / f"{split}annot" / f"{split}_{n}.png", label)
    return root


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _train_tf(on_bad_sample="raise"):
    return SegmentationTransform(train=True, num_labels=11, crop_size=(16, 16), on_bad_sample=on_bad_sample)


# --------------------------------------------------------------------------- training / evaluation path


def test_truncated_png_with_raise_names_the_file_and_the_split(tmp_path):
    _truncate(_camvid_rows(tmp_path) / "train" / "train_c.png")
    _truncate(tmp_path / "val" / "val_b.png")
    dd, info = build_dataset("camvid", root=tmp_path)
    train = SeededTransformDataset(dd["train"], _train_tf("raise"), seed=0)
    assert train[1]["labels"].shape == (16, 16)
    # a BadSampleError from our transform, not PIL's bare "OSError: image file is truncated" from datasets
    with pytest.raises(BadSampleError, match=r"split 'train' row 2: cannot decode '.*train/train_c\.png': image file is truncated"):
        train[2]
    # the evaluation path (with_transform on build_dataset's split) decodes in the transform too
    evaluation = dd["validation"].with_transform(SegmentationTransform(train=False, num_labels=info.num_labels))
    assert evaluation[0]["labels"].shape == (H, W)
    with pytest.raises(BadSampleError, match=r"cannot decode '.*val/val_b\.png'"):
        evaluation[1]


def test_a_decoding_dataset_is_made_lazy_and_rows_without_a_path_are_named_by_index(tmp_path):
    good = _png(tmp_path / "good.png", np.zeros((H, W, 3), np.uint8)).read_bytes()
    label = _png(tmp_path / "label.png", np.zeros((H, W), np.uint8)).read_bytes()
    broken = good[: len(good) // 2]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})  # decoding columns
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}, {"bytes": broken, "path": None}],
         "label": [{"bytes": label, "path": None}] * 2},
        features=features, split=datasets.NamedSplit("train"),
    )
    seeded = SeededTransformDataset(ds, _train_tf("raise"))
    assert ds.features["image"].decode  # the caller's dataset is left as it was
    with pytest.raises(BadSampleError, match=r"split 'train' row 1: cannot decode an in-memory image"):
        seeded[1]


def test_skip_keeps_the_batch_full_warns_counts_and_is_deterministic(tmp_path, caplog):
    _truncate(_camvid_rows(tmp_path) / "train" / "train_c.png")
    dd, _ = build_dataset("camvid", root=tmp_path)
    train = SeededTransformDataset(dd["train"], _train_tf("skip"), seed=7, max_skip_fraction=0.2)
    loader = create_dataloader(train, batch_size=6, train=False, seed=7)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert len(batches) == 1 and batches[0]["pixel_values"].shape == (6, 3, 16, 16)
    assert batches[0]["labels"].shape == (6, 16, 16)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train/train_c.png" in m and "split 'train' row 2" in m for m in warnings), warnings
    assert train.num_skipped == 1 and train.bad_indices == [2]
    # row 2 is replaced by the next row (row 3, constant class 3 besides void/padding)
    classes = set(batches[0]["labels"][2].unique().tolist()) - {255}
    assert classes == {3}
    # the same index gives the same tensors, in this object and in a fresh one (a resumed run)
    first, second = train[2], train[2]
    fresh = SeededTransformDataset(dd["train"], _train_tf("skip"), seed=7, max_skip_fraction=0.2)[2]
    for out in (second, fresh):
        assert torch.equal(first["pixel_values"], out["pixel_values"]) and torch.equal(first["labels"], out["labels"])
    torch.testing.assert_close(batches[0]["pixel_values"][2], first["pixel_values"], rtol=0, atol=0)
    assert train.num_skipped == 3  # each draw of the bad row counts; it is not decoded again


def test_skip_counter_reaches_the_main_process_from_a_worker(tmp_path):
    _truncate(_camvid_rows(tmp_path) / "train" / "train_e.png")
    dd, _ = build_dataset("camvid", root=tmp_path)
    main = SeededTransformDataset(dd["train"], _train_tf("skip"), seed=1, max_skip_fraction=0.2)
    worker = SeededTransformDataset(dd["train"], _train_tf("skip"), seed=1, max_skip_fraction=0.2)
    a = next(iter(create_dataloader(main, batch_size=6, train=False, num_workers=0)))
    b = next(iter(create_dataloader(worker, batch_size=6, train=False, num_workers=1)))
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    assert main.num_skipped == worker.num_skipped == 1 and worker.bad_indices == [4]


def test_too_many_skips_stop_the_run_with_a_message(tmp_path):
    root = _camvid_rows(tmp_path)
    _truncate(root / "train" / "train_b.png")
    _truncate(root / "train" / "train_d.png")
    dd, _ = build_dataset("camvid", root=tmp_path)
    train = SeededTransformDataset(dd["train"], _train_tf("skip"), max_skip_fraction=0.2)  # 1 of 6 allowed
    with pytest.raises(TooManyBadSamplesError, match=r"(?s)2 bad rows of 6 in split 'train'.*max_skip_fraction=0\.2.*train_b\.png.*train_d\.png"):
        list(create_dataloader(train, batch_size=3, train=False))
    # the default (5 %) allows none of 6 rows
    strict = SeededTransformDataset(dd["train"], _train_tf("skip"))
    assert strict.max_skip_fraction == 0.05
    with pytest.raises(TooManyBadSamplesError, match=r"1 bad rows of 6"):
        strict[1]
    with pytest.raises(ValueError, match="max_skip_fraction"):
        SeededTransformDataset(dd["train"], _train_tf("skip"), max_skip_fraction=1.5)


# --------------------------------------------------------------------------- scan_split


def test_scan_of_a_clean_split_passes(tmp_path):
    dd, info = build_dataset("camvid", root=_camvid_rows(tmp_path))
    assert scan_split(dd["validation"], info) == len(NAMES)
    assert scan_split(dd["validation"], info, full=True) == len(NAMES)
    assert scan_splits(dd, info, ["validation", "train"]) == {"validation": 6, "train": 6}


def test_scan_finds_each_kind_of_bad_row_and_names_the_files(tmp_path):
    root = _camvid_rows(tmp_path)
    _truncate(root / "val" / "val_b.png")
    out_of_range = np.full((H, W), 3, np.uint8)
    out_of_range[5, 5] = 12  # CamVid: 0..10 classes, 11 void -> 255; 12 is nothing
    _png(root / "valannot" / "val_d.png", out_of_range)
    _png(root / "val" / "val_f.png", np.zeros((H, W + 1, 3), np.uint8))  # image one pixel wider than its label
    dd, info = build_dataset("camvid", root=tmp_path)
    for full in (False, True):
        with pytest.raises(BadSampleError) as err:
            scan_split(dd["validation"], info, full=full)
        message = str(err.value)
        assert "3 of 6 rows of split 'validation' of 'camvid' are unusable" in message
        assert [line.split(":")[0].strip() for line in message.splitlines() if line.startswith("  row")] == [
            "row 1", "row 3", "row 5"]
        assert "val/val_b.png" in message and "truncated" in message.lower()
        assert "valannot/val_d.png" in message and "raw [12]" in message
        assert "val/val_f.png' is 24x33" in message and "valannot/val_f.png' is 24x32" in message
    with pytest.raises(BadSampleError, match="rows of split 'validation'") as err:
        scan_splits(dd, info, ["train", "validation"])  # train is clean; validation's rows are listed
    assert "val_b.png" in str(err.value)
    with pytest.raises(KeyError, match="'test'"):
        scan_splits(dd, info, ["test"])


def test_scan_lists_at_most_max_listed_rows_and_counts_all(tmp_path):
    root = _camvid_rows(tmp_path)
    for n in NAMES[:4]:
        _truncate(root / "val" / f"val_{n}.png")
    dd, info = build_dataset("camvid", root=tmp_path)
    with pytest.raises(BadSampleError, match=r"(?s)4 of 6 rows.*row 1.*and 2 more") as err:
        scan_split(dd["validation"], info, max_listed=2)
    assert "row 2" not in str(err.value)


def test_scan_of_an_empty_split_and_of_in_memory_rows(tmp_path):
    dd, info = build_dataset("camvid", root=_camvid_rows(tmp_path))
    with pytest.raises(BadSampleError, match="split 'validation' of 'camvid' is empty"):
        scan_split(dd["validation"].select([]), info)
    # bytes without a path: the row index names the sample; a transform on the split is ignored
    good = _png(tmp_path / "x.png", np.zeros((H, W, 3), np.uint8)).read_bytes()
    label = np.zeros((H, W), np.uint8)
    label[0, 0] = 40
    bad_label = _png(tmp_path / "y.png", label).read_bytes()
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": good, "path": None}] * 3, "label": [{"bytes": bad_label, "path": None}] * 3},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}),
    ).with_transform(SegmentationTransform(train=False, num_labels=11))
    with pytest.raises(BadSampleError, match=r"(?s)3 of 3 rows of split 'memory'.*row 0: .*in-memory.*raw \[40\]"):
        scan_split(ds, info, split_name="memory")


def _png_with_damaged_pixels(path):
    """A PNG whose chunk structure and CRCs are intact but whose compressed pixel data is not."""
    data = bytearray(_png(path, np.random.default_rng(0).integers(0, 256, (H, W, 3)).astype(np.uint8)).read_bytes())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start:start + 4])[0]
    body = start + 8
    data[body + 10:body + length - 10] = bytes(length - 20)  # zero the middle of the deflate stream
    crc = zlib.crc32(data[start + 4:body + length]) & 0xFFFFFFFF
    data[body + length:body + length + 4] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_full_scan_also_decodes_the_pixels(tmp_path):
    root = _camvid_rows(tmp_path)
    _png_with_damaged_pixels(root / "val" / "val_c.png")
    dd, info = build_dataset("camvid", root=tmp_path)
    assert scan_split(dd["validation"], info) == 6  # the quick scan reads headers and chunk checksums only
    with pytest.raises(BadSampleError, match=r"1 of 6 rows .*\(full decode\)(?s:.*)row 2: image: cannot decode '.*val_c\.png'"):
        scan_split(dd["validation"], info, full=True)
    with pytest.raises(BadSampleError, match=r"val_c\.png"):  # and training would have named it too
        SeededTransformDataset(dd["validation"], _train_tf("raise"))[2]


def test_quick_scan_finds_a_truncated_jpeg_but_accepts_trailing_padding(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (H, W, 3)).astype(np.uint8)).save(buffer, "JPEG", quality=95)
    jpeg = buffer.getvalue()
    label = _png(tmp_path / "l.png", np.zeros((H, W), np.uint8))
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "padded.jpg").write_bytes(jpeg + b"\0" * 100)
    (tmp_path / "trailer.jpg").write_bytes(jpeg + b"extra data some writers append")  # PIL reads it fine
    ds = datasets.Dataset.from_dict(
        {"image": [str(tmp_path / n) for n in ("padded.jpg", "cut.jpg", "trailer.jpg")], "label": [str(label)] * 3},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Image()}),
    )
    _, info = build_dataset("synthetic-streets", num_train=1, num_val=0)
    with pytest.raises(BadSampleError, match=r"1 of 3 rows .*\n  row 1: image: cannot decode '.*cut\.jpg'") as err:
        scan_split(ds, info, split_name="jpegs")
    assert "padded" not in str(err.value) and "trailer" not in str(err.value)
