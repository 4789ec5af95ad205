"""Bad input to `fastgpt bench`, `fastgpt gpu-report` and `fastgpt parity` is refused in one line
before any work: a device this torch cannot compute on, an out-dir that cannot take the results
(checked before the sweep, so a sweep is never run only to be lost), flags the sweep cannot honour."""

import os
import shutil
import subprocess

import pytest
import torch

from fastgpt.cli import main
from test_cli_refusals import one_line_error

# The function each kind of `fastgpt bench` does its work in: refusals must come before it runs.
WORK = {
    "attention": ("fastgpt.bench.attention", "run_attention_benchmark", []),
    "generate": ("fastgpt.bench.generate", "run_generate_benchmark", []),
    "train": ("fastgpt.bench.train", "run_train_benchmark", []),
    "profile": ("fastgpt.bench.train_profile", "run_train_profile", ["--profile"]),
}


def bench_argv(kind: str, *flags) -> list[str]:
    what = "train" if kind == "profile" else kind
    return ["bench", what, *WORK[kind][2], "--no-progress", *map(str, flags)]


@pytest.fixture()
def no_work(monkeypatch):
    """Every benchmark's work function, and gpu-report's stages, fail the test if they run."""
    import importlib

    def ran(*args, **kwargs):
        raise AssertionError("the work ran before the refusal")

    for module, function, _ in WORK.values():
        monkeypatch.setattr(importlib.import_module(module), function, ran)
    monkeypatch.setattr(importlib.import_module("fastgpt.bench.gpu_report"), "run_stage_in_child", ran)


