/*
 * nz_esc.h — the multi-level escape code for exponent planes (coder "esc").
 *
 * A stateless prefix code shaped for SIMD decoding, ~0.1 bit per symbol
 * above the order-0 bound on trained weights (rANS sits at the bound but
 * decodes one table lookup per symbol). Symbols (exponent bytes) are ranked
 * by their frequency in the tensor's table (nz_tensor_desc.freq; ties by
 * symbol value) and coded by levels of 2-bit fields, field value 3 escaping
 * to the next level:
 *
 *   level  field   codes               entries
 *   1      2 bits  ranks 0-2, 3 = esc  every symbol
 *   2      2 bits  ranks 3-5, 3 = esc  one per level-1 escape, in order
 *   3      2 bits  ranks 6-8, 3 = esc  one per level-2 escape, in order
 *   4      8 bits  the symbol itself   one per level-3 escape, in order
 *
 * (code lengths 2 / 4 / 6 / 14 bits). There is no coder state: a run of a
 * level depends on the runs before it only through its position in the next
 * level, a popcount away. A block holds 128 fields in 32 bytes, byte b the
 * fields b, b+32, b+64 and b+96 at bits 0, 2, 4 and 6, so a 4-bit table
 * lookup of each byte's low and high nibble (one vpshufb per 32 fields)
 * yields 32 consecutive symbols; escapes take the next bytes of the level
 * below, placed by one more shuffle (nz_esc_avx2.c). The rare levels decode
 * first, into a few kilobytes.
 *
 * Exponent section of n symbols, little-endian, no alignment:
 *   u32 n2, n3, n4               entries at levels 2, 3 and 4
 *   level 1: ceil(n  / 128) blocks of 32 bytes
 *   level 2: ceil(n2 / 128) blocks
 *   level 3: ceil(n3 / 128) blocks
 *   level 4: n4 bytes
 * Fields past a level's last entry are 0. nz_esc_open checks the sizes, the
 * padding and that level-4 symbols fit exp_bits; the decoders check that
 * each level's escapes number exactly the next level's entries as they read
 * them, never reading outside the section or their scratch.
 */
#ifndef NZ_ESC_H
#define NZ_ESC_H

#include "nz_common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NZ_ESC_RANKS  9  /* symbols coded below level 4 */
#define NZ_ESC_HDR    12 /* n2, n3, n4 */
#define NZ_ESC_LEVELS 4
#define NZ_ESC_BLOCK  128 /* fields per 32-byte block */

/** Ranked symbols of one tensor (from its frequency table), and the decode
 *  tables: plain symbols, or rotated right by one bit (bit 0 to bit 7, the
 *  form the bf16 kernels join with the sign+mantissa byte). */
typedef struct nz_esc_table {
    uint8_t sym[NZ_ESC_RANKS]; /* symbol of rank r (repeats sym[0] past the symbols present) */
    uint8_t rank[256];         /* rank of each symbol, 255 = not ranked (coded at level 4) */
    uint8_t lut[2][3][4];      /* [rotated][level] field value -> symbol, escape -> 0 */
    uint8_t nib[2][3][2][16];  /* [rotated][level][field 0 or 1 of a nibble] nibble -> symbol */
} nz_esc_table;

/** Rank the symbols of freq[256] (nonzero = present) into t. Deterministic:
 *  encoder and decoder build the same table from the same freq. */
void nz_esc_table_build(const uint32_t freq[256], nz_esc_table *t);

/** @return an upper bound of the section size for n symbols. */
size_t nz_esc_bound(uint64_t n);

/** Code sym[0..n) into dst[0..cap).
 *  @return NZ_OK and *len, or NZ_E_INVALID_ARG (dst too small). */
int nz_esc_encode(const uint8_t *sym, uint64_t n, const nz_esc_table *t, uint8_t *dst, size_t cap,
                  size_t *len, nz_error *err);

/** A checked exponent section. */
typedef struct nz_esc_view {
    uint64_t n[NZ_ESC_LEVELS];        /* entries per level */
    const uint8_t *lv[NZ_ESC_LEVELS]; /* blocks of levels 1-3, bytes of level 4 */
} nz_esc_view;

