// peftkern/multi_lora.cuh: the batched multi-LoRA linear in CUDA C++: every row picks its own adapter.
// Header-only, no torch.
//
//   y[t] = x[t] @ W.T + b + s_i * (x[t] @ A[i, :r_i].T) @ B[i, :, :r_i].T    i = ids[t], -1 = base only
//   x [M, K], W [N, K], A [L, R, K], B [L, N, R] (R = r_max), ids [M] int32 or int64, scalings [L] fp32,
//   ranks [L] int32 (r_i).
//
// The decomposition of triton_kernels/multi_lora.py. Two forward paths, chosen from M alone (never from the
// ids' values, so nothing syncs with the host and a step captures in a CUDA graph):
//   decode  (M <= kMultiLoraDecodeMaxRows)  rows stay in place; each row gathers its adapter by id.
//     shrink   S[t] = x[t] @ A[i].T              one block per (row, rank chunk of 16): a gathered GEMV,
//                                                16-byte loads where aligned, nothing loaded past r_i
//     fused    y = x @ W.T + b + s_i S[t] @ B[i].T   lora.cuh's GEMM mainloop (WMMA for 16-bit); the
//                                                expand gathered per row in the epilogue, its rank loop
//                                                stopping at the tile's largest rank. With few row tiles
//                                                the reduction is split (up to 8 parts, about 256 blocks)
//                                                and the fp32 partial tiles summed in a fixed order.
//   prefill (larger M)  rows grouped by adapter: a stable counting sort of the ids built on the device
//                       (launch_multi_lora_segments: three small kernels, fixed grids), cut into 64-row
//                       tiles that never straddle two adapters (the tile table has the fixed length
//                       cdiv(M, 64) + min(L + 1, M)); rows are gathered through the sort permutation:
//     shrink   S[rows] = x[rows] @ A[i].T            one block per (tile, 64 ranks) on the GEMM mainloop
//                                                (tensor cores) when A is in x's 16-bit dtype; else one per
//                                                (tile, 16 ranks) on FMA units
//     fused    as above; the epilogue a dense [64, r_i] x [r_i, 64] product with the tile's one adapter
// Backward (the segment table always; the forward's path for the row kernels):
//   dS = s_i dY @ B[i]        the shrink with B in place of A
//   dX = dY @ W + dS @ A[i]   the fused kernel with W transposed by strides
//   dA[i] = dS[seg i].T @ x[seg i], dB[i] = s_i dY[seg i].T @ S[seg i]: one block per (adapter, column
//   tile, rank chunk[, part]) sums its adapter's rows in sorted order; with few blocks each segment is cut
//   into parts whose fp32 partials are summed in a fixed order. Deterministic, no atomics anywhere.
//
// Ids outside [-1, L) act as -1 and ranks are clamped to [0, R]: whatever they hold, nothing reads or
// writes out of bounds. S (and dS) are [M, R] fp32, zero past each row's rank. Offsets in int64.
// Types as lora.cuh: T (x, W, b, y, dY, dX) half, __nv_bfloat16 or float; TA (A, B, dA, dB) T or float.
// Every launch takes a caller-provided workspace of multi_lora_forward_plan() / multi_lora_backward_plan()
// .workspace_bytes (any contents, 256-byte aligned): no allocation, no host sync inside.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "lora.cuh"

namespace peftkern {
inline namespace PEFTKERN_ABI_NAMESPACE {

// Up to this many rows the forward gathers per row (decode); above it, rows are grouped by adapter.
constexpr int64_t kMultiLoraDecodeMaxRows = 64;
// Rows per tile of the segment table: the GEMM's row tile, so a segment tile is exactly one GEMM tile.
constexpr int64_t kMultiLoraSegmentRows = lora_detail::kBM;

enum MultiLoraPath : int { kMultiLoraAuto = 0, kMultiLoraDecode = 1, kMultiLoraPrefill = 2 };

// A [d0, d1, d2] array as a pointer and three int64 strides (elements).
template <typename T>
struct Strided3D {
  T* data;
  int64_t stride0, stride1, stride2;
  __host__ __device__ inline T& at(int64_t i, int64_t j, int64_t k) const {
    return data[i * stride0 + j * stride1 + k * stride2];
  }
};

// The rows grouped by adapter (all int64, device memory; see launch_multi_lora_segments):
//   perm [M]           row indices in the order of a stable sort by group (group 0: base only / bad id,
//                      group j: adapter j - 1)
//   bounds [2, L + 1]  bounds[0][j] : bounds[1][j] is group j's slice of perm
//   tiles [3, n_tiles] per tile (adapter or -1, first sorted position, end of its group); padding tiles
//                      past the last real one are (-1, 0, 0)
struct MultiLoraSegments {
  int64_t* perm;
  int64_t* bounds;
  int64_t* tiles;
  int64_t n_tiles;
};

namespace multi_lora_detail {

using namespace detail;

using lora_detail::kBM;
using lora_detail::kBN;
using lora_detail::kRankChunk;
using lora_detail::kRankPitch;
using lora_detail::kThreads;

constexpr int kSortThreads = 256;  // the segment builder: rows per chunk and threads per block
constexpr int kVec = 8;            // elements per vector load in the decode shrink (16 bytes of 16-bit)
constexpr int kGradRows = 32;      // rows per step of the dA / dB kernel
constexpr int kGradCols = 64;      // columns per dA / dB block
constexpr int64_t kGradTargetBlocks = 512;  // split segments until about this many dA / dB blocks run
constexpr int64_t kGradMaxSplits = 8;
// Decode: few row tiles, so the fused GEMM splits its reduction until about this many blocks run (each
// split at least kDecodeMinSplitRed deep), then sums the fp32 partial tiles in a fixed order.
constexpr int64_t kDecodeTargetBlocks = 256;
constexpr int64_t kDecodeMaxSplits = 8;
constexpr int64_t kDecodeMinSplitRed = 256;

__host__ __device__ inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ inline int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

__device__ inline int64_t load_id(const void* ids, bool ids_int64, int64_t row) {
  if (ids_int64) return static_cast<const int64_t*>(ids)[row];
  return static_cast<int64_t>(static_cast<const int32_t*>(ids)[row]);
}

// Sort key of an id: 0 = base only (ids outside [0, L) included), j = adapter j - 1.
__device__ inline int64_t group_of(int64_t id, int64_t L) { return (id >= 0 && id < L) ? id + 1 : 0; }

// The adapter an id or tile names, clamped for addressing, and its rank clamped to [0, R] (0 when the id
// is outside [0, L): base only).
struct AdapterRank {
  int64_t adapter;
  int64_t rank;
};
__device__ inline AdapterRank adapter_rank(const int32_t* ranks, int64_t id, int64_t L, int64_t R) {
  if (id < 0 || id >= L) return {0, 0};
  const int64_t r = ranks[id];
  return {id, r < 0 ? 0 : (r > R ? R : r)};
}

// ---- the segment table: a stable counting sort of the ids, in three fixed-size launches -------------------
//
// count: block c takes rows [256 c, 256 c + 256); each row finds how many earlier rows of its chunk share
// its group (its rank within the chunk) and the last row of each group writes the chunk's count, into
// counts[c][group] (all other entries of the chunk's row are zeroed first). No atomics: a row's rank is a
// comparison against the chunk's keys in shared memory.
// (The segment kernels are templates, on the id type or the block size, so that a header included by several
// translation units defines each kernel once.)
template <typename TI>
__global__ void __launch_bounds__(kSortThreads)
    segment_count_kernel(const TI* ids, int64_t M, int64_t L, int64_t* local_rank, int64_t* counts) {
  __shared__ int64_t keys[kSortThreads];
  const int tid = threadIdx.x;
  const int64_t chunk = blockIdx.x;
  const int64_t groups = L + 1;
  int64_t* my_counts = counts + chunk * groups;
  for (int64_t g = tid; g < groups; g += kSortThreads) my_counts[g] = 0;
  const int64_t row = chunk * kSortThreads + tid;
  const int64_t key = row < M ? group_of(static_cast<int64_t>(ids[row]), L) : -1;
  keys[tid] = key;
  __syncthreads();  // the keys, and the zeroed counts (global writes are visible in the block after this)
  if (row >= M) return;
  int64_t before = 0;
  bool last = true;
  for (int j = 0; j < kSortThreads; ++j) {
    const bool same = keys[j] == key;
    before += (same && j < tid) ? 1 : 0;
    last = last && !(same && j > tid);
  }
  local_rank[row] = before;
  if (last) my_counts[key] = before + 1;
}

// scan (one block): per group its total over the chunks, the group bounds (exclusive prefix over groups),
// each chunk's first sorted position within the group (overwriting counts), and the tile table's running
// end per group (cdiv(count, 64) tiles each). Thread t owns a contiguous range of groups.
template <int kBlock>
__global__ void __launch_bounds__(kBlock)
    segment_scan_kernel(int64_t chunks, int64_t L, int64_t* counts, int64_t* bounds, int64_t* tile_ends) {
  __shared__ int64_t row_prefix[kBlock];
  __shared__ int64_t tile_prefix[kBlock];
  const int tid = threadIdx.x;
  const int64_t groups = L + 1;
  const int64_t per_thread = ceil_div(groups, kBlock);
  const int64_t g0 = imin(tid * per_thread, groups);
  const int64_t g1 = imin(g0 + per_thread, groups);
  int64_t rows = 0, tiles = 0;
  for (int64_t g = g0; g < g1; ++g) {
    int64_t total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += counts[c * groups + g];
    rows += total;
    tiles += ceil_div(total, kMultiLoraSegmentRows);
  }
  row_prefix[tid] = rows;
  tile_prefix[tid] = tiles;
  __syncthreads();
  if (tid == 0) {  // exclusive prefix over the threads (256 values: serial is cheap and exact)
    int64_t r = 0, t = 0;
    for (int i = 0; i < kBlock; ++i) {
      const int64_t rv = row_prefix[i], tv = tile_prefix[i];
      row_prefix[i] = r;
      tile_prefix[i] = t;
      r += rv;
      t += tv;
    }
  }
  __syncthreads();
  int64_t position = row_prefix[tid];
  int64_t tile_end = tile_prefix[tid];
  for (int64_t g = g0; g < g1; ++g) {
    bounds[g] = position;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t count = counts[c * groups + g];
      counts[c * groups + g] = position;
      position += count;
    }
    bounds[groups + g] = position;
    tile_end += ceil_div(position - bounds[g], kMultiLoraSegmentRows);
    tile_ends[g] = tile_end;
  }
}

// scatter: perm[offset(chunk, group) + rank within chunk] = row; and tile j of the table, its group found
// by a binary search of the running tile ends.
template <typename TI>
__global__ void __launch_bounds__(kSortThreads)
    segment_scatter_kernel(const TI* ids, int64_t M, int64_t L, const int64_t* local_rank,
                           const int64_t* offsets, const int64_t* bounds, const int64_t* tile_ends, int64_t* perm,
                           int64_t* tiles, int64_t n_tiles) {
  const int64_t groups = L + 1;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kSortThreads + threadIdx.x;
  if (i < M) {
    const int64_t key = group_of(static_cast<int64_t>(ids[i]), L);
    const int64_t chunk = i / kSortThreads;
    perm[offsets[chunk * groups + key] + local_rank[i]] = i;
  }
  if (i < n_tiles) {
    // The first group whose running tile end exceeds i (tile_ends is non-decreasing).
    int64_t lo = 0, hi = groups;
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (tile_ends[mid] > i) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    int64_t adapter = -1, start = 0, end = 0;
    if (lo < groups) {
      const int64_t g_start = bounds[lo], g_end = bounds[groups + lo];
      const int64_t first_tile = tile_ends[lo] - ceil_div(g_end - g_start, kMultiLoraSegmentRows);
      adapter = lo - 1;
      start = g_start + (i - first_tile) * kMultiLoraSegmentRows;
      end = g_end;
    }
    tiles[i] = adapter;
    tiles[n_tiles + i] = start;
    tiles[2 * n_tiles + i] = end;
  }
}

// ---- shrink: T[t, r] = scale_i * sum_j IN[t, j] F[i, r, j], zero for r >= rank_i -----------------------------

// 8 consecutive elements as floats; p 16-byte aligned.
template <typename T>
__device__ inline void load8(const T* p, float* out) {
  if constexpr (sizeof(T) == 2) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int q = 0; q < kVec; ++q) out[q] = to_float(e[q]);
  } else {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
    out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
  }
}

