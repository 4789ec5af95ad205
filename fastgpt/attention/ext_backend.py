"""`ext`: attention from the compiled ops of csrc/, un-fused but with the causal work skipped.

    S   = tril_o(q · kᵀ)                        causal_matmul_nt    packed (B, H, N), lower tiles only
    P   = dropout(softmax(scale · S, causal))   causal_softmax      one pass per row, mask from Philox
    out = P · v                                 causal_matmul_nn    (B, H, T_q, D), zero tiles skipped

q has T_q <= T_k rows, k and v T_k (a KV-cache decode step: T_q = 1); query i sees keys
j <= T_k - T_q + i. Grouped-query attention: k and v have H_kv heads dividing q's H, and the
matmuls read head h // (H / H_kv) for query head h in place (no copy of k or v per query head);
P and its dropout mask stay per query head. The backward is the same ops (see fastgpt/ext/ops.py):
dP = tril_o(dO·vᵀ), dv = Pᵀ·dO, the fused softmax backward, dq = dS·k, dk = dSᵀ·q, where dk and dv
sum each group of query heads in a fixed order (no atomics). Eagerly the call is one autograd node
over those op calls (fastgpt/ext/attention_function.py); under torch.compile each op is its own
node, with its own formula. The T_q × T_k matrices are materialised, once each, in the packed
layout (fastgpt/ext/layout.py: the causal part only); the dropout mask is regenerated, never stored.

Five kernel paths, best first (backend="ext" takes the first that runs the call):

    ext.cpu_split_kv    CPU decode steps over long caches (split-KV, fastgpt/attention/split_kv.py):
                        the keys in chunks run as one packed call of ext.cpu_flash's kernels,
                        merged by their lse; forward only; declines all but long caches
                        shared by several query heads (split_declines_cpu: where it measured faster)
    ext.cpu_flash       CPU float32: the flash kernels (csrc/cpu/attention_flash.cpp), no T×T matrix
                        stored, P recomputed in the backward; a C++ autograd node. Every option of
                        api.py (causal=False, window, softcap, sinks, ALiBi, return_lse), in float32
                        and bfloat16 (float32 products over converted tiles), runs its general
                        kernels (csrc/cpu/attention_flash_options.cpp; ops.attention_flash), which
                        skip the keys outside a window; so do packed sequences (varlen.py;
                        ops.attention_flash_varlen), the whole batch in one call
    ext.cpu_flash_amx   CPU bfloat16 on AMX-BF16 tiles (csrc/cpu/attention_flash_amx.cpp), the same;
                        plain causal calls only
    ext.cpu_packed      CPU float32 and bfloat16: the packed ops above (csrc/cpu/); plain causal only
    ext.cuda            CUDA: the packed ops' CUDA kernels (csrc/cuda/), where torch is a CUDA build
                        and nvcc compiled them; plain causal only

The flash paths decline plain calls with fewer key/value heads (B·H_kv) than threads (their
backward gives each thread whole heads), and ext.cpu_flash plain bfloat16 ones (the paths after it
run those); a call with options only ext.cpu_flash takes, so it never declines one. None takes a
traced call (torch.compile traces the packed ops, which take no option).
Importing this module loads nothing: the ops module (fastgpt/ext/ops.py, which loads the library)
is imported on the first call, by `prepare` before torch.compile traces one, or when
backend="auto" considers ext (`load_refusal`): a build that fails there is a reason to move on.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgpt.attention.call import OPTIONS, AttentionCall, dtype_name, forward_only_refusal
from fastgpt.attention.registry import Backend, KernelPath, choose, record, register_backend
from fastgpt.attention.split_kv import (SPLIT_KV_NOTES, SPLIT_KV_OPTIONS, split_declines_cpu, split_kv_attention,
                                       split_refusal)


def ext_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                  scale: Optional[float] = None, *, seed: Optional[int] = None, offset: int = 0,
                  path: str = "ext") -> torch.Tensor:
    """Causal attention through the ext ops with a dropout mask you can regenerate.  q (B, H, T_q, D),
    k, v (B, H_kv, T_k, D) -> (B, H, T_q, D), as causal_attention (fastgpt/attention/api.py).

    With dropout, `seed` and `offset` pick the mask (fastgpt.ext.dropout_keep_mask gives it, dense
    (B, H, T_q, T_k)); seed=None draws a seed from torch's default CPU generator, so
    torch.manual_seed makes runs repeatable. `path` is "ext" (its best path for the call) or one
    of its kernel paths.
    """
    call = AttentionCall.of(q, k, v, dropout_p, scale)
    chosen = choose(call, path)
    if chosen.backend != "ext":
        raise ValueError(f"path={path!r} is not one of ext's kernel paths")
    record(chosen)
    return _RUNNERS[chosen.name](q, k, v, call, seed, offset)


def _eager_seed(call: AttentionCall, seed: Optional[int]) -> int:
    if seed is not None:
        return seed
    if call.dropout_p == 0.0:
        return 0  # only a dropout call consumes randomness, as nn.Dropout does
    from fastgpt.ext import ops

    return int(ops.draw_seed())


def _run_flash(q, k, v, call: AttentionCall, seed: Optional[int] = None, offset: int = 0):
    """ext.cpu_flash: the plain float32 call on the causal flash op, whose autograd node is C++;
    a call with options, or in bfloat16, on the general flash op (attention_flash). Returns out,
    or (out, lse) with call.return_lse. The inputs are validated (AttentionCall.of)."""
    if not call.options and call.dtype == torch.float32:
        return _run_causal_flash(q, k, v, call, seed, offset)
    from fastgpt.ext import ops

    options = dict(causal=call.causal, window=call.window, softcap=call.softcap, sinks=call.sinks,
                   alibi_slopes=call.alibi_slopes)
    if call.paged is not None:  # a paged KV cache, read in place: forward only (_flash_refusal refuses gradients)
        out, lse = ops.attention_flash_paged(q, k, v, call.paged.block_table, call.varlen.cu_seqlens_q,
                                             call.varlen.cu_seqlens_k, call.scale, **options)
    elif call.varlen is not None:  # packed sequences: the whole batch in one call of the kernels
        out, lse = ops.attention_flash_varlen(q, k, v, call.varlen.cu_seqlens_q, call.varlen.cu_seqlens_k, call.scale,
                                              call.dropout_p, _eager_seed(call, seed), offset, **options)
    else:
        out, lse = ops.attention_flash(q, k, v, call.scale, call.dropout_p, _eager_seed(call, seed), offset, **options)
    return (out, lse) if call.return_lse else out


def _run_causal_flash(q, k, v, call: AttentionCall, seed: Optional[int] = None, offset: int = 0) -> torch.Tensor:
    """The causal flash op (float32, or bfloat16 on AMX), whose autograd node is C++."""
    from fastgpt.ext import ops  # noqa: F401  (loads the library on the first call)

    return torch.ops.fastgpt.causal_attention_flash(q, k, v, call.scale, call.dropout_p, _eager_seed(call, seed), offset)


def _run_packed(q, k, v, call: AttentionCall, seed: Optional[int] = None, offset: int = 0) -> torch.Tensor:
    """The packed ops: one autograd node eagerly, one graph node per op under torch.compile."""
    if call.compiling:
        return _attention_per_op(q, k, v, call, seed, offset)
    from fastgpt.ext.attention_function import ExtAttention  # loads the library on the first call

    # the same draw from torch's generator as _attention_per_op's, so the two paths match bit for bit
    return ExtAttention.apply(q, k, v, call.scale, call.dropout_p, _eager_seed(call, seed), offset)


def _attention_per_op(q, k, v, call: AttentionCall, seed: Optional[int], offset: int) -> torch.Tensor:
    """The ops one by one, each its own autograd node (fastgpt/ext/ops.py): what torch.compile
    traces, as single graph nodes."""
    from fastgpt.ext import ops

    T_q, T_k = call.q_len, call.kv_len
    s = ops.causal_matmul_nt(q, k)  # packed (B, H, N): one causal matrix per query head
    if seed is None and call.dropout_p > 0.0:
        # The seed stays a tensor up to an opaque op: torch.compile sees no data-dependent int
        p = ops.causal_softmax_seeded(s, T_q, T_k, call.scale, call.dropout_p, ops.draw_seed(), offset)  # packed
    else:
        p = ops.causal_softmax(s, T_q, T_k, call.scale, call.dropout_p, seed or 0, offset)  # packed (B, H, N)
    return ops.causal_matmul_nn(p, v, T_q)  # (B, H, T_q, D)


def _with_dropout_mask(q, k, v, call: AttentionCall, path: KernelPath) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, keep (B, H, T_q, T_k) bool) of one call on `path`: the mask comes from (seed, offset)
    alone, so it is rebuilt from the seed the call used. With return_lse, out is (out, lse). A
    varlen call's keep is (B, H, max_q, max_k), sequence b's in keep[b, :, :T_q[b], :T_k[b]]."""
    from fastgpt.ext import layout, ops

    seed = int(ops.draw_seed())
    if call.varlen is not None:
        seqs = call.varlen
        keep = ops.attention_varlen_dropout_keep_mask(q, seqs.cu_seqlens_q, seqs.cu_seqlens_k, seqs.max_q, seqs.max_k,
                                                      call.dropout_p, seed, causal=call.causal, window=call.window)
    elif path.name == "ext.cpu_flash" and (call.options or call.dtype != torch.float32):  # the general flash op
        keep = ops.attention_dropout_keep_mask(q, call.kv_len, call.dropout_p, seed, causal=call.causal,
                                               window=call.window)
    else:
        scores = q.new_empty((call.batch, call.heads, layout.packed_size(call.q_len, call.kv_len)))  # its shape only
        keep = ops.dropout_keep_mask(scores, call.q_len, call.kv_len, call.dropout_p, seed)
    return _RUNNERS[path.name](q, k, v, call, seed), keep


