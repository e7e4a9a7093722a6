// Shared declarations of the native kernels: dtype kinds, the wire format's description, and the
// table each instruction set fills.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

enum { KIND_F32 = 0, KIND_F16 = 1, KIND_BF16 = 2 };

// What a kernel needs of a WireFormat (gradcomp/codec/formats.py), filled by module.cpp from the
// tuple native.py passes. The tables live in Python (gradcomp/codec/kernels/reference.py: Tables).
struct Fmt {
  int bits;                  // 8, 4 or 2 bits per code
  int is_float;              // 0: integer codes (offset 2**(bits-1)); 1: float elements (sign-magnitude)
  int mbits, emin;           // float elements: mantissa bits, exponent of the smallest normal
  float max_code;            // qmax (integers) or the largest finite element (floats)
  float rms_step;            // > 0: the fp32 scale is rms_step * rms(block), not amax / max_code
  int midrise;               // integer codes at the levels (k + 1/2) * scale, k in [-qmax - 1, qmax]
  float qmax;                // integer codes: the largest symmetric code (127, 7, 1)
  int group;                 // values per scale (the block for fp32 scales)
  int e8m0;                  // 0: one fp32 scale per block; 1: one e8m0 byte per group
  int emax;                  // e8m0: the element format's largest exponent
  float special;             // float elements: the first magnitude code that is inf or nan (256: none)
  int has_inf;               // float elements: that first special code is inf (E5M2), the others nan
  const float* values;       // float elements: what each code stands for (2**bits entries)
  const float* scale_values; // e8m0: the divisor of each scale byte (256 entries, 255 is nan)
  const float* signs;        // rotation: the block's random signs, or null (no rotation)
  const float* signed_norm;  // rotation: signs * norm
  float norm;                // rotation: fp32(1 / sqrt(block))
};

struct Kernels {
  const char* name;
  void (*encode)(const void* x, int kind, int64_t r0, int64_t r1, int64_t block, const float* rin, float* rout,
                 const float* noise, uint8_t* codes, void* scales, const Fmt& f, float* c);
  void (*reduce)(const uint8_t* codes, int64_t cstride, const void* scales, int64_t sstride, int64_t p, int64_t r0,
                 int64_t r1, int64_t block, const float* rin, float* rout, const float* noise, uint8_t* out_codes,
                 void* out_scales, const Fmt& f, float* c);
  void (*decode)(const uint8_t* codes, const void* scales, int64_t r0, int64_t r1, int64_t block, void* out, int kind,
                 const Fmt& f, float* c);
  void (*decode_sum)(const uint8_t* codes, int64_t cstride, const void* scales, int64_t sstride, int64_t p,
                     int64_t r0, int64_t r1, int64_t block, void* out, int kind, int64_t divide, const float* factor,
                     const Fmt& f, float* c);
};

// The e8m0 scale byte of a group whose absmax is `amax` (`nan`: it held a nan): the biased fp32
// exponent minus the element format's, clamped to [0, 254]; 255 (the spec's NaN) when not finite.
// 2**(biased - 127) for a biased exponent in [1, 254] (exact).
static inline float pow2_of_biased(int biased) {
  const uint32_t u = uint32_t(biased) << 23;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static inline int e8m0_of(float amax, bool nan, int emax) {
  uint32_t u;
  std::memcpy(&u, &amax, 4);
  const int e = int((u >> 23) & 0xFF);
  if (nan || e == 255) return 255;
  const int k = e - emax;
  return k < 0 ? 0 : (k > 254 ? 254 : k);
}

namespace gc_generic { extern const Kernels* kernels(); }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GC_X86 1
namespace gc_avx2 { extern const Kernels* kernels(); }
namespace gc_avx512 { extern const Kernels* kernels(); }
#endif
