#pragma once
//! \file
//! A GEMM that dequantizes the 4-bit weight in its main loop, for Hopper (sm_90a): the candidate
//! for matmul_4bit's large-batch forward, y[m, n] = x[m, k] * dequant(w)^T (docs/matmul.md,
//! "CUDA paths", m > 16).
//!
//! Why: the dispatched path dequantizes the whole weight into a bf16 workspace, then calls
//! cuBLASLt; the dequantization is about 5% of the GEMM's time and cannot overlap it. Here each
//! CTA dequantizes the 128 x 64 weight tile of the current K step into shared memory and
//! multiplies it with a 256-token tile of x, so a weight is decoded once per 256 tokens and the
//! decode hides under the tensor cores' time.
//!
//! How: the product is computed transposed, C^T[n, m] = W[n, k] x^T[k, m], so that the weight is
//! wgmma's A operand (64 rows per warpgroup) and the activations its B operand (256 tokens): both
//! K-major, 128-byte swizzled shared-memory tiles. One producer warpgroup (one thread) streams x
//! tiles with the tensor-memory accelerator (TMA) into a ring of `stages` buffers, each completing
//! on a "full" mbarrier and freed through an "empty" one. Two consumer warpgroups each own 64
//! weight rows: per K step a thread loads 16 bytes of codes (32 weights of one row, one block
//! scale) two steps ahead into registers, decodes them to round_T(value * scale) (the reference's
//! weights, as dequantize_into writes them) into a triple-buffered swizzled A tile, then issues
//! four wgmma m64n256k16 with fp32 accumulators and keeps one group in flight. The epilogue
//! rounds each fp32 sum once to T. Numerics: the same exact products as the dequantize + cuBLASLt
//! path, summed in fp32 in another order (docs/matmul.md, Tolerances, bound 1).
//! gemm_4bit_staged_kernel, the faster form (cuda_matmul::gemm_sm90_variant), moves the code and
//! scale loads to the producer warpgroup (TMA and shared-memory tiles in the same ring), decodes
//! into wgmma's register A operand, loops over tiles on a persistent grid and stores each tile
//! through shared memory by TMA: the same products in the same order, the same bits.
//!
//! Requirements: the binary carries sm_90a code (built with
//! -gencode=arch=compute_90a,code=sm_90a) and the device is compute capability 9.0; otherwise the
//! kernel body is empty and sm90::runnable says false (the dispatcher falls back). Shapes: k a
//! multiple of 32 (16-byte aligned code rows, a 32-weight chunk inside one block), block size a
//! power of two >= 32, a power-of-two nested block size, codes and x 16-byte aligned
//! (sm90::fits).

#include <qmem/core/config.hpp>
#include <qmem/core/cuda/runtime.cuh>
#include <qmem/core/fmath.hpp>
#include <qmem/core/numeric.hpp>
#include <qmem/quant/code_table.hpp>
#include <qmem/quant/cuda/detail/pack.cuh>

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <mutex>

namespace qmem::quant::cuda_matmul::sm90 {

//! The kernel's tiles: 128 weight rows (two consumer warpgroups of 64) x 256 tokens x 64 columns
//! per K step, a ring of 4 x-tile stages, 3 A tiles per consumer.
//! The only tile measured so far (H200, 2026-11-30 10:43 UTC, batch 4096, 8192^2: 1.12-1.17 ms,
//! 471-491 TFLOP/s; cuBLAS bf16 0.73-0.77 ms). Stages: 6 instead of 4 in the staged kernel
//! measured within the noise (22:08 UTC, 8192^2 1.293-1.295x cuBLAS against 1.287-1.347), and
//! 4 leave room for its TMA-store staging tile.
struct tile_shape {
  static constexpr unsigned rows = 128;    //!< weight rows per CTA (wgmma M, 64 per consumer)
  static constexpr unsigned tokens = 256;  //!< activation rows per CTA (wgmma N)
  static constexpr unsigned depth = 64;    //!< columns per K step (128 bytes of T: one swizzle row)
  static constexpr unsigned stages = 4;    //!< x tiles in flight
  static constexpr unsigned a_buffers = 3; //!< A tiles per consumer (see the kernel's comment)
  static constexpr unsigned consumers = 2;
  static constexpr unsigned threads = 128 * (1 + consumers);
  static constexpr unsigned x_tile_bytes = tokens * depth * 2;
  static constexpr unsigned a_tile_bytes = 64 * depth * 2;
  //! Dynamic shared memory: x ring, A tiles, the mbarriers, the code table and the nested map,
  //! plus 1024 bytes to align the swizzled tiles.
  static constexpr unsigned smem_bytes = 1024 + stages * x_tile_bytes +
                                         consumers * a_buffers * a_tile_bytes + 2 * stages * 8 +
                                         (16 + 256) * 4;
};

//! What the kernel reads and writes (trivially copyable, a launch argument).
template <class T>
struct gemm_args {
  std::uint8_t const* codes;   //!< [n, k / 2], two codes per byte, the first in the high nibble
  float const* absmax;         //!< plain scales, or nullptr
  std::uint8_t const* qabsmax; //!< nested codes
  float const* absmax2;        //!< nested scales
  float offset;                //!< nested offset
  unsigned nested_shift;       //!< log2 of the nested block size
  unsigned block_shift;        //!< log2 of the block size
  T* y;                        //!< [m, n]
  unsigned m, n, k;
};

// ------------------------------------------------------------------------------------------------
// PTX wrappers (sm_90a)

__device__ QMEM_INLINE std::uint32_t smem_addr(void const* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ QMEM_INLINE void mbar_init(std::uint32_t bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

__device__ QMEM_INLINE void mbar_arrive(std::uint32_t bar) {
  asm volatile("{\n\t.reg .b64 st;\n\tmbarrier.arrive.shared::cta.b64 st, [%0];\n\t}" ::"r"(bar)
               : "memory");
}

__device__ QMEM_INLINE void mbar_expect_tx(std::uint32_t bar, unsigned bytes) {
  asm volatile(
      "{\n\t.reg .b64 st;\n\tmbarrier.arrive.expect_tx.shared::cta.b64 st, [%0], %1;\n\t}" ::"r"(
          bar),
      "r"(bytes)
      : "memory");
}

__device__ QMEM_INLINE void mbar_wait(std::uint32_t bar, unsigned parity) {
  asm volatile("{\n\t.reg .pred done;\n"
               "wait_%=:\n\t"
               "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n\t"
               "@!done bra wait_%=;\n\t}" ::"r"(bar),
               "r"(parity)
               : "memory");
}

//! A 2-D TMA load of the box at (c0, c1) (innermost first) into `dst`, completing on `bar`.
__device__ QMEM_INLINE void tma_load_2d(std::uint32_t dst, CUtensorMap const* map,
                                        std::uint32_t bar, int c0, int c1) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes "
               "[%0], [%1, {%3, %4}], [%2];" ::"r"(dst),
               "l"(reinterpret_cast<std::uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1)
               : "memory");
}

//! wgmma shared-memory descriptor of a K-major tile with the 128-byte swizzle: rows of 128 bytes,
//! 8-row atoms 1024 bytes apart (stride byte offset), leading byte offset unused (1), layout type
//! 1 (128B swizzle) in bits 62-63. `addr` may step by 32 bytes inside an atom row to select the
//! k16 slice (the hardware applies the swizzle to the full address).
__device__ QMEM_INLINE std::uint64_t sw128_desc(std::uint32_t addr) {
  return (static_cast<std::uint64_t>((addr & 0x3FFFFu) >> 4)) | (std::uint64_t{1} << 16) |
         (std::uint64_t{1024 >> 4} << 32) | (std::uint64_t{1} << 62);
}

__device__ QMEM_INLINE void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}
__device__ QMEM_INLINE void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
template <int N>
__device__ QMEM_INLINE void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

