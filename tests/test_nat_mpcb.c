/* Continuous batching of mask-predict (models/nz_nat_mp.c, nz_nat_mpb_*) against nz_nat_mask_predict alone
 * (a batch of one): on random translators of two layouts (post-norm with learned positions and a length
 * offset; pre-norm, sinusoidal, layernorm embedding), sentences of 1..30 ids with varied options
 * (iterations 0..10, length beam 1..5, adaptive or not, max_len caps, AT rerank, keep_candidates) join a
 * running batch at staggered steps and some are removed midway; every sentence that finishes must have
 * exactly the result it has alone: rc, tokens, score and nat score (bit for bit), steps, length,
 * candidate, every kept candidate. Also: a cancelled step fails every sentence with NZ_E_CANCELLED and
 * leaves the batch usable; a bad source or bad options are refused; nz_nat_mask_predict's stop and
 * on_width hooks; nz_tr_batch with AT greedy, AT beam and mask-predict requests mixed gives each text what
 * nz_translator_run_ids gives it alone, and its member estimates; its memory stays within
 * nz_tr_batch_bound (test_randmodel.h: tb_step, every step, there and over mask-predict requests of every
 * option joining at staggered steps and all at once). */
#include "test_randmodel.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_nat.h"
#include "nz_pool.h"
#include "nz_translator.h"

#define NS_MAX 24 /* sentences per run */
#define NS     (tu_quick() ? 12 : NS_MAX) /* quick: a valgrind run */

typedef struct sent {
    int32_t src[32];
    size_t len;
    nz_nat_opts o;
    int join, remove_at;
    nz_nat_hyp ref, got;
    int taken, removed;
} sent;

static void make_sents(sent *q, size_t V, uint64_t seed) {
    uint64_t s = seed;
    for (size_t i = 0; i < NS; i++) {
        memset(&q[i], 0, sizeof q[i]);
        q[i].len = 1 + tu_rand(&s) % 30;
        for (size_t t = 0; t < q[i].len; t++) q[i].src[t] = 4 + (int32_t)(tu_rand(&s) % (V - 4));
        q[i].src[q[i].len - 1] = 2;                                /* eos */
        if (q[i].len > 4 && tu_rand(&s) % 5 == 0) q[i].src[1] = 1; /* a pad inside */
        nz_nat_opts_default(&q[i].o);
        q[i].o.max_iter = (int)(tu_rand(&s) % (tu_quick() ? 5 : 11)); /* quick: a valgrind run */
        q[i].o.length_beam = 1 + (int)(tu_rand(&s) % (tu_quick() ? 3 : 5));
        q[i].o.adaptive = tu_rand(&s) % 3 == 0;
        q[i].o.max_len = tu_rand(&s) % 2 ? 2 + (int)(tu_rand(&s) % 40) : 0;
        q[i].o.rerank_at = tu_rand(&s) % 3 == 0;
        q[i].o.keep_candidates = tu_rand(&s) % 2;
        q[i].join = i < 3 ? 0 : (int)(tu_rand(&s) % 20);
        q[i].remove_at = tu_rand(&s) % 7 == 0 ? q[i].join + (int)(tu_rand(&s) % 4) : -1;
    }
}

