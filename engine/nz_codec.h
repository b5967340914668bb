/*
 * nz_codec.h — the NeuZip weight codec: one tensor, tile by tile.
 *
 * A tensor is viewed as a 2-D matrix rows x cols (rows = shape[0], cols =
 * product of the other dims; 1-D and 0-D tensors are 1 x n). A tile is a run
 * of tile_rows whole rows (the last tile may be shorter); tiles decode
 * independently.
 *
 * Every float element is split into an exponent and a sign+mantissa field:
 *
 *   stored format      exp bits  sign+mantissa bits   used by
 *   bf16               8         1 + 7                lossless bf16, mode bf16
 *   f16                5         1 + 10               lossless f16
 *   f32                8         1 + 23               lossless f32
 *   k-bit (k = 0..7)   8         1 + k                lossy-k (any source)
 *
 * The exponent plane is coded with one order-0 frequency table per tensor
 * (the escape code of nz_esc.h, rANS at the entropy bound, zstd as the
 * baseline, or nothing when every exponent is the same); the sign+mantissa plane is stored raw, bit-packed
 * LSB first (whole bytes when the width is 8 or 24).
 *
 * Lossy-k rounds the value (seen as fp32) to k mantissa bits: round to
 * nearest, ties to even, the carry running into the exponent (to Inf past
 * the largest finite value). "Even" is the lowest kept bit of the encoding,
 * as IEEE does; with k = 0 that bit is the exponent's, so a tie goes to the
 * power of two with the even biased exponent (3.0 -> 2.0, 6.0 -> 8.0). NaN keeps its sign and becomes a quiet
 * NaN (k >= 1; lossy-0 cannot hold a NaN and refuses it). With norm_block B > 0 each run of B elements of a
 * tile gets a one-byte normaliser n: the block absmax a = 2^e * m, m in [1,2), gives n = round((m - 1) * 256)
 * (at most 255), scale s = 1 + n/256; elements are stored as round_k(x / s) and decode to round_k(x / s) * s,
 * which puts the block maximum near a power of two where k bits represent it almost exactly. Mode bf16 is
 * lossy-7 without normaliser: it turns fp32/fp16 sources into bf16.
 *
 * Tile layout (coder esc/rans/zstd/const), little-endian:
 *   u32 exp_len          bytes of the exponent section
 *   u32 lanes            rANS interleave (32 or 64); 0 for the other coders
 *   u8  exp[exp_len]     esc section (nz_esc.h) | rANS stream (nz_rans.h) |
 *                        zstd frame | nothing (const)
 *   u8  sm[ceil(n*w/8)]  sign+mantissa plane, w = 1 + mantissa bits
 *   u8  norm[ceil(n/B)]  normalisers (lossy with norm_block B only)
 * Coder none (mode raw): the tile is the source bytes of its rows, as is.
 */
#ifndef NZ_CODEC_H
#define NZ_CODEC_H

#include "nz_common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum nz_mode_kind {
    NZ_MODE_RAW = 0,  /* stored as source bytes */
    NZ_MODE_LOSSLESS, /* bit-exact */
    NZ_MODE_BF16,     /* round to bf16, then bit-exact */
    NZ_MODE_LOSSY     /* keep k mantissa bits */
} nz_mode_kind;

typedef struct nz_mode {
    nz_mode_kind kind;
    int k;               /* lossy: kept mantissa bits, 0..7 */
    uint32_t norm_block; /* lossy: elements per normaliser byte, 0 = none */
} nz_mode;

typedef enum nz_coder {
    NZ_CODER_NONE = 0, /* raw tiles */
    NZ_CODER_RANS,     /* interleaved rANS: at the entropy bound, slower to decode */
    NZ_CODER_ZSTD,     /* zstd on the exponent plane (baseline) */
    NZ_CODER_CONST,    /* every exponent equal: nothing stored */
    NZ_CODER_ESC       /* multi-level escape code (nz_esc.h), the default: SIMD-fast, ~0.1 bit above rANS */
} nz_coder;

/** Everything the decoder needs to know about one tensor besides tile bytes. */
typedef struct nz_tensor_desc {
    nz_dtype dtype;   /* source dtype */
    size_t elem_size; /* bytes per source element (raw tensors of any dtype) */
    nz_mode mode;
    nz_coder coder;
    uint64_t rows, cols; /* 2-D view */
    uint32_t tile_rows;  /* rows per tile (>= 1) */
    uint32_t freq[256];  /* exponent frequencies: rans sums to 4096; const: one entry 4096 */
    int zstd_level;      /* encoder only */
    nz_coder coder_req;  /* encoder only: the coder asked for (coder may become const) */
    /* derived by nz_desc_init: */
    int exp_bits;  /* 8 or 5 (0 for raw) */
    int mant_bits; /* stored mantissa bits */
    uint64_t id;   /* unique per initialised desc (decoder table cache key) */
} nz_tensor_desc;

