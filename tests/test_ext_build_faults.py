"""The extension's just-in-time build under faults made for real: a build killed with SIGKILL (as
`fastgpt gpu-report` kills a stage past its budget), a build still running in another process, a
cache directory that cannot be written, a compiler that fails.

Most tests never compile: a stand-in replaces the compile step of torch.utils.cpp_extension (the
build directory, torch's own `lock` baton and fastgpt's build lock are real), or a compiler wrapper
fails at once. The one real compile is marked slow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastgpt.attention import causal_attention
from fastgpt.ext import build
from fastgpt.verify.parity import make_qkv

REPO = build.REPO

# A process that loads the extension with the compile step replaced: "forever" compiles until it is
# killed, "at-once" finishes at once; the baton, the locks and the build directory are torch's and
# fastgpt's own. It prints "loaded: jit", or "refused: <reason>" and exits 3.
STAND_IN = """
import sys, time
from torch.utils import cpp_extension

def compile_step(name, build_directory, **kw):
    if sys.argv[1] == "forever":
        print("compiling", flush=True)
        time.sleep(3600)

cpp_extension._write_ninja_file_and_build_library = compile_step
cpp_extension._import_module_from_library = lambda *args, **kw: None
from fastgpt.ext import build
try:
    print("loaded:", build.load(), flush=True)
except build.ExtensionUnavailable as e:
    print("refused:", e, flush=True)
    sys.exit(3)
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name != "FASTGPT_EXT_BUILD_TIMEOUT"}
    return {**env, "FASTGPT_CACHE_DIR": str(tmp_path / "cache"), "FASTGPT_EXT_BUILD": "jit", **extra}


