"""Benchmark (not a test): the residual branches' dropout on CPU, PyTorch's against fastgpt's.

    python benchmarks/dropout_cpu.py [--reps 9] [--json out.json]

`F.dropout(x, 0.2)` (its mask drawn by bernoulli_) against `fastgpt.ext.dropout(x, 0.2)` (the
attention's Philox stream, vectorised: csrc/cpu/dropout.cpp), interleaved in one process, on the
lecture model's activations: (64, 256, 384), the residual branch of `shakespeare-char`, in float32
and bfloat16. Forward calls only; the backward of either is one multiply by the same mask.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from fastgpt.bench.common import print_cpu_environment
from fastgpt.machine.timing import summarize, time_interleaved

SHAPE = (64, 256, 384)
P = 0.2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9, help="timed calls per kernel (after 2 warm-ups)")
    parser.add_argument("--json", help="write the environment and the medians here")
    args = parser.parse_args()
    import fastgpt.ext as ext

    ext.load()
    env = print_cpu_environment()
    rows = []
    print(f"\n**dropout p = {P} of a {SHAPE} activation** (median ms [p20–p80])\n")
    print("| dtype | F.dropout | fastgpt.ext.dropout | ratio |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(SHAPE).to(dtype)
        times = time_interleaved({"torch": lambda: F.dropout(x, P, training=True), "ext": lambda: ext.dropout(x, P)},
                                 torch.device("cpu"), args.reps, warmup=2)
        stats = {name: summarize(t) for name, t in times.items()}
        ms = {name: f"{s['median_s'] * 1e3:.2f} [{s['p20_s'] * 1e3:.2f}–{s['p80_s'] * 1e3:.2f}]" for name, s in stats.items()}
        ratio = stats["torch"]["median_s"] / stats["ext"]["median_s"]
        print(f"| {str(dtype).removeprefix('torch.')} | {ms['torch']} | {ms['ext']} | {ratio:.1f}× |")
        rows.append({"dtype": str(dtype), "shape": SHAPE, "p": P, "torch": stats["torch"], "ext": stats["ext"]})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
