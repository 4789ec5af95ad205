"""A run's files under faults and bad input: what is already in --out-dir, hand-edited or damaged
metrics and checkpoints, a read-only or full disk, and the signals that stop a run (Ctrl-C while
the command is still importing, SIGTERM). Each is one line on stderr, nothing lost, no traceback."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastgpt.run.atomic_file
import fastgpt.run.lock
from fastgpt.run.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.cli import main
from fastgpt.run.metrics_log import json_line
from fastgpt.run.plots import plot_loss_curve
from test_train import default_sigint, fastgpt_process, train_argv

REPO = Path(__file__).resolve().parents[1]


def one_error_line(err: str) -> str:
    """The single line a refusal prints, after checking that it is alone and no traceback came
    (notes such as the backend 'auto' picked, "fastgpt: ...", aside)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("fastgpt: ")]
    assert len(lines) == 1, err
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.fixture()
def finished_run(small_corpus, tmp_path, capsys) -> Path:
    """A run of 20 iterations, checkpointed and evaluated at 0, 10 and 20."""
    out = tmp_path / "run"
    assert main(train_argv(small_corpus, out, max_iters=20, eval_interval=10, backend="naive")) == 0
    capsys.readouterr()
    return out


def mount(*args: str, skip: bool = True) -> bool:
    """`mount ARGS`; where this machine does not allow it (not root, a container) the test is
    skipped, or with skip=False this returns False."""
    proc = subprocess.run(["mount", *args], capture_output=True, text=True)
    if proc.returncode != 0 and skip:
        pytest.skip(f"cannot mount here ({proc.stderr.strip() or proc.returncode}): the fault needs a mount")
    return proc.returncode == 0


class FullDiskStandIn:
    """Where no tmpfs can be mounted: the writes into `directory` (the atomic writer's files, and
    os.write: the lock, the metrics) beyond `room` bytes raise ENOSPC, as a full disk does."""

    def __init__(self, directory: Path, room: int, monkeypatch):
        self.directory, self.room = str(directory), room
        real_open, real_write = open, os.write

        def limited_open(path, mode="r", *args, **kwargs):
            f = real_open(path, mode, *args, **kwargs)
            return LimitedFile(f, self) if "w" in mode and str(path).startswith(self.directory) else f

        def limited_write(fd, data):
            if os.readlink(f"/proc/self/fd/{fd}").startswith(self.directory):
                self.take(len(data))
            return real_write(fd, data)

        monkeypatch.setattr(fastgpt.run.atomic_file, "open", limited_open, raising=False)
        monkeypatch.setattr(os, "write", limited_write)

    def take(self, size: int) -> None:
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size


class LimitedFile:
    def __init__(self, f, disk: FullDiskStandIn):
        self.f, self.disk = f, disk

    def write(self, data) -> int:
        self.disk.take(len(data))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def small_disk(directory: Path, size: int, mounts: list, monkeypatch, room: int | None = None) -> None:
    """`directory` on a tmpfs of `size` bytes, else (no mount allowed here) the stand-in with `room`
    bytes (default: `size`; a tmpfs counts whole pages, the stand-in bytes)."""
    directory.mkdir()
    if mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory), skip=False):
        mounts.append(directory)
    else:
        FullDiskStandIn(directory, size if room is None else room, monkeypatch)


