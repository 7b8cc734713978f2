"""Af-DCD: augmentation-free dense contrastive distillation (Fan et al., NeurIPS 2023).

Applied to the last backbone stage c4: student `(B, Cs, h, w)` (512 for ResNet-18), teacher
`(B, Ct, h', w')` (2048 for ResNet-101); the teacher map is resized to the student's `(h, w)`
(bilinear, `align_corners=False`) when they differ. As Af-DCD's `OmniContrastiveFeatureLoss`:

    A = align(f^s)                       1x1 conv Cs -> Ct (with bias); identity when Cs == Ct
    M ~ Bernoulli(1 - mask_ratio)        (B, 1, h, w), a position is zeroed with prob. mask_ratio
    G = P(A * M)                         P = 3x3 conv -> ReLU -> 3x3 conv (Ct -> Ct, with bias)
    L_fd = ||G - f^t||^2_sum / B                                           (term `afdcd_fd`)

Omni contrastive loss (term `afdcd_contrast`) between `G` and `f^t`: both are max-pooled with a
`pool x pool` window, then cut into `p x p` spatial patches (`patch_size` p = 4) and, along the
channels, into `channel_groups` M = 16 contiguous groups of `Ct / M` channels. Inside one patch
that gives `p^2 * M` samples per side, sample `(q, m)` = position q, group m. With
`d(x, y) = ||x - y||_1` and `s = -d`:

    loss(q, m) = -log [ e(q, m; q, m) / (e(q, m; q, m) + sum_{q', m' != m} e(q, m; q', m')) ],
    e(q, m; q', m') = exp(s(G_qm, T_q'm') / tau)

i.e. the positive is the teacher sample at the same position and group, the negatives are all
teacher samples of the *other* groups anywhere in the patch (same-group samples at other
positions are neither), tau = 0.07, and

    L_contrast = sum_{patches, q, m} loss(q, m) / (H_p * W_p) / B,

`H_p x W_p` = the size of the pooled (and fitted, below) map.

Dataset-agnostic fitting (replaces Af-DCD's `if dataset == 'camvid': crop [:44, :44]`): pooling
uses `ceil_mode=True`, which equals Af-DCD's pooling whenever the map is a multiple of `pool`
(Cityscapes 64x128 -> 16x32, VOC 64x64 -> 16x16) and keeps the border otherwise (CamVid 45x45 ->
12x12). If the pooled map is still not a multiple of `patch_size`, `fit="crop"` (default) keeps its
top-left `floor(H_p / p) * p x floor(W_p / p) * p` part, as Af-DCD's CamVid branch did, and
`fit="pad"` replicate-pads bottom/right to the next multiple. `pool=None, fit="crop"` therefore
reproduces Af-DCD's CamVid branch exactly (45x45 -> 44x44, no pooling). Af-DCD's CamVid
weights (8e-6 / 0.01) were tuned for that unpooled branch, whose L_contrast is smaller (about
3x at random init on 45x45 maps than the pooled default); set `pool=None` for CamVid to reproduce
Af-DCD, or keep the default for one dataset-agnostic rule.

Per-dataset weights from the Af-DCD scripts are in `AFDCD_DATASET_WEIGHTS`; the constructor
defaults are Cityscapes'. Af-DCD clips the gradient norm of this module's parameters to 15 in its
trainer; that is the training loop's job, not this module's.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ._feature_utils import fp32_off_autocast, require_field, student_teacher_pair
from .base import LossInputs
from .registry import TermContext, register_method, register_term

__all__ = ["AFDCD_DATASET_WEIGHTS", "FIT_MODES", "fit_to_patches", "omni_contrastive_loss", "AfDCDLoss"]

# lambda_fd / lambda_contrast of the Af-DCD training scripts (train_ocmgd.py runs).
AFDCD_DATASET_WEIGHTS: Dict[str, Dict[str, float]] = {
    "cityscapes": {"fd_weight": 2e-6, "contrast_weight": 0.005},
    "camvid": {"fd_weight": 8e-6, "contrast_weight": 0.01},
    "voc": {"fd_weight": 1e-6, "contrast_weight": 0.005},
}

FIT_MODES = ("crop", "pad")


def fit_to_patches(x: torch.Tensor, patch_size: int, fit: str = "crop") -> torch.Tensor:
    """Crop (top-left) or replicate-pad (bottom/right) `(B, C, H, W)` to a multiple of `patch_size`."""
    if fit not in FIT_MODES:
        raise ValueError(f"fit = {fit!r} is not one of {FIT_MODES}")
    height, width = x.shape[-2:]
    if height % patch_size == 0 and width % patch_size == 0:
        return x
    if fit == "crop":
        if height < patch_size or width < patch_size:
            raise ValueError(
                f"the pooled feature map is {height}x{width}, smaller than one "
                f"{patch_size}x{patch_size} patch; "
                f"use fit='pad', a smaller pool or a smaller patch_size"
            )
        return x[..., : height - height % patch_size, : width - width % patch_size]
    pad_h, pad_w = (-height) % patch_size, (-width) % patch_size
    return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")


def _to_patch_samples(x: torch.Tensor, patch_size: int, groups: int) -> torch.Tensor:
    """`(B, C, H, W)` -> `(B * H/p * W/p, p*p*M, C/M)`; sample index = position * M + group."""
    b, c, h, w = x.shape
    p = patch_size
    x = x.reshape(b, groups, c // groups, h // p, p, w // p, p)
    # -> (B, H/p, W/p, p_row, p_col, M, C/M)
    x = x.permute(0, 3, 5, 4, 6, 1, 2)
    return x.reshape(b * (h // p) * (w // p), p * p * groups, c // groups)


def omni_contrastive_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    channel_groups: int = 16,
    patch_size: int = 4,
    temperature: float = 0.07,
    pool: Optional[int] = 4,
    fit: str = "crop",
) -> torch.Tensor:
    """Af-DCD omni (spatial x channel) contrastive loss, formula in the module docstring.

    Args:
        pred: `(B, C, H, W)` fp32 student-side features (the projector output G).
        target: `(B, C, H, W)` fp32 teacher features (constants).
        channel_groups: M; C must be divisible by M.
        patch_size: p, side of the square spatial patches.
        temperature: tau.
        pool: max-pool window (`ceil_mode=True`) applied first; None or 0 for none.
        fit: "crop" or "pad", how a map that is not a multiple of p is made one.

    Returns:
        Scalar (nats): the summed cross-entropy over all samples, divided by the pooled H_p * W_p
        and by B.
    """
    if pred.shape != target.shape:
        raise ValueError(
            f"omni_contrastive_loss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ"
        )
    if pred.shape[1] % channel_groups != 0:
        raise ValueError(
            f"{pred.shape[1]} channels do not split into channel_groups = {channel_groups} equal groups"
        )
    if pool:
        pred = F.max_pool2d(pred, pool, pool, ceil_mode=True)
        target = F.max_pool2d(target, pool, pool, ceil_mode=True)
    pred = fit_to_patches(pred, patch_size, fit)
    target = fit_to_patches(target, patch_size, fit)
    batch, _, height, width = pred.shape
    g = _to_patch_samples(pred, patch_size, channel_groups)  # (P, n, C/M), n = p*p*M
    t = _to_patch_samples(target, patch_size, channel_groups)
    logits = -torch.cdist(g, t, p=1) / temperature  # (P, n, n)
    n = logits.shape[-1]
    group = torch.arange(n, device=logits.device) % channel_groups
    same_group = group[:, None] == group[None, :]
    # Keep the positive (diagonal) and the other-group negatives; drop same-group non-positives.
    dropped = same_group & ~torch.eye(n, dtype=torch.bool, device=logits.device)
    log_denominator = torch.logsumexp(logits.masked_fill(dropped, float("-inf")), dim=-1)
    ce = log_denominator - torch.diagonal(logits, dim1=-2, dim2=-1)
    return ce.sum() / (height * width) / batch


class AfDCDLoss(nn.Module):
    """Af-DCD masked feature mimicking + omni contrastive loss on the last backbone stage.

    Terms `afdcd_fd` (`fd_weight * L_fd`) and `afdcd_contrast` (`contrast_weight * L_contrast`);
    formulas in the module docstring.

    Args:
        student_channels: Cs, channels of the student's last backbone stage.
        teacher_channels: Ct, channels of the teacher's; must be divisible by `channel_groups`.
        mask_ratio: probability that a position of the aligned student map is zeroed (0.75).
        patch_size: p, spatial patch side of the contrastive loss (4).
        channel_groups: M, channel groups of the contrastive loss (16).
        temperature: tau of the contrastive loss (0.07).
        fd_weight / contrast_weight: lambdas (defaults: Cityscapes; see `AFDCD_DATASET_WEIGHTS`).
        pool: max-pool window before the contrastive loss (4); None or 0 for none.
        fit: "crop" or "pad" (module docstring).

    Inputs used: `student_backbone` `(B, Cs, h, w)`, `teacher_backbone` `(B, Ct, h', w')`.
    Learnable parts: `align` (1x1 conv, identity when Cs == Ct) and `projector`.
    """

    def __init__(
        self,
        student_channels: int,
        teacher_channels: int,
        mask_ratio: float = 0.75,
        patch_size: int = 4,
        channel_groups: int = 16,
        temperature: float = 0.07,
        fd_weight: float = 2e-6,
        contrast_weight: float = 0.005,
        pool: Optional[int] = 4,
        fit: str = "crop",
    ):
        super().__init__()
        for arg, value in dict(
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            patch_size=patch_size,
            channel_groups=channel_groups,
        ).items():
            if int(value) != value or value < 1:
                raise ValueError(f"AfDCDLoss {arg} = {value!r} must be a positive integer")
        if teacher_channels % channel_groups != 0:
            raise ValueError(
                f"AfDCDLoss teacher_channels = {teacher_channels} is not divisible by "
                f"channel_groups = {channel_groups}"
            )
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"AfDCDLoss mask_ratio = {mask_ratio} must be in [0, 1)")
        if temperature <= 0:
            raise ValueError(f"AfDCDLoss temperature = {temperature} must be > 0")
        if fd_weight < 0 or contrast_weight < 0:
            raise ValueError(
                f"AfDCDLoss fd_weight = {fd_weight} and contrast_weight = {contrast_weight} must be >= 0"
            )
        if pool is not None and (int(pool) != pool or pool < 0):
            raise ValueError(f"AfDCDLoss pool = {pool!r} must be None, 0 (no pooling) or a positive integer")
        if fit not in FIT_MODES:
            raise ValueError(f"AfDCDLoss fit = {fit!r} is not one of {FIT_MODES}")
        self.student_channels = int(student_channels)
        self.teacher_channels = int(teacher_channels)
        self.mask_ratio = float(mask_ratio)
        self.patch_size = int(patch_size)
        self.channel_groups = int(channel_groups)
        self.temperature = float(temperature)
        self.fd_weight = float(fd_weight)
        self.contrast_weight = float(contrast_weight)
        self.pool = int(pool) if pool else 0
        self.fit = fit
        ct = self.teacher_channels
        self.align = nn.Conv2d(self.student_channels, ct, 1) if self.student_channels != ct else nn.Identity()
        self.projector = nn.Sequential(
            nn.Conv2d(ct, ct, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(ct, ct, 3, padding=1)
        )

    def random_mask(self, batch: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """`(B, 1, h, w)` fp32 keep-mask: 0 with probability `mask_ratio`, else 1."""
        return (torch.rand(batch, 1, height, width, device=device) >= self.mask_ratio).float()

    def forward(self, inputs: LossInputs, mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Compute both terms; `mask` `(B, 1, h, w)` overrides the random mask (tests, ablations)."""
        name = type(self).__name__
        student = require_field(inputs, "student_backbone", name)
        teacher = require_field(inputs, "teacher_backbone", name)
        with fp32_off_autocast(student.device):
            s, t = student_teacher_pair(
                student,
                teacher,
                name,
                "student_backbone",
                "teacher_backbone",
                self.student_channels,
                self.teacher_channels,
            )
            batch, _, height, width = s.shape
            if mask is None:
                mask = self.random_mask(batch, height, width, s.device)
            elif mask.shape != (batch, 1, height, width):
                raise ValueError(
                    f"{name}: mask must be (B, 1, h, w) = {(batch, 1, height, width)}, "
                    f"got {tuple(mask.shape)}"
                )
            generated = self.projector(self.align(s) * mask.float())
            fd = (generated - t).pow(2).sum() / batch
            contrast = omni_contrastive_loss(
                generated, t, self.channel_groups, self.patch_size, self.temperature, self.pool, self.fit
            )
        return {"afdcd_fd": self.fd_weight * fd, "afdcd_contrast": self.contrast_weight * contrast}

    def extra_repr(self) -> str:
        return (
            f"student_channels={self.student_channels}, teacher_channels={self.teacher_channels}, "
            f"mask_ratio={self.mask_ratio}, patch_size={self.patch_size}, "
            f"channel_groups={self.channel_groups}, temperature={self.temperature}, "
            f"fd_weight={self.fd_weight}, contrast_weight={self.contrast_weight}, "
            f"pool={self.pool}, fit={self.fit!r}"
        )


@register_term("afdcd")
def _afdcd_term(ctx: TermContext, **kwargs) -> AfDCDLoss:
    if ctx.student.get("backbone") is None or ctx.teacher.get("backbone") is None:
        raise ValueError("Af-DCD distils the last backbone stage; the student or teacher model exposes none")
    defaults = dict(AFDCD_DATASET_WEIGHTS.get(ctx.dataset, {}))
    if ctx.dataset == "camvid":
        # Af-DCD's CamVid weights were tuned for its unpooled 44x44-crop branch; keep that branch.
        defaults["pool"] = None
    return AfDCDLoss(ctx.student["backbone"], ctx.teacher["backbone"], **{**defaults, **kwargs})


register_method("afdcd", ("ce", "kd", "afdcd"), summary="+ masked feature mimicking + omni contrast")
