#pragma once
//! \file
//! The device side of the optimizer state formats (optim/state.hpp): what the fused CUDA step
//! needs beyond the formats' own element functions.
//!
//! The formats' `load`/`encode`/`fix_sign` read `Code::book`, a static constexpr object that
//! device code cannot use (nvcc allows only scalar constexpr variables there). The kernels
//! therefore copy each code type's book, with its search table, into shared memory once per block
//! (`codec`) and apply the very same arithmetic: decode `mul(decode(code), absmax)`, encode
//! `fix_sign(encode(F::normalize(s, absmax)), s)`, which is F::normalize itself (IEEE division).
//! For bitsandbytes' 8-bit maps the encode is the bucket search of bucket_search.hpp, proven equal
//! to bnb_search256 for every float.

#include <qmem/core/config.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/optim/cuda/bucket_search.hpp>
#include <qmem/optim/rule.hpp>
#include <qmem/optim/state.hpp>
#include <qmem/quant/codes.hpp>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace qmem::optim::cuda {

namespace detail {
struct no_search {};
} // namespace detail

//! Decode and encode of one code type in one trivially copyable object that kernels copy into
//! shared memory: the codebook and, for bnb-searched maps, the bucket search table.
template <class Code>
struct codec {
  static constexpr std::size_t entries = std::size_t{1} << Code::bits;
  static constexpr bool bucketed = quant::uses_bnb_search_v<Code>;
  using code_type = Code;

  quant::codebook<entries> book;
  std::conditional_t<bucketed, cuda_search::bucket_table<>, detail::no_search> search;

  //! The codec of `Code` (compile time).
  static constexpr codec make() noexcept {
    codec c{};
    c.book = Code::book;
    if constexpr (bucketed)
      c.search = cuda_search::bucket_table_of<Code>;
    return c;
  }
  QMEM_HOST_DEVICE QMEM_INLINE float decode(std::uint8_t c) const noexcept {
    return Code::decode(c, book);
  }
  //! The code of the normalized value `xn`: what Code::encode returns, bit for bit.
  QMEM_HOST_DEVICE QMEM_INLINE std::uint8_t encode(float xn) const noexcept {
    if constexpr (bucketed)
      return search.encode(xn);
    else
      return Code::encode(xn, book);
  }
};

//! The codec of a state format: a codec for blockwise formats, an empty placeholder otherwise.
template <class F, bool Blockwise = F::blockwise>
struct format_codec {
  std::uint32_t unused;
  static constexpr format_codec make() noexcept { return {0}; }
};
template <class F>
struct format_codec<F, true> {
  codec<typename F::code> c;
  static constexpr format_codec make() noexcept { return {codec<typename F::code>::make()}; }

  //! Element-level encode of format F with this codec (F::encode with the shared-memory book).
  //! The IEEE division in F::normalize stays: multiplying by the block's reciprocal and dividing
  //! only within a proven margin of a threshold was measured slower on an H200 (AdamW 8-bit
  //! 3.31 ms against 3.06 ms at 2^28): the extra dependent shared-memory reads cost more than
  //! div.rn.f32's fast path.
  QMEM_HOST_DEVICE QMEM_INLINE std::uint8_t encode(float s, float absmax) const noexcept {
    std::uint8_t code = c.encode(F::normalize(s, absmax));
    if constexpr (F::sign_fix) {
      bool const code_negative = (qmem::detail::float_to_bits(c.decode(code)) >> 31) != 0;
      bool const s_negative = (qmem::detail::float_to_bits(s) >> 31) != 0;
      if (code_negative != s_negative)
        code = static_cast<std::uint8_t>(s > 0.0f ? code + 1 : code - 1);
    }
    return code;
  }
  //! Element-level decode of format F: table value times the block absmax.
  QMEM_HOST_DEVICE QMEM_INLINE float decode(std::uint8_t code, float absmax) const noexcept {
    return optim::detail::fmath::mul(c.decode(code), absmax);
  }
};

//! What the kernels derive from a rule and a state policy: each state's format, the warp-task
//! size (the common block of the blockwise formats, 256 when there is none), and the codecs of
//! the two signs, copied into shared memory by each block.
template <update_rule Rule, state_policy Policy>
struct kernel_traits {
  static constexpr int state_count = Rule::state_count;
  template <int J>
  using format = typename Policy::template format<Rule::state_signs[static_cast<std::size_t>(J)]>;
  using signed_format = typename Policy::template format<state_sign::any>;
  using unsigned_format = typename Policy::template format<state_sign::non_negative>;

  static constexpr std::size_t block = [] {
    std::size_t b = 0;
    bool same = true;
    [&]<int... J>(std::integer_sequence<int, J...>) {
      (
          [&] {
            if constexpr (format<J>::blockwise) {
              same = same && (b == 0 || b == format<J>::block_size);
              b = format<J>::block_size;
            }
          }(),
          ...);
    }(std::make_integer_sequence<int, state_count>{});
    return !same ? 0 : (b == 0 ? 256 : b);
  }();
  static_assert(block != 0, "the fused CUDA step needs every blockwise state of a rule to use the "
                            "same block size: choose a policy whose formats share one");
  static_assert(block == 16 || block == 32 || block == 64 || block == 128 || block == 256 ||
                    block == 512 || block == 1024,
                "the fused CUDA step gives each block a power-of-two group of lanes of a warp: "
                "the block size must be a power of two from 16 to 1024");
  //! Elements per lane: block/32 (at least 2, so that 4-bit codes fill whole bytes). Measured on
  //! an H200: 8 elements per lane for the 4-bit recipe's blocks of 128 (two blocks per warp)
  //! were slower than 4 (AdamW 4-bit 5.18 ms against 4.84 ms at 2^28).
  static constexpr int per_lane = block / 32 >= 2 ? static_cast<int>(block / 32) : 2;
  //! Lanes that share one absmax block (the block max is reduced over them).
  static constexpr int lanes_per_block = static_cast<int>(block) / per_lane;
  //! Elements per warp task.
  static constexpr std::size_t task_elements = std::size_t{32} * per_lane;

  //! Shared-memory tables: codecs of the signed and the non-negative states' formats.
  struct tables {
    format_codec<signed_format> signed_codec;
    format_codec<unsigned_format> unsigned_codec;
    static constexpr tables make() noexcept {
      return {format_codec<signed_format>::make(), format_codec<unsigned_format>::make()};
    }
  };
};

} // namespace qmem::optim::cuda
