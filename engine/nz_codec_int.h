/*
 * nz_codec_int.h — what the tile codec's two halves share (engine-internal:
 * nz_codec.c, the descriptors and the encoder, and nz_codec_dec.c, the
 * decoder). Not part of the API: other modules include nz_codec.h.
 */
#ifndef NZ_CODEC_INT_H
#define NZ_CODEC_INT_H

#include "nz_alloc.h"
#include "nz_codec.h"

#include <string.h>

/* bytes of a coded tile's header: exponent section length, rANS lanes (u32 LE each) */
#define TILE_HDR 8

/* zstd's allocations go through the counted allocator (scratch). */
static inline void *zstd_alloc(void *opaque, size_t n) { return nz_malloc(n, NZ_MEM_SCRATCH); }
static inline void zstd_free(void *opaque, void *p) { nz_free(p); }

static inline uint32_t f2u(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float u2f(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Branch-free binary16 -> fp32 (vectorises): normals rebias the exponent
 * with an integer add, subnormals convert their integer significand exactly
 * (em * 2^-24, no denormal operand, so DAZ/FTZ modes cannot change the
 * result), Inf/NaN keep their payload. */
static inline float f16_to_f32(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, em = h & 0x7fffu;
    uint32_t bits = (em << 13) + (112u << 23);
    if (em < 0x400u) bits = f2u((float)em * 0x1p-24f);
    if (em >= 0x7c00u) bits = 0x7f800000u | (em & 0x3ffu) << 13;
    return u2f(sign | bits);
}

/* bytes of the sign+mantissa plane of n elements (1 + mant_bits bits each) */
static inline uint64_t sm_bytes(const nz_tensor_desc *d, uint64_t n) {
    uint64_t w = 1 + (uint64_t)d->mant_bits;
    return (n * w + 7) / 8;
}

/* fp32 bits of source element i (bf16 and f16 widen exactly) */
static inline uint32_t src_f32_bits(nz_dtype dt, const uint8_t *src, uint64_t i) {
    switch (dt) {
    case NZ_DT_BF16:
        return (uint32_t)nz_rd16le(src + 2 * i) << 16;
    case NZ_DT_F16:
        return f2u(nz_f16_to_f32(nz_rd16le(src + 2 * i)));
    default:
        return nz_rd32le(src + 4 * i);
    }
}

#endif
