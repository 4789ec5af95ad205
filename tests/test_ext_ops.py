"""The ext ops one by one: the packed layout, opcheck, parity with float64 over SQUARE_SHAPES and
T_q < T_k lengths, what they read and write, odd strides, bad input."""

from __future__ import annotations

import pytest
import torch

import fastgpt.ext as ext
from fastgpt.ext import layout
from fastgpt.verify.parity import SQUARE_SHAPES, make_qkv
from ext_reference import (
    assert_same_at_one_thread,
    assert_within,
    future_mask,
    op_parity,
    random_packed,
    ref_matmul_nn,
    ref_matmul_nt,
    ref_matmul_tn,
    ref_softmax,
    valid_mask,
)

DTYPES = [torch.float32, torch.bfloat16]
ids = [f"B{b}H{h}T{t}D{d}" for b, h, t, d in SQUARE_SHAPES]
# (T_q, T_k) with fewer queries than keys, around the 64-row blocks; T_q = 1 is a decode step.
LENGTHS = [(1, 1), (1, 200), (63, 64), (65, 130), (17, 130), (100, 257)]
lengths_ids = [f"Tq{q}Tk{k}" for q, k in LENGTHS]
ops = torch.ops.fastgpt


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ext.load()  # compiles on first use in this environment (cached afterwards)


