#pragma once
//! \file
//! CUDA kernels of LLM.int8 row-wise quantization (quant/rowwise.hpp calls these for exec::cuda;
//! it has checked every precondition). Same element code as the host (detail/rowwise_ops.hpp), and
//! the row absmax is the integer maximum of |x|'s bit patterns as on the host, so a NaN poisons
//! its row the same way and the results are bit-identical.
//!
//! quantize: one CTA per row (grid-stride over rows): each thread takes the max over a strided
//! slice, a warp-shuffle then shared-memory reduction gives the row's absmax, then the same
//! threads encode their slice. Two reads of the row: rows are short enough (a model's hidden
//! size) to be served from L2 the second time. dequantize: grid-stride over elements.

#include <qmem/core/config.hpp>
#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/exec.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/quant/detail/blockwise_ops.hpp>
#include <qmem/quant/detail/rowwise_ops.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace qmem::quant::cuda_impl {
namespace rowwise_kernels {

//! Threads per CTA of the row quantizer (8 warps: enough loads in flight for rows of 4096+).
inline constexpr int row_threads = 256;
//! Threads per CTA of the dequantizer, and CTAs per SM it launches (grid-stride beyond that).
inline constexpr int flat_threads = 256;
inline constexpr int flat_ctas_per_sm = 8;

template <class T>
__global__ void __launch_bounds__(row_threads)
    quantize_rows(T const* __restrict__ x, std::size_t rows, std::size_t cols,
                  std::int8_t* __restrict__ q, float* __restrict__ row_absmax) {
  __shared__ std::uint32_t warp_max[row_threads / 32];
  for (std::size_t r = blockIdx.x; r < rows; r += gridDim.x) {
    T const* xr = x + r * cols;
    std::uint32_t m = 0;
    for (std::size_t c = threadIdx.x; c < cols; c += row_threads) {
      std::uint32_t const b = detail::abs_bits(to_float(xr[c]));
      m = b > m ? b : m;
    }
    for (int off = 16; off > 0; off >>= 1) {
      std::uint32_t const o = __shfl_xor_sync(0xffffffffu, m, off);
      m = o > m ? o : m;
    }
    if ((threadIdx.x & 31) == 0)
      warp_max[threadIdx.x / 32] = m;
    __syncthreads();
    m = warp_max[0];
    for (int w = 1; w < row_threads / 32; ++w)
      m = warp_max[w] > m ? warp_max[w] : m;
    float const amax = qmem::detail::bits_to_float(m);
    if (threadIdx.x == 0)
      row_absmax[r] = amax;
    float const scale = fmath::div(127.0f, amax);
    std::int8_t* qr = q + r * cols;
    for (std::size_t c = threadIdx.x; c < cols; c += row_threads)
      qr[c] = detail::rowwise_encode(to_float(xr[c]), scale);
    __syncthreads(); // warp_max is reused by the next row
  }
}

template <class T>
__global__ void __launch_bounds__(flat_threads)
    dequantize_rows(std::int8_t const* __restrict__ q, float const* __restrict__ row_absmax,
                    std::size_t n, std::size_t cols, T* __restrict__ y) {
  std::size_t const stride = static_cast<std::size_t>(gridDim.x) * flat_threads;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * flat_threads + threadIdx.x; i < n;
       i += stride)
    y[i] = from_float<T>(detail::rowwise_decode(q[i], row_absmax[i / cols]));
}

} // namespace rowwise_kernels

//! Row-wise int8 quantization of x[rows][cols] on `e`'s stream (preconditions checked by
//! quant::quantize_rowwise). Stream-ordered; does not synchronize.
template <float_element T>
void quantize_rowwise(exec::cuda const& e, tensor_view<T const> x, std::size_t rows,
                      std::size_t cols, tensor_view<std::int8_t> q, tensor_view<float> row_absmax) {
  qmem::cuda_detail::device_guard guard(e.device);
  using qmem::cuda_detail::arg;
  qmem::cuda_detail::check_resident(e, "quantize_rowwise",
                                    {arg("x", x), arg("q", q), arg("row_absmax", row_absmax)});
  std::size_t const max_grid = static_cast<std::size_t>(qmem::cuda_detail::sm_count(e.device)) * 8;
  auto const grid = static_cast<unsigned>(std::min(rows, max_grid));
  rowwise_kernels::quantize_rows<T><<<grid, rowwise_kernels::row_threads, 0, e.stream>>>(
      x.data(), rows, cols, q.data(), row_absmax.data());
  qmem::cuda_detail::check_launch(e, "quantize_rowwise");
}

//! y[r][c] = (q[r][c] * row_absmax[r]) * (1/127), one rounding to T, on `e`'s stream.
template <float_element T>
void dequantize_rowwise(exec::cuda const& e, tensor_view<std::int8_t const> q,
                        tensor_view<float const> row_absmax, std::size_t rows, std::size_t cols,
                        tensor_view<T> y) {
  std::size_t const n = rows * cols;
  if (n == 0)
    return;
  qmem::cuda_detail::device_guard guard(e.device);
  using qmem::cuda_detail::arg;
  qmem::cuda_detail::check_resident(e, "dequantize_rowwise",
                                    {arg("q", q), arg("row_absmax", row_absmax), arg("y", y)});
  std::size_t const max_grid = static_cast<std::size_t>(qmem::cuda_detail::sm_count(e.device)) *
                               rowwise_kernels::flat_ctas_per_sm;
  std::size_t const need = (n + rowwise_kernels::flat_threads - 1) / rowwise_kernels::flat_threads;
  auto const grid = static_cast<unsigned>(std::min(need, max_grid));
  rowwise_kernels::dequantize_rows<T><<<grid, rowwise_kernels::flat_threads, 0, e.stream>>>(
      q.data(), row_absmax.data(), n, cols, y.data());
  qmem::cuda_detail::check_launch(e, "dequantize_rowwise");
}

} // namespace qmem::quant::cuda_impl
