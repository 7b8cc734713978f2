#!/usr/bin/env python
"""Export a saved segmentation model (DeepLabV3 / PSPNet / SegFormer) to ONNX.

    python scripts/export_onnx.py --model outputs/demo/kd_fotf              # -> outputs/demo/kd_fotf/model.onnx
    python scripts/export_onnx.py --model DIR --output student.onnx

Input `pixel_values` `(batch, 3, height, width)` float32, normalised as the model's image processor
does; output `logits` `(batch, num_labels, h, w)` at the model's resolution (1/8 of the input for
DeepLabV3 / PSPNet, 1/4 for SegFormer, rounded up; not upsampled); batch, height and width are
dynamic. The file is checked in onnxruntime against eager PyTorch on three batch / image sizes
(--no_verify skips that). Prints one JSON line; exit status 2 with a one-line error when the model
folder, the output path or an operator is not supported. Logic: `fotf_hf.export.export_onnx`.
"""

import argparse
import json
import sys

from fotf_hf.export import ExportError, export_onnx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder written by save_pretrained (config.json + weights)")
    parser.add_argument("--output", help="the .onnx file to write (default: <model>/model.onnx)")
    parser.add_argument("--no_verify", action="store_true", help="skip the onnxruntime-vs-eager check")
    args = parser.parse_args(argv)
    try:
        result = export_onnx(args.model, args.output, verify=not args.no_verify)
    except (FileNotFoundError, IsADirectoryError, ValueError, ExportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.pop("metadata")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
