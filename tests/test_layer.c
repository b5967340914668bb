/* Layer API behaviour: binding errors, embeddings, KV cache bookkeeping,
 * incremental attention against the full computation, error propagation
 * from damaged weights and memory accounting. Numerical parity with PyTorch
 * is tests/python/test_parity.py. */
#include "test_model.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_kvslots.h"
#include "nz_layer.h"
#include "nz_pool.h"

#include <math.h>
#include <unistd.h>

#define D  32 /* d_model */
#define H  4  /* heads */
#define FF 64 /* d_ff */
#define V  50 /* vocabulary */

static uint8_t *g_img;
static size_t g_len;

/* bf16 weight [rows x cols], lossless, 8-row tiles; plus the f32 value */
static void add_w(nz_writer *w, const char *name, uint64_t rows, uint64_t cols, uint64_t *seed) {
    uint16_t *bf = xmalloc(rows * cols * sizeof *bf);
    for (uint64_t i = 0; i < rows * cols; i++) bf[i] = nz_f32_to_bf16((float)(0.2 * tu_gauss(seed)));
    tm_add_tensor(w, name, "BF16", NZ_DT_BF16, "lossless", NZ_CODER_RANS, rows, cols, 8, 2, bf);
    free(bf);
}

static void add_v(nz_writer *w, const char *name, uint64_t n, float base, uint64_t *seed) {
    float *v = xmalloc(n * sizeof *v);
    for (uint64_t i = 0; i < n; i++) v[i] = base + (float)(0.1 * tu_gauss(seed));
    tm_add_tensor(w, name, "F32", NZ_DT_F32, "raw", NZ_CODER_NONE, 1, n, 8, 1, v);
    free(v);
}

static int setup(void **state) {
    (void)state;
    char path[] = "/tmp/nz_test_layer_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    nz_writer *w;
    nz_error e = {0};
    uint64_t s = 5;
    assert_int_equal(nz_writer_create(path, &w, &e), NZ_OK);
    add_w(w, "embed.weight", V, D, &s);
    const char *proj[] = {"q_proj", "k_proj", "v_proj", "out_proj"};
    const char *att[] = {"self_attn.", "encoder_attn."};
    char name[128];
    for (int a = 0; a < 2; a++)
        for (int p = 0; p < 4; p++) {
            snprintf(name, sizeof name, "%s%s.weight", att[a], proj[p]);
            add_w(w, name, D, D, &s);
            snprintf(name, sizeof name, "%s%s.bias", att[a], proj[p]);
            add_v(w, name, D, 0, &s);
        }
    add_w(w, "fc1.weight", FF, D, &s);
    add_v(w, "fc1.bias", FF, 0, &s);
    add_w(w, "fc2.weight", D, FF, &s);
    add_v(w, "fc2.bias", D, 0, &s);
    const char *norms[] = {"self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"};
    for (int n = 0; n < 3; n++) {
        snprintf(name, sizeof name, "%s.weight", norms[n]);
        add_v(w, name, D, 1, &s);
        snprintf(name, sizeof name, "%s.bias", norms[n]);
        add_v(w, name, D, 0, &s);
    }
    for (int a = 0; a < 2; a++) { /* two residual adapters, bottleneck 8 */
        snprintf(name, sizeof name, "adapter%d.down.weight", a);
        add_w(w, name, 8, D, &s);
        snprintf(name, sizeof name, "adapter%d.down.bias", a);
        add_v(w, name, 8, 0, &s);
        snprintf(name, sizeof name, "adapter%d.up.weight", a);
        add_w(w, name, D, 8, &s);
        snprintf(name, sizeof name, "adapter%d.up.bias", a);
        add_v(w, name, D, 0, &s);
    }
    assert_int_equal(nz_writer_finish(w, &e), NZ_OK);
    g_img = tm_read_file(path, &g_len);
    unlink(path);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    free(g_img);
    return 0;
}

typedef struct env {
    uint8_t *img; /* private copy (tests may damage it) */
    nz_model *m;
    nz_tile_cache *cache;
    nz_pool *pool;
    nz_matmul_ctx *mc;
} env;

static void env_open(env *v, size_t budget, int threads) {
    nz_error e = {0};
    v->img = xmalloc(g_len);
    memcpy(v->img, g_img, g_len);
    assert_int_equal(nz_model_load_buffer(v->img, g_len, &v->m, &e), NZ_OK);
    v->cache = nz_cache_create(budget);
    v->pool = threads > 1 ? nz_pool_create(threads) : NULL;
    v->mc = nz_matmul_ctx_create(v->pool, v->cache);
    assert_non_null(v->cache);
    assert_non_null(v->mc);
}

