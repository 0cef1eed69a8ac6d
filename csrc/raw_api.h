// What every op's raw-address boundary (csrc/<op>_api.h) shares: the dtype codes and a strided matrix as
// an address plus two strides in elements. Plain C++: included by both nvcc and the host compiler.
#pragma once

#include <cstdint>

namespace peftkern_ext {

enum DTypeCode : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

struct RawMatrix {
  uintptr_t data;
  int64_t stride0;
  int64_t stride1;
};

}  // namespace peftkern_ext
