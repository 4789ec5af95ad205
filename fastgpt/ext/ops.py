"""The fastgpt ops from Python: checked wrappers, and every op's autograd formula and fake kernel.

Importing this module loads the compiled library (fastgpt.ext.build.load: the first use in an
environment builds it) and then registers, at import, what torch needs beyond the C++
schemas: the shape-only fake kernels (torch.compile, opcheck) and the autograd formulas. Python's
module cache makes that happen once per process. `import fastgpt.ext` does not import this module;
the first use of an op does (fastgpt/ext/__init__.py).

Causal matrices are packed (B, H, N) tensors (fastgpt/ext/layout.py, csrc/causal_layout.h):
T_q <= T_k, o = T_k - T_q, query i sees keys j <= o + i (the diagonal aligned bottom-right).
Grouped-query attention: the key/value side has H_kv heads, H_kv dividing H, and query head h
reads key/value head h // G, G = H / H_kv, in place (H_kv = H: plain multi-head attention).

    causal_matmul_nt(a, b)        tril_o(a · bᵀ)    (B,H,T_q,D) × (B,H_kv,T_k,D) -> packed (B,H,N)
    causal_matmul_nn(p, x, T_q)   tril_o(p) · x     packed (B,H,N) × (B,H_kv,T_k,D) -> (B,H,T_q,D)
    causal_matmul_tn(p, x, T_k, kv_heads=None)
                                  tril_o(p)ᵀ · x    packed (B,H,N) × (B,H,T_q,D) -> (B,H_kv,T_k,D),
                                                    each group of G query heads summed in a fixed
                                                    order (kv_heads=None: H_kv = H)
    causal_softmax(scores, T_q, T_k, scale, dropout_p, seed, offset)
                                  dropout(softmax(scale · scores, causal))   packed -> packed
    causal_softmax_seeded(...)    the same with the seed a 0-dim int64 tensor (draw_seed()), for
                                  torch.compile: an int drawn at run time would break the graph
    dropout_keep_mask(scores, T_q, T_k, dropout_p, seed, offset)
                                  the dense (B,H,T_q,T_k) bool mask causal_softmax draws (causal_attention_with_mask)
    causal_attention_flash_forward(q, k, v, scale, dropout_p, seed, offset) -> (out, lse)
    causal_attention_flash_backward(dout, q, k, v, out, lse, scale, dropout_p, seed, offset) -> (dq, dk, dv)
                                  the whole attention on CPU, no T×T matrix stored: float32, or
                                  bfloat16 on AMX (cpu_bf16_products)
    causal_attention_flash(q, k, v, scale, dropout_p, seed, offset) -> out
                                  the two as one op with a C++ autograd node: what the eager ext
                                  attention runs there (the kernel paths ext.cpu_flash, ext.cpu_flash_amx)
    attention_flash(q, k, v, scale, dropout_p, seed, offset, *, causal, window, softcap, sinks,
                    alibi_slopes) -> (out, lse)
                                  every option of fastgpt.attention.attention on CPU, float32 or
                                  bfloat16, T_q and T_k any unless causal; differentiable in q, k,
                                  v and sinks (a Python autograd Function over attention_flash_forward
                                  and attention_flash_backward); lse (B,H,T_q) float32, detached
    attention_dropout_keep_mask(q, T_k, causal, window_left, window_right, dropout_p, seed, offset)
                                  the dense (B,H,T_q,T_k) bool mask attention_flash draws, False
                                  outside each query's window
    attention_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, dropout_p, seed, offset, *,
                           causal, window, softcap, sinks, alibi_slopes) -> (out, lse)
                                  attention_flash over packed sequences in one call: q (total_q,H,D),
                                  k, v (total_k,H_kv,D), cu_seqlens (B+1,) int32; out (total_q,H,D),
                                  lse (H,total_q) (fastgpt/attention/varlen.py's contract)
    attention_varlen_dropout_keep_mask(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)
                                  its (B,H,max_q,max_k) bool mask, sequence b's in [b, :, :T_q[b], :T_k[b]]
    attention_flash_paged(q, k_pages, v_pages, block_table, cu_seqlens_q, cu_seqlens_k, scale, *,
                          causal, window, softcap, sinks, alibi_slopes) -> (out, lse)
                                  attention_flash_varlen's forward over a paged KV cache, the pages
                                  (num_pages,page_size,H_kv,D) read in place (fastgpt/attention/paged.py);
                                  forward only
    skinny_linear(x, weight, bias)  x · weightᵀ + bias for x of few rows (decode), float32 CPU,
                                  inference only (fastgpt/model/linear.py decides when the model uses it)

A packed output is written everywhere (zeros above the diagonal and in the padding); a packed input
is read at j <= o + i only. The gradients are the same ops again: d tril_o(a·bᵀ) = (tril_o(g)·b,
tril_o(g)ᵀ·a), and so on, so the backward skips the same tiles as the forward; the gradient of a
shared key/value head is tn's sum over its group (never atomics: bit-equal on every run). The softmax's backward
is causal_softmax_backward (from its output P) without dropout, causal_softmax_dropout_backward (P
recomputed from the scores, the mask regenerated from (seed, offset), never stored) with it.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgpt.ext import build, layout
from fastgpt.ext.checks import (
    check_attention_options,
    check_kv_heads,
    check_matrix_rows,
    check_packed,
    check_same,
    check_seed_tensor,
    check_skinny_linear_args,
    check_softmax_args,
    check_tensor,
)

LIBRARY = build.load()  # "aot" or "jit"; from here on the C++ ops exist, with their kernels
_ops = torch.ops.fastgpt

# ---- the ops defined in Python: the seeded softmax ------------------------------------------------
# The C++ softmax takes its dropout seed as an int. Drawn at run time (`int(torch.randint(...))`)
# that int is data-dependent and dynamo breaks the graph there; these two take the seed as a 0-dim
# tensor and read the int inside, where no tracer looks. Same kernels, same mask for the same seed.

torch.library.define("fastgpt::causal_softmax_seeded",
                     "(Tensor scores, int T_q, int T_k, float scale, float dropout_p, Tensor seed, "
                     "int offset) -> Tensor")
torch.library.define("fastgpt::causal_softmax_seeded_backward",
                     "(Tensor grad, Tensor scores, int T_q, int T_k, float scale, float dropout_p, Tensor seed, "
                     "int offset) -> Tensor")


torch.library.define("fastgpt::dropout_seeded", "(Tensor x, float p, Tensor seed) -> Tensor")


@torch.library.impl("fastgpt::causal_softmax_seeded", "CompositeExplicitAutograd")
def _softmax_seeded(scores, T_q, T_k, scale, dropout_p, seed, offset):
    return _ops.causal_softmax(scores, T_q, T_k, scale, dropout_p, int(seed), offset)


@torch.library.impl("fastgpt::causal_softmax_seeded_backward", "CompositeExplicitAutograd")
def _softmax_seeded_backward(grad, scores, T_q, T_k, scale, dropout_p, seed, offset):
    return _ops.causal_softmax_dropout_backward(grad, scores, T_q, T_k, scale, dropout_p, int(seed), offset)


def draw_seed() -> torch.Tensor:
    """A 0-dim int64 seed from torch's default CPU generator: torch.manual_seed makes it repeatable."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


