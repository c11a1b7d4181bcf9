#pragma once
//! \file
//! Code types: element-level encode (a normalized value in [-1, 1] to a 4- or 8-bit code) and
//! decode (a code to its normalized value). These functions are QMEM_HOST_DEVICE and shared
//! unchanged by the host loops and the CUDA kernels, which is what makes both backends compute the
//! same function.
//!
//! A code type `C` provides (see the `code_type` concept):
//! - `C::bits` (4 or 8) and `C::zero_code` (the code of 0.0, used to pad an odd 4-bit tail);
//! - `C::book`, a trivially copyable `codebook` (the table and what encoding needs), which kernels
//!   receive by value as a launch argument;
//! - `C::encode(xn, book)` and `C::decode(code, book)`.
//!
//! Rounding follows bitsandbytes exactly (see DESIGN.md §3): the 8-bit maps use bnb's binary
//! search with its tie rule, NF4/FP4 compare against bnb's float thresholds with strict `>`, so NaN
//! (all comparisons false) encodes as bnb's kernels encode it.

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/quant/code_table.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace qmem::quant {

//! What encoding and decoding need, passed to kernels by value: the value of each code, and the
//! same values sorted ascending with the code of each (for nearest-value search and stochastic
//! rounding over any table).
template <std::size_t N>
struct codebook {
  static constexpr std::size_t size = N;
  code_table<N> value;     //!< value[code]
  float sorted[N];         //!< values ascending
  std::uint8_t code_of[N]; //!< code_of[i] is the code whose value is sorted[i]

  QMEM_HOST_DEVICE constexpr float operator[](std::size_t code) const noexcept {
    return value.value[code];
  }
};

namespace detail {
constexpr bool is_nan_bits(float v) noexcept {
  return (std::bit_cast<std::uint32_t>(v) & 0x7fffffffu) > 0x7f800000u;
}
} // namespace detail

//! Ascending order with NaNs last, without comparing NaNs (not allowed in constant evaluation).
constexpr bool sorts_before(float a, float b) noexcept {
  if (detail::is_nan_bits(a))
    return false;
  if (detail::is_nan_bits(b))
    return true;
  return a < b;
}

//! Builds the codebook of a table (the sort is stable: equal values keep code order).
template <std::size_t N>
constexpr codebook<N> make_codebook(code_table<N> const& t) noexcept {
  codebook<N> b{};
  b.value = t;
  std::array<std::uint8_t, N> idx{};
  for (std::size_t i = 0; i < N; ++i)
    idx[i] = static_cast<std::uint8_t>(i);
  // stable insertion sort by value (-0.0 sorts with +0.0); std::stable_sort is not constexpr
  for (std::size_t i = 1; i < N; ++i) {
    std::uint8_t const key = idx[i];
    std::size_t j = i;
    for (; j > 0 && sorts_before(t.value[key], t.value[idx[j - 1]]); --j)
      idx[j] = idx[j - 1];
    idx[j] = key;
  }
  for (std::size_t i = 0; i < N; ++i) {
    b.sorted[i] = t.value[idx[i]];
    b.code_of[i] = idx[i];
  }
  return b;
}

namespace detail {

//! bitsandbytes' 8-bit nearest-code search over an ascending 256-entry table (its `dQuantize`
//! without stochastic rounding): pivot 127, seven halving steps, then a comparison against the
//! float midpoint toward the side the value lies on; a value equal to a midpoint keeps the pivot.
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint8_t bnb_search256(float x,
                                                                  float const* code) noexcept {
  int pivot = 127;
  int upper_pivot = 255;
  int lower_pivot = 0;
  float lower = code[0] < 0.0f ? -1.0f : 0.0f;
  float upper = 1.0f;
  float val = code[pivot];
  QMEM_UNROLL
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255)
    upper = code[255];
  if (lower_pivot == 0)
    lower = code[0];
  if (x > val) {
    float const mid = (upper + val) * 0.5f;
    return static_cast<std::uint8_t>(x > mid ? upper_pivot : pivot);
  }
  float const mid = (lower + val) * 0.5f;
  return static_cast<std::uint8_t>(x < mid ? lower_pivot : pivot);
}

//! Number of thresholds t[i] with x > t[i] (thresholds ascending): the rank of x, branch-free.
template <std::size_t N>
QMEM_HOST_DEVICE QMEM_INLINE constexpr unsigned rank_above(float x, float const (&t)[N]) noexcept {
  unsigned r = 0;
  QMEM_UNROLL
  for (std::size_t i = 0; i < N; ++i)
    r += x > t[i] ? 1u : 0u;
  return r;
}

//! Nearest value in an ascending table by binary search; a value exactly between two entries goes
//! to the lower one; NaN goes to index 0. Returns the sorted index.
template <std::size_t N>
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::size_t nearest_sorted(float x,
                                                                  float const* sorted) noexcept {
  // first index with sorted[i] >= x (NaN: none compare, lands on 0 below)
  std::size_t lo = 0;
  std::size_t len = N;
  while (len > 0) {
    std::size_t const half = len / 2;
    if (sorted[lo + half] < x) {
      lo += half + 1;
      len -= half + 1;
    } else {
      len = half;
    }
  }
  if (lo == 0)
    return 0;
  if (lo == N)
    return N - 1;
  float const below = x - sorted[lo - 1];
  float const above = sorted[lo] - x;
  return above < below ? lo : lo - 1;
}

} // namespace detail

