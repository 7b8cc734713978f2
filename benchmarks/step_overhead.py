#!/usr/bin/env python
"""Step time of the library's training loop versus a minimal hand-written PyTorch KD step.

Both train the same student (DeepLabV3-R18) against the same frozen teacher (DeepLabV3-R18 at
full width) with CE + 0.4 aux + KD on the same synthetic batches, with the same optimiser.
The loop's time per step comes from `train()`'s own per-step timer (data loading, forward,
losses, backward, optimiser; no evaluation or checkpointing); the hand-written step is timed
around the same work. Medians over steps after warm-up; one JSON object is printed:

    {"ratio": loop/manual, "loop_step_s": ..., "manual_step_s": ..., "settings": {...}}

Target: ratio <= 1.05.  Run: python benchmarks/step_overhead.py [--steps 30] [--batch 4]
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F


def manual_steps(student, teacher, loader, steps, lr):
    """The smallest correct KD step: no Accelerate, no config, no logging."""
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    student.train()
    times = []
    it = iter(loader)
    for _ in range(steps):
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        x, y = batch["pixel_values"], batch["labels"]
        with torch.no_grad():
            t_logits = teacher(x).logits
        out = student(x)
        up = F.interpolate(out.logits, size=y.shape[-2:], mode="bilinear", align_corners=True)
        aux = F.interpolate(out.aux_logits, size=y.shape[-2:], mode="bilinear", align_corners=True)
        ce = F.cross_entropy(up, y, ignore_index=255) + 0.4 * F.cross_entropy(aux, y, ignore_index=255)
        c = out.logits.shape[1]
        kd = F.kl_div(
            F.log_softmax(out.logits.permute(0, 2, 3, 1).reshape(-1, c), 1),
            F.softmax(t_logits.permute(0, 2, 3, 1).reshape(-1, c), 1),
            reduction="batchmean",
        )
        loss = ce + kd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=[96, 128])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from fotf_hf.config import load_config
    from fotf_hf.data import SegmentationTransform, build_dataset, create_dataloader
    from fotf_hf.models import SegmentationAdapter, create_model
    from fotf_hf.training import train
    from fotf_hf.data import SeededTransformDataset

    h, w = args.size
    data_opts = {"num_train": max(4 * args.batch, 16), "num_val": 2, "image_size": [h, w], "seed": 0}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        datasets, info = build_dataset("synthetic-streets", **data_opts)
        teacher_model = create_model("deeplabv3", "resnet18", num_labels=info.num_labels, id2label=info.id2label)
        teacher_model.save_pretrained(tmp / "teacher")
        common = [
            "--data.options", json.dumps(data_opts), "--data.crop_size", json.dumps([h, w]),
            "--student.overrides", json.dumps({"backbone_base_width": 32}),
            "--optim.batch_size", str(args.batch), "--optim.lr", "0.01",
            "--run.report_to", "[]", "--run.num_panels", "0", "--run.progress_bar", "false",
            "--run.eval_every", "100000", "--run.save_every", "100000",
            "--data.max_eval_samples", "1",
        ]
        cfg = load_config(None, common + [
            "--method.name", "kd", "--teacher.arch", "deeplabv3", "--teacher.backbone", "resnet18",
            "--teacher.pretrained", str(tmp / "teacher"),
            "--optim.max_steps", str(args.steps + args.warmup), "--run.output_dir", str(tmp / "loop"),
        ])
        loop_times = train(cfg)["step_times_s"][args.warmup:]

        torch.manual_seed(0)
        student = create_model("deeplabv3", "resnet18", num_labels=info.num_labels, id2label=info.id2label,
                               backbone_base_width=32)
        teacher = SegmentationAdapter(create_model("deeplabv3", "resnet18", num_labels=info.num_labels,
                                                   id2label=info.id2label)).eval()
        tf = SegmentationTransform(train=True, crop_size=(h, w), scale_range=(0.5, 2.0), normalization="imagenet",
                                   num_labels=info.num_labels)
        loader = create_dataloader(SeededTransformDataset(datasets["train"], tf), batch_size=args.batch, train=True)
        manual = manual_steps(student, teacher, loader, args.steps + args.warmup, 0.01)[args.warmup:]

    loop_s, manual_s = statistics.median(loop_times), statistics.median(manual)
    print(json.dumps({
        "ratio": round(loop_s / manual_s, 4),
        "loop_step_s": round(loop_s, 4),
        "manual_step_s": round(manual_s, 4),
        "settings": {"student": "deeplabv3-r18 (base width 32)", "teacher": "deeplabv3-r18", "batch": args.batch,
                     "size": [h, w], "steps": args.steps, "threads": torch.get_num_threads(), "device": "cpu"},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
