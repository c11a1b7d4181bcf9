#pragma once
//! \file
//! Blockwise quantization (bitsandbytes' `quantize_blockwise` / `quantize_4bit` without double
//! quantization): the elements are cut into consecutive blocks of `block_size` (the last one
//! partial), each block stores its fp32 absmax and one code per element. The function computed is
//! spelled out in quant/detail/blockwise_ops.hpp; host and CUDA compute it bit for bit alike.
//!
//! Layout, for n elements and code type C:
//!   codes   uint8[n]            (8-bit codes)
//!           uint8[ceil(n / 2)]  (4-bit codes: element 2i in the high nibble of byte i, element
//!                                2i+1 in the low nibble; an odd tail's low nibble is C::zero_code)
//!   absmax  float[ceil(n / block_size)]
//!
//! Non-finite input (documented, tested): a NaN anywhere in a block makes that block's absmax NaN,
//! so every element of the block dequantizes to NaN (bitsandbytes' GPU max ignores NaN and loses
//! it; qmem keeps it visible). An infinity makes the absmax +inf: finite elements then normalize to
//! 0 (their code is the code of 0), the infinity to inf * 0 = NaN, and dequantization gives
//! 0 * inf = NaN for the block. An all-zero block has absmax 0, 1/0 = inf, 0 * inf = NaN, encoded
//! as each code type encodes NaN (what bitsandbytes' arithmetic does); it dequantizes to
//! code_value * 0 = +-0.
//!
//! Backends: `exec::host` runs detail::parallel_for over whole blocks; `exec::cuda` (in a
//! translation unit compiled by nvcc) calls qmem::quant::cuda_impl::<same name><C>(e, <the other
//! arguments>) from quant/cuda/blockwise.cuh, after the checks here (cuda_impl does not repeat
//! them).

#include <qmem/core/config.hpp>
#include <qmem/core/detail/parallel.hpp>
#include <qmem/core/error.hpp>
#include <qmem/core/exec.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/core/tensor.hpp>
#include <qmem/quant/codes.hpp>
#include <qmem/quant/detail/blockwise_ops.hpp>
#include <qmem/quant/detail/host_isa.hpp>
#include <qmem/quant/detail/host_simd.hpp>
#include <qmem/quant/detail/search_table.hpp>
#include <qmem/quant/stochastic.hpp>

#include <bit>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#if QMEM_HAS_CUDA()
#if !defined(__has_include) || __has_include(<qmem/quant/cuda/blockwise.cuh>)
#include <qmem/quant/cuda/blockwise.cuh>
#define QMEM_QUANT_HAS_CUDA_BLOCKWISE 1
#endif
#endif
#ifndef QMEM_QUANT_HAS_CUDA_BLOCKWISE
#define QMEM_QUANT_HAS_CUDA_BLOCKWISE 0
#endif

