// kLanes fp32 values as one vector (GCC/Clang's vector extension): 16, one AVX-512 register, where the CPU has
// them, else 8, one AVX2 register. Built with -march=native; a CPU with narrower registers splits them. Here too
// are the elementwise functions the CPU kernels share.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#ifndef TNT_VISION_LANES  // a build may ask for 8 (AVX2's width) on an AVX-512 CPU, to compare
#ifdef __AVX512F__
#define TNT_VISION_LANES 16
#else
#define TNT_VISION_LANES 8
#endif
#endif

namespace tnt_vision {

constexpr int64_t kLanes = TNT_VISION_LANES;

// kLanes floats, and kLanes int32 for exponent bits and masks.
using Lanes [[gnu::vector_size(kLanes * sizeof(float))]] = float;
using IntLanes [[gnu::vector_size(kLanes * sizeof(int32_t))]] = int32_t;

inline Lanes splat(float value) { return Lanes{} + value; }

// All ones in the first n lanes, zeros in the rest.
inline IntLanes first_lanes(int64_t n) {
#if TNT_VISION_LANES == 16
  constexpr IntLanes kIndex = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
#else
  constexpr IntLanes kIndex = {0, 1, 2, 3, 4, 5, 6, 7};
#endif
  return kIndex < static_cast<int32_t>(n);
}

// The first n <= kLanes floats at p (the rest zero), and their store: the tails of rows not a multiple of kLanes.
// A whole vector is one load or store; a tail is one masked load or store where the CPU has them (AVX-512, AVX2),
// else it goes value by value (memcpy of a run-time size is a library call, and a part-written vector read back
// whole stalls on store forwarding).
inline Lanes load(const float* p, int64_t n = kLanes) {
  Lanes v{};
  if (n == kLanes) {
    std::memcpy(&v, p, sizeof v);
    return v;
  }
#if TNT_VISION_LANES == 16
  v = std::bit_cast<Lanes>(_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p));
#elif defined(__AVX2__)
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
#if TNT_VISION_LANES == 16
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), std::bit_cast<__m512>(v));
#elif defined(__AVX2__)
  _mm256_maskstore_ps(p, std::bit_cast<__m256i>(first_lanes(n)), std::bit_cast<__m256>(v));
#else
  for (int64_t i = 0; i < n; ++i) p[i] = v[i];
#endif
}

// kLanes bf16 values (their bits), and the fp32 bits they widen to.
using HalfLanes [[gnu::vector_size(kLanes * sizeof(uint16_t))]] = uint16_t;
using BitLanes [[gnu::vector_size(kLanes * sizeof(uint32_t))]] = uint32_t;

// The masked 16-bit loads and stores of AVX-512 (BW, VL) for bf16 tails, at HalfLanes' width.
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define TNT_VISION_MASKED_HALVES 1
inline HalfLanes load_first(const c10::BFloat16* p, int64_t n) {
  const auto mask = static_cast<uint32_t>((1u << n) - 1);
#if TNT_VISION_LANES == 16
  return std::bit_cast<HalfLanes>(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(mask), p));
#else
  return std::bit_cast<HalfLanes>(_mm_maskz_loadu_epi16(static_cast<__mmask8>(mask), p));
#endif
}

inline void store_first(c10::BFloat16* p, HalfLanes halves, int64_t n) {
  const auto mask = static_cast<uint32_t>((1u << n) - 1);
#if TNT_VISION_LANES == 16
  _mm256_mask_storeu_epi16(p, static_cast<__mmask16>(mask), std::bit_cast<__m256i>(halves));
#else
  _mm_mask_storeu_epi16(p, static_cast<__mmask8>(mask), std::bit_cast<__m128i>(halves));
#endif
}
#endif

