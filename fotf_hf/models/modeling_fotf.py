"""CIRKD-v1 DeepLabV3 and PSPNet as transformers models (`AutoModelForSemanticSegmentation`).

Architecture and module names follow CIRKD-v1 / Af-DCD (`models/deeplabv3.py`, `models/pspnet.py`,
`models/segbase.py`) exactly, so their checkpoints load by identity:

    pretrained.*                 dilated deep-stem ResNetV1b (fotf_hf/models/resnet.py)
    head.aspp.b0.{0,1}           1x1 conv, BN              (+ ReLU)
    head.aspp.b{1,2,3}.block.{0,1}  3x3 atrous conv (rates 12/24/36), BN (+ ReLU)
    head.aspp.b4.gap.{1,2}       image pooling: [avgpool], 1x1 conv, BN (+ ReLU, bilinear up)
    head.aspp.project.{0,1}      1x1 conv 5D->D, BN (+ ReLU, project.3 = Dropout 0.5: the first MC site)
    head.block.{0,1}             3x3 conv D->D, BN (+ ReLU, block.3 = Dropout 0.1: the last MC site)
    head.block.4                 1x1 classifier D->C
    head.psp.conv{1-4}.{0,1}     PSPNet pyramid (bins 1/2/3/6): 1x1 conv, BN (+ ReLU, bilinear up)
    head.block.{0,1}, head.classifier   PSPNet: 3x3 conv 2*C4->D, BN (+ ReLU, block.3 = Dropout), 1x1
    auxlayer.block.{0,1,4}       aux FCN head on layer3: 3x3 conv, BN (+ ReLU, Dropout 0.1), 1x1

Both models return `SegmentationModelOutput` with logits at 1/8 of the input (not upsampled, as
CIRKD), and expose `forward_features` (everything up to the last MC-dropout site), `forward_head`
(last dropout + classifier), `mc_dropout_sites` (the dropouts on the prediction path, in order)
and `forward_from_mc_input` (the re-run from the first site that FOTF's `exact` passes use).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForSemanticSegmentation, PreTrainedModel

from .configuration_fotf import FotfDeepLabV3Config, FotfPSPNetConfig, FotfSegmentationConfig
from .outputs import SegmentationFeatures, SegmentationModelOutput
from .resnet import ResNetV1b

try:  # transformers >= 5: init functions that respect the "already loaded" flags of from_pretrained
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4
    from torch.nn import init

__all__ = [
    "FotfPreTrainedModel",
    "FotfDeepLabV3ForSemanticSegmentation",
    "FotfPSPNetForSemanticSegmentation",
    "check_pixel_values",
    "MIN_INPUT_SIZE",
]

ASPP_RATES = (12, 24, 36)
PSP_BINS = (1, 2, 3, 6)
MIN_INPUT_SIZE = 16  # px per side: 2 x 2 logits at output stride 8


def check_pixel_values(pixel_values: torch.Tensor, num_channels: int = 3, min_size: int = MIN_INPUT_SIZE) -> None:
    """Raise a `ValueError` naming the shape unless `pixel_values` is `(B, num_channels, H, W)` with H, W >= min_size."""
    shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else None
    if (
        shape is None
        or len(shape) != 4
        or shape[0] < 1
        or shape[1] != num_channels
        or shape[2] < min_size
        or shape[3] < min_size
    ):
        got = f"shape {shape}" if shape is not None else f"a {type(pixel_values).__name__}"
        raise ValueError(
            f"pixel_values must be a tensor of shape (B, {num_channels}, H, W) with B >= 1 and H, W >= {min_size}; "
            f"got {got}"
        )


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    """`Sequential(conv (no bias), BN, ReLU)`: keys `.0.weight`, `.1.*` as CIRKD."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ASPPConv(nn.Module):
    """One atrous branch: `block` = 3x3 conv (dilation `rate`), BN, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, rate: int):
        super().__init__()
        self.block = _conv_bn_relu(in_channels, out_channels, 3, dilation=rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ASPPPooling(nn.Module):
    """Image-pooling branch: global average pool, 1x1 conv, BN, ReLU, bilinear back to the input grid."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_conv_bn_relu(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.gap(x)
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (CIRKD `_ASPP`): b0 1x1, b1-b3 atrous, b4 pooling, 1x1 projection + Dropout."""

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = ASPP_RATES, dropout_prob: float = 0.5):
        super().__init__()
        self.b0 = _conv_bn_relu(in_channels, out_channels, 1)
        self.b1 = ASPPConv(in_channels, out_channels, rates[0])
        self.b2 = ASPPConv(in_channels, out_channels, rates[1])
        self.b3 = ASPPConv(in_channels, out_channels, rates[2])
        self.b4 = ASPPPooling(in_channels, out_channels)
        self.project = nn.Sequential(*_conv_bn_relu(5 * out_channels, out_channels, 1), nn.Dropout(dropout_prob))

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
            *_conv_bn_relu(channels, channels, 3),
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


class PyramidPooling(nn.Module):
    """CIRKD `_PyramidPooling`: bins 1/2/3/6, each 1x1 conv to in/4 + BN + ReLU, upsampled, concat with the input."""

    def __init__(self, in_channels: int, bins: Sequence[int] = PSP_BINS):
        super().__init__()
        self.bins = tuple(bins)
        inter = max(1, in_channels // 4)
        self.conv1 = _conv_bn_relu(in_channels, inter, 1)
        self.conv2 = _conv_bn_relu(in_channels, inter, 1)
        self.conv3 = _conv_bn_relu(in_channels, inter, 1)
        self.conv4 = _conv_bn_relu(in_channels, inter, 1)
        self.out_channels = in_channels + 4 * inter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        feats = [x]
        for bin_size, conv in zip(self.bins, (self.conv1, self.conv2, self.conv3, self.conv4)):
            pooled = conv(F.adaptive_avg_pool2d(x, bin_size))
            feats.append(F.interpolate(pooled, size=size, mode="bilinear", align_corners=True))
        return torch.cat(feats, dim=1)


class PSPHead(nn.Module):
    """CIRKD `_PSPHead`: pyramid pooling, `block` = 3x3 conv, BN, ReLU, Dropout (MC site); `classifier` 1x1."""

    def __init__(self, in_channels: int, num_labels: int, channels: int, dropout_prob: float):
        super().__init__()
        self.psp = PyramidPooling(in_channels)
        self.block = nn.Sequential(*_conv_bn_relu(self.psp.out_channels, channels, 3), nn.Dropout(dropout_prob))
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


class FCNHead(nn.Module):
    """CIRKD `_FCNHead` (auxiliary head on layer3): 3x3 conv to in/4, BN, ReLU, Dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_labels: int, dropout_prob: float):
        super().__init__()
        self.block = nn.Sequential(
            *_conv_bn_relu(in_channels, channels, 3),
            nn.Dropout(dropout_prob),
            nn.Conv2d(channels, num_labels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def segmentation_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    aux_logits: Optional[torch.Tensor] = None,
    aux_weight: float = 0.4,
) -> torch.Tensor:
    """CIRKD's `SegCrossEntropyLoss`: CE of logits bilinearly upsampled (align_corners=True) to the labels.

    Args:
        logits: `(B, C, h, w)`.
        labels: `(B, H, W)` integer class ids, `ignore_index` ignored.
        aux_logits: optional `(B, C, h', w')`; adds `aux_weight * CE(aux)`.

    Returns:
        scalar loss (mean over non-ignored pixels).
    """
    if labels.dim() != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must be (B, H, W) with B = {logits.shape[0]} (the batch of pixel_values); "
            f"got shape {tuple(labels.shape)}"
        )
    labels = labels.long()
    size = labels.shape[-2:]
    up = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
    loss = F.cross_entropy(up, labels, ignore_index=ignore_index)
    if aux_logits is not None and aux_weight:
        up_aux = F.interpolate(aux_logits, size=size, mode="bilinear", align_corners=True)
        loss = loss + aux_weight * F.cross_entropy(up_aux, labels, ignore_index=ignore_index)
    return loss


