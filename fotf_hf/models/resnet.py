"""Dilated ResNetV1b with a deep stem ("v1s"), as the CIRKD / Af-DCD segmentation backbones.

Reproduces `models/base_models/resnet.py::ResNetV1b(dilated=True, deep_stem=True)` of CIRKD-v1
(winycg/CIRKD @ 2d8ad0f) module for module, so its state-dict keys (`conv1`, `bn1`, ... `conv3`,
`bn3`, `layer{1-4}.{j}.conv1/bn1/...`, `layer{i}.0.downsample.0/1`) load by identity:

- stem: 3x3 s2 conv 3->w, BN, ReLU; 3x3 conv w->w, BN, ReLU; 3x3 conv w->2w, BN, ReLU; 3x3 s2 max
  pool. Hence `inplanes = 2w` and ResNet-18's `layer1.0` has a downsample (128 -> 64), unlike
  torchvision.
- v1b: the stride sits on the 3x3 conv; the downsample is 1x1 conv (stride) + BN.
- output stride 8: `layer3` dilation 2, `layer4` dilation 4, both stride 1. The first block of a
  dilated stage uses a smaller dilation for the conv that sees the previous stage's grid (see
  `ResNetV1b._make_layer`).

`w` is `base_width` (64 for the real networks); every width scales with it, which gives tiny,
CPU-fast networks for tests (e.g. `base_width=8`).
"""

from __future__ import annotations

from typing import List, Tuple, Type, Union

import torch
from torch import nn

__all__ = ["BasicBlockV1b", "BottleneckV1b", "ResNetV1b", "RESNET_LAYERS", "resnet_stage_channels"]

# Blocks per stage, as torchvision / CIRKD.
RESNET_LAYERS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 bias-free conv whose padding equals its dilation (keeps the grid for stride 1)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlockV1b(nn.Module):
    """ResNet-18/34 block. `dilation` is for `conv1`, `previous_dilation` for `conv2`.

    (In CIRKD's `_make_layer` the `previous_dilation` argument is the *stage* dilation, so the
    first block of layer4 has conv1 dilation 2 and conv2 dilation 4.)
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module = None, previous_dilation: int = 1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, 1, previous_dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class BottleneckV1b(nn.Module):
    """ResNet-50/101 block: 1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module = None, previous_dilation: int = 1):
        super().__init__()
        del previous_dilation  # accepted for a uniform `_make_layer`; the bottleneck has one 3x3 conv
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


Block = Union[Type[BasicBlockV1b], Type[BottleneckV1b]]


def resnet_stage_channels(depth: int, base_width: int = 64) -> Tuple[int, int, int, int]:
    """Output channels of `layer1..layer4`: `(w, 2w, 4w, 8w) * expansion` (R18: 64..512, R101: 256..2048)."""
    expansion = BasicBlockV1b.expansion if depth < 50 else BottleneckV1b.expansion
    return tuple(base_width * m * expansion for m in (1, 2, 4, 8))


class ResNetV1b(nn.Module):
    """Dilated (output stride 8) deep-stem ResNetV1b; returns the four stage outputs.

    Args:
        depth: 18, 50 or 101.
        base_width: `w`; the stem is `w, w, 2w` and the stages have `w, 2w, 4w, 8w` planes.

    Attributes named as CIRKD's (`conv1`, `bn1`, `relu1`, ..., `maxpool`, `layer1`..`layer4`); no
    `fc` (CIRKD's segmentation backbone never uses it; ImageNet `fc.*` keys are dropped by the
    converter).
    """

    def __init__(self, depth: int = 18, base_width: int = 64):
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(f"ResNet depth {depth!r} is not supported; accepted: {sorted(RESNET_LAYERS)}")
        block: Block = BasicBlockV1b if depth < 50 else BottleneckV1b
        layers = RESNET_LAYERS[depth]
        w = base_width
        self.depth = depth
        self.conv1 = conv3x3(3, w, stride=2)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(w, w)
        self.bn2 = nn.BatchNorm2d(w)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = conv3x3(w, 2 * w)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.inplanes = 2 * w
        self.layer1 = self._make_layer(block, w, layers[0])
        self.layer2 = self._make_layer(block, 2 * w, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * w, layers[2], stride=1, dilation=2)
        self.layer4 = self._make_layer(block, 8 * w, layers[3], stride=1, dilation=4)
        self.stage_channels = resnet_stage_channels(depth, base_width)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        # The first block of a dilated stage still sees the previous stage's sampling grid, so its
        # first 3x3 conv uses half the stage dilation (1 for dilation 2, 2 for dilation 4), as CIRKD.
        first_dilation = 1 if dilation in (1, 2) else dilation // 2
        layers: List[nn.Module] = [
            block(self.inplanes, planes, stride, dilation=first_dilation, downsample=downsample,
                  previous_dilation=dilation)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, dilation=dilation, previous_dilation=dilation))
        return nn.Sequential(*layers)

    def forward(self, pixel_values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(B, 3, H, W)` -> `(c1, c2, c3, c4)`; c1 at 1/4, c2..c4 at 1/8 of the input.

        Shapes: c1 `(B, w*e, H/4, W/4)`, c2 `(B, 2w*e, H/8, W/8)`, c3 `(B, 4w*e, H/8, W/8)`,
        c4 `(B, 8w*e, H/8, W/8)` with e = 1 (R18) or 4 (R50/R101).
        """
        x = self.relu1(self.bn1(self.conv1(pixel_values)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        c1 = self.layer1(x)
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c1, c2, c3, c4
