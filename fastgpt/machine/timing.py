"""Timing several ways of doing one thing, fairly: the benchmarks (fastgpt.benchmarks) and the
library's own measured choices (`--linear auto`, fastgpt/model/linear.py) use these.

The candidates run interleaved (A B A B ...) after a warm-up, so a drift of the machine's speed
hits all of them alike; summaries are the median and the p20/p80 spread. On CUDA each run is timed
with events on the stream; on CPU with perf_counter around a finished call.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(seconds: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(seconds), "p20_s": percentile(seconds, 20), "p80_s": percentile(seconds, 80)}


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, reps: int,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each function, run in turn (A B A B ...) `reps` times after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_time_once(fn, device))
    return times
