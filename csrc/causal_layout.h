// The packed causal layout (csrc/README.md, "Contracts"): where element (i, j) of a causal matrix
// with T_q queries and T_k >= T_q keys lives. Plain C++ with no torch headers, `__host__ __device__`
// under nvcc, so the CPU kernels and the CUDA kernels (cuda/) index the same way; the same
// formula in Python is fastgpt/ext/layout.py, and a test holds the two together.
//
// Query i sees keys j <= o + i, o = T_k - T_q (the diagonal aligned bottom-right). Rows come in
// blocks of kCausalBlock; block r is a dense row-major (rows(r) × stride(r)) matrix, its stride the
// keys its last row sees rounded up to a multiple of kCausalBlock, and the blocks follow each other:
//
//   r = i / 64, row i at start(r) + (i - 64·r) · stride(r), element (i, j) at row_offset(i) + j.
//
// Every block but the last has 64 rows, and its last row sees o + 64·(r + 1) <= T_k keys, so
// stride(r) = 64·(r + 1) + roundup(o, 64) there and start(r) has a closed form.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fastgpt {

constexpr int64_t kCausalBlock = 64;

struct CausalLayout {
  int64_t T_q, T_k;
  int64_t o;  // T_k - T_q: keys every query sees beyond its own index
  int64_t R;  // row blocks
  int64_t N;  // elements per (b, h)

  FASTGPT_HOST_DEVICE static int64_t roundup(int64_t n) { return (n + kCausalBlock - 1) / kCausalBlock * kCausalBlock; }

  // Assumes 0 <= T_q <= T_k (checks.h refuses anything else before a layout is built).
  FASTGPT_HOST_DEVICE CausalLayout(int64_t tq, int64_t tk) : T_q(tq), T_k(tk), o(tk - tq), R((tq + kCausalBlock - 1) / kCausalBlock), N(0) {
    N = R == 0 ? 0 : start(R - 1) + rows(R - 1) * stride(R - 1);
  }

  // Rows of block r: 64, the last one possibly fewer.
  FASTGPT_HOST_DEVICE int64_t rows(int64_t r) const {
    const int64_t left = T_q - r * kCausalBlock;
    return left < kCausalBlock ? left : kCausalBlock;
  }
  // Keys the last row of block r sees (w_r); those of row i: o + i + 1.
  FASTGPT_HOST_DEVICE int64_t width(int64_t r) const { return o + r * kCausalBlock + rows(r); }
  // Leading dimension of block r (W_r).
  FASTGPT_HOST_DEVICE int64_t stride(int64_t r) const { return roundup(width(r)); }
  // Offset of block r's first element: Σ_{r' < r} 64 · (64·(r' + 1) + roundup(o)), all full blocks.
  FASTGPT_HOST_DEVICE int64_t start(int64_t r) const {
    return kCausalBlock * (kCausalBlock * r * (r + 1) / 2 + roundup(o) * r);
  }
  // Offset of row i's first element; its stride is stride(i / 64).
  FASTGPT_HOST_DEVICE int64_t row_offset(int64_t i) const {
    const int64_t r = i / kCausalBlock;
    return start(r) + (i - r * kCausalBlock) * stride(r);
  }
};

}  // namespace fastgpt
