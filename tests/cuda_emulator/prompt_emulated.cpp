// Runs peftkern/prompt.cuh's launchers (prompt_concat forward, dprompts, dembed; prefix_kv forward and
// backward) on the CPU emulator (emulate.h) over odd widths, B = 0 / 1, n = 1, T = 0, mixed and out-of-range
// ids, int32 and int64 ids, every mask width and both label widths, aligned layouts (the 16-byte path),
// misaligned / padded / transposed / broadcast layouts (the element path), and every dtype pairing; checks
// every output against a float64 host loop (copies bit for bit, sums within the dtype's tolerance) and that
// each launch took the path its layout allows. Buffers hold exactly the span their strides reach, so
// AddressSanitizer flags any access outside them. Prints "N cases, F failures"; exit status 1 on any failure.
#include "emulate.h"  // must come first: it redefines the CUDA keywords the header uses

#include <peftkern/prompt.cuh>

#include "host_check.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <memory>
#include <new>
#include <numeric>
#include <string>
#include <vector>

namespace {

using host_check::close;
using host_check::fail;
using host_check::failures;
using host_check::next_u32;
using host_check::uniform_pm1;

// Element bytes poisoned with 0x7F (NaN for every float dtype, a large value for ints), 64-byte aligned,
// exactly `offset + span` elements of `bytes` each: the data starts `offset` elements in.
struct Buffer {
  void* raw = nullptr;
  char* data = nullptr;
  Buffer(int64_t span, int64_t offset, int64_t bytes) {
    const size_t total = static_cast<size_t>(std::max<int64_t>((span + offset) * bytes, 1));
    raw = ::operator new(total, std::align_val_t(64));
    std::memset(raw, 0x7F, total);
    data = static_cast<char*>(raw) + offset * bytes;
  }
  ~Buffer() { ::operator delete(raw, std::align_val_t(64)); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// Layouts under test, for a tensor of sizes `size` (row-major logical order) of `bytes`-wide elements:
//   0 contiguous                        (16-byte path when the width allows)
//   1 contiguous, base one element in   (misaligned: element path)
//   2 last dim contiguous, every row padded by 16 bytes (aligned: 16-byte path)
//   3 strides reversed (first dim fastest: the last dim is not contiguous: element path)
//   4 contiguous with stride 0 on the first dim (a broadcast gradient, as from out.sum().backward())
struct Layout {
  std::vector<int64_t> stride;
  int64_t offset;
};
Layout make_layout(int kind, const std::vector<int64_t>& size, int64_t bytes) {
  const size_t d = size.size();
  Layout l{std::vector<int64_t>(d, 1), kind == 1 ? 1 : 0};
  if (kind == 3) {
    int64_t s = 1;
    for (size_t i = 0; i < d; ++i) {
      l.stride[i] = s;
      s *= std::max<int64_t>(size[i], 1);
    }
    return l;
  }
  int64_t s = 1;
  for (size_t i = d; i-- > 0;) {
    l.stride[i] = s;
    s *= std::max<int64_t>(size[i], 1);
    if (kind == 2 && i == d - 1) s += 16 / bytes;
  }
  if (kind == 4) l.stride[0] = 0;
  return l;
}

// A strided tensor of `bytes`-wide elements over an exactly-sized buffer.
struct Tensor {
  std::vector<int64_t> size, stride;
  int64_t bytes;
  std::unique_ptr<Buffer> buffer;
  Tensor(const std::vector<int64_t>& sizes, int kind, int64_t element_bytes) : size(sizes), bytes(element_bytes) {
    const Layout l = make_layout(kind, sizes, element_bytes);
    stride = l.stride;
    const bool empty = std::find(size.begin(), size.end(), int64_t{0}) != size.end();
    int64_t span = empty ? 0 : 1;
    for (size_t i = 0; i < size.size() && !empty; ++i) span += (size[i] - 1) * stride[i];
    buffer = std::make_unique<Buffer>(span, l.offset, bytes);
  }
  int64_t offset(std::initializer_list<int64_t> index) const {
    int64_t o = 0;
    size_t i = 0;
    for (const int64_t v : index) o += v * stride[i++];
    return o;
  }
  template <typename E>
  E* ptr() const {
    return reinterpret_cast<E*>(buffer->data);
  }
  template <typename E>
  E& at(std::initializer_list<int64_t> index) const {
    return ptr<E>()[offset(index)];
  }
  int64_t count() const {
    int64_t c = 1;
    for (const int64_t s : size) c *= s;
    return c;
  }
};

// Writes a random value in T into every logical element (the same element of a broadcast dim is written once
// per index, the last write wins: read the stored value back for the reference).
template <typename T>
void fill_random(Tensor& t, float scale) {
  const int64_t n = t.count();
  std::vector<int64_t> index(t.size.size(), 0);
  for (int64_t flat = 0; flat < n; ++flat) {
    int64_t rest = flat, o = 0;
    for (size_t d = t.size.size(); d-- > 0;) {
      index[d] = rest % t.size[d];
      rest /= t.size[d];
      o += index[d] * t.stride[d];
    }
    t.ptr<T>()[o] = peftkern::detail::from_float<T>(uniform_pm1() * scale);
  }
}

void set_id(const Tensor& t, int64_t offset, int64_t value) {
  if (t.bytes == 8) {
    t.ptr<int64_t>()[offset] = value;
  } else {
    t.ptr<int32_t>()[offset] = static_cast<int32_t>(value);
  }
}
int64_t get_id(const Tensor& t, int64_t offset) {
  return t.bytes == 8 ? t.ptr<int64_t>()[offset] : t.ptr<int32_t>()[offset];
}
uint64_t get_bits(const void* base, int64_t offset, int64_t bytes) {
  uint64_t v = 0;
  std::memcpy(&v, static_cast<const char*>(base) + offset * bytes, static_cast<size_t>(bytes));
  return v;
}
void set_bits(void* base, int64_t offset, int64_t bytes, uint64_t v) {
  std::memcpy(static_cast<char*>(base) + offset * bytes, &v, static_cast<size_t>(bytes));
}

peftkern::IdMatrix id_matrix(const Tensor& t) {
  return {t.buffer->data, t.stride[0], t.size.size() > 1 ? t.stride[1] : 0, static_cast<int>(t.bytes)};
}

std::string num(double v) {
  char text[64];
  std::snprintf(text, sizeof(text), "%.6g", v);
  return text;
}

// ---- prompt_concat ----------------------------------------------------------------------------------------

struct ConcatCase {
  int64_t B, T, n, D, V, P;
  int kind;       // layout of embed, prompts, out (0..3)
  int grad_kind;  // layout of the output gradient (0..4)
  int id_bytes;   // 4 or 8
  int mask_bytes;  // 0: no mask; else 1 (bool), 2 (fp16), 4 (fp32), 8 (int64)
  int label_bytes;  // 0: no labels; 4 or 8
  bool bad_ids;     // some prompt and token ids out of range
};

uint64_t mask_one_bits(int bytes) {
  switch (bytes) {
    case 1:
      return 1;  // bool / uint8
    case 2:
      return 0x3C00;  // fp16 1.0
    case 4:
      return 0x3F800000;  // fp32 1.0
    default:
      return 1;  // int64
  }
}
uint64_t mask_zero_bits(int) { return 0; }

template <typename T, typename TP>
void run_concat(const ConcatCase& c, int* vector_launches) {
  const std::string label = std::string("concat ") + peftkern::DType<T>::name + "/" + peftkern::DType<TP>::name +
                            " B=" + std::to_string(c.B) + " T=" + std::to_string(c.T) + " n=" + std::to_string(c.n) +
                            " D=" + std::to_string(c.D) + " V=" + std::to_string(c.V) + " P=" + std::to_string(c.P) +
                            " layout=" + std::to_string(c.kind) + "/" + std::to_string(c.grad_kind) +
                            " ids=" + std::to_string(c.id_bytes) + " mask=" + std::to_string(c.mask_bytes) +
                            " labels=" + std::to_string(c.label_bytes) + (c.bad_ids ? " bad-ids" : "");
  const int64_t total = c.n + c.T;
  Tensor embed({c.V, c.D}, c.kind, sizeof(T));
  Tensor prompts({c.P, c.n, c.D}, c.kind, sizeof(TP));
  Tensor out({c.B, total, c.D}, c.kind == 3 ? 0 : c.kind, sizeof(T));  // outputs: never transposed
  fill_random<T>(embed, 1.0f);
  fill_random<TP>(prompts, 1.0f);
  const int id_kind = c.kind == 3 ? 3 : 0;
  Tensor input_ids({c.B, c.T}, id_kind, c.id_bytes);
  Tensor prompt_ids({c.B}, 0, c.id_bytes);
  for (int64_t b = 0; b < c.B; ++b) {
    set_id(prompt_ids, b, static_cast<int64_t>(next_u32() % c.P));
    for (int64_t t = 0; t < c.T; ++t) set_id(input_ids, input_ids.offset({b, t}), next_u32() % c.V);
  }
  if (c.bad_ids && c.B > 0) {
    set_id(prompt_ids, 0, c.P);  // one past the last task
    if (c.B > 1) set_id(prompt_ids, c.B - 1, -1);
    if (c.T > 0) set_id(input_ids, input_ids.offset({0, 0}), c.V);
    if (c.T > 1) set_id(input_ids, input_ids.offset({c.B - 1, c.T - 1}), -5);
  }
  const int out_mask_bytes = c.mask_bytes ? c.mask_bytes : 8;
  Tensor mask({c.B, c.T}, id_kind, c.mask_bytes ? c.mask_bytes : 1);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t)
      set_bits(mask.buffer->data, mask.offset({b, t}), mask.bytes,
               next_u32() % 3 ? mask_one_bits(c.mask_bytes) : mask_zero_bits(c.mask_bytes));
  Tensor mask_out({c.B, total}, 0, out_mask_bytes);
  Tensor labels({c.B, c.T}, id_kind, c.label_bytes ? c.label_bytes : 4);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t) set_id(labels, labels.offset({b, t}), static_cast<int64_t>(next_u32() % 50) - 3);
  Tensor labels_out({c.B, total}, 0, c.label_bytes ? c.label_bytes : 4);