// Decode: one block per (row, chunk of 16 ranks), a gathered GEMV. Threads split J; each keeps one partial
// per rank of the chunk, loading F rows only up to the row's rank; the partials are summed through shared
// memory in a fixed order. vec: IN's row and F's rows contiguous along j and 16-byte aligned.
template <typename T, typename TF>
__global__ void __launch_bounds__(kThreads)
    shrink_rows_kernel(const Strided2D<const T> in, const Strided3D<const TF> f, const void* ids, bool ids_int64,
                       const int32_t* ranks, const float* scales, float* out, int64_t M, int64_t J, int64_t R,
                       int64_t L, bool vec) {
  __shared__ float partial[kRankChunk][kThreads + 1];
  __shared__ float partial2[kRankChunk][kThreads / kRankChunk + 1];
  const int tid = threadIdx.x;
  const int64_t row = blockIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRankChunk;
  const AdapterRank ar = adapter_rank(ranks, load_id(ids, ids_int64, row), L, R);
  const int64_t n_ranks = imax(0, imin(kRankChunk, ar.rank - r0));  // ranks of this chunk to compute
  float* out_row = out + row * R;
  if (n_ranks == 0) {  // past the rank, or base only: zeros, nothing loaded
    if (tid < kRankChunk && r0 + tid < R) out_row[r0 + tid] = 0.0f;
    return;
  }
  const TF* f_rows = f.data + ar.adapter * f.stride0 + r0 * f.stride1;
  float acc[kRankChunk];
#pragma unroll
  for (int r = 0; r < kRankChunk; ++r) acc[r] = 0.0f;
  int64_t j_tail = 0;
  if (vec) {
    const T* in_row = in.data + row * in.stride0;
    const int64_t j_vec = (J / kVec) * kVec;
    for (int64_t j = static_cast<int64_t>(tid) * kVec; j < j_vec; j += kThreads * kVec) {
      float xv[kVec];
      load8(in_row + j, xv);
#pragma unroll
      for (int r = 0; r < kRankChunk; ++r) {
        if (r < n_ranks) {
          float fv[kVec];
          load8(f_rows + r * f.stride1 + j, fv);
#pragma unroll
          for (int q = 0; q < kVec; ++q) acc[r] = fmaf(xv[q], fv[q], acc[r]);
        }
      }
    }
    j_tail = j_vec;
  }
  for (int64_t j = j_tail + tid; j < J; j += kThreads) {
    const float xv = to_float(in.at(row, j));
#pragma unroll
    for (int r = 0; r < kRankChunk; ++r) {
      if (r < n_ranks) acc[r] = fmaf(xv, to_float(f_rows[r * f.stride1 + j * f.stride2]), acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRankChunk; ++r) partial[r][tid] = acc[r];
  __syncthreads();
  {  // thread (r, p) sums 16 partials of rank r; then 16 threads sum the 8 results of their rank
    constexpr int kParts = kThreads / kRankChunk;
    const int r = tid / kParts;
    const int p = tid % kParts;
    float sum = 0.0f;
    for (int q = 0; q < kRankChunk; ++q) sum += partial[r][p * kRankChunk + q];
    partial2[r][p] = sum;
  }
  __syncthreads();
  if (tid < kRankChunk && r0 + tid < R) {
    float sum = 0.0f;
    for (int p = 0; p < kThreads / kRankChunk; ++p) sum += partial2[tid][p];
    const float scale = scales != nullptr ? scales[ar.adapter] : 1.0f;
    out_row[r0 + tid] = tid < n_ranks ? sum * scale : 0.0f;
  }
}

// Prefill: one block per (segment tile, rank chunk): the tile's rows (one adapter) gathered through perm,
// a [64, 16] fp32 tile over 32-deep steps. Thread owns rank tid % 16 of rows 8 * (tid / 16) + i.
template <typename T, typename TF>
__global__ void __launch_bounds__(kThreads)
    shrink_segments_kernel(const Strided2D<const T> in, const Strided3D<const TF> f, const int64_t* perm,
                           const int64_t* tiles, int64_t n_tiles, const int32_t* ranks, const float* scales,
                           float* out, int64_t M, int64_t J, int64_t R, int64_t L) {
  constexpr int BK = 32;
  constexpr int kRowsPerThread = kBM * kRankChunk / kThreads;
  __shared__ float xs[kBM][BK + 1];
  __shared__ float fs[kRankChunk][BK + 1];
  __shared__ int64_t rows_s[kBM];
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRankChunk;
  const AdapterRank ar = adapter_rank(ranks, tiles[tile], L, R);
  const int64_t start = tiles[n_tiles + tile];
  const int64_t end = imin(imin(tiles[2 * n_tiles + tile], M), start + kBM);
  if (start >= end) return;  // a padding tile
  for (int i = tid; i < kBM; i += kThreads) rows_s[i] = start + i < end ? perm[start + i] : 0;
  __syncthreads();
  const int rank = tid % kRankChunk;
  const int row_first = (tid / kRankChunk) * kRowsPerThread;
  const int64_t n_ranks = imax(0, imin(kRankChunk, ar.rank - r0));
  const int64_t n_rows = end - start;
  float acc[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = 0.0f;
  const int64_t j_end = n_ranks > 0 ? J : 0;  // chunks past the rank load nothing
  for (int64_t j0 = 0; j0 < j_end; j0 += BK) {
    __syncthreads();
    for (int e = tid; e < kBM * BK; e += kThreads) {
      const int i = e / BK;
      const int l = e % BK;
      xs[i][l] = (i < n_rows && j0 + l < J) ? to_float(in.at(rows_s[i], j0 + l)) : 0.0f;
    }
    for (int e = tid; e < kRankChunk * BK; e += kThreads) {
      const int r = e / BK;
      const int l = e % BK;
      fs[r][l] = (r < n_ranks && j0 + l < J) ? to_float(f.at(ar.adapter, r0 + r, j0 + l)) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int l = 0; l < BK; ++l) {
      const float fv = fs[rank][l];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] = fmaf(xs[row_first + i][l], fv, acc[i]);
    }
  }
  const int64_t gr = r0 + rank;
  if (gr >= R) return;
  const float scale = scales != nullptr ? scales[ar.adapter] : 1.0f;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int row = row_first + i;
    if (row < n_rows) out[rows_s[row] * R + gr] = rank < n_ranks ? acc[i] * scale : 0.0f;
  }
}

// Prefill with adapters in x's 16-bit dtype: the same product on tensor cores, as lora.cuh's GEMM mainloop
// over one segment tile: P = the tile's rows (gathered through perm), Q[j, r] = F[i, r, j] with the columns
// at or past the rank zero-filled by the tile loads (never read), the fp32 tile written straight to T.
// One block per (segment tile, 64 ranks).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    shrink_segments_mma_kernel(const lora_detail::GemmParams<T, T> base, const Strided3D<const T> f,
                               const int64_t* perm, const int64_t* tiles, int64_t n_tiles, const int32_t* ranks,
                               const float* scales, float* out, int64_t M, int64_t R, int64_t L) {
  __shared__ __align__(128) unsigned char smem[lora_detail::gemm_operand_bytes<T>()];
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kBN;
  const AdapterRank ar = adapter_rank(ranks, tiles[tile], L, R);
  const int64_t start = tiles[n_tiles + tile];
  const int64_t end = imin(imin(tiles[2 * n_tiles + tile], M), start + kBM);
  if (start >= end) return;  // a padding tile
  const bool live = c0 < ar.rank;  // else: zeros, nothing loaded
  if (live) {
    lora_detail::GemmParams<T, T> prm = base;
    prm.q = f.data + ar.adapter * f.stride0;
    prm.cols = ar.rank;
    lora_detail::gemm_mainloop<T, T>(prm, start, c0, smem, perm, end);
  }
  const float* cs = reinterpret_cast<const float*>(smem);
  const float scale = scales != nullptr ? scales[ar.adapter] : 1.0f;
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int i = e / kBN;
    const int j = e % kBN;
    const int64_t col = c0 + j;
    if (start + i < end && col < R) {
      out[perm[start + i] * R + col] = (live && col < ar.rank) ? cs[i * lora_detail::kCPitch + j] * scale : 0.0f;
    }
  }
}

