"""A decode step over a paged KV cache: `fastgpt bench decode --page-size P [--batch-size B]`.

    fastgpt bench decode --page-size 16 [--batch-size 16] [--kv-lens 1024 4096] [--heads 8]
                         [--kv-heads 2] [--head-dim 64] [--backends ext.cpu_flash sdpa] [--reps 20]

One decode step of B sequences, each one query per head over T_k cached keys (causal, float32),
the keys and values in pages of P positions taken in random order from a pool (fastgpt/attention/
paged.py). For each kernel path, three ways to run the same step, interleaved (A B C A B C ...)
after a warm-up, the median (p20-p80) seconds per step:

    paged call          paged_attention's one call per layer (layout_attention): ext.cpu_flash and
                        triton read the pages in place; naive and sdpa gather them first
    gather, then varlen the caller gathers the pages into the packed layout and calls varlen_attention:
                        what a paged cache costs a path that cannot read pages
    contiguous          varlen_attention over the same keys already back to back: no pages at all

and the rate at which the step reads its keys and values, B·2·T_k·H_kv·D·4 bytes / median (GB/s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fastgpt.attention import refusal
from fastgpt.attention.paged import layout_attention, paged_call, paged_layout, write_pages
from fastgpt.attention.varlen import varlen_attention
from fastgpt.bench.common import environment, load_average
from fastgpt.bench.decode import plot_step_times
from fastgpt.bench.decode import save as save_decode
from fastgpt.machine.timing import summarize, time_interleaved

DEFAULT_KV_LENS = (1024, 4096)
DEFAULT_PATHS = ("ext.cpu_flash", "sdpa")
WAYS = ("paged call", "gather, then varlen", "contiguous")


def _step(batch: int, T_k: int, heads: int, kv_heads: int, head_dim: int, page_size: int, device):
    """q (B, H, D), contiguous k, v (B·T_k, H_kv, D), their pools in random page order, the layout."""
    g = torch.Generator().manual_seed(T_k + page_size)
    pages_each = -(-T_k // page_size)
    order = torch.randperm(batch * pages_each, generator=g)
    table = order.view(batch, pages_each).to(torch.int32)
    q = torch.randn(batch, heads, head_dim, generator=g).to(device)
    k, v = (torch.randn(batch * T_k, kv_heads, head_dim, generator=g).to(device) for _ in range(2))
    k_pages, v_pages = (torch.zeros(batch * pages_each, page_size, kv_heads, head_dim, device=device)
                        for _ in range(2))
    seq_lens = torch.full((batch,), T_k)
    write_pages(k_pages, v_pages, table, seq_lens, k, v, torch.arange(batch + 1) * T_k)
    layout = paged_layout(table, seq_lens, page_size, k_pages.shape[0], device=device)
    return q, k, v, k_pages, v_pages, layout


def _ways(path: str, q, k, v, k_pages, v_pages, layout) -> dict[str, Any]:
    """{"<path>, <way>": a no-argument step} for the three ways of WAYS."""
    cu_q, cu_k, max_k = layout.varlen.cu_seqlens_q, layout.varlen.cu_seqlens_k, layout.varlen.max_k

    def gathered():
        return varlen_attention(q, *layout.gather(k_pages, v_pages), cu_q, cu_k, 1, max_k, backend=path)

    return {f"{path}, {WAYS[0]}": lambda: layout_attention(q, k_pages, v_pages, layout, backend=path),
            f"{path}, {WAYS[1]}": gathered,
            f"{path}, {WAYS[2]}": lambda: varlen_attention(q, k, v, cu_q, cu_k, 1, max_k, backend=path)}


def run_paged_decode_benchmark(kv_lens=DEFAULT_KV_LENS, page_size: int = 16, batch: int = 16, heads: int = 8,
                               kv_heads: int = 2, head_dim: int = 64, paths=DEFAULT_PATHS, reps: int = 20,
                               device: str = "cpu") -> dict[str, Any]:
    """{"environment", "config", "rows": [{T_k, path, way, median_s, p20_s, p80_s, gb_per_s, vs_contiguous}]}."""
    device = torch.device(device)
    rows = []
    for T_k in kv_lens:
        q, k, v, k_pages, v_pages, layout = _step(batch, T_k, heads, kv_heads, head_dim, page_size, device)
        runnable, skipped = {}, []
        for path in paths:
            reason = refusal(paged_call(q, k_pages, v_pages, layout), path)
            if reason is not None:
                skipped.append({"T_k": T_k, "path": path, "refused": reason})
                continue
            runnable.update(_ways(path, q, k, v, k_pages, v_pages, layout))
        with torch.inference_mode():
            times = time_interleaved(runnable, device, reps) if runnable else {}
        bytes_read = batch * 2 * T_k * kv_heads * head_dim * 4
        stats = {name: summarize(seconds) for name, seconds in times.items()}
        for name, seconds in times.items():
            path, way = name.split(", ", 1)
            contiguous = stats[f"{path}, {WAYS[2]}"]["median_s"]
            rows.append({"T_k": T_k, "path": path, "way": way, **stats[name],
                         "gb_per_s": bytes_read / stats[name]["median_s"] / 1e9,
                         "vs_contiguous": stats[name]["median_s"] / contiguous, "all_s": seconds})
        rows.extend(skipped)
    config = dict(kv_lens=list(kv_lens), page_size=page_size, batch=batch, heads=heads, kv_heads=kv_heads,
                  head_dim=head_dim, paths=list(paths), reps=reps, dtype="float32")
    return {"environment": {**environment(device), "load_average_end": load_average()}, "config": config,
            "rows": rows}


def print_table(result: dict[str, Any]) -> None:
    for key, value in result["environment"].items():
        print(f"{key}: {value}")
    print(f"{'T_k':>7}  {'kernel path':<15} {'way':<21} {'median ms':>10} {'p20-p80 ms':>15} {'GB/s':>6} "
          f"{'x contiguous':>12}")
    for row in result["rows"]:
        if "refused" in row:
            print(f"{row['T_k']:>7}  {row['path']:<15} refused: {row['refused']}")
            continue
        spread = f"{row['p20_s'] * 1e3:.3f}-{row['p80_s'] * 1e3:.3f}"
        print(f"{row['T_k']:>7}  {row['path']:<15} {row['way']:<21} {row['median_s'] * 1e3:>10.3f} {spread:>15} "
              f"{row['gb_per_s']:>6.1f} {row['vs_contiguous']:>12.2f}")


def plot_paged_decode(result: dict[str, Any], path: Path) -> Path:
    """Milliseconds per paged decode step against T_k, one line per (kernel path, way)."""
    c = result["config"]
    title = (f"paged decode, B={c['batch']}, page {c['page_size']}, H={c['heads']}, H_kv={c['kv_heads']}, "
             f"D={c['head_dim']}, float32\n{result['environment']['device']}")
    return plot_step_times(result["rows"], lambda r: f"{r['path']}, {r['way']}", "cached keys per sequence T_k",
                           title, path, dashed=lambda name: not name.endswith(WAYS[0]))


def save(result: dict[str, Any], out_dir: Path, name: str = "decode_paged") -> list[Path]:
    return save_decode(result, out_dir, name, plot_paged_decode)
