// peftkern/lora.cuh: the fused LoRA linear op in CUDA C++. Header-only, no torch.
//
//   y = x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T        x [M, K], W [N, K], A [R, K], B [N, R]
//
// Forward, two launches (launch_lora_forward runs both):
//   shrink   S = dropout(x) @ A.T / (1 - p)                 [M, R] fp32, the only saved intermediate
//   fused    y = x @ W.T + b + scaling * S @ B.T            the rank-R expand rides in the GEMM's epilogue
// Backward (launch_lora_backward runs them all; dW and db are the caller's, they are plain GEMMs):
//   dy       partials of dS = dY @ B and dB = dY.T @ S       from one read of dY
//   sum      dS = scaling * sum(partials), dB likewise       fixed order: deterministic, no atomics
//   dx       dX = dY @ W + (dS @ A) * mask / (1 - p)         the same GEMM kernel, mask regenerated
//   da       partials of dA = dS.T @ (x * mask / (1 - p)), then summed
//
// Types: T (x, W, b, y, dY, dX) is half, __nv_bfloat16 or float; TA (A, B, dA, dB) is T or float (fp32
// adapters with 16-bit activations). The GEMM: 64 x 64 tiles, 32-deep steps, 4 warps, a two-stage cp.async
// pipeline; 16-bit on tensor cores (WMMA, fp32 accumulate), fp32 on FMA. Simple and not yet tuned on a GPU.
// Every matrix argument takes two int64 strides; every offset is computed in int64.
// Dropout: a device pointer to an int64 seed (read on the device, so no host sync) and p in [0, 1); the
// mask is the Philox stream of common.cuh, the same as the Triton kernels and reference.py.
// Each launch_* returns the cudaError_t of its launches (cudaGetLastError), or cudaErrorInvalidValue /
// cudaErrorInvalidConfiguration for arguments it cannot run.
#pragma once

#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace peftkern {
inline namespace PEFTKERN_ABI_NAMESPACE {

namespace lora_detail {

using namespace detail;

constexpr int kThreads = 128;  // every kernel here: 4 warps
// The GEMM: 64 x 64 output tiles, 32-deep reduction steps; 4 warps of 32 x 32 (2 x 2 WMMA tiles).
constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBK = 32;
constexpr int kCPitch = kBN + 4;
constexpr int kRankChunk = 16;  // the rank dimension is walked in chunks of 16
constexpr int kRankPitch = kRankChunk + 1;
constexpr int kGroup = 8;  // grouped tile order: 8 row tiles share column tiles in L2

template <typename T>
__host__ __device__ constexpr bool use_tensor_cores() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 700
  return false;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  return std::is_same_v<T, half>;  // bf16 WMMA needs sm_80
#else
  return std::is_same_v<T, half> || std::is_same_v<T, __nv_bfloat16>;
#endif
}

// out[i, j] = sum_l P[i, l] Q[l, j] + bias[j] + coef * keep(i, j) * sum_r lo[i, r] hi(j, r)
// with keep(i, j) the dropout mask of a row-major [rows, cols] matrix when seed != nullptr, else 1.
// Forward: P = x, Q = W.T, lo = S, hi(j, r) = B[j, r], coef = scaling.
// dX:      P = dY, Q = W, lo = dS, hi(j, r) = A[r, j], coef = 1 / (1 - p), no bias.
template <typename T, typename TA>
struct GemmParams {
  const T* p;
  int64_t p_stride_row, p_stride_red;
  const T* q;
  int64_t q_stride_red, q_stride_col;
  const T* bias;  // [cols] or nullptr
  int64_t bias_stride;
  const float* lo;  // [rows, rank], row stride lo_ld, contiguous along rank
  int64_t lo_ld;
  const TA* hi;
  int64_t hi_stride_col, hi_stride_rank;
  T* out;
  int64_t out_stride_row, out_stride_col;
  int64_t rows, cols, red, rank;
  float coef;
  const int64_t* seed;  // nullptr: no dropout mask in the epilogue
  float dropout_p;
  bool p_vec, q_vec;  // operand rows readable 16 bytes at a time (see rows_vectorizable)
};

// Operand tiles in shared memory: rows of kBK elements padded by 16 bytes (rows stay 16-byte aligned for
// the async copies, WMMA's ldm stays a multiple of 8 for 16-bit types, and the padding spreads the banks).
template <typename T>
__host__ __device__ constexpr int operand_pitch() {
  return kBK + 16 / static_cast<int>(sizeof(T));
}
// One pipeline stage: the P tile [kBM][pitch] followed by the Q tile [kBN][pitch].
template <typename T>
__host__ __device__ constexpr int stage_elems() {
  return (kBM + kBN) * operand_pitch<T>();
}
template <typename T>
__host__ __device__ constexpr int gemm_operand_bytes() {
  constexpr int stages = 2 * stage_elems<T>() * static_cast<int>(sizeof(T));
  constexpr int c = kBM * kCPitch * static_cast<int>(sizeof(float));
  return ((stages > c ? stages : c) + 127) / 128 * 128;
}

// Start copying the tile [r0, r0 + ROWS) x [l0, l0 + kBK) of src (element (r, l) at src[r * s_row + l * s_l])
// into dst[ROWS][PITCH], zero outside [0, rows_valid) x [0, l_valid). Chunks that lie wholly inside a
// 16-byte-readable source go through copy16_async (complete after cp_async_wait); everything else is
// stored directly. row_index (optional): tile row r reads source row row_index[r0 + r] instead of r0 + r
// (multi_lora.cuh gathers the rows of one adapter's segment this way); read only for valid rows.
template <typename T, int ROWS, int PITCH>
__device__ inline void load_tile(T* dst, const T* src, int64_t r0, int64_t l0, int64_t rows_valid,
                                 int64_t l_valid, int64_t s_row, int64_t s_l, bool vec,
                                 const int64_t* row_index = nullptr) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr int kChunksPerRow = kBK / kVec;
  const T zero = from_float<T>(0.0f);
  const int tid = threadIdx.x;
  if (vec) {  // s_l == 1, rows 16-byte aligned
    for (int c = tid; c < ROWS * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow;
      const int l = (c % kChunksPerRow) * kVec;
      const int64_t gr = r0 + r;
      const int64_t gl = l0 + l;
      T* d = dst + r * PITCH + l;
      const int64_t sr = (row_index != nullptr && gr < rows_valid) ? row_index[gr] : gr;
      if (gr < rows_valid && gl + kVec <= l_valid) {
        copy16_async(d, src + sr * s_row + gl);
      } else {
#pragma unroll
        for (int v = 0; v < kVec; ++v) {
          d[v] = (gr < rows_valid && gl + v < l_valid) ? src[sr * s_row + gl + v] : zero;
        }
      }
    }
  } else if (s_row == 1 && s_l != 1) {  // contiguous along rows: neighbouring threads take neighbouring rows
    for (int e = tid; e < ROWS * kBK; e += kThreads) {
      const int r = e % ROWS;
      const int l = e / ROWS;
      const int64_t gr = r0 + r;
      const int64_t gl = l0 + l;
      const int64_t sr = (row_index != nullptr && gr < rows_valid) ? row_index[gr] : gr;
      dst[r * PITCH + l] = (gr < rows_valid && gl < l_valid) ? src[sr + gl * s_l] : zero;
    }
  } else {
    for (int e = tid; e < ROWS * kBK; e += kThreads) {
      const int r = e / kBK;
      const int l = e % kBK;
      const int64_t gr = r0 + r;
      const int64_t gl = l0 + l;
      const int64_t sr = (row_index != nullptr && gr < rows_valid) ? row_index[gr] : gr;
      dst[r * PITCH + l] = (gr < rows_valid && gl < l_valid) ? src[sr * s_row + gl * s_l] : zero;
    }
  }
}

