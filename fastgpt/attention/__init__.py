"""Causal self-attention behind one API, with interchangeable backends (see api.py, registry.py)."""

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
