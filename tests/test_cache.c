/* Decoded-tile cache: hits, misses, LRU order, budget, pinning, errors,
 * threads. */
#include "test_model.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_codec.h"
#include "nz_container.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>

/* ---------------------------------------------------------------- fixture */

#define COLS      64
#define TILE_ROWS 8
#define TILE_B    (TILE_ROWS * COLS * sizeof(float)) /* bytes of a full tile */
#define MAX_TILES 128

typedef struct spec {
    const char *name, *st, *mode;
    nz_dtype dt;
    nz_coder coder;
    uint64_t rows;
} spec;

typedef struct fixture {
    uint8_t *img; /* the written file (malloc'ed, writable) */
    size_t len;
    nz_model *m;
    size_t nt;
    size_t base[8];           /* global index of tensor ti's tile 0 */
    size_t ntiles;            /* tiles of the model */
    size_t bytes;             /* decoded size of every tile */
    float *ref[MAX_TILES];    /* nz_model_decode_f32 output per tile */
    size_t tbytes[MAX_TILES]; /* decoded bytes per tile */
    size_t ti_of[MAX_TILES];
    uint64_t t_of[MAX_TILES];
} fixture;

static fixture g_a, g_b, g_c;

static const spec SPEC_A[] = {
    {"a.w", "BF16", "lossless", NZ_DT_BF16, NZ_CODER_RANS, 40}, /* 5 tiles */
    {"a.f", "F32", "lossy-4", NZ_DT_F32, NZ_CODER_ZSTD, 24},    /* 3 tiles */
};
static const spec SPEC_B[] = {
    {"b.w", "BF16", "lossless", NZ_DT_BF16, NZ_CODER_RANS, 48}, /* 6 tiles */
    {"b.r", "F32", "raw", NZ_DT_F32, NZ_CODER_NONE, 16},        /* 2 tiles */
    {"b.h", "F16", "lossless", NZ_DT_F16, NZ_CODER_RANS, 20},   /* 3 tiles, last short */
};
static const spec SPEC_C[] = {
    {"c.w", "BF16", "lossless", NZ_DT_BF16, NZ_CODER_RANS, 8 * 100}, /* 100 tiles: table grows */
};

static void add_tensor(nz_writer *w, const spec *sp, uint64_t *seed) {
    size_t es = nz_dtype_size(sp->dt), n = sp->rows * COLS;
    uint8_t *src = xmalloc(n * es);
    for (size_t i = 0; i < n; i++) {
        float v = (float)(0.03 * tu_gauss(seed));
        if (sp->dt == NZ_DT_BF16)
            ((uint16_t *)src)[i] = nz_f32_to_bf16(v);
        else if (sp->dt == NZ_DT_F16)
            ((uint16_t *)src)[i] = nz_f32_to_f16(v);
        else
            ((float *)src)[i] = v;
    }
    tm_add_tensor(w, sp->name, sp->st, sp->dt, sp->mode, sp->coder, sp->rows, COLS, TILE_ROWS, 2, src);
    free(src);
}

/* Write a model of the given tensors, load it from memory and decode every
 * tile once as the reference. */
