// CUDA kernels of the fused scale + causal mask + softmax (+ dropout), its two backwards and the
// dropout keep mask, on the packed causal layout (csrc/README.md, csrc/causal_layout.h), with
// their host launchers. Plain CUDA C++ through compat.h: nvcc builds it for the GPU, g++ runs it
// in the SIMT emulation (tests/cuda_emulation/).
//
// One row r = bh·T_q + i of a (B·H, N) packed matrix: query i sees n = o + i + 1 keys and the row
// is W = stride(i / 64) ≥ n wide (a multiple of 64, so 16-byte aligned whenever the base is).
//   forward            m = max(scale·s); e = exp(scale·s - m); P = e / Σe; out = P ∘ keep / (1 - p)
//   backward           dS = scale · P ∘ (dP - Σ dP∘P)                    (reads P: no dropout)
//   dropout backward   P recomputed from s, dP = grad ∘ keep / (1 - p), then as above
// Only columns j < n are read; all W columns are written (zeros from n on). The row is streamed
// (two or three passes, each thread holding one 16-byte chunk at a time), never held in registers,
// so there is no sequence-length ceiling. Math in fp32 whatever T is (float, __half, __nv_bfloat16).
//
// Two ways to own a row, chosen per launch on T_k (the longest row):
//   warp per row   T_k ≤ kWarpRowMaxKeys: 4 rows per 128-thread block, reductions by shuffles only
//   block per row  longer rows: 64-512 threads per row, shuffles then one shared-memory round
// The dropout keep bit of (r, j) is Philox4x32-10 word j % 4 of counter (j / 4, r, offset) under
// key seed (philox.h): a thread's 16-byte chunk starts at a multiple of 4 columns, so each Philox
// call serves 4 of its columns, and the CPU kernels draw the same bits.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "../causal_layout.h"
#include "../philox.h"
#include "compat.h"
#include "elements.h"
#include "launch.h"

