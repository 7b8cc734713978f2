"""The fused C kernel of head-only MC dropout (`method="fused"`): exact draws, distribution, fallback, build.

The exact tests replay the kernel's documented draw definition in plain Python (splitmix64 streams
per (sample seed, 256-row segment), 16-bit uniforms through the geometric table, a Bernoulli walk
per segment) and compute the logits and sigma in float64 from the replayed masks.
"""

import math
import subprocess

import numpy as np
import pytest
import torch

from fotf_hf import _mc_kernel
from fotf_hf.uncertainty import _geometric_table, mc_dropout_linear, mc_dropout_linear_std

pytestmark = pytest.mark.skipif(not _mc_kernel.available(), reason=f"fused kernel unavailable: {_mc_kernel.unavailable_reason()}")

M64 = (1 << 64) - 1


def _mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _gaps(seed, segment, table):
    state = _mix64((seed & M64) ^ _mix64(segment + 0x632BE59BD9B4E019))
    while True:
        state = (state + 0x9E3779B97F4A7C15) & M64
        word = _mix64(state)
        for k in range(4):
            yield int(table[(word >> (16 * k)) & 0xFFFF])


def _replay_keep(seeds, N, D, p, seg_rows):
    """(T, N, D) bool keep-masks the kernel draws for these int64 seeds."""
    table = _geometric_table(float(p), torch.device("cpu")).tolist()
    keep = np.ones((len(seeds), N * D), dtype=bool)
    for t, seed in enumerate(seeds):
        for seg in range(math.ceil(N / seg_rows)):
            r0, r1 = seg * seg_rows, min(N, (seg + 1) * seg_rows)
            gaps = _gaps(int(seed), seg, table)
            pos = r0 * D - 1 + next(gaps)
            while pos < r1 * D:
                keep[t, pos] = False
                pos += next(gaps)
    return torch.from_numpy(keep.reshape(len(seeds), N, D))


