"""Linear + cross-entropy: the LM head and its loss in one op, the logits never whole.

    loss = linear_cross_entropy(x, weight, targets, bias=None, ignore_index=-100,
                                label_smoothing=0.0, reduction="mean", backend="auto")

    x:        (..., H)   the last hidden states (N rows once flattened)
    weight:   (V, H)     the LM head; bias (V,) or None
    targets:  (...)      int64 class ids, ignore_index where a row has no target
    loss:     ()         reduction "mean" (over the rows with a target) or "sum"; (N,) with "none"

It is F.cross_entropy(F.linear(x, weight, bias), targets, ...) with PyTorch's meaning of every
argument: row i's loss is (1 - ε)·(lse_i - z_i[t_i]) + ε·(lse_i - mean_c z_i[c]) with ε the label
smoothing, 0 where t_i = ignore_index; "mean" divides the sum by the rows with a target (NaN when
there are none, as PyTorch gives, with zero gradients).

The logits are N × V: at a vocabulary of 128k and 8k rows, 4 GiB in float32, more than the model
around them. The `torch` path computes them in chunks of rows (CHUNK_ELEMENTS logits at a time)
and, when a gradient will be wanted, the chunk's gradients at once, while its logits exist:

    for each chunk of rows c:                          z = x_c·Wᵀ + b       (c × V, float32 softmax)
        loss_c = the rows' losses from z and lse(z)
        g = softmax(z) - (1 - ε)·onehot(t) - ε/V        zero on ignored rows, times 1/n ("mean")
        dx_c = g·W,  dW += gᵀ·x_c,  db += Σ_rows g      (dW, db in float32; float64 for float64)

so memory is flat in the vocabulary beyond W and dW themselves, and the backward only scales the
stored dx, dW, db by the upstream gradient (three GEMMs in all, as the unfused op's). The gradient
in the forward needs a scalar loss: reduction="none" is refused by name on that path (`naive`, the
reference, takes it).

Kernel paths (the op's Registry, the attention registry's rules: fastgpt/attention/registry.py):
    naive   F.linear then F.cross_entropy, the logits whole: the reference
    torch   the chunks above in PyTorch ops
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fastgpt.attention.call import _shape, dtype_name
from fastgpt.attention.registry import Backend, KernelPath, Registry

OPTIONS = ("bias", "label_smoothing", "reduction_none")
KINDS = ("plain",)
REDUCTIONS = ("mean", "sum", "none")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Logits per chunk: 64 MiB in float32 whatever the vocabulary. Fewer rows per chunk stream W and
# dW once more per chunk (docs/benchmarks.md, "Linear + cross-entropy").
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class LinearCrossEntropyCall:
    """One call, validated: what the registry decides on."""
    rows: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    device: torch.device
    ignore_index: int = -100
    label_smoothing: float = 0.0
    reduction: str = "mean"
    bias: bool = False
    needs_grad: bool = False
    compiling: bool = False
    kind: str = "plain"

    @property
    def options(self) -> frozenset[str]:
        used = {"bias": self.bias, "label_smoothing": self.label_smoothing > 0,
                "reduction_none": self.reduction == "none"}
        return frozenset(name for name, on in used.items() if on)

    def describe(self) -> str:
        extras = " bias" if self.bias else ""
        extras += f" label_smoothing={self.label_smoothing}" if self.label_smoothing else ""
        return (f"{self.device.type} {dtype_name(self.dtype)} N={self.rows} H={self.hidden} V={self.vocab} "
                f"reduction={self.reduction}{extras}")


def _check_tensor(name: str, t, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {dims}; got {type(t).__name__}")


def linear_cross_entropy_call(x, weight, targets, bias=None, ignore_index: int = -100, label_smoothing: float = 0.0,
                              reduction: str = "mean") -> LinearCrossEntropyCall:
    """The call, or a TypeError/ValueError naming the argument, its value and the limit."""
    for name, t, dims in (("x", x, "(..., H)"), ("weight", weight, "(V, H)"), ("targets", targets, "(...)")):
        _check_tensor(name, t, dims)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1] or min(weight.shape) < 1:
        raise ValueError(f"x has shape {_shape(x)} and weight {_shape(weight)}: weight must be (V, H) with V, H >= 1 "
                         f"and x (..., H)")
    if targets.shape != x.shape[:-1] or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets is {targets.dtype} of shape {_shape(targets)}; it must be int64 (or int32) of "
                         f"shape {tuple(x.shape[:-1])}, x's without its last dim")
    if x.dtype not in SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise ValueError(f"x is {x.dtype} and weight {weight.dtype}: they must share one of "
                         f"{', '.join(dtype_name(d) for d in SUPPORTED_DTYPES)}")
    for name, t in (("weight", weight), ("targets", targets), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x on {x.device}: they must share one device")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]
                             or bias.dtype != x.dtype):
        shown = f"{bias.dtype} {_shape(bias)}" if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias is {shown}; it must be (V,) = ({weight.shape[0]},) in x's dtype, or None")
    _check_scalars(ignore_index, label_smoothing, reduction)
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return LinearCrossEntropyCall(targets.numel(), weight.shape[1], weight.shape[0], x.dtype, x.device, ignore_index,
                                  float(label_smoothing), reduction, bias is not None, grad,
                                  torch.compiler.is_compiling())


def _check_scalars(ignore_index, label_smoothing, reduction) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int; got {ignore_index!r}")
    if (isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float))
            or not 0.0 <= label_smoothing <= 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1]; got {label_smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")


def _naive(x, weight, targets, bias, call: LinearCrossEntropyCall) -> torch.Tensor:
    """The reference: PyTorch's own two ops, the (N, V) logits whole."""
    logits = F.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return F.cross_entropy(logits, targets.reshape(-1).long(), ignore_index=call.ignore_index,
                           label_smoothing=call.label_smoothing, reduction=call.reduction)


