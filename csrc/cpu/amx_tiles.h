// The pieces every bfloat16 AMX kernel here is built from (amx_matmul.cpp, attention_flash_amx.cpp):
// one product on oneDNN's batch-reduce GEMM micro-kernel as ATen exports it
// (at::native::cpublas::brgemm), and the packing of its B operand.
//
//   C (M × N, float32) [+]= A (M × K, bfloat16, row-major, any ld) · B (K × N, bfloat16, VNNI)
//
// B's VNNI layout pairs consecutive rows: element (k, n) at (k / 2)·2·ldb + 2·n + k % 2, and ldb
// is at most 64 (the widest packed block; 16, 32, 48 or 64). Here a VNNI pair row is held as
// uint32 words, (row 2q, row 2q + 1) in the low and high halves.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace fastgpt::cpu::amx {

using bf16 = c10::BFloat16;

constexpr int64_t kTile = 64;  // columns of one packed B block: the widest ldb

inline int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

inline uint32_t bits(const bf16* row, int64_t c) { return row[c].x; }

// VNNI pair row (ldb pairs): out[c] = (a[c], b[c]) for c < valid_a / valid_b, zero elsewhere;
// a null row is all zero.
inline void interleave(const bf16* a, int64_t valid_a, const bf16* b, int64_t valid_b, int64_t ldb, uint32_t* out) {
  const int64_t both = std::min(valid_a, valid_b);
  int64_t c = 0;
  for (; c < both; ++c) out[c] = bits(a, c) | (bits(b, c) << 16);  // the hot loop: vectorised
  for (; c < ldb; ++c) out[c] = (c < valid_a ? bits(a, c) : 0u) | ((c < valid_b ? bits(b, c) : 0u) << 16);
}

// B of A·xᵀ for rows x (n ≤ 64 rows × D, ld): (D / 2) pair rows of 64, row j of x in column j,
// zero for j ≥ n. Each row of x is already D / 2 adjacent pairs: the packing is a transpose of
// 32-bit words, which ATen's float transpose (16×16 AVX-512 blocks) does as moves, the bits untouched.
inline void pack_transposed(const bf16* x, int64_t ld, int64_t n, int64_t D, uint32_t* out) {
  if (ld % 2 == 0 && reinterpret_cast<uintptr_t>(x) % alignof(float) == 0) {
    at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(x), ld / 2, reinterpret_cast<float*>(out), kTile,
                                  static_cast<int>(n), static_cast<int>(D / 2));
  } else {
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t q = 0; q < D / 2; ++q) {
        uint32_t v;
        std::memcpy(&v, x + j * ld + 2 * q, sizeof(v));
        out[q * kTile + j] = v;
      }
    }
  }
  for (int64_t q = 0; q < D / 2 && n < kTile; ++q) std::fill(out + q * kTile + n, out + (q + 1) * kTile, 0u);
}

// The B panels of D's columns: [d0, d0 + width) for d0 = 0, 64, ..., each ldb = width rounded up to 16.
struct ColumnPanel {
  int64_t d0, width, ldb, offset;  // offset: Σ ldb of the panels before it
};
inline std::vector<ColumnPanel> column_panels(int64_t D) {
  std::vector<ColumnPanel> panels;
  int64_t offset = 0;
  for (int64_t d0 = 0; d0 < D; d0 += kTile) {
    const int64_t width = std::min(kTile, D - d0), ldb = round_up(width, 16);
    panels.push_back({d0, width, ldb, offset});
    offset += ldb;
  }
  return panels;
}
inline int64_t panels_width(const std::vector<ColumnPanel>& panels) { return panels.back().offset + panels.back().ldb; }

// B of P·x for the rows of x (T × D, ld): pair row q of every column panel, (x[2q], x[2q + 1])
// restricted to the panel's columns, zero for rows ≥ T and past D. The panel of `cp` for K_pad
// rows starts at out + K_pad / 2 · cp.offset; pair row q of it at + q · cp.ldb.
inline void pack_pair_row(const bf16* x, int64_t ld, int64_t T, int64_t q, int64_t K_pad,
                          const std::vector<ColumnPanel>& panels, uint32_t* out) {
  const int64_t i = 2 * q;
  const bf16* even = i < T ? x + i * ld : nullptr;
  const bf16* odd = i + 1 < T ? x + (i + 1) * ld : nullptr;
  for (const ColumnPanel& cp : panels) {
    interleave(even ? even + cp.d0 : nullptr, even ? cp.width : 0, odd ? odd + cp.d0 : nullptr, odd ? cp.width : 0,
               cp.ldb, out + K_pad / 2 * cp.offset + q * cp.ldb);
  }
}

// dst (D × ld_dst) = the transpose of src's first n rows (n × D, ld), zero in columns [n, n_pad).
inline void transpose_rows(const bf16* src, int64_t ld, int64_t n, int64_t D, bf16* dst, int64_t ld_dst, int64_t n_pad) {
  constexpr int64_t kT = 32;  // transpose_mxn's largest bfloat16 block
  for (int64_t i0 = 0; i0 < n; i0 += kT) {
    const int64_t rows = std::min(kT, n - i0);
    for (int64_t d0 = 0; d0 < D; d0 += kT) {
      at::vec::transpose_mxn<bf16>(src + i0 * ld + d0, ld, dst + d0 * ld_dst + i0, ld_dst, static_cast<int>(rows),
                                   static_cast<int>(std::min(kT, D - d0)));
    }
  }
  for (int64_t d = 0; d < D && n < n_pad; ++d) std::fill(dst + d * ld_dst + n, dst + d * ld_dst + n_pad, bf16(0.0f));
}

// One product: C (m × n) [+]= A (m × k, lda) · B (VNNI, ldb).
inline void product(int64_t m, int64_t n, int64_t k, const bf16* a, int64_t lda, const uint32_t* b, int64_t ldb,
                    bool accumulate, float* c, int64_t ldc) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, reinterpret_cast<const bf16*>(b), c,
                              /*is_vnni=*/true);
}

// Packed operands: uint32 VNNI pairs from the buffer pool (large ones are recycled).
struct Packed {
  at::Tensor storage;
  uint32_t* data;
  explicit Packed(int64_t pairs)
      : storage(BufferPool::instance().empty({pairs}, at::TensorOptions().dtype(at::kInt))),
        data(reinterpret_cast<uint32_t*>(storage.data_ptr())) {}
};

}  // namespace fastgpt::cpu::amx
