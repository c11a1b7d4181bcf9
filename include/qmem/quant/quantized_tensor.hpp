#pragma once
//! \file
//! The owning quantized tensor and its non-owning reference.
//!
//! `quantized_tensor` holds everything needed to dequantize a tensor: its codes, its block scales
//! (fp32 absmax, or double-quantized: qabsmax codes, fp32 nested scales and the offset), its shape,
//! its original element type, the runtime format descriptor, and for user tables the table
//! values. Its buffers come from a memory::resource (host, pinned, device or managed), so the same
//! object serves host and GPU code. `quantized_tensor_ref` is a trivially copyable view of one,
//! cheap to pass around and into kernels (cuCollections' owner/ref split).
//!
//!   auto q = qmem::quant::quantize(qmem::exec::host{}, qmem::view(std::as_const(w)),
//!                                  shape, {qmem::quant::code_id::nf4, 64, true, 256});
//!   q.dequantize(qmem::exec::host{}, qmem::view(out));
//!   double bits = q.bits_per_parameter();   // 4.127 + per-tensor constants for NF4/64/nested
//!
//! Layout of the buffers is the blockwise layout (quant/blockwise.hpp, quant/double_quant.hpp),
//! which is bitsandbytes' layout: the io layer writes them to checkpoints byte for byte.

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/memory/resource.hpp>
#include <qmem/quant/blockwise.hpp>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/double_quant.hpp>
#include <qmem/quant/format.hpp>
#include <qmem/quant/stochastic.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

namespace qmem::quant {

//! Largest rank a quantized tensor records.
inline constexpr std::size_t max_rank = 8;

//! A non-owning, trivially copyable view of a quantized tensor. Views of the scales that the
//! format does not use are empty (absmax when nested; qabsmax, absmax2, offset when not; table
//! unless the code is custom4/custom8, and the table is always in host memory).
struct quantized_tensor_ref {
  format_desc format{};
  dtype original_dtype = dtype::f32;
  std::uint32_t rank = 0;
  std::int64_t shape[max_rank] = {};
  std::size_t numel = 0;
  tensor_view<std::uint8_t const> codes;
  tensor_view<float const> absmax;
  tensor_view<std::uint8_t const> qabsmax;
  tensor_view<float const> absmax2;
  tensor_view<float const> offset;
  tensor_view<float const> table;
};

static_assert(std::is_trivially_copyable_v<quantized_tensor_ref>);

namespace detail {

//! A code type over a table known only at run time (user tables stored with a tensor): the
//! algorithms receive the real codebook by argument; `book` here only satisfies code_type.
//! Encoding is table_code's (nearest value, a tie to the lower one).
template <std::size_t N>
struct runtime_table {
  static constexpr int bits = N == 16 ? 4 : 8;
  static constexpr bool is_signed = true;
  static constexpr codebook<N> book{};
  static constexpr std::uint8_t zero_code = 0;

