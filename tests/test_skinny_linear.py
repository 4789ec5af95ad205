"""The skinny linear kernel (csrc/cpu/skinny_linear.cpp) and the model's Linear layers that use it:
parity with float64, the rows where the layer takes it, bad input, and generation with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastgpt.ext as ext
from fastgpt.model.linear import SKINNY_MAX_ROWS, Linear, resolve_linear_kernel, skinny_applies
from fastgpt.model.gpt import ModelConfig, build_model

# float32 against float64: a dot product of K terms of size ~1 rounds by ~sqrt(K)·2^-24 relative.
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _extension():
    ext.load()


def reference(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


# K around the kernel's 32-float step (two 16-lane vectors) and its masked tail; M across its
# 4-row passes; 3-D x as the model passes it.
@pytest.mark.parametrize("x_shape, N", [((1, 384), 1152), ((1, 1536), 384), ((3, 1, 384), 65), ((5, 33), 7),
                                        ((2, 7, 100), 31), ((1, 16), 3), ((1, 5), 4), ((40, 48), 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_float64(x_shape, N, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g)
    w = torch.randn(N, x_shape[-1], generator=g) / x_shape[-1] ** 0.5
    b = torch.randn(N, generator=g) if bias else None
    y = ext.skinny_linear(x, w, b)
    assert y.shape == (*x_shape[:-1], N) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), reference(x, w, b), **FP32_TOL)


def test_strided_inputs_and_empty_sizes():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 64, generator=g)[:, ::2]  # (4, 32), stride 2
    w = torch.randn(10, 64, generator=g)[:, ::2]  # (10, 32), stride 2
    torch.testing.assert_close(ext.skinny_linear(x, w, None).double(), reference(x, w, None), **FP32_TOL)
    assert ext.skinny_linear(torch.randn(0, 8), torch.randn(3, 8), None).shape == (0, 3)
    assert torch.equal(ext.skinny_linear(torch.randn(2, 0), torch.randn(3, 0), torch.arange(3.0)),
                       torch.arange(3.0).expand(2, 3))


def test_opcheck():
    g = torch.Generator().manual_seed(2)
    x, w, b = torch.randn(3, 20, generator=g), torch.randn(6, 20, generator=g), torch.randn(6, generator=g)
    torch.library.opcheck(torch.ops.fastgpt.skinny_linear.default, (x, w, b))
    torch.library.opcheck(torch.ops.fastgpt.skinny_linear.default, (x, w, None))


@pytest.mark.parametrize("args, message", [
    ((torch.randn(1, 8, dtype=torch.float64), torch.randn(3, 8), None), "x is a torch.float64 tensor"),
    ((torch.randn(1, 8), torch.randn(3, 8).bfloat16(), None), "weight is a torch.bfloat16 tensor"),
    ((torch.randn(1, 8), torch.randn(3, 8, 1), None), "weight must have 2 dims (N, K); got shape (3, 8, 1)"),
    ((torch.randn(1, 7), torch.randn(3, 8), None), "x has shape (1, 7) but weight has shape (3, 8)"),
    ((torch.randn(1, 8), torch.randn(3, 8), torch.randn(4)), "bias must have shape (3,), one per output; got (4,)"),
    ((torch.randn(1, 8, requires_grad=True), torch.randn(3, 8), None), "no backward"),
])
def test_bad_input_is_refused_by_name(args, message):
    with pytest.raises(ValueError) as info:
        ext.skinny_linear(*args)
    assert message in str(info.value)


def test_the_op_checks_too():
    # the C++ checks, for callers of torch.ops.fastgpt directly
    with pytest.raises(RuntimeError, match="skinny_linear: x has 7 features"):
        torch.ops.fastgpt.skinny_linear(torch.randn(1, 7), torch.randn(3, 8), None)
    with pytest.raises(RuntimeError, match="must be float32"):
        torch.ops.fastgpt.skinny_linear(torch.randn(1, 8).double(), torch.randn(3, 8).double(), None)


# ---- the Linear layer --------------------------------------------------------------------------------

class OpLog(TorchDispatchMode):
    """Records the name of every op that reaches the dispatcher while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def skinny_calls(layer, x) -> int:
    with OpLog() as log:
        layer(x)
    return log.names.count("fastgpt::skinny_linear")