@torch.library.impl("fastgpt::dropout_seeded", "CompositeExplicitAutograd")
def _dropout_seeded(x, p, seed):
    return _ops.dropout(x, p, int(seed), 0)


# ---- public wrappers --------------------------------------------------------------------------------

def _check_nt(a: torch.Tensor, b: torch.Tensor) -> None:
    check_tensor("a", a, "(B, H, T_q, D)")
    check_tensor("b", b, "(B, H_kv, T_k, D)")
    check_same("b", b, "a", a)
    if a.shape[0] != b.shape[0] or a.shape[3] != b.shape[3]:
        raise ValueError(f"b has shape {tuple(b.shape)} but a has shape {tuple(a.shape)}; "
                         "a (B, H, T_q, D) and b (B, H_kv, T_k, D) must share B and D")
    check_kv_heads(a.shape[1], b.shape[1], "b", "a")
    layout.check_lengths(a.shape[2], b.shape[2])


def causal_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tril_o(a · bᵀ): a (B, H, T_q, D), b (B, H_kv, T_k, D) with H_kv dividing H -> packed (B, H, N);
    query head h reads b's head h // (H / H_kv). Never computed above the diagonal."""
    _check_nt(a, b)
    return _ops.causal_matmul_nt(a, b)


def causal_attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, dropout_p: float = 0.0, seed: int = 0,
                           offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, S): P = causal_softmax(causal_matmul_nt(q, k), ..., scale, dropout_p, seed, offset) bit for bit,
    computed per row block (CPU only: csrc/cpu/attention_fused.cpp); S = the scores, which the
    dropout backward needs, with dropout_p > 0, else an empty tensor (never stored)."""
    _check_nt(q, k)
    check_softmax_args(scale, dropout_p, seed, offset)
    return _ops.causal_attention_probs(q, k, float(scale), float(dropout_p), seed, offset)


def _check_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _check_nt(q, k)
    check_tensor("v", v, "(B, H_kv, T_k, D)")
    check_same("v", v, "k", k)
    if v.shape != k.shape:
        raise ValueError(f"v has shape {tuple(v.shape)} but k has shape {tuple(k.shape)}; k and v must be "
                         "(B, H_kv, T_k, D) alike")
    if q.device.type != "cpu" or not (q.dtype == torch.float32 or (q.dtype == torch.bfloat16
                                                                    and _ops.cpu_bf16_uses_amx(q.shape[-1]))):
        raise ValueError(f"q is {q.dtype} on {q.device} with head dim {q.shape[-1]}; the flash kernels take CPU "
                         "tensors in float32, or in bfloat16 where cpu_bf16_products(head_dim) is 'AMX'")


def causal_attention_flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                                   dropout_p: float = 0.0, seed: int = 0,
                                   offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): the causal attention of q (B, H, T_q, D) over k, v (B, H_kv, T_k, D) on CPU, in
    float32 (csrc/cpu/attention_flash.cpp) or in bfloat16 on AMX (csrc/cpu/attention_flash_amx.cpp),
    without storing any T×T matrix; lse (B, H, T_q, float32) is each row's log-sum-exp of
    scale · q·kᵀ, which the backward needs. Dropout draws causal_softmax's mask. out is a
    (B, H, T_q, D) view of (B, T_q, H, D) memory."""
    _check_flash(q, k, v)
    check_softmax_args(scale, dropout_p, seed, offset)
    return _ops.causal_attention_flash_forward(q, k, v, float(scale), float(dropout_p), seed, offset)


