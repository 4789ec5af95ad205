"""The parity harness itself (fastgpt.verify.parity): what compare runs, on what, and that it catches an
error the rule does not allow. The backends' own parity is in their test files."""

import pytest
import torch

from fastgpt.attention import naive_attention
from fastgpt.verify.parity import assess, compare, floor, make_qkv


def _inputs(dtype=torch.float32):
    q, k, v = make_qkv((2, 2, 17, 16), dtype, "cpu")
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return (q, k, v), dout


def test_the_reference_passes_against_itself_and_float64_needs_only_the_floor():
    inputs, dout = _inputs()
    result = compare(naive_attention, naive_attention, inputs, dout, torch.float32)
    assert result.ok, result.explain()
    assert set(result.errors) == {"out", "dq", "dk", "dv"}
    # in float64 the same-dtype reference is the oracle: every limit is the dtype's floor
    result = compare(naive_attention, naive_attention, inputs, dout, torch.float64)
    assert result.limits == {key: floor(key, torch.float64) for key in result.limits}


def test_an_error_beyond_the_rule_fails_and_is_named():
    inputs, dout = _inputs()
    result = compare(lambda q, k, v: naive_attention(q, k, v) * 1.01, naive_attention, inputs, dout, torch.float32)
    assert not result.ok and result.worst == "out"
    assert "out (" in result.explain()


def test_fn_runs_first_on_clones_cast_to_the_dtype():
    inputs, dout = _inputs(torch.float64)
    seen = []

    def fn(q, k, v):
        seen.append(("fn", q.dtype))
        return naive_attention(q, k, v)

    def reference(q, k, v):
        seen.append(("reference", q.dtype))
        return naive_attention(q, k, v)

    compare(fn, reference, inputs, dout, torch.float16, grad_names=("a", "b", "c"))
    assert seen == [("fn", torch.float16), ("reference", torch.float64), ("reference", torch.float16)]
    assert all(t.grad is None and not t.requires_grad for t in inputs)


def test_assess_applies_the_gradient_factor_to_every_key_but_out():
    oracle = {"out": torch.zeros(3, dtype=torch.float64), "grad": torch.zeros(3, dtype=torch.float64)}
    same_dtype = {"out": torch.full((3,), 0.1), "grad": torch.full((3,), 0.1)}
    got = {"out": torch.full((3,), 0.25), "grad": torch.full((3,), 0.25)}
    result = assess(got, oracle, same_dtype, torch.float32)
    assert result.errors["out"] == pytest.approx(0.25)
    assert not result.ok and result.worst == "out"  # 2.5× the same-dtype error: over the output factor only
    assert result.errors["grad"] <= result.limits["grad"]