def _run_split_kv(q, k, v, call: AttentionCall, seed: Optional[int] = None, offset: int = 0):
    """ext.cpu_split_kv: a decode step's keys in chunks, one packed call of ext.cpu_flash's kernels
    over them, merged by their lse (fastgpt/attention/split_kv.py). No dropout, so no seed."""
    return split_kv_attention(q, k, v, call, "ext.cpu_flash")


def _split_kv_refusal(call: AttentionCall) -> Optional[str]:
    return split_refusal(call) or _flash_dtypes(call)


_RUNNERS = {"ext.cpu_split_kv": _run_split_kv, "ext.cpu_flash": _run_flash, "ext.cpu_flash_amx": _run_causal_flash, "ext.cpu_packed": _run_packed,
            "ext.cuda": _run_packed}


# ---- what each path runs on -------------------------------------------------------------------------

def _cpu_only(device: torch.device) -> Optional[str]:
    return None if device.type == "cpu" else f"a CPU kernel; got device type {device.type!r}"


def _cuda_only(device: torch.device) -> Optional[str]:
    return None if device.type == "cuda" else f"a CUDA kernel; got device type {device.type!r}"


def _untraced(call: AttentionCall) -> Optional[str]:
    if call.compiling:
        return "torch.compile traces ext as its packed ops (ext.cpu_packed), one graph node each"
    return None


