"""`naive`: the lecture's explicit attention math, and the reference every backend is checked against.

Memory traffic per (b, h) slice with T_q = T_k = T, T×T weights materialised three times in the
forward (T_q×T_k with fewer queries than keys):
    att = (q · scale) @ kᵀ      # read 2·T·D, write T·T
    mask the future with -inf  # read T·T, write T·T
    softmax                    # read T·T, write T·T
    dropout                    # read T·T, write T·T (plus the mask)
    out = att @ v              # read T·T + T·D, write T·D

Packed sequences (varlen) run one sequence at a time; a paged KV cache is first gathered into the
packed layout (PagedLayout.gather), so the reference never reads a page in place.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.attention.call import OPTIONS, UNBOUNDED, AttentionCall, call_options, validate_options
from fastgpt.attention.registry import Backend, KernelPath, register_backend
from fastgpt.attention.varlen import VarlenLayout, varlen_layout


def hidden_keys(T_q: int, T_k: int, causal: bool = True, window=(UNBOUNDED, 0), device=None) -> torch.Tensor:
    """(T_q, T_k) bool, True where query i may not look. Query i sits at key position
    pos = T_k - T_q + i and sees key j iff pos - left <= j <= pos + right (window (left, right),
    UNBOUNDED = no limit on that side) and, if causal, j <= pos."""
    left, right = window
    if causal:
        right = 0 if right == UNBOUNDED else min(right, 0)
    pos = torch.arange(T_k - T_q, T_k, device=device)[:, None]  # (T_q, 1)
    j = torch.arange(T_k, device=device)[None, :]  # (1, T_k)
    hidden = torch.zeros(T_q, T_k, dtype=torch.bool, device=device)
    if left != UNBOUNDED:
        hidden |= j < pos - left
    if right != UNBOUNDED:
        hidden |= j > pos + right
    return hidden


def varlen_positions(layout: VarlenLayout, device=None) -> tuple[torch.Tensor, ...]:
    """(seq_q, pos (total_q,), seq_k, j (total_k,)): each packed query's sequence and key position
    within it (T_k[b] - T_q[b] + i), each packed key's sequence and index within it."""
    q_lens, k_lens = (torch.tensor(lens, device=device) for lens in (layout.q_lens, layout.k_lens))
    seq_q = torch.repeat_interleave(torch.arange(layout.batch, device=device), q_lens)
    seq_k = torch.repeat_interleave(torch.arange(layout.batch, device=device), k_lens)
    i = torch.arange(layout.total_q, device=device) - (q_lens.cumsum(0) - q_lens)[seq_q]
    j = torch.arange(layout.total_k, device=device) - (k_lens.cumsum(0) - k_lens)[seq_k]
    return seq_q, i + (k_lens - q_lens)[seq_q], seq_k, j


