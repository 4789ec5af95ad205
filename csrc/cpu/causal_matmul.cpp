// CPU kernels of the three causal matmuls, the products that make or consume a packed causal
// matrix (causal_layout.h; T_q <= T_k, query i sees keys j <= o + i, o = T_k - T_q):
//
//   causal_matmul_nt(a, b)      = tril_o(a · bᵀ)   (B,H,T_q,D) × (B,H_kv,T_k,D) -> packed   S = Q·Kᵀ, dP = dO·Vᵀ
//   causal_matmul_nn(p, x, T_q) = tril_o(p) · x    packed × (B,H_kv,T_k,D) -> (B,H,T_q,D)   O = P·V,  dQ = dS·K
//   causal_matmul_tn(p, x, T_k) = tril_o(p)ᵀ · x   packed × (B,H,T_q,D) -> (B,H_kv,T_k,D)   dV = Pᵀ·dO, dK = dSᵀ·Q
//
// Grouped-query attention: H_kv divides H and query head h uses key/value head h / G, G = H / H_kv.
// With bh = b·H + h the flat query head, its key/value head is b·H_kv + h / G = bh / G: nt and nn
// read that head's rows in place, and tn's output head sums its G query heads, in order, into one
// float32 accumulator before it is stored (one thread owns each output tile: no atomics, the same
// bits on every run and thread count). G = 1 is plain multi-head attention, the same GEMMs as ever.
//
// Row block r of the packed matrix (its m = rows(r) queries, from r0 = 64·r) is one dense matrix
// with leading dimension stride(r): keys [0, c0), c0 = o + r0, are seen by all its rows (a full
// GEMM panel), keys [c0, c0 + m) form the diagonal tile, computed in kStrip-row strips. So the
// ~half of the T_q × T_k work above the diagonal is never done, and only the diagonal tile is
// masked element by element. Entries above the diagonal of a packed input are never read.
//
// float32 runs the GEMM in place on the (strided) inputs; bfloat16 converts the panel a block
// needs to float32 first and rounds the result once.

#include "../causal_layout.h"
#include "../causal_ops.h"
#include "../checks.h"
#include "amx_matmul.h"
#include "common.h"
#include "nt_blocks.h"

#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/zero.h>

namespace fastgpt::cpu {
namespace {

// The layout's 64-row blocks: 64 rows × D=64 floats = 16 KiB per operand tile, and a block's
// (64 × T) panel at T = 1024 (256 KiB) stays in L2. 32 and 128 measured the same within noise on
// the dense layout; the packed layout fixes 64 (csrc/README.md).
constexpr int64_t kBlock = kCausalBlock;

// The diagonal tile is computed in strips of kStrip rows, each only as wide as its last row needs:
// 75% of the tile's products instead of all of them. At T = 256 the diagonal tiles are a fifth of
// the causal work; 32-row strips measured faster there than whole tiles and than 16-row strips.
constexpr int64_t kStrip = 32;

// Work (multiply-adds) below which a thread is not worth waking: tens of microseconds of a core's
// GEMM, more than waking a pool thread costs (parallel_for_balanced, common.h).
constexpr double kMinCostPerThread = 5e5;

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

// ---- tril_o(a · bᵀ) ----------------------------------------------------------------------------

template <typename scalar_t>
void matmul_nt_kernel(const at::Tensor& a, const at::Tensor& b, const CausalLayout& L, int64_t group,
                      const NtSink<scalar_t>& sink) {
  const int64_t BH = a.size(0) * a.size(1), D = a.size(3);
  const auto A = rows4<scalar_t>(a), Bm = rows4<scalar_t>(b);
  // Block r computes its m rows against keys [0, width(r)) and writes stride(r) columns.
  auto cum = head_prefix_cost(L.R, [&](int64_t r) {
    return static_cast<double>(L.rows(r) * (L.width(r) * D + L.stride(r)));
  });
  parallel_for_balanced(BH * L.R, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> a_buf, b_buf, c_buf;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / L.R, r = item % L.R, r0 = r * kBlock, m = L.rows(r);
      const int64_t c0 = L.o + r0, w = c0 + m, ldc = L.stride(r);  // diagonal tile at keys [c0, w)
      int64_t lda, ldb;
      const float* a_rows = float_rows(A.at(bh), A.ld, r0, r0 + m, D, a_buf, lda);
      const float* b_rows = float_rows(Bm.at(bh / group), Bm.ld, 0, w, D, b_buf, ldb);  // the group's key head
      scalar_t* c = sink.block(bh, r);
      if constexpr (std::is_same_v<scalar_t, float>) {
        // Keys every row of the block sees: the full (m × c0) panel.
        gemm(false, true, m, c0, D, 1.0f, a_rows, lda, b_rows, ldb, 0.0f, c, ldc);
        // The diagonal tile, strip by strip: rows [s0, s1) of the block against keys [c0, c0 + s1).
        for (int64_t s0 = 0; s0 < m; s0 += kStrip) {
          const int64_t s1 = std::min(m, s0 + kStrip);
          gemm(false, true, s1 - s0, s1, D, 1.0f, a_rows + s0 * lda, lda, b_rows + c0 * ldb, ldb, 0.0f,
               c + s0 * ldc + c0, ldc);
        }
        // The strips overshoot the diagonal by less than a strip; above it the matrix is zero.
        for (int64_t i = 0; i < m; ++i) zero_fill(c + i * ldc + c0 + i + 1, ldc - (c0 + i + 1));
      } else {
        c_buf.resize(std::max<size_t>(c_buf.size(), static_cast<size_t>(m * w)));
        gemm(false, true, m, w, D, 1.0f, a_rows, lda, b_rows, ldb, 0.0f, c_buf.data(), w);
        for (int64_t i = 0; i < m; ++i) {
          from_float(c_buf.data() + i * w, c + i * ldc, c0 + i + 1);
          zero_fill(c + i * ldc + c0 + i + 1, ldc - (c0 + i + 1));
        }
      }
      if (sink.done) sink.done(bh, r, c);
    }
  });
}

