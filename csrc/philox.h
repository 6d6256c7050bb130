// Philox4x32-10: the one definition of cadk's gate randomness (see cadk/kernels/philox.py).
//
//   word    = philox4x32_10(counter=(offset, 0, 0, 0), key=(seed & 0xffffffff, seed >> 32))[0]
//   uniform = (word >> 8) * 2^-24        exact in fp32, in [0, 1)
//   gate    = uniform < theta[j],  offset = n * C + j
//
// Header-only and usable from C++ and CUDA, so every backend produces bit-identical gates.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define CADK_HD __host__ __device__ __forceinline__
#else
#define CADK_HD inline
#endif

namespace cadk {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int64_t kPhiloxMaxOffset = 2147483647;  // offsets are int32 in every backend

CADK_HD uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// First 32-bit word of Philox4x32-10 at counter (offset, 0, 0, 0) under key (seed lo, seed hi).
CADK_HD uint32_t philox_word(uint64_t seed, uint32_t offset) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = offset, c1 = 0u, c2 = 0u, c3 = 0u;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t a0 = c0, a2 = c2;
    c0 = philox_mulhi(kPhiloxRoundB, a2) ^ c1 ^ k0;
    c2 = philox_mulhi(kPhiloxRoundA, a0) ^ c3 ^ k1;
    c1 = kPhiloxRoundB * a2;
    c3 = kPhiloxRoundA * a0;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return c0;
}

// Uniform in [0, 1): top 24 bits of the word, exact in fp32.
CADK_HD float philox_uniform(uint64_t seed, uint32_t offset) {
  return static_cast<float>(philox_word(seed, offset) >> 8) * (1.0f / 16777216.0f);
}

// 0/1 gate of example n, full-range unit j, out of num_units units with keep probability theta_j.
CADK_HD float philox_gate(uint64_t seed, int64_t n, int64_t j, int64_t num_units, float theta_j) {
  const uint32_t offset = static_cast<uint32_t>(n * num_units + j);
  return philox_uniform(seed, offset) < theta_j ? 1.0f : 0.0f;
}

}  // namespace cadk

