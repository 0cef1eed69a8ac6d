// The boundary between bindings_multi_lora.cpp (host C++, pybind11) and the multi-LoRA kernel translation
// units (nvcc): plain structs of addresses, strides and sizes, one non-template entry point per activation
// dtype (multi_lora_f16.cu, multi_lora_bf16.cu, multi_lora_f32.cu).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "raw_api.h"

namespace peftkern_ext {

// peftkern::kMultiLoraDecodeMaxRows and kMultiLoraSegmentRows (checked in multi_lora_dispatch.cuh).
constexpr int64_t kMultiLoraDecodeMaxRows = 64;
constexpr int64_t kMultiLoraSegmentRows = 64;

// A [d0, d1, d2] array: an address and three strides in elements.
struct RawTensor3 {
  uintptr_t data;
  int64_t stride0, stride1, stride2;
};

// A segment table in device memory (peftkern::MultiLoraSegments): perm [M], bounds [2, L + 1], tiles
// [3, n_tiles], int64; perm == 0: none.
struct RawSegments {
  uintptr_t perm, bounds, tiles;
  int64_t n_tiles;
};

struct RawMultiForward {
  RawMatrix x, weight, y;
  RawTensor3 lora_a, lora_b;
  uintptr_t bias;  // 0: none
  int64_t bias_stride;
  uintptr_t adapter_ids;  // [M] contiguous
  bool ids_int64;         // else int32
  uintptr_t scalings;     // [L] fp32
  uintptr_t ranks;        // [L] int32
  uintptr_t s;            // [M, R] fp32 contiguous
  uintptr_t workspace;    // multi_lora_forward_workspace_bytes
  int64_t M, N, K, L, R;
  int path;           // 0 auto, 1 decode, 2 prefill
  bool adapter_fp32;  // A and B are float32 (with 16-bit activations); else x's dtype
  RawSegments segments;  // a prebuilt 64-row segment table, or perm == 0
};

struct RawMultiBackward {
  RawMatrix grad_y, x, weight, grad_x;  // grad_x.data == 0: no dX
  RawTensor3 lora_a, lora_b;
  uintptr_t adapter_ids;
  bool ids_int64;
  uintptr_t scalings, ranks, s, grad_a, grad_b, workspace;
  int64_t M, N, K, L, R;
  int path;
  bool adapter_fp32;
  RawSegments segments;
};

// Workspace bytes (peftkern::multi_lora_forward_plan / multi_lora_backward_plan); defined in
// multi_lora_f32.cu.
int64_t multi_lora_forward_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t L, int path);
int64_t multi_lora_backward_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t L, int64_t R, int path);
// The segment table alone (peftkern::launch_multi_lora_segments), for tests: perm, bounds, tiles written
// into `out_*` device arrays of M, 2 (L + 1) and 3 n_tiles int64 after it ran in `workspace`.
int64_t multi_lora_segment_tiles(int64_t M, int64_t L);
int64_t multi_lora_segments_workspace_bytes(int64_t M, int64_t L);
cudaError_t multi_lora_segments(uintptr_t ids, bool ids_int64, int64_t M, int64_t L, uintptr_t workspace,
                                uintptr_t out_perm, uintptr_t out_bounds, uintptr_t out_tiles, cudaStream_t stream);

// The serving pieces (peftkern/lora_serving.cuh): shrink s[j] = x @ A_j[i].T and expand-add
// y[:, o_j : o_j + N_j] += scalings[i] * s[j] @ B_j[i].T, up to kMaxLoraSlices slices.
constexpr int kMaxLoraSlices = 8;  // peftkern::kMaxLoraSlices (checked in multi_lora_dispatch.cuh)

struct RawLoraServing {
  RawMatrix x;                          // shrink: [M, K]
  RawMatrix y;                          // expand-add: [M, >= offset + sum N_j]
  int n_slices;
  RawTensor3 slices[kMaxLoraSlices];    // A_j [L, R, K] (shrink) or B_j [L, N_j, R] (expand-add)
  int64_t cols[kMaxLoraSlices];         // N_j (expand-add)
  uintptr_t adapter_ids;                // [M] contiguous
  bool ids_int64;
  uintptr_t perm, tiles;                // shrink: the 64-row segment table (prefill), or 0 (decode)
  int64_t n_tiles;
  uintptr_t ranks, scalings;            // [L] int32, [L] fp32 (expand-add)
  uintptr_t s;                          // [n, M, R] fp32 contiguous
  int64_t offset, M, K, L, R;
  bool adapter_fp32;
};

cudaError_t lora_shrink_f16(const RawLoraServing& args, cudaStream_t stream);
cudaError_t lora_shrink_bf16(const RawLoraServing& args, cudaStream_t stream);
cudaError_t lora_shrink_f32(const RawLoraServing& args, cudaStream_t stream);
cudaError_t lora_expand_add_f16(const RawLoraServing& args, cudaStream_t stream);
cudaError_t lora_expand_add_bf16(const RawLoraServing& args, cudaStream_t stream);
cudaError_t lora_expand_add_f32(const RawLoraServing& args, cudaStream_t stream);

cudaError_t multi_lora_forward_f16(const RawMultiForward& args, cudaStream_t stream);
cudaError_t multi_lora_forward_bf16(const RawMultiForward& args, cudaStream_t stream);
cudaError_t multi_lora_forward_f32(const RawMultiForward& args, cudaStream_t stream);
cudaError_t multi_lora_backward_f16(const RawMultiBackward& args, cudaStream_t stream);
cudaError_t multi_lora_backward_bf16(const RawMultiBackward& args, cudaStream_t stream);
cudaError_t multi_lora_backward_f32(const RawMultiBackward& args, cudaStream_t stream);

}  // namespace peftkern_ext
