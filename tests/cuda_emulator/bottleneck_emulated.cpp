// Runs peftkern/bottleneck.cuh's launchers (forward and backward) on the CPU emulator (emulate.h) over odd
// shapes, strided layouts, every activation and dtype pairing, per-row adapter ids (with -1 and ids outside
// [0, L)), with and without an explicit residual and biases, and checks every output against a float64 host
// loop. Buffers are allocated to the exact span their strides reach and workspaces are filled with NaN, so
// AddressSanitizer flags any access outside them and an unwritten partial sum shows up as NaN. Prints one
// line per failure and "N cases, F failures"; exit status 1 on any failure.
#include "emulate.h"  // must come first: it redefines the CUDA keywords the header uses

#include <peftkern/bottleneck.cuh>

#include "host_check.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace {

using host_check::expect_close;
using host_check::failures;
using host_check::HostTensor;
using host_check::matrix_strides;

// A [rows, cols] matrix (as a stack of one) in one of the layouts under test.
template <typename T>
HostTensor<T> matrix(int kind, int64_t rows, int64_t cols, float scale, bool fill = true) {
  const auto s = matrix_strides(kind, rows, cols);
  return HostTensor<T>(1, rows, cols, 0, s.s0, s.s1, scale, fill);
}

// A stack [L, rows, cols]: contiguous (kind 0), or each matrix stored transposed (kind 1).
template <typename T>
HostTensor<T> stack(int kind, int64_t L, int64_t rows, int64_t cols, float scale) {
  if (kind == 1) return HostTensor<T>(L, rows, cols, rows * cols, 1, rows, scale);
  return HostTensor<T>(L, rows, cols, rows * cols, cols, 1, scale);
}

double activate(double h, int act) {
  switch (act) {
    case peftkern::kRelu:
      return h < 0 ? 0.0 : h;
    case peftkern::kGelu:
      return 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0)));
    case peftkern::kGeluTanh:
      return 0.5 * h * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (h + 0.044715 * h * h * h)));
    case peftkern::kSilu:
      return h / (1.0 + std::exp(-h));
    default:
      return std::tanh(h);
  }
}

double activate_grad(double h, int act) {
  switch (act) {
    case peftkern::kRelu:
      return h > 0 ? 1.0 : 0.0;
    case peftkern::kGelu:
      return 0.5 * (1.0 + std::erf(h / std::sqrt(2.0))) + h * std::exp(-0.5 * h * h) / std::sqrt(2.0 * M_PI);
    case peftkern::kGeluTanh: {
      const double k = std::sqrt(2.0 / M_PI);
      const double t = std::tanh(k * (h + 0.044715 * h * h * h));
      return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * h * h);
    }
    case peftkern::kSilu: {
      const double s = 1.0 / (1.0 + std::exp(-h));
      return s * (1.0 + h * (1.0 - s));
    }
    default: {
      const double t = std::tanh(h);
      return 1.0 - t * t;
    }
  }
}

const char* kActivationNames[] = {"relu", "gelu", "gelu_tanh", "silu", "tanh"};

enum IdMode { kNoIds = 0, kMixed64 = 1, kMixed32 = 2, kOneAdapter = 3 };

struct Case {
  int64_t M, D, NB, L;
  int activation;
  IdMode ids;
  int x_layout;       // 0 contiguous, 1 column-major, 2 padded rows
  int weight_layout;  // 0 contiguous stacks, 1 transposed
  bool residual, biases, need_dx, need_weights;
};

