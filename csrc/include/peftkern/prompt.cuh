// peftkern/prompt.cuh: the soft-prompt ops (prompt tuning and prefix tuning) in CUDA C++. Header-only, no torch.
//
// prompt_concat forward, one launch (launch_prompt_concat_forward):
//   out[b, s] = prompts[prompt_ids[b], s]         for s <  n   (the row's soft prompt)
//   out[b, s] = embed[input_ids[b, s - n]]        for s >= n   (the token embedding)
//   plus the extended attention mask (the mask's "one" over the prompt) and labels (-100 over the prompt),
//   written by the same threads: one more element per output row in the same pass.
// prompt_concat backward:
//   launch_prompt_task_sum    dprompts[p, j] = sum over rows b with prompt_ids[b] == p of dout[b, j], rows
//                             summed in index order (row splits: fp32 partials summed in split order)
//   launch_prompt_embed_grad  dembed[v] = sum of dout[b, n + t] over the positions (b, t) holding id v, in the
//                             order of a stable sort of the ids (the caller sorts: `order` and `starts`)
// prefix_kv, one launch each way:
//   launch_prefix_kv_forward  out[l, kv, b, h, j, d] = prefix[prompt_ids[b], j, ((l * 2 + kv) * H + h) * hd + d]
//   launch_prefix_kv_backward the per-task sum above over a [L, 2, B, H, n, hd] cache gradient
//
// The same decomposition as triton_kernels/prompt.py. Every sum is a fixed-order loop of one thread over fp32
// accumulators: deterministic, no atomics. Ids out of range (the ops reject them before launching) read
// nothing: their output rows come out zero and they add to no gradient. All offsets are int64.
//
// Memory-bound copies: 128-thread blocks laid out as `lanes` threads per row (a power of two covering the row's
// 16-byte vectors, at most 128) and 128 / lanes rows per block, grid-stride over rows (grid.x) and column
// chunks (grid.y / grid.z). A launch moves 16 bytes per access when every matrix it touches is contiguous
// along its last dimension with 16-byte aligned rows and the width is a multiple of the vector (checked on
// the host: *_vectorizable below); otherwise the same kernel, instantiated with VEC = 1, goes element by
// element with any strides.
//
// Types: T (embedding table, inputs_embeds, prefix, the gradients of the output) is half, __nv_bfloat16 or
// float; TP (prompts and dprompts) is T or float (fp32 prompts beside a 16-bit model). Ids are int32 or int64
// (IdMatrix::bytes); the attention mask and labels are copied bit for bit as elements of 1, 2, 4 or 8 bytes
// (BitsMatrix), so every mask dtype works: the caller passes the bit pattern of its "one" and of -100.
// Each launch_* returns the cudaError_t of its launches (cudaGetLastError), or cudaErrorInvalidValue for
// arguments it cannot run.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common.cuh"

