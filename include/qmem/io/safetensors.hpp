#pragma once
//! \file
//! safetensors files: a validating, memory-mapped reader and an atomic writer (whole-file and
//! streaming).
//!
//! The format (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
//! N, N bytes of JSON, then the data section. The JSON maps each tensor name to
//! `{"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}` (offsets relative to the data
//! section) and may hold `"__metadata__"`, a string -> string map.
//!
//! The reader validates the whole header before anyone can see a tensor, and throws
//! qmem::format_error on: a header length beyond the file or above 100,000,000 bytes (the
//! reference implementation's limit); a header whose first
//! byte is not `{` (as the reference implementation; trailing spaces are padding and allowed);
//! JSON that does not parse, nests deeper than the format needs, or repeats a key; an entry that is not an object with
//! exactly the keys `dtype`, `shape`, `data_offsets`; an unknown dtype name; a shape entry that is
//! not a non-negative integer, or whose product (times the dtype size) overflows 64 bits;
//! offsets that are not two non-negative integers with begin <= end; a byte size different from
//! numel x dtype size; an empty tensor name; `__metadata__` that is not string -> string.
//! Sorted by offset, the tensors must tile the data section exactly: the first begins at 0, each
//! begins where the previous ends, the last ends at the end of the file. This is what the reference
//! implementation writes and what its own validation requires; a file with gaps, overlaps or
//! trailing bytes is rejected (it is either corrupt or hiding data).
//!
//! The writer writes what the reference implementation writes for the same tensors: compact JSON,
//! `__metadata__` first (when there is any), tensors in data order, the header padded with spaces
//! to a multiple of 8 bytes. Files are written atomically (see detail::atomic_file).
//!
//! Dependency: this header (and everything in qmem/io) needs nlohmann-json 3 (Debian:
//! nlohmann-json3-dev; CMake: link nlohmann_json::nlohmann_json). The rest of qmem does not.
//! Tensor bytes are little-endian, as the format specifies; qmem/io supports little-endian hosts.

#include <qmem/core/error.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/io/detail/file.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

static_assert(std::endian::native == std::endian::little,
              "qmem/io reads and writes little-endian tensor bytes and needs a little-endian host");

namespace qmem::io {

//! The string -> string `__metadata__` map of a safetensors file.
using metadata_map = std::map<std::string, std::string, std::less<>>;

//! One tensor of a safetensors file: its name, element type, shape and where its bytes are in the
//! data section.
struct tensor_entry {
  std::string name;
  dtype type = dtype::u8;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0; //!< first byte in the data section
  std::uint64_t end = 0;   //!< one past the last byte in the data section

