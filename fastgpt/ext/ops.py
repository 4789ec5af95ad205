"""The fastgpt ops from Python: checked wrappers, autograd, and shape-only fake kernels.

    causal_matmul_nt(a, b)   tril(a · bᵀ)     (B,H,T,D) × (B,H,T,D) -> (B,H,T,T)
    causal_matmul_nn(p, x)   tril(p) · x      (B,H,T,T) × (B,H,T,D) -> (B,H,T,D)
    causal_matmul_tn(p, x)   tril(p)ᵀ · x     (B,H,T,T) × (B,H,T,D) -> (B,H,T,D)
    causal_softmax(scores, scale, dropout_p, seed, offset)
                             dropout(softmax(scale · scores, causal))   (B,H,T,T) -> (B,H,T,T)
    dropout_keep_mask(scores, dropout_p, seed, offset)
                             the (B,H,T,T) bool mask causal_softmax draws (testing hook)

A causal matrix (B, H, T, T) is zero above the diagonal on output and not read there on input.
The gradients are the same ops again: d tril(a·bᵀ) = (tril(g)·b, tril(g)ᵀ·a), and so on, so the
backward skips the same tiles as the forward. The softmax's backward is causal_softmax_backward
(from its output P) without dropout, causal_softmax_dropout_backward (P recomputed from the
scores, the mask regenerated from (seed, offset), never stored) with it.
"""

from __future__ import annotations

import torch

from fastgpt.ext.build import load

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


def _ops():
    load()
    return torch.ops.fastgpt


# ---- checks of the Python wrappers (the C++ ops check again with TORCH_CHECK) ----------------------

def _check_tensor(name: str, t, rank_dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {rank_dims}; got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dims {rank_dims}; got {t.dim()} dims with shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; the ext ops support float32 and bfloat16")


def _check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; all tensors must be on one device")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; all tensors must share one dtype")


def _check_causal(name: str, p) -> None:
    _check_tensor(name, p, "(B, H, T, T)")
    if p.shape[-1] != p.shape[-2]:
        raise ValueError(f"{name} must be a causal matrix of shape (B, H, T, T); got {tuple(p.shape)}")


def _check_matrix_rows(p, x) -> None:
    _check_causal("p", p)
    _check_tensor("x", x, "(B, H, T, D)")
    _check_same("x", x, "p", p)
    if x.shape[:3] != p.shape[:3]:
        raise ValueError(f"x has shape {tuple(x.shape)} but p has shape {tuple(p.shape)}; "
                         "x must be (B, H, T, D) with p's B, H and T")


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
    """tril(a · bᵀ): a, b (B, H, T, D) -> (B, H, T, T), zero above the diagonal, never computed there."""
    _check_tensor("a", a, "(B, H, T, D)")
    _check_tensor("b", b, "(B, H, T, D)")
    _check_same("b", b, "a", a)
    if a.shape != b.shape:
        raise ValueError(f"b has shape {tuple(b.shape)} but a has shape {tuple(a.shape)}; a and b must share (B, H, T, D)")
    return _ops().causal_matmul_nt(a, b)


