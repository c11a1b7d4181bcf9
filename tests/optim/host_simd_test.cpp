// The host step's exact table encoder and its SIMD kernels (optim/detail/host_simd.hpp):
// - the search table (quant/detail/search_table.hpp) equals `C::encode` for every code type it
//   serves, 8-bit (bitsandbytes' searched maps) and 4-bit (the optimizer's maps): a strided sweep
//   over all 2^32 float patterns, every table value and midpoint +-8 ulps, every bucket edge; with
//   QMEM_EXHAUSTIVE=1 every one of the 2^32 floats (minutes). Its AVX2 and AVX-512 forms are
//   compared on the same values where the CPU has them;
// - the step with the AVX2 kernels, and with the AVX-512 ones, equals the portable step bit for
//   bit (parameters, codes, absmax) for every rule x quantized policy, odd sizes, partial blocks,
//   non-finite gradients.
#include <qmem/optim.hpp>

#include <doctest/doctest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "optim_test_support.hpp"

namespace {

using namespace qmem;

using optim::detail::host_isa;

// Sets the highest ISA of the host step; restores it when the test case ends.
struct isa_limit {
  int const saved = optim::detail::host_isa_limit().load();
  ~isa_limit() { optim::detail::host_isa_limit().store(saved); }
  void set(host_isa i) { optim::detail::host_isa_limit().store(static_cast<int>(i)); }
};

#if QMEM_OPTIM_HOST_SIMD
// Sets where the 8-bit step's arithmetic encoder runs (host_arith8_mode: by default on AMD CPUs
// only); restores it when the test case ends.
struct arith8_mode {
  int const saved = optim::detail::host_arith8_mode().load();
  ~arith8_mode() { optim::detail::host_arith8_mode().store(saved); }
  void set(int m) { optim::detail::host_arith8_mode().store(m); }
};
#endif

// The ISAs this machine runs, portable first.
std::vector<host_isa> isas() {
  isa_limit l;
  std::vector<host_isa> r;
  for (host_isa i : {host_isa::portable, host_isa::avx2, host_isa::avx512}) {
    l.set(i);
    if (optim::detail::current_host_isa() == i)
      r.push_back(i);
  }
  return r;
}

#if QMEM_OPTIM_HOST_SIMD
__attribute__((target("avx2"))) void table_encode_avx2(quant::detail::search_table const& t,
                                                       float const* x, std::uint8_t* out) {
  alignas(32) std::uint32_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     optim::detail::table_encode8(t, _mm256_loadu_ps(x)));
  for (int i = 0; i < 8; ++i)
    out[i] = static_cast<std::uint8_t>(lanes[i]);
}
__attribute__((target("avx512f"))) void table_encode_avx512(quant::detail::search_table const& t,
                                                            float const* x, std::uint8_t* out) {
  alignas(64) std::uint32_t lanes[16];
  _mm512_store_si512(lanes, optim::detail::table_encode16(t, _mm512_loadu_ps(x)));
  for (int i = 0; i < 16; ++i)
    out[i] = static_cast<std::uint8_t>(lanes[i]);
}
#endif

