// peftkern/bottleneck.cuh: the fused bottleneck adapter in CUDA C++. Header-only, no torch.
//
//   y = residual + scaling * (act(x @ Wd[id].T + bd[id]) @ Wu[id].T + bu[id])      residual defaults to x
//
// x [M, D]; Wd [L, Bn, D]; bd [L, Bn]; Wu [L, D, Bn]; bu [L, D]; one adapter id per row (int32 or int64, or
// none: every row uses adapter 0). A row whose id lies outside [0, L) gets no adapter: y = residual.
//
// Forward, two launches (launch_bottleneck_forward runs both):
//   down   H = x @ Wd.T + bd                 [M, Bn] fp32, the only saved intermediate
//          A = act(H)                        [M, Bn] in TW, a forward-only temporary (the up GEMM's operand)
//   up     y = residual + scaling * (A @ Wu.T + bu)            bias, scaling and residual in the epilogue
// Backward (launch_bottleneck_backward runs them all):
//   dh     dH = (scaling * dY @ Wu) * act'(H)                  act' recomputed from H; [M, Bn] in TW
//   dx     dX = dH @ Wd (+ dY when the residual is x)
//   dw     partials of dWu[l] = scaling * dY[rows of l].T @ act(H[rows of l]) and dbu[l] = scaling * sum dY,
//          dWd[l] = dH[rows of l].T @ x[rows of l] and dbd[l] = sum dH, per fixed row chunk, then summed in
//          a fixed order: deterministic, no atomics
// The same decomposition as triton_kernels/bottleneck.py. Row GEMMs (down, up, dh, dx) run one pass per
// adapter present in a 64-row tile and keep each row's own adapter's result (a tile of one adapter, so
// every single-adapter batch, costs one GEMM); a row never mixes another adapter's product, not even as
// 0 * inf. Weight gradients walk each adapter's rows through `order`/`segments` (rows sorted by adapter,
// e.g. peftkern.triton_kernels.bottleneck.adapter_segments, built on the device).
//
// Types: T (x, residual, y, dY, dX) is half, __nv_bfloat16 or float; TW (weights, biases, their gradients,
// A and dH) is T or float. Every product runs in TW: 16-bit on tensor cores (WMMA, fp32 accumulate), fp32
// on FMA units (16-bit x converted as it is staged). 64 x 64 tiles, 32-deep steps, 4 warps, two stages.
// Ids are only ever compared with 0..L-1 and indices are clamped: no id or order entry, whatever it holds,
// can address memory out of bounds. Offsets in int64. Each launch_* returns cudaPeekAtLastError() of its
// launches, or cudaErrorInvalidValue / cudaErrorInvalidConfiguration for arguments it cannot run.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "lora.cuh"

