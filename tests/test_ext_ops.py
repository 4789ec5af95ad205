"""The ext ops one by one: opcheck, parity with float64 over SQUARE_SHAPES, odd layouts, bad input."""

from __future__ import annotations

import pytest
import torch

import fastgpt.ext as ext
from fastgpt.parity import SQUARE_SHAPES, make_qkv
from ext_reference import (
    assert_within,
    op_parity,
    ref_matmul_nn,
    ref_matmul_nt,
    ref_matmul_tn,
    ref_softmax,
)

DTYPES = [torch.float32, torch.bfloat16]
ids = [f"B{b}H{h}T{t}D{d}" for b, h, t, d in SQUARE_SHAPES]


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ext.load()  # compiles on first use in this environment (cached afterwards)


def causal_input(B, H, T, seed=0):
    """(B, H, T, T) float64 with non-zero garbage above the diagonal (the ops must not read it), in a
    padded layout: rows T + 3 apart, so the kernels take a row stride that is not T."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, T + 3, generator=g, dtype=torch.float64)[..., :T] * T**-0.5


# ---- opcheck ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 17])
def test_opcheck(dtype, T):
    B, H, D = 2, 3, 8
    q, k, v = (t.requires_grad_(True) for t in make_qkv((B, H, T, D), dtype, "cpu"))
    p = causal_input(B, H, T).to(dtype).requires_grad_(True)
    ops = torch.ops.fastgpt
    cases = [
        (ops.causal_matmul_nt, (q, k)),
        (ops.causal_matmul_nn, (p, v)),
        (ops.causal_matmul_tn, (p, v)),
        (ops.causal_softmax, (p, 0.3, 0.0, 0, 0)),
        (ops.causal_softmax, (p, 0.3, 0.25, 1234, 7)),
        (ops.causal_softmax_backward, (p.detach(), p.detach(), 0.3)),
        (ops.causal_softmax_dropout_backward, (p.detach(), p.detach(), 0.3, 0.25, 1234, 7)),
        (ops.dropout_keep_mask, (p.detach(), 0.25, 1234, 7)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


# ---- parity of each op, output and input gradients ----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SQUARE_SHAPES, ids=ids)
def test_matmul_nt_parity(shape, dtype):
    q, k, _ = make_qkv(shape, torch.float64, "cpu")  # strided views of one (B, T, 3, H, D) buffer
    assert_within(*op_parity(ext.causal_matmul_nt, ref_matmul_nt, [q, k], dtype), f"nt {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SQUARE_SHAPES, ids=ids)
@pytest.mark.parametrize("name", ["nn", "tn"])
def test_matmul_consumer_parity(name, shape, dtype):
    B, H, T, D = shape
    _, _, v = make_qkv(shape, torch.float64, "cpu")
    op, ref = {"nn": (ext.causal_matmul_nn, ref_matmul_nn), "tn": (ext.causal_matmul_tn, ref_matmul_tn)}[name]
    assert_within(*op_parity(op, ref, [causal_input(B, H, T), v], dtype), f"{name} {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SQUARE_SHAPES, ids=ids)
def test_softmax_parity(shape, dtype):
    B, H, T, D = shape
    scale = D**-0.5
    scores = causal_input(B, H, T) * T**0.5 * D**0.5  # q·kᵀ-sized logits
    op = lambda s: ext.causal_softmax(s, scale)  # noqa: E731
    ref = lambda s: ref_softmax(s, scale)  # noqa: E731
    assert_within(*op_parity(op, ref, [scores], dtype), f"softmax {shape} {dtype}")


def test_both_softmax_backwards_agree_without_dropout():
    # From the stored P, or from the scores with P recomputed: the same float32 math, bit for bit.
    # (In bfloat16 the stored P is rounded and the recomputed one is not.)
    s = causal_input(2, 3, 77).float()
    p = ext.causal_softmax(s, 0.7)
    g = torch.randn(2, 3, 77, 77)
    ops = torch.ops.fastgpt
    assert torch.equal(ops.causal_softmax_backward(g, p, 0.7), ops.causal_softmax_dropout_backward(g, s, 0.7, 0.0, 0, 0))


def test_causal_outputs_are_zero_above_the_diagonal():
    q, k, _ = make_qkv((2, 2, 70, 16), torch.float32, "cpu")
    s = ext.causal_matmul_nt(q, k)
    p = ext.causal_softmax(s, 0.25, 0.3, 5, 0)
    upper = torch.ones(70, 70, dtype=torch.bool).triu(1)
    assert s[..., upper].eq(0).all() and p[..., upper].eq(0).all()


# ---- layouts: non-contiguous inputs are handled, not rejected ----------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_give_the_same_result(dtype):
    B, H, T, D = 2, 3, 37, 24
    q, k, v = make_qkv((B, H, T, D), dtype, "cpu")
    p = causal_input(B, H, T).to(dtype)
    layouts = {
        "contiguous": lambda t: t.contiguous(),
        "transposed last dims": lambda t: t.transpose(-2, -1).contiguous().transpose(-2, -1),
        "heads first in memory": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
        "broadcast batch": lambda t: t[:1].expand_as(t),
    }
    for name, layout in layouts.items():
        for op, args in ((ext.causal_matmul_nt, (q, k)), (ext.causal_matmul_nn, (p, v)),
                         (ext.causal_matmul_tn, (p, v)), (lambda s: ext.causal_softmax(s, 0.5, 0.1, 3), (p,))):
            expected = op(*(a[:1].expand_as(a) if name == "broadcast batch" else a for a in args))
            got = op(*(layout(a) for a in args))
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{name}")


def test_empty_and_tiny_sizes():
    for B, H, T, D in [(0, 2, 5, 4), (2, 0, 5, 4), (1, 1, 1, 1), (1, 1, 3, 1)]:
        q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
        s = ext.causal_matmul_nt(q, k)
        assert s.shape == (B, H, T, T)
        torch.testing.assert_close(s, ref_matmul_nt(q, k))
        p = ext.causal_softmax(s, 1.0)
        torch.testing.assert_close(ext.causal_matmul_nn(p, v), ref_matmul_nn(p, v))
        torch.testing.assert_close(ext.causal_matmul_tn(p, v), ref_matmul_tn(p, v))


def test_results_do_not_depend_on_the_thread_count():
    q, k, v = make_qkv((3, 1, 200, 32), torch.float32, "cpu")  # B·H odd: the balanced split cuts a head
    def run():
        s = ext.causal_matmul_nt(q, k)
        p = ext.causal_softmax(s, 0.2, 0.2, 11)
        return [s, p, ext.causal_matmul_nn(p, v), ext.causal_matmul_tn(p, v)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, run()):
        assert torch.equal(a, b)


# ---- bad input: the Python wrappers and the C++ checks ------------------------------------------------

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


PY_BAD = [
    (lambda: ext.causal_matmul_nt(_t(2, 5, 4), _t(2, 5, 4)), ValueError, "a must have 4 dims"),
    (lambda: ext.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 2, 6, 4)), ValueError, "b has shape"),
    (lambda: ext.causal_matmul_nt(_t(1, 2, 5, 4, dtype=torch.float16), _t(1, 2, 5, 4, dtype=torch.float16)),
     ValueError, "float16"),
    (lambda: ext.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 2, 5, 4, dtype=torch.bfloat16)), ValueError, "dtype"),
    (lambda: ext.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 2, 5, 4, device="meta")), ValueError, "meta"),
    (lambda: ext.causal_matmul_nt([1.0], _t(1, 2, 5, 4)), TypeError, "torch.Tensor"),
    (lambda: ext.causal_matmul_nn(_t(1, 2, 5, 6), _t(1, 2, 5, 4)), ValueError, "causal matrix"),
    (lambda: ext.causal_matmul_tn(_t(1, 2, 5, 5), _t(1, 3, 5, 4)), ValueError, "x has shape"),
    (lambda: ext.causal_softmax(_t(1, 2, 5, 5), float("inf")), ValueError, "scale must be a finite"),
    (lambda: ext.causal_softmax(_t(1, 2, 5, 5), 1.0, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda: ext.causal_softmax(_t(1, 2, 5, 5), 1.0, 0.1, seed=2**64), ValueError, "seed"),
]


@pytest.mark.parametrize("call, error, message", PY_BAD)
def test_python_wrappers_refuse_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


ops = torch.ops.fastgpt
CPP_BAD = [
    (lambda: ops.causal_matmul_nt(_t(2, 5, 4), _t(2, 5, 4)),
     r"fastgpt::causal_matmul_nt: a must have 4 dims \(B, H, T, D\); got 3 dims"),
    (lambda: ops.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 2, 6, 4)), r"b has shape \[1, 2, 6, 4\] but a has shape"),
    (lambda: ops.causal_matmul_nt(_t(1, 2, 5, 4, dtype=torch.float16), _t(1, 2, 5, 4, dtype=torch.float16)),
     r"a has dtype Half; supported dtypes are Float \(float32\) and BFloat16"),
    (lambda: ops.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 2, 5, 4, dtype=torch.bfloat16)),
     r"b has dtype BFloat16 but a has dtype Float"),
    (lambda: ops.causal_matmul_nn(_t(1, 2, 5, 6), _t(1, 2, 5, 4)), r"p must be a causal matrix"),
    (lambda: ops.causal_matmul_tn(_t(1, 2, 5, 5), _t(1, 3, 5, 4)), r"fastgpt::causal_matmul_tn: x has shape"),
    (lambda: ops.causal_matmul_nn(_t(1, 2, 5, 5), _t(1, 2, 5, 4, dtype=torch.float64)), r"x has dtype Double"),
    (lambda: ops.causal_softmax(_t(1, 2, 5, 5), float("nan"), 0.0, 0, 0), r"scale must be finite; got nan"),
    (lambda: ops.causal_softmax(_t(1, 2, 5, 5), 1.0, 1.0, 0, 0), r"dropout_p must be in \[0, 1\); got 1"),
    (lambda: ops.causal_softmax_backward(_t(1, 2, 4, 4), _t(1, 2, 5, 5), 1.0),
     r"causal_softmax_backward: grad has shape \[1, 2, 4, 4\] but probs has shape \[1, 2, 5, 5\]"),
    (lambda: ops.causal_softmax_dropout_backward(_t(1, 2, 5, 5), _t(1, 2, 5, 5, dtype=torch.bfloat16), 1.0, 0.1, 0, 0),
     r"grad has dtype Float but scores has dtype BFloat16"),
    (lambda: ops.causal_softmax(_t(2, 5, 5), 1.0, 0.0, 0, 0), r"scores must have 4 dims \(B, H, T, T\)"),
    # Tensors on two devices reach the CPU kernel only by redispatch here (the dispatcher picks the
    # other device's key first); the CUDA kernels run the same check.
    (lambda: ops.causal_matmul_nt.default.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                                                     _t(1, 2, 5, 4), _t(1, 2, 5, 4, device="meta")),
     r"b is on meta but a is on cpu; all tensors must be on one device"),
]


@pytest.mark.parametrize("call, message", CPP_BAD)
def test_cpp_checks_refuse_bad_input(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_recycled_buffers_are_fully_rewritten():
    """Causal matrices come from a buffer cache; a reused buffer's stale contents never leak."""
    q, k, _ = make_qkv((2, 2, 1100, 16), torch.float32, "cpu")  # 19 MB: a cached size
    first = ext.causal_matmul_nt(q, k)
    first.fill_(float("nan"))  # dirty it, above the diagonal too, then free it
    del first
    again = ext.causal_matmul_nt(q, k)
    assert not again.isnan().any()
    torch.testing.assert_close(again, ref_matmul_nt(q, k))
    p = ext.causal_softmax(again, 0.25)
    assert p.triu(1).eq(0).all() and not p.isnan().any()
    ext.empty_cache()
