/* Peak memory estimates against measured peaks: nz_translator_peak_bytes and
 * nz_dialogue_peak_bytes / nz_dialogue_batch_peak_bytes (the formulas in models/nz_nat.c and
 * models/nz_t5md.c) on small random models of both families, measured with
 * the allocator's window (nz_mem_window_begin over activations + KV + other)
 * around nz_translator_run_ids / nz_dialogue_run_ids / nz_dialogue_run_batch with tile cache budget
 * 0: measured <= estimate <= 1.3 x measured + 256 KiB for every shape; the
 * ratios are printed. Also the window itself and the estimates' cheapness.
 *
 * The random translators' length predictor is built to pick its largest
 * class (the last encoder layer norm's output is a positive constant, the
 * class's embed_length row a positive vector): the candidates then have the
 * longest length the estimate must allow for, so every other term is
 * checked to 1.3x. A model predicting shorter lengths gets a looser bound
 * (the demo numbers below).
 *
 * NZ_TEST_QUICK=1 (valgrind) runs small shapes only. NZ_TEST_DEMO_MEM=1
 * also measures the shipped demo models (models/demo: nat-ende.nzp,
 * dialogue.nzp; run from the repository root; about 40 s) and prints
 * measured vs estimated bytes, asserting only the upper bound (the demo
 * translator predicts much shorter lengths than the longest it could). */
#include "test_model.h"
#include "test_randmodel.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_dialogue.h"
#include "nz_pool.h"
#include "nz_translator.h"

#include <jansson.h>
#include <stdio.h>
#include <unistd.h>

#define WINDOW (NZ_MEM_MASK(NZ_MEM_ACTIVATIONS) | NZ_MEM_MASK(NZ_MEM_KV) | NZ_MEM_MASK(NZ_MEM_OTHER))
#define SLACK  (256.0 * 1024)

static double g_lo = 1e9, g_hi = 0; /* ratio range seen (shapes above the slack) */

/* ------------------------------------------------------------ engine context */

typedef struct env {
    nz_tile_cache *cache;
    nz_pool *pool;
    nz_matmul_ctx *mc;
} env;

static void env_open(env *v, int threads) {
    v->cache = nz_cache_create(0);
    v->pool = threads > 1 ? nz_pool_create(threads) : NULL;
    v->mc = nz_matmul_ctx_create(v->pool, v->cache);
    assert_non_null(v->cache);
    assert_non_null(v->mc);
}

static void env_close(env *v) {
    nz_matmul_ctx_free(v->mc);
    nz_pool_free(v->pool);
    nz_cache_free(v->cache);
}

/* Check and print one shape; strict: the 1.3x bound too (else only measured <= estimate). */
static void check(const char *label, size_t measured, uint64_t est, int strict) {
    const double r = measured ? (double)est / (double)measured : 0;
    printf("  %-58s measured %10zu  estimate %10llu  ratio %.3f\n", label, measured, (unsigned long long)est,
           r);
    if (measured > SLACK) {
        if (r < g_lo) g_lo = r;
        if (r > g_hi) g_hi = r;
    }
    if (measured > est)
        fail_msg("%s: measured %zu > estimate %llu", label, measured, (unsigned long long)est);
    if (strict && (double)est > 1.3 * (double)measured + SLACK)
        fail_msg("%s: estimate %llu > 1.3 x measured %zu + 256 KiB", label, (unsigned long long)est,
                 measured);
}

/* ------------------------------------------------------------ window */