namespace peftkern {
inline namespace PEFTKERN_ABI_NAMESPACE {

// Activation codes (the same as triton_kernels/bottleneck.py's ACTIVATION_CODES; "swish" is kSilu).
enum BottleneckActivation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kTanh = 4 };

// act(h), the formulas of reference.apply_activation (gelu: erf form; gelu_tanh: torch's tanh form).
__host__ __device__ inline float bottleneck_activate(float h, int activation) {
  switch (activation) {
    case kRelu:
      return h < 0.0f ? 0.0f : h;  // NaN stays NaN, as torch.relu
    case kGelu:
      return 0.5f * h * (1.0f + erff(h * 0.7071067811865476f));
    case kGeluTanh:
      return 0.5f * h * (1.0f + tanhf(0.7978845608028654f * (h + 0.044715f * h * h * h)));
    case kSilu:
      return h * (1.0f / (1.0f + expf(-h)));
    default:
      return tanhf(h);
  }
}

// d act(h) / dh, the formulas of peftkern/ops/bottleneck.py::_activation_grad (relu'(0) = 0, as torch).
__host__ __device__ inline float bottleneck_activate_grad(float h, int activation) {
  switch (activation) {
    case kRelu:
      return h > 0.0f ? 1.0f : 0.0f;
    case kGelu: {
      const float cdf = 0.5f * (1.0f + erff(h * 0.7071067811865476f));
      return cdf + h * 0.3989422804014327f * expf(-0.5f * h * h);
    }
    case kGeluTanh: {
      const float t = tanhf(0.7978845608028654f * (h + 0.044715f * h * h * h));
      const float du = 0.7978845608028654f * (1.0f + 0.134145f * h * h);
      return 0.5f * (1.0f + t) + 0.5f * h * (1.0f - t * t) * du;
    }
    case kSilu: {
      const float s = 1.0f / (1.0f + expf(-h));
      return s * (1.0f + h * (1.0f - s));
    }
    default: {
      const float t = tanhf(h);
      return 1.0f - t * t;
    }
  }
}

// A stack of L matrices: element (l, i, j) at data[l * stride0 + i * stride1 + j * stride2].
template <typename T>
struct Stacked3D {
  T* data;
  int64_t stride0;
  int64_t stride1;
  int64_t stride2;
};

// Per-row adapter ids: data[row] (int32 when `int32`, else int64), contiguous; data == nullptr means every
// row uses adapter 0.
struct AdapterIds {
  const void* data;
  bool int32;
};

namespace bottleneck_detail {

using namespace detail;

using lora_detail::kBK;
using lora_detail::kBM;
using lora_detail::kBN;
using lora_detail::kCPitch;
using lora_detail::kGroup;
using lora_detail::kThreads;
using lora_detail::operand_pitch;
using lora_detail::stage_elems;

constexpr int kRowsPerThread = kBM * kBN / kThreads;  // epilogue: thread owns column tid % 64 of 32 rows
constexpr int kRowStep = kThreads / kBN;

// Row `row`'s adapter in [0, L), or -1 for none (ids outside [0, L) included).
__device__ inline int64_t adapter_of(const AdapterIds& ids, int64_t row, int64_t num_adapters) {
  if (ids.data == nullptr) return 0;
  const int64_t id = ids.int32 ? static_cast<int64_t>(static_cast<const int32_t*>(ids.data)[row])
                               : static_cast<const int64_t*>(ids.data)[row];
  return (id >= 0 && id < num_adapters) ? id : -1;
}

// lora_detail::load_tile for a source of another type (16-bit x staged as fp32 for fp32 weights): plain
// loads converted one by one, in the order that keeps neighbouring threads on neighbouring addresses.
template <typename TS, typename TD, int ROWS, int PITCH>
__device__ inline void load_tile_as(TD* dst, const TS* src, int64_t r0, int64_t l0, int64_t rows_valid,
                                    int64_t l_valid, int64_t s_row, int64_t s_l, bool vec) {
  if constexpr (std::is_same_v<TS, TD>) {
    lora_detail::load_tile<TD, ROWS, PITCH>(dst, src, r0, l0, rows_valid, l_valid, s_row, s_l, vec);
  } else {
    const bool along_rows = s_row == 1 && s_l != 1;
    for (int e = threadIdx.x; e < ROWS * kBK; e += kThreads) {
      const int r = along_rows ? e % ROWS : e / kBK;
      const int l = along_rows ? e / ROWS : e % kBK;
      const int64_t gr = r0 + r;
      const int64_t gl = l0 + l;
      dst[r * PITCH + l] =
          from_float<TD>((gr < rows_valid && gl < l_valid) ? to_float(src[gr * s_row + gl * s_l]) : 0.0f);
    }
  }
}

// Which epilogue a row GEMM runs.
enum class RowEpilogue { kDown, kUp, kDh, kDx };

// out[m, n] = sum_k P[m, k] * Q_{id(m)}[k, n] over rows m with an adapter (0 elsewhere), then the epilogue:
//   kDown  h_out = acc + bias[id];  act_out = act(h_out)                     (P = x,  Q = Wd.T)
//   kUp    out = addend + scaling * (acc + bias[id])                         (P = A,  Q = Wu.T)
//   kDh    act_out = scaling * acc * act'(h_in)                              (P = dY, Q = Wu)
//   kDx    out = acc (+ addend when addend.data)                             (P = dH, Q = Wd)
// h_in, h_out and act_out are [rows, cols] contiguous.
template <typename T, typename TP, typename TC>
struct RowGemmParams {
  const TP* p;
  int64_t p_stride_row, p_stride_red;
  bool p_vec;  // P's rows readable 16 bytes at a time (only used when TP == TC)
  const TC* q;  // Q_l[k, n] = q[l * q_stride_adapter + k * q_stride_red + n * q_stride_col]
  int64_t q_stride_adapter, q_stride_red, q_stride_col;
  bool q_vec;
  AdapterIds ids;
  int64_t rows, cols, red, num_adapters;
  const TC* bias;  // [L, cols] or nullptr
  int64_t bias_stride_adapter, bias_stride_col;
  const float* h_in;
  float* h_out;
  TC* act_out;
  Strided2D<const T> addend;
  Strided2D<T> out;
  float scaling;
  int activation;
};

template <RowEpilogue kEpi, typename T, typename TP, typename TC>
__global__ void __launch_bounds__(kThreads) row_gemm_kernel(const RowGemmParams<T, TP, TC> prm) {
  constexpr int kP = operand_pitch<TC>();
  __shared__ __align__(128) unsigned char smem[lora_detail::gemm_operand_bytes<TC>()];
  __shared__ int64_t tile_ids[kBM];       // each row's adapter, -1: none
  __shared__ int first_seen[kBM];         // row i holds the first occurrence of its adapter in the tile
  __shared__ int64_t tile_adapters[kBM];  // the distinct adapters of the tile, in order of first row

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
  const int tid = threadIdx.x;

  if (tid < kBM) {
    const int64_t gi = m0 + tid;
    tile_ids[tid] = gi < prm.rows ? adapter_of(prm.ids, gi, prm.num_adapters) : -1;
  }
  __syncthreads();
  if (tid < kBM) {
    const int64_t id = tile_ids[tid];
    bool first = id >= 0;
    for (int r = 0; r < tid && first; ++r) first = tile_ids[r] != id;
    first_seen[tid] = first ? 1 : 0;
  }
  __syncthreads();
  if (tid < kBM && first_seen[tid]) {
    int position = 0;
    for (int r = 0; r < tid; ++r) position += first_seen[r];
    tile_adapters[position] = tile_ids[tid];
  }
  int n_present = 0;
  for (int r = 0; r < kBM; ++r) n_present += first_seen[r];
  __syncthreads();

  const int j = tid % kBN;
  const int i_first = tid / kBN;
  float vals[kRowsPerThread];
#pragma unroll
  for (int t = 0; t < kRowsPerThread; ++t) vals[t] = 0.0f;

  for (int a = 0; a < n_present; ++a) {  // uniform across the block: n_present comes from shared memory
    const int64_t adapter = tile_adapters[a];
    const TC* q = prm.q + adapter * prm.q_stride_adapter;
    lora_detail::pipelined_tile_product<TC>(
        ceil_div(prm.red, kBK), smem,
        [&](TC* ps, TC* qs, int64_t step) {
          const int64_t l0 = step * kBK;
          load_tile_as<TP, TC, kBM, kP>(ps, prm.p, m0, l0, prm.rows, prm.red, prm.p_stride_row, prm.p_stride_red,
                                        prm.p_vec);
          lora_detail::load_tile<TC, kBN, kP>(qs, q, n0, l0, prm.cols, prm.red, prm.q_stride_col, prm.q_stride_red,
                                              prm.q_vec);
        },
        [](const TC*, const TC*) {});
    const float* cs = reinterpret_cast<const float*>(smem);
#pragma unroll
    for (int t = 0; t < kRowsPerThread; ++t) {
      const int i = i_first + kRowStep * t;
      if (tile_ids[i] == adapter) vals[t] = cs[i * kCPitch + j];
    }
    __syncthreads();  // the next pass's first stage overwrites cs
  }

  const int64_t gj = n0 + j;
  if (gj >= prm.cols) return;
#pragma unroll
  for (int t = 0; t < kRowsPerThread; ++t) {
    const int i = i_first + kRowStep * t;
    const int64_t gi = m0 + i;
    if (gi >= prm.rows) continue;
    const int64_t id = tile_ids[i];
    float v = vals[t];
    if constexpr (kEpi == RowEpilogue::kDown || kEpi == RowEpilogue::kUp) {
      if (id >= 0 && prm.bias != nullptr) v += to_float(prm.bias[id * prm.bias_stride_adapter + gj * prm.bias_stride_col]);
    }
    if constexpr (kEpi == RowEpilogue::kDown) {
      prm.h_out[gi * prm.cols + gj] = v;
      prm.act_out[gi * prm.cols + gj] = from_float<TC>(bottleneck_activate(v, prm.activation));
    } else if constexpr (kEpi == RowEpilogue::kUp) {
      prm.out.at(gi, gj) = from_float<T>(to_float(prm.addend.at(gi, gj)) + prm.scaling * v);
    } else if constexpr (kEpi == RowEpilogue::kDh) {
      const float h = prm.h_in[gi * prm.cols + gj];
      prm.act_out[gi * prm.cols + gj] = from_float<TC>(prm.scaling * v * bottleneck_activate_grad(h, prm.activation));
    } else {
      if (prm.addend.data != nullptr) v += to_float(prm.addend.at(gi, gj));
      prm.out.at(gi, gj) = from_float<T>(v);
    }
  }
}

template <RowEpilogue kEpi, typename T, typename TP, typename TC>
inline cudaError_t launch_row_gemm(const RowGemmParams<T, TP, TC>& prm, cudaStream_t stream) {
  if (prm.rows == 0 || prm.cols == 0) return cudaSuccess;
  const int64_t tiles = ceil_div(prm.rows, kBM) * ceil_div(prm.cols, kBN);
  if (tiles > kMaxGridX) return cudaErrorInvalidConfiguration;
  row_gemm_kernel<kEpi, T, TP, TC><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(prm);
  return cudaPeekAtLastError();
}

// Whether matrix l of a stack can be staged 16 bytes at a time for every l.
template <typename T>
inline bool stack_vectorizable(const T* data, int64_t stride_adapter, int64_t stride_row, int64_t stride_l) {
  constexpr int64_t kVec = 16 / static_cast<int64_t>(sizeof(T));
  return rows_vectorizable(data, stride_row, stride_l) && stride_adapter % kVec == 0;
}

// Per adapter l (rows order[segments[l] : segments[l + 1]], or all M rows in order without ids) and row
// chunk c of them:
//   dw_part[c, l, i, j] = sum_m P[m, i] * f(Q[m, j]),   db_part[c, l, i] = sum_m P[m, i]
// with f = act when act_q, else identity; P [M, I] and Q [M, J] any strides. Grid: (L * chunks, I tiles,
// J tiles). Every block writes its whole slice (zeros for an empty chunk), so the partials need no clearing.
template <typename TP, typename TQ, typename TC>
struct WeightGradParams {
  const TP* p;
  int64_t p_stride_row, p_stride_col;
  const TQ* q;
  int64_t q_stride_row, q_stride_col;
  const int64_t* order;     // [M], or nullptr: one adapter over rows 0..M-1
  const int64_t* segments;  // [L + 1] at least
  float* dw_part;           // [chunks, L, I, J]
  float* db_part;           // [chunks, L, I] or nullptr
  int64_t M, I, J, num_adapters, chunks;
  bool act_q;
  int activation;
};

template <typename TP, typename TQ, typename TC>
__global__ void __launch_bounds__(kThreads) weight_grad_kernel(const WeightGradParams<TP, TQ, TC> prm) {
  constexpr int kP = operand_pitch<TC>();
  __shared__ __align__(128) unsigned char smem[lora_detail::gemm_operand_bytes<TC>()];
  const int64_t adapter = blockIdx.x / prm.chunks;
  const int64_t chunk = blockIdx.x % prm.chunks;
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.z) * kBN;
  const int tid = threadIdx.x;

