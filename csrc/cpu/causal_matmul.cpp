// CPU kernels of the three causal matmuls, the products that make or consume a causal matrix:
//
//   causal_matmul_nt(a, b) = tril(a · bᵀ)    (B,H,T,D) × (B,H,T,D) -> (B,H,T,T)   S = Q·Kᵀ, dP = dO·Vᵀ
//   causal_matmul_nn(p, x) = tril(p) · x     (B,H,T,T) × (B,H,T,D) -> (B,H,T,D)   O = P·V,  dQ = dS·K
//   causal_matmul_tn(p, x) = tril(p)ᵀ · x    (B,H,T,T) × (B,H,T,D) -> (B,H,T,D)   dV = Pᵀ·dO, dK = dSᵀ·Q
//
// Work is cut into blocks of kBlock rows (or key columns) per (batch, head); each block is a few
// GEMM calls over the tiles on or below the diagonal only (the diagonal tile in kStrip-row strips),
// so the ~half of the T×T work above it is never done. Only the diagonal tile is masked element by
// element: it is copied with zeros above the diagonal (consumers) or zeroed after the GEMM
// (producer). Above-diagonal entries of a causal input are never read.
//
// float32 runs the GEMM in place on the (strided) inputs; bfloat16 converts the panel a block
// needs to float32 first and rounds the result once.

#include "../causal_ops.h"
#include "../checks.h"
#include "common.h"

#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/zero.h>

