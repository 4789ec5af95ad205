"""The bfloat16 causal matmuls on AMX (csrc/cpu/amx_matmul.cpp): parity with float64, agreement with
the float32-tile path they replace, what they read, grouped-query heads, thread counts, and when
the path is taken. The parity tests run where the CPU has AMX-BF16 and skip elsewhere; the
tests of the switch run everywhere."""

from __future__ import annotations

import pytest
import torch

import fastgpt.ext as ext
from fastgpt.attention.ext_backend import ext_attention
from fastgpt.machine.cpu_features import bf16_matrix_units
from ext_reference import (
    assert_same_at_one_thread,
    assert_within,
    op_parity,
    random_packed,
    ref_matmul_nn,
    ref_matmul_nt,
    ref_matmul_tn,
    valid_mask,
)

ops = torch.ops.fastgpt


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ext.load()


def amx_here() -> bool:
    ext.load()
    return ops.cpu_bf16_uses_amx(64)


needs_amx = pytest.mark.skipif(not amx_here(), reason="this CPU has no AMX-BF16: the float32-tile path runs instead")

# (B, H, H_kv, T_q, T_k, D): block edges, T_q < T_k with o not a multiple of 64, one decode row,
# grouped-query heads, head dims from 2 to 160 (one to three 64-column panels, ragged ones).
SHAPES = [
    (1, 1, 1, 64, 64, 64),
    (2, 2, 1, 100, 100, 64),
    (1, 4, 2, 37, 130, 32),
    (1, 2, 2, 1, 77, 64),
    (2, 3, 3, 200, 333, 80),
    (1, 2, 1, 129, 129, 128),
    (1, 1, 1, 65, 300, 16),
    (1, 2, 2, 64, 64, 2),
    (1, 1, 1, 150, 150, 160),
    (1, 2, 1, 70, 71, 24),
]
ids = [f"B{b}H{h}kv{kv}Tq{tq}Tk{tk}D{d}" for b, h, kv, tq, tk, d in SHAPES]


