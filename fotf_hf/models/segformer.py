"""SegFormer (transformers' `SegformerForSemanticSegmentation`) as an FOTF student/teacher.

SegFormer is used as transformers ships it; this file only holds the MiT size table, a config
builder, a re-implementation of the first lines of `SegformerDecodeHead.forward` that stops
right before the decode head's `dropout` (the last MC-dropout site, `classifier_dropout_prob`),
so the fused features can be cached, and the model's MC sites: that dropout, preceded by the
encoder's hidden-state dropouts when `hidden_dropout_prob > 0` (then an exact MC pass re-runs the
whole model). Stochastic depth (`drop_path_rate`) is never an MC site.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SegformerConfig, SegformerForSemanticSegmentation

from .outputs import SegmentationFeatures

__all__ = [
    "MIT_VARIANTS",
    "MIT_SHARED",
    "SEGFORMER_STRUCTURAL_FIELDS",
    "segformer_config",
    "segformer_config_fields",
    "segformer_forward_features",
    "segformer_mc_sites",
    "segformer_forward_from_mc_input",
    "segformer_projections",
    "segformer_from_pretrained",
]

# MiT sizes (SegFormer paper / HF docs table, notes §1.5). Heads and SR ratios are shared.
MIT_VARIANTS: Dict[str, Dict[str, Any]] = {
    "mit-b0": {"depths": [2, 2, 2, 2], "hidden_sizes": [32, 64, 160, 256], "decoder_hidden_size": 256},
    "mit-b1": {"depths": [2, 2, 2, 2], "hidden_sizes": [64, 128, 320, 512], "decoder_hidden_size": 256},
    "mit-b2": {"depths": [3, 4, 6, 3], "hidden_sizes": [64, 128, 320, 512], "decoder_hidden_size": 768},
    "mit-b3": {"depths": [3, 4, 18, 3], "hidden_sizes": [64, 128, 320, 512], "decoder_hidden_size": 768},
    "mit-b4": {"depths": [3, 8, 27, 3], "hidden_sizes": [64, 128, 320, 512], "decoder_hidden_size": 768},
    "mit-b5": {"depths": [3, 6, 40, 3], "hidden_sizes": [64, 128, 320, 512], "decoder_hidden_size": 768},
}
MIT_SHARED: Dict[str, Any] = {"num_attention_heads": [1, 2, 5, 8], "sr_ratios": [8, 4, 2, 1]}

# Fields that change parameter shapes: a pretrained checkpoint must agree with the request on these.
SEGFORMER_STRUCTURAL_FIELDS = (
    "num_channels", "num_encoder_blocks", "depths", "sr_ratios", "hidden_sizes", "patch_sizes", "strides",
    "num_attention_heads", "mlp_ratios", "decoder_hidden_size",
)


def segformer_config_fields() -> List[str]:
    """Names `SegformerConfig` accepts (dataclass fields in transformers 5, `__init__` args in 4)."""
    if dataclasses.is_dataclass(SegformerConfig):
        names = [f.name for f in dataclasses.fields(SegformerConfig) if not f.name.startswith("_")]
    else:  # pragma: no cover - transformers 4
        names = [n for n in inspect.signature(SegformerConfig.__init__).parameters if n not in ("self", "kwargs")]
    return sorted(set(names))


def segformer_config(
    variant: str,
    num_labels: int,
    id2label: Dict[int, str],
    label2id: Dict[str, int],
    classifier_dropout_prob: float = 0.1,
    **overrides,
) -> SegformerConfig:
    """`SegformerConfig` of MiT `variant` (`mit-b0` .. `mit-b5`) for `num_labels` classes.

    Args:
        variant: key of `MIT_VARIANTS`.
        num_labels, id2label, label2id: the label set (both maps are stored, with int ids).
        classifier_dropout_prob: the decode head's dropout before the classifier (the MC site).
        **overrides: any other `SegformerConfig` field (e.g. `depths=[1, 1, 1, 1]` for tests).
    """
    if variant not in MIT_VARIANTS:
        raise ValueError(f"SegFormer variant {variant!r} is unknown; accepted: {sorted(MIT_VARIANTS)}")
    kwargs = {**MIT_SHARED, **MIT_VARIANTS[variant], **overrides}
    return SegformerConfig(
        num_labels=num_labels,
        id2label=dict(id2label),
        label2id=dict(label2id),
        classifier_dropout_prob=classifier_dropout_prob,
        **kwargs,
    )


def segformer_projections(decode_head) -> torch.nn.ModuleList:
    """Per-stage linear projections of the decode head (`linear_projections` in v5, `linear_c` in v4)."""
    for name in ("linear_projections", "linear_c"):
        if hasattr(decode_head, name):
            return getattr(decode_head, name)
    raise AttributeError(  # pragma: no cover - unknown transformers layout
        f"{type(decode_head).__name__} has neither `linear_projections` nor `linear_c`; unsupported transformers version"
    )


def _encoder_hidden_states(model: SegformerForSemanticSegmentation, pixel_values: torch.Tensor):
    outputs = model.segformer(pixel_values, output_hidden_states=True, return_dict=True)
    return outputs.hidden_states


def segformer_forward_features(
    model: SegformerForSemanticSegmentation,
    pixel_values: torch.Tensor,
    output_hidden_states: bool = False,
) -> SegmentationFeatures:
    """SegFormer up to (not including) the decode head's dropout.

    Equals `SegformerDecodeHead.forward` without its last two lines (`dropout`, `classifier`):
    per-stage linear projection to `decoder_hidden_size`, bilinear upsampling to stage 1
    (align_corners=False), concatenation in reverse stage order, `linear_fuse` (1x1 conv),
    `batch_norm`, `activation` (ReLU).

    Args:
        model: a `SegformerForSemanticSegmentation`.
        pixel_values: `(B, 3, H, W)`.
        output_hidden_states: also return the four encoder stages.

    Returns:
        `SegmentationFeatures` with `head_input` `(B, D, H/4, W/4)` (D = `decoder_hidden_size`),
        `mc_input` (`head_input`, or `pixel_values` when the encoder has MC sites), `aux_logits` None and `backbone_features` = the last encoder stage `(B, C4, H/32, W/32)`.
    """
    head = model.decode_head
    hidden_states = _encoder_hidden_states(model, pixel_values)
    batch_size = hidden_states[-1].shape[0]
    target = hidden_states[0].shape[2:]
    projected = []
    for state, proj in zip(hidden_states, segformer_projections(head)):
        if state.ndim == 3:  # reshape_last_stage=False keeps the last stage as (B, N, C)
            side = int(round(state.shape[1] ** 0.5))
            state = state.reshape(batch_size, side, side, -1).permute(0, 3, 1, 2).contiguous()
        height, width = state.shape[2], state.shape[3]
        x = proj(state)  # (B, h*w, D)
        x = x.transpose(1, 2).reshape(batch_size, -1, height, width)
        projected.append(F.interpolate(x, size=target, mode="bilinear", align_corners=False))
    fused = head.linear_fuse(torch.cat(projected[::-1], dim=1))
    fused = head.activation(head.batch_norm(fused))
    last = hidden_states[-1]
    return SegmentationFeatures(
        head_input=fused,
        mc_input=pixel_values if _has_encoder_sites(model) else fused,
        aux_logits=None,
        backbone_features=last if last.ndim == 4 else None,
        hidden_states=tuple(hidden_states) if output_hidden_states else None,
    )


def _has_encoder_sites(model: SegformerForSemanticSegmentation) -> bool:
    """Whether the encoder's hidden dropouts are MC sites (a config fact: no module walk per forward)."""
    return getattr(model.config, "hidden_dropout_prob", 0.0) > 0


