"""Benchmark (not a test): ext's CPU kernels, flash against materialised, beside `sdpa`.

    python benchmarks/ext_flash_cpu.py [--reps 15] [--dtypes float32 bfloat16] [--json out.json]

One process, the calls of a shape interleaved (A B C A B C ...): `ext` on its flash kernels (the
kernel paths ext.cpu_flash and ext.cpu_flash_amx,
csrc/cpu/attention_flash.cpp, bfloat16 on AMX: attention_flash_amx.cpp; no T×T matrix stored, P
recomputed in the backward), `ext` on its materialised kernels (the kernel path ext.cpu_packed:
P stored, the fused ops and the causal matmuls) and `sdpa`, in each dtype asked for.
Forward+backward through autograd, as training calls them, dropout 0, 2 warm-ups. The shapes:
two long ones, the `cpu` preset's attention (B12, H4, T64, D32) and `shakespeare-char`'s (B64, H6,
T256, D64). The GEMM probe's rate of each dtype is printed beside them; with both dtypes, the
bfloat16 table also gives float32 flash / bfloat16 flash.
"""

from __future__ import annotations

import argparse
import json
import torch

from fastgpt.attention import AttentionCall, causal_attention, refusal
from fastgpt.bench.common import attention_flops, print_cpu_environment
from fastgpt.bench.gemm_probe import probe_gemms, probe_line
from fastgpt.machine.timing import summarize, time_interleaved

SHAPES = [(16, 6, 256, 64), (4, 6, 1024, 64), (12, 4, 64, 32), (64, 6, 256, 64)]  # (B, H, T, D)


FLASH_PATHS = {"float32": "ext.cpu_flash", "bfloat16": "ext.cpu_flash_amx"}


def _call(backend: str, q, k, v, dout):
    def run():
        out = causal_attention(q, k, v, backend=backend)
        return torch.autograd.grad(out, (q, k, v), dout)
    return run


def _shape_calls(B, H, T, D, dtypes):
    """{(dtype, variant): call} for one shape, the inputs drawn once in float32 and cast."""
    g = torch.Generator().manual_seed(T)
    base = [torch.randn(B, H, T, D, generator=g) for _ in range(4)]
    calls = {}
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        q, k, v = (t.to(dtype).requires_grad_() for t in base[:3])
        dout = base[3].to(dtype)
        calls[dtype_name, "flash"] = _call(FLASH_PATHS[dtype_name], q, k, v, dout)
        calls[dtype_name, "materialised"] = _call("ext.cpu_packed", q, k, v, dout)
        calls[dtype_name, "sdpa"] = _call("sdpa", q, k, v, dout)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed calls per variant (after 2 warm-ups)")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "bfloat16"], default=["float32", "bfloat16"])
    parser.add_argument("--json", help="write the environment, the probe and the medians here")
    args = parser.parse_args()
    import fastgpt.ext as ext

    ext.load()
    env = print_cpu_environment()
    probe = probe_gemms(args.dtypes)
    print(f"\n{probe_line(probe)}")
    for dtype_name in args.dtypes:
        for B, H, _, D in SHAPES:
            reason = refusal(AttentionCall.like(torch.empty(B, H, 8, D, dtype=getattr(torch, dtype_name))),
                             FLASH_PATHS[dtype_name])
            if reason is not None:
                raise SystemExit(f"{FLASH_PATHS[dtype_name]} cannot run here: {reason}; leave {dtype_name} out of --dtypes")
    rows = []
    for B, H, T, D in SHAPES:
        calls = _shape_calls(B, H, T, D, args.dtypes)
        stats = {key: summarize(t) for key, t in time_interleaved(calls, torch.device("cpu"), args.reps).items()}
        rows.append({"shape": [B, H, T, D], "flops": attention_flops(B, H, T, D, "forward+backward"),
                     **{f"{dtype} {variant}": st for (dtype, variant), st in stats.items()}})
    for dtype_name in args.dtypes:
        _print_table(dtype_name, rows, probe[dtype_name]["gflops"] * 1e9, args.dtypes)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "gemm_probe": probe, "rows": rows}, f, indent=1)


def _print_table(dtype_name: str, rows: list[dict], gemm: float, dtypes: list[str]) -> None:
    versus_fp32 = dtype_name == "bfloat16" and "float32" in dtypes
    print(f"\n**forward+backward, {dtype_name}, dropout 0** (median ms [p20–p80] · GFLOP/s · % of {dtype_name} GEMM)\n")
    print("| B, H, T, D | ext flash | ext materialised | sdpa | materialised / flash | sdpa / flash |"
          + (" fp32 flash / bf16 flash |" if versus_fp32 else ""))
    print("|---|---|---|---|---|---|" + ("---|" if versus_fp32 else ""))
    for row in rows:
        def cell(s):
            rate = row["flops"] / s["median_s"]
            return (f"{s['median_s'] * 1e3:.2f} [{s['p20_s'] * 1e3:.2f}–{s['p80_s'] * 1e3:.2f}] · "
                    f"{rate / 1e9:.0f} · {100 * rate / gemm:.0f}%")

        flash, mat, sdpa = (row[f"{dtype_name} {v}"] for v in ("flash", "materialised", "sdpa"))
        line = (f"| {', '.join(map(str, row['shape']))} | {cell(flash)} | {cell(mat)} | {cell(sdpa)} | "
                f"{mat['median_s'] / flash['median_s']:.2f}× | {sdpa['median_s'] / flash['median_s']:.2f}× |")
        if versus_fp32:
            line += f" {row['float32 flash']['median_s'] / flash['median_s']:.2f}× |"
        print(line)


if __name__ == "__main__":
    main()
