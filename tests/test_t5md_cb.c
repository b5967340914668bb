/* Continuous batching of the multi-decoder T5 (models/nz_t5md_cb.c) against nz_t5md_generate alone:
 * on random models of both variants (adapters, K decoder copies), groups of mixed options (greedy and
 * seeded sampling, top-k / top-p, n-gram bans, decoder subsets with repeats, 0..24 new tokens; beam
 * search of beam 1..4 with 1..beam returns, length penalties, early stopping, n-gram bans) join a
 * running batch at staggered steps, some are removed midway; every group that finishes must have
 * exactly the results it has alone (as many, in the same order: tokens, log-probs bit for bit, sums,
 * beam scores, end flags), and its streaming hook must have seen, per decoder, the same events (token,
 * position, log-prob bits) in the same order as alone. The caches slide and grow on the way (small
 * first sizes); with a vocabulary of 12, rows and beam items end early, at different steps. Also: bad
 * beam options are refused, a cancelled step fails every group (greedy and beam) with NZ_E_CANCELLED
 * and leaves the batch usable. */
#include "test_randmodel.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_dialogue.h"
#include "nz_pool.h"

#define NG   16  /* groups per run */
#define NRES 16  /* results per group: decoders x returns */
#define NEV  160 /* streamed events per group */

typedef struct tok_ev {
    int decoder;
    size_t pos;
    int32_t token;
    uint32_t lp; /* the log-prob's bits */
} tok_ev;

typedef struct grp {
    int32_t src[24];
    size_t len;
    nz_t5md_opts o;
    int decs[4];
    int join;                 /* step at which it is added */
    int remove_at;            /* step at which it is removed (-1: never) */
    nz_t5md_result ref[NRES]; /* alone */
    nz_t5md_result got[NRES]; /* batched */
    int32_t seen[4][32];      /* streamed tokens per requested decoder (batched) */
    size_t nseen[4];
    tok_ev ev[2][NEV]; /* streamed events: alone, batched */
    size_t nev[2];
    int batched; /* the hook records the batched run */
    int taken, removed;
    size_t D, nres;
} grp;

static void on_token(void *arg, size_t context, int decoder, size_t pos, int32_t token, float logprob) {
    grp *g = arg;
    assert_int_equal(context, 0);
    assert_true(g->nev[g->batched] < NEV);
    tok_ev *ev = &g->ev[g->batched][g->nev[g->batched]++];
    ev->decoder = decoder;
    ev->pos = pos;
    ev->token = token;
    memcpy(&ev->lp, &logprob, sizeof ev->lp);
    if (!g->batched) return;
    /* the first requested slot of this decoder whose stream is at pos (repeated decoders stream alike) */
    for (size_t j = 0; j < g->D; j++)
        if (g->decs[j] == decoder && g->nseen[j] == pos) {
            g->seen[j][g->nseen[j]++] = token;
            return;
        }
    fail_msg("a token of decoder %d at position %zu that no requested decoder expects", decoder, pos);
}

/* NG groups of random options; with many_beams every other group is beam search, mostly with early
 * stopping (items are done sooner), else every third. */
static void make_groups(grp *g, size_t K, size_t V, uint64_t seed, int many_beams) {
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
        const int beam = many_beams ? i % 2 == 1 : i % 3 == 1;
        o->strategy = beam ? NZ_T5MD_BEAM : tu_rand(&s) % 2 ? NZ_T5MD_SAMPLE : NZ_T5MD_GREEDY;
        if (o->strategy == NZ_T5MD_BEAM) {
            static const double lpen[] = {1.0, 0.5, 2.0, 0.0, -0.5};
            o->beam_size = 1 + (int)(tu_rand(&s) % 4);
            o->num_return = 1 + (int)(tu_rand(&s) % (uint64_t)o->beam_size);
            o->length_penalty = lpen[tu_rand(&s) % 5];
            const uint64_t es = tu_rand(&s) % 4;
            o->early_stopping = many_beams ? es != 0 : (int)(es % 2);
        }
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
        if (i == 4) g[i].remove_at = g[i].join + 1 + (int)(tu_rand(&s) % 3); /* a beam group */
        g[i].nres = g[i].D * (o->strategy == NZ_T5MD_BEAM ? (size_t)o->num_return : 1);
    }
}

