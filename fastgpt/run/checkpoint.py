"""Checkpoints: written atomically, and read only if they are fastgpt checkpoints.

A crash mid-write never replaces a good file with half of one (fastgpt/run/atomic_file.py), and a
write that fails (a full disk) raises the disk's own error, not torch's. Reading refuses, in one
line, a file that is empty, truncated, foreign, or holds more than tensors, numbers and strings,
or whose fields are not what fastgpt writes (an edited config, vocabulary or iteration), and says
that nothing was loaded.
"""

from __future__ import annotations

import os
import pickle
import typing
from pathlib import Path
from typing import Any, BinaryIO, Callable, Optional

import torch

from fastgpt.run.atomic_file import replace_atomically

CHECKPOINT_NAME = "ckpt.pt"
# What every fastgpt checkpoint holds: enough to rebuild the model, its tokenizer and its settings.
REQUIRED_KEYS = ("model", "model_config", "train_config", "vocab", "iter")
# ModelConfig fields renamed since checkpoints were first written: former name -> current name.
# A checkpoint with a former name is read as if it had the current one.
FORMER_MODEL_FIELDS = {"attention": "backend", "dropout": "dropout_p"}


class NotACheckpointError(ValueError):
    """A file that is not a fastgpt checkpoint; it was not loaded."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Writes `state` to `path` atomically: readers see the old file or the new, never a mix. A
    write that fails (a full disk) raises the OSError that stopped it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(f: BinaryIO) -> None:
        keeping = _KeepsWriteError(f)
        try:
            torch.save(state, keeping)
        except RuntimeError:
            # torch.save's C++ writer reports a failed write as "[enforce fail ...] unexpected pos":
            # the disk's own error says what happened
            if keeping.error is not None:
                raise keeping.error from None
            raise

    replace_atomically(path, write)


class _KeepsWriteError:
    """A file for torch.save that keeps the OSError of a failed write."""

    def __init__(self, f: BinaryIO):
        self.f = f
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:  # the rest (flush, seek, tell, ...) as the file's own
        return getattr(self.f, name)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The checkpoint at `path`, checked (check_checkpoint): what `fastgpt sample` and a resumed
    run read. Anything else is refused in one line, and nothing is loaded."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}: {str(path.parent)!r} is a file, not a run directory; "
                                "point --out-dir at the directory that holds ckpt.pt")
    if path.is_dir():
        raise NotACheckpointError(f"{str(path)!r} is a directory, not a checkpoint: move it out of the run directory, "
                                  "or point --out-dir at the directory that holds the run's ckpt.pt")
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
        if not _written_by_torch_save(path):
            raise NotACheckpointError(
                f"{str(path)!r} is not a fastgpt checkpoint (truncated, corrupted or another format: not a file "
                "torch.save writes, which is a zip archive or a pickle); it was not loaded"
            ) from None
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
    rename_former_fields(state)
    check_checkpoint(state, path)
    return state


def rename_former_fields(state: dict[str, Any]) -> None:
    """Renames, in place, the model_config fields a checkpoint written before their rename holds
    (FORMER_MODEL_FIELDS). A config that holds both names keeps both, for check_checkpoint to refuse."""
    config = state.get("model_config")
    if not isinstance(config, dict):
        return  # check_checkpoint refuses it
    for former, current in FORMER_MODEL_FIELDS.items():
        if former in config and current not in config:
            config[current] = config.pop(former)


def _written_by_torch_save(path: Path) -> bool:
    """Whether the file starts as torch.save's files do: a zip archive, or (before torch 1.6) a
    pickle of protocol 2 or above. Random bytes fail the pickle reader too, for another reason."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def check_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuses, in one line naming the field, a checkpoint whose contents cannot be what fastgpt
    wrote (a file edited by hand, or by another program): a later KeyError or TypeError deep in
    sampling or resuming would name nothing."""
    from fastgpt.run.config import TrainConfig
    from fastgpt.model.gpt import ModelConfig

    def refuse(field: str, why: str) -> NotACheckpointError:
        return NotACheckpointError(f"{str(path)!r} is not a usable fastgpt checkpoint: its {field} {why}; "
                                   "it was not loaded")

    model = state["model"]
    if not isinstance(model, dict) or not all(isinstance(t, torch.Tensor) for t in model.values()):
        raise refuse("model", f"is {_kind(model)}, not the model's tensors by name")
    _check_fields(state["model_config"], ModelConfig, "model_config", refuse)
    try:
        ModelConfig(**state["model_config"]).validate()
    except (ValueError, TypeError) as e:
        raise refuse("model_config", f"is not a model's: {e}") from None
    _check_fields(state["train_config"], TrainConfig, "train_config", refuse)
    vocab, vocab_size = state["vocab"], state["model_config"].get("vocab_size", ModelConfig.vocab_size)
    if not isinstance(vocab, str):
        raise refuse("vocab", f"is {_kind(vocab)}, not a string of the corpus's characters")
    if vocab != "".join(sorted(set(vocab))):
        raise refuse("vocab", "is not the corpus's distinct characters in order (one per embedding row)")
    if len(vocab) != vocab_size:
        raise refuse("vocab", f"has {len(vocab)} characters where model_config's vocab_size is {vocab_size}")
    it = state["iter"]
    if not isinstance(it, int) or isinstance(it, bool) or it < 0:
        raise refuse("iter", f"is {it!r}, not an iteration (an integer >= 0)")
    elapsed = state.get("elapsed_s", 0.0)
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool):
        raise refuse("elapsed_s", f"is {_kind(elapsed)}, not a number of seconds")


def _check_fields(values: Any, cls: type, field: str, refuse: Callable[[str, str], Exception]) -> None:
    """`values` must be a dict of `cls`'s fields (a dataclass), each of its declared type."""
    if not isinstance(values, dict):
        raise refuse(field, f"is {_kind(values)}, not a dict of {cls.__name__}'s fields")
    hints = typing.get_type_hints(cls)
    unknown = sorted(str(name) for name in values if name not in hints)
    if unknown:
        raise refuse(field, f"has field(s) {cls.__name__} does not know: {', '.join(unknown)}")
    for name, value in values.items():
        kinds = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is typing.Union else (hints[name],)
        if not any(_is_a(value, kind) for kind in kinds):
            names = " or ".join("None" if kind is type(None) else kind.__name__ for kind in kinds)
            raise refuse(f"{field}.{name}", f"is {value!r:.40}, not {names}")


def _is_a(value: Any, kind: type) -> bool:
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind) if isinstance(kind, type) else True


def _kind(value: Any) -> str:
    """A value's type, for a message: 'a str', 'a list'."""
    return f"a {type(value).__name__}"
