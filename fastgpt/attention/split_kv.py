"""Split-KV decoding (flash-decoding): a decode step's keys cut into chunks that run in parallel,
merged by their log-sum-exp.

A decode step has one query per sequence. A kernel that gives each (sequence, head) one worker
reads a long cache with B·H_kv workers only: on a GPU with a hundred SMs, or a CPU with more
cores than heads, most sit idle while one streams 32k keys. Cut each sequence's visible keys into
chunks of `chunk_keys`, and each chunk is a worker:

    keys      |---- chunk 0 ----|---- chunk 1 ----|---- chunk 2 --|
    partial   (out_0, lse_0)    (out_1, lse_1)    (out_2, lse_2)      one launch, in parallel
    merged    m = max_c lse_c,  w_c = exp(lse_c - m)
              out = Σ_c w_c·out_c / Σ_c w_c,   lse = m + log Σ_c w_c     (+ exp(sink - m), once)

The chunks run as ONE varlen call of the inner kernel path (each chunk a packed sequence whose
query is its sequence's query; the keys are views, never copied), with return_lse; the merge is a
few tensor ops over (chunks, H, D). Exact in real arithmetic; in floating point within the
tolerance of a different summation order.

What a chunk needs to be one plain call: the query sees every key of its chunk. A decode query is
the newest token, so causal hides nothing; a window (left, 0) is the range of keys the chunks
cover (the rest are never read); ALiBi's distance to a chunk's keys differs from the chunk's own
bottom-right distance by the keys after the chunk, a constant per chunk that shifts its scores
and so only its lse (corrected before the merge); sinks join the merged denominator once.
Soft-capping acts on each score and passes through. Refused: dropout (a decode step has none),
more than one query per sequence, a bidirectional call, and a call that needs gradients (the lse
the merge weights by is detached: split-KV serves inference).

Calls in the (B, H, T, D) layout are split when B = 1 (the cache's (T_k, H_kv, D) view of one
sequence needs no copy); a batch of sequences comes as a varlen call (the paged cache's decode).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastgpt.attention.call import UNBOUNDED, AttentionCall
from fastgpt.attention.varlen import varlen_attention

# Each chunk holds CHUNK_KEYS keys (the last fewer). backend="ext" splits a CPU decode step when a
# sequence has at least CPU_SPLIT_MIN_KEYS visible keys and several query heads share each key/value
# head, or CPU_SPLIT_MIN_KEYS_UNGROUPED without sharing: where the decode benchmark measured the
# split faster (docs/benchmarks.md, "Split-KV decoding"). On a GPU the split is for parallelism;
# GPU_SPLIT_MIN_KEYS is flash-decoding's regime, not yet measured here.
CHUNK_KEYS = 1024
CPU_SPLIT_MIN_KEYS = 65536
CPU_SPLIT_MIN_KEYS_UNGROUPED = 262144
GPU_SPLIT_MIN_KEYS = 4096
# What a split-KV kernel path takes (a decode step is the newest token over its cache: causal)
SPLIT_KV_OPTIONS = frozenset({"window", "softcap", "sinks", "alibi", "return_lse", "varlen"})
SPLIT_KV_NOTES = {"bidirectional": "split-KV serves causal decode steps (the newest token over its cache)",
                  "paged": "split-KV chunks keys that lie back to back; the backend's flash path reads paged caches "
                           "in place"}


def split_refusal(call: AttentionCall) -> Optional[str]:
    """Why split-KV cannot run this call (named), or None."""
    if call.dropout_p > 0:
        return "split-KV decoding takes no dropout (a decode step runs in evaluation)"
    if call.needs_grad:
        return "split-KV decoding runs forward only (the lse it merges by is detached): inference"
    if not call.causal:
        return "split-KV decoding takes causal decode steps (the newest token over its cache); this call is bidirectional"
    q_lens = call.varlen.q_lens if call.varlen is not None else (call.q_len,)
    if max(q_lens) > 1:
        return f"split-KV decoding takes one query per sequence (a decode step); this call has up to {max(q_lens)}"
    if call.varlen is None and call.batch > 1:
        return (f"split-KV decoding takes B = 1 in the (B, H, T, D) layout (B={call.batch} would copy the cache); "
                "a batch of sequences goes as a varlen call")
    return None


def split_declines_cpu(call: AttentionCall) -> Optional[str]:
    """Why a choice by backend passes over the CPU split: the cache is too short for it. With one
    query head per key/value head the unsplit kernel reads the cache once and the split pays for
    its merge later than where several query heads each stream the whole cache."""
    longest = _visible_keys(call.kv_len, call.window)
    least = CPU_SPLIT_MIN_KEYS if call.grouped else CPU_SPLIT_MIN_KEYS_UNGROUPED
    if longest < least:
        grouping = "grouped heads" if call.grouped else "one query head per key/value head"
        return (f"{longest} visible keys: below {least} ({grouping}), the unsplit kernel is faster on CPU than a "
                "split and a merge")
    return None


def split_declines_gpu(call: AttentionCall) -> Optional[str]:
    """Why a choice by backend passes over the GPU split: every sequence's visible keys are short."""
    longest = _visible_keys(call.kv_len, call.window)
    if longest < GPU_SPLIT_MIN_KEYS:
        return f"{longest} visible keys: below {GPU_SPLIT_MIN_KEYS}, too few to spread over more programs"
    return None


def _visible_keys(T_k: int, window: tuple[int, int]) -> int:
    left = window[0]
    return T_k if left == UNBOUNDED else min(T_k, left + 1)


