"""Checkpoints written atomically: a crash mid-write never replaces a good file with half of one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "ckpt.pt"


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes `state` to a temporary file beside `path`, syncs it to disk, then renames it over
    `path`. The rename is atomic on POSIX, so readers see the old file or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Persist the rename itself (the directory entry), where the platform allows it.
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: train one first (fastgpt train --out-dir {path.parent}) "
            "or point --out-dir at the directory that holds ckpt.pt"
        )
    # weights_only: a checkpoint holds tensors, numbers, strings and dicts, nothing executable.
    return torch.load(path, map_location=map_location, weights_only=True)
