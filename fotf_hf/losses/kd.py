"""Pixel-wise logit knowledge distillation, optionally FOTF-weighted (paper eq. 1-3).

    L_KD = T^2 * 1/N * sum_{i} sum_{c} w(i, c) * p^t_{i,c} * (log p^t_{i,c} - log p^s_{i,c}),
    p = softmax(z / T) over classes, N = B*h*w positions at the student's logit resolution.

With `w = 1` this is CIRKD's `CriterionKD` (`F.kl_div(log_softmax(s/T), softmax(t/T),
reduction="batchmean") * T^2` on the `(B*h*w, C)` view): ignore pixels are included, as there.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .base import LossInputs
from .registry import TermContext, register_method, register_term

__all__ = ["kd_loss", "KDLoss", "check_weights_shape"]


def check_weights_shape(weights: torch.Tensor, logits: torch.Tensor, name: str = "weights") -> None:
    """Raise ValueError unless `weights` (4-D) broadcasts to `logits` `(B, C, h, w)` dim by dim."""
    if weights.dim() != 4 or any(ws not in (1, ls) for ws, ls in zip(weights.shape, logits.shape)):
        raise ValueError(
            f"{name} of shape {tuple(weights.shape)} do not broadcast to the student logits "
            f"{tuple(logits.shape)}; expected (B|1, C|1, h|1, w|1), e.g. the output of "
            f"fotf_hf.fotf.uncertainty_weights at the student's logit resolution"
        )


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """(Uncertainty-weighted) pixel-wise KL(teacher || student), eq. 3 of the paper.

    Args:
        student_logits: `(B, C, h, w)` student class scores (gradients flow into them).
        teacher_logits: `(B, C, h', w')` teacher class scores; treated as constants. When
            `(h', w') != (h, w)` the teacher's *logits* are resized to the student's size with
            bilinear interpolation, `align_corners=False` (the convention of transformers'
            segmentation heads), so the loss lives at the student's resolution as in CIRKD.
        weights: None (plain KD) or FOTF weights broadcastable to `(B, C, h, w)`:
            `(B, C, h, w)`, `(B, 1, h, w)`, `(B, C, 1, 1)` or `(B, 1, 1, 1)`; treated as constants.
        temperature: softmax temperature T > 0; the loss is scaled by T^2 (Hinton et al.).

    Returns:
        Scalar fp32 tensor (nats): T^2 * mean over the B*h*w positions of the weighted per-pixel
        KL divergence summed over classes. Computed in fp32 with autocast disabled, whatever the
        input dtype.
    """
    if temperature <= 0:
        raise ValueError(f"temperature = {temperature} must be > 0")
    if student_logits.dim() != 4 or teacher_logits.dim() != 4:
        raise ValueError(
            f"kd_loss expects (B, C, h, w) logits, got student {tuple(student_logits.shape)} and "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            f"differ in batch size or number of classes (dims 0-1); student and teacher must predict "
            f"the same label set"
        )
    if weights is not None:
        check_weights_shape(weights, student_logits)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s = student_logits.float()
        t = teacher_logits.detach().float()
        if t.shape[-2:] != s.shape[-2:]:
            t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
        if temperature != 1.0:
            s = s / temperature
            t = t / temperature
        log_ps = F.log_softmax(s, dim=1)
        log_pt = F.log_softmax(t, dim=1)
        # p_t * (log p_t - log p_s); p_t = exp(log p_t) underflows to 0 (never NaN) for hopeless classes.
        kl = log_pt.exp() * (log_pt - log_ps)
        if weights is not None:
            kl = kl * weights.detach().float()
        num_positions = s.shape[0] * s.shape[2] * s.shape[3]
        return kl.sum() * (temperature**2 / num_positions)


class KDLoss(nn.Module):
    """Logit KD term: `{"kd": weight * kd_loss(student, teacher, inputs.weights.kd, temperature)}`.

    Args:
        weight: lambda_KD (1 in CIRKD's `train_cirkd.py` and in FOTF).
        temperature: KD temperature (1 in CIRKD and FOTF).
    """

    def __init__(self, weight: float = 1.0, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KDLoss temperature = {temperature} must be > 0")
        if weight < 0:
            raise ValueError(f"KDLoss weight = {weight} must be >= 0")
        self.weight = float(weight)
        self.temperature = float(temperature)

    def forward(self, inputs: LossInputs) -> Dict[str, torch.Tensor]:
        if inputs.teacher_logits is None:
            raise ValueError("KDLoss needs LossInputs.teacher_logits, got None (is a teacher configured?)")
        if inputs.student_logits.shape[1] != inputs.teacher_logits.shape[1]:
            raise ValueError(
                f"KDLoss: student predicts {inputs.student_logits.shape[1]} classes but the teacher "
                f"{inputs.teacher_logits.shape[1]}; they must share one label set"
            )
        weights = inputs.weights.kd if inputs.weights is not None else None
        loss = kd_loss(
            inputs.student_logits, inputs.teacher_logits, weights=weights, temperature=self.temperature
        )
        return {"kd": self.weight * loss}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, temperature={self.temperature}"


@register_term("kd")
def _kd_term(ctx: TermContext, **kwargs) -> KDLoss:
    return KDLoss(**{"weight": ctx.method.kd_weight, "temperature": ctx.method.kd_temperature, **kwargs})


register_method("kd", ("ce", "kd"), summary="+ pixel KL")