//! d[64 x 256] += A[64 x 16] * B[16 x 256]^T..., both operands K-major in shared memory (the
//! descriptors), fp32 accumulators in the wgmma m64nNk16 fragment layout.
template <class T>
__device__ QMEM_INLINE void wgmma_64x256x16(float (&d)[128], std::uint64_t desc_a,
                                            std::uint64_t desc_b, std::uint32_t scale_d) {
  if constexpr (std::same_as<T, bf16>)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, "
        "%111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, "
        "%127"
        "}, %128, %129, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
          "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
          "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
          "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
          "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
          "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
          "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
          "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
          "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
  else
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %130, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, "
        "%111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, "
        "%127"
        "}, %128, %129, p, 1, 1, 0, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
          "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
          "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
          "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
          "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
          "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
          "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
          "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
          "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

//! d[64 x 256] += A[64 x 16] * B[16 x 256] with A from registers (the mma m16n8k16 A fragment
//! of the warp's 16 rows: a[0] row g cols 2t..2t+1, a[1] row g + 8, a[2] row g cols 2t+8..,
//! a[3] row g + 8 cols 2t+8.., g = lane / 4, t = lane % 4) and B K-major in shared memory.
template <class T>
__device__ QMEM_INLINE void wgmma_64x256x16_rs(float (&d)[128], std::uint32_t const (&a)[4],
                                               std::uint64_t desc_b, std::uint32_t scale_d) {
  if constexpr (std::same_as<T, bf16>)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, "
        "%111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, "
        "%127"
        "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
          "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
          "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
          "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
          "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
          "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
          "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
          "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
          "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
  else
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %133, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 "
        "{"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
        "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
        "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
        "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, "
        "%111, "
        "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, "
        "%127"
        "}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
          "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
          "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
          "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
          "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
          "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
          "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]),
          "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
          "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]),
          "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]),
          "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]),
          "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
          "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
          "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]),
          "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]),
          "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d));
}

//! v rounded to T by the hardware conversion (one F2F per value): the epilogue's 128 outputs per
//! thread; qmem::from_float's portable bit arithmetic gives the same bits for every non-NaN value
//! but tripled this kernel's code (nvcc 13, sm_90a, 2026-11-30).
template <class T>
__device__ QMEM_INLINE T round_to(float v) {
  std::uint16_t bits;
  if constexpr (std::same_as<T, bf16>) {
    __nv_bfloat16 const r = __float2bfloat16_rn(v);
    std::memcpy(&bits, &r, 2);
  } else {
    __half const r = __float2half_rn(v);
    std::memcpy(&bits, &r, 2);
  }
  T out;
  std::memcpy(&out, &bits, 2);
  return out;
}

//! One consumer thread's share of a K step's weight tile: 16 code bytes (32 weights of one row)
//! and what its block scale is made of, loaded a step ahead of their use.
struct code_chunk {
  uint4 codes;
  float scale;    //!< absmax, or absmax2 when nested
  unsigned qcode; //!< the nested scale code
  bool valid;     //!< false past the last row or column: the chunk decodes to zeros
};

// ------------------------------------------------------------------------------------------------
// The kernel

//! One step's codes of a register-A consumer thread: chunk i = 2 * row + half holds the 16 code
//! bytes of columns 32 half .. 32 half + 31 of the step in fragment row g (row 0) or g + 8, and
//! what its scale is made of; bit i of `valid` is clear past the last row or column.
struct fragment_codes {
  uint4 codes[4];
  float scale[4];
  unsigned qcode[4];
  unsigned valid;
};

//! The consumer main loop with the weight decoded straight into wgmma's A registers (variant 3):
//! no A tile in shared memory, no proxy fence and no warpgroup barrier per step. The thread's
//! fragment rows are `row` and row + 8 (row = the weight row of lane / 4 of its warp); for the k16
//! slice kk it needs the code bytes q + 8 kk and q + 8 kk + 4 (q = lane % 4) of each row's 32
//! bytes of the step, which it loads as two 16-byte chunks per row (the quad's four lanes load the
//! same chunks: L1 hits) and picks byte q of each word. Two register buffers: the decode of step
//! kt + 1 runs after wgmma.wait_group 1 retired step kt - 1 (the buffer's last reader), while step
//! kt's group is in flight; codes are loaded two steps before their decode (two code buffers).
template <class T, bool Nested>
__device__ QMEM_INLINE void
register_a_mainloop(float (&d)[128], gemm_args<T> const& a, float const* table, float const* dyn,
                    std::uint32_t x_tiles, std::uint32_t bars, unsigned steps, unsigned row,
                    unsigned q, bool leader) {
  using S = tile_shape;
  bool const ok[2] = {row < a.n, row + 8 < a.n};
  std::size_t const elem[2] = {std::size_t{row} * a.k, std::size_t{row + 8} * a.k};
  unsigned const shift = 8 * q;
  auto load = [&](unsigned kt) {
    fragment_codes f{};
    QMEM_UNROLL
    for (unsigned i = 0; i < 4; ++i) {
      unsigned const col = kt * S::depth + 32 * (i % 2);
      if (ok[i / 2] && col < a.k) {
        std::size_t const e = elem[i / 2] + col;
        f.codes[i] = __ldg(reinterpret_cast<uint4 const*>(a.codes + e / 2));
        std::size_t const b = e >> a.block_shift;
        if constexpr (Nested) {
          f.qcode[i] = __ldg(a.qabsmax + b);
          f.scale[i] = __ldg(a.absmax2 + (b >> a.nested_shift));
        } else {
          f.scale[i] = __ldg(a.absmax + b);
        }
        f.valid |= 1u << i;
      }
    }
    return f;
  };
  auto decode = [&](fragment_codes const& f, std::uint32_t(&frag)[4][4]) {
    QMEM_UNROLL
    for (unsigned i = 0; i < 4; ++i) {
      float s = f.scale[i];
      if constexpr (Nested)
        s = fmath::add(fmath::mul(dyn[f.qcode[i]], s), a.offset);
      s = (f.valid >> i) & 1u ? s : 0.0f;
      std::uint32_t const words[4] = {f.codes[i].x, f.codes[i].y, f.codes[i].z, f.codes[i].w};
      QMEM_UNROLL
      for (unsigned w = 0; w < 4; ++w) {
        // word w of half i % 2: k16 slice 2 (i % 2) + w / 2, columns 2q (w even) or 2q + 8
        std::uint32_t const byte = (words[w] >> shift) & 0xffu;
        frag[2 * (i % 2) + w / 2][2 * (w % 2) + i / 2] =
            pack2<T>(fmath::mul(table[byte >> 4], s), fmath::mul(table[byte & 15u], s));
      }
    }
  };
  std::uint32_t frag0[4][4], frag1[4][4];
  decode(load(0), frag0);
  // codes of steps kt + 1 (ahead) and kt + 2 (behind it) at the start of an even step kt: a
  // load is used two steps after it is issued (with one step ahead, the load's latency showed:
  // H200 2026-11-30 10:30 UTC, variant 2 of the shared-memory loop, no MMAs, 0.81-0.88 ms on
  // 8192^2, as long as the MMAs alone)
  fragment_codes ahead = steps > 1 ? load(1) : fragment_codes{};
  fragment_codes behind = steps > 2 ? load(2) : fragment_codes{};
  auto step = [&](unsigned kt, std::uint32_t(&cur)[4][4], std::uint32_t(&other)[4][4],
                  fragment_codes& codes) {
    unsigned const st = kt % S::stages;
    mbar_wait(bars + 8 * st, (kt / S::stages) & 1u);
    std::uint32_t const x_tile = x_tiles + st * S::x_tile_bytes;
    wgmma_fence();
    QMEM_UNROLL
    for (unsigned kk = 0; kk < S::depth / 16; ++kk)
      wgmma_64x256x16_rs<T>(d, cur[kk], sw128_desc(x_tile + kk * 32), 1u);
    wgmma_commit();
    wgmma_wait<1>(); // step kt - 1 retired: its x stage and its registers (`other`) are free
    if (kt > 0 && leader)
      mbar_arrive(bars + 8 * (S::stages + (kt - 1) % S::stages));
    if (kt + 1 < steps) {
      decode(codes, other); // step kt + 1
      codes = kt + 3 < steps ? load(kt + 3) : fragment_codes{};
    }
  };
  for (unsigned kt = 0; kt < steps; kt += 2) {
    step(kt, frag0, frag1, ahead);
    if (kt + 1 < steps)
      step(kt + 1, frag1, frag0, behind);
  }
}

//! y[m, n] = x[m, k] * dequant(w)^T, one 128 x 256 output tile per CTA (tile index = blockIdx.x,
//! weight-row tiles fastest so that consecutive CTAs share an x tile in L2). `x_map`: x as a 2-D
//! tensor {k, m}, box {64, 256}, 128-byte swizzle. With `probe` set, the kernel only writes 1
//! there when it was built for sm_90a (0 otherwise) and returns: that is how the host learns
//! whether this very kernel can run (runnable).
//!
//! A-tile reuse: consumer thread writes A tile kt % 3 at step kt, after the warpgroup barrier of
//! step kt - 1, which every warp passed after its wgmma.wait_group 1 of step kt - 2, which
//! retired the wgmma group of step kt - 3, the tile's last reader. With two tiles a slow warp
//! could still be reading tile kt % 2 (group kt - 2) while another overwrites it.
//! Variant: 0 the product as described above; 3 the same product with the weight decoded into
//! wgmma's register A operand instead of a shared-memory tile (register_a_mainloop; tested like
//! 0, bit-identical in the bench). Bench only, to place the time (docs/benchmarks.md): 1 skips the
//! code loads and the decode (the A tiles keep whatever they hold: the pipeline and the MMAs
//! alone), 2 skips the MMAs (loads, decode and the x ring alone; y gets zeros).
template <class T, bool Nested, int Variant = 0>
__global__ void __launch_bounds__(tile_shape::threads, 1)
    gemm_4bit_kernel(__grid_constant__ CUtensorMap const x_map, gemm_args<T> const a,
                     int* const probe, __grid_constant__ code_table<16> const values,
                     __grid_constant__ code_table<256> const nested) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if (probe != nullptr) {
    if (threadIdx.x == 0)
      *probe = 1;
    return;
  }
  using S = tile_shape;
  extern __shared__ unsigned char smem_raw[];
  std::uint32_t const raw = smem_addr(smem_raw);
  std::uint32_t const base = (raw + 1023u) & ~1023u;
  std::uint32_t const x_tiles = base;
  std::uint32_t const a_tiles = base + S::stages * S::x_tile_bytes;
  std::uint32_t const bars = a_tiles + S::consumers * S::a_buffers * S::a_tile_bytes;
  // full[s] at bars + 8 s (one arrival, the producer's, plus the TMA bytes); empty[s] at
  // bars + 8 (stages + s) (one arrival per consumer warp)
  float* const table =
      reinterpret_cast<float*>(smem_raw + (base - raw) + (bars - base) + 2 * S::stages * 8);
  float* const dyn = table + 16;
  unsigned const tid = threadIdx.x;
  load_tables<Nested>(table, dyn, values, nested);
  if (tid == 0) {
    for (unsigned s = 0; s < S::stages; ++s) {
      mbar_init(bars + 8 * s, 1);
      mbar_init(bars + 8 * (S::stages + s), S::consumers * 4);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  unsigned const tiles_n = (a.n + S::rows - 1) / S::rows;
  unsigned const n0 = blockIdx.x % tiles_n * S::rows;
  unsigned const m0 = blockIdx.x / tiles_n * S::tokens;
  unsigned const steps = (a.k + S::depth - 1) / S::depth;
  if (tid < 128) {
    // producer warpgroup: one thread streams the x tiles
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;" ::: "memory");
    if (tid == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<std::uint64_t>(&x_map))
                   : "memory");
      for (unsigned kt = 0; kt < steps; ++kt) {
        unsigned const s = kt % S::stages;
        if (kt >= S::stages)
          mbar_wait(bars + 8 * (S::stages + s), (kt / S::stages - 1) & 1u);
        mbar_expect_tx(bars + 8 * s, S::x_tile_bytes);
        tma_load_2d(x_tiles + s * S::x_tile_bytes, &x_map, bars + 8 * s,
                    static_cast<int>(kt * S::depth), static_cast<int>(m0));
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;" ::: "memory");
  unsigned const c = tid / 128 - 1, t = tid % 128, lane = t % 32, warp = t / 32;
  unsigned const row = t / 2, half = t % 2;
  unsigned const gr = n0 + c * 64 + row;
  bool const row_ok = gr < a.n;
  std::size_t const row_elem = std::size_t{gr} * a.k;
  auto load = [&](unsigned kt) {
    code_chunk q{};
    unsigned const col = kt * S::depth + half * 32;
    q.valid = row_ok && col < a.k;
    if (q.valid) {
      std::size_t const e = row_elem + col;
      q.codes = __ldg(reinterpret_cast<uint4 const*>(a.codes + e / 2));
      std::size_t const b = e >> a.block_shift;
      if constexpr (Nested) {
        q.qcode = __ldg(a.qabsmax + b);
        q.scale = __ldg(a.absmax2 + (b >> a.nested_shift));
      } else {
        q.scale = __ldg(a.absmax + b);
      }
    }
    return q;
  };
  float d[128];
  QMEM_UNROLL
  for (int i = 0; i < 128; ++i)
    d[i] = 0.0f;
  if constexpr (Variant == 3) {
    register_a_mainloop<T, Nested>(d, a, table, dyn, x_tiles, bars, steps,
                                   n0 + c * 64 + warp * 16 + lane / 4, lane % 4, lane == 0);
  } else {
    // codes of steps kt and kt + 1 at the start of an even step kt (two buffers, so that a load
    // is used two steps after it is issued: with one, its latency showed, H200 2026-11-30 10:30
    // UTC: this loop without the MMAs, variant 2, took 0.81-0.88 ms on 8192^2 at batch 4096,
    // about as long as the MMAs alone, variant 1)
    code_chunk even = Variant == 1 ? code_chunk{} : load(0);
    code_chunk odd = Variant == 1 || steps < 2 ? code_chunk{} : load(1);
    auto step = [&](unsigned kt, code_chunk& cur) {
      // decode 32 weights into row `row`, 16-byte chunks half * 4 + i, swizzled by row % 8
      float s = cur.scale;
      if constexpr (Nested)
        s = fmath::add(fmath::mul(dyn[cur.qcode], s), a.offset);
      s = cur.valid ? s : 0.0f;
      std::uint32_t const a_tile =
          a_tiles + (c * S::a_buffers + kt % S::a_buffers) * S::a_tile_bytes;
      std::uint32_t const row_addr = a_tile + row * 128;
      if constexpr (Variant != 1) {
        std::uint32_t const words[4] = {cur.codes.x, cur.codes.y, cur.codes.z, cur.codes.w};
        QMEM_UNROLL
        for (unsigned i = 0; i < 4; ++i) {
          std::uint32_t o[4];
          QMEM_UNROLL
          for (unsigned b = 0; b < 4; ++b) {
            std::uint32_t const byte = (words[i] >> (8 * b)) & 0xffu;
            o[b] = pack2<T>(fmath::mul(table[byte >> 4], s), fmath::mul(table[byte & 15u], s));
          }
          std::uint32_t const chunk = (half * 4 + i) ^ (row & 7u);
          asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};" ::"r"(row_addr + chunk * 16),
                       "r"(o[0]), "r"(o[1]), "r"(o[2]), "r"(o[3])
                       : "memory");
        }
      }
      if (Variant != 1 && kt + 2 < steps)
        cur = load(kt + 2);
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      asm volatile("bar.sync %0, 128;" ::"r"(1 + c) : "memory");
      unsigned const st = kt % S::stages;
      mbar_wait(bars + 8 * st, (kt / S::stages) & 1u);
      std::uint32_t const x_tile = x_tiles + st * S::x_tile_bytes;
      if constexpr (Variant != 2) {
        wgmma_fence();
        QMEM_UNROLL
        for (unsigned kk = 0; kk < S::depth / 16; ++kk)
          wgmma_64x256x16<T>(d, sw128_desc(a_tile + kk * 32), sw128_desc(x_tile + kk * 32), 1u);
        wgmma_commit();
        wgmma_wait<1>();
      } else {
        (void)x_tile;
      }
      if (kt > 0 && lane == 0)
        mbar_arrive(bars + 8 * (S::stages + (kt - 1) % S::stages));
    };
    for (unsigned kt = 0; kt < steps; kt += 2) {
      step(kt, even);
      if (kt + 1 < steps)
        step(kt + 1, odd);
    }
  }
  wgmma_wait<0>();
  // d[4 j + 2 h + e]: weight row warp * 16 + lane / 4 + 8 h, token 8 j + 2 (lane % 4) + e
  unsigned const r_base = n0 + c * 64 + warp * 16 + lane / 4;
  unsigned const t_base = m0 + 2 * (lane % 4);
  QMEM_UNROLL
  for (unsigned j = 0; j < S::tokens / 8; ++j)
    QMEM_UNROLL
  for (unsigned h = 0; h < 2; ++h)
    QMEM_UNROLL
  for (unsigned e = 0; e < 2; ++e) {
    unsigned const r = r_base + 8 * h, tok = t_base + 8 * j + e;
    if (r < a.n && tok < a.m)
      a.y[std::size_t{tok} * a.n + r] = round_to<T>(d[4 * j + 2 * h + e]);
  }
#else
  // not built for sm_90a: the host never launches this body except to probe
  if (probe != nullptr && threadIdx.x == 0)
    *probe = 0;
  (void)x_map;
  (void)a;
  (void)values;
  (void)nested;
#endif
}

//! The staged kernel's shared memory: the x ring, next to it a ring of code tiles (the 128 rows'
//! 32 code bytes of the step, by TMA) and of scale tiles (the 128 rows' block scale of each
//! 32-column half, written by the producer warpgroup), the mbarriers, the code table and the
//! nested map, plus 1024 bytes to align the swizzled x tiles (and, with the TMA-store epilogue,
//! the staging tile after the x ring). No A tiles (register A).
template <unsigned Stages, bool TmaStore = false>
struct staged_shape {
  static constexpr unsigned stages = Stages;
  //! the epilogue's staging tile (TmaStore): 128 rows x 256 tokens of T
  static constexpr unsigned staging_bytes =
      TmaStore ? tile_shape::rows * tile_shape::tokens * 2 : 0;
  static constexpr unsigned code_tile_bytes = tile_shape::rows * tile_shape::depth / 2;
  static constexpr unsigned scale_tile_bytes = tile_shape::rows * 2 * 4;
  static constexpr unsigned smem_bytes =
      1024 + stages * (tile_shape::x_tile_bytes + code_tile_bytes + scale_tile_bytes) +
      staging_bytes + 2 * stages * 8 + (16 + 256) * 4;
  static_assert(smem_bytes <= 232448, "an H100/H200 CTA has at most 227 KiB of shared memory");
};

//! y[m, n] = x[m, k] * dequant(w)^T like gemm_4bit_kernel's variant 3 (the weight decoded into
//! wgmma's register A operand, the same products in the same order: the same bits), with the
//! consumers' global loads moved to the producer warpgroup: per K step thread 0 loads the x tile
//! and the 128 rows' 32 code bytes (`code_map`: codes as bytes {k / 2, n}, box {32, 128}, no
//! swizzle) by TMA, and each of the 128 producer threads computes its row's two block scales
//! (round(value * scale)'s scale: absmax, or dyn[qabsmax] * absmax2 + offset when nested, 0 past
//! the last row or column) into the stage's scale tile; the stage's "full" mbarrier completes on
//! the TMA bytes and 129 arrivals (thread 0's expect_tx, then every producer thread after its
//! scale stores). A consumer thread reads its two fragment rows' codes (four 16-byte shared loads,
//! the quad's lanes the same addresses) and scales from the stage, so its only long-latency wait
//! is the "full" mbarrier, and it holds no code registers ahead (variant 3 kept two steps of codes
//! in 50 registers).
//! Tiles: tile index t = weight-row tile fastest; the CTA takes tiles blockIdx.x, blockIdx.x +
//! gridDim.x, ... (grid = tiles: one tile per CTA; grid = SM count: persistent, the producer
//! streams the next tile's stages while the consumers store the previous tile's outputs). The
//! ring's stage and parity follow a step counter that runs on across tiles.
//! `Stages`: the ring's depth (4 like gemm_4bit_kernel, up to 6 fit). `Decode` false (bench
//! only, to place the time): the A fragments keep constant weights, the codes and scales are
//! still staged, y gets the wrong product.
//! `TmaStore`: the epilogue writes the tile into a shared-memory staging tile (stmatrix, the
//! 128-byte swizzle) and one thread per consumer warpgroup stores its 64 rows by TMA (`y_map`:
//! y as {n, m}, box {64, 256}), which runs while the next tile's main loop starts; otherwise
//! (and with n % 8 != 0, where y's rows are not 16-byte aligned) each thread stores its outputs.
template <class T, bool Nested, unsigned Stages, bool Decode = true, bool TmaStore = false>
__global__ void __launch_bounds__(tile_shape::threads, 1)
    gemm_4bit_staged_kernel(__grid_constant__ CUtensorMap const x_map,
                            __grid_constant__ CUtensorMap const code_map,
                            __grid_constant__ CUtensorMap const y_map, gemm_args<T> const a,
                            __grid_constant__ code_table<16> const values,
                            __grid_constant__ code_table<256> const nested) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using S = tile_shape;
  using G = staged_shape<Stages, TmaStore>;
  extern __shared__ unsigned char smem_raw[];
  std::uint32_t const raw = smem_addr(smem_raw);
  std::uint32_t const pad = ((raw + 1023u) & ~1023u) - raw;
  std::uint32_t const x_tiles = raw + pad;
  // the staging tile (TmaStore) right after the x ring: 1024-byte aligned for the swizzle
  std::uint32_t const staging = x_tiles + G::stages * S::x_tile_bytes;
  std::uint32_t const code_off = pad + G::stages * S::x_tile_bytes + G::staging_bytes;
  std::uint32_t const scale_off = code_off + G::stages * G::code_tile_bytes;
  std::uint32_t const bar_off = scale_off + G::stages * G::scale_tile_bytes;
  std::uint32_t const bars = raw + bar_off;
  // full[s] at bars + 8 s, empty[s] at bars + 8 (stages + s)
  float* const scales = reinterpret_cast<float*>(smem_raw + scale_off);
  float* const table = reinterpret_cast<float*>(smem_raw + bar_off + 2 * G::stages * 8);
  float* const dyn = table + 16;
  unsigned const tid = threadIdx.x;
  load_tables<Nested>(table, dyn, values, nested);
  if (tid == 0) {
    for (unsigned s = 0; s < G::stages; ++s) {
      mbar_init(bars + 8 * s, 128 + 1);
      // every consumer thread releases the stage after its last read of it (its shared-memory
      // loads of the codes and scales, the x tile through its wgmma): one arrival per warp left
      // the other lanes' loads unordered before the producer's next stores (racecheck reported
      // those stores against the scale loads, H200 2026-11-30 22:09 and 22:24 UTC)
      mbar_init(bars + 8 * (G::stages + s), S::consumers * 128);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  unsigned const tiles_n = (a.n + S::rows - 1) / S::rows;
  unsigned const tiles = tiles_n * ((a.m + S::tokens - 1) / S::tokens);
  unsigned const steps = (a.k + S::depth - 1) / S::depth;
  if (tid < 128) {
    // producer warpgroup: thread 0 the TMA loads, every thread its row's scales
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;" ::: "memory");
    if (tid == 0) {
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<std::uint64_t>(&x_map))
                   : "memory");
      asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<std::uint64_t>(&code_map))
                   : "memory");
    }
    unsigned g = 0;
    for (unsigned tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      unsigned const n0 = tile % tiles_n * S::rows, m0 = tile / tiles_n * S::tokens;
      unsigned const r = n0 + tid;
      std::size_t const row_elem = std::size_t{r} * a.k;
      for (unsigned kt = 0; kt < steps; ++kt, ++g) {
        unsigned const s = g % G::stages;
        if (g >= G::stages)
          mbar_wait(bars + 8 * (G::stages + s), (g / G::stages - 1) & 1u);
        if (tid == 0) {
          mbar_expect_tx(bars + 8 * s, S::x_tile_bytes + G::code_tile_bytes);
          tma_load_2d(x_tiles + s * S::x_tile_bytes, &x_map, bars + 8 * s,
                      static_cast<int>(kt * S::depth), static_cast<int>(m0));
          tma_load_2d(raw + code_off + s * G::code_tile_bytes, &code_map, bars + 8 * s,
                      static_cast<int>(kt * S::depth / 2), static_cast<int>(n0));
        }
        QMEM_UNROLL
        for (unsigned h = 0; h < 2; ++h) {
          unsigned const col = kt * S::depth + 32 * h;
          float v = 0.0f;
          if (r < a.n && col < a.k) {
            std::size_t const b = (row_elem + col) >> a.block_shift;
            if constexpr (Nested)
              v = fmath::add(
                  fmath::mul(dyn[__ldg(a.qabsmax + b)], __ldg(a.absmax2 + (b >> a.nested_shift))),
                  a.offset);
            else
              v = __ldg(a.absmax + b);
          }
          scales[s * (S::rows * 2) + h * S::rows + tid] = v;
        }
        mbar_arrive(bars + 8 * s);
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;" ::: "memory");
  unsigned const c = tid / 128 - 1, t = tid % 128, lane = t % 32, warp = t / 32;
  unsigned const lrow = c * 64 + warp * 16 + lane / 4; // fragment rows lrow and lrow + 8
  unsigned const shift = 8 * (lane % 4);
  // decode the stage's codes of rows lrow, lrow + 8 into the k16 slices' A fragments (the
  // mapping of register_a_mainloop's decode)
  auto decode = [&](unsigned s, std::uint32_t(&frag)[4][4]) {
    if constexpr (!Decode) {
      QMEM_UNROLL
      for (unsigned i = 0; i < 16; ++i)
        frag[i / 4][i % 4] = 0x3c003c00u + s;
      return;
    }
    unsigned char const* const codes = smem_raw + code_off + s * G::code_tile_bytes;
    float const* const sc = scales + s * (S::rows * 2);
    QMEM_UNROLL
    for (unsigned i = 0; i < 4; ++i) {
      unsigned const rr = lrow + 8 * (i / 2), h = i % 2;
      uint4 const q = *reinterpret_cast<uint4 const*>(codes + rr * (S::depth / 2) + 16 * h);
      float const sv = sc[h * S::rows + rr];
      std::uint32_t const words[4] = {q.x, q.y, q.z, q.w};
      QMEM_UNROLL
      for (unsigned w = 0; w < 4; ++w) {
        std::uint32_t const byte = (words[w] >> shift) & 0xffu;
        frag[2 * h + w / 2][2 * (w % 2) + i / 2] =
            pack2<T>(fmath::mul(table[byte >> 4], sv), fmath::mul(table[byte & 15u], sv));
      }
    }
  };
  unsigned g = 0;
  for (unsigned tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    unsigned const n0 = tile % tiles_n * S::rows, m0 = tile / tiles_n * S::tokens;
    float d[128];
    QMEM_UNROLL
    for (int i = 0; i < 128; ++i)
      d[i] = 0.0f;
    std::uint32_t frag0[4][4], frag1[4][4];
    mbar_wait(bars + 8 * (g % G::stages), (g / G::stages) & 1u);
    decode(g % G::stages, frag0);
    // step kt (global g + kt): its stage's "full" barrier was waited for before its decode
    auto step = [&](unsigned kt, std::uint32_t(&cur)[4][4], std::uint32_t(&other)[4][4]) {
      unsigned const gk = g + kt, st = gk % G::stages;
      std::uint32_t const x_tile = x_tiles + st * S::x_tile_bytes;
      wgmma_fence();
      QMEM_UNROLL
      for (unsigned kk = 0; kk < S::depth / 16; ++kk)
        wgmma_64x256x16_rs<T>(d, cur[kk], sw128_desc(x_tile + kk * 32), 1u);
      wgmma_commit();
      wgmma_wait<1>(); // step kt - 1 retired: its stage and its registers (`other`) are free
      if (kt > 0)
        mbar_arrive(bars + 8 * (G::stages + (gk - 1) % G::stages));
      if (kt + 1 < steps) {
        unsigned const sn = (gk + 1) % G::stages;
        mbar_wait(bars + 8 * sn, ((gk + 1) / G::stages) & 1u);
        decode(sn, other);
      }
    };
    for (unsigned kt = 0; kt < steps; kt += 2) {
      step(kt, frag0, frag1);
      if (kt + 1 < steps)
        step(kt + 1, frag1, frag0);
    }
    wgmma_wait<0>();
    mbar_arrive(bars + 8 * (G::stages + (g + steps - 1) % G::stages));
    g += steps;
    // d[4 j + 2 h + e]: weight row warp * 16 + lane / 4 + 8 h, token 8 j + 2 (lane % 4) + e
    if constexpr (TmaStore) {
      // this warpgroup's 64 rows x 256 tokens as y's [token][row] box, 128 bytes per token,
      // 16-byte chunk k of token row tok at chunk k ^ (tok % 8) (the 128-byte swizzle)
      std::uint32_t const half = staging + c * (S::tokens * 128);
      if (t == 0)
        asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); // previous tile's store
      asm volatile("bar.sync %0, 128;" ::"r"(1 + c) : "memory");
      // stmatrix x4 .trans: matrices (h, j), (h + 1, j), (h, j + 1), (h + 1, j + 1) of 8 rows x
      // 8 tokens; lane l gives the address of token row l % 8 of matrix l / 8
      unsigned const mi = lane / 8, hh = mi % 2, tok_in = 8 * (mi / 2) + lane % 8;
      unsigned const chunk = 2 * warp + hh;
      QMEM_UNROLL
      for (unsigned j = 0; j < S::tokens / 8; j += 2) {
        unsigned const tok = 8 * j + tok_in;
        std::uint32_t const addr = half + tok * 128 + ((chunk ^ (tok % 8)) * 16);
        std::uint32_t const r0 = pack2<T>(d[4 * j + 0], d[4 * j + 1]);
        std::uint32_t const r1 = pack2<T>(d[4 * j + 2], d[4 * j + 3]);
        std::uint32_t const r2 = pack2<T>(d[4 * j + 4], d[4 * j + 5]);
        std::uint32_t const r3 = pack2<T>(d[4 * j + 6], d[4 * j + 7]);
        asm volatile(
            "stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};" ::"r"(addr),
            "r"(r0), "r"(r1), "r"(r2), "r"(r3)
            : "memory");
      }
      asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
      asm volatile("bar.sync %0, 128;" ::"r"(1 + c) : "memory");
      if (t == 0) {
        asm volatile(
            "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];" ::"l"(
                reinterpret_cast<std::uint64_t>(&y_map)),
            "r"(half), "r"(static_cast<int>(n0 + 64 * c)), "r"(static_cast<int>(m0))
            : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
      }
      continue;
    }
    // (a tile inside y stores without per-store bounds checks)
    unsigned const r_base = n0 + lrow;
    unsigned const t_base = m0 + 2 * (lane % 4);
    bool const inside = n0 + S::rows <= a.n && m0 + S::tokens <= a.m;
    QMEM_UNROLL
    for (unsigned j = 0; j < S::tokens / 8; ++j)
      QMEM_UNROLL
    for (unsigned h = 0; h < 2; ++h)
      QMEM_UNROLL
    for (unsigned e = 0; e < 2; ++e) {
      unsigned const r = r_base + 8 * h, tok = t_base + 8 * j + e;
      if (inside || (r < a.n && tok < a.m))
        a.y[std::size_t{tok} * a.n + r] = round_to<T>(d[4 * j + 2 * h + e]);
    }
  }
  if constexpr (TmaStore)
    if (t == 0)
      asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); // the stores done before exit
#else
  (void)x_map;
  (void)code_map;
  (void)y_map;
  (void)a;
  (void)values;
  (void)nested;
#endif
}

