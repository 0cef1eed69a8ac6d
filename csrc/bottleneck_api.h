// The bottleneck adapter's raw-address boundary between bindings_bottleneck.cpp (host C++, pybind11) and its
// kernel translation units (nvcc): plain structs of addresses, strides and sizes, and one non-template entry
// point per activation dtype (bottleneck_f16.cu, bottleneck_bf16.cu, bottleneck_f32.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "raw_api.h"

namespace peftkern_ext {

// A stack [L, rows, cols]: element (l, i, j) at data + l * stride0 + i * stride1 + j * stride2 (elements).
struct RawStacked {
  uintptr_t data;
  int64_t stride0, stride1, stride2;
};

struct RawBottleneckForward {
  RawMatrix x, y;
  RawStacked down_weight, up_weight;
  RawMatrix down_bias, up_bias;  // [L, Bn], [L, D]; data 0: none
  RawMatrix residual;            // data 0: x
  uintptr_t adapter_ids;         // [M] contiguous int32 or int64; 0: every row uses adapter 0
  bool ids_int32;
  uintptr_t h;    // out: [M, Bn] fp32 contiguous
  uintptr_t act;  // workspace: [M, Bn] contiguous, in the weights' dtype
  int64_t M, D, NB, L;
  int activation;  // peftkern::BottleneckActivation
  float scaling;
  bool adapter_fp32;  // the weights are float32 (with 16-bit activations); else x's dtype
};

struct RawBottleneckBackward {
  RawMatrix grad_y, x, grad_x;  // grad_x.data 0: no dX
  RawStacked down_weight, up_weight;
  uintptr_t h;  // [M, Bn] fp32 contiguous
  uintptr_t adapter_ids;
  bool ids_int32;
  uintptr_t order, segments;  // int64 [M] and [L + 1]: rows grouped by adapter (with ids and weight grads)
  bool add_grad_y;
  uintptr_t grad_down_weight, grad_down_bias, grad_up_weight, grad_up_bias;  // contiguous; 0: not wanted
  uintptr_t dh;         // workspace: [M, Bn] contiguous, in the weights' dtype
  uintptr_t workspace;  // fp32, bottleneck_backward_workspace_floats(M, D, NB, L)
  int64_t M, D, NB, L;
  int activation;
  float scaling;
  bool adapter_fp32;
};

// fp32 elements of the backward workspace (peftkern::bottleneck_backward_plan); defined in bottleneck_f32.cu.
int64_t bottleneck_backward_workspace_floats(int64_t M, int64_t D, int64_t NB, int64_t L);

cudaError_t bottleneck_forward_f16(const RawBottleneckForward& args, cudaStream_t stream);
cudaError_t bottleneck_forward_bf16(const RawBottleneckForward& args, cudaStream_t stream);
cudaError_t bottleneck_forward_f32(const RawBottleneckForward& args, cudaStream_t stream);
cudaError_t bottleneck_backward_f16(const RawBottleneckBackward& args, cudaStream_t stream);
cudaError_t bottleneck_backward_bf16(const RawBottleneckBackward& args, cudaStream_t stream);
cudaError_t bottleneck_backward_f32(const RawBottleneckBackward& args, cudaStream_t stream);

}  // namespace peftkern_ext
