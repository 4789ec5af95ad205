"""Variable-length attention (fastgpt/attention/varlen.py): the contract, the reference, sdpa's
block-diagonal path, flash-attention's signature, padded batches as one varlen call
(fastgpt/attention/padding.py) and the bad input each refuses."""

import pytest
import torch

from fastgpt.attention import (
    attention,
    flash_attn_varlen_func,
    get_path,
    kernels_ran,
    naive_varlen_attention,
    padded_attention,
    varlen_attention,
)
from fastgpt.attention.naive import naive_attention, varlen_hidden_keys
from fastgpt.attention.varlen import varlen_layout
from fastgpt.verify.parity import compare

AWKWARD = (1, 2, 17, 255, 256, 257, 1000)


def packed(q_lens, k_lens=None, H=4, H_kv=2, D=16, dtype=torch.float64, seed=0):
    """q (total_q, H, D), k, v (total_k, H_kv, D) and int32 cu_seqlens for these lengths."""
    k_lens = q_lens if k_lens is None else k_lens
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(q_lens), H, D, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(sum(k_lens), H_kv, D, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(sum(k_lens), H_kv, D, generator=g, dtype=torch.float64).to(dtype)
    cu = [torch.tensor([0, *lens]).cumsum(0).to(torch.int32) for lens in (q_lens, k_lens)]
    return q, k, v, cu[0], cu[1]


def dense_block_diagonal(q, k, v, cu_q, cu_k, causal=True, window=(-1, 0)):
    """An independent formulation: one softmax over every packed key, the other sequences and the
    hidden keys masked (rows that see no key: 0)."""
    layout = varlen_layout(q, k, cu_q, cu_k, causal=causal)
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, kk) * q.shape[-1] ** -0.5
    hidden = varlen_hidden_keys(layout, causal, window)
    weights = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("hij,jhd->ihd", weights, vv)


@pytest.mark.parametrize("causal,window", [(True, (-1, 0)), (False, (-1, -1)), (True, (3, 0)), (False, (2, 1))])
def test_reference_equals_a_block_diagonal_softmax(causal, window):
    q_lens, k_lens = (3, 1, 17, 0, 5), (5, 1, 20, 3, 5)
    q, k, v, cu_q, cu_k = packed(q_lens, k_lens)
    got = naive_varlen_attention(q, k, v, cu_q, cu_k, causal=causal, window=window)
    want = dense_block_diagonal(q, k, v, cu_q, cu_k, causal, window)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_equal_lengths_are_the_regular_batched_call():
    B, T = 3, 9
    q, k, v, cu, _ = packed((T,) * B)
    as_batch = [t.view(B, T, *t.shape[1:]).transpose(1, 2) for t in (q, k, v)]  # (B, heads, T, D)
    out, lse = varlen_attention(q, k, v, cu, cu, softcap=5.0, return_lse=True, backend="naive")
    want, want_lse = attention(*as_batch, softcap=5.0, return_lse=True, backend="naive")
    torch.testing.assert_close(out, want.transpose(1, 2).reshape(B * T, 4, 16), rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse.permute(1, 0, 2).reshape(4, B * T), rtol=0, atol=0)


OPTION_CASES = {
    "causal": dict(),
    "bidirectional": dict(causal=False),
    "window": dict(window=(31, 0)),
    "bidirectional_window": dict(causal=False, window=(8, 3)),
    "alibi": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sdpa_runs_a_packed_batch_within_tolerance(case, dtype):
    options = OPTION_CASES[case]
    q_lens = AWKWARD if dtype == torch.float32 else (1, 2, 17, 64)
    k_lens = tuple(n + (3 if b % 2 else 0) for b, n in enumerate(q_lens))  # T_q != T_k in some sequences
    q, k, v, cu_q, cu_k = packed(q_lens, k_lens)
    dout = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    kernels_ran(reset=True)
    result = compare(lambda q, k, v: varlen_attention(q, k, v, cu_q, cu_k, backend="sdpa", **options),
                     lambda q, k, v: naive_varlen_attention(q, k, v, cu_q, cu_k, **options), (q, k, v), dout, dtype)
    assert result.ok, result.report()
    assert kernels_ran() == {"sdpa": 1}  # one call for the whole packed batch


def test_sequences_of_length_zero_and_keyless_rows():
    q, k, v, cu_q, cu_k = packed((2, 0, 3), (0, 4, 3))
    out, lse = varlen_attention(q, k, v, cu_q, cu_k, causal=False, return_lse=True, backend="naive")
    assert torch.equal(out[:2], torch.zeros_like(out[:2])) and torch.isinf(lse[:, :2]).all()
    torch.testing.assert_close(varlen_attention(q, k, v, cu_q, cu_k, causal=False, backend="sdpa"), out)


def test_auto_runs_a_path_that_takes_packed_sequences():
    q, k, v, cu, _ = packed((5, 9), dtype=torch.float32)
    kernels_ran(reset=True)
    varlen_attention(q, k, v, cu, cu)
    (name,) = kernels_ran()
    assert "varlen" in get_path(name).options


def test_flash_attn_signature_ports_in_a_line():
    q, k, v, cu_q, cu_k = packed((4, 7), (6, 7))
    out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 7, backend="naive")  # causal=False by default, as there
    torch.testing.assert_close(out, naive_varlen_attention(q, k, v, cu_q, cu_k, causal=False))
    out, lse, s_dmask = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 7, 0.0, 0.3, True, (2, -1),
                                               return_attn_probs=True, backend="naive")
    want, want_lse = naive_varlen_attention(q, k, v, cu_q, cu_k, scale=0.3, window=(2, 0), return_lse=True)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(lse, want_lse)
    assert s_dmask is None and lse.shape == (4, 11)


