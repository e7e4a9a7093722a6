// The exchange's kernels, written once over a 16-value vector type `V` that each instruction set
// defines (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp include this file inside their own
// namespace, each compiled for its own target). Every kernel reads its inputs once and writes its
// outputs once: a block (one row of `block` values, block % 16 == 0) is brought into a small
// per-thread buffer in one sweep (absmax and nan seen on the way), then scaled, rounded, packed and
// its residual written in a second sweep over that buffer, which is still in the L1 cache.
//
// The arithmetic is the eager reference's (gradcomp/codec/kernels/reference.py), operation for
// operation, so that the results are bit-identical: no fused multiply-add (built with
// -ffp-contract=off, and the intrinsics are separate multiplies and adds), true division, ties to
// even, the products rounded before they are added.
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

// ---- one block: absmax -> scale -> codes (+ residual), from a block already in `c`

// Quantize the block `c` (n values) whose absmax is `amax` (nan if it held a nan); write the packed
// codes, return the scale, write c - q * scale into `res_out` when given.
static inline float quantize_block(const float* c, int64_t n, float amax, bool nan, const float* noise,
                                   float* res_out, uint8_t* codes, int bits) {
  const int qmax = (1 << (bits - 1)) - 1;
  const float scale = nan ? NAN : amax / static_cast<float>(qmax);
  const float safe = (scale == 0.0f) ? 1.0f : scale;
  const V vsafe = splat(safe), vscale = splat(scale), vq = splat(static_cast<float>(qmax));
  const V vnq = splat(-static_cast<float>(qmax)), voff = splat(static_cast<float>(qmax + 1));
  const int per16 = 2 * bits;  // packed bytes of 16 codes
  for (int64_t i = 0; i < n; i += 16) {
    V v = load_f32(c + i);
    V y = div(v, vsafe);
    y = noise ? floor_(add(y, load_f32(noise + i))) : round_even(y);
    V q = clamp_nan_to_zero(y, vnq, vq);  // clamp, then a nan (non-finite block) becomes code 0
    if (res_out) store_f32(res_out + i, sub(v, mul(q, vscale)));
    store_codes(codes + (i / 16) * per16, add(q, voff), bits);
  }
  return scale;
}

// ---- encode: rows of x (+ residual) -> packed codes, scales, new residual

static void encode_rows(const void* x, int kind, int64_t r0, int64_t r1, int64_t block, const float* rin, float* rout,
                        const float* noise, uint8_t* codes, float* scales, int bits, float* c) {
  const int64_t row_bytes = block * bits / 8;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * block;
    V vmax = splat(0.0f);
    M anynan = mask_none();
    for (int64_t i = 0; i < block; i += 16) {
      V v = load_any(x, kind, o + i);
      if (rin) v = add(v, load_f32(rin + o + i));
      store_f32(c + i, v);
      vmax = max_ignoring_nan(abs_(v), vmax);
      anynan = mask_or(anynan, is_nan(v));
    }
    scales[r] = quantize_block(c, block, hmax(vmax), mask_any(anynan), noise ? noise + o : nullptr,
                               rout ? rout + o : nullptr, codes + r * row_bytes, bits);
  }
}

// ---- the sum of P quantized copies of a block, in rank order, into `c`; returns the absmax

static inline void sum_copies(const uint8_t* codes, int64_t cstride, const float* scales, int64_t sstride, int64_t p,
                              int64_t r, int64_t block, int bits, float* c) {
  const int64_t row_bytes = block * bits / 8;
  const V voff = splat(static_cast<float>(1 << (bits - 1)));
  for (int64_t i = 0; i < block; i += 16) {
    const int64_t byte = r * row_bytes + (i / 16) * 2 * bits;
    V acc = mul(sub(load_codes(codes + byte, bits), voff), splat(scales[r]));
    for (int64_t k = 1; k < p; ++k) {  // a fixed order: every owner sums its blocks the same way
      acc = add(acc, mul(sub(load_codes(codes + k * cstride + byte, bits), voff), splat(scales[k * sstride + r])));
    }
    store_f32(c + i, acc);
  }
}

// ---- reduce: P copies -> mean (+ residual) -> requantized codes, scales, new residual

static void reduce_rows(const uint8_t* codes, int64_t cstride, const float* scales, int64_t sstride, int64_t p,
                        int64_t r0, int64_t r1, int64_t block, const float* rin, float* rout, const float* noise,
                        uint8_t* out_codes, float* out_scales, int bits, float* c) {
  const int64_t row_bytes = block * bits / 8;
  const V vp = splat(static_cast<float>(p));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t o = r * block;
    sum_copies(codes, cstride, scales, sstride, p, r, block, bits, c);
    V vmax = splat(0.0f);
    M anynan = mask_none();
    for (int64_t i = 0; i < block; i += 16) {
      V v = div(load_f32(c + i), vp);
      if (rin) v = add(v, load_f32(rin + o + i));
      store_f32(c + i, v);
      vmax = max_ignoring_nan(abs_(v), vmax);
      anynan = mask_or(anynan, is_nan(v));
    }
    out_scales[r] = quantize_block(c, block, hmax(vmax), mask_any(anynan), noise ? noise + o : nullptr,
                                   rout ? rout + o : nullptr, out_codes + r * row_bytes, bits);
  }
}

// ---- decode: packed codes and scales -> values of the output's dtype

static void decode_rows(const uint8_t* codes, const float* scales, int64_t r0, int64_t r1, int64_t block, void* out, int kind,
                        int bits) {
  const int64_t row_bytes = block * bits / 8;
  const V voff = splat(static_cast<float>(1 << (bits - 1)));
  for (int64_t r = r0; r < r1; ++r) {
    const V s = splat(scales[r]);
    for (int64_t i = 0; i < block; i += 16) {
      V v = mul(sub(load_codes(codes + r * row_bytes + (i / 16) * 2 * bits, bits), voff), s);
      store_any(out, kind, r * block + i, v);
    }
  }
}

// ---- decode-sum: P copies -> sum / divide * factor -> values of the output's dtype

static void decode_sum_rows(const uint8_t* codes, int64_t cstride, const float* scales, int64_t sstride, int64_t p,
                            int64_t r0, int64_t r1, int64_t block, void* out, int kind, int64_t divide, const float* factor,
                            int bits, float* c) {
  const V vdiv = splat(static_cast<float>(divide));
  for (int64_t r = r0; r < r1; ++r) {
    sum_copies(codes, cstride, scales, sstride, p, r, block, bits, c);
    for (int64_t i = 0; i < block; i += 16) {
      V v = load_f32(c + i);
      if (divide != 1) v = div(v, vdiv);
      if (factor) v = mul(v, splat(*factor));
      store_any(out, kind, r * block + i, v);
    }
  }
}

// ---- the table the module dispatches through

static const Kernels table = {NAME, encode_rows, reduce_rows, decode_rows, decode_sum_rows};
