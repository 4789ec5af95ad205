"""The one place that chooses the model's kernels other than attention's (which the attention
registry chooses, fastgpt/attention/registry.py): the residual dropout's and the linear layers'.

    dropout.ext     fastgpt.ext's vectorised Philox dropout: float32 and bfloat16 CPU tensors,
                    where the C++ extension loads
    dropout.torch   torch.nn.functional.dropout: everything else
    linear.skinny   fastgpt.ext.skinny_linear: a layer set to "skinny" (generation), on inputs it is
                    faster for (skinny_applies below)
    linear.torch    torch.nn.functional.linear: everything else, training always

Each choice is logged once per (kernel, device, dtype) and every call counts in `kernels_ran()`,
beside the attention calls' record, so that a training metrics line says what ran.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger("fastgpt.model.kernels")

EXT_DROPOUT_DTYPES = (torch.float32, torch.bfloat16)

# Whether fastgpt.ext's dropout can run here, decided once per process (None: not asked yet). A
# plain global, not an lru_cache: dynamo reads it without tracing into a cache.
_ext_dropout_reason: dict[str, Optional[str]] = {}


def ext_dropout_unavailable_reason() -> Optional[str]:
    """Why fastgpt.ext's dropout cannot run here (the library cannot be built or loaded), or None;
    asked once per process, logged once. A failed build leaves the residual dropout on F.dropout:
    the attention backend the user chose is unaffected."""
    if "cpu" not in _ext_dropout_reason:
        from fastgpt.ext import ExtensionUnavailable, load, unavailable_reason

        reason = unavailable_reason()
        if reason is None:
            try:
                load()
            except ExtensionUnavailable as e:
                reason = str(e)
        if reason is not None:
            log.info("residual dropout: dropout.torch, F.dropout (the C++ extension's kernel cannot run here: %s)", reason)
        _ext_dropout_reason["cpu"] = reason
    return _ext_dropout_reason["cpu"]


def dropout_kernel(x: torch.Tensor) -> str:
    """"dropout.ext" or "dropout.torch" for a training-mode residual dropout of x."""
    if (x.device.type == "cpu" and x.dtype in EXT_DROPOUT_DTYPES and x.dim() >= 1
            and ext_dropout_unavailable_reason() is None):
        return "dropout.ext"
    return "dropout.torch"


# The most rows (tokens × sequences) an input may have for the skinny kernel: its time grows with
# the rows (at most 4 rows of x per pass over the weights) while a GEMM's barely does, so past a
# few dozen rows F.linear wins. The crossover is measured by `python benchmarks/skinny_linear.py`
# (its results: benchmarks/results/README.md).
SKINNY_MAX_ROWS = 32


def skinny_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a "skinny" layer runs the skinny kernel on x: float32 CPU tensors, at most
    SKINNY_MAX_ROWS rows, no gradient wanted (it has no backward) and no CPU autocast (which would
    make F.linear compute in a lower precision)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() <= SKINNY_MAX_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu"))


def linear_kernel(setting: str, x: torch.Tensor, weight: torch.Tensor) -> str:
    """"linear.skinny" or "linear.torch" for a layer whose kernel setting is `setting` ("torch" or
    "skinny", fastgpt.model.linear) on input x."""
    return "linear.skinny" if setting == "skinny" and skinny_applies(x, weight) else "linear.torch"


_announced: set[tuple] = set()
_ran: dict[str, int] = {}


def record(kernel: str, x: torch.Tensor) -> None:
    """Counts one call of `kernel` on x, logging the first per (kernel, device, dtype)."""
    _ran[kernel] = _ran.get(kernel, 0) + 1
    key = (kernel, x.device.type, x.dtype)
    if key not in _announced and not torch.compiler.is_compiling():
        _announced.add(key)
        log.info("model: %s runs for %s %s inputs", kernel, x.device.type, str(x.dtype).removeprefix("torch."))


def kernels_ran(reset: bool = False) -> dict[str, int]:
    """{kernel: calls} since the process started or the last reset=True."""
    counts = dict(_ran)
    if reset:
        _ran.clear()
    return counts