def varlen_hidden_keys(layout: VarlenLayout, causal: bool = True, window=(UNBOUNDED, 0), device=None,
                       positions: Optional[tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
    """(total_q, total_k) bool, True where a packed query may not look: every key of another
    sequence, and within its own what hidden_keys hides (block-diagonal). `positions`:
    varlen_positions(layout), where the caller has them already."""
    seq_q, pos, seq_k, j = positions if positions is not None else varlen_positions(layout, device)
    left, right = window
    if causal:
        right = 0 if right == UNBOUNDED else min(right, 0)
    hidden = seq_q[:, None] != seq_k[None, :]
    if left != UNBOUNDED:
        hidden |= j[None, :] < pos[:, None] - left
    if right != UNBOUNDED:
        hidden |= j[None, :] > pos[:, None] + right
    return hidden


def future_mask(T_q: int, T_k: Optional[int] = None, device=None) -> torch.Tensor:
    """(T_q, T_k) bool, True where a causal query i may not look: keys j > (T_k - T_q) + i (the
    diagonal aligned bottom-right; T_k defaults to T_q). hidden_keys of the plain causal call."""
    return hidden_keys(T_q, T_q if T_k is None else T_k, device=device)


def alibi_bias(slopes: torch.Tensor, T_q: int, T_k: int) -> torch.Tensor:
    """(B, H, T_q, T_k): -slope·|pos - j| for slopes (B, H), pos = T_k - T_q + i."""
    pos = torch.arange(T_k - T_q, T_k, device=slopes.device)[:, None]
    distance = (pos - torch.arange(T_k, device=slopes.device)[None, :]).abs()  # (T_q, T_k)
    return -slopes[:, :, None, None] * distance


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    keep_mask: Optional[torch.Tensor] = None,
    **options,
) -> torch.Tensor:
    """softmax(scale·q·kᵀ, causal) with dropout on the weights, · v; with `options` (causal,
    window, softcap, sinks, alibi_slopes, return_lse), the general attention of api.py.

    q (B, H, T_q, D), k and v (B, H_kv, T_k, D), H_kv dividing H -> (B, H, T_q, D), and with
    return_lse=True also the rows' log-sum-exp (B, H, T_q) float32, detached. Query i sits at key
    position T_k - T_q + i (the causal diagonal aligned bottom-right: the last T_q rows of the
    square T_k × T_k mask). Query head h reads key/value head h // (H / H_kv): the query heads are
    viewed as (B, H_kv, G, ...) against one key/value head each (broadcast, no copy).

    `keep_mask` (B, H, T_q, T_k) of bools replaces the random dropout draw: weights where it is False
    are zeroed and the rest scaled by 1/(1 - dropout_p). Parity tests pass the mask a fused kernel
    used, to build the exact reference for that kernel's dropout.
    """
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    if scale is None:
        scale = D**-0.5
    if not options:  # the lecture's call, exactly as it always ran
        return _weights_times_v(_causal_weights(q, k, scale), v, dropout_p, keep_mask, (B, H, T_q, D))
    opts = validate_options(q, **options)
    hidden = hidden_keys(T_q, T_k, opts["causal"], opts["window"], q.device)  # (T_q, T_k)
    logits = _scores(q, k, scale, opts).masked_fill(hidden, float("-inf"))  # (B, H_kv, G, T_q, T_k)
    if opts["sinks"] is not None:
        # the sink joins each row's softmax as one more logit, and its weight is dropped: it takes no value
        sink = opts["sinks"].to(logits.dtype).view(1, H_kv, H // H_kv, 1, 1).expand(*logits.shape[:-1], 1)
        logits = torch.cat([logits, sink], dim=-1)
        weights = F.softmax(logits, dim=-1)[..., :-1]
    else:
        # a row that sees no key (a window beside the keys) has weights 0, not softmax's NaN
        weights = F.softmax(logits, dim=-1).masked_fill(hidden.all(-1, keepdim=True), 0.0)
    out = _weights_times_v(weights, v, dropout_p, keep_mask, (B, H, T_q, D))
    if not opts["return_lse"]:
        return out
    return out, torch.logsumexp(logits.detach(), dim=-1).float().reshape(B, H, T_q)


def _causal_weights(q, k, scale: float) -> torch.Tensor:
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    q = q.view(B, H_kv, H // H_kv, T_q, D)  # (B, H_kv, G, T_q, D): the query heads of each group
    # q scaled before the product, not the T_q×T_k scores after it: fewer multiplies, and in
    # float16 a product that the scale would bring back into range (|q| near 1e4 at D = 64) does
    # not overflow to inf first
    att = (q * scale) @ k.unsqueeze(2).transpose(-2, -1)  # (B, H_kv, G, T_q, T_k)
    att = att.masked_fill(future_mask(T_q, T_k, q.device), float("-inf"))
    return F.softmax(att, dim=-1)


def _scores(q, k, scale: float, opts: dict) -> torch.Tensor:
    """(B, H_kv, G, T_q, T_k): scale·q·kᵀ, soft-capped, plus ALiBi (no mask yet)."""
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    att = (q.view(B, H_kv, H // H_kv, T_q, D) * scale) @ k.unsqueeze(2).transpose(-2, -1)
    if opts["softcap"] > 0:
        att = opts["softcap"] * torch.tanh(att / opts["softcap"])
    if opts["alibi_slopes"] is not None:
        att = att + alibi_bias(opts["alibi_slopes"].to(att.dtype), T_q, T_k).view(B, H_kv, H // H_kv, T_q, T_k)
    return att


def _weights_times_v(att, v, dropout_p: float, keep_mask, out_shape) -> torch.Tensor:
    """(B, H_kv, G, T_q, T_k) weights, dropped out, times v (B, H_kv, T_k, D) -> out_shape."""
    if keep_mask is not None:
        att = att * keep_mask.reshape(att.shape).to(att.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        att = F.dropout(att, p=dropout_p, training=True)
    return (att @ v.unsqueeze(2)).view(out_shape)


def naive_varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, dropout_p: float = 0.0, scale: Optional[float] = None,
                           keep_mask: Optional[torch.Tensor] = None, **options):
    """The reference of varlen_attention (fastgpt/attention/varlen.py): each packed sequence through
    naive_attention on its own. q (total_q, H, D), k, v (total_k, H_kv, D) -> (total_q, H, D), and
    with return_lse also lse (H, total_q) float32. `keep_mask` (B, H, max_q, max_k) bool, sequence
    b's in keep_mask[b, :, :T_q[b], :T_k[b]], replaces the random dropout draw."""
    layout = varlen_layout(q, k, cu_seqlens_q, cu_seqlens_k, causal=options.get("causal", True))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _naive_varlen(q, k, v, layout, dropout_p, scale, keep_mask, options)


def _naive_varlen(q, k, v, layout: VarlenLayout, dropout_p: float, scale: float, keep_mask, options: dict):
    """One naive_attention per sequence, (1, H, T, D) views of its rows; the pieces concatenated."""
    opts = validate_options(q, batch=layout.batch, **options)
    opts["window"] = tuple(opts["window"])
    slopes = opts.pop("alibi_slopes")
    outs, lses = [], []
    for b, (q0, k0, T_q, T_k) in enumerate(zip(layout.q_starts(), layout.k_starts(), layout.q_lens, layout.k_lens)):
        if T_q == 0:
            continue
        q_b = q[q0:q0 + T_q].transpose(0, 1).unsqueeze(0)  # (1, H, T_q, D)
        k_b, v_b = (t[k0:k0 + T_k].transpose(0, 1).unsqueeze(0) for t in (k, v))  # (1, H_kv, T_k, D)
        keep = None if keep_mask is None else keep_mask[b:b + 1, :, :T_q, :T_k]
        out, lse = naive_attention(q_b, k_b, v_b, dropout_p, scale, keep, **{**opts, "return_lse": True},
                                   alibi_slopes=None if slopes is None else slopes[b:b + 1])
        outs.append(out[0].transpose(0, 1))  # (T_q, H, D)
        lses.append(lse[0])  # (H, T_q)
    out = torch.cat(outs)
    return (out, torch.cat(lses, dim=1)) if opts["return_lse"] else out


def _naive_path(q, k, v, call: AttentionCall):
    if call.paged is not None:  # k, v are the pools: the sequences' keys gathered into the packed layout
        k, v = call.paged.gather(k, v)
    if call.varlen is not None:
        return _naive_varlen(q, k, v, call.varlen, call.dropout_p, call.scale, None, call_options(call))
    if not call.options:
        return naive_attention(q, k, v, call.dropout_p, call.scale)
    return naive_attention(q, k, v, call.dropout_p, call.scale, **call_options(call))


DESCRIPTION = "the lecture's explicit math (materialises the T×T weights); the reference"

register_backend(Backend(
    name="naive",
    paths=(KernelPath("naive", _naive_path, DESCRIPTION, options=frozenset(OPTIONS)),),
    description=DESCRIPTION,
    grouped_query=True,
))
