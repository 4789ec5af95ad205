"""The `ext` attention backend: parity through the public API, what it refuses and why."""

from __future__ import annotations

import pytest
import torch

import fastgpt.ext as ext
from fastgpt.attention import causal_attention, get_backend
from fastgpt.parity import PARITY_SHAPES, check_parity, make_qkv, shape_id


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ext.load()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=shape_id)
def test_parity(shape, dtype):
    result = check_parity("ext", shape, dtype)
    assert result.ok, f"{result.worst}: {result.errors} vs limits {result.limits}"


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


def test_cuda_is_issue_7s():
    reason = get_backend("ext").unavailable_reason(torch.device("cuda"))
    assert reason is not None and "issue 7" in reason


def test_other_devices_are_refused():
    q, k, v = (torch.empty(1, 2, 8, 16, device="meta") for _ in range(3))
    with pytest.raises(RuntimeError, match="backend='ext' is not available on device meta: .*CPU kernels only"):
        causal_attention(q, k, v, backend="ext")
