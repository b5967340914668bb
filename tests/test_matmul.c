/* Lazy tile matmul: results against a double-precision reference on the
 * same (decoded) weights, in every weight mode and cache setting; the
 * row-invariant kernel (nz_gemm.h) and batch invariance of every path. */
#include "test_model.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_codec.h"
#include "nz_container.h"
#include "nz_gemm.h"
#include "nz_layer.h"
#include "nz_pool.h"
#include "nz_rans.h"
#include "nz_weight.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

#define N         300 /* output features (rows of W) */
#define K         200 /* input features */
#define TILE_ROWS 64

static float g_w32[N * K];
static uint8_t *g_img;
static size_t g_len;
static nz_model *g_m;

static const char *const NAMES[] = {"raw.f32", "lossless.bf16", "lossless.f16", "lossy3.f32", "bf16mode.f32"};
#define NW (sizeof NAMES / sizeof *NAMES)

static int setup(void **state) {
    (void)state;
    static uint16_t bf[N * K], h[N * K];
    uint64_t s = 11;
    for (size_t i = 0; i < N * K; i++) {
        g_w32[i] = (float)(0.02 * tu_gauss(&s));
        bf[i] = nz_f32_to_bf16(g_w32[i]);
        h[i] = nz_f32_to_f16(g_w32[i]);
    }
    char path[] = "/tmp/nz_test_matmul_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    nz_writer *w;
    nz_error e = {0};
    assert_int_equal(nz_writer_create(path, &w, &e), NZ_OK);
    tm_add_tensor(w, NAMES[0], "F32", NZ_DT_F32, "raw", NZ_CODER_RANS, N, K, TILE_ROWS, 2, g_w32);
    tm_add_tensor(w, NAMES[1], "BF16", NZ_DT_BF16, "lossless", NZ_CODER_RANS, N, K, TILE_ROWS, 2, bf);
    tm_add_tensor(w, NAMES[2], "F16", NZ_DT_F16, "lossless", NZ_CODER_RANS, N, K, TILE_ROWS, 2, h);
    tm_add_tensor(w, NAMES[3], "F32", NZ_DT_F32, "lossy-3", NZ_CODER_RANS, N, K, TILE_ROWS, 2, g_w32);
    tm_add_tensor(w, NAMES[4], "F32", NZ_DT_F32, "bf16", NZ_CODER_RANS, N, K, TILE_ROWS, 2, g_w32);
    assert_int_equal(nz_writer_finish(w, &e), NZ_OK);
    g_img = tm_read_file(path, &g_len);
    unlink(path);
    assert_int_equal(nz_model_load_buffer(g_img, g_len, &g_m, &e), NZ_OK);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    nz_model_free(g_m);
    free(g_img);
    return 0;
}

/* The weights as the engine serves them (decoded tiles), in double. */
static double *decoded_weights(const nz_weight *w) {
    double *W = xmalloc(N * K * sizeof *W);
    float *tile = xmalloc(w->max_tile * sizeof *tile);
    nz_dctx *dc = nz_dctx_create();
    nz_error e = {0};
    for (uint64_t t = 0; t < w->t->ntiles; t++) {
        assert_int_equal(nz_model_decode_f32(g_m, dc, w->index, t, tile, &e), NZ_OK);
        for (uint64_t i = 0; i < nz_desc_tile_nrows(&w->t->desc, t) * K; i++)
            W[t * TILE_ROWS * K + i] = tile[i];
    }
    nz_dctx_free(dc);
    free(tile);
    return W;
}

/* Fused-GEMV tolerance: y and y0 (M = 1) agree to 1e-5 of sum_k |x_k W_ck|
 * per output (the two sum in different orders; fp32 rounding is ~1e-7 per
 * term). */
static void assert_close_m1(const float *y, const float *y0, const float *x, const float *W, size_t n,
                            size_t k, const char *what) {
    for (size_t c = 0; c < n; c++) {
        double mag = 0;
        for (size_t i = 0; i < k; i++) mag += fabs((double)x[i] * W[c * k + i]);
        if (!(fabs((double)y[c] - y0[c]) <= 1e-5 * mag + 1e-30))
            fail_msg("%s: output %zu: %.9g vs %.9g (sum|xw| %.3g)", what, c, y[c], y0[c], mag);
    }
}

/* The decoded weights (fp32) of w, rows x cols. */
static float *decoded_f32(const nz_model *m, const nz_weight *w) {
    float *W = xmalloc((w->n * w->k + 1) * sizeof *W);
    nz_dctx *dc = nz_dctx_create();
    nz_error e = {0};
    for (uint64_t t = 0; t < w->t->ntiles; t++)
        assert_int_equal(nz_model_decode_f32(m, dc, w->index, t, W + t * w->t->desc.tile_rows * w->k, &e),
                         NZ_OK);
    nz_dctx_free(dc);
    return W;
}

/* y = x W^T for every weight mode, M in {1, 3, 64}, caches off / 0 / partial
 * / full: max |y - reference| <= 1e-4 (fp32 accumulation over K = 200 terms
 * of size ~0.02); all cache settings give bit-identical results (these
 * tensors are rANS-coded: decoded and multiplied by nz_gemm_f32 whatever the
 * cache; esc tiles, fused when uncached, are test_matmul_batch_invariant's). */
