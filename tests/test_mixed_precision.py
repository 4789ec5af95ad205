"""--dtype bf16 / fp16: autocast training with each CPU backend; fp16 with a gradient scaler."""

import math

import pytest
import torch

from fastgpt.run.config import make_configs
from fastgpt.run.trainer import Trainer

TINY = dict(decay_lr=False, block_size=16, n_layer=1, n_head=2, n_embd=32, batch_size=8, eval_iters=2, progress=False,
            sample_tokens=0, dropout_p=0.0, learning_rate=3e-3)


def make_trainer(corpus, out_dir, **overrides) -> Trainer:
    return Trainer(*make_configs("cpu", {**TINY, "data": str(corpus), "out_dir": str(out_dir), **overrides}))


def train_and_watch_attention(trainer: Trainer, steps: int) -> tuple[list[float], set[torch.dtype]]:
    """The step losses, and the dtypes the attention's q/k/v projection produced (what the backend receives)."""
    seen = set()
    hook = trainer.model.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    try:
        losses = [trainer.step().item() for _ in range(steps)]
    finally:
        hook.remove()
    return losses, seen


@pytest.mark.parametrize("backend", ["naive", "sdpa", "ext"])
def test_bf16_autocast_training_runs_and_learns(backend, small_corpus, tmp_path):
    trainer = make_trainer(small_corpus, tmp_path, dtype="bf16", backend=backend)
    assert trainer.attention_backend() == backend
    losses, dtypes = train_and_watch_attention(trainer, 12)
    assert dtypes == {torch.bfloat16}  # the backend ran in bf16, as autocast hands it over
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    assert not trainer.scaler.is_enabled()  # bf16 has fp32's exponent range: no loss scaling
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_fp16_autocast_training_uses_a_gradient_scaler(backend, small_corpus, tmp_path):
    trainer = make_trainer(small_corpus, tmp_path, dtype="fp16", backend=backend)
    losses, dtypes = train_and_watch_attention(trainer, 12)
    assert dtypes == {torch.float16}
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() > 1.0
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    trainer.save()  # the scaler's state is part of the exact resume
    assert Trainer.resume(tmp_path).scaler.get_scale() == trainer.scaler.get_scale()


def test_fp16_autocast_training_with_triton_in_the_interpreter(small_corpus, tmp_path):
    # On CPU the Triton kernels run in the interpreter, which takes fp16 but computes bf16 wrongly
    # (the backend refuses bf16 there): a few small steps only, the interpreter is slow.
    trainer = make_trainer(small_corpus, tmp_path, dtype="fp16", backend="triton", batch_size=4)
    losses, dtypes = train_and_watch_attention(trainer, 3)
    assert dtypes == {torch.float16}
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses


def test_fp16_with_a_backend_that_cannot_take_it_says_so(small_corpus, tmp_path):
    with pytest.raises(ValueError, match=r"--dtype fp16 runs the attention in float16: backend='ext' does not support "
                                         r"this call: the ext kernels take float32 and bfloat16"):
        make_trainer(small_corpus, tmp_path, dtype="fp16", backend="ext")
    # 'auto' moves on to a backend that takes float16
    assert make_trainer(small_corpus, tmp_path, dtype="fp16").attention_backend() == "sdpa"


def test_unknown_dtype_is_refused(small_corpus, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of bf16, fp16, fp32; got 'half'"):
        make_trainer(small_corpus, tmp_path, dtype="half")