namespace qmem::quant {
namespace detail {

template <class E>
inline constexpr bool always_false_v = false;

//! Checks one argument's pointer, alignment and memory space for executor E.
template <class E, class T>
void check_arg(tensor_view<T> v, char const* function, char const* name) {
  check_view(v, function, name, exec::is_host_v<E>, exec::is_cuda_v<E>);
}

//! Blocks handed to one host task at a time: whole blocks, at least 64 Ki elements per thread
//! (a thread start costs ~20 us, 64 Ki elements take ~50 us on the dev box).
inline std::size_t host_min_blocks(std::size_t block_size) noexcept {
  std::size_t const b = (std::size_t{1} << 16) / block_size;
  return b == 0 ? 1 : b;
}

//! Converts a block to float into `xs` and returns its absmax bits (see block_absmax_bits). The
//! bits are compared as signed integers (they are below 2^31): SSE2 has a signed compare only.
template <float_element T>
QMEM_INLINE std::uint32_t load_block(T const* QMEM_RESTRICT x, std::size_t count,
                                     float* QMEM_RESTRICT xs) noexcept {
  std::int32_t m = 0;
  for (std::size_t i = 0; i < count; ++i) {
    float const f = to_float(x[i]);
    xs[i] = f;
    auto const b = static_cast<std::int32_t>(abs_bits(f));
    m = b > m ? b : m;
  }
  return static_cast<std::uint32_t>(m);
}

//! Host quantization of blocks [first_block, last_block). Each block is converted to float once,
//! then encoded in a loop the compiler vectorizes (4-bit codes go through a byte array and are
//! packed after); 8-bit codes searched as bitsandbytes searches use search_table (the same codes,
//! one table load per value).
//! `Avx2`: the caller is the AVX2 clone (bf16 blocks are then widened with AVX2).
template <code_type C, bool Avx2, float_element T>
QMEM_INLINE void quantize_blocks_body(decltype(C::book) const& book, T const* QMEM_RESTRICT x,
                                      std::size_t n, std::size_t block_size,
                                      std::uint8_t* QMEM_RESTRICT codes,
                                      float* QMEM_RESTRICT absmax, rounding r,
                                      std::size_t first_block, std::size_t last_block) {
  // the pad nibble of an odd tail: the code of 0.0 (C::zero_code for every built-in code type)
  std::uint8_t const pad = C::encode(0.0f, book);
  alignas(64) float xs[4096];
  alignas(64) std::uint8_t cs[4096 + 1];
  for (std::size_t blk = first_block; blk < last_block; ++blk) {
    std::size_t const begin = blk * block_size;
    std::size_t const count = n - begin < block_size ? n - begin : block_size;
    std::uint32_t amax_bits = 0;
#if QMEM_QUANT_HOST_AVX2
    if constexpr (Avx2 && std::is_same_v<T, bf16>)
      amax_bits = load_block_bf16_avx2(x + begin, count, xs);
    else
#endif
      amax_bits = load_block(x + begin, count, xs);
    float const amax = qmem::detail::bits_to_float(amax_bits);
    absmax[blk] = amax;
    float const inv = fmath::rcp(amax);
    std::uint8_t* QMEM_RESTRICT out = C::bits == 8 ? codes + begin : cs;
    if (r.stochastic) {
      for (std::size_t i = 0; i < count; ++i)
        out[i] = encode_element<C>(xs[i], inv, book, r, begin + i);
    } else if constexpr (uses_bnb_search_v<C>) {
      search_table const& t = search_table_of<C>();
      for (std::size_t i = 0; i < count; ++i)
        out[i] = t.encode(fmath::mul(xs[i], inv));
    } else {
      for (std::size_t i = 0; i < count; ++i)
        out[i] = C::encode(fmath::mul(xs[i], inv), book);
    }
    if constexpr (C::bits == 4) {
      // block_size is even, so every block starts on a byte boundary
      cs[count] = pad;
      std::uint8_t* QMEM_RESTRICT cb = codes + begin / 2;
      std::size_t const bytes = count / 2 + count % 2;
      for (std::size_t i = 0; i < bytes; ++i)
        cb[i] = pack_nibbles(cs[2 * i], cs[2 * i + 1]);
    }
  }
}

//! Dequantizes block `blk` (scale `amax`) of n elements.
template <code_type C, float_element T>
QMEM_INLINE void dequantize_block_host(decltype(C::book) const& book,
                                       std::uint8_t const* QMEM_RESTRICT codes, float amax,
                                       std::size_t n, std::size_t block_size, T* QMEM_RESTRICT y,
                                       std::size_t blk) {
  std::size_t const begin = blk * block_size;
  std::size_t const count = n - begin < block_size ? n - begin : block_size;
  T* QMEM_RESTRICT yb = y + begin;
  if constexpr (C::bits == 8) {
    std::uint8_t const* QMEM_RESTRICT cb = codes + begin;
    for (std::size_t i = 0; i < count; ++i)
      yb[i] = from_float<T>(decode_element<C>(cb[i], amax, book));
  } else {
    // the 16 possible outputs of this block, then one lookup per element (the same values as
    // decode_element, computed 16 times instead of `count` times)
    T scaled[16];
    for (std::uint8_t k = 0; k < 16; ++k)
      scaled[k] = from_float<T>(decode_element<C>(k, amax, book));
    std::uint8_t const* QMEM_RESTRICT cb = codes + begin / 2;
    std::size_t const pairs = count / 2;
    for (std::size_t i = 0; i < pairs; ++i) {
      std::uint8_t const b = cb[i];
      yb[2 * i] = scaled[b >> 4];
      yb[2 * i + 1] = scaled[b & 0x0f];
    }
    if (count % 2 != 0)
      yb[count - 1] = scaled[cb[pairs] >> 4];
  }
}

template <code_type C, float_element T>
QMEM_INLINE void
dequantize_blocks_body(decltype(C::book) const& book, std::uint8_t const* QMEM_RESTRICT codes,
                       float const* QMEM_RESTRICT absmax, std::size_t n, std::size_t block_size,
                       T* QMEM_RESTRICT y, std::size_t first_block, std::size_t last_block) {
  for (std::size_t blk = first_block; blk < last_block; ++blk)
    dequantize_block_host<C>(book, codes, absmax[blk], n, block_size, y, blk);
}

// The host loops are compiled twice on x86-64 when the build does not already target AVX2: for
// the baseline ISA and for AVX2 (wider vectors, same IEEE operations, so the same bits; FMA is not
// enabled, so nothing is contracted), chosen at run time. Measured on the 2-core dev box (thread
// CPU time, 2^22 elements): NF4 quantize bf16 2.6 -> 1.4 ns per element.
#if QMEM_QUANT_HOST_AVX2
//! y[2i], y[2i+1] = scaled[codes[i] >> 4], scaled[codes[i] & 15] for i < bytes, with AVX2
//! permutes (16 floats per 8 code bytes) instead of scalar loads; the tail is scalar.
__attribute__((target("avx2"))) inline void
lookup_nibbles_avx2(float const* scaled, std::uint8_t const* codes, std::size_t bytes, float* y) {
  __m256 const lo = _mm256_loadu_ps(scaled);
  __m256 const hi = _mm256_loadu_ps(scaled + 8);
  __m256i const shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  __m256i const nibble_mask = _mm256_set1_epi32(15);
  __m256i const seven = _mm256_set1_epi32(7);
  std::size_t i = 0;
  std::size_t const vec_end = bytes - bytes % 8; // whole vectors (a form g++ can bound)
  for (; i < vec_end; i += 8) {
    __m128i const v = _mm_loadl_epi64(reinterpret_cast<__m128i const*>(codes + i));
    __m128i const twice = _mm_unpacklo_epi8(v, v); // b0 b0 b1 b1 ... b7 b7
    for (int half = 0; half < 2; ++half) {         // 8 bytes b b .. -> 8 floats
      __m128i const pairs = half == 0 ? twice : _mm_srli_si128(twice, 8);
      __m256i idx = _mm256_cvtepu8_epi32(pairs);
      idx = _mm256_and_si256(_mm256_srlv_epi32(idx, shifts), nibble_mask);
      __m256 const a = _mm256_permutevar8x32_ps(lo, idx);
      __m256 const b = _mm256_permutevar8x32_ps(hi, idx);
      _mm256_storeu_ps(y + 2 * i + 8 * half,
                       _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven))));
    }
  }
  for (; i < bytes; ++i) {
    y[2 * i] = scaled[codes[i] >> 4];
    y[2 * i + 1] = scaled[codes[i] & 0x0f];
  }
}

