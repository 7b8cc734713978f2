"""Head-only MC-dropout sigma on the CPU: the fused C kernel against the pure-torch `sparse` path.

Times `mc_dropout_linear_std` (T samples of dropout -> 1x1 classifier -> softmax -> std over T)
on a SegFormer-B0 head's input at the FOTF benchmark's batch (4 x 256 x 45 x 60, 19 classes,
p = 0.1), each method in interleaved rounds, and prints one JSON object:

    {"seconds": {"fused": {"5": s, ...}, "sparse": {...}}, "speedup": {"5": sparse / fused, ...}}

Both methods draw from the same distribution; `fotf_overhead.py` measures what this buys in a
whole training step.

    python benchmarks/mc_head_kernel.py [--samples 5 10 20] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fotf_hf import _mc_kernel
from fotf_hf.uncertainty import mc_dropout_linear_std


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds per T")
    parser.add_argument("--shape", type=int, nargs=4, default=[4, 256, 45, 60], metavar=("B", "D", "h", "w"))
    parser.add_argument("--classes", type=int, default=19)
    args = parser.parse_args(argv)
    if not _mc_kernel.available():
        raise SystemExit(f"the fused kernel is unavailable here: {_mc_kernel.unavailable_reason()}")

    torch.manual_seed(0)
    B, D, h, w = args.shape
    features = torch.randn(B, D, h, w).relu()  # post-ReLU, like the decode head's fused features
    weight, bias = torch.randn(args.classes, D, 1, 1) * D**-0.5, torch.randn(args.classes) * 0.1
    methods = ("fused", "sparse")
    seconds = {m: {} for m in methods}
    for T in args.samples:
        times = {m: [] for m in methods}
        for m in methods:  # warm-up (the first fused call may compile and load the kernel)
            mc_dropout_linear_std(features, weight, bias, T, 0.1, method=m)
        for _ in range(args.repeats):
            for m in methods:
                start = time.perf_counter()
                mc_dropout_linear_std(features, weight, bias, T, 0.1, method=m)
                times[m].append(time.perf_counter() - start)
        for m in methods:
            seconds[m][str(T)] = float(f"{statistics.median(times[m]):.4g}")
    speedup = {T: round(seconds["sparse"][T] / seconds["fused"][T], 2) for T in seconds["fused"]}
    print(json.dumps({
        "seconds": seconds,
        "speedup": speedup,
        "settings": {"shape": args.shape, "classes": args.classes, "p": 0.1, "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "repeats": args.repeats, "kernel_build": _mc_kernel._library()[1]},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
