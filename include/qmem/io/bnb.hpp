#pragma once
//! \file
//! bitsandbytes checkpoint interop: the tensors transformers saves for a bnb-4bit weight `W`,
//! read into qmem's blockwise layout, dequantized bit-exactly, and written back byte for byte.
//!
//! A 4-bit weight `W` of shape S and n = prod(S) elements is stored as
//!
//!     W                                    codes, 2 per byte (first element high nibble), stored
//!                                          as U8 [ceil(n/2), 1] or, with a non-uint8
//!                                          `quant_storage` (FSDP), as BF16/F16/F32 with the same
//!                                          bytes; bnb sizes that tensor (n + 1) / (2 * itemsize)
//!                                          rows, so trailing bytes may be padding
//!     W.absmax                             F32 [ceil(n/blocksize)], or with double quantization
//!                                          U8 [ceil(n/blocksize)] (the quantized scales)
//!     W.quant_map                          F32 [16]: the code table (FP4: +0.0 at code 8)
//!     W.nested_absmax                      F32 [ceil(m/nested_blocksize)]   (double quant only)
//!     W.nested_quant_map                   F32 [256]: bnb's signed dynamic map (double quant only)
//!     W.quant_state.bitsandbytes__<type>   U8: Python `json.dumps` of {"quant_type", "blocksize",
//!                                          "dtype", "shape"[, "nested_blocksize", "nested_dtype",
//!                                          "nested_offset"]} in that order
//!
//! qmem's earlier blockwise int8 layout, still read (and written by quantize_bnb with
//! bnb_format::int8; the CLI's `--format int8` now writes bitsandbytes' LLM.int8 tensors instead,
//! io/bnb_int8.hpp). Blockwise 8-bit has no transformers format; this one mirrors the 4-bit keys:
//! `W` U8 of the weight's own shape (one code of the signed dynamic map per element),
//! `W.absmax`/`W.nested_*` as above, `W.quant_map` F32 [256], and `W.quant_state.qmem__int8` with
//! "quant_type": "int8". Double quantization of int8 uses nested blocks of the data's block size,
//! as bitsandbytes' quantize_blockwise(nested=True) does.
//!
//! Dequantization uses qmem's code tables (which equal bnb's kernels, including FP4's -0.0 at code
//! 8) after checking that the stored tables hold those values: a checkpoint with another table is
//! rejected rather than dequantized with the wrong one.

#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/io/detail/stored_weight.hpp>
#include <qmem/io/safetensors.hpp>
#include <qmem/quant/blockwise.hpp>
#include <qmem/quant/code_table.hpp>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/double_quant.hpp>
#include <qmem/quant/format.hpp>
#include <qmem/quant/quantized_tensor.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

namespace qmem::io {

//! The quantization formats a checkpoint weight can have.
enum class bnb_format {
  nf4, //!< bitsandbytes NF4 (transformers `bnb_4bit_quant_type="nf4"`)
  fp4, //!< bitsandbytes FP4
  int8 //!< blockwise 8-bit with the signed dynamic map in qmem's earlier layout (read; LLM.int8
       //!< checkpoints are io/bnb_int8.hpp's int8_weight)
};

//! "nf4", "fp4", "int8".
constexpr std::string_view to_string(bnb_format f) noexcept {
  return f == bnb_format::nf4 ? "nf4" : f == bnb_format::fp4 ? "fp4" : "int8";
}

//! The suffix of the quant-state key after `W.` ("quant_state.bitsandbytes__nf4", ...).
inline std::string quant_state_suffix(bnb_format f) {
  std::string s = f == bnb_format::int8 ? "quant_state.qmem__" : "quant_state.bitsandbytes__";
  s += to_string(f);
  return s;
}

//! The quant-state key of weight `w` in format `f` (`w` + "." + quant_state_suffix(f)).
inline std::string quant_state_key(std::string_view w, bnb_format f) {
  std::string s(w);
  s += '.';
  s += quant_state_suffix(f);
  return s;
}

//! torch's name of a floating dtype as bnb writes it ("bfloat16", "float16", "float32",
//! "float64"); empty for other dtypes.
constexpr std::string_view torch_dtype_name(dtype t) noexcept {
  switch (t) {
  case dtype::bf16: return "bfloat16";
  case dtype::f16: return "float16";
  case dtype::f32: return "float32";
  case dtype::f64: return "float64";
  default: return "";
  }
}

//! Parses a torch floating dtype name; false when it is not one of torch_dtype_name's.
constexpr bool parse_torch_dtype(std::string_view name, dtype& out) noexcept {
  for (dtype t : {dtype::bf16, dtype::f16, dtype::f32, dtype::f64})
    if (torch_dtype_name(t) == name) {
      out = t;
      return true;
    }
  return false;
}

//! Python's repr() of a float (a double): the shortest digits that round-trip, in fixed notation
//! for decimal exponents -4..15 (with ".0" when integral), otherwise as d.ddde+XX. This is what
//! `json.dumps` writes for bnb's `nested_offset`.
inline std::string python_float_repr(double v) {
  if (v != v)
    return "NaN";
  if (v == std::numeric_limits<double>::infinity())
    return "Infinity";
  if (v == -std::numeric_limits<double>::infinity())
    return "-Infinity";
  char buf[64];
  auto const r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string s(buf, r.ptr);
  std::string sign;
  if (s.front() == '-') {
    sign = "-";
    s.erase(0, 1);
  }
  auto const e = s.find('e');
  std::string digits = s.substr(0, e);
  int const exp = std::stoi(s.substr(e + 1));
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  if (exp >= -4 && exp < 16) {
    std::string out;
    if (exp < 0) {
      out = "0." + std::string(static_cast<std::size_t>(-exp - 1), '0') + digits;
    } else {
      auto const int_digits = static_cast<std::size_t>(exp) + 1;
      if (digits.size() <= int_digits)
        out = digits + std::string(int_digits - digits.size(), '0') + ".0";
      else
        out = digits.substr(0, int_digits) + "." + digits.substr(int_digits);
    }
    return sign + out;
  }
  std::string mant = digits.substr(0, 1);
  if (digits.size() > 1)
    mant += "." + digits.substr(1);
  std::string const es = std::to_string(exp < 0 ? -exp : exp);
  return sign + mant + (exp < 0 ? "e-" : "e+") + (es.size() < 2 ? "0" : "") + es;
}

//! The largest dimension and element count a bnb quant state may record: parse rejects more
//! (real weights are far below; the bound keeps every size computed from the shape in 64 bits),
//! and the writers refuse shapes beyond it so that what qmem writes it also reads.
inline constexpr std::uint64_t max_bnb_elements = std::uint64_t{1} << 48;

namespace detail {

//! The element count of `shape`. Throws bad_argument (naming `function`) for what
//! bnb_quant_state::parse rejects: a dimension outside [0, max_bnb_elements], or a running product
//! above max_bnb_elements.
inline std::size_t checked_bnb_numel(std::span<std::int64_t const> shape, char const* function) {
  std::uint64_t n = 1;
  for (auto const d : shape) {
    if (d < 0 || static_cast<std::uint64_t>(d) > max_bnb_elements)
      qmem::detail::raise(function, ": shape has a dimension ", d, "; expected one in [0, 2^48]");
    auto const v = static_cast<std::uint64_t>(d);
    if (v != 0 && n > max_bnb_elements / v)
      qmem::detail::raise(function, ": shape has more than 2^48 elements");
    n *= v;
  }
  return static_cast<std::size_t>(n);
}

} // namespace detail

//! The fields of a bnb quant-state JSON.
struct bnb_quant_state {
  bnb_format format = bnb_format::nf4;
  std::size_t blocksize = 64;
  dtype type = dtype::bf16;           //!< the dtype of the original weight ("dtype")
  std::vector<std::int64_t> shape;    //!< the shape of the original weight
  bool nested = false;                //!< double-quantized scales
  std::size_t nested_blocksize = 256; //!< nested only
  float nested_offset = 0.0f;         //!< nested only (mean of the absmax values)

