"""`fastgpt gpu-report`: the GPU half of fastgpt proven in one prepared call, stage by stage.

    fastgpt gpu-report --out-dir DIR [--dry-run] [--budget parity=120 ...] [--stages parity attention]

A GPU may be at hand only briefly, with no time to debug on it, so every stage runs in a child
process under its own time budget (STAGES holds the defaults): a crash (an illegal memory
access poisons the CUDA context), a hang or a timeout ends that stage only, is recorded with the
tail of its output, and the next stage runs anyway. DIR/report.json is rewritten after every
stage, so a run cut short still leaves what it had; at the end DIR/report.md and the plots are
drawn from it. DIR/report.log holds every stage's output. Few small files: the device tool brings
back at most 8.

The stages themselves are in gpu_stages.py. `--dry-run` runs them on CPU with stand-ins (Triton's
interpreter, tiny shapes, the CUDA emulation in place of compute-sanitizer, a few training steps),
so the plumbing, the report and the plots are proven without a GPU.

On a GPU machine with its own python3, torch and triton and no network, from the repository root:

    FASTGPT_NO_AOT=1 python3 -m pip install -q --no-deps --no-build-isolation -e . \\
        && python3 -m fastgpt gpu-report --out-dir "$OUT"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from fastgpt.run.atomic_file import replace_atomically
from fastgpt.bench.report import prepare_out_dir

# Stage name -> default budget in seconds, in the order they run: each stage may use what the
# ones before it left behind (the built extension, Triton's compiled kernels on disk).
STAGES: dict[str, float] = {
    "environment": 15,
    "build": 120,
    "parity": 90,
    "sanitizer": 45,
    "attention": 110,
    "training": 120,
    "generation": 10,
}
REPORT_JSON, REPORT_MD, REPORT_LOG = "report.json", "report.md", "report.log"
OUTPUT_TAIL_CHARS = 4000  # of a failed stage's output, kept in report.json
# A stage past its budget gets SIGTERM, which the child turns into SystemExit so its `finally`
# blocks run (torch releases the extension's build lock in one); whatever is left of its process
# group this many seconds later gets SIGKILL.
KILL_GRACE_S = 5.0


def _stage_command(name: str, context_path: Path) -> list[str]:
    return [sys.executable, "-m", "fastgpt.bench.gpu_report", "--run-stage", name, "--context", str(context_path)]


def run_stage_in_child(name: str, context: dict[str, Any], work_dir: Path, log) -> dict[str, Any]:
    """Runs stage `name` in a child process within its budget; returns its entry for report.json:
    status ok / failed / timeout, seconds, and the stage's result (or the tail of its output)."""
    context_path = work_dir / f"{name}.context.json"
    result_path = work_dir / f"{name}.result.json"
    result_path.unlink(missing_ok=True)
    context_path.write_text(json.dumps({**context, "stage": name, "result_path": str(result_path)}))
    env = dict(os.environ)
    if context["dry_run"]:
        env["TRITON_INTERPRET"] = "1"  # read when triton is imported: the child starts with it
    start = time.perf_counter()
    log.write(f"\n===== stage {name} (budget {context['budget_s']:.0f} s) =====\n")
    log.flush()
    # The child's output goes to the log as it comes; a new session, so a timeout kills its children too.
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen(_stage_command(name, context_path), stdout=output, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, text=True)
        try:
            proc.wait(timeout=context["budget_s"])
            status = "ok" if proc.returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            ended_by = _end_session(proc, KILL_GRACE_S)
            status = "timeout"
        output.seek(0)
        text = output.read()
    log.write(text)
    log.flush()
    entry: dict[str, Any] = {"name": name, "status": status, "seconds": round(time.perf_counter() - start, 1),
                             "budget_s": context["budget_s"]}
    if result_path.is_file():  # a stage writes its result as it goes: a timeout keeps what was done
        entry["result"] = json.loads(result_path.read_text())
    if status != "ok":
        entry["output_tail"] = text[-OUTPUT_TAIL_CHARS:]
        if status == "failed":
            entry["exit_code"] = proc.returncode
        else:
            entry["ended_by"] = ended_by
    return entry


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # none of the group is left
        pass


def _end_session(proc: subprocess.Popen, grace_s: float) -> str:
    """Ends the stage's whole process group (the child, and its compilers and workers): SIGTERM,
    then, once the child has exited or `grace_s` has passed, SIGKILL for whatever is left. Returns
    what ended the child, for the report."""
    import signal

    _signal_group(proc.pid, signal.SIGTERM)
    ended_by = f"SIGKILL ({grace_s:g} s after SIGTERM)"
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        # WNOWAIT: the exited child stays unreaped, so its id (the group's) cannot be reused before the SIGKILL
        if os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            ended_by = "SIGTERM"
            break
        time.sleep(0.05)
    _signal_group(proc.pid, signal.SIGKILL)
    proc.wait()
    return ended_by


def write_json(path: Path, report: dict[str, Any]) -> None:
    data = json.dumps(report, indent=1, allow_nan=False).encode()
    replace_atomically(path, lambda f: f.write(data))


