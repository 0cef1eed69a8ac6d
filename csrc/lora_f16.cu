// The LoRA kernels for half activations (one translation unit per dtype: they compile in parallel).
#include "lora_dispatch.cuh"

namespace peftkern_ext {

cudaError_t lora_forward_f16(const RawForward& args, cudaStream_t stream) {
  return dispatch_forward<half>(args, stream);
}

cudaError_t lora_backward_f16(const RawBackward& args, cudaStream_t stream) {
  return dispatch_backward<half>(args, stream);
}

}  // namespace peftkern_ext
