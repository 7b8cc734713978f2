"""`SegmentationAdapter`: the one interface (students and teachers) of the loop, FOTF and evaluation.

Every supported model ends in `... -> ReLU -> Dropout(p) -> 1x1 conv classifier`, and declares its
Monte-Carlo dropout sites, the dropouts on its main prediction path, in order:

    DeepLabV3 (CIRKD)  head.aspp.project[3] (Dropout 0.5), head.block[3] (Dropout 0.1) -> head.block[4]
    PSPNet (CIRKD)     head.block[3] (Dropout 0.1) -> head.classifier
    SegFormer (HF)     [encoder hidden dropouts, when > 0], decode_head.dropout -> decode_head.classifier

`forward_features` computes everything before the last site and caches the first site's input
(`mc_input`); `forward_head` applies the last site + classifier; `sample_logits` draws the T
stochastic passes FOTF asks for (`exact`: re-run from the first site on the cached input;
`naive`: T full forwards; `classifier`: the last site only, an approximation).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, SegformerForSemanticSegmentation

from ..fotf import MODES as MC_MODES
from .mc import mc_dropout_passes
from .modeling_cirkd import FotfPreTrainedModel, check_pixel_values, segmentation_loss
from .outputs import SegmentationFeatures, SegmentationModelOutput
from .segformer import segformer_forward_features, segformer_forward_from_mc_input, segformer_mc_sites

__all__ = ["SegmentationAdapter", "set_mc_dropout_p", "mc_dropout_site", "eval_mode", "module_device"]

def mc_dropout_site(model: PreTrainedModel) -> Tuple[nn.Dropout, nn.Conv2d]:
    """`(dropout, classifier)`: the last MC site of a supported model and the classifier after it."""
    if isinstance(model, FotfPreTrainedModel):
        return model.get_mc_dropout(), model.get_classifier()
    if isinstance(model, SegformerForSemanticSegmentation):
        return model.decode_head.dropout, model.decode_head.classifier
    raise TypeError(
        f"{type(model).__name__} is not supported; accepted: FotfDeepLabV3ForSemanticSegmentation, "
        f"FotfPSPNetForSemanticSegmentation, SegformerForSemanticSegmentation (see fotf_hf.models.create_model)"
    )


def set_mc_dropout_p(model: PreTrainedModel, p: float) -> None:
    """Set the last MC site's dropout rate `p` in [0, 1) in both the config (saved) and the live module."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ValueError(f"mc_dropout_p = {p!r} is not accepted: it must be a number in [0, 1)")
    dropout, _ = mc_dropout_site(model)
    model.config.classifier_dropout_prob = float(p)
    dropout.p = float(p)


def module_device(module, fallback: Optional[torch.device] = None) -> torch.device:
    """Device of the module's first parameter or buffer (`fallback`, else CPU, when it has none)."""
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return fallback or torch.device("cpu")


