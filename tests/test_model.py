import math

import pytest
import torch

from fastgpt.model.gpt import GPT, BigramLanguageModel, ModelConfig, build_model

TINY = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout_p=0.0, backend="naive")


def test_forward_shapes_and_loss_at_init_is_ln_vocab():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY))
    idx = torch.randint(65, (4, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (4, 16, 65)
    assert abs(loss.item() - math.log(65)) < 0.05  # ≈ 4.17: the model starts as a uniform guess
    logits, loss = model(idx)
    assert loss is None


def test_backward_reaches_every_parameter():
    model = build_model(ModelConfig(**TINY))
    idx = torch.randint(65, (2, 16))
    model(idx, idx)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_shakespeare_char_architecture_has_lecture_size():
    model = build_model(ModelConfig(vocab_size=65, block_size=256, n_layer=6, n_head=6, n_embd=384))
    assert isinstance(model, GPT)
    assert 10.7e6 < sum(p.numel() for p in model.parameters()) < 10.9e6  # the lecture's "10.788929 M"


def test_generate_length_and_context_cropping():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY))
    seen_lengths = []
    model.register_forward_pre_hook(lambda m, args: seen_lengths.append(args[0].shape[1]))
    prompt = torch.zeros(2, 20, dtype=torch.long)  # longer than block_size 16
    out = model.generate(prompt, max_new_tokens=5)
    assert out.shape == (2, 25)
    assert torch.equal(out[:, :20], prompt)
    assert max(seen_lengths) == 16  # never more than block_size tokens reach the model


def test_generate_top_k_1_is_greedy_and_restores_training_mode():
    model = build_model(ModelConfig(**TINY))
    model.train()
    idx = torch.zeros(1, 1, dtype=torch.long)
    a = model.generate(idx, 10, top_k=1)
    b = model.generate(idx, 10, top_k=1)
    assert torch.equal(a, b) and model.training


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=1, temperature=0.0), "temperature must be a finite number > 0"),
    (dict(max_new_tokens=1, top_k=0), "top_k must be >= 1"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    model = build_model(ModelConfig(**TINY))
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 1, dtype=torch.long), **kwargs)


def test_forward_rejects_context_longer_than_block_size():
    model = build_model(ModelConfig(**TINY))
    with pytest.raises(ValueError, match="T=17 tokens but block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_bigram_is_one_table_and_generates():
    model = build_model(ModelConfig(model="bigram", vocab_size=65))
    assert isinstance(model, BigramLanguageModel)
    assert [p.shape for p in model.parameters()] == [(65, 65)]
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 7)
    assert out.shape == (1, 10)


@pytest.mark.parametrize("field, value, match", [
    ("n_head", 5, "n_embd=32 must be divisible by n_head=5"),
    ("dropout_p", 1.0, r"dropout_p must be in \[0, 1\)"),
    ("model", "rnn", "model must be 'gpt' or 'bigram'"),
    ("n_layer", 0, "n_layer must be a positive integer"),
])
def test_bad_model_config(field, value, match):
    with pytest.raises(ValueError, match=match):
        build_model(ModelConfig(**{**TINY, field: value}))