template <code_type C, float_element T>
__attribute__((target("avx2"))) void
quantize_blocks_avx2(decltype(C::book) const& book, T const* QMEM_RESTRICT x, std::size_t n,
                     std::size_t block_size, std::uint8_t* QMEM_RESTRICT codes,
                     float* QMEM_RESTRICT absmax, rounding r, std::size_t first_block,
                     std::size_t last_block) {
  quantize_blocks_body<C, true>(book, x, n, block_size, codes, absmax, r, first_block, last_block);
}
template <code_type C, float_element T>
__attribute__((target("avx2"))) void
dequantize_blocks_avx2(decltype(C::book) const& book, std::uint8_t const* QMEM_RESTRICT codes,
                       float const* QMEM_RESTRICT absmax, std::size_t n, std::size_t block_size,
                       T* QMEM_RESTRICT y, std::size_t first_block, std::size_t last_block) {
  auto block_range = [&](std::size_t blk) {
    std::size_t const begin = blk * block_size;
    return std::pair{begin, n - begin < block_size ? n - begin : block_size};
  };
  if constexpr (C::bits == 4 && std::is_same_v<T, float>) {
    // 4-bit to f32: AVX2 permutes instead of scalar lookups (dev box, thread CPU time, 2^22
    // elements: NF4 to f32 0.72 -> 0.52 ns per element)
    for (std::size_t blk = first_block; blk < last_block; ++blk) {
      auto const [begin, count] = block_range(blk);
      float scaled[16];
      for (std::uint8_t k = 0; k < 16; ++k)
        scaled[k] = decode_element<C>(k, absmax[blk], book);
      lookup_nibbles_avx2(scaled, codes + begin / 2, count / 2, y + begin);
      if (count % 2 != 0)
        y[begin + count - 1] = scaled[codes[(begin + count - 1) / 2] >> 4];
    }
  } else if constexpr (C::bits == 4 && (std::is_same_v<T, bf16> || std::is_same_v<T, f16>)) {
    // 4-bit to 16-bit floats: the block's 16 outputs as bit patterns (bf16: scaled and rounded on
    // 8 lanes), then byte-shuffle look-ups, 64 outputs per 32 code bytes (NF4 to bf16, block 64:
    // 0.30 -> 0.08 ns per element against c22542b's float permutes, measured as above)
    float values[16];
    for (std::uint8_t k = 0; k < 16; ++k)
      values[k] = C::decode(k, book);
    for (std::size_t blk = first_block; blk < last_block; ++blk) {
      auto const [begin, count] = block_range(blk);
      alignas(32) std::uint16_t table[16];
      if constexpr (std::is_same_v<T, bf16>) {
        scale_table_bf16_avx2(values, absmax[blk], table);
      } else {
        for (std::uint8_t k = 0; k < 16; ++k)
          table[k] = from_float<T>(decode_element<C>(k, absmax[blk], book)).bits;
      }
      auto* yb = reinterpret_cast<std::uint16_t*>(y + begin);
      lookup_nibbles_u16_avx2(table, codes + begin / 2, count / 2, yb);
      if (count % 2 != 0)
        yb[count - 1] = table[codes[(begin + count - 1) / 2] >> 4];
    }
  } else if constexpr (C::bits == 8 && (std::is_same_v<T, float> || std::is_same_v<T, bf16>)) {
    // 8-bit codes: gathers from the 256 decoded values, scaled and (bf16) rounded on 8 lanes
    alignas(32) float values[256];
    for (unsigned k = 0; k < 256; ++k)
      values[k] = C::decode(static_cast<std::uint8_t>(k), book);
    for (std::size_t blk = first_block; blk < last_block; ++blk) {
      auto const [begin, count] = block_range(blk);
      lookup_bytes_avx2(values, absmax[blk], codes + begin, count, y + begin);
    }
  } else {
    dequantize_blocks_body<C>(book, codes, absmax, n, block_size, y, first_block, last_block);
  }
}