  // Without ids every row is adapter 0's (the other adapters' gradients are zero).
  int64_t seg_start = 0;
  int64_t seg_end = adapter == 0 ? prm.M : 0;
  if (prm.order != nullptr) {  // clamped: segments past [0, M] or out of order read nothing
    const int64_t first = prm.segments[adapter];
    const int64_t last = prm.segments[adapter + 1];
    seg_start = first < 0 ? 0 : (first > prm.M ? prm.M : first);
    seg_end = last < seg_start ? seg_start : (last > prm.M ? prm.M : last);
  }
  const int64_t per_chunk = ceil_div(ceil_div(seg_end - seg_start, prm.chunks), kBK) * kBK;
  const int64_t start = min(seg_start + chunk * per_chunk, seg_end);
  const int64_t end = min(start + per_chunk, seg_end);
  auto row_at = [&](int64_t pos) -> int64_t {  // -1: no row
    if (pos >= end) return -1;
    if (prm.order == nullptr) return pos;
    const int64_t row = prm.order[pos];
    return (row >= 0 && row < prm.M) ? row : -1;
  };

  const bool with_bias = prm.db_part != nullptr && blockIdx.z == 0;
  float bias_acc = 0.0f;
  lora_detail::pipelined_tile_product<TC>(
      ceil_div(end - start, kBK), smem,
      [&](TC* ps, TC* qs, int64_t step) {
        // ps[i][m] = P[row m, i0 + i] and qs[j][m] = f(Q[row m, j0 + j]): neighbouring threads read
        // neighbouring columns of one row.
        const int64_t m_base = start + step * kBK;
        for (int e = tid; e < kBM * kBK; e += kThreads) {
          const int i = e % kBM;
          const int m = e / kBM;
          const int64_t row = row_at(m_base + m);
          const int64_t gi = i0 + i;
          const float v = (row >= 0 && gi < prm.I) ? to_float(prm.p[row * prm.p_stride_row + gi * prm.p_stride_col]) : 0.0f;
          ps[i * kP + m] = from_float<TC>(v);
        }
        for (int e = tid; e < kBN * kBK; e += kThreads) {
          const int jj = e % kBN;
          const int m = e / kBN;
          const int64_t row = row_at(m_base + m);
          const int64_t gj = j0 + jj;
          float v = 0.0f;
          if (row >= 0 && gj < prm.J) {
            v = to_float(prm.q[row * prm.q_stride_row + gj * prm.q_stride_col]);
            if (prm.act_q) v = bottleneck_activate(v, prm.activation);
          }
          qs[jj * kP + m] = from_float<TC>(v);
        }
      },
      [&](const TC* ps, const TC*) {
        if (with_bias && tid < kBM) {
          for (int m = 0; m < kBK; ++m) bias_acc += to_float(ps[tid * kP + m]);
        }
      });
  const float* cs = reinterpret_cast<const float*>(smem);
  const int64_t slot = chunk * prm.num_adapters + adapter;
  const int j = tid % kBN;
  const int i_first = tid / kBN;
  const int64_t gj = j0 + j;
  if (gj < prm.J) {
    float* out = prm.dw_part + slot * prm.I * prm.J;
#pragma unroll 4
    for (int t = 0; t < kRowsPerThread; ++t) {
      const int i = i_first + kRowStep * t;
      const int64_t gi = i0 + i;
      if (gi < prm.I) out[gi * prm.J + gj] = cs[i * kCPitch + j];
    }
  }
  if (with_bias && tid < kBM && i0 + tid < prm.I) prm.db_part[slot * prm.I + i0 + tid] = bias_acc;
}

template <typename TP, typename TQ, typename TC>
inline cudaError_t launch_weight_grad(const WeightGradParams<TP, TQ, TC>& prm, cudaStream_t stream) {
  const int64_t blocks = prm.num_adapters * prm.chunks;
  const int64_t tiles_i = ceil_div(prm.I, kBM);
  const int64_t tiles_j = ceil_div(prm.J, kBN);
  if (blocks > kMaxGridX || tiles_i > kMaxGridYZ || tiles_j > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(tiles_i), static_cast<unsigned>(tiles_j));
  weight_grad_kernel<TP, TQ, TC><<<grid, kThreads, 0, stream>>>(prm);
  return cudaPeekAtLastError();
}

inline bool valid_sizes(int64_t M, int64_t D, int64_t NB, int64_t L, int activation) {
  return M >= 0 && D >= 1 && NB >= 1 && L >= 1 && activation >= kRelu && activation <= kTanh;
}

}  // namespace bottleneck_detail

