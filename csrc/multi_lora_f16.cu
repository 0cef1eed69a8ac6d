// The multi-LoRA kernels for half activations (one translation unit per dtype: they compile in parallel).
#include "multi_lora_dispatch.cuh"

namespace peftkern_ext {

cudaError_t multi_lora_forward_f16(const RawMultiForward& args, cudaStream_t stream) {
  return dispatch_multi_forward<half>(args, stream);
}

cudaError_t multi_lora_backward_f16(const RawMultiBackward& args, cudaStream_t stream) {
  return dispatch_multi_backward<half>(args, stream);
}

cudaError_t lora_shrink_f16(const RawLoraServing& args, cudaStream_t stream) {
  return dispatch_lora_shrink<half>(args, stream);
}

cudaError_t lora_expand_add_f16(const RawLoraServing& args, cudaStream_t stream) {
  return dispatch_lora_expand_add<half>(args, stream);
}

}  // namespace peftkern_ext