// The inner products of one kBK step on tensor cores: 4 warps in 2 x 2, each 32 x 32 as 2 x 2 WMMA tiles.
template <typename T>
struct WmmaMath {
  static constexpr int kP = operand_pitch<T>();
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][2];
  int wm, wn;

  __device__ inline void init() {
    const int warp = threadIdx.x / 32;
    wm = warp / 2;
    wn = warp % 2;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
  }
  __device__ inline void step(const T* ps, const T* qs) {
    namespace wmma = nvcuda::wmma;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], ps + (wm * 32 + i * 16) * kP + kk, kP);
      // qs holds Q transposed ([col][red]): column-major Q, as matrix_b wants it.
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], qs + (wn * 32 + j * 16) * kP + kk, kP);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __device__ inline void store(float* cs) const {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        nvcuda::wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * kCPitch + wn * 32 + j * 16, acc[i][j], kCPitch,
                                        nvcuda::wmma::mem_row_major);
  }
};

// The same on FMA units (fp32, or 16-bit types where tensor cores are unavailable): thread (ty, tx) owns
// rows ty + 16 i (i < 4) and columns tx + 8 j (j < 8).
template <typename T>
struct FmaMath {
  static constexpr int kP = operand_pitch<T>();
  float acc[4][8];
  int ty, tx;