static void build(fixture *f, const spec *sp, size_t n, uint64_t seed) {
    memset(f, 0, sizeof *f);
    char path[] = "/tmp/nz_test_cache_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    nz_writer *w;
    nz_error e = {0};
    assert_int_equal(nz_writer_create(path, &w, &e), NZ_OK);
    for (size_t i = 0; i < n; i++) add_tensor(w, &sp[i], &seed);
    assert_int_equal(nz_writer_finish(w, &e), NZ_OK);
    f->img = tm_read_file(path, &f->len);
    unlink(path);
    assert_int_equal(nz_model_load_buffer(f->img, f->len, &f->m, &e), NZ_OK);
    f->nt = nz_model_ntensors(f->m);
    assert_int_equal(f->nt, n);
    nz_dctx *dc = nz_dctx_create();
    assert_non_null(dc);
    for (size_t ti = 0; ti < f->nt; ti++) {
        const nz_tensor *x = nz_model_tensor(f->m, ti);
        f->base[ti] = f->ntiles;
        for (uint64_t t = 0; t < x->ntiles; t++) {
            size_t g = f->ntiles++;
            assert_true(g < MAX_TILES);
            f->tbytes[g] = nz_desc_tile_nrows(&x->desc, t) * x->desc.cols * sizeof(float);
            f->ref[g] = xmalloc(f->tbytes[g]);
            f->ti_of[g] = ti;
            f->t_of[g] = t;
            f->bytes += f->tbytes[g];
            assert_int_equal(nz_model_decode_f32(f->m, dc, ti, t, f->ref[g], &e), NZ_OK);
        }
    }
    nz_dctx_free(dc);
}

static void destroy(fixture *f) {
    for (size_t g = 0; g < f->ntiles; g++) free(f->ref[g]);
    nz_model_free(f->m);
    free(f->img);
}

static int setup(void **state) {
    (void)state;
    build(&g_a, SPEC_A, sizeof SPEC_A / sizeof *SPEC_A, 11);
    build(&g_b, SPEC_B, sizeof SPEC_B / sizeof *SPEC_B, 22);
    build(&g_c, SPEC_C, 1, 33);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    destroy(&g_a);
    destroy(&g_b);
    destroy(&g_c);
    return 0;
}

/* ---------------------------------------------------------------- helpers */

typedef struct env {
    nz_tile_cache *c;
    nz_dctx *dc;
    float *scratch;
    size_t mem0; /* nz_mem_current(NZ_MEM_TILE_CACHE) before the cache */
} env;

static void env_open(env *v, size_t budget) {
    v->mem0 = nz_mem_current(NZ_MEM_TILE_CACHE);
    v->c = nz_cache_create(budget);
    assert_non_null(v->c);
    v->dc = nz_dctx_create();
    assert_non_null(v->dc);
    v->scratch = xmalloc(TILE_B);
}

static void env_close(env *v) {
    nz_cache_free(v->c);
    assert_int_equal(nz_mem_current(NZ_MEM_TILE_CACHE), v->mem0);
    nz_dctx_free(v->dc);
    free(v->scratch);
}

static nz_cache_stats stats(env *v) {
    nz_cache_stats s;
    nz_cache_get_stats(v->c, &s);
    assert_true(s.bytes <= s.budget);
    assert_int_equal(nz_mem_current(NZ_MEM_TILE_CACHE) - v->mem0, s.bytes);
    return s;
}

/* Get global tile g of f, check it against the reference bit for bit. */
static nz_cache_ref get(env *v, const fixture *f, size_t g) {
    nz_cache_ref r;
    nz_error e = {0};
    assert_int_equal(nz_cache_get(v->c, f->m, f->ti_of[g], f->t_of[g], v->dc, v->scratch, &r, &e), NZ_OK);
    assert_non_null(r.data);
    assert_memory_equal(r.data, f->ref[g], f->tbytes[g]);
    stats(v);
    return r;
}

/* Get, check and release. @return 1 when the ref came from the cache. */
static int touch(env *v, const fixture *f, size_t g) {
    nz_cache_ref r = get(v, f, g);
    int cached = r.entry != NULL;
    if (!cached) assert_ptr_equal(r.data, v->scratch);
    nz_cache_release(v->c, &r);
    return cached;
}

#define ASSERT_HM(v, h, m)                                                                                   \
    do {                                                                                                     \
        nz_cache_stats s_ = stats(v);                                                                        \
        assert_int_equal(s_.hits, (h));                                                                      \
        assert_int_equal(s_.misses, (m));                                                                    \
    } while (0)

/* ------------------------------------------------------------------ tests */