def _flash_dtypes(call: AttentionCall) -> Optional[str]:
    if call.dtype not in (torch.float32, torch.bfloat16):
        return f"float32 and bfloat16 only; got {dtype_name(call.dtype)}"
    return _untraced(call)


def _flash_refusal(call: AttentionCall) -> Optional[str]:
    """ext.cpu_flash's: its dtypes, a traced call, and a paged call that wants gradients."""
    return _flash_dtypes(call) or forward_only_refusal(call)


def _flash_declines(call: AttentionCall) -> Optional[str]:
    """The plain calls other ext paths run better; a call with options only this path runs."""
    if call.options:
        return None
    if call.dtype == torch.bfloat16:
        return ("plain bfloat16 runs ext.cpu_flash_amx (AMX-BF16) or ext.cpu_packed; here its products are float32 "
                "GEMMs over converted tiles")
    return _fewer_heads_than_threads(call)


def _flash_bf16_amx(call: AttentionCall) -> Optional[str]:
    if call.dtype != torch.bfloat16:
        return f"bfloat16 only (float32: ext.cpu_flash); got {dtype_name(call.dtype)}"
    reason = _untraced(call)
    if reason is not None:
        return reason
    from fastgpt.ext import ops

    products = ops.cpu_bf16_products(call.head_dim)
    if products != "AMX":
        return f"its bfloat16 products run on AMX-BF16 tiles, and here they run on {products} (D={call.head_dim})"
    return None


def _flash_products(call: AttentionCall) -> Optional[str]:
    if call.dtype != torch.bfloat16:
        return None
    return "bfloat16 products as float32 GEMMs over converted tiles"


def _products(call: AttentionCall) -> Optional[str]:
    """Where a bfloat16 call's matmuls run (AMX-BF16 tiles, or float32 over converted tiles)."""
    if call.dtype != torch.bfloat16 or call.device.type != "cpu":
        return None
    from fastgpt.ext import ops

    return f"bfloat16 products on {ops.cpu_bf16_products(call.head_dim)}"


def _fewer_heads_than_threads(call: AttentionCall) -> Optional[str]:
    heads, threads = call.batch * call.kv_heads, torch.get_num_threads()
    if heads < threads:
        return (f"B·H_kv = {heads} key/value heads, fewer than the {threads} threads: the flash backward gives "
                "each thread whole heads (ext.cpu_packed splits rows)")
    return None


# ---- the backend ------------------------------------------------------------------------------------

def _unavailable_reason(device: torch.device) -> Optional[str]:
    from fastgpt.ext.build import cuda_unavailable_reason, unavailable_reason

    if device.type == "cuda":
        reason = cuda_unavailable_reason()
        return None if reason is None else f"{reason}; on CUDA use backend='sdpa' (or 'auto') meanwhile"
    if device.type != "cpu":
        return f"the ext backend has CPU and CUDA kernels only; got device type {device.type!r}"
    return unavailable_reason()


