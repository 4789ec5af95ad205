"""Non-finite inputs: every backend follows the rule in fastgpt/attention/api.py ("Non-finite inputs").

Each case puts one NaN, +inf or -inf into one element of q, k or v, inside one (batch, key/value
head) slice, and runs the forward and the backward from a finite upstream gradient:

    q (query row r)   that output row is NaN; every other output element is bit-equal to a clean run
    k, v (key j)      the rows that attend to key j are what the float64 formula gives: NaN, ±inf
                      or finite at the same elements, the finite ones close to it
    both              outside the slice, outputs and dq, dk, dv are bit-equal to a clean run

The bad element sits in batch 1, key/value head H_kv - 1 (with its query heads); key j is seen by
the rows i >= 1 only (i = 0 does not attend to it), so the causal window matters. Square, KV-cache
(fewer queries than keys, the diagonal bottom-right), decode (one query) and grouped-query shapes.
"""

from __future__ import annotations

import functools

import pytest
import torch

from fastgpt.attention.api import causal_attention
from fastgpt.attention.naive import naive_attention
from fastgpt.attention import AttentionCall, refusal

# NaN and inf are the point here: Triton's interpreter (numpy) warns about each one it meets
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

# (B, H, H_kv, T_q, T_k, D); D = 16 is the Triton kernels' smallest head dim
SHAPES = {
    "square": (2, 2, 2, 8, 8, 16),
    "kv_cache": (2, 4, 2, 3, 8, 16),
    "decode": (2, 4, 2, 1, 8, 16),
    "gqa": (2, 4, 2, 8, 8, 16),
}
BAD_VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
ELEMENT = 5  # the head-dim index that holds the bad value
# Finite outputs in the rows that see an infinity are compared with the float64 formula (the
# -inf score of that key gives it weight 0): the dtype's rounding of unit-scale attention
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}

# Triton runs interpreted on CPU (a second per call): fp32 at the shapes with a key/value head
# shared by two query heads, fp16 at one
CASES = [(name, dtype, shape) for name in ("naive", "sdpa") for dtype in ATOL for shape in SHAPES]
CASES += [("ext", dtype, shape) for dtype in (torch.float32, torch.bfloat16) for shape in SHAPES]  # its CPU dtypes
CASES += [("triton", torch.float32, shape) for shape in ("kv_cache", "decode", "gqa")]
CASES += [("triton", torch.float16, "gqa")]
# On a GPU the same cases run on CUDA too: PyTorch's CUDA kernels behind sdpa are not the CPU ones
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
CASES = [(*case, device) for device in DEVICES for case in CASES]


def _case_id(case) -> str:
    name, dtype, shape, device = case
    return f"{name}-{str(dtype).removeprefix('torch.')}-{shape}" + ("" if device == "cpu" else f"-{device}")


