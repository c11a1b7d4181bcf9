#pragma once
//! \file
//! Configuration: compiler and toolchain checks, host/device annotations, feature detection.
//! Every macro here may be defined by the user before including qmem to override it.

#if defined(_MSVC_LANG)
#define QMEM_CPLUSPLUS _MSVC_LANG
#else
#define QMEM_CPLUSPLUS __cplusplus
#endif

#if QMEM_CPLUSPLUS < 202002L
#error "qmem needs C++20: compile with -std=c++20 (nvcc: -std=c++20; CMake: link qmem::qmem)"
#endif

#if defined(__CUDACC__) && defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ < 12)
#error "qmem's CUDA backend needs CUDA 12 or newer (nvcc -std=c++20 support)"
#endif

//! QMEM_HAS_CUDA() is 1 in a translation unit compiled by a CUDA compiler (nvcc, clang -x cuda):
//! the CUDA kernels and the `cuda/` headers are available there. Host-only translation units get
//! the full host backend and no CUDA symbols.
#ifndef QMEM_HAS_CUDA
#if defined(__CUDACC__)
#define QMEM_HAS_CUDA() 1
#else
#define QMEM_HAS_CUDA() 0
#endif
#endif

//! QMEM_HAS_CUDA_RUNTIME() is 1 when the CUDA runtime headers can be included (true in CUDA
//! translation units, and in host translation units built against the CUDA toolkit).
#ifndef QMEM_HAS_CUDA_RUNTIME
#if QMEM_HAS_CUDA() || (defined(__has_include) && __has_include(<cuda_runtime_api.h>))
#define QMEM_HAS_CUDA_RUNTIME() 1
#else
#define QMEM_HAS_CUDA_RUNTIME() 0
#endif
#endif

#ifndef QMEM_HOST_DEVICE
#if QMEM_HAS_CUDA()
#define QMEM_HOST_DEVICE __host__ __device__
#define QMEM_DEVICE __device__
#define QMEM_HOST __host__
#else
#define QMEM_HOST_DEVICE
#define QMEM_DEVICE
#define QMEM_HOST
#endif
#endif

//! Force inlining of small element-level functions (the compilers' own attribute).
#ifndef QMEM_INLINE
#if QMEM_HAS_CUDA()
#define QMEM_INLINE __forceinline__
#elif defined(__GNUC__)
#define QMEM_INLINE inline __attribute__((always_inline))
#else
#define QMEM_INLINE inline
#endif
#endif

//! Ask the compiler to unroll the loop that follows.
#ifndef QMEM_UNROLL
#if defined(__CUDA_ARCH__)
#define QMEM_UNROLL _Pragma("unroll")
#elif defined(__CUDACC__) // nvcc's host pass: neither its front end nor g++ take the other's pragma
#define QMEM_UNROLL
#elif defined(__clang__)
#define QMEM_UNROLL _Pragma("clang loop unroll(full)")
#elif defined(__GNUC__)
#define QMEM_UNROLL _Pragma("GCC unroll 16")
#else
#define QMEM_UNROLL
#endif
#endif

//! Restrict-qualified pointers for the hot loops (no aliasing between inputs and outputs).
#ifndef QMEM_RESTRICT
#define QMEM_RESTRICT __restrict__
#endif

//! Precondition checks in public functions are always on. Internal hot loops may use
//! QMEM_ASSERT, which is compiled out unless QMEM_DEBUG is defined.
#ifndef QMEM_DEBUG
#define QMEM_DEBUG 0
#endif

#define QMEM_VERSION_MAJOR 0
#define QMEM_VERSION_MINOR 1
#define QMEM_VERSION_PATCH 0
