#pragma once
//! \file
//! State policies: how each optimizer state is stored between steps.
//!
//! A *state format* stores one state tensor of n elements; a *state policy* picks a format for
//! each state of a rule from the state's sign (`state_sign`). The formats:
//!
//! | format | bytes / element | element load | element store |
//! |---|---|---|---|
//! | fp32_format | 4 | the float | the float |
//! | bf16_format | 2 | bf16 -> float | stochastic rounding with 16 random bits |
//! | blockwise_format<Code, B> | bits/8 + 4/B | Code::decode(code) * absmax[i / B] | see below |
//!
//! Blockwise requantization of one block (what bitsandbytes' kOptimizerStatic8bit*Blockwise
//! does after the update, in registers): `absmax = max |s|` over the block's UPDATED fp32
//! states (0 for a block of zeros); each `s` encodes as `Code::encode(s / absmax)` with an IEEE
//! division (bitsandbytes: `__fdividef`, an approximate division: the codes then differ at most by
//! one step, for values within two ulps of a midpoint between codes). With `SignFix` (the 8-bit
//! signed dynamic map, as bitsandbytes), a code whose value's sign bit differs from the state's
//! moves one step toward the state's sign, so a small negative momentum never becomes +0.
//! A block of zeros (absmax 0) encodes every element as `s / absmax := 0` (bitsandbytes divides
//! 0 by 0 there; its codes for such blocks are not meaningful).
//!
//! Kernels use the element-level pieces: `F::load(ref, i, book)`, `F::encode(s, absmax, book)`
//! (device code passes the codebook, a kernel argument; host code may omit it),
//! `F::store_code(ref, i, code)` (4-bit: the two elements of a byte are written together with
//! `store_code_pair`), `F::store(ref, i, s, random_bits)` for the unblocked formats.

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/optim/rule.hpp>
#include <qmem/quant/code_table.hpp>
#include <qmem/quant/codes.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace qmem::optim {

namespace detail {

//! A 32-bit random number for (seed, counter), a pure function (SplitMix64 finalizer): the host
//! and the GPU draw the same bits for the same element, independently of the thread split.
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint32_t random_bits(std::uint64_t seed,
                                                                 std::uint64_t counter) noexcept {
  std::uint64_t z = seed * 0x9e3779b97f4a7c15ull + counter + 0x6a09e667f3bcc909ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return static_cast<std::uint32_t>((z ^ (z >> 31)) >> 32);
}

//! The counter of element `i` of state `state` at step `step`: distinct for every draw.
QMEM_HOST_DEVICE QMEM_INLINE constexpr std::uint64_t random_counter(std::int32_t step, int state,
                                                                    std::uint64_t i) noexcept {
  return (static_cast<std::uint64_t>(static_cast<std::uint32_t>(step)) << 40) ^
         (static_cast<std::uint64_t>(state) << 36) ^ i;
}

//! float -> bf16 with stochastic rounding: adds 16 random bits below bf16's last mantissa bit and
//! truncates, so the result is the upper neighbour with probability (distance / ulp). NaN stays NaN
//! (0x7FC0 with its sign); infinities stay.
QMEM_HOST_DEVICE QMEM_INLINE constexpr bf16 bf16_stochastic(float v, std::uint32_t rnd) noexcept {
  std::uint32_t const u = qmem::detail::float_to_bits(v);
  if ((u & 0x7f800000u) == 0x7f800000u)
    return bf16(v); // inf and NaN: nearest rounding keeps them
  std::uint32_t const r = u + (rnd & 0xffffu);
  // a finite value may round up to infinity only if it is above bf16's largest finite value
  return bf16::from_bits(static_cast<std::uint16_t>(r >> 16));
}

} // namespace detail

