// The arithmetic dynamic-map encoder (quant/detail/dynamic_arith.hpp) returns, wherever it does
// not flag a value, exactly the code of the 8-bit optimizer states' element encoder
// (F::fix_sign(Code::encode(x), x), as the block tables of optim/optimizer.hpp tabulate it), for
// both dynamic maps. CI: every 1021st float pattern of both signs plus every step +-64 patterns,
// also against bitsandbytes' search directly, and every 1021st run of 16 patterns for the rest;
// QMEM_EXHAUSTIVE=1: every float but NaN (2^32 - 2^24 patterns, two threads), against the block
// table (itself proven equal to the search over all floats by tests/optim/host_simd_test.cpp with
// QMEM_EXHAUSTIVE=1). The rest: the reciprocal path's encoder (`near` = 3, the one
// optim/detail/host_simd.hpp uses) holds its code over +-3 patterns, and the AVX-512 form
// (arith_encode16) gives the scalar form's codes and flags.
#include <qmem/optim/detail/host_simd.hpp>
#include <qmem/optim/state.hpp>
#include <qmem/quant/detail/dynamic_arith.hpp>

#include <doctest/doctest.h>

#include <atomic>
#include <bit>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <thread>
#include <vector>

namespace {

using namespace qmem;

template <class F>
std::uint8_t element_encode(float x) {
  using C = typename F::code;
  return F::fix_sign(C::encode(x, C::book), x);
}

template <class F>
quant::detail::search_table const& block_table() {
  static quant::detail::search_table const t(
      [](float x) -> std::uint8_t { return element_encode<F>(x); });
  return t;
}

#if QMEM_OPTIM_HOST_SIMD
// arith_encode16 on the 16 patterns from u0 against the scalar form: flags and codes
__attribute__((target("avx512f,avx512dq"))) std::size_t
simd_mismatches(std::uint32_t const* words, quant::detail::dynamic_arith8 const& scalar,
                std::uint32_t u0) {
  __m512i const u =
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(u0)),
                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512 nearest = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  __m512i const c = optim::detail::arith_encode16(words, _mm512_castsi512_ps(u), nearest);
  __mmask16 const flagged = optim::detail::arith_flagged(words, nearest);
  alignas(64) std::int32_t code[16];
  _mm512_store_si512(code, c);
  std::size_t bad = 0;
  for (std::uint32_t l = 0; l < 16; ++l) {
    std::uint32_t const b = u0 + l;
    if ((b & 0x7fffffffu) > 0x7f800000u)
      continue;
    int const s = scalar.encode(std::bit_cast<float>(b));
    bool const f = ((flagged >> l) & 1u) != 0;
    bad += f != (s < 0) || (s >= 0 && (code[l] & 0xff) != s);
  }
  return bad;
}
#endif