// ---- fused: OUT[t, c] = sum_j P[t, j] Q[j, c] + bias[c] + scale_i sum_{r < rank_i} T[t, r] E[i, r, c] --------

template <typename T, typename TA>
struct FusedParams {
  lora_detail::GemmParams<T, TA> gemm;  // p, q, bias, out, rows (= M), cols, red; lo/hi/seed unused
  const float* lo;                      // T [M, R] fp32, row stride R
  Strided3D<const TA> e;                // E[i, r, c]
  const void* ids;                      // decode: ids [M]
  bool ids_int64;
  const int64_t* perm;   // prefill: the segment table
  const int64_t* tiles;
  int64_t n_tiles;
  const int32_t* ranks;
  const float* scales;   // nullptr: 1
  int64_t L, R;
  float* parts;          // decode split over the reduction: fp32 partial tiles [splits, rows, cols]
  int64_t split_red;     // reduction elements per split (a multiple of the GEMM's 32-deep step)
};

// What a fused_kernel launch does: the whole GEMM and its epilogue, or (decode, split over the reduction so
// that a few row tiles still fill the device) the fixed-order sum of fused_parts_kernel's partial tiles and
// the epilogue.
enum FusedMode : int { kFusedWhole = 0, kFusedFromParts = 1 };

// One block per (row tile, column tile) in lora.cuh's grouped order: the GEMM mainloop (WMMA for 16-bit),
// then the expand in the epilogue. kSegments: the row tile is a segment tile (one adapter, rows gathered
// through perm): E's [64 x 16] chunk is staged once in shared memory. Else (decode) each row gathers its
// own adapter's E, up to its own rank, and the rank loop stops at the tile's largest rank.
// (row tile, column tile) of block blockIdx.x in lora.cuh's grouped order: consecutive blocks walk kGroup row
// tiles before moving to the next column tile, so they share column tiles of the weight in L2.
struct TileIndex {
  int64_t m, n;
};
__device__ inline TileIndex grouped_tile(int64_t tiles_m, int64_t tiles_n) {
  const int64_t pid = blockIdx.x;
  const int64_t per_group = lora_detail::kGroup * tiles_n;
  const int64_t first_tile_m = (pid / per_group) * lora_detail::kGroup;
  const int64_t group_rows = imin(tiles_m - first_tile_m, lora_detail::kGroup);
  return {first_tile_m + (pid % per_group) % group_rows, (pid % per_group) / group_rows};
}

// Decode, split over the reduction: block (tile, split) writes its fp32 partial tile of P @ Q~ over the
// split's slice of the reduction to parts[split] ([rows, cols]); fused_kernel<..., kFusedFromParts> sums them.
template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads) fused_parts_kernel(const FusedParams<T, TA> prm) {
  unsigned char* const smem = dynamic_smem();  // lora_detail::gemm_operand_bytes<T>() bytes, from the launch
  const auto& g = prm.gemm;
  const TileIndex tile = grouped_tile(ceil_div(g.rows, kBM), ceil_div(g.cols, kBN));
  const int64_t m0 = tile.m * kBM;
  const int64_t n0 = tile.n * kBN;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * prm.split_red;
  lora_detail::GemmParams<T, TA> part = g;
  part.p += k_begin * g.p_stride_red;  // k_begin is a multiple of 32 elements: 16-byte alignment holds
  part.q += k_begin * g.q_stride_red;
  part.red = imin(prm.split_red, g.red - k_begin);
  lora_detail::gemm_mainloop<T, TA>(part, m0, n0, smem);
  const float* cs = reinterpret_cast<const float*>(smem);
  float* out = prm.parts + static_cast<int64_t>(blockIdx.y) * g.rows * g.cols;
  for (int e = threadIdx.x; e < kBM * kBN; e += kThreads) {
    const int64_t row = m0 + e / kBN;
    const int64_t col = n0 + e % kBN;
    if (row < g.rows && col < g.cols) out[row * g.cols + col] = cs[(e / kBN) * lora_detail::kCPitch + e % kBN];
  }
}

