"""Focus on the Fog (FOTF): the student's MC-dropout uncertainty weights its losses (paper eq. 6-8).

One training step, all without gradient (the weights are constants for the loss):

    T stochastic passes of the student            logits_t (B, C, h, w), t = 1..T
    softmax over classes (fp32)                   q_t
    std over the T passes (eq. 6)                 sigma (B, C, h, w)
    merge: mean over a dimension (optional)       sigma'
    weighting (eq. 7)                             w = (1 + m sigma')^kappa  or  exp(kappa m sigma')

`w` multiplies the KD terms (eq. 3, `losses/kd.py`) and the pixel CE (eq. 8, `losses/ce.py`).
The passes themselves belong to the model (`SegmentationAdapter.sample_logits`): this file asks
for T samples and never looks inside a model.

Sampling modes (`FotfConfig.mode`):
- `exact` (default): every pass re-runs the student from its earliest MC-dropout site onward on
  features cached from the main forward. Equal to `naive` for the same dropout masks.
- `naive`: T full forwards with the MC sites active and nothing else stochastic.
- `classifier`: only the last dropout + classifier are re-run. A documented approximation (it
  misses DeepLabV3's ASPP dropout), never a default.

Merges say what the weight varies over. The paper's words read literally ("averaging uncertainty
estimates across a particular dimension", its ablation section) name what is averaged away:

    paper word   literal reading (default)                 the other reading
    logits       none        (B, C, h, w)                  none
    channel      per_pixel   (B, 1, h, w)  mean over C     per_class
    pixel        per_class   (B, C, 1, 1)  mean over h, w  per_pixel
    sample       batch_mean  (1, C, h, w)  mean over B     per_image (B, 1, 1, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .losses.base import FotfWeights

__all__ = [
    "WEIGHTINGS", "MERGES", "PAPER_MERGE_WORDS", "APPLY_TO", "MODES", "SOURCES",
    "FotfConfig", "FotfResult", "FOTF", "predictive_std", "streamed_std", "merge_sigma", "uncertainty_weights",
]

WEIGHTINGS = ("power", "exp")
MERGES = ("none", "per_pixel", "per_class", "per_image", "batch_mean")
APPLY_TO = ("kd", "ce", "both")
MODES = ("exact", "naive", "classifier")
SOURCES = ("student", "teacher")

# Dimensions of sigma (B, C, h, w) each merge averages over.
_MERGE_DIMS = {"none": None, "per_pixel": (1,), "per_class": (2, 3), "per_image": (1, 2, 3), "batch_mean": (0,)}
# The paper's merge words -> (literal reading, other reading); both readings are valid MERGES values.
PAPER_MERGE_WORDS = {"channel": ("per_pixel", "per_class"), "pixel": ("per_class", "per_pixel"),
                     "sample": ("batch_mean", "per_image")}


def _merge_word_message(where: str, word: str) -> str:
    rows = "\n".join(f"    {w:<8} -> {lit:<11} (literal: averaged across the {w} dimension)  or  {other}"
                     for w, (lit, other) in PAPER_MERGE_WORDS.items())
    return (f"{where} = {word!r} is the paper's word, which reads two ways; give an explicit value "
            f"(literal reading first):\n{rows}\n  valid values: {', '.join(MERGES)}")


@dataclass
class FotfConfig:
    """FOTF settings (`fotf:` in a run's YAML).

    Args:
        enabled: weight the method's KD and/or CE terms.
        num_samples: T stochastic passes (>= 2; paper: 5).
        p: None = every MC site keeps its own dropout rate (the model as trained); a number in
            (0, 1) overrides all sites for the MC passes only.
        m, kappa: weighting parameters (> 0); appendix A.3 grid: kappa 1..10, m {1, 3, 10}.
        weighting: `power` `(1 + m sigma)^kappa` (eq. 7) or `exp` `exp(kappa m sigma)`.
        merge_kd, merge_ce: one of `MERGES` for the KD (eq. 3) and CE (eq. 8) weights; defaults
            are the literal readings of the paper's defaults (KD `channel`, CE `pixel`).
        apply_to: `kd`, `ce` or `both`.
        mode: one of `MODES` (see the module docstring).
        source: `student` (FOTF) or `teacher` (sigma from the teacher, Fig. 1b / Table 6).
    """

    enabled: bool = False
    num_samples: int = 5
    p: Optional[float] = None
    m: float = 1.0
    kappa: float = 1.0
    weighting: str = "power"
    merge_kd: str = "per_pixel"
    merge_ce: str = "per_class"
    apply_to: str = "both"
    mode: str = "exact"
    source: str = "student"

    def validate(self) -> None:
        """Raise `ValueError` naming the first bad field and its choices."""
        n = self.num_samples
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"fotf.num_samples = {n!r} must be an integer >= 2 (eq. 6 needs two samples)")
        if self.p is not None and not (isinstance(self.p, (int, float)) and 0.0 < self.p < 1.0):
            raise ValueError(f"fotf.p = {self.p!r} must be null (each site's own rate) or in (0, 1)")
        for name in ("m", "kappa"):
            _check_positive(getattr(self, name), f"fotf.{name}")
        for name, choices in (("weighting", WEIGHTINGS), ("merge_kd", MERGES), ("merge_ce", MERGES),
                              ("apply_to", APPLY_TO), ("mode", MODES), ("source", SOURCES)):
            _check_choice(getattr(self, name), choices, f"fotf.{name}")


def _check_positive(value, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where} = {value!r} must be a finite number > 0")


def _check_choice(value, choices, where: str) -> None:
    """One check for config fields and function arguments; a merge given as a paper word gets the table."""
    if choices is MERGES and value in PAPER_MERGE_WORDS:
        raise ValueError(_merge_word_message(where, value))
    if value not in choices:
        raise ValueError(f"{where} = {value!r} is not valid; choose one of: {', '.join(choices)}")


# --------------------------------------------------------------------------------------------
# Eq. 6: standard deviation over the T passes
# --------------------------------------------------------------------------------------------


def predictive_std(probs: torch.Tensor, correction: int = 1) -> torch.Tensor:
    """Per-pixel, per-class std over stored samples (eq. 6): `(T, B, C, h, w)` -> `(B, C, h, w)`.

    `correction` as in `torch.std` (1 = Bessel). fp32 (fp64 for fp64 input), detached.
    """
    return streamed_std(probs.unbind(0), correction=correction, softmax=False)


@torch.no_grad()
def streamed_std(samples: Iterable[torch.Tensor], correction: int = 1, softmax: bool = True) -> torch.Tensor:
    """Eq. 6 over an iterable of per-pass tensors `(B, C, h, w)`, holding two running sums only.

    Args:
        samples: T logits (`softmax=True`: softmax over dim 1 in fp32 is applied) or probabilities.
        correction: degrees-of-freedom correction (1 = Bessel); needs T > correction.

    Returns:
        sigma `(B, C, h, w)` fp32 (fp64 for fp64 input), >= 0.

    Sums of `d_t = q_t - q_1` (shifted by the first pass) keep the one-pass formula
    `var = (sum d^2 - (sum d)^2 / T) / (T - correction)` as accurate as two passes when sigma is
    small, and make sigma exactly 0 when all passes agree.
    """
    first = s1 = s2 = None
    count = 0
    for x in samples:
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = x.detach()
            q = q.double() if q.dtype == torch.float64 else q.float()
            if softmax:
                q = torch.softmax(q, dim=1)
            if first is None:
                first, s1, s2 = q, torch.zeros_like(q), torch.zeros_like(q)
            else:
                d = q - first
                s1 += d
                s2.addcmul_(d, d)
        count += 1
    if isinstance(correction, bool) or not isinstance(correction, int) or not 0 <= correction < count:
        raise ValueError(f"correction = {correction!r} needs an integer in [0, T) with T = {count} samples")
    var = s2.sub_(s1.square_().div_(count)).div_(count - correction)
    return var.clamp_min_(0).sqrt_()


# --------------------------------------------------------------------------------------------
# Merge + eq. 7
# --------------------------------------------------------------------------------------------


def merge_sigma(sigma: torch.Tensor, merge: str = "none") -> torch.Tensor:
    """Average sigma `(B, C, h, w)` over the dimensions `merge` removes (see the module table)."""
    _check_choice(merge, MERGES, "merge")
    if sigma.dim() != 4:
        raise ValueError(f"sigma must be (B, C, h, w), got shape {tuple(sigma.shape)}")
    dims = _MERGE_DIMS[merge]
    return sigma if dims is None else sigma.mean(dim=dims, keepdim=True)


def uncertainty_weights(sigma: torch.Tensor, m: float = 1.0, kappa: float = 1.0, weighting: str = "power",
                        merge: str = "none") -> torch.Tensor:
    """Eq. 7 on merged sigma: `(1 + m s)^kappa` (`power`) or `exp(kappa m s)` (`exp`), `s = merge(sigma)`.

    Args:
        sigma: `(B, C, h, w)` standard deviations (negative values count as 0).
        m, kappa: > 0. weighting: one of `WEIGHTINGS`. merge: one of `MERGES`.

    Returns:
        weights >= 1 (exactly 1 where sigma = 0), detached, fp32 (fp64 for fp64 input), of the
        merged shape, which broadcasts to `(B, C, h, w)`. The log-weight is capped 8 nats below
        the dtype's largest value so the weights stay finite.
    """
    _check_choice(weighting, WEIGHTINGS, "weighting")
    _check_positive(m, "m")
    _check_positive(kappa, "kappa")
    s = sigma.detach()
    s = s.double() if s.dtype == torch.float64 else s.float()
    with torch.autocast(device_type=s.device.type, enabled=False):
        s = merge_sigma(s, merge).clamp_min(0)
        log_w = torch.log1p(s * m).mul_(kappa) if weighting == "power" else s * (kappa * m)
        cap = math.log(torch.finfo(log_w.dtype).max) - 8.0
        return log_w.clamp_max_(cap).exp_()


def _p99(x: torch.Tensor) -> torch.Tensor:
    """99th percentile (nearest rank) of all entries; `kthvalue` has no size limit, unlike `quantile`."""
    flat = x.detach().float().flatten()
    return flat.kthvalue(max(1, math.ceil(0.99 * flat.numel()))).values


# --------------------------------------------------------------------------------------------
# The per-step object
# --------------------------------------------------------------------------------------------


@dataclass
class FotfResult:
    """One batch's FOTF output.

    Args:
        weights: `FotfWeights(kd, ce)`, each None when `apply_to` excludes it.
        sigma: `(B, C, h, w)` fp32 eq.-6 sigma at the student's logit resolution.
        stats: 0-dim detached tensors for logging: `sigma_mean`, `sigma_p99`, and for each
            computed weight `weight_{kd,ce}_{mean,p99,max}`.
    """

    weights: FotfWeights
    sigma: torch.Tensor
    stats: Dict[str, torch.Tensor] = field(default_factory=dict)


class FOTF(nn.Module):
    """Per-step FOTF weights. No parameters; a module so that it composes with the training module.

    Call `fotf(student, features, pixel_values, teacher=None, teacher_features=None)`:
    `student`/`teacher` are `SegmentationAdapter`s, `features` the student's output of this step
    (needs `mc_input`/`head_input` except in `naive` mode), `pixel_values` `(B, 3, H, W)`.
    """

    def __init__(self, config: FotfConfig):
        super().__init__()
        config.validate()
        self.config = config

    @classmethod
    def from_config(cls, config: FotfConfig) -> Optional["FOTF"]:
        """`FOTF(config)` when `config.enabled`, else None."""
        return cls(config) if config.enabled else None

    @property
    def needs_features(self) -> bool:
        """False for naive student sampling, which needs only the pixels: the training step then
        samples before the student's forward, so the T passes' activations do not stack on the graph's."""
        return not (self.config.mode == "naive" and self.config.source == "student")

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self.config).items() if k != "enabled")

    @torch.no_grad()
    def forward(self, student, features=None, pixel_values: Optional[torch.Tensor] = None, teacher=None,
                teacher_features=None, generator: Optional[torch.Generator] = None) -> FotfResult:
        c = self.config
        model, feats = (student, features) if c.source == "student" else (teacher, teacher_features)
        if model is None:
            raise ValueError("FOTF(source='teacher') needs the teacher model; got teacher=None")
        if c.source == "teacher" and teacher.num_labels != student.num_labels:
            raise ValueError(f"student predicts {student.num_labels} classes but the teacher {teacher.num_labels}: "
                             "the teacher's sigma cannot weight the student's losses")
        samples = model.sample_logits(c.num_samples, mode=c.mode, features=feats, pixel_values=pixel_values,
                                      p=c.p, generator=generator)
        sigma = streamed_std(samples)
        size = None if features is None else features.head_input.shape[-2:]
        if size is not None and sigma.shape[-2:] != size:  # teacher sigma at another resolution
            sigma = F.interpolate(sigma, size=size, mode="bilinear", align_corners=False)
        stats = {"sigma_mean": sigma.mean(), "sigma_p99": _p99(sigma)}
        weights = {}
        for term, merge in (("kd", c.merge_kd), ("ce", c.merge_ce)):
            if c.apply_to in (term, "both"):
                w = uncertainty_weights(sigma, c.m, c.kappa, c.weighting, merge)
                weights[term] = w
                stats.update({f"weight_{term}_mean": w.mean(), f"weight_{term}_p99": _p99(w),
                              f"weight_{term}_max": w.amax()})
        return FotfResult(weights=FotfWeights(**weights), sigma=sigma, stats=stats)
