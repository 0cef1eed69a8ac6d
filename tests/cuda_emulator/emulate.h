// A CPU stand-in for the CUDA execution model, just enough to run peftkern's kernels on a machine without
// a GPU: one std::thread per CUDA thread, one block at a time, __shared__ as function statics (one copy,
// shared by the block's threads), __syncthreads as a std::barrier. Compiled by the host compiler (with
// AddressSanitizer in the test), it executes every index computation and bounds guard of the kernels on
// exactly-sized buffers. Tensor-core (WMMA) code cannot run here: __CUDA_ARCH__ is set below 700 so the
// GEMM takes its FMA path for every dtype. Launches must be rewritten `kernel<<<cfg>>>(args)` ->
// `::emu::launch(kernel, cfg, args)` (tests/test_cuda_backend.py does it on a copy of the header).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

// Declarations only: the WMMA branch is discarded for every instantiation here, but its non-dependent names
// must resolve.
namespace nvcuda {
namespace wmma {
struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
enum layout_t { mem_row_major, mem_col_major };
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {};
template <typename F, typename V>
void fill_fragment(F&, V);
template <typename F, typename P>
void load_matrix_sync(F&, const P*, unsigned);
template <typename C, typename A, typename B>
void mma_sync(C&, const A&, const B&, const C&);
template <typename F>
void store_matrix_sync(float*, const F&, unsigned, layout_t);
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
#define __CUDA_ARCH__ 600
