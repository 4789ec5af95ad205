import json
import math
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import fastgpt.run.checkpoint
from fastgpt.run.checkpoint import load_checkpoint, save_checkpoint
from fastgpt.run.config import TrainConfig, make_configs
from fastgpt.run.data import CharDataset
from fastgpt.attention.registry import auto_order
from fastgpt.run.flops import training_flops_per_step
from fastgpt.model.gpt import num_parameters
from fastgpt.run.trainer import Trainer, learning_rate_at

TINY = dict(decay_lr=False, block_size=16, n_layer=2, n_head=2, n_embd=32, batch_size=4, eval_iters=2, progress=False, sample_tokens=0)


def make_trainer(corpus, out_dir, **overrides) -> Trainer:
    model_config, train_config = make_configs("cpu", {**TINY, "data": str(corpus), "out_dir": str(out_dir), **overrides})
    return Trainer(model_config, train_config)


def fastgpt_process(argv: list, inject: str = "", timeout: float = 180) -> subprocess.CompletedProcess:
    """`fastgpt ARGV` in a fresh Python process that first runs `inject` (the fault to inject)."""
    code = f"import sys\n{textwrap.dedent(inject)}\nfrom fastgpt.cli import main\nsys.exit(main({[str(a) for a in argv]!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=default_sigint)


def default_sigint() -> None:
    """In a child before it runs: SIGINT back to its default disposition, where Python installs its
    handler (KeyboardInterrupt). A shell starts background jobs (`cmd &`, nohup) with SIGINT ignored,
    and a child inherits that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def train_argv(corpus, out_dir, **overrides) -> list[str]:
    """The `fastgpt train` arguments of make_trainer's run."""
    from test_distributed import flags

    return ["train", "--preset", "cpu", *flags({**TINY, "data": corpus, "out_dir": out_dir, **overrides})]


def test_swapping_backend_mid_training_continues_the_loss_curve(small_corpus, tmp_path):
    swapped = make_trainer(small_corpus, tmp_path / "a", backend="naive")
    reference = make_trainer(small_corpus, tmp_path / "b", backend="sdpa")
    swapped_losses = [swapped.step().item() for _ in range(6)]
    swapped.set_backend("sdpa")
    assert swapped.attention_backend() == "sdpa"
    swapped_losses += [swapped.step().item() for _ in range(6)]
    reference_losses = [reference.step().item() for _ in range(12)]
    # Same seed, same weights: the swap changes the kernel, not the curve (fp32 rounding only).
    assert swapped_losses == pytest.approx(reference_losses, rel=1e-4)
    assert swapped_losses[-1] < swapped_losses[0] - 0.3  # and the curve is really going down


def test_resume_reproduces_the_next_step_exactly(small_corpus, tmp_path):
    # dropout on, so the exact continuation also needs torch's RNG state, not just the weights
    trainer = make_trainer(small_corpus, tmp_path, dropout_p=0.1, backend="naive")
    for _ in range(5):
        trainer.step()
    trainer.save()
    expected = [trainer.step().item() for _ in range(3)]
    torch.manual_seed(12345)  # disturb the global RNG: resume must restore it
    resumed = Trainer.resume(tmp_path)
    assert resumed.iter == 5
    assert [resumed.step().item() for _ in range(3)] == expected


def test_resume_refuses_architecture_changes(small_corpus, tmp_path):
    trainer = make_trainer(small_corpus, tmp_path)
    trainer.save()
    with pytest.raises(ValueError, match="cannot change n_layer from 2 to 3 when resuming"):
        Trainer.resume(tmp_path, {"n_layer": 3})