  peftkern::PromptConcatArgs<T, TP> a{};
  a.input_ids = id_matrix(input_ids);
  a.prompt_ids = id_matrix(prompt_ids);
  a.embed = embed.ptr<const T>();
  a.embed_stride0 = embed.stride[0];
  a.embed_stride1 = embed.stride[1];
  a.prompts = prompts.ptr<const TP>();
  a.prompts_stride0 = prompts.stride[0];
  a.prompts_stride1 = prompts.stride[1];
  a.prompts_stride2 = prompts.stride[2];
  a.out = out.ptr<T>();
  a.out_stride0 = out.stride[0];
  a.out_stride1 = out.stride[1];
  a.out_stride2 = out.stride[2];
  a.mask = {c.mask_bytes ? mask.buffer->data : nullptr, mask.stride[0], mask.stride[1], c.mask_bytes};
  a.mask_out = mask_out.buffer->data;
  a.mask_bytes = out_mask_bytes;
  a.mask_one = mask_one_bits(c.mask_bytes);
  a.labels = {c.label_bytes ? labels.buffer->data : nullptr, labels.stride[0], labels.stride[1], c.label_bytes};
  a.labels_out = c.label_bytes ? labels_out.buffer->data : nullptr;
  a.label_fill = c.label_bytes == 8 ? static_cast<uint64_t>(int64_t{-100}) : static_cast<uint32_t>(int32_t{-100});
  a.B = c.B;
  a.length = c.T;
  a.n = c.n;
  a.D = c.D;
  a.V = c.V;
  a.P = c.P;
  constexpr int64_t kVec = 16 / sizeof(T);
  const bool expect_vector = (c.kind == 0 || c.kind == 2) && c.D % kVec == 0;
  if (peftkern::prompt_concat_vectorizable(a) != expect_vector) fail(label, "forward took the wrong path");
  *vector_launches += expect_vector;
  if (peftkern::launch_prompt_concat_forward(a, nullptr) != cudaSuccess) {
    fail(label, "forward launch error");
    return;
  }