static void test_window(void **state) {
    (void)state;
    nz_mem_window_begin(NZ_MEM_MASK(NZ_MEM_ACTIVATIONS) | NZ_MEM_MASK(NZ_MEM_KV));
    assert_int_equal(nz_mem_window_peak(), 0);
    void *a = nz_malloc(1000, NZ_MEM_ACTIVATIONS);
    void *k = nz_malloc(500, NZ_MEM_KV);
    void *o = nz_malloc(7000, NZ_MEM_OTHER); /* not in the mask */
    assert_int_equal(nz_mem_window_peak(), 1500);
    nz_free(a);
    void *b = nz_malloc(800, NZ_MEM_ACTIVATIONS);
    assert_int_equal(nz_mem_window_peak(), 1500); /* 1300 now */
    void *c = nz_malloc(300, NZ_MEM_ACTIVATIONS);
    assert_int_equal(nz_mem_window_peak(), 1600);
    /* a new window starts from the current sum; freeing older blocks goes below it */
    nz_mem_window_begin(NZ_MEM_MASK(NZ_MEM_ACTIVATIONS));
    nz_free(b);
    assert_int_equal(nz_mem_window_peak(), 0);
    void *d = nz_malloc(1000, NZ_MEM_ACTIVATIONS);
    assert_int_equal(nz_mem_window_peak(), 200);
    nz_mem_window_end();
    void *e = nz_malloc(5000, NZ_MEM_ACTIVATIONS);
    assert_int_equal(nz_mem_window_peak(), 200); /* closed: kept */
    void *f = nz_realloc(k, 4000);               /* keeps its category (KV) */
    nz_mem_window_begin(NZ_MEM_MASK(NZ_MEM_KV));
    f = nz_realloc(f, 6000); /* the new block is counted before the old one is freed */
    assert_int_equal(nz_mem_window_peak(), 6000);
    nz_mem_window_begin(0);
    assert_int_equal(nz_mem_window_peak(), 0);
    nz_free(c);
    nz_free(d);
    nz_free(e);
    nz_free(f);
    nz_free(o);
    nz_mem_window_end();
}

/* ------------------------------------------------------------ translators */

/* n sources, the longest maxlen ids ([bos, x.., eos]), the others spread down to 5. */
static void make_sources(uint64_t *seed, size_t V, size_t n, size_t maxlen, int32_t **ids, size_t *lens) {
    for (size_t i = 0; i < n; i++) {
        lens[i] = n == 1 ? maxlen : 5 + (maxlen - 5) * (n - 1 - i) / (n - 1);
        ids[i] = xmalloc(lens[i] * sizeof **ids);
        for (size_t j = 0; j < lens[i]; j++) ids[i][j] = 4 + (int32_t)(tu_rand(seed) % (V - 4));
        ids[i][0] = 0;
        ids[i][lens[i] - 1] = 2;
    }
}

typedef struct tr_case {
    int at;          /* 0 mask-predict, else the AT beam (1 = greedy) */
    int iter, lbeam; /* mask-predict */
    int rerank, adaptive;
    int max_length; /* > 0: the max_length choice (NAT cap, AT max_len) */
    size_t n, maxlen;
} tr_case;

/* Run one shape: estimate (checked to allocate nothing), measure, compare. */
static void run_translate(env *v, const nz_translator *t, const tr_case *c, uint64_t seed, int strict,
                          const char *model) {
    nz_tr_opts o;
    nz_tr_opts_default(&o);
    nz_tr_choice ch;
    nz_tr_choice_init(&ch);
    ch.decoder = c->at > 0;
    if (!c->at) {
        ch.iterations = c->iter;
        ch.length_beam = c->lbeam;
        ch.rerank = c->rerank;
        ch.adaptive = c->adaptive;
    }
    ch.beam_size = c->at > 0 ? c->at : 1;
    if (c->max_length > 0) ch.max_length = c->max_length;
    nz_error e = {0};
    assert_int_equal(nz_tr_choice_apply(&ch, &o, &e), NZ_OK);
    int32_t **ids = xmalloc(c->n * sizeof *ids);
    size_t *lens = xmalloc(c->n * sizeof *lens);
    make_sources(&seed, nz_nat_get_config(nz_translator_nat(t))->vocab, c->n, c->maxlen, ids, lens);

    nz_mem_window_begin(WINDOW);
    const uint64_t est = nz_translator_peak_bytes(t, lens, c->n, &o);
    assert_int_equal(nz_mem_window_peak(), 0); /* no allocation */
    nz_tr_result *res = xmalloc(c->n * sizeof *res);
    nz_mem_window_begin(WINDOW);
    int rc = nz_translator_run_ids(v->mc, t, (const int32_t *const *)ids, lens, c->n, &o, 1, res, &e);
    const size_t measured = nz_mem_window_peak();
    nz_mem_window_end();
    if (rc) fail_msg("translate: %s", e.msg);
    for (size_t i = 0; i < c->n; i++)
        if (res[i].rc) fail_msg("translate text %zu: %s", i, res[i].err.msg);
    nz_tr_results_free(res, c->n);
    free(res);
    char label[160];
    if (c->at)
        snprintf(label, sizeof label, "%s AT %s%.0d n=%zu len<=%zu max=%d", model,
                 c->at > 1 ? "beam " : "greedy", c->at > 1 ? c->at : 0, c->n, c->maxlen, c->max_length);
    else
        snprintf(label, sizeof label, "%s NAT it=%d lb=%d%s%s n=%zu len<=%zu%s", model, c->iter, c->lbeam,
                 c->rerank ? " rerank" : "", c->adaptive ? " adaptive" : "", c->n, c->maxlen,
                 c->max_length > 0 ? " capped" : "");
    check(label, measured, est, strict);
    for (size_t i = 0; i < c->n; i++) free(ids[i]);
    free(ids);
    free(lens);
}

