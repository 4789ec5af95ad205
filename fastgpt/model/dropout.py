"""The residual branches' dropout: nn.Dropout's semantics, with the kernel chosen per call by
fastgpt/model/kernels.py: fastgpt.ext's vectorised Philox dropout for float32 and bfloat16 CPU
tensors (PyTorch's CPU dropout draws its mask one element at a time), F.dropout for everything else.

Same semantics (each element kept with probability 1 - dropout_p and scaled by 1 / (1 - dropout_p)), a different
random stream on the ext kernel: the mask comes from a seed drawn from torch's default generator,
so torch.manual_seed still makes a run repeatable. No parameters or buffers: checkpoints are those
of nn.Dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastgpt.model import kernels


class ResidualDropout(nn.Module):
    """nn.Dropout(p=dropout_p) for the residual branches; `kernel(x)` says which kernel a call on x runs."""

    def __init__(self, dropout_p: float):
        super().__init__()
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p!r}")
        self.dropout_p = dropout_p

    def kernel(self, x: torch.Tensor) -> str:
        """"dropout.ext" (fastgpt.ext.dropout) or "dropout.torch" (F.dropout) for a training-mode call on x."""
        return kernels.dropout_kernel(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout_p == 0.0:
            return x
        kernel = self.kernel(x)
        kernels.record(kernel, x)
        if kernel == "dropout.ext":
            from fastgpt.ext import dropout

            return dropout(x, self.dropout_p)
        return F.dropout(x, self.dropout_p, training=True)

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}"
