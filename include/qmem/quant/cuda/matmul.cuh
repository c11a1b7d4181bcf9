#pragma once
//! \file
//! CUDA backend of quant/matmul.hpp: the same entry points taking `exec::cuda` first.
//!
//! - Batches of 1 to gemv_max_rows (16) rows run a GEMV-style kernel that reads the 4-bit codes and
//!   the block scales directly: each warp dequantizes a 16-row x 128-column tile of the weight into
//!   tensor-core fragments (`mma.sync` m16n8k16, the weight as the 16-row A operand, the
//!   activations as the 8-column B operand) and the eight warps of a block split the columns, then
//!   reduce in shared memory in a fixed order. Since a dot product may visit its terms in any
//!   order, each thread loads 16 contiguous bytes (32 codes) of a row and the activation fragment
//!   is permuted the same way: coalesced 16-byte loads, no shuffles.
//! - Larger batches dequantize the weight into a caller-provided bf16/f16 workspace and call
//!   cuBLASLt (fp32 accumulation).
//! - QLoRA's grad_input = grad_y * dequant(w) has the same two paths.
//! - int8: cuBLASLt int8 x int8 -> int32, then an epilogue kernel applies the row and column scales
//!   and adds the outlier columns.
//! Every call is stream-ordered on `e.stream`, launches on `e.device`, checks its preconditions
//! (bad_argument, nothing launched) and checks each launch.

#include <qmem/core/config.hpp>
#include <qmem/core/cuda/runtime.cuh>
#include <qmem/quant/matmul.hpp>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <type_traits>

namespace qmem::quant {
namespace cuda_matmul {

// ------------------------------------------------------------------------------------------------
// cuBLASLt plumbing

//! Throws qmem::cuda_error naming the cuBLAS call when `status` is not CUBLAS_STATUS_SUCCESS.
inline void check_cublas(cublasStatus_t status, char const* what) {
  if (status != CUBLAS_STATUS_SUCCESS) [[unlikely]]
    throw cuda_error(qmem::detail::message(what, " failed: cuBLAS status ",
                                           static_cast<int>(status)),
                     static_cast<int>(status));
}

//! One cuBLASLt handle per device, created on first use and kept for the process's lifetime
//! (creating one costs far more than a small matmul).
inline cublasLtHandle_t lt_handle(int device) {
  static std::mutex mutex;
  static cublasLtHandle_t handles[64] = {};
  QMEM_EXPECTS(device >= 0 && device < 64, "e.device is ", device, "; expected 0..63");
  std::lock_guard<std::mutex> lock(mutex);
  if (handles[device] == nullptr)
    check_cublas(cublasLtCreate(&handles[device]), "cublasLtCreate");
  return handles[device];
}

//! RAII owner of the cuBLASLt descriptors of one call.
struct lt_descriptors {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  lt_descriptors() = default;
  lt_descriptors(lt_descriptors const&) = delete;
  lt_descriptors& operator=(lt_descriptors const&) = delete;
  ~lt_descriptors() {
    if (pref != nullptr)
      (void)cublasLtMatmulPreferenceDestroy(pref);
    if (c != nullptr)
      (void)cublasLtMatrixLayoutDestroy(c);
    if (b != nullptr)
      (void)cublasLtMatrixLayoutDestroy(b);
    if (a != nullptr)
      (void)cublasLtMatrixLayoutDestroy(a);
    if (op != nullptr)
      (void)cublasLtMatmulDescDestroy(op);
  }
};

//! D = op_a(A) * op_b(B) in cuBLASLt's column-major terms, D being rows x cols; A is stored
//! a_rows x a_cols with leading dimension a_rows (likewise B), D with leading dimension rows.
//! Computes in `compute` with alpha = 1, beta = 0 of `scale_type`; stream-ordered on e.stream.
//! Returns false (launching nothing) when cuBLASLt has no algorithm for this shape and layout.
[[nodiscard]] inline bool lt_matmul(exec::cuda const& e, cublasOperation_t op_a,
                                    cublasOperation_t op_b,
                      std::uint64_t rows, std::uint64_t cols, std::uint64_t inner,
                      cudaDataType_t ab_type, void const* a, void const* b, cudaDataType_t d_type,
                      void* d, cublasComputeType_t compute, cudaDataType_t scale_type,
                      void* workspace, std::size_t workspace_bytes) {
  lt_descriptors ds;
  check_cublas(cublasLtMatmulDescCreate(&ds.op, compute, scale_type), "cublasLtMatmulDescCreate");
  check_cublas(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a,
                                              sizeof(op_a)),
               "cublasLtMatmulDescSetAttribute(TRANSA)");
  check_cublas(cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b,
                                              sizeof(op_b)),
               "cublasLtMatmulDescSetAttribute(TRANSB)");
  std::uint64_t const a_rows = op_a == CUBLAS_OP_N ? rows : inner;
  std::uint64_t const a_cols = op_a == CUBLAS_OP_N ? inner : rows;
  std::uint64_t const b_rows = op_b == CUBLAS_OP_N ? inner : cols;
  std::uint64_t const b_cols = op_b == CUBLAS_OP_N ? cols : inner;
  check_cublas(cublasLtMatrixLayoutCreate(&ds.a, ab_type, a_rows, a_cols,
                                          static_cast<std::int64_t>(a_rows)),
               "cublasLtMatrixLayoutCreate(A)");
  check_cublas(cublasLtMatrixLayoutCreate(&ds.b, ab_type, b_rows, b_cols,
                                          static_cast<std::int64_t>(b_rows)),
               "cublasLtMatrixLayoutCreate(B)");
  check_cublas(cublasLtMatrixLayoutCreate(&ds.c, d_type, rows, cols,
                                          static_cast<std::int64_t>(rows)),
               "cublasLtMatrixLayoutCreate(D)");
  check_cublas(cublasLtMatmulPreferenceCreate(&ds.pref), "cublasLtMatmulPreferenceCreate");
  check_cublas(cublasLtMatmulPreferenceSetAttribute(ds.pref,
                                                    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &workspace_bytes, sizeof(workspace_bytes)),
               "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
  cublasLtHandle_t const handle = lt_handle(e.device);
  cublasLtMatmulHeuristicResult_t heuristic{};
  int found = 0;
  cublasStatus_t const hs = cublasLtMatmulAlgoGetHeuristic(handle, ds.op, ds.a, ds.b, ds.c, ds.c,
                                                           ds.pref, 1, &heuristic, &found);
  if (hs == CUBLAS_STATUS_NOT_SUPPORTED || (hs == CUBLAS_STATUS_SUCCESS && found == 0))
    return false;
  check_cublas(hs, "cublasLtMatmulAlgoGetHeuristic");
  std::int32_t const one_i = 1, zero_i = 0;
  float const one_f = 1.0f, zero_f = 0.0f;
  void const* alpha = scale_type == CUDA_R_32I ? static_cast<void const*>(&one_i)
                                               : static_cast<void const*>(&one_f);
  void const* beta = scale_type == CUDA_R_32I ? static_cast<void const*>(&zero_i)
                                              : static_cast<void const*>(&zero_f);
  check_cublas(cublasLtMatmul(handle, ds.op, alpha, a, ds.a, b, ds.b, beta, d, ds.c, d, ds.c,
                              &heuristic.algo, workspace, workspace_bytes, e.stream),
               "cublasLtMatmul");
  return true;
}

//! lt_matmul for the floating-point products, where cuBLASLt always has an algorithm.
inline void lt_matmul_or_throw(exec::cuda const& e, cublasOperation_t op_a, cublasOperation_t op_b,
                               std::uint64_t rows, std::uint64_t cols, std::uint64_t inner,
                               cudaDataType_t ab_type, void const* a, void const* b,
                               cudaDataType_t d_type, void* d, void* workspace,
                               std::size_t workspace_bytes) {
  if (!lt_matmul(e, op_a, op_b, rows, cols, inner, ab_type, a, b, d_type, d, CUBLAS_COMPUTE_32F,
                 CUDA_R_32F, workspace, workspace_bytes))
    throw cuda_error(qmem::detail::message("cuBLASLt has no algorithm for a ", rows, " x ", cols,
                                           " x ", inner, " product"),
                     0);
}

// ------------------------------------------------------------------------------------------------
// element helpers

template <class T>
inline constexpr cudaDataType_t data_type = std::same_as<T, bf16> ? CUDA_R_16BF : CUDA_R_16F;

//! Two floats rounded to T (nearest even) and packed, the first in the low half.
template <class T>
__device__ QMEM_INLINE std::uint32_t pack2(float lo, float hi) {
  std::uint32_t u;
  if constexpr (std::same_as<T, bf16>) {
    __nv_bfloat162 const v = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&u, &v, 4);
  } else {
    __half2 const v = __floats2half2_rn(lo, hi);
    std::memcpy(&u, &v, 4);
  }
  return u;
}