  //! The element count of the original weight.
  [[nodiscard]] std::size_t numel() const noexcept {
    std::size_t n = 1;
    for (auto d : shape)
      n *= static_cast<std::size_t>(d);
    return n;
  }

  //! The JSON bytes bitsandbytes writes for this state (Python json.dumps, fields in bnb's order).
  [[nodiscard]] std::string to_json() const {
    std::string s = "{\"quant_type\": \"" + std::string(to_string(format)) +
                    "\", \"blocksize\": " + std::to_string(blocksize) + ", \"dtype\": \"" +
                    std::string(torch_dtype_name(type)) + "\", \"shape\": [";
    for (std::size_t i = 0; i < shape.size(); ++i)
      s += (i ? ", " : "") + std::to_string(shape[i]);
    s += "]";
    if (nested)
      s += ", \"nested_blocksize\": " + std::to_string(nested_blocksize) +
           ", \"nested_dtype\": \"float32\", \"nested_offset\": " +
           python_float_repr(static_cast<double>(nested_offset));
    return s + "}";
  }

  //! Parses and validates quant-state JSON bytes; `where` names the tensor in messages.
  //! Throws format_error for bad JSON, a missing or mistyped field, an unknown quant_type or
  //! dtype, a block size the format does not support, a partial set of nested fields, or a
  //! nested_offset outside float32's range (the bare NaN / Infinity / -Infinity Python writes for
  //! a non-finite offset are read as those values).
  [[nodiscard]] static bnb_quant_state parse(std::span<std::byte const> bytes,
                                             std::string_view where) {
    using json = nlohmann::json;
    auto fail = [&](auto const&... args) {
      qmem::detail::raise<format_error>(where, ": bad bitsandbytes quant_state: ", args...);
    };
    // Python's json.dumps writes a non-finite nested_offset (a NaN in the weight makes the mean
    // of the absmax values NaN) as the bare token NaN / Infinity / -Infinity, which is not JSON:
    // read that one value as Python does, the rest strictly.
    std::string text(reinterpret_cast<char const*>(bytes.data()), bytes.size());
    std::optional<float> special_offset;
    for (auto const& [token, value] :
         {std::pair<char const*, float>{"-Infinity", -std::numeric_limits<float>::infinity()},
          {"Infinity", std::numeric_limits<float>::infinity()},
          {"NaN", std::numeric_limits<float>::quiet_NaN()}}) {
      std::string const key = std::string("\"nested_offset\": ") + token;
      if (auto const at = text.find(key); at != std::string::npos && !special_offset) {
        text.replace(at, key.size(), "\"nested_offset\": 0");
        special_offset = value;
      }
    }
    json j;
    try {
      j = json::parse(text);
    } catch (json::exception const& e) {
      fail("JSON does not parse: ", e.what());
    }
    if (!j.is_object())
      fail("not a JSON object");
    bnb_quant_state s;
    auto const qt = j.find("quant_type");
    if (qt == j.end() || !qt->is_string())
      fail("no string quant_type");
    auto const q = qt->get<std::string>();
    if (q == "nf4")
      s.format = bnb_format::nf4;
    else if (q == "fp4")
      s.format = bnb_format::fp4;
    else if (q == "int8")
      s.format = bnb_format::int8;
    else
      fail("quant_type is '", q, "'; expected nf4, fp4 or int8");
    auto const bs = j.find("blocksize");
    if (bs == j.end() || !bs->is_number_unsigned())
      fail("no non-negative integer blocksize");
    s.blocksize = bs->get<std::size_t>();
    bool const ok_block = s.format == bnb_format::int8
                              ? quant::valid_block_size<quant::dynamic_signed>(s.blocksize)
                              : quant::valid_block_size<quant::nf4>(s.blocksize);
    if (!ok_block)
      fail("blocksize ", s.blocksize, " is not a power of two in [",
           s.format == bnb_format::int8 ? 64 : 32, ", 4096]");
    auto const dt = j.find("dtype");
    if (dt == j.end() || !dt->is_string() || !parse_torch_dtype(dt->get<std::string>(), s.type))
      fail("dtype is ", dt == j.end() ? std::string("missing") : dt->dump(),
           "; expected bfloat16, float16, float32 or float64");
    auto const sh = j.find("shape");
    if (sh == j.end() || !sh->is_array())
      fail("no shape array");
    std::uint64_t n = 1;
    for (auto const& d : *sh) {
      if (!d.is_number_unsigned() || d.get<std::uint64_t>() > max_bnb_elements)
        fail("shape ", sh->dump(), " has a dimension that is not an integer in [0, 2^48]");
      auto const v = d.get<std::uint64_t>();
      if (v != 0 && n > max_bnb_elements / v)
        fail("shape ", sh->dump(), " has more than 2^48 elements");
      n *= v;
      s.shape.push_back(static_cast<std::int64_t>(v));
    }
    int const nested_fields = static_cast<int>(j.contains("nested_blocksize")) +
                              static_cast<int>(j.contains("nested_dtype")) +
                              static_cast<int>(j.contains("nested_offset"));
    if (nested_fields != 0 && nested_fields != 3)
      fail("has some but not all of nested_blocksize, nested_dtype, nested_offset");
    if (nested_fields == 3) {
      s.nested = true;
      auto const& nb = j["nested_blocksize"];
      if (!nb.is_number_unsigned() ||
          !quant::valid_block_size<quant::dynamic_signed>(nb.get<std::size_t>()))
        fail("nested_blocksize ", nb.dump(), " is not a power of two in [64, 4096]");
      s.nested_blocksize = nb.get<std::size_t>();
      if (j["nested_dtype"] != "float32")
        fail("nested_dtype is ", j["nested_dtype"].dump(), "; expected \"float32\"");
      auto const& off = j["nested_offset"];
      if (!off.is_number())
        fail("nested_offset is ", off.dump(), "; expected a number");
      // bnb writes a float32's repr; a finite value beyond float32's range (a hand-edited or
      // hostile file) has no float to become (converting it is undefined behaviour)
      double const v = off.get<double>();
      if (!special_offset &&
          !(std::fabs(v) <= static_cast<double>(std::numeric_limits<float>::max())))
        fail("nested_offset ", off.dump(), " is outside float32's range");
      s.nested_offset = special_offset ? *special_offset : static_cast<float>(v);
    }
    return s;
  }
};

//! One stored tensor: its dtype, shape and bytes.
struct stored_tensor {
  dtype type = dtype::u8;
  std::vector<std::int64_t> shape;
  std::vector<std::byte> bytes;