/* Budget 0: every get decodes into scratch, nothing is ever allocated. */
static void test_budget_zero(void **state) {
    (void)state;
    env v;
    env_open(&v, 0);
    size_t peak0 = nz_mem_peak(NZ_MEM_TILE_CACHE);
    for (int pass = 0; pass < 2; pass++)
        for (size_t g = 0; g < g_a.ntiles; g++) {
            assert_false(touch(&v, &g_a, g));
            assert_int_equal(nz_mem_current(NZ_MEM_TILE_CACHE), v.mem0);
        }
    nz_cache_stats s = stats(&v);
    assert_int_equal(s.hits, 0);
    assert_int_equal(s.misses, 2 * g_a.ntiles);
    assert_int_equal(s.uncached, 2 * g_a.ntiles);
    assert_int_equal(s.tiles_decoded, 2 * g_a.ntiles);
    assert_int_equal(s.entries, 0);
    assert_int_equal(s.bytes, 0);
    assert_int_equal(s.peak_bytes, 0);
    assert_int_equal(s.evictions, 0);
    assert_int_equal(s.budget, 0);
    assert_int_equal(nz_mem_peak(NZ_MEM_TILE_CACHE), peak0);
    env_close(&v);
}

/* Budget of exactly 3 tiles: LRU order decides what is evicted. */
static void test_lru_order(void **state) {
    (void)state;
    env v;
    env_open(&v, 3 * TILE_B);
    /* tensor a.w: tiles 0..4, all TILE_B bytes */
    for (size_t g = 0; g < 5; g++) assert_int_equal(g_a.tbytes[g], TILE_B);
    assert_true(touch(&v, &g_a, 0));
    assert_true(touch(&v, &g_a, 1));
    assert_true(touch(&v, &g_a, 2));
    ASSERT_HM(&v, 0, 3);
    assert_true(touch(&v, &g_a, 0)); /* hit; LRU order now 1, 2, 0 */
    ASSERT_HM(&v, 1, 3);
    assert_true(touch(&v, &g_a, 3)); /* evicts 1 -> 2, 0, 3 */
    ASSERT_HM(&v, 1, 4);
    nz_cache_stats s = stats(&v);
    assert_int_equal(s.evictions, 1);
    assert_int_equal(s.entries, 3);
    assert_int_equal(s.bytes, 3 * TILE_B);
    assert_true(touch(&v, &g_a, 2)); /* hit -> 0, 3, 2 */
    assert_true(touch(&v, &g_a, 0)); /* hit -> 3, 2, 0 */
    ASSERT_HM(&v, 3, 4);
    assert_true(touch(&v, &g_a, 1)); /* miss, evicts 3 -> 2, 0, 1 */
    ASSERT_HM(&v, 3, 5);
    assert_true(touch(&v, &g_a, 2)); /* hit */
    assert_true(touch(&v, &g_a, 0)); /* hit */
    assert_true(touch(&v, &g_a, 1)); /* hit */
    ASSERT_HM(&v, 6, 5);
    assert_true(touch(&v, &g_a, 3)); /* miss, evicts 2 */
    assert_true(touch(&v, &g_a, 2)); /* miss, evicts 0 */
    ASSERT_HM(&v, 6, 7);
    s = stats(&v);
    assert_int_equal(s.evictions, 4);
    assert_int_equal(s.tiles_decoded, 7);
    assert_int_equal(s.uncached, 0);
    assert_int_equal(s.entries, 3);
    assert_int_equal(s.peak_bytes, 3 * TILE_B);
    assert_true(s.decode_ns > 0);
    /* two models share the cache: same (ti, t) of another model is a miss */
    assert_true(touch(&v, &g_b, 2));
    ASSERT_HM(&v, 6, 8);
    env_close(&v);
}