// ---- public launchers -----------------------------------------------------------------------------------

template <typename T, typename TW>
struct BottleneckForwardArgs {
  Strided2D<const T> x;             // [M, D]
  Stacked3D<const TW> down_weight;  // [L, Bn, D]
  Strided2D<const TW> down_bias;    // [L, Bn]; data nullptr: none
  Stacked3D<const TW> up_weight;    // [L, D, Bn]
  Strided2D<const TW> up_bias;      // [L, D]; data nullptr: none
  Strided2D<const T> residual;      // [M, D]; data nullptr: x
  AdapterIds adapter_ids;           // [M]; data nullptr: every row uses adapter 0
  float* h;                         // out: [M, Bn] fp32 contiguous, the pre-activation saved for the backward
  TW* act;                          // workspace: [M, Bn] contiguous, act(H) for the up GEMM
  Strided2D<T> y;                   // out: [M, D]
  int64_t M, D, NB, L;
  int activation;  // BottleneckActivation
  float scaling;
};

// The whole forward: the down GEMM (bias and activation in its epilogue), then the up GEMM (bias, scaling
// and residual in its epilogue), on `stream`.
// Preconditions:
//   aliasing    outputs (y, the saved H) must not overlap each other or any input; the residual may be read from x
//   alignment   none required; 16-byte (cp.async) paths where pointers and strides allow (run time)
//   archs       sm_70+ (WMMA for half; bf16 tensor cores and cp.async from sm_80; fp32: FMA units)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
template <typename T, typename TW>
cudaError_t launch_bottleneck_forward(const BottleneckForwardArgs<T, TW>& args, cudaStream_t stream) {
  using namespace bottleneck_detail;
  if (!valid_sizes(args.M, args.D, args.NB, args.L, args.activation)) return cudaErrorInvalidValue;
  if (args.M == 0) return cudaSuccess;

  RowGemmParams<T, T, TW> down{};
  down.p = args.x.data;
  down.p_stride_row = args.x.stride0;
  down.p_stride_red = args.x.stride1;
  down.p_vec = rows_vectorizable(args.x.data, args.x.stride0, args.x.stride1);
  down.q = args.down_weight.data;  // Q_l[k, n] = Wd[l, n, k]
  down.q_stride_adapter = args.down_weight.stride0;
  down.q_stride_red = args.down_weight.stride2;
  down.q_stride_col = args.down_weight.stride1;
  down.q_vec = stack_vectorizable(args.down_weight.data, args.down_weight.stride0, args.down_weight.stride1,
                                  args.down_weight.stride2);
  down.ids = args.adapter_ids;
  down.rows = args.M;
  down.cols = args.NB;
  down.red = args.D;
  down.num_adapters = args.L;
  down.bias = args.down_bias.data;
  down.bias_stride_adapter = args.down_bias.stride0;
  down.bias_stride_col = args.down_bias.stride1;
  down.h_out = args.h;
  down.act_out = args.act;
  down.activation = args.activation;
  cudaError_t err = launch_row_gemm<RowEpilogue::kDown>(down, stream);
  if (err != cudaSuccess) return err;

  RowGemmParams<T, TW, TW> up{};
  up.p = args.act;
  up.p_stride_row = args.NB;
  up.p_stride_red = 1;
  up.p_vec = rows_vectorizable(args.act, args.NB, 1);
  up.q = args.up_weight.data;  // Q_l[b, d] = Wu[l, d, b]
  up.q_stride_adapter = args.up_weight.stride0;
  up.q_stride_red = args.up_weight.stride2;
  up.q_stride_col = args.up_weight.stride1;
  up.q_vec = stack_vectorizable(args.up_weight.data, args.up_weight.stride0, args.up_weight.stride1,
                                args.up_weight.stride2);
  up.ids = args.adapter_ids;
  up.rows = args.M;
  up.cols = args.D;
  up.red = args.NB;
  up.num_adapters = args.L;
  up.bias = args.up_bias.data;
  up.bias_stride_adapter = args.up_bias.stride0;
  up.bias_stride_col = args.up_bias.stride1;
  up.addend = args.residual.data != nullptr ? args.residual : args.x;
  up.out = args.y;
  up.scaling = args.scaling;
  return launch_row_gemm<RowEpilogue::kUp>(up, stream);
}