  QMEM_HOST_DEVICE static std::uint8_t encode(float xn, codebook<N> const& b) noexcept {
    return b.code_of[nearest_sorted<N>(xn, b.sorted)];
  }
  QMEM_HOST_DEVICE static float decode(std::uint8_t c, codebook<N> const& b) noexcept {
    return b.value.value[c];
  }
};
static_assert(code_type<runtime_table<16>> && code_type<runtime_table<256>>);

template <std::size_t N>
codebook<N> runtime_codebook(std::span<float const> values) {
  code_table<N> t{};
  std::copy_n(values.begin(), N, t.value);
  return make_codebook(t);
}

//! The element count of `shape`. Throws bad_argument (naming `fn`) for a rank above max_rank, a
//! negative extent, or a product that does not fit std::size_t (a wrapped count would let a
//! smaller input pass for the shape). A zero extent anywhere gives 0.
inline std::size_t checked_numel(std::span<std::int64_t const> shape, char const* fn) {
  QMEM_EXPECTS(shape.size() <= max_rank, "shape has rank ", shape.size(), "; at most ", max_rank,
               " is supported (from ", fn, ")");
  for (std::size_t i = 0; i < shape.size(); ++i)
    if (shape[i] < 0)
      qmem::detail::raise(fn, ": shape[", i, "] is ", shape[i], "; expected >= 0");
  if (std::ranges::find(shape, std::int64_t{0}) != shape.end())
    return 0; // empty, whatever the other extents
  std::size_t n = 1;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    auto const d = static_cast<std::size_t>(shape[i]);
    if (n > std::numeric_limits<std::size_t>::max() / d)
      qmem::detail::raise(fn, ": the shape's element count overflows 64 bits at shape[", i,
                          "] = ", shape[i]);
    n *= d;
  }
  return n;
}

inline void check_table(format_desc const& d, std::span<float const> table, char const* fn) {
  if (!is_custom(d.code)) {
    if (!table.empty())
      qmem::detail::raise(fn, ": a table of ", table.size(), " values was given for code ",
                          to_string(d.code), ", which has its own; expected none");
    return;
  }
  std::size_t const want = d.code == code_id::custom4 ? 16 : 256;
  if (table.size() != want)
    qmem::detail::raise(fn, ": table has ", table.size(), " values; expected ", want, " for ",
                        to_string(d.code));
  bool has_zero = false;
  for (std::size_t i = 0; i < table.size(); ++i) {
    float const v = table[i];
    if (!(v >= -1.0f && v <= 1.0f))
      qmem::detail::raise(fn, ": table[", i, "] is ", v, "; expected a value in [-1, 1]");
    has_zero = has_zero || v == 0.0f;
  }
  if (d.code == code_id::custom4 && !has_zero)
    qmem::detail::raise(fn, ": a 4-bit table must contain 0.0 (its code pads odd tails)");
}

template <class E>
void check_resource_reachable(E const&, memory::resource const& r, char const* fn) {
  if constexpr (exec::is_cuda_v<E>) {
    if (!device_accessible(r.space()))
      qmem::detail::raise(fn, ": the resource hands out ", to_string(r.space()),
                          " memory; exec::cuda needs device-accessible memory");
  } else {
    if (!host_accessible(r.space()))
      qmem::detail::raise(fn, ": the resource hands out ", to_string(r.space()),
                          " memory; exec::host needs host-accessible memory");
  }
}

} // namespace detail

//! An owning quantized tensor (move-only). Construct it empty-but-allocated (the io layer then
//! fills the buffers from a file) or get one from `quantize`.
class quantized_tensor {
  format_desc format_{};
  dtype dtype_ = dtype::f32;
  std::vector<std::int64_t> shape_;
  std::size_t numel_ = 0;
  memory::buffer<std::uint8_t> codes_;
  memory::buffer<float> absmax_;
  memory::buffer<std::uint8_t> qabsmax_;
  memory::buffer<float> absmax2_;
  memory::buffer<float> offset_;
  std::vector<float> table_;

public:
  quantized_tensor() = default;

  //! Allocates (uninitialized) buffers for a tensor of `shape` in format `format` from `r`;
  //! `original` is the element type it was quantized from (and dequantizes to by default);
  //! `table` holds the values of a custom4 (16) / custom8 (256) code, else is empty.
  //! Preconditions (qmem::bad_argument): `format` valid (quant::validate); rank <= max_rank; every
  //! extent >= 0, their product within std::size_t; `original` a floating dtype; `table` as the
  //! code requires, values in [-1, 1], a 4-bit table containing 0.0.
  quantized_tensor(format_desc const& format, dtype original, std::span<std::int64_t const> shape,
                   memory::resource& r = memory::default_host_resource(),
                   std::span<float const> table = {}) {
    constexpr char const* fn = "quantized_tensor";
    validate(format, fn);
    QMEM_EXPECTS(is_floating(original), "original dtype ", dtype_name(original),
                 " is not a floating type (F64, F32, F16, BF16)");
    std::size_t const n = detail::checked_numel(shape, fn);
    detail::check_table(format, table, fn);
    format_ = format;
    dtype_ = original;
    shape_.assign(shape.begin(), shape.end());
    numel_ = n;
    auto const meta = memory::category::quant_metadata;
    codes_ = memory::buffer<std::uint8_t>(format.code_bytes(n), r, memory::category::weights);
    std::size_t const blocks = format.scale_count(n);
    if (format.nested) {
      qabsmax_ = memory::buffer<std::uint8_t>(blocks, r, meta);
      absmax2_ = memory::buffer<float>(block_count(blocks, format.nested_block), r, meta);
      offset_ = memory::buffer<float>(1, r, meta);
    } else {
      absmax_ = memory::buffer<float>(blocks, r, meta);
    }
    table_.assign(table.begin(), table.end());
  }

