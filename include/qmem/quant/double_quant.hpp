#pragma once
//! \file
//! Double quantization of the block scales (bitsandbytes' `compress_statistics=True` for 4-bit,
//! `nested=True` for 8-bit): the fp32 absmax values are replaced by
//!   offset        float          mean(absmax), see below
//!   qabsmax       uint8[m]       absmax - offset, quantized with dynamic_signed ...
//!   absmax2       float[ceil(m / nested_block)]   ... blockwise in blocks of nested_block
//! and read back as nested_table[qabsmax] * absmax2, then + offset (each rounded in float).
//! bitsandbytes uses nested_block 256 for 4-bit formats and the data's block size for 8-bit.
//!
//! The offset is the mean of the absmax values in a fixed order, so that the host and the GPU
//! get the same bits: a 256-ary tree in double precision, each node the left-to-right sum of up to
//! 256 children (the leaves are the absmax values), then total / m rounded to float.
//! bitsandbytes computes torch's float32 mean on the GPU instead, whose reduction order is not
//! specified; the golden test measures how often the two agree (see docs/quant.md), and
//! quantize_scales_given_offset reproduces bitsandbytes exactly from its stored offset.

#include <qmem/core/config.hpp>
#include <qmem/core/detail/parallel.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/quant/blockwise.hpp>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/detail/blockwise_ops.hpp>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace qmem::quant {

//! Children per node of the offset's summation tree (see the file comment).
inline constexpr std::size_t offset_tree_arity = 256;

namespace detail {

//! The fixed-order mean of `v` (the double-quantization offset): a 256-ary tree of left-to-right
//! double sums, divided by n in double, rounded to float. n == 0 gives 0.
inline float tree_mean(float const* v, std::size_t n) {
  if (n == 0)
    return 0.0f;
  std::vector<double> level((n + offset_tree_arity - 1) / offset_tree_arity);
  for (std::size_t c = 0; c < level.size(); ++c) {
    double s = 0.0;
    std::size_t const end = (c + 1) * offset_tree_arity < n ? (c + 1) * offset_tree_arity : n;
    for (std::size_t i = c * offset_tree_arity; i < end; ++i)
      s += static_cast<double>(v[i]);
    level[c] = s;
  }
  while (level.size() > 1) {
    std::vector<double> next((level.size() + offset_tree_arity - 1) / offset_tree_arity);
    for (std::size_t c = 0; c < next.size(); ++c) {
      double s = 0.0;
      std::size_t const end =
          (c + 1) * offset_tree_arity < level.size() ? (c + 1) * offset_tree_arity : level.size();
      for (std::size_t i = c * offset_tree_arity; i < end; ++i)
        s += level[i];
      next[c] = s;
    }
    level.swap(next);
  }
  return static_cast<float>(level[0] / static_cast<double>(n));
}

//! Host body of quantize_scales after the offset is known.
inline void quantize_scales_host(exec::host const& e, float const* absmax, std::size_t m,
                                 std::size_t nested_block, float offset, std::uint8_t* qabsmax,
                                 float* absmax2) {
  // search_table gives dynamic_signed::encode's codes (bnb's 8-step search) with one table load
  // per value: 2^18 scales of NF4 block 64 (a 2^24-element weight) take 20.7 -> 1.0 ms (dev box, 2026-11-29)
  search_table const& table = search_table_of<dynamic_signed>();
  std::size_t const blocks = block_count(m, nested_block);
  qmem::detail::parallel_for(
      e, blocks, 1,
      [&](std::size_t b0, std::size_t b1) {
        for (std::size_t b = b0; b < b1; ++b) {
          std::size_t const begin = b * nested_block;
          std::size_t const count = m - begin < nested_block ? m - begin : nested_block;
          std::uint32_t mx = 0;
          for (std::size_t i = 0; i < count; ++i) {
            std::uint32_t const a = abs_bits(fmath::sub(absmax[begin + i], offset));
            mx = a > mx ? a : mx;
          }
          float const amax2 = qmem::detail::bits_to_float(mx);
          absmax2[b] = amax2;
          float const inv = fmath::rcp(amax2);
          for (std::size_t i = 0; i < count; ++i)
            qabsmax[begin + i] =
                table.encode(fmath::mul(fmath::sub(absmax[begin + i], offset), inv));
        }
      },
      host_min_blocks(nested_block));
}

inline void check_scales_sizes(char const* fn, std::size_t m, std::size_t nested_block,
                               std::size_t qabsmax_size, std::size_t absmax2_size) {
  if (!valid_block_size<dynamic_signed>(nested_block))
    qmem::detail::raise(fn, ": nested_block is ", nested_block,
                        "; expected a power of two in [64, 4096]");
  if (qabsmax_size != m)
    qmem::detail::raise(fn, ": qabsmax has ", qabsmax_size, " elements; expected ", m,
                        " (one code per absmax)");
  if (absmax2_size != block_count(m, nested_block))
    qmem::detail::raise(fn, ": absmax2 has ", absmax2_size, " elements; expected ",
                        block_count(m, nested_block), " (ceil(", m, " / ", nested_block, "))");
}

} // namespace detail

