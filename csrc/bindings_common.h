// What every pybind11 unit of peftkern._C shares (bindings.cpp, bindings_<op>.cpp): argument checks that
// raise ValueError naming the argument, CUDA error reporting, and the device/stream/dtype dispatch of a
// launch with the GIL released. Host compiler only: nvcc never sees pybind11.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>

#include "raw_api.h"

namespace peftkern_bind {

namespace py = pybind11;
using peftkern_ext::RawMatrix;

// Each op's unit defines its registration function; bindings.cpp calls them all from PYBIND11_MODULE.
void bind_multi_lora(py::module_& m);
void bind_prompt(py::module_& m);
void bind_bottleneck(py::module_& m);

using Strides = std::tuple<int64_t, int64_t>;

inline const char* dtype_name(int code) {
  switch (code) {
    case peftkern_ext::kFloat16:
      return "float16";
    case peftkern_ext::kBFloat16:
      return "bfloat16";
    case peftkern_ext::kFloat32:
      return "float32";
    default:
      return "unknown";
  }
}

inline void check_dtypes(int dtype, int adapter_dtype) {
  if (dtype != peftkern_ext::kFloat16 && dtype != peftkern_ext::kBFloat16 && dtype != peftkern_ext::kFloat32) {
    throw py::value_error("dtype: expected a code in {0: float16, 1: bfloat16, 2: float32}, got " +
                          std::to_string(dtype));
  }
  if (adapter_dtype != dtype && adapter_dtype != peftkern_ext::kFloat32) {
    throw py::value_error(std::string("adapter_dtype: expected the activation dtype (") + dtype_name(dtype) +
                          ") or float32, got code " + std::to_string(adapter_dtype));
  }
}

inline void check_sizes(int64_t M, int64_t N, int64_t K, int64_t R, float dropout_p, uintptr_t seed) {
  if (M < 0 || N < 0 || K < 0) {
    throw py::value_error("sizes: expected M, N, K >= 0, got M=" + std::to_string(M) + ", N=" + std::to_string(N) +
                          ", K=" + std::to_string(K));
  }
  if (R < 1) throw py::value_error("R: expected rank >= 1, got " + std::to_string(R));
  if (!(dropout_p >= 0.0f && dropout_p < 1.0f)) {
    throw py::value_error("dropout_p: expected a probability in [0, 1), got " + std::to_string(dropout_p));
  }
  if (dropout_p > 0.0f && seed == 0) {
    throw py::value_error("seed: expected the address of an int64 seed on the device when dropout_p > 0, got 0");
  }
}

// A matrix that holds elements must have an address.
inline RawMatrix matrix(const char* name, uintptr_t data, const Strides& strides, int64_t rows, int64_t cols) {
  if (data == 0 && rows > 0 && cols > 0) {
    throw py::value_error(std::string(name) + ": expected a device address, got 0 for a [" + std::to_string(rows) +
                          ", " + std::to_string(cols) + "] matrix");
  }
  return RawMatrix{data, std::get<0>(strides), std::get<1>(strides)};
}

inline void require_address(const char* name, uintptr_t data, int64_t count) {
  if (data == 0 && count > 0) {
    throw py::value_error(std::string(name) + ": expected a device address, got 0 for " + std::to_string(count) +
                          " elements");
  }
}

inline void raise_on_error(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("peftkern._C.") + what + ": CUDA error " + std::to_string(int(err)) + " (" +
                             cudaGetErrorName(err) + "): " + cudaGetErrorString(err));
  }
}

inline void use_device(int device, const char* what) {
  if (device < 0) throw py::value_error("device: expected a CUDA device index >= 0, got " + std::to_string(device));
  // Switch only when needed (torch has normally made the tensors' device current already).
  int current = -1;
  if (cudaGetDevice(&current) == cudaSuccess && current == device) return;
  raise_on_error(cudaSetDevice(device), what);
}

// Make ``device`` current, then run the entry point for the activation dtype with the GIL released, on the
// caller's stream; raises with cudaGetErrorString on failure. Other dtypes were refused before this.
template <typename Args>
void launch_for_dtype(int dtype, int device, uintptr_t stream, const char* what, const Args& args,
                      cudaError_t (*f16)(const Args&, cudaStream_t), cudaError_t (*bf16)(const Args&, cudaStream_t),
                      cudaError_t (*f32)(const Args&, cudaStream_t)) {
  use_device(device, what);
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err = cudaSuccess;
  {
    py::gil_scoped_release release;
    const auto entry = dtype == peftkern_ext::kFloat16 ? f16 : dtype == peftkern_ext::kBFloat16 ? bf16 : f32;
    err = entry(args, cuda_stream);
  }
  raise_on_error(err, what);
}

}  // namespace peftkern_bind