template <typename T, typename TA, bool kSegments, int kMode>
__global__ void __launch_bounds__(kThreads) fused_kernel(const FusedParams<T, TA> prm) {
  static_assert(kMode == kFusedWhole || (kMode == kFusedFromParts && !kSegments), "only decode splits");
  unsigned char* const smem = dynamic_smem();  // lora_detail::gemm_operand_bytes<T>() bytes, from the launch
  __shared__ float lo_s[kBM][kRankPitch];
  __shared__ float hi_s[kBN][kRankPitch];
  __shared__ int64_t row_src[kBM];  // source row of each tile row, -1 past the tile's rows
  __shared__ int64_t row_adapter[kBM];
  __shared__ int64_t row_rank[kBM];
  __shared__ float row_scale[kBM];
  __shared__ int64_t tile_rank;
  const auto& g = prm.gemm;
  const int tid = threadIdx.x;

  const TileIndex tile = grouped_tile(kSegments ? prm.n_tiles : ceil_div(g.rows, kBM), ceil_div(g.cols, kBN));
  const int64_t tile_m = tile.m;
  const int64_t n0 = tile.n * kBN;

  int64_t m0, row_end;  // this tile's rows: [m0, row_end) in sorted order (kSegments) or in place
  AdapterRank tile_ar{0, 0};
  if constexpr (kSegments) {
    m0 = prm.tiles[prm.n_tiles + tile_m];
    row_end = imin(imin(prm.tiles[2 * prm.n_tiles + tile_m], g.rows), m0 + kBM);
    if (m0 >= row_end) return;  // a padding tile
    tile_ar = adapter_rank(prm.ranks, prm.tiles[tile_m], prm.L, prm.R);
  } else {
    m0 = tile_m * kBM;
    row_end = imin(m0 + kBM, g.rows);
  }
  for (int i = tid; i < kBM; i += kThreads) {
    const int64_t pos = m0 + i;
    int64_t src = -1, adapter = 0, rank = 0;
    if (pos < row_end) {
      src = kSegments ? prm.perm[pos] : pos;
      const AdapterRank ar = kSegments ? tile_ar : adapter_rank(prm.ranks, load_id(prm.ids, prm.ids_int64, pos),
                                                                prm.L, prm.R);
      adapter = ar.adapter;
      rank = ar.rank;
    }
    row_src[i] = src;
    row_adapter[i] = adapter;
    row_rank[i] = rank;
    row_scale[i] = (rank > 0 && prm.scales != nullptr) ? prm.scales[adapter] : 1.0f;
  }
  __syncthreads();
  if (tid == 0) {
    int64_t largest = 0;
    for (int i = 0; i < kBM; ++i) largest = imax(largest, row_rank[i]);
    tile_rank = largest;
  }
  if constexpr (kMode == kFusedFromParts) {  // the split partials, summed in split order: deterministic
    float* sum = reinterpret_cast<float*>(smem);
    const int64_t n_splits = ceil_div(g.red, prm.split_red);
    for (int e = tid; e < kBM * kBN; e += kThreads) {
      const int64_t row = m0 + e / kBN;
      const int64_t col = n0 + e % kBN;
      float acc = 0.0f;
      if (row < row_end && col < g.cols) {
        for (int64_t sp = 0; sp < n_splits; ++sp) acc += prm.parts[(sp * g.rows + row) * g.cols + col];
      }
      sum[(e / kBN) * lora_detail::kCPitch + e % kBN] = acc;
    }
    __syncthreads();
  } else {
    lora_detail::gemm_mainloop<T, TA>(g, m0, n0, smem, kSegments ? prm.perm : nullptr, row_end);
  }
  const float* cs = reinterpret_cast<const float*>(smem);

  // Epilogue: thread owns column j = tid % 64 of rows tid / 64 + 2 t (t < 32), as in lora.cuh.
  const int j = tid % kBN;
  const int i_first = tid / kBN;
  constexpr int kRowsPerThread = kBM * kBN / kThreads;
  constexpr int kRowStep = kThreads / kBN;
  const int64_t gj = n0 + j;
  const bool col_ok = gj < g.cols;
  float lora[kRowsPerThread];
#pragma unroll
  for (int t = 0; t < kRowsPerThread; ++t) lora[t] = 0.0f;
  const int64_t max_rank = tile_rank;  // read after the mainloop's barriers
  const bool e_cols_contiguous = prm.e.stride2 == 1;
  for (int64_t r0 = 0; r0 < max_rank; r0 += kRankChunk) {
    __syncthreads();  // the previous chunk has been used
    for (int e = tid; e < kBM * kRankChunk; e += kThreads) {
      const int i = e / kRankChunk;
      const int r = e % kRankChunk;
      const int64_t gr = r0 + r;
      lo_s[i][r] = gr < row_rank[i] ? prm.lo[row_src[i] * prm.R + gr] * row_scale[i] : 0.0f;
    }
    if constexpr (kSegments) {  // one adapter: stage E[i, r0 : r0 + 16, n0 : n0 + 64] (coalesced either way)
      for (int e = tid; e < kBN * kRankChunk; e += kThreads) {
        const int jj = e_cols_contiguous ? e % kBN : e / kRankChunk;
        const int r = e_cols_contiguous ? e / kBN : e % kRankChunk;
        const int64_t gr = r0 + r;
        const int64_t col = n0 + jj;
        hi_s[jj][r] = (col < g.cols && gr < tile_ar.rank) ? to_float(prm.e.at(tile_ar.adapter, gr, col)) : 0.0f;
      }
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kRowsPerThread; ++t) {
      const int i = i_first + kRowStep * t;
      if constexpr (kSegments) {
#pragma unroll
        for (int r = 0; r < kRankChunk; ++r) lora[t] = fmaf(lo_s[i][r], hi_s[j][r], lora[t]);
      } else {
        const int64_t n_ranks = imin(kRankChunk, row_rank[i] - r0);  // nothing loaded past the row's rank
        if (col_ok && n_ranks > 0) {
          const TA* e_col = &prm.e.at(row_adapter[i], r0, gj);
          for (int64_t r = 0; r < n_ranks; ++r) {
            lora[t] = fmaf(lo_s[i][r], to_float(e_col[r * prm.e.stride1]), lora[t]);
          }
        }
      }
    }
  }

  if (!col_ok) return;
  const float bias = g.bias != nullptr ? to_float(g.bias[gj * g.bias_stride]) : 0.0f;
#pragma unroll
  for (int t = 0; t < kRowsPerThread; ++t) {
    const int i = i_first + kRowStep * t;
    const int64_t src = row_src[i];
    if (src >= 0) {
      float v = cs[i * lora_detail::kCPitch + j] + lora[t];
      if (g.bias != nullptr) v += bias;
      g.out[src * g.out_stride_row + gj * g.out_stride_col] = from_float<T>(v);
    }
  }
}

// ---- dA / dB: G[i, r, c] = scale_i * sum over rows t of segment i (part s) of T[t, r] IN[t, c] --------------

