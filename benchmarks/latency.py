#!/usr/bin/env python
"""Inference cost of teacher vs student on this machine: parameters, FLOPs, latency, images/s, peak memory.

Pairs (teacher -> student; random init, 19 classes as Cityscapes):

    dlv3-r101:dlv3-r18   DeepLabV3-R101 -> DeepLabV3-R18
    dlv3-r101:psp-r18    DeepLabV3-R101 -> PSPNet-R18
    segf-b1:segf-b0      SegFormer-B1   -> SegFormer-B0
    segf-b4:segf-b0      SegFormer-B4   -> SegFormer-B0

Each model is measured once (R101 and B0 serve two pairs) at every --sizes x --batches, in two
runtimes: torch eager fp32 (`torch.inference_mode`) and onnxruntime (CPU execution provider, the
graph of `fotf_hf.export.export_onnx`, exported once per model with dynamic batch and size). Both
run the inference graph: `pixel_values -> logits` at the model's resolution (1/8 of the input for
DeepLabV3 / PSPNet, 1/4 for SegFormer), without the auxiliary FCN head (removed from the eager
model; the ONNX export prunes it) and without upsampling the logits.

Per variant (model x runtime x size x batch), in a FRESH subprocess:
    latency    median over --repeats timed forwards after --warmup untimed ones; images/s = batch / median
    peak_mib   peak resident-set growth during the forwards: the kernel's high-water mark (VmHWM) is
               reset through /proc/self/clear_refs right before the first forward, after the model /
               session is built, and the reported value is VmHWM - RSS at that point (activations,
               workspaces, allocator and onnxruntime arenas; not the weights). Where clear_refs is
               not writable: VmHWM - RSS of the process, which then includes the build's own peak
               (`memory_method` says which).
Parameters and FLOPs (per image; `torch.utils.flop_counter.FlopCounterMode`, which counts the
matmul / convolution / attention FLOPs, 2 per multiply-add, not the elementwise ops) come from
a meta-device copy of the model: exact, and free of compute. Both runtimes use --threads threads
(default: torch's current count); onnxruntime with one inter-op thread, all graph optimisations.

Prints the host line, a Markdown table per model and per pair (student / teacher speed-up), and
ONE JSON line at the end.

    python benchmarks/latency.py                     # the full run: 360x480 and 512x1024, batch 1 and 8 (hours on 2 cores)
    python benchmarks/latency.py --quick             # smoke settings: 64x128, batch 1 and 2, 2 repeats
    python benchmarks/latency.py --pairs segf-b1:segf-b0 --sizes 512x1024 --batches 1 --repeats 5
    python benchmarks/latency.py --flops-only        # parameters / FLOPs table only (seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/latency.py` from a checkout
    sys.path.insert(0, str(ROOT))

from fotf_hf.training.precision import describe_host  # noqa: E402

MODELS = {
    "dlv3-r101": ("deeplabv3", "resnet101", "DeepLabV3-R101"),
    "dlv3-r18": ("deeplabv3", "resnet18", "DeepLabV3-R18"),
    "psp-r18": ("pspnet", "resnet18", "PSPNet-R18"),
    "segf-b0": ("segformer", "mit-b0", "SegFormer-B0"),
    "segf-b1": ("segformer", "mit-b1", "SegFormer-B1"),
    "segf-b4": ("segformer", "mit-b4", "SegFormer-B4"),
}
PAIRS = ("dlv3-r101:dlv3-r18", "dlv3-r101:psp-r18", "segf-b1:segf-b0", "segf-b4:segf-b0")
RUNTIMES = ("eager", "onnx")
NUM_LABELS = 19
QUICK = {"sizes": [(64, 128)], "batches": [1, 2], "repeats": 2, "warmup": 1}


# ----------------------------------------------------------------------------------- models


def build_model(name: str, device: str = "cpu", seed: int = 0):
    """Random-init model `name` (eval mode) without the auxiliary head: the inference graph."""
    from fotf_hf.models import create_model

    arch, backbone, _ = MODELS[name]
    torch.manual_seed(seed)
    with torch.device(device):
        model = create_model(arch, backbone, num_labels=NUM_LABELS)
    if getattr(model, "auxlayer", None) is not None:
        model.auxlayer = None  # training-only head; forward_features skips it when None
    return model.eval()


def logits_fn(model):
    def run(pixel_values):
        return model(pixel_values=pixel_values, return_dict=True).logits

    return run


def count_flops(name: str, sizes):
    """`(parameters, {"HxW": FLOPs per image})` from a meta-device model (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(name, device="meta")
    params = sum(p.numel() for p in model.parameters())
    flops = {}
    for h, w in sizes:
        x = torch.empty(1, 3, h, w, device="meta")
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            logits_fn(model)(x)
        flops[f"{h}x{w}"] = int(counter.get_total_flops())
    return params, flops


# ----------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> str:
    """Reset the kernel's RSS high-water mark to the current RSS; returns the method name."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return "VmHWM growth after a /proc/self/clear_refs reset (fresh subprocess)"
    except OSError:
        return "VmHWM - RSS before the forwards, without reset (includes the build's peak; fresh subprocess)"


# ----------------------------------------------------------------------------------- children


def export_child(args) -> int:
    """Subprocess: build the model, export it to args.onnx_path, print timing JSON."""
    from fotf_hf.export import export_onnx

    model = build_model(args.model)
    start = time.perf_counter()
    result = export_onnx(model, args.onnx_path, verify=False)
    keep = {k: v for k, v in result.items() if k in ("opset",)}
    print(json.dumps({"export_s": round(time.perf_counter() - start, 2), **keep}))
    return 0


def measure_child(args) -> int:
    """Subprocess: one variant (model, runtime, size, batch): latency and peak memory, as one JSON line."""
    torch.set_num_threads(args.threads)
    h, w = args.size
    x = torch.randn(args.batch, 3, h, w, generator=torch.Generator().manual_seed(0))
    if args.runtime == "eager":
        model = build_model(args.model)
        run_model = logits_fn(model)

        def run():
            with torch.inference_mode():
                return run_model(x)
    else:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(args.onnx_path, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: x.numpy()}

        def run():
            return session.run(None, feed)[0]

    gc.collect()
    rss_before = _status_kib("VmRSS")
    method = reset_peak_rss()
    out = None
    for _ in range(args.warmup):
        out = run()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM") - rss_before
    print(json.dumps({
        "latency_s": statistics.median(times), "times_s": [round(t, 5) for t in times],
        "images_per_s": args.batch / statistics.median(times), "peak_mib": round(peak / 1024, 1),
        "rss_before_mib": round(rss_before / 1024, 1), "logits_shape": list(out.shape), "memory_method": method,
    }))
    return 0


def _child(extra, args, timeout=None):
    cmd = [sys.executable, str(Path(__file__).resolve()), *extra, "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        tail = "\n".join(res.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"child {' '.join(extra)} failed (exit {res.returncode}):\n{tail}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------- report


def _fmt(value, digits=1):
    return "-" if value is None else f"{value:.{digits}f}"


def model_table(rows, runtimes):
    head = "| model | size | batch | params (M) | GFLOPs/img |"
    rule = "| --- | --- | --- | --- | --- |"
    for rt in runtimes:
        head += f" {rt} ms | {rt} img/s | {rt} peak MiB |"
        rule += " --- | --- | --- |"
    lines = [head, rule]
    for r in rows:
        line = (f"| {MODELS[r['model']][2]} | {r['size']} | {r['batch']} | {r['params'] / 1e6:.2f} | "
                f"{r['flops_per_image'] / 1e9:.1f} |")
        for rt in runtimes:
            m = r.get(rt) or {}
            ms = None if "latency_s" not in m else m["latency_s"] * 1e3
            line += f" {_fmt(ms)} | {_fmt(m.get('images_per_s'), 2)} | {_fmt(m.get('peak_mib'), 0)} |"
        lines.append(line)
    return "\n".join(lines)


def pair_table(pairs, rows, runtimes):
    index = {(r["model"], r["size"], r["batch"]): r for r in rows}
    head = "| teacher -> student | size | batch | params ratio | FLOPs ratio |"
    rule = "| --- | --- | --- | --- | --- |"
    for rt in runtimes:
        head += f" {rt} speed-up |"
        rule += " --- |"
    lines, summary = [head, rule], {}
    for pair in pairs:
        teacher, student = pair.split(":")
        for (model, size, batch), t_row in index.items():
            if model != teacher or (student, size, batch) not in index:
                continue
            s_row = index[(student, size, batch)]
            entry = {"params_ratio": s_row["params"] / t_row["params"],
                     "flops_ratio": s_row["flops_per_image"] / t_row["flops_per_image"]}
            line = (f"| {MODELS[teacher][2]} -> {MODELS[student][2]} | {size} | {batch} | "
                    f"{entry['params_ratio']:.3f} | {entry['flops_ratio']:.3f} |")
            for rt in runtimes:
                t, s = (t_row.get(rt) or {}).get("latency_s"), (s_row.get(rt) or {}).get("latency_s")
                entry[f"{rt}_speedup"] = None if not (t and s) else round(t / s, 3)
                line += f" {_fmt(entry[f'{rt}_speedup'], 2)}x |"
            summary.setdefault(pair, {})[f"{size}_b{batch}"] = {k: (round(v, 4) if isinstance(v, float) else v)
                                                                 for k, v in entry.items()}
            lines.append(line)
    return "\n".join(lines), summary


# ----------------------------------------------------------------------------------- main


def parse_size(text: str):
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r} must be HxW, e.g. 512x1024") from None
    if h < 32 or w < 32:
        raise argparse.ArgumentTypeError(f"size {text!r}: height and width must be >= 32 (SegFormer's minimum)")
    return h, w


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS), metavar="TEACHER:STUDENT",
                        help=f"teacher:student pairs, of {list(PAIRS)} (default: all)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=None, metavar="HxW",
                        help="input sizes (default 360x480 512x1024)")
    parser.add_argument("--batches", nargs="+", type=int, default=None, help="batch sizes (default 1 8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed forwards per variant (default 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed forwards per variant before timing (default 1)")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    parser.add_argument("--threads", type=int, default=None, help="threads of both runtimes (default: torch's count)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke settings: 64x128, batch 1 and 2, 1 warm-up + 2 timed forwards (explicit options win)")
    parser.add_argument("--flops-only", action="store_true", help="print the parameters / FLOPs table and stop")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per child process (default: none)")
    parser.add_argument("--card_table", metavar="PATH",
                        help="also write the pairs' latencies for model cards (fotf_hf/templates/latency.json)")
    parser.add_argument("--_child", dest="child", choices=["measure", "export"], help=argparse.SUPPRESS)
    parser.add_argument("--_model", dest="model", help=argparse.SUPPRESS)
    parser.add_argument("--_runtime", dest="runtime", help=argparse.SUPPRESS)
    parser.add_argument("--_size", dest="size", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_batch", dest="batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_onnx", dest="onnx_path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    defaults = QUICK if args.quick else {"sizes": [(360, 480), (512, 1024)], "batches": [1, 8], "repeats": 5, "warmup": 1}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.threads is None:
        args.threads = torch.get_num_threads()
    if min(args.batches) < 1 or args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--batches and --repeats must be >= 1, --warmup >= 0, --threads >= 1")
    if args.child == "export":
        return export_child(args)
    if args.child == "measure":
        return measure_child(args)

    models = list(dict.fromkeys(m for pair in args.pairs for m in pair.split(":")))
    print(f"host: {describe_host()}")
    print(f"settings: pairs {args.pairs}, sizes {['%dx%d' % s for s in args.sizes]}, batches {args.batches}, "
          f"{args.warmup} warm-up + {args.repeats} timed forwards, {args.threads} threads, runtimes {args.runtimes}",
          flush=True)
    start = time.perf_counter()
    static = {name: count_flops(name, args.sizes) for name in models}
    rows = [{"model": name, "size": f"{h}x{w}", "batch": b, "params": static[name][0],
             "flops_per_image": static[name][1][f"{h}x{w}"]} for name in models for (h, w) in args.sizes
            for b in args.batches]
    exports = {}
    if not args.flops_only:
        with tempfile.TemporaryDirectory(prefix="fotf-latency-") as tmp:
            for name in models:
                onnx_path = str(Path(tmp) / f"{name}.onnx")
                if "onnx" in args.runtimes:
                    exports[name] = _child(["--_child", "export", "--_model", name, "--_onnx", onnx_path], args, args.timeout)
                    print(f"exported {name}: {exports[name]}", flush=True)
                for row in (r for r in rows if r["model"] == name):
                    h, w = (int(v) for v in row["size"].split("x"))
                    for rt in args.runtimes:
                        row[rt] = _child(["--_child", "measure", "--_model", name, "--_runtime", rt, "--_size", str(h),
                                          str(w), "--_batch", str(row["batch"]), "--_onnx", onnx_path,
                                          "--repeats", str(args.repeats), "--warmup", str(args.warmup)], args,
                                         args.timeout)
                        print(f"  {name} {rt} {row['size']} b{row['batch']}: "
                              f"{row[rt]['latency_s'] * 1e3:.1f} ms, {row[rt]['peak_mib']:.0f} MiB", flush=True)
    runtimes = [] if args.flops_only else args.runtimes
    print()
    print(model_table(rows, runtimes))
    print()
    table, summary = pair_table(args.pairs, rows, runtimes)
    print(table)
    print()
    memory_method = next((r[rt]["memory_method"] for r in rows for rt in runtimes if rt in r), None)
    if args.card_table:
        write_card_table(args.card_table, args.pairs, rows, " ".join(["python", "benchmarks/latency.py", *argv_used]))
    print(json.dumps({
        "machine": describe_host(),
        "rows": [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rows],
        "pairs": summary,
        "exports": exports,
        "settings": {
            "sizes": [list(s) for s in args.sizes], "batches": args.batches, "repeats": args.repeats,
            "warmup": args.warmup, "threads": args.threads, "runtimes": runtimes, "quick": args.quick,
            "num_labels": NUM_LABELS, "init": "random", "precision": "fp32", "torch": torch.__version__,
            "onnxruntime": _ort_version(), "aux_head": "removed (inference graph)",
            "flops": "torch.utils.flop_counter.FlopCounterMode per image (matmul/conv/attention, 2 per MAC)",
            "latency": "median of the timed forwards", "memory_method": memory_method,
            "wall_s": round(time.perf_counter() - start, 1),
        },
    }))
    return 0


def write_card_table(path, pairs, rows, command) -> None:
    """The pairs' eager / onnxruntime latencies in the form `fotf_hf.hub.speed_rows` reads: each
    student is named by `architecture_key`, so a card finds the rows of its own architecture."""
    from fotf_hf.hub import architecture_key

    index = {(r["model"], r["size"], r["batch"]): r for r in rows}
    entries = []
    for pair in pairs:
        teacher, student = pair.split(":")
        key = architecture_key(build_model(student, device="meta").config)
        for (model, size, batch), t_row in index.items():
            s_row = index.get((student, size, batch))
            if model != teacher or s_row is None or not all(rt in t_row and rt in s_row for rt in RUNTIMES):
                continue
            entries.append({"teacher": MODELS[teacher][2], "student": MODELS[student][2], "student_key": key,
                            "size": size, "batch": batch,
                            "teacher_ms": {rt: round(t_row[rt]["latency_s"] * 1e3, 1) for rt in RUNTIMES},
                            "student_ms": {rt: round(s_row[rt]["latency_s"] * 1e3, 1) for rt in RUNTIMES},
                            "flops_ratio": round(s_row["flops_per_image"] / t_row["flops_per_image"], 4)})
    Path(path).write_text(json.dumps({"machine": describe_host(), "command": command, "pairs": entries}, indent=1) + "\n")


def _ort_version():
    try:
        import onnxruntime

        return onnxruntime.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
