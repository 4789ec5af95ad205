"""Input a run used to accept without a check, now refused in one line: settings that silently did
nothing, --preset on --resume, another corpus on --resume, files that are not fastgpt checkpoints."""

import pathlib
import re

import pytest
import torch

from fastgpt.run.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.cli import main
from fastgpt.run.trainer import Trainer
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
    assert main(train_argv(small_corpus, out, max_iters=2, backend="naive")) == 0
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
    trainer = make_trainer(small_corpus, tmp_path / "run", backend="naive")
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
    assert main(train_argv(small_corpus, out, max_iters=1, backend="naive")) == 0
    write(out / "ckpt.pt", (out / "ckpt.pt").read_bytes())
    capsys.readouterr()
    for argv in (["train", "--resume", "--out-dir", str(out)], ["sample", "--out-dir", str(out)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert reason in err and "not a fastgpt checkpoint" in err and "it was not loaded" in err, err
        assert "Traceback" not in err and "weights_only" not in err  # never an invitation to run the file's code
    assert not (tmp_path / "run" / "code_ran").exists()


@pytest.mark.parametrize("overrides, message", [
    # the cosine runs from learning_rate to min_lr: above it, the "decay" raises the rate
    (dict(decay_lr=True, learning_rate=1e-3, min_lr=5.0),
     "min_lr=5.0 is above learning_rate=0.001: the cosine decay would raise the rate"),
    # the warmup would end after the decay had: no cosine at all, then a drop to min_lr
    (dict(decay_lr=True, warmup_iters=100, lr_decay_iters=50),
     "warmup_iters=100 must be below lr_decay_iters=50"),
    (dict(out_dir=""), "out_dir is empty"),
    (dict(out_dir="  "), "out_dir is empty"),
])
def test_a_schedule_or_out_dir_that_cannot_mean_what_it_says_is_refused(overrides, message, small_corpus, tmp_path,
                                                                      capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # an empty out_dir would have written here
    overrides = dict(overrides)
    out_dir = overrides.pop("out_dir", tmp_path / "run")
    with pytest.raises(ValueError, match=re.escape(message)):
        make_trainer(small_corpus, out_dir, **overrides)
    assert main(train_argv(small_corpus, out_dir, **overrides)) == 2
    assert message in capsys.readouterr().err
    assert list(cwd.iterdir()) == [] and not (tmp_path / "run").exists()


def test_min_lr_is_free_when_the_rate_does_not_decay(small_corpus, tmp_path):
    make_trainer(small_corpus, tmp_path, decay_lr=False, learning_rate=1e-3, min_lr=5.0)  # min_lr unused: no refusal


def test_vocab_size_is_the_corpus_s_and_not_a_flag(small_corpus, tmp_path, capsys):
    from fastgpt.run.config import make_configs

    says = "vocab_size=100 (--vocab-size): a new run's vocabulary is its corpus's characters"
    with pytest.raises(ValueError, match=re.escape(says)):
        make_configs("cpu", {"vocab_size": 100})
    assert main(train_argv(small_corpus, tmp_path / "run", vocab_size=100)) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
