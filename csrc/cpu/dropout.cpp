// peftkern._cpu: the dropout keep-mask of peftkern.reference.dropout_mask, for the torch backend on the CPU.
//
// Bit-exact with the reference (and with the Triton and CUDA kernels): each row of a row-major [rows, cols]
// mask is cut into groups of 4 columns; element (i, j) is decided by word j % 4 of Philox-4x32-10 at counter
// i * ceil(cols / 4) + j // 4 = (lo32, hi32, 0, 0) under key (lo32(seed), hi32(seed)). The word, read as
// int32, folded onto [0, 2**31) (x < 0 -> ~x), converted to float32 and scaled by kUniformScale, keeps the
// element when at least p (as float32). The counters of a matrix are consecutive, so the rounds run over
// blocks of consecutive counters: in AVX-512 or AVX2 on x86-64 (chosen at run time), elsewhere in plain C++;
// the work is split over threads with the GIL released. No torch: the caller passes the output's address,
// as peftkern._C does.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "cpu_kernels.h"

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

// Keep decisions per Philox call (one per output word).
constexpr int64_t kWords = 4;

// words[lane * 4 + w] = output word w of Philox-4x32-10 at counter first + lane, for lane in [0, kLanes).
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
    uint32_t* out = words + lane * kWords;
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
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
      uint64_t lanes[4][LANES_PER_VEC];                                                                    \
      std::memcpy(lanes[0], &c0[v], sizeof(lanes[0]));                                                     \
      std::memcpy(lanes[1], &c1[v], sizeof(lanes[1]));                                                     \
      std::memcpy(lanes[2], &c2[v], sizeof(lanes[2]));                                                     \
      std::memcpy(lanes[3], &c3[v], sizeof(lanes[3]));                                                     \
      for (int lane = 0; lane < (LANES_PER_VEC); ++lane) {                                                 \
        for (int w = 0; w < kWords; ++w) {                                                                 \
          words[(v * (LANES_PER_VEC) + lane) * kWords + w] = static_cast<uint32_t>(lanes[w][lane]);        \
        }                                                                                                  \
      }                                                                                                    \
    }                                                                                                      \
  }

PEFTKERN_PHILOX_BLOCK(philox_block_avx512, "avx512f", __m512i, _mm512, 512, _mm512_set1_epi64, 8,
                      _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0))
PEFTKERN_PHILOX_BLOCK(philox_block_avx2, "avx2", __m256i, _mm256, 256, _mm256_set1_epi64x, 4,
                      _mm256_set_epi64x(3, 2, 1, 0))
#undef PEFTKERN_PHILOX_BLOCK
#endif

BlockFn block_fn(peftkern_cpu::Simd simd) {
#ifdef PEFTKERN_X86_SIMD
  if (simd == peftkern_cpu::Simd::kAvx512) return philox_block_avx512;
  if (simd == peftkern_cpu::Simd::kAvx2) return philox_block_avx2;
#endif
  return philox_block_scalar;
}

BlockFn philox_block = block_fn(peftkern_cpu::best_simd());

// Whether a Philox word keeps its element (the reference's uniform_from_words(word) >= p).
inline bool keeps(uint32_t word, float p) {
  const auto value = static_cast<int32_t>(word);
  const int32_t folded = value < 0 ? ~value : value;
  return static_cast<float>(folded) * kUniformScale >= p;
}

// The mask elements of Philox counters [first, first + count) of a mask whose rows start at counter
// first_counter and hold `groups` counters each (cols columns): element (row, 4 * group + w) = one where
// word w of the row's counter `group` keeps, 0 where it drops; words past the row's end decide nothing. A
// bool mask has one = 1, a 0/1 mask in a floating dtype one = 1.0's bits, so multiplying by it needs no
// conversion pass.
template <typename Word>
void keep_span(uint32_t key0, uint32_t key1, uint64_t first_counter, int64_t groups, int64_t cols, int64_t first,
               int64_t count, float p, Word one, Word* keep) {
  int64_t row = first / groups, group = first % groups;  // of the counter at `first`
  for (int64_t base = 0; base < count; base += kLanes) {
    uint32_t words[kLanes * kWords];
    philox_block(key0, key1, first_counter + static_cast<uint64_t>(first + base), words);
    const int64_t n = std::min(kLanes, count - base);
    for (int64_t lane = 0; lane < n; ++lane) {
      const int64_t col = group * kWords;
      const int64_t width = std::min(kWords, cols - col);
      Word* out = keep + row * cols + col;
      for (int64_t w = 0; w < width; ++w) out[w] = keeps(words[lane * kWords + w], p) ? one : Word{0};
      if (++group == groups) {
        group = 0;
        ++row;
      }
    }
  }
}