def _unsupported_reason(call: AttentionCall) -> Optional[str]:
    from fastgpt.ext.checks import dtypes_text, supported_dtypes

    if call.dtype not in supported_dtypes(call.device):
        return f"the ext kernels take {dtypes_text(call.device)} (fp32 accumulation); got {call.dtype}"
    return None


def _empty_cache() -> None:
    from fastgpt.ext import build

    if build.is_loaded():  # nothing is cached before the first call; never compile just to empty
        from fastgpt.ext import ops

        ops.empty_cache()


def _prepare(device: torch.device) -> None:
    from fastgpt.ext import load

    load()  # builds or loads the library and registers the ops: Python that dynamo should not trace


def _load_refusal(device: torch.device) -> Optional[str]:
    """Why loading the library failed (a compiler error, another process's build past the time
    limit), or None: backend="auto" then moves on. The failure is kept: later calls are refused
    at once by _unavailable_reason."""
    from fastgpt.ext import ExtensionUnavailable, build

    if build.is_loaded():
        return None
    try:
        build.load()  # the library, built on first use: what can fail
        _prepare(device)  # the ops' autograd and fakes, as the first call registers them
    except ExtensionUnavailable as e:
        return str(e)
    return _unavailable_reason(device)  # loaded: on CUDA the ops may still lack CUDA kernels


# Why the causal-only paths take no option: their layout and loops hold the causal triangle only,
# and they take the (B, H, T, D) layout only (ext.cpu_flash runs packed sequences on CPU).
_PACKED_WHY = "the packed layout holds the causal triangle and its ops the plain causal softmax only"
_PACKED_NOTES = {**{name: _PACKED_WHY for name in OPTIONS},
                 "varlen": "its ops take the (B, H, T, D) layout only; ext.cpu_flash runs packed sequences",
                 "paged": "its ops take the (B, H, T, D) layout only; ext.cpu_flash reads paged caches in place"}
_CUDA_NOTES = {**_PACKED_NOTES, "varlen": "the CUDA kernels take the (B, H, T, D) layout only",
               "paged": "the CUDA kernels take the (B, H, T, D) layout only"}
_AMX_NOTES = {**{name: "the AMX tile loop is plain causal only; ext.cpu_flash runs bfloat16 with every option "
                       "(float32 products over converted tiles)" for name in OPTIONS},
              "varlen": "the AMX tile loop takes the (B, H, T, D) layout only; ext.cpu_flash runs packed sequences "
                        "in bfloat16 (float32 products over converted tiles)",
              "paged": "the AMX tile loop takes the (B, H, T, D) layout only; ext.cpu_flash reads paged caches in "
                       "place in bfloat16"}


def _path(name: str, description: str, **checks) -> KernelPath:
    runner = _RUNNERS[name]
    return KernelPath(name, lambda q, k, v, call: runner(q, k, v, call), description, **checks)


register_backend(Backend(
    name="ext",
    description="C++/CUDA ops (csrc/): causal matmuls that skip the tiles above the diagonal and a fused "
                "scale+mask+softmax+dropout; on CPU flash kernels that store no T×T matrix and take every option",
    paths=(
        _path("ext.cpu_split_kv", "CPU decode steps over long caches (split-KV): the keys in chunks, run in parallel "
              "as one packed call of ext.cpu_flash's kernels, merged by their lse; forward only",
              unavailable_reason=_cpu_only, unsupported_reason=_split_kv_refusal, declines=split_declines_cpu,
              options=SPLIT_KV_OPTIONS, option_notes=SPLIT_KV_NOTES),
        _path("ext.cpu_flash", "CPU flash kernels, float32 (bfloat16 as float32 products) and every option: no "
              "T×T matrix stored, P recomputed in the backward, the keys outside a window skipped",
              unavailable_reason=_cpu_only, unsupported_reason=_flash_refusal, declines=_flash_declines,
              detail=_flash_products, options=frozenset(OPTIONS)),
        _path("ext.cpu_flash_amx", "CPU bfloat16 flash kernels on AMX-BF16 tiles",
              unavailable_reason=_cpu_only, unsupported_reason=_flash_bf16_amx, declines=_fewer_heads_than_threads,
              detail=_products, option_notes=_AMX_NOTES),
        _path("ext.cpu_packed", "CPU packed causal ops: the T×T weights stored over their lower half",
              unavailable_reason=_cpu_only, detail=_products, option_notes=_PACKED_NOTES),
        _path("ext.cuda", "CUDA kernels of the packed causal ops", unavailable_reason=_cuda_only,
              option_notes=_CUDA_NOTES),
    ),
    unavailable_reason=_unavailable_reason,
    unsupported_reason=_unsupported_reason,
    empty_cache=_empty_cache,
    grouped_query=True,
    prepare=_prepare,
    load_refusal=_load_refusal,
    with_dropout_mask=_with_dropout_mask,
))
