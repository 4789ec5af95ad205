"""`ext`: attention from the compiled ops of csrc/, un-fused but with the causal work skipped.

    S   = tril_o(q · kᵀ)                        causal_matmul_nt    packed (B, H, N), lower tiles only
    P   = dropout(softmax(scale · S, causal))   causal_softmax      one pass per row, mask from Philox
    out = P · v                                 causal_matmul_nn    (B, H, T_q, D), zero tiles skipped

q has T_q <= T_k rows, k and v T_k (a KV-cache decode step: T_q = 1); query i sees keys
j <= T_k - T_q + i. Grouped-query attention: k and v have H_kv heads dividing q's H, and the
matmuls read head h // (H / H_kv) for query head h in place (no copy of k or v per query head);
P and its dropout mask stay per query head. The backward is the same ops (see fastgpt/ext/ops.py):
dP = tril_o(dO·vᵀ), dv = Pᵀ·dO, the fused softmax backward, dq = dS·k, dk = dSᵀ·q, where dk and dv
sum each group of query heads in a fixed order (no atomics). Eagerly the call is one autograd node
over those op calls (fastgpt/ext/attention_function.py: about 4% off a `cpu`-preset training step);
under torch.compile each op is its own node, with its own formula. The T_q × T_k matrices are
materialised, once each, in the packed layout (fastgpt/ext/layout.py: the causal part only, ~52% of
T² at T = 2048), at about half the work of the naive math; the dropout mask is regenerated, never stored.

CPU kernels, and CUDA kernels of the same ops (csrc/cuda/) where torch is a CUDA build and nvcc
compiled them. Importing this module loads nothing: the ops module (fastgpt/ext/ops.py, which loads
the library) is imported on the first call, by `prepare` before torch.compile traces one, or when
backend="auto" considers ext (`load_refusal`): a build that fails there is a reason to move on.
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
    """Causal attention through the ext ops.  q (B, H, T_q, D), k, v (B, H_kv, T_k, D) -> (B, H, T_q, D),
    T_q <= T_k, the diagonal aligned bottom-right (the last query sees every key); H_kv divides H and
    query head h reads key/value head h // (H / H_kv).

    With dropout, `seed` and `offset` pick the mask (fastgpt.ext.dropout_keep_mask gives it, dense
    (B, H, T_q, T_k)); seed=None draws a seed from torch's default CPU generator, so
    torch.manual_seed makes runs repeatable.
    """
    from fastgpt.ext import ops  # the first call loads the library (prepare does it before a trace)

    if scale is None:
        scale = q.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        return _attention_per_op(q, k, v, dropout_p, scale, seed, offset)
    # Eagerly: one autograd node over the same op calls (fastgpt/ext/attention_function.py), or
    # on CPU in float32 (and bfloat16 on AMX) the flash op with its C++ node (csrc/cpu/attention_flash.cpp)
    from fastgpt.ext.attention_function import ExtAttention

    if seed is None:  # only a dropout call consumes randomness, as nn.Dropout does
        seed = int(ops.draw_seed()) if dropout_p > 0.0 else 0  # the draw _attention_per_op makes
    if q.device.type == "cpu" and ops.cpu_attention_kernels(q.dtype, k.shape[0] * k.shape[1], q.shape[-1]) == "flash":
        # the flash kernels, no T×T matrix stored; the node is C++
        return ops.causal_attention_flash(q, k, v, float(scale), float(dropout_p), seed, offset)
    return ExtAttention.apply(q, k, v, float(scale), float(dropout_p), seed, offset)


def _attention_per_op(q, k, v, dropout_p: float, scale: float, seed: Optional[int], offset: int) -> torch.Tensor:
    """The ops one by one, each its own autograd node (fastgpt/ext/ops.py): what torch.compile
    traces, as single graph nodes."""
    from fastgpt.ext import ops

    T_q, T_k = q.shape[2], k.shape[2]
    s = ops.causal_matmul_nt(q, k)  # packed (B, H, N): one causal matrix per query head
    if seed is None and dropout_p > 0.0:
        # The seed stays a tensor up to an opaque op: torch.compile sees no data-dependent int
        p = ops.causal_softmax_seeded(s, T_q, T_k, scale, dropout_p, ops.draw_seed(), offset)  # packed
    else:
        p = ops.causal_softmax(s, T_q, T_k, scale, dropout_p, seed or 0, offset)  # packed (B, H, N)
    return ops.causal_matmul_nn(p, v, T_q)  # (B, H, T_q, D)


def _ext_backend(q, k, v, dropout_p: float, scale: float) -> torch.Tensor:
    return ext_attention(q, k, v, dropout_p, scale)


def _unavailable_reason(device: torch.device) -> Optional[str]:
    from fastgpt.ext.build import cuda_unavailable_reason, unavailable_reason

    if device.type == "cuda":
        reason = cuda_unavailable_reason()
        return None if reason is None else f"{reason}; on CUDA use backend='sdpa' (or 'auto') meanwhile"
    if device.type != "cpu":
        return f"the ext backend has CPU and CUDA kernels only; got device type {device.type!r}"
    return unavailable_reason()


def _unsupported_reason(q: torch.Tensor, dropout_p: float) -> Optional[str]:
    from fastgpt.ext.checks import dtypes_text, supported_dtypes

    if q.dtype not in supported_dtypes(q.device):
        return f"the ext kernels take {dtypes_text(q.device)} (fp32 accumulation); got {q.dtype}"
    return None


def _empty_cache() -> None:
    from fastgpt.ext import build

    if build.is_loaded():  # nothing is cached before the first call; never compile just to empty
        from fastgpt.ext import ops

        ops.empty_cache()


def _prepare(device: torch.device) -> None:
    from fastgpt.ext import load

    load()  # builds or loads the library and registers the ops: Python that dynamo should not trace


def _load_refusal(device: torch.device) -> Optional[str]:
    """Why loading the library failed (a compiler error, another process's build past the time
    limit), or None: backend="auto" then moves on. The failure is kept: later calls are refused
    at once by _unavailable_reason."""
    from fastgpt.ext import ExtensionUnavailable, build

    if build.is_loaded():
        return None
    try:
        build.load()  # the library, built on first use: what can fail
        _prepare(device)  # the ops' autograd and fakes, as the first call registers them
    except ExtensionUnavailable as e:
        return str(e)
    return _unavailable_reason(device)  # loaded: on CUDA the ops may still lack CUDA kernels


register_backend(Backend(
    name="ext",
    fn=_ext_backend,
    description="C++ ops (csrc/): causal matmuls that skip the tiles above the diagonal and a fused "
                "scale+mask+softmax+dropout; the T×T weights are materialised",
    unavailable_reason=_unavailable_reason,
    unsupported_reason=_unsupported_reason,
    empty_cache=_empty_cache,
    grouped_query=True,
    prepare=_prepare,
    load_refusal=_load_refusal,
))
