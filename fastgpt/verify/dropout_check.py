"""Dropout checks of the fused backends, whose masks can be read back (triton, ext).

A fused kernel draws its dropout mask inside, from a seed, and draws it again in the backward
rather than storing it. Four things can go wrong that output parity without dropout cannot see;
each has a check here, shared by `fastgpt gpu-report` and the tests:

    kept fraction     the mask keeps 1 - dropout_p of the visible weights (within 4 standard deviations)
    mask parity       forward and backward match the naive math given the kernel's own mask, under
                      fastgpt.verify.parity's rule: the backward regenerated the mask the forward used
    same seed         torch.manual_seed(s) before a call gives the same output and gradients, bit
                      for bit; another seed, another output
    backwards         three backwards of one forward give bit-equal gradients (no atomics)

    check_dropout(backend, shape, dtype, device, dropout_p) -> DropoutResult
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from fastgpt.attention.api import causal_attention, causal_attention_with_mask
from fastgpt.attention.naive import future_mask, naive_attention
from fastgpt.attention.registry import backend_names, get_backend
from fastgpt.verify.parity import ParityResult, compare, forward_backward, make_qkv

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
    dropout_p: float
    kept_fraction: float  # of the visible weights
    kept_limit: float  # |kept_fraction - (1 - dropout_p)| may be at most this
    mask_parity: ParityResult
    same_seed_same_result: bool
    other_seed_other_result: bool
    repeated_backward_bit_equal: bool

    @property
    def ok(self) -> bool:
        return (abs(self.kept_fraction - (1 - self.dropout_p)) <= self.kept_limit and self.mask_parity.ok
                and self.same_seed_same_result and self.other_seed_other_result and self.repeated_backward_bit_equal)

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "dtype": str(self.dtype).removeprefix("torch."), "shape": list(self.shape),
                "status": "ok" if self.ok else "FAIL", "dropout_p": self.dropout_p, "kept_fraction": self.kept_fraction,
                "kept_limit": self.kept_limit,
                "mask_parity": "ok" if self.mask_parity.ok else self.mask_parity.explain(),
                "same_seed_same_result": self.same_seed_same_result,
                "other_seed_other_result": self.other_seed_other_result,
                "repeated_backward_bit_equal": self.repeated_backward_bit_equal}


def _masked_call(backend: str, dropout_p: float) -> tuple[Callable, dict]:
    """(fn, state): fn(q, k, v) runs the backend with dropout and leaves its dense (B, H, T_q, T_k)
    keep mask in state["mask"]."""
    state: dict[str, torch.Tensor] = {}

    def fn(q, k, v):
        out, state["mask"] = causal_attention_with_mask(q, k, v, dropout_p=dropout_p, backend=backend)
        return out

    return fn, state


def masked_backends() -> list[str]:
    """The backends whose dropout mask can be read back (causal_attention_with_mask): the ones checked here."""
    return [name for name in backend_names() if get_backend(name).with_dropout_mask is not None]


def check_dropout(backend: str, shape, dtype: torch.dtype, device="cpu", dropout_p: float = DROPOUT_P,
                  seed: int = 0) -> DropoutResult:
    """The four checks of the module docstring for `backend` at `shape` (B, H, T_q, T_k, D)."""
    q, k, v = make_qkv(shape, dtype, device, seed)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(device)
    T_q, T_k = q.shape[2], k.shape[2]

    fn, state = _masked_call(backend, dropout_p)
    parity = compare(fn, lambda a, b, c: naive_attention(a, b, c, dropout_p, keep_mask=state["mask"]), (q, k, v),
                     dout, dtype)
    visible = ~future_mask(T_q, T_k, state["mask"].device)
    kept = state["mask"][..., visible].float()
    kept_fraction = kept.mean().item()
    # 4 standard deviations of the mean of independent draws, and the 16-bit threshold's rounding
    kept_limit = 4 * (dropout_p * (1 - dropout_p) / kept.numel()) ** 0.5 + 2**-16

    def seeded(s: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(s)
        return forward_backward(lambda a, b, c: causal_attention(a, b, c, dropout_p=dropout_p, backend=backend),
                                (q, k, v), dout.to(dtype))

    first, again, other = seeded(1234), seeded(1234), seeded(1235)
    same = all(torch.equal(first[key], again[key]) for key in first)
    differs = not torch.equal(first["out"], other["out"])
    return DropoutResult(backend, dtype, tuple(shape), dropout_p, kept_fraction, kept_limit, parity, same, differs,
                         _backwards_bit_equal(backend, q, k, v, dout.to(dtype), dropout_p))


def _backwards_bit_equal(backend: str, q, k, v, dout, dropout_p: float, times: int = 3) -> bool:
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = causal_attention(q, k, v, dropout_p=dropout_p, backend=backend)
    grads = [torch.autograd.grad(out, (q, k, v), dout, retain_graph=True) for _ in range(times)]
    return all(torch.equal(a, b) for later in grads[1:] for a, b in zip(grads[0], later))

