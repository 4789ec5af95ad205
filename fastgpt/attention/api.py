"""`attention` and `causal_attention`: the one contract that every attention backend meets.

    out = attention(q, k, v, causal=True, window=None, softcap=0.0, sinks=None, alibi_slopes=None,
                    dropout_p=0.0, scale=None, return_lse=False, backend="auto")
    out = causal_attention(q, k, v, ...)      # attention with causal=True: the lecture's call
    path = select_kernel(q, k, v, ...)        # the kernel path that call runs

    q:    (B, H, T_q, D), any strides (views of a fused qkv projection are fine)
    k, v: (B, H_kv, T_k, D), H_kv dividing H; T_k >= T_q when causal, any T_k otherwise
    out:  (B, H, T_q, D); with return_lse=True, (out, lse (B, H, T_q) float32)

Grouped-query attention (H_kv < H; multi-query at H_kv = 1): the query heads come in H_kv groups
of G = H / H_kv consecutive heads, and query head h reads key/value head h // G:

    query heads   0 1 2 3 4 5        H = 6, H_kv = 2, G = 3
    k, v heads    0 0 0 1 1 1

With T_q == T_k (training), query i attends to keys 0..i (the causal mask, diagonal included):

    keys ->   0 1 2 3
    query 0   x . . .
    query 1   x x . .
    query 2   x x x .
    query 3   x x x x

With T_q < T_k (generation with a KV cache: the queries are the last T_q of T_k tokens) the
diagonal is aligned bottom-right: query i sees keys 0..(T_k - T_q + i). T_q = 2, T_k = 5:

    keys ->   0 1 2 3 4
    query 0   x x x x .       (token 3 of 5)
    query 1   x x x x x       (token 4 of 5: the newest sees everything)

This is the square mask's last T_q rows, so the same call gives the same answer whether the
earlier queries were computed now or in a previous call. (`F.scaled_dot_product_attention`'s
is_causal=True aligns top-left when T_q != T_k, which would hide the cache from the new token.)

The options, in the order they act on one score. Query i sits at key position pos = T_k - T_q + i
in every call, causal or not (the same alignment; bidirectional calls with T_q == T_k have pos = i):

    s = scale · q_i · k_j                       scale: D**-0.5 unless given
    s = softcap · tanh(s / softcap)             softcap > 0 (Gemma-2's convention: after the scale)
    s = s - slope[b, h] · |pos - j|             alibi_slopes (H,) or (B, H) (flash-attention's)
    s = -inf unless j is visible:               causal: j <= pos
                                                window (left, right): pos - left <= j <= pos + right
                                                (-1 or None: that side unbounded; causal means right 0)
    p = exp(s) / (Σ_j exp(s) + exp(sinks[h]))   sinks (H,): one logit per query head that joins the
                                                denominator and takes no value (gpt-oss's)
    out_i = Σ_j dropout(p)_ij · v_j             dropout on the normalised weights, as before
    lse_i = log(Σ_j exp(s) + exp(sinks[h]))     natural log, float32; the sink counted in it

A sliding window of W in transformers' sense (Mistral, Gemma-2, gpt-oss: i - W < j <= i) is
window=(W - 1, 0). causal=False, T_q = 2, T_k = 5, window (1, 1): pos = 3 + i

    keys ->   0 1 2 3 4
    query 0   . . x x x       (pos 3: keys 2..4)
    query 1   . . . x x       (pos 4: keys 3..4; key 5 does not exist)

A row that sees no key (a window beside the keys, possible only with causal=False) has out = 0,
lse = -inf (log of the sink's term alone with sinks) and gradients 0. The lse is not
differentiable: every backend returns it detached (flash-attention's convention), for merging
partial attentions (split-KV decoding, ring attention), which need its value only. Gradients flow
to q, k, v and sinks (dsinks = -Σ_rows p_sink·Δ, Δ = rowsum(dO∘out)); alibi_slopes get none.

Non-finite inputs (NaN, +inf, -inf) anywhere in q, k or v go through softmax(scale·q·kᵀ)·v over
each row's causal window as IEEE arithmetic takes them, the same in every backend:

  - an output row is NaN (all of it) if its query row holds a NaN or an infinity, or a key row it
    attends to holds a NaN; a NaN in a value row it attends to makes that column of it NaN;
  - an infinity in a key enters the scores as IEEE says: a score of +inf or NaN (inf - inf,
    inf·0) makes the row NaN; a score of -inf gives that key the weight 0, as the causal mask
    does; an infinite value gives ±inf (or NaN) in its column of every row that attends to it;
  - never a finite number, zeros included, where the formula gives NaN;
  - other batch entries and key/value heads (with their query heads) are untouched: outputs and
    gradients bit for bit what they are without the bad values. Within the (batch, key/value
    head) slice, a bad query row changes its own output row only; a bad key or value row may
    also turn rows that do not attend to it NaN (the products run over whole tiles, where a
    masked weight 0 times NaN or inf is NaN, as in PyTorch's kernels), and dq, dk, dv may be
    non-finite anywhere in the slice. A row whose every score is -inf (each key it sees holds an
    infinity) is left unspecified (NaN, or zeros in sdpa on CPU).

Finite float16 inputs stay finite where the formula in float64 is: the fused backends accumulate
the scores in float32, and naive multiplies q by the scale before the product, so |q| near 1e4 at
D = 64 does not overflow (naive runs the lecture's math in the input dtype: a scaled score beyond
float16's 65504 would).

Bad input is refused here, once (fastgpt/attention/call.py), with an error naming the argument,
the value and the limit, so that backends can assume well-formed tensors. The registry
(registry.py) then chooses the kernel path, logs the choice and counts the call in `kernels_ran()`.
"""