def _bad(**change):
    q, k, v, cu_q, cu_k = packed((3, 5), (3, 5))
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    args.update(change)
    return args


@pytest.mark.parametrize("change,message", [
    (dict(q=torch.randn(1, 8, 4, 16)), "q must have 3 dims"),
    (dict(cu_seqlens_q=torch.tensor([0, 3, 7])), "cu_seqlens_q = [0, 3, 7] must start at 0, never decrease, and end at 8"),
    (dict(cu_seqlens_q=torch.tensor([0, 5, 3, 8])), "never decrease"),
    (dict(cu_seqlens_q=torch.tensor([1, 3, 8])), "must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 3, 8], dtype=torch.float32)), "cu_seqlens_k has dtype torch.float32"),
    (dict(cu_seqlens_k=torch.tensor([[0, 3, 8]])), "cu_seqlens_k has shape (1, 3)"),
    (dict(cu_seqlens_k=torch.tensor([0, 8])), "cu_seqlens_q holds 2 sequences and cu_seqlens_k 1"),
    (dict(cu_seqlens_k=torch.tensor([0, 1, 8])), "sequence 0 has 3 queries but 1 keys"),
    (dict(cu_seqlens_q=[0, 3, 8]), "cu_seqlens_q must be a 1-D integer torch.Tensor"),
    (dict(k=torch.randn(8, 3, 16, dtype=torch.float64), v=torch.randn(8, 3, 16, dtype=torch.float64)),
     "the key/value heads H_kv must divide the query heads H"),
])
def test_bad_input_is_refused_in_one_line(change, message):
    with pytest.raises((ValueError, TypeError)) as error:
        varlen_attention(**_bad(**change), backend="naive")
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_seqlen_q=2), "max_seqlen_q = 2 must be an int at least the longest sequence, 5"),
    (dict(alibi_slopes=torch.ones(3, 4)), "alibi_slopes has shape (3, 4); it must be (H,) = (4,) or (B, H) = (2, 4)"),
    (dict(sinks=torch.ones(2)), "sinks has shape (2); it must be (H,) = (4,)"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=None) as error:
        varlen_attention(**_bad(), backend="naive", **kwargs)
    assert message in str(error.value)


def test_per_sequence_alibi_slopes_follow_their_sequence():
    q, k, v, cu, _ = packed((4, 6))
    slopes = torch.tensor([[0.5, 0.1, 0.2, 0.3], [0.0, 0.7, 0.0, 0.0]])
    out = varlen_attention(q, k, v, cu, cu, alibi_slopes=slopes, backend="naive")
    second = [t[4:].transpose(0, 1)[None] for t in (q, k, v)]
    want = naive_attention(*second, alibi_slopes=slopes[1:2])[0].transpose(0, 1)
    torch.testing.assert_close(out[4:], want, rtol=0, atol=0)


# ---- padded batches -------------------------------------------------------------------------------

def _rows_one_by_one(q, k, v, key_mask, **options):
    """Each row's real queries over its real keys, alone (causal: the queries are the last T_q keys)."""
    out = torch.zeros_like(q)
    T_q, T_k = q.shape[2], k.shape[2]
    for b in range(q.shape[0]):
        real_k = key_mask[b].nonzero().flatten()
        real_q = (key_mask[b, T_k - T_q:].nonzero().flatten())
        if real_q.numel():
            out[b, :, real_q] = naive_attention(q[b:b + 1, :, real_q], k[b:b + 1, :, real_k], v[b:b + 1, :, real_k],
                                                **options)[0]
    return out


MASKS = {
    "left": [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]],
    "right": [[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]],
    "gaps": [[1, 0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1, 1]],
}


@pytest.mark.parametrize("pattern", list(MASKS))
@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_a_padded_batch_is_one_varlen_call(pattern, backend):
    torch.manual_seed(0)
    key_mask = torch.tensor(MASKS[pattern]).bool()
    q, k, v = torch.randn(3, 4, 7, 16), torch.randn(3, 2, 7, 16), torch.randn(3, 2, 7, 16)
    kernels_ran(reset=True)
    out = padded_attention(q, k, v, key_mask, softcap=0.0, backend=backend)
    assert kernels_ran() == {backend: 1}
    torch.testing.assert_close(out, _rows_one_by_one(q.double(), k.double(), v.double(), key_mask).float(),
                               rtol=1e-5, atol=1e-5)


