"""Output containers shared by every segmentation model and by the student/teacher interface.

Shapes use B = batch, C = number of classes, D = width of the features right before the
Monte-Carlo dropout site, h x w = the logit resolution (1/8 of the input for the dilated
ResNet models, 1/4 for SegFormer), H x W = the input resolution.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from transformers.utils import ModelOutput


@dataclass
class SegmentationFeatures(ModelOutput):
    """Everything a model computes up to (not including) its last MC-dropout site.

    Args:
        head_input: `(B, D, h, w)` activations that enter the last MC-dropout site (the one
            before the classifier).
        mc_input: activations that enter the first MC site (DeepLabV3: the ASPP projection's
            dropout; equal to `head_input` for one-site models; SegFormer with encoder dropout:
            `pixel_values`). Re-running the model from there is one exact MC pass.
        aux_logits: `(B, C, h', w')` auxiliary FCN-head logits (ResNet models with the aux head),
            or None.
        backbone_features: `(B, C4, h, w)` output of the last backbone stage (Af-DCD distils this),
            or None.
        hidden_states: optional tuple of intermediate feature maps.
    """

    head_input: torch.FloatTensor = None
    mc_input: Optional[torch.FloatTensor] = None
    aux_logits: Optional[torch.FloatTensor] = None
    backbone_features: Optional[torch.FloatTensor] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None


@dataclass
class SegmentationModelOutput(ModelOutput):
    """Output of our models' `forward` and of `SegmentationAdapter.forward`.

    A superset of `transformers.modeling_outputs.SemanticSegmenterOutput`: `loss`, `logits`,
    `hidden_states` mean the same; the extra fields are what distillation losses consume.

    Args:
        loss: scalar CE (+ 0.4 x aux CE) when `labels` were given, else None.
        logits: `(B, C, h, w)` class scores at the model's own resolution (not upsampled).
        aux_logits: `(B, C, h, w)` auxiliary-head logits or None.
        embedding: `(B, D, h, w)` distillation feature: the classifier's input (after the head
            dropout when it is active), as CIRKD's `x_feat_after_aspp`.
        backbone_features: `(B, C4, h, w)` last backbone stage or None.
        head_input: `(B, D, h, w)` the features before the MC-dropout site (see
            `SegmentationFeatures`); kept so MC samples need no second trunk pass.
        mc_input: the first MC site's input (see `SegmentationFeatures`).
    """

    loss: Optional[torch.FloatTensor] = None
    logits: torch.FloatTensor = None
    aux_logits: Optional[torch.FloatTensor] = None
    embedding: Optional[torch.FloatTensor] = None
    backbone_features: Optional[torch.FloatTensor] = None
    head_input: Optional[torch.FloatTensor] = None
    mc_input: Optional[torch.FloatTensor] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None

    @classmethod
    def from_features(cls, features: SegmentationFeatures, logits: torch.Tensor, embedding: torch.Tensor,
                      loss: Optional[torch.Tensor] = None) -> "SegmentationModelOutput":
        """The output of a split forward: the head's `logits`, `embedding` (and `loss`) with the
        fields `features` carries (aux logits, backbone features, both MC sites' inputs, hidden states)."""
        return cls(loss=loss, logits=logits, embedding=embedding, aux_logits=features.aux_logits,
                   backbone_features=features.backbone_features, head_input=features.head_input,
                   mc_input=features.mc_input, hidden_states=features.hidden_states)
