// The LoRA kernels for float activations (one translation unit per dtype: they compile in parallel).
#include "lora_dispatch.cuh"

namespace peftkern_ext {

cudaError_t lora_forward_f32(const RawForward& args, cudaStream_t stream) {
  return dispatch_forward<float>(args, stream);
}

cudaError_t lora_backward_f32(const RawBackward& args, cudaStream_t stream) {
  return dispatch_backward<float>(args, stream);
}

int64_t lora_backward_workspace_floats(int64_t M, int64_t N, int64_t K, int64_t R) {
  return peftkern::lora_backward_plan(M, N, K, R).workspace_floats;
}

}  // namespace peftkern_ext