namespace fastgpt::cpu {
namespace {

// 64 rows × D=64 floats = 16 KiB per operand tile, and a block's (64 × T) panel of a T = 1024
// causal matrix (256 KiB) stays in L2. 32 and 128 measured the same within noise at T = 256 and 1024.
constexpr int64_t kBlock = 64;

int64_t num_blocks(int64_t T) { return (T + kBlock - 1) / kBlock; }

// The diagonal tile is computed in strips of kStrip rows, each only as wide as its last row needs:
// 75% of the tile's products instead of all of them. At T = 256 the diagonal tiles are a fifth of
// the causal work; 32-row strips measured 3-5% faster there than whole tiles, 16-row ones less.
constexpr int64_t kStrip = 32;

// Work (multiply-adds) below which a thread is not worth waking: ~20 µs at 50 GFLOP/s.
constexpr double kMinCostPerThread = 5e5;

// Cost of block i of a row-block loop (rows × columns touched), prefix-summed per head so that
// parallel_for_balanced can find equal shares of a triangle.
template <typename BlockCost>
auto head_prefix_cost(int64_t heads, int64_t T, const BlockCost& block_cost) {
  const int64_t nb = num_blocks(T);
  std::vector<double> prefix(nb + 1, 0.0);
  for (int64_t i = 0; i < nb; ++i) prefix[i + 1] = prefix[i] + block_cost(i);
  const double per_head = prefix[nb];
  return [prefix = std::move(prefix), per_head, nb](int64_t item) {
    return static_cast<double>(item / nb) * per_head + prefix[item % nb];
  };
}

// dst (m×m, ld m) = src's square tile with the entries above its diagonal zeroed; in float32.
template <typename scalar_t>
void copy_lower_tile(const scalar_t* src, int64_t ld, int64_t m, float* dst) {
  for (int64_t r = 0; r < m; ++r) {
    to_float(src + r * ld, dst + r * m, r + 1);
    std::fill(dst + r * m + r + 1, dst + (r + 1) * m, 0.0f);
  }
}

// Rows [r0, r1) × cols [0, n) of a row-major matrix as float32: the matrix itself for float, a
// converted copy in `buf` for bfloat16. Returns the pointer and sets `ld_out`.
const float* float_rows(const float* m, int64_t ld, int64_t r0, int64_t r1, int64_t n,
                        std::vector<float>& buf, int64_t& ld_out) {
  (void)r1; (void)n; (void)buf;
  ld_out = ld;
  return m + r0 * ld;
}
const float* float_rows(const c10::BFloat16* m, int64_t ld, int64_t r0, int64_t r1, int64_t n,
                        std::vector<float>& buf, int64_t& ld_out) {
  buf.resize(std::max<size_t>(buf.size(), static_cast<size_t>((r1 - r0) * n)));
  for (int64_t r = r0; r < r1; ++r) to_float(m + r * ld, buf.data() + (r - r0) * n, n);
  ld_out = n;
  return buf.data();
}

// ---- tril(a · bᵀ) ------------------------------------------------------------------------------

template <typename scalar_t>
void matmul_nt_kernel(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  const int64_t BH = a.size(0) * a.size(1), T = a.size(2), D = a.size(3);
  const auto A = rows4<scalar_t>(a), Bm = rows4<scalar_t>(b), C = rows4<scalar_t>(out);
  const int64_t nb = num_blocks(T);
  // Block i computes rows [r0, r1) against keys [0, r1): (r1 - r0) · r1 dot products of length D.
  auto cum = head_prefix_cost(a.size(1), T, [&](int64_t i) {
    const int64_t r0 = i * kBlock, r1 = std::min(T, r0 + kBlock);
    return static_cast<double>((r1 - r0) * r1 * D + r1 * 16);
  });
  parallel_for_balanced(BH * nb, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> a_buf, b_buf, c_buf;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nb, r0 = (item % nb) * kBlock, r1 = std::min(T, r0 + kBlock), m = r1 - r0;
      int64_t lda, ldb;
      const float* a_rows = float_rows(A.at(bh), A.ld, r0, r1, D, a_buf, lda);
      const float* b_rows = float_rows(Bm.at(bh), Bm.ld, 0, r1, D, b_buf, ldb);
      scalar_t* c = C.at(bh) + r0 * C.ld;
      if constexpr (std::is_same_v<scalar_t, float>) {
        // Keys before the block: the full (m × r0) panel.
        gemm(false, true, m, r0, D, 1.0f, a_rows, lda, b_rows, ldb, 0.0f, c, C.ld);
        // The diagonal tile, strip by strip: rows [s0, s1) of the block against keys [r0, r0 + s1).
        for (int64_t s0 = 0; s0 < m; s0 += kStrip) {
          const int64_t s1 = std::min(m, s0 + kStrip);
          gemm(false, true, s1 - s0, s1, D, 1.0f, a_rows + s0 * lda, lda, b_rows + r0 * ldb, ldb, 0.0f,
               c + s0 * C.ld + r0, C.ld);
        }
        // The strips overshoot the diagonal by less than a strip; above it the matrix is zero.
        for (int64_t r = 0; r < m; ++r) zero_fill(c + r * C.ld + r0 + r + 1, T - (r0 + r + 1), /*streaming=*/true);
      } else {
        c_buf.resize(std::max<size_t>(c_buf.size(), static_cast<size_t>(m * r1)));
        gemm(false, true, m, r1, D, 1.0f, a_rows, lda, b_rows, ldb, 0.0f, c_buf.data(), r1);
        for (int64_t r = 0; r < m; ++r) {
          from_float(c_buf.data() + r * r1, c + r * C.ld, r0 + r + 1);
          zero_fill(c + r * C.ld + r0 + r + 1, T - (r0 + r + 1));
        }
      }
    }
  });
}

// ---- tril(p) · x ---------------------------------------------------------------------------------

