"""The paged KV cache of batched generation: one pool of pages per model, a block table per sequence.

Every layer keeps its keys and values in pages of `page_size` positions:

    k[layer], v[layer]: (num_pages, page_size, H_kv, D)     (fastgpt/attention/paged.py's k_pages)

and one block table per sequence, shared by all layers, lists the pages that hold its positions in
order: position t of sequence s is slot t % page_size of page pages_of(s)[t // page_size], in every
layer. A sequence gets a new page when it grows past its last one (`reserve`), and its pages return
to the pool when it finishes (`release`), lowest page id first out of the free list, so a finished
sequence's pages are the next one's and the pages in use never exceed what the live sequences need.

The memory, allocated once when the pool is made:

    num_pages × page_size × n_layer × 2 (k and v) × H_kv × D × dtype size  bytes

(`PagePool.bytes`). GPT.make_page_pool sizes it for `max_sequences` sequences of up to block_size
positions each (batched.page_pool_for: of the longest text the prompts can reach), a need that
prefix sharing only ever lowers.

Prefix sharing: when a sequence is admitted with its prompt (`admit`), each of its prompt's full
pages whose tokens, from the first on, equal those of a full page another admitted prompt already
filled is shared instead of computed: the block table points at the same page and its reference
count goes up. A prompt always computes at least its last token (its logits start the generation),
so a prompt of exactly k full pages, all of them held by another, shares k - 1. A shared page is
never written: a sequence about to write into a page that others also hold (`reserve`) first gets
its own copy of it, every layer's keys and values. With full prompt pages only, that happens after
`fork` (a sequence continued two ways shares its partly filled last page too). A page is freed
when its last holder releases it.

Sharing needs the shared page's keys to be written before the sharer's queries read them: pages are
shared as soon as the donor is admitted, since within a step every layer writes all new keys before
any query attends (fastgpt/model/attention.py), so a donor and a sharer may start in the same step.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Hashable, Optional

import torch

from fastgpt.attention.paged import PagedLayout, check_page_size, paged_layout


class PagePool:
    """The pages of every layer, their reference counts, each sequence's block table and length."""

    def __init__(self, n_layer: int, n_kv_head: int, head_dim: int, page_size: int, num_pages: int,
                 dtype: torch.dtype = torch.float32, device="cpu", share_prefixes: bool = True):
        check_page_size(page_size)
        if num_pages < 1:
            raise ValueError(f"num_pages={num_pages} must be >= 1")
        self.page_size, self.num_pages = page_size, num_pages
        shape = (num_pages, page_size, n_kv_head, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layer)]
        self.refcount = [0] * num_pages
        self._free = list(range(num_pages))  # a heap: the lowest free id goes first
        self._pages: dict[Hashable, list[int]] = {}  # sequence -> its block table
        self._length: dict[Hashable, int] = {}  # sequence -> positions written (or being written this step)
        self._prefix: dict[tuple, int] = {}  # a prompt's first (j + 1)·page_size tokens -> the page of its j-th
        self._prefix_of: dict[int, tuple] = {}  # page -> its key in _prefix
        self.copies = 0  # pages copied on write
        self.share_prefixes = share_prefixes

    @property
    def bytes(self) -> int:
        """The pool's memory: num_pages × page_size × layers × 2 × H_kv × D × dtype size."""
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def pages_in_use(self) -> int:
        return self.num_pages - len(self._free)

    def pages_needed(self) -> int:
        """What the live sequences would take without sharing: ceil(length / page_size) each."""
        return sum(-(-n // self.page_size) for n in self._length.values())

    def pages_of(self, seq: Hashable) -> list[int]:
        return list(self._pages[seq])

    def length(self, seq: Hashable) -> int:
        return self._length[seq]

    def shared_pages(self) -> int:
        """Pages held by more than one sequence."""
        return sum(1 for n in self.refcount if n > 1)

    def admit(self, seq: Hashable, prompt: list[int]) -> int:
        """A new sequence with this prompt (token ids) -> how many of its first positions are already
        cached in shared pages (a multiple of page_size, below len(prompt)); it computes the rest."""
        if seq in self._pages:
            raise ValueError(f"sequence {seq!r} is already admitted: release it first")
        ps, pages = self.page_size, []
        while self.share_prefixes and (len(pages) + 1) * ps < len(prompt):  # a full page, and a token after it
            page = self._prefix.get(tuple(prompt[:(len(pages) + 1) * ps]))
            if page is None:
                break
            self.refcount[page] += 1
            pages.append(page)
        shared = len(pages)
        self._pages[seq], self._length[seq] = pages, shared * ps
        try:
            self.reserve(seq, len(prompt))
        except RuntimeError:
            self.release(seq)  # out of pages: the sequence is not admitted, what it took goes back
            raise
        for j in range(shared, len(prompt) // ps):  # this prompt's own full pages, for those that follow
            key = tuple(prompt[:(j + 1) * ps])
            if key not in self._prefix:
                self._prefix[key], self._prefix_of[pages[j]] = pages[j], key
        return shared * ps

    def reserve(self, seq: Hashable, length: int) -> None:
        """Makes positions [length(seq), length) writable by seq: new pages past its last one, and its
        own copy of any page it shares among those the new positions fall into."""
        start, ps, pages = self._length[seq], self.page_size, self._pages[seq]
        for j in range(start // ps, -(-length // ps)):
            if j == len(pages):
                pages.append(self._take())
            elif self.refcount[pages[j]] > 1:
                pages[j] = self._copy(pages[j])
        self._length[seq] = max(start, length)

    def fork(self, seq: Hashable, new_seq: Hashable) -> None:
        """new_seq continues from everything seq holds, sharing all its pages (the last, partly filled
        one included); whichever writes into a shared page first gets its own copy."""
        for page in self._pages[seq]:
            self.refcount[page] += 1
        self._pages[new_seq], self._length[new_seq] = list(self._pages[seq]), self._length[seq]

    def release(self, seq: Hashable) -> None:
        """A finished sequence: its pages go back to the pool once no other sequence holds them."""
        for page in self._pages.pop(seq):
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                self._prefix.pop(self._prefix_of.pop(page, None), None)
                heapq.heappush(self._free, page)
        del self._length[seq]

    def _take(self) -> int:
        if not self._free:
            raise RuntimeError(f"the page pool's {self.num_pages} pages are all in use: make it larger "
                               "(more pages) or run fewer sequences at once")
        page = heapq.heappop(self._free)
        self.refcount[page] = 1
        return page

    def _copy(self, page: int) -> int:
        """A private copy of a shared page, every layer's keys and values."""
        mine = self._take()
        for k, v in zip(self.k, self.v):
            k[mine].copy_(k[page])
            v[mine].copy_(v[page])
        self.refcount[page] -= 1
        self.copies += 1
        return mine

    def block_table(self, seqs: list[Hashable], device=None) -> torch.Tensor:
        """(len(seqs), max pages) int32, row b the pages of seqs[b] (unused entries 0: never read)."""
        width = max(1, max(len(self._pages[s]) for s in seqs))
        rows = [self._pages[s] + [0] * (width - len(self._pages[s])) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32, device=device)

    def step(self, seqs: list[Hashable], new_tokens: list[int]) -> "PagedStep":
        """The step in which seqs[b] brings its last new_tokens[b] positions (reserved already)."""
        device = self.k[0].device
        lens = torch.tensor([self._length[s] for s in seqs], dtype=torch.int64)
        cu_q = torch.tensor([0, *new_tokens], dtype=torch.int64).cumsum(0)
        layout = paged_layout(self.block_table(seqs), lens, self.page_size, self.num_pages, cu_q, device)
        return PagedStep(self, layout)


@dataclass(frozen=True)
class PagedStep:
    """What the model's layers read in one step: the pool and the step's layout over its pages."""
    pool: PagePool
    layout: PagedLayout

    def layer(self, i: int) -> "PagedLayer":
        return PagedLayer(self.pool.k[i], self.pool.v[i], self.layout)

    @property
    def positions(self) -> torch.Tensor:
        """(total_q,) each new token's position in its sequence."""
        return self.layout.positions

    @property
    def last_rows(self) -> torch.Tensor:
        """(B,) the row of each sequence's last new token: the one whose logits predict the next."""
        return self.layout.cu_seqlens_q[1:].long() - 1


@dataclass(frozen=True)
class PagedLayer:
    """One layer's pages (num_pages, page_size, H_kv, D) and the step's layout."""
    k_pages: torch.Tensor
    v_pages: torch.Tensor
    layout: PagedLayout


def pool_bytes(num_pages: int, page_size: int, n_layer: int, n_kv_head: int, head_dim: int,
               dtype: Optional[torch.dtype] = torch.float32) -> int:
    """The memory a pool of these dimensions takes (the module docstring's formula)."""
    return num_pages * page_size * n_layer * 2 * n_kv_head * head_dim * torch.empty((), dtype=dtype).element_size()