static void env_close(env *v) {
    nz_matmul_ctx_free(v->mc);
    nz_pool_free(v->pool);
    nz_cache_forget_model(v->cache, v->m);
    nz_cache_free(v->cache);
    nz_model_free(v->m);
    free(v->img);
}

/* Damage one byte inside tile t of tensor name. */
static void damage(env *v, const char *name, uint64_t t) {
    const nz_tensor *ts = nz_model_tensor(v->m, (size_t)nz_model_find(v->m, name));
    uint64_t doff = 0;
    for (int i = 7; i >= 0; i--) doff = doff << 8 | v->img[24 + i];
    v->img[doff + ts->tiles[t].offset + ts->tiles[t].size / 2] ^= 0x10;
}

static void bind_block(env *v, nz_block *b, int pre_norm) {
    nz_error e = {0};
    static const char *const proj[4] = {"q_proj", "k_proj", "v_proj", "out_proj"};
    memset(b, 0, sizeof *b);
    b->pre_norm = pre_norm;
    b->has_cross = 1;
    assert_int_equal(nz_attn_bind(&b->self, v->m, "self_attn.", proj, 1, D, H, 0, &e), NZ_OK);
    assert_int_equal(nz_attn_bind(&b->cross, v->m, "encoder_attn.", proj, 1, D, H, 0, &e), NZ_OK);
    assert_int_equal(nz_ffn_bind(&b->ffn, v->m, NZ_ACT_RELU, "fc1.weight", "fc1.bias", NULL, "fc2.weight",
                                 "fc2.bias", D, &e),
                     NZ_OK);
    assert_int_equal(nz_norm_bind(&b->self_norm, v->m, NZ_NORM_LAYER, "self_attn_layer_norm.weight",
                                  "self_attn_layer_norm.bias", D, 1e-5f, &e),
                     NZ_OK);
    assert_int_equal(nz_norm_bind(&b->cross_norm, v->m, NZ_NORM_LAYER, "encoder_attn_layer_norm.weight",
                                  "encoder_attn_layer_norm.bias", D, 1e-5f, &e),
                     NZ_OK);
    assert_int_equal(nz_norm_bind(&b->ffn_norm, v->m, NZ_NORM_LAYER, "final_layer_norm.weight",
                                  "final_layer_norm.bias", D, 1e-5f, &e),
                     NZ_OK);
    assert_int_equal(b->self.dh, D / H);
    assert_true(fabsf(b->self.scale - 1.0f / sqrtf((float)(D / H))) < 1e-7f);
}

static void fill(float *x, size_t n, uint64_t seed) {
    for (size_t i = 0; i < n; i++) x[i] = (float)tu_gauss(&seed);
}

static float maxdiff(const float *a, const float *b, size_t n) {
    float m = 0;
    for (size_t i = 0; i < n; i++) m = fmaxf(m, fabsf(a[i] - b[i]));
    return m;
}

/* Binding checks shapes and names, with messages naming the tensor. */
static void test_bind_errors(void **state) {
    (void)state;
    env v;
    env_open(&v, 0, 1);
    nz_error e = {0};
    nz_linear l;
    float *p;
    assert_int_equal(nz_linear_bind(&l, v.m, "fc1.weight", NULL, D + 1, 0, &e), NZ_E_FORMAT);
    assert_string_equal(e.msg, "tensor 'fc1.weight' is [64 x 32], expected 33 input features (columns)");
    assert_int_equal(nz_linear_bind(&l, v.m, "fc1.bias", NULL, 0, 0, &e), NZ_E_FORMAT); /* 1-D */
    assert_int_equal(nz_linear_bind(&l, v.m, "fc1.weight", "nope.bias", D, FF, &e), NZ_E_NOT_FOUND);
    assert_string_equal(e.msg, "no tensor 'nope.bias' in the model");
    assert_int_equal(nz_param_load(v.m, "fc1.bias", FF + 1, &p, NULL, &e), NZ_E_FORMAT);
    assert_null(p);
    nz_ffn f;
    assert_int_equal(
        nz_ffn_bind(&f, v.m, NZ_ACT_GATED_GELU, "fc1.weight", NULL, NULL, "fc2.weight", NULL, D, &e),
        NZ_E_INVALID_ARG);
    nz_attn a;
    static const char *const bad[4] = {"q_proj", "k_proj", "v_proj", "o_proj"};
    assert_int_equal(nz_attn_bind(&a, v.m, "self_attn.", bad, 1, D, H, 0, &e), NZ_E_NOT_FOUND);
    assert_string_equal(e.msg, "no tensor 'self_attn.o_proj.weight' in the model");
    static const char *const good[4] = {"q_proj", "k_proj", "v_proj", "out_proj"};
    assert_int_equal(nz_attn_bind(&a, v.m, "self_attn.", good, 1, D, 5, 0, &e), NZ_E_FORMAT);
    env_close(&v);
    /* every failed bind freed what it had loaded */
    assert_int_equal(nz_mem_current(NZ_MEM_WEIGHTS), 0);
}