/* Events of decoder k in a log, in order: the i-th one (NULL past the end). */
static const tok_ev *nth_event(const tok_ev *ev, size_t n, int k, size_t i) {
    for (size_t e = 0; e < n; e++)
        if (ev[e].decoder == k && i-- == 0) return &ev[e];
    return NULL;
}

static void check_group(const grp *g, size_t i, const char *model) {
    const size_t R = g->nres / g->D;
    for (size_t q = 0; q < g->nres; q++) {
        const nz_t5md_result *a = &g->ref[q], *b = &g->got[q];
        const int k = g->decs[q / R];
        if (a->rc != b->rc)
            fail_msg("%s group %zu result %zu: rc %d batched, %d alone", model, i, q, b->rc, a->rc);
        if (a->rc) {
            assert_string_equal(a->err.msg, b->err.msg);
            continue;
        }
        if (a->n != b->n || a->finished != b->finished || a->decoder != b->decoder ||
            a->context != b->context)
            fail_msg(
                "%s group %zu (join %d, strategy %d) result %zu (decoder %d): %zu tokens (end %d) batched, "
                "%zu (end %d) alone",
                model, i, g->join, (int)g->o.strategy, q, k, b->n, b->finished, a->n, a->finished);
        assert_memory_equal(a->tokens, b->tokens, a->n * sizeof *a->tokens);
        if (a->n && memcmp(a->logprobs, b->logprobs, a->n * sizeof *a->logprobs))
            fail_msg("%s group %zu result %zu (decoder %d): the log-probs differ from alone", model, i, q, k);
        assert_memory_equal(&a->sum_logprob, &b->sum_logprob, sizeof a->sum_logprob);
        assert_memory_equal(&a->mean_logprob, &b->mean_logprob, sizeof a->mean_logprob);
        if (g->o.strategy != NZ_T5MD_BEAM)
            assert_true(isnan(b->beam_score));
        else if (memcmp(&a->beam_score, &b->beam_score, sizeof a->beam_score))
            fail_msg("%s group %zu result %zu: beam score %.17g batched, %.17g alone", model, i, q,
                     b->beam_score, a->beam_score);
    }
    for (size_t j = 0; j < g->D; j++) { /* each decoder's stream: its best result */
        const nz_t5md_result *a = &g->ref[j * R];
        assert_int_equal(g->nseen[j], a->n);
        assert_memory_equal(g->seen[j], a->tokens, a->n * sizeof *a->tokens);
    }
    for (int k = 0; k < 4; k++) /* per decoder, the events alone and batched are the same, in order */
        for (size_t e = 0;; e++) {
            const tok_ev *x = nth_event(g->ev[0], g->nev[0], k, e), *y = nth_event(g->ev[1], g->nev[1], k, e);
            if (!x && !y) break;
            if (!x || !y || x->pos != y->pos || x->token != y->token || x->lp != y->lp)
                fail_msg("%s group %zu: decoder %d's streamed event %zu differs from alone", model, i, k, e);
        }
}

#define MEM_ALL (NZ_MEM_MASK(NZ_MEM_ACTIVATIONS) | NZ_MEM_MASK(NZ_MEM_KV) | NZ_MEM_MASK(NZ_MEM_OTHER))

/* Bytes counted in the categories a batch allocates from. */
static size_t mem_now(void) {
    return nz_mem_current(NZ_MEM_ACTIVATIONS) + nz_mem_current(NZ_MEM_KV) + nz_mem_current(NZ_MEM_OTHER);
}

/* What a taken result holds (t5md_set_result: tokens and logprobs of n + 1 byte each). */
static size_t result_bytes(const nz_t5md_result *r) {
    return (r->tokens ? 4 * r->n + 1 : 0) + (r->logprobs ? 4 * r->n + 1 : 0);
}

