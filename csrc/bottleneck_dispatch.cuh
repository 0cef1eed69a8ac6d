// Turns the raw structs of bottleneck_api.h into the typed launcher arguments of peftkern/bottleneck.cuh.
// Included by bottleneck_f16.cu, bottleneck_bf16.cu and bottleneck_f32.cu, one activation dtype each.
#pragma once

#include <type_traits>

#include "bottleneck_api.h"
#include "peftkern/bottleneck.cuh"

namespace peftkern_ext {

namespace bottleneck_raw {

template <typename T>
peftkern::Strided2D<T> typed(const RawMatrix& m) {
  return {reinterpret_cast<T*>(m.data), m.stride0, m.stride1};
}

template <typename T>
peftkern::Stacked3D<T> typed(const RawStacked& s) {
  return {reinterpret_cast<T*>(s.data), s.stride0, s.stride1, s.stride2};
}

inline peftkern::AdapterIds ids(uintptr_t data, bool int32) {
  return {reinterpret_cast<const void*>(data), int32};
}

template <typename T, typename TW>
cudaError_t run_forward(const RawBottleneckForward& a, cudaStream_t stream) {
  peftkern::BottleneckForwardArgs<T, TW> args{};
  args.x = typed<const T>(a.x);
  args.down_weight = typed<const TW>(a.down_weight);
  args.down_bias = typed<const TW>(a.down_bias);
  args.up_weight = typed<const TW>(a.up_weight);
  args.up_bias = typed<const TW>(a.up_bias);
  args.residual = typed<const T>(a.residual);
  args.adapter_ids = ids(a.adapter_ids, a.ids_int32);
  args.h = reinterpret_cast<float*>(a.h);
  args.act = reinterpret_cast<TW*>(a.act);
  args.y = typed<T>(a.y);
  args.M = a.M;
  args.D = a.D;
  args.NB = a.NB;
  args.L = a.L;
  args.activation = a.activation;
  args.scaling = a.scaling;
  return peftkern::launch_bottleneck_forward<T, TW>(args, stream);
}

template <typename T, typename TW>
cudaError_t run_backward(const RawBottleneckBackward& a, cudaStream_t stream) {
  peftkern::BottleneckBackwardArgs<T, TW> args{};
  args.grad_y = typed<const T>(a.grad_y);
  args.x = typed<const T>(a.x);
  args.down_weight = typed<const TW>(a.down_weight);
  args.up_weight = typed<const TW>(a.up_weight);
  args.h = reinterpret_cast<const float*>(a.h);
  args.adapter_ids = ids(a.adapter_ids, a.ids_int32);
  args.order = reinterpret_cast<const int64_t*>(a.order);
  args.segments = reinterpret_cast<const int64_t*>(a.segments);
  args.grad_x = typed<T>(a.grad_x);
  args.add_grad_y = a.add_grad_y;
  args.grad_down_weight = reinterpret_cast<TW*>(a.grad_down_weight);
  args.grad_down_bias = reinterpret_cast<TW*>(a.grad_down_bias);
  args.grad_up_weight = reinterpret_cast<TW*>(a.grad_up_weight);
  args.grad_up_bias = reinterpret_cast<TW*>(a.grad_up_bias);
  args.dh = reinterpret_cast<TW*>(a.dh);
  args.M = a.M;
  args.D = a.D;
  args.NB = a.NB;
  args.L = a.L;
  args.activation = a.activation;
  args.scaling = a.scaling;
  return peftkern::launch_bottleneck_backward<T, TW>(args, reinterpret_cast<float*>(a.workspace), stream);
}

}  // namespace bottleneck_raw

// fp32 activations take fp32 weights only; 16-bit activations take their own dtype or fp32.
template <typename T>
cudaError_t dispatch_bottleneck_forward(const RawBottleneckForward& a, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return bottleneck_raw::run_forward<float, float>(a, stream);
  } else {
    return a.adapter_fp32 ? bottleneck_raw::run_forward<T, float>(a, stream)
                          : bottleneck_raw::run_forward<T, T>(a, stream);
  }
}

template <typename T>
cudaError_t dispatch_bottleneck_backward(const RawBottleneckBackward& a, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return bottleneck_raw::run_backward<float, float>(a, stream);
  } else {
    return a.adapter_fp32 ? bottleneck_raw::run_backward<T, float>(a, stream)
                          : bottleneck_raw::run_backward<T, T>(a, stream);
  }
}

}  // namespace peftkern_ext