// AVX-512F clones where 16 lanes pay. Measured on the dev box (2026-11-29, one thread, 2^16
// elements in L2, best of 200 calls, ns per element; "before" = commit c22542b's loops):
// NF4 quantize from bf16 1.07 -> 0.30, from f32 1.06 -> 0.30 (a 4-step binary search of
// permutes instead of 15 compares per value); 8-bit dequantize (dynamic_signed) to bf16
// 0.45 -> 0.17 (AVX2 gathers alone: 0.27), to f32 0.37 -> 0.16; 8-bit quantize with bnb's
// searched maps (dynamic_signed, block 256) from f32 or bf16 2.03 -> 0.33 (search_table's vector
// look-up, one gather per 16 values, instead of the scalar loop; against commit 573c696).
//! NF4 quantization of blocks [first_block, last_block) without stochastic rounding, AVX-512F.
template <float_element T>
__attribute__((target("avx2,avx512f"))) void
quantize_blocks_nf4_avx512(T const* QMEM_RESTRICT x, std::size_t n, std::size_t block_size,
                           std::uint8_t* QMEM_RESTRICT codes, float* QMEM_RESTRICT absmax,
                           std::size_t first_block, std::size_t last_block) {
  for (std::size_t blk = first_block; blk < last_block; ++blk) {
    std::size_t const begin = blk * block_size;
    std::size_t const count = n - begin < block_size ? n - begin : block_size;
    absmax[blk] = quantize_block_nf4_avx512(x + begin, count, codes + begin / 2);
  }
}

//! NF4 quantization of blocks [first_block, last_block) without stochastic rounding through the
//! 32-bucket look-up (host_simd.hpp, nf4_bucket_table; AVX-512 BW and VBMI). Blocks of up to
//! nf4_group_max_block elements go 16 at a time: their absmax lanes reduced across the 16 blocks
//! by one shuffle tree and 16 / absmax taken by one vector division, instead of a horizontal
//! maximum and a scalar division per block.
//! Dev box, one thread, 2^16 values in L2, best of 300 calls, ns per value (binary search before
//! -> buckets per block -> grouped): NF4 from bf16, block 64: 0.30 -> 0.18 -> 0.15; block 256:
//! 0.24 -> 0.14 -> 0.12; block 4096 (not grouped): 0.21 -> 0.11; from f32, block 64:
//! 0.30 -> 0.17 -> 0.15.
inline constexpr std::size_t nf4_group_max_block = 256;

template <float_element T>
__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi"))) void
quantize_blocks_nf4_bucket_avx512(T const* QMEM_RESTRICT x, std::size_t n, std::size_t block_size,
                                  std::uint8_t* QMEM_RESTRICT codes, float* QMEM_RESTRICT absmax,
                                  std::size_t first_block, std::size_t last_block) {
  nf4_bucket_regs const b = load_nf4_buckets();
  std::size_t blk = first_block;
  if (block_size <= nf4_group_max_block) {
    for (; blk + 16 <= last_block && (blk + 16) * block_size <= n; blk += 16) {
      __m512i lanes[16];
      for (std::size_t j = 0; j < 16; ++j)
        lanes[j] = absmax_lanes_avx512bw(x + (blk + j) * block_size, block_size);
      __m512i bits = reduce16_max_epu32(lanes);
      if constexpr (std::is_same_v<T, bf16>)
        bits = _mm512_maskz_slli_epi32(all16, bits, 16);
      __m512 const amax = _mm512_castsi512_ps(bits);
      _mm512_storeu_ps(absmax + blk, amax);
      // 1 / absmax as fmath::rcp divides (IEEE), then * 16 (exact while finite)
      __m512 const inv16 = _mm512_maskz_mul_ps(
          all16, _mm512_maskz_div_ps(all16, _mm512_set1_ps(1.0f), amax), _mm512_set1_ps(16.0f));
      alignas(64) float inv16s[16];
      _mm512_store_ps(inv16s, inv16);
      __m512i const abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
      __mmask16 const applies =
          _mm512_cmplt_epu32_mask(_mm512_and_si512(bits, abs_mask), inf) &
          _mm512_cmplt_epu32_mask(_mm512_and_si512(_mm512_castps_si512(inv16), abs_mask), inf);
      for (std::size_t j = 0; j < 16; ++j) {
        std::size_t const begin = (blk + j) * block_size;
        if ((applies >> j) & 1) [[likely]]
          encode_block_nf4_bucket_avx512(x + begin, block_size, inv16s[j], codes + begin / 2, b);
        else
          quantize_block_nf4_avx512(x + begin, block_size, codes + begin / 2);
      }
    }
  }
  for (; blk < last_block; ++blk) {
    std::size_t const begin = blk * block_size;
    std::size_t const count = n - begin < block_size ? n - begin : block_size;
    absmax[blk] = quantize_block_nf4_bucket_avx512(x + begin, count, codes + begin / 2);
  }
}

