// peftkern._cpu: bitsandbytes' 4-bit weight (NF4 / FP4, quantize_4bit's storage) dequantized to a dense float32,
// float16 or bfloat16 array, for the torch backend of lora_linear_4bit on the CPU.
//
// Bit-exact with peftkern.reference.dequantize_4bit (and so with bitsandbytes.functional.dequantize_4bit):
// element j is the high nibble of byte j / 2 when j is even, its low nibble when odd; its value is
// code[nibble] * absmax[j / blocksize] in float32 (one rounding), then rounded to nearest even in the output
// dtype. Blocks run over the flat array, across rows. A double-quantized absmax (uint8 codes) is decoded per
// block as nested_code[q] * nested_absmax[block / nested_blocksize] + offset: a float32 product, then a float32
// sum (two roundings, never a fused multiply-add: the extension is built with -ffp-contract=off). The 16-entry
// code table sits in one AVX-512 register (a permute looks up 16 nibbles at once) or two AVX2 ones; elsewhere
// plain C++. Threads split the blocks, with the GIL released. No torch: the caller passes addresses.

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
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

// Output dtypes, as the Python caller names them.
enum OutKind : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Blocks whose scales are decoded at a time (a few KB on the stack, then the SIMD pass over their elements).
constexpr int64_t kScaleBatch = 256;
// Below this many elements per thread one thread is faster than starting others.
constexpr int64_t kMinPerThread = 1 << 20;

// Round-to-nearest-even float32 -> bfloat16 bits, as torch's c10::BFloat16 (the products are never signalling
// NaNs, so no NaN case is needed: a quiet NaN stays a NaN).
inline uint16_t bfloat16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Round-to-nearest-even float32 -> float16 bits (IEEE, subnormals included), as torch's c10::Half and F16C.
inline uint16_t float16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const auto sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return sign | 0x7E00u | ((magnitude >> 13) & 0x3FFu);  // NaN, quiet
  if (magnitude >= 0x477FF000u) return sign | 0x7C00u;  // 65520 and up round to infinity
  if (magnitude >= 0x38800000u) {                       // a normal float16: rebias the exponent, round 13 bits off
    const uint32_t rebased = magnitude - 0x38000000u;
    return sign | static_cast<uint16_t>((rebased + 0xFFFu + ((rebased >> 13) & 1u)) >> 13);
  }
  // A float16 subnormal (or zero): a multiple of 2**-24, rounded to nearest even by the FPU (exact scaling).
  float scaled;
  std::memcpy(&scaled, &magnitude, sizeof(scaled));
  return sign | static_cast<uint16_t>(std::nearbyint(scaled * 16777216.0f));
}

template <int kOut>
inline void store_scalar(void* out, int64_t index, float value) {
  if constexpr (kOut == kFloat32) {
    static_cast<float*>(out)[index] = value;
  } else if constexpr (kOut == kFloat16) {
    static_cast<uint16_t*>(out)[index] = float16_bits(value);
  } else {
    static_cast<uint16_t*>(out)[index] = bfloat16_bits(value);
  }
}

// Elements [first, end) of one block, one at a time.
template <int kOut>
inline void decode_scalar(const float* code, const uint8_t* packed, float scale, int64_t first, int64_t end,
                          void* out) {
  for (int64_t j = first; j < end; ++j) {
    const uint8_t byte = packed[j >> 1];
    const int nibble = (j & 1) ? (byte & 0xF) : (byte >> 4);
    store_scalar<kOut>(out, j, code[nibble] * scale);
  }
}

// A pass over whole blocks [first_block, first_block + blocks) (the last may end early at numel), scales[b] the
// absmax of block first_block + b. Every block starts at an even element (blocksize is even), so a vector of
// nibbles starts at a whole byte.
using DecodeFn = void (*)(const float* code, const uint8_t* packed, const float* scales, int64_t first_block,
                          int64_t blocks, int64_t blocksize, int64_t numel, void* out);