// ------------------------------------------------------------------------------------------------
// Host side

//! Whether the kernel takes this product: k a multiple of 32, a power-of-two block size >= 32,
//! a power-of-two nested block size (nested_shift >= 0) when nested, codes and x 16-byte aligned,
//! fewer than 2^31 tiles.
inline bool fits(std::size_t m, std::size_t n, std::size_t k, std::size_t block, bool nested,
                 int nested_shift, void const* codes, void const* x) noexcept {
  auto aligned = [](void const* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  std::size_t const tiles = ((n + tile_shape::rows - 1) / tile_shape::rows) *
                            ((m + tile_shape::tokens - 1) / tile_shape::tokens);
  return k % 32 == 0 && block >= 32 && (block & (block - 1)) == 0 &&
         (!nested || nested_shift >= 0) && aligned(codes) && aligned(x) &&
         tiles < (std::size_t{1} << 31);
}

//! Whether gemm_4bit_kernel<T, Nested> can run on `device`: compute capability 9.0 and the
//! kernel's code built for sm_90a (learned by launching the kernel once in probe mode on a
//! private stream and reading its answer back: one synchronization per kernel and device, the
//! first time). Not known yet while `stream` is capturing: returns false without probing (the
//! caller falls back for that call, so a first call inside a capture stays capturable).
//! Note: every translation unit that includes this header must be built for the same targets
//! (the kernel template's instances are one entity; the probe answers for the one that runs).
template <class T, bool Nested>
bool runnable(int device, cudaStream_t stream) {
  static std::mutex mutex;
  static int known[64] = {}; // 0 unknown, 1 yes, 2 no
  if (device < 0 || device >= 64)
    return false;
  std::lock_guard<std::mutex> lock(mutex);
  if (known[device] != 0)
    return known[device] == 1;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cuda_detail::check(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone)
    return false;
  cuda_detail::relaxed_capture_scope const relaxed;
  int major = 0, minor = 0;
  cuda_detail::check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
                     "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  cuda_detail::check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
                     "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
  if (major != 9 || minor != 0) {
    known[device] = 2;
    return false;
  }
  cudaStream_t s = nullptr;
  int* flag = nullptr;
  int answer = 0;
  cuda_detail::check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking),
                     "cudaStreamCreateWithFlags");
  cudaError_t status = cudaMallocAsync(reinterpret_cast<void**>(&flag), sizeof(int), s);
  if (status == cudaSuccess)
    status = cudaMemsetAsync(flag, 0, sizeof(int), s);
  if (status == cudaSuccess) {
    CUtensorMap const none{};
    gemm_4bit_kernel<T, Nested><<<1, tile_shape::threads, 0, s>>>(
        none, gemm_args<T>{}, flag, code_table<16>{}, code_table<256>{});
    status = cudaGetLastError();
  }
  if (status == cudaSuccess)
    status = cudaMemcpyAsync(&answer, flag, sizeof(int), cudaMemcpyDeviceToHost, s);
  if (flag != nullptr)
    (void)cudaFreeAsync(flag, s);
  cudaError_t const synced = cudaStreamSynchronize(s);
  (void)cudaStreamDestroy(s);
  cuda_detail::check(status, "the sm_90a GEMM kernel's probe launch");
  cuda_detail::check(synced, "cudaStreamSynchronize (sm_90a GEMM probe)");
  known[device] = answer == 1 ? 1 : 2;
  return answer == 1;
}