static void test_matmul_all_modes(void **state) {
    (void)state;
    static const size_t Ms[] = {1, 3, 64};
    const size_t budgets[] = {0, 3 * TILE_ROWS * K * sizeof(float), (size_t)64 << 20};
    nz_dctx *dc = nz_dctx_create();
    nz_error e = {0};
    uint64_t s = 5;
    for (size_t wi = 0; wi < NW; wi++) {
        nz_weight w;
        assert_int_equal(nz_weight_bind(&w, g_m, NAMES[wi], &e), NZ_OK);
        assert_int_equal(w.n, N);
        assert_int_equal(w.k, K);
        double *W = decoded_weights(&w);
        float *scratch = xmalloc(w.max_tile * sizeof(float));
        for (size_t mi = 0; mi < sizeof Ms / sizeof *Ms; mi++) {
            size_t M = Ms[mi];
            float *x = xmalloc(M * K * sizeof(float)), *y0 = xmalloc(M * N * sizeof(float)),
                  *y = xmalloc(M * N * sizeof(float));
            for (size_t i = 0; i < M * K; i++) x[i] = (float)tu_gauss(&s);
            assert_int_equal(nz_matmul(NULL, dc, scratch, &w, x, M, y0, &e), NZ_OK);
            double maxerr = 0;
            for (size_t r = 0; r < M; r++)
                for (size_t c = 0; c < N; c++) {
                    double ref = 0;
                    for (size_t k = 0; k < K; k++) ref += (double)x[r * K + k] * W[c * K + k];
                    maxerr = fmax(maxerr, fabs(ref - y0[r * N + c]));
                }
            if (maxerr > 1e-4) fail_msg("%s M=%zu: max abs error %.3g > 1e-4", NAMES[wi], M, maxerr);
            for (size_t bi = 0; bi < 3; bi++) {
                nz_tile_cache *c = nz_cache_create(budgets[bi]);
                for (int pass = 0; pass < 2; pass++) {
                    memset(y, 0xff, M * N * sizeof(float));
                    assert_int_equal(nz_matmul(c, dc, scratch, &w, x, M, y, &e), NZ_OK);
                    if (memcmp(y, y0, M * N * sizeof(float)))
                        fail_msg("%s M=%zu budget %zu pass %d differs from the uncached result", NAMES[wi], M,
                                 budgets[bi], pass);
                }
                nz_cache_stats st;
                nz_cache_get_stats(c, &st);
                assert_true(st.bytes <= budgets[bi]);
                if (bi == 2) assert_int_equal(st.tiles_decoded, w.t->ntiles); /* full cache: once each */
                if (bi == 0) assert_int_equal(st.entries, 0);
                nz_cache_free(c);
            }
            free(x);
            free(y0);
            free(y);
        }
        free(scratch);
        free(W);
    }
    nz_dctx_free(dc);
}

/* A damaged tile makes the matmul fail with the tensor and tile named; the
 * cache keeps serving the other weights. */
static void test_matmul_damaged_tile(void **state) {
    (void)state;
    uint8_t *img = xmalloc(g_len);
    memcpy(img, g_img, g_len);
    nz_model *m;
    nz_error e = {0};
    assert_int_equal(nz_model_load_buffer(img, g_len, &m, &e), NZ_OK);
    nz_weight w, ok;
    assert_int_equal(nz_weight_bind(&w, m, "lossless.bf16", &e), NZ_OK);
    assert_int_equal(nz_weight_bind(&ok, m, "raw.f32", &e), NZ_OK);
    uint64_t doff = 0;
    for (int i = 7; i >= 0; i--) doff = doff << 8 | img[24 + i];
    img[doff + w.t->tiles[2].offset + 40] ^= 0x20;
    nz_dctx *dc = nz_dctx_create();
    nz_tile_cache *c = nz_cache_create((size_t)16 << 20);
    float *scratch = xmalloc((w.max_tile > ok.max_tile ? w.max_tile : ok.max_tile) * sizeof(float));
    float x[K], y[N];
    for (int i = 0; i < K; i++) x[i] = 1.0f / (float)(i + 1);
    for (int rep = 0; rep < 2; rep++) {
        assert_int_equal(nz_matmul(c, dc, scratch, &w, x, 1, y, &e), NZ_E_CHECKSUM);
        assert_string_equal(e.msg, "tensor 'lossless.bf16' tile 2: checksum mismatch");
        assert_int_equal(nz_matmul(c, dc, scratch, &ok, x, 1, y, &e), NZ_OK);
    }
    assert_int_equal(nz_weight_bind(&w, m, "nope", &e), NZ_E_NOT_FOUND);
    nz_cache_free(c);
    nz_dctx_free(dc);
    free(scratch);
    nz_model_free(m);
    free(img);
}

/* nz_matmul_mt on 1..4 threads, with and without a shared cache, is
 * bit-identical to nz_matmul; a damaged tile's error comes back from
 * whichever worker met it. */