def operands(B, H, H_kv, T_q, T_k, D, seed=0):
    """float64 q (B, H, T_q, D) as a strided view, k (B, H_kv, T_k, D), p packed (B, H, N)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T_q, H, D + 2, generator=g, dtype=torch.float64)[..., 1:D + 1].transpose(1, 2)
    k = torch.randn(B, H_kv, T_k, D, generator=g, dtype=torch.float64)
    return q, k, random_packed(B, H, T_q, T_k, seed=seed + 1)


def run_ops(q, k, p, T_q, T_k, H_kv):
    """The three products in bfloat16: nt(q, k), nn(p, k), tn(p, q) summed into H_kv heads."""
    q, k, p = q.bfloat16(), k.bfloat16(), p.bfloat16()
    return [ops.causal_matmul_nt(q, k), ops.causal_matmul_nn(p, k, T_q), ops.causal_matmul_tn(p, q, T_k, H_kv)]


@needs_amx
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_parity_with_float64(shape):
    B, H, H_kv, T_q, T_k, D = shape
    q, k, p = operands(*shape)
    cases = {
        "nt": (ext.causal_matmul_nt, ref_matmul_nt, [q, k]),
        "nn": (lambda p, x: ext.causal_matmul_nn(p, x, T_q), lambda p, x: ref_matmul_nn(p, x, T_q), [p, k]),
        "tn": (lambda p, x: ext.causal_matmul_tn(p, x, T_k, H_kv), lambda p, x: ref_matmul_tn(p, x, T_k, H_kv), [p, q]),
    }
    for name, (op, reference, inputs) in cases.items():
        errors, limits = op_parity(op, reference, inputs, torch.bfloat16)
        assert_within(errors, limits, f"{name} {shape}")


@needs_amx
@pytest.mark.parametrize("shape", SHAPES, ids=ids)
def test_agrees_with_the_float32_tile_path(shape):
    """Both paths accumulate in float32 and round once: they differ by the order of the sums, so
    by at most one bfloat16 rounding step (2⁻⁸ relative) of each result."""
    B, H, H_kv, T_q, T_k, D = shape
    q, k, p = operands(*shape)
    amx = run_ops(q, k, p, T_q, T_k, H_kv)
    with ext.cpu_isa(amx=False):
        assert not ops.cpu_bf16_uses_amx(D)
        tiles = run_ops(q, k, p, T_q, T_k, H_kv)
    for name, a, t in zip(["nt", "nn", "tn"], amx, tiles):
        torch.testing.assert_close(a.float(), t.float(), rtol=2**-7, atol=1e-6, msg=lambda m: f"{name} {shape}: {m}")


@needs_amx
@pytest.mark.parametrize("shape", SHAPES[:6], ids=ids[:6])
def test_keys_with_odd_row_strides(shape):
    """nt packs keys as 32-bit words where their rows allow it, element by element where rows are
    an odd number of elements apart: the same products either way."""
    B, H, H_kv, T_q, T_k, D = shape
    q, k, _ = operands(*shape)
    q, k = q.bfloat16(), k.bfloat16()
    k_odd = torch.empty(B, H_kv, T_k, D + 1, dtype=torch.bfloat16)[..., :D].copy_(k)
    assert k_odd.stride(2) % 2 == 1
    assert torch.equal(ops.causal_matmul_nt(q, k_odd), ops.causal_matmul_nt(q, k.contiguous()))


@needs_amx
def test_reads_no_entry_above_the_diagonal_and_writes_zeros_there():
    """NaN above the diagonal and in the padding of p must not reach nn or tn; nt writes zeros there."""
    B, H, H_kv, T_q, T_k, D = 2, 2, 1, 100, 161, 64
    q, k, _ = operands(B, H, H_kv, T_q, T_k, D)
    p = random_packed(B, H, T_q, T_k, fill=float("nan")).bfloat16()
    assert not ops.causal_matmul_nn(p, k.bfloat16(), T_q).isnan().any()
    assert not ops.causal_matmul_tn(p, q.bfloat16(), T_k, H_kv).isnan().any()
    s = ops.causal_matmul_nt(q.bfloat16(), k.bfloat16())
    assert (s[..., ~valid_mask(T_q, T_k)] == 0).all()


@needs_amx
def test_results_do_not_depend_on_the_thread_count():
    q, k, p = operands(3, 4, 2, 150, 200, 64)  # B·H odd per thread share; tn sums groups of two
    assert_same_at_one_thread(lambda: run_ops(q, k, p, 150, 200, 2))


@needs_amx
def test_attention_gradients_match_the_float32_tile_path(monkeypatch):
    """The whole ext attention in bfloat16, forward and backward, on either path: the materialised
    kernels, whose products these are (the bfloat16 flash kernels: tests/test_ext_flash.py)."""
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(2, 4, 130, 64, generator=g).bfloat16() for _ in range(4))

    def run():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ext_attention(*leaves, path="ext.cpu_packed")
        return [out, *torch.autograd.grad(out, leaves, dout)]

    amx = run()
    with ext.cpu_isa(amx=False):
        tiles = run()
    for a, t in zip(amx, tiles):
        torch.testing.assert_close(a.float(), t.float(), rtol=2**-6, atol=2e-3)


def test_the_switch_and_the_head_dims_it_takes():
    """AMX runs where the CPU has it (cpu_features agrees), for even head dims, unless
    ext.cpu_isa(amx=False) turns it off (tests/test_cpu_isa.py: the switches themselves)."""
    here = bf16_matrix_units() == "AMX"
    assert ops.cpu_bf16_uses_amx(64) == here
    assert ops.cpu_bf16_uses_amx(2) == here
    assert not ops.cpu_bf16_uses_amx(63)  # odd: the micro-kernel pairs rows of K
    assert not ops.cpu_bf16_uses_amx(0)
    with ext.cpu_isa(amx=False):
        assert not ops.cpu_bf16_uses_amx(64)
    assert ops.cpu_bf16_uses_amx(64) == here


@pytest.mark.parametrize("amx", [True, False])
def test_odd_head_dims_run_on_float32_tiles(amx):
    """An odd D takes the float32-tile path on every CPU; still within the bfloat16 parity rule."""
    q, k, p = operands(1, 2, 1, 70, 90, 33)
    with ext.cpu_isa(amx=amx):
        errors, limits = op_parity(ext.causal_matmul_nt, ref_matmul_nt, [q, k], torch.bfloat16)
    assert_within(errors, limits, "nt D=33")
