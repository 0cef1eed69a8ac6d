// Vendoring example: a mixed batch through the multi-LoRA forward from the header alone (no Python, no torch),
// both paths, checked against a host loop. Build: nvcc -std=c++17 -I csrc/include this_file.cu
// Exit status: 0 checked and right, 1 wrong or a CUDA error, 2 no CUDA device here (compiled, not run).
#include <peftkern/multi_lora.cuh>

#include <cmath>
#include <cstdio>
#include <vector>

#include "example_util.h"

using example::no_cuda_device;
using example::random_values;
using example::to_device;

int main() {
  if (no_cuda_device()) return 2;

  // 37 requests over 4 adapter slots of ranks 16, 4, 8, 12 (r_max 16); -1 = the base model only.
  const int64_t M = 37, K = 96, N = 70, L = 4, R = 16;
  uint32_t state = 7;
  const auto x = random_values<__nv_bfloat16>(M * K, &state, 1.0f);
  const auto w = random_values<__nv_bfloat16>(N * K, &state, 0.1f);
  const auto a = random_values<__nv_bfloat16>(L * R * K, &state, 0.1f);
  const auto b = random_values<__nv_bfloat16>(L * N * R, &state, 0.5f);
  const std::vector<int32_t> ranks = {16, 4, 8, 12};
  const std::vector<float> scalings = {0.5f, 2.0f, 1.0f, 0.25f};
  std::vector<int64_t> ids(M);
  for (int64_t t = 0; t < M; ++t) ids[t] = (t * 5) % (L + 1) - 1;

  __nv_bfloat16 *d_x = to_device(x), *d_w = to_device(w), *d_a = to_device(a), *d_b = to_device(b);
  int64_t* d_ids = to_device(ids);
  int32_t* d_ranks = to_device(ranks);
  float* d_scalings = to_device(scalings);
  if (!d_x || !d_w || !d_a || !d_b || !d_ids || !d_ranks || !d_scalings) {
    std::fprintf(stderr, "cudaMalloc/cudaMemcpy of the inputs failed\n");
    return 1;
  }
  __nv_bfloat16* d_y = nullptr;
  float* d_s = nullptr;
  CHECK_CUDA(cudaMalloc(&d_y, M * N * sizeof(__nv_bfloat16)));
  CHECK_CUDA(cudaMalloc(&d_s, M * R * sizeof(float)));

  // The host reference, in double from the stored bf16 values.
  std::vector<double> expected(M * N);
  for (int64_t t = 0; t < M; ++t) {
    const int64_t i = ids[t];
    for (int64_t n = 0; n < N; ++n) {
      double acc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += double(__bfloat162float(x[t * K + k])) * __bfloat162float(w[n * K + k]);
      if (i >= 0) {
        for (int64_t r = 0; r < ranks[i]; ++r) {
          double s = 0.0;
          for (int64_t k = 0; k < K; ++k)
            s += double(__bfloat162float(x[t * K + k])) * __bfloat162float(a[(i * R + r) * K + k]);
          acc += scalings[i] * s * __bfloat162float(b[(i * N + n) * R + r]);
        }
      }
      expected[t * N + n] = acc;
    }
  }

  int bad_total = 0;
  for (const int path : {peftkern::kMultiLoraDecode, peftkern::kMultiLoraPrefill}) {
    peftkern::MultiLoraForwardArgs<__nv_bfloat16, __nv_bfloat16> args{};
    args.x = {d_x, K, 1};
    args.weight = {d_w, K, 1};
    args.bias = nullptr;
    args.lora_a = {d_a, R * K, K, 1};
    args.lora_b = {d_b, N * R, R, 1};
    args.adapter_ids = d_ids;
    args.ids_int64 = true;
    args.scalings = d_scalings;
    args.ranks = d_ranks;
    args.s = d_s;
    args.y = {d_y, N, 1};
    args.M = M, args.N = N, args.K = K, args.L = L, args.R = R;
    args.path = path;
    // The workspace size comes from the shapes alone, so a serving loop can allocate it once.
    const auto plan = peftkern::multi_lora_forward_plan(M, N, K, L, path);
    void* workspace = nullptr;
    if (plan.workspace_bytes > 0) CHECK_CUDA(cudaMalloc(&workspace, plan.workspace_bytes));
    CHECK_CUDA(peftkern::launch_multi_lora_forward(args, workspace, nullptr));
    CHECK_CUDA(cudaDeviceSynchronize());
    std::vector<__nv_bfloat16> y(M * N);
    CHECK_CUDA(cudaMemcpy(y.data(), d_y, y.size() * sizeof(__nv_bfloat16), cudaMemcpyDeviceToHost));
    int bad = 0;
    for (int64_t e = 0; e < M * N; ++e) {
      const double got = __bfloat162float(y[e]);
      if (!(std::fabs(got - expected[e]) <= 2e-2 + 2e-2 * std::fabs(expected[e]))) ++bad;
    }
    std::printf("%s path: %d out of tolerance\n", path == peftkern::kMultiLoraDecode ? "decode" : "prefill", bad);
    bad_total += bad;
    if (workspace != nullptr) CHECK_CUDA(cudaFree(workspace));
  }
  std::printf("%d out of tolerance\n", bad_total);
  return bad_total == 0 ? 0 : 1;
}
