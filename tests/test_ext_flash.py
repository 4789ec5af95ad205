"""The CPU flash ops (csrc/cpu/attention_flash.cpp; bfloat16 on AMX: attention_flash_amx.cpp):
attention that stores no T×T matrix. Parity with the float64 reference, the same dropout mask as
the materialised path, results that do not depend on the thread count or the input strides, which
kernels the eager ext attention picks, and the errors of bad calls. The bfloat16 cases run where the
CPU has AMX-BF16 (cpu_bf16_products says so) and are skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from fastgpt.attention import select_kernel
from fastgpt.attention.ext_backend import ext_attention
from fastgpt.attention.naive import naive_attention
from fastgpt.verify.parity import compare, make_qkv, shape_id

ext_ops = pytest.importorskip("fastgpt.ext.ops")  # builds or loads the extension
ops = torch.ops.fastgpt

# (B, H, H_kv, T_q, T_k, D): one tile; grouped with fewer queries than keys; one decode row;
# three row blocks, the last one ragged; an odd head dim
SHAPES = [(2, 4, 4, 64, 64, 32), (2, 4, 2, 5, 70, 8), (1, 6, 2, 1, 9, 32), (1, 2, 1, 150, 200, 64), (2, 3, 3, 70, 70, 5)]
# bfloat16 flash needs an even head dim; 160 is two column panels, the second 32 wide
BF16_SHAPES = SHAPES[:4] + [(2, 3, 3, 70, 70, 6), (1, 2, 2, 130, 130, 160)]
AMX = ext_ops.cpu_bf16_products(64) == "AMX"
needs_amx = pytest.mark.skipif(not AMX, reason="bfloat16 flash runs on AMX-BF16; this CPU has none")
DTYPE_SHAPES = [pytest.param(torch.float32, s, id=f"float32-{shape_id(s)}") for s in SHAPES] + [
    pytest.param(torch.bfloat16, s, id=f"bfloat16-{shape_id(s)}", marks=needs_amx) for s in BF16_SHAPES]
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=needs_amx)]


@pytest.fixture
def flash(monkeypatch):
    """The eager ext attention on the flash kernels whatever the head count: one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _flash_op_pair(q, k, v, dout, scale, dropout_p=0.0, seed=0):
    out, lse = ops.causal_attention_flash_forward(q, k, v, scale, dropout_p, seed, 0)
    return (out, *ops.causal_attention_flash_backward(dout, q, k, v, out, lse, scale, dropout_p, seed, 0)), lse


@pytest.mark.parametrize("dtype, shape", DTYPE_SHAPES)
def test_parity_with_float64(dtype, shape, flash):
    q, k, v = make_qkv(shape, dtype, "cpu")  # strided views of one fused qkv buffer
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert select_kernel(q, k, v, backend="ext").name == ("ext.cpu_flash" if dtype == torch.float32 else "ext.cpu_flash_amx")
    result = compare(lambda q, k, v: ext_attention(q, k, v), naive_attention, (q, k, v), dout, dtype)
    assert result.ok, result.explain()


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), pytest.param(torch.bfloat16, 1e-4, marks=needs_amx)])
def test_the_log_sum_exp_is_each_rows(dtype, atol):
    """lse is float32 in both dtypes: the scores are accumulated in float32 from the inputs as given."""
    B, H, H_kv, T_q, T_k, D = 2, 4, 2, 70, 90, 16
    q, k, v = make_qkv((B, H, H_kv, T_q, T_k, D), dtype, "cpu")
    scale = 0.3
    _, lse = ops.causal_attention_flash_forward(q, k, v, scale, 0.0, 0, 0)
    q, k = q.double(), k.double()
    scores = scale * q @ k.repeat_interleave(H // H_kv, dim=1).transpose(-1, -2)  # (B, H, T_q, T_k)
    visible = torch.ones(T_q, T_k, dtype=torch.bool).tril(T_k - T_q)
    want = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    assert lse.shape == (B, H, T_q) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), want, rtol=0, atol=atol)


# How far the flash path may be from the materialised one with the same dropout mask: float32
# rounding; in bfloat16, P and dS are rounded from differently ordered float32 sums (and the
# forward's P before normalising), so one or two bfloat16 steps of the largest value.
DROPOUT_AGREEMENT = [(torch.float32, 1e-5, 2e-5), pytest.param(torch.bfloat16, 2**-6, 2**-6, marks=needs_amx)]


