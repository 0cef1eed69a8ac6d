// Two vendored copies of the peftkern headers in one program, plus the C API: what a serving stack sees when
// it vendors peftkern and a library it links vendors another copy (possibly another version). Each copy is
// included under its own PEFTKERN_ABI_NAMESPACE, so their kernels, types and helpers stay distinct symbols;
// the C API (peftkern_c.h) is defined from copy A. The second copy lives in a folder of its own
// (`make cuda-example` copies csrc/include/peftkern to build/vendor/peftkern_b). Each path runs the same LoRA
// shrink + expand-add (one slice, two adapters, a row without one) and is checked against a host loop; every
// launcher's return code is checked. Exits 2 without a CUDA device (compiled, not run).
#define PEFTKERN_ABI_NAMESPACE copy_a
#include <peftkern/lora_serving.cuh>
#include <peftkern/peftkern_c.cuh>
#undef PEFTKERN_ABI_NAMESPACE
#define PEFTKERN_ABI_NAMESPACE copy_b
#include <peftkern_b/lora_serving.cuh>
#undef PEFTKERN_ABI_NAMESPACE

#include <cmath>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "example_util.h"

namespace a = peftkern::copy_a;
namespace b = peftkern::copy_b;
static_assert(!std::is_same_v<a::LoraSlices<float>, b::LoraSlices<float>>, "the copies must not share types");
static_assert(a::kVersionMajor == PEFTKERN_VERSION_MAJOR, "copy A's version");

namespace {

constexpr int64_t M = 5, K = 96, L = 2, R = 8, N = 40;

// The serving step through one copy's C++ launchers: segment table, shrink, expand-add.
template <typename Segments, typename Slices, typename MakeTable, typename Shrink, typename Expand>
cudaError_t run_copy(MakeTable make_table, Shrink shrink, Expand expand) {
  Segments segments{};
  cudaError_t err = make_table(&segments);
  if (err != cudaSuccess) return err;
  err = shrink(&segments);
  if (err != cudaSuccess) return err;
  return expand();
}

}  // namespace

