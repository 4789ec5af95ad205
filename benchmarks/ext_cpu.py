"""Benchmark (not a test): the `ext` attention backend against `naive` and `sdpa` on CPU.

    python benchmarks/ext_cpu.py [--reps 15] [--json out.json]

fp32, forward + backward (torch.autograd.grad of the three inputs), causal, at two training
shapes (SHAPES: the lecture model's 6 heads of 64 at T = 256, and at T = 1024) with dropout 0 and
0.2; then the forward of a KV-cache decode step (one query over T_k cached keys, no grad, as
`generate` calls it), which `backend="auto"` orders apart. The providers run interleaved in one
process (ext, naive, sdpa, ext, ...; fastgpt.machine.timing.time_interleaved), so a background load that
comes and goes hits all of them alike; the table gives medians and the p20-p80 spread, the FLOPs
are fastgpt.bench.common.attention_flops, and ext's rate is also given as a fraction of the fp32
GEMM probe taken at the start (fastgpt/bench/gemm_probe.py). The load average is printed because a
busy shared machine inflates absolute times more than the ratios.
"""

from __future__ import annotations

import argparse
import json

import torch

from fastgpt.attention import causal_attention
from fastgpt.bench.common import attention_flops, load_average, print_cpu_environment
from fastgpt.bench.gemm_probe import fraction_of_gemm, probe_gemm, probe_line
from fastgpt.machine.timing import summarize, time_interleaved

SHAPES = [(16, 6, 256, 64), (4, 6, 1024, 64)]
DROPOUTS = [0.0, 0.2]
PROVIDERS = ["ext", "naive", "sdpa"]
# (B, H, T_q, T_k, D): a decode step of the shakespeare-char model, early and late in its block
DECODE_SHAPES = [(1, 6, 1, 64, 64), (1, 6, 1, 256, 64)]


def fwd_bwd(provider, q, k, v, dout, dropout_p):
    def call():
        out = causal_attention(q, k, v, dropout_p=dropout_p, backend=provider)
        return torch.autograd.grad(out, (q, k, v), dout)
    return call


def decode(provider, q, k, v):
    def call():
        with torch.no_grad():
            return causal_attention(q, k, v, backend=provider)
    return call


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed runs per provider (after 2 warm-ups)")
    parser.add_argument("--json", help="write the environment, the table rows and the raw timings here")
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    env = print_cpu_environment()
    gemm = probe_gemm("float32", device)
    print(probe_line({"float32": gemm}))

    rows = []
    for B, H, T, D in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_(True) for _ in range(3))
        dout = torch.randn(B, H, T, D, generator=g)
        for dropout_p in DROPOUTS:
            calls = {p: fwd_bwd(p, q, k, v, dout, dropout_p) for p in PROVIDERS}
            times = time_interleaved(calls, device, args.reps, warmup=2)
            stats = {p: summarize(ts) for p, ts in times.items()}
            med = {p: s["median_s"] for p, s in stats.items()}
            rows.append({
                "mode": "forward+backward", "shape": [B, H, T, T, D], "dropout": dropout_p, "stats_s": stats,
                "ext_gflops": attention_flops(B, H, T, D, "forward+backward") / med["ext"] / 1e9,
                "ext_fraction_of_gemm": fraction_of_gemm(attention_flops(B, H, T, D, "forward+backward") / med["ext"],
                                                         gemm),
                "sdpa_over_ext": med["sdpa"] / med["ext"], "naive_over_ext": med["naive"] / med["ext"],
                "raw_s": times,
            })
            print(f"  done B={B} H={H} T={T} D={D} dropout={dropout_p}", flush=True)
    for B, H, T_q, T_k, D in DECODE_SHAPES:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, T_q, D, generator=g)
        k, v = (torch.randn(B, H, T_k, D, generator=g) for _ in range(2))
        # a call takes tens of microseconds: many more repetitions for the same confidence
        times = time_interleaved({p: decode(p, q, k, v) for p in PROVIDERS}, device, 20 * args.reps, warmup=10)
        stats = {p: summarize(ts) for p, ts in times.items()}
        med = {p: s["median_s"] for p, s in stats.items()}
        rows.append({"mode": "decode forward", "shape": [B, H, T_q, T_k, D], "dropout": 0.0, "stats_s": stats,
                     "ext_gflops": None,  # a few MFLOP: the call's overhead, not its math, sets the time
                     "ext_fraction_of_gemm": None,
                     "sdpa_over_ext": med["sdpa"] / med["ext"], "naive_over_ext": med["naive"] / med["ext"],
                     "raw_s": times})
        print(f"  done decode B={B} H={H} T_q={T_q} T_k={T_k} D={D}", flush=True)
    env["load_average_end"] = load_average()
    print(f"load_average_end: {env['load_average_end']}\n")

    print("| call | shape (B, H, T_q, T_k, D) | dropout | ext ms (p20-p80) | naive ms | sdpa ms | sdpa/ext | naive/ext "
          "| ext GFLOP/s | ext % of GEMM |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        digits = 1 if r["mode"] == "forward+backward" else 3
        cells = [f"{s['median_s'] * 1e3:.{digits}f} ({s['p20_s'] * 1e3:.{digits}f}-{s['p80_s'] * 1e3:.{digits}f})"
                 for s in (r["stats_s"][p] for p in PROVIDERS)]
        print(f"| {r['mode']} | {', '.join(map(str, r['shape']))} | {r['dropout']} | {' | '.join(cells)} | "
              f"{r['sdpa_over_ext']:.2f}x | {r['naive_over_ext']:.2f}x | "
              f"{'-' if r['ext_gflops'] is None else format(r['ext_gflops'], '.0f')} | "
              f"{'-' if r['ext_fraction_of_gemm'] is None else format(r['ext_fraction_of_gemm'], '.0%')} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "gemm_probe": {"float32": gemm}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