static void translate_model(const nat_spec *s, const char *tag, const tr_case *cases, size_t ncases,
                            uint64_t seed) {
    char path[64];
    nat_write(s, seed, path, sizeof path);
    nz_translator *t = NULL;
    nz_error e = {0};
    if (nz_translator_open(path, &t, &e)) fail_msg("%s", e.msg);
    printf("translator %s\n", s->name);
    env v;
    env_open(&v, 2);
    for (size_t i = 0; i < ncases; i++) run_translate(&v, t, &cases[i], seed + i, 1, tag);
    env_close(&v);
    nz_translator_free(t);
    unlink(path);
}

static void test_translate(void **state) {
    (void)state;
    static const tr_case A[] = {
        /* at, iter, lbeam, rerank, adaptive, max_length, n, maxlen */
        {0, 0, 1, 0, 0, 0, 1, 20},   {0, 2, 3, 0, 0, 0, 4, 40},   {0, 10, 3, 0, 0, 0, 4, 64},
        {0, 2, 8, 0, 0, 0, 16, 64},  {0, 2, 3, 1, 0, 0, 4, 48},   {0, 10, 8, 0, 0, 24, 1, 64},
        {0, 0, 8, 0, 1, 0, 16, 40},  {0, 2, 1, 0, 0, 0, 16, 64},  {0, 0, 3, 1, 0, 30, 16, 30},
        {1, 0, 0, 0, 0, 16, 1, 20},  {1, 0, 0, 0, 0, 32, 16, 64}, {4, 0, 0, 0, 0, 24, 4, 48},
        {8, 0, 0, 0, 0, 32, 16, 64}, {8, 0, 0, 0, 0, 8, 1, 10},
    };
    static const tr_case B[] = {
        {0, 2, 8, 0, 0, 0, 16, 64}, {0, 10, 1, 0, 0, 0, 4, 30},  {0, 0, 3, 0, 0, 0, 1, 12},
        {0, 2, 3, 1, 0, 0, 4, 64},  {4, 0, 0, 0, 0, 16, 16, 40}, {1, 0, 0, 0, 0, 40, 4, 64},
    };
    /* NZ_TEST_QUICK: small shapes covering every path */
    static const tr_case AQ[] = {{0, 2, 3, 1, 0, 0, 2, 12},
                                 {0, 1, 3, 0, 1, 10, 3, 16},
                                 {1, 0, 0, 0, 0, 6, 2, 10},
                                 {4, 0, 0, 0, 0, 6, 2, 10}};
    static const tr_case BQ[] = {{0, 1, 3, 0, 0, 0, 2, 12}, {4, 0, 0, 0, 0, 6, 2, 10}};
    if (tu_quick()) {
        translate_model(&NAT_A, "A", AQ, sizeof AQ / sizeof *AQ, 11);
        translate_model(&NAT_B, "B", BQ, sizeof BQ / sizeof *BQ, 23);
    } else {
        translate_model(&NAT_A, "A", A, sizeof A / sizeof *A, 11);
        translate_model(&NAT_B, "B", B, sizeof B / sizeof *B, 23);
    }
}

/* ------------------------------------------------------------ dialogue models */

typedef struct dlg_case {
    int strategy; /* nz_t5md_strategy */
    int beam;
    int one_decoder; /* only decoder K - 1 */
    size_t ctx;
    int mnt;
    int stream;    /* on_token set (+ distinct) */
    int consensus; /* rank consensus (beam: every return pooled) */
} dlg_case;