@pytest.mark.parametrize("dtype, rtol, atol", DROPOUT_AGREEMENT)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=shape_id)
def test_dropout_drops_what_the_materialised_path_drops(shape, dtype, rtol, atol, monkeypatch):
    """The same (seed, offset) stream as causal_softmax: the two paths agree to rounding, and both
    differ from the call without dropout (the mask did something)."""
    q, k, v = make_qkv(shape, dtype, "cpu")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    scale = q.shape[-1] ** -0.5
    flash, _ = _flash_op_pair(q, k, v, dout, scale, 0.3, 1234)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = ext_attention(*leaves, 0.3, scale, seed=1234, path="ext.cpu_packed")
    out.backward(dout)
    materialised = [out.detach(), *(t.grad for t in leaves)]
    for name, got, want in zip(("out", "dq", "dk", "dv"), flash, materialised):
        assert got.dtype == want.dtype == dtype
        peak = want.abs().max().item()
        torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol * max(peak, 1.0), msg=name)
    no_dropout, _ = _flash_op_pair(q, k, v, dout, scale)
    assert (flash[0] - no_dropout[0]).abs().max() > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_threads_or_strides(dtype):
    shape = (2, 6, 3, 150, 150, 32)
    q, k, v = make_qkv(shape, dtype, "cpu")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n, contiguous in ((1, False), (2, False), (2, True)):
            torch.set_num_threads(n)
            args = [t.contiguous() if contiguous else t for t in (q, k, v)]
            runs.append(_flash_op_pair(*args, dout, 0.2, 0.1, 99)[0])
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for got, want in zip(run, runs[0]):
            assert torch.equal(got, want)


def test_an_expanded_upstream_gradient_and_an_empty_head_dim(flash):
    """out.sum()'s gradient is a stride-0 expand of a scalar; D = 0 has nothing to multiply."""
    leaves = [t.detach().requires_grad_() for t in make_qkv((2, 4, 2, 70, 70, 8), torch.float32, "cpu")]
    ext_attention(*leaves).sum().backward()
    want = [t.detach().clone().requires_grad_() for t in leaves]
    ext_attention(*want).backward(torch.ones(2, 4, 70, 8))
    for got, ref in zip(leaves, want):
        assert torch.equal(got.grad, ref.grad)
    q, k, v = (torch.zeros(1, 2, 5, 0) for _ in range(3))
    out, lse = ops.causal_attention_flash_forward(q, k, v, 1.0, 0.0, 0, 0)
    assert out.shape == (1, 2, 5, 0)
    torch.testing.assert_close(lse, torch.arange(1, 6).log().expand(1, 2, 5))  # uniform over i + 1 keys
    assert all(g.shape == t.shape for g, t in zip(ops.causal_attention_flash_backward(q, q, k, v, out, lse, 1.0, 0.0, 0, 0),
                                                  (q, k, v)))


@needs_amx
def test_both_bfloat16_roundings_give_the_same_bits():
    """The hot loops round with AVX512-BF16's instruction where the CPU has it, else with ATen's
    integer rounding (ext.cpu_isa(avx512bf16=False) forces it): both round to nearest even."""
    q, k, v = make_qkv((2, 4, 2, 100, 130, 32), torch.bfloat16, "cpu")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    runs = []
    for native in (True, False):
        with ext_ops.cpu_isa(avx512bf16=native):
            assert ext_ops.cpu_isa_settings()["avx512bf16"]["used"] == native  # both roundings run
            runs.append(_flash_op_pair(q, k, v, dout, 0.2, 0.1, 5))
    for got, want in zip((*runs[1][0], runs[1][1]), (*runs[0][0], runs[0][1])):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_outputs_are_heads_interleaved_views(dtype):
    """out, dq, dk, dv are (B, H, T, D) views of (B, T, H, D) memory: the layer's transpose back to
    (B, T, C) is free."""
    q, k, v = make_qkv((2, 4, 2, 10, 20, 8), dtype, "cpu")
    (out, dq, dk, dv), lse = _flash_op_pair(q, k, v, torch.randn(q.shape).to(dtype), 0.5)
    for t in (out, dq, dk, dv):
        assert t.dtype == dtype and t.transpose(1, 2).is_contiguous()
    assert lse.dtype == torch.float32


def _ext_path(dtype: torch.dtype, kv_heads_total: int, D: int, backend: str = "ext") -> str:
    """The kernel path backend="ext" (or `backend`) runs for B·H_kv = kv_heads_total heads of D."""
    return select_kernel(torch.empty(kv_heads_total, 1, 8, D, dtype=dtype), backend=backend).name


