"""Fused causal attention, backward: dQ, dK, dV from (q, k, v, out, lse, dout), FlashAttention-2 style.

With S = scale·q·kᵀ (causal), P = softmax(S), Z = keep/(1-p) the dropout factor, A = P∘Z and
out = A·v, the gradients are

    dV = Aᵀ·dO
    dP = (dO·vᵀ)∘Z
    dS = P∘(dP - Δ),   Δ_i = Σ_j dP_ij·P_ij = rowsum(dO∘out)_i   (dropout included)
    dQ = scale·dS·k,   dK = scale·dSᵀ·q

P is recomputed from the stored base-2 log-sum-exp, so nothing of size T×T exists. Three kernels:

    _attn_bwd_preprocess   Δ = rowsum(dO∘out)          # read 2·T·D, write T
    _attn_bwd_dkdv         one program per key block: walks the query blocks at and below the
                           diagonal, accumulates dK, dV in registers, writes them once
    _attn_bwd_dq           one program per query block: walks the key blocks at and left of the
                           diagonal, accumulates dQ, writes it once

With T_q < T_k queries (the forward's bottom-right diagonal: query i at position o + i, o = T_k -
T_q) the same walks shift by o: key j is seen by the queries i >= j - o, so a key block's diagonal
band starts at query block floor(max(j0 - o, 0) / BLOCK_M) and the queries from j0 + BLOCK_N - o
(rounded up to a query block) on see the whole key block. Any BLOCK_M, BLOCK_N work.

The options walk the blocks the forward walked (a band's edges masked, the blocks between them
not, the rest skipped: _band_blocks) and recompute the same scores: soft-capping multiplies dS by
its derivative 1 - tanh², ALiBi's bias and the sinks (inside lse) need nothing more. A row that saw
no key has lse = -inf; its P is masked with where (exp2(s + inf) is inf), so its gradients are 0.
The sinks' gradient is the host's (flash_attention_ops.sinks_grad).

Grouped-query attention (GROUP = H / H_kv query heads per key/value head): dQ reads the shared
k, v head in place; dK and dV of a key/value head are sums over its GROUP query heads, and one
dK/dV program walks all of them, query head after query head, into the same registers.

Packed sequences (VARLEN) work as in the forward: the grid's z is the sequence, a program moves its
pointers to its sequence's first query and key rows and exits when its block lies past the
sequence's end; lse and Δ are (H, total_q).

Every output element is written by exactly one program and summed in a fixed order, so the
backward is deterministic (bit-equal across runs) without atomics. The price is computing
q·kᵀ and dO·vᵀ twice (once per kernel): 7 matmuls of T²·D per slice in place of 5.
"""

import triton
import triton.language as tl

from fastgpt.kernels.flash_attention import (BAND, DIAGONAL, INTERPRETED, LOG2_E, NO_MASK, _at_row, _band_blocks,
                                             _dropout_keep, _load_tile, _option_scores, _sequence, _visible,
                                             loop_bound)


