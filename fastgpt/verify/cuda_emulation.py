"""Builds programs over the emulated CUDA kernels (csrc/cuda/ through the SIMT emulation of
csrc/cuda/emulation/) with the host g++: what `fastgpt gpu-report` runs under ThreadSanitizer
where no compute-sanitizer exists, and what the emulation tests build.

One build per source hash, cached under $FASTGPT_CACHE_DIR (default ~/.cache/fastgpt)/cuda-emulation/,
so a test session compiles each target at most once and later sessions not at all. No g++:
NoCompiler says so.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from fastgpt.ext.build import REPO, cache_root

CSRC = REPO / "csrc"
# the harness gpu-report runs: every warp-per-row softmax case, under ThreadSanitizer
TSAN_MAIN = CSRC / "cuda" / "emulation" / "tsan_main.cpp"

# -fno-strict-aliasing: kernels move 16-byte chunks through uint4 casts, which nvcc allows.
BASE_FLAGS = ["-std=c++20", "-pthread", "-fno-strict-aliasing", "-Wall", "-Wextra", "-Wno-unknown-pragmas"]
TSAN_FLAGS = ["-O1", "-g", "-fsanitize=thread"]


class NoCompiler(RuntimeError):
    """No host C++ compiler: the emulated kernels cannot be built."""


def compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        raise NoCompiler("no C++ compiler (g++, or $CXX) on PATH: the emulated CUDA kernels cannot be built; apt install g++")
    return cxx


def _inputs(sources: list[Path], csrc: Path) -> list[tuple[str, Path]]:
    """Every file the build reads, named as the hash sees it: the sources, the headers under csrc
    (relative to it, so a copy of csrc with the same content hits the same cache entry)."""
    headers = [(str(p.relative_to(csrc)), p) for p in sorted(csrc.rglob("*")) if p.suffix in {".h", ".cuh"}]
    return [(p.name, p) for p in sources] + headers


def build(name: str, sources: list[Path], flags: list[str], shared: bool = False, csrc: Path = CSRC) -> Path:
    """Compiles `sources` into an executable (or a shared library) named `name` against the headers
    of `csrc` (a modified copy, for the tests that break a kernel on purpose), reusing the cached
    build when nothing it reads has changed."""
    cxx = compiler()
    cmd_flags = [*BASE_FLAGS, f"-I{csrc}", *flags, *(["-shared", "-fPIC"] if shared else [])]
    h = hashlib.sha256()
    h.update(subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.encode())
    cmd_flags_hashed = [f for f in cmd_flags if f != f"-I{csrc}"]
    h.update(" ".join(cmd_flags_hashed).encode())
    for name_in_hash, p in _inputs(sources, csrc):
        h.update(name_in_hash.encode())
        h.update(p.read_bytes())
    out = cache_root() / "cuda-emulation" / f"{name}-{h.hexdigest()[:16]}" / (f"lib{name}.so" if shared else name)
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
