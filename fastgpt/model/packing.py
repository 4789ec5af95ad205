"""`Packing`: whole documents packed back to back into the rows of a (B, T) batch.

    row 0   a a a a b b c c c c      documents a (4), b (2), c (4)
    row 1   d d d d d d e e e e      documents d (6), e (4)

Each token attends within its own document only, and its position (for the position embedding)
counts from its document's first token: the model sees each document as if it were alone, with no
padding spent. Attention runs as one varlen call over the B·T tokens (fastgpt/attention/varlen.py),
whose cu_seqlens are the documents' edges in the flattened batch:

    cu_seqlens  [0, 4, 6, 10, 16, 20]
    positions   row 0: 0 1 2 3 0 1 0 1 2 3     row 1: 0 1 2 3 4 5 0 1 2 3

`from_lengths` builds it from each row's document lengths (the data loader's packing);
`from_position_ids` from positions that restart at 0 where a document starts (transformers'
padding-free convention, DataCollatorWithFlattening).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Packing:
    cu_seqlens: torch.Tensor  # (N + 1,) int32: document n owns flattened tokens cu_seqlens[n]:cu_seqlens[n + 1]
    positions: torch.Tensor  # (B, T) int64: each token's position within its document
    max_len: int  # the longest document

    @property
    def documents(self) -> int:
        return self.cu_seqlens.numel() - 1

    @classmethod
    def from_lengths(cls, lengths: list[list[int]], T: int, device=None) -> "Packing":
        """Row b holds documents of lengths[b], in order, filling its T tokens exactly."""
        for b, row in enumerate(lengths):
            if sum(row) != T or any(n < 1 for n in row):
                raise ValueError(f"row {b}'s document lengths {row} must be >= 1 each and sum to T={T}")
        flat = [n for row in lengths for n in row]
        cu = torch.tensor([0, *flat], dtype=torch.int64).cumsum(0)
        positions = torch.cat([torch.arange(n) for n in flat]).view(len(lengths), T)
        return cls(cu.to(device=device, dtype=torch.int32), positions.to(device), max(flat))

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> "Packing":
        """position_ids (B, T): each row counts 0, 1, 2, ... and restarts at 0 where a document starts."""
        if position_ids.dim() != 2 or position_ids.dtype.is_floating_point:
            raise ValueError(f"position_ids must be a (B, T) integer tensor; got {tuple(position_ids.shape)} "
                             f"{position_ids.dtype}")
        B, T = position_ids.shape
        flat = position_ids.reshape(-1)
        starts = flat == 0
        starts[::T] = True  # every row starts a document, whatever its first position says
        follows = flat[1:] == flat[:-1] + 1
        if not bool((starts[1:] | follows).all()):
            bad = int((~(starts[1:] | follows)).nonzero()[0]) + 1
            raise ValueError(f"position_ids must count up by 1 within a document and restart at 0; token "
                             f"{bad % T} of row {bad // T} is {int(flat[bad])} after {int(flat[bad - 1])}")
        edges = torch.cat([starts.nonzero().flatten(), torch.tensor([B * T], device=flat.device)])
        lengths = edges.diff()
        return cls(edges.to(torch.int32), position_ids.long() - position_ids.long().view(-1)[starts].repeat_interleave(
            lengths).view(B, T), int(lengths.max()))
