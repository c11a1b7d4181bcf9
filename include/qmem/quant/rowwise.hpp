#pragma once
//! \file
//! Row-wise absmax int8 quantization (LLM.int8's vector-wise quantization, bitsandbytes'
//! `int8_vectorwise_quant` without outlier decomposition, and `int8_vectorwise_dequant`).
//!
//! For a row-major matrix x[rows][cols]:
//!   row_absmax[r] = max_c |x[r][c]|                       (fp32)
//!   q[r][c]       = round_half_even(x[r][c] * (127 / row_absmax[r]))   int8 in [-127, 127]
//!   y[r][c]       = (q[r][c] * row_absmax[r]) * (1 / 127 as float)    then one rounding to T
//! which is bitsandbytes' arithmetic, except that its GPU kernel divides 127 / absmax with the
//! approximate `__fdividef`; qmem divides exactly (the host and GPU agree bit for bit), so a
//! value within an ulp of a half-integer may round the other way than in bitsandbytes.
//!
//! Non-finite input: NaN in a row makes its absmax NaN, every q of the row 0, and the whole row
//! dequantizes to NaN (bitsandbytes' fmaxf drops the NaN instead: its row absmax ignores it and
//! the NaN element alone becomes 0). An infinity makes the absmax +inf: finite elements get q = 0,
//! the infinity inf * 0 = NaN -> 0, and the row dequantizes to 0 * inf = NaN. An all-zero row has
//! absmax 0: 127 / 0 = inf, 0 * inf = NaN -> q = 0, and it dequantizes to 0 (as in bitsandbytes).

#include <qmem/core/config.hpp>
#include <qmem/core/detail/parallel.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/fmath.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/quant/blockwise.hpp>
#include <qmem/quant/detail/blockwise_ops.hpp>
#include <qmem/quant/detail/host_isa.hpp>
#include <qmem/quant/detail/host_simd.hpp>
#include <qmem/quant/detail/rowwise_ops.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#if QMEM_HAS_CUDA()
#if defined(__has_include) && __has_include(<qmem/quant/cuda/rowwise.cuh>)
#include <qmem/quant/cuda/rowwise.cuh>
#define QMEM_QUANT_HAS_CUDA_ROWWISE 1
#endif
#endif
#ifndef QMEM_QUANT_HAS_CUDA_ROWWISE
#define QMEM_QUANT_HAS_CUDA_ROWWISE 0
#endif

namespace qmem::quant {
namespace detail {

inline void check_rowwise_sizes(char const* fn, std::size_t rows, std::size_t cols,
                                std::size_t values, std::size_t codes, std::size_t stats) {
  if (cols != 0 && rows > static_cast<std::size_t>(-1) / cols)
    qmem::detail::raise(fn, ": rows * cols overflows (", rows, " x ", cols, ")");
  if (values != rows * cols)
    qmem::detail::raise(fn, ": the values view has ", values,
                        " elements; expected rows * cols = ", rows * cols);
  if (codes != rows * cols)
    qmem::detail::raise(fn, ": q has ", codes, " elements; expected rows * cols = ", rows * cols);
  if (stats != rows)
    qmem::detail::raise(fn, ": row_absmax has ", stats, " elements; expected rows = ", rows);
}

//! Runs row(r) for every r < rows on the host executor `e`, split into ranges of whole rows of at
//! least 64 Ki elements per thread (a thread start costs ~20 us on the dev box).
template <class E, class Row>
void for_each_row_host(E const& e, std::size_t rows, std::size_t cols, Row const& row) {
  std::size_t const min_rows = cols == 0 ? rows : (std::size_t{1} << 16) / cols + 1;
  qmem::detail::parallel_for(
      e, rows, 1,
      [&](std::size_t r0, std::size_t r1) {
        for (std::size_t r = r0; r < r1; ++r)
          row(r);
      },
      min_rows);
}

} // namespace detail

//! Quantizes the row-major matrix x[rows][cols] row-wise to int8 (see the file comment).
//! Preconditions (qmem::bad_argument, nothing written): x.size() == q.size() == rows * cols;
//! row_absmax.size() == rows; views non-null when non-empty, aligned, reachable by `e`; x, q and
//! row_absmax do not overlap one another.
template <exec::execution E, float_element T>
void quantize_rowwise(E const& e, tensor_view<T const> x, std::size_t rows, std::size_t cols,
                      tensor_view<std::int8_t> q, tensor_view<float> row_absmax) {
  constexpr char const* fn = "quantize_rowwise";
  detail::check_arg<E>(x, fn, "x");
  detail::check_arg<E>(q, fn, "q");
  detail::check_arg<E>(row_absmax, fn, "row_absmax");
  detail::check_rowwise_sizes(fn, rows, cols, x.size(), q.size(), row_absmax.size());
  qmem::detail::check_pairwise_disjoint(fn, {{x, "x"}, {q, "q"}, {row_absmax, "row_absmax"}});
  if (rows == 0)
    return;
  if constexpr (exec::is_cuda_v<E>) {
#if QMEM_HAS_CUDA() && QMEM_QUANT_HAS_CUDA_ROWWISE
    cuda_impl::quantize_rowwise(e, x, rows, cols, q, row_absmax);
#else
    static_assert(detail::always_false_v<E>,
                  "qmem::quant::quantize_rowwise with exec::cuda needs a translation unit compiled "
                  "by nvcc and quant/cuda/rowwise.cuh");
#endif
  } else {
    detail::for_each_row_host(e, rows, cols, [&](std::size_t r) {
      T const* QMEM_RESTRICT xr = x.data() + r * cols;
      std::int8_t* QMEM_RESTRICT qr = q.data() + r * cols;
#if QMEM_QUANT_HOST_AVX2
      // 16 lanes (dev box, one thread, 2^16 bf16 in L2: 1.64 -> 0.13 ns per element, 2026-11-29)
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16>) {
        if (detail::host_has_avx512()) {
          row_absmax[r] = detail::quantize_row_avx512(xr, cols, qr);
          return;
        }
      }
#endif
      float const amax = qmem::detail::bits_to_float(detail::block_absmax_bits(xr, cols));
      row_absmax[r] = amax;
      float const scale = fmath::div(127.0f, amax);
      for (std::size_t c = 0; c < cols; ++c)
        qr[c] = detail::rowwise_encode(to_float(xr[c]), scale);
    });
  }
}

