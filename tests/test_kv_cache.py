"""Generation with a KV cache: the same tokens as without (exact policy), in every backend that runs
on CPU; the approximate window policy rebuilds only every block_size // 2 tokens."""

import pytest
import torch

from fastgpt.attention import AttentionCall, refusal
from fastgpt.model.kv_cache import KVCache, plan_step
from fastgpt.model.gpt import ModelConfig, build_model

# head size 32 // 2 = 16 (the Triton kernel's smallest), context 16, so a few dozen tokens cross it
TINY = dict(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout_p=0.0)
BACKENDS = ["naive", "sdpa", "ext", "triton"]


def tiny_model(backend: str):
    reason = refusal(AttentionCall.like(torch.zeros(1, 2, 1, 16)), backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    torch.manual_seed(0)
    return build_model(ModelConfig(**TINY, backend=backend))


def sample(model, prompt_len: int, new: int, **kwargs) -> torch.Tensor:
    idx = torch.randint(65, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    return model.generate(idx, new, generator=torch.Generator().manual_seed(2), **kwargs)


@pytest.mark.parametrize("prompt_len", [3, 20], ids=["prompt-shorter-than-block", "prompt-longer-than-block"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_generation_equals_uncached(backend, prompt_len):
    model = tiny_model(backend)
    new = 24  # from 3 tokens this crosses block_size 16: decode steps, then re-prefills
    uncached = sample(model, prompt_len, new, kv_cache=False)
    cached = sample(model, prompt_len, new, kv_cache=True, cache_policy="exact")
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_then_decode_gives_the_full_forwards_logits(backend):
    # the numbers behind the equal tokens: position by position, the cache changes only rounding
    model = tiny_model(backend).eval()
    idx = torch.randint(65, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full, _ = model(idx)  # (2, 16, V)
        cache = model.make_kv_cache()
        steps = [model(idx[:, :9], kv_cache=cache)[0]]  # prefill 9, then 1, then 6 at once
        steps.append(model(idx[:, 9:10], kv_cache=cache)[0])
        steps.append(model(idx[:, 10:], kv_cache=cache)[0])
    assert cache.length == 16
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_window_policy_equals_exact_within_block_and_rebuilds_every_half_block():
    model = tiny_model("sdpa")
    fed = []
    model.register_forward_pre_hook(lambda m, args, kwargs: fed.append(args[0].shape[1]), with_kwargs=True)
    within = 16 - 3  # 3 + 13 = 16 tokens: the window never shifts
    assert torch.equal(sample(model, 3, within, cache_policy="window"), sample(model, 3, within))
    fed.clear()
    out = sample(model, 3, 40, cache_policy="window")
    assert out.shape == (2, 43)
    # prefill 3, decode to the full 16 positions, then rebuild from the last 8 and decode 8 more
    assert fed == [3] + [1] * 13 + ([8] + [1] * 8) * 2 + [8] + [1] * 7
    assert not torch.equal(out, sample(model, 3, 40, kv_cache=False))  # approximate past block_size


def test_exact_policy_re_prefills_the_cropped_window_past_block_size():
    cache = KVCache(n_layer=1, block_size=16)
    assert plan_step(20, cache, "exact").window == 16  # first step of a long prompt: crop
    cache.layers[0].length = 15
    assert not plan_step(16, cache, "exact").prefill  # the 16th token fits: decode
    cache.layers[0].length = 16
    assert plan_step(17, cache, "exact").window == 16  # the window shifted: every position moved
    with pytest.raises(ValueError, match="cache_policy must be one of 'exact', 'window'; got 'lru'"):
        plan_step(17, cache, "lru")


def test_cache_overflow_and_bad_policy_are_refused():
    model = tiny_model("naive").eval()
    cache = model.make_kv_cache()
    model(torch.zeros(1, 10, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="T=7 tokens after 10 cached positions but block_size is 16"):
        model(torch.zeros(1, 7, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="cache_policy must be one of"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 1, cache_policy="lru")


def test_bigram_has_nothing_to_cache():
    model = build_model(ModelConfig(model="bigram", vocab_size=65))
    assert model.make_kv_cache() is None
    a = model.generate(torch.zeros(1, 2, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0))
    b = model.generate(torch.zeros(1, 2, dtype=torch.long), 5, generator=torch.Generator().manual_seed(0), kv_cache=False)
    assert torch.equal(a, b)
