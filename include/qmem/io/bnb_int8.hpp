#pragma once
//! \file
//! bitsandbytes LLM.int8 checkpoints: the tensors of a quantized linear weight as bitsandbytes'
//! `Linear8bitLt` state dict holds them and transformers saves them (`save_pretrained` of a
//! `load_in_8bit` model), read, dequantized and written by qmem.
//!
//! For a layer whose weight key is `P` + "weight" (P is the module prefix, e.g.
//! "model.layers.0.mlp.down_proj."), with rows = out_features and cols = in_features:
//!
//!     Pweight          I8  [rows, cols]  row-major codes q = round_half_even(w * (127 / SCB[r]))
//!     PSCB             F32 [rows]        each row's absmax |w| of the float16 weight
//!     Pweight_format   U8  []            0: row-major. bitsandbytes >= 0.43.1 writes it; older
//!                                        files lack it (read as 0); 1-3 name the GPU tile layouts
//!                                        col32 / col_turing / col_ampere, which bitsandbytes
//!                                        0.50.2 itself rejects on load, and so does qmem
//!     Pbias            (unchanged: not part of the quantization)
//!
//! Values: y[r][c] = (q[r][c] * SCB[r]) * (1/127 as float), one rounding to the output type
//! (qmem::quant::dequantize_rowwise). bitsandbytes quantizes the weight after casting it to
//! float16 (so SCB is the absmax of the float16 values, and a bf16/f32 weight beyond float16's
//! range becomes inf, its row NaN); quantize_int8 does the same.
//!
//! Sources read to get this exactly (bitsandbytes 95f9af3, version 0.50.2.dev0):
//! bitsandbytes/nn/modules.py Int8Params._quantize (cast to float16, int8_vectorwise_quant),
//! Linear8bitLt._save_to_state_dict (`SCB`, and `weight_format` = torch.tensor(0, dtype=uint8)),
//! maybe_rearrange_weight (weight_format optional, only 0 / "row" accepted); bitsandbytes/_ops.py
//! int8_vectorwise_dequant (A * stats * 7.874015718698502e-3); backends/default/ops.py
//! int8_vectorwise_quant (row absmax, round(A * (127 / absmax))); bitsandbytes/utils.py
//! LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING. transformers quantizers/quantizer_bnb_8bit.py (the weight
//! must be int8, the `SCB` tensor must exist, `weight_format` is consumed if present).
//!
//! The checkpoint does not record the weight's dtype before quantization; callers choose the
//! output type (the CLI defaults to float16, the type bitsandbytes quantized from).
//!
//! qmem's earlier `int8` layout (blockwise 8-bit with the signed dynamic map and a
//! `W.quant_state.qmem__int8` tensor, io/bnb.hpp) is still read by read_bnb_weight.

#include <qmem/core/detail/parallel.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/io/bnb.hpp>
#include <qmem/io/detail/stored_weight.hpp>
#include <qmem/io/safetensors.hpp>
#include <qmem/quant/rowwise.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace qmem::io {

//! The prefix `P` of a weight key `P` + "weight"; nullopt when `w` does not end in "weight" after
//! a '.' (or is not "weight" itself): such a tensor is not a module's weight.
inline std::optional<std::string_view> int8_prefix(std::string_view w) noexcept {
  constexpr std::string_view suffix = "weight";
  if (!w.ends_with(suffix))
    return std::nullopt;
  auto const prefix = w.substr(0, w.size() - suffix.size());
  if (!prefix.empty() && prefix.back() != '.')
    return std::nullopt;
  return prefix;
}

//! `P` + "SCB" for a weight key `P` + "weight" (bitsandbytes' key; transformers derives the same
//! for every usual name). Precondition: int8_prefix(w) has a value (bad_argument otherwise).
inline std::string int8_scb_key(std::string_view w) {
  auto const p = int8_prefix(w);
  QMEM_EXPECTS(p.has_value(), "weight key '", w, "' does not end in '.weight'");
  return std::string(*p) + "SCB";
}

//! `P` + "weight_format" for a weight key `P` + "weight". Precondition as int8_scb_key.
inline std::string int8_format_key(std::string_view w) {
  auto const p = int8_prefix(w);
  QMEM_EXPECTS(p.has_value(), "weight key '", w, "' does not end in '.weight'");
  return std::string(*p) + "weight_format";
}

