#pragma once
//! \file
//! An arithmetic form of the 8-bit dynamic maps' exact encoder (bitsandbytes' create_dynamic_map,
//! signed and unsigned, as the 8-bit optimizer states use them). The host AdamW step's 8-bit
//! reciprocal encode runs its AVX-512 form instead of the search table's gather
//! (optim/detail/host_simd.hpp: use_arith8, arith_encode16, arith8_for); this scalar form builds
//! its tables and is the reference the tests compare the vector form with.
//!
//! The dynamic map is, per sign, a zero code, seven decades 10^(i-6) [0.1, 1] of n_i evenly
//! spaced values (signed: n_i = 2^i; unsigned: 2^(i+1)) and the code of 1.0. Inside decade i the
//! steps of the encoder (midpoints of neighbouring values) lie at y = base_i + j, j = 1 .. n_i-1,
//! of the affine y = |x| n_i / (0.9 10^(i-6)) + base_i - n_i / 9, with base_i the magnitude index
//! of the decade's first value. Each binade of |x| holds at most one boundary between decades
//! (they are 10x apart), so per binade one exact comparison with that boundary (`split`) picks
//! one of two segments, and a segment's magnitude index is m = floor(min(a |x| + b, top)). The
//! float arithmetic and the map's own float rounding move the steps a little off the integers of
//! y: where y is within `eps` of an integer the result is flagged (-1) and the caller encodes
//! that value by the table instead; with `near` > 0, so is |x| within `near` float patterns of its
//! binade's split. Only the magnitude index is computed; the code is
//! zero_code + m for x >= 0 and, signed map, zero_code - m clamped to [0, zero_code - 1] for
//! x < 0 (bitsandbytes' sign fix moves the zero code of a negative state one down, and the map
//! has no -1.0); unsigned map, 0 for x < 0.
//!
//! Exactness: the construction checks that every boundary between segments falls in its own
//! binade and computes `eps` from the steps it finds; the proof is the exhaustive comparison with
//! the block table's encoder (tests/quant/dynamic_arith_test.cpp: sampled in CI, all 2^32 floats
//! but NaN with QMEM_EXHAUSTIVE=1). NaN is never passed (the optimizer's block encoders run only
//! for blocks with a positive finite absmax).

#include <qmem/core/config.hpp>
#include <qmem/quant/detail/search_table.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>

namespace qmem::quant::detail {

//! x, through an empty asm statement on g++ and clang: a product passed through it cannot be
//! contracted with the following addition into a fused multiply-add, even where FMA is enabled
//! and contraction allowed (the vector form needs it: g++ contracts intrinsics in functions whose
//! target includes avx512f).
QMEM_INLINE float no_contract(float x) noexcept {
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(x));
#elif (defined(__GNUC__) || defined(__clang__)) && defined(__aarch64__)
  __asm__("" : "+w"(x));
#endif
  return x;
}