/* Budget >= everything: each tile is decoded exactly once. */
static void test_budget_all(void **state) {
    (void)state;
    env v;
    size_t n = g_a.ntiles + g_b.ntiles, total = g_a.bytes + g_b.bytes;
    env_open(&v, total);
    for (int pass = 0; pass < 3; pass++) {
        for (size_t g = 0; g < g_a.ntiles; g++) assert_true(touch(&v, &g_a, g));
        for (size_t g = 0; g < g_b.ntiles; g++) assert_true(touch(&v, &g_b, g));
    }
    nz_cache_stats s = stats(&v);
    assert_int_equal(s.tiles_decoded, n);
    assert_int_equal(s.misses, n);
    assert_int_equal(s.hits, 2 * n);
    assert_int_equal(s.evictions, 0);
    assert_int_equal(s.uncached, 0);
    assert_int_equal(s.entries, n);
    assert_int_equal(s.bytes, total);
    assert_int_equal(s.peak_bytes, total);
    env_close(&v);
}

/* Pinned entries stay; a tile that cannot fit goes to scratch. */
static void test_pinned(void **state) {
    (void)state;
    env v;
    env_open(&v, 2 * TILE_B);
    nz_cache_ref r0 = get(&v, &g_a, 0), r1 = get(&v, &g_a, 1);
    assert_non_null(r0.entry);
    assert_non_null(r1.entry);
    /* everything cached is pinned: tile 2 is decoded into scratch */
    nz_cache_ref r2 = get(&v, &g_a, 2);
    assert_null(r2.entry);
    assert_ptr_equal(r2.data, v.scratch);
    nz_cache_stats s = stats(&v);
    assert_int_equal(s.uncached, 1);
    assert_int_equal(s.evictions, 0);
    assert_int_equal(s.entries, 2);
    nz_cache_release(v.c, &r2); /* no-op for scratch refs */
    /* the pinned ones are still there, and still readable */
    assert_memory_equal(r0.data, g_a.ref[0], TILE_B);
    assert_memory_equal(r1.data, g_a.ref[1], TILE_B);
    assert_true(touch(&v, &g_a, 0));
    assert_true(touch(&v, &g_a, 1));
    ASSERT_HM(&v, 2, 3);
    /* unpin 0: tile 2 now evicts it (1 stays pinned) */
    nz_cache_release(v.c, &r0);
    assert_null(r0.entry);
    assert_true(touch(&v, &g_a, 2));
    s = stats(&v);
    assert_int_equal(s.evictions, 1);
    assert_int_equal(s.uncached, 1);
    assert_true(touch(&v, &g_a, 1)); /* still cached */
    ASSERT_HM(&v, 3, 4);
    /* a pin taken by a hit also protects: pin 2, then 3 and 4 go to scratch */
    nz_cache_ref r2b = get(&v, &g_a, 2);
    assert_non_null(r2b.entry);
    assert_false(touch(&v, &g_a, 3));
    assert_false(touch(&v, &g_a, 4));
    s = stats(&v);
    assert_int_equal(s.uncached, 3);
    assert_int_equal(s.evictions, 1);
    nz_cache_release(v.c, &r2b);
    nz_cache_release(v.c, &r1);
    env_close(&v);

    /* a tile larger than the budget never evicts anything */
    env_open(&v, TILE_B - 1);
    assert_true(touch(&v, &g_b, g_b.base[2] + 2)); /* short tile: 4 rows */
    assert_false(touch(&v, &g_a, 0));
    s = stats(&v);
    assert_int_equal(s.entries, 1);
    assert_int_equal(s.evictions, 0);
    assert_int_equal(s.uncached, 1);
    env_close(&v);
}

/* A corrupted tile fails every time, is never cached, and leaves the others
 * working. */