/* Embedding rows equal the decoded rows times the scale, through any cache;
 * an id outside the vocabulary is refused by name. */
static void test_embed(void **state) {
    (void)state;
    size_t budgets[] = {0, (size_t)1 << 20};
    int32_t ids[] = {3, 49, 0, 3, 17, 8, 9, 48};
    const size_t M = sizeof ids / sizeof *ids;
    float *E = NULL;
    for (int bi = 0; bi < 2; bi++) {
        env v;
        env_open(&v, budgets[bi], 1);
        nz_error e = {0};
        nz_weight w;
        assert_int_equal(nz_weight_bind(&w, v.m, "embed.weight", &e), NZ_OK);
        if (!E) assert_int_equal(nz_param_load(v.m, "embed.weight", V * D, &E, NULL, &e), NZ_OK);
        float out[M * D];
        assert_int_equal(nz_embed(v.mc, &w, ids, M, 2.5f, out, &e), NZ_OK);
        for (size_t i = 0; i < M; i++)
            for (int d = 0; d < D; d++) assert_true(out[i * D + d] == 2.5f * E[ids[i] * D + d]);
        int32_t bad[] = {1, 50};
        assert_int_equal(nz_embed(v.mc, &w, bad, 2, 1.0f, out, &e), NZ_E_RANGE);
        assert_string_equal(e.msg, "token id 50 at position 1 is outside the vocabulary [0, 50)");
        bad[1] = -1;
        assert_int_equal(nz_embed(v.mc, &w, bad, 2, 1.0f, out, &e), NZ_E_RANGE);
        env_close(&v);
    }
    nz_free(E);
}

/* KV cache: capacity and reorder bookkeeping. */
static void test_kv(void **state) {
    (void)state;
    nz_error e = {0};
    nz_kv kv;
    assert_int_equal(nz_kv_init(&kv, 0, 4, 8, &e), NZ_E_INVALID_ARG);
    assert_int_equal(nz_kv_init(&kv, 3, 4, 2, &e), NZ_OK);
    assert_true(nz_mem_current(NZ_MEM_KV) >= 2 * 3 * 4 * 2 * sizeof(float));
    kv.len = 2;
    for (size_t b = 0; b < 3; b++)
        for (size_t i = 0; i < 2 * 2; i++) {
            kv.k[b * 4 * 2 + i] = (float)(10 * b + i);
            kv.v[b * 4 * 2 + i] = -(float)(10 * b + i);
        }
    kv.pad[1 * 4 + 1] = 1;
    uint32_t src[] = {1, 1, 0};
    assert_int_equal(nz_kv_reorder(&kv, src, &e), NZ_OK);
    for (size_t b = 0; b < 3; b++)
        for (size_t i = 0; i < 4; i++) {
            assert_true(kv.k[b * 8 + i] == (float)(10 * src[b] + i));
            assert_true(kv.v[b * 8 + i] == -(float)(10 * src[b] + i));
        }
    assert_int_equal(kv.pad[0 * 4 + 1], 1);
    assert_int_equal(kv.pad[1 * 4 + 1], 1);
    assert_int_equal(kv.pad[2 * 4 + 1], 0);
    uint32_t badsrc[] = {0, 3, 1};
    assert_int_equal(nz_kv_reorder(&kv, badsrc, &e), NZ_E_RANGE);
    /* keep 2 of the 3 sequences: new 0 = row 2 (values of the first cache row 0), new 1 = row 0 (row 1) */
    uint32_t keep[] = {2, 0};
    assert_int_equal(nz_kv_select(&kv, keep, 2, &e), NZ_OK);
    assert_int_equal(kv.B, 2);
    for (size_t i = 0; i < 4; i++) {
        assert_true(kv.k[0 * 8 + i] == (float)(10 * 0 + i));
        assert_true(kv.k[1 * 8 + i] == (float)(10 * 1 + i));
    }
    assert_int_equal(nz_kv_select(&kv, keep, 3, &e), NZ_E_RANGE); /* cannot grow */
    keep[1] = 2;
    assert_int_equal(nz_kv_select(&kv, keep, 2, &e), NZ_E_RANGE); /* old row 2 no longer exists */
    nz_kv_free(&kv);
    nz_kv_free(&kv); /* idempotent */
    assert_int_equal(nz_mem_current(NZ_MEM_KV), 0);
}

