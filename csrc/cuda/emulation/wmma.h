// nvcuda::wmma for the emulation: 16x16x16 tiles of __half or __nv_bfloat16 with float
// accumulators, the shapes fastgpt's kernels use.
//
// Not the hardware's register layout: every lane's fragment holds the WHOLE 16x16 tile
// (num_elements = 256, not 8). Element-wise loops over frag.x[0..num_elements) that treat every
// element the same (scaling, conversion, fill) give the same result; code that maps x[i] to a
// (row, col) through the lane id does not (the layout is unspecified on hardware too).
// mma_sync sums the 16 products of each output in k order in float; the tensor cores may use
// another order. store_matrix_sync writes each element from one lane only (element e from lane
// e % 32), so two lanes never write one address and ThreadSanitizer sees what a missing barrier
// after the store does. None of these ops synchronises the warp: as on hardware, memory written
// by other lanes needs __syncwarp / __syncthreads before load_matrix_sync reads it.
#pragma once

#include <type_traits>

#include "device.h"

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation implements 16x16x16 tiles only");
  static constexpr int num_elements = 256;
  T x[256];  // row-major 16x16, the whole tile in every lane
};

namespace detail {
template <typename T>
float to_float(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return static_cast<float>(v);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (auto& e : f.x) e = value;
}

// A or B operand: element (r, c) at p[r * ldm + c] (row_major) or p[c * ldm + r] (col_major).
template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>);
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r];
  }
}

template <typename T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const T* p, unsigned ldm, layout_t layout) {
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
}

template <typename T>
void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ldm, layout_t layout) {
  const int lane = ::fastgpt::cuda::emu::ctx().lane;
  for (int e = lane; e < 256; e += 32) {  // each element from one lane
    const int r = e / 16, c = e % 16;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
}

// d = a · b + c, float accumulation.
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float, void>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float, void>& c) {
  float out[256];
  for (int r = 0; r < 16; ++r) {
    for (int col = 0; col < 16; ++col) {
      float acc = c.x[r * 16 + col];
      for (int k = 0; k < 16; ++k) acc += detail::to_float(a.x[r * 16 + k]) * detail::to_float(b.x[k * 16 + col]);
      out[r * 16 + col] = acc;
    }
  }
  for (int e = 0; e < 256; ++e) d.x[e] = out[e];
}

}  // namespace nvcuda::wmma
