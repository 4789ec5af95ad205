"""The paged KV cache: paged attention equals attention over the same keys laid out contiguously, bit
for bit, whatever the page order; the pool shares prompt prefixes, copies a shared page before
writing it, frees and reuses pages; bad input is refused in one line."""

import re

import pytest
import torch

from fastgpt.attention import attention
from fastgpt.attention.paged import paged_attention, write_pages
from fastgpt.attention.varlen import varlen_attention
from fastgpt.model.gpt import ModelConfig, build_model
from fastgpt.model.paged_kv import PagePool, pool_bytes
from paged_cases import D, H, H_KV, scattered_pages


@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", ["naive", "sdpa"])
@pytest.mark.parametrize("q_lens", [[1, 1, 1, 1], [1, 3, 17, 2]], ids=["decode", "several-new-tokens"])
def test_paged_attention_equals_contiguous_bit_for_bit(backend, dtype, page_size, q_lens):
    lengths = [1, 17, 300, 40]
    k, v, k_pages, v_pages, table, seq_lens = scattered_pages(lengths, page_size, dtype)
    q = torch.randn(sum(q_lens), H, D, dtype=dtype, generator=torch.Generator().manual_seed(1))
    cu_q = torch.tensor([0, *q_lens]).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    paged = paged_attention(q, k_pages, v_pages, table, seq_lens, cu_q, backend=backend)
    contiguous = varlen_attention(q, k, v, cu_q, cu_k, backend=backend)
    assert torch.equal(paged, contiguous)
    if q_lens[0] == 1 and len(set(q_lens)) == 1:  # None: one query per sequence, the decode step's layout
        assert torch.equal(paged_attention(q, k_pages, v_pages, table, seq_lens, backend=backend), paged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_paged_naive_equals_each_sequences_own_call(dtype):
    # naive runs each sequence as the regular (B, H, T, D) call: the paged one equals it exactly
    lengths, q_lens = [5, 33, 16], [2, 1, 16]
    k, v, k_pages, v_pages, table, seq_lens = scattered_pages(lengths, 16, dtype, seed=2)
    q = torch.randn(sum(q_lens), H, D, dtype=dtype)
    cu_q = torch.tensor([0, *q_lens]).cumsum(0)
    out = paged_attention(q, k_pages, v_pages, table, seq_lens, cu_q, backend="naive", window=(7, 0), softcap=5.0)
    for b, (q0, k0) in enumerate(zip(cu_q[:-1].tolist(), torch.tensor([0, *lengths]).cumsum(0).tolist())):
        as_4d = [t.transpose(0, 1).unsqueeze(0) for t in (q[q0:q0 + q_lens[b]], k[k0:k0 + lengths[b]],
                                                           v[k0:k0 + lengths[b]])]
        alone = attention(*as_4d, backend="naive", window=(7, 0), softcap=5.0)[0].transpose(0, 1)
        assert torch.equal(out[q0:q0 + q_lens[b]], alone)


def test_write_pages_puts_each_new_token_where_the_block_table_says():
    k_pages = torch.zeros(4, 16, 1, 2)
    v_pages = torch.zeros(4, 16, 1, 2)
    table = torch.tensor([[2, 0], [3, 1]], dtype=torch.int32)
    new = torch.arange(6.0).view(3, 1, 2)  # sequence 0: positions 16, 17 (page 0); sequence 1: position 3 (page 3)
    write_pages(k_pages, v_pages, table, torch.tensor([18, 4]), new, -new, torch.tensor([0, 2, 3]))
    assert torch.equal(k_pages[0, :2], new[:2]) and torch.equal(k_pages[3, 3], new[2])
    assert torch.equal(v_pages[3, 3], -new[2]) and k_pages.count_nonzero() == new.count_nonzero()


@pytest.mark.parametrize("change, message", [
    (dict(page_size=24), "page_size (k_pages.shape[1])=24 is not supported: a page holds a multiple of 16 positions, "
                         "from 16 to 4096"),
    (dict(page_size=8), "page_size (k_pages.shape[1])=8 is not supported"),
    (dict(table=[[0, 5]]), "block_table[0] holds page 5, outside the pool's pages 0 .. 3"),
    (dict(table=[[0, -1]]), "block_table[0] holds page -1, outside the pool's pages 0 .. 3"),
    (dict(seq_lens=[33]), "seq_lens[0] = 33 is outside [0, 32]: the block table's 2 pages of 16 positions"),
    (dict(q_lens=[0, 3]), "sequence 0 brings 3 new tokens but seq_lens[0] = 2"),
    (dict(table_dtype=torch.float32), "block_table must be an int32 or int64 tensor (B, max_pages)"),
])
def test_bad_input_is_one_line_naming_argument_value_and_limit(change, message):
    page_size = change.get("page_size", 16)
    k_pages = torch.zeros(4, page_size, H_KV, D)
    table = torch.tensor(change.get("table", [[0, 1]]), dtype=change.get("table_dtype", torch.int32))
    seq_lens = torch.tensor(change.get("seq_lens", [20 if "table" in change else 2]))
    cu_q = torch.tensor(change.get("q_lens", [0, 1])).cumsum(0)
    q = torch.zeros(int(cu_q[-1]), H, D)
    with pytest.raises(ValueError, match=re.escape(message)):
        paged_attention(q, k_pages, k_pages, table, seq_lens, cu_q)


def tiny_pool(num_pages=12, page_size=16):
    return PagePool(n_layer=2, n_kv_head=1, head_dim=4, page_size=page_size, num_pages=num_pages)


def test_prompts_with_a_common_prefix_share_its_full_pages():
    pool = tiny_pool()
    common = list(range(40))  # two full pages and 8 tokens
    assert pool.admit("a", common + [1, 2]) == 0  # the first computes everything
    assert pool.admit("b", common + [3]) == 32  # the second reuses both full pages
    assert pool.admit("c", common[:20]) == 16  # a shorter one the first page
    assert pool.admit("d", [9] + common) == 0  # a different first token: nothing in common
    a, b, c = pool.pages_of("a"), pool.pages_of("b"), pool.pages_of("c")
    assert b[:2] == a[:2] and c[0] == a[0] and b[2] != a[2] and c[1] not in a
    assert pool.refcount[a[0]] == 3 and pool.refcount[a[1]] == 2 and pool.shared_pages() == 2
    assert pool.pages_in_use == 3 + 1 + 1 + 3  # without sharing: 3 + 3 + 2 + 3
    assert pool.admit("e", common[:32]) == 16  # a prompt of exactly two pages computes its last token itself


def test_a_shared_page_is_copied_before_it_is_written():
    pool = tiny_pool()
    pool.admit("a", list(range(20)))  # pages: one full, one with 4 positions
    for k in pool.k:
        k[pool.pages_of("a")[1], :4] = 7.0
    pool.fork("a", "b")  # b continues a's text: every page shared, the partly filled one too
    assert pool.shared_pages() == 2 and pool.pages_in_use == 2
    pool.reserve("b", 21)  # b writes position 20, in the shared second page: its own copy first
    assert pool.copies == 1 and pool.pages_of("b")[0] == pool.pages_of("a")[0]
    mine = pool.pages_of("b")[1]
    assert mine != pool.pages_of("a")[1] and all(bool((k[mine, :4] == 7.0).all()) for k in pool.k)
    pool.reserve("a", 21)  # a's second page is its own again: written in place
    assert pool.copies == 1 and pool.shared_pages() == 1


def test_pages_are_freed_and_reused_lowest_first():
    pool = tiny_pool(num_pages=4)
    pool.admit("a", list(range(40)))  # 3 pages
    with pytest.raises(RuntimeError, match="the page pool's 4 pages are all in use"):
        pool.admit("b", [50] * 20)  # needs 2: refused, and what it took goes back
    assert pool.pages_in_use == 3 and pool.pages_needed() == 3
    pool.release("a")
    assert pool.pages_in_use == 0 and pool.admit("c", list(range(40))) == 0  # a's prefix left with its pages
    assert sorted(pool.pages_of("c")) == [0, 1, 2]


def test_the_pool_takes_what_its_docstring_says():
    pool = PagePool(n_layer=3, n_kv_head=2, head_dim=8, page_size=32, num_pages=5, dtype=torch.bfloat16)
    assert pool.bytes == 5 * 32 * 3 * 2 * 2 * 8 * 2 == pool_bytes(5, 32, 3, 2, 8, torch.bfloat16)


# the paths the GPT's paged steps run: naive and sdpa gather the pages, ext.cpu_flash and triton read them in place
IN_PLACE = {"ext": "ext.cpu_flash", "triton": "triton"}


@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("backend", ["naive", "sdpa", "ext", "triton"])
def test_the_gpts_paged_steps_give_its_contiguous_cache_logits(backend, dtype, page_size):
    from fastgpt.attention import AttentionCall, kernels_ran, refusal

    probe = AttentionCall.like(torch.empty(1, 4, 1, 16, dtype=dtype), kv_heads=2, kv_len=4)
    if backend in IN_PLACE and refusal(probe, IN_PLACE[backend]) is not None:
        pytest.skip(f"{IN_PLACE[backend]} cannot run here: {refusal(probe, IN_PLACE[backend])}")
    torch.manual_seed(0)
    kernels_ran(reset=True)
    model = build_model(ModelConfig(vocab_size=65, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                                    dropout_p=0.0, backend=backend)).to(dtype).eval()  # head dim 16: Triton's least
    pool = model.make_page_pool(3, page_size)
    pool.admit("other", list(range(30)))  # pages taken before, so the sequence's are not 0, 1, ...
    idx = torch.randint(65, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.make_kv_cache()
        contiguous = [model(idx[:, :20], kv_cache=cache)[0]] + [model(idx[:, t:t + 1], kv_cache=cache)[0]
                                                               for t in range(20, 24)]
        pool.admit("s", idx[0, :20].tolist())
        paged = [model(idx[:, :20], paged=pool.step(["s"], [20]))[0]]
        for t in range(20, 24):
            pool.reserve("s", t + 1)
            paged.append(model(idx[:, t:t + 1], paged=pool.step(["s"], [1]))[0])
    if backend in IN_PLACE:  # every paged step of both layers read the pages in place
        assert kernels_ran()[IN_PLACE[backend]] >= 5 * 2
    if backend == "naive":  # the same kernel path on the same shapes: the same bits
        assert all(torch.equal(p, c) for p, c in zip(paged, contiguous))
    else:  # sdpa runs packed sequences as one masked call, ext the regular call another path: other rounding
        torch.testing.assert_close(torch.cat(paged, 1), torch.cat(contiguous, 1))