  //! The element count (1 for a scalar of shape []).
  [[nodiscard]] std::size_t numel() const noexcept {
    std::size_t n = 1;
    for (auto d : shape)
      n *= static_cast<std::size_t>(d);
    return n;
  }
  //! The byte size, numel() x dtype_size(type) (== end - begin in a validated file).
  [[nodiscard]] std::size_t nbytes() const noexcept { return numel() * dtype_size(type); }
};

//! What the writers need to know about a tensor before its bytes: name, dtype and shape.
struct tensor_spec {
  std::string name;
  dtype type = dtype::u8;
  std::vector<std::int64_t> shape;
};

namespace detail {

//! The header length bound, the reference implementation's MAX_HEADER_SIZE (100,000,000 bytes,
//! decimal; its HeaderTooLarge error): headers of real checkpoints are well under 10 MB. The
//! writers refuse a header above it, so that what qmem writes every reader loads.
inline constexpr std::uint64_t max_header_bytes = 100'000'000;

//! The deepest JSON nesting a valid header has: top object (0) > entry (1) > shape array (2) >
//! element (3).
inline constexpr int max_header_depth = 3;

//! The rank of a dtype in the reference writer's order (its Dtype enum: BOOL < U8 < I8 < F8_E5M2 <
//! F8_E4M3 < I16 < U16 < F16 < BF16 < I32 < U32 < F32 < F64 < I64 < U64). It writes tensors by
//! descending rank, then by name, so wider types come first and stay aligned.
constexpr int reference_rank(dtype t) noexcept {
  switch (t) {
  case dtype::boolean: return 0;
  case dtype::u8: return 1;
  case dtype::i8: return 2;
  case dtype::f8_e5m2: return 3;
  case dtype::f8_e4m3: return 4;
  case dtype::i16: return 5;
  case dtype::u16: return 6;
  case dtype::f16: return 7;
  case dtype::bf16: return 8;
  case dtype::i32: return 9;
  case dtype::u32: return 10;
  case dtype::f32: return 11;
  case dtype::f64: return 12;
  case dtype::i64: return 13;
  case dtype::u64: return 14;
  }
  return 0;
}

//! numel x dtype size, or nullopt when a dimension is negative or the product overflows.
inline std::optional<std::uint64_t> checked_nbytes(std::span<std::int64_t const> shape,
                                                   dtype t) noexcept {
  std::uint64_t n = dtype_size(t);
  for (auto d : shape) {
    if (d < 0)
      return std::nullopt;
    auto const u = static_cast<std::uint64_t>(d);
    if (u != 0 && n > std::numeric_limits<std::uint64_t>::max() / u)
      return std::nullopt;
    n *= u;
  }
  return n;
}

//! What every writer requires of one tensor of `nbytes` bytes, whatever else it holds: a
//! non-empty name other than __metadata__, a shape of non-negative dimensions whose byte count
//! (numel x dtype size) does not overflow and equals `nbytes`. Throws bad_argument.
inline void check_writable(std::string_view name, dtype type, std::span<std::int64_t const> shape,
                           std::size_t nbytes) {
  QMEM_EXPECTS(!name.empty() && name != "__metadata__", "tensor name '", name,
               "' is reserved or empty");
  auto const n = checked_nbytes(shape, type);
  QMEM_EXPECTS(n.has_value(), "tensor '", name, "' has a negative or overflowing shape");
  QMEM_EXPECTS(*n == nbytes, "tensor '", name, "' has ", nbytes, " bytes; its shape and dtype ",
               dtype_name(type), " need ", *n);
}

//! Writes `s` as a JSON string (quoted and escaped as serde_json and nlohmann do: `"`, `\`, and
//! control characters; UTF-8 passes through). Throws bad_argument for invalid UTF-8.
inline void append_json_string(std::string& out, std::string_view s) {
  try {
    out += nlohmann::json(std::string(s)).dump();
  } catch (nlohmann::json::exception const&) {
    qmem::detail::raise("safetensors: the string '", s, "' is not valid UTF-8");
  }
}

//! The header JSON (unpadded) for entries already carrying offsets, in their order.
inline std::string header_json(std::span<tensor_entry const> entries, metadata_map const& meta) {
  std::string h = "{";
  bool first = true;
  if (!meta.empty()) {
    h += "\"__metadata__\":{";
    bool first_meta = true;
    for (auto const& [k, v] : meta) {
      if (!first_meta)
        h += ',';
      first_meta = false;
      append_json_string(h, k);
      h += ':';
      append_json_string(h, v);
    }
    h += '}';
    first = false;
  }
  for (auto const& e : entries) {
    if (!first)
      h += ',';
    first = false;
    append_json_string(h, e.name);
    h += ":{\"dtype\":\"";
    h += dtype_name(e.type);
    h += "\",\"shape\":[";
    for (std::size_t i = 0; i < e.shape.size(); ++i) {
      if (i != 0)
        h += ',';
      h += std::to_string(e.shape[i]);
    }
    h += "],\"data_offsets\":[";
    h += std::to_string(e.begin);
    h += ',';
    h += std::to_string(e.end);
    h += "]}";
  }
  h += '}';
  return h;
}

//! Checks specs (unique non-empty names, not `__metadata__`, non-negative shapes without
//! overflow) and lays them out back to back in the given order.
inline std::vector<tensor_entry> layout(std::span<tensor_spec const> specs, char const* function) {
  std::vector<tensor_entry> out;
  out.reserve(specs.size());
  std::set<std::string_view> names;
  std::uint64_t offset = 0;
  for (auto const& s : specs) {
    if (s.name.empty() || s.name == "__metadata__")
      qmem::detail::raise(function, ": tensor name '", s.name,
                          "' is reserved or empty; expected a non-empty name other than "
                          "__metadata__");
    if (!names.insert(s.name).second)
      qmem::detail::raise(function, ": tensor name '", s.name, "' appears twice");
    auto const n = checked_nbytes(s.shape, s.type);
    if (!n)
      qmem::detail::raise(function, ": tensor '", s.name,
                          "' has a negative dimension or a byte size that overflows 64 bits");
    if (offset > std::numeric_limits<std::uint64_t>::max() - *n)
      qmem::detail::raise(function, ": the tensors' total size overflows 64 bits");
    out.push_back(tensor_entry{s.name, s.type, s.shape, offset, offset + *n});
    offset += *n;
  }
  return out;
}

} // namespace detail

//! Sorts specs into the order the reference implementation writes: by dtype, widest first (see
//! detail::reference_rank), then by name. Writing in this order gives byte-identical files.
inline void sort_reference_order(std::vector<tensor_spec>& specs) {
  std::ranges::stable_sort(specs, [](tensor_spec const& a, tensor_spec const& b) {
    int const ra = detail::reference_rank(a.type), rb = detail::reference_rank(b.type);
    return ra != rb ? ra > rb : a.name < b.name;
  });
}

//! A validated safetensors file: the tensor table, the metadata, and the tensors' bytes through a
//! read-only memory mapping (or a caller's buffer, see `parse`). Reading a tensor touches only its
//! pages. Not copyable; movable. Thread-safe for concurrent reads.
class safetensors_reader {
  detail::mapped_file file_;
  std::span<std::byte const> bytes_;  // the whole file
  std::span<std::byte const> data_;   // the data section
  std::vector<tensor_entry> entries_; // sorted by offset
  std::unordered_map<std::string_view, std::size_t> index_;
  metadata_map metadata_;
  std::uint64_t header_bytes_ = 0;
  std::string origin_;

public:
  //! Memory-maps and validates `file`. Throws io_error when the file cannot be opened or mapped,
  //! format_error when its contents are not a valid safetensors file (see the file comment).
  explicit safetensors_reader(std::filesystem::path const& file)
      : file_(file), bytes_(file_.bytes()), origin_(file.string()) {
    validate();
  }