int main() {
  if (example::no_cuda_device()) return 2;
  uint32_t state = 12345u;
  std::vector<float> x(M * K), wa(L * R * K), wb(L * N * R), y0(M * N);
  for (auto& v : x) v = example::next_value(&state);
  for (auto& v : wa) v = example::next_value(&state) * 0.2f;
  for (auto& v : wb) v = example::next_value(&state) * 0.3f;
  for (auto& v : y0) v = example::next_value(&state);
  const std::vector<int64_t> ids = {1, 0, -1, 1, 0};
  const std::vector<int32_t> ranks = {R, R / 2};
  const std::vector<float> scalings = {0.5f, 2.0f};

  float *d_x = example::to_device(x), *d_a = example::to_device(wa), *d_b = example::to_device(wb);
  int64_t* d_ids = example::to_device(ids);
  int32_t* d_ranks = example::to_device(ranks);
  float* d_scalings = example::to_device(scalings);
  float *d_y[3] = {example::to_device(y0), example::to_device(y0), example::to_device(y0)};
  float* d_s = nullptr;
  void* workspace = nullptr;
  if (!d_x || !d_a || !d_b || !d_ids || !d_ranks || !d_scalings || !d_y[0] || !d_y[1] || !d_y[2]) return 1;
  CHECK_CUDA(cudaMalloc(&d_s, M * R * sizeof(float)));
  CHECK_CUDA(cudaMalloc(&workspace, a::multi_lora_segments_workspace_bytes(M, L)));

  // Copy A and copy B, each through its own launchers.
  a::LoraSlices<float> a_in{}, a_out{};
  a_in.n = a_out.n = 1;
  a_in.w[0] = {d_a, R * K, K, 1};
  a_out.w[0] = {d_b, N * R, R, 1};
  a_out.cols[0] = N;
  CHECK_CUDA((run_copy<a::MultiLoraSegments, a::LoraSlices<float>>(
      [&](a::MultiLoraSegments* seg) { return a::launch_multi_lora_segments(d_ids, true, M, L, workspace, seg, 0); },
      [&](a::MultiLoraSegments* seg) {
        return a::launch_lora_shrink<float, float>({d_x, K, 1}, a_in, d_ids, true, seg, d_ranks, d_s, M, K, L, R, 0);
      },
      [&] {
        return a::launch_lora_expand_add<float, float>({d_y[0], N, 1}, d_s, a_out, d_ids, true, d_ranks, d_scalings,
                                                       0, M, L, R, 0);
      })));
  b::LoraSlices<float> b_in{}, b_out{};
  b_in.n = b_out.n = 1;
  b_in.w[0] = {d_a, R * K, K, 1};
  b_out.w[0] = {d_b, N * R, R, 1};
  b_out.cols[0] = N;
  CHECK_CUDA((run_copy<b::MultiLoraSegments, b::LoraSlices<float>>(
      [&](b::MultiLoraSegments* seg) { return b::launch_multi_lora_segments(d_ids, true, M, L, workspace, seg, 0); },
      [&](b::MultiLoraSegments*) {  // the decode kernel this time: no table
        return b::launch_lora_shrink<float, float>({d_x, K, 1}, b_in, d_ids, true, nullptr, d_ranks, d_s, M, K, L, R,
                                                   0);
      },
      [&] {
        return b::launch_lora_expand_add<float, float>({d_y[1], N, 1}, d_s, b_out, d_ids, true, d_ranks, d_scalings,
                                                       0, M, L, R, 0);
      })));

  // The C API (defined from copy A).
  const int64_t x_strides[2] = {K, 1}, y_strides[2] = {N, 1};
  const int64_t a_strides[3] = {R * K, K, 1}, b_strides[3] = {N * R, R, 1}, cols[1] = {N};
  const void* a_ptrs[1] = {d_a};
  const void* b_ptrs[1] = {d_b};
  peftkern_segments table{};
  int major = -1, minor = -1, patch = -1;
  peftkern_version(&major, &minor, &patch);
  CHECK_CUDA(peftkern_multi_lora_segments(d_ids, 1, M, L, workspace, &table, 0));
  CHECK_CUDA(peftkern_lora_shrink(PEFTKERN_FLOAT32, PEFTKERN_FLOAT32, d_x, x_strides, 1, a_ptrs, a_strides, d_ids, 1,
                                  &table, d_ranks, d_s, M, K, L, R, 0));
  CHECK_CUDA(peftkern_lora_expand_add(PEFTKERN_FLOAT32, PEFTKERN_FLOAT32, d_y[2], y_strides, d_s, 1, b_ptrs, b_strides,
                                      cols, d_ids, 1, d_ranks, d_scalings, 0, M, L, R, 0));
  if (peftkern_lora_shrink(PEFTKERN_FLOAT16, PEFTKERN_BFLOAT16, d_x, x_strides, 1, a_ptrs, a_strides, d_ids, 1,
                           nullptr, d_ranks, d_s, M, K, L, R, 0) != cudaErrorInvalidValue) {
    std::printf("the C API accepted a float16 / bfloat16 pair\n");
    return 1;
  }
  CHECK_CUDA(cudaDeviceSynchronize());

  // y = y0 + scaling_i * (x @ A_i[:r_i].T) @ B_i[:, :r_i].T on the host, in double.
  int bad = 0;
  for (int path = 0; path < 3; ++path) {
    std::vector<float> y(M * N);
    CHECK_CUDA(cudaMemcpy(y.data(), d_y[path], y.size() * sizeof(float), cudaMemcpyDeviceToHost));
    for (int64_t t = 0; t < M; ++t)
      for (int64_t n = 0; n < N; ++n) {
        double want = y0[t * N + n];
        if (ids[t] >= 0) {
          const int64_t i = ids[t];
          double acc = 0.0;
          for (int64_t r = 0; r < ranks[i]; ++r) {
            double s = 0.0;
            for (int64_t k = 0; k < K; ++k) s += double(x[t * K + k]) * wa[(i * R + r) * K + k];
            acc += s * wb[(i * N + n) * R + r];
          }
          want += scalings[i] * acc;
        }
        if (std::fabs(y[t * N + n] - want) > 1e-4 + 1e-4 * std::fabs(want)) ++bad;
      }
  }
  std::printf("peftkern %d.%d.%d, copies A and B and the C API: %d out of tolerance\n", major, minor, patch, bad);
  return bad == 0 ? 0 : 1;
}