//! fp32 state: 4 bytes per element, exact.
struct fp32_format {
  static constexpr bool blockwise = false;
  static constexpr std::size_t block_size = 1;
  using element = float;
  struct ref {
    float* data;
  };
  static constexpr std::size_t bytes(std::size_t n) noexcept { return n * 4; }
  static constexpr std::size_t scale_count(std::size_t) noexcept { return 0; }
  QMEM_HOST_DEVICE QMEM_INLINE static float load(ref r, std::size_t i) noexcept {
    return r.data[i];
  }
  QMEM_HOST_DEVICE QMEM_INLINE static void store(ref r, std::size_t i, float v,
                                                 std::uint32_t) noexcept {
    r.data[i] = v;
  }
};

//! bf16 state with stochastic rounding: 2 bytes per element; unbiased in expectation.
struct bf16_format {
  static constexpr bool blockwise = false;
  static constexpr std::size_t block_size = 1;
  using element = bf16;
  struct ref {
    bf16* data;
  };
  static constexpr std::size_t bytes(std::size_t n) noexcept { return n * 2; }
  static constexpr std::size_t scale_count(std::size_t) noexcept { return 0; }
  QMEM_HOST_DEVICE QMEM_INLINE static float load(ref r, std::size_t i) noexcept {
    return r.data[i].to_float();
  }
  QMEM_HOST_DEVICE QMEM_INLINE static void store(ref r, std::size_t i, float v,
                                                 std::uint32_t random) noexcept {
    r.data[i] = detail::bf16_stochastic(v, random);
  }
};

//! Blockwise-quantized state: `Code` (a quant::code_type, 4 or 8 bits) scaled by an fp32 absmax
//! per block of `Block` elements (see the file comment for requantization).
template <quant::code_type Code, std::size_t Block, bool SignFix = false>
struct blockwise_format {
  static_assert(Block >= 2 && Block % 2 == 0, "the block size of a blockwise state is even");
  static constexpr bool blockwise = true;
  static constexpr std::size_t block_size = Block;
  static constexpr int bits = Code::bits;
  static constexpr bool sign_fix = SignFix;
  using code = Code;
  using book_type = std::remove_cv_t<decltype(Code::book)>;
  //! codes: n bytes (8-bit) or ceil(n / 2) bytes, first element in the high nibble (4-bit);
  //! absmax: one float per block.
  struct ref {
    std::uint8_t* codes;
    float* absmax;
  };
  static constexpr std::size_t bytes(std::size_t n) noexcept { return bits == 8 ? n : (n + 1) / 2; }
  static constexpr std::size_t scale_count(std::size_t n) noexcept {
    return (n + Block - 1) / Block;
  }

