// The encoders of the fused CUDA optimizer step (include/qmem/optim/cuda/state_format.hpp,
// bucket_search.hpp) return the code types' own codes: the one-read packed bucket search equals
// bitsandbytes' binary search and, over the 4-bit maps' thresholds, nearest4_code's search, on
// the host at every threshold and its neighbours and on the GPU for all 2^32 floats. The sign fix
// reads a code's sign from the code itself only where the table is ordered by sign. The short
// encode of blocks with a finite absmax (format_codec::encode_finite) equals F::encode, checked
// with the other format encoders over all 2^32 states.
#include <qmem/optim/cuda/bucket_search.hpp>
#include <qmem/optim/cuda/state_format.hpp>
#include <qmem/optim/state.hpp>
#include <qmem/quant/codes.hpp>

#include <doctest/doctest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <random>
#include <type_traits>

#include "support/backend.hpp"

#if QMEM_HAS_CUDA()
#include <qmem/core/cuda/runtime.cuh>
#include <qmem/memory/cuda_resource.cuh>
#include <qmem/optim/cuda/fused_step.cuh>
#include <qmem/optim/cuda/multi_tensor.cuh>
#include <qmem/optim/optimizer.hpp>
#include <qmem/optim/rules.hpp>

#include <cstring>
#include <vector>
#endif

