// The soft-prompt kernels (peftkern/prompt.cuh) behind prompt_api.h: raw structs to typed launcher arguments,
// one entry point per dtype of the embedding table / prefix. Small copy and sum kernels: one translation unit.
#include <type_traits>

#include "peftkern/prompt.cuh"
#include "prompt_api.h"

namespace peftkern_ext {
namespace {

peftkern::IdMatrix ids(const RawElements& e) {
  return {reinterpret_cast<const void*>(e.data), e.stride0, e.stride1, e.bytes};
}

peftkern::BitsMatrix bits(const RawElements& e) {
  return {reinterpret_cast<const void*>(e.data), e.stride0, e.stride1, e.bytes};
}

template <typename T, typename TP>
cudaError_t run_forward(const RawPromptConcat& r, cudaStream_t stream) {
  peftkern::PromptConcatArgs<T, TP> a{};
  a.input_ids = ids(r.input_ids);
  a.prompt_ids = ids(r.prompt_ids);
  a.embed = reinterpret_cast<const T*>(r.embed);
  a.embed_stride0 = r.embed_strides[0];
  a.embed_stride1 = r.embed_strides[1];
  a.prompts = reinterpret_cast<const TP*>(r.prompts);
  a.prompts_stride0 = r.prompts_strides[0];
  a.prompts_stride1 = r.prompts_strides[1];
  a.prompts_stride2 = r.prompts_strides[2];
  a.out = reinterpret_cast<T*>(r.out);
  a.out_stride0 = r.out_strides[0];
  a.out_stride1 = r.out_strides[1];
  a.out_stride2 = r.out_strides[2];
  a.mask = bits(r.mask);
  a.mask_out = reinterpret_cast<void*>(r.mask_out);
  a.mask_bytes = r.mask_bytes;
  a.mask_one = r.mask_one;
  a.labels = bits(r.labels);
  a.labels_out = reinterpret_cast<void*>(r.labels_out);
  a.label_fill = r.label_fill;
  a.B = r.B;
  a.length = r.T;
  a.n = r.n;
  a.D = r.D;
  a.V = r.V;
  a.P = r.P;
  return peftkern::launch_prompt_concat_forward<T, TP>(a, stream);
}

template <typename T>
cudaError_t dispatch_forward(const RawPromptConcat& r, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return run_forward<float, float>(r, stream);
  } else {
    return r.prompts_fp32 ? run_forward<T, float>(r, stream) : run_forward<T, T>(r, stream);
  }
}

template <typename T, typename TO>
cudaError_t run_task_sum(const RawTaskSum& r, cudaStream_t stream) {
  peftkern::TaskSumArgs<T, TO> a{};
  a.grad = reinterpret_cast<const T*>(r.grad);
  a.stride_b = r.strides[0];
  a.stride_j = r.strides[1];
  a.stride_c2 = r.strides[2];
  a.stride_c1 = r.strides[3];
  a.stride_c0 = r.strides[4];
  a.prompt_ids = ids(r.prompt_ids);
  a.out = reinterpret_cast<TO*>(r.out);
  a.B = r.B;
  a.P = r.P;
  a.n = r.n;
  a.C = r.C;
  a.inner1 = r.inner1;
  a.inner0 = r.inner0;
  return peftkern::launch_prompt_task_sum<T, TO>(a, reinterpret_cast<float*>(r.workspace), stream);
}

template <typename T>
cudaError_t dispatch_task_sum(const RawTaskSum& r, cudaStream_t stream) {
  if constexpr (std::is_same_v<T, float>) {
    return run_task_sum<float, float>(r, stream);
  } else {
    return r.out_fp32 ? run_task_sum<T, float>(r, stream) : run_task_sum<T, T>(r, stream);
  }
}

template <typename T>
cudaError_t run_embed_grad(const RawEmbedGrad& r, cudaStream_t stream) {
  peftkern::EmbedGradArgs<T> a{};
  a.grad = reinterpret_cast<const T*>(r.grad);
  a.grad_stride0 = r.strides[0];
  a.grad_stride1 = r.strides[1];
  a.grad_stride2 = r.strides[2];
  a.order = reinterpret_cast<const int64_t*>(r.order);
  a.starts = reinterpret_cast<const int64_t*>(r.starts);
  a.out = reinterpret_cast<T*>(r.out);
  a.B = r.B;
  a.length = r.T;
  a.n = r.n;
  a.D = r.D;
  a.V = r.V;
  return peftkern::launch_prompt_embed_grad<T>(a, stream);
}

template <typename T>
cudaError_t run_prefix_kv(const RawPrefixKv& r, cudaStream_t stream) {
  peftkern::PrefixKvArgs<T> a{};
  a.prefix = reinterpret_cast<const T*>(r.prefix);
  a.prefix_stride0 = r.prefix_strides[0];
  a.prefix_stride1 = r.prefix_strides[1];
  a.prefix_stride2 = r.prefix_strides[2];
  a.prompt_ids = ids(r.prompt_ids);
  a.out = reinterpret_cast<T*>(r.out);
  a.out_stride_b = r.out_strides[0];
  a.out_stride_j = r.out_strides[1];
  a.out_stride_c2 = r.out_strides[2];
  a.out_stride_c1 = r.out_strides[3];
  a.out_stride_c0 = r.out_strides[4];
  a.B = r.B;
  a.P = r.P;
  a.n = r.n;
  a.C = r.C;
  a.inner1 = r.inner1;
  a.inner0 = r.inner0;
  return peftkern::launch_prefix_kv_forward<T>(a, stream);
}

}  // namespace