// One block per (adapter, column tile of 64) x (rank chunk, part): walks its part of the adapter's rows in
// sorted order, so every element is summed in a fixed order by one thread. Thread owns column tid % 64 of
// ranks 8 * (tid / 64) + q. splits == 1: writes `out` (TO, strides o_*) directly; else fp32 partials
// part[s][i][r][c] (contiguous) that sum_parts_kernel adds up. Zero past the rank (never 0 * inf).
template <typename T, typename TO>
__global__ void __launch_bounds__(kThreads)
    grad_kernel(const float* t_in, const Strided2D<const T> in, const int64_t* perm, const int64_t* bounds,
                const int32_t* ranks, const float* scales, TO* out, int64_t o_sl, int64_t o_sr, int64_t o_sc,
                float* parts, int64_t splits, int64_t M, int64_t C, int64_t R, int64_t L) {
  constexpr int kRanksPerThread = kRankChunk * kGradCols / kThreads;
  __shared__ float xs[kGradRows][kGradCols + 1];
  __shared__ float ts[kGradRows][kRankPitch];
  __shared__ int64_t rows_s[kGradRows];
  const int tid = threadIdx.x;
  const int64_t col_tiles = ceil_div(C, kGradCols);
  const int64_t adapter = static_cast<int64_t>(blockIdx.x) / col_tiles;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) % col_tiles) * kGradCols;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y / splits) * kRankChunk;
  const int64_t split = blockIdx.y % splits;
  const AdapterRank ar = adapter_rank(ranks, adapter, L, R);
  const int64_t groups = L + 1;
  int64_t seg_start = bounds[adapter + 1];
  int64_t seg_end = imin(bounds[groups + adapter + 1], M);
  if (splits > 1) {
    const int64_t part = ceil_div(ceil_div(imax(seg_end - seg_start, 0), splits), kGradRows) * kGradRows;
    seg_start = imin(seg_start + split * part, seg_end);
    seg_end = imin(seg_start + part, seg_end);
  }
  const int64_t n_ranks = imax(0, imin(kRankChunk, ar.rank - r0));
  if (n_ranks == 0) seg_end = seg_start;  // past the rank: zeros, nothing loaded
  const int col = tid % kGradCols;
  const int rank_first = (tid / kGradCols) * kRanksPerThread;
  float acc[kRanksPerThread];
#pragma unroll
  for (int q = 0; q < kRanksPerThread; ++q) acc[q] = 0.0f;
  for (int64_t m0 = seg_start; m0 < seg_end; m0 += kGradRows) {
    __syncthreads();
    for (int i = tid; i < kGradRows; i += kThreads) rows_s[i] = m0 + i < seg_end ? perm[m0 + i] : -1;
    __syncthreads();
    for (int e = tid; e < kGradRows * kGradCols; e += kThreads) {
      const int i = e / kGradCols;
      const int c = e % kGradCols;
      xs[i][c] = (rows_s[i] >= 0 && c0 + c < C) ? to_float(in.at(rows_s[i], c0 + c)) : 0.0f;
    }
    for (int e = tid; e < kGradRows * kRankChunk; e += kThreads) {
      const int i = e / kRankChunk;
      const int r = e % kRankChunk;
      ts[i][r] = (rows_s[i] >= 0 && r < n_ranks) ? t_in[rows_s[i] * R + r0 + r] : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int i = 0; i < kGradRows; ++i) {
      const float xv = xs[i][col];
#pragma unroll
      for (int q = 0; q < kRanksPerThread; ++q) acc[q] = fmaf(ts[i][rank_first + q], xv, acc[q]);
    }
  }
  const int64_t gc = c0 + col;
  if (gc >= C) return;
  const float scale = scales != nullptr ? scales[ar.adapter] : 1.0f;
#pragma unroll
  for (int q = 0; q < kRanksPerThread; ++q) {
    const int r = rank_first + q;
    const int64_t gr = r0 + r;
    if (gr >= R) continue;
    const float v = r < n_ranks ? acc[q] * scale : 0.0f;
    if (splits == 1) {
      out[adapter * o_sl + gr * o_sr + gc * o_sc] = from_float<TO>(v);
    } else {
      parts[((split * L + adapter) * R + gr) * C + gc] = v;
    }
  }
}

// out[i, r, c] (strides o_*) = sum_s parts[s, i, r, c], in the order s = 0, 1, ...: deterministic.
template <typename TO>
__global__ void __launch_bounds__(256)
    sum_parts_kernel(const float* parts, int64_t splits, int64_t L, int64_t R, int64_t C, TO* out, int64_t o_sl,
                     int64_t o_sr, int64_t o_sc) {
  const int64_t count = L * R * C;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count; idx += step) {
    float acc = 0.0f;
    for (int64_t s = 0; s < splits; ++s) acc += parts[s * count + idx];
    const int64_t c = idx % C;
    const int64_t r = (idx / C) % R;
    const int64_t i = idx / (C * R);
    out[i * o_sl + r * o_sr + c * o_sc] = from_float<TO>(acc);
  }
}

// ---- workspace ------------------------------------------------------------------------------------------

inline int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// Where the segment builder's arrays live in a workspace, from M and L alone.
struct SegmentLayout {
  int64_t n_tiles, chunks;
  int64_t perm, bounds, tiles, tile_ends, local_rank, counts;  // byte offsets
  int64_t bytes;
};

inline SegmentLayout segment_layout(int64_t M, int64_t L, int64_t base) {
  SegmentLayout s{};
  s.n_tiles = ceil_div(M, kMultiLoraSegmentRows) + imin(L + 1, M);
  s.chunks = ceil_div(M, kSortThreads);
  int64_t at = base;
  s.perm = at;
  at += align256(8 * M);
  s.bounds = at;
  at += align256(8 * 2 * (L + 1));
  s.tiles = at;
  at += align256(8 * 3 * s.n_tiles);
  s.tile_ends = at;
  at += align256(8 * (L + 1));
  s.local_rank = at;
  at += align256(8 * M);
  s.counts = at;
  at += align256(8 * s.chunks * (L + 1));
  s.bytes = at - base;
  return s;
}

inline bool valid_sizes(int64_t M, int64_t N, int64_t K, int64_t L, int64_t R) {
  return M >= 0 && N >= 0 && K >= 0 && L >= 1 && R >= 1;
}

inline bool use_decode(int path, int64_t M) {
  return path == kMultiLoraDecode || (path == kMultiLoraAuto && M <= kMultiLoraDecodeMaxRows);
}

template <typename T, typename TF>
inline bool rows_vec(const Strided2D<const T>& in, const Strided3D<const TF>& f) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return in.stride1 == 1 && f.stride2 == 1 && aligned(in.data) && aligned(f.data) && in.stride0 % kVec == 0 &&
         f.stride0 % kVec == 0 && f.stride1 % kVec == 0;
}

// T[M, R] = scale_i * IN @ F[i].T (see the shrink kernels); segments == nullptr: the decode kernel.
template <typename T, typename TF>
cudaError_t launch_shrink(Strided2D<const T> in, Strided3D<const TF> f, const void* ids, bool ids_int64,
                          const MultiLoraSegments* segments, const int32_t* ranks, const float* scales, float* out,
                          int64_t M, int64_t J, int64_t R, int64_t L, cudaStream_t stream) {
  const int64_t chunks = ceil_div(R, kRankChunk);
  if (chunks > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  if (segments == nullptr) {
    if (M > kMaxGridX) return cudaErrorInvalidConfiguration;  // one block per row: never wrap the grid
    const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(chunks));
    shrink_rows_kernel<T, TF><<<grid, kThreads, 0, stream>>>(in, f, ids, ids_int64, ranks, scales, out, M, J, R, L,
                                                             rows_vec(in, f));
  } else if constexpr (std::is_same_v<T, TF> && !std::is_same_v<T, float>) {  // tensor cores
    const int64_t col_tiles = ceil_div(R, kBN);
    if (segments->n_tiles > kMaxGridX || col_tiles > kMaxGridYZ) return cudaErrorInvalidConfiguration;
    lora_detail::GemmParams<T, T> base{};
    base.p = in.data;
    base.p_stride_row = in.stride0;
    base.p_stride_red = in.stride1;
    base.q_stride_red = f.stride2;  // Q[j, r] = F[i, r, j]
    base.q_stride_col = f.stride1;
    base.rows = M;
    base.red = J;
    base.p_vec = rows_vectorizable(in.data, in.stride0, in.stride1);
    // Each adapter's rows start 16-byte aligned too when the adapter stride is a multiple of 16 bytes.
    constexpr int64_t kVec16 = 16 / static_cast<int64_t>(sizeof(T));
    base.q_vec = rows_vectorizable(f.data, f.stride1, f.stride2) && f.stride0 % kVec16 == 0;
    const dim3 grid(static_cast<unsigned>(segments->n_tiles), static_cast<unsigned>(col_tiles));
    shrink_segments_mma_kernel<T><<<grid, kThreads, 0, stream>>>(base, f, segments->perm, segments->tiles,
                                                                 segments->n_tiles, ranks, scales, out, M, R, L);
  } else {
    if (segments->n_tiles > kMaxGridX) return cudaErrorInvalidConfiguration;
    const dim3 grid(static_cast<unsigned>(segments->n_tiles), static_cast<unsigned>(chunks));
    shrink_segments_kernel<T, TF><<<grid, kThreads, 0, stream>>>(in, f, segments->perm, segments->tiles,
                                                                 segments->n_tiles, ranks, scales, out, M, J, R, L);
  }
  return cudaPeekAtLastError();
}