template <class F>
void check_format(std::string const& name) {
  CAPTURE(name);
  using C = typename F::code;
  auto const& table = block_table<F>();
  REQUIRE(table.exact());
  quant::detail::dynamic_arith8 const arith([&](float x) { return table.encode(x); }, C::is_signed,
                                            C::zero_code);
  REQUIRE(arith.usable());
  MESSAGE(name, ": eps ", arith.eps());

  // the sampled sweep, also against the search itself
  std::size_t bad = 0;
  std::size_t flagged_in_range = 0;
  std::size_t in_range = 0;
  auto check = [&](std::uint32_t u) {
    float const x = std::bit_cast<float>(u);
    if (std::isnan(x))
      return;
    int const c = arith.encode(x);
    if ((u & 0x7fffffffu) <= 0x3f800000u) {
      ++in_range;
      flagged_in_range += c < 0;
    }
    if (c >= 0 && (c != table.encode(x) || c != element_encode<F>(x)) && bad++ < 10)
      FAIL_CHECK(name, ": bits ", u, " arith ", c, " table ", int(table.encode(x)), " search ",
                 int(element_encode<F>(x)));
  };
  for (std::uint64_t u = 0; u <= 0xffffffffu; u += 1021)
    check(static_cast<std::uint32_t>(u));
  // every step of both signs +-64 patterns (each code's largest magnitude below, by search)
  for (std::uint32_t sign : {0u, 0x80000000u})
    for (std::uint32_t mag = 0; mag < 0x3f810000u;) {
      std::uint8_t const c = table.encode(std::bit_cast<float>(sign | mag));
      std::uint32_t lo = mag, hi = 0x3f810000u; // code(lo) == c; find the last such
      if (table.encode(std::bit_cast<float>(sign | hi)) == c)
        break;
      while (hi - lo > 1) {
        std::uint32_t const mid = lo + (hi - lo) / 2;
        (table.encode(std::bit_cast<float>(sign | mid)) == c ? lo : hi) = mid;
      }
      for (std::uint32_t d = lo - std::min(lo, 64u); d <= lo + 64; ++d)
        check(sign | d);
      mag = hi;
    }
  CHECK(bad == 0);
  MESSAGE(name, ": flagged ", flagged_in_range, " of ", in_range, " sampled |x| <= 1");
  // the flagged share of the values an AdamW block gives (uniform over [-1, 1] is a proxy)
  std::size_t flagged_uniform = 0;
  for (int k = 0; k <= 1000000; ++k)
    flagged_uniform += arith.encode(-1.0f + 2.0f * static_cast<float>(k) / 1e6f) < 0;
  MESSAGE(name, ": flagged ", flagged_uniform, " of 1000001 evenly spaced in [-1, 1]");
  CHECK(flagged_uniform < 20000); // below 2%: the table fallback must stay rare

  // the reciprocal path's encoder (near = 3): unflagged, its code is that of every float within
  // 3 patterns of the same sign (the codes are monotone in |x| per sign: the ends suffice); and
  // the AVX-512 form gives the scalar form's codes and flags
  quant::detail::dynamic_arith8 const near3([&](float x) { return table.encode(x); }, C::is_signed,
                                            C::zero_code, 3);
  REQUIRE(near3.usable());
  MESSAGE(name, ": eps (near 3) ", near3.eps());
  CHECK(&optim::detail::arith8_of<F>() != nullptr);
  CHECK(optim::detail::arith8_of<F>().eps() == near3.eps());
  CHECK(optim::detail::arith8_for(table) == &optim::detail::arith8_of<F>());
  bool const exhaustive = std::getenv("QMEM_EXHAUSTIVE") != nullptr;
  std::uint64_t const stride = exhaustive ? 16 : 16 * 1021;
  std::atomic<std::size_t> wrong{0}, wrong_near{0}, wrong_simd{0}, swept{0};
#if QMEM_OPTIM_HOST_SIMD
  bool const simd = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
  if (!simd)
    MESSAGE("no AVX-512 F/DQ here: the vector form is not checked");
  // the words recip_table8 appends, as arith_encode16 reads them
  std::vector<std::uint32_t> words(optim::detail::arith8_words::count);
  {
    using W = optim::detail::arith8_words;
    auto const& t = near3.table();
    for (std::size_t i = 0; i < 32; ++i) {
      words[W::split + i] = std::bit_cast<std::uint32_t>(t.split[i]);
      words[W::a + i] = std::bit_cast<std::uint32_t>(t.a[i]);
      words[W::b + i] = std::bit_cast<std::uint32_t>(t.b[i]);
      words[W::top + i] = std::bit_cast<std::uint32_t>(t.top[i]);
    }
    words[W::eps] = std::bit_cast<std::uint32_t>(near3.eps());
    words[W::zero] = static_cast<std::uint32_t>(C::zero_code);
    words[W::negmax] = static_cast<std::uint32_t>(C::is_signed ? C::zero_code - 1 : 0);
    words[W::near] = near3.near();
  }
#endif
  auto part = [&](std::uint64_t from, std::uint64_t to) {
    std::size_t w = 0, wn = 0, ws = 0, n = 0;
    for (std::uint64_t u0 = from; u0 < to; u0 += stride) {
      for (std::uint32_t l = 0; l < 16; ++l) {
        auto const b = static_cast<std::uint32_t>(u0 + l);
        std::uint32_t const mag = b & 0x7fffffffu;
        if (mag > 0x7f800000u)
          continue; // NaN: never passed
        ++n;
        float const x = std::bit_cast<float>(b);
        int const c = arith.encode(x);
        w += c >= 0 && c != table.encode(x);
        int const c3 = near3.encode(x);
        if (c3 >= 0) {
          std::uint32_t const sign = b & 0x80000000u;
          std::uint32_t const lo = mag < 3 ? 0u : mag - 3;
          std::uint32_t const hi = mag + 3 > 0x7f800000u ? 0x7f800000u : mag + 3;
          wn += table.encode(std::bit_cast<float>(sign | lo)) != c3 || table.encode(x) != c3 ||
                table.encode(std::bit_cast<float>(sign | hi)) != c3;
        }
      }
#if QMEM_OPTIM_HOST_SIMD
      if (simd)
        ws += simd_mismatches(words.data(), near3, static_cast<std::uint32_t>(u0));
#endif
    }
    wrong += w;
    wrong_near += wn;
    wrong_simd += ws;
    swept += n;
  };
  std::thread t1(part, std::uint64_t{0}, std::uint64_t{0x80000000u});
  part(0x80000000u, 0x100000000u);
  t1.join();
  MESSAGE(name, ": swept ", swept.load(), " floats (stride ", stride / 16, " x 16)");
  CHECK(wrong.load() == 0);
  CHECK(wrong_near.load() == 0);
  CHECK(wrong_simd.load() == 0);
}

} // namespace

TEST_CASE("dynamic_arith8 equals the 8-bit states' element encoder wherever it does not flag") {
  check_format<optim::blockwise_format<quant::dynamic_signed, 256, true>>("dynamic signed");
  check_format<optim::blockwise_format<quant::dynamic_unsigned, 256>>("dynamic unsigned");
}
