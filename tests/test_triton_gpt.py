"""The GPT trained with the Triton kernel (interpreted on CPU) follows the naive attention's curve."""

import pytest

from fastgpt.run.config import make_configs
from fastgpt.run.trainer import Trainer

pytest.importorskip("fastgpt.kernels.flash_attention_ops", reason="triton is not installed")

# head size 32 // 2 = 16, context 16: the smallest GPT the kernel supports
TINY = dict(decay_lr=False, block_size=16, n_layer=2, n_head=2, n_embd=32, batch_size=4, eval_iters=2,
            progress=False, sample_tokens=0)


def make_trainer(corpus, out_dir, **overrides) -> Trainer:
    model_config, train_config = make_configs("cpu", {**TINY, "data": str(corpus), "out_dir": str(out_dir), **overrides})
    return Trainer(model_config, train_config)


def test_gpt_trains_with_triton_as_with_naive(small_corpus, tmp_path):
    triton = make_trainer(small_corpus, tmp_path / "triton", backend="triton", dropout_p=0.0)
    naive = make_trainer(small_corpus, tmp_path / "naive", backend="naive", dropout_p=0.0)
    triton_losses = [triton.step().item() for _ in range(8)]
    naive_losses = [naive.step().item() for _ in range(8)]
    # same seed, same weights, same batches: only fp32 rounding differs
    assert triton_losses == pytest.approx(naive_losses, rel=1e-4)
    assert triton_losses[-1] < triton_losses[0] - 0.3


def test_gpt_with_attention_dropout_is_reproducible(small_corpus, tmp_path):
    # the kernel's dropout seeds come from torch's RNG, which the trainer seeds
    losses = []
    for i in range(2):  # one after the other: both draw from the one global RNG
        run = make_trainer(small_corpus, tmp_path / str(i), backend="triton", dropout_p=0.2)
        losses.append([run.step().item() for _ in range(4)])
    assert losses[0] == losses[1]
    assert losses[0][-1] < losses[0][0]
