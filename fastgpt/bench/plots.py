"""Plots of an attention benchmark, drawn from its JSON: time and peak memory against T, one line
per backend, the p20-p80 spread as a band."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator  # noqa: E402


def _saved(fig, path: Path) -> Path:
    """Lays `fig` out, writes it to `path` and frees it."""
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _style(ax, title: str, ylabel: str) -> None:
    """Log-log against T, with plain tick labels: 0.5, 2, 40 rather than 5×10⁻¹; 64, 128 rather than 2⁶."""
    ax.set_title(title, fontsize=10)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (B·T constant)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    # 1-2-5 steps: a panel that spans less than a decade (memory) still gets labelled ticks
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter(""))


def plot_attention(result: dict[str, Any], out_dir: Path, name: str = "attention") -> list[Path]:
    """One PNG per dtype: a row per dropout, columns = the modes' times, then peak memory; a sweep
    of several variants (--variants) gets plot_variants' PNG instead."""
    records = [r for r in result["records"] if r["status"] == "ok"]
    if len({r.get("variant", "causal") for r in records}) > 1:
        return plot_variants(result, out_dir, name)
    paths = []
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        rows = [r for r in records if r["dtype"] == dtype]
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        dropouts = list(dict.fromkeys(r["dropout"] for r in rows))
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        fig, axes = plt.subplots(len(dropouts), len(modes) + 1, figsize=(4.2 * (len(modes) + 1), 3.6 * len(dropouts)),
                                 squeeze=False, dpi=110)
        for i, dropout in enumerate(dropouts):
            for j, mode in enumerate(modes):
                ax = axes[i][j]
                for backend in backends:
                    pts = sorted((r for r in rows if (r["backend"], r["mode"], r["dropout"]) == (backend, mode, dropout)),
                                 key=lambda r: r["T"])
                    if not pts:
                        continue
                    T = [r["T"] for r in pts]
                    ax.plot(T, [1e3 * r["median_s"] for r in pts], marker="o", ms=3, label=backend)
                    ax.fill_between(T, [1e3 * r["p20_s"] for r in pts], [1e3 * r["p80_s"] for r in pts], alpha=0.2)
                _style(ax, f"{mode}, dropout {dropout}", "time per call (ms)")
            ax = axes[i][-1]
            for backend in backends:
                pts = sorted((r for r in rows if (r["backend"], r["mode"], r["dropout"]) == (backend, "forward+backward", dropout)
                              and r.get("peak_memory_bytes") is not None), key=lambda r: r["T"])
                if pts:
                    ax.plot([r["T"] for r in pts], [r["peak_memory_bytes"] / 2**20 for r in pts], marker="o", ms=3, label=backend)
            _style(ax, f"peak memory, forward+backward, dropout {dropout}", "MiB above the inputs")
        axes[0][0].legend()
        env = result["environment"]
        heads = f"H={rows[0]['H']}" + (f" over H_kv={rows[0]['H_kv']}" if rows[0].get("H_kv", rows[0]["H"]) != rows[0]["H"]
                                       else "")
        fig.suptitle(f"causal attention, {dtype}, {heads}, D={rows[0]['D']}: {env['device']}, torch {env['torch']}",
                     fontsize=11)
        paths.append(_saved(fig, out_dir / f"{name}_{dtype}.png"))
    return paths


def plot_variants(result: dict[str, Any], out_dir: Path, name: str = "attention") -> list[Path]:
    """One PNG per dtype: a row per (mode, dropout), a panel per T, bars = each backend's median time
    per variant, labelled with its multiple of causal."""
    records = [r for r in result["records"] if r["status"] == "ok"]
    variants = list(dict.fromkeys(r.get("variant", "causal") for r in records))
    paths = []
    for dtype in dict.fromkeys(r["dtype"] for r in records):
        rows = [r for r in records if r["dtype"] == dtype]
        groups = list(dict.fromkeys((r["mode"], r["dropout"]) for r in rows))
        seq_lens = list(dict.fromkeys(r["T"] for r in rows))
        backends = list(dict.fromkeys(r["backend"] for r in rows))
        fig, axes = plt.subplots(len(groups), len(seq_lens), squeeze=False, dpi=110,
                                 figsize=(1.5 + 0.45 * len(variants) * len(backends) * len(seq_lens), 3.6 * len(groups)))
        for (mode, dropout), panel_row in zip(groups, axes):
            for ax, T in zip(panel_row, seq_lens):
                cell = [r for r in rows if (r["mode"], r["dropout"], r["T"]) == (mode, dropout, T)]
                _variant_bars(ax, cell, variants, backends)
                ax.set_title(f"{mode}, dropout {dropout}, T={T}, B={cell[0]['B'] if cell else '?'}", fontsize=9)
        axes[0][0].legend(fontsize=8)
        env = result["environment"]
        fig.suptitle(f"attention variants, {dtype}, H={rows[0]['H']}, D={rows[0]['D']} (labels: × causal): "
                     f"{env['device']}, torch {env['torch']}", fontsize=10)
        paths.append(_saved(fig, out_dir / f"{name}_variants_{dtype}.png"))
    return paths


