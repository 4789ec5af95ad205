// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) and the
// dropout rule built on it. Plain C++ with no torch headers, so the CPU kernels and the CUDA
// kernels (cuda/) include the same file and draw the same mask bit for bit.
//
// The dropout stream: the keep bit of element (i, j) of a causal matrix of T_q queries and T_k keys
// (B, H heads), row = (b·H + h)·T_q + i the flat row index, col = j, comes from one Philox call
//
//     key     = (seed_lo, seed_hi)
//     counter = (col / 4, row, offset_lo, offset_hi)
//     word    = output[col % 4]
//     keep    = word >= drop_threshold(p)          (an integer compare: no float rounding)
//
// so a thread that owns four consecutive columns (one 128-bit load of floats) makes one call.
// The stream depends on the logical index only, never on strides, tiles, the packed layout or the
// thread count.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace fastgpt {

// The round and key-schedule constants of Philox4x32 (Random123).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t x[4];
};

// One Philox round on the counter (c0, c1, c2, c3) under the round key (k0, k1).
FASTGPT_HOST_DEVICE void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3,
                                      uint32_t k0, uint32_t k1) {
  // 32x32 -> 64-bit products; on CUDA the compiler maps the high half to mul.hi.
  const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
  const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
  const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
  c1 = static_cast<uint32_t>(p1);
  c3 = static_cast<uint32_t>(p0);
  c0 = n0;
  c2 = n2;
}

// One Philox4x32-10 block: 4 random words for a 128-bit counter under a 64-bit key.
FASTGPT_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                          uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kPhiloxRounds; ++r) {
    philox_round(c0, c1, c2, c3, k0, k1);
    k0 += kPhiloxW0;  // the key schedule: a Weyl sequence
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Elements whose random word is below this are dropped: floor(p · 2^32), computed once on the host
// in double precision (exact for every float p) so both devices compare the same integers.
FASTGPT_HOST_DEVICE uint32_t drop_threshold(double p) {
  const double t = p * 4294967296.0;  // 2^32
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

// Everything a kernel needs to regenerate one call's dropout mask.
struct DropoutStream {
  uint32_t key0, key1;      // the seed
  uint32_t offset0, offset1;  // the offset, a second 64-bit coordinate (e.g. a per-call counter)
  uint32_t threshold;       // drop_threshold(p)
  float keep_scale;         // 1 / (1 - p), applied to kept elements
  bool enabled;             // p > 0 (p below 2^-32 has threshold 0 but still scales)

  // The four random words of columns 4·group .. 4·group + 3 of flat row `row`.
  FASTGPT_HOST_DEVICE Philox4 words(uint32_t group, uint32_t row) const {
    return philox4x32_10(group, row, offset0, offset1, key0, key1);
  }
};

FASTGPT_HOST_DEVICE DropoutStream make_dropout_stream(uint64_t seed, uint64_t offset, double p) {
  DropoutStream s;
  s.key0 = static_cast<uint32_t>(seed);
  s.key1 = static_cast<uint32_t>(seed >> 32);
  s.offset0 = static_cast<uint32_t>(offset);
  s.offset1 = static_cast<uint32_t>(offset >> 32);
  s.threshold = drop_threshold(p);
  s.keep_scale = static_cast<float>(1.0 / (1.0 - p));
  s.enabled = p > 0.0;
  return s;
}

}  // namespace fastgpt
