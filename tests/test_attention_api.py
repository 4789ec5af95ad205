import logging

import pytest
import torch

import fastgpt
from fastgpt.attention import AttentionCall, causal_attention, naive_attention, refusal
from fastgpt.attention import registry
from fastgpt.attention.registry import Backend, auto_order, available_backends, register_backend
from fastgpt.model import CausalSelfAttention
from fastgpt.verify.parity import PARITY_SHAPES, check_parity, make_qkv, shape_id


@pytest.fixture(autouse=True)
def _registry_restored(monkeypatch):
    """Backends a test registers are gone after it: later tests see the real registry."""
    registry.backend_names()  # load the built-ins first, so they are part of what is restored
    monkeypatch.setattr(registry.ATTENTION, "backends", dict(registry.ATTENTION.backends))
    monkeypatch.setattr(registry.ATTENTION, "paths", dict(registry.ATTENTION.paths))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", PARITY_SHAPES, ids=shape_id)
@pytest.mark.parametrize("backend", ["naive", "sdpa"])
def test_parity_with_float64_reference(backend, shape, dtype):
    result = check_parity(backend, shape, dtype)
    assert result.ok, f"{backend} {shape} {dtype}: errors {result.errors} over limits {result.limits}"


def test_parity_check_catches_a_wrong_backend(monkeypatch):
    # A backend that forgets the causal mask must fail the same check the real ones pass.
    def leaky(q, k, v, dropout_p, scale):
        return torch.softmax(q @ k.transpose(-2, -1) * scale, dim=-1) @ v

    # registered into copies of the registry's tables, which the test's end puts back: whatever
    # order pytest-xdist runs the tests in, none sees this backend afterwards
    from fastgpt.attention import registry

    monkeypatch.setattr(registry.ATTENTION, "backends", dict(registry.ATTENTION.backends))
    monkeypatch.setattr(registry.ATTENTION, "paths", dict(registry.ATTENTION.paths))
    register_backend(Backend(name="_leaky_test_backend", fn=leaky, description="test only"))
    assert not check_parity("_leaky_test_backend", (2, 2, 17, 32), torch.float32).ok


def test_test_backends_do_not_leak_into_the_registry():
    assert not any(name.startswith("_") for name in fastgpt.backend_names())


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = make_qkv((1, 2, 9, 16), torch.float64, "cpu")
    assert torch.allclose(causal_attention(q, k, v, backend="sdpa"), causal_attention(q, k, v, scale=0.25, backend="naive"))
    assert not torch.allclose(causal_attention(q, k, v, scale=1.0, backend="naive"), causal_attention(q, k, v, backend="naive"))


