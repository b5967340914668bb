/* Continuous batching of AT translation (models/nz_nat_cb.c) against nz_nat_at_greedy / nz_nat_at_beam
 * alone (a batch of one): on random translators of two layouts (post-norm with learned positions;
 * pre-norm, sinusoidal, layernorm embedding), greedy and beam sentences (beam 1..5, length penalties
 * 0..2) of 1..30 ids with varied min_len / max_len (a few with min_len > max_len: no result, NZ_E_RANGE)
 * join a running batch at staggered steps and some are removed midway; every sentence that finishes
 * must have exactly the result it has alone: rc and message, tokens, score (bit for bit), steps. The
 * caches slide and grow on the way, and every decoder row is given back. Also: a cancelled step fails
 * every sentence with NZ_E_CANCELLED and leaves the batch usable; a bad source, beam or lenpen is
 * refused. nz_tr_batch_bound: AT greedy and beam 1..5 requests of 1..3 texts join batches (created for the
 * first, freed once empty) at staggered steps, then all at once; some are removed: the batch's measured
 * peak in every step stays within the bound computed before it (test_randmodel.h: tb_step), a join's
 * bound covers the state it leads to, the bound never grows without a joiner, and the largest bound of a
 * run is at most 2x its largest peak + 1 MiB. NZ_TEST_DEMO_MEM=1 (from the repository root) also runs
 * the demo translator's defaults (AT beam 4, max_len 200) with 32 clients and prints the numbers. */
#include "test_randmodel.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_nat.h"
#include "nz_pool.h"
#include "nz_translator.h"

#define NS 24 /* sentences per run */

typedef struct sent {
    int32_t src[32];
    size_t len;
    nz_nat_at_opts o;
    int beam;     /* 0: greedy, else beam search of beam */
    float lenpen; /* its length penalty */
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
        q[i].src[q[i].len - 1] = 2; /* eos */
        nz_nat_at_opts_default(&q[i].o);
        q[i].o.max_len_a = tu_rand(&s) % 2 ? 0.5 : 0;
        q[i].o.max_len_b = (int)(tu_rand(&s) % 23);
        q[i].o.min_len = (int)(tu_rand(&s) % 4);
        if (tu_rand(&s) % 12 == 0) q[i].o.min_len = q[i].o.max_len_b + 20; /* > max_len: no result */
        q[i].beam = i % 3 == 2 ? 0 : 1 + (int)(tu_rand(&s) % 5);
        q[i].lenpen = (float)(tu_rand(&s) % 5) * 0.5f; /* 0, 0.5, 1, 1.5, 2 */
        q[i].join = i < 3 ? 0 : (int)(tu_rand(&s) % 25);
        q[i].remove_at = tu_rand(&s) % 7 == 0 ? q[i].join + 1 + (int)(tu_rand(&s) % 4) : -1;
    }
}

static int add(nz_nat_cb *cb, sent *q, nz_error *e) {
    if (q->beam) return nz_nat_cb_add_beam(cb, q->src, q->len, &q->o, q->beam, q->lenpen, q, e);
    return nz_nat_cb_add(cb, q->src, q->len, &q->o, q, e);
}

/* b (batched) equals a (alone) bit for bit. */
static void check_same(const char *model, size_t i, const sent *q) {
    const nz_nat_hyp *a = &q->ref, *b = &q->got;
    if (a->rc != b->rc)
        fail_msg("%s sentence %zu (beam %d): rc %d batched (%s), %d alone (%s)", model, i, q->beam, b->rc,
                 b->err.msg, a->rc, a->err.msg);
    if (a->rc) {
        assert_int_equal(a->rc, NZ_E_RANGE);
        assert_string_equal(a->err.msg, b->err.msg);
        return;
    }
    if (a->n != b->n || a->steps != b->steps)
        fail_msg("%s sentence %zu (beam %d, join %d): %zu tokens batched, %zu alone", model, i, q->beam,
                 q->join, b->n, a->n);
    assert_memory_equal(a->tokens, b->tokens, a->n * sizeof *a->tokens);
    if (memcmp(&a->score, &b->score, sizeof a->score))
        fail_msg("%s sentence %zu (beam %d): score %.9g batched, %.9g alone", model, i, q->beam,
                 (double)b->score, (double)a->score);
    assert_memory_equal(&a->nat_score, &b->nat_score, sizeof a->nat_score);
    assert_null(b->cands);
}