  //! Validates `bytes` as a safetensors file without copying it. The caller keeps `bytes` alive
  //! and unchanged while the reader is used. Throws format_error like the constructor; `origin`
  //! names the source in messages.
  [[nodiscard]] static safetensors_reader parse(std::span<std::byte const> bytes,
                                                std::string origin = "<memory>") {
    return safetensors_reader(bytes, std::move(origin));
  }

  safetensors_reader(safetensors_reader&&) noexcept = default;
  safetensors_reader& operator=(safetensors_reader&&) noexcept = default;
  safetensors_reader(safetensors_reader const&) = delete;
  safetensors_reader& operator=(safetensors_reader const&) = delete;

  //! Every tensor, ordered by offset in the data section.
  [[nodiscard]] std::span<tensor_entry const> tensors() const noexcept { return entries_; }
  //! The tensor named `name`, or nullptr. O(1).
  [[nodiscard]] tensor_entry const* find(std::string_view name) const noexcept {
    auto const it = index_.find(name);
    return it == index_.end() ? nullptr : &entries_[it->second];
  }
  //! The tensor named `name`. Throws bad_argument naming the key when there is none.
  [[nodiscard]] tensor_entry const& at(std::string_view name) const {
    auto const* e = find(name);
    QMEM_EXPECTS(e != nullptr, "no tensor named '", name, "' in ", origin_);
    return *e;
  }
  [[nodiscard]] bool contains(std::string_view name) const noexcept {
    return find(name) != nullptr;
  }
  //! The `__metadata__` map (empty when the file has none).
  [[nodiscard]] metadata_map const& metadata() const noexcept { return metadata_; }
  //! The JSON header length N (the file's first 8 bytes).
  [[nodiscard]] std::uint64_t header_size() const noexcept { return header_bytes_; }
  //! The size of the data section, which the tensors tile exactly.
  [[nodiscard]] std::uint64_t data_size() const noexcept { return data_.size(); }
  //! The path (or origin string) the reader was made from.
  [[nodiscard]] std::string const& origin() const noexcept { return origin_; }

