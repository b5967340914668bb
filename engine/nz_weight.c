/* Lazy tile matmul: see nz_weight.h. */
#include "nz_weight.h"

#include "nz_alloc.h"

#include <cblas.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

int nz_weight_bind(nz_weight *w, const nz_model *m, const char *name, nz_error *err) {
    memset(w, 0, sizeof *w);
    long i = nz_model_find(m, name);
    if (i < 0) return nz_fail(err, NZ_E_NOT_FOUND, "no tensor '%s' in the model", name);
    const nz_tensor *t = nz_model_tensor(m, (size_t)i);
    if (t->desc.dtype == NZ_DT_OTHER)
        return nz_fail(err, NZ_E_UNSUPPORTED, "tensor '%s' (%s) is not a float weight", name, t->st_dtype);
    if (t->desc.rows > INT32_MAX || t->desc.cols > INT32_MAX)
        return nz_fail(err, NZ_E_UNSUPPORTED, "tensor '%s' is too large for BLAS (int dimensions)", name);
    w->model = m;
    w->index = (size_t)i;
    w->t = t;
    w->n = t->desc.rows;
    w->k = t->desc.cols;
    w->max_tile = t->ntiles ? nz_desc_tile_nrows(&t->desc, 0) * t->desc.cols : 0;
    return NZ_OK;
}

/* One tile of y = x W^T: fetch tile (cache or scratch), multiply into its
 * columns of y. */
static int matmul_tile(nz_tile_cache *cache, nz_dctx *dc, float *scratch, const nz_weight *w, uint64_t tile,
                       const float *x, size_t M, float *y, nz_error *err) {
    const nz_tensor *t = w->t;
    const int K = (int)w->k, N = (int)w->n;
    const int r0 = (int)(tile * t->desc.tile_rows);
    const int nr = (int)nz_desc_tile_nrows(&t->desc, tile);
    nz_cache_ref ref = {scratch, NULL};
    int rc = cache ? nz_cache_get(cache, w->model, w->index, tile, dc, scratch, &ref, err)
                   : nz_model_decode_f32(w->model, dc, w->index, tile, scratch, err);
    if (rc) return rc;
    /* tile: nr x K row-major; y[:, r0:r0+nr] = x * tile^T */
    if (M == 1)
        cblas_sgemv(CblasRowMajor, CblasNoTrans, nr, K, 1.0f, ref.data, K, x, 1, 0.0f, y + r0, 1);
    else
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)M, nr, K, 1.0f, x, K, ref.data, K, 0.0f,
                    y + r0, N);
    if (cache) nz_cache_release(cache, &ref);
    return NZ_OK;
}

int nz_matmul(nz_tile_cache *cache, nz_dctx *dc, float *scratch, const nz_weight *w, const float *x, size_t M,
              float *y, nz_error *err) {
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
    _Atomic int failed;
};

nz_matmul_ctx *nz_matmul_ctx_create(nz_pool *pool, nz_tile_cache *cache) {
    nz_matmul_ctx *c = nz_calloc(1, sizeof *c, NZ_MEM_OTHER);
    if (!c) return NULL;
    c->pool = pool;
    c->cache = cache;
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
    }
    nz_free(c->t);
    nz_free(c);
}

static void tile_task(void *ctx, uint64_t tile, int thread) {
    nz_matmul_ctx *c = ctx;
    thread_res *r = &c->t[thread];
    if (atomic_load(&c->failed)) return; /* stop early after an error */
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
    int rc = matmul_tile(c->cache, r->dc, r->scratch, c->w, tile, c->x, c->M, c->y, &e);
    if (rc && !r->rc) {
        r->rc = rc;
        r->err = e;
        atomic_store(&c->failed, 1);
    }
}

int nz_matmul_mt(nz_matmul_ctx *c, const nz_weight *w, const float *x, size_t M, float *y, nz_error *err) {
    c->w = w;
    c->x = x;
    c->M = M;
    c->y = y;
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
