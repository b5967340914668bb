/* Continuous batching of the multi-decoder T5 (models/nz_t5md_cb.c) against nz_t5md_generate alone:
 * on random models of both variants (adapters, K decoder copies), groups of mixed options (greedy and
 * seeded sampling, top-k / top-p, n-gram bans, decoder subsets with repeats, 0..24 new tokens) join a
 * running batch at staggered steps, some are removed midway; every group that finishes must have
 * exactly the tokens, log-probs (bit for bit), sums and end flags it has alone, and its streaming hook
 * must have seen every token in order. The caches slide and grow on the way (small first sizes). Also:
 * beam search is refused, a cancelled step fails every group with NZ_E_CANCELLED and leaves the batch
 * usable. */
#include "test_randmodel.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_dialogue.h"
#include "nz_pool.h"

#define NG 12 /* groups per run */

typedef struct grp {
    int32_t src[24];
    size_t len;
    nz_t5md_opts o;
    int decs[4];
    int join;              /* step at which it is added */
    int remove_at;         /* step at which it is removed (-1: never) */
    nz_t5md_result ref[4]; /* alone */
    nz_t5md_result got[4]; /* batched */
    int32_t seen[4][32];   /* streamed tokens per requested decoder */
    size_t nseen[4];
    int taken, removed;
    size_t D;
} grp;

static void on_token(void *arg, size_t context, int decoder, size_t pos, int32_t token, float logprob) {
    grp *g = arg;
    (void)logprob;
    assert_int_equal(context, 0);
    /* the first requested slot of this decoder whose stream is at pos (repeated decoders stream alike) */
    for (size_t j = 0; j < g->D; j++)
        if (g->decs[j] == decoder && g->nseen[j] == pos) {
            g->seen[j][g->nseen[j]++] = token;
            return;
        }
    fail_msg("a token of decoder %d at position %zu that no requested decoder expects", decoder, pos);
}

static void make_groups(grp *g, size_t K, size_t V, uint64_t seed) {
    uint64_t s = seed;
    for (size_t i = 0; i < NG; i++) {
        memset(&g[i], 0, sizeof g[i]);
        g[i].len = 1 + tu_rand(&s) % 20;
        for (size_t t = 0; t + 1 < g[i].len; t++) g[i].src[t] = 3 + (int32_t)(tu_rand(&s) % (V - 3));
        g[i].src[g[i].len - 1] = NZ_T5MD_EOS;
        nz_t5md_opts *o = &g[i].o;
        nz_t5md_opts_default(o);
        static const int mnt[] = {0, 1, 3, 8, 17, 24};
        o->max_new_tokens = mnt[tu_rand(&s) % 6];
        o->strategy = tu_rand(&s) % 2 ? NZ_T5MD_SAMPLE : NZ_T5MD_GREEDY;
        o->seed = tu_rand(&s);
        o->temperature = 0.5f + (float)(tu_rand(&s) % 100) / 100.0f;
        o->top_k = (uint32_t)(tu_rand(&s) % 3 ? 0 : 5 + tu_rand(&s) % 50);
        o->top_p = tu_rand(&s) % 2 ? 1.0f : 0.9f;
        o->no_repeat_ngram = tu_rand(&s) % 3 ? 0 : 2 + (int)(tu_rand(&s) % 2);
        o->ban_unk = (int)(tu_rand(&s) % 2);
        if (tu_rand(&s) % 2) { /* a subset, possibly with a repeat */
            g[i].D = 1 + tu_rand(&s) % 3;
            for (size_t j = 0; j < g[i].D; j++) g[i].decs[j] = (int)(tu_rand(&s) % K);
            o->decoders = g[i].decs;
            o->n_decoders = g[i].D;
        } else {
            g[i].D = K;
            for (size_t j = 0; j < K; j++) g[i].decs[j] = (int)j;
        }
        o->on_token = on_token;
        o->token_arg = &g[i];
        g[i].join = i < 3 ? 0 : (int)(tu_rand(&s) % 30);
        g[i].remove_at = tu_rand(&s) % 6 == 0 ? g[i].join + 1 + (int)(tu_rand(&s) % 5) : -1;
    }
}

static void check_group(const grp *g, size_t i, const char *model) {
    for (size_t j = 0; j < g->D; j++) {
        const nz_t5md_result *a = &g->ref[j], *b = &g->got[j];
        assert_int_equal(a->rc, NZ_OK);
        if (b->rc) fail_msg("%s group %zu decoder %d: %s", model, i, g->decs[j], b->err.msg);
        if (a->n != b->n || a->finished != b->finished || a->decoder != b->decoder)
            fail_msg("%s group %zu (join %d) decoder %d: %zu tokens (end %d) batched, %zu (end %d) alone",
                     model, i, g->join, g->decs[j], b->n, b->finished, a->n, a->finished);
        assert_memory_equal(a->tokens, b->tokens, a->n * sizeof *a->tokens);
        if (a->n && memcmp(a->logprobs, b->logprobs, a->n * sizeof *a->logprobs))
            fail_msg("%s group %zu decoder %d: the log-probs differ from alone", model, i, g->decs[j]);
        assert_true(a->sum_logprob == b->sum_logprob);
        assert_true(isnan(b->beam_score));
        assert_int_equal(g->nseen[j], a->n);
        assert_memory_equal(g->seen[j], a->tokens, a->n * sizeof *a->tokens);
    }
}

