"""fastgpt's compiled ops (csrc/): causal matmuls and the fused causal softmax with dropout, on
packed causal matrices (fastgpt.ext.layout: the layout's size, pack and unpack; T_q <= T_k), and
the skinny linear layer of the decode step.

Three modules, dependencies one way (ops -> build, ops -> checks -> layout):
    build    builds and loads the library; imports nothing of fastgpt
    checks   what the ops accept (dtypes, shapes); loads nothing
    ops      loads the library on import, registers every op's fake kernel and autograd formula,
             and holds the checked wrappers exported here

Importing this package compiles nothing: the ops are attributes that import fastgpt.ext.ops on
first use (a build the first time in an environment), as does load(). The `ext` attention backend
(fastgpt.attention.ext_backend) is built from these ops.
"""

from __future__ import annotations

from fastgpt.ext.build import ExtensionUnavailable, unavailable_reason

OPS = (
    "causal_attention_flash",
    "causal_attention_flash_backward",
    "causal_attention_flash_forward",
    "causal_attention_probs",
    "causal_matmul_nn",
    "causal_matmul_nt",
    "causal_matmul_tn",
    "causal_softmax",
    "causal_softmax_seeded",
    "cpu_bf16_products",
    "cpu_isa",
    "cpu_isa_settings",
    "draw_seed",
    "dropout",
    "dropout_keep_mask",
    "empty_cache",
    "skinny_linear",
)

__all__ = ["ExtensionUnavailable", "load", "unavailable_reason", *OPS]


def load() -> str:
    """Loads the library (building it on first use in an environment) and registers the ops'
    fake kernels and autograd: what the first call of an op does. Returns "aot" or "jit"; raises
    ExtensionUnavailable saying what to install."""
    from fastgpt.ext import ops

    return ops.LIBRARY


def __getattr__(name: str):
    if name in OPS:
        from fastgpt.ext import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'fastgpt.ext' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *OPS})
