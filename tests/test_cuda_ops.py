"""The ext ops' CUDA kernels on a real GPU (never required for CI: skipped without a CUDA device or
without the CUDA kernels in the build). The same parity promise as on CPU (fastgpt.verify.parity, every
PARITY_SHAPES and GQA_SHAPES entry, float32, bfloat16 and float16), grouped-query backwards bit-equal
(dK, dV summed over each group by one block, no atomics), and the dropout mask bit for bit equal to
the CPU kernels'. For memory errors and races on the device, run this file under compute-sanitizer:

    compute-sanitizer --tool memcheck  python -m pytest -q tests/test_cuda_ops.py
    compute-sanitizer --tool racecheck python -m pytest -q tests/test_cuda_ops.py -k parity
"""

import pytest
import torch

from fastgpt.verify.parity import GQA_SHAPES, PARITY_SHAPES, check_parity, make_qkv, shape_id

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (the emulation tests in "
                                "tests/cuda_emulation/ run the same kernels without one)")


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    from fastgpt.ext import build

    reason = build.cuda_unavailable_reason()
    if reason is None:
        build.load()
        reason = build.cuda_unavailable_reason()  # now asks the dispatcher
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", PARITY_SHAPES)
def test_ext_parity_on_cuda(shape, dtype):
    result = check_parity("ext", shape, dtype, device="cuda")
    assert result.ok, f"{result.worst}: errors {result.errors} limits {result.limits}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", GQA_SHAPES, ids=shape_id)
def test_ext_grouped_query_parity_on_cuda(shape, dtype):
    result = check_parity("ext", shape, dtype, device="cuda")
    assert result.ok, f"{result.worst}: errors {result.errors} limits {result.limits}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_query_backwards_on_cuda_are_bit_equal(dtype):
    from fastgpt.attention.ext_backend import ext_attention

    q, k, v = (t.detach().requires_grad_(True) for t in make_qkv((2, 8, 2, 200, 300, 64), dtype, "cuda"))
    out = ext_attention(q, k, v, 0.1, seed=3)
    dout = torch.randn_like(out)
    grads = [torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) for _ in range(3)]
    assert all(torch.equal(a, b) for later in grads[1:] for a, b in zip(grads[0], later))


def test_dropout_mask_on_cuda_is_the_cpu_mask():
    schema = str(torch.ops.fastgpt.dropout_keep_mask.default._schema)
    if "T_q" not in schema:
        pytest.skip(f"the ops do not have the packed schemas yet: {schema}")
    from fastgpt.ext.layout import packed_size

    B, H, T_q, T_k = 2, 3, 70, 130
    scores = torch.zeros(B, H, packed_size(T_q, T_k))
    args = (T_q, T_k, 0.3, 1234, 5)
    cpu = torch.ops.fastgpt.dropout_keep_mask(scores, *args)
    gpu = torch.ops.fastgpt.dropout_keep_mask(scores.cuda(), *args)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
