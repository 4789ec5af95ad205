"""Linear + cross-entropy, memory and time: `fastgpt bench cross-entropy`.

    fastgpt bench cross-entropy [--vocab-sizes 32768 131072] [--tokens 1024] [--hidden 512]
                                [--backends naive torch] [--reps 3] [--out-dir DIR]

One forward and backward of the LM head and its loss (fastgpt/ops/cross_entropy.py): N = --tokens
rows of H = --hidden over a vocabulary of V, float32, mean over the rows, gradients of x and the
weight. Per kernel path, interleaved (A B A B ...) after a warm-up: the median (p20-p80) seconds,
and the peak memory of one call beyond what was allocated before it (fastgpt/bench/common.py
says how it is measured), beside the (N, V) float32 logits' own size: what the naive path holds
whole (twice, with their gradient) and the chunked one never does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fastgpt.bench.common import environment, load_average, memory_method, peak_memory_bytes
from fastgpt.machine.timing import summarize, time_interleaved
from fastgpt.ops import LINEAR_CROSS_ENTROPY, linear_cross_entropy

DEFAULT_VOCAB_SIZES = (32768, 131072)
DEFAULT_PATHS = ("naive", "torch")


def _step(path: str, x, weight, targets):
    def run():
        leaves = [x.detach().requires_grad_(), weight.detach().requires_grad_()]
        linear_cross_entropy(*leaves, targets, backend=path).backward()
    return run


def run_cross_entropy_benchmark(vocab_sizes=DEFAULT_VOCAB_SIZES, tokens: int = 1024, hidden: int = 512,
                                paths=DEFAULT_PATHS, reps: int = 3, device: str = "cpu") -> dict[str, Any]:
    """{"environment", "config", "rows": [{vocab, path, median_s, p20_s, p80_s, peak_mib, logits_mib, vs_first}]}."""
    device = torch.device(device)
    rows = []
    for V in vocab_sizes:
        g = torch.Generator().manual_seed(V)
        x = torch.randn(tokens, hidden, generator=g).to(device)
        weight = (torch.randn(V, hidden, generator=g) / hidden**0.5).to(device)
        targets = torch.randint(V, (tokens,), generator=g).to(device)
        steps = {path: _step(path, x, weight, targets) for path in paths}
        times = time_interleaved(steps, device, reps, warmup=1)
        first = None
        for path, seconds in times.items():
            stats = summarize(seconds)
            first = first or stats["median_s"]
            peak = peak_memory_bytes(steps[path], device)
            rows.append({"vocab": V, "path": path, **stats, "vs_first": stats["median_s"] / first,
                         "peak_mib": None if peak is None else peak / 2**20, "logits_mib": tokens * V * 4 / 2**20,
                         "all_s": seconds})
    config = dict(vocab_sizes=list(vocab_sizes), tokens=tokens, hidden=hidden, paths=list(paths), reps=reps,
                  dtype="float32", reduction="mean", memory=memory_method(device))
    return {"environment": {**environment(device), "load_average_end": load_average()}, "config": config,
            "rows": rows}


def check_paths(paths) -> None:
    """Each name a path of the op's registry, or a ValueError naming it and the known ones."""
    for name in paths:
        if name == "auto":
            raise ValueError("--backends auto: the benchmark times named kernel paths: "
                             + ", ".join(LINEAR_CROSS_ENTROPY.kernel_path_names()))
        LINEAR_CROSS_ENTROPY.get_backend(name)


def print_table(result: dict[str, Any]) -> None:
    for key, value in result["environment"].items():
        print(f"{key}: {value}")
    c = result["config"]
    print(f"N={c['tokens']} rows, H={c['hidden']}, float32, forward+backward; memory: {c['memory']}")
    print(f"{'V':>7}  {'path':<6} {'median s':>9} {'p20-p80 s':>13} {'x first':>8} {'peak MiB':>9} {'logits MiB':>11}")
    for r in result["rows"]:
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"{r['vocab']:>7}  {r['path']:<6} {r['median_s']:>9.3f} {r['p20_s']:>6.3f}-{r['p80_s']:<6.3f} "
              f"{r['vs_first']:>8.2f} {peak:>9} {r['logits_mib']:>11.0f}")


def plot_cross_entropy(result: dict[str, Any], path: Path) -> Path:
    """Peak memory (left) and seconds (right) per vocabulary size, one bar per kernel path."""
    from fastgpt.bench.plots import _saved, plt

    fig, (mem, sec) = plt.subplots(1, 2, figsize=(8, 3.6))
    vocabs = result["config"]["vocab_sizes"]
    paths = result["config"]["paths"]
    width = 0.8 / len(paths)
    for i, name in enumerate(paths):
        mine = {r["vocab"]: r for r in result["rows"] if r["path"] == name}
        xs = [j + i * width for j in range(len(vocabs))]
        mem.bar(xs, [mine[v]["peak_mib"] or 0 for v in vocabs], width, label=name)
        sec.bar(xs, [mine[v]["median_s"] for v in vocabs], width, label=name)
    for ax, label in ((mem, "peak MiB beyond the inputs"), (sec, "seconds, forward+backward (median)")):
        ax.set_xticks([j + width * (len(paths) - 1) / 2 for j in range(len(vocabs))], [str(v) for v in vocabs])
        ax.set_xlabel("vocabulary V")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    c = result["config"]
    fig.suptitle(f"linear + cross-entropy, N={c['tokens']}, H={c['hidden']}, float32; "
                 f"{result['environment']['device']}", fontsize=9)
    return _saved(fig, path)


def save(result: dict[str, Any], out_dir: Path, name: str = "cross_entropy") -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=1))
    return [json_path, plot_cross_entropy(result, out_dir / f"{name}.png")]
