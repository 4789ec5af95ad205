"""A run's claim on its --out-dir: the guard against overwriting another run, one training per
directory (a lock a killed run does not leave stuck), and the temporary files a killed write left."""

import os
import signal
import subprocess
import sys

from fastgpt.run.checkpoint import load_checkpoint
from fastgpt.cli import main
from fastgpt.run.lock import LOCK_NAME
from test_distributed import torchrun
from test_train import fastgpt_process, train_argv

# A child that takes the lock of the directory argv[1], says so, then waits (or kills itself).
HOLD_LOCK = """
import os, signal, sys
from fastgpt.run.lock import RunLock
lock = RunLock.acquire(sys.argv[1])
print("locked", flush=True)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
"""


def hold_lock(directory, then: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(directory), then], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    if then == "wait":
        assert child.stdout.readline() == "locked\n"
    else:
        child.wait(timeout=60)
    return child


def test_new_run_refuses_an_out_dir_that_holds_a_run_unless_overwrite(small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(small_corpus, out, max_iters=20, eval_interval=10)) == 0
    checkpoint, metrics = (out / "ckpt.pt").read_bytes(), (out / "metrics.jsonl").read_bytes()
    capsys.readouterr()

    assert main(train_argv(small_corpus, out, max_iters=5, eval_interval=5)) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "ckpt.pt").read_bytes() == checkpoint and (out / "metrics.jsonl").read_bytes() == metrics

    assert main([*train_argv(small_corpus, out, max_iters=5, eval_interval=5), "--overwrite"]) == 0
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 5
    assert [line.count('"iter"') for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 1]  # 0 and 5


def test_out_dir_naming_a_file_is_one_clear_error(small_corpus, tmp_path, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a directory")
    for argv in (train_argv(small_corpus, a_file, max_iters=1), ["train", "--resume", "--out-dir", str(a_file)],
                 ["sample", "--out-dir", str(a_file)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"'{a_file}' is a file" in err and "Traceback" not in err, err
    assert a_file.read_text() == "not a directory"


def test_a_second_training_is_refused_while_the_first_holds_the_directory(small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out, "wait")
    try:
        assert main(train_argv(small_corpus, out, max_iters=2)) == 2
        err = capsys.readouterr().err
        assert f"another training (pid {holder.pid}) is writing to" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing written
    finally:
        holder.stdin.close()  # the holder reads its stdin to the end, then exits
        holder.wait(timeout=60)
    assert main(train_argv(small_corpus, out, max_iters=2)) == 0  # released with its process
    assert not (out / LOCK_NAME).exists()  # a run removes its lock file as it releases it


def test_a_lock_left_by_a_killed_run_does_not_block_the_next(small_corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out, "die")
    assert holder.returncode == -signal.SIGKILL
    assert (out / LOCK_NAME).read_text().strip() == str(holder.pid)  # the file stays; the kernel dropped the lock
    assert main(train_argv(small_corpus, out, max_iters=2)) == 0
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 2


def test_under_torchrun_a_held_directory_ends_every_process(small_corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = hold_lock(out, "wait")
    try:
        # rank 0 takes the lock; the refusal reaches rank 1, which would otherwise wait in a collective
        proc = torchrun(2, *train_argv(small_corpus, out, max_iters=2, gradient_accumulation_steps=2,
                                       backend="naive")[1:])
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.count(f"fastgpt train: error: another training (pid {holder.pid}) is writing to") == 2, \
        proc.stderr
    assert not (out / "ckpt.pt").exists()


def test_temporary_files_of_a_write_killed_midway_are_removed_on_the_next_start(small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    # kill -9 during the second checkpoint write (iteration 10), after torch.save wrote it all
    kill_mid_second_save = """
        import os, torch
        real_save, calls = torch.save, []
        def save(obj, f):
            calls.append(f)
            real_save(obj, f)
            if len(calls) == 2:
                f.flush()
                os._exit(137)
        torch.save = save
    """
    proc = fastgpt_process(train_argv(small_corpus, out, max_iters=20, eval_interval=10, backend="naive"),
                           inject=kill_mid_second_save)
    assert proc.returncode == 137, proc.stderr
    leftovers = [p for p in out.iterdir() if p.name.startswith(".ckpt.pt.tmp-")]
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 0  # the previous checkpoint, whole

    assert main(["train", "--resume", "--out-dir", str(out)]) == 0
    assert f"removed 1 temporary file(s) left by an interrupted write: {leftovers[0].name}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "loss_curve.png", "metrics.jsonl"]
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 20
    assert os.path.getsize(out / "metrics.jsonl") > 0
