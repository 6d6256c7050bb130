// Gate sampling on the CPU: Philox4x32-10 (csrc/philox.h) over a list of offsets, 16 lanes at a
// time with AVX-512 or 8 with AVX2 where the CPU has them. Ten rounds per word make this the
// dominant cost of gate tables; four independent vectors per step hide the multiply latency. Tests
// compare every word with cadk/kernels/philox.py.
#include "common.h"

#include "../philox.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CADK_HAVE_AVX2_PATH 1
#include <immintrin.h>
#endif

namespace cadk::cpu {
namespace {

void philox_gates_scalar(uint64_t seed, uint32_t base, const uint32_t* offset, const float* theta, int64_t count,
                         float* out) {
  for (int64_t k = 0; k < count; ++k) {
    out[k] = philox_uniform(seed, base + offset[k]) < theta[k] ? 1.0f : 0.0f;
  }
}

#ifdef CADK_HAVE_AVX2_PATH

// (hi, lo) 32-bit halves of a * x per lane: _mm256_mul_epu32 multiplies the even lanes only.
__attribute__((target("avx2"))) inline void mulhilo(__m256i a, __m256i x, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, a);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), a);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) inline __m256i mulhi(__m256i a, __m256i x) {
  const __m256i even = _mm256_mul_epu32(x, a);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), a);
  return _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) inline __m256i set1(uint32_t v) { return _mm256_set1_epi32(static_cast<int>(v)); }

// The first word of Philox4x32-10 for 8*V counters (offset, 0, 0, 0). The counter starts with three
// zero words, so round 1 needs only A*c0 and round 2 only B*c2 (A*c0 is a key-dependent constant);
// the last round needs only the high half of B*c2. Same bits as philox_word, 17 instead of 20
// 32x32->64 multiplies per word.
template <int V>
__attribute__((target("avx2"))) inline void philox_block(uint64_t seed, __m256i base, const uint32_t* offset,
                                                         const float* theta, float* out) {
  const __m256i round_a = set1(kPhiloxRoundA), round_b = set1(kPhiloxRoundB);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  __m256i c0[V], c1[V], c2[V], c3[V];
  // Round 1: c0 = k0, c1 = 0, (c2, c3) from A * offset.
  for (int v = 0; v < V; ++v) {
    const __m256i ctr = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(offset + 8 * v)), base);
    __m256i hi;
    mulhilo(round_a, ctr, hi, c3[v]);
    c2[v] = _mm256_xor_si256(hi, set1(k1));
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
      mulhilo(round_b, c2[v], hi_b, c1[v]);
      c0[v] = _mm256_xor_si256(hi_b, set1(k0));
      c2[v] = _mm256_xor_si256(c2_const, c3[v]);
      c3[v] = c3_const;
    }
  }
  // Rounds 3 to 9.
  for (int r = 2; r < kPhiloxRounds - 1; ++r) {
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    const __m256i vk0 = set1(k0), vk1 = set1(k1);
    for (int v = 0; v < V; ++v) {
      __m256i hi_b, lo_b, hi_a, lo_a;
      mulhilo(round_b, c2[v], hi_b, lo_b);
      mulhilo(round_a, c0[v], hi_a, lo_a);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi_b, c1[v]), vk0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi_a, c3[v]), vk1);
      c1[v] = lo_b;
      c3[v] = lo_a;
    }
  }
  // Round 10: only c0.
  k0 += kPhiloxKeyA;
  const __m256 scale = _mm256_set1_ps(1.0f / 16777216.0f);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int v = 0; v < V; ++v) {
    const __m256i word = _mm256_xor_si256(_mm256_xor_si256(mulhi(round_b, c2[v]), c1[v]), set1(k0));
    // word >> 8 < 2^24 converts exactly through the signed conversion.
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(word, 8)), scale);
    const __m256 lt = _mm256_cmp_ps(u, _mm256_loadu_ps(theta + 8 * v), _CMP_LT_OQ);
    _mm256_storeu_ps(out + 8 * v, _mm256_and_ps(lt, one));
  }
}