namespace peftkern {
inline namespace PEFTKERN_ABI_NAMESPACE {

// An int32 or int64 matrix of ids (a vector: rows = 1 or stride1 unused). Element (i, j) is at
// data[i * stride0 + j * stride1], `bytes` (4 or 8) wide.
struct IdMatrix {
  const void* data;
  int64_t stride0;
  int64_t stride1;
  int bytes;
  __host__ __device__ inline int64_t at(int64_t i, int64_t j) const {
    const int64_t offset = i * stride0 + j * stride1;
    return bytes == 8 ? static_cast<const int64_t*>(data)[offset]
                      : static_cast<int64_t>(static_cast<const int32_t*>(data)[offset]);
  }
};

// A matrix of 1, 2, 4 or 8 byte elements moved bit for bit (the attention mask in any dtype, the labels).
struct BitsMatrix {
  const void* data;  // nullptr: absent
  int64_t stride0;
  int64_t stride1;
  int bytes;
};

namespace prompt_detail {

using namespace detail;

constexpr int kThreads = 128;
constexpr int64_t kMaxRowBlocks = 65536;  // grid.x cap: the kernels stride over rows beyond it
constexpr int kTaskSumTargetBlocks = 1024;  // row splits of the task sum fill about this many blocks

template <typename T>
constexpr int vec_of() {
  return 16 / static_cast<int>(sizeof(T));
}

// Threads per row: the smallest power of two covering `vectors` (at least 1, at most kThreads).
inline int lanes_for(int64_t vectors) {
  int lanes = 1;
  while (lanes < kThreads && lanes < vectors) lanes *= 2;
  return lanes;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Whether every stride is a whole number of vectors (so each row that starts on an aligned base is aligned).
inline bool strides_whole(int64_t vec, std::initializer_list<int64_t> strides) {
  for (const int64_t s : strides)
    if (s % vec != 0) return false;
  return true;
}

template <typename TO, typename TI>
__device__ inline TO convert(TI v) {
  if constexpr (std::is_same_v<TO, TI>) {
    return v;
  } else {
    return from_float<TO>(to_float(v));
  }
}

// VEC consecutive elements of T from a 16-byte aligned address (VEC * sizeof(T) a multiple of 16), as floats.
template <typename T, int VEC>
__device__ inline void load_floats(const T* p, float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    v[0] = to_float(*p);
  } else {
    constexpr int kChunks = VEC * static_cast<int>(sizeof(T)) / 16;
    static_assert(kChunks * 16 == VEC * static_cast<int>(sizeof(T)), "whole 16-byte chunks only");
    union {
      uint4 chunk[kChunks];
      T element[VEC];
    } tmp;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) tmp.chunk[c] = reinterpret_cast<const uint4*>(p)[c];
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(tmp.element[i]);
  }
}

template <typename T, int VEC>
__device__ inline void store_floats(T* p, const float (&v)[VEC]) {
  if constexpr (VEC == 1) {
    *p = from_float<T>(v[0]);
  } else {
    constexpr int kChunks = VEC * static_cast<int>(sizeof(T)) / 16;
    static_assert(kChunks * 16 == VEC * static_cast<int>(sizeof(T)), "whole 16-byte chunks only");
    union {
      uint4 chunk[kChunks];
      T element[VEC];
    } tmp;
#pragma unroll
    for (int i = 0; i < VEC; ++i) tmp.element[i] = from_float<T>(v[i]);
#pragma unroll
    for (int c = 0; c < kChunks; ++c) reinterpret_cast<uint4*>(p)[c] = tmp.chunk[c];
  }
}

// VEC elements of TS at `src` into T at `dst`; the vector form (both contiguous and 16-byte aligned) moves the
// bits unchanged when TS == T and rounds to nearest otherwise (as the scalar form does).
template <typename T, typename TS, int VEC>
__device__ inline void copy_vec(T* dst, const TS* src) {
  if constexpr (VEC == 1) {
    *dst = convert<T>(*src);
  } else if constexpr (std::is_same_v<T, TS>) {
    *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  } else {
    float v[VEC];
    load_floats<TS, VEC>(src, v);
    store_floats<T, VEC>(dst, v);
  }
}

template <typename T, int VEC>
__device__ inline void store_zeros(T* dst) {
  if constexpr (VEC == 1) {
    *dst = from_float<T>(0.0f);
  } else {
    *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
  }
}

__host__ __device__ inline uint64_t load_bits(const void* base, int64_t offset, int bytes) {
  switch (bytes) {
    case 1:
      return static_cast<const uint8_t*>(base)[offset];
    case 2:
      return static_cast<const uint16_t*>(base)[offset];
    case 4:
      return static_cast<const uint32_t*>(base)[offset];
    default:
      return static_cast<const uint64_t*>(base)[offset];
  }
}

__host__ __device__ inline void store_bits(void* base, int64_t offset, int bytes, uint64_t bits) {
  switch (bytes) {
    case 1:
      static_cast<uint8_t*>(base)[offset] = static_cast<uint8_t>(bits);
      break;
    case 2:
      static_cast<uint16_t*>(base)[offset] = static_cast<uint16_t>(bits);
      break;
    case 4:
      static_cast<uint32_t*>(base)[offset] = static_cast<uint32_t>(bits);
      break;
    default:
      static_cast<uint64_t*>(base)[offset] = bits;
      break;
  }
}

inline bool valid_bytes(int bytes) { return bytes == 1 || bytes == 2 || bytes == 4 || bytes == 8; }
inline bool valid_id_bytes(int bytes) { return bytes == 4 || bytes == 8; }

}  // namespace prompt_detail

// ---- prompt_concat forward ------------------------------------------------------------------------------

template <typename T, typename TP>
struct PromptConcatArgs {
  IdMatrix input_ids;   // [B, T]
  IdMatrix prompt_ids;  // [B] (stride0; stride1 unused)
  const T* embed;       // [V, D]
  int64_t embed_stride0, embed_stride1;
  const TP* prompts;    // [P, n, D]
  int64_t prompts_stride0, prompts_stride1, prompts_stride2;
  T* out;               // out: [B, n + T, D]
  int64_t out_stride0, out_stride1, out_stride2;
  BitsMatrix mask;      // [B, T] or data == nullptr (then mask_one everywhere)
  void* mask_out;       // out: [B, n + T] contiguous, mask_bytes wide (= mask.bytes); nullptr: no mask
  int mask_bytes;       // element width of mask_out
  uint64_t mask_one;    // bit pattern of 1 in the mask's dtype (1, 0x3C00 for fp16, 0x3F800000 for fp32, ...)
  BitsMatrix labels;    // [B, T] (labels.bytes wide); read only when labels_out is set
  void* labels_out;     // out: [B, n + T] contiguous, labels.bytes wide; nullptr: no labels
  uint64_t label_fill;  // bit pattern of -100 in the labels' dtype
  int64_t B, length, n, D, V, P;  // length: T, the tokens per row
};

namespace prompt_detail {

using namespace detail;

template <typename T, typename TP, int VEC>
__global__ void __launch_bounds__(kThreads) prompt_concat_fwd_kernel(const PromptConcatArgs<T, TP> a, int lanes) {
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int rows_per_block = kThreads / lanes;
  const int64_t total = a.n + a.length;
  const int64_t rows = a.B * total;
  const int64_t vectors = a.D / VEC;  // VEC divides D on the vector path
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / lanes; row < rows;
       row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t b = row / total;
    const int64_t s = row % total;
    const bool is_prompt = s < a.n;
    const TP* prompt_row = nullptr;
    const T* embed_row = nullptr;
    if (is_prompt) {
      const int64_t task = a.prompt_ids.at(b, 0);
      if (task >= 0 && task < a.P) prompt_row = a.prompts + task * a.prompts_stride0 + s * a.prompts_stride1;
    } else {
      const int64_t token = a.input_ids.at(b, s - a.n);
      if (token >= 0 && token < a.V) embed_row = a.embed + token * a.embed_stride0;
    }
    T* out_row = a.out + b * a.out_stride0 + s * a.out_stride1;
    for (int64_t k = static_cast<int64_t>(blockIdx.y) * lanes + lane; k < vectors;
         k += static_cast<int64_t>(gridDim.y) * lanes) {
      const int64_t col = k * VEC;
      T* dst = out_row + col * a.out_stride2;
      if (prompt_row != nullptr) {
        copy_vec<T, TP, VEC>(dst, prompt_row + col * a.prompts_stride2);
      } else if (embed_row != nullptr) {
        copy_vec<T, T, VEC>(dst, embed_row + col * a.embed_stride1);
      } else {
        store_zeros<T, VEC>(dst);  // an id out of range: a zero row, nothing read
      }
    }
    if (blockIdx.y == 0 && lane == 0) {
      // Positions are the row's index in the contiguous [B, n + T] mask and labels.
      if (a.mask_out != nullptr) {
        const uint64_t bits = (is_prompt || a.mask.data == nullptr)
                                  ? a.mask_one
                                  : load_bits(a.mask.data, b * a.mask.stride0 + (s - a.n) * a.mask.stride1,
                                              a.mask.bytes);
        store_bits(a.mask_out, row, a.mask_bytes, bits);
      }
      if (a.labels_out != nullptr) {
        const uint64_t bits = is_prompt ? a.label_fill
                                        : load_bits(a.labels.data, b * a.labels.stride0 + (s - a.n) * a.labels.stride1,
                                                    a.labels.bytes);
        store_bits(a.labels_out, row, a.labels.bytes, bits);
      }
    }
  }
}

// Blocks over rows (grid.x, capped: the kernels stride) and column chunks of lanes * VEC (grid.y / grid.z).
inline dim3 copy_grid(int64_t rows, int64_t vectors, int lanes, unsigned third) {
  const int64_t rows_per_block = kThreads / lanes;
  int64_t gx = ceil_div(rows, rows_per_block);
  gx = gx < kMaxRowBlocks ? gx : kMaxRowBlocks;
  int64_t gy = ceil_div(vectors, lanes);
  gy = gy < kMaxGridYZ ? gy : kMaxGridYZ;
  return dim3(static_cast<unsigned>(gx > 0 ? gx : 1), static_cast<unsigned>(gy > 0 ? gy : 1), third);
}

}  // namespace prompt_detail

