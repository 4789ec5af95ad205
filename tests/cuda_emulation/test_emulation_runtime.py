"""The SIMT emulation itself (csrc/cuda/emulation/): shuffles, votes, shared memory, atomics,
barriers and wmma give their known answers, ThreadSanitizer finds nothing in them, and a deadlock
is reported (message, non-zero exit) instead of hanging."""

from __future__ import annotations

import re
import subprocess

import pytest

from emu_build import HERE, TSAN_FLAGS, build

SOURCE = HERE / "selftest.cpp"


@pytest.fixture(scope="module")
def selftest():
    return build("selftest", [SOURCE], ["-O1", "-g"])


def test_emulated_intrinsics_give_known_answers(selftest):
    result = subprocess.run([selftest], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok ") == 5


def test_emulation_runtime_is_clean_under_thread_sanitizer():
    exe = build("selftest-tsan", [SOURCE], TSAN_FLAGS)
    result = subprocess.run([exe], capture_output=True, text=True, timeout=300)
    assert "WARNING: ThreadSanitizer" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]


@pytest.mark.parametrize("case, message", [
    # As below, the start order decides which of two right reports comes: thread 5 gone before the
    # others reach the barrier, or gone while they wait at it.
    ("exit_before_barrier", r"deadlock( at __syncthreads|: thread \(5,0,0\) exited while the others wait)"),
    ("divergent_barrier", "divergent __syncthreads"),
    # Two reports are both right, depending on which lanes the shuffled start order runs first:
    # lane 3 already gone when a lane reaches the shuffle (a bad mask), or gone while all others
    # wait in it (a deadlock). Either names the exited thread.
    ("shuffle_exited_lane", r"(have not exited|thread \(3,0,0\) exited while the others wait)"),
    ("bad_mask", "passes mask 0xffff,"),
    ("mixed_warp_ops", "meet at different warp ops"),
])
def test_watchdog_reports_instead_of_hanging(selftest, case, message):
    result = subprocess.run([selftest, case], capture_output=True, text=True, timeout=60,
                            env={"FASTGPT_EMU_WATCHDOG_S": "20"})
    assert result.returncode == 3, result.stderr
    assert re.search(message, result.stderr) and "block (0,0,0)" in result.stderr, result.stderr


def test_watchdog_ends_a_spinning_thread_with_exit_code_124(selftest):
    """A thread that never arrives (spinning) is no deadlock the census can see: the timeout ends it."""
    result = subprocess.run([selftest, "spin_forever"], capture_output=True, text=True, timeout=60,
                            env={"FASTGPT_EMU_WATCHDOG_S": "2"})
    assert result.returncode == 124, result.stderr
    assert "no progress for 2 s" in result.stderr and "1 thread(s) running: (0,0,0)" in result.stderr