//! A bitsandbytes LLM.int8 weight: codes, row scales and the format flag, kept as stored so that
//! writing them back gives the same bytes.
struct int8_weight : detail::stored_weight<int8_weight> {
  std::string name;                           //!< the weight's key `P` + "weight"
  stored_tensor codes;                        //!< I8 [rows, cols]
  stored_tensor scb;                          //!< F32 [rows]
  std::optional<stored_tensor> weight_format; //!< U8 [] holding 0, when the file has it

  //! The codes' two dimensions (0 when `codes` does not have rank 2 or a dimension is negative,
  //! as in a default-constructed weight: dequantize then refuses any non-empty output).
  [[nodiscard]] std::size_t rows() const noexcept { return dim(0); }
  [[nodiscard]] std::size_t cols() const noexcept { return dim(1); }
  [[nodiscard]] std::size_t numel() const noexcept { return rows() * cols(); }
  //! The weight's shape, [rows, cols].
  [[nodiscard]] std::vector<std::int64_t> const& shape() const noexcept { return codes.shape; }

  //! Bytes of every stored tensor of this weight.
  [[nodiscard]] std::size_t stored_bytes() const noexcept {
    return codes.bytes.size() + scb.bytes.size() +
           (weight_format ? weight_format->bytes.size() : 0);
  }
  //! Bits per parameter of codes and row scales (8 + 32 / cols).
  [[nodiscard]] double bits_per_parameter() const noexcept {
    std::size_t const n = numel();
    return n == 0 ? 0.0
                  : 8.0 * static_cast<double>(codes.bytes.size() + scb.bytes.size()) /
                        static_cast<double>(n);
  }

  //! The keys and tensors to write (`P`weight, `P`SCB, `P`weight_format when present).
  [[nodiscard]] std::vector<std::pair<tensor_spec, std::span<std::byte const>>> tensors() const {
    std::vector<std::pair<tensor_spec, std::span<std::byte const>>> out;
    out.push_back({tensor_spec{name, codes.type, codes.shape}, codes.bytes});
    out.push_back({tensor_spec{int8_scb_key(name), scb.type, scb.shape}, scb.bytes});
    if (weight_format)
      out.push_back({tensor_spec{int8_format_key(name), weight_format->type, weight_format->shape},
                     weight_format->bytes});
    return out;
  }

  //! Throws bad_argument (naming the weight, `function` and what is wrong) unless the tensors
  //! add_to writes form a weight read_int8_weight accepts and reads back as this one: `name` ends
  //! in ".weight", each tensor's bytes match its dtype and shape, and the tensors pass the
  //! reader's own checks (one function, detail::check_int8_tensors, serves both): codes I8
  //! [rows, cols], SCB F32 [rows], weight_format (when present) one U8 element holding 0. add_to
  //! calls it before adding anything.
  void check_readable(char const* function) const;

  using detail::stored_weight<int8_weight>::dequantize; // the copy into a new vector

  //! Dequantizes into `out` (numel() elements, row-major, host memory):
  //! out[r][c] = T((q[r][c] * SCB[r]) * (1/127)). Throws bad_argument when out has the wrong size
  //! or is not host memory, or when `codes` holds fewer than rows * cols bytes or `scb` fewer
  //! than rows floats (a weight assembled or edited by hand), before writing anything.
  template <float_element T>
  void dequantize(exec::host const& e, tensor_view<T> out) const {
    check_output(out);
    QMEM_EXPECTS(cols() == 0 || rows() <= codes.bytes.size() / cols(), "int8 weight '", name,
                 "': codes hold ", codes.bytes.size(), " bytes; [", rows(), ", ", cols(),
                 "] needs more");
    auto const s = scb.as<float>(rows());
    tensor_view<std::int8_t const> const q(reinterpret_cast<std::int8_t const*>(codes.bytes.data()),
                                           numel());
    quant::dequantize_rowwise(e, q, view(s), rows(), cols(), out);
  }

private:
  [[nodiscard]] std::size_t dim(std::size_t i) const noexcept {
    return codes.shape.size() == 2 && codes.shape[i] >= 0 ? static_cast<std::size_t>(codes.shape[i])
                                                          : 0;
  }
};