def split_kv_attention(q, k, v, call: AttentionCall, inner: str, chunk_keys: int = CHUNK_KEYS):
    """The call (validated; split_refusal None) through `inner`, a kernel path taking varlen and
    return_lse, its keys in chunks of chunk_keys. q, k, v as the call's layout; returns what the
    call returns (out, and the lse with return_lse)."""
    packed = call.varlen is not None
    if not packed:  # B = 1: (1, heads, T, D) -> (T, heads, D) views
        q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))
        q_lens, k_lens = (1,), (call.kv_len,)
    else:
        q_lens, k_lens = call.varlen.q_lens, call.varlen.k_lens
    out, lse = _split_and_merge(q, k, v, q_lens, k_lens, call, inner, chunk_keys)
    if not packed:
        out, lse = out.transpose(0, 1)[None], lse[None]  # (1, H, 1, D), (1, H, 1)
    return (out, lse) if call.return_lse else out


def _chunks(q_lens, k_lens, window, chunk_keys: int):
    """(query of each chunk, chunk starts, chunk ends, keys after each chunk) over the packed keys."""
    owner, starts, ends, after = [], [], [], []
    q_row, k0 = 0, 0
    for T_q, T_k in zip(q_lens, k_lens):
        if T_q == 1:
            first = T_k - _visible_keys(T_k, window)
            for s in range(first, T_k, chunk_keys):
                e = min(s + chunk_keys, T_k)
                owner.append(q_row)
                starts.append(k0 + s)
                ends.append(k0 + e)
                after.append(T_k - e)
        q_row += T_q
        k0 += T_k
    return owner, starts, ends, after


def _split_and_merge(q, k, v, q_lens, k_lens, call: AttentionCall, inner: str, chunk_keys: int):
    """q (total_q, H, D), k, v (total_k, H_kv, D) -> out (total_q, H, D), lse (H, total_q) float32."""
    owner, starts, ends, after = _chunks(q_lens, k_lens, call.window, chunk_keys)
    device = q.device
    total_q, H, D = q.shape
    if not owner:  # no sequence with a query and a key: every row sees nothing
        return merge_partials(q.new_zeros(0, H, D), torch.zeros(H, 0, device=device),
                              torch.zeros(0, dtype=torch.long, device=device), total_q, call.sinks)
    owner_t = torch.tensor(owner, device=device)
    # the chunks as packed sequences of one query over a contiguous range of k (a view); keys that
    # no chunk reads (outside a window, or of a sequence with no query) become sequences of no query
    bounds, q_counts, seq_of_part, previous = [0], [], [], starts[0]
    chunk_seq = _sequence_of(owner, q_lens).tolist()
    for s, e, seq in zip(starts, ends, chunk_seq):
        if s != previous:
            bounds.append(s - starts[0])
            q_counts.append(0)
            seq_of_part.append(seq)
        bounds.append(e - starts[0])
        q_counts.append(1)
        seq_of_part.append(seq)
        previous = e
    cu_k = torch.tensor(bounds, dtype=torch.int32, device=device)
    cu_q = torch.tensor([0, *q_counts], device=device).cumsum(0).to(torch.int32)
    slopes = None if call.alibi_slopes is None else call.alibi_slopes[torch.tensor(seq_of_part)].to(device)
    part, part_lse = varlen_attention(q[owner_t], k[starts[0]:ends[-1]], v[starts[0]:ends[-1]], cu_q, cu_k,
                                      causal=True, softcap=call.softcap, alibi_slopes=slopes, scale=call.scale,
                                      return_lse=True, backend=inner)
    if slopes is not None:  # a chunk's distances are short by the keys after it, so its lse is high by that
        chunk_slopes = call.alibi_slopes[torch.tensor(chunk_seq)].to(device)  # (chunks, H)
        part_lse = part_lse - chunk_slopes.T * torch.tensor(after, device=device, dtype=torch.float32)
    return merge_partials(part, part_lse, owner_t, total_q, call.sinks)


def _sequence_of(owner: list[int], q_lens) -> torch.Tensor:
    """The sequence each chunk's query row belongs to."""
    row_to_seq = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    return row_to_seq[torch.tensor(owner, dtype=torch.long)]


def merge_partials(part: torch.Tensor, part_lse: torch.Tensor, owner: torch.Tensor, total_q: int,
                   sinks: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial attentions merged by their lse: part (R, H, D) and part_lse (H, R) natural log, row r
    a partial of query owner[r] -> out (total_q, H, D) in part's dtype, lse (H, total_q) float32
    (sinks (H,) counted once). A query with no partial, or only empty ones, gets out 0."""
    H, D = part.shape[1], part.shape[2]
    index = owner[None, :].expand(H, -1)
    m = torch.full((H, total_q), -math.inf, device=part.device).scatter_reduce(1, index, part_lse, "amax")
    if sinks is not None:
        m = torch.maximum(m, sinks.float()[:, None])
    m_safe = torch.where(torch.isinf(m), 0.0, m)  # a row with nothing to merge: weights exp(-inf) = 0
    weights = torch.exp(part_lse - m_safe.gather(1, index))  # (H, R)
    denominator = torch.zeros(H, total_q, device=part.device).index_add_(1, owner, weights)
    if sinks is not None:
        denominator = denominator + torch.exp(sinks.float()[:, None] - m_safe)
    numerator = torch.zeros(total_q, H, D, device=part.device).index_add_(0, owner, part.float() * weights.T[..., None])
    out = numerator / denominator.T[..., None].clamp_min(torch.finfo(torch.float32).tiny)
    return out.to(part.dtype), m_safe + torch.log(denominator)
