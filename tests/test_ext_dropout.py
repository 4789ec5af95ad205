"""Dropout inside the fused softmax: the Philox stream, the exact mask, its rate, determinism.

The mask is a function of (seed, offset, row, column) only (csrc/philox.h); these tests pin that
function with an independent pure-Python Philox4x32-10 (checked against Random123's known-answer
vectors), so the CUDA kernels of issue 7 can be held to the same bits.
"""

from __future__ import annotations

import pytest
import torch

import fastgpt.ext as ext
from fastgpt.attention.ext_backend import ext_attention
from fastgpt.attention.naive import naive_attention
from fastgpt.parity import GRAD_FACTOR, OUTPUT_FACTOR, SQUARE_SHAPES, TOLERANCES, make_qkv
from ext_reference import future_mask, ref_softmax

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


def python_keep_mask(B, H, T, p, seed, offset):
    """The documented stream: counter (col // 4, row, offset_lo, offset_hi), key (seed_lo, seed_hi),
    word col % 4, keep when word >= floor(p · 2^32)."""
    seed, offset = seed % 2**64, offset % 2**64
    key = (seed & M32, seed >> 32)
    threshold = int(p * 2**32)
    keep = torch.empty(B * H * T, T, dtype=torch.bool)
    for row in range(B * H * T):
        for g in range((T + 3) // 4):
            words = philox4x32_10((g, row, offset & M32, offset >> 32), key)
            for c in range(4 * g, min(T, 4 * g + 4)):
                keep[row, c] = words[c % 4] >= threshold
    return keep.view(B, H, T, T)


def test_python_philox_matches_random123_known_answers():
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox4x32_10((M32,) * 4, (M32, M32)) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("seed, offset", [(0, 0), (2**40 + 17, 3), (-5, 2**33 + 1)])
def test_keep_mask_is_the_documented_philox_stream(seed, offset):
    B, H, T, p = 2, 3, 11, 0.3
    scores = torch.zeros(B, H, T, T)
    assert torch.equal(ext.dropout_keep_mask(scores, p, seed, offset), python_keep_mask(B, H, T, p, seed, offset))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_applies_exactly_its_mask(dtype):
    # T = 150: rows span several 16-lane Philox batches and a ragged tail in the vectorised kernel.
    B, H, T, p, seed, offset = 2, 2, 150, 0.4, 99, 5
    scores = torch.randn(B, H, T, T, dtype=torch.float64)
    keep = ext.dropout_keep_mask(scores.float(), p, seed, offset)
    out = ext.causal_softmax(scores.to(dtype), 0.3, p, seed, offset)
    expected = ref_softmax(scores.to(dtype).double(), 0.3, keep, p)
    lower = ~future_mask(T)
    assert torch.equal(out[..., lower] == 0, ~keep[..., lower])  # zero exactly where dropped
    torch.testing.assert_close(out.double(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SQUARE_SHAPES, ids=[f"B{b}H{h}T{t}D{d}" for b, h, t, d in SQUARE_SHAPES])
def test_backend_dropout_parity_with_its_own_mask(shape, dtype):
    """ext attention with dropout against float64 naive attention fed ext's mask; the rule of
    fastgpt.parity (factor × the same-dtype naive error with that mask, plus the dtype floor)."""
    p, seed, offset = 0.2, 1234, 0
    B, H, T, D = shape
    q, k, v = make_qkv(shape, dtype, "cpu")
    keep = ext.dropout_keep_mask(torch.empty(B, H, T, T), p, seed, offset)
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(fn, q, k, v, dout):
        q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out = fn(q, k, v)
        out.backward(dout)
        return [out.detach(), q.grad, k.grad, v.grad]

    naive = lambda q, k, v: naive_attention(q, k, v, p, D**-0.5, keep_mask=keep)  # noqa: E731
    ref = run(naive, q.double(), k.double(), v.double(), dout)
    same = run(naive, q, k, v, dout.to(dtype))
    got = run(lambda q, k, v: ext_attention(q, k, v, p, D**-0.5, seed=seed, offset=offset), q, k, v, dout.to(dtype))
    floor = TOLERANCES[dtype]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        factor, base = (OUTPUT_FACTOR, floor.out) if i == 0 else (GRAD_FACTOR, floor.grad)
        limit = factor * (same[i].double() - ref[i]).abs().max().item() + base
        err = (got[i].double() - ref[i]).abs().max().item()
        assert err <= limit, f"{name}: {err:.3g} > {limit:.3g}"


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_kept_fraction(p):
    B, H, T = 4, 6, 256  # 790k lower-triangle draws: the standard error is ~6e-4
    scores = torch.randn(B, H, T, T)
    lower = ~future_mask(T)
    kept_mask = ext.dropout_keep_mask(scores, p, 7, 0)[..., lower].float().mean().item()
    kept_out = (ext.causal_softmax(scores, 0.1, p, 7, 0)[..., lower] != 0).float().mean().item()
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
