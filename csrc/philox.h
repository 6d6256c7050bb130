// Philox4x32-10: the one definition of cadk's gate randomness (see cadk/kernels/philox.py).
//
//   words   = philox4x32_10(counter=(c, 0, 0, 0), key=(seed & 0xffffffff, seed >> 32))   4 x 32 bits
//   gate of example n, unit j (of C units):  c = (n / 4) * C + j,  word = words[n % 4]
//   uniform = (word >> 8) * 2^-24        exact in fp32, in [0, 1)
//   gate    = uniform < theta[j]
//
// Four consecutive examples share one counter and take its four words, so a CPU draws four gates
// per Philox evaluation whatever the alive set. Header-only and usable from C++ and CUDA, so every
// backend produces bit-identical gates.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace cadk {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int64_t kPhiloxMaxOffset = 2147483647;  // batch * units must stay below it (int32 counters)

CADK_HD uint32_t philox_mulhi(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct PhiloxWords {
  uint32_t w[4];
};

// Philox4x32-10 at counter (counter, 0, 0, 0) under key (seed lo, seed hi).
CADK_HD PhiloxWords philox4(uint64_t seed, uint32_t counter) {
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c0 = counter, c1 = 0u, c2 = 0u, c3 = 0u;
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
  return {{c0, c1, c2, c3}};
}

// Word `lane` (0..3) of r; selects rather than indexes so CUDA keeps r in registers.
CADK_HD uint32_t philox_lane(const PhiloxWords& r, int64_t lane) {
  return lane == 0 ? r.w[0] : lane == 1 ? r.w[1] : lane == 2 ? r.w[2] : r.w[3];
}

// Uniform in [0, 1) from a word: its top 24 bits, exact in fp32.
CADK_HD float philox_uniform(uint32_t word) { return static_cast<float>(word >> 8) * (1.0f / 16777216.0f); }

// Counter of example n's gate for full-range unit j out of num_units units.
CADK_HD uint32_t philox_counter(int64_t n, int64_t j, int64_t num_units) {
  return static_cast<uint32_t>((n >> 2) * num_units + j);
}

// 0/1 gate of example n, full-range unit j, out of num_units units with keep probability theta_j.
CADK_HD float philox_gate(uint64_t seed, int64_t n, int64_t j, int64_t num_units, float theta_j) {
  const PhiloxWords r = philox4(seed, philox_counter(n, j, num_units));
  return philox_uniform(philox_lane(r, n & 3)) < theta_j ? 1.0f : 0.0f;
}

}  // namespace cadk