namespace fastgpt::cuda {

// Rows up to this many keys go warp-per-row: 32 lanes × 16-byte chunks cover 1024 fp32 keys in 8
// chunks per lane per pass; longer rows spread over a block.
constexpr int64_t kWarpRowMaxKeys = 1024;
constexpr int kRowsPerWarpBlock = 4;

enum class SoftmaxPath { kAuto, kWarpPerRow, kBlockPerRow };

// ---- elements: T in memory (elements.h), float in registers ----

// Elements per 16-byte chunk: 4 floats, 8 halves.
template <typename T>
constexpr int kChunk = 16 / static_cast<int>(sizeof(T));

// Columns [j, j + kChunk) of a row into fp32: one 128-bit load when the chunk is whole and the
// row aligned; columns at or past n are never read (0).
template <typename T>
__device__ __forceinline__ void load_chunk(const T* row, int64_t j, int64_t n, bool aligned, float* out) {
  constexpr int kN = kChunk<T>;
  if (aligned && j + kN <= n) {
    alignas(16) T e[kN];
    *reinterpret_cast<uint4*>(e) = *reinterpret_cast<const uint4*>(row + j);
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = to_float(e[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) out[k] = j + k < n ? to_float(row[j + k]) : 0.0f;
  }
}

// Columns [j, j + kChunk) of a row from fp32 (W is a multiple of 64: a chunk never crosses it).
template <typename T>
__device__ __forceinline__ void store_chunk(T* row, int64_t j, bool aligned, const float* in) {
  constexpr int kN = kChunk<T>;
  alignas(16) T e[kN];
#pragma unroll
  for (int k = 0; k < kN; ++k) e[k] = from_float<T>(in[k]);
  if (aligned) {
    *reinterpret_cast<uint4*>(row + j) = *reinterpret_cast<const uint4*>(e);
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) row[j + k] = e[k];
  }
}

// Dropout multipliers of columns [j, j + kN), j a multiple of 4: keep_scale or 0, kN / 4 Philox calls.
template <int kN>
__device__ __forceinline__ void dropout_chunk(const DropoutStream& ds, uint32_t row, int64_t j, float* mult) {
#pragma unroll
  for (int g = 0; g < kN / 4; ++g) {
    const Philox4 w = ds.words(static_cast<uint32_t>(j / 4 + g), row);
#pragma unroll
    for (int q = 0; q < 4; ++q) mult[4 * g + q] = w.x[q] >= ds.threshold ? ds.keep_scale : 0.0f;
  }
}

// ---- who owns a row, and how its threads reduce ----
struct MaxOp {
  static constexpr float kIdentity = -INFINITY;
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct SumOp {
  static constexpr float kIdentity = 0.0f;
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

template <typename Op>
__device__ __forceinline__ float warp_allreduce(float v, Op op) {
#pragma unroll
  for (int m = 16; m > 0; m /= 2) v = op(v, __shfl_xor_sync(0xFFFFFFFFu, v, m));
  return v;
}

// A warp per row: kRowsPerWarpBlock rows per block.
struct WarpPerRow {
  int rank, size;
  int64_t row;
  __device__ __forceinline__ explicit WarpPerRow(float* /*scratch: unused*/)
      : rank(static_cast<int>(threadIdx.x % 32)), size(32),
        row(static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32) {}
  template <typename Op>
  __device__ __forceinline__ float reduce(float v, Op op) const { return warp_allreduce(v, op); }
};

// A block per row (blockDim.x a multiple of 32, at most 1024): a warp reduction, then the warps'
// partials through shared memory, which every warp reduces again so all threads get the result.
struct BlockPerRow {
  float* scratch;  // 32 floats of shared memory
  int rank, size;
  int64_t row;
  __device__ __forceinline__ explicit BlockPerRow(float* shared_scratch)
      : scratch(shared_scratch), rank(static_cast<int>(threadIdx.x)), size(static_cast<int>(blockDim.x)),
        row(blockIdx.x) {}
  template <typename Op>
  __device__ __forceinline__ float reduce(float v, Op op) const {
    const int lane = rank % 32, warp = rank / 32;
    v = warp_allreduce(v, op);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();  // [sync: partials written] every warp's partial is in scratch
    v = warp_allreduce(lane < size / 32 ? scratch[lane] : Op::kIdentity, op);
    __syncthreads();  // every thread has read scratch before the next reduce writes it
    return v;
  }
};

// Where row r lives and how long it is.
struct PackedRow {
  int64_t base;  // its first element, from the start of the (B·H, N) tensor
  int64_t n;     // visible keys: columns [0, n) are read
  int64_t W;     // its stride: columns [0, W) are written
};
__device__ __forceinline__ PackedRow packed_row(const CausalLayout& L, int64_t r) {
  const int64_t bh = r / L.T_q, i = r % L.T_q;
  return {bh * L.N + L.row_offset(i), L.o + i + 1, L.stride(i / kCausalBlock)};
}

// ---- kernels ----
// The max of scale·s over a row's visible keys, reduced over the threads that own the row.
template <typename T, typename Owner>
__device__ __forceinline__ float row_max(const Owner& team, const T* s, const PackedRow& row, bool aligned,
                                         float scale) {
  constexpr int kN = kChunk<T>;
  float m = -INFINITY;
  for (int64_t j = team.rank * kN; j < row.n; j += static_cast<int64_t>(team.size) * kN) {
    float x[kN];
    load_chunk(s, j, row.n, aligned, x);
    for (int k = 0; k < kN; ++k) m = j + k < row.n ? fmaxf(m, x[k] * scale) : m;
  }
  return team.reduce(m, MaxOp{});
}

template <typename T, typename Owner>
__global__ void causal_softmax_kernel(const T* __restrict__ scores, T* __restrict__ probs, CausalLayout L,
                                      int64_t rows, float scale, DropoutStream ds, bool aligned) {
  constexpr int kN = kChunk<T>;
  FASTGPT_SHARED(float, scratch, 32);
  const Owner team(scratch);
  if (team.row >= rows) return;  // only whole warps of the warp-per-row path leave here
  const PackedRow row = packed_row(L, team.row);
  const T* s = scores + row.base;
  T* p = probs + row.base;
  const int64_t step = static_cast<int64_t>(team.size) * kN;

  const float m = row_max(team, s, row, aligned, scale);  // pass 1: max of scale·s

  float sum = 0.0f;  // pass 2: Σ exp(scale·s - m)
  for (int64_t j = team.rank * kN; j < row.n; j += step) {
    float x[kN];
    load_chunk(s, j, row.n, aligned, x);
    for (int k = 0; k < kN; ++k) sum += j + k < row.n ? __expf(x[k] * scale - m) : 0.0f;
  }
  const float inv_sum = 1.0f / team.reduce(sum, SumOp{});

  for (int64_t j = team.rank * kN; j < row.W; j += step) {  // pass 3: write P, zeros from n on
    float x[kN], mult[kN], y[kN];
    load_chunk(s, j, row.n, aligned, x);
    if (ds.enabled && j < row.n) dropout_chunk<kN>(ds, static_cast<uint32_t>(team.row), j, mult);
    for (int k = 0; k < kN; ++k) {
      const float prob = __expf(x[k] * scale - m) * inv_sum;
      y[k] = j + k < row.n ? (ds.enabled ? prob * mult[k] : prob) : 0.0f;
    }
    store_chunk(p, j, aligned, y);
  }
}

// dS from dP = grad and the forward's P (no dropout).
template <typename T, typename Owner>
__global__ void causal_softmax_backward_kernel(const T* __restrict__ grad, const T* __restrict__ probs,
                                               T* __restrict__ grad_scores, CausalLayout L, int64_t rows,
                                               float scale, bool aligned) {
  constexpr int kN = kChunk<T>;
  FASTGPT_SHARED(float, scratch, 32);
  const Owner team(scratch);
  if (team.row >= rows) return;
  const PackedRow row = packed_row(L, team.row);
  const T *g = grad + row.base, *p = probs + row.base;
  T* ds = grad_scores + row.base;
  const int64_t step = static_cast<int64_t>(team.size) * kN;

  float dot = 0.0f;  // pass 1: Σ dP∘P
  for (int64_t j = team.rank * kN; j < row.n; j += step) {
    float gx[kN], px[kN];
    load_chunk(g, j, row.n, aligned, gx);
    load_chunk(p, j, row.n, aligned, px);
    for (int k = 0; k < kN; ++k) dot += gx[k] * px[k];  // 0 past n
  }
  dot = team.reduce(dot, SumOp{});

  for (int64_t j = team.rank * kN; j < row.W; j += step) {  // pass 2: write dS
    float gx[kN], px[kN], y[kN];
    load_chunk(g, j, row.n, aligned, gx);
    load_chunk(p, j, row.n, aligned, px);
    for (int k = 0; k < kN; ++k) y[k] = scale * px[k] * (gx[k] - dot);  // 0 past n (px = 0)
    store_chunk(ds, j, aligned, y);
  }
}

// dS from dP = grad ∘ keep / (1 - p) and the forward's scores: P recomputed, the mask regenerated.
template <typename T, typename Owner>
__global__ void causal_softmax_dropout_backward_kernel(const T* __restrict__ grad, const T* __restrict__ scores,
                                                       T* __restrict__ grad_scores, CausalLayout L, int64_t rows,
                                                       float scale, DropoutStream ds, bool aligned) {
  constexpr int kN = kChunk<T>;
  FASTGPT_SHARED(float, scratch, 32);
  const Owner team(scratch);
  if (team.row >= rows) return;
  const PackedRow row = packed_row(L, team.row);
  const T *g = grad + row.base, *s = scores + row.base;
  T* dst = grad_scores + row.base;
  const uint32_t philox_row = static_cast<uint32_t>(team.row);
  const int64_t step = static_cast<int64_t>(team.size) * kN;

  const float m = row_max(team, s, row, aligned, scale);  // pass 1: max of scale·s

  // pass 2: Σe and Σ dP∘e with e = exp(scale·s - m); Σ dP∘P = Σ dP∘e / Σe
  float sum = 0.0f, dot = 0.0f;
  for (int64_t j = team.rank * kN; j < row.n; j += step) {
    float x[kN], gx[kN], mult[kN];
    load_chunk(s, j, row.n, aligned, x);
    load_chunk(g, j, row.n, aligned, gx);
    if (ds.enabled) dropout_chunk<kN>(ds, philox_row, j, mult);
    for (int k = 0; k < kN; ++k) {
      const float e = j + k < row.n ? __expf(x[k] * scale - m) : 0.0f;
      sum += e;
      dot += (ds.enabled ? gx[k] * mult[k] : gx[k]) * e;
    }
  }
  const float inv_sum = 1.0f / team.reduce(sum, SumOp{});
  dot = team.reduce(dot, SumOp{}) * inv_sum;

  for (int64_t j = team.rank * kN; j < row.W; j += step) {  // pass 3: write dS
    float x[kN], gx[kN], mult[kN], y[kN];
    load_chunk(s, j, row.n, aligned, x);
    load_chunk(g, j, row.n, aligned, gx);
    if (ds.enabled && j < row.n) dropout_chunk<kN>(ds, philox_row, j, mult);
    for (int k = 0; k < kN; ++k) {
      const float prob = __expf(x[k] * scale - m) * inv_sum;
      const float dp = ds.enabled ? gx[k] * mult[k] : gx[k];
      y[k] = j + k < row.n ? scale * prob * (dp - dot) : 0.0f;
    }
    store_chunk(dst, j, aligned, y);
  }
}

// keep[r, j] for the dense (B·H, T_q, T_k) mask, 0 at j ≥ n: one thread per 4 columns of a row.
__global__ void dropout_keep_mask_kernel(uint8_t* __restrict__ keep, CausalLayout L, int64_t rows,
                                         DropoutStream ds) {
  const int64_t groups = (L.T_k + 3) / 4;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= rows * groups) return;
  const int64_t r = idx / groups, g = idx % groups, n = L.o + r % L.T_q + 1;
  const Philox4 w = ds.words(static_cast<uint32_t>(g), static_cast<uint32_t>(r));
  for (int q = 0; q < 4; ++q) {
    const int64_t j = 4 * g + q;
    if (j < L.T_k) keep[r * L.T_k + j] = j < n && w.x[q] >= ds.threshold;
  }
}

// ---- host launchers: raw pointers to contiguous (B·H, N) packed matrices, T in {float, __half,
// __nv_bfloat16}; dropout_p a double, as the ops receive it (its threshold floor(p·2^32) must be
// the CPU's) ----
namespace detail {

inline CausalLayout checked_layout(const char* op, int64_t batch_heads, int64_t T_q, int64_t T_k, double dropout_p) {
  if (batch_heads < 0 || T_q < 0 || T_q > T_k) {
    throw std::invalid_argument(std::string(op) + ": need batch_heads >= 0 and 0 <= T_q <= T_k; got batch_heads = " +
                                std::to_string(batch_heads) + ", T_q = " + std::to_string(T_q) +
                                ", T_k = " + std::to_string(T_k));
  }
  if (!(dropout_p >= 0.0 && dropout_p < 1.0)) {
    throw std::invalid_argument(std::string(op) + ": dropout_p must be in [0, 1); got " + std::to_string(dropout_p));
  }
  if (batch_heads * T_q >= (int64_t{1} << 31)) {  // one block per row on grid.x; Philox rows are 32-bit
    throw std::invalid_argument(std::string(op) + ": batch_heads · T_q = " + std::to_string(batch_heads * T_q) +
                                " rows; at most 2^31 - 1");
  }
  return CausalLayout(T_q, T_k);
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads per row on the block path: enough for about two chunks each, 64 to 512.
inline int block_threads(int64_t T_k, int chunk) {
  int threads = 64;
  while (threads < 512 && 2LL * threads * chunk < T_k) threads *= 2;
  return threads;
}

// Carries a row-owner type into a generic lambda. Not std::type_identity: that is C++20, and
// torch 2.11's cpp_extension compiles the extension as C++17.
template <typename Owner>
struct OwnerTag {
  using type = Owner;
};

// Calls launch_with(OwnerTag<Owner>, grid, block) with the chosen way to own a row.
template <typename T, typename LaunchFn>
void launch_rows(int64_t rows, int64_t T_k, SoftmaxPath path, LaunchFn&& launch_with) {
  if (path == SoftmaxPath::kAuto) path = T_k <= kWarpRowMaxKeys ? SoftmaxPath::kWarpPerRow : SoftmaxPath::kBlockPerRow;
  if (path == SoftmaxPath::kWarpPerRow) {
    const int64_t blocks = (rows + kRowsPerWarpBlock - 1) / kRowsPerWarpBlock;
    launch_with(OwnerTag<WarpPerRow>{}, dim3(static_cast<unsigned>(blocks)), dim3(32 * kRowsPerWarpBlock));
  } else {
    launch_with(OwnerTag<BlockPerRow>{}, dim3(static_cast<unsigned>(rows)), dim3(block_threads(T_k, kChunk<T>)));
  }
}

}  // namespace detail

// probs = dropout(softmax(scale · scores, causal)), both (B·H, N) packed.
template <typename T>
void launch_causal_softmax(const T* scores, T* probs, int64_t batch_heads, int64_t T_q, int64_t T_k, float scale,
                           double dropout_p, uint64_t seed, uint64_t offset, cudaStream_t stream,
                           SoftmaxPath path = SoftmaxPath::kAuto) {
  const CausalLayout L = detail::checked_layout("causal_softmax", batch_heads, T_q, T_k, dropout_p);
  const int64_t rows = batch_heads * T_q;
  if (rows == 0) return;
  const DropoutStream ds = make_dropout_stream(seed, offset, dropout_p);
  const bool aligned = detail::aligned16(scores) && detail::aligned16(probs);
  detail::launch_rows<T>(rows, T_k, path, [&](auto owner, dim3 grid, dim3 block) {
    using Owner = typename decltype(owner)::type;
    launch(causal_softmax_kernel<T, Owner>, grid, block, 0, stream, scores, probs, L, rows, scale, ds, aligned);
  });
}

// grad_scores = dS from grad = dP and probs = P, the forward's output without dropout.
template <typename T>
void launch_causal_softmax_backward(const T* grad, const T* probs, T* grad_scores, int64_t batch_heads, int64_t T_q,
                                    int64_t T_k, float scale, cudaStream_t stream,
                                    SoftmaxPath path = SoftmaxPath::kAuto) {
  const CausalLayout L = detail::checked_layout("causal_softmax_backward", batch_heads, T_q, T_k, 0.0);
  const int64_t rows = batch_heads * T_q;
  if (rows == 0) return;
  const bool aligned = detail::aligned16(grad) && detail::aligned16(probs) && detail::aligned16(grad_scores);
  detail::launch_rows<T>(rows, T_k, path, [&](auto owner, dim3 grid, dim3 block) {
    using Owner = typename decltype(owner)::type;
    launch(causal_softmax_backward_kernel<T, Owner>, grid, block, 0, stream, grad, probs, grad_scores, L, rows,
           scale, aligned);
  });
}

// grad_scores = dS from grad = dP and the forward's scores, dropout (seed, offset) regenerated.
template <typename T>
void launch_causal_softmax_dropout_backward(const T* grad, const T* scores, T* grad_scores, int64_t batch_heads,
                                            int64_t T_q, int64_t T_k, float scale, double dropout_p, uint64_t seed,
                                            uint64_t offset, cudaStream_t stream,
                                            SoftmaxPath path = SoftmaxPath::kAuto) {
  const CausalLayout L = detail::checked_layout("causal_softmax_dropout_backward", batch_heads, T_q, T_k, dropout_p);
  const int64_t rows = batch_heads * T_q;
  if (rows == 0) return;
  const DropoutStream ds = make_dropout_stream(seed, offset, dropout_p);
  const bool aligned = detail::aligned16(grad) && detail::aligned16(scores) && detail::aligned16(grad_scores);
  detail::launch_rows<T>(rows, T_k, path, [&](auto owner, dim3 grid, dim3 block) {
    using Owner = typename decltype(owner)::type;
    launch(causal_softmax_dropout_backward_kernel<T, Owner>, grid, block, 0, stream, grad, scores, grad_scores, L,
           rows, scale, ds, aligned);
  });
}

// keep: dense (B·H, T_q, T_k) bytes, 1 where causal_softmax keeps the element, 0 where it drops
// it or j > o + i (the testing hook behind dropout_keep_mask).
inline void launch_dropout_keep_mask(uint8_t* keep, int64_t batch_heads, int64_t T_q, int64_t T_k, double dropout_p,
                                     uint64_t seed, uint64_t offset, cudaStream_t stream) {
  const CausalLayout L = detail::checked_layout("dropout_keep_mask", batch_heads, T_q, T_k, dropout_p);
  const int64_t rows = batch_heads * T_q, total = rows * ((T_k + 3) / 4);
  if (total == 0) return;
  constexpr int kThreads = 256;
  launch(dropout_keep_mask_kernel, dim3(static_cast<unsigned>((total + kThreads - 1) / kThreads)), dim3(kThreads), 0,
         stream, keep, L, rows, make_dropout_stream(seed, offset, dropout_p));
}

}  // namespace fastgpt::cuda