def _start_stand_in(tmp_path: Path, mode: str, **extra: str) -> subprocess.Popen:
    # A new session, as gpu_report.run_stage_in_child starts a stage: its kill takes the whole group.
    return subprocess.Popen([sys.executable, "-c", STAND_IN, mode], cwd=REPO, env=_env(tmp_path, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill_session(proc: subprocess.Popen) -> None:
    """What gpu_report._kill_session does to a stage past its budget."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_for_torch_baton(tmp_path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> Path:
    """torch's `lock` file in the build directory, once `proc` has taken it (it is compiling)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list((tmp_path / "cache").glob("ext-*/lock"))
        if found:
            return found[0]
        if proc.poll() is not None:
            pytest.fail(f"the builder exited ({proc.returncode}) before taking the lock: {proc.stdout.read()}")
        time.sleep(0.05)
    pytest.fail(f"no build lock under {tmp_path / 'cache'} after {timeout} s")


def _load_in_child(tmp_path: Path, timeout: float = 60.0, **extra: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", STAND_IN, "at-once"], cwd=REPO, env=_env(tmp_path, **extra),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"load() still waiting after {timeout} s (a stale build lock waited on forever?): {e.stderr}")


def test_a_build_killed_at_its_budget_leaves_no_lock_that_blocks_the_next_process(tmp_path):
    # gpu-report's build stage cut at its budget: the stage's session gets SIGKILL mid-compile
    builder = _start_stand_in(tmp_path, "forever")
    try:
        baton = _wait_for_torch_baton(tmp_path, builder)
    finally:
        _kill_session(builder)
    assert baton.exists()  # torch's baton outlives the process that took it: the fault is real
    done = _load_in_child(tmp_path)
    assert done.returncode == 0 and "loaded: jit" in done.stdout, done.stdout + done.stderr
    assert not baton.exists()


def test_a_live_build_is_waited_for_by_pid_within_a_bounded_time_then_taken_over(tmp_path):
    builder = _start_stand_in(tmp_path, "forever")
    try:
        _wait_for_torch_baton(tmp_path, builder)
        # a second process gives up after FASTGPT_EXT_BUILD_TIMEOUT seconds, with one line that says why
        start = time.monotonic()
        done = _load_in_child(tmp_path, FASTGPT_EXT_BUILD_TIMEOUT="1")
        assert time.monotonic() - start < 50
        assert done.returncode == 3, done.stdout + done.stderr
        assert f"waiting for pid {builder.pid}, which is compiling the C++ extension into" in done.stderr
        (refusal,) = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
        assert f"pid {builder.pid}" in refusal and "FASTGPT_EXT_BUILD_TIMEOUT" in refusal
        # a waiter whose builder dies (however it dies) takes the build over at once
        waiter = _start_stand_in(tmp_path, "at-once")
        try:
            lines = iter(waiter.stdout.readline, "")
            assert any("waiting for pid" in line for line in lines)  # it waits ...
            assert waiter.poll() is None  # ... and goes on waiting
            _kill_session(builder)
            out, _ = waiter.communicate(timeout=60)
        finally:
            _kill_session(waiter)
        assert waiter.returncode == 0 and "loaded: jit" in out, out
    finally:
        _kill_session(builder)


@pytest.mark.slow
def test_a_real_compile_killed_mid_build_is_redone_by_the_next_load(tmp_path):
    """The real build killed (SIGKILL to its session, objects half written), then a real load: it
    compiles what is missing and the ops run."""
    env = _env(tmp_path)
    code = "import fastgpt.ext; fastgpt.ext.load()"
    builder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_torch_baton(tmp_path, builder)
        time.sleep(5)  # the compilers are running
    finally:
        _kill_session(builder)
    code = ("import torch, fastgpt.ext; from fastgpt.ext import ops; x = torch.randn(1, 1, 8, 16); "
            "ops.causal_matmul_nt(x, x); print('ran')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0 and "ran" in done.stdout, done.stderr[-3000:]
    # a library cut short behind ninja's back (its log says up to date) is relinked, not loaded
    (library,) = (tmp_path / "cache").glob(f"ext-*/{build.JIT_NAME}.so")
    os.truncate(library, library.stat().st_size // 2)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0 and "ran" in done.stdout, done.stderr[-3000:]


# -- an unusable cache, a failing compiler: ext refuses by name, auto moves on ------------------------

@pytest.fixture()
def not_loaded(monkeypatch):
    """This process as if the extension had never been loaded (nor failed to build), JIT forced."""
    monkeypatch.setattr(build, "is_loaded", lambda: False)
    monkeypatch.setattr(build, "_failure", None, raising=False)
    monkeypatch.setenv("FASTGPT_EXT_BUILD", "jit")


@pytest.fixture()
def read_only_dir(tmp_path):
    """A directory on a read-only bind mount (root ignores permission bits, not a read-only mount)."""
    path = tmp_path / "read-only"
    path.mkdir()
    (path / "home").mkdir()
    mounted = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot bind-mount here (needs root and mount rights)")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def _one_line(text: str) -> None:
    assert "\n" not in text.strip() and "Traceback" not in text, text


def test_a_cache_dir_naming_a_file_is_refused_cheaply_by_name(not_loaded, monkeypatch, tmp_path):
    afile = tmp_path / "not-a-dir"
    afile.write_text("")
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(afile))
    reason = build.unavailable_reason()  # known without compiling anything
    assert reason is not None and str(afile) in reason and "FASTGPT_CACHE_DIR" in reason and "not a directory" in reason
    _one_line(reason)
    with pytest.raises(build.ExtensionUnavailable, match="not a directory"):
        build.load()


def test_a_read_only_home_is_refused_cheaply_by_name(not_loaded, monkeypatch, read_only_dir):
    monkeypatch.delenv("FASTGPT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(read_only_dir / "home"))
    reason = build.unavailable_reason()
    assert reason is not None and str(read_only_dir / "home") in reason and "read-only" in reason
    assert "FASTGPT_CACHE_DIR" in reason
    _one_line(reason)


def test_an_unusable_cache_refuses_ext_by_name_and_auto_runs_sdpa(not_loaded, monkeypatch, tmp_path, caplog):
    afile = tmp_path / "not-a-dir"
    afile.write_text("")
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(afile))
    q, k, v = make_qkv((1, 2, 8, 16), torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="backend='ext' is not available on device cpu: .*not a directory") as e:
        causal_attention(q, k, v, backend="ext")
    _one_line(str(e.value))
    with caplog.at_level(logging.INFO, logger="fastgpt"):
        out = causal_attention(q, k, v, backend="auto")
    torch.testing.assert_close(out, causal_attention(q, k, v, backend="sdpa"))
    assert "'ext'" in caplog.text and str(afile) in caplog.text


def _failing_compiler(tmp_path: Path) -> Path:
    """A C++ compiler that answers version queries but fails every compile with a real error."""
    cxx = tmp_path / "broken-c++"
    cxx.write_text('#!/bin/sh\ncase " $* " in *" -c "*) exec c++ -include /nonexistent/broken.h "$@";; esac\n'
                   'exec c++ "$@"\n')
    cxx.chmod(0o755)
    return cxx


def test_a_compile_error_raises_for_ext_and_auto_moves_on_with_the_reason(not_loaded, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(_failing_compiler(tmp_path)))
    assert build.unavailable_reason() is None  # only building finds this out
    q, k, v = make_qkv((1, 2, 8, 16), torch.float32, "cpu")
    with caplog.at_level(logging.INFO, logger="fastgpt"):
        out = causal_attention(q, k, v, backend="auto")
    torch.testing.assert_close(out, causal_attention(q, k, v, backend="sdpa"))
    skipped = [r.getMessage() for r in caplog.records if "'ext'" in r.getMessage()]
    assert skipped and "broken.h" in skipped[0], caplog.text
    _one_line(skipped[0])
    # named, it raises, with the same one line (the failed build is not rerun in this process)
    with pytest.raises(RuntimeError, match="backend='ext' is not available on device cpu: .*compil") as e:
        causal_attention(q, k, v, backend="ext")
    _one_line(str(e.value))


def test_a_truncated_library_is_removed_for_ninja_to_relink_never_loaded(not_loaded, monkeypatch, tmp_path):
    # A link cut short leaves a library that ninja may count as up to date; loading it is a SIGBUS
    from torch.utils import cpp_extension

    monkeypatch.setenv("FASTGPT_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw))
    build._jit_build()  # makes the build directory
    library = Path(calls[0]["build_directory"]) / f"{build.JIT_NAME}.so"
    whole = Path(torch._C.__file__).read_bytes()  # a small shared library
    library.write_bytes(whole[: len(whole) // 2])
    present = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: present.append(library.exists()))
    build._jit_build()
    library.write_bytes(whole)
    build._jit_build()
    assert present == [False, True]  # the truncated one removed before the build, a whole one kept


# -- the same through `fastgpt train` ------------------------------------------------------------------

TRAIN = ["-m", "fastgpt.cli", "train", "--preset", "cpu", "--max-iters", "2", "--eval-iters", "1",
         "--sample-tokens", "0", "--batch-size", "2", "--block-size", "32", "--n-layer", "1", "--no-progress"]


def _train(tmp_path: Path, name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "FASTGPT_EXT_BUILD": "jit", **env}
    return subprocess.run([sys.executable, *TRAIN, "--out-dir", str(tmp_path / name), *args], cwd=REPO,
                          env=environ, capture_output=True, text=True, timeout=600)


def test_train_with_an_unusable_cache(tmp_path):
    afile = tmp_path / "not-a-dir"
    afile.write_text("")
    named = _train(tmp_path, "named", "--backend", "ext", FASTGPT_CACHE_DIR=str(afile))
    assert named.returncode == 2, named.stderr
    _one_line(named.stderr)
    assert str(afile) in named.stderr and "FASTGPT_CACHE_DIR" in named.stderr
    auto = _train(tmp_path, "auto", FASTGPT_CACHE_DIR=str(afile))
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "Traceback" not in auto.stderr and "'auto' -> kernel path sdpa" in auto.stdout
    (said,) = [line for line in auto.stderr.splitlines() if "'ext'" in line]
    assert str(afile) in said and "FASTGPT_CACHE_DIR" in said


def test_train_with_a_failing_compiler(tmp_path):
    env = {"FASTGPT_CACHE_DIR": str(tmp_path / "cache"), "CXX": str(_failing_compiler(tmp_path))}
    auto = _train(tmp_path, "auto", **env)
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert "Traceback" not in auto.stderr and "'auto' -> kernel path sdpa" in auto.stdout
    (said,) = [line for line in auto.stderr.splitlines() if "'ext'" in line]
    assert "broken.h" in said and "build-error.log" in said
    named = _train(tmp_path, "named", "--backend", "ext", **env)
    assert named.returncode == 2, named.stderr[-3000:]
    assert "Traceback" not in named.stderr
    (error,) = [line for line in named.stderr.splitlines() if line.startswith("fastgpt train: error:")]
    assert "broken.h" in error, named.stderr


def test_train_with_a_read_only_home_runs_sdpa(tmp_path, read_only_dir):
    env = {name: value for name, value in os.environ.items() if name not in ("FASTGPT_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update(HOME=str(read_only_dir / "home"), FASTGPT_EXT_BUILD="jit")
    auto = subprocess.run([sys.executable, *TRAIN, "--out-dir", str(tmp_path / "auto")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert auto.returncode == 0 and "'auto' -> kernel path sdpa" in auto.stdout, auto.stderr[-3000:]
    (said,) = [line for line in auto.stderr.splitlines() if "'ext'" in line]
    assert "read-only" in said and "FASTGPT_CACHE_DIR" in said


def test_train_with_a_failing_compiler_and_sdpa_keeps_its_residual_dropout_on_torch(tmp_path):
    # The residual dropout and the decode's linear kernel take ext's kernels where the library
    # loads: a compile that fails moves them to F.dropout / F.linear, said once, and the run goes on.
    env = {"FASTGPT_CACHE_DIR": str(tmp_path / "cache"), "CXX": str(_failing_compiler(tmp_path))}
    run = _train(tmp_path, "sdpa", "--backend", "sdpa", "--dropout-p", "0.1", **env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    (said,) = [line for line in run.stderr.splitlines() if "residual dropout" in line]
    assert "F.dropout" in said and "broken.h" in said
