"""Convert CIRKD-v1 / Af-DCD checkpoints (`.pth` state dicts) into our transformers models.

Two kinds of checkpoint are understood (notes §2.6-2.7):

- **segmentation** (teachers / students, e.g. `deeplabv3_resnet101_citys_best_model.pth`): keys
  `pretrained.*`, `head.*`, `auxlayer.*`. Our module names are CIRKD's, so they load by identity.
- **ImageNet backbone** (`resnet18-imagenet.pth`, `resnet101-imagenet.pth`, deep-stem ResNets of
  CSAILVision/semantic-segmentation-pytorch): keys `conv1.weight`, `bn1.*`, `layer1.*`, ..., `fc.*`.
  They go into the backbone (`pretrained.` prefix), `fc.*` is dropped and the heads stay randomly
  initialised.

Refused: the 2025 CIRKDv2 heads (512 wide for R18/R101 DeepLabV3, 256 for PSPNet-R101; winycg/CIRKD
commit 351400e), another arch / depth than requested, and any tensor whose shape differs from ours.
The saved config says `image_normalization = "cirkd_bgr"`: CIRKD feeds BGR, 0-255, minus
[104.00698793, 116.66876762, 122.67891434], no std division.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .configuration_fotf import FotfDeepLabV3Config, FotfPSPNetConfig
from .factory import RESNET_BACKBONES, create_model
from .remote_code import write_inference_files

__all__ = [
    "ConversionReport",
    "load_cirkd_state_dict",
    "unwrap_state_dict",
    "detect_checkpoint_kind",
    "convert_cirkd_state_dict",
    "convert_cirkd_checkpoint",
]

CIRKD_BGR_MEAN = (104.00698793, 116.66876762, 122.67891434)
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_SEG_PREFIXES = ("pretrained.", "head.", "auxlayer.")
_CLASSIFIER_KEY = {"deeplabv3": "head.block.4", "pspnet": "head.classifier"}
_HEAD_WIDTH_KEY = {"deeplabv3": "head.aspp.b0.0.weight", "pspnet": "head.block.0.weight"}
_DEFAULT_WIDTHS = {"deeplabv3": FotfDeepLabV3Config.default_head_channels, "pspnet": FotfPSPNetConfig.default_head_channels}
_DEPTH_BY_LAYOUT = {("basic", 2): 18, ("bottleneck", 6): 50, ("bottleneck", 23): 101}


@dataclass
class ConversionReport:
    """What a conversion did.

    Args:
        kind: `segmentation` or `imagenet_backbone`.
        arch, backbone, num_labels, aux_head, backbone_base_width: the built model.
        loaded: number of checkpoint tensors copied into the model.
        missing_keys: model tensors absent from the checkpoint (left at random init;
            `num_batches_tracked` buffers of old PyTorch checkpoints are not listed).
        unexpected_keys: checkpoint tensors the model has no place for (dropped).
        dropped_keys: tensors dropped on purpose (ImageNet `fc.*`).
        randomly_initialized: model parts that start from random weights (e.g. `head`, `auxlayer`).
    """

    kind: str
    arch: str
    backbone: str
    num_labels: int
    aux_head: bool
    backbone_base_width: int
    loaded: int = 0
    missing_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    dropped_keys: List[str] = field(default_factory=list)
    randomly_initialized: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"{self.kind} checkpoint -> {self.arch}-{self.backbone}, {self.num_labels} classes, "
            f"aux head {'yes' if self.aux_head else 'no'}: {self.loaded} tensors loaded",
        ]
        for name, keys in (("missing (random init)", self.missing_keys), ("unexpected (dropped)", self.unexpected_keys),
                           ("dropped on purpose", self.dropped_keys)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                lines.append(f"  {name}: {shown}")
        if self.randomly_initialized:
            lines.append(f"  randomly initialised: {', '.join(self.randomly_initialized)}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------ loading


def unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """Plain `{name: tensor}` from a checkpoint object.

    Unwraps `{'state_dict': ...}` / `{'model': ...}` / `{'model_state_dict': ...}` (repeatedly) and
    strips DataParallel / DDP `module.` prefixes.
    """
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint is a {type(obj).__name__}; accepted: a state dict, or a dict wrapping one "
                         f"under {list(_WRAPPER_KEYS)}")
    out: Dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; accepted: a state dict "
                             f"(optionally wrapped under {list(_WRAPPER_KEYS)})")
        name = str(key)
        while name.startswith("module."):
            name = name[len("module."):]
        out[name] = value
    return out


def load_cirkd_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """`torch.load(path, map_location="cpu", weights_only=True)` + `unwrap_state_dict`.

    Raises:
        ValueError: the file is not a plain tensor checkpoint (damaged, not a PyTorch file, or it
            pickles objects other than tensors and containers, which could run code when loaded).
    """
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises retrying with the unsafe loader (and allow-listing the offending global):
        # for a downloaded checkpoint that is the code-execution attack itself, so only the name of the
        # refused global is kept, and the error is raised outside this block (no chained cause/context).
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        refused = f" (here: {found.group(1)})" if found else ""
    else:
        return unwrap_state_dict(obj)
    raise ValueError(
        f"{path} is not a plain tensor checkpoint (a state dict of tensors, optionally wrapped under "
        f"{list(_WRAPPER_KEYS)}): it is damaged or not a PyTorch file, or it pickles other objects{refused}, "
        f"which are not loaded because unpickling them can run arbitrary code. Re-save the weights from a "
        f"trusted environment as `torch.save(model.state_dict(), path)`."
    ) from None


def detect_checkpoint_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """`segmentation` (`pretrained.*`, `head.*`, `auxlayer.*`) or `imagenet_backbone` (`conv1.weight`, `layer1.*`)."""
    keys = list(state_dict)
    if any(k.startswith(_SEG_PREFIXES) for k in keys):
        return "segmentation"
    if "conv1.weight" in state_dict and any(k.startswith("layer1.") for k in keys):
        return "imagenet_backbone"
    raise ValueError(
        f"unrecognised checkpoint layout (first keys: {keys[:5]}); accepted: a CIRKD segmentation checkpoint "
        f"(pretrained.*, head.*, auxlayer.*) or a deep-stem ImageNet ResNet (conv1.weight, layer1.*, fc.*)"
    )


def _infer_depth(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Optional[int]:
    bottleneck = f"{prefix}layer1.0.conv3.weight" in state_dict
    pattern = re.compile(rf"^{re.escape(prefix)}layer3\.(\d+)\.")
    blocks = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if not blocks:
        return None
    return _DEPTH_BY_LAYOUT.get(("bottleneck" if bottleneck else "basic", max(blocks) + 1), -1)


def _infer_arch(state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    if any(k.startswith("head.aspp.") for k in state_dict):
        return "deeplabv3"
    if any(k.startswith("head.psp.") for k in state_dict):
        return "pspnet"
    return None


# --------------------------------------------------------------------------------- conversion


def convert_cirkd_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    arch: str,
    backbone: str,
    num_labels: Optional[int] = None,
    id2label: Optional[Mapping[int, str]] = None,
    strict: bool = False,
    mc_dropout_p: float = 0.1,
    **overrides,
):
    """Build our model from a CIRKD state dict.

    Args:
        state_dict: `{name: tensor}` (run `unwrap_state_dict` first for wrapped / DDP checkpoints).
        arch: `deeplabv3` or `pspnet`.
        backbone: `resnet18`, `resnet50` or `resnet101`.
        num_labels: classes; None = read from the classifier (segmentation checkpoints only).
        id2label: class names (None = `class_i`).
        strict: refuse missing / unexpected keys (default: report them).
        mc_dropout_p: MC-site dropout of the built model (CIRKD's head dropout is 0.1).
        **overrides: other config fields for the built model (e.g. `aux_loss_weight`).

    Returns:
        `(model, ConversionReport)`; the model's config has `image_normalization="cirkd_bgr"`.

    Raises:
        ValueError: CIRKDv2 head widths, arch / depth / class-count disagreements, shape mismatches,
            and (with `strict`) missing or unexpected keys.
    """
    if arch not in _CLASSIFIER_KEY:
        raise ValueError(f"arch = {arch!r} cannot be converted from CIRKD; accepted: {sorted(_CLASSIFIER_KEY)}")
    if backbone not in RESNET_BACKBONES:
        raise ValueError(f"backbone = {backbone!r} is not one of {list(RESNET_BACKBONES)}")
    kind = detect_checkpoint_kind(state_dict)
    state_dict, dropped = _segmentation_keys(state_dict, kind, arch, num_labels)
    overrides.setdefault("backbone_base_width", _backbone_base_width(state_dict, backbone))

    aux_head = overrides.pop("aux_head", None)
    if kind == "segmentation":
        _check_head_width(state_dict, arch, backbone, overrides)
        num_labels = _classifier_num_labels(state_dict, arch, num_labels)
        if aux_head is None:
            aux_head = any(k.startswith("auxlayer.") for k in state_dict)
    elif aux_head is None:
        aux_head = True  # CIRKD trains every ResNet student with the aux head

    overrides["image_normalization"] = "cirkd_bgr"
    model = create_model(arch, backbone, num_labels=num_labels, id2label=id2label, mc_dropout_p=mc_dropout_p,
                         aux_head=bool(aux_head), **overrides)
    to_load, missing, unexpected = _load_matching(model, state_dict, arch, backbone, strict)
    random_parts = sorted({k.split(".")[0] for k in missing})
    report = ConversionReport(
        kind=kind, arch=arch, backbone=backbone, num_labels=int(num_labels), aux_head=bool(aux_head),
        backbone_base_width=int(model.config.backbone_base_width), loaded=len(to_load), missing_keys=missing,
        unexpected_keys=unexpected, dropped_keys=dropped, randomly_initialized=random_parts,
    )
    return model, report


def _segmentation_keys(
    state_dict: Mapping[str, torch.Tensor], kind: str, arch: str, num_labels: Optional[int]
) -> Tuple[Mapping[str, torch.Tensor], List[str]]:
    """The state dict under our segmentation names, and the keys dropped on purpose (ImageNet `fc.*`).

    An ImageNet backbone goes under `pretrained.` and needs `num_labels`; a segmentation checkpoint
    is kept as is, after checking that its head is `arch`'s.
    """
    dropped: List[str] = []
    if kind == "imagenet_backbone":
        dropped = sorted(k for k in state_dict if k.startswith("fc."))
        state_dict = {f"pretrained.{k}": v for k, v in state_dict.items() if not k.startswith("fc.")}
        if num_labels is None:
            raise ValueError("an ImageNet backbone checkpoint has no segmentation classifier: pass num_labels")
    else:
        found_arch = _infer_arch(state_dict)
        if found_arch is not None and found_arch != arch:
            raise ValueError(f"the checkpoint is a {found_arch} model (head keys), but arch = {arch!r} was requested")
    return state_dict, dropped


def _backbone_base_width(state_dict: Mapping[str, torch.Tensor], backbone: str) -> int:
    """The stem's width (64 without a stem), after checking that the ResNet depth is `backbone`'s."""
    depth = RESNET_BACKBONES[backbone]
    found_depth = _infer_depth(state_dict, "pretrained.")
    if found_depth is not None and found_depth != depth:
        what = f"resnet{found_depth}" if found_depth > 0 else "a ResNet layout we do not support (e.g. resnet34)"
        raise ValueError(f"the checkpoint's backbone is {what}, but backbone = {backbone!r} was requested")
    stem = state_dict.get("pretrained.conv1.weight")
    return int(stem.shape[0]) if stem is not None else 64


def _classifier_num_labels(
    state_dict: Mapping[str, torch.Tensor], arch: str, num_labels: Optional[int]
) -> int:
    """`num_labels`, read from the classifier's bias when None, else checked against it."""
    classifier_bias = state_dict.get(f"{_CLASSIFIER_KEY[arch]}.bias")
    if classifier_bias is not None:
        found_labels = int(classifier_bias.shape[0])
        if num_labels is None:
            num_labels = found_labels
        elif num_labels != found_labels:
            raise ValueError(
                f"num_labels = {num_labels}, but the checkpoint's classifier {_CLASSIFIER_KEY[arch]}.bias "
                f"has shape {tuple(classifier_bias.shape)} ({found_labels} classes)"
            )
    if num_labels is None:
        raise ValueError(
            f"cannot infer num_labels: the checkpoint has no {_CLASSIFIER_KEY[arch]}.bias; pass num_labels"
        )
    return num_labels


def _load_matching(
    model, state_dict: Mapping[str, torch.Tensor], arch: str, backbone: str, strict: bool
) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """Copy the checkpoint's tensors into `model`; returns `(loaded, missing_keys, unexpected_keys)`.

    Any shape mismatch is refused, and with `strict` any missing or unexpected key.
    """
    own = model.state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ValueError(
            f"{len(mismatched)} tensor shape mismatch(es) between the checkpoint and {arch}-{backbone}: "
            + "; ".join(mismatched[:5]) + (" ..." if len(mismatched) > 5 else "")
        )
    missing = sorted(k for k in own if k not in state_dict and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state_dict if k not in own)
    if strict and (missing or unexpected):
        raise ValueError(f"strict conversion: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
    to_load = {k: v for k, v in state_dict.items() if k in own}
    model.load_state_dict(to_load, strict=False)
    return to_load, missing, unexpected


def _check_head_width(state_dict, arch: str, backbone: str, overrides: Dict[str, Any]) -> None:
    key = _HEAD_WIDTH_KEY[arch]
    weight = state_dict.get(key)
    if weight is None:
        return
    found = int(weight.shape[0])
    depth = RESNET_BACKBONES[backbone]
    base_width = overrides.get("backbone_base_width", 64)
    expected = overrides.get("head_channels") or max(1, _DEFAULT_WIDTHS[arch][depth] * base_width // 64)
    if found != expected:
        raise ValueError(
            f"{key} has {found} output channels, but CIRKD-v1 {arch}-{backbone} has {expected}: this looks like the "
            f"2025 CIRKDv2 architecture (winycg/CIRKD commit 351400e widened the DeepLabV3 heads to 512 and narrowed "
            f"PSPNet-R101 to 256), which fotf_hf does not implement; use a CIRKD-v1 / Af-DCD checkpoint"
        )


def convert_cirkd_checkpoint(
    path: Union[str, Path],
    output_dir: Union[str, Path],
    arch: str,
    backbone: str,
    num_labels: Optional[int] = None,
    id2label: Optional[Mapping[int, str]] = None,
    strict: bool = False,
    mc_dropout_p: float = 0.1,
    **overrides,
) -> ConversionReport:
    """Load a CIRKD `.pth`, convert it (`convert_cirkd_state_dict`) and `save_pretrained` it to `output_dir`.

    The folder then loads with `AutoModelForSemanticSegmentation.from_pretrained(output_dir)` after
    `import fotf_hf`, or with `create_model(arch, backbone, num_labels, pretrained=output_dir)`; it
    also holds the `cirkd_bgr` image processor and the remote code (`write_inference_files`), so
    `pipeline("image-segmentation", model=output_dir, trust_remote_code=True)` works without fotf-hf.
    """
    state_dict = load_cirkd_state_dict(path)
    model, report = convert_cirkd_state_dict(
        state_dict, arch, backbone, num_labels=num_labels, id2label=id2label, strict=strict,
        mc_dropout_p=mc_dropout_p, **overrides,
    )
    model.save_pretrained(str(output_dir))
    write_inference_files(output_dir)
    return report
