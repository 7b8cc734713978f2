"""The shared base of CIRKD-v1's DeepLabV3 and PSPNet as transformers models.

Both models (`modeling_deeplabv3.py`, `modeling_pspnet.py`) follow CIRKD-v1 / Af-DCD
(`models/segbase.py`) module for module, so their checkpoints load by identity:

    pretrained.*                 dilated deep-stem ResNetV1b (resnet.py)
    head.*                       the family's head (see its modeling file)
    auxlayer.block.{0,1,4}       aux FCN head on layer3: 3x3 conv, BN (+ ReLU, Dropout 0.1), 1x1

and return `SegmentationModelOutput` with logits at 1/8 of the input (not upsampled, as CIRKD). The
base exposes the split forward every family shares: `forward_features` (everything up to the last
MC-dropout site), `forward_head` (last dropout + classifier), `mc_dropout_sites` (the dropouts on the
prediction path, in order) and `forward_from_mc_input` (the re-run from the first site that FOTF's
`exact` passes use).

Only torch, transformers and sibling files are imported, so the release step can copy these files
next to a model's weights as remote code (`trust_remote_code=True` without fotf-hf installed).
"""

from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .configuration_fotf import FotfSegmentationConfig
from .outputs import SegmentationFeatures, SegmentationModelOutput
from .resnet import ResNetV1b

try:  # transformers >= 5: init functions that respect the "already loaded" flags of from_pretrained
    from transformers import initialization as init
except ImportError:  # pragma: no cover - transformers 4
    from torch.nn import init

__all__ = ["FotfPreTrainedModel", "FCNHead", "check_pixel_values", "conv_bn_relu", "segmentation_loss", "MIN_INPUT_SIZE"]

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


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> nn.Sequential:
    """`Sequential(conv (no bias), BN, ReLU)`: keys `.0.weight`, `.1.*` as CIRKD."""
    padding = dilation * (kernel_size // 2)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FCNHead(nn.Module):
    """CIRKD `_FCNHead` (auxiliary head on layer3): 3x3 conv to in/4, BN, ReLU, Dropout, 1x1 classifier."""

    def __init__(self, in_channels: int, channels: int, num_labels: int, dropout_prob: float):
        super().__init__()
        self.block = nn.Sequential(
            *conv_bn_relu(in_channels, channels, 3),
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
        output = SegmentationModelOutput.from_features(features, logits, embedding, loss)
        return output if return_dict else output.to_tuple()
