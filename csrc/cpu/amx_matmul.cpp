// The bfloat16 causal matmuls on AMX (amx_matmul.h), built from amx_tiles.h's product (B operand
// in VNNI pairs, at most 64 columns per packed block) and packings. Every product here has a B
// operand packed in 64-column blocks, and an A operand read in place where it can be:
//
//   nt  S = A·Bᵀ: A = the query rows in place; B = the key rows, packed once per call
//       (`pack_transposed`: row j of the keys is column j of Bᵀ, and its pairs are already adjacent).
//       One product per (row block, 64-key tile), each (m × 64) result rounded into the packed row.
//   nn  O = P·X: A = the packed rows of P in place over the keys every row of the block sees, and a
//       masked copy of the 1-2 tiles the diagonal crosses; B = X's rows in VNNI pairs, packed once
//       per call, one panel per 64 columns of D, so that one product covers all the full tiles.
//   tn  Cᵀ = Xᵀ·P: computed transposed (D × 64 keys) so that P's column strip is B (pairs of P's
//       rows interleaved, the diagonal masked on the way) and A = Xᵀ, transposed once per call;
//       the G query heads of a group accumulate into one float32 tile in order (deterministic).
//
// The packed operands live in one buffer per call; their padding (keys past T_k, queries past
// T_q, columns past D) is zero, so every tile is full and a product never reads past it.

#include "amx_matmul.h"

#include <cstring>

#include "amx_tiles.h"
#include "isa.h"

namespace fastgpt::cpu::amx {
namespace {

namespace cpublas = at::native::cpublas;

constexpr int64_t kBlock = kCausalBlock;
constexpr int64_t kAhead = 8;  // pairs of P's rows prefetched ahead in tn

// Work (multiply-adds) below which a thread is not worth waking: ten times the float32 kernels'
// threshold, since AMX tiles get through multiply-adds that much sooner.
constexpr double kMinCostPerThread = 5e6;

}  // namespace

bool usable(int64_t D) { return D % 2 == 0 && D != 0 && isa::use_amx(); }

// ---- tril_o(a · bᵀ) ----------------------------------------------------------------------------

void matmul_nt(const at::Tensor& a, const at::Tensor& b, const CausalLayout& L, int64_t group,
               const NtSink<c10::BFloat16>& sink) {
  const int64_t BH = a.size(0) * a.size(1), BH_kv = b.size(0) * b.size(1), D = a.size(3);
  const auto A = rows4<bf16>(a), Bm = rows4<bf16>(b);
  const int64_t key_tiles = (L.T_k + kTile - 1) / kTile, tile_pairs = D / 2 * kTile;

  // Every key/value head's keys as B tiles of 64 keys, in order: (BH_kv, key_tiles, D / 2, 64).
  Packed keys(BH_kv * key_tiles * tile_pairs);
  at::parallel_for(0, BH_kv * key_tiles, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kv = item / key_tiles, k0 = item % key_tiles * kTile;
      pack_transposed(Bm.at(kv) + k0 * Bm.ld, Bm.ld, std::min(kTile, L.T_k - k0), D, keys.data + item * tile_pairs);
    }
  });

  auto cum = head_prefix_cost(L.R, [&](int64_t r) { return static_cast<double>(L.rows(r) * L.stride(r) * D); });
  parallel_for_balanced(BH * L.R, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<float> block;  // the row block's products, (m × ldc) float32: at most 256 KiB at T = 1024
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / L.R, r = item % L.R, r0 = r * kBlock, m = L.rows(r);
      const int64_t c0 = L.o + r0, ldc = L.stride(r);  // row i of the block sees keys [0, c0 + i]
      const bf16* a_rows = A.at(bh) + r0 * A.ld;
      const uint32_t* head_keys = keys.data + (bh / group) * key_tiles * tile_pairs;
      block.resize(static_cast<size_t>(m * ldc));
      for (int64_t k0 = 0; k0 < ldc; k0 += kTile) {  // every tile holds a key some row sees
        product(m, kTile, D, a_rows, A.ld, head_keys + k0 / kTile * tile_pairs, kTile, false, block.data() + k0, ldc);
      }
      // Rounded into the packed block row after row, zeros above the diagonal.
      bf16* c = sink.block(bh, r);
      for (int64_t i = 0; i < m; ++i) {
        from_float(block.data() + i * ldc, c + i * ldc, c0 + i + 1);
        zero_fill(c + i * ldc + c0 + i + 1, ldc - (c0 + i + 1));
      }
      if (sink.done) sink.done(bh, r, c);
    }
    cpublas::brgemm_release();
  });
}