static void test_corrupt_tile(void **state) {
    (void)state;
    uint8_t *img = dup_exact(g_a.img, g_a.len);
    nz_model *m;
    nz_error e = {0};
    assert_int_equal(nz_model_load_buffer(img, g_a.len, &m, &e), NZ_OK);
    fixture f = g_a; /* same references, the damaged model */
    f.m = m;
    const nz_tensor *x = nz_model_tensor(m, 0);
    uint64_t doff = 0;
    for (int i = 7; i >= 0; i--) doff = doff << 8 | img[24 + i];
    uint8_t *byte = img + doff + x->tiles[2].offset + x->tiles[2].size / 2;
    *byte ^= 0x40;

    env v;
    env_open(&v, 100 * TILE_B);
    for (int k = 0; k < 3; k++) {
        nz_cache_ref r = {(const float *)1, (void *)1};
        memset(&e, 0, sizeof e);
        int rc = nz_cache_get(v.c, m, 0, 2, v.dc, v.scratch, &r, &e);
        assert_int_equal(rc, NZ_E_CHECKSUM);
        assert_int_equal(e.code, NZ_E_CHECKSUM);
        assert_non_null(strstr(e.msg, "a.w"));
        assert_non_null(strstr(e.msg, "tile 2"));
        assert_null(r.entry);
        nz_cache_stats s = stats(&v);
        assert_int_equal(s.entries, k ? 2 : 0);
        assert_int_equal(nz_mem_current(NZ_MEM_TILE_CACHE) - v.mem0, s.bytes);
        /* the other tiles still work */
        assert_true(touch(&v, &f, 1));
        assert_true(touch(&v, &f, 3));
    }
    nz_cache_stats s = stats(&v);
    assert_int_equal(s.misses, 3 + 2);
    assert_int_equal(s.tiles_decoded, 2);
    assert_int_equal(s.entries, 2);
    assert_int_equal(s.hits, 4);
    /* repaired, the tile decodes: nothing negative was remembered */
    *byte ^= 0x40;
    assert_true(touch(&v, &f, 2));
    assert_int_equal(stats(&v).entries, 3);

    /* bad indices are errors and cache nothing */
    nz_cache_ref r;
    assert_int_equal(nz_cache_get(v.c, m, 0, x->ntiles, v.dc, v.scratch, &r, &e), NZ_E_INVALID_ARG);
    assert_int_equal(nz_cache_get(v.c, m, 99, 0, v.dc, v.scratch, &r, &e), NZ_E_INVALID_ARG);
    assert_int_equal(stats(&v).entries, 3);
    nz_cache_forget_model(v.c, m);
    assert_int_equal(stats(&v).entries, 0);
    env_close(&v);
    nz_model_free(m);
    free(img);
}

/* nz_cache_set_budget evicts down; nz_cache_forget_model drops one model. */
static void test_budget_and_forget(void **state) {
    (void)state;
    env v;
    env_open(&v, g_a.bytes + g_b.bytes);
    for (size_t g = 0; g < g_a.ntiles; g++) touch(&v, &g_a, g);
    for (size_t g = 0; g < g_b.ntiles; g++) touch(&v, &g_b, g);
    nz_cache_stats s = stats(&v);
    assert_int_equal(s.entries, g_a.ntiles + g_b.ntiles);

    nz_cache_forget_model(v.c, g_a.m);
    s = stats(&v);
    assert_int_equal(s.entries, g_b.ntiles);
    assert_int_equal(s.bytes, g_b.bytes);
    uint64_t m0 = s.misses;
    assert_true(touch(&v, &g_a, 0)); /* decoded again */
    assert_int_equal(stats(&v).misses, m0 + 1);
    nz_cache_forget_model(v.c, g_a.m);

    /* shrink with a pin held: the pinned entry survives the cut */
    nz_cache_ref pinned = get(&v, &g_b, 0); /* hit; most recent */
    uint64_t ev0 = stats(&v).evictions;
    nz_cache_set_budget(v.c, 3 * TILE_B);
    s = stats(&v);
    assert_int_equal(s.budget, 3 * TILE_B);
    assert_true(s.bytes <= 3 * TILE_B);
    assert_true(s.entries <= 3);
    assert_true(s.evictions >= ev0 + g_b.ntiles - 3);
    assert_memory_equal(pinned.data, g_b.ref[0], TILE_B);
    assert_true(touch(&v, &g_b, 0)); /* still a hit */
    assert_int_equal(stats(&v).hits, s.hits + 1);

    /* shrink below the pinned tile: it stays until released, then goes */
    nz_cache_set_budget(v.c, TILE_B / 2);
    nz_cache_get_stats(v.c, &s);
    assert_int_equal(s.entries, 1);
    assert_int_equal(s.bytes, TILE_B);
    nz_cache_release(v.c, &pinned);
    s = stats(&v);
    assert_int_equal(s.entries, 0);
    assert_int_equal(s.bytes, 0);

    nz_cache_set_budget(v.c, 0);
    assert_false(touch(&v, &g_b, 1));
    nz_cache_set_budget(v.c, 4 * TILE_B);
    assert_true(touch(&v, &g_b, 1));
    assert_int_equal(stats(&v).entries, 1);
    env_close(&v); /* frees a non-empty cache: memory returns to its start */
    nz_cache_free(NULL);
}