def causal_attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0,
                           seed: int = 0, offset: int = 0) -> torch.Tensor:
    """out of causal_attention_flash_forward as one differentiable op: its autograd node is C++
    (csrc/cpu/attention_flash.cpp), which saves out and lse and runs the flash backward. What the eager ext
    attention calls on CPU in float32 (fastgpt/attention/ext_backend.py)."""
    _check_flash(q, k, v)
    check_softmax_args(scale, dropout_p, seed, offset)
    return _ops.causal_attention_flash(q, k, v, float(scale), float(dropout_p), seed, offset)


def causal_attention_flash_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                    out: torch.Tensor, lse: torch.Tensor, scale: float, dropout_p: float = 0.0,
                                    seed: int = 0, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of causal_attention_flash_forward from its (out, lse) and the same arguments;
    the probabilities are recomputed row block by row block, the dropout mask regenerated, and each
    query's Σ dP∘P taken as dout·out."""
    _check_flash(q, k, v)
    for name, t in (("dout", dout), ("out", out)):
        check_tensor(name, t, "(B, H, T_q, D)")
        check_same(name, t, "q", q)
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has shape {tuple(q.shape)}; {name} must be "
                             "shaped like the forward's output")
    B, H, T_q, _ = q.shape
    if not isinstance(lse, torch.Tensor) or lse.shape != (B, H, T_q) or lse.dtype != torch.float32:
        got = f"{tuple(lse.shape)} {lse.dtype}" if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must be the forward's float32 (B, H, T_q) = {(B, H, T_q)}; got {got}")
    check_softmax_args(scale, dropout_p, seed, offset)
    return _ops.causal_attention_flash_backward(dout, q, k, v, out, lse, float(scale), float(dropout_p), seed, offset)


class _AttentionFlash(torch.autograd.Function):
    """attention_flash_forward and _backward as one node (their varlen ops when `packed` holds
    (cu_seqlens_q, cu_seqlens_k)): gradients for q, k, v and sinks; lse is an output without one
    (flash-attention's convention)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, alibi_slopes, args, packed=()):
        sinks32 = None if sinks is None else sinks.detach().float().contiguous()
        forward_op = _ops.attention_flash_varlen_forward if packed else _ops.attention_flash_forward
        out, lse = forward_op(q, k, v, *packed, sinks32, alibi_slopes, *args)
        ctx.save_for_backward(q, k, v, out, lse, sinks32, alibi_slopes, *packed)
        ctx.args = args
        ctx.sinks_dtype = None if sinks is None else sinks.dtype
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks32, slopes, *packed = ctx.saved_tensors
        backward_op = _ops.attention_flash_varlen_backward if packed else _ops.attention_flash_backward
        dq, dk, dv, dsinks = backward_op(dout, q, k, v, out, lse, *packed, sinks32, slopes, *ctx.args)
        dsinks = dsinks.to(ctx.sinks_dtype) if ctx.needs_input_grad[3] else None
        return dq, dk, dv, dsinks, None, None, None


def attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0,
                    seed: int = 0, offset: int = 0, *, causal: bool = True, window=(-1, 0), softcap: float = 0.0,
                    sinks: Optional[torch.Tensor] = None,
                    alibi_slopes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): the general attention (fastgpt/attention/api.py) of q (B, H, T_q, D) over k, v
    (B, H_kv, T_k, D) on CPU, float32 or bfloat16 (csrc/cpu/attention_flash_options.cpp), with no
    T×T matrix stored. window (left, right): -1 unbounded (a causal call's right is 0); softcap 0
    is off; sinks (H,) and alibi_slopes (H,) or (B, H) floating. out (B, H, T_q, D) is
    differentiable in q, k, v and sinks (dsinks in sinks' dtype); lse (B, H, T_q) float32 (the sink
    in it, -inf for a row that sees no key) is not. Dropout draws attention_dropout_keep_mask's mask."""
    check_attention_options(q, k, v, causal, window, softcap, sinks, alibi_slopes)
    check_softmax_args(scale, dropout_p, seed, offset)
    slopes = (None if alibi_slopes is None
              else alibi_slopes.detach().float().expand(q.shape[0], q.shape[1]).contiguous())  # (B, H)
    args = (float(scale), causal, window[0], 0 if causal else window[1], float(softcap), float(dropout_p), seed, offset)
    return _AttentionFlash.apply(q, k, v, sinks, slopes, args)


def attention_dropout_keep_mask(q: torch.Tensor, T_k: int, dropout_p: float, seed: int, offset: int = 0, *,
                                causal: bool = True, window=(-1, 0)) -> torch.Tensor:
    """The dense (B, H, T_q, T_k) bool keep mask attention_flash(q, k, v, ..., dropout_p, seed,
    offset, causal=..., window=...) applies; False outside each query's window. Only q's shape
    (B, H, T_q, D) is used."""
    check_tensor("q", q, "(B, H, T_q, D)")
    check_softmax_args(1.0, dropout_p, seed, offset)
    return _ops.attention_dropout_keep_mask(q, T_k, causal, window[0], 0 if causal else window[1], float(dropout_p),
                                            seed, offset)


