// The raw-address boundary between bindings_prompt.cpp (host C++, pybind11) and prompt.cu (nvcc) for the
// soft-prompt ops: plain structs of addresses, strides and sizes, one entry point per dtype.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "raw_api.h"

namespace peftkern_ext {

// Ids (int32 or int64: bytes 4 or 8) or bit-copied elements (the mask, the labels: bytes 1, 2, 4 or 8).
struct RawElements {
  uintptr_t data;  // 0: absent
  int64_t stride0;
  int64_t stride1;
  int bytes;
};

struct RawPromptConcat {
  RawElements input_ids, prompt_ids, mask, labels;
  uintptr_t embed;
  int64_t embed_strides[2];
  uintptr_t prompts;
  int64_t prompts_strides[3];
  uintptr_t out;
  int64_t out_strides[3];
  uintptr_t mask_out;  // [B, n + T] contiguous, mask_bytes wide
  int mask_bytes;
  uint64_t mask_one;
  uintptr_t labels_out;  // [B, n + T] contiguous, labels.bytes wide; 0 when labels.data is
  uint64_t label_fill;
  int64_t B, T, n, D, V, P;
  bool prompts_fp32;  // prompts are float32 (with a 16-bit table); else the table's dtype
};

struct RawTaskSum {
  uintptr_t grad;
  int64_t strides[5];  // (b, j, c2, c1, c0)
  RawElements prompt_ids;
  uintptr_t out;  // [P, n, C] contiguous
  uintptr_t workspace;
  int64_t B, P, n, C, inner1, inner0;
  bool out_fp32;  // out is float32 (fp32 prompts with a 16-bit gradient); else grad's dtype
};

struct RawEmbedGrad {
  uintptr_t grad;
  int64_t strides[3];
  uintptr_t order, starts, out;
  int64_t B, T, n, D, V;
};

struct RawPrefixKv {
  uintptr_t prefix;
  int64_t prefix_strides[3];
  RawElements prompt_ids;
  uintptr_t out;
  int64_t out_strides[5];  // (b, j, c2, c1, c0)
  int64_t B, P, n, C, inner1, inner0;
};

// fp32 workspace elements of prompt_task_sum (peftkern::prompt_task_sum_plan); defined in prompt.cu.
int64_t prompt_task_sum_workspace_floats(int64_t B, int64_t P, int64_t n, int64_t C);

// Defined in prompt.cu.
cudaError_t prompt_concat_forward_f16(const RawPromptConcat& args, cudaStream_t stream);
cudaError_t prompt_concat_forward_bf16(const RawPromptConcat& args, cudaStream_t stream);
cudaError_t prompt_concat_forward_f32(const RawPromptConcat& args, cudaStream_t stream);
cudaError_t prompt_task_sum_f16(const RawTaskSum& args, cudaStream_t stream);
cudaError_t prompt_task_sum_bf16(const RawTaskSum& args, cudaStream_t stream);
cudaError_t prompt_task_sum_f32(const RawTaskSum& args, cudaStream_t stream);
cudaError_t prompt_embed_grad_f16(const RawEmbedGrad& args, cudaStream_t stream);
cudaError_t prompt_embed_grad_bf16(const RawEmbedGrad& args, cudaStream_t stream);
cudaError_t prompt_embed_grad_f32(const RawEmbedGrad& args, cudaStream_t stream);
cudaError_t prefix_kv_forward_f16(const RawPrefixKv& args, cudaStream_t stream);
cudaError_t prefix_kv_forward_bf16(const RawPrefixKv& args, cudaStream_t stream);
cudaError_t prefix_kv_forward_f32(const RawPrefixKv& args, cudaStream_t stream);

}  // namespace peftkern_ext
