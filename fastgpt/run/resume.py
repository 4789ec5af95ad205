"""A run read back from its checkpoint: the settings it continues with, the corpus it must train on,
and each process's random streams.

Trainer.resume builds the run from these pieces: resumed_settings() before the Trainer exists
(they decide what it builds), check_corpus() and restore_rng_streams() once it does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fastgpt.run.config import ARCHITECTURE_FIELDS


def resumed_settings(state: dict[str, Any], out_dir: str | Path, overrides: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The checkpoint's model and training fields with `overrides` on top; an override may change a
    training setting but not the architecture."""
    values = {**state["model_config"], **state["train_config"], "out_dir": str(out_dir)}
    for name, value in (overrides or {}).items():
        if name in ARCHITECTURE_FIELDS and value != values.get(name):
            raise ValueError(f"cannot change {name} from {values.get(name)!r} to {value!r} when resuming")
        values[name] = value
    data = values.get("data")
    if "data" not in (overrides or {}) and data and not os.path.isabs(data) and not os.path.exists(data):
        # older checkpoints stored the path as given, relative to where that run was started
        raise FileNotFoundError(f"the checkpoint's corpus path {data!r} is relative to the directory its run was "
                                f"started from, and there is no such file from {os.getcwd()!r}: pass --data "
                                "with the corpus's path")
    return values


def check_corpus(state: dict[str, Any], vocab: str, fingerprint: Callable[[], str], allow_change: bool,
                 is_main: bool) -> None:
    """The corpus (its characters `vocab`, its fingerprint() computed only when the checkpoint has
    one to compare) must be the checkpoint's: the same vocabulary, since each embedding row stands
    for one character, and the same text unless allow_change. Rank 0 (is_main) prints the notes."""
    trained_on = state["train_config"].get("data")
    trained_on = f"--data {trained_on}" if trained_on else "the default corpus, no --data"
    if vocab != state["vocab"]:
        raise ValueError(f"the corpus's vocabulary differs from the checkpoint's: resume with the corpus it was "
                         f"trained on ({trained_on})")
    saved = state.get("corpus_fingerprint")
    if saved is None:
        if is_main:
            print("fastgpt: the checkpoint predates corpus fingerprints: whether this is the corpus it was trained "
                  "on is not checked (its vocabulary matches)")
    elif saved != fingerprint():
        if not allow_change:
            raise ValueError(
                f"the corpus is not the one this run was trained on (fingerprint {fingerprint()[:12]}, "
                f"the checkpoint's {saved[:12]}), though the vocabularies match: resume with the corpus it was "
                f"trained on ({trained_on}), or pass --allow-corpus-change to continue on this one"
            )
        if is_main:
            print("fastgpt: continuing on another corpus than the checkpoint's (--allow-corpus-change)")


def restore_rng_streams(ranks: list[dict[str, torch.Tensor]], rank: int, world_size: int, device: torch.device,
                        seed: int, iteration: int) -> None:
    """Each process's torch RNG (its dropout masks) from the checkpoint's `ranks`, one state per
    process in rank order. Under another world size the streams start afresh, still a function of
    (seed, rank, iteration)."""
    if len(ranks) == world_size:
        rng = ranks[rank]
        torch.set_rng_state(rng["cpu"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        return
    torch.manual_seed(seed + rank + 1000 * iteration)
    if rank == 0:
        print(f"fastgpt: the checkpoint was written by {len(ranks)} process(es), this run has "
              f"{world_size}: dropout masks continue from new random streams")
