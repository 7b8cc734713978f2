"""CIRKD-v1 PSPNet as a transformers model (`AutoModelForSemanticSegmentation`, `fotf_pspnet`).

Module names follow CIRKD-v1 `models/pspnet.py` exactly, so its checkpoints load by identity
(backbone and aux head: `modeling_cirkd.py`):

    head.psp.conv{1-4}.{0,1}     pyramid (bins 1/2/3/6): 1x1 conv, BN (+ ReLU, bilinear up)
    head.block.{0,1}             3x3 conv 2*C4->D, BN (+ ReLU, block.3 = Dropout 0.1: the MC site)
    head.classifier              1x1 classifier D->C
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_fotf import FotfPSPNetConfig
from .modeling_cirkd import FotfPreTrainedModel, conv_bn_relu

__all__ = ["FotfPSPNetForSemanticSegmentation", "PSPHead", "PSP_BINS", "adaptive_avg_pool2d"]

PSP_BINS = (1, 2, 3, 6)


def _pooling_matrix(length, bins: int, like: torch.Tensor) -> torch.Tensor:
    """`(bins, length)` matrix averaging PyTorch's adaptive-pooling windows `floor(i L / n) .. ceil((i+1) L / n)`."""
    position = torch.arange(length, device=like.device)
    i = torch.arange(bins, device=like.device)
    start = torch.div(i * length, bins, rounding_mode="floor")
    end = torch.div((i + 1) * length + bins - 1, bins, rounding_mode="floor")
    inside = ((position[None, :] >= start[:, None]) & (position[None, :] < end[:, None])).to(like.dtype)
    return inside / inside.sum(dim=1, keepdim=True)


def adaptive_avg_pool2d(x: torch.Tensor, bins: int) -> torch.Tensor:
    """`F.adaptive_avg_pool2d(x, bins)`, `(B, C, H, W)` -> `(B, C, bins, bins)`.

    While `torch.export` traces the model (ONNX export), the same averages are written as
    `P_h @ x @ P_w^T`, whose pooling windows follow the input size: ONNX has no adaptive pooling, and
    the exporter's own decomposition bakes the traced feature-map size into the graph. Eager runs
    keep PyTorch's kernel, so logits stay identical to CIRKD's.
    """
    if bins == 1 or not torch.compiler.is_exporting():
        return F.adaptive_avg_pool2d(x, bins)
    height, width = x.shape[-2:]
    return _pooling_matrix(height, bins, x) @ x @ _pooling_matrix(width, bins, x).transpose(0, 1)


class PyramidPooling(nn.Module):
    """CIRKD `_PyramidPooling`: bins 1/2/3/6, each 1x1 conv to in/4 + BN + ReLU, upsampled, concat with the input."""

    def __init__(self, in_channels: int, bins: Sequence[int] = PSP_BINS):
        super().__init__()
        self.bins = tuple(bins)
        inter = max(1, in_channels // 4)
        self.conv1 = conv_bn_relu(in_channels, inter, 1)
        self.conv2 = conv_bn_relu(in_channels, inter, 1)
        self.conv3 = conv_bn_relu(in_channels, inter, 1)
        self.conv4 = conv_bn_relu(in_channels, inter, 1)
        self.out_channels = in_channels + 4 * inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = [x]
        for bin_size, conv in zip(self.bins, (self.conv1, self.conv2, self.conv3, self.conv4)):
            pooled = conv(adaptive_avg_pool2d(x, bin_size))
            feats.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=True))
        return torch.cat(feats, dim=1)


class PSPHead(nn.Module):
    """CIRKD `_PSPHead`: pyramid pooling, `block` = 3x3 conv, BN, ReLU, Dropout (MC site); `classifier` 1x1."""

    def __init__(self, in_channels: int, num_labels: int, channels: int, dropout_prob: float):
        super().__init__()
        self.psp = PyramidPooling(in_channels)
        self.block = nn.Sequential(*conv_bn_relu(self.psp.out_channels, channels, 3), nn.Dropout(dropout_prob))
        self.classifier = nn.Conv2d(channels, num_labels, 1)

    @property
    def dropout(self) -> nn.Dropout:
        return self.block[3]

    @property
    def mc_sites(self) -> List[nn.Dropout]:
        """One MC site: the head's Dropout before the classifier."""
        return [self.block[3]]

    def mc_input(self, c4: torch.Tensor) -> torch.Tensor:
        """`(B, C4, h, w)` -> `(B, D, h, w)`: everything before the MC dropout (`block[0:3]`)."""
        return self.block[2](self.block[1](self.block[0](self.psp(c4))))

    def between_sites(self, mc_input: torch.Tensor) -> torch.Tensor:
        return mc_input


class FotfPSPNetForSemanticSegmentation(FotfPreTrainedModel):
    """PSPNet with a dilated deep-stem ResNetV1b (CIRKD-v1 `PSPNet`).

    Example:
        >>> config = FotfPSPNetConfig(backbone_depth=18, num_labels=19, backbone_base_width=8, head_channels=16)
        >>> FotfPSPNetForSemanticSegmentation(config).eval()(torch.randn(1, 3, 64, 64)).logits.shape
        torch.Size([1, 19, 8, 8])
    """

    config_class = FotfPSPNetConfig

    def _build_head(self, config: FotfPSPNetConfig, in_channels: int) -> nn.Module:
        return PSPHead(in_channels, config.num_labels, config.head_width, config.classifier_dropout_prob)