static void run_model(const t5_spec *spec, uint64_t seed, int many_beams) {
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
    make_groups(g, spec->K, spec->V, seed * 7 + 1, many_beams);
    /* alone (the hook records its events in ev[0]) */
    for (size_t i = 0; i < NG; i++) {
        const int32_t *src = g[i].src;
        assert_int_equal(nz_t5md_result_count(t, &g[i].o, 1), g[i].nres);
        if (nz_t5md_generate(mc, t, &src, &g[i].len, 1, &g[i].o, g[i].ref, &e)) fail_msg("%s", e.msg);
        g[i].batched = 1;
    }
    /* the memory bound: the batch's bytes (all counted categories, less the results the test took) never
     * exceed nz_t5md_cb_bound computed before (with a joiner before its add), and it never grows without
     * one */
    const size_t base = mem_now();
    size_t kept = 0, first = 0;
    while (g[first].join) first++;
    double tight = 0;
    nz_t5md_cb *cb = NULL;
    assert_int_equal(nz_t5md_cb_create(t, &cb, &e), NZ_OK);
    size_t taken = 0, removed = 0, beams = 0;
    for (int step = 0; taken + removed < NG; step++) {
        assert_true(step < 200);
        for (size_t i = 0; i < NG; i++) {
            if (g[i].join == step) {
                const uint64_t bj = nz_t5md_cb_bound(t, cb, g[i].len, &g[i].o);
                if (!step && i == first) /* as created: the fresh batch's bound */
                    assert_true(nz_t5md_cb_bound(t, NULL, g[i].len, &g[i].o) == bj);
                assert_int_equal(nz_t5md_cb_add(cb, g[i].src, g[i].len, &g[i].o, &g[i], &e), 0);
                assert_true(nz_t5md_cb_bound(t, cb, 0, NULL) <= bj);
            }
            if (g[i].remove_at == step && !g[i].taken) {
                const uint64_t b0 = nz_t5md_cb_bound(t, cb, 0, NULL);
                nz_t5md_cb_remove(cb, &g[i]);
                assert_true(nz_t5md_cb_bound(t, cb, 0, NULL) <= b0);
                g[i].removed = 1;
                removed++;
            }
        }
        const uint64_t b0 = nz_t5md_cb_bound(t, cb, 0, NULL);
        const size_t at = mem_now() - base - kept;
        assert_true(at <= b0);
        nz_mem_window_begin(MEM_ALL);
        if (nz_t5md_cb_step(mc, cb, &e)) fail_msg("step %d: %s", step, e.msg);
        void *owner;
        grp tmp;
        while (nz_t5md_cb_take(cb, &owner, tmp.got)) {
            grp *w = owner;
            assert_false(w->taken);
            assert_false(w->removed);
            memcpy(w->got, tmp.got, w->nres * sizeof *w->got);
            for (size_t q = 0; q < w->nres; q++) kept += result_bytes(&w->got[q]);
            w->taken = 1;
            taken++;
        }
        const size_t peak = at + nz_mem_window_peak();
        nz_mem_window_end();
        if (peak > b0)
            fail_msg("%s step %d: the batch held %zu bytes, bound %llu", spec->name, step, peak,
                     (unsigned long long)b0);
        if ((double)peak / (double)b0 > tight) tight = (double)peak / (double)b0;
        assert_true(nz_t5md_cb_bound(t, cb, 0, NULL) <= b0);
    }
    printf("%s: the batch's peak reached %.0f %% of its bound at most\n", spec->name, 100 * tight);
    assert_true(tight > 0.4); /* not a loose bound */
    assert_int_equal(nz_t5md_cb_groups(cb), 0);
    assert_int_equal(nz_t5md_cb_rows(cb), 0);
    for (size_t i = 0; i < NG; i++)
        if (g[i].taken) {
            check_group(&g[i], i, spec->name);
            beams += g[i].o.strategy == NZ_T5MD_BEAM;
        }
    printf("%s: %zu groups as alone (%zu beam), %zu removed\n", spec->name, taken, beams, removed);
    assert_true(taken >= NG / 2);
    assert_true(beams >= 2);

    /* bad beam options are refused; a cancelled step fails every group (greedy and beam) and leaves the
     * batch usable */
    nz_t5md_opts o = g[0].o, ob = g[1].o;
    o.on_token = ob.on_token = NULL;
    o.strategy = ob.strategy = NZ_T5MD_BEAM;
    o.beam_size = 2;
    o.num_return = 3;
    assert_int_equal(nz_t5md_cb_add(cb, g[0].src, g[0].len, &o, &g[0], &e), NZ_E_RANGE);
    o = g[0].o;
    o.on_token = NULL;
    o.strategy = NZ_T5MD_GREEDY;
    o.max_new_tokens = ob.max_new_tokens = 5;
    ob.beam_size = 3;
    ob.num_return = 2;
    ob.early_stopping = 0;
    const size_t nres[2] = {nz_t5md_result_count(t, &o, 1), nz_t5md_result_count(t, &ob, 1)};
    assert_int_equal(nz_t5md_cb_add(cb, g[0].src, g[0].len, &o, &g[0], &e), NZ_OK);
    assert_int_equal(nz_t5md_cb_add(cb, g[1].src, g[1].len, &ob, &g[1], &e), NZ_OK);
    assert_int_equal(nz_t5md_cb_step(mc, cb, &e), NZ_OK);
    nz_matmul_ctx_cancel(mc, 1);
    assert_int_equal(nz_t5md_cb_step(mc, cb, &e), NZ_E_CANCELLED);
    nz_matmul_ctx_cancel(mc, 0);
    for (int n = 0; n < 2; n++) {
        void *owner;
        nz_t5md_result res[NRES];
        assert_int_equal(nz_t5md_cb_take(cb, &owner, res), 1);
        const int beam = owner == &g[1]; /* cannot be done after one step: it holds one hypothesis at most */
        const size_t nr = nres[beam];
        for (size_t q = 0; q < nr; q++) /* greedy rows may have ended with eos at the first step */
            if (beam || res[q].rc || !res[q].finished) assert_int_equal(res[q].rc, NZ_E_CANCELLED);
        nz_t5md_results_free(res, nr);
    }
    assert_int_equal(nz_t5md_cb_rows(cb), 0);
    assert_int_equal(nz_t5md_cb_add(cb, g[0].src, g[0].len, &o, &g[0], &e), NZ_OK); /* usable again */
    assert_int_equal(nz_t5md_cb_add(cb, g[1].src, g[1].len, &ob, &g[1], &e), NZ_OK);
    assert_int_equal(nz_t5md_cb_step(mc, cb, &e), NZ_OK);
    nz_t5md_cb_free(cb); /* with groups in it */

    for (size_t i = 0; i < NG; i++) {
        nz_t5md_results_free(g[i].ref, g[i].nres);
        nz_t5md_results_free(g[i].got, g[i].nres);
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
    for (uint64_t seed = 1; seed <= (tu_quick() ? 1u : 3u); seed++) run_model(&T5_A, seed, 0);
}

static void test_transformer(void **state) {
    (void)state;
    for (uint64_t seed = 1; seed <= (tu_quick() ? 1u : 3u); seed++) run_model(&T5_B, 40 + seed, 0);
}

/* Both variants with a vocabulary of 12 and more beam groups, mostly early-stopping: eos is likely, so
 * rows end and beam items are done at different steps (their slots given back and taken again by later
 * groups). */
static void test_small_vocab(void **state) {
    (void)state;
    t5_spec a = T5_A, b = T5_B;
    a.V = b.V = 12;
    a.name = "A, vocabulary 12";
    b.name = "B, vocabulary 12";
    for (uint64_t seed = 1; seed <= (tu_quick() ? 1u : 2u); seed++) {
        run_model(&a, 70 + seed, 1);
        run_model(&b, 80 + seed, 1);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {cmocka_unit_test(test_adapter), cmocka_unit_test(test_transformer),
                                       cmocka_unit_test(test_small_vocab)};
    return cmocka_run_group_tests(tests, NULL, NULL);
}