def _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window, softcap, sinks, alibi_slopes) -> int:
    """attention_flash_varlen's arguments: q (total_q, H, D), k and v (total_k, H_kv, D), cu_seqlens
    (B + 1,) int32 on the CPU (their values the C++ op checks); the options as attention_flash takes
    them, alibi_slopes (H,) or (B, H). Returns B."""
    for name, t, dims in (("q", q, "(total_q, H, D)"), ("k", k, "(total_k, H_kv, D)"), ("v", v, "(total_k, H_kv, D)")):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shown = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-dim tensor {dims} in a varlen call; got {shown}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not (isinstance(cu, torch.Tensor) and cu.dtype == torch.int32 and cu.dim() == 1 and cu.numel() >= 2
                and cu.device.type == "cpu"):
            shown = f"{cu.dtype} {tuple(cu.shape)} on {cu.device}" if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise ValueError(f"{name} must be a (B + 1,) int32 tensor on the CPU, B >= 1; got {shown}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries and cu_seqlens_k {cu_seqlens_k.numel()}; "
                         "both must be (B + 1,) for the same B sequences")
    views = [t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)]  # (1, H, total, D)
    check_attention_options(*views, False, window, softcap, sinks, None)  # causality is per sequence: the op checks it
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False; got {causal!r}")
    B, H = cu_seqlens_q.numel() - 1, q.shape[1]
    if alibi_slopes is not None and not (isinstance(alibi_slopes, torch.Tensor) and alibi_slopes.is_floating_point()
                                         and tuple(alibi_slopes.shape) in ((H,), (B, H))):
        shown = (f"{alibi_slopes.dtype} {tuple(alibi_slopes.shape)}" if isinstance(alibi_slopes, torch.Tensor)
                 else type(alibi_slopes).__name__)
        raise ValueError(f"alibi_slopes must be a floating tensor of shape ({H},) or ({B}, {H}); got {shown}")
    return B


def attention_flash_paged(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, block_table: torch.Tensor,
                          cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, scale: float, *, causal: bool = True,
                          window=(-1, 0), softcap: float = 0.0, sinks: Optional[torch.Tensor] = None,
                          alibi_slopes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): attention_flash_varlen's forward with the keys and values in a paged cache, read in
    place: k_pages, v_pages (num_pages, page_size, H_kv, D) contiguous; sequence b's key j at
    k_pages[block_table[b, j // page_size], j % page_size], block_table (B, max_pages) int32;
    cu_seqlens_k (B + 1,) int32 counts each sequence's keys (the op checks every page it reads lies
    in the pool). Forward only: no input may need a gradient (fastgpt.attention.paged_attention
    gathers the pages, on a path with a backward, for that)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_pages, v_pages, sinks)):
        raise ValueError("attention_flash_paged is forward only: q, k_pages, v_pages and sinks must not require grad "
                         "(run it under torch.no_grad(), or use paged_attention with backend='sdpa' or 'naive')")
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not (isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_contiguous()):
            shown = f"{tuple(t.shape)} with strides {t.stride()}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a contiguous (num_pages, page_size, H_kv, D) tensor; got {shown}")
    B = _check_varlen(q, k_pages.flatten(0, 1), v_pages.flatten(0, 1), cu_seqlens_q, cu_seqlens_k, causal, window,
                      softcap, sinks, alibi_slopes)
    if not (isinstance(block_table, torch.Tensor) and block_table.dtype == torch.int32 and block_table.dim() == 2
            and block_table.shape[0] == B and block_table.device.type == "cpu"):
        shown = (f"{block_table.dtype} {tuple(block_table.shape)} on {block_table.device}"
                 if isinstance(block_table, torch.Tensor) else type(block_table).__name__)
        raise ValueError(f"block_table must be a (B, max_pages) int32 tensor on the CPU, B = {B}; got {shown}")
    sinks32 = None if sinks is None else sinks.detach().float().contiguous()
    slopes = (None if alibi_slopes is None
              else alibi_slopes.detach().float().expand(B, q.shape[1]).contiguous())  # (B, H)
    return _ops.attention_flash_paged_forward(q, k_pages, v_pages, block_table.contiguous(), cu_seqlens_q,
                                              cu_seqlens_k, sinks32, slopes, float(scale), causal, window[0],
                                              0 if causal else window[1], float(softcap))


def attention_flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                           cu_seqlens_k: torch.Tensor, scale: float, dropout_p: float = 0.0, seed: int = 0,
                           offset: int = 0, *, causal: bool = True, window=(-1, 0), softcap: float = 0.0,
                           sinks: Optional[torch.Tensor] = None,
                           alibi_slopes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse): attention_flash over packed sequences, the whole batch in one call of the kernels.
    q (total_q, H, D), k, v (total_k, H_kv, D) (views of a fused projection are read in place);
    cu_seqlens_q, cu_seqlens_k (B + 1,) int32, sequence b owning query rows cu_seqlens_q[b] :
    cu_seqlens_q[b + 1] and key rows cu_seqlens_k[b] : cu_seqlens_k[b + 1], each the call of
    attention_flash on its own (fastgpt/attention/varlen.py); alibi_slopes (H,) or (B, H).
    out (total_q, H, D) is differentiable in q, k, v and sinks; lse (H, total_q) float32 is not.
    Dropout draws attention_varlen_dropout_keep_mask's mask."""
    B = _check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window, softcap, sinks, alibi_slopes)
    check_softmax_args(scale, dropout_p, seed, offset)
    slopes = (None if alibi_slopes is None
              else alibi_slopes.detach().float().expand(B, q.shape[1]).contiguous())  # (B, H)
    args = (float(scale), causal, window[0], 0 if causal else window[1], float(softcap), float(dropout_p), seed, offset)
    packed = (cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous())
    return _AttentionFlash.apply(q, k, v, sinks, slopes, args, packed)


