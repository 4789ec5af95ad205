"""Parity of attention backends against the float64 reference: one shape list, one tolerance rule.

`fastgpt parity` and the test suite both read PARITY_SHAPES and TOLERANCES from here, so the
promise a user checks on their GPU is the promise CI checks on CPU.

The rule (flash-attention's convention): a backend run in dtype X may be off the float64 reference
by at most FACTOR × the error of the naive math run in that same dtype X, plus a small floor that
covers dtypes where the naive error is ~0 (float32, float64):

    max|out_backend - out_ref| <= OUTPUT_FACTOR * max|out_naive_X - out_ref| + floor_out[X]
    max|dq_backend  - dq_ref|  <= GRAD_FACTOR   * max|dq_naive_X  - dq_ref|  + floor_grad[X]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastgpt.attention.api import causal_attention
from fastgpt.attention.naive import naive_attention

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

DTYPE_NAMES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ParityResult:
    backend: str
    shape: tuple[int, ...]  # (B, H, T_q, T_k, D)
    dtype: torch.dtype
    errors: dict[str, float]  # 'out', 'dq', 'dk', 'dv': max abs error against float64
    limits: dict[str, float]  # the same keys: the tolerance each error must stay under

    @property
    def ok(self) -> bool:
        return all(self.errors[k] <= self.limits[k] for k in self.errors)

    @property
    def worst(self) -> str:
        """The output whose error uses the largest share of its tolerance."""
        return max(self.errors, key=lambda k: self.errors[k] / self.limits[k])


def shape_id(shape) -> str:
    """A test id for a parity shape: B2H3Tq1Tk17D16."""
    B, H, T_q, T_k, D = shape
    return f"B{B}H{H}Tq{T_q}Tk{T_k}D{D}"


def make_qkv(shape, dtype, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of `shape` (B, H, T, D), or (B, H, T_q, T_k, D) for fewer queries than keys, as
    strided views of one (B, T_k, 3, H, D) buffer, the layout a fused qkv projection produces, so
    every backend is tested on non-contiguous input. q holds the last T_q positions, as in a KV
    cache; a 4-tuple gives the same tensors as (B, H, T, T, D)."""
    if len(shape) == 4:
        B, H, T_k, D = shape
        T_q = T_k
    else:
        B, H, T_q, T_k, D = shape
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T_k, 3, H, D, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T_k, D), non-contiguous
    return q[:, :, T_k - T_q:], k, v


def _forward_backward(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _max_errors(got: dict, ref: dict) -> dict[str, float]:
    return {key: (got[key].double() - ref[key]).abs().max().item() for key in ref}


def check_parity(backend: str, shape, dtype: torch.dtype, device="cpu", seed: int = 0) -> ParityResult:
    """Runs `backend` forward and backward at `shape` (B, H, T_q, T_k, D) or (B, H, T, D) and
    `dtype`, and compares with float64."""
    q, k, v = make_qkv(shape, dtype, device, seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    dout_x = dout.to(device=device, dtype=dtype)

    ref = _forward_backward(naive_attention, q.double(), k.double(), v.double(), dout.to(device))
    same_dtype_naive = _max_errors(_forward_backward(naive_attention, q, k, v, dout_x), ref)
    got = _max_errors(_forward_backward(lambda a, b, c: causal_attention(a, b, c, backend=backend), q, k, v, dout_x), ref)

    limits = {key: tolerance(key, naive_err, dtype) for key, naive_err in same_dtype_naive.items()}
    return ParityResult(backend, tuple(shape), dtype, got, limits)


def tolerance(key: str, naive_error: float, dtype: torch.dtype) -> float:
    """The rule above for one output ('out', 'dq', 'dk' or 'dv'), given the naive math's error in
    `dtype`; tests that build their own reference (dropout with a kernel's mask) use it too."""
    floor = TOLERANCES[dtype]
    factor, base = (OUTPUT_FACTOR, floor.out) if key == "out" else (GRAD_FACTOR, floor.grad)
    return factor * naive_error + base
