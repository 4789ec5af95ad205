"""Long-context decoding with and without split-KV: `fastgpt bench decode`.

    fastgpt bench decode [--kv-lens 4096 16384 65536] [--heads 8] [--kv-heads 1] [--head-dim 64]
                         [--paths ext.cpu_flash ext.cpu_split_kv sdpa] [--reps 20] [--out-dir DIR]

One decode step, B = 1: one query per head over T_k cached keys (causal, the newest token), float32.
Each kernel path runs the same call, named (so a path's own `declines` do not move it), and the
paths of one T_k run interleaved (A B A B ...) after a warm-up; a figure is the median (p20-p80)
seconds per step. Decoding is memory-bound (the machine's limit here is its memory bandwidth, not
`torch.mm`'s rate), so beside the time: the rate at which the step reads its keys and values,
2·T_k·H_kv·D·4 bytes / median (GB/s). Split-KV (fastgpt/attention/split_kv.py) cuts the keys into chunks
that run in parallel: it pays where one worker per key/value head leaves cores (or SMs) idle, few
heads over a long cache.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fastgpt.attention import AttentionCall, refusal
from fastgpt.attention.registry import choose
from fastgpt.bench.common import environment, load_average
from fastgpt.machine.timing import summarize, time_interleaved

DEFAULT_KV_LENS = (4096, 16384, 65536)
DEFAULT_PATHS = ("ext.cpu_flash", "ext.cpu_split_kv", "sdpa")


def run_decode_benchmark(kv_lens=DEFAULT_KV_LENS, heads: int = 8, kv_heads: int = 1, head_dim: int = 64,
                         paths=DEFAULT_PATHS, reps: int = 20, device: str = "cpu") -> dict[str, Any]:
    """{"environment", "config", "rows": [{T_k, path, median_s, p20_s, p80_s, gb_per_s, vs_first}]}."""
    device = torch.device(device)
    rows = []
    for T_k in kv_lens:
        g = torch.Generator().manual_seed(T_k)
        q = torch.randn(1, heads, 1, head_dim, generator=g).to(device)
        k, v = (torch.randn(1, kv_heads, T_k, head_dim, generator=g).to(device) for _ in range(2))
        call = AttentionCall.of(q, k, v)
        runnable, skipped = {}, []
        for name in paths:
            reason = refusal(call, name)
            if reason is not None:
                skipped.append({"T_k": T_k, "path": name, "refused": reason})
                continue
            path = choose(call, name)
            runnable[name] = (lambda p: lambda: p.fn(q, k, v, call))(path)
        with torch.inference_mode():
            times = time_interleaved(runnable, device, reps) if runnable else {}
        bytes_read = 2 * T_k * kv_heads * head_dim * 4
        first = None
        for name, seconds in times.items():
            stats = summarize(seconds)
            first = first or stats["median_s"]
            rows.append({"T_k": T_k, "path": name, **stats, "gb_per_s": bytes_read / stats["median_s"] / 1e9,
                         "vs_first": stats["median_s"] / first, "all_s": seconds})
        rows.extend(skipped)
    config = dict(kv_lens=list(kv_lens), heads=heads, kv_heads=kv_heads, head_dim=head_dim, paths=list(paths),
                  reps=reps, dtype="float32", batch=1)
    env = {**environment(device), "load_average_end": load_average()}
    return {"environment": env, "config": config, "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    for key, value in result["environment"].items():
        print(f"{key}: {value}")
    print(f"{'T_k':>7}  {'kernel path':<18} {'median ms':>10} {'p20-p80 ms':>15} {'GB/s':>6} {'x first':>8}")
    for row in result["rows"]:
        if "refused" in row:
            print(f"{row['T_k']:>7}  {row['path']:<18} refused: {row['refused']}")
            continue
        spread = f"{row['p20_s'] * 1e3:.3f}-{row['p80_s'] * 1e3:.3f}"
        print(f"{row['T_k']:>7}  {row['path']:<18} {row['median_s'] * 1e3:>10.3f} {spread:>15} "
              f"{row['gb_per_s']:>6.1f} {row['vs_first']:>8.2f}")


def plot_decode(result: dict[str, Any], path: Path) -> Path:
    """Milliseconds per decode step against T_k, one line per kernel path."""
    config = result["config"]
    title = (f"decode, B=1, H={config['heads']}, H_kv={config['kv_heads']}, D={config['head_dim']}, float32\n"
             f"{result['environment']['device']}")
    return plot_step_times(result["rows"], lambda r: r["path"], "cached keys T_k", title, path)


def plot_step_times(rows: list[dict], label, xlabel: str, title: str, path: Path, dashed=lambda name: False) -> Path:
    """Milliseconds per step (median, p20-p80 bars) against T_k, one line per label(row) of the timed
    rows, dashed where dashed(label) says so; log-log axes."""
    from fastgpt.bench.plots import _saved, plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    timed = [r for r in rows if "refused" not in r]
    for name in dict.fromkeys(label(r) for r in timed):
        mine = [r for r in timed if label(r) == name]
        ax.errorbar([r["T_k"] for r in mine], [r["median_s"] * 1e3 for r in mine],
                    yerr=[[(r["median_s"] - r["p20_s"]) * 1e3 for r in mine],
                          [(r["p80_s"] - r["median_s"]) * 1e3 for r in mine]], marker="o", capsize=3, label=name,
                    linestyle="--" if dashed(name) else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ms per decode step (median, p20-p80)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _saved(fig, path)


def save(result: dict[str, Any], out_dir: Path, name: str = "decode", plot=plot_decode) -> list[Path]:
    """The result as out_dir/name.json and its plot as name.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    json_path.write_text(json.dumps(result, indent=1))
    return [json_path, plot(result, out_dir / f"{name}.png")]
