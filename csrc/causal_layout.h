// The packed causal layout (csrc/README.md, "Causal matrix, packed"): T_q ≤ T_k queries and keys,
// the diagonal aligned bottom-right (o = T_k - T_q, query i sees keys j ≤ o + i), stored as a
// staircase of 64-row blocks, each a dense row-major matrix as wide as its last row needs, rounded
// up to a multiple of 64. Plain C++ (`__host__ __device__` under nvcc), no torch.
//
// RECONCILE (integrator): branch `packed` owns this file; this is the minimal version the CUDA
// kernels (branch `cuda2`) were written against, the README formula verbatim. Keep `packed`'s file
// and map these names onto it if they differ.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTGPT_LAYOUT_FN __host__ __device__ __forceinline__
#else
#define FASTGPT_LAYOUT_FN inline
#endif

namespace fastgpt {

constexpr int64_t kCausalBlock = 64;  // rows per block, and the width granule

struct CausalLayout {
  int64_t T_q, T_k;  // T_q ≤ T_k

  FASTGPT_LAYOUT_FN int64_t offset() const { return T_k - T_q; }  // o
  FASTGPT_LAYOUT_FN int64_t blocks() const { return (T_q + kCausalBlock - 1) / kCausalBlock; }  // R
  // rows_r = min(64, T_q - 64·r)
  FASTGPT_LAYOUT_FN int64_t block_rows(int64_t r) const {
    const int64_t left = T_q - kCausalBlock * r;
    return left < kCausalBlock ? left : kCausalBlock;
  }
  // w_r = min(T_k, o + 64·r + rows_r): keys visible to the block's last row
  FASTGPT_LAYOUT_FN int64_t block_visible(int64_t r) const {
    const int64_t w = offset() + kCausalBlock * r + block_rows(r);
    return w < T_k ? w : T_k;
  }
  // W_r = roundup(w_r, 64): the block's row stride
  FASTGPT_LAYOUT_FN int64_t block_width(int64_t r) const {
    return (block_visible(r) + kCausalBlock - 1) / kCausalBlock * kCausalBlock;
  }
  // start_r = Σ_{r' < r} rows_r' · W_r' (every block before r is full: 64 rows)
  FASTGPT_LAYOUT_FN int64_t block_start(int64_t r) const {
    int64_t start = 0;
    for (int64_t s = 0; s < r; ++s) start += block_rows(s) * block_width(s);
    return start;
  }
  // N = Σ_r rows_r · W_r: elements per (b, h)
  FASTGPT_LAYOUT_FN int64_t numel() const { return block_start(blocks()); }
  // Where element (i, j), j ≤ o + i, lives within one (b, h).
  FASTGPT_LAYOUT_FN int64_t index(int64_t i, int64_t j) const {
    const int64_t r = i / kCausalBlock;
    return block_start(r) + (i - kCausalBlock * r) * block_width(r) + j;
  }
};

}  // namespace fastgpt
