// Vendoring example: one serving step's LoRA around a caller's own QKV projection, from the header alone (no
// Python, no torch). The batch metadata (the segment table) is built once and shared by the layers; each layer
// shrinks x through its q/k/v adapters and adds the three expands into the fused [M, N_q + N_k + N_v] output
// from column 0, taking its weights from stacked per-layer tensors by layer stride. Decode (no table) and
// prefill (the table) shrinks, checked against a host loop.
// Build: nvcc -std=c++17 -I csrc/include this_file.cu
// Exit status: 0 checked and right, 1 wrong or a CUDA error, 2 no CUDA device here (compiled, not run).
#include <peftkern/lora_serving.cuh>

#include <cmath>
#include <cstdio>
#include <vector>

#include "example_util.h"

using example::no_cuda_device;
using example::random_values;
using example::to_device;

int main() {
  if (no_cuda_device()) return 2;

  // 90 tokens over 3 adapter slots of ranks 16, 8, 0 (R = 16); 2 layers; q/k/v widths 64, 32, 32; K = 64.
  const int64_t M = 90, K = 64, L = 3, R = 16, layers = 2;
  const int64_t widths[3] = {64, 32, 32};
  const int64_t total = 128;
  uint32_t state = 11;
  const auto x = random_values<__nv_bfloat16>(M * K, &state, 1.0f);
  std::vector<std::vector<__nv_bfloat16>> a, b;  // per slice: A [layers, L, R, K], B [layers, L, N, R]
  for (int j = 0; j < 3; ++j) {
    a.push_back(random_values<__nv_bfloat16>(layers * L * R * K, &state, 0.1f));
    b.push_back(random_values<__nv_bfloat16>(layers * L * widths[j] * R, &state, 0.5f));
  }
  const std::vector<int32_t> ranks = {16, 8, 0};
  const std::vector<float> scalings = {0.5f, 2.0f, 1.0f};
  std::vector<int64_t> ids(M);
  for (int64_t t = 0; t < M; ++t) ids[t] = (t * 7) % (L + 1) - 1;  // -1 = the base model only

  __nv_bfloat16* d_x = to_device(x);
  int64_t* d_ids = to_device(ids);
  int32_t* d_ranks = to_device(ranks);
  float* d_scalings = to_device(scalings);
  __nv_bfloat16 *d_a[3], *d_b[3];
  for (int j = 0; j < 3; ++j) d_a[j] = to_device(a[j]), d_b[j] = to_device(b[j]);
  if (!d_x || !d_ids || !d_ranks || !d_scalings || !d_a[0] || !d_a[1] || !d_a[2] || !d_b[0] || !d_b[1] || !d_b[2]) {
    std::fprintf(stderr, "cudaMalloc/cudaMemcpy of the inputs failed\n");
    return 1;
  }
  __nv_bfloat16* d_y = nullptr;
  float* d_s = nullptr;
  CHECK_CUDA(cudaMalloc(&d_y, M * total * sizeof(__nv_bfloat16)));
  CHECK_CUDA(cudaMalloc(&d_s, 3 * M * R * sizeof(float)));

  // The batch metadata, once per step: its workspace size follows from M and L alone.
  void* workspace = nullptr;
  CHECK_CUDA(cudaMalloc(&workspace, peftkern::multi_lora_segments_workspace_bytes(M, L)));
  peftkern::MultiLoraSegments segments{};
  CHECK_CUDA(peftkern::launch_multi_lora_segments(d_ids, true, M, L, workspace, &segments, nullptr));

  int bad_total = 0;
  for (int64_t layer = 0; layer < layers; ++layer) {
    for (const bool prefill : {false, true}) {
      // The caller's own base output (zeros here), then the adapters added into it.
      CHECK_CUDA(cudaMemset(d_y, 0, M * total * sizeof(__nv_bfloat16)));
      peftkern::LoraSlices<__nv_bfloat16> a_slices{}, b_slices{};
      a_slices.n = b_slices.n = 3;
      for (int j = 0; j < 3; ++j) {
        const peftkern::Strided3D<const __nv_bfloat16> a_all{d_a[j], R * K, K, 1}, b_all{d_b[j], widths[j] * R, R, 1};
        a_slices.w[j] = peftkern::lora_layer(a_all, layer, L * R * K);  // layer `layer` of the stacked weights
        b_slices.w[j] = peftkern::lora_layer(b_all, layer, L * widths[j] * R);
        b_slices.cols[j] = widths[j];
      }
      const peftkern::Strided2D<const __nv_bfloat16> x_view{d_x, K, 1};
      const peftkern::Strided2D<__nv_bfloat16> y_view{d_y, total, 1};
      const cudaError_t shrunk = peftkern::launch_lora_shrink(x_view, a_slices, d_ids, true,
                                                              prefill ? &segments : nullptr, d_ranks, d_s, M, K, L, R,
                                                              nullptr);
      CHECK_CUDA(shrunk);
      const cudaError_t added = peftkern::launch_lora_expand_add(y_view, d_s, b_slices, d_ids, true, d_ranks,
                                                                 d_scalings, 0, M, L, R, nullptr);
      CHECK_CUDA(added);
      CHECK_CUDA(cudaDeviceSynchronize());
      std::vector<__nv_bfloat16> y(M * total);
      CHECK_CUDA(cudaMemcpy(y.data(), d_y, y.size() * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
      int bad = 0;
      for (int64_t t = 0; t < M; ++t) {
        const int64_t i = ids[t];
        int64_t column = 0;
        for (int j = 0; j < 3; ++j) {
          for (int64_t n = 0; n < widths[j]; ++n) {
            double want = 0.0;
            for (int64_t r = 0; i >= 0 && r < ranks[i]; ++r) {
              double s = 0.0;
              for (int64_t k = 0; k < K; ++k)
                s += double(__bfloat162float(x[t * K + k])) *
                     __bfloat162float(a[j][((layer * L + i) * R + r) * K + k]);
              want += scalings[i] * s * __bfloat162float(b[j][((layer * L + i) * widths[j] + n) * R + r]);
            }
            const double got = __bfloat162float(y[t * total + column + n]);
            if (!(std::fabs(got - want) <= 2e-2 + 2e-2 * std::fabs(want))) ++bad;
          }
          column += widths[j];
        }
      }
      std::printf("layer %lld %s: %d out of tolerance\n", static_cast<long long>(layer),
                  prefill ? "prefill" : "decode", bad);
      bad_total += bad;
    }
  }
  std::printf("%d out of tolerance\n", bad_total);
  return bad_total == 0 ? 0 : 1;
}