// ---- tril_o(p) · x -------------------------------------------------------------------------------

void matmul_nn(const at::Tensor& p, const at::Tensor& x, const CausalLayout& L, int64_t group, at::Tensor& out) {
  const int64_t BH = p.size(0) * p.size(1), BH_kv = x.size(0) * x.size(1), D = x.size(3);
  const auto P = packed3<bf16>(p);
  const auto X = rows4<bf16>(x), O = rows4<bf16>(out);
  const auto panels = column_panels(D);
  const int64_t K_pad = round_up(L.T_k, kTile), width_pad = panels_width(panels);
  const int64_t head_pairs = K_pad / 2 * width_pad;  // one head's panels, each (K_pad / 2, ldb) pairs

  // X's rows in VNNI pairs, per key/value head and column panel, zero past T_k and past D.
  Packed rows(BH_kv * head_pairs);
  at::parallel_for(0, BH_kv * (K_pad / 2), 64, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kv = item / (K_pad / 2);
      pack_pair_row(X.at(kv), X.ld, L.T_k, item % (K_pad / 2), K_pad, panels, rows.data + kv * head_pairs);
    }
  });

  auto cum = head_prefix_cost(L.R, [&](int64_t r) { return static_cast<double>(L.rows(r) * L.stride(r) * D); });
  parallel_for_balanced(BH * L.R, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<bf16> diagonal;
    std::vector<float> acc(kBlock * panels.front().ldb);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / L.R, r = item % L.R, r0 = r * kBlock, m = L.rows(r);
      const int64_t c0 = L.o + r0, ldp = L.stride(r);
      // Keys [0, full) are seen by every row of the block (row 0 sees [0, c0]): P read in place.
      // The tiles after them, up to the block's stride, cross the diagonal: a masked copy.
      const int64_t full = (c0 + 1) / kTile * kTile, masked = ldp - full;
      const bf16* p_blk = P.at(bh) + L.start(r);
      diagonal.resize(static_cast<size_t>(m * masked));
      for (int64_t i = 0; i < m; ++i) {
        const int64_t seen = std::clamp<int64_t>(c0 + i + 1 - full, 0, masked);
        bf16* dst = diagonal.data() + i * masked;
        std::memcpy(dst, p_blk + i * ldp + full, seen * sizeof(bf16));
        std::fill(dst + seen, dst + masked, bf16(0.0f));
      }
      const uint32_t* head_rows = rows.data + (bh / group) * head_pairs;
      bf16* o = O.at(bh) + r0 * O.ld;
      for (const ColumnPanel& cp : panels) {
        const uint32_t* panel = head_rows + K_pad / 2 * cp.offset;
        if (full > 0) product(m, cp.ldb, full, p_blk, ldp, panel, cp.ldb, false, acc.data(), cp.ldb);
        if (masked > 0) {
          product(m, cp.ldb, masked, diagonal.data(), masked, panel + full / 2 * cp.ldb, cp.ldb, full > 0,
                  acc.data(), cp.ldb);
        }
        for (int64_t i = 0; i < m; ++i) from_float(acc.data() + i * cp.ldb, o + i * O.ld + cp.d0, cp.width);
      }
    }
    cpublas::brgemm_release();
  });
}

// ---- tril_o(p)ᵀ · x ------------------------------------------------------------------------------