//! 8-bit quantization with bitsandbytes' searched maps (search_table) of blocks
//! [first_block, last_block) without stochastic rounding, AVX-512F.
template <code_type C, float_element T>
__attribute__((target("avx2,avx512f"))) void
quantize_blocks_searched_avx512(T const* QMEM_RESTRICT x, std::size_t n, std::size_t block_size,
                                std::uint8_t* QMEM_RESTRICT codes, float* QMEM_RESTRICT absmax,
                                std::size_t first_block, std::size_t last_block) {
  search_table const& t = search_table_of<C>();
  for (std::size_t blk = first_block; blk < last_block; ++blk) {
    std::size_t const begin = blk * block_size;
    std::size_t const count = n - begin < block_size ? n - begin : block_size;
    absmax[blk] = quantize_block_searched_avx512(t, x + begin, count, codes + begin);
  }
}

//! 8-bit dequantization of blocks [first_block, last_block) to float, bf16 or f16, AVX-512F.
template <code_type C, float_element T>
__attribute__((target("avx2,avx512f"))) void dequantize_blocks_8bit_avx512(
    decltype(C::book) const& book, std::uint8_t const* QMEM_RESTRICT codes,
    float const* QMEM_RESTRICT absmax, std::size_t n, std::size_t block_size, T* QMEM_RESTRICT y,
    std::size_t first_block, std::size_t last_block) {
  alignas(64) float values[256];
  for (unsigned k = 0; k < 256; ++k)
    values[k] = C::decode(static_cast<std::uint8_t>(k), book);
  for (std::size_t blk = first_block; blk < last_block; ++blk) {
    std::size_t const begin = blk * block_size;
    std::size_t const count = n - begin < block_size ? n - begin : block_size;
    lookup_bytes_avx512(values, absmax[blk], codes + begin, count, y + begin);
  }
}

//! Largest block whose 4-bit codes go to bf16 / f16 through lookup_nibbles_u16_avx512 (the block's
//! 16 outputs looked up by byte permutes, 64 per step); larger ones keep the AVX2 byte shuffles.
//! Dev box, one thread, 2^16 values in L2, best of 300, ns per value (AVX2 -> this), NF4 to
//! bf16: block 32: 0.40 -> 0.13 (the AVX2 loop had only a scalar tail for 16 code bytes);
//! 64: 0.084 -> 0.061; 256: 0.050 -> 0.040; 1024: 0.040 -> 0.040; 4096: 0.034 -> 0.041.
//! To f16, block 64: 0.30 -> 0.064 (the AVX2 loop rounds the 16 outputs with scalar code).
inline constexpr std::size_t nibble_permute_max_block = 1024;

//! Largest block whose 4-bit codes go to float through lookup_nibbles_f32_avx512 (byte permutes
//! spread the codes, `vpermps` looks the block's 16 outputs up); the loop is bound by its 4-byte
//! stores, so larger blocks keep the AVX2 permutes. Dev box, one thread, 2^16 values in L2, ns
//! per value (AVX2 -> this, two runs), NF4: block 32: 0.14 -> 0.12; 64: 0.120 -> 0.089-0.101;
//! 256: 0.113 -> 0.106-0.127.
inline constexpr std::size_t nibble_f32_max_block = 128;

