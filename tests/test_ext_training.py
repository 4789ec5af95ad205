"""A GPT trains with backend="ext": the same losses as "naive" from the same seed."""

from __future__ import annotations

import pytest

import fastgpt.ext as ext
from fastgpt.run.config import make_configs
from fastgpt.run.trainer import Trainer

TINY = dict(decay_lr=False, block_size=16, n_layer=2, n_head=2, n_embd=32, batch_size=4, eval_iters=2,
            progress=False, sample_tokens=0)


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ext.load()


def make_trainer(corpus, out_dir, **overrides) -> Trainer:
    model_config, train_config = make_configs("cpu", {**TINY, "data": str(corpus), "out_dir": str(out_dir), **overrides})
    return Trainer(model_config, train_config)


def test_gpt_trains_with_ext_and_matches_naive_losses(small_corpus, tmp_path):
    ext_run = make_trainer(small_corpus, tmp_path / "ext", backend="ext")
    ext_losses = [ext_run.step().item() for _ in range(10)]
    naive_run = make_trainer(small_corpus, tmp_path / "naive", backend="naive")
    naive_losses = [naive_run.step().item() for _ in range(10)]
    assert ext_run.attention_backend() == "ext"
    # Same seed, same weights, no dropout: only fp32 rounding separates the two kernels.
    assert ext_losses == pytest.approx(naive_losses, rel=1e-4)
    assert ext_losses[-1] < ext_losses[0] - 0.3


def test_gpt_with_ext_dropout_is_repeatable_and_learns(small_corpus, tmp_path):
    # With dropout the masks differ from naive's (another generator); the same seed repeats exactly.
    # Each Trainer seeds torch's global generator, which the ext backend draws its seeds from.
    first = make_trainer(small_corpus, tmp_path / "a", backend="ext", dropout_p=0.2)
    first_losses = [first.step().item() for _ in range(20)]
    second = make_trainer(small_corpus, tmp_path / "b", backend="ext", dropout_p=0.2)
    assert [second.step().item() for _ in range(20)] == first_losses
    assert first_losses[-1] < first_losses[0] - 0.3


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_grouped_query_gpt_trains_with_ext_and_matches_naive_losses(small_corpus, tmp_path, n_kv_head):
    # Four query heads over n_kv_head key/value heads: ext's dk, dv sum each group (csrc/cpu/causal_matmul.cpp).
    config = dict(backend="ext", n_head=4, n_kv_head=n_kv_head)
    ext_run = make_trainer(small_corpus, tmp_path / "ext", **config)
    ext_losses = [ext_run.step().item() for _ in range(10)]
    naive_run = make_trainer(small_corpus, tmp_path / "naive", **{**config, "backend": "naive"})
    naive_losses = [naive_run.step().item() for _ in range(10)]
    assert ext_run.attention_backend() == "ext" and ext_run.model.config.n_kv_head == n_kv_head
    assert ext_losses == pytest.approx(naive_losses, rel=1e-4)
    assert ext_losses[-1] < ext_losses[0] - 0.3
