"""Dropout checks of the fused backends, whose masks can be read back (triton, ext).

A fused kernel draws its dropout mask inside, from a seed, and draws it again in the backward
rather than storing it. Four things can go wrong that output parity without dropout cannot see;
each has a check here, shared by `fastgpt gpu-report` and the tests:

    kept fraction     the mask keeps 1 - p of the visible weights (within 4 standard deviations)
    mask parity       forward and backward match the naive math given the kernel's own mask, under
                      fastgpt.parity's rule: the backward regenerated the mask the forward used
    same seed         torch.manual_seed(s) before a call gives the same output and gradients, bit
                      for bit; another seed, another output
    backwards         three backwards of one forward give bit-equal gradients (no atomics)

    check_dropout(backend, shape, dtype, device, p) -> DropoutResult
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastgpt.attention.api import causal_attention
from fastgpt.attention.naive import future_mask, naive_attention
from fastgpt.parity import ParityResult, compare, forward_backward, make_qkv

MASKED_BACKENDS = ("triton", "ext")
# (B, H, T_q, T_k, D): training (square) and a KV-cache step, odd lengths, as PARITY_SHAPES; then
# grouped-query (B, H, H_kv, T_q, T_k, D), 3 query heads per key/value head, whose dK and dV sum a
# group of differently masked heads
DROPOUT_SHAPES = [(2, 3, 100, 100, 64), (2, 2, 37, 100, 32), (2, 6, 2, 50, 64, 128)]
DROPOUT_P = 0.2


@dataclass
class DropoutResult:
    backend: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    p: float
    kept_fraction: float  # of the visible weights
    kept_limit: float  # |kept_fraction - (1 - p)| may be at most this
    mask_parity: ParityResult
    same_seed_same_result: bool
    other_seed_other_result: bool
    repeated_backward_bit_equal: bool

    @property
    def ok(self) -> bool:
        return (abs(self.kept_fraction - (1 - self.p)) <= self.kept_limit and self.mask_parity.ok
                and self.same_seed_same_result and self.other_seed_other_result and self.repeated_backward_bit_equal)

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape),
                "status": "ok" if self.ok else "FAIL", "p": self.p, "kept_fraction": self.kept_fraction,
                "kept_limit": self.kept_limit,
                "mask_parity": "ok" if self.mask_parity.ok else self.mask_parity.explain(),
                "same_seed_same_result": self.same_seed_same_result,
                "other_seed_other_result": self.other_seed_other_result,
                "repeated_backward_bit_equal": self.repeated_backward_bit_equal}


def _masked_call(backend: str, p: float) -> tuple[Callable, dict]:
    """(fn, state): fn(q, k, v) runs the backend with dropout and leaves its dense (B, H, T_q, T_k)
    keep mask in state["mask"]."""
    state: dict[str, torch.Tensor] = {}
    if backend == "triton":
        from fastgpt.kernels import flash_attention_ops as ops

        def fn(q, k, v):
            with ops.record_dropout_seeds() as seeds:
                out = causal_attention(q, k, v, dropout_p=p, backend="triton")
            state["mask"] = ops.dropout_keep_mask(seeds[0], q.shape, p, k.shape[2])
            return out
    elif backend == "ext":
        import fastgpt.ext
        from fastgpt.attention.ext_backend import ext_attention
        from fastgpt.ext import layout

        seed = int(torch.randint(0, 2**62, ()))

        def fn(q, k, v):
            B, H, T_q, _ = q.shape
            T_k = k.shape[2]
            scores = q.new_empty((B, H, layout.packed_size(T_q, T_k)))  # only its shape is read
            state["mask"] = fastgpt.ext.dropout_keep_mask(scores, T_q, T_k, p, seed)
            return ext_attention(q, k, v, p, seed=seed)
    else:
        raise ValueError(f"backend={backend!r}: its dropout mask cannot be read back; "
                         f"these backends' can: {', '.join(MASKED_BACKENDS)}")
    return fn, state


def check_dropout(backend: str, shape, dtype: torch.dtype, device="cpu", p: float = DROPOUT_P,
                  seed: int = 0) -> DropoutResult:
    """The four checks of the module docstring for `backend` at `shape` (B, H, T_q, T_k, D)."""
    q, k, v = make_qkv(shape, dtype, device, seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    T_q, T_k = q.shape[2], k.shape[2]

    fn, state = _masked_call(backend, p)
    parity = compare(fn, lambda a, b, c: naive_attention(a, b, c, p, keep_mask=state["mask"]), (q, k, v), dout, dtype)
    visible = ~future_mask(T_q, T_k, state["mask"].device)
    kept = state["mask"][..., visible].float()
    kept_fraction = kept.mean().item()
    # 4 standard deviations of the mean of independent draws, and the 16-bit threshold's rounding
    kept_limit = 4 * (p * (1 - p) / kept.numel()) ** 0.5 + 2**-16

    def seeded(s: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(s)
        return forward_backward(lambda a, b, c: causal_attention(a, b, c, dropout_p=p, backend=backend),
                                (q, k, v), dout.to(dtype))

    first, again, other = seeded(1234), seeded(1234), seeded(1235)
    same = all(torch.equal(first[key], again[key]) for key in first)
    differs = not torch.equal(first["out"], other["out"])
    return DropoutResult(backend, dtype, tuple(shape), p, kept_fraction, kept_limit, parity, same, differs,
                         _backwards_bit_equal(backend, q, k, v, dout.to(dtype), p))


def _backwards_bit_equal(backend: str, q, k, v, dout, p: float, times: int = 3) -> bool:
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = causal_attention(q, k, v, dropout_p=p, backend=backend)
    grads = [torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) for _ in range(times)]
    return all(torch.equal(a, b) for later in grads[1:] for a, b in zip(grads[0], later))