//! 4-bit dequantization of blocks [first_block, last_block) with AVX-512 VBMI (and BF16 for the
//! 16-bit outputs): the block's 16 outputs by lookup_nibbles_f32_avx512 for float, by
//! lookup_nibbles_u16_avx512 for bf16 / f16.
template <code_type C, float_element T>
__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi"))) void
dequantize_blocks_4bit_avx512(decltype(C::book) const& book,
                              std::uint8_t const* QMEM_RESTRICT codes,
                              float const* QMEM_RESTRICT absmax, std::size_t n,
                              std::size_t block_size, T* QMEM_RESTRICT y, std::size_t first_block,
                              std::size_t last_block) {
  alignas(64) float values[16];
  for (unsigned k = 0; k < 16; ++k)
    values[k] = C::decode(static_cast<std::uint8_t>(k), book);
  for (std::size_t blk = first_block; blk < last_block; ++blk) {
    std::size_t const begin = blk * block_size;
    std::size_t const count = n - begin < block_size ? n - begin : block_size;
    if constexpr (std::is_same_v<T, float>)
      lookup_nibbles_f32_avx512(values, absmax[blk], codes + begin / 2, count, y + begin);
    else
      lookup_nibbles_u16_avx512(values, absmax[blk], codes + begin / 2, count, y + begin);
  }
}

//! The smallest block whose 8-bit codes go to bf16 / f16 through the block's 256-entry table
//! (half that when the table is mirrored, fp8); smaller blocks gather. Dev box, one thread, 2^16
//! codes in L2, ns per code to bf16 (gathers with the integer rounding before -> gathers with
//! the hardware one -> table): dynamic_signed block 64: 0.19 -> 0.19 -> 0.23 (table not taken);
//! block 128: 0.18 -> 0.17 -> 0.15; block 4096: 0.17 -> 0.16 -> 0.06; fp8_e4m3 (mirrored)
//! block 64: 0.19 -> 0.19 -> 0.17; block 128: 0.18 -> 0.17 -> 0.11. To f16, the gathers with the
//! integer rounding took 0.45-0.53; now as bf16.
inline constexpr std::size_t byte_table_min_block = 128;

//! 8-bit dequantization of blocks [first_block, last_block) to T = bf16 or f16 with AVX-512 BW,
//! VBMI and BF16 (host_simd.hpp): blocks of byte_table_min_block elements or more through the
//! block's 256 outputs and byte permutes, smaller ones through gathers of the decoded values,
//! multiplied and rounded per element. A block whose absmax is in [2^-100, FLT_MAX] has no
//! subnormal product (every nonzero decoded value is at least 2^-26, checked here) and NaN
//! products only from NaN codes, made canonical in `hw_values`: such blocks use the hardware
//! roundings unchecked, the others checked.
template <code_type C, float_element T>
__attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi"))) void
dequantize_blocks_8bit_u16_avx512(decltype(C::book) const& book,
                                  std::uint8_t const* QMEM_RESTRICT codes,
                                  float const* QMEM_RESTRICT absmax, std::size_t n,
                                  std::size_t block_size, T* QMEM_RESTRICT y,
                                  std::size_t first_block, std::size_t last_block) {
  alignas(64) float values[256];
  alignas(64) float hw_values[256]; // NaN as 0x7fc00000 (bf16) or sign | 0x7fc00000 (f16)
  bool tiny_free = true;
  for (unsigned k = 0; k < 256; ++k) {
    float const v = C::decode(static_cast<std::uint8_t>(k), book);
    values[k] = v;
    std::uint32_t const u = qmem::detail::float_to_bits(v);
    bool const nan = (u & 0x7fffffffu) > 0x7f800000u;
    std::uint32_t const sign = std::is_same_v<T, f16> ? u & 0x80000000u : 0u;
    hw_values[k] = nan ? qmem::detail::bits_to_float(sign | 0x7fc00000u) : v;
    tiny_free = tiny_free && (nan || v == 0.0f || abs_bits(v) >= 0x32800000u); // 2^-26
  }
  byte_table_shape shape;
  shape.mirrored = true;
  for (unsigned k = 0; k < 128; ++k) {
    std::uint32_t const u = qmem::detail::float_to_bits(hw_values[k]);
    std::uint32_t const m = qmem::detail::float_to_bits(hw_values[k + 128]);
    bool const nan = (u & 0x7fffffffu) > 0x7f800000u;
    bool const nan_mirror = (m & 0x7fffffffu) > 0x7f800000u;
    bool const flip = !(nan && std::is_same_v<T, bf16>); // bf16 NaN is 0x7fc0 either way
    shape.mirrored = shape.mirrored && nan == nan_mirror && (!flip || m == (u ^ 0x80000000u));
    if (flip)
      shape.flip[k / 64] |= __mmask64{1} << (k % 64);
  }
  constexpr hw_round checked = hw_round::checked, unchecked = hw_round::unchecked;
  bool const table =
      block_size >= (shape.mirrored ? byte_table_min_block / 2 : byte_table_min_block);
  for (std::size_t blk = first_block; blk < last_block; ++blk) {
    std::size_t const begin = blk * block_size;
    std::size_t const count = n - begin < block_size ? n - begin : block_size;
    float const a = absmax[blk];
    bool const safe = tiny_free && a >= 0x1p-100f && a <= 0x1.fffffep127f;
    std::uint8_t const* const cb = codes + begin;
    T* const yb = y + begin;
    if (table) {
      if (safe)
        lookup_bytes_table_avx512<T, unchecked>(hw_values, a, cb, count, yb, shape);
      else
        lookup_bytes_table_avx512<T, checked>(values, a, cb, count, yb, shape);
    } else {
      if (safe)
        lookup_bytes_gather_avx512<T, unchecked>(hw_values, a, cb, count, yb);
      else
        lookup_bytes_gather_avx512<T, checked>(values, a, cb, count, yb);
    }
  }
}
#endif

