"""A method defined outside the package, the way a user adds one: one module, registered on import.

`toy`: CE + KD + an L1 pull of the student's logits towards the teacher's (weight 0.5).
"""

import torch
from torch import nn

from fotf_hf.losses import LossInputs, TermContext, register_method, register_term


class ToyL1(nn.Module):
    def __init__(self, weight: float = 0.5):
        super().__init__()
        self.weight = weight

    def forward(self, inputs: LossInputs):
        return {"toy_l1": self.weight * (inputs.student_logits - inputs.teacher_logits).abs().mean()}


@register_term("toy_l1")
def _toy_term(ctx: TermContext, **kwargs) -> ToyL1:
    return ToyL1(**kwargs)


register_method("toy", ("ce", "kd", "toy_l1"), needs_teacher=True, summary="+ L1 to the teacher's logits")
