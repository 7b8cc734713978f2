"""SegmentationTransform, normalisation and create_dataloader, checked against hand-computed values."""

import logging

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from fotf_hf.data import (
    BadSampleError,
    SegmentationTransform,
    create_dataloader,
    defer_decoding,
    denormalize,
    make_label_map,
    normalize_image,
)


def _png(path, array, mode=None):
    Image.fromarray(np.asarray(array), mode=mode).save(path)
    return str(path)


def _sample(image, label, label_map=None):
    batch = {"image": [Image.fromarray(np.asarray(image, np.uint8))], "label": [Image.fromarray(np.asarray(label, np.uint8))]}
    if label_map is not None:
        batch["label_map"] = [label_map]
    return batch


def _fixed(train=True, **kw):
    """A transform with scale 1 and no flip unless overridden."""
    args = dict(train=train, num_labels=10, scale_range=(1.0, 1.0))
    if train:
        args["flip_prob"] = 0.0
    args.update(kw)
    return SegmentationTransform(**args)


# --------------------------------------------------------------------------- normalisation


def test_imagenet_normalization_by_hand():
    rgb = np.array([[[10, 20, 30], [255, 0, 128]]], dtype=np.uint8)
    out = normalize_image(rgb, "imagenet")
    assert out.shape == (3, 1, 2) and out.dtype == np.float32
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for x, pixel in enumerate(rgb[0]):
        for c in range(3):
            assert out[c, 0, x] == pytest.approx((pixel[c] / 255.0 - mean[c]) / std[c], abs=1e-5)


def test_cirkd_bgr_normalization_by_hand():
    rgb = np.array([[[10, 20, 30]]], dtype=np.uint8)
    out = normalize_image(rgb, "cirkd_bgr")
    # channel 0 is blue: 30 - 104.00698793, then green, then red
    assert out[:, 0, 0] == pytest.approx([30 - 104.00698793, 20 - 116.66876762, 10 - 122.67891434], abs=1e-4)


@pytest.mark.parametrize("normalization", ["imagenet", "cirkd_bgr"])
def test_denormalize_round_trip(normalization):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    back = denormalize(torch.from_numpy(normalize_image(rgb, normalization)), normalization)
    np.testing.assert_array_equal(back, rgb)
    batch = torch.from_numpy(normalize_image(rgb, normalization))[None].repeat(2, 1, 1, 1)
    assert denormalize(batch, normalization).shape == (2, 5, 7, 3)


def test_unknown_normalization_lists_choices():
    with pytest.raises(ValueError, match="'hsv'.*imagenet, cirkd_bgr"):
        SegmentationTransform(train=False, num_labels=3, normalization="hsv")
    with pytest.raises(ValueError, match="imagenet, cirkd_bgr"):
        normalize_image(np.zeros((2, 2, 3), np.uint8), "hsv")


# --------------------------------------------------------------------------- train augmentation


@pytest.mark.parametrize("normalization", ["imagenet", "cirkd_bgr"])
def test_pad_with_zero_image_after_normalisation_and_255_label(normalization):
    image = np.full((4, 5, 3), 200, np.uint8)
    label = np.full((4, 5), 3, np.uint8)
    out = _fixed(crop_size=(8, 9), normalization=normalization)(_sample(image, label))
    pv, lab = out["pixel_values"][0], out["labels"][0]
    assert pv.shape == (3, 8, 9) and lab.shape == (8, 9) and lab.dtype == torch.int64
    expected_valid = torch.from_numpy(normalize_image(image, normalization))
    torch.testing.assert_close(pv[:, :4, :5], expected_valid)
    assert torch.all(pv[:, 4:, :] == 0) and torch.all(pv[:, :, 5:] == 0)
    assert torch.all(lab[:4, :5] == 3)
    assert torch.all(lab[4:, :] == 255) and torch.all(lab[:, 5:] == 255)


def test_padding_moves_left_when_flipped():
    image = np.full((4, 5, 3), 200, np.uint8)
    label = np.full((4, 5), 3, np.uint8)
    out = _fixed(crop_size=(4, 9), flip_prob=1.0)(_sample(image, label))
    lab = out["labels"][0]
    assert torch.all(lab[:, :4] == 255) and torch.all(lab[:, 4:] == 3)
    assert torch.all(out["pixel_values"][0][:, :, :4] == 0)


