// peftkern._C: the multi-LoRA entry points (csrc/include/peftkern/multi_lora.cuh). Arguments are checked
// here (ValueError naming the argument) before any launch; tensors arrive as addresses, strides and sizes.
#include <cstdint>
#include <string>
#include <tuple>

#include "bindings_common.h"
#include "multi_lora_api.h"

namespace peftkern_bind {

namespace {

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

void multi_lora_forward(int dtype, int adapter_dtype, uintptr_t x, Strides x_strides, uintptr_t weight,
                        Strides w_strides, uintptr_t bias, int64_t bias_stride, uintptr_t lora_a, Strides3 a_strides,
                        uintptr_t lora_b, Strides3 b_strides, uintptr_t adapter_ids, bool ids_int64,
                        uintptr_t scalings, uintptr_t ranks, uintptr_t s, uintptr_t y, Strides y_strides,
                        uintptr_t workspace, int64_t workspace_bytes, int64_t M, int64_t N, int64_t K, int64_t L,
                        int64_t R, int path, int device, uintptr_t stream) {
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
  if (M == 0) return;
  launch_for_dtype(dtype, device, stream, "multi_lora_forward", args, peftkern_ext::multi_lora_forward_f16,
                   peftkern_ext::multi_lora_forward_bf16, peftkern_ext::multi_lora_forward_f32);
}

void multi_lora_backward(int dtype, int adapter_dtype, uintptr_t grad_y, Strides gy_strides, uintptr_t x,
                         Strides x_strides, uintptr_t weight, Strides w_strides, uintptr_t lora_a, Strides3 a_strides,
                         uintptr_t lora_b, Strides3 b_strides, uintptr_t adapter_ids, bool ids_int64,
                         uintptr_t scalings, uintptr_t ranks, uintptr_t s, uintptr_t grad_x, Strides gx_strides,
                         uintptr_t grad_a, uintptr_t grad_b, uintptr_t workspace, int64_t workspace_bytes, int64_t M,
                         int64_t N, int64_t K, int64_t L, int64_t R, int path, int device, uintptr_t stream) {
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

}  // namespace

void bind_multi_lora(py::module_& m) {
  m.def("multi_lora_forward", &multi_lora_forward,
        "y[t] = x[t] W^T + b + s_i (x[t] A[i]^T) B[i]^T with i = adapter_ids[t]; writes s = [M, R] fp32",
        py::arg("dtype"), py::arg("adapter_dtype"), py::arg("x"), py::arg("x_strides"), py::arg("weight"),
        py::arg("weight_strides"), py::arg("bias"), py::arg("bias_stride"), py::arg("lora_a"),
        py::arg("lora_a_strides"), py::arg("lora_b"), py::arg("lora_b_strides"), py::arg("adapter_ids"),
        py::arg("ids_int64"), py::arg("scalings"), py::arg("ranks"), py::arg("s"), py::arg("y"), py::arg("y_strides"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("L"),
        py::arg("R"), py::arg("path"), py::arg("device"), py::arg("stream"));
  m.def("multi_lora_backward", &multi_lora_backward,
        "dX (if grad_x != 0), dA, dB of the multi-LoRA linear (per-adapter sums in a fixed order)", py::arg("dtype"),
        py::arg("adapter_dtype"), py::arg("grad_y"), py::arg("grad_y_strides"), py::arg("x"), py::arg("x_strides"),
        py::arg("weight"), py::arg("weight_strides"), py::arg("lora_a"), py::arg("lora_a_strides"),
        py::arg("lora_b"), py::arg("lora_b_strides"), py::arg("adapter_ids"), py::arg("ids_int64"),
        py::arg("scalings"), py::arg("ranks"), py::arg("s"), py::arg("grad_x"), py::arg("grad_x_strides"),
        py::arg("grad_a"), py::arg("grad_b"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("L"), py::arg("R"), py::arg("path"), py::arg("device"),
        py::arg("stream"));
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
  m.attr("MULTI_LORA_DECODE_MAX_ROWS") = peftkern_ext::kMultiLoraDecodeMaxRows;
  m.attr("MULTI_LORA_SEGMENT_ROWS") = peftkern_ext::kMultiLoraSegmentRows;
}

}  // namespace peftkern_bind