/* Slots of a continuously batched decoder: a slot taken at P has [0, P) padded; a permutation of some
 * slots copies keys, values, padding and start from the slots as they were; the slide keeps them. */
static void test_kvself_slots(void **state) {
    (void)state;
    nz_error e = {0};
    nz_kvself s = {0};
    assert_int_equal(nz_kvself_init(&s, 2, 2, 4, &e), NZ_OK);
    uint32_t a, b, c;
    assert_int_equal(nz_kvself_take(&s, &a, &e), NZ_OK);
    for (size_t l = 0; l < 2; l++) s.kv[l].len = 1; /* one step written */
    assert_int_equal(nz_kvself_take(&s, &b, &e), NZ_OK);
    assert_int_equal(nz_kvself_take(&s, &c, &e), NZ_OK);
    assert_int_equal(nz_kvself_start(&s, a), 0);
    assert_int_equal(nz_kvself_start(&s, b), 1);
    for (size_t l = 0; l < 2; l++) {
        nz_kv *kv = &s.kv[l];
        kv->len = 2;
        const uint32_t sl[3] = {a, b, c};
        for (size_t i = 0; i < 3; i++)
            for (size_t t = 0; t < 2 * 2; t++) {
                kv->k[sl[i] * kv->cap * 2 + t] = (float)(100 * l + 10 * i + t);
                kv->v[sl[i] * kv->cap * 2 + t] = -(float)(100 * l + 10 * i + t);
            }
        assert_int_equal(kv->pad[b * kv->cap + 0], 1);
        assert_int_equal(kv->pad[a * kv->cap + 0], 0);
    }
    const uint32_t slots[3] = {a, b, c}, src[3] = {1, 0, 0}; /* a <- b, b <- a, c <- a */
    assert_int_equal(nz_kvself_permute(&s, slots, src, 3, &e), NZ_OK);
    const size_t from[3] = {1, 0, 0};
    for (size_t l = 0; l < 2; l++) {
        const nz_kv *kv = &s.kv[l];
        for (size_t i = 0; i < 3; i++) {
            for (size_t t = 0; t < 2 * 2; t++) {
                assert_true(kv->k[slots[i] * kv->cap * 2 + t] == (float)(100 * l + 10 * from[i] + t));
                assert_true(kv->v[slots[i] * kv->cap * 2 + t] == -(float)(100 * l + 10 * from[i] + t));
            }
            assert_int_equal(kv->pad[slots[i] * kv->cap], from[i] == 1);
        }
    }
    assert_int_equal(nz_kvself_start(&s, a), 1);
    assert_int_equal(nz_kvself_start(&s, b), 0);
    assert_int_equal(nz_kvself_start(&s, c), 0);
    assert_true(nz_mem_current(NZ_MEM_KV) > 0);
    nz_kvself_free(&s);
    nz_kvself_free(&s);
    assert_int_equal(nz_mem_current(NZ_MEM_KV), 0);
}

/* nz_kvself_bound / nz_kvenc_bound: computed before the caches grow, they hold the peak of the growth
 * (slots doubling, positions doubling, a permute) and give the capacities reached. */
