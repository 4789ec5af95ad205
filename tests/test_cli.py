"""The `fastgpt` command end to end on a small corpus."""

import json
import subprocess
import sys
import textwrap

import pytest

from fastgpt.cli import main
from fastgpt.verify.parity import ALL_SHAPES

SMALL_RUN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
             "--eval-iters", "2", "--eval-interval", "10", "--no-progress", "--no-decay-lr"]


def test_train_resume_and_sample(small_corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--preset", "cpu", "--data", str(small_corpus), "--out-dir", out, "--max-iters", "20",
                 "--sample-tokens", "30", "--backend", "naive", *SMALL_RUN]) == 0
    printed = capsys.readouterr().out
    assert "attention backend 'naive' -> kernel path naive" in printed
    assert "step 20: train loss" in printed
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 10, 20]

    # --resume continues the same run, here with a later end and another attention backend
    assert main(["train", "--resume", "--out-dir", out, "--max-iters", "30", "--backend", "sdpa", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resuming at iteration 20 of 30" in printed and "-> kernel path sdpa" in printed
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["backend"]) for r in records] == [(0, "naive"), (10, "naive"), (20, "naive"), (30, "sdpa")]

    assert main(["sample", "--out-dir", out, "--prompt", "To be", "--max-new-tokens", "25", "--seed", "0",
                 "--temperature", "0.8", "--top-k", "5"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("To be") and len(captured.out.rstrip("\n")) >= 5 + 20
    # --linear auto: timed here, so either kernel; the message says which ran and why
    assert "tokens/s, KV cache, exact policy, linear kernel " in captured.err
    assert "--linear auto chose " in captured.err and "at one row (a decode step), median here: torch " in captured.err
    # the cache and the linear kernel change the speed, not the text (block_size 16: the 30
    # characters cross it)
    assert main(["sample", "--out-dir", out, "--prompt", "To be", "--max-new-tokens", "25", "--seed", "0",
                 "--temperature", "0.8", "--top-k", "5", "--no-kv-cache", "--linear", "torch"]) == 0
    uncached = capsys.readouterr()
    assert uncached.out == captured.out and "no KV cache, linear kernel torch (F.linear)" in uncached.err


def test_train_with_mixed_precision_accumulation_and_a_peak_for_mfu(small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_corpus), "--out-dir", str(out), "--max-iters", "2", "--sample-tokens", "0",
                 "--dtype", "bf16", "--gradient-accumulation-steps", "2", "--peak-tflops", "1", "--backend", "sdpa",
                 *SMALL_RUN]) == 0
    printed = capsys.readouterr().out
    assert "dtype bf16" in printed and "128 tokens per step (2 micro-batches of 4 × 16)" in printed
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["iter"] == 2 and 0 < last["mfu_estimate"] < 1


def test_sample_with_unknown_prompt_characters_says_what_to_use(small_corpus, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--data", str(small_corpus), "--out-dir", out, "--max-iters", "1", "--sample-tokens", "0",
                 *SMALL_RUN]) == 0
    capsys.readouterr()
    assert main(["sample", "--out-dir", out, "--prompt", "Zebra!"]) == 2
    err = capsys.readouterr().err
    assert "not in the model's vocabulary: '!Z'" in err and "use only these" in err