@contextlib.contextmanager
def eval_mode(module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's own flag afterwards.

    Per-module restore, not `module.train(previous)`: a training student may hold submodules that
    are deliberately in eval mode (frozen BN, a frozen teacher inside a wrapper).
    """
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class SegmentationAdapter(nn.Module):
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
        mc_dropout_p: dropout rate of the last MC site (`config.classifier_dropout_prob`).

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
        """The 1x1 classifier `D -> C` after the last MC site."""
        return mc_dropout_site(self.model)[1]

    def save_pretrained(self, *args, **kwargs):
        """`self.model.save_pretrained(...)` (the wrapper itself holds no weights)."""
        return self.model.save_pretrained(*args, **kwargs)

    # --- the split forward -------------------------------------------------------------------

    def forward_features(self, pixel_values: torch.Tensor) -> SegmentationFeatures:
        """Trunk + head up to (not including) the last MC site.

        Args:
            pixel_values: `(B, 3, H, W)`, H, W >= 16.

        Returns:
            `SegmentationFeatures`: `head_input` `(B, D, h, w)`, `mc_input` (the first site's
            input), `aux_logits` `(B, C, h, w)` (None for
            SegFormer or without aux head), `backbone_features` (ResNet c4 `(B, C4, H/8, W/8)`,
            SegFormer last stage `(B, C4, H/32, W/32)`).
        """
        if self.is_segformer:
            check_pixel_values(pixel_values, num_channels=self.model.config.num_channels)
            return segformer_forward_features(self.model, pixel_values)
        return self.model.forward_features(pixel_values)

    def forward_head(self, head_input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Last MC site (active in train mode) + classifier.

        Args:
            head_input: `(B, D, h, w)`.

        Returns:
            `(logits (B, C, h, w), embedding (B, D, h, w))`; embedding = the classifier input.
        """
        dropout, classifier = mc_dropout_site(self.model)
        embedding = dropout(head_input)
        return classifier(embedding), embedding

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
        return SegmentationModelOutput.from_features(features, logits, embedding, loss)

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

    def mc_dropout_sites(self) -> List[nn.Dropout]:
        """The model's MC sites (see the module docstring): in call order for DeepLabV3/PSPNet; SegFormer's
        encoder sites in module order (masks are always consumed in call order)."""
        if self.is_segformer:
            return segformer_mc_sites(self.model)
        return self.model.mc_dropout_sites()

    def sample_logits(
        self,
        num_samples: int,
        mode: str = "exact",
        features: Optional[SegmentationFeatures] = None,
        pixel_values: Optional[torch.Tensor] = None,
        p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        masks: Optional[Sequence[Sequence[torch.Tensor]]] = None,
    ) -> Iterator[torch.Tensor]:
        """T Monte-Carlo dropout passes, yielded one at a time (always stochastic, also in eval mode).

        Args:
            num_samples: T >= 1.
            mode: `exact` (re-run from the first MC site on `features.mc_input`), `naive` (full
                forwards of `pixel_values`) or `classifier` (last site + classifier on
                `features.head_input`; misses earlier sites). BatchNorm keeps the model's mode and
                its running statistics are not updated; nothing but the sites is random.
            features: this step's `forward_features` / `forward` output (`exact`, `classifier`).
            pixel_values: `(B, 3, H, W)` (`naive`).
            p: drop rate for every site during the passes; None = each site's own rate.
            generator: source of the masks (None = torch's global generator).
            masks: optional keep-masks, `masks[t]` = one tensor per site call of pass t, in order.

        Yields:
            T logits `(B, C, h, w)` without gradient, in the model's (autocast) dtype.
        """
        if mode not in MC_MODES:
            raise ValueError(f"mode = {mode!r} is not valid; choose one of: {', '.join(MC_MODES)}")
        sites = self.mc_dropout_sites()
        if mode == "classifier":
            sites = sites[-1:]
        if not any((site.p if p is None else p) > 0 for site in sites):
            raise ValueError(
                f"{type(self.model).__name__} has no active MC dropout site (rates {[s.p for s in sites]}) and p = "
                f"{p!r}: MC dropout needs a rate in (0, 1); set the model's dropout or fotf.p"
            )
        needed = "pixel_values" if mode == "naive" else "features"
        if (pixel_values if mode == "naive" else features) is None:
            raise ValueError(f"sample_logits(mode={mode!r}) needs {needed}; got None")
        if masks is not None and len(masks) != num_samples:
            raise ValueError(f"masks holds {len(masks)} passes but num_samples = {num_samples}")
        return self._passes(num_samples, mode, features, pixel_values, sites, p, generator, masks)

    def _passes(self, num_samples, mode, features, pixel_values, sites, p, generator, masks):
        for t in range(num_samples):
            # no_grad per pass, not around the loop: the caller's grad mode holds between yields
            with torch.no_grad(), mc_dropout_passes(self.model, sites, p, generator, None if masks is None else masks[t]):
                if mode == "exact":
                    logits = self._forward_from_mc_input(features.mc_input.detach())
                elif mode == "classifier":
                    logits = self.forward_head(features.head_input.detach())[0]
                else:
                    logits = self.forward(pixel_values).logits
            yield logits

    def _forward_from_mc_input(self, mc_input: torch.Tensor) -> torch.Tensor:
        if self.is_segformer:
            return segformer_forward_from_mc_input(self.model, mc_input)
        return self.model.forward_from_mc_input(mc_input)