  //! Moves: the source is left as a default-constructed tensor (numel 0, no buffers, no table).
  //! (Defaulted moves emptied the buffers and the table but kept numel, format and dtype, so a
  //! moved-from custom-table tensor passed dequantize's size check and read its empty table.)
  quantized_tensor(quantized_tensor&& o) noexcept
      : format_(std::exchange(o.format_, {})), dtype_(std::exchange(o.dtype_, dtype::f32)),
        shape_(std::exchange(o.shape_, {})), numel_(std::exchange(o.numel_, 0)),
        codes_(std::move(o.codes_)), absmax_(std::move(o.absmax_)), qabsmax_(std::move(o.qabsmax_)),
        absmax2_(std::move(o.absmax2_)), offset_(std::move(o.offset_)),
        table_(std::exchange(o.table_, {})) {}
  quantized_tensor& operator=(quantized_tensor&& o) noexcept {
    if (this != &o) {
      format_ = std::exchange(o.format_, {});
      dtype_ = std::exchange(o.dtype_, dtype::f32);
      shape_ = std::exchange(o.shape_, {});
      numel_ = std::exchange(o.numel_, 0);
      codes_ = std::move(o.codes_);
      absmax_ = std::move(o.absmax_);
      qabsmax_ = std::move(o.qabsmax_);
      absmax2_ = std::move(o.absmax2_);
      offset_ = std::move(o.offset_);
      table_ = std::exchange(o.table_, {});
    }
    return *this;
  }

  [[nodiscard]] format_desc const& format() const noexcept { return format_; }
  [[nodiscard]] dtype original_dtype() const noexcept { return dtype_; }
  [[nodiscard]] std::span<std::int64_t const> shape() const noexcept { return shape_; }
  [[nodiscard]] std::size_t numel() const noexcept { return numel_; }
  [[nodiscard]] memory_space space() const noexcept { return codes_.space(); }
  [[nodiscard]] std::span<float const> table() const noexcept { return table_; }

  //! The buffers (mutable views for whoever fills them, e.g. a checkpoint reader).
  [[nodiscard]] tensor_view<std::uint8_t> codes() noexcept { return codes_.view(); }
  [[nodiscard]] tensor_view<std::uint8_t const> codes() const noexcept { return codes_.view(); }
  [[nodiscard]] tensor_view<float> absmax() noexcept { return absmax_.view(); }
  [[nodiscard]] tensor_view<float const> absmax() const noexcept { return absmax_.view(); }
  [[nodiscard]] tensor_view<std::uint8_t> qabsmax() noexcept { return qabsmax_.view(); }
  [[nodiscard]] tensor_view<std::uint8_t const> qabsmax() const noexcept { return qabsmax_.view(); }
  [[nodiscard]] tensor_view<float> absmax2() noexcept { return absmax2_.view(); }
  [[nodiscard]] tensor_view<float const> absmax2() const noexcept { return absmax2_.view(); }
  [[nodiscard]] tensor_view<float> offset() noexcept { return offset_.view(); }
  [[nodiscard]] tensor_view<float const> offset() const noexcept { return offset_.view(); }