  __device__ inline void init() {
    ty = threadIdx.x / 8;
    tx = threadIdx.x % 8;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;
  }
  __device__ inline void step(const T* ps, const T* qs) {
#pragma unroll 4
    for (int l = 0; l < kBK; ++l) {
      float a[4];
      float b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = to_float(ps[(ty + 16 * i) * kP + l]);
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = to_float(qs[(tx + 8 * j) * kP + l]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }
  __device__ inline void store(float* cs) const {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) cs[(ty + 16 * i) * kCPitch + tx + 8 * j] = acc[i][j];
  }
};

// The reduction loop of a kBM x kBN tile product in T, two stages deep: the copies of step s + 1 are in flight
// while step s computes. load_stage(ps, qs, step) starts filling the stage tiles ps [kBM][pitch] (rows x
// reduction) and qs [kBN][pitch] (columns x reduction); on_stage(ps, qs) sees each stage once it has landed,
// before the product. Leaves the fp32 tile in smem as [kBM][kCPitch] (aliasing the stages), then a barrier.
// gemm_mainloop below and bottleneck.cuh's row GEMMs run on it.
template <typename T, typename LoadStage, typename OnStage>
__device__ inline void pipelined_tile_product(int64_t steps, unsigned char* smem, LoadStage&& load_stage,
                                              OnStage&& on_stage) {
  constexpr int kP = operand_pitch<T>();
  using Math = std::conditional_t<use_tensor_cores<T>(), WmmaMath<T>, FmaMath<T>>;
  T* stages = reinterpret_cast<T*>(smem);
  auto issue = [&](int64_t step) {
    T* ps = stages + (step % 2) * stage_elems<T>();
    load_stage(ps, ps + kBM * kP, step);
    cp_async_commit();
  };
  Math math;
  math.init();
  if (steps > 0) issue(0);
  for (int64_t step = 0; step < steps; ++step) {
    // The stage written here was last read in step - 1, which ended at a barrier.
    if (step + 1 < steps) {
      issue(step + 1);
      cp_async_wait<1>();  // this thread's copies of `step` have landed
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();  // ... and every other thread's
    const T* ps = stages + (step % 2) * stage_elems<T>();
    on_stage(ps, ps + kBM * kP);
    math.step(ps, ps + kBM * kP);
    __syncthreads();
  }
  math.store(reinterpret_cast<float*>(smem));
  __syncthreads();
}

// The K loop of the GEMM of GemmParams. Optional (multi_lora.cuh): P's tile rows [m0, row_end) gathered
// through row_index (see load_tile); row_end < 0 means prm.rows.
template <typename T, typename TA>
__device__ inline void gemm_mainloop(const GemmParams<T, TA>& prm, int64_t m0, int64_t n0, unsigned char* smem,
                                     const int64_t* row_index = nullptr, int64_t row_end = -1) {
  const int64_t p_rows = row_end < 0 ? prm.rows : row_end;
  constexpr int kP = operand_pitch<T>();
  pipelined_tile_product<T>(
      ceil_div(prm.red, kBK), smem,
      [&](T* ps, T* qs, int64_t step) {
        const int64_t l0 = step * kBK;
        load_tile<T, kBM, kP>(ps, prm.p, m0, l0, p_rows, prm.red, prm.p_stride_row, prm.p_stride_red, prm.p_vec,
                              row_index);
        load_tile<T, kBN, kP>(qs, prm.q, n0, l0, prm.cols, prm.red, prm.q_stride_col, prm.q_stride_red,
                              prm.q_vec);
      },
      [](const T*, const T*) {});
}

template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads) lora_gemm_kernel(const GemmParams<T, TA> prm) {
  __shared__ __align__(128) unsigned char smem[gemm_operand_bytes<T>()];
  __shared__ float lo_s[kBM][kRankPitch];
  __shared__ float hi_s[kBN][kRankPitch];

  // Grouped order: consecutive blocks walk kGroup row tiles before moving to the next column tile.
  const int64_t tiles_m = ceil_div(prm.rows, kBM);
  const int64_t tiles_n = ceil_div(prm.cols, kBN);
  const int64_t pid = blockIdx.x;
  const int64_t per_group = kGroup * tiles_n;
  const int64_t first_tile_m = (pid / per_group) * kGroup;
  const int64_t group_rows = min(tiles_m - first_tile_m, static_cast<int64_t>(kGroup));
  const int64_t tile_m = first_tile_m + (pid % per_group) % group_rows;
  const int64_t tile_n = (pid % per_group) / group_rows;
  const int64_t m0 = tile_m * kBM;
  const int64_t n0 = tile_n * kBN;

  gemm_mainloop<T, TA>(prm, m0, n0, smem);
  const float* cs = reinterpret_cast<const float*>(smem);

  // Epilogue: thread owns column j = tid % 64 of rows tid / 64 + 2 t (t < 32).
  const int tid = threadIdx.x;
  const int j = tid % kBN;
  const int i_first = tid / kBN;
  constexpr int kRowsPerThread = kBM * kBN / kThreads;
  constexpr int kRowStep = kThreads / kBN;
  float lora[kRowsPerThread];
#pragma unroll
  for (int t = 0; t < kRowsPerThread; ++t) lora[t] = 0.0f;
  for (int64_t r0 = 0; r0 < prm.rank; r0 += kRankChunk) {
    __syncthreads();  // the previous chunk has been used
    for (int e = tid; e < kBM * kRankChunk; e += kThreads) {
      const int i = e / kRankChunk;
      const int r = e % kRankChunk;
      const int64_t gi = m0 + i;
      const int64_t gr = r0 + r;
      lo_s[i][r] = (gi < prm.rows && gr < prm.rank) ? prm.lo[gi * prm.lo_ld + gr] : 0.0f;
    }
    for (int e = tid; e < kBN * kRankChunk; e += kThreads) {
      const int jj = e / kRankChunk;
      const int r = e % kRankChunk;
      const int64_t gj = n0 + jj;
      const int64_t gr = r0 + r;
      hi_s[jj][r] = (gj < prm.cols && gr < prm.rank)
                        ? to_float(prm.hi[gj * prm.hi_stride_col + gr * prm.hi_stride_rank])
                        : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kRowsPerThread; ++t) {
      const int i = i_first + kRowStep * t;
#pragma unroll
      for (int r = 0; r < kRankChunk; ++r) lora[t] = fmaf(lo_s[i][r], hi_s[j][r], lora[t]);
    }
  }

  const int64_t gj = n0 + j;
  if (gj >= prm.cols) return;
  const bool has_dropout = prm.seed != nullptr;
  const int64_t seed = has_dropout ? *prm.seed : 0;
  const float bias = prm.bias != nullptr ? to_float(prm.bias[gj * prm.bias_stride]) : 0.0f;
#pragma unroll
  for (int t = 0; t < kRowsPerThread; ++t) {
    const int i = i_first + kRowStep * t;
    const int64_t gi = m0 + i;
    if (gi < prm.rows) {
      float update = lora[t];
      // Multiply (not select) so that a NaN stays NaN where dropped, as in torch's dropout.
      if (has_dropout && !dropout_keep(seed, gi, gj, prm.cols, prm.dropout_p)) update *= 0.0f;
      float v = cs[i * kCPitch + j] + prm.coef * update;
      if (prm.bias != nullptr) v += bias;
      prm.out[gi * prm.out_stride_row + gj * prm.out_stride_col] = from_float<T>(v);
    }
  }
}

// Stage x[m0 : m0+BM, k0 : k0+BK] times its dropout keep-mask into shared memory as fp32; rows at or past
// row_end and columns past K read as 0. The shrink (forward) and dA (backward) kernels both call it, so they
// drop exactly the same elements. Multiplying by 0 (not assigning it) keeps NaN as NaN, as torch does.
template <int BM, int BK, typename T>
__device__ inline void stage_dropped_x(float (*xs)[BK + 1], const Strided2D<const T>& x, int64_t m0,
                                       int64_t row_end, int64_t k0, int64_t K, bool has_dropout, int64_t seed,
                                       float dropout_p) {
  for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
    const int i = e / BK;
    const int l = e % BK;
    const int64_t gi = m0 + i;
    const int64_t gl = k0 + l;
    float v = 0.0f;
    if (gi < row_end && gl < K) {
      v = to_float(x.at(gi, gl));
      if (has_dropout && !dropout_keep(seed, gi, gl, K, dropout_p)) v *= 0.0f;
    }
    xs[i][l] = v;
  }
}

