// The multi-LoRA kernels for __nv_bfloat16 activations (one translation unit per dtype: they compile in parallel).
#include "multi_lora_dispatch.cuh"

namespace peftkern_ext {

cudaError_t multi_lora_forward_bf16(const RawMultiForward& args, cudaStream_t stream) {
  return dispatch_multi_forward<__nv_bfloat16>(args, stream);
}

cudaError_t multi_lora_backward_bf16(const RawMultiBackward& args, cudaStream_t stream) {
  return dispatch_multi_backward<__nv_bfloat16>(args, stream);
}

cudaError_t lora_shrink_bf16(const RawLoraServing& args, cudaStream_t stream) {
  return dispatch_lora_shrink<__nv_bfloat16>(args, stream);
}

cudaError_t lora_expand_add_bf16(const RawLoraServing& args, cudaStream_t stream) {
  return dispatch_lora_expand_add<__nv_bfloat16>(args, stream);
}

}  // namespace peftkern_ext
