"""The training profile (`fastgpt bench train --profile`), the phase timer under it, and the
nanoGPT comparison's command: structure and bookkeeping, never speed."""

import time
from pathlib import Path

import pytest

from fastgpt.bench.train_profile import profile_markdown, run_train_profile
from fastgpt.benchmarks.vs_nanogpt import VAL_LOSS, nanogpt_command
from fastgpt.cli import main
from fastgpt.run.phase_timer import PhaseTimer
from fastgpt.run.trainer import PHASES


def test_phase_timer_off_records_nothing_and_on_adds_up():
    off = PhaseTimer("cpu")
    with off("forward"):
        time.sleep(0.01)
    assert off("forward") is off("backward")  # one shared do-nothing context
    assert dict(off.seconds) == {} and dict(off.calls) == {}
    on = PhaseTimer("cpu", enabled=True)
    for _ in range(2):
        with on("forward"):
            time.sleep(0.01)
    assert on.calls["forward"] == 2 and on.seconds["forward"] >= 0.02
    with pytest.raises(KeyError):  # a phase that raises is still counted, and the error passes through
        with on("data"):
            raise KeyError("boom")
    assert on.calls["data"] == 1


def test_train_profile_counts_every_phase_of_the_run(small_corpus):
    # 3 iterations, evaluated at 0, 2 and 3 (the end): each evaluation writes a checkpoint
    result = run_train_profile("cpu", "cpu", max_iters=3, data=str(small_corpus), backend="sdpa",
                               overrides={"eval_interval": 2, "eval_iters": 1, "sample_tokens": 5}, profiled_steps=2)
    calls = {r["phase"]: r["calls"] for r in result["records"]}
    assert list(calls) == [*PHASES, "rest of the loop"]
    assert calls == {"data": 3, "forward": 3, "backward": 3, "optimizer": 3, "evaluate": 3, "checkpoint": 3,
                     "finish": 1, "rest of the loop": None}
    assert sum(r["wall_s"] for r in result["records"]) == pytest.approx(result["wall_s"])
    assert all(r["wall_s"] > 0 for r in result["records"] if r["phase"] != "rest of the loop")
    assert result["backend"] == "sdpa" and result["max_iters"] == 3
    profiled = result["profiled_steps"]
    assert profiled["steps"] == 2 and 0 < profiled["in_ops_share"]["backward"] <= 1
    assert profiled["top_ops"] and all(op["self_ms_per_step"] > 0 for op in profiled["top_ops"])
    table = profile_markdown(result)
    assert "| forward | 3 |" in table and "| rest of the loop |  |" in table and "**2 more steps under torch.profiler**" in table


def test_bench_train_profile_takes_one_backend(capsys):
    assert main(["bench", "train", "--profile", "--backends", "naive", "sdpa"]) == 2
    assert "--profile runs one attention backend; --backends names 2: naive sdpa" in capsys.readouterr().err


def test_nanogpt_command_takes_the_preset_values():
    cmd = nanogpt_command(Path("/x/nanoGPT"), "/tmp/out", None)
    assert cmd[1:5] == ["/x/nanoGPT/train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False"]
    for flag in ("--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--dropout=0.0",
                 "--max_iters=2000", "--lr_decay_iters=2000", "--eval_iters=20", "--learning_rate=0.001",
                 "--out_dir=/tmp/out"):
        assert flag in cmd
    assert "--max_iters=30" in nanogpt_command(Path("/x"), "/o", 30)
    # the line both programs print at an evaluation
    assert VAL_LOSS.findall("step 2000: train loss 1.6000, val loss 1.7512\n") == [("2000", "1.7512")]
