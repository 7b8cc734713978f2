"""The fused CPU kernel behind `mc_dropout_linear(..., method="fused")`: build, cache, load, call.

`csrc/mc_dropout_head.c` is plain C (no Python or torch headers), compiled on first use with the
system C compiler (`$CC`, else `cc`/`gcc`/`clang`) in ~0.3 s and loaded with `ctypes`, which
releases the GIL during the call, so the row segments run on `torch.get_num_threads()` Python
threads. The shared object is cached under `$FOTF_HF_CACHE` (default `~/.cache/fotf_hf`), keyed by
the source, the compiler, the flags and the CPU, and written to a temporary name first so a
concurrent or interrupted build never leaves a half-written library behind.

When no compiler works (or `FOTF_HF_NATIVE=0`), `available()` is False and `method="auto"` uses
the pure-torch `sparse` path instead; nothing else changes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Tuple

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "mc_dropout_head.c"
SEGMENT_ROWS = 256  # rows per independent stream; part of the draw definition (see the C source)
_BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-std=c99", "-ffp-contract=fast", "-Werror=implicit-function-declaration"]


def _compilers():
    seen = []
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and cc not in seen and shutil.which(cc.split()[0]):
            seen.append(cc)
    return seen


def _cpu_signature() -> str:
    """What `-march=native` depends on, so a cache shared between machines never runs foreign code."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "model name")):
                    text += line
                    if line.startswith(("flags", "Features")):
                        break
    except OSError:
        pass
    return text


def cache_dir() -> Path:
    return Path(os.environ.get("FOTF_HF_CACHE", Path.home() / ".cache" / "fotf_hf")) / "native"


def _build(cc: str, flags) -> Path:
    source = SOURCE.read_bytes()
    version = subprocess.run(cc.split() + ["--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, cc.encode(), " ".join(flags).encode(), version.encode(),
                                      _cpu_signature().encode()])).hexdigest()[:16]
    target = cache_dir() / f"mc_dropout_head-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run(cc.split() + flags + ["-o", tmp, str(SOURCE), "-lm"], capture_output=True,
                              text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} {' '.join(flags)} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: readers see the old state or the whole library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.lru_cache(maxsize=1)
def _library() -> Tuple[Optional[ctypes.CDLL], str]:
    """(library, why) once per process; library None with the reason when it cannot be had."""
    if os.environ.get("FOTF_HF_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by FOTF_HF_NATIVE=0"
    if sys.platform == "win32":
        return None, "not built on Windows"
    errors = []
    for cc in _compilers():
        # -march=native first (AVX2/AVX-512 class loops); some compilers refuse it (e.g. old Apple clang).
        for flags in (_BASE_FLAGS + ["-march=native"], _BASE_FLAGS):
            try:
                lib = ctypes.CDLL(str(_build(cc, flags)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                errors.append(str(exc))
                continue
            fn = lib.fotf_mc_dropout_head
            P, I64 = ctypes.c_void_p, ctypes.c_int64
            fn.argtypes = [P, P, P, P, P, I64, I64, I64, I64, I64, I64, I64, I64, P, P, I64]
            fn.restype = ctypes.c_int
            return lib, f"{cc} {' '.join(flags)}"
    why = "no working C compiler (set CC)" if not errors else errors[-1]
    logger.info("fotf_hf: fused MC-dropout kernel unavailable (%s); using the torch 'sparse' path", why)
    return None, why


def available() -> bool:
    """Whether the fused kernel could be built and loaded on this machine (cached per process)."""
    return _library()[0] is not None


def unavailable_reason() -> str:
    lib, why = _library()
    return "" if lib is not None else why


@functools.lru_cache(maxsize=4)
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    # keyed by pid: a pool inherited through fork() has no threads behind it
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fotf-mc")


def padded_classes(num_classes: int) -> int:
    """Class count rounded up to a multiple of 8: the kernel's vector width for the class loops."""
    return (num_classes + 7) // 8 * 8


@torch.no_grad()
def mc_dropout_head(
    x: torch.Tensor,
    w_t: torch.Tensor,
    base: torch.Tensor,
    table: torch.Tensor,
    seeds: torch.Tensor,
    want_logits: bool,
    want_sigma: bool,
    correction: int = 1,
):
    """Run the kernel over all rows.

    Args:
        x: `(N, D)` fp32 contiguous pixel-major features.
        w_t: `(D, CP)` fp32 contiguous, `W^T / (1 - p)` with zero columns from C to CP.
        base: `(N, C)` fp32 contiguous no-drop logits `x W^T / (1 - p) + b`.
        table: `(2**16,)` int32 geometric inverse-CDF table (`_geometric_table(p)`).
        seeds: `(T,)` int64, one per sample (drawn from the caller's torch generator).
        want_logits, want_sigma: which outputs to produce.
        correction: degrees-of-freedom correction of the std.

    Returns:
        `(logits (T, N, C) or None, sigma (N, C) or None)`, fp32.
    """
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the fused MC-dropout kernel is unavailable: {why}")
    N, D = x.shape
    C = base.shape[1]
    CP = w_t.shape[1]
    T = seeds.numel()
    for name, t, shape in (("x", x, (N, D)), ("w_t", w_t, (D, CP)), ("base", base, (N, C))):
        if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != shape or t.device.type != "cpu":
            raise ValueError(f"{name} must be a contiguous fp32 CPU tensor of shape {shape}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if table.dtype != torch.int32 or table.numel() != 2**16 or seeds.dtype != torch.int64:
        raise ValueError("table must be int32 (2**16,) and seeds int64")
    seeds = seeds.contiguous()
    logits = torch.empty(T, N, C) if want_logits else None
    sigma = torch.empty(N, C) if want_sigma else None
    segments = (N + SEGMENT_ROWS - 1) // SEGMENT_ROWS
    workers = max(1, min(torch.get_num_threads(), segments))
    bounds = [segments * k // workers for k in range(workers + 1)]

    def call(k: int) -> int:
        return lib.fotf_mc_dropout_head(
            x.data_ptr(), w_t.data_ptr(), base.data_ptr(), table.data_ptr(), seeds.data_ptr(), T, N, D, C, CP,
            SEGMENT_ROWS, bounds[k], bounds[k + 1], logits.data_ptr() if logits is not None else None,
            sigma.data_ptr() if sigma is not None else None, correction,
        )

    codes = [call(0)] if workers == 1 else list(_pool(workers, os.getpid()).map(call, range(workers)))
    if any(codes):
        raise RuntimeError(f"fused MC-dropout kernel failed with codes {codes} (1 = out of memory, 2 = bad sizes)")
    return logits, sigma