  auto task_of = [&](int64_t b) { return get_id(prompt_ids, b); };
  auto token_of = [&](int64_t b, int64_t t) { return get_id(input_ids, input_ids.offset({b, t})); };
  int64_t bad = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t s = 0; s < total; ++s) {
      for (int64_t d = 0; d < c.D; ++d) {
        double want = 0.0;
        if (s < c.n) {
          const int64_t p = task_of(b);
          if (p >= 0 && p < c.P)
            want = peftkern::detail::to_float(peftkern::detail::from_float<T>(peftkern::detail::to_float(prompts.at<TP>({p, s, d}))));
        } else {
          const int64_t v = token_of(b, s - c.n);
          if (v >= 0 && v < c.V) want = peftkern::detail::to_float(embed.at<T>({v, d}));
        }
        const double got = peftkern::detail::to_float(out.at<T>({b, s, d}));
        if (!(got == want) && ++bad <= 3) fail(label, "out[" + std::to_string(b) + ", " + std::to_string(s) + ", " +
                                                          std::to_string(d) + "] = " + num(got) + ", want " + num(want));
      }
      const uint64_t mask_want = (s < c.n || !c.mask_bytes)
                                     ? mask_one_bits(c.mask_bytes)
                                     : get_bits(mask.buffer->data, mask.offset({b, s - c.n}), mask.bytes);
      if (get_bits(mask_out.buffer->data, b * total + s, out_mask_bytes) != mask_want && ++bad <= 3)
        fail(label, "mask[" + std::to_string(b) + ", " + std::to_string(s) + "]");
      if (c.label_bytes) {
        const int64_t want = s < c.n ? -100 : get_id(labels, labels.offset({b, s - c.n}));
        if (get_id(labels_out, b * total + s) != want && ++bad <= 3)
          fail(label, "labels[" + std::to_string(b) + ", " + std::to_string(s) + "]");
      }
    }