//! The driver's cuTensorMapEncodeTiled, found once through the runtime (no link to libcuda).
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 const fn = [] {
    cuda_detail::relaxed_capture_scope const relaxed;
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    cuda_detail::check(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                        cudaEnableDefault, &found),
                       "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (found != cudaDriverEntryPointSuccess || p == nullptr)
      throw cuda_error("cuTensorMapEncodeTiled is not available from the CUDA driver", 0);
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }();
  return fn;
}

//! x[m, k] as the kernel's TMA source: dims {k, m}, row stride 2k bytes, box {64, 256}, 128-byte
//! swizzle, out-of-bounds elements read as zeros. Preconditions (fits): x 16-byte aligned,
//! k % 8 == 0.
template <class T>
CUtensorMap activation_map(T const* x, std::size_t m, std::size_t k) {
  CUtensorMap map;
  cuuint64_t const dims[2] = {k, m};
  cuuint64_t const strides[1] = {k * sizeof(T)};
  cuuint32_t const box[2] = {tile_shape::depth, tile_shape::tokens};
  cuuint32_t const steps[2] = {1, 1};
  CUresult const r = tensor_map_encoder()(
      &map,
      std::same_as<T, bf16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      const_cast<T*>(x), dims, strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw cuda_error(qmem::detail::message("cuTensorMapEncodeTiled failed for activations ", m,
                                           " x ", k, ": CUresult ", static_cast<int>(r)),
                     static_cast<int>(r));
  return map;
}

//! Launches gemm_4bit_kernel<T, Nested> on e.stream for a.m x a.n x a.k. Preconditions (the
//! caller's): fits(...) and runnable<T, Nested>(...) hold; a describes x's product.
//! The codes [n, k / 2] as the staged kernel's TMA source: bytes, dims {k / 2, n}, row stride
//! k / 2 bytes, box {32, 128} (a step's 32 bytes of 128 rows), no swizzle, out-of-bounds bytes
//! read as zeros (their scale is 0). Preconditions (fits): codes 16-byte aligned, k % 32 == 0.
inline CUtensorMap code_map(std::uint8_t const* codes, std::size_t n, std::size_t k) {
  CUtensorMap map;
  cuuint64_t const dims[2] = {k / 2, n};
  cuuint64_t const strides[1] = {k / 2};
  cuuint32_t const box[2] = {tile_shape::depth / 2, tile_shape::rows};
  cuuint32_t const steps[2] = {1, 1};
  CUresult const r = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<std::uint8_t*>(codes), dims, strides, box,
      steps, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
      CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw cuda_error(qmem::detail::message("cuTensorMapEncodeTiled failed for codes ", n, " x ", k,
                                           ": CUresult ", static_cast<int>(r)),
                     static_cast<int>(r));
  return map;
}

//! The number of SMs of `device` (read once per device): the persistent grid.
inline unsigned sm_count(int device) {
  static std::atomic<int> counts[64] = {};
  int v = counts[device].load(std::memory_order_relaxed);
  if (v == 0) {
    cuda_detail::check(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device),
                       "cudaDeviceGetAttribute(MultiProcessorCount)");
    counts[device].store(v, std::memory_order_relaxed);
  }
  return static_cast<unsigned>(v);
}

