// Quickstart: one weight matrix, every storage format qmem has.
//
// A model's memory is mostly weights, and bitsandbytes-style quantization is how one fits a bigger
// model in the same memory: NF4 or FP4 codes in blocks of 64 with one scale per block (QLoRA's
// storage, 4.127 bits per parameter with double-quantized scales), 8-bit blockwise codes with the
// dynamic map (8-bit optimizers, bnb.nn.Int8Params), FP8, LLM.int8's row-wise int8, or a 4-bit
// table of the user's own. Each trades bits for error. This program makes that trade visible: it
// quantizes a 4096 x 1024 matrix of normally distributed weights (as bf16, the usual checkpoint
// type) to each format, dequantizes it back, and prints
//   bits/param  the exact storage (codes + scales + per-tensor constants) per weight,
//   rel. RMSE   root-mean-square error over the weights' RMS,
//   max |err|   the largest absolute error,
//   round trip  how many code bytes change when the dequantized bf16 weights are quantized again.
//               Most formats give the same codes back. Two of bitsandbytes' do not, by design:
//               FP4 stores a tiny negative weight as -0 (code 8), which comes back as +0 (code 0);
//               the signed dynamic map has +1 but no -1, so a block whose largest weight is
//               negative comes back with a smaller absmax, and its other codes can move.
// Everything runs on the host here; the same calls with qmem::exec::cuda{stream} run on a GPU.
#include <qmem/qmem.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <numbers>
#include <span>
#include <string>
#include <utility>
#include <vector>

namespace {

using namespace qmem;

// N(0, std) samples from a fixed seed: SplitMix64 and Box-Muller, so the output is the same on
// every platform (std::normal_distribution is not specified bit for bit).
std::vector<bf16> normal_weights(std::size_t n, float std_dev, std::uint64_t seed) {
  auto next = [&seed] {
    std::uint64_t z = (seed += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return static_cast<double>((z ^ (z >> 31)) >> 11) * 0x1.0p-53; // [0, 1)
  };
  std::vector<bf16> w(n);
  for (std::size_t i = 0; i < n; i += 2) {
    double const r = std::sqrt(-2.0 * std::log(1.0 - next())) * std_dev;
    double const t = 2.0 * std::numbers::pi * next();
    w[i] = bf16(static_cast<float>(r * std::cos(t)));
    if (i + 1 < n)
      w[i + 1] = bf16(static_cast<float>(r * std::sin(t)));
  }
  return w;
}

struct error_stats {
  double rel_rmse = 0, max_abs = 0;
};

error_stats compare(std::span<bf16 const> x, std::span<bf16 const> y) {
  double se = 0, sx = 0, mx = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    double const a = to_float(x[i]), b = to_float(y[i]);
    se += (a - b) * (a - b);
    sx += a * a;
    mx = std::max(mx, std::abs(a - b));
  }
  return {std::sqrt(se / sx), mx};
}

// Number of positions where two code arrays differ.
template <class A, class B>
std::size_t count_different(A const& a, B const& b) {
  std::size_t n = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    n += a[i] != b[i];
  return n;
}

void print_row(std::string const& name, double bits, error_stats e, std::size_t changed) {
  std::printf("%-36s %9.3f %10.4f %10.5f   %s\n", name.c_str(), bits, e.rel_rmse, e.max_abs,
              changed == 0 ? "same codes"
                           : (std::to_string(changed) + " code bytes differ").c_str());
}

} // namespace

