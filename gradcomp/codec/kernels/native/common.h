// Shared declarations of the native kernels: dtype kinds and the table each instruction set fills.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

enum { KIND_F32 = 0, KIND_F16 = 1, KIND_BF16 = 2 };

struct Kernels {
  const char* name;
  void (*encode)(const void* x, int kind, int64_t r0, int64_t r1, int64_t block, const float* rin, float* rout,
                 const float* noise, uint8_t* codes, float* scales, int bits, float* c);
  void (*reduce)(const uint8_t* codes, int64_t cstride, const float* scales, int64_t sstride, int64_t p, int64_t r0,
                 int64_t r1, int64_t block, const float* rin, float* rout, const float* noise, uint8_t* out_codes,
                 float* out_scales, int bits, float* c);
  void (*decode)(const uint8_t* codes, const float* scales, int64_t r0, int64_t r1, int64_t block, void* out, int kind,
                 int bits);
  void (*decode_sum)(const uint8_t* codes, int64_t cstride, const float* scales, int64_t sstride, int64_t p,
                     int64_t r0, int64_t r1, int64_t block, void* out, int kind, int64_t divide, const float* factor,
                     int bits, float* c);
};

namespace gc_generic { extern const Kernels* kernels(); }
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define GC_X86 1
namespace gc_avx2 { extern const Kernels* kernels(); }
namespace gc_avx512 { extern const Kernels* kernels(); }
#endif
