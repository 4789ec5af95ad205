"""The ext backend's CUDA build against a real CUDA build of torch, on a machine without a GPU.

    python tests/cuda_torch_build.py [--torch 2.13.0] [--keep-venv DIR] [--cuda-home DIR]

Not in the default test run (pytest collects test_*.py only): it downloads PyPI's CUDA wheel of
torch with its nvidia-* libraries and triton (about 2.7 GB for torch 2.13.0 or 2.11.0), and
fastgpt's small dependencies, into a scratch virtual environment, and compiles the extension
twice, the CUDA binding against torch's headers for sm_80 and sm_90: about 10 minutes in all on a
2-core machine. Any Python >= 3.10 runs it; torch need not be installed where it starts.
The toolkit is the one torch finds ($CUDA_HOME, else nvcc on PATH, else /usr/local/cuda) unless
--cuda-home names it; on our dev machines nvcc on PATH is a wrapper script in /usr/local/bin,
from which torch would take CUDA_HOME=/usr/local, so pass --cuda-home /usr/local/cuda there.

1. venv: torch==VERSION from the index (PyPI by default), plus the build tools. pip's own
   configuration is ignored, so that a local +cpu wheel or a constraints file cannot stand in for
   the CUDA wheel; torch.version.cuda must come back set, with nvcc's major version (cpp_extension
   refuses another).
2. Ahead of time: `pip wheel --no-build-isolation` of this checkout (setup.py's CUDAExtension,
   timed), the wheel installed, then `import fastgpt._C` in the venv.
3. Just in time: FASTGPT_EXT_BUILD=jit with a fresh FASTGPT_CACHE_DIR, fastgpt.ext.load() (timed)
   from a copy of this checkout.
After each build the dispatcher is asked, op by op (fastgpt/ext/build.py's ATTENTION_OPS and
dropout_keep_mask), whether fastgpt::<op> has a CUDA kernel. Nothing runs on a GPU: importing a
CUDA torch works without one (torch.cuda.is_available() is False).

Exit status 0 when both builds succeed and every op has its CUDA kernel in both; 1 otherwise (the
build logs are then kept and their paths printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/simple"
# What `pip install --no-build-isolation .` expects to find: pyproject's build-system.requires,
# and ninja, without which BuildExtension compiles one file at a time.
BUILD_TOOLS = ("setuptools>=68", "wheel", "ninja")
# Checked besides the attention ops: the testing hook that draws causal_softmax's dropout mask.
EXTRA_OPS = ("dropout_keep_mask",)
DISPATCH_KEYS = ("CPU", "CUDA")
# pip settings that could point it at another torch than the index's.
PIP_SOURCE_VARIABLES = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX",
                        "PIP_REQUIREMENT")

# Runs in the venv: what the environment holds, before anything is built.
ENV_PROBE = r"""
import json, torch
from torch.utils import cpp_extension
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_home": cpp_extension.CUDA_HOME,
                  "cuda_available": torch.cuda.is_available()}))
"""

# Runs in the venv: loads the extension as FASTGPT_EXT_BUILD says, then asks the dispatcher.
LOAD_PROBE = r"""
import json, sys, time, torch
from fastgpt.ext import build
start = time.perf_counter()
kind = build.load()
seconds = time.perf_counter() - start
ops = [*build.ATTENTION_OPS, *EXTRA_OPS]
has = torch._C._dispatch_has_kernel_for_dispatch_key
module = sys.modules.get("fastgpt._C")
print(json.dumps({"kind": kind, "load_s": seconds, "module": getattr(module, "__file__", None),
                  "cuda_unavailable_reason": build.cuda_unavailable_reason(),
                  "ops": {op: {key: has(f"fastgpt::{op}", key) for key in KEYS} for op in ops}}))
