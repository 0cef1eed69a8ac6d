// peftkern/peftkern_c.cuh: the definitions of the C API declared in peftkern_c.h. Include this in exactly one
// CUDA translation unit (nvcc); everything else includes peftkern_c.h only.
#pragma once

#include "lora_serving.cuh"
#include "multi_lora.cuh"
#include "peftkern_c.h"

namespace peftkern {
inline namespace PEFTKERN_ABI_NAMESPACE {
namespace c_api_detail {

static_assert(PEFTKERN_MAX_LORA_SLICES == kMaxLoraSlices, "peftkern_c.h is out of date");
static_assert(sizeof(peftkern_segments) == sizeof(MultiLoraSegments), "peftkern_c.h is out of date");

inline MultiLoraSegments segments_of(const peftkern_segments* s) {
  return {s->perm, s->bounds, s->tiles, s->n_tiles};
}

template <typename TA>
inline bool slices_of(int n, const void* const* w, const int64_t* strides, const int64_t* cols,
                      LoraSlices<TA>* out) {
  if (n < 1 || n > kMaxLoraSlices || w == nullptr || strides == nullptr) return false;
  *out = LoraSlices<TA>{};
  out->n = n;
  for (int j = 0; j < n; ++j) {
    out->w[j] = {static_cast<const TA*>(w[j]), strides[3 * j], strides[3 * j + 1], strides[3 * j + 2]};
    out->cols[j] = cols != nullptr ? cols[j] : 0;
  }
  return true;
}

// Calls f(T{}, TA{}) for a supported (activation, adapter) dtype pair; cudaErrorInvalidValue otherwise.
template <typename F>
inline cudaError_t dispatch(peftkern_dtype t, peftkern_dtype ta, F&& f) {
  if (ta == PEFTKERN_FLOAT32) {
    if (t == PEFTKERN_FLOAT32) return f(float{}, float{});
    if (t == PEFTKERN_FLOAT16) return f(half{}, float{});
    if (t == PEFTKERN_BFLOAT16) return f(__nv_bfloat16{}, float{});
  } else if (ta == t) {
    if (t == PEFTKERN_FLOAT16) return f(half{}, half{});
    if (t == PEFTKERN_BFLOAT16) return f(__nv_bfloat16{}, __nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace c_api_detail
}  // inline namespace PEFTKERN_ABI_NAMESPACE
}  // namespace peftkern

// This copy's namespace, named in full: plain peftkern:: would be ambiguous beside a second vendored copy.
namespace peftkern_c_api = ::peftkern::PEFTKERN_ABI_NAMESPACE;

extern "C" {

void peftkern_version(int* major, int* minor, int* patch) {
  if (major != nullptr) *major = PEFTKERN_VERSION_MAJOR;
  if (minor != nullptr) *minor = PEFTKERN_VERSION_MINOR;
  if (patch != nullptr) *patch = PEFTKERN_VERSION_PATCH;
}

int64_t peftkern_multi_lora_segments_workspace_bytes(int64_t M, int64_t L) {
  return peftkern_c_api::multi_lora_segments_workspace_bytes(M, L);
}

int64_t peftkern_multi_lora_segment_tiles(int64_t M, int64_t L) { return peftkern_c_api::multi_lora_segment_tiles(M, L); }

cudaError_t peftkern_multi_lora_segments(const void* ids, int ids_int64, int64_t M, int64_t L, void* workspace,
                                         peftkern_segments* out, cudaStream_t stream) {
  if (out == nullptr) return cudaErrorInvalidValue;
  peftkern_c_api::MultiLoraSegments segments{};
  const cudaError_t err = peftkern_c_api::launch_multi_lora_segments(ids, ids_int64 != 0, M, L, workspace, &segments,
                                                                stream);
  *out = {segments.perm, segments.bounds, segments.tiles, segments.n_tiles};
  return err;
}

cudaError_t peftkern_lora_shrink(peftkern_dtype x_dtype, peftkern_dtype a_dtype, const void* x,
                                 const int64_t* x_strides, int n_slices, const void* const* a,
                                 const int64_t* a_strides, const void* ids, int ids_int64,
                                 const peftkern_segments* segments, const int32_t* ranks, float* s, int64_t M,
                                 int64_t K, int64_t L, int64_t R, cudaStream_t stream) {
  namespace c = peftkern_c_api::c_api_detail;
  if (x_strides == nullptr) return cudaErrorInvalidValue;
  return c::dispatch(x_dtype, a_dtype, [&](auto t, auto ta) -> cudaError_t {
    using T = decltype(t);
    using TA = decltype(ta);
    peftkern_c_api::LoraSlices<TA> slices;
    if (!c::slices_of(n_slices, a, a_strides, nullptr, &slices)) return cudaErrorInvalidValue;
    const peftkern_c_api::MultiLoraSegments table = segments != nullptr ? c::segments_of(segments)
                                                                  : peftkern_c_api::MultiLoraSegments{};
    return peftkern_c_api::launch_lora_shrink<T, TA>({static_cast<const T*>(x), x_strides[0], x_strides[1]}, slices, ids,
                                               ids_int64 != 0, segments != nullptr ? &table : nullptr, ranks, s, M,
                                               K, L, R, stream);
  });
}

cudaError_t peftkern_lora_expand_add(peftkern_dtype y_dtype, peftkern_dtype b_dtype, void* y,
                                     const int64_t* y_strides, const float* s, int n_slices, const void* const* b,
                                     const int64_t* b_strides, const int64_t* cols, const void* ids, int ids_int64,
                                     const int32_t* ranks, const float* scalings, int64_t offset, int64_t M,
                                     int64_t L, int64_t R, cudaStream_t stream) {
  namespace c = peftkern_c_api::c_api_detail;
  if (y_strides == nullptr || cols == nullptr) return cudaErrorInvalidValue;
  return c::dispatch(y_dtype, b_dtype, [&](auto t, auto ta) -> cudaError_t {
    using T = decltype(t);
    using TA = decltype(ta);
    peftkern_c_api::LoraSlices<TA> slices;
    if (!c::slices_of(n_slices, b, b_strides, cols, &slices)) return cudaErrorInvalidValue;
    return peftkern_c_api::launch_lora_expand_add<T, TA>({static_cast<T*>(y), y_strides[0], y_strides[1]}, s, slices,
                                                   ids, ids_int64 != 0, ranks, scalings, offset, M, L, R, stream);
  });
}

}  // extern "C"