static void run_model(const nat_spec *spec, uint64_t seed) {
    char path[64];
    nat_write(spec, seed, path, sizeof path);
    nz_translator *tr = NULL;
    nz_error e = {0};
    if (nz_translator_open(path, &tr, &e)) fail_msg("%s", e.msg);
    const nz_nat *n = nz_translator_nat(tr);
    nz_tile_cache *cache = nz_cache_create(0);
    nz_pool *pool = nz_pool_create(2);
    nz_matmul_ctx *mc = nz_matmul_ctx_create(pool, cache);
    sent *q = calloc(NS, sizeof *q);
    make_sents(q, spec->V, seed * 5 + 3);
    for (size_t i = 0; i < NS; i++) { /* alone: a batch of one, padded to at least 2 as nz_translator does */
        int32_t src[32];
        const size_t S = q[i].len > 2 ? q[i].len : 2;
        for (size_t t = 0; t < S; t++) src[t] = t < q[i].len ? q[i].src[t] : 1;
        if (q[i].beam ? nz_nat_at_beam(mc, n, src, 1, S, &q[i].o, q[i].beam, q[i].lenpen, &q[i].ref, &e)
                      : nz_nat_at_greedy(mc, n, src, 1, S, &q[i].o, &q[i].ref, &e))
            fail_msg("%s", e.msg);
    }
    nz_nat_cb *cb = NULL;
    assert_int_equal(nz_nat_cb_create(n, &cb, &e), NZ_OK);
    size_t taken = 0, removed = 0, most = 0, beams = 0, ranges = 0;
    for (int step = 0; taken + removed < NS; step++) {
        assert_true(step < 300);
        for (size_t i = 0; i < NS; i++) {
            if (q[i].join == step) assert_int_equal(add(cb, &q[i], &e), 0);
            if (q[i].remove_at == step && !q[i].taken) {
                nz_nat_cb_remove(cb, &q[i]);
                q[i].removed = 1;
                removed++;
            }
        }
        if (nz_nat_cb_step(mc, cb, &e)) fail_msg("step %d: %s", step, e.msg);
        if (nz_nat_cb_decoder_rows(cb) > most) most = nz_nat_cb_decoder_rows(cb);
        assert_true(nz_nat_cb_decoder_rows(cb) >= nz_nat_cb_rows(cb));
        void *owner;
        nz_nat_hyp h;
        while (nz_nat_cb_take(cb, &owner, &h)) {
            sent *w = owner;
            assert_false(w->taken || w->removed);
            w->got = h;
            w->taken = 1;
            taken++;
        }
    }
    assert_int_equal(nz_nat_cb_size(cb), 0);
    assert_int_equal(nz_nat_cb_rows(cb), 0);
    assert_int_equal(nz_nat_cb_decoder_rows(cb), 0);
    for (size_t i = 0; i < NS; i++) {
        if (!q[i].taken) continue;
        check_same(spec->name, i, &q[i]);
        beams += q[i].beam > 0;
        ranges += q[i].ref.rc == NZ_E_RANGE;
    }
    printf("%s: %zu sentences as alone (%zu beam, %zu without a result), %zu removed, up to %zu rows\n",
           spec->name, taken, beams, ranges, removed, most);
    assert_true(taken >= NS / 2);
    assert_true(beams >= 4);

    /* a bad source, beam or lenpen is refused; a cancelled step fails every sentence and leaves the batch
     * usable */
    int32_t bad[2] = {(int32_t)spec->V + 5, 2};
    assert_int_equal(nz_nat_cb_add(cb, bad, 2, &q[0].o, &q[0], &e), NZ_E_RANGE);
    assert_int_equal(nz_nat_cb_add_beam(cb, bad, 2, &q[0].o, 2, 1.0f, &q[0], &e), NZ_E_RANGE);
    assert_int_equal(nz_nat_cb_add_beam(cb, q[0].src, q[0].len, &q[0].o, 0, 1.0f, &q[0], &e),
                     NZ_E_INVALID_ARG);
    assert_int_equal(nz_nat_cb_add_beam(cb, q[0].src, q[0].len, &q[0].o, 4097, 1.0f, &q[0], &e),
                     NZ_E_INVALID_ARG);
    assert_int_equal(nz_nat_cb_add_beam(cb, q[0].src, q[0].len, &q[0].o, 2, NAN, &q[0], &e),
                     NZ_E_INVALID_ARG);
    assert_int_equal(nz_nat_cb_size(cb), 0);
    assert_int_equal(nz_nat_cb_add(cb, q[0].src, q[0].len, &q[0].o, &q[0], &e), NZ_OK);
    assert_int_equal(nz_nat_cb_add_beam(cb, q[1].src, q[1].len, &q[1].o, 3, 1.0f, &q[1], &e), NZ_OK);
    assert_int_equal(nz_nat_cb_step(mc, cb, &e), NZ_OK); /* running: the cancel hits a decoder step */
    void *owner;
    nz_nat_hyp h;
    size_t left = 3;
    while (nz_nat_cb_take(cb, &owner, &h)) { /* done in one step */
        assert_int_equal(h.rc, ((sent *)owner)->ref.rc);
        nz_nat_hyps_free(&h, 1);
        left--;
    }
    assert_int_equal(nz_nat_cb_add_beam(cb, q[2].src, q[2].len, &q[2].o, 2, 0.5f, &q[2], &e), NZ_OK);
    nz_matmul_ctx_cancel(mc, 1);
    assert_int_equal(nz_nat_cb_step(mc, cb, &e), NZ_E_CANCELLED);
    nz_matmul_ctx_cancel(mc, 0);
    assert_int_equal(nz_nat_cb_decoder_rows(cb), 0);
    for (size_t k = 0; k < left; k++) {
        assert_int_equal(nz_nat_cb_take(cb, &owner, &h), 1);
        assert_int_equal(h.rc, NZ_E_CANCELLED);
        nz_nat_hyps_free(&h, 1);
    }
    assert_int_equal(nz_nat_cb_take(cb, &owner, &h), 0);
    assert_int_equal(nz_nat_cb_add(cb, q[0].src, q[0].len, &q[0].o, &q[0], &e), NZ_OK);
    assert_int_equal(nz_nat_cb_add_beam(cb, q[1].src, q[1].len, &q[1].o, 4, 1.0f, &q[1], &e), NZ_OK);
    assert_int_equal(nz_nat_cb_step(mc, cb, &e), NZ_OK);
    nz_nat_cb_free(cb); /* with sentences in it */

    for (size_t i = 0; i < NS; i++) {
        nz_nat_hyps_free(&q[i].ref, 1);
        nz_nat_hyps_free(&q[i].got, 1);
    }
    free(q);
    nz_matmul_ctx_free(mc);
    nz_pool_free(pool);
    nz_cache_free(cache);
    nz_translator_free(tr);
    unlink(path);
}