//! Dequantizes row-wise int8 codes: y[r][c] = (q[r][c] * row_absmax[r]) * (1/127), one rounding
//! to T. Preconditions (qmem::bad_argument, nothing written): q.size() == y.size() == rows * cols;
//! row_absmax.size() == rows; views non-null when non-empty, aligned, reachable by `e`; y overlaps
//! neither q nor row_absmax.
template <exec::execution E, float_element T>
void dequantize_rowwise(E const& e, tensor_view<std::int8_t const> q,
                        tensor_view<float const> row_absmax, std::size_t rows, std::size_t cols,
                        tensor_view<T> y) {
  constexpr char const* fn = "dequantize_rowwise";
  detail::check_arg<E>(q, fn, "q");
  detail::check_arg<E>(row_absmax, fn, "row_absmax");
  detail::check_arg<E>(y, fn, "y");
  detail::check_rowwise_sizes(fn, rows, cols, y.size(), q.size(), row_absmax.size());
  qmem::detail::check_disjoint(q, y, fn, "q", "y");
  qmem::detail::check_disjoint(row_absmax, y, fn, "row_absmax", "y");
  if (rows == 0)
    return;
  if constexpr (exec::is_cuda_v<E>) {
#if QMEM_HAS_CUDA() && QMEM_QUANT_HAS_CUDA_ROWWISE
    cuda_impl::dequantize_rowwise(e, q, row_absmax, rows, cols, y);
#else
    static_assert(detail::always_false_v<E>,
                  "qmem::quant::dequantize_rowwise with exec::cuda needs a translation unit "
                  "compiled by nvcc and quant/cuda/rowwise.cuh");
#endif
  } else {
    detail::for_each_row_host(e, rows, cols, [&](std::size_t r) {
      std::int8_t const* QMEM_RESTRICT qr = q.data() + r * cols;
      T* QMEM_RESTRICT yr = y.data() + r * cols;
      float const amax = row_absmax[r];
#if QMEM_QUANT_HOST_AVX2
      // 16 / 8 lanes (dev box, one thread, 2^16 int8 to bf16 in L2: 0.45 ns per element scalar,
      // 0.19 AVX2, 0.11 AVX-512 with the integer rounding, 0.08 with the hardware one (f16 0.37
      // -> 0.08); 2026-11-29); f16 on AVX-512 only
      if constexpr (std::is_same_v<T, bf16> || std::is_same_v<T, f16>) {
        if (detail::host_has_avx512_bf16()) {
          detail::dequantize_row_u16_avx512(qr, amax, cols, yr);
          return;
        }
      }
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>) {
        if (detail::host_has_avx512()) {
          detail::dequantize_row_avx512(qr, amax, cols, yr);
          return;
        }
      }
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, bf16>) {
        if (detail::host_has_avx2()) {
          detail::dequantize_row_avx2(qr, amax, cols, yr);
          return;
        }
      }
#endif
      for (std::size_t c = 0; c < cols; ++c)
        yr[c] = from_float<T>(detail::rowwise_decode(qr[c], amax));
    });
  }
}

} // namespace qmem::quant