// S[M, R] (fp32, row stride R) = (x * keep) @ A.T * scale. Block: 64 rows x 16 ranks; thread owns rank
// tid % 16 of rows 8 * (tid / 16) + i.
template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads)
    lora_shrink_kernel(const Strided2D<const T> x, const Strided2D<const TA> a, float* s, int64_t M, int64_t K,
                       int64_t R, float scale, const int64_t* seed_ptr, float dropout_p) {
  constexpr int BM = 64;
  constexpr int BK = 32;
  constexpr int kRowsPerThread = BM * kRankChunk / kThreads;
  __shared__ float xs[BM][BK + 1];
  __shared__ float as[kRankChunk][BK + 1];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRankChunk;
  const int rank = tid % kRankChunk;
  const int row_first = (tid / kRankChunk) * kRowsPerThread;
  const bool has_dropout = seed_ptr != nullptr;
  const int64_t seed = has_dropout ? *seed_ptr : 0;
  float acc[kRowsPerThread];
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) acc[i] = 0.0f;
  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    __syncthreads();
    stage_dropped_x<BM, BK>(xs, x, m0, M, k0, K, has_dropout, seed, dropout_p);
    for (int e = tid; e < kRankChunk * BK; e += kThreads) {
      const int r = e / BK;
      const int l = e % BK;
      const int64_t gr = r0 + r;
      const int64_t gl = k0 + l;
      as[r][l] = (gr < R && gl < K) ? to_float(a.at(gr, gl)) : 0.0f;
    }
    __syncthreads();
#pragma unroll 8
    for (int l = 0; l < BK; ++l) {
      const float av = as[rank][l];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) acc[i] = fmaf(xs[row_first + i][l], av, acc[i]);
    }
  }
  const int64_t gr = r0 + rank;
  if (gr >= R) return;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t gi = m0 + row_first + i;
    if (gi < M) s[gi * R + gr] = acc[i] * scale;
  }
}

// Both rank-R products of dY from one read of it. Block (chunk, split) owns rows
// [chunk * rows_per_chunk, ...) and columns [split * cols_per_split, ...) and adds into
//   ds_part[split, rows, :] += dY[rows, cols] @ B[cols, :]
//   db_part[chunk, cols, :] += dY[rows, cols].T @ S[rows, :]
// slices that no other block touches, each element always by the same thread: no atomics, no races.
// Both partial buffers start zeroed.
template <typename T, typename TA>
__global__ void __launch_bounds__(kThreads)
    lora_bwd_dy_kernel(const Strided2D<const T> dy, const Strided2D<const TA> b, const float* s, float* ds_part,
                       float* db_part, int64_t M, int64_t N, int64_t R, int64_t rows_per_chunk,
                       int64_t cols_per_split) {
  constexpr int BM = 32;
  constexpr int BN = 32;
  constexpr int kPerThread = BM * kRankChunk / kThreads;  // == BN * kRankChunk / kThreads
  __shared__ float dys[BM][BN + 1];
  __shared__ float bs[BN][kRankPitch];
  __shared__ float ss[BM][kRankPitch];
  // dS of the current row tile, summed over the split's columns here rather than in ds_part (ranks up to
  // kLocalRanks; larger ranks add into ds_part directly). Each element has one owner thread throughout.
  constexpr int kLocalRanks = 64;
  __shared__ float ds_local[BM][kLocalRanks];
  const bool local = R <= kLocalRanks;
  const int tid = threadIdx.x;
  const int64_t chunk = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t row_start = chunk * rows_per_chunk;
  const int64_t row_end = min(row_start + rows_per_chunk, M);
  const int64_t col_start = split * cols_per_split;
  const int64_t col_end = min(col_start + cols_per_split, N);
  float* ds_slice = ds_part + split * M * R;
  float* db_slice = db_part + chunk * N * R;
  for (int64_t m0 = row_start; m0 < row_end; m0 += BM) {
    for (int64_t n0 = col_start; n0 < col_end; n0 += BN) {
      __syncthreads();
      for (int e = tid; e < BM * BN; e += kThreads) {
        const int i = e / BN;
        const int j = e % BN;
        const int64_t gi = m0 + i;
        const int64_t gj = n0 + j;
        dys[i][j] = (gi < row_end && gj < col_end) ? to_float(dy.at(gi, gj)) : 0.0f;
      }
      for (int64_t r0 = 0; r0 < R; r0 += kRankChunk) {
        __syncthreads();  // dys is written, and the previous rank chunk is used
        for (int e = tid; e < BN * kRankChunk; e += kThreads) {
          const int j = e / kRankChunk;
          const int r = e % kRankChunk;
          const int64_t gj = n0 + j;
          const int64_t gr = r0 + r;
          bs[j][r] = (gj < col_end && gr < R) ? to_float(b.at(gj, gr)) : 0.0f;
        }
        for (int e = tid; e < BM * kRankChunk; e += kThreads) {
          const int i = e / kRankChunk;
          const int r = e % kRankChunk;
          const int64_t gi = m0 + i;
          const int64_t gr = r0 + r;
          ss[i][r] = (gi < row_end && gr < R) ? s[gi * R + gr] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int t = 0; t < kPerThread; ++t) {
          const int e = tid + kThreads * t;
          const int r = e % kRankChunk;
          const int64_t gr = r0 + r;
          // dS rows
          const int i = e / kRankChunk;
          float ds = 0.0f;
#pragma unroll 8
          for (int j = 0; j < BN; ++j) ds = fmaf(dys[i][j], bs[j][r], ds);
          const int64_t gi = m0 + i;
          if (gi < row_end && gr < R) {
            if (local) {
              ds_local[i][gr] = n0 == col_start ? ds : ds_local[i][gr] + ds;
            } else {
              ds_slice[gi * R + gr] += ds;
            }
          }
          // dB rows
          const int j = e / kRankChunk;
          float db = 0.0f;
#pragma unroll 8
          for (int ii = 0; ii < BM; ++ii) db = fmaf(dys[ii][j], ss[ii][r], db);
          const int64_t gj = n0 + j;
          if (gj < col_end && gr < R) db_slice[gj * R + gr] += db;
        }
      }
    }
    if (local && col_start < col_end) {  // each owner writes its finished dS elements (same mapping as above)
      for (int64_t r0 = 0; r0 < R; r0 += kRankChunk) {
#pragma unroll
        for (int t = 0; t < kPerThread; ++t) {
          const int e = tid + kThreads * t;
          const int i = e / kRankChunk;
          const int64_t gr = r0 + e % kRankChunk;
          const int64_t gi = m0 + i;
          if (gi < row_end && gr < R) ds_slice[gi * R + gr] = ds_local[i][gr];
        }
      }
    }
  }
}

