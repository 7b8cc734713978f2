"""Configurations of the CIRKD-v1 DeepLabV3 and PSPNet models (dilated deep-stem ResNetV1b backbones).

Every hyperparameter of the network lives here, so a model is rebuilt from `config.json` alone.
Values are validated when the config is created (also when `from_pretrained` reads one): a bad
value raises `ValueError` naming it and what is accepted.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from transformers import PretrainedConfig

__all__ = ["FotfDeepLabV3Config", "FotfPSPNetConfig", "BACKBONE_DEPTHS", "IMAGE_NORMALIZATIONS", "FotfSegmentationConfig"]

BACKBONE_DEPTHS = (18, 50, 101)
OUTPUT_STRIDES = (8,)
# Which input preprocessing the weights expect (see fotf_hf/data/transforms.py):
#   imagenet: RGB, (x/255 - mean) / std;  cirkd_bgr: BGR 0-255 minus the Caffe mean, no std (CIRKD weights).
IMAGE_NORMALIZATIONS = ("imagenet", "cirkd_bgr")


def _normalize_labels(kwargs: Dict[str, Any]) -> None:
    """Validate and complete `num_labels` / `id2label` / `label2id` in `kwargs` (in place).

    Why: `PretrainedConfig` silently replaces an `id2label` that disagrees with `num_labels` by
    `LABEL_i` names, and leaves `label2id` None when only `id2label` is given (transformers 5).
    """
    num_labels = kwargs.get("num_labels")
    id2label = kwargs.get("id2label")
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"num_labels = {num_labels!r} is not accepted: it must be an integer >= 1")
    if id2label is None:
        return
    try:
        id2label = {int(k): str(v) for k, v in dict(id2label).items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"id2label = {id2label!r} must map integer class ids to names") from err
    if num_labels is not None and len(id2label) != num_labels:
        raise ValueError(
            f"id2label has {len(id2label)} entries but num_labels = {num_labels}; accepted: an id2label with "
            f"exactly num_labels entries (ids 0..num_labels-1), or only one of the two (to give a saved model "
            f"other classes, pass id2label= and label2id= to from_pretrained, not num_labels=)"
        )
    if sorted(id2label) != list(range(len(id2label))):
        raise ValueError(
            f"id2label keys {sorted(id2label)} are not 0..{len(id2label) - 1}; accepted: consecutive class ids from 0"
        )
    if len(id2label) < 1:
        raise ValueError("id2label is empty; accepted: at least one class")
    kwargs["id2label"] = id2label
    label2id = kwargs.get("label2id")
    kwargs["label2id"] = {str(k): int(v) for k, v in label2id.items()} if label2id else {v: k for k, v in id2label.items()}
    kwargs.pop("num_labels", None)  # implied by id2label; PretrainedConfig derives it


def _check_probability(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} = {value!r} is not accepted: it must be a number in [0, 1)")
    return float(value)


class FotfSegmentationConfig(PretrainedConfig):
    """Fields shared by the DeepLabV3 and PSPNet configurations (not registered itself).

    Args:
        backbone_depth: ResNet depth, one of 18, 50, 101.
        head_channels: width `D` of the head (ASPP/PSP output and classifier input). None = the
            CIRKD-v1 default for the depth (DeepLabV3: 128 for R18, 256 for R50/R101; PSPNet: 128
            for R18, 512 for R50/R101), scaled by `backbone_base_width / 64`.
        backbone_base_width: `w` of the ResNet (64 = the real network). The stem is `w, w, 2w` and
            the stages `w, 2w, 4w, 8w` planes; small values (8, 16) give tiny CPU-test networks.
        classifier_dropout_prob: dropout right before the 1x1 classifier (CIRKD's `head.block.3`,
            0.1); this is the Monte-Carlo dropout site of FOTF.
        aux_head: build CIRKD's auxiliary FCN head on the layer3 output.
        aux_loss_weight: weight of the auxiliary CE in `loss` (CIRKD: 0.4).
        aux_dropout_prob: dropout of the auxiliary head (`auxlayer.block.3`, 0.1).
        output_stride: only 8 (layer3/layer4 dilated) is implemented, as CIRKD.
        semantic_loss_ignore_index: label value ignored by the loss (255).
        image_normalization: preprocessing the weights expect, `imagenet` or `cirkd_bgr`.
        num_labels / id2label / label2id: classes (give `num_labels` or `id2label`; both are kept
            consistent, with integer ids).
    """

    # CIRKD-v1 head width for an unscaled (base width 64) backbone, per depth. (No annotation:
    # transformers turns annotated class attributes of configs into dataclass fields.)
    default_head_channels = {}

    def __init__(
        self,
        backbone_depth: int = 18,
        head_channels: Optional[int] = None,
        backbone_base_width: int = 64,
        classifier_dropout_prob: float = 0.1,
        aux_head: bool = True,
        aux_loss_weight: float = 0.4,
        aux_dropout_prob: float = 0.1,
        output_stride: int = 8,
        semantic_loss_ignore_index: int = 255,
        image_normalization: str = "imagenet",
        **kwargs,
    ):
        if backbone_depth not in BACKBONE_DEPTHS:
            raise ValueError(f"backbone_depth = {backbone_depth!r} is not supported; accepted: {list(BACKBONE_DEPTHS)}")
        if isinstance(backbone_base_width, bool) or not isinstance(backbone_base_width, int) or backbone_base_width < 1:
            raise ValueError(f"backbone_base_width = {backbone_base_width!r} is not accepted: it must be an integer >= 1")
        if head_channels is not None and (
            isinstance(head_channels, bool) or not isinstance(head_channels, int) or head_channels < 1
        ):
            raise ValueError(f"head_channels = {head_channels!r} is not accepted: it must be an integer >= 1 or None")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(
                f"output_stride = {output_stride!r} is not supported; accepted: {list(OUTPUT_STRIDES)} "
                f"(the CIRKD dilated backbone: layer3 dilation 2, layer4 dilation 4)"
            )
        if image_normalization not in IMAGE_NORMALIZATIONS:
            raise ValueError(
                f"image_normalization = {image_normalization!r} is not supported; accepted: {list(IMAGE_NORMALIZATIONS)}"
            )
        if not isinstance(aux_head, bool):
            raise ValueError(f"aux_head = {aux_head!r} is not accepted: it must be true or false")
        if isinstance(aux_loss_weight, bool) or not isinstance(aux_loss_weight, (int, float)) or aux_loss_weight < 0:
            raise ValueError(f"aux_loss_weight = {aux_loss_weight!r} is not accepted: it must be a number >= 0")
        _normalize_labels(kwargs)
        self.backbone_depth = backbone_depth
        self.head_channels = head_channels
        self.backbone_base_width = backbone_base_width
        self.classifier_dropout_prob = _check_probability("classifier_dropout_prob", classifier_dropout_prob)
        self.aux_head = aux_head
        self.aux_loss_weight = float(aux_loss_weight)
        self.aux_dropout_prob = _check_probability("aux_dropout_prob", aux_dropout_prob)
        self.output_stride = output_stride
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        self.image_normalization = image_normalization
        super().__init__(**kwargs)

    # Derived widths (not stored, so a saved config stays minimal and cannot contradict itself).

    @property
    def backbone_channels(self):
        """Channels of `layer1..layer4` (R18: 64, 128, 256, 512; R101: 256 .. 2048)."""
        from .resnet import resnet_stage_channels  # here, not at the top: a config must load without torch

        return resnet_stage_channels(self.backbone_depth, self.backbone_base_width)

    @property
    def head_width(self) -> int:
        """`D`: the resolved `head_channels`."""
        if self.head_channels is not None:
            return self.head_channels
        return max(1, self.default_head_channels[self.backbone_depth] * self.backbone_base_width // 64)

    @property
    def aux_channels(self) -> int:
        """Hidden width of the auxiliary FCN head: layer3 channels / 4 (R18: 64, R101: 256)."""
        return max(1, self.backbone_channels[2] // 4)


class FotfDeepLabV3Config(FotfSegmentationConfig):
    """DeepLabV3 (CIRKD-v1): dilated ResNetV1b + ASPP (rates 12/24/36 + image pooling) + aux FCN head.

    Args (besides those of `FotfSegmentationConfig`):
        aspp_dropout_prob: dropout after the ASPP projection (`head.aspp.project.3`, 0.5).

    Example:
        >>> config = FotfDeepLabV3Config(backbone_depth=18, num_labels=19)
        >>> config.head_width
        128
    """

    model_type = "fotf_deeplabv3"
    default_head_channels = {18: 128, 50: 256, 101: 256}

    def __init__(self, aspp_dropout_prob: float = 0.5, **kwargs):
        self.aspp_dropout_prob = _check_probability("aspp_dropout_prob", aspp_dropout_prob)
        super().__init__(**kwargs)


class FotfPSPNetConfig(FotfSegmentationConfig):
    """PSPNet (CIRKD-v1): dilated ResNetV1b + pyramid pooling (bins 1/2/3/6) + aux FCN head.

    Example:
        >>> FotfPSPNetConfig(backbone_depth=101, num_labels=19).head_width
        512
    """

    model_type = "fotf_pspnet"
    default_head_channels = {18: 128, 50: 512, 101: 512}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