// ---- tril_o(p) · x -------------------------------------------------------------------------------

template <typename scalar_t>
void matmul_nn_kernel(const at::Tensor& p, const at::Tensor& x, const CausalLayout& L, int64_t group,
                      at::Tensor& out) {
  const int64_t BH = p.size(0) * p.size(1), D = x.size(3);  // query heads; x has BH / group
  const auto P = packed3<scalar_t>(p);
  const auto X = rows4<scalar_t>(x), C = rows4<scalar_t>(out);
  auto cum = head_prefix_cost(L.R, [&](int64_t r) {
    return static_cast<double>(L.rows(r) * L.width(r) * D + L.width(r) * 16);
  });
  parallel_for_balanced(BH * L.R, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> p_buf, x_buf, c_buf, tile(kBlock * kBlock);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / L.R, r = item % L.R, r0 = r * kBlock, m = L.rows(r);
      const int64_t c0 = L.o + r0, w = c0 + m, ldp = L.stride(r);
      const scalar_t* p_blk = P.at(bh) + L.start(r);
      scalar_t* c = C.at(bh) + r0 * C.ld;
      if constexpr (std::is_same_v<scalar_t, float>) {
        const float* x_bh = X.at(bh / group);
        // Keys every row of the block sees: a full (m × c0) panel of P.
        if (c0 > 0) gemm(false, false, m, D, c0, 1.0f, p_blk, ldp, x_bh, X.ld, 0.0f, c, C.ld);
        // The diagonal tile, lower triangle only.
        copy_lower_tile(p_blk + c0, ldp, m, tile.data());
        for (int64_t s0 = 0; s0 < m; s0 += kStrip) {  // strip rows [s0, s1) need keys [c0, c0 + s1)
          const int64_t s1 = std::min(m, s0 + kStrip);
          gemm(false, false, s1 - s0, D, s1, 1.0f, tile.data() + s0 * m, m, x_bh + c0 * X.ld, X.ld,
               c0 > 0 ? 1.0f : 0.0f, c + s0 * C.ld, C.ld);
        }
      } else {
        // One GEMM over the (m × w) block converted to float32, zeros above the diagonal.
        p_buf.resize(std::max<size_t>(p_buf.size(), static_cast<size_t>(m * w)));
        for (int64_t i = 0; i < m; ++i) {
          to_float(p_blk + i * ldp, p_buf.data() + i * w, c0 + i + 1);
          std::fill(p_buf.data() + i * w + c0 + i + 1, p_buf.data() + (i + 1) * w, 0.0f);
        }
        int64_t ldx;
        const float* x_rows = float_rows(X.at(bh / group), X.ld, 0, w, D, x_buf, ldx);
        c_buf.resize(std::max<size_t>(c_buf.size(), static_cast<size_t>(m * D)));
        gemm(false, false, m, D, w, 1.0f, p_buf.data(), w, x_rows, ldx, 0.0f, c_buf.data(), D);
        for (int64_t i = 0; i < m; ++i) from_float(c_buf.data() + i * D, c + i * C.ld, D);
      }
    }
  });
}

