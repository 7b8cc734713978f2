#!/usr/bin/env python
"""Evaluate a saved student: per-class IoU, mIoU, ECE (10 bins) and pixel accuracy.

    python scripts/evaluate.py --model outputs/demo/kd_fotf --dataset synthetic-streets [--flip] \
        [--scales 0.75 1 1.25] [--mc_samples 5]
    ACCELERATE_USE_CPU=1 accelerate launch --config_file accelerate_configs/cpu_2proc.yaml scripts/evaluate.py \
        --model DIR --dataset camvid --root data/camvid

Prints a Markdown table and writes `metrics.json` (merged into an existing one under "evaluations",
one entry per split and setting), `reliability.png` and the model card `README.md` into --output_dir (default: the model folder).
Exact with several processes (see `fotf_hf.evaluation.evaluate_model`). The logic lives in
`fotf_hf.evaluation.run_evaluation`.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved student folder or Hub id")
    parser.add_argument("--dataset", required=True,
                        help="camvid | cityscapes | voc | hub | synthetic-streets")
    parser.add_argument("--root", help="dataset folder")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--flip", action="store_true", help="average with the flipped image's prediction")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="input scales to average over")
    parser.add_argument("--mc_samples", type=int, default=0, help="T >= 2: MC-dropout predictive mean")
    parser.add_argument("--batch_size", type=int, default=1, help="per process (> 1 needs equal image sizes)")
    parser.add_argument("--normalization", choices=["imagenet", "cirkd_bgr"],
                        help="default: the model config's image_normalization, else imagenet")
    parser.add_argument("--eval_size", type=int, nargs=2, metavar=("H", "W"),
                        help="resize images (and, nearest, labels) to H x W; default: native resolution")
    parser.add_argument("--output_dir", help="default: the model folder")
    parser.add_argument("--dataset_option", nargs="*", default=[], metavar="KEY=VALUE",
                        help="builder options, e.g. num_val=16 image_size=[96,128]")
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    from fotf_hf.evaluation import parse_key_values, run_evaluation

    run_evaluation(
        args.model, args.dataset, root=args.root, split=args.split, flip=args.flip, scales=args.scales,
        mc_samples=args.mc_samples, batch_size=args.batch_size, normalization=args.normalization,
        output_dir=args.output_dir, eval_size=args.eval_size, dataset_options=parse_key_values(args.dataset_option),
        accelerator=Accelerator(),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
