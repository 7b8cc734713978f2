"""ONNX export of the segmentation models (DeepLabV3 / PSPNet / SegFormer) with `torch.onnx` (dynamo).

    from fotf_hf.export import export_onnx
    export_onnx("outputs/run")                                        # -> outputs/run/model.onnx
    export_onnx(create_model("pspnet", "resnet18", num_labels=19), "psp.onnx")

The graph has one input and one output; batch, height and width are dynamic:

    pixel_values  float32 (batch, 3, height, width), normalised as the model's image processor does;
                  height, width >= 16 (DeepLabV3 / PSPNet) or >= 29 (SegFormer's 8 x 8 reduction
                  conv on the 1/4 grid; eager PyTorch fails below that too)
    logits        float32 (batch, num_labels, ceil(height / s), ceil(width / s)) at the model's own
                  resolution (s = 8 DeepLabV3 / PSPNet, 4 SegFormer), not upsampled: resize them to
                  the image before the argmax, as `model(...).logits` in PyTorch.

Only the prediction path is in the graph (eval mode: dropout off, BatchNorm running statistics; the
auxiliary head is pruned). The exporter is torch's `torch.export`-based one (`dynamo=True`, torch's
default); the one model change it needs, PSPNet's size-generic adaptive pooling, lives in the model
(`modeling_pspnet.adaptive_avg_pool2d`). optimum is not used: it has ONNX configs for SegFormer but
not for `fotf_deeplabv3` / `fotf_pspnet`.

`verify=True` (the default) runs the file in onnxruntime on the traced example and on two other
batch and image sizes, and deletes it and raises `ExportVerificationError` when
`max |onnx - eager| > atol + rtol * max |eager|`.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn
from transformers import AutoModelForSemanticSegmentation

from .models.factory import check_pretrained

__all__ = ["ExportError", "ExportVerificationError", "UnsupportedOperatorError", "LogitsOnly", "export_onnx",
           "onnx_session", "OPSET"]

OPSET = 18  # the opset torch's exporter builds; lower ones would go through onnxscript's converter
INPUT_NAME, OUTPUT_NAME = "pixel_values", "logits"


class ExportError(RuntimeError):
    """The model could not be exported to ONNX."""


class UnsupportedOperatorError(ExportError):
    """The exporter has no ONNX translation for an operator; `op` names it."""

    def __init__(self, message: str, op: str):
        super().__init__(message)
        self.op = op


class ExportVerificationError(ExportError):
    """The exported graph does not reproduce the eager logits (or fails in onnxruntime)."""


class LogitsOnly(nn.Module):
    """`pixel_values (B, 3, H, W) -> logits (B, C, h, w)`: the part of a segmentation model the graph holds."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values, return_dict=True).logits


def onnx_session(path: Union[str, Path], threads: Optional[int] = None):
    """A CPU `onnxruntime.InferenceSession` for `path` (`threads` intra-op threads; None = ORT's default)."""
    import onnxruntime as ort  # optional dependency (`pip install fotf-hf[onnx]`)

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _load(folder: Union[str, Path]) -> nn.Module:
    check_pretrained(str(folder), role="--model")
    try:
        return AutoModelForSemanticSegmentation.from_pretrained(str(folder))
    except (ValueError, KeyError) as err:
        raise ValueError(f"--model {str(folder)!r} is not a semantic-segmentation model this package can load "
                         f"(DeepLabV3 / PSPNet / SegFormer): {_first_line(err)}") from err


def _output_path(output: Union[str, Path]) -> Path:
    output = Path(output).expanduser()
    if output.is_dir():
        raise IsADirectoryError(f"output {str(output)!r} is a directory; give the .onnx file to write, "
                                f"e.g. {str(output / 'model.onnx')!r}")
    if output.suffix != ".onnx":
        raise ValueError(f"output {str(output)!r} must be a file name ending in .onnx")
    return output


# "No ONNX function found for <OpOverload(op='aten.cummax', overload='default')>" (torch 2.13)
_UNSUPPORTED = re.compile(r"No ONNX function found for <?OpOverload\(op='([\w.:]+)'|No ONNX function found for "
                          r"['\"`]?([\w.:]+)")


def _unsupported_op(err: BaseException) -> Optional[str]:
    """The operator an exporter error says has no translation (searching the chained causes)."""
    while err is not None:
        match = _UNSUPPORTED.search(str(err))
        if match:
            return match.group(1) or match.group(2)
        err = err.__cause__ or err.__context__
    return None


def _first_line(err: BaseException, limit: int = 300) -> str:
    line = next((t.strip() for t in str(err).splitlines() if t.strip()), type(err).__name__)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _metadata(model: nn.Module) -> Dict[str, str]:
    """What a user of the .onnx file needs to read the logits: classes, output stride, normalisation."""
    config = model.config
    stride = 4 if config.model_type == "segformer" else 8
    meta = {"model_type": config.model_type, "num_labels": str(config.num_labels), "output_stride": str(stride),
            "id2label": json.dumps({str(k): v for k, v in sorted(config.id2label.items())})}
    if getattr(config, "image_normalization", None):
        meta["image_normalization"] = str(config.image_normalization)
    return meta


