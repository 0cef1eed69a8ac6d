// peftkern._C: the multi-LoRA entry points (csrc/include/peftkern/multi_lora.cuh). Arguments are checked
// here (ValueError naming the argument) before any launch; tensors arrive as addresses, strides and sizes.
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "bindings_common.h"
#include "multi_lora_api.h"

namespace peftkern_bind {

namespace {

using peftkern_ext::RawLoraServing;
using peftkern_ext::RawMultiBackward;
using peftkern_ext::RawMultiForward;
using peftkern_ext::RawTensor3;
using Strides3 = std::tuple<int64_t, int64_t, int64_t>;

void check_multi_sizes(int64_t M, int64_t N, int64_t K, int64_t L, int64_t R) {
  if (M < 0 || N < 0 || K < 0) {
    throw py::value_error("sizes: expected M, N, K >= 0, got M=" + std::to_string(M) + ", N=" + std::to_string(N) +
                          ", K=" + std::to_string(K));
  }
  if (L < 1) throw py::value_error("L: expected at least 1 adapter slot, got " + std::to_string(L));
  if (R < 1) throw py::value_error("R: expected r_max >= 1, got " + std::to_string(R));
}

void check_path(int path) {
  if (path < 0 || path > 2) {
    throw py::value_error("path: expected a code in {0: auto, 1: decode, 2: prefill}, got " + std::to_string(path));
  }
}

RawTensor3 tensor3(const char* name, uintptr_t data, const Strides3& strides, int64_t d0, int64_t d1, int64_t d2) {
  require_address(name, data, d0 * d1 * d2);
  return RawTensor3{data, std::get<0>(strides), std::get<1>(strides), std::get<2>(strides)};
}

void check_workspace(uintptr_t workspace, int64_t workspace_bytes, int64_t needed, const char* sizer) {
  if (workspace_bytes < needed) {
    throw py::value_error("workspace: expected at least " + std::to_string(needed) + " bytes (" + sizer + "), got " +
                          std::to_string(workspace_bytes));
  }
  require_address("workspace", workspace, needed);
  if (needed > 0 && workspace % 256 != 0) {
    throw py::value_error("workspace: expected a 256-byte aligned address, got " + std::to_string(workspace));
  }
}

// A caller's segment table must have the header's length (64-row tiles).
void check_n_tiles(int64_t n_tiles, int64_t M, int64_t L) {
  if (n_tiles != peftkern_ext::multi_lora_segment_tiles(M, L)) {
    throw py::value_error("n_tiles: expected multi_lora_segment_tiles(M, L) = " +
                          std::to_string(peftkern_ext::multi_lora_segment_tiles(M, L)) + " (a 64-row table), got " +
                          std::to_string(n_tiles));
  }
}

// A caller's prebuilt segment table (all three addresses) or none (all 0).
peftkern_ext::RawSegments segment_table(uintptr_t perm, uintptr_t bounds, uintptr_t tiles, int64_t n_tiles, int64_t M,
                                        int64_t L) {
  if (perm == 0 && bounds == 0 && tiles == 0) return {};
  if (perm == 0 || bounds == 0 || tiles == 0) {
    throw py::value_error("perm, bounds, tiles: expected all three addresses of a segment table, or none");
  }
  check_n_tiles(n_tiles, M, L);
  return {perm, bounds, tiles, n_tiles};
}

void multi_lora_forward(int dtype, int adapter_dtype, uintptr_t x, Strides x_strides, uintptr_t weight,
                        Strides w_strides, uintptr_t bias, int64_t bias_stride, uintptr_t lora_a, Strides3 a_strides,
                        uintptr_t lora_b, Strides3 b_strides, uintptr_t adapter_ids, bool ids_int64,
                        uintptr_t scalings, uintptr_t ranks, uintptr_t s, uintptr_t y, Strides y_strides,
                        uintptr_t workspace, int64_t workspace_bytes, int64_t M, int64_t N, int64_t K, int64_t L,
                        int64_t R, int path, int device, uintptr_t stream, uintptr_t perm, uintptr_t bounds,
                        uintptr_t tiles, int64_t n_tiles) {
  check_dtypes(dtype, adapter_dtype);
  check_multi_sizes(M, N, K, L, R);
  check_path(path);
  RawMultiForward args{};
  args.x = matrix("x", x, x_strides, M, K);
  args.weight = matrix("weight", weight, w_strides, N, K);
  args.y = matrix("y", y, y_strides, M, N);
  args.lora_a = tensor3("lora_a", lora_a, a_strides, L, R, K);
  args.lora_b = tensor3("lora_b", lora_b, b_strides, L, N, R);
  require_address("adapter_ids", adapter_ids, M);
  require_address("scalings", scalings, L);
  require_address("ranks", ranks, L);
  require_address("s", s, M * R);
  check_workspace(workspace, workspace_bytes, peftkern_ext::multi_lora_forward_workspace_bytes(M, N, K, L, path),
                  "multi_lora_forward_workspace_bytes");
  args.bias = bias;
  args.bias_stride = bias_stride;
  args.adapter_ids = adapter_ids;
  args.ids_int64 = ids_int64;
  args.scalings = scalings;
  args.ranks = ranks;
  args.s = s;
  args.workspace = workspace;
  args.M = M;
  args.N = N;
  args.K = K;
  args.L = L;
  args.R = R;
  args.path = path;
  args.adapter_fp32 = adapter_dtype == peftkern_ext::kFloat32;
  args.segments = segment_table(perm, bounds, tiles, n_tiles, M, L);
  if (M == 0) return;
  launch_for_dtype(dtype, device, stream, "multi_lora_forward", args, peftkern_ext::multi_lora_forward_f16,
                   peftkern_ext::multi_lora_forward_bf16, peftkern_ext::multi_lora_forward_f32);
}

void multi_lora_backward(int dtype, int adapter_dtype, uintptr_t grad_y, Strides gy_strides, uintptr_t x,
                         Strides x_strides, uintptr_t weight, Strides w_strides, uintptr_t lora_a, Strides3 a_strides,
                         uintptr_t lora_b, Strides3 b_strides, uintptr_t adapter_ids, bool ids_int64,
                         uintptr_t scalings, uintptr_t ranks, uintptr_t s, uintptr_t grad_x, Strides gx_strides,
                         uintptr_t grad_a, uintptr_t grad_b, uintptr_t workspace, int64_t workspace_bytes, int64_t M,
                         int64_t N, int64_t K, int64_t L, int64_t R, int path, int device, uintptr_t stream,
                         uintptr_t perm, uintptr_t bounds, uintptr_t tiles, int64_t n_tiles) {
  check_dtypes(dtype, adapter_dtype);
  check_multi_sizes(M, N, K, L, R);
  check_path(path);
  RawMultiBackward args{};
  args.grad_y = matrix("grad_y", grad_y, gy_strides, M, N);
  args.x = matrix("x", x, x_strides, M, K);
  args.weight = matrix("weight", weight, w_strides, N, K);
  args.grad_x = RawMatrix{grad_x, std::get<0>(gx_strides), std::get<1>(gx_strides)};  // 0: no dX
  args.lora_a = tensor3("lora_a", lora_a, a_strides, L, R, K);
  args.lora_b = tensor3("lora_b", lora_b, b_strides, L, N, R);
  require_address("adapter_ids", adapter_ids, M);
  require_address("scalings", scalings, L);
  require_address("ranks", ranks, L);
  require_address("s", s, M * R);
  require_address("grad_a", grad_a, L * R * K);
  require_address("grad_b", grad_b, L * N * R);
  check_workspace(workspace, workspace_bytes, peftkern_ext::multi_lora_backward_workspace_bytes(M, N, K, L, R, path),
                  "multi_lora_backward_workspace_bytes");
  args.adapter_ids = adapter_ids;
  args.ids_int64 = ids_int64;
  args.scalings = scalings;
  args.ranks = ranks;
  args.s = s;
  args.grad_a = grad_a;
  args.grad_b = grad_b;
  args.workspace = workspace;
  args.M = M;
  args.N = N;
  args.K = K;
  args.L = L;
  args.R = R;
  args.path = path;
  args.adapter_fp32 = adapter_dtype == peftkern_ext::kFloat32;
  args.segments = segment_table(perm, bounds, tiles, n_tiles, M, L);
  if (M == 0 && L * R * K == 0 && L * N * R == 0) return;
  launch_for_dtype(dtype, device, stream, "multi_lora_backward", args, peftkern_ext::multi_lora_backward_f16,
                   peftkern_ext::multi_lora_backward_bf16, peftkern_ext::multi_lora_backward_f32);
}

void multi_lora_segments(uintptr_t adapter_ids, bool ids_int64, int64_t M, int64_t L, uintptr_t workspace,
                         int64_t workspace_bytes, uintptr_t perm, uintptr_t bounds, uintptr_t tiles, int device,
                         uintptr_t stream) {
  if (M < 0) throw py::value_error("M: expected >= 0, got " + std::to_string(M));
  if (L < 1) throw py::value_error("L: expected at least 1 adapter slot, got " + std::to_string(L));
  require_address("adapter_ids", adapter_ids, M);
  require_address("perm", perm, M);
  require_address("bounds", bounds, 2 * (L + 1));
  require_address("tiles", tiles, 3 * peftkern_ext::multi_lora_segment_tiles(M, L));
  check_workspace(workspace, workspace_bytes, peftkern_ext::multi_lora_segments_workspace_bytes(M, L),
                  "multi_lora_segments_workspace_bytes");
  use_device(device, "multi_lora_segments");
  cudaError_t err;
  {
    py::gil_scoped_release release;
    err = peftkern_ext::multi_lora_segments(adapter_ids, ids_int64, M, L, workspace, perm, bounds, tiles,
                                            reinterpret_cast<cudaStream_t>(stream));
  }
  raise_on_error(err, "multi_lora_segments");
}

int64_t forward_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t L, int path) {
  check_multi_sizes(M, N, K, L, 1);
  check_path(path);
  return peftkern_ext::multi_lora_forward_workspace_bytes(M, N, K, L, path);
}

int64_t backward_workspace_bytes(int64_t M, int64_t N, int64_t K, int64_t L, int64_t R, int path) {
  check_multi_sizes(M, N, K, L, R);
  check_path(path);
  return peftkern_ext::multi_lora_backward_workspace_bytes(M, N, K, L, R, path);
}

int64_t segments_workspace_bytes(int64_t M, int64_t L) {
  check_multi_sizes(M, 0, 0, L, 1);
  return peftkern_ext::multi_lora_segments_workspace_bytes(M, L);
}

int64_t segment_tiles(int64_t M, int64_t L) {
  check_multi_sizes(M, 0, 0, L, 1);
  return peftkern_ext::multi_lora_segment_tiles(M, L);
}

using Slice = std::tuple<uintptr_t, Strides3>;  // (address, strides) of one A_j or B_j

RawLoraServing serving_args(int dtype, int adapter_dtype, const std::vector<Slice>& slices, uintptr_t adapter_ids,
                            bool ids_int64, uintptr_t ranks, uintptr_t s, int64_t M, int64_t L, int64_t R) {
  check_dtypes(dtype, adapter_dtype);
  check_multi_sizes(M, 0, 0, L, R);
  const int64_t n = static_cast<int64_t>(slices.size());
  if (n < 1 || n > peftkern_ext::kMaxLoraSlices) {
    throw py::value_error("slices: expected 1 to " + std::to_string(peftkern_ext::kMaxLoraSlices) + " slices, got " +
                          std::to_string(n));
  }
  require_address("adapter_ids", adapter_ids, M);
  require_address("ranks", ranks, L);
  require_address("s", s, n * M * R);
  RawLoraServing args{};
  args.n_slices = static_cast<int>(n);
  args.adapter_ids = adapter_ids;
  args.ids_int64 = ids_int64;
  args.ranks = ranks;
  args.s = s;
  args.M = M;
  args.L = L;
  args.R = R;
  args.adapter_fp32 = adapter_dtype == peftkern_ext::kFloat32;
  return args;
}

void lora_shrink(int dtype, int adapter_dtype, uintptr_t x, Strides x_strides, const std::vector<Slice>& slices,
                 uintptr_t adapter_ids, bool ids_int64, uintptr_t perm, uintptr_t tiles, int64_t n_tiles,
                 uintptr_t ranks, uintptr_t s, int64_t M, int64_t K, int64_t L, int64_t R, int device,
                 uintptr_t stream) {
  RawLoraServing args = serving_args(dtype, adapter_dtype, slices, adapter_ids, ids_int64, ranks, s, M, L, R);
  if (K < 0) throw py::value_error("K: expected >= 0, got " + std::to_string(K));
  args.x = matrix("x", x, x_strides, M, K);
  args.K = K;
  for (int j = 0; j < args.n_slices; ++j) {
    args.slices[j] = tensor3("slices", std::get<0>(slices[j]), std::get<1>(slices[j]), L, R, K);
  }
  if ((perm == 0) != (tiles == 0)) throw py::value_error("perm, tiles: expected both addresses or neither");
  if (perm != 0) check_n_tiles(n_tiles, M, L);
  args.perm = perm;
  args.tiles = tiles;
  args.n_tiles = n_tiles;
  if (M == 0) return;
  launch_for_dtype(dtype, device, stream, "lora_shrink", args, peftkern_ext::lora_shrink_f16,
                   peftkern_ext::lora_shrink_bf16, peftkern_ext::lora_shrink_f32);
}

void lora_expand_add(int dtype, int adapter_dtype, uintptr_t y, Strides y_strides, uintptr_t s,
                     const std::vector<Slice>& slices, const std::vector<int64_t>& cols, uintptr_t adapter_ids,
                     bool ids_int64, uintptr_t ranks, uintptr_t scalings, int64_t offset, int64_t M, int64_t L,
                     int64_t R, int device, uintptr_t stream) {
  RawLoraServing args = serving_args(dtype, adapter_dtype, slices, adapter_ids, ids_int64, ranks, s, M, L, R);
  if (cols.size() != slices.size()) {
    throw py::value_error("cols: expected one width per slice (" + std::to_string(slices.size()) + "), got " +
                          std::to_string(cols.size()));
  }
  if (offset < 0) throw py::value_error("offset: expected >= 0, got " + std::to_string(offset));
  int64_t width = offset;
  for (int j = 0; j < args.n_slices; ++j) {
    if (cols[j] < 0) throw py::value_error("cols: expected widths >= 0, got " + std::to_string(cols[j]));
    args.slices[j] = tensor3("slices", std::get<0>(slices[j]), std::get<1>(slices[j]), L, cols[j], R);
    args.cols[j] = cols[j];
    width += cols[j];
  }
  require_address("scalings", scalings, L);
  args.y = matrix("y", y, y_strides, M, width);
  args.scalings = scalings;
  args.offset = offset;
  if (M == 0 || width == offset) return;
  launch_for_dtype(dtype, device, stream, "lora_expand_add", args, peftkern_ext::lora_expand_add_f16,
                   peftkern_ext::lora_expand_add_bf16, peftkern_ext::lora_expand_add_f32);
}

}  // namespace

