"""How a run stops: a divergence ends it before the diverged weights are saved, Ctrl-C ends it in
one line naming the checkpoint; either way the last checkpoint loads."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import fastgpt.run.checkpoint
from fastgpt.run.checkpoint import load_checkpoint
from fastgpt.cli import main
from test_train import default_sigint, fastgpt_process, make_trainer, train_argv


@pytest.fixture()
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, whatever the suite was started
    under: a shell starts background jobs (`cmd &`, nohup) with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def strict_records(path) -> list[dict]:
    return [json.loads(line, parse_constant=lambda token: pytest.fail(f"non-standard JSON: {token}"))
            for line in path.read_text().splitlines()]


# lr 1e30: the first step already sends the loss to nan. An evaluation every 5 steps sees it first;
# one every 20 leaves it to the loss read every 10 steps for the progress bar.
@pytest.mark.parametrize("eval_interval, seen", [(5, "diverged at iteration 5 (train loss nan, val loss nan"),
                                                 (20, "diverged at iteration 10 (training loss nan)")])
def test_a_diverging_run_stops_with_its_last_good_checkpoint(eval_interval, seen, small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(small_corpus, out, max_iters=40, eval_interval=eval_interval, learning_rate=1e30, grad_clip=0.0,
                      backend="naive")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert seen in err and "ckpt.pt still holds iteration 0" in err and "--resume" in err and "Traceback" not in err
    state = load_checkpoint(out / "ckpt.pt")
    assert state["iter"] == 0
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    records = strict_records(out / "metrics.jsonl")
    assert [r["iter"] for r in records] == [0] and math.isfinite(records[0]["val_loss"])


def test_ctrl_c_stops_in_one_line_naming_the_checkpoint(small_corpus, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "fastgpt", *train_argv(small_corpus, out, max_iters=100_000, eval_interval=5,
                                                         backend="naive")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    deadline = time.monotonic() + 120
    while not (out / "ckpt.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    # one line about the stop; the "fastgpt: ..." lines before it are the log of the kernels chosen
    lines = [line for line in stderr.splitlines() if line.startswith("fastgpt") and not line.startswith("fastgpt: ")]
    assert len(lines) == 1, stderr
    match = re.fullmatch(r"fastgpt train: interrupted; (.*) holds iteration (\d+); continue with: "
                         r"fastgpt train --resume --out-dir (.*)", lines[0])
    assert match and match[3] == str(out), lines[0]
    assert load_checkpoint(out / "ckpt.pt")["iter"] == int(match[2])


@pytest.mark.parametrize("signum, status, said", [(signal.SIGINT, 130, "interrupted"),
                                                  (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_a_stop_during_a_checkpoint_write_finishes_the_write_then_stops(signum, status, said, small_corpus, tmp_path):
    out = tmp_path / "run"
    # The signal arrives inside torch.save's C++ writer, at its third write of the second checkpoint
    # (iteration 10): a KeyboardInterrupt raised there came out as "[enforce fail at
    # inline_container.cc:672]", and SIGTERM's default left the temporary file half written.
    stop_mid_second_save = f"""
        import os, signal, torch
        class Stopping:
            def __init__(self, f):
                self.f, self.writes = f, 0
            def write(self, data):
                self.writes += 1
                if self.writes == 3:
                    os.kill(os.getpid(), {int(signum)})
                return self.f.write(data)
            def flush(self):
                self.f.flush()
        real_save, calls = torch.save, []
        def save(obj, f):
            calls.append(f)
            real_save(obj, Stopping(f) if len(calls) == 2 else f)
        torch.save = save
    """
    proc = fastgpt_process(train_argv(small_corpus, out, max_iters=40, eval_interval=10, backend="naive"),
                           inject=stop_mid_second_save)
    assert proc.returncode == status, proc.stderr
    assert "Traceback" not in proc.stderr and "enforce fail" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == \
        f"fastgpt train: {said}; {out / 'ckpt.pt'} holds iteration 10; continue with: " \
        f"fastgpt train --resume --out-dir {out}"
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 10
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "metrics.jsonl"]  # no .ckpt.pt.tmp-*, no lock


def test_an_interrupted_save_in_process_leaves_the_new_checkpoint_and_saved_iter_in_agreement(
        small_corpus, tmp_path, monkeypatch, python_sigint):
    out = tmp_path / "run"
    trainer = make_trainer(small_corpus, out, backend="naive")
    trainer.save()
    trainer.step()
    real_save = torch.save

    def interrupted_save(obj, f):
        signal.raise_signal(signal.SIGINT)  # held back until the write is done
        real_save(obj, f)

    monkeypatch.setattr(fastgpt.run.checkpoint.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert trainer.saved_iter == load_checkpoint(out / "ckpt.pt")["iter"] == 1
    assert os.listdir(out) == ["ckpt.pt"]
