// The exchange's kernels, written once over a 16-value vector type `V` that each instruction set
// defines (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp include this file inside their own
// namespace, each compiled for its own target). Every kernel reads its inputs once and writes its
// outputs once: a block (one row of `block` values, block % 16 == 0) is brought into a small
// per-thread buffer in one sweep (absmax and nan seen on the way), then scaled, rounded, packed and
// its residual written in a second sweep over that buffer, which is still in the L1 cache. A rotating
// format's Hadamard transform runs on that buffer too: its first four stages in register as the
// values arrive, the others (log2(block / 16) of them) as sweeps over the 1 KB block in L1.
//
// The arithmetic is the eager reference's (gradcomp/codec/kernels/reference.py), operation for
// operation, so that the results are bit-identical: no fused multiply-add (built with
// -ffp-contract=off, and the intrinsics are separate multiplies and adds), true division, ties to
// even, the products rounded before they are added, the transform's stages in the order h = 1, 2, 4...
//
// Needs from the including file: struct V (16 floats) and the functions used below.

// ---- loads and stores of 16 values of a bucket's dtype

static inline V load_any(const void* base, int kind, int64_t i) {
  if (kind == KIND_F32) return load_f32(static_cast<const float*>(base) + i);
  if (kind == KIND_BF16) return load_bf16(static_cast<const uint16_t*>(base) + i);
  return load_f16(static_cast<const uint16_t*>(base) + i);
}

static inline void store_any(void* base, int kind, int64_t i, V v) {
  if (kind == KIND_F32) store_f32(static_cast<float*>(base) + i, v);
  else if (kind == KIND_BF16) store_bf16(static_cast<uint16_t*>(base) + i, v);
  else store_f16(static_cast<uint16_t*>(base) + i, v);
}

// ---- the Hadamard transform's stages h >= 16 (stages 1..8 are hadamard16, in register)

// One sub-block of 16 NV values, in registers: r[k] = hadamard16(get(16 k)), then the stages h = 16 .. 8 NV
// across the vectors, then put(16 k, r[k]). NV is a constant, so the loops unroll and r stays in registers.
template <int NV, int H>
static inline void fwht_stages(V* r) {  // stage H (in vectors), then the next ones up to NV / 2
  if constexpr (H < NV) {
#pragma GCC unroll 16
    for (int i = 0; i < NV; i += 2 * H) {
#pragma GCC unroll 16
      for (int j = i; j < i + H; ++j) {
        const V a = r[j], b = r[j + H];
        r[j] = add(a, b);
        r[j + H] = sub(a, b);
      }
    }
    fwht_stages<NV, 2 * H>(r);
  }
}

template <int NV, typename Get, typename Put>
static inline void fwht_sub(Get&& get, Put&& put) {
  V r[NV];
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) r[k] = hadamard16(get(16 * k));
  fwht_stages<NV, 1>(r);
#pragma GCC unroll 16
  for (int k = 0; k < NV; ++k) put(16 * k, r[k]);
}

template <typename Get, typename Put>
static inline void fwht_sub_n(int nv, Get&& get, Put&& put) {
  switch (nv) {
    case 16: fwht_sub<16>(get, put); break;
    case 8: fwht_sub<8>(get, put); break;
    case 4: fwht_sub<4>(get, put); break;
    case 2: fwht_sub<2>(get, put); break;
    default: fwht_sub<1>(get, put); break;
  }
}

// Stages h = from .. n/2 over a block in `c` (L1): the stages across sub-blocks of 256 values.
static inline void fwht_across(float* c, int64_t n, int64_t from) {
  for (int64_t h = from; h < n; h *= 2)
    for (int64_t i = 0; i < n; i += 2 * h)
      for (int64_t j = i; j < i + h; j += 16) {
        const V a = load_f32(c + j), b = load_f32(c + j + h);
        store_f32(c + j, add(a, b));
        store_f32(c + j + h, sub(a, b));
      }
}

// The rotation's sub-blocks: up to 256 values (16 vectors) transformed in registers.
static inline int64_t sub_block(int64_t block) { return block < 256 ? block : 256; }