//! The keys of every LLM.int8 weight in `r`: I8 tensors of rank 2 named `P` + "weight" with a
//! `P` + "SCB" tensor beside them, in file order.
inline std::vector<std::string> int8_weight_names(safetensors_reader const& r) {
  std::vector<std::string> out;
  for (auto const& e : r.tensors())
    if (e.type == dtype::i8 && e.shape.size() == 2 && int8_prefix(e.name) &&
        r.contains(int8_scb_key(e.name)))
      out.push_back(e.name);
  return out;
}

//! True when `key` is `w`'s SCB or weight_format tensor.
inline bool is_int8_aux_key(std::string_view key, std::string_view w) {
  if (!int8_prefix(w))
    return false;
  return key == int8_scb_key(w) || key == int8_format_key(w);
}

namespace detail {

//! What read_int8_weight requires of the tensors of the LLM.int8 weight `name` (whose key ends in
//! ".weight"); the one list of checks its reader and its writer (int8_weight::check_readable)
//! share. `find(key)` gives the tensor_ref stored under `key`, or nullopt; `fail(args...)` throws
//! with the reason and does not return. Requires: the weight I8 of rank 2, `P`SCB F32 [rows], and
//! `P`weight_format, when present, a one-element U8 tensor holding 0 (row-major; bitsandbytes
//! 0.50.2 refuses the tile layouts 1-3 too).
template <class Find, class Fail>
void check_int8_tensors(std::string_view name, Find const& find, Fail const& fail) {
  auto const we = find(name);
  if (!we)
    fail("the tensor is missing (only its SCB is present)");
  if (we->type != dtype::i8 || we->shape.size() != 2)
    fail("the weight is ", dtype_name(we->type), " of rank ", we->shape.size(),
         "; expected I8 [rows, cols] (bitsandbytes' row-major int8)");
  auto const se = find(int8_scb_key(name));
  if (!se)
    fail("the tensor '", int8_scb_key(name), "' is missing");
  if (se->type != dtype::f32 || se->shape.size() != 1 || se->shape[0] != we->shape[0])
    fail("SCB is ", dtype_name(se->type), " of ", se->shape.size() == 1 ? se->numel() : 0,
         " elements in ", se->shape.size(), " dimensions; expected F32 [", we->shape[0], "]");
  if (auto const fe = find(int8_format_key(name))) {
    if (fe->type != dtype::u8 || fe->numel() != 1 || fe->bytes.size() != 1)
      fail("weight_format is ", dtype_name(fe->type), " with ", fe->numel(),
           " elements; expected one U8 value");
    if (auto const v = std::to_integer<unsigned>(fe->bytes[0]); v != 0) {
      char const* const names[] = {"row", "col32", "col_turing", "col_ampere"};
      fail("weight_format is ", v, v < 4 ? std::string(" (") + names[v] + ")" : std::string(),
           "; only 0 (row-major) is supported, as in bitsandbytes 0.50.2");
    }
  }
}

} // namespace detail

inline void int8_weight::check_readable(char const* function) const {
  auto fail = [&](auto const&... args) {
    qmem::detail::raise(function, ": int8 weight '", name, "': ", args...,
                        " (read_int8_weight would refuse the file)");
  };
  if (!int8_prefix(name))
    fail("the name does not end in '.weight'");
  auto const t = tensors();
  detail::check_each_writable(t, fail);
  detail::check_int8_tensors(
      name, [&](std::string_view key) { return detail::find_in(t, key); }, fail);
}

//! Reads and validates the LLM.int8 weight `name` of `r`. Throws bad_argument when `name` does not
//! end in ".weight" or has no SCB tensor beside it; format_error when the weight is not I8 of rank
//! 2, SCB is not F32 [rows], or weight_format is not a one-element U8 tensor holding 0.
inline int8_weight read_int8_weight(safetensors_reader const& r, std::string_view name) {
  QMEM_EXPECTS(int8_prefix(name).has_value(), "'", name, "' in ", r.origin(),
               " does not end in '.weight'; it is not a bitsandbytes int8 weight");
  std::string const scb_key = int8_scb_key(name);
  QMEM_EXPECTS(r.contains(scb_key), "'", name, "' in ", r.origin(), " has no '", scb_key,
               "' tensor; it is not a bitsandbytes int8 weight");
  auto fail = [&](auto const&... args) {
    qmem::detail::raise<format_error>(r.origin(), ": int8 weight '", name, "': ", args...);
  };
  detail::check_int8_tensors(
      name,
      [&](std::string_view key) -> std::optional<detail::tensor_ref> {
        auto const* e = r.find(key);
        return e ? std::optional(detail::tensor_ref{e->type, e->shape, r.bytes(*e)}) : std::nullopt;
      },
      fail);
  int8_weight w;
  w.name = std::string(name);
  w.codes = stored_tensor::from(r, r.at(name));
  w.scb = stored_tensor::from(r, r.at(scb_key));
  if (auto const* fe = r.find(int8_format_key(name)))
    w.weight_format = stored_tensor::from(r, *fe);
  return w;
}

