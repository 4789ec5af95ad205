"""Float64 references of the ext ops and the per-op form of fastgpt.verify.parity's tolerance rule.

The references compute densely, (T_q, T_k) with the diagonal aligned bottom-right (query i sees
keys j <= T_k - T_q + i), and pack / unpack with fastgpt.ext.layout at the boundary, so that they
take and give what the ops do. Grouped-query operands (H_kv heads dividing H) are copied per query
head here (repeat_interleave: the plain math the kernels must match without copying), and tn's sum
over a group is a plain sum over the copies' gradients.

Each op is checked like a backend, with fastgpt.verify.parity.compare: its output and input gradients
against the reference in float64, within the parity rule of the reference run in the same dtype.
"""

from __future__ import annotations

import torch

from fastgpt.attention.naive import future_mask  # noqa: F401  (tests import it from here)
from fastgpt.ext import layout
from fastgpt.verify.parity import ParityResult, compare


def valid_mask(T_q: int, T_k: int, device=None) -> torch.Tensor:
    """(N,) bool over the packed layout of (T_q, T_k): True at the stored causal elements j <= o + i,
    False above the diagonal and in the padding."""
    dense = torch.ones(1, 1, T_q, T_k, device=device).tril(T_k - T_q)
    return layout.pack(dense, T_q, T_k).bool()[0, 0]


def per_query_head(x, H):
    """x (B, H_kv, T, D) -> (B, H, T, D), head h a copy of x's head h // (H / H_kv)."""
    return x if x.shape[1] == H else x.repeat_interleave(H // x.shape[1], dim=1)


def ref_matmul_nt(a, b):
    """a (B, H, T_q, D), b (B, H_kv, T_k, D) -> packed (B, H, N)."""
    T_q, T_k = a.shape[2], b.shape[2]
    return layout.pack(a @ per_query_head(b, a.shape[1]).transpose(-2, -1), T_q, T_k)


def ref_matmul_nn(p, x, T_q):
    """p packed (B, H, N), x (B, H_kv, T_k, D) -> (B, H, T_q, D)."""
    return layout.unpack(p, T_q, x.shape[2]) @ per_query_head(x, p.shape[1])


def ref_matmul_tn(p, x, T_k, kv_heads=None):
    """p packed (B, H, N), x (B, H, T_q, D) -> (B, kv_heads, T_k, D), each group of H / kv_heads
    query heads summed."""
    out = layout.unpack(p, x.shape[2], T_k).transpose(-2, -1) @ x  # (B, H, T_k, D)
    B, H, _, D = out.shape
    H_kv = H if kv_heads is None else kv_heads
    return out.view(B, H_kv, H // max(H_kv, 1), T_k, D).sum(2)


def ref_softmax(scores, T_q, T_k, scale, keep=None, dropout_p=0.0):
    """Packed in, packed out; `keep` a dense (B, H, T_q, T_k) bool mask."""
    return layout.pack(ref_probs(layout.unpack(scores, T_q, T_k), scale, keep, dropout_p), T_q, T_k)


def ref_probs(scores, scale, keep=None, dropout_p=0.0):
    """Dense (..., T_q, T_k) scores -> the dense attention weights, dropout from `keep`."""
    T_q, T_k = scores.shape[-2:]
    p = torch.softmax((scores * scale).masked_fill(future_mask(T_q, T_k, scores.device), float("-inf")), dim=-1)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    return p


def ref_attention(q, k, v, dropout_p=0.0, scale=None, keep=None):
    """Causal attention, q (B, H, T_q, D), k, v (B, H_kv, T_k, D), T_q <= T_k, H_kv dividing H, in q's dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    H = q.shape[1]
    return ref_probs(q @ per_query_head(k, H).transpose(-2, -1), scale, keep, dropout_p) @ per_query_head(v, H)


def random_packed(B, H, T_q, T_k, seed=0, fill=None):
    """A float64 packed causal matrix, randn / sqrt(T_k) where j <= o + i; elsewhere (above the
    diagonal and in the padding) `fill` if given, else more randn: values the ops must not read."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(B, H, layout.packed_size(T_q, T_k), generator=g, dtype=torch.float64) * max(T_k, 1) ** -0.5
    if fill is not None:
        p = p.masked_fill(~valid_mask(T_q, T_k), fill)
    return p


def op_parity(op, reference, inputs, dtype, seed: int = 1):
    """(errors, limits) of op's output ('out') and input gradients ('grad0', 'grad1', ...) against
    `reference` in float64.

    inputs: float64 tensors; op runs on them cast to `dtype` (strides kept where the cast allows),
    the upstream gradient is a randn of the output's shape."""
    grad_names = [f"grad{i}" for i in range(len(inputs))]
    result = compare(op, reference, inputs, _dout(reference, inputs, seed), dtype, grad_names)
    return result.errors, result.limits


def _dout(reference, inputs, seed):
    with torch.no_grad():
        shape = reference(*inputs).shape
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_within(errors: dict, limits: dict, what: str) -> None:
    result = ParityResult(errors, limits)
    assert result.ok, f"{what}: {result.explain()}"


def assert_same_at_one_thread(run):
    """run() -> list of tensors: bit-equal at one thread and at torch's thread count (the kernels
    split work by cost, never by result: no sum may depend on where a thread's share ends)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, run()):
        assert torch.equal(a, b)
