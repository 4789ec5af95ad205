"""Parity against the float64 reference: one shape list, one tolerance rule, one harness.

`fastgpt parity` and the test suite both read the shape lists and the rule from here, so the
promise a user checks on their GPU is the promise CI checks on CPU.

The rule (flash-attention's convention): code run in dtype X may be off the float64 reference by
at most FACTOR × the error of the reference math run in that same dtype X, plus a small floor that
covers dtypes where that error is ~0 (float32, float64):

    max|out_got - out_ref| <= OUTPUT_FACTOR * max|out_ref_X - out_ref| + floor_out[X]
    max|dq_got  - dq_ref|  <= GRAD_FACTOR   * max|dq_ref_X  - dq_ref|  + floor_grad[X]

The harness, from the most general piece to the attention-specific one:

    assess(got, oracle, same_dtype, dtype)    the rule on tensors already computed (dicts by name)
    compare(fn, reference_fn, inputs, dout, dtype)
                                              fn and the reference, forward and backward, on cloned
                                              inputs, in float64 and in dtype; then assess
    check_parity(backend, shape, dtype)       a registered backend against the naive math
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from typing import Optional

import torch

from fastgpt.attention.api import attention
from fastgpt.attention.naive import naive_attention, naive_varlen_attention
from fastgpt.attention.paged import paged_attention, write_pages
from fastgpt.attention.varlen import varlen_attention

# (B, H, T_q, T_k, D): every sequence length {1, 17, 64, 100, 257} and head dim {16, 32, 48, 64, 80,
# 96, 128} appears at least once, B and H > 1; odd T on purpose (not multiples of any block size).
# The first eight are square (training); the rest have fewer queries than keys (a KV cache: the
# diagonal aligned bottom-right): one query (decoding), a few, and T_k minus a few, at offsets
# T_k - T_q that are no multiple of any block size. Kept small: Triton's parity runs interpreted.
PARITY_SHAPES: list[tuple[int, int, int, int, int]] = [
    (2, 3, 1, 1, 16),
    (2, 3, 17, 17, 32),
    (2, 2, 64, 64, 48),
    (2, 2, 100, 100, 64),
    (2, 2, 257, 257, 64),
    (2, 2, 17, 17, 80),
    (2, 2, 64, 64, 96),
    (2, 2, 100, 100, 128),
    (2, 3, 1, 17, 16),
    (2, 2, 1, 100, 64),
    (1, 2, 1, 257, 128),
    (2, 2, 5, 70, 32),
    (2, 2, 13, 100, 48),
    (2, 2, 61, 64, 80),
    (2, 2, 97, 100, 64),
]
# Grouped-query (B, H, H_kv, T_q, T_k, D): groups of H / H_kv = 2, 3 and 8 query heads per key/value
# head (8 over 1: multi-query), square and with fewer queries than keys, odd lengths, B > 1.
GQA_SHAPES: list[tuple[int, int, int, int, int, int]] = [
    (2, 4, 2, 17, 17, 32),
    (2, 6, 2, 37, 37, 64),
    (2, 8, 1, 64, 64, 16),
    (1, 16, 2, 33, 33, 128),
    (2, 6, 3, 1, 100, 48),
    (2, 8, 1, 13, 100, 64),
    (2, 6, 2, 97, 100, 80),
]
# Head dims off the common list, padded inside the Triton kernels (to 64, 128 and 256), up to its
# widest, 256: square, fewer queries than keys, and grouped-query. Small T: Triton runs interpreted.
HEAD_DIM_SHAPES: list[tuple[int, ...]] = [
    (2, 2, 37, 37, 40),
    (1, 3, 33, 33, 59),
    (2, 2, 5, 70, 111),
    (1, 2, 50, 50, 160),
    (2, 4, 2, 17, 40, 192),
    (1, 2, 29, 29, 256),
    (1, 4, 1, 3, 50, 256),
]
# Every shape `fastgpt parity` checks.
ALL_SHAPES: list[tuple[int, ...]] = PARITY_SHAPES + GQA_SHAPES + HEAD_DIM_SHAPES
# The square ones as (B, H, T, D), for tests of pieces that only exist for T_q == T_k.
SQUARE_SHAPES: list[tuple[int, int, int, int]] = [(B, H, T_q, D) for B, H, T_q, T_k, D in PARITY_SHAPES if T_q == T_k]
OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


@dataclass(frozen=True)
class Floor:
    out: float
    grad: float


# Absolute floors per dtype, for unit-scale inputs (randn q, k, v and upstream gradient).
TOLERANCES: dict[torch.dtype, Floor] = {
    torch.float64: Floor(out=1e-10, grad=1e-10),
    torch.float32: Floor(out=1e-5, grad=2e-5),
    torch.float16: Floor(out=1e-3, grad=4e-3),
    torch.bfloat16: Floor(out=8e-3, grad=3e-2),
}

# The keys of an attention parity check: 'out', then the gradients of q, k, v.
GRAD_NAMES = ("dq", "dk", "dv")

DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ParityResult:
    errors: dict[str, float]  # 'out', then one key per input gradient: max abs error against float64
    limits: dict[str, float]  # the same keys: the tolerance each error must stay under
    dtype: Optional[torch.dtype] = None  # the dtype the code under test ran in
    backend: str = ""  # check_parity's: which backend, at which shape
    shape: tuple[int, ...] = ()  # (B, H, T_q, T_k, D)

    @property
    def ok(self) -> bool:
        return all(self.errors[k] <= self.limits[k] for k in self.errors)

    @property
    def worst(self) -> str:
        """The output whose error uses the largest share of its tolerance."""
        return max(self.errors, key=lambda k: self.errors[k] / self.limits[k])

    def explain(self) -> str:
        """The outputs over their tolerance, for an assertion message."""
        over = [f"{k} ({self.errors[k]:.3g} > {self.limits[k]:.3g})" for k in self.errors
                if not self.errors[k] <= self.limits[k]]
        return "error above the parity limit for " + ", ".join(over) if over else "every error within its limit"


def shape_id(shape) -> str:
    """A test id for a parity shape: B2H3Tq1Tk17D16, or B2H6Hkv2Tq37Tk37D64 for grouped-query."""
    if len(shape) == 6:
        B, H, H_kv, T_q, T_k, D = shape
        return f"B{B}H{H}Hkv{H_kv}Tq{T_q}Tk{T_k}D{D}"
    B, H, T_q, T_k, D = shape
    return f"B{B}H{H}Tq{T_q}Tk{T_k}D{D}"


def unpack_shape(shape) -> tuple[int, int, int, int, int, int]:
    """(B, H, H_kv, T_q, T_k, D) of a parity shape: (B, H, T, D), (B, H, T_q, T_k, D) or
    (B, H, H_kv, T_q, T_k, D)."""
    if len(shape) == 4:
        B, H, T, D = shape
        return B, H, H, T, T, D
    if len(shape) == 5:
        B, H, T_q, T_k, D = shape
        return B, H, H, T_q, T_k, D
    return tuple(shape)


def make_qkv(shape, dtype, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, H, T_q, D), k and v (B, H_kv, T_k, D) for a parity shape (unpack_shape), as strided
    views of one (B, T_k, H + 2·H_kv, D) buffer, the layout a fused qkv projection produces, so
    every backend is tested on non-contiguous input. q holds the last T_q positions, as in a KV
    cache; a 4-tuple (B, H, T, D) gives the same tensors as (B, H, T, T, D). With T_q > T_k (a
    bidirectional call) k and v hold the last T_k positions."""
    B, H, H_kv, T_q, T_k, D = unpack_shape(shape)
    T = max(T_q, T_k)
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, H + 2 * H_kv, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = qkv.transpose(1, 2).split([H, H_kv, H_kv], dim=1)  # (B, heads, T, D), non-contiguous
    return q[:, :, T - T_q:], k[:, :, T - T_k:], v[:, :, T - T_k:]


