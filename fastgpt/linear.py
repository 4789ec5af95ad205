"""The GPT's linear layers: nn.Linear, with the ext skinny kernel for the few rows of a decode step.

A decode step runs every linear layer on one row per sequence. That is a stream over the weights
(4·N·K bytes for 2·N·K flops), so its speed is memory bandwidth; on the 2-core dev machine torch's
F.linear (MKL) reads them at 5-8 GB/s there, the skinny kernel (csrc/cpu/skinny_linear.cpp) at
15-20, and the decode step is mostly these layers (`python benchmarks/skinny_linear.py`).

    Linear(in_features, out_features, bias)   an nn.Linear (same parameters and state_dict) with
        .kernel = "torch"     F.linear, always (the default; training always runs this)
        .kernel = "skinny"    fastgpt.ext.skinny_linear on inputs it is faster for, F.linear on the
                              rest: see `skinny_applies`. It needs the C++ extension.
    resolve_linear_kernel(name, device)       "auto" -> "skinny" on CPU where the extension
                                              builds, else "torch"; with the reason

`GPT.set_linear_kernel(name)` sets every layer of a model; `fastgpt sample --linear` and `fastgpt
bench generate` say which kernel ran.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

LINEAR_KERNELS = ("torch", "skinny")
# The most rows (tokens × sequences) an input may have for the skinny kernel. From
# `python benchmarks/skinny_linear.py` (shakespeare-char's layers, fp32, 2 threads): F.linear over
# skinny was 2.4x at 1 row, 2.0x at 8, 1.6x at 16, 1.05x at 32 and 0.94x at 48.
SKINNY_MAX_ROWS = 32


def skinny_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a "skinny" layer runs the skinny kernel on x: float32 CPU tensors, at most
    SKINNY_MAX_ROWS rows, no gradient wanted (it has no backward) and no CPU autocast (which would
    make F.linear compute in a lower precision)."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() <= SKINNY_MAX_ROWS * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu"))


class Linear(nn.Linear):
    """nn.Linear whose forward can run the skinny kernel (see the module docstring)."""

    _kernel = "torch"

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, name: str) -> None:
        check_linear_kernel(name, allow_auto=False)
        self._kernel = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel == "skinny" and skinny_applies(x, self.weight):
            return torch.ops.fastgpt.skinny_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel!r}"


def linear_kernel_text(kernel: str) -> str:
    """What a kernel setting runs, in words, for the messages of `fastgpt sample` and the benchmarks."""
    if kernel == "skinny":
        return f"skinny (ext kernel on inputs of <= {SKINNY_MAX_ROWS} rows, F.linear above)"
    return "torch (F.linear)"


def check_linear_kernel(name: str, allow_auto: bool = True) -> None:
    """Raises for a name that is not a kernel (nor "auto", where allowed); loads the extension for
    "skinny", whose op the layers then call."""
    if name == "auto" and not allow_auto:
        raise ValueError("a layer's kernel is 'torch' or 'skinny'; resolve 'auto' with "
                         "fastgpt.linear.resolve_linear_kernel(name, device) first")
    if name not in ("auto", *LINEAR_KERNELS):
        raise ValueError(f"linear kernel {name!r} is unknown; choose one of: auto, {', '.join(LINEAR_KERNELS)}")
    if name == "skinny":
        import fastgpt.ext

        fastgpt.ext.load()  # ExtensionUnavailable, saying what to install, if it cannot be built


def resolve_linear_kernel(name: str, device: torch.device | str) -> tuple[str, Optional[str]]:
    """(kernel, why): the kernel `name` means on `device`; why is set when "auto" did not pick skinny."""
    device = torch.device(device)
    if name != "auto":
        check_linear_kernel(name)
        if name == "skinny" and device.type != "cpu":
            raise ValueError(f"linear kernel 'skinny' is a CPU kernel; the model is on {device}")
        return name, None
    if device.type != "cpu":
        return "torch", f"the skinny kernel is CPU-only (device {device})"
    from fastgpt.ext import unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return "torch", f"the C++ extension is unavailable: {reason}"
    check_linear_kernel("skinny")
    return "skinny", None
