// The LoRA kernels for __nv_bfloat16 activations (one translation unit per dtype: they compile in parallel).
#include "lora_dispatch.cuh"

namespace peftkern_ext {

cudaError_t lora_forward_bf16(const RawForward& args, cudaStream_t stream) {
  return dispatch_forward<__nv_bfloat16>(args, stream);
}

cudaError_t lora_backward_bf16(const RawBackward& args, cudaStream_t stream) {
  return dispatch_backward<__nv_bfloat16>(args, stream);
}

}  // namespace peftkern_ext