// Whether launch_prompt_concat_forward moves 16 bytes at a time for these arguments.
template <typename T, typename TP>
inline bool prompt_concat_vectorizable(const PromptConcatArgs<T, TP>& a) {
  using namespace prompt_detail;
  constexpr int64_t kVec = vec_of<T>();
  constexpr int64_t kVecP = vec_of<TP>();
  return a.D % kVec == 0 && a.embed_stride1 == 1 && a.prompts_stride2 == 1 && a.out_stride2 == 1 &&
         aligned16(a.embed) && aligned16(a.prompts) && aligned16(a.out) && strides_whole(kVec, {a.embed_stride0}) &&
         strides_whole(kVecP, {a.prompts_stride0, a.prompts_stride1}) &&
         strides_whole(kVec, {a.out_stride0, a.out_stride1});
}

// inputs_embeds, the extended mask and the extended labels of prompt tuning, in one launch.
// Preconditions:
//   aliasing    outputs must not overlap the inputs
//   alignment   none required; 16-byte path when every pointer and stride allows
//   archs       any the toolkit targets (16-byte paths are plain vector loads)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
template <typename T, typename TP>
cudaError_t launch_prompt_concat_forward(const PromptConcatArgs<T, TP>& a, cudaStream_t stream) {
  using namespace prompt_detail;
  static_assert(std::is_same_v<TP, T> || std::is_same_v<TP, float>, "prompts: T or float");
  if (a.B < 0 || a.length < 0 || a.n < 0 || a.D < 0 || a.V < 0 || a.P < 0) return cudaErrorInvalidValue;
  if (!valid_id_bytes(a.input_ids.bytes) || !valid_id_bytes(a.prompt_ids.bytes)) return cudaErrorInvalidValue;
  if (a.mask_out != nullptr && !valid_bytes(a.mask_bytes)) return cudaErrorInvalidValue;
  if (a.mask.data != nullptr && a.mask.bytes != a.mask_bytes) return cudaErrorInvalidValue;
  if (a.labels_out != nullptr && (!valid_bytes(a.labels.bytes) || (a.labels.data == nullptr && a.B * a.length > 0)))
    return cudaErrorInvalidValue;
  const int64_t rows = a.B * (a.n + a.length);
  if (rows == 0) return cudaSuccess;
  // D == 0 still writes the mask and labels: one (empty) column chunk.
  if (prompt_concat_vectorizable(a)) {
    constexpr int kVec = vec_of<T>();
    const int lanes = lanes_for(a.D / kVec);
    prompt_concat_fwd_kernel<T, TP, kVec><<<copy_grid(rows, a.D / kVec, lanes, 1), kThreads, 0, stream>>>(a, lanes);
  } else {
    const int lanes = lanes_for(a.D);
    prompt_concat_fwd_kernel<T, TP, 1><<<copy_grid(rows, a.D, lanes, 1), kThreads, 0, stream>>>(a, lanes);
  }
  return cudaPeekAtLastError();
}