@triton.jit(do_not_specialize=["H", "T"])  # one compiled variant for every T (here T = T_q)
def _attn_bwd_preprocess(Out, DO, Delta,
                         stride_oz, stride_oh, stride_om, stride_ok,
                         stride_dz, stride_dh, stride_dm, stride_dk,
                         H, T, Cu_seqlens_q,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                         VARLEN: tl.constexpr):
    """Grid (cdiv(T, BLOCK_M), H, B). Delta: (B, H, T) fp32 contiguous. VARLEN: grid (cdiv(max T_q,
    BLOCK_M), H, B sequences), Out and DO (1, H, total_q, D) with a z stride of 0, T = total_q, Delta
    (H, total_q): a sequence's rows start at a 64-bit offset, as in the other kernels."""
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    off_h = tl.program_id(1)
    off_z = tl.program_id(2)
    rows = T  # each head's row of Delta
    if VARLEN:  # off_z is a packed sequence: its queries' rows q_start .. q_start + T - 1
        q_start = tl.load(Cu_seqlens_q + off_z)
        T = tl.load(Cu_seqlens_q + off_z + 1) - q_start
        if tl.program_id(0) * BLOCK_M >= T:
            return
        Out, DO, Delta = _at_row(Out, q_start, stride_om), _at_row(DO, q_start, stride_dm), Delta + q_start
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    o = _load_tile(Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh
                   + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok,
                   offs_m, offs_d, T, HEAD_DIM, True, PAD_D)
    do = _load_tile(DO + off_z.to(tl.int64) * stride_dz + off_h.to(tl.int64) * stride_dh
                    + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dk,
                    offs_m, offs_d, T, HEAD_DIM, True, PAD_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    if VARLEN:
        tl.store(Delta + off_h.to(tl.int64) * rows + offs_m, delta, mask=offs_m < T)
    else:
        tl.store(Delta + (off_z * H + off_h).to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, Delta_base, seed,
                         stride_qm, stride_qk, stride_dom, stride_dok,
                         off_bh, start_n, offs_n, offs_d, lo, hi, T_Q, offset, qk_scale, dropout_p, dropout_scale,
                         T_K, window_left, window_right, softcap_scale, softcap_log2, slope,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                         HEAD_DIM_PAD: tl.constexpr,
                         MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Accumulates dK, dV (BLOCK_N, HEAD_DIM_PAD) fp32 of one key block over query blocks [lo, hi).

    Works on transposed tiles (keys down, queries across) so that dK and dV come out row-major.
    Query rows past T_q load as zero q and dO with lse = Δ = 0: their pᵀ is 1 (0 with ALiBi, whose
    bias could overflow it), but every term it enters is multiplied by a zero dO or q, so no row mask
    is needed in the causal walk (the band's edge blocks mask them; its unmasked blocks hold none).
    """
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    for start_m in range(loop_bound(lo) if INTERPRETED else lo, loop_bound(hi) if INTERPRETED else hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if DROPOUT:
            # before the tiles of the step are live (fewer registers at once); the mask in its
            # (queries, keys) orientation, turned to this kernel's (keys, queries)
            keepT = tl.trans(_dropout_keep(seed, off_bh, offs_m, start_n, dropout_p, BLOCK_N))
        qT = _load_tile(Q_base + offs_d[:, None] * stride_qk + offs_m[None, :] * stride_qm,
                        offs_d, offs_m, HEAD_DIM, T_Q, PAD_D, True)  # (HEAD_DIM_PAD, BLOCK_M)
        if ALIBI:  # a padded row's bias is any number: lse = inf makes its pᵀ 0, never exp2 of it
            lse = tl.load(LSE_base + offs_m, mask=offs_m < T_Q, other=float("inf"))
        else:
            lse = tl.load(LSE_base + offs_m, mask=offs_m < T_Q, other=0.0)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if SOFTCAP or ALIBI:
            sT, tT = _option_scores(qkT, offs_m[None, :], offs_n[:, None], offset, qk_scale, softcap_scale,
                                    softcap_log2, slope, SOFTCAP, ALIBI)
            pT = tl.math.exp2(sT - lse[None, :])
        else:
            pT = tl.math.exp2(qkT * qk_scale - lse[None, :])
        if MASK == DIAGONAL:
            pT = tl.where(offs_m[None, :] >= (offs_n - offset)[:, None], pT, 0.0)  # o + i >= j
        elif MASK == BAND:  # where, not a product: a row that sees no key has pᵀ = exp2(s + inf)
            pT = tl.where(_visible(offs_m[None, :], offs_n[:, None], offset, window_left, window_right, T_Q, T_K),
                          pT, 0.0)
        do = _load_tile(DO_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dok,
                        offs_m, offs_d, T_Q, HEAD_DIM, True, PAD_D)  # (BLOCK_M, HEAD_DIM_PAD)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        if DROPOUT:
            dv = tl.dot(tl.where(keepT, pT * dropout_scale, 0.0).to(do.dtype), do, dv,
                        input_precision=DOT_PRECISION)
            dpT = tl.where(keepT, dpT * dropout_scale, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        delta = tl.load(Delta_base + offs_m, mask=offs_m < T_Q, other=0.0)
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)  # d(c·tanh(x/c))/dx
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_walk(dk, dv, k, v, Q_base, DO_base, LSE_base, Delta_base, seed,
               stride_qm, stride_qk, stride_dom, stride_dok,
               off_bh, start_n, offs_n, offs_d, lo, mid_lo, mid_hi, hi, T_Q, T_K, offset, qk_scale, dropout_p,
               dropout_scale, window_left, window_right, softcap_scale, softcap_log2, slope,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Walks the query blocks of one query head that see key block start_n (_dkdv_query_blocks):
    [lo, mid_lo) masked (the diagonal, or the band's edge), [mid_lo, mid_hi) unmasked, and with a
    band [mid_hi, hi) masked."""
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, Delta_base, seed,
                                  stride_qm, stride_qk, stride_dom, stride_dok, off_bh, start_n, offs_n,
                                  offs_d, lo, mid_lo, T_Q, offset, qk_scale, dropout_p, dropout_scale, T_K,
                                  window_left, window_right, softcap_scale, softcap_log2, slope,
                                  BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, BAND if BANDED else DIAGONAL, DROPOUT,
                                  DOT_PRECISION, SOFTCAP, ALIBI)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, Delta_base, seed,
                                  stride_qm, stride_qk, stride_dom, stride_dok, off_bh, start_n, offs_n,
                                  offs_d, mid_lo, mid_hi, T_Q, offset, qk_scale, dropout_p, dropout_scale, T_K,
                                  window_left, window_right, softcap_scale, softcap_log2, slope,
                                  BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, NO_MASK, DROPOUT, DOT_PRECISION,
                                  SOFTCAP, ALIBI)
    if BANDED:
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, Delta_base, seed,
                                      stride_qm, stride_qk, stride_dom, stride_dok, off_bh, start_n, offs_n,
                                      offs_d, mid_hi, hi, T_Q, offset, qk_scale, dropout_p, dropout_scale, T_K,
                                      window_left, window_right, softcap_scale, softcap_log2, slope,
                                      BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, BAND, DROPOUT, DOT_PRECISION,
                                      SOFTCAP, ALIBI)
    return dk, dv