static void run_model(const t5_spec *spec, uint64_t seed) {
    char path[64];
    t5_write(spec, seed, path, sizeof path);
    nz_dialogue *d = NULL;
    nz_error e = {0};
    if (nz_dialogue_open(path, &d, &e)) fail_msg("%s", e.msg);
    const nz_t5md *t = nz_dialogue_t5md(d);
    nz_tile_cache *cache = nz_cache_create(0);
    nz_pool *pool = nz_pool_create(2);
    nz_matmul_ctx *mc = nz_matmul_ctx_create(pool, cache);
    grp *g = calloc(NG, sizeof *g);
    make_groups(g, spec->K, spec->V, seed * 7 + 1);
    /* alone (no hook: the hook records the batched run) */
    for (size_t i = 0; i < NG; i++) {
        nz_t5md_opts o = g[i].o;
        o.on_token = NULL;
        const int32_t *src = g[i].src;
        assert_int_equal(nz_t5md_result_count(t, &o, 1), g[i].D);
        if (nz_t5md_generate(mc, t, &src, &g[i].len, 1, &o, g[i].ref, &e)) fail_msg("%s", e.msg);
    }
    nz_t5md_cb *cb = NULL;
    assert_int_equal(nz_t5md_cb_create(t, &cb, &e), NZ_OK);
    size_t taken = 0, removed = 0;
    for (int step = 0; taken + removed < NG; step++) {
        assert_true(step < 200);
        for (size_t i = 0; i < NG; i++) {
            if (g[i].join == step)
                assert_int_equal(nz_t5md_cb_add(cb, g[i].src, g[i].len, &g[i].o, &g[i], &e), 0);
            if (g[i].remove_at == step && !g[i].taken) {
                nz_t5md_cb_remove(cb, &g[i]);
                g[i].removed = 1;
                removed++;
            }
        }
        if (nz_t5md_cb_step(mc, cb, &e)) fail_msg("step %d: %s", step, e.msg);
        void *owner;
        grp tmp;
        while (nz_t5md_cb_take(cb, &owner, tmp.got)) {
            grp *w = owner;
            assert_false(w->taken);
            assert_false(w->removed);
            memcpy(w->got, tmp.got, w->D * sizeof *w->got);
            w->taken = 1;
            taken++;
        }
    }
    assert_int_equal(nz_t5md_cb_groups(cb), 0);
    assert_int_equal(nz_t5md_cb_rows(cb), 0);
    for (size_t i = 0; i < NG; i++)
        if (g[i].taken) check_group(&g[i], i, spec->name);
    printf("%s: %zu groups as alone, %zu removed\n", spec->name, taken, removed);
    assert_true(taken >= NG / 2);

    /* beam is refused; a cancelled step fails every group and leaves the batch usable */
    nz_t5md_opts o = g[0].o;
    o.strategy = NZ_T5MD_BEAM;
    assert_int_equal(nz_t5md_cb_add(cb, g[0].src, g[0].len, &o, &g[0], &e), NZ_E_UNSUPPORTED);
    o = g[0].o;
    o.on_token = NULL;
    o.max_new_tokens = 5;
    assert_int_equal(nz_t5md_cb_add(cb, g[0].src, g[0].len, &o, &g[0], &e), NZ_OK);
    assert_int_equal(nz_t5md_cb_add(cb, g[1].src, g[1].len, &o, &g[1], &e), NZ_OK);
    assert_int_equal(nz_t5md_cb_step(mc, cb, &e), NZ_OK);
    nz_matmul_ctx_cancel(mc, 1);
    assert_int_equal(nz_t5md_cb_step(mc, cb, &e), NZ_E_CANCELLED);
    nz_matmul_ctx_cancel(mc, 0);
    for (int n = 0; n < 2; n++) {
        void *owner;
        nz_t5md_result res[4];
        assert_int_equal(nz_t5md_cb_take(cb, &owner, res), 1);
        assert_int_equal(res[0].rc, NZ_E_CANCELLED);
        nz_t5md_results_free(res, ((grp *)owner)->D);
    }
    assert_int_equal(nz_t5md_cb_rows(cb), 0);
    assert_int_equal(nz_t5md_cb_add(cb, g[0].src, g[0].len, &o, &g[0], &e), NZ_OK); /* usable again */
    nz_t5md_cb_free(cb);                                                            /* with a group in it */

    for (size_t i = 0; i < NG; i++) {
        nz_t5md_results_free(g[i].ref, g[i].D);
        nz_t5md_results_free(g[i].got, g[i].D);
    }
    free(g);
    nz_matmul_ctx_free(mc);
    nz_pool_free(pool);
    nz_cache_free(cache);
    nz_dialogue_free(d);
    unlink(path);
}

static void test_adapter(void **state) {
    (void)state;
    for (uint64_t seed = 1; seed <= (tu_quick() ? 1u : 3u); seed++) run_model(&T5_A, seed);
}

static void test_transformer(void **state) {
    (void)state;
    for (uint64_t seed = 1; seed <= (tu_quick() ? 1u : 3u); seed++) run_model(&T5_B, 40 + seed);
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_adapter), cmocka_unit_test(test_transformer)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
