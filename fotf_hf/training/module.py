"""The trainable part of one distillation step: student + FOTF weighting + criterion.

Wrapping these in one `nn.Module` lets Accelerate (DDP) see every trainable parameter, the
student's and the losses' own (CIRKD's projection head, Af-DCD's projector, CWD's 1x1 conv), in
one forward, and checkpoints their buffers (CIRKD memories) with `save_state`. The frozen teacher
is not part of it: it is passed in, never checkpointed.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import nn

from ..losses.base import LossInputs
from ..models.outputs import SegmentationModelOutput


@dataclass
class StepOutput:
    """What one forward of `DistillationModule` returns.

    Args:
        terms: named, already weighted scalar loss terms (their sum is the loss).
        student: the student's outputs (logits `(B, C, h, w)` ...).
        fotf_stats: 0-dim tensors for logging (`FotfResult.stats`), empty without FOTF.
    """

    terms: Dict[str, torch.Tensor]
    student: SegmentationModelOutput
    fotf_stats: Dict[str, torch.Tensor]


class DistillationModule(nn.Module):
    """`student` (a `SegmentationAdapter`), an optional `FOTF` object and a criterion, composed.

    The forward runs the student once with gradients; FOTF (when configured) draws its T passes
    under `no_grad` from the detached cached features to get the weights (naive student
    sampling, which needs only the pixels, runs before the forward instead); the criterion turns
    the tensors into named loss terms. No formula lives here.
    """

    def __init__(self, student: nn.Module, criterion: nn.Module, fotf: Optional[nn.Module] = None):
        super().__init__()
        self.student = student
        self.criterion = criterion
        self.fotf = fotf

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor,
        teacher_out: Optional[SegmentationModelOutput] = None,
        teacher: Optional[nn.Module] = None,
    ) -> StepOutput:
        result = None
        if self.fotf is not None and not self.fotf.needs_features:
            # naive student sampling: before the graph exists, so the peaks do not add up
            result = self.fotf(self.student, None, pixel_values=pixel_values)
        out = self.student(pixel_values)
        if self.fotf is not None and result is None:
            result = self.fotf(self.student, out, pixel_values=pixel_values, teacher=teacher,
                               teacher_features=teacher_out)
        weights, stats = (None, {}) if result is None else (result.weights, result.stats)
        inputs = LossInputs(
            student_logits=out.logits,
            labels=labels,
            student_aux_logits=out.aux_logits,
            student_embedding=out.embedding,
            student_backbone=out.backbone_features,
            teacher_logits=None if teacher_out is None else teacher_out.logits,
            teacher_embedding=None if teacher_out is None else teacher_out.embedding,
            teacher_backbone=None if teacher_out is None else teacher_out.backbone_features,
            weights=weights,
        )
        return StepOutput(terms=self.criterion(inputs), student=out, fotf_stats=stats)