@triton.jit
def _dkdv_query_blocks(start_n, offset, T_Q, window_left, window_right,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BANDED: tl.constexpr):
    """(lo, mid_lo, mid_hi, hi): the query blocks that see key block start_n. Causal: query i sees
    key j iff o + i >= j: queries [lo, mid_lo) straddle the diagonal (from the block of the first
    query that sees key start_n), [mid_lo, mid_hi = T_q) see every key of the block. BANDED: key j
    is seen by the queries at positions j - right .. j + left: [lo, mid_lo) and [mid_hi, hi) are
    the edges, whole query blocks between them see every key, the rest never see any."""
    if BANDED:
        lo, mid_lo, mid_hi, hi = _band_blocks(start_n - offset, start_n + BLOCK_N - 1 - offset, window_right,
                                              window_left, T_Q, BLOCK_M)
    else:
        lo = (tl.maximum(start_n - offset, 0) // BLOCK_M) * BLOCK_M
        mid_lo = tl.minimum(tl.maximum(start_n + BLOCK_N - offset, 0), T_Q)
        mid_lo = ((mid_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
        mid_hi = T_Q
        hi = T_Q
    return lo, mid_lo, mid_hi, hi


@triton.jit(do_not_specialize=["H", "T_Q", "T_K", "window_left", "window_right"])  # GROUP: see the header
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, Delta, Seed,
                   stride_qz, stride_qh, stride_qm, stride_qk,
                   stride_kz, stride_kh, stride_kn, stride_kk,
                   stride_vz, stride_vh, stride_vn, stride_vk,
                   stride_doz, stride_doh, stride_dom, stride_dok,
                   stride_dkz, stride_dkh, stride_dkn, stride_dkk,
                   H, GROUP, T_Q, T_K, scale, qk_scale, dropout_p, dropout_scale, Cu_seqlens_q, Cu_seqlens_k,
                   Alibi, stride_az, stride_ah, window_left, window_right, softcap_scale, softcap_log2,
                   HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr):
    """Grid (cdiv(T_K, BLOCK_N), H / GROUP, B). Q, DO: (B, H, T_Q, HEAD_DIM); K, V and DK, DV
    (B, H / GROUP, T_K, HEAD_DIM), DK and DV sharing one layout (stride_dk*); the options as the
    forward takes them (the sinks live in LSE). VARLEN: as the forward (grid (cdiv(max T_k,
    BLOCK_N), H / GROUP, B sequences), T_Q and T_K the totals, LSE and Delta (H, total_q))."""
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    off_hkv = tl.program_id(1)
    off_z = tl.program_id(2)
    start_n = tl.program_id(0) * BLOCK_N
    rows_q = T_Q  # each head's row of LSE and Delta
    if VARLEN:  # off_z is a packed sequence
        q_start, k_start, T_Q, T_K = _sequence(Cu_seqlens_q, Cu_seqlens_k, off_z)
        if start_n >= T_K:  # past the sequence's end: the grid covers the longest one
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    K_base = K + off_z.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    V_base = V + off_z.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
    if VARLEN:
        K_base, V_base = _at_row(K_base, k_start, stride_kn), _at_row(V_base, k_start, stride_vn)
    k = _load_tile(K_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kk,
                   offs_n, offs_d, T_K, HEAD_DIM, True, PAD_D)  # (BLOCK_N, HEAD_DIM_PAD)
    v = _load_tile(V_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vk,
                   offs_n, offs_d, T_K, HEAD_DIM, True, PAD_D)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)

    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], tl.float32)
    offset = T_K - T_Q
    lo, mid_lo, mid_hi, hi = _dkdv_query_blocks(start_n, offset, T_Q, window_left, window_right,
                                                BLOCK_M, BLOCK_N, BANDED)
    # the query heads sharing k and v, in order: a fixed summation order
    for g in range(0, loop_bound(GROUP) if INTERPRETED else GROUP):
        off_h = off_hkv * GROUP + g
        off_bh = off_z * H + off_h
        Q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
        DO_base = DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
        LSE_base = LSE + off_bh.to(tl.int64) * rows_q
        Delta_base = Delta + off_bh.to(tl.int64) * rows_q
        if VARLEN:  # the sequence's rows; its lse and Δ from q_start in each head's row of total_q
            Q_base, DO_base = _at_row(Q_base, q_start, stride_qm), _at_row(DO_base, q_start, stride_dom)
            LSE_base = LSE + off_h.to(tl.int64) * rows_q + q_start
            Delta_base = Delta + off_h.to(tl.int64) * rows_q + q_start
        slope = 0.0
        if ALIBI:  # per query head
            slope = tl.load(Alibi + off_z * stride_az + off_h * stride_ah) * LOG2_E
        dk, dv = _dkdv_walk(dk, dv, k, v, Q_base, DO_base, LSE_base, Delta_base, seed,
                            stride_qm, stride_qk, stride_dom, stride_dok,
                            off_bh, start_n, offs_n, offs_d, lo, mid_lo, mid_hi, hi, T_Q, T_K, offset, qk_scale,
                            dropout_p, dropout_scale, window_left, window_right, softcap_scale, softcap_log2, slope,
                            BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, DROPOUT, DOT_PRECISION, BANDED, SOFTCAP, ALIBI)
    dk = dk * scale  # S = scale·q·kᵀ

    out_offs = offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkk
    out_mask = offs_n[:, None] < T_K
    if PAD_D:
        out_mask = out_mask & (offs_d[None, :] < HEAD_DIM)
    slice_off = off_z.to(tl.int64) * stride_dkz + off_hkv.to(tl.int64) * stride_dkh
    if VARLEN:
        slice_off += k_start.to(tl.int64) * stride_dkn  # 64 bits: a packed batch may hold more than 2³¹ elements
    tl.store(DK + slice_off + out_offs, dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + slice_off + out_offs, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, seed,
                       stride_kn, stride_kk, stride_vn, stride_vk,
                       off_bh, offs_m, offset, offs_d, lo, hi, T_K, qk_scale, dropout_p, dropout_scale,
                       T_Q, window_left, window_right, softcap_scale, softcap_log2, slope,
                       BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                       MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Accumulates dQ (BLOCK_M, HEAD_DIM_PAD) fp32 of one query block over key blocks [lo, hi);
    query i sits at key position offset + i.
    Unmasked blocks hold only keys in bounds that every row sees: no masks."""
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    for start_n in range(loop_bound(lo) if INTERPRETED else lo, loop_bound(hi) if INTERPRETED else hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if DROPOUT:
            keep = _dropout_keep(seed, off_bh, offs_m, start_n, dropout_p, BLOCK_N)  # before the tiles are live
        kT = _load_tile(K_base + offs_d[:, None] * stride_kk + offs_n[None, :] * stride_kn,
                        offs_d, offs_n, HEAD_DIM, T_K, PAD_D, MASK != NO_MASK)  # (HEAD_DIM_PAD, BLOCK_N)
        vT = _load_tile(V_base + offs_d[:, None] * stride_vk + offs_n[None, :] * stride_vn,
                        offs_d, offs_n, HEAD_DIM, T_K, PAD_D, MASK != NO_MASK)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if SOFTCAP or ALIBI:
            s, t = _option_scores(qk, offs_m[:, None], offs_n[None, :], offset, qk_scale, softcap_scale,
                                  softcap_log2, slope, SOFTCAP, ALIBI)
            p = tl.math.exp2(s - lse[:, None])
        else:
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASK == DIAGONAL:
            p = tl.where(offs_m[:, None] >= (offs_n - offset)[None, :], p, 0.0)
        elif MASK == BAND:  # where, not a product: a row that sees no key has p = exp2(s + inf)
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], offset, window_left, window_right, T_Q, T_K),
                         p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        if DROPOUT:
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)  # d(c·tanh(x/c))/dx
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_walk(dq, q, do, lse, delta, K_base, V_base, seed,
             stride_kn, stride_kk, stride_vn, stride_vk, off_bh, offs_m, offset, offs_d,
             first, T_Q, T_K, qk_scale, dropout_p, dropout_scale,
             window_left, window_right, softcap_scale, softcap_log2, slope,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
             DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
             BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """The key blocks the forward visited for the query block whose first query sits at key
    position `first` (flash_attention._fwd_walk): causal, keys [0, lo) unmasked and [lo, hi) on
    the diagonal; BANDED, the band's edges masked and the blocks between them not."""
    if BANDED:
        lo, mid_lo, mid_hi, hi = _band_blocks(first, first + BLOCK_M - 1, window_left, window_right, T_K, BLOCK_N)
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, seed, stride_kn, stride_kk, stride_vn,
                                stride_vk, off_bh, offs_m, offset, offs_d, lo, mid_lo, T_K, qk_scale, dropout_p,
                                dropout_scale, T_Q, window_left, window_right, softcap_scale, softcap_log2, slope,
                                BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, BAND, DROPOUT, DOT_PRECISION, SOFTCAP, ALIBI)
    else:
        mid_lo = 0
        mid_hi = (first // BLOCK_N) * BLOCK_N
        hi = tl.minimum(first + BLOCK_M, T_K)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, seed, stride_kn, stride_kk, stride_vn, stride_vk,
                            off_bh, offs_m, offset, offs_d, mid_lo, mid_hi, T_K, qk_scale, dropout_p, dropout_scale,
                            T_Q, window_left, window_right, softcap_scale, softcap_log2, slope,
                            BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, NO_MASK, DROPOUT, DOT_PRECISION, SOFTCAP, ALIBI)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, seed, stride_kn, stride_kk, stride_vn, stride_vk,
                            off_bh, offs_m, offset, offs_d, mid_hi, hi, T_K, qk_scale, dropout_p, dropout_scale,
                            T_Q, window_left, window_right, softcap_scale, softcap_log2, slope,
                            BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, BAND if BANDED else DIAGONAL, DROPOUT, DOT_PRECISION,
                            SOFTCAP, ALIBI)
    return dq


