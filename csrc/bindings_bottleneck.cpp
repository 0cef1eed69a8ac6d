// peftkern._C: the bottleneck adapter entry points (kernels: peftkern/bottleneck.cuh). Arguments are checked
// here (ValueError naming the argument) before any launch; outputs and workspaces are the caller's (torch).
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>

#include "bindings_common.h"
#include "bottleneck_api.h"

namespace peftkern_bind {

namespace {

using peftkern_ext::RawBottleneckBackward;
using peftkern_ext::RawBottleneckForward;
using peftkern_ext::RawStacked;
using Strides3 = std::tuple<int64_t, int64_t, int64_t>;

constexpr int kActivationCount = 5;  // peftkern::BottleneckActivation: relu, gelu, gelu_tanh, silu, tanh

void check_bottleneck_sizes(int64_t M, int64_t D, int64_t NB, int64_t L, int activation) {
  if (M < 0) throw py::value_error("M: expected rows >= 0, got " + std::to_string(M));
  if (D < 1) throw py::value_error("D: expected a model dimension >= 1, got " + std::to_string(D));
  if (NB < 1) throw py::value_error("NB: expected a bottleneck size >= 1, got " + std::to_string(NB));
  if (L < 1) throw py::value_error("L: expected at least one adapter, got " + std::to_string(L));
  if (activation < 0 || activation >= kActivationCount) {
    throw py::value_error(
        "activation: expected a code in {0: relu, 1: gelu, 2: gelu_tanh, 3: silu, 4: tanh}, got " +
        std::to_string(activation));
  }
}

RawStacked stacked(const char* name, uintptr_t data, const Strides3& strides, int64_t L, int64_t rows,
                   int64_t cols) {
  require_address(name, data, L * rows * cols);
  return RawStacked{data, std::get<0>(strides), std::get<1>(strides), std::get<2>(strides)};
}

// 0 (no ids) or the address of [M] ids of `ids_bits` bits.
bool ids_are_int32(uintptr_t adapter_ids, int ids_bits) {
  if (adapter_ids == 0) return false;
  if (ids_bits != 32 && ids_bits != 64) {
    throw py::value_error("adapter_ids_bits: expected 32 (int32 ids) or 64 (int64 ids), got " +
                          std::to_string(ids_bits));
  }
  return ids_bits == 32;
}

void bottleneck_forward(int dtype, int adapter_dtype, uintptr_t x, Strides x_strides, uintptr_t down_weight,
                        Strides3 dw_strides, uintptr_t down_bias, Strides db_strides, uintptr_t up_weight,
                        Strides3 uw_strides, uintptr_t up_bias, Strides ub_strides, uintptr_t residual,
                        Strides res_strides, uintptr_t adapter_ids, int adapter_ids_bits, uintptr_t h,
                        uintptr_t act, uintptr_t y, Strides y_strides, int64_t M, int64_t D, int64_t NB, int64_t L,
                        int activation, float scaling, int device, uintptr_t stream) {
  check_dtypes(dtype, adapter_dtype);
  check_bottleneck_sizes(M, D, NB, L, activation);
  if (!std::isfinite(scaling)) throw py::value_error("scaling: expected a finite number, got " + std::to_string(scaling));
  RawBottleneckForward args{};
  args.x = matrix("x", x, x_strides, M, D);
  args.y = matrix("y", y, y_strides, M, D);
  args.down_weight = stacked("down_weight", down_weight, dw_strides, L, NB, D);
  args.up_weight = stacked("up_weight", up_weight, uw_strides, L, D, NB);
  args.down_bias = RawMatrix{down_bias, std::get<0>(db_strides), std::get<1>(db_strides)};  // 0: none
  args.up_bias = RawMatrix{up_bias, std::get<0>(ub_strides), std::get<1>(ub_strides)};
  args.residual = RawMatrix{residual, std::get<0>(res_strides), std::get<1>(res_strides)};  // 0: x
  args.ids_int32 = ids_are_int32(adapter_ids, adapter_ids_bits);
  args.adapter_ids = adapter_ids;
  require_address("h", h, M * NB);
  require_address("act", act, M * NB);
  args.h = h;
  args.act = act;
  args.M = M;
  args.D = D;
  args.NB = NB;
  args.L = L;
  args.activation = activation;
  args.scaling = scaling;
  args.adapter_fp32 = adapter_dtype == peftkern_ext::kFloat32;
  if (M == 0) return;
  launch_for_dtype(dtype, device, stream, "bottleneck_forward", args, peftkern_ext::bottleneck_forward_f16,
                   peftkern_ext::bottleneck_forward_bf16, peftkern_ext::bottleneck_forward_f32);
}

int64_t workspace_floats(int64_t M, int64_t D, int64_t NB, int64_t L) {
  check_bottleneck_sizes(M, D, NB, L, 0);
  return peftkern_ext::bottleneck_backward_workspace_floats(M, D, NB, L);
}

void bottleneck_backward(int dtype, int adapter_dtype, uintptr_t grad_y, Strides gy_strides, uintptr_t x,
                         Strides x_strides, uintptr_t down_weight, Strides3 dw_strides, uintptr_t up_weight,
                         Strides3 uw_strides, uintptr_t h, uintptr_t adapter_ids, int adapter_ids_bits,
                         uintptr_t order, uintptr_t segments, uintptr_t grad_x, Strides gx_strides, bool add_grad_y,
                         uintptr_t grad_down_weight, uintptr_t grad_down_bias, uintptr_t grad_up_weight,
                         uintptr_t grad_up_bias, uintptr_t dh, uintptr_t workspace, int64_t workspace_floats, int64_t M,
                         int64_t D, int64_t NB, int64_t L, int activation, float scaling, int device,
                         uintptr_t stream) {
  check_dtypes(dtype, adapter_dtype);
  check_bottleneck_sizes(M, D, NB, L, activation);
  if (!std::isfinite(scaling)) throw py::value_error("scaling: expected a finite number, got " + std::to_string(scaling));
  RawBottleneckBackward args{};
  args.grad_y = matrix("grad_y", grad_y, gy_strides, M, D);
  args.x = matrix("x", x, x_strides, M, D);
  args.grad_x = RawMatrix{grad_x, std::get<0>(gx_strides), std::get<1>(gx_strides)};  // 0: no dX
  args.down_weight = stacked("down_weight", down_weight, dw_strides, L, NB, D);
  args.up_weight = stacked("up_weight", up_weight, uw_strides, L, D, NB);
  require_address("h", h, M * NB);
  require_address("dh", dh, M * NB);
  args.ids_int32 = ids_are_int32(adapter_ids, adapter_ids_bits);
  const bool need_weights = grad_down_weight != 0 || grad_up_weight != 0;
  if (need_weights) {
    if (grad_down_weight == 0 || grad_up_weight == 0) {
      throw py::value_error(std::string(grad_down_weight == 0 ? "grad_down_weight" : "grad_up_weight") +
                            ": expected an address (the two weight gradients are computed together), got 0");
    }
    if (adapter_ids != 0) {
      require_address("order", order, M);
      require_address("segments", segments, L + 1);
    }
    const int64_t needed = M > 0 ? peftkern_ext::bottleneck_backward_workspace_floats(M, D, NB, L) : 0;
    if (workspace_floats < needed) {
      throw py::value_error("workspace: expected at least " + std::to_string(needed) +
                            " floats (bottleneck_backward_workspace_floats), got " + std::to_string(workspace_floats));
    }
    require_address("workspace", workspace, needed);
  } else if (grad_down_bias != 0 || grad_up_bias != 0) {
    throw py::value_error("grad_down_bias, grad_up_bias: bias gradients come with the weight gradients "
                          "(grad_down_weight and grad_up_weight), which are 0");
  }
  args.h = h;
  args.adapter_ids = adapter_ids;
  args.order = order;
  args.segments = segments;
  args.add_grad_y = add_grad_y;
  args.grad_down_weight = grad_down_weight;
  args.grad_down_bias = grad_down_bias;
  args.grad_up_weight = grad_up_weight;
  args.grad_up_bias = grad_up_bias;
  args.dh = dh;
  args.workspace = workspace;
  args.M = M;
  args.D = D;
  args.NB = NB;
  args.L = L;
  args.activation = activation;
  args.scaling = scaling;
  args.adapter_fp32 = adapter_dtype == peftkern_ext::kFloat32;
  if (M == 0 && !need_weights) return;
  launch_for_dtype(dtype, device, stream, "bottleneck_backward", args, peftkern_ext::bottleneck_backward_f16,
                   peftkern_ext::bottleneck_backward_bf16, peftkern_ext::bottleneck_backward_f32);
}

}  // namespace

void bind_bottleneck(py::module_& m) {
  m.def("bottleneck_forward", &bottleneck_forward,
        "y = residual + scaling * (act(x Wd[id]^T + bd[id]) Wu[id]^T + bu[id]); writes h = [M, Bn] fp32",
        py::arg("dtype"), py::arg("adapter_dtype"), py::arg("x"), py::arg("x_strides"), py::arg("down_weight"),
        py::arg("down_weight_strides"), py::arg("down_bias"), py::arg("down_bias_strides"), py::arg("up_weight"),
        py::arg("up_weight_strides"), py::arg("up_bias"), py::arg("up_bias_strides"), py::arg("residual"),
        py::arg("residual_strides"), py::arg("adapter_ids"), py::arg("adapter_ids_bits"), py::arg("h"),
        py::arg("act"), py::arg("y"), py::arg("y_strides"), py::arg("M"), py::arg("D"), py::arg("NB"), py::arg("L"),
        py::arg("activation"), py::arg("scaling"), py::arg("device"), py::arg("stream"));
  m.def("bottleneck_backward", &bottleneck_backward,
        "dX (if grad_x != 0) and the adapter gradients (if grad_down_weight != 0) of the bottleneck adapter",
        py::arg("dtype"), py::arg("adapter_dtype"), py::arg("grad_y"), py::arg("grad_y_strides"), py::arg("x"),
        py::arg("x_strides"), py::arg("down_weight"), py::arg("down_weight_strides"), py::arg("up_weight"),
        py::arg("up_weight_strides"), py::arg("h"), py::arg("adapter_ids"), py::arg("adapter_ids_bits"),
        py::arg("order"), py::arg("segments"), py::arg("grad_x"), py::arg("grad_x_strides"), py::arg("add_grad_y"),
        py::arg("grad_down_weight"), py::arg("grad_down_bias"), py::arg("grad_up_weight"), py::arg("grad_up_bias"),
        py::arg("dh"), py::arg("workspace"), py::arg("workspace_floats"), py::arg("M"), py::arg("D"), py::arg("NB"),
        py::arg("L"), py::arg("activation"), py::arg("scaling"), py::arg("device"), py::arg("stream"));
  m.def("bottleneck_backward_workspace_floats", &workspace_floats,
        "fp32 workspace elements bottleneck_backward needs for the adapter gradients", py::arg("M"), py::arg("D"),
        py::arg("NB"), py::arg("L"));
  m.attr("BOTTLENECK_ACTIVATIONS") = py::make_tuple("relu", "gelu", "gelu_tanh", "silu", "tanh");
}

}  // namespace peftkern_bind