// How the backward splits the weight-gradient reductions, and the fp32 workspace it needs.
struct BottleneckBackwardPlan {
  int64_t chunks;  // row chunks per adapter, each with its own partial sums
  int64_t up_offset, up_bias_offset, down_offset, down_bias_offset;  // in floats, into the workspace
  int64_t workspace_floats;
};

// Preconditions:
//   aliasing    none (host arithmetic only)
//   alignment   n/a
//   archs       n/a (host)
//   threads     pure function
//   CUDA graphs host-only, safe anywhere
inline BottleneckBackwardPlan bottleneck_backward_plan(int64_t M, int64_t D, int64_t NB, int64_t L) {
  BottleneckBackwardPlan plan{};
  const int64_t tiles = (L > 0 ? L : 1) * detail::ceil_div(D > 0 ? D : 1, 64) * detail::ceil_div(NB > 0 ? NB : 1, 64);
  // Enough blocks to fill the device, few enough partials to keep the workspace small (as the Triton path).
  int64_t chunks = detail::ceil_div(M > 0 ? M : 1, bottleneck_detail::kBK);
  if (chunks > 8) chunks = 8;
  if (chunks > 1024 / tiles) chunks = 1024 / tiles;
  plan.chunks = chunks < 1 ? 1 : chunks;
  const int64_t parts = plan.chunks * L;
  plan.up_offset = 0;
  plan.up_bias_offset = plan.up_offset + parts * D * NB;
  plan.down_offset = plan.up_bias_offset + parts * D;
  plan.down_bias_offset = plan.down_offset + parts * NB * D;
  plan.workspace_floats = plan.down_bias_offset + parts * NB;
  return plan;
}

