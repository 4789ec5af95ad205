"""Building and loading the C++ extension in csrc/: ahead of time, or just in time on first use.

    load()                 loads the library: torch.ops.fastgpt.* exist, with their kernels, from then on
    is_loaded()            whether they exist in this process (the dispatcher is asked: no flag here)
    unavailable_reason()   why load() cannot work here, or None; cheap: never compiles

This module only builds and loads; it imports nothing of fastgpt (setup.py runs it standalone for
the ahead-of-time build). The ops' autograd formulas and fake kernels are registered by
fastgpt/ext/ops.py, which calls load() when it is imported.

Which build is used:
  * the ahead-of-time module `fastgpt._C`, when `pip install --no-build-isolation .` built it
    (setup.py) and it was compiled for an instruction set this CPU has;
  * otherwise a just-in-time build with torch.utils.cpp_extension and ninja, cached under
    ~/.cache/fastgpt (or $FASTGPT_CACHE_DIR) per torch version, Python version and instruction set,
    so only the first use in a given environment compiles.
FASTGPT_EXT_BUILD=jit or =aot forces one of the two. A missing compiler or ninja, or a cache
directory that cannot be written, is an error that says what to do; nothing here falls back to
another attention backend (backend="auto" moves on, saying why).

Processes that build the same directory take turns on an flock of its `fastgpt-build.lock`: the
kernel drops it when its holder dies however it dies (kill -9, the OOM killer, a gpu-report stage
cut at its budget), so a killed build is taken over by the next process, and torch's own `lock`
file, which a dead builder leaves behind and cpp_extension would wait on forever, is removed by
the process holding the flock. A live build is waited for at most FASTGPT_EXT_BUILD_TIMEOUT seconds.
A build that fails is not retried in the same process: unavailable_reason() says why from then on.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import importlib
import os
import re
import shutil
import stat
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
JIT_NAME = "fastgpt_ext"
# Translation units of the CPU build; headers are listed so that editing one rebuilds.
SOURCES = ("registration.cpp", "cpu/causal_matmul.cpp", "cpu/amx_matmul.cpp", "cpu/causal_softmax.cpp",
           "cpu/skinny_linear.cpp", "cpu/dropout.cpp", "cpu/attention_fused.cpp", "cpu/attention_flash.cpp",
           "cpu/attention_flash_amx.cpp", "cpu/attention_flash_options.cpp")
HEADERS = ("causal_ops.h", "causal_layout.h", "checks.h", "host_device.h", "philox.h", "cpu/buffer_pool.h",
           "cpu/common.h", "cpu/amx_matmul.h", "cpu/amx_tiles.h", "cpu/attention_flash_amx.h", "cpu/attention_flash.h",
           "cpu/attention_band.h", "cpu/softmax_rows.h", "cpu/nt_blocks.h", "cpu/dropout_cpu.h", "cpu/isa.h")
# The CUDA kernels of the same ops, built into the same library when torch is a CUDA build and nvcc
# is there: the torch binding and the kernel headers it includes. csrc/cuda/compile_check.cu is not
# part of the build (it is the offline compile check's, fastgpt/verify/cuda_compile.py).
CUDA_SOURCES = ("cuda/binding.cu",)
CUDA_HEADERS = ("cuda/compat.h", "cuda/launch.h", "cuda/elements.h", "cuda/causal_matmul.cuh", "cuda/causal_softmax.cuh")
# sm_80 and sm_90 machine code (bf16 wmma needs sm_80), PTX of the newest for later GPUs; the
# archs the offline checks compile for (fastgpt.verify.compile_check.ARCHS; a test holds the two equal).
CUDA_ARCHS = (80, 90)
# The first-use message's estimate of a CPU build (the times measured are in csrc/README.md, "Build").
COMPILE_SECONDS_ESTIMATE = 45
# How long a process waits for another one's build of the same directory (FASTGPT_EXT_BUILD_TIMEOUT
# overrides): long enough for a CUDA build; a builder that dies frees the lock at once, so only a
# live but stuck one costs the whole wait.
BUILD_WAIT_SECONDS = 900.0
BUILD_LOCK = "fastgpt-build.lock"  # the flock's file in the build directory
TORCH_BATON = "lock"  # what torch.utils.cpp_extension creates (O_EXCL) in it while building
BUILD_LOG = "build-error.log"  # the compiler's full output of a failed build

# Flags that make ATen's Vectorized<float> as wide as torch's own kernels on this CPU: the
# CPU_CAPABILITY macros select ATen's vec512/vec256 headers, the -m flags let the compiler emit them.
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c", "-mbmi2",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
    "DEFAULT": ["-DCPU_CAPABILITY=DEFAULT"],
}
_ISA_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


class ExtensionUnavailable(RuntimeError):
    """The C++ extension cannot be built or loaded here; the message (one line) says what to do.
    `output` holds the compiler's full output when a compile failed, else ""."""

    def __init__(self, message: str, output: str = ""):
        super().__init__(message)
        self.output = output