/* Many entries: the hash table grows and every tile is still found. */
static void test_many_tiles(void **state) {
    (void)state;
    env v;
    env_open(&v, g_c.bytes);
    for (int pass = 0; pass < 2; pass++)
        for (size_t g = 0; g < g_c.ntiles; g++) assert_true(touch(&v, &g_c, g));
    nz_cache_stats s = stats(&v);
    assert_int_equal(s.misses, g_c.ntiles);
    assert_int_equal(s.hits, g_c.ntiles);
    assert_int_equal(s.entries, g_c.ntiles);
    /* reverse order after a shrink: LRU keeps the most recent half */
    nz_cache_set_budget(v.c, g_c.bytes / 2);
    s = stats(&v);
    assert_int_equal(s.entries, g_c.ntiles / 2);
    for (size_t g = g_c.ntiles; g-- > g_c.ntiles / 2;) assert_true(touch(&v, &g_c, g));
    assert_int_equal(stats(&v).hits, s.hits + g_c.ntiles / 2);
    nz_cache_forget_model(v.c, g_c.m);
    assert_int_equal(stats(&v).entries, 0);
    env_close(&v);
}

/* Without scratch, a tile that cannot be cached is an error, not a crash. */
static void test_no_scratch(void **state) {
    (void)state;
    env v;
    env_open(&v, 0);
    nz_cache_ref r;
    nz_error e = {0};
    assert_int_equal(nz_cache_get(v.c, g_a.m, 0, 0, v.dc, NULL, &r, &e), NZ_E_INVALID_ARG);
    assert_int_equal(nz_cache_get(NULL, g_a.m, 0, 0, v.dc, v.scratch, &r, &e), NZ_E_INVALID_ARG);
    nz_cache_set_budget(v.c, TILE_B);
    assert_int_equal(nz_cache_get(v.c, g_a.m, 0, 0, v.dc, NULL, &r, &e), NZ_OK); /* cached: fine */
    assert_memory_equal(r.data, g_a.ref[0], TILE_B);
    nz_cache_release(v.c, &r);
    assert_int_equal(stats(&v).entries, 1);
    env_close(&v);
}

/* ------------------------------------------------------------ concurrency */

typedef struct worker {
    nz_tile_cache *c;
    uint64_t seed;
    long iters;
    size_t budget;
    _Atomic long *gets, *bad;
} worker;