// Compares search table `table` with `want` (float -> code) on a strided sweep of all float
// patterns (every one with QMEM_EXHAUSTIVE=1), every level of `sorted` and every midpoint +-8
// ulps, every bucket edge, zeros, infinities and NaN (not with `finite_only`); with `simd`, the
// AVX2 and AVX-512 look-ups (table_encode8, table_encode16) on the same values where the CPU has
// them.
template <class Want, std::size_t Levels>
void check_table_against(char const* name, quant::detail::search_table const& table,
                         Want const& want_of, float const (&sorted)[Levels], bool simd,
                         bool finite_only = false) {
  CAPTURE(name);
  REQUIRE(table.exact());
  auto const run = isas();
  bool const avx2 = simd && run.size() > 1;
  bool const avx512 = simd && run.size() > 2;
  std::size_t checked = 0, bad = 0;
  float batch[16];
  std::uint8_t wanted[16]; // want_of(batch) (computed once: the exhaustive run is long)
  int filled = 0;
  auto flush = [&] {
#if QMEM_OPTIM_HOST_SIMD
    auto compare = [&](std::uint8_t const* got, int n, char const* isa) {
      for (int i = 0; i < n; ++i)
        if (got[i] != wanted[i] && bad++ < 10)
          FAIL_CHECK(isa, " x = ", batch[i], " (bits ", std::bit_cast<std::uint32_t>(batch[i]),
                     "): ", int(got[i]), ", encode ", int(wanted[i]));
    };
    if (filled == 16) {
      std::uint8_t got[16];
      if (avx2) {
        table_encode_avx2(table, batch, got);
        table_encode_avx2(table, batch + 8, got + 8);
        compare(got, 16, "AVX2");
      }
      if (avx512) {
        table_encode_avx512(table, batch, got);
        compare(got, 16, "AVX-512");
      }
    }
#endif
    filled = 0;
  };
  auto check = [&](float x) {
    if (finite_only && std::isnan(x))
      return;
    ++checked;
    std::uint8_t const want = want_of(x);
    std::uint8_t const got = table.encode(x);
    if (got != want && bad++ < 10)
      FAIL_CHECK("x = ", x, " (bits ", std::bit_cast<std::uint32_t>(x), "): table ", int(got),
                 ", encode ", int(want));
    batch[filled] = x;
    wanted[filled++] = want;
    if (filled == 16)
      flush();
  };
  auto around = [&](float v, int ulps) {
    auto const u = std::bit_cast<std::uint32_t>(v);
    for (int d = -ulps; d <= ulps; ++d)
      check(std::bit_cast<float>(static_cast<std::uint32_t>(static_cast<std::int64_t>(u) + d)));
  };
  bool const exhaustive = std::getenv("QMEM_EXHAUSTIVE") != nullptr;
  std::uint64_t const stride = exhaustive ? 1 : 4099;
  for (std::uint64_t u = 0; u < (std::uint64_t{1} << 32); u += stride)
    check(std::bit_cast<float>(static_cast<std::uint32_t>(u)));
  for (std::size_t i = 0; i < Levels; ++i) {
    around(sorted[i], 8);
    around(-sorted[i], 8);
    if (i + 1 < Levels)
      around((sorted[i] + sorted[i + 1]) * 0.5f, 8);
  }
  using quant::detail::search_table;
  for (std::uint32_t k = search_table::key_lo; k <= search_table::key_hi; ++k) {
    around(std::bit_cast<float>(k << search_table::shift), 2);
    around(-std::bit_cast<float>(k << search_table::shift), 2);
  }
  float const inf = std::numeric_limits<float>::infinity();
  for (float x : {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(),
                  -std::numeric_limits<float>::quiet_NaN(), 1.0f, -1.0f})
    check(x);
  flush();
  CHECK(bad == 0);
  std::printf("[qmem search table] %s: %zu values%s, AVX2 %s, AVX-512 %s, %zu differ\n", name,
              checked, exhaustive ? " (every float)" : "", avx2 ? "checked" : "not run",
              avx512 ? "checked" : "not run", bad);
}

// The code's search table against C::encode.
template <class C>
void check_table(char const* name) {
  static_assert(quant::detail::search_table_proven_v<C>);
  check_table_against(
      name, quant::detail::search_table_of<C>(), [](float x) { return C::encode(x, C::book); },
      C::book.sorted, true);
}

// Format F's block table (optimizer.hpp, host_encoder::block_table) against its whole encoder,
// the sign fix included, F::fix_sign(C::encode(xn), xn), for every non-NaN xn (the kernels use it
// only in blocks without NaN; NaN's code there would depend on its sign).
template <class F>
void check_block_table(char const* name) {
  using C = typename F::code;
  auto const* table = optim::detail::host_encoder<F>::block_table();
  REQUIRE(table != nullptr);
  check_table_against(
      name, *table, [](float x) { return F::fix_sign(C::encode(x, C::book), x); }, C::book.sorted,
      false, true);
}

// States of blocks of format F aimed at the block table's edges: for several absmax (normal,
// tiny, huge, subnormal), each code level, each midpoint between levels and each bucket edge,
// times absmax, +-6 ulps, both signs, zeros; the first element of each block is +-absmax.
template <class F>
std::vector<float> near_step_states(float amax) {
  using C = typename F::code;
  std::vector<float> xn;
  constexpr std::size_t levels = std::size(C::book.sorted);
  for (std::size_t i = 0; i < levels; ++i) {
    xn.push_back(C::book.sorted[i]);
    if (i + 1 < levels)
      xn.push_back((C::book.sorted[i] + C::book.sorted[i + 1]) * 0.5f);
  }
  using quant::detail::search_table;
  for (std::uint32_t k = search_table::key_lo; k <= search_table::key_hi; k += 3)
    xn.push_back(std::bit_cast<float>(k << search_table::shift));
  std::vector<float> out;
  for (float x : xn)
    for (int d = -6; d <= 6; ++d)
      for (float sign : {1.0f, -1.0f}) {
        if (out.size() % F::block_size == 0)
          out.push_back(out.size() / F::block_size % 2 == 0 ? amax : -amax);
        float const s = std::min(std::fabs(x * amax), amax);
        auto const bits = static_cast<std::int64_t>(std::bit_cast<std::uint32_t>(s)) + d;
        float const v = bits < 0 ? 0.0f : std::bit_cast<float>(static_cast<std::uint32_t>(bits));
        out.push_back(sign * std::min(v, amax));
      }
  for (float z : {0.0f, -0.0f, 1e-45f, -1e-45f, 1e-30f, -1e-30f}) {
    if (out.size() % F::block_size == 0)
      out.push_back(amax);
    out.push_back(z);
  }
  while (out.size() % F::block_size != 0)
    out.push_back(-0.0f);
  return out;
}

