"""The residual branches' dropout: fastgpt.ext's vectorised Philox dropout for float32 and bfloat16
CPU tensors, torch.nn.functional.dropout for everything else.

Why: PyTorch's CPU dropout draws its mask one element at a time (bernoulli_), 13-15× slower than
fastgpt.ext.dropout on a (64, 256, 384) activation (benchmarks/dropout_cpu.py; docs/benchmarks.md).
A shakespeare-char training step has 12 of them in the forward: a fifth of its bf16 step time. Same semantics (each element kept with probability 1 - p and scaled by 1 / (1 - p)), a
different random stream: the mask comes from a seed drawn from torch's default generator, so
torch.manual_seed still makes a run repeatable. No parameters or buffers: checkpoints are those of
nn.Dropout.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

EXT_DTYPES = (torch.float32, torch.bfloat16)
log = logging.getLogger("fastgpt.dropout")


@functools.lru_cache(maxsize=None)
def ext_dropout_available() -> bool:
    """Whether fastgpt.ext's dropout runs here: the library loads (built on first use in an
    environment). A build that fails (a compiler error, an unusable cache) is logged once and the
    residual dropout stays F.dropout: the attention backend the user chose is unaffected."""
    from fastgpt.ext import ExtensionUnavailable, load, unavailable_reason

    reason = unavailable_reason()
    if reason is None:
        try:
            load()
        except ExtensionUnavailable as e:
            reason = str(e)
    if reason is not None:
        log.info("residual dropout: F.dropout (the C++ extension's kernel cannot run here: %s)", reason)
    return reason is None


class ResidualDropout(nn.Module):
    """nn.Dropout(p) for the residual branches; `impl(x)` says which kernel a call on x runs."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1); got {p!r}")
        self.p = p

    def impl(self, x: torch.Tensor) -> str:
        """"ext" (fastgpt.ext.dropout) or "torch" (F.dropout) for a training-mode call on x."""
        if x.device.type == "cpu" and x.dtype in EXT_DTYPES and x.dim() >= 1 and ext_dropout_available():
            return "ext"
        return "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.impl(x) == "ext":
            from fastgpt.ext import dropout

            return dropout(x, self.p)
        return F.dropout(x, self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"
