"""Fused causal attention, forward: one program per (query block, head, batch), never the T×T matrix.

T_q queries over T_k >= T_q keys, the causal diagonal aligned bottom-right (the API's contract):
query i sits at position o + i among the keys, o = T_k - T_q, and sees keys 0..o+i. Training has
T_q = T_k (o = 0); generation with a KV cache has T_q = 1 (decode) or a few new tokens.

Per (b, h) slice with T queries of head dim D, the naive math moves O(T²) bytes (see
fastgpt/attention/naive.py); this kernel reads q once, k and v once per query block below the
diagonal, and writes out (T·D) and the row log-sum-exp (T floats) for the backward:

    for each query block (BLOCK_M rows, positions p0 = o + start_m .. p0 + BLOCK_M - 1):
        for each key block in [0, lo), lo = p0 rounded down to BLOCK_N:   # no mask
            online softmax update, acc += p · v
        for each key block in [lo, min(p0 + BLOCK_M, T_k)):               # the causal mask
        out = acc / l_i, lse = m_i + log2(l_i)        # write BLOCK_M·D + BLOCK_M

Scores are kept in base 2: `qk_scale` = scale · log2(e), so exp2 replaces exp and the scale costs
nothing. Key blocks wholly above the diagonal are never visited. Because the diagonal band starts
at the key block boundary at or before the block's first query, any BLOCK_M and BLOCK_N work, for
any offset o.

Decoding (T_q <= DECODE_MAX_QUERIES, flash_attention_configs.py) launches this same kernel with
configs of its own, "fwd_decode": BLOCK_M = 16, the smallest tile tl.dot takes, and wide key blocks
(BLOCK_N 32-128). At T_q = 1 a 64-row query block would be 63/64 padding; a 16-row one still
computes 15 padded rows, but decoding is memory-bound (every key and value is read once per query
token) and the padded rows add arithmetic, not memory traffic. Split-K over the keys (one program
per key range, then a reduction: "flash-decoding") was not chosen: it pays off when T_k is
thousands and B·H is far below the number of SMs; here T_k <= block_size = 256 is 2-4 key blocks
per program, each program's work is below a kernel launch's latency, and a second (reduction)
launch would cost more than it saves. It stays the next step for long contexts.

Grouped-query attention (k and v with H_kv heads, H_kv dividing H): query head h reads key/value
head h // GROUP, GROUP = H / H_kv, straight from k and v; nothing is copied per query head. GROUP
is left to Triton's specialisation: GROUP = 1 (multi-head attention) arrives as a compile-time
constant, so the multi-head kernels carry no trace of grouping (the group loop of dK/dV runs once
and folds away), and a grouped model compiles one more variant of each kernel.

The options of the general call (fastgpt/attention/api.py) are compile-time switches, so a plain
causal call compiles the kernel it always did:

    BANDED    causal=False or a window: query i (at key position pos) sees keys pos - left ..
              pos + right (sides as runtime ints). A query block visits its band's key blocks only:
              the two edge blocks masked, the blocks between them (every row sees every key) not,
              none outside: the work grows with T·W, not T². A row may see no key: its maximum
              stays -inf (subtracted as 0), out = 0 and lse = -inf.
    SOFTCAP   s = c·tanh(scale·q·k / c), before ALiBi and the mask
    ALIBI     s -= slope[b, h]·|pos - j|
    SINKS     the online softmax starts from the head's sink as one term already summed (m_i =
              sink, l_i = 1): it joins the denominator and the lse, and adds nothing to acc.

Packed sequences (VARLEN, fastgpt/attention/varlen.py: many sequences back to back in (total, H, D)
tensors) take one launch for the whole batch. The grid's z is the sequence: a program reads its
sequence's first row and length from cu_seqlens, moves its pointers that many rows on (the host
passes the packed tensors as (1, H, total, D) views whose z stride is 0), and is then the regular
call of that one sequence, with its own T_q, T_k and offset T_k - T_q. The grid covers the longest
sequence; a block past its own sequence's end returns at once. The lse is (H, total_q). A plain
call folds VARLEN away: it compiles the kernel it did before.

A paged KV cache (PAGED, with VARLEN: fastgpt/attention/paged.py) keeps each sequence's keys and
values in fixed-size pages of a pool, anywhere: the host passes the pool as (1, H_kv, num_pages ·
page_size, D) views and a block table (B, max_pages) int32. K and V then stay at the pool's first
row, and the key tile of keys j (BLOCK_N,) is loaded from rows block_table[b, j // page_size] ·
page_size + j % page_size: a gather of whole rows, each still contiguous along D. Everything else
is the packed call's, in the same order, so a paged call gives the packed call's bits. Forward
only: a paged cache serves inference.

Dropout acts on the normalised weights, softmax(s)·keep/(1-p): the normaliser l_i sums the weights
before dropout, and only the accumulation into acc sees the keep mask. The mask is a pure function of
(seed, b·H+h, query index i, key index), h the query head, so the backward regenerates it and
nothing is stored. A packed sequence b counts as batch entry b, its queries and keys from 0: the
mask of a (B, H, max T_q, max T_k) call, each sequence's corner of it, is the packed call's.
"""

