"""`SegmentationStudent`: the one interface the training loop, FOTF and evaluation use for every model family.

Every supported model ends in `... -> ReLU -> Dropout(p) -> 1x1 conv classifier`:

    DeepLabV3 (CIRKD)  head.block[0:3] -> head.block[3] (Dropout 0.1) -> head.block[4]
    PSPNet (CIRKD)     head.block[0:3] -> head.block[3] (Dropout 0.1) -> head.classifier
    SegFormer (HF)     decode_head ... activation -> decode_head.dropout -> decode_head.classifier

That dropout is the Monte-Carlo site. `forward_features` computes everything before it (the
`head_input`), `forward_head` applies dropout + classifier, so T Monte-Carlo samples cost one trunk
pass plus T cheap 1x1 convs (`sample_logits`), and `sample_logits_naive` is the paper's T full
forwards for comparison.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SegformerForSemanticSegmentation

from ..uncertainty import mc_dropout_linear, mc_dropout_linear_std
from .modeling_fotf import FotfPreTrainedModel, check_pixel_values, dropout_classifier, segmentation_loss
from .outputs import SegmentationFeatures, SegmentationModelOutput
from .segformer import segformer_forward_features

__all__ = ["SegmentationStudent", "set_mc_dropout_p", "mc_dropout_site", "preserve_batchnorm_stats"]


def mc_dropout_site(model: PreTrainedModel) -> Tuple[nn.Dropout, nn.Conv2d]:
    """`(dropout, classifier)` of the MC site of a supported model (see the module docstring)."""
    if isinstance(model, FotfPreTrainedModel):
        return model.get_mc_dropout(), model.get_classifier()
    if isinstance(model, SegformerForSemanticSegmentation):
        return model.decode_head.dropout, model.decode_head.classifier
    raise TypeError(
        f"{type(model).__name__} is not supported; accepted: FotfDeepLabV3ForSemanticSegmentation, "
        f"FotfPSPNetForSemanticSegmentation, SegformerForSemanticSegmentation (see fotf_hf.models.create_model)"
    )


def set_mc_dropout_p(model: PreTrainedModel, p: float) -> None:
    """Set the MC-site dropout rate `p` in [0, 1) in both the config (saved) and the live module."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"mc_dropout_p = {p!r} is not accepted: it must be a number in [0, 1)")
    dropout, _ = mc_dropout_site(model)
    model.config.classifier_dropout_prob = float(p)
    dropout.p = float(p)


