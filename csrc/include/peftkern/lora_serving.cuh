// peftkern/lora_serving.cuh: the serving pieces in CUDA C++, header-only, no torch: the LoRA shrink and
// expand-add of a multi-adapter batch, for a serving stack that runs its own base GEMM and adds each row's
// adapter around it.
//
//   shrink      s[j, t, :r_i] = x[t] @ A_j[i, :r_i].T                 i = ids[t]; zero past r_i and for i = -1
//   expand-add  y[t, o_j + n] += scalings[i] * s[j, t, :r_i] @ B_j[i, n, :r_i]   rows with i = -1 untouched
//
// x [M, K] (any strides); slice j of A [L, R, K] / B [L, N_j, R] (any strides; lora_layer() picks one layer
// of a stacked per-layer weight by its layer stride); s [n, M, R] fp32 contiguous; y [M, >= offset + sum N_j]
// (any strides), slice j written from column o_j = offset + N_0 + ... + N_(j-1); ids [M] int32 or int64;
// ranks [L] int32 (clamped to [0, R]); scalings [L] fp32. Ids outside [-1, L) act as -1: nothing is read or
// written out of bounds whatever they hold. No host sync, no allocation: a step captures in a CUDA graph.
//
// The batch metadata is multi_lora.cuh's segment table (launch_multi_lora_segments, workspace from
// multi_lora_segments_workspace_bytes), built once per step and passed to every layer's shrink.
//
//   shrink      multi_lora.cuh's shrink kernels, one launch per slice: decode (segments == nullptr) one block
//               per (row, 16 ranks), a gathered GEMV; prefill one block per (segment tile, ranks) on tensor
//               cores when A is in x's 16-bit dtype
//   expand-add  one launch for every slice: one block per (row, 128 columns, slice); thread c sums its
//               column over the row's rank in a fixed order and adds once (fp32, rounded once to y's type),
//               reading B and s 16 bytes at a time where their rows are contiguous along the rank and aligned
#pragma once

#include <cstdint>

#include "multi_lora.cuh"