def chunk_rows(vocab: int, rows: int) -> int:
    """Rows per chunk: CHUNK_ELEMENTS logits, at least one row, at most all of them."""
    return max(1, min(rows, CHUNK_ELEMENTS // vocab))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the softmax, the losses and dW, db are computed in: float32, float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _chunk(x_c, weight, bias, t_c, call: LinearCrossEntropyCall, scale: float, grads):
    """One chunk of rows: their losses (c,) and, with `grads` (dx_c to fill, dW, db or None, in the
    accumulation dtype), their gradients at `scale` (1/n for "mean", 1 for "sum")."""
    z = F.linear(x_c, weight, bias).to(accumulation_dtype(x_c.dtype))  # (c, V)
    lse = torch.logsumexp(z, dim=-1)
    valid = t_c != call.ignore_index
    t_safe = torch.where(valid, t_c, 0)
    eps = call.label_smoothing
    loss = (1.0 - eps) * (lse - z.gather(1, t_safe[:, None])[:, 0])
    if eps > 0:
        loss = loss + eps * (lse - z.mean(dim=-1))
    loss = torch.where(valid, loss, 0.0)
    if grads is not None:
        dx_c, dW, db = grads
        g = torch.exp(z - lse[:, None])  # (c, V) the softmax, then its gradient in place
        g.scatter_add_(1, t_safe[:, None], torch.full_like(lse[:, None], -(1.0 - eps)))
        if eps > 0:
            g -= eps / call.vocab
        g *= (valid.to(g.dtype) * scale)[:, None]
        dx_c.copy_(g.to(x_c.dtype) @ weight)
        dW.addmm_(g.t(), x_c.to(g.dtype))
        if db is not None:
            db += g.sum(dim=0)
    return loss


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The `torch` path: the forward walks the chunks (losses and, when wanted, the gradients at
    1/n or 1); the backward scales the stored gradients by the upstream one."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, call: LinearCrossEntropyCall):
        x2, t = x.reshape(-1, x.shape[-1]), targets.reshape(-1).long()
        n = int((t != call.ignore_index).sum())
        scale = (1.0 / n if n else 0.0) if call.reduction == "mean" else 1.0
        wants, acc = any(ctx.needs_input_grad[:3]), dict(dtype=accumulation_dtype(x.dtype), device=x.device)
        dx = torch.empty_like(x2) if wants else None
        dW = torch.zeros(weight.shape, **acc) if wants else None
        db = torch.zeros(weight.shape[0], **acc) if bias is not None and wants else None
        losses = torch.empty(x2.shape[0], **acc)
        step = chunk_rows(call.vocab, max(x2.shape[0], 1))
        for i in range(0, x2.shape[0], step):
            grads = (dx[i:i + step], dW, db) if dx is not None else None
            losses[i:i + step] = _chunk(x2[i:i + step], weight, bias, t[i:i + step], call, scale, grads)
        total = losses.sum()
        loss = total / n if call.reduction == "mean" else total  # 0/0: NaN, as PyTorch's mean of nothing
        if dx is not None:
            ctx.save_for_backward(dx.view_as(x), dW, db)
        ctx.weight_dtype = weight.dtype
        return loss.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        dx, dW, db = ctx.saved_tensors  # made for this backward alone (once_differentiable): scaled in place
        g = grad_loss.to(dW.dtype)
        grads = [None, None, None]
        if ctx.needs_input_grad[0]:
            grads[0] = dx.mul_(g.to(dx.dtype)) if dx.dtype == dW.dtype else (dx.to(g.dtype) * g).to(dx.dtype)
        if ctx.needs_input_grad[1]:
            grads[1] = dW.mul_(g).to(ctx.weight_dtype)
        if db is not None and ctx.needs_input_grad[2]:
            grads[2] = db.mul_(g).to(ctx.weight_dtype)
        return (*grads, None, None)


def _chunked(x, weight, targets, bias, call: LinearCrossEntropyCall) -> torch.Tensor:
    return _ChunkedLinearCrossEntropy.apply(x, weight, bias, targets, call)


# auto: the chunked path first on every device (the same GEMMs, the logits never whole); the
# reference where it refuses (reduction="none")
LINEAR_CROSS_ENTROPY = Registry("linear_cross_entropy", OPTIONS, KINDS,
                                {"default": {"plain": ("torch", "naive")}}, record_prefix="linear_cross_entropy:")
NAIVE = "F.linear then F.cross_entropy, the (N, V) logits whole: the reference"
CHUNKED = "chunks of rows in PyTorch ops: the logits never whole, the gradients made in the forward"
LINEAR_CROSS_ENTROPY.register_backend(Backend(
    name="naive", description=NAIVE, paths=(KernelPath("naive", _naive, NAIVE, options=frozenset(OPTIONS)),)))
LINEAR_CROSS_ENTROPY.register_backend(Backend(
    name="torch", description=CHUNKED,
    paths=(KernelPath("torch", _chunked, CHUNKED, options=frozenset({"bias", "label_smoothing"}),
                      option_notes={"reduction_none": "the gradients are made in the forward, for a scalar loss; "
                                                      "naive takes reduction='none'"}),)))


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: Optional[torch.Tensor] = None, *, ignore_index: int = -100,
                         label_smoothing: float = 0.0, reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """F.cross_entropy(F.linear(x, weight, bias), targets, ...) without the whole logits where the
    chosen path allows (module docstring): x (..., H), weight (V, H), targets x's leading shape."""
    call = linear_cross_entropy_call(x, weight, targets, bias, ignore_index, label_smoothing, reduction)
    path = LINEAR_CROSS_ENTROPY.choose(call, backend)
    LINEAR_CROSS_ENTROPY.record(path)
    return path.fn(x, weight, targets, bias, call)