  QMEM_HOST_DEVICE QMEM_INLINE static std::uint8_t code_at(ref r, std::size_t i) noexcept {
    if constexpr (bits == 8)
      return r.codes[i];
    else
      return static_cast<std::uint8_t>((i % 2 == 0) ? (r.codes[i / 2] >> 4)
                                                    : (r.codes[i / 2] & 0x0fu));
  }
  //! The stored value of element i: table value times its block's absmax. Device code passes
  //! the codebook (a kernel argument: `Code::book` is a host object); host code may omit it.
  QMEM_HOST_DEVICE QMEM_INLINE static float load(ref r, std::size_t i,
                                                 book_type const& book = Code::book) noexcept {
    return detail::fmath::mul(Code::decode(code_at(r, i), book), r.absmax[i / Block]);
  }
  //! The normalized value of the updated state `s` in a block whose new absmax is `absmax`.
  QMEM_HOST_DEVICE QMEM_INLINE static float normalize(float s, float absmax) noexcept {
    return absmax > 0.0f ? detail::fmath::div(s, absmax) : 0.0f;
  }
  //! The sign fix (SignFix only): code `c` of state `s` moved one step toward s's sign when the
  //! sign bits of its value and of s differ.
  QMEM_HOST_DEVICE QMEM_INLINE static std::uint8_t
  fix_sign(std::uint8_t c, float s, book_type const& book = Code::book) noexcept {
    if constexpr (SignFix) {
      bool const code_negative = (qmem::detail::float_to_bits(Code::decode(c, book)) >> 31) != 0;
      bool const s_negative = (qmem::detail::float_to_bits(s) >> 31) != 0;
      if (code_negative != s_negative)
        c = static_cast<std::uint8_t>(s > 0.0f ? c + 1 : c - 1);
    }
    return c;
  }
  //! The code of the updated state `s` in a block whose new absmax is `absmax`.
  QMEM_HOST_DEVICE QMEM_INLINE static std::uint8_t
  encode(float s, float absmax, book_type const& book = Code::book) noexcept {
    return fix_sign(Code::encode(normalize(s, absmax), book), s, book);
  }
  //! Writes an 8-bit code.
  QMEM_HOST_DEVICE QMEM_INLINE static void store_code(ref r, std::size_t i,
                                                      std::uint8_t c) noexcept {
    static_assert(bits == 8, "4-bit codes are written two at a time: store_code_pair");
    r.codes[i] = c;
  }
  //! Writes the 4-bit codes of elements i (even) and i + 1 into one byte.
  QMEM_HOST_DEVICE QMEM_INLINE static void store_code_pair(ref r, std::size_t i, std::uint8_t hi,
                                                           std::uint8_t lo) noexcept {
    static_assert(bits == 4, "8-bit codes are written one at a time: store_code");
    r.codes[i / 2] = static_cast<std::uint8_t>((hi << 4) | (lo & 0x0fu));
  }
};

//! A state format (one of the above, or a user's with the same members).
template <class F>
concept state_format = requires(typename F::ref r, std::size_t i) {
  { F::blockwise } -> std::convertible_to<bool>;          // blockwise-quantized or plain
  { F::block_size } -> std::convertible_to<std::size_t>;  // elements per scale (1: none)
  { F::bytes(i) } -> std::same_as<std::size_t>;           // storage bytes for i elements
  { F::scale_count(i) } -> std::same_as<std::size_t>;     // fp32 scales for i elements
  { F::load(r, i) } -> std::same_as<float>;               // the element's value
  requires std::is_trivially_copyable_v<typename F::ref>; // view passed to kernels
};

//! A state policy picks the format of each state from its sign.
template <class P>
concept state_policy = state_format<typename P::template format<state_sign::any>> &&
    state_format<typename P::template format<state_sign::non_negative>>;

//! The same format for every state.
template <state_format F>
struct uniform_state {
  template <state_sign>
  using format = F;
};

//! A signed format for states of any sign, an unsigned one for non-negative states.
template <state_format Signed, state_format Unsigned>
struct signed_unsigned_state {
  template <state_sign S>
  using format = std::conditional_t<S == state_sign::any, Signed, Unsigned>;
};

namespace detail {

//! 16-entry code tables of the 4-bit optimizer recipe (Li et al. 2023, as torchao implements
//! it): the signed dynamic map `create_dynamic_map(signed=True, max_exponent_bits=3,
//! total_bits=4)` and the linear map without zero `linspace(0, 1, 17)[1:]`, float32 like torch.
constexpr quant::code_table<16> make_dynamic4_signed() noexcept {
  float data[16] = {};
  int n = 0;
  constexpr float decade[3] = {1e-2f, 1e-1f, 1.0f};
  auto add = [&](auto const& b, int k, float scale) {
    for (int j = 0; j < k; ++j) {
      float const mean =
          (b[static_cast<std::size_t>(j)] + b[static_cast<std::size_t>(j) + 1]) / 2.0f;
      data[n++] = scale * mean;
      data[n++] = -(scale * mean);
    }
  };
  add(quant::detail::linspace<2>(0.1f, 1.0f), 1, decade[0]);
  add(quant::detail::linspace<3>(0.1f, 1.0f), 2, decade[1]);
  add(quant::detail::linspace<5>(0.1f, 1.0f), 4, decade[2]);
  data[n++] = 0.0f;
  data[n++] = 1.0f;
  for (int i = 1; i < 16; ++i) // insertion sort (constexpr)
    for (int j = i; j > 0 && data[j] < data[j - 1]; --j) {
      float const t = data[j];
      data[j] = data[j - 1];
      data[j - 1] = t;
    }
  quant::code_table<16> t{};
  for (int i = 0; i < 16; ++i)
    t.value[i] = data[i];
  return t;
}

constexpr quant::code_table<16> make_linear4_unsigned() noexcept {
  auto const v = quant::detail::linspace<17>(0.0f, 1.0f);
  quant::code_table<16> t{};
  for (std::size_t i = 0; i < 16; ++i)
    t.value[i] = v[i + 1];
  return t;
}

inline constexpr quant::code_table<16> dynamic4_signed_table = make_dynamic4_signed();
inline constexpr quant::code_table<16> linear4_unsigned_table = make_linear4_unsigned();

} // namespace detail