#if QMEM_OPTIM_HOST_SIMD
// F's SIMD block encoder of the given ISA on the blocks of `v` against F::encode per element;
// `vbmi`: the AVX-512 kernels that pack codes by byte permutes (store_block8_vbmi,
// store_block4_vbmi), 4-bit codes by the thresholds (block_codes4_search) unless `search4` is
// false (then by the block table's gathers, block_codes_vbmi<4>).
template <class F>
std::size_t block_kernel_mismatches(host_isa isa, std::vector<float> const& v, bool vbmi = false,
                                    bool search4 = true) {
  optim::detail::host_encoder<F> const enc;
  REQUIRE(enc.table != nullptr);
  std::size_t bad = 0;
  std::vector<std::uint8_t> codes(F::block_size);
  for (std::size_t b = 0; b < v.size(); b += F::block_size) {
    float const* vb = v.data() + b;
    // (a size known at compile time made g++ 12 warn about the kernels' scalar tails)
    std::size_t const m = std::min(F::block_size, v.size() - b);
    std::size_t done = 0;
    float amax = 0.0f;
    if constexpr (F::bits == 8)
      amax = isa != host_isa::avx512
                 ? optim::detail::store_block8(*enc.table, enc.block_entries, enc.negative_below,
                                               vb, m, codes.data(), done)
             : vbmi
                 ? optim::detail::store_block8_vbmi(*enc.table, enc.block_entries, enc.recip8,
                                                    enc.negative_below, vb, m, codes.data(), done)
                 : optim::detail::store_block8_512(*enc.table, enc.block_entries,
                                                   enc.negative_below, vb, m, codes.data(), done);
    else
      amax = isa != host_isa::avx512 ? optim::detail::store_block4(*enc.table, enc.block_entries,
                                                                   vb, m, codes.data(), done)
             : vbmi ? optim::detail::store_block4_vbmi(*enc.table, enc.block_entries,
                                                       search4 ? enc.steps4 : nullptr, vb, m,
                                                       codes.data(), done)
                    : optim::detail::store_block4_512(*enc.table, enc.block_entries, vb, m,
                                                      codes.data(), done);
    // the kernels encode whole steps of their loops (AVX2: 32 8-bit or 64 4-bit values,
    // AVX-512: 16); the caller encodes the rest
    std::size_t const whole = isa == host_isa::avx2 ? (F::bits == 8 ? 32 : 64) : 16;
    REQUIRE(done == m / whole * whole);
    float want_amax = 0.0f;
    for (std::size_t i = 0; i < m; ++i)
      want_amax = std::max(want_amax, std::fabs(vb[i]));
    CHECK(std::bit_cast<std::uint32_t>(amax) == std::bit_cast<std::uint32_t>(want_amax));
    for (std::size_t i = 0; i < done; ++i) {
      std::uint8_t const want = F::encode(vb[i], amax);
      std::uint8_t const got =
          F::bits == 8
              ? codes[i]
              : static_cast<std::uint8_t>(i % 2 == 0 ? codes[i / 2] >> 4 : codes[i / 2] & 15);
      if (got != want && bad++ < 10)
        FAIL_CHECK("ISA ", static_cast<int>(isa), " absmax ", amax, " s = ", vb[i], " (bits ",
                   std::bit_cast<std::uint32_t>(vb[i]), "): ", int(got), ", encode ", int(want));
    }
  }
  return bad;
}
#endif