/** Parse and check the section src[0..len) of n symbols of exp_bits (5 or 8):
 *  sizes, padding, level-4 symbols. The escape counts are checked by the
 *  decoders, as they read (no separate pass).
 *  @return NZ_OK, NZ_E_TRUNCATED (shorter than its counts say), NZ_E_FORMAT
 *          (longer) or NZ_E_CORRUPT (a level with more entries than the one
 *          above, set padding, a level-4 symbol wider than exp_bits). */
int nz_esc_open(const uint8_t *src, size_t len, uint64_t n, int exp_bits, nz_esc_view *v, nz_error *err);

/** @return the scratch bytes the decoders need for v (about n + n2 + n3:
 *  sized so that even a corrupt section reads nothing outside it). */
size_t nz_esc_scratch_bytes(const nz_esc_view *v);

/** Decode levels 4..2 of an opened section into the symbol of every level-1
 *  escape, in order, inside scratch[nz_esc_scratch_bytes(v)] (rotated: the
 *  symbols rotated right by one bit); *esc points at them (readable 32 bytes
 *  past). @return NZ_OK, or NZ_E_CORRUPT when a level's escapes do not
 *  number the next level's entries. */
int nz_esc_decode_escapes(const nz_esc_view *v, const nz_esc_table *t, int rotated, uint8_t *scratch,
                          const uint8_t **esc, nz_error *err);

/** Decode an opened section into out[v->n[0]]; scratch as for
 *  nz_esc_decode_escapes. @return NZ_OK or NZ_E_CORRUPT (escape counts;
 *  out is then unspecified). */
int nz_esc_decode(const nz_esc_view *v, const nz_esc_table *t, uint8_t *scratch, uint8_t *out, nz_error *err);

/** Decode an opened section of 8-bit exponents to fp32 with its
 *  sign+mantissa plane sm: mant 7 (the bf16 layout: byte i = sign << 7 |
 *  7 mantissa bits) or 3 (lossy-3: 4-bit fields sign << 3 | 3 mantissa bits,
 *  packed low nibble first); out[i] gets element i.
 *  @return as nz_esc_decode. */
int nz_esc_decode_bf16(const nz_esc_view *v, const nz_esc_table *t, uint8_t *scratch, const uint8_t *sm,
                       int mant, float *out, nz_error *err);

#define NZ_ESC_GEMM_MAX 16 /* input rows of one pass of the fused multiply */

/** Fused decode-and-multiply of an opened tile of rows x cols (sm, mant as
 *  for nz_esc_decode_bf16) with M >= 1 input rows x[m * cols + c]:
 *  y[m * ldy + r] = sum_c W[r][c] * x[m * cols + c]. Up to NZ_ESC_GEMM_MAX
 *  rows: the tile decoded once, never written. More rows: with wt
 *  (rows * cols floats of scratch, may be NULL), the AVX2 kernels and cols a
 *  multiple of 32, the tile is decoded once into wt in the kernels' vector
 *  order and multiplied by a register-blocked kernel of the same arithmetic;
 *  otherwise in passes of up to NZ_ESC_GEMM_MAX rows, nearly equal, each
 *  decoding the tile again. xp[min(M, NZ_ESC_GEMM_MAX) * cols] is scratch.
 *  Row-invariant: each y element is one fixed sequence of fp32 operations
 *  that depends only on cols, whatever M, the other rows or the kernel
 *  (AVX2 or portable, bit-identical). Two 8-lane accumulators start at +0,
 *  one for the even, one for the odd runs of 32 columns from the row's
 *  start; in a run, lane l (0..7) of four vectors k = 0..3 holds column
 *  16 (l / 4) + 8 (k / 2) + 2 (l % 4) + k % 2 of the run (the order the
 *  AVX2 join produces), and acc = fma(w, x, acc) for k = 0, 1, 2, 3 into
 *  the run's accumulator; after the last whole run v = even + odd,
 *  s = ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)), then
 *  s = fma(w, x, s) over the cols % 32 last columns in order. (Two
 *  accumulators keep the one-row kernel's FMA chain off its critical path.
 *  Against nz_gemm_f32 on the decoded tile: agreement to rounding,
 *  relative ~1e-6 of sum |w x|.)
 *  @return as nz_esc_decode (y unspecified on error). */