// ---- per-task sums (dprompts, dprefix) ------------------------------------------------------------------

// out[p, j, c] = sum over rows b (in index order) with prompt_ids[b] == p of grad[b, j, c], where column c of
// the [P, n, C] table splits as (c2, c1, c0), c0 < inner0, c1 < inner1, each with its own stride in grad: the
// prompt part of dout ([B, n + T, D]: inner1 = 1, inner0 = D) or a prefix cache gradient [L, 2, B, H, n, hd]
// (c2 = layer * 2 + key/value, c1 = head, c0 = head_dim index).
template <typename T, typename TO>
struct TaskSumArgs {
  const T* grad;
  int64_t stride_b, stride_j, stride_c2, stride_c1, stride_c0;
  IdMatrix prompt_ids;  // [B]
  TO* out;              // out: [P, n, C] contiguous
  int64_t B, P, n, C, inner1, inner0;
};

struct TaskSumPlan {
  int64_t splits;          // row splits (grid.y); > 1: fp32 partials in the workspace, summed in split order
  int64_t rows_per_split;
  int64_t workspace_floats;  // splits > 1: splits * P * n * C; else 0
};

// The row split of launch_prompt_task_sum (sizes only, so the caller can size the workspace without a sync).
// Preconditions:
//   aliasing    none (host arithmetic only)
//   alignment   n/a
//   archs       n/a (host)
//   threads     pure function
//   CUDA graphs host-only, safe anywhere
inline TaskSumPlan prompt_task_sum_plan(int64_t B, int64_t P, int64_t n, int64_t C) {
  using namespace prompt_detail;
  TaskSumPlan plan{1, B > 0 ? B : 1, 0};
  const int64_t count = P * n * C;
  if (B <= 0 || count <= 0) return plan;
  // About the blocks launch_prompt_task_sum runs without a split (16-bit vectors of 8 columns).
  const int64_t vectors = ceil_div(C, 8);
  const int64_t lanes = lanes_for(vectors);
  const int64_t blocks = ceil_div(P * n, kThreads / lanes) * ceil_div(vectors, lanes);
  // Few (task, token) rows and many batch rows (one prompt, a large batch): split the batch so that the GPU
  // fills up, each split at least 32 rows long.
  int64_t splits = blocks >= kTaskSumTargetBlocks ? 1 : kTaskSumTargetBlocks / blocks;
  const int64_t by_rows = ceil_div(B, 32);
  splits = splits < by_rows ? splits : by_rows;
  splits = splits < kMaxGridYZ ? splits : kMaxGridYZ;
  if (splits < 1) splits = 1;
  plan.rows_per_split = ceil_div(B, splits);
  plan.splits = ceil_div(B, plan.rows_per_split);
  plan.workspace_floats = plan.splits > 1 ? plan.splits * count : 0;
  return plan;
}