// da_part[chunk, r, k] = sum over the chunk's rows m of dS[m, r] * x[m, k] * keep(m, k) * scale.
// Block: 64 columns x 16 ranks (grid.z walks the rank chunks); thread owns column tid % 64 of ranks
// 8 * (tid / 64) + q.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    lora_bwd_da_kernel(const Strided2D<const T> x, const float* ds, float* da_part, int64_t M, int64_t K,
                       int64_t R, int64_t rows_per_chunk, float scale, const int64_t* seed_ptr, float dropout_p) {
  constexpr int BM = 32;
  constexpr int BK = 64;
  constexpr int kRanksPerThread = kRankChunk * BK / kThreads;
  __shared__ float xs[BM][BK + 1];
  __shared__ float dss[BM][kRankPitch];
  const int tid = threadIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * BK;
  const int64_t chunk = blockIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.z) * kRankChunk;
  const int64_t row_start = chunk * rows_per_chunk;
  const int64_t row_end = min(row_start + rows_per_chunk, M);
  const int col = tid % BK;
  const int rank_first = (tid / BK) * kRanksPerThread;
  const bool has_dropout = seed_ptr != nullptr;
  const int64_t seed = has_dropout ? *seed_ptr : 0;
  float acc[kRanksPerThread];
#pragma unroll
  for (int q = 0; q < kRanksPerThread; ++q) acc[q] = 0.0f;
  for (int64_t m0 = row_start; m0 < row_end; m0 += BM) {
    __syncthreads();
    stage_dropped_x<BM, BK>(xs, x, m0, row_end, k0, K, has_dropout, seed, dropout_p);
    for (int e = tid; e < BM * kRankChunk; e += kThreads) {
      const int i = e / kRankChunk;
      const int r = e % kRankChunk;
      const int64_t gi = m0 + i;
      const int64_t gr = r0 + r;
      dss[i][r] = (gi < row_end && gr < R) ? ds[gi * R + gr] : 0.0f;
    }
    __syncthreads();
#pragma unroll 4
    for (int i = 0; i < BM; ++i) {
      const float xv = xs[i][col];
#pragma unroll
      for (int q = 0; q < kRanksPerThread; ++q) acc[q] = fmaf(dss[i][rank_first + q], xv, acc[q]);
    }
  }
  const int64_t gl = k0 + col;
  if (gl >= K) return;
  float* slice = da_part + chunk * R * K;
#pragma unroll
  for (int q = 0; q < kRanksPerThread; ++q) {
    const int64_t gr = r0 + rank_first + q;
    if (gr < R) slice[gr * K + gl] = acc[q] * scale;
  }
}

// out[i] = scale * sum_p parts[p, i] for i < count, summed in the order p = 0, 1, ...: deterministic.
template <typename TO>
__global__ void __launch_bounds__(256)
    sum_partials_kernel(const float* parts, int64_t n_parts, int64_t count, float scale, TO* out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < count; idx += step) {
    float acc = 0.0f;
    for (int64_t p = 0; p < n_parts; ++p) acc += parts[p * count + idx];
    out[idx] = from_float<TO>(acc * scale);
  }
}

template <typename T, typename TA>
inline cudaError_t launch_gemm(const GemmParams<T, TA>& prm, cudaStream_t stream) {
  if (prm.rows == 0 || prm.cols == 0) return cudaSuccess;
  const int64_t tiles = ceil_div(prm.rows, kBM) * ceil_div(prm.cols, kBN);
  if (tiles > kMaxGridX) return cudaErrorInvalidConfiguration;
  lora_gemm_kernel<T, TA><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(prm);
  return cudaPeekAtLastError();
}

