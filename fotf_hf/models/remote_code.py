"""Make a saved model folder usable for inference without this library: image processor + remote code.

`write_inference_files(folder)` writes into a `save_pretrained` folder:

- `preprocessor_config.json`: the image processor that reproduces the model's training
  normalisation (and the evaluation's resize, if any). `fotf_deeplabv3` / `fotf_pspnet` models, and
  any model trained with `cirkd_bgr`, get `FotfImageProcessor` (its source `image_processing_fotf.py`
  is copied and named in `config.json`'s `auto_map`, see `_drop_processor_type`); other models
  (SegFormer) trained with `imagenet` get transformers' own `SegformerImageProcessor`, so they stay
  plain transformers folders.
- for `fotf_deeplabv3` / `fotf_pspnet`: the modeling and configuration source files (the modeling
  file and everything it imports relatively, found by transformers' `get_relative_import_files`)
  and `auto_map` in `config.json`, the transformers custom-model convention. Then
  `AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True)` and
  `pipeline("image-segmentation", model=folder, trust_remote_code=True)` work where fotf-hf is not
  installed; after `import fotf_hf` the installed classes are used (transformers prefers
  registered local code), with or without `trust_remote_code`.

The files are copied as they are: the modeling files import only torch, transformers and each other,
and do not register themselves with the Auto classes (`fotf_hf/models/__init__.py` does), so remote
code loaded from one folder never takes over the `fotf_*` model types for other folders.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Union

from transformers.dynamic_module_utils import get_relative_import_files
from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil
from transformers.utils import IMAGE_PROCESSOR_NAME

from .image_processing_fotf import FotfImageProcessor
from .modeling_deeplabv3 import FotfDeepLabV3ForSemanticSegmentation
from .modeling_pspnet import FotfPSPNetForSemanticSegmentation

logger = logging.getLogger(__name__)

__all__ = ["REMOTE_CODE_MODELS", "has_image_processor", "warn_if_no_image_processor", "write_inference_files"]

# model_type -> the class whose source travels with the weights.
REMOTE_CODE_MODELS = {
    "fotf_deeplabv3": FotfDeepLabV3ForSemanticSegmentation,
    "fotf_pspnet": FotfPSPNetForSemanticSegmentation,
}


def _class_ref(cls) -> str:
    """`auto_map` entry: `<module file name>.<class name>`, e.g. `modeling_pspnet.FotfPSPNetForSemanticSegmentation`."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def write_inference_files(
    folder: Union[str, os.PathLike],
    normalization: Optional[str] = None,
    size: Optional[Sequence[int]] = None,
) -> List[Path]:
    """Write the image processor, and for our DeepLabV3/PSPNet the remote code, into a saved model folder.

    Args:
        folder: a folder written by `save_pretrained` (holds `config.json`); updated in place.
        normalization: `imagenet` | `cirkd_bgr`, what the model was trained with (a run's
            `data.normalization`); default the config's `image_normalization`, else `imagenet`.
        size: `(h, w)` the evaluation resized images to (a run's `data.eval_size`); None = native
            resolution. Label maps always come back at the input image's size.

    Returns:
        the files written or updated, `preprocessor_config.json` first.

    Raises:
        FileNotFoundError: `folder/config.json` is missing.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: write_inference_files needs a folder written by save_pretrained"
        )
    config = json.loads(config_path.read_text())
    model_type = config.get("model_type")
    normalization = normalization or config.get("image_normalization") or "imagenet"
    model_class = REMOTE_CODE_MODELS.get(model_type)
    written: List[Path] = []
    auto_map = {}

    if model_class is None and normalization == "imagenet":
        resize = {"do_resize": False} if size is None else {"size": {"height": int(size[0]), "width": int(size[1])}}
        written += SegformerImageProcessorPil(do_reduce_labels=False, **resize).save_pretrained(folder)
    else:
        processor = FotfImageProcessor.for_normalization(normalization, size)
        written += processor.save_pretrained(folder)
        _drop_processor_type(folder / IMAGE_PROCESSOR_NAME)
        auto_map["AutoImageProcessor"] = _class_ref(FotfImageProcessor)
        written += _copy_sources(FotfImageProcessor, folder)
    if model_class is not None:
        auto_map["AutoConfig"] = _class_ref(model_class.config_class)
        auto_map["AutoModelForSemanticSegmentation"] = _class_ref(model_class)
        written += _copy_sources(model_class, folder)
    if auto_map:
        config["auto_map"] = auto_map
        tmp = folder / ".tmp_config.json"
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, config_path)
        written.append(config_path)
    return list(dict.fromkeys(Path(p) for p in written))


def _copy_sources(cls, folder: Path) -> List[Path]:
    """Copy the file defining `cls` and its relative imports into `folder` (what `custom_object_save` copies)."""
    module_file = sys.modules[cls.__module__].__file__
    copied = []
    for source in [module_file] + sorted(get_relative_import_files(module_file)):
        copied.append(Path(shutil.copyfile(source, folder / Path(source).name)))
    return copied


def _drop_processor_type(path: Path) -> None:
    """Remove `image_processor_type` from a saved `preprocessor_config.json`.

    Why: the processor is then resolved through `config.json`'s `auto_map` (remote code) or the
    `AutoImageProcessor` registration of `import fotf_hf` (local code). An `auto_map` in
    `preprocessor_config.json` instead would make every pipeline also look for a *video* processor
    in that remote code and, with fotf-hf imported and no `trust_remote_code`, stop at transformers'
    "run the custom code? [y/N]" prompt.
    """
    data = json.loads(path.read_text())
    data.pop("image_processor_type", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def has_image_processor(folder: Union[str, os.PathLike]) -> bool:
    """Whether a local model folder holds `preprocessor_config.json`."""
    return (Path(folder) / IMAGE_PROCESSOR_NAME).is_file()


def warn_if_no_image_processor(folder: Union[str, os.PathLike]) -> bool:
    """Log a warning saying how to add the processor when a local model folder has none; returns True if warned."""
    folder = Path(folder)
    if not folder.is_dir() or has_image_processor(folder):
        return False
    logger.warning(
        "%s has no %s (saved by an older fotf-hf): it loads, but AutoImageProcessor and "
        "pipeline('image-segmentation') cannot use it. Add the processor and remote code with "
        "`python -c \"from fotf_hf.models import write_inference_files; write_inference_files(%r)\"` "
        "(pass normalization= / size= if the run used data.normalization / data.eval_size other than the "
        "config's image_normalization at native size)",
        folder, IMAGE_PROCESSOR_NAME, str(folder),
    )
    return True
