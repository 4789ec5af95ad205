"""Builds the emulated CUDA kernels (csrc/cuda/ through the SIMT emulation) with the host g++.

One build per source hash, cached under $FASTGPT_CACHE_DIR (default ~/.cache/fastgpt)/cuda-emulation/,
so a test session compiles each target at most once and later sessions not at all. No g++: the
tests that need it are skipped with the reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CSRC = REPO / "csrc"
HERE = Path(__file__).resolve().parent

BASE_FLAGS = ["-std=c++20", "-pthread", "-Wall", "-Wextra", "-Wno-unknown-pragmas", f"-I{CSRC}"]
TSAN_FLAGS = ["-O1", "-g", "-fsanitize=thread"]


def compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler (g++) on PATH: the emulated CUDA kernels cannot be built; apt install g++")
    return cxx


def _inputs(sources: list[Path], include_dirs: list[Path]) -> list[Path]:
    """Every file the build reads: the sources, the headers of csrc/ and the extra include dirs."""
    headers = [p for d in [CSRC, *include_dirs] for p in sorted(d.rglob("*")) if p.suffix in {".h", ".cuh"}]
    return [*sources, *headers]


def build(name: str, sources: list[Path], flags: list[str], shared: bool = False,
          include_dirs: list[Path] = ()) -> Path:
    """Compiles `sources` into an executable (or a shared library) named `name`, reusing the cached
    build when nothing it reads has changed."""
    cxx = compiler()
    include_dirs = list(include_dirs)
    cmd_flags = [*BASE_FLAGS, *(f"-I{d}" for d in include_dirs), *flags, *(["-shared", "-fPIC"] if shared else [])]
    h = hashlib.sha256()
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    h.update(" ".join(cmd_flags).encode())
    for p in _inputs(sources, include_dirs):
        h.update(str(p.relative_to(REPO) if p.is_relative_to(REPO) else p).encode())
        h.update(p.read_bytes())
    root = Path(os.environ.get("FASTGPT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastgpt")
    out = root / "cuda-emulation" / f"{name}-{h.hexdigest()[:16]}" / (f"lib{name}.so" if shared else name)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    cmd = [cxx, *cmd_flags, *map(str, sources), "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling {name} failed:\n{' '.join(cmd)}\n{result.stderr[-6000:]}")
    os.replace(tmp, out)  # atomic: a concurrent session sees the whole file or none
    return out