def attention_varlen_dropout_keep_mask(q: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                                       max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, seed: int,
                                       offset: int = 0, *, causal: bool = True, window=(-1, 0)) -> torch.Tensor:
    """The (B, H, max_seqlen_q, max_seqlen_k) bool keep mask attention_flash_varlen(q, ..., dropout_p,
    seed, offset, causal=..., window=...) applies, sequence b's in [b, :, :T_q[b], :T_k[b]] and False
    elsewhere: the (B, H, max_q, max_k) call's mask, sequence by sequence. Only q's shape
    (total_q, H, D) is used; max_seqlen_q/k at least the longest sequences."""
    check_softmax_args(1.0, dropout_p, seed, offset)
    return _ops.attention_varlen_dropout_keep_mask(q, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(),
                                                   max_seqlen_q, max_seqlen_k, causal, window[0],
                                                   0 if causal else window[1], float(dropout_p), seed, offset)


def causal_matmul_nn(p: torch.Tensor, x: torch.Tensor, T_q: int) -> torch.Tensor:
    """tril_o(p) · x: p packed (B, H, N) for (T_q, T_k), x (B, H_kv, T_k, D) with H_kv dividing H ->
    (B, H, T_q, D); query head h reads x's head h // (H / H_kv)."""
    check_tensor("x", x, "(B, H_kv, T_k, D)")
    check_matrix_rows(p, x, T_q, x.shape[2], "(B, H_kv, T_k, D)", x_grouped=True)
    return _ops.causal_matmul_nn(p, x, T_q)


def causal_matmul_tn(p: torch.Tensor, x: torch.Tensor, T_k: int, kv_heads: Optional[int] = None) -> torch.Tensor:
    """tril_o(p)ᵀ · x summed over each group of G = H / kv_heads query heads: p packed (B, H, N) for
    (T_q, T_k), x (B, H, T_q, D) -> (B, kv_heads, T_k, D); output head j sums query heads
    [j·G, (j + 1)·G), in that order. kv_heads=None means H (no sum)."""
    check_tensor("x", x, "(B, H, T_q, D)")
    check_matrix_rows(p, x, x.shape[2], T_k, "(B, H, T_q, D)", x_grouped=False)
    if kv_heads is not None:
        check_kv_heads(x.shape[1], kv_heads, "kv_heads", "x")
    return _ops.causal_matmul_tn(p, x, T_k, kv_heads)


def causal_softmax(scores: torch.Tensor, T_q: int, T_k: int, scale: float, dropout_p: float = 0.0, seed: int = 0,
                   offset: int = 0) -> torch.Tensor:
    """dropout(softmax(scale · scores) under the causal mask): packed (B, H, N) -> packed (B, H, N).

    Row i uses its keys j <= o + i only. Dropped weights are zero, kept ones scaled by
    1/(1 - dropout_p); the mask is a function of (seed, offset, element) (csrc/philox.h).
    """
    check_packed("scores", scores, T_q, T_k)
    check_softmax_args(scale, dropout_p, seed, offset)
    return _ops.causal_softmax(scores, T_q, T_k, float(scale), float(dropout_p), seed, offset)


def causal_softmax_seeded(scores: torch.Tensor, T_q: int, T_k: int, scale: float, dropout_p: float,
                          seed: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """causal_softmax with `seed` a 0-dim int64 tensor (draw_seed()): packed (B, H, N) -> packed
    (B, H, N), the same output and mask as causal_softmax(..., int(seed), offset). Under
    torch.compile it is one node, with no graph break for the seed."""
    check_packed("scores", scores, T_q, T_k)
    check_softmax_args(scale, dropout_p, 0, offset)
    check_seed_tensor(seed)
    return _ops.causal_softmax_seeded(scores, T_q, T_k, float(scale), float(dropout_p), seed, offset)


def dropout_keep_mask(scores: torch.Tensor, T_q: int, T_k: int, dropout_p: float, seed: int,
                      offset: int = 0) -> torch.Tensor:
    """The dense (B, H, T_q, T_k) bool keep mask that causal_softmax(scores, T_q, T_k, ..., dropout_p,
    seed, offset) applies; False above the diagonal. Only scores' shape (B, H, N) is used."""
    check_packed("scores", scores, T_q, T_k)
    check_softmax_args(1.0, dropout_p, seed, offset)
    return _ops.dropout_keep_mask(scores, T_q, T_k, float(dropout_p), seed, offset)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for an x (..., K) of few rows: weight (N, K) -> (..., N).

    Streams weight once at memory bandwidth (csrc/cpu/skinny_linear.cpp); the time grows with the
    rows of x, so it pays off for the few rows of a decode step only (fastgpt/model/linear.py). float32
    CPU tensors; no backward.
    """
    check_skinny_linear_args(x, weight, bias)
    return _ops.skinny_linear(x, weight, bias)


def dropout(x: torch.Tensor, p: float, seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x ∘ keep / (1 - p) for a CPU x (..., C) in float32 or bfloat16, the keep mask of each row of
    the last dim drawn from the Philox stream of `seed` (a 0-dim int64 tensor; draw_seed() when None,
    so torch.manual_seed makes it repeatable). The residual branches' dropout, at vector speed
    (csrc/cpu/dropout.cpp); its gradient is the same mask applied to the gradient, never stored."""
    if not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        shown = f"a {x.dtype} tensor on {x.device}" if isinstance(x, torch.Tensor) else repr(x)
        raise ValueError(f"x must be a float32 or bfloat16 CPU tensor; got {shown}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim (each row of its last dim draws one row of the mask); got 0 dims")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p must be in [0, 1); got {p!r}")
    seed = draw_seed() if seed is None else seed
    check_seed_tensor(seed)
    return _ops.dropout_seeded(x, float(p), seed)


def cpu_bf16_products(head_dim: int) -> str:
    """Where the CPU kernels' bfloat16 matmuls of head dim `head_dim` run in this process: "AMX"
    (csrc/cpu/amx_matmul.cpp: the CPU has AMX-BF16, head_dim is even, cpu_isa's amx switch is on) or
    "float32 tiles" (converted to float32 and through the float32 GEMM)."""
    return "AMX" if _ops.cpu_bf16_uses_amx(head_dim) else "float32 tiles"


def empty_cache() -> None:
    """Returns the CPU kernels' cached causal-matrix buffers to the OS (see csrc/cpu/buffer_pool.h;
    FASTGPT_EXT_CACHE_MB caps the cache, default 1024, 0 disables it)."""
    _ops.empty_cache()


# ---- autograd formulas ------------------------------------------------------------------------------

def _setup_save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])  # T_q and T_k are read off their shapes in the backward