// ---- one scale group: scaled values -> codes (+ residual)

// Integer codes: q = clamp(round(c / safe)), residual c - q * scale, stored code q + qmax + 1.
static inline void quantize_int(const float* c, int64_t n, float scale, float safe, const float* noise, float* res_out,
                                uint8_t* codes, const Fmt& f) {
  const int bits = f.bits;
  const V vsafe = splat(safe), vscale = splat(scale), vq = splat(f.qmax);
  const V vnq = splat(-f.qmax), voff = splat(f.qmax + 1.0f);
  const int per16 = 2 * bits;  // packed bytes of 16 codes
  for (int64_t i = 0; i < n; i += 16) {
    V v = load_f32(c + i);
    V y = div(v, vsafe);
    y = noise ? floor_(add(y, load_f32(noise + i))) : round_even(y);
    V q = clamp_nan_to_zero(y, vnq, vq);  // clamp, then a nan (non-finite block) becomes code 0
    if (res_out) store_f32(res_out + i, sub(v, mul(q, vscale)));
    store_codes(codes + (i / 16) * per16, add(q, voff), bits);
  }
}

// Mid-rise integer codes: k = clamp(floor(c / safe)) (stochastic: floor(c / safe - 1/2 + u)), level
// q = k + 1/2, residual c - q * scale, stored code k + qmax + 1.
static inline void quantize_midrise(const float* c, int64_t n, float scale, float safe, const float* noise, float* res_out,
                                    uint8_t* codes, const Fmt& f) {
  const int bits = f.bits;
  const V vsafe = splat(safe), vscale = splat(scale), vhi = splat(f.qmax), vlo = splat(-f.qmax - 1.0f);
  const V vhalf = splat(0.5f), voff = splat(f.qmax + 1.0f);
  const int per16 = 2 * bits;
  for (int64_t i = 0; i < n; i += 16) {
    V v = load_f32(c + i);
    V y = div(v, vsafe);
    V k = noise ? floor_(add(sub(y, vhalf), load_f32(noise + i))) : floor_(y);
    k = clamp_nan_to_zero(k, vlo, vhi);
    const V q = add(k, vhalf);
    if (res_out) store_f32(res_out + i, sub(v, mul(q, vscale)));
    store_codes(codes + (i / 16) * per16, add(k, voff), bits);
  }
}

// Float elements: saturate, round the magnitude on the element's grid (step 2**(e - mbits)), code
// sign << (bits - 1) | (e - emin) << mbits + m, residual c - q * scale.
static inline void quantize_float(const float* c, int64_t n, float scale, float safe, const float* noise, float* res_out,
                                  uint8_t* codes, const Fmt& f) {
  const int bits = f.bits;
  const V vsafe = splat(safe), vscale = splat(scale), vmax = splat(f.max_code), vnmax = splat(-f.max_code);
  const V ebmin = splat(float(f.emin + 127)), vmb = splat(float(f.mbits)), vmul = splat(float(1 << f.mbits));
  const V vsign = splat(float(1 << (bits - 1)));
  const int per16 = 2 * bits;
  for (int64_t i = 0; i < n; i += 16) {
    V v = load_f32(c + i);
    V y = clamp_nan_to_zero(div(v, vsafe), vnmax, vmax);
    V a = abs_(y);
    V eb = max_ignoring_nan(biased_exp(a), ebmin);  // no nan here: a is finite
    V step = pow2_biased(sub(eb, vmb));
    V r = div(a, step);
    V m = noise ? floor_(add(r, load_f32(noise + i))) : round_even(r);
    V q = copysign_(mul(m, step), y);
    if (res_out) store_f32(res_out + i, sub(v, mul(q, vscale)));
    V code = add(add(mul(sub(eb, ebmin), vmul), m), mul(signbit01(y), vsign));
    store_codes(codes + (i / 16) * per16, code, bits);
  }
}