def _seeds(T, seed):
    # the kernel's seeds: one full-range int64 per sample, drawn in one call from the generator
    return torch.empty(T, dtype=torch.int64).random_(-(2**63), None, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("D,C", [(16, 3), (12, 19), (3, 70)])
def test_fused_logits_and_sigma_match_a_float64_replay_of_the_draws(monkeypatch, D, C):
    # 5 segments of 16 rows (the last one short) over 2 threads; C = 3/19/70 -> padded 8/24/72
    # (a specialised width and the generic one); D = 3 leaves many rows without a drop.
    monkeypatch.setattr(_mc_kernel, "SEGMENT_ROWS", 16)
    torch.manual_seed(0)
    B, h, w, T, p = 2, 5, 7, 4, 0.3
    x = torch.randn(B, D, h, w).relu()
    weight, bias = torch.randn(C, D, 1, 1), torch.randn(C)
    z = mc_dropout_linear(x, weight, bias, T, p, generator=torch.Generator().manual_seed(5), method="fused")
    sigma = mc_dropout_linear_std(x, weight, bias, T, p, generator=torch.Generator().manual_seed(5), method="fused")

    keep = _replay_keep(_seeds(T, 5), B * h * w, D, p, seg_rows=16)  # (T, N, D)
    rows = x.double().permute(0, 2, 3, 1).reshape(1, -1, D) * keep / (1 - p)
    expected = (rows @ weight.double().reshape(C, D).t() + bias.double()).reshape(T, B, h, w, C).permute(0, 1, 4, 2, 3)
    assert z.shape == (T, B, C, h, w) and z.dtype == torch.float32
    torch.testing.assert_close(z.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sigma.double(), torch.softmax(expected, 2).std(0), rtol=1e-4, atol=2e-6)
    assert 0.2 < 1 - keep.float().mean() < 0.4


def test_fused_draws_do_not_depend_on_the_thread_count(monkeypatch):
    # Segments, not threads, own the streams: 1, 2 or 3 workers give bit-identical outputs.
    # (Inputs are fixed here: torch's own GEMM for the no-drop logits may round per thread count.)
    monkeypatch.setattr(_mc_kernel, "SEGMENT_ROWS", 8)
    torch.manual_seed(0)
    N, D, C = 54, 32, 19
    x, w_t = torch.randn(N, D).relu(), torch.zeros(D, 24)
    w_t[:, :C] = torch.randn(D, C)
    base = x @ w_t[:, :C]
    table, seeds = _geometric_table(0.1, torch.device("cpu")), torch.tensor(_seeds(6, 1))
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out.append(_mc_kernel.mc_dropout_head(x, w_t, base, table, seeds, want_logits=True, want_sigma=True))
    finally:
        torch.set_num_threads(threads)
    for logits, sigma in out[1:]:
        assert torch.equal(logits, out[0][0]) and torch.equal(sigma, out[0][1])


def test_fused_masks_are_iid_bernoulli():
    # An identity classifier on all-ones features turns the logits into the keep-masks / (1 - p).
    T, B, D, h, w, p = 8, 2, 8, 40, 50, 0.1  # 8 x 32000 trials, 16 segments per sample
    z = mc_dropout_linear(torch.ones(B, D, h, w), torch.eye(D), None, T, p,
                          generator=torch.Generator().manual_seed(3), method="fused")
    vals = z.permute(0, 1, 3, 4, 2).reshape(T, -1)  # flat (b, y, x, d) order, the kernel's walk order
    assert torch.all((vals == 0) | (vals - 1 / (1 - p)).abs().lt(1e-6))
    drop = (vals == 0).double()
    n = drop.numel()
    assert abs(drop.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
    # every channel and every sample alike
    per_channel = drop.reshape(T, -1, D).mean((0, 1))
    assert (per_channel - p).abs().max() < 5 * math.sqrt(p * (1 - p) / (n / D))
    per_sample = drop.mean(1)
    assert (per_sample - p).abs().max() < 5 * math.sqrt(p * (1 - p) / (n / T))
    # no correlation between neighbours (within and across segments) or between samples
    centred = drop - p
    se = p * (1 - p) / math.sqrt(n)
    assert abs((centred[:, 1:] * centred[:, :-1]).mean()) < 5 * se
    assert abs((centred[1:] * centred[:-1]).mean()) < 5 * se


def test_auto_falls_back_to_sparse_without_the_kernel_and_fused_says_why(monkeypatch):
    x, weight = torch.randn(2, 8, 4, 5).relu(), torch.randn(3, 8, 1, 1)
    monkeypatch.setattr(_mc_kernel, "_library", lambda: (None, "no C compiler (test)"))
    auto = mc_dropout_linear_std(x, weight, None, 3, 0.2, generator=torch.Generator().manual_seed(4))
    sparse = mc_dropout_linear_std(x, weight, None, 3, 0.2, generator=torch.Generator().manual_seed(4), method="sparse")
    assert torch.equal(auto, sparse)
    with pytest.raises(RuntimeError, match=r"unavailable here \(no C compiler \(test\)\).*method='sparse'"):
        mc_dropout_linear(x, weight, None, 3, 0.2, method="fused")


def test_fused_is_the_cpu_default_when_available():
    x, weight = torch.randn(2, 8, 4, 5).relu(), torch.randn(3, 8, 1, 1)
    auto = mc_dropout_linear(x, weight, None, 3, 0.2, generator=torch.Generator().manual_seed(4))
    fused = mc_dropout_linear(x, weight, None, 3, 0.2, generator=torch.Generator().manual_seed(4), method="fused")
    assert torch.equal(auto, fused)


def test_kernel_rejects_bad_arguments():
    x = torch.randn(4, 8)
    table = _geometric_table(0.1, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"w_t must be a contiguous fp32 CPU tensor of shape \(8, 8\)"):
        _mc_kernel.mc_dropout_head(x, torch.zeros(8, 8).t(), torch.zeros(4, 3), table, torch.zeros(2, dtype=torch.int64),
                                   want_logits=True, want_sigma=False)
    with pytest.raises(RuntimeError, match="bad sizes"):  # sigma needs T > correction
        _mc_kernel.mc_dropout_head(x, torch.zeros(8, 8), torch.zeros(4, 3), table, torch.zeros(1, dtype=torch.int64),
                                   want_logits=False, want_sigma=True, correction=1)


def test_build_is_cached_and_a_failed_build_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("FOTF_HF_CACHE", str(tmp_path))
    cc = _mc_kernel._compilers()[0]
    compiles = []
    real_run = subprocess.run

    def counting_run(cmd, *args, **kwargs):
        if "-o" in cmd:
            compiles.append(cmd)
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting_run)
    first = _mc_kernel._build(cc, _mc_kernel._BASE_FLAGS)
    second = _mc_kernel._build(cc, _mc_kernel._BASE_FLAGS)
    assert first == second and first.parent == tmp_path / "native" and len(compiles) == 1
    assert [f.name for f in first.parent.iterdir()] == [first.name]  # no temporary left behind

    with pytest.raises(RuntimeError, match="false .* failed"):
        _mc_kernel._build("false", _mc_kernel._BASE_FLAGS)  # a "compiler" that always fails
    assert [f.name for f in first.parent.iterdir()] == [first.name]


def test_native_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("FOTF_HF_NATIVE", "0")
    _mc_kernel._library.cache_clear()
    try:
        assert not _mc_kernel.available() and "FOTF_HF_NATIVE=0" in _mc_kernel.unavailable_reason()
    finally:
        monkeypatch.delenv("FOTF_HF_NATIVE")
        _mc_kernel._library.cache_clear()
    assert _mc_kernel.available()


def test_mc_head_kernel_benchmark_prints_both_methods(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "mc_head_kernel.py"
    spec = importlib.util.spec_from_file_location("mc_head_kernel", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--samples", "2", "3", "--repeats", "1", "--shape", "1", "8", "4", "5", "--classes", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["seconds"]) == {"fused", "sparse"} and set(out["speedup"]) == {"2", "3"}
    for T in ("2", "3"):
        assert out["speedup"][T] == pytest.approx(out["seconds"]["sparse"][T] / out["seconds"]["fused"][T], rel=0.01, abs=0.01)


def test_an_unusable_cache_means_the_torch_path_not_an_error(monkeypatch, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("FOTF_HF_CACHE", str(blocker))  # <cache>/native cannot be created under a file
    _mc_kernel._library.cache_clear()
    try:
        assert not _mc_kernel.available() and "not-a-dir" in _mc_kernel.unavailable_reason()
        x, weight = torch.randn(1, 8, 3, 4).relu(), torch.randn(3, 8, 1, 1)
        sigma = mc_dropout_linear_std(x, weight, None, 3, 0.2, generator=torch.Generator().manual_seed(0))
        sparse = mc_dropout_linear_std(x, weight, None, 3, 0.2, generator=torch.Generator().manual_seed(0), method="sparse")
        assert torch.equal(sigma, sparse)
    finally:
        monkeypatch.delenv("FOTF_HF_CACHE")
        _mc_kernel._library.cache_clear()
    assert _mc_kernel.available()