static void test_matmul_threads(void **state) {
    (void)state;
    nz_error e = {0};
    nz_dctx *dc = nz_dctx_create();
    uint64_t s = 9;
    const size_t M = 8;
    float *x = xmalloc(M * K * sizeof(float)), *y0 = xmalloc(M * N * sizeof(float)),
          *y = xmalloc(M * N * sizeof(float));
    for (size_t i = 0; i < M * K; i++) x[i] = (float)tu_gauss(&s);
    for (int n = 1; n <= 4; n++) {
        nz_pool *p = nz_pool_create(n);
        nz_tile_cache *c = nz_cache_create(4 * TILE_ROWS * K * sizeof(float)); /* a partial cache */
        for (int cached = 0; cached <= 1; cached++) {
            nz_matmul_ctx *mc = nz_matmul_ctx_create(p, cached ? c : NULL);
            assert_non_null(mc);
            for (size_t wi = 0; wi < NW; wi++) {
                nz_weight w;
                assert_int_equal(nz_weight_bind(&w, g_m, NAMES[wi], &e), NZ_OK);
                float *scratch = xmalloc(w.max_tile * sizeof(float));
                for (size_t m = 1; m <= M; m += M - 1) {
                    /* the single-thread result of the same path (fused GEMV when uncached, M = 1) */
                    assert_int_equal(nz_matmul(cached ? c : NULL, dc, scratch, &w, x, m, y0, &e), NZ_OK);
                    for (int rep = 0; rep < 3; rep++) {
                        memset(y, 0xff, m * N * sizeof(float));
                        assert_int_equal(nz_matmul_mt(mc, &w, x, m, y, &e), NZ_OK);
                        if (memcmp(y, y0, m * N * sizeof(float)))
                            fail_msg("%s M=%zu on %d threads (cache %d) differs", NAMES[wi], m, n, cached);
                    }
                }
                free(scratch);
            }
            nz_matmul_ctx_free(mc);
        }
        nz_cache_free(c);
        nz_pool_free(p);
    }
    /* a damaged tile */
    uint8_t *img = xmalloc(g_len);
    memcpy(img, g_img, g_len);
    nz_model *m;
    assert_int_equal(nz_model_load_buffer(img, g_len, &m, &e), NZ_OK);
    nz_weight w;
    assert_int_equal(nz_weight_bind(&w, m, "lossless.f16", &e), NZ_OK);
    uint64_t doff = 0;
    for (int i = 7; i >= 0; i--) doff = doff << 8 | img[24 + i];
    img[doff + w.t->tiles[3].offset + 16] ^= 1;
    nz_pool *p = nz_pool_create(3);
    nz_matmul_ctx *mc = nz_matmul_ctx_create(p, NULL);
    for (int rep = 0; rep < 3; rep++) {
        assert_int_equal(nz_matmul_mt(mc, &w, x, M, y, &e), NZ_E_CHECKSUM);
        assert_string_equal(e.msg, "tensor 'lossless.f16' tile 3: checksum mismatch");
    }
    nz_matmul_ctx_free(mc);
    nz_pool_free(p);
    nz_model_free(m);
    free(img);
    free(x);
    free(y0);
    free(y);
    nz_dctx_free(dc);
}

/* The rANS fused decode-and-multiply GEMV (nz_tile_gemv_f32, M = 1) against
 * decode + nz_gemm_f32 (nz_matmul) for every kernel this CPU has (scalar,
 * AVX2, AVX-512 forced), on random shapes with odd sizes (rows straddling
 * vectors, short last tiles, 1-column and 1-row tensors, tiles of 32 and 64
 * rANS lanes), lossless bf16 and mode-bf16 (lossy-7) tiles; lossy-3 (not
 * fusable) must stay bit-identical. Tolerance: 1e-5 of sum |x||w| per output. */
static void test_matmul_fused_gemv(void **state) {
    (void)state;
    static const struct {
        uint64_t rows, cols;
        uint32_t tile_rows;
    } S[] = {{1, 1, 1},  {3, 7, 2}, {17, 33, 5},     {64, 200, 64},   {130, 515, 48}, {40, 1024, 16},
             {9, 16, 4}, {5, 8, 3}, {257, 129, 100}, {200, 512, 200}, {150, 700, 150}};
    const size_t NS = sizeof S / sizeof *S;
    const char *modes[] = {"lossless", "bf16", "lossy-3"};
    uint64_t s = 77;
    char path[] = "/tmp/nz_test_gemv_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    nz_writer *wr;
    nz_error e = {0};
    assert_int_equal(nz_writer_create(path, &wr, &e), NZ_OK);
    for (size_t si = 0; si < NS; si++) {
        size_t n = S[si].rows * S[si].cols;
        float *f = xmalloc(n * sizeof *f);
        uint16_t *b = xmalloc(n * sizeof *b);
        double scale = si % 2 ? 0.02 : 3.0;
        for (size_t i = 0; i < n; i++) {
            f[i] = (float)(scale * tu_gauss(&s));
            if (i % 97 == 5) f[i] = 0; /* zeros and subnormal-free specials */
            b[i] = nz_f32_to_bf16(f[i]);
        }
        for (int mi = 0; mi < 3; mi++) {
            char name[64];
            snprintf(name, sizeof name, "%s.%zu", modes[mi], si);
            if (mi == 0)
                tm_add_tensor(wr, name, "BF16", NZ_DT_BF16, "lossless", NZ_CODER_RANS, S[si].rows, S[si].cols,
                              S[si].tile_rows, 2, b);
            else
                tm_add_tensor(wr, name, "F32", NZ_DT_F32, modes[mi], NZ_CODER_RANS, S[si].rows, S[si].cols,
                              S[si].tile_rows, 2, f);
        }
        free(f);
        free(b);
    }
    assert_int_equal(nz_writer_finish(wr, &e), NZ_OK);
    size_t len;
    uint8_t *img = tm_read_file(path, &len);
    unlink(path);
    nz_model *m;
    assert_int_equal(nz_model_load_buffer(img, len, &m, &e), NZ_OK);
    static const nz_rans_kernel kernels[] = {NZ_RANS_SCALAR, NZ_RANS_AVX2, NZ_RANS_AVX512};
    static const char *kname[] = {"scalar", "avx2", "avx512"};
    nz_dctx *dc = nz_dctx_create();
    int lanes64 = 0, ran = 0;
    for (size_t si = 0; si < NS; si++)
        for (int mi = 0; mi < 3; mi++) {
            char name[64];
            snprintf(name, sizeof name, "%s.%zu", modes[mi], si);
            nz_weight w;
            assert_int_equal(nz_weight_bind(&w, m, name, &e), NZ_OK);
            int fusable = nz_tile_gemv_fusable(&w.t->desc); /* a 1-element tensor is coded const */
            assert_int_equal(fusable, mi < 2 && w.t->desc.coder == NZ_CODER_RANS);
            const uint8_t *tp;
            size_t tl;
            assert_int_equal(nz_model_tile(m, w.index, 0, &tp, &tl, &e), NZ_OK);
            lanes64 |= tp[4] == 64;
            float *W = decoded_f32(m, &w), *scratch = xmalloc(w.max_tile * sizeof(float));
            float *x = xmalloc(w.k * sizeof *x), *y0 = xmalloc(w.n * sizeof *y0),
                  *y = xmalloc(w.n * sizeof *y);
            for (size_t i = 0; i < w.k; i++) x[i] = (float)tu_gauss(&s);
            nz_matmul_set_fused(0);
            assert_int_equal(nz_matmul(NULL, dc, scratch, &w, x, 1, y0, &e), NZ_OK);
            nz_matmul_set_fused(1);
            for (int ki = 0; ki < 3; ki++) {
                if (nz_rans_set_kernel(kernels[ki]) != NZ_OK) continue; /* not on this CPU */
                ran |= 1 << ki;
                memset(y, 0xff, w.n * sizeof *y);
                if (fusable) /* the rANS fused GEMV through the tile API (nz_matmul decodes rANS tiles) */
                    for (uint64_t t = 0; t < w.t->ntiles; t++) {
                        assert_int_equal(nz_model_tile(m, w.index, t, &tp, &tl, &e), NZ_OK);
                        assert_int_equal(
                            nz_tile_gemv_f32(dc, &w.t->desc, t, tp, tl, x, y + t * w.t->desc.tile_rows, &e),
                            NZ_OK);
                    }
                else
                    assert_int_equal(nz_matmul(NULL, dc, scratch, &w, x, 1, y, &e), NZ_OK);
                char what[96];
                snprintf(what, sizeof what, "%s (%llu x %llu) kernel %s", name, (unsigned long long)w.n,
                         (unsigned long long)w.k, kname[ki]);
                if (fusable)
                    assert_close_m1(y, y0, x, W, w.n, w.k, what);
                else if (memcmp(y, y0, w.n * sizeof *y))
                    fail_msg("%s: not fusable, yet differs", what);
                /* the tile API directly: a truncated tile is refused */
                if (fusable) {
                    assert_int_equal(nz_model_tile(m, w.index, 0, &tp, &tl, &e), NZ_OK);
                    assert_int_not_equal(nz_tile_gemv_f32(dc, &w.t->desc, 0, tp, tl - 1, x, y, &e), NZ_OK);
                }
            }
            nz_rans_set_kernel(NZ_RANS_AUTO);
            free(W);
            free(scratch);
            free(x);
            free(y0);
            free(y);
        }
    assert_true(lanes64);
    assert_true(ran & 1);
    nz_dctx_free(dc);
    nz_model_free(m);
    free(img);
}