__attribute__((target("avx2"))) void philox_gates_avx2(uint64_t seed, uint32_t base, const uint32_t* offset,
                                                       const float* theta, int64_t count, float* out) {
  const __m256i vbase = _mm256_set1_epi32(static_cast<int>(base));
  int64_t k = 0;
  for (; k + 32 <= count; k += 32) philox_block<4>(seed, vbase, offset + k, theta + k, out + k);
  for (; k + 8 <= count; k += 8) philox_block<1>(seed, vbase, offset + k, theta + k, out + k);
  philox_gates_scalar(seed, base, offset + k, theta + k, count - k, out + k);
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
__attribute__((target("avx512f"))) inline void philox_block16(uint64_t seed, __m512i base, const uint32_t* offset,
                                                              const float* theta, float* out) {
  const __m512i round_a = _mm512_set1_epi32(int(kPhiloxRoundA)), round_b = _mm512_set1_epi32(int(kPhiloxRoundB));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  __m512i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {  // round 1, as philox_block
    const __m512i ctr = _mm512_add_epi32(_mm512_loadu_si512(offset + 16 * v), base);
    __m512i hi;
    mulhilo16(round_a, ctr, hi, c3[v]);
    c2[v] = _mm512_xor_si512(hi, _mm512_set1_epi32(int(k1)));
  }
  {  // round 2
    const uint64_t ak0 = uint64_t(kPhiloxRoundA) * k0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    const __m512i c2_const = _mm512_set1_epi32(int(static_cast<uint32_t>(ak0 >> 32) ^ k1));
    const __m512i c3_const = _mm512_set1_epi32(int(static_cast<uint32_t>(ak0)));
    for (int v = 0; v < V; ++v) {
      __m512i hi_b;
      mulhilo16(round_b, c2[v], hi_b, c1[v]);
      c0[v] = _mm512_xor_si512(hi_b, _mm512_set1_epi32(int(k0)));
      c2[v] = _mm512_xor_si512(c2_const, c3[v]);
      c3[v] = c3_const;
    }
  }
  for (int r = 2; r < kPhiloxRounds - 1; ++r) {  // rounds 3 to 9
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
    const __m512i vk0 = _mm512_set1_epi32(int(k0)), vk1 = _mm512_set1_epi32(int(k1));
    for (int v = 0; v < V; ++v) {
      __m512i hi_b, lo_b, hi_a, lo_a;
      mulhilo16(round_b, c2[v], hi_b, lo_b);
      mulhilo16(round_a, c0[v], hi_a, lo_a);
      c0[v] = xor3(hi_b, c1[v], vk0);
      c2[v] = xor3(hi_a, c3[v], vk1);
      c1[v] = lo_b;
      c3[v] = lo_a;
    }
  }
  k0 += kPhiloxKeyA;  // round 10: only c0
  const __m512 scale = _mm512_set1_ps(1.0f / 16777216.0f), one = _mm512_set1_ps(1.0f);
  for (int v = 0; v < V; ++v) {
    __m512i hi, lo;
    mulhilo16(round_b, c2[v], hi, lo);
    const __m512i word = xor3(hi, c1[v], _mm512_set1_epi32(int(k0)));
    const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(word, 8)), scale);
    const __mmask16 lt = _mm512_cmp_ps_mask(u, _mm512_loadu_ps(theta + 16 * v), _CMP_LT_OQ);
    _mm512_storeu_ps(out + 16 * v, _mm512_maskz_mov_ps(lt, one));
  }
}

__attribute__((target("avx512f"))) void philox_gates_avx512(uint64_t seed, uint32_t base, const uint32_t* offset,
                                                         const float* theta, int64_t count, float* out) {
  const __m512i vbase = _mm512_set1_epi32(static_cast<int>(base));
  int64_t k = 0;
  for (; k + 64 <= count; k += 64) philox_block16<4>(seed, vbase, offset + k, theta + k, out + k);
  for (; k + 16 <= count; k += 16) philox_block16<1>(seed, vbase, offset + k, theta + k, out + k);
  philox_gates_avx2(seed, base, offset + k, theta + k, count - k, out + k);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

#endif  // CADK_HAVE_AVX2_PATH

}  // namespace

bool cpu_has_avx512() {
#ifdef CADK_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx512f");
  return has;
#else
  return false;
#endif
}

void philox_gates(uint64_t seed, uint32_t base, const uint32_t* offset, const float* theta, int64_t count,
                  float* out) {
#ifdef CADK_HAVE_AVX2_PATH
  if (cpu_has_avx512()) return philox_gates_avx512(seed, base, offset, theta, count, out);
  if (cpu_has_avx2()) return philox_gates_avx2(seed, base, offset, theta, count, out);
#endif
  philox_gates_scalar(seed, base, offset, theta, count, out);
}

}  // namespace cadk::cpu