/* b (batched) equals a (alone) bit for bit. */
static void check_same(const char *model, size_t i, const sent *q) {
    const nz_nat_hyp *a = &q->ref, *b = &q->got;
    if (a->rc != b->rc)
        fail_msg("%s sentence %zu: rc %d batched (%s), %d alone (%s)", model, i, b->rc, b->err.msg, a->rc,
                 a->err.msg);
    if (a->rc) {
        assert_string_equal(a->err.msg, b->err.msg);
        return;
    }
    if (a->n != b->n || a->steps != b->steps || a->length != b->length || a->candidate != b->candidate)
        fail_msg("%s sentence %zu (T %d, beam %d, adaptive %d, join %d): %zu tokens, step %d, length %zu, "
                 "candidate %zu batched; %zu, %d, %zu, %zu alone",
                 model, i, q->o.max_iter, q->o.length_beam, q->o.adaptive, q->join, b->n, b->steps, b->length,
                 b->candidate, a->n, a->steps, a->length, a->candidate);
    assert_memory_equal(a->tokens, b->tokens, a->n * sizeof *a->tokens);
    if (memcmp(&a->score, &b->score, sizeof a->score) ||
        memcmp(&a->nat_score, &b->nat_score, sizeof a->score))
        fail_msg("%s sentence %zu: score %.9g / %.9g batched, %.9g / %.9g alone", model, i, (double)b->score,
                 (double)b->nat_score, (double)a->score, (double)a->nat_score);
    assert_int_equal(a->n_cands, b->n_cands);
    for (size_t j = 0; j < a->n_cands; j++) {
        const nz_nat_cand *x = &a->cands[j], *y = &b->cands[j];
        assert_int_equal(x->n, y->n);
        assert_int_equal(x->length, y->length);
        assert_memory_equal(x->tokens, y->tokens, x->n * sizeof *x->tokens);
        assert_memory_equal(&x->score, &y->score, sizeof x->score);
        assert_memory_equal(&x->nat_score, &y->nat_score, sizeof x->score);
    }
}

typedef struct env {
    nz_translator *tr;
    nz_tile_cache *cache;
    nz_pool *pool;
    nz_matmul_ctx *mc;
    char path[64];
} env;

static void env_open(env *v, const nat_spec *spec, uint64_t seed) {
    nat_write(spec, seed, v->path, sizeof v->path);
    nz_error e = {0};
    if (nz_translator_open(v->path, &v->tr, &e)) fail_msg("%s", e.msg);
    v->cache = nz_cache_create(0);
    v->pool = nz_pool_create(2);
    v->mc = nz_matmul_ctx_create(v->pool, v->cache);
}

static void env_close(env *v) {
    nz_matmul_ctx_free(v->mc);
    nz_pool_free(v->pool);
    nz_cache_free(v->cache);
    nz_translator_free(v->tr);
    unlink(v->path);
}

/* Sentence i alone: a batch of one, padded to at least 2 as nz_translator does. */
static void alone(env *v, sent *q) {
    int32_t src[32];
    nz_error e = {0};
    const size_t S = q->len > 2 ? q->len : 2;
    for (size_t t = 0; t < S; t++) src[t] = t < q->len ? q->src[t] : 1;
    if (nz_nat_mask_predict(v->mc, nz_translator_nat(v->tr), src, 1, S, &q->o, &q->ref, &e))
        fail_msg("%s", e.msg);
}

/* Run the sentences through one batch (joins, removals); @return the most candidates of a pass. */
static size_t run_batch(env *v, nz_nat_mpb *b, sent *q, size_t *taken, size_t *removed) {
    nz_error e = {0};
    size_t most = 0;
    for (int step = 0; *taken + *removed < NS; step++) {
        assert_true(step < 300);
        for (size_t i = 0; i < NS; i++) {
            if (q[i].join == step)
                assert_int_equal(nz_nat_mpb_add(b, q[i].src, q[i].len, &q[i].o, &q[i], &e), 0);
            if (q[i].remove_at == step && !q[i].taken) {
                nz_nat_mpb_remove(b, &q[i]);
                q[i].removed = 1;
                (*removed)++;
            }
        }
        if (nz_nat_mpb_step(v->mc, b, &e)) fail_msg("step %d: %s", step, e.msg);
        if (nz_nat_mpb_candidates(b) > most) most = nz_nat_mpb_candidates(b);
        void *owner;
        nz_nat_hyp h;
        while (nz_nat_mpb_take(b, &owner, &h)) {
            sent *w = owner;
            assert_false(w->taken || w->removed);
            w->got = h;
            w->taken = 1;
            (*taken)++;
        }
    }
    return most;
}