static inline void quantize_values(const float* c, int64_t n, float scale, float safe, const float* noise, float* res_out,
                                   uint8_t* codes, const Fmt& f) {
  if (f.is_float) quantize_float(c, n, scale, safe, noise, res_out, codes, f);
  else if (f.midrise) quantize_midrise(c, n, scale, safe, noise, res_out, codes, f);
  else quantize_int(c, n, scale, safe, noise, res_out, codes, f);
}

// ---- a fitted step: rms_step * rms(c), the reference's rms_scale operation for operation

static inline float rms_scale(const float* c, int64_t n, float amax, float step) {
  uint32_t bits;
  std::memcpy(&bits, &amax, 4);
  int e = int((bits >> 23) & 0xFF);
  e = e < 1 ? 1 : (e > 253 ? 253 : e);
  const V p = splat(pow2_of_biased(254 - e));  // |c * p| < 4: no square overflows
  V acc = splat(0.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const V u = mul(load_f32(c + i), p);
    acc = add(acc, mul(u, u));
  }
  return (std::sqrt(hsum_tree(acc) * (1.0f / float(n))) * pow2_of_biased(e)) * step;
}

// ---- one block in `c` (n values, absmax `amax`, nan if it held one) -> codes, scales (+ residual)

static inline void quantize_block(const float* c, int64_t n, float amax, bool nan, const float* noise, float* res_out,
                                  uint8_t* codes, void* scales, int64_t r, const Fmt& f) {
  if (!f.e8m0) {
    const float scale = nan ? NAN : (f.rms_step > 0.0f ? rms_scale(c, n, amax, f.rms_step) : amax / f.max_code);
    const float safe = (scale == 0.0f) ? 1.0f : scale;
    quantize_values(c, n, scale, safe, noise, res_out, codes, f);
    static_cast<float*>(scales)[r] = scale;
    return;
  }
  const int64_t g = f.group, groups = n / g, gbytes = g * f.bits / 8;
  uint8_t* out = static_cast<uint8_t*>(scales) + r * groups;
  for (int64_t j = 0; j < groups; ++j) {
    const float* cg = c + j * g;
    V vmax = splat(0.0f);
    M anynan = mask_none();
    for (int64_t i = 0; i < g; i += 16) {
      const V v = load_f32(cg + i);
      vmax = max_ignoring_nan(abs_(v), vmax);
      anynan = mask_or(anynan, is_nan(v));
    }
    const int k = e8m0_of(hmax(vmax), mask_any(anynan), f.emax);
    const float d = f.scale_values[k];
    quantize_values(cg, g, d, d, noise ? noise + j * g : nullptr, res_out ? res_out + j * g : nullptr, codes + j * gbytes, f);
    out[j] = uint8_t(k);
  }
}

// ---- encode: rows of x (rotated, + residual) -> packed codes, scales, new residual

static void encode_rows(const void* x, int kind, int64_t r0, int64_t r1, int64_t block, const float* rin, float* rout,
                        const float* noise, uint8_t* codes, void* scales, const Fmt& f, float* c) {
  const int64_t row_bytes = block * f.bits / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * block;
    V vmax = splat(0.0f);
    M anynan = mask_none();
    if (f.signs) {  // rotate: signs and the stages within 256 values in registers, the others in L1, then the norm
      const int64_t sb = sub_block(block);
      const int nv = int(sb / 16);
      const V vn = splat(f.norm);
      for (int64_t s0 = 0; s0 < block; s0 += sb) {
        auto get = [&](int64_t i) { return mul(load_any(x, kind, o + s0 + i), load_f32(f.signs + s0 + i)); };
        if (sb == block) {  // the whole block is in registers: finish it there
          fwht_sub_n(nv, get, [&](int64_t i, V r) {
            V v = mul(r, vn);
            if (rin) v = add(v, load_f32(rin + o + i));
            store_f32(c + i, v);
            vmax = max_ignoring_nan(abs_(v), vmax);
            anynan = mask_or(anynan, is_nan(v));
          });
        } else {
          fwht_sub_n(nv, get, [&](int64_t i, V r) { store_f32(c + s0 + i, r); });
        }
      }
      if (sb != block) {
        fwht_across(c, block, sb);
        for (int64_t i = 0; i < block; i += 16) {
          V v = mul(load_f32(c + i), vn);
          if (rin) v = add(v, load_f32(rin + o + i));
          store_f32(c + i, v);
          vmax = max_ignoring_nan(abs_(v), vmax);
          anynan = mask_or(anynan, is_nan(v));
        }
      }
    } else {
      for (int64_t i = 0; i < block; i += 16) {
        V v = load_any(x, kind, o + i);
        if (rin) v = add(v, load_f32(rin + o + i));
        store_f32(c + i, v);
        vmax = max_ignoring_nan(abs_(v), vmax);
        anynan = mask_or(anynan, is_nan(v));
      }
    }
    quantize_block(c, block, hmax(vmax), mask_any(anynan), noise ? noise + o : nullptr, rout ? rout + o : nullptr,
                   codes + r * row_bytes, scales, r, f);
  }
}