@triton.jit(do_not_specialize=["H", "T_Q", "T_K", "window_left", "window_right"])  # GROUP: see the header
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, Delta, Seed,
                 stride_qz, stride_qh, stride_qm, stride_qk,
                 stride_kz, stride_kh, stride_kn, stride_kk,
                 stride_vz, stride_vh, stride_vn, stride_vk,
                 stride_doz, stride_doh, stride_dom, stride_dok,
                 stride_dqz, stride_dqh, stride_dqm, stride_dqk,
                 H, GROUP, T_Q, T_K, scale, qk_scale, dropout_p, dropout_scale, Cu_seqlens_q, Cu_seqlens_k,
                 Alibi, stride_az, stride_ah, window_left, window_right, softcap_scale, softcap_log2,
                 HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, VARLEN: tl.constexpr):
    """Grid (cdiv(T_Q, BLOCK_M), H, B). K, V: (B, H / GROUP, T_K, HEAD_DIM). VARLEN: as the forward."""
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    off_h = tl.program_id(1)
    off_z = tl.program_id(2)
    off_bh = off_z * H + off_h
    start_m = tl.program_id(0) * BLOCK_M
    lse_base, delta_base, lse_row, lse_stride = LSE, Delta, off_bh, T_Q  # row off_bh of the (B·H, T_Q) lse, Δ
    if VARLEN:  # off_z is a packed sequence; T_Q came in as total_q, each head's lse row (lse_stride)
        q_start, k_start, T_Q, T_K = _sequence(Cu_seqlens_q, Cu_seqlens_k, off_z)
        if start_m >= T_Q:  # past the sequence's end: the grid covers the longest one
            return
        lse_base, delta_base, lse_row = LSE + q_start, Delta + q_start, off_h
        Q, K, V = _at_row(Q, q_start, stride_qm), _at_row(K, k_start, stride_kn), _at_row(V, k_start, stride_vn)
        DO, DQ = _at_row(DO, q_start, stride_dom), _at_row(DQ, q_start, stride_dqm)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offset = T_K - T_Q  # query i sits at key position offset + i
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    off_hkv = off_h // GROUP  # the key/value head this query head shares
    Q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    K_base = K + off_z.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    V_base = V + off_z.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
    DO_base = DO + off_z.to(tl.int64) * stride_doz + off_h.to(tl.int64) * stride_doh
    q = _load_tile(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                   offs_m, offs_d, T_Q, HEAD_DIM, True, PAD_D)  # (BLOCK_M, HEAD_DIM_PAD)
    do = _load_tile(DO_base + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dok,
                    offs_m, offs_d, T_Q, HEAD_DIM, True, PAD_D)
    lse = tl.load(lse_base + lse_row.to(tl.int64) * lse_stride + offs_m, mask=offs_m < T_Q, other=0.0)
    delta = tl.load(delta_base + lse_row.to(tl.int64) * lse_stride + offs_m, mask=offs_m < T_Q, other=0.0)
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + off_z * stride_az + off_h * stride_ah) * LOG2_E

    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    dq = _dq_walk(dq, q, do, lse, delta, K_base, V_base, seed, stride_kn, stride_kk, stride_vn, stride_vk,
                  off_bh, offs_m, offset, offs_d, offset + start_m, T_Q, T_K, qk_scale, dropout_p, dropout_scale,
                  window_left, window_right, softcap_scale, softcap_log2, slope,
                  BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, DROPOUT, DOT_PRECISION, BANDED, SOFTCAP, ALIBI)
    dq = dq * scale

    dq_ptrs = (DQ + off_z.to(tl.int64) * stride_dqz + off_h.to(tl.int64) * stride_dqh
               + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqk)
    dq_mask = offs_m[:, None] < T_Q
    if PAD_D:
        dq_mask = dq_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=dq_mask)
