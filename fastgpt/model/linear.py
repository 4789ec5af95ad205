"""The GPT's linear layers: nn.Linear, with the ext skinny kernel for the few rows of a decode step.

A decode step runs every linear layer on one row per sequence. That is a stream over the weights
(4·N·K bytes for 2·N·K flops), so its speed is the speed of a stream over memory: the skinny kernel
(csrc/cpu/skinny_linear.cpp) reads each weight once, at the bandwidth the machine offers, where a
BLAS tuned for large matrices may not.

    Linear(in_features, out_features, bias)   an nn.Linear (same parameters and state_dict) with
        .kernel = "torch"     F.linear, always (the default; training always runs this)
        .kernel = "skinny"    fastgpt.ext.skinny_linear on inputs it is faster for, F.linear on the
                              rest: see `skinny_applies`. It needs the C++ extension.
    resolve_linear_kernel(name, model)        "auto" -> "skinny" where it ran the model's
                                              layers at one row SKINNY_MIN_SPEEDUP x faster here
                                              (timed, where the extension builds), else "torch";
                                              and how it was decided

Which kernel wins depends on the CPU (its caches and how well its BLAS streams), so "auto"
measures rather than assumes: two CPUs have disagreed, one each way. `python
benchmarks/skinny_linear.py` measures the two per row count; its results are in benchmarks/results/
(docs/benchmarks.md, "How we got here").

`GPT.set_linear_kernel(name)` sets every layer of a model; `fastgpt sample --linear` and `fastgpt
bench generate` say which kernel ran.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from fastgpt.machine.timing import summarize, time_interleaved
from fastgpt.model import kernels
from fastgpt.model.kernels import SKINNY_MAX_ROWS, skinny_applies  # noqa: F401  (the layer's names)

LINEAR_KERNELS = ("torch", "skinny")
# "auto" takes skinny only when it ran one row at least this much faster than F.linear: where the
# two are within the machine's noise, F.linear (the kernel training runs) stays, and a near-tie at
# one row would not buy the rows where skinny loses (up to SKINNY_MAX_ROWS, the uncached steps).
SKINNY_MIN_SPEEDUP = 1.1


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
        kernel = kernels.linear_kernel(self._kernel, x, self.weight)
        kernels.record(kernel, x)
        if kernel == "linear.skinny":
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
                         "fastgpt.model.linear.resolve_linear_kernel(name, model) first")
    if name not in ("auto", *LINEAR_KERNELS):
        raise ValueError(f"linear kernel {name!r} is unknown; choose one of: auto, {', '.join(LINEAR_KERNELS)}")
    if name == "skinny":
        import fastgpt.ext

        fastgpt.ext.load()  # ExtensionUnavailable, saying what to install, if it cannot be built


def resolve_linear_kernel(name: str, model: nn.Module) -> tuple[str, Optional[str]]:
    """(kernel, how): the kernel `name` means for `model`'s linear layers on the model's device;
    for "auto", `how` says how it was decided (timings, or why the skinny kernel cannot run)."""
    device = next(model.parameters()).device
    if name != "auto":
        check_linear_kernel(name)
        if name == "skinny" and device.type != "cpu":
            raise ValueError(f"linear kernel 'skinny' is a CPU kernel; the model is on {device}")
        return name, None
    if device.type != "cpu":
        return "torch", f"the skinny kernel is CPU-only (device {device})"
    from fastgpt.ext import ExtensionUnavailable, unavailable_reason

    reason = unavailable_reason()
    if reason is not None:
        return "torch", f"the C++ extension is unavailable: {reason}"
    if not any(isinstance(m, Linear) for m in model.modules()):
        return "torch", f"the model has no linear layers ({type(model).__name__})"
    try:
        check_linear_kernel("skinny")
    except ExtensionUnavailable as e:  # found only by building: a compiler error, say
        return "torch", f"the C++ extension is unavailable: {e}"
    seconds = time_one_row_pass(model)
    kernel = "skinny" if seconds["torch"] >= SKINNY_MIN_SPEEDUP * seconds["skinny"] else "torch"
    timings = ", ".join(f"{k} {seconds[k] * 1e3:.2f} ms" for k in LINEAR_KERNELS)
    return kernel, f"one pass over the model's linear layers at one row (a decode step), median here: {timings}"


def time_one_row_pass(model: nn.Module, reps: int = 10) -> dict[str, float]:
    """Median seconds, per kernel, of running every Linear of `model` (a CPU model) once on a
    one-row input, the kernels interleaved (fastgpt.machine.timing.time_interleaved)."""

    layers = [m for m in model.modules() if isinstance(m, Linear)]
    if not layers:
        raise ValueError(f"the model has no fastgpt.model.linear.Linear layers to time ({type(model).__name__})")
    g = torch.Generator().manual_seed(0)  # its own: timing must not move the caller's random stream
    inputs = [torch.randn(1, layer.in_features, generator=g) for layer in layers]

    def one_pass(kernel: str) -> None:
        for layer, x in zip(layers, inputs):
            if kernel == "skinny":
                torch.ops.fastgpt.skinny_linear(x, layer.weight, layer.bias)
            else:
                F.linear(x, layer.weight, layer.bias)

    with torch.no_grad():
        times = time_interleaved({k: functools.partial(one_pass, k) for k in LINEAR_KERNELS},
                                 torch.device("cpu"), reps, warmup=2)
    return {k: summarize(ts)["median_s"] for k, ts in times.items()}
