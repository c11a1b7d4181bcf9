#pragma once
//! \file
//! Matrix products with quantized weights: bitsandbytes' 4-bit layout (NF4/FP4, plain or
//! double-quantized block scales) for inference and the QLoRA backward pass, and LLM.int8-style
//! row-wise int8 products with optional fp16/bf16 outlier columns.
//!
//! This header holds the public types, the shared element-level code (`QMEM_HOST_DEVICE`) and the
//! host backend, which is also the reference the CUDA backend (`quant/cuda/matmul.cuh`) is tested
//! against. Shapes follow `torch.nn.functional.linear`:
//!
//!     x      [m, k]   activations (bf16 or f16), row-major
//!     w      [n, k]   weight, out_features x in_features, row-major, quantized as a flat tensor
//!     y      [m, n]   y = x * dequant(w)^T, accumulated in float (host: double), rounded once
//!
//! What "dequant(w)" means in the reference: each weight element is `round_T(code_value * scale)`
//! (one float product, then one rounding to the activation type T), which is what bitsandbytes'
//! `dequantize_4bit` writes before its GEMM; the host backend and the CUDA large-batch and
//! grad-input paths multiply exactly these weights. The CUDA GEMV path (m <= gemv_max_rows) never
//! forms them: it sums `round_T(code_value) * x` over each block in fp32 and multiplies the sum by
//! the block's fp32 scale (detail::mm::table_value). docs/matmul.md derives both tolerances
//! against the reference.

#include <qmem/core/config.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/quant/code_table.hpp>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/detail/blockwise_ops.hpp>

#include <cmath>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace qmem::quant {

//! The activation types a quantized matmul takes (and returns).
template <class T>
concept matmul_activation = std::same_as<T, bf16> || std::same_as<T, f16>;

//! A 4-bit code type a quantized matmul can read (nf4, fp4, or a 16-entry table_code).
template <class C>
concept matmul_code_4bit = code_type<C> && C::bits == 4;

//! The block scales of a blockwise-quantized tensor: either one fp32 absmax per block, or
//! bitsandbytes' double quantization (`compress_statistics=True`): one 8-bit code per block in the
//! signed dynamic map, one fp32 scale per `nested_block_size` blocks, and an offset, so that
//! `scale[b] = dynamic_signed[qabsmax[b]] * absmax2[b / nested_block_size] + offset` (two float
//! operations in that order, as bitsandbytes computes it).
struct block_scales {
  tensor_view<float const> absmax;         //!< [blocks] plain scales (empty when nested)
  tensor_view<std::uint8_t const> qabsmax; //!< [blocks] nested codes (empty when plain)
  tensor_view<float const> absmax2;        //!< [ceil(blocks / nested_block_size)]
  float offset = 0.0f;                     //!< the mean bitsandbytes subtracted
  std::size_t nested_block_size = 256;     //!< blocks per absmax2 entry (bitsandbytes: 256)

  //! True when the scales are double-quantized.
  [[nodiscard]] constexpr bool nested() const noexcept { return !qabsmax.empty(); }
  //! The memory space both halves must share (checked by the algorithms).
  [[nodiscard]] constexpr memory_space space() const noexcept {
    return nested() ? qabsmax.space() : absmax.space();
  }
};

//! A non-owning view of a bitsandbytes 4-bit weight [rows, cols] = [out_features, in_features]:
//! the rows * cols elements, row-major and flattened, are quantized in flat blocks of
//! `block_size` (the last one partial), two codes per byte, the first element in the high nibble.
//! Trivially copyable; pass by value.
template <matmul_code_4bit Code>
struct weight_4bit_view {
  using code_type = Code;
  tensor_view<std::uint8_t const> codes; //!< [ceil(rows * cols / 2)] packed codes
  block_scales scales;                   //!< [ceil(rows * cols / block_size)] block scales
  std::size_t rows = 0;                  //!< n, output features
  std::size_t cols = 0;                  //!< k, input features
  std::size_t block_size = 64;           //!< elements per block: a power of two in [32, 4096]

  //! Elements of the weight.
  [[nodiscard]] constexpr std::size_t elements() const noexcept { return rows * cols; }
  //! Number of blocks (and of scales).
  [[nodiscard]] constexpr std::size_t blocks() const noexcept {
    return elements() / block_size + (elements() % block_size != 0 ? 1 : 0);
  }
};