/* Verify-once (nz_model_tile_once): a tile damaged before its first use is
 * refused on every call, on every uncached path (fused M = 1, decode M = 8,
 * threads) and by caches; once a tile has verified, the serving path skips
 * its checksum (documented), while nz_model_decode_f32 and the
 * NZ_VERIFY_ALWAYS policy still check every time. */
static void test_matmul_verify_once(void **state) {
    (void)state;
    uint8_t *img = xmalloc(g_len);
    memcpy(img, g_img, g_len);
    nz_model *m;
    nz_error e = {0};
    assert_int_equal(nz_model_load_buffer(img, g_len, &m, &e), NZ_OK);
    uint64_t doff = 0;
    for (int i = 7; i >= 0; i--) doff = doff << 8 | img[24 + i];
    nz_weight w;
    assert_int_equal(nz_weight_bind(&w, m, "lossless.bf16", &e), NZ_OK);
    /* a sign+mantissa byte of tile 1: decodes fine, only the checksum can tell */
    uint8_t *byte = img + doff + w.t->tiles[1].offset + w.t->tiles[1].size - 3;
    nz_dctx *dc = nz_dctx_create();
    nz_pool *p = nz_pool_create(2);
    nz_matmul_ctx *mc = nz_matmul_ctx_create(p, NULL);
    nz_tile_cache *c0 = nz_cache_create(0), *call = nz_cache_create((size_t)16 << 20);
    float *scratch = xmalloc(w.max_tile * sizeof(float));
    float x[8 * K], y[8 * N];
    for (int i = 0; i < 8 * K; i++) x[i] = 1.0f / (float)(i + 1);
    *byte ^= 0x01; /* damaged before its first use */
    for (int rep = 0; rep < 2; rep++) {
        assert_int_equal(nz_matmul(NULL, dc, scratch, &w, x, 1, y, &e), NZ_E_CHECKSUM);
        assert_string_equal(e.msg, "tensor 'lossless.bf16' tile 1: checksum mismatch");
        assert_int_equal(nz_matmul(c0, dc, scratch, &w, x, 8, y, &e), NZ_E_CHECKSUM);
        assert_int_equal(nz_matmul(call, dc, scratch, &w, x, 1, y, &e), NZ_E_CHECKSUM);
        assert_int_equal(nz_matmul_mt(mc, &w, x, 1, y, &e), NZ_E_CHECKSUM);
        assert_string_equal(e.msg, "tensor 'lossless.bf16' tile 1: checksum mismatch");
    }
    nz_cache_stats st;
    nz_cache_get_stats(call, &st);
    assert_int_equal(st.tiles_decoded, 1); /* tile 0 only: the damaged tile was never cached */
    *byte ^= 0x01;                         /* repaired: verifies now, and is remembered as verified */
    assert_int_equal(nz_matmul(NULL, dc, scratch, &w, x, 1, y, &e), NZ_OK);
    *byte ^= 0x01;                                                          /* damaged after verification */
    assert_int_equal(nz_matmul(NULL, dc, scratch, &w, x, 1, y, &e), NZ_OK); /* not re-checked */
    float t[TILE_ROWS * K];
    assert_int_equal(nz_model_decode_f32(m, dc, w.index, 1, t, &e), NZ_E_CHECKSUM); /* explicit check */
    nz_model_set_verify(m, NZ_VERIFY_ALWAYS);
    assert_int_equal(nz_matmul(NULL, dc, scratch, &w, x, 1, y, &e), NZ_E_CHECKSUM);
    assert_int_equal(nz_matmul(NULL, dc, scratch, &w, x, 8, y, &e), NZ_E_CHECKSUM);
    nz_model_set_verify(m, NZ_VERIFY_ONCE);
    *byte ^= 0x01;
    assert_int_equal(nz_matmul(NULL, dc, scratch, &w, x, 8, y, &e), NZ_OK);
    nz_model_set_verify(NULL, NZ_VERIFY_ALWAYS); /* accepts NULL */
    free(scratch);
    nz_cache_free(c0);
    nz_cache_free(call);
    nz_matmul_ctx_free(mc);
    nz_pool_free(p);
    nz_dctx_free(dc);
    nz_model_free(m);
    free(img);
}