//! c += a * b on the tensor cores: m16n8k16, A row-major 16x16, B column-major 16x8, fp32 c.
template <class T>
__device__ QMEM_INLINE void mma_16816(float (&c)[4], std::uint32_t const (&a)[4],
                                      std::uint32_t b0, std::uint32_t b1) {
  if constexpr (std::same_as<T, bf16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

//! What the kernels need to find a block scale (trivially copyable, a launch argument).
struct scale_args {
  float const* absmax;          //!< plain scales, or nullptr
  std::uint8_t const* qabsmax;  //!< nested codes, or nullptr
  float const* absmax2;         //!< nested scales
  float offset;                 //!< nested offset
  unsigned nested_block;        //!< blocks per absmax2 entry
};

inline scale_args make_scale_args(block_scales const& s) {
  return {s.absmax.data(), s.qabsmax.data(), s.absmax2.data(), s.offset,
          static_cast<unsigned>(s.nested_block_size)};
}

//! The scale of block b (`dyn` is the signed dynamic map, in shared memory, when Nested).
template <bool Nested>
__device__ QMEM_INLINE float block_scale(scale_args const& s, std::size_t b, float const* dyn) {
  if constexpr (Nested)
    return fmath::add(fmath::mul(dyn[__ldg(s.qabsmax + b)],
                                         __ldg(s.absmax2 + b / s.nested_block)),
                          s.offset);
  else
    return __ldg(s.absmax + b);
}

//! Loads the code table (and the nested map) into shared memory; the caller synchronizes.
template <bool Nested>
__device__ QMEM_INLINE void load_tables(float* table, float* dyn, code_table<16> const& values,
                                        code_table<256> const& nested) {
  for (unsigned i = threadIdx.x; i < 16; i += blockDim.x)
    table[i] = values.value[i];
  if constexpr (Nested)
    for (unsigned i = threadIdx.x; i < 256; i += blockDim.x)
      dyn[i] = nested.value[i];
}

// ------------------------------------------------------------------------------------------------
// GEMV-style forward: y[m, n] = x[m, k] * dequant(w)[n, k]^T for m <= 16

// Tuning of the GEMV kernel, measured with bench/cuda/matmul_bench.cu (gemv_variant: 200 calls in
// one CUDA graph, NF4 block 64, plain scales) on one H200, 2026-11-29.

//! Warps per block; they split the columns of the block's rows. Batch 1: 4, 8 and 16 warps within
//! 5% of each other (8192 x 8192: 21.6 / 20.9 / 21.8 us; 28672 x 8192: 68.2 / 68.2 / 73.0 us);
//! batch 16 (two tiles): 16 warps is worst (8192 x 8192: 44.3 us against 29.5 with 8).
inline constexpr int gemv_warps = 8;
//! Chunks of 128 columns a warp loads before computing. 2 and 4 within 5% (8192 x 8192, batch 1:
//! 20.9 / 21.3 us; 28672 x 8192: 68.2 / 74.1 us): the kernel is bound by the decode
//! instructions (lookup, scale, convert: ~3.5 per weight), not by load latency.
inline constexpr int gemv_unroll = 2;
//! 16-row weight tiles per block for batches of 9 to 16 rows (each warp reuses its activation
//! fragments for all of them); batches up to 8 use one. Batch 16: 8192 x 8192 38.8 us with one
//! tile, 29.5 us with two (28672 x 8192: 129.1 / 98.1 us). Batch 1: 20.9 / 20.3 us, but 68.2 /
//! 71.4 us on 28672 x 8192, hence one tile there.
inline constexpr int gemv_tiles = 2;
//! Decode codes with a warp shuffle (true) or a shared-memory table (false). The shuffle needs no
//! address arithmetic: batch 1, 8192 x 8192 20.9 us against 24.5 us; 28672 x 8192 68.2 / 81.6 us.
inline constexpr bool gemv_shuffle = true;

template <class T>
struct gemv_args {
  T const* x;                  //!< [m, k]
  std::uint8_t const* codes;   //!< packed codes
  scale_args scales;
  T* y;                        //!< [m, n]
  unsigned m;
  std::size_t n, k;
  unsigned block_shift;        //!< log2(block size)
};

//! The fast path: k % 32 == 0, codes and x 16-byte aligned. `MTiles` 8-row halves of the batch
//! (1: m <= 8, 2: m <= 16); `Tiles` 16-row tiles of the weight per block (each warp reuses its
//! activation fragments for all of them); `Warps` split the columns; `Unroll` chunks of 128
//! columns are loaded before any is computed.
template <class Code, class T, bool Nested, int MTiles, int Warps, int Unroll, int Tiles,
          bool Shuffle>
__global__ void __launch_bounds__(Warps * 32)
    gemv_4bit_kernel(gemv_args<T> a, code_table<16> values, code_table<256> nested) {
  __shared__ float table[16];
  __shared__ float dyn[Nested ? 256 : 1];
  __shared__ float partial[Warps][16 * Tiles][16 + 1]; // [warp][row in block][batch row]
  load_tables<Nested>(table, dyn, values, nested);
  __syncthreads();

  int const warp = static_cast<int>(threadIdx.x >> 5);
  int const lane = static_cast<int>(threadIdx.x & 31);
  int const g = lane >> 2; // fragment row group
  int const t = lane & 3;  // thread in group
  std::size_t const base = static_cast<std::size_t>(blockIdx.x) * 16 * Tiles +
                           static_cast<std::size_t>(g);
  // Shuffle: lane i holds table[i % 16]; a shuffle whose source lane is the code word shifted
  // right (the hardware reads the low 5 bits, the fifth from the next code, hence the copy in
  // lanes 16-31) decodes with one shift and one SHFL, no address arithmetic.
  float const lane_value = table[lane & 15];
  auto decode = [&](std::uint32_t word, int shift) -> float {
    if constexpr (Shuffle)
      return __shfl_sync(0xffffffffu, lane_value, static_cast<int>(word >> shift));
    else
      return table[(word >> shift) & 15u];
  };

  float acc[Tiles][MTiles][4];
  QMEM_UNROLL
  for (int r = 0; r < Tiles; ++r)
    QMEM_UNROLL
    for (int i = 0; i < MTiles; ++i)
      acc[r][i][0] = acc[r][i][1] = acc[r][i][2] = acc[r][i][3] = 0.0f;

  std::size_t const chunks = (a.k + 127) / 128;
  for (std::size_t c0 = static_cast<std::size_t>(warp); c0 < chunks;
       c0 += static_cast<std::size_t>(Warps * Unroll)) {
    // rows base + 16 r (h = 0) and base + 16 r + 8 (h = 1): 32 codes each, and their scales
    uint4 q[Unroll][Tiles][2];
    float s[Unroll][Tiles][2];
    std::size_t kk[Unroll];
    bool kin[Unroll];
    QMEM_UNROLL
    for (int u = 0; u < Unroll; ++u) {
      std::size_t const c = c0 + static_cast<std::size_t>(u * Warps);
      kk[u] = c * 128 + 32 * static_cast<std::size_t>(t);
      kin[u] = c < chunks && kk[u] < a.k;
      QMEM_UNROLL
      for (int r = 0; r < Tiles; ++r)
        QMEM_UNROLL
        for (int h = 0; h < 2; ++h) {
          std::size_t const row = base + static_cast<std::size_t>(16 * r + 8 * h);
          q[u][r][h] = make_uint4(0, 0, 0, 0);
          s[u][r][h] = 0.0f;
          if (kin[u] && row < a.n) {
            std::size_t const f = row * a.k + kk[u];
            q[u][r][h] = __ldg(reinterpret_cast<uint4 const*>(a.codes + f / 2));
            s[u][r][h] = block_scale<Nested>(a.scales, f >> a.block_shift, dyn);
          }
        }
    }
    QMEM_UNROLL
    for (int u = 0; u < Unroll; ++u) {
      // activations of batch row mt * 8 + g, the same 32 columns this thread holds codes for
      std::uint32_t xf[MTiles][16];
      QMEM_UNROLL
      for (int mt = 0; mt < MTiles; ++mt) {
        unsigned const m = static_cast<unsigned>(mt * 8 + g);
        if (kin[u] && m < a.m) {
          uint4 const* p = reinterpret_cast<uint4 const*>(a.x + m * a.k + kk[u]);
          QMEM_UNROLL
          for (int v = 0; v < 4; ++v) {
            uint4 const w = __ldg(p + v);
            xf[mt][4 * v + 0] = w.x;
            xf[mt][4 * v + 1] = w.y;
            xf[mt][4 * v + 2] = w.z;
            xf[mt][4 * v + 3] = w.w;
          }
        } else {
          QMEM_UNROLL
          for (int v = 0; v < 16; ++v)
            xf[mt][v] = 0;
        }
      }
      QMEM_UNROLL
      for (int r = 0; r < Tiles; ++r) {
        std::uint32_t const w0[4] = {q[u][r][0].x, q[u][r][0].y, q[u][r][0].z, q[u][r][0].w};
        std::uint32_t const w1[4] = {q[u][r][1].x, q[u][r][1].y, q[u][r][1].z, q[u][r][1].w};
        float const s0 = s[u][r][0];
        float const s1 = s[u][r][1];
        QMEM_UNROLL
        for (int j = 0; j < 8; ++j) {
          // bytes 2j and 2j+1 of each row: codes of columns 4j..4j+3 of this thread's 32 (the
          // first of a byte in its high nibble)
          std::uint32_t const u0 = w0[j >> 1];
          std::uint32_t const u1 = w1[j >> 1];
          int const sa = 16 * (j & 1);
          int const sb = sa + 8;
          // A fragment: {row g, cols 2t..2t+1}, {row g+8, ...}, {row g, cols 2t+8..}, {row g+8, ...}
          std::uint32_t const frag[4] = {
              pack2<T>(fmath::mul(decode(u0, sa + 4), s0), fmath::mul(decode(u0, sa), s0)),
              pack2<T>(fmath::mul(decode(u1, sa + 4), s1), fmath::mul(decode(u1, sa), s1)),
              pack2<T>(fmath::mul(decode(u0, sb + 4), s0), fmath::mul(decode(u0, sb), s0)),
              pack2<T>(fmath::mul(decode(u1, sb + 4), s1), fmath::mul(decode(u1, sb), s1))};
          QMEM_UNROLL
          for (int mt = 0; mt < MTiles; ++mt)
            mma_16816<T>(acc[r][mt], frag, xf[mt][2 * j], xf[mt][2 * j + 1]);
        }
      }
    }
  }

  // accumulator (row g or g + 8 of tile r, batch rows mt * 8 + 2t, + 1)
  QMEM_UNROLL
  for (int r = 0; r < Tiles; ++r)
    QMEM_UNROLL
    for (int mt = 0; mt < MTiles; ++mt) {
      partial[warp][16 * r + g][mt * 8 + 2 * t] = acc[r][mt][0];
      partial[warp][16 * r + g][mt * 8 + 2 * t + 1] = acc[r][mt][1];
      partial[warp][16 * r + g + 8][mt * 8 + 2 * t] = acc[r][mt][2];
      partial[warp][16 * r + g + 8][mt * 8 + 2 * t + 1] = acc[r][mt][3];
    }
  __syncthreads();
  // one output per thread and step, consecutive threads on consecutive rows (coalesced stores)
  for (int i = static_cast<int>(threadIdx.x); i < 16 * Tiles * MTiles * 8; i += Warps * 32) {
    int const r = i % (16 * Tiles);
    int const m = i / (16 * Tiles);
    std::size_t const row = static_cast<std::size_t>(blockIdx.x) * 16 * Tiles +
                            static_cast<std::size_t>(r);
    if (static_cast<unsigned>(m) < a.m && row < a.n) {
      float sum = 0.0f;
      QMEM_UNROLL
      for (int w = 0; w < Warps; ++w)
        sum += partial[w][r][m];
      a.y[static_cast<std::size_t>(m) * a.n + row] = from_float<T>(sum);
    }
  }
}

//! Any shape and alignment: one warp per weight row, lanes stride the columns, codes read one
//! nibble at a time. Serves k % 32 != 0 and unaligned views.
template <class Code, class T, bool Nested>
__global__ void __launch_bounds__(256)
    gemv_4bit_generic_kernel(gemv_args<T> a, code_table<16> values, code_table<256> nested) {
  __shared__ float table[16];
  __shared__ float dyn[Nested ? 256 : 1];
  load_tables<Nested>(table, dyn, values, nested);
  __syncthreads();
  unsigned const lane = threadIdx.x & 31;
  std::size_t const warps = static_cast<std::size_t>(gridDim.x) * (blockDim.x >> 5);
  for (std::size_t row = static_cast<std::size_t>(blockIdx.x) * (blockDim.x >> 5) +
                         (threadIdx.x >> 5);
       row < a.n; row += warps) {
    float acc[gemv_max_rows];
    QMEM_UNROLL
    for (unsigned m = 0; m < gemv_max_rows; ++m)
      acc[m] = 0.0f;
    for (std::size_t col = lane; col < a.k; col += 32) {
      std::size_t const f = row * a.k + col;
      float const w = to_float(from_float<T>(fmath::mul(
          table[detail::nibble(a.codes, f)], block_scale<Nested>(a.scales, f >> a.block_shift, dyn))));
      QMEM_UNROLL
      for (unsigned m = 0; m < gemv_max_rows; ++m)
        if (m < a.m)
          acc[m] = fmaf(to_float(a.x[m * a.k + col]), w, acc[m]);
    }
    QMEM_UNROLL
    for (unsigned m = 0; m < gemv_max_rows; ++m) {
      float v = acc[m];
      QMEM_UNROLL
      for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
      if (lane == 0 && m < a.m)
        a.y[m * a.n + row] = from_float<T>(v);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// dequantization into a T workspace (the large-batch path)

template <class T>
struct dequant_args {
  std::uint8_t const* codes;
  scale_args scales;
  T* out;
  std::size_t elements;
  unsigned block_shift;
};

//! out[i] = round_T(code_value[i] * scale[i / block]); 8 elements (4 code bytes, one scale, one
//! 16-byte store) per thread and iteration when aligned, element by element at the tail.
template <class Code, class T, bool Nested>
__global__ void __launch_bounds__(256)
    dequant_4bit_kernel(dequant_args<T> a, code_table<16> values, code_table<256> nested,
                        bool vector_ok) {
  __shared__ float table[16];
  __shared__ float dyn[Nested ? 256 : 1];
  load_tables<Nested>(table, dyn, values, nested);
  __syncthreads();
  std::size_t const stride = static_cast<std::size_t>(gridDim.x) * blockDim.x * 8;
  for (std::size_t i = (static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
       i < a.elements; i += stride) {
    if (vector_ok && i + 8 <= a.elements) {
      std::uint32_t const q = __ldg(reinterpret_cast<std::uint32_t const*>(a.codes + i / 2));
      float const s = block_scale<Nested>(a.scales, i >> a.block_shift, dyn);
      uint4 v;
      std::uint32_t* o = &v.x;
      QMEM_UNROLL
      for (int b = 0; b < 4; ++b) {
        std::uint32_t const byte = (q >> (8 * b)) & 0xffu;
        o[b] = pack2<T>(fmath::mul(table[byte >> 4], s), fmath::mul(table[byte & 15], s));
      }
      *reinterpret_cast<uint4*>(a.out + i) = v;
    } else {
      std::size_t const end = i + 8 < a.elements ? i + 8 : a.elements;
      for (std::size_t j = i; j < end; ++j)
        a.out[j] = from_float<T>(fmath::mul(
            table[detail::nibble(a.codes, j)], block_scale<Nested>(a.scales, j >> a.block_shift, dyn)));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// GEMV-style grad input: grad_x[m, k] = grad_y[m, n] * dequant(w)[n, k] for m <= 16

template <class T>
struct grad_args {
  T const* grad_y;             //!< [m, n]
  std::uint8_t const* codes;
  scale_args scales;
  float* partial;              //!< [slices, m, k]
  unsigned m;
  std::size_t n, k;
  std::size_t rows_per_slice;
  unsigned block_shift;
};

//! Columns per thread of the grad-input kernel.
inline constexpr int grad_cols = 4;

//! Each thread owns 4 consecutive columns and walks one slice of rows; every row's dequantized
//! values are multiplied by the (warp-uniform) gradients of that row. Partial sums of a slice go to
//! the workspace; grad_reduce_kernel adds the slices in order.
template <class Code, class T, bool Nested>
__global__ void __launch_bounds__(256)
    grad_input_4bit_kernel(grad_args<T> a, code_table<16> values, code_table<256> nested) {
  __shared__ float table[16];
  __shared__ float dyn[Nested ? 256 : 1];
  load_tables<Nested>(table, dyn, values, nested);
  __syncthreads();
  std::size_t const col0 =
      (static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x) * grad_cols;
  std::size_t const slice = blockIdx.y;
  std::size_t const row_begin = slice * a.rows_per_slice;
  std::size_t const row_end = row_begin + a.rows_per_slice < a.n ? row_begin + a.rows_per_slice
                                                                 : a.n;
  float acc[gemv_max_rows][grad_cols];
  QMEM_UNROLL
  for (unsigned m = 0; m < gemv_max_rows; ++m)
    QMEM_UNROLL
    for (int c = 0; c < grad_cols; ++c)
      acc[m][c] = 0.0f;
  if (col0 < a.k) {
    for (std::size_t row = row_begin; row < row_end; ++row) {
      float w[grad_cols];
      QMEM_UNROLL
      for (int c = 0; c < grad_cols; ++c) {
        std::size_t const col = col0 + static_cast<std::size_t>(c);
        w[c] = 0.0f;
        if (col < a.k) {
          std::size_t const f = row * a.k + col;
          w[c] = to_float(from_float<T>(fmath::mul(
              table[detail::nibble(a.codes, f)],
              block_scale<Nested>(a.scales, f >> a.block_shift, dyn))));
        }
      }
      QMEM_UNROLL
      for (unsigned m = 0; m < gemv_max_rows; ++m)
        if (m < a.m) {
          float const gy = to_float(a.grad_y[m * a.n + row]);
          QMEM_UNROLL
          for (int c = 0; c < grad_cols; ++c)
            acc[m][c] = fmaf(gy, w[c], acc[m][c]);
        }
    }
  }
  QMEM_UNROLL
  for (unsigned m = 0; m < gemv_max_rows; ++m)
    if (m < a.m)
      QMEM_UNROLL
      for (int c = 0; c < grad_cols; ++c)
        if (col0 + static_cast<std::size_t>(c) < a.k)
          a.partial[(slice * a.m + m) * a.k + col0 + static_cast<std::size_t>(c)] = acc[m][c];
}

//! Rounds two floats to T and returns them as floats again (one conversion instruction for both).
template <class T>
__device__ QMEM_INLINE float2 round_pair(float a, float b) {
  std::uint32_t const u = pack2<T>(a, b);
  if constexpr (std::same_as<T, bf16>) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  } else {
    __half2 h;
    std::memcpy(&h, &u, 4);
    return __half22float2(h);
  }
}

//! Rows of the weight each thread of grad_input_4bit_vec_kernel loads before computing (not
//! tuned: the one value measured, 8192 x 8192 batch 1 in 54 us on an H200, 2026-11-29).
inline constexpr int grad_unroll = 4;

//! The aligned fast path of the grad-input GEMV (k % 8 == 0, codes 4-byte aligned): each thread
//! owns 8 consecutive columns (one 4-byte code word and one scale per row), a block's 256 threads
//! cover 2048 columns of one row slice, blockIdx.z picks MB batch rows.
template <class Code, class T, bool Nested, int MB>
__global__ void __launch_bounds__(256)
    grad_input_4bit_vec_kernel(grad_args<T> a, code_table<16> values, code_table<256> nested) {
  __shared__ float table[16];
  __shared__ float dyn[Nested ? 256 : 1];
  load_tables<Nested>(table, dyn, values, nested);
  __syncthreads();
  std::size_t const col0 = (static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 8;
  std::size_t const slice = blockIdx.y;
  unsigned const m0 = blockIdx.z * MB;
  std::size_t const row_begin = slice * a.rows_per_slice;
  std::size_t const row_end = row_begin + a.rows_per_slice < a.n ? row_begin + a.rows_per_slice
                                                                 : a.n;
  if (col0 >= a.k)
    return;
  float acc[MB][8];
  QMEM_UNROLL
  for (int m = 0; m < MB; ++m)
    QMEM_UNROLL
    for (int c = 0; c < 8; ++c)
      acc[m][c] = 0.0f;
  for (std::size_t r0 = row_begin; r0 < row_end; r0 += grad_unroll) {
    std::uint32_t word[grad_unroll];
    float scale[grad_unroll];
    QMEM_UNROLL
    for (int u = 0; u < grad_unroll; ++u) {
      std::size_t const row = r0 + static_cast<std::size_t>(u);
      word[u] = 0;
      scale[u] = 0.0f;
      if (row < row_end) {
        std::size_t const f = row * a.k + col0;
        word[u] = __ldg(reinterpret_cast<std::uint32_t const*>(a.codes + f / 2));
        scale[u] = block_scale<Nested>(a.scales, f >> a.block_shift, dyn);
      }
    }
    QMEM_UNROLL
    for (int u = 0; u < grad_unroll; ++u) {
      std::size_t const row = r0 + static_cast<std::size_t>(u);
      if (row >= row_end)
        break;
      float w[8];
      QMEM_UNROLL
      for (int b = 0; b < 4; ++b) {
        std::uint32_t const byte = (word[u] >> (8 * b)) & 0xffu;
        float2 const v = round_pair<T>(fmath::mul(table[byte >> 4], scale[u]),
                                       fmath::mul(table[byte & 15], scale[u]));
        w[2 * b] = v.x;
        w[2 * b + 1] = v.y;
      }
      QMEM_UNROLL
      for (int m = 0; m < MB; ++m)
        if (m0 + static_cast<unsigned>(m) < a.m) {
          float const gy = to_float(a.grad_y[(m0 + static_cast<unsigned>(m)) * a.n + row]);
          QMEM_UNROLL
          for (int c = 0; c < 8; ++c)
            acc[m][c] = fmaf(gy, w[c], acc[m][c]);
        }
    }
  }
  QMEM_UNROLL
  for (int m = 0; m < MB; ++m)
    if (m0 + static_cast<unsigned>(m) < a.m) {
      float* out = a.partial + (slice * a.m + m0 + static_cast<unsigned>(m)) * a.k + col0;
      QMEM_UNROLL
      for (int c = 0; c < 8; ++c)
        out[c] = acc[m][c];
    }
}

//! out[i] = round_T(sum over slices of partial[s, i]), slices added in ascending order.
template <class T>
__global__ void __launch_bounds__(256)
    grad_reduce_kernel(float const* partial, std::size_t slices, std::size_t count, T* out) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    float sum = 0.0f;
    for (std::size_t s = 0; s < slices; ++s)
      sum += partial[s * count + i];
    out[i] = from_float<T>(sum);
  }
}

// ------------------------------------------------------------------------------------------------
// int8 kernels

//! out[m, n] = epilogue(acc[m, n]) plus the outlier columns (ascending, fused multiply-adds).
//! `outliers` is {count, k_0, k_1, ...} or nullptr.
template <class Out, class T>
__global__ void __launch_bounds__(256)
    int8_epilogue_kernel(std::int32_t const* acc, float const* row_scale, float const* col_scale,
                         std::size_t m, std::size_t n, std::size_t k, T const* x,
                         std::int8_t const* b, std::int32_t const* outliers, Out* out) {
  std::size_t const count = m * n;
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    std::size_t const r = i / n, c = i % n;
    float const cs = col_scale[c];
    float v = detail::mm::int8_epilogue(acc[i], row_scale[r], cs);
    if (outliers != nullptr) {
      int const no = outliers[0];
      for (int o = 0; o < no; ++o) {
        std::size_t const l = static_cast<std::size_t>(outliers[1 + o]);
        v = fmaf(to_float(x[r * k + l]), detail::mm::int8_weight_value(b[c * k + l], cs), v);
      }
    }
    out[i] = from_float<Out>(v);
  }
}

//! acc[r, c] = sum_l a[r, l] * b[c, l] in int32, one thread per output: the exact fallback for
//! shapes cuBLASLt's int8 kernels do not take (tiny or unaligned ones).
template <int Threads>
__global__ void __launch_bounds__(Threads)
    int8_gemm_fallback_kernel(std::int8_t const* a, std::int8_t const* b, std::size_t m,
                              std::size_t n, std::size_t k, std::int32_t* acc) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < m * n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    std::size_t const r = i / n, c = i % n;
    std::int32_t sum = 0;
    for (std::size_t l = 0; l < k; ++l)
      sum += static_cast<std::int32_t>(a[r * k + l]) * static_cast<std::int32_t>(b[c * k + l]);
    acc[i] = sum;
  }
}

//! The int32 product acc[m, n] = a[m, k] * b[n, k]^T: cuBLASLt, or the fallback kernel.
inline void int8_product(exec::cuda const& e, std::int8_t const* a, std::int8_t const* b,
                         std::size_t m, std::size_t n, std::size_t k, std::int32_t* acc,
                         void* workspace, std::size_t workspace_bytes) {
  if (lt_matmul(e, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, CUDA_R_8I, b, a, CUDA_R_32I, acc,
                CUBLAS_COMPUTE_32I, CUDA_R_32I, workspace, workspace_bytes))
    return;
  std::size_t const blocks = (m * n + 255) / 256;
  int8_gemm_fallback_kernel<256>
      <<<static_cast<unsigned>(blocks < 8192 ? blocks : 8192), 256, 0, e.stream>>>(a, b, m, n, k,
                                                                                   acc);
  cuda_detail::check_launch(e, "qmem::quant::int8_gemm_fallback_kernel");
}

//! flags[l] = 1 for every column l holding an |x| above the threshold.
template <class T>
__global__ void __launch_bounds__(256) outlier_flags_kernel(T const* x, std::size_t count,
                                                            std::size_t k, float threshold,
                                                            std::uint32_t* flags) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    if (detail::mm::is_outlier(to_float(x[i]), threshold))
      flags[i % k] = 1u;
}

//! list = {count, flagged columns ascending}: one block of `Threads` scans the flags.
template <int Threads>
__global__ void __launch_bounds__(Threads) outlier_list_kernel(std::uint32_t const* flags,
                                                               std::size_t k, std::int32_t* list) {
  using scan = cub::BlockScan<int, Threads>;
  __shared__ typename scan::TempStorage storage;
  __shared__ int base;
  if (threadIdx.x == 0)
    base = 0;
  __syncthreads();
  for (std::size_t l0 = 0; l0 < k; l0 += Threads) {
    std::size_t const l = l0 + threadIdx.x;
    int const flag = l < k && flags[l] != 0 ? 1 : 0;
    int pos = 0, total = 0;
    scan(storage).ExclusiveSum(flag, pos, total);
    if (flag != 0)
      list[1 + base + pos] = static_cast<std::int32_t>(l);
    __syncthreads();
    if (threadIdx.x == 0)
      base += total;
    __syncthreads();
  }
  if (threadIdx.x == 0)
    list[0] = base;
}

//! One block per row: absmax over the non-outlier columns (order-independent), then the int8
//! codes (0 in outlier columns) and the row's scale.
template <class T>
__global__ void __launch_bounds__(256)
    quantize_rows_int8_kernel(T const* x, std::size_t k, std::uint32_t const* flags,
                              std::int8_t* q, float* row_scale) {
  using reduce = cub::BlockReduce<float, 256>;
  __shared__ typename reduce::TempStorage storage;
  __shared__ float shared_amax;
  std::size_t const r = blockIdx.x;
  float amax = 0.0f;
  for (std::size_t l = threadIdx.x; l < k; l += blockDim.x)
    if (flags == nullptr || flags[l] == 0)
      amax = fmaxf(amax, fabsf(to_float(x[r * k + l])));
  float const total = reduce(storage).Reduce(amax, [](float p, float s) { return fmaxf(p, s); });
  if (threadIdx.x == 0) {
    shared_amax = total;
    row_scale[r] = total;
  }
  __syncthreads();
  float const inv = detail::mm::int8_inverse_scale(shared_amax);
  for (std::size_t l = threadIdx.x; l < k; l += blockDim.x)
    q[r * k + l] = (flags != nullptr && flags[l] != 0)
                       ? std::int8_t{0}
                       : detail::mm::int8_quantize(to_float(x[r * k + l]), inv);
}

// ------------------------------------------------------------------------------------------------
// launch helpers

//! Blocks for a grid-stride loop over `work` items of `per_block` each: at most 8 waves of 132
//! SMs x 8 blocks, enough to saturate an H200 without a tail of tiny blocks.
inline unsigned grid_for(std::size_t work, std::size_t per_block) {
  std::size_t const blocks = (work + per_block - 1) / per_block;
  std::size_t const cap = 132 * 8 * 8;
  return static_cast<unsigned>(blocks == 0 ? 1 : (blocks < cap ? blocks : cap));
}

//! A piece of the workspace: `bytes` at `offset` (256-aligned), advancing offset.
inline std::byte* carve(tensor_view<std::byte> ws, std::size_t& offset, std::size_t bytes) {
  std::byte* p = ws.data() + offset;
  offset += detail::mm::align256(bytes);
  return p;
}

inline bool aligned16(void const* p) noexcept {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

template <class Code>
code_table<16> values_of() {
  return Code::book.value;
}

inline code_table<256> nested_values() { return dynamic_signed::book.value; }

//! Dequantizes w into `out` (n * k elements of T), stream-ordered.
template <class T, class Code>
void dequantize_into(exec::cuda const& e, weight_4bit_view<Code> const& w, T* out) {
  dequant_args<T> a{w.codes.data(), make_scale_args(w.scales), out, w.elements(),
                    detail::mm::log2_exact(w.block_size)};
  bool const vector_ok = reinterpret_cast<std::uintptr_t>(w.codes.data()) % 4 == 0 && aligned16(out);
  unsigned const grid = grid_for(w.elements(), 256 * 8);
  if (w.scales.nested())
    dequant_4bit_kernel<Code, T, true>
        <<<grid, 256, 0, e.stream>>>(a, values_of<Code>(), nested_values(), vector_ok);
  else
    dequant_4bit_kernel<Code, T, false>
        <<<grid, 256, 0, e.stream>>>(a, values_of<Code>(), nested_values(), vector_ok);
  cuda_detail::check_launch(e, "qmem::quant::dequant_4bit_kernel");
}

//! Launches the fast GEMV kernel with a given block shape (the bench compares shapes).
template <class Code, class T, bool Nested, int Warps, int Unroll, int Tiles, bool Shuffle>
void launch_gemv_fast(exec::cuda const& e, gemv_args<T> const& a) {
  auto const grid = static_cast<unsigned>((a.n + 16 * Tiles - 1) / (16 * Tiles));
  if (a.m <= 8)
    gemv_4bit_kernel<Code, T, Nested, 1, Warps, Unroll, Tiles, Shuffle>
        <<<grid, Warps * 32, 0, e.stream>>>(a, values_of<Code>(), nested_values());
  else
    gemv_4bit_kernel<Code, T, Nested, 2, Warps, Unroll, Tiles, Shuffle>
        <<<grid, Warps * 32, 0, e.stream>>>(a, values_of<Code>(), nested_values());
  cuda_detail::check_launch(e, "qmem::quant::gemv_4bit_kernel");
}

template <class Code, class T, bool Nested>
void launch_gemv(exec::cuda const& e, gemv_args<T> const& a, bool fast) {
  if (fast) {
    if (a.m <= 8)
      launch_gemv_fast<Code, T, Nested, gemv_warps, gemv_unroll, 1, gemv_shuffle>(e, a);
    else
      launch_gemv_fast<Code, T, Nested, gemv_warps, gemv_unroll, gemv_tiles, gemv_shuffle>(e, a);
  } else {
    gemv_4bit_generic_kernel<Code, T, Nested>
        <<<grid_for(a.n, 8), 256, 0, e.stream>>>(a, values_of<Code>(), nested_values());
    cuda_detail::check_launch(e, "qmem::quant::gemv_4bit_generic_kernel");
  }
}

template <class Code, class T, bool Nested>
void launch_grad(exec::cuda const& e, grad_args<T> const& a, std::size_t slices, T* out) {
  bool const vec = a.k % 8 == 0 && reinterpret_cast<std::uintptr_t>(a.codes) % 4 == 0;
  if (vec) {
    // batch rows per pass: 1 for a single row, else 8 (acc[8][8] stays in registers)
    unsigned const mb = a.m == 1 ? 1u : 8u;
    dim3 const grid(static_cast<unsigned>((a.k + 2047) / 2048), static_cast<unsigned>(slices),
                    (a.m + mb - 1) / mb);
    if (mb == 1)
      grad_input_4bit_vec_kernel<Code, T, Nested, 1>
          <<<grid, 256, 0, e.stream>>>(a, values_of<Code>(), nested_values());
    else
      grad_input_4bit_vec_kernel<Code, T, Nested, 8>
          <<<grid, 256, 0, e.stream>>>(a, values_of<Code>(), nested_values());
    cuda_detail::check_launch(e, "qmem::quant::grad_input_4bit_vec_kernel");
  } else {
    dim3 const grid(static_cast<unsigned>((a.k + 256 * grad_cols - 1) / (256 * grad_cols)),
                    static_cast<unsigned>(slices));
    grad_input_4bit_kernel<Code, T, Nested>
        <<<grid, 256, 0, e.stream>>>(a, values_of<Code>(), nested_values());
    cuda_detail::check_launch(e, "qmem::quant::grad_input_4bit_kernel");
  }
  std::size_t const count = static_cast<std::size_t>(a.m) * a.k;
  grad_reduce_kernel<T><<<grid_for(count, 256), 256, 0, e.stream>>>(a.partial, slices, count, out);
  cuda_detail::check_launch(e, "qmem::quant::grad_reduce_kernel");
}

inline void check_workspace(tensor_view<std::byte> ws, std::size_t need, char const* fn) {
  if (need == 0)
    return; // the call touches no workspace: any view, the default empty one included, will do
  if (ws.size() < need)
    qmem::detail::raise(fn, ": workspace holds ", ws.size(), " bytes; this call needs ", need,
                        " (see the *_workspace_bytes functions)");
  check_view(ws, fn, "workspace", false, true);
  if (reinterpret_cast<std::uintptr_t>(ws.data()) % 256 != 0)
    qmem::detail::raise(fn, ": workspace is not 256-byte aligned");
}

} // namespace cuda_matmul

//! y[m, n] = x[m, k] * dequant(w)^T on the GPU, stream-ordered on e.stream (no synchronization).
//! m <= gemv_max_rows: the GEMV-style kernel reads codes and scales directly (no workspace);
//! larger m: w is dequantized into `workspace` and cuBLASLt multiplies (fp32 accumulation).
//! Preconditions (bad_argument, nothing launched): x holds m * w.cols, y m * w.rows elements, all
//! views device-accessible; w consistent (weight_4bit_view); m > 0; workspace at least
//! matmul_4bit_workspace_bytes<T>(m, w) bytes, 256-byte aligned; m, n, k < 2^31.
//! Bytes moved (m <= 16): the codes, the scales, x once per 16 rows of w (from L2), y.
template <matmul_activation T, matmul_code_4bit Code>
void matmul_4bit(exec::cuda const& e, std::type_identity_t<tensor_view<T const>> x, std::size_t m,
                 weight_4bit_view<Code> w, tensor_view<T> y, tensor_view<std::byte> workspace = {}) {
  constexpr char const* fn = "qmem::quant::matmul_4bit";
  QMEM_EXPECTS(m > 0, "m is 0; expected at least one row of activations");
  detail::mm::check_weight(w, fn, false, true);
  detail::mm::check_matrix(x, m, w.cols, fn, "x", false, true);
  detail::mm::check_matrix(tensor_view<T const>(y), m, w.rows, fn, "y", false, true);
  QMEM_EXPECTS(m < (std::size_t{1} << 31) && w.rows < (std::size_t{1} << 31) &&
                   w.cols < (std::size_t{1} << 31),
               "shape ", m, " x ", w.rows, " x ", w.cols, "; expected each below 2^31");
  cuda_matmul::check_workspace(workspace, matmul_4bit_workspace_bytes<T>(m, w), fn);
  cuda_detail::device_guard guard(e.device);
  if (m <= gemv_max_rows) {
    cuda_matmul::gemv_args<T> a{x.data(), w.codes.data(), cuda_matmul::make_scale_args(w.scales),
                                y.data(), static_cast<unsigned>(m), w.rows, w.cols,
                                detail::mm::log2_exact(w.block_size)};
    bool const fast = w.cols % 32 == 0 && cuda_matmul::aligned16(w.codes.data()) &&
                      cuda_matmul::aligned16(x.data());
    if (w.scales.nested())
      cuda_matmul::launch_gemv<Code, T, true>(e, a, fast);
    else
      cuda_matmul::launch_gemv<Code, T, false>(e, a, fast);
    return;
  }
  std::size_t offset = 0;
  T* wd = reinterpret_cast<T*>(cuda_matmul::carve(workspace, offset, w.elements() * sizeof(T)));
  cuda_matmul::dequantize_into(e, w, wd);
  cuda_matmul::lt_matmul_or_throw(e, CUBLAS_OP_T, CUBLAS_OP_N, w.rows, m, w.cols,
                                  cuda_matmul::data_type<T>, wd, x.data(),
                                  cuda_matmul::data_type<T>, y.data(), workspace.data() + offset,
                                  workspace.size() - offset);
}

//! QLoRA's backward pass through a frozen 4-bit weight on the GPU:
//! grad_x[m, k] = grad_y[m, n] * dequant(w), stream-ordered. m <= gemv_max_rows: a GEMV-style
//! kernel over row slices whose fp32 partial sums (in `workspace`) are added in a fixed order;
//! larger m: dequantize into `workspace`, then cuBLASLt.
//! Preconditions: grad_y holds m * w.rows, grad_x m * w.cols elements, device-accessible; w
//! consistent; m > 0; workspace at least matmul_4bit_grad_input_workspace_bytes<T>(m, w) bytes,
//! 256-byte aligned; m, n, k < 2^31.
template <matmul_activation T, matmul_code_4bit Code>
void matmul_4bit_grad_input(exec::cuda const& e, std::type_identity_t<tensor_view<T const>> grad_y,
                            std::size_t m, weight_4bit_view<Code> w, tensor_view<T> grad_x,
                            tensor_view<std::byte> workspace = {}) {
  constexpr char const* fn = "qmem::quant::matmul_4bit_grad_input";
  QMEM_EXPECTS(m > 0, "m is 0; expected at least one row of gradients");
  detail::mm::check_weight(w, fn, false, true);
  detail::mm::check_matrix(grad_y, m, w.rows, fn, "grad_y", false, true);
  detail::mm::check_matrix(tensor_view<T const>(grad_x), m, w.cols, fn, "grad_x", false, true);
  QMEM_EXPECTS(m < (std::size_t{1} << 31) && w.rows < (std::size_t{1} << 31) &&
                   w.cols < (std::size_t{1} << 31),
               "shape ", m, " x ", w.rows, " x ", w.cols, "; expected each below 2^31");
  cuda_matmul::check_workspace(workspace, matmul_4bit_grad_input_workspace_bytes<T>(m, w), fn);
  cuda_detail::device_guard guard(e.device);
  if (m <= gemv_max_rows) {
    std::size_t const slices = detail::mm::grad_input_slices(w.rows, w.cols);
    cuda_matmul::grad_args<T> a{grad_y.data(),
                                w.codes.data(),
                                cuda_matmul::make_scale_args(w.scales),
                                reinterpret_cast<float*>(workspace.data()),
                                static_cast<unsigned>(m),
                                w.rows,
                                w.cols,
                                (w.rows + slices - 1) / slices,
                                detail::mm::log2_exact(w.block_size)};
    if (w.scales.nested())
      cuda_matmul::launch_grad<Code, T, true>(e, a, slices, grad_x.data());
    else
      cuda_matmul::launch_grad<Code, T, false>(e, a, slices, grad_x.data());
    return;
  }
  std::size_t offset = 0;
  T* wd = reinterpret_cast<T*>(cuda_matmul::carve(workspace, offset, w.elements() * sizeof(T)));
  cuda_matmul::dequantize_into(e, w, wd);
  cuda_matmul::lt_matmul_or_throw(e, CUBLAS_OP_N, CUBLAS_OP_N, w.cols, m, w.rows,
                                  cuda_matmul::data_type<T>, wd, grad_y.data(),
                                  cuda_matmul::data_type<T>, grad_x.data(),
                                  workspace.data() + offset, workspace.size() - offset);
}

//! LLM.int8's int8 product on the GPU: cuBLASLt int8 x int8 -> int32 into `workspace`, then the
//! epilogue kernel (detail::mm::int8_epilogue); the results equal the host backend's bit for bit.
//! Preconditions: as the host overload, device-accessible views, plus k % 4 == 0 and a, b 16-byte
//! aligned (cuBLASLt's int8 kernels), workspace at least matmul_int8_workspace_bytes(m, n) bytes,
//! 256-byte aligned.
template <float_element Out>
void matmul_int8(exec::cuda const& e, tensor_view<std::int8_t const> a,
                 tensor_view<float const> row_scale, tensor_view<std::int8_t const> b,
                 tensor_view<float const> col_scale, std::size_t m, std::size_t n, std::size_t k,
                 tensor_view<Out> out, tensor_view<std::byte> workspace = {}) {
  constexpr char const* fn = "qmem::quant::matmul_int8";
  QMEM_EXPECTS(m > 0 && n > 0 && k > 0, "shape ", m, " x ", n, " x ", k,
               "; expected m, n, k > 0");
  QMEM_EXPECTS(k <= 131072, "k is ", k, "; expected at most 131072 (int32 accumulation)");
  QMEM_EXPECTS(k % 4 == 0, "k is ", k, "; cuBLASLt's int8 product needs a multiple of 4");
  QMEM_EXPECTS(m < (std::size_t{1} << 31) && n < (std::size_t{1} << 31), "shape ", m, " x ", n,
               "; expected each below 2^31");
  detail::mm::check_matrix(a, m, k, fn, "a", false, true);
  detail::mm::check_matrix(b, n, k, fn, "b", false, true);
  detail::mm::check_matrix(row_scale, m, 1, fn, "row_scale", false, true);
  detail::mm::check_matrix(col_scale, n, 1, fn, "col_scale", false, true);
  detail::mm::check_matrix(tensor_view<Out const>(out), m, n, fn, "out", false, true);
  QMEM_EXPECTS(cuda_matmul::aligned16(a.data()) && cuda_matmul::aligned16(b.data()),
               "a or b is not 16-byte aligned; cuBLASLt's int8 product needs 16");
  cuda_matmul::check_workspace(workspace, matmul_int8_workspace_bytes(m, n), fn);
  cuda_detail::device_guard guard(e.device);
  std::size_t offset = 0;
  auto* acc = reinterpret_cast<std::int32_t*>(
      cuda_matmul::carve(workspace, offset, m * n * sizeof(std::int32_t)));
  cuda_matmul::int8_product(e, a.data(), b.data(), m, n, k, acc, workspace.data() + offset,
                            workspace.size() - offset);
  cuda_matmul::int8_epilogue_kernel<Out, bf16>
      <<<cuda_matmul::grid_for(m * n, 256), 256, 0, e.stream>>>(
          acc, row_scale.data(), col_scale.data(), m, n, k, nullptr, b.data(), nullptr,
          out.data());
  cuda_detail::check_launch(e, "qmem::quant::int8_epilogue_kernel");
}

//! An LLM.int8 linear layer on the GPU (see the host overload for the function computed; the
//! results equal the host's bit for bit): outlier columns flagged and listed in ascending order,
//! rows quantized to int8, cuBLASLt int8 product, epilogue with the outlier columns.
//! Preconditions: as the host overload, device-accessible views, plus k % 4 == 0, b 16-byte
//! aligned, workspace at least linear_int8_workspace_bytes(m, n, k) bytes, 256-byte aligned.
template <matmul_activation T>
void linear_int8(exec::cuda const& e, std::type_identity_t<tensor_view<T const>> x,
                 tensor_view<std::int8_t const> b, tensor_view<float const> col_scale,
                 std::size_t m, std::size_t n, std::size_t k, float threshold, tensor_view<T> out,
                 tensor_view<std::byte> workspace = {}) {
  constexpr char const* fn = "qmem::quant::linear_int8";
  QMEM_EXPECTS(m > 0 && n > 0 && k > 0, "shape ", m, " x ", n, " x ", k,
               "; expected m, n, k > 0");
  QMEM_EXPECTS(k <= 131072, "k is ", k, "; expected at most 131072 (int32 accumulation)");
  QMEM_EXPECTS(k % 4 == 0, "k is ", k, "; cuBLASLt's int8 product needs a multiple of 4");
  QMEM_EXPECTS(m < (std::size_t{1} << 31) && n < (std::size_t{1} << 31), "shape ", m, " x ", n,
               "; expected each below 2^31");
  detail::mm::check_matrix(x, m, k, fn, "x", false, true);
  detail::mm::check_matrix(b, n, k, fn, "b", false, true);
  detail::mm::check_matrix(col_scale, n, 1, fn, "col_scale", false, true);
  detail::mm::check_matrix(tensor_view<T const>(out), m, n, fn, "out", false, true);
  QMEM_EXPECTS(cuda_matmul::aligned16(b.data()),
               "b is not 16-byte aligned; cuBLASLt's int8 product needs 16");
  cuda_matmul::check_workspace(workspace, linear_int8_workspace_bytes(m, n, k), fn);
  cuda_detail::device_guard guard(e.device);
  std::size_t offset = 0;
  auto* flags = reinterpret_cast<std::uint32_t*>(cuda_matmul::carve(workspace, offset, k * 4));
  auto* list = reinterpret_cast<std::int32_t*>(cuda_matmul::carve(workspace, offset, (k + 1) * 4));
  auto* q = reinterpret_cast<std::int8_t*>(cuda_matmul::carve(workspace, offset, m * k));
  auto* rs = reinterpret_cast<float*>(cuda_matmul::carve(workspace, offset, m * 4));
  auto* acc = reinterpret_cast<std::int32_t*>(cuda_matmul::carve(workspace, offset, m * n * 4));
  bool const outliers = threshold > 0.0f;
  if (outliers) {
    cuda_detail::check(cudaMemsetAsync(flags, 0, k * 4, e.stream), "cudaMemsetAsync");
    cuda_matmul::outlier_flags_kernel<T><<<cuda_matmul::grid_for(m * k, 256), 256, 0, e.stream>>>(
        x.data(), m * k, k, threshold, flags);
    cuda_detail::check_launch(e, "qmem::quant::outlier_flags_kernel");
    cuda_matmul::outlier_list_kernel<1024><<<1, 1024, 0, e.stream>>>(flags, k, list);
    cuda_detail::check_launch(e, "qmem::quant::outlier_list_kernel");
  }
  cuda_matmul::quantize_rows_int8_kernel<T><<<static_cast<unsigned>(m), 256, 0, e.stream>>>(
      x.data(), k, outliers ? flags : nullptr, q, rs);
  cuda_detail::check_launch(e, "qmem::quant::quantize_rows_int8_kernel");
  cuda_matmul::int8_product(e, q, b.data(), m, n, k, acc, workspace.data() + offset,
                            workspace.size() - offset);
  cuda_matmul::int8_epilogue_kernel<T, T><<<cuda_matmul::grid_for(m * n, 256), 256, 0, e.stream>>>(
      acc, rs, col_scale.data(), m, n, k, x.data(), b.data(), outliers ? list : nullptr,
      out.data());
  cuda_detail::check_launch(e, "qmem::quant::int8_epilogue_kernel");
}

} // namespace qmem::quant
