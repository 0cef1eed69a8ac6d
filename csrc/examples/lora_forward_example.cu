// Vendoring example: the fused LoRA forward from the header alone (no Python, no torch), checked against a
// host loop. Build: `make cuda-example` (or nvcc -std=c++17 -I csrc/include this_file.cu).
// Exit status: 0 checked and right, 1 wrong or a CUDA error, 2 no CUDA device here (compiled, not run).
#include <peftkern/lora.cuh>

#include <cmath>
#include <cstdio>
#include <vector>

#include "example_util.h"

using example::no_cuda_device;
using example::random_values;
using example::to_device;

int main() {
  if (no_cuda_device()) return 2;

  // Odd sizes: no dimension is a multiple of a tile.
  const int64_t M = 37, K = 70, N = 45, R = 5;
  const float scaling = 0.5f, dropout_p = 0.25f;
  const int64_t seed = 0x123456789abcLL;  // the high word matters: it is half of the Philox key
  uint32_t state = 42;
  const std::vector<half> x = random_values<half>(M * K, &state, 1.0f);
  const std::vector<half> w = random_values<half>(N * K, &state, 0.1f);
  const std::vector<half> bias = random_values<half>(N, &state, 1.0f);
  const std::vector<half> a = random_values<half>(R * K, &state, 0.1f);
  const std::vector<half> b = random_values<half>(N * R, &state, 0.5f);

  half *d_x = to_device(x), *d_w = to_device(w), *d_bias = to_device(bias), *d_a = to_device(a),
       *d_b = to_device(b);
  int64_t* d_seed = to_device(std::vector<int64_t>{seed});
  half* d_y = nullptr;
  float* d_s = nullptr;
  CHECK_CUDA(cudaMalloc(&d_y, M * N * sizeof(half)));
  CHECK_CUDA(cudaMalloc(&d_s, M * R * sizeof(float)));
  if (!d_x || !d_w || !d_bias || !d_a || !d_b || !d_seed) {
    std::fprintf(stderr, "cudaMalloc/cudaMemcpy of the inputs failed\n");
    return 1;
  }

  peftkern::LoraForwardArgs<half, half> args{};
  args.x = {d_x, K, 1};
  args.weight = {d_w, K, 1};
  args.bias = d_bias;
  args.bias_stride = 1;
  args.lora_a = {d_a, K, 1};
  args.lora_b = {d_b, R, 1};
  args.s = d_s;
  args.y = {d_y, N, 1};
  args.M = M;
  args.N = N;
  args.K = K;
  args.R = R;
  args.scaling = scaling;
  args.dropout_p = dropout_p;
  args.seed = d_seed;
  CHECK_CUDA(peftkern::launch_lora_forward(args, /*stream=*/0));
  CHECK_CUDA(cudaDeviceSynchronize());

  std::vector<half> y(M * N);
  std::vector<float> s(M * R);
  CHECK_CUDA(cudaMemcpy(y.data(), d_y, y.size() * sizeof(half), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(s.data(), d_s, s.size() * sizeof(float), cudaMemcpyDeviceToHost));

  // The host loop: the same formula, in double, with the mask from the same Philox function.
  double worst_y = 0.0, worst_s = 0.0;
  int bad = 0;
  for (int64_t m = 0; m < M; ++m) {
    std::vector<double> s_ref(R, 0.0);
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t k = 0; k < K; ++k) {
        const bool keep = peftkern::dropout_keep(seed, m, k, K, dropout_p);
        s_ref[r] += keep ? double(__half2float(x[m * K + k])) * __half2float(a[r * K + k]) : 0.0;
      }
      s_ref[r] /= 1.0 - dropout_p;
      const double err = std::fabs(s[m * R + r] - s_ref[r]);
      worst_s = std::fmax(worst_s, err);
      if (err > 1e-4 + 1e-4 * std::fabs(s_ref[r])) ++bad;
    }
    for (int64_t n = 0; n < N; ++n) {
      double ref = __half2float(bias[n]);
      for (int64_t k = 0; k < K; ++k) ref += double(__half2float(x[m * K + k])) * __half2float(w[n * K + k]);
      for (int64_t r = 0; r < R; ++r) ref += scaling * s_ref[r] * __half2float(b[n * R + r]);
      const double err = std::fabs(__half2float(y[m * N + n]) - ref);
      worst_y = std::fmax(worst_y, err);
      if (err > 1e-2 + 1e-2 * std::fabs(ref)) ++bad;
    }
  }
  std::printf("lora forward [M=%lld, K=%lld, N=%lld, r=%lld, p=%.2f]: max |y - ref| = %.3g, max |s - ref| = %.3g, "
              "%d out of tolerance\n",
              static_cast<long long>(M), static_cast<long long>(K), static_cast<long long>(N),
              static_cast<long long>(R), dropout_p, worst_y, worst_s, bad);
  cudaFree(d_x);
  cudaFree(d_w);
  cudaFree(d_bias);
  cudaFree(d_a);
  cudaFree(d_b);
  cudaFree(d_seed);
  cudaFree(d_y);
  cudaFree(d_s);
  return bad == 0 ? 0 : 1;
}