// The first n bf16 values at p widened to fp32 (exactly: a bf16 is the top half of a float), the rest zero.
inline Lanes load(const c10::BFloat16* p, int64_t n = kLanes) {
#if TNT_VISION_LANES == 16 && defined(TNT_VISION_MASKED_HALVES)  // one widening move (GCC splits the generic one)
  const __m256i h = n == kLanes ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                : std::bit_cast<__m256i>(load_first(p, n));
  return std::bit_cast<Lanes>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#else
  HalfLanes halves{};
  if (n == kLanes)
    std::memcpy(&halves, p, sizeof halves);
  else {
#ifdef TNT_VISION_MASKED_HALVES
    halves = load_first(p, n);
#else
    for (int64_t i = 0; i < n; ++i) std::memcpy(&halves[i], p + i, sizeof(uint16_t));
#endif
  }
  return std::bit_cast<Lanes>(__builtin_convertvector(halves, BitLanes) << 16);
#endif
}

// Whether bf16 stores flush values below fp32's normal range (|v| < 1.2e-38) to zero (see store).
#if TNT_VISION_LANES == 16 && defined(__AVX512BF16__) && defined(TNT_VISION_MASKED_HALVES)
#define TNT_VISION_BF16_INSTRUCTION 1
constexpr bool kBf16FlushesSubnormals = true;
#else
constexpr bool kBf16FlushesSubnormals = false;
#endif

// The first n values of v rounded to bf16 and stored at p: to nearest, ties to even, NaN as a quiet NaN, as
// c10::BFloat16 rounds a float. With AVX512-BF16 one instruction does it (the bit arithmetic below takes eight: the
// bf16 GELU backward 1.2x faster, the norms with bf16 output 1.1x), and it flushes values below fp32's normal range
// to zero (of the same sign), as it does in oneDNN's bf16 kernels.
inline void store(c10::BFloat16* p, Lanes v, int64_t n = kLanes) {
#ifdef TNT_VISION_BF16_INSTRUCTION
  const auto halves = std::bit_cast<HalfLanes>(_mm512_cvtneps_pbh(std::bit_cast<__m512>(v)));
#else
  const BitLanes bits = std::bit_cast<BitLanes>(v);
  const BitLanes rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
  const HalfLanes halves = __builtin_convertvector(v == v ? rounded : BitLanes{} + 0x7fc0u, HalfLanes);
#endif
  if (n == kLanes) {
    std::memcpy(p, &halves, sizeof halves);
    return;
  }
#ifdef TNT_VISION_MASKED_HALVES
  store_first(p, halves, n);
#else
  for (int64_t i = 0; i < n; ++i) std::memcpy(p + i, &halves[i], sizeof(uint16_t));
#endif
}

// Calls body(c, k) for the vectors of a row of n values: k = kLanes as a compile-time constant for the whole ones
// (so that their loads and stores are single instructions), then once for the k < kLanes values left, if any.
template <typename F>
inline void for_each_chunk(int64_t n, F&& body) {
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) body(c, std::integral_constant<int64_t, kLanes>{});
  if (c < n) body(c, n - c);
}

// The square root of each lane (correctly rounded, as std::sqrt).
inline Lanes sqrt_lanes(Lanes v) {
#if TNT_VISION_LANES == 16
  return std::bit_cast<Lanes>(_mm512_sqrt_ps(std::bit_cast<__m512>(v)));
#elif defined(__AVX__)
  return std::bit_cast<Lanes>(_mm256_sqrt_ps(std::bit_cast<__m256>(v)));
#else
  for (int64_t i = 0; i < kLanes; ++i) v[i] = std::sqrt(v[i]);
  return v;
#endif
}

inline float sum_lanes(Lanes v) {
  using Octet [[gnu::vector_size(8 * sizeof(float))]] = float;
  using Quad [[gnu::vector_size(4 * sizeof(float))]] = float;
#if TNT_VISION_LANES == 16
  const Octet o = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
#else
  const Octet o = v;
#endif
  Quad q = __builtin_shufflevector(o, o, 0, 1, 2, 3) + __builtin_shufflevector(o, o, 4, 5, 6, 7);
  q += __builtin_shufflevector(q, q, 2, 3, 0, 1);
  q += __builtin_shufflevector(q, q, 1, 0, 3, 2);
  return q[0];
}

