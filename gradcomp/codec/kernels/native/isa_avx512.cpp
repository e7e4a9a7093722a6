// Kernels for CPUs with AVX-512 (F, BW, VL, DQ): one 512-bit register holds the 16 values.
#include "common.h"
#ifdef GC_X86
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")
// GCC 12's own intrinsics (_mm512_permute_ps, _mm512_cvtepu8_epi32, ...) fill their unused operand with
// _mm512_undefined_*(), a self-initialised variable that -Wuninitialized reports once inlined here
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

namespace gc_avx512 {
namespace {

struct V { __m512 v; };
typedef __mmask16 M;

#include "x86_codes.h"

inline V splat(float x) { return {_mm512_set1_ps(x)}; }
inline V load_f32(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store_f32(float* p, V a) { _mm512_storeu_ps(p, a.v); }
inline V load_bf16(const uint16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline void store_bf16(uint16_t* p, V a) {  // to nearest, ties to even; a nan becomes 0x7FC0
  __m512i u = _mm512_castps_si512(a.v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline V load_f16(const uint16_t* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))}; }
inline void store_f16(uint16_t* p, V a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline V add(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V sub(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V mul(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V div(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V abs_(V a) { return {_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(0x7FFFFFFF)))}; }
inline V max_ignoring_nan(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }  // a nan in a: b is returned
inline V round_even(V a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline V floor_(V a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)}; }
inline V clamp_nan_to_zero(V y, V lo, V hi) {
  __m512 t = _mm512_max_ps(_mm512_min_ps(y.v, hi.v), lo.v);
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y.v, y.v, _CMP_ORD_Q), t)};
}
inline M is_nan(V a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q); }
inline M mask_none() { return 0; }
inline M mask_or(M a, M b) { return M(a | b); }
inline bool mask_any(M a) { return a != 0; }
inline float hmax(V a) { return _mm512_reduce_max_ps(a.v); }
// lanes folded in halves: i + (i + 8), then + 4, + 2, + 1 (the reference's order)
inline float hsum_tree(V a) {
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm512_extractf32x8_ps(a.v, 1));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
inline void store_codes(uint8_t* dst, V q, int bits) { store_code_bytes(dst, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q.v)), bits); }
inline V load_codes(const uint8_t* src, int bits) { return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(load_code_bytes(src, bits)))}; }
// float elements: the biased exponent of a >= 0 as a float, 2**(eb - 127) from a biased exponent, the sign bit
inline V biased_exp(V a) { return {_mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_castps_si512(a.v), 23))}; }
inline V pow2_biased(V eb) { return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtps_epi32(eb.v), 23))}; }
inline V signbit01(V y) { return {_mm512_cvtepi32_ps(_mm512_srli_epi32(_mm512_castps_si512(y.v), 31))}; }
inline V copysign_(V mag, V s) {
  const __m512i m = _mm512_set1_epi32(int(0x80000000u));
  return {_mm512_castsi512_ps(_mm512_or_si512(_mm512_andnot_si512(m, _mm512_castps_si512(mag.v)), _mm512_and_si512(m, _mm512_castps_si512(s.v))))};
}
inline V min_(V a, V b) { return {_mm512_min_ps(a.v, b.v)}; }
inline V select_ge(V a, V t, V yes, V no) { return {_mm512_mask_blend_ps(_mm512_cmp_ps_mask(a.v, t.v, _CMP_GE_OQ), no.v, yes.v)}; }
// the Hadamard transform's stages h = 1, 2, 4, 8 on the 16 lanes: (a, b) -> (a + b, a - b), a the lower lane.
// Each lane adds its partner t to itself, the upper lane with its sign flipped: t + (-b) is a - b exactly.
inline __m512 hstage(__m512 v, __m512 t, __m512 upper_sign) { return _mm512_add_ps(t, _mm512_xor_ps(v, upper_sign)); }
inline __m512 upper_signs(__mmask16 upper) {
  return _mm512_castsi512_ps(_mm512_maskz_mov_epi32(upper, _mm512_set1_epi32(int(0x80000000u))));
}
inline V hadamard16(V x) {
  __m512 v = x.v;
  v = hstage(v, _mm512_permute_ps(v, 0xB1), upper_signs(0xAAAA));          // partners 1 apart
  v = hstage(v, _mm512_permute_ps(v, 0x4E), upper_signs(0xCCCC));          // 2 apart
  v = hstage(v, _mm512_shuffle_f32x4(v, v, 0xB1), upper_signs(0xF0F0));    // 4 apart: 128-bit lanes swapped in pairs
  v = hstage(v, _mm512_shuffle_f32x4(v, v, 0x4E), upper_signs(0xFF00));    // 8 apart: the 256-bit halves swapped
  return {v};
}

#define NAME "avx512"
#include "body.h"
#undef NAME

}  // namespace

const Kernels* kernels() { return &table; }
}  // namespace gc_avx512

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif
