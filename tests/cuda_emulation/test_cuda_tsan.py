"""ThreadSanitizer over the emulated CUDA softmax kernels: every kernel, both row ownerships,
every dtype on small shapes (tsan_main.cpp checks the results against a double reference); the run
must be free of reports. And the proof that it would see one: a copy of the kernel header with the
block reduction's first __syncthreads deleted must make ThreadSanitizer report a race."""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from emu_build import CSRC, TSAN_FLAGS, TSAN_MAIN, build

SOURCE = TSAN_MAIN
MARKER = "__syncthreads();  // [sync: partials written]"


@pytest.fixture(scope="module")
def executables(tmp_path_factory):
    """(the shipped kernels, the copy without one barrier), compiled side by side (~20 s each)."""
    broken = tmp_path_factory.mktemp("broken") / "csrc"
    shutil.copytree(CSRC, broken)
    header = broken / "cuda" / "causal_softmax.cuh"
    text = header.read_text()
    assert text.count(MARKER) == 1, "the marked barrier of the block reduction is gone from causal_softmax.cuh"
    header.write_text(text.replace(MARKER, "// barrier deleted by test_cuda_tsan.py"))
    with ThreadPoolExecutor(2) as pool:
        shipped = pool.submit(build, "tsan-main", [SOURCE], TSAN_FLAGS)
        no_barrier = pool.submit(build, "tsan-main-no-barrier", [SOURCE], [*TSAN_FLAGS, "-DFASTGPT_TSAN_FLOAT_ONLY"],
                                 csrc=broken)
        return shipped.result(), no_barrier.result()


def run(exe, *args):
    # halt_on_error=0: every report is printed; exitcode 66 when there was any.
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=600,
                          env={"TSAN_OPTIONS": "halt_on_error=0 exitcode=66", "FASTGPT_EMU_WATCHDOG_S": "120"})


def test_kernels_are_race_free_under_thread_sanitizer(executables):
    result = run(executables[0])
    assert "WARNING: ThreadSanitizer" not in result.stderr, result.stderr[-6000:]
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 failure(s)" in result.stdout and result.stdout.count("ok ") == 31


def test_thread_sanitizer_catches_a_deleted_barrier(executables):
    result = run(executables[1], "block")
    race = "WARNING: ThreadSanitizer: data race" in result.stderr
    assert race or "FAIL" in result.stdout, "a reduction without its barrier went unnoticed"
    assert race, "the result went wrong, but ThreadSanitizer reported no race:\n" + result.stdout[-2000:]