template <class F>
void check_block_kernels(char const* name) {
  CAPTURE(name);
#if QMEM_OPTIM_HOST_SIMD
  REQUIRE(optim::detail::host_encoder<F>::block_table() != nullptr);
  bool const vbmi = optim::detail::host_vbmi(); // with the ISA limit at its default
  std::size_t values = 0;
  for (float amax : {1.0f, 0.37f, 3.3e-5f, 7.1e30f, 3.0e38f, 1.17549435e-38f, 1e-40f}) {
    CAPTURE(amax);
    auto const v = near_step_states<F>(amax);
    // the same states with a last block of block_size - 48 (a multiple of 16, not of 64: the
    // VBMI kernels' 16-value loop)
    auto const cut = std::vector<float>(v.begin(), v.end() - 48);
    values += v.size();
    for (host_isa isa : isas())
      if (isa != host_isa::portable) {
        CHECK(block_kernel_mismatches<F>(isa, v) == 0);
        CHECK(block_kernel_mismatches<F>(isa, cut) == 0);
      }
    if (vbmi) {
      CHECK(block_kernel_mismatches<F>(host_isa::avx512, v, true) == 0);
      CHECK(block_kernel_mismatches<F>(host_isa::avx512, cut, true) == 0);
      if (F::bits == 4) {
        CHECK(block_kernel_mismatches<F>(host_isa::avx512, v, true, false) == 0);
        CHECK(block_kernel_mismatches<F>(host_isa::avx512, cut, true, false) == 0);
      }
    }
  }
  std::printf("[qmem block table] %s: %zu states near steps, %zu SIMD paths\n", name, values,
              isas().size() - 1 + (vbmi ? 1 : 0));
#else
  MESSAGE("no SIMD kernels in this build");
#endif
}

using test::randn;

// Runs `steps` steps of rule R with policy P on tensors of the given sizes, with the host step's
// ISA limited to `isa`; returns every parameter, code byte and absmax as raw bytes.
template <class R, class P>
std::vector<std::uint8_t> run(host_isa isa, R rule, optim::nonfinite_policy nf, float max_unorm,
                              std::vector<std::size_t> const& sizes, int steps) {
  isa_limit limit;
  limit.set(isa);
  std::vector<std::vector<float>> params, grads;
  for (std::size_t i = 0; i < sizes.size(); ++i) {
    params.push_back(randn(sizes[i], 1.0f, 10 + static_cast<unsigned>(i)));
    grads.push_back(randn(sizes[i], 0.01f, 20 + static_cast<unsigned>(i)));
    // a few elements of very different scale, and non-finite gradients where they are skipped
    for (std::size_t j = 0; j < sizes[i]; j += 97)
      grads[i][j] *= 1e4f;
    // zero gradients over whole blocks: states of absmax 0 (the kernels' fallback path)
    if (sizes[i] > 1000)
      std::fill(grads[i].begin() + 512, grads[i].begin() + 1024, 0.0f);
    if (nf == optim::nonfinite_policy::skip_element && sizes[i] > 40) {
      grads[i][3] = std::numeric_limits<float>::quiet_NaN();
      grads[i][40] = -std::numeric_limits<float>::infinity();
    }
    // and in later blocks (the interleaved 4- and 8-bit steps update them beside another
    // block's encode)
    if (nf == optim::nonfinite_policy::skip_element && sizes[i] > 2000) {
      grads[i][300] = std::numeric_limits<float>::quiet_NaN();
      grads[i][1100] = std::numeric_limits<float>::infinity();
      grads[i][1999] = -std::numeric_limits<float>::quiet_NaN();
    }
  }
  optim::optimizer<R, P> opt(rule, {.lr = optim::lr_schedule::constant(1e-3f),
                                    .min_quantized_size = 0,
                                    .max_unorm = max_unorm,
                                    .nonfinite = nf});
  for (auto& p : params)
    opt.add_param(view(p));
  for (int s = 0; s < steps; ++s) {
    std::vector<tensor_view<float const>> gs;
    for (auto& g : grads) {
      for (auto& x : g)
        x = std::isfinite(x) ? x * -0.9f : x; // sign changes: the sign fix is exercised
      gs.push_back(view(std::as_const(g)));
    }
    REQUIRE(opt.step(exec::host{2}, gs).applied);
  }
  std::vector<std::uint8_t> out;
  auto append = [&](void const* p, std::size_t bytes) {
    auto const* b = static_cast<std::uint8_t const*>(p);
    out.insert(out.end(), b, b + bytes);
  };
  for (std::size_t i = 0; i < params.size(); ++i) {
    append(params[i].data(), params[i].size() * sizeof(float));
    auto const& ps = opt.params()[i];
    for (auto const& d : ps.data)
      append(d.data(), d.size_bytes());
    for (auto const& sc : ps.scale)
      append(sc.data(), sc.size_bytes());
  }
  return out;
}