def test_interrupted_checkpoint_write_leaves_previous_checkpoint_loadable(small_corpus, tmp_path, monkeypatch):
    trainer = make_trainer(small_corpus, tmp_path / "run")
    trainer.step()
    path = trainer.save()
    real_save = torch.save

    def crash_midway(obj, f):
        real_save(obj, f)
        f.seek(f.tell() // 2)
        f.truncate()  # half a file on disk...
        raise KeyboardInterrupt  # ...and the process is stopped

    monkeypatch.setattr(fastgpt.run.checkpoint.torch, "save", crash_midway)
    trainer.step()
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    assert load_checkpoint(path)["iter"] == 1
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_save_checkpoint_replaces_atomically(tmp_path):
    state = {"model": {"x": torch.ones(2)}, "model_config": {"vocab_size": 2}, "train_config": {}, "vocab": "ab",
             "iter": 1}
    save_checkpoint(state, tmp_path / "c.pt")
    save_checkpoint({**state, "model": {"x": torch.zeros(2)}}, tmp_path / "c.pt")
    assert torch.equal(load_checkpoint(tmp_path / "c.pt")["model"]["x"], torch.zeros(2))


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*train one first"):
        load_checkpoint(tmp_path / "ckpt.pt")


def test_learning_rate_schedule():
    cfg = TrainConfig(learning_rate=1e-3, decay_lr=True, warmup_iters=100, lr_decay_iters=2000, min_lr=1e-4)
    assert learning_rate_at(0, cfg) == pytest.approx(1e-3 / 101)
    assert learning_rate_at(99, cfg) == pytest.approx(1e-3 * 100 / 101)
    assert learning_rate_at(100, cfg) == pytest.approx(1e-3)
    assert learning_rate_at(1050, cfg) == pytest.approx((1e-3 + 1e-4) / 2)  # cosine midpoint
    assert learning_rate_at(2000, cfg) == learning_rate_at(5000, cfg) == 1e-4
    assert learning_rate_at(7, TrainConfig(learning_rate=3e-4)) == 3e-4


def test_run_writes_metrics_checkpoint_and_plot(small_corpus, tmp_path):
    trainer = make_trainer(small_corpus, tmp_path, max_iters=20, eval_interval=10)
    records = trainer.run()
    assert [r["iter"] for r in records] == [0, 10, 20]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == records
    for r in lines:
        assert set(r) >= {"iter", "train_loss", "val_loss", "tokens_per_s", "elapsed_s", "backend"}
        # auto's pick on this machine: the first backend of the CPU order that can run here
        assert r["backend"] == trainer.attention_backend() and math.isfinite(r["val_loss"])
    assert lines[0]["backend"] in auto_order(torch.device("cpu"), "plain")
    assert lines[0]["val_loss"] == pytest.approx(math.log(trainer.dataset.tokenizer.vocab_size), abs=0.1)
    assert lines[-1]["val_loss"] < lines[0]["val_loss"] - 0.5
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter"] == 20


def test_bad_train_config_is_refused(small_corpus, tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1; got 0"):
        make_trainer(small_corpus, tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="unknown config field"):
        make_configs("cpu", {"n_layers": 3})
    with pytest.raises(ValueError, match="preset 'gpt5' is unknown"):
        make_configs("gpt5")


def test_block_size_longer_than_the_corpus_split_is_refused(small_corpus, tmp_path):
    ds = CharDataset.load(small_corpus)
    with pytest.raises(ValueError, match="val split has .* fewer than block_size"):
        make_trainer(small_corpus, tmp_path, block_size=len(ds.val) + 5)


def test_mfu_estimate_is_logged_only_where_the_peak_is_known(small_corpus, tmp_path):
    records = make_trainer(small_corpus, tmp_path / "a", max_iters=4, eval_interval=2).run()
    assert all(r["mfu_estimate"] is None for r in records)  # a CPU: not in the peak table
    trainer = make_trainer(small_corpus, tmp_path / "b", max_iters=4, eval_interval=2, peak_tflops=0.5)
    last = trainer.run()[-1]
    mc, cfg = trainer.model_config, trainer.train_config
    flops = training_flops_per_step(num_parameters(trainer.model), mc.n_layer, mc.n_embd, cfg.batch_size, mc.block_size)
    seconds_per_step = trainer.tokens_per_step / last["tokens_per_s"]
    assert last["mfu_estimate"] == pytest.approx(flops / seconds_per_step / 0.5e12)
    assert 0 < last["mfu_estimate"] < 1


def test_gradient_accumulation_multiplies_the_tokens_per_step(small_corpus, tmp_path):
    trainer = make_trainer(small_corpus, tmp_path, gradient_accumulation_steps=3)
    assert trainer.micro_steps == 3 and trainer.tokens_per_step == 3 * 4 * 16
    assert math.isfinite(trainer.step().item())
    with pytest.raises(ValueError, match="gradient_accumulation_steps=3 .* must be divisible by the world size 2"):
        trainer.train_config.check_world_size(2)


def test_peak_flops_table_is_the_one_the_benchmark_reads():
    import fastgpt.bench.train as bench
    import fastgpt.run.flops

    assert bench.device_peak_flops is fastgpt.run.flops.device_peak_flops
    assert fastgpt.run.flops.device_peak_flops(torch.device("cpu")) is None
    assert fastgpt.run.flops.device_peak_flops(torch.device("cpu"), 2e12) == 2e12


def test_resume_in_another_world_size_keeps_the_batches_and_says_dropout_streams_are_new(small_corpus, tmp_path, capsys):
    trainer = make_trainer(small_corpus, tmp_path, gradient_accumulation_steps=2)
    trainer.step()
    trainer.save()
    expected = trainer.step().item()
    state = load_checkpoint(tmp_path / "ckpt.pt")
    state["rng"] = state["rng"] * 2  # as if written by 2 processes
    save_checkpoint(state, tmp_path / "ckpt.pt")
    resumed = Trainer.resume(tmp_path)
    assert "written by 2 process(es), this run has 1" in capsys.readouterr().out
    assert resumed.step().item() == pytest.approx(expected, rel=1e-6)  # dropout 0: the same batches, the same step
