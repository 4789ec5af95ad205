"""fastgpt's Triton side under one triton release, in a scratch virtual environment, on a machine
without a GPU: the ends of the range pyproject.toml claims are tested with it.

    python tests/triton_versions.py --triton 3.6.0 [--numpy 2.3.5] [--jobs 2] [--arch 90] [--keep-venv DIR]
                                    [--cache-dir DIR] [--skip compile|interpreter] [--out FILE]

Not in the default test run (pytest collects test_*.py only): it installs triton (~150-250 MB, or
pip's cache), and a full compile check is many minutes of CPU (842 kernels; Triton's cache,
--cache-dir, makes a rerun take seconds). Any Python >= 3.10 runs it.

1. venv: torch==2.13.0 (the machine's pip configuration may supply its local CPU wheel),
   triton==VERSION, numpy as pip resolves it, fastgpt's small dependencies and pytest; then this
   checkout (a copy, with its uncommitted work) installed with --no-deps, not editable.
2. For pip's numpy, then each --numpy VERSION (reinstalled in the venv), in Triton's interpreter:
   `fastgpt parity --backends triton --dtypes float32 float16`, tests/test_triton_attention.py,
   and `fastgpt gpu-report --dry-run` (its stages as --report-stages says).
3. The offline compile check of every shipped config for sm_80 and sm_90
   (`python -m fastgpt.verify.triton_compile --json`): what compiles, what spills (and is
   dropped at run time), what fails.

The results go into --out, in the entry for this triton: each step with the command and checkout
that made it, replacing that step's earlier result (a rerun with --skip redoes the other step only).
Exit status 0 when every step passed; 1 otherwise (the logs are then kept, their paths printed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "triton_versions.json"
# fastgpt's runtime dependencies that the steps import (pyproject's list, less torch, triton and
# numpy, which are pinned here), and the test runner.
SMALL_DEPS = ("tqdm>=4.60", "matplotlib>=3.7", "ninja>=1.11", "pytest>=8", "pytest-xdist>=3.5")  # addopts runs -n auto
PARITY = ["parity", "--backends", "triton", "--dtypes", "float32", "float16"]
TESTS = ["tests/test_triton_attention.py"]
REPORT_STAGES = ("environment", "parity", "attention", "generation")  # the ones that run Triton
STEP_TIMEOUT_S = 3 * 3600

VERSIONS_PROBE = ("import json, numpy, torch, triton; print(json.dumps({'torch': torch.__version__, "
                  "'triton': triton.__version__, 'numpy': numpy.__version__}))")


def version_arg(text: str) -> str:
    """--triton's and --numpy's type: a release number such as 3.6.0."""
    if not re.fullmatch(r"\d+(\.\d+){1,2}(\.post\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a release number such as 3.6.0")
    return text


def jobs_arg(text: str) -> int:
    try:
        jobs = int(text)
    except ValueError:
        jobs = 0
    if jobs < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return jobs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tests/triton_versions.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", type=version_arg, required=True, help="the triton release to install, e.g. 3.6.0")
    parser.add_argument("--numpy", type=version_arg, action="append", default=[], metavar="VERSION",
                        help="also run the interpreter steps with this numpy (repeatable), after pip's choice")
    parser.add_argument("--torch", type=version_arg, default="2.13.0", help="default 2.13.0")
    parser.add_argument("--arch", type=int, action="append", choices=(80, 90),
                        help="compile check for this arch only (repeatable; default: 80 and 90)")
    parser.add_argument("--jobs", type=jobs_arg, default=os.cpu_count() or 1, help="compile check processes (default: one per CPU)")
    parser.add_argument("--keep-venv", type=Path, metavar="DIR", help="make (or reuse) the venv at DIR and keep it; "
                        "default: a temporary one, deleted")
    parser.add_argument("--cache-dir", type=Path, metavar="DIR", help="Triton's cache for the compile check "
                        "(TRITON_CACHE_DIR), kept; default: a temporary one")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"the results file (default {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--report-stages", nargs="+", default=list(REPORT_STAGES), metavar="STAGE",
                        help=f"gpu-report --dry-run's stages (default: {' '.join(REPORT_STAGES)})")
    parser.add_argument("--skip", nargs="+", default=[], choices=("interpreter", "compile"),
                        help="leave steps out (the entry then says so)")
    return parser


# ---- reading what the steps print -------------------------------------------------------------

def pytest_counts(output: str) -> dict[str, int]:
    """{"passed": 92, "failed": 1, ...} from pytest's last summary line ("== 1 failed, 92 passed in 60.1s ==")."""
    lines = [line for line in output.splitlines() if re.search(r"\b(passed|failed|error|errors|skipped)\b", line)
             and re.search(r"\bin [\d.]+s\b", line)]
    if not lines:
        return {}
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)", lines[-1]):
        counts[word.rstrip("s") if word in ("errors", "warnings") else word] = int(number)
    return counts


