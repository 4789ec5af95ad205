"""The residual branches' dropout (fastgpt/model/dropout.py, csrc/cpu/dropout.cpp): the exact Philox mask,
its gradient, its rate, repeatability under torch.manual_seed, bad input, and which kernel runs."""

from __future__ import annotations

import pytest
import torch

import fastgpt.ext as ext
from fastgpt.model.dropout import ResidualDropout
from test_ext_dropout import M32, philox4x32_10

ops = torch.ops.fastgpt


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ext.load()


def python_keep(rows, C, p, seed):
    """Row r, column c of x's (rows, C) view: counter (c // 4, r, 0, 0), key (seed_lo, seed_hi), word
    c % 4, kept when the word >= floor(p · 2^32) (the attention's stream, csrc/philox.h)."""
    key, threshold = (seed & M32, seed >> 32), int(p * 2**32)
    keep = torch.zeros(rows, C, dtype=torch.bool)
    for r in range(rows):
        for g in range((C + 3) // 4):
            words = philox4x32_10((g, r, 0, 0), key)
            for c in range(4 * g, min(C, 4 * g + 4)):
                keep[r, c] = words[c % 4] >= threshold
    return keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 70), (130,), (2, 1, 1)])
def test_applies_exactly_the_documented_mask(shape, dtype):
    p, seed = 0.3, 2**40 + 9
    x = torch.randn(shape).to(dtype)
    y = ext.dropout(x, p, torch.tensor(seed))
    keep = python_keep(x.numel() // shape[-1], shape[-1], p, seed).view(shape)
    scale = torch.tensor(1 / (1 - p), dtype=torch.float32)  # the kernel multiplies by 1/(1-p) in float32
    expected = torch.where(keep, x.float() * scale, 0.0)
    tol = 0 if dtype == torch.float32 else 2**-8  # bfloat16: the product rounded once
    torch.testing.assert_close(y.float(), expected, rtol=tol, atol=0)
    assert y.dtype == dtype and y.shape == x.shape


def test_gradient_is_the_same_mask_and_nothing_is_stored():
    x = torch.randn(4, 33, 96, requires_grad=True)
    seed = torch.tensor(5)
    y = ext.dropout(x, 0.25, seed)
    g = torch.randn_like(x)
    (dx,) = torch.autograd.grad(y, x, g)
    torch.testing.assert_close(dx, ext.dropout(g, 0.25, seed), rtol=0, atol=0)
    torch.testing.assert_close(dx, torch.where(y != 0, g / 0.75, 0.0))
    torch.library.opcheck(ops.dropout_seeded.default, (torch.randn(3, 70, requires_grad=True), 0.3, torch.tensor(5)))
    torch.library.opcheck(ops.dropout.default, (torch.randn(3, 70), 0.3, 5, 0))


def test_rate_repeatability_and_thread_count():
    x = torch.ones(64, 256, 384)
    torch.manual_seed(0)
    a = ext.dropout(x, 0.2)
    torch.manual_seed(0)
    b = ext.dropout(x, 0.2)
    assert torch.equal(a, b)  # the seed comes from torch's generator
    assert not torch.equal(a, ext.dropout(x, 0.2))  # and the next call draws another
    assert abs((a != 0).float().mean().item() - 0.8) < 2e-3  # 6.3M draws: 0.0002 standard error
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.dropout(x, 0.2, torch.tensor(3))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, ext.dropout(x, 0.2, torch.tensor(3)))


@pytest.mark.parametrize("call, match", [
    (lambda: ext.dropout(torch.randn(3, 4), 1.0), r"p must be in \[0, 1\); got 1.0"),
    (lambda: ext.dropout(torch.randn(3, 4), -0.1), r"p must be in \[0, 1\); got -0.1"),
    (lambda: ext.dropout(torch.randn(3, 4).half(), 0.1), "float32 or bfloat16 CPU tensor; got a torch.float16 tensor"),
    (lambda: ext.dropout(torch.tensor(1.0), 0.1), "at least 1 dim"),
    (lambda: ext.dropout(torch.randn(3, 4), 0.1, 7), "seed must be a 0-dim int64 tensor"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_module_picks_the_kernel_by_tensor_and_mode():
    d = ResidualDropout(0.2)
    x = torch.randn(2, 8, 16)
    assert d.kernel(x) == "dropout.ext" and d.kernel(x.bfloat16()) == "dropout.ext"
    assert d.kernel(x.double()) == "dropout.torch"  # F.dropout: no ext kernel for float64
    assert d.kernel(torch.randn(2, 8, 16, device="meta")) == "dropout.torch"
    d.eval()
    assert d(x) is x  # evaluation: identity
    d.train()
    torch.manual_seed(1)
    y = d(x)
    torch.manual_seed(1)
    assert torch.equal(y, ext.dropout(x, 0.2))
    assert d(x.double()).dtype == torch.float64
    assert ResidualDropout(0.0)(x) is x
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\); got 1.5"):
        ResidualDropout(1.5)
