#pragma once
//! \file
//! CUDA backend of quant/matmul.hpp: the same entry points taking `exec::cuda` first.
//!
//! - Batches of 1 to gemv_max_rows (16) rows run GEMV-style kernels that read the 4-bit codes and
//!   the block scales directly and never multiply a weight by its scale: a code byte (two codes)
//!   decodes to a pair of T table values through a 256-entry shared-memory table (one byte
//!   permute and one conflict-free load per two weights), the tensor cores (`mma.sync` m16n8k16,
//!   fp32 accumulators) sum the products of one block, and the block's fp32 scale multiplies that
//!   partial sum once per row (docs/matmul.md, "GEMV path": the function and its tolerance).
//!   Batch 1 has its own layout (the 8 batch columns of the fragment carry 8 column chunks) and
//!   its own streaming kernel (gemv1_stream_kernel: one block per SM, warps own column slices with
//!   x in registers and stream row pairs; gemv1_4bit_kernel for rows longer than 32768); batches
//!   2-16 use gemvm_stream_kernel (the same streaming design on the standard fragment layout;
//!   gemv_4bit_kernel for blocks of 32). Warps split the columns and reduce in shared memory in a
//!   fixed order (deterministic).
//! - Larger batches dequantize the weight into a caller-provided bf16/f16 workspace and call
//!   cuBLASLt (fp32 accumulation).
//! - QLoRA's grad_input = grad_y * dequant(w): a GEMV-style kernel up to grad_input_gemv_max_rows,
//!   else dequantize + cuBLASLt.
//! - int8: cuBLASLt int8 x int8 -> int32, then an epilogue kernel applies the row and column
//!   scales; outlier columns are gathered into dense fp32 blocks and added by a tiled epilogue.
//! Every call is stream-ordered on `e.stream`, launches on `e.device`, checks its preconditions
//! (bad_argument, nothing launched) and checks each launch.

#include <qmem/core/config.hpp>
#include <qmem/core/cuda/runtime.cuh>
#include <qmem/quant/cuda/detail/gemm_sm90.cuh>
#include <qmem/quant/cuda/detail/pack.cuh>
#include <qmem/quant/matmul.hpp>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace qmem::quant {
namespace cuda_matmul {

// ------------------------------------------------------------------------------------------------
// cuBLASLt plumbing

//! Throws qmem::cuda_error naming the cuBLAS call when `status` is not CUBLAS_STATUS_SUCCESS.
inline void check_cublas(cublasStatus_t status, char const* what) {
  if (status != CUBLAS_STATUS_SUCCESS) [[unlikely]]
    throw cuda_error(
        qmem::detail::message(what, " failed: cuBLAS status ", static_cast<int>(status)),
        static_cast<int>(status));
}

//! The one-time set-up calls of a first use inside a stream capture: see
//! cuda_detail::relaxed_capture_scope.
using cuda_detail::relaxed_capture_scope;

//! One cuBLASLt handle per device, created on first use and kept for the process's lifetime
//! (creating one costs far more than a small matmul). Safe on a first use inside a capture.
inline cublasLtHandle_t lt_handle(int device) {
  static std::mutex mutex;
  static cublasLtHandle_t handles[64] = {};
  QMEM_EXPECTS(device >= 0 && device < 64, "e.device is ", device, "; expected 0..63");
  std::lock_guard<std::mutex> lock(mutex);
  if (handles[device] == nullptr) {
    relaxed_capture_scope const relaxed;
    check_cublas(cublasLtCreate(&handles[device]), "cublasLtCreate");
  }
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
                                    cublasOperation_t op_b, std::uint64_t rows, std::uint64_t cols,
                                    std::uint64_t inner, cudaDataType_t ab_type, void const* a,
                                    void const* b, cudaDataType_t d_type, void* d,
                                    cublasComputeType_t compute, cudaDataType_t scale_type,
                                    void* workspace, std::size_t workspace_bytes,
                                    std::uint64_t ld_d = 0) {
  lt_descriptors ds;
  check_cublas(cublasLtMatmulDescCreate(&ds.op, compute, scale_type), "cublasLtMatmulDescCreate");
  check_cublas(
      cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a, sizeof(op_a)),
      "cublasLtMatmulDescSetAttribute(TRANSA)");
  check_cublas(
      cublasLtMatmulDescSetAttribute(ds.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b, sizeof(op_b)),
      "cublasLtMatmulDescSetAttribute(TRANSB)");
  std::uint64_t const a_rows = op_a == CUBLAS_OP_N ? rows : inner;
  std::uint64_t const a_cols = op_a == CUBLAS_OP_N ? inner : rows;
  std::uint64_t const b_rows = op_b == CUBLAS_OP_N ? inner : cols;
  std::uint64_t const b_cols = op_b == CUBLAS_OP_N ? cols : inner;
  check_cublas(
      cublasLtMatrixLayoutCreate(&ds.a, ab_type, a_rows, a_cols, static_cast<std::int64_t>(a_rows)),
      "cublasLtMatrixLayoutCreate(A)");
  check_cublas(
      cublasLtMatrixLayoutCreate(&ds.b, ab_type, b_rows, b_cols, static_cast<std::int64_t>(b_rows)),
      "cublasLtMatrixLayoutCreate(B)");
  check_cublas(cublasLtMatrixLayoutCreate(&ds.c, d_type, rows, cols,
                                          static_cast<std::int64_t>(ld_d == 0 ? rows : ld_d)),
               "cublasLtMatrixLayoutCreate(D)");
  check_cublas(cublasLtMatmulPreferenceCreate(&ds.pref), "cublasLtMatmulPreferenceCreate");
  check_cublas(cublasLtMatmulPreferenceSetAttribute(ds.pref,
                                                    CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &workspace_bytes, sizeof(workspace_bytes)),
               "cublasLtMatmulPreferenceSetAttribute(MAX_WORKSPACE_BYTES)");
  {
    // the heuristic assumes 256-byte aligned matrices unless told: tell it the real alignment
    // (a row chunk of the overlapped forward starts inside the weight and the output)
    auto alignment = [](void const* p) -> std::uint32_t {
      auto const a = reinterpret_cast<std::uintptr_t>(p);
      std::uintptr_t const low = a & (~a + 1); // lowest set bit; 0 for a null pointer
      return low == 0 || low > 256 ? 256u : static_cast<std::uint32_t>(low);
    };
    std::uint32_t const align[4] = {alignment(a), alignment(b), alignment(d), alignment(d)};
    cublasLtMatmulPreferenceAttributes_t const which[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; ++i)
      if (align[i] < 256)
        check_cublas(
            cublasLtMatmulPreferenceSetAttribute(ds.pref, which[i], &align[i], sizeof(align[i])),
            "cublasLtMatmulPreferenceSetAttribute(MIN_ALIGNMENT)");
  }
  if (compute != CUBLAS_COMPUTE_32I) {
    // split-K partial sums are added in fp32 (in the workspace) or not at all: reducing them in
    // the bf16/f16 output type (or in place in the output) rounds each partial sum to T, which
    // an H200 run showed for 8 x 50 x 160 and 9 x 24 x 100 grad-input products (3 ulp errors)
    std::uint32_t const schemes =
        CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    check_cublas(cublasLtMatmulPreferenceSetAttribute(ds.pref,
                                                      CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                                      &schemes, sizeof(schemes)),
                 "cublasLtMatmulPreferenceSetAttribute(REDUCTION_SCHEME_MASK)");
  }
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
                               std::size_t workspace_bytes, std::uint64_t ld_d = 0) {
  if (!lt_matmul(e, op_a, op_b, rows, cols, inner, ab_type, a, b, d_type, d, CUBLAS_COMPUTE_32F,
                 CUDA_R_32F, workspace, workspace_bytes, ld_d))
    throw cuda_error(qmem::detail::message("cuBLASLt has no algorithm for a ", rows, " x ", cols,
                                           " x ", inner, " product"),
                     0);
}

// ------------------------------------------------------------------------------------------------
// element helpers

template <class T>
inline constexpr cudaDataType_t data_type = std::same_as<T, bf16> ? CUDA_R_16BF : CUDA_R_16F;

//! c += a * b on the tensor cores: m16n8k16, A row-major 16x16, B column-major 16x8, fp32 c.
template <class T>
__device__ QMEM_INLINE void mma_16816(float (&c)[4], std::uint32_t const (&a)[4], std::uint32_t b0,
                                      std::uint32_t b1) {
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
  float const* absmax;         //!< plain scales, or nullptr
  std::uint8_t const* qabsmax; //!< nested codes, or nullptr
  float const* absmax2;        //!< nested scales
  float offset;                //!< nested offset
  unsigned nested_block;       //!< blocks per absmax2 entry
  int nested_shift;            //!< log2(nested_block) when a power of two, else -1
};

//! Precondition (qmem::bad_argument, before any launch): a nested block size that is not a power
//! of two fits the kernels' 32-bit divisor (powers of two of any size are a shift).
inline scale_args make_scale_args(block_scales const& s) {
  std::size_t const nb = s.nested_block_size;
  int const shift =
      nb != 0 && (nb & (nb - 1)) == 0 ? static_cast<int>(detail::mm::log2_exact(nb)) : -1;
  if (shift < 0 && nb > std::numeric_limits<unsigned>::max())
    throw qmem::bad_argument("qmem::quant CUDA matmul: nested_block_size " + std::to_string(nb) +
                             " is not a power of two and above 4294967295; expected a power of "
                             "two or at most 4294967295 on the GPU");
  return {s.absmax.data(), s.qabsmax.data(),          s.absmax2.data(),
          s.offset,        static_cast<unsigned>(nb), shift};
}

//! The absmax2 group of block b: a shift when the nested block size is a power of two (always,
//! with bitsandbytes' 256), else a division.
__device__ QMEM_INLINE std::size_t nested_group(scale_args const& s, std::size_t b) {
  return s.nested_shift >= 0 ? b >> s.nested_shift : b / s.nested_block;
}

//! The absmax2 group of block b when the nested block size is a power of two (the fast GEMV
//! kernels' precondition): one shift. In their loops the general form compiled to a branch and
//! a 64-bit division per scale load (SASS of the batch-1 nested kernel, 2026-11-29: 4.8-5.3
//! instructions per weight against 2.1-2.6 with plain scales).
__device__ QMEM_INLINE std::size_t nested_group_pow2(scale_args const& s, std::size_t b) {
  return b >> s.nested_shift;
}

//! The scale of block b (`dyn` is the signed dynamic map, in shared memory, when Nested).
template <bool Nested>
__device__ QMEM_INLINE float block_scale(scale_args const& s, std::size_t b, float const* dyn) {
  if constexpr (Nested)
    return fmath::add(fmath::mul(dyn[__ldg(s.qabsmax + b)], __ldg(s.absmax2 + nested_group(s, b))),
                      s.offset);
  else
    return __ldg(s.absmax + b);
}

// ------------------------------------------------------------------------------------------------
// GEMV-style forward: y[m, n] = x[m, k] * w[n, k]^T for m <= 16
//
// What it computes (docs/matmul.md, "GEMV path"): each code decodes to its table value rounded
// once to T (exact in T, so every product with an activation is exact in fp32); the products of one
// 64-column step of a row are summed in fp32 on the tensor cores, and the block's fp32 scale
// multiplies that partial sum once (one fused multiply-add into the row's fp32 accumulator). No
// weight is ever multiplied by its scale, which is what made the previous kernel instruction-bound
// (per weight: a shuffle, a float product and half a conversion; 43-46% of the copy bandwidth).
//
// Decoding: a byte (two codes) indexes a 256-entry table of T pairs in shared memory, laid out as
// [byte][64 words] with lane l reading word l, so that the 32 lanes of a warp always hit 32
// different banks whatever their bytes. The byte offset of a lane's entry, (byte << 8) | (lane *
// 4), is one byte permute (PRMT) of the code word and a register holding lane * 4: per two weights
// one PRMT and one LDS, the pair landing directly in a tensor-core A register.

//! Bytes of the decode table: 256 entries of 64 words (lanes use words 0..31 of each).
inline constexpr unsigned gemv_lut_bytes = 256 * 256;

//! Fills the GEMV kernels' shared tables: the decode table (entry `byte`, lane l at word
//! 64 * byte + l: the T pair of the byte's two codes, the high nibble's in the low half, so that
//! 32 lanes never share a bank) and the nested map `dyn` when Nested. Every thread of the block
//! calls it (blockDim.x a multiple of 32); it ends with a barrier.
//! How: lane l holds the T bits of value l % 16 (one dynamic index into the kernel parameter
//! per thread; written as 15 selects over the 16 values instead, nvcc 13 turned each select into
//! a 16-way predicated constant load: 4.2 us per call), each entry's word comes from two shuffles,
//! and each thread writes 16 bytes (4 lanes' words of one entry) per store: 2048 stores per
//! table. The table build is on every call's critical path: the next call's block can only
//! start once this one's has left its SM (one per SM). The former build (the 16 values staged
//! in shared memory behind a barrier, then one 4-byte store per word: 8192 per table, each
//! reading the staged values) cost 0.4-0.7 us per call more: H200, 2026-11-30 01:29 UTC, the
//! same session, 200 calls in one graph, NF4 block 64, bf16, us on 4096 x 4096 / 14336 x 4096 /
//! 4096 x 14336 / 8192 x 8192 / 28672 x 8192, matmul_4bit batch 1 5.29 / 10.48 / 10.90 / 12.05 /
//! 37.18 -> 4.81 / 9.95 / 10.34 / 11.46 / 37.10, nested scales 6.04 / 11.81 / 12.16 / 13.33 /
//! 40.81 -> 5.37 / 11.08 / 11.40 / 12.81 / 40.74, batch 16 7.16 / 19.37 / 17.99 / 19.95 / 77.32
//! -> 6.73 / 19.31 / 17.90 / 19.73 / 76.85 (ncu, 4096 x 4096, one launch: 1026 instructions
//! per warp instead of about 1200, 8.42 us instead of 8.80).
template <class T, bool Nested>
__device__ QMEM_INLINE void fill_gemv_tables(std::uint32_t* lut, float* dyn,
                                             code_table<16> const& values,
                                             code_table<256> const& nested) {
  unsigned const lane = threadIdx.x & 31u;
  std::uint32_t const bits = from_float<T>(values.value[lane & 15u]).bits;
  if constexpr (Nested)
    for (unsigned i = threadIdx.x; i < 256u; i += blockDim.x)
      dyn[i] = nested.value[i];
  // store s: words 4 (s % 8) .. 4 (s % 8) + 3 of entry s / 8 (a warp's 32 stores are all in or
  // all out of the loop: blockDim.x and 2048 are multiples of 32)
  auto* const lut4 = reinterpret_cast<uint4*>(lut);
  for (unsigned s = threadIdx.x; s < 2048u; s += blockDim.x) {
    std::uint32_t const lo = __shfl_sync(0xFFFFFFFFu, bits, static_cast<int>(s >> 7));
    std::uint32_t const hi = __shfl_sync(0xFFFFFFFFu, bits, static_cast<int>((s >> 3) & 15u));
    std::uint32_t const w = lo | (hi << 16);
    lut4[(s >> 3) * 16u + (s & 7u)] = make_uint4(w, w, w, w);
  }
  __syncthreads();
}

//! What the GEMV kernels read, by value.
template <class T>
struct gemv_args {
  T const* x;                //!< [m, k]
  std::uint8_t const* codes; //!< packed codes
  scale_args scales;
  T* y; //!< [m, n]
  unsigned m;
  std::size_t n, k;
  unsigned block_shift; //!< log2(block size)
  //! Always 0, unknown to the compiler: the first product of a step group depends on every load
  //! of the group through it, so that ptxas issues them all before computing (without it, it
  //! sank the later steps' loads below the first products: one step in flight per warp).
  std::uint32_t zero = 0;
};

//! c = a * b on the tensor cores with a zero accumulator (the partial sum of one step).
template <class T>
__device__ QMEM_INLINE void mma_16816_zero(float (&c)[4], std::uint32_t const (&a)[4],
                                           std::uint32_t b0, std::uint32_t b1) {
  float const z = 0.0f;
  if constexpr (std::same_as<T, bf16>)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};\n"
                 : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(z));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
                 "{%4,%5,%6,%7}, {%8,%9}, {%10,%10,%10,%10};\n"
                 : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(z));
}

// Loads through the non-coherent path that stay where they are written: asm volatile statements
// keep their order, so every load of a step group is issued before the first tensor-core product
// (plain __ldg let the compiler sink the later steps' loads below the first products, leaving one
// step in flight per warp). `pred` false leaves the destination unchanged.

__device__ QMEM_INLINE void ldg(uint2& v, void const* p) {
  asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
}
__device__ QMEM_INLINE void ldg(uint4& v, void const* p) {
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
}
__device__ QMEM_INLINE void ldg(float& v, float const* p) {
  asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
}
__device__ QMEM_INLINE void ldg(std::uint32_t& v, std::uint8_t const* p) {
  asm volatile("ld.global.nc.u8 %0, [%1];" : "=r"(v) : "l"(p));
}
__device__ QMEM_INLINE void ldg_pred(uint2& v, void const* p, bool pred);
__device__ QMEM_INLINE void ldg_pred(uint4& v, void const* p, bool pred);
__device__ QMEM_INLINE void ldg_pred(float& v, float const* p, bool pred);
__device__ QMEM_INLINE void ldg_pred(std::uint32_t& v, std::uint8_t const* p, bool pred);
//! ldg when `Full` (every address valid), else a predicated load that leaves v unchanged.
template <bool Full, class V, class P>
__device__ QMEM_INLINE void ldg_if(V& v, P const* p, bool pred) {
  if constexpr (Full)
    ldg(v, p);
  else
    ldg_pred(v, p, pred);
}

__device__ QMEM_INLINE void ldg_pred(uint2& v, void const* p, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n"
               " @q ld.global.nc.v2.u32 {%0, %1}, [%2];\n}\n"
               : "+r"(v.x), "+r"(v.y)
               : "l"(p), "r"(static_cast<int>(pred)));
}
__device__ QMEM_INLINE void ldg_pred(uint4& v, void const* p, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n"
               " @q ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
               : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
               : "l"(p), "r"(static_cast<int>(pred)));
}
__device__ QMEM_INLINE void ldg_pred(float& v, float const* p, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n"
               " @q ld.global.nc.f32 %0, [%1];\n}\n"
               : "+f"(v)
               : "l"(p), "r"(static_cast<int>(pred)));
}
__device__ QMEM_INLINE void ldg_pred(std::uint32_t& v, std::uint8_t const* p, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %2, 0;\n"
               " @q ld.global.nc.u8 %0, [%1];\n}\n"
               : "+r"(v)
               : "l"(p), "r"(static_cast<int>(pred)));
}
//! ldg of bytes read once: they are not kept in L1 (`L1::no_allocate`).
__device__ QMEM_INLINE void ldg_once(uint2& v, void const* p) {
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];"
               : "=r"(v.x), "=r"(v.y)
               : "l"(p));
}
//! ldg_pred of bytes read once: they are not kept in L1 (`L1::no_allocate`).
__device__ QMEM_INLINE void ldg_pred_once(uint2& v, void const* p, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %3, 0;\n"
               " @q ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n}\n"
               : "+r"(v.x), "+r"(v.y)
               : "l"(p), "r"(static_cast<int>(pred)));
}
__device__ QMEM_INLINE void ldg_pred_once(uint4& v, void const* p, bool pred) {
  asm volatile("{\n .reg .pred q;\n setp.ne.b32 q, %5, 0;\n"
               " @q ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
               : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
               : "l"(p), "r"(static_cast<int>(pred)));
}

//! A row's code bytes at p: not kept in L1 when `Once` (ldg_once, ldg_pred_once), else ldg_if;
//! unpredicated when `Full`, else only where `pred` (v unchanged elsewhere).
template <bool Once, bool Full, class V>
__device__ QMEM_INLINE void ldg_codes(V& v, std::uint8_t const* p, bool pred) {
  if constexpr (Once && Full)
    ldg_once(v, p);
  else if constexpr (Once)
    ldg_pred_once(v, p, pred);
  else
    ldg_if<Full>(v, p, pred);
}

//! The scale of block b as the GEMV kernels read it (the nested one decoded once per block and
//! row, never per weight).
template <bool Nested>
__device__ QMEM_INLINE float gemv_scale(scale_args const& s, std::size_t b, float const* dyn) {
  if constexpr (Nested)
    return fmath::add(fmath::mul(dyn[__ldg(s.qabsmax + b)], __ldg(s.absmax2 + nested_group(s, b))),
                      s.offset);
  else
    return __ldg(s.absmax + b);
}

//! Block shape of the fast GEMV kernel: warps per block (they split the columns of the block's
//! rows), 64-column steps each warp loads before computing, 16-row weight tiles per warp.
struct gemv_shape {
  int warps;  //!< warps per block
  int unroll; //!< steps in flight per warp
  int tiles;  //!< 16-row tiles per warp (each reuses the warp's activation fragments)
  //! A warp's steps in flight are consecutive (else `warps` apart), so that with 4 of them and
  //! 64-element plain blocks a row's 4 scales are one 16-byte load (needs k % 256 == 0).
  bool contiguous = false;
};

//! Block shape of the batch-1 GEMV kernel: warps per block (they split the columns of the block's
//! rows), 512-column super-steps each warp loads before computing, pairs of weight rows per warp.
struct gemv1_shape {
  int warps;  //!< warps per block
  int unroll; //!< super-steps in flight per warp
  int pairs;  //!< pairs of weight rows per warp (each reuses the warp's activation fragments)
  //! Software pipelining: the loads of a warp's next step group are issued before the products
  //! of the current one (two groups of registers), so that a warp always has loads in flight;
  //! without it a warp loads, waits, then computes with nothing in flight.
  bool pipelined = false;
  //! The decode table's address comes out of the byte permute whole (the table's shared address
  //! is a multiple of 64 KiB, checked at run time, else the kernel adds it): one instruction less
  //! per two weights.
  bool direct_lut = false;
  //! Blocks per SM the registers are capped for (__launch_bounds__); 0: 2, or 1 with 16 warps.
  //! The 64 KiB table allows 3; 3 blocks of 8 warps cap a thread at 80 registers.
  int blocks = 0;
};

//! Blocks per SM a batch-1 kernel of this shape is compiled for.
constexpr int gemv1_min_blocks(gemv1_shape s) {
  return s.blocks > 0 ? s.blocks : (s.warps >= 16 ? 1 : 2);
}

//! The loads of one step group of the batch-1 kernel (`U` super-steps, `Pairs` row pairs).
template <int U, int Pairs>
struct gemv1_stage {
  static constexpr int unroll = U;
  uint2 q[U][Pairs][2];          //!< 16 codes of each row
  float s[U][Pairs][2];          //!< plain scale, or the nested group's absmax2
  std::uint32_t qs[U][Pairs][2]; //!< nested: the block's 8-bit scale code
  uint4 xv[U][2];                //!< 16 activations
};

// Tuning of the GEMV kernels: bench/cuda/matmul_bench.cu, gemv_variant (200 calls in one CUDA
// graph, NF4 block 64, plain scales), one H200, two runs on 2026-11-29. The 64 KiB decode table
// allows at most 3 blocks per SM.

//! Batch 1 with blocks of 64 or more (gemv1_4bit_kernel). bench gemv_variant, plain scales, one
//! H200, 2026-11-29, us on 4096 x 4096 / 14336 x 4096 / 4096 x 14336 / 8192 x 8192 / 28672 x 8192:
//! {8, 1, 4} 7.38 / 19.40 / 13.76 / 17.36 / 57.30; {8, 2, 2} 8.44 / 22.66 / 15.05 / 18.89 /
//! 62.33; {8, 1, 2} 8.01 / 21.25 / 15.52 / 19.39 / 69.79; {8, 4, 1} 9.85 / 27.50 / 18.61 / 24.59 /
//! 102.5; {16, 2, 2} 14.99 / 47.19 / 21.40 / 32.98 / 118.6. (The batch-16 layout at batch 1, best
//! of its shapes {8, 2, 2}: 7.75 / 21.66 / 18.10 / 18.95 / 72.04.)
inline constexpr gemv1_shape gemv_batch1{8, 1, 4};
//! Shapes that raise the batch-1 kernel's memory-level parallelism, compiled and counted offline
//! (nvcc 13, sm_90, 2026-11-29; not yet timed): instructions per weight in the main loop from
//! the SASS, registers from ptxas -v, warps per SM from registers and the 64 KiB table.
//! {8, 1, 4} (dispatched): 2.58 per weight, 128 registers, 16 warps per SM, loads then products.
//! 0 {8, 1, 4, direct}: 2.07 (the address add gone), 128 registers and 60 bytes spilled (outside
//!   the main loop), 16 warps.
//! 1 {8, 1, 2, pipelined}: 2.55, 125 registers, 16 warps, loads always in flight.
//! 2 {8, 1, 2, pipelined, direct}: 2.08, 122 registers, 16 warps.
//! 3 {8, 1, 2, pipelined, direct, 3 blocks}: 2.21, 80 registers, 24 warps.
//! 4 {8, 1, 1, pipelined, direct, 3 blocks}: 2.41, 80 registers, 24 warps.
//! 5 {16, 1, 1, pipelined, direct, 2 blocks}: 2.36, 64 registers, 32 warps (one table per 16).
//! The bench's gemv_variant times them as variants 13 to 18 beside the dispatched {8, 1, 4}
//! (variant 9); the tests check each against the GEMV model.
inline constexpr gemv1_shape gemv_batch1_candidates[] = {
    {8, 1, 4, false, true},   {8, 1, 2, true, false},   {8, 1, 2, true, true},
    {8, 1, 2, true, true, 3}, {8, 1, 1, true, true, 3}, {16, 1, 1, true, true, 2}};
//! Which shape batch 1 with plain scales runs: -1 the measured gemv_batch1, else
//! gemv_batch1_candidates[gemv_batch1_pick]. TO BE CONFIRMED by the H200 run of bench
//! gemv_variant (variants 13-18 against 9 on the five anchor shapes): pick the candidate that is
//! fastest on all five, or keep -1.
inline constexpr int gemv_batch1_pick = -1;
//! The shape batch 1 with plain scales runs (gemv_batch1_pick).
inline constexpr gemv1_shape gemv_batch1_dispatched =
    gemv_batch1_pick < 0 ? gemv_batch1 : gemv_batch1_candidates[gemv_batch1_pick];
//! The same with nested scales (two more loads per chunk and row: 4 pairs exceed 128 registers).
//! Measured at {8, 2, 2} only: 10.26 / 26.27 / 18.67 / 23.01 / 74.21 us (same run), before the
//! nested group became a shift (5.3 -> 3.3 SASS instructions per weight; not yet timed).
inline constexpr gemv1_shape gemv_batch1_nested{8, 2, 2};
//! Batches of 2 to 8 rows (and batch 1 with 32-element blocks). Not measured at batch 2-8; at
//! batch 1 (the same 8-row fragment) on 8192 x 8192, one H200, 2026-11-29: {8, 2, 2} 18.96 us,
//! {8, 4, 2} 23.11, {8, 4, 1} 26.07, {16, 2, 1} 22.34; on 28672 x 8192 72.30 / 82.58 / 80.32 /
//! 76.35.
inline constexpr gemv_shape gemv_small_batch{8, 2, 2};
//! Batches of 9 to 16 rows: two tiles per warp halve the activation reads per weight. Run 1 of
//! 2026-11-29 (H200, batch 16, interleaved steps): {8, 4, 2} 8.63 / 27.5 / 97.9 us on 4096 x 4096
//! / 8192 x 8192 / 28672 x 8192, against 8.86 / 28.6 / 104.9 with {8, 2, 2} and 9.80 / 32.0 /
//! 113.2 with {8, 4, 1}.
inline constexpr gemv_shape gemv_large_batch{8, 4, 2, true};

//! The fast path: k % 64 == 0, codes 8-byte and x 16-byte aligned. A warp owns `Tiles` tiles of
//! 16 weight rows and walks 64-column steps (`Unroll` steps loaded before any is computed, the
//! `Warps` warps of the block interleaved so that together they read contiguous bytes); `MTiles`
//! 8-row halves of the batch. Thread (g, t) of a warp holds, per step, bytes 8t..8t+7 of the step's
//! 32 code bytes in rows g and g + 8 of each tile: columns 16t..16t+15, all inside one block when
//! the block size is >= 64. With 32-element blocks (`Block32`) threads 0-1 and 2-3 of a group
//! hold different blocks, so each step is two half-products whose other half is zero. `Block64`:
//! the block size is 64 (compile-time scale addressing).
template <class Code, class T, bool Nested, int MTiles, int Warps, int Unroll, int Tiles,
          bool Block32, bool Block64, bool Contig>