class FotfPreTrainedModel(PreTrainedModel):
    """Shared code of the CIRKD DeepLabV3 / PSPNet models: backbone, aux head, init, forward."""

    config_class = FotfSegmentationConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = False

    def __init__(self, config: FotfSegmentationConfig):
        super().__init__(config)
        self.pretrained = ResNetV1b(config.backbone_depth, config.backbone_base_width)
        c3, c4 = config.backbone_channels[2], config.backbone_channels[3]
        self.head = self._build_head(config, c4)
        if config.aux_head:
            self.auxlayer = FCNHead(c3, config.aux_channels, config.num_labels, config.aux_dropout_prob)
        else:
            self.auxlayer = None
        self.post_init()

    def _build_head(self, config, in_channels: int) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_weights(self, module: nn.Module) -> None:
        """CIRKD's ResNetV1b init everywhere: Kaiming-normal (fan_out, ReLU) convs, BN weight 1 / bias 0."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if module.running_mean is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)

    # --- the MC-dropout sites ----------------------------------------------------------------

    def get_mc_dropout(self) -> nn.Dropout:
        """The dropout right before the classifier (CIRKD `head.block.3`): the last MC site."""
        return self.head.dropout

    def get_classifier(self) -> nn.Conv2d:
        """The 1x1 classifier `D -> C` after the last MC site."""
        return self.head.classifier

    def mc_dropout_sites(self) -> List[nn.Dropout]:
        """The dropouts on the main prediction path in order (not the aux head's): DeepLabV3 two, PSPNet one."""
        return self.head.mc_sites

    def forward_from_mc_input(self, mc_input: torch.Tensor) -> torch.Tensor:
        """Re-run from the first MC site: `(B, D, h, w)` `mc_input` -> logits `(B, C, h, w)`."""
        return self.forward_head(self.head.between_sites(mc_input))[0]

    # --- forward -----------------------------------------------------------------------------

    def forward_features(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> SegmentationFeatures:
        """Everything up to (not including) the last MC site.

        Args:
            pixel_values: `(B, 3, H, W)`, H, W >= 16, normalised as `config.image_normalization`.
            output_hidden_states: also return the four backbone stages `(c1, c2, c3, c4)`.

        Returns:
            `SegmentationFeatures` with `mc_input` `(B, D, H/8, W/8)` (the first MC site's input),
            `head_input` `(B, D, H/8, W/8)` (the last site's), `aux_logits` `(B, C, H/8, W/8)`
            (None without aux head), `backbone_features` = c4 `(B, C4, H/8, W/8)`.
        """
        check_pixel_values(pixel_values)
        c1, c2, c3, c4 = self.pretrained(pixel_values)
        mc_input = self.head.mc_input(c4)
        return SegmentationFeatures(
            head_input=self.head.between_sites(mc_input),
            mc_input=mc_input,
            aux_logits=None if self.auxlayer is None else self.auxlayer(c3),
            backbone_features=c4,
            hidden_states=(c1, c2, c3, c4) if output_hidden_states else None,
        )

    def forward_head(self, head_input: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Last MC site (active in train mode) + classifier: `(B, D, h, w)` -> `(logits (B, C, h, w), embedding)`.

        The embedding is the classifier input (after the dropout when it was active), as CIRKD's
        `x_feat_after_aspp`.
        """
        embedding = self.get_mc_dropout()(head_input)
        return self.get_classifier()(embedding), embedding

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[SegmentationModelOutput, Tuple[torch.Tensor, ...]]:
        """Segment `pixel_values`.

        Args:
            pixel_values: `(B, 3, H, W)` float, H, W >= 16.
            labels: optional `(B, H', W')` class ids (any size; logits are upsampled for the loss),
                `config.semantic_loss_ignore_index` ignored.
            output_hidden_states: return `(c1, c2, c3, c4)` backbone stages in `hidden_states`.
            return_dict: False -> tuple of the non-None fields.

        Returns:
            `SegmentationModelOutput`: `logits` `(B, C, H/8, W/8)` (not upsampled), `aux_logits`,
            `embedding` `(B, D, H/8, W/8)`, `backbone_features` (c4), `head_input`, and `loss` =
            CE + `aux_loss_weight` x aux CE when `labels` are given.
        """
        if output_hidden_states is None:
            output_hidden_states = bool(getattr(self.config, "output_hidden_states", False))
        if return_dict is None:
            return_dict = getattr(self.config, "return_dict", True)
        features = self.forward_features(pixel_values, output_hidden_states=output_hidden_states)
        logits, embedding = self.forward_head(features.head_input)
        loss = None
        if labels is not None:
            loss = segmentation_loss(
                logits, labels, self.config.semantic_loss_ignore_index, features.aux_logits, self.config.aux_loss_weight
            )
        output = SegmentationModelOutput(
            loss=loss,
            logits=logits,
            aux_logits=features.aux_logits,
            embedding=embedding,
            backbone_features=features.backbone_features,
            head_input=features.head_input,
            mc_input=features.mc_input,
            hidden_states=features.hidden_states,
        )
        return output if return_dict else output.to_tuple()


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


# Registration: after `import fotf_hf`, `AutoConfig` / `AutoModelForSemanticSegmentation`
# `.from_pretrained(folder)` resolve our `model_type`s. exist_ok: re-imports (e.g. importlib.reload) stay harmless.
AutoConfig.register(FotfDeepLabV3Config.model_type, FotfDeepLabV3Config, exist_ok=True)
AutoConfig.register(FotfPSPNetConfig.model_type, FotfPSPNetConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(FotfDeepLabV3Config, FotfDeepLabV3ForSemanticSegmentation, exist_ok=True)
AutoModelForSemanticSegmentation.register(FotfPSPNetConfig, FotfPSPNetForSemanticSegmentation, exist_ok=True)
