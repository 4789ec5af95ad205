"""The machine's limit in each dtype: the rate of one square `torch.mm`, measured in the same run as
the figures compared to it.

    probes = probe_gemms(["float32", "bfloat16"], device)   # {"float32": {"gflops": ..., ...}, ...}
    fraction = achieved_flops_per_s / (probes["float32"]["gflops"] * 1e9)

A CPU's data-sheet peak says little about what PyTorch reaches on it (the instruction set torch
dispatches to, the clock under load, the other processes of a shared machine); a GEMM timed a few
seconds before the cells is the rate that the same BLAS reaches on the same cores in the same
minute. Every benchmark quotes its rates against this one probe: the attention sweep
(`fastgpt bench attention`), the training steps (`fastgpt bench train`) and benchmarks/ext_cpu.py.
On CUDA the probe is not taken: an n = 1024 product is far from a GPU's peak, whose data-sheet
figures live in fastgpt/run/flops.py.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from fastgpt.machine.cpu_features import bf16_matrix_units
from fastgpt.machine.timing import summarize, time_interleaved

GEMM_N = 1024  # (n, n) @ (n, n): large enough to run at the BLAS's full rate on a few CPU cores, 2·n³ = 2.1 GFLOP
# After two warm-ups; the median is the figure. Enough reps that a burst of another process's work
# on a shared machine cannot cover them all: a probe taken during one reads low, and every "% of
# GEMM" of that run then reads high, past 100%.
GEMM_REPS = 15
GEMM_WARMUPS = 2


def gemm_flops(n: int) -> float:
    """FLOPs of an (n, n) @ (n, n) product: n² dot products of n multiply-adds, 2 FLOPs each."""
    return 2.0 * n ** 3


def probe_gemm(dtype_name: str, device: torch.device | str = "cpu", n: int = GEMM_N,
               reps: int = GEMM_REPS) -> dict[str, Any]:
    """torch.mm of two (n, n) random matrices of `dtype_name` ("float32", "bfloat16", ...) on
    `device`, `reps` timed runs after GEMM_WARMUPS: {"dtype", "n", "reps", "median_s", "p20_s",
    "p80_s", "gflops"} with gflops from the median; a bfloat16 probe on CPU adds "matrix_units",
    the CPU's bf16 instructions (fastgpt/machine/cpu_features.py; None: its torch.mm runs in software)."""
    if n < 1 or reps < 1:
        raise ValueError(f"the GEMM probe needs n >= 1 and reps >= 1; got n={n}, reps={reps}")
    device = torch.device(device)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    stats = summarize(time_interleaved({"mm": lambda: torch.mm(a, b)}, device, reps, warmup=GEMM_WARMUPS)["mm"])
    probe = {"dtype": dtype_name, "n": n, "reps": reps, **stats, "gflops": gemm_flops(n) / stats["median_s"] / 1e9}
    if dtype == torch.bfloat16 and device.type == "cpu":
        probe["matrix_units"] = bf16_matrix_units()
    return probe


def probe_gemms(dtype_names: Iterable[str], device: torch.device | str = "cpu", n: int = GEMM_N,
                reps: int = GEMM_REPS) -> dict[str, dict[str, Any]]:
    """probe_gemm for each dtype (once each), keyed by its name."""
    return {name: probe_gemm(name, device, n, reps) for name in dict.fromkeys(dtype_names)}


def fraction_of_gemm(flops_per_s: float, probe: dict[str, Any]) -> float:
    """An achieved rate as a fraction of the probe's: 0.5 is half of what torch.mm reached."""
    return flops_per_s / (probe["gflops"] * 1e9)


def probe_line(probes: dict[str, dict[str, Any]]) -> str:
    """One line for the tables' headers: each dtype's rate and how it was measured."""
    if not probes:
        return ""
    first = next(iter(probes.values()))
    rates = ", ".join(f"{name} {p['gflops']:.0f} GFLOP/s" for name, p in probes.items())
    line = f"GEMM probe (torch.mm, n = {first['n']}, median of {first['reps']}, this run): {rates}"
    if any("matrix_units" in p and p["matrix_units"] is None for p in probes.values()):
        # Then a bf16 cell's "% of GEMM" is against a software loop and can pass 100% many times.
        line += (" (this CPU has no bfloat16 matrix instructions, AMX or AVX512-BF16: its bf16 torch.mm runs in "
                 "software, and the bf16 cells' % of GEMM is against that)")
    return line
