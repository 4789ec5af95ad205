"""What the two offline compile checks share: the limits a kernel is held to and the table they print.

    fastgpt.verify.triton_compile   every shipped Triton config (triton.compile + ptxas -v)
    fastgpt.verify.cuda_compile         every CUDA kernel of csrc/cuda/ (nvcc -Xptxas -v)

`fastgpt check` runs both (fastgpt/cli/check.py). This module imports neither: each check imports it.
"""

from __future__ import annotations

import argparse
from typing import Optional

# Shared memory one block may use (opt-in maximum): 163 KB on A100 (sm_80), 227 KB on H100 (sm_90).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = sorted(SHARED_LIMIT)


def limits_note() -> str:
    """The limits, as the checks' summary lines state them."""
    shared = ", ".join(f"sm_{arch} {limit // 1024} KB" for arch, limit in SHARED_LIMIT.items())
    return f"limits: 0 spill bytes; shared memory {shared}"


def verdict(arch: int, spill_bytes: int, shared_bytes: int, error: Optional[str] = None) -> str:
    """'ok', or why not: the compiler's error, 'SPILL' (any spill byte) or 'SMEM' (over the block limit)."""
    if error is not None:
        return error
    if spill_bytes != 0:
        return "SPILL"
    if shared_bytes > SHARED_LIMIT[arch]:
        return "SMEM"
    return "ok"


def add_arch_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS,
                        help="target compute capability ×10 (repeatable; default: 80 and 90)")


def render_table(rows: list[list[str]]) -> str:
    """rows[0] is the header; columns left-aligned, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