static void no_token(void *arg, size_t context, int decoder, size_t pos, int32_t token, float logprob,
                     const char *text, size_t text_len) {
    (void)arg, (void)context, (void)decoder, (void)pos, (void)token, (void)logprob, (void)text,
        (void)text_len;
}

/* nz_dialogue_run_ids (B = 1: one context of c->ctx ids) or nz_dialogue_run_batch (B contexts of uneven
 * lengths 3 .. c->ctx, one sampling seed each) against nz_dialogue_batch_peak_bytes. */
static void run_dialogue(env *v, const nz_dialogue *d, const dlg_case *c, size_t B, uint64_t seed, int strict,
                         const char *model) {
    nz_dlg_opts o = *nz_dialogue_defaults(d);
    const size_t K = nz_dialogue_config(d)->num_modes, V = nz_dialogue_config(d)->vocab;
    const int last = (int)K - 1;
    o.gen.strategy = (nz_t5md_strategy)c->strategy;
    o.gen.beam_size = c->beam > 0 ? c->beam : 4;
    o.gen.max_new_tokens = c->mnt;
    o.gen.top_p = 0.9f;
    o.gen.seed = seed;
    if (c->one_decoder) {
        o.gen.decoders = &last;
        o.gen.n_decoders = 1;
    }
    if (c->stream) {
        o.on_token = no_token;
        o.distinct = 1;
    }
    o.rank = c->consensus ? NZ_DLG_RANK_CONSENSUS : NZ_DLG_RANK_LOGPROB;
    int32_t **ids = xmalloc(B * sizeof *ids);
    size_t *len = xmalloc(B * sizeof *len);
    uint64_t *seeds = xmalloc(B * sizeof *seeds);
    for (size_t b = 0; b < B; b++) {
        len[b] = B == 1 ? c->ctx : 3 + (c->ctx - 3) * b / (B - 1);
        ids[b] = xmalloc(len[b] * sizeof **ids);
        for (size_t i = 0; i < len[b]; i++) ids[b][i] = 3 + (int32_t)(tu_rand(&seed) % (V - 3));
        ids[b][len[b] - 1] = 1; /* eos */
        seeds[b] = seed + b;
    }
    if (B > 1) o.gen.seeds = seeds;

    nz_mem_window_begin(WINDOW);
    const uint64_t est =
        B == 1 ? nz_dialogue_peak_bytes(d, len[0], &o) : nz_dialogue_batch_peak_bytes(d, len, B, &o);
    assert_int_equal(nz_mem_window_peak(), 0);
    nz_dlg_result *res = xmalloc(B * sizeof *res);
    nz_error e = {0};
    nz_mem_window_begin(WINDOW);
    int rc = B == 1 ? nz_dialogue_run_ids(v->mc, d, ids[0], len[0], &o, res, &e)
                    : nz_dialogue_run_batch(v->mc, d, (const int32_t *const *)ids, len, B, &o, res, &e);
    const size_t measured = nz_mem_window_peak();
    nz_mem_window_end();
    if (rc) fail_msg("dialogue: %s", e.msg);
    for (size_t b = 0; b < B; b++) {
        if (res[b].rc) fail_msg("dialogue context %zu: %s", b, res[b].err.msg);
        assert_int_equal(res[b].input_tokens, len[b]);
        nz_dlg_result_free(&res[b]);
    }
    static const char *const strat[] = {"greedy", "beam", "sample"};
    char label[160], batch[32] = "";
    if (B > 1) snprintf(batch, sizeof batch, " x%zu contexts", B);
    snprintf(label, sizeof label, "%s %s%s%.0d %s ctx=%zu%s new=%d%s%s", model, strat[c->strategy],
             c->strategy == NZ_T5MD_BEAM ? " " : "", c->strategy == NZ_T5MD_BEAM ? c->beam : 0,
             c->one_decoder ? "1 decoder" : "all decoders", c->ctx, batch, c->mnt, c->stream ? " stream" : "",
             c->consensus ? " consensus" : "");
    check(label, measured, est, strict);
    for (size_t b = 0; b < B; b++) free(ids[b]);
    free(ids);
    free(len);
    free(seeds);
    free(res);
}