// The element-level pieces below live in their own namespace so that they cannot collide with the
// other quant headers' detail helpers (nested_scale and nibble come from those; the float
// operations from core/fmath.hpp).
namespace detail::mm {

using detail::nibble;

//! Whether `b` is a block size the 4-bit matmul accepts: a power of two in [32, 4096].
constexpr bool valid_block_size_4bit(std::size_t b) noexcept {
  return b >= 32 && b <= 4096 && (b & (b - 1)) == 0;
}

//! log2 of a power of two.
constexpr unsigned log2_exact(std::size_t b) noexcept {
  unsigned s = 0;
  while ((std::size_t{1} << s) < b)
    ++s;
  return s;
}

//! The dequantization rule every backend shares: code value times block scale, one float
//! product, rounded once to the activation type.
template <matmul_activation T>
QMEM_HOST_DEVICE QMEM_INLINE float dequant_weight(float code_value, float scale) noexcept {
  return to_float(from_float<T>(fmath::mul(code_value, scale)));
}

//! The weight rule of the GEMV paths (CUDA, m <= gemv_max_rows): a code's table value rounded
//! once to T. The block scale is not applied per weight: it multiplies the fp32 partial sum of the
//! block's products, each of which (T value times T activation) is exact in fp32.
template <matmul_activation T>
QMEM_HOST_DEVICE QMEM_INLINE float table_value(float code_value) noexcept {
  return to_float(from_float<T>(code_value));
}

//! bitsandbytes' int8 dequantization constant 1 / (127 * 127).
inline constexpr float int8_dequant_scale = 1.0f / (127.0f * 127.0f);

//! The int8 epilogue every backend shares: an exact int32 dot product scaled by the row and column
//! absmax values: acc * ((row * col) * 1/127^2), each a float operation.
QMEM_HOST_DEVICE QMEM_INLINE float int8_epilogue(std::int32_t acc, float row_scale,
                                                 float col_scale) noexcept {
  return fmath::mul(static_cast<float>(acc),
                    fmath::mul(fmath::mul(row_scale, col_scale), int8_dequant_scale));
}

//! The int8 weight value bitsandbytes' outlier path multiplies with: code * (absmax / 127).
QMEM_HOST_DEVICE QMEM_INLINE float int8_weight_value(std::int8_t code, float col_scale) noexcept {
  return fmath::mul(static_cast<float>(code), fmath::mul(col_scale, 1.0f / 127.0f));
}

//! Row-wise int8 quantization of one activation: round(x * (127 / absmax)), ties to even, as an
//! int8 in [-127, 127]; 0 when the row's absmax is 0, and 0 for a NaN product (a NaN activation,
//! which the row's fmax-absmax skips, or an infinite one in a row without outliers: inf * 0).
QMEM_HOST_DEVICE QMEM_INLINE std::int8_t int8_quantize(float x, float inv_scale) noexcept {
#if defined(__CUDA_ARCH__)
  int q = __float2int_rn(fmath::mul(x, inv_scale)); // NaN -> 0 (PTX cvt.rni.s32.f32)
#else
  // NaN -> 0 as on the GPU; converting NaN to int is undefined (x86-64: INT_MIN, then -127)
  float const v = fmath::mul(x, inv_scale);
  int q = v == v ? static_cast<int>(std::nearbyint(v)) : 0;
#endif
  q = q > 127 ? 127 : (q < -127 ? -127 : q);
  return static_cast<std::int8_t>(q);
}

//! 127 / absmax (IEEE division), 0 for an all-zero row.
QMEM_HOST_DEVICE QMEM_INLINE float int8_inverse_scale(float absmax) noexcept {
  return absmax > 0.0f ? fmath::div(127.0f, absmax) : 0.0f;
}

//! True when |x| exceeds the outlier threshold (a threshold <= 0 disables outliers).
QMEM_HOST_DEVICE QMEM_INLINE bool is_outlier(float x, float threshold) noexcept {
  return threshold > 0.0f && (x > threshold || x < -threshold);
}

inline char const* space_name(memory_space s) noexcept { return to_string(s).data(); }

//! Checks the weight view's own consistency (sizes of codes and scales, block size, spaces).
template <class Code>
void check_weight(weight_4bit_view<Code> const& w, char const* fn, bool host, bool device) {
  if (!valid_block_size_4bit(w.block_size))
    qmem::detail::raise(fn, ": w.block_size is ", w.block_size,
                        "; expected a power of two in [32, 4096]");
  if (w.rows == 0 || w.cols == 0)
    qmem::detail::raise(fn, ": w is ", w.rows, " x ", w.cols, "; expected a non-empty weight");
  // rows * cols wrapping around (say 2^32 x 2^32 -> 0) would let empty views pass the size checks
  if (w.cols > std::numeric_limits<std::size_t>::max() / w.rows)
    qmem::detail::raise(fn, ": w is ", w.rows, " x ", w.cols,
                        "; its element count does not fit a size_t");
  std::size_t const n = w.elements();
  if (w.codes.size() != n / 2 + n % 2)
    qmem::detail::raise(fn, ": w.codes holds ", w.codes.size(), " bytes; a ", w.rows, " x ", w.cols,
                        " 4-bit weight needs ", n / 2 + n % 2);
  check_view(w.codes, fn, "w.codes", host, device);
  std::size_t const blocks = w.blocks();
  if (w.scales.nested()) {
    if (!w.scales.absmax.empty())
      qmem::detail::raise(fn, ": w.scales has both absmax and qabsmax; expected one of them");
    if (w.scales.nested_block_size == 0)
      qmem::detail::raise(fn, ": w.scales.nested_block_size is 0; expected > 0");
    if (w.scales.qabsmax.size() != blocks)
      qmem::detail::raise(fn, ": w.scales.qabsmax holds ", w.scales.qabsmax.size(),
                          " codes; expected one per block, ", blocks);
    // ceil(blocks / nested_block_size) without the sum (blocks + nested - 1) that wraps around
    // for a huge nested_block_size (to 0 groups: an empty absmax2 passed, and was read)
    std::size_t const groups =
        blocks / w.scales.nested_block_size + (blocks % w.scales.nested_block_size != 0 ? 1 : 0);
    if (w.scales.absmax2.size() != groups)
      qmem::detail::raise(fn, ": w.scales.absmax2 holds ", w.scales.absmax2.size(),
                          " scales; expected ", groups, " (one per ", w.scales.nested_block_size,
                          " blocks)");
    check_view(w.scales.qabsmax, fn, "w.scales.qabsmax", host, device);
    check_view(w.scales.absmax2, fn, "w.scales.absmax2", host, device);
  } else {
    if (w.scales.absmax.size() != blocks)
      qmem::detail::raise(fn, ": w.scales.absmax holds ", w.scales.absmax.size(),
                          " scales; expected one per block, ", blocks);
    check_view(w.scales.absmax, fn, "w.scales.absmax", host, device);
  }
}

//! Checks one dense operand: `rows` x `cols` elements, reachable from where the call runs.
template <class T>
void check_matrix(tensor_view<T> v, std::size_t rows, std::size_t cols, char const* fn,
                  char const* name, bool host, bool device) {
  // a product that wraps around could match a small (or empty) view
  if (rows != 0 && cols > std::numeric_limits<std::size_t>::max() / rows)
    qmem::detail::raise(fn, ": ", name, " is ", rows, " x ", cols,
                        "; its element count does not fit a size_t");
  if (v.size() != rows * cols)
    qmem::detail::raise(fn, ": ", name, " holds ", v.size(), " elements; expected ", rows, " x ",
                        cols, " = ", rows * cols);
  check_view(v, fn, name, host, device);
}

//! Checks that `v` (an output or a workspace) shares no byte with any part of the weight: a
//! kernel reading the weight while writing `v` would read its own results (both backends refuse
//! it, so that a call means the same thing on each).
template <class T, class Code>
void check_apart_from_weight(tensor_view<T> v, weight_4bit_view<Code> const& w, char const* fn,
                             char const* name) {
  // the views copied out first: nvcc 13's front end mistranslates a braced list whose elements
  // name members of the dependent `w` (g++ takes it)
  auto const codes = w.codes;
  auto const absmax = w.scales.absmax;
  auto const qabsmax = w.scales.qabsmax;
  auto const absmax2 = w.scales.absmax2;
  qmem::detail::check_disjoint_from(fn, {v, name},
                                    {{codes, "w.codes"},
                                     {absmax, "w.scales.absmax"},
                                     {qabsmax, "w.scales.qabsmax"},
                                     {absmax2, "w.scales.absmax2"}});
}

//! The block scale of block `b` on the host.
template <class Code>
float host_scale(weight_4bit_view<Code> const& w, std::size_t b) noexcept {
  if (!w.scales.nested())
    return w.scales.absmax[b];
  return detail::nested_scale(w.scales.qabsmax[b], w.scales.absmax2[b / w.scales.nested_block_size],
                              w.scales.offset, dynamic_signed::book);
}

//! The dequantized weight as float values (each exactly representable in T), row-major [n, k].
template <matmul_activation T, class Code>
std::vector<float> host_dequantized(weight_4bit_view<Code> const& w) {
  std::vector<float> out(w.elements());
  for (std::size_t i = 0; i < out.size(); ++i) {
    float const s = host_scale(w, i / w.block_size);
    out[i] = dequant_weight<T>(Code::decode(nibble(w.codes.data(), i), Code::book), s);
  }
  return out;
}

} // namespace detail::mm

