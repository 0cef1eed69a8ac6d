// Runs peftkern/multi_lora.cuh's launchers on the CPU emulator (emulate.h): the device segment table
// against a host stable sort, and the forward (decode and prefill paths) and backward against float64 host
// loops, over odd sizes, strided and transposed layouts, every dtype pairing, ids -1 / out of range /
// unsorted, mixed ranks. Adapter padding past each rank is NaN, so reading past a rank poisons the result;
// buffers are sized exactly to their strides, so AddressSanitizer flags any access outside them.
// Prints one line per failure and "N cases, F failures"; exit status 1 on any failure.
#include "emulate.h"  // must come first: it redefines the CUDA keywords the header uses

#include <peftkern/multi_lora.cuh>

#include "host_check.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

namespace {

using host_check::fail;
using host_check::failures;
using host_check::HostTensor;
using host_check::matrix_strides;
using host_check::next_u32;
using host_check::uniform_pm1;
using host_check::view3;

int cases = 0;

// A workspace: 256-byte aligned (as the launchers require), its size rounded up to 256 bytes.
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
using Workspace = std::unique_ptr<unsigned char, FreeDeleter>;
Workspace workspace_of(int64_t bytes) {
  const size_t size = static_cast<size_t>((std::max<int64_t>(bytes, 1) + 255) / 256 * 256);
  return Workspace(static_cast<unsigned char*>(std::aligned_alloc(256, size)));
}

// A random [rows, cols] matrix in layout `kind` (host_check::matrix_strides).
template <typename T>
HostTensor<T> matrix(int64_t rows, int64_t cols, int kind, float scale) {
  const auto s = matrix_strides(kind, rows, cols);
  return HostTensor<T>(1, rows, cols, 0, s.s0, s.s1, scale);
}

template <typename T>
void expect_close(const char* what, const std::string& label, int64_t i, int64_t j, double got, double want) {
  if (!host_check::close<T>(got, want)) {
    fail(label + " " + what + "[" + std::to_string(i) + ", " + std::to_string(j) + "]: got " + std::to_string(got) +
         ", want " + std::to_string(want));
  }
}

struct Problem {
  int64_t M, K, N, L, R;
  std::vector<int64_t> ids;
  std::vector<int32_t> ranks;
  std::vector<float> scalings;
  int layout;  // of x, W and dY
  bool bias;
};

// ---- the segment table against a host stable sort -------------------------------------------------------

void check_segments(const std::vector<int64_t>& ids, int64_t L, bool as_int64, const std::string& label) {
  ++cases;
  const int64_t M = static_cast<int64_t>(ids.size());
  std::vector<int32_t> ids32(ids.begin(), ids.end());
  std::unique_ptr<int64_t[]> ids64_buf(new int64_t[std::max<int64_t>(M, 1)]);
  std::unique_ptr<int32_t[]> ids32_buf(new int32_t[std::max<int64_t>(M, 1)]);
  for (int64_t t = 0; t < M; ++t) ids64_buf[t] = ids[t], ids32_buf[t] = ids32[t];
  const int64_t bytes = peftkern::multi_lora_segments_workspace_bytes(M, L);
  Workspace workspace = workspace_of(bytes);
  peftkern::MultiLoraSegments seg{};
  const void* id_ptr = as_int64 ? static_cast<const void*>(ids64_buf.get()) : static_cast<const void*>(ids32_buf.get());
  if (peftkern::launch_multi_lora_segments(id_ptr, as_int64, M, L, workspace.get(), &seg, nullptr) != cudaSuccess) {
    fail(label + ": segments launch error");
    return;
  }
  std::vector<int64_t> key(M);
  for (int64_t t = 0; t < M; ++t) key[t] = (ids[t] >= 0 && ids[t] < L) ? ids[t] + 1 : 0;
  std::vector<int64_t> perm(M);
  std::iota(perm.begin(), perm.end(), 0);
  std::stable_sort(perm.begin(), perm.end(), [&](int64_t a, int64_t b) { return key[a] < key[b]; });
  for (int64_t t = 0; t < M; ++t)
    if (seg.perm[t] != perm[t]) {
      fail(label + ": perm[" + std::to_string(t) + "] = " + std::to_string(seg.perm[t]) + ", want " +
           std::to_string(perm[t]));
      return;
    }
  std::vector<int64_t> starts(L + 1), ends(L + 1);
  for (int64_t g = 0; g <= L; ++g) {
    starts[g] = std::lower_bound(perm.begin(), perm.end(), g, [&](int64_t r, int64_t v) { return key[r] < v; }) -
                perm.begin();
    ends[g] = std::upper_bound(perm.begin(), perm.end(), g, [&](int64_t v, int64_t r) { return v < key[r]; }) -
              perm.begin();
    if (seg.bounds[g] != starts[g] || seg.bounds[L + 1 + g] != ends[g]) {
      fail(label + ": bounds of group " + std::to_string(g));
      return;
    }
  }
  const int64_t n_tiles = (M + 63) / 64 + std::min<int64_t>(L + 1, M);
  if (seg.n_tiles != n_tiles) fail(label + ": n_tiles " + std::to_string(seg.n_tiles));
  std::vector<int64_t> want;  // (adapter, start, end) per tile, then padding
  for (int64_t g = 0; g <= L; ++g)
    for (int64_t s = starts[g]; s < ends[g]; s += 64) want.insert(want.end(), {g - 1, s, ends[g]});
  if (static_cast<int64_t>(want.size()) > 3 * n_tiles) {
    fail(label + ": more tiles than the table holds");
    return;
  }
  while (static_cast<int64_t>(want.size()) < 3 * n_tiles) want.insert(want.end(), {-1, 0, 0});
  for (int64_t j = 0; j < n_tiles; ++j)
    for (int f = 0; f < 3; ++f)
      if (seg.tiles[f * n_tiles + j] != want[3 * j + f]) {
        fail(label + ": tile " + std::to_string(j) + " field " + std::to_string(f) + " = " +
             std::to_string(seg.tiles[f * n_tiles + j]) + ", want " + std::to_string(want[3 * j + f]));
        return;
      }
}

// ---- forward and backward against float64 ----------------------------------------------------------------

template <typename T, typename TA>
void run_case(const Problem& p, int path, bool ids_int64, bool need_dx, const std::string& name, bool prebuilt) {
  ++cases;
  const int64_t M = p.M, K = p.K, N = p.N, L = p.L, R = p.R;
  const std::string label = std::string(peftkern::DType<T>::name) + "/" + peftkern::DType<TA>::name + " " + name +
                            " M=" + std::to_string(M) + " K=" + std::to_string(K) + " N=" + std::to_string(N) +
                            " L=" + std::to_string(L) + " R=" + std::to_string(R) + " path=" + std::to_string(path) +
                            " layout=" + std::to_string(p.layout) + (prebuilt ? " prebuilt table" : "");
  auto x = matrix<T>(M, K, p.layout, 1.0f);
  auto w = matrix<T>(N, K, p.layout, 0.3f);
  auto dy = matrix<T>(M, N, p.layout, 1.0f);
  auto bias = matrix<T>(1, N, 0, 1.0f);
  // A [L, R, K]: padded between adapters when the layout is strided; B [L, N, R] transposed per adapter
  // when the layout is transposed. Entries past each adapter's rank stay NaN.
  const int64_t a_pad = p.layout == 2 ? 8 : 0;
  HostTensor<TA> a(L, R, K, R * K + a_pad, K, 1);
  HostTensor<TA> b = p.layout == 1 ? HostTensor<TA>(L, N, R, N * R, 1, N) : HostTensor<TA>(L, N, R, N * R, R, 1);
  auto rank_of = [&](int64_t i) { return std::clamp<int64_t>(p.ranks[i], 0, R); };
  for (int64_t i = 0; i < L; ++i)
    for (int64_t r = 0; r < rank_of(i); ++r) {
      for (int64_t k = 0; k < K; ++k) a.at(i, r, k) = peftkern::detail::from_float<TA>(uniform_pm1() * 0.3f);
      for (int64_t n = 0; n < N; ++n) b.at(i, n, r) = peftkern::detail::from_float<TA>(uniform_pm1() * 0.5f);
    }
  std::unique_ptr<int64_t[]> ids64(new int64_t[std::max<int64_t>(M, 1)]);
  std::unique_ptr<int32_t[]> ids32(new int32_t[std::max<int64_t>(M, 1)]);
  for (int64_t t = 0; t < M; ++t) ids64[t] = p.ids[t], ids32[t] = static_cast<int32_t>(p.ids[t]);
  std::unique_ptr<int32_t[]> ranks(new int32_t[L]);
  std::unique_ptr<float[]> scalings(new float[L]);
  for (int64_t i = 0; i < L; ++i) ranks[i] = p.ranks[i], scalings[i] = p.scalings[i];
  HostTensor<T> y(1, M, N, 0, N, 1), dx(1, M, K, 0, K, 1);
  HostTensor<TA> da(L, R, K, R * K, K, 1), db(L, N, R, N * R, R, 1);
  std::unique_ptr<float[]> s(new float[std::max<int64_t>(M * R, 1)]);
  const void* ids = ids_int64 ? static_cast<const void*>(ids64.get()) : static_cast<const void*>(ids32.get());

  // A segment table built once (as for every layer of a step) and handed to both launchers, or none.
  peftkern::MultiLoraSegments table{};
  Workspace table_ws = workspace_of(peftkern::multi_lora_segments_workspace_bytes(M, L));
  if (prebuilt && peftkern::launch_multi_lora_segments(ids, ids_int64, M, L, table_ws.get(), &table, nullptr) !=
                      cudaSuccess) {
    fail(label + ": segments launch error");
    return;
  }
  peftkern::MultiLoraForwardArgs<T, TA> fwd{};
  fwd.segments = prebuilt ? &table : nullptr;
  fwd.x = x.view();
  fwd.weight = w.view();
  fwd.bias = p.bias ? bias.data.get() : nullptr;
  fwd.bias_stride = 1;
  fwd.lora_a = view3<peftkern::Strided3D>(a);
  fwd.lora_b = view3<peftkern::Strided3D>(b);
  fwd.adapter_ids = ids;
  fwd.ids_int64 = ids_int64;
  fwd.scalings = scalings.get();
  fwd.ranks = ranks.get();
  fwd.s = s.get();
  fwd.y = y.mut();
  fwd.M = M, fwd.N = N, fwd.K = K, fwd.L = L, fwd.R = R;
  fwd.path = path;
  const auto fplan = peftkern::multi_lora_forward_plan(M, N, K, L, path);
  Workspace fws = workspace_of(fplan.workspace_bytes);
  if (peftkern::launch_multi_lora_forward(fwd, fplan.workspace_bytes > 0 ? fws.get() : nullptr, nullptr) !=
      cudaSuccess) {
    fail(label + ": forward launch error");
    return;
  }
  peftkern::MultiLoraBackwardArgs<T, TA> bwd{};
  bwd.segments = prebuilt ? &table : nullptr;
  bwd.grad_y = dy.view();
  bwd.x = x.view();
  bwd.weight = w.view();
  bwd.lora_a = view3<peftkern::Strided3D>(a);
  bwd.lora_b = view3<peftkern::Strided3D>(b);
  bwd.adapter_ids = ids;
  bwd.ids_int64 = ids_int64;
  bwd.scalings = scalings.get();
  bwd.ranks = ranks.get();
  bwd.s = s.get();
  bwd.grad_x = need_dx ? dx.mut() : peftkern::Strided2D<T>{nullptr, 0, 0};
  bwd.grad_a = da.data.get();
  bwd.grad_b = db.data.get();
  bwd.M = M, bwd.N = N, bwd.K = K, bwd.L = L, bwd.R = R;
  bwd.path = path;
  const auto bplan = peftkern::multi_lora_backward_plan(M, N, K, L, R, path);
  Workspace bws = workspace_of(bplan.workspace_bytes);
  if (peftkern::launch_multi_lora_backward(bwd, bws.get(), nullptr) != cudaSuccess) {
    fail(label + ": backward launch error");
    return;
  }

  // float64 reference from the stored (rounded) values.
  auto adapter = [&](int64_t t) { return (p.ids[t] >= 0 && p.ids[t] < L) ? p.ids[t] : -1; };
  std::vector<double> s_ref(M * R, 0.0), ds_ref(M * R, 0.0);
  for (int64_t t = 0; t < M; ++t) {
    const int64_t i = adapter(t);
    const int64_t rank = i >= 0 ? rank_of(i) : 0;
    for (int64_t r = 0; r < rank; ++r) {
      double acc = 0.0, dacc = 0.0;
      for (int64_t k = 0; k < K; ++k) acc += x.get(t, k) * a.get(i, r, k);
      for (int64_t n = 0; n < N; ++n) dacc += dy.get(t, n) * b.get(i, n, r);
      s_ref[t * R + r] = acc;
      ds_ref[t * R + r] = p.scalings[i] * dacc;
    }
    for (int64_t r = 0; r < R; ++r) expect_close<float>("S", label, t, r, s[t * R + r], s_ref[t * R + r]);
  }
  for (int64_t t = 0; t < M; ++t) {
    const int64_t i = adapter(t);
    const int64_t rank = i >= 0 ? rank_of(i) : 0;
    for (int64_t n = 0; n < N; ++n) {
      double acc = p.bias ? bias.get(0, n) : 0.0;
      for (int64_t k = 0; k < K; ++k) acc += x.get(t, k) * w.get(n, k);
      for (int64_t r = 0; r < rank; ++r) acc += p.scalings[i] * s_ref[t * R + r] * b.get(i, n, r);
      expect_close<T>("y", label, t, n, y.get(t, n), acc);
    }
    if (need_dx)
      for (int64_t k = 0; k < K; ++k) {
        double acc = 0.0;
        for (int64_t n = 0; n < N; ++n) acc += dy.get(t, n) * w.get(n, k);
        for (int64_t r = 0; r < rank; ++r) acc += ds_ref[t * R + r] * a.get(i, r, k);
        expect_close<T>("dX", label, t, k, dx.get(t, k), acc);
      }
  }
  for (int64_t i = 0; i < L; ++i) {
    for (int64_t r = 0; r < R; ++r) {
      const bool live = r < rank_of(i);
      for (int64_t k = 0; k < K; ++k) {
        double acc = 0.0;
        for (int64_t t = 0; t < M && live; ++t)
          if (adapter(t) == i) acc += ds_ref[t * R + r] * x.get(t, k);
        expect_close<TA>("dA", label, i * R + r, k, da.get(i, r, k), acc);
      }
      for (int64_t n = 0; n < N; ++n) {
        double acc = 0.0;
        for (int64_t t = 0; t < M && live; ++t)
          if (adapter(t) == i) acc += p.scalings[i] * dy.get(t, n) * s_ref[t * R + r];
        expect_close<TA>("dB", label, i * N + n, r, db.get(i, n, r), acc);
      }
    }
  }
}

// Ids for M rows over L slots in one of the patterns under test.
std::vector<int64_t> make_ids(const char* pattern, int64_t M, int64_t L) {
  std::vector<int64_t> ids(M);
  const std::string kind(pattern);
  for (int64_t t = 0; t < M; ++t) {
    if (kind == "one") {
      ids[t] = L - 1;
    } else if (kind == "distinct") {
      ids[t] = (M - 1 - t) % L;  // every row its own adapter (L >= M), in descending order
    } else if (kind == "mixed") {
      // unsorted, with base-only (-1) and out-of-range ids (L, L + 5, -2, -7) that act as -1
      const int64_t choices[] = {-1, 0, 1, 2, L, -2, 1, 0, L + 5, 2, -7, 1};
      ids[t] = choices[next_u32() % 12];
      if (ids[t] >= 0 && ids[t] < L) ids[t] = (ids[t] * 7 + t) % L;
    } else {  // "random"
      ids[t] = static_cast<int64_t>(next_u32() % (L + 3)) - 2;
    }
  }
  return ids;
}

Problem make_problem(int64_t M, int64_t K, int64_t N, int64_t L, int64_t R, const std::vector<int32_t>& ranks,
                     const char* ids, int layout, bool bias) {
  Problem p{M, K, N, L, R, make_ids(ids, M, L), ranks, {}, layout, bias};
  for (int64_t i = 0; i < L; ++i) p.scalings.push_back(0.5f + 0.25f * static_cast<float>(i % 5));
  return p;
}

template <typename T, typename TA>
void run_problem(const Problem& p, const std::string& name, bool both_paths = true) {
  const bool ids64 = p.M % 2 == 1;  // int64 ids on odd M, int32 on even
  if (both_paths) {
    // Transposed layouts take a prebuilt segment table (LoRABatch's case); the others build their own.
    run_case<T, TA>(p, peftkern::kMultiLoraDecode, ids64, p.layout != 2, name, p.layout == 1);
    run_case<T, TA>(p, peftkern::kMultiLoraPrefill, !ids64, true, name, p.layout == 1);
  } else {
    run_case<T, TA>(p, peftkern::kMultiLoraAuto, ids64, true, name, false);
  }
}

// The shapes: (M, K, N) odd around the 64 x 64 x 32 GEMM tiles, 16-rank chunks and 256-row sort chunks.
template <typename T, typename TA>
void run_suite(bool quick) {
  // r_max 16; slot 6 has rank 0; slots 3 and 5 hold ranks outside [0, r_max] (clamped: 16 and 0)
  const std::vector<int32_t> mixed = {4, 8, 16, 99, 4, -3, 0};
  const int layouts_quick[] = {0, 2};
  for (int layout : {0, 1, 2}) {
    if (quick && std::find(std::begin(layouts_quick), std::end(layouts_quick), layout) == std::end(layouts_quick))
      continue;
    run_problem<T, TA>(make_problem(17, 33, 40, 7, 16, mixed, "mixed", layout, true), "mixed ranks");
    run_problem<T, TA>(make_problem(33, 40, 17, 3, 16, {16, 4, 8}, "one", layout, layout != 1), "one adapter");
    if (!quick || layout == 0) {
      std::vector<int32_t> ranks(40);
      for (int i = 0; i < 40; ++i) ranks[i] = (i % 3 == 0) ? 4 : (i % 3 == 1 ? 8 : 16);
      run_problem<T, TA>(make_problem(33, 24, 20, 40, 16, ranks, "distinct", layout, true), "distinct adapters");
    }
  }
  run_problem<T, TA>(make_problem(1, 17, 33, 2, 8, {8, 3}, "random", 0, true), "one row");
  run_problem<T, TA>(make_problem(0, 9, 5, 3, 16, {4, 8, 16}, "random", 0, true), "empty");
  // Deep reductions: the decode GEMMs split them (K = 520: 3 splits forward; N = 300: 2 splits for dX).
  // (the auto path, M = 5: decode), in the quick list for fp32 and bf16 only.
  if (!quick || std::is_same_v<T, TA>)
    run_problem<T, TA>(make_problem(5, 520, 300, 3, 16, {16, 8, 4}, "mixed", quick ? 0 : 2, true), "split", false);
  if (!quick) {
    // ranks past one chunk (R = 20), and M past the decode limit on the auto path (prefill)
    run_problem<T, TA>(make_problem(70, 72, 70, 3, 20, {20, 3, 17}, "mixed", 0, true), "R=20");
    run_problem<T, TA>(make_problem(130, 40, 66, 4, 16, {16, 4, 8, 12}, "random", 2, true), "auto", false);
  }
}

}  // namespace

