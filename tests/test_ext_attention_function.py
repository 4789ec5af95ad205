"""ExtAttention (fastgpt/ext/attention_function.py): the eager one-node path of ext_attention gives
the very bits of the per-op path that torch.compile traces, forward and every gradient, and costs
fewer autograd nodes. In float32 on CPU (bfloat16 on AMX) ext runs the flash kernels by default, which sum in
another order (tests/test_ext_flash.py); here the kernel path ext.cpu_packed holds it to the materialised
kernels, the ones that must match the per-op path bit for bit."""

from __future__ import annotations

import pytest
import torch

from fastgpt.attention import AttentionCall, ext_backend
from fastgpt.attention.ext_backend import ext_attention

ext_ops = pytest.importorskip("fastgpt.ext.ops")  # builds or loads the extension

# (B, H, H_kv, T_q, T_k, D): multi-head; grouped with fewer queries than keys; one decode row;
# three row blocks of the CPU kernels' fused ops (csrc/cpu/attention_fused.cpp)
SHAPES = [(2, 3, 3, 17, 17, 16), (2, 4, 2, 5, 70, 8), (1, 6, 2, 1, 9, 32), (1, 2, 1, 150, 200, 64)]


def _leaves(shape, dtype, seed=0):
    B, H, H_kv, T_q, T_k, D = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T_q, D, generator=g)
    k, v = (torch.randn(B, H_kv, T_k, D, generator=g) for _ in range(2))
    dout = torch.randn(B, H, T_q, D, generator=g).to(dtype)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], dout


def _run(fn, leaves, dout):
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("dtype, amx", [(torch.float32, True), (torch.bfloat16, True), (torch.bfloat16, False)],
                         ids=["float32", "bfloat16", "bfloat16-float32-tiles"])
@pytest.mark.parametrize("dropout_p, seed", [(0.0, None), (0.3, 1234), (0.3, None)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Hkv{}Tq{}Tk{}D{}".format(*s))
def test_one_node_path_is_bit_equal_to_the_per_op_path(shape, dtype, amx, dropout_p, seed, monkeypatch):
    one_node = lambda q, k, v: ext_attention(q, k, v, dropout_p, 0.3, seed=seed, path="ext.cpu_packed")  # noqa: E731
    per_op = lambda q, k, v: ext_backend._attention_per_op(  # noqa: E731
        q, k, v, AttentionCall.of(q, k, v, dropout_p, 0.3), seed, 0)
    results = []
    with ext_ops.cpu_isa(amx=amx):  # bfloat16's products on AMX where the CPU has it, or float32 tiles
        for fn in (one_node, per_op):
            leaves, dout = _leaves(shape, dtype)
            torch.manual_seed(7)  # seed=None: both paths draw the same seed from torch's generator
            results.append(_run(fn, leaves, dout))
    for name, got, want in zip(("out", "dq", "dk", "dv"), *results):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert torch.equal(got, want), (name, (got.float() - want.float()).abs().max().item())


def test_one_node_and_only_the_gradients_asked_for(monkeypatch):
    leaves, dout = _leaves(SHAPES[0], torch.float32)
    q, k, v = leaves
    k.requires_grad_(False)
    out = ext_attention(q, k, v, path="ext.cpu_packed")  # ExtAttention's node (the flash node: tests/test_ext_flash.py)
    assert type(out.grad_fn).__name__ == "ExtAttentionBackward"
    assert out.grad_fn.next_functions[0][0] is not None  # q's accumulator; the ops are not nodes of their own
    out.backward(dout)
    assert q.grad is not None and v.grad is not None and k.grad is None


def test_a_second_derivative_is_refused():
    leaves, dout = _leaves(SHAPES[0], torch.float32)
    out = ext_attention(*leaves)
    (dq,) = torch.autograd.grad(out, leaves[0], dout, create_graph=True)
    # dq is off the graph (once_differentiable): differentiating it raises, never a wrong number
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        dq.sum().backward()