static void *work(void *arg) {
    worker *w = arg;
    nz_dctx *dc = nz_dctx_create();
    float *scratch = nz_malloc(TILE_B, NZ_MEM_SCRATCH);
    nz_cache_ref held = {0};
    size_t held_g = 0;
    const fixture *held_f = NULL;
    if (!dc || !scratch) atomic_fetch_add(w->bad, 1);
    for (long i = 0; dc && scratch && i < w->iters; i++) {
        uint64_t r = tu_rand(&w->seed);
        const fixture *f = (r & 1) ? &g_a : &g_b;
        size_t g = (size_t)((r >> 8) % f->ntiles);
        nz_cache_ref ref;
        nz_error e = {0};
        int rc = nz_cache_get(w->c, f->m, f->ti_of[g], f->t_of[g], dc, scratch, &ref, &e);
        atomic_fetch_add(w->gets, 1);
        if (rc != NZ_OK || memcmp(ref.data, f->ref[g], f->tbytes[g]) != 0) {
            atomic_fetch_add(w->bad, 1);
            continue;
        }
        /* hold every 4th cached tile across the next get (two pins at once) */
        if (held.entry) {
            if (memcmp(held.data, held_f->ref[held_g], held_f->tbytes[held_g]) != 0)
                atomic_fetch_add(w->bad, 1);
            nz_cache_release(w->c, &held);
        }
        if (ref.entry && (r >> 40) % 4 == 0) {
            held = ref;
            held_f = f;
            held_g = g;
        } else {
            nz_cache_release(w->c, &ref);
        }
        if (i % 64 == 0) {
            nz_cache_stats s;
            nz_cache_get_stats(w->c, &s);
            if (s.bytes > s.budget || s.bytes > w->budget) atomic_fetch_add(w->bad, 1);
        }
    }
    nz_cache_release(w->c, &held);
    nz_free(scratch);
    nz_dctx_free(dc);
    return NULL;
}

static void test_threads(void **state) {
    (void)state;
    int nthreads = tu_quick() ? 4 : 8;
    long iters = tu_quick() ? 300 : 20000;
    size_t budget = (g_a.bytes + g_b.bytes) / 3;
    size_t mem0 = nz_mem_current(NZ_MEM_TILE_CACHE);
    nz_tile_cache *c = nz_cache_create(budget);
    assert_non_null(c);
    _Atomic long gets = 0, bad = 0;
    pthread_t th[8];
    worker w[8];
    for (int i = 0; i < nthreads; i++) {
        w[i] = (worker){c, 0x9E3779B97F4A7C15ULL * (uint64_t)(i + 1), iters, budget, &gets, &bad};
        assert_int_equal(pthread_create(&th[i], NULL, work, &w[i]), 0);
    }
    for (int i = 0; i < nthreads; i++) pthread_join(th[i], NULL);
    assert_int_equal(atomic_load(&bad), 0);
    nz_cache_stats s;
    nz_cache_get_stats(c, &s);
    assert_int_equal(atomic_load(&gets), (long)nthreads * iters);
    assert_int_equal(s.hits + s.misses, (uint64_t)nthreads * (uint64_t)iters);
    assert_true(s.hits > 0);
    assert_true(s.evictions > 0);
    assert_true(s.bytes <= budget);
    assert_true(s.peak_bytes <= budget);
    assert_int_equal(s.tiles_decoded, s.misses);
    assert_int_equal(nz_mem_current(NZ_MEM_TILE_CACHE) - mem0, s.bytes);
    nz_cache_forget_model(c, g_a.m);
    nz_cache_forget_model(c, g_b.m);
    nz_cache_get_stats(c, &s);
    assert_int_equal(s.entries, 0);
    assert_int_equal(s.bytes, 0);
    nz_cache_free(c);
    assert_int_equal(nz_mem_current(NZ_MEM_TILE_CACHE), mem0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_budget_zero), /* first: checks the peak never rose */
        cmocka_unit_test(test_lru_order),
        cmocka_unit_test(test_budget_all),
        cmocka_unit_test(test_pinned),
        cmocka_unit_test(test_corrupt_tile),
        cmocka_unit_test(test_budget_and_forget),
        cmocka_unit_test(test_many_tiles),
        cmocka_unit_test(test_no_scratch),
        cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