template <int kOut>
void decode_blocks_scalar(const float* code, const uint8_t* packed, const float* scales, int64_t first_block,
                          int64_t blocks, int64_t blocksize, int64_t numel, void* out) {
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = (first_block + b) * blocksize;
    decode_scalar<kOut>(code, packed, scales[b], first, std::min(first + blocksize, numel), out);
  }
}

#ifdef PEFTKERN_X86_SIMD
template <int kOut>
__attribute__((target("avx512f"))) inline void store_avx512(void* out, int64_t index, __m512 values) {
  if constexpr (kOut == kFloat32) {
    _mm512_storeu_ps(static_cast<float*>(out) + index, values);
  } else if constexpr (kOut == kFloat16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + index),
                        _mm512_cvtps_ph(values, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m512i bits = _mm512_castps_si512(values);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + index),
                        _mm512_cvtepi32_epi16(rounded));
  }
}

// 16 nibbles from 8 bytes: each byte twice (high nibble first), widened to int32, the even lanes shifted right
// by 4. The table lookups read only the low 4 (AVX-512) or 3 (AVX2) bits, so the odd lanes need no mask.
template <int kOut>
__attribute__((target("avx512f"))) void decode_blocks_avx512(const float* code, const uint8_t* packed,
                                                             const float* scales, int64_t first_block,
                                                             int64_t blocks, int64_t blocksize, int64_t numel,
                                                             void* out) {
  const __m512 table = _mm512_loadu_ps(code);
  const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = (first_block + b) * blocksize;
    const int64_t end = std::min(first + blocksize, numel);
    const __m512 scale = _mm512_set1_ps(scales[b]);
    int64_t j = first;
    for (; j + 32 <= end; j += 32) {  // 16 bytes, 32 elements
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + (j >> 1)));
      const __m512i low = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes)), shifts);
      const __m512i high = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(bytes, bytes)), shifts);
      store_avx512<kOut>(out, j, _mm512_mul_ps(_mm512_permutexvar_ps(low, table), scale));
      store_avx512<kOut>(out, j + 16, _mm512_mul_ps(_mm512_permutexvar_ps(high, table), scale));
    }
    if (j + 16 <= end) {  // 8 bytes, 16 elements
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + (j >> 1)));
      const __m512i low = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes, bytes)), shifts);
      store_avx512<kOut>(out, j, _mm512_mul_ps(_mm512_permutexvar_ps(low, table), scale));
      j += 16;
    }
    decode_scalar<kOut>(code, packed, scales[b], j, end, out);
  }
}

__attribute__((target("avx2,f16c"))) inline __m256 lookup_avx2(__m256 table_low, __m256 table_high,
                                                                __m256i nibbles) {
  // Bit 3 of the nibble picks the table half: moved to the sign bit, which blendv reads.
  const __m256 upper = _mm256_castsi256_ps(_mm256_slli_epi32(nibbles, 28));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(table_low, nibbles),
                          _mm256_permutevar8x32_ps(table_high, nibbles), upper);
}

