"""The argument handling and result parsing of tests/triton_versions.py (the script itself installs
triton releases and is not run here), and that the triton range pyproject.toml claims is the one
its results file shows tested, both ends."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("triton_versions", Path(__file__).with_name("triton_versions.py"))
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: --triton"),
    (["--triton", "latest"], "'latest' is not a release number such as 3.6.0"),
    (["--triton", "3.6.0", "--numpy", "2.x"], "'2.x' is not a release number"),
    (["--triton", "3.6.0", "--jobs", "0"], "'0' is not an integer >= 1"),
    (["--triton", "3.6.0", "--skip", "everything"], "invalid choice: 'everything'"),
    (["--triton", "3.6.0", "--arch", "75"], "invalid choice: 75"),
])
def test_bad_arguments_are_refused_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_arguments_and_their_defaults():
    args = script.build_parser().parse_args(["--triton", "3.6.0", "--numpy", "2.3.5", "--jobs", "2"])
    assert (args.triton, args.numpy, args.jobs, args.torch) == ("3.6.0", ["2.3.5"], 2, "2.13.0")
    assert args.out == REPO / "benchmarks" / "results" / "triton_versions.json"
    assert args.report_stages == ["environment", "parity", "attention", "generation"] and args.skip == []
    assert args.arch is None  # the compile check's default: sm_80 and sm_90


def test_pytest_counts_read_the_summary_line():
    out = "....F.\n=== short test summary info ===\nFAILED tests/x.py::y\n1 failed, 91 passed, 2 warnings in 61.20s (0:01:01)\n"
    assert script.pytest_counts(out) == {"failed": 1, "passed": 91, "warning": 2}
    assert script.pytest_counts("92 passed in 3.1s\n") == {"passed": 92}
    assert script.pytest_counts("ImportError while loading conftest\n") == {}


def test_parity_counts_read_the_last_line():
    assert script.parity_counts("triton float32 ... ok\nfastgpt parity: 58 checks, all passed\n") == {"checks": 58, "failures": 0}
    assert script.parity_counts("fastgpt parity: 58 checks, 3 failure(s)\n") == {"checks": 58, "failures": 3}
    assert script.parity_counts("Traceback (most recent call last):\n") == {}


def test_report_stages_and_compile_summary():
    report = {"stages": [{"name": "environment", "status": "ok"}, {"name": "parity", "status": "timeout"}]}
    assert script.report_stages(report) == {"environment": "ok", "parity": "timeout"}
    row = dict(kernel="fwd", arch=90, dtype="fp16", head_dim=96, dropout=True, config="M64/N64/w4/s3",
               registers=255, shared_bytes=1024)
    check = {"summary": {"compilations": 3, "ok": 1, "dropped_at_run_time": 1, "failures": ["bwd_dq ...: every config spills"],
                         "seconds": 10},
             "results": [{**row, "spill_bytes": 48, "status": "dropped at run time"},
                         {**row, "arch": 80, "spill_bytes": 8, "status": "SPILL"},
                         {**row, "config": "M128/N64/w8/s3", "spill_bytes": 0, "status": "ok"}]}
    summary = script.compile_summary(check)
    assert summary["spilling"] == 2 and summary["spilling_by_arch"] == {"sm_80": 1, "sm_90": 1}
    assert summary["spills"][0] == "fwd sm_90 fp16 D=96 dropout=on M64/N64/w4/s3: 48 B (dropped at run time)"
    assert summary["failures"] == ["bwd_dq ...: every config spills"] and summary["dropped_at_run_time"] == 1


RUN = {"parity": {"rc": 0}, "tests": {"rc": 0}, "gpu_report": {"rc": 0}}


def test_a_rerun_replaces_the_steps_it_ran_and_keeps_the_others():
    results = {"written_by": "x", "versions": [{"triton": "3.9.0", "compile_check": {"rc": 1}, "error": {}},
                                               {"triton": "3.10.0"}]}
    merged = script.merge_entry(results, {"triton": "3.9.0", "interpreter": {"runs": [RUN]}})
    (entry,) = [e for e in merged["versions"] if e["triton"] == "3.9.0"]
    assert entry["compile_check"] == {"rc": 1} and "error" not in entry and not entry["ok"]
    merged = script.merge_entry(merged, {"triton": "3.9.0", "compile_check": {"rc": 0}})
    merged = script.merge_entry(merged, {"triton": "3.6.0"})
    assert [e["triton"] for e in merged["versions"]] == ["3.6.0", "3.9.0", "3.10.0"]
    assert merged["versions"][1] == {"triton": "3.9.0", "compile_check": {"rc": 0}, "interpreter": {"runs": [RUN]},
                                     "ok": True}
    assert merged["written_by"] == "x"


def test_an_entry_is_ok_only_when_every_step_passed():
    assert script.entry_ok({"interpreter": {"runs": [RUN]}, "compile_check": {"rc": 0}})
    assert not script.entry_ok({"interpreter": {"runs": [RUN, {**RUN, "tests": {"rc": 1}}]}, "compile_check": {"rc": 0}})
    assert not script.entry_ok({"interpreter": {"runs": [RUN]}, "compile_check": {"rc": 1}})
    assert not script.entry_ok({"error": {"message": "install failed"}})


def _triton_requirement() -> tuple[tuple[int, int], tuple[int, int]]:
    """(lowest, first excluded) minor release of pyproject's `triton>=A.B,<C.D` requirement."""
    text = (REPO / "pyproject.toml").read_text()
    m = re.search(r'"triton>=(\d+)\.(\d+),<(\d+)\.(\d+)[;"]', text)
    assert m, "pyproject.toml's triton requirement is no longer a closed range >=A.B,<C.D"
    a, b, c, d = map(int, m.groups())
    return (a, b), (c, d)


def test_the_triton_backend_names_the_same_range():
    from fastgpt.attention.triton_backend import TESTED_TRITON

    assert TESTED_TRITON == _triton_requirement()


def test_the_claimed_triton_range_is_the_tested_one():
    # the results file holds what tests/triton_versions.py found: the lowest claimed minor release
    # and the newest below the upper bound passed every step
    lowest, excluded = _triton_requirement()
    results = json.loads((REPO / "benchmarks" / "results" / "triton_versions.json").read_text())
    tested = {tuple(map(int, e["triton"].split(".")[:2])): e for e in results["versions"]}
    assert all(lowest <= v < excluded for v in tested), f"{sorted(tested)} outside the claimed {lowest}..<{excluded}"
    newest = max(tested)
    assert lowest in tested and newest[0] == excluded[0] and newest[1] == excluded[1] - 1, sorted(tested)
    for version in (lowest, newest):
        entry = tested[version]
        assert entry["ok"] and "interpreter" in entry and "compile_check" in entry, entry["triton"]


def test_write_entry_merges_into_the_results_file(tmp_path):
    path = tmp_path / "results" / "triton_versions.json"
    script.write_entry(path, {"triton": "3.9.0", "interpreter": {"runs": [RUN]}})
    script.write_entry(path, {"triton": "3.9.0", "compile_check": {"rc": 0}})
    (entry,) = json.loads(path.read_text())["versions"]
    assert entry["ok"] and set(entry) == {"triton", "interpreter", "compile_check", "ok"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["triton_versions.json"]
