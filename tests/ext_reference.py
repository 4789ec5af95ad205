"""Float64 references of the ext ops and the per-op form of fastgpt.parity's tolerance rule.

Each op is checked like a backend: its error against the float64 reference may be at most
OUTPUT_FACTOR (output) / GRAD_FACTOR (input gradients) × the error of the reference math run in
the same dtype, plus the dtype's floor from fastgpt.parity.TOLERANCES. No second tolerance table.
"""

from __future__ import annotations

import torch

from fastgpt.parity import GRAD_FACTOR, OUTPUT_FACTOR, TOLERANCES


def future_mask(T: int, device="cpu") -> torch.Tensor:
    """(T, T) bool, True strictly above the diagonal: the keys a query may not see."""
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


def ref_matmul_nt(a, b):
    return torch.tril(a @ b.transpose(-2, -1))


def ref_matmul_nn(p, x):
    return torch.tril(p) @ x


def ref_matmul_tn(p, x):
    return torch.tril(p).transpose(-2, -1) @ x


def ref_softmax(scores, scale, keep=None, dropout_p=0.0):
    T = scores.shape[-1]
    p = torch.softmax((scores * scale).masked_fill(future_mask(T, scores.device), float("-inf")), dim=-1)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return p


def _run(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(dout)
    return [out.detach()] + [t.grad for t in leaves]


def op_parity(op, reference, inputs, dtype, seed: int = 1):
    """(errors, limits) of op's output and input gradients against `reference` in float64.

    inputs: float64 tensors; op runs on them cast to `dtype` (strides kept where the cast allows),
    the upstream gradient is a randn of the output's shape."""
    dout64 = _dout(reference, inputs, seed)
    ref = _run(reference, inputs, dout64)
    cast = [t.to(dtype) for t in inputs]
    same_dtype = _run(reference, cast, dout64.to(dtype))
    got = _run(op, cast, dout64.to(dtype))
    floor = TOLERANCES[dtype]
    errors, limits = {}, {}
    for i, (g, n, r) in enumerate(zip(got, same_dtype, ref)):
        key = "out" if i == 0 else f"grad{i - 1}"
        factor, base = (OUTPUT_FACTOR, floor.out) if i == 0 else (GRAD_FACTOR, floor.grad)
        errors[key] = (g.double() - r).abs().max().item()
        limits[key] = factor * (n.double() - r).abs().max().item() + base
    return errors, limits


def _dout(reference, inputs, seed):
    with torch.no_grad():
        shape = reference(*inputs).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_within(errors: dict, limits: dict, what: str) -> None:
    bad = {k: (errors[k], limits[k]) for k in errors if not errors[k] <= limits[k]}
    assert not bad, f"{what}: error above the parity limit for " + ", ".join(
        f"{k} ({e:.3g} > {lim:.3g})" for k, (e, lim) in bad.items())