def causal_matmul_nn(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """tril(p) · x: p (B, H, T, T), x (B, H, T, D) -> (B, H, T, D); p above the diagonal is not read."""
    _check_matrix_rows(p, x)
    return _ops().causal_matmul_nn(p, x)


def causal_matmul_tn(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """tril(p)ᵀ · x: p (B, H, T, T), x (B, H, T, D) -> (B, H, T, D); p above the diagonal is not read."""
    _check_matrix_rows(p, x)
    return _ops().causal_matmul_tn(p, x)


def causal_softmax(scores: torch.Tensor, scale: float, dropout_p: float = 0.0, seed: int = 0, offset: int = 0) -> torch.Tensor:
    """dropout(softmax(scale · scores) under the causal mask): (B, H, T, T) -> (B, H, T, T).

    Row i uses scores[..., i, :i+1] only. Dropped weights are zero, kept ones scaled by
    1/(1 - dropout_p); the mask is a function of (seed, offset, element) (csrc/philox.h).
    """
    _check_causal("scores", scores)
    _check_softmax_args(scale, dropout_p, seed, offset)
    return _ops().causal_softmax(scores, float(scale), float(dropout_p), seed, offset)


def dropout_keep_mask(scores: torch.Tensor, dropout_p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """The (B, H, T, T) bool keep mask that causal_softmax(scores, ..., dropout_p, seed, offset) applies."""
    _check_causal("scores", scores)
    _check_softmax_args(1.0, dropout_p, seed, offset)
    return _ops().dropout_keep_mask(scores, float(dropout_p), seed, offset)


def empty_cache() -> None:
    """Returns the CPU kernels' cached causal-matrix buffers to the OS (see csrc/cpu/buffer_pool.h;
    FASTGPT_EXT_CACHE_MB caps the cache, default 1024, 0 disables it)."""
    _ops().empty_cache()


# ---- autograd and fake kernels, registered once the library is loaded ------------------------------

def _setup_two(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_nt(ctx, grad):  # out = tril(a·bᵀ)
    a, b = ctx.saved_tensors
    f = torch.ops.fastgpt
    da = f.causal_matmul_nn(grad, b) if ctx.needs_input_grad[0] else None  # tril(g)·b
    db = f.causal_matmul_tn(grad, a) if ctx.needs_input_grad[1] else None  # tril(g)ᵀ·a
    return da, db


def _backward_nn(ctx, grad):  # out = tril(p)·x
    p, x = ctx.saved_tensors
    f = torch.ops.fastgpt
    dp = f.causal_matmul_nt(grad, x) if ctx.needs_input_grad[0] else None  # tril(g·xᵀ)
    dx = f.causal_matmul_tn(p, grad) if ctx.needs_input_grad[1] else None  # tril(p)ᵀ·g
    return dp, dx


def _backward_tn(ctx, grad):  # out = tril(p)ᵀ·x
    p, x = ctx.saved_tensors
    f = torch.ops.fastgpt
    dp = f.causal_matmul_nt(x, grad) if ctx.needs_input_grad[0] else None  # tril(x·gᵀ)
    dx = f.causal_matmul_nn(p, grad) if ctx.needs_input_grad[1] else None  # tril(p)·g
    return dp, dx


def _setup_softmax(ctx, inputs, output):
    scores, scale, dropout_p, seed, offset = inputs
    ctx.args = (scale, dropout_p, seed, offset)
    # Without dropout the output is P itself: keep it, and let the scores go. With dropout P is
    # recomputed from the scores and the mask regenerated from (seed, offset).
    ctx.save_for_backward(output if dropout_p == 0.0 else scores)


def _backward_softmax(ctx, grad):
    (saved,) = ctx.saved_tensors
    scale, dropout_p, seed, offset = ctx.args
    f = torch.ops.fastgpt
    if dropout_p == 0.0:
        ds = f.causal_softmax_backward(grad, saved, scale)
    else:
        ds = f.causal_softmax_dropout_backward(grad, saved, scale, dropout_p, seed, offset)
    return ds, None, None, None, None


def _fake_check_same(*tensors):
    ref = tensors[0]
    for t in tensors[1:]:
        if t.device != ref.device or t.dtype != ref.dtype:
            raise RuntimeError(f"fastgpt ops: all tensors must share one device and dtype; got {t.device}/{t.dtype} "
                               f"and {ref.device}/{ref.dtype}")


def _fake_nt(a, b):
    _fake_check_same(a, b)
    B, H, T, _ = a.shape
    return a.new_empty((B, H, T, T))


def _fake_rows(p, x):
    _fake_check_same(p, x)
    return x.new_empty(x.shape)


def _fake_softmax(scores, scale, dropout_p, seed, offset):
    return scores.new_empty(scores.shape)


def _fake_softmax_backward(grad, probs, scale):
    _fake_check_same(grad, probs)
    return probs.new_empty(probs.shape)


def _fake_softmax_dropout_backward(grad, scores, scale, dropout_p, seed, offset):
    _fake_check_same(grad, scores)
    return scores.new_empty(scores.shape)


def _fake_mask(scores, dropout_p, seed, offset):
    return scores.new_empty(scores.shape, dtype=torch.bool)


_registered = False


def register_python_parts() -> None:
    """Autograd formulas and fake (shape-only) kernels of every op; called once by build.load()."""
    global _registered
    if _registered:
        return
    _registered = True
    lib = torch.library
    lib.register_fake("fastgpt::causal_matmul_nt")(_fake_nt)
    lib.register_fake("fastgpt::causal_matmul_nn")(_fake_rows)
    lib.register_fake("fastgpt::causal_matmul_tn")(_fake_rows)
    lib.register_fake("fastgpt::causal_softmax")(_fake_softmax)
    lib.register_fake("fastgpt::causal_softmax_backward")(_fake_softmax_backward)
    lib.register_fake("fastgpt::causal_softmax_dropout_backward")(_fake_softmax_dropout_backward)
    lib.register_fake("fastgpt::dropout_keep_mask")(_fake_mask)
    lib.register_autograd("fastgpt::causal_matmul_nt", _backward_nt, setup_context=_setup_two)
    lib.register_autograd("fastgpt::causal_matmul_nn", _backward_nn, setup_context=_setup_two)
    lib.register_autograd("fastgpt::causal_matmul_tn", _backward_tn, setup_context=_setup_two)
    lib.register_autograd("fastgpt::causal_softmax", _backward_softmax, setup_context=_setup_softmax)