template <class R, class P>
void check_same(char const* what, R rule = {},
                optim::nonfinite_policy nf = optim::nonfinite_policy::skip_element,
                float max_unorm = 0.0f) {
  CAPTURE(what);
  std::vector<std::size_t> const sizes = {1, 7, 64, 255, 256, 1000, 4096 + 77, 20000};
  auto const want = run<R, P>(host_isa::portable, rule, nf, max_unorm, sizes, 3);
  // the 8-bit dynamic maps' two AVX-512 encoders, whichever this CPU runs by default: the
  // moved table's gather (0) and the arithmetic one (1)
#if QMEM_OPTIM_HOST_SIMD
  arith8_mode mode;
  for (int arith : {0, 1}) {
    mode.set(arith);
#else
  for (int arith : {0}) {
#endif
    CAPTURE(arith);
    for (host_isa isa : isas()) {
      if (isa == host_isa::portable)
        continue;
      CAPTURE(static_cast<int>(isa));
      auto const got = run<R, P>(isa, rule, nf, max_unorm, sizes, 3);
      REQUIRE(got.size() == want.size());
      std::size_t differ = 0;
      for (std::size_t i = 0; i < got.size(); ++i)
        differ += got[i] != want[i];
      CHECK(differ == 0);
    }
  }
}

} // namespace

TEST_CASE("search table: equal to Code::encode for every code type it serves (8- and 4-bit)") {
  check_table<quant::dynamic_signed>("dynamic_signed");
  check_table<quant::dynamic_unsigned>("dynamic_unsigned");
  check_table<quant::linear_signed>("linear_signed");
  check_table<quant::linear_unsigned>("linear_unsigned");
  check_table<optim::dynamic4_signed>("dynamic4_signed");
  check_table<optim::linear4_unsigned>("linear4_unsigned");
}

TEST_CASE("block tables: equal to each format's encoder with the sign fix, and so are the SIMD "
          "block kernels near every step") {
  using optim::blockwise_format;
  using signed8 = blockwise_format<quant::dynamic_signed, 256, true>;
  using unsigned8 = blockwise_format<quant::dynamic_unsigned, 256>;
  using signed4 = blockwise_format<optim::dynamic4_signed, 128>;
  using unsigned4 = blockwise_format<optim::linear4_unsigned, 128>;
  check_block_table<signed8>("dynamic_signed, sign fix");
  check_block_table<unsigned8>("dynamic_unsigned");
  check_block_table<signed4>("dynamic4_signed");
  check_block_table<unsigned4>("linear4_unsigned");
  check_block_kernels<signed8>("dynamic_signed, sign fix");
  check_block_kernels<unsigned8>("dynamic_unsigned");
  check_block_kernels<signed4>("dynamic4_signed");
  check_block_kernels<unsigned4>("linear4_unsigned");
}

#if QMEM_OPTIM_HOST_SIMD
namespace {
//! Positions where two float arrays of equal length differ in their bits (NaN payloads included).
std::size_t bit_differences(std::vector<float> const& got, std::vector<float> const& want) {
  std::size_t differ = 0;
  for (std::size_t i = 0; i < got.size(); ++i)
    differ += std::bit_cast<std::uint32_t>(got[i]) != std::bit_cast<std::uint32_t>(want[i]);
  return differ;
}

// The states within `reach` float patterns of `near` (clipped to [0, amax]), each with both
// signs, appended to v.
void push_near(std::vector<float>& v, float near, float amax, int reach) {
  for (int d = -reach; d <= reach; ++d) {
    auto const u = static_cast<std::int64_t>(std::bit_cast<std::uint32_t>(near)) + d;
    float const s =
        u < 0 ? 0.0f : std::min(std::bit_cast<float>(static_cast<std::uint32_t>(u)), amax);
    v.push_back(s);
    v.push_back(-s);
  }
}

// v as blocks of `block` states whose first state is +-amax (alternating), the last block padded
// with zeros, so that every block's absmax is amax.
void lead_blocks_with_absmax(std::vector<float>& v, float amax, std::size_t block) {
  for (std::size_t b = 0; b < v.size(); b += block)
    v.insert(v.begin() + static_cast<std::ptrdiff_t>(b), b / block % 2 == 0 ? amax : -amax);
  while (v.size() % block != 0)
    v.push_back(0.0f);
}
} // namespace
#endif