//! Which of bitsandbytes' 256-entry maps a searched_map holds.
enum class map_kind : std::uint8_t {
  dynamic, //!< `create_dynamic_map`: decades of linear fractions (the 8-bit optimizers' map)
  linear,  //!< `create_linear_map`: evenly spaced
};

//! A 256-entry ascending map encoded with bitsandbytes' 8-bit search (`dQuantize`): the dynamic
//! and linear maps, signed ([-1, 1]) or unsigned ([0, 1]).
template <bool Signed, map_kind Kind>
struct searched_map {
  static constexpr int bits = 8;
  static constexpr bool is_signed = Signed;
  static constexpr map_kind kind = Kind;
  static constexpr codebook<256> book =
      make_codebook(Kind == map_kind::dynamic ? make_dynamic_map(Signed) : make_linear_map(Signed));
  static constexpr std::uint8_t zero_code = Signed ? 127 : 0;
  static_assert(book.value.value[zero_code] == 0.0f);

  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint8_t
  encode(float xn, codebook<256> const& b) noexcept {
    return detail::bnb_search256(xn, b.value.value);
  }
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr float decode(std::uint8_t c,
                                                             codebook<256> const& b) noexcept {
    return b.value.value[c];
  }
};

//! bitsandbytes' 8-bit dynamic map, signed or unsigned (`create_dynamic_map`).
template <bool Signed>
using dynamic_map = searched_map<Signed, map_kind::dynamic>;
using dynamic_signed = dynamic_map<true>;
using dynamic_unsigned = dynamic_map<false>;

//! bitsandbytes' linear 8-bit map (`create_linear_map`), encoded with the same search.
template <bool Signed>
using linear_map = searched_map<Signed, map_kind::linear>;
using linear_signed = linear_map<true>;
using linear_unsigned = linear_map<false>;

//! True for the code types whose encode is bitsandbytes' 8-bit search over their table (so a
//! faster proven-equal search may replace it).
template <class C>
inline constexpr bool uses_bnb_search_v = false;
template <bool Signed, map_kind Kind>
inline constexpr bool uses_bnb_search_v<searched_map<Signed, Kind>> = true;

//! NF4: 16 normal-float levels; code = number of bnb's thresholds (the float midpoints between
//! neighbouring levels) strictly below x, which is what bnb's decision tree computes.
struct nf4 {
  static constexpr int bits = 4;
  static constexpr bool is_signed = true;
  static constexpr codebook<16> book = make_codebook(nf4_table);
  static constexpr std::uint8_t zero_code = 7;

  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint8_t encode(float xn,
                                                                    codebook<16> const&) noexcept {
    constexpr float thresholds[15] = {
        -0.8480964004993439f,  -0.6106329262256622f,  -0.4599952697753906f,   -0.33967943489551544f,
        -0.23460740596055984f, -0.13791173323988914f, -0.045525018125772476f, 0.03979014977812767f,
        0.1202552504837513f,   0.2035212516784668f,   0.2920137718319893f,    0.3893125355243683f,
        0.5016634166240692f,   0.6427869200706482f,   0.8614784181118011f};
    return static_cast<std::uint8_t>(detail::rank_above(xn, thresholds));
  }
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr float decode(std::uint8_t c,
                                                             codebook<16> const& b) noexcept {
    return b.value.value[c];
  }
};

