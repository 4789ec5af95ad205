"""Grouped-query and multi-query attention: the contract (k, v with H_kv heads dividing H), the
reference, the backends that take it, the ones that refuse it by name, and the GPT with n_kv_head."""

import pytest
import torch

from fastgpt import causal_attention
from fastgpt.attention import Backend, backend_names, get_backend, naive_attention, register_backend, select_kernel
from fastgpt.attention.naive import future_mask
from fastgpt.model.gpt import GPT, ModelConfig
from fastgpt.verify.parity import GQA_SHAPES, check_parity, make_qkv, shape_id, unpack_shape


def repeated(t: torch.Tensor, G: int) -> torch.Tensor:
    """k or v (B, H_kv, T, D) copied per query head: (B, H_kv·G, T, D), head h = h // G of t."""
    return t.repeat_interleave(G, dim=1)


@pytest.mark.parametrize("shape", GQA_SHAPES, ids=shape_id)
def test_the_reference_reads_head_h_over_g(shape):
    # the float64 reference itself, against the lecture's per-head math on copied heads
    B, H, H_kv, T_q, T_k, D = unpack_shape(shape)
    q, k, v = make_qkv(shape, torch.float64, "cpu")
    G = H // H_kv
    expected = naive_attention(q, repeated(k, G), repeated(v, G))
    assert torch.allclose(naive_attention(q, k, v), expected, atol=1e-12, rtol=0)
    # and dropout with a given mask: the mask is per query head
    keep = torch.rand(B, H, T_q, T_k, generator=torch.Generator().manual_seed(1)) > 0.3
    with_mask = naive_attention(q, k, v, 0.3, keep_mask=keep)
    assert torch.allclose(with_mask, naive_attention(q, repeated(k, G), repeated(v, G), 0.3, keep_mask=keep),
                          atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", GQA_SHAPES, ids=shape_id)
def test_sdpa_grouped_query_parity(shape, dtype):
    result = check_parity("sdpa", shape, dtype)
    assert result.ok, result.explain()


def test_heads_that_do_not_divide_are_refused_by_name():
    q = torch.randn(1, 6, 4, 16)
    k = torch.randn(1, 4, 4, 16)
    with pytest.raises(ValueError, match="k has 4 heads and q 6: the key/value heads H_kv must divide the query heads H"):
        causal_attention(q, k, k)


def test_every_backend_takes_grouped_query_calls_and_one_without_refuses_by_name():
    assert all(get_backend(name).grouped_query for name in backend_names())
    q, k, v = make_qkv((2, 6, 2, 9, 9, 16), torch.float32, "cpu")
    # a user's backend registered without grouped_query (the registry is restored after each test)
    register_backend(Backend(name="_per_head_test_backend", fn=lambda *a: pytest.fail("must not run"),
                             description="test only"))
    with pytest.raises(ValueError, match=r"grouped-query attention \(H=6 query heads over H_kv=2\) is not supported"):
        causal_attention(q, k, v, backend="_per_head_test_backend")
    chosen = select_kernel(q, k, v)
    assert get_backend(chosen.backend).grouped_query
    ref = naive_attention(q.double(), k.double(), v.double())
    assert (causal_attention(q, k, v).double() - ref).abs().max() < 1e-5


def test_gpt_with_fewer_key_value_heads_has_fewer_parameters_and_trains():
    torch.manual_seed(0)
    config = dict(vocab_size=11, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout_p=0.1, backend="sdpa")
    mha, gqa = GPT(ModelConfig(**config)), GPT(ModelConfig(**config, n_kv_head=1))
    D = 32 // 4
    # per layer, the projection makes 2·(4 - 1) fewer heads of D outputs over 32 inputs
    assert sum(p.numel() for p in mha.parameters()) - sum(p.numel() for p in gqa.parameters()) == 2 * 2 * 3 * D * 32
    idx = torch.randint(0, 11, (4, 16), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(gqa.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        _, loss = gqa(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_cached_generation_gives_the_uncached_tokens_with_shared_heads(n_kv_head):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=11, block_size=12, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=32,
                            dropout_p=0.0, backend="sdpa")).eval()
    prompt = torch.zeros((2, 1), dtype=torch.long)
    outs = [model.generate(prompt, 20, generator=torch.Generator().manual_seed(3), kv_cache=cached) for cached in (True, False)]
    assert torch.equal(*outs)  # 20 tokens cross block_size 12: the exact policy re-prefills


def test_n_kv_head_that_does_not_divide_n_head_is_refused():
    with pytest.raises(ValueError, match="n_kv_head=3 must be a positive integer dividing n_head=4"):
        ModelConfig(n_head=4, n_kv_head=3, n_embd=32).validate()


def test_future_mask_is_per_query_and_key_only():
    # the mask the grouped views broadcast over: (T_q, T_k), the same for every head
    assert future_mask(2, 5).tolist() == [[False] * 4 + [True], [False] * 5]


def test_train_and_sample_a_grouped_query_model_from_the_command_line(small_corpus, tmp_path, capsys):
    from fastgpt.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "--data", str(small_corpus), "--out-dir", out, "--n-layer", "1", "--n-head", "4",
                 "--n-kv-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4", "--max-iters", "3",
                 "--eval-iters", "1", "--sample-tokens", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["sample", "--out-dir", out, "--prompt", "To", "--max-new-tokens", "10", "--linear", "torch"]) == 0
    assert capsys.readouterr().out.startswith("To")
    state = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert state["model_config"]["n_kv_head"] == 2
