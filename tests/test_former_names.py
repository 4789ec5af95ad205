"""The names ModelConfig's fields had before `attention` became `backend` and `dropout` became
`dropout_p`: a checkpoint that holds them samples and resumes, and the former flags still set the
fields without being listed in --help."""

import pytest
import torch

from fastgpt.cli import build_parser, main
from fastgpt.run.checkpoint import NotACheckpointError, load_checkpoint

SMALL_RUN = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "4",
             "--eval-iters", "2", "--eval-interval", "10", "--no-progress", "--no-decay-lr", "--sample-tokens", "0"]


@pytest.fixture
def former_checkpoint(small_corpus, tmp_path):
    """A run directory whose ckpt.pt stores its model config under the former field names."""
    out = tmp_path / "run"
    assert main(["train", "--preset", "cpu", "--data", str(small_corpus), "--out-dir", str(out), "--max-iters", "2",
                 "--backend", "naive", "--dropout-p", "0.1", *SMALL_RUN]) == 0
    state = torch.load(out / "ckpt.pt", weights_only=True)
    config = state["model_config"]
    config["attention"], config["dropout"] = config.pop("backend"), config.pop("dropout_p")
    torch.save(state, out / "ckpt.pt")
    return out


def test_a_checkpoint_with_the_former_field_names_loads_under_the_current_ones(former_checkpoint):
    config = load_checkpoint(former_checkpoint / "ckpt.pt")["model_config"]
    assert (config["backend"], config["dropout_p"]) == ("naive", 0.1)
    assert "attention" not in config and "dropout" not in config


def test_a_checkpoint_with_the_former_field_names_resumes(former_checkpoint, capsys):
    capsys.readouterr()
    assert main(["train", "--resume", "--out-dir", str(former_checkpoint), "--max-iters", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resuming at iteration 2 of 4" in printed and "attention backend 'naive' -> kernel path naive" in printed
    state = load_checkpoint(former_checkpoint / "ckpt.pt")
    assert state["iter"] == 4
    config = torch.load(former_checkpoint / "ckpt.pt", weights_only=True)["model_config"]  # as written: current names
    assert (config["backend"], config["dropout_p"]) == ("naive", 0.1) and "attention" not in config


def test_a_checkpoint_with_the_former_field_names_samples(former_checkpoint, capsys):
    capsys.readouterr()
    assert main(["sample", "--out-dir", str(former_checkpoint), "--prompt", "To", "--max-new-tokens", "8",
                 "--seed", "0", "--linear", "torch"]) == 0
    assert capsys.readouterr().out.startswith("To")


def test_a_checkpoint_with_both_names_of_a_field_is_refused(former_checkpoint):
    state = torch.load(former_checkpoint / "ckpt.pt", weights_only=True)
    state["model_config"]["backend"] = "sdpa"  # beside the former "attention": which one holds is unsaid
    torch.save(state, former_checkpoint / "ckpt.pt")
    with pytest.raises(NotACheckpointError, match="has field\\(s\\) ModelConfig does not know: attention"):
        load_checkpoint(former_checkpoint / "ckpt.pt")


@pytest.mark.parametrize("argv, field, value", [
    (["train", "--attention", "sdpa"], "backend", "sdpa"),
    (["train", "--dropout", "0.05"], "dropout_p", 0.05),
    (["train", "--backend", "sdpa"], "backend", "sdpa"),
    (["train", "--dropout-p", "0.05"], "dropout_p", 0.05),
    (["sample", "--attention", "sdpa"], "backend", "sdpa"),
    (["sample", "--backend", "sdpa"], "backend", "sdpa"),
])
def test_the_former_flags_set_the_renamed_fields(argv, field, value):
    args = build_parser([argv[0]]).parse_args(argv)
    assert getattr(args, field) == value


@pytest.mark.parametrize("command", ["train", "sample"])
def test_help_lists_the_current_flags_only(command):
    parser = build_parser([command])
    help_text = next(action for action in parser._actions if action.dest == "command").choices[command].format_help()
    assert "--backend" in help_text
    assert "--attention" not in help_text and "--dropout " not in help_text and "--dropout\n" not in help_text
    if command == "train":
        assert "--dropout-p" in help_text


def test_a_former_flag_with_a_bad_value_is_named_as_typed(capsys):
    with pytest.raises(SystemExit):
        build_parser(["train"]).parse_args(["train", "--dropout", "lots"])
    assert "argument --dropout: invalid float value: 'lots'" in capsys.readouterr().err
