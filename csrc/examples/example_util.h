// Host helpers shared by the vendoring examples in this directory: a CUDA error check, deterministic random
// inputs, host-to-device copies and the no-device probe. Torch-free, like the examples themselves.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <vector>

// In main(): a failed CUDA call prints its name and the error, and the example exits 1.
#define CHECK_CUDA(call)                                                                     \
  do {                                                                                       \
    const cudaError_t err_ = (call);                                                         \
    if (err_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s failed: %s\n", #call, cudaGetErrorString(err_));              \
      return 1;                                                                              \
    }                                                                                        \
  } while (0)

namespace example {

// Deterministic values in [-1, 1) without <random>: the example must print the same on every machine.
inline float next_value(uint32_t* state) {
  *state = *state * 1664525u + 1013904223u;
  return static_cast<float>(*state >> 8) / 8388608.0f - 1.0f;
}

inline void store(half& dst, float v) { dst = __float2half(v); }
inline void store(__nv_bfloat16& dst, float v) { dst = __float2bfloat16(v); }

// count values of T (half or __nv_bfloat16), each next_value() * scale.
template <typename T>
std::vector<T> random_values(size_t count, uint32_t* state, float scale) {
  std::vector<T> out(count);
  for (auto& v : out) store(v, next_value(state) * scale);
  return out;
}

// A device copy of host, or nullptr if the allocation or the copy failed.
template <typename T>
T* to_device(const std::vector<T>& host) {
  T* dev = nullptr;
  if (cudaMalloc(&dev, host.size() * sizeof(T)) != cudaSuccess) return nullptr;
  if (cudaMemcpy(dev, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) != cudaSuccess) return nullptr;
  return dev;
}

// True (after saying so) where no CUDA device can run the example: it was compiled, and exits 2.
inline bool no_cuda_device() {
  int devices = 0;
  const cudaError_t probe = cudaGetDeviceCount(&devices);
  if (probe != cudaSuccess || devices == 0) {
    std::printf("no CUDA device here (%s): compiled, not run\n",
                probe != cudaSuccess ? cudaGetErrorString(probe) : "0 devices");
    return true;
  }
  return false;
}

}  // namespace example