//! Host quantization of blocks [first_block, last_block) (see quantize_blocks_body).
template <code_type C, float_element T>
void quantize_blocks_host(decltype(C::book) const& book, T const* QMEM_RESTRICT x, std::size_t n,
                          std::size_t block_size, std::uint8_t* QMEM_RESTRICT codes,
                          float* QMEM_RESTRICT absmax, rounding r, std::size_t first_block,
                          std::size_t last_block) {
#if QMEM_QUANT_HOST_AVX2
  if constexpr (std::is_same_v<C, nf4> && (std::is_same_v<T, float> || std::is_same_v<T, bf16>)) {
    if (!r.stochastic && host_has_avx512_bf16()) {
      quantize_blocks_nf4_bucket_avx512(x, n, block_size, codes, absmax, first_block, last_block);
      return;
    }
    if (!r.stochastic && host_has_avx512()) {
      quantize_blocks_nf4_avx512(x, n, block_size, codes, absmax, first_block, last_block);
      return;
    }
  }
  if constexpr (uses_bnb_search_v<C> && (std::is_same_v<T, float> || std::is_same_v<T, bf16>)) {
    if (!r.stochastic && host_has_avx512()) {
      quantize_blocks_searched_avx512<C>(x, n, block_size, codes, absmax, first_block, last_block);
      return;
    }
  }
  if (host_has_avx2()) {
    quantize_blocks_avx2<C>(book, x, n, block_size, codes, absmax, r, first_block, last_block);
    return;
  }
#endif
  quantize_blocks_body<C, false>(book, x, n, block_size, codes, absmax, r, first_block, last_block);
}

//! Host dequantization of blocks [first_block, last_block).
template <code_type C, float_element T>
void dequantize_blocks_host(decltype(C::book) const& book, std::uint8_t const* QMEM_RESTRICT codes,
                            float const* QMEM_RESTRICT absmax, std::size_t n,
                            std::size_t block_size, T* QMEM_RESTRICT y, std::size_t first_block,
                            std::size_t last_block) {
#if QMEM_QUANT_HOST_AVX2
  if constexpr (C::bits == 4 && !std::is_same_v<T, double>) {
    std::size_t const max_block =
        std::is_same_v<T, float> ? nibble_f32_max_block : nibble_permute_max_block;
    if (block_size <= max_block && host_has_avx512_bf16()) {
      dequantize_blocks_4bit_avx512<C>(book, codes, absmax, n, block_size, y, first_block,
                                       last_block);
      return;
    }
  }
  if constexpr (C::bits == 8 && (std::is_same_v<T, bf16> || std::is_same_v<T, f16>)) {
    if (host_has_avx512_bf16()) {
      dequantize_blocks_8bit_u16_avx512<C>(book, codes, absmax, n, block_size, y, first_block,
                                           last_block);
      return;
    }
  }
  if constexpr (C::bits == 8 &&
                (std::is_same_v<T, float> || std::is_same_v<T, bf16> || std::is_same_v<T, f16>)) {
    if (host_has_avx512()) {
      dequantize_blocks_8bit_avx512<C>(book, codes, absmax, n, block_size, y, first_block,
                                       last_block);
      return;
    }
  }
  if (host_has_avx2()) {
    dequantize_blocks_avx2<C>(book, codes, absmax, n, block_size, y, first_block, last_block);
    return;
  }
#endif
  dequantize_blocks_body<C>(book, codes, absmax, n, block_size, y, first_block, last_block);
}

//! The shared size checks of the blockwise entry points.
template <code_type C>
void check_blockwise_sizes(char const* function, std::size_t n, std::size_t block_size,
                           std::size_t codes_size, std::size_t absmax_size) {
  if (!valid_block_size<C>(block_size))
    qmem::detail::raise(function, ": block_size is ", block_size, "; expected a power of two in [",
                        C::bits == 4 ? 32 : 64, ", 4096] for ", C::bits, "-bit codes");
  if (codes_size != code_bytes<C>(n))
    qmem::detail::raise(function, ": codes has ", codes_size, " bytes; expected ", code_bytes<C>(n),
                        " for ", n, " elements of ", C::bits, "-bit codes");
  if (absmax_size != block_count(n, block_size))
    qmem::detail::raise(function, ": absmax has ", absmax_size, " elements; expected ",
                        block_count(n, block_size), " (ceil(", n, " / ", block_size, "))");
}

} // namespace detail