def test_layer_takes_the_kernel_only_where_it_applies():
    layer = Linear(48, 20)
    assert set(layer.state_dict()) == set(nn.Linear(48, 20).state_dict())  # checkpoints are unchanged
    layer.kernel = "skinny"
    few, many = torch.randn(2, 3, 48), torch.randn(1, SKINNY_MAX_ROWS + 1, 48)
    with torch.no_grad():
        torch.testing.assert_close(layer(few), F.linear(few, layer.weight, layer.bias), **FP32_TOL)
        assert skinny_calls(layer, few) == 1
        assert skinny_calls(layer, many) == 0  # more rows than SKINNY_MAX_ROWS: F.linear
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert skinny_calls(layer, few) == 0 and layer(few).dtype == torch.bfloat16  # autocast's precision
    assert skinny_calls(layer, few) == 0  # gradients wanted (the weight requires grad): F.linear
    layer(few).sum().backward()
    assert layer.weight.grad is not None
    layer.kernel = "torch"
    with torch.no_grad():
        assert skinny_calls(layer, few) == 0


def test_skinny_applies_rules():
    w = torch.randn(4, 8)
    assert skinny_applies(torch.randn(SKINNY_MAX_ROWS, 8), w)
    assert not skinny_applies(torch.randn(SKINNY_MAX_ROWS + 1, 8), w)
    assert not skinny_applies(torch.randn(1, 8).bfloat16(), w)


def test_resolve_linear_kernel():
    model = build_model(ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout_p=0.0))
    kernel, how = resolve_linear_kernel("auto", model)  # the extension builds here: auto times both
    assert kernel in ("torch", "skinny")
    assert how.startswith("one pass over the model's linear layers at one row") and "torch " in how and "skinny " in how
    assert resolve_linear_kernel("auto", model.to("meta")) == ("torch", "the skinny kernel is CPU-only (device meta)")
    assert resolve_linear_kernel("torch", model) == ("torch", None)
    with pytest.raises(ValueError, match="'skinny' is a CPU kernel; the model is on meta"):
        resolve_linear_kernel("skinny", model)
    with pytest.raises(ValueError, match="linear kernel 'fast' is unknown; choose one of: auto, torch, skinny"):
        resolve_linear_kernel("fast", model)
    bigram = build_model(ModelConfig(model="bigram", vocab_size=65, block_size=8))
    assert resolve_linear_kernel("auto", bigram) == ("torch", "the model has no linear layers (BigramLanguageModel)")


def test_auto_takes_the_kernel_that_timed_faster(monkeypatch):
    import fastgpt.model.linear as linear

    model = build_model(ModelConfig(vocab_size=65, block_size=16, n_layer=1, n_head=2, n_embd=32, dropout_p=0.0))
    torch.manual_seed(3)
    seconds = linear.time_one_row_pass(model, reps=2)
    assert set(seconds) == {"torch", "skinny"} and all(t > 0 for t in seconds.values())
    after = torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))  # timing drew nothing from the global generator
    for faster, timings in (("skinny", {"torch": 2e-3, "skinny": 1e-3}), ("torch", {"torch": 1e-3, "skinny": 2e-3}),
                            ("torch", {"torch": 1.05e-3, "skinny": 1e-3})):  # within 10%: F.linear stays
        monkeypatch.setattr(linear, "time_one_row_pass", lambda model, timings=timings: timings)
        kernel, how = resolve_linear_kernel("auto", model)
        assert kernel == faster and f"torch {timings['torch'] * 1e3:.2f} ms, skinny {timings['skinny'] * 1e3:.2f} ms" in how


@pytest.mark.parametrize("prompt_len", [3, 20], ids=["prompt-shorter-than-block", "prompt-longer-than-block"])
def test_model_generates_the_same_tokens_with_either_kernel_cached_or_not(prompt_len):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=65, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout_p=0.0,
                                    backend="sdpa"))
    idx = torch.randint(65, (2, prompt_len), generator=torch.Generator().manual_seed(1))
    runs = {}
    for kernel in ("torch", "skinny"):
        model.set_linear_kernel(kernel)
        assert {m.kernel for m in model.modules() if isinstance(m, Linear)} == {kernel}
        for kv_cache in (False, True):
            g = torch.Generator().manual_seed(2)
            runs[kernel, kv_cache] = model.generate(idx, 24, generator=g, kv_cache=kv_cache)
    first = runs["torch", False]
    assert all(torch.equal(first, out) for out in runs.values())
    with pytest.raises(ValueError, match="resolve 'auto'"):
        model.set_linear_kernel("auto")
    with pytest.raises(ValueError, match="linear kernel 'mkl' is unknown"):
        model.blocks[0].mlp.fc.kernel = "mkl"
    assert model.blocks[0].mlp.fc.kernel == "skinny"  # a refused name changes nothing