typedef struct {
    nz_matmul_ctx *mc;
    nz_weight *w;
    const float *x;
    float *y;
    int rc;
    long calls;
} cancel_job;

static void *matmul_until_cancelled(void *arg) {
    cancel_job *j = arg;
    nz_error e = {0};
    do j->calls++;
    while ((j->rc = nz_matmul_mt(j->mc, j->w, j->x, 4, j->y, &e)) == NZ_OK);
    return NULL;
}

/* nz_matmul_ctx_cancel: every call fails with NZ_E_CANCELLED until re-armed, also when the cancel
 * comes from another thread while the context is busy; re-armed, the results are unchanged. */
static void test_matmul_cancel(void **state) {
    (void)state;
    nz_error e = {0};
    const size_t M = 4;
    uint64_t s = 5;
    float *x = xmalloc(M * K * sizeof(float)), *y0 = xmalloc(M * N * sizeof(float)),
          *y = xmalloc(M * N * sizeof(float));
    for (size_t i = 0; i < M * K; i++) x[i] = (float)tu_gauss(&s);
    nz_pool *p = nz_pool_create(2);
    nz_matmul_ctx *mc = nz_matmul_ctx_create(p, NULL);
    nz_weight w;
    assert_int_equal(nz_weight_bind(&w, g_m, NAMES[1], &e), NZ_OK);
    assert_int_equal(nz_matmul_mt(mc, &w, x, M, y0, &e), NZ_OK);
    nz_matmul_ctx_cancel(mc, 1);
    assert_int_equal(nz_matmul_mt(mc, &w, x, M, y, &e), NZ_E_CANCELLED);
    assert_string_equal(e.msg, "cancelled");
    nz_cache_ref ref;
    assert_int_equal(nz_matmul_ctx_tile(mc, &w, 0, &ref, &e), NZ_E_CANCELLED);
    nz_matmul_ctx_release(mc, &ref); /* harmless after a failed fetch */
    nz_matmul_ctx_cancel(mc, 0);
    assert_int_equal(nz_matmul_mt(mc, &w, x, M, y, &e), NZ_OK);
    assert_memory_equal(y, y0, M * N * sizeof(float));
    /* from another thread, while busy */
    cancel_job j = {mc, &w, x, y, NZ_OK, 0};
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, matmul_until_cancelled, &j), 0);
    struct timespec ts = {0, 5 * 1000000L};
    nanosleep(&ts, NULL);
    nz_matmul_ctx_cancel(mc, 1);
    pthread_join(th, NULL);
    assert_int_equal(j.rc, NZ_E_CANCELLED);
    assert_true(j.calls >= 1);
    nz_matmul_ctx_cancel(mc, 0);
    nz_matmul_ctx_cancel(NULL, 1); /* accepts NULL */
    nz_matmul_ctx_free(mc);
    nz_pool_free(p);
    free(x);
    free(y0);
    free(y);
}

/* nz_matmul_ctx_run: every task once with its thread's work of the asked size; a cancel stops the
 * loop before the tasks not yet started and fails it with NZ_E_CANCELLED; re-armed, all run again. */
typedef struct {
    nz_matmul_ctx *mc;
    size_t work_floats;
    _Atomic int runs[64];
    uint64_t cancel_at; /* a task that cancels mc (UINT64_MAX: none) */
} run_probe;

static void probe_task(void *ctx, uint64_t task, float *work) {
    run_probe *p = ctx;
    work[0] = work[p->work_floats - 1] = (float)task; /* the whole buffer is there (ASan, valgrind) */
    atomic_fetch_add(&p->runs[task], 1);
    if (task == p->cancel_at) nz_matmul_ctx_cancel(p->mc, 1);
}

static void test_ctx_run(void **state) {
    (void)state;
    nz_error e = {0};
    for (int threads = 1; threads <= 2; threads++) {
        nz_pool *pool = nz_pool_create(threads);
        run_probe *p = calloc(1, sizeof *p);
        p->mc = nz_matmul_ctx_create(pool, NULL);
        for (size_t wf = 1; wf <= 4096; wf *= 64) {
            p->work_floats = wf;
            p->cancel_at = UINT64_MAX;
            for (int i = 0; i < 64; i++) p->runs[i] = 0;
            assert_int_equal(nz_matmul_ctx_run(p->mc, 64, wf, probe_task, p, &e), NZ_OK);
            for (int i = 0; i < 64; i++) assert_int_equal(p->runs[i], 1);
        }
        for (int i = 0; i < 64; i++) p->runs[i] = 0;
        p->cancel_at = 3;
        assert_int_equal(nz_matmul_ctx_run(p->mc, 64, 16, probe_task, p, &e), NZ_E_CANCELLED);
        assert_string_equal(e.msg, "cancelled");
        int ran = 0;
        for (int i = 0; i < 64; i++) ran += p->runs[i];
        assert_true(ran >= 4 &&
                    ran <= 4 + threads); /* tasks 0..3, and one already started per other thread */
        assert_int_equal(nz_matmul_ctx_run(p->mc, 64, 16, probe_task, p, &e), NZ_E_CANCELLED); /* still */
        nz_matmul_ctx_cancel(p->mc, 0);
        p->cancel_at = UINT64_MAX;
        assert_int_equal(nz_matmul_ctx_run(p->mc, 0, 16, probe_task, p, &e), NZ_OK); /* no tasks */
        nz_matmul_ctx_free(p->mc);
        free(p);
        nz_pool_free(pool);
    }
}