namespace {

using namespace qmem;
namespace ocu = qmem::optim::cuda;
namespace cs = qmem::optim::cuda_search;

using dyn4 = optim::dynamic4_signed;
using lin4 = optim::linear4_unsigned;

// the methods the fused step uses for the built-in policies (a change here changes the kernels)
static_assert(ocu::codec<quant::dynamic_signed>::method == ocu::encode_method::packed_bucket);
static_assert(ocu::codec<quant::dynamic_unsigned>::method == ocu::encode_method::packed_bucket);
static_assert(ocu::codec<quant::linear_signed>::method == ocu::encode_method::bucket);
static_assert(ocu::codec<dyn4>::method == ocu::encode_method::packed_bucket);
static_assert(ocu::codec<lin4>::method == ocu::encode_method::packed_bucket);
static_assert(ocu::codec<quant::fp8_e4m3>::method == ocu::encode_method::code_search);
// bnb's signed dynamic map: codes 0..126 negative, 127 is +0, 128..255 positive
static_assert(ocu::detail::negative_code_prefix<quant::dynamic_signed>() == 127);
static_assert(ocu::detail::negative_code_prefix<quant::dynamic_unsigned>() == 0);

float step_to(float x, bool up) {
  return std::nextafter(x, up ? std::numeric_limits<float>::infinity()
                              : -std::numeric_limits<float>::infinity());
}

//! Codes of `codec` against `reference` at `x` and at its neighbours; returns the mismatches.
template <class Codec, class Ref>
int mismatches_around(Codec const& codec, Ref&& reference, float x) {
  int bad = 0;
  float const points[] = {step_to(step_to(x, false), false), step_to(x, false), x, step_to(x, true),
                          step_to(step_to(x, true), true)};
  for (float v : points)
    bad += codec.encode(v) != reference(v) ? 1 : 0;
  return bad;
}

//! Host check of one codec over special values, every threshold +- 2 ulps and random floats.
template <class Code>
void check_codec_host(float const* thresholds, int threshold_count) {
  static auto const c = ocu::codec<Code>::make(); // large: static storage, built once
  auto reference = [](float x) { return Code::encode(x, Code::book); };
  int bad = 0;
  int checked = 0;
  for (int i = 0; i < threshold_count; ++i, checked += 5)
    bad += mismatches_around(c, reference, thresholds[i]);
  float const specials[] = {0.0f,
                            -0.0f,
                            1.0f,
                            -1.0f,
                            std::numeric_limits<float>::infinity(),
                            -std::numeric_limits<float>::infinity(),
                            std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::denorm_min(),
                            -std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::max(),
                            std::numeric_limits<float>::min()};
  for (float v : specials) {
    bad += c.encode(v) != reference(v) ? 1 : 0;
    ++checked;
  }
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> in_range(-1.0f, 1.0f);
  for (int i = 0; i < 200000; ++i, ++checked) {
    float const v =
        i % 2 == 0 ? in_range(rng) : std::bit_cast<float>(static_cast<std::uint32_t>(rng()));
    bad += c.encode(v) != reference(v) ? 1 : 0;
  }
  CHECK_MESSAGE(bad == 0, bad, " of ", checked, " codes differ");
}

TEST_CASE("packed bucket search == bnb_search256 (host: thresholds, specials, samples)") {
  check_codec_host<quant::dynamic_signed>(cs::bucket_table_of<quant::dynamic_signed>.threshold,
                                          255);
  check_codec_host<quant::dynamic_unsigned>(cs::bucket_table_of<quant::dynamic_unsigned>.threshold,
                                            255);
}

TEST_CASE("4-bit packed search == nearest4_code's search (host: thresholds, specials, samples)") {
  constexpr auto t_dyn = ocu::detail::nearest4_thresholds<dyn4>();
  constexpr auto t_lin = ocu::detail::nearest4_thresholds<lin4>();
  check_codec_host<dyn4>(t_dyn.data(), 15);
  check_codec_host<lin4>(t_lin.data(), 15);
  // the thresholds lie between neighbouring table values, ascending
  for (int i = 0; i < 15; ++i) {
    CHECK(dyn4::book.sorted[i] < t_dyn[static_cast<std::size_t>(i)]);
    CHECK(t_dyn[static_cast<std::size_t>(i)] <= dyn4::book.sorted[i + 1]);
  }
}

TEST_CASE("the linear 4-bit map's rounding-upward code == nearest4_code's search (host: every "
          "float within 2^16 ulps of each value and midpoint, specials, samples)") {
  using u4 = optim::blockwise_format<lin4, 128>;
  using codec_t = ocu::format_codec<u4>;
  static_assert(codec_t::linear16_route);
  // the code from 16 xn (exact scaling: the route's quotient is 16 RN(s / absmax))
  auto route = [](float xn) { return codec_t::code_of_high(codec_t::linear16_code(16.0f * xn)); };
  auto reference = [](float xn) { return lin4::encode(xn, lin4::book); };
  int bad = 0;
  int checked = 0;
  auto check = [&](float xn) {
    bad += route(xn) != reference(xn) ? 1 : 0;
    ++checked;
  };
  for (int j = 0; j <= 32; ++j) { // values j / 16 and midpoints (j + 0.5) / 16 (j / 32 in all)
    auto const center = std::bit_cast<std::int32_t>(static_cast<float>(j) / 32.0f);
    for (std::int32_t d = -(1 << 16); d <= (1 << 16); ++d) {
      std::int32_t const u = center + d;
      if (u >= 0 && std::bit_cast<float>(u) <= 1.0f)
        check(std::bit_cast<float>(u));
    }
  }
  float const specials[] = {0.0f,
                            -0.0f,
                            1.0f,
                            -1.0f,
                            -0.5f,
                            std::numeric_limits<float>::quiet_NaN(),
                            -std::numeric_limits<float>::quiet_NaN(),
                            std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::min(),
                            0x1p-30f};
  for (float xn : specials)
    check(xn);
  std::mt19937 rng(16);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  for (int i = 0; i < 200000; ++i)
    check(unit(rng));
  CHECK_MESSAGE(bad == 0, bad, " of ", checked, " codes differ");
}

TEST_CASE("the sign fix from the code equals the sign fix from the table (every code and sign)") {
  using F = optim::blockwise_format<quant::dynamic_signed, 256, true>;
  static auto const fc = ocu::format_codec<F>::make();
  float const states[] = {1e-9f, -1e-9f, 0.3f, -0.3f, 1.0f, -1.0f, 0.0f, -0.0f, 7e-8f, -7e-8f};
  float const absmaxes[] = {1.0f, 0.3f, 1e-9f, 3e8f};
  int bad = 0;
  for (float s : states)
    for (float a : absmaxes)
      bad += fc.encode(s, a) != F::encode(s, a) ? 1 : 0;
  CHECK(bad == 0);
}

TEST_CASE("the short 8-bit encode of finite blocks == F::encode (host: specials, samples)") {
  using s8 = optim::blockwise_format<quant::dynamic_signed, 256, true>;
  using u8 = optim::blockwise_format<quant::dynamic_unsigned, 256>;
  static_assert(ocu::format_codec<s8>::finite_route && ocu::format_codec<u8>::finite_route);
  static_assert(!ocu::format_codec<optim::blockwise_format<dyn4, 128>>::finite_route);
  // v's encode clamps up to 2^-24 (its code is +0's) instead of clamping the bucket key
  static_assert(ocu::format_codec<u8>::floor_route && !ocu::format_codec<s8>::floor_route);
  // the sign fix's cap of negative states at code 126 lives in the signed table
  static_assert(ocu::format_codec<s8>::negative_cap == 126 &&
                ocu::format_codec<u8>::negative_cap < 0);
  static auto const fs = ocu::format_codec<s8>::make();
  static auto const fu = ocu::format_codec<u8>::make();
  using s4 = optim::blockwise_format<dyn4, 128>;
  using u4 = optim::blockwise_format<lin4, 128>;
  static_assert(ocu::format_codec<s4>::signed_floor_route && ocu::format_codec<u4>::floor_route);
  // the linear map without zero encodes by one upward rounding; the 4-bit codes sit at bit 28 or 0
  static_assert(ocu::format_codec<u4>::linear16_route && !ocu::format_codec<s4>::linear16_route);
  static_assert(ocu::format_codec<s4>::code_shift == 28 && ocu::format_codec<u4>::code_shift == 0 &&
                ocu::format_codec<s8>::code_shift == 24);
  static auto const f4s = ocu::format_codec<s4>::make();
  static auto const f4u = ocu::format_codec<u4>::make();
  float const inf = std::numeric_limits<float>::infinity();
  float const nan = std::numeric_limits<float>::quiet_NaN();
  // the blocks that take the short route: signed with 0 < absmax < inf, unsigned always
  CHECK(fs.finite_block(1.0f));
  CHECK(fs.finite_block(std::numeric_limits<float>::denorm_min()));
  CHECK(fs.finite_block(std::numeric_limits<float>::max()));
  CHECK_FALSE(fs.finite_block(0.0f));
  CHECK_FALSE(fs.finite_block(inf));
  CHECK(fu.finite_block(0.0f));
  CHECK(fu.finite_block(inf));
  float const specials[] = {0.0f,
                            -0.0f,
                            1.0f,
                            -1.0f,
                            inf,
                            -inf,
                            nan,
                            -nan,
                            1e-30f,
                            -1e-30f,
                            std::numeric_limits<float>::denorm_min(),
                            -std::numeric_limits<float>::denorm_min(),
                            std::numeric_limits<float>::max(),
                            -std::numeric_limits<float>::max()};
  float const absmaxes[] = {1.0f, 0.37f, 1e-9f, 3e8f, 1e-40f, std::numeric_limits<float>::max()};
  std::mt19937 rng(77);
  int bad = 0;
  int checked = 0;
  for (float a : absmaxes) {
    auto const ss = fs.scale_of(a);
    auto const su = fu.scale_of(a);
    auto check = [&](float s) {
      bad += fs.encode_finite(s, ss) != s8::encode(s, a) ? 1 : 0;
      bad += fu.encode_finite(s, su) != u8::encode(s, a) ? 1 : 0;
      // the 4-bit tables (codes at bit 28): the general and the finite encode
      bad += f4s.encode(s, f4s.scale_of(a)) != s4::encode(s, a) ? 1 : 0;
      bad += f4u.encode(s, f4u.scale_of(a)) != u4::encode(s, a) ? 1 : 0;
      bad += f4u.encode_finite(s, f4u.scale_of(a)) != u4::encode(s, a) ? 1 : 0;
      checked += 5;
      if (std::fabs(s) <= a || s != s) { // a block's own states: the fused step's encode
        using c8s = ocu::format_codec<s8>;
        using c8u = ocu::format_codec<u8>;
        using c4s = ocu::format_codec<s4>;
        using c4u = ocu::format_codec<u4>;
        bad += c8s::code_of_high(fs.encode_block_high(s, ss)) != s8::encode(s, a) ? 1 : 0;
        bad += c8u::code_of_high(fu.encode_block_high(s, su)) != u8::encode(s, a) ? 1 : 0;
        bad += c4s::code_of_high(f4s.encode_block_high(s, f4s.scale_of(a))) != s4::encode(s, a) ? 1
                                                                                                : 0;
        bad += c4u::code_of_high(f4u.encode_block_high(s, f4u.scale_of(a))) != u4::encode(s, a) ? 1
                                                                                                : 0;
        checked += 4;
      }
    };
    for (float s : specials)
      check(s);
    std::uniform_real_distribution<float> in_block(-a, a);
    for (int i = 0; i < 20000; ++i)
      check(i % 2 == 0 ? in_block(rng) : std::bit_cast<float>(static_cast<std::uint32_t>(rng())));
  }
  // the unsigned short route holds for any absmax (its blocks never branch)
  for (float a : {0.0f, inf})
    for (float s : specials) {
      bad += fu.encode_finite(s, fu.scale_of(a)) != u8::encode(s, a) ? 1 : 0;
      ++checked;
    }
  CHECK_MESSAGE(bad == 0, bad, " of ", checked, " codes differ");
}

} // namespace