def test_bidirectional_padding_masks_keys_only_for_every_query():
    torch.manual_seed(1)
    key_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    q, k, v = torch.randn(2, 4, 3, 16, dtype=torch.float64), *torch.randn(2, 2, 2, 5, 16, dtype=torch.float64)
    out = padded_attention(q, k, v, key_mask, causal=False, backend="naive")  # cross-attention: T_q != T_k
    want = naive_attention(q[:1], k[:1, :, :3], v[:1, :, :3], causal=False)
    torch.testing.assert_close(out[:1], want, rtol=0, atol=0)


def test_padded_gradients_match_rows_one_by_one():
    torch.manual_seed(2)
    key_mask = torch.tensor(MASKS["left"]).bool()
    inputs = [torch.randn(3, 4, 7, 16, dtype=torch.float64), torch.randn(3, 2, 7, 16, dtype=torch.float64),
              torch.randn(3, 2, 7, 16, dtype=torch.float64)]
    dout = torch.randn(3, 4, 7, 16, dtype=torch.float64)
    grads = []
    for fn in (lambda q, k, v: padded_attention(q, k, v, key_mask, window=(2, 0), backend="naive"),
               lambda q, k, v: _rows_one_by_one(q, k, v, key_mask, window=(2, 0))):
        leaves = [t.clone().requires_grad_() for t in inputs]
        (fn(*leaves) * dout).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_a_window_over_gaps_is_refused_by_name():
    q, k = torch.randn(3, 4, 7, 16), torch.randn(3, 2, 7, 16)
    with pytest.raises(ValueError, match=r"key_mask row 0 has padding between real tokens \(1011011\)"):
        padded_attention(q, k, k, torch.tensor(MASKS["gaps"]).bool(), window=(2, 0))
    with pytest.raises(ValueError, match=r"key_mask has shape \(3, 6\); it must be \(B, T_k\) = \(3, 7\)"):
        padded_attention(q, k, k, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_mask has dtype torch.float32"):
        padded_attention(q, k, k, torch.ones(3, 7))


def test_fastgpt_parity_checks_packed_sequences_and_the_timings_refuse_them(capsys):
    from fastgpt.bench.variants import parse_variants
    from fastgpt.cli import main

    assert main(["parity", "--backends", "sdpa", "--variants", "varlen", "--dtypes", "float32"]) == 0
    out = capsys.readouterr().out
    assert "-- varlen" in out and "FAIL" not in out and " ok" in out
    with pytest.raises(ValueError, match="--variants varlen/paged: the attention timings take the"):
        parse_variants(["causal", "varlen"])


def test_the_lengths_are_read_once_per_cu_seqlens_and_again_after_a_change(monkeypatch):
    import fastgpt.attention.varlen as varlen

    q, k, v, cu, _ = packed((3, 5))
    reads = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **kw: reads.append(self is cu) or real_to(self, *a, **kw))
    for _ in range(3):
        varlen_attention(q, k, v, cu, cu, backend="naive")
    assert sum(reads) == 1  # one tensor, read once for three calls (as q's and as k's)
    cu[1] = 4  # an in-place change: read again, and checked again
    with pytest.raises(ValueError, match="sequence 0 has 4 queries but 3 keys"):  # the new values
        varlen.varlen_layout(q, k, cu, torch.tensor([0, 3, 8], dtype=torch.int32))
    assert sum(reads) == 2
    with torch.inference_mode():  # inference tensors keep no version: read at every call, and never cached
        frozen = torch.tensor([0, 3, 8], dtype=torch.int32)
        varlen_attention(q, k, v, frozen, frozen, backend="naive")
        varlen_attention(q, k, v, frozen, frozen, backend="naive")
    assert all(entry[0]() is not frozen for entry in varlen._READ.values())  # (an id may be a dead tensor's)


def test_the_newest_cu_seqlens_is_remembered_however_many_are_alive():
    import fastgpt.attention.varlen as varlen

    q, k, v, _, _ = packed((3, 5))
    alive = [torch.tensor([0, 3, 8], dtype=torch.int32) for _ in range(100)]
    for cu in alive:
        varlen.varlen_layout(q, k, cu, cu)
    assert len(varlen._READ) <= 64 and id(alive[-1]) in varlen._READ


def test_the_kernels_read_a_private_copy_of_cu_seqlens():
    from fastgpt.attention.varlen import varlen_call

    q, k, v, cu, _ = packed((3, 5))
    call = varlen_call(q, k, v, cu, cu)
    cu.numpy()[1] = 7  # a change the version counter does not see
    assert call.varlen.cu_seqlens_q.tolist() == [0, 3, 8]
    again = varlen_call(q, k, v, cu, cu)  # answered from what was read: consistent with its own copy
    assert again.varlen.cu_seqlens_q.tolist() == [0, 3, 8] and again.varlen.q_lens == (3, 5)
