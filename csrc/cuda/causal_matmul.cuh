// The three causal matmuls on the packed causal layout (csrc/README.md, causal_layout.h), CUDA:
//
//   nt:  S = tril_o(A · Bᵀ)      A (T_q, D), B (T_k, D)     -> packed     grid: the lower tile list only
//   nn:  O = tril_o(P) · X       P packed, X (T_k, D)       -> (T_q, D)   K loop: row block's width only
//   tn:  O = tril_o(P)ᵀ · X      P packed, X (T_q, D)       -> (T_k, D)   K loop: row blocks that see the tile
//
// per (b, h); query i sees keys j ≤ o + i, o = T_k - T_q. Grouped-query attention: B of nt and X of
// nn have H_kv heads (H_kv dividing H), and query head h reads head h / G, G = H / H_kv, in place;
// tn's output has H_kv heads, each the sum over its G query heads, which one block accumulates in
// order in its registers (no atomics: the same bits on every run). One block of 128 threads computes one 64×64
// output tile, staging 64×32 (or 32×64) operand tiles through shared memory with zero fill (tails of
// T and D, and the causal mask on P, so nothing above the diagonal is ever read). The products run
// on tensor cores through `nvcuda::wmma` (16×16×16, float accumulators) for fp16/bf16, or as SIMT
// FMAs (fp32, and 16-bit on request): both paths share the staging and the epilogue.
//
// Plain CUDA C++: no torch headers. The same source compiles with nvcc and with the host compiler
// of the emulation (compat.h); launches go through fastgpt::cuda::launch (launch.h).
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../causal_layout.h"
#include "compat.h"
#include "elements.h"
#include "launch.h"

namespace fastgpt::cuda {

// A (B, H, T, D) operand: element (b, h, t, d) at b·b_ + h·h_ + t·t_ + d (unit stride over D).
struct RowStrides {
  int64_t b, h, t;
};

namespace causal_matmul_detail {

constexpr int kTileM = 64;  // output rows per block: one row block of the packed layout
constexpr int kTileN = 64;  // output columns per block
constexpr int kTileK = 32;  // reduction step staged through shared memory
constexpr int kThreads = 128;  // 4 warps; with wmma each owns a 32×32 quarter of the tile
constexpr int kMaxGridY = 65535;  // (b, h) go on grid.y, launched in chunks of this many
static_assert(kTileM == kCausalBlock, "one output tile row = one row block of the packed layout");

template <typename T>
constexpr bool kIs16Bit = !std::is_same<T, float>::value;
// Padding of a shared row: 8 halves keep wmma's 16-byte rows; 1 float breaks the SIMT path's bank conflicts.
template <typename T>
constexpr int kPad = kIs16Bit<T> ? 8 : 1;


// One block's shared memory. Each operand tile is stored as global memory holds it, so the copies
// coalesce: A as rows of m (a[m][k], wmma row_major) or, kAKRows, rows of k (a[k][m], col_major);
// B as rows of n (b[n][k], col_major) or, kBKRows, rows of k (b[k][n], row_major). c: the float
// 64×64 result on its way out (the epilogue masks and converts it).
template <typename T, bool kAKRows, bool kBKRows>
struct SharedTiles {
  static constexpr int lda = (kAKRows ? kTileM : kTileK) + kPad<T>;
  static constexpr int ldb = (kBKRows ? kTileN : kTileK) + kPad<T>;
  static constexpr int ldc = kTileN + 4;  // floats; a multiple of 4 for wmma's store
  alignas(32) T a[(kAKRows ? kTileK : kTileM) * lda];
  alignas(32) T b[(kBKRows ? kTileK : kTileN) * ldb];
  alignas(32) float c[kTileM * ldc];

  __device__ const T* a_at(int m, int k) const { return kAKRows ? &a[k * lda + m] : &a[m * lda + k]; }
  __device__ const T* b_at(int k, int n) const { return kBKRows ? &b[k * ldb + n] : &b[n * ldb + k]; }
};

// Fills a kRows×kCols shared tile (row stride ld) with value(row, col); consecutive threads take
// consecutive columns, so the global reads behind value() coalesce along a row.
template <int kRows, int kCols, typename T, typename Value>
__device__ inline void fill_tile(T* dst, int ld, Value value) {
  for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
    const int row = e / kCols, col = e % kCols;
    dst[row * ld + col] = value(row, col);
  }
}

// Tensor cores: warp w owns the 32×32 quarter (w / 2, w % 2) of the tile, as 2×2 16×16 fragments.
template <typename T, bool kAKRows, bool kBKRows>
struct WmmaAccumulator {
  static_assert(kIs16Bit<T>, "wmma takes fp16/bf16 operands; fp32 runs the SIMT path");
  using Tiles = SharedTiles<T, kAKRows, kBKRows>;
  using ALayout = typename std::conditional<kAKRows, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type;
  using BLayout = typename std::conditional<kBKRows, nvcuda::wmma::row_major, nvcuda::wmma::col_major>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];