namespace prompt_detail {

using namespace detail;

// One thread: VEC columns of one (p, j) row over the rows of one split. Writes TO, or fp32 partials.
template <typename T, typename TO, int VEC>
__global__ void __launch_bounds__(kThreads)
    task_sum_kernel(const TaskSumArgs<T, TO> a, int lanes, int64_t rows_per_split, float* partials) {
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int rows_per_block = kThreads / lanes;
  const int64_t rows = a.P * a.n;
  const int64_t vectors = a.C / VEC;
  const int64_t split = blockIdx.y;
  const int64_t row_start = split * rows_per_split;
  const int64_t row_end = row_start + rows_per_split < a.B ? row_start + rows_per_split : a.B;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / lanes; row < rows;
       row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t p = row / a.n;
    const int64_t j = row % a.n;
    for (int64_t k = static_cast<int64_t>(blockIdx.z) * lanes + lane; k < vectors;
         k += static_cast<int64_t>(gridDim.z) * lanes) {
      const int64_t c = k * VEC;  // on the vector path inner0 % VEC == 0: a vector never crosses a c0 run
      const int64_t c0 = c % a.inner0;
      const int64_t c1 = (c / a.inner0) % a.inner1;
      const int64_t c2 = c / (a.inner0 * a.inner1);
      const T* column = a.grad + j * a.stride_j + c2 * a.stride_c2 + c1 * a.stride_c1 + c0 * a.stride_c0;
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
      // Unrolled so that several rows' loads are in flight at once (the sum itself stays in row order).
#pragma unroll 4
      for (int64_t b = row_start; b < row_end; ++b) {
        if (a.prompt_ids.at(b, 0) != p) continue;  // ids out of range match no task
        float v[VEC];
        load_floats<T, VEC>(column + b * a.stride_b, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += v[i];
      }
      const int64_t offset = row * a.C + c;
      if (partials != nullptr) {
        store_floats<float, VEC>(partials + split * rows * a.C + offset, acc);
      } else {
        store_floats<TO, VEC>(a.out + offset, acc);
      }
    }
  }
}

// out[i] = sum over s of parts[s * count + i], in the order s = 0, 1, ...: deterministic.
template <typename TO>
__global__ void __launch_bounds__(kThreads)
    sum_splits_kernel(const float* parts, int64_t splits, int64_t count, TO* out) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) {
    float acc = 0.0f;
    for (int64_t s = 0; s < splits; ++s) acc += parts[s * count + i];
    out[i] = from_float<TO>(acc);
  }
}

}  // namespace prompt_detail

template <typename T, typename TO>
inline bool prompt_task_sum_vectorizable(const TaskSumArgs<T, TO>& a, const float* workspace) {
  using namespace prompt_detail;
  constexpr int64_t kVec = vec_of<T>();
  // The output (and fp32 partials) take VEC elements at offsets (row * C + c): C % VEC == 0 follows from
  // inner0 % VEC == 0, and VEC * sizeof(TO) is 16 or 32 bytes.
  return a.inner0 % kVec == 0 && a.C % kVec == 0 && a.stride_c0 == 1 && aligned16(a.grad) && aligned16(a.out) &&
         (workspace == nullptr || aligned16(workspace)) &&
         strides_whole(kVec, {a.stride_b, a.stride_j, a.stride_c2, a.stride_c1});
}

