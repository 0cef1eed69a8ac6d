// A CPU stand-in for the CUDA execution model, just enough to run peftkern's kernels on a machine without
// a GPU: one std::thread per CUDA thread, one block at a time, __shared__ as function statics (one copy,
// shared by the block's threads), __syncthreads as a std::barrier. Compiled by the host compiler (with
// AddressSanitizer in the test), it executes every index computation and bounds guard of the kernels on
// exactly-sized buffers. __CUDA_ARCH__ stays undefined, so 16-bit GEMMs take their tensor-core path (WMMA,
// emulated below) and the async copies their plain-copy form. Launches must be rewritten
// `kernel<<<cfg>>>(args)` -> `::emu::launch(kernel, cfg, args)` (tests/test_cuda_backend.py does it on a copy
// of the header).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <thread>
#include <vector>

// WMMA, emulated per thread: every thread of a warp holds the whole 16 x 16 tile (as float, which holds
// fp16/bf16 values exactly), so the collective loads, products and stores reduce to loops. The pointer and
// ldm rules of the real API (32-byte aligned pointers; ldm a multiple of 16 bytes) are checked, so a
// layout mistake aborts here instead of corrupting a tile on the GPU.
namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  float x[16 * 16];  // logical [row][col]
};

inline float element(float v) { return v; }
inline float element(__half v) { return __half2float(v); }
inline float element(__nv_bfloat16 v) { return __bfloat162float(v); }

inline void check_pointer(const void* p, unsigned ldm, size_t element_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * element_bytes) % 16 != 0) {
    std::fprintf(stderr, "wmma: pointer %p not 32-byte aligned or ldm %u not a 16-byte multiple\n", p, ldm);
    std::abort();
  }
}

template <typename F>
void fill_fragment(F& f, float v) {
  for (auto& e : f.x) e = v;
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  check_pointer(p, ldm, sizeof(T));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.x[r * 16 + c] = element(std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[c * ldm + r]);
}

template <typename TA, typename TB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const TA& a, const TB& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  fragment<accumulator, 16, 16, 16, float> out;
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[i * 16 + n];
      for (int k = 0; k < 16; ++k) acc = std::fma(a.x[i * 16 + k], b.x[k * 16 + n], acc);
      out.x[i * 16 + n] = acc;
    }
  d = out;
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_pointer(p, ldm, sizeof(float));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[r * 16 + c];
}
}  // namespace wmma
}  // namespace nvcuda

namespace emu {
inline thread_local dim3 thread_idx;
inline thread_local dim3 block_idx;
inline dim3 block_dim;
inline dim3 grid_dim;
inline std::barrier<>* block_barrier = nullptr;

inline void syncthreads() { block_barrier->arrive_and_wait(); }

// Each emulated thread walks every block of the grid in order; the barrier at the end of a block keeps the
// next block from touching shared memory (function statics) before every thread is done with this one.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/,
            Args... args) {
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  std::barrier<> barrier(threads);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([=, &barrier] {
      thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            block_idx = dim3(bx, by, bz);
            kernel(args...);
            barrier.arrive_and_wait();
          }
    });
  }
  for (auto& th : pool) th.join();
}
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, unsigned block, size_t smem, cudaStream_t stream,
            Args... args) {
  launch(kernel, dim3(grid), dim3(block), smem, stream, args...);
}
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, int block, size_t smem, cudaStream_t stream, Args... args) {
  launch(kernel, grid, dim3(block), smem, stream, args...);
}
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), unsigned grid, int block, size_t smem, cudaStream_t stream, Args... args) {
  launch(kernel, dim3(grid), dim3(block), smem, stream, args...);
}
}  // namespace emu

using std::min;

#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __launch_bounds__
#define __launch_bounds__(...)
#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define cudaGetLastError() cudaSuccess
#define cudaMemsetAsync(ptr, value, bytes, stream) (std::memset((ptr), (value), (bytes)), cudaSuccess)
