"""Dropout inside the fused softmax: the Philox stream, the exact mask, its rate, determinism.

The mask is a function of (seed, offset, row, column) only (csrc/philox.h); these tests pin that
function with an independent pure-Python Philox4x32-10 (checked against Random123's known-answer
vectors), so the CUDA kernels (csrc/cuda/) can be held to the same bits.
"""

from __future__ import annotations

import pytest
import torch

import fastgpt.ext as ext
from fastgpt.attention.ext_backend import ext_attention
from fastgpt.ext import layout
from fastgpt.verify.parity import SQUARE_SHAPES, make_qkv, tolerance
from ext_reference import future_mask, random_packed, ref_attention, ref_softmax, valid_mask

M32 = 0xFFFFFFFF


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ext.load()


def philox4x32_10(counter, key):
    """Philox4x32-10 in plain Python integers (Salmon et al. 2011)."""
    c = list(counter)
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & M32, p1 & M32, ((p0 >> 32) ^ c[3] ^ k1) & M32, p0 & M32]
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c


def python_keep_mask(B, H, T_q, T_k, p, seed, offset):
    """The documented stream: element (i, j) of head bh is row (bh·T_q + i), column j; counter
    (col // 4, row, offset_lo, offset_hi), key (seed_lo, seed_hi), word col % 4, keep when
    word >= floor(p · 2^32); False at j > T_k - T_q + i."""
    seed, offset = seed % 2**64, offset % 2**64
    key = (seed & M32, seed >> 32)
    threshold = int(p * 2**32)
    keep = torch.zeros(B * H * T_q, T_k, dtype=torch.bool)
    for row in range(B * H * T_q):
        visible = T_k - T_q + row % T_q + 1
        for g in range((visible + 3) // 4):
            words = philox4x32_10((g, row, offset & M32, offset >> 32), key)
            for c in range(4 * g, min(visible, 4 * g + 4)):
                keep[row, c] = words[c % 4] >= threshold
    return keep.view(B, H, T_q, T_k)


def test_python_philox_matches_random123_known_answers():
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox4x32_10((M32,) * 4, (M32, M32)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("seed, offset", [(0, 0), (2**40 + 17, 3), (-5, 2**33 + 1)])
@pytest.mark.parametrize("T_q, T_k", [(11, 11), (5, 23), (1, 9)])
def test_keep_mask_is_the_documented_philox_stream(seed, offset, T_q, T_k):
    B, H, p = 2, 3, 0.3
    scores = torch.zeros(B, H, layout.packed_size(T_q, T_k))
    got = ext.dropout_keep_mask(scores, T_q, T_k, p, seed, offset)
    assert torch.equal(got, python_keep_mask(B, H, T_q, T_k, p, seed, offset))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T_q, T_k", [(150, 150), (70, 200), (1, 150)])
def test_softmax_applies_exactly_its_mask(dtype, T_q, T_k):
    # 150+ keys: rows span several 16-lane Philox batches and a ragged tail in the vectorised kernel.
    B, H, p, seed, offset = 2, 2, 0.4, 99, 5
    scores = random_packed(B, H, T_q, T_k) * T_k**0.5
    keep = ext.dropout_keep_mask(scores.float(), T_q, T_k, p, seed, offset)
    out = layout.unpack(ext.causal_softmax(scores.to(dtype), T_q, T_k, 0.3, p, seed, offset), T_q, T_k)
    expected = layout.unpack(ref_softmax(scores.to(dtype).double(), T_q, T_k, 0.3, keep, p), T_q, T_k)
    lower = ~future_mask(T_q, T_k)
    assert torch.equal(out[..., lower] == 0, ~keep[..., lower])  # zero exactly where dropped
    assert not keep[..., ~lower].any()
    torch.testing.assert_close(out.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)


def dropout_parity(q, k, v, p, seed, offset, dout):
    """ext attention with dropout against the float64 reference fed ext's mask; the rule of
    fastgpt.verify.parity (factor × the same-dtype reference error with that mask, plus the dtype floor)."""
    B, H, T_q, D = q.shape
    T_k = k.shape[2]
    keep = ext.dropout_keep_mask(torch.empty(B, H, layout.packed_size(T_q, T_k)), T_q, T_k, p, seed, offset)

    def run(fn, q, k, v, dout):
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = fn(q, k, v)
        out.backward(dout)
        return [out.detach(), q.grad, k.grad, v.grad]

    reference = lambda q, k, v: ref_attention(q, k, v, p, D**-0.5, keep=keep)  # noqa: E731
    ref = run(reference, q.double(), k.double(), v.double(), dout)
    same = run(reference, q, k, v, dout.to(q.dtype))
    got = run(lambda q, k, v: ext_attention(q, k, v, p, D**-0.5, seed=seed, offset=offset), q, k, v, dout.to(q.dtype))
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        limit = tolerance(name, (same[i].double() - ref[i]).abs().max().item(), q.dtype)
        err = (got[i].double() - ref[i]).abs().max().item()
        assert err <= limit, f"{name}: {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SQUARE_SHAPES, ids=[f"B{b}H{h}T{t}D{d}" for b, h, t, d in SQUARE_SHAPES])
def test_backend_dropout_parity_with_its_own_mask(shape, dtype):
    q, k, v = make_qkv(shape, dtype, "cpu")
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dropout_parity(q, k, v, 0.2, 1234, 0, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T_q, T_k", [(1, 200), (63, 64), (65, 130), (17, 130)])
def test_backend_dropout_parity_fewer_queries(T_q, T_k, dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, T_q, 32, generator=g, dtype=torch.float64).to(dtype)
    k, v = (torch.randn(2, 2, T_k, 32, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    dout = torch.randn(2, 2, T_q, 32, generator=g, dtype=torch.float64)
    dropout_parity(q, k, v, 0.2, 77, 3, dout)


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_kept_fraction(p):
    B, H, T = 4, 6, 256  # 790k lower-triangle draws: the standard error is ~6e-4
    scores = random_packed(B, H, T, T).float()
    lower, valid = ~future_mask(T), valid_mask(T, T)
    kept_mask = ext.dropout_keep_mask(scores, T, T, p, 7, 0)[..., lower].float().mean().item()
    kept_out = (ext.causal_softmax(scores, T, T, 0.1, p, 7, 0)[..., valid] != 0).float().mean().item()
    assert abs(kept_mask - (1 - p)) <= 0.01
    assert abs(kept_out - (1 - p)) <= 0.01


def test_fixed_seed_is_deterministic_and_seeds_differ():
    q, k, v = make_qkv((2, 3, 64, 32), torch.float32, "cpu")
    dout = torch.randn(2, 3, 64, 32)

    def run(seed, offset=0):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = ext_attention(*leaves, 0.3, seed=seed, offset=offset)
        out.backward(dout)
        return [out.detach()] + [t.grad for t in leaves]

    first, again = run(42), run(42)
    assert all(torch.equal(a, b) for a, b in zip(first, again))  # forward and backward bit-equal
    assert not torch.equal(first[0], run(43)[0])
    assert not torch.equal(first[0], run(42, offset=1)[0])


def test_backend_draws_its_seed_from_torchs_generator():
    from fastgpt.attention import causal_attention

    q, k, v = make_qkv((2, 2, 33, 16), torch.float32, "cpu")
    torch.manual_seed(0)
    a = causal_attention(q, k, v, dropout_p=0.2, backend="ext")
    b = causal_attention(q, k, v, dropout_p=0.2, backend="ext")
    torch.manual_seed(0)
    assert torch.equal(a, causal_attention(q, k, v, dropout_p=0.2, backend="ext"))
    assert not torch.equal(a, b)
