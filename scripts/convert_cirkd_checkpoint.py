#!/usr/bin/env python
"""Convert a CIRKD-v1 / Af-DCD checkpoint (.pth) into a transformers model folder.

    python scripts/convert_cirkd_checkpoint.py deeplabv3_resnet101_citys_best_model.pth \\
        --arch deeplabv3 --backbone resnet101 --num_labels 19 --id2label cityscapes_id2label.json \\
        --output teachers/dlv3-r101-citys

Accepts full segmentation checkpoints (pretrained.*, head.*, auxlayer.*) and deep-stem ImageNet
backbones (conv1.*, layer*.*, fc.*; the heads then start random). The folder loads with
`AutoModelForSemanticSegmentation.from_pretrained(folder)` after `import fotf_hf`; its config says
`image_normalization: cirkd_bgr` (BGR, 0-255, minus the Caffe mean, no std), the preprocessing
CIRKD weights expect. See fotf_hf/models/convert.py.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _id2label(value):
    if value is None:
        return None
    text = Path(value).read_text() if Path(value).is_file() else value
    return {int(k): v for k, v in json.loads(text).items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="CIRKD .pth (plain state dict, or wrapped under state_dict / model)")
    parser.add_argument("--arch", required=True, choices=["deeplabv3", "pspnet"])
    parser.add_argument("--backbone", required=True, choices=["resnet18", "resnet50", "resnet101"])
    parser.add_argument("--num_labels", "--num-labels", type=int, default=None,
                        help="classes (default: read from the classifier; required for ImageNet backbones)")
    parser.add_argument("--id2label", default=None, help="JSON object {id: name}, inline or a file path")
    parser.add_argument("--mc_dropout_p", "--mc-dropout-p", type=float, default=0.1,
                        help="dropout before the classifier (the FOTF MC site; CIRKD uses 0.1)")
    parser.add_argument("--strict", action="store_true", help="refuse missing or unexpected keys")
    parser.add_argument("--output", required=True, help="output folder (config.json + model.safetensors)")
    args = parser.parse_args(argv)

    from fotf_hf.models.convert import convert_cirkd_checkpoint

    try:
        report = convert_cirkd_checkpoint(
            args.checkpoint, args.output, args.arch, args.backbone, num_labels=args.num_labels,
            id2label=_id2label(args.id2label), strict=args.strict, mc_dropout_p=args.mc_dropout_p,
        )
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as err:
        print(f"conversion failed: {err}", file=sys.stderr)
        return 1
    print(report.summary())
    print(f"saved to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