  // Backward: dprompts and dembed from a random output gradient.
  Tensor grad({c.B, total, c.D}, c.grad_kind, sizeof(T));
  fill_random<T>(grad, 1.0f);
  Tensor grad_prompts({c.P, c.n, c.D}, 0, sizeof(TP));
  const bool grad_vector = (c.grad_kind == 0 || c.grad_kind == 2 || c.grad_kind == 4) && c.D % kVec == 0;
  const auto plan = peftkern::prompt_task_sum_plan(c.B, c.P, c.n, c.D);
  std::unique_ptr<Buffer> workspace;
  if (plan.workspace_floats > 0) workspace = std::make_unique<Buffer>(plan.workspace_floats, 0, sizeof(float));
  float* ws = workspace ? reinterpret_cast<float*>(workspace->data) : nullptr;
  {
    peftkern::TaskSumArgs<T, TP> ts{};
    ts.grad = grad.ptr<const T>();
    ts.stride_b = grad.stride[0];
    ts.stride_j = grad.stride[1];
    ts.stride_c0 = grad.stride[2];
    ts.out = grad_prompts.ptr<TP>();
    ts.C = ts.inner0 = c.D;
    ts.inner1 = 1;
    if (peftkern::prompt_task_sum_vectorizable(ts, ws) != grad_vector) fail(label, "dprompts took the wrong path");
  }
  if (peftkern::launch_prompt_concat_prompts_grad<T, TP>(grad.ptr<const T>(), grad.stride[0], grad.stride[1],
                                                         grad.stride[2], id_matrix(prompt_ids), grad_prompts.ptr<TP>(),
                                                         c.B, c.P, c.n, c.D, ws, nullptr) != cudaSuccess) {
    fail(label, "dprompts launch error");
    return;
  }
  for (int64_t p = 0; p < c.P; ++p)
    for (int64_t j = 0; j < c.n; ++j)
      for (int64_t d = 0; d < c.D; ++d) {
        double want = 0.0;
        for (int64_t b = 0; b < c.B; ++b)
          if (task_of(b) == p) want += peftkern::detail::to_float(grad.at<T>({b, j, d}));
        const double got = peftkern::detail::to_float(grad_prompts.at<TP>({p, j, d}));
        if (!close<T>(got, want) && ++bad <= 6)
          fail(label, "dprompts[" + std::to_string(p) + ", " + std::to_string(j) + ", " + std::to_string(d) +
                          "] = " + num(got) + ", want " + num(want) + " (splits " + std::to_string(plan.splits) + ")");
      }