def test_ext_picks_its_kernel_path():
    threads = torch.get_num_threads()
    assert _ext_path(torch.float32, threads, 64) == "ext.cpu_flash"
    assert _ext_path(torch.bfloat16, threads, 64) == ("ext.cpu_flash_amx" if AMX else "ext.cpu_packed")
    assert _ext_path(torch.bfloat16, threads, 5) == "ext.cpu_packed"  # AMX pairs rows of D
    with pytest.raises(ValueError, match="the ext kernels take float32 and bfloat16 on cpu"):
        _ext_path(torch.float16, threads, 64)
    if threads > 1:  # fewer key/value heads than threads would leave threads idle in the backward
        assert _ext_path(torch.float32, threads - 1, 64) == "ext.cpu_packed"
        assert _ext_path(torch.float32, threads - 1, 64, backend="ext.cpu_flash") == "ext.cpu_flash"  # named: runs
    with ext_ops.cpu_isa(amx=False):
        assert _ext_path(torch.bfloat16, threads, 64) == "ext.cpu_packed"
        assert _ext_path(torch.float32, threads, 64) == "ext.cpu_flash"
    assert _ext_path(torch.float32, threads, 64, backend="ext.cpu_packed") == "ext.cpu_packed"
    # plain bfloat16 named on ext.cpu_flash runs its general kernel (float32 products over converted tiles)
    assert _ext_path(torch.bfloat16, threads, 64, backend="ext.cpu_flash") == "ext.cpu_flash"


def test_one_cpp_node_and_only_the_gradients_asked_for(flash):
    q, k, v = (t.detach().requires_grad_() for t in make_qkv((1, 2, 2, 9, 9, 4), torch.float32, "cpu"))
    k.requires_grad_(False)
    out = ext_attention(q, k, v)
    assert "ExtFlashAttention" in out.grad_fn.name()  # the C++ node, no Python autograd.Function
    out.backward(torch.randn(out.shape))
    assert q.grad is not None and v.grad is not None and k.grad is None


