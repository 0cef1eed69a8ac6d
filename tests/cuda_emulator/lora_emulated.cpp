// Runs peftkern/lora.cuh's launchers (forward and backward) on the CPU emulator (emulate.h) over odd shapes,
// strided layouts, every dtype pairing and dropout, and checks every output against a float64 host loop.
// Buffers are allocated to the exact span their strides reach, so AddressSanitizer flags any access
// outside them. Prints one line per failure and "N cases, F failures"; exit status 1 on any failure.
#include "emulate.h"  // must come first: it redefines the CUDA keywords the header uses

#include <peftkern/lora.cuh>

#include "host_check.h"

#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <string>

namespace {

using host_check::expect_close;
using host_check::failures;
using host_check::host_matrix;
using host_check::HostTensor;
using host_check::matrix_strides;

template <typename T, typename TA>
void run_case(int64_t M, int64_t K, int64_t N, int64_t R, float p, int layout_kind, bool need_dx,
              bool has_bias) {
  const std::string label = std::string(peftkern::DType<T>::name) + "/" + peftkern::DType<TA>::name + " M=" +
                            std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N) +
                            " R=" + std::to_string(R) + " p=" + std::to_string(p) + " layout=" +
                            std::to_string(layout_kind);
  const int64_t seed_value = 0x1234567890LL + M;
  const float scaling = 0.75f;
  const auto lx = matrix_strides(layout_kind, M, K), lw = matrix_strides(layout_kind, N, K),
             la = matrix_strides(layout_kind, R, K), lb = matrix_strides(layout_kind, N, R),
             ldy = matrix_strides(layout_kind, M, N);
  HostTensor<T> x = host_matrix<T>(M, K, lx.s0, lx.s1, 1.0f), w = host_matrix<T>(N, K, lw.s0, lw.s1, 0.3f),
                bias = host_matrix<T>(1, N, N, 1, 1.0f);
  HostTensor<TA> a = host_matrix<TA>(R, K, la.s0, la.s1, 0.3f), b = host_matrix<TA>(N, R, lb.s0, lb.s1, 0.5f);
  HostTensor<T> dy = host_matrix<T>(M, N, ldy.s0, ldy.s1, 1.0f);
  HostTensor<T> y = host_matrix<T>(M, N, N, 1, 0.0f, false), dx = host_matrix<T>(M, K, K, 1, 0.0f, false);
  HostTensor<TA> da = host_matrix<TA>(R, K, K, 1, 0.0f, false), db = host_matrix<TA>(N, R, R, 1, 0.0f, false);
  std::unique_ptr<float[]> s(new float[std::max<int64_t>(M * R, 1)]);
  std::unique_ptr<int64_t[]> seed(new int64_t[1]{seed_value});