# Grouped-query shapes: a, p, grad of nt and nn have H heads, b and x of nn H_kv. A key/value head
# serves G query heads, so its gradient sums theirs: tn with kv_heads = H_kv does that sum.

def _backward_nt(ctx, grad):  # out = tril_o(a·bᵀ) (B,H,N), a (B,H,T_q,D), b (B,H_kv,T_k,D)
    a, b = ctx.saved_tensors
    da = _ops.causal_matmul_nn(grad, b, a.shape[2]) if ctx.needs_input_grad[0] else None  # tril_o(g)·b (B,H,T_q,D)
    db = (_ops.causal_matmul_tn(grad, a, b.shape[2], b.shape[1])  # Σ_group tril_o(g)ᵀ·a (B,H_kv,T_k,D)
          if ctx.needs_input_grad[1] else None)
    return da, db


def _backward_nn(ctx, grad):  # out = tril_o(p)·x (B,H,T_q,D), p (B,H,N), x (B,H_kv,T_k,D)
    p, x = ctx.saved_tensors
    dp = _ops.causal_matmul_nt(grad, x) if ctx.needs_input_grad[0] else None  # tril_o(g·xᵀ) (B,H,N)
    dx = (_ops.causal_matmul_tn(p, grad, x.shape[2], x.shape[1])  # Σ_group tril_o(p)ᵀ·g (B,H_kv,T_k,D)
          if ctx.needs_input_grad[1] else None)
    return dp, dx, None


def _backward_tn(ctx, grad):  # out = Σ_group tril_o(p)ᵀ·x (B,H_kv,T_k,D), p (B,H,N), x (B,H,T_q,D)
    p, x = ctx.saved_tensors
    dp = _ops.causal_matmul_nt(x, grad) if ctx.needs_input_grad[0] else None  # tril_o(x·gᵀ) (B,H,N)
    dx = _ops.causal_matmul_nn(p, grad, x.shape[2]) if ctx.needs_input_grad[1] else None  # tril_o(p)·g (B,H,T_q,D)
    return dp, dx, None, None


def _setup_softmax(ctx, inputs, output):
    scores, T_q, T_k, scale, dropout_p, seed, offset = inputs
    ctx.args = (T_q, T_k, scale, dropout_p, seed, offset)
    # Without dropout the output is P itself: keep it, and let the scores go. With dropout P is
    # recomputed from the scores and the mask regenerated from (seed, offset).
    ctx.save_for_backward(output if dropout_p == 0.0 else scores)


def _backward_softmax(ctx, grad):
    (saved,) = ctx.saved_tensors
    T_q, T_k, scale, dropout_p, seed, offset = ctx.args
    if dropout_p == 0.0:
        ds = _ops.causal_softmax_backward(grad, saved, T_q, T_k, scale)
    else:
        ds = _ops.causal_softmax_dropout_backward(grad, saved, T_q, T_k, scale, dropout_p, seed, offset)
    return ds, None, None, None, None, None, None


def _setup_softmax_seeded(ctx, inputs, output):
    scores, T_q, T_k, scale, dropout_p, seed, offset = inputs
    ctx.args = (T_q, T_k, scale, dropout_p, offset)
    ctx.save_for_backward(scores, seed)  # the seed stays a tensor in the backward too


def _backward_softmax_seeded(ctx, grad):
    scores, seed = ctx.saved_tensors
    T_q, T_k, scale, dropout_p, offset = ctx.args
    ds = _ops.causal_softmax_seeded_backward(grad, scores, T_q, T_k, scale, dropout_p, seed, offset)
    return ds, None, None, None, None, None, None


# ---- fake kernels: the output's shape, dtype and device, for torch.compile and opcheck -------------

def _fake_check_same(*tensors):
    ref = tensors[0]
    for t in tensors[1:]:
        if t.device != ref.device or t.dtype != ref.dtype:
            raise RuntimeError(f"fastgpt ops: all tensors must share one device and dtype; got {t.device}/{t.dtype} "
                               f"and {ref.device}/{ref.dtype}")


def _fake_packed(p, T_q, T_k):
    if p.dim() != 3 or p.shape[2] != layout.packed_size(T_q, T_k):
        raise RuntimeError(f"fastgpt ops: a packed (T_q, T_k) = ({T_q}, {T_k}) matrix must be (B, H, "
                           f"{layout.packed_size(T_q, T_k)}); got {tuple(p.shape)}")
    return p.new_empty(p.shape)


def _fake_kv_heads(H, H_kv, kv_name, q_name):
    if H_kv != H and (H_kv < 1 or H % H_kv != 0):
        raise RuntimeError(f"fastgpt ops: {kv_name} has {H_kv} heads and {q_name} has {H}: the key/value heads "
                           "H_kv must divide the query heads H")


