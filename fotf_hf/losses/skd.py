"""SKD pairwise distillation.

Liu et al., "Structured Knowledge Distillation for Semantic Segmentation", CVPR 2019.

As CIRKD's `CriterionStructuralKD`, on the head feature `embedding`, student `(B, Ds, h, w)` and
teacher `(B, Dt, h', w')` (resized to `(h, w)`, bilinear, `align_corners=False`, when they differ):

    F = L2-normalise_channels(maxpool_2x2(f))           (B, D, n), n = ceil(h/2) * ceil(w/2)
    S = F^T F                                           (B, n, n), per image
    L = 1/(B n^2) * sum_{b,p,q} (S^s_bpq - S^t_bpq)^2    (term `skd_pairwise`, lambda 10)

`Ds != Dt` is fine (only the similarity maps are compared). Identical features give 0.

SKD's holistic (adversarial, SAGAN discriminator) term is not implemented here. Note that CIRKD's
comparison scripts ran SKD, IFVD and CWD as CE + KD + adversarial (lambda_adv 0.001, lambda_d 0.1)
+ the method; this project's `skd`/`ifvd`/`cwd` methods are CE + KD + the method.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ._feature_utils import fp32_off_autocast, require_field, student_teacher_pair
from .base import LossInputs
from .registry import TermContext, register_method, register_term

__all__ = ["pairwise_similarity_mse", "SKDPairwiseLoss"]


def pairwise_similarity_mse(student: torch.Tensor, teacher: torch.Tensor, pool: int = 2) -> torch.Tensor:
    """SKD pairwise loss on fp32 features of equal spatial size (formula in the module docstring).

    Args:
        student: `(B, Ds, h, w)`; teacher: `(B, Dt, h, w)` (constants).
        pool: max-pool window (`ceil_mode=True`), 2 in SKD/CIRKD; 1 or 0 for none.

    Returns:
        Scalar: mean squared difference of the `(B, n, n)` cosine-similarity maps.
    """
    if pool > 1:
        student = F.max_pool2d(student, pool, pool, ceil_mode=True)
        teacher = F.max_pool2d(teacher, pool, pool, ceil_mode=True)
    fs = F.normalize(student, p=2, dim=1).flatten(2)
    ft = F.normalize(teacher, p=2, dim=1).flatten(2)
    sim_s = fs.transpose(1, 2) @ fs
    sim_t = ft.transpose(1, 2) @ ft
    return (sim_s - sim_t).pow(2).mean()


class SKDPairwiseLoss(nn.Module):
    """SKD pairwise term `skd_pairwise` = `weight * pairwise_similarity_mse(student, teacher)`.

    Args:
        weight: lambda (10 in CIRKD's scripts).
        pool: max-pool window before the similarity maps (2, as SKD/CIRKD).

    Inputs used: `student_embedding`, `teacher_embedding`.
    """

    def __init__(self, weight: float = 10.0, pool: int = 2):
        super().__init__()
        if weight < 0:
            raise ValueError(f"SKDPairwiseLoss weight = {weight} must be >= 0")
        if int(pool) != pool or pool < 0:
            raise ValueError(
                f"SKDPairwiseLoss pool = {pool!r} must be a non-negative integer (0 or 1 = no pooling)"
            )
        self.weight = float(weight)
        self.pool = int(pool)

    def forward(self, inputs: LossInputs) -> Dict[str, torch.Tensor]:
        name = type(self).__name__
        student = require_field(inputs, "student_embedding", name)
        teacher = require_field(inputs, "teacher_embedding", name)
        with fp32_off_autocast(student.device):
            s, t = student_teacher_pair(student, teacher, name, "student_embedding", "teacher_embedding")
            loss = pairwise_similarity_mse(s, t, self.pool)
        return {"skd_pairwise": self.weight * loss}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, pool={self.pool}"


@register_term("skd")
def _skd_term(ctx: TermContext, **kwargs) -> SKDPairwiseLoss:
    return SKDPairwiseLoss(**kwargs)


# The comparison baselines are CE + KD + method, as the CIRKD scripts run them.
register_method("skd", ("ce", "kd", "skd"), summary="+ pairwise similarity (paper's comparison baseline)")
