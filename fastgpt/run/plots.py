"""Plots drawn from the files a run writes (metrics.jsonl is their single source)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curve(metrics_path: str | Path, png_path: str | Path) -> Path:
    """Train and val loss against the iteration, one point per evaluation. A record without a
    finite value (null, as a non-finite loss is written; an older run's NaN; a line that is not a
    record) is left out of that curve: the plot draws what there is."""
    records = _records(Path(metrics_path))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, label in (("train_loss", "train"), ("val_loss", "val")):
        points = [(r["iter"], r[name]) for r in records if _finite(r.get(name))]
        ax.plot([it for it, _ in points], [loss for _, loss in points], marker="o", ms=3, label=label)
    scored = [r for r in records if _finite(r.get("val_loss"))]
    if scored:
        best = min(scored, key=lambda r: r["val_loss"])
        ax.annotate(f"best val {best['val_loss']:.4f}", (best["iter"], best["val_loss"]),
                    textcoords="offset points", xytext=(-60, 18), arrowprops=dict(arrowstyle="->", lw=0.8))
    backends = sorted({r["backend"] for r in records if isinstance(r.get("backend"), str)})
    ax.set_title(f"fastgpt training loss (attention: {', '.join(backends) or 'unknown'})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/char)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png_path = Path(png_path)
    try:
        fig.savefig(png_path)
    finally:
        plt.close(fig)
    return png_path


def _records(path: Path) -> list[dict[str, Any]]:
    """The file's records that have an iteration; lines that are not records are skipped."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and _finite(record.get("iter")):
            records.append(record)
    return records


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