namespace peftkern {
inline namespace PEFTKERN_ABI_NAMESPACE {

// Slices (merged projections such as q/k/v) per call.
constexpr int kMaxLoraSlices = 8;

// The slices of one call, passed to the kernel by value: no pointer table in device memory.
//   w[j]     A_j [L, R, K] (shrink) or B_j [L, N_j, R] (expand-add)
//   cols[j]  N_j (expand-add; the shrink ignores it)
template <typename TA>
struct LoraSlices {
  int n;
  Strided3D<const TA> w[kMaxLoraSlices];
  int64_t cols[kMaxLoraSlices];
};

// Layer `layer` of a stacked per-layer weight whose layers lie `layer_stride` elements apart.
template <typename T>
__host__ __device__ inline Strided3D<T> lora_layer(Strided3D<T> stacked, int64_t layer, int64_t layer_stride) {
  return {stacked.data + layer * layer_stride, stacked.stride0, stacked.stride1, stacked.stride2};
}

namespace lora_serving_detail {

using namespace detail;

constexpr int kExpandCols = 128;  // columns (threads) per expand-add block

template <typename T, typename TA>
__global__ void __launch_bounds__(kExpandCols)
    expand_add_rows_kernel(const Strided2D<T> y, const float* s, const LoraSlices<TA> b, const void* ids,
                           bool ids_int64, const int32_t* ranks, const float* scalings, int64_t offset, int64_t M,
                           int64_t L, int64_t R, unsigned vec_slices) {
  using namespace multi_lora_detail;
  const int64_t row = blockIdx.x;
  const int slice = static_cast<int>(blockIdx.z);
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kExpandCols + threadIdx.x;
  const AdapterRank ar = adapter_rank(ranks, load_id(ids, ids_int64, row), L, R);
  const int64_t n_cols = b.cols[slice];
  if (ar.rank == 0 || col >= n_cols) return;  // no adapter (or rank 0): the row is not written
  int64_t first = offset;
  for (int j = 0; j < slice; ++j) first += b.cols[j];
  const Strided3D<const TA> w = b.w[slice];
  const TA* b_col = w.data + ar.adapter * w.stride0 + col * w.stride1;
  const float* s_row = s + (static_cast<int64_t>(slice) * M + row) * R;
  float acc = 0.0f;
  int64_t r = 0;
  if ((vec_slices >> slice) & 1u) {  // B's row contiguous along the rank and 16-byte aligned: 16-byte loads
    const int64_t r_vec = ar.rank / kVec * kVec;  // never past the rank
    for (; r < r_vec; r += kVec) {
      float bv[kVec], sv[kVec];
      load8(b_col + r, bv);
      load8(s_row + r, sv);
#pragma unroll
      for (int q = 0; q < kVec; ++q) acc = fmaf(sv[q], bv[q], acc);  // the scalar loop's order
    }
  }
  for (; r < ar.rank; ++r) acc = fmaf(s_row[r], to_float(b_col[r * w.stride2]), acc);
  T& out = y.at(row, first + col);
  out = from_float<T>(to_float(out) + scalings[ar.adapter] * acc);
}

// Bit j set: every row of slice j's B (each adapter, each column) starts 16-byte aligned and is contiguous
// along the rank, and so does every row of s (R a multiple of 4 floats): the expand reads both 8 elements at
// a time.
template <typename TA>
inline unsigned vector_slices(const LoraSlices<TA>& slices, const float* s, int64_t R) {
  constexpr int64_t kVec = multi_lora_detail::kVec;
  if (reinterpret_cast<uintptr_t>(s) % 16 != 0 || R % 4 != 0) return 0;
  unsigned mask = 0;
  for (int j = 0; j < slices.n; ++j) {
    const Strided3D<const TA>& w = slices.w[j];
    if (w.stride2 == 1 && reinterpret_cast<uintptr_t>(w.data) % 16 == 0 && w.stride0 % kVec == 0 &&
        w.stride1 % kVec == 0) {
      mask |= 1u << j;
    }
  }
  return mask;
}

template <typename TA>
inline bool valid_slices(const LoraSlices<TA>& slices, bool need_cols) {
  if (slices.n < 1 || slices.n > kMaxLoraSlices) return false;
  for (int j = 0; j < slices.n; ++j) {
    if (slices.w[j].data == nullptr || (need_cols && slices.cols[j] < 0)) return false;
  }
  return true;
}

}  // namespace lora_serving_detail

// s [n, M, R] fp32 (contiguous) = the shrink of every slice of `a` (A_j [L, R, K]). segments: the ids' table
// (launch_multi_lora_segments) for the prefill kernels, or nullptr for the decode kernel (any M).
// Preconditions:
//   aliasing    s must not overlap x, any slice, ids or ranks
//   alignment   none required; 16-byte (cp.async) paths where pointers and strides allow (run time); s fp32
//               contiguous [n, M, R]
//   archs       sm_70+ (WMMA for half; bf16 tensor cores and cp.async from sm_80; fp32: FMA units)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        segments (prefill) from launch_multi_lora_segments over the same ids, alive until the launch ran
template <typename T, typename TA>
cudaError_t launch_lora_shrink(Strided2D<const T> x, const LoraSlices<TA>& a, const void* adapter_ids, bool ids_int64,
                               const MultiLoraSegments* segments, const int32_t* ranks, float* s, int64_t M,
                               int64_t K, int64_t L, int64_t R, cudaStream_t stream) {
  if (M < 0 || K < 0 || L < 1 || R < 1 || !lora_serving_detail::valid_slices(a, false)) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (x.data == nullptr || adapter_ids == nullptr || ranks == nullptr || s == nullptr) return cudaErrorInvalidValue;
  for (int j = 0; j < a.n; ++j) {
    const cudaError_t err = multi_lora_detail::launch_shrink<T, TA>(x, a.w[j], adapter_ids, ids_int64, segments,
                                                                    ranks, nullptr, s + j * M * R, M, K, R, L, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// y[:, o_j : o_j + N_j] += the expand of slice j of `b` (B_j [L, N_j, R], b.cols[j] = N_j) from s[j] (s as
// launch_lora_shrink writes it), o_j = offset + N_0 + ... + N_(j-1); one launch for all slices.
// Preconditions:
//   aliasing    y is read and written in place; it must not overlap s, any slice, ids, ranks or scalings; slices'
//               column ranges in y must not overlap
//   alignment   none required
//   archs       any the toolkit targets (16-byte paths are plain vector loads)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        rows without an adapter and columns outside the slices are never written
template <typename T, typename TA>
cudaError_t launch_lora_expand_add(Strided2D<T> y, const float* s, const LoraSlices<TA>& b, const void* adapter_ids,
                                   bool ids_int64, const int32_t* ranks, const float* scalings, int64_t offset,
                                   int64_t M, int64_t L, int64_t R, cudaStream_t stream) {
  using namespace lora_serving_detail;
  if (M < 0 || L < 1 || R < 1 || offset < 0 || !valid_slices(b, true)) return cudaErrorInvalidValue;
  int64_t widest = 0;
  for (int j = 0; j < b.n; ++j) widest = b.cols[j] > widest ? b.cols[j] : widest;
  if (M == 0 || widest == 0) return cudaSuccess;
  if (y.data == nullptr || s == nullptr || adapter_ids == nullptr || ranks == nullptr || scalings == nullptr) {
    return cudaErrorInvalidValue;
  }
  const int64_t col_tiles = ceil_div(widest, kExpandCols);
  if (M > kMaxGridX || col_tiles > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(col_tiles), static_cast<unsigned>(b.n));
  expand_add_rows_kernel<T, TA><<<grid, kExpandCols, 0, stream>>>(y, s, b, adapter_ids, ids_int64, ranks, scalings,
                                                                  offset, M, L, R, vector_slices(b, s, R));
  return cudaPeekAtLastError();
}

}  // inline namespace PEFTKERN_ABI_NAMESPACE
}  // namespace peftkern