static void test_kvslots_bound(void **state) {
    (void)state;
    nz_error e = {0};
    nz_kvself s = {0};
    assert_int_equal(nz_kvself_init(&s, 3, 4, 4, &e), NZ_OK);
    size_t rcap, tcap;
    const double bound = nz_kvself_bound(&s, 20, 37, 3, &rcap, &tcap);
    assert_int_equal(rcap, 32);
    assert_int_equal(tcap, 64);
    const size_t base = nz_mem_current(NZ_MEM_KV) + nz_mem_current(NZ_MEM_ACTIVATIONS);
    nz_mem_window_begin(NZ_MEM_MASK(NZ_MEM_ACTIVATIONS) | NZ_MEM_MASK(NZ_MEM_KV));
    uint32_t slot[20];
    for (size_t p = 0; p < 37; p++) { /* slot 0 runs all 37 positions: the caches grow instead of sliding */
        if (p < 20) assert_int_equal(nz_kvself_take(&s, &slot[p], &e), NZ_OK);
        assert_int_equal(nz_kvself_room(&s, &e), NZ_OK);
        for (size_t l = 0; l < 3; l++) s.kv[l].len++;
    }
    const uint32_t src[3] = {2, 0, 1};
    assert_int_equal(nz_kvself_permute(&s, slot, src, 3, &e), NZ_OK);
    assert_int_equal(s.rcap, rcap);
    assert_int_equal(s.tcap, tcap);
    const double peak = (double)base + (double)nz_mem_window_peak();
    assert_true(peak <= bound);
    assert_true(bound <= 1.2 * peak);
    nz_mem_window_end();
    assert_true(nz_kvself_bound(&s, 20, 37, 3, NULL, NULL) <= bound); /* grown: no resize left */
    nz_kvself_free(&s);

    nz_kvenc c = {0};
    assert_int_equal(nz_kvenc_init(&c, 2, 4, &e), NZ_OK);
    uint32_t es[7];
    size_t ecap;
    const double b1 = nz_kvenc_bound(&c, 3, 5, &ecap);
    assert_int_equal(ecap, 3); /* the first take: exactly its slots */
    assert_int_equal(nz_kvenc_take(&c, 3, 5, es, &e), NZ_OK);
    nz_kvenc_give(&c, es[1]);
    const double b2 = nz_kvenc_bound(&c, 6, 9, &ecap); /* 2 in use + 4 more */
    assert_int_equal(ecap, 6);
    const size_t base2 = nz_mem_current(NZ_MEM_KV) + nz_mem_current(NZ_MEM_ACTIVATIONS);
    assert_true((double)base2 <= b1);
    nz_mem_window_begin(NZ_MEM_MASK(NZ_MEM_ACTIVATIONS) | NZ_MEM_MASK(NZ_MEM_KV));
    assert_int_equal(nz_kvenc_take(&c, 4, 9, es + 3, &e), NZ_OK);
    assert_int_equal(c.ecap, 6);
    assert_true((double)base2 + (double)nz_mem_window_peak() <= b2);
    nz_mem_window_end();
    nz_kvenc_free(&c);
    assert_int_equal(nz_mem_current(NZ_MEM_KV), 0);
}

/* A causal decoder block run one position at a time with KV caches gives
 * the same output as the full causal block (fp32, 1e-5), pre- and
 * post-norm, 1 and 2 threads, cache 0 and full; a full cache is refused. */
static void test_incremental_matches_full(void **state) {
    (void)state;
    enum { B = 3, T = 6, S = 5 };
    float x[B * T * D], enc[B * S * D], full[B * T * D], step[B * T * D];
    uint8_t enc_pad[B * S] = {0};
    enc_pad[1 * S + 4] = enc_pad[1 * S + 3] = 1; /* row 1: 3 source tokens */
    fill(x, B * T * D, 1);
    fill(enc, B * S * D, 2);
    for (int pre = 0; pre < 2; pre++)
        for (int cfg = 0; cfg < 2; cfg++) {
            env v;
            env_open(&v, cfg ? (size_t)1 << 20 : 0, cfg ? 2 : 1);
            nz_block b;
            bind_block(&v, &b, pre);
            nz_error e = {0};
            nz_kv ckv, skv;
            assert_int_equal(nz_kv_init(&ckv, B, S, D, &e), NZ_OK);
            assert_int_equal(nz_attn_cross_kv(v.mc, &b.cross, enc, B, S, enc_pad, &ckv, &e), NZ_OK);
            nz_block_io io = {.B = B, .T = T, .causal = 1, .cross_kv = &ckv};
            memcpy(full, x, sizeof x);
            assert_int_equal(nz_block_fwd(v.mc, &b, full, &io, &e), NZ_OK);

            assert_int_equal(nz_kv_init(&skv, B, T, D, &e), NZ_OK);
            for (int t = 0; t < T; t++) {
                float xt[B * D];
                for (int r = 0; r < B; r++) memcpy(xt + r * D, x + (r * T + t) * D, D * sizeof(float));
                nz_block_io st = {.B = B, .T = 1, .causal = 1, .self_kv = &skv, .cross_kv = &ckv};
                assert_int_equal(nz_block_fwd(v.mc, &b, xt, &st, &e), NZ_OK);
                for (int r = 0; r < B; r++) memcpy(step + (r * T + t) * D, xt + r * D, D * sizeof(float));
            }
            assert_int_equal(skv.len, T);
            float md = maxdiff(full, step, B * T * D);
            if (md > 1e-5f) fail_msg("pre_norm %d cfg %d: incremental vs full max diff %g", pre, cfg, md);
            /* the cache is full now */
            float xt[B * D];
            nz_block_io st = {.B = B, .T = 1, .causal = 1, .self_kv = &skv, .cross_kv = &ckv};
            assert_int_equal(nz_block_fwd(v.mc, &b, xt, &st, &e), NZ_E_RANGE);
            assert_string_equal(e.msg, "KV cache full: 6 + 1 positions > capacity 6");
            nz_kv_free(&skv);
            nz_kv_free(&ckv);
            nz_block_free(&b);
            env_close(&v);
        }
}

