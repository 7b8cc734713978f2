"""`run.mixed_precision` against the hardware: `auto` picks bf16/fp16/fp32, slow explicit choices warn.

bf16 autocast only pays where the hardware computes bf16: on a CPU without it (e.g. an AVX2-only
AMD EPYC) oneDNN converts every op and a training step runs ~10x slower than in fp32.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from ..config import PRECISIONS

logger = logging.getLogger(__name__)

_X86 = ("x86_64", "amd64", "x86", "i386", "i686")


def _mkldnn_bf16_supported() -> bool:
    # torch's own test: `torch.ops.mkldnn._is_mkldnn_bf16_supported()` (aten/src/ATen/native/mkldnn/
    # Utils.h `mkldnn_bf16_device_check`), what torch._inductor.utils.is_mkldnn_bf16_supported and
    # torch.testing._internal.common_mkldnn use to gate bf16 CPU kernels.
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _cpu_capabilities() -> Dict[str, Any]:
    # `torch.cpu.get_capabilities()` (cpuinfo flags, newer torch); older torch has only the
    # `torch.cpu._is_avx512_bf16_supported` / `_is_amx_tile_supported` helpers.
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        return dict(get())
    caps: Dict[str, Any] = {"architecture": platform.machine().lower()}
    for key, name in (("avx512_bf16", "_is_avx512_bf16_supported"), ("amx_bf16", "_is_amx_tile_supported")):
        probe = getattr(torch.cpu, name, None)
        if probe is not None:
            caps[key] = bool(probe())
    return caps


def cpu_bf16_support() -> Tuple[bool, str]:
    """Whether this CPU computes bf16 natively, and a short note naming what it has.

    True needs torch's oneDNN check (`torch.ops.mkldnn._is_mkldnn_bf16_supported()`) and, on x86,
    also AVX512-BF16 or AMX-BF16: oneDNN's check (ideep `has_bf16_type_support`: ISA >= avx512_core)
    also accepts plain AVX512 cores, where bf16 is emulated and slower than fp32.
    """
    if not _mkldnn_bf16_supported():
        isa = torch.backends.cpu.get_cpu_capability().lower()
        return False, f"{isa} only" if isa not in ("default", "") else "no bf16 in torch's oneDNN check"
    caps = _cpu_capabilities()
    if str(caps.get("architecture", "")).lower() in _X86:
        native = [key for key in ("amx_bf16", "avx512_bf16") if caps.get(key)]
        if not native:
            return False, "avx512 without avx512_bf16/amx_bf16 (bf16 emulated)"
        return True, "/".join(native)
    return True, f"{caps.get('architecture', 'cpu')} bf16"


def resolve_mixed_precision(requested: str, device: torch.device | str,
                            announce: Optional[Callable[[str], None]] = None) -> str:
    """The Accelerate `mixed_precision` to train with on `device` for `run.mixed_precision = requested`.

    `auto`: on CUDA `bf16` if `torch.cuda.is_bf16_supported()` else `fp16`; on a CPU `bf16` only
    where it is native (`cpu_bf16_support`), else `no` (fp32); on other devices `no`. The choice is
    logged at INFO and passed to `announce` (e.g. `PartialState().print`) as one line such as
    "mixed precision: auto -> no (CPU without native bf16: avx2 only)". Explicit `no`/`fp16`/`bf16`
    pass through unchanged; `bf16` on a CPU without native bf16 logs a WARNING (~10x slower).

    Args:
        requested: one of `fotf_hf.config.PRECISIONS`.
        device: the device training runs on (`accelerator.device` / `PartialState().device`).
        announce: optional callable that also receives the `auto` line, for the user to see.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"mixed precision {requested!r} is not valid; "
                         f"choose one of: {', '.join(PRECISIONS)}")
    device_type = torch.device(device).type
    if requested == "auto":
        if device_type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            resolved, why = ("bf16", "CUDA with bf16") if bf16 else ("fp16", "CUDA without bf16")
        elif device_type == "cpu":
            native, note = cpu_bf16_support()
            resolved, why = ("bf16", "CPU with native bf16") if native else ("no", "CPU without native bf16")
            why = f"{why}: {note}"
        else:
            resolved, why = "no", f"{device_type}: fp32 by default; set bf16 or fp16 explicitly to try them"
        message = f"mixed precision: auto -> {resolved} ({why})"
        logger.info(message)
        if announce is not None:
            announce(message)
        return resolved
    if requested == "bf16" and device_type == "cpu":
        native, note = cpu_bf16_support()
        if not native:
            logger.warning(
                "run.mixed_precision = bf16 on a CPU without native bf16 (%s): bf16 autocast is emulated and "
                "~10x slower than fp32 here; use run.mixed_precision auto or no", note,
            )
    return requested


def cpu_simd_flags() -> list:
    """The CPU's SIMD flags that decide fp32/bf16 speed (avx*, amx*, fma; from /proc/cpuinfo, [] elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return sorted(flag for flag in line.split(":", 1)[1].split() if flag.startswith(("avx", "amx", "fma")))


def describe_host() -> str:
    """One line for benchmark and demo reports: CPU model, cores, torch threads, SIMD flags, bf16."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    native, note = cpu_bf16_support()
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"flags {' '.join(cpu_simd_flags()) or 'unknown'}, bf16 {'native' if native else 'not native'} ({note})")
