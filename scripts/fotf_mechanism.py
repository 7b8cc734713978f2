#!/usr/bin/env python
"""Where FOTF's weights go: a trained student's FOTF weights on a labelled split, on boundary pixels
(within `--radius` px of a label edge) vs interior ones, overall and per ground-truth class, next
to the student's error rate there (study v2's mechanism measurement, RESULTS.md).

    python scripts/fotf_mechanism.py --model DIR --dataset camvid --root data/camvid --split test \
        --eval_size 180 240 --kappa 10 --m 1 [--merge per_pixel] [--mc_samples 5] [--output FILE.json]

The weights are those of training (`fotf_hf.fotf`: T exact MC-dropout passes, eq. 6 sigma at the
logit resolution, the merge, eq. 7), with the student in eval mode (BatchNorm running statistics,
only the dropout sites random), upsampled as the CE loss does (bilinear, `align_corners=True`) and
read at each pixel's label class where the merge keeps classes. For a student trained without FOTF
they are the weights FOTF would give it. Errors are those of the deterministic prediction.
Prints a Markdown table and writes the JSON (default: `<model>/mechanism_<split>.json`).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from fotf_hf.data import IGNORE_INDEX, SegmentationTransform, build_dataset, create_dataloader
from fotf_hf.evaluation import load_student, parse_key_values
from fotf_hf.fotf import MERGES, WEIGHTINGS, merge_sigma, streamed_std, uncertainty_weights

REGIONS = ("boundary", "interior")


def boundary_mask(labels: torch.Tensor, radius: int = 3, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """`(B, H, W)` bool: pixels within `radius` px (max-norm) of a label edge.

    An edge pixel is a labelled pixel with a 4-neighbour of another (labelled) class; both pixels of
    such a pair are edge pixels. Ignored pixels are never edges (their own mask value is still set
    when they are near one; callers drop them with the valid mask).
    """
    valid = labels != ignore_index
    edge = torch.zeros_like(valid)
    for dim in (1, 2):
        a, b = labels.narrow(dim, 0, labels.shape[dim] - 1), labels.narrow(dim, 1, labels.shape[dim] - 1)
        va, vb = valid.narrow(dim, 0, labels.shape[dim] - 1), valid.narrow(dim, 1, labels.shape[dim] - 1)
        differs = (a != b) & va & vb
        edge.narrow(dim, 0, labels.shape[dim] - 1).logical_or_(differs)
        edge.narrow(dim, 1, labels.shape[dim] - 1).logical_or_(differs)
    near = F.max_pool2d(edge[:, None].float(), kernel_size=2 * radius + 1, stride=1, padding=radius)
    return near[:, 0] > 0


def pixel_weights(student, pixel_values: torch.Tensor, labels: torch.Tensor, kappa: float, m: float,
                  weighting: str, merge: str, mc_samples: int, generator: torch.Generator):
    """`(weight, sigma, prediction)`, each `(B, H, W)` at the label size: the FOTF weight and merged
    sigma read at each pixel's label class, and the deterministic argmax prediction."""
    features = student.forward_features(pixel_values)
    sigma = streamed_std(student.sample_logits(mc_samples, features=features, generator=generator))
    merged = merge_sigma(sigma, merge)
    weight = uncertainty_weights(sigma, m=m, kappa=kappa, weighting=weighting, merge=merge)
    size = labels.shape[-2:]
    target = torch.where(labels == IGNORE_INDEX, 0, labels).long()[:, None]

    def at_labels(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (1, 1):
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        x = x.expand(labels.shape[0], -1, *size)
        return x[:, 0] if x.shape[1] == 1 else x.gather(1, target)[:, 0]

    logits, _ = student.forward_head(features.head_input)  # eval mode: the deterministic prediction
    pred = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=True).argmax(1)
    return at_labels(weight), at_labels(merged), pred


