// Kernels for CPUs with AVX2 and F16C: two 256-bit registers hold the 16 values.
#include "common.h"
#ifdef GC_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif
#include <immintrin.h>

namespace gc_avx2 {
namespace {

struct V { __m256 a, b; };
typedef int M;

#include "x86_codes.h"

inline V splat(float x) { __m256 s = _mm256_set1_ps(x); return {s, s}; }
inline V load_f32(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store_f32(float* p, V v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
inline __m256 bf16x8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline V load_bf16(const uint16_t* p) { return {bf16x8(p), bf16x8(p + 8)}; }
inline __m256i bf16_bits(__m256 x) {  // to nearest, ties to even; a nan becomes 0x7FC0
  __m256i u = _mm256_castps_si256(x);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)), nan));
}
inline void store_bf16(uint16_t* p, V v) {
  __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(bf16_bits(v.a), bf16_bits(v.b)), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), w);
}
inline V load_f16(const uint16_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline void store_f16(uint16_t* p, V v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph(v.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#define GC_TWO(name, op) inline V name(V x, V y) { return {op(x.a, y.a), op(x.b, y.b)}; }
GC_TWO(add, _mm256_add_ps)
GC_TWO(sub, _mm256_sub_ps)
GC_TWO(mul, _mm256_mul_ps)
GC_TWO(div, _mm256_div_ps)
GC_TWO(max_ignoring_nan, _mm256_max_ps)  // a nan in the first operand: the second is returned
#undef GC_TWO
inline V abs_(V v) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return {_mm256_and_ps(v.a, m), _mm256_and_ps(v.b, m)};
}
inline V round_even(V v) {
  return {_mm256_round_ps(v.a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), _mm256_round_ps(v.b, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline V floor_(V v) {
  return {_mm256_round_ps(v.a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC), _mm256_round_ps(v.b, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)};
}
inline __m256 clamp8(__m256 y, __m256 lo, __m256 hi) {
  __m256 t = _mm256_max_ps(_mm256_min_ps(y, hi), lo);
  return _mm256_and_ps(t, _mm256_cmp_ps(y, y, _CMP_ORD_Q));  // a nan becomes +0
}
inline V clamp_nan_to_zero(V y, V lo, V hi) { return {clamp8(y.a, lo.a, hi.a), clamp8(y.b, lo.b, hi.b)}; }
inline M is_nan(V v) {
  return _mm256_movemask_ps(_mm256_cmp_ps(v.a, v.a, _CMP_UNORD_Q)) | _mm256_movemask_ps(_mm256_cmp_ps(v.b, v.b, _CMP_UNORD_Q));
}
inline M mask_none() { return 0; }
inline M mask_or(M a, M b) { return a | b; }
inline bool mask_any(M a) { return a != 0; }
inline float hmax(V v) {
  __m256 m = _mm256_max_ps(v.a, v.b);
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}
// lanes folded in halves: i + (i + 8), then + 4, + 2, + 1 (the reference's order)
inline float hsum_tree(V v) {
  const __m256 s8 = _mm256_add_ps(v.a, v.b);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
inline void store_codes(uint8_t* dst, V q, int bits) {
  __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(_mm256_cvtps_epi32(q.a), _mm256_cvtps_epi32(q.b)), 0xD8);
  store_code_bytes(dst, _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)), bits);
}
inline V load_codes(const uint8_t* src, int bits) {
  __m128i b = load_code_bytes(src, bits);
  return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
}
// float elements: the biased exponent of a >= 0 as a float, 2**(eb - 127) from a biased exponent, the sign bit
inline __m256 bexp8(__m256 a) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(_mm256_castps_si256(a), 23)); }
inline V biased_exp(V v) { return {bexp8(v.a), bexp8(v.b)}; }
inline __m256 pow2b8(__m256 e) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtps_epi32(e), 23)); }
inline V pow2_biased(V v) { return {pow2b8(v.a), pow2b8(v.b)}; }
inline __m256 sign8(__m256 y) { return _mm256_cvtepi32_ps(_mm256_srli_epi32(_mm256_castps_si256(y), 31)); }
inline V signbit01(V v) { return {sign8(v.a), sign8(v.b)}; }
inline __m256 copysign8(__m256 mag, __m256 s) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(int(0x80000000u)));
  return _mm256_or_ps(_mm256_andnot_ps(m, mag), _mm256_and_ps(m, s));
}
inline V copysign_(V mag, V s) { return {copysign8(mag.a, s.a), copysign8(mag.b, s.b)}; }
inline V min_(V x, V y) { return {_mm256_min_ps(x.a, y.a), _mm256_min_ps(x.b, y.b)}; }
inline V select_ge(V x, V t, V yes, V no) {
  return {_mm256_blendv_ps(no.a, yes.a, _mm256_cmp_ps(x.a, t.a, _CMP_GE_OQ)), _mm256_blendv_ps(no.b, yes.b, _mm256_cmp_ps(x.b, t.b, _CMP_GE_OQ))};
}
// the Hadamard transform's stages h = 1, 2, 4 inside each 8 lanes, then h = 8 across the two halves. Each
// lane adds its partner t to itself, the upper lane with its sign flipped: t + (-b) is a - b exactly.
inline __m256 sign_mask8(int upper) {
  return _mm256_castsi256_ps(_mm256_set_epi32(upper & 0x80 ? int(0x80000000u) : 0, upper & 0x40 ? int(0x80000000u) : 0,
                                              upper & 0x20 ? int(0x80000000u) : 0, upper & 0x10 ? int(0x80000000u) : 0,
                                              upper & 0x08 ? int(0x80000000u) : 0, upper & 0x04 ? int(0x80000000u) : 0,
                                              upper & 0x02 ? int(0x80000000u) : 0, upper & 0x01 ? int(0x80000000u) : 0));
}
inline __m256 hadamard8(__m256 v) {
  v = _mm256_add_ps(_mm256_permute_ps(v, 0xB1), _mm256_xor_ps(v, sign_mask8(0xAA)));  // partners 1 apart
  v = _mm256_add_ps(_mm256_permute_ps(v, 0x4E), _mm256_xor_ps(v, sign_mask8(0xCC)));  // 2 apart
  return _mm256_add_ps(_mm256_permute2f128_ps(v, v, 0x01), _mm256_xor_ps(v, sign_mask8(0xF0)));  // 4 apart
}
inline V hadamard16(V x) {
  const __m256 a = hadamard8(x.a), b = hadamard8(x.b);
  return {_mm256_add_ps(a, b), _mm256_sub_ps(a, b)};
}

#define NAME "avx2"
#include "body.h"
#undef NAME

}  // namespace

const Kernels* kernels() { return &table; }
}  // namespace gc_avx2

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