""".replace("EXTRA_OPS", repr(EXTRA_OPS)).replace("KEYS", repr(DISPATCH_KEYS))

_SIZE_UNITS = {"B": 1, "bytes": 1, "kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def download_sizes(pip_output: str) -> tuple[int, int]:
    """(bytes downloaded, bytes taken from pip's cache) from pip's "Downloading x.whl (526.6 MB)" and
    "Using cached x.whl (...)" lines (pip's units are decimal)."""
    sizes = {"Downloading": 0, "Using cached": 0}
    for m in re.finditer(r"^\s*(Downloading|Using cached) \S+ \(([\d.]+) (bytes|B|kB|KB|MB|GB)\)", pip_output, re.M):
        sizes[m.group(1)] += round(float(m.group(2)) * _SIZE_UNITS[m.group(3)])
    return sizes["Downloading"], sizes["Using cached"]


def nvcc_release(version_text: str) -> Optional[tuple[int, int]]:
    """(major, minor) from `nvcc --version`'s "release 13.0, V13.0.88" line, or None."""
    m = re.search(r"release (\d+)\.(\d+)", version_text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_mismatch(torch_cuda: Optional[str], nvcc: Optional[tuple[int, int]], cuda_home: Optional[str]) -> Optional[str]:
    """Why this torch and this nvcc cannot build the extension together, or None. cpp_extension
    refuses an nvcc of another major version than torch's CUDA (a minor difference only warns)."""
    if torch_cuda is None:
        return "torch.version.cuda is None: this is a CPU-only build of torch, not the CUDA wheel"
    if cuda_home is None or nvcc is None:
        return (f"no nvcc: torch.utils.cpp_extension found no CUDA toolkit (CUDA_HOME={cuda_home}); "
                "pass --cuda-home DIR or set CUDA_HOME")
    torch_major = int(torch_cuda.split(".")[0])
    if nvcc[0] != torch_major:
        return (f"torch was built against CUDA {torch_cuda} but nvcc at {cuda_home} is CUDA {nvcc[0]}.{nvcc[1]}: "
                f"torch.utils.cpp_extension refuses a different major version. Point --cuda-home at a CUDA "
                f"{torch_major}.x toolkit, or pick a torch built against CUDA {nvcc[0]}")
    return None


def toolkit_problem(cuda_home: str) -> Optional[str]:
    """What makes cuda_home unusable as CUDA_HOME, or None. torch derives it from nvcc on PATH when
    CUDA_HOME is unset, which for a wrapper script such as /usr/local/bin/nvcc names a directory
    without the toolkit's headers and libraries."""
    home = Path(cuda_home)
    if not (home / "bin" / "nvcc").is_file():
        return f"CUDA_HOME={cuda_home} has no bin/nvcc; pass --cuda-home DIR (the toolkit's root)"
    if not (home / "include" / "cuda_runtime.h").is_file():
        return (f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h (nvcc found there may be a wrapper of another "
                "toolkit); pass --cuda-home DIR (the toolkit's root, e.g. /usr/local/cuda)")
    return None


def error_summary(log: str, errors: int = 30, tail: int = 15) -> str:
    """A failed build's compiler errors (the first ones) and the last lines of its log."""
    lines = log.splitlines()
    found = [line for line in lines if re.search(r"\berror\b|FAILED:|fatal", line, re.I)][:errors]
    return "\n".join([*found, "...", *lines[-tail:]])


def source_warnings(log: str) -> list[str]:
    """The compiler's warnings located in fastgpt's own csrc/ (not in torch's or CUDA's headers), once each."""
    # gcc: "csrc/x.cpp:10:5: warning: ..."; nvcc's front end: "csrc/x.cu(12): warning #177-D: ..."
    found = re.findall(r"(csrc/[^\s:(]+(?::\d+(?::\d+)?|\(\d+\)): warning\b.*)$", log, re.M)
    return list(dict.fromkeys(found))


def kernel_table(ops: list[str], builds: dict[str, dict]) -> str:
    """One row per op, one column per build and dispatch key: "yes" where the kernel is registered."""
    columns = [(name, key) for name in builds for key in DISPATCH_KEYS]
    header = ["op", *(f"{name} {key}" for name, key in columns)]
    rows = [[op, *("yes" if builds[name]["ops"].get(op, {}).get(key) else "NO" for name, key in columns)] for op in ops]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in [header, *rows])


def missing_cuda_kernels(result: dict) -> list[str]:
    return [op for op, keys in result["ops"].items() if not keys.get("CUDA")]


def pip_env(base: dict[str, str]) -> dict[str, str]:
    """The environment for pip: no config files and no source overrides, only the given index."""
    env = {k: v for k, v in base.items() if k not in PIP_SOURCE_VARIABLES}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip reads no configuration file at all when it is os.devnull
    return env


class Step:
    """Runs commands with their output in a log file; a failure stops the script with the log's tail."""

    def __init__(self, work: Path, env: dict[str, str]):
        self.work, self.env = work, env

    def run(self, name: str, cmd: list[str], *, cwd: Optional[Path] = None, env: Optional[dict[str, str]] = None,
            capture: bool = False) -> tuple[str, float]:
        log = self.work / f"{name}.log"
        print(f"[{name}] {' '.join('<script>' if chr(10) in a else a for a in cmd)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env or self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        seconds = time.perf_counter() - start
        log.write_text(proc.stdout)
        if proc.returncode != 0:
            raise StepFailed(f"{name} failed (exit {proc.returncode}, {seconds:.0f} s); log {log}; its errors, "
                             f"then its end:\n{error_summary(proc.stdout)}")
        return proc.stdout, seconds


class StepFailed(RuntimeError):
    pass


def copy_checkout(dest: Path) -> None:
    """The files of this checkout that a clone plus its uncommitted work would hold (no venv, no builds)."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                check=True, capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "*.so"))
        return
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", default="2.13.0", help="torch version to install from the index (default 2.13.0)")
    parser.add_argument("--keep-venv", type=Path, metavar="DIR",
                        help="make (or reuse) the venv at DIR and keep it; default: a temporary one, deleted")
    parser.add_argument("--cuda-home", help="the CUDA toolkit to build with (default: torch's own search: "
                        "$CUDA_HOME, nvcc on PATH, /usr/local/cuda)")
    parser.add_argument("--index-url", default=PYPI, help=f"where pip gets torch (default {PYPI})")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fastgpt-cuda-build-"))
    venv = args.keep_venv.resolve() if args.keep_venv else work / "venv"
    base_env = dict(os.environ)
    base_env.pop("FASTGPT_EXT_BUILD", None)
    base_env.pop("FASTGPT_EXT_CUDA", None)
    # As if the venv were activated: BuildExtension and cpp_extension look for ninja on PATH.
    base_env["PATH"] = f"{venv / 'bin'}{os.pathsep}{base_env.get('PATH', '')}"
    base_env["VIRTUAL_ENV"] = str(venv)
    if args.cuda_home:
        base_env["CUDA_HOME"] = args.cuda_home
    step = Step(work, base_env)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    ok = False
    try:
        if not (venv / "bin" / "python").exists():
            step.run("venv", [sys.executable, "-m", "venv", str(venv)])
        out, install_s = step.run("install-torch", [*pip, "install", "--index-url", args.index_url,
                                                    f"torch=={args.torch}", *BUILD_TOOLS], env=pip_env(base_env))
        downloaded, cached = download_sizes(out)
        env_out, _ = step.run("env", [python, "-c", ENV_PROBE], cwd=work)
        info = json.loads(env_out.strip().splitlines()[-1])
        nvcc_text = ""
        if info["cuda_home"]:
            nvcc_text, _ = step.run("nvcc", [str(Path(info["cuda_home"]) / "bin" / "nvcc"), "--version"])
        nvcc = nvcc_release(nvcc_text)
        print(f"torch {info['torch']}  torch.version.cuda {info['cuda']}  cuda available: {info['cuda_available']}")
        print(f"nvcc  {info['cuda_home']}: {nvcc_text.strip().splitlines()[-2] if nvcc_text.strip() else 'none'}")
        print(f"torch install: {install_s:.0f} s, downloaded {downloaded / 1e9:.2f} GB"
              f"{f', {cached / 1e9:.2f} GB from pip cache' if cached else ''}")
        if info["torch"].split("+")[0] != args.torch:
            raise StepFailed(f"asked for torch {args.torch} but the venv has {info['torch']}")
        reason = cuda_mismatch(info["cuda"], nvcc, info["cuda_home"]) or toolkit_problem(info["cuda_home"])
        if reason:
            raise StepFailed(reason)

        src = work / "src"
        copy_checkout(src)
        wheels = work / "wheels"
        aot_log, aot_s = step.run("aot-build", [*pip, "wheel", "--no-build-isolation", "--no-deps", "-v", "-w", str(wheels),
                                          str(src)])
        (wheel,) = wheels.glob("fastgpt-*.whl")
        step.run("aot-uninstall", [*pip, "uninstall", "-y", "fastgpt"])
        step.run("aot-install", [*pip, "install", "--index-url", args.index_url, str(wheel)], env=pip_env(base_env))
        aot_env = {**base_env, "FASTGPT_EXT_BUILD": "aot"}
        out, _ = step.run("aot-check", [python, "-c", LOAD_PROBE], cwd=work, env=aot_env)
        aot = json.loads(out.strip().splitlines()[-1])
        print(f"AOT build (pip wheel --no-build-isolation): {aot_s:.0f} s; loaded {aot['kind']} from {aot['module']}")
        warnings = source_warnings(aot_log)
        print(f"compiler warnings in csrc/ (AOT build log): {len(warnings)}")
        for warning in warnings[:10]:
            print(f"  {warning}")

        jit_env = {**base_env, "FASTGPT_EXT_BUILD": "jit", "FASTGPT_CACHE_DIR": str(work / "jit-cache"),
                   "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
        out, jit_s = step.run("jit-build", [python, "-c", LOAD_PROBE], cwd=src, env=jit_env)
        jit = json.loads(out.strip().splitlines()[-1])
        print(f"JIT build (fastgpt.ext.load(), fresh cache): {jit['load_s']:.0f} s ({jit_s:.0f} s with the "
              f"interpreter); loaded {jit['kind']}")

        builds = {"aot": aot, "jit": jit}
        print()
        print(kernel_table(list(aot["ops"]), builds))
        print()
        failures = [f"{name}: no CUDA kernel for {', '.join(missing)}"
                    for name, result in builds.items() if (missing := missing_cuda_kernels(result))]
        failures += [f"{name} loaded {result['kind']}" for name, result in builds.items() if result["kind"] != name]
        failures += [f"{name}: fastgpt says CUDA is unavailable: {result['cuda_unavailable_reason']}"
                     for name, result in builds.items() if result["cuda_unavailable_reason"]]
        for failure in failures:
            print(f"FAIL {failure}")
        ok = not failures
        print("OK: every op has its CUDA kernel in both builds" if ok else f"FAILED ({len(failures)})")
    except StepFailed as e:
        print(f"FAIL {e}", file=sys.stderr)
    finally:
        if args.keep_venv:
            print(f"venv kept at {venv}")
        else:
            shutil.rmtree(venv, ignore_errors=True)  # gigabytes; the logs are what tells a failure
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