__global__ void __launch_bounds__(Warps * 32)
    gemv_4bit_kernel(gemv_args<T> a, code_table<16> values, code_table<256> nested) {
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  extern __shared__ __align__(16) std::uint32_t gemv_lut[]; // the same memory, read by decode
  // [0, 64 KiB): decode table; then the partial sums [Warps][16 * Tiles][17]; the nested map; the
  // 16 table values in T
  auto* const partial = reinterpret_cast<float(*)[16 * Tiles][17]>(gemv_smem + gemv_lut_bytes);
  float* const dyn = reinterpret_cast<float*>(gemv_smem + gemv_lut_bytes) + Warps * 16 * Tiles * 17;
  constexpr int halves = Block32 ? 2 : 1;

  int const warp = static_cast<int>(threadIdx.x >> 5);
  int const lane = static_cast<int>(threadIdx.x & 31);
  int const g = lane >> 2; // fragment row group
  int const t = lane & 3;  // thread in group
  auto const steps = static_cast<std::uint32_t>(a.k >> 6);
  std::size_t const row0 =
      static_cast<std::size_t>(blockIdx.x) * 16 * Tiles + static_cast<std::size_t>(g);
  // log2(64-column steps per block) (k is a multiple of the block, so rows start on a block);
  // compile-time 0 for 64-element blocks, whose scale addresses are then immediates
  unsigned const step_shift = Block32 || Block64 ? 0u : a.block_shift - 6u;

  // the rows this thread reads: their codes (at this thread's 8 bytes) and their first block
  // (rows past n read row n - 1: finite values, never written)
  std::uint8_t const* rowp[Tiles][2];
  std::size_t rowblk[Tiles][2];
  float const* rows[Tiles][2];        // plain scales of the row (absmax2 when nested: unused)
  std::uint8_t const* rowq[Tiles][2]; // nested codes of the row
  QMEM_UNROLL
  for (int r = 0; r < Tiles; ++r)
    QMEM_UNROLL
  for (int h = 0; h < 2; ++h) {
    std::size_t row = row0 + static_cast<std::size_t>(16 * r + 8 * h);
    row = row < a.n ? row : a.n - 1;
    rowp[r][h] = a.codes + row * (a.k / 2) + 8 * static_cast<std::size_t>(t);
    rowblk[r][h] = (row * a.k) >> a.block_shift;
    rows[r][h] = Nested ? nullptr : a.scales.absmax + rowblk[r][h];
    rowq[r][h] = Nested ? a.scales.qabsmax + rowblk[r][h] : nullptr;
  }
  // this thread's activation rows (batch rows g and g + 8), at its 16 columns
  T const* xrow[MTiles];
  QMEM_UNROLL
  for (int mt = 0; mt < MTiles; ++mt)
    xrow[mt] = a.x + static_cast<std::size_t>(mt * 8 + g) * a.k + 16 * t;

  // the decode table and the nested map
  auto* const lut = reinterpret_cast<std::uint32_t*>(gemv_smem);
  fill_gemv_tables<T, Nested>(lut, dyn, values, nested);
  std::uint32_t const lane_bytes = static_cast<std::uint32_t>(lane) * 4u;
  // (the table's shared-window base stays in a uniform register: LDS [R + UR], no add per lookup)
  auto decode = [&](std::uint32_t word, int byte) -> std::uint32_t {
    std::uint32_t const off =
        __byte_perm(word, lane_bytes, 0x5504u | (static_cast<unsigned>(byte) << 4));
    return *reinterpret_cast<std::uint32_t const*>(
        reinterpret_cast<unsigned char const*>(gemv_lut) + off);
  };

  float acc[Tiles][MTiles][4];
  QMEM_UNROLL
  for (int r = 0; r < Tiles; ++r)
    QMEM_UNROLL
  for (int i = 0; i < MTiles; ++i)
    acc[r][i][0] = acc[r][i][1] = acc[r][i][2] = acc[r][i][3] = 0.0f;

  // U steps c0, c0 + Warps, ...: all their code and scale loads first, then the products. `Full`:
  // every step exists (no predicates); else steps past the end load nothing and add nothing.
  constexpr int S = Contig ? 1 : Warps; // steps between a warp's steps in flight
  auto group = [&](std::uint32_t c0, auto full, auto unroll) {
    constexpr bool Full = decltype(full)::value;
    constexpr int U = decltype(unroll)::value;
    constexpr bool vec_scales = Contig && Full && U == 4 && Block64 && !Nested;
    uint2 q[U][Tiles][2];
    float s[U][Tiles][2][halves];          // plain scale, or absmax2 when nested
    std::uint32_t qs[U][Tiles][2][halves]; // nested code (unused when plain)
    // addresses: a 64-bit base per group, the steps' offsets as immediates
    std::size_t const code_off = static_cast<std::size_t>(c0) * 32;
    if constexpr (vec_scales) {
      QMEM_UNROLL
      for (int r = 0; r < Tiles; ++r)
        QMEM_UNROLL
      for (int h = 0; h < 2; ++h) {
        uint4 v;
        ldg(v, rows[r][h] + c0);
        s[0][r][h][0] = __uint_as_float(v.x);
        s[1][r][h][0] = __uint_as_float(v.y);
        s[2][r][h][0] = __uint_as_float(v.z);
        s[3][r][h][0] = __uint_as_float(v.w);
      }
    }
    QMEM_UNROLL
    for (int u = 0; u < U; ++u) {
      std::uint32_t const c = c0 + static_cast<std::uint32_t>(u * S);
      bool const in = Full || c < steps;
      // block of the step within its row (32-bit), then per row a 64-bit index
      std::uint32_t const cb = (c << (Block32 ? 1 : 0)) >> step_shift;
      QMEM_UNROLL
      for (int r = 0; r < Tiles; ++r)
        QMEM_UNROLL
      for (int h = 0; h < 2; ++h) {
        if constexpr (!Full)
          q[u][r][h] = make_uint2(0, 0);
        ldg_if<Full>(q[u][r][h], rowp[r][h] + code_off + u * S * 32, in);
        QMEM_UNROLL
        for (int e = 0; e < halves; ++e) {
          std::uint32_t const cbe = cb + static_cast<std::uint32_t>(e);
          if constexpr (!Full)
            s[u][r][h][e] = 0.0f;
          qs[u][r][h][e] = 0;
          if constexpr (vec_scales) {
            // loaded above
          } else if constexpr (Nested) {
            std::size_t const b = rowblk[r][h] + cbe;
            ldg_if<Full>(qs[u][r][h][e], rowq[r][h] + cbe, in);
            ldg_if<Full>(s[u][r][h][e], a.scales.absmax2 + nested_group_pow2(a.scales, b), in);
          } else {
            ldg_if<Full>(s[u][r][h][e], rows[r][h] + cbe, in);
          }
        }
      }
    }
    {
      // every load above feeds the first product (through a.zero): all are in flight together
      std::uint32_t dep = 0;
      QMEM_UNROLL
      for (int u = 0; u < U; ++u)
        QMEM_UNROLL
      for (int r = 0; r < Tiles; ++r)
        QMEM_UNROLL
      for (int h = 0; h < 2; ++h) {
        dep ^= q[u][r][h].x ^ q[u][r][h].y;
        QMEM_UNROLL
        for (int e = 0; e < halves; ++e) {
          dep ^= __float_as_uint(s[u][r][h][e]);
          if constexpr (Nested)
            dep ^= qs[u][r][h][e];
        }
      }
      q[0][0][0].x ^= dep & a.zero;
    }
    QMEM_UNROLL
    for (int u = 0; u < U; ++u) {
      std::uint32_t const c = c0 + static_cast<std::uint32_t>(u * Warps);
      // activations of batch row mt * 8 + g at this thread's 16 columns (words 2j, 2j + 1 go with
      // code bytes 2j, 2j + 1)
      std::uint32_t xf[MTiles][8];
      QMEM_UNROLL
      for (int mt = 0; mt < MTiles; ++mt) {
        unsigned const m = static_cast<unsigned>(mt * 8 + g);
        bool const in = (Full || c < steps) && m < a.m;
        uint4 const* p = reinterpret_cast<uint4 const*>(
            xrow[mt] + (in ? static_cast<std::size_t>(c0) * 64 + u * S * 64 : 0));
        uint4 v0 = make_uint4(0, 0, 0, 0), v1 = make_uint4(0, 0, 0, 0);
        ldg_pred(v0, p, in);
        ldg_pred(v1, p + 1, in);
        xf[mt][0] = v0.x, xf[mt][1] = v0.y, xf[mt][2] = v0.z, xf[mt][3] = v0.w;
        xf[mt][4] = v1.x, xf[mt][5] = v1.y, xf[mt][6] = v1.z, xf[mt][7] = v1.w;
      }
      QMEM_UNROLL
      for (int r = 0; r < Tiles; ++r) {
        // partial sums of this step: [half][mt][4] (one half unless Block32)
        float p[halves][MTiles][4];
        QMEM_UNROLL
        for (int j = 0; j < 4; ++j) {
          std::uint32_t const w0 = j < 2 ? q[u][r][0].x : q[u][r][0].y;
          std::uint32_t const w1 = j < 2 ? q[u][r][1].x : q[u][r][1].y;
          int const b = 2 * (j & 1);
          // A fragment: {row g, cols 2t..}, {row g + 8, ...}, {row g, cols 2t + 8..}, {row g + 8,
          // ...}
          std::uint32_t const frag[4] = {decode(w0, b), decode(w1, b), decode(w0, b + 1),
                                         decode(w1, b + 1)};
          QMEM_UNROLL
          for (int mt = 0; mt < MTiles; ++mt) {
            if constexpr (Block32) {
              // threads 0-1 of a group hold the step's first block, 2-3 its second: each half
              // product sees the other half's weights as zeros
              bool const first = t < 2;
              std::uint32_t const lo[4] = {first ? frag[0] : 0u, first ? frag[1] : 0u,
                                           first ? frag[2] : 0u, first ? frag[3] : 0u};
              std::uint32_t const hi[4] = {first ? 0u : frag[0], first ? 0u : frag[1],
                                           first ? 0u : frag[2], first ? 0u : frag[3]};
              if (j == 0) {
                mma_16816_zero<T>(p[0][mt], lo, xf[mt][0], xf[mt][1]);
                mma_16816_zero<T>(p[1][mt], hi, xf[mt][0], xf[mt][1]);
              } else {
                mma_16816<T>(p[0][mt], lo, xf[mt][2 * j], xf[mt][2 * j + 1]);
                mma_16816<T>(p[1][mt], hi, xf[mt][2 * j], xf[mt][2 * j + 1]);
              }
            } else {
              if (j == 0)
                mma_16816_zero<T>(p[0][mt], frag, xf[mt][0], xf[mt][1]);
              else
                mma_16816<T>(p[0][mt], frag, xf[mt][2 * j], xf[mt][2 * j + 1]);
            }
          }
        }
        // one scale per block and row: acc += scale * partial (c[0..1] row g, c[2..3] row g + 8);
        // a nested scale is decoded here, once per block and row
        QMEM_UNROLL
        for (int e = 0; e < halves; ++e) {
          float sc[2];
          QMEM_UNROLL
          for (int h = 0; h < 2; ++h) {
            if constexpr (Nested)
              sc[h] = fmath::add(fmath::mul(dyn[qs[u][r][h][e]], s[u][r][h][e]), a.scales.offset);
            else
              sc[h] = s[u][r][h][e];
          }
          QMEM_UNROLL
          for (int mt = 0; mt < MTiles; ++mt) {
            acc[r][mt][0] = fmaf(sc[0], p[e][mt][0], acc[r][mt][0]);
            acc[r][mt][1] = fmaf(sc[0], p[e][mt][1], acc[r][mt][1]);
            acc[r][mt][2] = fmaf(sc[1], p[e][mt][2], acc[r][mt][2]);
            acc[r][mt][3] = fmaf(sc[1], p[e][mt][3], acc[r][mt][3]);
          }
        }
      }
    }
  };

  using full_t = std::integral_constant<bool, true>;
  using tail_t = std::integral_constant<bool, false>;
  if constexpr (Contig) {
    // chunks of Unroll consecutive steps, dealt to the warps in turn; the one partial chunk (at
    // the end of the row) step by step
    auto c0 = static_cast<std::uint32_t>(warp * Unroll);
    for (; c0 + static_cast<std::uint32_t>(Unroll - 1) < steps;
         c0 += static_cast<std::uint32_t>(Unroll * Warps))
      group(c0, full_t{}, std::integral_constant<int, Unroll>{});
    for (std::uint32_t c = c0; c < steps && c < c0 + static_cast<std::uint32_t>(Unroll); ++c)
      group(c, tail_t{}, std::integral_constant<int, 1>{});
  } else {
    auto c0 = static_cast<std::uint32_t>(warp);
    for (; c0 + static_cast<std::uint32_t>((Unroll - 1) * Warps) < steps;
         c0 += static_cast<std::uint32_t>(Unroll * Warps))
      group(c0, full_t{}, std::integral_constant<int, Unroll>{});
    for (; c0 < steps; c0 += static_cast<std::uint32_t>(Warps))
      group(c0, tail_t{}, std::integral_constant<int, 1>{});
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
  // one output per thread and step, consecutive threads on consecutive rows (coalesced stores);
  // the warps' partial sums are added in warp order (deterministic)
  for (int i = static_cast<int>(threadIdx.x); i < 16 * Tiles * MTiles * 8; i += Warps * 32) {
    int const r = i % (16 * Tiles);
    int const m = i / (16 * Tiles);
    std::size_t const row =
        static_cast<std::size_t>(blockIdx.x) * 16 * Tiles + static_cast<std::size_t>(r);
    if (static_cast<unsigned>(m) < a.m && row < a.n) {
      float sum = 0.0f;
      QMEM_UNROLL
      for (int w = 0; w < Warps; ++w)
        sum += partial[w][r][m];
      a.y[static_cast<std::size_t>(m) * a.n + row] = from_float<T>(sum);
    }
  }
}

//! Batch 1: the tensor core's 8 batch columns would be 7/8 zeros, so they carry 8 column chunks
//! of the activation instead. A row of A (16 per warp) is a (weight row, 64-column chunk) pair:
//! rows g of the fragment are weight row 2p of the pair p at chunk g of the super-step, rows
//! g + 8 weight row 2p + 1 at the same chunk, and batch column n holds the activations of chunk
//! n, so D[g][g] and D[g + 8][g] are the two rows' dot products over chunk g (the other 112
//! entries are cross terms, never used). What this buys: a warp's load of a row's codes covers 8
//! consecutive chunks, 256 contiguous bytes (2 cache lines, against 8 lines for 8 rows), and its
//! scale load 8 consecutive scales: 4x fewer L1 wavefronts per weight, which bound the batch-16
//! layout at batch 1 (ncu on an H200, 2026-11-29: L1/TEX 66% busy, DRAM 28%, 25.7 us on
//! 8192 x 8192 with one 16-row tile per warp). Needs block size >= 64 (one scale per chunk and
//! row). Result: 17.4 us on 8192 x 8192 ({8, 1, 4}); ncu of {8, 2, 2} (19 us): DRAM 36%, L1/TEX
//! 51%, SM 39%, 25% occupancy (127 registers, 2 blocks per SM), 8.4 cycles between a warp's
//! instructions: latency-bound, with about 2.7 instructions per weight (ptxas: one PRMT, one LDS
//! and one address add per two weights, the rest loads, tensor-core products and scaling).
//! The shape comes as scalars (`Pipelined`, `DirectLut`, `MinBlocks`: gemv1_shape's fields; nvcc's
//! host-side launch wrappers do not take a class-type template argument).
template <class Code, class T, bool Nested, int Warps, int Unroll, int Pairs, bool Pipelined,
          bool DirectLut, int MinBlocks, bool Block64>
__global__ void __launch_bounds__(Warps * 32, MinBlocks)
    gemv1_4bit_kernel(gemv_args<T> a, code_table<16> values, code_table<256> nested,
                      unsigned tiles) {
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  extern __shared__ __align__(16) std::uint32_t gemv_lut[]; // the same memory, read by decode
  constexpr int Rows = 2 * Pairs;                           // weight rows per block (and per warp)
  // [0, 64 KiB): decode table; then partial sums [Warps][Rows][8]; the nested map; the 16 values
  auto* const partial = reinterpret_cast<float(*)[Rows][8]>(gemv_smem + gemv_lut_bytes);
  float* const dyn = reinterpret_cast<float*>(gemv_smem + gemv_lut_bytes) + Warps * Rows * 8;

  int const warp = static_cast<int>(threadIdx.x >> 5);
  int const lane = static_cast<int>(threadIdx.x & 31);
  int const g = lane >> 2; // fragment row group = this thread's chunk
  int const t = lane & 3;  // thread in group
  auto const steps = static_cast<std::uint32_t>(a.k >> 6);
  std::uint32_t const supers = (steps + 7) / 8;
  unsigned const step_shift = Block64 ? 0u : a.block_shift - 6u;

  // the decode table and the nested map
  auto* const lut = reinterpret_cast<std::uint32_t*>(gemv_smem);
  fill_gemv_tables<T, Nested>(lut, dyn, values, nested);
  std::uint32_t const lane_bytes = static_cast<std::uint32_t>(lane) * 4u;
  // direct_lut: the shared address of the table with the lane's bytes in its low byte; a byte
  // permute puts the code byte in byte 1 and keeps bytes 2-3, giving the entry's address whole
  auto const lut_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(gemv_smem));
  std::uint32_t const lane_addr = lut_base | lane_bytes;
  // this thread's activations: chunk g of each super-step, its 16 columns
  T const* const xp = a.x + static_cast<std::size_t>(g) * 64 + 16 * static_cast<std::size_t>(t);

  auto body = [&](auto direct_c) {
    constexpr bool Direct = decltype(direct_c)::value;
    auto decode = [&](std::uint32_t word, int byte) -> std::uint32_t {
      if constexpr (Direct) {
        std::uint32_t const addr =
            __byte_perm(word, lane_addr, 0x7604u | (static_cast<unsigned>(byte) << 4));
        std::uint32_t v;
        asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
        return v;
      } else {
        std::uint32_t const off =
            __byte_perm(word, lane_bytes, 0x5504u | (static_cast<unsigned>(byte) << 4));
        return *reinterpret_cast<std::uint32_t const*>(
            reinterpret_cast<unsigned char const*>(gemv_lut) + off);
      }
    };
    for (unsigned tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      std::size_t const row0 = static_cast<std::size_t>(tile) * Rows;
      std::uint8_t const* rowp[Pairs][2];
      float const* rows[Pairs][2];
      std::uint8_t const* rowq[Pairs][2];
      std::size_t rowblk[Pairs][2];
      QMEM_UNROLL
      for (int p = 0; p < Pairs; ++p)
        QMEM_UNROLL
      for (int h = 0; h < 2; ++h) {
        std::size_t row = row0 + static_cast<std::size_t>(2 * p + h);
        row = row < a.n ? row : a.n - 1;
        rowp[p][h] = a.codes + row * (a.k / 2) + 32 * static_cast<std::size_t>(g) +
                     8 * static_cast<std::size_t>(t);
        rowblk[p][h] = (row * a.k) >> a.block_shift;
        rows[p][h] = Nested ? nullptr : a.scales.absmax + rowblk[p][h];
        rowq[p][h] = Nested ? a.scales.qabsmax + rowblk[p][h] : nullptr;
      }
      float acc[Pairs][4];
      QMEM_UNROLL
      for (int p = 0; p < Pairs; ++p)
        acc[p][0] = acc[p][1] = acc[p][2] = acc[p][3] = 0.0f;

      // the loads of the step group starting at super-step sc0 into st
      auto load = [&](auto& st, std::uint32_t sc0, auto full) {
        constexpr bool Full = decltype(full)::value;
        constexpr int U = std::remove_cvref_t<decltype(st)>::unroll;
        auto& q = st.q;
        auto& s = st.s;
        auto& qs = st.qs;
        auto& xv = st.xv;
        QMEM_UNROLL
        for (int u = 0; u < U; ++u) {
          std::uint32_t const c = (sc0 + static_cast<std::uint32_t>(u * Warps)) * 8 +
                                  static_cast<std::uint32_t>(g); // this thread's step
          bool const in = Full || c < steps;
          std::uint32_t const cb = c >> step_shift;
          std::size_t const code_off = static_cast<std::size_t>(sc0) * 256 + u * Warps * 256;
          QMEM_UNROLL
          for (int p = 0; p < Pairs; ++p)
            QMEM_UNROLL
          for (int h = 0; h < 2; ++h) {
            if constexpr (!Full) {
              q[u][p][h] = make_uint2(0, 0);
              s[u][p][h] = 0.0f;
            }
            qs[u][p][h] = 0;
            ldg_if<Full>(q[u][p][h], rowp[p][h] + code_off, in);
            if constexpr (Nested) {
              ldg_if<Full>(qs[u][p][h], rowq[p][h] + cb, in);
              ldg_if<Full>(s[u][p][h],
                           a.scales.absmax2 + nested_group_pow2(a.scales, rowblk[p][h] + cb), in);
            } else {
              ldg_if<Full>(s[u][p][h], rows[p][h] + cb, in);
            }
          }
          std::size_t const x_off = static_cast<std::size_t>(sc0) * 512 + u * Warps * 512;
          if constexpr (!Full)
            xv[u][0] = xv[u][1] = make_uint4(0, 0, 0, 0);
          ldg_if<Full>(xv[u][0], xp + x_off, in);
          ldg_if<Full>(xv[u][1], xp + x_off + 8, in);
        }
      };
      // every load of st feeds the first product (through a.zero): all are in flight together
      auto pin = [&](auto& st) {
        constexpr int U = std::remove_cvref_t<decltype(st)>::unroll;
        auto& q = st.q;
        auto& s = st.s;
        auto& qs = st.qs;
        auto& xv = st.xv;
        {
          std::uint32_t dep = 0;
          QMEM_UNROLL
          for (int u = 0; u < U; ++u) {
            QMEM_UNROLL
            for (int p = 0; p < Pairs; ++p)
              QMEM_UNROLL
            for (int h = 0; h < 2; ++h) {
              dep ^= q[u][p][h].x ^ q[u][p][h].y ^ __float_as_uint(s[u][p][h]);
              if constexpr (Nested)
                dep ^= qs[u][p][h];
            }
            dep ^= xv[u][0].x ^ xv[u][1].x;
          }
          q[0][0][0].x ^= dep & a.zero;
        }
      };
      // the products of st, scaled into acc
      auto compute = [&](auto const& st) {
        constexpr int U = std::remove_cvref_t<decltype(st)>::unroll;
        auto const& q = st.q;
        auto const& s = st.s;
        auto const& qs = st.qs;
        auto const& xv = st.xv;
        // the products: for each k-step, every (super-step, pair) product is independent, so the
        // tensor-core chains of one step group interleave
        float d[U][Pairs][4];
        QMEM_UNROLL
        for (int j = 0; j < 4; ++j)
          QMEM_UNROLL
        for (int u = 0; u < U; ++u) {
          // activation words 2j, 2j + 1 go with code bytes 2j, 2j + 1 (the 8 words of xv[u] in
          // order)
          std::uint32_t const b0 = j < 2 ? (&xv[u][0].x)[2 * j] : (&xv[u][1].x)[2 * j - 4];
          std::uint32_t const b1 = j < 2 ? (&xv[u][0].x)[2 * j + 1] : (&xv[u][1].x)[2 * j - 3];
          QMEM_UNROLL
          for (int p = 0; p < Pairs; ++p) {
            std::uint32_t const w0 = j < 2 ? q[u][p][0].x : q[u][p][0].y;
            std::uint32_t const w1 = j < 2 ? q[u][p][1].x : q[u][p][1].y;
            int const b = 2 * (j & 1);
            std::uint32_t const frag[4] = {decode(w0, b), decode(w1, b), decode(w0, b + 1),
                                           decode(w1, b + 1)};
            if (j == 0)
              mma_16816_zero<T>(d[u][p], frag, b0, b1);
            else
              mma_16816<T>(d[u][p], frag, b0, b1);
          }
        }
        // one scale per block and row: only D[g][g] (element g & 1) and D[g + 8][g] (element
        // 2 + (g & 1)) of thread t = g / 2 are kept in the end; the others accumulate cross terms
        QMEM_UNROLL
        for (int u = 0; u < U; ++u)
          QMEM_UNROLL
        for (int p = 0; p < Pairs; ++p) {
          float sc[2];
          QMEM_UNROLL
          for (int h = 0; h < 2; ++h) {
            if constexpr (Nested)
              sc[h] = fmath::add(fmath::mul(dyn[qs[u][p][h]], s[u][p][h]), a.scales.offset);
            else
              sc[h] = s[u][p][h];
          }
          acc[p][0] = fmaf(sc[0], d[u][p][0], acc[p][0]);
          acc[p][1] = fmaf(sc[0], d[u][p][1], acc[p][1]);
          acc[p][2] = fmaf(sc[1], d[u][p][2], acc[p][2]);
          acc[p][3] = fmaf(sc[1], d[u][p][3], acc[p][3]);
        }
      };

      using full_t = std::integral_constant<bool, true>;
      using tail_t = std::integral_constant<bool, false>;
      auto sc0 = static_cast<std::uint32_t>(warp);
      constexpr auto stride = static_cast<std::uint32_t>(Unroll * Warps);
      // a full group: every step of every super-step exists
      auto full_at = [&](std::uint32_t c) {
        return (c + static_cast<std::uint32_t>((Unroll - 1) * Warps)) * 8 + 7 < steps;
      };
      if constexpr (Pipelined) {
        // two groups of registers, used in turn: the next group's loads (asm volatile, kept in
        // order) are issued before the current group's products
        if (full_at(sc0)) {
          gemv1_stage<Unroll, Pairs> st0, st1;
          load(st0, sc0, full_t{});
          for (;;) {
            if (!full_at(sc0 + stride)) {
              compute(st0);
              sc0 += stride;
              break;
            }
            load(st1, sc0 + stride, full_t{});
            compute(st0);
            sc0 += stride;
            if (!full_at(sc0 + stride)) {
              compute(st1);
              sc0 += stride;
              break;
            }
            load(st0, sc0 + stride, full_t{});
            compute(st1);
            sc0 += stride;
          }
        }
      } else {
        for (; full_at(sc0); sc0 += stride) {
          gemv1_stage<Unroll, Pairs> st;
          load(st, sc0, full_t{});
          pin(st);
          compute(st);
        }
      }
      for (; sc0 < supers; sc0 += static_cast<std::uint32_t>(Warps)) {
        gemv1_stage<1, Pairs> st;
        load(st, sc0, tail_t{});
        pin(st);
        compute(st);
      }

      // the kept entries, then the chunks and warps added in a fixed order
      if (t == (g >> 1)) {
        QMEM_UNROLL
        for (int p = 0; p < Pairs; ++p) {
          partial[warp][2 * p][g] = (g & 1) != 0 ? acc[p][1] : acc[p][0];
          partial[warp][2 * p + 1][g] = (g & 1) != 0 ? acc[p][3] : acc[p][2];
        }
      }
      __syncthreads();
      if (threadIdx.x < static_cast<unsigned>(Rows)) {
        std::size_t const row = row0 + threadIdx.x;
        float sum = 0.0f;
        for (int w = 0; w < Warps; ++w)
          QMEM_UNROLL
        for (int c = 0; c < 8; ++c)
          sum += partial[w][threadIdx.x][c];
        if (row < a.n)
          a.y[row] = from_float<T>(sum);
      }
      __syncthreads();
    }
  };
  if constexpr (DirectLut) {
    if ((lut_base & 0xFFFFu) == 0) {
      body(std::true_type{});
      return;
    }
  }
  body(std::false_type{});
}

//! Dynamic shared memory of gemv1_4bit_kernel.
template <bool Nested, int Warps, int Pairs>
constexpr unsigned gemv1_smem_bytes() {
  return gemv_lut_bytes + Warps * 2 * Pairs * 8 * 4 + (Nested ? 256 * 4 : 0) + 16 * 4;
}

//! Dynamic shared memory of gemv_4bit_kernel.
template <bool Nested, int Warps, int Tiles>
constexpr unsigned gemv_smem_bytes() {
  return gemv_lut_bytes + Warps * 16 * Tiles * 17 * 4 + (Nested ? 256 * 4 : 0) + 16 * 4;
}

// ------------------------------------------------------------------------------------------------
// Streaming batch-1 GEMV (gemv1_stream_kernel)
//
// What bounded gemv1_4bit_kernel was latency, not bandwidth (ncu, 8192 x 8192: DRAM 36%, 25%
// occupancy; a warp loaded a step group, waited, then computed with nothing in flight). Little's
// law sizes the fix: at 4.3 TB/s and about 1 us of loaded DRAM latency the chip needs about 4 MB of
// codes in flight, 32 KB per SM. This kernel keeps twice that in flight with one block of up to 16
// warps per SM whose warps never stop streaming:
// - a warp owns a fixed slice of the columns (J super-steps of 512) for all the rows of its tile,
//   so its activations are loaded once into registers and never again (gemv1_4bit_kernel re-read
//   x through L1 for every row tile: 1.5 bytes of x per byte of codes);
// - the warp walks its row pairs with a ring of `Depth / J` pairs of loads in flight: the loads of
//   pair i + ring are issued right after the products of pair i (16 warps x 32 lanes x 8 x 16 B =
//   64 KB per SM with Depth 8), with no branch in the steady state;
// - the decode table is the same 64 KiB conflict-free pair table, one per SM, placed at a 64 KiB
//   aligned shared address (sm_90 starts dynamic shared memory at 0x400 of the block's window, so
//   the table sits 0xFC00 into it and the partial sums use the space before it): the byte
//   permute yields a table entry's address whole, one PRMT and one LDS per two weights;
// - each warp's kept entries (D[g][g], D[g + 8][g], scaled) go to shared memory, one 8-byte store
//   per pair; the block adds them per row in a fixed order after its tile (deterministic).
// It computes the function of the other GEMV kernels (docs/matmul.md): T-rounded table values
// times activations summed in fp32 per 64-column chunk on the tensor cores, the block scale
// applied once to that sum, the chunk sums added in fp32.

//! Asks L2 for the 128-byte lines of [p, p + bytes), the block's threads in turn (no data comes
//! back to the SM; a prefetch never faults).
__device__ QMEM_INLINE void prefetch_l2_range(void const* p, std::size_t bytes) {
  auto const* c = static_cast<unsigned char const*>(p);
  for (std::size_t o = std::size_t{threadIdx.x} * 128; o < bytes;
       o += std::size_t{blockDim.x} * 128)
    asm volatile("prefetch.global.L2 [%0];" ::"l"(c + o));
}

//! base + row * stride as one wide multiply-add (IMAD.WIDE.U32): written in C++, the 64-bit product
//! of two 32-bit values compiled (nvcc 13, sm_90) to the wide product plus an add of a zero high
//! word, or re-associated with the base's parts (three to four instructions per address).
__device__ QMEM_INLINE void const* row_address(void const* base, std::uint32_t row,
                                               std::uint32_t stride) {
  std::uint64_t r;
  asm("mad.wide.u32 %0, %1, %2, %3;" : "=l"(r) : "r"(row), "r"(stride), "l"(base));
  return reinterpret_cast<void const*>(r);
}

//! Launch plan of gemv1_stream_kernel (host-computed, a launch argument).
struct gemv1_stream_plan {
  unsigned col_groups; //!< C: warps splitting a row's super-steps, J each
  unsigned row_groups; //!< G: groups of C warps splitting a tile's row pairs
  unsigned pairs;      //!< row pairs of the weight, ceil(n / 2)
  unsigned tile_pairs; //!< row pairs a block reduces at once (its shared partial sums)
  unsigned tiles;      //!< ceil(pairs / tile_pairs); blocks loop over them
  unsigned smem;       //!< dynamic shared memory of the launch, bytes
};

