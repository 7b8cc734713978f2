#!/usr/bin/env python
"""How large are sigma and the FOTF weights under each sampling mode? A table for a trained student.

For a saved student and a few batches of a split, runs FOTF as training does (student in train
mode: dropout and batch statistics as in a training step; the main forward caches the features)
with `classifier`, `exact` and `naive` passes from the same seeded generator, and reports sigma
mean / p99 and, for each (kappa, m), the KD and CE weight mean / p99 / max (averaged over
batches; max over batches). Prints a Markdown table and writes JSON next to it when --output is given.

    python scripts/fotf_modes_table.py --model outputs/camvid_cpu/ce --dataset camvid \\
        --root $FOTF_CAMVID_ROOT --split test --size 180 240 --kappa_m 3,1 10,10 7,1 1,3
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from fotf_hf.data import SegmentationTransform, build_dataset, create_dataloader
from fotf_hf.evaluation import load_student
from fotf_hf.fotf import FOTF, FotfConfig

MODES = ("classifier", "exact", "naive")


def measure(student, loader, modes, settings, num_batches, num_samples, seed):
    """{mode: {"sigma_mean", "sigma_p99", "kappa K m M": {weight stats}}} averaged over `num_batches` batches."""
    sums, counts = {}, {}
    student.train()
    for b, batch in enumerate(loader):
        if b == num_batches:
            break
        x = batch["pixel_values"]
        with torch.no_grad():
            features = student(x)
        for mode in modes:
            for kappa, m in settings:
                fotf = FOTF(FotfConfig(enabled=True, num_samples=num_samples, kappa=kappa, m=m, mode=mode))
                result = fotf(student, features, x, generator=torch.Generator().manual_seed(seed + b))
                row = sums.setdefault(mode, {})
                key = f"kappa {kappa:g}, m {m:g}"
                for name, value in result.stats.items():
                    target = row if name.startswith("sigma") else row.setdefault(key, {})
                    v = float(value)
                    if name.endswith("_max"):
                        target[name] = max(target.get(name, 0.0), v)
                    else:
                        target[name] = target.get(name, 0.0) + v
            counts[mode] = counts.get(mode, 0) + 1
    for mode, row in sums.items():
        n = counts[mode]
        for name in list(row):
            if isinstance(row[name], dict):
                row[name] = {k: (v if k.endswith("_max") else v / n) for k, v in row[name].items()}
            else:
                # sigma stats were added once per (kappa, m) setting of the batch
                row[name] /= n * len(settings)
    return sums


def markdown(table, settings) -> str:
    lines = ["| mode | sigma mean | sigma p99 | kappa, m | KD weight mean / p99 / max | CE weight mean / p99 / max |",
             "| --- | --- | --- | --- | --- | --- |"]
    for mode, row in table.items():
        for kappa, m in settings:
            w = row[f"kappa {kappa:g}, m {m:g}"]
            lines.append(
                f"| {mode} | {row['sigma_mean']:.4f} | {row['sigma_p99']:.4f} | {kappa:g}, {m:g} | "
                f"{w['weight_kd_mean']:.3g} / {w['weight_kd_p99']:.3g} / {w['weight_kd_max']:.3g} | "
                f"{w['weight_ce_mean']:.3g} / {w['weight_ce_p99']:.3g} / {w['weight_ce_max']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved student folder")
    parser.add_argument("--dataset", default="camvid")
    parser.add_argument("--root", default=None)
    parser.add_argument("--split", default="test")
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"), help="resize images (eval size)")
    parser.add_argument("--normalization", default=None, help="default: the model config's")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_batches", type=int, default=8)
    parser.add_argument("--num_samples", type=int, default=5)
    parser.add_argument("--kappa_m", nargs="+", default=["5,1"], help="kappa,m pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    settings = [tuple(float(v) for v in pair.split(",")) for pair in args.kappa_m]

    student = load_student(args.model)
    normalization = args.normalization or getattr(student.config, "image_normalization", "imagenet")
    datasets, info = build_dataset(args.dataset, root=args.root)
    if args.split not in datasets:
        parser.error(f"split {args.split!r} not in {list(datasets)}")
    transform = SegmentationTransform(train=False, resize=None if args.size is None else tuple(args.size),
                                      normalization=normalization, num_labels=info.num_labels)
    loader = create_dataloader(datasets[args.split].with_transform(transform), batch_size=args.batch_size,
                               train=False, num_workers=0)
    torch.manual_seed(args.seed)
    table = measure(student, loader, MODES, settings, args.num_batches, args.num_samples, args.seed)
    print(markdown(table, settings))
    if args.output:
        Path(args.output).write_text(json.dumps({
            "table": table, "model": args.model, "dataset": args.dataset, "split": args.split, "size": args.size,
            "batch_size": args.batch_size, "num_batches": args.num_batches, "num_samples": args.num_samples,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