int nz_esc_gemm_bf16(const nz_esc_view *v, const nz_esc_table *t, uint8_t *scratch, const uint8_t *sm,
                     int mant, uint64_t rows, uint64_t cols, const float *x, size_t M, float *xp, float *wt,
                     float *y, size_t ldy, nz_error *err);

/* ------------------------------------------------------------- internal */

/** One level, fields [i0, i1) of the blocks at blk: out[i - i0] gets the
 *  table's symbol for field i or, for an escape, the next of esc[] (readable
 *  32 bytes past what it holds). nib/lut: one level of nz_esc_table.
 *  @return escapes consumed. The AVX2 kernel takes whole runs of 32 fields
 *  (i0 and i1 multiples of 32). Per-ISA kernels (not an API). */
uint64_t nz_esc_level_scalar(const uint8_t *blk, uint64_t i0, uint64_t i1, const uint8_t lut[4],
                             const uint8_t *esc, uint8_t *out);
uint64_t nz_esc_level_avx2(const uint8_t *blk, uint64_t i0, uint64_t i1, const uint8_t nib[2][16],
                           const uint8_t *esc, uint8_t *out);
/** Level 1 of the bf16 layout to fp32, fields [0, n32) (n32 a multiple of
 *  32), rotated tables and escapes. */
uint64_t nz_esc_bf16_avx2(const uint8_t *blk, uint64_t n32, const uint8_t nib[2][16], const uint8_t *esc,
                          const uint8_t *sm, int mant, float *out);
/** Fused GEMV over rows x cols (cols a multiple of 32), rotated tables and
 *  escapes; xp is x permuted by nz_esc_permute_x_avx2; each row's arithmetic
 *  is the M-row kernel's (nz_esc_gemm_bf16). @return escapes consumed. */
uint64_t nz_esc_gemv_avx2(const uint8_t *blk, uint64_t rows, uint64_t cols, const uint8_t nib[2][16],
                          const uint8_t *esc, const uint8_t *sm, int mant, const float *xp, float *y);
/** The same for M = 2..NZ_ESC_GEMM_MAX input rows (xp from nz_esc_permute_x_avx2, y[m * ldy + r]). */
uint64_t nz_esc_gemm_avx2(const uint8_t *blk, uint64_t rows, uint64_t cols, const uint8_t nib[2][16],
                          const uint8_t *esc, const uint8_t *sm, int mant, const float *xp, size_t M,
                          float *y, size_t ldy);
/** Level 1 of the bf16 layout to fp32 in the kernels' vector order (run j's
 *  four vectors, as weights32_eo makes them, at out[32 j ..]), fields
 *  [0, n32) (n32 a multiple of 32). @return escapes consumed. */
uint64_t nz_esc_bf16eo_avx2(const uint8_t *blk, uint64_t n32, const uint8_t nib[2][16], const uint8_t *esc,
                            const uint8_t *sm, int mant, float *out);
/** The M-row multiply (any M) on a tile from nz_esc_bf16eo_avx2: wt[rows *
 *  cols], x[M * cols] row-major, xp[3 * cols] scratch; y[m * ldy + r]
 *  bit-identical to nz_esc_gemm_avx2's. */
void nz_esc_gemm_eo_avx2(const float *wt, uint64_t rows, uint64_t cols, const float *x, size_t M, float *xp,
                         float *y, size_t ldy);
/** xp[(c M + m) 32 + i]: run c (32 columns) of input row m, permuted to the
 *  order of the kernels' weight vectors (runs of all rows together: the
 *  M-row kernel reads one contiguous block per run). */
void nz_esc_permute_x_avx2(const float *x, uint64_t cols, size_t M, float *xp);
extern const int nz_esc_avx2_compiled; /* 1 when nz_esc_avx2.c was built with AVX2 */
/** @return 1 when the AVX2 kernels are compiled in and chosen (NZ_SIMD). */
int nz_esc_use_avx2(void);

#ifdef __cplusplus
}
#endif
#endif /* NZ_ESC_H */