//! Block shape of gemv1_stream_kernel: at most `warps` warps per block (one block per SM) and
//! `depth` super-steps of loads in flight per warp (depth / J row pairs).
struct gemv1_stream_shape {
  int warps;          //!< upper bound on C * G
  int depth;          //!< row pairs of loads in flight per warp at one super-step per warp
  bool async = false; //!< loads through a per-thread cp.async ring (plain scales only)
  //! Register ring in two groups of depth / J pairs: a group's loads are issued only after every
  //! register of the other group has been touched (a dependency through a zero the compiler cannot
  //! see), so that the one scoreboard ptxas gives the loads holds one group: the warp computes a
  //! group while the next one is in flight.
  bool grouped = false;
  //! Launched with programmatic dependent launch: the block builds its table while the previous
  //! kernel of the stream drains, then waits for it (griddepcontrol.wait) before any global load,
  //! and lets the next kernel launch at once (griddepcontrol.launch_dependents).
  bool pdl = false;
  //! With `pdl`: before waiting for the previous kernel, the block asks L2 for the first
  //! `prefetch_kib` KiB of its first tile's codes and the matching scales (prefetch.global.L2),
  //! so the first loads after the wait find them there instead of paying the DRAM latency while
  //! the chip is idle. Only the weight is prefetched: it is what the previous kernel does not
  //! write in a model's forward; and a line the previous kernel does write is still read correctly
  //! (L2 is where writes land; nothing reaches L1 before the wait).
  int prefetch_kib = 0;
  //! Code loads bypass L1 (`ld.global.nc.L1::no_allocate`; register rings only): what won 7% for
  //! the batch-16 kernel's steps-outer shape (matmul round 8), not yet timed here.
  bool stream_codes = false;
  //! Lean addressing (plain scales, register rings): each code and scale address is one wide
  //! multiply-add of its row from per-thread bases, the steady loop's pairs skip the clamp of the
  //! last row, and a group's loads wait on one register per slot of the other group, not all.
  //! The same loads and the same fused multiply-adds: the same bits.
  bool lean = false;
  //! The least super-steps per warp (1, 2 or 4; the plan may take more): a warp's address
  //! arithmetic, scale handling and partial-sum store are per pair, shared by its J super-steps.
  int min_j = 1;
  //! Lean addressing for blocks of 64 only (the launcher declines other block sizes): a chunk is
  //! a block, so the scales of a pair row's J super-steps are 8 floats apart and all their loads
  //! take one address (the first super-step's row address plus immediate offsets) instead of one
  //! wide multiply-add and one base register per super-step. The same loads: the same bits.
  bool block64 = false;
  //! With block64 and plain scales: the scales spread over a row group's lanes as nested ones
  //! always are (each lane loads J / 2 of a pair's 2 J scales and the group's keeper takes them,
  //! at J = 2 through the warp's scale exchange in shared memory) instead of every lane loading
  //! all 2 J. The same scales and fused multiply-adds: the same bits.
  bool spread = false;
};

//! Shapes of gemv1_stream_kernel the bench's gemv_variant compares (variants 19 to 25): register
//! rings of 8, 4 and 12 pairs at 16 warps (ptxas -v, sm_90, plain J = 1: 118 / 104 / 127
//! registers, no spills) and of 4 at 32 warps (64 registers); async rings (cp.async into shared
//! memory, waited one commit group at a time) of 5 and 3 pairs at 16 warps and 2 at 32.
//! Why the async ring was tried: the SASS of the register ring (nvcc 13, sm_90) puts every load on
//! one scoreboard (W5) and sinks them to the end of the unrolled loop, so a warp issues its ring,
//! waits for all of it (wait mask 100000), then computes it; cp.async.wait_group counts groups.
//! H200, 2026-11-29 16:05 UTC, 200 calls in one CUDA graph, NF4 block 64, plain scales, us on
//! 4096 x 4096 / 14336 x 4096 / 4096 x 14336 / 8192 x 8192 / 28672 x 8192 (same-run copy 4244
//! GB/s; gemv1_4bit_kernel {8, 1, 4}, variant 9: 7.96 / 20.26 / 14.80 / 18.19 / 59.23):
//!   19 {16, 8}        6.36 / 12.51 / 12.13 / 13.49 / 42.95
//!   20 {16, 4}        6.44 / 11.85 / 11.97 / 13.20 / 43.40   (dispatched)
//!   21 {16, 12}       6.74 / 12.60 / 12.81 / 13.95 / 42.57
//!   22 {32, 4}        6.61 / 11.85 / 12.32 / 13.13 / 52.07
//!   23 {16, 5, async} 8.10 / 16.08 / 15.80 / 18.21 / 49.26
//!   24 {16, 3, async} 7.86 / 15.79 / 16.30 / 17.90 / 56.39
//!   25 {32, 2, async} 8.87 / 17.10 / 17.55 / 19.32 / 55.57
//! The async rings lose: their 8- and 4-byte cp.async per lane and pair go through L1 (ncu,
//! 8192 x 8192: L1/TEX 71% against 55% for the register ring, DRAM 43% against 46%).
//! Not yet timed (written after that run): 26 {16, 4, grouped} and 27 {16, 6, grouped}, the
//! register ring in two groups (SASS, nvcc 13, sm_90, plain J = 1: the next group's loads are
//! issued after the current group's registers are touched, among its products, on other
//! scoreboards than the loads being waited for; 2.0 instructions per weight in the unguarded loop
//! against 1.94 for the ring; 104 / 124 registers, no spills). To be timed against 20 in the next
//! H200 run. Also not yet timed: 28 {16, 4, pdl}, the dispatched shape launched with
//! programmatic dependent launch (the table built while the previous call drains).
//! Round 5 (bench variants 40 and 41, after the small-batch shapes): {16, 4, grouped, pdl} and
//! {16, 8, pdl}. Round 8 (variant 42): 40 with stream_codes. 2026-11-30 (gemv round): variants
//! 43 (40 + lean), 44 (40 + min_j 2), 45 (40 + lean + min_j 2: dispatched), 46 (lean, min_j 4;
//! ptxas -v, sm_90: 128 registers, 32 bytes spilled) and 47 ({16, 6}, lean, min_j 2: 3 pairs per
//! group, 128 registers). SASS of the unguarded loop (nvcc 13, sm_90, plain, full slices),
//! instructions per row pair and super-step: 40 64.6 at J = 1 and 58.8 at J = 2; lean 64.5 and
//! 57.2 (ptxas splits the wide multiply-adds at J = 1); lean J = 4 53.9; the decode's 32 (16 PRMT
//! and 16 LDS) and 4 HMMA are in all of them.
inline constexpr gemv1_stream_shape gemv_batch1_stream_candidates[] = {
    {16, 8},
    {16, 4},
    {16, 12},
    {32, 4},
    {16, 5, true},
    {16, 3, true},
    {32, 2, true},
    {16, 4, false, true},
    {16, 6, false, true},
    {16, 4, false, false, true},
    {16, 4, false, false, true, 32},
    {16, 4, false, false, true, 128},
    {16, 4, false, true, true},
    {16, 8, false, false, true},
    {16, 4, false, true, true, 0, true},
    {16, 4, false, true, true, 0, false, true},
    {16, 4, false, true, true, 0, false, false, 2},
    {16, 4, false, true, true, 0, false, true, 2},
    {16, 4, false, true, true, 0, false, true, 4},
    {16, 6, false, true, true, 0, false, true, 2},
    // 48-50: the dispatched shape (45) again, where gemv round 2's removed candidates were (the
    // same kernel: an A/A control for gemv_ab, and variant numbers keep one meaning)
    {16, 4, false, true, true, 0, false, true, 2},
    {16, 4, false, true, true, 0, false, true, 2},
    {16, 4, false, true, true, 0, false, true, 2},
    // 51-53: the dispatched shape (45) again, where gemv17's block-level L2 prefetch was (4, 8
    // and 64 pairs ahead: 2.6-34% slower on every anchor shape; removed, docs/benchmarks.md)
    {16, 4, false, true, true, 0, false, true, 2},
    {16, 4, false, true, true, 0, false, true, 2},
    {16, 4, false, true, true, 0, false, true, 2},
    // 54, 55 (gemv17): 45 and lean J >= 4 (46) with block64 (one scale address per pair row)
    {16, 4, false, true, true, 0, false, true, 2, true},
    {16, 4, false, true, true, 0, false, true, 4, true},
    // 56: 54 with plain scales spread over a row group's lanes (gemv_batch1_stream_b64); 57, 55
    // with them, tied 55 (H200 2026-12-01 07:25 UTC: -1.3 / +0.4 / -0.7 / -3.2 / +0.2% on the
    // five shapes; removed)
    {16, 4, false, true, true, 0, false, true, 2, true, true}};
//! The streaming shape batch 1 runs with plain scales (blocks >= 64, k <= 32768; warps 0:
//! gemv1_4bit_kernel instead): the best of the candidates above on the five shapes. First {16, 4}
//! (sum 86.9 us against 87.4 for {16, 8}); then the lead's integrated H200 run of 2026-11-29
//! 16:49 UTC (same order of shapes, us per call, 200 calls in one graph, copy 4105 GB/s):
//!   20 {16, 4}              6.50 / 11.84 / 11.88 / 13.16 / 39.84   (sum 83.2)
//!   26 {16, 4, grouped}     6.17 / 11.47 / 11.91 / 12.75 / 37.71   (sum 80.0)
//!   27 {16, 6, grouped}     6.54 / 11.89 / 12.24 / 12.99 / 40.58   (sum 84.2)
//!   28 {16, 4, pdl}         5.31 / 10.97 / 10.85 / 12.56 / 38.48   (sum 78.2, dispatched)
//! 28 beats 20 on every shape; programmatic dependent launch lets a call build its decode table
//! while the previous kernel drains. 29 and 30 (28 asking L2 for the first 32 / 128 KiB of the
//! block's codes before the wait), H200 2026-11-29 19:10 UTC, same run as 28's 5.32 / 11.03 /
//! 10.90 / 12.59 / 41.11: 5.70 / 11.23 / 11.12 / 12.78 / 39.71 and 5.72 / 11.27 / 11.28 / 12.94 /
//! 39.18: slower except on the largest weight; 28 stays.
//! Matmul round 5 (H200, 2026-11-29, same order): run of 21:54 UTC (copy 4226 GB/s), 40 {16, 4,
//! grouped, pdl} 5.30 / 10.44 / 10.86 / 11.86 / 37.29 against 28's 5.43 / 10.84 / 10.75 / 12.41
//! / 39.90; run of 22:18 UTC (copy 4220 GB/s), 5.28 / 10.40 / 10.79 / 11.85 / 42.54 against 5.35
//! / 10.93 / 10.72 / 12.41 / 40.24, and through matmul_4bit (dispatched) 5.27 / 10.42 / 10.82 /
//! 11.89 / 37.63: the two changes that won alone, together; faster on three shapes in both runs,
//! +0.6% on 4096 x 14336 (two super-steps per warp), on 28672 x 8192 faster in two of three
//! timings (37.29, 37.63; 42.54 once); dispatched. 41 {16, 8, pdl}: 5.52 / 11.24 / 10.78 / 12.18
//! / 41.19 (21:54).
//! Matmul round 6, tried and removed: the warps of 40 also asking L2 (prefetch.global.L2, one
//! lane per 128-byte line of both rows' code slices and scales) for the pairs 8, 16 or 32 pairs
//! after their register ring, so that DRAM works on more bytes than the registers hold. H200,
//! 2026-11-30 01:07 UTC (copy 4202 GB/s), same order: 40 5.25 / 10.50 / 10.87 / 11.96 / 37.35,
//! with 16 pairs asked ahead 5.36 / 11.22 / 11.96 / 12.67 / 55.74; 8 and 32 pairs and the
//! ungrouped ring (28) with 16 lost the same way (8 least: +1 to +8%). ncu on 28672 x 8192: 59.0
//! us against 42.9, DRAM 71.8% busy against 65.3%: 1.5 times the DRAM bytes (prefetched lines
//! gone from L2 before their loads came), 12.4 cycles between a warp's issues against 9.2.
//! Gemv round (2026-11-30, H200, 10:21 UTC, copy 4213-4236 GB/s, three bench processes, median,
//! us per call): 40 4.78 / 10.00 / 10.33 / 11.39 / 36.66; 43 (lean) 4.65 / 9.71 / 9.88 / 11.09 /
//! 38.39; 44 (min_j 2) 4.41 / 9.47 / 10.34 / 10.63 / 39.45; 45 (lean + min_j 2) 4.38 / 9.03 /
//! 9.87 / 10.17 / 36.62: two super-steps per warp share a pair's addresses, scale handling and
//! store (J = 2 on every shape: 1 to 4 row groups), and the lean addresses cut the rest; 45 is
//! dispatched (-8 / -10 / -4 / -11% on the first four; on 28672 x 8192, J = 2 already, the same
//! kernel timed 36.62 to 38.97 in different rows of one process: no difference resolved there).
//! Run of 10:42 UTC (commit 7806d52, copy 4230-4240 GB/s): 45 through matmul_4bit 4.36 / 8.97 /
//! 9.83 / 10.11 / 37.15 against 40's 4.82 / 10.00 / 10.32 / 11.40 / 37.67; 46 (lean, J >= 4) 4.54
//! / 9.46 / 9.88 / 10.54 / 41.00 and 47 ({16, 6}, 3 pairs per group) 4.70 / 9.51 / 10.25 / 10.61
//! / 40.02: slower.
//! Gemv round 2 (2026-11-30, H200 13:39 UTC, commit a3603b0, copy 4185-4204 GB/s; bench gemv_ab:
//! one weight per shape kept for the whole process, 3 alternating rounds x 3 processes, medians):
//! 45 4.51 / 9.06 / 9.85 / 10.17 / 35.85. Tried and removed (gemv round 3, docs/benchmarks.md):
//! 48, balanced slices (all 16 warps share a tile's (column group, row pair) units where the 14
//! column groups of 4096 x 14336 leave 2 idle), 10.08 there: +2.3%; 49 (45 + code loads that skip
//! L1) 4.41 / 9.04 / 9.85 / 10.15 / 37.71, and on 28672 x 8192 34.05-37.71 over three weights
//! kept side by side against 45's 35.85-36.76: no consistent gain; 50 (45 asking L2 for its first
//! 128 KiB before the wait) 4.73 / 9.54 / 10.44 / 10.70 / 37.98: 5-6% slower everywhere.
inline constexpr gemv1_stream_shape gemv_batch1_stream = gemv_batch1_stream_candidates[17];
//! Batch 1 on rows of `gemv_batch1_long_k` columns or more with plain scales in blocks of 64
//! (launch_gemv; other weights take gemv_batch1_stream): variant 55, lean J >= 4 with block64
//! (the J >= 4 of 46 without its 32 spilled bytes; ptxas 13.0, sm_90a: 128 registers, no spills;
//! SASS of the steady loop 50.9 instructions per pair and super-step against 57.2 for 45). H200,
//! 2026-11-30 19:47 UTC (gemv17 run 2), bench gemv_ab, one kept weight per shape, 3 rounds x 3
//! processes, variant order rotated per round, medians (us): 4096 x 14336 9.41 against 45's 9.82
//! (-4.1%, faster in 9 of 9 pairs: 9.38-9.48 against 9.80-9.89), 8192 x 8192 9.93 against 10.11
//! (-1.7%, 9 of 9), 28672 x 8192 36.85 against 37.90 (-2.8%, 8 of 9); on the k = 4096 shapes it
//! is not faster (4096^2 4.54 against 4.42, 14336 x 4096 9.05 against 8.98: J = 4 leaves two
//! column groups of 8 row groups, 2 and 7 pairs per warp), hence the bound. 54 (45 with block64
//! at J = 2, 55.2 instructions) tied 45 everywhere.
inline constexpr gemv1_stream_shape gemv_batch1_stream_long_k = gemv_batch1_stream_candidates[27];
//! The least row length (k) that takes gemv_batch1_stream_long_k (see there: faster at k = 8192
//! and 14336, not at 4096).
inline constexpr std::size_t gemv_batch1_long_k = 8192;
//! The same with nested scales: {16, 4, pdl} (variant 28). H200, 2026-11-29 22:18 UTC, bench
//! gemv_variant_dq, us on the five shapes: 28 6.00 / 11.74 / 12.12 / 13.30 / 43.05 against
//! {16, 8} (19, dispatched before) 7.43 / 13.74 / 13.22 / 14.71 / 42.90, 40 {16, 4, grouped, pdl}
//! 6.01 / 11.86 / 12.47 / 13.35 / 43.48, 41 {16, 8, pdl} 6.26 / 12.21 / 12.24 / 13.38 / 41.57.
//! (Earlier, {16, 8} 7.13 / 13.71 / 13.26 / 14.69 / 43.56; gemv1_4bit_kernel {8, 2, 2} 10.26 /
//! 26.27 / 18.67 / 23.01 / 74.21.)
inline constexpr gemv1_stream_shape gemv_batch1_stream_nested = gemv_batch1_stream_candidates[9];
//! Batch 1 on rows of fewer than gemv_batch1_long_k columns in blocks of 64 (plain scales, or
//! nested ones with a power-of-two nested block; the launcher declines the others, which take
//! gemv_batch1_stream or gemv_batch1_stream_nested): variant 56, lean J >= 2 with block64 and the
//! scales spread over the lanes of a row group (each lane loads, and nested computes, J / 2 of a
//! pair's 2 J scales; at J = 2 the group's keeper reads them from the warp's scale exchange in
//! shared memory, at J = 4 it takes them by shuffles). Bit for bit 45 (plain) and 54 (nested;
//! tested).
//! Nested: H200, 2026-12-01 04:21 UTC, bench gemv_ab_dq (kept nested weights, 3 rotated rounds,
//! medians, us on the five shapes): 28 5.35 / 11.17 / 11.40 / 12.80 / 39.09, 54 (the spread
//! scales fetched by 2 J shuffles then) 4.83 / 9.50 / 10.37 / 10.75 / 35.99, 55 4.87 / 9.67 /
//! 10.17 / 10.67 / 34.29: 54 below 8192 columns, 55 from there. The exchange in place of the
//! shuffles (07:25 UTC, two processes against the former binary, medians of 6): 54 -0.2 / -0.9 /
//! -1.3 / -1.3 / -2.5% (and -1.5 / +3.5% on 5120 x 13824 / 4096 x 11008); at J = 4 (55) it ran
//! +1.0 / +1.1 / +0.9 / +1.0 / -0.2% against the shuffles (+1.5% on 4096 x 14336 in a second
//! run), with 2% more instructions and 12 spilled bytes, so J = 4 keeps them.
//! Plain (the same run, gemv_ab): 56 4.32 / 8.74 / 9.55 / 9.79 / 38.43 us against 45's 4.41 /
//! 8.97 / 9.82 / 10.05 / 37.31 and 54's 4.33 / 8.98 / 9.80 / 10.04 / 39.57: -2.1% on 4096^2 and
//! -2.5% on 14336 x 4096, the rows it now takes (55 stays on the longer ones: 9.39 / 9.86 / 37.72).
inline constexpr gemv1_stream_shape gemv_batch1_stream_b64 = gemv_batch1_stream_candidates[28];

//! The loads of one row pair (both rows, the warp's J super-steps).
template <int J, bool Nested, bool Spread = false>
struct gemv1_stream_stage {
  uint2 q[J][2];                       //!< 16 codes of each row and super-step
  float s[J][2];                       //!< plain scale, or the nested group's absmax2
  std::uint32_t qs[Nested ? J : 1][2]; //!< nested: the block's 8-bit scale code
};

//! Spread scales (block64; nested always, plain with the shape's `spread`): a pair's 2 J (row,
//! super-step) scales are loaded (and, nested, computed) once per group of four lanes, not by
//! each lane; lane t takes combination t + 4 i (i < mine) of h * J + j (J = 1: h = t & 1) and
//! the group's keeper fetches them (J = 2: through the warp's exchange; J = 1, 4: by shuffles).
template <int J, bool Nested>
struct gemv1_stream_stage<J, Nested, true> {
  uint2 q[J][2];                                       //!< 16 codes of each row and super-step
  float s[J >= 2 ? J / 2 : 1];                         //!< plain scale, or nested: the absmax2
  std::uint32_t qs[Nested ? (J >= 2 ? J / 2 : 1) : 1]; //!< nested: the 8-bit scale codes
};

//! Where the streaming kernel's decode table goes in its dynamic shared memory: 0xFC00 bytes in,
//! which is a 64 KiB-aligned shared address on sm_90 (dynamic shared memory starts at 0x400).
//! The bytes before it hold the partial sums (register ring) or the staging ring (async ring).
//! The kernel checks the address at run time and, elsewhere, puts the table at 0 and adds its
//! base to every lookup (one more instruction per two weights).
inline constexpr unsigned gemv1_stream_prefix = 0xFC00u;

//! The most dynamic shared memory a block may have on sm_90 (227 KiB).
inline constexpr unsigned gemv1_stream_smem_limit = 232448u;

//! Bytes of the nested map and 64 spare bytes (once the 16 T values of the table build).
QMEM_HOST_DEVICE constexpr unsigned gemv1_stream_extra_bytes(bool nested) {
  return (nested ? 256u * 4u : 0u) + 64u;
}

//! Whether gemv1_stream_kernel spreads a pair's scales over a row group's lanes: nested scales
//! with block64 always, plain ones with block64 and the shape's `spread`.
QMEM_HOST_DEVICE constexpr bool gemv1_stream_spreads(bool nested, bool spread, bool block64) {
  return (nested || spread) && block64;
}

//! Bytes of the scale exchange of spread scales at J = 2 (after the nested map and its 64 spare
//! bytes): per warp two buffers (pair parity) of 32 floats, through which the lanes of a row
//! group hand their scales to the group's keeper (gemv1_stream_kernel).
QMEM_HOST_DEVICE constexpr unsigned gemv1_stream_exchange_bytes(bool exchange, int warps) {
  return exchange ? static_cast<unsigned>(warps) * 2u * 128u : 0u;
}

//! Row pairs of loads in flight per warp of gemv1_stream_kernel (per group when `grouped`).
QMEM_HOST_DEVICE constexpr int gemv1_stream_ring(int depth, int j, bool nested, bool async,
                                                 bool grouped = false, bool block64 = false) {
  // nested scales at J = 4 keep one pair in registers (ptxas -v, sm_90: two spilled 516 bytes
  // at 128 registers); two groups of nested scales take half the pairs (depth 6 in two groups of
  // 6 spilled 208-456 bytes). Nested block64 stages (scales spread over a row group's lanes:
  // J / 2 absmax2 and code registers against plain scales' 2 J) take the plain rings.
  nested = nested && !block64;
  if (!async && nested && j == 4)
    return 1;
  int const per = grouped && nested ? 2 * j : j;
  return depth / per > 0 ? depth / per : 1;
}

//! Bytes of the async staging ring of one thread: per pair slot and super-step, both rows' 8 code
//! bytes and 4-byte scales.
QMEM_HOST_DEVICE constexpr unsigned gemv1_stream_slot_bytes(int j) {
  return static_cast<unsigned>(j) * 24u;
}

//! The streaming batch-1 kernels' last step for one tile: y of `pairs` row pairs from pair `p0` on,
//! each the sum of its `per_pair` chunk partials (float2 at partial + pair * per_pair) added in a
//! fixed order: rt threads per pair read interleaved, then a butterfly whose partners add the same
//! two numbers. Run by the block's first `threads` threads (a multiple of 32), between barriers of
//! the caller's.
template <class T>
__device__ QMEM_INLINE void store_pair_sums(gemv_args<T> const& a, float2 const* partial,
                                            unsigned per_pair, unsigned pairs, unsigned p0,
                                            unsigned threads) {
  unsigned rt = 8;
  while (rt > 1 && rt * pairs > threads)
    rt >>= 1;
  for (unsigned from = 0; from < pairs * rt; from += threads) {
    unsigned const idx = from + threadIdx.x;
    unsigned const pl = idx / rt;
    unsigned const part = idx % rt;
    float s0 = 0.0f, s1 = 0.0f;
    if (pl < pairs) {
      float2 const* const src = partial + static_cast<std::size_t>(pl) * per_pair;
      for (unsigned q = part; q < per_pair; q += rt) {
        float2 const p = src[q];
        s0 += p.x;
        s1 += p.y;
      }
    }
    for (unsigned o = 1; o < rt; o <<= 1) {
      s0 += __shfl_xor_sync(0xFFFFFFFFu, s0, static_cast<int>(o));
      s1 += __shfl_xor_sync(0xFFFFFFFFu, s1, static_cast<int>(o));
    }
    if (pl < pairs && part == 0) {
      std::size_t const r0 = 2 * static_cast<std::size_t>(p0 + pl);
      a.y[r0] = from_float<T>(s0);
      if (r0 + 1 < a.n)
        a.y[r0 + 1] = from_float<T>(s1);
    }
  }
}

//! `J` super-steps per warp, `Depth / J` pairs in flight, blocks of at most `MaxWarps` warps;
//! `Full`: every chunk of every warp's slice exists (k == 512 * J * C); `Async`: the loads go
//! through a per-thread cp.async ring in shared memory (plain scales only).
//! Preconditions (the launcher's): m == 1, k % 64 == 0, k % block == 0, block >= 64, codes
//! 8-byte and x 16-byte aligned, a power-of-two nested block size, n * k / 64 < 2^32;
//! blockDim.x == 32 * C * G.
template <class Code, class T, bool Nested, int J, int Depth, int MaxWarps, bool Full, bool Async,
          bool Grouped, bool Pdl, int PrefetchKiB = 0, bool StreamCodes = false, bool Lean = false,
          bool Block64 = false, bool SpreadPlain = false>