/* kv_map: query rows sharing one encoder row equal the same queries run
 * with that row replicated. */
static void test_cross_kv_map(void **state) {
    (void)state;
    env v;
    env_open(&v, 0, 1);
    nz_block b;
    bind_block(&v, &b, 0);
    nz_error e = {0};
    enum { S = 4, T = 3 };
    float enc[2 * S * D], x[4 * T * D], a[4 * T * D], c[4 * T * D];
    fill(enc, 2 * S * D, 7);
    fill(x, 4 * T * D, 8);
    uint32_t map[4] = {1, 0, 1, 1};
    float rep[4 * S * D];
    for (int r = 0; r < 4; r++) memcpy(rep + r * S * D, enc + map[r] * S * D, S * D * sizeof(float));
    nz_kv k2, k4;
    assert_int_equal(nz_kv_init(&k2, 2, S, D, &e), NZ_OK);
    assert_int_equal(nz_kv_init(&k4, 4, S, D, &e), NZ_OK);
    assert_int_equal(nz_attn_cross_kv(v.mc, &b.cross, enc, 2, S, NULL, &k2, &e), NZ_OK);
    assert_int_equal(nz_attn_cross_kv(v.mc, &b.cross, rep, 4, S, NULL, &k4, &e), NZ_OK);
    assert_int_equal(nz_attn_cross(v.mc, &b.cross, x, 4, T, &k2, map, NULL, a, &e), NZ_OK);
    assert_int_equal(nz_attn_cross(v.mc, &b.cross, x, 4, T, &k4, NULL, NULL, c, &e), NZ_OK);
    /* the same bits: the projections of 8 and 16 rows are row-invariant (nz_gemm.h) */
    if (memcmp(a, c, sizeof a)) fail_msg("kv_map vs replicated rows: max diff %g", maxdiff(a, c, 4 * T * D));
    map[2] = 2;
    assert_int_equal(nz_attn_cross(v.mc, &b.cross, x, 4, T, &k2, map, NULL, a, &e), NZ_E_RANGE);
    nz_kv_free(&k2);
    nz_kv_free(&k4);
    nz_block_free(&b);
    env_close(&v);
}

/* A damaged FFN tile: the block returns the checksum error naming the
 * tensor, every time, and nothing leaks; other weights keep working. */
static void test_damaged_weight(void **state) {
    (void)state;
    for (int cfg = 0; cfg < 2; cfg++) {
        size_t act0 = nz_mem_current(NZ_MEM_ACTIVATIONS);
        env v;
        env_open(&v, cfg ? (size_t)1 << 20 : 0, cfg ? 2 : 1);
        nz_block b;
        bind_block(&v, &b, 1);
        damage(&v, "fc2.weight", 1);
        nz_error e = {0};
        enum { B = 2, T = 3 };
        float x[B * T * D], enc[B * T * D];
        fill(enc, B * T * D, 3);
        nz_kv ckv;
        assert_int_equal(nz_kv_init(&ckv, B, T, D, &e), NZ_OK);
        assert_int_equal(nz_attn_cross_kv(v.mc, &b.cross, enc, B, T, NULL, &ckv, &e), NZ_OK);
        nz_block_io io = {.B = B, .T = T, .cross_kv = &ckv};
        for (int rep = 0; rep < 2; rep++) {
            fill(x, B * T * D, 4);
            assert_int_equal(nz_block_fwd(v.mc, &b, x, &io, &e), NZ_E_CHECKSUM);
            assert_string_equal(e.msg, "tensor 'fc2.weight' tile 1: checksum mismatch");
            assert_int_equal(nz_mem_current(NZ_MEM_ACTIVATIONS), act0);
        }
        /* attention alone still works */
        float out[B * T * D];
        assert_int_equal(nz_attn_self(v.mc, &b.self, x, B, T, NULL, 0, NULL, NULL, out, &e), NZ_OK);
        nz_kv_free(&ckv);
        nz_block_free(&b);
        env_close(&v);
    }
}

