"""Benchmark (not a test): the ext skinny linear kernel against F.linear, per number of rows.

    python benchmarks/skinny_linear.py [--preset shakespeare-char] [--reps 40] [--json out.json]

The layers are every linear layer of the preset's GPT (shakespeare-char: 6 blocks × qkv, proj,
fc, mlp proj, plus the LM head; 10.6 M weights, 42.5 MB in float32), run one after the other as in
a forward pass, on inputs of M rows: M = 1 is a decode step of one sequence, M = T an uncached step
over T tokens. torch (F.linear, BLAS) and skinny (fastgpt.ext.skinny_linear) run interleaved, after
warm-up; a figure is the median over the repetitions of the whole set of layers. "weights GB/s" is
the float32 weight bytes over that time: the layers read every weight once, so for small M it is
the speed of the stream over the weights. Interleaved with them, torch.sum over one flat copy of
the same weights gives the read bandwidth the machine offers at that moment (on a shared machine
it drops when a neighbour streams memory). The row at which skinny stops winning is what
fastgpt.model.linear.SKINNY_MAX_ROWS is set from.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn as nn
from torch.nn import functional as F

import fastgpt.ext
from fastgpt.bench.common import load_average, print_cpu_environment
from fastgpt.machine.timing import summarize, time_interleaved
from fastgpt.bench.generate import preset_model_config
from fastgpt.run.config import PRESETS
from fastgpt.model.gpt import build_model

ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="shakespeare-char", choices=sorted(PRESETS))
    parser.add_argument("--reps", type=int, default=40, help="timed runs per provider (after 3 warm-ups)")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="values of M")
    parser.add_argument("--json", help="write the environment, the table rows and the raw timings here")
    args = parser.parse_args(argv)

    device = torch.device("cpu")
    env = print_cpu_environment()
    torch.manual_seed(0)
    model = build_model(preset_model_config(args.preset))
    layers = [(m.weight.detach(), None if m.bias is None else m.bias.detach())
              for m in model.modules() if isinstance(m, nn.Linear)]
    weight_bytes = sum(w.numel() * w.element_size() for w, _ in layers)
    flat = torch.cat([w.flatten() for w, _ in layers])  # the same bytes, one contiguous read
    fastgpt.ext.load()

    rows = []
    for M in args.rows:
        xs = [torch.randn(M, w.shape[1]) for w, _ in layers]
        calls = {
            "torch": lambda xs=xs: [F.linear(x, w, b) for x, (w, b) in zip(xs, layers)],
            "skinny": lambda xs=xs: [fastgpt.ext.skinny_linear(x, w, b) for x, (w, b) in zip(xs, layers)],
            "sum": flat.sum,
        }
        with torch.no_grad():
            times = time_interleaved(calls, device, args.reps, warmup=3)
        stats = {p: summarize(ts) for p, ts in times.items()}
        med = {p: s["median_s"] for p, s in stats.items()}
        rows.append({"rows": M, "stats_s": stats, "torch_over_skinny": med["torch"] / med["skinny"],
                     "weights_gb_s": {p: weight_bytes / t / 1e9 for p, t in med.items()}, "raw_s": times})
        print(f"  done M={M}", flush=True)
    env["load_average_end"] = load_average()
    print(f"load_average_end: {env['load_average_end']}")
    print(f"{len(layers)} linear layers, {weight_bytes / 1e6:.1f} MB of float32 weights\n")

    print("| rows M | torch ms (p20-p80) | skinny ms (p20-p80) | torch/skinny | weights GB/s torch | skinny | sum |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{s['median_s'] * 1e3:.2f} ({s['p20_s'] * 1e3:.2f}-{s['p80_s'] * 1e3:.2f})"
                 for s in (r["stats_s"][p] for p in ("torch", "skinny"))]
        gb_s = r["weights_gb_s"]
        print(f"| {r['rows']} | {' | '.join(cells)} | {r['torch_over_skinny']:.2f}x | "
              f"{gb_s['torch']:.1f} | {gb_s['skinny']:.1f} | {gb_s['sum']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "preset": args.preset, "weight_bytes": weight_bytes, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
