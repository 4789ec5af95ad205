"""`sdpa`: PyTorch's fused `scaled_dot_product_attention`, the peer to beat.

PyTorch picks its own kernel inside: FlashAttention-2 or memory-efficient attention on CUDA, a
flash-style kernel on CPU without dropout, and the unfused math path on CPU with dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastgpt.attention.registry import Backend, register_backend


def _sdpa_backend(q, k, v, dropout_p: float, scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)


register_backend(Backend(
    name="sdpa",
    fn=_sdpa_backend,
    description="torch.nn.functional.scaled_dot_product_attention(is_causal=True)",
))