  //! Exact bytes held for the tensor's data: codes, scales (plain, or qabsmax + nested scales +
  //! the 4-byte offset) and a custom table's values. Shape and descriptor are not counted.
  [[nodiscard]] std::size_t size_bytes() const noexcept {
    return codes_.size_bytes() + absmax_.size_bytes() + qabsmax_.size_bytes() +
           absmax2_.size_bytes() + offset_.size_bytes() + table_.size() * sizeof(float);
  }
  //! 8 * size_bytes() / numel() (0 for an empty tensor). NF4 with double quantization at block
  //! 64 and nested block 256: 4 + 8/64 + 32/(64*256) = 4.127 bits, plus the offset (and nothing
  //! else) as per-tensor constant.
  [[nodiscard]] double bits_per_parameter() const noexcept {
    return numel_ == 0 ? 0.0
                       : 8.0 * static_cast<double>(size_bytes()) / static_cast<double>(numel_);
  }

  //! The non-owning reference.
  [[nodiscard]] quantized_tensor_ref ref() const noexcept {
    quantized_tensor_ref q{};
    q.format = format_;
    q.original_dtype = dtype_;
    q.rank = static_cast<std::uint32_t>(shape_.size());
    std::copy(shape_.begin(), shape_.end(), q.shape);
    q.numel = numel_;
    q.codes = codes();
    q.absmax = absmax();
    q.qabsmax = qabsmax();
    q.absmax2 = absmax2();
    q.offset = offset();
    q.table = tensor_view<float const>(table_.data(), table_.size(), memory_space::host);
    return q;
  }

  //! Dequantizes into `out` (see qmem::quant::dequantize).
  template <exec::execution E, float_element T>
  void dequantize(E const& e, tensor_view<T> out) const;
};

namespace detail {

template <std::size_t N, float_element T>
void quantize_custom_host(exec::host const& e, std::span<float const> table, tensor_view<T const> x,
                          std::size_t block_size, tensor_view<std::uint8_t> codes,
                          tensor_view<float> absmax, rounding r) {
  using C = runtime_table<N>;
  codebook<N> const book = runtime_codebook<N>(table);
  std::size_t const n = x.size();
  qmem::detail::parallel_for(
      e, absmax.size(), 1,
      [&](std::size_t b0, std::size_t b1) {
        quantize_blocks_host<C>(book, x.data(), n, block_size, codes.data(), absmax.data(), r, b0,
                                b1);
      },
      host_min_blocks(block_size));
}

template <std::size_t N, float_element T>
void dequantize_custom_host(exec::host const& e, std::span<float const> table,
                            tensor_view<std::uint8_t const> codes, tensor_view<float const> absmax,
                            std::size_t block_size, tensor_view<T> y) {
  using C = runtime_table<N>;
  codebook<N> const book = runtime_codebook<N>(table);
  std::size_t const n = y.size();
  qmem::detail::parallel_for(
      e, absmax.size(), 1,
      [&](std::size_t b0, std::size_t b1) {
        dequantize_blocks_host<C>(book, codes.data(), absmax.data(), n, block_size, y.data(), b0,
                                  b1);
      },
      host_min_blocks(block_size));
}

} // namespace detail

