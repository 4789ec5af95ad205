"""Variable-length attention: many sequences packed back to back, one call, no padding.

    out = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, ...)

    q:      (total_q, H, D)      the queries of every sequence, back to back
    k, v:   (total_k, H_kv, D)   their keys and values, in the same order
    cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 or int64, on q's device: sequence b owns query rows
            cu_seqlens_q[b] : cu_seqlens_q[b + 1] and key rows cu_seqlens_k[b] : cu_seqlens_k[b + 1]
    out:    (total_q, H, D); with return_lse=True, (out, lse (H, total_q) float32)

flash-attention's convention (`flash_attn_varlen_func`; `flash_attn_varlen_func` below takes its
very signature), so code written for it ports in a line. Three documents of lengths 3, 1 and 2:

    tokens        a a a b c c             cu_seqlens = [0, 3, 4, 6]
    keys ->       0 1 2 3 4 5
    query 0 (a)   x . . . . .
    query 1 (a)   x x . . . .
    query 2 (a)   x x x . . .
    query 3 (b)   . . . x . .             attention never crosses a document's edge
    query 4 (c)   . . . . x .
    query 5 (c)   . . . . x x

Each sequence is the call of api.py on its own: query i of sequence b sits at key position
T_k[b] - T_q[b] + i of that sequence (bottom-right, so a sequence of new tokens over its cached
keys works as a decode step does), and every option means what it means there. sinks is (H,),
alibi_slopes (H,) or (B, H) with B the number of sequences. A causal call needs T_k[b] >= T_q[b] in
every sequence; sequences of length 0 are allowed. The lse comes back (H, total_q), as
flash-attention's varlen functions give it.

The sequence lengths are read on the host (one small copy, and on a GPU one synchronisation), to
refuse a cu_seqlens that would send a kernel outside q, k or v; flash-attention trusts it. The
copy is made once per cu_seqlens tensor (and made again after an in-place change), so a model that
passes the same one to every layer pays it once per forward. max_seqlen_q/max_seqlen_k may be given (at least the longest sequence) or left None.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from fastgpt.attention.api import run_with_mask
from fastgpt.attention.call import AttentionCall, _shape, needs_grad, validate_inputs
from fastgpt.attention.registry import choose, record


@dataclass(frozen=True)
class VarlenLayout:
    """Where each packed sequence's rows are: cu_seqlens on the device for kernels, lengths on the host."""
    cu_seqlens_q: torch.Tensor = field(repr=False)  # (B + 1,) int32, on q's device, contiguous
    cu_seqlens_k: torch.Tensor = field(repr=False)
    q_lens: tuple[int, ...]  # (B,) each sequence's queries
    k_lens: tuple[int, ...]  # (B,) and keys

    @property
    def batch(self) -> int:
        return len(self.q_lens)

    @property
    def max_q(self) -> int:
        return max(self.q_lens)

    @property
    def max_k(self) -> int:
        return max(self.k_lens)

    @property
    def total_q(self) -> int:
        return sum(self.q_lens)

    @property
    def total_k(self) -> int:
        return sum(self.k_lens)

    def q_starts(self) -> list[int]:
        return [0, *torch.tensor(self.q_lens).cumsum(0).tolist()]

    def k_starts(self) -> list[int]:
        return [0, *torch.tensor(self.k_lens).cumsum(0).tolist()]



