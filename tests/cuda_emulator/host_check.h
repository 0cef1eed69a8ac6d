// Host-side helpers shared by the emulator test programs (*_emulated.cpp): a deterministic random stream,
// the failure count, per-dtype tolerances, 2-D layouts under test, and exactly-sized strided buffers whose
// padding is NaN. Header-only; include it after emulate.h (which must come first) and the kernel header.
#pragma once

#include <peftkern/common.cuh>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <type_traits>

namespace host_check {

// A 32-bit LCG: each program seeds it once (seed()) so that its inputs are the same on every machine.
inline uint32_t rng_state = 1;
inline void seed(uint32_t state) { rng_state = state; }
inline uint32_t next_u32() {  // 24 random bits
  rng_state = rng_state * 1664525u + 1013904223u;
  return rng_state >> 8;
}
inline float uniform_pm1() { return static_cast<float>(next_u32()) / 8388608.0f - 1.0f; }

// Failures so far; the first 40 are printed, so a broken kernel does not bury the summary line.
inline int failures = 0;
inline void fail(const std::string& message) {
  if (++failures <= 40) std::printf("FAIL %s\n", message.c_str());
}
inline void fail(const std::string& label, const std::string& what) { fail(label + ": " + what); }

template <typename T>
double tolerance() {
  if constexpr (std::is_same_v<T, float>) return 1e-4;
  if constexpr (std::is_same_v<T, half>) return 1e-2;
  return 2e-2;
}

// |got - want| <= tol (1 + |want|) with T's tolerance times `scale`; NaN is never close.
template <typename T>
bool close(double got, double want, double scale = 1.0) {
  const double tol = tolerance<T>() * scale;
  return std::fabs(got - want) <= tol + tol * std::fabs(want);
}

template <typename T>
void expect_close(const char* what, const std::string& label, double got, double want, double scale = 1.0) {
  if (!close<T>(got, want, scale)) {
    if (++failures <= 40) std::printf("FAIL %s %s: got %.6g, want %.6g\n", label.c_str(), what, got, want);
  }
}

// Strides of a [rows, cols] matrix: kind 0 contiguous, 1 transposed storage (column-major), 2 every row
// padded to an odd stride (never 16-byte aligned).
struct Strides2D {
  int64_t s0, s1;
};
inline Strides2D matrix_strides(int kind, int64_t rows, int64_t cols) {
  if (kind == 1) return {1, rows};
  if (kind == 2) return {2 * cols + 3, 1};
  return {cols, 1};
}

// A [d0, d1, d2] array with strides s0..s2 in an allocation of exactly the span they reach (so
// AddressSanitizer catches any access outside it), every element NaN until written.
template <typename T>
struct HostTensor {
  int64_t d0, d1, d2, s0, s1, s2;
  std::unique_ptr<T[]> data;

  HostTensor(int64_t n0, int64_t n1, int64_t n2, int64_t st0, int64_t st1, int64_t st2)
      : d0(n0), d1(n1), d2(n2), s0(st0), s1(st1), s2(st2) {
    const bool empty = n0 == 0 || n1 == 0 || n2 == 0;
    const int64_t span = empty ? 1 : (n0 - 1) * st0 + (n1 - 1) * st1 + (n2 - 1) * st2 + 1;
    data.reset(new T[span]);
    for (int64_t i = 0; i < span; ++i) data[i] = peftkern::detail::from_float<T>(NAN);
  }
  // Every element addressed set to uniform_pm1() * scale in index order (zero when !fill); padding NaN.
  HostTensor(int64_t n0, int64_t n1, int64_t n2, int64_t st0, int64_t st1, int64_t st2, float scale, bool fill = true)
      : HostTensor(n0, n1, n2, st0, st1, st2) {
    for (int64_t a = 0; a < n0; ++a)
      for (int64_t i = 0; i < n1; ++i)
        for (int64_t j = 0; j < n2; ++j) at(a, i, j) = peftkern::detail::from_float<T>(fill ? uniform_pm1() * scale : 0.0f);
  }

  T& at(int64_t a, int64_t i, int64_t j) { return data[a * s0 + i * s1 + j * s2]; }
  double get(int64_t a, int64_t i, int64_t j) const { return peftkern::detail::to_float(data[a * s0 + i * s1 + j * s2]); }
  // As a [d1, d2] matrix (d0 == 1).
  double get(int64_t i, int64_t j) const { return get(0, i, j); }
  peftkern::Strided2D<const T> view() const { return {data.get(), s1, s2}; }
  peftkern::Strided2D<T> mut() { return {data.get(), s1, s2}; }
};

// A [rows, cols] matrix with strides s0, s1 (a HostTensor with d0 == 1), random or zero.
template <typename T>
HostTensor<T> host_matrix(int64_t rows, int64_t cols, int64_t s0, int64_t s1, float scale, bool fill = true) {
  return HostTensor<T>(1, rows, cols, 0, s0, s1, scale, fill);
}

// The whole array as a three-stride view of the kernel header's (peftkern::Strided3D, peftkern::Stacked3D).
template <template <typename> class View, typename T>
View<const T> view3(const HostTensor<T>& t) {
  return {t.data.get(), t.s0, t.s1, t.s2};
}

// A program's command line: "--quick" runs CI's short case list instead of the full one.
inline bool quick_run(int argc, char** argv) { return argc > 1 && std::string(argv[1]) == "--quick"; }

// The last line the pytest wrappers read, "N cases, F failures"; the exit status is 1 on any failure.
inline int report(int cases) {
  std::printf("%d cases, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace host_check
