"""The CUDA kernels' offline compile check (no GPU needed): every kernel of csrc/cuda/, every dtype
and variant, compiles for sm_80 and sm_90 without register spills and within the shared memory of
one block.

    python -m fastgpt.verify.cuda_compile [--arch 80 --arch 90]

`fastgpt check` runs it after the Triton kernels' check (fastgpt.verify.triton_compile); the
limits and the table layout are fastgpt.verify.compile_check's, shared by both.

One nvcc call compiles csrc/cuda/compile_check.cu (which instantiates every kernel) for all the
archs at once with `-Xptxas -v`; its report gives registers, spill stores/loads and static shared
memory per kernel and arch. The executable it links prints, from the launchers' own constants, the
dynamic shared memory each kernel family requests, which is added to the static figure. Results
are cached by a hash of the sources, flags and nvcc version, so a second run takes no compile.
Exit status 1 if anything spills, overflows shared memory or fails to compile; without nvcc the
check is skipped with a printed reason (exit status 0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from fastgpt.verify import compile_check
from fastgpt.ext.build import CSRC, cache_root

CHECK_SOURCE = CSRC / "cuda" / "compile_check.cu"
# The language the extension build gives the kernels: torch 2.11's cpp_extension compiles C++17
# (2.13's C++20); both add the no-half-operators defines and relaxed constexpr.
NVCC_FLAGS = ["-std=c++17", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
              "-O3", "-lineinfo", "-Xptxas", "-v"]
DTYPE_NAMES = {"float": "fp32", "__half": "fp16", "__nv_bfloat16": "bf16"}
# The matmuls' bool template argument: tensor cores or not.
VARIANT_NAMES = {"true": "wmma", "false": "simt"}


@dataclass
class KernelReport:
    """One kernel on one arch, as `ptxas -v` reports it (plus the launcher's dynamic shared memory)."""

    name: str  # demangled where c++filt exists, e.g. "void fastgpt::cuda::causal_matmul_nt_kernel<__half, true>(...)"
    arch: int
    registers: int = -1
    spill_stores: int = 0
    spill_loads: int = 0
    static_shared: int = 0
    dynamic_shared: int = 0

    @property
    def family(self) -> str:
        """The kernel's name without namespace or template arguments: causal_matmul_nt_kernel."""
        head = self.name.split("<", 1)[0].split("(", 1)[0]
        return head.rsplit("::", 1)[-1].split()[-1]

    @property
    def template_args(self) -> list[str]:
        m = re.search(r"<(.*?)>\(", self.name)
        return [a.strip() for a in m.group(1).split(",")] if m else []

    @property
    def dtype(self) -> str:
        return next((DTYPE_NAMES[a] for a in self.template_args if a in DTYPE_NAMES), "-")

    @property
    def variant(self) -> str:
        rest = [VARIANT_NAMES.get(a, a.rsplit("::", 1)[-1]) for a in self.template_args if a not in DTYPE_NAMES]
        return ",".join(rest) or "-"

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def shared_bytes(self) -> int:
        return self.static_shared + self.dynamic_shared

    @property
    def verdict(self) -> str:
        error = None if self.registers >= 0 else "NO REPORT"  # ptxas printed no "Used N registers" line
        return compile_check.verdict(self.arch, self.spill_bytes, self.shared_bytes, error)

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"


def parse_ptxas(report: str) -> list[KernelReport]:
    """The entry functions of a `ptxas -v` report (nvcc -Xptxas -v), one per (kernel, arch):

        ptxas info    : Compiling entry function '_ZN...' for 'sm_80'
        ptxas info    : Function properties for _ZN...
            0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
        ptxas info    : Used 80 registers, used 1 barriers, 26624 bytes smem, 440 bytes cmem[0]

    (no "bytes smem" when a kernel has no static shared memory; non-entry functions are skipped).
    """
    kernels: list[KernelReport] = []
    current: Optional[KernelReport] = None  # the entry function whose "Used" line comes next
    props: Optional[KernelReport] = None  # the entry function whose stack/spill line comes next
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'", line)
        if m:
            current = KernelReport(m.group(1), int(m.group(2)))
            kernels.append(current)
            continue
        if "Compiling function" in line:  # a non-inlined device function: not a kernel
            current = None
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            props = current if current is not None and current.name == m.group(1) else None
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and props is not None:
            props.spill_stores, props.spill_loads = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and current is not None:
            current.registers = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current.static_shared = int(smem.group(1)) if smem else 0
    return kernels


def parse_dynamic_shared(output: str) -> dict[str, int]:
    """compile_check's printout, "<kernel family> <bytes>" per line."""
    return {name: int(n) for name, n in (line.split() for line in output.splitlines() if line.strip())}


def demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if filt is None or not names:
        return names
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    demangled = out.splitlines()
    return demangled if len(demangled) == len(names) else names


def find_nvcc() -> Optional[str]:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def unavailable_reason() -> Optional[str]:
    if find_nvcc() is None:
        return ("nvcc not found ($CUDA_HOME/bin, /usr/local/cuda/bin, PATH): install the CUDA toolkit to "
                "compile-check the CUDA kernels")
    if not CHECK_SOURCE.is_file():
        return f"{CHECK_SOURCE} is missing (not a source checkout)"
    return None


def _sources_hash(nvcc: str, archs: list[int]) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh", ".cu") and "cpu" not in p.parts)
    for p in files:
        h.update(str(p.relative_to(CSRC)).encode() + b"\0" + p.read_bytes())
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    h.update(" ".join([version, *NVCC_FLAGS, *map(str, archs)]).encode())
    return h.hexdigest()[:16]


def compile_reports(archs: list[int]) -> tuple[list[KernelReport], float, bool]:
    """(one report per kernel and arch in `archs`, nvcc seconds, whether it came from the cache).
    nvcc always compiles every arch of compile_check.ARCHS, so every caller shares one cache entry."""
    every_arch = compile_check.ARCHS
    nvcc = find_nvcc()
    cache = cache_root() / f"cuda-check-{_sources_hash(nvcc, every_arch)}.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        return [KernelReport(**k) for k in saved["kernels"] if k["arch"] in archs], saved["seconds"], True
    gencodes = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in every_arch]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "compile_check"
        done = subprocess.run([nvcc, *NVCC_FLAGS, *gencodes, str(CHECK_SOURCE), "-o", str(exe)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"nvcc failed on {CHECK_SOURCE}:\n{done.stderr[-4000:]}")
        seconds = time.perf_counter() - start
        dynamic = parse_dynamic_shared(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
    kernels = parse_ptxas(done.stdout + done.stderr)
    for k, name in zip(kernels, demangle([k.name for k in kernels])):
        k.name = name
    for k in kernels:
        if k.family not in dynamic:
            raise RuntimeError(f"compile_check.cu prints no dynamic shared memory for {k.family}; add it to main()")
        k.dynamic_shared = dynamic[k.family]
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"seconds": seconds, "kernels": [asdict(k) for k in kernels]}))
    os.replace(tmp, cache)  # atomic: a concurrent run reads the whole file or none
    return [k for k in kernels if k.arch in archs], seconds, False


