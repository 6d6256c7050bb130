// Gate sampling on the CPU: Philox4x32-10 (csrc/philox.h) over a list of counters, 16 lanes at a
// time with AVX-512 or 8 with AVX2 where the CPU has them. Each counter's four words are the gates of
// four consecutive examples, so one evaluation draws four gates. Four independent vectors per step
// hide the multiply latency. Tests compare every gate with cadk/kernels/philox.py.
#include "common.h"

#include "../philox.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CADK_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace cadk::cpu {
namespace {

void philox_gates_scalar(uint64_t seed, uint32_t base, const uint32_t* unit, const float* theta, int64_t count,
                         int rows, uint8_t* out, int64_t stride) {
  for (int64_t k = 0; k < count; ++k) {
    const PhiloxWords r = philox4(seed, base + unit[k]);
    for (int row = 0; row < rows; ++row) {
      out[row * stride + k] = philox_uniform(philox_lane(r, row)) < theta[k] ? 1 : 0;
    }
  }
}

#ifdef CADK_HAVE_AVX2_PATH

// The last count < W units as one W-lane block, padded by repeating the last unit: a scalar Philox
// per unit costs more than the whole block. The block draws into `drawn` ([rows, W]), whose first
// count columns copy_out copies out.
template <int W>
struct PaddedTail {
  uint32_t unit[W];
  float theta[W];
  uint8_t drawn[4 * W];
  PaddedTail(const uint32_t* u, const float* t, int64_t count) {
    for (int i = 0; i < W; ++i) {
      const int64_t from = std::min<int64_t>(i, count - 1);
      unit[i] = u[from];
      theta[i] = t[from];
    }
  }
  void copy_out(int64_t count, int rows, uint8_t* out, int64_t stride) const {
    for (int r = 0; r < rows; ++r) std::memcpy(out + r * stride, drawn + r * W, size_t(count));
  }
};

// The 8 gate bytes (0 or 1) of each 8-bit lane mask.
struct GateBytes {
  uint64_t of[256];
  constexpr GateBytes() : of() {
    for (int m = 0; m < 256; ++m) {
      for (int b = 0; b < 8; ++b) of[m] |= uint64_t((m >> b) & 1) << (8 * b);
    }
  }
};
constexpr GateBytes kGateBytes;

// (hi, lo) 32-bit halves of a * x per lane: _mm256_mul_epu32 multiplies the even lanes only.
__attribute__((target("avx2"))) inline void mulhilo(__m256i a, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, a);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), a);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) inline __m256i set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }

// Philox4x32-10 for 8*V counters (base + unit, 0, 0, 0). The counter starts with three zero words,
// so round 1 needs only A*c0 and round 2 only B*c2 (A*c0 is a key-dependent constant): the same
// bits as philox4 with 18 instead of 20 32x32->64 multiplies per counter.
template <int V>
__attribute__((target("avx2"))) inline void philox_block(uint64_t seed, __m256i base, const uint32_t* unit,
                                                         const float* theta, int rows, uint8_t* out,
                                                         int64_t stride) {
  const __m256i round_a = set1(kPhiloxRoundA), round_b = set1(kPhiloxRoundB);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  __m256i c[4][V];
  // Round 1: c0 = k0, c1 = 0, (c2, c3) from A * counter.
  for (int v = 0; v < V; ++v) {
    const __m256i ctr = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit + 8 * v)), base);
    __m256i hi;
    mulhilo(round_a, ctr, hi, c[3][v]);
    c[2][v] = _mm256_xor_si256(hi, set1(k1));
  }
  // Round 2: A * c0 = A * k0 is a scalar.
  {
    const uint64_t ak0 = uint64_t(kPhiloxRoundA) * k0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    const __m256i c2_const = set1(static_cast<uint32_t>(ak0 >> 32) ^ k1);
    const __m256i c3_const = set1(static_cast<uint32_t>(ak0));
    for (int v = 0; v < V; ++v) {
      __m256i hi_b;
      mulhilo(round_b, c[2][v], hi_b, c[1][v]);
      c[0][v] = _mm256_xor_si256(hi_b, set1(k0));
      c[2][v] = _mm256_xor_si256(c2_const, c[3][v]);
      c[3][v] = c3_const;
    }
  }
  // Rounds 3 to 10.
  for (int r = 2; r < kPhiloxRounds; ++r) {
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    const __m256i vk0 = set1(k0), vk1 = set1(k1);
    for (int v = 0; v < V; ++v) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mulhilo(round_b, c[2][v], hi_b, lo_b);
      mulhilo(round_a, c[0][v], hi_a, lo_a);
      c[0][v] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c[1][v]), vk0);
      c[2][v] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c[3][v]), vk1);
      c[1][v] = lo_b;
      c[3][v] = lo_a;
    }
  }
  const __m256 scale = _mm256_set1_ps(1.0f / 16777216.0f);
  for (int v = 0; v < V; ++v) {
    const __m256 th = _mm256_loadu_ps(theta + 8 * v);
    auto emit = [&](__m256i word, int row) __attribute__((target("avx2"))) {  // word >> 8 < 2^24 converts exactly as signed
      const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(word, 8)), scale);
      const int bits = _mm256_movemask_ps(_mm256_cmp_ps(u, th, _CMP_LT_OQ));  // 8 gates in one 64-bit store
      std::memcpy(out + row * stride + 8 * v, &kGateBytes.of[bits], sizeof(uint64_t));
    };
    // Constant indices into c keep it in registers.
    emit(c[0][v], 0);
    if (rows > 1) emit(c[1][v], 1);
    if (rows > 2) emit(c[2][v], 2);
    if (rows > 3) emit(c[3][v], 3);
  }
}

