/* Lazy tile matmul: see nz_weight.h. */
#include "nz_weight.h"
#include "nz_guard.h"

#include "nz_alloc.h"
#include "nz_gemm.h"

#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static atomic_uint_fast64_t g_uncached_tiles, g_uncached_ns;

/* Count one tile decoded outside the cache, started at t0. */
static void count_uncached(uint64_t t0) {
    atomic_fetch_add_explicit(&g_uncached_tiles, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&g_uncached_ns, nz_now_ns() - t0, memory_order_relaxed);
}

void nz_weight_uncached_stats(uint64_t *tiles, uint64_t *ns) {
    if (tiles) *tiles = atomic_load_explicit(&g_uncached_tiles, memory_order_relaxed);
    if (ns) *ns = atomic_load_explicit(&g_uncached_ns, memory_order_relaxed);
}

int nz_weight_bind(nz_weight *w, const nz_model *m, const char *name, nz_error *err) {
    memset(w, 0, sizeof *w);
    long i = nz_model_find(m, name);
    if (i < 0) return nz_fail(err, NZ_E_NOT_FOUND, "no tensor '%s' in the model", name);
    const nz_tensor *t = nz_model_tensor(m, (size_t)i);
    if (t->desc.dtype == NZ_DT_OTHER)
        return nz_fail(err, NZ_E_UNSUPPORTED, "tensor '%s' (%s) is not a float weight", name, t->st_dtype);
    if (t->desc.rows > INT32_MAX || t->desc.cols > INT32_MAX)
        return nz_fail(err, NZ_E_UNSUPPORTED, "tensor '%s' is too large (int dimensions)", name);
    w->model = m;
    w->index = (size_t)i;
    w->t = t;
    w->n = t->desc.rows;
    w->k = t->desc.cols;
    w->max_tile = t->ntiles ? nz_desc_tile_nrows(&t->desc, 0) * t->desc.cols : 0;
    return NZ_OK;
}

static atomic_int g_fused = 1;

int nz_matmul_set_fused(int on) { return atomic_exchange(&g_fused, on ? 1 : 0); }

/* Whether tiles go through the fused multiply: no cache, an esc tile in the
 * bf16 or lossy-3 layout, any M. rANS tiles are decoded instead: their fused
 * kernel is M = 1 only, and a row's arithmetic must not depend on M
 * (decoding costs rANS about what fusing saves). */
static int fused(const nz_tile_cache *cache, const nz_weight *w, size_t M) {
    return !cache && w->t->desc.coder == NZ_CODER_ESC && nz_tile_gemm_fusable(&w->t->desc, M) &&
           atomic_load_explicit(&g_fused, memory_order_relaxed);
}

/* y[:, r0:r0+nr] = x * tile^T for a tile of nr x K fp32 weights (row-major):
 * the row-invariant kernel (nz_gemm.h), never BLAS, whose sgemm rounds a row
 * differently with the batch around it. */
static void tile_gemm(const float *wt, int nr, int K, int N, const float *x, size_t M, float *y) {
    nz_gemm_f32(M, (size_t)nr, (size_t)K, x, (size_t)K, wt, (size_t)K, y, (size_t)N);
}