  //! The bytes of `t`, which must be an entry of this reader (an entry from elsewhere whose range
  //! is outside this file's data section gives an empty span).
  [[nodiscard]] std::span<std::byte const> bytes(tensor_entry const& t) const noexcept {
    if (t.begin > t.end || t.end > data_.size())
      return {};
    return data_.subspan(static_cast<std::size_t>(t.begin),
                         static_cast<std::size_t>(t.end - t.begin));
  }

  //! Tells the kernel the data will be read front to back once (no-op for `parse`d buffers).
  void advise_sequential() const noexcept { file_.advise_sequential(); }

  //! Drops `t`'s resident pages from memory (file-backed readers only; a no-op for `parse`d
  //! buffers). Reading `t` again re-reads them from the file or the page cache.
  void release(tensor_entry const& t) const noexcept {
    if (t.begin > t.end || t.end > data_.size() || file_.bytes().empty())
      return;
    auto const data_offset = static_cast<std::size_t>(data_.data() - bytes_.data());
    file_.release(data_offset + static_cast<std::size_t>(t.begin),
                  static_cast<std::size_t>(t.end - t.begin));
  }

  //! A copy of tensor `name`. Throws bad_argument when there is no such tensor or its dtype is
  //! not `dtype_of_v<T>`.
  template <class T>
  requires(has_dtype_v<T> && !std::same_as<T, bool>) // std::vector<bool> is not contiguous
      [[nodiscard]] std::vector<T> read(std::string_view name) const {
    auto const& e = checked_entry<T>(name, "read");
    std::vector<T> out(e.numel());
    if (!out.empty())
      std::memcpy(out.data(), bytes(e).data(), e.nbytes());
    return out;
  }

  //! Copies tensor `name` into `out`. Preconditions: the tensor exists, its dtype is
  //! `dtype_of_v<T>`, `out` has exactly numel() elements in host-accessible memory, aligned and
  //! non-null. Throws bad_argument otherwise, before writing anything. For T = bool, throws
  //! format_error (before writing anything) when a stored byte is neither 0 nor 1: such a byte is
  //! not a bool value (reading it as one is undefined behaviour).
  template <class T>
  requires(has_dtype_v<T> && !std::is_const_v<T>) void read_into(std::string_view name,
                                                                 tensor_view<T> out) const {
    auto const& e = checked_entry<T>(name, "read_into");
    QMEM_EXPECTS(out.size() == e.numel(), "out has ", out.size(), " elements; tensor '", name,
                 "' has ", e.numel());
    check_view(out, "read_into", "out", true, false);
    if constexpr (std::same_as<T, bool>) {
      auto const b = bytes(e);
      for (std::size_t i = 0; i < b.size(); ++i)
        if (auto const v = std::to_integer<unsigned>(b[i]); v > 1)
          fail("BOOL tensor '", name, "' holds the byte ", v, " at element ", i,
               "; expected 0 or 1");
    }
    if (!out.empty())
      std::memcpy(out.data(), bytes(e).data(), e.nbytes());
  }

private:
  safetensors_reader(std::span<std::byte const> bytes, std::string origin)
      : bytes_(bytes), origin_(std::move(origin)) {
    validate();
  }

  template <class T>
  tensor_entry const& checked_entry(std::string_view name, char const* function) const {
    auto const* e = find(name);
    if (e == nullptr)
      qmem::detail::raise(function, ": no tensor named '", name, "' in ", origin_);
    if (e->type != dtype_of_v<T>)
      qmem::detail::raise(function, ": tensor '", name, "' is ", dtype_name(e->type),
                          "; the requested element type is ", dtype_name(dtype_of_v<T>));
    return *e;
  }

  template <class... Args>
  [[noreturn]] void fail(Args const&... args) const {
    qmem::detail::raise<format_error>(origin_, ": not a valid safetensors file: ", args...);
  }