/** Parse "raw", "lossless", "bf16", "lossy-K" (K = 0..7).
 *  @return NZ_OK or NZ_E_INVALID_ARG naming the bad string. */
int nz_mode_parse(const char *s, nz_mode *m, nz_error *err);

/** Write the mode name ("lossy-3") into buf[cap]. @return buf. */
const char *nz_mode_name(const nz_mode *m, char *buf, size_t cap);

/** @return "none", "rans", "zstd", "const", "esc". */
const char *nz_coder_name(nz_coder c);

/** Parse a coder name. @return NZ_OK or NZ_E_INVALID_ARG. */
int nz_coder_parse(const char *s, nz_coder *c, nz_error *err);

/** Default rows per tile so that a decoded fp32 tile is about 512 KiB
 *  (131072 elements: fits the 1-2 MiB L2 of current server cores, and is
 *  long enough that rANS's 64 states cost < 0.02 bits/weight).
 *  @return rows (>= 1). */
uint32_t nz_default_tile_rows(uint64_t cols);

/** Fill d for a tensor; the mode decides the stored format (bf16 mode on a
 *  bf16 source becomes lossless; raw mode any dtype). coder is the requested
 *  exponent coder (ignored for raw); freq is left zero (see nz_tensor_analyze
 *  for the encoder, or set it from the container for the decoder).
 *  @return NZ_OK, NZ_E_UNSUPPORTED (float mode on a non-float dtype) or
 *          NZ_E_INVALID_ARG (k out of range, tile_rows 0). */
int nz_desc_init(nz_tensor_desc *d, nz_dtype dtype, size_t elem_size, const nz_mode *mode, nz_coder coder,
                 uint64_t rows, uint64_t cols, uint32_t tile_rows, nz_error *err);

/** Check a desc read from a file: coder vs mode, frequency table consistent
 *  with the coder and the exponent width. @return NZ_OK or NZ_E_FORMAT. */
int nz_desc_validate(const nz_tensor_desc *d, nz_error *err);

/** @return number of tiles (0 for an empty tensor). */
uint64_t nz_desc_ntiles(const nz_tensor_desc *d);

/** @return rows in tile t (the last one may be short). */
uint64_t nz_desc_tile_nrows(const nz_tensor_desc *d, uint64_t t);

/** @return the exact byte size of tile t's planes after the exponent section
 *  (sm + norm), or of the whole tile for raw tensors. */
uint64_t nz_desc_tile_fixed_bytes(const nz_tensor_desc *d, uint64_t t);

/* ------------------------------------------------------------- encoder */

/** Encoder pass 1: histogram the exponents of the whole tensor src (rows x
 *  cols source elements) under d's mode and set d->freq and d->coder (const
 *  when one exponent value only). counts (optional, [256]) receives the raw
 *  histogram for entropy reports.
 *  @return NZ_OK or NZ_E_RANGE (a NaN under lossy-0). */
int nz_tensor_analyze(nz_tensor_desc *d, const void *src, uint64_t counts[256], nz_error *err);

/** @return an upper bound of the encoded size of tile t. */
size_t nz_tile_bound(const nz_tensor_desc *d, uint64_t t);

/** Encode tile t; src points at the tile's first source element.
 *  @return NZ_OK and *len, or an error. */
int nz_tile_encode(const nz_tensor_desc *d, uint64_t t, const void *src, uint8_t *dst, size_t cap,
                   size_t *len, nz_error *err);

/** Receives encoded tiles from nz_tensor_encode, in order.
 *  @return NZ_OK to go on, or an error code (filled into err) to stop. */
typedef int (*nz_tile_sink)(void *ud, uint64_t t, const uint8_t *tile, size_t len, nz_error *err);

/** Encode every tile of an analysed tensor; src holds the whole tensor's
 *  source elements (rows x cols). Each tile is encoded into a scratch buffer
 *  and handed to sink. @return NZ_OK, or the first error of the encoder or
 *  of sink (prefixed with the tile number). */
int nz_tensor_encode(const nz_tensor_desc *d, const void *src, nz_tile_sink sink, void *ud, nz_error *err);

/* ------------------------------------------------------------- decoder */

/** Decoder context: scratch buffers, zstd context, decode-table cache.
 *  One per thread. */
typedef struct nz_dctx nz_dctx;

/** @return a new decoder context, or NULL when out of memory. */
nz_dctx *nz_dctx_create(void);

/** Free a decoder context. Accepts NULL. */
void nz_dctx_free(nz_dctx *dc);