  peftkern::LoraForwardArgs<T, TA> fwd{};
  fwd.x = x.view();
  fwd.weight = w.view();
  fwd.bias = has_bias ? bias.data.get() : nullptr;
  fwd.bias_stride = 1;
  fwd.lora_a = a.view();
  fwd.lora_b = b.view();
  fwd.s = s.get();
  fwd.y = y.mut();
  fwd.M = M;
  fwd.N = N;
  fwd.K = K;
  fwd.R = R;
  fwd.scaling = scaling;
  fwd.dropout_p = p;
  fwd.seed = p > 0 ? seed.get() : nullptr;
  if (peftkern::launch_lora_forward(fwd, nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL %s: forward launch error\n", label.c_str());
    return;
  }

  const auto plan = peftkern::lora_backward_plan(M, N, K, R);
  std::unique_ptr<float[]> workspace(new float[std::max<int64_t>(plan.workspace_floats, 1)]);
  peftkern::LoraBackwardArgs<T, TA> bwd{};
  bwd.grad_y = dy.view();
  bwd.x = x.view();
  bwd.weight = w.view();
  bwd.lora_a = a.view();
  bwd.lora_b = b.view();
  bwd.s = s.get();
  bwd.grad_x = need_dx ? dx.mut() : peftkern::Strided2D<T>{nullptr, 0, 0};
  bwd.grad_a = da.data.get();
  bwd.grad_b = db.data.get();
  bwd.M = M;
  bwd.N = N;
  bwd.K = K;
  bwd.R = R;
  bwd.scaling = scaling;
  bwd.dropout_p = p;
  bwd.seed = p > 0 ? seed.get() : nullptr;
  if (peftkern::launch_lora_backward(bwd, workspace.get(), nullptr) != cudaSuccess) {
    ++failures;
    std::printf("FAIL %s: backward launch error\n", label.c_str());
    return;
  }

  // float64 reference from the stored (rounded) inputs and the same dropout stream.
  const double inv_keep = p > 0 ? 1.0 / (1.0 - static_cast<double>(p)) : 1.0;
  auto keep = [&](int64_t m, int64_t k) {
    return p > 0 ? (peftkern::dropout_keep(seed_value, m, k, K, p) ? inv_keep : 0.0) : 1.0;
  };
  std::vector<double> s_ref(M * R, 0.0), ds_ref(M * R, 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t r = 0; r < R; ++r) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += x.get(m, k) * keep(m, k) * a.get(r, k);
      s_ref[m * R + r] = acc;
      expect_close<float>("S", label, s[m * R + r], acc);
      double dacc = 0.0;
      for (int64_t n = 0; n < N; ++n) dacc += dy.get(m, n) * b.get(n, r);
      ds_ref[m * R + r] = scaling * dacc;
    }
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double acc = has_bias ? bias.get(0, n) : 0.0;
      for (int64_t k = 0; k < K; ++k) acc += x.get(m, k) * w.get(n, k);
      for (int64_t r = 0; r < R; ++r) acc += scaling * s_ref[m * R + r] * b.get(n, r);
      expect_close<T>("y", label, y.get(m, n), acc);
    }
  if (need_dx)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) {
        double base = 0.0, lora = 0.0;
        for (int64_t n = 0; n < N; ++n) base += dy.get(m, n) * w.get(n, k);
        for (int64_t r = 0; r < R; ++r) lora += ds_ref[m * R + r] * a.get(r, k);
        expect_close<T>("dX", label, dx.get(m, k), base + lora * keep(m, k));
      }
  for (int64_t r = 0; r < R; ++r)
    for (int64_t k = 0; k < K; ++k) {
      double acc = 0.0;
      for (int64_t m = 0; m < M; ++m) acc += ds_ref[m * R + r] * x.get(m, k) * keep(m, k);
      expect_close<TA>("dA", label, da.get(r, k), acc);
    }
  for (int64_t n = 0; n < N; ++n)
    for (int64_t r = 0; r < R; ++r) {
      double acc = 0.0;
      for (int64_t m = 0; m < M; ++m) acc += scaling * dy.get(m, n) * s_ref[m * R + r];
      expect_close<TA>("dB", label, db.get(n, r), acc);
    }
}

// quick (CI): fp32 on the first four shapes, the 16-bit pairings on two each; full: every combination.
template <typename T, typename TA>
int run_all(std::initializer_list<int> which) {
  // (M, K, N, R): odd sizes around the tiles (64 x 64 x 32, rank chunks of 16, dY tiles of 32), M = 0,
  // K a multiple of 8 but not of 32 (the 16-byte path with a partial tile), ranks past one chunk.
  // The first reaches nearly every path: 2 x 2 GEMM tiles, 3 dY chunks x 3 splits, 2 dA column tiles,
  // 2 rank chunks; the fourth has a rank past the dY kernel's shared-memory dS (64).
  const int64_t shapes[][4] = {{70, 72, 70, 20}, {0, 9, 5, 2}, {17, 33, 17, 8}, {33, 40, 35, 70},
                               {1, 17, 33, 1}, {65, 17, 1, 17}, {130, 100, 70, 33}};
  int cases = 0;
  for (int i : which)
    for (float p : {0.0f, 0.3f})
      for (int kind : {0, 1, 2}) {
        const bool need_dx = !(kind == 2 && p == 0.0f);  // one pass without dX
        run_case<T, TA>(shapes[i][0], shapes[i][1], shapes[i][2], shapes[i][3], p, kind, need_dx, kind != 1);
        ++cases;
      }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  host_check::seed(12345);
  const bool quick = host_check::quick_run(argc, argv);
  int cases = 0;
  if (quick) {
    cases += run_all<float, float>({0, 1, 2, 3});
    cases += run_all<half, float>({0, 3});
    cases += run_all<__nv_bfloat16, __nv_bfloat16>({0, 2});
  } else {
    const auto all = {0, 1, 2, 3, 4, 5, 6};
    cases += run_all<float, float>(all);
    cases += run_all<half, half>(all);
    cases += run_all<half, float>(all);
    cases += run_all<__nv_bfloat16, __nv_bfloat16>(all);
    cases += run_all<__nv_bfloat16, float>(all);
  }
  return host_check::report(cases);
}