def _variant_bars(ax, cell: list[dict[str, Any]], variants: list[str], backends: list[str]) -> None:
    """Grouped bars on `ax`: a group per variant, a bar per backend (its median ms), each labelled
    with its multiple of the same backend's causal time."""
    width = 0.8 / len(backends)
    for b, backend in enumerate(backends):
        for x, variant in enumerate(variants):
            r = next((r for r in cell if (r["backend"], r.get("variant", "causal")) == (backend, variant)), None)
            if r is None:
                continue
            ax.bar(x + b * width, 1e3 * r["median_s"], width, color=f"C{b}", label=backend if x == 0 else None)
            if r.get("vs_causal"):
                ax.text(x + b * width, 1e3 * r["median_s"], f"{r['vs_causal']:.2f}×", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(variants))], variants, rotation=30, fontsize=8)
    ax.set_ylabel("time per call (ms)")
    ax.grid(alpha=0.3, axis="y")


def plot_generate(result: dict[str, Any], out_dir: Path, name: str = "generate") -> list[Path]:
    """Tokens/s of `fastgpt bench generate`: a panel per case, a group of bars per (backend, linear
    kernel), a bar per variant with its p20-p80 spread and its speed-up over the group's first."""
    records = [r for r in result["records"] if r["status"] == "ok"]
    if not records:
        return []
    cases = list(dict.fromkeys(r["case"] for r in records))
    fig, axes = plt.subplots(1, len(cases), figsize=(6.4 * len(cases), 4.4), squeeze=False, dpi=110)
    for ax, case in zip(axes[0], cases):
        rows = [r for r in records if r["case"] == case]
        groups = list(dict.fromkeys((r["backend"], r["linear"]) for r in rows))
        variants = list(dict.fromkeys(r["variant"] for r in rows))
        width = 0.8 / len(variants)
        for v, variant in enumerate(variants):
            for g, group in enumerate(groups):
                match = [r for r in rows if (r["backend"], r["linear"], r["variant"]) == (*group, variant)]
                if not match:
                    continue
                r = match[0]
                base = next(x for x in rows if (x["backend"], x["linear"]) == group)["median_s"]
                x = g + (v - (len(variants) - 1) / 2) * width
                tps = r["new_tokens"] / r["median_s"]
                slow, fast = r["new_tokens"] / r["p80_s"], r["new_tokens"] / r["p20_s"]  # the p20-p80 spread
                ax.bar(x, tps, width, yerr=[[tps - slow], [fast - tps]], capsize=3, color=f"C{v}",
                       label=variant if g == 0 else None)
                ax.annotate(f"{base / r['median_s']:.1f}×", (x, fast), textcoords="offset points", xytext=(0, 4),
                            ha="center", fontsize=8)
        ax.set_xticks(range(len(groups)), [f"{b}\nlinear: {k}" for b, k in groups], fontsize=8)
        ax.set_ylabel("new tokens per second")
        ax.set_title(f"{case}: {rows[0]['new_tokens']} new tokens from a 1-character prompt", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    env = result["environment"]
    fig.suptitle(f"generation, {result['preset']} model, batch 1: {env['device']}, {env['cpu_threads']} threads, "
                 f"torch {env['torch']}", fontsize=11)
    return [_saved(fig, out_dir / f"{name}.png")]


def plot_training_run(run: dict[str, Any], path: Path) -> Path:
    """The gpu-report's training run: validation loss against seconds of training steps, the
    target as a line, each evaluation's iteration beside its point."""
    curve = run["curve"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    seconds = [c["train_s"] for c in curve]
    ax.plot(seconds, [c["val_loss"] for c in curve], marker="o", ms=3, label="val loss")
    ax.plot(seconds, [c["train_loss"] for c in curve], marker="o", ms=3, alpha=0.6, label="train loss")
    ax.axhline(run["target_val_loss"], color="k", ls="--", lw=1, label=f"target {run['target_val_loss']}")
    for c in curve[:: max(1, len(curve) // 8)]:
        ax.annotate(str(c["iter"]), (c["train_s"], c["val_loss"]), textcoords="offset points", xytext=(0, 5),
                    ha="center", fontsize=7)
    ax.set_xlabel("seconds of training steps (evaluations excluded)")
    ax.set_ylabel(f"loss (mean over {run['eval_iters']} batches)")
    ax.set_title(f"{run['preset']}, {run['dtype']}, attention {run['backend']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _saved(fig, path)
