"""Attention behind one API, with interchangeable backends and kernel paths (api.py,
call.py, registry.py)."""

# The built-in backends register themselves on import, in this order (the order of listings);
# each module is cheap: triton and the C++ extension load on a path's first call.
from fastgpt.attention import naive  # noqa: F401  isort: skip
from fastgpt.attention import sdpa  # noqa: F401  isort: skip
from fastgpt.attention import ext_backend  # noqa: F401  isort: skip
from fastgpt.attention import triton_backend  # noqa: F401  isort: skip
from fastgpt.attention.api import (
    attention,
    attention_with_mask,
    causal_attention,
    causal_attention_with_mask,
    select_kernel,
)
from fastgpt.attention.call import OPTIONS, AttentionCall, validate_inputs
from fastgpt.attention.naive import naive_attention, naive_varlen_attention
from fastgpt.attention.padding import padded_attention
from fastgpt.attention.paged import PAGE_SIZES, paged_attention, write_pages
from fastgpt.attention.registry import (
    Backend,
    KernelPath,
    available_backends,
    backend_names,
    get_backend,
    get_path,
    kernel_path_names,
    kernels_ran,
    refusal,
    register_backend,
)
from fastgpt.attention.varlen import (
    VarlenLayout,
    flash_attn_varlen_func,
    varlen_attention,
    varlen_attention_with_mask,
)

__all__ = [
    "OPTIONS",
    "AttentionCall",
    "Backend",
    "KernelPath",
    "attention",
    "attention_with_mask",
    "available_backends",
    "backend_names",
    "causal_attention",
    "causal_attention_with_mask",
    "get_backend",
    "get_path",
    "kernel_path_names",
    "kernels_ran",
    "naive_attention",
    "naive_varlen_attention",
    "padded_attention",
    "paged_attention",
    "write_pages",
    "PAGE_SIZES",
    "refusal",
    "register_backend",
    "select_kernel",
    "validate_inputs",
    "VarlenLayout",
    "flash_attn_varlen_func",
    "varlen_attention",
    "varlen_attention_with_mask",
]
