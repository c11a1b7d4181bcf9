#pragma once
//! \file
//! Quantization formats as types, and their runtime descriptor.
//!
//! A format is a code type (how one value becomes 4 or 8 bits), a block size, and a scale policy
//! (how each block's absmax is stored):
//!   using qlora = qmem::quant::blockwise<qmem::quant::nf4, 64, qmem::quant::double_quant<256>>;
//!   static_assert(qmem::quant::quant_format<qlora>);
//! Every format reports its exact storage for n elements at compile time (`size_bytes(n)`,
//! `bits_per_parameter(n)`). An unsupported static block size is a compile error with a readable
//! message; run-time sizes (format_desc) throw qmem::bad_argument.
//!
//! `format_desc` is the same information as plain data (code id, block size, nested or not, nested
//! block), for files, checkpoints and the command-line tool; `visit_code` maps its code id back to
//! the code type so the compile-time algorithms run on it.

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/detail/blockwise_ops.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace qmem::quant {

//! Scale policy: one fp32 absmax per block (bitsandbytes without double quantization).
struct absmax_scales {
  static constexpr bool nested = false;
  static constexpr std::size_t nested_block = 0;
};

//! Scale policy: double-quantized scales (mean offset, signed dynamic 8-bit codes in blocks of
//! NestedBlock, one fp32 scale per nested block). bitsandbytes' 4-bit formats use 256.
template <std::size_t NestedBlock = 256>
struct double_quant {
  static_assert(valid_block_size<dynamic_signed>(NestedBlock),
                "double_quant<NestedBlock>: the nested block size must be a power of two in "
                "[64, 4096] (bitsandbytes uses 256)");
  static constexpr bool nested = true;
  static constexpr std::size_t nested_block = NestedBlock;
};

//! A scale policy: says whether scales are nested and in which block size.
template <class S>
concept scale_policy = requires {
  { S::nested } -> std::convertible_to<bool>;              // double-quantized or plain fp32
  { S::nested_block } -> std::convertible_to<std::size_t>; // nested block (0 when not nested)
};

//! Bytes of scales for `blocks` block scales under policy (nested, nested_block): 4 per block, or
//! 1 per block + 4 per nested block + 4 for the offset.
constexpr std::size_t scale_bytes(std::size_t blocks, bool nested,
                                  std::size_t nested_block) noexcept {
  return nested ? blocks + 4 * block_count(blocks, nested_block) + 4 : 4 * blocks;
}

//! Blockwise format: code type `Code`, `BlockSize` elements per block, scales stored as `Scales`
//! says. The primary template checks the combination; it has no other specializations.
template <code_type Code, std::size_t BlockSize, scale_policy Scales = absmax_scales>
struct blockwise {
  static_assert(valid_block_size<Code>(BlockSize),
                "blockwise<Code, BlockSize>: BlockSize must be a power of two in [64, 4096] for "
                "8-bit codes and in [32, 4096] for 4-bit codes");
  using code = Code;
  using scales = Scales;
  static constexpr int bits = Code::bits;
  static constexpr std::size_t block_size = BlockSize;

  //! Bytes of codes for n elements.
  static constexpr std::size_t code_bytes(std::size_t n) noexcept {
    return quant::code_bytes<Code>(n);
  }
  //! Number of block scales for n elements.
  static constexpr std::size_t scale_count(std::size_t n) noexcept {
    return block_count(n, BlockSize);
  }
  //! Exact storage of n elements: codes, scales, nested scales and offset.
  static constexpr std::size_t size_bytes(std::size_t n) noexcept {
    return code_bytes(n) + scale_bytes(scale_count(n), Scales::nested, Scales::nested_block);
  }
  //! Exact bits per parameter for n elements (n > 0).
  static constexpr double bits_per_parameter(std::size_t n) noexcept {
    return 8.0 * static_cast<double>(size_bytes(n)) / static_cast<double>(n);
  }
};

//! A quantization format: a code type, a static block size valid for it, and a scale policy.
template <class F>
concept quant_format = requires {
  typename F::code;                                              // the code type
  typename F::scales;                                            // the scale policy
  { F::block_size } -> std::convertible_to<std::size_t>;         // elements per block
  { F::size_bytes(std::size_t{}) } -> std::same_as<std::size_t>; // storage of n elements
}
&&code_type<typename F::code>&& scale_policy<typename F::scales>&&
    valid_block_size<typename F::code>(F::block_size);

//! The formats bitsandbytes uses by default.
using nf4_qlora = blockwise<nf4, 64, double_quant<256>>; //!< QLoRA: NF4, block 64, nested 256
using fp4_bnb = blockwise<fp4, 64>;                      //!< FP4, block 64 (transformers' default)
using int8_dynamic = blockwise<dynamic_signed, 4096>;    //!< bnb's quantize_blockwise default

static_assert(quant_format<nf4_qlora> && quant_format<fp4_bnb> && quant_format<int8_dynamic>);

// ------------------------------------------------------------------------------------------------
// Runtime descriptor

//! The code types a runtime descriptor can name. `custom4`/`custom8` are user tables stored with
//! the tensor (quantized_tensor keeps the 16 or 256 values).
enum class code_id : std::uint8_t {
  dynamic_signed,
  dynamic_unsigned,
  linear_signed,
  linear_unsigned,
  nf4,
  fp4,
  fp8_e4m3,
  fp8_e5m2,
  custom4,
  custom8,
};
inline constexpr int code_id_count = 10;

//! The lower-case name of a code id ("nf4", "dynamic_signed", ...).
constexpr std::string_view to_string(code_id c) noexcept {
  constexpr std::string_view names[code_id_count] = {
      "dynamic_signed", "dynamic_unsigned", "linear_signed", "linear_unsigned", "nf4", "fp4",
      "fp8_e4m3",       "fp8_e5m2",         "custom4",       "custom8"};
  auto const i = static_cast<std::size_t>(c);
  return i < static_cast<std::size_t>(code_id_count) ? names[i] : std::string_view("?");
}

//! Parses a code id name (as to_string writes it; "int8" is accepted for dynamic_signed).
//! Returns false for an unknown name.
constexpr bool parse_code_id(std::string_view name, code_id& out) noexcept {
  if (name == "int8") {
    out = code_id::dynamic_signed;
    return true;
  }
  for (int i = 0; i < code_id_count; ++i)
    if (to_string(static_cast<code_id>(i)) == name) {
      out = static_cast<code_id>(i);
      return true;
    }
  return false;
}

//! Bits per code of a code id (4 or 8).
constexpr int code_bits(code_id c) noexcept {
  return c == code_id::nf4 || c == code_id::fp4 || c == code_id::custom4 ? 4 : 8;
}

//! True for the user-table ids (no compile-time code type).
constexpr bool is_custom(code_id c) noexcept {
  return c == code_id::custom4 || c == code_id::custom8;
}

//! A blockwise format as data. Valid when block_size suits the code's bits (see
//! valid_block_size) and, when nested, nested_block is a power of two in [64, 4096].
struct format_desc {
  code_id code = code_id::nf4;
  std::uint32_t block_size = 64;
  bool nested = false;
  std::uint32_t nested_block = 256; //!< used only when nested

  friend constexpr bool operator==(format_desc const&, format_desc const&) = default;

  //! Bytes of codes for n elements.
  constexpr std::size_t code_bytes(std::size_t n) const noexcept {
    return code_bits(code) == 8 ? n : n / 2 + n % 2;
  }
  //! Number of block scales for n elements.
  constexpr std::size_t scale_count(std::size_t n) const noexcept {
    return block_count(n, block_size);
  }
  //! Exact storage of n elements: codes, scales, nested scales and offset (a custom table's
  //! values are not included: quantized_tensor::size_bytes adds them).
  constexpr std::size_t size_bytes(std::size_t n) const noexcept {
    return code_bytes(n) + scale_bytes(scale_count(n), nested, nested_block);
  }
};

//! The descriptor of a format type.
template <quant_format F>
constexpr format_desc describe() noexcept;

namespace detail {
template <class C>
constexpr code_id code_id_of() noexcept {
  if constexpr (std::same_as<C, dynamic_signed>)
    return code_id::dynamic_signed;
  else if constexpr (std::same_as<C, dynamic_unsigned>)
    return code_id::dynamic_unsigned;
  else if constexpr (std::same_as<C, linear_signed>)
    return code_id::linear_signed;
  else if constexpr (std::same_as<C, linear_unsigned>)
    return code_id::linear_unsigned;
  else if constexpr (std::same_as<C, nf4>)
    return code_id::nf4;
  else if constexpr (std::same_as<C, fp4>)
    return code_id::fp4;
  else if constexpr (std::same_as<C, fp8_e4m3>)
    return code_id::fp8_e4m3;
  else if constexpr (std::same_as<C, fp8_e5m2>)
    return code_id::fp8_e5m2;
  else
    return C::bits == 4 ? code_id::custom4 : code_id::custom8;
}
} // namespace detail

//! The code id of a code type (user table_code types map to custom4/custom8).
template <code_type C>
inline constexpr code_id code_id_of_v = detail::code_id_of<C>();

template <quant_format F>
constexpr format_desc describe() noexcept {
  return {code_id_of_v<typename F::code>, static_cast<std::uint32_t>(F::block_size),
          F::scales::nested,
          F::scales::nested ? static_cast<std::uint32_t>(F::scales::nested_block) : 256u};
}

static_assert(describe<nf4_qlora>() == format_desc{code_id::nf4, 64, true, 256});

//! Throws qmem::bad_argument (naming `function`) unless `d` is a valid descriptor.
inline void validate(format_desc const& d, char const* function = "validate") {
  if (static_cast<int>(d.code) >= code_id_count)
    qmem::detail::raise(function, ": format code id ", static_cast<int>(d.code),
                        " is not a known code (0..", code_id_count - 1, ")");
  std::size_t const lowest = code_bits(d.code) == 4 ? 32 : 64;
  std::size_t const b = d.block_size;
  if (b < lowest || b > 4096 || (b & (b - 1)) != 0)
    qmem::detail::raise(function, ": block_size is ", b, "; expected a power of two in [", lowest,
                        ", 4096] for ", to_string(d.code));
  if (d.nested && !valid_block_size<dynamic_signed>(d.nested_block))
    qmem::detail::raise(function, ": nested_block is ", d.nested_block,
                        "; expected a power of two in [64, 4096]");
}

//! Calls `f(std::type_identity<C>{})` with the code type of `id` and returns its result. Throws
//! qmem::bad_argument for custom4/custom8 (user tables have no compile-time code type: use the
//! quantized_tensor functions, which handle them) and for an unknown id.
template <class F>
decltype(auto) visit_code(code_id id, F&& f) {
  switch (id) {
  case code_id::dynamic_signed: return f(std::type_identity<dynamic_signed>{});
  case code_id::dynamic_unsigned: return f(std::type_identity<dynamic_unsigned>{});
  case code_id::linear_signed: return f(std::type_identity<linear_signed>{});
  case code_id::linear_unsigned: return f(std::type_identity<linear_unsigned>{});
  case code_id::nf4: return f(std::type_identity<nf4>{});
  case code_id::fp4: return f(std::type_identity<fp4>{});
  case code_id::fp8_e4m3: return f(std::type_identity<fp8_e4m3>{});
  case code_id::fp8_e5m2: return f(std::type_identity<fp8_e5m2>{});
  default: break;
  }
  qmem::detail::raise("visit_code: code id ", to_string(id), " (", static_cast<int>(id),
                      ") has no compile-time code type");
}

} // namespace qmem::quant