_lock = threading.Lock()  # one build at a time: two threads' first calls would both run ninja
_failure: Optional[str] = None  # why this process's build failed; not retried


def cpu_capability() -> str:
    """The instruction set torch dispatches its own CPU kernels to here, as one of ISA_FLAGS' keys."""
    cap = torch.backends.cpu.get_cpu_capability()
    return cap if cap in ISA_FLAGS else "DEFAULT"


def compile_flags(capability: str) -> list[str]:
    flags = ["-O3", "-fopenmp", *ISA_FLAGS[capability]]
    # The GEMMs call the sgemm_ libtorch exports where it does, at::mm elsewhere; `fastgpt info`
    # prints these flags, so which one a build runs is never hidden.
    if torch_exports_sgemm():
        flags.append("-DFASTGPT_HAVE_SGEMM")
    return flags


def cuda_flags() -> list[str]:
    """nvcc flags of the CUDA build (explicit archs: torch then adds none of its own). --threads 0:
    nvcc compiles the archs side by side on every core instead of one after another."""
    newest = max(CUDA_ARCHS)
    return ["-O3", "--threads", "0", *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS),
            f"-gencode=arch=compute_{newest},code=compute_{newest}"]


def cuda_home() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def builds_cuda() -> bool:
    """Whether the build here includes the CUDA kernels: a CUDA build of torch and nvcc (CUDA_HOME)."""
    return torch.version.cuda is not None and cuda_home() is not None and os.environ.get("FASTGPT_EXT_CUDA") != "0"


# The ops the ext attention backend calls, forward and backward.
ATTENTION_OPS = ("causal_matmul_nt", "causal_matmul_nn", "causal_matmul_tn", "causal_softmax",
                 "causal_softmax_backward", "causal_softmax_dropout_backward")
# Every op this source tree registers (registration.cpp): an ahead-of-time build that lacks one is
# older than the Python side that calls it.
REGISTERED_OPS = (*ATTENTION_OPS, "dropout_keep_mask", "causal_packed_size", "empty_cache", "skinny_linear",
                  "cpu_bf16_uses_amx", "set_cpu_isa", "cpu_isa_available", "dropout", "causal_attention_probs",
                  "causal_attention_grad_scores", "causal_attention_flash_forward", "causal_attention_flash_backward",
                  "causal_attention_flash", "attention_flash_forward", "attention_flash_backward", "attention_dropout_keep_mask",
                  "attention_flash_varlen_forward", "attention_flash_varlen_backward",
                  "attention_varlen_dropout_keep_mask", "attention_flash_paged_forward")


def ops_without_cuda_kernels() -> list[str]:
    """The attention ops that have no CUDA kernel in this process (call after load())."""
    return [op for op in ATTENTION_OPS if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastgpt::{op}", "CUDA")]


def cuda_unavailable_reason() -> Optional[str]:
    """Why the ext ops cannot run on CUDA tensors here, or None. Does not compile anything."""
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build: the ext backend's CUDA kernels need a "
                "CUDA build of torch (and nvcc to compile csrc/cuda/)")
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if is_loaded() or _aot_module() is not None:  # the ops are registered: ask the dispatcher
        missing = ops_without_cuda_kernels()
        if missing:
            return (f"fastgpt's compiled ops have no CUDA kernels for {', '.join(missing)} (the library was built "
                    "without nvcc or with FASTGPT_EXT_CUDA=0); rebuild with the CUDA toolkit present (CUDA_HOME)")
        return None
    if not builds_cuda():
        return ("nvcc not found (torch.utils.cpp_extension.CUDA_HOME is None) or FASTGPT_EXT_CUDA=0: the ext "
                "backend compiles its CUDA kernels (csrc/cuda/) on first use; install the CUDA toolkit or set CUDA_HOME")
    return None