//! Quantizes `x` blockwise with code type `C`: absmax[b] = max |x| over block b, codes as laid
//! out in this file's comment, rounded as `r` says (nearest: bitsandbytes' codes, up to its
//! approximate reciprocal; stochastic: reproducible from r.seed).
//! Preconditions (checked before anything is written; qmem::bad_argument otherwise):
//! valid_block_size<C>(block_size); codes.size() == code_bytes<C>(x.size()); absmax.size() ==
//! block_count(x.size(), block_size); every view non-null when non-empty, aligned, and reachable
//! by `e` (host memory for exec::host, device-accessible memory for exec::cuda); x, codes and
//! absmax do not overlap one another. Bytes moved: n * sizeof(T) read, codes and absmax written.
template <code_type C, exec::execution E, float_element T>
void quantize_blockwise(E const& e, tensor_view<T const> x, std::size_t block_size,
                        tensor_view<std::uint8_t> codes, tensor_view<float> absmax,
                        rounding r = {}) {
  constexpr char const* fn = "quantize_blockwise";
  detail::check_arg<E>(x, fn, "x");
  detail::check_arg<E>(codes, fn, "codes");
  detail::check_arg<E>(absmax, fn, "absmax");
  detail::check_blockwise_sizes<C>(fn, x.size(), block_size, codes.size(), absmax.size());
  qmem::detail::check_pairwise_disjoint(fn, {{x, "x"}, {codes, "codes"}, {absmax, "absmax"}});
  if (x.empty())
    return;
  if constexpr (exec::is_cuda_v<E>) {
#if QMEM_HAS_CUDA() && QMEM_QUANT_HAS_CUDA_BLOCKWISE
    cuda_impl::quantize_blockwise<C>(e, x, block_size, codes, absmax, r);
#else
    static_assert(detail::always_false_v<E>,
                  "qmem::quant::quantize_blockwise with exec::cuda needs a translation unit "
                  "compiled by nvcc (and quant/cuda/blockwise.cuh)");
#endif
  } else {
    std::size_t const n = x.size();
    std::size_t const blocks = absmax.size();
    qmem::detail::parallel_for(
        e, blocks, 1,
        [&](std::size_t b0, std::size_t b1) {
          detail::quantize_blocks_host<C>(C::book, x.data(), n, block_size, codes.data(),
                                          absmax.data(), r, b0, b1);
        },
        detail::host_min_blocks(block_size));
  }
}

//! Dequantizes blockwise codes of code type `C`: y[i] = C::decode(code_i) * absmax[i / block_size]
//! in float, rounded once to T.
//! Preconditions (checked before anything is written): valid_block_size<C>(block_size);
//! codes.size() == code_bytes<C>(y.size()); absmax.size() == block_count(y.size(), block_size);
//! views non-null when non-empty, aligned, reachable by `e`; y overlaps neither codes nor absmax
//! (codes and absmax may share memory: both are only read). Every code value is valid (4-bit codes
//! use all 16, 8-bit codes all 256 patterns).
template <code_type C, exec::execution E, float_element T>
void dequantize_blockwise(E const& e, tensor_view<std::uint8_t const> codes,
                          tensor_view<float const> absmax, std::size_t block_size,
                          tensor_view<T> y) {
  constexpr char const* fn = "dequantize_blockwise";
  detail::check_arg<E>(codes, fn, "codes");
  detail::check_arg<E>(absmax, fn, "absmax");
  detail::check_arg<E>(y, fn, "y");
  detail::check_blockwise_sizes<C>(fn, y.size(), block_size, codes.size(), absmax.size());
  qmem::detail::check_disjoint(codes, y, fn, "codes", "y");
  qmem::detail::check_disjoint(absmax, y, fn, "absmax", "y");
  if (y.empty())
    return;
  if constexpr (exec::is_cuda_v<E>) {
#if QMEM_HAS_CUDA() && QMEM_QUANT_HAS_CUDA_BLOCKWISE
    cuda_impl::dequantize_blockwise<C>(e, codes, absmax, block_size, y);
#else
    static_assert(detail::always_false_v<E>,
                  "qmem::quant::dequantize_blockwise with exec::cuda needs a translation unit "
                  "compiled by nvcc (and quant/cuda/blockwise.cuh)");
#endif
  } else {
    std::size_t const n = y.size();
    qmem::detail::parallel_for(
        e, absmax.size(), 1,
        [&](std::size_t b0, std::size_t b1) {
          detail::dequantize_blocks_host<C>(C::book, codes.data(), absmax.data(), n, block_size,
                                            y.data(), b0, b1);
        },
        detail::host_min_blocks(block_size));
  }
}

} // namespace qmem::quant