  void validate() {
    using json = nlohmann::json;
    if (bytes_.size() < 8)
      fail("the file is ", bytes_.size(), " bytes, shorter than the 8-byte header length");
    std::uint64_t n = 0;
    std::memcpy(&n, bytes_.data(), 8);
    if (n > bytes_.size() - 8)
      fail("the header length ", n, " runs past the end of the file (", bytes_.size(), " bytes)");
    if (n > detail::max_header_bytes)
      fail("the header length ", n, " is above the ", detail::max_header_bytes, "-byte limit");
    header_bytes_ = n;
    auto const* hb = reinterpret_cast<char const*>(bytes_.data() + 8);
    data_ = bytes_.subspan(8 + static_cast<std::size_t>(n));
    // The reference implementation refuses a header whose first byte is not '{'
    // (InvalidHeaderStart); trailing spaces (the writers' padding) parse as JSON whitespace.
    if (n == 0 || hb[0] != '{')
      fail("the header does not start with '{'");

    // Parse with a callback that rejects duplicate keys (nlohmann keeps the last silently) and
    // nesting deeper than the format needs (bounds work on hostile input).
    std::vector<std::set<std::string>> keys;
    std::string problem;
    auto const callback = [&](int depth, json::parse_event_t event, json& parsed) -> bool {
      if (depth > detail::max_header_depth + 1)
        throw format_error("nesting deeper than " + std::to_string(detail::max_header_depth));
      switch (event) {
      case json::parse_event_t::object_start: keys.emplace_back(); break;
      case json::parse_event_t::object_end:
        if (!keys.empty())
          keys.pop_back();
        break;
      case json::parse_event_t::key:
        if (!keys.empty() && !keys.back().insert(parsed.get<std::string>()).second)
          throw format_error("the key '" + parsed.get<std::string>() + "' appears twice");
        break;
      default: break;
      }
      return true;
    };
    json header;
    try {
      header = json::parse(hb, hb + n, callback);
    } catch (format_error const& e) {
      fail("header JSON: ", e.what());
    } catch (json::exception const& e) {
      fail("header JSON does not parse: ", e.what());
    }
    if (!header.is_object())
      fail("the header is not a JSON object");

    for (auto const& [key, value] : header.items()) {
      if (key == "__metadata__") {
        if (!value.is_object())
          fail("__metadata__ is not an object");
        for (auto const& [mk, mv] : value.items()) {
          if (!mv.is_string())
            fail("__metadata__ entry '", mk, "' is not a string");
          metadata_.emplace(mk, mv.get<std::string>());
        }
        continue;
      }
      entries_.push_back(parse_entry(key, value));
    }

    std::ranges::sort(entries_, [](tensor_entry const& a, tensor_entry const& b) {
      return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
    });
    std::uint64_t expected = 0;
    for (auto const& e : entries_) {
      if (e.begin != expected)
        fail("tensor '", e.name, "' begins at data offset ", e.begin, "; expected ", expected,
             e.begin < expected ? " (it overlaps the previous tensor)"
                                : " (there is a gap before it)");
      expected = e.end;
    }
    if (expected != data_.size())
      fail("the tensors end at data offset ", expected, " but the data section is ", data_.size(),
           " bytes");
    index_.reserve(entries_.size());
    for (std::size_t i = 0; i < entries_.size(); ++i)
      index_.emplace(entries_[i].name, i);
  }

