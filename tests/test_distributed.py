"""DistributedDataParallel under torchrun: 2 CPU processes on gloo against 1 process that
accumulates gradients over the same global batch.

Each launch is a real `python -m torch.distributed.run --standalone` (a free rendezvous port) of
`fastgpt train`, on a model small enough that a launch takes a few seconds on 2 cores.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from fastgpt.run.checkpoint import load_checkpoint
from fastgpt.run.config import make_configs
from fastgpt.run.trainer import Trainer

# Dropout 0 where the runs are compared: each process draws its dropout masks from its own RNG
# stream (seed + rank), so one process accumulating over both micro-batches draws other masks than
# two processes do, and the losses would agree only in distribution. The batches, the gradient
# averaging and the optimizer are what these runs compare; test_dropout_training_runs_under_ddp
# covers dropout.
RUN = dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=4, gradient_accumulation_steps=2,
           eval_interval=1, eval_iters=2, dropout_p=0.0, backend="naive", decay_lr=False, sample_tokens=0,
           progress=False)


def flags(values: dict) -> list[str]:
    argv = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def torchrun(nproc: int, *train_args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "fastgpt", "train", *train_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)


def records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_match_one_process_with_accumulation_and_resume(small_corpus, tmp_path):
    # One process, 2 micro-batches per step, 4 steps uninterrupted.
    one_dir = tmp_path / "one"
    Trainer(*make_configs("cpu", {**RUN, "data": str(small_corpus), "out_dir": str(one_dir), "max_iters": 4})).run()

    # Two processes, 1 micro-batch each: 2 steps, then --resume to 4 under torchrun again.
    two_dir = tmp_path / "two"
    first = torchrun(2, "--preset", "cpu", *flags({**RUN, "data": small_corpus, "out_dir": two_dir, "max_iters": 2}))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "× 2 processes" in first.stdout
    resumed = torchrun(2, "--resume", "--out-dir", str(two_dir), "--max-iters", "4", "--no-progress")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming at iteration 2 of 4" in resumed.stdout

    # Rank 0 alone evaluates, prints and writes: one record and one line per evaluation.
    for proc, iters in ((first, [0, 1, 2]), (resumed, [3, 4])):
        assert [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith("step ")] == \
            [f"step {i}" for i in iters]
    assert [p.name for p in two_dir.iterdir() if p.name.startswith(".")] == []  # no temporary checkpoint left

    ones, twos = records(one_dir), records(two_dir)
    assert [r["iter"] for r in twos] == [r["iter"] for r in ones] == [0, 1, 2, 3, 4]
    loss_diff = max(abs(a[k] - b[k]) for a, b in zip(ones, twos) for k in ("train_loss", "val_loss", "step_loss")
                    if a[k] is not None)
    one_state, two_state = load_checkpoint(one_dir / "ckpt.pt"), load_checkpoint(two_dir / "ckpt.pt")
    param_diff = max((one_state["model"][k] - two_state["model"][k]).abs().max().item() for k in one_state["model"])
    print(f"2 processes vs 1 with accumulation: max |loss diff| {loss_diff:.3g}, max |param diff| {param_diff:.3g}")
    assert loss_diff < 1e-5 and param_diff < 1e-5  # the same steps, up to float summation order
    assert twos[-1]["val_loss"] < twos[0]["val_loss"] - 0.1  # and they are real steps
    assert two_state["iter"] == 4 and len(two_state["rng"]) == 2  # every process's RNG state, saved by rank 0


def test_dropout_training_runs_under_ddp(small_corpus, tmp_path):
    run = {**RUN, "data": small_corpus, "out_dir": tmp_path, "dropout_p": 0.2, "backend": "sdpa", "max_iters": 6,
           "eval_interval": 6}
    proc = torchrun(2, "--preset", "cpu", *flags(run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first, last = records(tmp_path)
    assert last["val_loss"] < first["val_loss"] - 0.1
    rng = load_checkpoint(tmp_path / "ckpt.pt")["rng"]
    assert not torch.equal(rng[0]["cpu"], rng[1]["cpu"])  # each process drew its own dropout masks


def test_global_batch_that_does_not_divide_by_the_world_size_is_one_clear_error(small_corpus, tmp_path):
    run = {**RUN, "data": small_corpus, "out_dir": tmp_path, "gradient_accumulation_steps": 3, "max_iters": 1}
    proc = torchrun(2, "--preset", "cpu", *flags(run))
    assert proc.returncode != 0
    # each process says it in one line (then torchrun reports the failed processes)
    message = ("fastgpt train: error: gradient_accumulation_steps=3 (micro-batches per step, over all processes) "
               "must be divisible by the world size 2")
    assert proc.stderr.count(message) == 2, proc.stderr