class RegionSums:
    """Running sums of weight, sigma, errors and pixel count per (region, label class)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.sums = torch.zeros(4, len(REGIONS) * num_classes, dtype=torch.float64)

    def update(self, weight, sigma, pred, labels, boundary) -> None:
        valid = labels != IGNORE_INDEX
        index = (torch.where(boundary, 0, 1) * self.num_classes + labels.long())[valid]
        n = len(REGIONS) * self.num_classes
        for row, values in enumerate((weight, sigma, (pred != labels).double(), torch.ones_like(weight))):
            self.sums[row] += torch.bincount(index, weights=values[valid].double(), minlength=n)

    def table(self, id2label) -> dict:
        """`{"overall" | class name: {region: {weight_mean, sigma_mean, error_rate, pixels}}}`."""
        sums = self.sums.view(4, len(REGIONS), self.num_classes)

        def cell(s):
            count = float(s[3])
            means = [float(s[i]) / count if count else float("nan") for i in range(3)]
            return dict(zip(("weight_mean", "sigma_mean", "error_rate"), means), pixels=int(count))

        out = {"overall": {r: cell(sums[:, i].sum(-1)) for i, r in enumerate(REGIONS)}}
        for c in range(self.num_classes):
            out[id2label.get(c, str(c))] = {r: cell(sums[:, i, c]) for i, r in enumerate(REGIONS)}
        return out


def markdown(table: dict) -> str:
    lines = ["| class | weight boundary | weight interior | sigma boundary | sigma interior | error boundary | "
             "error interior | boundary share |", "| --- |" + " --- |" * 7]
    for name, cells in table.items():
        b, i = cells["boundary"], cells["interior"]
        share = b["pixels"] / max(1, b["pixels"] + i["pixels"])
        lines.append(f"| {name} | {b['weight_mean']:.4g} | {i['weight_mean']:.4g} | {b['sigma_mean']:.4g} | "
                     f"{i['sigma_mean']:.4g} | {b['error_rate']:.3f} | {i['error_rate']:.3f} | {share:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="saved student folder")
    parser.add_argument("--dataset", required=True, help="camvid | cityscapes | voc | hub | synthetic-streets")
    parser.add_argument("--root", help="dataset folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--dataset_option", nargs="*", default=[], metavar="KEY=VALUE",
                        help="builder options, e.g. num_val=16 image_size=[96,128]")
    parser.add_argument("--eval_size", type=int, nargs=2, metavar=("H", "W"), help="default: native resolution")
    parser.add_argument("--kappa", type=float, required=True)
    parser.add_argument("--m", type=float, required=True)
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="power")
    parser.add_argument("--merge", choices=MERGES, default="per_pixel", help="default: the KD term's literal merge")
    parser.add_argument("--mc_samples", type=int, default=5, help="T (>= 2)")
    parser.add_argument("--radius", type=int, default=3, help="boundary: within this many px of a label edge")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="seed of the dropout masks")
    parser.add_argument("--output", help="JSON file (default: <model>/mechanism_<split>.json)")
    args = parser.parse_args(argv)
    if args.mc_samples < 2:
        parser.error("--mc_samples must be >= 2 (sigma needs two passes)")

    student = load_student(args.model).eval()
    datasets, info = build_dataset(args.dataset, root=args.root, **parse_key_values(args.dataset_option))
    if args.split not in datasets:
        parser.error(f"dataset {args.dataset!r} has no split {args.split!r}; it has: {', '.join(datasets)}")
    normalization = getattr(student.model.config, "image_normalization", None) or "imagenet"
    transform = SegmentationTransform(train=False, num_labels=info.num_labels, normalization=normalization,
                                      resize=None if args.eval_size is None else tuple(args.eval_size))
    loader = create_dataloader(datasets[args.split].with_transform(transform), batch_size=args.batch_size, train=False)
    generator = torch.Generator().manual_seed(args.seed)
    sums = RegionSums(info.num_labels)
    with torch.no_grad():
        for batch in loader:
            labels = batch["labels"]
            weight, sigma, pred = pixel_weights(student, batch["pixel_values"], labels, args.kappa, args.m,
                                                args.weighting, args.merge, args.mc_samples, generator)
            sums.update(weight, sigma, pred, labels, boundary_mask(labels, args.radius))
    table = sums.table(dict(info.id2label))
    print(markdown(table))
    out = Path(args.output or Path(args.model) / f"mechanism_{args.split}.json")
    settings = {k: getattr(args, k) for k in ("model", "dataset", "split", "eval_size", "kappa", "m", "weighting",
                                             "merge", "mc_samples", "radius", "seed")}
    tmp = out.with_name(f".tmp_{out.name}")
    tmp.write_text(json.dumps({"settings": settings, "regions": table}, indent=1))
    os.replace(tmp, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