def floor(key: str, dtype: torch.dtype) -> float:
    """The dtype's absolute floor for output `key` ('out', or any gradient name)."""
    return TOLERANCES[dtype].out if key == "out" else TOLERANCES[dtype].grad


def tolerance(key: str, same_dtype_error: float, dtype: torch.dtype) -> float:
    """The rule above for one output ('out', or any gradient name), given the error of the
    reference math run in `dtype`."""
    return (OUTPUT_FACTOR if key == "out" else GRAD_FACTOR) * same_dtype_error + floor(key, dtype)


def max_errors(got: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor]) -> dict[str, float]:
    """max |got - oracle| per key of `oracle`, in float64."""
    return {key: (got[key].double() - oracle[key].double()).abs().max().item() for key in oracle}


def assess(got: dict[str, torch.Tensor], oracle: dict[str, torch.Tensor], same_dtype: dict[str, torch.Tensor],
           dtype: torch.dtype) -> ParityResult:
    """The rule applied to tensors already computed: `got` (the code under test, in `dtype`),
    `oracle` (the reference in float64) and `same_dtype` (the reference in `dtype`), each a dict
    with the same keys; 'out' is held to the output factor, every other key to the gradient one."""
    same_dtype_errors = max_errors(same_dtype, oracle)
    limits = {key: tolerance(key, err, dtype) for key, err in same_dtype_errors.items()}
    return ParityResult(max_errors(got, oracle), limits, dtype)


