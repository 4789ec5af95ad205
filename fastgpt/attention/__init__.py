"""Causal self-attention behind one API, with interchangeable backends (see api.py, registry.py)."""

# The built-in backends register themselves on import, in this order (the order of listings);
# each module is cheap: triton and the C++ extension load on a backend's first call.
from fastgpt.attention import naive  # noqa: F401  isort: skip
from fastgpt.attention import sdpa  # noqa: F401  isort: skip
from fastgpt.attention import ext_backend  # noqa: F401  isort: skip
from fastgpt.attention import triton_backend  # noqa: F401  isort: skip
from fastgpt.attention.api import causal_attention, select_backend, validate_inputs
from fastgpt.attention.module import CausalSelfAttention
from fastgpt.attention.naive import naive_attention
from fastgpt.attention.registry import (
    Backend,
    available_backends,
    backend_names,
    get_backend,
    register_backend,
)

__all__ = [
    "Backend",
    "CausalSelfAttention",
    "available_backends",
    "backend_names",
    "causal_attention",
    "get_backend",
    "naive_attention",
    "register_backend",
    "select_backend",
    "validate_inputs",
]
