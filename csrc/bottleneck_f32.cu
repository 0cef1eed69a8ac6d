// The bottleneck adapter kernels for float activations (one translation unit per dtype: they compile in parallel).
#include "bottleneck_dispatch.cuh"

namespace peftkern_ext {

cudaError_t bottleneck_forward_f32(const RawBottleneckForward& args, cudaStream_t stream) {
  return dispatch_bottleneck_forward<float>(args, stream);
}

cudaError_t bottleneck_backward_f32(const RawBottleneckBackward& args, cudaStream_t stream) {
  return dispatch_bottleneck_backward<float>(args, stream);
}

int64_t bottleneck_backward_workspace_floats(int64_t M, int64_t D, int64_t NB, int64_t L) {
  return peftkern::bottleneck_backward_plan(M, D, NB, L).workspace_floats;
}

}  // namespace peftkern_ext