def forward_backward(fn, inputs, dout: torch.Tensor, grad_names=GRAD_NAMES) -> dict[str, torch.Tensor]:
    """fn(*inputs) and its backward from `dout`, on detached clones of the inputs:
    {'out': output, grad_names[i]: gradient of inputs[i]}."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return {"out": out.detach(), **{name: t.grad for name, t in zip(grad_names, leaves, strict=True)}}


def compare(fn, reference_fn, inputs, dout: torch.Tensor, dtype: torch.dtype,
            grad_names=GRAD_NAMES) -> ParityResult:
    """fn against reference_fn, output and input gradients, under the rule above.

    fn and reference_fn take the inputs positionally and return one tensor. fn runs on the inputs
    cast to `dtype` (a no-op where they already are), the oracle is reference_fn on the inputs in
    float64, and the error the rule scales is reference_fn's on the inputs in `dtype`. The upstream
    gradient is `dout` in the same dtypes. fn runs first, so a reference may depend on what fn's
    call did (a dropout seed it drew)."""
    cast = [t.to(dtype) for t in inputs]
    got = forward_backward(fn, cast, dout.to(dtype), grad_names)
    oracle = forward_backward(reference_fn, [t.double() for t in inputs], dout.double(), grad_names)
    same_dtype = forward_backward(reference_fn, cast, dout.to(dtype), grad_names)
    return assess(got, oracle, same_dtype, dtype)


def check_parity(backend: str, shape, dtype: torch.dtype, device="cpu", seed: int = 0, **options) -> ParityResult:
    """Runs `backend` forward and backward at `shape` (B, H, T_q, T_k, D) or (B, H, T, D) and
    `dtype`, and compares with the naive math in float64 and in `dtype`; `options` as
    fastgpt.attention.attention takes them (the same for both). Sinks are an input like q, k and v:
    cast to `dtype`, their gradient compared as "dsinks"."""
    q, k, v = make_qkv(shape, dtype, device, seed)
    result = _compare_with_sinks(functools.partial(attention, backend=backend), naive_attention, (q, k, v), dtype,
                                 seed, options)
    return replace(result, backend=backend, shape=tuple(shape))


def _compare_with_sinks(fn, reference_fn, qkv, dtype: torch.dtype, seed: int, options: dict) -> ParityResult:
    """compare() of fn(q, k, v, **options) against reference_fn's, the sinks (if any) an input whose
    gradient is compared too; the upstream gradient drawn from seed + 1."""
    q = qkv[0]
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(q.device)
    options = dict(options)
    sinks = options.pop("sinks", None)
    inputs, grad_names = tuple(qkv), GRAD_NAMES
    if sinks is not None:
        inputs, grad_names = (*qkv, sinks), GRAD_NAMES + ("dsinks",)

    def under_test(q, k, v, *sinks):
        return fn(q, k, v, **options, **({"sinks": sinks[0]} if sinks else {}))

    def reference(q, k, v, *sinks):
        return reference_fn(q, k, v, **options, **({"sinks": sinks[0]} if sinks else {}))

    return compare(under_test, reference, inputs, dout, dtype, grad_names)


def make_packed(shape, dtype, device, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A parity shape (B, H, T_q, T_k, D) as B packed sequences of different lengths: sequence b
    keeps the last max(1, T_q - 7b) queries and as many more keys as the shape has (T_k - T_q), so
    the batch mixes long and short sequences with T_q != T_k where the shape has it. Returns q
    (total_q, H, D), k, v (total_k, H_kv, D) (rows of make_qkv's strided views) and int32
    cu_seqlens_q, cu_seqlens_k."""
    q4, k4, v4 = make_qkv(shape, dtype, device, seed)
    B, T_q, T_k = q4.shape[0], q4.shape[2], k4.shape[2]
    q_lens = [max(1, T_q - 7 * b) for b in range(B)]
    k_lens = [max(0, n + T_k - T_q) for n in q_lens]
    q = torch.cat([q4[b, :, T_q - n:].transpose(0, 1) for b, n in enumerate(q_lens)])
    k, v = (torch.cat([t[b, :, T_k - n:].transpose(0, 1) for b, n in enumerate(k_lens)]) for t in (k4, v4))
    cu_q, cu_k = (torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32) for lens in (q_lens, k_lens))
    return q, k, v, cu_q, cu_k


