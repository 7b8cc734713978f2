"""IFVD: intra-class feature variation distillation (Wang et al., ECCV 2020).

As CIRKD's `CriterionIFV`, on the head feature `embedding`, student `(B, Ds, h, w)` and teacher
`(B, Dt, h', w')` (resized to `(h, w)`, bilinear, `align_corners=False`, when they differ), with the
labels `(B, H, W)` resized to `(h, w)` by nearest neighbour:

    proto_{b,k} = sum_{p: y_bp = k} f_bp / (|{p: y_bp = k}| + 1e-6)       per image b, class k
    c_bp = proto_{b, y_bp}  if y_bp != ignore,  else f_bp                 (ignore: cos = 1)
    v_bp = cos(f_bp, c_bp)                                                 for student and teacher
    L = 1/(B h w) * sum_{b,p} (v^s_bp - v^t_bp)^2                          (term `ifvd`, lambda 20)

Prototypes are computed per side (student prototypes from student features, teacher from teacher),
so `Ds != Dt` is fine; gradients reach the student through both `f` and its prototypes, as in
CIRKD. The cosine uses `torch.nn.functional.cosine_similarity` (eps 1e-8), like CIRKD.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ._feature_utils import fp32_off_autocast, require_field, resize_labels_nearest, student_teacher_pair
from .base import LossInputs
from .registry import TermContext, register_method, register_term
from .ce import check_labels

__all__ = ["prototype_cosine", "IFVDLoss"]


def prototype_cosine(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Cosine between every pixel's feature and its class prototype in the same image.

    Args:
        features: `(B, D, h, w)` fp32 features.
        labels: `(B, h, w)` int64 labels at the feature size.
        num_classes: K.
        ignore_index: label without a class; such pixels are their own centre (cosine 1, or 0 for a
            zero feature vector).

    Returns:
        `(B, h, w)` cosine similarities.
    """
    b, d, h, w = features.shape
    flat = features.reshape(b, d, h * w)
    lab = labels.reshape(b, h * w)
    valid = lab != ignore_index
    onehot = F.one_hot(torch.where(valid, lab, torch.zeros_like(lab)), num_classes).float()
    onehot = onehot * valid[..., None].float()  # (B, hw, K)
    sums = flat @ onehot  # (B, D, K)
    protos = sums / (onehot.sum(dim=1)[:, None, :] + 1e-6)
    centres = protos @ onehot.transpose(1, 2)  # (B, D, hw): a pixel's class prototype, 0 when ignored
    centres = torch.where(valid[:, None, :], centres, flat)
    return F.cosine_similarity(flat, centres, dim=1).reshape(b, h, w)


class IFVDLoss(nn.Module):
    """IFVD term `ifvd` = `weight * MSE(cos^s, cos^t)` (formula in the module docstring).

    Args:
        num_classes: K.
        weight: lambda (20 in CIRKD's scripts).
        ignore_index: label without a class (255).

    Inputs used: `student_embedding`, `teacher_embedding`, `labels`.
    """

    def __init__(self, num_classes: int, weight: float = 20.0, ignore_index: int = 255):
        super().__init__()
        if int(num_classes) != num_classes or num_classes < 1:
            raise ValueError(f"IFVDLoss num_classes = {num_classes!r} must be a positive integer")
        if weight < 0:
            raise ValueError(f"IFVDLoss weight = {weight} must be >= 0")
        self.num_classes = int(num_classes)
        self.weight = float(weight)
        self.ignore_index = int(ignore_index)

    def forward(self, inputs: LossInputs) -> Dict[str, torch.Tensor]:
        name = type(self).__name__
        student = require_field(inputs, "student_embedding", name)
        teacher = require_field(inputs, "teacher_embedding", name)
        check_labels(inputs.labels, self.num_classes, self.ignore_index)
        with fp32_off_autocast(student.device):
            s, t = student_teacher_pair(student, teacher, name, "student_embedding", "teacher_embedding")
            if inputs.labels.shape[0] != s.shape[0]:
                raise ValueError(
                    f"{name}: labels {tuple(inputs.labels.shape)} and student_embedding {tuple(s.shape)} "
                    f"differ in batch size"
                )
            labels = resize_labels_nearest(inputs.labels, s.shape[-2:])
            cos_s = prototype_cosine(s, labels, self.num_classes, self.ignore_index)
            cos_t = prototype_cosine(t, labels, self.num_classes, self.ignore_index)
            loss = (cos_s - cos_t).pow(2).mean()
        return {"ifvd": self.weight * loss}

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, weight={self.weight}, ignore_index={self.ignore_index}"


@register_term("ifvd")
def _ifvd_term(ctx: TermContext, **kwargs) -> IFVDLoss:
    return IFVDLoss(ctx.num_labels, **kwargs)


register_method("ifvd", ("ce", "kd", "ifvd"), summary="+ intra-class feature variation (comparison baseline)")
