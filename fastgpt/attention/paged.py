"""Attention over a paged KV cache: each sequence's keys and values in fixed-size pages, anywhere.

    out = paged_attention(q, k_pages, v_pages, block_table, seq_lens, cu_seqlens_q)

    q:                (total_q, H, D)   the NEW tokens' queries of every sequence, back to back
    k_pages, v_pages: (num_pages, page_size, H_kv, D)   the pool: page p holds page_size positions
    block_table:      (B, max_pages) int32 (or int64): sequence b's j-th page is block_table[b, j],
                      so its position t sits at k_pages[block_table[b, t // page_size], t % page_size]
    seq_lens:         (B,) int: the keys of sequence b, its new tokens included (their keys and values
                      already written to the pages: write_pages)
    cu_seqlens_q:     (B + 1,) int, sequence b's queries at rows cu_seqlens_q[b] : cu_seqlens_q[b + 1];
                      None: one query per sequence (a decode step, total_q = B)
    out:              (total_q, H, D); with return_lse=True, (out, lse (H, total_q) float32)

flash-attention's convention (`flash_attn_with_kvcache`: k_cache (num_pages, page_size, H_kv, D),
block_table (B, max_pages) int32, cache_seqlens (B,)), with q packed as in `flash_attn_varlen_func`
so that the sequences of one step may bring different numbers of new tokens (a prefill of prompts of
different lengths and decode steps in one call). The new tokens are the LAST ones of each sequence:
query i of sequence b, which brings T_q[b] of them, sits at position seq_lens[b] - T_q[b] + i, and
every option (causal, window, softcap, sinks, alibi_slopes) means what it means in
fastgpt.attention.attention, per sequence, bottom-right:

    sequence b: seq_lens[b] = 6 keys, T_q[b] = 2 new tokens, page_size 4, block_table[b] = [7, 2]
    page 7: positions 0 1 2 3      page 2: positions 4 5 . .   (the pool's other pages: other sequences)
    query 0 (position 4)   x x x x x .
    query 1 (position 5)   x x x x x x

Page sizes: multiples of 16 from 16 to 4096 (PAGE_SIZES). Entries of block_table past a sequence's
last page are never read and not checked. There is no dropout: a paged cache serves inference.

Kernel paths: `ext.cpu_flash` (CPU, float32 and bfloat16) and `triton` read the pages in place
through the block table, each key tile gathered from its pages by the kernel: the packed call's
arithmetic in the same order, so a paged call gives the bits of varlen_attention on the same path
over the gathered keys. They are forward only (a call whose inputs want gradients is refused by
name). `naive` (the reference) and `sdpa` gather the pages into the packed layout first (one copy
of every key and value the step reads, through which gradients flow) and run their varlen path:
the "paged" option of the registry names which path did what.

For a model, which calls attention once per layer over the same pages: paged_layout() validates the
block table and lengths once per step, and layout_attention() / layout_write() use it per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from fastgpt.attention.call import AttentionCall, _shape
from fastgpt.attention.registry import choose, record
from fastgpt.attention.varlen import VarlenLayout, layout_call

PAGE_SIZE_STEP = 16  # a page is a whole number of the kernels' 16-row tiles
MAX_PAGE_SIZE = 4096
PAGE_SIZES = range(PAGE_SIZE_STEP, MAX_PAGE_SIZE + 1, PAGE_SIZE_STEP)


def check_page_size(page_size, name: str = "page_size") -> int:
    """page_size, or a ValueError naming it, its value and the sizes supported."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size not in PAGE_SIZES:
        raise ValueError(f"{name}={page_size!r} is not supported: a page holds a multiple of {PAGE_SIZE_STEP} "
                         f"positions, from {PAGE_SIZE_STEP} to {MAX_PAGE_SIZE}")
    return page_size