template <typename T, typename TW>
struct BottleneckBackwardArgs {
  Strided2D<const T> grad_y;        // [M, D]
  Strided2D<const T> x;             // [M, D]
  Stacked3D<const TW> down_weight;  // [L, Bn, D]
  Stacked3D<const TW> up_weight;    // [L, D, Bn]
  const float* h;                   // [M, Bn] fp32 contiguous, from the forward
  AdapterIds adapter_ids;           // as in the forward
  const int64_t* order;             // [M]: rows sorted by adapter (stable); needed with ids and weight grads
  const int64_t* segments;          // [L + 1]: adapter l's rows are order[segments[l] : segments[l + 1]]
  Strided2D<T> grad_x;              // out: [M, D]; data nullptr: no dX
  bool add_grad_y;                  // the residual is x: dX also gets dY
  // out, contiguous: [L, Bn, D], [L, Bn], [L, D, Bn], [L, D]. The two weight gradients are both given or
  // both nullptr (no adapter gradients); a bias gradient may be nullptr on its own.
  TW* grad_down_weight;
  TW* grad_down_bias;
  TW* grad_up_weight;
  TW* grad_up_bias;
  TW* dh;  // workspace: [M, Bn] contiguous
  int64_t M, D, NB, L;
  int activation;
  float scaling;
};

