"""Padded batches as one varlen call: the padding is dropped, never computed.

    out = padded_attention(q, k, v, key_mask, causal=True, ...)

    q:        (B, H, T_q, D)      padded batch of queries
    k, v:     (B, H_kv, T_k, D)   padded batch of keys and values
    key_mask: (B, T_k) bool       True at real tokens (transformers' 2D attention_mask, 1 = real)
    out:      (B, H, T_q, D)      0 at padded queries

The real rows are gathered into the packed layout of varlen.py (one sequence per batch row), run
as ONE varlen_attention call, and scattered back:

    key_mask   row 0: 0 0 1 1 1      (left padding)      packed k: 2 3 4 | 5 6 7 8 9
               row 1: 1 1 1 1 1                           cu_seqlens_k = [0, 3, 8]

Which queries are real depends on the mask:
  - causal or windowed: the queries are the last T_q of the T_k positions (the newest tokens, as
    in self-attention over a KV cache); a query at a padded position is padding. Each row's real
    queries are then the last of its real keys, so the bottom-right alignment of the packed call
    puts every real query on its own key.
  - bidirectional without a window (an encoder, or cross-attention whose queries are another
    sequence): the mask hides keys only, and every query of the row reads the row's real keys.

Dropping padding keeps the order of the real tokens but closes the gaps, which changes nothing
for causal attention, bidirectional attention, soft-capping and sinks whatever the pattern. A
window and ALiBi measure distances, which a gap between real tokens would shorten: with either,
each row's real keys must be one run (left or right padding, or both), else the call is refused.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgpt.attention.call import _shape
from fastgpt.attention.varlen import varlen_attention


def _check_key_mask(key_mask, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"key_mask must be a (B, T_k) torch.Tensor of bools or 0/1; got {type(key_mask).__name__}")
    B, T_k = k.shape[0], k.shape[2]
    if tuple(key_mask.shape) != (B, T_k):
        raise ValueError(f"key_mask has shape {_shape(key_mask)}; it must be (B, T_k) = ({B}, {T_k}), True at real keys")
    if key_mask.dtype.is_floating_point or key_mask.dtype.is_complex:
        raise ValueError(f"key_mask has dtype {key_mask.dtype}; it must be bool or integer (1 = real token)")
    if key_mask.device != q.device:
        raise ValueError(f"key_mask is on device {key_mask.device} but q is on {q.device}: they must share one device")
    return key_mask.bool()


def _runs_per_row(real: torch.Tensor) -> torch.Tensor:
    """(B,) how many runs of True each row of real (B, T) holds: more than 1 is a gap between real tokens."""
    return (real[:, 1:] & ~real[:, :-1]).sum(1) + real[:, 0].long()


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, *,
                     causal: bool = True, window=None, alibi_slopes: Optional[torch.Tensor] = None,
                     backend: str = "auto", **options) -> torch.Tensor:
    """A padded batch as one varlen call (module docstring): q (B, H, T_q, D), k, v (B, H_kv, T_k, D),
    key_mask (B, T_k) -> (B, H, T_q, D), zeros at padded queries. `options` (softcap, sinks,
    dropout_p, scale) as fastgpt.attention.attention takes them; return_lse is not offered here."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim (B, heads, T, D) tensor; got "
                             f"{_shape(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    real_k = _check_key_mask(key_mask, q, k)
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    every_query = not causal and window is None
    if not every_query and T_q > T_k:
        raise ValueError(f"q has T_q={T_q} queries but k only T_k={T_k} keys: with a causal or windowed mask the "
                         "queries are the last T_q of the key positions")
    if options.get("return_lse"):
        raise ValueError("return_lse=True is not offered by padded_attention (padded rows have no lse); call "
                         "varlen_attention on the packed rows for it")
    gapped = (_runs_per_row(real_k) > 1).nonzero().flatten()
    if (window is not None or alibi_slopes is not None) and gapped.numel() > 0:
        b = int(gapped[0])
        row = "".join("1" if x else "0" for x in real_k[b].tolist())
        raise ValueError(f"key_mask row {b} has padding between real tokens ({row}); a window or ALiBi measures "
                         "distances, which dropping that padding would change: pad on the left or right only")
    real_q = torch.ones(B, T_q, dtype=torch.bool, device=q.device) if every_query else real_k[:, T_k - T_q:]
    q_index = real_q.reshape(-1).nonzero().flatten()  # rows of the (B·T_q) flattened queries that are real
    k_index = real_k.reshape(-1).nonzero().flatten()
    cu_q = torch.cat([real_q.new_zeros(1, dtype=torch.int32), real_q.sum(1).cumsum(0).to(torch.int32)])
    cu_k = torch.cat([real_k.new_zeros(1, dtype=torch.int32), real_k.sum(1).cumsum(0).to(torch.int32)])
    out = q.new_zeros(B * T_q, H, D)
    if q_index.numel() == 0:
        return out.view(B, T_q, H, D).transpose(1, 2)
    if k_index.numel() == 0:  # no real key anywhere (bidirectional rows of padding): every output is 0
        return out.view(B, T_q, H, D).transpose(1, 2)
    packed_q = q.transpose(1, 2).reshape(B * T_q, H, D)[q_index]  # (total_q, H, D)
    packed_k, packed_v = (t.transpose(1, 2).reshape(B * T_k, H_kv, D)[k_index] for t in (k, v))
    y = varlen_attention(packed_q, packed_k, packed_v, cu_q, cu_k, causal=causal, window=window,
                         alibi_slopes=alibi_slopes, backend=backend, **options)
    out = out.index_copy(0, q_index, y)  # (B·T_q, H, D), zeros at padded queries
    return out.view(B, T_q, H, D).transpose(1, 2)
