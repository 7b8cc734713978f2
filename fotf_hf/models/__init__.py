"""Segmentation models: CIRKD-v1 DeepLabV3 / PSPNet as transformers models, SegFormer, one adapter.

Importing this package registers `fotf_deeplabv3` / `fotf_pspnet` with `AutoConfig`,
`AutoModelForSemanticSegmentation` and `AutoImageProcessor`. The registration lives here, not in the
modeling files, because those files also travel next to the weights as remote code
(`remote_code.py`), where registering would make the first folder loaded serve every later one.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

from .configuration_fotf import FotfDeepLabV3Config, FotfPSPNetConfig
from .convert import ConversionReport, convert_cirkd_checkpoint, convert_cirkd_state_dict, load_cirkd_state_dict
from .factory import ARCHS, BACKBONES, create_model, list_models
from .image_processing_fotf import FotfImageProcessor
from .modeling_deeplabv3 import FotfDeepLabV3ForSemanticSegmentation
from .modeling_pspnet import FotfPSPNetForSemanticSegmentation
from .outputs import SegmentationFeatures, SegmentationModelOutput
from .resnet import ResNetV1b
from .segformer import MIT_VARIANTS
from .adapter import SegmentationAdapter, eval_mode, module_device, set_mc_dropout_p
from .remote_code import warn_if_no_image_processor, write_inference_files

# exist_ok: re-imports (and remote code registered earlier in the process) are replaced, not refused.
for _model_class in (FotfDeepLabV3ForSemanticSegmentation, FotfPSPNetForSemanticSegmentation):
    AutoConfig.register(_model_class.config_class.model_type, _model_class.config_class, exist_ok=True)
    AutoModelForSemanticSegmentation.register(_model_class.config_class, _model_class, exist_ok=True)
    AutoImageProcessor.register(_model_class.config_class, image_processor_classes={"pil": FotfImageProcessor},
                                exist_ok=True)
del _model_class

__all__ = [
    "ARCHS",
    "BACKBONES",
    "MIT_VARIANTS",
    "ConversionReport",
    "FotfDeepLabV3Config",
    "FotfDeepLabV3ForSemanticSegmentation",
    "FotfImageProcessor",
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
    "warn_if_no_image_processor",
    "write_inference_files",
]
