// A CPU stand-in for the CUDA execution model, just enough to run peftkern's kernels on a machine without
// a GPU: one std::thread per CUDA thread, one block at a time in a shuffled order, __shared__ as function
// statics (one copy, shared by the block's threads, filled with 0xFF before each block), __syncthreads as a
// std::barrier, launch limits checked, the runtime's last-error state (get / peek) emulated. Compiled by the host compiler (with
// AddressSanitizer in the test), it executes every index computation and bounds guard of the kernels on
// exactly-sized buffers. __CUDA_ARCH__ stays undefined, so 16-bit GEMMs take their tensor-core path (WMMA,
// emulated below) and the async copies their plain-copy form. Launches must be rewritten
// `kernel<<<cfg>>>(args)` -> `::emu::launch(kernel, cfg, args)` and each __shared__ declaration followed by
// `::emu::shared_region(&name, sizeof(name));` (tests/_emulator.py does both on a copy of the headers).
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
#include <memory>
#include <mutex>
#include <random>
#include <type_traits>
#include <thread>
#include <utility>
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

bool first_lane_of_warp();  // emu: whether this emulated thread is lane 0 of its warp

// The warp writes each element once: lane 0 here (every lane holds the whole tile), so that lanes writing
// the same value concurrently are no race to ThreadSanitizer, and a read of the tile by another lane that
// no barrier orders after the store is one.
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  check_pointer(p, ldm, sizeof(float));
  if (!first_lane_of_warp()) return;
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

}  // namespace emu

inline bool nvcuda::wmma::first_lane_of_warp() {
  const unsigned linear =
      emu::thread_idx.x + emu::block_dim.x * (emu::thread_idx.y + emu::block_dim.y * emu::thread_idx.z);
  return linear % 32 == 0;
}

namespace emu {

// ---- the runtime's error state: cudaGetLastError returns and clears it, cudaPeekAtLastError only returns it.
inline cudaError_t last_error = cudaSuccess;
inline cudaError_t injected_error = cudaSuccess;
inline cudaError_t peek_last_error() { return last_error; }
inline cudaError_t get_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
// The next launch fails with `error` (and runs nothing), as a launch the device refuses would: the tests check
// that each launcher returns its own launch's error.
inline void fail_next_launch(cudaError_t error) { injected_error = error; }
// Set an error as earlier, unrelated work would leave it: a launcher must neither clear it nor fail for it.
inline void set_last_error(cudaError_t error) { last_error = error; }

// ---- the limits a launch is checked against (sm_80 / sm_90): a violation is reported and fails the launch
// with cudaErrorInvalidConfiguration, as on the device.
constexpr unsigned kMaxThreadsPerBlock = 1024;
constexpr unsigned kMaxBlockZ = 64;
constexpr unsigned long long kMaxGridX = 2147483647ull;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kMaxDynamicSmemDefault = 48 * 1024;  // more needs cudaFuncSetAttribute (not emulated)
inline unsigned long long launches = 0;
inline unsigned long long refused_launches = 0;

// ---- shared memory: every __shared__ variable registers its bytes when a thread reaches its declaration
// (tests/_emulator.py adds the call); they are filled with 0xFF (NaN in every float type, -1 in every int)
// when first seen and again before each block, so a read of shared memory no thread of the block wrote
// poisons the result instead of seeing a zero or the previous block's value.
inline std::mutex shared_mutex;
inline std::vector<std::pair<unsigned char*, size_t>> shared_regions;  // those the current launch declared
inline unsigned long long shared_generation = 0;                       // one per launch
inline thread_local unsigned long long thread_generation = ~0ull;
inline thread_local std::vector<void*> thread_seen;  // regions this thread already registered in this launch
inline constexpr unsigned char kSharedFill = 0xFF;
inline void shared_region(void* data, size_t bytes) {
  if (thread_generation != shared_generation) {
    thread_generation = shared_generation;
    thread_seen.clear();
  }
  for (void* seen : thread_seen)
    if (seen == data) return;
  thread_seen.push_back(data);
  std::lock_guard<std::mutex> lock(shared_mutex);
  auto* p = static_cast<unsigned char*>(data);
  for (const auto& region : shared_regions)
    if (region.first == p) return;
  shared_regions.emplace_back(p, bytes);  // first seen in this launch: fill before any thread uses it
  std::memset(p, kSharedFill, bytes);
}
// Dynamic shared memory (extern __shared__): a buffer of exactly the launch's bytes, so AddressSanitizer
// catches a kernel reading past what its launch asked for.
inline unsigned char* dynamic_smem_data = nullptr;
inline size_t dynamic_smem_bytes = 0;
inline unsigned char* dynamic_smem() { return dynamic_smem_data; }
inline void fill_shared() {
  std::lock_guard<std::mutex> lock(shared_mutex);
  for (const auto& region : shared_regions) std::memset(region.first, kSharedFill, region.second);
  if (dynamic_smem_data != nullptr) std::memset(dynamic_smem_data, kSharedFill, dynamic_smem_bytes);
}

// ---- block order: each launch runs its blocks one at a time in a shuffled order (seeded per launch from
// PEFTKERN_EMULATE_SEED, default 1), so a kernel that relies on one block running before another fails.
inline unsigned order_seed() {
  const char* env = std::getenv("PEFTKERN_EMULATE_SEED");
  return env != nullptr ? static_cast<unsigned>(std::strtoul(env, nullptr, 10)) : 1u;
}

inline bool launch_config_ok(dim3 grid, dim3 block, size_t smem) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  const char* why = nullptr;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) why = "an empty grid or block";
  else if (threads > kMaxThreadsPerBlock || block.x > 1024 || block.y > 1024 || block.z > kMaxBlockZ)
    why = "block dimensions over the limits (1024 threads; x, y <= 1024; z <= 64)";
  else if (grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ)
    why = "grid dimensions over the limits (x < 2^31, y and z <= 65535)";
  else if (smem > kMaxDynamicSmemDefault) why = "more than 48 KiB of dynamic shared memory without an opt-in";
  if (why == nullptr) return true;
  std::fprintf(stderr, "emu: launch refused: %s (grid %u x %u x %u, block %u x %u x %u, %zu bytes dynamic)\n",
               why, grid.x, grid.y, grid.z, block.x, block.y, block.z, smem);
  return false;
}