int main() {
  constexpr std::int64_t rows = 4096, cols = 1024;
  std::int64_t const shape[] = {rows, cols};
  auto const w =
      normal_weights(rows * cols, 0.02f, 2024); // a typical init scale for a linear layer
  auto const x = view(std::as_const(w));
  exec::host const host{};

  std::printf("qmem %d.%d.%d quickstart: a %lld x %lld bf16 weight matrix, N(0, 0.02)\n\n",
              QMEM_VERSION_MAJOR, QMEM_VERSION_MINOR, QMEM_VERSION_PATCH,
              static_cast<long long>(rows), static_cast<long long>(cols));
  std::printf("%-36s %9s %10s %10s   %s\n", "format", "bits/param", "rel. RMSE", "max |err|",
              "round trip");
  print_row("bf16 (the original)", 16.0, {0, 0}, 0);

  // Blockwise formats, described at run time (the CLI and checkpoints use the same descriptor).
  // A user 4-bit table: 16 values in [-1, 1] including 0, stored with the tensor.
  std::vector<float> const uniform4 = {
      -1.0f,  -0.857143f, -0.714286f, -0.571429f, -0.428571f, -0.285714f, -0.142857f, 0.0f,
      0.125f, 0.25f,      0.375f,     0.5f,       0.625f,     0.75f,      0.875f,     1.0f};
  struct entry {
    char const* name;
    quant::format_desc format;
    std::span<float const> table;
  };
  entry const formats[] = {
      {"nf4, block 64, double-quant (QLoRA)", {quant::code_id::nf4, 64, true, 256}, {}},
      {"nf4, block 64", {quant::code_id::nf4, 64, false, 256}, {}},
      {"fp4, block 64", {quant::code_id::fp4, 64, false, 256}, {}},
      {"user 4-bit table, block 64", {quant::code_id::custom4, 64, false, 256}, uniform4},
      {"int8 dynamic map, block 256", {quant::code_id::dynamic_signed, 256, false, 256}, {}},
      {"int8 dynamic map, block 4096", {quant::code_id::dynamic_signed, 4096, false, 256}, {}},
      {"int8 linear map, block 256", {quant::code_id::linear_signed, 256, false, 256}, {}},
      {"fp8 e4m3, block 256", {quant::code_id::fp8_e4m3, 256, false, 256}, {}},
      {"fp8 e5m2, block 256", {quant::code_id::fp8_e5m2, 256, false, 256}, {}},
  };
  std::vector<bf16> y(w.size()), z(w.size());
  for (auto const& f : formats) {
    auto const q =
        quant::quantize(host, x, shape, f.format, memory::default_host_resource(), {}, f.table);
    q.dequantize(host, view(y));
    // round trip: quantize what came back, compare the codes byte for byte
    auto const q2 = quant::quantize(host, view(std::as_const(y)), shape, f.format,
                                    memory::default_host_resource(), {}, f.table);
    print_row(f.name, q.bits_per_parameter(), compare(w, y),
              count_different(q.codes(), q2.codes()));
  }

  // LLM.int8's row-wise absmax int8: one fp32 scale per row.
  std::vector<std::int8_t> codes(w.size()), codes2(w.size());
  std::vector<float> row_absmax(rows), row_absmax2(rows);
  quant::quantize_rowwise(host, x, rows, cols, view(codes), view(row_absmax));
  quant::dequantize_rowwise(host, view(std::as_const(codes)), view(std::as_const(row_absmax)), rows,
                            cols, view(z));
  quant::quantize_rowwise(host, view(std::as_const(z)), rows, cols, view(codes2),
                          view(row_absmax2));
  double const rowwise_bits = 8.0 + 32.0 / static_cast<double>(cols);
  print_row("int8 row-wise absmax (LLM.int8)", rowwise_bits, compare(w, z),
            count_different(codes, codes2));

  // One value through NF4 and back, to see what the numbers above mean for a single weight.
  auto const q = quant::quantize(host, x, shape, {quant::code_id::nf4, 64, true, 256});
  q.dequantize(host, view(y));
  std::printf("\nfirst weights:   ");
  for (int i = 0; i < 4; ++i)
    std::printf(" %+.6f", static_cast<double>(to_float(w[i])));
  std::printf("\nafter NF4 (QLoRA):");
  for (int i = 0; i < 4; ++i)
    std::printf(" %+.6f", static_cast<double>(to_float(y[i])));
  std::printf("\n\n%lld weights: %.1f MiB as bf16, %.2f MiB as NF4 with double quantization\n",
              static_cast<long long>(rows * cols),
              static_cast<double>(w.size() * sizeof(bf16)) / (1 << 20),
              static_cast<double>(q.size_bytes()) / (1 << 20));
  return 0;
}
