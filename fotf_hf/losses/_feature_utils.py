"""Input checks and resizing shared by the feature-distillation losses (CIRKD, Af-DCD, SKD, IFVD, CWD).

Conventions every one of those losses follows:
- teacher tensors are constants: they are detached, whatever the caller passes;
- the loss lives at the *student's* spatial size: a teacher map of another size is resized to it
  (bilinear, `align_corners=False`, the convention of transformers' heads and of `kd.py`);
- the arithmetic runs in fp32 with autocast disabled, whatever the input dtype (bf16/fp16 inputs
  are upcast); learnable parts of a loss (projection heads, 1x1 convs) are expected to hold fp32
  parameters, as they do under Accelerate's mixed precision.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .base import LossInputs

__all__ = [
    "require_field",
    "check_feature",
    "student_teacher_pair",
    "resize_labels_nearest",
    "fp32_off_autocast",
]


def require_field(inputs: LossInputs, field: str, method: str) -> torch.Tensor:
    """Return `inputs.<field>` or raise a ValueError naming the missing field and the method."""
    value = getattr(inputs, field)
    if value is None:
        hint = " (is a teacher configured?)" if field.startswith("teacher_") else ""
        if field.endswith("_backbone"):
            hint += " (the model must expose its last backbone stage; SegFormer does not)"
        raise ValueError(f"{method} needs LossInputs.{field}, got None{hint}")
    return value


def check_feature(x: torch.Tensor, name: str, channels: Optional[int], method: str) -> None:
    """Raise ValueError unless `x` is `(B, channels, h, w)` (any channel count when `channels` is None)."""
    if x.dim() != 4:
        raise ValueError(f"{method}: {name} must be (B, C, h, w), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{method}: {name} has {x.shape[1]} channels but the loss was built for {channels}; "
            f"pass the right channel counts to its constructor"
        )


def fp32_off_autocast(device: torch.device):
    """Context manager that disables autocast on `device`'s type (the losses compute in fp32)."""
    return torch.autocast(device_type=device.type, enabled=False)


def student_teacher_pair(
    student: torch.Tensor,
    teacher: torch.Tensor,
    method: str,
    student_name: str,
    teacher_name: str,
    student_channels: Optional[int] = None,
    teacher_channels: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate a student/teacher feature pair and return fp32 copies at the student's size.

    Args:
        student: `(B, Cs, h, w)` student tensor (keeps its gradient).
        teacher: `(B, Ct, h', w')` teacher tensor (detached here).

    Returns:
        `(student fp32 (B, Cs, h, w), teacher fp32 detached (B, Ct, h, w))`; the teacher is resized
        bilinearly (`align_corners=False`) when `(h', w') != (h, w)`. Call inside
        `fp32_off_autocast` so that no later op runs in reduced precision.
    """
    check_feature(student, student_name, student_channels, method)
    check_feature(teacher, teacher_name, teacher_channels, method)
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{method}: {student_name} {tuple(student.shape)} and {teacher_name} {tuple(teacher.shape)} "
            f"differ in batch size"
        )
    s = student.float()
    t = teacher.detach().float()
    if t.shape[-2:] != s.shape[-2:]:
        t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
    return s, t


def resize_labels_nearest(labels: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """`(B, H, W)` int labels -> `(B, h, w)` int64 by nearest-neighbour resizing (CIRKD's convention)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")
    return resized[:, 0].long()
