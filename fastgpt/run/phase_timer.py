"""Wall time per named phase of a training run (data, forward, backward, ...), for profiling.

    timer = PhaseTimer(device, enabled=True)
    with timer("forward"):
        loss = model(x, y)
    timer.seconds["forward"], timer.calls["forward"]

Off by default: then `timer(name)` hands back one shared do-nothing context, so the trainer can
name its phases on every step for free. On, each phase is also a torch.profiler range named
"fastgpt.<phase>" (visible in any trace taken around it), and on CUDA the device is synchronised
at both ends, so that a phase's time is its work and not the queueing of it.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Iterator

import torch
from torch.profiler import record_function

_OFF = contextlib.nullcontext()


class PhaseTimer:
    def __init__(self, device: torch.device | str = "cpu", enabled: bool = False):
        self.device = torch.device(device)
        self.enabled = enabled
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __call__(self, name: str):
        return self._timed(name) if self.enabled else _OFF

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        with record_function(f"fastgpt.{name}"):
            try:
                yield
            finally:
                self._sync()
                self.seconds[name] += time.perf_counter() - start
                self.calls[name] += 1

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
