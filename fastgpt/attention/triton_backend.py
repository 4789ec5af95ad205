"""`triton`: the fused attention kernels in kernels/flash_attention*.py (forward, backward, dropout),
with every option of the API (bidirectional, a window, soft-capping, sinks, ALiBi, the lse, packed
sequences, a paged KV cache read in place), each a compile-time switch of the kernels; a packed
(varlen) call is one launch of each kernel for all its sequences.

This module only registers the backend and answers whether it can run; the host code beside the
kernels (launchers, the torch.library op: fastgpt.kernels.flash_attention_ops), and with it triton,
is imported on the first call, so `import fastgpt` does not pay for it.

On a CUDA GPU the kernels are compiled; on CPU tensors they run in Triton's interpreter, which must
be switched on (TRITON_INTERPRET=1) before triton is first imported. It is not in any `auto` order:
on CPU the interpreter is far slower than sdpa, and on CUDA no benchmark has been run yet.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
from typing import Optional

import torch

from fastgpt.attention.call import OPTIONS, AttentionCall, call_options, dtype_name, forward_only_refusal
from fastgpt.attention.registry import Backend, KernelPath, register_backend
from fastgpt.attention.split_kv import (SPLIT_KV_NOTES, SPLIT_KV_OPTIONS, split_declines_gpu, split_kv_attention,
                                       split_refusal)
from fastgpt.kernels.flash_attention_configs import MAX_HEAD_DIM, MIN_HEAD_DIM  # plain Python: no triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """Whether Triton runs its kernels in the interpreter (read once, when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# The triton releases the kernels are tested with, [oldest, first untested): pyproject.toml's range,
# both ends run by tests/triton_versions.py. A newer triton is let run (a config that spills under
# its ptxas is dropped where it runs); an older one is refused, untested.
TESTED_TRITON = ((3, 6), (3, 10))


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    """The installed triton's version, from its metadata: triton itself is not imported."""
    return importlib.metadata.version("triton")


def unavailable_reason(device: torch.device) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton; wheels exist for Linux x86-64)"
    try:
        version = _triton_version()
    except importlib.metadata.PackageNotFoundError:  # a triton built from source, without metadata
        version = None
    oldest, untested = (".".join(map(str, v)) for v in TESTED_TRITON)
    if version and tuple(int(x) for x in re.findall(r"\d+", version)[:2]) < TESTED_TRITON[0]:
        return (f"triton {version} is older than {oldest}, the oldest release fastgpt's kernels are tested with; "
                f"pip install 'triton>={oldest},<{untested}'")
    if device.type == "cpu":
        if not interpreting():
            return ("CPU tensors need Triton's interpreter: set the environment variable TRITON_INTERPRET=1 "
                    "before starting Python (it is read when triton is first imported); expect it to be slow")
        return None
    if device.type != "cuda":
        return f"the Triton kernels run on CUDA GPUs (or on CPU in the interpreter), not on {device.type}"
    if not interpreting() and torch.cuda.get_device_capability(device)[0] < 8:
        major, minor = torch.cuda.get_device_capability(device)
        return f"compute capability {major}.{minor} is below the 8.0 (Ampere) that the Triton kernels target"
    return None


def unsupported_reason(call: AttentionCall) -> Optional[str]:
    if call.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(dtype_name(d) for d in SUPPORTED_DTYPES)
        return f"dtype {dtype_name(call.dtype)} is not supported; supported: {names}"
    D = call.head_dim
    if not MIN_HEAD_DIM <= D <= MAX_HEAD_DIM:
        return (f"head dim D={D} is not supported: the Triton kernels take {MIN_HEAD_DIM} <= D <= {MAX_HEAD_DIM} "
                f"(tl.dot's smallest tile is 16 wide; above {MAX_HEAD_DIM} the tiles outgrow the registers)")
    if max(call.batch, call.heads) > 65535:  # they index the grid's y and z dimensions
        return f"B={call.batch} and H={call.heads} must each be at most 65535 (CUDA's grid limit in y and z)"
    if call.dtype == torch.bfloat16 and interpreting():
        return "Triton's interpreter computes bfloat16 wrongly (it stores it as uint16); use float16/float32, or a GPU"
    return None


def _options(call: AttentionCall) -> dict:
    """The call's options as triton_attention takes them (none for a plain causal call)."""
    return call_options(call) if call.options else {}


def _triton_path(q, k, v, call: AttentionCall):
    from fastgpt.kernels.flash_attention_ops import triton_attention

    return triton_attention(q, k, v, call.dropout_p, call.scale, **_options(call), varlen=call.varlen,
                            paged=call.paged)


def _with_dropout_mask(q, k, v, call: AttentionCall, path) -> tuple:
    """(out, keep (B, H, T_q, T_k) bool): the kernels' mask is a function of the seed, rebuilt from
    it (the same function of (seed, b·H + h, query, key) whatever the options); out is (out, lse)
    with return_lse. A varlen call's keep is (B, H, max_q, max_k), sequence b's in
    keep[b, :, :T_q[b], :T_k[b]]: the kernels count a packed sequence's queries and keys from 0."""
    from fastgpt.kernels.flash_attention_ops import draw_seed, dropout_keep_mask, triton_attention

    seed = draw_seed(q.device)
    out = triton_attention(q, k, v, call.dropout_p, call.scale, seed, **_options(call), varlen=call.varlen)
    packed = () if call.varlen is None else (call.varlen.cu_seqlens_q, call.varlen.cu_seqlens_k)
    return out, dropout_keep_mask(seed, (call.batch, call.heads, call.q_len), call.dropout_p, call.kv_len, *packed)


def _split_kv_path(q, k, v, call: AttentionCall):
    return split_kv_attention(q, k, v, call, "triton")


def _split_kv_refusal(call: AttentionCall) -> Optional[str]:
    return split_refusal(call) or unsupported_reason(call)


DESCRIPTION = ("fused flash-attention kernel in Triton: online softmax, causal or banded block skipping, "
               "in-kernel dropout")
SPLIT_DESCRIPTION = ("decode steps over long caches (split-KV): the keys in chunks, run in parallel as one packed "
                     "launch of the triton kernels, merged by their lse; forward only")

register_backend(Backend(
    name="triton",
    paths=(KernelPath("triton.split_kv", _split_kv_path, SPLIT_DESCRIPTION, unsupported_reason=_split_kv_refusal,
                      declines=split_declines_gpu, options=SPLIT_KV_OPTIONS, option_notes=SPLIT_KV_NOTES),
           KernelPath("triton", _triton_path, DESCRIPTION, unsupported_reason=forward_only_refusal,
                      options=frozenset(OPTIONS))),
    description=DESCRIPTION,
    unavailable_reason=unavailable_reason,
    unsupported_reason=unsupported_reason,
    emulated=lambda device: device.type == "cpu" and interpreting(),
    grouped_query=True,
    with_dropout_mask=_with_dropout_mask,
))
