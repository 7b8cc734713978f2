#!/usr/bin/env python
"""Training-step cost of FOTF (student MC dropout) relative to vanilla KD, in one run.

For each student <- teacher pair (random init; paper's pairs):

    deeplabv3-r18 <- deeplabv3-r101,  pspnet-r18 <- deeplabv3-r101 (paper Table 1's teacher),
    segformer-b0 <- segformer-b1

one training step = teacher forward (eval, no_grad) + `DistillationModule` (student forward in
train mode, FOTF weights, CE + 0.4 aux CE + KD) + backward + SGD step. Variants: vanilla KD, and
KD+FOTF with the student's T passes in each sampling mode for T in --samples: `exact` (the
default: re-run from the first dropout site on cached features), `classifier` (last dropout +
classifier only, an approximation) and `naive` (T full student forwards); plus the teacher-side
row of the paper's Table 6 (`source: teacher`, T = 5, exact and naive passes of the teacher).

Timing: the variants of one pair run interleaved, round-robin, for --repeats rounds of --steps
steps (after --warmup steps each); a round's time of a variant is the median of its steps, its
ratio is that time / the same round's vanilla-KD time, and the reported ratio is the median over
rounds (robust to the load drift of a shared machine). `noise` reports a second, independent
vanilla-KD measurement / the first (the measurement floor).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` of a few steps; on the CPU the peak
resident set size (`VmHWM`, see `peak_rss_bytes`) of a fresh subprocess that builds the
pair and runs --memory-steps steps of one variant; ratio = KD+FOTF (T = --memory-samples) / KD.

Prints ONE JSON object:
    {"ratio": {"<student>": {"exact": {"5": r, ...}, "classifier": {...}, "naive": {...},
                             "teacher_exact": {"5": r}, "teacher_naive": {"5": r}, "noise": r}},
     "step_s": {...}, "peak_memory_ratio": {"<student>": {"exact": r, "classifier": r, "naive": r}},
     "settings": {... "cpu_flags": [...]}}

Targets (CPU, batch 4 x 3 x 180 x 240, exact mode): T=5 <= 1.05 and T=20 <= 1.15 for DeepLabV3-R18
and PSPNet-R18; SegFormer-B0 as measured. Peak memory <= 1.10 in every mode.

    python benchmarks/fotf_overhead.py                       # full run (tens of minutes on 2 cores)
    python benchmarks/fotf_overhead.py --quick               # small smoke settings
    python benchmarks/fotf_overhead.py --pairs segformer-b0 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from fotf_hf.training.precision import cpu_simd_flags  # noqa: E402

PAIRS = {
    "deeplabv3-r18": (("deeplabv3", "resnet18"), ("deeplabv3", "resnet101")),
    "pspnet-r18": (("pspnet", "resnet18"), ("deeplabv3", "resnet101")),
    "segformer-b0": (("segformer", "mit-b0"), ("segformer", "mit-b1")),
}
NUM_LABELS = 19


def build_pair(name: str, quick: bool, seed: int = 0):
    """Student and teacher `SegmentationAdapter`s (random init)."""
    from fotf_hf.models import SegmentationAdapter, create_model

    (s_arch, s_bb), (t_arch, t_bb) = PAIRS[name]
    if quick:  # a cheap teacher keeps --quick quick; the ratio is then vs a cheaper step (pessimistic)
        t_arch, t_bb = s_arch, s_bb
    torch.manual_seed(seed)
    student = SegmentationAdapter(create_model(s_arch, s_bb, num_labels=NUM_LABELS, mc_dropout_p=0.1)).train()
    teacher = SegmentationAdapter(create_model(t_arch, t_bb, num_labels=NUM_LABELS, mc_dropout_p=0.1)).eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    return student, teacher


class _KDCriterion(torch.nn.Module):
    """CE (+0.4 aux) + pixel KD, the terms of the paper's vanilla-KD step."""

    def __init__(self):
        super().__init__()
        from fotf_hf.losses.ce import CELoss
        from fotf_hf.losses.kd import KDLoss

        self.ce, self.kd = CELoss(), KDLoss()

    def forward(self, inputs):
        return {**self.ce(inputs), **self.kd(inputs)}