def test_sample_from_a_bigram_model(small_corpus, tmp_path, capsys):
    # no attention and no linear layers: the cache and --linear auto have nothing to do, and say so
    out = str(tmp_path / "bigram")
    assert main(["train", "--preset", "bigram", "--data", str(small_corpus), "--out-dir", out, "--max-iters", "1",
                 "--eval-iters", "1", "--sample-tokens", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sample", "--out-dir", out, "--prompt", "To", "--max-new-tokens", "12", "--seed", "0"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("To") and len(captured.out) == 2 + 12 + 1  # the prompt, 12 characters, a newline
    assert "--linear auto chose torch: the model has no linear layers (BigramLanguageModel)" in captured.err


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "/no/such/corpus.txt", "--max-iters", "1"], "corpus file '/no/such/corpus.txt' does not exist"),
    (["train", "--n-head", "5", "--n-embd", "16"], "n_embd=16 must be divisible by n_head=5"),
    (["train", "--backend", "flash9", "--max-iters", "1"], "backend='flash9' is not a known attention backend"),
    (["sample", "--out-dir", "/no/such/run"], "no checkpoint at '/no/such/run/ckpt.pt'"),
    (["train", "--dtype", "fp8", "--max-iters", "1"], "dtype must be one of bf16, fp16, fp32; got 'fp8'"),
])
def test_bad_input_is_one_clear_error(argv, message, small_corpus, tmp_path, capsys):
    argv = [*argv, "--out-dir", str(tmp_path)] if argv[0] == "train" else argv
    if argv[0] == "train" and "--data" not in argv:
        argv += ["--data", str(small_corpus)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_parity_command_passes_for_cpu_backends():
    # A real process, as a user runs it: the exit status is the verdict.
    proc = subprocess.run([sys.executable, "-m", "fastgpt", "parity", "--backends", "naive", "sdpa", "--dtypes", "float32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # both take grouped-query calls: every shape, grouped-query ones included, checked and passed
    assert proc.stdout.count(" ok") == 2 * len(ALL_SHAPES) and "all passed" in proc.stdout


def test_parity_checks_a_kernel_path_by_name(capsys):
    # every kernel path is a name the registry knows: parity checks ext's packed ops alone, and a
    # path that cannot take a dtype says so on its row
    assert main(["parity", "--backends", "ext.cpu_packed", "ext.cpu_flash_amx", "--dtypes", "float32", "bfloat16"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("ext.cpu_")]
    assert sum(line.startswith("ext.cpu_packed") and line.endswith(" ok") for line in rows) == 2 * len(ALL_SHAPES)
    assert any(line.startswith("ext.cpu_flash_amx ") and "not supported: bfloat16 only" in line for line in rows)


def test_check_command_runs_the_triton_then_the_cuda_compile_check(capfd):
    # One narrow slice of each check (the full ones: tests/test_triton_compile_check.py,
    # tests/test_cuda_compile_check.py). Under the interpreter the Triton check re-runs itself in a
    # fresh process: read the file descriptors.
    assert main(["check", "--arch", "80", "--dtype", "fp16", "--head-dim", "64"]) == 0
    out = capfd.readouterr().out
    # the Triton table, then the CUDA kernels' (absent, with a reason, without nvcc)
    triton_out, _, cuda_out = out.partition("cuda kernel ")
    rows = [line for line in triton_out.splitlines() if line.endswith(" ok")]
    assert "0 failed" in triton_out and rows and all(" sm_80 " in row and " 16-bit " in row for row in rows)
    cuda_rows = [line for line in cuda_out.splitlines() if line.endswith(" ok")]
    assert not cuda_out or ("0 failed" in cuda_out and cuda_rows and all(" sm_80 " in row for row in cuda_rows))


def test_check_help_names_both_checks_and_their_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in ("triton_compile", "cuda_compile", "--arch", "--dtype", "--head-dim", "--jobs", "--full"):
        assert name in text, name


@pytest.mark.parametrize("triton_status, cuda_status", [(0, 1), (1, 0), (2, 0)])
def test_check_fails_when_either_check_fails(monkeypatch, triton_status, cuda_status):
    from fastgpt.verify import cuda_compile as cuda_compile_check
    from fastgpt.verify import triton_compile as triton_compile_check

    monkeypatch.setattr(triton_compile_check, "run", lambda options: triton_status)
    monkeypatch.setattr(cuda_compile_check, "run", lambda archs: cuda_status)
    assert main(["check"]) == max(triton_status, cuda_status)


@pytest.mark.parametrize("argv, not_loaded, printed", [
    (["train", "--help"], "fastgpt.bench", "usage: fastgpt train"),
    # refused after the trainer is imported: the whole path of `fastgpt train` up to the run
    (["train", "--allow-corpus-change"], "fastgpt.bench", "applies only with --resume"),
    (["info", "--json"], "fastgpt.run.trainer", '"kernel_paths"'),
    (["check", "--help"], "fastgpt.run.trainer", "usage: fastgpt check"),
])
def test_a_command_imports_only_what_it_needs(argv, not_loaded, printed):
    # A fresh process: sys.modules then holds what this command loaded, and nothing another test did.
    code = textwrap.dedent(f"""
        import sys
        from fastgpt.cli import main
        try:
            main({argv!r})
        except SystemExit:  # --help
            pass
        loaded = sorted(m for m in sys.modules if m == {not_loaded!r} or m.startswith({not_loaded + '.'!r}))
        print("loaded:", loaded)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and printed in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1] == "loaded: []", proc.stdout.splitlines()[-1]