//! Quantizes `x` (numel = product of `shape`) into a new quantized_tensor in `format`, with
//! buffers from `r`, rounding as `rnd` says. A custom4/custom8 format takes its values in
//! `table` (host execution only). With a nested format the fp32 absmax is computed into a
//! temporary buffer from `r`, then double-quantized (quantize_scales).
//! Preconditions (qmem::bad_argument, nothing allocated or written): those of the
//! quantized_tensor constructor; product of `shape` == x.size(); x reachable by `e`; `r` hands
//! out memory `e` can reach; custom tables only with exec::host.
template <exec::execution E, float_element T>
quantized_tensor quantize(E const& e, tensor_view<T const> x, std::span<std::int64_t const> shape,
                          format_desc const& format,
                          memory::resource& r = memory::default_host_resource(), rounding rnd = {},
                          std::span<float const> table = {}) {
  constexpr char const* fn = "quantize";
  validate(format, fn);
  std::size_t const n = detail::checked_numel(shape, fn);
  QMEM_EXPECTS(n == x.size(), "shape holds ", n, " elements but x has ", x.size());
  detail::check_arg<E>(x, fn, "x");
  detail::check_resource_reachable(e, r, fn);
  detail::check_table(format, table, fn);
  if constexpr (exec::is_cuda_v<E>)
    QMEM_EXPECTS(!is_custom(format.code), "code ", to_string(format.code),
                 " (a run-time table) runs on the host only; on the GPU declare a table_code");
  quantized_tensor q(format, dtype_of_v<T>, shape, r, table);
  memory::buffer<float> plain;
  tensor_view<float> absmax = q.absmax();
  if (format.nested) {
    plain = memory::buffer<float>(format.scale_count(n), r, memory::category::workspace);
    absmax = plain.view();
  }
  if constexpr (exec::is_host_v<E>) {
    if (format.code == code_id::custom4)
      detail::quantize_custom_host<16>(e, q.table(), x, format.block_size, q.codes(), absmax, rnd);
    else if (format.code == code_id::custom8)
      detail::quantize_custom_host<256>(e, q.table(), x, format.block_size, q.codes(), absmax, rnd);
  }
  if (!is_custom(format.code))
    visit_code(format.code, [&]<class C>(std::type_identity<C>) {
      // nested: quantize + double quantization in one call
      if (format.nested)
        quantize_blockwise_nested<C>(e, x, format.block_size, q.codes(), absmax,
                                     format.nested_block, q.qabsmax(), q.absmax2(), q.offset(),
                                     rnd);
      else
        quantize_blockwise<C>(e, x, format.block_size, q.codes(), absmax, rnd);
    });
  else if (format.nested)
    quantize_scales(e, tensor_view<float const>(absmax), format.nested_block, q.qabsmax(),
                    q.absmax2(), q.offset());
  return q;
}

//! Dequantizes `q` into `out` (any float_element type; one rounding from float).
//! Preconditions (qmem::bad_argument, nothing written): out.size() == q.numel(); `out` and q's
//! buffers reachable by `e`; custom tables only with exec::host.
template <exec::execution E, float_element T>
void dequantize(E const& e, quantized_tensor const& q, tensor_view<T> out) {
  constexpr char const* fn = "dequantize";
  QMEM_EXPECTS(out.size() == q.numel(), "out has ", out.size(), " elements; the tensor has ",
               q.numel());
  detail::check_arg<E>(out, fn, "out");
  detail::check_arg<E>(q.codes(), fn, "codes");
  format_desc const& f = q.format();
  if constexpr (exec::is_cuda_v<E>)
    QMEM_EXPECTS(!is_custom(f.code), "code ", to_string(f.code),
                 " (a run-time table) runs on the host only; on the GPU declare a table_code");
  if constexpr (exec::is_host_v<E>) {
    if (is_custom(f.code)) {
      memory::buffer<float> plain;
      tensor_view<float const> absmax = q.absmax();
      if (f.nested) {
        plain = memory::buffer<float>(q.qabsmax().size());
        dequantize_scales(e, q.qabsmax(), q.absmax2(), q.offset(), f.nested_block, plain.view());
        absmax = plain.view();
      }
      if (f.code == code_id::custom4)
        detail::dequantize_custom_host<16>(e, q.table(), q.codes(), absmax, f.block_size, out);
      else
        detail::dequantize_custom_host<256>(e, q.table(), q.codes(), absmax, f.block_size, out);
      return;
    }
  }
  visit_code(f.code, [&]<class C>(std::type_identity<C>) {
    if (f.nested)
      dequantize_blockwise_nested<C>(e, q.codes(), q.qabsmax(), q.absmax2(), q.offset(),
                                     f.block_size, f.nested_block, out);
    else
      dequantize_blockwise<C>(e, q.codes(), q.absmax(), f.block_size, out);
  });
}

template <exec::execution E, float_element T>
void quantized_tensor::dequantize(E const& e, tensor_view<T> out) const {
  quant::dequantize(e, *this, out);
}

} // namespace qmem::quant
