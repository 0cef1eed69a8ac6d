// Runs peftkern/lora_serving.cuh's launchers (launch_lora_shrink, launch_lora_expand_add) on the CPU emulator
// (emulate.h) against float64 host loops: merged slices of different widths written from an output offset,
// mixed ranks with a rank-0 slot, ids -1 / out of range / int32 and int64, decode (no segment table) and
// prefill (multi_lora.cuh's segment table) shrinks, strided x and y, B stored rank-major, a layer of a stacked
// per-layer weight picked by its layer stride, every dtype pairing. Adapter entries past each rank and the
// other layer are NaN, so reading them poisons the result; rows without an adapter and columns outside the
// slices must keep their exact values. Prints one line per failure and "N cases, F failures".
#include "emulate.h"  // must come first: it redefines the CUDA keywords the header uses

#include <peftkern/lora_serving.cuh>

#include "host_check.h"

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

namespace {

using host_check::fail;
using host_check::HostTensor;
using host_check::matrix_strides;
using host_check::uniform_pm1;

int cases = 0;

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

struct Case {
  int64_t M, K, L, R;
  std::vector<int64_t> widths;
  int64_t offset;
  int layout;      // of x and y (host_check::matrix_strides)
  bool rank_major;  // B stored [L, R, N], read through strides as [L, N, R]
  bool stacked;     // A and B are layer 1 of a two-layer stack (lora_layer)
  bool prefill;     // the shrink reads the segment table
  bool ids_int64;
};

std::vector<int64_t> ids_for(int64_t M, int64_t L) {
  std::vector<int64_t> ids(M);
  for (int64_t t = 0; t < M; ++t) {
    const int64_t pick = (t * 7 + 3) % (L + 3);
    ids[t] = pick < L ? pick : (pick == L ? -1 : (pick == L + 1 ? L : 1000));  // -1, L and 1000: no adapter
  }
  return ids;
}

template <typename T, typename TA>
void run_case(const Case& c, const std::string& name) {
  ++cases;
  const int64_t M = c.M, K = c.K, L = c.L, R = c.R;
  const int n = static_cast<int>(c.widths.size());
  const std::string label = std::string(peftkern::DType<T>::name) + "/" + peftkern::DType<TA>::name + " " + name;
  std::vector<int32_t> ranks(L);
  std::vector<float> scalings(L);
  for (int64_t i = 0; i < L; ++i) {  // slot 2 has rank 0, odd slots a small rank
    ranks[i] = static_cast<int32_t>(i == 2 ? 0 : (i % 2 ? R / 4 + 1 : R));
    scalings[i] = 0.5f + i;
  }
  const std::vector<int64_t> ids = ids_for(M, L);
  const int64_t layers = c.stacked ? 2 : 1, layer = layers - 1;
  auto rank_of = [&](int64_t t) -> int64_t { return ids[t] >= 0 && ids[t] < L ? ranks[ids[t]] : 0; };

  auto xs = matrix_strides(c.layout, M, K);
  HostTensor<T> x(1, M, K, 0, xs.s0, xs.s1, 1.0f);
  std::vector<HostTensor<TA>> a, b;
  peftkern::LoraSlices<TA> a_slices{}, b_slices{};
  a_slices.n = b_slices.n = n;
  int64_t total = c.offset;
  for (int j = 0; j < n; ++j) {
    const int64_t N = c.widths[j];
    total += N;
    a.emplace_back(layers * L, R, K, R * K, K, 1);
    b.push_back(c.rank_major ? HostTensor<TA>(layers * L, N, R, N * R, 1, N)
                             : HostTensor<TA>(layers * L, N, R, N * R, R, 1));
    for (int64_t i = 0; i < L; ++i)
      for (int64_t r = 0; r < ranks[i]; ++r) {  // the other layer and the padding past each rank stay NaN
        for (int64_t k = 0; k < K; ++k) a[j].at(layer * L + i, r, k) = peftkern::detail::from_float<TA>(uniform_pm1() * 0.3f);
        for (int64_t m = 0; m < N; ++m) b[j].at(layer * L + i, m, r) = peftkern::detail::from_float<TA>(uniform_pm1() * 0.5f);
      }
    a_slices.w[j] = peftkern::lora_layer(host_check::view3<peftkern::Strided3D>(a[j]), layer, L * R * K);
    b_slices.w[j] = peftkern::lora_layer(host_check::view3<peftkern::Strided3D>(b[j]), layer, L * N * R);
    b_slices.cols[j] = N;
  }
  const int64_t width = total + 2;  // two columns past the last slice, which must stay as they are
  auto ys = matrix_strides(c.layout, M, width);
  HostTensor<T> y(1, M, width, 0, ys.s0, ys.s1, 1.0f);
  std::vector<double> y0(M * width);
  for (int64_t t = 0; t < M; ++t)
    for (int64_t m = 0; m < width; ++m) y0[t * width + m] = y.get(t, m);

  std::unique_ptr<int64_t[]> ids64(new int64_t[std::max<int64_t>(M, 1)]);
  std::unique_ptr<int32_t[]> ids32(new int32_t[std::max<int64_t>(M, 1)]);
  for (int64_t t = 0; t < M; ++t) ids64[t] = ids[t], ids32[t] = static_cast<int32_t>(ids[t]);
  const void* id_ptr = c.ids_int64 ? static_cast<const void*>(ids64.get()) : static_cast<const void*>(ids32.get());
  std::unique_ptr<void, FreeDeleter> workspace;
  peftkern::MultiLoraSegments segments{};
  if (c.prefill) {
    const int64_t bytes = (std::max<int64_t>(peftkern::multi_lora_segments_workspace_bytes(M, L), 1) + 255) / 256 * 256;
    workspace.reset(std::aligned_alloc(256, static_cast<size_t>(bytes)));
    if (peftkern::launch_multi_lora_segments(id_ptr, c.ids_int64, M, L, workspace.get(), &segments, nullptr) !=
        cudaSuccess) {
      fail(label, "segments launch error");
      return;
    }
  }
  std::unique_ptr<float[]> s(new float[std::max<int64_t>(n * M * R, 1)]);
  if (peftkern::launch_lora_shrink<T, TA>(x.view(), a_slices, id_ptr, c.ids_int64, c.prefill ? &segments : nullptr,
                                          ranks.data(), s.get(), M, K, L, R, nullptr) != cudaSuccess) {
    fail(label, "shrink launch error");
    return;
  }
  for (int j = 0; j < n; ++j)
    for (int64_t t = 0; t < M; ++t)
      for (int64_t r = 0; r < R; ++r) {
        double want = 0.0;
        if (r < rank_of(t))
          for (int64_t k = 0; k < K; ++k) want += x.get(t, k) * a[j].get(layer * L + ids[t], r, k);
        host_check::expect_close<float>("s", label + " slice " + std::to_string(j) + " row " + std::to_string(t),
                                        s[(j * M + t) * R + r], want, 10.0);
      }
  if (peftkern::launch_lora_expand_add<T, TA>(y.mut(), s.get(), b_slices, id_ptr, c.ids_int64, ranks.data(),
                                              scalings.data(), c.offset, M, L, R, nullptr) != cudaSuccess) {
    fail(label, "expand-add launch error");
    return;
  }
  for (int64_t t = 0; t < M; ++t) {
    int64_t first = c.offset;
    std::vector<double> want(y0.begin() + t * width, y0.begin() + (t + 1) * width);
    for (int j = 0; j < n; ++j) {
      for (int64_t m = 0; rank_of(t) > 0 && m < c.widths[j]; ++m) {
        double acc = 0.0;
        for (int64_t r = 0; r < rank_of(t); ++r) acc += s[(j * M + t) * R + r] * b[j].get(layer * L + ids[t], m, r);
        want[first + m] += scalings[ids[t]] * acc;
      }
      first += c.widths[j];
    }
    for (int64_t m = 0; m < width; ++m) {
      const std::string where = label + " y[" + std::to_string(t) + ", " + std::to_string(m) + "]";
      const bool written = rank_of(t) > 0 && m >= c.offset && m < total;
      if (!written && y.get(t, m) != want[m]) fail(where, "changed, but the row or column is not an adapter's");
      if (written) host_check::expect_close<T>("", where, y.get(t, m), want[m]);
    }
  }
}

template <typename T, typename TA>
void run_all(bool quick) {
  const std::vector<Case> list = {
      {1, 33, 4, 16, {17, 5, 9}, 3, 0, false, false, false, true},
      {17, 40, 4, 16, {130}, 0, 2, true, true, false, false},
      {70, 24, 5, 8, {6, 3}, 1, 1, false, true, true, true},
      {70, 32, 5, 16, {9, 9, 20, 4}, 2, 0, true, false, true, false},
      {0, 16, 2, 8, {4}, 0, 0, false, false, true, true},
  };
  for (size_t i = 0; i < list.size(); ++i) {
    if (quick && i == 1 && !std::is_same_v<T, float>) continue;
    run_case<T, TA>(list[i], "case " + std::to_string(i));
  }
}

// The launchers return their own launch's error (cudaPeekAtLastError right after it): a launch the device
// refuses is reported by the call that made it, stops the calls after it (the shrink's second slice is
// never launched), and stays pending for the caller's cudaGetLastError as the runtime leaves it; an error
// pending from earlier work is not cleared by a launcher.
void check_error_paths() {
  ++cases;
  const int64_t M = 3, K = 8, L = 1, R = 2, N = 4;
  std::vector<float> x(M * K, 1.0f), a(2 * R * K, 0.5f), b(N * R, 0.25f), s(2 * M * R), y(M * N, 0.0f);
  const std::vector<int32_t> ids(M, 0), ranks(L, R);
  const std::vector<float> scalings(L, 1.0f);
  peftkern::LoraSlices<float> a_slices{}, b_slices{};
  a_slices.n = 2;
  a_slices.w[0] = {a.data(), R * K, K, 1};
  a_slices.w[1] = {a.data() + R * K, R * K, K, 1};
  b_slices.n = 1;
  b_slices.w[0] = {b.data(), N * R, R, 1};
  b_slices.cols[0] = N;
  const auto shrink = [&] {
    return peftkern::launch_lora_shrink<float, float>({x.data(), K, 1}, a_slices, ids.data(), false, nullptr,
                                                      ranks.data(), s.data(), M, K, L, R, nullptr);
  };
  const auto expand = [&] {
    return peftkern::launch_lora_expand_add<float, float>({y.data(), N, 1}, s.data(), b_slices, ids.data(), false,
                                                          ranks.data(), scalings.data(), 0, M, L, R, nullptr);
  };
  if (shrink() != cudaSuccess || expand() != cudaSuccess || cudaGetLastError() != cudaSuccess) {
    fail("error paths", "a valid call failed");
  }
  const unsigned long long before = emu::launches;
  emu::fail_next_launch(cudaErrorLaunchOutOfResources);
  if (shrink() != cudaErrorLaunchOutOfResources) fail("error paths", "shrink did not return its launch's error");
  if (emu::launches != before + 1) fail("error paths", "shrink launched again after a refused launch");
  if (cudaGetLastError() != cudaErrorLaunchOutOfResources || cudaGetLastError() != cudaSuccess) {
    fail("error paths", "the refused launch's error was not left pending exactly once");
  }
  emu::fail_next_launch(cudaErrorInvalidConfiguration);
  if (expand() != cudaErrorInvalidConfiguration) fail("error paths", "expand-add did not return its launch's error");
  (void)cudaGetLastError();
  emu::set_last_error(cudaErrorNotReady);  // earlier work's error, not yet taken by the caller
  (void)expand();
  if (cudaPeekAtLastError() != cudaErrorNotReady) fail("error paths", "a launcher cleared an earlier error");
  (void)cudaGetLastError();
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = host_check::quick_run(argc, argv);
  host_check::seed(7);
  // The argument checks, before any launch.
  peftkern::LoraSlices<float> none{};
  ++cases;
  if (peftkern::launch_lora_shrink<float, float>({nullptr, 0, 0}, none, nullptr, false, nullptr, nullptr, nullptr, 1, 1,
                                                 1, 1, nullptr) != cudaErrorInvalidValue ||
      peftkern::launch_lora_expand_add<float, float>({nullptr, 0, 0}, nullptr, none, nullptr, false, nullptr, nullptr,
                                                     -1, 1, 1, 1, nullptr) != cudaErrorInvalidValue) {
    fail("argument checks", "an empty slice list or a negative offset was accepted");
  }
  check_error_paths();
  run_all<float, float>(quick);
  run_all<half, half>(quick);
  run_all<__nv_bfloat16, __nv_bfloat16>(quick);
  run_all<half, float>(quick);
  return host_check::report(cases);
}