/* ---------------------------------------------------------- batch invariance */

/* nz_gemm_f32 on random shapes (M, N edges of the 4 x 3 blocks, K tails,
 * strided rows, K = 0): the AVX2 and portable kernels give the same bits,
 * each row of y is the same bits when computed alone, and y is within
 * 1e-5 of sum |x w| of a double reference. */
static void test_gemm_kernel(void **state) {
    (void)state;
    uint64_t s = 21;
    const int avx2 = nz_gemm_use_avx2();
    for (int it = 0; it < (tu_quick() ? 60 : 400); it++) {
        size_t M = 1 + tu_rand(&s) % 13, Nn = 1 + tu_rand(&s) % 11, Kk = tu_rand(&s) % 300;
        if (it == 0) Kk = 0;
        size_t ldx = Kk + tu_rand(&s) % 5, ldw = Kk + tu_rand(&s) % 5, ldy = Nn + tu_rand(&s) % 3;
        float *x = xmalloc(M * ldx * sizeof *x), *w = xmalloc(Nn * ldw * sizeof *w);
        float *y = xmalloc(M * ldy * sizeof *y), *yp = xmalloc(M * ldy * sizeof *yp), y1[11];
        for (size_t i = 0; i < M * ldx; i++) x[i] = (float)tu_gauss(&s);
        for (size_t i = 0; i < Nn * ldw; i++) w[i] = (float)(0.05 * tu_gauss(&s));
        memset(y, 0, M * ldy * sizeof *y);
        memset(yp, 0, M * ldy * sizeof *yp);
        nz_gemm_f32(M, Nn, Kk, x, ldx, w, ldw, y, ldy);
        nz_gemm_f32_portable(M, Nn, Kk, x, ldx, w, ldw, yp, ldy);
        if (memcmp(y, yp, M * ldy * sizeof *y))
            fail_msg("M %zu N %zu K %zu: the %s kernel differs from the portable one", M, Nn, Kk,
                     avx2 ? "AVX2" : "portable");
        for (size_t m = 0; m < M; m++) {
            nz_gemm_f32(1, Nn, Kk, x + m * ldx, ldx, w, ldw, y1, Nn);
            if (memcmp(y1, y + m * ldy, Nn * sizeof *y1))
                fail_msg("M %zu N %zu K %zu: row %zu differs from the row alone", M, Nn, Kk, m);
            for (size_t r = 0; r < Nn; r++) {
                double ref = 0, mag = 0;
                for (size_t k = 0; k < Kk; k++) {
                    ref += (double)x[m * ldx + k] * w[r * ldw + k];
                    mag += fabs((double)x[m * ldx + k] * w[r * ldw + k]);
                }
                if (fabs(ref - y[m * ldy + r]) > 1e-5 * mag + 1e-30)
                    fail_msg("M %zu N %zu K %zu: y[%zu][%zu] %.9g, want %.9g", M, Nn, Kk, m, r,
                             y[m * ldy + r], ref);
                if (!Kk) assert_true(y[m * ldy + r] == 0 && !signbit(y[m * ldy + r]));
            }
        }
        free(x);
        free(w);
        free(y);
        free(yp);
    }
}

/* The weight layouts of test_matmul_batch_invariant: every path of
 * nz_matmul (raw fp32 in place; raw bf16, fp16 and fp32 sources, zstd and
 * rANS exponents, lossy-5 and normalised lossy-3 decoded then nz_gemm_f32;
 * esc bf16-layout and lossy-3 tiles fused), each in two shapes: K = 256
 * (whole runs of 32: the AVX2 fused kernels, and past 16 rows the
 * decode-once kernel) and K = 200 (not: the portable fused path). */
static const struct {
    const char *name, *st;
    nz_dtype dt;
    const char *mode;
    nz_coder coder;
    uint32_t norm_block;
} INV[] = {
    {"raw32", "F32", NZ_DT_F32, "raw", NZ_CODER_NONE, 0},
    {"rawbf", "BF16", NZ_DT_BF16, "raw", NZ_CODER_NONE, 0},
    {"llbf.esc", "BF16", NZ_DT_BF16, "lossless", NZ_CODER_ESC, 0},
    {"llbf.rans", "BF16", NZ_DT_BF16, "lossless", NZ_CODER_RANS, 0},
    {"llbf.zstd", "BF16", NZ_DT_BF16, "lossless", NZ_CODER_ZSTD, 0},
    {"llf16.esc", "F16", NZ_DT_F16, "lossless", NZ_CODER_ESC, 0},
    {"llf32.esc", "F32", NZ_DT_F32, "lossless", NZ_CODER_ESC, 0},
    {"bf16.esc", "F32", NZ_DT_F32, "bf16", NZ_CODER_ESC, 0},
    {"bf16.rans", "F32", NZ_DT_F32, "bf16", NZ_CODER_RANS, 0},
    {"lossy3.esc", "F32", NZ_DT_F32, "lossy-3", NZ_CODER_ESC, 0},
    {"lossy3.rans", "F32", NZ_DT_F32, "lossy-3", NZ_CODER_RANS, 0},
    {"lossy5.esc", "F32", NZ_DT_F32, "lossy-5", NZ_CODER_ESC, 0},
    {"lossy3nb.esc", "F32", NZ_DT_F32, "lossy-3", NZ_CODER_ESC, 64},
};
#define NINV (sizeof INV / sizeof *INV)
static const struct {
    uint64_t n, k;
    uint32_t tile_rows;
} INV_SHAPE[2] = {{67, 256, 16}, {45, 200, 16}};
#define INV_ROWS 40 /* input rows: M = 1 .. 40 */