def _fake_nt(a, b):  # a (B, H, T_q, D), b (B, H_kv, T_k, D) -> (B, H, N)
    _fake_check_same(a, b)
    _fake_kv_heads(a.shape[1], b.shape[1], "b", "a")
    B, H, T_q, _ = a.shape
    return a.new_empty((B, H, layout.packed_size(T_q, b.shape[2])))


def _fake_nn(p, x, T_q):  # p (B, H, N), x (B, H_kv, T_k, D) -> (B, H, T_q, D)
    _fake_check_same(p, x)
    _fake_packed(p, T_q, x.shape[2])
    _fake_kv_heads(p.shape[1], x.shape[1], "x", "p")
    B, H, _ = p.shape
    return x.new_empty((B, H, T_q, x.shape[3]))


def _fake_tn(p, x, T_k, kv_heads=None):  # p (B, H, N), x (B, H, T_q, D) -> (B, H_kv, T_k, D)
    _fake_check_same(p, x)
    _fake_packed(p, x.shape[2], T_k)
    B, H, _, D = x.shape
    H_kv = H if kv_heads is None else kv_heads
    _fake_kv_heads(H, H_kv, "the output (kv_heads)", "x")
    return x.new_empty((B, H_kv, T_k, D))


def _fake_softmax(scores, T_q, T_k, scale, dropout_p, seed, offset):
    return _fake_packed(scores, T_q, T_k)


def _fake_softmax_backward(grad, probs, T_q, T_k, scale):
    _fake_check_same(grad, probs)
    return _fake_packed(probs, T_q, T_k)


def _fake_softmax_dropout_backward(grad, scores, T_q, T_k, scale, dropout_p, seed, offset):
    _fake_check_same(grad, scores)
    return _fake_packed(scores, T_q, T_k)


def _fake_mask(scores, T_q, T_k, dropout_p, seed, offset):
    _fake_packed(scores, T_q, T_k)
    return scores.new_empty((scores.shape[0], scores.shape[1], T_q, T_k), dtype=torch.bool)


def _fake_attention_probs(q, k, scale, dropout_p, seed, offset):  # -> (P, S or empty)
    _fake_check_same(q, k)
    _fake_kv_heads(q.shape[1], k.shape[1], "k", "q")
    B, H, T_q, _ = q.shape
    probs = q.new_empty((B, H, layout.packed_size(T_q, k.shape[2])))
    return probs, (probs.new_empty(probs.shape) if dropout_p > 0.0 else q.new_empty((0,)))


def _fake_attention_grad_scores(dout, v, saved, scale, dropout_p, seed, offset):
    _fake_check_same(dout, v, saved)
    return _fake_packed(saved, dout.shape[2], v.shape[2])


def _heads_interleaved(like, B, H, T, D):  # (B, H, T, D) over (B, T, H, D) memory, as the kernels allocate
    return like.new_empty((B, T, H, D)).transpose(1, 2)


def _fake_attention_flash_forward(q, k, v, scale, dropout_p, seed, offset):  # -> (out, lse)
    _fake_check_same(q, k, v)
    _fake_kv_heads(q.shape[1], k.shape[1], "k", "q")
    B, H, T_q, D = q.shape
    return _heads_interleaved(q, B, H, T_q, D), q.new_empty((B, H, T_q), dtype=torch.float32)


def _fake_attention_flash(q, k, v, scale, dropout_p, seed, offset):
    return _fake_attention_flash_forward(q, k, v, scale, dropout_p, seed, offset)[0]


def _fake_attention_flash_backward(dout, q, k, v, out, lse, scale, dropout_p, seed, offset):  # -> (dq, dk, dv)
    _fake_check_same(dout, q, k, v, out)
    _fake_kv_heads(q.shape[1], k.shape[1], "k", "q")
    B, H, T_q, D = q.shape
    H_kv, T_k = k.shape[1], k.shape[2]
    return (_heads_interleaved(q, B, H, T_q, D), _heads_interleaved(q, B, H_kv, T_k, D),
            _heads_interleaved(q, B, H_kv, T_k, D))


def _fake_attention_flash_options_forward(q, k, v, sinks, alibi_slopes, *args):  # -> (out, lse)
    return _fake_attention_flash_forward(q, k, v, *args[:1], 0.0, 0, 0)


def _fake_attention_flash_options_backward(dout, q, k, v, out, lse, sinks, alibi_slopes, *args):  # (dq, dk, dv, dsinks)
    dq, dk, dv = _fake_attention_flash_backward(dout, q, k, v, out, lse, *args[:1], 0.0, 0, 0)
    return dq, dk, dv, lse.new_empty((q.shape[1] if sinks is not None else 0,))


def _fake_attention_mask(q, T_k, causal, window_left, window_right, dropout_p, seed, offset):
    return q.new_empty((*q.shape[:3], T_k), dtype=torch.bool)


def _fake_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes, *args):  # -> (out, lse)
    _fake_check_same(q, k, v)
    _fake_kv_heads(q.shape[1], k.shape[1], "k", "q")
    total_q, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((H, total_q), dtype=torch.float32)


def _fake_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, sinks, alibi_slopes, *args):
    _fake_check_same(dout, q, k, v, out)  # -> (dq, dk, dv, dsinks)
    _fake_kv_heads(q.shape[1], k.shape[1], "k", "q")
    return (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(k.shape),
            lse.new_empty((q.shape[1] if sinks is not None else 0,)))


def _fake_varlen_mask(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *args):
    return q.new_empty((cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k), dtype=torch.bool)