#if QMEM_HAS_CUDA()
namespace {

//! The codec image the GPU check copies into shared memory (as the fused kernel does).
template <class Code>
__device__ ocu::codec<Code> const codec_image = ocu::codec<Code>::make();
//! A format's codec image (its table may differ from the code type's: format_codec::negative_cap).
template <class F>
__device__ ocu::format_codec<F> const format_codec_image = ocu::format_codec<F>::make();

template <class Code>
__global__ void exhaustive_codec_kernel(std::remove_cv_t<decltype(Code::book)> book,
                                        unsigned long long* mismatches) {
  using codec_t = ocu::codec<Code>;
  static_assert(sizeof(codec_t) % 4 == 0);
  __shared__ std::uint32_t words[sizeof(codec_t) / 4];
  __shared__ std::remove_cv_t<decltype(Code::book)> reference_book;
  auto const* src = reinterpret_cast<std::uint32_t const*>(&codec_image<Code>);
  for (unsigned w = threadIdx.x; w < sizeof(codec_t) / 4; w += blockDim.x)
    words[w] = src[w];
  if (threadIdx.x == 0)
    reference_book = book;
  __syncthreads();
  auto const& c = *reinterpret_cast<codec_t const*>(words);
  unsigned long long bad = 0;
  std::uint64_t const stride = std::uint64_t{gridDim.x} * blockDim.x;
  for (std::uint64_t u = std::uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; u < (1ull << 32);
       u += stride) {
    float const x = __uint_as_float(static_cast<std::uint32_t>(u));
    bad += c.encode(x) != Code::encode(x, reference_book) ? 1u : 0u;
  }
  if (bad != 0)
    atomicAdd(mismatches, bad);
}

template <class Code>
unsigned long long exhaustive_codec_mismatches() {
  unsigned long long* d = nullptr;
  cuda_detail::check(cudaMalloc(&d, sizeof(*d)), "cudaMalloc");
  cuda_detail::check(cudaMemset(d, 0, sizeof(*d)), "cudaMemset");
  exhaustive_codec_kernel<Code><<<132 * 8, 256>>>(Code::book, d);
  cuda_detail::check(cudaGetLastError(), "exhaustive_codec_kernel");
  unsigned long long h = 0;
  cuda_detail::check(cudaMemcpy(&h, d, sizeof(h), cudaMemcpyDeviceToHost), "cudaMemcpy");
  cuda_detail::check(cudaFree(d), "cudaFree");
  return h;
}

//! Counts the states s (all 2^32 bit patterns) whose code under format F's fused encode (block
//! reciprocal in double, shared-memory codec) differs from F::encode's (IEEE fp32 division),
//! with the block absmax `absmax`.
template <class F>
__global__ void exhaustive_format_kernel(typename F::book_type book, float absmax,
                                         unsigned long long* mismatches) {
  using codec_t = ocu::format_codec<F>;
  static_assert(sizeof(codec_t) % 4 == 0);
  __shared__ std::uint32_t words[sizeof(codec_t) / 4];
  __shared__ typename F::book_type reference_book;
  auto const* src = reinterpret_cast<std::uint32_t const*>(&format_codec_image<F>);
  for (unsigned w = threadIdx.x; w < sizeof(codec_t) / 4; w += blockDim.x)
    words[w] = src[w];
  if (threadIdx.x == 0)
    reference_book = book;
  __syncthreads();
  auto const& fc = *reinterpret_cast<codec_t const*>(words);
  auto const scale = fc.scale_of(absmax);
  bool const finite = fc.finite_block(absmax); // the fused step's short route applies too
  unsigned long long bad = 0;
  std::uint64_t const stride = std::uint64_t{gridDim.x} * blockDim.x;
  for (std::uint64_t u = std::uint64_t{blockIdx.x} * blockDim.x + threadIdx.x; u < (1ull << 32);
       u += stride) {
    float const s = __uint_as_float(static_cast<std::uint32_t>(u));
    std::uint8_t const expected = F::encode(s, absmax, reference_book);
    bad += fc.encode(s, scale) != expected ? 1u : 0u;
    bad += finite && fc.encode_finite(s, scale) != expected ? 1u : 0u;
    if constexpr (codec_t::has_block_route) {
      // the fused step's encode of a block's own states (|s| <= absmax or NaN)
      if (codec_t::block_route(absmax) && (fabsf(s) <= absmax || s != s))
        bad += codec_t::code_of_high(fc.encode_block_high(s, scale)) != expected ? 1u : 0u;
    }
  }
  if (bad != 0)
    atomicAdd(mismatches, bad);
}

template <class F>
unsigned long long exhaustive_format_mismatches(float absmax) {
  static_assert(sizeof(ocu::format_codec<F>) == sizeof(ocu::codec<typename F::code>));
  unsigned long long* d = nullptr;
  cuda_detail::check(cudaMalloc(&d, sizeof(*d)), "cudaMalloc");
  cuda_detail::check(cudaMemset(d, 0, sizeof(*d)), "cudaMemset");
  exhaustive_format_kernel<F><<<132 * 8, 256>>>(F::code::book, absmax, d);
  cuda_detail::check(cudaGetLastError(), "exhaustive_format_kernel");
  unsigned long long h = 0;
  cuda_detail::check(cudaMemcpy(&h, d, sizeof(h), cudaMemcpyDeviceToHost), "cudaMemcpy");
  cuda_detail::check(cudaFree(d), "cudaFree");
  return h;
}

TEST_CASE(
    "fused-step state encode (double and fp32 block routes) == F::encode: all 2^32 states (GPU)") {
  if (!test::gpu_present()) {
    std::printf("[qmem] SKIPPED on cuda: no CUDA device on this machine\n");
    MESSAGE("skipped: no CUDA device");
    return;
  }
  using s8 = optim::blockwise_format<quant::dynamic_signed, 256, true>;
  using u8 = optim::blockwise_format<quant::dynamic_unsigned, 256>;
  using s4 = optim::blockwise_format<dyn4, 128>;
  using u4 = optim::blockwise_format<lin4, 128>;
  static_assert(ocu::format_codec<s8>::reciprocal_normalize &&
                ocu::format_codec<u4>::reciprocal_normalize);
  // typical, odd-mantissa, tiny (denormal and normal) and huge block maxima, and the ends of the
  // fp32 block route (format_codec::block_route_min / max) with an odd mantissa next to each; the
  // states of all 2^32 bit patterns include every |s| <= absmax that a block can hold, and more
  float const absmaxes[] = {
      1.0f,    0.1f, 3.0e-3f,  1.2345678e-7f,   7.7e12f,         1.0e-40f,       1.17549435e-38f,
      3.0e38f, 0.0f, 0x1p-72f, 0x1.3c5e7ap-71f, 0x1.fffffep125f, 0x1.9a3b2cp125f};
  for (float a : absmaxes) {
    CAPTURE(a);
    CHECK(exhaustive_format_mismatches<s8>(a) == 0);
    CHECK(exhaustive_format_mismatches<u8>(a) == 0);
    CHECK(exhaustive_format_mismatches<s4>(a) == 0);
    CHECK(exhaustive_format_mismatches<u4>(a) == 0);
  }
}

//! Mismatches of the fused step's arithmetic shortcuts against the IEEE functions they replace:
//! [0] bf16x2_nearest vs float_to_bf16_bits (every non-NaN float, in both halves), [1]
//! sqrt_in_range vs __fsqrt_rn (every float in [2^-100, 2^100]), [2] div_in_range vs __fdiv_rn
//! (every divisor mantissa at 7 exponents of [2^-51, 2^61] against 96 numerators spread over
//! [2^-60, 2^60] with both signs, and 2^30 hashed pairs of the whole range).
__global__ void exhaustive_arithmetic_kernel(unsigned long long* mismatches) {
  unsigned long long bad[3] = {0, 0, 0};
  std::uint64_t const stride = std::uint64_t{gridDim.x} * blockDim.x;
  std::uint64_t const first = std::uint64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  for (std::uint64_t u = first; u < (1ull << 32); u += stride) {
    std::uint32_t const b = static_cast<std::uint32_t>(u);
    float const x = __uint_as_float(b);
    if (x == x) {
      std::uint32_t const y = b ^ 0x5a5a5a5au; // another float for the other half
      float const yf = __uint_as_float(y) == __uint_as_float(y) ? __uint_as_float(y) : 1.0f;
      std::uint32_t const pair = ocu::detail::bf16x2_nearest(x, yf);
      std::uint32_t const want = (std::uint32_t{qmem::detail::float_to_bf16_bits(x)} << 16) |
                                 qmem::detail::float_to_bf16_bits(yf);
      bad[0] += pair != want ? 1u : 0u;
    }
    if (x >= 0x1p-100f && x <= 0x1p100f)
      bad[1] += __float_as_uint(ocu::detail::sqrt_in_range(x)) != __float_as_uint(__fsqrt_rn(x))
                    ? 1u
                    : 0u;
  }
  // divisors: every mantissa at 7 exponents; numerators: 96 per divisor
  constexpr int divisor_exponents[] = {-51, -50, -20, 0, 1, 33, 60};
  for (std::uint64_t u = first; u < 7ull << 23; u += stride) {
    int const e = divisor_exponents[u >> 23];
    float const d =
        ldexpf(__uint_as_float(0x3f800000u | static_cast<std::uint32_t>(u & 0x7fffffu)), e);
    for (int k = 0; k < 96; ++k) {
      std::uint32_t h =
          static_cast<std::uint32_t>(u) * 0x9e3779b9u + static_cast<std::uint32_t>(k) * 0x85ebca6bu;
      h ^= h >> 15;
      h *= 0x2c1b3c6du;
      h ^= h >> 12;
      int const ne = -60 + static_cast<int>((h >> 8) % 121u); // [-60, 60]
      float n = ldexpf(__uint_as_float(0x3f800000u | (h & 0x7fffffu)), ne);
      if (ne == 60)
        n = 0x1p60f; // the top of the range
      n = (k & 1) != 0 ? -n : n;
      bad[2] += __float_as_uint(ocu::detail::div_in_range(n, d)) != __float_as_uint(__fdiv_rn(n, d))
                    ? 1u
                    : 0u;
    }
  }
  for (std::uint64_t u = first; u < (1ull << 30); u += stride) {
    std::uint32_t h = static_cast<std::uint32_t>(u) * 0x9e3779b9u;
    h ^= h >> 16;
    h *= 0x7feb352du;
    h ^= h >> 15;
    std::uint32_t h2 = h * 0x846ca68bu;
    h2 ^= h2 >> 16;
    float const n = ldexpf(__uint_as_float(0x3f800000u | (h & 0x7fffffu)),
                           -60 + static_cast<int>((h >> 23) % 120u));
    float const d = ldexpf(__uint_as_float(0x3f800000u | (h2 & 0x7fffffu)),
                           -51 + static_cast<int>((h2 >> 23) % 112u));
    float const sn = (h2 & 1u) != 0 ? -n : n;
    bad[2] += __float_as_uint(ocu::detail::div_in_range(sn, d)) != __float_as_uint(__fdiv_rn(sn, d))
                  ? 1u
                  : 0u;
  }
  for (int i = 0; i < 3; ++i)
    if (bad[i] != 0)
      atomicAdd(mismatches + i, bad[i]);
}

TEST_CASE("fused-step arithmetic shortcuts == the IEEE functions (bf16, sqrt: every float; div: "
          "sweeps) (GPU)") {
  if (!test::gpu_present()) {
    std::printf("[qmem] SKIPPED on cuda: no CUDA device on this machine\n");
    MESSAGE("skipped: no CUDA device");
    return;
  }
  unsigned long long* d = nullptr;
  cuda_detail::check(cudaMalloc(&d, 3 * sizeof(*d)), "cudaMalloc");
  cuda_detail::check(cudaMemset(d, 0, 3 * sizeof(*d)), "cudaMemset");
  exhaustive_arithmetic_kernel<<<132 * 8, 256>>>(d);
  cuda_detail::check(cudaGetLastError(), "exhaustive_arithmetic_kernel");
  unsigned long long h[3] = {};
  cuda_detail::check(cudaMemcpy(h, d, sizeof(h), cudaMemcpyDeviceToHost), "cudaMemcpy");
  cuda_detail::check(cudaFree(d), "cudaFree");
  CHECK_MESSAGE(h[0] == 0, "bf16x2_nearest: ", h[0], " mismatches");
  CHECK_MESSAGE(h[1] == 0, "sqrt_in_range: ", h[1], " mismatches");
  CHECK_MESSAGE(h[2] == 0, "div_in_range: ", h[2], " mismatches");
}

//! Device step of one large tensor == host optimizer, bit for bit, over `steps` steps: large
//! enough that every warp runs several full tasks of it (the pipelined loads of fused_step_kernel
//! and the lane-wide update of lane_update), with a tail task, gradients that are zero over a run
//! of elements (v = 0: the IEEE square root and division, not the in-range ones), and NaN and
//! inf gradients (skip_element per element). With skip_step (the kernels that assume every
//! gradient finite) only the second step's gradients hold the NaN and the inf: that step is
//! skipped, the others run.
template <class Rule, class Policy, class P>
void large_tensor_matches_host(
    Rule rule, std::size_t n, int steps, unsigned seed,
    qmem::optim::nonfinite_policy nonfinite = qmem::optim::nonfinite_policy::skip_element) {
  namespace oq = qmem::optim;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<P> p0(n);
  for (auto& x : p0)
    x = from_float<P>(0.05f * nd(rng));
  std::vector<std::vector<P>> grads(static_cast<std::size_t>(steps), std::vector<P>(n));
  for (int s = 0; s < steps; ++s) {
    auto& g = grads[static_cast<std::size_t>(s)];
    for (std::size_t i = 0; i < n; ++i)
      g[i] = from_float<P>((s % 2 == 0 ? 1e-2f : 3e-3f) * nd(rng));
    for (std::size_t i = 4096; i < 4096 + 3000; ++i) // zero gradients: v stays 0
      g[i] = from_float<P>(0.0f);
    if (nonfinite == oq::nonfinite_policy::skip_step && s != 1)
      continue;
    g[777777 % n] = from_float<P>(std::numeric_limits<float>::quiet_NaN());
    g[(n / 3) | 1] = from_float<P>(std::numeric_limits<float>::infinity());
  }
  oq::optimizer_options oo;
  oo.lr = oq::lr_schedule::constant(1e-3f);
  oo.nonfinite = nonfinite;
  oo.min_quantized_size = 0;
  // host
  std::vector<P> hp = p0;
  oq::optimizer<Rule, Policy, P> opt(rule, oo);
  opt.add_param(tensor_view<P>(hp.data(), n, memory_space::host));
  for (auto const& g : grads) {
    std::vector<tensor_view<P const>> gv{tensor_view<P const>(g.data(), n, memory_space::host)};
    (void)opt.step(exec::host{}, gv, oq::step_options{1.0f, false});
  }
  // device
  memory::cuda_device_resource dres(0);
  exec::cuda const e{};
  ocu::cuda_step_options co;
  co.lr = oo.lr;
  co.nonfinite = oo.nonfinite;
  ocu::step_controller ctl(e, dres, co);
  using group_t = ocu::multi_tensor_step<Rule, Policy, P, P>;
  using traits = typename group_t::traits;
  std::vector<void*> owned;
  auto alloc = [&](std::size_t bytes) {
    void* d = nullptr;
    cuda_detail::check(cudaMalloc(&d, bytes + 16), "cudaMalloc");
    cuda_detail::check(cudaMemset(d, 0, bytes + 16), "cudaMemset");
    owned.push_back(d);
    return d;
  };
  typename group_t::tensor t;
  t.size = n;
  t.rule = rule;
  auto* dp = static_cast<P*>(alloc(n * sizeof(P)));
  auto* dg = static_cast<P*>(alloc(n * sizeof(P)));
  cuda_detail::check(cudaMemcpy(dp, p0.data(), n * sizeof(P), cudaMemcpyHostToDevice), "H2D");
  t.param = dp;
  t.grad = dg;
  ocu::detail::for_each_state_host<Rule::state_count>([&](auto J) {
    using F = typename traits::template format<J.value>;
    t.state[J.value] = alloc(F::bytes(n));
    t.absmax[J.value] = static_cast<float*>(alloc(F::scale_count(n) * 4));
  });
  group_t group(e, std::span<typename group_t::tensor const>(&t, 1), dres, ctl);
  for (auto const& g : grads) {
    cuda_detail::check(cudaMemcpy(dg, g.data(), n * sizeof(P), cudaMemcpyHostToDevice), "H2D");
    group.step(e);
  }
  cuda_detail::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  std::vector<P> got(n);
  cuda_detail::check(cudaMemcpy(got.data(), dp, n * sizeof(P), cudaMemcpyDeviceToHost), "D2H");
  CHECK(std::memcmp(got.data(), hp.data(), n * sizeof(P)) == 0);
  auto const& ps = opt.params()[0];
  ocu::detail::for_each_state_host<Rule::state_count>([&](auto J) {
    using F = typename traits::template format<J.value>;
    INFO("state ", J.value);
    std::vector<std::uint8_t> codes(F::bytes(n));
    cuda_detail::check(
        cudaMemcpy(codes.data(), t.state[J.value], codes.size(), cudaMemcpyDeviceToHost), "D2H");
    CHECK(std::memcmp(codes.data(), ps.data[J.value].data(), codes.size()) == 0);
    if constexpr (F::blockwise) {
      std::vector<float> am(F::scale_count(n));
      cuda_detail::check(
          cudaMemcpy(am.data(), t.absmax[J.value], am.size() * 4, cudaMemcpyDeviceToHost), "D2H");
      CHECK(std::memcmp(am.data(), ps.scale[J.value].data(), am.size() * 4) == 0);
    }
  });
  for (void* d : owned)
    (void)cudaFree(d);
}

TEST_CASE("fused step, several full tasks per warp (pipelined loads) == host optimizer (GPU)") {
  if (!test::gpu_present()) {
    std::printf("[qmem] SKIPPED on cuda: no CUDA device on this machine\n");
    MESSAGE("skipped: no CUDA device");
    return;
  }
  namespace oq = qmem::optim;
  // full tasks and a tail: 12288 tasks of 256 (the 32-bit steps' tasks may be larger,
  // QMEM_OPTIM_FUSED_FP32_TASK_ELEMENTS)
  std::size_t const n = (std::size_t{3} << 20) + 77;
  SUBCASE("AdamW 8-bit, fp32 params") {
    large_tensor_matches_host<oq::adamw, oq::int8_state, float>(oq::adamw{}, n, 3, 11);
  }
  SUBCASE("AdamW 8-bit, bf16 params") {
    large_tensor_matches_host<oq::adamw, oq::int8_state, bf16>(oq::adamw{}, n, 3, 12);
  }
  SUBCASE("AdamW 4-bit, fp32 params") {
    large_tensor_matches_host<oq::adamw, oq::int4_state, float>(oq::adamw{}, n, 3, 13);
  }
  SUBCASE("AdamW 4-bit, fp32 params, skip_step (its own kernel; the second step skipped)") {
    large_tensor_matches_host<oq::adamw, oq::int4_state, float>(oq::adamw{}, n, 3, 17,
                                                                oq::nonfinite_policy::skip_step);
  }
  SUBCASE("Lion 8-bit, fp32 params") {
    large_tensor_matches_host<oq::lion, oq::int8_state, float>(oq::lion{}, n, 3, 14);
  }
  SUBCASE("Lion 4-bit, fp32 params (three tasks in registers)") {
    large_tensor_matches_host<oq::lion, oq::int4_state, float>(oq::lion{}, n, 3, 16);
  }
  SUBCASE("AdamW 32-bit, fp32 params") {
    large_tensor_matches_host<oq::adamw, oq::fp32_state, float>(oq::adamw{}, n, 3, 15);
  }
  SUBCASE("AdamW 32-bit, fp32 params, skip_step (its own kernel; the second step skipped)") {
    large_tensor_matches_host<oq::adamw, oq::fp32_state, float>(oq::adamw{}, n, 3, 18,
                                                                oq::nonfinite_policy::skip_step);
  }
  SUBCASE("Lion 32-bit, fp32 params") {
    large_tensor_matches_host<oq::lion, oq::fp32_state, float>(oq::lion{}, n, 3, 19);
  }
}

TEST_CASE("fused-step encoders == the code types' encode for all 2^32 floats (GPU)") {
  if (!test::gpu_present()) {
    std::printf("[qmem] SKIPPED on cuda: no CUDA device on this machine\n");
    MESSAGE("skipped: no CUDA device");
    return;
  }
  CHECK(exhaustive_codec_mismatches<quant::dynamic_signed>() == 0);
  CHECK(exhaustive_codec_mismatches<quant::dynamic_unsigned>() == 0);
  CHECK(exhaustive_codec_mismatches<dyn4>() == 0);
  CHECK(exhaustive_codec_mismatches<lin4>() == 0);
}

} // namespace
#endif