def _coded_sample(h=24, w=32, seed=0):
    """Labels 0..9 in random blocks; the red channel is 20 * label, so image and label can be compared."""
    rng = np.random.default_rng(seed)
    label = np.kron(rng.integers(0, 10, (h // 4, w // 4)), np.ones((4, 4), np.int64)).astype(np.uint8)
    image = np.stack([label * 20, rng.integers(0, 256, (h, w)), np.full((h, w), 7)], -1).astype(np.uint8)
    return image, label


@pytest.mark.parametrize("seed", range(6))
def test_crop_and_flip_keep_image_and_label_aligned(seed):
    image, label = _coded_sample(seed=seed)
    tf = _fixed(crop_size=(16, 20), flip_prob=0.5)
    out = tf(_sample(image, label), generator=torch.Generator().manual_seed(seed))
    rgb = denormalize(out["pixel_values"][0], "imagenet")
    lab = out["labels"][0].numpy()
    np.testing.assert_array_equal(rgb[..., 0] // 20, lab)
    # the crop is a window of the (possibly flipped) source
    windows = {
        (y, x, flip)
        for y in range(24 - 16 + 1) for x in range(32 - 20 + 1) for flip in (False, True)
        if np.array_equal((label[:, ::-1] if flip else label)[y:y + 16, x:x + 20], lab)
    }
    assert windows


def test_flip_mirrors_both():
    image, label = _coded_sample()
    no_flip = _fixed(crop_size=(24, 32), flip_prob=0.0)(_sample(image, label))
    flip = _fixed(crop_size=(24, 32), flip_prob=1.0)(_sample(image, label))
    np.testing.assert_array_equal(flip["labels"][0].numpy(), label[:, ::-1])
    torch.testing.assert_close(flip["pixel_values"][0], no_flip["pixel_values"][0].flip(-1))


def test_crop_size_for_large_and_small_inputs():
    tf = SegmentationTransform(train=True, num_labels=10, crop_size=(16, 12))
    for h, w in [(40, 60), (5, 7), (16, 12)]:
        image, label = np.zeros((h, w, 3), np.uint8), np.zeros((h, w), np.uint8)
        for s in range(5):
            out = tf(_sample(image, label), generator=torch.Generator().manual_seed(s))
            assert out["pixel_values"][0].shape == (3, 16, 12) and out["labels"][0].shape == (16, 12)


def test_scales_follow_the_cirkd_grid():
    image, label = np.zeros((20, 30, 3), np.uint8), np.zeros((20, 30), np.uint8)
    tf = SegmentationTransform(train=True, num_labels=2, crop_size=(64, 64), flip_prob=0.0)
    assert tf.scales.tolist() == pytest.approx([0.5 + 0.1 * k for k in range(16)])
    seen = set()
    for s in range(60):
        lab = tf(_sample(image, label), generator=torch.Generator().manual_seed(s))["labels"][0]
        rows, cols = int((lab[:, 0] == 0).sum()), int((lab[0] == 0).sum())
        # the labelled region is the resized source, top-left, round(20 f) x round(30 f)
        assert torch.all(lab[:rows, :cols] == 0) and torch.all(lab[rows:] == 255) and torch.all(lab[:, cols:] == 255)
        f = cols / 30
        assert any(abs(f - g) < 1e-9 and rows == round(20 * g) for g in np.round(np.arange(0.5, 2.01, 0.1), 6))
        seen.add(round(f, 6))
    assert min(seen) >= 0.5 and max(seen) <= 2.0 and len(seen) >= 8


def test_continuous_scale_range():
    image, label = np.zeros((50, 50, 3), np.uint8), np.zeros((50, 50), np.uint8)
    tf = SegmentationTransform(train=True, num_labels=2, crop_size=(128, 128), scale_range=(0.8, 1.2), scale_step=None)
    sizes = set()
    for s in range(30):
        lab = tf(_sample(image, label), generator=torch.Generator().manual_seed(s))["labels"][0]
        sizes.add(int((lab[0] == 0).sum()))
    assert min(sizes) >= 40 and max(sizes) <= 60 and len(sizes) >= 8


def test_bilinear_image_nearest_label_when_scaling():
    label = np.zeros((8, 8), np.uint8)
    label[:, 4:] = 5
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = 250
    tf = SegmentationTransform(train=True, num_labels=6, crop_size=(16, 16), scale_range=(2.0, 2.0), flip_prob=0.0)
    out = tf(_sample(image, label))
    lab = out["labels"][0].numpy()
    assert set(np.unique(lab)) == {0, 5}  # nearest: no in-between class ids
    np.testing.assert_array_equal(lab[:, :8], 0)
    np.testing.assert_array_equal(lab[:, 8:], 5)
    red = denormalize(out["pixel_values"][0])[0, :, 0]
    assert 0 < red[7] < 250 or 0 < red[8] < 250  # bilinear blends across the edge


def test_same_generator_seed_same_output_different_seed_differs():
    image, label = _coded_sample(48, 64)
    tf = SegmentationTransform(train=True, num_labels=10, crop_size=(20, 20))
    a = tf(_sample(image, label), generator=torch.Generator().manual_seed(3))
    b = tf(_sample(image, label), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    outs = [tf(_sample(image, label), generator=torch.Generator().manual_seed(s))["labels"][0] for s in range(5)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    torch.manual_seed(11)
    c = tf(_sample(image, label))
    torch.manual_seed(11)
    d = tf(_sample(image, label))
    torch.testing.assert_close(c, d)


def test_training_transform_needs_a_crop_size():
    with pytest.raises(ValueError, match="crop_size"):
        SegmentationTransform(train=True, num_labels=3)
    with pytest.raises(ValueError, match="scale_range"):
        SegmentationTransform(train=True, num_labels=3, crop_size=(8, 8), scale_range=(2.0, 1.0))


# --------------------------------------------------------------------------- evaluation


def test_eval_is_deterministic_full_resolution_and_maps_labels():
    image, label = _coded_sample()
    label[0, 0] = 11
    spec = make_label_map({11: 255, 3: 4})
    out = SegmentationTransform(train=False, num_labels=10)(_sample(image, label, spec))
    expected = label.astype(np.int64)
    expected[label == 3] = 4
    expected[label == 11] = 255
    np.testing.assert_array_equal(out["labels"][0].numpy(), expected)
    np.testing.assert_array_equal(denormalize(out["pixel_values"][0]), image)


def test_eval_resize_shorter_side_and_fixed_size():
    image, label = _coded_sample(24, 32)
    out = SegmentationTransform(train=False, num_labels=10, resize=12)(_sample(image, label))
    assert out["pixel_values"][0].shape == (3, 12, 16)
    np.testing.assert_array_equal(out["labels"][0].numpy(), label[::2, ::2])  # 4x4 blocks -> nearest is exact
    out = SegmentationTransform(train=False, num_labels=10, resize=(6, 10))(_sample(image, label))
    assert out["pixel_values"][0].shape == (3, 6, 10) and out["labels"][0].shape == (6, 10)
    with pytest.raises(ValueError, match="resize"):
        SegmentationTransform(train=False, num_labels=10, resize=(0, 3))


def test_reduce_labels_and_palette_label_images():
    label = np.array([[0, 1, 2], [3, 255, 1]], np.uint8)
    image = np.zeros((2, 3, 3), np.uint8)
    reduce = make_label_map({0: 255, 255: 255}, offset=-1)
    out = SegmentationTransform(train=False, num_labels=3)(_sample(image, label, reduce))
    np.testing.assert_array_equal(out["labels"][0].numpy(), [[255, 0, 1], [2, 255, 0]])
    palette_label = Image.fromarray(np.array([[0, 1, 255]], np.uint8), mode="P")
    palette_label.putpalette([0, 0, 0, 128, 0, 0] + [224, 224, 192] * 254)
    batch = {"image": [Image.new("RGB", (3, 1))], "label": [palette_label]}
    np.testing.assert_array_equal(SegmentationTransform(train=False, num_labels=2)(batch)["labels"][0].numpy(),
                                  [[0, 1, 255]])


# --------------------------------------------------------------------------- bad samples


def test_size_mismatch_names_the_files(tmp_path):
    img = _png(tmp_path / "a.png", np.zeros((4, 5, 3), np.uint8))
    lab = _png(tmp_path / "a_label.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(BadSampleError, match=r"a\.png.*4x5.*a_label\.png.*4x6"):
        SegmentationTransform(train=False, num_labels=3)({"image": [Image.open(img)], "label": [Image.open(lab)]})


def test_out_of_range_labels_name_file_and_values(tmp_path):
    img = _png(tmp_path / "b.png", np.zeros((2, 3, 3), np.uint8))
    lab = _png(tmp_path / "b_label.png", np.array([[0, 1, 7], [9, 255, 2]], np.uint8))
    batch = {"image": [Image.open(img)], "label": [Image.open(lab)]}
    with pytest.raises(BadSampleError, match=r"b_label\.png.*\[0, 3\).*raw \[7, 9\]"):
        SegmentationTransform(train=False, num_labels=3)(batch)
    # after the dataset's map the same file is valid
    spec = make_label_map({7: 255, 9: 0})
    out = SegmentationTransform(train=False, num_labels=3)({**batch, "label_map": [spec]})
    np.testing.assert_array_equal(out["labels"][0].numpy(), [[0, 1, 255], [0, 255, 2]])


def test_rgb_label_is_rejected():
    batch = {"image": [Image.new("RGB", (3, 2))], "label": [Image.new("RGB", (3, 2))]}
    with pytest.raises(BadSampleError, match="mode 'RGB'"):
        SegmentationTransform(train=False, num_labels=3)(batch)


def _folder_dataset(tmp_path, n=4, corrupt=()):
    images, labels = [], []
    for i in range(n):
        images.append(_png(tmp_path / f"img{i}.png", np.full((8, 8, 3), 10 * i, np.uint8)))
        labels.append(_png(tmp_path / f"lab{i}.png", np.full((8, 8), i % 3, np.uint8)))
    for i in corrupt:
        (tmp_path / f"img{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def test_corrupt_image_names_the_file(tmp_path):
    ds = _folder_dataset(tmp_path, corrupt=[2])
    tf = SegmentationTransform(train=True, num_labels=3, crop_size=(8, 8))
    with pytest.raises(BadSampleError, match=r"cannot decode '.*img2\.png'"):
        tf.apply(ds)[2]
    assert tf.apply(ds)[1]["labels"].shape == (8, 8)
    assert ds.features["image"].decode  # apply() does not change the caller's dataset


def test_skip_bad_samples_with_a_warning(tmp_path, caplog):
    ds = _folder_dataset(tmp_path, n=4, corrupt=[1])
    tf = SegmentationTransform(train=True, num_labels=3, crop_size=(8, 8), on_bad_sample="skip")
    loader = create_dataloader(tf.apply(ds), batch_size=4, train=False)
    with caplog.at_level(logging.WARNING, logger="fotf_hf.data.transforms"):
        batches = list(loader)
    assert len(batches) == 1 and batches[0]["labels"].shape == (3, 8, 8)
    assert sorted(batches[0]["labels"][:, 0, 0].tolist()) == [0, 0, 2]  # samples 0, 2, 3 (labels i % 3)
    assert any("img1.png" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="'ignore'.*raise, skip"):
        SegmentationTransform(train=True, num_labels=3, crop_size=(8, 8), on_bad_sample="ignore")


def test_defer_decoding_on_dataset_dict(tmp_path):
    dd = datasets.DatasetDict({"train": _folder_dataset(tmp_path, n=2)})
    deferred = defer_decoding(dd)
    row = deferred["train"][0]
    assert set(row["image"]) == {"bytes", "path"} and row["image"]["path"].endswith("img0.png")


# --------------------------------------------------------------------------- dataloader


def _augmented(tmp_path, n=10):
    images, labels = [], []
    rng = np.random.default_rng(0)
    for i in range(n):
        images.append(_png(tmp_path / f"x{i}.png", rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)))
        labels.append(_png(tmp_path / f"y{i}.png", np.full((20, 24), i % 5, np.uint8)))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
    return ds.with_transform(SegmentationTransform(train=True, num_labels=5, crop_size=(16, 16)))


def _all_batches(loader):
    return [(b["pixel_values"].clone(), b["labels"].clone()) for b in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_seeded_loader_reproduces_batches(tmp_path, num_workers):
    ds = _augmented(tmp_path)

    def run(seed):
        torch.manual_seed(123)  # only the main-process path (num_workers=0) draws from the global generator
        return _all_batches(create_dataloader(ds, batch_size=4, train=True, num_workers=num_workers, seed=seed))

    first, again, other = run(0), run(0), run(1)
    assert len(first) == 2  # 10 samples, batch 4, drop_last for training
    for (x1, y1), (x2, y2) in zip(first, again):
        torch.testing.assert_close(x1, x2)
        torch.testing.assert_close(y1, y2)
    assert any(not torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, other))


def test_eval_loader_keeps_order_and_last_batch(tmp_path):
    ds = _augmented(tmp_path)
    ev = ds.with_transform(SegmentationTransform(train=False, num_labels=5))
    loader = create_dataloader(ev, batch_size=4, train=False)
    assert not loader.pin_memory or torch.cuda.is_available()
    batches = list(loader)
    assert [b["labels"].shape[0] for b in batches] == [4, 4, 2]
    assert torch.cat([b["labels"][:, 0, 0] for b in batches]).tolist() == [i % 5 for i in range(10)]
    assert batches[0]["pixel_values"].dtype == torch.float32 and batches[0]["labels"].dtype == torch.int64


def test_loader_argument_errors(tmp_path):
    ds = _augmented(tmp_path, n=2)
    with pytest.raises(ValueError, match="batch_size"):
        create_dataloader(ds, batch_size=0, train=True)
    with pytest.raises(ValueError, match="num_workers"):
        create_dataloader(ds, batch_size=1, train=True, num_workers=-1)