def test_a_second_derivative_is_refused(flash):
    q, k, v = (t.detach().requires_grad_() for t in make_qkv((1, 2, 2, 9, 9, 4), torch.float32, "cpu"))
    out = ext_attention(q, k, v)
    (dq,) = torch.autograd.grad(out, q, torch.randn(out.shape), create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad"):  # off the graph, never a wrong number
        dq.sum().backward()


def test_the_op_without_autograd_is_the_forward_op():
    q, k, v = make_qkv((2, 4, 2, 17, 40, 8), torch.float32, "cpu")
    with torch.no_grad():
        out = ops.causal_attention_flash(q, k, v, 0.3, 0.2, 5, 1)
    assert torch.equal(out, ops.causal_attention_flash_forward(q, k, v, 0.3, 0.2, 5, 1)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(dtype):
    q, k, v = make_qkv((2, 4, 2, 17, 70, 8), dtype, "cpu")
    dout = torch.randn(q.shape).to(dtype)
    for dropout_p, seed in ((0.0, 0), (0.25, 1234)):
        out, lse = ops.causal_attention_flash_forward(q, k, v, 0.3, dropout_p, seed, 7)
        torch.library.opcheck(ops.causal_attention_flash_forward.default, (q, k, v, 0.3, dropout_p, seed, 7))
        torch.library.opcheck(ops.causal_attention_flash_backward.default,
                              (dout, q, k, v, out, lse, 0.3, dropout_p, seed, 7))
        leaves = tuple(t.detach().requires_grad_() for t in (q, k, v))
        torch.library.opcheck(ops.causal_attention_flash.default, (*leaves, 0.3, dropout_p, seed, 7))


def _t(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


BAD = [  # the checked Python wrappers
    (lambda: ext_ops.causal_attention_flash_forward(_t(1, 2, 5, 5, dtype=torch.bfloat16), _t(1, 2, 5, 5, dtype=torch.bfloat16),
                                                    _t(1, 2, 5, 5, dtype=torch.bfloat16), 1.0),
     r"q is torch.bfloat16 on cpu with head dim 5; the flash kernels take CPU tensors in float32, or in bfloat16 "
     r"where cpu_bf16_products\(head_dim\) is 'AMX'"),
    (lambda: ext_ops.causal_attention_flash_forward(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 6, 4), 1.0),
     r"v has shape \(1, 2, 6, 4\) but k has shape \(1, 2, 5, 4\)"),
    (lambda: ext_ops.causal_attention_flash_forward(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), 1.0, 1.0),
     r"dropout_p must be a number in \[0, 1\); got 1.0"),
    (lambda: ext_ops.causal_attention_flash_backward(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4),
                                                     _t(1, 2, 5, 4), _t(1, 2, 4), 1.0),
     r"lse must be the forward's float32 \(B, H, T_q\) = \(1, 2, 5\); got \(1, 2, 4\) torch.float32"),
    (lambda: ext_ops.causal_attention_flash_backward(_t(1, 2, 4, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4),
                                                     _t(1, 2, 5, 4), _t(1, 2, 5), 1.0),
     r"dout has shape \(1, 2, 4, 4\) but q has shape \(1, 2, 5, 4\)"),
    (lambda: ext_ops.causal_attention_flash_backward(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4),
                                                     _t(1, 2, 5, 3), _t(1, 2, 5), 1.0),
     r"out has shape \(1, 2, 5, 3\) but q has shape \(1, 2, 5, 4\); out must be shaped like the forward's output"),
]
CPP_BAD = [  # the ops themselves, past the wrappers
    (lambda: ops.causal_attention_flash_forward(_t(1, 2, 5, 5, dtype=torch.bfloat16), _t(1, 2, 5, 5, dtype=torch.bfloat16),
                                                _t(1, 2, 5, 5, dtype=torch.bfloat16), 1.0, 0.0, 0, 0),
     r"causal_attention_flash_forward: q has dtype BFloat16 and head dim 5; the flash kernels take float32, or "
     r"bfloat16 where it runs on AMX"),
    (lambda: ops.causal_attention_flash_backward(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4),
                                                 _t(1, 2, 5, 4), _t(1, 2, 5, dtype=torch.bfloat16), 1.0, 0.0, 0, 0),
     r"causal_attention_flash_backward: lse is BFloat16 on cpu; it must be the forward's float32 log-sum-exp"),
    (lambda: ops.causal_attention_flash_forward(_t(1, 2, 6, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), 1.0, 0.0, 0, 0),
     r"causal_attention_flash_forward: T_q = 6 > T_k = 5"),
    (lambda: ops.causal_attention_flash_forward(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 1, 5, 4), 1.0, 0.0, 0, 0),
     r"v has shape \[1, 1, 5, 4\] but k has shape \[1, 2, 5, 4\]"),
    (lambda: ops.causal_attention_flash_backward(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4),
                                                 _t(1, 2, 5, 4), _t(2, 2, 5), 1.0, 0.0, 0, 0),
     r"lse has shape \[2, 2, 5\]; it must be the forward's \(B, H, T_q\) = \(1, 2, 5\)"),
    (lambda: ops.causal_attention_flash_backward(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4),
                                                 _t(1, 2, 5, 4), _t(1, 2, 5), float("inf"), 0.0, 0, 0),
     r"scale must be finite; got inf"),
    (lambda: ops.causal_attention_flash_backward(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4),
                                                 _t(1, 2, 4, 4), _t(1, 2, 5), 1.0, 0.0, 0, 0),
     r"causal_attention_flash_backward: out has shape \[1, 2, 4, 4\] but q has shape \[1, 2, 5, 4\]; out must be "
     r"the forward's output"),
    (lambda: ops.causal_attention_flash_backward(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4),
                                                 _t(1, 2, 5, 4, dtype=torch.float64), _t(1, 2, 5), 1.0, 0.0, 0, 0),
     r"causal_attention_flash_backward: out has dtype Double but q has dtype Float"),
    (lambda: ops.causal_attention_flash(_t(1, 2, 5, 4), _t(1, 2, 5, 4), _t(1, 2, 5, 4).to("meta"), 1.0, 0.0, 0, 0),
     r"all tensors must share one device and dtype; got meta/torch.float32 and cpu/torch.float32"),
    (lambda: ops.causal_attention_flash(_t(1, 2, 6, 4).requires_grad_(), _t(1, 2, 5, 4), _t(1, 2, 5, 4), 1.0, 0.0,
                                        0, 0),
     r"causal_attention_flash_forward: T_q = 6 > T_k = 5"),
]


@pytest.mark.parametrize("call, message", BAD + CPP_BAD)
def test_bad_calls_say_what_is_wrong(call, message):
    with pytest.raises((ValueError, RuntimeError), match=message):
        call()