// ---- dequantizing 16 values: value(code) * scale

// The divisor of the scale group holding value i of row r of copy k.
static inline float scale_of(const void* scales, int64_t sstride, int64_t k, int64_t r, int64_t i, int64_t block, const Fmt& f) {
  if (!f.e8m0) return static_cast<const float*>(scales)[k * sstride + r];
  const int64_t groups = block / f.group;
  return f.scale_values[static_cast<const uint8_t*>(scales)[k * sstride + r * groups + i / f.group]];
}

// What float element codes (as floats, 0 .. 2**bits - 1) stand for, in exact arithmetic: the magnitude
// code mag = e * 2**mbits + m is (m + 2**mbits [e > 0]) * 2**(max(e, 1) - 1 + emin - mbits); the OCP
// special codes (E4M3's 0x7F, E5M2's 0x7C inf and 0x7D-0x7F nan) are selected in; the sign bit flips it.
static inline V float_values(V codes, const Fmt& f) {
  const float half = float(1 << (f.bits - 1)), mant = float(1 << f.mbits);
  const V s = floor_(mul(codes, splat(1.0f / half)));
  const V mag = sub(codes, mul(s, splat(half)));
  const V e = floor_(mul(mag, splat(1.0f / mant)));
  const V m = sub(mag, mul(e, splat(mant)));
  const V one = splat(1.0f);
  const V e1 = max_ignoring_nan(e, one);
  const V mm = add(m, mul(min_(e, one), splat(mant)));
  V v = mul(mm, pow2_biased(add(e1, splat(float(126 + f.emin - f.mbits)))));
  if (f.special < 256.0f) {
    const V sv = f.has_inf ? select_ge(mag, splat(f.special + 1.0f), splat(NAN), splat(INFINITY)) : splat(NAN);
    v = select_ge(mag, splat(f.special), sv, v);
  }
  return mul(v, sub(one, add(s, s)));  // times +1 or -1: exact, and -0 for the negative zero code
}

static inline V dequant16(const uint8_t* src, float s, const Fmt& f) {
  const V codes = load_codes(src, f.bits);
  const V v = f.is_float ? float_values(codes, f) : sub(codes, splat(f.midrise ? f.qmax + 0.5f : f.qmax + 1.0f));
  return mul(v, splat(s));
}

// ---- the sum of P quantized copies of a block, in rank order, into `c`

static inline void sum_copies(const uint8_t* codes, int64_t cstride, const void* scales, int64_t sstride, int64_t p,
                              int64_t r, int64_t block, const Fmt& f, float* c) {
  const int64_t row_bytes = block * f.bits / 8;
  for (int64_t i = 0; i < block; i += 16) {
    const int64_t byte = r * row_bytes + (i / 16) * 2 * f.bits;
    V acc = dequant16(codes + byte, scale_of(scales, sstride, 0, r, i, block, f), f);
    for (int64_t k = 1; k < p; ++k) {  // a fixed order: every owner sums its blocks the same way
      acc = add(acc, dequant16(codes + k * cstride + byte, scale_of(scales, sstride, k, r, i, block, f), f));
    }
    store_f32(c + i, acc);
  }
}

// ---- reduce: P copies -> mean (+ residual) -> requantized codes, scales, new residual (no rotation)