import triton
import triton.language as tl
from triton import knobs

# Whether these kernels run in Triton's interpreter (chosen when they are decorated, as the jit
# decorator chooses). A compile-time constant: in the compiler the interpreter's branches vanish.
INTERPRETED = tl.constexpr(knobs.runtime.interpret)


class _LoopBound:
    """A loop bound as a Python int, in the interpreter, where a scalar is a one-element array:
    Triton 3.6's interpreter converts one with int() of the array, which numpy >= 2.4 refuses.
    The kernels write `range(loop_bound(n) if INTERPRETED else n, ...)`: an expression, since the
    interpreter turns every assigned value back into a tensor.

    Wrapped in a constexpr, because the compiler takes no other callable in a kernel's source (it
    never compiles the call: INTERPRETED is False there). A constexpr's repr goes into the
    kernels' cache key, so it is fixed here: a function's repr holds its address, which would
    change the key, and miss Triton's on-disk cache, in every new process."""

    def __call__(self, x):
        return x if isinstance(x, int) else x.handle.data.item()

    def __repr__(self) -> str:
        return "loop_bound"

    def __deepcopy__(self, memo):  # Triton compares the copies it keeps of a kernel's globals
        return self


loop_bound = tl.constexpr(_LoopBound())


@triton.jit
def _load_tile(ptrs, offs_row, offs_col, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Loads a 2-D tile, zero-filling rows >= n_rows / columns >= n_cols when asked.

    The checks are compile-time switches: a tile that is known to be in bounds gets an unmasked
    load, which keeps it vectorised along the contiguous dimension.
    """
    if CHECK_ROWS and CHECK_COLS:
        tile = tl.load(ptrs, mask=(offs_row[:, None] < n_rows) & (offs_col[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=offs_row[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=offs_col[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _keep_halves(r, threshold):
    """The keep bits of the two 16-bit uniforms in each uint32 of r: (low half, high half)."""
    return (r & 0xFFFF).to(tl.float32) >= threshold, (r >> 16).to(tl.float32) >= threshold


@triton.jit
def _dropout_keep(seed, off_bh, offs_m, start_n, dropout_p, BLOCK_N: tl.constexpr):
    """Which attention weights survive dropout: a (BLOCK_M, BLOCK_N) bool tile, queries offs_m
    (BLOCK_M,) down, keys start_n .. start_n + BLOCK_N - 1 across (start_n a multiple of 8).

    Philox4x32-10 (counter-based, what `tl.rand` runs) with the 64-bit seed as key, on the counter
    (key // 8, query index, b·H+h, 0): its four 32-bit outputs split into eight 16-bit uniforms,
    those of keys 8g .. 8g+7. The ten rounds are most of dropout's cost in these kernels, so one
    call serves eight weights, not one. A weight is dropped with probability ceil(p·2¹⁶)/2¹⁶,
    within 2⁻¹⁶ of p. The mask is a pure function of (seed, b·H+h, query, key): the same in the
    forward, both backward kernels and the keep-mask kernel, whatever the block sizes (every key block
    starts at a multiple of 8). Counters are 32-bit indices, so no T² product can overflow.
    """
    offs_g = start_n // 8 + tl.arange(0, BLOCK_N // 8)  # the key groups of the tile
    c0 = (offs_g[None, :] + 0 * offs_m[:, None]).to(tl.uint32)  # (BLOCK_M, BLOCK_N // 8)
    c1 = (offs_m[:, None] + 0 * offs_g[None, :]).to(tl.uint32)
    zero = tl.zeros(c0.shape, tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + off_bh.to(tl.uint32), zero)
    # keep iff u16 >= p·2¹⁶: u16 and the power-of-two scaling are exact in fp32. Compared before
    # the interleave, so bits, not 32-bit words, are what gets rearranged.
    threshold = dropout_p * 65536.0
    lo0, hi0 = _keep_halves(r0, threshold)
    lo1, hi1 = _keep_halves(r1, threshold)
    lo2, hi2 = _keep_halves(r2, threshold)
    lo3, hi3 = _keep_halves(r3, threshold)
    # key 8g + 2t + h takes half h (low, high) of output r_t: tl.join stacks along a new last axis,
    # so nesting the joins lays the eight out in key order
    keep = tl.join(tl.join(tl.join(lo0, lo2), tl.join(lo1, lo3)), tl.join(tl.join(hi0, hi2), tl.join(hi1, hi3)))
    return tl.reshape(keep, (offs_m.shape[0], BLOCK_N))


@triton.jit
def _sequence(Cu_seqlens_q, Cu_seqlens_k, off_z):
    """(q_start, k_start, T_q, T_k): where packed sequence off_z lies, its queries at rows q_start ..
    q_start + T_q - 1 and its keys at rows k_start .. k_start + T_k - 1 (cu_seqlens: (B + 1,) int32)."""
    q_start = tl.load(Cu_seqlens_q + off_z)
    k_start = tl.load(Cu_seqlens_k + off_z)
    T_q = tl.load(Cu_seqlens_q + off_z + 1) - q_start
    T_k = tl.load(Cu_seqlens_k + off_z + 1) - k_start
    return q_start, k_start, T_q, T_k


@triton.jit
def _at_row(Ptr, start, stride):
    """Ptr moved on to row `start`, rows `stride` elements apart (in 64 bits: a packed batch may hold
    more than 2³¹ elements)."""
    return Ptr + start.to(tl.int64) * stride


# How a loop over key (or query) blocks masks its tiles: a compile-time switch of each loop copy.
NO_MASK = tl.constexpr(0)  # every key of every block is visible and in bounds
DIAGONAL = tl.constexpr(1)  # the causal diagonal (and the end of the keys)
BAND = tl.constexpr(2)  # the window band (and both ends): the option kernels' edge blocks

LOG2_E = tl.constexpr(1.4426950408889634)  # 1/ln(2): exp(x) = exp2(x·log2(e))


@triton.jit
def _tanh(x):
    """tanh(x) = 1 - 2/(exp(2x) + 1), through exp2: the same math compiled and interpreted, exact
    at both ends (exp2 overflowing to inf gives 1, underflowing to 0 gives -1)."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2·log2(e)


@triton.jit
def _option_scores(qk, i, j, offset, qk_scale, softcap_scale, softcap_log2, slope,
                   SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """(s, t): the base-2 scores of the raw products qk and tanh of the soft-capped ones (qk where
    there is no soft-capping). i, j: query and key indices broadcast to qk's shape (either
    orientation); query i sits at key position offset + i.

        s = c·tanh(scale·qk / c)·log2(e)      softcap_scale = scale / c, softcap_log2 = c·log2(e)
        s -= slope·|offset + i - j|            slope already times log2(e)
    """
    if SOFTCAP:
        t = _tanh(qk * softcap_scale)
        s = t * softcap_log2
    else:
        t = qk
        s = qk * qk_scale
    if ALIBI:
        s = s - slope * tl.abs(offset + i - j).to(tl.float32)
    return s, t


@triton.jit
def _visible(i, j, offset, window_left, window_right, T_Q, T_K):
    """Whether query i (at key position offset + i) sees key j, both in bounds: the window band
    pos - left <= j <= pos + right (the host passes an unbounded side as T_q + T_k)."""
    pos = offset + i
    return (j >= pos - window_left) & (j <= pos + window_right) & (j < T_K) & (i < T_Q)


@triton.jit
def _band_blocks(first, last, before, after, n, BLOCK: tl.constexpr):
    """(lo, mid_lo, mid_hi, hi): the blocks of BLOCK along an axis of n (keys, or queries) that a
    run of positions first..last touches through a band reaching `before` back and `after` ahead.
    [mid_lo, mid_hi) are whole blocks every position sees (no mask), [lo, mid_lo) and [mid_hi, hi)
    the edges (masked); the rest is skipped. Clamped at 0 before dividing: Triton's // truncates."""
    lo = (tl.maximum(first - before, 0) // BLOCK) * BLOCK
    hi = tl.minimum(tl.maximum(last + after + 1, 0), n)
    full_lo = tl.maximum(last - before, 0)
    full_hi = tl.minimum(tl.maximum(first + after + 1, 0), n)
    mid_lo = tl.minimum(tl.maximum(((full_lo + BLOCK - 1) // BLOCK) * BLOCK, lo), hi)
    mid_hi = tl.maximum(tl.minimum((full_hi // BLOCK) * BLOCK, hi), mid_lo)
    return lo, mid_lo, mid_hi, hi


@triton.jit
def _fwd_scores(qk, offs_m, offs_n, offset, T_Q, T_K, qk_scale, window_left, window_right,
                softcap_scale, softcap_log2, slope,
                MASK: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """The base-2 scores of one (BLOCK_M, BLOCK_N) tile, -inf where a key is hidden."""
    if SOFTCAP or ALIBI:
        qk, _ = _option_scores(qk, offs_m[:, None], offs_n[None, :], offset, qk_scale, softcap_scale,
                               softcap_log2, slope, SOFTCAP, ALIBI)
        if MASK == DIAGONAL:
            qk = tl.where(offs_m[:, None] >= (offs_n - offset)[None, :], qk, float("-inf"))
    elif MASK == DIAGONAL:
        # keys past T_k only meet rows past T_q here (key <= o + i), which are never stored
        # (the keys are shifted, not the queries: one less vector live across the loop)
        qk = tl.where(offs_m[:, None] >= (offs_n - offset)[None, :], qk * qk_scale, float("-inf"))
    else:
        qk = qk * qk_scale
    if MASK == BAND:
        qk = tl.where(_visible(offs_m[:, None], offs_n[None, :], offset, window_left, window_right, T_Q, T_K),
                      qk, float("-inf"))
    return qk


@triton.jit
def _key_rows(Table, offs_n, T_K, page_size, CHECK: tl.constexpr, PAGED: tl.constexpr):
    """The rows of K and V that hold keys offs_n (BLOCK_N,): offs_n themselves, or PAGED their slots
    in the pool through the sequence's block-table row Table, page Table[j // page_size] at slot
    j % page_size (64-bit: a pool may hold more than 2³¹ elements). CHECK: the tile may reach past
    the sequence's last key, whose table entries are never read."""
    if PAGED:
        if CHECK:
            page = tl.load(Table + offs_n // page_size, mask=offs_n < T_K, other=0)
        else:
            page = tl.load(Table + offs_n // page_size)
        return page.to(tl.int64) * page_size + offs_n % page_size
    else:
        return offs_n


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, Seed_val,
                    stride_kn, stride_kk, stride_vn, stride_vk,
                    off_bh, offs_m, offset, offs_d, lo, hi, T_Q, T_K, qk_scale, dropout_p,
                    window_left, window_right, softcap_scale, softcap_log2, slope, Table, page_size,
                    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                    MASK: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, PAGED: tl.constexpr):
    """Streams key blocks [lo, hi) through the online softmax of one query block.

    acc (BLOCK_M, HEAD_DIM_PAD) fp32, l_i and m_i (BLOCK_M,) fp32; q (BLOCK_M, HEAD_DIM_PAD);
    offs_m (BLOCK_M,) the query indices; query i sits at key position offset + i.
    Unmasked blocks (MASK = NO_MASK) hold only keys every row sees, all in bounds: no masks.
    PAGED: the keys' rows come through the block-table row Table (_key_rows).
    """
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    for start_n in range(loop_bound(lo) if INTERPRETED else lo, loop_bound(hi) if INTERPRETED else hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if DROPOUT:  # first, before the tiles of the step are live: fewer registers at once
            keep = _dropout_keep(Seed_val, off_bh, offs_m, start_n, dropout_p, BLOCK_N)
        rows = _key_rows(Table, offs_n, T_K, page_size, MASK != NO_MASK, PAGED)
        kT = _load_tile(K_base + offs_d[:, None] * stride_kk + rows[None, :] * stride_kn,
                        offs_d, offs_n, HEAD_DIM, T_K, PAD_D, MASK != NO_MASK)  # (HEAD_DIM_PAD, BLOCK_N)
        qk = tl.dot(q, kT, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
        qk = _fwd_scores(qk, offs_m, offs_n, offset, T_Q, T_K, qk_scale, window_left, window_right,
                         softcap_scale, softcap_log2, slope, MASK, SOFTCAP, ALIBI)
        # causal: m_i is finite after the first block (key lo <= o + i is visible to every row);
        # a band's edge may hide every key of a row so far: its maximum stays -inf, subtracted as 0
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_sub = m_ij
        if MASK == BAND:
            m_sub = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was summed under the old maximum
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_tile(V_base + rows[:, None] * stride_vn + offs_d[None, :] * stride_vk,
                       offs_n, offs_d, T_K, HEAD_DIM, MASK != NO_MASK, PAD_D)  # (BLOCK_N, HEAD_DIM_PAD)
        if DROPOUT:
            p = tl.where(keep, p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["H", "T_Q", "T_K", "window_left", "window_right", "stride_bt"])  # GROUP: the header
def _attn_fwd(Q, K, V, Out, LSE, Seed,
              stride_qz, stride_qh, stride_qm, stride_qk,
              stride_kz, stride_kh, stride_kn, stride_kk,
              stride_vz, stride_vh, stride_vn, stride_vk,
              stride_oz, stride_oh, stride_om, stride_ok,
              H, GROUP, T_Q, T_K, qk_scale, dropout_p, dropout_scale, Cu_seqlens_q, Cu_seqlens_k,
              Sinks, Alibi, stride_az, stride_ah, window_left, window_right, softcap_scale, softcap_log2,
              Block_table, stride_bt, page_size,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, SINKS: tl.constexpr,
              VARLEN: tl.constexpr, PAGED: tl.constexpr):
    """Grid (cdiv(T_Q, BLOCK_M), H, B). Q, Out: (B, H, T_Q, HEAD_DIM), K, V: (B, H / GROUP, T_K,
    HEAD_DIM), T_K >= T_Q unless BANDED, any strides; LSE: (B, H, T_Q) fp32 contiguous, base-2
    log-sum-exp of the scaled scores; Seed: one int64. The options (see the header): Sinks (H,),
    Alibi (B, H) fp32 with strides stride_az, stride_ah; window sides as runtime ints.
    VARLEN (see the header): grid (cdiv(max T_q, BLOCK_M), H, B sequences), the tensors (1, H,
    total, HEAD_DIM) with stride_*z = 0, T_Q and T_K the totals, LSE (H, total_q). PAGED (with
    VARLEN): K, V the pool (1, H_kv, num_pages · page_size, HEAD_DIM), Block_table (B, max_pages)
    int32 with row stride stride_bt, cu_seqlens_k counting each sequence's keys."""
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_z = tl.program_id(2)
    off_bh = off_z * H + off_h
    off_hkv = off_h // GROUP  # the key/value head this query head shares
    lse_base, lse_row, lse_stride = LSE, off_bh, T_Q  # row off_bh of the (B·H, T_Q) lse
    if VARLEN:  # off_z is a packed sequence; T_Q came in as total_q, each head's lse row (lse_stride)
        q_start, k_start, T_Q, T_K = _sequence(Cu_seqlens_q, Cu_seqlens_k, off_z)
        if start_m * BLOCK_M >= T_Q:  # past the sequence's end: the grid covers the longest one
            return
        lse_base, lse_row = LSE + q_start, off_h
        Q, Out = _at_row(Q, q_start, stride_qm), _at_row(Out, q_start, stride_om)
        if PAGED:  # the keys stay in their pages, found through the sequence's block-table row
            Block_table = _at_row(Block_table, off_z, stride_bt)
        else:
            K, V = _at_row(K, k_start, stride_kn), _at_row(V, k_start, stride_vn)
    # 64-bit slice offsets: B·H·T·D may exceed 2³¹ elements
    Q_base = Q + off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    K_base = K + off_z.to(tl.int64) * stride_kz + off_hkv.to(tl.int64) * stride_kh
    V_base = V + off_z.to(tl.int64) * stride_vz + off_hkv.to(tl.int64) * stride_vh
    O_base = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offset = T_K - T_Q  # query i sits at key position offset + i: the diagonal bottom-right
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    q = _load_tile(Q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qk,
                   offs_m, offs_d, T_Q, HEAD_DIM, True, PAD_D)  # (BLOCK_M, HEAD_DIM_PAD)
    seed, slope = _seed_and_slope(Seed, Alibi, off_z * stride_az + off_h * stride_ah, DROPOUT, ALIBI)
    m_i, l_i = _softmax_start(Sinks, off_h, BLOCK_M, SINKS)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    acc, l_i, m_i = _fwd_walk(acc, l_i, m_i, q, K_base, V_base, seed,
                              stride_kn, stride_kk, stride_vn, stride_vk, off_bh, offs_m, offset, offs_d,
                              offset + start_m * BLOCK_M, T_Q, T_K, qk_scale, dropout_p,
                              window_left, window_right, softcap_scale, softcap_log2, slope, Block_table, page_size,
                              BLOCK_M, BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, DROPOUT, DOT_PRECISION, BANDED, SOFTCAP, ALIBI,
                              PAGED)
    _fwd_store(acc, l_i, m_i, O_base, lse_base, lse_row, lse_stride, offs_m, offs_d, stride_om, stride_ok, T_Q,
               dropout_scale, HEAD_DIM, HEAD_DIM_PAD, DROPOUT, BANDED)


@triton.jit
def _fwd_walk(acc, l_i, m_i, q, K_base, V_base, seed,
              stride_kn, stride_kk, stride_vn, stride_vk, off_bh, offs_m, offset, offs_d,
              first, T_Q, T_K, qk_scale, dropout_p,
              window_left, window_right, softcap_scale, softcap_log2, slope, Table, page_size,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
              BANDED: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, PAGED: tl.constexpr):
    """The key blocks one query block visits, its first query at key position `first`: causal, the
    blocks left of the diagonal unmasked and those on it masked; BANDED, the band's edge blocks
    masked, the blocks between them not, the rest never visited (work grows with T·W, not T²)."""
    if BANDED:  # the edges of the band masked, the blocks between them not, the rest skipped
        lo, mid_lo, mid_hi, hi = _band_blocks(first, first + BLOCK_M - 1, window_left, window_right, T_K, BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, seed,
                                        stride_kn, stride_kk, stride_vn, stride_vk, off_bh, offs_m, offset, offs_d,
                                        lo, mid_lo, T_Q, T_K, qk_scale, dropout_p,
                                        window_left, window_right, softcap_scale, softcap_log2, slope, Table, page_size,
                                        BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, BAND, DROPOUT, DOT_PRECISION, SOFTCAP,
                                        ALIBI, PAGED)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, seed,
                                        stride_kn, stride_kk, stride_vn, stride_vk, off_bh, offs_m, offset, offs_d,
                                        mid_lo, mid_hi, T_Q, T_K, qk_scale, dropout_p,
                                        window_left, window_right, softcap_scale, softcap_log2, slope, Table, page_size,
                                        BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, NO_MASK, DROPOUT, DOT_PRECISION, SOFTCAP,
                                        ALIBI, PAGED)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, seed,
                                        stride_kn, stride_kk, stride_vn, stride_vk, off_bh, offs_m, offset, offs_d,
                                        mid_hi, hi, T_Q, T_K, qk_scale, dropout_p,
                                        window_left, window_right, softcap_scale, softcap_log2, slope, Table, page_size,
                                        BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, BAND, DROPOUT, DOT_PRECISION, SOFTCAP,
                                        ALIBI, PAGED)
    else:  # causal: keys [0, lo) precede every query of the block; [lo, hi) straddle the diagonal
        lo = (first // BLOCK_N) * BLOCK_N
        hi = tl.minimum(first + BLOCK_M, T_K)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, seed,
                                        stride_kn, stride_kk, stride_vn, stride_vk, off_bh, offs_m, offset, offs_d,
                                        0, lo, T_Q, T_K, qk_scale, dropout_p,
                                        window_left, window_right, softcap_scale, softcap_log2, slope, Table, page_size,
                                        BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, NO_MASK, DROPOUT, DOT_PRECISION, SOFTCAP,
                                        ALIBI, PAGED)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, K_base, V_base, seed,
                                        stride_kn, stride_kk, stride_vn, stride_vk, off_bh, offs_m, offset, offs_d,
                                        lo, hi, T_Q, T_K, qk_scale, dropout_p,
                                        window_left, window_right, softcap_scale, softcap_log2, slope, Table, page_size,
                                        BLOCK_N, HEAD_DIM, HEAD_DIM_PAD, DIAGONAL, DROPOUT, DOT_PRECISION, SOFTCAP,
                                        ALIBI, PAGED)
    return acc, l_i, m_i


@triton.jit
def _seed_and_slope(Seed, Alibi, at, DROPOUT: tl.constexpr, ALIBI: tl.constexpr):
    """(the dropout seed, 0 without dropout; the program's ALiBi slope Alibi[at] in base 2, 0 without)."""
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    slope = 0.0
    if ALIBI:
        slope = tl.load(Alibi + at) * LOG2_E
    return seed, slope


@triton.jit
def _softmax_start(Sinks, off_h, BLOCK_M: tl.constexpr, SINKS: tl.constexpr):
    """(m_i, l_i) (BLOCK_M,) fp32 before the first key: nothing summed, or the head's sink as one
    term already summed (it joins the denominator and takes no value: acc starts at 0 either way)."""
    if SINKS:
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(Sinks + off_h).to(tl.float32) * LOG2_E
        l_i = tl.zeros([BLOCK_M], tl.float32) + 1.0
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    return m_i, l_i


@triton.jit
def _fwd_store(acc, l_i, m_i, O_base, LSE, lse_row, lse_stride, offs_m, offs_d, stride_om, stride_ok, T_Q,
               dropout_scale,
               HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, DROPOUT: tl.constexpr, BANDED: tl.constexpr):
    """out = acc / l_i (0 for a row that saw no key: l_i = 0) and lse = m_i + log2(l_i), query i's
    at LSE + lse_row·lse_stride + i."""
    PAD_D: tl.constexpr = HEAD_DIM != HEAD_DIM_PAD
    if BANDED:  # such a row's acc is 0, its lse -inf (log2 never sees the 0)
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    else:
        acc = acc / l_i[:, None]
    if DROPOUT:
        acc = acc * dropout_scale  # 1/(1-p): kept weights are scaled up
    if BANDED:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i)))
        tl.store(LSE + lse_row.to(tl.int64) * lse_stride + offs_m, lse, mask=offs_m < T_Q)
    else:
        tl.store(LSE + lse_row.to(tl.int64) * lse_stride + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T_Q)
    o_ptrs = O_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_ok
    o_mask = offs_m[:, None] < T_Q
    if PAD_D:
        o_mask = o_mask & (offs_d[None, :] < HEAD_DIM)
    tl.store(o_ptrs, acc.to(O_base.dtype.element_ty), mask=o_mask)


@triton.jit
def _dropout_mask(Seed, Keep, stride_kz, stride_kh, stride_km, stride_kn, H, T_Q, T_K, dropout_p,
                  Cu_seqlens_q, Cu_seqlens_k,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, VARLEN: tl.constexpr):
    """The keep-mask a call with this seed used (what causal_attention_with_mask gives back). Grid (cdiv(T_Q, BLOCK_M), cdiv(T_K,
    BLOCK_N), B·H). Keep: (B, H, T_Q, T_K) int8, 1 where the weight survives dropout. VARLEN: T_Q, T_K
    the longest sequences, and only sequence b's corner Keep[b, :, :T_q[b], :T_k[b]] is written."""
    off_bh = tl.program_id(2)
    off_z = off_bh // H
    off_h = off_bh % H
    if VARLEN:
        _, _, T_Q, T_K = _sequence(Cu_seqlens_q, Cu_seqlens_k, off_z)
        if (tl.program_id(0) * BLOCK_M >= T_Q) | (tl.program_id(1) * BLOCK_N >= T_K):
            return
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(Seed), off_bh, offs_m, tl.program_id(1) * BLOCK_N, dropout_p, BLOCK_N)
    ptrs = (Keep + off_z.to(tl.int64) * stride_kz + off_h.to(tl.int64) * stride_kh
            + offs_m[:, None] * stride_km + offs_n[None, :] * stride_kn)
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < T_Q) & (offs_n[None, :] < T_K))