  tensor_entry parse_entry(std::string const& key, nlohmann::json const& v) const {
    if (key.empty())
      fail("a tensor has an empty name");
    if (!v.is_object())
      fail("the entry of tensor '", key, "' is not an object");
    for (auto const& [field, _] : v.items())
      if (field != "dtype" && field != "shape" && field != "data_offsets")
        fail("tensor '", key, "' has an unknown field '", field, "'");
    auto const dt = v.find("dtype");
    auto const sh = v.find("shape");
    auto const off = v.find("data_offsets");
    if (dt == v.end() || sh == v.end() || off == v.end())
      fail("tensor '", key, "' lacks one of dtype, shape, data_offsets");
    tensor_entry e;
    e.name = key;
    if (!dt->is_string() || !parse_dtype(dt->get_ref<std::string const&>(), e.type))
      fail("tensor '", key, "' has dtype ", dt->dump(),
           "; expected one of F64 F32 F16 BF16 "
           "F8_E4M3 F8_E5M2 I64 I32 I16 I8 U64 U32 U16 U8 BOOL");
    if (!sh->is_array())
      fail("tensor '", key, "' has a shape that is not an array");
    for (auto const& d : *sh) {
      if (!d.is_number_unsigned()) // negative integers, floats, strings, ...
        fail("tensor '", key, "' has shape ", sh->dump(),
             "; expected non-negative integer dimensions");
      if (d.get<std::uint64_t>() >
          static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()))
        fail("tensor '", key, "' has a dimension above 2^63 - 1");
      e.shape.push_back(d.get<std::int64_t>());
    }
    auto const nb = detail::checked_nbytes(e.shape, e.type);
    if (!nb)
      fail("tensor '", key, "' has shape ", sh->dump(), " whose byte size overflows 64 bits");
    if (!off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
        !(*off)[1].is_number_unsigned())
      fail("tensor '", key, "' has data_offsets ", off->dump(),
           "; expected two non-negative integers");
    e.begin = (*off)[0].get<std::uint64_t>();
    e.end = (*off)[1].get<std::uint64_t>();
    if (e.begin > e.end)
      fail("tensor '", key, "' has data_offsets [", e.begin, ", ", e.end, "]: begin after end");
    if (e.end > data_.size())
      fail("tensor '", key, "' ends at data offset ", e.end, ", past the data section (",
           data_.size(), " bytes)");
    if (e.end - e.begin != *nb)
      fail("tensor '", key, "' spans ", e.end - e.begin, " bytes; its shape ", sh->dump(), " of ",
           dtype_name(e.type), " needs ", *nb);
    return e;
  }
};

//! Writes a safetensors file one tensor after another, holding at most the caller's current chunk
//! in memory: declare every tensor up front (the header needs all offsets), then pass the bytes
//! of the tensors in the declared order, in one or several `write` calls each, then `commit()`.
//! The file appears under its name only on commit (atomic replace); destroying the writer before
//! commit removes the partial file.
class safetensors_stream_writer {
  detail::atomic_file file_;
  std::vector<tensor_entry> entries_;
  std::uint64_t written_ = 0; // bytes of the data section written so far
  std::uint64_t total_ = 0;

public:
  //! Creates the temporary file and writes the header for `specs`, laid out in the given order
  //! (call sort_reference_order first to match the reference writer). Throws bad_argument for an
  //! empty, reserved or duplicate name, a negative shape, a size overflow, a non-UTF-8 string or
  //! a header above detail::max_header_bytes (before creating anything); io_error when the file
  //! cannot be created or written.
  safetensors_stream_writer(std::filesystem::path const& path, std::span<tensor_spec const> specs,
                            metadata_map const& metadata = {})
      : safetensors_stream_writer(path, prepare(specs, metadata)) {}

  //! The declared tensors with their offsets, in data order.
  [[nodiscard]] std::span<tensor_entry const> tensors() const noexcept { return entries_; }
  //! Index of the first tensor not yet completely written (== tensors().size() when all are).
  [[nodiscard]] std::size_t current() const noexcept {
    auto const it =
        std::ranges::find_if(entries_, [&](tensor_entry const& e) { return e.end > written_; });
    return static_cast<std::size_t>(it - entries_.begin());
  }
  //! Bytes of the data section still to write.
  [[nodiscard]] std::uint64_t remaining() const noexcept { return total_ - written_; }

  //! Appends the next `bytes` of the data section (the current tensor's, possibly continuing into
  //! the following ones). Throws bad_argument when that would exceed the declared total (nothing
  //! is written then), io_error on a write failure: part of `bytes` may have reached the file
  //! then, so the writer discards it, and every later write or commit throws bad_argument (the
  //! target keeps its old contents; retrying would have committed the part twice).
  void write(std::span<std::byte const> bytes) {
    QMEM_EXPECTS(bytes.size() <= remaining(), "writing ", bytes.size(), " bytes to '",
                 file_.target().string(), "' exceeds the ", remaining(),
                 " bytes the declared tensors have left");
    try {
      file_.write(bytes);
    } catch (...) {
      file_.discard();
      throw;
    }
    written_ += bytes.size();
  }