static void test_post_norm_learned(void **state) {
    (void)state;
    for (uint64_t seed = 1; seed <= (tu_quick() ? 1u : 3u); seed++) run_model(&NAT_A, seed);
}

static void test_pre_norm_sinusoidal(void **state) {
    (void)state;
    for (uint64_t seed = 1; seed <= (tu_quick() ? 1u : 3u); seed++) run_model(&NAT_B, 20 + seed);
}

/* ------------------------------------------------------------ nz_tr_batch's memory bound */

#define NQ_MAX 16 /* requests */
#define NQ     (tu_quick() ? 7 : NQ_MAX)

typedef struct treq {
    nz_tr_opts o;
    size_t n;            /* texts */
    int32_t ids[3][32];  /* [bos, ids.., eos] */
    const int32_t *p[3]; /* ids[k] */
    size_t lens[3];
    int join, remove_at; /* step it joins, step it is removed at (-1: never) */
    int in, done;
} treq;

/* AT greedy and beam 1..5 requests of 1..3 texts of 2..30 ids, max_len 0..40 tokens. */
static void make_treq(treq *r, size_t i, size_t V, uint64_t *s) {
    memset(r, 0, sizeof *r);
    nz_tr_opts_default(&r->o);
    const int beam = (int)(tu_rand(s) % 6); /* 0: greedy */
    r->o.decoder = beam ? NZ_TR_AT_BEAM : NZ_TR_AT_GREEDY;
    r->o.at_beam = beam ? beam : 1;
    r->o.lenpen = (float)(tu_rand(s) % 3) * 0.5f;
    r->o.at.max_len_a = tu_rand(s) % 2 ? 0.5 : 0;
    r->o.at.max_len_b = 2 + (int)(tu_rand(s) % (tu_quick() ? 12 : 26));
    r->o.at.min_len = (int)(tu_rand(s) % 3);
    r->n = 1 + tu_rand(s) % 3;
    for (size_t k = 0; k < r->n; k++) {
        r->lens[k] = 2 + tu_rand(s) % (tu_quick() ? 14 : 29);
        for (size_t t = 0; t < r->lens[k]; t++) r->ids[k][t] = 4 + (int32_t)(tu_rand(s) % (V - 4));
        r->ids[k][0] = 0;
        r->ids[k][r->lens[k] - 1] = 2;
        r->p[k] = r->ids[k];
    }
    r->join = i < 2 ? 0 : (int)(tu_rand(s) % (tu_quick() ? 8 : 24));
    r->remove_at = tu_rand(s) % 6 == 0 ? r->join + 1 + (int)(tu_rand(s) % 5) : -1;
}

