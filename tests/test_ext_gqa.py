"""Grouped-query and multi-query attention in the ext ops and backend (CPU kernels): k and v have
H_kv heads dividing q's H, query head h reads key/value head h // (H / H_kv) in place, and dK, dV
sum each group of query heads in a fixed order.

Parity of the backend over fastgpt.verify.parity's GQA_SHAPES (groups of 2, 3 and 8, T_q < T_k, B > 1)
and of each op against its float64 reference (tests/ext_reference.py); opcheck; repeated
backwards and thread counts bit-equal; dropout against the reference built from the op's own
mask (fastgpt.verify.dropout_check); a head count that does not divide refused by name; one graph node
per op under torch.compile, with no copy of k or v.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import fastgpt.ext as ext
from fastgpt.attention.ext_backend import ext_attention
from fastgpt.verify.dropout_check import check_dropout
from fastgpt.ext import layout
from fastgpt.verify.parity import GQA_SHAPES, check_parity, make_qkv, shape_id, unpack_shape
from ext_reference import assert_same_at_one_thread, assert_within, op_parity, random_packed, ref_matmul_nn, ref_matmul_nt, ref_matmul_tn

DTYPES = [torch.float32, torch.bfloat16]
ops = torch.ops.fastgpt


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ext.load()


# ---- the backend: forward and backward against float64 -----------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GQA_SHAPES, ids=shape_id)
def test_backend_parity(shape, dtype):
    result = check_parity("ext", shape, dtype)
    assert result.ok, f"{result.worst}: {result.explain()}"


# ---- each op's grouped-query form against its float64 reference ---------------------------------------

def op_check(name, shape, dtype):
    """(errors, limits) of op `name` at a GQA shape: its output and both input gradients."""
    B, H, H_kv, T_q, T_k, D = unpack_shape(shape)
    q, k, _ = make_qkv(shape, torch.float64, "cpu")  # q (B, H, T_q, D), k (B, H_kv, T_k, D), strided
    p = random_packed(B, H, T_q, T_k)
    if name == "nt":  # S = tril_o(q·kᵀ): b has H_kv heads
        return op_parity(ext.causal_matmul_nt, ref_matmul_nt, [q, k], dtype)
    if name == "nn":  # out = tril_o(P)·v: x has H_kv heads
        return op_parity(lambda p, x: ext.causal_matmul_nn(p, x, T_q), lambda p, x: ref_matmul_nn(p, x, T_q),
                         [p, k], dtype)
    # dk = Σ_group tril_o(dS)ᵀ·q: (B, H_kv, T_k, D) from H query heads
    return op_parity(lambda p, x: ext.causal_matmul_tn(p, x, T_k, H_kv),
                     lambda p, x: ref_matmul_tn(p, x, T_k, H_kv), [p, q], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GQA_SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", ["nt", "nn", "tn"])
def test_op_parity(name, shape, dtype):
    assert_within(*op_check(name, shape, dtype), f"{name} {shape_id(shape)} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck(dtype):
    B, H, H_kv, T_q, T_k, D = 2, 6, 2, 17, 70, 8
    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv((B, H, H_kv, T_q, T_k, D), dtype, "cpu"))
    p = random_packed(B, H, T_q, T_k).to(dtype).requires_grad_(True)
    mq_k = k[:, :1].detach().requires_grad_(True)  # multi-query: one key/value head for all six
    cases = [
        (ops.causal_matmul_nt, (q, k)),
        (ops.causal_matmul_nt, (q, mq_k)),
        (ops.causal_matmul_nn, (p, v, T_q)),
        (ops.causal_matmul_nn, (p, mq_k, T_q)),
        (ops.causal_matmul_tn, (p, q, T_k, H_kv)),
        (ops.causal_matmul_tn, (p, q, T_k, 1)),
        (ops.causal_matmul_tn, (p, q, T_k, H)),
        (ops.causal_matmul_tn, (p, q, T_k, None)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


def test_tn_without_kv_heads_is_the_plain_product():
    q, _, _ = make_qkv((2, 4, 2, 20, 70, 16), torch.float32, "cpu")
    p = random_packed(2, 4, 20, 70).float()
    assert torch.equal(ext.causal_matmul_tn(p, q, 70), ext.causal_matmul_tn(p, q, 70, kv_heads=4))
    assert ext.causal_matmul_tn(p, q, 70).shape == (2, 4, 70, 16)


def test_a_shared_head_reads_what_a_copied_head_would():
    """nt and nn read key/value head h // G in place: the same products as on per-head copies, and
    tn's group sum is the sum of the per-head products (float32, so the summation order shows only
    in the last bits)."""
    B, H, H_kv, T_q, T_k, D = 2, 6, 2, 37, 100, 32
    q, k, v = make_qkv((B, H, H_kv, T_q, T_k, D), torch.float32, "cpu")
    G = H // H_kv
    k_copies, v_copies = (t.repeat_interleave(G, dim=1) for t in (k, v))
    s = ext.causal_matmul_nt(q, k)
    torch.testing.assert_close(s, ext.causal_matmul_nt(q, k_copies), rtol=1e-6, atol=1e-6)
    p = ext.causal_softmax(s, T_q, T_k, D**-0.5)
    torch.testing.assert_close(ext.causal_matmul_nn(p, v, T_q), ext.causal_matmul_nn(p, v_copies, T_q),
                               rtol=1e-6, atol=1e-6)
    per_head = ext.causal_matmul_tn(p, q, T_k)  # (B, H, T_k, D)
    torch.testing.assert_close(ext.causal_matmul_tn(p, q, T_k, H_kv), per_head.view(B, H_kv, G, T_k, D).sum(2),
                               rtol=1e-5, atol=1e-5)


# ---- determinism: the group sum has one order ---------------------------------------------------------

@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_repeated_backwards_are_bit_equal(dropout_p):
    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv((2, 8, 2, 70, 100, 32), torch.float32, "cpu"))
    out = ext_attention(q, k, v, dropout_p, seed=5)
    dout = torch.randn_like(out)
    grads = [torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) for _ in range(3)]
    for later in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], later))
    assert grads[0][1].shape == k.shape and grads[0][2].shape == v.shape  # (B, H_kv, T_k, D)


def test_results_do_not_depend_on_the_thread_count():
    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv((3, 4, 1, 150, 200, 32), torch.float32, "cpu"))
    dout = torch.randn(3, 4, 150, 32, generator=torch.Generator().manual_seed(0))

    def run():
        out = ext_attention(q, k, v, 0.1, seed=11)
        return [out, *torch.autograd.grad(out, (q, k, v), dout)]

    assert_same_at_one_thread(run)


# ---- dropout: the mask stays per query head -----------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 6, 2, 37, 100, 32), (2, 4, 1, 64, 64, 16)], ids=shape_id)
def test_dropout_against_the_reference_with_the_ops_own_mask(shape, dtype):
    result = check_dropout("ext", shape, dtype)
    assert result.ok, result.as_dict()


# ---- refusals: a head count that does not divide, by name, at every layer ------------------------------

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


N55 = layout.packed_size(5, 5)
DIVIDE = r"the key/value heads H_kv must divide the query heads H"

PY_BAD = [
    (lambda: ext.causal_matmul_nt(_t(1, 6, 5, 4), _t(1, 4, 5, 4)), rf"b has 4 heads and a has 6: {DIVIDE}"),
    (lambda: ext.causal_matmul_nn(_t(1, 6, N55), _t(1, 4, 5, 4), 5), rf"x has 4 heads and p has 6: {DIVIDE}"),
    (lambda: ext.causal_matmul_tn(_t(1, 6, N55), _t(1, 6, 5, 4), 5, 4), rf"kv_heads has 4 heads and x has 6: {DIVIDE}"),
    (lambda: ext.causal_matmul_tn(_t(1, 6, N55), _t(1, 6, 5, 4), 5, 0), rf"kv_heads has 0 heads and x has 6"),
    (lambda: ext.causal_matmul_tn(_t(1, 6, N55), _t(1, 3, 5, 4), 5, 3), r"x must be \(B, H, T_q, D\) with p's B and H"),
]


@pytest.mark.parametrize("call, message", PY_BAD)
def test_python_wrappers_refuse_heads_that_do_not_divide(call, message):
    with pytest.raises(ValueError, match=message):
        call()


CPP_BAD = [
    (lambda: ops.causal_matmul_nt(_t(1, 6, 5, 4), _t(1, 4, 5, 4)),
     rf"fastgpt::causal_matmul_nt: b has 4 heads and a has 6: {DIVIDE}"),
    (lambda: ops.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 4, 5, 4)), rf"b has 4 heads and a has 2: {DIVIDE}"),
    (lambda: ops.causal_matmul_nn(_t(1, 6, N55), _t(1, 4, 5, 4), 5),
     rf"fastgpt::causal_matmul_nn: x has 4 heads and p has 6: {DIVIDE}"),
    (lambda: ops.causal_matmul_tn(_t(1, 6, N55), _t(1, 6, 5, 4), 5, 4),
     rf"fastgpt::causal_matmul_tn: the output \(kv_heads\) has 4 heads and x has 6: {DIVIDE}"),
    (lambda: ops.causal_matmul_tn(_t(1, 6, N55), _t(1, 6, 5, 4), 5, -2), r"the output \(kv_heads\) has -2 heads"),
]


@pytest.mark.parametrize("call, message", CPP_BAD)
def test_cpp_checks_refuse_heads_that_do_not_divide(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_fake_kernels_size_grouped_outputs_and_refuse_by_name():
    meta = dict(device="meta")
    q, k = _t(2, 6, 17, 8, **meta), _t(2, 2, 70, 8, **meta)
    p = _t(2, 6, layout.packed_size(17, 70), **meta)
    assert ops.causal_matmul_nt(q, k).shape == p.shape
    assert ops.causal_matmul_nn(p, k, 17).shape == (2, 6, 17, 8)
    assert ops.causal_matmul_tn(p, q, 70, 2).shape == (2, 2, 70, 8)
    assert ops.causal_matmul_tn(p, q, 70).shape == (2, 6, 70, 8)
    with pytest.raises(RuntimeError, match="b has 4 heads and a has 6"):
        ops.causal_matmul_nt(q, _t(2, 4, 70, 8, **meta))
    with pytest.raises(RuntimeError, match=r"the output \(kv_heads\) has 4 heads and x has 6"):
        ops.causal_matmul_tn(p, q, 70, 4)


# ---- torch.compile: one node per op, and no copy of k or v -------------------------------------------

def test_compiled_grouped_query_attention_is_the_three_ops_and_no_copy(monkeypatch):
    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv((2, 6, 2, 16, 16, 8), torch.float32, "cpu"))

    def attention(q, k, v):
        return ext_attention(q, k, v, 0.2, path="ext.cpu_packed")  # eager on the kernels the trace runs

    attention(q, k, v)  # eager first: loads the library outside the trace
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(attention)(q, k, v)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
    calls = [str(node.target) for graph in explanation.graphs for node in graph.graph.nodes
             if node.op == "call_function"]
    fastgpt_calls = [c.removesuffix(".default") for c in calls if "fastgpt" in c]
    assert fastgpt_calls == ["fastgpt.causal_matmul_nt", "fastgpt.causal_softmax_seeded", "fastgpt.causal_matmul_nn"]
    assert not [c for c in calls if any(w in c for w in ("repeat", "expand", "cat", "clone"))], calls

    compiled = torch.compile(attention, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    out = compiled(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    torch.manual_seed(3)
    eager = attention(q, k, v)
    assert torch.equal(out, eager)
    assert dk.shape == k.shape and dv.shape == v.shape
    assert all(torch.equal(a, b) for a, b in zip((dq, dk, dv), torch.autograd.grad(eager, (q, k, v),
                                                                                   torch.ones_like(eager))))