def make_step(student, teacher, fotf, lr=0.01):
    """One training step through `DistillationModule`, exactly as the training loop composes it."""
    from fotf_hf.training import DistillationModule

    module = DistillationModule(student, _KDCriterion(), fotf)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)

    def step(pixel_values, labels):
        with torch.no_grad():
            t_out = teacher(pixel_values)
        loss = sum(module(pixel_values, labels, teacher_out=t_out, teacher=teacher).terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def make_fotf(mode: str, samples: int, source: str = "student"):
    from fotf_hf.fotf import FOTF, FotfConfig

    # the literal-reading defaults (per_pixel KD, per_class CE), each site's own dropout rate
    return FOTF(FotfConfig(enabled=True, num_samples=samples, kappa=5.0, apply_to="both", mode=mode, source=source))


MODES = ("exact", "classifier", "naive")


def variants(samples, teacher_samples):
    out = [("kd", None, 0), ("kd_again", None, 0)]
    out += [(mode, mode, t) for mode in MODES for t in samples]
    out += [(f"teacher_{mode}", mode, t) for mode in ("exact", "naive") for t in teacher_samples]
    return out


def batch(args, device):
    g = torch.Generator().manual_seed(0)
    h, w = args.size
    x = torch.randn(args.batch, 3, h, w, generator=g).to(device)
    y = torch.randint(0, NUM_LABELS, (args.batch, h, w), generator=g)
    y[:, : h // 10] = 255
    return x, y.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pair(name, args, device):
    student, teacher = build_pair(name, args.quick)
    student.to(device)
    teacher.to(device)
    x, y = batch(args, device)
    steps = {}
    for key, mode, t in variants(args.samples, args.teacher_samples):
        source = "teacher" if key.startswith("teacher_") else "student"
        steps[(key, t)] = make_step(student, teacher, None if mode is None else make_fotf(mode, t, source))
    # All variants share one student: its weights drift a little over the run, identically for all.
    for fn in steps.values():
        for _ in range(args.warmup):
            fn(x, y)
    rounds = {k: [] for k in steps}
    for _ in range(args.repeats):
        for k, fn in steps.items():
            times = []
            for _ in range(args.steps):
                sync(device)
                t0 = time.perf_counter()
                fn(x, y)
                sync(device)
                times.append(time.perf_counter() - t0)
            rounds[k].append(statistics.median(times))
    base = rounds[("kd", 0)]
    ratio = {}
    for (key, t), times in rounds.items():
        if key not in ("kd", "kd_again"):
            ratio.setdefault(key, {})[str(t)] = round(statistics.median(a / b for a, b in zip(times, base)), 4)
    ratio["noise"] = round(statistics.median(a / b for a, b in zip(rounds[("kd_again", 0)], base)), 4)
    step_s = {f"{k}{'' if t == 0 else '_T' + str(t)}": round(statistics.median(v), 4) for (k, t), v in rounds.items()}
    return ratio, step_s


def peak_rss_bytes() -> int:
    """Peak resident set size of this process, in bytes.

    Why not `ru_maxrss` on Linux: it carries the parent's high-water mark across fork + exec, so
    every child reported the benchmark parent's peak (1737 MiB for all pairs and variants).
    `VmHWM` belongs to the address space that exec created.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory_child(args) -> int:
    """Run in a fresh process: build the pair, run a few steps of one variant, print peak memory (bytes)."""
    device = torch.device(args.device)
    student, teacher = build_pair(args.pairs[0], args.quick)
    student.to(device)
    teacher.to(device)
    x, y = batch(args, device)
    mode = None if args.memory_variant == "kd" else args.memory_variant
    fn = make_step(student, teacher, None if mode is None else make_fotf(mode, args.memory_samples))
    if device.type == "cuda":
        fn(x, y)
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.memory_steps):
        fn(x, y)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = peak_rss_bytes()
    print(json.dumps({"peak_bytes": peak}))
    return 0


def peak_memory(name, args):
    out = {}
    for variant in ("kd",) + MODES:
        cmd = [sys.executable, __file__, "--_memory-child", variant, "--pairs", name, "--device", args.device,
               "--batch", str(args.batch), "--size", *map(str, args.size), "--memory-steps", str(args.memory_steps),
               "--memory-samples", str(args.memory_samples), "--threads", str(torch.get_num_threads())]
        if args.quick:
            cmd.append("--quick")
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[variant] = json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]
    return {**{mode: round(out[mode] / out["kd"], 4) for mode in MODES}, "kd_peak_mib": round(out["kd"] / 2**20, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--samples", type=int, nargs="+", default=[5, 10, 20],
                        help="T values of every student mode (vanilla KD is always included)")
    parser.add_argument("--teacher-samples", type=int, nargs="*", default=[5],
                        help="T values of the teacher-side rows (paper Table 6)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, nargs=2, default=[180, 240], metavar=("H", "W"))
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before the rounds")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--memory-samples", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-timing", action="store_true", help="measure peak memory only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="smoke settings: batch 2 x 64 x 96, T in {5, 20}, 1 step x 2 rounds, teacher = student arch")
    parser.add_argument("--_memory-child", dest="memory_variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.size, args.samples, args.teacher_samples = 2, [64, 96], [5, 20], [5]
        args.steps, args.warmup, args.repeats, args.memory_steps = 1, 1, 2, 1
    if any(t < 2 for t in args.samples + args.teacher_samples):
        parser.error(f"--samples {args.samples} / --teacher-samples {args.teacher_samples}: every T must be >= 2 "
                     f"(vanilla KD is always included)")
    if args.memory_variant is not None:
        return peak_memory_child(args)

    device = torch.device(args.device)
    ratio, step_s, memory = {}, {}, {}
    for name in args.pairs:
        if not args.no_timing:
            ratio[name], step_s[name] = time_pair(name, args, device)
        if not args.no_memory:
            memory[name] = peak_memory(name, args)
    print(json.dumps({
        "ratio": ratio,
        "step_s": step_s,
        "peak_memory_ratio": memory,
        "settings": {
            "device": str(device), "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "batch": args.batch, "size": args.size, "samples": args.samples,
            "teacher_samples": args.teacher_samples, "cpu_flags": cpu_simd_flags(), "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "quick": args.quick,
            "teachers": {n: "-".join(PAIRS[n][0] if args.quick else PAIRS[n][1]) for n in args.pairs},
            "fotf": {"p": "each site's own (DeepLabV3 ASPP 0.5 + head 0.1, others 0.1)", "kappa": 5.0,
                     "apply_to": "both", "merge_kd": "per_pixel", "merge_ce": "per_class"},
            "precision": "fp32", "init": "random",
            "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda"
            else "peak RSS (VmHWM) of a fresh subprocess per variant",
        },
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