//! Double-quantizes block scales: offset[0] = the fixed-order mean of `absmax` (file comment);
//! qabsmax/absmax2 = quantize_blockwise<dynamic_signed> of (absmax[i] - offset) in blocks of
//! `nested_block`.
//! Preconditions (checked before anything is written): valid_block_size<dynamic_signed>(
//! nested_block); qabsmax.size() == absmax.size(); absmax2.size() == block_count(absmax.size(),
//! nested_block); offset.size() == 1; views non-null when non-empty, aligned, reachable by `e`;
//! no two views overlap.
template <exec::execution E>
void quantize_scales(E const& e, tensor_view<float const> absmax, std::size_t nested_block,
                     tensor_view<std::uint8_t> qabsmax, tensor_view<float> absmax2,
                     tensor_view<float> offset) {
  constexpr char const* fn = "quantize_scales";
  detail::check_arg<E>(absmax, fn, "absmax");
  detail::check_arg<E>(qabsmax, fn, "qabsmax");
  detail::check_arg<E>(absmax2, fn, "absmax2");
  detail::check_arg<E>(offset, fn, "offset");
  detail::check_scales_sizes(fn, absmax.size(), nested_block, qabsmax.size(), absmax2.size());
  QMEM_EXPECTS(offset.size() == 1, "offset has ", offset.size(), " elements; expected 1");
  qmem::detail::check_pairwise_disjoint(
      fn, {{absmax, "absmax"}, {qabsmax, "qabsmax"}, {absmax2, "absmax2"}, {offset, "offset"}});
  if constexpr (exec::is_cuda_v<E>) {
#if QMEM_HAS_CUDA() && QMEM_QUANT_HAS_CUDA_BLOCKWISE
    cuda_impl::quantize_scales(e, absmax, nested_block, qabsmax, absmax2, offset);
#else
    static_assert(detail::always_false_v<E>,
                  "qmem::quant::quantize_scales with exec::cuda needs a translation unit compiled "
                  "by nvcc (and quant/cuda/blockwise.cuh)");
#endif
  } else {
    float const off = detail::tree_mean(absmax.data(), absmax.size());
    detail::quantize_scales_host(e, absmax.data(), absmax.size(), nested_block, off, qabsmax.data(),
                                 absmax2.data());
    offset[0] = off;
  }
}

//! Blockwise quantization with double-quantized scales in one call: quantize_blockwise<C>(e, x,
//! block_size, codes, absmax, r), then quantize_scales(e, absmax, nested_block, qabsmax,
//! absmax2, offset), with the same results bit for bit (`absmax` receives the plain scales, the
//! nested quantization's input), on every backend. Both backends run the two passes: a fused GPU
//! form (the quantize kernel also leaving per-CTA partial sums of the offset's mean) measured
//! slower (docs/benchmarks.md, "dq7"); one call leaves room for a faster one.
//! Preconditions (checked before anything is written): those of quantize_blockwise and of
//! quantize_scales; no two of x, codes, absmax, qabsmax, absmax2 and offset overlap.
template <code_type C, exec::execution E, float_element T>
void quantize_blockwise_nested(E const& e, tensor_view<T const> x, std::size_t block_size,
                               tensor_view<std::uint8_t> codes, tensor_view<float> absmax,
                               std::size_t nested_block, tensor_view<std::uint8_t> qabsmax,
                               tensor_view<float> absmax2, tensor_view<float> offset,
                               rounding r = {}) {
  constexpr char const* fn = "quantize_blockwise_nested";
  detail::check_arg<E>(x, fn, "x");
  detail::check_arg<E>(codes, fn, "codes");
  detail::check_arg<E>(absmax, fn, "absmax");
  detail::check_arg<E>(qabsmax, fn, "qabsmax");
  detail::check_arg<E>(absmax2, fn, "absmax2");
  detail::check_arg<E>(offset, fn, "offset");
  detail::check_blockwise_sizes<C>(fn, x.size(), block_size, codes.size(), absmax.size());
  detail::check_scales_sizes(fn, absmax.size(), nested_block, qabsmax.size(), absmax2.size());
  QMEM_EXPECTS(offset.size() == 1, "offset has ", offset.size(), " elements; expected 1");
  qmem::detail::check_pairwise_disjoint(fn, {{x, "x"},
                                             {codes, "codes"},
                                             {absmax, "absmax"},
                                             {qabsmax, "qabsmax"},
                                             {absmax2, "absmax2"},
                                             {offset, "offset"}});
  quantize_blockwise<C>(e, x, block_size, codes, absmax, r);
  quantize_scales(e, tensor_view<float const>(absmax), nested_block, qabsmax, absmax2, offset);
}