// ---- tril_o(p)ᵀ · x ------------------------------------------------------------------------------

// Query rows that see key j: i >= first_query(j) (the last query sees every key).
inline int64_t first_query(const CausalLayout& L, int64_t j) { return std::max<int64_t>(0, j - L.o); }

template <typename scalar_t>
void matmul_tn_kernel(const at::Tensor& p, const at::Tensor& x, const CausalLayout& L, int64_t group,
                      at::Tensor& out) {
  // out (B, H_kv, T_k, D): output head kv sums the query heads [kv·G, (kv + 1)·G) of p and x.
  const int64_t BH_kv = out.size(0) * out.size(1), D = x.size(3), T_q = L.T_q, T_k = L.T_k;
  const auto P = packed3<scalar_t>(p);
  const auto X = rows4<scalar_t>(x), C = rows4<scalar_t>(out);
  const int64_t nb = (T_k + kBlock - 1) / kBlock;
  // Key block kb owns output rows [k0, k1) and sums over the queries [first_query(k0), T_q) that
  // see them, in each of the group's G query heads.
  auto cum = head_prefix_cost(nb, [&](int64_t kb) {
    const int64_t k0 = kb * kBlock, m = std::min(T_k, k0 + kBlock) - k0;
    return static_cast<double>(group * (T_q - first_query(L, k0)) * m * (D + 1));
  });
  parallel_for_balanced(BH_kv * nb, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> p_buf, x_buf, ct(kBlock * D), c_buf(kBlock * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kv = item / nb, k0 = (item % nb) * kBlock, k1 = std::min(T_k, k0 + kBlock), m = k1 - k0;
      const int64_t qa = first_query(L, k0), qf = first_query(L, k1 - 1);  // qa <= qf < T_q
      constexpr bool kIsFloat = std::is_same_v<scalar_t, float>;
      // Cᵀ (D × m) accumulates the group's query heads in order: the first one's first GEMM
      // overwrites it (beta 0), every later GEMM adds (beta 1).
      for (int64_t g = 0; g < group; ++g) {
        const int64_t bh = kv * group + g;
        const scalar_t* p_bh = P.at(bh);
        // float32 copies of P's column strip [k0, k1): the rows [qa, qf) that cross the diagonal
        // (zeros above it), and for bfloat16 all of [qa, T_q). ((rows - qa) × m), contiguous.
        const int64_t copied = kIsFloat ? qf : T_q;
        p_buf.resize(std::max<size_t>(p_buf.size(), static_cast<size_t>((copied - qa) * m)));
        for (int64_t i = qa; i < copied; ++i) {
          const int64_t valid = std::min(m, L.o + i + 1 - k0);
          float* dst = p_buf.data() + (i - qa) * m;
          to_float(p_bh + L.row_offset(i) + k0, dst, valid);
          std::fill(dst + valid, dst + m, 0.0f);
        }
        int64_t ldx;
        const float* x_rows = float_rows(X.at(bh), X.ld, qa, T_q, D, x_buf, ldx);  // row qa first
        // Computed transposed, Cᵀ (D × m) = X[qa:T_q]ᵀ · strip, so that the strip is B of the GEMM,
        // read row by row: MKL measured faster this way than with its transpose as A. The queries
        // [qf, T_q) see the whole block: float32 reads them in place, one GEMM per row block (each
        // has its own stride), bfloat16 from the copy in one GEMM.
        if constexpr (kIsFloat) {
          for (int64_t i0 = qf; i0 < T_q;) {
            const int64_t r = i0 / kBlock, i1 = std::min(T_q, (r + 1) * kBlock);
            gemm(true, false, D, m, i1 - i0, 1.0f, x_rows + (i0 - qa) * ldx, ldx, p_bh + L.row_offset(i0) + k0,
                 L.stride(r), g == 0 && i0 == qf ? 0.0f : 1.0f, ct.data(), m);
            i0 = i1;
          }
        } else {
          gemm(true, false, D, m, T_q - qf, 1.0f, x_rows + (qf - qa) * ldx, ldx, p_buf.data() + (qf - qa) * m, m,
               g == 0 ? 0.0f : 1.0f, ct.data(), m);
        }
        // The queries [qa, qf) cross the diagonal: strip columns [s0, s1) are zero above query
        // first_query(k0 + s0).
        for (int64_t s0 = 0; s0 < m; s0 += kStrip) {
          const int64_t s1 = std::min(m, s0 + kStrip), first = std::max(qa, first_query(L, k0 + s0));
          if (first >= qf) continue;
          gemm(true, false, D, s1 - s0, qf - first, 1.0f, x_rows + (first - qa) * ldx, ldx,
               p_buf.data() + (first - qa) * m + s0, m, 1.0f, ct.data() + s0, m);
        }
      }
      scalar_t* c = C.at(kv) + k0 * C.ld;
      if constexpr (kIsFloat) {
        at::vec::transpose_mxn<float>(ct.data(), m, c, C.ld, static_cast<int>(D), static_cast<int>(m));
      } else {
        at::vec::transpose_mxn<float>(ct.data(), m, c_buf.data(), D, static_cast<int>(D), static_cast<int>(m));
        for (int64_t j = 0; j < m; ++j) from_float(c_buf.data() + j * D, c + j * C.ld, D);
      }
    }
  });
}