static void reduce_rows(const uint8_t* codes, int64_t cstride, const void* scales, int64_t sstride, int64_t p,
                        int64_t r0, int64_t r1, int64_t block, const float* rin, float* rout, const float* noise,
                        uint8_t* out_codes, void* out_scales, const Fmt& f, float* c) {
  const int64_t row_bytes = block * f.bits / 8;
  const V vp = splat(static_cast<float>(p));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * block;
    sum_copies(codes, cstride, scales, sstride, p, r, block, f, c);
    V vmax = splat(0.0f);
    M anynan = mask_none();
    for (int64_t i = 0; i < block; i += 16) {
      V v = div(load_f32(c + i), vp);
      if (rin) v = add(v, load_f32(rin + o + i));
      store_f32(c + i, v);
      vmax = max_ignoring_nan(abs_(v), vmax);
      anynan = mask_or(anynan, is_nan(v));
    }
    quantize_block(c, block, hmax(vmax), mask_any(anynan), noise ? noise + o : nullptr, rout ? rout + o : nullptr,
                   out_codes + r * row_bytes, out_scales, r, f);
  }
}

// ---- the rotation back: `get(i)` gives the 16 values at i of the block (already dequantized), the block
// goes out rotated back in the output's dtype. Stages within 256 values in registers, the others in L1.

template <typename Get>
static inline void unrotate_out(Get&& get, float* c, int64_t block, void* out, int kind, int64_t o, const Fmt& f) {
  const int64_t sb = sub_block(block);
  const int nv = int(sb / 16);
  if (sb == block) {
    fwht_sub_n(nv, get, [&](int64_t i, V r) { store_any(out, kind, o + i, mul(r, load_f32(f.signed_norm + i))); });
    return;
  }
  for (int64_t s0 = 0; s0 < block; s0 += sb) {
    fwht_sub_n(nv, [&](int64_t i) { return get(s0 + i); }, [&](int64_t i, V r) { store_f32(c + s0 + i, r); });
  }
  fwht_across(c, block, sb);
  for (int64_t i = 0; i < block; i += 16) store_any(out, kind, o + i, mul(load_f32(c + i), load_f32(f.signed_norm + i)));
}

// ---- decode: packed codes and scales -> values of the output's dtype (rotated back)

static void decode_rows(const uint8_t* codes, const void* scales, int64_t r0, int64_t r1, int64_t block, void* out, int kind,
                        const Fmt& f, float* c) {
  const int64_t row_bytes = block * f.bits / 8;
  for (int64_t r = r0; r < r1; ++r) {
    auto get = [&](int64_t i) {
      return dequant16(codes + r * row_bytes + (i / 16) * 2 * f.bits, scale_of(scales, 0, 0, r, i, block, f), f);
    };
    if (f.signs) {
      unrotate_out(get, c, block, out, kind, r * block, f);
    } else {
      for (int64_t i = 0; i < block; i += 16) store_any(out, kind, r * block + i, get(i));
    }
  }
}

// ---- decode-sum: P copies -> sum / divide * factor -> rotated back -> values of the output's dtype

static void decode_sum_rows(const uint8_t* codes, int64_t cstride, const void* scales, int64_t sstride, int64_t p,
                            int64_t r0, int64_t r1, int64_t block, void* out, int kind, int64_t divide, const float* factor,
                            const Fmt& f, float* c) {
  const V vdiv = splat(static_cast<float>(divide));
  for (int64_t r = r0; r < r1; ++r) {
    sum_copies(codes, cstride, scales, sstride, p, r, block, f, c);
    auto get = [&](int64_t i) {
      V v = load_f32(c + i);
      if (divide != 1) v = div(v, vdiv);
      if (factor) v = mul(v, splat(*factor));
      return v;
    };
    if (f.signs) {
      unrotate_out(get, c, block, out, kind, r * block, f);
    } else {
      for (int64_t i = 0; i < block; i += 16) store_any(out, kind, r * block + i, get(i));
    }
  }
}

// ---- the table the module dispatches through

static const Kernels table = {NAME, encode_rows, reduce_rows, decode_rows, decode_sum_rows};
