// Loading W = Vectorized<float>::size() pool or activation values as fp32 registers, whatever their dtype.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <tuple>

namespace prefixserve {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t W = Vec::size();

__attribute__((always_inline)) inline Vec load(const float* p) { return Vec::loadu(p); }

// W bf16 values as fp32, widened in registers: a bf16 is the top half of the fp32 with the same value.
__attribute__((always_inline)) inline Vec load(const c10::BFloat16* p) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return Vec(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
#elif defined(CPU_CAPABILITY_AVX2)
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return Vec(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
#else
  float buf[W];
  for (int64_t i = 0; i < W; ++i) buf[i] = static_cast<float>(p[i]);
  return Vec::loadu(buf);
#endif
}

// exp(x) for x no lower than -87: exp(-87) = 1.6e-38 is still a normal float. Below it exp's results are
// denormals, which the CPU computes on (and adds to) about 100x slower: a 2,048-row bf16 prefill's SiLU took 4 ms
// of a 16 ms MLP that way. Where it is added to 1 or to a sum of at least 1 it changes no bit.
inline Vec exp_floored(const Vec& x) { return at::vec::maximum(x, Vec(-87.f)).exp(); }

// The first n (< W) values; the other lanes hold `fill`.
template <typename T>
inline Vec load_partial(const T* p, int64_t n, float fill) {
  float buf[W];
  for (int64_t i = 0; i < W; ++i) buf[i] = i < n ? static_cast<float>(p[i]) : fill;
  return Vec::loadu(buf);
}

// 2W values (one Vectorized<BFloat16>) as two fp32 vectors, and back; round2 gives values the precision of the
// pointer's type and back, as storing them in the model's dtype does (round to nearest even).
using BVec = at::vec::Vectorized<c10::BFloat16>;
static_assert(BVec::size() == 2 * W, "a bf16 vector holds two float vectors' values");

inline void load2(const float* p, Vec& a, Vec& b) { a = Vec::loadu(p), b = Vec::loadu(p + W); }
inline void load2(const c10::BFloat16* p, Vec& a, Vec& b) {
  std::tie(a, b) = at::vec::convert_to_float<c10::BFloat16>(BVec::loadu(p));
}
inline void store2(float* p, const Vec& a, const Vec& b) { a.store(p), b.store(p + W); }
inline void store2(c10::BFloat16* p, const Vec& a, const Vec& b) {
  at::vec::convert_from_float<c10::BFloat16>(a, b).store(p);
}
inline void round2(const float*, Vec&, Vec&) {}
inline void round2(const c10::BFloat16*, Vec& a, Vec& b) {
  std::tie(a, b) = at::vec::convert_to_float<c10::BFloat16>(at::vec::convert_from_float<c10::BFloat16>(a, b));
}

}  // namespace prefixserve