  //! A copy of tensor `name` of `r`.
  [[nodiscard]] static stored_tensor from(safetensors_reader const& r, tensor_entry const& e) {
    auto const b = r.bytes(e);
    return {e.type, e.shape, std::vector<std::byte>(b.begin(), b.end())};
  }
  //! The bytes as `count` values of T (a copy; the bytes need not be aligned). Throws
  //! bad_argument when the tensor holds fewer than count * sizeof(T) bytes.
  template <class T>
  [[nodiscard]] std::vector<T> as(std::size_t count) const {
    QMEM_EXPECTS(count <= bytes.size() / sizeof(T), "the tensor holds ", bytes.size(), " bytes; ",
                 count, " values of ", sizeof(T), " bytes need more");
    std::vector<T> v(count);
    if (count != 0)
      std::memcpy(v.data(), bytes.data(), count * sizeof(T));
    return v;
  }
};

namespace detail {

//! A tensor as the weight checks see it, whether it lies in a file being read or in a weight
//! about to be written: dtype, shape and bytes (borrowed).
struct tensor_ref {
  dtype type = dtype::u8;
  std::span<std::int64_t const> shape;
  std::span<std::byte const> bytes;

  //! The element count (1 for shape []). Precondition: the shape's byte count does not overflow
  //! (a validated file, or safetensors' detail::check_writable passed).
  [[nodiscard]] std::size_t numel() const noexcept {
    std::size_t n = 1;
    for (auto d : shape)
      n *= static_cast<std::size_t>(d);
    return n;
  }
};

//! Looks a tensor up by key among `tensors` (what a weight's tensors() returns).
inline std::optional<tensor_ref>
find_in(std::span<std::pair<tensor_spec, std::span<std::byte const>> const> tensors,
        std::string_view key) noexcept {
  for (auto const& [spec, bytes] : tensors)
    if (spec.name == key)
      return tensor_ref{spec.type, spec.shape, bytes};
  return std::nullopt;
}

//! Checks `tensors` as a writer would before adding any (detail::check_writable for each: names,
//! shapes, byte counts), so that the weight checks can trust numel() and byte counts. `fail` is
//! called with the reason.
template <class Fail>
void check_each_writable(
    std::span<std::pair<tensor_spec, std::span<std::byte const>> const> tensors, Fail const& fail) {
  for (auto const& [spec, bytes] : tensors) {
    try {
      check_writable(spec.name, spec.type, spec.shape, bytes.size());
    } catch (bad_argument const& e) {
      fail(e.what());
    }
  }
}

} // namespace detail

//! A bnb-quantized weight: its quant state and the stored tensors, kept as stored so that writing
//! them back gives the same bytes.
struct bnb_weight : detail::stored_weight<bnb_weight> {
  std::string name;                           //!< the weight's key `W`
  bnb_quant_state state;                      //!< parsed from `state_json`
  std::string state_json;                     //!< the quant-state bytes as stored
  stored_tensor codes;                        //!< `W`
  stored_tensor absmax;                       //!< `W.absmax` (F32 scales, or U8 codes when nested)
  stored_tensor quant_map;                    //!< `W.quant_map`
  std::optional<stored_tensor> nested_absmax; //!< `W.nested_absmax` (nested only)
  std::optional<stored_tensor> nested_quant_map; //!< `W.nested_quant_map` (nested only)