  __device__ int m0() const { return (threadIdx.x / 32) / 2 * 32; }
  __device__ int n0() const { return (threadIdx.x / 32) % 2 * 32; }

  __device__ void zero() {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ void step(const Tiles& s) {
    for (int k = 0; k < kTileK; k += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, ALayout> fa[2];
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
      for (int i = 0; i < 2; ++i) nvcuda::wmma::load_matrix_sync(fa[i], s.a_at(m0() + 16 * i, k), Tiles::lda);
      for (int j = 0; j < 2; ++j) nvcuda::wmma::load_matrix_sync(fb[j], s.b_at(k, n0() + 16 * j), Tiles::ldb);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) nvcuda::wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ void store(Tiles& s) const {
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(&s.c[(m0() + 16 * i) * Tiles::ldc + n0() + 16 * j], acc[i][j], Tiles::ldc,
                                        nvcuda::wmma::mem_row_major);
  }
};

// SIMT: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 8·i and columns tx + 16·j (8×4
// outputs strided over the tile), so one warp reads 2 rows of A (broadcasts) and 16 columns of B.
template <typename T, bool kAKRows, bool kBKRows>
struct SimtAccumulator {
  using Tiles = SharedTiles<T, kAKRows, kBKRows>;
  static_assert(kThreads == 128 && kTileM == 8 * 8 && kTileN == 16 * 4, "the 8×4 thread grid covers 64×64");
  float acc[8][4];

  __device__ void zero() {
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  __device__ void step(const Tiles& s) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int k = 0; k < kTileK; ++k) {
      float av[8], bv[4];
      for (int i = 0; i < 8; ++i) av[i] = to_float(*s.a_at(ty + 8 * i, k));
      for (int j = 0; j < 4; ++j) bv[j] = to_float(*s.b_at(k, tx + 16 * j));
      for (int i = 0; i < 8; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
  }
  __device__ void store(Tiles& s) const {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
    for (int i = 0; i < 8; ++i)
      for (int j = 0; j < 4; ++j) s.c[(ty + 8 * i) * Tiles::ldc + tx + 16 * j] = acc[i][j];
  }
};

template <typename T, bool kTensorCores, bool kAKRows, bool kBKRows>
using Accumulator = typename std::conditional<kTensorCores, WmmaAccumulator<T, kAKRows, kBKRows>,
                                              SimtAccumulator<T, kAKRows, kBKRows>>::type;

}  // namespace causal_matmul_detail

// Dynamic shared memory the matmul launches request: none, the tiles are static (27 KB at most).
constexpr size_t kCausalMatmulDynamicShared = 0;

// S = tril_o(A · Bᵀ) into the packed layout. grid.x walks the lower tile list: row block r has
// W_r / 64 tiles, every one holding at least one visible element; grid.y is (b, h) - bh0, h the
// query head (of `heads`), which reads B's head h / group.
// Writes all N elements of each (b, h): zeros above the diagonal and in the padding.
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(causal_matmul_detail::kThreads)
    causal_matmul_nt_kernel(const T* __restrict__ a, RowStrides sa, const T* __restrict__ b, RowStrides sb,
                            T* __restrict__ out, int64_t heads, int64_t group, int64_t bh0, int64_t T_q, int64_t T_k,
                            int64_t D) {
  using namespace causal_matmul_detail;
  using Tiles = SharedTiles<T, false, false>;
  FASTGPT_SHARED(Tiles, smem, 1);
  Tiles& s = smem[0];
  const CausalLayout layout(T_q, T_k);
  const int64_t bh = bh0 + blockIdx.y, bi = bh / heads, hi = bh % heads;
  int64_t tile = blockIdx.x, r = 0, start = 0;  // blockIdx.x -> (row block r, column tile)
  while (tile >= layout.stride(r) / kTileN) {
    tile -= layout.stride(r) / kTileN;
    start += layout.rows(r) * layout.stride(r);
    ++r;
  }
  const int64_t rows = layout.rows(r), W = layout.stride(r);
  const int64_t i0 = r * kTileM, j0 = tile * kTileN, o = layout.o;
  const T* a_rows = a + bi * sa.b + hi * sa.h + i0 * sa.t;  // A rows i0.., B rows j0..
  const T* b_rows = b + bi * sb.b + hi / group * sb.h + j0 * sb.t;  // B's head: the query head's group
  const T zero = from_float<T>(0.0f);

  Accumulator<T, kTensorCores, false, false> acc;
  acc.zero();
  for (int64_t k0 = 0; k0 < D; k0 += kTileK) {
    fill_tile<kTileM, kTileK>(s.a, Tiles::lda, [&](int m, int k) {
      return m < rows && k0 + k < D ? a_rows[m * sa.t + k0 + k] : zero;
    });
    fill_tile<kTileN, kTileK>(s.b, Tiles::ldb, [&](int n, int k) {
      return j0 + n < T_k && k0 + k < D ? b_rows[n * sb.t + k0 + k] : zero;
    });
    __syncthreads();
    acc.step(s);
    __syncthreads();  // [sync: tiles consumed] before the next step refills them
  }
  acc.store(s);
  __syncthreads();
  T* out_rows = out + bh * layout.N + start + j0;  // row m of the block at out_rows[m · W]
  for (int e = threadIdx.x; e < rows * kTileN; e += kThreads) {
    const int m = e / kTileN, n = e % kTileN;
    out_rows[m * W + n] = j0 + n <= o + i0 + m ? from_float<T>(s.c[m * Tiles::ldc + n]) : zero;
  }
}

// O = tril_o(P) · X, one 64-row block × 64 columns of D per block: grid.x = (row block, D tile),
// grid.y = (b, query head h) - bh0; X's head is h / group.
// The K loop stops at w_r, the keys the block's last row sees; P is read only where j ≤ o + i.
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(causal_matmul_detail::kThreads)
    causal_matmul_nn_kernel(const T* __restrict__ p, const T* __restrict__ x, RowStrides sx, T* __restrict__ out,
                            int64_t heads, int64_t group, int64_t bh0, int64_t T_q, int64_t T_k, int64_t D) {
  using namespace causal_matmul_detail;
  using Tiles = SharedTiles<T, false, true>;
  FASTGPT_SHARED(Tiles, smem, 1);
  Tiles& s = smem[0];
  const CausalLayout layout(T_q, T_k);
  const int64_t bh = bh0 + blockIdx.y, bi = bh / heads, hi = bh % heads;
  const int64_t d_tiles = (D + kTileN - 1) / kTileN;
  const int64_t r = blockIdx.x / d_tiles, n0 = blockIdx.x % d_tiles * kTileN;
  const int64_t rows = layout.rows(r), W = layout.stride(r), visible = layout.width(r);
  const int64_t i0 = r * kTileM, o = layout.o;
  const T* p_rows = p + bh * layout.N + layout.start(r);  // row m at p_rows[m · W]
  const T* x_rows = x + bi * sx.b + hi / group * sx.h + n0;  // X's head: the query head's group
  const T zero = from_float<T>(0.0f);

  Accumulator<T, kTensorCores, false, true> acc;
  acc.zero();
  for (int64_t j0 = 0; j0 < visible; j0 += kTileK) {
    fill_tile<kTileM, kTileK>(s.a, Tiles::lda, [&](int m, int k) {
      return m < rows && j0 + k <= o + i0 + m ? p_rows[m * W + j0 + k] : zero;
    });
    fill_tile<kTileK, kTileN>(s.b, Tiles::ldb, [&](int k, int n) {
      return j0 + k < T_k && n0 + n < D ? x_rows[(j0 + k) * sx.t + n] : zero;
    });
    __syncthreads();
    acc.step(s);
    __syncthreads();
  }
  acc.store(s);
  __syncthreads();
  T* out_rows = out + (bh * T_q + i0) * D + n0;
  for (int e = threadIdx.x; e < rows * kTileN; e += kThreads) {
    const int m = e / kTileN, n = e % kTileN;
    if (n0 + n < D) out_rows[m * D + n] = from_float<T>(s.c[m * Tiles::ldc + n]);
  }
}

// O = Σ_g tril_o(P_g)ᵀ · X_g over the `group` query heads g of one key/value head, one 64-key tile
// × 64 columns of D per block: grid.x = (key tile, D tile), grid.y = (b, key/value head) - bh0.
// The block runs the group's query heads one after another into the same accumulators (a fixed
// summation order, no atomics); for each, the K loop runs over the rows that see the tile's keys:
// row blocks from the first row i = j0 - o on, 32-row chunks that see none of them skipped. P is
// read only where j ≤ o + i.
template <typename T, bool kTensorCores>
__global__ void __launch_bounds__(causal_matmul_detail::kThreads)
    causal_matmul_tn_kernel(const T* __restrict__ p, const T* __restrict__ x, RowStrides sx, T* __restrict__ out,
                            int64_t kv_heads, int64_t group, int64_t bh0, int64_t T_q, int64_t T_k, int64_t D) {
  using namespace causal_matmul_detail;
  using Tiles = SharedTiles<T, true, true>;
  FASTGPT_SHARED(Tiles, smem, 1);
  Tiles& s = smem[0];
  const CausalLayout layout(T_q, T_k);
  const int64_t bkv = bh0 + blockIdx.y, bi = bkv / kv_heads, kvh = bkv % kv_heads;
  const int64_t d_tiles = (D + kTileN - 1) / kTileN;
  const int64_t j0 = blockIdx.x / d_tiles * kTileM, n0 = blockIdx.x % d_tiles * kTileN;
  const int64_t o = layout.o;
  const int64_t first_row = j0 - o > 0 ? j0 - o : 0;  // the first query that sees key j0
  const T zero = from_float<T>(0.0f);

  const int64_t r_first = first_row / kTileM, start_first = layout.start(r_first);
  // The group's first query head, kvh·group of batch bi (flat (b, h) index bkv·group); each step
  // of the loop below moves both pointers on by one query head.
  const T* p_bh = p + bkv * group * layout.N;
  const T* x_rows = x + bi * sx.b + kvh * group * sx.h + n0;

  Accumulator<T, kTensorCores, true, true> acc;
  acc.zero();
  for (int64_t g = 0; g < group; ++g, p_bh += layout.N, x_rows += sx.h) {
    int64_t r = r_first, start = start_first;
    for (; r < layout.R; start += layout.rows(r) * layout.stride(r), ++r) {
      const int64_t rows = layout.rows(r), W = layout.stride(r), i0 = r * kTileM;
      for (int64_t k0 = 0; k0 < rows; k0 += kTileK) {
        const int64_t last = (k0 + kTileK < rows ? k0 + kTileK : rows) - 1;
        if (o + i0 + last < j0) continue;  // no row of this chunk sees the tile (uniform over the block)
        fill_tile<kTileK, kTileM>(s.a, Tiles::lda, [&](int k, int m) {
          return k0 + k < rows && j0 + m <= o + i0 + k0 + k ? p_bh[start + (k0 + k) * W + j0 + m] : zero;
        });
        fill_tile<kTileK, kTileN>(s.b, Tiles::ldb, [&](int k, int n) {
          return k0 + k < rows && n0 + n < D ? x_rows[(i0 + k0 + k) * sx.t + n] : zero;
        });
        __syncthreads();
        acc.step(s);
        __syncthreads();
      }
    }
  }
  acc.store(s);
  __syncthreads();
  T* out_rows = out + (bkv * T_k + j0) * D + n0;
  for (int e = threadIdx.x; e < kTileM * kTileN; e += kThreads) {
    const int m = e / kTileN, n = e % kTileN;
    if (j0 + m < T_k && n0 + n < D) out_rows[m * D + n] = from_float<T>(s.c[m * Tiles::ldc + n]);
  }
}

namespace causal_matmul_detail {

// Launches kernel<T, tensor cores?> over grid.x × every (b, h), in chunks of kMaxGridY heads.
// Tensor cores for fp16/bf16 unless force_simt; fp32 always runs the SIMT path.
template <typename T, typename Launch>
void launch_heads(int64_t batch_heads, int64_t grid_x, bool force_simt, Launch launch_chunk) {
  if (batch_heads <= 0 || grid_x <= 0) return;
  for (int64_t bh0 = 0; bh0 < batch_heads; bh0 += kMaxGridY) {
    const int64_t chunk = batch_heads - bh0 < kMaxGridY ? batch_heads - bh0 : kMaxGridY;
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(chunk));
    launch_chunk(grid, bh0, std::integral_constant<bool, kIs16Bit<T>>{}, force_simt);
  }
}

}  // namespace causal_matmul_detail

// The launchers: raw pointers, no torch. a, b, x: (B, heads or kv_heads, T, D) with unit stride
// over D and the given strides; p and the nt output: packed (B, heads, N) contiguous; the nn/tn
// outputs: (B, heads or kv_heads, T, D) contiguous. `heads` counts the query heads, `kv_heads` the
// key/value heads (grouped-query attention; = heads without it), which must divide `heads`.
// Asynchronous on `stream`; they check nothing (the torch binding does).
namespace causal_matmul_detail {
// G, the query heads per key/value head; kv_heads = 0 only with heads = 0, where nothing launches.
inline int64_t group_size(int64_t heads, int64_t kv_heads) { return kv_heads > 0 ? heads / kv_heads : 1; }
}  // namespace causal_matmul_detail

// S (B, heads, N) = tril_o(a · bᵀ), a (B, heads, T_q, D), b (B, kv_heads, T_k, D).
template <typename T>
void launch_causal_matmul_nt(const T* a, RowStrides sa, const T* b, RowStrides sb, T* out, int64_t batch,
                             int64_t heads, int64_t kv_heads, int64_t T_q, int64_t T_k, int64_t D,
                             cudaStream_t stream, bool force_simt = false) {
  using namespace causal_matmul_detail;
  const CausalLayout layout(T_q, T_k);
  const int64_t group = group_size(heads, kv_heads);
  int64_t tiles = 0;
  for (int64_t r = 0; r < layout.R; ++r) tiles += layout.stride(r) / kTileN;
  launch_heads<T>(batch * heads, tiles, force_simt, [&](dim3 grid, int64_t bh0, auto has_wmma, bool simt) {
    if constexpr (decltype(has_wmma)::value) {
      if (!simt) {
        launch(causal_matmul_nt_kernel<T, true>, grid, dim3(kThreads), kCausalMatmulDynamicShared, stream, a, sa, b,
               sb, out, heads, group, bh0, T_q, T_k, D);
        return;
      }
    }
    launch(causal_matmul_nt_kernel<T, false>, grid, dim3(kThreads), kCausalMatmulDynamicShared, stream, a, sa, b, sb,
           out, heads, group, bh0, T_q, T_k, D);
  });
}

// out (B, heads, T_q, D) = tril_o(p) · x, p (B, heads, N), x (B, kv_heads, T_k, D).
template <typename T>
void launch_causal_matmul_nn(const T* p, const T* x, RowStrides sx, T* out, int64_t batch, int64_t heads,
                             int64_t kv_heads, int64_t T_q, int64_t T_k, int64_t D, cudaStream_t stream,
                             bool force_simt = false) {
  using namespace causal_matmul_detail;
  const int64_t grid_x = CausalLayout(T_q, T_k).R * ((D + kTileN - 1) / kTileN);
  const int64_t group = group_size(heads, kv_heads);
  launch_heads<T>(batch * heads, grid_x, force_simt, [&](dim3 grid, int64_t bh0, auto has_wmma, bool simt) {
    if constexpr (decltype(has_wmma)::value) {
      if (!simt) {
        launch(causal_matmul_nn_kernel<T, true>, grid, dim3(kThreads), kCausalMatmulDynamicShared, stream, p, x, sx,
               out, heads, group, bh0, T_q, T_k, D);
        return;
      }
    }
    launch(causal_matmul_nn_kernel<T, false>, grid, dim3(kThreads), kCausalMatmulDynamicShared, stream, p, x, sx, out,
           heads, group, bh0, T_q, T_k, D);
  });
}

// out (B, kv_heads, T_k, D) = Σ over each group of heads / kv_heads query heads of tril_o(p)ᵀ · x,
// p (B, heads, N), x (B, heads, T_q, D): one block per (b, key/value head, output tile).
template <typename T>
void launch_causal_matmul_tn(const T* p, const T* x, RowStrides sx, T* out, int64_t batch, int64_t heads,
                             int64_t kv_heads, int64_t T_q, int64_t T_k, int64_t D, cudaStream_t stream,
                             bool force_simt = false) {
  using namespace causal_matmul_detail;
  const int64_t grid_x = (T_k + kTileM - 1) / kTileM * ((D + kTileN - 1) / kTileN);
  const int64_t group = group_size(heads, kv_heads);
  launch_heads<T>(batch * kv_heads, grid_x, force_simt, [&](dim3 grid, int64_t bh0, auto has_wmma, bool simt) {
    if constexpr (decltype(has_wmma)::value) {
      if (!simt) {
        launch(causal_matmul_tn_kernel<T, true>, grid, dim3(kThreads), kCausalMatmulDynamicShared, stream, p, x, sx,
               out, kv_heads, group, bh0, T_q, T_k, D);
        return;
      }
    }
    launch(causal_matmul_tn_kernel<T, false>, grid, dim3(kThreads), kCausalMatmulDynamicShared, stream, p, x, sx, out,
           kv_heads, group, bh0, T_q, T_k, D);
  });
}

}  // namespace fastgpt::cuda