void matmul_tn(const at::Tensor& p, const at::Tensor& x, const CausalLayout& L, int64_t group, at::Tensor& out) {
  const int64_t BH_kv = out.size(0) * out.size(1), BH = BH_kv * group, D = x.size(3);
  const int64_t T_q = L.T_q, T_k = L.T_k;
  const auto P = packed3<bf16>(p);
  const auto X = rows4<bf16>(x), C = rows4<bf16>(out);
  const int64_t ld_t = round_up(T_q, kTile);  // Xᵀ's rows: T_q queries, zero after them

  // Xᵀ per query head: (BH, D, ld_t), bfloat16 (A of the product is plain row-major).
  at::Tensor xt_storage = BufferPool::instance().empty({BH * D * ld_t}, x.options());
  bf16* xt = xt_storage.data_ptr<bf16>();
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) transpose_rows(X.at(bh), X.ld, T_q, D, xt + bh * D * ld_t, ld_t, ld_t);
  });

  const int64_t nb = (T_k + kBlock - 1) / kBlock;
  auto first_query = [&](int64_t j) { return std::max<int64_t>(0, j - L.o); };  // query rows seeing key j
  auto cum = head_prefix_cost(nb, [&](int64_t kb) {
    return static_cast<double>(group * (T_q - first_query(kb * kBlock)) * kBlock * D);
  });
  parallel_for_balanced(BH_kv * nb, cum, kMinCostPerThread, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> strip;
    std::vector<float> ct(D * kTile), c_rows(kTile * D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t kv = item / nb, k0 = item % nb * kBlock, m = std::min(T_k, k0 + kBlock) - k0;
      // The queries that see a key of the block, from an even row (a VNNI pair) to T_q rounded up to even.
      const int64_t qs = first_query(k0) / 2 * 2, K = round_up(T_q, 2) - qs;
      strip.resize(static_cast<size_t>(K / 2 * kTile));
      for (int64_t g = 0; g < group; ++g) {
        const int64_t bh = kv * group + g;
        const bf16* p_bh = P.at(bh);
        auto row = [&](int64_t i, int64_t& seen) -> const bf16* {  // P[i, k0 : k0 + seen), zero after
          seen = i < T_q ? std::clamp<int64_t>(L.o + i + 1 - k0, 0, kTile) : 0;
          return seen > 0 ? p_bh + L.row_offset(i) + k0 : nullptr;
        };
        for (int64_t q = 0; q < K / 2; ++q) {
          // The strip's rows are 128 bytes a packed row apart: a pattern the hardware does not
          // prefetch, so ask for the rows kAhead pairs on.
          for (int64_t i = qs + 2 * (q + kAhead); i < std::min(T_q, qs + 2 * (q + kAhead) + 2); ++i) {
            const char* next = reinterpret_cast<const char*>(p_bh + L.row_offset(i) + k0);
            __builtin_prefetch(next);
            __builtin_prefetch(next + 64);
          }
          int64_t seen_even, seen_odd;
          const bf16* even = row(qs + 2 * q, seen_even);
          const bf16* odd = row(qs + 2 * q + 1, seen_odd);
          interleave(even, seen_even, odd, seen_odd, kTile, strip.data() + q * kTile);
        }
        // Cᵀ (D × 64) [+]= Xᵀ[:, qs : qs + K] · strip: the first head overwrites, later ones add.
        product(D, kTile, K, xt + bh * D * ld_t + qs, ld_t, strip.data(), kTile, g > 0, ct.data(), kTile);
      }
      at::vec::transpose_mxn<float>(ct.data(), kTile, c_rows.data(), D, static_cast<int>(D), static_cast<int>(m));
      bf16* c = C.at(kv) + k0 * C.ld;
      for (int64_t j = 0; j < m; ++j) from_float(c_rows.data() + j * D, c + j * C.ld, D);
    }
    cpublas::brgemm_release();
  });
}

}  // namespace fastgpt::cpu::amx