  [[nodiscard]] std::size_t numel() const noexcept { return state.numel(); }
  [[nodiscard]] bnb_format format() const noexcept { return state.format; }

  //! Bytes of every stored tensor of this weight (codes, scales, tables, state).
  [[nodiscard]] std::size_t stored_bytes() const noexcept {
    std::size_t b =
        codes.bytes.size() + absmax.bytes.size() + quant_map.bytes.size() + state_json.size();
    if (nested_absmax)
      b += nested_absmax->bytes.size();
    if (nested_quant_map)
      b += nested_quant_map->bytes.size();
    return b;
  }
  //! Bits per parameter of codes and scales (what grows with n; tables and the state excluded).
  [[nodiscard]] double bits_per_parameter() const noexcept {
    std::size_t const n = numel();
    if (n == 0)
      return 0.0;
    std::size_t const code_b = state.format == bnb_format::int8 ? n : (n + 1) / 2;
    std::size_t b = code_b + absmax.bytes.size();
    if (nested_absmax)
      b += nested_absmax->bytes.size();
    return 8.0 * static_cast<double>(b) / static_cast<double>(n);
  }

  //! The keys and tensors to write, in no particular order (writers sort them): each optional
  //! tensor only when present.
  [[nodiscard]] std::vector<std::pair<tensor_spec, std::span<std::byte const>>> tensors() const {
    std::vector<std::pair<tensor_spec, std::span<std::byte const>>> out;
    auto add = [&](std::string key, stored_tensor const& t) {
      out.push_back({tensor_spec{std::move(key), t.type, t.shape}, t.bytes});
    };
    add(name, codes);
    add(name + ".absmax", absmax);
    add(name + ".quant_map", quant_map);
    if (nested_absmax)
      add(name + ".nested_absmax", *nested_absmax);
    if (nested_quant_map)
      add(name + ".nested_quant_map", *nested_quant_map);
    out.push_back({tensor_spec{quant_state_key(name, state.format),
                               dtype::u8,
                               {static_cast<std::int64_t>(state_json.size())}},
                   std::as_bytes(std::span(state_json))});
    return out;
  }

  using detail::stored_weight<bnb_weight>::dequantize; // the copy into a new vector

  //! Dequantizes into `out` (numel() elements, host memory) with bitsandbytes' arithmetic:
  //! table[code] * absmax in float (absmax = nested_table[q] * nested_absmax + offset when nested),
  //! rounded once to T. Throws bad_argument when out has the wrong size or is not host memory, or
  //! when the members do not hold what the state says (check_stored), before writing anything.
  template <float_element T>
  void dequantize(exec::host const& e, tensor_view<T> out) const {
    check_stored("dequantize");
    check_output(out);
    switch (state.format) {
    case bnb_format::nf4: dequantize_as<quant::nf4>(e, out); break;
    case bnb_format::fp4: dequantize_as<quant::fp4>(e, out); break;
    case bnb_format::int8: dequantize_as<quant::dynamic_signed>(e, out); break;
    }
  }

  //! The weight as a qmem quantized tensor whose buffers come from `r` (host-accessible memory):
  //! the same codes (the first code bytes of `W`, whatever its storage dtype), scales and offset.
  //! The inverse of from_quantized up to the storage dtype of `W`. Throws bad_argument for a
  //! resource of device memory or members that do not hold what the state says (check_stored).
  [[nodiscard]] quant::quantized_tensor
  to_quantized(memory::resource& r = memory::default_host_resource()) const;

  //! A bnb weight named `name` holding `q`'s codes and scales, with the tensors and quant-state
  //! JSON bitsandbytes/transformers write (U8 codes). Preconditions: q's code is nf4, fp4 or
  //! dynamic_signed (int8), its buffers are in host-accessible memory, and its shape is one the
  //! reader accepts (see quantize_bnb) and has q.numel() elements (not a default-constructed
  //! tensor); throws bad_argument.
  [[nodiscard]] static bnb_weight from_quantized(std::string name,
                                                 quant::quantized_tensor const& q);

