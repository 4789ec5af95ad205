"""fastgpt: the GPT of "Let's build GPT" with its causal self-attention in swappable fused kernels.

The public names load on first use (PEP 562): `import fastgpt`, and the `fastgpt` command that
starts with it, do not pay for torch until something needs it, so the command can answer Ctrl-C
during that import in one line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastgpt.attention import (
        available_backends,
        backend_names,
        causal_attention,
        select_kernel,
    )
    from fastgpt.model import GPT, CausalSelfAttention

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "CausalSelfAttention": "fastgpt.model",
    "GPT": "fastgpt.model",
    "available_backends": "fastgpt.attention",
    "backend_names": "fastgpt.attention",
    "causal_attention": "fastgpt.attention",
    "select_kernel": "fastgpt.attention",
}

__all__ = [
    "CausalSelfAttention",
    "GPT",
    "available_backends",
    "backend_names",
    "causal_attention",
    "select_kernel",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value  # the next lookup finds it without coming here
        return value
    if not name.startswith("_"):
        # a submodule, as `import fastgpt; fastgpt.attention.registry` found it when this file imported it
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
