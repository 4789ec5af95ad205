"""fastgpt: the GPT of "Let's build GPT" with its causal self-attention in swappable fused kernels."""

from fastgpt.attention import (
    CausalSelfAttention,
    available_backends,
    backend_names,
    causal_attention,
    select_backend,
)

__version__ = "0.1.0"

__all__ = [
    "CausalSelfAttention",
    "available_backends",
    "backend_names",
    "causal_attention",
    "select_backend",
]