/* Forward temporaries are activations, freed before the call returns;
 * small parameters are weights, freed with their layer. */
static void test_memory_categories(void **state) {
    (void)state;
    size_t w0 = nz_mem_current(NZ_MEM_WEIGHTS), a0 = nz_mem_current(NZ_MEM_ACTIVATIONS);
    env v;
    env_open(&v, 0, 1);
    nz_block b;
    bind_block(&v, &b, 0);
    /* 8 attention biases + 2 FFN biases + 3 norms x 2 vectors, fp32 */
    assert_true(nz_mem_current(NZ_MEM_WEIGHTS) - w0 >= (8 * D + FF + D + 6 * D) * sizeof(float));
    nz_error e = {0};
    float x[2 * 4 * D];
    fill(x, 2 * 4 * D, 9);
    nz_kv ckv;
    assert_int_equal(nz_kv_init(&ckv, 2, 4, D, &e), NZ_OK);
    assert_int_equal(nz_attn_cross_kv(v.mc, &b.cross, x, 2, 4, NULL, &ckv, &e), NZ_OK);
    nz_block_io io = {.B = 2, .T = 4, .cross_kv = &ckv};
    assert_int_equal(nz_block_fwd(v.mc, &b, x, &io, &e), NZ_OK);
    assert_int_equal(nz_mem_current(NZ_MEM_ACTIVATIONS), a0);
    assert_true(nz_mem_peak(NZ_MEM_ACTIVATIONS) > a0);
    nz_kv_free(&ckv);
    nz_block_free(&b);
    env_close(&v);
    assert_int_equal(nz_mem_current(NZ_MEM_WEIGHTS), w0);
}

static void bind_adapter(env *v, nz_adapter *ad, int i) {
    char dw[64], db[64], uw[64], ub[64];
    snprintf(dw, sizeof dw, "adapter%d.down.weight", i);
    snprintf(db, sizeof db, "adapter%d.down.bias", i);
    snprintf(uw, sizeof uw, "adapter%d.up.weight", i);
    snprintf(ub, sizeof ub, "adapter%d.up.bias", i);
    nz_error e = {0};
    assert_int_equal(nz_adapter_bind(ad, v->m, dw, db, uw, ub, D, &e), NZ_OK);
}

/* Several decoders in one call: groups of sequences with their own adapter
 * (or none) give what each group gives run alone with b->adapter. */
static void test_adapter_groups(void **state) {
    (void)state;
    env v;
    env_open(&v, 0, 1);
    nz_block b;
    bind_block(&v, &b, 1);
    nz_adapter ad[2];
    bind_adapter(&v, &ad[0], 0);
    bind_adapter(&v, &ad[1], 1);
    nz_error e = {0};
    enum { G = 3, GB = 2, T = 4, S = 3 };
    float enc[S * D], x[G * GB * T * D], y[G * GB * T * D];
    fill(enc, S * D, 11);
    fill(x, G * GB * T * D, 12);
    memcpy(y, x, sizeof x);
    nz_kv ckv;
    assert_int_equal(nz_kv_init(&ckv, 1, S, D, &e), NZ_OK);
    assert_int_equal(nz_attn_cross_kv(v.mc, &b.cross, enc, 1, S, NULL, &ckv, &e), NZ_OK);
    uint32_t map[G * GB] = {0};
    const nz_adapter *const groups[G] = {&ad[1], NULL, &ad[0]};
    nz_block_io io = {
        .B = G * GB, .T = T, .causal = 1, .cross_kv = &ckv, .kv_map = map, .adapters = groups, .group_B = GB};
    assert_int_equal(nz_block_fwd(v.mc, &b, x, &io, &e), NZ_OK);
    for (int g = 0; g < G; g++) {
        b.adapter = (nz_adapter *)groups[g];
        nz_block_io one = {.B = GB, .T = T, .causal = 1, .cross_kv = &ckv, .kv_map = map};
        float *yg = y + g * GB * T * D;
        assert_int_equal(nz_block_fwd(v.mc, &b, yg, &one, &e), NZ_OK);
        float md = maxdiff(yg, x + g * GB * T * D, GB * T * D);
        if (md > 1e-5f) /* sgemm over 24 vs 8 rows may block (round) differently */
            fail_msg("group %d: batched vs alone max diff %g", g, md);
    }
    /* the adapter really changes the output */
    assert_true(maxdiff(x, x + 2 * GB * T * D, GB * T * D) > 1e-3f);
    io.group_B = 4; /* 6 sequences do not split into groups of 4 */
    assert_int_equal(nz_block_fwd(v.mc, &b, x, &io, &e), NZ_E_INVALID_ARG);
    b.adapter = NULL;
    nz_adapter_free(&ad[0]);
    nz_adapter_free(&ad[1]);
    nz_kv_free(&ckv);
    nz_block_free(&b);
    env_close(&v);
}