//! Largest batch the CUDA backend serves with its GEMV-style kernels (codes and scales read
//! directly); larger batches dequantize into a workspace and call cuBLASLt.
inline constexpr std::size_t gemv_max_rows = 16;

//! cuBLASLt's own workspace inside a qmem workspace (NVIDIA's recommendation for Hopper).
inline constexpr std::size_t cublaslt_workspace_bytes = std::size_t{32} << 20;

namespace detail::mm {
constexpr std::size_t align256(std::size_t b) noexcept { return (b + 255) / 256 * 256; }

//! Row slices the CUDA grad-input GEMV splits the weight's rows into (its partial sums are
//! reduced in a fixed order): enough blocks to fill an H200 (132 SMs, 4 blocks each) with
//! 1024 columns per block, at most 64 slices and at least 32 rows per slice.
constexpr std::size_t grad_input_slices(std::size_t rows, std::size_t cols) noexcept {
  std::size_t const col_blocks = (cols + 1023) / 1024;
  std::size_t s = (528 + col_blocks - 1) / col_blocks;
  std::size_t const max_by_rows = (rows + 31) / 32;
  s = s < max_by_rows ? s : max_by_rows;
  s = s < 64 ? s : 64;
  return s == 0 ? 1 : s;
}
} // namespace detail::mm

