"""`create_model`: build any supported segmentation model by name (random init or `pretrained`).

    create_model("deeplabv3", "resnet18", num_labels=19)                     # CIRKD-v1 DeepLabV3-R18
    create_model("pspnet", "resnet18", num_labels=11, backbone_base_width=16)  # narrow PSPNet
    create_model("segformer", "mit-b0", num_labels=19, pretrained="nvidia/mit-b0")
    create_model("deeplabv3", "resnet101", num_labels=19, pretrained="teachers/dlv3-r101-citys")

Returns the bare `PreTrainedModel`; wrap it as `SegmentationAdapter(create_model(...))` for the
training loop / FOTF. The MC-site dropout (the dropout right before the classifier) is set to
`mc_dropout_p` in every case, also for loaded checkpoints.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from huggingface_hub import HfApi, constants, try_to_load_from_cache
from transformers import (
    AutoModelForSemanticSegmentation,
    PreTrainedConfig,
    PreTrainedModel,
    SegformerForSemanticSegmentation,
)

from .configuration_fotf import FotfDeepLabV3Config, FotfPSPNetConfig, FotfSegmentationConfig
from .modeling_deeplabv3 import FotfDeepLabV3ForSemanticSegmentation
from .modeling_pspnet import FotfPSPNetForSemanticSegmentation
from .segformer import (
    MIT_SHARED,
    MIT_VARIANTS,
    SEGFORMER_STRUCTURAL_FIELDS,
    segformer_config,
    segformer_config_fields,
    segformer_from_pretrained,
)
from .adapter import set_mc_dropout_p

__all__ = ["create_model", "check_pretrained", "ARCHS", "RESNET_BACKBONES", "BACKBONES", "default_id2label", "list_models"]

ARCHS = ("deeplabv3", "pspnet", "segformer")
RESNET_BACKBONES = {"resnet18": 18, "resnet50": 50, "resnet101": 101}
BACKBONES = {
    "deeplabv3": tuple(RESNET_BACKBONES),
    "pspnet": tuple(RESNET_BACKBONES),
    "segformer": tuple(MIT_VARIANTS),
}
_RESNET_CLASSES = {
    "deeplabv3": (FotfDeepLabV3Config, FotfDeepLabV3ForSemanticSegmentation),
    "pspnet": (FotfPSPNetConfig, FotfPSPNetForSemanticSegmentation),
}
# Config fields that create_model owns (arguments, not overrides), with the argument to use instead.
_RESERVED = {
    "num_labels": "the num_labels argument",
    "id2label": "the id2label argument",
    "label2id": "the id2label argument (label2id is derived from it)",
    "backbone_depth": "the backbone argument (resnet18 / resnet50 / resnet101)",
    "classifier_dropout_prob": "the mc_dropout_p argument (the MC-dropout site)",
}
# Fields of our configs that change parameter shapes or what the weights mean: a loaded checkpoint
# must agree with an override of them; other overrides (loss weights, other dropouts) are applied.
_RESNET_STRUCTURAL_FIELDS = ("backbone_base_width", "head_channels", "aux_head", "output_stride", "image_normalization")


def list_models() -> List[Tuple[str, str]]:
    """All `(arch, backbone)` pairs `create_model` accepts."""
    return [(arch, backbone) for arch in ARCHS for backbone in BACKBONES[arch]]


def default_id2label(num_labels: int) -> Dict[int, str]:
    """`{0: "class_0", ...}`."""
    return {i: f"class_{i}" for i in range(num_labels)}


def _choice_error(name: str, value: Any, choices) -> ValueError:
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"{name} = {value!r} is not one of {list(choices)}{hint}")


def _resolve_labels(num_labels: int, id2label: Optional[Mapping]) -> Tuple[Dict[int, str], Dict[str, int]]:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels = {num_labels!r} is not accepted: it must be an integer >= 1")
    if id2label is None:
        id2label = default_id2label(num_labels)
    try:
        id2label = {int(k): str(v) for k, v in dict(id2label).items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"id2label = {id2label!r} must map integer class ids to names") from err
    if sorted(id2label) != list(range(num_labels)):
        raise ValueError(
            f"id2label has ids {sorted(id2label)} but num_labels = {num_labels}; accepted: exactly the ids "
            f"0..{num_labels - 1}"
        )
    return id2label, {name: i for i, name in id2label.items()}


def _config_fields(config_cls) -> List[str]:
    """Own `__init__` arguments of our config classes (walking the MRO up to `PreTrainedConfig`)."""
    names = set()
    for klass in config_cls.__mro__:
        if klass in (PreTrainedConfig, object) or not issubclass(klass, FotfSegmentationConfig):
            continue
        names.update(p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "kwargs"))
    return sorted(names)


def _check_overrides(arch: str, overrides: Dict[str, Any]) -> None:
    valid = segformer_config_fields() if arch == "segformer" else _config_fields(_RESNET_CLASSES[arch][0])
    if arch == "segformer":
        # generic PreTrainedConfig fields (return_dict, dtype, ...) are not model overrides
        base = set()
        if dataclasses.is_dataclass(PreTrainedConfig):
            base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        valid = [v for v in valid if v not in base]
    for key in overrides:
        if key in _RESERVED:
            raise ValueError(f"override {key!r} is set by create_model itself; use {_RESERVED[key]}")
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            accepted = [v for v in valid if v not in _RESERVED]
            raise ValueError(f"unknown override {key!r} for arch {arch!r}; {hint}valid fields: {accepted}")


PAPER_SETTING_DOC = "README.md, section \"Paper setting\""


def check_pretrained(pretrained: Optional[str], role: str = "pretrained") -> None:
    """Fail at once, with one message, when `pretrained` is neither a model folder here nor a Hub
    model this machine can get: an existing folder needs a `config.json`; a Hub id must be in the
    local cache when `HF_HUB_OFFLINE` is set, else one metadata request must succeed (no retries).

    Raises:
        FileNotFoundError: naming `role` (e.g. `student.pretrained`), the value, and where the
            weights of the paper configs come from (`PAPER_SETTING_DOC`).
    """
    if pretrained is None:
        return
    path = Path(pretrained).expanduser()
    where = (f"{role} = {pretrained!r}", f"see {PAPER_SETTING_DOC} for which weights each config expects and how to "
             f"convert them, or train one with scripts/distill.py")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{where[0]} is a folder without config.json, not a saved model; {where[1]}")
        return
    if _looks_local(pretrained) or str(pretrained).count("/") != 1:
        raise FileNotFoundError(f"{where[0]}: no such folder; {where[1]}")
    if isinstance(try_to_load_from_cache(pretrained, "config.json"), str):
        return
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(f"{where[0]} is neither a local folder nor a Hub model in this machine's cache "
                                f"(HF_HUB_OFFLINE is set); {where[1]}")
    try:
        HfApi().model_info(pretrained, timeout=10)
    except Exception as err:  # no network, unknown repo, gated: all mean "cannot load it"
        raise FileNotFoundError(f"{where[0]} is not a local folder and the Hub did not serve it "
                                f"({type(err).__name__}); {where[1]}") from None


def _looks_local(pretrained: str) -> bool:
    return os.path.isdir(pretrained) or str(pretrained).startswith(("/", "./", "../", "~", "."))


def _local_config(pretrained: str) -> Optional[Dict[str, Any]]:
    """The `config.json` of a local folder, or None for Hub ids. A missing local folder raises."""
    if not _looks_local(pretrained):
        return None
    path = Path(pretrained).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"pretrained = {pretrained!r}: no config.json in that folder (does it exist?)")
    return json.loads((path / "config.json").read_text())


def create_model(
    arch: str,
    backbone: str,
    num_labels: int,
    id2label: Optional[Mapping[int, str]] = None,
    pretrained: Optional[str] = None,
    mc_dropout_p: float = 0.1,
    **overrides,
) -> PreTrainedModel:
    """Build a segmentation model.

    Args:
        arch: `deeplabv3`, `pspnet` or `segformer`.
        backbone: `resnet18` / `resnet50` / `resnet101` (deeplabv3, pspnet) or `mit-b0` .. `mit-b5`
            (segformer).
        num_labels: number of classes C.
        id2label: class names `{0: name, ...}` (None = `class_i`). Ignored for a loaded DeepLabV3 /
            PSPNet checkpoint, which keeps its own names (so callers can compare them).
        pretrained: None (random init), or a local folder / Hub id.
            DeepLabV3 / PSPNet: a folder written by `save_pretrained` (or the converter); loaded with
            `AutoModelForSemanticSegmentation.from_pretrained`; its arch, backbone depth and number of
            classes must match (ValueError otherwise).
            SegFormer: any SegFormer checkpoint (e.g. `nvidia/mit-b0`); the classifier is
            re-initialised when its number of classes differs (ImageNet encoders have 1000).
        mc_dropout_p: dropout rate of the MC site (the dropout right before the classifier), in [0, 1).
        **overrides: other config fields, e.g. `backbone_base_width=8, head_channels=16` (ResNet
            models) or `depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64]` (SegFormer). With
            `pretrained`, fields that change the architecture must equal the checkpoint's.

    Returns:
        `FotfDeepLabV3ForSemanticSegmentation`, `FotfPSPNetForSemanticSegmentation` or
        `SegformerForSemanticSegmentation` (train mode for random init; `from_pretrained` leaves
        loaded models in eval mode).

    Raises:
        ValueError: unknown arch / backbone / override (with the valid choices), bad values, or a
            checkpoint that disagrees with the request.
    """
    if arch not in ARCHS:
        raise _choice_error("arch", arch, ARCHS)
    if backbone not in BACKBONES[arch]:
        raise _choice_error(f"backbone (for arch {arch!r})", backbone, BACKBONES[arch])
    id2label, label2id = _resolve_labels(num_labels, id2label)
    if isinstance(mc_dropout_p, bool) or not isinstance(mc_dropout_p, (int, float)) or not 0.0 <= mc_dropout_p < 1.0:
        raise ValueError(f"mc_dropout_p = {mc_dropout_p!r} is not accepted: it must be a number in [0, 1)")
    _check_overrides(arch, overrides)
    if arch == "segformer":
        return _create_segformer(backbone, num_labels, id2label, label2id, pretrained, float(mc_dropout_p), overrides)
    return _create_resnet_model(arch, backbone, num_labels, id2label, label2id, pretrained, float(mc_dropout_p), overrides)


def _create_resnet_model(arch, backbone, num_labels, id2label, label2id, pretrained, p, overrides) -> PreTrainedModel:
    config_cls, model_cls = _RESNET_CLASSES[arch]
    depth = RESNET_BACKBONES[backbone]
    if pretrained is None:
        config = config_cls(
            backbone_depth=depth, id2label=id2label, label2id=label2id, classifier_dropout_prob=p, **overrides
        )
        return model_cls(config)

    local = _local_config(pretrained)
    if local is not None and local.get("model_type") != config_cls.model_type:
        raise ValueError(
            f"pretrained = {pretrained!r} is a {local.get('model_type')!r} model, but arch = {arch!r} needs "
            f"model_type {config_cls.model_type!r}"
        )
    model = AutoModelForSemanticSegmentation.from_pretrained(pretrained)
    config = model.config
    if not isinstance(model, model_cls):
        raise ValueError(
            f"pretrained = {pretrained!r} holds a {type(model).__name__}, but arch = {arch!r} needs {model_cls.__name__}"
        )
    if config.backbone_depth != depth:
        raise ValueError(
            f"pretrained = {pretrained!r} has a resnet{config.backbone_depth} backbone, but backbone = {backbone!r} "
            f"was requested"
        )
    if config.num_labels != num_labels:
        raise ValueError(
            f"pretrained = {pretrained!r} has {config.num_labels} classes, but num_labels = {num_labels} was "
            f"requested; a checkpoint must have the same label set (convert or train one for these classes)"
        )
    config_cls(backbone_depth=depth, **overrides)  # validates the override values
    for key, value in overrides.items():
        have = config.head_width if key == "head_channels" else getattr(config, key)
        if key in _RESNET_STRUCTURAL_FIELDS:
            if have != value and not (key == "head_channels" and value is None):
                raise ValueError(
                    f"override {key} = {value!r} disagrees with pretrained = {pretrained!r}, which has {key} = {have!r}; "
                    f"architecture fields of a checkpoint cannot be changed"
                )
            continue
        setattr(config, key, value)
    # Non-structural dropouts live in modules too: keep them in sync with the config.
    if "aspp_dropout_prob" in overrides and hasattr(model.head, "aspp"):
        model.head.aspp.project[3].p = float(overrides["aspp_dropout_prob"])
    if "aux_dropout_prob" in overrides and model.auxlayer is not None:
        model.auxlayer.block[3].p = float(overrides["aux_dropout_prob"])
    set_mc_dropout_p(model, p)
    return model


def _create_segformer(backbone, num_labels, id2label, label2id, pretrained, p, overrides) -> PreTrainedModel:
    if pretrained is None:
        return SegformerForSemanticSegmentation(
            segformer_config(backbone, num_labels, id2label, label2id, classifier_dropout_prob=p, **overrides)
        )
    structural = {k: v for k, v in overrides.items() if k in SEGFORMER_STRUCTURAL_FIELDS}
    expected = {**MIT_SHARED, **MIT_VARIANTS[backbone], **structural}
    local = _local_config(pretrained)
    if local is not None:
        if local.get("model_type") != "segformer":
            raise ValueError(
                f"pretrained = {pretrained!r} is a {local.get('model_type')!r} model, but arch = 'segformer' needs "
                f"model_type 'segformer'"
            )
        _check_segformer_structure(local, expected, backbone, pretrained)
    rest = {k: v for k, v in overrides.items() if k not in SEGFORMER_STRUCTURAL_FIELDS}
    model = segformer_from_pretrained(pretrained, num_labels, id2label, label2id, p, **rest)
    _check_segformer_structure(model.config.to_dict(), expected, backbone, pretrained)
    set_mc_dropout_p(model, p)
    return model


def _check_segformer_structure(
    config: Mapping[str, Any], expected: Mapping[str, Any], backbone: str, pretrained: str
) -> None:
    def norm(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    wrong = [key for key in SEGFORMER_STRUCTURAL_FIELDS
             if key in expected and config.get(key) is not None and norm(config[key]) != norm(expected[key])]
    if wrong:
        have = ", ".join(f"{k} = {norm(config[k])}" for k in wrong)
        want = ", ".join(f"{k} = {norm(expected[k])}" for k in wrong)
        raise ValueError(
            f"pretrained = {pretrained!r} has {have}, but backbone = {backbone!r} (with the given overrides) needs "
            f"{want}; pick the matching mit-b* backbone or pass overrides equal to the checkpoint's"
        )
