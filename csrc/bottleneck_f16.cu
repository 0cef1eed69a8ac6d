// The bottleneck adapter kernels for half activations (one translation unit per dtype: they compile in parallel).
#include "bottleneck_dispatch.cuh"

namespace peftkern_ext {

cudaError_t bottleneck_forward_f16(const RawBottleneckForward& args, cudaStream_t stream) {
  return dispatch_bottleneck_forward<half>(args, stream);
}

cudaError_t bottleneck_backward_f16(const RawBottleneckBackward& args, cudaStream_t stream) {
  return dispatch_bottleneck_backward<half>(args, stream);
}

}  // namespace peftkern_ext