// The per-task sum. workspace: prompt_task_sum_plan(B, P, n, C).workspace_floats fp32 values of device memory
// (any contents; nullptr when that is 0). Every element of out is written; tasks no row uses come out zero.
// Preconditions:
//   aliasing    out and the workspace must not overlap the input
//   alignment   none required; 16-byte path when allowed; workspace fp32
//   archs       any the toolkit targets (16-byte paths are plain vector loads)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        deterministic (fixed-order sums)
template <typename T, typename TO>
cudaError_t launch_prompt_task_sum(const TaskSumArgs<T, TO>& a, float* workspace, cudaStream_t stream) {
  using namespace prompt_detail;
  static_assert(std::is_same_v<TO, T> || std::is_same_v<TO, float>, "out: T or float");
  if (a.B < 0 || a.P < 0 || a.n < 0 || a.C < 0 || a.inner0 < 1 || a.inner1 < 1) return cudaErrorInvalidValue;
  if (a.C % (a.inner0 * a.inner1) != 0 || !valid_id_bytes(a.prompt_ids.bytes)) return cudaErrorInvalidValue;
  const int64_t count = a.P * a.n * a.C;
  if (count == 0) return cudaSuccess;
  if (a.B == 0) return cudaMemsetAsync(a.out, 0, sizeof(TO) * count, stream);  // zero bits in every dtype
  const TaskSumPlan plan = prompt_task_sum_plan(a.B, a.P, a.n, a.C);
  if (plan.splits > 1 && workspace == nullptr) return cudaErrorInvalidValue;
  float* partials = plan.splits > 1 ? workspace : nullptr;
  const int64_t rows = a.P * a.n;
  if (prompt_task_sum_vectorizable(a, partials)) {
    constexpr int kVec = vec_of<T>();
    const int lanes = lanes_for(a.C / kVec);
    const dim3 g = copy_grid(rows, a.C / kVec, lanes, static_cast<unsigned>(plan.splits));
    // Columns go to grid.z, splits to grid.y (kernel's convention).
    task_sum_kernel<T, TO, kVec><<<dim3(g.x, g.z, g.y), kThreads, 0, stream>>>(a, lanes, plan.rows_per_split,
                                                                              partials);
  } else {
    const int lanes = lanes_for(a.C);
    const dim3 g = copy_grid(rows, a.C, lanes, static_cast<unsigned>(plan.splits));
    task_sum_kernel<T, TO, 1><<<dim3(g.x, g.z, g.y), kThreads, 0, stream>>>(a, lanes, plan.rows_per_split,
                                                                           partials);
  }
  cudaError_t err = cudaPeekAtLastError();
  if (err != cudaSuccess || partials == nullptr) return err;
  int64_t blocks = ceil_div(count, kThreads);
  blocks = blocks < 4096 ? blocks : 4096;
  sum_splits_kernel<TO><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(partials, plan.splits, count,
                                                                                a.out);
  return cudaPeekAtLastError();
}

// dprompts of prompt_concat: the per-task sum over the prompt part of dout [B, n + T, D] (any strides).
// Preconditions:
//   aliasing    out and the workspace must not overlap grad
//   alignment   none required; 16-byte path when allowed
//   archs       any the toolkit targets (16-byte paths are plain vector loads)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
template <typename T, typename TP>
cudaError_t launch_prompt_concat_prompts_grad(const T* grad, int64_t grad_stride0, int64_t grad_stride1,
                                              int64_t grad_stride2, IdMatrix prompt_ids, TP* grad_prompts,
                                              int64_t B, int64_t P, int64_t n, int64_t D, float* workspace,
                                              cudaStream_t stream) {
  TaskSumArgs<T, TP> a{};
  a.grad = grad;
  a.stride_b = grad_stride0;
  a.stride_j = grad_stride1;
  a.stride_c0 = grad_stride2;  // c1 = c2 = 0: one run of D columns
  a.prompt_ids = prompt_ids;
  a.out = grad_prompts;
  a.B = B;
  a.P = P;
  a.n = n;
  a.C = D;
  a.inner1 = 1;
  a.inner0 = D > 0 ? D : 1;
  return launch_prompt_task_sum<T, TP>(a, workspace, stream);
}

// ---- dembed ---------------------------------------------------------------------------------------------

// out[v, :] = sum of grad[b, n + t, :] over the token positions (b, t) holding id v. order [B * T]: the flat
// positions b * T + t sorted stably by id; starts [V + 1]: id v's segment is order[starts[v] .. starts[v + 1])
// (a torch.sort(stable=True) + searchsorted on the device, as the Triton launcher builds them). Ids out of
// [0, V) fall outside every segment.
template <typename T>
struct EmbedGradArgs {
  const T* grad;  // [B, n + T, D]
  int64_t grad_stride0, grad_stride1, grad_stride2;
  const int64_t* order;   // [B * T]
  const int64_t* starts;  // [V + 1]
  T* out;                 // out: [V, D] contiguous
  int64_t B, length, n, D, V;  // length: T, the tokens per row
};

