// libFuzzer target for the safetensors reader and the bitsandbytes checkpoint readers (4-bit and
// blockwise weights, io/bnb.hpp; LLM.int8 weights, io/bnb_int8.hpp): any byte string must either
// be rejected with a qmem::error or give a reader whose every promise holds (tensors tile the data
// section, bytes() stays inside the input, reads return numel elements, a weight's tensors() are
// the bytes it was read from, weights dequantize without touching memory they do not own). Any
// other exception, crash, sanitizer report, leak or broken invariant is a finding.
//
// Build and run: tests/fuzz/run.sh SECONDS (clang with -fsanitize=fuzzer,address,undefined).
#include <qmem/io.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

namespace {

void require(bool ok) {
  if (!ok)
    std::abort();
}

//! A weight read from `r` (bnb_weight or int8_weight): every tensor it would write is the tensor
//! of `r` it was read from, byte for byte; its values dequantize (inputs of at most 16 MB of
//! floats per weight).
template <class Weight>
void check_weight(qmem::io::safetensors_reader const& r, Weight const& w) {
  for (auto const& [spec, bytes] : w.tensors()) {
    auto const* e = r.find(spec.name);
    require(e != nullptr && e->type == spec.type && e->shape == spec.shape);
    auto const stored = r.bytes(*e);
    require(std::ranges::equal(stored, bytes));
  }
  if (w.numel() <= (std::size_t{1} << 22))
    require(w.template dequantize<float>().size() == w.numel());
}

} // namespace

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  std::span<std::byte const> const input(reinterpret_cast<std::byte const*>(data), size);
  try {
    auto const r = qmem::io::safetensors_reader::parse(input, "fuzz");
    std::uint64_t pos = 0;
    for (auto const& e : r.tensors()) {
      require(e.begin == pos && e.end >= e.begin && e.end - e.begin == e.nbytes());
      auto const b = r.bytes(e);
      require(b.size() == e.nbytes());
      require(b.empty() ||
              (b.data() >= input.data() && b.data() + b.size() <= input.data() + size));
      require(r.find(e.name) == &e);
      if (e.type == qmem::dtype::u8)
        require(r.read<std::uint8_t>(e.name).size() == e.numel());
      pos = e.end;
    }
    require(pos == r.data_size());
    for (auto const& name : qmem::io::bnb_weight_names(r)) {
      try {
        check_weight(r, qmem::io::read_bnb_weight(r, name));
      } catch (qmem::error const&) {
      }
    }
    for (auto const& name : qmem::io::int8_weight_names(r)) {
      try {
        auto const w = qmem::io::read_int8_weight(r, name);
        require(w.codes.bytes.size() == w.numel() && w.scb.bytes.size() == 4 * w.rows());
        check_weight(r, w);
      } catch (qmem::error const&) {
      }
    }
  } catch (qmem::error const&) {
  }
  return 0;
}