  //! Writes the whole tensor `name`, which must be the next one in data order and have
  //! `dtype_of_v<T>` and exactly `values.size()` elements. Throws bad_argument otherwise.
  template <class T>
  requires has_dtype_v<T>
  void write(std::string_view name, std::span<T const> values) {
    auto const found = std::ranges::find(entries_, name, &tensor_entry::name);
    QMEM_EXPECTS(found != entries_.end(), "no tensor named '", name, "' was declared");
    auto const* e = &*found;
    QMEM_EXPECTS(e->type == dtype_of_v<T>, "tensor '", name, "' was declared ", dtype_name(e->type),
                 "; the values are ", dtype_name(dtype_of_v<T>));
    QMEM_EXPECTS(values.size() == e->numel(), "tensor '", name, "' was declared with ", e->numel(),
                 " elements; got ", values.size());
    if (e->begin == e->end)
      return; // an empty tensor has no bytes; it may be "written" at any time
    QMEM_EXPECTS(e->begin == written_, "tensor '", name, "' is not next: ",
                 e->begin < written_ ? "it was written already" : "earlier tensors are missing",
                 current() < entries_.size() ? "; the next is '" + entries_[current()].name + "'"
                                             : std::string("; every declared tensor is written"));
    write(std::as_bytes(values));
  }

  //! Checks every declared byte was written, flushes and renames the file into place. Throws
  //! bad_argument when bytes are missing (the file is then discarded) or the writer was committed
  //! or discarded before, io_error on failure.
  void commit() {
    QMEM_EXPECTS(file_.open(), "'", file_.target().string(),
                 "' was committed already, or discarded after a failed write");
    if (written_ != total_) {
      file_.discard();
      qmem::detail::raise("safetensors_stream_writer::commit: '", file_.target().string(), "' has ",
                          written_, " of ", total_, " data bytes written");
    }
    file_.commit();
  }

private:
  struct prepared {
    std::vector<tensor_entry> entries;
    std::string header; // padded
  };

  // Lays out and serializes everything that can fail on bad input, before any file exists.
  static prepared prepare(std::span<tensor_spec const> specs, metadata_map const& metadata) {
    prepared p{detail::layout(specs, "safetensors_stream_writer"), {}};
    p.header = detail::header_json(p.entries, metadata);
    p.header.append((8 - p.header.size() % 8) % 8, ' ');
    if (p.header.size() > detail::max_header_bytes)
      qmem::detail::raise("safetensors_stream_writer: the header of ", specs.size(),
                          " tensors and ", metadata.size(), " metadata entries is ",
                          p.header.size(), " bytes; readers refuse more than ",
                          detail::max_header_bytes);
    return p;
  }

  safetensors_stream_writer(std::filesystem::path const& path, prepared p)
      : file_(path), entries_(std::move(p.entries)) {
    total_ = entries_.empty() ? 0 : entries_.back().end;
    std::uint64_t const n = p.header.size();
    std::byte len[8];
    std::memcpy(len, &n, 8);
    file_.write(len);
    file_.write(std::as_bytes(std::span(p.header)));
  }
};

//! Collects tensors in memory and writes them as one safetensors file, atomically. For files
//! larger than memory use safetensors_stream_writer.
class safetensors_writer {
  struct item {
    tensor_spec spec;
    std::vector<std::byte> bytes;
  };
  std::vector<item> items_;
  std::set<std::string, std::less<>> names_; //!< the names of items_, so add stays O(log n)
  metadata_map metadata_;

public:
  //! How `save` orders the tensors in the data section.
  enum class order {
    reference, //!< as the reference implementation does (dtype widest first, then name)
    as_added   //!< in the order of the `add` calls
  };

  //! Sets a `__metadata__` entry.
  void set_metadata(std::string key, std::string value) {
    metadata_.insert_or_assign(std::move(key), std::move(value));
  }
  [[nodiscard]] metadata_map const& metadata() const noexcept { return metadata_; }