// block_codes4_search's division-free test |s| > Q_j against F::encode(s, absmax) (which divides):
// for absmax of every binade (random mantissas, subnormal ones included) the states nearest to
// absmax B_j for every threshold j of both signs, +-4 ulps, in blocks of 128 whose first state is
// +-absmax.
template <class F>
void check_search4(char const* name, std::size_t absmaxes) {
  CAPTURE(name);
  using optim::detail::step_search4;
#if QMEM_OPTIM_HOST_SIMD
  optim::detail::host_encoder<F> const enc;
  if (!optim::detail::host_step_search4()) {
    CHECK(enc.steps4 == nullptr);
    MESSAGE("this CPU has no AVX-512 VBMI and DQ: block_codes4_search not run");
    return;
  }
  REQUIRE(enc.steps4 != nullptr); // the optimizer's 4-bit maps fit: the step uses the kernel
  step_search4 const& steps = *enc.steps4;
  std::mt19937 rng(11);
  std::size_t values = 0, bad = 0;
  std::vector<float> v;
  std::vector<std::uint8_t> codes(F::block_size / 2);
  for (std::size_t k = 0; k < absmaxes; ++k) {
    // exponent bits 0 (subnormal) .. 254, random mantissa (not 0 for a subnormal)
    auto const bits = static_cast<std::uint32_t>((k % 255) << 23 | (rng() & 0x7fffffu)) | 1u;
    float const amax = std::bit_cast<float>(bits);
    v.clear();
    for (double b : steps.bound)
      push_near(v, static_cast<float>(static_cast<double>(amax) * b), amax, 4);
    lead_blocks_with_absmax(v, amax, F::block_size);
    for (std::size_t b = 0; b < v.size(); b += F::block_size) {
      optim::detail::block_codes4_search(steps, v.data() + b, F::block_size, amax, codes.data());
      for (std::size_t i = 0; i < F::block_size; ++i) {
        float const s = v[b + i];
        auto const got =
            static_cast<std::uint8_t>(i % 2 == 0 ? codes[i / 2] >> 4 : codes[i / 2] & 15);
        std::uint8_t const want = F::encode(s, amax);
        ++values;
        if (got != want && bad++ < 10)
          FAIL_CHECK("absmax ", amax, " (bits ", bits, ") s = ", s, " (bits ",
                     std::bit_cast<std::uint32_t>(s), "): ", int(got), ", encode ", int(want));
      }
    }
  }
  CHECK(bad == 0);
  std::printf("[qmem 4-bit threshold search] %s: %zu states near thresholds, %zu differ\n", name,
              values, bad);
#else
  (void)absmaxes;
  MESSAGE("no SIMD kernels in this build");
#endif
}

TEST_CASE("4-bit encode by thresholds on the state (no division) equals the encoder") {
  using optim::blockwise_format;
  check_search4<blockwise_format<optim::dynamic4_signed, 128>>("dynamic4_signed", 4000);
  check_search4<blockwise_format<optim::linear4_unsigned, 128>>("linear4_unsigned", 4000);
}

// block_codes8_recip (x' = s RN(1 / absmax) looked up in the moved block table, flagged states
// encoded again by the division) against F::encode(s, absmax): for absmax of every binade where
// recip_applies (random mantissas) the states nearest to absmax x every step of the block table
// (both sides of each step), +-12 ulps, both signs, in blocks of 256 whose first state is
// +-absmax. Also per 16 states: every lane whose code from x' alone differs from F::encode must
// be flagged (that is what the fix-up relies on), and some must differ (so the fix-up is needed
// and this test can see a missing one).
#if QMEM_OPTIM_HOST_SIMD
// recip_encode16 on the 16 states at v: each lane's code into raw, the flagged lanes as bits.
__attribute__((target("avx512f"))) unsigned
recip_lanes(std::uint32_t const* entries, float const* v, float amax, std::uint32_t* raw) {
  __m512i nearest = _mm512_set1_epi32(-1);
  __m512i const c = optim::detail::recip_encode16(entries, v, _mm512_set1_ps(1.0f / amax), nearest);
  _mm512_storeu_si512(raw, c);
  return optim::detail::recip_flagged(nearest);
}
#endif