// The whole backward on `stream`. workspace: bottleneck_backward_plan(M, D, NB, L).workspace_floats fp32
// values of device memory, any contents (unused without weight gradients).
// Preconditions:
//   aliasing    gradients and the workspace must not overlap each other or any input
//   alignment   none required; 16-byte (cp.async) paths where pointers and strides allow (run time); workspace fp32,
//               any contents, bottleneck_backward_plan(...).workspace_floats long
//   archs       sm_70+ (WMMA for half; bf16 tensor cores and cp.async from sm_80; fp32: FMA units)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        order/segments group rows by adapter (caller-built, as launch_multi_lora_segments does)
template <typename T, typename TW>
cudaError_t launch_bottleneck_backward(const BottleneckBackwardArgs<T, TW>& args, float* workspace,
                                       cudaStream_t stream) {
  using namespace bottleneck_detail;
  const int64_t M = args.M, D = args.D, NB = args.NB, L = args.L;
  if (!valid_sizes(M, D, NB, L, args.activation)) return cudaErrorInvalidValue;
  const bool need_weights = args.grad_down_weight != nullptr;
  if (need_weights != (args.grad_up_weight != nullptr)) return cudaErrorInvalidValue;
  if (need_weights && args.adapter_ids.data != nullptr && (args.order == nullptr || args.segments == nullptr))
    return cudaErrorInvalidValue;
  cudaError_t err;
  if (M == 0) {  // no rows: the adapter gradients are zero (all-zero bits in every dtype)
    if (!need_weights) return cudaSuccess;
    if ((err = cudaMemsetAsync(args.grad_down_weight, 0, sizeof(TW) * L * NB * D, stream)) != cudaSuccess) return err;
    if ((err = cudaMemsetAsync(args.grad_up_weight, 0, sizeof(TW) * L * D * NB, stream)) != cudaSuccess) return err;
    if (args.grad_down_bias != nullptr &&
        (err = cudaMemsetAsync(args.grad_down_bias, 0, sizeof(TW) * L * NB, stream)) != cudaSuccess)
      return err;
    if (args.grad_up_bias != nullptr) return cudaMemsetAsync(args.grad_up_bias, 0, sizeof(TW) * L * D, stream);
    return cudaSuccess;
  }

  RowGemmParams<T, T, TW> dh{};
  dh.p = args.grad_y.data;
  dh.p_stride_row = args.grad_y.stride0;
  dh.p_stride_red = args.grad_y.stride1;
  dh.p_vec = rows_vectorizable(args.grad_y.data, args.grad_y.stride0, args.grad_y.stride1);
  dh.q = args.up_weight.data;  // Q_l[d, b] = Wu[l, d, b]
  dh.q_stride_adapter = args.up_weight.stride0;
  dh.q_stride_red = args.up_weight.stride1;
  dh.q_stride_col = args.up_weight.stride2;
  dh.q_vec = stack_vectorizable(args.up_weight.data, args.up_weight.stride0, args.up_weight.stride2,
                                args.up_weight.stride1);
  dh.ids = args.adapter_ids;
  dh.rows = M;
  dh.cols = NB;
  dh.red = D;
  dh.num_adapters = L;
  dh.h_in = args.h;
  dh.act_out = args.dh;
  dh.scaling = args.scaling;
  dh.activation = args.activation;
  if ((err = launch_row_gemm<RowEpilogue::kDh>(dh, stream)) != cudaSuccess) return err;

  if (args.grad_x.data != nullptr) {
    RowGemmParams<T, TW, TW> dx{};
    dx.p = args.dh;
    dx.p_stride_row = NB;
    dx.p_stride_red = 1;
    dx.p_vec = rows_vectorizable(args.dh, NB, 1);
    dx.q = args.down_weight.data;  // Q_l[b, d] = Wd[l, b, d]
    dx.q_stride_adapter = args.down_weight.stride0;
    dx.q_stride_red = args.down_weight.stride1;
    dx.q_stride_col = args.down_weight.stride2;
    dx.q_vec = stack_vectorizable(args.down_weight.data, args.down_weight.stride0, args.down_weight.stride2,
                                  args.down_weight.stride1);
    dx.ids = args.adapter_ids;
    dx.rows = M;
    dx.cols = D;
    dx.red = NB;
    dx.num_adapters = L;
    if (args.add_grad_y) dx.addend = args.grad_y;
    dx.out = args.grad_x;
    if ((err = launch_row_gemm<RowEpilogue::kDx>(dx, stream)) != cudaSuccess) return err;
  }
  if (!need_weights) return cudaSuccess;

  const BottleneckBackwardPlan plan = bottleneck_backward_plan(M, D, NB, L);
  const bool grouped = args.adapter_ids.data != nullptr;
  WeightGradParams<T, float, TW> up{};  // dWu[l] = dY[rows].T @ act(H[rows]) (scaled when summed)
  up.p = args.grad_y.data;
  up.p_stride_row = args.grad_y.stride0;
  up.p_stride_col = args.grad_y.stride1;
  up.q = args.h;
  up.q_stride_row = NB;
  up.q_stride_col = 1;
  up.order = grouped ? args.order : nullptr;
  up.segments = args.segments;
  up.dw_part = workspace + plan.up_offset;
  up.db_part = args.grad_up_bias != nullptr ? workspace + plan.up_bias_offset : nullptr;
  up.M = M;
  up.I = D;
  up.J = NB;
  up.num_adapters = L;
  up.chunks = plan.chunks;
  up.act_q = true;
  up.activation = args.activation;
  if ((err = launch_weight_grad(up, stream)) != cudaSuccess) return err;

  WeightGradParams<TW, T, TW> down{};  // dWd[l] = dH[rows].T @ x[rows]
  down.p = args.dh;
  down.p_stride_row = NB;
  down.p_stride_col = 1;
  down.q = args.x.data;
  down.q_stride_row = args.x.stride0;
  down.q_stride_col = args.x.stride1;
  down.order = grouped ? args.order : nullptr;
  down.segments = args.segments;
  down.dw_part = workspace + plan.down_offset;
  down.db_part = args.grad_down_bias != nullptr ? workspace + plan.down_bias_offset : nullptr;
  down.M = M;
  down.I = NB;
  down.J = D;
  down.num_adapters = L;
  down.chunks = plan.chunks;
  down.act_q = false;
  down.activation = args.activation;
  if ((err = launch_weight_grad(down, stream)) != cudaSuccess) return err;

  // Sum the chunks' partials in chunk order: deterministic.
  const float scaling = args.scaling;
  if ((err = launch_sum_partials<TW>(up.dw_part, plan.chunks, L * D * NB, scaling, args.grad_up_weight, stream)) !=
      cudaSuccess)
    return err;
  if (up.db_part != nullptr &&
      (err = launch_sum_partials<TW>(up.db_part, plan.chunks, L * D, scaling, args.grad_up_bias, stream)) !=
          cudaSuccess)
    return err;
  if ((err = launch_sum_partials<TW>(down.dw_part, plan.chunks, L * NB * D, 1.0f, args.grad_down_weight, stream)) !=
      cudaSuccess)
    return err;
  if (down.db_part != nullptr)
    return launch_sum_partials<TW>(down.db_part, plan.chunks, L * NB, 1.0f, args.grad_down_bias, stream);
  return cudaSuccess;
}

}  // inline namespace PEFTKERN_ABI_NAMESPACE
}  // namespace peftkern
