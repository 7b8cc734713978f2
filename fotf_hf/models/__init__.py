"""Segmentation models: CIRKD-v1 DeepLabV3 / PSPNet as transformers models, SegFormer, one adapter.

Importing this package registers `fotf_deeplabv3` / `fotf_pspnet` with `AutoConfig` and
`AutoModelForSemanticSegmentation` (see `modeling_deeplabv3.py`, `modeling_pspnet.py`).
"""

from .configuration_fotf import FotfDeepLabV3Config, FotfPSPNetConfig
from .convert import ConversionReport, convert_cirkd_checkpoint, convert_cirkd_state_dict, load_cirkd_state_dict
from .factory import ARCHS, BACKBONES, create_model, list_models
from .modeling_deeplabv3 import FotfDeepLabV3ForSemanticSegmentation
from .modeling_pspnet import FotfPSPNetForSemanticSegmentation
from .outputs import SegmentationFeatures, SegmentationModelOutput
from .resnet import ResNetV1b
from .segformer import MIT_VARIANTS
from .adapter import SegmentationAdapter, eval_mode, module_device, set_mc_dropout_p

__all__ = [
    "ARCHS",
    "BACKBONES",
    "MIT_VARIANTS",
    "ConversionReport",
    "FotfDeepLabV3Config",
    "FotfDeepLabV3ForSemanticSegmentation",
    "FotfPSPNetConfig",
    "FotfPSPNetForSemanticSegmentation",
    "ResNetV1b",
    "SegmentationFeatures",
    "SegmentationModelOutput",
    "SegmentationAdapter",
    "convert_cirkd_checkpoint",
    "convert_cirkd_state_dict",
    "create_model",
    "list_models",
    "load_cirkd_state_dict",
    "eval_mode",
    "module_device",
    "set_mc_dropout_p",
]