/** Decode tile t (bytes tile[0..len)) into out[nrows * cols] as fp32.
 *  Raw tensors of dtype other cannot be decoded to fp32.
 *  @return NZ_OK, NZ_E_TRUNCATED/NZ_E_CORRUPT/NZ_E_FORMAT naming the plane,
 *          NZ_E_UNSUPPORTED, NZ_E_NOMEM. */
int nz_tile_decode_f32(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len,
                       float *out, nz_error *err);

/** Decode tile t into its stored dtype's bytes: the source bytes for lossless
 *  and raw (bit-exact), bf16 for mode bf16, the source dtype for lossy
 *  (values rounded to nearest even when the source dtype cannot hold them).
 *  @return as nz_tile_decode_f32. */
int nz_tile_decode_native(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len,
                          void *out, nz_error *err);

/** @return 1 when tiles of d can go through nz_tile_gemv_f32 and the fused
 *  fp32 decode: 8-bit exponents without normalisers, coded esc with the bf16
 *  layout (lossless bf16, mode bf16, lossy-7) or lossy-3, or coded rANS with
 *  the bf16 layout; else 0. */
int nz_tile_gemv_fusable(const nz_tensor_desc *d);

/** Fused decode-and-multiply (nz_esc.h, nz_gemv.h): y[r] = sum_c W[r][c] * x[c] for
 *  the nrows(t) rows of tile t, without writing the fp32 tile. Equal to
 *  decoding with nz_tile_decode_f32 and a dot product, up to the summation
 *  order (esc: the arithmetic of nz_tile_gemm_f32's rows, bit for bit). x
 *  holds cols floats, y nrows(t).
 *  @return as nz_tile_decode_f32, NZ_E_UNSUPPORTED when
 *          !nz_tile_gemv_fusable(d). */
int nz_tile_gemv_f32(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len,
                     const float *x, float *y, nz_error *err);

/** @return 1 when M input rows can multiply tiles of d through
 *  nz_tile_gemm_f32: M = 1 and nz_tile_gemv_fusable, or M >= 2, esc
 *  exponents and nz_tile_gemv_fusable; else 0. */
int nz_tile_gemm_fusable(const nz_tensor_desc *d, size_t M);

/** Fused decode-and-multiply with M input rows (x[M * cols], row-major):
 *  y[m * ldy + r] = sum_c W[r][c] * x[m * cols + c] for the nrows(t) rows of
 *  tile t. Up to 16 rows the tile is decoded once and never written as fp32;
 *  more rows decode it once into scratch (nrows(t) * cols floats; NULL:
 *  decode it again per 16 rows instead). esc tiles are row-invariant: a row
 *  of y is bit-identical whatever M and the other rows, on every kernel
 *  (nz_esc_gemm_bf16); the summation order differs from nz_gemm_f32 on the
 *  decoded tile (agreement to rounding).
 *  @return as nz_tile_gemv_f32; NZ_E_UNSUPPORTED when !nz_tile_gemm_fusable(d, M). */
int nz_tile_gemm_f32(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t len,
                     const float *x, size_t M, float *y, size_t ldy, float *scratch, nz_error *err);

/** @return the dtype nz_tile_decode_native writes. */
nz_dtype nz_desc_native_dtype(const nz_tensor_desc *d);

/** Decode only the exponent section of tile t into exps[n] (benchmarks).
 *  @return as nz_tile_decode_f32. */
int nz_tile_decode_exponents(nz_dctx *dc, const nz_tensor_desc *d, uint64_t t, const uint8_t *tile,
                             size_t len, uint8_t *exps, nz_error *err);

/** AVX2 + F16C join of binary16 elements i = 0.. from 5-bit exponents e and
 *  11-bit sign+mantissa fields sm into out, 8 at a time, up to a group
 *  holding a NaN (internal; nz_join_avx2.c).
 *  @return the elements done (0 when not built or not supported). */
uint64_t nz_join_f16_avx2(const uint8_t *e, const uint32_t *sm, float *out, uint64_t n);

/* ------------------------------------------------------------- float helpers */

/** @return fp32 of a binary16 bit pattern (exact, NaN payload kept). */
float nz_f16_to_f32(uint16_t h);
/** @return binary16 of x, round to nearest even (NaN stays NaN). */
uint16_t nz_f32_to_f16(float x);
/** @return bf16 of x, round to nearest even (NaN stays quiet NaN). */
uint16_t nz_f32_to_bf16(float x);
/** @return fp32 of a bf16 bit pattern. */
float nz_bf16_to_f32(uint16_t b);
/** @return fp32 bits of x rounded to k mantissa bits (lossy-k rule). */
uint32_t nz_round_mantissa(uint32_t bits, int k);

#ifdef __cplusplus
}
#endif
#endif /* NZ_CODEC_H */