template <typename scalar_t>
void matmul_nn_kernel(const at::Tensor& p, const at::Tensor& x, at::Tensor& out) {
  const int64_t BH = p.size(0) * p.size(1), T = p.size(2), D = x.size(3);
  const auto P = rows4<scalar_t>(p), X = rows4<scalar_t>(x), C = rows4<scalar_t>(out);
  const int64_t nb = num_blocks(T);
  auto cum = head_prefix_cost(p.size(1), T, [&](int64_t i) {
    const int64_t r0 = i * kBlock, r1 = std::min(T, r0 + kBlock);
    return static_cast<double>((r1 - r0) * r1 * D + r1 * 16);
  });
  parallel_for_balanced(BH * nb, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> p_buf, x_buf, c_buf, tile(kBlock * kBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nb, r0 = (item % nb) * kBlock, r1 = std::min(T, r0 + kBlock), m = r1 - r0;
      const scalar_t* p_bh = P.at(bh);
      scalar_t* c = C.at(bh) + r0 * C.ld;
      if constexpr (std::is_same_v<scalar_t, float>) {
        const float* x_bh = X.at(bh);
        // Keys before the block: a full (m × r0) panel of P.
        if (r0 > 0) gemm(false, false, m, D, r0, 1.0f, p_bh + r0 * P.ld, P.ld, x_bh, X.ld, 0.0f, c, C.ld);
        // The diagonal tile, lower triangle only.
        copy_lower_tile(p_bh + r0 * P.ld + r0, P.ld, m, tile.data());
        for (int64_t s0 = 0; s0 < m; s0 += kStrip) {  // strip rows [s0, s1) need keys [r0, r0 + s1)
          const int64_t s1 = std::min(m, s0 + kStrip);
          gemm(false, false, s1 - s0, D, s1, 1.0f, tile.data() + s0 * m, m, x_bh + r0 * X.ld, X.ld,
               r0 > 0 ? 1.0f : 0.0f, c + s0 * C.ld, C.ld);
        }
      } else {
        // One GEMM over the (m × r1) panel converted to float32, zeros above the diagonal.
        p_buf.resize(std::max<size_t>(p_buf.size(), static_cast<size_t>(m * r1)));
        for (int64_t r = 0; r < m; ++r) {
          to_float(p_bh + (r0 + r) * P.ld, p_buf.data() + r * r1, r0 + r + 1);
          std::fill(p_buf.data() + r * r1 + r0 + r + 1, p_buf.data() + (r + 1) * r1, 0.0f);
        }
        int64_t ldx;
        const float* x_rows = float_rows(X.at(bh), X.ld, 0, r1, D, x_buf, ldx);
        c_buf.resize(std::max<size_t>(c_buf.size(), static_cast<size_t>(m * D)));
        gemm(false, false, m, D, r1, 1.0f, p_buf.data(), r1, x_rows, ldx, 0.0f, c_buf.data(), D);
        for (int64_t r = 0; r < m; ++r) from_float(c_buf.data() + r * D, c + r * C.ld, D);
      }
    }
  });
}

// ---- tril(p)ᵀ · x --------------------------------------------------------------------------------

template <typename scalar_t>
void matmul_tn_kernel(const at::Tensor& p, const at::Tensor& x, at::Tensor& out) {
  const int64_t BH = p.size(0) * p.size(1), T = p.size(2), D = x.size(3);
  const auto P = rows4<scalar_t>(p), X = rows4<scalar_t>(x), C = rows4<scalar_t>(out);
  const int64_t nb = num_blocks(T);
  // Block j owns output rows (keys) [c0, c1) and sums over the queries [c0, T) that see them.
  auto cum = head_prefix_cost(p.size(1), T, [&](int64_t j) {
    const int64_t c0 = j * kBlock, c1 = std::min(T, c0 + kBlock);
    return static_cast<double>((c1 - c0) * (T - c0) * D + (T - c0) * 16);
  });
  parallel_for_balanced(BH * nb, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> p_buf, x_buf, c_buf, tile(kBlock * kBlock), ct(kBlock * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / nb, c0 = (item % nb) * kBlock, c1 = std::min(T, c0 + kBlock), m = c1 - c0;
      const int64_t below = T - c1;  // query rows under the diagonal tile
      const scalar_t* p_bh = P.at(bh);
      scalar_t* c = C.at(bh) + c0 * C.ld;
      if constexpr (std::is_same_v<scalar_t, float>) {
        // Computed transposed, Cᵀ (D × m) = X[c0:T]ᵀ · tril(P)[c0:T, c0:c1], so that P's column strip
        // is B of the GEMM, read row by row: MKL is ~25% faster this way than with Pᵀ as A.
        const float* x_bh = X.at(bh);
        copy_lower_tile(p_bh + c0 * P.ld + c0, P.ld, m, tile.data());
        for (int64_t s0 = 0; s0 < m; s0 += kStrip) {  // tile columns [s0, s1) are zero above row s0
          const int64_t s1 = std::min(m, s0 + kStrip);
          gemm(true, false, D, s1 - s0, m - s0, 1.0f, x_bh + (c0 + s0) * X.ld, X.ld, tile.data() + s0 * m + s0, m,
               0.0f, ct.data() + s0, m);
        }
        if (below > 0) {
          gemm(true, false, D, m, below, 1.0f, x_bh + c1 * X.ld, X.ld, p_bh + c1 * P.ld + c0, P.ld, 1.0f, ct.data(), m);
        }
        at::vec::transpose_mxn<float>(ct.data(), m, c, C.ld, static_cast<int>(D), static_cast<int>(m));
      } else {
        // Rows [c0, T) of P's column block, float32, zeros above the diagonal: ((T - c0) × m).
        const int64_t rows = T - c0;
        p_buf.resize(std::max<size_t>(p_buf.size(), static_cast<size_t>(rows * m)));
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t valid = std::min(m, r + 1);
          to_float(p_bh + (c0 + r) * P.ld + c0, p_buf.data() + r * m, valid);
          std::fill(p_buf.data() + r * m + valid, p_buf.data() + (r + 1) * m, 0.0f);
        }
        int64_t ldx;
        const float* x_rows = float_rows(X.at(bh), X.ld, c0, T, D, x_buf, ldx);
        c_buf.resize(std::max<size_t>(c_buf.size(), static_cast<size_t>(m * D)));
        gemm(true, false, m, D, rows, 1.0f, p_buf.data(), m, x_rows, ldx, 0.0f, c_buf.data(), D);
        for (int64_t r = 0; r < m; ++r) from_float(c_buf.data() + r * D, c + r * C.ld, D);
      }
    }
  });
}