namespace prompt_detail {

using namespace detail;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) embed_grad_kernel(const EmbedGradArgs<T> a, int lanes) {
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int rows_per_block = kThreads / lanes;
  const int64_t vectors = a.D / VEC;
  const int64_t length = a.length > 0 ? a.length : 1;
  const int64_t positions = a.B * a.length;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / lanes; v < a.V;
       v += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    // Clamped so that a malformed segment table still reads inside `order`.
    int64_t start = a.starts[v];
    int64_t end = a.starts[v + 1];
    start = start < 0 ? 0 : start;
    end = end < positions ? end : positions;
    for (int64_t k = static_cast<int64_t>(blockIdx.y) * lanes + lane; k < vectors;
         k += static_cast<int64_t>(gridDim.y) * lanes) {
      const int64_t col = k * VEC;
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
#pragma unroll 4
      for (int64_t i = start; i < end; ++i) {
        const int64_t flat = a.order[i];
        if (flat < 0 || flat >= positions) continue;  // a malformed order entry: read nothing
        const int64_t b = flat / length;
        const int64_t s = a.n + flat % length;
        float g[VEC];
        load_floats<T, VEC>(a.grad + b * a.grad_stride0 + s * a.grad_stride1 + col * a.grad_stride2, g);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] += g[e];
      }
      store_floats<T, VEC>(a.out + v * a.D + col, acc);
    }
  }
}

}  // namespace prompt_detail

template <typename T>
inline bool prompt_embed_grad_vectorizable(const EmbedGradArgs<T>& a) {
  using namespace prompt_detail;
  constexpr int64_t kVec = vec_of<T>();
  return a.D % kVec == 0 && a.grad_stride2 == 1 && aligned16(a.grad) && aligned16(a.out) &&
         strides_whole(kVec, {a.grad_stride0, a.grad_stride1});
}

// Preconditions:
//   aliasing    dembed must not overlap grad or the ids
//   alignment   none required; 16-byte path when allowed
//   archs       any the toolkit targets (16-byte paths are plain vector loads)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
//   also        ids caller-sorted into segments (see EmbedGradArgs)
template <typename T>
cudaError_t launch_prompt_embed_grad(const EmbedGradArgs<T>& a, cudaStream_t stream) {
  using namespace prompt_detail;
  if (a.B < 0 || a.length < 0 || a.n < 0 || a.D < 0 || a.V < 0) return cudaErrorInvalidValue;
  if (a.V == 0 || a.D == 0) return cudaSuccess;
  if (prompt_embed_grad_vectorizable(a)) {
    constexpr int kVec = vec_of<T>();
    const int lanes = lanes_for(a.D / kVec);
    embed_grad_kernel<T, kVec><<<copy_grid(a.V, a.D / kVec, lanes, 1), kThreads, 0, stream>>>(a, lanes);
  } else {
    const int lanes = lanes_for(a.D);
    embed_grad_kernel<T, 1><<<copy_grid(a.V, a.D, lanes, 1), kThreads, 0, stream>>>(a, lanes);
  }
  return cudaPeekAtLastError();
}

// ---- prefix_kv ------------------------------------------------------------------------------------------

// out[c2, b, c1, j, c0] = prefix[prompt_ids[b], j, c], column c = (c2 * inner1 + c1) * inner0 + c0: with
// inner1 = H and inner0 = head_dim, the [P, n, L * 2 * H * hd] table lands in a [L, 2, B, H, n, hd] cache
// (c2 = layer * 2 + key/value; stride_c2 = out.stride(1), which must equal out.stride(0) / 2).
template <typename T>
struct PrefixKvArgs {
  const T* prefix;  // [P, n, C]
  int64_t prefix_stride0, prefix_stride1, prefix_stride2;
  IdMatrix prompt_ids;  // [B]
  T* out;
  int64_t out_stride_b, out_stride_j, out_stride_c2, out_stride_c1, out_stride_c0;
  int64_t B, P, n, C, inner1, inner0;
};

namespace prompt_detail {

using namespace detail;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) prefix_kv_fwd_kernel(const PrefixKvArgs<T> a, int lanes) {
  const int lane = static_cast<int>(threadIdx.x) % lanes;
  const int rows_per_block = kThreads / lanes;
  const int64_t rows = a.B * a.n;
  const int64_t vectors = a.C / VEC;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / lanes; row < rows;
       row += static_cast<int64_t>(gridDim.x) * rows_per_block) {
    const int64_t b = row / a.n;
    const int64_t j = row % a.n;
    const int64_t task = a.prompt_ids.at(b, 0);
    const bool ok = task >= 0 && task < a.P;
    const T* src = a.prefix + (ok ? task : 0) * a.prefix_stride0 + j * a.prefix_stride1;
    T* dst_row = a.out + b * a.out_stride_b + j * a.out_stride_j;
    for (int64_t k = static_cast<int64_t>(blockIdx.y) * lanes + lane; k < vectors;
         k += static_cast<int64_t>(gridDim.y) * lanes) {
      const int64_t c = k * VEC;  // inner0 % VEC == 0 on the vector path
      const int64_t c0 = c % a.inner0;
      const int64_t c1 = (c / a.inner0) % a.inner1;
      const int64_t c2 = c / (a.inner0 * a.inner1);
      T* dst = dst_row + c2 * a.out_stride_c2 + c1 * a.out_stride_c1 + c0 * a.out_stride_c0;
      if (ok) {
        copy_vec<T, T, VEC>(dst, src + c * a.prefix_stride2);
      } else {
        store_zeros<T, VEC>(dst);  // a task out of range: zeros, nothing read
      }
    }
  }
}

}  // namespace prompt_detail

