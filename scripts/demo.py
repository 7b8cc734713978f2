#!/usr/bin/env python
"""The README's demo: the whole FOTF path on the built-in generated dataset, on a CPU.

1. train a teacher (CE) on synthetic-streets;
2. distil a narrow student with vanilla KD, and with KD + FOTF;
3. evaluate all three, write their folders (weights, model card, pictures);
4. reload the KD+FOTF student with `AutoModelForSemanticSegmentation.from_pretrained` and check
   that it reproduces the evaluated numbers;
5. print a comparison table (mIoU, ECE, wall time).

    python scripts/demo.py [--output_dir outputs/demo] [--steps N] [--set key=value ...]

Each stage is the same call `scripts/distill.py` makes; the equivalent commands are printed.
"""

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "scripts" / "configs" / "demo"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--steps", type=int, default=None, help="override optim.max_steps of every stage")
    args, extra = parser.parse_known_args(argv)

    from transformers import AutoModelForSemanticSegmentation

    import fotf_hf  # noqa: F401  (registers our models with the Auto classes)
    from fotf_hf.config import load_config
    from fotf_hf.data import create_dataloader
    from fotf_hf.evaluation import evaluate_model, load_student
    from fotf_hf.training import train
    from fotf_hf.training.build import build_data
    from fotf_hf.training.precision import describe_host

    out = Path(args.output_dir)
    teacher_dir = out / "teacher"
    rows = []
    demo_start = time.perf_counter()
    print(f"host: {describe_host()}", flush=True)
    for name in ("teacher", "kd", "kd_fotf"):
        overrides = ["--run.output_dir", str(out / name)] + list(extra)
        if name != "teacher":
            overrides += ["--teacher.pretrained", str(teacher_dir)]
        if args.steps is not None:
            overrides += ["--optim.max_steps", str(args.steps)]
        cfg = load_config(CONFIGS / f"{name}.yaml", overrides)
        print(f"\n=== {name}: accelerate launch scripts/distill.py --config {CONFIGS.relative_to(REPO)}/{name}.yaml "
              + " ".join(overrides), flush=True)
        start = time.perf_counter()
        result = train(cfg)
        rows.append((name, result["final"], time.perf_counter() - start))

    # Reload the FOTF student from disk, as a user would, and evaluate it again.
    cfg = load_config(CONFIGS / "kd_fotf.yaml", ["--teacher.pretrained", str(teacher_dir)] + list(extra))
    _, eval_set, info = build_data(cfg)  # the very validation set the loop scored
    loader = create_dataloader(eval_set, batch_size=cfg.run.eval_batch_size, train=False)
    reloaded = AutoModelForSemanticSegmentation.from_pretrained(out / "kd_fotf")
    # fp32, as the loop evaluates (bf16 autocast is for training steps only).
    again = evaluate_model(load_student(reloaded), loader, num_classes=info.num_labels)
    trained = rows[-1][1]
    same = abs(again["mean_iou"] - trained["mean_iou"]) < 1e-6 and abs(again["ece"] - trained["ece"]) < 1e-6
    print(f"\nreloaded {out / 'kd_fotf'} with AutoModelForSemanticSegmentation.from_pretrained: "
          f"{type(reloaded).__name__}, mIoU {again['mean_iou']:.6f} ECE {again['ece']:.6f} "
          f"(after training: {trained['mean_iou']:.6f} / {trained['ece']:.6f}): {'same' if same else 'DIFFERENT'}")

    print("\n| model | mIoU (%) | ECE (%) | wall time (s) |\n| --- | --- | --- | --- |")
    labels = {"teacher": "teacher (DeepLabV3-R18 half width, CE)", "kd": "student, vanilla KD", "kd_fotf": "student, KD + FOTF"}
    for name, metrics, wall in rows:
        print(f"| {labels[name]} | {100 * metrics['mean_iou']:.2f} | {100 * metrics['ece']:.2f} | {wall:.0f} |")
    summary = {name: {"mean_iou": m["mean_iou"], "ece": m["ece"], "wall_time_s": w} for name, m, w in rows}
    summary["reloaded_kd_fotf_mean_iou"] = again["mean_iou"]
    summary["total_wall_time_s"] = time.perf_counter() - demo_start
    summary["host"] = describe_host()
    print(f"\ndemo wall time: {summary['total_wall_time_s'] / 60:.1f} min on {summary['host']}")
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nfolders, model cards and pictures: {out}/{{teacher,kd,kd_fotf}}; summary: {out / 'demo_summary.json'}")
    if not same:
        print("error: the reloaded student does not reproduce its evaluation", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