@pytest.fixture()
def read_only_dir(tmp_path):
    """A folder on a read-only bind mount: writing there fails with EROFS, for root too (root
    ignores a chmod). Unmounted afterwards."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root and mount(8)")
    for argv in (["mount", "--bind", str(path), str(path)], ["mount", "-o", "remount,ro,bind", str(path)]):
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode != 0:
            subprocess.run(["umount", str(path)], capture_output=True)
            pytest.skip(f"cannot make a read-only bind mount here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ---- the device ------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("kind", ["attention", "generate", "train"])
def test_bench_on_cuda_without_cuda_is_one_line_before_work(kind, no_work, tmp_path, capsys):
    assert main(bench_argv(kind, "--device", "cuda", "--out-dir", tmp_path / "out")) == 2
    line = one_line_error(capsys)
    assert "--device cuda: this torch" in line and "sees no CUDA GPU; use --device cpu" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("device, says", [
    ("meta", "--device meta: the meta device holds shapes but no values"),
    ("xyz", "--device xyz: not a device this torch knows"),
])
def test_bench_refuses_devices_it_cannot_measure_on(device, says, no_work, tmp_path, capsys):
    assert main(bench_argv("attention", "--device", device, "--out-dir", tmp_path / "out")) == 2
    assert says in one_line_error(capsys)


@pytest.mark.parametrize("device, says", [
    ("meta", "--device meta: the meta device holds shapes but no values"),
    ("xyz", "--device xyz: not a device this torch knows"),
    ("xpu", "--device xpu: this torch cannot compute there"),
])
def test_parity_refuses_devices_it_cannot_check_on(device, says, capsys):
    if device == "xpu" and torch.xpu.is_available():
        pytest.skip("this machine has an XPU")
    assert main(["parity", "--device", device, "--backends", "naive"]) == 2
    assert says in one_line_error(capsys)


# ---- the out-dir -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(WORK))
def test_bench_out_dir_that_is_a_file_is_refused_before_the_sweep(kind, no_work, tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("kept")
    assert main(bench_argv(kind, "--out-dir", a_file)) == 2
    assert f"--out-dir {a_file}: a file is there, not a folder" in one_line_error(capsys)
    assert main(bench_argv(kind, "--out-dir", a_file / "below")) == 2
    assert f"--out-dir {a_file / 'below'}: cannot create or write this folder (Not a directory)" \
        in one_line_error(capsys)
    assert a_file.read_text() == "kept"


@pytest.mark.parametrize("kind", list(WORK))
def test_bench_read_only_out_dir_is_refused_before_the_sweep(kind, no_work, read_only_dir, capsys):
    for out in (read_only_dir, read_only_dir / "new"):
        assert main(bench_argv(kind, "--out-dir", out)) == 2
        assert f"--out-dir {out}: cannot create or write this folder (Read-only file system)" \
            in one_line_error(capsys)


def test_bench_empty_out_dir_is_refused(no_work, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(bench_argv("attention", "--out-dir", "")) == 2
    assert "--out-dir is empty" in one_line_error(capsys)
    assert list(tmp_path.iterdir()) == []


def test_gpu_report_out_dir_that_is_a_file_or_read_only_is_refused_first(no_work, read_only_dir, tmp_path, capsys):
    a_file = tmp_path / "report.txt"
    a_file.write_text("kept")
    for out, says in ((a_file, "a file is there, not a folder"),
                      (read_only_dir, "cannot create or write this folder (Read-only file system)"),
                      (read_only_dir / "new", "cannot create or write this folder (Read-only file system)")):
        assert main(["gpu-report", "--dry-run", "--out-dir", str(out)]) == 2
        assert f"--out-dir {out}: {says}" in one_line_error(capsys)
    assert main(["gpu-report", "--dry-run", "--out-dir", ""]) == 2
    assert "--out-dir is empty" in one_line_error(capsys)


def test_the_checked_out_dir_takes_the_results(tmp_path):
    from fastgpt.bench.report import prepare_out_dir, write_results

    out = prepare_out_dir(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []  # the probe leaves nothing behind
    files = write_results({"environment": {"device": "cpu"}, "records": [{"x": 1}]}, out, "r")
    assert files["json"].is_file()


# ---- flags the sweep cannot honour -----------------------------------------------------------------

@pytest.mark.parametrize("flags, says", [
    (["--tokens", "8"], "--tokens 8 is less than the longest --seq-lens 48"),
    (["--kv-heads", "3"], "--kv-heads 3 must divide the sweep's 2 heads"),
    (["--backends", "flash9"], "--backends flash9: 'flash9' is neither a backend nor a kernel path"),
    (["--backends", "naive", "auto"], "--backends auto: 'auto' chooses among the backends per call"),
])
def test_attention_flags_it_cannot_honour_are_refused_before_work(flags, says, no_work, tmp_path, capsys):
    assert main(bench_argv("attention", "--smoke", *flags, "--out-dir", tmp_path / "out")) == 2
    assert says in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind, flags, says", [
    ("train", ["--backends", "auto"], "--backends auto: 'auto' chooses among the backends per call"),
    ("train", ["--backends", "flash9"], "--backends flash9: 'flash9' is neither a backend nor a kernel path"),
    ("generate", ["--backends", "flash9"], "--backends flash9: 'flash9' is neither a backend nor a kernel path"),
    ("profile", ["--backends", "flash9"], "--backends flash9: 'flash9' is neither a backend nor a kernel path"),
])
def test_other_kinds_refuse_unknown_backends_before_work(kind, flags, says, no_work, tmp_path, capsys):
    assert main(bench_argv(kind, *flags, "--out-dir", tmp_path / "out")) == 2
    assert says in one_line_error(capsys)


@pytest.mark.parametrize("argv, says", [
    (["attention", "--linear", "torch"], "--linear applies to bench generate; bench attention would ignore it"),
    (["generate", "--seq-lens", "64"], "--seq-lens applies to bench attention; bench generate would ignore it"),
    (["train", "--smoke"], "--smoke applies to bench attention, generate; bench train would ignore it"),
    (["train", "--profile", "--reps", "3"],
     "--reps applies to bench attention, generate, train, packing, decode, cross-entropy; bench train --profile "
     "would ignore it"),
    (["attention", "--profile"], "--profile applies to bench train; bench attention would ignore it"),
])
def test_a_flag_the_kind_would_ignore_is_refused(argv, says, no_work, tmp_path, capsys):
    assert main(["bench", *argv, "--out-dir", str(tmp_path / "out")]) == 2
    assert says in one_line_error(capsys)
