"""The KV cache of generation: each layer's keys and values kept between steps, and when to rebuild them.

This is the cache of one batch generated in lockstep (`generate`, `fastgpt sample --prompt`): one
contiguous buffer per layer. Many prompts of different lengths at once, finishing at different
times, use the paged cache instead (fastgpt/model/paged_kv.py, fastgpt/model/batched.py).

Without a cache, every new token re-runs the whole context through the model (the lecture's
`generate`). With one, a prompt pass (prefill) stores every layer's k and v, and each later step
runs only the newest token (decode): its query attends over the cached keys, T_q = 1 < T_k, with
the causal diagonal aligned bottom-right (fastgpt.causal_attention).

    KVCache(n_layer, block_size, window=None)
                                       per-layer buffers of block_size positions (or, with a sliding
                                       window W < block_size, of W: rolling), allocated lazily
      .layers[i].append(k, v)          stores (B, H, T, D) as the next positions, returns the keys and
                                       values the new queries attend over
      .length                          positions seen (the absolute position of the next token)
    plan_step(T, cache, policy)        what the model gets this step: the window to prefill, or decode
                                       (LanguageModel.prefill / decode_one_token, fastgpt/model/gpt.py)

Positions are absolute (nanoGPT's learned position embedding): the token at window position p gets
embedding p. Once the text outgrows block_size, the uncached model sees the window
idx[:, -block_size:] whose first token is at position 0, so every token's position, hence every
layer's k and v, changes each step: nothing cached survives the shift. Two policies:

  "exact"   (default) once the context exceeds block_size, re-prefill the cropped window at every
            step: the same window, positions and math as the uncached model, so the same tokens
            (up to floating-point rounding of the different matmul shapes). Past block_size it is
            as slow as no cache; within block_size each step is a decode.
  "window"  approximate: when the cache is full, rebuild it from the last block_size // 2 tokens
            (a prefill of block_size // 2) and decode from there: one prefill per block_size // 2 + 1
            new tokens instead of one per token. Each token then sees between block_size // 2 and
            block_size tokens of context where the uncached model sees block_size: different text
            (with less context, usually slightly worse), much faster. Identical to "exact" while
            the text fits in block_size.

A model with a sliding window of W (token i attends to tokens i - W < j <= i) needs only the last
W keys and values: each layer's cache rolls over them, so its memory is W positions, not
block_size. A step's new tokens attend over the kept keys followed by their own, the window
aligned bottom-right (fastgpt/attention/api.py), and only the last W of those are kept; a prefill
longer than W keeps its last W. The positions stay absolute and the policies above unchanged:
learned position embeddings still end the text the model can take at block_size, and past it
"exact" re-prefills (T·W attention work, the cache still W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

CACHE_POLICIES = ("exact", "window")


class LayerKV:
    """One layer's keys and values: positions [length - kept, length) in (B, H, capacity, D)
    buffers, capacity = block_size, or with a sliding window W < block_size, W (rolling)."""

    def __init__(self, block_size: int, window: Optional[int] = None):
        self.block_size = block_size
        self.capacity = block_size if window is None else min(window, block_size)
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None
        self.length = 0  # positions seen: the absolute position of the next token

    @property
    def rolling(self) -> bool:
        """Whether the buffers keep only the last `capacity` positions of the text."""
        return self.capacity < self.block_size

    @property
    def kept(self) -> int:
        """Positions held: the last min(length, capacity)."""
        return min(self.length, self.capacity)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k, v (B, H, T, D) as positions [length, length + T) -> the keys and values the T
        new queries attend over, (B, H, kept + T, D): every cached position and the new ones (views
        of the buffers, no copy), or, rolling, the kept ones and the new ones (a new tensor)."""
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.block_size:
            raise ValueError(f"the KV cache holds {self.length} of {self.block_size} positions; "
                             f"{T} more would exceed block_size: rebuild it (see fastgpt.model.kv_cache)")
        if self.k is None or self.k.shape != (B, H, self.capacity, D) or self.k.dtype != k.dtype \
                or self.k.device != k.device:
            self.k = k.new_empty((B, H, self.capacity, D))
            self.v = v.new_empty((B, H, self.capacity, D))
        if self.rolling:
            return self._roll(k, v, end)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def _roll(self, k: torch.Tensor, v: torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """append() for a rolling cache: the kept positions then the new ones, in order, of which
        the last `capacity` are kept (in order too: the window's mask is by index, bottom-right)."""
        kept = self.kept
        k_all = torch.cat([self.k[:, :, :kept], k], dim=2)  # (B, H, kept + T, D)
        v_all = torch.cat([self.v[:, :, :kept], v], dim=2)
        keep = min(end, self.capacity)
        self.k[:, :, :keep] = k_all[:, :, -keep:]
        self.v[:, :, :keep] = v_all[:, :, -keep:]
        self.length = end
        return k_all, v_all


class KVCache:
    """Every layer's LayerKV for one generation (one batch of sequences)."""

    def __init__(self, n_layer: int, block_size: int, window: Optional[int] = None):
        self.block_size = block_size
        self.layers = [LayerKV(block_size, window) for _ in range(n_layer)]

    @property
    def length(self) -> int:
        """Positions cached: the absolute position the next token fed to the model gets."""
        return self.layers[0].length

    def reset(self) -> None:
        """Empties the cache (the buffers are kept for the next prefill)."""
        for layer in self.layers:
            layer.length = 0


@dataclass(frozen=True)
class Step:
    """What to feed the model this step: the last `window` tokens after emptying the cache
    (prefill), or, with window == 0, only the newest token on top of the cache (decode)."""
    window: int

    @property
    def prefill(self) -> bool:
        return self.window > 0


def plan_step(T: int, cache: KVCache, policy: str) -> Step:
    """The step that predicts what follows a text of T tokens. Steps come one per token, so the
    cache holds the `cache.length` tokens just before the newest one (or is empty)."""
    block = cache.block_size
    if cache.length == 0:
        return Step(min(T, block))  # the first step: the uncached window
    if policy == "exact":
        # decoding is exact only while nothing was cropped: the uncached window starts at token 0
        return Step(0) if T <= block else Step(block)
    if policy == "window":
        if cache.length < block:
            return Step(0)  # room for the newest token
        return Step(max(1, block // 2))  # full: rebuild from the last half window
    raise ValueError(f"cache_policy must be one of {', '.join(map(repr, CACHE_POLICIES))}; got {policy!r}")