  // dembed: the segments the Python launcher builds with torch.sort(stable=True) + searchsorted.
  std::vector<int64_t> order(static_cast<size_t>(c.B * c.T));
  std::iota(order.begin(), order.end(), 0);
  auto flat_id = [&](int64_t flat) { return token_of(flat / c.T, flat % c.T); };
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return flat_id(x) < flat_id(y); });
  Tensor order_t({c.B * c.T}, 0, 8), starts_t({c.V + 1}, 0, 8);
  for (size_t i = 0; i < order.size(); ++i) order_t.ptr<int64_t>()[i] = order[i];
  for (int64_t v = 0; v <= c.V; ++v) {
    int64_t count = 0;
    for (const int64_t flat : order) count += flat_id(flat) < v;
    starts_t.ptr<int64_t>()[v] = count;
  }
  Tensor grad_embed({c.V, c.D}, 0, sizeof(T));
  peftkern::EmbedGradArgs<T> e{};
  e.grad = grad.ptr<const T>();
  e.grad_stride0 = grad.stride[0];
  e.grad_stride1 = grad.stride[1];
  e.grad_stride2 = grad.stride[2];
  e.order = order_t.ptr<const int64_t>();
  e.starts = starts_t.ptr<const int64_t>();
  e.out = grad_embed.ptr<T>();
  e.B = c.B;
  e.length = c.T;
  e.n = c.n;
  e.D = c.D;
  e.V = c.V;
  if (peftkern::prompt_embed_grad_vectorizable(e) != grad_vector) fail(label, "dembed took the wrong path");
  if (peftkern::launch_prompt_embed_grad(e, nullptr) != cudaSuccess) {
    fail(label, "dembed launch error");
    return;
  }
  std::vector<double> want_embed(static_cast<size_t>(c.V * c.D), 0.0);
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t) {
      const int64_t v = token_of(b, t);
      if (v < 0 || v >= c.V) continue;
      for (int64_t d = 0; d < c.D; ++d) want_embed[v * c.D + d] += peftkern::detail::to_float(grad.at<T>({b, c.n + t, d}));
    }
  for (int64_t v = 0; v < c.V; ++v)
    for (int64_t d = 0; d < c.D; ++d) {
      const double got = peftkern::detail::to_float(grad_embed.at<T>({v, d}));
      if (!close<T>(got, want_embed[v * c.D + d]) && ++bad <= 9)
        fail(label, "dembed[" + std::to_string(v) + ", " + std::to_string(d) + "] = " + num(got) + ", want " +
                        num(want_embed[v * c.D + d]));
    }
}

// ---- prefix_kv --------------------------------------------------------------------------------------------

struct PrefixCase {
  int64_t L, H, hd, n, B, P;
  int kind;       // layout of prefix (0..3)
  int grad_kind;  // 0 contiguous, 1 misaligned, 2 padded head_dim rows, 3 [L, 2, H, B, n, hd] storage
  int id_bytes;
  bool bad_ids;
};

