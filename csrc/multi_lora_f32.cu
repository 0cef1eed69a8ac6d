// The multi-LoRA kernels for float activations, the workspace sizes and the standalone segment table.
#include "multi_lora_dispatch.cuh"

namespace peftkern_ext {

cudaError_t multi_lora_forward_f32(const RawMultiForward& args, cudaStream_t stream) {
  return dispatch_multi_forward<float>(args, stream);
}

cudaError_t multi_lora_backward_f32(const RawMultiBackward& args, cudaStream_t stream) {
  return dispatch_multi_backward<float>(args, stream);
}

int64_t multi_lora_forward_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t L, int path) {
  return peftkern::multi_lora_forward_plan(M, N, K, L, path).workspace_bytes;
}

int64_t multi_lora_backward_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t L, int64_t R, int path) {
  return peftkern::multi_lora_backward_plan(M, N, K, L, R, path).workspace_bytes;
}

int64_t multi_lora_segment_tiles(int64_t M, int64_t L) { return peftkern::multi_lora_segment_tiles(M, L); }

int64_t multi_lora_segments_workspace_bytes(int64_t M, int64_t L) {
  return peftkern::multi_lora_segments_workspace_bytes(M, L);
}

cudaError_t multi_lora_segments(uintptr_t ids, bool ids_int64, int64_t M, int64_t L, uintptr_t workspace,
                                uintptr_t out_perm, uintptr_t out_bounds, uintptr_t out_tiles, cudaStream_t stream) {
  peftkern::MultiLoraSegments seg{};
  cudaError_t err = peftkern::launch_multi_lora_segments(reinterpret_cast<const void*>(ids), ids_int64, M, L,
                                                         reinterpret_cast<void*>(workspace), &seg, stream);
  if (err != cudaSuccess) return err;
  // Copy the table out of the workspace (device to device, stream-ordered: no sync).
  if (M > 0 && (err = cudaMemcpyAsync(reinterpret_cast<void*>(out_perm), seg.perm, sizeof(int64_t) * M,
                                      cudaMemcpyDeviceToDevice, stream)) != cudaSuccess)
    return err;
  if ((err = cudaMemcpyAsync(reinterpret_cast<void*>(out_bounds), seg.bounds, sizeof(int64_t) * 2 * (L + 1),
                             cudaMemcpyDeviceToDevice, stream)) != cudaSuccess)
    return err;
  if (seg.n_tiles == 0) return cudaSuccess;
  return cudaMemcpyAsync(reinterpret_cast<void*>(out_tiles), seg.tiles, sizeof(int64_t) * 3 * seg.n_tiles,
                         cudaMemcpyDeviceToDevice, stream);
}

cudaError_t lora_shrink_f32(const RawLoraServing& args, cudaStream_t stream) {
  return dispatch_lora_shrink<float>(args, stream);
}

cudaError_t lora_expand_add_f32(const RawLoraServing& args, cudaStream_t stream) {
  return dispatch_lora_expand_add<float>(args, stream);
}

}  // namespace peftkern_ext
