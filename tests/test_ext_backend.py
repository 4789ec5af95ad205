"""The `ext` attention backend: parity through the public API and, with fewer queries than keys,
through ext_attention against the float64 reference; what it refuses and why."""

from __future__ import annotations

import pytest
import torch

import fastgpt.ext as ext
from fastgpt.attention import causal_attention, get_backend
from fastgpt.attention.ext_backend import ext_attention
from fastgpt.verify.parity import PARITY_SHAPES, check_parity, make_qkv, shape_id, tolerance
from ext_reference import ref_attention


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ext.load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=shape_id)
def test_parity(shape, dtype):
    result = check_parity("ext", shape, dtype)
    assert result.ok, f"{result.worst}: {result.errors} vs limits {result.limits}"


def forward_backward(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


# (T_q, T_k): a decode step (T_q = 1) up to ~200 keys, and blocks of queries around 64.
FEWER_QUERIES = [(1, 1), (1, 2), (1, 63), (1, 64), (1, 65), (1, 130), (1, 200), (63, 64), (64, 130), (65, 130),
                 (130, 200), (2, 257)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("T_q, T_k", FEWER_QUERIES, ids=[f"Tq{q}Tk{k}" for q, k in FEWER_QUERIES])
def test_parity_fewer_queries_than_keys(T_q, T_k, dtype):
    """ext_attention with q (B, H, T_q, D), k, v (B, H, T_k, D), the diagonal aligned bottom-right,
    against the float64 reference; fastgpt.verify.parity's rule (the same-dtype reference's error)."""
    B, H, D = 2, 2, 32
    g = torch.Generator().manual_seed(T_q * 1000 + T_k)
    q = torch.randn(B, T_q, H, D, generator=g, dtype=torch.float64).transpose(1, 2)  # non-contiguous
    k, v = (torch.randn(B, H, T_k, D, generator=g, dtype=torch.float64) for _ in range(2))
    dout = torch.randn(B, H, T_q, D, generator=g, dtype=torch.float64)
    ref = forward_backward(ref_attention, q, k, v, dout)
    x = [t.to(dtype) for t in (q, k, v, dout)]
    same = forward_backward(ref_attention, *x)
    got = forward_backward(ext_attention, *x)
    for key in ref:
        err = (got[key].double() - ref[key]).abs().max().item()
        limit = tolerance(key, (same[key].double() - ref[key]).abs().max().item(), dtype)
        assert err <= limit, f"{key}: {err:.3g} > {limit:.3g}"


def test_a_decode_step_is_the_last_row_of_full_attention():
    """The KV-cache identity: the last query alone against all keys is row T - 1 of causal attention."""
    q, k, v = make_qkv((2, 3, 130, 32), torch.float32, "cpu")
    full = ext_attention(q, k, v)
    for t in (1, 64, 129):  # the last t queries
        torch.testing.assert_close(ext_attention(q[:, :, -t:], k, v), full[:, :, -t:], rtol=1e-6, atol=1e-6)


def test_more_queries_than_keys_are_refused():
    q, k, v = make_qkv((1, 2, 8, 16), torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"must share B and D, with T_k >= T_q"):
        ext_attention(q, k[:, :, :5], v[:, :, :5])


def test_custom_scale_and_contiguous_inputs():
    q, k, v = (t.contiguous() for t in make_qkv((2, 3, 40, 32), torch.float32, "cpu"))
    from fastgpt.attention.naive import naive_attention

    expected = naive_attention(q.double(), k.double(), v.double(), 0.0, 0.7)
    torch.testing.assert_close(causal_attention(q, k, v, scale=0.7, backend="ext").double(), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_unsupported_dtypes_are_refused_by_name(dtype):
    q, k, v = make_qkv((1, 2, 8, 16), dtype, "cpu")
    with pytest.raises(ValueError, match=f"backend='ext' does not support this call: .*{str(dtype).removeprefix('torch.')}"):
        causal_attention(q, k, v, backend="ext")


def test_cuda_is_refused_with_the_reason_where_the_cuda_kernels_cannot_be_built():
    reason = get_backend("ext").unavailable_reason(torch.device("cuda"))
    if torch.version.cuda is None:  # a CPU-only torch, as in CI
        assert reason is not None and "CPU-only build" in reason and "sdpa" in reason
    else:  # a CUDA torch: refused only for a named reason (no nvcc, ops built without CUDA kernels)
        assert reason is None or "nvcc" in reason or "CUDA kernels" in reason


def test_other_devices_are_refused():
    q, k, v = (torch.empty(1, 2, 8, 16, device="meta") for _ in range(3))
    with pytest.raises(RuntimeError, match="backend='ext' is not available on device meta: .*CPU and CUDA kernels only"):
        causal_attention(q, k, v, backend="ext")


def test_float16_is_an_ext_dtype_on_cuda_only():
    from fastgpt.ext.checks import supported_dtypes

    assert torch.float16 in supported_dtypes(torch.device("cuda"))
    assert torch.float16 not in supported_dtypes(torch.device("cpu"))