def _verify(wrapper: nn.Module, path: Path, example: torch.Tensor, atol: float, rtol: float) -> Dict[str, float]:
    """`{"BxCxHxW": max |onnxruntime - eager|}` on the example and two other batch / image sizes."""
    session = onnx_session(path)
    b, c, h, w = example.shape
    generator = torch.Generator().manual_seed(1)
    inputs = [example] + [torch.randn(*shape, generator=generator)
                          for shape in ((b + 1, c, h + 32, w + 8), (1, c, h // 2 + 5, w // 2 + 3))]
    diffs = {}
    for x in inputs:
        key = "x".join(map(str, x.shape))
        with torch.no_grad():
            ref = wrapper(x).numpy()
        try:
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        except Exception as err:  # onnxruntime raises its own exception types
            raise ExportVerificationError(f"the exported graph fails in onnxruntime for input {key} (was an input "
                                          f"size baked into it?): {_first_line(err)}") from err
        if got.shape != ref.shape:
            raise ExportVerificationError(f"the exported graph gives logits {got.shape} for input {key}, eager "
                                          f"{ref.shape} (an input size was baked into it)")
        diffs[key] = float(abs(got - ref).max())
        if not diffs[key] <= atol + rtol * float(abs(ref).max()):
            raise ExportVerificationError(f"max |onnx - eager| = {diffs[key]:.3g} for input {key} exceeds "
                                          f"atol {atol:g} + rtol {rtol:g} x max |logit|")
    return diffs


def export_onnx(
    model_or_folder: Union[nn.Module, str, Path],
    output: Union[str, Path, None] = None,
    *,
    example_size: Sequence[int] = (2, 3, 64, 96),
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-5,
) -> Dict[str, Any]:
    """Export a segmentation model to ONNX (opset 18) with dynamic batch, height and width.

    Args:
        model_or_folder: a `*ForSemanticSegmentation` model (exported in eval mode, handed back in
            the mode it came in) or a folder written by `save_pretrained`.
        output: the `.onnx` file to write; None = `<folder>/model.onnx` (only for a folder).
        example_size: `(B, 3, H, W)` of the tracing input, B >= 2 (torch.export specialises a batch
            of 1), H, W >= 16; any size works afterwards.
        verify: compare onnxruntime with eager PyTorch on three batch / image sizes.
        atol, rtol: verification accepts `max |onnx - eager| <= atol + rtol * max |eager|`.

    Returns:
        `{"output": path, "opset": 18, "max_abs_diff": {"BxCxHxW": diff} or None, "seconds": export
        time, "metadata": the key/values written into the file}`.

    Raises:
        FileNotFoundError / ValueError: not a saved segmentation model; bad `output` or `example_size`.
        IsADirectoryError: `output` is a directory.
        UnsupportedOperatorError: an operator has no ONNX translation (`.op` names it).
        ExportError: any other exporter failure. ExportVerificationError: see `verify`.
    """
    if isinstance(model_or_folder, nn.Module):
        if output is None:
            raise ValueError("output is required when exporting a model object (a folder defaults to "
                             "<folder>/model.onnx)")
        output, model = _output_path(output), model_or_folder
    else:
        output = _output_path(Path(model_or_folder).expanduser() / "model.onnx" if output is None else output)
        model = _load(model_or_folder)  # after the cheap checks: loading takes seconds
    shape = tuple(int(v) for v in example_size)
    if len(shape) != 4 or shape[0] < 2 or min(shape[2:]) < 16:
        raise ValueError(f"example_size {shape} must be (B, C, H, W) with B >= 2 (torch.export specialises a "
                         f"batch of 1) and H, W >= 16")
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    output.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    wrapper = LogitsOnly(model.eval())
    start = time.perf_counter()
    try:
        dim = torch.export.Dim.DYNAMIC
        # the exporter prints progress lines and warns about shape checks; its errors are re-raised
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, (example,), dynamo=True, opset_version=OPSET,
                                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                        dynamic_shapes={INPUT_NAME: {0: dim, 2: dim, 3: dim}})
        metadata = _metadata(model)
        program.model.metadata_props.update(metadata)
        program.save(str(output))
        seconds = time.perf_counter() - start
        diffs = _verify(wrapper, output, example, atol, rtol) if verify else None
    except ExportError:
        output.unlink(missing_ok=True)
        raise
    except Exception as err:
        output.unlink(missing_ok=True)
        where = f"cannot export {type(model).__name__} to ONNX (torch {torch.__version__}, opset {OPSET})"
        op = _unsupported_op(err)
        if op is not None:
            raise UnsupportedOperatorError(f"{where}: operator {op} has no ONNX translation in the exporter "
                                           f"(replace it in the model)", op) from err
        raise ExportError(f"{where}: {type(err).__name__}: {_first_line(err)}") from err
    finally:
        model.train(was_training)
    return {"output": str(output), "opset": OPSET, "max_abs_diff": diffs, "seconds": round(seconds, 2),
            "metadata": metadata}