//! Bytes of device workspace the CUDA matmul_4bit needs for a batch of m rows: none up to
//! gemv_max_rows, else the weight dequantized to T (n * k elements) plus cuBLASLt's workspace.
template <matmul_activation T, matmul_code_4bit Code>
constexpr std::size_t matmul_4bit_workspace_bytes(std::size_t m,
                                                  weight_4bit_view<Code> const& w) noexcept {
  if (m <= gemv_max_rows)
    return 0;
  return detail::mm::align256(w.elements() * sizeof(T)) + cublaslt_workspace_bytes;
}

//! Largest batch the CUDA grad-input serves with its GEMV-style kernel; larger batches dequantize
//! into a workspace and call cuBLASLt. Measured on 8192 x 8192 NF4, one H200, 2026-11-29
//! (bench grad_path, GEMV / dequantize + cuBLASLt): batch 2 91.0 / 93.3 us, 4 92.8 / 91.8,
//! 8 109.1 / 91.9, 16 186.6 / 92.4 (batch 1: 56.7 us through the GEMV kernel). At 2-4 the two tie
//! and the GEMV path needs 8 MiB of workspace instead of the dequantized weight's 128 MiB.
inline constexpr std::size_t grad_input_gemv_max_rows = 4;

//! Bytes of device workspace the CUDA matmul_4bit_grad_input needs for a batch of m rows: fp32
//! partial sums of the row slices up to grad_input_gemv_max_rows, else as
//! matmul_4bit_workspace_bytes.
template <matmul_activation T, matmul_code_4bit Code>
constexpr std::size_t
matmul_4bit_grad_input_workspace_bytes(std::size_t m, weight_4bit_view<Code> const& w) noexcept {
  if (m <= grad_input_gemv_max_rows)
    return detail::mm::grad_input_slices(w.rows, w.cols) * m * w.cols * sizeof(float);
  return detail::mm::align256(w.elements() * sizeof(T)) + cublaslt_workspace_bytes;
}

