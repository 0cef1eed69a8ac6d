// peftkern._C: the prompt_concat / prefix_kv entry points. Tensors arrive as data addresses with strides in
// elements; ids as (address, strides, element bytes); every argument is checked here (ValueError naming it)
// before any launch.
#include <cstdint>
#include <string>
#include <tuple>

#include "bindings_common.h"
#include "prompt_api.h"

namespace peftkern_bind {

namespace {

using peftkern_ext::RawElements;
using Strides3 = std::tuple<int64_t, int64_t, int64_t>;
using Strides5 = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>;

void check_dtype(int dtype) { check_dtypes(dtype, dtype); }

// The dtype of prompts / dprompts beside a table of `dtype`: the same, or float32.
bool second_dtype_fp32(const char* name, int dtype, int other) {
  check_dtypes(dtype, dtype);
  if (other != dtype && other != peftkern_ext::kFloat32) {
    throw py::value_error(std::string(name) + ": expected the table's dtype (" + dtype_name(dtype) +
                          ") or float32, got code " + std::to_string(other));
  }
  return other == peftkern_ext::kFloat32 && dtype != peftkern_ext::kFloat32;
}

void check_nonnegative(const char* name, int64_t value) {
  if (value < 0) throw py::value_error(std::string(name) + ": expected a size >= 0, got " + std::to_string(value));
}

void check_positive(const char* name, int64_t value) {
  if (value < 1) throw py::value_error(std::string(name) + ": expected a size >= 1, got " + std::to_string(value));
}

RawElements id_elements(const char* name, uintptr_t data, int64_t stride0, int64_t stride1, int bytes,
                        int64_t count) {
  if (bytes != 4 && bytes != 8) {
    throw py::value_error(std::string(name) + ": expected int32 or int64 ids (element bytes 4 or 8), got " +
                          std::to_string(bytes));
  }
  require_address(name, data, count);
  return RawElements{data, stride0, stride1, bytes};
}

void check_element_bytes(const char* name, int bytes) {
  if (bytes != 1 && bytes != 2 && bytes != 4 && bytes != 8) {
    throw py::value_error(std::string(name) + ": expected an element size of 1, 2, 4 or 8 bytes, got " +
                          std::to_string(bytes));
  }
}

void check_columns(int64_t C, int64_t inner1, int64_t inner0) {
  check_positive("inner1", inner1);
  check_positive("inner0", inner0);
  if (C % (inner1 * inner0) != 0) {
    throw py::value_error("C: expected a multiple of inner1 * inner0 = " + std::to_string(inner1 * inner0) + ", got " +
                          std::to_string(C));
  }
}

void prompt_concat_forward(int dtype, int prompts_dtype, uintptr_t input_ids, Strides input_ids_strides,
                           int input_ids_bytes, uintptr_t prompt_ids, int64_t prompt_ids_stride, int prompt_ids_bytes,
                           uintptr_t embed, Strides embed_strides, uintptr_t prompts, Strides3 prompts_strides,
                           uintptr_t out, Strides3 out_strides, uintptr_t mask, Strides mask_strides, int mask_bytes,
                           uint64_t mask_one, uintptr_t mask_out, uintptr_t labels, Strides labels_strides,
                           int labels_bytes, uint64_t label_fill, uintptr_t labels_out, int64_t B, int64_t T, int64_t n,
                           int64_t D, int64_t V, int64_t P, int device, uintptr_t stream) {
  peftkern_ext::RawPromptConcat a{};
  a.prompts_fp32 = second_dtype_fp32("prompts_dtype", dtype, prompts_dtype);
  check_nonnegative("B", B);
  check_nonnegative("T", T);
  check_positive("n", n);
  check_nonnegative("D", D);
  check_nonnegative("V", V);
  check_positive("P", P);
  const int64_t rows = B * (n + T);
  a.input_ids = id_elements("input_ids", input_ids, std::get<0>(input_ids_strides), std::get<1>(input_ids_strides),
                            input_ids_bytes, B * T);
  a.prompt_ids = id_elements("prompt_ids", prompt_ids, prompt_ids_stride, 0, prompt_ids_bytes, B);
  require_address("embed", embed, V * D);
  require_address("prompts", prompts, P * n * D);
  require_address("out", out, rows * D);
  check_element_bytes("mask_bytes", mask_bytes);
  require_address("mask_out", mask_out, rows);
  a.mask = RawElements{mask, std::get<0>(mask_strides), std::get<1>(mask_strides), mask_bytes};
  if (labels != 0 || labels_out != 0) {  // labels given (a [B, 0] tensor may have address 0)
    if (labels_bytes != 4 && labels_bytes != 8) {
      throw py::value_error("labels_bytes: expected int32 or int64 labels (4 or 8), got " +
                            std::to_string(labels_bytes));
    }
    require_address("labels", labels, B * T);
    require_address("labels_out", labels_out, rows);
  }
  a.labels = RawElements{labels, std::get<0>(labels_strides), std::get<1>(labels_strides), labels_bytes};
  a.embed = embed;
  a.embed_strides[0] = std::get<0>(embed_strides);
  a.embed_strides[1] = std::get<1>(embed_strides);
  a.prompts = prompts;
  a.prompts_strides[0] = std::get<0>(prompts_strides);
  a.prompts_strides[1] = std::get<1>(prompts_strides);
  a.prompts_strides[2] = std::get<2>(prompts_strides);
  a.out = out;
  a.out_strides[0] = std::get<0>(out_strides);
  a.out_strides[1] = std::get<1>(out_strides);
  a.out_strides[2] = std::get<2>(out_strides);
  a.mask_out = mask_out;
  a.mask_bytes = mask_bytes;
  a.mask_one = mask_one;
  a.labels_out = labels_out;
  a.label_fill = label_fill;
  a.B = B;
  a.T = T;
  a.n = n;
  a.D = D;
  a.V = V;
  a.P = P;
  if (rows == 0) return;
  launch_for_dtype(dtype, device, stream, "prompt_concat_forward", a, peftkern_ext::prompt_concat_forward_f16,
                   peftkern_ext::prompt_concat_forward_bf16, peftkern_ext::prompt_concat_forward_f32);
}

int64_t task_sum_workspace_floats(int64_t B, int64_t P, int64_t n, int64_t C) {
  check_nonnegative("B", B);
  check_nonnegative("P", P);
  check_nonnegative("n", n);
  check_nonnegative("C", C);
  return peftkern_ext::prompt_task_sum_workspace_floats(B, P, n, C);
}

void prompt_task_sum(int dtype, int out_dtype, uintptr_t grad, Strides5 grad_strides, uintptr_t prompt_ids,
                     int64_t prompt_ids_stride, int prompt_ids_bytes, uintptr_t out, uintptr_t workspace,
                     int64_t workspace_floats, int64_t B, int64_t P, int64_t n, int64_t C, int64_t inner1,
                     int64_t inner0, int device, uintptr_t stream) {
  peftkern_ext::RawTaskSum a{};
  a.out_fp32 = second_dtype_fp32("out_dtype", dtype, out_dtype);
  check_nonnegative("B", B);
  check_nonnegative("P", P);
  check_nonnegative("n", n);
  check_nonnegative("C", C);
  check_columns(C, inner1, inner0);
  a.prompt_ids = id_elements("prompt_ids", prompt_ids, prompt_ids_stride, 0, prompt_ids_bytes, B);
  require_address("grad", grad, B * n * C);
  require_address("out", out, P * n * C);
  const int64_t needed = peftkern_ext::prompt_task_sum_workspace_floats(B, P, n, C);
  if (workspace_floats < needed) {
    throw py::value_error("workspace: expected at least " + std::to_string(needed) +
                          " floats (prompt_task_sum_workspace_floats), got " + std::to_string(workspace_floats));
  }
  require_address("workspace", workspace, needed);
  a.grad = grad;
  a.strides[0] = std::get<0>(grad_strides);
  a.strides[1] = std::get<1>(grad_strides);
  a.strides[2] = std::get<2>(grad_strides);
  a.strides[3] = std::get<3>(grad_strides);
  a.strides[4] = std::get<4>(grad_strides);
  a.out = out;
  a.workspace = workspace;
  a.B = B;
  a.P = P;
  a.n = n;
  a.C = C;
  a.inner1 = inner1;
  a.inner0 = inner0;
  if (P * n * C == 0) return;
  launch_for_dtype(dtype, device, stream, "prompt_task_sum", a, peftkern_ext::prompt_task_sum_f16,
                   peftkern_ext::prompt_task_sum_bf16, peftkern_ext::prompt_task_sum_f32);
}

void prompt_embed_grad(int dtype, uintptr_t grad, Strides3 grad_strides, uintptr_t order, uintptr_t starts,
                       uintptr_t out, int64_t B, int64_t T, int64_t n, int64_t D, int64_t V, int device,
                       uintptr_t stream) {
  check_dtype(dtype);
  check_nonnegative("B", B);
  check_nonnegative("T", T);
  check_nonnegative("n", n);
  check_nonnegative("D", D);
  check_nonnegative("V", V);
  require_address("grad", grad, B * T * D);
  require_address("order", order, B * T);
  require_address("starts", starts, V > 0 ? V + 1 : 0);
  require_address("out", out, V * D);
  peftkern_ext::RawEmbedGrad a{};
  a.grad = grad;
  a.strides[0] = std::get<0>(grad_strides);
  a.strides[1] = std::get<1>(grad_strides);
  a.strides[2] = std::get<2>(grad_strides);
  a.order = order;
  a.starts = starts;
  a.out = out;
  a.B = B;
  a.T = T;
  a.n = n;
  a.D = D;
  a.V = V;
  if (V * D == 0) return;
  launch_for_dtype(dtype, device, stream, "prompt_embed_grad", a, peftkern_ext::prompt_embed_grad_f16,
                   peftkern_ext::prompt_embed_grad_bf16, peftkern_ext::prompt_embed_grad_f32);
}

void prefix_kv_forward(int dtype, uintptr_t prefix, Strides3 prefix_strides, uintptr_t prompt_ids,
                       int64_t prompt_ids_stride, int prompt_ids_bytes, uintptr_t out, Strides5 out_strides, int64_t B,
                       int64_t P, int64_t n, int64_t C, int64_t inner1, int64_t inner0, int device, uintptr_t stream) {
  check_dtype(dtype);
  check_nonnegative("B", B);
  check_positive("P", P);
  check_positive("n", n);
  check_nonnegative("C", C);
  check_columns(C, inner1, inner0);
  peftkern_ext::RawPrefixKv a{};
  a.prompt_ids = id_elements("prompt_ids", prompt_ids, prompt_ids_stride, 0, prompt_ids_bytes, B);
  require_address("prefix", prefix, P * n * C);
  require_address("out", out, B * n * C);
  a.prefix = prefix;
  a.prefix_strides[0] = std::get<0>(prefix_strides);
  a.prefix_strides[1] = std::get<1>(prefix_strides);
  a.prefix_strides[2] = std::get<2>(prefix_strides);
  a.out = out;
  a.out_strides[0] = std::get<0>(out_strides);
  a.out_strides[1] = std::get<1>(out_strides);
  a.out_strides[2] = std::get<2>(out_strides);
  a.out_strides[3] = std::get<3>(out_strides);
  a.out_strides[4] = std::get<4>(out_strides);
  a.B = B;
  a.P = P;
  a.n = n;
  a.C = C;
  a.inner1 = inner1;
  a.inner0 = inner0;
  if (B * n * C == 0) return;
  launch_for_dtype(dtype, device, stream, "prefix_kv_forward", a, peftkern_ext::prefix_kv_forward_f16,
                   peftkern_ext::prefix_kv_forward_bf16, peftkern_ext::prefix_kv_forward_f32);
}

}  // namespace

void bind_prompt(py::module_& m) {
  m.def("prompt_concat_forward", &prompt_concat_forward,
        "inputs_embeds [B, n+T, D], the extended mask and labels of prompt tuning in one launch", py::arg("dtype"),
        py::arg("prompts_dtype"), py::arg("input_ids"), py::arg("input_ids_strides"), py::arg("input_ids_bytes"),
        py::arg("prompt_ids"), py::arg("prompt_ids_stride"), py::arg("prompt_ids_bytes"), py::arg("embed"),
        py::arg("embed_strides"), py::arg("prompts"), py::arg("prompts_strides"), py::arg("out"),
        py::arg("out_strides"), py::arg("mask"), py::arg("mask_strides"), py::arg("mask_bytes"), py::arg("mask_one"),
        py::arg("mask_out"), py::arg("labels"), py::arg("labels_strides"), py::arg("labels_bytes"),
        py::arg("label_fill"), py::arg("labels_out"), py::arg("B"), py::arg("T"), py::arg("n"), py::arg("D"),
        py::arg("V"), py::arg("P"), py::arg("device"), py::arg("stream"));
  m.def("prompt_task_sum_workspace_floats", &task_sum_workspace_floats,
        "fp32 workspace elements prompt_task_sum needs (0 when it does not split the batch)", py::arg("B"),
        py::arg("P"), py::arg("n"), py::arg("C"));
  m.def("prompt_task_sum", &prompt_task_sum,
        "out[p, j, c] = sum over rows b with prompt_ids[b] == p of grad[b, j, c] (fixed order)", py::arg("dtype"),
        py::arg("out_dtype"), py::arg("grad"), py::arg("grad_strides"), py::arg("prompt_ids"),
        py::arg("prompt_ids_stride"), py::arg("prompt_ids_bytes"), py::arg("out"), py::arg("workspace"),
        py::arg("workspace_floats"), py::arg("B"), py::arg("P"), py::arg("n"), py::arg("C"), py::arg("inner1"),
        py::arg("inner0"), py::arg("device"), py::arg("stream"));
  m.def("prompt_embed_grad", &prompt_embed_grad,
        "out[v] = sum of grad[b, n + t] over the positions holding id v (stably sorted order + segment starts)",
        py::arg("dtype"), py::arg("grad"), py::arg("grad_strides"), py::arg("order"), py::arg("starts"),
        py::arg("out"), py::arg("B"), py::arg("T"), py::arg("n"), py::arg("D"), py::arg("V"), py::arg("device"),
        py::arg("stream"));
  m.def("prefix_kv_forward", &prefix_kv_forward,
        "each row's prefix for every layer, [P, n, C] table gathered into the cache layout", py::arg("dtype"),
        py::arg("prefix"), py::arg("prefix_strides"), py::arg("prompt_ids"), py::arg("prompt_ids_stride"),
        py::arg("prompt_ids_bytes"), py::arg("out"), py::arg("out_strides"), py::arg("B"), py::arg("P"),
        py::arg("n"), py::arg("C"), py::arg("inner1"), py::arg("inner0"), py::arg("device"), py::arg("stream"));
}

}  // namespace peftkern_bind