def _encoder_sites(model: SegformerForSemanticSegmentation) -> List[nn.Dropout]:
    if getattr(model.config, "attention_probs_dropout_prob", 0.0):
        raise ValueError(
            f"attention_probs_dropout_prob = {model.config.attention_probs_dropout_prob} is not supported with MC "
            "dropout: transformers' SegFormer applies it inside the attention function, where FOTF cannot draw its "
            "masks; set it to 0 (hidden_dropout_prob > 0 gives encoder MC sites)"
        )
    return [m for m in model.segformer.modules() if isinstance(m, nn.Dropout) and m.p > 0]


def segformer_mc_sites(model: SegformerForSemanticSegmentation) -> List[nn.Dropout]:
    """MC sites in order: the encoder's hidden dropouts with p > 0 (none by default), then the decode
    head's `dropout` before the classifier."""
    return _encoder_sites(model) + [model.decode_head.dropout]


def segformer_forward_from_mc_input(model: SegformerForSemanticSegmentation, mc_input: torch.Tensor) -> torch.Tensor:
    """Re-run from the first MC site: logits `(B, C, H/4, W/4)` from `SegmentationFeatures.mc_input`."""
    head = model.decode_head
    if _has_encoder_sites(model):  # mc_input is pixel_values: the first site is in the encoder
        mc_input = segformer_forward_features(model, mc_input).head_input
    return head.classifier(head.dropout(mc_input))


def segformer_from_pretrained(
    pretrained: str,
    num_labels: int,
    id2label: Dict[int, str],
    label2id: Dict[str, int],
    classifier_dropout_prob: float,
    **config_kwargs,
) -> SegformerForSemanticSegmentation:
    """`SegformerForSemanticSegmentation.from_pretrained` with our label set and MC dropout.

    `ignore_mismatched_sizes=True`: the classifier is re-initialised when the checkpoint has another
    number of classes (e.g. ImageNet `nvidia/mit-b0`, 1000 labels, or an ADE20K model fine-tuned on
    Cityscapes); transformers logs which weights were newly initialised.
    """
    if len(id2label) != num_labels:
        raise ValueError(f"id2label has {len(id2label)} entries but num_labels = {num_labels}")
    # num_labels is implied by id2label; passing it as well makes transformers warn that it disagrees
    # with the *checkpoint's* id2label before our id2label replaces it.
    return SegformerForSemanticSegmentation.from_pretrained(
        pretrained,
        id2label=dict(id2label),
        label2id=dict(label2id),
        classifier_dropout_prob=classifier_dropout_prob,
        ignore_mismatched_sizes=True,
        **config_kwargs,
    )