def qk(B, H, T_q, T_k, D, dtype=torch.float64, seed=0):
    """q (B, H, T_q, D) and k, v (B, H, T_k, D), non-contiguous (slices of a (B, T, H, D) buffer)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T_q, H, D, generator=g, dtype=torch.float64).transpose(1, 2)
    k, v = torch.randn(2, B, T_k, H, D, generator=g, dtype=torch.float64).transpose(2, 3).unbind(0)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ---- the layout ---------------------------------------------------------------------------------------

def contract_size(T_q, T_k):
    """N as csrc/README.md writes it, block by block."""
    o, n = T_k - T_q, 0
    for r in range((T_q + 63) // 64):
        rows = min(64, T_q - 64 * r)
        n += rows * ((min(T_k, o + 64 * r + rows) + 63) // 64 * 64)
    return n


def test_python_and_cpp_layouts_agree_with_the_contract():
    pairs = [(q, k) for q in [0, 1, 2, 17, 63, 64, 65, 127, 128, 129, 200, 1000] for k in range(q, q + 300, 13)]
    for T_q, T_k in pairs + [(2048, 2048), (1, 4096), (4095, 4097)]:
        n = contract_size(T_q, T_k)
        assert layout.packed_size(T_q, T_k) == n == ops.causal_packed_size(T_q, T_k), (T_q, T_k)
    assert layout.packed_size(2048, 2048) / 2048**2 == pytest.approx(0.516, abs=1e-3)  # the causal half


def test_pack_and_unpack():
    T_q, T_k = 70, 130
    dense = torch.randn(2, 3, T_q, T_k)
    packed = layout.pack(dense, T_q, T_k)
    assert packed.shape == (2, 3, layout.packed_size(T_q, T_k))
    assert packed[..., ~valid_mask(T_q, T_k)].eq(0).all()
    torch.testing.assert_close(layout.unpack(packed, T_q, T_k), dense.masked_fill(future_mask(T_q, T_k), 0), rtol=0, atol=0)
    # Row i of block r at start_r + (i - 64 r)·W_r; (70, 130): o = 60, W_0 = 128, W_1 = 192.
    assert packed[0, 0, 64 * 128 + 192 + 5] == dense[0, 0, 65, 5]


# ---- opcheck ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T_q, T_k", [(1, 9), (17, 70)])
def test_opcheck(dtype, T_q, T_k):
    B, H, D = 2, 3, 8
    q, k, v = (t.requires_grad_(True) for t in qk(B, H, T_q, T_k, D, dtype))
    p = random_packed(B, H, T_q, T_k).to(dtype).requires_grad_(True)
    pd = p.detach()
    cases = [
        (ops.causal_matmul_nt, (q, k)),
        (ops.causal_matmul_nn, (p, v, T_q)),
        (ops.causal_matmul_tn, (p, q, T_k)),
        (ops.causal_softmax, (p, T_q, T_k, 0.3, 0.0, 0, 0)),
        (ops.causal_softmax, (p, T_q, T_k, 0.3, 0.25, 1234, 7)),
        (ops.causal_softmax_backward, (pd, pd, T_q, T_k, 0.3)),
        (ops.causal_softmax_dropout_backward, (pd, pd, T_q, T_k, 0.3, 0.25, 1234, 7)),
        (ops.dropout_keep_mask, (pd, T_q, T_k, 0.25, 1234, 7)),
        (ops.causal_softmax_seeded, (p, T_q, T_k, 0.3, 0.25, torch.tensor(1234), 7)),
        (ops.causal_softmax_seeded_backward, (pd, pd, T_q, T_k, 0.3, 0.25, torch.tensor(1234), 7)),
        (ops.causal_attention_probs, (q.detach(), k.detach(), 0.3, 0.0, 0, 0)),
        (ops.causal_attention_probs, (q.detach(), k.detach(), 0.3, 0.25, 1234, 7)),
        (ops.causal_attention_grad_scores, (q.detach(), v.detach(), pd, 0.3, 0.0, 0, 0)),
        (ops.causal_attention_grad_scores, (q.detach(), v.detach(), pd, 0.3, 0.25, 1234, 7)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


# ---- parity of each op, output and input gradients ----------------------------------------------------

def nt_parity(B, H, T_q, T_k, D, dtype):
    q, k, _ = qk(B, H, T_q, T_k, D)
    return op_parity(ext.causal_matmul_nt, ref_matmul_nt, [q, k], dtype)


def consumer_parity(name, B, H, T_q, T_k, D, dtype):
    q, _, v = qk(B, H, T_q, T_k, D)
    p = random_packed(B, H, T_q, T_k)
    if name == "nn":
        return op_parity(lambda p, x: ext.causal_matmul_nn(p, x, T_q), lambda p, x: ref_matmul_nn(p, x, T_q), [p, v], dtype)
    return op_parity(lambda p, x: ext.causal_matmul_tn(p, x, T_k), lambda p, x: ref_matmul_tn(p, x, T_k), [p, q], dtype)


def softmax_parity(B, H, T_q, T_k, D, dtype):
    scale = D**-0.5
    scores = random_packed(B, H, T_q, T_k) * T_k**0.5 * D**0.5  # q·kᵀ-sized logits
    return op_parity(lambda s: ext.causal_softmax(s, T_q, T_k, scale), lambda s: ref_softmax(s, T_q, T_k, scale),
                     [scores], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SQUARE_SHAPES, ids=ids)
@pytest.mark.parametrize("name", ["nt", "nn", "tn", "softmax"])
def test_parity(name, shape, dtype):
    B, H, T, D = shape
    check(name, B, H, T, T, D, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T_q, T_k", LENGTHS, ids=lengths_ids)
@pytest.mark.parametrize("name", ["nt", "nn", "tn", "softmax"])
def test_parity_fewer_queries(name, T_q, T_k, dtype):
    check(name, 2, 2, T_q, T_k, 32, dtype)


def check(name, B, H, T_q, T_k, D, dtype):
    if name == "nt":
        result = nt_parity(B, H, T_q, T_k, D, dtype)
    elif name == "softmax":
        result = softmax_parity(B, H, T_q, T_k, D, dtype)
    else:
        result = consumer_parity(name, B, H, T_q, T_k, D, dtype)
    assert_within(*result, f"{name} (B, H, T_q, T_k, D) = {(B, H, T_q, T_k, D)} {dtype}")


def test_both_softmax_backwards_agree_without_dropout():
    # From the stored P, or from the scores with P recomputed: the same float32 math, bit for bit.
    # (In bfloat16 the stored P is rounded and the recomputed one is not.)
    for T_q, T_k in [(77, 77), (20, 90)]:
        s = random_packed(2, 3, T_q, T_k).float()
        p = ext.causal_softmax(s, T_q, T_k, 0.7)
        g = random_packed(2, 3, T_q, T_k, seed=1).float()
        assert torch.equal(ops.causal_softmax_backward(g, p, T_q, T_k, 0.7),
                           ops.causal_softmax_dropout_backward(g, s, T_q, T_k, 0.7, 0.0, 0, 0))


# ---- what the ops write and read ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T_q, T_k", [(70, 70), (3, 130), (65, 129)])
def test_packed_outputs_are_written_everywhere(T_q, T_k, dtype):
    """Zeros above the diagonal and in the padding, even over a buffer that held NaN (the buffer
    cache recycles memory: nothing stale may show through)."""
    q, k, _ = qk(2, 2, T_q, T_k, 16, dtype)
    outside = ~valid_mask(T_q, T_k)
    g = random_packed(2, 2, T_q, T_k).to(dtype)
    outputs = {
        "nt": lambda: ext.causal_matmul_nt(q, k),
        "softmax": lambda: ext.causal_softmax(g, T_q, T_k, 0.25, 0.3, 5, 0),
        "softmax_backward": lambda: ops.causal_softmax_backward(g, g, T_q, T_k, 0.25),
        "softmax_dropout_backward": lambda: ops.causal_softmax_dropout_backward(g, g, T_q, T_k, 0.25, 0.3, 5, 0),
    }
    for name, make in outputs.items():
        torch.empty(2 * 2 * layout.packed_size(T_q, T_k) * 4, dtype=dtype).fill_(float("nan"))  # dirty the heap
        out = make()
        assert out[..., outside].eq(0).all() and not out.isnan().any(), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T_q, T_k", [(70, 70), (1, 150), (65, 129)])
def test_packed_inputs_are_not_read_above_the_diagonal(T_q, T_k, dtype):
    """NaN above the diagonal and in the padding of every packed input changes nothing."""
    _, k, v = qk(2, 2, T_q, T_k, 16, dtype)
    q = qk(2, 2, T_q, T_k, 16, dtype, seed=1)[0]
    clean = random_packed(2, 2, T_q, T_k, fill=0.0).to(dtype)
    dirty = random_packed(2, 2, T_q, T_k, fill=float("nan")).to(dtype)
    calls = {
        "nn": lambda p: ext.causal_matmul_nn(p, v, T_q),
        "tn": lambda p: ext.causal_matmul_tn(p, q, T_k),
        "softmax": lambda p: ext.causal_softmax(p, T_q, T_k, 0.5, 0.2, 3, 1),
        "softmax_backward grad": lambda p: ops.causal_softmax_backward(p, clean, T_q, T_k, 0.5),
        "softmax_backward probs": lambda p: ops.causal_softmax_backward(clean, p, T_q, T_k, 0.5),
        "softmax_dropout_backward": lambda p: ops.causal_softmax_dropout_backward(p, p, T_q, T_k, 0.5, 0.2, 3, 1),
    }
    for name, call in calls.items():
        assert torch.equal(call(dirty), call(clean)), name


# ---- layouts: non-contiguous inputs are handled, not rejected ----------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T_q, T_k", [(37, 37), (20, 75)])
def test_layouts_give_the_same_result(T_q, T_k, dtype):
    B, H, D = 2, 3, 24
    q, k, v = qk(B, H, T_q, T_k, D, dtype)
    p = random_packed(B, H, T_q, T_k).to(dtype)
    layouts = {
        "contiguous": lambda t: t.contiguous(),
        "transposed last dims": lambda t: t.transpose(-2, -1).contiguous().transpose(-2, -1),
        "heads first in memory": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
        "broadcast batch": lambda t: t[:1].expand_as(t),
    }
    calls = ((ext.causal_matmul_nt, (q, k)), (lambda p, x: ext.causal_matmul_nn(p, x, T_q), (p, v)),
             (lambda p, x: ext.causal_matmul_tn(p, x, T_k), (p, q)),
             (lambda s: ext.causal_softmax(s, T_q, T_k, 0.5, 0.1, 3), (p,)))
    for name, layout_of in layouts.items():
        for op, args in calls:
            expected = op(*(a[:1].expand_as(a).contiguous() if name == "broadcast batch" else a for a in args))
            got = op(*(layout_of(a) for a in args))
            torch.testing.assert_close(got, expected, rtol=0, atol=0, msg=f"{name}")


def test_empty_and_tiny_sizes():
    for B, H, T_q, T_k, D in [(0, 2, 5, 5, 4), (2, 0, 5, 5, 4), (1, 1, 1, 1, 1), (1, 1, 3, 3, 1), (2, 1, 0, 5, 4),
                              (2, 1, 0, 0, 4), (1, 2, 3, 7, 0)]:
        q, k, v = qk(B, H, T_q, T_k, D, torch.float32)
        s = ext.causal_matmul_nt(q, k)
        assert s.shape == (B, H, layout.packed_size(T_q, T_k))
        torch.testing.assert_close(s, ref_matmul_nt(q, k))
        p = ext.causal_softmax(s, T_q, T_k, 1.0)
        torch.testing.assert_close(ext.causal_matmul_nn(p, v, T_q), ref_matmul_nn(p, v, T_q))
        torch.testing.assert_close(ext.causal_matmul_tn(p, q, T_k), ref_matmul_tn(p, q, T_k))


def test_results_do_not_depend_on_the_thread_count():
    q, k, v = qk(3, 1, 150, 200, 32, torch.float32)  # B·H odd: the balanced split cuts a head
    def run():
        s = ext.causal_matmul_nt(q, k)
        p = ext.causal_softmax(s, 150, 200, 0.2, 0.2, 11)
        return [s, p, ext.causal_matmul_nn(p, v, 150), ext.causal_matmul_tn(p, q, 200)]

    assert_same_at_one_thread(run)


# ---- bad input: the Python wrappers and the C++ checks ------------------------------------------------

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(*shape, dtype=dtype, device=device)


N55 = layout.packed_size(5, 5)  # 320: one 64-wide block of 5 rows
N570 = layout.packed_size(5, 70)  # 640: one 128-wide block

PY_BAD = [
    (lambda: ext.causal_matmul_nt(_t(2, 5, 4), _t(2, 5, 4)), ValueError, "a must have 4 dims"),
    (lambda: ext.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 2, 6, 3)), ValueError, "must share B and D"),
    (lambda: ext.causal_matmul_nt(_t(1, 2, 6, 4), _t(1, 2, 5, 4)), ValueError, r"T_q = 6 > T_k = 5"),
    (lambda: ext.causal_matmul_nt(_t(1, 2, 5, 4, dtype=torch.float16), _t(1, 2, 5, 4, dtype=torch.float16)),
     ValueError, "float16"),
    (lambda: ext.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 2, 5, 4, dtype=torch.bfloat16)), ValueError, "dtype"),
    (lambda: ext.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 2, 5, 4, device="meta")), ValueError, "meta"),
    (lambda: ext.causal_matmul_nt([1.0], _t(1, 2, 5, 4)), TypeError, "torch.Tensor"),
    (lambda: ext.causal_matmul_nn(_t(1, 2, 5, 5), _t(1, 2, 5, 4), 5), ValueError, "p must have 3 dims"),
    (lambda: ext.causal_matmul_nn(_t(1, 2, N55 + 1), _t(1, 2, 5, 4), 5), ValueError,
     r"p has 321 elements per \(b, h\) but \(T_q, T_k\) = \(5, 5\) needs N = 320"),
    (lambda: ext.causal_matmul_nn(_t(1, 2, N570), _t(1, 2, 5, 4), 70), ValueError, r"T_q = 70 > T_k = 5"),
    (lambda: ext.causal_matmul_tn(_t(1, 2, N570), _t(1, 3, 5, 4), 70), ValueError, "x has shape"),
    (lambda: ext.causal_softmax(_t(1, 2, N55), 5, 5, float("inf")), ValueError, "scale must be a finite"),
    (lambda: ext.causal_softmax(_t(1, 2, N55), 5, 5, 1.0, dropout_p=1.0), ValueError, "dropout_p"),
    (lambda: ext.causal_softmax(_t(1, 2, N55), 5, 5, 1.0, 0.1, seed=2**64), ValueError, "seed"),
    (lambda: ext.causal_softmax(_t(1, 2, N55), 5, -1, 1.0), ValueError, "T_k must be an int >= 0; got -1"),
]


@pytest.mark.parametrize("call, error, message", PY_BAD)
def test_python_wrappers_refuse_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call()


CPP_BAD = [
    (lambda: ops.causal_matmul_nt(_t(2, 5, 4), _t(2, 5, 4)),
     r"fastgpt::causal_matmul_nt: a must have 4 dims \(B, H, T_q, D\); got 3 dims"),
    (lambda: ops.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 2, 6, 3)), r"b has shape \[1, 2, 6, 3\] but a has shape"),
    (lambda: ops.causal_matmul_nt(_t(1, 2, 6, 4), _t(1, 2, 5, 4)),
     r"causal_matmul_nt: T_q = 6 > T_k = 5; the causal ops need at most as many queries as keys"),
    (lambda: ops.causal_matmul_nt(_t(1, 2, 5, 4, dtype=torch.float16), _t(1, 2, 5, 4, dtype=torch.float16)),
     r"a has dtype Half; supported dtypes are Float \(float32\) and BFloat16"),
    (lambda: ops.causal_matmul_nt(_t(1, 2, 5, 4), _t(1, 2, 5, 4, dtype=torch.bfloat16)),
     r"b has dtype BFloat16 but a has dtype Float"),
    (lambda: ops.causal_matmul_nn(_t(1, 2, 5, 5), _t(1, 2, 5, 4), 5),
     r"p must be a packed causal matrix of 3 dims \(B, H, N\); got 4 dims"),
    (lambda: ops.causal_matmul_nn(_t(1, 2, 25), _t(1, 2, 5, 4), 5),
     r"causal_matmul_nn: p has 25 elements per \(b, h\) but \(T_q, T_k\) = \(5, 5\) needs N = 320"),
    (lambda: ops.causal_matmul_tn(_t(1, 2, N570), _t(1, 2, 5, 4), 3), r"causal_matmul_tn: T_q = 5 > T_k = 3"),
    (lambda: ops.causal_matmul_tn(_t(1, 2, N570), _t(1, 3, 5, 4), 70), r"fastgpt::causal_matmul_tn: x has shape"),
    (lambda: ops.causal_matmul_nn(_t(1, 2, N55), _t(1, 2, 5, 4, dtype=torch.float64), 5), r"x has dtype Double"),
    (lambda: ops.causal_softmax(_t(1, 2, N55), 5, 5, float("nan"), 0.0, 0, 0), r"scale must be finite; got nan"),
    (lambda: ops.causal_softmax(_t(1, 2, N55), 5, 5, 1.0, 1.0, 0, 0), r"dropout_p must be in \[0, 1\); got 1"),
    (lambda: ops.causal_softmax(_t(1, 2, N55), -1, 5, 1.0, 0.0, 0, 0), r"T_q and T_k must be >= 0; got T_q = -1"),
    (lambda: ops.causal_softmax_backward(_t(1, 2, N570), _t(1, 2, N55), 5, 5, 1.0),
     r"causal_softmax_backward: grad has shape \[1, 2, 640\] but probs has shape \[1, 2, 320\]"),
    (lambda: ops.causal_softmax_dropout_backward(_t(1, 2, N55), _t(1, 2, N55, dtype=torch.bfloat16), 5, 5, 1.0,
                                                 0.1, 0, 0),
     r"grad has dtype Float but scores has dtype BFloat16"),
    (lambda: ops.dropout_keep_mask(_t(1, 2, N55), 5, 70, 0.1, 0, 0), r"needs N = 640"),
    (lambda: ops.causal_packed_size(3, 2), r"causal_packed_size: T_q = 3 > T_k = 2"),
    (lambda: ops.causal_attention_probs(_t(1, 2, 6, 4), _t(1, 2, 5, 4), 1.0, 0.0, 0, 0),
     r"causal_attention_probs: T_q = 6 > T_k = 5"),
    (lambda: ops.causal_attention_probs(_t(1, 2, 5, 4), _t(1, 2, 5, 4), 1.0, 1.0, 0, 0),
     r"causal_attention_probs: dropout_p must be in \[0, 1\); got 1"),
    (lambda: ops.causal_attention_grad_scores(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, N570), 1.0, 0.0, 0, 0),
     r"causal_attention_grad_scores: saved \(the probabilities\) has 640 elements per \(b, h\) but \(T_q, T_k\) = "
     r"\(5, 5\) needs N = 320"),
    (lambda: ops.causal_attention_grad_scores(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(2, 2, N55), 1.0, 0.0, 0, 0),
     r"saved has shape \[2, 2, 320\] but dout has shape \[1, 2, 5, 4\]"),
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
    q, k, _ = make_qkv((2, 2, 1500, 16), torch.float32, "cpu")  # 18 MB packed: a cached size
    first = ext.causal_matmul_nt(q, k)
    first.fill_(float("nan"))  # dirty it, above the diagonal and in the padding too, then free it
    del first
    again = ext.causal_matmul_nt(q, k)
    assert not again.isnan().any()
    torch.testing.assert_close(again, ref_matmul_nt(q, k))
    p = ext.causal_softmax(again, 1500, 1500, 0.25)
    assert p[..., ~valid_mask(1500, 1500)].eq(0).all() and not p.isnan().any()
    ext.empty_cache()