__global__ void __launch_bounds__(MaxWarps * 32, 1)
    gemv1_stream_kernel(gemv_args<T> a, code_table<16> values, code_table<256> nested,
                        gemv1_stream_plan plan) {
  static_assert(!(Async && Nested), "the async ring carries plain scales only");
  static_assert(!(Async && Grouped), "groups are a register ring's");
  static_assert(!Block64 || (Lean && !Async), "block64 is lean addressing's");
  // pairs in flight
  constexpr int Ring = gemv1_stream_ring(Depth, J, Nested, Async, Grouped, Block64);
  // the scales spread over the lanes of a fragment row group (stage above; nested with block64:
  // the launcher's precondition is a power-of-two nested block)
  constexpr bool SpreadScales = gemv1_stream_spreads(Nested, SpreadPlain, Block64);
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  unsigned const C = plan.col_groups;
  unsigned const G = plan.row_groups;
  unsigned const threads = blockDim.x;

  // layout: the table at a 64 KiB-aligned shared address when the allocation allows (else at 0).
  // Register ring: the partial sums [tile_pairs][C][8] float2, the nested map and the 16 T values
  // ("side") before the table when they fit, else after it. Async ring: the staging ring before
  // the table, the side after it.
  auto const base = static_cast<std::uint32_t>(__cvta_generic_to_shared(gemv_smem));
  unsigned const side_bytes = plan.tile_pairs * C * 64u + gemv1_stream_extra_bytes(Nested) +
                              gemv1_stream_exchange_bytes(SpreadScales && J == 2, MaxWarps);
  unsigned const ring_bytes = Async ? Ring * threads * gemv1_stream_slot_bytes(J) : 0u;
  unsigned const front = Async ? ring_bytes : side_bytes;
  unsigned lut_off = (0u - base) & 0xFFFFu;
  unsigned side_off = Async ? lut_off + gemv_lut_bytes : 0u;
  bool direct = true;
  if (lut_off < front || (Async && side_off + side_bytes > plan.smem)) {
    side_off = lut_off + gemv_lut_bytes;
    if (Async || side_off + side_bytes > plan.smem) {
      lut_off = 0;
      side_off = gemv_lut_bytes + ring_bytes;
      direct = false;
    }
  }
  auto const row_blocks = static_cast<std::uint32_t>(a.k >> a.block_shift);
  unsigned const ring_off = Async && direct ? 0u : gemv_lut_bytes;
  std::uint32_t const lut_addr = base + lut_off;
  auto* const lut = reinterpret_cast<std::uint32_t*>(gemv_smem + lut_off);
  auto* const partial = reinterpret_cast<float2*>(gemv_smem + side_off);
  float* const dyn = reinterpret_cast<float*>(partial + plan.tile_pairs * C * 8u);
  // spread scales at J = 2: this warp's scale exchange, two buffers of 32 floats (16-byte
  // aligned: the side starts so, the partial sums and the nested map are multiples of 64 bytes)
  [[maybe_unused]] float* const exchange = dyn + 256 + 16 + (threadIdx.x >> 5) * 64u;

  unsigned const warp = threadIdx.x >> 5;
  unsigned const lane = threadIdx.x & 31u;
  unsigned const g = lane >> 2; // fragment row group = this thread's chunk
  unsigned const t = lane & 3u; // thread in group
  unsigned const c = warp % C;  // column group: super-steps c * J .. c * J + J - 1
  unsigned const rg = warp / C; // row group
  auto const steps = static_cast<std::uint32_t>(a.k >> 6);
  unsigned const step_shift = a.block_shift - 6u; // log2(chunks per block)

  if constexpr (Pdl) {
    // the next kernel may start as soon as SMs free up (it only builds its table before waiting)
    cuda_detail::pdl_allow_dependents();
    if constexpr (PrefetchKiB > 0) {
      // the first rows of the block's first tile, in the order the warps stream them
      if (blockIdx.x < plan.tiles) {
        std::size_t const row0 = std::size_t{2} * blockIdx.x * plan.tile_pairs;
        std::size_t const rows = min(std::size_t{2} * plan.tile_pairs, a.n - row0);
        std::size_t const half = a.k / 2;
        std::size_t const bytes = min(rows * half, std::size_t{PrefetchKiB} * 1024);
        std::size_t const row_blocks = a.k >> a.block_shift;
        prefetch_l2_range(a.codes + row0 * half, bytes);
        std::size_t const pf_rows = (bytes + half - 1) / half;
        if constexpr (Nested)
          prefetch_l2_range(a.scales.qabsmax + row0 * row_blocks, pf_rows * row_blocks);
        else
          prefetch_l2_range(a.scales.absmax + row0 * row_blocks, pf_rows * row_blocks * 4);
      }
    }
    // the table needs no memory another kernel writes; everything after the wait may
    fill_gemv_tables<T, Nested>(lut, dyn, values, nested);
    cuda_detail::pdl_wait();
  }

  // this thread's activations, loaded once: chunk g of each of the warp's super-steps
  uint4 xv[J][2];
  bool valid[J];
  unsigned cb[J]; // the chunk's block within its row
  QMEM_UNROLL
  for (int j = 0; j < J; ++j) {
    std::uint32_t const chunk = (c * J + static_cast<unsigned>(j)) * 8 + g;
    valid[j] = Full || chunk < steps;
    cb[j] = chunk >> step_shift;
    xv[j][0] = xv[j][1] = make_uint4(0, 0, 0, 0);
    if (valid[j]) {
      auto const* xp = reinterpret_cast<uint4 const*>(a.x + static_cast<std::size_t>(chunk) * 64 +
                                                      16 * static_cast<std::size_t>(t));
      xv[j][0] = __ldg(xp);
      xv[j][1] = __ldg(xp + 1);
    }
  }

  auto const n = static_cast<unsigned>(a.n);
  auto const half_k = static_cast<std::uint32_t>(a.k / 2);
  std::uint8_t const* const cbase =
      a.codes + static_cast<std::size_t>(c) * J * 256 + 32 * g + 8 * t;
  // Lean (register rings; nested scales with block64 only): this thread's code and scale
  // addresses of row 0, made opaque so that each load's address is one wide multiply-add of its
  // row (IMAD.WIDE) instead of a product, a 64-bit add of the codes' base and a clamp (the
  // compiler re-associated the sum)
  constexpr bool LeanAddr = Lean && !Async && (!Nested || Block64);
  constexpr int Mine = SpreadScales && J >= 2 ? J / 2 : 1; // combinations per lane (stage above)
  std::uint8_t const* lean_codes = cbase;
  // (Block64: chunk = block, so super-step j's scale is the first one's plus 8 j)
  float const* lean_scales[Block64 ? 1 : J];
  [[maybe_unused]] std::uint8_t const* lean_qs = nullptr;
  if constexpr (LeanAddr && !Nested && !SpreadScales) {
    QMEM_UNROLL
    for (int j = 0; j < (Block64 ? 1 : J); ++j) {
      lean_scales[j] = a.scales.absmax + cb[j];
    }
  }
  // Spread: this lane's combinations' super-step (J = 4: j = t for both rows; J = 2: j = t & 1,
  // row t >> 1; J = 1: j = 0, row t & 1)
  [[maybe_unused]] unsigned const j_mine = J == 4 ? t : (J == 2 ? (t & 1u) : 0u);
  [[maybe_unused]] bool const valid_mine = Full || (c * J + j_mine) * 8 + g < steps;
  // the block of this lane's combinations within their row (chunk = block)
  [[maybe_unused]] std::uint32_t const blk_mine = cb[0] + 8 * j_mine;
  if constexpr (SpreadScales && Nested)
    lean_qs = a.scales.qabsmax + blk_mine;
  else if constexpr (SpreadScales)
    lean_scales[0] = a.scales.absmax + blk_mine;
  std::uint32_t const row_bytes4 = row_blocks * 4u;
  bool const odd = (g & 1u) != 0;
  bool const keeper = t == (g >> 1);
  // this thread's partial-sum slot for the warp's first pair of a tile, and the step per pair
  std::uint32_t const part_addr =
      static_cast<std::uint32_t>(__cvta_generic_to_shared(partial)) + ((rg * C + c) * 8 + g) * 8u;
  std::uint32_t const part_stride = G * C * 64u;
  using stage = gemv1_stream_stage<J, Nested, SpreadScales>;

  // calls f(integral_constant<int, s>) for s = 0 .. N - 1 (slot indices known at compile time)
  auto each_slot = [&]<class F>(F&& f) {
    [&]<int... S>(std::integer_sequence<int, S...>) { (f(std::integral_constant<int, S>{}), ...); }
    (std::make_integer_sequence<int, Ring>{});
  };

  // the block's current tile
  unsigned tile = blockIdx.x;
  unsigned p0 = 0, tp = 0, count = 0, row_base = 0;
  auto begin_tile = [&] {
    p0 = tile * plan.tile_pairs;
    tp = min(plan.tile_pairs, plan.pairs - p0);
    count = rg < tp ? (tp - rg + G - 1) / G : 0u; // this warp's pairs
    row_base = 2 * (p0 + rg);
  };

  // register ring: Ring stages; async ring: this thread's slots in shared memory, slot s holding
  // [J][2] code words (8 bytes, one array of `threads` per (j, h)), then [J][2] scales
  constexpr int Stages = Async ? 1 : (Grouped ? 2 * Ring : Ring);
  stage buf[Stages];
  if constexpr ((!Full || Grouped) && !Async) {
    // chunks past k are never loaded: their codes and scales stay 0 (and x is 0 there); groups
    // read every register of a group (also of pairs past the warp's last) before the next loads
    QMEM_UNROLL
    for (int s = 0; s < Stages; ++s)
      QMEM_UNROLL
    for (int j = 0; j < J; ++j)
      QMEM_UNROLL
    for (int h = 0; h < 2; ++h) {
      buf[s].q[j][h] = make_uint2(0, 0);
      if constexpr (!SpreadScales) {
        buf[s].s[j][h] = 0.0f;
        if constexpr (Nested)
          buf[s].qs[j][h] = 0;
      } else if (j == 0 && h == 0) {
        QMEM_UNROLL
        for (int i = 0; i < Mine; ++i) {
          buf[s].s[i] = 0.0f;
          if constexpr (Nested)
            buf[s].qs[i] = 0;
        }
      }
    }
  }
  std::uint32_t const slot_base = base + ring_off;
  auto slot_code = [&](int s, int j, int h) -> std::uint32_t {
    return slot_base +
           (static_cast<unsigned>(s) * J * 24u + static_cast<unsigned>(j * 2 + h) * 8u) * threads +
           threadIdx.x * 8u;
  };
  auto slot_scale = [&](int s, int j, int h) -> std::uint32_t {
    return slot_base +
           (static_cast<unsigned>(s) * J * 24u + J * 16u + static_cast<unsigned>(j * 2 + h) * 4u) *
               threads +
           threadIdx.x * 4u;
  };

  // the loads of this warp's pair i into slot S (`dep`: always 0, a dependency of every address;
  // `last_ok`: the pair's second row exists, no clamp needed)
  auto load = [&](auto slot, unsigned i, std::uint32_t dep = 0, bool last_ok = false) {
    constexpr int S = decltype(slot)::value;
    unsigned const r0 = row_base + 2 * G * i + dep;
    unsigned const rows[2] = {r0, LeanAddr && last_ok ? r0 + 1 : min(r0 + 1, n - 1)};
    if constexpr (LeanAddr) {
      auto& st = buf[S];
      if constexpr (SpreadScales) {
        // this lane's combinations: the block's absmax2 and 8-bit code, or its plain scale
        QMEM_UNROLL
        for (int i = 0; i < Mine; ++i) {
          unsigned const row =
              J == 4 ? rows[i] : ((J == 2 ? (t >> 1) : (t & 1u)) != 0 ? rows[1] : rows[0]);
          if constexpr (Nested) {
            std::uint32_t const blk = row * row_blocks + blk_mine;
            ldg_if<Full>(st.s[i], a.scales.absmax2 + (blk >> a.scales.nested_shift), valid_mine);
            ldg_if<Full>(st.qs[i],
                         static_cast<std::uint8_t const*>(row_address(lean_qs, row, row_blocks)),
                         valid_mine);
          } else {
            ldg_if<Full>(st.s[i],
                         static_cast<float const*>(row_address(lean_scales[0], row, row_bytes4)),
                         valid_mine);
          }
        }
      }
      QMEM_UNROLL
      for (int h = 0; h < 2; ++h) {
        auto const* const cp =
            static_cast<std::uint8_t const*>(row_address(lean_codes, rows[h], half_k));
        if constexpr (SpreadScales) {
          QMEM_UNROLL
          for (int j = 0; j < J; ++j)
            ldg_codes<StreamCodes, Full>(st.q[j][h], cp + 256 * j, valid[j]);
        } else {
          [[maybe_unused]] float const* sp0 = nullptr;
          if constexpr (Block64)
            sp0 = static_cast<float const*>(row_address(lean_scales[0], rows[h], row_bytes4));
          QMEM_UNROLL
          for (int j = 0; j < J; ++j) {
            auto const* const sp =
                Block64 ? sp0 + 8 * j
                        : static_cast<float const*>(
                              row_address(lean_scales[Block64 ? 0 : j], rows[h], row_bytes4));
            ldg_codes<StreamCodes, Full>(st.q[j][h], cp + 256 * j, valid[j]);
            ldg_if<Full>(st.s[j][h], sp, valid[j]);
          }
        }
      }
    } else {
      QMEM_UNROLL
      for (int h = 0; h < 2; ++h) {
        std::uint8_t const* const cp = cbase + static_cast<std::uint64_t>(rows[h]) * half_k;
        QMEM_UNROLL
        for (int j = 0; j < J; ++j) {
          [[maybe_unused]] std::uint32_t const blk = rows[h] * row_blocks + cb[j];
          if constexpr (Async) {
            // chunks past k: zero-filled, nothing read (src-size 0)
            bool const in = Full || valid[j];
            void const* const src = in ? static_cast<void const*>(cp + 256 * j) : a.codes;
            void const* const ssrc = in ? static_cast<void const*>(a.scales.absmax + blk) : a.codes;
            asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(slot_code(S, j, h)),
                         "l"(src), "r"(in ? 8 : 0)
                         : "memory");
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(slot_scale(S, j, h)),
                         "l"(ssrc), "r"(in ? 4 : 0)
                         : "memory");
          } else {
            auto& st = buf[S];
            ldg_codes<StreamCodes, Full>(st.q[j][h], cp + 256 * j, valid[j]);
            if constexpr (Nested) {
              ldg_if<Full>(st.qs[j][h], a.scales.qabsmax + blk, valid[j]);
              ldg_if<Full>(st.s[j][h], a.scales.absmax2 + (blk >> a.scales.nested_shift), valid[j]);
            } else {
              ldg_if<Full>(st.s[j][h], a.scales.absmax + blk, valid[j]);
            }
          }
        }
      }
    }
  };
  // async ring: one commit group per pair (empty past the warp's last pair), so that waiting for
  // all but the newest Ring - 1 groups waits for exactly the pair about to be computed
  auto commit = [&] {
    if constexpr (Async)
      asm volatile("cp.async.commit_group;" ::: "memory");
  };
  // the first Ring pairs of the tile
  auto prologue = [&] {
    each_slot([&](auto slot) {
      if (static_cast<unsigned>(decltype(slot)::value) < count)
        load(slot, static_cast<unsigned>(decltype(slot)::value));
      commit();
    });
  };

  // the first tile's loads go out before the tables are built
  if (tile < plan.tiles) {
    begin_tile();
    prologue();
  }
  // the decode table and the nested map (Pdl: built before the wait)
  if constexpr (!Pdl)
    fill_gemv_tables<T, Nested>(lut, dyn, values, nested);

  auto body = [&](auto direct_c) {
    constexpr bool Direct = decltype(direct_c)::value;
    // byte permute of the code word: Direct, the entry's shared address whole (the table's
    // address has 16 zero low bits); else its offset, added to the table's address
    std::uint32_t const lane_word = Direct ? lut_addr | (lane * 4u) : lane * 4u;
    auto decode = [&](std::uint32_t word, int byte) -> std::uint32_t {
      std::uint32_t addr;
      if constexpr (Direct)
        addr = __byte_perm(word, lane_word, 0x7604u | (static_cast<unsigned>(byte) << 4));
      else
        addr =
            lut_addr + __byte_perm(word, lane_word, 0x5504u | (static_cast<unsigned>(byte) << 4));
      std::uint32_t v;
      asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
      return v;
    };

    // the products of pair i (in slot S), scaled; the kept entries to shared memory
    auto compute = [&](auto slot, unsigned i) {
      constexpr int S = decltype(slot)::value;
      stage st;
      if constexpr (Async) {
        // this thread's own copies: complete once all but the newest Ring - 1 groups are
        asm volatile("cp.async.wait_group %0;" ::"n"(Ring - 1) : "memory");
        QMEM_UNROLL
        for (int j = 0; j < J; ++j)
          QMEM_UNROLL
        for (int h = 0; h < 2; ++h) {
          asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];"
                       : "=r"(st.q[j][h].x), "=r"(st.q[j][h].y)
                       : "r"(slot_code(S, j, h))
                       : "memory");
          asm volatile("ld.shared.f32 %0, [%1];"
                       : "=f"(st.s[j][h])
                       : "r"(slot_scale(S, j, h))
                       : "memory");
        }
      } else {
        st = buf[S];
      }
      float d[J][4];
      QMEM_UNROLL
      for (int kk = 0; kk < 4; ++kk)
        QMEM_UNROLL
      for (int j = 0; j < J; ++j) {
        // activation words 2kk, 2kk + 1 go with code bytes 2kk, 2kk + 1
        std::uint32_t const b0 = kk < 2 ? (&xv[j][0].x)[2 * kk] : (&xv[j][1].x)[2 * kk - 4];
        std::uint32_t const b1 = kk < 2 ? (&xv[j][0].x)[2 * kk + 1] : (&xv[j][1].x)[2 * kk - 3];
        std::uint32_t const w0 = kk < 2 ? st.q[j][0].x : st.q[j][0].y;
        std::uint32_t const w1 = kk < 2 ? st.q[j][1].x : st.q[j][1].y;
        int const b = 2 * (kk & 1);
        std::uint32_t const frag[4] = {decode(w0, b), decode(w1, b), decode(w0, b + 1),
                                       decode(w1, b + 1)};
        if (kk == 0)
          mma_16816_zero<T>(d[j], frag, b0, b1);
        else
          mma_16816<T>(d[j], frag, b0, b1);
      }
      // only D[g][g] (element g & 1) and D[g + 8][g] (element 2 + (g & 1)) of thread t = g / 2
      // are kept; the other entries are cross terms
      float v[2] = {0.0f, 0.0f};
      // Spread: this lane's combinations' scales, shared with the other lanes of its group
      [[maybe_unused]] float sc_mine[SpreadScales ? Mine : 1];
      if constexpr (SpreadScales) {
        QMEM_UNROLL
        for (int i = 0; i < Mine; ++i) {
          if constexpr (Nested)
            sc_mine[i] = fmath::add(fmath::mul(dyn[st.qs[i]], st.s[i]), a.scales.offset);
          else
            sc_mine[i] = st.s[i];
        }
      }
      // J = 2: the group's four scales through the warp's exchange (the buffer of the pair's
      // parity: a buffer is written again two pairs later, after the next pair's __syncwarp, by
      // which every lane has read it), combination h * 2 + j at float 4 g + h * 2 + j: one
      // store and one 16-byte load per lane (eight distinct addresses: one wavefront) in place
      // of four shuffles. J = 1 and 4 keep the shuffles (J = 4 through the exchange ran about
      // 1% slower, with 2% more instructions and 12 spilled bytes: docs/matmul.md). The same
      // values, the same fused multiply-adds.
      if constexpr (SpreadScales && J == 2) {
        // consecutive pairs take alternate slots of the two groups, so the slot's parity is the
        // pair's (every block64 shape has grouped rings)
        static_assert(Grouped, "the scale exchange picks its buffer by the slot's parity");
        float* const xb = exchange + 32u * (static_cast<unsigned>(S) & 1u);
        xb[4u * g + t] = sc_mine[0];
        __syncwarp();
        float4 const f4 = *reinterpret_cast<float4 const*>(xb + 4u * g);
        float const f[4] = {f4.x, f4.y, f4.z, f4.w};
        QMEM_UNROLL
        for (int j = 0; j < J; ++j)
          QMEM_UNROLL
        for (int h = 0; h < 2; ++h)
          v[h] = fmaf(f[2 * h + j], odd ? d[j][2 * h + 1] : d[j][2 * h], v[h]);
      } else {
        QMEM_UNROLL
        for (int j = 0; j < J; ++j)
          QMEM_UNROLL
        for (int h = 0; h < 2; ++h) {
          float sc;
          if constexpr (SpreadScales) {
            // combination h * J + j (J = 1: h) is lane (q & 3)'s number q / 4 of its group
            int const q = J == 1 ? h : h * J + j;
            sc = __shfl_sync(0xFFFFFFFFu, sc_mine[J == 4 ? h : 0],
                             static_cast<int>((lane & ~3u) | static_cast<unsigned>(q & 3)));
          } else if constexpr (Nested)
            sc = fmath::add(fmath::mul(dyn[st.qs[j][h]], st.s[j][h]), a.scales.offset);
          else
            sc = st.s[j][h];
          v[h] = fmaf(sc, odd ? d[j][2 * h + 1] : d[j][2 * h], v[h]);
        }
      }
      if (keeper) {
        std::uint32_t const addr = part_addr + i * part_stride;
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(v[0]), "f"(v[1]));
      }
    };

    // Grouped: the group of pairs base .. base + Ring - 1 in slots H * Ring ..: wait for it (by
    // touching every register), issue the next group's loads into the other slots (their
    // addresses depend on that touch), then compute it
    // (`guard` false: every pair computed and loaded exists)
    auto group_step = [&](auto half, unsigned base, auto guard) {
      constexpr int H = decltype(half)::value;
      constexpr bool Guard = decltype(guard)::value;
      std::uint32_t dep = 0;
      each_slot([&](auto slot) {
        stage const& st = buf[H * Ring + decltype(slot)::value];
        if constexpr (LeanAddr) {
          // the slot's last load (the loads of a ring share one scoreboard: waiting for one
          // register waits for them all)
          if constexpr (SpreadScales)
            dep ^= st.q[J - 1][1].y;
          else
            dep ^= __float_as_uint(st.s[J - 1][1]);
        } else {
          QMEM_UNROLL
          for (int j = 0; j < J; ++j)
            QMEM_UNROLL
          for (int h = 0; h < 2; ++h) {
            dep ^= st.q[j][h].x ^ st.q[j][h].y ^ __float_as_uint(st.s[j][h]);
            if constexpr (Nested)
              dep ^= st.qs[j][h];
          }
        }
      });
      dep &= a.zero;
      each_slot([&](auto slot) {
        constexpr int S = decltype(slot)::value;
        if (!Guard || base + Ring + S < count)
          load(std::integral_constant<int, (1 - H) * Ring + S>{}, base + Ring + S, dep,
               !Guard && H == 0);
      });
      each_slot([&](auto slot) {
        constexpr int S = decltype(slot)::value;
        if (!Guard || base + S < count)
          compute(std::integral_constant<int, H * Ring + S>{}, base + S);
      });
    };

    while (tile < plan.tiles) {
      if constexpr (Grouped) {
        using zero_c = std::integral_constant<int, 0>;
        using one_c = std::integral_constant<int, 1>;
        unsigned base = 0;
        for (; base + 3 * Ring <= count; base += 2 * Ring) {
          group_step(zero_c{}, base, std::false_type{});
          group_step(one_c{}, base + Ring, std::false_type{});
        }
        for (; base < count; base += 2 * Ring) {
          group_step(zero_c{}, base, std::true_type{});
          if (base + Ring < count)
            group_step(one_c{}, base + Ring, std::true_type{});
        }
      } else {
        // a ring of Ring pairs of loads in flight: pair i + Ring is loaded into the slot pair i
        // was computed from; the prologue has loaded pairs 0 .. Ring - 1
        unsigned i0 = 0;
        for (; i0 + 2 * Ring <= count; i0 += Ring) {
          // steady state: every pair computed and loaded exists
          each_slot([&](auto slot) {
            constexpr int S = decltype(slot)::value;
            compute(slot, i0 + S);
            load(slot, i0 + S + Ring);
            commit();
          });
        }
        // the last fewer than 2 Ring pairs
        each_slot([&](auto slot) {
          constexpr int S = decltype(slot)::value;
          unsigned const i = i0 + S;
          if (i < count) {
            compute(slot, i);
            if (i + Ring < count)
              load(slot, i + Ring);
          }
          commit();
        });
        if constexpr (Async)
          asm volatile("cp.async.wait_all;" ::: "memory"); // (no commit follows these)
        each_slot([&](auto slot) {
          constexpr int S = decltype(slot)::value;
          unsigned const i = i0 + S + Ring;
          if (i < count)
            compute(slot, i);
        });
      }
      // the next tile's loads go out before this one's reduction
      unsigned const done_p0 = p0;
      unsigned const done_tp = tp;
      tile += gridDim.x;
      if (tile < plan.tiles) {
        begin_tile();
        prologue();
      }
      __syncthreads();

      // each row's C * 8 chunk sums, added in a fixed order
      store_pair_sums(a, partial, C * 8, done_tp, done_p0, threads);
      __syncthreads();
    }
  };
  if (direct)
    body(std::true_type{});
  else
    body(std::false_type{});
}

// ------------------------------------------------------------------------------------------------
// Batch-1 GEMV fed by bulk copies (gemv1_bulk_kernel)
//
// gemv1_stream_kernel keeps its bytes in flight in registers: 16 warps x a ring of 4 row pairs,
// and ncu shows its warps stalled on those loads (long scoreboard, about 10 cycles between a
// warp's issues). Here one thread of an extra warp (the producer) copies whole stages of the
// block's weight rows, codes and scales, into a ring of shared-memory stages with bulk copies
// (cp.async.bulk, completion counted in bytes on the stage's "full" mbarrier); the other warps
// (the consumers, the column and row groups of gemv1_stream_kernel) wait for a stage, read their
// column slice of its rows from shared memory, decode and multiply them as gemv1_stream_kernel
// does, and arrive on the stage's "empty" mbarrier, which the producer waits for before it
// refills the stage. The bytes in flight are then the ring's (about 140 KiB per SM beside the
// 64 KiB table), whatever the registers and the warps: the rows of a stage are contiguous in
// global memory (one copy for their codes, one for their scales), and nothing goes through L1.
// The consumers' loads are 8-byte (codes) and 4-byte (scales) shared loads, one more pair of
// loads per 16 table lookups. A block's stages follow its tiles; only the consumers take part
// in a tile's reduction (named barrier 1), so the producer keeps the ring full meanwhile.
// It computes the function of the other GEMV kernels (docs/matmul.md). Measured on the H200
// (gemv_batch1_bulk_candidates): slower than gemv1_stream_kernel, by 10-15% on four anchor
// shapes, bound by the consumers' per-pair instructions rather than by bytes in flight.

//! Launch plan of gemv1_bulk_kernel (host-computed, a launch argument).
struct gemv1_bulk_plan {
  gemv1_stream_plan tiles; //!< column and row groups, tiles, as gemv1_stream_kernel's
  unsigned stage_pairs;    //!< row pairs of one stage (a multiple of the row groups)
  unsigned stage_bytes;    //!< bytes of one stage buffer: its codes, then its scales
  unsigned stages;         //!< stages of the ring
  unsigned front_stages;   //!< of which before the table (the others after it)
  unsigned front_off;      //!< offset of the first stage before the table
  unsigned evict_first;    //!< 1: the copies ask L2 to evict the weight's lines first
};

//! Block shape of gemv1_bulk_kernel.
struct gemv1_bulk_shape {
  int warps;       //!< consumer warps at most (the block has one more, the producer)
  int stage_kib;   //!< bytes of one stage, about (rounded down to whole row-group pairs, >= 1)
  int ring_kib;    //!< bytes of the ring at most
  int partial_kib; //!< bytes of a tile's partial sums at most
  bool evict_first = false; //!< copies with an L2 evict-first policy
  //! Super-steps per warp at least (1, 2 or 4): more make fewer warps share a row, each with J
  //! independent products per pair and J times the bytes per stage wait
  int min_j = 1;
};

//! Shapes of gemv1_bulk_kernel the bench's gemv_bulk compares (matmul round 7; none dispatched),
//! a tile's partial sums in at most 16 KiB unless said: 0 16 consumer warps, stages of one row
//! group's pairs (about 8 KiB at most; one pair of rows when k >= 4096), a ring of up to 160 KiB
//! (16 stages of 9 KiB at k = 8192); 1 stages of about 32 KiB (3 pairs at k = 8192); 2 a ring of
//! 64 KiB; 3 as 0 with the weight's lines marked evict-first in L2; 4 as 0 with up to 31 consumer
//! warps (64 registers); 5 as 0 with 32 KiB of partial sums; 6 a ring of 32 KiB; 7 and 8 as 0 with
//! J = 4 and J = 2 at least (not yet timed).
//! H200, 2026-11-30 04:09 UTC, 200 calls in one graph, NF4 block 64, us on 4096 x 4096 / 14336 x
//! 4096 / 4096 x 14336 / 8192 x 8192 / 28672 x 8192 (J = 1, 1, 2, 1, 1), dispatched
//! gemv_batch1_stream 4.78 / 10.01 / 10.35 / 11.33 / 37.69:
//!   0  6.00 / 14.32 / 12.01 / 16.45 / 51.86     4  6.40 / 14.39 / 15.80 / 16.46 / 52.78
//!   1  5.49 / 12.17 / 11.42 / 14.33 / 47.67     5  5.99 / 13.44 / 12.00 / 15.37 / 50.02
//!   2  5.67 / 14.12 / 11.74 / 16.41 / 52.66     6  5.62 / 14.26 / 12.55 / 17.02 / 56.07
//!   3  5.99 / 14.28 / 11.82 / 16.45 / 52.00
//! and at 03:52 UTC with J = 1, 2, 2, 2, 4 (dispatched 4.83 / 9.97 / 10.33 / 11.36 / 38.10): 0
//! 6.40 / 11.45 / 12.10 / 12.95 / 38.37, 1 5.49 / 11.44 / 11.50 / 12.97 / 41.45, 2 5.76 / 11.08 /
//! 11.86 / 12.71 / -, 3 6.11 / 11.25 / 11.93 / 12.78 / 38.78. The ring's depth hardly matters; J
//! does (the consumers' per-pair instructions: ncu, 8192 x 8192, 8.70 M warp instructions at J = 1
//! against 6.38 M at J = 2 and 5.47 M for the dispatched kernel).
inline constexpr gemv1_bulk_shape gemv_batch1_bulk_candidates[] = {
    {16, 8, 160, 16},       {16, 32, 160, 16},          {16, 8, 64, 16},
    {16, 8, 160, 16, true}, {31, 8, 160, 16},           {16, 8, 160, 32},
    {16, 8, 32, 16},        {16, 8, 160, 16, false, 4}, {16, 8, 160, 16, false, 2}};

//! Offset of the mbarriers in gemv1_bulk_kernel's dynamic shared memory, and of its partial sums.
inline constexpr unsigned gemv1_bulk_barrier_bytes = 512u;

//! Stages at most of gemv1_bulk_kernel's ring (2 mbarriers of 8 bytes each per stage).
inline constexpr unsigned gemv1_bulk_max_stages = gemv1_bulk_barrier_bytes / 16u;

__device__ QMEM_INLINE void mbar_init(std::uint32_t bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ QMEM_INLINE void mbar_arrive(std::uint32_t bar) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared::cta.b64 st, [%0];\n}\n" ::"r"(bar)
               : "memory");
}
__device__ QMEM_INLINE void mbar_expect_tx(std::uint32_t bar, unsigned bytes) {
  asm volatile(
      "{\n .reg .b64 st;\n mbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n}\n" ::"r"(bar),
      "r"(bytes)
      : "memory");
}
//! Waits until the phase of parity `parity` of the mbarrier at `bar` has completed.
__device__ QMEM_INLINE void mbar_wait(std::uint32_t bar, unsigned parity) {
  asm volatile("{\n .reg .pred done;\n wait_%=:\n"
               " mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
               " @!done bra wait_%=;\n}\n" ::"r"(bar),
               "r"(parity)
               : "memory");
}
//! Bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory to
//! shared memory, completing `bytes` transactions on the mbarrier at `bar`.
__device__ QMEM_INLINE void bulk_copy(std::uint32_t dst, void const* src, unsigned bytes,
                                      std::uint32_t bar, std::uint64_t policy) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint "
               "[%0], [%1], %2, [%3], %4;" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar), "l"(policy)
               : "memory");
}

