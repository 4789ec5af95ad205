"""glibc's malloc during a CPU training run: keep freed memory in the process.

PyTorch allocates CPU tensors with malloc. glibc serves every block above its mmap threshold (at
most 32 MiB) with a fresh mmap and unmaps it on free, so a step whose activations are larger (the
lecture's model in bf16: (64, 256, 1536) = 48 MiB each) faults in and zeroes all their pages again
every step: the kernel's clear_page then shows in a profile of the step, and step times spread.
With mmap off and the heap never trimmed, the pages stay mapped from one step to the next (the
step with and without: docs/benchmarks.md, "How we got here"). The cost: the process holds on to
its peak memory until it exits. Right for a training run, not for a library: `fastgpt train` and `fastgpt
bench train` call keep_freed_memory() on CPU runs; importing fastgpt changes nothing.
FASTGPT_KEEP_FREED_MEMORY=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

M_TRIM_THRESHOLD = -1  # mallopt's parameters (malloc.h)
M_MMAP_MAX = -4
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def _glibc() -> Optional[ctypes.CDLL]:
    """The process's C library where it is glibc (the only one whose mallopt this knows), else None."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> Optional[str]:
    """Tells glibc's malloc to serve large blocks from its heap and never give freed memory back;
    returns a line saying so, or None where nothing changed (FASTGPT_KEEP_FREED_MEMORY=0, not glibc)."""
    if os.environ.get("FASTGPT_KEEP_FREED_MEMORY", "1") == "0":
        return None
    libc = _glibc()
    if libc is None:
        return None
    if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) != 1:
        return None
    return ("fastgpt: glibc malloc keeps freed memory for reuse (no per-step page faults on large activations; "
            "FASTGPT_KEEP_FREED_MEMORY=0 turns it off)")
