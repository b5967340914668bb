/*
 * nz_weight.h — weight handles and the lazy tile matmul.
 *
 * A weight handle names a 2-D float tensor of a loaded .nzp model: W is
 * [N x K] (N = rows = output features, K = cols = input features, the
 * PyTorch nn.Linear layout). nz_matmul computes y[M x N] = x[M x K] * W^T by
 * walking W's row tiles: each tile (rows r0 .. r0+nr) is fetched from the
 * tile cache (or decoded into the caller's scratch) as fp32 and multiplied
 * with OpenBLAS (sgemv for M = 1, sgemm otherwise) into columns r0 .. r0+nr
 * of y. Raw fp32/bf16 tensors go through the same path, so every weight mode
 * is served (and measured) the same way.
 */
#ifndef NZ_WEIGHT_H
#define NZ_WEIGHT_H

#include "nz_cache.h"
#include "nz_container.h"
#include "nz_pool.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nz_weight {
    const nz_model *model;
    size_t index;       /* tensor index in the model */
    const nz_tensor *t; /* the tensor */
    uint64_t n;         /* output features: rows of W */
    uint64_t k;         /* input features: cols of W */
    uint64_t max_tile;  /* floats in the largest tile: scratch size for nz_matmul */
} nz_weight;

/** Bind w to the tensor called name, which must be a float tensor viewed
 *  as 2-D (a 1-D tensor is 1 x n).
 *  @return NZ_OK, NZ_E_NOT_FOUND (no such tensor) or NZ_E_UNSUPPORTED
 *          (non-float dtype). */
int nz_weight_bind(nz_weight *w, const nz_model *m, const char *name, nz_error *err);

/** y[M x N] = x[M x K] * W^T (row-major, y overwritten). Tiles come from
 *  cache (may be NULL: decode every tile into scratch), decoded with dc;
 *  scratch holds w->max_tile floats.
 *  @return NZ_OK or the first tile error (y is then unspecified). */
int nz_matmul(nz_tile_cache *cache, nz_dctx *dc, float *scratch, const nz_weight *w, const float *x, size_t M,
              float *y, nz_error *err);

/** Per-thread decoder contexts and scratch for nz_matmul_mt. */
typedef struct nz_matmul_ctx nz_matmul_ctx;

/** @return a context for pool (may be NULL: one thread) and cache (may be
 *  NULL), or NULL when out of memory. Scratch grows to the largest tile. */
nz_matmul_ctx *nz_matmul_ctx_create(nz_pool *pool, nz_tile_cache *cache);

/** Free a context. Accepts NULL. */
void nz_matmul_ctx_free(nz_matmul_ctx *c);

/** nz_matmul with W's tiles split across the pool's threads (each tile
 *  writes its own columns of y, so the result is bit-identical to
 *  nz_matmul). One call at a time per context.
 *  @return NZ_OK or the first tile error recorded (y is then unspecified). */
int nz_matmul_mt(nz_matmul_ctx *c, const nz_weight *w, const float *x, size_t M, float *y, nz_error *err);

#ifdef __cplusplus
}
#endif
#endif /* NZ_WEIGHT_H */
