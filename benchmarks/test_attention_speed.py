"""pytest-benchmark suite: `pytest benchmarks/ --benchmark-only` (never part of the CI tests).

Grouped per shape so `--benchmark-compare` lines up the backends, and the same kernels, commit
against commit: `pytest benchmarks/ --benchmark-only --benchmark-autosave`, then
`--benchmark-compare` on the next commit.
"""

import pytest
import torch

from fastgpt.attention import AttentionCall, available_backends, causal_attention, refusal

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
# (B, H, T, D): the lecture's attention shape, and a long one with the same token count
SHAPES = [(16, 6, 256, 64), (4, 6, 1024, 64)]


@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=lambda p: f"dropout{p}")
@pytest.mark.parametrize("backend", available_backends(DEVICE))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-T{}-D{}".format(*s))
def test_forward_backward(benchmark, shape, backend, dropout_p):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(DEVICE, DTYPE).requires_grad_() for _ in range(3))
    reason = refusal(AttentionCall.of(q, q, q, dropout_p), backend)
    if reason is not None:
        pytest.skip(reason)
    dout = torch.randn_like(q)
    benchmark.group = f"fwd+bwd {shape} dropout {dropout_p}"

    def step():
        out = causal_attention(q, k, v, dropout_p=dropout_p, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return grads

    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
