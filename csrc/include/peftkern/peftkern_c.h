/* peftkern/peftkern_c.h: a small C API over the serving pieces (lora_serving.cuh, multi_lora.cuh's segment
 * table) for callers that are not C++ (Rust, Go, Zig, C through FFI). Plain C: include it anywhere.
 *
 * The definitions are in peftkern_c.cuh: compile that file in exactly one CUDA translation unit of the
 * program (nvcc -I<dir holding peftkern/> -c my_peftkern_c.cu, whose only line is
 * #include <peftkern/peftkern_c.cuh>). Symbols are unprefixed by namespace (C linkage): define the C API from
 * one vendored copy only.
 *
 * Every function returns a cudaError_t: cudaErrorInvalidValue for a dtype pair or arguments the kernels do
 * not take (checked before any launch), else the status of its own launches. Arrays of per-slice values
 * hold n_slices entries (at most PEFTKERN_MAX_LORA_SLICES). Semantics, shapes and preconditions: the C++
 * functions named in each comment.
 */
#ifndef PEFTKERN_C_H_
#define PEFTKERN_C_H_

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PEFTKERN_C_API_VERSION 1
#define PEFTKERN_MAX_LORA_SLICES 8

/* Element types; the codes match peftkern._C's FLOAT16 / BFLOAT16 / FLOAT32. */
typedef enum peftkern_dtype {
  PEFTKERN_FLOAT16 = 0,
  PEFTKERN_BFLOAT16 = 1,
  PEFTKERN_FLOAT32 = 2
} peftkern_dtype;

/* multi_lora.cuh's MultiLoraSegments: device pointers into the workspace of peftkern_multi_lora_segments. */
typedef struct peftkern_segments {
  int64_t* perm;
  int64_t* bounds;
  int64_t* tiles;
  int64_t n_tiles;
} peftkern_segments;

/* The headers' version (PEFTKERN_VERSION_MAJOR / MINOR / PATCH of the copy the definitions came from). */
void peftkern_version(int* major, int* minor, int* patch);

/* peftkern::multi_lora_segments_workspace_bytes / multi_lora_segment_tiles (host arithmetic). */
int64_t peftkern_multi_lora_segments_workspace_bytes(int64_t M, int64_t L);
int64_t peftkern_multi_lora_segment_tiles(int64_t M, int64_t L);

/* peftkern::launch_multi_lora_segments: ids [M] int32 (ids_int64 = 0) or int64 (1); workspace 256-byte
 * aligned, peftkern_multi_lora_segments_workspace_bytes(M, L) bytes; *out points into it. */
cudaError_t peftkern_multi_lora_segments(const void* ids, int ids_int64, int64_t M, int64_t L, void* workspace,
                                         peftkern_segments* out, cudaStream_t stream);

/* peftkern::launch_lora_shrink (lora_serving.cuh): s [n_slices, M, R] fp32 contiguous. x [M, K] in x_dtype with
 * strides x_strides[0..1]; slice j: a[j] [L, R, K] in a_dtype (x_dtype or PEFTKERN_FLOAT32) with strides
 * a_strides[3 j .. 3 j + 2]; segments: NULL (decode kernel) or the ids' table. */
cudaError_t peftkern_lora_shrink(peftkern_dtype x_dtype, peftkern_dtype a_dtype, const void* x,
                                 const int64_t* x_strides, int n_slices, const void* const* a,
                                 const int64_t* a_strides, const void* ids, int ids_int64,
                                 const peftkern_segments* segments, const int32_t* ranks, float* s, int64_t M,
                                 int64_t K, int64_t L, int64_t R, cudaStream_t stream);

/* peftkern::launch_lora_expand_add: y [M, >= offset + sum cols] in y_dtype (strides y_strides[0..1]) += the
 * expand of each slice b[j] [L, cols[j], R] (b_dtype: y_dtype or PEFTKERN_FLOAT32, strides b_strides[3 j ..])
 * from s [n_slices, M, R] fp32 contiguous. */
cudaError_t peftkern_lora_expand_add(peftkern_dtype y_dtype, peftkern_dtype b_dtype, void* y,
                                     const int64_t* y_strides, const float* s, int n_slices, const void* const* b,
                                     const int64_t* b_strides, const int64_t* cols, const void* ids, int ids_int64,
                                     const int32_t* ranks, const float* scalings, int64_t offset, int64_t M,
                                     int64_t L, int64_t R, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* PEFTKERN_C_H_ */