/* The rows the tests use: INV_ROWS, or 20 when quick (valgrind). */
static size_t inv_rows(void) { return tu_quick() ? 20 : INV_ROWS; }

/* A model holding every INV layout in both shapes ("<name>.<shape>"). */
static uint8_t *inv_model(size_t *len) {
    char path[] = "/tmp/nz_test_inv_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    nz_writer *wr;
    nz_error e = {0};
    uint64_t s = 31;
    assert_int_equal(nz_writer_create(path, &wr, &e), NZ_OK);
    for (int si = 0; si < 2; si++) {
        uint64_t n = INV_SHAPE[si].n, k = INV_SHAPE[si].k;
        float *f = xmalloc(n * k * sizeof *f);
        uint16_t *bf = xmalloc(n * k * sizeof *bf), *h = xmalloc(n * k * sizeof *h);
        for (uint64_t i = 0; i < n * k; i++) {
            f[i] = (float)(0.05 * tu_gauss(&s));
            bf[i] = nz_f32_to_bf16(f[i]);
            h[i] = nz_f32_to_f16(f[i]);
        }
        for (size_t t = 0; t < NINV; t++) {
            char name[64];
            snprintf(name, sizeof name, "%s.%d", INV[t].name, si);
            const void *src = INV[t].dt == NZ_DT_F32 ? (const void *)f : INV[t].dt == NZ_DT_BF16 ? bf : h;
            nz_mode md;
            nz_tensor_desc d;
            uint64_t counts[256];
            int64_t shape[2] = {(int64_t)n, (int64_t)k};
            assert_int_equal(nz_mode_parse(INV[t].mode, &md, &e), NZ_OK);
            md.norm_block = INV[t].norm_block;
            assert_int_equal(nz_desc_init(&d, INV[t].dt, nz_dtype_size(INV[t].dt), &md, INV[t].coder, n, k,
                                          INV_SHAPE[si].tile_rows, &e),
                             NZ_OK);
            assert_int_equal(nz_tensor_analyze(&d, src, counts, &e), NZ_OK);
            if (nz_writer_add_tensor(wr, name, INV[t].st, 2, shape, &d, counts, src, &e) != NZ_OK)
                fail_msg("adding tensor '%s': %s", name, e.msg);
        }
        free(f);
        free(bf);
        free(h);
    }
    assert_int_equal(nz_writer_finish(wr, &e), NZ_OK);
    uint8_t *img = tm_read_file(path, len);
    unlink(path);
    return img;
}

/* One way to run a matmul: nz_matmul (cache, dc, scratch) or, with mc,
 * nz_matmul_mt; with lin, nz_linear_fwd (bias added). */
typedef struct {
    nz_tile_cache *cache;
    nz_dctx *dc;
    float *scratch;
    nz_matmul_ctx *mc;
    const nz_linear *lin;
} inv_runner;

static void inv_run(const inv_runner *r, const nz_weight *w, const float *x, size_t M, float *y) {
    nz_error e = {0};
    int rc = r->lin  ? nz_linear_fwd(r->mc, r->lin, x, M, y, &e)
             : r->mc ? nz_matmul_mt(r->mc, w, x, M, y, &e)
                     : nz_matmul(r->cache, r->dc, r->scratch, w, x, M, y, &e);
    if (rc) fail_msg("%s", e.msg);
}

/* alone[m * n] = row m of x (INV_ROWS rows) computed alone (M = 1). */
static float *inv_alone(const inv_runner *r, const nz_weight *w, const float *x) {
    float *alone = xmalloc(INV_ROWS * w->n * sizeof *alone);
    for (size_t m = 0; m < inv_rows(); m++) inv_run(r, w, x + m * w->k, 1, alone + m * w->n);
    return alone;
}

/* Every row of y for M = 1 .. inv_rows() (all, or a selection) is
 * bit-identical to alone (inv_alone), also when the other rows of x change
 * (x2: the odd rows replaced). */
static void inv_check(const inv_runner *r, const nz_weight *w, const float *x, const float *x2,
                      const float *alone, int all, const char *what) {
    const size_t n = w->n;
    float *y = xmalloc(INV_ROWS * n * sizeof *y);
    static const size_t some_M[] = {1, 2, 3, 4, 5, 7, 16, 17, 33, 40};
    const size_t nM = all ? inv_rows() : sizeof some_M / sizeof *some_M;
    for (size_t mi = 0; mi < nM; mi++) {
        size_t M = all ? mi + 1 : some_M[mi];
        if (M > inv_rows()) break;
        for (int pass = 0; pass < 2; pass++) {
            memset(y, 0xff, M * n * sizeof *y);
            inv_run(r, w, pass ? x2 : x, M, y);
            for (size_t m = 0; m < M; m += 1 + (size_t)pass) /* pass 1: the unchanged (even) rows */
                if (memcmp(y + m * n, alone + m * n, n * sizeof *y))
                    fail_msg("%s: row %zu of M = %zu%s differs from the row alone", what, m, M,
                             pass ? " (other rows changed)" : "");
        }
    }
    free(y);
}

