"""`causal_softmax` with its dropout seed as a tensor, for torch.compile.

The ext ops take the dropout seed as an int. Drawn eagerly (`int(torch.randint(...))`) that int
is data-dependent, and dynamo breaks the graph there. Here the seed stays a 0-dim int64 tensor
until it reaches these two opaque ops, which take the int inside:

    probs = causal_softmax_seeded(scores, T_q, T_k, scale, dropout_p, seed, offset)    packed (B, H, N)
    dscores = causal_softmax_seeded_backward(grad, scores, T_q, T_k, scale, dropout_p, seed, offset)

Same kernels, same mask for the same seed; dynamo and AOT autograd see one node each.
"""

from __future__ import annotations

import torch

from fastgpt.ext import ops


@torch.library.custom_op("fastgpt::causal_softmax_seeded", mutates_args=())
def causal_softmax_seeded(scores: torch.Tensor, T_q: int, T_k: int, scale: float, dropout_p: float,
                          seed: torch.Tensor, offset: int) -> torch.Tensor:
    return ops.causal_softmax(scores, T_q, T_k, scale, dropout_p, int(seed), offset)


@torch.library.custom_op("fastgpt::causal_softmax_seeded_backward", mutates_args=())
def causal_softmax_seeded_backward(grad: torch.Tensor, scores: torch.Tensor, T_q: int, T_k: int, scale: float,
                                   dropout_p: float, seed: torch.Tensor, offset: int) -> torch.Tensor:
    # P is recomputed from the scores and the mask regenerated from (seed, offset), as in ops.py
    return torch.ops.fastgpt.causal_softmax_dropout_backward(grad, scores, T_q, T_k, scale, dropout_p, int(seed),
                                                             offset)


@causal_softmax_seeded.register_fake
def _(scores, T_q, T_k, scale, dropout_p, seed, offset):
    return torch.empty_like(scores)


@causal_softmax_seeded_backward.register_fake
def _(grad, scores, T_q, T_k, scale, dropout_p, seed, offset):
    return torch.empty_like(scores)


def _setup_context(ctx, inputs, output):
    scores, T_q, T_k, scale, dropout_p, seed, offset = inputs
    ctx.args = (T_q, T_k, scale, dropout_p, offset)
    ctx.save_for_backward(scores, seed)


def _backward(ctx, grad):
    scores, seed = ctx.saved_tensors
    T_q, T_k, scale, dropout_p, offset = ctx.args
    ds = causal_softmax_seeded_backward(grad, scores, T_q, T_k, scale, dropout_p, seed, offset)
    return ds, None, None, None, None, None, None


causal_softmax_seeded.register_autograd(_backward, setup_context=_setup_context)


def draw_seed() -> torch.Tensor:
    """A 0-dim int64 seed from torch's default CPU generator: torch.manual_seed makes it repeatable."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)