@pytest.fixture()
def mounts():
    """Mount points to unmount when the test ends, whatever its outcome (last mounted, first unmounted)."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


# -- what --out-dir already holds ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["metrics.jsonl", "loss_curve.png"])
def test_a_new_run_refuses_an_out_dir_with_another_runs_files_but_no_checkpoint(name, small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b'{"iter": 0, "train_loss": 4.2, "val_loss": 4.2}\n')
    before = snapshot(out)
    assert main(train_argv(small_corpus, out, max_iters=2, backend="naive")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert name in line and "--overwrite" in line and "another --out-dir" in line and str(out) in line, line
    assert snapshot(out) == before
    assert main([*train_argv(small_corpus, out, max_iters=2, backend="naive"), "--overwrite"]) == 0
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 2


def test_an_empty_metrics_file_of_a_run_stopped_before_its_first_record_is_no_history(small_corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert main(train_argv(small_corpus, out, max_iters=2, backend="naive")) == 0
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 2


@pytest.mark.parametrize("name", ["ckpt.pt", "metrics.jsonl", "loss_curve.png"])
@pytest.mark.parametrize("how", ["new", "overwrite", "resume"])
def test_a_folder_where_the_run_writes_a_file_is_refused_before_training(name, how, finished_run, small_corpus,
                                                                          capsys):
    out = finished_run
    (out / name).unlink()
    (out / name).mkdir()
    (out / name / "notes.txt").write_text("kept")
    argv = {"new": train_argv(small_corpus, out, max_iters=30, backend="naive"),
            "overwrite": [*train_argv(small_corpus, out, max_iters=30, backend="naive"), "--overwrite"],
            "resume": ["train", "--resume", "--out-dir", str(out), "--max-iters", "30"]}[how]
    before = snapshot(out)
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{out / name}" in line and "is a directory" in line, line
    assert snapshot(out) == before and (out / name / "notes.txt").read_text() == "kept"


# -- metrics.jsonl from an older or edited run ---------------------------------------------------


def edit_metrics_line(path: Path, number: int, edit) -> None:
    lines = path.read_text().splitlines(keepends=True)
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("".join(lines))


def drop_train_loss(line: str) -> str:
    record = json.loads(line)
    del record["train_loss"]
    return json.dumps(record) + "\n"


def iter_as_text(line: str) -> str:
    return line.replace('"iter": 10', '"iter": "ten"')


def loss_as_text(line: str) -> str:
    record = json.loads(line)
    record["val_loss"] = "low"
    return json.dumps(record) + "\n"


@pytest.mark.parametrize("edit, field", [(drop_train_loss, "train_loss"), (iter_as_text, "iter"),
                                         (loss_as_text, "val_loss")])
def test_a_damaged_metrics_record_is_refused_before_resuming(edit, field, finished_run, capsys):
    out = finished_run
    edit_metrics_line(out / "metrics.jsonl", 2, edit)
    before = snapshot(out)
    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "30"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{out / 'metrics.jsonl'}" in line and "line 2" in line and field in line, line
    assert snapshot(out) == before  # nothing trained, nothing rewritten


def test_an_older_runs_nan_token_is_read_and_the_run_plots(finished_run, capsys):
    out = finished_run
    edit_metrics_line(out / "metrics.jsonl", 2, lambda line: json_line(
        {**json.loads(line), "val_loss": 0.0}).replace('"val_loss": 0.0', '"val_loss": NaN'))
    assert "NaN" in (out / "metrics.jsonl").read_text()
    (out / "loss_curve.png").unlink()
    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "30"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert (out / "loss_curve.png").stat().st_size > 0
    records = [json.loads(line, parse_constant=pytest.fail) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 10, 20, 30] and records[1]["val_loss"] is None


def test_the_loss_curve_skips_records_without_a_value(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json_line(r) for r in [
        {"iter": 0, "train_loss": None, "val_loss": None},  # no backend, no losses
        {"iter": 10, "train_loss": 2.0, "val_loss": float("nan"), "backend": "naive"},
        {"iter": 20, "train_loss": 1.5, "val_loss": 1.6, "backend": "naive"},
    ]))
    png = plot_loss_curve(metrics, tmp_path / "loss_curve.png")
    assert png.stat().st_size > 0
    metrics.write_text(json_line({"iter": 0, "train_loss": None, "val_loss": None}))
    assert plot_loss_curve(metrics, tmp_path / "empty.png").stat().st_size > 0


def test_a_plot_that_fails_after_training_is_a_warning_and_the_run_is_kept(small_corpus, tmp_path, monkeypatch,
                                                                           capsys):
    import fastgpt.run.plots

    def broken_plot(metrics_path, png_path):
        raise OSError(errno.EIO, "Input/output error", str(png_path))

    monkeypatch.setattr(fastgpt.run.plots, "plot_loss_curve", broken_plot)
    out = tmp_path / "run"
    assert main(train_argv(small_corpus, out, max_iters=4, eval_interval=2, backend="naive")) == 0
    err = capsys.readouterr().err
    line = one_error_line(err)
    assert "warning" in line and "loss_curve.png" in line and "Input/output error" in line, line
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


# -- a read-only or full disk -----------------------------------------------------------------


def test_a_read_only_out_dir_is_one_line(small_corpus, tmp_path, mounts, capsys):
    source, out = tmp_path / "source", tmp_path / "run"
    source.mkdir()
    out.mkdir()
    mount("--bind", str(source), str(out))
    mounts.append(out)
    mount("-o", "remount,bind,ro", str(out))
    assert main(train_argv(small_corpus, out, max_iters=2, backend="naive")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"'{out}'" in line and "read-only" in line.lower() and "--out-dir" in line, line
    assert os.listdir(out) == []


def test_an_out_dir_this_user_may_not_write_is_one_line(small_corpus, tmp_path, monkeypatch, capsys):
    # root may write anywhere: the lock file's refusal is stood in for
    real_open = os.open

    def refuse_the_lock(path, *args, **kwargs):
        if str(path).endswith("train.lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(fastgpt.run.lock.os, "open", refuse_the_lock)
    out = tmp_path / "run"
    assert main(train_argv(small_corpus, out, max_iters=2, backend="naive")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"'{out}'" in line and "Permission denied" in line and "--out-dir" in line, line


def checkpoint_size(small_corpus, tmp_path, iterations: int) -> int:
    from test_train import make_trainer

    trainer = make_trainer(small_corpus, tmp_path / "measure", backend="naive")
    for _ in range(iterations):
        trainer.step()
    return trainer.save().stat().st_size


def test_a_full_disk_while_writing_the_checkpoint_keeps_the_previous_one(small_corpus, tmp_path, mounts, monkeypatch,
                                                                        capsys):
    first, later = checkpoint_size(small_corpus, tmp_path, 0), checkpoint_size(small_corpus, tmp_path, 1)
    assert later > 2 * first  # the optimizer's moments appear after the first step
    out = tmp_path / "run"
    # room for the first checkpoint, the metrics and the lock, not for a second checkpoint beside it
    small_disk(out, first * 2 // 4096 * 4096 + 3 * 4096, mounts, monkeypatch)
    assert main(train_argv(small_corpus, out, max_iters=20, eval_interval=10, backend="naive")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no space left on the device holding" in line and str(out / "ckpt.pt") in line, line
    assert "holds iteration 0" in line and f"fastgpt train --resume --out-dir {out}" in line, line
    assert "enforce fail" not in line
    assert sorted(os.listdir(out)) == ["ckpt.pt", "metrics.jsonl"]  # no temporary file, no lock left
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 0


def test_a_full_disk_while_appending_metrics_is_one_line(small_corpus, tmp_path, mounts, monkeypatch, capsys):
    out = tmp_path / "run"
    small_disk(out, 4096, mounts, monkeypatch, room=16)  # room for the lock file only
    assert main(train_argv(small_corpus, out, max_iters=2, backend="naive")) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no space left on the device holding" in line and str(out / "metrics.jsonl") in line, line
    assert "no checkpoint was written" in line
    assert sorted(os.listdir(out)) == ["metrics.jsonl"] and (out / "metrics.jsonl").read_text() == ""


# -- hand-edited and foreign checkpoints ---------------------------------------------------------


def edited(field: str, value):
    def edit(state):
        if value is KeyError:
            del state[field]
        elif "." in field:
            outer, inner = field.split(".")
            state[outer][inner] = value
        else:
            state[field] = value
    return edit


@pytest.mark.parametrize("edit, named", [
    (edited("model_config", "gpt"), "model_config"),
    (edited("model_config.flash", True), "flash"),
    (edited("model_config.n_layer", "two"), "n_layer"),
    (edited("train_config", [1, 2]), "train_config"),
    (edited("train_config.learning_rat", 0.1), "learning_rat"),
    (lambda state: state.update(vocab=state["vocab"][:-1]), "vocab"),  # shortened: a KeyError in sample
    (lambda state: state.update(vocab=["ab", *state["vocab"][2:]]), "vocab"),
    (lambda state: state.update(vocab=state["vocab"][0] * 2 + state["vocab"][2:]), "vocab"),  # a repeat
    (edited("vocab", 65), "vocab"),
    (edited("iter", "20"), "iter"),
    (edited("iter", -1), "iter"),
    (edited("model", [1, 2]), "model"),
])
def test_a_hand_edited_checkpoint_is_refused_naming_the_field(edit, named, finished_run, capsys):
    out = finished_run
    state = load_checkpoint(out / "ckpt.pt")
    edit(state)
    save_checkpoint(state, out / "ckpt.pt")
    before = snapshot(out)
    for argv in (["train", "--resume", "--out-dir", str(out), "--max-iters", "30"],
                 ["sample", "--out-dir", str(out), "--max-new-tokens", "200", "--seed", "0"]):
        assert main(argv) == 2, argv
        line = one_error_line(capsys.readouterr().err)
        assert named in line and str(out / "ckpt.pt") in line and "it was not loaded" in line, line
    assert snapshot(out) == before


def test_random_bytes_are_not_called_a_checkpoint_holding_code(finished_run, capsys):
    out = finished_run
    noise = random.Random(0).randbytes(4096)
    assert not noise.startswith((b"PK", b"\x80"))  # neither a zip archive nor a pickle
    (out / "ckpt.pt").write_bytes(noise)
    for argv in (["train", "--resume", "--out-dir", str(out)], ["sample", "--out-dir", str(out)]):
        assert main(argv) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "not a fastgpt checkpoint" in line and "not a file torch.save writes" in line, line
        assert "Python objects other than tensors" not in line


# -- resuming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("max_iters, says", [(10, "is below"), (20, "already reached")])
def test_resume_with_max_iters_not_above_the_checkpoint_is_refused(max_iters, says, finished_run, capsys):
    out = finished_run
    before = snapshot(out)
    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", str(max_iters)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"--max-iters {max_iters}" in line and "iteration 20" in line and says in line, line
    assert snapshot(out) == before


def test_resume_from_another_working_directory_finds_the_corpus(small_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(small_corpus.parent)
    out = tmp_path / "run"
    assert main(train_argv(small_corpus.name, out, max_iters=2, backend="naive")) == 0
    assert load_checkpoint(out / "ckpt.pt")["train_config"]["data"] == str(small_corpus)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "4"]) == 0
    assert load_checkpoint(out / "ckpt.pt")["iter"] == 4


def test_a_relative_corpus_path_from_an_older_checkpoint_says_to_pass_data(finished_run, small_corpus, tmp_path,
                                                                          monkeypatch, capsys):
    out = finished_run
    state = load_checkpoint(out / "ckpt.pt")
    state["train_config"]["data"] = small_corpus.name  # as older versions stored it
    save_checkpoint(state, out / "ckpt.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "30"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"'{small_corpus.name}'" in line and "relative" in line and "--data" in line, line
    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "30", "--data", str(small_corpus)]) == 0


# -- signals ----------------------------------------------------------------------------------


def test_importing_fastgpt_and_its_command_loads_no_torch():
    code = ("import sys, fastgpt, fastgpt.cli; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(fastgpt.causal_attention) and 'torch' in sys.modules; "
            "assert set(fastgpt.__all__) <= set(dir(fastgpt)); from fastgpt import select_kernel; "
            "assert fastgpt.attention.registry.__name__ == 'fastgpt.attention.registry'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


@pytest.mark.parametrize("delay", [0.3, 0.6])
def test_ctrl_c_while_the_command_imports_is_one_line(delay, small_corpus, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastgpt", *train_argv(small_corpus, out, max_iters=2, backend="naive")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            preexec_fn=default_sigint)
    time.sleep(delay)  # torch alone takes over a second to import
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert one_error_line(stderr).startswith("fastgpt train: interrupted"), stderr
    assert not out.exists()


def test_sigterm_mid_run_stops_like_ctrl_c(small_corpus, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "fastgpt", *train_argv(small_corpus, out, max_iters=100_000,
                                                                          eval_interval=5, backend="naive")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    deadline = time.monotonic() + 120
    while not (out / "ckpt.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.terminate()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    line = one_error_line(stderr)
    assert line.startswith("fastgpt train: terminated (SIGTERM); ") and "--resume" in line, line
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert load_checkpoint(out / "ckpt.pt")["iter"] % 5 == 0