template <typename T>
inline bool prefix_kv_vectorizable(const PrefixKvArgs<T>& a) {
  using namespace prompt_detail;
  constexpr int64_t kVec = vec_of<T>();
  return a.inner0 % kVec == 0 && a.C % kVec == 0 && a.prefix_stride2 == 1 && a.out_stride_c0 == 1 &&
         aligned16(a.prefix) && aligned16(a.out) &&
         strides_whole(kVec, {a.prefix_stride0, a.prefix_stride1, a.out_stride_b, a.out_stride_j, a.out_stride_c2,
                              a.out_stride_c1});
}

// Preconditions:
//   aliasing    the cache output must not overlap the prompts or ids
//   alignment   none required; 16-byte path when allowed
//   archs       any the toolkit targets (16-byte paths are plain vector loads)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
template <typename T>
cudaError_t launch_prefix_kv_forward(const PrefixKvArgs<T>& a, cudaStream_t stream) {
  using namespace prompt_detail;
  if (a.B < 0 || a.P < 0 || a.n < 0 || a.C < 0 || a.inner0 < 1 || a.inner1 < 1) return cudaErrorInvalidValue;
  if (a.C % (a.inner0 * a.inner1) != 0 || !valid_id_bytes(a.prompt_ids.bytes)) return cudaErrorInvalidValue;
  const int64_t rows = a.B * a.n;
  if (rows == 0 || a.C == 0) return cudaSuccess;
  if (prefix_kv_vectorizable(a)) {
    constexpr int kVec = vec_of<T>();
    const int lanes = lanes_for(a.C / kVec);
    prefix_kv_fwd_kernel<T, kVec><<<copy_grid(rows, a.C / kVec, lanes, 1), kThreads, 0, stream>>>(a, lanes);
  } else {
    const int lanes = lanes_for(a.C);
    prefix_kv_fwd_kernel<T, 1><<<copy_grid(rows, a.C, lanes, 1), kThreads, 0, stream>>>(a, lanes);
  }
  return cudaPeekAtLastError();
}

// dprefix [P, n, C] (contiguous) from the cache gradient grad [L, 2, B, H, n, hd] whose (layer, key/value)
// dims merge (stride0 == 2 * stride1): the per-task sum, rows in index order. workspace as launch_prompt_task_sum.
// Preconditions:
//   aliasing    out and the workspace must not overlap grad
//   alignment   none required; 16-byte path when allowed
//   archs       any the toolkit targets (16-byte paths are plain vector loads)
//   threads     stateless, any host threads and streams concurrently when outputs do not overlap
//   CUDA graphs capturable (no allocation, no host sync, grid from host sizes only)
template <typename T>
cudaError_t launch_prefix_kv_backward(const T* grad, const int64_t (&grad_strides)[6], IdMatrix prompt_ids,
                                      T* grad_prefix, int64_t L, int64_t B, int64_t H, int64_t n, int64_t head_dim,
                                      int64_t P, float* workspace, cudaStream_t stream) {
  if (grad_strides[0] != 2 * grad_strides[1] || L < 1 || H < 1 || head_dim < 1) return cudaErrorInvalidValue;
  TaskSumArgs<T, T> a{};
  a.grad = grad;
  a.stride_b = grad_strides[2];
  a.stride_j = grad_strides[4];
  a.stride_c2 = grad_strides[1];  // (layer, key/value) merged: index layer * 2 + kv at stride1
  a.stride_c1 = grad_strides[3];
  a.stride_c0 = grad_strides[5];
  a.prompt_ids = prompt_ids;
  a.out = grad_prefix;
  a.B = B;
  a.P = P;
  a.n = n;
  a.C = L * 2 * H * head_dim;
  a.inner1 = H;
  a.inner0 = head_dim;
  return launch_prompt_task_sum<T, T>(a, workspace, stream);
}

}  // inline namespace PEFTKERN_ABI_NAMESPACE
}  // namespace peftkern