// Reduction elements per split of the decode GEMM [rows, cols] over `red` (red itself: no split), from the
// sizes alone; a multiple of the GEMM's 32-deep step, so every split starts 16-byte aligned.
inline int64_t decode_split_red(int64_t rows, int64_t cols, int64_t red) {
  const int64_t tiles = ceil_div(rows, kBM) * ceil_div(cols, kBN);
  int64_t wanted = tiles > 0 ? imin(kDecodeMaxSplits, ceil_div(kDecodeTargetBlocks, tiles)) : 1;
  wanted = imin(wanted, ceil_div(red, kDecodeMinSplitRed));
  if (wanted <= 1) return imax(red, 1);
  return ceil_div(ceil_div(red, wanted), lora_detail::kBK) * lora_detail::kBK;
}
inline int64_t decode_splits(int64_t rows, int64_t cols, int64_t red) {
  return red > 0 ? ceil_div(red, decode_split_red(rows, cols, red)) : 1;
}
// fp32 floats of the decode GEMM's partial tiles (0 without a split).
inline int64_t decode_parts_floats(int64_t rows, int64_t cols, int64_t red) {
  const int64_t splits = decode_splits(rows, cols, red);
  return splits > 1 ? splits * rows * cols : 0;
}

// OUT = P @ Q~ + bias + scale_i T[t] @ E[i] (see fused_kernel); segments == nullptr: the decode kernels,
// with prm.parts holding decode_parts_floats(rows, cols, red) floats.
template <typename T, typename TA>
cudaError_t launch_fused(FusedParams<T, TA> prm, const MultiLoraSegments* segments, cudaStream_t stream) {
  // The GEMM operand stages in dynamic shared memory (fp32: 36,864 B beside 9,992 B of static arrays; all
  // static, the fp32 segment kernel took 46,856 of the 48 KiB).
  constexpr size_t kFusedSmem = static_cast<size_t>(lora_detail::gemm_operand_bytes<T>());
  if (prm.gemm.rows == 0 || prm.gemm.cols == 0) return cudaSuccess;
  const int64_t tiles_m = segments != nullptr ? segments->n_tiles : ceil_div(prm.gemm.rows, kBM);
  const int64_t tiles = tiles_m * ceil_div(prm.gemm.cols, kBN);
  if (tiles > kMaxGridX) return cudaErrorInvalidConfiguration;
  const unsigned grid = static_cast<unsigned>(tiles);
  if (segments != nullptr) {
    prm.perm = segments->perm;
    prm.tiles = segments->tiles;
    prm.n_tiles = segments->n_tiles;
    fused_kernel<T, TA, true, kFusedWhole><<<grid, kThreads, kFusedSmem, stream>>>(prm);
    return cudaPeekAtLastError();
  }
  const int64_t splits = decode_splits(prm.gemm.rows, prm.gemm.cols, prm.gemm.red);
  if (splits == 1) {
    fused_kernel<T, TA, false, kFusedWhole><<<grid, kThreads, kFusedSmem, stream>>>(prm);
    return cudaPeekAtLastError();
  }
  if (prm.parts == nullptr) return cudaErrorInvalidValue;
  prm.split_red = decode_split_red(prm.gemm.rows, prm.gemm.cols, prm.gemm.red);
  fused_parts_kernel<T, TA><<<dim3(grid, static_cast<unsigned>(splits)), kThreads, kFusedSmem, stream>>>(prm);
  cudaError_t err = cudaPeekAtLastError();
  if (err != cudaSuccess) return err;
  fused_kernel<T, TA, false, kFusedFromParts><<<grid, kThreads, kFusedSmem, stream>>>(prm);
  return cudaPeekAtLastError();
}

// How many parts each adapter's rows are cut into for dA / dB: enough blocks to fill a device, from the
// sizes alone (never the ids).
inline int64_t grad_splits(int64_t M, int64_t C, int64_t L, int64_t R) {
  const int64_t blocks = L * ceil_div(imax(C, 1), kGradCols) * ceil_div(R, kRankChunk);
  const int64_t wanted = ceil_div(kGradTargetBlocks, blocks);
  return imax(1, imin(imin(kGradMaxSplits, wanted), ceil_div(imax(M, 1), kGradRows)));
}

// G -> out (TO, [L, R, C] addressed by strides o_*); parts: grad_splits(...) * L * R * C floats, or unused.
template <typename T, typename TO>
cudaError_t launch_grad(const float* t_in, Strided2D<const T> in, const MultiLoraSegments& segments,
                        const int32_t* ranks, const float* scales, TO* out, int64_t o_sl, int64_t o_sr, int64_t o_sc,
                        float* parts, int64_t M, int64_t C, int64_t R, int64_t L, cudaStream_t stream) {
  if (C == 0) return cudaSuccess;
  const int64_t splits = grad_splits(M, C, L, R);
  const int64_t blocks_x = L * ceil_div(C, kGradCols);
  const int64_t blocks_y = ceil_div(R, kRankChunk) * splits;
  if (blocks_x > kMaxGridX || blocks_y > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  grad_kernel<T, TO><<<grid, kThreads, 0, stream>>>(t_in, in, segments.perm, segments.bounds, ranks, scales, out,
                                                    o_sl, o_sr, o_sc, parts, splits, M, C, R, L);
  cudaError_t err = cudaPeekAtLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t count = L * R * C;
  const int64_t blocks = imin(ceil_div(count, 256), 4096);
  sum_parts_kernel<TO><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(parts, splits, L, R, C, out, o_sl, o_sr,
                                                                          o_sc);
  return cudaPeekAtLastError();
}

}  // namespace multi_lora_detail

// ---- public launchers -----------------------------------------------------------------------------------

// Bytes of workspace launch_multi_lora_segments needs for M rows and L adapter slots, and the table's length.
// Preconditions:
//   aliasing    none (host arithmetic only)
//   alignment   n/a
//   archs       n/a (host)
//   threads     pure function
//   CUDA graphs host-only, safe anywhere
inline int64_t multi_lora_segments_workspace_bytes(int64_t M, int64_t L) {
  return multi_lora_detail::segment_layout(M, L, 0).bytes;
}
inline int64_t multi_lora_segment_tiles(int64_t M, int64_t L) {
  return multi_lora_detail::segment_layout(M, L, 0).n_tiles;
}

