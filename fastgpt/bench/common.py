"""What every benchmark shares: the FLOP formula, memory, and the record of the machine. (Timing,
interleaved providers with median and p20/p80, lives in the package, fastgpt/machine/timing.py, since the
library times candidates too.)

Memory, and how it is measured (the `memory_method` written beside every figure):
  CUDA: torch.cuda.max_memory_allocated() after a reset, minus what was allocated before the call
        (the inputs): the call's own peak.
  CPU:  the process's resident-set high-water mark (VmHWM, reset by writing 5 to
        /proc/self/clear_refs) minus the resident set before the call, after glibc's
        malloc_trim has returned freed heap pages. Real pages touched by the call; Linux only.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Callable, Optional

import torch

from fastgpt.machine.cpu_features import cpu_name


def attention_flops(B: int, H: int, T: int, D: int, mode: str) -> float:
    """FLOPs of causal attention, the convention of FlashAttention's benchmarks: 4·B·H·T²·D for
    the forward (two T×T×D matmuls, 2 FLOPs per multiply-add), halved for the causal mask;
    the backward counts 2.5× the forward (five matmuls against two)."""
    forward = 4 * B * H * T * T * D / 2
    factors = {"forward": 1.0, "backward": 2.5, "forward+backward": 3.5}
    if mode not in factors:
        raise ValueError(f"mode must be one of {', '.join(factors)}; got {mode!r}")
    return forward * factors[mode]


def check_backend_names(names: Optional[list[str]], allow_auto: bool, flag: str = "--backends") -> None:
    """Refuses a name that is neither a backend nor a kernel path, and 'auto' where a benchmark
    times named ones."""
    from fastgpt.attention import backend_names, kernel_path_names

    known = list(dict.fromkeys([*backend_names(), *kernel_path_names()]))
    choices = ", ".join(["auto", *known] if allow_auto else known)
    for name in names or []:
        if name in known or (allow_auto and name == "auto"):
            continue
        what = "chooses among the backends per call" if name == "auto" else "is neither a backend nor a kernel path"
        raise ValueError(f"{flag} {name}: {name!r} {what}; this benchmark times: {choices}")


def _rss_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hands freed heap pages back to the OS (glibc malloc_trim), so memory that earlier calls
    freed but the allocator kept resident cannot hide the next call's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "cuda max_memory_allocated minus inputs"
    return "process VmHWM (reset via /proc/self/clear_refs, after malloc_trim) minus RSS before"


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """The extra memory `fn` needs at its peak (see the module docstring for the method). Every
    backend's cached buffers are released first: a pool that kept last call's matrices resident
    would otherwise hide them from the measure."""
    from fastgpt.attention import backend_names, get_backend

    for name in backend_names():
        release = get_backend(name).empty_cache
        if release is not None:
            release()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_kib("VmRSS")
    fn()
    peak = _rss_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> str:
    """The 1/5/15-minute load: on a shared machine a busy neighbour slows every provider alike."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def environment(device: torch.device) -> dict[str, str]:
    """The machine and versions, written beside every figure."""
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_name()}",
        "cpu_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": _git_commit(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname_cores": str(os.cpu_count()),
    }
    # numpy beside triton: Triton's interpreter (the CPU runs) breaks on some numpy releases
    for package in ("triton", "numpy"):
        try:
            env[package] = __import__(package).__version__
        except ImportError:
            env[package] = "absent"
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda or "unknown"
    return env


def print_cpu_environment() -> dict[str, str]:
    """environment() of the CPU with torch's instruction set and the load at the start, printed a
    line per key (the header of the CPU benchmark scripts); returned for their JSON."""
    env = {**environment(torch.device("cpu")), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "load_average_start": load_average()}
    for key, value in env.items():
        print(f"{key}: {value}")
    return env
