// peftkern._cpu: the torch backend's CPU kernels (dropout.cpp, dequantize_4bit.cpp), no torch linked: callers pass
// the addresses of tensors they own. Each kernel has AVX-512, AVX2 and plain C++ paths; the best this CPU runs is
// chosen when the module loads.

#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "cpu_kernels.h"

namespace peftkern_cpu {

Simd best_simd() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return Simd::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Simd::kAvx2;
#endif
  return Simd::kScalar;
}

}  // namespace peftkern_cpu

namespace {

using peftkern_cpu::Simd;

Simd current = peftkern_cpu::best_simd();

const char* simd_name() {
  switch (current) {
    case Simd::kAvx512:
      return "avx512f";
    case Simd::kAvx2:
      return "avx2";
    default:
      return "scalar";
  }
}

// For tests: run every kernel in `name` ("avx512f", "avx2", "scalar") when this CPU has it. Not synchronised
// with running calls: switch only while no kernel runs.
void use_simd(const std::string& name) {
  Simd wanted;
  if (name == "avx512f") {
    wanted = Simd::kAvx512;
  } else if (name == "avx2") {
    wanted = Simd::kAvx2;
  } else if (name == "scalar") {
    wanted = Simd::kScalar;
  } else {
    throw std::invalid_argument("use_simd: " + name + " is not available on this CPU or build");
  }
  if (static_cast<int>(wanted) > static_cast<int>(peftkern_cpu::best_simd())) {
    throw std::invalid_argument("use_simd: " + name + " is not available on this CPU or build");
  }
  peftkern_cpu::use_dropout_simd(wanted);
  peftkern_cpu::use_dequantize_4bit_simd(wanted);
  current = wanted;
}

}  // namespace

PYBIND11_MODULE(_cpu, module) {
  module.doc() = "peftkern's CPU kernels for the torch backend (no torch linked)";
  peftkern_cpu::bind_dropout(module);
  peftkern_cpu::bind_dequantize_4bit(module);
  module.def("simd", &simd_name, "The instruction set the kernels run in: avx512f, avx2 or scalar.");
  module.def("use_simd", &use_simd, pybind11::arg("name"),
             "Run every kernel in avx512f, avx2 or scalar (tests); raises when this CPU lacks it.");
}
