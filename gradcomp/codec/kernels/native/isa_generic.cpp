// Portable kernels: plain C++ over 16-value arrays (any CPU; the compiler vectorises what it can).
#include "common.h"

namespace gc_generic {
namespace {

struct V { float f[16]; };
typedef bool M;

inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline V splat(float x) { V r; for (int i = 0; i < 16; ++i) r.f[i] = x; return r; }
inline V load_f32(const float* p) { V r; std::memcpy(r.f, p, 64); return r; }
inline void store_f32(float* p, V a) { std::memcpy(p, a.f, 64); }
inline V load_bf16(const uint16_t* p) { V r; for (int i = 0; i < 16; ++i) r.f[i] = float_of(uint32_t(p[i]) << 16); return r; }
inline void store_bf16(uint16_t* p, V a) {
  for (int i = 0; i < 16; ++i) {  // to nearest, ties to even; a nan becomes the quiet nan 0x7FC0
    uint32_t u = bits_of(a.f[i]);
    p[i] = std::isnan(a.f[i]) ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}
inline float f16_to_f32(uint16_t h) {  // exact (IEEE half to single)
  const uint32_t w = uint32_t(h) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  return float_of(sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized)));
}
inline uint16_t f32_to_f16(float f) {  // to nearest, ties to even (IEEE single to half)
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f), shl1_w = w + w, sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_of(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
inline V load_f16(const uint16_t* p) { V r; for (int i = 0; i < 16; ++i) r.f[i] = f16_to_f32(p[i]); return r; }
inline void store_f16(uint16_t* p, V a) { for (int i = 0; i < 16; ++i) p[i] = f32_to_f16(a.f[i]); }

#define GC_LANEWISE(name, expr) \
  inline V name(V a, V b) { V r; for (int i = 0; i < 16; ++i) { float x = a.f[i], y = b.f[i]; r.f[i] = (expr); } return r; }
GC_LANEWISE(add, x + y)
GC_LANEWISE(sub, x - y)
GC_LANEWISE(mul, x * y)
GC_LANEWISE(div, x / y)
GC_LANEWISE(max_ignoring_nan, x > y ? x : y)  // a nan in a loses to b; b never holds one
#undef GC_LANEWISE
inline V abs_(V a) { V r; for (int i = 0; i < 16; ++i) r.f[i] = std::fabs(a.f[i]); return r; }
inline V round_even(V a) { V r; for (int i = 0; i < 16; ++i) r.f[i] = std::nearbyint(a.f[i]); return r; }
inline V floor_(V a) { V r; for (int i = 0; i < 16; ++i) r.f[i] = std::floor(a.f[i]); return r; }
inline V clamp_nan_to_zero(V y, V lo, V hi) {
  V r;
  for (int i = 0; i < 16; ++i) {
    float v = y.f[i];
    r.f[i] = std::isnan(v) ? 0.0f : (v < lo.f[i] ? lo.f[i] : (v > hi.f[i] ? hi.f[i] : v));
  }
  return r;
}
inline M is_nan(V a) { bool n = false; for (int i = 0; i < 16; ++i) n |= std::isnan(a.f[i]); return n; }
inline M mask_none() { return false; }
inline M mask_or(M a, M b) { return a || b; }
inline bool mask_any(M a) { return a; }
// lanes folded in halves: i + (i + 8), then + 4, + 2, + 1 (the reference's order)
inline float hsum_tree(V a) {
  for (int h = 8; h >= 1; h /= 2)
    for (int i = 0; i < h; ++i) a.f[i] = a.f[i] + a.f[i + h];
  return a.f[0];
}
inline float hmax(V a) { float m = a.f[0]; for (int i = 1; i < 16; ++i) m = a.f[i] > m ? a.f[i] : m; return m; }

inline void store_codes(uint8_t* dst, V q, int bits) {  // q holds integral values in [0, 2**bits)
  uint8_t c[16];
  for (int i = 0; i < 16; ++i) c[i] = uint8_t(q.f[i]);
  if (bits == 8) { std::memcpy(dst, c, 16); return; }
  if (bits == 4) { for (int i = 0; i < 8; ++i) dst[i] = uint8_t(c[2 * i] | (c[2 * i + 1] << 4)); return; }
  for (int i = 0; i < 4; ++i)
    dst[i] = uint8_t(c[4 * i] | (c[4 * i + 1] << 2) | (c[4 * i + 2] << 4) | (c[4 * i + 3] << 6));
}
inline V load_codes(const uint8_t* src, int bits) {
  V r;
  if (bits == 8) { for (int i = 0; i < 16; ++i) r.f[i] = float(src[i]); return r; }
  const int per = 8 / bits, mask = (1 << bits) - 1;
  for (int i = 0; i < 16; ++i) r.f[i] = float((src[i / per] >> (bits * (i % per))) & mask);
  return r;
}

// float elements: the biased exponent of a >= 0 as a float, 2**(eb - 127) from a biased exponent, the sign bit
inline V biased_exp(V a) { V r; for (int i = 0; i < 16; ++i) r.f[i] = float(bits_of(a.f[i]) >> 23); return r; }
inline V pow2_biased(V e) { V r; for (int i = 0; i < 16; ++i) r.f[i] = float_of(uint32_t(int32_t(e.f[i])) << 23); return r; }
inline V signbit01(V y) { V r; for (int i = 0; i < 16; ++i) r.f[i] = float(bits_of(y.f[i]) >> 31); return r; }
inline V copysign_(V mag, V s) {
  V r;
  for (int i = 0; i < 16; ++i) r.f[i] = float_of((bits_of(mag.f[i]) & 0x7FFFFFFFu) | (bits_of(s.f[i]) & 0x80000000u));
  return r;
}
inline V min_(V a, V b) { V r; for (int i = 0; i < 16; ++i) r.f[i] = a.f[i] < b.f[i] ? a.f[i] : b.f[i]; return r; }
inline V select_ge(V a, V t, V yes, V no) { V r; for (int i = 0; i < 16; ++i) r.f[i] = a.f[i] >= t.f[i] ? yes.f[i] : no.f[i]; return r; }
// the Hadamard transform's stages h = 1, 2, 4, 8 on the 16 values: (a, b) -> (a + b, a - b)
inline V hadamard16(V x) {
  for (int h = 1; h < 16; h *= 2) {
    V r;
    for (int i = 0; i < 16; ++i) r.f[i] = (i & h) ? x.f[i - h] - x.f[i] : x.f[i] + x.f[i + h];
    x = r;
  }
  return x;
}

#define NAME "generic"
#include "body.h"
#undef NAME

}  // namespace

const Kernels* kernels() { return &table; }
}  // namespace gc_generic
