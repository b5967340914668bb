/* Continuous batching of AT translation (models/nz_nat_cb.c) against nz_nat_at_greedy / nz_nat_at_beam
 * alone (a batch of one): on random translators of two layouts (post-norm with learned positions;
 * pre-norm, sinusoidal, layernorm embedding), greedy and beam sentences (beam 1..5, length penalties
 * 0..2) of 1..30 ids with varied min_len / max_len (a few with min_len > max_len: no result, NZ_E_RANGE)
 * join a running batch at staggered steps and some are removed midway; every sentence that finishes
 * must have exactly the result it has alone: rc and message, tokens, score (bit for bit), steps. The
 * caches slide and grow on the way, and every decoder row is given back. Also: a cancelled step fails
 * every sentence with NZ_E_CANCELLED and leaves the batch usable; a bad source, beam or lenpen is
 * refused. */
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

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_post_norm_learned),
                                       cmocka_unit_test(test_pre_norm_sinusoidal)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
