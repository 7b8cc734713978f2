"""Image processors of saved students and `pipeline("image-segmentation")` on them.

The expectations come from the evaluation path (`SegmentationTransform` for the input,
`fotf_hf.evaluation.predict` for the prediction), never from the processor itself.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor

import fotf_hf  # noqa: F401  (registers the Auto classes)
from fotf_hf.data import SegmentationTransform, build_dataset
from fotf_hf.data.transforms import decode_image
from fotf_hf.evaluation import predict, load_student
from fotf_hf.models import FotfImageProcessor, create_model, write_inference_files

TINY = {"backbone_base_width": 8, "head_channels": 16}
TINY_SEGFORMER = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64], "num_attention_heads": [1, 1, 2, 4],
                  "decoder_hidden_size": 32}
C = 5


def save_tiny(folder, arch, normalization="imagenet", size=None, num_labels=C):
    """A tiny random student saved with its inference files, as the release step does."""
    if arch == "segformer":
        model = create_model("segformer", "mit-b0", num_labels=num_labels, **TINY_SEGFORMER)
    else:
        model = create_model(arch, "resnet18", num_labels=num_labels, image_normalization=normalization, **TINY)
    model.save_pretrained(folder)
    write_inference_files(folder, normalization=normalization, size=size)
    return folder


def random_image(height=50, width=70, seed=0):
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def transform_pixels(image, normalization, resize=None):
    """What the evaluation feeds the model: `SegmentationTransform(train=False)` of the image."""
    label = Image.fromarray(np.zeros((image.height, image.width), np.uint8))
    transform = SegmentationTransform(train=False, num_labels=C, normalization=normalization, resize=resize)
    return transform({"image": [image], "label": [label]})["pixel_values"][0]


@pytest.mark.parametrize("normalization", ["imagenet", "cirkd_bgr"])
@pytest.mark.parametrize("size", [None, (40, 56)])
def test_processor_reproduces_the_evaluation_input(tmp_path, normalization, size):
    folder = save_tiny(tmp_path / "m", "deeplabv3", normalization, size)
    processor = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(processor, FotfImageProcessor)
    image = random_image()
    got = processor(images=image, return_tensors="pt")["pixel_values"]
    expected = transform_pixels(image, normalization, resize=size)
    assert got.shape == (1,) + tuple(expected.shape)
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-5)


def test_segformer_gets_transformers_own_processor_with_the_imagenet_normalisation(tmp_path):
    folder = save_tiny(tmp_path / "seg", "segformer")
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor).__module__.startswith("transformers.models.segformer")
    image = random_image()
    got = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got[0], transform_pixels(image, "imagenet"), rtol=0, atol=1e-5)
    assert not (folder / "image_processing_fotf.py").exists()
    assert "auto_map" not in json.loads((folder / "config.json").read_text())


def test_post_processing_upsamples_as_the_evaluation(tmp_path):
    processor = FotfImageProcessor.for_normalization("imagenet")
    logits = torch.randn(2, C, 6, 9)
    maps = processor.post_process_semantic_segmentation(
        type("Out", (), {"logits": logits})(), target_sizes=[(48, 72), (45, 70)]
    )
    for b, size in enumerate([(48, 72), (45, 70)]):
        expected = F.interpolate(logits[b : b + 1], size=size, mode="bilinear", align_corners=True).argmax(1)[0]
        assert maps[b].shape == size and torch.equal(maps[b], expected)
    plain = processor.post_process_semantic_segmentation(type("Out", (), {"logits": logits})())
    assert torch.equal(torch.stack(plain), logits.argmax(1))
    with pytest.raises(ValueError, match="target_sizes has 1 entries for a batch of 2"):
        processor.post_process_semantic_segmentation(type("Out", (), {"logits": logits})(), target_sizes=[(4, 4)])


def test_processor_rejects_a_bad_setting_by_name():
    with pytest.raises(ValueError, match="image normalization 'bgr' is not known"):
        FotfImageProcessor.for_normalization("bgr")
    with pytest.raises(ValueError, match="channel_order = 'rbg'"):
        FotfImageProcessor(channel_order="rbg")


@pytest.mark.parametrize("arch,normalization,size", [("deeplabv3", "imagenet", None),
                                                     ("pspnet", "cirkd_bgr", (180, 240))])
def test_processor_and_model_on_camvid_equal_the_evaluation_prediction(tmp_path, camvid_root, arch, normalization,
                                                                        size):
    dataset, info = build_dataset("camvid", root=camvid_root)
    row = dataset["validation"][0]
    image = decode_image(row["image"]).convert("RGB")
    torch.manual_seed(3)
    folder = save_tiny(tmp_path / arch, arch, normalization, size, num_labels=info.num_labels)

    student = load_student(folder)
    pixel_values = transform_pixels(image, normalization, resize=size)[None]
    eval_size = tuple(pixel_values.shape[-2:])
    logits, _, _ = predict(student, pixel_values, eval_size, flip=False, scales=(1.0,), mc_samples=0, generator=None)
    expected = logits.argmax(1)[0]

    processor = AutoImageProcessor.from_pretrained(folder)
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = student.model.eval()(**inputs)
    got = processor.post_process_semantic_segmentation(outputs, target_sizes=[eval_size])[0]
    assert got.shape == eval_size == ((360, 480) if size is None else size)
    assert torch.equal(got, expected)


PIPELINE_CODE = textwrap.dedent(
    """
    import builtins, json, sys
    builtins.input = lambda *a: sys.exit("transformers asked: " + str(a)[:300])  # no trust_remote_code prompt
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from transformers import pipeline
    import fotf_hf
    from fotf_hf.data.transforms import normalize_image
    from fotf_hf.evaluation import predict, load_student

    image = Image.open(sys.argv[1])
    report = {}
    for folder in sys.argv[2:]:
        segmenter = pipeline("image-segmentation", model=folder)
        masks = segmenter(image)
        student = load_student(folder)
        x = torch.from_numpy(normalize_image(np.asarray(image), "imagenet"))[None]
        size = (image.height, image.width)
        if student.model.config.model_type == "segformer":  # transformers' convention: align_corners=False
            with torch.no_grad():
                logits = F.interpolate(student.model(pixel_values=x).logits, size=size, mode="bilinear",
                                       align_corners=False)
        else:  # ours: the evaluation's prediction
            logits = predict(student, x, size, False, (1.0,), 0, None)[0]
        expected = logits.argmax(1)[0].numpy()
        names = student.model.config.id2label
        report[folder] = {
            "labels": [m["label"] for m in masks],
            "expected_labels": [names[int(c)] for c in np.unique(expected)],
            "masks_match": all(
                np.array_equal(np.asarray(m["mask"]) > 0, expected == student.model.config.label2id[m["label"]])
                for m in masks
            ),
            "mask_sizes": sorted({m["mask"].size for m in masks}),
        }
    print(json.dumps(report))
    """
)


def test_pipeline_returns_one_mask_per_predicted_class_for_every_family(tmp_path):
    folders = []
    for arch in ("deeplabv3", "pspnet", "segformer"):
        torch.manual_seed(1)
        folders.append(str(save_tiny(tmp_path / arch, arch)))
    image_path = tmp_path / "street.png"
    random_image(64, 80, seed=2).save(image_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PIPELINE_CODE, str(image_path), *folders], capture_output=True,
                          text=True, env=env, timeout=600, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for folder in folders:
        got = report[folder]
        assert got["labels"] == got["expected_labels"] and len(got["labels"]) >= 1, (folder, got)
        assert got["masks_match"], folder
        assert got["mask_sizes"] == [[80, 64]], folder  # PIL (width, height) of the input image