def _skip_unless_runs(backend: str, q: torch.Tensor, dropout_p: float = 0.0) -> None:
    reason = refusal(AttentionCall.like(q, dropout_p=dropout_p), backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


@functools.lru_cache(maxsize=None)
def _clean_inputs(shape: str, dtype: torch.dtype, device: str = "cpu"):
    B, H, H_kv, T_q, T_k, D = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    sizes = [(B, H, T_q, D), (B, H_kv, T_k, D), (B, H_kv, T_k, D), (B, H, T_q, D)]
    return tuple(torch.randn(size, generator=g).to(device=device, dtype=dtype) for size in sizes)  # q, k, v, dout


def _run(backend: str, q, k, v, dout, dropout_p: float = 0.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Output and input gradients of one call, on fresh leaves."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    torch.manual_seed(seed)  # the same dropout draw for the clean and the poisoned call
    out = causal_attention(q, k, v, dropout_p=dropout_p, backend=backend)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


@functools.lru_cache(maxsize=None)
def _clean_run(backend: str, shape: str, dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    return _run(backend, *_clean_inputs(shape, dtype, device))


def _slice_masks(shape: str) -> dict[str, torch.Tensor]:
    """Per result, True on the elements of the poisoned slice: batch 1, key/value head H_kv - 1
    and the query heads that read it."""
    B, H, H_kv, T_q, T_k, D = SHAPES[shape]
    G = H // H_kv
    q_side = torch.zeros(B, H, T_q, D, dtype=torch.bool)
    q_side[1, (H_kv - 1) * G:] = True
    kv_side = torch.zeros(B, H_kv, T_k, D, dtype=torch.bool)
    kv_side[1, H_kv - 1] = True
    return {"out": q_side, "dq": q_side, "dk": kv_side, "dv": kv_side}


def _assert_equal_outside_slice(got, clean, shape: str, what: str) -> None:
    for key, in_slice in _slice_masks(shape).items():
        outside = ~in_slice.to(got[key].device)
        a, b = got[key][outside], clean[key][outside]
        assert torch.equal(a, b), f"{what}: {key} changed outside the poisoned (batch, key/value head) slice"


@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_a_non_finite_query_row_makes_its_output_row_nan_and_nothing_else(case, value):
    backend, dtype, shape, device = case
    q, k, v, dout = _clean_inputs(shape, dtype, device)
    _skip_unless_runs(backend, q)
    B, H, H_kv, T_q, T_k, D = SHAPES[shape]
    head, row = (H_kv - 1) * (H // H_kv), max(T_q - 2, 0)
    q = q.clone()
    q[1, head, row, ELEMENT] = BAD_VALUES[value]

    got, clean = _run(backend, q, k, v, dout), _clean_run(backend, shape, dtype, device)

    assert got["out"][1, head, row].isnan().all(), (
        f"{backend}: a {value} in query row {row} gave {got['out'][1, head, row].tolist()}, not NaN")
    others = torch.ones_like(got["out"], dtype=torch.bool)
    others[1, head, row] = False
    assert torch.equal(got["out"][others], clean["out"][others]), f"{backend}: a {value} in q changed other rows"
    _assert_equal_outside_slice(got, clean, shape, backend)


def _attending(shape: str) -> tuple[int, int, int]:
    """(key j, first query row that sees it, key/value head) of the k and v cases."""
    B, H, H_kv, T_q, T_k, D = SHAPES[shape]
    first_row = 1 if T_q > 1 else 0  # row 0 sees keys up to j - 1; a lone decode query sees them all
    return T_k - T_q + first_row, first_row, H_kv - 1


@pytest.mark.parametrize("tensor", ["k", "v"])
@pytest.mark.parametrize("value", BAD_VALUES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_a_non_finite_key_or_value_reaches_every_row_that_attends_to_it_as_the_formula_says(case, value, tensor):
    backend, dtype, shape, device = case
    q, k, v, dout = _clean_inputs(shape, dtype, device)
    _skip_unless_runs(backend, q)
    B, H, H_kv, T_q, T_k, D = SHAPES[shape]
    j, first_row, kv_head = _attending(shape)
    poisoned = {"k": k.clone(), "v": v.clone()}
    poisoned[tensor][1, kv_head, j, ELEMENT] = BAD_VALUES[value]
    k, v = poisoned["k"], poisoned["v"]

    got, clean = _run(backend, q, k, v, dout), _clean_run(backend, shape, dtype, device)
    # the formula in float64 on the same (rounded) inputs
    want = naive_attention(q.double(), k.double(), v.double())

    G = H // H_kv
    heads = slice(kv_head * G, (kv_head + 1) * G)
    rows_got = got["out"][1, heads, first_row:].double()
    rows_want = want[1, heads, first_row:]
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        assert torch.equal(test(rows_got), test(rows_want)), (
            f"{backend}: a {value} in {tensor} gives {name} at other elements than the formula does "
            f"in the rows that attend to it (got {test(rows_got).sum().item()}, want {test(rows_want).sum().item()})")
    assert not rows_want.isfinite().all(), "the case must reach some row, or it tests nothing"
    finite = rows_want.isfinite()
    torch.testing.assert_close(rows_got[finite], rows_want[finite], atol=ATOL[dtype], rtol=0)
    _assert_equal_outside_slice(got, clean, shape, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["naive", "sdpa", "ext", "triton"])
def test_a_nan_query_row_stays_nan_and_alone_under_dropout(backend, device):
    q, k, v, dout = _clean_inputs("gqa", torch.float32, device)
    _skip_unless_runs(backend, q, dropout_p=0.3)
    B, H, H_kv, T_q, T_k, D = SHAPES["gqa"]
    head, row = (H_kv - 1) * (H // H_kv), T_q - 2
    bad = q.clone()
    bad[1, head, row, ELEMENT] = float("nan")

    got = _run(backend, bad, k, v, dout, dropout_p=0.3, seed=1)
    clean = _run(backend, q, k, v, dout, dropout_p=0.3, seed=1)

    assert got["out"][1, head, row].isnan().all(), f"{backend}: a NaN query row under dropout is not NaN"
    others = torch.ones_like(got["out"], dtype=torch.bool)
    others[1, head, row] = False
    assert torch.equal(got["out"][others], clean["out"][others])
    _assert_equal_outside_slice(got, clean, "gqa", backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["naive", "sdpa", "triton"])
def test_float16_queries_near_1e4_stay_finite_where_the_formula_is(backend, device):
    """|q| ~ 1e4 at D = 64 with unit k: products of ~8e4 overflow float16 before the scale
    brings them back to ~1e4; the float64 formula is finite, so every backend must be."""
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(1, 2, 16, 64, generator=g) * 1e4).to(device, torch.float16)
    k, v, dout = (torch.randn(1, 2, 16, 64, generator=g).to(device, torch.float16) for _ in range(3))
    _skip_unless_runs(backend, q)
    want = naive_attention(q.double(), k.double(), v.double())
    assert want.isfinite().all()

    got = _run(backend, q, k, v, dout)

    for key, t in got.items():
        assert t.isfinite().all(), f"{backend}: float16 q near 1e4 gave a non-finite {key}"
    # the weights are nearly one-hot: the output is close to the float64 formula's
    torch.testing.assert_close(got["out"].double(), want, atol=2e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", ["square", "decode", "gqa"])
def test_sdpa_restores_nan_rows_without_changing_a_finite_bit(shape, dtype):
    """Where sdpa puts NaN back into a query row (PyTorch's CPU flash kernel returns zeros
    there), every finite output is PyTorch's own, bit for bit, forward and backward."""
    B, H, H_kv, T_q, T_k, D = SHAPES[shape]
    q, k, v, dout = _clean_inputs(shape, dtype)
    got = _run("sdpa", q, k, v, dout)

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=T_q == T_k, enable_gqa=H_kv != H)
    out.backward(dout)
    for key, want in zip(("out", "dq", "dk", "dv"), (out.detach(), *(t.grad for t in leaves))):
        assert torch.equal(got[key], want), f"sdpa's {key} differs from PyTorch's"
