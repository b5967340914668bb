/* Lazy tile matmul: see nz_weight.h. */
#include "nz_weight.h"

#include <cblas.h>
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

int nz_matmul(nz_tile_cache *cache, nz_dctx *dc, float *scratch, const nz_weight *w, const float *x, size_t M,
              float *y, nz_error *err) {
    const nz_tensor *t = w->t;
    const int K = (int)w->k, N = (int)w->n;
    for (uint64_t tile = 0; tile < t->ntiles; tile++) {
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
    }
    return NZ_OK;
}
