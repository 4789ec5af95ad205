"""Benchmark (not a test): where the `ext` attention's forward+backward spends its time on CPU, op by op.

    python benchmarks/ext_ops_cpu.py [--reps 15] [--dtypes bfloat16 float32] [--json out.json]

Runs the op chain of one forward+backward without dropout (fastgpt/ext/attention_function.py:
nt, softmax, nn; nt, tn, softmax_backward, nn, tn) at two training shapes, (B16, H6, T256, D64)
and (B4, H6, T1024, D64), timing each op call with its inputs as the chain leaves them (the
previous op's output, not a cache-warm repeat). bfloat16 runs twice, interleaved rep by rep: on
the AMX tiles where the CPU has them (csrc/cpu/amx_matmul.cpp) and on float32 tiles
(within fastgpt.ext.cpu_isa(amx=False)), so their ratio comes from one run. Medians per op; each matmul counts half
of attention_flops' causal forward (FlashAttention's convention, as every table here), the
softmaxes none.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from fastgpt.bench.common import attention_flops, print_cpu_environment
from fastgpt.machine.timing import summarize

SHAPES = [(16, 6, 256, 64), (4, 6, 1024, 64)]
# The chain's op calls in order: (label, op kind). Matmuls count FLOPs; softmaxes do not.
CHAIN = [("S = nt(q, k)", "mm"), ("P = softmax(S)", "sm"), ("O = nn(P, v)", "mm"), ("dP = nt(dO, v)", "mm"),
         ("dV = tn(P, dO)", "mm"), ("dS = softmax'(dP, P)", "sm"), ("dQ = nn(dS, k)", "mm"), ("dK = tn(dS, q)", "mm")]


def chain_times(q, k, v, dout) -> list[float]:
    """One forward+backward through the ops, each call timed: seconds per CHAIN entry."""
    ops = torch.ops.fastgpt
    B, H, T, D = q.shape
    scale = D ** -0.5
    times, t = [], time.perf_counter()

    def lap():
        nonlocal t
        now = time.perf_counter()
        times.append(now - t)
        t = now

    s = ops.causal_matmul_nt(q, k); lap()
    p = ops.causal_softmax(s, T, T, scale, 0.0, 0, 0); lap()
    ops.causal_matmul_nn(p, v, T); lap()
    dp = ops.causal_matmul_nt(dout, v); lap()
    ops.causal_matmul_tn(p, dout, T, H); lap()
    ds = ops.causal_softmax_backward(dp, p, T, T, scale); lap()
    ops.causal_matmul_nn(ds, k, T); lap()
    ops.causal_matmul_tn(ds, q, T, H); lap()
    return times


def run(shape, dtype_name: str, reps: int) -> dict:
    import fastgpt.ext as ext

    ext.load()
    B, H, T, D = shape
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(T)
    q, k, v, dout = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(4))
    paths = {"": None}  # the name of each path: whether it may use AMX (None: the switch as it is)
    if dtype == torch.bfloat16:
        paths = {"AMX": True, "float32 tiles": False}
    samples = {name: [] for name in paths}
    for rep in range(reps + 2):  # two warm-ups
        for name, amx in paths.items():
            with ext.cpu_isa(amx=amx):
                times = chain_times(q, k, v, dout)
            if rep >= 2:
                samples[name].append(times)
    flops_per_product = attention_flops(B, H, T, D, "forward") / 2  # the forward is two such products
    result = {"shape": shape, "dtype": dtype_name, "paths": {}}
    for name, runs in samples.items():
        if dtype == torch.bfloat16 and name == "AMX" and not torch.ops.fastgpt.cpu_bf16_uses_amx(D):
            result["paths"][name] = "not available on this CPU"
            continue
        medians = [summarize([r[i] for r in runs])["median_s"] for i in range(len(CHAIN))]
        totals = [sum(r) for r in runs]
        result["paths"][name or dtype_name] = {
            "ops": [{"op": label, "median_s": m, "gflops": flops_per_product / m / 1e9 if kind == "mm" else None}
                    for (label, kind), m in zip(CHAIN, medians)],
            "total": summarize(totals),
        }
    return result


def print_table(result: dict) -> None:
    B, H, T, D = result["shape"]
    paths = {n: p for n, p in result["paths"].items() if isinstance(p, dict)}
    print(f"\n**(B{B}, H{H}, T{T}, D{D}), {result['dtype']}**: median ms per op (GFLOP/s)\n")
    print("| op | " + " | ".join(paths) + " |")
    print("|---|" + "---|" * len(paths))
    for i, (label, _) in enumerate(CHAIN):
        cells = []
        for p in paths.values():
            op = p["ops"][i]
            rate = f" ({op['gflops']:.0f})" if op["gflops"] else ""
            cells.append(f"{op['median_s'] * 1e3:.2f}{rate}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| **whole chain** | " + " | ".join(f"**{p['total']['median_s'] * 1e3:.2f}**" for p in paths.values()) + " |")
    for name, p in result["paths"].items():
        if not isinstance(p, dict):
            print(f"- {name}: {p}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed chains per path (after 2 warm-ups)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--json", help="write the environment and the per-op medians here")
    args = parser.parse_args()
    env = print_cpu_environment()
    results = [run(shape, dtype, args.reps) for dtype in args.dtypes for shape in SHAPES]
    for r in results:
        print_table(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