//! quantize_scales with a given offset instead of the computed mean (host only): reproduces
//! bitsandbytes' qabsmax and absmax2 exactly from the offset it stored, and lets a caller choose
//! its own offset. Preconditions as quantize_scales (without `offset`); `offset` is any float.
inline void quantize_scales_given_offset(exec::host const& e, tensor_view<float const> absmax,
                                         std::size_t nested_block, float offset,
                                         tensor_view<std::uint8_t> qabsmax,
                                         tensor_view<float> absmax2) {
  constexpr char const* fn = "quantize_scales_given_offset";
  detail::check_arg<exec::host>(absmax, fn, "absmax");
  detail::check_arg<exec::host>(qabsmax, fn, "qabsmax");
  detail::check_arg<exec::host>(absmax2, fn, "absmax2");
  detail::check_scales_sizes(fn, absmax.size(), nested_block, qabsmax.size(), absmax2.size());
  qmem::detail::check_pairwise_disjoint(
      fn, {{absmax, "absmax"}, {qabsmax, "qabsmax"}, {absmax2, "absmax2"}});
  detail::quantize_scales_host(e, absmax.data(), absmax.size(), nested_block, offset,
                               qabsmax.data(), absmax2.data());
}

//! Reads double-quantized scales back: absmax[i] = (nested_table[qabsmax[i]] *
//! absmax2[i / nested_block]) + offset[0], each operation rounded in float.
//! Preconditions (checked before anything is written): valid_block_size<dynamic_signed>(
//! nested_block); qabsmax.size() == absmax.size(); absmax2.size() == block_count(absmax.size(),
//! nested_block); offset.size() == 1; views non-null when non-empty, aligned, reachable by `e`;
//! absmax overlaps none of the inputs.
template <exec::execution E>
void dequantize_scales(E const& e, tensor_view<std::uint8_t const> qabsmax,
                       tensor_view<float const> absmax2, tensor_view<float const> offset,
                       std::size_t nested_block, tensor_view<float> absmax) {
  constexpr char const* fn = "dequantize_scales";
  detail::check_arg<E>(qabsmax, fn, "qabsmax");
  detail::check_arg<E>(absmax2, fn, "absmax2");
  detail::check_arg<E>(offset, fn, "offset");
  detail::check_arg<E>(absmax, fn, "absmax");
  detail::check_scales_sizes(fn, absmax.size(), nested_block, qabsmax.size(), absmax2.size());
  QMEM_EXPECTS(offset.size() == 1, "offset has ", offset.size(), " elements; expected 1");
  qmem::detail::check_disjoint_from(
      fn, {absmax, "absmax"}, {{qabsmax, "qabsmax"}, {absmax2, "absmax2"}, {offset, "offset"}});
  if (absmax.empty())
    return;
  if constexpr (exec::is_cuda_v<E>) {
#if QMEM_HAS_CUDA() && QMEM_QUANT_HAS_CUDA_BLOCKWISE
    cuda_impl::dequantize_scales(e, qabsmax, absmax2, offset, nested_block, absmax);
#else
    static_assert(detail::always_false_v<E>,
                  "qmem::quant::dequantize_scales with exec::cuda needs a translation unit "
                  "compiled by nvcc (and quant/cuda/blockwise.cuh)");
#endif
  } else {
    float const off = offset[0];
    auto const& book = dynamic_signed::book;
    qmem::detail::parallel_for(e, absmax.size(), nested_block, [&](std::size_t i0, std::size_t i1) {
      for (std::size_t i = i0; i < i1; ++i)
        absmax[i] = detail::nested_scale(qabsmax[i], absmax2[i / nested_block], off, book);
    });
  }
}