/* nz_t5md_peak_bytes itself on a batch of B contexts of uneven lengths (padding, several encoder rows). */
static void run_generate(env *v, const nz_t5md *t, const dlg_case *c, size_t B, uint64_t seed,
                         const char *model) {
    const size_t V = nz_t5md_get_config(t)->vocab;
    nz_t5md_opts o;
    nz_t5md_opts_default(&o);
    o.strategy = (nz_t5md_strategy)c->strategy;
    o.beam_size = c->beam > 0 ? c->beam : 4;
    o.num_return = c->strategy == NZ_T5MD_BEAM ? 2 : 1;
    o.max_new_tokens = c->mnt;
    o.seed = seed;
    int32_t **src = xmalloc(B * sizeof *src);
    size_t *len = xmalloc(B * sizeof *len);
    for (size_t b = 0; b < B; b++) {
        len[b] = b ? 3 + (c->ctx - 3) * b / (B - 1) : 3;
        src[b] = xmalloc(len[b] * sizeof **src);
        for (size_t i = 0; i < len[b]; i++) src[b][i] = 3 + (int32_t)(tu_rand(&seed) % (V - 3));
    }
    const size_t nres = nz_t5md_result_count(t, &o, B);
    nz_t5md_result *res = xmalloc(nres * sizeof *res);
    nz_mem_window_begin(WINDOW);
    const uint64_t est = nz_t5md_peak_bytes(t, len, B, &o);
    assert_int_equal(nz_mem_window_peak(), 0);
    nz_error e = {0};
    nz_mem_window_begin(WINDOW);
    int rc = nz_t5md_generate(v->mc, t, (const int32_t *const *)src, len, B, &o, res, &e);
    const size_t measured = nz_mem_window_peak();
    nz_mem_window_end();
    if (rc) fail_msg("generate: %s", e.msg);
    nz_t5md_results_free(res, nres);
    free(res);
    char label[160];
    snprintf(label, sizeof label, "%s nz_t5md_generate %s, %zu contexts <= %zu ids, new=%d", model,
             c->strategy == NZ_T5MD_BEAM ? "beam 4 (2 returned)" : "greedy", B, c->ctx, c->mnt);
    check(label, measured, est, 1);
    for (size_t b = 0; b < B; b++) free(src[b]);
    free(src);
    free(len);
}

static void dialogue_model(const t5_spec *s, const char *tag, const dlg_case *cases, size_t ncases,
                           uint64_t seed) {
    char path[64];
    t5_write(s, seed, path, sizeof path);
    nz_dialogue *d = NULL;
    nz_error e = {0};
    if (nz_dialogue_open(path, &d, &e)) fail_msg("%s", e.msg);
    printf("dialogue model %s\n", s->name);
    env v;
    env_open(&v, 1);
    const int quick = tu_quick();
    for (size_t i = 0; i < ncases; i++) run_dialogue(&v, d, &cases[i], 1, seed + i, 1, tag);
    /* batches of 2..4 contexts: each strategy, streamed and not */
    for (size_t i = 0; i < ncases; i++) run_dialogue(&v, d, &cases[i], 2 + i % 3, seed + 100 + i, 1, tag);
    const dlg_case g = {NZ_T5MD_GREEDY, 0, 0, 40, 24, 0, 0}, b = {NZ_T5MD_BEAM, 4, 0, 64, 16, 0, 0};
    const dlg_case gq = {NZ_T5MD_GREEDY, 0, 0, 10, 6, 0, 0};
    run_generate(&v, nz_dialogue_t5md(d), quick ? &gq : &g, quick ? 3 : 5, seed, tag);
    if (!quick) run_generate(&v, nz_dialogue_t5md(d), &b, 3, seed + 1, tag);
    env_close(&v);
    nz_dialogue_free(d);
    unlink(path);
}