// Each emulated thread walks every block of the grid in the launch's shuffled order; a second barrier at the
// end of each block refills shared memory (its completion step) before any thread starts the next block.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/,
            Args... args) {
  ++launches;
  if (injected_error != cudaSuccess) {
    last_error = injected_error;
    injected_error = cudaSuccess;
    ++refused_launches;
    return;
  }
  if (!launch_config_ok(grid, block, smem)) {
    last_error = cudaErrorInvalidConfiguration;
    ++refused_launches;
    return;
  }
  grid_dim = grid;
  block_dim = block;
  const unsigned threads = block.x * block.y * block.z;
  std::vector<dim3> order;
  order.reserve(static_cast<size_t>(grid.x) * grid.y * grid.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) order.emplace_back(bx, by, bz);
  std::mt19937 rng(order_seed() * 1000003u + static_cast<unsigned>(launches));
  std::shuffle(order.begin(), order.end(), rng);
  std::unique_ptr<unsigned char[]> dynamic(smem > 0 ? new unsigned char[smem] : nullptr);
  dynamic_smem_data = dynamic.get();
  dynamic_smem_bytes = smem;
  ++shared_generation;
  shared_regions.clear();
  fill_shared();
  std::barrier<> barrier(threads);
  auto refill = []() noexcept { fill_shared(); };
  std::barrier<decltype(refill)> block_end(threads, refill);
  block_barrier = &barrier;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([=, &barrier, &block_end, &order] {
      thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (const dim3& b : order) {
        block_idx = b;
        kernel(args...);
        block_end.arrive_and_wait();
      }
    });
  }
  for (auto& th : pool) th.join();
  dynamic_smem_data = nullptr;
  dynamic_smem_bytes = 0;
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
#define cudaGetLastError() ::emu::get_last_error()
#define cudaPeekAtLastError() ::emu::peek_last_error()
// The headers' dynamic shared memory (extern __shared__) comes from the launch's buffer here.
#define PEFTKERN_EMULATED_DYNAMIC_SMEM() ::emu::dynamic_smem()
// Debug checks (PEFTKERN_DEBUG_ASSERT) on: the emulator runs the kernels with their assumptions checked.
#define PEFTKERN_DEBUG 1
#define cudaMemsetAsync(ptr, value, bytes, stream) (std::memset((ptr), (value), (bytes)), cudaSuccess)