@contextlib.contextmanager
def preserve_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Run forwards that leave every BatchNorm's running statistics untouched.

    Why: extra forwards in train mode (naive MC sampling) must not move the running statistics,
    or evaluation would depend on how many samples FOTF drew. Switching `track_running_stats`
    off (instead of restoring the buffers afterwards) also never writes to the buffers in place,
    which matters because the main training forward saved them for its backward pass.
    In train mode BN still normalises with batch statistics; in eval mode with the running ones.
    """
    switched = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.track_running_stats = False
            switched.append(m)
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


class SegmentationStudent(nn.Module):
    """Uniform student/teacher interface around a DeepLabV3, PSPNet or SegFormer `PreTrainedModel`.

    Args:
        model: `FotfDeepLabV3ForSemanticSegmentation`, `FotfPSPNetForSemanticSegmentation` or
            `SegformerForSemanticSegmentation` (e.g. from `create_model` or
            `AutoModelForSemanticSegmentation.from_pretrained`). The wrapper takes over its
            train/eval state; `self.model` is what `save_pretrained` saves.

    Attributes:
        model: the wrapped `PreTrainedModel`.
        config: `model.config`.
        num_labels: number of classes C.
        mc_dropout_p: dropout rate of the MC site (`config.classifier_dropout_prob`); 0.0 when the
            model has no active dropout there (then FOTF refuses to sample without an explicit p).

    Shapes: B batch, C classes, D head width (128/256 ResNet, decoder width SegFormer), h x w the
    logit grid (H/8 x W/8 ResNet, H/4 x W/4 SegFormer), T samples.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        mc_dropout_site(model)  # raises a clear TypeError for unsupported models
        self.model = model
        self.train(model.training)

    # --- attributes --------------------------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def num_labels(self) -> int:
        return int(self.model.config.num_labels)

    @property
    def mc_dropout_p(self) -> float:
        return float(getattr(self.model.config, "classifier_dropout_prob", 0.0) or 0.0)

    @property
    def is_segformer(self) -> bool:
        return isinstance(self.model, SegformerForSemanticSegmentation)

    def get_classifier(self) -> nn.Conv2d:
        """The 1x1 classifier `D -> C` after the MC dropout."""
        return mc_dropout_site(self.model)[1]

    def save_pretrained(self, *args, **kwargs):
        """`self.model.save_pretrained(...)` (the wrapper itself holds no weights)."""
        return self.model.save_pretrained(*args, **kwargs)

    # --- the split forward -------------------------------------------------------------------

    def forward_features(self, pixel_values: torch.Tensor) -> SegmentationFeatures:
        """Trunk + head up to (not including) the MC dropout.

        Args:
            pixel_values: `(B, 3, H, W)`, H, W >= 16.

        Returns:
            `SegmentationFeatures`: `head_input` `(B, D, h, w)`, `aux_logits` `(B, C, h, w)` (None for
            SegFormer or without aux head), `backbone_features` (ResNet c4 `(B, C4, H/8, W/8)`,
            SegFormer last stage `(B, C4, H/32, W/32)`).
        """
        if self.is_segformer:
            check_pixel_values(pixel_values, num_channels=self.model.config.num_channels)
            return segformer_forward_features(self.model, pixel_values)
        return self.model.forward_features(pixel_values)

    def forward_head(
        self,
        head_input: torch.Tensor,
        dropout: Optional[bool] = None,
        mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """MC dropout + classifier.

        Args:
            head_input: `(B, D, h, w)`.
            dropout: apply dropout at rate `mc_dropout_p`; None = as `self.training`.
            mask: `(B, D, h, w)` keep-mask (bool or {0, 1}), applied as `x * mask / (1 - p)`
                (overrides `dropout`).

        Returns:
            `(logits (B, C, h, w), embedding (B, D, h, w))`; embedding = the classifier input.
        """
        apply = self.training if dropout is None else dropout
        return dropout_classifier(head_input, self.get_classifier(), self.mc_dropout_p, apply, mask)

    def forward(self, pixel_values: torch.Tensor, labels: Optional[torch.Tensor] = None) -> SegmentationModelOutput:
        """One pass; the MC-site dropout is active in train mode (as CIRKD trains), off in eval mode.

        Args:
            pixel_values: `(B, 3, H, W)`.
            labels: optional `(B, H', W')` class ids (ignore index `config.semantic_loss_ignore_index`).

        Returns:
            `SegmentationModelOutput` with `logits` `(B, C, h, w)`, `aux_logits`, `embedding`,
            `backbone_features`, `head_input`, and `loss` when labels are given: the wrapped model's
            own loss (ResNet: CE on logits upsampled with align_corners=True + aux_loss_weight x aux
            CE, as CIRKD; SegFormer: transformers' loss, align_corners=False, no aux).
        """
        features = self.forward_features(pixel_values)
        logits, embedding = self.forward_head(features.head_input)
        loss = None
        if labels is not None:
            loss = self._loss(logits, features.aux_logits, labels)
        return SegmentationModelOutput(
            loss=loss,
            logits=logits,
            aux_logits=features.aux_logits,
            embedding=embedding,
            backbone_features=features.backbone_features,
            head_input=features.head_input,
        )

    def _loss(self, logits, aux_logits, labels) -> torch.Tensor:
        config = self.model.config
        if not self.is_segformer:
            return segmentation_loss(logits, labels, config.semantic_loss_ignore_index, aux_logits, config.aux_loss_weight)
        # transformers' SegformerForSemanticSegmentation loss, reproduced for the split forward
        up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if config.num_labels > 1:
            return F.cross_entropy(up, labels.long(), ignore_index=config.semantic_loss_ignore_index)
        valid = ((labels >= 0) & (labels != config.semantic_loss_ignore_index)).float()
        bce = F.binary_cross_entropy_with_logits(up.squeeze(1), labels.float(), reduction="none")
        return (bce * valid).mean()

    # --- Monte-Carlo sampling ----------------------------------------------------------------

    @torch.no_grad()
    def sample_logits(
        self,
        head_input: torch.Tensor,
        num_samples: int,
        p: Optional[float] = None,
        masks: Optional[torch.Tensor] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """T head-only MC-dropout samples on cached features (always sampled, also in eval mode).

        Args:
            head_input: `(B, D, h, w)` from `forward_features` (detached internally).
            num_samples: T.
            p: drop probability in (0, 1); None = `mc_dropout_p`.
            masks: optional `(T, B, D, h, w)` keep-masks (then the draw is deterministic).
            generator: RNG for the masks (None = global RNG).

        Returns:
            `(T, B, C, h, w)` fp32 logits.
        """
        p = self._mc_p(p)
        classifier = self.get_classifier()
        return mc_dropout_linear(head_input, classifier.weight, classifier.bias, num_samples, p,
                                 masks=masks, generator=generator)

    @torch.no_grad()
    def sample_std(
        self,
        head_input: torch.Tensor,
        num_samples: int,
        p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """sigma (eq. 6) of `sample_logits`' softmax without storing the T samples (`mc_dropout_linear_std`).

        Args:
            head_input: `(B, D, h, w)` from `forward_features` (detached internally).
            num_samples: T >= 2.
            p: drop probability in (0, 1); None = `mc_dropout_p`.
            generator: RNG for the drops (None = global RNG); the same generator state gives the
                same draws as `sample_logits`.

        Returns:
            `(B, C, h, w)` fp32 per-pixel, per-class std of the class probabilities.
        """
        classifier = self.get_classifier()
        return mc_dropout_linear_std(head_input, classifier.weight, classifier.bias, num_samples, self._mc_p(p),
                                     generator=generator)

    def _mc_p(self, p: Optional[float]) -> float:
        p = self.mc_dropout_p if p is None else p
        if not 0.0 < p < 1.0:
            raise ValueError(
                f"{type(self.model).__name__} has no active dropout site (mc_dropout_p = {self.mc_dropout_p}) and p = "
                f"{p!r}: MC dropout needs p in (0, 1)"
            )
        return p

    @torch.no_grad()
    def sample_logits_naive(
        self,
        pixel_values: torch.Tensor,
        num_samples: int,
        masks: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """T full forwards with the MC-site dropout on (the paper's profiled "naive" implementation).

        The trunk runs in the current train/eval mode: in train mode its other stochastic layers
        (DeepLabV3's ASPP Dropout(0.5), SegFormer's DropPath) are sampled too and BatchNorm
        normalises with batch statistics, but the BN running statistics are restored afterwards.
        In eval mode only the MC site is random, and the samples follow the same distribution as
        `sample_logits` (identical for identical masks).

        Args:
            pixel_values: `(B, 3, H, W)`.
            num_samples: T.
            masks: optional `(T, B, D, h, w)` keep-masks; sample t uses `masks[t]`.

        Returns:
            `(T, B, C, h, w)` logits in the model's dtype.
        """
        if masks is not None and masks.shape[0] != num_samples:
            raise ValueError(f"masks must be (T, B, D, h, w) with T = {num_samples}, got shape {tuple(masks.shape)}")
        if masks is None and not self.mc_dropout_p > 0:
            raise ValueError(
                f"{type(self.model).__name__} has no active dropout site (mc_dropout_p = {self.mc_dropout_p}): "
                f"naive MC sampling runs the model's own dropout"
            )
        samples = []
        with preserve_batchnorm_stats(self.model):
            for t in range(num_samples):
                features = self.forward_features(pixel_values)
                logits, _ = self.forward_head(features.head_input, dropout=True, mask=None if masks is None else masks[t])
                samples.append(logits)
        return torch.stack(samples)