def torch_exports_sgemm() -> bool:
    """Whether libtorch_cpu exports the Fortran `sgemm_` of the BLAS torch links (MKL on x86 Linux);
    without it the kernels call at::mm on their tiles, correct but slower."""
    lib = Path(torch.__file__).parent / "lib" / ("libtorch_cpu.dylib" if sys.platform == "darwin" else "libtorch_cpu.so")
    try:
        return hasattr(ctypes.CDLL(str(lib)), "sgemm_")
    except OSError:
        return False


def cache_root() -> Path:
    """Where fastgpt keeps its builds and check results: $FASTGPT_CACHE_DIR or ~/.cache/fastgpt."""
    return Path(os.environ.get("FASTGPT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastgpt"))


def _cache_root_text() -> str:
    """cache_root() as the user set it: which variable to change."""
    if os.environ.get("FASTGPT_CACHE_DIR"):
        return f"{cache_root()} ($FASTGPT_CACHE_DIR)"
    if os.environ.get("XDG_CACHE_HOME"):
        return f"{cache_root()} ($XDG_CACHE_HOME/fastgpt)"
    return f"{cache_root()} (~/.cache/fastgpt, from $HOME)"


def cache_unusable_reason(directory: Path) -> Optional[str]:
    """Why a build cannot write into `directory` (below cache_root()), or None; creates nothing.
    The nearest part of the path that exists decides: it must be a directory this user can write."""
    path = Path(directory)
    while True:
        try:
            st = path.stat()
            break
        except (FileNotFoundError, NotADirectoryError):
            if path == path.parent:
                return None
            path = path.parent
        except OSError as e:
            return _cache_refusal(f"{path}: {e.strerror}")
    if not stat.S_ISDIR(st.st_mode):
        return _cache_refusal(f"{path} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        read_only = os.statvfs(path).f_flag & os.ST_RDONLY
        return _cache_refusal(f"{path} is on a read-only file system" if read_only
                              else f"{path} is not writable by this user")
    return None


def _cache_refusal(problem: str) -> str:
    return (f"the C++ extension's build cache {_cache_root_text()} cannot be used: {problem}; set "
            "FASTGPT_CACHE_DIR to a writable directory")


def build_dir() -> Path:
    """The directory the just-in-time build of this environment uses."""
    capability = cpu_capability()
    cuda = builds_cuda()
    return cache_dir(capability, compile_flags(capability) + (["cuda", *cuda_flags()] if cuda else []))


def cache_dir(capability: str, flags: list[str]) -> Path:
    root = cache_root()
    # One directory per environment that produces a different binary: two venvs never share one.
    key = "|".join([torch.__version__, sys.version, sys.platform, capability, *flags, str(CSRC)])
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    return Path(root) / f"ext-torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}-{capability.lower()}-{tag}"


@contextlib.contextmanager
def _ninja_on_path():
    """cpp_extension runs `ninja` from PATH; the pip package's binary is not on it when the venv
    is used without being activated, so put it there for the duration of the build."""
    if shutil.which("ninja") is not None:
        yield
        return
    try:
        import ninja  # the PyPI package ships the binary
    except ImportError:
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    try:
        yield
    finally:
        os.environ["PATH"] = old


def jit_unavailable_reason() -> Optional[str]:
    """Why a just-in-time build cannot run here (no sources, compiler or ninja), or None."""
    missing_sources = [s for s in (*SOURCES, *HEADERS) if not (CSRC / s).is_file()]
    if missing_sources:
        return (f"the C++ sources are not at {CSRC} (missing {', '.join(missing_sources)}); install fastgpt "
                "from a source checkout (`pip install -e .`) or build the extension ahead of time "
                "(`pip install --no-build-isolation .` with torch already installed)")
    from torch.utils.cpp_extension import get_cxx_compiler

    compiler = get_cxx_compiler()
    if shutil.which(compiler) is None:
        return (f"no C++ compiler: {compiler!r} (from $CXX, default 'c++') is not on PATH; the ext backend "
                "compiles csrc/ on first use. Install one (Debian/Ubuntu: `apt install g++`; conda: "
                "`conda install -c conda-forge gxx`) or point $CXX at it")
    with _ninja_on_path():
        if shutil.which("ninja") is None:
            return ("ninja is not installed; the ext backend compiles csrc/ on first use with "
                    "torch.utils.cpp_extension, which needs it: `pip install ninja`")
    return cache_unusable_reason(build_dir())


def _aot_module():
    """fastgpt._C if it was built ahead of time and can run on this CPU, else None."""
    if os.environ.get("FASTGPT_EXT_BUILD") == "jit":
        return None
    try:
        module = importlib.import_module("fastgpt._C")
    except ImportError:
        return None
    built_for = getattr(module, "cpu_capability", "DEFAULT")
    if _ISA_RANK.get(built_for, 0) > _ISA_RANK[cpu_capability()]:
        raise ExtensionUnavailable(
            f"fastgpt._C was compiled for {built_for} but this CPU runs torch at {cpu_capability()}; rebuild it "
            "here (`pip install --no-build-isolation .`) or set FASTGPT_EXT_BUILD=jit")
    # Importing it registered the fastgpt namespace, so a JIT build can no longer load in this
    # process: a stale module is an error, not something to work around.
    missing = [op for op in REGISTERED_OPS if not hasattr(torch.ops.fastgpt, op)]
    if missing:
        raise ExtensionUnavailable(
            f"fastgpt._C is older than this source tree: it lacks {', '.join(f'fastgpt::{op}' for op in missing)}; "
            "rebuild it (`pip install --no-build-isolation .`) or set FASTGPT_EXT_BUILD=jit")
    return module


def is_loaded() -> bool:
    """Whether the library's ops are registered in this process (by load(), or by importing
    fastgpt._C). The dispatcher is the record; dynamo traces this check without a graph break."""
    return hasattr(torch.ops.fastgpt, ATTENTION_OPS[0])


def unavailable_reason() -> Optional[str]:
    """Why load() would fail in this process, or None. Does not compile anything."""
    if is_loaded():
        return None
    if _failure is not None:
        return _failure
    try:
        if _aot_module() is not None:
            return None
    except ExtensionUnavailable as e:
        return str(e)
    if os.environ.get("FASTGPT_EXT_BUILD") == "aot":
        return "FASTGPT_EXT_BUILD=aot but fastgpt._C is not installed: `pip install --no-build-isolation .`"
    return jit_unavailable_reason()


def _jit_build() -> None:
    """Builds (where needed, under the directory's build lock) and loads the library; raises
    ExtensionUnavailable with one line."""
    capability = cpu_capability()
    flags = compile_flags(capability)
    cuda = builds_cuda()
    directory = build_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # what the cheap check could not see (a race, a full disk)
        raise ExtensionUnavailable(_cache_refusal(f"creating {directory}: {e.strerror}")) from None
    inputs = (*SOURCES, *HEADERS, *((*CUDA_SOURCES, *CUDA_HEADERS) if cuda else ()))
    sources = [str(CSRC / s) for s in (*SOURCES, *(CUDA_SOURCES if cuda else ()))]
    library = directory / f"{JIT_NAME}.so"
    from torch.utils import cpp_extension

    with _build_lock(directory):
        if library.is_file() and not _library_is_whole(library):
            library.unlink()  # a link cut short: loading it would crash the process (SIGBUS); ninja relinks
        newest_source = max((CSRC / s).stat().st_mtime for s in inputs)
        compiling = not library.is_file() or library.stat().st_mtime < newest_source
        if compiling:
            print(f"fastgpt: compiling the C++ extension (first use, ~{COMPILE_SECONDS_ESTIMATE} s) into {directory} ...",
                  file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            with _ninja_on_path():
                cpp_extension.load(name=JIT_NAME, sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                   extra_cuda_cflags=cuda_flags() if cuda else None,
                                   build_directory=str(directory), is_python_module=False, verbose=False)
        except (RuntimeError, OSError) as e:  # cpp_extension's "Error building extension" holds the output
            raise _build_failure(directory, str(e)) from None
    if compiling:
        print(f"fastgpt: compiled the C++ extension in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Holds the flock of `directory`'s BUILD_LOCK (waiting for another process's build, within
    the time limit), with this pid written in it for the processes that wait."""
    try:
        fd = os.open(directory / BUILD_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ExtensionUnavailable(_cache_refusal(f"creating {directory / BUILD_LOCK}: {e.strerror}")) from None
    try:
        _wait_for_flock(fd, directory)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        # Only a holder of the flock builds here, so a torch baton found now was left by a builder
        # that died: cpp_extension would wait for it to disappear forever.
        (directory / TORCH_BATON).unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # drops the flock; the file stays, as harmless as an empty one


def build_wait_seconds() -> float:
    """How long to wait for another process's build: $FASTGPT_EXT_BUILD_TIMEOUT or BUILD_WAIT_SECONDS."""
    text = os.environ.get("FASTGPT_EXT_BUILD_TIMEOUT")
    if not text:
        return BUILD_WAIT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise ExtensionUnavailable(f"FASTGPT_EXT_BUILD_TIMEOUT={text!r} must be a number of seconds >= 0")
    return seconds


def _wait_for_flock(fd: int, directory: Path) -> None:
    limit = build_wait_seconds()
    deadline = time.monotonic() + limit
    announced = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        if time.monotonic() >= deadline:
            raise ExtensionUnavailable(
                f"pid {holder} has been compiling the C++ extension into {directory} for longer than this process "
                f"waits ({limit:.0f} s, FASTGPT_EXT_BUILD_TIMEOUT): let it finish, or end it, and run again")
        if not announced:
            print(f"fastgpt: waiting for pid {holder}, which is compiling the C++ extension into {directory} "
                  f"(at most {limit:.0f} s; FASTGPT_EXT_BUILD_TIMEOUT sets the limit) ...", file=sys.stderr, flush=True)
            announced = True
        time.sleep(0.1)


def _library_is_whole(path: Path) -> bool:
    """Whether the ELF file at `path` holds all its section headers, which the linker writes last
    (a file that is not ELF, on a platform whose libraries are not, counts as whole)."""
    with open(path, "rb") as f:
        header = f.read(64)
    if header[:4] != b"\x7fELF":
        return not sys.platform.startswith("linux")
    if len(header) < 64 or header[4] != 2:  # ELFCLASS64: the only class torch ships for
        return False
    order = "<" if header[5] == 1 else ">"
    (shoff,) = struct.unpack_from(order + "Q", header, 0x28)
    shentsize, shnum = struct.unpack_from(order + "HH", header, 0x3A)
    return path.stat().st_size >= shoff + shentsize * shnum


def _build_failure(directory: Path, output: str) -> ExtensionUnavailable:
    """One line for a failed build: the first error the compiler (or linker, or loader) gave, and
    where its full output is kept."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"error\b", line, re.IGNORECASE)
              and not line.startswith(("Error building extension", "FAILED:", "ninja:"))]
    first = (errors or lines or ["no output"])[0][:300]
    log = directory / BUILD_LOG
    try:
        log.write_text(output)
        where = f"the full output is in {log}"
    except OSError:
        where = "set FASTGPT_CACHE_DIR to a writable directory to keep the full output"
    return ExtensionUnavailable(f"building the C++ extension into {directory} failed: {first} ({where})", output)


def load() -> str:
    """Loads the library, building it first where needed: registers the schemas and kernels of
    torch.ops.fastgpt.* (not their autograd or fake kernels: fastgpt/ext/ops.py does that). Returns
    "aot" (fastgpt._C) or "jit"; raises ExtensionUnavailable saying what to install."""
    with _lock:
        if is_loaded():  # by an earlier call: loading again would at best rerun ninja's up-to-date check
            return "aot" if "fastgpt._C" in sys.modules else "jit"
        if _aot_module() is not None:  # importing it registered the ops
            return "aot"
        if os.environ.get("FASTGPT_EXT_BUILD") == "aot":
            raise ExtensionUnavailable(unavailable_reason())
        global _failure
        reason = _failure or jit_unavailable_reason()  # the cheap reasons are asked again: they can change
        if reason is not None:
            raise ExtensionUnavailable(reason)
        try:
            _jit_build()
        except ExtensionUnavailable as e:  # found only by building (or waiting): not tried again
            _failure = str(e)
            raise
        return "jit"