//! Bytes of device workspace the CUDA matmul_int8 needs: the int32 product [m, n] plus
//! cuBLASLt's workspace.
constexpr std::size_t matmul_int8_workspace_bytes(std::size_t m, std::size_t n) noexcept {
  return detail::mm::align256(m * n * sizeof(std::int32_t)) + cublaslt_workspace_bytes;
}

//! Outlier columns up to which the CUDA linear_int8 gathers them into dense fp32 blocks (the
//! activations' columns and the weight's dequantized columns) and adds their product in a tiled
//! epilogue; with more, the epilogue reads them in place (correct, slower). LLM.int8 sees well
//! under 1% of the columns as outliers: 256 covers k = 25600 at 1%.
inline constexpr std::size_t linear_int8_dense_outliers = 256;

//! Bytes of device workspace the CUDA linear_int8 needs: outlier flags and list (k), the
//! quantized activations (m * k), row scales (m), the gathered outlier blocks ((m + n) *
//! min(k, linear_int8_dense_outliers) floats), the int32 product (m * n), cuBLASLt's workspace.
constexpr std::size_t linear_int8_workspace_bytes(std::size_t m, std::size_t n,
                                                  std::size_t k) noexcept {
  using detail::mm::align256;
  std::size_t const cap = k < linear_int8_dense_outliers ? k : linear_int8_dense_outliers;
  return align256(k * 4) + align256((k + 1) * 4) + align256(m * k) + align256(m * 4) +
         align256(m * cap * 4) + align256(n * cap * 4) + matmul_int8_workspace_bytes(m, n);
}

//! y[m, n] = x[m, k] * dequant(w)^T on the host: the reference every backend is tested against.
//! Each product term is exact and the sum is accumulated in double, then rounded once to T.
//! Preconditions (bad_argument otherwise, nothing written): x holds m * w.cols elements, y holds
//! m * w.rows, all in host-accessible memory; y shares no memory with x or w (on both backends);
//! w is consistent (see weight_4bit_view); m > 0.
//! The workspace argument is ignored on the host (the CUDA overload uses it).
//! Cost: O(m * n * k) on the calling thread.
template <matmul_activation T, matmul_code_4bit Code>
void matmul_4bit(exec::host, std::type_identity_t<tensor_view<T const>> x, std::size_t m,
                 weight_4bit_view<Code> w, tensor_view<T> y, tensor_view<std::byte> = {}) {
  constexpr char const* fn = "qmem::quant::matmul_4bit";
  QMEM_EXPECTS(m > 0, "m is 0; expected at least one row of activations");
  detail::mm::check_weight(w, fn, true, false);
  detail::mm::check_matrix(x, m, w.cols, fn, "x", true, false);
  detail::mm::check_matrix(tensor_view<T const>(y), m, w.rows, fn, "y", true, false);
  qmem::detail::check_disjoint(y, x, fn, "y", "x");
  detail::mm::check_apart_from_weight(y, w, fn, "y");
  std::vector<float> const wd = detail::mm::host_dequantized<T>(w);
  std::size_t const n = w.rows, k = w.cols;
  std::vector<T> out(m * n);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      double acc = 0.0;
      for (std::size_t l = 0; l < k; ++l)
        acc += static_cast<double>(to_float(x[i * k + l])) * static_cast<double>(wd[j * k + l]);
      out[i * n + j] = from_float<T>(static_cast<float>(acc));
    }
  for (std::size_t i = 0; i < out.size(); ++i)
    y[i] = out[i];
}