template <typename T>
void run_prefix(const PrefixCase& c, int* vector_launches) {
  const std::string label = std::string("prefix ") + peftkern::DType<T>::name + " L=" + std::to_string(c.L) +
                            " H=" + std::to_string(c.H) + " hd=" + std::to_string(c.hd) + " n=" + std::to_string(c.n) +
                            " B=" + std::to_string(c.B) + " P=" + std::to_string(c.P) + " layout=" +
                            std::to_string(c.kind) + "/" + std::to_string(c.grad_kind) + (c.bad_ids ? " bad-ids" : "");
  const int64_t C = c.L * 2 * c.H * c.hd;
  Tensor prefix({c.P, c.n, C}, c.kind, sizeof(T));
  fill_random<T>(prefix, 1.0f);
  Tensor prompt_ids({c.B}, 0, c.id_bytes);
  for (int64_t b = 0; b < c.B; ++b) set_id(prompt_ids, b, static_cast<int64_t>(next_u32() % c.P));
  if (c.bad_ids && c.B > 0) {
    set_id(prompt_ids, 0, -1);
    if (c.B > 2) set_id(prompt_ids, 2, c.P + 3);
  }
  auto task_of = [&](int64_t b) { return get_id(prompt_ids, b); };
  Tensor out({c.L, 2, c.B, c.H, c.n, c.hd}, 0, sizeof(T));
  peftkern::PrefixKvArgs<T> a{};
  a.prefix = prefix.ptr<const T>();
  a.prefix_stride0 = prefix.stride[0];
  a.prefix_stride1 = prefix.stride[1];
  a.prefix_stride2 = prefix.stride[2];
  a.prompt_ids = id_matrix(prompt_ids);
  a.out = out.ptr<T>();
  a.out_stride_b = out.stride[2];
  a.out_stride_j = out.stride[4];
  a.out_stride_c2 = out.stride[1];
  a.out_stride_c1 = out.stride[3];
  a.out_stride_c0 = out.stride[5];
  a.B = c.B;
  a.P = c.P;
  a.n = c.n;
  a.C = C;
  a.inner1 = c.H;
  a.inner0 = c.hd;
  constexpr int64_t kVec = 16 / sizeof(T);
  const bool expect_vector = (c.kind == 0 || c.kind == 2) && c.hd % kVec == 0;
  if (peftkern::prefix_kv_vectorizable(a) != expect_vector) fail(label, "forward took the wrong path");
  *vector_launches += expect_vector;
  if (peftkern::launch_prefix_kv_forward(a, nullptr) != cudaSuccess) {
    fail(label, "forward launch error");
    return;
  }
  int64_t bad = 0;
  for (int64_t l = 0; l < c.L; ++l)
    for (int64_t kv = 0; kv < 2; ++kv)
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t h = 0; h < c.H; ++h)
          for (int64_t j = 0; j < c.n; ++j)
            for (int64_t d = 0; d < c.hd; ++d) {
              const int64_t p = task_of(b);
              const int64_t col = ((l * 2 + kv) * c.H + h) * c.hd + d;
              const double want = (p >= 0 && p < c.P) ? peftkern::detail::to_float(prefix.at<T>({p, j, col})) : 0.0;
              const double got = peftkern::detail::to_float(out.at<T>({l, kv, b, h, j, d}));
              if (!(got == want) && ++bad <= 3)
                fail(label, "out[" + std::to_string(l) + ", " + std::to_string(kv) + ", " + std::to_string(b) + ", " +
                                std::to_string(h) + ", " + std::to_string(j) + ", " + std::to_string(d) + "] = " +
                                num(got) + ", want " + num(want));
            }

  // Backward from a cache gradient in one of the layouts; index order (l, kv, b, h, j, d) throughout.
  std::unique_ptr<Tensor> grad;
  int64_t gs[6];
  if (c.grad_kind == 3) {
    grad = std::make_unique<Tensor>(std::vector<int64_t>{c.L, 2, c.H, c.B, c.n, c.hd}, 0, sizeof(T));
    const auto& s = grad->stride;
    const int64_t swapped[6] = {s[0], s[1], s[3], s[2], s[4], s[5]};
    std::copy(swapped, swapped + 6, gs);
  } else {
    grad = std::make_unique<Tensor>(std::vector<int64_t>{c.L, 2, c.B, c.H, c.n, c.hd}, c.grad_kind, sizeof(T));
    std::copy(grad->stride.begin(), grad->stride.end(), gs);
  }
  fill_random<T>(*grad, 1.0f);
  auto grad_at = [&](int64_t l, int64_t kv, int64_t b, int64_t h, int64_t j, int64_t d) {
    return peftkern::detail::to_float(grad->ptr<T>()[l * gs[0] + kv * gs[1] + b * gs[2] + h * gs[3] + j * gs[4] + d * gs[5]]);
  };
  Tensor grad_prefix({c.P, c.n, C}, 0, sizeof(T));
  const auto plan = peftkern::prompt_task_sum_plan(c.B, c.P, c.n, C);
  std::unique_ptr<Buffer> workspace;
  if (plan.workspace_floats > 0) workspace = std::make_unique<Buffer>(plan.workspace_floats, 0, sizeof(float));
  if (peftkern::launch_prefix_kv_backward<T>(grad->ptr<const T>(), gs, id_matrix(prompt_ids), grad_prefix.ptr<T>(),
                                             c.L, c.B, c.H, c.n, c.hd, c.P,
                                             workspace ? reinterpret_cast<float*>(workspace->data) : nullptr,
                                             nullptr) != cudaSuccess) {
    fail(label, "backward launch error");
    return;
  }
  for (int64_t p = 0; p < c.P; ++p)
    for (int64_t j = 0; j < c.n; ++j)
      for (int64_t l = 0; l < c.L; ++l)
        for (int64_t kv = 0; kv < 2; ++kv)
          for (int64_t h = 0; h < c.H; ++h)
            for (int64_t d = 0; d < c.hd; ++d) {
              double want = 0.0;
              for (int64_t b = 0; b < c.B; ++b)
                if (task_of(b) == p) want += grad_at(l, kv, b, h, j, d);
              const int64_t col = ((l * 2 + kv) * c.H + h) * c.hd + d;
              const double got = peftkern::detail::to_float(grad_prefix.at<T>({p, j, col}));
              if (!close<T>(got, want) && ++bad <= 6)
                fail(label, "dprefix[" + std::to_string(p) + ", " + std::to_string(j) + ", " + std::to_string(col) +
                                "] = " + num(got) + ", want " + num(want) + " (splits " +
                                std::to_string(plan.splits) + ")");
            }
}