def test_naive_dropout_follows_keep_mask():
    q, k, v = make_qkv((2, 2, 12, 8), torch.float64, "cpu")
    keep = torch.rand(2, 2, 12, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    out = naive_attention(q, k, v, dropout_p=0.3, keep_mask=keep)
    att = torch.softmax((q @ k.transpose(-2, -1) * 8**-0.5).masked_fill(torch.ones(12, 12).triu(1).bool(), -torch.inf), -1)
    assert torch.allclose(out, (att * keep / 0.7) @ v)


def test_dropout_zeroes_weights_and_is_seeded():
    q, k, v = make_qkv((2, 2, 32, 16), torch.float32, "cpu")
    for backend in ("naive", "sdpa"):
        torch.manual_seed(1)
        a = causal_attention(q, k, v, dropout_p=0.5, backend=backend)
        torch.manual_seed(1)
        b = causal_attention(q, k, v, dropout_p=0.5, backend=backend)
        assert torch.equal(a, b)
        assert not torch.allclose(a, causal_attention(q, k, v, backend=backend))


def test_available_backends_and_auto_choice_is_announced(caplog):
    assert {"naive", "sdpa"} <= set(fastgpt.available_backends("cpu"))
    q = torch.randn(1, 1, 4, 8, dtype=torch.float16)  # a dtype no earlier test sent through auto
    with caplog.at_level(logging.INFO, logger="fastgpt"):
        chosen = fastgpt.select_kernel(q)
    call = AttentionCall.of(q, q, q)
    runnable = [name for name in auto_order(q.device, "plain") if refusal(call, name) is None]
    assert chosen.backend == runnable[0]  # the first of the order that can run the call
    assert f"runs kernel path {chosen.name!r}" in caplog.text and "(plain call)" in caplog.text


@pytest.mark.parametrize("T_q, T_k, dropout_p, kind", [(4, 4, 0.0, "plain"), (4, 4, 0.1, "dropout"),
                                                       (1, 9, 0.0, "cached"), (3, 9, 0.2, "dropout")])
def test_auto_orders_each_kind_of_call(T_q, T_k, dropout_p, kind):
    q, k = torch.randn(1, 2, T_q, 8), torch.randn(1, 2, T_k, 8)
    call = AttentionCall.of(q, k, k, dropout_p)
    assert call.kind == kind
    order = [name for name in auto_order(q.device, kind) if refusal(call, name) is None]
    assert fastgpt.select_kernel(q, k, k, dropout_p=dropout_p).backend == order[0]


def test_a_kv_cache_step_on_cpu_prefers_sdpa():
    # a decode step's attention is tiny: sdpa's one call beats ext's three (benchmarks/ext_cpu.py)
    assert fastgpt.select_kernel(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)).name == "sdpa"
    with pytest.raises(ValueError, match="kind must be one of plain, dropout, cached; got 'decode'"):
        auto_order(torch.device("cpu"), "decode")


def test_non_contiguous_inputs_are_accepted():
    q, k, v = make_qkv((2, 3, 10, 16), torch.float32, "cpu")
    assert not q.is_contiguous()
    out = causal_attention(q, k, v, backend="naive")
    expected = causal_attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="naive")
    assert torch.allclose(out, expected, atol=1e-6)