template <typename T, typename TW>
void run_case(const Case& c) {
  const int64_t M = c.M, D = c.D, NB = c.NB, L = c.L;
  const std::string label = std::string(peftkern::DType<T>::name) + "/" + peftkern::DType<TW>::name +
                            " M=" + std::to_string(M) + " D=" + std::to_string(D) + " Bn=" + std::to_string(NB) +
                            " L=" + std::to_string(L) + " " + kActivationNames[c.activation] +
                            " ids=" + std::to_string(c.ids) + " x_layout=" + std::to_string(c.x_layout) +
                            " w_layout=" + std::to_string(c.weight_layout) + (c.residual ? " residual" : "") +
                            (c.biases ? " biases" : "");
  const float scaling = 0.75f;
  HostTensor<T> x = matrix<T>(c.x_layout, M, D, 1.0f);
  HostTensor<TW> wd = stack<TW>(c.weight_layout, L, NB, D, 0.4f);
  HostTensor<TW> wu = stack<TW>(c.weight_layout, L, D, NB, 0.4f);
  HostTensor<TW> bd(1, L, NB, 0, NB + 1, 1, 0.5f), bu(1, L, D, 0, 1, L, 0.5f);  // padded rows; transposed
  HostTensor<T> res = matrix<T>(2, M, D, 1.0f);
  HostTensor<T> dy = matrix<T>(c.x_layout == 1 ? 2 : 1, M, D, 1.0f);
  HostTensor<T> y = matrix<T>(0, M, D, 0.0f, false), dx = matrix<T>(2, M, D, 0.0f, false);
  HostTensor<TW> gwd(1, L * NB, D, 0, D, 1, 0.0f, false), gwu(1, L * D, NB, 0, NB, 1, 0.0f, false);
  HostTensor<TW> gbd(1, 1, L * NB, 0, 0, 1, 0.0f, false), gbu(1, 1, L * D, 0, 0, 1, 0.0f, false);
  auto poisoned = [](int64_t n) {
    std::unique_ptr<float[]> p(new float[std::max<int64_t>(n, 1)]);
    for (int64_t i = 0; i < std::max<int64_t>(n, 1); ++i) p[i] = NAN;
    return p;
  };
  std::unique_ptr<float[]> h = poisoned(M * NB);
  std::unique_ptr<TW[]> act(new TW[std::max<int64_t>(M * NB, 1)]), dh(new TW[std::max<int64_t>(M * NB, 1)]);
  for (int64_t i = 0; i < std::max<int64_t>(M * NB, 1); ++i) act[i] = dh[i] = peftkern::detail::from_float<TW>(NAN);

  // Ids: mixed cycles through every adapter, -1 and three ids outside [-1, L) (never read as an index).
  std::vector<int64_t> ids64(M > 0 ? M : 1, 0);
  std::vector<int32_t> ids32(M > 0 ? M : 1, 0);
  std::vector<int64_t> adapter(M, 0);  // the reference's view: -1 for no adapter
  for (int64_t m = 0; m < M; ++m) {
    int64_t id = 0;
    if (c.ids == kOneAdapter) id = L - 1;
    if (c.ids == kMixed64 || c.ids == kMixed32) {
      const int64_t cycle = (m + m / 5 + 3) % (L + 4);
      const int64_t outside[] = {-1, L, -7, L + 5};  // L: the first id past the stack
      id = cycle < L ? cycle : outside[cycle - L];
    }
    ids64[m] = id;
    ids32[m] = static_cast<int32_t>(id);
    adapter[m] = (id >= 0 && id < L) ? id : -1;
  }
  if ((c.ids == kMixed64 || c.ids == kMixed32) && M >= 2 * (L + 4)) {  // every adapter must have rows
    for (int64_t l = 0; l < L; ++l)
      if (std::count(adapter.begin(), adapter.end(), l) == 0) {
        ++failures;
        std::printf("FAIL %s: adapter %ld has no rows\n", label.c_str(), long(l));
      }
  }
  peftkern::AdapterIds ids{nullptr, false};
  if (c.ids == kMixed32) ids = {ids32.data(), true};
  if (c.ids == kMixed64 || c.ids == kOneAdapter) ids = {ids64.data(), false};
  // order / segments as adapter_segments builds them: a stable sort by adapter, ids outside [0, L) last.
  std::vector<int64_t> order(M > 0 ? M : 1, 0), segments(L + 2, 0);
  {
    std::vector<int64_t> key(M);
    for (int64_t m = 0; m < M; ++m) key[m] = adapter[m] >= 0 ? adapter[m] : L;
    std::vector<int64_t> rows(M);
    for (int64_t m = 0; m < M; ++m) rows[m] = m;
    std::stable_sort(rows.begin(), rows.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
    std::copy(rows.begin(), rows.end(), order.begin());
    for (int64_t m = 0; m < M; ++m) ++segments[key[m] + 1];
    for (int64_t l = 0; l <= L; ++l) segments[l + 1] += segments[l];
  }

  peftkern::BottleneckForwardArgs<T, TW> fwd{};
  fwd.x = x.view();
  fwd.down_weight = host_check::view3<peftkern::Stacked3D>(wd);
  fwd.down_bias = c.biases ? bd.view() : peftkern::Strided2D<const TW>{nullptr, 0, 0};
  fwd.up_weight = host_check::view3<peftkern::Stacked3D>(wu);
  fwd.up_bias = c.biases ? bu.view() : peftkern::Strided2D<const TW>{nullptr, 0, 0};
  fwd.residual = c.residual ? res.view() : peftkern::Strided2D<const T>{nullptr, 0, 0};
  fwd.adapter_ids = ids;
  fwd.h = h.get();
  fwd.act = act.get();
  fwd.y = y.mut();
  fwd.M = M;
  fwd.D = D;
  fwd.NB = NB;
  fwd.L = L;
  fwd.activation = c.activation;
  fwd.scaling = scaling;
  if (peftkern::launch_bottleneck_forward(fwd, nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL %s: forward launch error\n", label.c_str());
    return;
  }

  const auto plan = peftkern::bottleneck_backward_plan(M, D, NB, L);
  std::unique_ptr<float[]> workspace = poisoned(plan.workspace_floats);
  peftkern::BottleneckBackwardArgs<T, TW> bwd{};
  bwd.grad_y = dy.view();
  bwd.x = x.view();
  bwd.down_weight = host_check::view3<peftkern::Stacked3D>(wd);
  bwd.up_weight = host_check::view3<peftkern::Stacked3D>(wu);
  bwd.h = h.get();
  bwd.adapter_ids = ids;
  bwd.order = order.data();
  bwd.segments = segments.data();
  bwd.grad_x = c.need_dx ? dx.mut() : peftkern::Strided2D<T>{nullptr, 0, 0};
  bwd.add_grad_y = !c.residual;
  bwd.grad_down_weight = c.need_weights ? gwd.data.get() : nullptr;
  bwd.grad_up_weight = c.need_weights ? gwu.data.get() : nullptr;
  bwd.grad_down_bias = c.need_weights && c.biases ? gbd.data.get() : nullptr;
  bwd.grad_up_bias = c.need_weights && c.biases ? gbu.data.get() : nullptr;
  bwd.dh = dh.get();
  bwd.M = M;
  bwd.D = D;
  bwd.NB = NB;
  bwd.L = L;
  bwd.activation = c.activation;
  bwd.scaling = scaling;
  if (peftkern::launch_bottleneck_backward(bwd, workspace.get(), nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL %s: backward launch error\n", label.c_str());
    return;
  }

  // Garbage order and segments (a caller's bug) may give wrong gradients but never an access out of
  // bounds (AddressSanitizer would abort): the kernels clamp both. Written into scratch outputs.
  if (c.need_weights && ids.data != nullptr && M > 0) {
    std::vector<int64_t> bad_order(M), bad_segments(L + 2);
    for (int64_t m = 0; m < M; ++m) bad_order[m] = m % 3 == 0 ? M + 100 : (m % 3 == 1 ? -5 : order[m]);
    for (int64_t l = 0; l < L + 2; ++l) bad_segments[l] = l % 2 == 0 ? M + 50 - l : -3 - l;
    HostTensor<TW> scratch_wd(1, L * NB, D, 0, D, 1, 0.0f, false), scratch_wu(1, L * D, NB, 0, NB, 1, 0.0f, false);
    HostTensor<TW> scratch_bd(1, 1, L * NB, 0, 0, 1, 0.0f, false), scratch_bu(1, 1, L * D, 0, 0, 1, 0.0f, false);
    std::unique_ptr<float[]> scratch_workspace = poisoned(plan.workspace_floats);
    std::unique_ptr<TW[]> scratch_dh(new TW[M * NB]);
    auto bad = bwd;
    bad.order = bad_order.data();
    bad.segments = bad_segments.data();
    bad.grad_x = {nullptr, 0, 0};
    bad.grad_down_weight = scratch_wd.data.get();
    bad.grad_up_weight = scratch_wu.data.get();
    bad.grad_down_bias = scratch_bd.data.get();
    bad.grad_up_bias = scratch_bu.data.get();
    bad.dh = scratch_dh.get();
    if (peftkern::launch_bottleneck_backward(bad, scratch_workspace.get(), nullptr) != cudaSuccess) {
      ++failures;
      std::printf("FAIL %s: backward with garbage order: launch error\n", label.c_str());
    }
  }

  // float64 reference from the stored (rounded) inputs.
  std::vector<double> h_ref(M * NB, 0.0), dh_ref(M * NB, 0.0);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t l = adapter[m];
    for (int64_t b = 0; b < NB; ++b) {
      double acc = 0.0;
      if (l >= 0) {
        acc = c.biases ? bd.get(l, b) : 0.0;
        for (int64_t d = 0; d < D; ++d) acc += x.get(m, d) * wd.get(l, b, d);
      }
      h_ref[m * NB + b] = acc;
      expect_close<float>("H", label, h[m * NB + b], acc);
    }
    for (int64_t d = 0; d < D; ++d) {
      const double base = c.residual ? res.get(m, d) : x.get(m, d);
      if (l < 0) {  // no adapter: the residual, bit for bit
        if (!(y.get(m, d) == base)) {
          if (++failures <= 40) std::printf("FAIL %s y: row %ld without adapter is not the residual\n", label.c_str(), long(m));
        }
        continue;
      }
      double acc = c.biases ? bu.get(l, d) : 0.0;
      for (int64_t b = 0; b < NB; ++b) acc += activate(h_ref[m * NB + b], c.activation) * wu.get(l, d, b);
      expect_close<T>("y", label, y.get(m, d), base + scaling * acc);
    }
    for (int64_t b = 0; b < NB; ++b) {
      if (l < 0) continue;
      double acc = 0.0;
      for (int64_t d = 0; d < D; ++d) acc += dy.get(m, d) * wu.get(l, d, b);
      dh_ref[m * NB + b] = scaling * acc * activate_grad(h_ref[m * NB + b], c.activation);
    }
  }
  if (c.need_dx)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t d = 0; d < D; ++d) {
        double acc = c.residual ? 0.0 : dy.get(m, d);
        const int64_t l = adapter[m];
        if (l >= 0)
          for (int64_t b = 0; b < NB; ++b) acc += dh_ref[m * NB + b] * wd.get(l, b, d);
        expect_close<T>("dX", label, dx.get(m, d), acc);
      }
  if (!c.need_weights) return;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t d = 0; d < D; ++d) {
      double bias = 0.0;
      for (int64_t m = 0; m < M; ++m)
        if (adapter[m] == l) bias += scaling * dy.get(m, d);
      if (c.biases) expect_close<TW>("dbu", label, gbu.get(0, 0, l * D + d), bias, 2.0);
      for (int64_t b = 0; b < NB; ++b) {
        double acc = 0.0;
        for (int64_t m = 0; m < M; ++m)
          if (adapter[m] == l) acc += scaling * dy.get(m, d) * activate(h_ref[m * NB + b], c.activation);
        expect_close<TW>("dWu", label, gwu.get(0, l * D + d, b), acc, 2.0);
      }
    }
    for (int64_t b = 0; b < NB; ++b) {
      double bias = 0.0;
      for (int64_t m = 0; m < M; ++m)
        if (adapter[m] == l) bias += dh_ref[m * NB + b];
      if (c.biases) expect_close<TW>("dbd", label, gbd.get(0, 0, l * NB + b), bias, 2.0);
      for (int64_t d = 0; d < D; ++d) {
        double acc = 0.0;
        for (int64_t m = 0; m < M; ++m)
          if (adapter[m] == l) acc += dh_ref[m * NB + b] * x.get(m, d);
        expect_close<TW>("dWd", label, gwd.get(0, l * NB + b, d), acc, 2.0);
      }
    }
  }
}