//! bitsandbytes' FP4 (1 sign bit, 3 magnitude bits indexing {0, 1/192, 2/3, 1, 1/3, 1/2, 1/6,
//! 1/4}). The sign bit is set for every x < 0, so a tiny negative value encodes as 8 (-0.0).
struct fp4 {
  static constexpr int bits = 4;
  static constexpr bool is_signed = true;
  static constexpr codebook<16> book = make_codebook(fp4_table);
  static constexpr std::uint8_t zero_code = 0;

  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint8_t encode(float xn,
                                                                    codebook<16> const&) noexcept {
    // bnb's thresholds between consecutive magnitudes (0.583333f is bnb's literal, 6 digits).
    constexpr float thresholds[7] = {0.00260417f, 0.0859375f, 0.20833333f, 0.29166667f,
                                     0.4166667f,  0.583333f,  0.8333333f};
    // Magnitude rank r -> 3-bit code {0, 1, 6, 7, 4, 5, 2, 3}[r], written as a sum of the steps
    // between consecutive codes (+1, +5, +1, -3, +1, -3, +1) over the thresholds passed: no table
    // lookup, so the host loop vectorizes.
    constexpr int step[7] = {1, 5, 1, -3, 1, -3, 1};
    int const sign = xn < 0.0f ? 8 : 0;
    float const mag = xn < 0.0f ? -xn : xn; // fabsf; NaN stays NaN (rank 0)
    int code = 0;
    QMEM_UNROLL
    for (int i = 0; i < 7; ++i)
      code += mag > thresholds[i] ? step[i] : 0;
    return static_cast<std::uint8_t>(sign | code);
  }
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr float decode(std::uint8_t c,
                                                             codebook<16> const& b) noexcept {
    return b.value.value[c];
  }
};

namespace detail {

//! IEEE-style 8-bit float with E exponent and M mantissa bits. e4m3 is the "fn" variant (no
//! infinities, NaN only at S.1111.111, max 448); e5m2 has infinities (max 57344).
template <int E, int M>
struct fp8_layout {
  static constexpr int bias = (1 << (E - 1)) - 1;
  static constexpr bool has_inf = (E == 5);

  static constexpr float to_float(std::uint8_t c) noexcept {
    int const sign = c >> 7;
    int const exp = (c >> M) & ((1 << E) - 1);
    int const man = c & ((1 << M) - 1);
    float v = 0.0f;
    if (has_inf && exp == (1 << E) - 1)
      v = man == 0 ? std::numeric_limits<float>::infinity()
                   : std::numeric_limits<float>::quiet_NaN();
    else if (!has_inf && exp == (1 << E) - 1 && man == (1 << M) - 1)
      v = std::numeric_limits<float>::quiet_NaN();
    else if (exp == 0)
      v = static_cast<float>(man) * pow2(1 - bias - M);
    else
      v = (1.0f + static_cast<float>(man) / static_cast<float>(1 << M)) * pow2(exp - bias);
    return sign ? -v : v;
  }
  static constexpr float pow2(int e) noexcept {
    float r = 1.0f;
    for (; e > 0; --e)
      r *= 2.0f;
    for (; e < 0; ++e)
      r *= 0.5f;
    return r;
  }
  static constexpr float max_finite() noexcept {
    return to_float(static_cast<std::uint8_t>(max_code));
  }
  static constexpr std::uint32_t nan_code = (((1u << E) - 1u) << M) | ((1u << M) - 1u);
  static constexpr std::uint32_t max_code = has_inf ? (((1u << E) - 2u) << M) | ((1u << M) - 1u)
                                                    : (((1u << E) - 1u) << M) | ((1u << M) - 2u);

  //! float -> fp8 bits, round to nearest even, saturating to the largest finite value; NaN -> NaN.
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint8_t from_float(float f) noexcept {
    std::uint32_t u = qmem::detail::float_to_bits(f);
    auto const sign = static_cast<std::uint8_t>((u >> 24) & 0x80u);
    u &= 0x7fffffffu;
    if (u > 0x7f800000u)
      return static_cast<std::uint8_t>(sign | nan_code);
    // smallest normal exponent of the fp8 format, as a float exponent field
    constexpr std::uint32_t min_normal_field = static_cast<std::uint32_t>(127 + 1 - bias);
    constexpr int drop = 23 - M; // mantissa bits dropped
    std::uint32_t code = 0;
    if ((u >> 23) >= min_normal_field) {
      std::uint32_t const rounded = u + ((1u << (drop - 1)) - 1u) + ((u >> drop) & 1u);
      code = (rounded >> drop) - ((static_cast<std::uint32_t>(127 - bias)) << M);
    } else {
      // subnormal (or zero): value / 2^(1 - bias - M), rounded to nearest even
      std::uint32_t const e = u >> 23;
      if (e == 0) {
        code = 0; // float subnormals are far below fp8's smallest subnormal
      } else {
        std::uint32_t const m = (u & 0x7fffffu) | 0x800000u;
        // |x| = m * 2^(e - 150); units of 2^(1 - bias - M): shift = (1 - bias - M) - (e - 150)
        int const shift = (1 - bias - M) - (static_cast<int>(e) - 150);
        if (shift >= 25) {
          code = 0;
        } else {
          std::uint32_t r = m >> shift;
          std::uint32_t const rem = m & ((1u << shift) - 1u);
          std::uint32_t const half = 1u << (shift - 1);
          if (rem > half || (rem == half && (r & 1u)))
            ++r;
          code = r;
        }
      }
    }
    if (code > max_code)
      code = max_code; // saturate (also catches infinities)
    return static_cast<std::uint8_t>(sign | code);
  }
};

template <class Layout>
constexpr code_table<256> fp8_normalized_table() noexcept {
  code_table<256> t{};
  float const mx = Layout::max_finite();
  for (std::size_t c = 0; c < 256; ++c) {
    float const v = Layout::to_float(static_cast<std::uint8_t>(c));
    // NaN codes keep their NaN as is: clang rejects arithmetic that yields a NaN in a constant
    // expression (NaN / mx), g++ accepts it; the value is the same NaN either way.
    t.value[c] = v != v ? v : v / mx;
  }
  return t;
}

} // namespace detail