__attribute__((target("avx2"))) void philox_gates_avx2(uint64_t seed, uint32_t base, const uint32_t* unit,
                                                       const float* theta, int64_t count, int rows, uint8_t* out,
                                                       int64_t stride) {
  const __m256i vbase = _mm256_set1_epi32(static_cast<int>(base));
  int64_t k = 0;
  for (; k + 32 <= count; k += 32) philox_block<4>(seed, vbase, unit + k, theta + k, rows, out + k, stride);
  for (; k + 8 <= count; k += 8) philox_block<1>(seed, vbase, unit + k, theta + k, rows, out + k, stride);
  if (k < count) {
    PaddedTail<8> tail(unit + k, theta + k, count - k);
    philox_block<1>(seed, vbase, tail.unit, tail.theta, rows, tail.drawn, 8);
    tail.copy_out(count - k, rows, out + k, stride);
  }
}

// The same words 16 lanes at a time. mul_epu32 multiplies even lanes; masked 32-bit shuffles merge
// the even and odd products into (hi, lo) halves in one instruction each.
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i x, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, a);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), a);
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);
  lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);
}

__attribute__((target("avx512f"))) inline __m512i xor3(__m512i a, __m512i b, __m512i c) {
  return _mm512_ternarylogic_epi32(a, b, c, 0x96);
}

template <int V>
__attribute__((target("avx512f"))) inline void philox_block16(uint64_t seed, __m512i base, const uint32_t* unit,
                                                              const float* theta, int rows, uint8_t* out,
                                                              int64_t stride) {
  const __m512i round_a = _mm512_set1_epi32(int(kPhiloxRoundA)), round_b = _mm512_set1_epi32(int(kPhiloxRoundB));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  __m512i c[4][V];
  for (int v = 0; v < V; ++v) {  // round 1, as philox_block
    const __m512i ctr = _mm512_add_epi32(_mm512_loadu_si512(unit + 16 * v), base);
    __m512i hi;
    mulhilo16(round_a, ctr, hi, c[3][v]);
    c[2][v] = _mm512_xor_si512(hi, _mm512_set1_epi32(int(k1)));
  }
  {  // round 2
    const uint64_t ak0 = uint64_t(kPhiloxRoundA) * k0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    const __m512i c2_const = _mm512_set1_epi32(int(static_cast<uint32_t>(ak0 >> 32) ^ k1));
    const __m512i c3_const = _mm512_set1_epi32(int(static_cast<uint32_t>(ak0)));
    for (int v = 0; v < V; ++v) {
      __m512i hi_b;
      mulhilo16(round_b, c[2][v], hi_b, c[1][v]);
      c[0][v] = _mm512_xor_si512(hi_b, _mm512_set1_epi32(int(k0)));
      c[2][v] = _mm512_xor_si512(c2_const, c[3][v]);
      c[3][v] = c3_const;
    }
  }
  for (int r = 2; r < kPhiloxRounds; ++r) {  // rounds 3 to 10
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    const __m512i vk0 = _mm512_set1_epi32(int(k0)), vk1 = _mm512_set1_epi32(int(k1));
    for (int v = 0; v < V; ++v) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mulhilo16(round_b, c[2][v], hi_b, lo_b);
      mulhilo16(round_a, c[0][v], hi_a, lo_a);
      c[0][v] = xor3(hi_b, c[1][v], vk0);
      c[2][v] = xor3(hi_a, c[3][v], vk1);
      c[1][v] = lo_b;
      c[3][v] = lo_a;
    }
  }
  const __m512 scale = _mm512_set1_ps(1.0f / 16777216.0f);
  const __m512i one = _mm512_set1_epi32(1);
  for (int v = 0; v < V; ++v) {
    const __m512 th = _mm512_loadu_ps(theta + 16 * v);
    auto emit = [&](__m512i word, int row) __attribute__((target("avx512f"))) {
      const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(word, 8)), scale);
      const __m512i gate = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(u, th, _CMP_LT_OQ), one);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + row * stride + 16 * v), _mm512_cvtepi32_epi8(gate));
    };
    emit(c[0][v], 0);  // constant indices into c keep it in registers
    if (rows > 1) emit(c[1][v], 1);
    if (rows > 2) emit(c[2][v], 2);
    if (rows > 3) emit(c[3][v], 3);
  }
}