//! `J` super-steps per warp, consumer blocks of at most `MaxWarps` warps plus the producer warp,
//! `Full`: every chunk of every warp's slice exists (k == 512 * J * C). Plain scales only; launched
//! with programmatic dependent launch (the table is built before griddepcontrol.wait).
//! Preconditions (the launcher's): m == 1, k % 64 == 0, k % block == 0, block >= 64, the block
//! count of a row a multiple of 4, codes, scales and x 16-byte aligned, n * k / 64 < 2^32;
//! blockDim.x == 32 * (C * G + 1); the plan's layout fits plan.tiles.smem.
template <class Code, class T, int J, int MaxWarps, bool Full>
__global__ void __launch_bounds__((MaxWarps + 1) * 32, 1)
    gemv1_bulk_kernel(gemv_args<T> a, code_table<16> values, gemv1_bulk_plan plan) {
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  gemv1_stream_plan const& tp_plan = plan.tiles;
  unsigned const C = tp_plan.col_groups;
  unsigned const G = tp_plan.row_groups;
  unsigned const consumers = 32u * C * G;
  auto const base = static_cast<std::uint32_t>(__cvta_generic_to_shared(gemv_smem));
  // layout: mbarriers (full[s] at 16 s, empty[s] at 16 s + 8), the partial sums, the front
  // stages, the table at 0xFC00 (a 64 KiB-aligned shared address on sm_90), the back stages
  unsigned const lut_off = gemv1_stream_prefix;
  bool const direct = ((base + lut_off) & 0xFFFFu) == 0;
  std::uint32_t const lut_addr = base + lut_off;
  auto* const lut = reinterpret_cast<std::uint32_t*>(gemv_smem + lut_off);
  auto* const partial = reinterpret_cast<float2*>(gemv_smem + gemv1_bulk_barrier_bytes);
  std::uint32_t const bars = base;
  unsigned const stages = plan.stages;
  auto stage_off = [&](unsigned s) -> unsigned {
    return s < plan.front_stages
               ? plan.front_off + s * plan.stage_bytes
               : lut_off + gemv_lut_bytes + (s - plan.front_stages) * plan.stage_bytes;
  };

  unsigned const warp = threadIdx.x >> 5;
  unsigned const lane = threadIdx.x & 31u;
  auto const n = static_cast<unsigned>(a.n);
  auto const half_k = static_cast<std::uint32_t>(a.k / 2);
  auto const row_blocks = static_cast<std::uint32_t>(a.k >> a.block_shift);
  unsigned const sp_max = plan.stage_pairs;

  cuda_detail::pdl_allow_dependents();
  if (threadIdx.x == 0) {
    for (unsigned s = 0; s < stages; ++s) {
      mbar_init(bars + 16u * s, 1u);
      mbar_init(bars + 16u * s + 8u, consumers);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  // the table needs no memory another kernel writes; everything after the wait may (its barrier
  // also publishes the mbarriers' initialization)
  fill_gemv_tables<T, false>(lut, nullptr, values, code_table<256>{});
  cuda_detail::pdl_wait();

  if (warp == C * G) {
    // the producer: stage after stage of the block's tiles, each into the next slot of the ring
    // once its consumers have left it
    if (lane != 0)
      return;
    std::uint64_t policy;
    if (plan.evict_first != 0)
      asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    else
      asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;" : "=l"(policy));
    unsigned slot = 0, use = 0;
    for (unsigned tile = blockIdx.x; tile < tp_plan.tiles; tile += gridDim.x) {
      unsigned const p0 = tile * tp_plan.tile_pairs;
      unsigned const tp = min(tp_plan.tile_pairs, tp_plan.pairs - p0);
      for (unsigned sp0 = 0; sp0 < tp; sp0 += sp_max) {
        std::uint32_t const full = bars + 16u * slot;
        if (use > 0)
          mbar_wait(full + 8u, (use - 1u) & 1u);
        unsigned const row0 = 2u * (p0 + sp0);
        unsigned const rows = min(2u * min(sp_max, tp - sp0), n - row0);
        unsigned const code_bytes = rows * half_k;
        unsigned const scale_bytes = rows * row_blocks * 4u;
        std::uint32_t const dst = base + stage_off(slot);
        mbar_expect_tx(full, code_bytes + scale_bytes);
        bulk_copy(dst, a.codes + std::size_t{row0} * half_k, code_bytes, full, policy);
        bulk_copy(dst + sp_max * 2u * half_k, a.scales.absmax + std::size_t{row0} * row_blocks,
                  scale_bytes, full, policy);
        if (++slot == stages) {
          slot = 0;
          ++use;
        }
      }
    }
    return;
  }

  // the consumers
  unsigned const g = lane >> 2; // fragment row group = this thread's chunk
  unsigned const t = lane & 3u; // thread in group
  unsigned const c = warp % C;  // column group: super-steps c * J .. c * J + J - 1
  unsigned const rg = warp / C; // row group
  auto const steps = static_cast<std::uint32_t>(a.k >> 6);
  unsigned const step_shift = a.block_shift - 6u;

  uint4 xv[J][2];
  bool valid[J];
  unsigned cb[J]; // the chunk's block within its row
  QMEM_UNROLL
  for (int j = 0; j < J; ++j) {
    std::uint32_t const chunk = (c * J + static_cast<unsigned>(j)) * 8 + g;
    valid[j] = Full || chunk < steps;
    cb[j] = chunk >> step_shift;
    xv[j][0] = xv[j][1] = make_uint4(0, 0, 0, 0);
    if (valid[j]) {
      auto const* xp = reinterpret_cast<uint4 const*>(a.x + static_cast<std::size_t>(chunk) * 64 +
                                                      16 * static_cast<std::size_t>(t));
      xv[j][0] = __ldg(xp);
      xv[j][1] = __ldg(xp + 1);
    }
  }
  bool const odd = (g & 1u) != 0;
  bool const keeper = t == (g >> 1);
  // this thread's code bytes within a stage row, its partial-sum slot for a tile's pair 0
  unsigned const code_in_row = c * J * 256u + 32u * g + 8u * t;
  std::uint32_t const part_addr =
      static_cast<std::uint32_t>(__cvta_generic_to_shared(partial)) + (c * 8 + g) * 8u;
  unsigned const scales_in_stage = sp_max * 2u * half_k;

  auto body = [&](auto direct_c) {
    constexpr bool Direct = decltype(direct_c)::value;
    std::uint32_t const lane_word = Direct ? lut_addr | (lane * 4u) : lane * 4u;
    auto decode = [&](std::uint32_t word, int byte) -> std::uint32_t {
      std::uint32_t addr;
      if constexpr (Direct)
        addr = __byte_perm(word, lane_word, 0x7604u | (static_cast<unsigned>(byte) << 4));
      else
        addr =
            lut_addr + __byte_perm(word, lane_word, 0x5504u | (static_cast<unsigned>(byte) << 4));
      std::uint32_t v;
      asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
      return v;
    };
    // the products of the stage's pair lp (tile pair `pi`), scaled; the kept entries to shared
    // memory
    auto compute = [&](unsigned char const* stage, unsigned lp, unsigned pi) {
      uint2 q[J][2];
      float sc[J][2];
      QMEM_UNROLL
      for (int j = 0; j < J; ++j)
        QMEM_UNROLL
      for (int h = 0; h < 2; ++h) {
        unsigned const row = 2u * lp + static_cast<unsigned>(h);
        q[j][h] = make_uint2(0, 0);
        sc[j][h] = 0.0f;
        if (Full || valid[j]) {
          q[j][h] = *reinterpret_cast<uint2 const*>(stage + row * half_k + code_in_row +
                                                    256u * static_cast<unsigned>(j));
          sc[j][h] = *reinterpret_cast<float const*>(stage + scales_in_stage +
                                                     (row * row_blocks + cb[j]) * 4u);
        }
      }
      float d[J][4];
      QMEM_UNROLL
      for (int kk = 0; kk < 4; ++kk)
        QMEM_UNROLL
      for (int j = 0; j < J; ++j) {
        std::uint32_t const b0 = kk < 2 ? (&xv[j][0].x)[2 * kk] : (&xv[j][1].x)[2 * kk - 4];
        std::uint32_t const b1 = kk < 2 ? (&xv[j][0].x)[2 * kk + 1] : (&xv[j][1].x)[2 * kk - 3];
        std::uint32_t const w0 = kk < 2 ? q[j][0].x : q[j][0].y;
        std::uint32_t const w1 = kk < 2 ? q[j][1].x : q[j][1].y;
        int const b = 2 * (kk & 1);
        std::uint32_t const frag[4] = {decode(w0, b), decode(w1, b), decode(w0, b + 1),
                                       decode(w1, b + 1)};
        if (kk == 0)
          mma_16816_zero<T>(d[j], frag, b0, b1);
        else
          mma_16816<T>(d[j], frag, b0, b1);
      }
      float v[2] = {0.0f, 0.0f};
      QMEM_UNROLL
      for (int j = 0; j < J; ++j)
        QMEM_UNROLL
      for (int h = 0; h < 2; ++h)
        v[h] = fmaf(sc[j][h], odd ? d[j][2 * h + 1] : d[j][2 * h], v[h]);
      if (keeper) {
        std::uint32_t const addr = part_addr + pi * C * 64u;
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};" ::"r"(addr), "f"(v[0]), "f"(v[1]));
      }
    };

    unsigned slot = 0, use = 0;
    for (unsigned tile = blockIdx.x; tile < tp_plan.tiles; tile += gridDim.x) {
      unsigned const p0 = tile * tp_plan.tile_pairs;
      unsigned const tp = min(tp_plan.tile_pairs, tp_plan.pairs - p0);
      for (unsigned sp0 = 0; sp0 < tp; sp0 += sp_max) {
        std::uint32_t const full = bars + 16u * slot;
        mbar_wait(full, use & 1u);
        unsigned char const* const stage = gemv_smem + stage_off(slot);
        unsigned const sp = min(sp_max, tp - sp0);
        for (unsigned lp = rg; lp < sp; lp += G)
          compute(stage, lp, sp0 + lp);
        // every consumer thread arrives (an arrive releases its own thread's reads only: one
        // lane's arrive after __syncwarp made compute-sanitizer racecheck report the producer's
        // next copy into the stage against the other lanes' reads, H200 2026-11-30)
        mbar_arrive(full + 8u);
        if (++slot == stages) {
          slot = 0;
          ++use;
        }
      }
      // the consumers only: each row's C * 8 chunk sums, added in a fixed order
      asm volatile("bar.sync 1, %0;" ::"r"(consumers) : "memory");
      store_pair_sums(a, partial, C * 8, tp, p0, consumers);
      asm volatile("bar.sync 1, %0;" ::"r"(consumers) : "memory");
    }
  };
  if (direct)
    body(std::true_type{});
  else
    body(std::false_type{});
}

// ------------------------------------------------------------------------------------------------
// Streaming small-batch GEMV (gemvm_stream_kernel), batches 2 to 16
//
// gemv_4bit_kernel (the batch 2-16 kernel before this one) gave each block 32 rows and all the
// columns: 448 blocks for 14336 rows, 3 resident per SM, so 1.13 waves (the second nearly empty),
// and every block rebuilt the 64 KiB decode table for 2 step groups per warp. Batch 16 ran
// 2.07-2.78x batch 1 on three anchor shapes (H200 integrated run, 2026-11-29 16:49 UTC). This
// kernel applies the batch-1 streaming design to the standard fragment layout:
// - one block of up to 16 warps per SM, the table built once per block (before
//   griddepcontrol.wait with programmatic dependent launch);
// - each block owns a contiguous run of 16-row tiles (ceil(tiles / SMs): every SM within one tile
//   of the same share) and walks it in rounds of R tiles; each warp owns a contiguous range of
//   the 64-column chunks for every round, so a block reads x once per round (from L2) and its
//   warps never read the same bytes twice;
// - a warp's step is one chunk of its R tiles (R x 16 rows x 32 code bytes: 2 KiB with R = 4, the
//   batch-1 kernel's bytes in flight per warp) and its activations; the next step's loads are
//   issued after the current step's registers have been touched (a dependency through a zero the
//   compiler cannot see), so the one scoreboard ptxas gives the loads holds one step while the
//   warp computes the other (the batch-1 kernel's "grouped" ring); the next round's first step
//   is loaded before the current round's reduction;
// - each round, the warps' fp32 sums go to shared memory and the block adds them per output in
//   warp order (deterministic);
// - or, with x_once (gemv_batch16_stream_long, batches 9-16 on weights of more than 4 tiles per
//   block), steps outer and tiles inner: a warp walks every tile of the block at one step before
//   its next step, keeping the step's activations in registers, its sums of each tile in shared
//   memory; one reduction at the end, the same bits.
// Thread (g, t) holds bytes 8t .. 8t + 7 of each chunk in rows g and g + 8 of every tile (columns
// 16t .. 16t + 15) and, as the B fragment, the activations of batch rows g (and g + 8) at the same
// columns: the mma's k order is a permutation of the chunk's columns shared by A and B. It
// computes the function of the other GEMV kernels (docs/matmul.md).

//! Launch plan of gemvm_stream_kernel (host-computed, a launch argument).
struct gemvm_stream_plan {
  unsigned tiles;      //!< 16-row tiles of the weight, ceil(n / 16)
  unsigned per_block;  //!< consecutive tiles a block owns (the last block fewer)
  unsigned col_groups; //!< warps per block, each a contiguous range of the chunks
  unsigned chunks;     //!< 64-column chunks of a row, k / 64
  unsigned smem;       //!< dynamic shared memory of the launch, bytes
};

//! Block shape of gemvm_stream_kernel: warps per block and tiles per step for batches of 2-8
//! rows (one 8-row half, MT = 1) and of 9-16 rows (MT = 2, whose activations take twice the
//! registers).
struct gemvm_stream_shape {
  int warps;       //!< at most this many warps per block (one block per SM), batch <= 8
  int tiles;       //!< R: 16-row tiles a warp computes per step (they share its activations)
  int warps16;     //!< the same for batches of 9-16
  int tiles16;     //!< the same for batches of 9-16
  bool pdl = true; //!< programmatic dependent launch (as gemv1_stream_shape::pdl)
  //! With `pdl`: before waiting for the previous kernel, each warp asks L2 for this many 128-byte
  //! lines (4 chunks each) of every row of the block's first round at its first chunk, and the
  //! line of scales there (as gemv1_stream_shape::prefetch_kib).
  int prefetch_lines = 0;
  //! The 4 threads of a fragment row load the scales of 4 consecutive chunks in one instruction
  //! (once per 4 chunks) and the step's scale comes by a shuffle: a quarter of the scale load
  //! instructions, each touching the same 8 lines (one per weight row) as before.
  bool group_scales = false;
  //! A step is two chunks whose codes come as one 16-byte load per thread and row (thread t:
  //! bytes 16t..16t+15 of the two chunks' 64), the halves exchanged between threads t and t ^ 2
  //! by two shuffles so that each thread holds 8 bytes of each chunk: the code loads touch 8
  //! lines per two chunks instead of per chunk. Needs group_scales, k % 128 == 0 and 16-byte
  //! aligned codes (else the launcher declines).
  bool pair = false;
  //! Steps outer, tiles inner: a warp walks all the block's tiles at one step before moving to
  //! its next step, so its activations come from L2 once per block (then from L1) instead of
  //! once per round of R tiles, and its fp32 sums live in shared memory (one read-add-write per
  //! tile and step, the same fused multiply-adds in the same order: the results equal the
  //! round-based kernel's bit for bit), added per output in warp order at the end. Scales are
  //! loaded at every step. Batches of 9-16 only (timed there): the launcher declines smaller
  //! batches, and a weight whose sums do not fit.
  bool x_once = false;
  //! Code loads bypass L1 (`L1::no_allocate`), leaving it to the activations (with x_once).
  bool stream_codes = false;
  //! A step whose R tiles are all the block's is computed without a test per tile, so that
  //! ptxas may interleave the tiles' products (the test, a branch, is kept for a block's last,
  //! partial round only).
  bool full_rounds = false;
  //! With x_once: a step at the same chunk as the previous one takes that step's activation
  //! registers instead of loading them again (loads only when the warp moves to its next step).
  bool keep_x = false;
  //! With keep_x: the activations live in two register slots of their own, the next chunk's
  //! loaded into the slot the current chunk does not use, so that a step at the same chunk reads
  //! them where they are instead of copying the 32 registers (MT 2, pair) into the code slot it
  //! loads (SASS, ptxas 13.0, sm_90: 359 register moves in candidate 12's loop of 2902
  //! instructions). The loop is unrolled over both slot parities (four step bodies instead of
  //! two). The same fused multiply-adds in the same order: the same bits as keep_x alone.
  bool x_slots = false;
  //! Lean steps (pair, x_once; plain scales, nested ones ignore it): a step's next loads wait on one register of each kind of the
  //! step's loads (its last code word, scale and activation word; a slot's loads share one
  //! scoreboard, so waiting for one waits for them all) instead of an XOR of all 72, and each
  //! code and scale address is one wide multiply-add from the step's row-0 addresses (the tile's
  //! row offset 16 r + 8 h times the row stride) instead of a product, a 64-bit add and a
  //! re-association. The same loads and fused multiply-adds: the same bits.
  bool lean = false;
  //! With lean (plain scales): for blocks of 64 a chunk is a block, so a step's two scales of a
  //! row (chunks c and c + 1, c even) are adjacent floats: each thread loads them as one 8-byte
  //! word from the step's own address, instead of a group of 4 chunks' scales spread over the 4
  //! threads of a fragment row and picked by a shuffle per chunk (16 shuffles per step of R = 4
  //! tiles leave the shared-memory pipe, which the table decode keeps busy). The same scale
  //! values and fused multiply-adds: the same bits. The launcher declines other weights (blocks
  //! other than 64, nested scales, scales not 8-byte aligned).
  bool block64 = false;
};

//! Shapes of gemvm_stream_kernel the bench compares (gemv_variant 31 to 39, after the batch-1
//! ones). bench gemv_variant, one H200, 200 calls in one CUDA graph, NF4 block 64, plain scales,
//! us on 4096 x 4096 / 14336 x 4096 / 4096 x 14336 / 8192 x 8192 / 28672 x 8192.
//! Run of 2026-11-29 19:27 UTC (same-run copy 4234 GB/s; batch 1 dispatched 5.32 / 10.91 /
//! 10.82 / 12.53 / 39.95), {warps, R} at batch 4 | at batch 16 ("gs": group_scales):
//!   {16, 2}     6.32 / 18.27 / 15.44 / 18.76 / 65.65 | {8, 4}      9.73 / 22.74 / 24.85 / 22.86 / 87.43
//!   {16, 4}     7.08 / 17.34 / 18.93 / 19.08 / 71.70 | {16, 2}     7.43 / 23.57 / 19.74 / 23.71 / 91.52
//!   {16, 2} gs  5.93 / 17.99 / 14.49 / 18.08 / 64.58 | {16, 3}     8.33 / 23.44 / 20.95 / 26.83 / 90.87
//!   {16, 4} gs  6.88 / 15.59 / 18.07 / 17.05 / 66.35 | {12, 4}     9.18 / 21.84 / 22.44 / 23.48 / 92.41
//!                                                    | {8, 4} gs  10.21 / 23.16 / 25.37 / 23.87 / 89.39
//!                                                    | {16, 2} gs  7.12 / 22.70 / 17.79 / 22.55 / 87.69
//!                                                    | {12, 4} gs  9.26 / 21.11 / 22.07 / 21.72 / 85.95
//! Run of 19:10 UTC (copy 4209 GB/s), before tiles past a block's last were skipped and before
//! group_scales: {16, 4} at batch 4 8.19 / 17.92 / 23.14 / 18.96 / 74.89, {16, 2} 6.33 / 18.72 /
//! 15.62 / 18.69 / 64.40; at batch 16 {16, 2} 7.57 / 24.75 / 20.19 / 23.81 / 90.18, {8, 4} 10.99
//! / 22.85 / 28.99 / 22.32 / 85.60, {16, 3} 9.14 / 25.89 / 25.88 / 31.44 / 94.35; without PDL
//! 8-19% slower; the first lines asked of L2 before the wait (prefetch_lines 1, 2): within 3%;
//! gemv_4bit_kernel at batch 16 (dispatched before): 8.61 / 30.66 / 19.32 / 26.17 / 94.57.
//! Computing the skipped tiles was what lost with R = 4 on 4096 rows (2 tiles per block: batch 4
//! 4096 x 14336 23.1 us against 15.6 with R = 2) and R = 3 on 8192 rows (2 rounds of 3 for 4
//! tiles). ncu (8192 x 8192, one launch, cold L2; {16, 2} at batch 16, {16, 4} at batch 4):
//! L1/TEX 68-72% busy, DRAM 27-33%, 25% occupancy; counted per chunk of a tile (1024 weights):
//! 16 table loads, 2 code and 2 scale loads of 8 rows each (8 lines apiece), and the chunk's
//! activations shared by R tiles. At batch 16 ptxas spilled R = 4 with 16 warps (128 registers),
//! hence 12 or 8 warps there. Written after that run, not yet timed (variants 38 and 39): `pair`
//! shapes {16, 2} / {12, 2} and {12, 4} / {8, 4}, whose code loads touch 8 lines per two chunks
//! (ptxas -v, sm_90: no spills with plain scales; with nested ones 164 bytes for 39 at batch <= 8,
//! 8 for 38 at batch > 8).
//! Matmul round 8 (bench gemv_batch16, candidates 9-12; H200, 2026-11-30, same process as the
//! dispatched shape 8, us at batch 16 on the five shapes): 8 {8, 4} pair 7.63 / 19.40 / 21.05 /
//! 19.63 / 76.35 (06:56 UTC, copy 4195 GB/s); 9 the same with full_rounds 7.88 / 20.21 / 21.91 /
//! 20.72 / 80.68; 11 x_once + stream_codes + keep_x 7.54 / 18.37 / 22.80 / 21.14 / 73.76; 12 the
//! same with full_rounds 7.69 / 18.25 / 23.34 / 20.36 / 73.04 (dispatched where a block owns more
//! than 4 tiles: gemv_batch16_stream_long); x_once + keep_x with codes through L1 7.58 / 18.42 /
//! 22.73 / 21.02 / 79.57. 06:43 UTC (copy 4216 GB/s; 8: 7.62 / 19.43 / 20.99 / 19.66 / 76.20):
//! 10 x_once alone (activations loaded at every step, from L2: L1 kept none between steps, ncu
//! L1 hit rate 32% as for 8) 7.35 / 18.69 / 21.09 / 20.16 / 87.72, with stream_codes 82.17 on
//! 28672 x 8192; {8, 5} and {8, 3} pair 82.41 / 81.88 there, {6, 4} 87.65.
//! 13 (2026-11-30, not yet timed): 12 with x_slots. SASS (ptxas 13.0, sm_90) of the steps-outer
//! loop per 256 tensor-core products: 2549 instructions against 12's 2902 (register moves 1
//! against 359, selects 199 against 196), 227 registers against 222, no spills; loop code 80 KiB
//! against 46 KiB. 14: 13 without full_rounds (2948 instructions per 256 products over 4 step
//! bodies each with the per-tile test, 2 moves, 227 registers; loop code 46 KiB: a hedge against
//! instruction-cache misses). bench gemv_batch16_ab times 12, 13 and 14 in turn.
//! 15 (gemv round 3, 2026-11-30): 12 with lean steps (lean: one register per kind of load
//! waited for, each address one wide multiply-add from the step's row 0). SASS (ptxas 13.0,
//! sm_90) of the steady two-step loop of full rounds (128 tensor-core products; the activation
//! loads, one step in four on 28672 x 8192, left out): 1457 instructions against 12's 1531
//! (-4.8%: LOP3 86 -> 18, the wait's XOR of 72 registers; IMAD 64 -> 32), 222 registers, no
//! spills.
//! Tried and removed (gemv16 round, commit c62c5bf): 15 with folded tails, a block's last round
//! of 2 tiles (14 = 4 + 4 + 4 + 2 on 28672 x 8192) at a warp's two consecutive chunk pairs
//! walked as one full step (7 steps per two chunk pairs instead of 8; the same bits, 244
//! registers). H200, 2026-11-30 16:54 UTC, gemv_batch16_ab on 28672 x 8192 (3 alternating
//! rounds x 3 processes, us at batch 16): 71.13-71.24 (median 71.19) against 15's 70.84-71.75
//! (median 71.21); paired, it won the three first rounds (where 15 ran 71.4-71.7) and lost 4 of
//! the 6 others by 0.01-0.35 us: a half-full step cost about half a full one, so the step count
//! is not what bounds this shape.
//! 16 (gemv18 round, 2026-11-30): 15 with block64 scales (a row's two chunk scales of a step as
//! one 8-byte load from the step's own address; no group load, no shuffle per chunk). SASS
//! (ptxas 13.0, sm_90a), whole kernel: 7344 instructions against 15's 7560 (SHFL 340 -> 212,
//! i.e. 16 per step body; ISETP 276 -> 236; LOP3 111 -> 69), 236 registers against 222, no
//! spills. Tried with it and removed: 17, 16 with unpredicated loads on steps whose tiles are all
//! in the block and all under n (one uniform branch per step, 237 registers): slower than 16 by
//! 1.6-4.0% on 28672 x 8192 (paired, 9 of 9 rounds; median 69.75 us against 67.94) and 1.1-1.6%
//! on 8192 x 8192 (H200, 2026-11-30 20:35 UTC, gemv_batch16_ab).
inline constexpr gemvm_stream_shape gemv_batch16_stream_candidates[] = {
    {16, 2, 8, 4},
    {16, 2, 16, 2},
    {16, 4, 16, 3},
    {16, 4, 12, 4},
    {16, 2, 8, 4, true, 0, true},
    {16, 2, 16, 2, true, 0, true},
    {16, 4, 12, 4, true, 0, true},
    {16, 2, 12, 2, true, 0, true, true},
    {12, 4, 8, 4, true, 0, true, true},
    {12, 4, 8, 4, true, 0, true, true, false, false, true},
    {12, 4, 8, 4, true, 0, true, true, true},
    {12, 4, 8, 4, true, 0, true, true, true, true, false, true},
    {12, 4, 8, 4, true, 0, true, true, true, true, true, true},
    {12, 4, 8, 4, true, 0, true, true, true, true, true, true, true},
    {12, 4, 8, 4, true, 0, true, true, true, true, false, true, true},
    {12, 4, 8, 4, true, 0, true, true, true, true, true, true, false, true},
    {12, 4, 8, 4, true, 0, true, true, true, true, true, true, false, true, true},
    // 17 (2026-12-01): 14 (two steps, x_slots) with lean steps and block64 scales
    {12, 4, 8, 4, true, 0, true, true, true, true, false, true, true, true, true}};
//! The shape batches 2 to 16 run with (blocks >= 64, k % 64 == 0) when a block owns at least 4
//! tiles (more than 3 * SMs tiles of 16 rows), plain scales: the pair shape {12, 4} / {8, 4}
//! (variant 39). Lead's integrated run (H200, 2026-11-29 19:55 UTC, copy 4164 GB/s, us per call;
//! 14336 x 4096 / 8192 x 8192 / 28672 x 8192): batch 4 14.63 / 15.91 / 62.22 against 15.66 /
//! 17.00 / 66.54 for {16, 4} / {12, 4} gs (variant 37, dispatched before), batch 16 19.39 / 19.85 /
//! 77.98 against 21.20 / 21.63 / 86.08: batch 16 / batch 1 (10.92 / 12.50 / 40.15) 1.78 / 1.59 /
//! 1.94 instead of 1.95 / 1.74 / 2.15. Nested scales at batches 2-8 (39 spills 164 bytes at batch
//! <= 8 there) and the weights the pair shape declines (k % 128 != 0, codes not 16-byte aligned)
//! run gemv_batch16_stream_unpaired; nested scales at batches 9-16 this shape or
//! gemv_batch16_stream_long (launch_gemvm_long). Else gemv_batch16_stream_short.
inline constexpr gemvm_stream_shape gemv_batch16_stream = gemv_batch16_stream_candidates[8];
//! Batches 9-16 with plain scales where a block owns more than 4 tiles (more than one step's;
//! 14336 x 4096: 7, 28672 x 8192: 14): the pair shape {8, 4} with x_once, stream_codes,
//! full_rounds and keep_x (candidate 12), when the launcher takes the weight (else
//! gemv_batch16_stream). Matmul round 8 (H200, 2026-11-30 06:56 UTC, copy 4195 GB/s, 200 calls
//! in one graph, us at batch 16): 14336 x 4096 18.25 / 28672 x 8192 73.04 against 19.40 / 76.35
//! for gemv_batch16_stream (candidate 8) in the same process; on 8192 x 8192 (4 tiles per
//! block: one step's) 20.36 against 19.63, hence the condition. Since gemv round 3 (H200,
//! 2026-11-30 14:01 UTC, commit fca07d3, bench gemv_batch16_ab: one weight per shape for the
//! process, 3 alternating rounds x 3 processes, us at batch 16): candidate 15, 12 with lean steps
//! (the same loads and fused multiply-adds: the same bits). 28672 x 8192: 15 72.61-73.76 (median
//! 72.94), 12 72.89-76.81 (median 75.41): -3.3%; paired with the 12 timed just before it, 15 was
//! 2.6-4.1% faster in 7 of 9 rounds and 1.0-1.2% slower in 2 (where 12 ran 72.9). Also not
//! slower where it is not dispatched: 14336 x 4096 20.28 against 20.79, 8192 x 8192 22.27
//! against 22.49 (medians). ncu (one cold launch, 28672 x 8192): 141.6 k active SM cycles
//! against 145.2 k.
inline constexpr gemvm_stream_shape gemv_batch16_stream_long = gemv_batch16_stream_candidates[15];
//! Where gemv_batch16_stream_long runs (blocks of more than 8 tiles), weights with plain scales in
//! blocks of 64 (8-byte aligned) take candidate 16, gemv_batch16_stream_long with block64 scales
//! (the same bits). gemv18 round (H200, 2026-11-30 20:35 UTC, commit c7093d7, copy 4235-4239
//! GB/s, bench gemv_batch16_ab: one kept weight per process, 15 / 16 / 17 in turn with the order
//! rotated each round, 3 rounds x 3 processes, us at batch 16): 28672 x 8192 16 67.16-68.67
//! (median 67.94) against 15's 70.13-71.38 (median 70.43), -3.5%, faster in 9 of 9 paired
//! rounds by 2.4-5.9%; 8192 x 8192 (not an x_once weight in the dispatch: 4 tiles per block)
//! 19.55 against 20.33, 9 of 9. Batch 1 in the same processes 33.99-34.15 us: batch 16 / batch
//! 1 1.99 instead of 2.06.
inline constexpr gemvm_stream_shape gemv_batch16_stream_long_b64 =
    gemv_batch16_stream_candidates[16];
//! Batches 9-16 with plain scales where a block owns more than one step's tiles but at most two
//! steps' (5 to 8 tiles: 14336 x 4096 on 132 SMs, 7): candidate 14, the long shape with the
//! activations in slots of their own (x_slots) and without full_rounds. Lead's integrated run
//! (H200, 2026-11-30 11:17 UTC, bench gemv_batch16_ab, 3 alternating rounds in one process, us at
//! batch 16): 14336 x 4096 17.42 / 17.51 / 17.48 against 18.04 / 18.16 / 18.16 for candidate 12
//! (-3.5%); on 28672 x 8192 (14 tiles, four steps) 75.82 / 75.47 / 75.87 against 72.83 / 72.77 /
//! 72.78 (+4%), and candidate 13 (x_slots with full_rounds) was slower on both, so more than two
//! steps keep candidate 12 (since gemv round 3, candidate 15: gemv_batch16_stream_long).
inline constexpr gemvm_stream_shape gemv_batch16_stream_two_steps =
    gemv_batch16_stream_candidates[14];
//! Where gemv_batch16_stream_two_steps runs (5 to 8 tiles per block), weights with plain scales
//! in blocks of 64 (8-byte aligned) take candidate 17: the same shape with lean steps and
//! block64 scales, as gemv_batch16_stream_long_b64 is to the long shape (the launcher declines
//! the other weights, which keep candidate 14). H200, 2026-12-01 08:03 UTC (bench
//! gemv_batch16_ab: one kept weight, 3 rounds x 2 processes, order rotated, us at batch 16):
//! 14336 x 4096 16.77 / 17.12 / 17.54 against 14's 17.49 / 18.01 / 18.56 in the same rounds
//! (-4.1 to -5.5%, both processes alike); on 8192 x 8192 (4 tiles per block: not dispatched
//! there) 19.48-20.05 against the pair shape's 19.55-19.62.
inline constexpr gemvm_stream_shape gemv_batch16_stream_two_steps_b64 =
    gemv_batch16_stream_candidates[17];
//! {16, 4} / {12, 4} with group_scales (variant 37), the fastest unpaired shape on 14336 x 4096 and
//! 8192 x 8192 at batches 4 and 16 and on 28672 x 8192 at batch 16 in the 19:27 UTC run above (at
//! batch 4 there {16, 2} gs was 2.7% faster).
inline constexpr gemvm_stream_shape gemv_batch16_stream_unpaired =
    gemv_batch16_stream_candidates[6];
//! Weights with fewer than 4 tiles per block (4096 rows on 132 SMs: 2): {16, 2} with
//! group_scales at both batches, the fastest above on 4096 x 4096 and 4096 x 14336.
inline constexpr gemvm_stream_shape gemv_batch16_stream_short = gemv_batch16_stream_candidates[5];

//! Bytes of gemvm_stream_kernel's partial sums: [warps][8 MT batch rows][16 R rows + 4] floats
//! (the padding makes the fragment stores and the reduction's reads conflict-free).
QMEM_HOST_DEVICE constexpr unsigned gemvm_partial_bytes(unsigned warps, int mt, int r) {
  return warps * static_cast<unsigned>(8 * mt) * static_cast<unsigned>(16 * r + 4) * 4u;
}

//! The loads of one step (R tiles at one chunk, or two with `Pair`, and their activations).
template <int R, int MT, bool Nested, bool Pair = false, bool Block64 = false>
struct gemvm_stage {
  //! 16 codes of rows g and g + 8 of each tile (Pair: 32, bytes 16t.. of two chunks)
  std::conditional_t<Pair, uint4, uint2> q[R][2];
  //! plain scale, or the nested group's absmax2; Block64: the bits of the step's two chunks'
  std::conditional_t<Block64, uint2, float> s[R][2];
  std::uint32_t qs[Nested ? R : 1][2]; //!< nested: the block's 8-bit scale code
  uint4 x[Pair ? 2 : 1][MT][2];        //!< 16 activations of batch rows g (MT 2: and g + 8)
};

//! `MT` 8-row halves of the batch, `R` tiles per step, at most `MaxWarps` warps.
//! Preconditions (the launcher's): 2 <= m <= 16 (MT = 1 for m <= 8), k % 64 == 0, k % block ==
//! 0, block >= 64, codes 8-byte and x 16-byte aligned, a power-of-two nested block size,
//! n * k / 64 < 2^32; blockDim.x == 32 * plan.col_groups, plan.col_groups <= plan.chunks.
template <class Code, class T, bool Nested, int MT, int R, int MaxWarps, bool Pdl,
          int PrefetchLines = 0, bool GroupScales = false, bool Pair = false, bool XOnce = false,
          bool StreamCodes = false, bool FullRounds = false, bool KeepX = false,
          bool XSlots = false, bool Lean = false, bool Block64 = false>
__global__ void __launch_bounds__(MaxWarps * 32, 1)
    gemvm_stream_kernel(gemv_args<T> a, code_table<16> values, code_table<256> nested,
                        gemvm_stream_plan plan) {
  static_assert(!Pair || GroupScales, "a pair step takes its two scales from a group");
  static_assert(!XSlots || (XOnce && KeepX), "activation slots of their own need x_once, keep_x");
  static_assert(!Lean || (Pair && XOnce), "lean steps are a pair x_once shape's");
  static_assert(!Block64 || (Lean && !Nested), "block64 scales are a lean plain-scale shape's");
  // (nested scales keep the former addresses and waits)
  constexpr bool LeanSteps = Lean && !Nested;
  // Nested scales in groups: each thread computes its own chunk's scale and the others take it by
  // shuffle (the compute step below), where the registers allow: 16 warps of R = 4 (128
  // registers) spilled 92 bytes with it and ran 12-14% slower at batch 4 (H200, 2026-12-01
  // 04:35 UTC, {16, 4} gs, batch 4: 20.62 / 22.06 / 84.29 us on 14336 x 4096 / 8192^2 / 28672 x
  // 8192 against 18.12 / 19.42 / 75.12); the pair and steps-outer shapes at batch 16 ran 4-6%
  // faster with it (long: 18.10 / 20.20 / 72.61 against 18.85 / 21.02 / 76.20)
  constexpr bool OwnScale = Nested && GroupScales && (MaxWarps <= 12 || R <= 2);
  constexpr unsigned P = Pair ? 2u : 1u; // chunks per step
  extern __shared__ __align__(16) unsigned char gemv_smem[];
  unsigned const C = plan.col_groups;
  constexpr unsigned stride = 16u * R + 4u; // floats between batch rows of the partial sums

  // layout: the table at a 64 KiB-aligned shared address (direct byte-permute addressing) when
  // the allocation allows, else at 0; the partial sums, the nested map and the T values after it.
  // XOnce: the sums of the block's tiles ([C warps][MT][32 lanes] float4 per tile), the first
  // `before` of them in the bytes before the table, the others after it
  auto const base = static_cast<std::uint32_t>(__cvta_generic_to_shared(gemv_smem));
  unsigned const tile_bytes = C * static_cast<unsigned>(MT) * 512u;
  unsigned lut_off = (0u - base) & 0xFFFFu;
  unsigned before = XOnce ? min(lut_off / tile_bytes, plan.per_block) : 0u;
  auto const sums_bytes = [&] {
    return XOnce ? (plan.per_block - before) * tile_bytes : gemvm_partial_bytes(C, MT, R);
  };
  bool const direct =
      lut_off + gemv_lut_bytes + sums_bytes() + gemv1_stream_extra_bytes(Nested) <= plan.smem;
  if (!direct) {
    lut_off = 0;
    before = 0;
  }
  std::uint32_t const lut_addr = base + lut_off;
  auto* const lut = reinterpret_cast<std::uint32_t*>(gemv_smem + lut_off);
  auto* const partial = reinterpret_cast<float*>(gemv_smem + lut_off + gemv_lut_bytes);
  float* const dyn = partial + sums_bytes() / 4u;
  // XOnce: tile j's (0: the block's first) sums
  auto const tile_sums = [&](unsigned j) {
    unsigned const off =
        j < before ? j * tile_bytes : lut_off + gemv_lut_bytes + (j - before) * tile_bytes;
    return reinterpret_cast<float4*>(gemv_smem + off);
  };

  unsigned const warp = threadIdx.x >> 5;
  unsigned const lane = threadIdx.x & 31u;
  unsigned const g = lane >> 2; // fragment row group
  unsigned const t = lane & 3u; // thread in group
  // this warp's chunks (whole steps) and this block's tiles
  unsigned const lo = P * (warp * (plan.chunks / P) / C);
  unsigned const hi = P * ((warp + 1) * (plan.chunks / P) / C);
  // Pair: the columns of this thread's 8 bytes in each chunk after the exchange (16 t' with t'
  // = t's two bits swapped: threads 0-3 hold bytes 0, 16, 8, 24)
  unsigned const xcol = 16u * (Pair ? ((t >> 1) | ((t & 1u) << 1)) : t);
  unsigned const t0 = blockIdx.x * plan.per_block;
  unsigned const t1 = min(t0 + plan.per_block, plan.tiles);
  unsigned const step_shift = a.block_shift - 6u; // log2(chunks per block)
  auto const n = static_cast<unsigned>(a.n);
  std::size_t const half_k = a.k / 2;
  auto const row_blocks = static_cast<std::uint32_t>(a.k >> a.block_shift);

  if constexpr (Pdl) {
    cuda_detail::pdl_allow_dependents();
    if constexpr (PrefetchLines > 0) {
      // lane l: rows l and l + 32 of the first round, from this warp's first chunk on
      QMEM_UNROLL
      for (unsigned j = lane; j < 16u * R; j += 32u) {
        unsigned const row = t0 * 16u + j;
        if (t0 + j / 16u < t1 && row < n) {
          unsigned char const* const c =
              a.codes + static_cast<std::size_t>(row) * half_k + std::size_t{32} * lo;
          QMEM_UNROLL
          for (int l = 0; l < PrefetchLines; ++l)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(c + 128 * l));
          std::uint32_t const blk = row * row_blocks + (lo >> step_shift);
          if constexpr (Nested)
            asm volatile("prefetch.global.L2 [%0];" ::"l"(a.scales.qabsmax + blk));
          else
            asm volatile("prefetch.global.L2 [%0];" ::"l"(a.scales.absmax + blk));
        }
      }
    }
    fill_gemv_tables<T, Nested>(lut, dyn, values, nested);
    cuda_detail::pdl_wait();
  }

  using stage = gemvm_stage<R, MT, Nested, Pair, Block64>;
  stage buf[2];
  // XSlots: the activations of the current chunk (slot xs) and of the next (slot 1 - xs); else
  // unused (each stage holds its own)
  uint4 xbuf[XSlots ? 2 : 1][P][MT][2];
  QMEM_UNROLL
  for (int s = 0; s < (XSlots ? 2 : 1); ++s)
    QMEM_UNROLL
  for (unsigned pc = 0; pc < P; ++pc)
    QMEM_UNROLL
  for (int mt = 0; mt < MT; ++mt)
    xbuf[s][pc][mt][0] = xbuf[s][pc][mt][1] = make_uint4(0, 0, 0, 0);
  // the activations a step in code slot S with activation slot X reads
  auto xs_of = [&](auto slot, auto xslot) -> uint4(&)[P][MT][2] {
    if constexpr (XSlots)
      return xbuf[decltype(xslot)::value];
    else
      return buf[decltype(slot)::value].x;
  };
  // never-loaded registers (rows past n or past the round, batch rows past m) stay finite: the
  // sums they enter are never stored, and x rows past m are zero
  QMEM_UNROLL
  for (int s = 0; s < 2; ++s) {
    QMEM_UNROLL
    for (int r = 0; r < R; ++r)
      QMEM_UNROLL
    for (int h = 0; h < 2; ++h) {
      buf[s].q[r][h] = {};
      buf[s].s[r][h] = {};
      if constexpr (Nested)
        buf[s].qs[r][h] = 0;
    }
    QMEM_UNROLL
    for (unsigned pc = 0; pc < P; ++pc)
      QMEM_UNROLL
    for (int mt = 0; mt < MT; ++mt)
      buf[s].x[pc][mt][0] = buf[s].x[pc][mt][1] = make_uint4(0, 0, 0, 0);
  }

  // the loads of chunk i of the round starting at tile tb into slot S (`dep`: always 0); KeepX and
  // not `fresh_x`: the activations are the other slot's (XSlots: already in activation slot X,
  // the one `fresh_x` loads into)
  auto load = [&](auto slot, auto xslot, unsigned tb, unsigned i, std::uint32_t dep, bool fresh_x) {
    constexpr int S = decltype(slot)::value;
    stage& st = buf[S];
    unsigned const chunk = i + dep;
    // GroupScales: thread t loads the scale of chunk (chunk & ~3) + t at a warp's first chunk of
    // a round and every 4th chunk; between those the slot keeps the other slot's (just waited for)
    bool const fresh = !GroupScales || XOnce || (i & 3u) == 0 || i == lo;
    unsigned const schunk = GroupScales ? (chunk & ~3u) + t : chunk;
    std::uint32_t const cblk = schunk >> step_shift;
    if constexpr (GroupScales) {
      if (!fresh) {
        QMEM_UNROLL
        for (int r = 0; r < R; ++r)
          QMEM_UNROLL
        for (int h = 0; h < 2; ++h) {
          st.s[r][h] = buf[1 - S].s[r][h];
          if constexpr (Nested)
            st.qs[r][h] = buf[1 - S].qs[r][h];
        }
      }
    }
    // (Block64: the step's own chunks, before plan.chunks: no test)
    [[maybe_unused]] bool const sin = fresh && schunk < plan.chunks;
    // LeanSteps: this thread's code and scale addresses of the step's row 0 (row tb * 16 + g)
    [[maybe_unused]] void const* lean_codes = nullptr;
    [[maybe_unused]] void const* lean_scales = nullptr;
    if constexpr (LeanSteps) {
      std::uint32_t const row0 = tb * 16u + g;
      lean_codes = row_address(a.codes + std::size_t{32} * chunk + 8 * P * t, row0,
                               static_cast<std::uint32_t>(half_k));
      lean_scales = row_address(a.scales.absmax + (Block64 ? chunk : cblk), row0, row_blocks * 4u);
    }
    QMEM_UNROLL
    for (int r = 0; r < R; ++r)
      QMEM_UNROLL
    for (int h = 0; h < 2; ++h) {
      unsigned const row = (tb + static_cast<unsigned>(r)) * 16u + 8u * h + g;
      bool const in = tb + static_cast<unsigned>(r) < t1 && row < n;
      if constexpr (LeanSteps) {
        auto const off = static_cast<std::uint32_t>(16 * r + 8 * h);
        auto const* const cp = static_cast<unsigned char const*>(
            row_address(lean_codes, off, static_cast<std::uint32_t>(half_k)));
        if constexpr (StreamCodes)
          ldg_pred_once(st.q[r][h], cp, in);
        else
          ldg_pred(st.q[r][h], cp, in);
        void const* const sp = row_address(lean_scales, off, row_blocks * 4u);
        if constexpr (Block64)
          ldg_pred(st.s[r][h], sp, in);
        else
          ldg_pred(st.s[r][h], static_cast<float const*>(sp), in && sin);
      } else {
        unsigned char const* const cp =
            a.codes + static_cast<std::size_t>(row) * half_k + std::size_t{32} * chunk + 8 * P * t;
        if constexpr (StreamCodes)
          ldg_pred_once(st.q[r][h], cp, in);
        else
          ldg_pred(st.q[r][h], cp, in);
        std::uint32_t const blk = row * row_blocks + cblk;
        if constexpr (Nested) {
          ldg_pred(st.qs[r][h], a.scales.qabsmax + blk, in && sin);
          ldg_pred(st.s[r][h], a.scales.absmax2 + (blk >> a.scales.nested_shift), in && sin);
        } else {
          ldg_pred(st.s[r][h], a.scales.absmax + blk, in && sin);
        }
      }
    }
    if constexpr (XSlots) {
      if (!fresh_x)
        return;
    }
    if (KeepX && !fresh_x) {
      QMEM_UNROLL
      for (unsigned pc = 0; pc < P; ++pc)
        QMEM_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        st.x[pc][mt][0] = buf[1 - S].x[pc][mt][0];
        st.x[pc][mt][1] = buf[1 - S].x[pc][mt][1];
      }
      return;
    }
    QMEM_UNROLL
    for (unsigned pc = 0; pc < P; ++pc)
      QMEM_UNROLL
    for (int mt = 0; mt < MT; ++mt) {
      unsigned const m = static_cast<unsigned>(mt) * 8u + g;
      auto const* p = reinterpret_cast<uint4 const*>(a.x + static_cast<std::size_t>(m) * a.k +
                                                     std::size_t{64} * (chunk + pc) + xcol);
      uint4(&xd)[P][MT][2] = xs_of(slot, xslot);
      ldg_pred(xd[pc][mt][0], p, m < a.m);
      ldg_pred(xd[pc][mt][1], p + 1, m < a.m);
    }
  };

  unsigned tb = t0; // the current round's first tile
  unsigned ci = lo; // the current chunk
  using zero_c = std::integral_constant<int, 0>;
  using one_c = std::integral_constant<int, 1>;
  if (tb < t1)
    load(zero_c{}, zero_c{}, tb, lo, 0, true);
  if constexpr (!Pdl)
    fill_gemv_tables<T, Nested>(lut, dyn, values, nested);

  auto body = [&](auto direct_c) {
    constexpr bool Direct = decltype(direct_c)::value;
    std::uint32_t const lane_word = Direct ? lut_addr | (lane * 4u) : lane * 4u;
    auto decode = [&](std::uint32_t word, int byte) -> std::uint32_t {
      std::uint32_t addr;
      if constexpr (Direct)
        addr = __byte_perm(word, lane_word, 0x7604u | (static_cast<unsigned>(byte) << 4));
      else
        addr =
            lut_addr + __byte_perm(word, lane_word, 0x5504u | (static_cast<unsigned>(byte) << 4));
      std::uint32_t v;
      asm("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(addr));
      return v;
    };

    float acc[R][MT][4];
    auto clear = [&] {
      QMEM_UNROLL
      for (int r = 0; r < R; ++r)
        QMEM_UNROLL
      for (int mt = 0; mt < MT; ++mt)
        acc[r][mt][0] = acc[r][mt][1] = acc[r][mt][2] = acc[r][mt][3] = 0.0f;
    };
    clear();

    // the products of the step in slot S, scaled, into acc; tiles past the block's last (in its
    // last round) are skipped: computing them doubled the time of R = 4 on 4096-row weights (2
    // tiles per block; H200, 2026-11-29 19:10 UTC, batch 4, 4096 x 14336: 23.1 us against 15.6
    // with R = 2)
    auto compute = [&](auto slot, auto xslot, auto partial_c) {
      constexpr bool Partial = decltype(partial_c)::value;
      stage const& st = buf[decltype(slot)::value];
      uint4 const(&xv)[P][MT][2] = xs_of(slot, xslot);
      // GroupScales: chunk c's scale is thread (g, c % 4)'s
      auto pick = [&](auto v, unsigned pc) {
        if constexpr (GroupScales)
          return __shfl_sync(0xFFFFFFFFu, v, static_cast<int>((lane & ~3u) | ((ci + pc) & 3u)));
        else
          return v;
      };
      QMEM_UNROLL
      for (int r = 0; r < R; ++r) {
        if (Partial && r > 0 && tb + static_cast<unsigned>(r) >= t1)
          break;
        // XOnce: the tile's sums so far (none at the warp's first step)
        [[maybe_unused]] float4* const sums =
            XOnce ? tile_sums(tb - t0 + static_cast<unsigned>(r)) : nullptr;
        if constexpr (XOnce) {
          QMEM_UNROLL
          for (int mt = 0; mt < MT; ++mt) {
            float4 const v = ci == lo ? make_float4(0.0f, 0.0f, 0.0f, 0.0f)
                                      : sums[(warp * MT + mt) * 32u + lane];
            acc[r][mt][0] = v.x;
            acc[r][mt][1] = v.y;
            acc[r][mt][2] = v.z;
            acc[r][mt][3] = v.w;
          }
        }
        // this thread's 8 code bytes of rows g and g + 8 in each chunk of the step; Pair: thread
        // t < 2 holds bytes 16t..16t+15 of the first chunk and t >= 2 of the second; each keeps
        // the 8 bytes of its own chunk at its column, trades the other 8 with thread t ^ 2
        uint2 wq[P][2];
        QMEM_UNROLL
        for (int h = 0; h < 2; ++h) {
          if constexpr (Pair) {
            uint4 const v = st.q[r][h];
            bool const first = t < 2u;
            std::uint32_t const r0 = __shfl_xor_sync(0xFFFFFFFFu, first ? v.z : v.x, 2);
            std::uint32_t const r1 = __shfl_xor_sync(0xFFFFFFFFu, first ? v.w : v.y, 2);
            wq[0][h] = first ? make_uint2(v.x, v.y) : make_uint2(r0, r1);
            wq[P - 1][h] = first ? make_uint2(r0, r1) : make_uint2(v.z, v.w);
          } else {
            wq[0][h] = st.q[r][h];
          }
        }
        // nested scales in a group (OwnScale): this thread's own chunk's scale of rows g and
        // g + 8, computed once per step here and shuffled as a float (one shuffle per chunk
        // instead of two, and one look-up, multiply and add instead of one per chunk; the same
        // values)
        [[maybe_unused]] float own[2];
        if constexpr (OwnScale) {
          QMEM_UNROLL
          for (int h = 0; h < 2; ++h)
            own[h] = fmath::add(fmath::mul(dyn[st.qs[r][h]], st.s[r][h]), a.scales.offset);
        }
        QMEM_UNROLL
        for (unsigned pc = 0; pc < P; ++pc) {
          float p[MT][4];
          QMEM_UNROLL
          for (int kk = 0; kk < 4; ++kk) {
            std::uint32_t const w0 = kk < 2 ? wq[pc][0].x : wq[pc][0].y;
            std::uint32_t const w1 = kk < 2 ? wq[pc][1].x : wq[pc][1].y;
            int const b = 2 * (kk & 1);
            std::uint32_t const frag[4] = {decode(w0, b), decode(w1, b), decode(w0, b + 1),
                                           decode(w1, b + 1)};
            QMEM_UNROLL
            for (int mt = 0; mt < MT; ++mt) {
              // activation words 2kk, 2kk + 1 go with code bytes 2kk, 2kk + 1
              std::uint32_t const b0 =
                  kk < 2 ? (&xv[pc][mt][0].x)[2 * kk] : (&xv[pc][mt][1].x)[2 * kk - 4];
              std::uint32_t const b1 =
                  kk < 2 ? (&xv[pc][mt][0].x)[2 * kk + 1] : (&xv[pc][mt][1].x)[2 * kk - 3];
              if (kk == 0)
                mma_16816_zero<T>(p[mt], frag, b0, b1);
              else
                mma_16816<T>(p[mt], frag, b0, b1);
            }
          }
          float sc[2];
          QMEM_UNROLL
          for (int h = 0; h < 2; ++h) {
            if constexpr (OwnScale)
              sc[h] = pick(own[h], pc);
            else if constexpr (Nested)
              sc[h] = fmath::add(fmath::mul(dyn[pick(st.qs[r][h], pc)], pick(st.s[r][h], pc)),
                                 a.scales.offset);
            else if constexpr (Block64)
              sc[h] = __uint_as_float(pc == 0 ? st.s[r][h].x : st.s[r][h].y);
            else
              sc[h] = pick(st.s[r][h], pc);
          }
          QMEM_UNROLL
          for (int mt = 0; mt < MT; ++mt) {
            acc[r][mt][0] = fmaf(sc[0], p[mt][0], acc[r][mt][0]);
            acc[r][mt][1] = fmaf(sc[0], p[mt][1], acc[r][mt][1]);
            acc[r][mt][2] = fmaf(sc[1], p[mt][2], acc[r][mt][2]);
            acc[r][mt][3] = fmaf(sc[1], p[mt][3], acc[r][mt][3]);
          }
        }
        if constexpr (XOnce) {
          QMEM_UNROLL
          for (int mt = 0; mt < MT; ++mt)
            sums[(warp * MT + mt) * 32u + lane] =
                make_float4(acc[r][mt][0], acc[r][mt][1], acc[r][mt][2], acc[r][mt][3]);
        }
      }
    };

    // FullRounds: without the per-tile test when the step's R tiles are all the block's
    auto compute_step = [&](auto slot, auto xslot) {
      if constexpr (FullRounds) {
        if (tb + R <= t1) {
          compute(slot, xslot, std::false_type{});
          return;
        }
      }
      compute(slot, xslot, std::true_type{});
    };

    // the round of tiles done .. done + R - 1 is complete in every warp's acc: add the warps'
    // sums per output in warp order and store y
    auto end_round = [&](unsigned done) {
      QMEM_UNROLL
      for (int r = 0; r < R; ++r)
        QMEM_UNROLL
      for (int mt = 0; mt < MT; ++mt) {
        float* const col = partial + (warp * 8u * MT + 8u * mt + 2u * t) * stride + 16u * r + g;
        col[0] = acc[r][mt][0];
        col[stride] = acc[r][mt][1];
        col[8] = acc[r][mt][2];
        col[stride + 8] = acc[r][mt][3];
      }
      __syncthreads();
      for (unsigned o = threadIdx.x; o < 16u * R * a.m; o += blockDim.x) {
        unsigned const rl = o % (16u * R);
        unsigned const m = o / (16u * R);
        unsigned const row = done * 16u + rl;
        if (row < n && done + rl / 16u < t1) {
          float sum = 0.0f;
          for (unsigned w = 0; w < C; ++w)
            sum += partial[(w * 8u * MT + m) * stride + rl];
          a.y[static_cast<std::size_t>(m) * a.n + row] = from_float<T>(sum);
        }
      }
      __syncthreads();
      clear();
    };

    // one step on slot S: wait for it (touch every register), load the next step into the other
    // slot (its addresses depend on the touch), compute it; a round ends after its last chunk
    // XSlots: activation slot X holds the step's, and flips when the next step is at another chunk
    [[maybe_unused]] unsigned xs = 0;
    auto step = [&](auto slot, auto xslot) {
      constexpr int S = decltype(slot)::value;
      stage const& st = buf[S];
      std::uint32_t dep = 0;
      if constexpr (LeanSteps) {
        // the step's last code word, scale and activation word (one per kind of load)
        std::uint32_t sw;
        if constexpr (Block64)
          sw = st.s[R - 1][1].y;
        else
          sw = __float_as_uint(st.s[R - 1][1]);
        dep = st.q[R - 1][1].w ^ sw ^ xs_of(slot, xslot)[P - 1][MT - 1][1].w;
      } else {
        QMEM_UNROLL
        for (int r = 0; r < R; ++r)
          QMEM_UNROLL
        for (int h = 0; h < 2; ++h) {
          dep ^= st.q[r][h].x ^ st.q[r][h].y ^ __float_as_uint(st.s[r][h]);
          if constexpr (Pair)
            dep ^= st.q[r][h].z ^ st.q[r][h].w;
          if constexpr (Nested)
            dep ^= st.qs[r][h];
        }
        QMEM_UNROLL
        for (unsigned pc = 0; pc < P; ++pc)
          QMEM_UNROLL
        for (int mt = 0; mt < MT; ++mt) {
          uint4 const(&xv)[2] = xs_of(slot, xslot)[pc][mt];
          dep ^= xv[0].x ^ xv[0].y ^ xv[0].z ^ xv[0].w ^ xv[1].x ^ xv[1].y ^ xv[1].z ^ xv[1].w;
        }
      }
      dep &= a.zero;
      if constexpr (XOnce) {
        // the block's next tiles at this step, else its first tiles at the warp's next step
        unsigned ntb = tb + R, ni = ci;
        if (ntb >= t1) {
          ntb = t0;
          ni = ci + P;
        }
        if (ni < hi)
          load(std::integral_constant<int, 1 - S>{},
               std::integral_constant<int, 1 - decltype(xslot)::value>{}, ntb, ni, dep, ni != ci);
        compute_step(slot, xslot);
        if constexpr (XSlots)
          xs ^= ni != ci ? 1u : 0u;
        ci = ni;
        tb = ntb;
      } else {
        unsigned ni = ci + P, ntb = tb;
        if (ni == hi) {
          ni = lo;
          ntb = tb + R;
        }
        if (ntb < t1)
          load(std::integral_constant<int, 1 - S>{}, xslot, ntb, ni, dep, true);
        compute_step(slot, xslot);
        ci = ni;
        if (ntb != tb) {
          end_round(tb);
          tb = ntb;
        }
      }
    };
    if constexpr (XOnce) {
      // XSlots: the step body of the current activation slot (a uniform branch per step)
      auto step_x = [&](auto slot) {
        if constexpr (XSlots) {
          if (xs != 0u) {
            step(slot, one_c{});
            return;
          }
        }
        step(slot, zero_c{});
      };
      if (tb < t1) {
        while (ci < hi) {
          step_x(zero_c{});
          if (ci < hi)
            step_x(one_c{});
        }
      }
      // every warp's sums of every tile are in: add them per output in warp order (as end_round)
      __syncthreads();
      unsigned const count = (t1 > t0 ? t1 - t0 : 0u) * static_cast<unsigned>(MT) * 32u;
      for (unsigned o = threadIdx.x; o < count; o += blockDim.x) {
        unsigned const l = o & 31u;
        unsigned const mt = (o >> 5) % static_cast<unsigned>(MT);
        unsigned const j = (o >> 5) / static_cast<unsigned>(MT);
        float4 const* const cell = tile_sums(j) + mt * 32u + l;
        float4 sum = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (unsigned w = 0; w < C; ++w) {
          float4 const v = cell[w * MT * 32u];
          sum.x += v.x;
          sum.y += v.y;
          sum.z += v.z;
          sum.w += v.w;
        }
        // fragment entries: rows g and g + 8 of tile j, batch rows 8 mt + 2 t and the next
        unsigned const row = (t0 + j) * 16u + (l >> 2);
        unsigned const m = 8u * mt + 2u * (l & 3u);
        auto put = [&](unsigned mm, unsigned rr, float v) {
          if (mm < a.m && rr < n)
            a.y[static_cast<std::size_t>(mm) * a.n + rr] = from_float<T>(v);
        };
        put(m, row, sum.x);
        put(m + 1u, row, sum.y);
        put(m, row + 8u, sum.z);
        put(m + 1u, row + 8u, sum.w);
      }
    } else {
      while (tb < t1) {
        step(zero_c{}, zero_c{});
        if (tb < t1)
          step(one_c{}, zero_c{});
      }
    }
  };
  if (direct)
    body(std::true_type{});
  else
    body(std::false_type{});
}

