"""ONNX export (`fotf_hf.export`, `scripts/export_onnx.py`).

Tiny random models (as tests/test_models.py). Each family is exported once and run in onnxruntime
at batch and image sizes other than the traced one: the logits must match eager PyTorch (eval
mode) to 1e-4. PSPNet's size-generic pooling is checked against `F.adaptive_avg_pool2d`.
"""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import fotf_hf  # noqa: E402,F401  (registers the Auto classes)
from fotf_hf.export import ExportVerificationError, UnsupportedOperatorError, export_onnx  # noqa: E402
from fotf_hf.models import create_model  # noqa: E402
from fotf_hf.models.modeling_pspnet import _pooling_matrix  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {"backbone_base_width": 8, "head_channels": 16}
TINY_SEGFORMER = {"depths": [1, 1, 1, 1], "hidden_sizes": [8, 16, 32, 64], "num_attention_heads": [1, 1, 2, 4],
                  "decoder_hidden_size": 32}
C = 5
STRIDE = {"deeplabv3": 8, "pspnet": 8, "segformer": 4}
# traced at (2, 3, 64, 96); checked at other batch AND image sizes (odd sizes: ceil rounding; 40 x 56
# puts PSPNet's 6 x 6 bins on a 5 x 7 grid, where the windows overlap)
CHECK_SHAPES = [(1, 3, 40, 56), (3, 3, 97, 130)]


def tiny(arch, seed=0):
    torch.manual_seed(seed)
    if arch == "segformer":
        return create_model("segformer", "mit-b0", num_labels=C, **TINY_SEGFORMER)
    return create_model(arch, "resnet18", num_labels=C, **TINY)


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    return session.run(["logits"], {"pixel_values": x.numpy()})[0]


@pytest.mark.parametrize("arch", ["deeplabv3", "pspnet", "segformer"])
def test_export_matches_eager_at_other_batch_and_image_sizes(arch, tmp_path):
    model = tiny(arch)
    assert model.training  # create_model returns train mode: export must use eval and give it back
    result = export_onnx(model, tmp_path / f"{arch}.onnx")
    assert model.training and Path(result["output"]).is_file() and result["opset"] == 18
    assert max(result["max_abs_diff"].values()) <= 1e-4
    model.eval()
    g = torch.Generator().manual_seed(1)
    for shape in CHECK_SHAPES:
        x = torch.randn(*shape, generator=g)
        with torch.no_grad():
            ref = model(pixel_values=x).logits.numpy()
        got = run_onnx(result["output"], x)
        b, _, h, w = shape
        assert got.shape == ref.shape == (b, C, math.ceil(h / STRIDE[arch]), math.ceil(w / STRIDE[arch]))
        assert np.abs(got - ref).max() <= 1e-4, (arch, shape, np.abs(got - ref).max())
    if arch == "pspnet":  # what a reader of the file needs, and only the logits path in the graph
        import onnx

        proto = onnx.load(result["output"])
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["model_type"] == "fotf_pspnet" and meta["num_labels"] == str(C) and meta["output_stride"] == "8"
        assert json.loads(meta["id2label"]) == {str(i): f"class_{i}" for i in range(C)}
        assert not any("auxlayer" in init.name for init in proto.graph.initializer)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (5, 7), (13, 21), (45, 60)])
@pytest.mark.parametrize("bins", [2, 3, 6])
def test_pspnet_export_pooling_equals_adaptive_avg_pool2d(size, bins):
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    pooled = _pooling_matrix(size[0], bins, x) @ x @ _pooling_matrix(size[1], bins, x).T
    torch.testing.assert_close(pooled, F.adaptive_avg_pool2d(x, bins), rtol=1e-12, atol=1e-12)


def test_verification_catches_a_baked_in_size(tmp_path, monkeypatch):
    # with PyTorch's adaptive pooling kept under export, the exporter bakes the traced size into the graph
    monkeypatch.setattr("fotf_hf.models.modeling_pspnet.adaptive_avg_pool2d", F.adaptive_avg_pool2d)
    with pytest.raises(ExportVerificationError, match="baked"):
        export_onnx(tiny("pspnet"), tmp_path / "psp.onnx")
    assert not (tmp_path / "psp.onnx").exists()


class _Cummax(nn.Module):
    """A classifier followed by an op torch 2.13's ONNX exporter does not translate."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return torch.cummax(self.conv(x), dim=-1)[0]


def test_unsupported_operator_is_named(tmp_path):
    model = tiny("deeplabv3")
    model.head.block[4] = _Cummax(model.head.block[4])
    with pytest.raises(UnsupportedOperatorError, match=r"operator aten\.cummax") as info:
        export_onnx(model, tmp_path / "m.onnx")
    assert "cummax" in info.value.op and len(str(info.value)) < 400  # short, not a graph dump
    assert not (tmp_path / "m.onnx").exists()


def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json"):
        export_onnx(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        export_onnx(tmp_path / "missing")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a semantic-segmentation model"):
        export_onnx(other)
    model = tiny("deeplabv3")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        export_onnx(model, tmp_path)
    with pytest.raises(ValueError, match="ending in .onnx"):
        export_onnx(model, tmp_path / "model")
    with pytest.raises(ValueError, match="output is required"):
        export_onnx(model)
    with pytest.raises(ValueError, match="B >= 2"):
        export_onnx(model, tmp_path / "m.onnx", example_size=(1, 3, 64, 64))


def test_cli_exports_a_saved_folder_and_reports_errors(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import export_onnx as cli
    finally:
        sys.path.pop(0)
    model = tiny("deeplabv3").eval()
    model.save_pretrained(tmp_path / "student")
    assert cli.main(["--model", str(tmp_path / "student")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["output"] == str(tmp_path / "student" / "model.onnx")
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        ref = model(pixel_values=x).logits.numpy()
    assert np.abs(run_onnx(out["output"], x) - ref).max() <= 1e-4
    assert cli.main(["--model", str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli.main(["--model", str(tmp_path / "student"), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