template <typename Word>
void fill_keep_mask(uint64_t seed, int64_t first_row, int64_t rows, int64_t cols, float p32, Word one, Word* keep,
                    int num_threads) {
  const auto key0 = static_cast<uint32_t>(seed), key1 = static_cast<uint32_t>(seed >> 32);
  const int64_t groups = (cols + kWords - 1) / kWords;
  const int64_t counters = rows * groups;
  const uint64_t first_counter = static_cast<uint64_t>(first_row) * static_cast<uint64_t>(groups);
  const int64_t most = std::max<int64_t>(1, counters * kWords / kMinPerThread);
  const int64_t threads = std::clamp<int64_t>(num_threads, 1, most);
  pybind11::gil_scoped_release release;
  if (threads == 1) {
    keep_span<Word>(key0, key1, first_counter, groups, cols, 0, counters, p32, one, keep);
    return;
  }
  // Chunks of whole blocks of counters; a chunk writes only its own counters' elements.
  const int64_t chunk = (counters / threads + kLanes - 1) / kLanes * kLanes;
  std::vector<std::thread> workers;
  for (int64_t start = chunk; start < counters; start += chunk) {
    const int64_t count = std::min(chunk, counters - start);
    try {
      workers.emplace_back(keep_span<Word>, key0, key1, first_counter, groups, cols, start, count, p32, one, keep);
    } catch (const std::system_error&) {
      keep_span<Word>(key0, key1, first_counter, groups, cols, start, count, p32, one, keep);  // no thread to be had
    }
  }
  keep_span<Word>(key0, key1, first_counter, groups, cols, 0, std::min(chunk, counters), p32, one, keep);
  for (auto& worker : workers) worker.join();
}

// Writes the keep-mask of rows [first_row, first_row + rows) of a [*, cols] matrix to out_address (row-major,
// rows x cols): elements of word_bytes (1, 2, 4 or 8) bytes holding one_bits where kept and 0 where dropped.
void dropout_keep_mask(uint64_t seed, int64_t first_row, int64_t rows, int64_t cols, double p, uintptr_t out_address,
                       int word_bytes, uint64_t one_bits, int num_threads) {
  if (rows < 0 || cols < 0 || first_row < 0) {
    throw std::invalid_argument("dropout_keep_mask: first_row, rows and cols must be >= 0");
  }
  if (!(p >= 0.0 && p < 1.0)) throw std::invalid_argument("dropout_keep_mask: p must be in [0, 1)");
  if (rows == 0 || cols == 0) return;
  if (out_address == 0) throw std::invalid_argument("dropout_keep_mask: null output address");
  const auto p32 = static_cast<float>(p);
  switch (word_bytes) {
    case 1:
      return fill_keep_mask<uint8_t>(seed, first_row, rows, cols, p32, static_cast<uint8_t>(one_bits),
                                     reinterpret_cast<uint8_t*>(out_address), num_threads);
    case 2:
      return fill_keep_mask<uint16_t>(seed, first_row, rows, cols, p32, static_cast<uint16_t>(one_bits),
                                      reinterpret_cast<uint16_t*>(out_address), num_threads);
    case 4:
      return fill_keep_mask<uint32_t>(seed, first_row, rows, cols, p32, static_cast<uint32_t>(one_bits),
                                      reinterpret_cast<uint32_t*>(out_address), num_threads);
    case 8:
      return fill_keep_mask<uint64_t>(seed, first_row, rows, cols, p32, one_bits,
                                      reinterpret_cast<uint64_t*>(out_address), num_threads);
    default:
      throw std::invalid_argument("dropout_keep_mask: word_bytes must be 1, 2, 4 or 8, got " +
                                  std::to_string(word_bytes));
  }
}

}  // namespace

namespace peftkern_cpu {

void use_dropout_simd(Simd simd) { philox_block = block_fn(simd); }

void bind_dropout(pybind11::module_& module) {
  module.def("dropout_keep_mask", &dropout_keep_mask, pybind11::arg("seed"), pybind11::arg("first_row"),
             pybind11::arg("rows"), pybind11::arg("cols"), pybind11::arg("p"), pybind11::arg("out_address"),
             pybind11::arg("word_bytes"), pybind11::arg("one_bits"), pybind11::arg("num_threads"),
             "Keep-mask of rows [first_row, first_row + rows) of a [*, cols] matrix for seed and drop "
             "probability p (reference.dropout_mask): word_bytes-wide elements, one_bits where kept, 0 where "
             "dropped.");
}

}  // namespace peftkern_cpu
