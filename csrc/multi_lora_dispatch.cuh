// Turns the raw structs of multi_lora_api.h into the typed launcher arguments of peftkern/multi_lora.cuh.
// Included by multi_lora_f16.cu, multi_lora_bf16.cu and multi_lora_f32.cu, one activation dtype each.
#pragma once

#include <type_traits>

#include "multi_lora_api.h"
#include "peftkern/lora_serving.cuh"
#include "peftkern/multi_lora.cuh"

namespace peftkern_ext {

static_assert(kMultiLoraDecodeMaxRows == peftkern::kMultiLoraDecodeMaxRows, "multi_lora_api.h is out of date");
static_assert(kMultiLoraSegmentRows == peftkern::kMultiLoraSegmentRows, "multi_lora_api.h is out of date");
static_assert(kMaxLoraSlices == peftkern::kMaxLoraSlices, "multi_lora_api.h is out of date");

template <typename T>
peftkern::Strided2D<T> typed_matrix(const RawMatrix& m) {
  return {reinterpret_cast<T*>(m.data), m.stride0, m.stride1};
}

template <typename T>
peftkern::Strided3D<T> typed_tensor3(const RawTensor3& t) {
  return {reinterpret_cast<T*>(t.data), t.stride0, t.stride1, t.stride2};
}

inline peftkern::MultiLoraSegments typed_segments(const RawSegments& s) {
  return {reinterpret_cast<int64_t*>(s.perm), reinterpret_cast<int64_t*>(s.bounds),
          reinterpret_cast<int64_t*>(s.tiles), s.n_tiles};
}

template <typename T, typename TA>
cudaError_t run_multi_forward(const RawMultiForward& a, cudaStream_t stream) {
  peftkern::MultiLoraForwardArgs<T, TA> args{};
  const peftkern::MultiLoraSegments segments = typed_segments(a.segments);
  args.segments = a.segments.perm != 0 ? &segments : nullptr;
  args.x = typed_matrix<const T>(a.x);
  args.weight = typed_matrix<const T>(a.weight);
  args.bias = reinterpret_cast<const T*>(a.bias);
  args.bias_stride = a.bias_stride;
  args.lora_a = typed_tensor3<const TA>(a.lora_a);
  args.lora_b = typed_tensor3<const TA>(a.lora_b);
  args.adapter_ids = reinterpret_cast<const void*>(a.adapter_ids);
  args.ids_int64 = a.ids_int64;
  args.scalings = reinterpret_cast<const float*>(a.scalings);
  args.ranks = reinterpret_cast<const int32_t*>(a.ranks);
  args.s = reinterpret_cast<float*>(a.s);
  args.y = typed_matrix<T>(a.y);
  args.M = a.M;
  args.N = a.N;
  args.K = a.K;
  args.L = a.L;
  args.R = a.R;
  args.path = a.path;
  return peftkern::launch_multi_lora_forward<T, TA>(args, reinterpret_cast<void*>(a.workspace), stream);
}

template <typename T, typename TA>
cudaError_t run_multi_backward(const RawMultiBackward& a, cudaStream_t stream) {
  peftkern::MultiLoraBackwardArgs<T, TA> args{};
  const peftkern::MultiLoraSegments segments = typed_segments(a.segments);
  args.segments = a.segments.perm != 0 ? &segments : nullptr;
  args.grad_y = typed_matrix<const T>(a.grad_y);
  args.x = typed_matrix<const T>(a.x);
  args.weight = typed_matrix<const T>(a.weight);
  args.lora_a = typed_tensor3<const TA>(a.lora_a);
  args.lora_b = typed_tensor3<const TA>(a.lora_b);
  args.adapter_ids = reinterpret_cast<const void*>(a.adapter_ids);
  args.ids_int64 = a.ids_int64;
  args.scalings = reinterpret_cast<const float*>(a.scalings);
  args.ranks = reinterpret_cast<const int32_t*>(a.ranks);
  args.s = reinterpret_cast<const float*>(a.s);
  args.grad_x = typed_matrix<T>(a.grad_x);
  args.grad_a = reinterpret_cast<TA*>(a.grad_a);
  args.grad_b = reinterpret_cast<TA*>(a.grad_b);
  args.M = a.M;
  args.N = a.N;
  args.K = a.K;
  args.L = a.L;
  args.R = a.R;
  args.path = a.path;
  return peftkern::launch_multi_lora_backward<T, TA>(args, reinterpret_cast<void*>(a.workspace), stream);
}

// fp32 activations take fp32 adapters only; 16-bit activations take their own dtype or fp32.
template <typename T>
cudaError_t dispatch_multi_forward(const RawMultiForward& a, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return run_multi_forward<float, float>(a, stream);
  } else {
    return a.adapter_fp32 ? run_multi_forward<T, float>(a, stream) : run_multi_forward<T, T>(a, stream);
  }
}

template <typename T>
cudaError_t dispatch_multi_backward(const RawMultiBackward& a, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return run_multi_backward<float, float>(a, stream);
  } else {
    return a.adapter_fp32 ? run_multi_backward<T, float>(a, stream) : run_multi_backward<T, T>(a, stream);
  }
}

template <typename TA>
peftkern::LoraSlices<TA> typed_slices(const RawLoraServing& a) {
  peftkern::LoraSlices<TA> slices{};
  slices.n = a.n_slices;
  for (int j = 0; j < a.n_slices && j < kMaxLoraSlices; ++j) {
    slices.w[j] = typed_tensor3<const TA>(a.slices[j]);
    slices.cols[j] = a.cols[j];
  }
  return slices;
}

template <typename T, typename TA>
cudaError_t run_lora_shrink(const RawLoraServing& a, cudaStream_t stream) {
  const peftkern::MultiLoraSegments segments = typed_segments({a.perm, 0, a.tiles, a.n_tiles});
  return peftkern::launch_lora_shrink<T, TA>(typed_matrix<const T>(a.x), typed_slices<TA>(a),
                                             reinterpret_cast<const void*>(a.adapter_ids), a.ids_int64,
                                             a.perm != 0 ? &segments : nullptr,
                                             reinterpret_cast<const int32_t*>(a.ranks), reinterpret_cast<float*>(a.s),
                                             a.M, a.K, a.L, a.R, stream);
}

template <typename T, typename TA>
cudaError_t run_lora_expand_add(const RawLoraServing& a, cudaStream_t stream) {
  return peftkern::launch_lora_expand_add<T, TA>(
      typed_matrix<T>(a.y), reinterpret_cast<const float*>(a.s), typed_slices<TA>(a),
      reinterpret_cast<const void*>(a.adapter_ids), a.ids_int64, reinterpret_cast<const int32_t*>(a.ranks),
      reinterpret_cast<const float*>(a.scalings), a.offset, a.M, a.L, a.R, stream);
}

template <typename T>
cudaError_t dispatch_lora_shrink(const RawLoraServing& a, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return run_lora_shrink<float, float>(a, stream);
  } else {
    return a.adapter_fp32 ? run_lora_shrink<T, float>(a, stream) : run_lora_shrink<T, T>(a, stream);
  }
}

template <typename T>
cudaError_t dispatch_lora_expand_add(const RawLoraServing& a, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return run_lora_expand_add<float, float>(a, stream);
  } else {
    return a.adapter_fp32 ? run_lora_expand_add<T, float>(a, stream) : run_lora_expand_add<T, T>(a, stream);
  }
}

}  // namespace peftkern_ext
