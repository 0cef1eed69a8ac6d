// peftkern/common.cuh: pieces shared by the peftkern CUDA kernels. Header-only, no torch.
//
//   DType<T>             float conversions for half, __nv_bfloat16 and float
//   Strided2D<T>         a pointer with two int64 strides (elements), the way every launcher takes a matrix
//   philox_uniform()     the dropout stream of peftkern/reference.py::philox_uniform, bit for bit
//   dropout_keep()       keep-mask of element (row, col) of a row-major [*, n_cols] matrix
//
// Requires C++17 (if constexpr) and CUDA 11+ (bf16).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

// The headers' version (also peftkern::kVersionMajor / kVersionMinor / kVersionPatch, per vendored copy).
#define PEFTKERN_VERSION_MAJOR 0
#define PEFTKERN_VERSION_MINOR 1
#define PEFTKERN_VERSION_PATCH 0

// Everything lives in peftkern::PEFTKERN_ABI_NAMESPACE, an inline namespace: callers write peftkern::name, and
// two vendored copies in one program stay apart when each is included under its own name (define
// PEFTKERN_ABI_NAMESPACE before including a copy, #undef it before the next; then qualify
// peftkern::<name>::launch_..., since plain peftkern:: is ambiguous between them). Default: the version.
#ifndef PEFTKERN_ABI_NAMESPACE
#define PEFTKERN_ABI_NAMESPACE v0_1_0
#endif

// Debug builds (PEFTKERN_DEBUG defined) check in the kernels the assumptions the fast paths trust, such as the
// 16-byte alignment of every cp.async source; release builds compile the checks out.
#if defined(PEFTKERN_DEBUG)
#include <cassert>
#define PEFTKERN_DEBUG_ASSERT(cond) assert(cond)
#else
#define PEFTKERN_DEBUG_ASSERT(cond) ((void)0)
#endif

