"""`ext`: attention from the compiled ops of csrc/, un-fused but with the causal work skipped.

    S   = tril(q · kᵀ)                          causal_matmul_nt    (B, H, T, T), lower tiles only
    P   = dropout(softmax(scale · S, causal))   causal_softmax      one pass per row, mask from Philox
    out = P · v                                 causal_matmul_nn    (B, H, T, D), zero tiles skipped

The backward is the same ops (see fastgpt/ext/ops.py): dP = tril(dO·vᵀ), dv = Pᵀ·dO, the fused
softmax backward, dq = dS·k, dk = dSᵀ·q. The T×T matrices are materialised, once each, at about
half the work of the naive math; the dropout mask is regenerated, never stored.

CPU kernels only for now: the CUDA kernels of the same ops are issue 7's.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgpt.attention.registry import Backend, register_backend


def ext_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    *,
    seed: Optional[int] = None,
    offset: int = 0,
) -> torch.Tensor:
    """Causal attention through the ext ops.  q, k, v: (B, H, T, D) -> (B, H, T, D).

    With dropout, `seed` and `offset` pick the mask (fastgpt.ext.dropout_keep_mask gives it for the
    (B, H, T, T) scores); seed=None draws a seed from torch's default CPU generator, so
    torch.manual_seed makes runs repeatable.
    """
    from fastgpt.ext import ops

    if scale is None:
        scale = q.shape[-1] ** -0.5
    s = ops.causal_matmul_nt(q, k)  # (B, H, T, T)
    if seed is None and dropout_p > 0.0:  # only a dropout call consumes randomness, as nn.Dropout does
        # The seed stays a tensor up to an opaque op: torch.compile sees no data-dependent int
        from fastgpt.ext import seeded

        p = seeded.causal_softmax_seeded(s, scale, dropout_p, seeded.draw_seed(), offset)  # (B, H, T, T)
    else:
        p = ops.causal_softmax(s, scale, dropout_p, seed or 0, offset)  # (B, H, T, T)
    return ops.causal_matmul_nn(p, v)  # (B, H, T, D)


def _ext_backend(q, k, v, dropout_p: float, scale: float) -> torch.Tensor:
    return ext_attention(q, k, v, dropout_p, scale)


def _unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        return ("the ext backend's CUDA kernels are issue 7's and are not built yet; on CUDA use "
                "backend='sdpa' (or 'auto')")
    if device.type != "cpu":
        return f"the ext backend has CPU kernels only; got device type {device.type!r}"
    from fastgpt.ext.build import unavailable_reason

    return unavailable_reason()


def _unsupported_reason(q: torch.Tensor, dropout_p: float) -> Optional[str]:
    if q.dtype not in (torch.float32, torch.bfloat16):
        return f"the ext kernels take float32 and bfloat16 (fp32 accumulation); got {q.dtype}"
    return None


def _empty_cache() -> None:
    from fastgpt.ext import build

    if build.is_loaded():  # nothing is cached before the first call; never compile just to empty
        from fastgpt.ext import ops

        ops.empty_cache()


register_backend(Backend(
    name="ext",
    fn=_ext_backend,
    description="C++ ops (csrc/): causal matmuls that skip the tiles above the diagonal and a fused "
                "scale+mask+softmax+dropout; the T×T weights are materialised",
    unavailable_reason=_unavailable_reason,
    unsupported_reason=_unsupported_reason,
    empty_cache=_empty_cache,
))