void bind_multi_lora(py::module_& m) {
  m.def("multi_lora_forward", &multi_lora_forward,
        "y[t] = x[t] W^T + b + s_i (x[t] A[i]^T) B[i]^T with i = adapter_ids[t]; writes s = [M, R] fp32",
        py::arg("dtype"), py::arg("adapter_dtype"), py::arg("x"), py::arg("x_strides"), py::arg("weight"),
        py::arg("weight_strides"), py::arg("bias"), py::arg("bias_stride"), py::arg("lora_a"),
        py::arg("lora_a_strides"), py::arg("lora_b"), py::arg("lora_b_strides"), py::arg("adapter_ids"),
        py::arg("ids_int64"), py::arg("scalings"), py::arg("ranks"), py::arg("s"), py::arg("y"), py::arg("y_strides"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("L"),
        py::arg("R"), py::arg("path"), py::arg("device"), py::arg("stream"), py::arg("perm") = 0,
        py::arg("bounds") = 0, py::arg("tiles") = 0, py::arg("n_tiles") = 0);
  m.def("multi_lora_backward", &multi_lora_backward,
        "dX (if grad_x != 0), dA, dB of the multi-LoRA linear (per-adapter sums in a fixed order)", py::arg("dtype"),
        py::arg("adapter_dtype"), py::arg("grad_y"), py::arg("grad_y_strides"), py::arg("x"), py::arg("x_strides"),
        py::arg("weight"), py::arg("weight_strides"), py::arg("lora_a"), py::arg("lora_a_strides"),
        py::arg("lora_b"), py::arg("lora_b_strides"), py::arg("adapter_ids"), py::arg("ids_int64"),
        py::arg("scalings"), py::arg("ranks"), py::arg("s"), py::arg("grad_x"), py::arg("grad_x_strides"),
        py::arg("grad_a"), py::arg("grad_b"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("L"), py::arg("R"), py::arg("path"), py::arg("device"),
        py::arg("stream"), py::arg("perm") = 0, py::arg("bounds") = 0, py::arg("tiles") = 0, py::arg("n_tiles") = 0);
  m.def("multi_lora_segments", &multi_lora_segments,
        "the segment table of adapter_ids (perm [M], bounds [2, L + 1], tiles [3, n_tiles], int64), on the device",
        py::arg("adapter_ids"), py::arg("ids_int64"), py::arg("M"), py::arg("L"), py::arg("workspace"),
        py::arg("workspace_bytes"), py::arg("perm"), py::arg("bounds"), py::arg("tiles"), py::arg("device"),
        py::arg("stream"));
  m.def("multi_lora_forward_workspace_bytes", &forward_workspace_bytes,
        "workspace bytes multi_lora_forward needs", py::arg("M"), py::arg("N"), py::arg("K"), py::arg("L"),
        py::arg("path"));
  m.def("multi_lora_backward_workspace_bytes", &backward_workspace_bytes, "workspace bytes multi_lora_backward needs",
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("L"), py::arg("R"), py::arg("path"));
  m.def("multi_lora_segments_workspace_bytes", &segments_workspace_bytes,
        "workspace bytes multi_lora_segments needs", py::arg("M"), py::arg("L"));
  m.def("multi_lora_segment_tiles", &segment_tiles, "length of the segment tile table: cdiv(M, 64) + min(L + 1, M)",
        py::arg("M"), py::arg("L"));
  m.def("lora_shrink", &lora_shrink,
        "s[j] = x A_j[i]^T for each slice j (up to 8) with i = adapter_ids[t]; s = [n, M, R] fp32, zero past ranks",
        py::arg("dtype"), py::arg("adapter_dtype"), py::arg("x"), py::arg("x_strides"), py::arg("slices"),
        py::arg("adapter_ids"), py::arg("ids_int64"), py::arg("perm"), py::arg("tiles"), py::arg("n_tiles"),
        py::arg("ranks"), py::arg("s"), py::arg("M"), py::arg("K"), py::arg("L"), py::arg("R"), py::arg("device"),
        py::arg("stream"));
  m.def("lora_expand_add", &lora_expand_add,
        "y[t, o_j : o_j + N_j] += scalings[i] s[j, t] B_j[i]^T for each slice j (up to 8), in place",
        py::arg("dtype"), py::arg("adapter_dtype"), py::arg("y"), py::arg("y_strides"), py::arg("s"),
        py::arg("slices"), py::arg("cols"), py::arg("adapter_ids"), py::arg("ids_int64"), py::arg("ranks"),
        py::arg("scalings"), py::arg("offset"), py::arg("M"), py::arg("L"), py::arg("R"), py::arg("device"),
        py::arg("stream"));
  m.attr("MULTI_LORA_DECODE_MAX_ROWS") = peftkern_ext::kMultiLoraDecodeMaxRows;
  m.attr("MULTI_LORA_SEGMENT_ROWS") = peftkern_ext::kMultiLoraSegmentRows;
}

}  // namespace peftkern_bind
