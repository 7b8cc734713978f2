"""Pixel-wise cross-entropy task loss, optionally FOTF-weighted (paper eq. 8).

    L_CE = 1/|V| * sum_{i in V} w(i, y_i) * (-log q_{i, y_i}),   V = non-ignored label pixels,

with `q = softmax(up(z))`, `up` = bilinear upsampling of the logits to the label size with
`align_corners=True` (CIRKD's `SegCrossEntropyLoss`). The FOTF weights live at the logit
resolution; they are upsampled the same way (bilinear, `align_corners=True`) before `w(i, y_i)` is
read at each pixel's label class. Merged weights (`(B, 1, h, w)`, `(B, C, 1, 1)`, `(B, 1, 1, 1)`)
broadcast along the merged dimensions. With `w = 1` this is `F.cross_entropy(up(z), y,
ignore_index=255)`.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import LossInputs
from .registry import TermContext, register_method, register_term
from .kd import check_weights_shape

__all__ = ["ce_loss", "CELoss", "check_labels"]


def check_labels(labels: torch.Tensor, num_classes: int, ignore_index: int = 255) -> None:
    """Raise ValueError unless `labels` `(B, H, W)` are integers in [0, C) or `ignore_index`."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be (B, H, W), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor (int64), got dtype {labels.dtype}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        values = torch.unique(labels[bad]).tolist()
        raise ValueError(
            f"labels contain values {values[:20]} outside the {num_classes} classes [0, {num_classes - 1}] "
            f"and not the ignore index {ignore_index}; remap them at load time (see fotf_hf.data)"
        )


def ce_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    ignore_index: int = 255,
) -> torch.Tensor:
    """(Uncertainty-weighted) cross-entropy of eq. 8 at the label resolution.

    Args:
        student_logits: `(B, C, h, w)` class scores at the model's resolution.
        labels: `(B, H, W)` int64 class indices; `ignore_index` marks pixels without a label.
        weights: None or FOTF weights broadcastable to `(B, C, h, w)` (constants, no gradient).
        ignore_index: label value excluded from the loss and from the mean (255 in this project).

    Returns:
        Scalar fp32 tensor (nats): mean over non-ignored pixels of `w(i, y_i) * -log q_{i, y_i}`.
        A batch with every pixel ignored gives exactly 0 (still attached to the graph, zero
        gradient), not NaN. Computed in fp32 with autocast disabled.
    """
    if student_logits.dim() != 4:
        raise ValueError(f"ce_loss expects (B, C, h, w) logits, got shape {tuple(student_logits.shape)}")
    num_classes = student_logits.shape[1]
    check_labels(labels, num_classes, ignore_index)
    if labels.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and logits {tuple(student_logits.shape)} differ in batch size"
        )
    if weights is not None:
        check_weights_shape(weights, student_logits)
    size = labels.shape[-2:]
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        logits = student_logits.float()
        if logits.shape[-2:] != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
        labels = labels.long()
        valid = labels != ignore_index
        target = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
        nll = -F.log_softmax(logits, dim=1).gather(1, target).squeeze(1)  # (B, H, W)
        if weights is not None:
            w = weights.detach().float()
            if w.shape[-2:] != (1, 1) and w.shape[-2:] != size:
                w = F.interpolate(w, size=size, mode="bilinear", align_corners=True)
            if w.shape[1] == 1:
                w_y = w[:, 0]
            else:
                # expand is a view: merged (B, C, 1, 1) weights are read at each pixel's class without a copy.
                w_y = w.expand(labels.shape[0], -1, *size).gather(1, target).squeeze(1)
            nll = nll * w_y
        count = valid.sum().clamp_min(1)
        # where (not a product) so that a non-finite value at an ignored pixel cannot leak in.
        return torch.where(valid, nll, torch.zeros_like(nll)).sum() / count


class CELoss(nn.Module):
    """Task loss: `{"ce": ce_loss(logits, labels, inputs.weights.ce), "aux_ce": aux_weight * CE(aux)}`.

    The auxiliary FCN-head term (ResNet students) is never FOTF-weighted: the MC-dropout samples
    come from the main head. It is returned only when `inputs.student_aux_logits` is not None.

    Args:
        aux_weight: weight of the auxiliary CE (0.4 in CIRKD, hard-coded there).
        ignore_index: label value to ignore.
    """

    def __init__(self, aux_weight: float = 0.4, ignore_index: int = 255):
        super().__init__()
        if aux_weight < 0:
            raise ValueError(f"CELoss aux_weight = {aux_weight} must be >= 0")
        self.aux_weight = float(aux_weight)
        self.ignore_index = int(ignore_index)

    def forward(self, inputs: LossInputs) -> Dict[str, torch.Tensor]:
        weights = inputs.weights.ce if inputs.weights is not None else None
        ce = ce_loss(inputs.student_logits, inputs.labels, weights=weights, ignore_index=self.ignore_index)
        out = {"ce": ce}
        if inputs.student_aux_logits is not None:
            aux = ce_loss(inputs.student_aux_logits, inputs.labels, ignore_index=self.ignore_index)
            out["aux_ce"] = self.aux_weight * aux
        return out

    def extra_repr(self) -> str:
        return f"aux_weight={self.aux_weight}, ignore_index={self.ignore_index}"


@register_term("ce")
def _ce_term(ctx: TermContext, **kwargs) -> CELoss:
    return CELoss(**{"aux_weight": ctx.method.aux_weight, **kwargs})


register_method("ce", ("ce",), needs_teacher=False, summary="baseline: CE + 0.4 aux CE")