def parity_counts(output: str) -> dict[str, int]:
    """{"checks": 58, "failures": 0} from `fastgpt parity`'s last line; {} when it printed none."""
    m = re.search(r"fastgpt parity: (\d+) checks, (?:all passed|(\d+) failure)", output)
    return {"checks": int(m.group(1)), "failures": int(m.group(2) or 0)} if m else {}


def report_stages(report: dict) -> dict[str, str]:
    """{stage: status} from gpu-report's report.json."""
    return {s["name"]: s["status"] for s in report.get("stages", [])}


def compile_summary(check: dict) -> dict:
    """What the compile check's --json says, in short: counts, and the spilling configs by arch."""
    rows, summary = check["results"], check["summary"]
    spilling = [r for r in rows if r["spill_bytes"] > 0]
    return {
        "compilations": summary["compilations"], "ok": summary["ok"], "failures": summary["failures"],
        "spilling": len(spilling),
        "spilling_by_arch": {f"sm_{arch}": sum(r["arch"] == arch for r in spilling)
                             for arch in sorted({r["arch"] for r in rows})},
        "dropped_at_run_time": summary["dropped_at_run_time"],
        "spills": [f"{r['kernel']} sm_{r['arch']} {r['dtype']} D={r['head_dim']} dropout={'on' if r['dropout'] else 'off'} "
                   f"{r['config']}: {r['spill_bytes']} B ({r['status']})" for r in spilling],
        "seconds": summary["seconds"],
    }


def merge_entry(results: dict, entry: dict) -> dict:
    """results with `entry` merged into the earlier entry for the same triton (its steps replace
    the earlier ones; a step it left out keeps the earlier result), versions in order, and the
    merged entry's "ok" recomputed."""
    earlier = next((e for e in results.get("versions", []) if e["triton"] == entry["triton"]), {})
    merged = {**{k: v for k, v in earlier.items() if k not in ("error", "ok")}, **entry}
    merged["ok"] = entry_ok(merged)
    entries = [e for e in results.get("versions", []) if e["triton"] != entry["triton"]] + [merged]
    entries.sort(key=lambda e: tuple(int(x) for x in re.findall(r"\d+", e["triton"])))
    return {**results, "versions": entries}


def entry_ok(entry: dict) -> bool:
    """Whether every step of an entry passed (a step left out counts neither way) and none failed to start."""
    runs_ok = all(run["parity"].get("rc") == 0 and run["tests"].get("rc") == 0 and run["gpu_report"].get("rc") == 0
                  for run in entry.get("interpreter", {}).get("runs", []))
    check = entry.get("compile_check")
    return "error" not in entry and runs_ok and (check is None or check.get("rc") == 0)


# ---- running them -----------------------------------------------------------------------------

class Steps:
    """Runs commands with their output in a log file per step."""

    def __init__(self, work: Path, env: dict[str, str]):
        self.work, self.env = work, env

    def run(self, name: str, cmd: list[str], *, cwd: Optional[Path] = None, env: Optional[dict[str, str]] = None,
            check: bool = True) -> tuple[int, str, float]:
        log = self.work / f"{name}.log"
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=cwd or self.work, env=env or self.env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=STEP_TIMEOUT_S)
            rc, output = proc.returncode, proc.stdout
        except subprocess.TimeoutExpired as e:
            rc = 124
            output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        seconds = time.perf_counter() - start
        log.write_text(output)
        print(f"[{name}] exit {rc} in {seconds:.0f} s (log {log})", flush=True)
        if check and rc != 0:
            raise StepFailed(f"{name} failed (exit {rc}); log {log}; its end:\n" + "\n".join(output.splitlines()[-15:]))
        return rc, output, seconds


class StepFailed(RuntimeError):
    pass


