/*
 * nz_weight.h — weight handles and the lazy tile matmul.
 *
 * A weight handle names a 2-D float tensor of a loaded .nzp model: W is
 * [N x K] (N = rows = output features, K = cols = input features, the
 * PyTorch nn.Linear layout). nz_matmul computes y[M x N] = x[M x K] * W^T by
 * walking W's row tiles, each (rows r0 .. r0+nr) into columns r0 .. r0+nr of
 * y:
 *   - with a tile cache of budget > 0: the tile comes from the cache (or is
 *     decoded into the caller's scratch when it does not fit) as fp32 and is
 *     multiplied by nz_gemm_f32 (nz_gemm.h);
 *   - without a cache, or with a budget-0 cache (which is then bypassed: its
 *     counters do not move): the tile's bytes are checked with
 *     nz_model_tile_once (XXH3 on the tile's first use per loaded model, see
 *     nz_container.h; a damaged tile is refused on every call), then
 *       an esc tile in the bf16 layout (lossless bf16, mode bf16) or lossy-3:
 *         the fused decode-and-multiply (nz_tile_gemm_f32): up to 16 rows of
 *         x, no fp32 tile written; more, the tile decoded once into scratch
 *         in the fused kernels' order and multiplied with their arithmetic;
 *       raw fp32 tiles: nz_gemm_f32 directly on the mapped tile bytes;
 *       otherwise (rANS and zstd coders, fp16/fp32 sources, other lossy
 *         widths, raw bf16/fp16) decoded into scratch, then nz_gemm_f32.
 *
 * Batch invariance: row m of y is bit-identical whatever M is and whatever
 * the other rows of x hold (and on 1 or many threads), in every weight mode
 * and cache setting, because both kernels compute each element by one fixed
 * sequence that depends only on K (nz_gemm.h, nz_esc.h): a request gets the
 * same numbers alone or batched. The fused kernel sums in another order than
 * nz_gemm_f32, so cached and uncached esc results differ by rounding
 * (relative ~1e-6 of sum |x||w|); everything else is bit-identical whatever
 * the cache.
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

/** Turn the fused path off (0) or on (1, the default) for the whole
 *  process (benchmarks and tests compare it with decode + nz_gemm_f32).
 *  @return the previous setting. */
int nz_matmul_set_fused(int on);

/** Process-wide counters of the tiles decoded outside the tile cache (cache
 *  budget 0 or no cache: decode-every-use, fused GEMV included) and the
 *  time spent on them; tiles decoded by the cache are in nz_cache_stats.
 *  Raw fp32 tiles read in place are not counted. Either pointer may be NULL. */
void nz_weight_uncached_stats(uint64_t *tiles, uint64_t *ns);

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

/** Cancel (on = 1) or re-arm (on = 0) the work of c from any thread: while
 *  cancelled, every nz_matmul_mt and nz_matmul_ctx_tile call on c fails with
 *  NZ_E_CANCELLED, a call in progress at its next tile, so a forward pass
 *  stops within about one tile's work of the cancel (a server's deadline,
 *  a client gone, shutdown). Async-safe: one atomic store. Accepts NULL. */
void nz_matmul_ctx_cancel(nz_matmul_ctx *c, int on);

/** Body of nz_matmul_ctx_run: task in [0, ntasks), work this thread's floats. */
typedef void (*nz_ctx_task_fn)(void *ctx, uint64_t task, float *work);

/** Run fn over tasks [0, ntasks) on c's threads (as nz_matmul_mt's tiles),
 *  each call given its thread's work of at least work_floats floats (kept
 *  with the context, counted as scratch). Cancellation (nz_matmul_ctx_cancel)
 *  is checked before each task: the tasks not yet started are skipped, so a
 *  cancelled loop (attention over a long batch) stops within one task. One
 *  call at a time per context.
 *  @return NZ_OK; NZ_E_CANCELLED when c was cancelled before every task ran
 *  (what the tasks write is then incomplete); NZ_E_NOMEM. */
int nz_matmul_ctx_run(nz_matmul_ctx *c, uint64_t ntasks, size_t work_floats, nz_ctx_task_fn fn, void *ctx,
                      nz_error *err);

/** Fetch tile t of w as fp32 on the calling thread, through the context's
 *  cache (or its first thread's scratch when not cached): for row lookups
 *  such as embeddings. Release with nz_matmul_ctx_release before the next
 *  call on this context.
 *  @return NZ_OK and *ref, or the decode error. */
int nz_matmul_ctx_tile(nz_matmul_ctx *c, const nz_weight *w, uint64_t t, nz_cache_ref *ref, nz_error *err);

/** Release a ref from nz_matmul_ctx_tile. */
void nz_matmul_ctx_release(nz_matmul_ctx *c, nz_cache_ref *ref);

#ifdef __cplusplus
}
#endif
#endif /* NZ_WEIGHT_H */
