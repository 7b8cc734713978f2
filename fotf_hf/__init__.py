"""fotf-hf: Focus on the Fog (student MC-dropout uncertainty-weighted distillation) for semantic segmentation."""

__version__ = "0.1.0"

# Importing the models registers our configs/models with the transformers Auto classes, so that
# `AutoModelForSemanticSegmentation.from_pretrained(folder)` works after `import fotf_hf`.
from . import models  # noqa: E402,F401
