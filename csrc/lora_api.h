// The boundary between bindings.cpp (host C++, pybind11) and the kernel translation units (nvcc):
// plain structs of addresses, strides and sizes, and one non-template entry point per activation dtype,
// so that pybind11 is never compiled by nvcc and the dtypes compile in parallel.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "raw_api.h"

namespace peftkern_ext {

struct RawForward {
  RawMatrix x, weight, lora_a, lora_b, y;
  uintptr_t bias;  // 0: none
  int64_t bias_stride;
  uintptr_t s;  // [M, R] fp32 contiguous
  int64_t M, N, K, R;
  float scaling, dropout_p;
  uintptr_t seed;  // device address of one int64; 0: no dropout
  bool adapter_fp32;  // A and B are float32 (with 16-bit activations); else x's dtype
};

struct RawBackward {
  RawMatrix grad_y, x, weight, lora_a, lora_b, grad_x;  // grad_x.data == 0: no dX
  uintptr_t s, grad_a, grad_b, workspace;
  int64_t M, N, K, R;
  float scaling, dropout_p;
  uintptr_t seed;
  bool adapter_fp32;
};

// fp32 elements of the backward workspace (peftkern::lora_backward_plan); defined in lora_f32.cu.
int64_t lora_backward_workspace_floats(int64_t M, int64_t N, int64_t K, int64_t R);

// Defined in lora_f16.cu, lora_bf16.cu, lora_f32.cu.
cudaError_t lora_forward_f16(const RawForward& args, cudaStream_t stream);
cudaError_t lora_forward_bf16(const RawForward& args, cudaStream_t stream);
cudaError_t lora_forward_f32(const RawForward& args, cudaStream_t stream);
cudaError_t lora_backward_f16(const RawBackward& args, cudaStream_t stream);
cudaError_t lora_backward_bf16(const RawBackward& args, cudaStream_t stream);
cudaError_t lora_backward_f32(const RawBackward& args, cudaStream_t stream);

}  // namespace peftkern_ext
