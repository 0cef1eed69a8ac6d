// The bottleneck adapter kernels for __nv_bfloat16 activations (one translation unit per dtype: they compile in parallel).
#include "bottleneck_dispatch.cuh"

namespace peftkern_ext {

cudaError_t bottleneck_forward_bf16(const RawBottleneckForward& args, cudaStream_t stream) {
  return dispatch_bottleneck_forward<__nv_bfloat16>(args, stream);
}

cudaError_t bottleneck_backward_bf16(const RawBottleneckBackward& args, cudaStream_t stream) {
  return dispatch_bottleneck_backward<__nv_bfloat16>(args, stream);
}

}  // namespace peftkern_ext
