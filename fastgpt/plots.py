"""Plots drawn from the files a run writes (metrics.jsonl is their single source)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Train and val loss against the iteration, one point per evaluation."""
    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    iters = [r["iter"] for r in records]
    ax.plot(iters, [r["train_loss"] for r in records], marker="o", ms=3, label="train")
    ax.plot(iters, [r["val_loss"] for r in records], marker="o", ms=3, label="val")
    if records:
        best = min(records, key=lambda r: r["val_loss"])
        ax.annotate(f"best val {best['val_loss']:.4f}", (best["iter"], best["val_loss"]),
                    textcoords="offset points", xytext=(-60, 18), arrowprops=dict(arrowstyle="->", lw=0.8))
        backends = sorted({r["backend"] for r in records})
        ax.set_title(f"fastgpt training loss (attention: {', '.join(backends)})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path