//! FP8 codes, blockwise-scaled: a normalized value xn in [-1, 1] is stored as the fp8 number
//! nearest to xn * max_finite (round to nearest even, saturating); it decodes to
//! fp8_value / max_finite. Layout: detail::fp8_layout<4, 3> (e4m3) or <5, 2> (e5m2).
template <int E, int M>
struct fp8 {
  using layout = detail::fp8_layout<E, M>;
  static constexpr int bits = 8;
  static constexpr bool is_signed = true;
  static constexpr float max_finite = layout::max_finite();
  static constexpr codebook<256> book = make_codebook(detail::fp8_normalized_table<layout>());
  static constexpr std::uint8_t zero_code = 0;

  //! A NaN normalized value encodes as 0. Blockwise, xn is NaN only in a block of zeros
  //! (0 * (1 / 0)) or in a block whose absmax is NaN; the first must dequantize to zeros (code
  //! 0 times absmax 0), the second dequantizes to NaN through its absmax whatever the code. The
  //! NaN's sign would otherwise pick the code, and 0 * inf is -NaN on x86 but +NaN on NVIDIA GPUs.
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint8_t encode(float xn,
                                                                    codebook<256> const&) noexcept {
    return xn != xn ? zero_code : layout::from_float(xn * max_finite);
  }
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr float decode(std::uint8_t c,
                                                             codebook<256> const& b) noexcept {
    return b.value.value[c];
  }
};
using fp8_e4m3 = fp8<4, 3>;
using fp8_e5m2 = fp8<5, 2>;

//! A user-defined code table of 16 or 256 values becomes a code type by declaring it:
//!   inline constexpr qmem::quant::code_table<16> my_values = {{...}};
//!   using my4 = qmem::quant::table_code<my_values>;
//! Encoding picks the nearest value (a value exactly between two goes to the lower one; NaN to
//! the smallest). The values lie in [-1, 1]; a 16-value table must contain 0.0 (its code pads odd
//! 4-bit tails). A 256-value table without 0.0 is accepted and its zero_code is 255, which is then
//! not the code of 0.0 (8-bit codes pad nothing).
template <auto const& Table>
struct table_code {
  static constexpr std::size_t entries = std::remove_cvref_t<decltype(Table)>::size;
  static_assert(entries == 16 || entries == 256, "a user code table has 16 or 256 entries");
  static constexpr int bits = entries == 16 ? 4 : 8;
  static constexpr codebook<entries> book = make_codebook(Table);
  static constexpr bool is_signed = book.sorted[0] < 0.0f;
  static constexpr std::uint8_t zero_code = [] {
    for (std::size_t i = 0; i < entries; ++i)
      if (Table.value[i] == 0.0f)
        return static_cast<std::uint8_t>(i);
    return std::uint8_t{255};
  }();
  static_assert(zero_code != 255 || entries == 256, "a 4-bit user table must contain 0.0");
  static_assert(book.sorted[0] >= -1.0f && book.sorted[entries - 1] <= 1.0f,
                "a user code table holds normalized values in [-1, 1]");

  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint8_t
  encode(float xn, codebook<entries> const& b) noexcept {
    return b.code_of[detail::nearest_sorted<entries>(xn, b.sorted)];
  }
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr float decode(std::uint8_t c,
                                                             codebook<entries> const& b) noexcept {
    return b.value.value[c];
  }
};

//! A code type: element-level encode/decode shared by host loops and CUDA kernels.
template <class C>
concept code_type = requires(float xn, std::uint8_t c) {
  requires C::bits == 4 || C::bits == 8;                           // bits per code
  requires std::same_as<std::remove_cv_t<decltype(C::book.value)>, // table, by code
                        code_table<std::size_t{1} << C::bits>>;
  { C::zero_code } -> std::convertible_to<std::uint8_t>;    // the code of 0.0
  { C::encode(xn, C::book) } -> std::same_as<std::uint8_t>; // value -> code
  { C::decode(c, C::book) } -> std::same_as<float>;         // code -> value
};

static_assert(code_type<dynamic_signed> && code_type<dynamic_unsigned> && code_type<nf4> &&
              code_type<fp4> && code_type<fp8_e4m3> && code_type<fp8_e5m2> &&
              code_type<linear_signed>);

} // namespace qmem::quant