  //! Adds a copy of raw tensor bytes. Preconditions: a new non-empty name (not __metadata__),
  //! a non-negative shape, and `bytes.size()` == numel x dtype_size(type). Throws bad_argument.
  void add(std::string name, dtype type, std::vector<std::int64_t> shape,
           std::span<std::byte const> bytes) {
    check_new(name, type, shape, bytes.size());
    auto const slot = names_.insert(name).first;
    try {
      items_.push_back(item{tensor_spec{std::move(name), type, std::move(shape)},
                            std::vector<std::byte>(bytes.begin(), bytes.end())});
    } catch (...) {
      names_.erase(slot);
      throw;
    }
  }

  //! Adds a copy of every tensor of `tensors`, or none: each must meet add's preconditions, and
  //! their names must differ from each other. Throws bad_argument (or bad_alloc) with the writer
  //! unchanged.
  void add_all(std::span<std::pair<tensor_spec, std::span<std::byte const>> const> tensors) {
    check_new_all(tensors);
    std::size_t const before = items_.size();
    items_.reserve(before + tensors.size());
    try {
      for (auto const& [spec, bytes] : tensors) {
        names_.insert(spec.name);
        items_.push_back(item{spec, std::vector<std::byte>(bytes.begin(), bytes.end())});
      }
    } catch (...) {
      for (auto const& t : tensors) // none of them was there before (check_new_all)
        names_.erase(t.first.name);
      items_.erase(items_.begin() + static_cast<std::ptrdiff_t>(before), items_.end());
      throw;
    }
  }

  //! Throws bad_argument unless add_all(tensors) would add them all; changes nothing.
  void
  check_new_all(std::span<std::pair<tensor_spec, std::span<std::byte const>> const> tensors) const {
    std::set<std::string_view> seen;
    for (auto const& [spec, bytes] : tensors) {
      check_new(spec.name, spec.type, spec.shape, bytes.size());
      QMEM_EXPECTS(seen.insert(spec.name).second, "tensor name '", spec.name,
                   "' appears twice among the tensors to add");
    }
  }

  //! True when a tensor named `name` was added.
  [[nodiscard]] bool contains(std::string_view name) const noexcept {
    return names_.contains(name);
  }

  //! Adds a copy of typed values with the given shape (numel must equal values.size()).
  template <class T>
  requires has_dtype_v<T>
  void add(std::string name, std::vector<std::int64_t> shape, std::span<T const> values) {
    add(std::move(name), dtype_of_v<T>, std::move(shape), std::as_bytes(values));
  }

  //! Number of tensors added.
  [[nodiscard]] std::size_t size() const noexcept { return items_.size(); }

private:
  // add's preconditions for a tensor of `nbytes` bytes (bad_argument).
  void check_new(std::string_view name, dtype type, std::span<std::int64_t const> shape,
                 std::size_t nbytes) const {
    detail::check_writable(name, type, shape, nbytes);
    QMEM_EXPECTS(!contains(name), "tensor name '", name, "' was already added");
  }

public:
  //! Writes the file atomically. Throws bad_argument for a non-UTF-8 name or metadata string or a
  //! header above detail::max_header_bytes (before creating anything), io_error on failure.
  void save(std::filesystem::path const& path, order o = order::reference) const {
    std::vector<std::size_t> perm(items_.size());
    for (std::size_t i = 0; i < perm.size(); ++i)
      perm[i] = i;
    if (o == order::reference)
      std::ranges::stable_sort(perm, [&](std::size_t a, std::size_t b) {
        auto const& sa = items_[a].spec;
        auto const& sb = items_[b].spec;
        int const ra = detail::reference_rank(sa.type), rb = detail::reference_rank(sb.type);
        return ra != rb ? ra > rb : sa.name < sb.name;
      });
    std::vector<tensor_spec> specs;
    specs.reserve(perm.size());
    for (auto i : perm)
      specs.push_back(items_[i].spec);
    safetensors_stream_writer w(path, specs, metadata_);
    for (auto i : perm)
      w.write(items_[i].bytes);
    w.commit();
  }
};

} // namespace qmem::io