// Shared argument checks of the (causal matrix, rows) products.
void check_matrix_rows(const at::Tensor& p, const at::Tensor& x, const char* op) {
  check_causal_matrix(p, op, "p");
  check_rank4(x, op, "x", "(B, H, T, D)");
  check_same_dtype_device(x, p, op, "x", "p");
  TORCH_CHECK(x.size(0) == p.size(0) && x.size(1) == p.size(1) && x.size(2) == p.size(2), op,
              ": x has shape ", x.sizes(), " but p has shape ", p.sizes(),
              "; x must be (B, H, T, D) with p's B, H and T");
  check_blas_size(p.size(2), op, "T");
  check_blas_size(x.size(3), op, "D");
}

}  // namespace

at::Tensor causal_matmul_nt(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "fastgpt::causal_matmul_nt";
  check_rank4(a, op, "a", "(B, H, T, D)");
  check_rank4(b, op, "b", "(B, H, T, D)");
  check_dtype(a, op, "a");
  check_same_dtype_device(b, a, op, "b", "a");
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": b has shape ", b.sizes(), " but a has shape ", a.sizes(),
              "; a and b must share (B, H, T, D)");
  check_blas_size(a.size(2), op, "T");
  check_blas_size(a.size(3), op, "D");
  const auto ra = rows_readable(a), rb = rows_readable(b);
  at::Tensor out = empty_causal({a.size(0), a.size(1), a.size(2), a.size(2)}, a.options());
  if (out.numel() == 0) return out;
  if (a.size(3) == 0) return out.zero_();
  if (a.scalar_type() == at::kFloat) matmul_nt_kernel<float>(ra, rb, out);
  else matmul_nt_kernel<c10::BFloat16>(ra, rb, out);
  return out;
}

at::Tensor causal_matmul_nn(const at::Tensor& p, const at::Tensor& x) {
  constexpr const char* op = "fastgpt::causal_matmul_nn";
  check_matrix_rows(p, x, op);
  const auto rp = rows_readable(p), rx = rows_readable(x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  if (p.scalar_type() == at::kFloat) matmul_nn_kernel<float>(rp, rx, out);
  else matmul_nn_kernel<c10::BFloat16>(rp, rx, out);
  return out;
}

at::Tensor causal_matmul_tn(const at::Tensor& p, const at::Tensor& x) {
  constexpr const char* op = "fastgpt::causal_matmul_tn";
  check_matrix_rows(p, x, op);
  const auto rp = rows_readable(p), rx = rows_readable(x);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  if (p.scalar_type() == at::kFloat) matmul_tn_kernel<float>(rp, rx, out);
  else matmul_tn_kernel<c10::BFloat16>(rp, rx, out);
  return out;
}

}  // namespace fastgpt::cpu