/* A bad source or options are refused; a cancelled step fails every sentence and leaves b usable. */
static void check_errors(env *v, nz_nat_mpb *b, sent *q, size_t V) {
    nz_error e = {0};
    int32_t bad[2] = {(int32_t)V + 5, 2}, empty[2] = {1, 1};
    assert_int_equal(nz_nat_mpb_add(b, bad, 2, &q[0].o, &q[0], &e), NZ_E_RANGE);
    assert_int_equal(nz_nat_mpb_add(b, empty, 2, &q[0].o, &q[0], &e), NZ_E_INVALID_ARG);
    nz_nat_opts o = q[0].o;
    o.length_beam = 0;
    assert_int_equal(nz_nat_mpb_add(b, q[0].src, q[0].len, &o, &q[0], &e), NZ_E_INVALID_ARG);
    o = q[0].o;
    o.max_len = 1;
    assert_int_equal(nz_nat_mpb_add(b, q[0].src, q[0].len, &o, &q[0], &e), NZ_E_INVALID_ARG);
    assert_int_equal(nz_nat_mpb_size(b), 0);
    o = q[0].o;
    o.max_iter = 5;
    o.adaptive = 0;
    assert_int_equal(nz_nat_mpb_add(b, q[0].src, q[0].len, &o, &q[0], &e), NZ_OK);
    assert_int_equal(nz_nat_mpb_add(b, q[1].src, q[1].len, &o, &q[1], &e), NZ_OK);
    assert_int_equal(nz_nat_mpb_step(v->mc, b, &e), NZ_OK); /* running: the cancel hits a pass */
    assert_int_equal(nz_nat_mpb_add(b, q[2].src, q[2].len, &q[2].o, &q[2], &e), NZ_OK);
    nz_matmul_ctx_cancel(v->mc, 1);
    assert_int_equal(nz_nat_mpb_step(v->mc, b, &e), NZ_E_CANCELLED);
    nz_matmul_ctx_cancel(v->mc, 0);
    assert_int_equal(nz_nat_mpb_candidates(b), 0);
    void *owner;
    nz_nat_hyp h;
    for (size_t k = 0; k < 3; k++) {
        assert_int_equal(nz_nat_mpb_take(b, &owner, &h), 1);
        assert_int_equal(h.rc, NZ_E_CANCELLED);
        assert_null(h.tokens);
        nz_nat_hyps_free(&h, 1);
    }
    assert_int_equal(nz_nat_mpb_take(b, &owner, &h), 0);
    assert_int_equal(nz_nat_mpb_add(b, q[0].src, q[0].len, &q[0].o, &q[0], &e), NZ_OK);
    assert_int_equal(nz_nat_mpb_add(b, q[1].src, q[1].len, &q[1].o, &q[1], &e), NZ_OK);
    assert_int_equal(nz_nat_mpb_step(v->mc, b, &e), NZ_OK);
}

static void run_model(const nat_spec *spec, uint64_t seed) {
    env v;
    env_open(&v, spec, seed);
    sent *q = calloc(NS, sizeof *q);
    make_sents(q, spec->V, seed * 7 + 1);
    for (size_t i = 0; i < NS; i++) alone(&v, &q[i]);
    nz_nat_mpb *b = NULL;
    nz_error e = {0};
    assert_int_equal(nz_nat_mpb_create(nz_translator_nat(v.tr), &b, &e), NZ_OK);
    size_t taken = 0, removed = 0, reranked = 0, adaptive = 0, kept = 0;
    const size_t most = run_batch(&v, b, q, &taken, &removed);
    assert_int_equal(nz_nat_mpb_size(b), 0);
    assert_int_equal(nz_nat_mpb_candidates(b), 0);
    for (size_t i = 0; i < NS; i++) {
        if (!q[i].taken) continue;
        check_same(spec->name, i, &q[i]);
        reranked += q[i].o.rerank_at;
        adaptive += q[i].o.adaptive;
        kept += q[i].o.keep_candidates;
    }
    printf("%s: %zu sentences as alone (%zu reranked, %zu adaptive, %zu with candidates), %zu removed, up to "
           "%zu candidates a pass\n",
           spec->name, taken, reranked, adaptive, kept, removed, most);
    assert_true(taken >= NS / 2);
    assert_true(reranked >= 2);
    check_errors(&v, b, q, spec->V);
    nz_nat_mpb_free(b); /* with sentences in it */
    for (size_t i = 0; i < NS; i++) {
        nz_nat_hyps_free(&q[i].ref, 1);
        nz_nat_hyps_free(&q[i].got, 1);
    }
    free(q);
    env_close(&v);
}

static void test_post_norm_learned(void **state) {
    (void)state;
    for (uint64_t seed = 1; seed <= (tu_quick() ? 1u : 3u); seed++) run_model(&NAT_A, seed);
}