template <class F>
void check_recip8(char const* name, std::size_t absmaxes) {
  CAPTURE(name);
#if QMEM_OPTIM_HOST_SIMD
  using quant::detail::search_table;
  optim::detail::host_encoder<F> const enc;
  if (!optim::detail::host_step_search4()) {
    CHECK(enc.recip8 == nullptr);
    MESSAGE("this CPU has no AVX-512 VBMI and DQ: block_codes8_recip not run");
    return;
  }
  REQUIRE(enc.recip8 != nullptr); // the optimizer's 8-bit maps fit: the step uses the kernel
  REQUIRE(enc.block_entries != nullptr);
  // the block table's step limits (largest |xn| below each step), both signs
  std::vector<float> limits;
  for (std::size_t k = 0; k < 2 * search_table::buckets; ++k) {
    std::uint32_t const e = enc.block_entries[k];
    if ((e & 0xffu) == ((e >> 8) & 0xffu))
      continue;
    auto const key = static_cast<std::uint32_t>(search_table::key_lo + k % search_table::buckets);
    limits.push_back(std::bit_cast<float>(key << 16 | e >> 16));
  }
  REQUIRE(limits.size() > 200);
  CHECK(!optim::detail::recip_applies(std::bit_cast<float>(0x007fffffu))); // subnormal
  CHECK(optim::detail::recip_applies(std::bit_cast<float>(0x00800000u)));
  CHECK(optim::detail::recip_applies(std::bit_cast<float>(0x7e7fffffu)));
  CHECK(!optim::detail::recip_applies(std::bit_cast<float>(0x7e800000u))); // 2^126
  std::mt19937 rng(12);
  std::size_t values = 0, bad = 0, raw_differ = 0, unflagged = 0, flagged = 0;
  std::vector<float> v;
  std::vector<std::uint8_t> codes(F::block_size);
  for (std::size_t k = 0; k < absmaxes; ++k) {
    // exponent bits 1 .. 252 (recip_applies), random mantissa
    auto const bits = static_cast<std::uint32_t>((1 + k % 252) << 23 | (rng() & 0x7fffffu));
    float const amax = std::bit_cast<float>(bits);
    REQUIRE(optim::detail::recip_applies(amax));
    v.clear();
    // the first bucket (no step), zeros and the smallest states
    for (float s : {0.0f, amax * 0x1p-45f, amax * 0x1p-40f, amax * 0x1p-39f,
                    std::numeric_limits<float>::denorm_min(), std::numeric_limits<float>::min()}) {
      v.push_back(std::min(s, amax));
      v.push_back(-std::min(s, amax));
    }
    for (float t : limits)
      push_near(v, static_cast<float>(static_cast<double>(amax) * static_cast<double>(t)), amax,
                12);
    lead_blocks_with_absmax(v, amax, F::block_size);
    for (std::size_t b = 0; b < v.size(); b += F::block_size) {
      optim::detail::block_codes8_recip(enc.recip8, enc.block_entries, v.data() + b, F::block_size,
                                        amax, codes.data());
      for (std::size_t i = 0; i < F::block_size; i += 16) {
        std::uint32_t raw[16];
        unsigned const risky = recip_lanes(enc.recip8, v.data() + b + i, amax, raw);
        for (std::size_t l = 0; l < 16; ++l) {
          float const s = v[b + i + l];
          std::uint8_t const want = F::encode(s, amax);
          bool const differ = static_cast<std::uint8_t>(raw[l]) != want;
          bool const lane_flagged = (risky >> l & 1u) != 0;
          raw_differ += differ;
          flagged += lane_flagged;
          if (differ && !lane_flagged && unflagged++ < 10)
            FAIL_CHECK("unflagged: absmax ", amax, " s = ", s, " (bits ",
                       std::bit_cast<std::uint32_t>(s), "): ", int(raw[l] & 255u), ", encode ",
                       int(want));
          ++values;
          if (codes[i + l] != want && bad++ < 10)
            FAIL_CHECK("absmax ", amax, " (bits ", bits, ") s = ", s, " (bits ",
                       std::bit_cast<std::uint32_t>(s), "): ", int(codes[i + l]), ", encode ",
                       int(want));
        }
      }
    }
  }
  CHECK(bad == 0);
  CHECK(unflagged == 0);
  CHECK(raw_differ > 0);
  std::printf("[qmem 8-bit reciprocal encode] %s: %zu states near steps, %zu differ (%zu from x' "
              "alone, all %zu flagged among %zu)\n",
              name, values, bad, raw_differ, raw_differ - unflagged, flagged);
#else
  (void)absmaxes;
  MESSAGE("no SIMD kernels in this build");
#endif
}

TEST_CASE("8-bit encode by the reciprocal (no division), flagged states by the division, equals "
          "the encoder") {
  using optim::blockwise_format;
  check_recip8<blockwise_format<quant::dynamic_signed, 256, true>>("dynamic_signed, sign fix",
                                                                   1000);
  check_recip8<blockwise_format<quant::dynamic_unsigned, 256>>("dynamic_unsigned", 1000);
}