static int host_le(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

/* The uncached tile at p[0..len) (already checked) times x, into y's columns of the tile. */
static int tile_uncached(nz_dctx *dc, float *scratch, const nz_weight *w, uint64_t tile, const uint8_t *p,
                         size_t len, const float *x, size_t M, float *y, nz_error *err) {
    const nz_tensor_desc *d = &w->t->desc;
    const int K = (int)w->k, N = (int)w->n;
    const int r0 = (int)(tile * d->tile_rows);
    const int nr = (int)nz_desc_tile_nrows(d, tile);
    int rc = NZ_OK;
    uint64_t t0 = nz_now_ns();
    if (fused(NULL, w, M)) {
        rc = nz_tile_gemm_f32(dc, d, tile, p, len, x, M, y + r0, (size_t)N, scratch, err);
        count_uncached(t0);
    } else if (d->coder == NZ_CODER_NONE && d->dtype == NZ_DT_F32 && host_le() && (uintptr_t)p % 4 == 0 &&
               len == (size_t)nr * (size_t)K * 4) {
        tile_gemm((const float *)(const void *)p, nr, K, N, x, M, y + r0);
    } else {
        rc = nz_tile_decode_f32(dc, d, tile, p, len, scratch, err);
        count_uncached(t0);
        if (!rc) tile_gemm(scratch, nr, K, N, x, M, y + r0);
    }
    return rc;
}

/* One tile of y = x W^T, writing columns r0 .. r0+nr of y. With a cache
 * (budget > 0) the tile comes from nz_cache_get. Without: the tile's bytes
 * come from nz_model_tile_once (checksum on first use), then
 *   an esc tile in the bf16 or lossy-3 layout: fused decode-and-multiply
 *     (nz_tile_gemm_f32, any M);
 *   raw fp32 (little-endian host): nz_gemm_f32 straight on the mapped tile
 *     bytes (tiles are 64-byte aligned in the file);
 *   anything else: decode into scratch, then nz_gemm_f32. */
static int matmul_tile(nz_tile_cache *cache, nz_dctx *dc, float *scratch, const nz_weight *w, uint64_t tile,
                       const float *x, size_t M, float *y, nz_error *err) {
    const nz_tensor *t = w->t;
    const nz_tensor_desc *d = &t->desc;
    const int K = (int)w->k, N = (int)w->n;
    const int r0 = (int)(tile * d->tile_rows);
    const int nr = (int)nz_desc_tile_nrows(d, tile);
    if (cache) {
        nz_cache_ref ref = {scratch, NULL};
        int rc = nz_cache_get(cache, w->model, w->index, tile, dc, scratch, &ref, err);
        if (rc) return rc;
        tile_gemm(ref.data, nr, K, N, x, M, y + r0);
        nz_cache_release(cache, &ref);
        return NZ_OK;
    }
    const uint8_t *p;
    size_t len;
    int rc = nz_model_tile_once(w->model, w->index, tile, &p, &len, err);
    if (rc) return rc;
    /* the tile's bytes are read from the mapped file: a file changed under us fails here (nz_guard.h) */
    NZ_MAPPED(rc, err, rc = tile_uncached(dc, scratch, w, tile, p, len, x, M, y, err));
    if (rc) nz_fail_prefix(err, "tensor '%s' tile %llu", t->name, (unsigned long long)tile);
    return rc;
}

/* A cache with budget 0 holds nothing: bypass it (decode-every-use path). */
static nz_tile_cache *effective_cache(nz_tile_cache *cache) {
    if (!cache) return NULL;
    nz_cache_stats st;
    nz_cache_get_stats(cache, &st);
    return st.budget ? cache : NULL;
}

int nz_matmul(nz_tile_cache *cache, nz_dctx *dc, float *scratch, const nz_weight *w, const float *x, size_t M,
              float *y, nz_error *err) {
    cache = effective_cache(cache);
    for (uint64_t tile = 0; tile < w->t->ntiles; tile++) {
        int rc = matmul_tile(cache, dc, scratch, w, tile, x, M, y, err);
        if (rc) return rc;
    }
    return NZ_OK;
}

/* ------------------------------------------------------------- threads */

typedef struct {
    nz_dctx *dc;
    float *scratch; /* [cap] */
    uint64_t cap;
    float *work; /* [work_cap] nz_matmul_ctx_run's per-thread floats */
    size_t work_cap;
    nz_error err; /* this thread's first error */
    int rc;
} thread_res;

struct nz_matmul_ctx {
    nz_pool *pool;
    nz_tile_cache *cache;
    int nthreads;
    thread_res *t; /* [nthreads] */
    /* the call in progress */
    const nz_weight *w;
    const float *x;
    size_t M;
    float *y;
    nz_tile_cache *cache_now; /* cache, or NULL while its budget is 0 */
    _Atomic int failed;
    _Atomic int cancelled; /* nz_matmul_ctx_cancel: every tile from now on fails with NZ_E_CANCELLED */
    int tile_delay_us;     /* test hook (environment NZ_DEBUG_TILE_DELAY_US): sleep before each tile */
};

void nz_matmul_ctx_cancel(nz_matmul_ctx *c, int on) {
    if (c) atomic_store(&c->cancelled, on != 0);
}

/* NZ_E_CANCELLED into e when c was cancelled. @return 1 cancelled, else 0. */
static int cancelled(nz_matmul_ctx *c, nz_error *e) {
    if (!atomic_load_explicit(&c->cancelled, memory_order_relaxed)) return 0;
    nz_fail(e, NZ_E_CANCELLED, "cancelled");
    return 1;
}

nz_matmul_ctx *nz_matmul_ctx_create(nz_pool *pool, nz_tile_cache *cache) {
    nz_matmul_ctx *c = nz_calloc(1, sizeof *c, NZ_MEM_OTHER);
    if (!c) return NULL;
    c->pool = pool;
    c->cache = cache;
    const char *d = getenv("NZ_DEBUG_TILE_DELAY_US"); /* makes a forward pass slow, for cancellation tests */
    c->tile_delay_us = d && atoi(d) > 0 ? atoi(d) : 0;
    c->nthreads = nz_pool_size(pool);
    c->t = nz_calloc((size_t)c->nthreads, sizeof *c->t, NZ_MEM_OTHER);
    if (!c->t) {
        nz_free(c);
        return NULL;
    }
    for (int i = 0; i < c->nthreads; i++)
        if (!(c->t[i].dc = nz_dctx_create())) {
            nz_matmul_ctx_free(c);
            return NULL;
        }
    return c;
}

void nz_matmul_ctx_free(nz_matmul_ctx *c) {
    if (!c) return;
    for (int i = 0; c->t && i < c->nthreads; i++) {
        nz_dctx_free(c->t[i].dc);
        nz_free(c->t[i].scratch);
        nz_free(c->t[i].work);
    }
    nz_free(c->t);
    nz_free(c);
}

static void tile_task(void *ctx, uint64_t tile, int thread) {
    nz_matmul_ctx *c = ctx;
    thread_res *r = &c->t[thread];
    if (atomic_load(&c->failed)) return; /* stop early after an error */
    if (c->tile_delay_us) usleep((useconds_t)c->tile_delay_us);
    if (cancelled(c, &r->err)) {
        r->rc = NZ_E_CANCELLED;
        atomic_store(&c->failed, 1);
        return;
    }
    if (r->cap < c->w->max_tile) {
        nz_free(r->scratch);
        r->scratch = nz_malloc(c->w->max_tile * sizeof(float), NZ_MEM_SCRATCH);
        r->cap = r->scratch ? c->w->max_tile : 0;
        if (!r->scratch) {
            r->rc = nz_fail(&r->err, NZ_E_NOMEM, "out of memory for matmul scratch");
            atomic_store(&c->failed, 1);
            return;
        }
    }
    nz_error e;
    int rc = matmul_tile(c->cache_now, r->dc, r->scratch, c->w, tile, c->x, c->M, c->y, &e);
    if (rc && !r->rc) {
        r->rc = rc;
        r->err = e;
        atomic_store(&c->failed, 1);
    }
}

int nz_matmul_mt(nz_matmul_ctx *c, const nz_weight *w, const float *x, size_t M, float *y, nz_error *err) {
    if (cancelled(c, err)) return NZ_E_CANCELLED;
    c->w = w;
    c->x = x;
    c->M = M;
    c->y = y;
    c->cache_now = effective_cache(c->cache);
    atomic_store(&c->failed, 0);
    for (int i = 0; i < c->nthreads; i++) c->t[i].rc = NZ_OK;
    nz_pool_run(c->pool, w->t->ntiles, tile_task, c);
    for (int i = 0; i < c->nthreads; i++)
        if (c->t[i].rc) {
            if (err) *err = c->t[i].err;
            return c->t[i].rc;
        }
    return NZ_OK;
}

/* nz_matmul_ctx_run's job, read by its tasks */
typedef struct {
    nz_matmul_ctx *c;
    nz_ctx_task_fn fn;
    void *ctx;
    _Atomic int stopped;
} run_job;

static void run_task(void *arg, uint64_t task, int thread) {
    run_job *j = arg;
    if (atomic_load_explicit(&j->stopped, memory_order_relaxed)) return;
    if (atomic_load_explicit(&j->c->cancelled, memory_order_relaxed)) {
        atomic_store(&j->stopped, 1);
        return;
    }
    j->fn(j->ctx, task, j->c->t[thread].work);
}

int nz_matmul_ctx_run(nz_matmul_ctx *c, uint64_t ntasks, size_t work_floats, nz_ctx_task_fn fn, void *ctx,
                      nz_error *err) {
    if (cancelled(c, err)) return NZ_E_CANCELLED;
    for (int i = 0; i < c->nthreads; i++) {
        thread_res *r = &c->t[i];
        if (r->work_cap >= work_floats && r->work) continue;
        nz_free(r->work);
        r->work = nz_malloc((work_floats ? work_floats : 1) * sizeof(float), NZ_MEM_SCRATCH);
        r->work_cap = r->work ? work_floats : 0;
        if (!r->work) return nz_fail(err, NZ_E_NOMEM, "out of memory for %zu floats of work", work_floats);
    }
    run_job j = {.c = c, .fn = fn, .ctx = ctx};
    nz_pool_run(c->pool, ntasks, run_task, &j);
    if (atomic_load(&j.stopped)) return nz_fail(err, NZ_E_CANCELLED, "cancelled");
    return NZ_OK;
}

int nz_matmul_ctx_tile(nz_matmul_ctx *c, const nz_weight *w, uint64_t t, nz_cache_ref *ref, nz_error *err) {
    thread_res *r = &c->t[0];
    ref->entry = NULL;
    if (cancelled(c, err)) return NZ_E_CANCELLED;
    if (t >= w->t->ntiles)
        return nz_fail(err, NZ_E_RANGE, "tensor '%s': tile %llu of %llu", w->t->name, (unsigned long long)t,
                       (unsigned long long)w->t->ntiles);
    if (r->cap < w->max_tile) {
        nz_free(r->scratch);
        r->scratch = nz_malloc(w->max_tile * sizeof(float), NZ_MEM_SCRATCH);
        r->cap = r->scratch ? w->max_tile : 0;
        if (!r->scratch) return nz_fail(err, NZ_E_NOMEM, "out of memory for tile scratch");
    }
    ref->data = r->scratch;
    ref->entry = NULL;
    if (c->cache) return nz_cache_get(c->cache, w->model, w->index, t, r->dc, r->scratch, ref, err);
    uint64_t t0 = nz_now_ns();
    int rc = nz_model_decode_f32(w->model, r->dc, w->index, t, r->scratch, err);
    count_uncached(t0);
    return rc;
}

void nz_matmul_ctx_release(nz_matmul_ctx *c, nz_cache_ref *ref) {
    if (c->cache) nz_cache_release(c->cache, ref);
    ref->entry = NULL;
}