int main(int argc, char** argv) {
  host_check::seed(98765);
  const bool quick = host_check::quick_run(argc, argv);
  // The segment table: host stable sort, int32 and int64 ids, -1 / out of range / unsorted, tiles split
  // inside a group (> 64 rows of one adapter), several 256-row sort chunks, M = 0 and 1, L = 1.
  for (int64_t M : {0, 1, 17, 64, 65, 300, 600}) {
    for (int64_t L : {1, 3, 40}) {
      if (quick && M == 600 && L != 3) continue;
      for (const char* pattern : {"one", "mixed", "random"}) {
        check_segments(make_ids(pattern, M, L), L, M % 2 == 0, std::string("segments ") + pattern + " M=" +
                                                                   std::to_string(M) + " L=" + std::to_string(L));
      }
    }
  }
  run_suite<float, float>(quick);
  run_suite<half, float>(quick);
  run_suite<__nv_bfloat16, __nv_bfloat16>(quick);
  if (!quick) run_suite<half, half>(quick);
  if (quick) {  // one more pairing on the mixed problem
    run_problem<half, half>(make_problem(17, 33, 40, 7, 16, {4, 8, 16, 16, 4, 8, 0}, "mixed", 0, true), "mixed ranks");
    run_problem<__nv_bfloat16, float>(make_problem(33, 40, 17, 3, 16, {16, 4, 8}, "mixed", 2, true), "mixed");
  } else {
    run_suite<__nv_bfloat16, float>(quick);
  }
  return host_check::report(cases);
}