def make_paged(shape, dtype, device, page_size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """make_packed's batch with its keys and values in a paged KV cache of `page_size` positions a
    page, the pages in random order (drawn from seed) among a few no sequence uses. Returns q
    (total_q, H, D), k_pages, v_pages (num_pages, page_size, H_kv, D), block_table (B, max_pages)
    int32, seq_lens (B,) and cu_seqlens_q, all on `device`."""
    q, k, v, cu_q, cu_k = make_packed(shape, dtype, device, seed)
    k_lens = (cu_k[1:] - cu_k[:-1]).tolist()
    pages_each = [max(1, -(-n // page_size)) for n in k_lens]
    order = torch.randperm(sum(pages_each) + 2, generator=torch.Generator().manual_seed(seed)).tolist()
    table = torch.zeros(len(k_lens), max(pages_each), dtype=torch.int32)
    for b, n in enumerate(pages_each):
        table[b, :n] = torch.tensor(order[:n])
        order = order[n:]
    k_pages, v_pages = (torch.zeros(len(order) + sum(pages_each), page_size, *k.shape[1:], dtype=dtype, device=device)
                        for _ in range(2))
    seq_lens = torch.tensor(k_lens, device=device)
    write_pages(k_pages, v_pages, table.to(device), seq_lens, k, v, cu_k)
    return q, k_pages, v_pages, table.to(device), seq_lens, cu_q


def check_paged_parity(backend: str, shape, dtype: torch.dtype, device="cpu", seed: int = 0, page_size: int = 16,
                       **options) -> ParityResult:
    """check_varlen_parity's batch over a paged KV cache (make_paged): `backend`'s paged_attention
    against naive_varlen_attention over the same keys, the output only (a paged cache serves
    inference: the paths that read pages in place have no backward), the same rule."""
    q, k_pages, v_pages, table, seq_lens, cu_q = make_paged(shape, dtype, device, page_size, seed)
    _, k, v, _, cu_k = make_packed(shape, dtype, device, seed)
    sinks = options.pop("sinks", None)

    def in_dtype(t_dtype):
        return {**options, **({"sinks": sinks.to(t_dtype)} if sinks is not None else {})}

    with torch.no_grad():
        got = paged_attention(q, k_pages, v_pages, table, seq_lens, cu_q, backend=backend, **in_dtype(dtype))
        oracle = naive_varlen_attention(q.double(), k.double(), v.double(), cu_q, cu_k, **in_dtype(torch.float64))
        same_dtype = naive_varlen_attention(q, k, v, cu_q, cu_k, **in_dtype(dtype))
    result = assess({"out": got}, {"out": oracle}, {"out": same_dtype}, dtype)
    return replace(result, backend=backend, shape=tuple(shape))


def check_varlen_parity(backend: str, shape, dtype: torch.dtype, device="cpu", seed: int = 0,
                        **options) -> ParityResult:
    """check_parity for packed sequences (make_packed's batch): `backend`'s varlen_attention against
    naive_varlen_attention, outputs and gradients, the same rule."""
    q, k, v, cu_q, cu_k = make_packed(shape, dtype, device, seed)

    def under_test(q, k, v, **options):
        return varlen_attention(q, k, v, cu_q, cu_k, backend=backend, **options)

    def reference(q, k, v, **options):
        return naive_varlen_attention(q, k, v, cu_q, cu_k, **options)

    result = _compare_with_sinks(under_test, reference, (q, k, v), dtype, seed, options)
    return replace(result, backend=backend, shape=tuple(shape))
