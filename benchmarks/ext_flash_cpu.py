"""Benchmark (not a test): ext's float32 CPU kernels, flash against materialised, beside `sdpa`.

    python benchmarks/ext_flash_cpu.py [--reps 15] [--json out.json]

One process, three calls interleaved (A B C A B C ...): `ext` on its flash kernels
(csrc/cpu/attention_flash.cpp: no T×T matrix stored, P recomputed in the backward), `ext` on its
materialised kernels (FASTGPT_CPU_FLASH=0, read at every call: P stored, the fused ops and the
causal matmuls) and `sdpa`. Forward+backward through autograd, as training calls them, dropout 0,
float32, 2 warm-ups. The shapes: issue 17's two, the `cpu` preset's attention (B12, H4, T64, D32)
and `shakespeare-char`'s (B64, H6, T256, D64). The GEMM probe's fp32 rate is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from fastgpt.attention import causal_attention
from fastgpt.benchmarks.common import attention_flops, print_cpu_environment
from fastgpt.benchmarks.gemm_probe import probe_gemms, probe_line
from fastgpt.timing import summarize, time_interleaved

SHAPES = [(16, 6, 256, 64), (4, 6, 1024, 64), (12, 4, 64, 32), (64, 6, 256, 64)]  # (B, H, T, D)


def _call(backend: str, flash: str, q, k, v, dout):
    def run():
        os.environ["FASTGPT_CPU_FLASH"] = flash  # ext reads it at every call (fastgpt.ext.cpu_attention_kernels)
        out = causal_attention(q, k, v, backend=backend)
        return torch.autograd.grad(out, (q, k, v), dout)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed calls per variant (after 2 warm-ups)")
    parser.add_argument("--json", help="write the environment, the probe and the medians here")
    args = parser.parse_args()
    import fastgpt.ext as ext

    ext.load()
    env = print_cpu_environment()
    probe = probe_gemms(["float32"])
    print(f"\n{probe_line(probe)}\n")
    print("**forward+backward, float32, dropout 0** (median ms [p20–p80] · GFLOP/s · % of GEMM)\n")
    print("| B, H, T, D | ext flash | ext materialised | sdpa | materialised / flash | sdpa / flash |")
    print("|---|---|---|---|---|---|")
    rows, saved = [], os.environ.get("FASTGPT_CPU_FLASH")
    try:
        for B, H, T, D in SHAPES:
            g = torch.Generator().manual_seed(T)
            q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
            dout = torch.randn(B, H, T, D, generator=g)
            assert ext.cpu_attention_kernels(torch.float32, B * H, D) == "flash", "fewer heads than threads"
            calls = {"flash": _call("ext", "1", q, k, v, dout), "materialised": _call("ext", "0", q, k, v, dout),
                     "sdpa": _call("sdpa", "1", q, k, v, dout)}
            stats = {name: summarize(t) for name, t in time_interleaved(calls, torch.device("cpu"), args.reps).items()}
            flops = attention_flops(B, H, T, D, "forward+backward")
            gemm = probe["float32"]["gflops"] * 1e9

            def cell(s):
                rate = flops / s["median_s"]
                return (f"{s['median_s'] * 1e3:.2f} [{s['p20_s'] * 1e3:.2f}–{s['p80_s'] * 1e3:.2f}] · "
                        f"{rate / 1e9:.0f} · {100 * rate / gemm:.0f}%")

            flash = stats["flash"]["median_s"]
            print(f"| {B}, {H}, {T}, {D} | {cell(stats['flash'])} | {cell(stats['materialised'])} | "
                  f"{cell(stats['sdpa'])} | {stats['materialised']['median_s'] / flash:.2f}× | "
                  f"{stats['sdpa']['median_s'] / flash:.2f}× |")
            rows.append({"shape": [B, H, T, D], "flops": flops, **stats})
    finally:
        if saved is None:
            os.environ.pop("FASTGPT_CPU_FLASH", None)
        else:
            os.environ["FASTGPT_CPU_FLASH"] = saved
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "gemm_probe": probe, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