//! QLoRA's backward pass through a frozen 4-bit weight: grad_x[m, k] = grad_y[m, n] * dequant(w),
//! on the host, accumulated in double and rounded once to T (no weight gradient: w is frozen).
//! Preconditions (bad_argument otherwise): grad_y holds m * w.rows elements, grad_x m * w.cols,
//! host-accessible; grad_x shares no memory with grad_y or w; w consistent; m > 0.
template <matmul_activation T, matmul_code_4bit Code>
void matmul_4bit_grad_input(exec::host, std::type_identity_t<tensor_view<T const>> grad_y,
                            std::size_t m, weight_4bit_view<Code> w, tensor_view<T> grad_x,
                            tensor_view<std::byte> = {}) {
  constexpr char const* fn = "qmem::quant::matmul_4bit_grad_input";
  QMEM_EXPECTS(m > 0, "m is 0; expected at least one row of gradients");
  detail::mm::check_weight(w, fn, true, false);
  detail::mm::check_matrix(grad_y, m, w.rows, fn, "grad_y", true, false);
  detail::mm::check_matrix(tensor_view<T const>(grad_x), m, w.cols, fn, "grad_x", true, false);
  qmem::detail::check_disjoint(grad_x, grad_y, fn, "grad_x", "grad_y");
  detail::mm::check_apart_from_weight(grad_x, w, fn, "grad_x");
  std::vector<float> const wd = detail::mm::host_dequantized<T>(w);
  std::size_t const n = w.rows, k = w.cols;
  std::vector<double> acc(m * k, 0.0);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      double const g = to_float(grad_y[i * n + j]);
      for (std::size_t l = 0; l < k; ++l)
        acc[i * k + l] += g * static_cast<double>(wd[j * k + l]);
    }
  for (std::size_t i = 0; i < m * k; ++i)
    grad_x[i] = from_float<T>(static_cast<float>(acc[i]));
}

//! LLM.int8's int8 product with its dequantization epilogue, on the host:
//! out[m, n] = (sum_k a[m, k] * b[n, k]) * ((row_scale[m] * col_scale[n]) / 127^2), the dot product
//! exact in int32, the epilogue in float (detail::mm::int8_epilogue), rounded once to Out.
//! `row_scale`/`col_scale` are the absmax values the rows of a and b were quantized with.
//! Preconditions: a holds m * k, b n * k, row_scale m, col_scale n, out m * n elements, all
//! host-accessible; out shares no memory with an operand; m, n, k > 0; k <= 131072 (checked); the codes in [-127, 127], as
//! quantize_rowwise and bitsandbytes write them (not checked): then |sum| <= 127^2 k < 2^31 and
//! the int32 sum cannot overflow (codes of -128 in both a and b at k = 131072 would reach 2^31).
namespace detail::mm {
//! Checks that `v` (an output or a workspace) shares no byte with the int8 operands (empty views,
//! such as linear_int8's absent row scales, share none).
template <class T>
void check_apart_from_int8(tensor_view<T> v, char const* fn, char const* name,
                           tensor_view<std::int8_t const> a, char const* a_name,
                           tensor_view<float const> row_scale, tensor_view<std::int8_t const> b,
                           tensor_view<float const> col_scale) {
  qmem::detail::check_disjoint_from(
      fn, {v, name}, {{a, a_name}, {row_scale, "row_scale"}, {b, "b"}, {col_scale, "col_scale"}});
}
} // namespace detail::mm

template <float_element Out>
void matmul_int8(exec::host, tensor_view<std::int8_t const> a, tensor_view<float const> row_scale,
                 tensor_view<std::int8_t const> b, tensor_view<float const> col_scale,
                 std::size_t m, std::size_t n, std::size_t k, tensor_view<Out> out,
                 tensor_view<std::byte> = {}) {
  constexpr char const* fn = "qmem::quant::matmul_int8";
  QMEM_EXPECTS(m > 0 && n > 0 && k > 0, "shape ", m, " x ", n, " x ", k, "; expected m, n, k > 0");
  QMEM_EXPECTS(k <= 131072, "k is ", k, "; expected at most 131072 (int32 accumulation)");
  detail::mm::check_matrix(a, m, k, fn, "a", true, false);
  detail::mm::check_matrix(b, n, k, fn, "b", true, false);
  detail::mm::check_matrix(row_scale, m, 1, fn, "row_scale", true, false);
  detail::mm::check_matrix(col_scale, n, 1, fn, "col_scale", true, false);
  detail::mm::check_matrix(tensor_view<Out const>(out), m, n, fn, "out", true, false);
  detail::mm::check_apart_from_int8(out, fn, "out", a, "a", row_scale, b, col_scale);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      std::int32_t acc = 0;
      for (std::size_t l = 0; l < k; ++l)
        acc += static_cast<std::int32_t>(a[i * k + l]) * static_cast<std::int32_t>(b[j * k + l]);
      out[i * n + j] = from_float<Out>(detail::mm::int8_epilogue(acc, row_scale[i], col_scale[j]));
    }
}

