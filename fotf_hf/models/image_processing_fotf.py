"""Image processor of the CIRKD-v1 DeepLabV3 / PSPNet students (`fotf_deeplabv3`, `fotf_pspnet`).

`FotfImageProcessor` turns images into the `pixel_values` a model was trained on and its logits
back into label maps, exactly as `fotf_hf.evaluation` does:

- optional resize to `size` = `{"height", "width"}` (PIL bilinear, as `data.eval_size`; off by
  default: native resolution);
- normalisation `out[c] = image[channel c of channel_order] * scale[c] + offset[c]` in float32,
  the arithmetic of `fotf_hf.data.transforms.normalize_image`, with the standard fields
  (`imagenet`: RGB, `rescale_factor` 1/255, ImageNet mean/std; `cirkd_bgr`: BGR, no rescale, the
  Caffe mean, std 1; see `for_normalization`);
- `post_process_semantic_segmentation`: logits (1/8 of the input for these models) upsampled
  bilinearly with `align_corners=True` (the evaluation's CIRKD protocol), then argmax.

Only numpy, torch and transformers are imported, so the file travels next to a model's weights as
remote code (`auto_map` in `preprocessor_config.json`, see `fotf_hf/models/remote_code.py`).
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import PILImageResampling
from transformers.processing_utils import ImagesKwargs

__all__ = ["FotfImageProcessor", "IMAGE_NORMALIZATION_SETTINGS"]

# The two normalisations of fotf_hf/data/transforms.py in the standard image-processor fields.
IMAGE_NORMALIZATION_SETTINGS = {
    "imagenet": {"channel_order": "rgb", "do_rescale": True, "rescale_factor": 1 / 255,
                 "image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225)},
    "cirkd_bgr": {"channel_order": "bgr", "do_rescale": False, "rescale_factor": 1 / 255,
                  "image_mean": (104.00698793, 116.66876762, 122.67891434), "image_std": (1.0, 1.0, 1.0)},
}
CHANNEL_ORDERS = {"rgb": (0, 1, 2), "bgr": (2, 1, 0)}


class FotfImageProcessorKwargs(ImagesKwargs, total=False):
    """`channel_order`: `rgb` or `bgr`, the order of the channels the model expects."""

    channel_order: str


class FotfImageProcessor(PilBackend):
    """Pre- and post-processing of `fotf_deeplabv3` / `fotf_pspnet` models (see the module docstring).

    Example:
        >>> processor = FotfImageProcessor.for_normalization("cirkd_bgr")
        >>> processor(images=Image.new("RGB", (64, 48)), return_tensors="pt")["pixel_values"].shape
        torch.Size([1, 3, 48, 64])
    """

    valid_kwargs = FotfImageProcessorKwargs
    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BILINEAR
    do_resize = False
    size = None
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGE_NORMALIZATION_SETTINGS["imagenet"]["image_mean"]
    image_std = IMAGE_NORMALIZATION_SETTINGS["imagenet"]["image_std"]
    do_convert_rgb = True
    channel_order = "rgb"

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order = {self.channel_order!r} is not accepted; accepted: {list(CHANNEL_ORDERS)}")
        if self.do_resize and not (self.size and self.size.height and self.size.width):
            raise ValueError(f"do_resize needs size = {{'height': h, 'width': w}}, got size = {self.size!r}")

    @classmethod
    def for_normalization(cls, normalization: str, size: Optional[Sequence[int]] = None) -> "FotfImageProcessor":
        """The processor of a model trained with `normalization` (`imagenet` | `cirkd_bgr`).

        Args:
            normalization: the model's `config.image_normalization` / the run's `data.normalization`.
            size: `(h, w)` to resize every image to (the run's `data.eval_size`), or None for native size.
        """
        if normalization not in IMAGE_NORMALIZATION_SETTINGS:
            raise ValueError(
                f"image normalization {normalization!r} is not known; accepted: {list(IMAGE_NORMALIZATION_SETTINGS)}"
            )
        resize = {} if size is None else {"do_resize": True, "size": {"height": int(size[0]), "width": int(size[1])}}
        return cls(**IMAGE_NORMALIZATION_SETTINGS[normalization], **resize)

    def _preprocess(self, images: List[np.ndarray], do_resize: bool, size, resample, do_rescale: bool,
                    rescale_factor: float, do_normalize: bool, image_mean, image_std, channel_order: str,
                    return_tensors=None, **kwargs) -> BatchFeature:
        """`(3, H, W)` uint8 arrays -> `pixel_values`: `(3, H', W')` float32 each (a tensor batch with `return_tensors="pt"`)."""
        scale, offset = _scale_offset(do_rescale, rescale_factor, do_normalize, image_mean, image_std)
        order = CHANNEL_ORDERS[channel_order]
        processed = []
        for image in images:
            if do_resize:
                image = self.resize(image=image, size=size, resample=resample)
            out = np.empty(image.shape, dtype=np.float32)
            for c in range(3):
                np.multiply(image[order[c]], scale[c], out=out[c], casting="unsafe")
                out[c] += offset[c]
            processed.append(out)
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

    def post_process_semantic_segmentation(
        self, outputs, target_sizes: Optional[Sequence[Tuple[int, int]]] = None
    ) -> List[torch.Tensor]:
        """Label maps from a model output.

        Args:
            outputs: anything with `logits` `(B, C, h, w)`.
            target_sizes: `(H, W)` per image (e.g. the original image sizes); None keeps `h x w`.

        Returns:
            B int64 tensors `(H, W)`: argmax of the logits upsampled bilinearly with `align_corners=True`.
        """
        logits = outputs.logits
        if target_sizes is None:
            return list(logits.argmax(dim=1))
        if len(target_sizes) != len(logits):
            raise ValueError(f"target_sizes has {len(target_sizes)} entries for a batch of {len(logits)} logits")
        maps = []
        for one, target in zip(logits, target_sizes):
            size = tuple(int(v) for v in target)
            one = one[None].float()
            if tuple(one.shape[-2:]) != size:
                one = F.interpolate(one, size=size, mode="bilinear", align_corners=True)
            maps.append(one[0].argmax(dim=0))
        return maps


def _scale_offset(do_rescale, rescale_factor, do_normalize, image_mean, image_std):
    """Per-channel float32 `scale`, `offset` with `out = x * scale + offset` (rescale then normalise folded)."""
    rescale = float(rescale_factor) if do_rescale else 1.0
    mean = np.broadcast_to(np.asarray(image_mean if do_normalize else 0.0, dtype=np.float64), (3,))
    std = np.broadcast_to(np.asarray(image_std if do_normalize else 1.0, dtype=np.float64), (3,))
    return [np.float32(rescale / s) for s in std], [np.float32(-m / s) for m, s in zip(mean, std)]
