"""`naive`: the lecture's explicit attention math, and the reference every backend is checked against.

Memory traffic per (b, h) slice with T_q = T_k = T, T×T weights materialised three times in the
forward (T_q×T_k with fewer queries than keys):
    att = (q · scale) @ kᵀ      # read 2·T·D, write T·T
    mask the future with -inf  # read T·T, write T·T
    softmax                    # read T·T, write T·T
    dropout                    # read T·T, write T·T (plus the mask)
    out = att @ v              # read T·T + T·D, write T·D
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.attention.registry import Backend, register_backend


def future_mask(T_q: int, T_k: Optional[int] = None, device=None) -> torch.Tensor:
    """(T_q, T_k) bool, True where query i may not look: keys j > (T_k - T_q) + i, above diagonal
    number 1 + T_k - T_q (the diagonal aligned bottom-right; T_k defaults to T_q)."""
    T_k = T_q if T_k is None else T_k
    return torch.ones(T_q, T_k, dtype=torch.bool, device=device).triu(1 + T_k - T_q)


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    keep_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """softmax(scale·q·kᵀ, causal) with dropout on the weights, · v.

    q (B, H, T_q, D), k and v (B, H_kv, T_k, D), T_q <= T_k, H_kv dividing H -> (B, H, T_q, D). The
    causal diagonal is aligned bottom-right: query i sees keys j <= (T_k - T_q) + i (the last T_q
    rows of the square T_k × T_k mask). Query head h reads key/value head h // (H / H_kv): the
    query heads are viewed as (B, H_kv, G, ...) against one key/value head each (broadcast, no copy).

    `keep_mask` (B, H, T_q, T_k) of bools replaces the random dropout draw: weights where it is False
    are zeroed and the rest scaled by 1/(1 - dropout_p). Parity tests pass the mask a fused kernel
    used, to build the exact reference for that kernel's dropout.
    """
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    if scale is None:
        scale = D**-0.5
    q = q.view(B, H_kv, H // H_kv, T_q, D)  # (B, H_kv, G, T_q, D): the query heads of each group
    k, v = k.unsqueeze(2), v.unsqueeze(2)  # (B, H_kv, 1, T_k, D)
    # q scaled before the product, not the T_q×T_k scores after it: fewer multiplies, and in
    # float16 a product that the scale would bring back into range (|q| near 1e4 at D = 64) does
    # not overflow to inf first
    att = (q * scale) @ k.transpose(-2, -1)  # (B, H_kv, G, T_q, T_k)
    att = att.masked_fill(future_mask(T_q, T_k, q.device), float("-inf"))
    att = F.softmax(att, dim=-1)
    if keep_mask is not None:
        att = att * keep_mask.reshape(att.shape).to(att.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p, training=True)
    return (att @ v).view(B, H, T_q, D)


def _naive_backend(q, k, v, dropout_p: float, scale: float) -> torch.Tensor:
    return naive_attention(q, k, v, dropout_p, scale)


register_backend(Backend(
    name="naive",
    fn=_naive_backend,
    description="the lecture's explicit math (materialises the T×T weights); the reference",
    grouped_query=True,
))