//! A 4-bit code over an ascending 16-entry table, encoded to the nearest value (a value exactly
//! between two goes to the lower, as torchao's argmin). Unlike quant::table_code the table need
//! not contain 0 (the linear map without zero does not).
template <auto const& Table>
struct nearest4_code {
  static constexpr int bits = 4;
  static constexpr quant::codebook<16> book = quant::make_codebook(Table);
  static constexpr std::uint8_t zero_code = 0; //!< code of the smallest magnitude
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr std::uint8_t
  encode(float xn, quant::codebook<16> const& b) noexcept {
    return b.code_of[quant::detail::nearest_sorted<16>(xn, b.sorted)];
  }
  QMEM_HOST_DEVICE QMEM_INLINE static constexpr float
  decode(std::uint8_t c, quant::codebook<16> const& b) noexcept {
    return b.value.value[c];
  }
};
using dynamic4_signed = nearest4_code<detail::dynamic4_signed_table>;
using linear4_unsigned = nearest4_code<detail::linear4_unsigned_table>;

//! fp32 states (bitsandbytes' 32-bit optimizers; torch's): 4 B per element and state.
using fp32_state = uniform_state<fp32_format>;
//! bf16 states with stochastic rounding: 2 B per element and state.
using bf16_state = uniform_state<bf16_format>;
//! bitsandbytes' 8-bit blockwise state: blocks of 256, the signed dynamic map (with the sign fix)
//! for states of any sign, the unsigned dynamic map for non-negative ones. AdamW: 2.03 B/param.
using int8_state = signed_unsigned_state<blockwise_format<quant::dynamic_signed, 256, true>,
                                         blockwise_format<quant::dynamic_unsigned, 256>>;
//! bitsandbytes' layout for its 1-state 8-bit optimizers (RMSprop, Adagrad): every state with
//! the signed dynamic map, non-negative ones included. Use it to exchange state with bitsandbytes;
//! int8_state spends the sign bit better.
using int8_signed_state = uniform_state<blockwise_format<quant::dynamic_signed, 256, true>>;
//! The 4-bit recipe (torchao's 4-bit AdamW): blocks of 128, the signed 4-bit dynamic map for
//! states of any sign, the linear map without zero for non-negative ones. AdamW: 1.06 B/param.
using int4_state = signed_unsigned_state<blockwise_format<dynamic4_signed, 128>,
                                         blockwise_format<linear4_unsigned, 128>>;
//! Any code type of the quant layer for every state, e.g. `quantized_state<quant::fp8_e4m3>`.
template <quant::code_type Code, std::size_t Block = 256>
using quantized_state = uniform_state<blockwise_format<Code, Block>>;

static_assert(state_policy<fp32_state> && state_policy<bf16_state> && state_policy<int8_state> &&
              state_policy<int4_state> && state_policy<quantized_state<quant::fp8_e4m3>>);

} // namespace qmem::optim
