// libFuzzer target for the safetensors reader and the bitsandbytes checkpoint reader: any byte
// string must either be rejected with a qmem::error or give a reader whose every promise holds
// (tensors tile the data section, bytes() stays inside the input, reads return numel elements,
// bnb weights dequantize without touching memory they do not own). Any other exception, crash,
// sanitizer report, leak or broken invariant is a finding.
//
// Build and run: fuzz/run.sh SECONDS (clang with -fsanitize=fuzzer,address,undefined).
#include <qmem/io.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

namespace {

void require(bool ok) {
  if (!ok)
    std::abort();
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
        auto const w = qmem::io::read_bnb_weight(r, name);
        if (w.numel() <= (std::size_t{1} << 22)) // 16 MB of floats at most per input
          require(w.dequantize<float>().size() == w.numel());
      } catch (qmem::error const&) {
      }
    }
  } catch (qmem::error const&) {
  }
  return 0;
}
