"""`causal_attention`: the one contract that every attention backend meets.

    out = causal_attention(q, k, v, dropout_p=0.0, scale=None, backend="auto")

    q:    (B, H, T_q, D), any strides (views of a fused qkv projection are fine)
    k, v: (B, H_kv, T_k, D), T_k >= T_q, H_kv dividing H
    out:  (B, H, T_q, D)

Grouped-query attention (H_kv < H; multi-query at H_kv = 1): the query heads come in H_kv groups
of G = H / H_kv consecutive heads, and query head h reads key/value head h // G:

    query heads   0 1 2 3 4 5        H = 6, H_kv = 2, G = 3
    k, v heads    0 0 0 1 1 1

With T_q == T_k (training), query i attends to keys 0..i (the causal mask, diagonal included):

    keys ->   0 1 2 3
    query 0   x . . .
    query 1   x x . .
    query 2   x x x .
    query 3   x x x x

With T_q < T_k (generation with a KV cache: the queries are the last T_q of T_k tokens) the
diagonal is aligned bottom-right: query i sees keys 0..(T_k - T_q + i). T_q = 2, T_k = 5:

    keys ->   0 1 2 3 4
    query 0   x x x x .       (token 3 of 5)
    query 1   x x x x x       (token 4 of 5: the newest sees everything)

This is the square mask's last T_q rows, so the same call gives the same answer whether the
earlier queries were computed now or in a previous call. (`F.scaled_dot_product_attention`'s
is_causal=True aligns top-left when T_q != T_k, which would hide the cache from the new token.)

Non-finite inputs (NaN, +inf, -inf) anywhere in q, k or v go through softmax(scale·q·kᵀ)·v over
each row's causal window as IEEE arithmetic takes them, the same in every backend:

  - an output row is NaN (all of it) if its query row holds a NaN or an infinity, or a key row it
    attends to holds a NaN; a NaN in a value row it attends to makes that column of it NaN;
  - an infinity in a key enters the scores as IEEE says: a score of +inf or NaN (inf - inf,
    inf·0) makes the row NaN; a score of -inf gives that key the weight 0, as the causal mask
    does; an infinite value gives ±inf (or NaN) in its column of every row that attends to it;
  - never a finite number, zeros included, where the formula gives NaN;
  - other batch entries and key/value heads (with their query heads) are untouched: outputs and
    gradients bit for bit what they are without the bad values. Within the (batch, key/value
    head) slice, a bad query row changes its own output row only; a bad key or value row may
    also turn rows that do not attend to it NaN (the products run over whole tiles, where a
    masked weight 0 times NaN or inf is NaN, as in PyTorch's kernels), and dq, dk, dv may be
    non-finite anywhere in the slice. A row whose every score is -inf (each key it sees holds an
    infinity) is left unspecified (NaN, or zeros in sdpa on CPU).

Finite float16 inputs stay finite where the formula in float64 is: the fused backends accumulate
the scores in float32, and naive multiplies q by the scale before the product, so |q| near 1e4 at
D = 64 does not overflow (naive runs the lecture's math in the input dtype: a scaled score beyond
float16's 65504 would).

Bad input is refused here, once, with an error naming the argument, the value and the limit, so
that backends can assume well-formed tensors.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from fastgpt.attention.registry import Backend, auto_order, call_kind, get_backend

log = logging.getLogger("fastgpt.attention")

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_announced: set[tuple] = set()


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


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
        names = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise ValueError(f"q has dtype {q.dtype}; causal_attention supports {names}")
    B, H, T, D = q.shape
    if min(B, H, T, D) < 1:
        raise ValueError(f"q has shape {_shape(q)}: B, H, T and D must all be at least 1")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1); got {dropout_p!r}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite number or None (meaning D**-0.5); got {scale!r}")


def select_backend(q: torch.Tensor, dropout_p: float = 0.0, backend: str = "auto",
                   T_k: Optional[int] = None, kv_heads: Optional[int] = None) -> Backend:
    """The backend that `causal_attention` runs for this call; never a silent substitute.

    A named backend that cannot run raises (RuntimeError when it is unavailable in this process,
    ValueError when it does not support the call). "auto" takes the first backend of the
    device's preference list for the kind of call (registry.call_kind: with dropout, over a KV
    cache when T_k, the keys' length, exceeds q's T_q, or plain) that can run it, and logs its
    choice once per kind of call. T_k=None means T_k = T_q; kv_heads=None means H_kv = H.
    """
    if backend != "auto":
        chosen = get_backend(backend)
        reason = chosen.unavailable_reason(q.device)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} is not available on device {q.device}: {reason}")
        reason = chosen.call_refusal(q, dropout_p, kv_heads)
        if reason is not None:
            raise ValueError(f"backend={backend!r} does not support this call: {reason}")
        return chosen

    refusals = []
    kind = call_kind(q.shape[2], q.shape[2] if T_k is None else T_k, dropout_p)
    for name in auto_order(q.device, kind):
        candidate = get_backend(name)
        reason = candidate.refusal(q, dropout_p, kv_heads)
        if reason is None:
            key = (q.device.type, q.dtype, kind, name)
            if key not in _announced:
                _announced.add(key)
                log.info("backend='auto' picked %r for %s %s attention (%s call), dropout %s",
                         name, q.device.type, str(q.dtype).removeprefix("torch."), kind, dropout_p)
            return candidate
        refusals.append(f"{name}: {reason}")
    raise RuntimeError(f"no attention backend can run this call on {q.device}: " + "; ".join(refusals))


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Causal scaled-dot-product attention, softmax(scale·q·kᵀ + causal mask) · v.

    Args:
        q: (B, H, T_q, D); k, v: (B, H, T_k, D) with T_k >= T_q (the causal diagonal aligned
            bottom-right, see above); one dtype (float16, bfloat16, float32, float64), one
            device, any strides.
        dropout_p: probability of zeroing an attention weight after the softmax, in [0, 1). Pass
            0.0 in evaluation; kept weights are scaled by 1/(1 - dropout_p).
        scale: multiplies q·kᵀ before the softmax; None means D**-0.5.
        backend: a registered backend name ("naive", "sdpa", ...) or "auto".

    Returns:
        (B, H, T_q, D) tensor, same dtype and device as q. NaN and infinities in q, k or v
        propagate row by row as the module docstring says ("Non-finite inputs"), in every backend.
    """
    validate_inputs(q, k, v, dropout_p, scale)
    chosen = select_backend(q, dropout_p, backend, T_k=k.shape[2], kv_heads=k.shape[1])
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return chosen.fn(q, k, v, float(dropout_p), float(scale))
