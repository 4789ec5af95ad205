"""`fastgpt gpu-report`: the dry run on CPU proves the stages, the report and the plots; a stage that
runs out of its budget is recorded and the next one still runs."""

import json

import pytest
import torch

from fastgpt.benchmarks.gpu_report import STAGES
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