from __future__ import annotations

from typing import Optional

import torch

from fastgpt.attention.call import AttentionCall
from fastgpt.attention.registry import KernelPath, backend_names, choose, get_backend, record


def select_kernel(q: torch.Tensor, k: Optional[torch.Tensor] = None, v: Optional[torch.Tensor] = None, *,
                  dropout_p: float = 0.0, scale: Optional[float] = None, backend: str = "auto",
                  **options) -> KernelPath:
    """The kernel path `attention` runs for this call (`.name`, and `.backend` its family); k and v
    default to q (self-attention shapes); `options` as attention takes them. Raises as attention
    does where nothing can run it: never a silent substitute."""
    k = q if k is None else k
    v = k if v is None else v
    return choose(AttentionCall.of(q, k, v, dropout_p, scale, **options), backend)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    window: Optional[tuple[Optional[int], Optional[int]]] = None,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Scaled-dot-product attention with every option the module docstring defines.

    Args:
        q: (B, H, T_q, D); k, v: (B, H_kv, T_k, D) with H_kv dividing H, and T_k >= T_q when
            causal; one dtype (float16, bfloat16, float32, float64), one device, any strides.
        causal: whether query i sees no key right of its position T_k - T_q + i.
        window: (left, right) keys around each query's position; -1 or None unbounded.
        softcap: c > 0 soft-caps every scaled score to c·tanh(s / c); 0 turns it off.
        sinks: (H,) floating tensor, one learnable logit per query head (gets a gradient).
        alibi_slopes: (H,) or (B, H) floating tensor: -slope·|pos - j| added to the scores.
        dropout_p: probability of zeroing an attention weight after the softmax, in [0, 1). Pass
            0.0 in evaluation; kept weights are scaled by 1/(1 - dropout_p).
        scale: multiplies q·kᵀ before everything else; None means D**-0.5.
        return_lse: also return each row's log-sum-exp (B, H, T_q) float32, detached.
        backend: "auto" (the first kernel path that takes the call, never one that refuses an
            option), a backend ("naive", "sdpa", "ext", "triton": its best path for the call) or
            one kernel path ("ext.cpu_packed"; `fastgpt.attention.kernel_path_names()`).

    Returns:
        out (B, H, T_q, D), same dtype and device as q; (out, lse) with return_lse. NaN and
        infinities propagate row by row as the module docstring says, in every backend.
    """
    call = AttentionCall.of(q, k, v, dropout_p, scale, causal=causal, window=window, softcap=softcap,
                            sinks=sinks, alibi_slopes=alibi_slopes, return_lse=return_lse)
    path = choose(call, backend)
    record(path)
    return path.fn(q, k, v, call)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                     scale: Optional[float] = None, backend: str = "auto", **options):
    """Causal scaled-dot-product attention, softmax(scale·q·kᵀ + causal mask) · v: `attention`
    with causal=True (the lecture's call; `options` as attention takes them, but causal).

    Args:
        q: (B, H, T_q, D); k, v: (B, H_kv, T_k, D) with T_k >= T_q (the causal diagonal aligned
            bottom-right, see above) and H_kv dividing H; one dtype (float16, bfloat16, float32,
            float64), one device, any strides.
        dropout_p: probability of zeroing an attention weight after the softmax, in [0, 1).
        scale: multiplies q·kᵀ before the softmax; None means D**-0.5.
        backend: as attention takes it.

    Returns:
        (B, H, T_q, D) tensor, same dtype and device as q (with return_lse, also the lse).
    """
    if "causal" in options:
        raise TypeError("causal_attention is always causal; call fastgpt.attention.attention(..., causal=False)")
    return attention(q, k, v, dropout_p=dropout_p, scale=scale, backend=backend, **options)


def attention_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float,
                        scale: Optional[float] = None, backend: str = "auto",
                        **options) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, keep): attention's output and the dropout mask that call drew, keep (B, H, T_q, T_k)
    bool, True where a weight was kept (as flash-attention's return_attn_probs gives it back).
    naive_attention(q, k, v, dropout_p, scale, keep_mask=keep, **options) is then that call's
    exact reference. Only backends whose kernels draw a mask that can be rebuilt give it: "triton"
    and "ext". With return_lse=True, out is (out, lse)."""
    return run_with_mask(q, k, v, AttentionCall.of(q, k, v, dropout_p, scale, **options), backend)


def run_with_mask(q, k, v, call: AttentionCall, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, keep) of a validated call on `backend`'s path, through its with_dropout_mask."""
    path = choose(call, backend)
    owner = get_backend(path.backend)
    if owner.with_dropout_mask is None:
        able = [name for name in backend_names() if get_backend(name).with_dropout_mask is not None]
        raise ValueError(f"backend={path.backend!r} cannot give back its dropout mask; these can: {', '.join(able)}")
    record(path)
    return owner.with_dropout_mask(q, k, v, call, path)


def causal_attention_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float,
                               scale: Optional[float] = None,
                               backend: str = "auto", **options) -> tuple[torch.Tensor, torch.Tensor]:
    """attention_with_mask with causal=True."""
    if "causal" in options:
        raise TypeError("causal_attention_with_mask is always causal; call attention_with_mask(..., causal=False)")
    return attention_with_mask(q, k, v, dropout_p=dropout_p, scale=scale, backend=backend, **options)