inline bool valid_sizes(int64_t M, int64_t N, int64_t K, int64_t R, float dropout_p) {
  return M >= 0 && N >= 0 && K >= 0 && R >= 1 && dropout_p >= 0.0f && dropout_p < 1.0f;
}

}  // namespace lora_detail

// ---- public launchers -----------------------------------------------------------------------------------

// S[M, R] (fp32, contiguous) = dropout(x) @ A.T / (1 - p). x: [M, K], lora_a: [R, K].
// seed: device pointer to one int64; nullptr or dropout_p == 0 means no dropout.
// Preconditions:
//   aliasing    s must not overlap x, lora_a or the seed
//   alignment   none required; 16-byte (cp.async) paths where pointers and strides allow (run time)
//   archs       sm_70+ (WMMA for half; bf16 tensor cores and cp.async from sm_80; fp32: FMA units)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        seed (if dropout) a device pointer read on the device; dropout_p in [0, 1)
template <typename T, typename TA>
cudaError_t launch_lora_shrink(Strided2D<const T> x, Strided2D<const TA> lora_a, float* s, int64_t M, int64_t K,
                               int64_t R, float dropout_p, const int64_t* seed, cudaStream_t stream) {
  if (!lora_detail::valid_sizes(M, 0, K, R, dropout_p)) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  const bool has_dropout = seed != nullptr && dropout_p > 0.0f;
  const float scale = has_dropout ? static_cast<float>(1.0 / (1.0 - static_cast<double>(dropout_p))) : 1.0f;
  const int64_t blocks_m = detail::ceil_div(M, 64);
  const int64_t blocks_r = detail::ceil_div(R, lora_detail::kRankChunk);
  if (blocks_m > detail::kMaxGridX || blocks_r > detail::kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks_m), static_cast<unsigned>(blocks_r));
  lora_detail::lora_shrink_kernel<T, TA><<<grid, lora_detail::kThreads, 0, stream>>>(
      x, lora_a, s, M, K, R, scale, has_dropout ? seed : nullptr, dropout_p);
  return cudaPeekAtLastError();
}

// y[M, N] = x @ W.T + bias + scaling * S @ B.T: the base GEMM with the rank-R expand in its epilogue.
// x: [M, K]; weight: [N, K]; bias: [N] (stride bias_stride) or nullptr; s: [M, R] fp32 contiguous;
// lora_b: [N, R]; y: [M, N].
// Preconditions:
//   aliasing    y must not overlap x, weight, bias, s or lora_b
//   alignment   none required; 16-byte (cp.async) paths where pointers and strides allow (run time)
//   archs       sm_70+ (WMMA for half; bf16 tensor cores and cp.async from sm_80; fp32: FMA units)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
template <typename T, typename TA>
cudaError_t launch_lora_fused_gemm(Strided2D<const T> x, Strided2D<const T> weight, const T* bias,
                                   int64_t bias_stride, const float* s, Strided2D<const TA> lora_b, Strided2D<T> y,
                                   int64_t M, int64_t N, int64_t K, int64_t R, float scaling,
                                   cudaStream_t stream) {
  if (!lora_detail::valid_sizes(M, N, K, R, 0.0f)) return cudaErrorInvalidValue;
  lora_detail::GemmParams<T, TA> prm{};
  prm.p = x.data;
  prm.p_stride_row = x.stride0;
  prm.p_stride_red = x.stride1;
  prm.q = weight.data;  // Q[k, n] = W[n, k]
  prm.q_stride_red = weight.stride1;
  prm.q_stride_col = weight.stride0;
  prm.bias = bias;
  prm.bias_stride = bias_stride;
  prm.lo = s;
  prm.lo_ld = R;
  prm.hi = lora_b.data;  // hi(n, r) = B[n, r]
  prm.hi_stride_col = lora_b.stride0;
  prm.hi_stride_rank = lora_b.stride1;
  prm.out = y.data;
  prm.out_stride_row = y.stride0;
  prm.out_stride_col = y.stride1;
  prm.rows = M;
  prm.cols = N;
  prm.red = K;
  prm.rank = R;
  prm.coef = scaling;
  prm.seed = nullptr;
  prm.dropout_p = 0.0f;
  prm.p_vec = detail::rows_vectorizable(x.data, x.stride0, x.stride1);
  prm.q_vec = detail::rows_vectorizable(weight.data, weight.stride0, weight.stride1);
  return lora_detail::launch_gemm(prm, stream);
}

template <typename T, typename TA>
struct LoraForwardArgs {
  Strided2D<const T> x;       // [M, K]
  Strided2D<const T> weight;  // [N, K]
  const T* bias;              // [N] or nullptr
  int64_t bias_stride;
  Strided2D<const TA> lora_a;  // [R, K]
  Strided2D<const TA> lora_b;  // [N, R]
  float* s;                    // out: [M, R] fp32 contiguous, saved for the backward
  Strided2D<T> y;              // out: [M, N]
  int64_t M, N, K, R;
  float scaling;
  float dropout_p;
  const int64_t* seed;  // device pointer to one int64; nullptr: no dropout
};

// The whole forward: shrink, then the fused GEMM, on `stream`.
// Preconditions:
//   aliasing    y and s must not overlap each other or any input
//   alignment   none required; 16-byte (cp.async) paths where pointers and strides allow (run time)
//   archs       sm_70+ (WMMA for half; bf16 tensor cores and cp.async from sm_80; fp32: FMA units)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        seed a device pointer (dropout); the same seed, p and shapes in launch_lora_backward regenerate the
//               mask
template <typename T, typename TA>
cudaError_t launch_lora_forward(const LoraForwardArgs<T, TA>& args, cudaStream_t stream) {
  if (!lora_detail::valid_sizes(args.M, args.N, args.K, args.R, args.dropout_p)) return cudaErrorInvalidValue;
  if (args.M == 0) return cudaSuccess;
  cudaError_t err = launch_lora_shrink<T, TA>(args.x, args.lora_a, args.s, args.M, args.K, args.R, args.dropout_p,
                                              args.seed, stream);
  if (err != cudaSuccess) return err;
  return launch_lora_fused_gemm<T, TA>(args.x, args.weight, args.bias, args.bias_stride, args.s, args.lora_b,
                                       args.y, args.M, args.N, args.K, args.R, args.scaling, stream);
}

