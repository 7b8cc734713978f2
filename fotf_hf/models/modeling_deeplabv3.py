"""CIRKD-v1 DeepLabV3 as a transformers model (`AutoModelForSemanticSegmentation`, `fotf_deeplabv3`).

Module names follow CIRKD-v1 `models/deeplabv3.py` exactly, so its checkpoints load by identity
(backbone and aux head: `modeling_cirkd.py`):

    head.aspp.b0.{0,1}           1x1 conv, BN              (+ ReLU)
    head.aspp.b{1,2,3}.block.{0,1}  3x3 atrous conv (rates 12/24/36), BN (+ ReLU)
    head.aspp.b4.gap.{1,2}       image pooling: [avgpool], 1x1 conv, BN (+ ReLU, bilinear up)
    head.aspp.project.{0,1}      1x1 conv 5D->D, BN (+ ReLU, project.3 = Dropout 0.5: the first MC site)
    head.block.{0,1}             3x3 conv D->D, BN (+ ReLU, block.3 = Dropout 0.1: the last MC site)
    head.block.4                 1x1 classifier D->C
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_fotf import FotfDeepLabV3Config
from .modeling_cirkd import FotfPreTrainedModel, conv_bn_relu

__all__ = ["FotfDeepLabV3ForSemanticSegmentation", "DeepLabHead", "ASPP_RATES"]

ASPP_RATES = (12, 24, 36)


class ASPPConv(nn.Module):
    """One atrous branch: `block` = 3x3 conv (dilation `rate`), BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, rate: int):
        super().__init__()
        self.block = conv_bn_relu(in_channels, out_channels, 3, dilation=rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ASPPPooling(nn.Module):
    """Image-pooling branch: global average pool, 1x1 conv, BN, ReLU, bilinear back to the input grid."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.gap(x)
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (CIRKD `_ASPP`): b0 1x1, b1-b3 atrous, b4 pooling, 1x1 projection + Dropout."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = ASPP_RATES, dropout_prob: float = 0.5):
        super().__init__()
        self.b0 = conv_bn_relu(in_channels, out_channels, 1)
        self.b1 = ASPPConv(in_channels, out_channels, rates[0])
        self.b2 = ASPPConv(in_channels, out_channels, rates[1])
        self.b3 = ASPPConv(in_channels, out_channels, rates[2])
        self.b4 = ASPPPooling(in_channels, out_channels)
        self.project = nn.Sequential(*conv_bn_relu(5 * out_channels, out_channels, 1), nn.Dropout(dropout_prob))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the projection's Dropout (DeepLabV3's first MC site): `(B, 5D)` -> `(B, D, h, w)`."""
        branches = [self.b0(x), self.b1(x), self.b2(x), self.b3(x), self.b4(x)]
        return self.project[2](self.project[1](self.project[0](torch.cat(branches, dim=1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project[3](self.forward_features(x))


class DeepLabHead(nn.Module):
    """CIRKD `_DeepLabHead`: ASPP, then `block` = 3x3 conv, BN, ReLU, Dropout (MC site), 1x1 classifier."""

    def __init__(self, in_channels: int, num_labels: int, channels: int, aspp_dropout_prob: float, dropout_prob: float):
        super().__init__()
        self.aspp = ASPP(in_channels, channels, ASPP_RATES, aspp_dropout_prob)
        self.block = nn.Sequential(
            *conv_bn_relu(channels, channels, 3),
            nn.Dropout(dropout_prob),
            nn.Conv2d(channels, num_labels, 1),
        )

    @property
    def dropout(self) -> nn.Dropout:
        return self.block[3]

    @property
    def classifier(self) -> nn.Conv2d:
        return self.block[4]

    @property
    def mc_sites(self) -> List[nn.Dropout]:
        """MC sites in order: the ASPP projection's Dropout (0.5 in CIRKD), then the head's (0.1)."""
        return [self.aspp.project[3], self.block[3]]

    def mc_input(self, c4: torch.Tensor) -> torch.Tensor:
        """`(B, C4, h, w)` -> `(B, D, h, w)`: the input of the first MC site (ASPP projection's dropout)."""
        return self.aspp.forward_features(c4)

    def between_sites(self, mc_input: torch.Tensor) -> torch.Tensor:
        """From the first site's input to the last site's input: ASPP dropout, then `block[0:3]`."""
        return self.block[2](self.block[1](self.block[0](self.aspp.project[3](mc_input))))


class FotfDeepLabV3ForSemanticSegmentation(FotfPreTrainedModel):
    """DeepLabV3 with a dilated deep-stem ResNetV1b (CIRKD-v1 `DeepLabV3`).

    Example:
        >>> config = FotfDeepLabV3Config(backbone_depth=18, num_labels=19, backbone_base_width=8, head_channels=16)
        >>> model = FotfDeepLabV3ForSemanticSegmentation(config).eval()
        >>> model(torch.randn(1, 3, 64, 64)).logits.shape
        torch.Size([1, 19, 8, 8])
    """

    config_class = FotfDeepLabV3Config

    def _build_head(self, config: FotfDeepLabV3Config, in_channels: int) -> nn.Module:
        return DeepLabHead(in_channels, config.num_labels, config.head_width, config.aspp_dropout_prob,
                           config.classifier_dropout_prob)
