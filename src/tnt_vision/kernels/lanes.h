// Eight fp32 values as one (GCC/Clang's vector extension: one AVX2 register), and the elementwise functions the
// CPU kernels share. Built with -march=native; a CPU with wider or narrower registers splits or joins them.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>

#ifdef __AVX2__
#include <immintrin.h>
#endif

namespace tnt_vision {

constexpr int64_t kLanes = 8;

// 8 floats, and 8 int32 for exponent bits and masks.
using Lanes [[gnu::vector_size(kLanes * sizeof(float))]] = float;
using IntLanes [[gnu::vector_size(kLanes * sizeof(int32_t))]] = int32_t;

inline Lanes splat(float value) { return Lanes{} + value; }

// All ones in the first n lanes, zeros in the rest.
inline IntLanes first_lanes(int64_t n) {
  constexpr IntLanes kIndex = {0, 1, 2, 3, 4, 5, 6, 7};
  return kIndex < static_cast<int32_t>(n);
}

// The first n <= kLanes floats at p (the rest zero), and their store: the tails of rows not a multiple of kLanes.
// A whole vector is one load or store; a tail is one masked load or store where the CPU has them (AVX2), else it
// goes value by value (memcpy of a run-time size is a library call, and a part-written vector read back whole
// stalls on store forwarding).
inline Lanes load(const float* p, int64_t n = kLanes) {
  Lanes v{};
  if (n == kLanes) {
    std::memcpy(&v, p, sizeof v);
    return v;
  }
#ifdef __AVX2__
  v = std::bit_cast<Lanes>(_mm256_maskload_ps(p, std::bit_cast<__m256i>(first_lanes(n))));
#else
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
#endif
  return v;
}

inline void store(float* p, Lanes v, int64_t n = kLanes) {
  if (n == kLanes) {
    std::memcpy(p, &v, sizeof v);
    return;
  }
#ifdef __AVX2__
  _mm256_maskstore_ps(p, std::bit_cast<__m256i>(first_lanes(n)), std::bit_cast<__m256>(v));
#else
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
#endif
}

// The first n values of v rounded to bf16 and stored at p: to nearest, ties to even, NaN as a quiet NaN, as
// c10::BFloat16 rounds a float.
inline void store(c10::BFloat16* p, Lanes v, int64_t n = kLanes) {
  using Bits [[gnu::vector_size(kLanes * sizeof(uint32_t))]] = uint32_t;
  using Halves [[gnu::vector_size(kLanes * sizeof(uint16_t))]] = uint16_t;
  const Bits bits = std::bit_cast<Bits>(v);
  const Bits rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const Halves halves = __builtin_convertvector(v == v ? rounded : Bits{} + 0x7fc0u, Halves);
  if (n == kLanes) {
    std::memcpy(p, &halves, sizeof halves);
    return;
  }
  for (int64_t i = 0; i < n; ++i) std::memcpy(p + i, &halves[i], sizeof(uint16_t));
}

inline float sum_lanes(Lanes v) {
  using Quad [[gnu::vector_size(4 * sizeof(float))]] = float;
  Quad q = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  q += __builtin_shufflevector(q, q, 2, 3, 0, 1);
  q += __builtin_shufflevector(q, q, 1, 0, 3, 2);
  return q[0];
}

// exp(x) for x <= 0 (softmax arguments after subtracting the maximum), as Cephes' expf: x = n ln2 + r with
// |r| <= ln2/2, a degree-6 polynomial for exp(r), then a multiply by 2^n built from its exponent bits. n is
// rounded to nearest by truncating x log2(e) - 1/2 (x <= 0). Relative error about 1e-7; NaN stays NaN.
inline Lanes exp_nonpositive(Lanes x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  const IntLanes whole = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, IntLanes);
  const Lanes n = __builtin_convertvector(whole, Lanes);
  const Lanes r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  Lanes p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<Lanes>((whole + 127) << 23);
}

}  // namespace tnt_vision
