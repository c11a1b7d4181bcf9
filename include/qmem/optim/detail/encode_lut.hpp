#pragma once
//! \file
//! A table-driven encoder for 4- and 8-bit codes whose nearest-code search is monotone
//! (bitsandbytes' dynamic and linear maps, the 4-bit optimizer maps): the host requantization of
//! the optimizer states without a search per element. It returns exactly what `Code::encode` returns for every float in
//! [-1, 1] (values outside, NaN included, go to `Code::encode` itself).
//!
//! How: encode is a non-decreasing step function of x over the sorted table, so it is fixed by
//! the 255 smallest floats `thr[r]` at which the rank r is reached (found by bisection over the
//! ordered float bit patterns, so bitsandbytes' tie rule at each midpoint is kept, whatever side it
//! falls on). A 65,536-entry table indexed by the top 16 bits of x (sign, exponent, 7 mantissa
//! bits) gives the rank at the bottom of x's cell; at most `max_steps` thresholds lie inside a
//! cell (checked when the tables are built), so two comparisons finish the job.

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/quant/codes.hpp>

#include <bit>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

namespace qmem::optim::detail {

//! Float <-> an unsigned integer whose order is the floats' order (negative floats reversed).
inline std::uint32_t ordered_bits(float x) noexcept {
  std::uint32_t const u = std::bit_cast<std::uint32_t>(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float from_ordered_bits(std::uint32_t o) noexcept {
  std::uint32_t const u = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  return std::bit_cast<float>(u);
}

//! The encoder tables of one 8-bit code type. Built once (about 20 ms), shared.
template <quant::code_type Code>
class lut_encoder {
public:
  static constexpr unsigned levels = 1u << Code::bits;
  static constexpr int max_steps = 2;

  //! The shared tables of `Code`; nullptr when Code's encoding is not a monotone function of x
  //! with distinct table values (then use Code::encode).
  static lut_encoder const* get() {
    static std::unique_ptr<lut_encoder> const instance = build();
    return instance.get();
  }

  //! Code::encode(x), exactly.
  QMEM_INLINE std::uint8_t encode(float x) const noexcept {
    std::uint32_t const u = std::bit_cast<std::uint32_t>(x);
    if ((u & 0x7fffffffu) > 0x3f800000u) [[unlikely]] // |x| > 1 or NaN
      return Code::encode(x, Code::book);
    unsigned r = cell_rank_[u >> 16];
    r += x >= thr_[r + 1] ? 1u : 0u;
    r += x >= thr_[r + 1] ? 1u : 0u;
    return code_of_[r];
  }

  //! encode(x) for x in [-1, 1] (what normalizing by the block absmax gives), without the range
  //! test, so a loop of them can be vectorized. Memory-safe for any x; outside [-1, 1] (NaN from
  //! an infinite state) the code is unspecified.
  QMEM_INLINE std::uint8_t encode_normalized(float x) const noexcept {
    unsigned r = cell_rank_[std::bit_cast<std::uint32_t>(x) >> 16];
    r += x >= thr_[r + 1] ? 1u : 0u;
    r += x >= thr_[r + 1] ? 1u : 0u;
    return code_of_[r];
  }

private:
  std::vector<std::uint8_t> cell_rank_; // 65536
  float thr_[levels + max_steps]{};     // thr_[r]: smallest x of rank >= r (r >= 1), then +inf
  std::uint8_t code_of_[levels]{};

  static unsigned rank_of(float x) noexcept {
    std::uint8_t const c = Code::encode(x, Code::book);
    for (unsigned r = 0; r < levels; ++r)
      if (Code::book.code_of[r] == c)
        return r;
    return 0;
  }

  static std::unique_ptr<lut_encoder> build() {
    auto e = std::make_unique<lut_encoder>();
    for (unsigned i = 1; i < levels; ++i)
      if (!(Code::book.sorted[i - 1] < Code::book.sorted[i]))
        return nullptr; // repeated values (e.g. +-0 in fp8): ranks would not name one code
    if (rank_of(-0.0f) != rank_of(0.0f))
      return nullptr;
    for (unsigned r = 0; r < levels; ++r)
      e->code_of_[r] = Code::book.code_of[r];
    std::uint32_t const lo = ordered_bits(-1.0f);
    std::uint32_t const hi = ordered_bits(1.0f);
    // thresholds by bisection: the smallest x in [-1, 1] with rank_of(x) >= r
    unsigned prev = rank_of(-1.0f);
    for (unsigned r = 0; r <= prev; ++r)
      e->thr_[r] = -1.0f;
    for (unsigned r = prev + 1; r < levels; ++r) {
      if (rank_of(1.0f) < r) {
        e->thr_[r] = std::numeric_limits<float>::infinity();
        continue;
      }
      std::uint32_t a = lo, b = hi; // rank(a) < r <= rank(b)
      while (b - a > 1) {
        std::uint32_t const m = a + (b - a) / 2;
        if (rank_of(from_ordered_bits(m)) >= r)
          b = m;
        else
          a = m;
      }
      e->thr_[r] = from_ordered_bits(b);
    }
    for (int s = 0; s < max_steps; ++s)
      e->thr_[levels + static_cast<unsigned>(s)] = std::numeric_limits<float>::infinity();
    // monotonicity check at every threshold: the rank just below is smaller
    for (unsigned r = prev + 1; r < levels; ++r) {
      float const t = e->thr_[r];
      if (t == std::numeric_limits<float>::infinity())
        continue;
      if (rank_of(t) < r || rank_of(from_ordered_bits(ordered_bits(t) - 1)) >= r)
        return nullptr;
    }
    e->cell_rank_.assign(65536, 0);
    for (std::uint32_t key = 0; key < 65536; ++key) {
      // the cell's floats, clipped to [-1, 1]
      float const a = std::bit_cast<float>(key << 16);
      float const b = std::bit_cast<float>((key << 16) | 0xffffu);
      if (!(a == a) || !(b == b))
        continue; // NaN cells: never looked up (x outside [-1, 1])
      float cmin = a < b ? a : b;
      float cmax = a < b ? b : a;
      if (cmax < -1.0f || cmin > 1.0f)
        continue;
      cmin = cmin < -1.0f ? -1.0f : cmin;
      cmax = cmax > 1.0f ? 1.0f : cmax;
      unsigned const r0 = rank_of(cmin);
      unsigned const r1 = rank_of(cmax);
      if (r1 - r0 > static_cast<unsigned>(max_steps))
        return nullptr;
      e->cell_rank_[key] = static_cast<std::uint8_t>(r0);
    }
    return e;
  }
};

} // namespace qmem::optim::detail
