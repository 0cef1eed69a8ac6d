// peftkern._C: the pybind11 face of the CUDA C++ kernels. No torch: tensors arrive as Python ints (data
// addresses from tensor.data_ptr()), strides and sizes in elements, dtype codes (lora_api.h), the CUDA
// stream as an int (torch.cuda.current_stream().cuda_stream) and the device index. Arguments are checked
// here (ValueError naming the argument) before any launch; a CUDA failure raises RuntimeError carrying
// cudaGetErrorString. Compiled by the host C++ compiler; the kernels live in csrc/*.cu. This unit has the
// module, the LoRA entry points and the shared ones; each other op registers in its own bindings_<op>.cpp.
#include <cstdint>
#include <string>
#include <vector>

#include "bindings_common.h"
#include "lora_api.h"
#include "peftkern/common.cuh"

namespace py = pybind11;
using peftkern_ext::RawBackward;
using peftkern_ext::RawForward;
using peftkern_ext::RawMatrix;

#ifndef PEFTKERN_CUDA_ARCHS
#define PEFTKERN_CUDA_ARCHS "unknown"
#endif

namespace {

using namespace peftkern_bind;

void lora_forward(int dtype, int adapter_dtype, uintptr_t x, Strides x_strides, uintptr_t weight, Strides w_strides,
                  uintptr_t bias, int64_t bias_stride, uintptr_t lora_a, Strides a_strides, uintptr_t lora_b,
                  Strides b_strides, uintptr_t s, uintptr_t y, Strides y_strides, int64_t M, int64_t N, int64_t K,
                  int64_t R, float scaling, float dropout_p, uintptr_t seed, int device, uintptr_t stream) {
  check_dtypes(dtype, adapter_dtype);
  check_sizes(M, N, K, R, dropout_p, seed);
  RawForward args{};
  args.x = matrix("x", x, x_strides, M, K);
  args.weight = matrix("weight", weight, w_strides, N, K);
  args.lora_a = matrix("lora_a", lora_a, a_strides, R, K);
  args.lora_b = matrix("lora_b", lora_b, b_strides, N, R);
  args.y = matrix("y", y, y_strides, M, N);
  require_address("s", s, M * R);
  args.bias = bias;
  args.bias_stride = bias_stride;
  args.s = s;
  args.M = M;
  args.N = N;
  args.K = K;
  args.R = R;
  args.scaling = scaling;
  args.dropout_p = dropout_p;
  args.seed = dropout_p > 0.0f ? seed : 0;
  args.adapter_fp32 = adapter_dtype == peftkern_ext::kFloat32;
  if (M == 0) return;
  launch_for_dtype(dtype, device, stream, "lora_forward", args, peftkern_ext::lora_forward_f16,
                   peftkern_ext::lora_forward_bf16, peftkern_ext::lora_forward_f32);
}

int64_t workspace_floats(int64_t M, int64_t N, int64_t K, int64_t R) {
  check_sizes(M, N, K, R, 0.0f, 0);
  return peftkern_ext::lora_backward_workspace_floats(M, N, K, R);
}

void lora_backward(int dtype, int adapter_dtype, uintptr_t grad_y, Strides gy_strides, uintptr_t x, Strides x_strides,
                   uintptr_t weight, Strides w_strides, uintptr_t lora_a, Strides a_strides, uintptr_t lora_b,
                   Strides b_strides, uintptr_t s, uintptr_t grad_x, Strides gx_strides, uintptr_t grad_a,
                   uintptr_t grad_b, uintptr_t workspace, int64_t workspace_floats, int64_t M, int64_t N, int64_t K,
                   int64_t R, float scaling, float dropout_p, uintptr_t seed, int device, uintptr_t stream) {
  check_dtypes(dtype, adapter_dtype);
  check_sizes(M, N, K, R, dropout_p, seed);
  RawBackward args{};
  args.grad_y = matrix("grad_y", grad_y, gy_strides, M, N);
  args.x = matrix("x", x, x_strides, M, K);
  args.weight = matrix("weight", weight, w_strides, N, K);
  args.lora_a = matrix("lora_a", lora_a, a_strides, R, K);
  args.lora_b = matrix("lora_b", lora_b, b_strides, N, R);
  args.grad_x = RawMatrix{grad_x, std::get<0>(gx_strides), std::get<1>(gx_strides)};  // 0: no dX
  require_address("s", s, M * R);
  require_address("grad_a", grad_a, R * K);
  require_address("grad_b", grad_b, N * R);
  const int64_t needed = M > 0 ? peftkern_ext::lora_backward_workspace_floats(M, N, K, R) : 0;
  if (workspace_floats < needed) {
    throw py::value_error("workspace: expected at least " + std::to_string(needed) +
                          " floats (lora_backward_workspace_floats), got " + std::to_string(workspace_floats));
  }
  require_address("workspace", workspace, needed);
  args.s = s;
  args.grad_a = grad_a;
  args.grad_b = grad_b;
  args.workspace = workspace;
  args.M = M;
  args.N = N;
  args.K = K;
  args.R = R;
  args.scaling = scaling;
  args.dropout_p = dropout_p;
  args.seed = dropout_p > 0.0f ? seed : 0;
  args.adapter_fp32 = adapter_dtype == peftkern_ext::kFloat32;
  if (M == 0 && R * K == 0 && N * R == 0) return;
  launch_for_dtype(dtype, device, stream, "lora_backward", args, peftkern_ext::lora_backward_f16,
                   peftkern_ext::lora_backward_bf16, peftkern_ext::lora_backward_f32);
}

// The dropout stream on the host, from the very function the kernels call: lets CPU-only tests check it
// bit for bit against reference.philox_uniform.
std::vector<float> philox_uniform(int64_t seed, const std::vector<int64_t>& offsets) {
  std::vector<float> out(offsets.size());
  for (size_t i = 0; i < offsets.size(); ++i) {
    out[i] = peftkern::philox_uniform(static_cast<uint64_t>(seed), static_cast<uint64_t>(offsets[i]));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "peftkern CUDA C++ kernels (header-only csrc/include/peftkern), called with raw device addresses";
  m.attr("cuda_archs") = PEFTKERN_CUDA_ARCHS;
  m.attr("cudart_version") = CUDART_VERSION;
  m.attr("FLOAT16") = static_cast<int>(peftkern_ext::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(peftkern_ext::kBFloat16);
  m.attr("FLOAT32") = static_cast<int>(peftkern_ext::kFloat32);
  m.def("device_count", []() {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky "no device / no driver" state for later calls
      return std::make_tuple(0, std::string(cudaGetErrorString(err)));
    }
    return std::make_tuple(count, std::string());
  }, "(number of CUDA devices, error text) as this module's CUDA runtime sees them");
  m.def("lora_forward", &lora_forward, "y = x W^T + b + scaling * (dropout(x) A^T) B^T; writes s = [M, R] fp32",
        py::arg("dtype"), py::arg("adapter_dtype"), py::arg("x"), py::arg("x_strides"), py::arg("weight"),
        py::arg("weight_strides"), py::arg("bias"), py::arg("bias_stride"), py::arg("lora_a"), py::arg("lora_a_strides"),
        py::arg("lora_b"), py::arg("lora_b_strides"), py::arg("s"), py::arg("y"), py::arg("y_strides"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("R"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"),
        py::arg("device"), py::arg("stream"));
  m.def("lora_backward", &lora_backward, "dX (if grad_x != 0), dA, dB of the LoRA linear", py::arg("dtype"),
        py::arg("adapter_dtype"), py::arg("grad_y"), py::arg("grad_y_strides"), py::arg("x"), py::arg("x_strides"),
        py::arg("weight"), py::arg("weight_strides"), py::arg("lora_a"), py::arg("lora_a_strides"), py::arg("lora_b"),
        py::arg("lora_b_strides"), py::arg("s"), py::arg("grad_x"), py::arg("grad_x_strides"), py::arg("grad_a"),
        py::arg("grad_b"), py::arg("workspace"), py::arg("workspace_floats"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("R"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("device"),
        py::arg("stream"));
  m.def("lora_backward_workspace_floats", &workspace_floats,
        "fp32 workspace elements lora_backward needs", py::arg("M"), py::arg("N"), py::arg("K"), py::arg("R"));
  peftkern_bind::bind_multi_lora(m);
  peftkern_bind::bind_prompt(m);
  peftkern_bind::bind_bottleneck(m);
  m.def("philox_uniform", &philox_uniform, "uniform [0, 1) draws of the dropout stream, computed on the host",
        py::arg("seed"), py::arg("offsets"));
}
