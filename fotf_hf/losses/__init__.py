"""Loss modules, and the composition of a method's terms by name.

Each loss module (its own file, its formula in the docstring) registers its term builders and the
methods made of them (`registry.py`: `register_term`, `register_method`); importing this package
imports them all. `build_criterion` looks the method up, builds each term with the defaults of the
paper / the CIRKD and Af-DCD scripts, applies `method.options.<term>` overrides, and returns one
`DistillationCriterion` whose forward returns every named, weighted term. No loop code changes
when a method is added.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

# Imported for their registrations (each registers its terms and methods).
from . import afdcd, ce, cirkd, cwd, ifvd, kd, skd  # noqa: F401
from .base import FotfWeights, LossInputs
from .registry import TermContext, build_term, get_method, method_names, methods_table, register_method, register_term

__all__ = ["FotfWeights", "LossInputs", "DistillationCriterion", "build_criterion", "register_term",
           "register_method", "method_names", "get_method", "methods_table", "TermContext"]


class DistillationCriterion(nn.Module):
    """Sum of named loss modules; `forward(inputs) -> {term: weighted scalar}`."""

    def __init__(self, terms: Dict[str, nn.Module]):
        super().__init__()
        self.terms = nn.ModuleDict(terms)

    def forward(self, inputs: LossInputs) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for module in self.terms.values():
            for name, value in module(inputs).items():
                if name in out:
                    raise RuntimeError(f"two loss modules both return a term named {name!r}")
                out[name] = value
        return out


@torch.no_grad()
def probe_channels(model: nn.Module, size: int = 64) -> Dict[str, int]:
    """Channel counts of a `SegmentationAdapter`'s embedding and backbone output, by one tiny forward."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        out = model(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)
    return {
        "embedding": out.embedding.shape[1],
        "backbone": None if out.backbone_features is None else out.backbone_features.shape[1],
        "classes": out.logits.shape[1],
    }


def build_criterion(method, dataset: str, *, student: nn.Module, teacher: nn.Module | None, num_labels: int) -> DistillationCriterion:
    """Build the criterion of `method` (a `MethodConfig`) for a student/teacher pair.

    `method.options` maps a term name of the method to keyword arguments of its module, e.g.
    `{cirkd_memory: {pixel_memory_size: 2000}}`; unknown term names or arguments are errors.
    """
    names = get_method(method.name).terms
    options = dict(method.options or {})
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(f"method.options has {unknown} but method {method.name!r} has only the terms {list(names)}")
    if get_method(method.name).needs_teacher and teacher is None:
        raise ValueError(f"method {method.name!r} needs a teacher")
    ctx = TermContext(dataset=dataset, num_labels=num_labels,
                      student=probe_channels(student) if student is not None else {},
                      teacher=probe_channels(teacher) if teacher is not None else {}, method=method)
    return DistillationCriterion({name: build_term(name, ctx, options.get(name)) for name in names})
