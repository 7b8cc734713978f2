"""Cross-process helpers for the loss modules.

Losses gather across processes only when a process group exists: a single-device run (CPU, one
GPU, `accelerate launch` with one process) never touches `torch.distributed`, which is what made
CIRKD's own memory loss crash on one device (CIRKD issue #18).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "gather_across_processes"]


def is_distributed() -> bool:
    """True when `torch.distributed` is available, initialised and has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes of the default group (1 when no process group exists)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_across_processes(tensor: torch.Tensor, keep_local_grad: bool = False) -> torch.Tensor:
    """Concatenate `tensor` from all processes along dim 0, in rank order.

    Args:
        tensor: `(N, ...)` tensor; every process must pass the same shape and dtype (the usual
            case: the per-process batch).
        keep_local_grad: when True, this process's own slice of the result is `tensor` itself, so
            gradients flow back into it; the other ranks' slices are constants (all_gather has no
            gradient). When False the whole result is detached.

    Returns:
        `(world_size * N, ...)` tensor, or `tensor` unchanged (same object) when no process group is
        initialised or the world size is 1.
    """
    if not is_distributed():
        return tensor
    local = tensor.detach().contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    if keep_local_grad:
        parts[dist.get_rank()] = tensor
    return torch.cat(parts, dim=0)
