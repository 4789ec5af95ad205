"""`CausalSelfAttention`: the drop-in multi-head attention layer of the GPT."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn as nn

from fastgpt.attention.api import attention
from fastgpt.attention.paged import layout_attention, layout_write
from fastgpt.attention.registry import get_backend
from fastgpt.attention.varlen import varlen_attention
from fastgpt.model.dropout import ResidualDropout
from fastgpt.model.linear import Linear

if TYPE_CHECKING:
    from fastgpt.model.kv_cache import LayerKV
    from fastgpt.model.packing import Packing
    from fastgpt.model.paged_kv import PagedLayer


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: x (B, T, C) -> (B, T, C), C = n_embd = n_head · D.

    One fused q/k/v projection (no bias, as the lecture's key/query/value layers), attention
    through `causal_attention` with the chosen backend, then an output projection and dropout on
    the residual branch. With n_kv_head < n_head (grouped-query attention; 1: multi-query) the
    projection makes n_kv_head key and value heads, each shared by n_head / n_kv_head query heads,
    and the backend reads the shared head (no copy per query head). The backend is not a
    parameter: `set_backend` swaps it at any time without touching the weights or the state_dict.

    The attention options, off by default (then the call is the lecture's causal attention):
    `window` W lets token i attend to tokens i - W < j <= i only (transformers' sliding window);
    `softcap` c turns each score s into c·tanh(s / c); `sinks` adds `self.sinks` (n_head,), one
    learnable logit per query head that joins each softmax denominator and takes no value. The
    API's docstring (fastgpt/attention/api.py) defines each exactly.
    """

    def __init__(self, n_embd: int, n_head: int, dropout_p: float = 0.0, backend: str = "auto",
                 n_kv_head: Optional[int] = None, *, window: Optional[int] = None, softcap: float = 0.0,
                 sinks: bool = False):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be divisible by n_head={n_head}")
        if n_kv_head < 1 or n_head % n_kv_head != 0:
            raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head} (query heads per key/value head)")
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            # window=0 would become (-1, 0), the API's unbounded window: refused, not silently widened
            raise ValueError(f"window={window!r} must be an integer >= 1 (the tokens each one attends to, itself "
                             "included), or None for the whole context")
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not 0 <= softcap < math.inf:
            raise ValueError(f"softcap={softcap!r} must be a finite number >= 0 (0 turns it off)")
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.dropout_p = dropout_p
        self.window, self.softcap = window, float(softcap)
        self.qkv = Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
        self.proj = Linear(n_embd, n_embd)
        self.resid_dropout = ResidualDropout(dropout_p)
        # 0: at the start a sink weighs as much as one key whose score is 0, little beside T keys.
        # Registered as None without sinks, so the lecture's state_dict keeps its keys.
        self.register_parameter("sinks", nn.Parameter(torch.zeros(n_head)) if sinks else None)
        self.set_backend(backend)

    def set_backend(self, name: str) -> None:
        if name != "auto":
            get_backend(name)  # an unknown name fails now, not at the next forward
        self.backend = name

    def forward(self, x: torch.Tensor, kv_cache: Optional["LayerKV"] = None,
                packing: Optional["Packing"] = None, paged: Optional["PagedLayer"] = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). With `kv_cache` (generation), x holds the T newest tokens: their
        k and v are appended to the cache and their queries attend over every position it keeps
        (all of them, or with a window the last W: fastgpt/model/kv_cache.py). With `packing`, each
        row holds whole documents back to back and each token attends within its own document:
        one varlen call over the B·T tokens (fastgpt/model/packing.py). With `paged` (batched
        generation), x (1, total_q, C) holds the new tokens of many sequences back to back: their keys
        and values go into the pages, then they attend over their own sequences' pages
        (fastgpt/model/paged_kv.py)."""
        B, T, C = x.shape
        D, H, H_kv = self.head_dim, self.n_head, self.n_kv_head
        q, k, v = self.qkv(x).split([H * D, H_kv * D, H_kv * D], dim=2)  # (B, T, H·D), 2 × (B, T, H_kv·D)
        if packing is not None:
            return self.resid_dropout(self.proj(self._packed(q, k, v, packing).reshape(B, T, C)))
        if paged is not None:
            return self.resid_dropout(self.proj(self._paged(q, k, v, paged).reshape(B, T, C)))
        # (B, T, heads·D) -> (B, heads, T, D): strided views, no copy; backends accept any strides
        q = q.view(B, T, H, D).transpose(1, 2)
        k = k.view(B, T, H_kv, D).transpose(1, 2)
        v = v.view(B, T, H_kv, D).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)  # (B, H_kv, T_k, D), T_k = kept + T >= T
        # q (B, H, T, D) over T_k keys, the diagonal (and the window) bottom-right: each new token
        # sees the cache
        y = attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0, backend=self.backend,
                      **self.attention_options())
        y = y.transpose(1, 2).reshape(B, T, C)  # re-assemble the heads side by side
        return self.resid_dropout(self.proj(y))

    def _packed(self, q, k, v, packing: "Packing") -> torch.Tensor:
        """q (B, T, H·D), k, v (B, T, H_kv·D) -> (B·T, H, D): the documents as packed sequences."""
        B, T, _ = q.shape
        D, H, H_kv = self.head_dim, self.n_head, self.n_kv_head
        # (B, T, heads·D) -> (B·T, heads, D): views, the packed layout of varlen_attention
        q, k, v = q.reshape(B * T, H, D), k.reshape(B * T, H_kv, D), v.reshape(B * T, H_kv, D)
        cu = packing.cu_seqlens
        return varlen_attention(q, k, v, cu, cu, packing.max_len, packing.max_len,
                                dropout_p=self.dropout_p if self.training else 0.0, backend=self.backend,
                                **self.attention_options())

    def _paged(self, q, k, v, paged: "PagedLayer") -> torch.Tensor:
        """q (1, total_q, H·D), k, v (1, total_q, H_kv·D) -> (total_q, H, D): the new tokens' keys and
        values written to their pages first, so a sequence that shares a page another one fills in
        this step reads it filled (fastgpt/model/paged_kv.py), then one call over the pages."""
        if self.training and self.dropout_p > 0:
            raise ValueError("the paged KV cache serves generation: call model.eval() first (no dropout)")
        total = q.shape[1]
        D, H, H_kv = self.head_dim, self.n_head, self.n_kv_head
        layout_write(paged.k_pages, paged.v_pages, paged.layout, k.reshape(total, H_kv, D), v.reshape(total, H_kv, D))
        return layout_attention(q.reshape(total, H, D), paged.k_pages, paged.v_pages, paged.layout,
                                backend=self.backend, **self.attention_options())

    def attention_options(self) -> dict:
        """The options this layer passes to `fastgpt.attention.attention` besides causal=True, only
        those turned on: {} for the lecture's layer, whose call is then causal_attention's."""
        options = {}
        if self.window is not None:
            options["window"] = (self.window - 1, 0)  # keys pos - (W - 1) .. pos: W of them
        if self.softcap > 0:
            options["softcap"] = self.softcap
        if self.sinks is not None:
            options["sinks"] = self.sinks
        return options

    def extra_repr(self) -> str:
        kv = f", n_kv_head={self.n_kv_head}" if self.n_kv_head != self.n_head else ""
        options = "".join([f", window={self.window}" if self.window is not None else "",
                           f", softcap={self.softcap}" if self.softcap > 0 else "",
                           ", sinks" if self.sinks is not None else ""])
        return f"n_head={self.n_head}{kv}{options}, dropout_p={self.dropout_p}, backend={self.backend!r}"
