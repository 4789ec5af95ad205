"""`fastgpt gpu-report`: the dry run on CPU proves the stages, the report and the plots; a stage that
runs out of its budget is recorded and the next one still runs."""

import json

import pytest
import torch

from fastgpt.bench.gpu_report import STAGES
from fastgpt.cli import main


def strict_json(path):
    def refuse(token):
        raise ValueError(f"{path} holds {token}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_dry_run_reports_every_stage(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["gpu-report", "--dry-run", "--out-dir", str(out)]) == 0
    report = strict_json(out / "report.json")
    assert [s["name"] for s in report["stages"]] == list(STAGES)
    assert all(s["status"] == "ok" for s in report["stages"]), [(s["name"], s.get("output_tail")) for s in report["stages"]]
    stages = {s["name"]: s["result"] for s in report["stages"]}
    assert stages["environment"]["torch"] == torch.__version__
    assert stages["build"]["kind"] in ("jit", "aot")
    assert stages["parity"]["checks_passed"] > 0 and not stages["parity"]["failures"]
    assert {t["backend"] for t in stages["parity"]["tasks"]} >= {"naive", "sdpa"}
    layouts = {s["shape"][0] for t in stages["parity"]["tasks"] for s in t["shapes"]
               if isinstance(s["shape"][0], str) and s["status"] == "ok"}
    assert layouts == {"varlen", "paged"}  # packed sequences and a paged cache, besides (B, H, T, D)
    assert stages["attention"]["sweeps"]["smoke"]["records"]
    assert stages["training"]["full_run"]["curve"] and stages["training"]["fastest"]
    assert any(r["status"] == "ok" for r in stages["generation"]["records"])
    # few files, all small: the device tool brings back at most 8
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(report["files"]) and len(files) <= 8
    assert {"report.json", "report.md", "report.log", "training.png"} <= set(files)
    assert any(name.startswith("attention_smoke") and name.endswith(".png") for name in files)
    md = (out / "report.md").read_text()
    assert "dry run on CPU" in md and all(f"## {name}" in md for name in STAGES)
    assert "7 of 7 stages ok" in capsys.readouterr().out


def test_a_stage_over_its_budget_is_recorded_and_the_next_one_runs(tmp_path):
    out = tmp_path / "report"
    # environment imports torch: far more than 0.2 s
    assert main(["gpu-report", "--dry-run", "--out-dir", str(out), "--stages", "environment", "build",
                 "--budget", "environment=0.2"]) == 1
    report = strict_json(out / "report.json")
    first, second = report["stages"]
    assert (first["name"], first["status"], first["budget_s"]) == ("environment", "timeout", 0.2)
    assert "output_tail" in first
    assert (second["name"], second["status"]) == ("build", "ok")
    assert "| environment | timeout |" in (out / "report.md").read_text()


@pytest.mark.parametrize("argv, says", [
    (["--budget", "parity"], "--budget parity: the budget must be a number of seconds > 0; got ''"),
    (["--budget", "paritee=3"], "--budget paritee=3: 'paritee' is not a stage; stages: environment, build"),
    (["--budget", "parity=-1"], "--budget parity=-1: the budget must be a number of seconds > 0; got '-1'"),
])
def test_bad_budgets_are_one_clear_error(argv, says, tmp_path, capsys):
    assert main(["gpu-report", "--dry-run", "--out-dir", str(tmp_path), *argv]) == 2
    assert says in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_a_gpu_it_says_so_and_points_to_the_dry_run(tmp_path, capsys):
    assert main(["gpu-report", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "gpu-report needs a CUDA GPU" in err and "--dry-run" in err and "Traceback" not in err


# A stand-in for the child of two stages: "environment" overruns its budget holding a lock it releases
# in a `finally` (as torch's extension build holds its lock) and with a grandchild running (as ninja
# and nvcc run under a build); "build" finishes at once.
STAND_IN_STAGES = """
import pathlib, subprocess, sys, time
from fastgpt.bench import gpu_report, gpu_stages

def overrun(ctx):
    grandchild = subprocess.Popen(["sleep", "300"])
    lock = ctx.out_dir / "lock"
    lock.write_text("held")
    ctx.save(grandchild=grandchild.pid)
    try:
        time.sleep(300)
    finally:
        lock.unlink()

def quick(ctx):
    ctx.save(ran=True)

gpu_stages.STAGE_FUNCTIONS.update(environment=overrun, build=quick)
sys.exit(gpu_report.child_main(sys.argv[1:]))
"""


def _running(pid: int, within_s: float = 5.0) -> bool:
    """Whether process `pid` still runs `within_s` after a kill was sent (a signal is delivered
    asynchronously; a zombie, dead and not yet reaped, does not run)."""
    import time

    deadline = time.monotonic() + within_s
    while True:
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.02)


def test_a_stage_cut_at_its_budget_runs_its_finally_and_its_children_die(tmp_path, monkeypatch):
    import sys

    from fastgpt.bench import gpu_report

    monkeypatch.setattr(gpu_report, "_stage_command", lambda name, context: [
        sys.executable, "-c", STAND_IN_STAGES, "--run-stage", name, "--context", str(context)])
    out = tmp_path / "report"
    # 6 s: the stand-in imports fastgpt (torch) in about 2 before it starts the stage
    assert main(["gpu-report", "--dry-run", "--out-dir", str(out), "--stages", "environment", "build",
                 "--budget", "environment=6"]) == 1
    first, second = strict_json(out / "report.json")["stages"]
    assert (first["status"], first["ended_by"]) == ("timeout", "SIGTERM"), first
    assert not (out / "lock").exists()  # released: the stages after it would have waited on it
    assert not _running(first["result"]["grandchild"])
    assert (second["name"], second["status"], second["result"]) == ("build", "ok", {"ran": True})
    assert "**timeout** at its 6 s budget, ended by SIGTERM" in (out / "report.md").read_text()


def test_a_stage_that_ignores_sigterm_is_killed_with_its_process_group(tmp_path):
    import subprocess
    import sys
    import time

    from fastgpt.bench.gpu_report import _end_session

    pid_file = tmp_path / "grandchild"
    code = ("import signal, subprocess, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"open({str(pid_file)!r}, 'w').write(str(subprocess.Popen(['sleep', '300']).pid))\n"
            "time.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    assert _end_session(proc, grace_s=0.5) == "SIGKILL (0.5 s after SIGTERM)"
    assert proc.returncode == -9 and not _running(grandchild)


def test_the_environment_stage_records_numpy(tmp_path):
    import numpy

    from fastgpt.bench.gpu_stages import StageContext, stage_environment

    ctx = StageContext(stage="environment", dry_run=True, budget_s=60, work_dir=tmp_path, out_dir=tmp_path,
                       result_path=tmp_path / "environment.json")
    stage_environment(ctx)
    recorded = json.loads((tmp_path / "environment.json").read_text())
    assert recorded["numpy"] == numpy.__version__ and recorded["triton"]


def test_the_report_lists_the_triton_configs_that_spilled_there(monkeypatch):
    from fastgpt.bench import gpu_report_render

    monkeypatch.setattr(gpu_report_render, "attention_markdown", lambda sweep: "(table)")
    spills = [{"kernel": "fwd", "call": "D=96 dropout=True float16 sm_90", "config": "M64/N64/w4/s3",
               "local_bytes": 48, "dropped": True},
              {"kernel": "bwd_dkdv", "call": "D=256 dropout=False float32 sm_90", "config": "M16/N16/w8/s2",
               "local_bytes": 8, "dropped": False}]
    text = "\n".join(gpu_report_render._attention({"sweeps": {"bf16": {"records": [], "triton_spills": spills}}}))
    (line,) = [x for x in text.splitlines() if x.startswith("Triton configs that spilled here")]
    assert "fwd D=96 dropout=True float16 sm_90 M64/N64/w4/s3 (48 B, dropped)" in line
    assert "M16/N16/w8/s2 (8 B, kept: every config spilled)" in line