namespace detail {

//! double -> float16 with one rounding (nearest even), as torch's `.half()` of a float64 tensor:
//! rounded to odd in float first (24 bits, more than 11 + 2, so the second rounding is exact).
inline f16 f64_to_f16(double d) noexcept {
  float f = static_cast<float>(d);
  if (static_cast<double>(f) != d && d == d && fmath::is_finite(f)) {
    std::uint32_t b = std::bit_cast<std::uint32_t>(f);
    if ((static_cast<double>(f) > d) == (d > 0.0)) // |f| > |d|: step toward zero (truncate)
      --b;
    f = std::bit_cast<float>(b | 1u); // inexact: the sticky bit
  }
  return f16(f);
}

} // namespace detail

//! Quantizes the weight `x` of shape [rows, cols] (row-major) into exactly the tensors
//! bitsandbytes' Linear8bitLt saves: the values cast to float16 first, as bitsandbytes does, then
//! row-wise int8 (quant::quantize_rowwise), `weight_format` 0. Preconditions (bad_argument,
//! checked before x is read): `name` ends in ".weight" (or is "weight"); shape has two
//! non-negative dimensions whose product is x.size(); x is host-accessible, aligned, non-null
//! when non-empty.
template <float_element T>
[[nodiscard]] int8_weight quantize_int8(exec::host const& e, std::string name,
                                        tensor_view<T const> x, std::vector<std::int64_t> shape) {
  QMEM_EXPECTS(int8_prefix(name).has_value(), "name '", name,
               "' does not end in '.weight'; bitsandbytes' int8 keys are `P`weight and `P`SCB");
  QMEM_EXPECTS(shape.size() == 2 && shape[0] >= 0 && shape[1] >= 0, "shape has rank ", shape.size(),
               "; expected [rows, cols] (a linear layer's weight)");
  auto const rows = static_cast<std::size_t>(shape[0]);
  auto const cols = static_cast<std::size_t>(shape[1]);
  QMEM_EXPECTS(cols == 0 || rows <= x.size() / cols, "shape [", rows, ", ", cols, "] does not fit ",
               x.size(), " elements");
  QMEM_EXPECTS(rows * cols == x.size(), "shape [", rows, ", ", cols, "] has ", rows * cols,
               " elements; x has ", x.size());
  check_view(x, "quantize_int8", "x", true, false);
  std::size_t const n = x.size();
  // the float16 values, held as floats (exact) so that the row-wise loop runs its 16-lane path:
  // the same codes and scales as quantizing the float16 tensor itself
  std::vector<float> half(n);
  qmem::detail::parallel_for(e, n, 4096, [&](std::size_t b, std::size_t end) {
    for (std::size_t i = b; i < end; ++i) {
      if constexpr (std::is_same_v<T, f16>)
        half[i] = x[i].to_float();
      else if constexpr (std::is_same_v<T, double>)
        half[i] = detail::f64_to_f16(x[i]).to_float();
      else
        half[i] = f16(to_float(x[i])).to_float();
    }
  });
  tensor_view<float const> const h = view(std::as_const(half));
  std::vector<std::int8_t> q(n);
  std::vector<float> scb(rows);
  quant::quantize_rowwise(e, h, rows, cols, view(q), view(scb));
  auto bytes_of = [](auto const& v) {
    auto const b = std::as_bytes(std::span(v));
    return std::vector<std::byte>(b.begin(), b.end());
  };
  int8_weight w;
  w.name = std::move(name);
  w.codes = {dtype::i8, std::move(shape), bytes_of(q)};
  w.scb = {dtype::f32, {static_cast<std::int64_t>(rows)}, bytes_of(scb)};
  w.weight_format = stored_tensor{dtype::u8, {}, {std::byte{0}}};
  return w;
}

} // namespace qmem::io
