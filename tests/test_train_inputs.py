"""Input a run used to accept without a check, now refused in one line: settings that silently did
nothing, --preset on --resume, another corpus on --resume, files that are not fastgpt checkpoints."""

import pathlib

import pytest
import torch

from fastgpt.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.cli import main
from fastgpt.train import Trainer
from test_train import make_trainer, train_argv


@pytest.mark.parametrize("name, value, message", [
    ("grad_clip", float("nan"), "grad_clip must be a finite number; got nan"),  # was: clipping silently off
    ("learning_rate", float("inf"), "learning_rate must be a finite number; got inf"),
    ("peak_tflops", float("inf"), "peak_tflops must be a finite number; got inf"),
    ("min_lr", -1e-4, "min_lr must be >= 0; got -0.0001"),
    ("weight_decay", -0.1, "weight_decay must be >= 0; got -0.1"),
])
def test_settings_that_did_nothing_or_harm_are_refused(name, value, message, small_corpus, tmp_path, capsys):
    with pytest.raises(ValueError, match=message):
        make_trainer(small_corpus, tmp_path, **{name: value})
    assert main(train_argv(small_corpus, tmp_path / "run", **{name: value})) == 2
    assert f"fastgpt train: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--resume", "--preset", "bigram"], "--preset applies to a new run"),
    (["--resume", "--overwrite"], "--resume continues the run in --out-dir and --overwrite starts it over"),
    (["--allow-corpus-change"], "--allow-corpus-change applies only with --resume"),
])
def test_flags_that_contradict_each_other_are_refused(flags, message, tmp_path, capsys):
    assert main(["train", "--out-dir", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_resume_on_another_corpus_with_the_same_vocabulary_needs_a_flag(small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(small_corpus, out, max_iters=2, attention="naive")) == 0
    lines = small_corpus.read_text().splitlines(keepends=True)
    other = tmp_path / "other.txt"
    other.write_text("".join(reversed(lines)))  # the same characters, another text
    checkpoint = (out / "ckpt.pt").read_bytes()
    capsys.readouterr()

    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "4", "--data", str(other)]) == 2
    err = capsys.readouterr().err
    assert "the corpus is not the one this run was trained on" in err and f"--data {small_corpus}" in err
    assert "--allow-corpus-change" in err and (out / "ckpt.pt").read_bytes() == checkpoint

    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "4", "--data", str(other),
                 "--allow-corpus-change"]) == 0
    assert "continuing on another corpus" in capsys.readouterr().out
    state = load_checkpoint(out / "ckpt.pt")
    assert state["iter"] == 4 and state["train_config"]["data"] == str(other)
    # from here on the run is checked against the corpus it now trains on
    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "6", "--data", str(small_corpus)]) == 2
    assert main(["train", "--resume", "--out-dir", str(out), "--max-iters", "6"]) == 0


def test_a_checkpoint_from_before_fingerprints_resumes_with_a_note(small_corpus, tmp_path, capsys):
    trainer = make_trainer(small_corpus, tmp_path / "run", attention="naive")
    trainer.step()
    path = trainer.save()
    state = load_checkpoint(path)
    del state["corpus_fingerprint"]
    save_checkpoint(state, path)
    capsys.readouterr()
    assert Trainer.resume(tmp_path / "run").iter == 1
    assert "the checkpoint predates corpus fingerprints" in capsys.readouterr().out


class RunsCodeWhenUnpickled:
    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def write_empty(path, real):
    path.write_bytes(b"")


def write_truncated(path, real):
    path.write_bytes(real[: len(real) // 2])


def write_text(path, real):
    path.write_text("step 1: loss 4.17\n")


def write_foreign_tensors(path, real):
    torch.save({"weights": torch.ones(3)}, path)


def write_code(path, real):
    torch.save({"model": RunsCodeWhenUnpickled(path.parent / "code_ran")}, path)


@pytest.mark.parametrize("write, reason", [
    (write_empty, "is empty (0 bytes)"),
    (write_truncated, "truncated, corrupted or another format"),
    (write_text, "truncated, corrupted or another format"),
    (write_foreign_tensors, "it has no model, model_config, train_config, vocab, iter"),
    (write_code, "holds Python objects other than tensors, numbers and strings"),
])
def test_a_file_that_is_not_a_fastgpt_checkpoint_is_one_clear_error(write, reason, small_corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(small_corpus, out, max_iters=1, attention="naive")) == 0
    write(out / "ckpt.pt", (out / "ckpt.pt").read_bytes())
    capsys.readouterr()
    for argv in (["train", "--resume", "--out-dir", str(out)], ["sample", "--out-dir", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert reason in err and "not a fastgpt checkpoint" in err and "it was not loaded" in err, err
        assert "Traceback" not in err and "weights_only" not in err  # never an invitation to run the file's code
    assert not (tmp_path / "run" / "code_ran").exists()