static void test_dialogue(void **state) {
    (void)state;
    static const dlg_case C[] = {
        /* strategy, beam, one decoder, ctx, max new tokens, stream, consensus */
        {NZ_T5MD_GREEDY, 0, 0, 5, 8, 0, 0},   {NZ_T5MD_GREEDY, 0, 1, 64, 64, 0, 0},
        {NZ_T5MD_BEAM, 4, 0, 32, 32, 0, 0},   {NZ_T5MD_BEAM, 4, 1, 64, 16, 0, 0},
        {NZ_T5MD_SAMPLE, 0, 0, 20, 64, 1, 0}, {NZ_T5MD_GREEDY, 0, 0, 64, 48, 1, 0},
        {NZ_T5MD_BEAM, 4, 0, 8, 64, 1, 0},    {NZ_T5MD_SAMPLE, 0, 1, 48, 8, 0, 0},
        {NZ_T5MD_BEAM, 4, 0, 32, 32, 1, 1},   {NZ_T5MD_BEAM, 3, 1, 64, 16, 0, 1},
    };
    static const dlg_case CQ[] = {{NZ_T5MD_GREEDY, 0, 0, 5, 8, 0, 0},
                                  {NZ_T5MD_BEAM, 4, 0, 8, 8, 1, 0},
                                  {NZ_T5MD_SAMPLE, 0, 1, 10, 8, 1, 0},
                                  {NZ_T5MD_BEAM, 4, 0, 8, 8, 1, 1}};
    const int quick = tu_quick();
    dialogue_model(&T5_A, "A", quick ? CQ : C, quick ? sizeof CQ / sizeof *CQ : sizeof C / sizeof *C, 31);
    dialogue_model(&T5_B, "B", quick ? CQ : C, quick ? sizeof CQ / sizeof *CQ : sizeof C / sizeof *C, 47);
}

/* ------------------------------------------------------------ the demo models (NZ_TEST_DEMO_MEM=1) */

/* n texts of want ids each: consecutive lines of the demo's sample source text, cut to want ids. */
static void demo_sources(const nz_translator *t, size_t n, size_t want, int32_t **ids, size_t *lens) {
    FILE *f = fopen("models/demo/nat-ende.sample.en", "r");
    assert_non_null(f);
    char line[2048], text[16384];
    for (size_t i = 0; i < n; i++) {
        size_t tl = 0;
        ids[i] = NULL;
        for (;;) {
            if (!fgets(line, sizeof line, f)) {
                rewind(f);
                continue;
            }
            line[strcspn(line, "\n")] = 0;
            tl += (size_t)snprintf(text + tl, sizeof text - tl, "%s%s", tl ? " " : "", line);
            nz_free(ids[i]);
            nz_error e = {0};
            assert_int_equal(nz_translator_encode(t, text, tl, &ids[i], &lens[i], &e), NZ_OK);
            if (lens[i] >= want) break;
        }
        lens[i] = want; /* [bos, ..., eos] of exactly want ids */
        ids[i][want - 1] = 2;
    }
    fclose(f);
}

static void demo_translate(env *v, const nz_translator *t, const char *label, size_t n, size_t want,
                           const nz_tr_choice *ch) {
    nz_tr_opts o = *nz_translator_defaults(t);
    nz_error e = {0};
    assert_int_equal(nz_tr_choice_apply(ch, &o, &e), NZ_OK);
    int32_t **ids = xmalloc(n * sizeof *ids);
    size_t *lens = xmalloc(n * sizeof *lens);
    demo_sources(t, n, want, ids, lens);
    const uint64_t est = nz_translator_peak_bytes(t, lens, n, &o);
    nz_tr_result *res = xmalloc(n * sizeof *res);
    nz_mem_window_begin(WINDOW);
    int rc = nz_translator_run_ids(v->mc, t, (const int32_t *const *)ids, lens, n, &o, 1, res, &e);
    const size_t measured = nz_mem_window_peak();
    nz_mem_window_end();
    if (rc) fail_msg("demo translate: %s", e.msg);
    size_t out = 0, src = 0;
    for (size_t i = 0; i < n; i++) out += res[i].n_tokens, src += lens[i];
    nz_tr_results_free(res, n);
    free(res);
    char l[200];
    snprintf(l, sizeof l, "%s (%zu src ids, %zu out)", label, src, out);
    check(l, measured, est, 0);
    for (size_t i = 0; i < n; i++) nz_free(ids[i]);
    free(ids);
    free(lens);
}

