"""The fastgpt ops from Python: checked wrappers, autograd, and shape-only fake kernels.

Causal matrices are packed (B, H, N) tensors (fastgpt/ext/layout.py, csrc/causal_layout.h):
T_q <= T_k, o = T_k - T_q, query i sees keys j <= o + i (the diagonal aligned bottom-right).

    causal_matmul_nt(a, b)        tril_o(a · bᵀ)    (B,H,T_q,D) × (B,H,T_k,D) -> packed
    causal_matmul_nn(p, x, T_q)   tril_o(p) · x     packed × (B,H,T_k,D) -> (B,H,T_q,D)
    causal_matmul_tn(p, x, T_k)   tril_o(p)ᵀ · x    packed × (B,H,T_q,D) -> (B,H,T_k,D)
    causal_softmax(scores, T_q, T_k, scale, dropout_p, seed, offset)
                                  dropout(softmax(scale · scores, causal))   packed -> packed
    dropout_keep_mask(scores, T_q, T_k, dropout_p, seed, offset)
                                  the dense (B,H,T_q,T_k) bool mask causal_softmax draws (testing hook)
    skinny_linear(x, weight, bias)  x · weightᵀ + bias for x of few rows (decode), float32 CPU,
                                  inference only (fastgpt/linear.py decides when the model uses it)

A packed output is written everywhere (zeros above the diagonal and in the padding); a packed input
is read at j <= o + i only. The gradients are the same ops again: d tril_o(a·bᵀ) = (tril_o(g)·b,
tril_o(g)ᵀ·a), and so on, so the backward skips the same tiles as the forward. The softmax's backward
is causal_softmax_backward (from its output P) without dropout, causal_softmax_dropout_backward (P
recomputed from the scores, the mask regenerated from (seed, offset), never stored) with it.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgpt.ext import layout
from fastgpt.ext.build import load

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)  # every device; float16 too on CUDA


def supported_dtypes(device: torch.device) -> tuple[torch.dtype, ...]:
    """The dtypes the ops take on `device`: the CPU kernels have no float16 path, the CUDA ones do."""
    return SUPPORTED_DTYPES + ((torch.float16,) if device.type == "cuda" else ())


def dtypes_text(device: torch.device) -> str:
    return " and ".join(str(d).removeprefix("torch.") for d in supported_dtypes(device)) + f" on {device.type}"


def _ops():
    load()
    return torch.ops.fastgpt


# ---- checks of the Python wrappers (the C++ ops check again with TORCH_CHECK) ----------------------

def _check_tensor(name: str, t, dims: str, rank: int = 4) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {dims}; got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims {dims}; got {t.dim()} dims with shape {tuple(t.shape)}")
    if t.dtype not in supported_dtypes(t.device):
        raise ValueError(f"{name} has dtype {t.dtype}; the ext ops support {dtypes_text(t.device)}")


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all tensors must share one dtype")


def _check_packed(name: str, p, T_q, T_k) -> None:
    layout.check_lengths(T_q, T_k)
    _check_tensor(name, p, "(B, H, N), a packed causal matrix", rank=3)
    n = layout.packed_size(T_q, T_k)
    if p.shape[-1] != n:
        raise ValueError(f"{name} has {p.shape[-1]} elements per (b, h) but (T_q, T_k) = ({T_q}, {T_k}) needs "
                         f"N = {n} (fastgpt/ext/layout.py)")


def _check_matrix_rows(p, x, T_q, T_k, x_dims: str) -> None:
    _check_packed("p", p, T_q, T_k)
    _check_same("x", x, "p", p)
    if x.shape[:2] != p.shape[:2]:
        raise ValueError(f"x has shape {tuple(x.shape)} but p has shape {tuple(p.shape)}; "
                         f"x must be {x_dims} with p's B and H")


def _check_softmax_args(scale, dropout_p, seed, offset) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not float("-inf") < scale < float("inf"):
        raise ValueError(f"scale must be a finite number; got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1); got {dropout_p!r}")
    for name, value in (("seed", seed), ("offset", offset)):
        if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
            raise ValueError(f"{name} must be an int in [-2^63, 2^63); got {value!r}")


# ---- public wrappers --------------------------------------------------------------------------------

def causal_matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """tril_o(a · bᵀ): a (B, H, T_q, D), b (B, H, T_k, D) -> packed (B, H, N); never computed above the diagonal."""
    _check_tensor("a", a, "(B, H, T_q, D)")
    _check_tensor("b", b, "(B, H, T_k, D)")
    _check_same("b", b, "a", a)
    if a.shape[:2] != b.shape[:2] or a.shape[3] != b.shape[3]:
        raise ValueError(f"b has shape {tuple(b.shape)} but a has shape {tuple(a.shape)}; "
                         "a (B, H, T_q, D) and b (B, H, T_k, D) must share B, H and D")
    layout.check_lengths(a.shape[2], b.shape[2])
    return _ops().causal_matmul_nt(a, b)


def causal_matmul_nn(p: torch.Tensor, x: torch.Tensor, T_q: int) -> torch.Tensor:
    """tril_o(p) · x: p packed for (T_q, T_k), x (B, H, T_k, D) -> (B, H, T_q, D)."""
    _check_tensor("x", x, "(B, H, T_k, D)")
    _check_matrix_rows(p, x, T_q, x.shape[2], "(B, H, T_k, D)")
    return _ops().causal_matmul_nn(p, x, T_q)


def causal_matmul_tn(p: torch.Tensor, x: torch.Tensor, T_k: int) -> torch.Tensor:
    """tril_o(p)ᵀ · x: p packed for (T_q, T_k), x (B, H, T_q, D) -> (B, H, T_k, D)."""
    _check_tensor("x", x, "(B, H, T_q, D)")
    _check_matrix_rows(p, x, x.shape[2], T_k, "(B, H, T_q, D)")
    return _ops().causal_matmul_tn(p, x, T_k)


def causal_softmax(scores: torch.Tensor, T_q: int, T_k: int, scale: float, dropout_p: float = 0.0, seed: int = 0,
                   offset: int = 0) -> torch.Tensor:
    """dropout(softmax(scale · scores) under the causal mask): packed -> packed.

    Row i uses its keys j <= o + i only. Dropped weights are zero, kept ones scaled by
    1/(1 - dropout_p); the mask is a function of (seed, offset, element) (csrc/philox.h).
    """
    _check_packed("scores", scores, T_q, T_k)
    _check_softmax_args(scale, dropout_p, seed, offset)
    return _ops().causal_softmax(scores, T_q, T_k, float(scale), float(dropout_p), seed, offset)


def dropout_keep_mask(scores: torch.Tensor, T_q: int, T_k: int, dropout_p: float, seed: int,
                      offset: int = 0) -> torch.Tensor:
    """The dense (B, H, T_q, T_k) bool keep mask that causal_softmax(scores, T_q, T_k, ..., dropout_p,
    seed, offset) applies; False above the diagonal. Only scores' shape is used."""
    _check_packed("scores", scores, T_q, T_k)
    _check_softmax_args(1.0, dropout_p, seed, offset)
    return _ops().dropout_keep_mask(scores, T_q, T_k, float(dropout_p), seed, offset)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for an x (..., K) of few rows: weight (N, K) -> (..., N).

    Streams weight once at memory bandwidth (csrc/cpu/skinny_linear.cpp); the time grows with the
    rows of x, so it pays off for the few rows of a decode step only (fastgpt/linear.py). float32
    CPU tensors; no backward.
    """
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError(f"{name} is a {t.dtype} tensor on {t.device}; skinny_linear takes float32 CPU tensors")
    if weight.dim() != 2:
        raise ValueError(f"weight must have 2 dims (N, K); got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has shape {tuple(x.shape)} but weight has shape {tuple(weight.shape)}; "
                         f"x must be (..., K) with K = {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), one per output; got {tuple(bias.shape)}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise ValueError("skinny_linear has no backward (an inference kernel): call it under torch.no_grad(), "
                         "or use F.linear where gradients are needed")
    return _ops().skinny_linear(x, weight, bias)


def empty_cache() -> None:
    """Returns the CPU kernels' cached causal-matrix buffers to the OS (see csrc/cpu/buffer_pool.h;
    FASTGPT_EXT_CACHE_MB caps the cache, default 1024, 0 disables it)."""
    _ops().empty_cache()


# ---- autograd and fake kernels, registered once the library is loaded ------------------------------

def _setup_save_inputs(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:2])  # T_q and T_k are read off their shapes in the backward


def _backward_nt(ctx, grad):  # out = tril_o(a·bᵀ), a (T_q rows), b (T_k rows)
    a, b = ctx.saved_tensors
    f = torch.ops.fastgpt
    da = f.causal_matmul_nn(grad, b, a.shape[2]) if ctx.needs_input_grad[0] else None  # tril_o(g)·b
    db = f.causal_matmul_tn(grad, a, b.shape[2]) if ctx.needs_input_grad[1] else None  # tril_o(g)ᵀ·a
    return da, db


def _backward_nn(ctx, grad):  # out = tril_o(p)·x, x (T_k rows), grad (T_q rows)
    p, x = ctx.saved_tensors
    f = torch.ops.fastgpt
    dp = f.causal_matmul_nt(grad, x) if ctx.needs_input_grad[0] else None  # tril_o(g·xᵀ)
    dx = f.causal_matmul_tn(p, grad, x.shape[2]) if ctx.needs_input_grad[1] else None  # tril_o(p)ᵀ·g
    return dp, dx, None


def _backward_tn(ctx, grad):  # out = tril_o(p)ᵀ·x, x (T_q rows), grad (T_k rows)
    p, x = ctx.saved_tensors
    f = torch.ops.fastgpt
    dp = f.causal_matmul_nt(x, grad) if ctx.needs_input_grad[0] else None  # tril_o(x·gᵀ)
    dx = f.causal_matmul_nn(p, grad, x.shape[2]) if ctx.needs_input_grad[1] else None  # tril_o(p)·g
    return dp, dx, None


def _setup_softmax(ctx, inputs, output):
    scores, T_q, T_k, scale, dropout_p, seed, offset = inputs
    ctx.args = (T_q, T_k, scale, dropout_p, seed, offset)
    # Without dropout the output is P itself: keep it, and let the scores go. With dropout P is
    # recomputed from the scores and the mask regenerated from (seed, offset).
    ctx.save_for_backward(output if dropout_p == 0.0 else scores)


def _backward_softmax(ctx, grad):
    (saved,) = ctx.saved_tensors
    T_q, T_k, scale, dropout_p, seed, offset = ctx.args
    f = torch.ops.fastgpt
    if dropout_p == 0.0:
        ds = f.causal_softmax_backward(grad, saved, T_q, T_k, scale)
    else:
        ds = f.causal_softmax_dropout_backward(grad, saved, T_q, T_k, scale, dropout_p, seed, offset)
    return ds, None, None, None, None, None, None


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


def _fake_nt(a, b):
    _fake_check_same(a, b)
    B, H, T_q, _ = a.shape
    return a.new_empty((B, H, layout.packed_size(T_q, b.shape[2])))


def _fake_nn(p, x, T_q):
    _fake_check_same(p, x)
    _fake_packed(p, T_q, x.shape[2])
    B, H, _, D = x.shape
    return x.new_empty((B, H, T_q, D))


def _fake_tn(p, x, T_k):
    _fake_check_same(p, x)
    _fake_packed(p, x.shape[2], T_k)
    B, H, _, D = x.shape
    return x.new_empty((B, H, T_k, D))


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


def _fake_skinny_linear(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


_registered = False


def register_python_parts() -> None:
    """Autograd formulas and fake (shape-only) kernels of every op; called once by build.load()."""
    global _registered
    if _registered:
        return
    _registered = True
    lib = torch.library
    lib.register_fake("fastgpt::causal_matmul_nt")(_fake_nt)
    lib.register_fake("fastgpt::causal_matmul_nn")(_fake_nn)
    lib.register_fake("fastgpt::causal_matmul_tn")(_fake_tn)
    lib.register_fake("fastgpt::causal_softmax")(_fake_softmax)
    lib.register_fake("fastgpt::causal_softmax_backward")(_fake_softmax_backward)
    lib.register_fake("fastgpt::causal_softmax_dropout_backward")(_fake_softmax_dropout_backward)
    lib.register_fake("fastgpt::dropout_keep_mask")(_fake_mask)
    lib.register_fake("fastgpt::skinny_linear")(_fake_skinny_linear)
    lib.register_autograd("fastgpt::causal_matmul_nt", _backward_nt, setup_context=_setup_save_inputs)
    lib.register_autograd("fastgpt::causal_matmul_nn", _backward_nn, setup_context=_setup_save_inputs)
    lib.register_autograd("fastgpt::causal_matmul_tn", _backward_tn, setup_context=_setup_save_inputs)
    lib.register_autograd("fastgpt::causal_softmax", _backward_softmax, setup_context=_setup_softmax)