template <int kOut>
__attribute__((target("avx2,f16c"))) void decode_blocks_avx2(const float* code, const uint8_t* packed,
                                                              const float* scales, int64_t first_block,
                                                              int64_t blocks, int64_t blocksize, int64_t numel,
                                                              void* out) {
  const __m256 table_low = _mm256_loadu_ps(code), table_high = _mm256_loadu_ps(code + 8);
  const __m256i shifts = _mm256_set_epi32(0, 4, 0, 4, 0, 4, 0, 4);
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7FFF);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t first = (first_block + b) * blocksize;
    const int64_t end = std::min(first + blocksize, numel);
    const __m256 scale = _mm256_set1_ps(scales[b]);
    int64_t j = first;
    for (; j + 16 <= end; j += 16) {  // 8 bytes, 16 elements
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(packed + (j >> 1)));
      const __m128i twice = _mm_unpacklo_epi8(bytes, bytes);
      const __m256i nibbles0 = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(twice), shifts);
      const __m256i nibbles1 = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(twice, 8)), shifts);
      const __m256 values0 = _mm256_mul_ps(lookup_avx2(table_low, table_high, nibbles0), scale);
      const __m256 values1 = _mm256_mul_ps(lookup_avx2(table_low, table_high, nibbles1), scale);
      if constexpr (kOut == kFloat32) {
        _mm256_storeu_ps(static_cast<float*>(out) + j, values0);
        _mm256_storeu_ps(static_cast<float*>(out) + j + 8, values1);
      } else if constexpr (kOut == kFloat16) {
        auto* half = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + j);
        _mm_storeu_si128(half, _mm256_cvtps_ph(values0, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128(half + 1, _mm256_cvtps_ph(values1, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      } else {
        const __m256i bits0 = _mm256_castps_si256(values0), bits1 = _mm256_castps_si256(values1);
        const __m256i odd0 = _mm256_and_si256(_mm256_srli_epi32(bits0, 16), one);
        const __m256i odd1 = _mm256_and_si256(_mm256_srli_epi32(bits1, 16), one);
        const __m256i rounded0 = _mm256_srli_epi32(_mm256_add_epi32(bits0, _mm256_add_epi32(odd0, bias)), 16);
        const __m256i rounded1 = _mm256_srli_epi32(_mm256_add_epi32(bits1, _mm256_add_epi32(odd1, bias)), 16);
        // packus interleaves 128-bit lanes (0-3 of each, then 4-7 of each); the permute puts them in order.
        const __m256i packed16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded0, rounded1), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + j), packed16);
      }
    }
    decode_scalar<kOut>(code, packed, scales[b], j, end, out);
  }
}
#endif

DecodeFn decode_fn(peftkern_cpu::Simd simd, int kind) {
#ifdef PEFTKERN_X86_SIMD
  if (simd == peftkern_cpu::Simd::kAvx512) {
    return kind == kFloat32   ? decode_blocks_avx512<kFloat32>
           : kind == kFloat16 ? decode_blocks_avx512<kFloat16>
                              : decode_blocks_avx512<kBFloat16>;
  }
  if (simd == peftkern_cpu::Simd::kAvx2) {
    return kind == kFloat32   ? decode_blocks_avx2<kFloat32>
           : kind == kFloat16 ? decode_blocks_avx2<kFloat16>
                              : decode_blocks_avx2<kBFloat16>;
  }
#endif
  return kind == kFloat32   ? decode_blocks_scalar<kFloat32>
         : kind == kFloat16 ? decode_blocks_scalar<kFloat16>
                            : decode_blocks_scalar<kBFloat16>;
}

peftkern_cpu::Simd simd_in_use = peftkern_cpu::best_simd();

// The absmax of each block in a batch, then one pass of `decode` over the batch's elements.
struct Job {
  DecodeFn decode;
  const float* code;
  const uint8_t* packed;
  const float* absmax;        // float32 [blocks], or nullptr when double-quantized
  const uint8_t* quantized;   // uint8 [blocks] codes into nested_code, when double-quantized
  const float* nested_code;   // [256]
  const float* nested_absmax;  // [ceil(blocks / nested_blocksize)]
  int64_t nested_blocksize;
  float offset;
  int64_t blocksize;
  int64_t numel;
  void* out;
};

void run_blocks(const Job& job, int64_t first_block, int64_t blocks) {
  float scales[kScaleBatch];
  for (int64_t start = 0; start < blocks; start += kScaleBatch) {
    const int64_t count = std::min(kScaleBatch, blocks - start);
    const int64_t block0 = first_block + start;
    if (job.absmax != nullptr) {
      std::memcpy(scales, job.absmax + block0, static_cast<size_t>(count) * sizeof(float));
    } else {
      for (int64_t b = 0; b < count; ++b) {
        const int64_t block = block0 + b;
        const float product = job.nested_code[job.quantized[block]] * job.nested_absmax[block / job.nested_blocksize];
        scales[b] = product + job.offset;
      }
    }
    job.decode(job.code, job.packed, scales, block0, count, job.blocksize, job.numel, job.out);
  }
}

