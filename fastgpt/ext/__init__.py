"""fastgpt's compiled ops (csrc/): causal matmuls and the fused causal softmax with dropout, on
packed causal matrices (fastgpt.ext.layout: the layout's size, pack and unpack; T_q <= T_k), and
the skinny linear layer of the decode step.

Importing this package compiles nothing; the first call of an op builds or loads the extension
(see build.py). The `ext` attention backend (fastgpt.attention.ext_backend) is built from these.
"""

from fastgpt.ext.build import ExtensionUnavailable, load, unavailable_reason
from fastgpt.ext.ops import (
    causal_matmul_nn,
    causal_matmul_nt,
    causal_matmul_tn,
    causal_softmax,
    dropout_keep_mask,
    empty_cache,
    skinny_linear,
)

__all__ = [
    "ExtensionUnavailable",
    "causal_matmul_nn",
    "causal_matmul_nt",
    "causal_matmul_tn",
    "causal_softmax",
    "dropout_keep_mask",
    "empty_cache",
    "load",
    "skinny_linear",
    "unavailable_reason",
]