// dX[M, K] = dY @ W + (dS @ A) * mask / (1 - p). ds: [M, R] fp32 contiguous (already scaled).
// Preconditions:
//   aliasing    dx must not overlap grad_y, weight, ds or lora_a
//   alignment   none required; 16-byte (cp.async) paths where pointers and strides allow (run time)
//   archs       sm_70+ (WMMA for half; bf16 tensor cores and cp.async from sm_80; fp32: FMA units)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
template <typename T, typename TA>
cudaError_t launch_lora_bwd_dx(Strided2D<const T> grad_y, Strided2D<const T> weight, const float* ds,
                               Strided2D<const TA> lora_a, Strided2D<T> grad_x, int64_t M, int64_t N, int64_t K,
                               int64_t R, float dropout_p, const int64_t* seed, cudaStream_t stream) {
  if (!lora_detail::valid_sizes(M, N, K, R, dropout_p)) return cudaErrorInvalidValue;
  const bool has_dropout = seed != nullptr && dropout_p > 0.0f;
  lora_detail::GemmParams<T, TA> prm{};
  prm.p = grad_y.data;
  prm.p_stride_row = grad_y.stride0;
  prm.p_stride_red = grad_y.stride1;
  prm.q = weight.data;  // Q[n, k] = W[n, k]
  prm.q_stride_red = weight.stride0;
  prm.q_stride_col = weight.stride1;
  prm.bias = nullptr;
  prm.bias_stride = 0;
  prm.lo = ds;
  prm.lo_ld = R;
  prm.hi = lora_a.data;  // hi(k, r) = A[r, k]
  prm.hi_stride_col = lora_a.stride1;
  prm.hi_stride_rank = lora_a.stride0;
  prm.out = grad_x.data;
  prm.out_stride_row = grad_x.stride0;
  prm.out_stride_col = grad_x.stride1;
  prm.rows = M;
  prm.cols = K;
  prm.red = N;
  prm.rank = R;
  prm.coef = has_dropout ? static_cast<float>(1.0 / (1.0 - static_cast<double>(dropout_p))) : 1.0f;
  prm.seed = has_dropout ? seed : nullptr;
  prm.dropout_p = dropout_p;
  prm.p_vec = detail::rows_vectorizable(grad_y.data, grad_y.stride0, grad_y.stride1);
  // Q's rows are W's columns: vectorizable only when W is stored transposed (stride along n is 1).
  prm.q_vec = detail::rows_vectorizable(weight.data, weight.stride1, weight.stride0);
  return lora_detail::launch_gemm(prm, stream);
}

// How the backward splits its reductions, and the fp32 workspace it needs (lora_backward_plan()).
struct LoraBackwardPlan {
  int64_t dy_chunks, dy_rows_per_chunk;   // row chunks of dY (partials of dB)
  int64_t dy_splits, dy_cols_per_split;   // column splits of dY (partials of dS)
  int64_t da_chunks, da_rows_per_chunk;   // row chunks for dA
  int64_t ds_part_offset, db_part_offset, ds_offset, da_part_offset;  // in floats, into the workspace
  int64_t workspace_floats;
};

// Preconditions:
//   aliasing    none (host arithmetic only)
//   alignment   n/a
//   archs       n/a (host)
//   threads     pure function
//   CUDA graphs host-only, safe anywhere
inline LoraBackwardPlan lora_backward_plan(int64_t M, int64_t N, int64_t K, int64_t R) {
  LoraBackwardPlan plan{};
  const int64_t rows = M > 0 ? M : 1;
  const int64_t cols = N > 0 ? N : 1;
  // Few enough partials to keep the workspace and the reduction small, enough blocks to spread the work.
  detail::split_into_parts(rows, 32, 16, &plan.dy_chunks, &plan.dy_rows_per_chunk);
  detail::split_into_parts(cols, 32, 8, &plan.dy_splits, &plan.dy_cols_per_split);
  const int64_t k_tiles = K > 0 ? detail::ceil_div(K, 64) : 1;
  const int64_t max_da_chunks = k_tiles < 512 ? 512 / k_tiles : 1;
  detail::split_into_parts(rows, 32, max_da_chunks, &plan.da_chunks, &plan.da_rows_per_chunk);
  plan.ds_part_offset = 0;
  plan.db_part_offset = plan.ds_part_offset + plan.dy_splits * M * R;
  plan.ds_offset = plan.db_part_offset + plan.dy_chunks * N * R;
  plan.da_part_offset = plan.ds_offset + M * R;
  plan.workspace_floats = plan.da_part_offset + plan.da_chunks * R * K;
  return plan;
}