/* Batch invariance of a whole block (self-attention with padding, causal or
 * not, cross-attention over a padded encoder, FFN, norms; pre- and
 * post-norm; decode-every-use on one thread and a tile cache on two): a
 * sequence of L positions over an encoder output of S gives bit-identical
 * outputs alone (B = 1, nothing padded) and as row 1 of a batch of 3 padded
 * to T > L positions and SP > S encoder positions, the other rows and the
 * padded positions random. */
static void test_block_batch_invariant(void **state) {
    (void)state;
    enum { L = 4, S = 3, B = 3, T = 7, SP = 6 };
    float x1[L * D], enc1[S * D], out1[L * D], x[B * T * D], enc[B * SP * D];
    uint8_t self_pad[B * T], enc_pad[B * SP];
    fill(x1, L * D, 11);
    fill(enc1, S * D, 12);
    uint64_t seed = 13;
    for (int pre = 0; pre < 2; pre++)
        for (int cfg = 0; cfg < 4; cfg++) {
            const int cached = cfg & 1, causal = cfg >> 1;
            env v;
            env_open(&v, cached ? (size_t)1 << 20 : 0, cached ? 2 : 1);
            nz_block b;
            bind_block(&v, &b, pre);
            nz_error e = {0};
            nz_kv ckv;
            /* alone */
            assert_int_equal(nz_kv_init(&ckv, 1, S, D, &e), NZ_OK);
            assert_int_equal(nz_attn_cross_kv(v.mc, &b.cross, enc1, 1, S, NULL, &ckv, &e), NZ_OK);
            nz_block_io io = {.B = 1, .T = L, .causal = causal, .cross_kv = &ckv};
            memcpy(out1, x1, sizeof x1);
            assert_int_equal(nz_block_fwd(v.mc, &b, out1, &io, &e), NZ_OK);
            nz_kv_free(&ckv);
            /* in a padded batch */
            fill(x, B * T * D, tu_rand(&seed));
            fill(enc, B * SP * D, tu_rand(&seed));
            for (int i = 0; i < B * T; i++) self_pad[i] = i % T >= T - 1 - i / T; /* rows 0, 1, 2: 6, 5, 4 */
            for (int i = 0; i < B * SP; i++) enc_pad[i] = i % SP >= SP - i / SP;  /* rows 0, 1, 2: 6, 5, 4 */
            for (int t = 0; t < T; t++) self_pad[T + t] = t >= L;
            for (int j = 0; j < SP; j++) enc_pad[SP + j] = j >= S;
            memcpy(x + T * D, x1, sizeof x1);
            memcpy(enc + SP * D, enc1, sizeof enc1);
            assert_int_equal(nz_kv_init(&ckv, B, SP, D, &e), NZ_OK);
            assert_int_equal(nz_attn_cross_kv(v.mc, &b.cross, enc, B, SP, enc_pad, &ckv, &e), NZ_OK);
            nz_block_io iob = {.B = B, .T = T, .self_pad = self_pad, .causal = causal, .cross_kv = &ckv};
            assert_int_equal(nz_block_fwd(v.mc, &b, x, &iob, &e), NZ_OK);
            if (memcmp(x + T * D, out1, sizeof out1))
                fail_msg("pre_norm %d cached %d causal %d: padded in a batch, max diff %g", pre, cached,
                         causal, maxdiff(x + T * D, out1, L * D));
            nz_kv_free(&ckv);
            nz_block_free(&b);
            env_close(&v);
        }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bind_errors),
        cmocka_unit_test(test_embed),
        cmocka_unit_test(test_kv),
        cmocka_unit_test(test_kvself_slots),
        cmocka_unit_test(test_kvslots_bound),
        cmocka_unit_test(test_incremental_matches_full),
        cmocka_unit_test(test_cross_kv_map),
        cmocka_unit_test(test_damaged_weight),
        cmocka_unit_test(test_memory_categories),
        cmocka_unit_test(test_adapter_groups),
        cmocka_unit_test(test_block_batch_invariant),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