// Writes the numel elements of a 4-bit weight to out_address (kind 0: float32, 1: float16, 2: bfloat16).
// packed: ceil(numel / 2) bytes; code: the 16 float32 values of the nibbles; absmax: float32 [blocks] when
// nested_code_address is 0, else uint8 [blocks] codes into nested_code (float32 [256]) scaled by nested_absmax
// (float32, one per nested_blocksize blocks) plus offset.
void dequantize_4bit(uintptr_t packed_address, int64_t numel, uintptr_t code_address, int64_t blocksize,
                     uintptr_t absmax_address, uintptr_t nested_code_address, uintptr_t nested_absmax_address,
                     int64_t nested_blocksize, double offset, uintptr_t out_address, int out_kind, int num_threads) {
  if (numel < 0) throw std::invalid_argument("dequantize_4bit: numel must be >= 0, got " + std::to_string(numel));
  if (blocksize <= 0 || blocksize % 2 != 0) {
    throw std::invalid_argument("dequantize_4bit: blocksize must be even and > 0, got " + std::to_string(blocksize));
  }
  if (out_kind != kFloat32 && out_kind != kFloat16 && out_kind != kBFloat16) {
    throw std::invalid_argument("dequantize_4bit: out_kind must be 0 (float32), 1 (float16) or 2 (bfloat16), got " +
                                std::to_string(out_kind));
  }
  const bool nested = nested_code_address != 0;
  if (nested && (nested_absmax_address == 0 || nested_blocksize <= 0)) {
    throw std::invalid_argument("dequantize_4bit: a double-quantized absmax needs nested_absmax and "
                                "nested_blocksize > 0");
  }
  if (numel == 0) return;
  if (packed_address == 0 || code_address == 0 || absmax_address == 0 || out_address == 0) {
    throw std::invalid_argument("dequantize_4bit: null address");
  }
  const Job job{
      decode_fn(simd_in_use, out_kind),
      reinterpret_cast<const float*>(code_address),
      reinterpret_cast<const uint8_t*>(packed_address),
      nested ? nullptr : reinterpret_cast<const float*>(absmax_address),
      nested ? reinterpret_cast<const uint8_t*>(absmax_address) : nullptr,
      reinterpret_cast<const float*>(nested_code_address),
      reinterpret_cast<const float*>(nested_absmax_address),
      nested_blocksize,
      static_cast<float>(offset),
      blocksize,
      numel,
      reinterpret_cast<void*>(out_address),
  };
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  const int64_t most = std::max<int64_t>(1, numel / kMinPerThread);
  const int64_t threads = std::clamp<int64_t>(num_threads, 1, std::min(most, blocks));
  pybind11::gil_scoped_release release;
  if (threads == 1) {
    run_blocks(job, 0, blocks);
    return;
  }
  const int64_t chunk = (blocks + threads - 1) / threads;
  std::vector<std::thread> workers;
  for (int64_t start = chunk; start < blocks; start += chunk) {
    const int64_t count = std::min(chunk, blocks - start);
    try {
      workers.emplace_back(run_blocks, std::cref(job), start, count);
    } catch (const std::system_error&) {
      run_blocks(job, start, count);  // no thread to be had
    }
  }
  run_blocks(job, 0, std::min(chunk, blocks));
  for (auto& worker : workers) worker.join();
}

}  // namespace

namespace peftkern_cpu {

void use_dequantize_4bit_simd(Simd simd) { simd_in_use = simd; }

void bind_dequantize_4bit(pybind11::module_& module) {
  module.def("dequantize_4bit", &dequantize_4bit, pybind11::arg("packed_address"), pybind11::arg("numel"),
             pybind11::arg("code_address"), pybind11::arg("blocksize"), pybind11::arg("absmax_address"),
             pybind11::arg("nested_code_address"), pybind11::arg("nested_absmax_address"),
             pybind11::arg("nested_blocksize"), pybind11::arg("offset"), pybind11::arg("out_address"),
             pybind11::arg("out_kind"), pybind11::arg("num_threads"),
             "bitsandbytes' 4-bit weight (reference.dequantize_4bit) as numel float32 (out_kind 0), float16 (1) "
             "or bfloat16 (2) values at out_address; absmax float32, or uint8 codes when nested_code_address "
             "is not 0 (double quantization).");
}

}  // namespace peftkern_cpu