/* The requests through batches of tr (a batch freed once empty, created again for the next joiner), every
 * step measured against nz_tr_batch_bound (tb_step): each joins at its step, or with clients > 0 (a closed
 * loop of that many clients) as soon as fewer are in. Prints the bound's tightness and how far the batch's
 * peak went above the sum of its members' estimates (nz_tr_batch_member_bytes: what they reserve).
 * @return the requests finished. */
static size_t run_bound(const char *label, nz_translator *tr, nz_matmul_ctx *mc, treq *rq, size_t nq,
                        size_t clients, int strict) {
    tb_meter *m = calloc(1, sizeof *m);
    tb_open(m, tr);
    nz_tr_batch *tb = NULL;
    nz_error e = {0};
    size_t out = 0, taken = 0, in = 0, next = 0;
    double excess = 0, most = 0;
    for (int step = 0; out < nq; step++) {
        assert_true(step < 400);
        for (size_t i = 0; i < nq; i++) {
            treq *r = &rq[i];
            if (clients ? i == next && in < clients : r->join == step) {
                const uint64_t join = tb_join(m, tb, r->lens, r->n, &r->o);
                if (!tb) assert_int_equal(nz_tr_batch_create(tr, &tb, &e), NZ_OK);
                assert_int_equal(nz_tr_batch_add(tb, r->p, r->lens, r->n, &r->o, 1, r, &e), NZ_OK);
                tb_joined(m, tb, join);
                r->in = 1;
                in++;
                next++;
            }
            if (r->remove_at == step && r->in) {
                nz_tr_batch_remove(tb, r);
                tb_left(m, tb, "removal");
                r->in = 0;
                r->done = 1;
                in--;
                out++;
            }
        }
        if (tb && nz_tr_batch_size(tb)) {
            double est = 0;
            for (size_t i = 0; i < nq; i++)
                est += rq[i].in ? (double)nz_tr_batch_member_bytes(tb, &rq[i]) : 0;
            assert_int_equal(tb_step(m, mc, tb, &e), NZ_OK);
            if ((double)m->peak[m->n - 1] - est > excess) excess = (double)m->peak[m->n - 1] - est;
            most = est > most ? est : most;
        }
        void *owner;
        nz_tr_result *res;
        size_t n;
        while (tb && nz_tr_batch_take(tb, &owner, &res, &n)) {
            treq *r = owner;
            assert_true(r->in);
            nz_tr_results_free(res, n);
            nz_free(res);
            tb_left(m, tb, "take");
            r->in = 0;
            r->done = 1;
            in--;
            out++;
            taken++;
        }
        if (tb && !nz_tr_batch_size(tb)) { /* as the server does: freed, created again for a joiner */
            nz_tr_batch_free(tb);
            tb = NULL;
            tb_left(m, NULL, "free");
        }
    }
    assert_null(tb);
    tb_report(m, label, strict);
    printf("%s: members' estimates up to %.0f KiB in all; the batch's peak went up to %.0f KiB above them\n",
           label, most / 1024, excess / 1024);
    free(m);
    return taken;
}

