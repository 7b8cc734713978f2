"""The one input every loss module receives, and the contract loss modules follow.

A loss module is a small `nn.Module` whose `forward(inputs: LossInputs) -> dict[str, Tensor]`
returns named scalar terms, each already multiplied by its weight (lambda). The training loop
sums the terms and logs each one; it never sees a formula. Losses never reach into model
internals: they get tensors only.
"""

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class FotfWeights:
    """FOTF uncertainty weights for one batch (always detached).

    Args:
        kd: weights broadcastable to the student logits `(B, C, h, w)`, for the KD terms, or None.
        ce: weights broadcastable to `(B, C, h, w)` for the task loss (eq. 8), or None.
    """

    kd: Optional[torch.Tensor] = None
    ce: Optional[torch.Tensor] = None


@dataclass
class LossInputs:
    """Tensors of one training step.

    Args:
        student_logits: `(B, C, h, w)` student logits at the student's resolution.
        labels: `(B, H, W)` int64 labels, 255 = ignore.
        student_aux_logits: `(B, C, h, w)` or None.
        student_embedding: `(B, Ds, h, w)` student distillation feature or None.
        student_backbone: `(B, Cs4, h, w)` last student backbone stage or None.
        teacher_logits / teacher_embedding / teacher_backbone: the teacher's counterparts
            (computed without gradient), or None when no teacher is used.
        weights: FOTF weights or None (plain method).
    """

    student_logits: torch.Tensor
    labels: torch.Tensor
    student_aux_logits: Optional[torch.Tensor] = None
    student_embedding: Optional[torch.Tensor] = None
    student_backbone: Optional[torch.Tensor] = None
    teacher_logits: Optional[torch.Tensor] = None
    teacher_embedding: Optional[torch.Tensor] = None
    teacher_backbone: Optional[torch.Tensor] = None
    weights: Optional[FotfWeights] = None