// ---- the case lists -----------------------------------------------------------------------------------------

// (B, T, n, D, V, P, layout, grad layout, id bytes, mask bytes, label bytes, bad ids)
const ConcatCase kConcat[] = {
    {3, 5, 2, 16, 11, 3, 0, 0, 8, 8, 8, false},    // aligned: 16-byte path everywhere (D a multiple of 8)
    {3, 5, 2, 17, 11, 3, 0, 0, 4, 1, 4, true},     // odd D: element path; bad ids; bool mask, int32 ids/labels
    {2, 3, 1, 33, 7, 2, 1, 1, 8, 2, 0, false},     // misaligned bases; fp16 mask; n = 1; no labels
    {1, 4, 3, 1, 5, 1, 3, 3, 4, 0, 8, true},       // D = 1, B = 1, transposed; no mask
    {2, 0, 3, 24, 6, 2, 2, 2, 8, 4, 4, false},     // T = 0 (prompt only), padded rows; fp32 mask
    {70, 2, 2, 8, 9, 3, 0, 4, 8, 8, 0, true},      // B = 70: the task sum splits the batch; broadcast gradient
    {2, 3, 2, 4104, 5, 2, 0, 2, 8, 0, 8, false},   // 4096-ish width, 16-byte path, several column chunks
    {2, 2, 1, 4097, 3, 2, 1, 3, 4, 1, 0, false},   // 4096-ish odd width, element path
    {0, 3, 2, 16, 4, 2, 0, 0, 8, 8, 8, false},     // B = 0: no rows, dprompts zero
    {33, 3, 2, 40, 13, 5, 2, 0, 4, 2, 8, true},    // mixed tasks, padded, splits with partial row blocks
};