static void test_pre_norm_sinusoidal(void **state) {
    (void)state;
    for (uint64_t seed = 1; seed <= (tu_quick() ? 1u : 3u); seed++) run_model(&NAT_B, 20 + seed);
}

/* ------------------------------------------------------------ nz_nat_mask_predict's hooks */

static size_t g_width, g_width_calls;
static int g_stops, g_stop_after;

static void on_width(void *arg, size_t W) {
    (void)arg;
    g_width = W;
    g_width_calls++;
}

static int stop_after(void *arg) {
    (void)arg;
    return ++g_stops > g_stop_after;
}

static void test_hooks(void **state) {
    (void)state;
    env v;
    env_open(&v, &NAT_A, 5);
    const nz_nat *n = nz_translator_nat(v.tr);
    int32_t src[3 * 12]; /* row b: [bos, ids.., eos] of 11 - 3 b ids, padded to 12 */
    for (size_t b = 0; b < 3; b++)
        for (size_t t = 0; t < 12; t++) {
            const size_t L = 11 - 3 * b;
            src[b * 12 + t] = t == 0 ? 0 : t + 1 == L ? 2 : t < L ? 7 + (int32_t)(t + b) : 1;
        }
    nz_nat_opts o;
    nz_nat_opts_default(&o);
    o.max_iter = 4;
    o.length_beam = 3;
    o.on_width = on_width;
    o.stop = stop_after;
    g_stop_after = 100;
    nz_nat_hyp h[3];
    nz_error e = {0};
    assert_int_equal(nz_nat_mask_predict(v.mc, n, src, 3, 12, &o, h, &e), NZ_OK);
    assert_int_equal(g_width_calls, 1);
    assert_int_equal(g_stops, 5); /* before each of the T + 1 passes */
    size_t W = 0;
    for (size_t b = 0; b < 3; b++) {
        assert_int_equal(h[b].rc, NZ_OK);
        W = h[b].length > W ? h[b].length : W;
    }
    /* the random predictor's largest class: 7 + 11 source ids, plus the beam's 1 */
    assert_int_equal(g_width, 7 + 11 + 1);
    assert_true(W <= g_width);
    nz_nat_hyps_free(h, 3);
    g_stops = 0;
    g_stop_after = 2;
    assert_int_equal(nz_nat_mask_predict(v.mc, n, src, 3, 12, &o, h, &e), NZ_E_CANCELLED);
    for (size_t b = 0; b < 3; b++) assert_int_equal(h[b].rc, NZ_E_CANCELLED);
    assert_string_equal(e.msg, "mask-predict: cancelled before pass 2");
    nz_nat_hyps_free(h, 3);
    env_close(&v);
}

/* ------------------------------------------------------------ nz_tr_batch, decoders mixed */

#define NR_MAX 12 /* requests */
#define NR     (tu_quick() ? 8 : NR_MAX)

typedef struct req {
    nz_tr_opts o;
    size_t n;
    int32_t *ids[3];
    size_t lens[3];
    int join, remove_at, taken, removed;
    nz_tr_result ref[3];
} req;

/* Request i: AT greedy, AT beam and mask-predict in turn (nat: mask-predict only). */
static void make_req(req *r, size_t i, size_t V, uint64_t *s, int nat) {
    memset(r, 0, sizeof *r);
    nz_tr_opts_default(&r->o);
    r->o.decoder = nat ? NZ_TR_NAT : (nz_tr_decoder)(i % 3);
    r->o.at_beam = r->o.decoder == NZ_TR_AT_BEAM ? 2 + (int)(tu_rand(s) % 3) : 1;
    r->o.at.max_len_b = 4 + (int)(tu_rand(s) % 12);
    r->o.nat.max_iter = (int)(tu_rand(s) % (tu_quick() ? 5 : 11));
    r->o.nat.length_beam = 1 + (int)(tu_rand(s) % (tu_quick() ? 3 : 5));
    r->o.nat.adaptive = tu_rand(s) % 2;
    r->o.nat.rerank_at = tu_rand(s) % 2;
    r->o.nat.max_len = tu_rand(s) % 2 ? 2 + (int)(tu_rand(s) % 30) : 0;
    r->o.return_candidates = tu_rand(s) % 2;
    r->n = 1 + tu_rand(s) % 3;
    for (size_t k = 0; k < r->n; k++) {
        r->lens[k] = 2 + tu_rand(s) % 20;
        r->ids[k] = malloc(r->lens[k] * sizeof *r->ids[k]);
        for (size_t t = 0; t < r->lens[k]; t++) r->ids[k][t] = 4 + (int32_t)(tu_rand(s) % (V - 4));
        r->ids[k][0] = 0;
        r->ids[k][r->lens[k] - 1] = 2;
    }
    r->join = i < 2 ? 0 : (int)(tu_rand(s) % 10);
    r->remove_at = i % 5 == 4 ? r->join + 1 : -1;
}