// The largest lane (NaN lanes are not seen unless v[0] is one).
inline float max_lanes(Lanes v) {
  float m = v[0];
  for (int64_t i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
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

// 1 / v to within an ulp or two: the CPU's reciprocal estimate and one Newton step, where a division (one port,
// about ten cycles a vector) held up the GELU's value and gradient. For finite v, not 0 (the Newton step gives NaN
// at 0 and infinity).
inline Lanes reciprocal(Lanes v) {
#if TNT_VISION_LANES == 16
  const Lanes r = std::bit_cast<Lanes>(_mm512_rcp14_ps(std::bit_cast<__m512>(v)));
#elif defined(__AVX__)
  const Lanes r = std::bit_cast<Lanes>(_mm256_rcp_ps(std::bit_cast<__m256>(v)));
#else
  const Lanes r = 1.0f / v;
#endif
  return r * (2.0f - v * r);
}

struct Normal {
  Lanes cdf, pdf;  // Phi(x) and phi(x) of the standard normal distribution
};

// Phi and phi from one exponential: with z = |x| / sqrt(2) and t = 1 / (1 + p z), erfc(z) = t P(t) exp(-z^2) up
// to 1.5e-7 (Abramowitz & Stegun 7.1.26), so Phi(-|x|) = erfc(z) / 2, and phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
// has the same exponential. Phi(x) for x < 0 comes from erfc directly, not as 1 + erf(x / sqrt 2), so the tail
// is not lost to cancellation: ATen's fp32 GELU is 0 below x = -5.5, this one within 3% of it down to x = -12.
// NaN stays NaN; exp(-x^2 / 2) is 0 beyond |x| = 13.2.
inline Normal normal(Lanes x) {
  const Lanes half_square = 0.5f * x * x;
  const Lanes e = half_square < 87.0f ? exp_nonpositive(-half_square) : Lanes{};
  const Lanes z = std::bit_cast<Lanes>(std::bit_cast<IntLanes>(x) & 0x7fffffff) * 0.70710678118654752f;
  const Lanes t = reciprocal(1.0f + 0.3275911f * (z > 1e4f ? splat(1e4f) : z));  // e is 0 there; NaN stays
  Lanes p = splat(1.061405429f);
  p = p * t - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const Lanes tail = 0.5f * (p * t) * e;
  return {x < 0.0f ? tail : 1.0f - tail, e * 0.39894228040143268f};
}

// Phi(x) alone (the exact GELU's forward, x Phi(x)) as 1/2 + x P(x^2) / Q(x^2), a rational function fitted to Phi(x) -
// 1/2 on |x| <= 4 sqrt(2) (this project's own fit: erf on [0, 4], Sanathanan-Koerner iterations over 12000 points, then
// scaled to x / sqrt(2)), x clamped to that range, where Phi is within 1e-8 of 0 or 1. About 20 operations, where
// `normal`'s exponential and erfc take about 40 (the GELU was two thirds of the MLP's fc1 in the inner block kernel).
// Evaluated in fp32 (numpy, 400001 points on [-9, 9]): within 2.3e-7 of Phi (`normal`'s erfc bound: 0.8e-7), the GELU
// within 1.4e-6. NaN stays NaN (the clamp's comparisons are false for it); below -5.66 the value is within 1.2e-7 of 0,
// of either sign, where `normal` keeps the tail: the forward's products do not need it.
inline Lanes normal_cdf(Lanes x) {
  constexpr float kEdge = 5.65685424949238f;  // 4 sqrt(2)
  x = x > kEdge ? splat(kEdge) : x;
  x = x < -kEdge ? splat(-kEdge) : x;
  const Lanes s = x * x;
  Lanes p = splat(1.0681796808e-10f);
  p = p * s - 2.1764889318e-08f;
  p = p * s + 3.3198747234e-06f;
  p = p * s + 1.8017985079e-04f;
  p = p * s + 4.5747611583e-03f;
  p = p * s + 3.6930754245e-02f;
  p = p * s + 3.9894216629e-01f;
  Lanes q = splat(6.5328123080e-05f);
  q = q * s + 1.8894724593e-03f;
  q = q * s + 2.9677391640e-02f;
  q = q * s + 2.5923626849e-01f;
  q = q * s + 1.0f;
  return 0.5f + x * p * reciprocal(q);
}

}  // namespace tnt_vision
