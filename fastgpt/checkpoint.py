"""Checkpoints: written atomically, and read only if they are fastgpt checkpoints.

A crash mid-write never replaces a good file with half of one (fastgpt/atomic_file.py). Reading
refuses, in one line, a file that is empty, truncated, foreign, or holds more than tensors,
numbers and strings, and says that nothing was loaded.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from fastgpt.atomic_file import replace_atomically

CHECKPOINT_NAME = "ckpt.pt"
# What every fastgpt checkpoint holds: enough to rebuild the model, its tokenizer and its settings.
REQUIRED_KEYS = ("model", "model_config", "train_config", "vocab", "iter")


class NotACheckpointError(ValueError):
    """A file that is not a fastgpt checkpoint; it was not loaded."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes `state` to `path` atomically: readers see the old file or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: {str(path.parent)!r} is a file, not a run directory; "
                                "point --out-dir at the directory that holds ckpt.pt")
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: train one first (fastgpt train --out-dir {path.parent}) "
            "or point --out-dir at the directory that holds ckpt.pt"
        )
    if path.stat().st_size == 0:
        raise NotACheckpointError(f"{str(path)!r} is empty (0 bytes), not a fastgpt checkpoint; it was not loaded")
    try:
        # weights_only: a checkpoint holds tensors, numbers, strings and dicts, nothing executable.
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's own text here suggests weights_only=False, i.e. running the file's code: not from us.
        raise NotACheckpointError(
            f"{str(path)!r} is not a fastgpt checkpoint: it holds Python objects other than tensors, numbers and "
            "strings, which are never loaded from a file that could run code; it was not loaded"
        ) from None
    except (EOFError, KeyError, IndexError, ValueError, RuntimeError) as e:
        # what torch's zip and pickle readers raise on a truncated, corrupted or foreign file
        raise NotACheckpointError(
            f"{str(path)!r} is not a fastgpt checkpoint (truncated, corrupted or another format: "
            f"{type(e).__name__}); it was not loaded"
        ) from None
    missing = [key for key in REQUIRED_KEYS if key not in state] if isinstance(state, dict) else list(REQUIRED_KEYS)
    if missing:
        raise NotACheckpointError(f"{str(path)!r} is not a fastgpt checkpoint (it has no {', '.join(missing)}); "
                                  "it was not loaded")
    return state