static void same_result(const nz_tr_result *a, const nz_tr_result *b) {
    assert_int_equal(a->rc, b->rc);
    if (a->rc) {
        assert_string_equal(a->err.msg, b->err.msg);
        return;
    }
    assert_int_equal(a->n_tokens, b->n_tokens);
    assert_memory_equal(a->tokens, b->tokens, a->n_tokens * sizeof *a->tokens);
    assert_string_equal(a->text, b->text);
    assert_memory_equal(&a->score, &b->score, sizeof a->score);
    assert_int_equal(a->input_tokens, b->input_tokens);
    assert_int_equal(a->output_tokens, b->output_tokens);
    assert_int_equal(a->n_cands, b->n_cands);
    for (size_t j = 0; j < a->n_cands; j++) {
        assert_string_equal(a->cands[j].text, b->cands[j].text);
        assert_memory_equal(&a->cands[j].score, &b->cands[j].score, sizeof(float));
        assert_memory_equal(&a->cands[j].nat_score, &b->cands[j].nat_score, sizeof(float));
        assert_int_equal(a->cands[j].length, b->cands[j].length);
        assert_int_equal(a->cands[j].chosen, b->cands[j].chosen);
    }
}

/* One step of the requests rq[NR] through *tb (created for a joiner when NULL, freed once empty, as the
 * server does), measured against nz_tr_batch_bound (m): joins and removals, the step, then the finished
 * requests checked (check: against their ref results). */
static void tr_step(env *v, tb_meter *m, nz_tr_batch **tb, req *rq, int step, size_t *done, uint64_t *shrunk,
                    int check) {
    nz_error e = {0};
    for (size_t i = 0; i < NR; i++) {
        if (rq[i].join == step) {
            const uint64_t join = tb_join(m, *tb, rq[i].lens, rq[i].n, &rq[i].o);
            if (!*tb) assert_int_equal(nz_tr_batch_create(v->tr, tb, &e), NZ_OK);
            assert_int_equal(nz_tr_batch_add(*tb, (const int32_t *const *)rq[i].ids, rq[i].lens, rq[i].n,
                                             &rq[i].o, 1, &rq[i], &e),
                             NZ_OK);
            tb_joined(m, *tb, join);
        }
        if (rq[i].remove_at == step && !rq[i].taken) {
            nz_tr_batch_remove(*tb, &rq[i]);
            assert_int_equal(nz_tr_batch_member_bytes(*tb, &rq[i]), 0);
            tb_left(m, *tb, "removal");
            rq[i].removed = 1;
            (*done)++;
        }
    }
    if (!*tb) return;
    uint64_t before[NR_MAX];
    for (size_t i = 0; i < NR; i++) before[i] = nz_tr_batch_member_bytes(*tb, &rq[i]);
    if (nz_tr_batch_size(*tb) && tb_step(m, v->mc, *tb, &e)) fail_msg("step %d: %s", step, e.msg);
    for (size_t i = 0; i < NR; i++) {
        const uint64_t now = nz_tr_batch_member_bytes(*tb, &rq[i]);
        if (rq[i].o.decoder == NZ_TR_NAT && before[i] && now < before[i]) *shrunk += before[i] - now;
    }
    void *owner;
    nz_tr_result *res;
    size_t n;
    while (nz_tr_batch_take(*tb, &owner, &res, &n)) {
        req *r = owner;
        assert_false(r->taken || r->removed);
        assert_int_equal(n, r->n);
        for (size_t k = 0; check && k < n; k++) same_result(&r->ref[k], &res[k]);
        nz_tr_results_free(res, n);
        nz_free(res);
        tb_left(m, *tb, "take");
        r->taken = 1;
        (*done)++;
    }
    if (!nz_tr_batch_size(*tb)) {
        nz_tr_batch_free(*tb);
        *tb = NULL;
        tb_left(m, NULL, "free");
    }
}