  //! Throws bad_argument (naming the weight, `function` and what is wrong) unless the tensors
  //! add_to writes form a weight read_bnb_weight accepts and reads back as this one: each tensor's
  //! bytes match its dtype and shape, the tensors pass read_bnb_weight's own checks (one function,
  //! detail::check_bnb_tensors, serves both: dtypes, element counts, tables, nested tensors
  //! present exactly when the state is nested), and `state_json` parses to `state`. add_to calls
  //! it before adding anything. Stricter than check_stored, which asks only what dequantize and
  //! to_quantized read (at least the bytes the state needs, in any dtype).
  void check_readable(char const* function) const;

  //! Throws bad_argument (naming `function` and the weight) unless the members hold what `state`
  //! says, as read_bnb_weight, quantize_bnb and from_quantized leave them (a weight assembled or
  //! edited by hand may not): a shape the reader accepts, a block size the format supports, at
  //! least the code bytes and scales of numel() elements, and the nested scales when nested.
  //! Sizes are lower bounds: dequantize reads a prefix, and codes stored in a wider dtype
  //! (quant_storage) carry padding; what a file must hold exactly is check_readable's.
  void check_stored(char const* function) const {
    std::size_t const n = detail::checked_bnb_numel(state.shape, function);
    bool const four_bit = state.format != bnb_format::int8;
    auto fail = [&](auto const&... args) {
      qmem::detail::raise(function, ": bnb weight '", name, "': ", args...);
    };
    if (!(four_bit ? quant::valid_block_size<quant::nf4>(state.blocksize)
                   : quant::valid_block_size<quant::dynamic_signed>(state.blocksize)))
      fail("blocksize ", state.blocksize, " is not one ", to_string(state.format), " supports");
    std::size_t const code_b = four_bit ? n / 2 + n % 2 : n;
    if (codes.bytes.size() < code_b)
      fail("codes hold ", codes.bytes.size(), " bytes; ", n, " elements need ", code_b);
    std::size_t const blocks = quant::block_count(n, state.blocksize);
    std::size_t const scale_bytes = state.nested ? blocks : 4 * blocks;
    if (absmax.bytes.size() < scale_bytes)
      fail("absmax holds ", absmax.bytes.size(), " bytes; ", blocks, " blocks need ", scale_bytes);
    if (state.nested) {
      if (!quant::valid_block_size<quant::dynamic_signed>(state.nested_blocksize))
        fail("nested_blocksize ", state.nested_blocksize, " is not a power of two in [64, 4096]");
      std::size_t const nested_bytes = 4 * quant::block_count(blocks, state.nested_blocksize);
      if (!nested_absmax || nested_absmax->bytes.size() < nested_bytes)
        fail("nested_absmax holds ", nested_absmax ? nested_absmax->bytes.size() : 0,
             " bytes; the nested scales need ", nested_bytes);
    }
  }

private:
  template <quant::code_type C, float_element T>
  void dequantize_as(exec::host const& e, tensor_view<T> out) const {
    std::size_t const n = numel();
    std::size_t const blocks = quant::block_count(n, state.blocksize);
    tensor_view<std::uint8_t const> const c(
        reinterpret_cast<std::uint8_t const*>(codes.bytes.data()), quant::code_bytes<C>(n));
    if (state.nested) {
      auto const q = absmax.as<std::uint8_t>(blocks);
      auto const a2 = nested_absmax->as<float>(quant::block_count(blocks, state.nested_blocksize));
      float const off = state.nested_offset;
      quant::dequantize_blockwise_nested<C>(e, c, view(q), view(a2),
                                            tensor_view<float const>(&off, 1), state.blocksize,
                                            state.nested_blocksize, out);
    } else {
      auto const a = absmax.as<float>(blocks);
      quant::dequantize_blockwise<C>(e, c, view(a), state.blocksize, out);
    }
  }
};

namespace detail {

//! The table a format's `quant_map` holds, as bnb stores it.
template <std::size_t N>
bool table_equals(tensor_ref t, quant::code_table<N> const& table) {
  if (t.type != dtype::f32 || t.bytes.size() != N * 4)
    return false;
  for (std::size_t i = 0; i < N; ++i) {
    std::uint32_t v = 0;
    std::memcpy(&v, t.bytes.data() + 4 * i, 4);
    if (v != std::bit_cast<std::uint32_t>(table.value[i]))
      return false;
  }
  return true;
}

inline quant::code_table<256> dynamic_signed_table() { return quant::dynamic_signed::book.value; }

//! The `W.quant_map` tensor bitsandbytes writes for format `f`.
inline stored_tensor stored_table(bnb_format f) {
  auto bytes_of = [](std::span<float const> v) {
    auto const b = std::as_bytes(v);
    return std::vector<std::byte>(b.begin(), b.end());
  };
  if (f == bnb_format::nf4)
    return {dtype::f32, {16}, bytes_of(quant::nf4_table.value)};
  if (f == bnb_format::fp4)
    return {dtype::f32, {16}, bytes_of(quant::fp4_stored_table.value)};
  auto const t = dynamic_signed_table();
  return {dtype::f32, {256}, bytes_of(t.value)};
}

//! What read_bnb_weight requires of the tensors of weight `name` whose quant state is `qs`, stored
//! under `qs_key`; the one list of checks its reader and its writer (bnb_weight::check_readable)
//! share. `find(key)` gives the tensor_ref stored under `key`, or nullopt; `fail(args...)` throws
//! with the reason and does not return. Requires: `qs` 1-D U8 holding a valid quant state
//! (bnb_quant_state::parse: its format_error passes through) whose quant_type is the key's; codes
//! of at least the state's code bytes (4-bit: any dtype, quant_storage; int8: U8); absmax F32 (U8
//! when nested) with one element per block; quant_map bitsandbytes' table of the format; when
//! nested, nested_absmax F32 with one element per nested block and nested_quant_map the signed
//! dynamic map; when not, neither of them. Returns the parsed state.
template <class Find, class Fail>
bnb_quant_state check_bnb_tensors(std::string_view name, std::string_view qs_key, tensor_ref qs,
                                  Find const& find, Fail const& fail) {
  if (qs.type != dtype::u8 || qs.shape.size() != 1)
    fail("the quant_state tensor is ", dtype_name(qs.type), " of rank ", qs.shape.size(),
         "; expected 1-D U8");
  auto const state = bnb_quant_state::parse(qs.bytes, qs_key);
  if (!qs_key.ends_with(quant_state_suffix(state.format)))
    fail("quant_type '", to_string(state.format), "' does not match the key ", qs_key);
  std::string const w(name);
  auto need = [&](std::string const& key) -> tensor_ref {
    auto const t = find(key);
    if (!t)
      fail("the tensor '", key, "' is missing");
    return *t;
  };
  std::size_t const n = state.numel();
  bool const four_bit = state.format != bnb_format::int8;
  std::size_t const code_b = four_bit ? n / 2 + n % 2 : n;
  std::size_t const blocks = quant::block_count(n, state.blocksize);

  auto const ce = need(w);
  if (ce.bytes.size() < code_b)
    fail("the codes tensor has ", ce.bytes.size(), " bytes; ", n, " elements need ", code_b);
  if (!four_bit && ce.type != dtype::u8)
    fail("int8 codes are ", dtype_name(ce.type), "; expected U8");

  auto const ae = need(w + ".absmax");
  dtype const absmax_type = state.nested ? dtype::u8 : dtype::f32;
  if (ae.type != absmax_type || ae.numel() != blocks)
    fail("absmax is ", dtype_name(ae.type), " with ", ae.numel(), " elements; expected ",
         dtype_name(absmax_type), " with ", blocks, " (one per block of ", state.blocksize, ")");

  auto const qm = need(w + ".quant_map");
  bool const table_ok = state.format == bnb_format::nf4 ? table_equals(qm, quant::nf4_table)
                        : state.format == bnb_format::fp4
                            ? table_equals(qm, quant::fp4_stored_table)
                            : table_equals(qm, dynamic_signed_table());
  if (!table_ok)
    fail("quant_map is not bitsandbytes' ", to_string(state.format),
         " table; other tables are not supported");

  if (state.nested) {
    auto const ne = need(w + ".nested_absmax");
    std::size_t const nblocks = quant::block_count(blocks, state.nested_blocksize);
    if (ne.type != dtype::f32 || ne.numel() != nblocks)
      fail("nested_absmax is ", dtype_name(ne.type), " with ", ne.numel(),
           " elements; expected F32 with ", nblocks);
    if (!table_equals(need(w + ".nested_quant_map"), dynamic_signed_table()))
      fail("nested_quant_map is not bitsandbytes' signed dynamic map");
  } else if (find(w + ".nested_absmax") || find(w + ".nested_quant_map")) {
    fail("has nested tensors but its quant_state has no nested fields");
  }
  return state;
}

//! True when two quant states describe the same weight (what the reader would make of one is
//! the other): every field, the nested ones only when nested, nested_offset bit for bit (any NaN
//! equals any NaN: the JSON's NaN has no payload).
inline bool same_state(bnb_quant_state const& a, bnb_quant_state const& b) noexcept {
  if (a.format != b.format || a.blocksize != b.blocksize || a.type != b.type ||
      a.shape != b.shape || a.nested != b.nested)
    return false;
  if (!a.nested)
    return true;
  bool const nan = a.nested_offset != a.nested_offset && b.nested_offset != b.nested_offset;
  return a.nested_blocksize == b.nested_blocksize &&
         (nan || std::bit_cast<std::uint32_t>(a.nested_offset) ==
                     std::bit_cast<std::uint32_t>(b.nested_offset));
}

} // namespace detail

inline void bnb_weight::check_readable(char const* function) const {
  auto fail = [&](auto const&... args) {
    qmem::detail::raise(function, ": bnb weight '", name, "': ", args...,
                        " (read_bnb_weight would refuse the file or read another weight)");
  };
  auto const t = tensors();
  detail::check_each_writable(t, fail);
  std::string const qs_key = quant_state_key(name, state.format);
  auto find = [&](std::string_view key) { return detail::find_in(t, key); };
  bnb_quant_state parsed;
  try {
    parsed = detail::check_bnb_tensors(name, qs_key, *find(qs_key), find, fail);
  } catch (format_error const& e) { // bnb_quant_state::parse: state_json is not a valid state
    fail(e.what());
  }
  if (!detail::same_state(parsed, state))
    fail("state_json is ", state_json, " but state is ", state.to_json());
}

//! The quantized-tensor format of a bnb weight.
inline quant::format_desc format_of(bnb_quant_state const& s) noexcept {
  quant::format_desc d{};
  d.code = s.format == bnb_format::nf4   ? quant::code_id::nf4
           : s.format == bnb_format::fp4 ? quant::code_id::fp4
                                         : quant::code_id::dynamic_signed;
  d.block_size = static_cast<std::uint32_t>(s.blocksize);
  d.nested = s.nested;
  d.nested_block = static_cast<std::uint32_t>(s.nested_blocksize);
  return d;
}

inline quant::quantized_tensor bnb_weight::to_quantized(memory::resource& r) const {
  QMEM_EXPECTS(host_accessible(r.space()), "the resource hands out ", to_string(r.space()),
               " memory; expected host-accessible memory");
  check_stored("to_quantized");
  quant::quantized_tensor q(format_of(state), state.type, state.shape, r);
  auto copy = [](auto dst, std::vector<std::byte> const& src) {
    if (dst.size() != 0)
      std::memcpy(dst.data(), src.data(), dst.size_bytes());
  };
  copy(q.codes(), codes.bytes);
  if (state.nested) {
    copy(q.qabsmax(), absmax.bytes);
    copy(q.absmax2(), nested_absmax->bytes);
    q.offset()[0] = state.nested_offset;
  } else {
    copy(q.absmax(), absmax.bytes);
  }
  return q;
}

inline bnb_weight bnb_weight::from_quantized(std::string name, quant::quantized_tensor const& q) {
  auto const code = q.format().code;
  QMEM_EXPECTS(code == quant::code_id::nf4 || code == quant::code_id::fp4 ||
                   code == quant::code_id::dynamic_signed,
               "q has code ", quant::to_string(code),
               "; bitsandbytes checkpoints hold nf4, fp4 or dynamic_signed (int8)");
  QMEM_EXPECTS(host_accessible(q.space()), "q is in ", to_string(q.space()),
               " memory; expected host-accessible memory");
  std::size_t const n = detail::checked_bnb_numel(q.shape(), "bnb_weight::from_quantized");
  QMEM_EXPECTS(n == q.numel(), "q holds ", q.numel(), " elements but its shape has ", n,
               " (a default-constructed quantized_tensor holds none)");
  bnb_weight w;
  w.name = std::move(name);
  w.state.format = code == quant::code_id::nf4   ? bnb_format::nf4
                   : code == quant::code_id::fp4 ? bnb_format::fp4
                                                 : bnb_format::int8;
  w.state.blocksize = q.format().block_size;
  w.state.type = q.original_dtype();
  w.state.shape.assign(q.shape().begin(), q.shape().end());
  w.state.nested = q.format().nested;
  w.state.nested_blocksize = q.format().nested
                                 ? q.format().nested_block
                                 : (w.state.format == bnb_format::int8 ? w.state.blocksize : 256);
  auto bytes_of = [](auto v) {
    auto const b = std::as_bytes(std::span(v.data(), v.size()));
    return std::vector<std::byte>(b.begin(), b.end());
  };
  bool const four_bit = w.state.format != bnb_format::int8;
  w.codes = {dtype::u8,
             four_bit ? std::vector<std::int64_t>{static_cast<std::int64_t>(q.codes().size()), 1}
                      : w.state.shape,
             bytes_of(q.codes())};
  if (w.state.nested) {
    w.state.nested_offset = q.offset()[0];
    w.absmax = {dtype::u8, {static_cast<std::int64_t>(q.qabsmax().size())}, bytes_of(q.qabsmax())};
    w.nested_absmax = stored_tensor{
        dtype::f32, {static_cast<std::int64_t>(q.absmax2().size())}, bytes_of(q.absmax2())};
    auto const nt = detail::dynamic_signed_table();
    w.nested_quant_map =
        stored_tensor{dtype::f32, {256}, bytes_of(std::span<float const>(nt.value))};
  } else {
    w.absmax = {dtype::f32, {static_cast<std::int64_t>(q.absmax().size())}, bytes_of(q.absmax())};
  }
  w.quant_map = detail::stored_table(w.state.format);
  w.state_json = w.state.to_json();
  return w;
}

//! The keys `W` of every bnb-quantized weight in `r` (those with a `W.quant_state.bitsandbytes__*`
//! or `W.quant_state.qmem__int8` tensor), in file order.
inline std::vector<std::string> bnb_weight_names(safetensors_reader const& r) {
  std::vector<std::string> out;
  for (auto const& e : r.tensors())
    for (auto f : {bnb_format::nf4, bnb_format::fp4, bnb_format::int8}) {
      std::string const suffix = quant_state_key("", f);
      if (e.name.size() > suffix.size() && e.name.ends_with(suffix))
        out.push_back(e.name.substr(0, e.name.size() - suffix.size()));
    }
  return out;
}

//! True when `key` is one of the auxiliary tensors of weight `w` (absmax, quant_map, nested_*,
//! quant_state) — the keys a bnb weight owns besides `w` itself.
inline bool is_bnb_aux_key(std::string_view key, std::string_view w) {
  if (key.size() <= w.size() + 1 || !key.starts_with(w) || key[w.size()] != '.')
    return false;
  auto const rest = key.substr(w.size() + 1);
  return rest == "absmax" || rest == "quant_map" || rest == "nested_absmax" ||
         rest == "nested_quant_map" || rest.starts_with("quant_state.");
}

//! Reads and validates the bnb weight `name` of `r`. Throws bad_argument when `r` has no quant
//! state for `name`; format_error when a tensor is missing or has the wrong dtype or size, the
//! quant state is invalid, or a stored table differs from the format's.
inline bnb_weight read_bnb_weight(safetensors_reader const& r, std::string_view name) {
  bnb_weight w;
  w.name = std::string(name);
  tensor_entry const* qs = nullptr;
  for (auto f : {bnb_format::nf4, bnb_format::fp4, bnb_format::int8})
    if ((qs = r.find(quant_state_key(w.name, f))) != nullptr)
      break;
  QMEM_EXPECTS(qs != nullptr, "'", name, "' in ", r.origin(),
               " has no quant_state tensor; it is not a bitsandbytes weight");
  auto fail = [&](auto const&... args) {
    qmem::detail::raise<format_error>(r.origin(), ": weight '", name, "': ", args...);
  };
  auto ref = [&](tensor_entry const& e) { return detail::tensor_ref{e.type, e.shape, r.bytes(e)}; };
  auto find = [&](std::string_view key) -> std::optional<detail::tensor_ref> {
    auto const* e = r.find(key);
    return e ? std::optional(ref(*e)) : std::nullopt;
  };
  w.state = detail::check_bnb_tensors(w.name, qs->name, ref(*qs), find, fail);
  auto const qb = r.bytes(*qs);
  w.state_json.assign(reinterpret_cast<char const*>(qb.data()), qb.size());
  w.codes = stored_tensor::from(r, r.at(w.name));
  w.absmax = stored_tensor::from(r, r.at(w.name + ".absmax"));
  w.quant_map = stored_tensor::from(r, r.at(w.name + ".quant_map"));
  if (w.state.nested) {
    w.nested_absmax = stored_tensor::from(r, r.at(w.name + ".nested_absmax"));
    w.nested_quant_map = stored_tensor::from(r, r.at(w.name + ".nested_quant_map"));
  }
  return w;
}

//! Quantizes `x` (a weight of shape `shape`, numel == x.size()) in format `f` with blocks of
//! `blocksize`, optionally double-quantizing the scales, into exactly the tensors bitsandbytes and
//! transformers save (qmem's int8 layout for int8). `original` is the dtype recorded in the quant
//! state (normally dtype_of_v<T>). Preconditions: a valid block size for the format (4-bit: power
//! of two in [32, 4096]; int8: [64, 4096]), a shape whose product is x.size() and that the reader
//! accepts (dimensions in [0, 2^48], running product at most 2^48: max_bnb_elements), a floating
//! `original`, `x` in host-accessible memory, aligned and non-null when non-empty (as
//! quant::quantize_blockwise checks it); throws bad_argument otherwise.
template <float_element T>
[[nodiscard]] bnb_weight quantize_bnb(exec::host const& e, std::string name, bnb_format f,
                                      tensor_view<T const> x, std::vector<std::int64_t> shape,
                                      std::size_t blocksize, bool nested,
                                      dtype original = dtype_of_v<T>) {
  std::size_t const n = detail::checked_bnb_numel(shape, "quantize_bnb");
  QMEM_EXPECTS(n == x.size(), "shape has ", n, " elements; x has ", x.size());
  QMEM_EXPECTS(!torch_dtype_name(original).empty(), "original dtype ", dtype_name(original),
               " is not a floating dtype");
  bool const four_bit = f != bnb_format::int8;
  if (four_bit)
    QMEM_EXPECTS(quant::valid_block_size<quant::nf4>(blocksize), "blocksize is ", blocksize,
                 "; expected a power of two in [32, 4096] for ", to_string(f));
  else
    QMEM_EXPECTS(quant::valid_block_size<quant::dynamic_signed>(blocksize), "blocksize is ",
                 blocksize, "; expected a power of two in [64, 4096] for int8");

  bnb_weight w;
  w.name = std::move(name);
  w.state.format = f;
  w.state.blocksize = blocksize;
  w.state.type = original;
  w.state.shape = std::move(shape);
  w.state.nested = nested;
  w.state.nested_blocksize = four_bit ? 256 : blocksize;

  std::size_t const blocks = quant::block_count(n, blocksize);
  std::size_t const code_b = four_bit ? n / 2 + n % 2 : n;
  std::vector<std::uint8_t> codes(code_b);
  std::vector<float> absmax(blocks);
  switch (f) {
  case bnb_format::nf4:
    quant::quantize_blockwise<quant::nf4>(e, x, blocksize, view(codes), view(absmax));
    break;
  case bnb_format::fp4:
    quant::quantize_blockwise<quant::fp4>(e, x, blocksize, view(codes), view(absmax));
    break;
  case bnb_format::int8:
    quant::quantize_blockwise<quant::dynamic_signed>(e, x, blocksize, view(codes), view(absmax));
    break;
  }
  auto bytes_of = [](auto const& v) {
    auto const b = std::as_bytes(std::span(v));
    return std::vector<std::byte>(b.begin(), b.end());
  };
  w.codes = {dtype::u8,
             four_bit ? std::vector<std::int64_t>{static_cast<std::int64_t>(code_b), 1}
                      : w.state.shape,
             bytes_of(codes)};
  if (nested) {
    std::vector<std::uint8_t> q(blocks);
    std::vector<float> a2(quant::block_count(blocks, w.state.nested_blocksize));
    float off = 0.0f;
    quant::quantize_scales(e, tensor_view<float const>(view(absmax)), w.state.nested_blocksize,
                           view(q), view(a2), tensor_view<float>(&off, 1));
    w.state.nested_offset = off;
    w.absmax = {dtype::u8, {static_cast<std::int64_t>(blocks)}, bytes_of(q)};
    w.nested_absmax =
        stored_tensor{dtype::f32, {static_cast<std::int64_t>(a2.size())}, bytes_of(a2)};
    auto const nt = detail::dynamic_signed_table();
    w.nested_quant_map = stored_tensor{dtype::f32, {256}, bytes_of(nt.value)};
  } else {
    w.absmax = {dtype::f32, {static_cast<std::int64_t>(blocks)}, bytes_of(absmax)};
  }
  w.quant_map = detail::stored_table(f);
  w.state_json = w.state.to_json();
  return w;
}

} // namespace qmem::io
