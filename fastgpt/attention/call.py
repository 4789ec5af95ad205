"""`AttentionCall`: one attention call, described once.

Validation builds it (`AttentionCall.of`, the one place bad input is refused), and everything that
decides about a call after that takes it: each kernel path's refusal, `backend="auto"`'s order (by
the call's `kind`) and the record of what ran. A backend never sees unvalidated tensors.

    q:    (B, H, T_q, D)          batch, heads, q_len, head_dim
    k, v: (B, H_kv, T_k, D)       kv_heads divides heads; kv_len >= q_len

The causal diagonal is aligned bottom-right (query i sees keys 0..T_k - T_q + i; api.py draws it),
the one alignment there is so far: `causal` names it, so that the options the next features add
(a window, a soft-cap, a bidirectional call) are fields of this value rather than new arguments
threaded through every backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CALL_KINDS = ("plain", "dropout", "cached")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class AttentionCall:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    dropout_p: float
    scale: float
    causal: str = "bottom-right"
    # traced by torch.compile: paths whose autograd lives outside torch.library cannot be traced
    compiling: bool = False

    @classmethod
    def of(cls, q, k, v, dropout_p: float = 0.0, scale: Optional[float] = None) -> "AttentionCall":
        """The call q, k, v make, validated: TypeError/ValueError naming the offending argument,
        its value and the limit. scale=None means D**-0.5."""
        validate_inputs(q, k, v, dropout_p, scale)
        B, H, T_q, D = q.shape
        return cls(batch=B, heads=H, kv_heads=k.shape[1], q_len=T_q, kv_len=k.shape[2], head_dim=D,
                   dtype=q.dtype, device=q.device, dropout_p=float(dropout_p),
                   scale=float(D**-0.5 if scale is None else scale), compiling=torch.compiler.is_compiling())

    @classmethod
    def like(cls, q: torch.Tensor, *, kv_heads: Optional[int] = None, kv_len: Optional[int] = None,
             dropout_p: float = 0.0, scale: Optional[float] = None) -> "AttentionCall":
        """The call q makes over kv_heads key/value heads of kv_len keys (default: q's own),
        without k and v: what a benchmark or a trainer asks the registry about before running."""
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"q must be a torch.Tensor of shape (B, H, T, D); got {type(q).__name__}")
        B, H, T_q, D = q.shape if q.dim() == 4 else (0, 0, 0, 0)
        kv_heads = H if kv_heads is None else kv_heads
        kv_len = T_q if kv_len is None else kv_len
        meta_q = torch.empty(q.shape, dtype=q.dtype, device="meta")  # validated as shapes: nothing allocated
        meta_k = torch.empty(B, kv_heads, kv_len, D, dtype=q.dtype, device="meta")
        validate_inputs(meta_q, meta_k, meta_k, dropout_p, scale)
        return cls(batch=B, heads=H, kv_heads=kv_heads, q_len=T_q, kv_len=kv_len, head_dim=D, dtype=q.dtype,
                   device=q.device, dropout_p=float(dropout_p), scale=float(D**-0.5 if scale is None else scale),
                   compiling=torch.compiler.is_compiling())

    @property
    def kind(self) -> str:
        """What `backend="auto"` orders by (CALL_KINDS): "dropout" (dropout_p > 0), "cached" (fewer
        queries than keys: the new tokens of a KV-cache step) or "plain"."""
        if self.dropout_p > 0:
            return "dropout"
        return "cached" if self.q_len < self.kv_len else "plain"

    @property
    def grouped(self) -> bool:
        """Grouped-query: fewer key/value heads than query heads."""
        return self.kv_heads != self.heads

    def describe(self) -> str:
        """The call in one line, for logs and refusals."""
        gqa = f", H_kv={self.kv_heads}" if self.grouped else ""
        return (f"{self.device.type} {dtype_name(self.dtype)} B={self.batch} H={self.heads}{gqa} "
                f"T_q={self.q_len} T_k={self.kv_len} D={self.head_dim} dropout_p={self.dropout_p}")


def validate_inputs(q, k, v, dropout_p: float, scale: Optional[float]) -> None:
    """Raises TypeError/ValueError naming the offending argument, its value and the limit."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, T, D); got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, T, D); got {t.dim()} dims with shape {_shape(t)}")
    if k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or k.shape[2] < q.shape[2]:
        raise ValueError(f"k has shape {_shape(k)} but q has shape {_shape(q)}: q (B, H, T_q, D) and "
                         f"k, v (B, H_kv, T_k, D) must share B and D, with T_k >= T_q")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"k has {k.shape[1]} heads and q {q.shape[1]}: the key/value heads H_kv must divide the "
                         f"query heads H (each group of H / H_kv query heads shares one key/value head)")
    if v.shape != k.shape:
        raise ValueError(f"v has shape {_shape(v)} but k has shape {_shape(k)}: k and v must share (B, H_kv, T_k, D)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has dtype {q.dtype}: q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on device {t.device} but q is on {q.device}: q, k and v must share one device")
    if q.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(dtype_name(d) for d in SUPPORTED_DTYPES)
        raise ValueError(f"q has dtype {q.dtype}; causal_attention supports {names}")
    B, H, T, D = q.shape
    if min(B, H, T, D) < 1:
        raise ValueError(f"q has shape {_shape(q)}: B, H, T and D must all be at least 1")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1); got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None (meaning D**-0.5); got {scale!r}")