// Shared argument checks of the (packed matrix, rows) products: x (B, H or H_kv, T_x, D), p packed
// (B, H, N) for (T_q, T_k), T_x one of them. nn's x is the key/value side (`x_grouped`: H_kv heads
// dividing p's H), tn's the query side (p's H).
void check_matrix_rows(const at::Tensor& p, const at::Tensor& x, int64_t T_q, int64_t T_k, const char* op,
                       const char* x_dims, bool x_grouped) {
  check_rank4(x, op, "x", x_dims);
  check_packed(p, T_q, T_k, op, "p");
  check_same_dtype_device(x, p, op, "x", "p");
  TORCH_CHECK(x.size(0) == p.size(0) && (x_grouped || x.size(1) == p.size(1)), op, ": x has shape ", x.sizes(),
              " but p has shape ", p.sizes(), "; x must be ", x_dims, " with p's B", x_grouped ? "" : " and H");
  if (x_grouped) check_kv_heads(p.size(1), x.size(1), op, "x", "p");
  check_blas_size(CausalLayout::roundup(T_k), op, "T_k rounded up to 64");
  check_blas_size(x.size(3), op, "D");
}

// G, the query heads per key/value head (the checks above made H_kv divide H; H = H_kv = 0 is empty).
int64_t group_size(int64_t H, int64_t H_kv) { return H_kv > 0 ? H / H_kv : 1; }

}  // namespace

CausalLayout check_nt_args(const at::Tensor& a, const at::Tensor& b, const char* op) {
  check_rank4(a, op, "a", "(B, H, T_q, D)");
  check_rank4(b, op, "b", "(B, H_kv, T_k, D)");
  check_dtype(a, op, "a");
  check_same_dtype_device(b, a, op, "b", "a");
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(3) == b.size(3), op, ": b has shape ", b.sizes(), " but a has shape ",
              a.sizes(), "; a (B, H, T_q, D) and b (B, H_kv, T_k, D) must share B and D");
  check_kv_heads(a.size(1), b.size(1), op, "b", "a");
  const CausalLayout L(a.size(2), b.size(2));
  check_lengths(L.T_q, L.T_k, op);
  check_blas_size(CausalLayout::roundup(L.T_k), op, "T_k rounded up to 64");
  check_blas_size(a.size(3), op, "D");
  return L;
}

namespace {
template <typename scalar_t>
void nt_blocks_impl(const at::Tensor& a, const at::Tensor& b, const CausalLayout& L, const NtSink<scalar_t>& sink) {
  const int64_t BH = a.size(0) * a.size(1);
  if (BH == 0 || L.T_q == 0) return;
  if (a.size(3) == 0) {  // no products: every block is zero
    for (int64_t item = 0; item < BH * L.R; ++item) {
      const int64_t bh = item / L.R, r = item % L.R;
      scalar_t* c = sink.block(bh, r);
      zero_fill(c, L.rows(r) * L.stride(r));
      if (sink.done) sink.done(bh, r, c);
    }
    return;
  }
  const auto ra = rows_readable(a), rb = rows_readable(b);
  const int64_t group = group_size(a.size(1), b.size(1));
  if constexpr (std::is_same_v<scalar_t, float>) {
    matmul_nt_kernel<float>(ra, rb, L, group, sink);
  } else {
    if (amx::usable(a.size(3))) amx::matmul_nt(ra, rb, L, group, sink);
    else matmul_nt_kernel<c10::BFloat16>(ra, rb, L, group, sink);
  }
}
}  // namespace

