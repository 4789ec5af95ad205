"""The ext attention as one autograd node, for eager mode: the same op calls, a fraction of the overhead.

Each ext op has its own autograd formula (fastgpt/ext/ops.py, torch.library.register_autograd),
which torch.compile needs: the traced graph holds the ops as single nodes. Eagerly, that costs
three Python autograd nodes per attention call, and torch.library's Python dispatch around every
op call, in the backward too: at a small model's shapes that overhead is larger than the kernels'
own work, and every layer of a training step pays it.

ExtAttention makes the call one node whose forward and backward run the very same op calls as the
per-op formulas compose to (the chain rule written out once below), dispatched straight to their
CPU or CUDA kernels (below the autograd key); on CPU two pairs of them are fused ops that make the
same bits per row block without storing S (unless dropout needs it) or dP
(csrc/cpu/attention_fused.cpp). The results are bit-equal to the per-op path
(tests/test_ext_attention_function.py). Under torch.compile ext_attention keeps the per-op path.
A second derivative raises (once_differentiable): P and S are computed off the graph.

On CPU in float32, and in bfloat16 on AMX (the kernel paths ext.cpu_flash and ext.cpu_flash_amx,
fastgpt/attention/ext_backend.py), the call does not come here: it runs the flash op, causal_attention_flash, whose autograd
node is C++ (csrc/cpu/attention_flash.cpp, attention_flash_amx.cpp):
no T×T matrix stored, P recomputed in the backward. Same math and the same dropout mask, not the
same bits (the sums run in another order); its parity is tests/test_ext_flash.py's.

    forward   S = tril_o(q·kᵀ)            causal_matmul_nt       } on CPU one op, causal_attention_probs,
              P = dropout(softmax(scale·S)) causal_softmax         } per row block; (seed, offset) pick the mask
              out = P·v                    causal_matmul_nn
    backward  dP = tril_o(dO·vᵀ)           causal_matmul_nt
              dv = Σ_group tril_o(P)ᵀ·dO   causal_matmul_tn        (B, H_kv, T_k, D)
              dS = softmax'(dP)            causal_softmax_backward (from P) or _dropout_backward
                                           (from S, P recomputed, the mask regenerated); on CPU
                                           dP and dS are one op, causal_attention_grad_scores
              dq = tril_o(dS)·k            causal_matmul_nn
              dk = Σ_group tril_o(dS)ᵀ·q   causal_matmul_tn
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fastgpt.ext import ops  # noqa: F401  (loads the library: the ops below exist)

# The inputs were validated once, by the attention API (fastgpt/attention/call.py): straight to the ops
_ops = torch.ops.fastgpt


def _kernels_directly():
    """Dispatch below the autograd key: straight to the op's device kernel, past the Python
    autograd layer that torch.library puts around each op (ExtAttention is the node here)."""
    return torch._C._AutoDispatchBelowAutograd()


class ExtAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale: float, dropout_p: float, seed: int, offset: int):
        T_q, T_k = q.shape[2], k.shape[2]
        with _kernels_directly():
            if q.device.type == "cpu":  # nt and the softmax fused per row block; S is returned with dropout only
                p, s = _ops.causal_attention_probs(q, k, scale, dropout_p, seed, offset)  # packed (B, H, N)
            else:
                s = _ops.causal_matmul_nt(q, k)  # packed (B, H, N)
                p = _ops.causal_softmax(s, T_q, T_k, scale, dropout_p, seed, offset)  # packed (B, H, N)
            out = _ops.causal_matmul_nn(p, v, T_q)  # (B, H, T_q, D)
        # Without dropout the softmax's backward reads P; with it, the scores (P is recomputed
        # before dropout and the mask regenerated), while dv still needs the dropped P.
        ctx.save_for_backward(q, k, v, p, s if dropout_p > 0.0 else None)
        ctx.args = (scale, dropout_p, seed, offset)
        return out

    @staticmethod
    @once_differentiable  # P and S were computed off the graph: a second derivative would be wrong
    def backward(ctx, dout):
        q, k, v, p, s = ctx.saved_tensors
        scale, dropout_p, seed, offset = ctx.args
        T_q, T_k, H_kv = q.shape[2], k.shape[2], k.shape[1]
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = dk = dv = None
        with _kernels_directly():
            if need_v:
                dv = _ops.causal_matmul_tn(p, dout, T_k, H_kv)
            if need_q or need_k:
                if dout.device.type == "cpu":  # nt and the softmax's backward fused: dP never stored
                    saved = p if dropout_p == 0.0 else s
                    ds = _ops.causal_attention_grad_scores(dout, v, saved, scale, dropout_p, seed, offset)
                else:
                    dp = _ops.causal_matmul_nt(dout, v)
                    if dropout_p == 0.0:
                        ds = _ops.causal_softmax_backward(dp, p, T_q, T_k, scale)
                    else:
                        ds = _ops.causal_softmax_dropout_backward(dp, s, T_q, T_k, scale, dropout_p, seed, offset)
                if need_q:
                    dq = _ops.causal_matmul_nn(ds, k, T_q)
                if need_k:
                    dk = _ops.causal_matmul_tn(ds, q, T_k, H_kv)
        return dq, dk, dv, None, None, None, None