// The segment table of `ids` [M] (int32, or int64 when ids_int64; contiguous) over L adapter slots, built on
// the device in `workspace` (multi_lora_segments_workspace_bytes(M, L) bytes, 256-byte aligned); *out points
// into it. Fixed grids (from M and L), no host sync, no atomics: the sort is stable and deterministic.
// Preconditions:
//   aliasing    the workspace must not overlap ids
//   alignment   workspace 256-byte aligned, any contents
//   archs       any the toolkit targets (16-byte paths are plain vector loads)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        the table in *out points into the workspace: keep it alive while any launch reads the segments
inline cudaError_t launch_multi_lora_segments(const void* ids, bool ids_int64, int64_t M, int64_t L, void* workspace,
                                              MultiLoraSegments* out, cudaStream_t stream) {
  using namespace multi_lora_detail;
  if (M < 0 || L < 1 || out == nullptr) return cudaErrorInvalidValue;
  const SegmentLayout lay = segment_layout(M, L, 0);
  auto* base = static_cast<unsigned char*>(workspace);
  out->perm = reinterpret_cast<int64_t*>(base + lay.perm);
  out->bounds = reinterpret_cast<int64_t*>(base + lay.bounds);
  out->tiles = reinterpret_cast<int64_t*>(base + lay.tiles);
  out->n_tiles = lay.n_tiles;
  auto* tile_ends = reinterpret_cast<int64_t*>(base + lay.tile_ends);
  auto* local_rank = reinterpret_cast<int64_t*>(base + lay.local_rank);
  auto* counts = reinterpret_cast<int64_t*>(base + lay.counts);
  const int64_t items = imax(M, lay.n_tiles);
  const int64_t scatter_blocks = ceil_div(items, kSortThreads);
  if (lay.chunks > kMaxGridX || scatter_blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  const auto* ids32 = static_cast<const int32_t*>(ids);
  const auto* ids64 = static_cast<const int64_t*>(ids);
  if (lay.chunks > 0) {
    const unsigned grid = static_cast<unsigned>(lay.chunks);
    if (ids_int64) {
      segment_count_kernel<int64_t><<<grid, kSortThreads, 0, stream>>>(ids64, M, L, local_rank, counts);
    } else {
      segment_count_kernel<int32_t><<<grid, kSortThreads, 0, stream>>>(ids32, M, L, local_rank, counts);
    }
    cudaError_t err = cudaPeekAtLastError();
    if (err != cudaSuccess) return err;
  }
  segment_scan_kernel<kSortThreads><<<1, kSortThreads, 0, stream>>>(lay.chunks, L, counts, out->bounds, tile_ends);
  cudaError_t err = cudaPeekAtLastError();
  if (err != cudaSuccess || items == 0) return err;
  const unsigned grid = static_cast<unsigned>(scatter_blocks);
  if (ids_int64) {
    segment_scatter_kernel<int64_t><<<grid, kSortThreads, 0, stream>>>(ids64, M, L, local_rank, counts, out->bounds,
                                                                       tile_ends, out->perm, out->tiles, lay.n_tiles);
  } else {
    segment_scatter_kernel<int32_t><<<grid, kSortThreads, 0, stream>>>(ids32, M, L, local_rank, counts, out->bounds,
                                                                       tile_ends, out->perm, out->tiles, lay.n_tiles);
  }
  return cudaPeekAtLastError();
}

template <typename T, typename TA>
struct MultiLoraForwardArgs {
  Strided2D<const T> x;        // [M, K]
  Strided2D<const T> weight;   // [N, K]
  const T* bias;               // [N] or nullptr
  int64_t bias_stride;
  Strided3D<const TA> lora_a;  // [L, R, K]
  Strided3D<const TA> lora_b;  // [L, N, R]
  const void* adapter_ids;     // [M] contiguous, int32 (or int64 when ids_int64)
  bool ids_int64;
  const float* scalings;  // [L]
  const int32_t* ranks;   // [L]
  float* s;               // out: [M, R] fp32 contiguous (unscaled, zero past each row's rank), for the backward
  Strided2D<T> y;         // out: [M, N]
  int64_t M, N, K, L, R;
  int path;  // MultiLoraPath
  // The ids' segment table when the caller built it once for every layer (launch_multi_lora_segments, or the
  // same layout: 64-row tiles); nullptr: the prefill path builds it in the workspace.
  const MultiLoraSegments* segments = nullptr;
};

struct MultiLoraForwardPlan {
  bool decode;
  int64_t workspace_bytes;  // prefill: the segment table; decode: the split GEMM's partial tiles (or 0)
};

// Preconditions:
//   aliasing    none (host arithmetic only)
//   alignment   n/a
//   archs       n/a (host)
//   threads     pure function
//   CUDA graphs host-only, safe anywhere
inline MultiLoraForwardPlan multi_lora_forward_plan(int64_t M, int64_t N, int64_t K, int64_t L, int path) {
  MultiLoraForwardPlan plan{};
  plan.decode = multi_lora_detail::use_decode(path, M);
  if (M == 0) return plan;
  plan.workspace_bytes = plan.decode ? multi_lora_detail::align256(4 * multi_lora_detail::decode_parts_floats(M, N, K))
                                     : multi_lora_segments_workspace_bytes(M, L);
  return plan;
}

// The whole forward on `stream`: (segments,) shrink, fused GEMM. workspace: multi_lora_forward_plan(M, N, K,
// L, path).workspace_bytes bytes, 256-byte aligned (may be nullptr when that is 0).
// Preconditions:
//   aliasing    y, s and the workspace must not overlap each other or any input
//   alignment   none required; 16-byte (cp.async) paths where pointers and strides allow (run time); workspace
//               256-byte aligned, any contents
//   archs       sm_70+ (WMMA for half; bf16 tensor cores and cp.async from sm_80; fp32: FMA units)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        ids never read out of bounds whatever they hold; the path is chosen from M alone (never the ids'
//               values)
template <typename T, typename TA>
cudaError_t launch_multi_lora_forward(const MultiLoraForwardArgs<T, TA>& a, void* workspace, cudaStream_t stream) {
  using namespace multi_lora_detail;
  if (!valid_sizes(a.M, a.N, a.K, a.L, a.R) || a.path < kMultiLoraAuto || a.path > kMultiLoraPrefill)
    return cudaErrorInvalidValue;
  if (a.M == 0) return cudaSuccess;
  const MultiLoraForwardPlan plan = multi_lora_forward_plan(a.M, a.N, a.K, a.L, a.path);
  MultiLoraSegments segments = a.segments != nullptr ? *a.segments : MultiLoraSegments{};
  cudaError_t err;
  if (!plan.decode && a.segments == nullptr) {
    if ((err = launch_multi_lora_segments(a.adapter_ids, a.ids_int64, a.M, a.L, workspace, &segments, stream)) !=
        cudaSuccess)
      return err;
  }
  const MultiLoraSegments* seg = plan.decode ? nullptr : &segments;
  err = launch_shrink<T, TA>(a.x, a.lora_a, a.adapter_ids, a.ids_int64, seg, a.ranks, nullptr, a.s, a.M, a.K, a.R,
                             a.L, stream);
  if (err != cudaSuccess) return err;
  FusedParams<T, TA> prm{};
  prm.gemm.p = a.x.data;
  prm.gemm.p_stride_row = a.x.stride0;
  prm.gemm.p_stride_red = a.x.stride1;
  prm.gemm.q = a.weight.data;  // Q[k, n] = W[n, k]
  prm.gemm.q_stride_red = a.weight.stride1;
  prm.gemm.q_stride_col = a.weight.stride0;
  prm.gemm.bias = a.bias;
  prm.gemm.bias_stride = a.bias_stride;
  prm.gemm.out = a.y.data;
  prm.gemm.out_stride_row = a.y.stride0;
  prm.gemm.out_stride_col = a.y.stride1;
  prm.gemm.rows = a.M;
  prm.gemm.cols = a.N;
  prm.gemm.red = a.K;
  prm.gemm.p_vec = rows_vectorizable(a.x.data, a.x.stride0, a.x.stride1);
  prm.gemm.q_vec = rows_vectorizable(a.weight.data, a.weight.stride0, a.weight.stride1);
  prm.lo = a.s;
  // E[i, r, c = n] = B[i, n, r]
  prm.e = Strided3D<const TA>{a.lora_b.data, a.lora_b.stride0, a.lora_b.stride2, a.lora_b.stride1};
  prm.ids = a.adapter_ids;
  prm.ids_int64 = a.ids_int64;
  prm.ranks = a.ranks;
  prm.scales = a.scalings;
  prm.L = a.L;
  prm.R = a.R;
  prm.parts = plan.decode ? static_cast<float*>(workspace) : nullptr;
  return launch_fused<T, TA>(prm, seg, stream);
}

template <typename T, typename TA>
struct MultiLoraBackwardArgs {
  Strided2D<const T> grad_y;   // [M, N]
  Strided2D<const T> x;        // [M, K]
  Strided2D<const T> weight;   // [N, K]
  Strided3D<const TA> lora_a;  // [L, R, K]
  Strided3D<const TA> lora_b;  // [L, N, R]
  const void* adapter_ids;     // [M] contiguous
  bool ids_int64;
  const float* scalings;  // [L]
  const int32_t* ranks;   // [L]
  const float* s;         // [M, R] fp32 contiguous, from the forward
  Strided2D<T> grad_x;    // out: [M, K]; grad_x.data == nullptr skips dX
  TA* grad_a;             // out: [L, R, K] contiguous
  TA* grad_b;             // out: [L, N, R] contiguous
  int64_t M, N, K, L, R;
  int path;  // MultiLoraPath: the row kernels (dS, dX); dA / dB always use the segment table
  const MultiLoraSegments* segments = nullptr;  // a prebuilt table (as in MultiLoraForwardArgs), or nullptr
};

struct MultiLoraBackwardPlan {
  bool decode;
  int64_t splits_a, splits_b;                  // parts per adapter for dA (columns K) and dB (columns N)
  int64_t ds_offset, parts_a_offset, parts_b_offset, parts_dx_offset;  // bytes (segments at 0)
  int64_t workspace_bytes;
};

// Preconditions:
//   aliasing    none (host arithmetic only)
//   alignment   n/a
//   archs       n/a (host)
//   threads     pure function
//   CUDA graphs host-only, safe anywhere
inline MultiLoraBackwardPlan multi_lora_backward_plan(int64_t M, int64_t N, int64_t K, int64_t L, int64_t R,
                                                      int path) {
  using namespace multi_lora_detail;
  MultiLoraBackwardPlan plan{};
  plan.decode = use_decode(path, M);
  plan.splits_a = grad_splits(M, K, L, R);
  plan.splits_b = grad_splits(M, N, L, R);
  if (M == 0) return plan;  // nothing but zeroed gradients
  int64_t at = multi_lora_segments_workspace_bytes(M, L);
  plan.ds_offset = at;
  at += align256(4 * M * R);
  plan.parts_a_offset = at;
  if (plan.splits_a > 1) at += align256(4 * plan.splits_a * L * R * K);
  plan.parts_b_offset = at;
  if (plan.splits_b > 1) at += align256(4 * plan.splits_b * L * R * N);
  plan.parts_dx_offset = at;
  if (plan.decode) at += align256(4 * decode_parts_floats(M, K, N));
  plan.workspace_bytes = at;
  return plan;
}

// The whole backward (dX, dA, dB) on `stream`. workspace: multi_lora_backward_plan(...).workspace_bytes bytes,
// 256-byte aligned, any contents. dW and db are the caller's (plain GEMMs).
// Preconditions:
//   aliasing    dx, grad_a, grad_b and the workspace must not overlap each other or any input
//   alignment   none required; 16-byte (cp.async) paths where pointers and strides allow (run time); workspace
//               256-byte aligned, any contents
//   archs       sm_70+ (WMMA for half; bf16 tensor cores and cp.async from sm_80; fp32: FMA units)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        deterministic: fixed summation order, no atomics
template <typename T, typename TA>
cudaError_t launch_multi_lora_backward(const MultiLoraBackwardArgs<T, TA>& a, void* workspace,
                                       cudaStream_t stream) {
  using namespace multi_lora_detail;
  const int64_t M = a.M, N = a.N, K = a.K, L = a.L, R = a.R;
  if (!valid_sizes(M, N, K, L, R) || a.path < kMultiLoraAuto || a.path > kMultiLoraPrefill)
    return cudaErrorInvalidValue;
  cudaError_t err;
  if (M == 0) {  // no rows: zero gradients (all-zero bits in every dtype)
    if ((err = cudaMemsetAsync(a.grad_a, 0, sizeof(TA) * L * R * K, stream)) != cudaSuccess) return err;
    return cudaMemsetAsync(a.grad_b, 0, sizeof(TA) * L * N * R, stream);
  }
  const MultiLoraBackwardPlan plan = multi_lora_backward_plan(M, N, K, L, R, a.path);
  auto* base = static_cast<unsigned char*>(workspace);
  MultiLoraSegments segments = a.segments != nullptr ? *a.segments : MultiLoraSegments{};
  if (a.segments == nullptr &&
      (err = launch_multi_lora_segments(a.adapter_ids, a.ids_int64, M, L, workspace, &segments, stream)) !=
          cudaSuccess)
    return err;
  const MultiLoraSegments* seg = plan.decode ? nullptr : &segments;
  float* ds = reinterpret_cast<float*>(base + plan.ds_offset);
  // dS = s_i dY @ B[i]: the shrink with F[i, r, j = n] = B[i, n, r].
  const Strided3D<const TA> b_as_f{a.lora_b.data, a.lora_b.stride0, a.lora_b.stride2, a.lora_b.stride1};
  err = launch_shrink<T, TA>(a.grad_y, b_as_f, a.adapter_ids, a.ids_int64, seg, a.ranks, a.scalings, ds, M, N, R, L,
                             stream);
  if (err != cudaSuccess) return err;
  if (a.grad_x.data != nullptr) {
    // dX = dY @ W + dS @ A[i]: the fused kernel with Q[n, k] = W[n, k], E = A, no bias, no scale.
    FusedParams<T, TA> prm{};
    prm.gemm.p = a.grad_y.data;
    prm.gemm.p_stride_row = a.grad_y.stride0;
    prm.gemm.p_stride_red = a.grad_y.stride1;
    prm.gemm.q = a.weight.data;
    prm.gemm.q_stride_red = a.weight.stride0;
    prm.gemm.q_stride_col = a.weight.stride1;
    prm.gemm.bias = nullptr;
    prm.gemm.out = a.grad_x.data;
    prm.gemm.out_stride_row = a.grad_x.stride0;
    prm.gemm.out_stride_col = a.grad_x.stride1;
    prm.gemm.rows = M;
    prm.gemm.cols = K;
    prm.gemm.red = N;
    prm.gemm.p_vec = rows_vectorizable(a.grad_y.data, a.grad_y.stride0, a.grad_y.stride1);
    // Q's rows are W's columns: vectorizable only when W is stored transposed.
    prm.gemm.q_vec = rows_vectorizable(a.weight.data, a.weight.stride1, a.weight.stride0);
    prm.lo = ds;
    prm.e = a.lora_a;
    prm.ids = a.adapter_ids;
    prm.ids_int64 = a.ids_int64;
    prm.ranks = a.ranks;
    prm.scales = nullptr;
    prm.L = L;
    prm.R = R;
    prm.parts = reinterpret_cast<float*>(base + plan.parts_dx_offset);
    if ((err = launch_fused<T, TA>(prm, seg, stream)) != cudaSuccess) return err;
  }
  // dA[i] = dS[seg].T @ X[seg]: G[i, r, c = k], written as [L, R, K].
  err = launch_grad<T, TA>(ds, a.x, segments, a.ranks, nullptr, a.grad_a, R * K, K, 1,
                           reinterpret_cast<float*>(base + plan.parts_a_offset), M, K, R, L, stream);
  if (err != cudaSuccess) return err;
  // dB[i][n, r] = s_i sum_t dY[t, n] S[t, r]: G[i, r, c = n], written through dB's [L, N, R] layout.
  return launch_grad<T, TA>(a.s, a.grad_y, segments, a.ranks, a.scalings, a.grad_b, N * R, 1, R,
                            reinterpret_cast<float*>(base + plan.parts_b_offset), M, N, R, L, stream);
}

}  // inline namespace PEFTKERN_ABI_NAMESPACE
}  // namespace peftkern
