// peftkern._cpu: the dropout keep-mask of peftkern.reference.dropout_mask, for the torch backend on the CPU.
//
// Bit-exact with the reference (and with tl.rand on the GPU): element i of a row-major [rows, cols] mask is
// kept when the first word of Philox-4x32-10 at counter (lo32(i), hi32(i), 0, 0) under key (lo32(seed),
// hi32(seed)), read as int32, folded onto [0, 2**31) (x < 0 -> ~x), converted to float32 and scaled by
// kUniformScale, is at least p (as float32). On x86-64 the Philox rounds run in AVX-512 or AVX2 (chosen at
// run time), elsewhere in plain C++; the work is split over threads with the GIL released. No torch: the
// caller passes the output's address, as peftkern._C does.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define PEFTKERN_X86_SIMD 1
#endif

namespace {

constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr float kUniformScale = 4.6566127342e-10f;
// Counters per block: several independent vectors in flight hide the multiplies' latency.
constexpr int64_t kLanes = 32;
// Below this many elements one thread is faster than starting others.
constexpr int64_t kMinPerThread = 1 << 16;

// words[lane] = first output word of Philox-4x32-10 at counter first + lane, for lane in [0, kLanes).
using BlockFn = void (*)(uint32_t key0, uint32_t key1, uint64_t first, uint32_t* words);

void philox_block_scalar(uint32_t key0, uint32_t key1, uint64_t first, uint32_t* words) {
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    const uint64_t counter = first + static_cast<uint64_t>(lane);
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = key0, k1 = key1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t product_b = static_cast<uint64_t>(kRoundB) * c2;
      const uint64_t product_a = static_cast<uint64_t>(kRoundA) * c0;
      c0 = static_cast<uint32_t>(product_b >> 32) ^ c1 ^ k0;
      c2 = static_cast<uint32_t>(product_a >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(product_b);
      c3 = static_cast<uint32_t>(product_a);
      k0 += kKeyA;
      k1 += kKeyB;
    }
    words[lane] = c0;
  }
}

#ifdef PEFTKERN_X86_SIMD
// Each 64-bit lane carries one counter's 32-bit words in its low half. Only low halves are ever read
// (mul_epu32 multiplies them, the final store keeps them), so high halves may hold anything and nothing is
// masked: a round is two multiplies, two shifts and four xors per vector of counters.
#define PEFTKERN_PHILOX_BLOCK(NAME, TARGET, VEC, P, XOR, SET1, LANES_PER_VEC, IOTA)                               \
  __attribute__((target(TARGET))) void NAME(uint32_t key0, uint32_t key1, uint64_t first, uint32_t* words) { \
    constexpr int kVecs = kLanes / (LANES_PER_VEC);                                                        \
    VEC c0[kVecs], c1[kVecs], c2[kVecs], c3[kVecs];                                                        \
    const VEC iota = IOTA;                                                                                 \
    for (int v = 0; v < kVecs; ++v) {                                                                      \
      const VEC counter = P##_add_epi64(                                                                   \
          iota, SET1(static_cast<long long>(first + static_cast<uint64_t>(v * (LANES_PER_VEC))))); \
      c0[v] = counter;                                                                                     \
      c1[v] = P##_srli_epi64(counter, 32);                                                                 \
      c2[v] = P##_setzero_si##XOR();                                                                       \
      c3[v] = c2[v];                                                                                       \
    }                                                                                                      \
    const VEC round_a = SET1(kRoundA), round_b = SET1(kRoundB);                      \
    uint32_t k0 = key0, k1 = key1;                                                                         \
    for (int round = 0; round < 10; ++round) {                                                             \
      const VEC key_a = SET1(k0), key_b = SET1(k1);                                  \
      for (int v = 0; v < kVecs; ++v) {                                                                    \
        const VEC product_b = P##_mul_epu32(c2[v], round_b);                                               \
        const VEC product_a = P##_mul_epu32(c0[v], round_a);                                               \
        c0[v] = P##_xor_si##XOR(P##_xor_si##XOR(P##_srli_epi64(product_b, 32), c1[v]), key_a);            \
        c2[v] = P##_xor_si##XOR(P##_xor_si##XOR(P##_srli_epi64(product_a, 32), c3[v]), key_b);            \
        c1[v] = product_b;                                                                                 \
        c3[v] = product_a;                                                                                 \
      }                                                                                                    \
      k0 += kKeyA;                                                                                         \
      k1 += kKeyB;                                                                                         \
    }                                                                                                      \
    for (int v = 0; v < kVecs; ++v) {                                                                      \
      uint64_t lanes[LANES_PER_VEC];                                                                       \
      std::memcpy(lanes, &c0[v], sizeof(lanes));                                                           \
      for (int lane = 0; lane < (LANES_PER_VEC); ++lane) {                                                 \
        words[v * (LANES_PER_VEC) + lane] = static_cast<uint32_t>(lanes[lane]);                            \
      }                                                                                                    \
    }                                                                                                      \
  }