namespace {
template <typename scalar_t>
void nt_into_packed(const at::Tensor& a, const at::Tensor& b, const CausalLayout& L, at::Tensor& out) {
  const auto C = packed3<scalar_t>(out);
  nt_blocks(a, b, L, NtSink<scalar_t>{[&](int64_t bh, int64_t r) { return C.at(bh) + L.start(r); }, nullptr});
}
}  // namespace

void nt_blocks(const at::Tensor& a, const at::Tensor& b, const CausalLayout& L, const NtSink<float>& sink) {
  nt_blocks_impl(a, b, L, sink);
}
void nt_blocks(const at::Tensor& a, const at::Tensor& b, const CausalLayout& L, const NtSink<c10::BFloat16>& sink) {
  nt_blocks_impl(a, b, L, sink);
}

at::Tensor causal_matmul_nt(const at::Tensor& a, const at::Tensor& b) {
  const CausalLayout L = check_nt_args(a, b, "fastgpt::causal_matmul_nt");
  at::Tensor out = empty_causal(a.size(0), a.size(1), L.N, a.options());  // (B, H, N)
  if (out.numel() == 0) return out;
  if (a.scalar_type() == at::kFloat) nt_into_packed<float>(a, b, L, out);
  else nt_into_packed<c10::BFloat16>(a, b, L, out);
  return out;
}

at::Tensor causal_matmul_nn(const at::Tensor& p, const at::Tensor& x, int64_t T_q) {
  constexpr const char* op = "fastgpt::causal_matmul_nn";
  check_matrix_rows(p, x, T_q, x.dim() == 4 ? x.size(2) : 0, op, "(B, H_kv, T_k, D)", true);
  const CausalLayout L(T_q, x.size(2));
  const auto rp = packed_readable(p), rx = rows_readable(x);
  at::Tensor out = at::empty({p.size(0), p.size(1), T_q, x.size(3)}, x.options());  // (B, H, T_q, D)
  if (out.numel() == 0) return out;
  const int64_t group = group_size(p.size(1), x.size(1));
  if (p.scalar_type() == at::kFloat) matmul_nn_kernel<float>(rp, rx, L, group, out);
  else if (amx::usable(x.size(3))) amx::matmul_nn(rp, rx, L, group, out);
  else matmul_nn_kernel<c10::BFloat16>(rp, rx, L, group, out);
  return out;
}

at::Tensor causal_matmul_tn(const at::Tensor& p, const at::Tensor& x, int64_t T_k, std::optional<int64_t> kv_heads) {
  constexpr const char* op = "fastgpt::causal_matmul_tn";
  check_matrix_rows(p, x, x.dim() == 4 ? x.size(2) : 0, T_k, op, "(B, H, T_q, D)", false);
  const int64_t H = x.size(1), H_kv = kv_heads.value_or(H);
  check_kv_heads(H, H_kv, op, "the output (kv_heads)", "x");
  const CausalLayout L(x.size(2), T_k);
  const auto rp = packed_readable(p), rx = rows_readable(x);
  at::Tensor out = at::empty({x.size(0), H_kv, T_k, x.size(3)}, x.options());  // (B, H_kv, T_k, D)
  if (out.numel() == 0) return out;
  if (L.T_q == 0 || H == 0) return out.zero_();  // no query sees any key
  const int64_t group = group_size(H, H_kv);
  if (p.scalar_type() == at::kFloat) matmul_tn_kernel<float>(rp, rx, L, group, out);
  else if (amx::usable(x.size(3))) amx::matmul_tn(rp, rx, L, group, out);
  else matmul_tn_kernel<c10::BFloat16>(rp, rx, L, group, out);
  return out;
}

int64_t causal_packed_size(int64_t T_q, int64_t T_k) {
  check_lengths(T_q, T_k, "fastgpt::causal_packed_size");
  return CausalLayout(T_q, T_k).N;
}

}  // namespace fastgpt::cpu