TEST_CASE("8-bit decode by byte permutes (AVX-512 VBMI) equals the gather decode") {
#if QMEM_OPTIM_HOST_SIMD
  if (!__builtin_cpu_supports("avx512vbmi") || !__builtin_cpu_supports("avx512bw")) {
    MESSAGE("this CPU has no AVX-512 VBMI: decode8_vbmi not run");
    return;
  }
  using F = optim::blockwise_format<quant::dynamic_signed, 256, true>;
  optim::detail::host_encoder<F> const enc;
  std::mt19937 rng(5);
  std::vector<std::uint8_t> codes(1000);
  for (std::size_t i = 0; i < codes.size(); ++i)
    codes[i] = static_cast<std::uint8_t>(i < 256 ? i : rng()); // every code, then random ones
  for (float absmax : {1.0f, 0.37f, 3e-30f, 1e-40f, 3e38f}) {
    for (std::size_t m : {std::size_t{1000}, std::size_t{256}, std::size_t{77}, std::size_t{0}}) {
      std::vector<float> want(m), got(m);
      optim::detail::decode8_512(enc.values, codes.data(), absmax, want.data(), m);
      optim::detail::decode8_vbmi(*enc.planes, codes.data(), absmax, got.data(), m);
      CAPTURE(absmax);
      CAPTURE(m);
      CHECK(bit_differences(got, want) == 0);
    }
  }
#else
  MESSAGE("no SIMD kernels in this build");
#endif
}

TEST_CASE("4-bit decode by byte permutes (AVX-512 VBMI) equals the permute decode") {
#if QMEM_OPTIM_HOST_SIMD
  if (!optim::detail::host_vbmi()) {
    MESSAGE("this CPU has no AVX-512 VBMI: decode4_vbmi not run");
    return;
  }
  using F = optim::blockwise_format<optim::dynamic4_signed, 128>;
  optim::detail::host_encoder<F> const enc;
  std::mt19937 rng(7);
  std::vector<std::uint8_t> codes(600);
  for (std::size_t i = 0; i < codes.size(); ++i)
    codes[i] = static_cast<std::uint8_t>(i < 256 ? i : rng()); // every pair of nibbles, then random
  for (float absmax : {1.0f, 0.37f, 3e-30f, 1e-40f, 3e38f}) {
    for (std::size_t m : {std::size_t{1200}, std::size_t{128}, std::size_t{64}, std::size_t{77},
                          std::size_t{65}, std::size_t{1}, std::size_t{0}}) {
      std::vector<float> want(m), got(m);
      optim::detail::decode4_512(enc.values, codes.data(), absmax, want.data(), m);
      optim::detail::decode4_vbmi(enc.values, codes.data(), absmax, got.data(), m);
      CAPTURE(absmax);
      CAPTURE(m);
      CHECK(bit_differences(got, want) == 0);
    }
  }
#else
  MESSAGE("no SIMD kernels in this build");
#endif
}

TEST_CASE("host step: the AVX2 and AVX-512 kernels give the portable step's bits") {
  if (isas().size() < 3)
    MESSAGE("this CPU or build runs " << isas().size() - 1
                                      << " of the 2 SIMD paths; the others are not tested here");
  using namespace optim;
  check_same<adamw, int8_state>("adamw int8");
  check_same<adamw, int4_state>("adamw int4");
  check_same<adamw, int8_state>("adamw int8 skip_step", {}, nonfinite_policy::skip_step);
  check_same<adamw, int8_state>("adamw int8 max_unorm", {}, nonfinite_policy::skip_element, 1e-4f);
  check_same<adam, int4_state>("adam int4 l2", adam{.weight_decay = 1e-2f});
  check_same<adamw, int4_state>("adamw int4 skip_step", {}, nonfinite_policy::skip_step);
  check_same<adamw, int4_state>("adamw int4 max_unorm", {}, nonfinite_policy::skip_element, 1e-4f);
  check_same<lion, int8_state>("lion int8");
  check_same<lion, int4_state>("lion int4");
  check_same<sgd, int8_signed_state>("sgd int8 signed");
  check_same<rmsprop, int8_state>("rmsprop int8");
  check_same<ademamix, int8_state>("ademamix int8");
  check_same<lamb, int4_state>("lamb int4");
  check_same<adamw, quantized_state<quant::fp8_e4m3>>("adamw fp8 (no table: scalar encode)");
  check_same<adamw, quantized_state<quant::nf4, 64>>("adamw nf4 (no table)");
}