namespace peftkern {
inline namespace PEFTKERN_ABI_NAMESPACE {

constexpr int kVersionMajor = PEFTKERN_VERSION_MAJOR;
constexpr int kVersionMinor = PEFTKERN_VERSION_MINOR;
constexpr int kVersionPatch = PEFTKERN_VERSION_PATCH;

// ---- dtypes ---------------------------------------------------------------------------------------------

template <typename T>
struct DType;

template <>
struct DType<float> {
  static constexpr const char* name = "float32";
  __host__ __device__ static inline float to_float(float v) { return v; }
  __host__ __device__ static inline float from_float(float v) { return v; }
};

template <>
struct DType<half> {
  static constexpr const char* name = "float16";
  __host__ __device__ static inline float to_float(half v) { return __half2float(v); }
  __host__ __device__ static inline half from_float(float v) { return __float2half_rn(v); }
};

template <>
struct DType<__nv_bfloat16> {
  static constexpr const char* name = "bfloat16";
  __host__ __device__ static inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __host__ __device__ static inline __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};

namespace detail {

template <typename T>
__host__ __device__ inline float to_float(T v) {
  return DType<T>::to_float(v);
}

template <typename T>
__host__ __device__ inline T from_float(float v) {
  return DType<T>::from_float(v);
}

}  // namespace detail

// A matrix as a pointer and the strides (in elements) of its two dimensions: element (i, j) is at
// data[i * stride0 + j * stride1]. Any strides, transposed views included; offsets are computed in int64.
template <typename T>
struct Strided2D {
  T* data;
  int64_t stride0;
  int64_t stride1;
  __host__ __device__ inline T& at(int64_t i, int64_t j) const { return data[i * stride0 + j * stride1]; }
};

// ---- dropout: Philox-4x32-10 ------------------------------------------------------------------------------
//
// The stream of triton.language.randint4x(seed, offset) for an int64 offset, which peftkern/reference.py
// writes out in torch: counter (lo32(offset), hi32(offset), 0, 0), key (lo32(seed), hi32(seed)), ten rounds;
// each output word bitcast to int32, negatives folded with ~x, times 4.6566127342e-10f is a uniform draw.
// Every backend draws the same mask for the same seed, so the backward regenerates it instead of storing it.

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
// The largest float32 scale with (2**31 - 1) * scale < 1: draws lie in [0, 1).
constexpr float kUniformScale = 4.6566127342e-10f;

__host__ __device__ inline uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// The four Philox-4x32-10 output words for counter `offset` under key `seed` (tl.randint4x).
__host__ __device__ inline void philox_words(uint64_t seed, uint64_t offset, uint32_t words[4]) {
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0u;
  uint32_t c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev_c0 = c0;
    const uint32_t prev_c2 = c2;
    c0 = mulhi32(kPhiloxRoundB, prev_c2) ^ c1 ^ k0;
    c2 = mulhi32(kPhiloxRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * prev_c2;
    c3 = kPhiloxRoundA * prev_c0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  words[0] = c0;
  words[1] = c1;
  words[2] = c2;
  words[3] = c3;
}

// The first Philox-4x32-10 output word for counter `offset` under key `seed`.
__host__ __device__ inline uint32_t philox_first_word(uint64_t seed, uint64_t offset) {
  uint32_t words[4];
  philox_words(seed, offset, words);
  return words[0];
}

// A Philox word as a uniform float in [0, 1): reference.uniform_from_words / tl.uint_to_uniform_float.
__host__ __device__ inline float uniform_from_word(uint32_t word) {
  int32_t bits = static_cast<int32_t>(word);
  if (bits < 0) bits = ~bits;
  // int -> float rounds to nearest (as torch's .to(float32) and Triton's cast do), then one fp32 multiply.
  return static_cast<float>(bits) * kUniformScale;
}

// Uniform float in [0, 1) for counter `offset`: bit-exact with reference.philox_uniform / tl.rand.
__host__ __device__ inline float philox_uniform(uint64_t seed, uint64_t offset) {
  return uniform_from_word(philox_first_word(seed, offset));
}

// Whether element (row, col) of a row-major [*, n_cols] matrix survives dropout with drop probability p, as
// reference.dropout_mask draws it: word col % 4 of the Philox call at counter row * ceil(n_cols / 4) + col / 4
// (one call decides four neighbouring elements of a row).
__host__ __device__ inline bool dropout_keep(int64_t seed, int64_t row, int64_t col, int64_t n_cols, float p) {
  const int64_t groups = (n_cols + 3) / 4;
  uint32_t words[4];
  philox_words(static_cast<uint64_t>(seed), static_cast<uint64_t>(row * groups + col / 4), words);
  return uniform_from_word(words[col % 4]) >= p;
}

namespace detail {

// ---- asynchronous copies (sm_80+: cp.async; elsewhere plain copies, and the waits are no-ops) ------------

// Copy 16 bytes from global to shared memory; both addresses 16-byte aligned.
__device__ inline void copy16_async(void* smem_dst, const void* gmem_src) {
  PEFTKERN_DEBUG_ASSERT(reinterpret_cast<uintptr_t>(smem_dst) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(gmem_src) % 16 == 0);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src) : "memory");
#else
  *reinterpret_cast<uint4*>(smem_dst) = *reinterpret_cast<const uint4*>(gmem_src);
#endif
}

// Close the group of copies issued so far by this thread.
__device__ inline void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most `kPending` of this thread's committed groups are still in flight.
template <int kPending>
__device__ inline void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
#endif
}

// ---- dynamic shared memory ------------------------------------------------------------------------------

// The block's dynamic shared memory (extern __shared__, 128-byte aligned), sized by the launch: kernels whose
// shared memory comes near the 48 KiB a static array may take keep their largest buffer here, so a larger
// configuration only needs a bigger launch size (and cudaFuncSetAttribute past 48 KiB), not a new kernel.
__device__ inline unsigned char* dynamic_smem() {
#if defined(PEFTKERN_EMULATED_DYNAMIC_SMEM)
  return PEFTKERN_EMULATED_DYNAMIC_SMEM();  // the CPU emulator's per-launch buffer
#else
  extern __shared__ __align__(128) unsigned char peftkern_dynamic_smem[];
  return peftkern_dynamic_smem;
#endif
}

// ---- launch helpers ------------------------------------------------------------------------------------

// The status of the launch just made: cudaPeekAtLastError right after it (a launch configuration error is
// this launch's; cudaGetLastError would also clear, and so blame on this call, an error left by earlier work).
inline cudaError_t launch_status() { return cudaPeekAtLastError(); }

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Largest grid.x; grid.y and grid.z allow 65535.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

// Split `total` items into at most `max_parts` parts, each a whole number of `block`s:
// parts * per_part >= total, every part non-empty. total >= 1.
inline void split_into_parts(int64_t total, int64_t block, int64_t max_parts, int64_t* parts, int64_t* per_part) {
  const int64_t blocks = ceil_div(total, block);
  int64_t n = blocks < max_parts ? blocks : max_parts;
  if (n < 1) n = 1;
  *per_part = ceil_div(blocks, n) * block;
  *parts = ceil_div(total, *per_part);
}

// Whether a [rows, cols] matrix can be read 16 bytes at a time along its second dimension: contiguous
// along it, the base 16-byte aligned and each row starting on a 16-byte boundary.
template <typename T>
inline bool rows_vectorizable(const T* data, int64_t stride0, int64_t stride1) {
  constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(T));
  return stride1 == 1 && (reinterpret_cast<uintptr_t>(data) % 16) == 0 && (stride0 % kVec) == 0;
}

}  // namespace detail

}  // inline namespace PEFTKERN_ABI_NAMESPACE
}  // namespace peftkern