GOOD = torch.zeros(2, 2, 4, 8)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((GOOD[0], GOOD[0], GOOD[0]), {}, ValueError, r"q must have 4 dims \(B, H, T, D\); got 3"),
    ((GOOD, GOOD[:, :, :3], GOOD), {}, ValueError, r"k has shape \(2, 2, 3, 8\) but q has shape \(2, 2, 4, 8\)"),
    ((torch.zeros(2, 3, 4, 8), GOOD, GOOD), {}, ValueError, r"k has 2 heads and q 3: the key/value heads H_kv must divide"),
    ((GOOD, GOOD[..., :4], GOOD[..., :4]), {}, ValueError, r"k has shape \(2, 2, 4, 4\) but q .*share B and D"),
    ((GOOD, GOOD[:, :, :3], GOOD[:, :, :3]), {}, ValueError, r"k has shape \(2, 2, 3, 8\) .*with T_k >= T_q"),
    ((GOOD[:, :, :1], GOOD, GOOD[:, :, :3]), {}, ValueError, r"v has shape \(2, 2, 3, 8\) but k has shape \(2, 2, 4, 8\): k and v must share"),
    ((GOOD, GOOD, GOOD.double()), {}, ValueError, "v has dtype torch.float64 but q has dtype torch.float32"),
    ((GOOD.long(), GOOD.long(), GOOD.long()), {}, ValueError, "q has dtype torch.int64; causal_attention supports"),
    ((GOOD, GOOD, GOOD), {"dropout_p": 1.0}, ValueError, r"dropout_p must be a number in \[0, 1\); got 1.0"),
    ((GOOD, GOOD, GOOD), {"dropout_p": -0.1}, ValueError, r"dropout_p must be a number in \[0, 1\); got -0.1"),
    ((GOOD, GOOD, GOOD), {"scale": float("nan")}, ValueError, "scale must be a finite number"),
    ((GOOD, GOOD, GOOD), {"backend": "flash9"}, ValueError, "backend='flash9' is not a known attention backend or kernel path; choose one of: auto, naive, "),
    ((GOOD[:, :, :0], GOOD[:, :, :0], GOOD[:, :, :0]), {}, ValueError, "B, H, T and D must all be at least 1"),
    (([1.0], GOOD, GOOD), {}, TypeError, "q must be a torch.Tensor"),
])
def test_bad_input_names_argument_value_and_limit(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        causal_attention(*args, **kwargs)


@pytest.mark.parametrize("T_q, T_k", [(1, 1), (1, 9), (3, 9), (8, 9)])
def test_fewer_queries_see_the_last_rows_of_the_square_mask(T_q, T_k):
    # bottom-right alignment: T_q queries over T_k keys are the last T_q rows of the T_k × T_k call
    q, k, v = make_qkv((1, 2, T_k, 16), torch.float64, "cpu")
    full = causal_attention(q, k, v, backend="naive")
    explicit = torch.softmax((q[:, :, -T_q:] @ k.transpose(-2, -1)) / 4.0
                             + torch.full((T_q, T_k), -torch.inf, dtype=torch.float64).triu(1 + T_k - T_q), -1) @ v
    for backend in ("naive", "sdpa"):
        out = causal_attention(q[:, :, -T_q:], k, v, backend=backend)
        assert out.shape == (1, 2, T_q, 16)
        torch.testing.assert_close(out, full[:, :, -T_q:])
        torch.testing.assert_close(out, explicit)


def test_mixed_devices_are_refused():
    meta = torch.zeros(2, 2, 4, 8, device="meta")
    with pytest.raises(ValueError, match="k is on device meta but q is on cpu"):
        causal_attention(GOOD, meta, GOOD)


def test_named_backend_that_refuses_a_call_says_why_and_does_not_fall_back():
    register_backend(Backend(name="_fp32_only_test_backend", fn=lambda *a: pytest.fail("must not run"),
                             description="test only",
                             unsupported_reason=lambda call: None if call.dtype == torch.float32 else f"dtype {call.dtype} unsupported"))
    register_backend(Backend(name="_absent_test_backend", fn=lambda *a: pytest.fail("must not run"),
                             description="test only", unavailable_reason=lambda d: "its package is not installed"))
    with pytest.raises(ValueError, match="does not support this call: dtype torch.float16 unsupported"):
        causal_attention(GOOD.half(), GOOD.half(), GOOD.half(), backend="_fp32_only_test_backend")
    with pytest.raises(RuntimeError, match="not available on device cpu: its package is not installed"):
        causal_attention(GOOD, GOOD, GOOD, backend="_absent_test_backend")
    assert "_absent_test_backend" not in fastgpt.available_backends("cpu")


def test_module_is_drop_in_and_swaps_backend_without_touching_weights():
    torch.manual_seed(0)
    layer = CausalSelfAttention(n_embd=32, n_head=4, backend="naive").double()
    x = torch.randn(3, 11, 32, dtype=torch.float64)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y_naive = layer(x)
    layer.set_backend("sdpa")
    assert torch.allclose(layer(x), y_naive)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    with pytest.raises(ValueError, match="not a known attention backend"):
        layer.set_backend("nope")


@pytest.mark.parametrize("scale", [0.0, -0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_a_scale_at_or_below_zero_is_computed_right_by_every_backend(scale, dtype):
    # softmax(scale·q·kᵀ) is defined for any finite scale: 0 gives uniform weights over the visible
    # keys. Every backend that takes the call must give the reference's answer, and so must auto.
    for shape in [(2, 2, 17, 17, 16), (2, 2, 5, 17, 16), (2, 2, 1, 17, 16)]:
        q, k, v = make_qkv(shape, dtype, "cpu")
        ref = naive_attention(q.double(), k.double(), v.double(), scale=scale)
        tol = 1e-2 if dtype == torch.float16 else 1e-5
        for name in ["auto", *available_backends("cpu")]:
            if refusal(AttentionCall.of(q, k, v), name) is not None:
                continue
            out = causal_attention(q, k, v, scale=scale, backend=name)
            assert (out.double() - ref).abs().max() < tol, (name, shape, dtype)