def _fake_dropout(x, p, seed, offset=0):
    return x.new_empty(x.shape)


def _setup_dropout(ctx, inputs, output):
    x, p, seed = inputs
    ctx.p = p
    ctx.save_for_backward(seed)


def _backward_dropout(ctx, grad):  # y = x ∘ m: dx = grad ∘ m, the same mask from the same seed
    (seed,) = ctx.saved_tensors
    return _ops.dropout_seeded(grad, ctx.p, seed), None, None


def _fake_skinny_linear(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ---- registration: every op, one table ---------------------------------------------------------------

FAKES = {
    "causal_matmul_nt": _fake_nt,
    "causal_matmul_nn": _fake_nn,
    "causal_matmul_tn": _fake_tn,
    "causal_softmax": _fake_softmax,
    "causal_softmax_backward": _fake_softmax_backward,
    "causal_softmax_dropout_backward": _fake_softmax_dropout_backward,
    "causal_softmax_seeded": _fake_softmax,
    "causal_softmax_seeded_backward": _fake_softmax_dropout_backward,
    "dropout_keep_mask": _fake_mask,
    "skinny_linear": _fake_skinny_linear,
    "dropout": _fake_dropout,
    "causal_attention_probs": _fake_attention_probs,
    "causal_attention_grad_scores": _fake_attention_grad_scores,
    "causal_attention_flash_forward": _fake_attention_flash_forward,
    "causal_attention_flash_backward": _fake_attention_flash_backward,
    "causal_attention_flash": _fake_attention_flash,
    "attention_flash_forward": _fake_attention_flash_options_forward,
    "attention_flash_backward": _fake_attention_flash_options_backward,
    "attention_dropout_keep_mask": _fake_attention_mask,
    "attention_flash_varlen_forward": _fake_varlen_forward,
    "attention_flash_varlen_backward": _fake_varlen_backward,
    "attention_varlen_dropout_keep_mask": _fake_varlen_mask,
    "dropout_seeded": _fake_dropout,
}
# (backward, setup_context); the ops not listed have no backward (their gradients are not needed),
# except causal_attention_flash, whose autograd node is C++ (csrc/registration.cpp).
AUTOGRAD = {
    "causal_matmul_nt": (_backward_nt, _setup_save_inputs),
    "causal_matmul_nn": (_backward_nn, _setup_save_inputs),
    "causal_matmul_tn": (_backward_tn, _setup_save_inputs),
    "causal_softmax": (_backward_softmax, _setup_softmax),
    "causal_softmax_seeded": (_backward_softmax_seeded, _setup_softmax_seeded),
    "dropout_seeded": (_backward_dropout, _setup_dropout),
}
for _name, _fake in FAKES.items():
    torch.library.register_fake(f"fastgpt::{_name}")(_fake)
for _name, (_backward, _setup) in AUTOGRAD.items():
    torch.library.register_autograd(f"fastgpt::{_name}", _backward, setup_context=_setup)


# ---- instruction-set switches -----------------------------------------------------------------------

CPU_ISA_FEATURES = ("amx", "avx512bf16")  # the switches of csrc/cpu/isa.h, in the ops' order


class cpu_isa:
    """Narrows the instruction sets the CPU kernels may use within a `with` block, and restores the
    previous settings when the block exits, by an exception too:

        with fastgpt.ext.cpu_isa(amx=False):    # bfloat16 products as float32 GEMMs on converted tiles
            ...

    It is for comparing the variants of a kernel on one machine, in one process: benchmarks and
    parity tests. Each switch is on by default, and a switch on uses its feature only where this CPU
    and build have it (cpu_isa_settings() says which do); None leaves a switch as it is.

    amx         AMX-BF16 tiles for the bfloat16 products of the causal matmuls and the bfloat16
                flash kernels (csrc/cpu/amx_matmul.cpp, attention_flash_amx.cpp); off, the products
                run as float32 GEMMs on converted tiles and bfloat16 attention takes the materialised
                kernels. cpu_bf16_products(head_dim) reports which products run.
    avx512bf16  AVX512-BF16's conversion to bfloat16 in the bfloat16 flash kernels (so only where
                they run, on AMX); off, ATen's integer rounding, which gives the same bits.

    The switches are process-wide, not per thread: change them between kernel calls, not while
    another thread runs the ops. A block may nest in another; the inner one restores the outer's
    settings.
    """

    def __init__(self, amx: Optional[bool] = None, avx512bf16: Optional[bool] = None):
        for name, value in (("amx", amx), ("avx512bf16", avx512bf16)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{name} must be True, False or None (leave it as it is); got {value!r}")
        self.amx, self.avx512bf16 = amx, avx512bf16
        self._previous: list[tuple[bool, bool]] = []

    def __enter__(self) -> "cpu_isa":
        self._previous.append(tuple(_ops.set_cpu_isa(self.amx, self.avx512bf16)))
        return self

    def __exit__(self, *exc_info) -> None:
        _ops.set_cpu_isa(*self._previous.pop())


def cpu_isa_settings() -> dict[str, dict[str, bool]]:
    """The CPU kernels' instruction-set switches now, one entry per feature of cpu_isa ("amx",
    "avx512bf16"): "allowed" (the switch), "available" (this CPU and build have the feature) and
    "used" (both: what the kernels run)."""
    allowed = _ops.set_cpu_isa()  # no arguments: a read
    available = _ops.cpu_isa_available()
    return {name: {"allowed": bool(on), "available": bool(has), "used": bool(on and has)}
            for name, on, has in zip(CPU_ISA_FEATURES, allowed, available)}