/* Batch invariance of nz_matmul / nz_matmul_mt / nz_linear_fwd: for every
 * weight layout (INV) x cache setting (none, budget 0, a full cache, a tiny
 * evicting one) x fused path on / off, each row of y is bit-identical for
 * every M = 1..40 (nz_matmul; a selection of M for nz_matmul_mt on two
 * threads and nz_linear_fwd, and when quick, up to 20) and whatever the other rows
 * hold, equal to the row alone through nz_matmul; the AVX2 and portable
 * kernels agree bit for bit. (Cache on and off may differ from
 * each other for fused esc tiles: another summation order.) */
static void test_matmul_batch_invariant(void **state) {
    (void)state;
    size_t len;
    uint8_t *img = inv_model(&len);
    nz_model *m;
    nz_error e = {0};
    assert_int_equal(nz_model_load_buffer(img, len, &m, &e), NZ_OK);
    nz_dctx *dc = nz_dctx_create();
    nz_pool *pool = nz_pool_create(2);
    uint64_t s = 41;
    for (int si = 0; si < 2; si++) {
        const size_t n = INV_SHAPE[si].n, k = INV_SHAPE[si].k;
        float *x = xmalloc(INV_ROWS * k * sizeof *x), *x2 = xmalloc(INV_ROWS * k * sizeof *x2);
        for (size_t i = 0; i < INV_ROWS * k; i++) x[i] = x2[i] = (float)tu_gauss(&s);
        for (size_t r = 1; r < INV_ROWS; r += 2)
            for (size_t i = 0; i < k; i++) x2[r * k + i] = (float)(3 * tu_gauss(&s));
        const size_t tile_bytes = INV_SHAPE[si].tile_rows * k * sizeof(float);
        const size_t budgets[] = {0, (size_t)64 << 20, tile_bytes * 3 / 2};
        for (size_t t = 0; t < NINV; t++) {
            char name[64], what[160];
            snprintf(name, sizeof name, "%s.%d", INV[t].name, si);
            nz_weight w;
            assert_int_equal(nz_weight_bind(&w, m, name, &e), NZ_OK);
            float *scratch = xmalloc(w.max_tile * sizeof(float));
            float *ya = xmalloc(INV_ROWS * n * sizeof *ya), *yb = xmalloc(INV_ROWS * n * sizeof *yb);
            for (int ci = -1; ci < 3; ci++) { /* no cache, then the budgets */
                nz_tile_cache *c = ci < 0 ? NULL : nz_cache_create(budgets[ci]);
                for (int fused = 1; fused >= 0; fused--) {
                    if (!fused && (ci > 0 || w.t->desc.coder != NZ_CODER_ESC)) continue; /* changes nothing */
                    nz_matmul_set_fused(fused);
                    snprintf(what, sizeof what, "%s cache %d%s", name, ci, fused ? "" : " unfused");
                    inv_runner r = {c, dc, scratch, NULL, NULL};
                    float *alone = inv_alone(&r, &w, x);
                    inv_check(&r, &w, x, x2, alone, !tu_quick(), what);
                    const size_t R = inv_rows();
                    inv_run(&r, &w, x, R, ya);
                    /* quick (valgrind): the kernels' comparisons uncached only (the cached paths run the
                     * kernels of the uncached decode path), nz_matmul_mt and nz_linear_fwd also on the
                     * tiny evicting cache */
                    const int more = !tu_quick() || ci < 0, mt = more || ci == 2;
                    if (more) { /* the AVX2 and portable kernels: the same bits */
                        int was = nz_rans_force_scalar(1);
                        inv_run(&r, &w, x, R, yb);
                        nz_rans_force_scalar(was);
                        if (memcmp(ya, yb, R * n * sizeof *ya))
                            fail_msg("%s: the portable kernels differ from the vector ones", what);
                    }
                    if (!mt) {
                        free(alone);
                        continue;
                    }
                    /* nz_matmul_mt on two threads (its own cache, same budget) */
                    nz_tile_cache *c2 = ci < 0 ? NULL : nz_cache_create(budgets[ci]);
                    nz_matmul_ctx *mc = nz_matmul_ctx_create(pool, c2);
                    inv_runner rm = {NULL, NULL, NULL, mc, NULL};
                    inv_run(&rm, &w, x, R, yb);
                    if (memcmp(ya, yb, R * n * sizeof *ya)) fail_msg("%s: nz_matmul_mt differs", what);
                    inv_check(&rm, &w, x, x2, alone, 0, what);
                    /* nz_linear_fwd (no bias: the same bits) */
                    nz_linear lin;
                    assert_int_equal(nz_linear_bind(&lin, m, name, NULL, k, n, &e), NZ_OK);
                    inv_runner rl = {NULL, NULL, NULL, mc, &lin};
                    inv_check(&rl, &w, x, x2, alone, 0, what);
                    nz_linear_free(&lin);
                    free(alone);
                    nz_matmul_ctx_free(mc);
                    nz_cache_free(c2);
                }
                nz_matmul_set_fused(1);
                nz_cache_free(c);
            }
            free(scratch);
            free(ya);
            free(yb);
        }
        free(x);
        free(x2);
    }
    nz_pool_free(pool);
    nz_dctx_free(dc);
    nz_model_free(m);
    free(img);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matmul_cancel),          cmocka_unit_test(test_ctx_run),
        cmocka_unit_test(test_matmul_all_modes),       cmocka_unit_test(test_matmul_damaged_tile),
        cmocka_unit_test(test_matmul_threads),         cmocka_unit_test(test_matmul_fused_gemv),
        cmocka_unit_test(test_matmul_verify_once),     cmocka_unit_test(test_gemm_kernel),
        cmocka_unit_test(test_matmul_batch_invariant),
    };
    return cmocka_run_group_tests_name("matmul", tests, setup, teardown);
}