//! Any shape and alignment: one warp per weight row, lanes stride the columns, codes read one
//! nibble at a time. The same function as the fast path: T-rounded table values times
//! activations summed in fp32 per block (each lane keeps its own block's partial sum), the block
//! scale applied once to that sum. Serves k % 64 != 0 and unaligned views.
template <class Code, class T, bool Nested>
__global__ void __launch_bounds__(256)
    gemv_4bit_generic_kernel(gemv_args<T> a, code_table<16> values, code_table<256> nested) {
  __shared__ float table[16];
  __shared__ float dyn[Nested ? 256 : 1];
  for (unsigned i = threadIdx.x; i < 16; i += blockDim.x)
    table[i] = detail::mm::table_value<T>(values.value[i]);
  if constexpr (Nested)
    for (unsigned i = threadIdx.x; i < 256; i += blockDim.x)
      dyn[i] = nested.value[i];
  __syncthreads();
  unsigned const lane = threadIdx.x & 31;
  std::size_t const warps = static_cast<std::size_t>(gridDim.x) * (blockDim.x >> 5);
  for (std::size_t row =
           static_cast<std::size_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
       row < a.n; row += warps) {
    float acc[gemv_max_rows], part[gemv_max_rows];
    QMEM_UNROLL
    for (unsigned m = 0; m < gemv_max_rows; ++m)
      acc[m] = part[m] = 0.0f;
    std::size_t block = (row * a.k + lane) >> a.block_shift;
    for (std::size_t col = lane; col < a.k; col += 32) {
      std::size_t const f = row * a.k + col;
      if ((f >> a.block_shift) != block) {
        float const s = gemv_scale<Nested>(a.scales, block, dyn);
        QMEM_UNROLL
        for (unsigned m = 0; m < gemv_max_rows; ++m) {
          acc[m] = fmaf(s, part[m], acc[m]);
          part[m] = 0.0f;
        }
        block = f >> a.block_shift;
      }
      float const w = table[detail::nibble(a.codes, f)];
      QMEM_UNROLL
      for (unsigned m = 0; m < gemv_max_rows; ++m)
        if (m < a.m)
          part[m] = fmaf(to_float(a.x[m * a.k + col]), w, part[m]);
    }
    if (lane < a.k) {
      float const s = gemv_scale<Nested>(a.scales, block, dyn);
      QMEM_UNROLL
      for (unsigned m = 0; m < gemv_max_rows; ++m)
        acc[m] = fmaf(s, part[m], acc[m]);
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
__global__ void __launch_bounds__(256) dequant_4bit_kernel(dequant_args<T> a, code_table<16> values,
                                                           code_table<256> nested, bool vector_ok) {
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
        a.out[j] =
            from_float<T>(fmath::mul(table[detail::nibble(a.codes, j)],
                                     block_scale<Nested>(a.scales, j >> a.block_shift, dyn)));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// GEMV-style grad input: grad_x[m, k] = grad_y[m, n] * dequant(w)[n, k] for m <= 16

template <class T>
struct grad_args {
  T const* grad_y; //!< [m, n]
  std::uint8_t const* codes;
  scale_args scales;
  float* partial; //!< [slices, m, k]
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
  std::size_t const row_end =
      row_begin + a.rows_per_slice < a.n ? row_begin + a.rows_per_slice : a.n;
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
          w[c] = to_float(
              from_float<T>(fmath::mul(table[detail::nibble(a.codes, f)],
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
//! tuned: the one value measured, 8192 x 8192 batch 1 in 49-57 us on an H200, 2026-11-29, three
//! runs).
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
  std::size_t const row_end =
      row_begin + a.rows_per_slice < a.n ? row_begin + a.rows_per_slice : a.n;
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
                         std::int8_t const* b, std::int32_t const* outliers, Out* out,
                         int dense_cap) {
  // up to dense_cap outliers int8_outlier_epilogue_kernel writes the results
  if (outliers != nullptr && outliers[0] <= dense_cap)
    return;
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

//! The outlier columns gathered into dense fp32 blocks (when there are at most `cap`):
//! xo[r, o] = x[r, list[o]] and wo[c, o] = int8_weight_value(b[c, list[o]], col_scale[c]), the
//! operands the epilogue multiplies, exactly as it would read them in place.
template <class T>
__global__ void __launch_bounds__(256)
    gather_outliers_kernel(T const* x, std::int8_t const* b, float const* col_scale, std::size_t m,
                           std::size_t n, std::size_t k, std::int32_t const* list, int cap,
                           float* xo, float* wo) {
  int const count = list[0];
  if (count > cap || count == 0)
    return;
  std::size_t const total = (m + n) * static_cast<std::size_t>(count);
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    std::size_t const r = i / static_cast<std::size_t>(count);
    int const o = static_cast<int>(i % static_cast<std::size_t>(count));
    std::size_t const l = static_cast<std::size_t>(list[1 + o]);
    if (r < m)
      xo[r * static_cast<std::size_t>(cap) + static_cast<std::size_t>(o)] = to_float(x[r * k + l]);
    else {
      std::size_t const c = r - m;
      wo[c * static_cast<std::size_t>(cap) + static_cast<std::size_t>(o)] =
          detail::mm::int8_weight_value(b[c * k + l], col_scale[c]);
    }
  }
}

//! Output tile of the dense outlier epilogue: 64 x 64 outputs per block of 256 threads (4 x 4
//! each), outlier columns staged 32 at a time. Measured on 8192 x 8192 at batch 4096 with 64
//! outlier columns, one H200, 2026-11-29: the whole layer 0.851 ms with these tiles, 1.107 ms with
//! 128 x 128 tiles of 8 x 8 per thread (142 registers: one block per SM), 0.552 ms without
//! outliers.
inline constexpr int outlier_tile = 64;
inline constexpr int outlier_per_thread = outlier_tile / 16;
inline constexpr int outlier_chunk = 32;

//! out = epilogue(acc) plus the outlier product from the dense blocks: per output the same
//! operations in the same order as int8_epilogue_kernel (ascending outlier columns, fused
//! multiply-adds), so the results are bit for bit the host's; but the operands come from shared
//! memory, each loaded once per tile. Does nothing when there are more than `cap` outliers.
template <class Out>
__global__ void __launch_bounds__(256)
    int8_outlier_epilogue_kernel(std::int32_t const* acc, float const* row_scale,
                                 float const* col_scale, std::size_t m, std::size_t n,
                                 std::int32_t const* list, int cap, float const* xo,
                                 float const* wo, Out* out) {
  int const count = list[0];
  if (count > cap)
    return;
  __shared__ float xs[outlier_tile][outlier_chunk + 1];
  __shared__ float ws[outlier_tile][outlier_chunk + 1];
  int const tx = static_cast<int>(threadIdx.x % 16), ty = static_cast<int>(threadIdx.x / 16);
  std::size_t const c0 = static_cast<std::size_t>(blockIdx.x) * outlier_tile;
  for (std::size_t r0 = static_cast<std::size_t>(blockIdx.y) * outlier_tile; r0 < m;
       r0 += static_cast<std::size_t>(gridDim.y) * outlier_tile) {
    constexpr int P = outlier_per_thread;
    float v[P][P];
    QMEM_UNROLL
    for (int i = 0; i < P; ++i)
      QMEM_UNROLL
    for (int j = 0; j < P; ++j) {
      std::size_t const r = r0 + static_cast<std::size_t>(ty + 16 * i);
      std::size_t const c = c0 + static_cast<std::size_t>(tx + 16 * j);
      v[i][j] = r < m && c < n
                    ? detail::mm::int8_epilogue(acc[r * n + c], row_scale[r], col_scale[c])
                    : 0.0f;
    }
    for (int o0 = 0; o0 < count; o0 += outlier_chunk) {
      int const len = count - o0 < outlier_chunk ? count - o0 : outlier_chunk;
      for (int i = static_cast<int>(threadIdx.x); i < outlier_tile * outlier_chunk; i += 256) {
        int const row = i / outlier_chunk, o = i % outlier_chunk;
        std::size_t const r = r0 + static_cast<std::size_t>(row);
        std::size_t const c = c0 + static_cast<std::size_t>(row);
        bool const in = o < len;
        xs[row][o] = in && r < m
                         ? xo[r * static_cast<std::size_t>(cap) + static_cast<std::size_t>(o0 + o)]
                         : 0.0f;
        ws[row][o] = in && c < n
                         ? wo[c * static_cast<std::size_t>(cap) + static_cast<std::size_t>(o0 + o)]
                         : 0.0f;
      }
      __syncthreads();
      for (int o = 0; o < len; ++o) {
        float xr[P], wr[P];
        QMEM_UNROLL
        for (int i = 0; i < P; ++i) {
          xr[i] = xs[ty + 16 * i][o];
          wr[i] = ws[tx + 16 * i][o];
        }
        QMEM_UNROLL
        for (int i = 0; i < P; ++i)
          QMEM_UNROLL
        for (int j = 0; j < P; ++j)
          v[i][j] = fmaf(xr[i], wr[j], v[i][j]);
      }
      __syncthreads();
    }
    QMEM_UNROLL
    for (int i = 0; i < P; ++i)
      QMEM_UNROLL
    for (int j = 0; j < P; ++j) {
      std::size_t const r = r0 + static_cast<std::size_t>(ty + 16 * i);
      std::size_t const c = c0 + static_cast<std::size_t>(tx + 16 * j);
      if (r < m && c < n)
        out[r * n + c] = from_float<Out>(v[i][j]);
    }
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
__global__ void __launch_bounds__(256)
    outlier_flags_kernel(T const* x, std::size_t count, std::size_t k, float threshold,
                         std::uint32_t* flags) {
  for (std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    if (detail::mm::is_outlier(to_float(x[i]), threshold))
      flags[i % k] = 1u;
}

//! list = {count, flagged columns ascending}: one block of `Threads` scans the flags.
template <int Threads>
__global__ void __launch_bounds__(Threads)
    outlier_list_kernel(std::uint32_t const* flags, std::size_t k, std::int32_t* list) {
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
    quantize_rows_int8_kernel(T const* x, std::size_t k, std::uint32_t const* flags, std::int8_t* q,
                              float* row_scale) {
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

//! Whether the fast GEMV kernel serves this weight: rows of whole 64-column steps that start on a
//! block (k a multiple of 64 and of the block size), codes 8-byte and x 16-byte aligned.
inline bool gemv_fast_path(std::size_t k, std::size_t block, void const* codes,
                           void const* x) noexcept {
  return k % 64 == 0 && k % block == 0 && reinterpret_cast<std::uintptr_t>(codes) % 8 == 0 &&
         aligned16(x);
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
  bool const vector_ok =
      reinterpret_cast<std::uintptr_t>(w.codes.data()) % 4 == 0 && aligned16(out);
  unsigned const grid = grid_for(w.elements(), 256 * 8);
  if (w.scales.nested())
    dequant_4bit_kernel<Code, T, true>
        <<<grid, 256, 0, e.stream>>>(a, values_of<Code>(), nested_values(), vector_ok);
  else
    dequant_4bit_kernel<Code, T, false>
        <<<grid, 256, 0, e.stream>>>(a, values_of<Code>(), nested_values(), vector_ok);
  cuda_detail::check_launch(e, "qmem::quant::dequant_4bit_kernel");
}

//! A side stream and events per device and host thread, for the overlapped dequantize + GEMM
//! (created on first use, capture-safe; destroyed with the thread).
struct overlap_resources {
  cudaStream_t side = nullptr;
  std::vector<cudaEvent_t> events;
  overlap_resources() = default;
  overlap_resources(overlap_resources const&) = delete;
  overlap_resources& operator=(overlap_resources const&) = delete;
  ~overlap_resources() {
    for (cudaEvent_t ev : events)
      (void)cudaEventDestroy(ev);
    if (side != nullptr)
      (void)cudaStreamDestroy(side);
  }
};

inline overlap_resources& overlap_for(int device, std::size_t events) {
  thread_local overlap_resources per_device[64];
  QMEM_EXPECTS(device >= 0 && device < 64, "e.device is ", device, "; expected 0..63");
  overlap_resources& r = per_device[device];
  if (r.side == nullptr || r.events.size() < events) {
    relaxed_capture_scope const relaxed;
    if (r.side == nullptr)
      cuda_detail::check(cudaStreamCreateWithFlags(&r.side, cudaStreamNonBlocking),
                         "cudaStreamCreateWithFlags");
    while (r.events.size() < events) {
      cudaEvent_t ev = nullptr;
      cuda_detail::check(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming),
                         "cudaEventCreateWithFlags");
      r.events.push_back(ev);
    }
  }
  return r;
}

//! Rows per chunk of the overlapped path: rows / chunks rounded up to whole blocks, whole nested
//! groups (a chunk's scales start at a group) and 8 rows.
inline std::size_t overlap_chunk_rows(std::size_t rows, std::size_t cols, std::size_t block,
                                      std::size_t nested_block, unsigned chunks) {
  std::size_t const group = block * (nested_block == 0 ? 1 : nested_block);
  // rows * cols % group == 0, and a multiple of 8 rows (a chunk's output columns start on 16
  // bytes)
  std::size_t const quantum = std::lcm(group / std::gcd(cols, group), std::size_t{8});
  std::size_t const want = (rows + chunks - 1) / chunks;
  return (want + quantum - 1) / quantum * quantum;
}

//! Row chunks of the m > 16 forward (dequantize_gemm): 1 runs one dequantization, then one GEMM;
//! more overlap the dequantization of a chunk with the previous chunk's GEMM on a side stream.
//! Measured slower than one chunk on all three anchor shapes (H200, 2026-11-29 13:38-13:48 UTC,
//! the lead's integrated run, bench gemm_overlap, batch 4096, ratio to cuBLAS bf16 in the same
//! run, chunks 1 / 2 / 4 / 8 on 8192 x 8192: 1.050 / 1.050 / 1.074 / 1.081; docs/benchmarks.md):
//! the smaller GEMMs on the side stream lose more than the overlap saves, so the dispatched path
//! keeps 1.
inline constexpr unsigned gemm_overlap_chunks = 1;

//! The rows w[r0, r0 + rows) of a 4-bit weight as a weight of their own. Precondition: r0 * cols
//! is a multiple of the block size times the nested block size (when nested), so that the slice's
//! scales start at a block and a nested group (overlap_chunk_rows and l2_chunk_rows ensure it).
template <class Code>
weight_4bit_view<Code> row_slice(weight_4bit_view<Code> const& w, std::size_t r0,
                                 std::size_t rows) {
  std::size_t const e0 = r0 * w.cols; // a multiple of the block size (and of 2)
  weight_4bit_view<Code> part = w;
  part.rows = rows;
  part.codes = w.codes.subview(e0 / 2, (rows * w.cols + 1) / 2);
  std::size_t const b0 = e0 / w.block_size;
  std::size_t const blocks = (rows * w.cols + w.block_size - 1) / w.block_size;
  if (w.scales.nested()) {
    std::size_t const g0 = b0 / w.scales.nested_block_size;
    std::size_t const groups =
        (blocks + w.scales.nested_block_size - 1) / w.scales.nested_block_size;
    part.scales.qabsmax = w.scales.qabsmax.subview(b0, blocks);
    part.scales.absmax2 = w.scales.absmax2.subview(g0, groups);
  } else {
    part.scales.absmax = w.scales.absmax.subview(b0, blocks);
  }
  return part;
}

//! y[m, n] = x[m, k] * dequant(w)^T for m > 16: the weight dequantized into `wd` (n * k elements
//! of T, the workspace), then cuBLASLt. `chunks` > 1 splits the rows of w: chunk i + 1 is
//! dequantized on e.stream while chunk i's GEMM runs on a side stream (events order them; e.stream
//! waits for the last GEMM, so the call stays stream-ordered and capturable). Every output is the
//! same fp32 dot product as with one chunk (cuBLASLt may pick another algorithm per chunk: the
//! sum order, not the terms, can differ).
template <class T, class Code>
void dequantize_gemm(exec::cuda const& e, T const* x, std::size_t m,
                     weight_4bit_view<Code> const& w, T* y, T* wd, std::byte* lt_ws,
                     std::size_t lt_ws_bytes, unsigned chunks) {
  std::size_t const n = w.rows, k = w.cols;
  std::size_t const per =
      chunks > 1 ? overlap_chunk_rows(n, k, w.block_size,
                                      w.scales.nested() ? w.scales.nested_block_size : 0, chunks)
                 : n;
  if (chunks <= 1 || per >= n) {
    dequantize_into(e, w, wd);
    lt_matmul_or_throw(e, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, data_type<T>, wd, x, data_type<T>, y,
                       lt_ws, lt_ws_bytes);
    return;
  }
  std::size_t const count = (n + per - 1) / per;
  overlap_resources& r = overlap_for(e.device, count + 2);
  exec::cuda const side{r.side, e.device, e.sync_after_launch};
  // the side stream starts after the work already on e.stream
  cuda_detail::check(cudaEventRecord(r.events[0], e.stream), "cudaEventRecord");
  cuda_detail::check(cudaStreamWaitEvent(r.side, r.events[0], 0), "cudaStreamWaitEvent");
  for (std::size_t c = 0; c < count; ++c) {
    std::size_t const r0 = c * per;
    std::size_t const rows = n - r0 < per ? n - r0 : per;
    std::size_t const e0 = r0 * k;
    dequantize_into(e, row_slice(w, r0, rows), wd + e0);
    cuda_detail::check(cudaEventRecord(r.events[1 + c], e.stream), "cudaEventRecord");
    cuda_detail::check(cudaStreamWaitEvent(r.side, r.events[1 + c], 0), "cudaStreamWaitEvent");
    // y[:, r0 : r0 + rows] is column-major rows x m with leading dimension n
    lt_matmul_or_throw(side, CUBLAS_OP_T, CUBLAS_OP_N, rows, m, k, data_type<T>, wd + e0, x,
                       data_type<T>, y + r0, lt_ws, lt_ws_bytes, n);
  }
  cuda_detail::check(cudaEventRecord(r.events[1 + count], r.side), "cudaEventRecord");
  cuda_detail::check(cudaStreamWaitEvent(e.stream, r.events[1 + count], 0), "cudaStreamWaitEvent");
}

//! Rows per chunk of the L2-resident path (dequantize_gemm_l2) for a chunk buffer of at most
//! `bytes` (elements of `elem` bytes): whole quanta as in overlap_chunk_rows (at least one quantum,
//! whatever `bytes`), then evened out over the chunks that takes so that the last chunk's GEMM is
//! not a sliver. At most `rows`.
inline std::size_t l2_chunk_rows(std::size_t rows, std::size_t cols, std::size_t block,
                                 std::size_t nested_block, std::size_t bytes, std::size_t elem) {
  std::size_t const group = block * (nested_block == 0 ? 1 : nested_block);
  std::size_t const quantum = std::lcm(group / std::gcd(cols, group), std::size_t{8});
  std::size_t const fit = bytes / (cols * elem) / quantum * quantum;
  std::size_t const per = fit < quantum ? quantum : fit;
  if (per >= rows)
    return rows;
  std::size_t const count = (rows + per - 1) / per;
  std::size_t const even = (rows + count - 1) / count;
  return (even + quantum - 1) / quantum * quantum;
}

//! Bytes of the chunk buffer of the L2-resident forward; 0 keeps the one-shot dequantize_gemm.
//! Measured slower at every chunk size on all three anchor shapes (H200, L2 60 MiB, 2026-11-30
//! 10:10 UTC, bench gemm_l2, batch 4096, median of 3 repetitions, ratio to cuBLAS bf16 in the same
//! process; one-shot 1.02-1.06): 4096^2 1.356 / 1.171 / 1.145 / 1.076 with 8 / 4 / 3 / 2 chunks
//! (4-16 MiB); 14336 x 4096 1.417 / 1.241 / 1.243 / 1.136 / 1.102 / 1.176 with 28 / 14 / 10 / 7 /
//! 5 / 4 chunks (4-28 MiB); 8192^2 1.710 / 1.230 / 1.198 / 1.132 / 1.118 / 1.104 with 32 / 16 /
//! 11 / 8 / 6 / 4 chunks (4-32 MiB). The smaller GEMMs (wave quantization, one heuristic per
//! chunk, the output written in strided column blocks) cost far more than the 3-5% the
//! dequantization's DRAM writes cost, so 0 stays.
inline constexpr std::size_t gemm_l2_chunk_bytes = 0;

//! y[m, n] = x[m, k] * dequant(w)^T for m > 16, in row chunks of `chunk_rows` rows of w, each
//! dequantized into the same buffer `chunk` (chunk_rows * k elements of T, small enough to stay in
//! the L2 cache) and multiplied by cuBLASLt right after, all on e.stream: the dequantization
//! writes into L2 rather than DRAM and the GEMM reads the chunk back from L2. Stream order makes
//! the reuse safe (chunk c + 1 is written after chunk c's GEMM). Every output is the same fp32 dot
//! product over the same weights as in the one-shot path (the algorithm, hence the sum order, may
//! differ per chunk). Precondition: chunk_rows as l2_chunk_rows gives it (whole quanta), > 0.
template <class T, class Code>
void dequantize_gemm_l2(exec::cuda const& e, T const* x, std::size_t m,
                        weight_4bit_view<Code> const& w, T* y, T* chunk, std::size_t chunk_rows,
                        std::byte* lt_ws, std::size_t lt_ws_bytes) {
  std::size_t const n = w.rows, k = w.cols;
  for (std::size_t r0 = 0; r0 < n; r0 += chunk_rows) {
    std::size_t const rows = n - r0 < chunk_rows ? n - r0 : chunk_rows;
    dequantize_into(e, row_slice(w, r0, rows), chunk);
    // y[:, r0 : r0 + rows] is column-major rows x m with leading dimension n
    lt_matmul_or_throw(e, CUBLAS_OP_T, CUBLAS_OP_N, rows, m, k, data_type<T>, chunk, x,
                       data_type<T>, y + r0, lt_ws, lt_ws_bytes, n);
  }
}

//! Whether matmul_4bit sends its m > 16 forward to the fused sm_90a GEMM (detail/gemm_sm90.cuh,
//! variant gemm_sm90_variant) where it runs and takes the shape. Off: a tested candidate, slower
//! than dequantize + cuBLASLt (H200, 2026-11-30 22:23 UTC, batch 4096, NF4, bf16, ratio to cuBLAS
//! bf16 in the same run on 4096^2 / 14336 x 4096 / 8192^2, two processes: variant 10 1.24-1.25 /
//! 1.24 / 1.23-1.27, dispatched path 1.08 / 1.02-1.07 / 1.02-1.07; 10:43 UTC, variant 0 1.44-1.57).
//! Turn it on only when bench gemm_fused beats the `gemm` rows on all three shapes.
inline constexpr bool gemm_sm90_dispatch = false;

//! The fused kernel fused_gemm runs by default (sm90::launch's variants): 10, the staged kernel
//! (codes by TMA and scales by the producer warpgroup into the ring, the weight decoded into
//! wgmma's register A operand), persistent, with the TMA-store epilogue: the fastest of variants
//! 0, 3, 4, 5, 6 (4-6 since removed), 10 and the rejected register-table ones on the three anchor
//! shapes (H200, 2026-11-30 22:08 and 22:23 UTC, docs/benchmarks.md, "gemm10": 1.23-1.27x cuBLAS
//! against 5's 1.28-1.43, 3's 1.55-1.68, 0's 1.44-1.57).
inline constexpr int gemm_sm90_variant = 10;

//! y[m, n] = x[m, k] * dequant(w)^T through the fused sm_90a GEMM, stream-ordered on e.stream.
//! Returns false, launching nothing, when it cannot serve the call: the kernel not built for
//! sm_90a or the device not compute capability 9.0 (sm90::runnable; also while e.stream is
//! capturing before the first uncaptured call has probed the device), or the shape or alignment
//! outside sm90::fits. Preconditions: those of matmul_4bit (checked there).
//! `Variant`: sm90::launch's (0, 3 and 10 products, tested; 1, 2 and 7 bench-only variants that
//! place the time: no decode, no MMAs, the staged kernel without the decode).
template <class T, class Code, int Variant = gemm_sm90_variant>
bool fused_gemm(exec::cuda const& e, T const* x, std::size_t m, weight_4bit_view<Code> const& w,
                T* y) {
  scale_args const s = make_scale_args(w.scales);
  bool const nested = w.scales.nested();
  if (!sm90::fits(m, w.rows, w.cols, w.block_size, nested, s.nested_shift, w.codes.data(), x))
    return false;
  sm90::gemm_args<T> const a{w.codes.data(),
                             s.absmax,
                             s.qabsmax,
                             s.absmax2,
                             s.offset,
                             nested ? static_cast<unsigned>(s.nested_shift) : 0u,
                             static_cast<unsigned>(detail::mm::log2_exact(w.block_size)),
                             y,
                             static_cast<unsigned>(m),
                             static_cast<unsigned>(w.rows),
                             static_cast<unsigned>(w.cols)};
  if (nested) {
    if (!sm90::runnable<T, true>(e.device, e.stream))
      return false;
    sm90::launch<T, true, Variant>(e, x, a, values_of<Code>(), nested_values());
  } else {
    if (!sm90::runnable<T, false>(e.device, e.stream))
      return false;
    sm90::launch<T, false, Variant>(e, x, a, values_of<Code>(), nested_values());
  }
  return true;
}

//! Lets `Kernel` use `bytes` of dynamic shared memory on `device` (once per kernel and device;
//! safe when that first use is inside a stream capture, whatever its mode).
template <auto Kernel>
void allow_dynamic_smem(int device, unsigned bytes) {
  static std::once_flag flags[64];
  QMEM_EXPECTS(device >= 0 && device < 64, "e.device is ", device, "; expected 0..63");
  std::call_once(flags[device], [&] {
    relaxed_capture_scope const relaxed;
    cuda_detail::check(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(bytes)),
                       "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  });
}

//! Blocks of `Kernel` resident on one SM of `device` times the SMs (once per kernel and device):
//! the grid of a kernel that loops over its tiles. Safe on a first use inside a stream capture.
template <auto Kernel>
unsigned resident_blocks(int device, int threads, unsigned smem) {
  static std::once_flag flags[64];
  static unsigned counts[64];
  QMEM_EXPECTS(device >= 0 && device < 64, "e.device is ", device, "; expected 0..63");
  std::call_once(flags[device], [&] {
    relaxed_capture_scope const relaxed;
    int per_sm = 0, sms = 0;
    cuda_detail::check(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, smem),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
    cuda_detail::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                       "cudaDeviceGetAttribute(MultiProcessorCount)");
    counts[device] = static_cast<unsigned>((per_sm > 0 ? per_sm : 1) * sms);
  });
  return counts[device];
}

//! Launches the batch-1 GEMV kernel with a given block shape (the bench and the tests compare
//! shapes). Preconditions (the caller's): m == 1, k % 64 == 0, k % block == 0, block >= 64,
//! a power-of-two nested block size, codes 8-byte and x 16-byte aligned.
template <class Code, class T, bool Nested, gemv1_shape Shape>
void launch_gemv1_fast(exec::cuda const& e, gemv_args<T> const& a) {
  auto run = [&](auto block64) {
    constexpr auto kernel =
        &gemv1_4bit_kernel<Code, T, Nested, Shape.warps, Shape.unroll, Shape.pairs, Shape.pipelined,
                           Shape.direct_lut, gemv1_min_blocks(Shape), decltype(block64)::value>;
    constexpr unsigned smem = gemv1_smem_bytes<Nested, Shape.warps, Shape.pairs>();
    allow_dynamic_smem<kernel>(e.device, smem);
    auto const tiles = static_cast<unsigned>((a.n + 2 * Shape.pairs - 1) / (2 * Shape.pairs));
    unsigned const resident = resident_blocks<kernel>(e.device, Shape.warps * 32, smem);
    unsigned const grid = tiles < resident ? tiles : resident;
    kernel<<<grid, Shape.warps * 32, smem, e.stream>>>(a, values_of<Code>(), nested_values(),
                                                       tiles);
    cuda_detail::check_launch(e, "qmem::quant::gemv1_4bit_kernel");
  };
  if (a.block_shift == 6)
    run(std::true_type{});
  else
    run(std::false_type{});
}

//! Multiprocessors of `device` (queried once per device; safe inside a stream capture).
inline unsigned multiprocessors(int device) {
  static std::once_flag flags[64];
  static unsigned counts[64];
  QMEM_EXPECTS(device >= 0 && device < 64, "e.device is ", device, "; expected 0..63");
  std::call_once(flags[device], [&] {
    relaxed_capture_scope const relaxed;
    int sms = 0;
    cuda_detail::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                       "cudaDeviceGetAttribute(MultiProcessorCount)");
    counts[device] = static_cast<unsigned>(sms > 0 ? sms : 1);
  });
  return counts[device];
}

//! The streaming kernel's plan for an n x k weight on `sms` multiprocessors, and in `j` its
//! super-steps per warp: the least J of 1, 2, 4 (from `min_j` on) whose C = ceil(super-steps / J)
//! column groups fit in `max_warps` and whose partial sums for a block's share of the row pairs
//! fit in `room` bytes (one tile per block); else the largest J that fits, in several tiles;
//! j = 0 when k is too long (C > max_warps at J = 4).
inline gemv1_stream_plan gemv1_stream_plan_for(std::size_t n, std::size_t k, int max_warps,
                                               unsigned room, unsigned sms, unsigned& j,
                                               unsigned min_j = 1) {
  auto const supers = static_cast<unsigned>((k / 64 + 7) / 8);
  auto const warps = static_cast<unsigned>(max_warps);
  gemv1_stream_plan p{};
  p.pairs = static_cast<unsigned>((n + 1) / 2);
  unsigned const per_block = (p.pairs + sms - 1) / sms;
  j = 0;
  for (unsigned cand = min_j; cand <= 4; cand *= 2) {
    unsigned const groups = (supers + cand - 1) / cand;
    if (groups > warps)
      continue;
    j = cand;
    if (per_block <= room / (groups * 64u))
      break;
  }
  if (j == 0)
    return p;
  p.col_groups = (supers + j - 1) / j;
  p.row_groups = warps / p.col_groups;
  unsigned const cap = room / (p.col_groups * 64u);
  unsigned const passes = (per_block + cap - 1) / cap;
  p.tile_pairs = (per_block + passes - 1) / passes;
  p.tiles = (p.pairs + p.tile_pairs - 1) / p.tile_pairs;
  return p;
}

//! Launches the streaming batch-1 kernel with a given shape; false (nothing launched) when the
//! weight does not suit it (k > 2048 * shape.warps, n * k / 64 >= 2^32, nested scales with an
//! async shape; block64 shapes: blocks other than 64, and with nested scales a nested block that
//! is not a power of two). Preconditions (the caller's): those of launch_gemv1_fast. `plan_sms`:
//! multiprocessors to plan for, 0 for the device's (the tests plan for fewer to make blocks loop
//! over several tiles).
template <class Code, class T, bool Nested, gemv1_stream_shape Shape>
bool launch_gemv1_stream(exec::cuda const& e, gemv_args<T> const& a, unsigned plan_sms = 0) {
  if constexpr (Shape.async && Nested) {
    return false;
  } else {
    if (a.n * (a.k >> 6) >= (std::size_t{1} << 32))
      return false;
    if (Shape.block64 && (a.block_shift != 6 || (Nested && a.scales.nested_shift < 0)))
      return false; // (with nested scales the absmax2 group of a block is one shift)
    unsigned const sms = plan_sms != 0 ? plan_sms : multiprocessors(e.device);
    unsigned const extra =
        gemv1_stream_extra_bytes(Nested) +
        gemv1_stream_exchange_bytes(gemv1_stream_spreads(Nested, Shape.spread, Shape.block64) &&
                                        Shape.min_j <= 2,
                                    Shape.warps); // (J = 2 only; J is planned below)
    // the partial sums go before the table (register ring) or after it (async ring)
    unsigned const room =
        Shape.async ? gemv1_stream_smem_limit - gemv1_stream_prefix - gemv_lut_bytes - extra
                    : gemv1_stream_prefix - extra;
    unsigned j = 0;
    gemv1_stream_plan p = gemv1_stream_plan_for(a.n, a.k, Shape.warps, room, sms, j,
                                                static_cast<unsigned>(Shape.min_j));
    if (j == 0)
      return false;
    unsigned const threads = 32u * p.col_groups * p.row_groups;
    unsigned const side = p.tile_pairs * p.col_groups * 64u + extra;
    p.smem = gemv1_stream_prefix + gemv_lut_bytes + (Shape.async ? side : 0u);
    if (Shape.async &&
        static_cast<unsigned>(gemv1_stream_ring(Shape.depth, static_cast<int>(j), Nested, true)) *
                threads * gemv1_stream_slot_bytes(static_cast<int>(j)) >
            gemv1_stream_prefix)
      return false; // the staging ring would not fit before the table
    bool const full = a.k == std::size_t{512} * j * p.col_groups;
    unsigned const grid = p.tiles < sms ? p.tiles : sms;
    auto run = [&](auto jc, auto fullc) {
      constexpr auto kernel = &gemv1_stream_kernel < Code, T, Nested, decltype(jc)::value,
                     Shape.depth, Shape.warps, decltype(fullc)::value, Shape.async, Shape.grouped,
                     Shape.pdl, Shape.pdl ? Shape.prefetch_kib : 0, Shape.stream_codes, Shape.lean,
                     Shape.block64, Shape.spread > ;
      allow_dynamic_smem<kernel>(e.device, gemv1_stream_smem_limit);
      cuda_detail::launch(e, Shape.pdl, kernel, dim3(grid), dim3(threads), p.smem,
                          "qmem::quant::gemv1_stream_kernel", a, values_of<Code>(), nested_values(),
                          p);
    };
    auto with_full = [&](auto jc) {
      if (full)
        run(jc, std::true_type{});
      else
        run(jc, std::false_type{});
    };
    if (j == 1)
      with_full(std::integral_constant<int, 1>{});
    else if (j == 2)
      with_full(std::integral_constant<int, 2>{});
    else
      with_full(std::integral_constant<int, 4>{});
    return true;
  }
}

//! Launches the bulk-copy batch-1 kernel with a given shape; false (nothing launched) when the
//! weight does not suit it (k > 2048 * shape.warps, n * k / 64 >= 2^32, a row's block count not a
//! multiple of 4, codes or scales not 16-byte aligned, or fewer than 2 stages fit).
//! Preconditions (the caller's): those of launch_gemv1_fast, plain scales. `plan_sms`:
//! multiprocessors to plan for, 0 for the device's.
template <class Code, class T, gemv1_bulk_shape Shape>
bool launch_gemv1_bulk(exec::cuda const& e, gemv_args<T> const& a, unsigned plan_sms = 0) {
  static_assert(Shape.warps >= 1 && Shape.warps <= 31, "1 to 31 consumer warps");
  static_assert(Shape.min_j == 1 || Shape.min_j == 2 || Shape.min_j == 4, "J is 1, 2 or 4");
  static_assert(Shape.partial_kib >= 1 &&
                    unsigned(Shape.partial_kib) * 1024u + gemv1_bulk_barrier_bytes <=
                        gemv1_stream_prefix,
                "the partial sums go before the table");
  auto const row_blocks = static_cast<std::uint32_t>(a.k >> a.block_shift);
  if (a.n * (a.k >> 6) >= (std::size_t{1} << 32) || row_blocks % 4 != 0 || !aligned16(a.codes) ||
      !aligned16(a.scales.absmax))
    return false;
  unsigned const sms = plan_sms != 0 ? plan_sms : multiprocessors(e.device);
  unsigned j = 0;
  gemv1_bulk_plan p{};
  p.tiles =
      gemv1_stream_plan_for(a.n, a.k, Shape.warps, unsigned(Shape.partial_kib) * 1024u, sms, j);
  if (j == 0)
    return false;
  // one super-step per warp where the warps allow (J = 2 and 4 keep more registers per thread and
  // have fewer warps share a row); the partial sums' room sets the tile
  auto const supers = static_cast<unsigned>((a.k / 64 + 7) / 8);
  j = supers <= unsigned(Shape.warps) ? 1u : supers <= 2u * Shape.warps ? 2u : 4u;
  j = j < unsigned(Shape.min_j) ? unsigned(Shape.min_j) : j;
  {
    auto& tp = p.tiles;
    tp.col_groups = (supers + j - 1) / j;
    tp.row_groups = unsigned(Shape.warps) / tp.col_groups;
    unsigned const per_block = (tp.pairs + sms - 1) / sms;
    unsigned const cap = unsigned(Shape.partial_kib) * 1024u / (tp.col_groups * 64u);
    unsigned const passes = (per_block + cap - 1) / cap;
    tp.tile_pairs = (per_block + passes - 1) / passes;
    tp.tiles = (tp.pairs + tp.tile_pairs - 1) / tp.tile_pairs;
  }
  unsigned const C = p.tiles.col_groups;
  unsigned const G = p.tiles.row_groups;
  auto const pair_bytes = static_cast<unsigned>(a.k) + 8u * row_blocks;
  unsigned const groups = unsigned(Shape.stage_kib) * 1024u / (G * pair_bytes);
  unsigned const cap = (p.tiles.tile_pairs + G - 1) / G * G;
  p.stage_pairs = groups > 0 ? groups * G : G;
  p.stage_pairs = p.stage_pairs < cap ? p.stage_pairs : cap;
  p.stage_bytes = (p.stage_pairs * pair_bytes + 127u) / 128u * 128u;
  p.front_off = (gemv1_bulk_barrier_bytes + p.tiles.tile_pairs * C * 64u + 127u) / 128u * 128u;
  unsigned const front = (gemv1_stream_prefix - p.front_off) / p.stage_bytes;
  unsigned const back =
      (gemv1_stream_smem_limit - gemv1_stream_prefix - gemv_lut_bytes) / p.stage_bytes;
  unsigned want = unsigned(Shape.ring_kib) * 1024u / p.stage_bytes;
  want = want < gemv1_bulk_max_stages ? want : gemv1_bulk_max_stages;
  want = want < front + back ? want : front + back;
  if (want < 2)
    return false;
  p.stages = want;
  p.front_stages = front < want ? front : want;
  p.evict_first = Shape.evict_first ? 1u : 0u;
  p.tiles.smem = gemv1_stream_prefix + gemv_lut_bytes + (want - p.front_stages) * p.stage_bytes;
  bool const full = a.k == std::size_t{512} * j * C;
  unsigned const threads = 32u * (C * G + 1u);
  unsigned const grid = p.tiles.tiles < sms ? p.tiles.tiles : sms;
  auto run = [&](auto jc, auto fullc) {
    constexpr auto kernel =
        &gemv1_bulk_kernel<Code, T, decltype(jc)::value, Shape.warps, decltype(fullc)::value>;
    allow_dynamic_smem<kernel>(e.device, gemv1_stream_smem_limit);
    cuda_detail::launch(e, true, kernel, dim3(grid), dim3(threads), p.tiles.smem,
                        "qmem::quant::gemv1_bulk_kernel", a, values_of<Code>(), p);
  };
  auto with_full = [&](auto jc) {
    if (full)
      run(jc, std::true_type{});
    else
      run(jc, std::false_type{});
  };
  if (j == 1)
    with_full(std::integral_constant<int, 1>{});
  else if (j == 2)
    with_full(std::integral_constant<int, 2>{});
  else
    with_full(std::integral_constant<int, 4>{});
  return true;
}

//! Launches the streaming small-batch kernel with a given shape; false (nothing launched) when
//! the call does not suit it (m outside 2..16, blocks under 64, n * k / 64 >= 2^32).
//! Preconditions (the caller's): those of launch_gemv_fast. `plan_sms`: multiprocessors to plan
//! for, 0 for the device's (the tests plan for fewer to make blocks walk several rounds).
template <class Code, class T, bool Nested, gemvm_stream_shape Shape>
bool launch_gemvm_stream(exec::cuda const& e, gemv_args<T> const& a, unsigned plan_sms = 0) {
  if (a.m < 2 || a.m > 16 || a.block_shift < 6 || a.n * (a.k >> 6) >= (std::size_t{1} << 32))
    return false;
  if (Shape.x_once && a.m <= 8)
    return false;
  if constexpr (Shape.block64) {
    if (Nested || a.block_shift != 6 || reinterpret_cast<std::uintptr_t>(a.scales.absmax) % 8 != 0)
      return false;
  }
  if constexpr (Shape.pair) {
    if (a.k % 128 != 0 || !aligned16(a.codes))
      return false;
  }
  unsigned const sms = plan_sms != 0 ? plan_sms : multiprocessors(e.device);
  gemvm_stream_plan p{};
  p.chunks = static_cast<unsigned>(a.k / 64);
  p.tiles = static_cast<unsigned>((a.n + 15) / 16);
  p.per_block = (p.tiles + sms - 1) / sms;
  unsigned const grid = (p.tiles + p.per_block - 1) / p.per_block;
  auto run = [&](auto mtc) {
    constexpr int MT = decltype(mtc)::value;
    constexpr int W = MT == 1 ? Shape.warps : Shape.warps16;
    constexpr int R = MT == 1 ? Shape.tiles : Shape.tiles16;
    constexpr auto kernel = &gemvm_stream_kernel < Code, T, Nested, MT, R, W, Shape.pdl,
                   Shape.pdl ? Shape.prefetch_lines : 0, Shape.group_scales, Shape.pair,
                   Shape.x_once, Shape.stream_codes, Shape.full_rounds, Shape.keep_x, Shape.x_slots,
                   Shape.lean, Shape.block64 && !Nested > ;
    p.col_groups = std::min(static_cast<unsigned>(W), p.chunks / (Shape.pair ? 2u : 1u));
    unsigned const extra = gemv1_stream_extra_bytes(Nested);
    if constexpr (Shape.x_once) {
      // every tile's sums: those that fit go before the table (0xFC00 bytes when the dynamic
      // shared memory starts at 0x400), the rest after it; or all after a table at 0
      unsigned const tile = p.col_groups * static_cast<unsigned>(MT) * 512u;
      unsigned const before = std::min(gemv1_stream_prefix / tile, p.per_block);
      p.smem = std::max(gemv1_stream_prefix + gemv_lut_bytes + (p.per_block - before) * tile,
                        gemv_lut_bytes + p.per_block * tile) +
               extra;
      if (p.smem > gemv1_stream_smem_limit)
        return false;
    } else {
      p.smem =
          gemv1_stream_prefix + gemv_lut_bytes + gemvm_partial_bytes(p.col_groups, MT, R) + extra;
    }
    allow_dynamic_smem<kernel>(e.device, gemv1_stream_smem_limit);
    unsigned const threads = 32u * p.col_groups;
    cuda_detail::launch(e, Shape.pdl, kernel, dim3(grid), dim3(threads), p.smem,
                        "qmem::quant::gemvm_stream_kernel", a, values_of<Code>(), nested_values(),
                        p);
    return true;
  };
  if constexpr (Shape.x_once)
    return run(std::integral_constant<int, 2>{});
  else
    return a.m <= 8 ? run(std::integral_constant<int, 1>{}) : run(std::integral_constant<int, 2>{});
}

template <class Code, class T, bool Nested, int MTiles, gemv_shape Shape, bool Block32,
          bool Block64, bool Contig>
void launch_gemv_kernel(exec::cuda const& e, gemv_args<T> const& a) {
  constexpr auto kernel = &gemv_4bit_kernel<Code, T, Nested, MTiles, Shape.warps, Shape.unroll,
                                            Shape.tiles, Block32, Block64, Contig>;
  constexpr unsigned smem = gemv_smem_bytes<Nested, Shape.warps, Shape.tiles>();
  allow_dynamic_smem<kernel>(e.device, smem);
  auto const grid = static_cast<unsigned>((a.n + 16 * Shape.tiles - 1) / (16 * Shape.tiles));
  kernel<<<grid, Shape.warps * 32, smem, e.stream>>>(a, values_of<Code>(), nested_values());
  cuda_detail::check_launch(e, "qmem::quant::gemv_4bit_kernel");
}

//! Launches the fast GEMV kernel with a given block shape (the bench and the tests compare
//! shapes). Preconditions (the caller's): k % 64 == 0, a power-of-two nested block size, codes
//! 8-byte and x 16-byte aligned.
template <class Code, class T, bool Nested, gemv_shape Shape>
void launch_gemv_fast(exec::cuda const& e, gemv_args<T> const& a) {
  // consecutive steps with 16-byte scale loads: plain 64-element blocks, rows of whole 4-scale
  // groups (k % 256 == 0), aligned scales
  bool const contig = Shape.contiguous && !Nested && a.block_shift == 6 && a.k % 256 == 0 &&
                      aligned16(a.scales.absmax);
  auto run = [&](auto mtiles) {
    constexpr int MT = decltype(mtiles)::value;
    if (a.block_shift == 5)
      launch_gemv_kernel<Code, T, Nested, MT, Shape, true, false, false>(e, a);
    else if (a.block_shift == 6) {
      if constexpr (Shape.contiguous && !Nested) {
        if (contig) {
          launch_gemv_kernel<Code, T, Nested, MT, Shape, false, true, true>(e, a);
          return;
        }
      }
      launch_gemv_kernel<Code, T, Nested, MT, Shape, false, true, false>(e, a);
    } else {
      launch_gemv_kernel<Code, T, Nested, MT, Shape, false, false, false>(e, a);
    }
  };
  if (a.m <= 8)
    run(std::integral_constant<int, 1>{});
  else
    run(std::integral_constant<int, 2>{});
}

//! Batches 2 to 16 on weights where a block owns at least 4 tiles: with plain scales, at batches
//! 9-16 where a block owns more than 4 tiles the steps-outer shape (up to 8 tiles
//! gemv_batch16_stream_two_steps_b64 for blocks of 64, gemv_batch16_stream_two_steps for the
//! others; beyond, gemv_batch16_stream_long_b64 for blocks of 64, gemv_batch16_stream_long for
//! the others), else the pair shape; the unpaired one where those decline the weight. Nested
//! scales: at batches 9-16 gemv_batch16_stream_long where a block owns more than 4 tiles, else
//! the pair shape; at batches 2-8 the unpaired shape. False when none takes it.
template <class Code, class T, bool Nested>
bool launch_gemvm_long(exec::cuda const& e, gemv_args<T> const& a) {
  std::size_t const sms = multiprocessors(e.device);
  std::size_t const per_block = ((a.n + 15) / 16 + sms - 1) / sms; // 16-row tiles per block
  // tiles of one step of the steps-outer shapes
  static_assert(gemv_batch16_stream_two_steps.tiles16 == gemv_batch16_stream_long.tiles16);
  std::size_t const step = static_cast<std::size_t>(gemv_batch16_stream_long.tiles16);
  if constexpr (Nested) {
    // H200, 2026-12-01 04:40 UTC, bench gemv_batch16_dq (nested scales, fresh weights, us at
    // batch 16 on 14336 x 4096 / 8192^2 / 28672 x 8192): unpaired (6, dispatched before) 23.23 /
    // 23.46 / 90.96, pair (8) 20.69 / 21.40 / 82.80, long (15) 18.85 / 21.05 / 77.28, two steps
    // (14) 19.09 / 21.68 / 78.05; at batch 4 the unpaired shape stays (18.12 / 19.42 / 75.12
    // against the pair's 18.80 / 20.40 / 81.74)
    if (a.m > 8 && per_block > step &&
        launch_gemvm_stream<Code, T, Nested, gemv_batch16_stream_long>(e, a))
      return true;
    if (a.m > 8 && launch_gemvm_stream<Code, T, Nested, gemv_batch16_stream>(e, a))
      return true;
  } else {
    // batches 9-16 where a block owns more than one step's tiles: the x-once shape (block64
    // scales first: that shape declines the other weights)
    if (a.m > 8 && per_block > step && per_block <= 2 * step &&
        (launch_gemvm_stream<Code, T, Nested, gemv_batch16_stream_two_steps_b64>(e, a) ||
         launch_gemvm_stream<Code, T, Nested, gemv_batch16_stream_two_steps>(e, a)))
      return true;
    // blocks of 64 with 8-byte aligned scales first (the block64 shape declines the others)
    if (a.m > 8 && per_block > 2 * step &&
        launch_gemvm_stream<Code, T, Nested, gemv_batch16_stream_long_b64>(e, a))
      return true;
    if (a.m > 8 && per_block > step &&
        launch_gemvm_stream<Code, T, Nested, gemv_batch16_stream_long>(e, a))
      return true;
    if (launch_gemvm_stream<Code, T, Nested, gemv_batch16_stream>(e, a))
      return true;
  }
  return launch_gemvm_stream<Code, T, Nested, gemv_batch16_stream_unpaired>(e, a);
}

template <class Code, class T, bool Nested>
void launch_gemv(exec::cuda const& e, gemv_args<T> const& a, bool fast) {
  if (fast) {
    constexpr gemv1_stream_shape stream = Nested ? gemv_batch1_stream_nested : gemv_batch1_stream;
    // rows of gemv_batch1_long_k columns or more in blocks of 64: J >= 4 with block64 (the
    // shape declines other weights, which go on to `stream`; with nested scales also nested
    // blocks that are not a power of two)
    if (a.m == 1 && a.k >= gemv_batch1_long_k &&
        launch_gemv1_stream<Code, T, Nested, gemv_batch1_stream_long_k>(e, a))
      return;
    // shorter rows in blocks of 64: J >= 2 with block64 and spread scales (the same declines)
    if (a.m == 1 && launch_gemv1_stream<Code, T, Nested, gemv_batch1_stream_b64>(e, a))
      return;
    if (a.m == 1 && a.block_shift >= 6 && stream.warps > 0 &&
        launch_gemv1_stream<Code, T, Nested, stream>(e, a))
      return;
    if (a.m == 1 && a.block_shift >= 6)
      launch_gemv1_fast<Code, T, Nested, Nested ? gemv_batch1_nested : gemv_batch1_dispatched>(e,
                                                                                               a);
    else if (gemv_batch16_stream.warps > 0 &&
             ((a.n + 15) / 16 > 3 * std::size_t{multiprocessors(e.device)}
                  ? launch_gemvm_long<Code, T, Nested>(e, a)
                  : launch_gemvm_stream<Code, T, Nested, gemv_batch16_stream_short>(e, a)))
      return;
    else if (a.m <= 8)
      launch_gemv_fast<Code, T, Nested, gemv_small_batch>(e, a);
    else
      launch_gemv_fast<Code, T, Nested, gemv_large_batch>(e, a);
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

//! The checks matmul_4bit and matmul_4bit_grad_input make before launching anything, in this
//! order: m > 0 (`rows_of`: what a row of `in` is), w consistent, `in` holding m x in_cols and
//! `out` m x out_cols device-accessible elements, `out` apart from `in` and w, m and w's dimensions
//! below 2^31, the workspace (`need` bytes, apart from the others). Throws qmem::bad_argument
//! naming `fn` and the argument.
template <class T, class Code>
void check_4bit_call(char const* fn, char const* rows_of, char const* in_name,
                     tensor_view<T const> in, std::size_t in_cols, char const* out_name,
                     tensor_view<T> out, std::size_t out_cols, std::size_t m,
                     weight_4bit_view<Code> const& w, tensor_view<std::byte> ws, std::size_t need) {
  if (m == 0)
    qmem::detail::raise(fn, ": m is 0; expected at least one row of ", rows_of);
  detail::mm::check_weight(w, fn, false, true);
  detail::mm::check_matrix(in, m, in_cols, fn, in_name, false, true);
  detail::mm::check_matrix(tensor_view<T const>(out), m, out_cols, fn, out_name, false, true);
  qmem::detail::check_disjoint(out, in, fn, out_name, in_name);
  detail::mm::check_apart_from_weight(out, w, fn, out_name);
  constexpr std::size_t limit = std::size_t{1} << 31;
  if (m >= limit || w.rows >= limit || w.cols >= limit)
    qmem::detail::raise(fn, ": shape ", m, " x ", w.rows, " x ", w.cols,
                        "; expected each below 2^31");
  check_workspace(ws, need, fn);
  if (need != 0) {
    tensor_view<std::byte> const used = ws.subview(0, need);
    qmem::detail::check_disjoint(used, in, fn, "workspace", in_name);
    qmem::detail::check_disjoint(used, out, fn, "workspace", out_name);
    detail::mm::check_apart_from_weight(used, w, fn, "workspace");
  }
}

//! check_resident (core/cuda/runtime.cuh) of a 4-bit matmul's tensors: `in`, `out`, every part of
//! w, and `ws` (an empty view when the call uses no workspace). Call under device_guard(e.device).
template <class T, class Code>
void check_4bit_resident(exec::cuda const& e, char const* fn, char const* in_name,
                         tensor_view<T const> in, char const* out_name, tensor_view<T> out,
                         weight_4bit_view<Code> const& w, tensor_view<std::byte> ws) {
  using cuda_detail::arg;
  cuda_detail::check_resident(e, fn,
                              {arg(in_name, in), arg(out_name, out), arg("w.codes", w.codes),
                               arg("w.scales.absmax", w.scales.absmax),
                               arg("w.scales.qabsmax", w.scales.qabsmax),
                               arg("w.scales.absmax2", w.scales.absmax2), arg("workspace", ws)});
}

//! The shape checks of the int8 entry points: m, n, k > 0, k <= 131072 (int32 accumulation),
//! k % 4 == 0 (cuBLASLt's int8 product), m and n below 2^31. Throws qmem::bad_argument naming `fn`.
inline void check_int8_shape(char const* fn, std::size_t m, std::size_t n, std::size_t k) {
  if (m == 0 || n == 0 || k == 0)
    qmem::detail::raise(fn, ": shape ", m, " x ", n, " x ", k, "; expected m, n, k > 0");
  if (k > 131072)
    qmem::detail::raise(fn, ": k is ", k, "; expected at most 131072 (int32 accumulation)");
  if (k % 4 != 0)
    qmem::detail::raise(fn, ": k is ", k, "; cuBLASLt's int8 product needs a multiple of 4");
  if (m >= (std::size_t{1} << 31) || n >= (std::size_t{1} << 31))
    qmem::detail::raise(fn, ": shape ", m, " x ", n, "; expected each below 2^31");
}

} // namespace cuda_matmul

//! y[m, n] = x[m, k] * dequant(w)^T on the GPU, stream-ordered on e.stream (no synchronization).
//! m <= gemv_max_rows: the GEMV-style kernels read codes and scales directly (no workspace) and
//! compute sum_b scale_b * sum_{i in b} round_T(value_i) * x_i in fp32 (docs/matmul.md gives its
//! bound against the reference); larger m: w is dequantized into `workspace` (round_T(value *
//! scale), the reference's weights) and cuBLASLt multiplies (fp32 accumulation).
//! Preconditions (bad_argument, nothing launched): x holds m * w.cols, y m * w.rows elements, all
//! views device-accessible and on e.device (device memory of another device, or pageable host
//! memory, is refused: cuda_detail::check_resident); w consistent (weight_4bit_view); m > 0;
//! workspace at least
//! matmul_4bit_workspace_bytes<T>(m, w) bytes, 256-byte aligned; y, x, w and the part of the
//! workspace the call uses pairwise disjoint; m, n, k < 2^31.
//! Bytes moved (m <= 16): the codes, the scales, x once per 16 rows of w (from L2), y.
template <matmul_activation T, matmul_code_4bit Code>
void matmul_4bit(exec::cuda const& e, std::type_identity_t<tensor_view<T const>> x, std::size_t m,
                 weight_4bit_view<Code> w, tensor_view<T> y,
                 tensor_view<std::byte> workspace = {}) {
  constexpr char const* fn = "qmem::quant::matmul_4bit";
  std::size_t const need = matmul_4bit_workspace_bytes<T>(m, w);
  cuda_matmul::check_4bit_call(fn, "activations", "x", x, w.cols, "y", y, w.rows, m, w, workspace,
                               need);
  cuda_detail::device_guard guard(e.device);
  cuda_matmul::check_4bit_resident(e, fn, "x", x, "y", y, w,
                                   need != 0 ? workspace : tensor_view<std::byte>{});
  if (m <= gemv_max_rows) {
    cuda_matmul::gemv_args<T> a{x.data(),
                                w.codes.data(),
                                cuda_matmul::make_scale_args(w.scales),
                                y.data(),
                                static_cast<unsigned>(m),
                                w.rows,
                                w.cols,
                                detail::mm::log2_exact(w.block_size)};
    // the fast kernels find a block's nested group by a shift: power-of-two nested block sizes
    // (bitsandbytes: 256), else the generic kernel
    bool const fast = cuda_matmul::gemv_fast_path(w.cols, w.block_size, w.codes.data(), x.data()) &&
                      (!w.scales.nested() || a.scales.nested_shift >= 0);
    if (w.scales.nested())
      cuda_matmul::launch_gemv<Code, T, true>(e, a, fast);
    else
      cuda_matmul::launch_gemv<Code, T, false>(e, a, fast);
    return;
  }
  if constexpr (cuda_matmul::gemm_sm90_dispatch)
    if (cuda_matmul::fused_gemm(e, x.data(), m, w, y.data()))
      return;
  std::size_t offset = 0;
  T* wd = reinterpret_cast<T*>(cuda_matmul::carve(workspace, offset, w.elements() * sizeof(T)));
  cuda_matmul::dequantize_gemm(e, x.data(), m, w, y.data(), wd, workspace.data() + offset,
                               workspace.size() - offset, cuda_matmul::gemm_overlap_chunks);
}

//! QLoRA's backward pass through a frozen 4-bit weight on the GPU:
//! grad_x[m, k] = grad_y[m, n] * dequant(w), stream-ordered. m <= grad_input_gemv_max_rows: a
//! GEMV-style kernel over row slices whose fp32 partial sums (in `workspace`) are added in a fixed
//! order; larger m: dequantize into `workspace`, then cuBLASLt. Preconditions: grad_y holds m *
//! w.rows, grad_x m * w.cols elements, device-accessible and on e.device (check_resident); w
//! consistent; m > 0; workspace at least
//! matmul_4bit_grad_input_workspace_bytes<T>(m, w) bytes, 256-byte aligned; m, n, k < 2^31.
template <matmul_activation T, matmul_code_4bit Code>
void matmul_4bit_grad_input(exec::cuda const& e, std::type_identity_t<tensor_view<T const>> grad_y,
                            std::size_t m, weight_4bit_view<Code> w, tensor_view<T> grad_x,
                            tensor_view<std::byte> workspace = {}) {
  constexpr char const* fn = "qmem::quant::matmul_4bit_grad_input";
  std::size_t const need = matmul_4bit_grad_input_workspace_bytes<T>(m, w);
  cuda_matmul::check_4bit_call(fn, "gradients", "grad_y", grad_y, w.rows, "grad_x", grad_x, w.cols,
                               m, w, workspace, need);
  cuda_detail::device_guard guard(e.device);
  cuda_matmul::check_4bit_resident(e, fn, "grad_y", grad_y, "grad_x", grad_x, w,
                                   need != 0 ? workspace : tensor_view<std::byte>{});
  if (m <= grad_input_gemv_max_rows) {
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
//! Preconditions: as the host overload, device-accessible views on e.device (check_resident),
//! plus k % 4 == 0 and a, b 16-byte
//! aligned (cuBLASLt's int8 kernels), workspace at least matmul_int8_workspace_bytes(m, n) bytes,
//! 256-byte aligned.
template <float_element Out>
void matmul_int8(exec::cuda const& e, tensor_view<std::int8_t const> a,
                 tensor_view<float const> row_scale, tensor_view<std::int8_t const> b,
                 tensor_view<float const> col_scale, std::size_t m, std::size_t n, std::size_t k,
                 tensor_view<Out> out, tensor_view<std::byte> workspace = {}) {
  constexpr char const* fn = "qmem::quant::matmul_int8";
  cuda_matmul::check_int8_shape(fn, m, n, k);
  detail::mm::check_matrix(a, m, k, fn, "a", false, true);
  detail::mm::check_matrix(b, n, k, fn, "b", false, true);
  detail::mm::check_matrix(row_scale, m, 1, fn, "row_scale", false, true);
  detail::mm::check_matrix(col_scale, n, 1, fn, "col_scale", false, true);
  detail::mm::check_matrix(tensor_view<Out const>(out), m, n, fn, "out", false, true);
  QMEM_EXPECTS(cuda_matmul::aligned16(a.data()) && cuda_matmul::aligned16(b.data()),
               "a or b is not 16-byte aligned; cuBLASLt's int8 product needs 16");
  detail::mm::check_apart_from_int8(out, fn, "out", a, "a", row_scale, b, col_scale);
  cuda_matmul::check_workspace(workspace, matmul_int8_workspace_bytes(m, n), fn);
  {
    tensor_view<std::byte> const used = workspace.subview(0, matmul_int8_workspace_bytes(m, n));
    detail::mm::check_apart_from_int8(used, fn, "workspace", a, "a", row_scale, b, col_scale);
    qmem::detail::check_disjoint(used, out, fn, "workspace", "out");
  }
  cuda_detail::device_guard guard(e.device);
  using cuda_detail::arg;
  cuda_detail::check_resident(e, fn,
                              {arg("a", a), arg("row_scale", row_scale), arg("b", b),
                               arg("col_scale", col_scale), arg("out", out),
                               arg("workspace", workspace)});
  std::size_t offset = 0;
  auto* acc = reinterpret_cast<std::int32_t*>(
      cuda_matmul::carve(workspace, offset, m * n * sizeof(std::int32_t)));
  cuda_matmul::int8_product(e, a.data(), b.data(), m, n, k, acc, workspace.data() + offset,
                            workspace.size() - offset);
  cuda_matmul::int8_epilogue_kernel<Out, bf16>
      <<<cuda_matmul::grid_for(m * n, 256), 256, 0, e.stream>>>(acc, row_scale.data(),
                                                                col_scale.data(), m, n, k, nullptr,
                                                                b.data(), nullptr, out.data(), 0);
  cuda_detail::check_launch(e, "qmem::quant::int8_epilogue_kernel");
}

//! An LLM.int8 linear layer on the GPU (see the host overload for the function computed; the
//! results equal the host's bit for bit): outlier columns flagged and listed in ascending order,
//! rows quantized to int8, cuBLASLt int8 product, epilogue with the outlier columns.
//! Preconditions: as the host overload, device-accessible views on e.device (check_resident),
//! plus k % 4 == 0, b 16-byte
//! aligned, workspace at least linear_int8_workspace_bytes(m, n, k) bytes, 256-byte aligned.
template <matmul_activation T>
void linear_int8(exec::cuda const& e, std::type_identity_t<tensor_view<T const>> x,
                 tensor_view<std::int8_t const> b, tensor_view<float const> col_scale,
                 std::size_t m, std::size_t n, std::size_t k, float threshold, tensor_view<T> out,
                 tensor_view<std::byte> workspace = {}) {
  constexpr char const* fn = "qmem::quant::linear_int8";
  cuda_matmul::check_int8_shape(fn, m, n, k);
  detail::mm::check_matrix(x, m, k, fn, "x", false, true);
  detail::mm::check_matrix(b, n, k, fn, "b", false, true);
  detail::mm::check_matrix(col_scale, n, 1, fn, "col_scale", false, true);
  detail::mm::check_matrix(tensor_view<T const>(out), m, n, fn, "out", false, true);
  QMEM_EXPECTS(cuda_matmul::aligned16(b.data()),
               "b is not 16-byte aligned; cuBLASLt's int8 product needs 16");
  qmem::detail::check_disjoint(out, x, fn, "out", "x");
  detail::mm::check_apart_from_int8(out, fn, "out", {}, "", {}, b, col_scale);
  cuda_matmul::check_workspace(workspace, linear_int8_workspace_bytes(m, n, k), fn);
  {
    tensor_view<std::byte> const used = workspace.subview(0, linear_int8_workspace_bytes(m, n, k));
    qmem::detail::check_disjoint(used, x, fn, "workspace", "x");
    detail::mm::check_apart_from_int8(used, fn, "workspace", {}, "", {}, b, col_scale);
    qmem::detail::check_disjoint(used, out, fn, "workspace", "out");
  }
  cuda_detail::device_guard guard(e.device);
  using cuda_detail::arg;
  cuda_detail::check_resident(e, fn,
                              {arg("x", x), arg("b", b), arg("col_scale", col_scale),
                               arg("out", out), arg("workspace", workspace)});
  std::size_t offset = 0;
  auto* flags = reinterpret_cast<std::uint32_t*>(cuda_matmul::carve(workspace, offset, k * 4));
  auto* list = reinterpret_cast<std::int32_t*>(cuda_matmul::carve(workspace, offset, (k + 1) * 4));
  auto* q = reinterpret_cast<std::int8_t*>(cuda_matmul::carve(workspace, offset, m * k));
  auto* rs = reinterpret_cast<float*>(cuda_matmul::carve(workspace, offset, m * 4));
  std::size_t const cap = k < linear_int8_dense_outliers ? k : linear_int8_dense_outliers;
  auto* xo = reinterpret_cast<float*>(cuda_matmul::carve(workspace, offset, m * cap * 4));
  auto* wo = reinterpret_cast<float*>(cuda_matmul::carve(workspace, offset, n * cap * 4));
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
  int const icap = static_cast<int>(cap);
  if (outliers) {
    // up to `cap` outliers (decided on the device from the list): gathered into dense blocks and
    // added by the tiled epilogue; more: the plain epilogue reads them in place
    cuda_matmul::gather_outliers_kernel<T>
        <<<cuda_matmul::grid_for((m + n) * cap, 256), 256, 0, e.stream>>>(
            x.data(), b.data(), col_scale.data(), m, n, k, list, icap, xo, wo);
    cuda_detail::check_launch(e, "qmem::quant::gather_outliers_kernel");
    dim3 const grid(
        static_cast<unsigned>((n + cuda_matmul::outlier_tile - 1) / cuda_matmul::outlier_tile),
        static_cast<unsigned>(std::min<std::size_t>(
            (m + cuda_matmul::outlier_tile - 1) / cuda_matmul::outlier_tile, 65535)));
    cuda_matmul::int8_outlier_epilogue_kernel<T><<<grid, 256, 0, e.stream>>>(
        acc, rs, col_scale.data(), m, n, list, icap, xo, wo, out.data());
    cuda_detail::check_launch(e, "qmem::quant::int8_outlier_epilogue_kernel");
  }
  cuda_matmul::int8_epilogue_kernel<T, T><<<cuda_matmul::grid_for(m * n, 256), 256, 0, e.stream>>>(
      acc, rs, col_scale.data(), m, n, k, x.data(), b.data(), outliers ? list : nullptr, out.data(),
      icap);
  cuda_detail::check_launch(e, "qmem::quant::int8_epilogue_kernel");
}

} // namespace qmem::quant