PEFTKERN_PHILOX_BLOCK(philox_block_avx512, "avx512f", __m512i, _mm512, 512, _mm512_set1_epi64, 8,
                      _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0))
PEFTKERN_PHILOX_BLOCK(philox_block_avx2, "avx2", __m256i, _mm256, 256, _mm256_set1_epi64x, 4,
                      _mm256_set_epi64x(3, 2, 1, 0))
#undef PEFTKERN_PHILOX_BLOCK
#endif

BlockFn pick_block_fn() {
#ifdef PEFTKERN_X86_SIMD
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return philox_block_avx512;
  if (__builtin_cpu_supports("avx2")) return philox_block_avx2;
#endif
  return philox_block_scalar;
}

BlockFn philox_block = pick_block_fn();

// keep[i] = (uniform(first + i) >= p) ? one : 0 for i in [0, count): a bool mask (one = 1), or a 0/1 mask in a
// floating dtype (one = 1.0's bits) so that multiplying by it needs no conversion pass.
template <typename Word>
void keep_span(uint32_t key0, uint32_t key1, uint64_t first, int64_t count, float p, Word one, Word* keep) {
  for (int64_t base = 0; base < count; base += kLanes) {
    uint32_t words[kLanes];
    philox_block(key0, key1, first + static_cast<uint64_t>(base), words);
    const int64_t n = std::min(kLanes, count - base);
    for (int64_t lane = 0; lane < n; ++lane) {
      const auto word = static_cast<int32_t>(words[lane]);
      const int32_t folded = word < 0 ? ~word : word;
      keep[base + lane] = static_cast<float>(folded) * kUniformScale >= p ? one : Word{0};
    }
  }
}

template <typename Word>
void fill_keep_mask(uint64_t seed, int64_t offset, int64_t numel, float p32, Word one, Word* keep,
                    int num_threads) {
  const auto key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  const int64_t most = std::max<int64_t>(1, numel / kMinPerThread);
  const int64_t threads = std::clamp<int64_t>(num_threads, 1, most);
  pybind11::gil_scoped_release release;
  if (threads == 1) {
    keep_span<Word>(key0, key1, static_cast<uint64_t>(offset), numel, p32, one, keep);
    return;
  }
  // Chunks start on block boundaries so each block's counters stay contiguous.
  const int64_t chunk = (numel / threads + kLanes - 1) / kLanes * kLanes;
  std::vector<std::thread> workers;
  for (int64_t start = chunk; start < numel; start += chunk) {
    const uint64_t first = static_cast<uint64_t>(offset) + static_cast<uint64_t>(start);
    const int64_t count = std::min(chunk, numel - start);
    try {
      workers.emplace_back(keep_span<Word>, key0, key1, first, count, p32, one, keep + start);
    } catch (const std::system_error&) {
      keep_span<Word>(key0, key1, first, count, p32, one, keep + start);  // no thread to be had: do it here
    }
  }
  keep_span<Word>(key0, key1, static_cast<uint64_t>(offset), std::min(chunk, numel), p32, one, keep);
  for (auto& worker : workers) worker.join();
}

