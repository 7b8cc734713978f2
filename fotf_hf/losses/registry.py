"""The method registry: each loss module declares its terms and the methods built from them.

A **term** is one loss module (e.g. `kd`: the pixel KL of eq. 3); its builder turns the run's
context (`TermContext`: dataset, channel counts, the method config) and `method.options.<term>`
keyword arguments into the module. A **method** is a named list of terms plus what it needs.

    @register_term("toy")
    def _toy(ctx: TermContext, **kwargs) -> nn.Module:
        return ToyLoss(**kwargs)

    register_method("toy", terms=("ce", "toy"), needs_teacher=True, summary="+ my loss")

Adding a method is one module that does this (imported before the config is validated) plus a
YAML with `method: {name: toy}`. `config.py` validates `method.name` against `method_names()`,
`scripts/distill.py --help` lists them, and `build_criterion` composes the terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from torch import nn

__all__ = ["Method", "TermContext", "register_term", "register_method", "method_names", "get_method", "build_term",
           "methods_table"]


@dataclass(frozen=True)
class TermContext:
    """What a term builder may use. `student` / `teacher`: `{"embedding": D, "backbone": D or None,
    "classes": C}` channel counts of each model (empty for a missing teacher); `method`: the run's
    `MethodConfig` (`kd_weight`, `kd_temperature`, `aux_weight`, ...)."""

    dataset: str
    num_labels: int
    student: Dict[str, Any]
    teacher: Dict[str, Any]
    method: Any


@dataclass(frozen=True)
class Method:
    """A registered method: its loss terms, in order, and whether it distils from a teacher."""

    name: str
    terms: Tuple[str, ...]
    needs_teacher: bool
    summary: str


_TERMS: Dict[str, Callable[..., nn.Module]] = {}
_METHODS: Dict[str, Method] = {}


def register_term(name: str) -> Callable:
    """Decorator: `builder(ctx: TermContext, **options) -> nn.Module` becomes term `name`."""

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _TERMS and _TERMS[name] is not builder:
            raise ValueError(f"loss term {name!r} is registered twice")
        _TERMS[name] = builder
        return builder

    return decorate


def register_method(name: str, terms, needs_teacher: bool = True, summary: str = "") -> Method:
    """Declare method `name` as the sum of `terms` (registered term names)."""
    method = Method(name, tuple(terms), bool(needs_teacher), summary)
    if name in _METHODS and _METHODS[name] != method:
        raise ValueError(f"method {name!r} is registered twice with different terms")
    _METHODS[name] = method
    return method


def _ordered():
    # Teacher-free methods first, then by name: a stable order whatever the import order.
    return sorted(_METHODS.values(), key=lambda m: (m.needs_teacher, m.name))


def method_names() -> Tuple[str, ...]:
    """Names of every registered method (teacher-free first, then alphabetical)."""
    return tuple(m.name for m in _ordered())


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(_METHODS)}")
    return _METHODS[name]


def build_term(name: str, ctx: TermContext, options: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Term `name`'s module for this run, with `method.options.<name>` keyword arguments."""
    if name not in _TERMS:
        raise ValueError(f"loss term {name!r} is not registered (registered: {', '.join(_TERMS)})")
    try:
        return _TERMS[name](ctx, **dict(options or {}))
    except TypeError as err:
        raise ValueError(f"method.options.{name} = {dict(options or {})} does not fit its loss module: {err}") from None


def methods_table() -> str:
    """Markdown table of the registered methods (for docs and `--help`)."""
    rows = ["| name | terms | teacher | what it adds |", "| --- | --- | --- | --- |"]
    rows += [f"| `{m.name}` | {' + '.join(m.terms)} | {'yes' if m.needs_teacher else 'no'} | {m.summary} |"
             for m in _ordered()]
    return "\n".join(rows)
