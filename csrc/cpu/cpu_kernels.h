// peftkern._cpu's kernel files and the module that binds them (module.cpp): each file registers its functions
// on the module and runs in one of the instruction sets below, which module.cpp picks for this CPU at load time
// (the best it has) and tests may switch (use_simd).

#pragma once

#include <pybind11/pybind11.h>

namespace peftkern_cpu {

enum class Simd { kScalar, kAvx2, kAvx512 };

// The best instruction set this CPU runs: kAvx512 (avx512f), kAvx2 (avx2 and f16c) or kScalar.
Simd best_simd();

// dropout.cpp: the Philox keep-mask.
void bind_dropout(pybind11::module_& module);
void use_dropout_simd(Simd simd);

// dequantize_4bit.cpp: bitsandbytes' 4-bit weight to a dense float tensor.
void bind_dequantize_4bit(pybind11::module_& module);
void use_dequantize_4bit_simd(Simd simd);

}  // namespace peftkern_cpu
