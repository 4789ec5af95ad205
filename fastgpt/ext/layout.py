"""The packed causal layout in Python: its size (for the fake kernels), and pack and unpack between
it and dense (..., T_q, T_k) matrices, for reading what the packed ops return.

The formula is csrc/causal_layout.h's (see csrc/README.md, "Contracts"); a test checks the two agree.
Queries T_q <= T_k keys, o = T_k - T_q, query i sees keys j <= o + i. Rows come in blocks of 64;
block r is a dense (rows_r × W_r) row-major matrix, W_r = the keys its last row sees rounded up to
a multiple of 64, and the blocks follow each other in a (B, H, N) tensor:

    element (i, j), j <= o + i, at [b, h, start_r + (i - 64·r) · W_r + j],  r = i // 64
"""

from __future__ import annotations

import torch

BLOCK = 64


def _roundup(n):
    return (n + BLOCK - 1) // BLOCK * BLOCK


def check_lengths(T_q: int, T_k: int) -> None:
    for name, value in (("T_q", T_q), ("T_k", T_k)):  # SymInts too: the fake kernels size with these
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}")
    if T_q > T_k:
        raise ValueError(f"T_q = {T_q} > T_k = {T_k}: the causal ops need at most as many queries as keys (T_q <= T_k)")


def block_start(r, T_q: int, T_k: int):
    """Offset of row block r (an int or an int tensor): Σ_{r' < r} 64 · W_r', every earlier block full."""
    return BLOCK * (BLOCK * r * (r + 1) // 2 + _roundup(T_k - T_q) * r)


def packed_size(T_q: int, T_k: int) -> int:
    """N, the elements per (b, h) of a packed (T_q, T_k) causal matrix."""
    check_lengths(T_q, T_k)
    if T_q == 0:
        return 0
    last = (T_q - 1) // BLOCK
    return block_start(last, T_q, T_k) + (T_q - BLOCK * last) * _roundup(T_k)


def row_offsets(T_q: int, T_k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_q,) int64: where each row begins, and its stride W_r."""
    check_lengths(T_q, T_k)
    i = torch.arange(T_q, device=device)
    r = i // BLOCK
    rows = torch.clamp(T_q - BLOCK * r, max=BLOCK)
    stride = _roundup(T_k - T_q + BLOCK * r + rows)
    return block_start(r, T_q, T_k) + (i - BLOCK * r) * stride, stride


def _index(T_q: int, T_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The visible elements (j <= o + i) in row-major order: (their flat dense index i·T_k + j,
    their packed index), two int64 vectors of one length."""
    start, _ = row_offsets(T_q, T_k, device)
    i, j = torch.arange(T_q, device=device)[:, None], torch.arange(T_k, device=device)[None, :]
    visible = j <= (T_k - T_q) + i  # (T_q, T_k)
    return (i * T_k + j)[visible], (start[:, None] + j)[visible]


def unpack(packed: torch.Tensor, T_q: int, T_k: int) -> torch.Tensor:
    """(..., N) -> dense (..., T_q, T_k), zeros at j > o + i; differentiable."""
    _check_n(packed, T_q, T_k)
    flat, where = _index(T_q, T_k, packed.device)
    dense = packed.new_zeros(*packed.shape[:-1], T_q * T_k)
    dense[..., flat] = packed[..., where]
    return dense.view(*packed.shape[:-1], T_q, T_k)


def pack(dense: torch.Tensor, T_q: int, T_k: int, fill: float = 0.0) -> torch.Tensor:
    """Dense (..., T_q, T_k) -> (..., N), its entries at j <= o + i; `fill` elsewhere (padding too:
    tests pass NaN there, which no kernel may read); differentiable."""
    if tuple(dense.shape[-2:]) != (T_q, T_k):
        raise ValueError(f"dense has shape {tuple(dense.shape)}; its last two dims must be (T_q, T_k) = {(T_q, T_k)}")
    flat, where = _index(T_q, T_k, dense.device)
    packed = dense.new_full((*dense.shape[:-2], packed_size(T_q, T_k)), fill)
    packed[..., where] = dense.reshape(*dense.shape[:-2], T_q * T_k)[..., flat]
    return packed


def _check_n(packed: torch.Tensor, T_q: int, T_k: int) -> None:
    n = packed_size(T_q, T_k)
    if packed.shape[-1] != n:
        raise ValueError(f"packed has {packed.shape[-1]} elements per (b, h) but (T_q, T_k) = ({T_q}, {T_k}) "
                         f"needs N = {n} (csrc/causal_layout.h)")