//! y[m, n] as the TMA-store epilogue's destination: dims {n, m}, row stride 2n bytes, box {64,
//! 256} (a consumer warpgroup's 64 rows x 256 tokens), 128-byte swizzle; the store skips the box's
//! elements outside y. Preconditions (store_fits): y 16-byte aligned, n % 8 == 0.
template <class T>
CUtensorMap output_map(T* y, std::size_t m, std::size_t n) {
  CUtensorMap map;
  cuuint64_t const dims[2] = {n, m};
  cuuint64_t const strides[1] = {n * sizeof(T)};
  cuuint32_t const box[2] = {64, tile_shape::tokens};
  cuuint32_t const steps[2] = {1, 1};
  CUresult const r = tensor_map_encoder()(
      &map,
      std::same_as<T, bf16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
      y, dims, strides, box, steps, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw cuda_error(qmem::detail::message("cuTensorMapEncodeTiled failed for the output ", m,
                                           " x ", n, ": CUresult ", static_cast<int>(r)),
                     static_cast<int>(r));
  return map;
}

//! Whether y can be the TMA store's destination: 16-byte aligned rows (n % 8 == 0, y aligned).
template <class T>
bool store_fits(T const* y, std::size_t n) noexcept {
  return n % 8 == 0 && reinterpret_cast<std::uintptr_t>(y) % 16 == 0;
}

//! gemm_4bit_staged_kernel<T, Nested, Stages, Decode, TmaStore> on e.stream, persistent:
//! min(tiles, SMs) CTAs.
template <class T, bool Nested, unsigned Stages, bool Decode, bool TmaStore>
void launch_staged(exec::cuda const& e, T const* x, gemm_args<T> const& a,
                   code_table<16> const& values, code_table<256> const& nested) {
  using G = staged_shape<Stages, TmaStore>;
  constexpr auto kernel = &gemm_4bit_staged_kernel<T, Nested, Stages, Decode, TmaStore>;
  static std::once_flag flags[64];
  std::call_once(flags[e.device], [] {
    cuda_detail::relaxed_capture_scope const relaxed;
    cuda_detail::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(G::smem_bytes)),
                       "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  });
  unsigned const tiles = ((a.n + tile_shape::rows - 1) / tile_shape::rows) *
                         ((a.m + tile_shape::tokens - 1) / tile_shape::tokens);
  unsigned const grid = std::min(tiles, sm_count(e.device));
  CUtensorMap const y_map = TmaStore ? output_map(a.y, a.m, a.n) : CUtensorMap{};
  kernel<<<grid, tile_shape::threads, G::smem_bytes, e.stream>>>(
      activation_map(x, a.m, a.k), code_map(a.codes, a.n, a.k), y_map, a, values, nested);
  cuda_detail::check_launch(e, "qmem::quant::cuda_matmul::sm90::gemm_4bit_staged_kernel");
}

//! Launches the product on e.stream for a.m x a.n x a.k. Variant 0-3: gemm_4bit_kernel<T,
//! Nested, Variant> (one tile per CTA). 10: gemm_4bit_staged_kernel, four stages, persistent, with
//! the TMA-store epilogue (the plain one where store_fits fails); 7 (bench only): 10 with the plain
//! epilogue and without the decode. (4-6, the staged kernel one tile per CTA, persistent with the
//! plain epilogue and with six stages, were the steps to 10 and slower; 8, 9, 11 and 12 were
//! register code table variants, slower: removed, docs/benchmarks.md "gemm10".)
//! Preconditions (the caller's): fits(...) and runnable<T, Nested>(...) hold; a describes x's
//! product.
template <class T, bool Nested, int Variant = 0>
void launch(exec::cuda const& e, T const* x, gemm_args<T> const& a, code_table<16> const& values,
            code_table<256> const& nested) {
  static_assert((Variant >= 0 && Variant <= 3) || Variant == 7 || Variant == 10,
                "gemm_4bit variants are 0-3, 7 and 10");
  if constexpr (Variant == 7) {
    launch_staged<T, Nested, 4, false, false>(e, x, a, values, nested);
  } else if constexpr (Variant == 10) {
    if (store_fits(a.y, a.n))
      launch_staged<T, Nested, 4, true, true>(e, x, a, values, nested);
    else
      launch_staged<T, Nested, 4, true, false>(e, x, a, values, nested);
  } else {
    constexpr auto kernel = &gemm_4bit_kernel<T, Nested, Variant>;
    static std::once_flag flags[64];
    std::call_once(flags[e.device], [] {
      cuda_detail::relaxed_capture_scope const relaxed;
      cuda_detail::check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(tile_shape::smem_bytes)),
                         "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    });
    unsigned const tiles = ((a.n + tile_shape::rows - 1) / tile_shape::rows) *
                           ((a.m + tile_shape::tokens - 1) / tile_shape::tokens);
    kernel<<<tiles, tile_shape::threads, tile_shape::smem_bytes, e.stream>>>(
        activation_map(x, a.m, a.k), a, nullptr, values, nested);
    cuda_detail::check_launch(e, "qmem::quant::cuda_matmul::sm90::gemm_4bit_kernel");
  }
}

} // namespace qmem::quant::cuda_matmul::sm90
