"""CWD: channel-wise distillation.

Shu et al., "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021.

As CIRKD's `CriterionCWD(norm_type='channel', divergence='kl', temperature=4)`, on either the head
feature `embedding` (term `cwd_feat`, lambda 50) or the logits (term `cwd_logits`, lambda 3):

    x^s <- conv1x1(x^s)   (Cs -> Ct, no bias) when Cs != Ct
    phi(x)_{n,c,i} = softmax_i(x_{n,c,i} / tau)          spatial softmax per channel, i over h*w
    L = tau^2 / (n * Cs) * sum_{n,c,i} phi^t_{n,c,i} (log phi^t_{n,c,i} - log phi^s_{n,c,i}),  tau = 4.

`Cs` is the *student's* channel count, as in CIRKD's code (its `n, c, h, w` are read from the
student input before the 1x1 conv); with `Cs != Ct` the loss is therefore `Ct / Cs` times the mean
per teacher channel, which the published lambda = 50 was tuned with. The teacher map is resized to
the student's `(h, w)` (bilinear, `align_corners=False`) when they differ. Identical inputs give 0.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._feature_utils import fp32_off_autocast, require_field, student_teacher_pair
from .base import LossInputs
from .registry import TermContext, register_method, register_term

__all__ = ["CWD_TARGETS", "channel_wise_kl", "CWDLoss"]

# on -> (student field, teacher field, term name, default weight)
CWD_TARGETS = {
    "embedding": ("student_embedding", "teacher_embedding", "cwd_feat", 50.0),
    "logits": ("student_logits", "teacher_logits", "cwd_logits", 3.0),
}


def channel_wise_kl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0, num_channels: Optional[int] = None
) -> torch.Tensor:
    """Channel-wise spatial-softmax KL (formula in the module docstring), on fp32 maps of one shape.

    Args:
        student: `(B, C, h, w)` student maps (already projected to the teacher's channels).
        teacher: `(B, C, h, w)` teacher maps (constants).
        temperature: tau.
        num_channels: the `C` of the normaliser `n * C` (CIRKD: the student's channel count before
            projection); defaults to `student.shape[1]`.

    Returns:
        Scalar (nats): `tau^2 * sum KL / (B * num_channels)`.
    """
    b, c = student.shape[:2]
    log_ps = F.log_softmax(student.reshape(b, c, -1) / temperature, dim=-1)
    log_pt = F.log_softmax(teacher.reshape(b, c, -1) / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum()
    return kl * temperature**2 / (b * (num_channels or c))


class CWDLoss(nn.Module):
    """Channel-wise distillation on features or logits (formula in the module docstring).

    Args:
        student_channels: Cs (student embedding width, or number of classes for `on="logits"`).
        teacher_channels: Ct; for `on="logits"` it must equal `student_channels`.
        temperature: tau (4).
        weight: lambda; None = 50 for `on="embedding"`, 3 for `on="logits"` (CIRKD's scripts).
        on: "embedding" (term `cwd_feat`) or "logits" (term `cwd_logits`).

    Learnable part: `conv` (1x1, no bias) when Cs != Ct, else identity.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        temperature: float = 4.0,
        weight: Optional[float] = None,
        on: str = "embedding",
    ):
        super().__init__()
        if on not in CWD_TARGETS:
            raise ValueError(f"CWDLoss on = {on!r} is not one of {tuple(CWD_TARGETS)}")
        for arg, value in dict(student_channels=student_channels, teacher_channels=teacher_channels).items():
            if int(value) != value or value < 1:
                raise ValueError(f"CWDLoss {arg} = {value!r} must be a positive integer")
        if on == "logits" and student_channels != teacher_channels:
            raise ValueError(
                f"CWDLoss on logits: student predicts {student_channels} classes but the teacher "
                f"{teacher_channels}; they must share one label set"
            )
        if temperature <= 0:
            raise ValueError(f"CWDLoss temperature = {temperature} must be > 0")
        self.student_field, self.teacher_field, self.term, default_weight = CWD_TARGETS[on]
        weight = default_weight if weight is None else weight
        if weight < 0:
            raise ValueError(f"CWDLoss weight = {weight} must be >= 0")
        self.on = on
        self.student_channels = int(student_channels)
        self.teacher_channels = int(teacher_channels)
        self.temperature = float(temperature)
        self.weight = float(weight)
        if self.student_channels != self.teacher_channels:
            self.conv = nn.Conv2d(self.student_channels, self.teacher_channels, 1, bias=False)
        else:
            self.conv = nn.Identity()

    def forward(self, inputs: LossInputs) -> Dict[str, torch.Tensor]:
        name = f"{type(self).__name__}(on={self.on!r})"
        student = require_field(inputs, self.student_field, name)
        teacher = require_field(inputs, self.teacher_field, name)
        with fp32_off_autocast(student.device):
            s, t = student_teacher_pair(
                student,
                teacher,
                name,
                self.student_field,
                self.teacher_field,
                self.student_channels,
                self.teacher_channels,
            )
            loss = channel_wise_kl(self.conv(s), t, self.temperature, num_channels=self.student_channels)
        return {self.term: self.weight * loss}

    def extra_repr(self) -> str:
        return (
            f"on={self.on!r}, student_channels={self.student_channels}, "
            f"teacher_channels={self.teacher_channels}, "
            f"temperature={self.temperature}, weight={self.weight}"
        )


@register_term("cwd_feat")
def _cwd_feat_term(ctx: TermContext, **kwargs) -> CWDLoss:
    return CWDLoss(ctx.student["embedding"], ctx.teacher["embedding"], **{"weight": 50.0, "on": "embedding", **kwargs})


@register_term("cwd_logits")
def _cwd_logits_term(ctx: TermContext, **kwargs) -> CWDLoss:
    return CWDLoss(ctx.num_labels, ctx.num_labels, **{"weight": 3.0, "on": "logits", **kwargs})


register_method("cwd", ("ce", "kd", "cwd_feat", "cwd_logits"), summary="+ channel-wise distillation (comparison baseline)")