@dataclass(frozen=True)
class PagedLayout:
    """One step's sequences over the pages, validated: where each key is and where each new key goes."""
    page_size: int
    varlen: VarlenLayout  # the new tokens' rows (cu_seqlens_q) and each sequence's key count (cu_seqlens_k)
    block_table: torch.Tensor = field(repr=False)  # (B, max_pages) int32 on the device, contiguous: a copy
    new_slots: torch.Tensor = field(repr=False)  # (total_q,) int64: flat index page·page_size + offset of each new key
    positions: torch.Tensor = field(repr=False)  # (total_q,) int64: each new token's position in its sequence

    @property
    def batch(self) -> int:
        return self.varlen.batch

    @property
    def cu_seqlens_q(self) -> torch.Tensor:
        return self.varlen.cu_seqlens_q

    @property
    def q_lens(self) -> tuple[int, ...]:
        return self.varlen.q_lens

    @property
    def k_lens(self) -> tuple[int, ...]:
        return self.varlen.k_lens

    def key_slots(self) -> torch.Tensor:
        """(total_k,) int64: the flat slot page·page_size + offset of every key, sequence by sequence."""
        device = self.block_table.device
        lens = torch.tensor(self.k_lens, device=device)
        seq = torch.repeat_interleave(torch.arange(self.batch, device=device), lens)  # (total_k,) each key's sequence
        j = torch.arange(seq.numel(), device=device) - self.varlen.cu_seqlens_k[:-1].long()[seq]  # its position
        return self.block_table[seq, j // self.page_size].long() * self.page_size + j % self.page_size

    def gather(self, k_pages: torch.Tensor, v_pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of every sequence, back to back: (num_pages, page_size, H_kv, D) pools ->
        k, v (total_k, H_kv, D), the packed layout of varlen_attention (one copy; gradients flow back)."""
        slots = self.key_slots()
        return (k_pages.reshape(-1, *k_pages.shape[2:]).index_select(0, slots),
                v_pages.reshape(-1, *v_pages.shape[2:]).index_select(0, slots))


def _host_ints(name: str, t, dims: int) -> list:
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) or t.dim() != dims:
        shape = _shape(t) if isinstance(t, torch.Tensor) else type(t).__name__
        what = "(B,)" if dims == 1 else "(B, max_pages)"
        raise ValueError(f"{name} must be an int32 or int64 tensor {what}; got {shape}"
                         f"{' ' + str(t.dtype) if isinstance(t, torch.Tensor) else ''}")
    return t.tolist()


def _q_lens(cu_seqlens_q, batch: int) -> list[int]:
    if cu_seqlens_q is None:
        return [1] * batch
    cu = _host_ints("cu_seqlens_q", cu_seqlens_q, 1)
    if len(cu) != batch + 1 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens_q = {cu[:8]} must hold B + 1 = {batch + 1} offsets from 0, never decreasing")
    return [b - a for a, b in zip(cu, cu[1:])]


def _check_lengths(seq_lens: list[int], q_lens: list[int], max_pages: int, page_size: int) -> None:
    capacity = max_pages * page_size
    for b, (n, t) in enumerate(zip(seq_lens, q_lens)):
        if not 0 <= n <= capacity:
            raise ValueError(f"seq_lens[{b}] = {n} is outside [0, {capacity}]: the block table's {max_pages} pages "
                             f"of {page_size} positions")
        if t > n:
            raise ValueError(f"sequence {b} brings {t} new tokens but seq_lens[{b}] = {n}: seq_lens counts the new "
                             "tokens too (write their keys first)")


def paged_layout(block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int, num_pages: int,
                 cu_seqlens_q: Optional[torch.Tensor] = None, device=None) -> PagedLayout:
    """The validated layout of a step (module docstring): one host read of block_table and the lengths."""
    check_page_size(page_size)
    table = _host_ints("block_table", block_table, 2)
    lens = _host_ints("seq_lens", seq_lens, 1)
    if len(lens) != len(table):
        raise ValueError(f"seq_lens has {len(lens)} sequences but block_table {len(table)} rows: one row each")
    q_lens = _q_lens(cu_seqlens_q, len(lens))
    max_pages = block_table.shape[1]
    _check_lengths(lens, q_lens, max_pages, page_size)
    new_slots, positions, rows = [], [], []
    for b, (row, n, t) in enumerate(zip(table, lens, q_lens)):
        used = row[:-(-n // page_size)]  # the pages that hold positions 0 .. n - 1
        bad = [p for p in used if not 0 <= p < num_pages]
        if bad:
            raise ValueError(f"block_table[{b}] holds page {bad[0]}, outside the pool's pages 0 .. {num_pages - 1}")
        new_slots += [used[pos // page_size] * page_size + pos % page_size for pos in range(n - t, n)]
        positions += range(n - t, n)
        rows.append(used + [0] * (max_pages - len(used)))  # the entries never read: 0, whatever they held
    device = block_table.device if device is None else device
    cu_q = torch.tensor([0, *q_lens], dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0).to(device=device, dtype=torch.int32)
    as_index = dict(dtype=torch.int64, device=device)
    # the kernels read this copy, never the caller's table (which may change after the checks)
    table_copy = torch.tensor(rows, dtype=torch.int32).reshape(len(rows), max_pages).to(device)
    return PagedLayout(page_size, VarlenLayout(cu_q, cu_k, tuple(q_lens), tuple(lens)), table_copy,
                       torch.tensor(new_slots, **as_index), torch.tensor(positions, **as_index))


def _check_pages(k_pages, v_pages, q: Optional[torch.Tensor] = None) -> None:
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a tensor (num_pages, page_size, H_kv, D); got "
                             f"{_shape(t) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if k_pages.shape != v_pages.shape:
        raise ValueError(f"k_pages has shape {_shape(k_pages)} and v_pages {_shape(v_pages)}: they must match")
    if not (k_pages.is_contiguous() and v_pages.is_contiguous()):
        raise ValueError("k_pages and v_pages must be contiguous: a page's slots are addressed as one flat index "
                         "page · page_size + offset")
    check_page_size(k_pages.shape[1], "page_size (k_pages.shape[1])")
    if q is not None and (q.dim() != 3 or q.shape[2] != k_pages.shape[3]):
        raise ValueError(f"q has shape {_shape(q)}; it must be (total_q, H, D) with D = k_pages' head dim "
                         f"{k_pages.shape[3]}")


def layout_write(k_pages: torch.Tensor, v_pages: torch.Tensor, layout: PagedLayout, k: torch.Tensor,
                 v: torch.Tensor) -> None:
    """Stores the new tokens' k, v (total_q, H_kv, D) in their slots of the pages, in place."""
    if k.shape != v.shape or k.shape[0] != layout.new_slots.numel() or k.shape[1:] != k_pages.shape[2:]:
        raise ValueError(f"k has shape {_shape(k)} and v {_shape(v)}; each must be (total_q = "
                         f"{layout.new_slots.numel()}, H_kv, D) = (.., {k_pages.shape[2]}, {k_pages.shape[3]})")
    k_pages.view(-1, *k_pages.shape[2:]).index_copy_(0, layout.new_slots, k.to(k_pages.dtype))
    v_pages.view(-1, *v_pages.shape[2:]).index_copy_(0, layout.new_slots, v.to(v_pages.dtype))


def paged_call(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, layout: PagedLayout,
               scale: Optional[float] = None, **options) -> AttentionCall:
    """The AttentionCall of a paged step, validated: a varlen call (batch the sequences, q_len and
    kv_len the longest) with the layout in its `paged` field; k, v are the pools."""
    if q.dim() != 3 or q.shape[0] != layout.new_slots.numel():
        raise ValueError(f"q has shape {_shape(q)}; it must be (total_q, H, D) with total_q = "
                         f"{layout.new_slots.numel()}, the new tokens the layout's sequences bring")
    if layout.block_table.device != q.device:
        raise ValueError(f"the layout is on {layout.block_table.device} but q on {q.device}: make it with "
                         "device=q.device")
    call = layout_call(q, k_pages.flatten(0, 1), v_pages.flatten(0, 1), layout.varlen, 0.0, scale, **options)
    return replace(call, paged=layout)


def layout_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, layout: PagedLayout, *,
                     causal: bool = True, window=None, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                     alibi_slopes: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                     return_lse: bool = False, backend: str = "auto"):
    """paged_attention over a layout made once per step: one call of the chosen kernel path, which
    reads the pages in place or gathers them (module docstring)."""
    _check_pages(k_pages, v_pages, q)
    call = paged_call(q, k_pages, v_pages, layout, scale, causal=causal, window=window, softcap=softcap, sinks=sinks,
                      alibi_slopes=alibi_slopes, return_lse=return_lse)
    path = choose(call, backend)
    record(path)
    return path.fn(q, k_pages, v_pages, call)


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor] = None, *, causal: bool = True,
                    window=None, softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                    alibi_slopes: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                    return_lse: bool = False, backend: str = "auto"):
    """Attention of the new tokens' queries q (total_q, H, D) over their sequences' paged keys (module
    docstring) -> (total_q, H, D), and with return_lse also lse (H, total_q) float32."""
    _check_pages(k_pages, v_pages, q)
    layout = paged_layout(block_table, seq_lens, k_pages.shape[1], k_pages.shape[0], cu_seqlens_q, q.device)
    return layout_attention(q, k_pages, v_pages, layout, causal=causal, window=window, softcap=softcap, sinks=sinks,
                            alibi_slopes=alibi_slopes, scale=scale, return_lse=return_lse, backend=backend)


def write_pages(k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> None:
    """Stores the new tokens' keys and values k, v (total_new, H_kv, D) in place: sequence b's rows
    (cu_seqlens[b] : cu_seqlens[b + 1]; None: one row each) become its LAST positions, ending at
    seq_lens[b] - 1, as paged_attention then reads them. Which pages may be written (never one that
    other sequences share) is the caller's to know: fastgpt/model/paged_kv.py."""
    _check_pages(k_pages, v_pages)
    layout = paged_layout(block_table, seq_lens, k_pages.shape[1], k_pages.shape[0], cu_seqlens, k_pages.device)
    layout_write(k_pages, v_pages, layout, k, v)
