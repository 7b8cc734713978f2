"""Focus on the Fog: student MC-dropout uncertainty and the weights it induces (paper eq. 4-8).

Pipeline of one training step (all under `torch.no_grad()`, weights are constants for the loss):

    head_input (B, D, h, w) --T x dropout->classifier--> logits (T, B, C, h, w)
        --softmax over C (fp32)--> q (T, B, C, h, w)
        --std over T (eq. 6)--> sigma (B, C, h, w)
        --merge (mean over classes and/or pixels)--> sigma' --f (eq. 7)--> w >= 1

`mc_dropout_probs` draws the T samples, `predictive_std` is eq. 6, `uncertainty_weights` is the
merge + eq. 7, and `FOTF` is the per-step object the training loop calls; it returns
`FotfWeights` for the KD (eq. 3) and/or CE (eq. 8) terms plus logging summaries.

Two sampling modes: `head` resamples only the head's last dropout + classifier on the cached
`head_input` (one trunk pass; the cheap mode) and `naive` runs T full forwards (the paper's
profiled implementation, Table 6). They draw from the same distribution when everything before
the MC site is deterministic.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _mc_kernel
from .losses.base import FotfWeights

__all__ = [
    "WEIGHTINGS",
    "MERGES",
    "APPLY_TO",
    "MODES",
    "SOURCES",
    "FotfResult",
    "FOTF",
    "dropout_keep_mask",
    "bernoulli_positions",
    "mc_dropout_linear",
    "mc_dropout_linear_std",
    "mc_dropout_std",
    "mc_dropout_logits",
    "mc_dropout_probs",
    "predictive_std",
    "merge_sigma",
    "uncertainty_weights",
]

WEIGHTINGS = ("power", "exp")
MERGES = ("none", "pixel", "channel", "sample")
APPLY_TO = ("kd", "ce", "both")
MODES = ("head", "naive")
SOURCES = ("student", "teacher")

# Dimensions of sigma (B, C, h, w) averaged by each merge; the name is what remains.
_MERGE_DIMS = {"none": None, "pixel": (1,), "channel": (2, 3), "sample": (1, 2, 3)}


def _check_choice(value, choices, name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} = {value!r} is not one of {list(choices)}")


def _check_positive(value, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} = {value!r} must be a finite number > 0")


def _check_num_samples(num_samples) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(
            f"num_samples = {num_samples!r} must be an integer >= 2: the standard deviation over "
            f"Monte-Carlo samples (eq. 6) is undefined for fewer than two"
        )


def _check_p(p) -> None:
    if p is not None and not (isinstance(p, (int, float)) and 0.0 < p < 1.0):
        raise ValueError(
            f"dropout probability p = {p!r} must be in the open interval (0, 1), or None for the model's own"
        )


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


_MASK_BITS = 16


def _random_words(count: int, generator, device) -> torch.Tensor:
    """`count` int64 words with all 64 bits i.i.d. uniform (the full signed range), from `generator`."""
    return torch.empty(count, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)


def dropout_keep_mask(
    shape,
    p: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """I.i.d. Bernoulli(1 - p) keep-mask (bool) of `shape`, drawn ~10x faster than `torch.rand(shape) >= p`.

    Why: on the CPU `torch.rand` / `F.dropout` cost ~5 ns per element, and the MC masks of
    SegFormer's head (T x B x 256 x H/4 x W/4) are the largest tensor FOTF touches. Here every
    64-bit random word gives four independent uniform 16-bit integers, compared with an integer
    threshold, so the drop probability is `round(p * 2**16) / 2**16` (within 7.7e-6 of p).

    Args:
        shape: mask shape, e.g. `(T, B, D, h, w)`.
        p: drop probability in [0, 1).
        generator: RNG (None = the global one of `device`).
        device: where to create the mask (default: the generator's device, else CPU).

    Returns:
        bool tensor of `shape`, True = keep.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"drop probability p = {p!r} must be in [0, 1)")
    if device is None and generator is not None:
        device = generator.device
    numel = math.prod(shape)
    words = _random_words((numel + 3) // 4, generator, device)
    uniform16 = words.view(torch.int16)[:numel].view(tuple(shape))  # uniform on [-2^15, 2^15)
    threshold = round(p * 2**_MASK_BITS) - 2 ** (_MASK_BITS - 1)
    return uniform16 >= threshold


@functools.lru_cache(maxsize=16)
def _geometric_table(p: float, device: torch.device) -> torch.Tensor:
    """Inverse CDF of Geometric(p) on {1, 2, ...} at the 2**16 points `u_k = (k + 1/2) / 2**16`.

    `table[k] = 1 + floor(log(u_k) / log(1 - p))` (float64), so for a uniform 16-bit k,
    `P(table[k] > j) = floor(2**16 (1 - p)**j + 1/2) / 2**16`: every tail probability of the gap is
    exact up to rounding to the nearest multiple of 2**-16 (the resolution of `dropout_keep_mask`),
    and the largest gap is `table[0]` (112 at p = 0.1). int32, 256 KiB: one gather per gap
    replaces a float conversion, a log and a rounding.
    """
    u = (torch.arange(2**_MASK_BITS, dtype=torch.float64) + 0.5) / 2**_MASK_BITS
    table = torch.log(u).div_(math.log1p(-p)).floor_().add_(1)
    return table.to(device=device, dtype=torch.int32)


def _geometric_gaps(count: int, p: float, generator, device) -> torch.Tensor:
    """`count` i.i.d. Geometric(p) variates (trials up to and including a success), int32."""
    words = _random_words((count + 3) // 4, generator, device)
    k = words.view(torch.uint16)[:count].int()  # four uniform 16-bit indices per word
    return _geometric_table(float(p), k.device).index_select(0, k)


def bernoulli_positions(
    numel: int,
    p: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Sorted flat indices of the successes of `numel` i.i.d. Bernoulli(p) trials.

    Equivalent in distribution to `torch.nonzero(torch.rand(numel) < p)` (up to the 2**-16
    resolution of `_geometric_table`) but draws 16 random bits per success (~p * numel) instead
    of one number per trial: the gaps between successes of a Bernoulli process are i.i.d.
    Geometric(p). int32 when the positions fit, else int64.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p = {p!r} must be in (0, 1)")
    if device is None and generator is not None:
        device = generator.device
    max_gap = int(_geometric_table(float(p), torch.device(device or "cpu"))[0])
    mean = numel * p
    # ~6 standard deviations of the success count: one round almost always suffices.
    count = int(mean + 6.0 * math.sqrt(mean * (1.0 - p)) + 16)
    # The first round's cumulative sum stays below count * max_gap; the rare extra rounds run in
    # int64 and are cast back once cut below numel.
    dtype = torch.int32 if count * max_gap < 2**31 and numel < 2**31 else torch.int64
    chunks, start = [], 0
    while True:
        pos = torch.cumsum(_geometric_gaps(count, p, generator, device), 0, dtype=dtype if not chunks else torch.int64)
        pos.add_(start - 1)
        chunks.append(pos)
        last = int(pos[-1])
        if last >= numel:
            break
        start, count = last + 1, int((numel - last) * p * 1.5) + 16
    pos = chunks[0] if len(chunks) == 1 else torch.cat([c.long() for c in chunks])
    end = int(torch.searchsorted(pos, torch.tensor([numel], dtype=pos.dtype, device=pos.device)))
    return pos[:end].to(dtype)


MC_LINEAR_METHODS = ("auto", "fused", "sparse", "dense")


@torch.no_grad()
def mc_dropout_linear(
    head_input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    num_samples: int = 5,
    p: float = 0.1,
    masks: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    method: str = "auto",
) -> torch.Tensor:
    """T samples of `classifier(dropout(head_input))` for a 1x1-conv classifier, without gradient.

    This is the head-only MC-dropout hot path (every model family here ends in element-wise
    `nn.Dropout(p)` -> 1x1 conv). `logits_t = W (m_t * x) / (1 - p) + b` with i.i.d. keep-masks
    `m_t ~ Bernoulli(1 - p)` of shape `(B, D, h, w)`, one per sample.

    Methods:
        - `fused` (CPU): one C kernel (`fotf_hf/csrc/mc_dropout_head.c`, built on first use with the
          system compiler and cached; see `fotf_hf._mc_kernel`) walks the dropped positions of each
          256-row segment as a Bernoulli process, subtracts their contributions from `W x` and, for
          `mc_dropout_linear_std`, folds the softmax into the sums of eq. 6, per segment while its
          features are in cache. Each sample's drops come from a splitmix64 stream seeded by one
          int64 drawn from `generator`; the streams differ from the torch paths', the distribution
          is the same. 2.5x faster than `sparse` for SegFormer-B0's head at T = 20
          (`benchmarks/mc_head_kernel.py`).
        - `dense`: draws `(T, B, D, h, w)` masks with `dropout_keep_mask`, one GEMM over T*B*h*w rows.
        - `sparse`: `W (m * x) = W x - W ((1 - m) * x)`: one GEMM for `W x`, and the ~p*D dropped
          channels per pixel, sampled directly as a Bernoulli process (`bernoulli_positions`), are
          subtracted with `F.embedding_bag`. Same distribution, ~1/p less randomness and memory
          traffic; ~4x faster than `dense` and ~10x faster than `F.dropout` + conv on the CPU for
          SegFormer-B0's head.
        - `auto`: `fused` on the CPU when the kernel is available (a C compiler is found; else
          `sparse`), `dense` elsewhere (GPUs generate masks cheaply; `sparse` would synchronise
          the device once per sample).
        Given `masks`, the computation is `dense` with those masks.

    Args:
        head_input: `(B, D, h, w)` features entering the dropout.
        weight: classifier weight `(C, D, 1, 1)` or `(C, D)`.
        bias: `(C,)` or None.
        num_samples: T >= 1.
        p: drop probability in (0, 1).
        masks: optional `(T, B, D, h, w)` keep-masks (bool or {0, 1}).
        generator: RNG for the masks (None = global RNG).
        method: one of `MC_LINEAR_METHODS`.

    Returns:
        `(T, B, C, h, w)` fp32 logits (a permuted view of a `(T, B, h, w, C)` buffer).
    """
    _check_mc_linear_args(head_input, weight, num_samples, p, masks, method)
    B, D, h, w = head_input.shape
    C = weight.shape[0]
    resolved = "dense" if masks is not None else _resolve_method(method, head_input.device)
    with torch.autocast(device_type=head_input.device.type, enabled=False):
        x, w_t, b = _pixel_major(head_input, weight, bias, p)
        if resolved == "fused":
            out, _ = _fused(x, w_t, b, num_samples, p, generator, want_logits=True)
        elif resolved == "dense":
            if masks is None:
                keep = dropout_keep_mask((num_samples, B * h * w, D), p, generator=generator, device=x.device)
            else:
                keep = masks.permute(0, 1, 3, 4, 2).reshape(num_samples, B * h * w, D).bool()
            rows = torch.where(keep, x, x.new_zeros(())).reshape(-1, D)
            out = rows @ w_t if b is None else torch.addmm(b, rows, w_t)
        else:
            out = torch.stack(list(_sparse_samples(x, w_t, b, num_samples, p, generator)))
        return out.reshape(num_samples, B, h, w, C).permute(0, 1, 4, 2, 3)


@torch.no_grad()
def mc_dropout_linear_std(
    head_input: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    num_samples: int = 5,
    p: float = 0.1,
    generator: Optional[torch.Generator] = None,
    method: str = "auto",
    correction: int = 1,
) -> torch.Tensor:
    """Eq. 6 straight from the head: std over T samples of `softmax(classifier(dropout(head_input)))`.

    Equals `predictive_std(softmax(mc_dropout_linear(...), dim=2), correction)` for the same draws
    (the `fused` and `sparse` paths consume the generator exactly as `mc_dropout_linear` does with
    the same method). On both the T samples are streamed: each sample is softmaxed and folded into
    the running sums of `q_t - q_1` (the shifted sums of `predictive_std`) while it is in cache, so
    the `(T, B, C, h, w)` logits and probabilities (16 MB each for SegFormer-B0's head at T = 20) are
    never stored; `fused` does it per 256-row segment inside the C kernel.

    Args:
        head_input: `(B, D, h, w)` features entering the dropout.
        weight: classifier weight `(C, D, 1, 1)` or `(C, D)`.
        bias: `(C,)` or None.
        num_samples: T >= 2.
        p: drop probability in (0, 1).
        generator: RNG for the drops (None = global RNG).
        method: one of `MC_LINEAR_METHODS` (see `mc_dropout_linear`).
        correction: as in `predictive_std` (1 = Bessel).

    Returns:
        sigma `(B, C, h, w)` fp32, >= 0.
    """
    _check_num_samples(num_samples)
    _check_mc_linear_args(head_input, weight, num_samples, p, None, method)
    _check_correction(correction, num_samples)
    resolved = _resolve_method(method, head_input.device)
    if resolved == "dense":
        logits = mc_dropout_linear(head_input, weight, bias, num_samples, p, generator=generator, method="dense")
        return predictive_std(_softmax_fp32(logits), correction=correction)
    B, D, h, w = head_input.shape
    with torch.autocast(device_type=head_input.device.type, enabled=False):
        x, w_t, b = _pixel_major(head_input, weight, bias, p)
        if resolved == "fused":
            _, sigma = _fused(x, w_t, b, num_samples, p, generator, want_sigma=True, correction=correction)
            return sigma.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()
        first = s1 = s2 = None
        for logits in _sparse_samples(x, w_t, b, num_samples, p, generator):
            q = torch.softmax(logits, dim=-1)  # (B*h*w, C), classes contiguous
            if first is None:
                first, s1, s2 = q, torch.zeros_like(q), torch.zeros_like(q)
                continue
            d = q.sub_(first)
            s1 += d
            s2.addcmul_(d, d)
        sigma = _shifted_std(s1, s2, num_samples, correction)  # (B*h*w, C)
        return sigma.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()


def _check_mc_linear_args(head_input, weight, num_samples, p, masks, method) -> None:
    _check_choice(method, MC_LINEAR_METHODS, "method")
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability p = {p!r} must be in (0, 1)")
    if head_input.dim() != 4:
        raise ValueError(f"head_input must be (B, D, h, w), got shape {tuple(head_input.shape)}")
    B, D, h, w = head_input.shape
    C = weight.shape[0]
    if weight.reshape(C, -1).shape[1] != D:
        raise ValueError(f"classifier weight {tuple(weight.shape)} does not take {D} input channels")
    if masks is not None and tuple(masks.shape) != (num_samples, B, D, h, w):
        raise ValueError(f"masks must be (T, B, D, h, w) = {(num_samples, B, D, h, w)}, got {tuple(masks.shape)}")


def _resolve_method(method: str, device: torch.device) -> str:
    if method == "auto":
        if device.type != "cpu":
            return "dense"
        return "fused" if _mc_kernel.available() else "sparse"
    if method == "fused":
        if device.type != "cpu":
            raise ValueError(f"method='fused' runs on the CPU only, got a tensor on {device}; use 'auto' or 'dense'")
        if not _mc_kernel.available():
            raise RuntimeError(
                f"method='fused' needs the C kernel, which is unavailable here ({_mc_kernel.unavailable_reason()}); "
                f"install a C compiler (or set CC), or use method='sparse' (same distribution, pure torch)"
            )
    return method


def _pixel_major(head_input, weight, bias, p):
    """fp32 `x (B*h*w, D)` (pixel-major rows: the classifier is one GEMM and a pixel's channels
    are contiguous), `w_t (D, C)` with the 1/(1-p) dropout scale folded in, and `b (C,)` or None."""
    B, D, h, w = head_input.shape
    C = weight.shape[0]
    x = head_input.detach().float().permute(0, 2, 3, 1).reshape(B * h * w, D)
    w_t = (weight.detach().float().reshape(C, D).t() * (1.0 / (1.0 - p))).contiguous()
    b = None if bias is None else bias.detach().float()
    return x, w_t, b


def _fused(x, w_t, b, num_samples, p, generator, want_logits=False, want_sigma=False, correction=1):
    """The `fused` kernel on pixel-major `x (N, D)`: `(logits (T, N, C) or None, sigma (N, C) or None)`."""
    D, C = w_t.shape
    w_pad = x.new_zeros(D, _mc_kernel.padded_classes(C))
    w_pad[:, :C] = w_t
    base = x @ w_t if b is None else torch.addmm(b, x, w_t)  # (N, C): the no-drop logits
    seeds = _random_words(num_samples, generator, x.device)  # one 64-bit stream seed per sample
    return _mc_kernel.mc_dropout_head(
        x.contiguous(), w_pad, base, _geometric_table(float(p), x.device), seeds,
        want_logits=want_logits, want_sigma=want_sigma, correction=correction,
    )


def _sparse_samples(x, w_t, b, num_samples, p, generator):
    """Yield T `sparse`-path logits `(N, C)` for pixel-major `x (N, D)`: `W x` minus the dropped channels.

    One `bernoulli_positions(N * D, p, generator)` call per sample, in order (tests replay the draws
    this way). Each yielded tensor is a fresh buffer the caller may modify.
    """
    N, D = x.shape
    base = x @ w_t if b is None else torch.addmm(b, x, w_t)  # (N, C): the no-drop logits
    flat_x = x.reshape(-1)
    numel = N * D
    row_starts = None
    for _ in range(num_samples):
        # Per sample, not batched: the index arrays then stay in cache (batching all T was slower).
        dropped = bernoulli_positions(numel, p, generator=generator, device=x.device)
        if row_starts is None:
            row_starts = torch.arange(0, numel, D, dtype=dropped.dtype, device=x.device)
        # bitwise and instead of an integer division when D is a power of two (128/256/512)
        channel = dropped & (D - 1) if D & (D - 1) == 0 else dropped % D
        # Offsets in the indices' dtype: embedding_bag promotes mixed int32/int64 index and offset
        # tensors to int64, which copied every sample's indices (~5% of a SegFormer-B0 KD step at T = 20).
        offsets = torch.searchsorted(dropped, row_starts, out_int32=dropped.dtype == torch.int32)
        correction = F.embedding_bag(
            channel, w_t, offsets, mode="sum", per_sample_weights=flat_x.index_select(0, dropped),
        )
        yield torch.sub(base, correction, out=correction)


def _dropout_p(model, p: Optional[float]) -> float:
    """The dropout probability the MC passes will use; errors when the model has no active site."""
    if not hasattr(model, "sample_logits") or not hasattr(model, "sample_logits_naive"):
        raise ValueError(
            f"{type(model).__name__} has no Monte-Carlo dropout site (no sample_logits / "
            f"sample_logits_naive); wrap the model in fotf_hf.models.SegmentationStudent"
        )
    own = getattr(model, "mc_dropout_p", None)
    eff = own if p is None else p
    if eff is None or not eff > 0:
        raise ValueError(
            f"{type(model).__name__} has no active dropout site (mc_dropout_p = {own!r}) and no p was "
            f"given: MC dropout needs p in (0, 1); set the model's mc_dropout_p (e.g. 0.1, the paper's "
            f"value) or pass p"
        )
    return float(eff)


def _check_sampling(model, num_samples, p, mode) -> None:
    _check_num_samples(num_samples)
    _check_choice(mode, MODES, "mode")
    _check_p(p)
    _dropout_p(model, p)


@torch.no_grad()
def mc_dropout_logits(
    student,
    features_or_inputs: torch.Tensor,
    num_samples: int = 5,
    p: Optional[float] = None,
    mode: str = "head",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """T Monte-Carlo dropout samples of a `SegmentationStudent`'s logits, without gradient.

    Args:
        student: a `SegmentationStudent` (anything with `sample_logits`, `sample_logits_naive`,
            `mc_dropout_p`).
        features_or_inputs: `head_input` `(B, D, h, w)` for `mode="head"`, `pixel_values`
            `(B, 3, H, W)` for `mode="naive"`.
        num_samples: T >= 2.
        p: dropout probability of the MC site; None = the model's `mc_dropout_p`. `naive` mode
            runs the model's own dropout modules, so there p must be None or equal to it.
        mode: `head` (resample dropout + classifier on the cached features) or `naive` (T full
            forwards).
        generator: RNG for the head-mode masks (None = the global RNG). `naive` mode draws from
            the global RNG only.

    Returns:
        `(T, B, C, h, w)` logits in the model's dtype.
    """
    _check_sampling(student, num_samples, p, mode)
    if mode == "head":
        return student.sample_logits(features_or_inputs, num_samples, p=p, generator=generator)
    own = getattr(student, "mc_dropout_p", None)
    if p is not None and own is not None and not math.isclose(p, own):
        raise ValueError(
            f"mode='naive' runs the model's own dropout (mc_dropout_p = {own}); p = {p} cannot be applied "
            f"there. Use mode='head' or set the model's mc_dropout_p"
        )
    if generator is not None:
        raise ValueError(
            "mode='naive' draws its dropout masks from the global RNG; pass generator=None (or use mode='head')"
        )
    return student.sample_logits_naive(features_or_inputs, num_samples)


def _softmax_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Class softmax of `(T, B, C, h, w)` logits in fp32, even inside an autocast region."""
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return torch.softmax(logits.float(), dim=2)


@torch.no_grad()
def mc_dropout_probs(
    student,
    features_or_inputs: torch.Tensor,
    num_samples: int = 5,
    p: Optional[float] = None,
    mode: str = "head",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Softmax probabilities of T MC-dropout samples: `(T, B, C, h, w)` fp32, no gradient.

    Same arguments as `mc_dropout_logits`; the softmax over classes is taken in fp32 with
    autocast disabled (bf16 probabilities would quantise sigma to ~1e-3).
    """
    logits = mc_dropout_logits(student, features_or_inputs, num_samples, p=p, mode=mode, generator=generator)
    return _softmax_fp32(logits)


@torch.no_grad()
def mc_dropout_std(
    student,
    features_or_inputs: torch.Tensor,
    num_samples: int = 5,
    p: Optional[float] = None,
    mode: str = "head",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """sigma `(B, C, h, w)` (eq. 6) of T MC-dropout samples: what FOTF needs each step.

    Same arguments as `mc_dropout_logits` and the same value as
    `predictive_std(mc_dropout_probs(...))`, but in `head` mode it asks the model for the std
    directly (`student.sample_std`, which streams the samples; see `mc_dropout_linear_std`), so
    the T samples are never stored. Other modes and models without `sample_std` go through the
    stored samples.
    """
    if mode == "head" and hasattr(student, "sample_std"):
        _check_sampling(student, num_samples, p, mode)
        return student.sample_std(features_or_inputs, num_samples, p=p, generator=generator)
    return predictive_std(mc_dropout_probs(student, features_or_inputs, num_samples, p=p, mode=mode, generator=generator))


# --------------------------------------------------------------------------------------------
# Eq. 6: standard deviation over samples
# --------------------------------------------------------------------------------------------


def predictive_std(probs: torch.Tensor, correction: int = 1) -> torch.Tensor:
    """Per-pixel, per-class standard deviation over the T samples (eq. 6).

    Args:
        probs: `(T, B, C, h, w)` softmax probabilities (any float dtype; computed in >= fp32).
        correction: degrees-of-freedom correction as in `torch.std` (1 = Bessel, the default;
            0 = population std). Needs T > correction.

    Returns:
        sigma `(B, C, h, w)`, fp32 (fp64 for fp64 input), >= 0, detached.

    Implementation note: `torch.var_mean(dim=0)` runs a slow strided Welford reduction on the
    CPU (about 50 ms for T x B x C x h x w = 5 x 4 x 19 x 45 x 60, ~30x a softmax). We use one
    pass of sums instead, shifted by the first sample: with `d_t = q_t - q_1`,
    `var = (sum d^2 - (sum d)^2 / T) / (T - correction)`. The shift keeps it as accurate as the
    two-pass formula when sigma is small and makes sigma exactly 0 when all samples agree.
    """
    if probs.dim() < 2:
        raise ValueError(f"probs must be (T, B, C, h, w) (samples first), got shape {tuple(probs.shape)}")
    num_samples = probs.shape[0]
    _check_correction(correction, num_samples)
    with torch.no_grad(), torch.autocast(device_type=probs.device.type, enabled=False):
        q = probs.detach()
        if q.dtype != torch.float64:
            q = q.float()
        d = q[1:] - q[:1]
        return _shifted_std(d.sum(0), d.square_().sum(0), num_samples, correction)


def _check_correction(correction, num_samples: int) -> None:
    if isinstance(correction, bool) or not isinstance(correction, int) or correction < 0 or num_samples - correction <= 0:
        raise ValueError(
            f"correction = {correction!r} needs to be an integer in [0, T) with T = {num_samples} samples "
            f"(the std over fewer than correction + 1 samples is undefined)"
        )


def _shifted_std(s1: torch.Tensor, s2: torch.Tensor, num_samples: int, correction: int) -> torch.Tensor:
    """std from the sums `s1 = sum_t d_t`, `s2 = sum_t d_t^2` of the shifted samples `d_t = q_t - q_1`
    (t = 2..T): `var = (s2 - s1^2 / T) / (T - correction)`. Overwrites s1 and s2."""
    var = s2.sub_(s1.square_().div_(num_samples)).div_(num_samples - correction)
    return var.clamp_min_(0).sqrt_()


# --------------------------------------------------------------------------------------------
# Merge + eq. 7: weights
# --------------------------------------------------------------------------------------------


def merge_sigma(sigma: torch.Tensor, merge: str = "none") -> torch.Tensor:
    """Average sigma `(B, C, h, w)` over classes and/or pixels; the merge is named after what remains.

    - `none`: `(B, C, h, w)`, one value per pixel and class (Table 4's "logits").
    - `pixel`: mean over classes -> `(B, 1, h, w)`, one value per pixel.
    - `channel`: mean over pixels -> `(B, C, 1, 1)`, one value per class (channel) per image.
    - `sample`: mean over classes and pixels -> `(B, 1, 1, 1)`, one value per image.
    """
    _check_choice(merge, MERGES, "merge")
    if sigma.dim() != 4:
        raise ValueError(f"sigma must be (B, C, h, w), got shape {tuple(sigma.shape)}")
    dims = _MERGE_DIMS[merge]
    return sigma if dims is None else sigma.mean(dim=dims, keepdim=True)


def uncertainty_weights(
    sigma: torch.Tensor,
    m: float = 1.0,
    kappa: float = 1.0,
    weighting: str = "power",
    merge: str = "none",
) -> torch.Tensor:
    """FOTF weights `w = f(merge(sigma))` (eq. 7), detached, broadcastable to `(B, C, h, w)`.

    Merging averages sigma *before* the weighting function and is named after what remains
    (the paper does not define it precisely; this is our reading of Table 4/5/8):

    ==========  ======================  =========================================
    merge       shape                   meaning
    ==========  ======================  =========================================
    `none`      `(B, C, h, w)`          per pixel and class (Table 4 "logits")
    `pixel`     `(B, 1, h, w)`          mean over classes (paper default for CE)
    `channel`   `(B, C, 1, 1)`          mean over pixels (paper default for KD)
    `sample`    `(B, 1, 1, 1)`          mean over classes and pixels
    ==========  ======================  =========================================

    Weighting functions (both continuous, strictly increasing for m, kappa > 0, f(0) = 1):

    - `power`: `(1 + m * sigma) ** kappa` (eq. 7),
    - `exp`: `exp(kappa * m * sigma)` (Table 4's `e^(kappa sigma)` is m = 1).

    Args:
        sigma: `(B, C, h, w)` standard deviations (>= 0; negative values are treated as 0).
        m: scale m > 0 (paper grid {1, 3, 10}).
        kappa: sharpness kappa > 0 (paper grid 1..10).
        weighting: one of `WEIGHTINGS`.
        merge: one of `MERGES`.

    Returns:
        fp32 (fp64 for fp64 input) weights >= 1, exactly 1 where sigma = 0. The log-weight is
        capped 8 nats below the dtype's largest finite value so that the weights stay finite
        for any sigma (real sigmas of probabilities are <= ~0.71 and never reach the cap).
    """
    _check_choice(weighting, WEIGHTINGS, "weighting")
    _check_positive(m, "m")
    _check_positive(kappa, "kappa")
    s = sigma.detach()
    if s.dtype != torch.float64:
        s = s.float()
    with torch.autocast(device_type=s.device.type, enabled=False):
        s = merge_sigma(s, merge).clamp_min(0)
        if weighting == "power":
            log_w = torch.log1p(s * m).mul_(kappa)
        else:
            log_w = s * (kappa * m)
        cap = math.log(torch.finfo(log_w.dtype).max) - 8.0
        return log_w.clamp_max_(cap).exp_()


# --------------------------------------------------------------------------------------------
# The per-step object
# --------------------------------------------------------------------------------------------


@dataclass
class FotfResult:
    """What `FOTF.forward` returns for one batch.

    Args:
        weights: `FotfWeights(kd, ce)`; `kd`/`ce` are None when `apply_to` excludes them.
        stats: 0-dim detached tensors for logging (`float()` them): `sigma_mean`, `sigma_max`
            (over every pixel and class of sigma), and `weight_kd_mean` / `weight_kd_max` /
            `weight_ce_mean` / `weight_ce_max` for the weights that were computed.
        sigma: `(B, C, h, w)` fp32 per-pixel per-class standard deviation (for pictures), at the
            student's logit resolution.
    """

    weights: FotfWeights
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)
    sigma: Optional[torch.Tensor] = None


class FOTF(nn.Module):
    """Focus on the Fog: per-step MC-dropout uncertainty weights for the KD and/or CE terms.

    Holds no parameters; an `nn.Module` only so that it composes with the training module.

    Args:
        num_samples: T stochastic passes (>= 2; paper: 5).
        p: dropout probability of the MC passes; None = the sampled model's own `mc_dropout_p`
            (paper: 0.1).
        m, kappa: weighting parameters (> 0), see `uncertainty_weights`.
        weighting: `power` `(1 + m sigma)^kappa` or `exp` `exp(kappa m sigma)`.
        merge_kd: merge for the KD weights (paper default `channel`, Table 4).
        merge_ce: merge for the CE weights (paper default `pixel`, Tables 5 and 8).
        apply_to: `kd`, `ce` or `both`: which of `FotfWeights.kd` / `.ce` are set.
        mode: `head` (resample the head on cached features) or `naive` (T full forwards).
        source: `student` (FOTF) or `teacher` (sigma from T teacher passes, paper Fig. 1b /
            Table 6; the teacher must be a `SegmentationStudent` with a dropout site too).

    Call: `fotf(student, head_input, pixel_values=None, teacher=None, teacher_head_input=None)`
    with `head_input` `(B, D, h, w)` the student's cached features (detached), `pixel_values`
    `(B, 3, H, W)` (needed for `naive` mode), and for `source="teacher"` the teacher and its
    `head_input` `(B, Dt, ht, wt)`. Returns a `FotfResult`. Teacher-side sigma is resized to the
    student's `(h, w)` (bilinear, `align_corners=False`) when the resolutions differ.
    """

    def __init__(
        self,
        num_samples: int = 5,
        p: Optional[float] = 0.1,
        m: float = 1.0,
        kappa: float = 1.0,
        weighting: str = "power",
        merge_kd: str = "channel",
        merge_ce: str = "pixel",
        apply_to: str = "both",
        mode: str = "head",
        source: str = "student",
    ):
        super().__init__()
        _check_num_samples(num_samples)
        _check_p(p)
        _check_positive(m, "m")
        _check_positive(kappa, "kappa")
        _check_choice(weighting, WEIGHTINGS, "weighting")
        _check_choice(merge_kd, MERGES, "merge_kd")
        _check_choice(merge_ce, MERGES, "merge_ce")
        _check_choice(apply_to, APPLY_TO, "apply_to")
        _check_choice(mode, MODES, "mode")
        _check_choice(source, SOURCES, "source")
        self.num_samples = num_samples
        self.p = None if p is None else float(p)
        self.m = float(m)
        self.kappa = float(kappa)
        self.weighting = weighting
        self.merge_kd = merge_kd
        self.merge_ce = merge_ce
        self.apply_to = apply_to
        self.mode = mode
        self.source = source

    @property
    def needs_head_input(self) -> bool:
        """False for naive student sampling, whose weights depend on `pixel_values` only. A training
        step can then call FOTF before the student's forward, so that the T extra no-grad forwards
        do not add their transient activations on top of the graph's saved ones (peak memory)."""
        return not (self.mode == "naive" and self.source == "student")

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, p={self.p}, m={self.m}, kappa={self.kappa}, "
            f"weighting={self.weighting!r}, merge_kd={self.merge_kd!r}, merge_ce={self.merge_ce!r}, "
            f"apply_to={self.apply_to!r}, mode={self.mode!r}, source={self.source!r}"
        )

    def _sampled_model_and_input(self, student, head_input, pixel_values, teacher, teacher_head_input):
        if self.source == "student":
            model, features = student, head_input
            features_name = "head_input"
        else:
            if teacher is None:
                raise ValueError("FOTF(source='teacher') needs the teacher model; got teacher=None")
            s_classes, t_classes = getattr(student, "num_labels", None), getattr(teacher, "num_labels", None)
            if s_classes is not None and t_classes is not None and s_classes != t_classes:
                raise ValueError(
                    f"student predicts {s_classes} classes but the teacher {t_classes}; the teacher's sigma "
                    f"cannot weight the student's losses"
                )
            model, features = teacher, teacher_head_input
            features_name = "teacher_head_input"
        if self.mode == "naive":
            features, features_name = pixel_values, "pixel_values"
        if features is None:
            raise ValueError(
                f"FOTF(mode={self.mode!r}, source={self.source!r}) needs {features_name}; got None"
            )
        return model, features

    @torch.no_grad()
    def forward(
        self,
        student,
        head_input: torch.Tensor,
        pixel_values: Optional[torch.Tensor] = None,
        teacher=None,
        teacher_head_input: Optional[torch.Tensor] = None,
    ) -> FotfResult:
        model, features = self._sampled_model_and_input(
            student, head_input, pixel_values, teacher, teacher_head_input
        )
        sigma = mc_dropout_std(model, features.detach(), self.num_samples, p=self.p, mode=self.mode)
        if head_input is not None and sigma.shape[-2:] != head_input.shape[-2:]:
            # Teacher-side sigma at another resolution, or naive mode where only pixel_values
            # is known: put sigma where the student's logits live.
            sigma = F.interpolate(sigma, size=head_input.shape[-2:], mode="bilinear", align_corners=False)
        kd = ce = None
        stats = {"sigma_mean": sigma.mean(), "sigma_max": sigma.amax()}
        if self.apply_to in ("kd", "both"):
            kd = uncertainty_weights(sigma, self.m, self.kappa, self.weighting, self.merge_kd)
            stats["weight_kd_mean"], stats["weight_kd_max"] = kd.mean(), kd.amax()
        if self.apply_to in ("ce", "both"):
            ce = uncertainty_weights(sigma, self.m, self.kappa, self.weighting, self.merge_ce)
            stats["weight_ce_mean"], stats["weight_ce_max"] = ce.mean(), ce.amax()
        return FotfResult(weights=FotfWeights(kd=kd, ce=ce), stats=stats, sigma=sigma)
