"""A user's mistake on the command line is one clear line on stderr, never a traceback, and never
a report of success for work that was not done."""

import pytest
import torch

from fastgpt.cli import main

TINY_RUN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
            "--eval-iters", "1", "--max-iters", "1", "--sample-tokens", "0", "--no-progress"]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_parity_on_cuda_without_cuda(capsys):
    assert main(["parity", "--device", "cuda"]) == 2
    line = one_line_error(capsys)
    assert "--device cuda: this torch" in line and "sees no CUDA GPU; use --device cpu" in line


@pytest.mark.parametrize("name, says", [
    ("auto", "'auto' chooses among the backends per call"),
    ("flash9", "'flash9' is not a backend"),
])
def test_parity_names_only_real_backends(name, says, capsys):
    assert main(["parity", "--backends", name]) == 2
    line = one_line_error(capsys)
    assert says in line and "parity checks named backends and kernel paths: naive, sdpa" in line


def test_parity_that_checks_nothing_is_a_failure(capsys):
    # the CPU ext kernels have no float16 path: every shape is refused, so nothing was compared
    assert main(["parity", "--backends", "ext", "--dtypes", "float16"]) == 1
    out = capsys.readouterr().out
    assert "all passed" not in out and "FAILED: no check ran (ext in float16 on cpu)" in out


@pytest.mark.parametrize("flag, value, says", [
    ("--seq-lens", "0", "argument --seq-lens: must be an integer >= 1; got 0"),
    ("--reps", "0", "argument --reps: must be an integer >= 1; got 0"),
    ("--tokens", "-4", "argument --tokens: must be an integer >= 1; got -4"),
    ("--dropouts", "1", "argument --dropouts: must be in [0, 1); got 1.0"),
    ("--peak-flops", "nan", "argument --peak-flops: must be a finite number > 0; got nan"),
])
def test_bench_refuses_counts_it_cannot_time(flag, value, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "attention", flag, value])
    assert exit_info.value.code == 2
    assert says in one_line_error(capsys)


def test_a_directory_as_corpus(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out-dir", str(tmp_path / "run"), *TINY_RUN]) == 2
    assert f"corpus '{tmp_path}' is a directory (from --data)" in one_line_error(capsys)


def test_sample_checks_its_arguments_before_printing_the_prompt(small_corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(small_corpus), "--out-dir", out, *TINY_RUN]) == 0
    capsys.readouterr()
    for flags, says in ((["--temperature", "0"], "temperature must be a finite number > 0; got 0.0"),
                        (["--top-k", "0"], "top_k must be >= 1 or None; got 0"),
                        (["--max-new-tokens", "-1"], "max_new_tokens must be >= 0; got -1")):
        assert main(["sample", "--out-dir", out, "--prompt", "To be", "--linear", "torch", *flags]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # not even the prompt
        assert says in captured.err and "Traceback" not in captured.err
