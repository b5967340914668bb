/*
 * nz_gemv.h — fused decode-and-multiply GEMV (M = 1) on rANS bf16 tiles.
 *
 * y[r] = sum_c W[r][c] * x[c] for one tile of rows x cols weights stored in
 * the bf16 layout of nz_codec.h (8-bit exponents in an interleaved rANS
 * stream, a raw sign+mantissa byte per weight): the exponents are decoded
 * and joined with their sign+mantissa byte in vector registers and
 * multiplied into the dot products directly; the fp32 tile is never
 * written. Kernels: portable C, AVX2 and AVX-512 (separate files compiled
 * with -mavx2 / -mavx512f -mavx512bw -mavx512vl), picked at run time with
 * the rANS decoder's choice (nz_rans_set_kernel, NZ_SIMD=scalar|avx2|avx512).
 *
 * The stream is checked as nz_rans_decode checks it (truncation, unread
 * bytes, final states), so a corrupt tile fails with NZ_E_TRUNCATED or
 * NZ_E_CORRUPT; y is then unspecified. The summation order differs from
 * nz_gemm_f32 on the decoded tile (results agree to rounding: relative
 * ~1e-6 of sum |x||w| per row), which is why nz_matmul decodes rANS tiles
 * instead (a row's bits must not depend on M; this kernel is M = 1 only):
 * it serves nz_tile_gemv_f32 callers (benchmarks, the fuzz targets).
 */
#ifndef NZ_GEMV_H
#define NZ_GEMV_H

#include "nz_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Fused GEMV of a bf16-layout rANS tile: src[0..len) is the exponent stream
 *  coded with lanes (32 or 64) states, dtab its nz_rans_build_dtab table,
 *  sm[rows * cols] the sign+mantissa bytes (bit 7 sign, bits 0-6 mantissa),
 *  x[cols] the input; writes y[0..rows).
 *  @return NZ_OK, NZ_E_TRUNCATED, NZ_E_CORRUPT or NZ_E_INVALID_ARG (bad lane
 *          count). */
int nz_gemv_rans_bf16(const uint8_t *src, size_t len, int lanes, const uint32_t *dtab, const uint8_t *sm,
                      uint64_t rows, uint64_t cols, const float *x, float *y, nz_error *err);

/** One fused GEMV: the arguments of nz_gemv_rans_bf16 (used internally). */
typedef struct nz_gemv_job {
    const uint8_t *src; /* exponent stream */
    size_t len;         /* its bytes */
    int lanes;          /* 32 or 64 */
    const uint32_t *dtab;
    const uint8_t *sm; /* [rows * cols] */
    uint64_t rows, cols;
    const float *x; /* [cols] */
    float *y;       /* [rows] */
} nz_gemv_job;

/* ------------------------------------------------------------- internal */

/** Kernel state shared by the per-ISA files (not an API). */
typedef struct nz_gemv_run {
    uint32_t st[64] __attribute__((aligned(64))); /* rANS states */
    const uint8_t *p, *end;                       /* stream position and end */
    const uint32_t *dtab;                         /* decode table */
    const uint8_t *sm;                            /* sign+mantissa plane (element 0) */
    const float *x;                               /* input [cols] */
    float *y;                                     /* output [rows] */
    uint64_t cols, n;                             /* row length, rows * cols */
    uint64_t i, row, col;                         /* next element, its row and column */
    float part;                                   /* partial dot product of row `row` */
    int lanes;                                    /* 32 or 64 */
} nz_gemv_run;

/** Advance r over whole groups of lanes symbols while a group's worth of
 *  renormalisation words is left (r->i must be a multiple of r->lanes). */
void nz_gemv_run_avx2(nz_gemv_run *r);
void nz_gemv_run_avx512(nz_gemv_run *r);

#ifdef __cplusplus
}
#endif
#endif /* NZ_GEMV_H */