static void demo_dialogue(env *v, const nz_dialogue *d, const char *label, const char *turn, int strategy,
                          int beam, int mnt) {
    nz_dlg_opts o = *nz_dialogue_defaults(d);
    o.gen.strategy = (nz_t5md_strategy)strategy;
    if (beam) o.gen.beam_size = beam;
    if (mnt) o.gen.max_new_tokens = mnt;
    int32_t *ids = NULL;
    size_t n = 0;
    nz_error e = {0};
    const char *turns[1] = {turn};
    assert_int_equal(nz_dialogue_encode(d, turns, 1, &ids, &n, &e), NZ_OK);
    const uint64_t est = nz_dialogue_peak_bytes(d, n, &o);
    nz_dlg_result res;
    nz_mem_window_begin(WINDOW);
    int rc = nz_dialogue_run_ids(v->mc, d, ids, n, &o, &res, &e);
    const size_t measured = nz_mem_window_peak();
    nz_mem_window_end();
    if (rc) fail_msg("demo dialogue: %s", e.msg);
    char l[200];
    snprintf(l, sizeof l, "%s (ctx %zu ids, %zu out)", label, n, res.output_tokens);
    nz_dlg_result_free(&res);
    check(l, measured, est, 0);
    nz_free(ids);
}

static void test_demo_models(void **state) {
    (void)state;
    const char *on = getenv("NZ_TEST_DEMO_MEM");
    if (!on || !*on || *on == '0') {
        printf("demo models: skipped (NZ_TEST_DEMO_MEM=1 measures them)\n");
        return;
    }
    env v;
    env_open(&v, 2);
    nz_translator *t = NULL;
    nz_error e = {0};
    if (nz_translator_open("models/demo/nat-ende.nzp", &t, &e)) fail_msg("%s", e.msg);
    printf("demo translator (cache 0, 2 threads)\n");
    nz_tr_choice ch;
    nz_tr_choice_init(&ch);
    ch.decoder = 0;
    ch.length_beam = 8;
    ch.iterations = 10;
    demo_translate(&v, t, "NAT lb=8 it=10, 16 texts of 60 ids", 16, 60, &ch);
    ch.max_length = 80;
    demo_translate(&v, t, "NAT lb=8 it=10 max_length 80, 16 texts of 60 ids", 16, 60, &ch);
    ch.max_length = -1;
    ch.length_beam = 5;
    demo_translate(&v, t, "NAT lb=5 it=10 (defaults), 1 text of 20 ids", 1, 20, &ch);
    ch.rerank = 1;
    demo_translate(&v, t, "NAT lb=5 it=10 rerank, 4 texts of 30 ids", 4, 30, &ch);
    ch.rerank = 0;
    ch.length_beam = 32;
    ch.iterations = 1;
    demo_translate(&v, t, "NAT lb=32 it=1, 2 texts of 200 ids (issue 17's worst case, per text)", 2, 200,
                   &ch);
    nz_tr_choice_init(&ch);
    ch.decoder = 1;
    ch.beam_size = 8;
    demo_translate(&v, t, "AT beam 8, 16 texts of 60 ids", 16, 60, &ch);
    ch.beam_size = 32;
    demo_translate(&v, t, "AT beam 32, 2 texts of 200 ids (issue 17's worst case, per text)", 2, 200, &ch);
    ch.beam_size = 4;
    demo_translate(&v, t, "AT beam 4 (defaults), 1 text of 20 ids", 1, 20, &ch);
    ch.beam_size = 1;
    demo_translate(&v, t, "AT greedy, 4 texts of 30 ids", 4, 30, &ch);
    nz_translator_free(t);

    nz_dialogue *d = NULL;
    if (nz_dialogue_open("models/demo/dialogue.nzp", &d, &e)) fail_msg("%s", e.msg);
    printf("demo dialogue model (cache 0, 2 threads)\n");
    const char *turn = "Where are you going with that harpoon, and why do you look at the sea like that?";
    demo_dialogue(&v, d, "greedy, all decoders, 63 new", turn, NZ_T5MD_GREEDY, 0, 0);
    demo_dialogue(&v, d, "beam 4, all decoders, 63 new", turn, NZ_T5MD_BEAM, 4, 0);
    demo_dialogue(&v, d, "sample, all decoders, 128 new", turn, NZ_T5MD_SAMPLE, 0, 128);
    nz_dialogue_free(d);
    env_close(&v);
}

static void test_summary(void **state) {
    (void)state;
    if (g_hi > 0) printf("estimate / measured over the shapes above 256 KiB: %.3f .. %.3f\n", g_lo, g_hi);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_window),      cmocka_unit_test(test_translate), cmocka_unit_test(test_dialogue),
        cmocka_unit_test(test_demo_models), cmocka_unit_test(test_summary),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
