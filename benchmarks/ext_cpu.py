"""Benchmark (not a test): the `ext` attention backend against `naive` and `sdpa` on CPU.

    python benchmarks/ext_cpu.py [--reps 15] [--json out.json]

fp32, forward + backward, causal, at the issue's two shapes with dropout 0 and 0.2. Providers run
interleaved (ext, naive, sdpa, ext, naive, sdpa, ...) in one process, so a background load that
comes and goes hits all of them alike; the table gives medians with the 20th-80th percentile spread.

FLOPs counted for causal attention (fastgpt's one formula, also used by the anchors): forward
4·B·H·T²·D / 2 (two products, half the T×T matrix), backward 2.5 × forward.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from fastgpt.attention import causal_attention

SHAPES = [(16, 6, 256, 64), (4, 6, 1024, 64)]
DROPOUTS = [0.0, 0.2]
PROVIDERS = ["ext", "naive", "sdpa"]


def causal_flops(B, H, T, D) -> float:
    forward = 4 * B * H * T * T * D / 2
    return forward * 3.5  # forward + backward (2.5 × forward)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.machine()}"


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def step(provider, q, k, v, dout, dropout_p) -> float:
    for t in (q, k, v):
        t.grad = None
    start = time.perf_counter()
    out = causal_attention(q, k, v, dropout_p=dropout_p, backend=provider)
    out.backward(dout)
    return time.perf_counter() - start


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed runs per provider (after 2 warm-ups)")
    parser.add_argument("--json", help="write the raw timings and the table to this file")
    args = parser.parse_args(argv)

    header = {
        "machine": machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_start": load_average(),
    }
    for key, value in header.items():
        print(f"{key}: {value}")

    rows = []
    for B, H, T, D in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_(True) for _ in range(3))
        dout = torch.randn(B, H, T, D, generator=g)
        for dropout_p in DROPOUTS:
            times = {p: [] for p in PROVIDERS}
            for _ in range(2):  # warm-up: the extension's first use, allocator, caches
                for p in PROVIDERS:
                    step(p, q, k, v, dout, dropout_p)
            for _ in range(args.reps):
                for p in PROVIDERS:
                    times[p].append(step(p, q, k, v, dout, dropout_p))
            med = {p: statistics.median(ts) for p, ts in times.items()}
            row = {
                "shape": [B, H, T, D], "dropout": dropout_p,
                "median_ms": {p: med[p] * 1e3 for p in PROVIDERS},
                "p20_ms": {p: percentile(ts, 0.2) * 1e3 for p, ts in times.items()},
                "p80_ms": {p: percentile(ts, 0.8) * 1e3 for p, ts in times.items()},
                "ext_gflops": causal_flops(B, H, T, D) / med["ext"] / 1e9,
                "sdpa_over_ext": med["sdpa"] / med["ext"],
                "naive_over_ext": med["naive"] / med["ext"],
                "raw_ms": {p: [t * 1e3 for t in ts] for p, ts in times.items()},
            }
            rows.append(row)
            print(f"  done B={B} H={H} T={T} D={D} dropout={dropout_p}", flush=True)
    header["load_average_end"] = load_average()
    print(f"load_average_end: {header['load_average_end']}\n")

    print("| shape (B, H, T, D) | dropout | ext ms (p20-p80) | naive ms | sdpa ms | sdpa/ext | naive/ext | ext GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, lo, hi = r["median_ms"], r["p20_ms"], r["p80_ms"]
        cells = [f"{m[p]:.1f} ({lo[p]:.1f}-{hi[p]:.1f})" for p in PROVIDERS]
        print(f"| {', '.join(map(str, r['shape']))} | {r['dropout']} | {' | '.join(cells)} | "
              f"{r['sdpa_over_ext']:.2f}x | {r['naive_over_ext']:.2f}x | {r['ext_gflops']:.0f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
