"""Monte-Carlo dropout passes: what is random, what is not, and where the masks come from.

A model family declares its MC sites: the `nn.Dropout` modules on its main prediction path, in
order (`SegmentationAdapter.mc_dropout_sites`). Inside `mc_dropout_passes` a forward through the
model (or any part of it) is one stochastic pass in the sense of the paper:

- every site drops with a fresh keep-mask `~ Bernoulli(1 - p)` drawn from a `torch.Generator`
  (or takes the next of a given list of masks), in train and in eval mode alike;
- every other stochastic layer (other dropouts such as the auxiliary head's, DropPath) is off;
- BatchNorm keeps its mode (train: batch statistics, as in the main forward) but its running
  statistics are not updated, so evaluation does not depend on how many passes were drawn.

Hooks on the site modules apply the masks, so the same code serves a full forward (`naive`) and
a re-run of the layers after the first site (`exact`): same masks in, same numbers out.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

__all__ = ["mc_dropout_passes", "preserve_batchnorm_stats"]


def _is_stochastic(module: nn.Module) -> bool:
    """Dropout of any kind (`nn.Dropout*`) or stochastic depth (timm's and transformers' `*DropPath`)."""
    return isinstance(module, nn.modules.dropout._DropoutNd) or type(module).__name__.endswith("DropPath")


@contextlib.contextmanager
def preserve_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Forwards inside leave every BatchNorm's running statistics untouched.

    Switching `track_running_stats` off (instead of restoring the buffers afterwards) never writes
    to the buffers in place, which matters because the main forward saved them for its backward.
    In train mode BN still normalises with batch statistics; in eval mode with the running ones.
    """
    switched = [m for m in module.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


@contextlib.contextmanager
def mc_dropout_passes(
    model: nn.Module,
    sites: Sequence[nn.Dropout],
    p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    masks: Optional[Sequence[torch.Tensor]] = None,
) -> Iterator[None]:
    """Make every forward of `model` inside this block one MC-dropout pass (see the module docstring).

    Args:
        model: the whole model (its other stochastic layers are switched off while inside).
        sites: the dropout modules to sample; each call of a site draws one mask.
        p: drop rate for every site; None = each site's own `p`.
        generator: source of the masks (None = torch's global generator of the device).
        masks: optional keep-masks (bool or {0, 1}), one per site call in call order, each of the
            site input's shape; replaces the random draw.
    """
    site_ids = {id(s) for s in sites}
    pending = None if masks is None else list(masks)

    def apply_site(module, inputs, output):
        x = inputs[0]
        rate = module.p if p is None else p
        if pending is not None:
            if not pending:
                raise ValueError(f"masks ran out: the pass called more than the {len(masks)} MC sites given masks")
            keep = pending.pop(0)
            if tuple(keep.shape) != tuple(x.shape):
                raise ValueError(f"mask of shape {tuple(keep.shape)} given for a site whose input is {tuple(x.shape)}")
        elif rate > 0:
            keep = torch.empty(x.shape, device=x.device).bernoulli_(1.0 - rate, generator=generator)
        else:
            return x
        return x * keep.to(x.dtype) / (1.0 - rate)

    changed, handles = [], []
    for module in model.modules():
        if _is_stochastic(module):
            # Sites run as identity plus the hook's mask; every other stochastic layer is off.
            changed.append((module, module.training))
            module.training = False
            if id(module) in site_ids:
                handles.append(module.register_forward_hook(apply_site))
    if len(handles) != len(site_ids):
        raise ValueError("an MC site is not a dropout module of the model")
    try:
        with preserve_batchnorm_stats(model):
            yield
    finally:
        for handle in handles:
            handle.remove()
        for module, training in changed:
            module.training = training
    if pending:
        raise ValueError(f"{len(pending)} of the given masks were not used: the pass called fewer MC sites")
