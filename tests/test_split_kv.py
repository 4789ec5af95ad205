"""Split-KV decoding (fastgpt/attention/split_kv.py): chunks of the keys merged by their lse equal
the unsplit call within float32 tolerance, with every option a decode step can have; what it
refuses; and the merge on its own."""

import pytest
import torch

from fastgpt.attention import attention, kernels_ran, naive_varlen_attention, refusal, varlen_attention
from fastgpt.attention.call import AttentionCall
from fastgpt.attention.registry import choose
from fastgpt.attention.split_kv import CPU_SPLIT_MIN_KEYS, merge_partials, split_kv_attention, split_refusal
from fastgpt.attention.varlen import varlen_call

H, H_KV, D = 4, 2, 16


def decode_batch(k_lens, q_lens=None, dtype=torch.float32, seed=0):
    q_lens = (1,) * len(k_lens) if q_lens is None else q_lens
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), H, D, generator=g).to(dtype)
    k = torch.randn(sum(k_lens), H_KV, D, generator=g).to(dtype)
    v = torch.randn(sum(k_lens), H_KV, D, generator=g).to(dtype)
    cu = [torch.tensor([0, *lens]).cumsum(0).to(torch.int32) for lens in (q_lens, k_lens)]
    return q, k, v, cu[0], cu[1]


OPTIONS = {
    "plain": dict(),
    "window": dict(window=(300, 0)),
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])),
    "alibi": dict(alibi_slopes=torch.tensor([0.01, 0.002, 0.0, 0.03])),
    "all": dict(window=(1500, 0), softcap=3.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]),
                alibi_slopes=torch.tensor([0.01, 0.002, 0.0, 0.03])),
}
INNER = ["naive"] + [p for p in ("ext.cpu_flash", "triton")
                     if refusal(varlen_call(*decode_batch((64,)), return_lse=True), p) is None]


@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("case", list(OPTIONS))
@pytest.mark.parametrize("chunk", [64, 1000])
def test_split_equals_unsplit_within_float32_tolerance(case, chunk, inner):
    # sequences of awkward lengths, one of them shorter than a chunk, one without a query (shorter
    # in Triton's interpreter, which runs a program at a time)
    lengths = (2500, 1, 257, 1000, 3) if inner != "triton" else (700, 1, 257, 3)
    q, k, v, cu_q, cu_k = decode_batch(lengths, (1, 1, 1, 0, 1)[:len(lengths) - 1] + (1,))
    options = OPTIONS[case]
    call = varlen_call(q, k, v, cu_q, cu_k, return_lse=True, **options)
    assert split_refusal(call) is None
    out, lse = split_kv_attention(q, k, v, call, inner, chunk_keys=chunk)
    want, want_lse = naive_varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, return_lse=True,
                                            **options)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse.double(), rtol=2e-5, atol=2e-5)


def test_a_single_sequence_in_the_batched_layout_is_split_without_a_copy():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, H, 1, D, generator=g), torch.randn(1, H_KV, 5000, D, generator=g), \
        torch.randn(1, H_KV, 5000, D, generator=g)
    call = AttentionCall.of(q, k, v, return_lse=True)
    out, lse = split_kv_attention(q, k, v, call, "naive", chunk_keys=512)
    want, want_lse = attention(q.double(), k.double(), v.double(), return_lse=True, backend="naive")
    assert out.shape == (1, H, 1, D) and lse.shape == (1, H, 1)
    torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse.double(), rtol=2e-5, atol=2e-5)


@pytest.mark.skipif("ext.cpu_flash" not in INNER, reason="the ext library is not available here")
def test_auto_splits_long_decode_steps_only_and_the_path_runs_by_name():
    q, k, v, cu_q, cu_k = decode_batch((CPU_SPLIT_MIN_KEYS + 5, 40))  # H = 4 query heads over H_kv = 2
    kernels_ran(reset=True)
    out = varlen_attention(q, k, v, cu_q, cu_k, backend="ext")
    assert kernels_ran() == {"ext.cpu_split_kv": 1, "ext.cpu_flash": 1}  # the split, and the packed call inside it
    torch.testing.assert_close(out.double(), naive_varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k),
                               rtol=2e-5, atol=2e-5)
    short = decode_batch((CPU_SPLIT_MIN_KEYS - 1, 40))
    assert choose(varlen_call(*short), "ext").name == "ext.cpu_flash"  # declined: too short to pay
    one_per_head = varlen_call(q[:, :2], k, v, cu_q, cu_k)  # H = H_kv: the split pays only on longer caches
    assert choose(one_per_head, "ext").name == "ext.cpu_flash"
    assert choose(varlen_call(*short), "ext.cpu_split_kv").name == "ext.cpu_split_kv"  # by name, it runs
    with pytest.raises(ValueError, match="ext.cpu_split_kv does not take bidirectional"):
        varlen_attention(*short, causal=False, backend="ext.cpu_split_kv")


def test_what_it_refuses_is_named():
    q, k, v, cu_q, cu_k = decode_batch((10, 20), (2, 1))
    assert "one query per sequence" in split_refusal(varlen_call(q, k, v, cu_q, cu_k))
    q, k, v, cu_q, cu_k = decode_batch((10, 20))
    assert "no dropout" in split_refusal(varlen_call(q, k, v, cu_q, cu_k, dropout_p=0.1))
    assert "bidirectional" in split_refusal(varlen_call(q, k, v, cu_q, cu_k, causal=False))
    assert "forward only" in split_refusal(varlen_call(q.requires_grad_(), k, v, cu_q, cu_k))
    batch = torch.randn(2, H, 1, D), torch.randn(2, H_KV, 30, D)
    assert "B = 1" in split_refusal(AttentionCall.of(batch[0], batch[1], batch[1]))


def test_merging_two_halves_is_the_whole():
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(1, H, 1, D, generator=g), torch.randn(1, H, 40, D, generator=g), \
        torch.randn(1, H, 40, D, generator=g)
    parts = [attention(q, k[:, :, s], v[:, :, s], causal=False, return_lse=True, backend="naive")
             for s in (slice(0, 25), slice(25, 40))]
    part = torch.cat([o[0].transpose(0, 1) for o, _ in parts])  # (2, H, D)
    part_lse = torch.cat([lse[0] for _, lse in parts], dim=1)  # (H, 2)
    out, lse = merge_partials(part, part_lse, torch.tensor([0, 0]), 1)
    want, want_lse = attention(q, k, v, causal=False, return_lse=True, backend="naive")
    torch.testing.assert_close(out, want[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, want_lse[0], rtol=1e-5, atol=1e-6)
    empty, empty_lse = merge_partials(part, part_lse, torch.tensor([0, 0]), 2)  # query 1 has no partial
    assert torch.equal(empty[1], torch.zeros(H, D)) and torch.isinf(empty_lse[:, 1]).all()
