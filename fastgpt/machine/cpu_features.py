"""What this CPU has for bfloat16 matrix products, and the warning when it has nothing.

bfloat16 is fast on a CPU only through its matrix instructions: AMX tiles (Intel Sapphire Rapids
and later) or AVX512-BF16 dot products. Without them (an AVX2-only CPU) PyTorch's bf16 GEMM runs a
reference loop, orders of magnitude behind its fp32 GEMM: the GEMM probe of `fastgpt bench
attention --dtypes bfloat16` shows it (benchmarks/results/cpu-epyc-avx2/, docs/benchmarks.md).
The `ext` attention converts bf16 tiles to fp32 for its products, so it is unaffected; the linear
layers under bf16 autocast are not, and a bf16 training run on such a CPU is many times slower
than fp32. fastgpt warns rather than silently switching dtypes: the user asked for bf16.
"""

from __future__ import annotations

import platform
from typing import Optional

import torch


def bf16_matrix_units() -> Optional[str]:
    """The bfloat16 matrix instructions this CPU has, best first ("AMX", "AVX512-BF16"), or None.
    Read from PyTorch's own CPU detection (torch.cpu's private checks: the cpuinfo flags its
    kernels dispatch on; there is no public API for them)."""
    if torch.cpu._is_amx_tile_supported():
        return "AMX"
    if torch.cpu._is_avx512_bf16_supported():
        return "AVX512-BF16"
    return None


def bf16_cpu_warning() -> Optional[str]:
    """A one-line warning for bf16 work on this CPU, or None where bf16 has matrix units."""
    if bf16_matrix_units() is not None:
        return None
    capability = torch.backends.cpu.get_cpu_capability()
    return (f"this CPU ({capability}) has no bfloat16 matrix instructions (AMX or AVX512-BF16): PyTorch's "
            f"bf16 matrix products run in software, many times slower than fp32; --dtype fp32 is the fast path here")


def cpu_name() -> str:
    """The CPU's model name, as the kernel reports it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
