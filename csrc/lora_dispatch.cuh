// Turns the raw structs of lora_api.h into the typed launcher arguments of peftkern/lora.cuh.
// Included by lora_f16.cu, lora_bf16.cu and lora_f32.cu, one activation dtype each.
#pragma once

#include <type_traits>

#include "lora_api.h"
#include "peftkern/lora.cuh"

namespace peftkern_ext {

template <typename T>
peftkern::Strided2D<T> typed(const RawMatrix& m) {
  return {reinterpret_cast<T*>(m.data), m.stride0, m.stride1};
}

template <typename T, typename TA>
cudaError_t run_forward(const RawForward& a, cudaStream_t stream) {
  peftkern::LoraForwardArgs<T, TA> args{};
  args.x = typed<const T>(a.x);
  args.weight = typed<const T>(a.weight);
  args.bias = reinterpret_cast<const T*>(a.bias);
  args.bias_stride = a.bias_stride;
  args.lora_a = typed<const TA>(a.lora_a);
  args.lora_b = typed<const TA>(a.lora_b);
  args.s = reinterpret_cast<float*>(a.s);
  args.y = typed<T>(a.y);
  args.M = a.M;
  args.N = a.N;
  args.K = a.K;
  args.R = a.R;
  args.scaling = a.scaling;
  args.dropout_p = a.dropout_p;
  args.seed = reinterpret_cast<const int64_t*>(a.seed);
  return peftkern::launch_lora_forward<T, TA>(args, stream);
}

template <typename T, typename TA>
cudaError_t run_backward(const RawBackward& a, cudaStream_t stream) {
  peftkern::LoraBackwardArgs<T, TA> args{};
  args.grad_y = typed<const T>(a.grad_y);
  args.x = typed<const T>(a.x);
  args.weight = typed<const T>(a.weight);
  args.lora_a = typed<const TA>(a.lora_a);
  args.lora_b = typed<const TA>(a.lora_b);
  args.s = reinterpret_cast<const float*>(a.s);
  args.grad_x = typed<T>(a.grad_x);
  args.grad_a = reinterpret_cast<TA*>(a.grad_a);
  args.grad_b = reinterpret_cast<TA*>(a.grad_b);
  args.M = a.M;
  args.N = a.N;
  args.K = a.K;
  args.R = a.R;
  args.scaling = a.scaling;
  args.dropout_p = a.dropout_p;
  args.seed = reinterpret_cast<const int64_t*>(a.seed);
  return peftkern::launch_lora_backward<T, TA>(args, reinterpret_cast<float*>(a.workspace), stream);
}

// fp32 activations take fp32 adapters only; 16-bit activations take their own dtype or fp32.
template <typename T>
cudaError_t dispatch_forward(const RawForward& a, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return run_forward<float, float>(a, stream);
  } else {
    return a.adapter_fp32 ? run_forward<T, float>(a, stream) : run_forward<T, T>(a, stream);
  }
}

template <typename T>
cudaError_t dispatch_backward(const RawBackward& a, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return run_backward<float, float>(a, stream);
  } else {
    return a.adapter_fp32 ? run_backward<T, float>(a, stream) : run_backward<T, T>(a, stream);
  }
}

}  // namespace peftkern_ext