__attribute__((target("avx512f"))) void philox_gates_avx512(uint64_t seed, uint32_t base, const uint32_t* unit,
                                                         const float* theta, int64_t count, int rows, uint8_t* out,
                                                         int64_t stride) {
  const __m512i vbase = _mm512_set1_epi32(static_cast<int>(base));
  int64_t k = 0;
  for (; k + 64 <= count; k += 64) philox_block16<4>(seed, vbase, unit + k, theta + k, rows, out + k, stride);
  for (; k + 16 <= count; k += 16) philox_block16<1>(seed, vbase, unit + k, theta + k, rows, out + k, stride);
  if (k < count) {
    PaddedTail<16> tail(unit + k, theta + k, count - k);
    philox_block16<1>(seed, vbase, tail.unit, tail.theta, rows, tail.drawn, 16);
    tail.copy_out(count - k, rows, out + k, stride);
  }
}

// CADK_CPU_CAPABILITY=avx512|avx2|default caps the vector paths (read once), as ATEN_CPU_CAPABILITY
// does for ATen: tests use it to run the paths this CPU would otherwise skip. Another value (a typo,
// "AVX2") is refused rather than ignored: it would silently test the paths it meant to skip.
int capability_cap() {
  static const int cap = [] {
    const char* v = std::getenv("CADK_CPU_CAPABILITY");
    if (v == nullptr || *v == '\0') return 2;
    const std::string s(v);
    TORCH_CHECK(s == "avx512" || s == "avx2" || s == "default", "CADK_CPU_CAPABILITY=", s,
                " is not one of avx512, avx2, default: set one of them or unset it");
    return s == "default" ? 0 : s == "avx2" ? 1 : 2;
  }();
  return cap;
}

bool cpu_has_avx2() {
  static const bool has = capability_cap() >= 1 && __builtin_cpu_supports("avx2");
  return has;
}

#endif  // CADK_HAVE_AVX2_PATH

}  // namespace

bool cpu_has_avx512() {
#ifdef CADK_HAVE_AVX2_PATH
  static const bool has = capability_cap() >= 2 && __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_bw() {
#ifdef CADK_HAVE_AVX2_PATH
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

bool cpu_has_avx512_vbmi2() {
#ifdef CADK_HAVE_AVX2_PATH
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi2");
  return has;
#else
  return false;
#endif
}

void philox_gates(uint64_t seed, uint32_t base, const uint32_t* unit, const float* theta, int64_t count, int rows,
                  uint8_t* out, int64_t stride) {
  TORCH_INTERNAL_ASSERT(rows >= 1 && rows <= 4);
#ifdef CADK_HAVE_AVX2_PATH
  if (cpu_has_avx512()) return philox_gates_avx512(seed, base, unit, theta, count, rows, out, stride);
  if (cpu_has_avx2()) return philox_gates_avx2(seed, base, unit, theta, count, rows, out, stride);
#endif
  philox_gates_scalar(seed, base, unit, theta, count, rows, out, stride);
}

}  // namespace cadk::cpu