def copy_checkout(dest: Path) -> None:
    """The files of this checkout that a clone plus its uncommitted work would hold."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def checkout_revision() -> str:
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + (" with uncommitted changes" if git("status", "--porcelain") else "")


def interpreter_run(steps: Steps, venv: Path, src: Path, tag: str, report_stages_wanted: list[str]) -> dict:
    """Parity, the Triton tests and the gpu-report dry run in the interpreter, with the venv's numpy."""
    python, fastgpt = str(venv / "bin" / "python"), str(venv / "bin" / "fastgpt")
    env = {**steps.env, "TRITON_INTERPRET": "1"}
    _, out, _ = steps.run(f"versions-{tag}", [python, "-c", VERSIONS_PROBE])
    run = {"numpy": json.loads(out.strip().splitlines()[-1])["numpy"]}
    rc, out, seconds = steps.run(f"parity-{tag}", [fastgpt, *PARITY], env=env, check=False)
    run["parity"] = {"rc": rc, **parity_counts(out), "seconds": round(seconds)}
    # from the work folder, so that the installed fastgpt is the one imported, not the copy's folders
    rc, out, seconds = steps.run(f"tests-{tag}", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                                  *(str(src / t) for t in TESTS)], env=env, check=False)
    run["tests"] = {"rc": rc, "files": TESTS, **pytest_counts(out), "seconds": round(seconds)}
    report_dir = steps.work / f"gpu-report-{tag}"
    rc, out, seconds = steps.run(f"gpu-report-{tag}", [fastgpt, "gpu-report", "--dry-run", "--out-dir", str(report_dir),
                                                       "--stages", *report_stages_wanted],
                                 env={**steps.env, "FASTGPT_CACHE_DIR": str(steps.work / "ext-cache")}, check=False)
    report_path = report_dir / "report.json"
    stages = report_stages(json.loads(report_path.read_text())) if report_path.is_file() else {}
    run["gpu_report"] = {"rc": rc, "stages": stages, "seconds": round(seconds)}
    return run


def write_entry(path: Path, entry: dict) -> None:
    """Merges entry into the results file, under a lock: runs for other versions may end at the same time."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(tempfile.gettempdir()) / "fastgpt-triton-versions.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {}
        results = merge_entry({"written_by": "tests/triton_versions.py", **results}, entry)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python tests/triton_versions.py " + " ".join(argv if argv is not None else sys.argv[1:])
    work = Path(tempfile.mkdtemp(prefix=f"fastgpt-triton-{args.triton}-"))
    venv = args.keep_venv.resolve() if args.keep_venv else work / "venv"
    cache_dir = args.cache_dir.resolve() if args.cache_dir else work / "triton-cache"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH", "FASTGPT_CACHE_DIR")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               TRITON_CACHE_DIR=str(cache_dir), PYTHONDONTWRITEBYTECODE="1")
    steps = Steps(work, env)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "-q"]
    # each step's result says which command and which checkout made it: a later run may redo one step only
    made_by = {"command": command, "fastgpt": checkout_revision(), "date": time.strftime("%Y-%m-%d")}
    entry: dict = {"triton": args.triton, "python": platform.python_version()}
    ok = False
    try:
        if not (venv / "bin" / "python").exists():
            steps.run("venv", [sys.executable, "-m", "venv", str(venv)])
        steps.run("install", [*pip, f"torch=={args.torch}", f"triton=={args.triton}", "numpy", *SMALL_DEPS])
        src = work / "src"
        copy_checkout(src)
        steps.run("install-fastgpt", [*pip, "--no-deps", "--force-reinstall", str(src)],
                  env={**env, "FASTGPT_NO_AOT": "1"})
        _, out, _ = steps.run("versions", [python, "-c", VERSIONS_PROBE])
        installed = json.loads(out.strip().splitlines()[-1])
        if installed["triton"] != args.triton:
            raise StepFailed(f"asked for triton {args.triton} but the venv has {installed['triton']}")
        entry.update(torch=installed["torch"], numpy_resolved=installed["numpy"])
        if "interpreter" not in args.skip:
            runs = [interpreter_run(steps, venv, src, "numpy-resolved", args.report_stages)]
            for numpy in args.numpy:
                steps.run(f"install-numpy-{numpy}", [*pip, f"numpy=={numpy}"])
                runs.append(interpreter_run(steps, venv, src, f"numpy-{numpy}", args.report_stages))
            entry["interpreter"] = {**made_by, "runs": runs}
        if "compile" not in args.skip:
            check_json = work / "compile-check.json"
            archs = sorted(set(args.arch or (80, 90)))
            rc, out, seconds = steps.run("compile-check", [python, "-m", "fastgpt.verify.triton_compile",
                                                           f"--jobs={args.jobs}", f"--json={check_json}",
                                                           *(f"--arch={a}" for a in archs)], check=False)
            entry["compile_check"] = {**made_by, "rc": rc, "archs": archs,
                                      **(compile_summary(json.loads(check_json.read_text()))
                                         if check_json.is_file() else {"output_tail": out[-2000:]})}
        ok = entry_ok(entry)
    except StepFailed as e:
        entry["error"] = {**made_by, "message": str(e).splitlines()[0]}
        print(f"FAIL {e}", file=sys.stderr)
    finally:
        write_entry(args.out, entry)
        print(json.dumps(entry, indent=1))
        print(f"{'OK' if ok else 'FAILED'}: triton {args.triton}; entry written to {args.out}")
        if not args.keep_venv:
            shutil.rmtree(venv, ignore_errors=True)
        if ok:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