// (L, H, hd, n, B, P, layout, grad layout, id bytes, bad ids)
const PrefixCase kPrefix[] = {
    {2, 3, 8, 3, 4, 3, 0, 0, 8, false},   // head_dim a multiple of 8: 16-byte path
    {1, 1, 1, 1, 1, 1, 3, 1, 4, false},   // everything 1, transposed table, misaligned gradient
    {3, 2, 5, 2, 5, 2, 1, 2, 4, true},    // odd head_dim, misaligned table, bad ids
    {2, 2, 16, 2, 70, 3, 2, 3, 8, true},  // B = 70: split batch; padded table; [L, 2, H, B, n, hd] gradient
    {2, 4, 12, 1, 3, 4, 0, 2, 8, false},  // head_dim 12: 16-byte path for fp32 only
    {1, 2, 8, 2, 0, 2, 0, 0, 8, false},   // B = 0
};

template <typename T, typename TP>
int run_concat_cases(std::initializer_list<int> which, int* vector_launches) {
  int cases = 0;
  for (int i : which) {
    run_concat<T, TP>(kConcat[i], vector_launches);
    ++cases;
  }
  return cases;
}

template <typename T>
int run_prefix_cases(std::initializer_list<int> which, int* vector_launches) {
  int cases = 0;
  for (int i : which) {
    run_prefix<T>(kPrefix[i], vector_launches);
    ++cases;
  }
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  host_check::seed(2024);
  const bool quick = host_check::quick_run(argc, argv);
  int cases = 0, vector_launches = 0;
  const auto all_concat = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9};
  const auto all_prefix = {0, 1, 2, 3, 4, 5};
  if (quick) {
    cases += run_concat_cases<float, float>(all_concat, &vector_launches);
    cases += run_concat_cases<half, half>({0, 1, 3, 5, 6}, &vector_launches);
    cases += run_concat_cases<half, float>({0, 2, 4, 9}, &vector_launches);
    cases += run_concat_cases<__nv_bfloat16, __nv_bfloat16>({1, 2, 4, 7, 9}, &vector_launches);
    cases += run_concat_cases<__nv_bfloat16, float>({0, 5}, &vector_launches);
    cases += run_prefix_cases<float>(all_prefix, &vector_launches);
    cases += run_prefix_cases<half>({0, 2, 3}, &vector_launches);
    cases += run_prefix_cases<__nv_bfloat16>({1, 3, 4}, &vector_launches);
  } else {
    cases += run_concat_cases<float, float>(all_concat, &vector_launches);
    cases += run_concat_cases<half, half>(all_concat, &vector_launches);
    cases += run_concat_cases<half, float>(all_concat, &vector_launches);
    cases += run_concat_cases<__nv_bfloat16, __nv_bfloat16>(all_concat, &vector_launches);
    cases += run_concat_cases<__nv_bfloat16, float>(all_concat, &vector_launches);
    cases += run_prefix_cases<float>(all_prefix, &vector_launches);
    cases += run_prefix_cases<half>(all_prefix, &vector_launches);
    cases += run_prefix_cases<__nv_bfloat16>(all_prefix, &vector_launches);
  }
  if (vector_launches == 0) {
    std::printf("FAIL: no case took the 16-byte path\n");
    ++failures;
  }
  return host_check::report(cases);
}
