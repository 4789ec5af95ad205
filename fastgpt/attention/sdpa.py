"""`sdpa`: PyTorch's fused `scaled_dot_product_attention`, the peer to beat.

PyTorch picks its own kernel inside: FlashAttention-2 or memory-efficient attention on CUDA, a
flash-style kernel on CPU without dropout, and the unfused math path on CPU with dropout.

With fewer queries than keys (T_q < T_k, a KV cache) `is_causal=True` would be wrong: PyTorch
aligns that mask top-left, so the newest query would see only key 0. The lower-right causal bias
(`torch.nn.attention.bias.causal_lower_right`) is the bottom-right mask of the API; it supports
backward and dropout on CPU and CUDA (its math fallback materialises the mask, its flash and
memory-efficient paths take it as an offset).

The options it can express exactly it takes: a bidirectional call (no mask), a window (a boolean
(T_q, T_k) mask of the visible keys) and ALiBi (an additive (B, H, T_q, T_k) mask in q's dtype, -inf
where hidden). Soft-capping, sinks and the log-sum-exp have no place in SDPA's signature: refused
by name. A row that sees no key comes out 0 from PyTorch's CPU kernels, as the API promises.
Packed sequences (varlen.py) run as one call over every token with a block-diagonal mask
(total_q × total_k): one call, but a mask and work quadratic in the total length, not in each
sequence's (PyTorch's own varlen attention runs on CUDA only; it is not used here). A paged KV
cache (paged.py) is gathered into that packed layout first: one copy of the keys the step reads.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastgpt.attention.call import AttentionCall
from fastgpt.attention.naive import alibi_bias, hidden_keys, varlen_hidden_keys, varlen_positions
from fastgpt.attention.registry import Backend, KernelPath, register_backend

TAKES = frozenset({"bidirectional", "window", "alibi", "varlen", "paged"})
REFUSES = {
    "softcap": "PyTorch's SDPA has no soft-capping (a mask cannot express a function of the score)",
    "sinks": "PyTorch's SDPA has no attention sinks (a sink joins the denominator without a key)",
    "return_lse": "F.scaled_dot_product_attention does not return the log-sum-exp",
}


def _sdpa_backend(q, k, v, dropout_p: float, scale: float) -> torch.Tensor:
    T_q, T_k = q.shape[-2], k.shape[-2]
    if scale <= 0:
        # is_causal with a scale <= 0 gives NaN rows on CPU (the masked -inf times the scale: -inf·0,
        # -inf·-0.5); q scaled first gives the same weights, and the mask meets a positive scale
        q, scale = q * scale, 1.0
    # grouped-query: PyTorch reads the shared key/value head itself (query head h -> h // G)
    kwargs = dict(dropout_p=dropout_p, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    if T_q == T_k:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
        return _nan_query_rows_restored(out, q, dropout_p)
    if T_q == 1:
        # decoding: the one query is the newest token and sees every key, so there is nothing to
        # mask; a bias would only add its construction and a slower masked kernel to every token
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
        return _nan_query_rows_restored(out, q, dropout_p)
    # imported here: torch.nn.attention.bias imports triton, which `import fastgpt` must not
    from torch.nn.attention.bias import causal_lower_right

    mask = causal_lower_right(T_q, T_k)  # query i sees keys <= T_k - T_q + i
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **kwargs)


def _sdpa_varlen(q, k, v, call: AttentionCall) -> torch.Tensor:
    """Packed sequences as one SDPA call over all the tokens with a block-diagonal mask
    (total_q, total_k): what PyTorch's CPU kernels can run (its varlen attention is CUDA-only), at
    the cost of a mask quadratic in the total length. q (total_q, H, D) -> (total_q, H, D)."""
    layout = call.varlen
    positions = varlen_positions(layout, q.device)  # each packed query's and key's sequence and place in it
    hidden = varlen_hidden_keys(layout, call.causal, call.window, positions=positions)  # (total_q, total_k)
    mask = ~hidden
    if call.alibi_slopes is not None:
        seq_q, pos, seq_k, j = positions
        exact = torch.float64 if q.dtype == torch.float64 else torch.float32
        slopes = call.alibi_slopes.to(q.device, exact)[seq_q].T  # (H, total_q): each query's sequence's slopes
        bias = -slopes[:, :, None] * (pos[:, None] - j[None, :]).abs().to(exact)  # (H, total_q, total_k)
        mask = bias.masked_fill(hidden, float("-inf")).to(q.dtype)[None]
    as_batch = [t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # (1, heads, total, D) views
    out = F.scaled_dot_product_attention(*as_batch, attn_mask=mask, dropout_p=call.dropout_p, scale=call.scale,
                                         enable_gqa=call.grouped)
    out = _nan_query_rows_restored(out, as_batch[0], call.dropout_p)
    return out[0].transpose(0, 1)


def _sdpa_path(q, k, v, call: AttentionCall) -> torch.Tensor:
    if call.paged is not None:  # k, v are the pools: the sequences' keys gathered into the packed layout
        k, v = call.paged.gather(k, v)
    if call.varlen is not None:
        return _sdpa_varlen(q, k, v, call)
    if not call.options:
        return _sdpa_backend(q, k, v, call.dropout_p, call.scale)
    T_q, T_k = call.q_len, call.kv_len
    visible = ~hidden_keys(T_q, T_k, call.causal, call.window, q.device)  # (T_q, T_k) bool
    mask = None if bool(visible.all()) else visible
    if call.alibi_slopes is not None:
        exact = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias = alibi_bias(call.alibi_slopes.to(q.device, exact), T_q, T_k)  # (B, H, T_q, T_k)
        mask = bias.masked_fill(~visible, float("-inf")).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=call.dropout_p, scale=call.scale,
                                         enable_gqa=call.grouped)
    return _nan_query_rows_restored(out, q, call.dropout_p)


def _nan_query_rows_restored(out: torch.Tensor, q: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """`out` with NaN in every row whose query holds a NaN or an infinity, as api.py promises.

    PyTorch's CPU flash kernel (no mask, no dropout; float32, bfloat16, float16) returns zeros for
    such a row: its row maximum skips NaN scores, and a row whose maximum is -inf counts as fully
    masked. q·0 summed over D is 0 for a finite row and NaN otherwise (never an overflow), and
    x - 0 is x bit for bit. It costs a pass over q and one over the output (nothing in the
    backward), only where that kernel runs.
    """
    if out.device.type != "cpu" or dropout_p > 0.0 or out.dtype == torch.float64:
        # CPU dropout and float64 take PyTorch's math path, which propagates NaN itself; on CUDA
        # other kernels run (tests/test_nonfinite.py runs there too on a GPU)
        return out
    nan_rows = (q.detach() * 0).sum(-1, keepdim=True)  # (B, H, T_q, 1): 0, or NaN where q's row is not finite
    return out - nan_rows


def inner_kernel(run: Callable[[], object]) -> str:
    """Which of PyTorch's SDPA kernels a CUDA call ran ("flash", "efficient", "cudnn" or "math"),
    from the profiler's kernel names while `run` makes the call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = " ".join(e.key.lower() for e in prof.key_averages())
    for kind, marks in (("cudnn", ("cudnn",)), ("flash", ("flash",)), ("efficient", ("fmha", "efficient", "cutlass"))):
        if any(m in names for m in marks):
            return kind
    return "math"


DESCRIPTION = ("torch.nn.functional.scaled_dot_product_attention (is_causal, or the lower-right causal bias "
               "when T_q < T_k); PyTorch picks its kernel inside")

register_backend(Backend(
    name="sdpa",
    description=DESCRIPTION,
    paths=(KernelPath("sdpa", _sdpa_path, DESCRIPTION, inner_kernel=inner_kernel, options=TAKES,
                      option_notes=REFUSES),),
    grouped_query=True,
))