//! An LLM.int8 linear layer on the host: out[m, n] = x[m, k] * W^T with W's rows stored as int8
//! codes b[n, k] and absmax col_scale[n] (W ~ b * col_scale / 127). Columns k of x holding any
//! |x| > threshold are outliers (threshold <= 0: none): they are multiplied in float with the
//! dequantized weight (detail::mm::int8_weight_value), in ascending k with fused multiply-adds; the
//! other columns are quantized row-wise to int8 (absmax over the non-outlier columns,
//! detail::mm::int8_quantize) and go through matmul_int8's arithmetic. Both backends compute
//! exactly this, so their results agree bit for bit. Preconditions: x holds m * k, b n * k,
//! col_scale n, out m * n elements, host-accessible; out shares no memory with an operand; m, n,
//! k > 0; k <= 131072.
template <matmul_activation T>
void linear_int8(exec::host, std::type_identity_t<tensor_view<T const>> x,
                 tensor_view<std::int8_t const> b, tensor_view<float const> col_scale,
                 std::size_t m, std::size_t n, std::size_t k, float threshold, tensor_view<T> out,
                 tensor_view<std::byte> = {}) {
  constexpr char const* fn = "qmem::quant::linear_int8";
  QMEM_EXPECTS(m > 0 && n > 0 && k > 0, "shape ", m, " x ", n, " x ", k, "; expected m, n, k > 0");
  QMEM_EXPECTS(k <= 131072, "k is ", k, "; expected at most 131072 (int32 accumulation)");
  detail::mm::check_matrix(x, m, k, fn, "x", true, false);
  detail::mm::check_matrix(b, n, k, fn, "b", true, false);
  detail::mm::check_matrix(col_scale, n, 1, fn, "col_scale", true, false);
  detail::mm::check_matrix(tensor_view<T const>(out), m, n, fn, "out", true, false);
  qmem::detail::check_disjoint(out, x, fn, "out", "x");
  detail::mm::check_apart_from_int8(out, fn, "out", {}, "", {}, b, col_scale);
  std::vector<std::uint8_t> outlier(k, 0);
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t l = 0; l < k; ++l)
      if (detail::mm::is_outlier(to_float(x[i * k + l]), threshold))
        outlier[l] = 1;
  std::vector<std::int8_t> q(m * k);
  std::vector<float> row_scale(m);
  for (std::size_t i = 0; i < m; ++i) {
    float amax = 0.0f;
    for (std::size_t l = 0; l < k; ++l)
      if (outlier[l] == 0)
        amax = std::fmax(amax, std::fabs(to_float(x[i * k + l])));
    row_scale[i] = amax;
    float const inv = detail::mm::int8_inverse_scale(amax);
    for (std::size_t l = 0; l < k; ++l)
      q[i * k + l] =
          outlier[l] != 0 ? std::int8_t{0} : detail::mm::int8_quantize(to_float(x[i * k + l]), inv);
  }
  for (std::size_t i = 0; i < m; ++i)
    for (std::size_t j = 0; j < n; ++j) {
      std::int32_t acc = 0;
      for (std::size_t l = 0; l < k; ++l)
        acc += static_cast<std::int32_t>(q[i * k + l]) * static_cast<std::int32_t>(b[j * k + l]);
      float v = detail::mm::int8_epilogue(acc, row_scale[i], col_scale[j]);
      for (std::size_t l = 0; l < k; ++l)
        if (outlier[l] != 0)
          v = std::fma(to_float(x[i * k + l]),
                       detail::mm::int8_weight_value(b[j * k + l], col_scale[j]), v);
      out[i * n + j] = from_float<T>(v);
    }
}

} // namespace qmem::quant

// In a CUDA translation unit the exec::cuda overloads come with this header.
#if QMEM_HAS_CUDA()
#include <qmem/quant/cuda/matmul.cuh>
#endif