// (M, D, Bn, L): odd sizes around the tiles (64 x 64 x 32); M = 0; D a multiple of 8 (the 16-byte path with
// a partial tile); Bn 1, 5, 16, 33; more than one row tile with several adapters in one tile.
const int64_t kShapes[][4] = {{70, 33, 16, 3}, {0, 17, 5, 2}, {17, 17, 1, 1}, {65, 72, 5, 2},
                              {33, 33, 16, 2}, {130, 70, 33, 4}, {1, 17, 16, 1}};

template <typename T, typename TW>
int run_all(bool quick, std::initializer_list<int> shapes) {
  int cases = 0;
  int variant = 0;
  for (int s : shapes)
    for (int act = 0; act < 5; ++act) {
      // Rotate ids, layouts, residual and biases through the activations so each shows up with each.
      const int v = variant++;
      const int64_t L = kShapes[s][3];
      Case c{kShapes[s][0], kShapes[s][1], kShapes[s][2], L, act, IdMode((v + s) % 4), v % 3, (v / 3) % 2,
             (v % 2) == 1, (v % 3) != 2, (v % 5) != 4, (v % 7) != 6};
      if (quick && act % 2 == 1 && s != 0) continue;  // quick: every activation on the first shape
      if (std::getenv("EMULATE_VERBOSE")) std::printf("case shape %d act %d ids %d x %d w %d res %d bias %d dx %d dw %d\n", s, act, int(c.ids), c.x_layout, c.weight_layout, int(c.residual), int(c.biases), int(c.need_dx), int(c.need_weights));
      run_case<T, TW>(c);
      ++cases;
    }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  host_check::seed(424242);
  const bool quick = host_check::quick_run(argc, argv);
  int cases = 0;
  if (quick) {
    cases += run_all<float, float>(true, {0, 1, 2, 3});
    cases += run_all<half, half>(true, {0, 4});
    cases += run_all<half, float>(true, {2});
    cases += run_all<__nv_bfloat16, __nv_bfloat16>(true, {3, 6});
    cases += run_all<__nv_bfloat16, float>(true, {4});
  } else {
    const auto all = {0, 1, 2, 3, 4, 5, 6};
    cases += run_all<float, float>(false, all);
    cases += run_all<half, half>(false, all);
    cases += run_all<half, float>(false, all);
    cases += run_all<__nv_bfloat16, __nv_bfloat16>(false, all);
    cases += run_all<__nv_bfloat16, float>(false, all);
  }
  return host_check::report(cases);
}
