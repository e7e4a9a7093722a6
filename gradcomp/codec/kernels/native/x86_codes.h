// Packing of 16 code bytes into 2- and 4-bit fields and back, with SSE2 byte operations (included by the
// x86 instruction-set files, inside their target region). First code in the lowest bits.

// 16 codes (each < 16) -> 8 bytes: per 16-bit lane c0 + 256 c1, (lane | lane >> 4) & 0xFF = c0 | c1 << 4.
static inline __m128i pack4(__m128i c) {
  __m128i t = _mm_and_si128(_mm_or_si128(c, _mm_srli_epi16(c, 4)), _mm_set1_epi16(0x00FF));
  return _mm_packus_epi16(t, t);
}

// 16 codes (each < 4) -> 4 bytes: pairs first (c0 | c1 << 2, below 16), then pack4 of those.
static inline __m128i pack2(__m128i c) {
  __m128i t = _mm_and_si128(_mm_or_si128(c, _mm_srli_epi16(c, 6)), _mm_set1_epi16(0x00FF));
  return pack4(_mm_packus_epi16(t, t));
}

// 8 bytes of 4-bit codes -> 16 codes: low nibbles and high nibbles interleaved.
static inline __m128i unpack4(__m128i b) {
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
}

// 4 bytes of 2-bit codes -> 16 codes: nibbles first (8 values c0 | c1 << 2), then their two halves.
static inline __m128i unpack2(__m128i b) {
  const __m128i m = _mm_set1_epi8(0x03);
  __m128i n = unpack4(b);
  return _mm_unpacklo_epi8(_mm_and_si128(n, m), _mm_and_si128(_mm_srli_epi16(n, 2), m));
}

static inline void store_code_bytes(uint8_t* dst, __m128i b, int bits) {
  if (bits == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), b);
  } else if (bits == 4) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), pack4(b));
  } else {
    int32_t w = _mm_cvtsi128_si32(pack2(b));
    std::memcpy(dst, &w, 4);
  }
}

static inline __m128i load_code_bytes(const uint8_t* src, int bits) {
  if (bits == 8) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  if (bits == 4) return unpack4(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  int32_t w;
  std::memcpy(&w, src, 4);
  return unpack2(_mm_cvtsi32_si128(w));
}
