// What the CPU kernels share: the GEMM they call on tiles, a work-balanced parallel loop, the
// allocation of packed causal matrices, strided (B, H, rows, cols) and (B, H, N) views, bfloat16 rows.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "buffer_pool.h"

#if defined(FASTGPT_HAVE_SGEMM)
// The Fortran BLAS entry point that PyTorch itself links (MKL or OpenBLAS): column-major, LP64.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);
#else
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#endif

namespace fastgpt::cpu {

// Row-major C (m×n, ldc) = alpha · op(A) · op(B) + beta · C, op(X) = Xᵀ when trans_x; A is m×k
// after op, B is k×n after op. Called from inside at::parallel_for: BLAS then runs one thread.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
#if defined(FASTGPT_HAVE_SGEMM)
  // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: swap the operands, keep the flags.
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  sgemm_(&tb, &ta, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
#else
  // Portable fallback (no BLAS symbol exported by this torch build): at::mm on borrowed views.
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  auto view = [&](const float* p, int64_t rows, int64_t cols, int64_t ld, bool t) {
    auto x = at::from_blob(const_cast<float*>(p), {t ? cols : rows, t ? rows : cols}, {ld, 1}, opts);
    return t ? x.t() : x;
  };
  at::Tensor A = view(a, m, k, lda, trans_a), B = view(b, k, n, ldb, trans_b);
  at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
  if (beta == 0.0f) {
    C.copy_(at::mm(A, B).mul_(alpha));
  } else {
    C.copy_(at::addmm(C, A, B, beta, alpha));
  }
#endif
}

// at::parallel_for over items [0, n) with one contiguous range per thread holding about the same
// total cost; `cum(i)` is the cost of items [0, i), non-decreasing. Causal work is triangular, so
// equal item counts would leave one thread with three quarters of it. Each thread gets at least
// `min_cost` (tens of microseconds of work): waking a pool thread costs more than a tiny problem,
// and on a busy machine waiting for it can take a scheduler tick.
template <typename CumCost, typename Body>
void parallel_for_balanced(int64_t n, const CumCost& cum, double min_cost, const Body& body) {
  if (n <= 0) return;
  const double total = static_cast<double>(cum(n));
  const int64_t by_cost = static_cast<int64_t>(total / min_cost);
  const int64_t threads = std::min<int64_t>({at::get_num_threads(), n, std::max<int64_t>(by_cost, 1)});
  if (threads <= 1 || at::in_parallel_region()) {
    body(int64_t{0}, n);
    return;
  }
  auto split = [&](int64_t t) -> int64_t {  // first item whose prefix cost reaches t/threads of the total
    if (t >= threads) return n;
    const double target = total * static_cast<double>(t) / static_cast<double>(threads);
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<double>(cum(mid)) < target) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t begin = split(t), end = split(t + 1);
      if (begin < end) body(begin, end);
    }
  });
}

// Cost of item (bh, block) of a block loop, prefix-summed per head so that parallel_for_balanced
// can find equal shares of a triangle.
template <typename BlockCost>
auto head_prefix_cost(int64_t nb, const BlockCost& block_cost) {
  std::vector<double> prefix(nb + 1, 0.0);
  for (int64_t i = 0; i < nb; ++i) prefix[i + 1] = prefix[i] + block_cost(i);
  const double per_head = prefix[nb];
  return [prefix = std::move(prefix), per_head, nb](int64_t item) {
    return static_cast<double>(item / nb) * per_head + prefix[item % nb];
  };
}

// Where an nt kernel (tril_o(a · bᵀ)) writes row block r of head bh, (rows(r) × stride(r))
// row-major: the packed output itself, or a thread's scratch when a fused op consumes the rows at
// once; and what runs on the rows once they are written (nothing for the plain op).
template <typename scalar_t>
struct NtSink {
  std::function<scalar_t*(int64_t bh, int64_t r)> block;
  std::function<void(int64_t bh, int64_t r, const scalar_t* rows)> done;
};

// A packed causal matrix (B, H, N) to be filled by a kernel that writes every element (zeros above
// the diagonal and in the padding); large ones are recycled by the buffer pool.
inline at::Tensor empty_causal(int64_t B, int64_t H, int64_t N, const at::TensorOptions& options) {
  return BufferPool::instance().empty({B, H, N}, options);
}

// The part of a packed row right of its last visible key: above the diagonal and the padding, at
// most 127 elements, never read by the ops. Plain stores: the old dense layout wrote half of every
// matrix here and streaming stores paid off in causal_matmul_nt; these runs are too short for them.
template <typename scalar_t>
inline void zero_fill(scalar_t* p, int64_t n) {
  if (n > 0) std::memset(static_cast<void*>(p), 0, sizeof(scalar_t) * n);
}

// A (B, H, rows, cols) tensor whose last dim is contiguous, read through its strides: the strided
// q/k/v views of a fused qkv projection need no copy. Anything else is made contiguous first.
template <typename scalar_t>
struct Rows4 {
  scalar_t* data;
  int64_t heads, stride_b, stride_h, ld;

  scalar_t* at(int64_t bh) const { return data + (bh / heads) * stride_b + (bh % heads) * stride_h; }
};

inline at::Tensor rows_readable(const at::Tensor& t) {
  const int64_t rows = t.size(2), cols = t.size(3);
  const bool last_ok = cols <= 1 || t.stride(3) == 1;
  const bool rows_ok = rows <= 1 || (t.stride(2) >= cols && t.stride(2) <= INT32_MAX);
  return (last_ok && rows_ok) ? t : t.contiguous();
}

// A packed causal matrix (B, H, N) whose last dim is contiguous, read through its (b, h) strides
// (a broadcast batch needs no copy). Rows are found with CausalLayout::row_offset.
template <typename scalar_t>
struct Packed3 {
  scalar_t* data;
  int64_t heads, stride_b, stride_h;

  scalar_t* at(int64_t bh) const { return data + (bh / heads) * stride_b + (bh % heads) * stride_h; }
};

inline at::Tensor packed_readable(const at::Tensor& t) {
  return (t.size(2) <= 1 || t.stride(2) == 1) ? t : t.contiguous();
}

template <typename scalar_t>
Packed3<scalar_t> packed3(const at::Tensor& t) {
  return {static_cast<scalar_t*>(t.data_ptr()), t.size(1), t.stride(0), t.stride(1)};
}

template <typename scalar_t>
Rows4<scalar_t> rows4(const at::Tensor& t) {
  // A single row's stride is never stepped over; BLAS still wants ld >= cols.
  const int64_t ld = t.size(2) <= 1 ? std::max<int64_t>(t.size(3), 1) : t.stride(2);
  return {static_cast<scalar_t*>(t.data_ptr()), t.size(1), t.stride(0), t.stride(1), ld};
}

// bfloat16 <-> float32 rows: the kernels compute in float32 on converted copies. Vectorised (ATen's
// conversions: round to nearest even, as c10::BFloat16's); the ragged end scalar.
inline void to_float(const c10::BFloat16* src, float* dst, int64_t n) {
  using BVec = at::vec::Vectorized<c10::BFloat16>;
  int64_t i = 0;
  for (; i + BVec::size() <= n; i += BVec::size()) {
    const auto [lo, hi] = at::vec::convert_bfloat16_float(BVec::loadu(src + i));
    lo.store(dst + i);
    hi.store(dst + i + at::vec::Vectorized<float>::size());
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void from_float(const float* src, c10::BFloat16* dst, int64_t n) { at::vec::convert(src, dst, n); }
inline void from_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }

}  // namespace fastgpt::cpu
