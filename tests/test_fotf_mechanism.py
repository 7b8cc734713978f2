"""scripts/fotf_mechanism.py: boundary pixels against a loop reference, and the end-to-end tables
against what the evaluation scores independently."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fotf_hf.evaluation import run_evaluation
from fotf_hf.models import create_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # only while importing: scripts/evaluate.py shadows `evaluate`
try:
    import fotf_mechanism  # noqa: E402
finally:
    sys.path.pop(0)


def _boundary_reference(labels: np.ndarray, radius: int, ignore: int = 255) -> np.ndarray:
    """Pixel by pixel: is any labelled pixel within `radius` (max-norm) next to another labelled class?"""
    b, h, w = labels.shape
    edge = np.zeros_like(labels, dtype=bool)
    for n in range(b):
        for y in range(h):
            for x in range(w):
                if labels[n, y, x] == ignore:
                    continue
                for dy, dx in ((0, 1), (1, 0), (0, -1), (-1, 0)):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and labels[n, yy, xx] not in (ignore, labels[n, y, x]):
                        edge[n, y, x] = True
    near = np.zeros_like(edge)
    for n in range(b):
        for y in range(h):
            for x in range(w):
                near[n, y, x] = edge[n, max(0, y - radius):y + radius + 1, max(0, x - radius):x + radius + 1].any()
    return near


@pytest.mark.parametrize("radius", [1, 3])
def test_boundary_mask_matches_a_pixel_loop(radius):
    g = torch.Generator().manual_seed(radius)
    # Blocky labels (edges are sparse) with some ignored pixels.
    labels = torch.randint(0, 3, (2, 4, 5), generator=g).repeat_interleave(9, 1).repeat_interleave(9, 2)
    labels[torch.rand(labels.shape, generator=g) < 0.05] = 255
    expected = _boundary_reference(labels.numpy(), radius)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(fotf_mechanism.boundary_mask(labels, radius).numpy(), expected)


def test_tables_count_every_labelled_pixel_and_the_evaluations_errors(tmp_path):
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny"
    create_model("deeplabv3", "resnet18", num_labels=8, backbone_base_width=8, head_channels=16).save_pretrained(
        model_dir)
    options = ["num_train=1", "num_val=3", "image_size=[64,96]"]
    out = tmp_path / "mechanism.json"
    fotf_mechanism.main(["--model", str(model_dir), "--dataset", "synthetic-streets", "--split", "validation",
                         "--kappa", "5", "--m", "1", "--batch_size", "2", "--output", str(out),
                         "--dataset_option", *options])
    regions = json.loads(out.read_text())["regions"]
    metrics = run_evaluation(str(model_dir), "synthetic-streets", split="validation", batch_size=2,
                             dataset_options={"num_train": 1, "num_val": 3, "image_size": [64, 96]},
                             write_outputs=False, print_table=False)
    overall = regions["overall"]
    pixels = sum(overall[r]["pixels"] for r in fotf_mechanism.REGIONS)
    errors = sum(overall[r]["error_rate"] * overall[r]["pixels"] for r in fotf_mechanism.REGIONS)
    per_class = sum(v[r]["pixels"] for k, v in regions.items() if k != "overall" for r in fotf_mechanism.REGIONS)
    assert per_class == pixels and overall["boundary"]["pixels"] > 0 and overall["interior"]["pixels"] > 0
    assert errors / pixels == pytest.approx(1 - metrics["pixel_accuracy"], abs=1e-6)
    # eq. 7 with kappa 5, m 1 on sigma in [0, 0.5]: every weight in [1, 1.5^5], and an MC-dropout
    # student is uncertain somewhere.
    for region in overall.values():
        assert 1.0 < region["weight_mean"] <= 1.5 ** 5 and region["sigma_mean"] > 0