def run_report(out_dir: Path, dry_run: bool, budgets: dict[str, float], stages: list[str],
               command: str = "") -> dict[str, Any]:
    """Every stage of `stages` in order, report.json rewritten after each; then report.md and plots."""
    from fastgpt.bench import gpu_report_render

    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dry_run": dry_run, "command": command,
                              "budgets_s": {name: budgets[name] for name in stages}, "stages": []}
    with tempfile.TemporaryDirectory(prefix="fastgpt-gpu-report-") as tmp, open(out_dir / REPORT_LOG, "w") as log:
        work_dir = Path(tmp)
        for name in stages:
            context = {"dry_run": dry_run, "budget_s": budgets[name], "work_dir": str(work_dir),
                       "out_dir": str(out_dir), "earlier": report["stages"]}
            entry = run_stage_in_child(name, context, work_dir, log)
            report["stages"].append(entry)
            write_json(out_dir / REPORT_JSON, report)
            print(f"fastgpt gpu-report: {name}: {entry['status']} in {entry['seconds']:.0f} s "
                  f"(budget {budgets[name]:.0f} s)", flush=True)
    files = gpu_report_render.render(report, out_dir)
    report["files"] = sorted(p.name for p in [out_dir / REPORT_JSON, out_dir / REPORT_LOG, *files])
    write_json(out_dir / REPORT_JSON, report)
    return report


def _parse_budgets(items: Optional[list[str]]) -> dict[str, float]:
    budgets = dict(STAGES)
    for item in items or []:
        name, _, seconds = item.partition("=")
        if name not in STAGES:
            raise ValueError(f"--budget {item}: {name!r} is not a stage; stages: {', '.join(STAGES)}")
        try:
            value = float(seconds)
        except ValueError:
            value = float("nan")
        if not 0 < value < float("inf"):
            raise ValueError(f"--budget {item}: the budget must be a number of seconds > 0; got {seconds!r}")
        budgets[name] = value
    return budgets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default="gpu_report", help="where report.json, report.md, the log and plots go")
    parser.add_argument("--dry-run", action="store_true",
                        help="the same stages on CPU with stand-ins (interpreter, tiny shapes): proves the plumbing")
    parser.add_argument("--budget", action="append", metavar="STAGE=SECONDS",
                        help="a stage's time budget (repeatable); defaults: "
                             + ", ".join(f"{k}={v:g}" for k, v in STAGES.items()))
    parser.add_argument("--stages", nargs="+", choices=list(STAGES), default=None,
                        help="run only these stages (default: all, in order)")


def main(args: argparse.Namespace) -> int:
    """`fastgpt gpu-report`; exit status 1 if a stage did not finish ok."""
    budgets = _parse_budgets(args.budget)
    stages = [name for name in STAGES if args.stages is None or name in args.stages]
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"gpu-report needs a CUDA GPU and this torch ({torch.__version__}) sees none; "
                             "--dry-run runs the same stages on CPU with stand-ins")
    out_dir = prepare_out_dir(args.out_dir)  # before the stages: a report that cannot be written is lost
    print(f"fastgpt gpu-report: {len(stages)} stages, {sum(budgets[s] for s in stages):.0f} s of budget"
          f"{' (dry run on CPU)' if args.dry_run else ''}; writing {out_dir / REPORT_JSON} after each", flush=True)
    command = " ".join(["fastgpt gpu-report --out-dir", str(out_dir), *(["--dry-run"] if args.dry_run else []),
                        *(f"--budget {b}" for b in args.budget or []), *(["--stages", *args.stages] if args.stages else [])])
    report = run_report(out_dir, args.dry_run, budgets, stages, command)
    bad = [s["name"] for s in report["stages"] if s["status"] != "ok"]
    print(f"fastgpt gpu-report: {len(stages) - len(bad)} of {len(stages)} stages ok"
          f"{'; not ok: ' + ', '.join(bad) if bad else ''}; wrote {', '.join(report['files'])} in {out_dir}")
    return 1 if bad else 0


def _exit_on_sigterm() -> None:
    """SIGTERM (the budget's end) raises SystemExit, so the stage's `finally` blocks run: a build
    cut short releases its lock rather than leaving it to hang the stages after it."""
    import signal

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _run_stage_here(context_path: str) -> int:
    """The child's side: run one stage, writing its result file as it goes."""
    from fastgpt.bench import gpu_stages

    context = gpu_stages.StageContext.load(context_path)
    gpu_stages.STAGE_FUNCTIONS[context.stage](context)
    return 0


def child_main(argv: Optional[list[str]] = None) -> int:
    """`python -m fastgpt.bench.gpu_report --run-stage NAME --context PATH`: one stage."""
    _exit_on_sigterm()
    child = argparse.ArgumentParser()
    child.add_argument("--run-stage", required=True)
    child.add_argument("--context", required=True)
    return _run_stage_here(child.parse_args(argv).context)


if __name__ == "__main__":
    sys.exit(child_main())
