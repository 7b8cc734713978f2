"""synthetic-streets: determinism, sizes, class coverage, ignore pixels, and that colour alone is not enough."""

import numpy as np
import pytest

from fotf_hf.data import SYNTHETIC_CLASSES, SegmentationTransform, build_dataset, decode_image
from fotf_hf.data.synthetic import generate_split


def _arrays(split):
    # build_dataset's columns are lazy ({"path", "bytes"} rows): decode them here
    return ([np.asarray(decode_image(im)) for im in split["image"]],
            [np.asarray(decode_image(lab)) for lab in split["label"]])


def test_same_seed_identical_different_seed_different():
    a, info = build_dataset("synthetic-streets", num_train=6, num_val=3, seed=0)
    b, _ = build_dataset("synthetic-streets", num_train=6, num_val=3, seed=0)
    c, _ = build_dataset("synthetic-streets", num_train=6, num_val=3, seed=1)
    for split in ("train", "validation"):
        (ia, la), (ib, lb), (ic, lc) = _arrays(a[split]), _arrays(b[split]), _arrays(c[split])
        for x, y in zip(ia + la, ib + lb):
            np.testing.assert_array_equal(x, y)
        assert all(not np.array_equal(x, z) for x, z in zip(ia, ic))
    # train and validation are different scenes
    assert not np.array_equal(_arrays(a["train"])[0][0], _arrays(a["validation"])[0][0])


def test_a_sample_does_not_depend_on_the_split_size():
    small, _ = build_dataset("synthetic-streets", num_train=2, num_val=1)
    large, _ = build_dataset("synthetic-streets", num_train=5, num_val=3)
    np.testing.assert_array_equal(np.asarray(decode_image(small["validation"][0]["label"])),
                                  np.asarray(decode_image(large["validation"][0]["label"])))
    np.testing.assert_array_equal(np.asarray(decode_image(small["train"][1]["image"])),
                                  np.asarray(decode_image(large["train"][1]["image"])))


def test_sizes_info_and_splits():
    dd, info = build_dataset("synthetic-streets", num_train=3, num_val=2, num_test=1, image_size=(48, 64))
    assert {k: len(v) for k, v in dd.items()} == {"train": 3, "validation": 2, "test": 1}
    row = {key: decode_image(value) for key, value in dd["train"][0].items()}
    assert row["image"].mode == "RGB" and row["image"].size == (64, 48)
    assert row["label"].mode == "L" and row["label"].size == (64, 48)
    assert info.num_labels == 8 and tuple(info.id2label.values()) == SYNTHETIC_CLASSES
    assert info.palette.shape == (8, 3) and len({tuple(c) for c in info.palette}) == 8
    out = dd["train"].with_transform(SegmentationTransform(train=False, num_labels=8))[0]
    assert out["pixel_values"].shape == (3, 48, 64)


def test_class_coverage_ignore_and_thin_structures():
    _, labels = generate_split("train", 64, (96, 128), seed=0)
    labels = np.stack(labels)
    values = set(np.unique(labels).tolist())
    assert values == set(range(8)) | {255}
    per_image = np.stack([(labels == k).any(axis=(1, 2)) for k in range(8)], 1)
    assert per_image.mean(0).min() > 0.5  # every class in most images
    ignore_share = (labels == 255).mean()
    assert 0.002 < ignore_share < 0.1 and (labels == 255).any(axis=(1, 2)).mean() > 0.2
    poles = labels == 6
    widths = poles.sum(axis=2)[poles.any(axis=2)]  # pole pixels per row: mostly 1-3 px wide
    assert np.median(widths) <= 3
    # boundary label noise: some pixels of a class appear isolated inside another class
    inner = labels[:, 1:-1, 1:-1]
    isolated = (inner != labels[:, :-2, 1:-1]) & (inner != labels[:, 2:, 1:-1]) & (inner != labels[:, 1:-1, :-2]) & (
        inner != labels[:, 1:-1, 2:])
    assert isolated.mean() > 1e-4


def test_colour_alone_does_not_separate_the_classes():
    """The best per-pixel colour classifier (a Bayes lookup over 16^3 colour bins, fitted on train)
    stays far from solving the task: texture and context are needed."""
    images, labels = generate_split("train", 64, (96, 128), seed=0)
    v_images, v_labels = generate_split("validation", 16, (96, 128), seed=0)

    def flat(ims, labs):
        x, y = np.concatenate([i.reshape(-1, 3) for i in ims]), np.concatenate([l.ravel() for l in labs])
        keep = y != 255
        return (x[keep] // 16).astype(np.int64) @ np.array([256, 16, 1]), y[keep]

    bins, y = flat(images, labels)
    table = np.zeros((4096, 8))
    np.add.at(table, (bins, y), 1)
    v_bins, v_y = flat(v_images, v_labels)
    pred = table[v_bins].argmax(1)
    ious = [((pred == k) & (v_y == k)).sum() / max(((pred == k) | (v_y == k)).sum(), 1) for k in range(8)]
    assert np.mean(ious) < 0.4, ious


def test_cache_dir_round_trip(tmp_path):
    memory, _ = build_dataset("synthetic-streets", num_train=2, num_val=1, image_size=(40, 48), seed=3)
    cached, _ = build_dataset("synthetic-streets", root=str(tmp_path), num_train=2, num_val=1, image_size=(40, 48), seed=3)
    files = sorted(p.name for p in tmp_path.rglob("*.png"))
    assert len(files) == 6
    again, _ = build_dataset("synthetic-streets", root=str(tmp_path), num_train=2, num_val=1, image_size=(40, 48), seed=3)
    for dd in (cached, again):
        for split in ("train", "validation"):
            for x, y in zip(sum(_arrays(memory[split]), []), sum(_arrays(dd[split]), [])):
                np.testing.assert_array_equal(x, y)


def test_bad_options():
    with pytest.raises(ValueError, match="image_size"):
        build_dataset("synthetic-streets", image_size=(16, 16))
    with pytest.raises(ValueError, match="num_train must be >= 0"):
        build_dataset("synthetic-streets", num_train=-1)
    with pytest.raises(ValueError, match="not both"):
        build_dataset("synthetic-streets", root="a", cache_dir="b")