int64_t prompt_task_sum_workspace_floats(int64_t B, int64_t P, int64_t n, int64_t C) {
  return peftkern::prompt_task_sum_plan(B, P, n, C).workspace_floats;
}

cudaError_t prompt_concat_forward_f16(const RawPromptConcat& r, cudaStream_t s) { return dispatch_forward<half>(r, s); }
cudaError_t prompt_concat_forward_bf16(const RawPromptConcat& r, cudaStream_t s) {
  return dispatch_forward<__nv_bfloat16>(r, s);
}
cudaError_t prompt_concat_forward_f32(const RawPromptConcat& r, cudaStream_t s) { return dispatch_forward<float>(r, s); }

cudaError_t prompt_task_sum_f16(const RawTaskSum& r, cudaStream_t s) { return dispatch_task_sum<half>(r, s); }
cudaError_t prompt_task_sum_bf16(const RawTaskSum& r, cudaStream_t s) { return dispatch_task_sum<__nv_bfloat16>(r, s); }
cudaError_t prompt_task_sum_f32(const RawTaskSum& r, cudaStream_t s) { return dispatch_task_sum<float>(r, s); }

cudaError_t prompt_embed_grad_f16(const RawEmbedGrad& r, cudaStream_t s) { return run_embed_grad<half>(r, s); }
cudaError_t prompt_embed_grad_bf16(const RawEmbedGrad& r, cudaStream_t s) { return run_embed_grad<__nv_bfloat16>(r, s); }
cudaError_t prompt_embed_grad_f32(const RawEmbedGrad& r, cudaStream_t s) { return run_embed_grad<float>(r, s); }

cudaError_t prefix_kv_forward_f16(const RawPrefixKv& r, cudaStream_t s) { return run_prefix_kv<half>(r, s); }
cudaError_t prefix_kv_forward_bf16(const RawPrefixKv& r, cudaStream_t s) { return run_prefix_kv<__nv_bfloat16>(r, s); }
cudaError_t prefix_kv_forward_f32(const RawPrefixKv& r, cudaStream_t s) { return run_prefix_kv<float>(r, s); }

}  // namespace peftkern_ext