// Writes the keep-mask of counters [offset, offset + numel) to out_address: elements of word_bytes (1, 2, 4
// or 8) bytes holding one_bits where kept and 0 where dropped.
void dropout_keep_mask(uint64_t seed, int64_t offset, int64_t numel, double p, uintptr_t out_address,
                       int word_bytes, uint64_t one_bits, int num_threads) {
  if (numel < 0 || offset < 0) throw std::invalid_argument("dropout_keep_mask: numel and offset must be >= 0");
  if (!(p >= 0.0 && p < 1.0)) throw std::invalid_argument("dropout_keep_mask: p must be in [0, 1)");
  if (numel == 0) return;
  if (out_address == 0) throw std::invalid_argument("dropout_keep_mask: null output address");
  const auto p32 = static_cast<float>(p);
  switch (word_bytes) {
    case 1:
      return fill_keep_mask<uint8_t>(seed, offset, numel, p32, static_cast<uint8_t>(one_bits),
                                     reinterpret_cast<uint8_t*>(out_address), num_threads);
    case 2:
      return fill_keep_mask<uint16_t>(seed, offset, numel, p32, static_cast<uint16_t>(one_bits),
                                      reinterpret_cast<uint16_t*>(out_address), num_threads);
    case 4:
      return fill_keep_mask<uint32_t>(seed, offset, numel, p32, static_cast<uint32_t>(one_bits),
                                      reinterpret_cast<uint32_t*>(out_address), num_threads);
    case 8:
      return fill_keep_mask<uint64_t>(seed, offset, numel, p32, one_bits,
                                      reinterpret_cast<uint64_t*>(out_address), num_threads);
    default:
      throw std::invalid_argument("dropout_keep_mask: word_bytes must be 1, 2, 4 or 8, got " +
                                  std::to_string(word_bytes));
  }
}

// For tests: run the Philox rounds in `name` ("avx512f", "avx2", "scalar") when this CPU has it. Not
// synchronised with running calls: switch only while no mask is being drawn.
void use_simd(const std::string& name) {
  if (name == "scalar") {
    philox_block = philox_block_scalar;
    return;
  }
#ifdef PEFTKERN_X86_SIMD
  __builtin_cpu_init();
  if (name == "avx512f" && __builtin_cpu_supports("avx512f")) {
    philox_block = philox_block_avx512;
    return;
  }
  if (name == "avx2" && __builtin_cpu_supports("avx2")) {
    philox_block = philox_block_avx2;
    return;
  }
#endif
  throw std::invalid_argument("use_simd: " + name + " is not available on this CPU or build");
}

const char* simd_name() {
#ifdef PEFTKERN_X86_SIMD
  if (philox_block == philox_block_avx512) return "avx512f";
  if (philox_block == philox_block_avx2) return "avx2";
#endif
  return "scalar";
}

}  // namespace

PYBIND11_MODULE(_cpu, module) {
  module.doc() = "peftkern's CPU kernels for the torch backend (no torch linked)";
  module.def("dropout_keep_mask", &dropout_keep_mask, pybind11::arg("seed"), pybind11::arg("offset"),
             pybind11::arg("numel"), pybind11::arg("p"), pybind11::arg("out_address"),
             pybind11::arg("word_bytes"), pybind11::arg("one_bits"), pybind11::arg("num_threads"),
             "Keep-mask of counters [offset, offset + numel) for seed and drop probability p: word_bytes-wide "
             "elements, one_bits where kept, 0 where dropped.");
  module.def("simd", &simd_name, "The instruction set the Philox rounds run in: avx512f, avx2 or scalar.");
  module.def("use_simd", &use_simd, pybind11::arg("name"),
             "Run the Philox rounds in avx512f, avx2 or scalar (tests); raises when this CPU lacks it.");
}
