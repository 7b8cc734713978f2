#!/usr/bin/env python
"""t-SNE of two (or more) students' distillation features on labelled validation pixels (paper A.5).

    python scripts/tsne.py --models outputs/cirkd outputs/cirkd_fotf --names CIRKD CIRKD+FOTF \
        --dataset camvid --root data/camvid --output tsne.png

Pixels are sampled per class from the first --max_batches batches (labels nearest-downsampled to
the feature size), the same way for every student. The logic lives in `fotf_hf.viz.tsne_figure`.
"""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="saved student folders or Hub ids")
    parser.add_argument("--names", nargs="+", help="panel titles (default: the folder names)")
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--root")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--normalization", choices=["imagenet", "cirkd_bgr"],
                        help="default: the first model config's image_normalization, else imagenet")
    parser.add_argument("--dataset_option", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--max_batches", type=int, default=20)
    parser.add_argument("--points_per_class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="tsne.png")
    args = parser.parse_args(argv)
    if args.names and len(args.names) != len(args.models):
        parser.error("give one --names entry per --models entry")

    from fotf_hf.data import SegmentationTransform, build_dataset, create_dataloader
    from fotf_hf.evaluation import load_student, parse_key_values
    from fotf_hf.viz import tsne_figure

    students = [load_student(m) for m in args.models]
    config = students[0].model.config
    normalization = args.normalization or getattr(config, "image_normalization", None) or "imagenet"
    datasets, info = build_dataset(args.dataset, root=args.root, **parse_key_values(args.dataset_option))
    transform = SegmentationTransform(train=False, num_labels=info.num_labels, normalization=normalization)
    loader = create_dataloader(datasets[args.split].with_transform(transform), batch_size=1, train=False)
    names = args.names or [str(m).rstrip("/").split("/")[-1] for m in args.models]
    path = tsne_figure(list(zip(names, students)), loader, args.output, id2label=info.id2label,
                       palette=info.palette, points_per_class=args.points_per_class,
                       max_batches=args.max_batches, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