// scale * sum over p of parts[p, :count] into out[:count] (TO = float, half, bf16), in a fixed order.
// Preconditions:
//   aliasing    out must not overlap parts
//   alignment   none required
//   archs       any the toolkit targets (16-byte paths are plain vector loads)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
template <typename TO>
cudaError_t launch_sum_partials(const float* parts, int64_t n_parts, int64_t count, float scale, TO* out,
                                cudaStream_t stream) {
  if (count < 0 || n_parts < 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  const int64_t blocks = detail::ceil_div(count, 256) < 4096 ? detail::ceil_div(count, 256) : 4096;
  lora_detail::sum_partials_kernel<TO><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(parts, n_parts, count,
                                                                                        scale, out);
  return cudaPeekAtLastError();
}

template <typename T, typename TA>
struct LoraBackwardArgs {
  Strided2D<const T> grad_y;   // [M, N]
  Strided2D<const T> x;        // [M, K]
  Strided2D<const T> weight;   // [N, K]
  Strided2D<const TA> lora_a;  // [R, K]
  Strided2D<const TA> lora_b;  // [N, R]
  const float* s;              // [M, R] fp32 contiguous, from the forward
  Strided2D<T> grad_x;         // out: [M, K]; grad_x.data == nullptr skips dX
  TA* grad_a;                  // out: [R, K] contiguous
  TA* grad_b;                  // out: [N, R] contiguous
  int64_t M, N, K, R;
  float scaling;
  float dropout_p;
  const int64_t* seed;  // the forward's seed (device pointer); nullptr: no dropout
};

// The whole LoRA backward (dX, dA, dB) on `stream`. workspace: lora_backward_plan(M, N, K, R).workspace_floats
// fp32 values of device memory, any contents.
// Preconditions:
//   aliasing    dx, grad_a, grad_b and the workspace must not overlap each other or any input
//   alignment   none required; 16-byte (cp.async) paths where pointers and strides allow (run time); workspace fp32,
//               any contents, lora_backward_plan(M, N, K, R).workspace_floats long
//   archs       sm_70+ (WMMA for half; bf16 tensor cores and cp.async from sm_80; fp32: FMA units)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        one workspace per stream in flight (two concurrent backward passes need two)
template <typename T, typename TA>
cudaError_t launch_lora_backward(const LoraBackwardArgs<T, TA>& args, float* workspace, cudaStream_t stream) {
  const int64_t M = args.M, N = args.N, K = args.K, R = args.R;
  if (!lora_detail::valid_sizes(M, N, K, R, args.dropout_p)) return cudaErrorInvalidValue;
  cudaError_t err;
  if (M == 0) {  // no rows: the adapter gradients are zero (all-zero bits in every dtype)
    if ((err = cudaMemsetAsync(args.grad_a, 0, sizeof(TA) * R * K, stream)) != cudaSuccess) return err;
    return cudaMemsetAsync(args.grad_b, 0, sizeof(TA) * N * R, stream);
  }
  const bool has_dropout = args.seed != nullptr && args.dropout_p > 0.0f;
  const int64_t* seed = has_dropout ? args.seed : nullptr;
  const LoraBackwardPlan plan = lora_backward_plan(M, N, K, R);
  float* ds_part = workspace + plan.ds_part_offset;
  float* db_part = workspace + plan.db_part_offset;
  float* ds = workspace + plan.ds_offset;
  float* da_part = workspace + plan.da_part_offset;

  // dS and dB partials from one read of dY; the dy kernel adds into zeroed partials.
  err = cudaMemsetAsync(ds_part, 0, sizeof(float) * (plan.ds_offset - plan.ds_part_offset), stream);
  if (err != cudaSuccess) return err;
  const dim3 dy_grid(static_cast<unsigned>(plan.dy_chunks), static_cast<unsigned>(plan.dy_splits));
  lora_detail::lora_bwd_dy_kernel<T, TA><<<dy_grid, lora_detail::kThreads, 0, stream>>>(
      args.grad_y, args.lora_b, args.s, ds_part, db_part, M, N, R, plan.dy_rows_per_chunk, plan.dy_cols_per_split);
  if ((err = cudaPeekAtLastError()) != cudaSuccess) return err;
  if ((err = launch_sum_partials<float>(ds_part, plan.dy_splits, M * R, args.scaling, ds, stream)) != cudaSuccess)
    return err;
  if ((err = launch_sum_partials<TA>(db_part, plan.dy_chunks, N * R, args.scaling, args.grad_b, stream)) !=
      cudaSuccess)
    return err;

  if (args.grad_x.data != nullptr) {
    err = launch_lora_bwd_dx<T, TA>(args.grad_y, args.weight, ds, args.lora_a, args.grad_x, M, N, K, R,
                                    args.dropout_p, seed, stream);
    if (err != cudaSuccess) return err;
  }

  if (K > 0) {
    const int64_t k_tiles = detail::ceil_div(K, 64);
    const int64_t r_tiles = detail::ceil_div(R, lora_detail::kRankChunk);
    if (k_tiles > detail::kMaxGridX || plan.da_chunks > detail::kMaxGridYZ || r_tiles > detail::kMaxGridYZ)
      return cudaErrorInvalidConfiguration;
    const float scale =
        has_dropout ? static_cast<float>(1.0 / (1.0 - static_cast<double>(args.dropout_p))) : 1.0f;
    const dim3 da_grid(static_cast<unsigned>(k_tiles), static_cast<unsigned>(plan.da_chunks),
                       static_cast<unsigned>(r_tiles));
    lora_detail::lora_bwd_da_kernel<T><<<da_grid, lora_detail::kThreads, 0, stream>>>(
        args.x, ds, da_part, M, K, R, plan.da_rows_per_chunk, scale, seed, args.dropout_p);
    if ((err = cudaPeekAtLastError()) != cudaSuccess) return err;
  }
  return launch_sum_partials<TA>(da_part, plan.da_chunks, R * K, 1.0f, args.grad_a, stream);
}

}  // inline namespace PEFTKERN_ABI_NAMESPACE
}  // namespace peftkern