static void bound_model(const nat_spec *spec, uint64_t seed) {
    char path[64];
    nat_write(spec, seed, path, sizeof path);
    nz_translator *tr = NULL;
    nz_error e = {0};
    if (nz_translator_open(path, &tr, &e)) fail_msg("%s", e.msg);
    nz_tile_cache *cache = nz_cache_create(0);
    nz_pool *pool = nz_pool_create(2);
    nz_matmul_ctx *mc = nz_matmul_ctx_create(pool, cache);
    treq *rq = calloc(NQ, sizeof *rq);
    uint64_t s = seed * 11 + 5;
    for (size_t i = 0; i < NQ; i++) make_treq(&rq[i], i, spec->V, &s);
    char label[96];
    snprintf(label, sizeof label, "AT bound, %.1s seed %llu, staggered", spec->name,
             (unsigned long long)seed);
    assert_true(run_bound(label, tr, mc, rq, NQ, 0, 1) >= NQ / 2);
    if (!tu_quick()) { /* all at once, none removed: the first bound against the run's peak */
        for (size_t i = 0; i < NQ; i++) {
            rq[i].join = 0;
            rq[i].remove_at = -1;
            rq[i].in = rq[i].done = 0;
        }
        snprintf(label, sizeof label, "AT bound, %.1s seed %llu, at once", spec->name,
                 (unsigned long long)seed);
        assert_int_equal(run_bound(label, tr, mc, rq, NQ, 0, 1), NQ);
    }
    free(rq);
    nz_matmul_ctx_free(mc);
    nz_pool_free(pool);
    nz_cache_free(cache);
    nz_translator_free(tr);
    unlink(path);
}

/* nz_tr_batch_bound over AT greedy and beam requests joining, leaving and removed: tb_step's checks. */
static void test_batch_bound(void **state) {
    (void)state;
    for (uint64_t seed = 1; seed <= (tu_quick() ? 1u : 3u); seed++) bound_model(&NAT_A, seed);
    if (!tu_quick()) bound_model(&NAT_B, 40);
}

/* NZ_TEST_DEMO_MEM=1 (from the repository root): the demo translator's defaults (AT beam 4) for the
 * sample's sentences, 32 clients in a closed loop, as the load test runs them. */
static void test_batch_bound_demo(void **state) {
    (void)state;
    nz_translator *tr = NULL;
    nz_error e = {0};
    if (nz_translator_open("models/demo/nat-ende.nzp", &tr, &e)) fail_msg("%s", e.msg);
    FILE *f = fopen("models/demo/nat-ende.sample.en", "r");
    assert_non_null(f);
    enum { NDEMO = 96 };
    treq *rq = calloc(NDEMO, sizeof *rq);
    char line[1024];
    size_t nq = 0;
    while (nq < NDEMO && fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        int32_t *ids = NULL;
        size_t n = 0;
        assert_int_equal(nz_translator_encode(tr, line, strlen(line), &ids, &n, &e), NZ_OK);
        if (n > 32) n = 32; /* treq's room (the sample's sentences are short) */
        treq *r = &rq[nq++];
        r->o = *nz_translator_defaults(tr);
        r->n = 1;
        memcpy(r->ids[0], ids, n * sizeof *ids);
        r->ids[0][n - 1] = 2;
        r->lens[0] = n;
        r->p[0] = r->ids[0];
        r->remove_at = -1;
        nz_free(ids);
    }
    fclose(f);
    nz_tile_cache *cache = nz_cache_create(0); /* its entries are NZ_MEM_OTHER: none, not to count them */
    nz_pool *pool = nz_pool_create(2);
    nz_matmul_ctx *mc = nz_matmul_ctx_create(pool, cache);
    run_bound("demo translator (defaults), 32 clients", tr, mc, rq, nq, 32, 0);
    free(rq);
    nz_matmul_ctx_free(mc);
    nz_pool_free(pool);
    nz_cache_free(cache);
    nz_translator_free(tr);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_post_norm_learned), cmocka_unit_test(test_pre_norm_sinusoidal),
        cmocka_unit_test(test_batch_bound), cmocka_unit_test(test_batch_bound_demo)};
    /* the demo measurement is listed only when asked for (NZ_TEST_DEMO_MEM=1) */
    const char *demo = getenv("NZ_TEST_DEMO_MEM");
    const size_t n = demo && *demo && *demo != '0' ? 4 : 3;
    return _cmocka_run_group_tests("test_nat_cb", tests, n, NULL, NULL);
}
