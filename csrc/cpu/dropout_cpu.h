// The dropout multipliers of one row, vectorised: 16 Philox blocks (64 columns) per step.
// Bit-identical to the scalar philox4x32_10 of philox.h, which the tests and the CUDA kernels use.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../philox.h"

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace fastgpt::cpu {

#if defined(CPU_CAPABILITY_AVX512)
// High halves of the 32x32-bit products of each lane: even lanes from one vpmuludq, odd lanes
// from a second on the shifted inputs; b is a broadcast constant, the same in both halves.
inline __m512i mulhi_epu32(__m512i a, __m512i b) {
  const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, b), 32);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), b);
  return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}

// mult[0..64) for the columns of groups g0 .. g0 + 15 of flat row `row`.
inline void dropout_multipliers_64(const DropoutStream& ds, uint32_t row, uint32_t g0, float* mult) {
  const __m512i M0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m512i M1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(g0)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(row));
  __m512i c2 = _mm512_set1_epi32(static_cast<int>(ds.offset0));
  __m512i c3 = _mm512_set1_epi32(static_cast<int>(ds.offset1));
  uint32_t k0 = ds.key0, k1 = ds.key1;
  for (int r = 0; r < kPhiloxRounds; ++r) {  // philox_round on 16 lanes
    const __m512i hi0 = mulhi_epu32(c0, M0), lo0 = _mm512_mullo_epi32(c0, M0);
    const __m512i hi1 = mulhi_epu32(c2, M1), lo1 = _mm512_mullo_epi32(c2, M1);
    c0 = _mm512_ternarylogic_epi32(hi1, c1, _mm512_set1_epi32(static_cast<int>(k0)), 0x96);  // a ^ b ^ c
    c2 = _mm512_ternarylogic_epi32(hi0, c3, _mm512_set1_epi32(static_cast<int>(k1)), 0x96);
    c1 = lo1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // Word w of lane l is column 4l + w: interleave the four 16-bit keep masks into one 64-bit one.
  const __m512i thr = _mm512_set1_epi32(static_cast<int>(ds.threshold));
  const uint64_t keep = _pdep_u64(_mm512_cmpge_epu32_mask(c0, thr), 0x1111111111111111ull) |
                        _pdep_u64(_mm512_cmpge_epu32_mask(c1, thr), 0x2222222222222222ull) |
                        _pdep_u64(_mm512_cmpge_epu32_mask(c2, thr), 0x4444444444444444ull) |
                        _pdep_u64(_mm512_cmpge_epu32_mask(c3, thr), 0x8888888888888888ull);
  const __m512 scale = _mm512_set1_ps(ds.keep_scale);
  for (int v = 0; v < 4; ++v) {
    _mm512_storeu_ps(mult + 16 * v, _mm512_maskz_mov_ps(static_cast<__mmask16>(keep >> (16 * v)), scale));
  }
}
#else
// Portable version: one lane loop the compiler can vectorise, the rounds inside each lane.
inline void dropout_multipliers_64(const DropoutStream& ds, uint32_t row, uint32_t g0, float* mult) {
  constexpr int kLanes = 16;
  alignas(64) uint32_t w[4][kLanes];
  for (int l = 0; l < kLanes; ++l) {
    uint32_t c0 = g0 + l, c1 = row, c2 = ds.offset0, c3 = ds.offset1, k0 = ds.key0, k1 = ds.key1;
    for (int r = 0; r < kPhiloxRounds; ++r) {
      philox_round(c0, c1, c2, c3, k0, k1);
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    w[0][l] = c0, w[1][l] = c1, w[2][l] = c2, w[3][l] = c3;
  }
  for (int l = 0; l < kLanes; ++l) {
    for (int k = 0; k < 4; ++k) mult[4 * l + k] = w[k][l] >= ds.threshold ? ds.keep_scale : 0.0f;
  }
}
#endif

// mult[0..n) of flat row `row`: keep_scale where the element is kept, 0 where it is dropped.
inline void dropout_multipliers(const DropoutStream& ds, uint32_t row, int64_t n, float* mult) {
  alignas(64) float tail[64];
  int64_t c = 0;
  for (; c + 64 <= n; c += 64) dropout_multipliers_64(ds, row, static_cast<uint32_t>(c / 4), mult + c);
  if (c < n) {
    dropout_multipliers_64(ds, row, static_cast<uint32_t>(c / 4), tail);
    std::memcpy(mult + c, tail, sizeof(float) * (n - c));
  }
}

// The dropout multipliers of flat row `flat` into mult (resized), or null without dropout.
inline const float* row_multipliers(const DropoutStream& ds, int64_t flat, int64_t length, std::vector<float>& mult) {
  if (!ds.enabled) return nullptr;
  mult.resize(static_cast<size_t>(length));
  dropout_multipliers(ds, static_cast<uint32_t>(flat), length, mult.data());
  return mult.data();
}

}  // namespace fastgpt::cpu
