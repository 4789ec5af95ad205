"""fastgpt/run/host_memory.py: a CPU training run's process keeps freed memory (glibc's mallopt), and
nothing else does. The effect is checked in a fresh process, by its page faults."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fastgpt.run import host_memory
from fastgpt.cli import main

# conftest.py turns the tuning off for the test process; the fresh processes here run with it on
ON = {k: v for k, v in os.environ.items() if k != "FASTGPT_KEEP_FREED_MEMORY"}

# malloc, touch and free 64 MiB (above glibc's largest mmap threshold) twice, and count the minor
# page faults of the second round. Plain malloc: torch's aligned allocations may land beside the
# freed block instead of in it, which would make the count depend on where the heap stood.
FAULTS = """
import ctypes, resource, sys
if sys.argv[1] == "keep":
    from fastgpt.run.host_memory import keep_freed_memory
    assert keep_freed_memory() is not None
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():
    p = libc.malloc(64 * 2**20)
    ctypes.memset(p, 1, 64 * 2**20)
    libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


NEEDS_GLIBC = pytest.mark.skipif(host_memory._glibc() is None, reason="keep_freed_memory tunes glibc's malloc only")


@NEEDS_GLIBC
def test_the_second_large_allocation_faults_no_pages_in():
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                       check=True, env=ON).stdout) for mode in ("keep", "default")}
    assert faults["default"] > 10_000  # 16,384 pages of 4 KiB faulted in again
    assert faults["keep"] < 1_000


class FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


def test_the_calls_and_the_switch(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    monkeypatch.delenv("FASTGPT_KEEP_FREED_MEMORY", raising=False)
    assert "FASTGPT_KEEP_FREED_MEMORY=0" in host_memory.keep_freed_memory()
    assert libc.calls == [(host_memory.M_MMAP_MAX, 0), (host_memory.M_TRIM_THRESHOLD, host_memory.NEVER_TRIM)]
    monkeypatch.setenv("FASTGPT_KEEP_FREED_MEMORY", "0")
    libc.calls.clear()
    assert host_memory.keep_freed_memory() is None and libc.calls == []
    monkeypatch.delenv("FASTGPT_KEEP_FREED_MEMORY")
    monkeypatch.setattr(host_memory, "_glibc", lambda: FakeLibc(result=0))  # mallopt refused
    assert host_memory.keep_freed_memory() is None
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)  # not glibc
    assert host_memory.keep_freed_memory() is None


@NEEDS_GLIBC
def test_importing_fastgpt_changes_nothing():
    """Only the training commands call it: importing the package, the trainer and the model leaves
    malloc as it was (the second allocation faults its pages in again)."""
    probe = FAULTS.replace('if sys.argv[1] == "keep":', 'import fastgpt, fastgpt.run.trainer, fastgpt.model.gpt\nif False:')
    out = subprocess.run([sys.executable, "-c", probe, "default"], capture_output=True, text=True, check=True,
                         env=ON).stdout
    assert int(out) > 10_000


def test_fastgpt_train_on_cpu_asks_for_it(small_corpus, tmp_path, monkeypatch, capsys):
    libc = FakeLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    monkeypatch.delenv("FASTGPT_KEEP_FREED_MEMORY", raising=False)
    assert main(["train", "--preset", "bigram", "--data", str(small_corpus), "--out-dir", str(tmp_path / "run"),
                 "--max-iters", "1", "--eval-iters", "1", "--sample-tokens", "0", "--no-progress"]) == 0
    assert "glibc malloc keeps freed memory" in capsys.readouterr().out
    assert libc.calls == [(host_memory.M_MMAP_MAX, 0), (host_memory.M_TRIM_THRESHOLD, host_memory.NEVER_TRIM)]