//! Dequantizes blockwise codes whose scales are double-quantized, in one pass: the scale of block
//! b is (nested_table[qabsmax[b]] * absmax2[b / nested_block]) + offset[0], then y[i] =
//! C::decode(code_i) * scale, rounded once to T (bitsandbytes' arithmetic, bit for bit).
//! Preconditions (checked before anything is written): valid_block_size<C>(block_size);
//! valid_block_size<dynamic_signed>(nested_block); codes.size() == code_bytes<C>(y.size());
//! qabsmax.size() == block_count(y.size(), block_size); absmax2.size() ==
//! block_count(qabsmax.size(), nested_block); offset.size() == 1; views non-null when non-empty,
//! aligned, reachable by `e`; y overlaps none of the inputs.
template <code_type C, exec::execution E, float_element T>
void dequantize_blockwise_nested(E const& e, tensor_view<std::uint8_t const> codes,
                                 tensor_view<std::uint8_t const> qabsmax,
                                 tensor_view<float const> absmax2, tensor_view<float const> offset,
                                 std::size_t block_size, std::size_t nested_block,
                                 tensor_view<T> y) {
  constexpr char const* fn = "dequantize_blockwise_nested";
  detail::check_arg<E>(codes, fn, "codes");
  detail::check_arg<E>(qabsmax, fn, "qabsmax");
  detail::check_arg<E>(absmax2, fn, "absmax2");
  detail::check_arg<E>(offset, fn, "offset");
  detail::check_arg<E>(y, fn, "y");
  detail::check_blockwise_sizes<C>(fn, y.size(), block_size, codes.size(), qabsmax.size());
  detail::check_scales_sizes(fn, qabsmax.size(), nested_block, qabsmax.size(), absmax2.size());
  QMEM_EXPECTS(offset.size() == 1, "offset has ", offset.size(), " elements; expected 1");
  qmem::detail::check_disjoint_from(
      fn, {y, "y"},
      {{codes, "codes"}, {qabsmax, "qabsmax"}, {absmax2, "absmax2"}, {offset, "offset"}});
  if (y.empty())
    return;
  if constexpr (exec::is_cuda_v<E>) {
#if QMEM_HAS_CUDA() && QMEM_QUANT_HAS_CUDA_BLOCKWISE
    cuda_impl::dequantize_blockwise_nested<C>(e, codes, qabsmax, absmax2, offset, block_size,
                                              nested_block, y);
#else
    static_assert(detail::always_false_v<E>,
                  "qmem::quant::dequantize_blockwise_nested with exec::cuda needs a translation "
                  "unit compiled by nvcc (and quant/cuda/blockwise.cuh)");
#endif
  } else {
    std::size_t const n = y.size();
    float const off = offset[0];
    auto const& nbook = dynamic_signed::book;
    qmem::detail::parallel_for(
        e, qabsmax.size(), 1,
        [&](std::size_t b0, std::size_t b1) {
          // The chunk in pieces of `piece` blocks: the piece's scales into a stack buffer (it stays
          // in L1), then the plain blockwise loop over the piece. A heap vector of the whole
          // chunk's scales (512 KiB per thread at 2^24 elements) was a fresh mmap, page-faulted on
          // every call: 0.43-0.45 of a same-run copy against 0.56-0.58 without nesting (2-core
          // development box, idle, 2026-11-29).
          constexpr std::size_t piece = 1024;
          std::array<float, piece> scales;
          for (std::size_t p0 = b0; p0 < b1; p0 += piece) {
            std::size_t const p1 = std::min(b1, p0 + piece);
            // the nested group by counting, not by a 64-bit division per block
            std::size_t group = p0 / nested_block;
            std::size_t in_group = p0 % nested_block;
            for (std::size_t b = p0; b < p1; ++b) {
              scales[b - p0] = detail::nested_scale(qabsmax[b], absmax2[group], off, nbook);
              if (++in_group == nested_block) {
                in_group = 0;
                ++group;
              }
            }
            std::size_t const first = p0 * block_size;
            detail::dequantize_blocks_host<C>(C::book, codes.data() + code_bytes<C>(first),
                                              scales.data(), n - first, block_size,
                                              y.data() + first, 0, p1 - p0);
          }
        },
        detail::host_min_blocks(block_size));
  }
}

} // namespace qmem::quant