def table(kernels: list[KernelReport]) -> str:
    """One row per (kernel, arch, dtype, variant); shared memory is static + dynamic."""
    rows = [["cuda kernel", "arch", "dtype", "variant", "regs", "spill B", "smem KB", "status"]]
    for k in sorted(kernels, key=lambda k: (k.family, k.arch, k.dtype, k.variant)):
        rows.append([k.family, f"sm_{k.arch}", k.dtype, k.variant, str(k.registers), str(k.spill_bytes),
                     f"{k.shared_bytes / 1024:.1f}", k.verdict])
    return compile_check.render_table(rows)


def run(archs: Optional[list[int]] = None) -> int:
    """Compiles (or reads the cache), prints the table and a summary; exit status 0 (also when nvcc
    is missing: the check is skipped, with the reason) or 1 (a failure)."""
    reason = unavailable_reason()
    if reason is not None:
        print(f"CUDA kernels: compile check skipped: {reason}")
        return 0
    try:
        kernels, seconds, cached = compile_reports(archs or compile_check.ARCHS)
    except RuntimeError as e:
        print(f"CUDA kernels: compile check FAILED: {e}")
        return 1
    print(table(kernels))
    failed = [k for k in kernels if not k.ok]
    compiled_for = ", ".join(f"sm_{a}" for a in sorted({k.arch for k in kernels}))
    print(f"\n{len(kernels)} CUDA kernels ({compiled_for}) from one nvcc call in {seconds:.1f} s"
          f"{' (cached)' if cached else ''}: {len(kernels) - len(failed)} ok, {len(failed)} failed "
          f"({compile_check.limits_note()})")
    for k in failed:
        print(f"FAILED {k.name} sm_{k.arch}: regs={k.registers} spill={k.spill_bytes} smem={k.shared_bytes}")
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastgpt.verify.cuda_compile",
                                     description=__doc__.split("\n\n")[0])
    compile_check.add_arch_option(parser)
    return run(parser.parse_args(argv).arch)


if __name__ == "__main__":
    sys.exit(main())