class dynamic_arith8 {
public:
  //! Magnitudes are clamped to [2^-25, 1]: both ends lie inside constant segments of the maps.
  static constexpr float lowest = 0x1p-25f;
  struct segment {
    float a = 0.0f, b = 0.5f, top = 0.5f;
    bool operator==(segment const&) const = default;
  };
  //! The tables by exponent field k & 31 of the clamped |x| (k = 102 .. 127 are used): split[k]
  //! is the largest |x| of binade k's lower segment (3 where the binade has one segment); the
  //! segment of |x| is k & 31 (|x| <= split[k]) or (k + 1) & 31 (above: the segment binade k + 1
  //! starts with), whose affine is a, b and top. 32 entries each, for two-register permutes.
  struct tables {
    alignas(64) float split[32];
    alignas(64) float a[32];
    alignas(64) float b[32];
    alignas(64) float top[32];
  };

private:
  tables t_{};
  float eps_ = 0.0f;
  std::uint32_t near_ = 0;
  int zero_ = 0;
  bool signed_ = false;
  bool usable_ = false;

public:
  //! From the exact encoder `e` (float -> code) of the signed or unsigned dynamic map (its
  //! block table's encode: sign fix included). `zero_code`: the code of +0.
  //! `near`: the result must also equal the encoder's code of every float within `near` patterns
  //! of x of the same sign (`eps` is chosen for that; the optimizer's reciprocal path needs 3).
  template <class Encode>
  dynamic_arith8(Encode const& e, bool is_signed, int zero_code, std::uint32_t near = 0)
      : near_(near), zero_(zero_code), signed_(is_signed) {
    int const M = 255 - zero_code; // the magnitude index of 1.0
    // T[m]: the largest |x| >= 0 whose positive code is below zero_code + m (codes are monotone)
    std::array<std::uint32_t, 256> T{};
    for (int m = 1; m <= M; ++m) {
      std::uint32_t lo = 0, hi = 0x3f800000u; // e(lo) < target, e(hi) >= target
      if (e(0.0f) >= zero_code + m || e(1.0f) < zero_code + m)
        return;
      while (hi - lo > 1) {
        std::uint32_t const mid = lo + (hi - lo) / 2;
        (e(std::bit_cast<float>(mid)) < zero_code + m ? lo : hi) = mid;
      }
      T[static_cast<std::size_t>(m)] = lo;
    }
    // segments: zero (m = 0), decades 0..6, the code of 1.0 (m = M); boundary k ends segment k
    struct seg_def {
      segment s;
      std::uint32_t end; // largest |x| bits in the segment
    };
    std::array<seg_def, 9> segs{};
    segs[0] = {{0.0f, 0.5f, 0.5f}, T[1]};
    int base = 1;
    double eps = 0.0;
    for (int i = 0; i < 7; ++i) {
      int const n = is_signed ? (1 << i) : (2 << i);
      double const p = std::pow(10.0, i - 6);
      segment s;
      if (n == 1) {
        s = {0.0f, static_cast<float>(base) + 0.5f, static_cast<float>(base) + 0.5f};
      } else {
        s.a = static_cast<float>(n / (0.9 * p));
        s.b = static_cast<float>(base - n / 9.0);
        s.top = static_cast<float>(base + n) - 0.5f;
        for (int j = 1; j < n; ++j) // each step: y at its last lower and first upper magnitude
          for (std::uint32_t d = 0; d < 2 * near + 2; ++d) {
            std::uint32_t const t = T[static_cast<std::size_t>(base + j)] + d - near;
            float const y = std::min(no_contract(std::bit_cast<float>(t) * s.a) + s.b, s.top);
            eps = std::max(eps, std::abs(static_cast<double>(y) - (base + j)));
          }
      }
      segs[static_cast<std::size_t>(i) + 1] = {s, T[static_cast<std::size_t>(base + n)]};
      base += n;
    }
    if (base != M)
      return;
    segs[8] = {{0.0f, static_cast<float>(M) + 0.5f, static_cast<float>(M) + 0.5f}, 0x7f800000u};
    eps_ = static_cast<float>(2.0 * eps);
    if (!(eps_ < 0.25f))
      return;
    // binades 2^(k-127) .. for k = 102 .. 128 (128: only as binade 127's upper segment)
    for (std::uint32_t k = 102; k <= 128; ++k) {
      std::uint32_t const start = k == 102 ? 0u : k << 23;
      std::uint32_t const last = k >= 127 ? 0x3f800000u : ((k + 1) << 23) - 1;
      std::size_t s = 0;
      while (segs[s].end < start)
        ++s;
      std::size_t const i = k & 31;
      t_.split[i] = 3.0f;
      t_.a[i] = segs[s].s.a;
      t_.b[i] = segs[s].s.b;
      t_.top[i] = segs[s].s.top;
      if (k < 128 && segs[s].end < last) {
        t_.split[i] = std::bit_cast<float>(segs[s].end);
        if (segs[s].end < start + near || segs[s].end + near >= last)
          return; // a split within `near` patterns of its binade's edges: not flagged (encode)
        if (segs[s + 1].end < last)
          return;                                 // two boundaries in one binade
        std::uint32_t const next = (k + 1) << 23; // binade k + 1 must start in segment s + 1
        if (k + 1 < 128 && !(segs[s].end < next && next <= segs[s + 1].end))
          return;
      }
    }
    usable_ = true;
  }

  [[nodiscard]] bool usable() const noexcept { return usable_; }
  [[nodiscard]] float eps() const noexcept { return eps_; }
  [[nodiscard]] tables const& table() const noexcept { return t_; }
  [[nodiscard]] int zero_code() const noexcept { return zero_; }
  [[nodiscard]] std::uint32_t near() const noexcept { return near_; }
  [[nodiscard]] bool is_signed() const noexcept { return signed_; }

  //! The code of x (not NaN), or -1 where x is too close to a step to be sure (then encode by the
  //! table).
  [[nodiscard]] int encode(float x) const noexcept {
    std::uint32_t const u = std::bit_cast<std::uint32_t>(x);
    float const mag = std::min(std::max(std::bit_cast<float>(u & 0x7fffffffu), lowest), 1.0f);
    std::uint32_t const k = std::bit_cast<std::uint32_t>(mag) >> 23;
    float const split = t_.split[k & 31];
    std::uint32_t const i = (k + (mag > split ? 1u : 0u)) & 31;
    // the split is exact; a float within `near` patterns of it may lie in the other segment
    auto const from_split =
        std::bit_cast<std::uint32_t>(mag) - std::bit_cast<std::uint32_t>(split) + near_;
    if (from_split <= 2 * near_)
      return -1;
    float const y = std::min(no_contract(mag * t_.a[i]) + t_.b[i], t_.top[i]);
    if (!(std::abs(y - std::nearbyint(y)) >= eps_))
      return -1;
    int const m = static_cast<int>(y);
    if ((u >> 31) == 0)
      return zero_ + m;
    return signed_ ? std::clamp(zero_ - m, 0, zero_ - 1) : 0;
  }
};

} // namespace qmem::quant::detail