/* The requests rq[NR] through batches of v, every step measured against nz_tr_batch_bound; check: their
 * results against ref (each text alone). */
static void tr_run(env *v, req *rq, const char *label, int check) {
    tb_meter *m = calloc(1, sizeof *m);
    tb_open(m, v->tr);
    nz_tr_batch *tb = NULL;
    size_t done = 0, taken = 0;
    uint64_t shrunk = 0;
    for (int step = 0; done < NR; step++) {
        assert_true(step < 300);
        tr_step(v, m, &tb, rq, step, &done, &shrunk, check);
    }
    assert_null(tb);
    for (size_t i = 0; i < NR; i++) taken += rq[i].taken;
    printf("%s: %zu of %d requests%s; estimates gave back %llu bytes\n", label, taken, NR,
           check ? " as alone" : "", (unsigned long long)shrunk);
    assert_true(taken >= NR / 2);
    tb_report(m, label, 1);
    free(m);
}

static void test_translator_mixed(void **state) {
    (void)state;
    env v;
    env_open(&v, &NAT_A, 9);
    req rq[NR_MAX];
    uint64_t s = 99;
    nz_error e = {0};
    for (size_t i = 0; i < NR; i++) {
        make_req(&rq[i], i, NAT_A.V, &s, 0);
        assert_true(nz_tr_batch_joins(&rq[i].o));
        for (size_t k = 0; k < rq[i].n; k++) /* each text alone */
            assert_int_equal(nz_translator_run_ids(v.mc, v.tr, (const int32_t *const *)&rq[i].ids[k],
                                                   &rq[i].lens[k], 1, &rq[i].o, 1, &rq[i].ref[k], &e),
                             NZ_OK);
    }
    tr_run(&v, rq, "translator (AT greedy, AT beam, mask-predict)", 1);
    for (size_t i = 0; i < NR; i++) {
        nz_tr_results_free(rq[i].ref, rq[i].n);
        for (size_t k = 0; k < rq[i].n; k++) free(rq[i].ids[k]);
    }
    env_close(&v);
}

/* nz_tr_batch_bound over mask-predict requests (length beams 1..5, iterations, adaptive, rerank,
 * candidates, max_len caps, 1..3 texts) joining at staggered steps, then all at once. */
static void test_translator_bound_nat(void **state) {
    (void)state;
    const nat_spec *specs[2] = {&NAT_A, &NAT_B};
    for (int k = 0; k < (tu_quick() ? 1 : 2); k++) {
        env v;
        env_open(&v, specs[k], 30 + (uint64_t)k);
        req rq[NR_MAX];
        uint64_t s = 7 + (uint64_t)k;
        for (size_t i = 0; i < NR; i++) make_req(&rq[i], i, specs[k]->V, &s, 1);
        char label[96];
        snprintf(label, sizeof label, "mask-predict bound, %.1s, staggered", specs[k]->name);
        tr_run(&v, rq, label, 0);
        for (size_t i = 0; !tu_quick() && i < NR; i++) { /* all at once, none removed */
            rq[i].join = 0;
            rq[i].remove_at = -1;
            rq[i].taken = rq[i].removed = 0;
        }
        snprintf(label, sizeof label, "mask-predict bound, %.1s, at once", specs[k]->name);
        if (!tu_quick()) tr_run(&v, rq, label, 0);
        for (size_t i = 0; i < NR; i++)
            for (size_t j = 0; j < rq[i].n; j++) free(rq[i].ids[j]);
        env_close(&v);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_post_norm_learned),
                                       cmocka_unit_test(test_pre_norm_sinusoidal),
                                       cmocka_unit_test(test_hooks), cmocka_unit_test(test_translator_mixed),
                                       cmocka_unit_test(test_translator_bound_nat)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