def _lengths(name: str, cu: torch.Tensor, total: int, rows: str,
             device: torch.device) -> tuple[tuple[int, ...], torch.Tensor]:
    """(the sequence lengths, an int32 copy of cu for the kernels) of a cu_seqlens, or a ValueError
    naming it, its value and the limit."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name} must be a 1-D integer torch.Tensor (B + 1,); got {type(cu).__name__}")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{name} has shape {_shape(cu)}; it must be (B + 1,) with B >= 1 sequences")
    if cu.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} has dtype {cu.dtype}; it must be int32 or int64")
    if cu.device != device and device.type != "meta":
        raise ValueError(f"{name} is on device {cu.device} but q is on {device}: they must share one device")
    values, private = _host_values(cu)
    if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
        shown = values if len(values) <= 8 else values[:4] + ["..."] + values[-3:]
        raise ValueError(f"{name} = {shown} must start at 0, never decrease, and end at {total} ({rows})")
    return tuple(b - a for a, b in zip(values, values[1:])), private


# The cu_seqlens read so far: {id: (weak reference, version, host values, int32 device copy)}. A
# model passes one cu_seqlens to every layer, so the read (on a GPU, a synchronisation) is made once
# per forward, not once per layer. An entry answers only for the same live tensor at the same version
# (an in-place change bumps it), and the kernels read its private copy, never the caller's tensor:
# a change the version does not see (through .numpy() or .data) cannot send them out of bounds.
# Inference tensors keep no version, so they are read every time.
_READ: dict[int, tuple[weakref.ref, int, list[int], torch.Tensor]] = {}


def _host_values(cu: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    cacheable = not cu.is_inference()
    known = _READ.get(id(cu)) if cacheable else None
    if known is not None and known[0]() is cu and known[1] == cu._version:
        return known[2], known[3]
    private = cu.to(torch.int32, copy=True)
    values = private.tolist()
    if cacheable:
        if len(_READ) >= 64:  # forget the dead ones, then the oldest
            for key in [key for key, entry in _READ.items() if entry[0]() is None]:
                del _READ[key]
            while len(_READ) >= 64:
                del _READ[next(iter(_READ))]
        _READ[id(cu)] = (weakref.ref(cu), cu._version, values, private)
    return values, private


def _max_seqlen(name: str, given, actual: int) -> None:
    if given is None:
        return
    if isinstance(given, bool) or not isinstance(given, int) or given < actual:
        raise ValueError(f"{name} = {given!r} must be an int at least the longest sequence, {actual} (or None)")


def varlen_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                  causal: bool = True) -> VarlenLayout:
    """The layout of a packed call, validated (q (total_q, H, D), k (total_k, H_kv, D))."""
    q_lens, cu_q = _lengths("cu_seqlens_q", cu_seqlens_q, q.shape[0], "q's rows, total_q", q.device)
    k_lens, cu_k = _lengths("cu_seqlens_k", cu_seqlens_k, k.shape[0], "k's rows, total_k", q.device)
    if len(q_lens) != len(k_lens):
        raise ValueError(f"cu_seqlens_q holds {len(q_lens)} sequences and cu_seqlens_k {len(k_lens)}: "
                         "each sequence needs its queries and its keys")
    if causal:
        short = [b for b, (tq, tk) in enumerate(zip(q_lens, k_lens)) if tk < tq]
        if short:
            b = short[0]
            raise ValueError(f"sequence {b} has {q_lens[b]} queries but {k_lens[b]} keys: a causal call needs "
                             "T_k >= T_q in every sequence (causal=False takes any)")
    _max_seqlen("max_seqlen_q", max_seqlen_q, max(q_lens))
    _max_seqlen("max_seqlen_k", max_seqlen_k, max(k_lens))
    return VarlenLayout(cu_q, cu_k, q_lens, k_lens)


def _check_packed(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (total, H, D); got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dims (total_tokens, heads, head_dim) in a varlen call; got "
                             f"{t.dim()} dims with shape {_shape(t)}")
    if q.shape[0] < 1 or k.shape[0] < 1:
        raise ValueError(f"q has shape {_shape(q)} and k {_shape(k)}: a varlen call needs at least one query "
                         "and one key row")


def varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, dropout_p: float = 0.0,
                scale: Optional[float] = None, **options) -> AttentionCall:
    """The AttentionCall of a packed call, validated: batch = the number of sequences, q_len and
    kv_len the longest ones; `options` as attention takes them."""
    _check_packed(q, k, v)
    layout = varlen_layout(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, options.get("causal", True))
    return layout_call(q, k, v, layout, dropout_p, scale, **options)


def _check_like_q(q, k, v, dropout_p: float, scale: Optional[float]) -> None:
    """The (B, H, T, D) checks of dtype, device, heads and head dim, on one-sequence views."""
    validate_inputs(q.unsqueeze(0).transpose(1, 2), k.unsqueeze(0).transpose(1, 2), v.unsqueeze(0).transpose(1, 2),
                    dropout_p, scale, causal=False)


def layout_call(q, k, v, layout: VarlenLayout, dropout_p: float = 0.0, scale: Optional[float] = None,
                **options) -> AttentionCall:
    """The AttentionCall of packed q (total_q, H, D) over k, v (rows, H_kv, D) whose sequences
    `layout` holds, validated as varlen_call validates (its lengths already checked: a paged call's
    k and v are the pools, whose rows are not the keys one after another)."""
    _check_like_q(q, k, v, dropout_p, scale)
    meta_q = torch.empty(layout.batch, q.shape[1], layout.max_q, q.shape[2], dtype=q.dtype, device="meta")
    meta_k = torch.empty(layout.batch, k.shape[1], max(layout.max_k, 1), k.shape[2], dtype=q.dtype, device="meta")
    sinks, slopes = options.get("sinks"), options.get("alibi_slopes")
    call = AttentionCall.of(meta_q, meta_k, meta_k, dropout_p, scale, **options)
    if sinks is not None and sinks.device != q.device:
        raise ValueError(f"sinks is on device {sinks.device} but q is on {q.device}: they must share one device")
    if slopes is not None and slopes.device != q.device:
        raise ValueError(f"alibi_slopes is on device {slopes.device} but q is on {q.device}: they must share one device")
    return replace(call, device=q.device, kv_len=layout.max_k, varlen=layout, needs_grad=needs_grad(q, k, v, sinks))


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: Optional[int] = None,
                     max_seqlen_k: Optional[int] = None, *, causal: bool = True, window=None, softcap: float = 0.0,
                     sinks: Optional[torch.Tensor] = None, alibi_slopes: Optional[torch.Tensor] = None,
                     dropout_p: float = 0.0, scale: Optional[float] = None, return_lse: bool = False,
                     backend: str = "auto"):
    """Attention over packed sequences (module docstring): q (total_q, H, D), k, v (total_k, H_kv, D)
    -> out (total_q, H, D), and with return_lse (out, lse (H, total_q) float32). The options, dropout,
    scale and backend mean what they mean in fastgpt.attention.attention, per sequence; every
    backend runs the whole batch in one call of its kernels, or refuses "varlen" by name."""
    call = varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale,
                       causal=causal, window=window, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                       return_lse=return_lse)
    path = choose(call, backend)
    record(path)
    return path.fn(q, k, v, call)


def varlen_attention_with_mask(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, *,
                               dropout_p: float, scale: Optional[float] = None, backend: str = "auto", **options):
    """(out, keep): varlen_attention's output and the dropout mask it drew, keep (B, H, max_q, max_k)
    bool, sequence b's mask in keep[b, :, :T_q[b], :T_k[b]] (flash-attention's padded layout).
    naive_varlen_attention(..., keep_mask=keep) is then the call's exact reference."""
    call = varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale, **options)
    return run_with_mask(q, k, v, call, backend)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, *, backend: str = "auto"):
    """flash-attention's `flash_attn_varlen_func`, argument for argument (causal defaults to False
    there too), on fastgpt's backends: `from fastgpt.attention import flash_attn_varlen_func`.
    deterministic is accepted and needs nothing: no backend's backward uses atomics. With
    return_attn_probs it returns (out, softmax_lse (H, total_q), None): the third, flash-attention's
    debugging S_dmask, is not produced (varlen_attention_with_mask gives the dropout mask)."""
    left, right = window_size
    result = varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                              window=(left, right if not causal else 0), softcap=softcap, alibi_slopes=alibi_slopes,
                              dropout_p=dropout_p, scale=softmax_scale, return_lse=return_attn_probs, backend=backend)
    return (*result, None) if return_attn_probs else result
