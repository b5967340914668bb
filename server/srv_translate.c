/* srv_translate — the /v1/translate handler: options, validation and tokenization, memory
 * checks, running a batch of requests in chunks that fit the memory pool, the response. */
#include "srv_internal.h"

#include "nz_alloc.h"
#include "nz_translator.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* A translate request's own state (srv_req.task). */
typedef struct tr_state {
    srv_translate_req q; /* the parsed request */
    nz_tr_opts o;        /* the model's defaults with the request's choices applied */
    int joins;           /* continuously batched: an AT request whose texts fit the request pool together */
} tr_state;

static tr_state *TR(const srv_req *r) { return r->task; }

/* The fixed facts of model m's translator. */
static const nz_nat_config *nat_config(const srv_model *m) {
    return nz_nat_get_config(nz_translator_nat(m->impl));
}

/* Whether b can be decoded in one batch with a: same model, and either both continuously batched (each
 * with its own options) or the same options (a static batch: requests too large for the request pool to
 * join, run in chunks). */
static int batchable(const srv_req *a, const srv_req *b) {
    if (!a->s->cfg->batching || a->h != b->h || a->model != b->model) return 0;
    const int ja = TR(a)->joins, jb = TR(b)->joins;
    return ja || jb ? ja && jb : nz_tr_opts_same(&TR(a)->o, &TR(b)->o);
}
/* Build r's 200 response from its results res[0..TR(r)->q.n), or its error response. */
/* The length candidates of t: [{"text", "score", "nat_score", "length", "chosen"}] in candidate order
 * (length without bos/eos; a score that is not a number, an unscorable candidate under rerank, is null). */
static json_t *candidates_json(const nz_tr_result *t) {
    json_t *arr = json_array();
    for (size_t j = 0; arr && j < t->n_cands; j++) {
        const nz_tr_cand *c = &t->cands[j];
        json_array_append_new(
            arr, json_pack("{s:o, s:o, s:o, s:I, s:b}", "text", srv_json_text(c->text, c->text_len), "score",
                           isfinite(c->score) ? json_real(c->score) : json_null(), "nat_score",
                           isfinite(c->nat_score) ? json_real(c->nat_score) : json_null(), "length",
                           (json_int_t)(c->length >= 2 ? c->length - 2 : 0), "chosen", c->chosen));
    }
    return arr;
}

static void respond_translations(srv_req *r, const nz_tr_result *res) {
    const srv_translate_req *q = &TR(r)->q;
    json_t *arr = json_array();
    uint64_t tin = 0, tout = 0;
    for (size_t i = 0; i < q->n; i++) {
        const nz_tr_result *t = &res[i];
        if (t->rc) {
            int st = t->rc == NZ_E_RANGE || t->rc == NZ_E_INVALID_ARG || t->rc == NZ_E_FORMAT ? 422 : 500;
            if (q->single)
                srv_respond_fail(r, st, "%s", t->err.msg);
            else
                srv_respond_fail(r, st, "texts[%zu]: %s", i, t->err.msg);
            json_decref(arr);
            return;
        }
        tin += t->input_tokens >= 2 ? t->input_tokens - 2 : 0;
        tout += t->output_tokens;
        json_t *o1 =
            json_pack("{s:o, s:f}", "text", srv_json_text(t->text, t->text_len), "score", (double)t->score);
        if (o1 && q->return_tokens) {
            json_t *ids = json_array();
            for (size_t k = 0; k < t->n_tokens; k++) json_array_append_new(ids, json_integer(t->tokens[k]));
            json_object_set_new(o1, "tokens", ids);
        }
        if (o1 && t->cands) json_object_set_new(o1, "candidates", candidates_json(t));
        json_array_append_new(arr, o1);
    }
    r->tokens_in = tin;
    r->tokens_out = tout;
    double t1 = nz_now_s();
    srv_respond_json(r, 200,
                     json_pack("{s:s, s:o, s:{s:I, s:I}, s:{s:f, s:f, s:f}}", "model", r->model->cfg->name,
                               "translations", arr, "usage", "input_tokens", (json_int_t)tin, "output_tokens",
                               (json_int_t)tout, "timing_ms", "queue", (r->t_start - r->t0) * 1e3,
                               "inference", (t1 - r->t_start) * 1e3, "total", (t1 - r->t0) * 1e3));
}

/* Translate ids[0..n) in chunks that fit the request memory pool: each chunk, the longest run of texts
 * whose estimated peak fits the pool, reserves its estimate (waiting its turn) and returns it when done.
 * A single text always fits (submit_translate refused the others). @return as nz_translator_run_ids;
 * NZ_E_CANCELLED when the batch was stopped while waiting for memory. */
/* A chunk's reservation, shrunk once mask-predict knows its candidates' width (nz_nat_opts.on_width). */
typedef struct chunk_mem {
    srv_budget *budget;
    const nz_translator *tr;
    const size_t *lens;
    size_t n;
    const nz_tr_opts *o;
    uint64_t reserved;
} chunk_mem;

static void chunk_width(void *arg, size_t W) {
    chunk_mem *c = arg;
    nz_tr_opts o = *c->o;
    o.nat.max_len = (int)W; /* every candidate is at most W long: the estimate for that cap bounds the run */
    const uint64_t est = nz_translator_peak_bytes(c->tr, c->lens, c->n, &o);
    if (est < c->reserved) {
        srv_budget_release(c->budget, c->reserved - est);
        c->reserved = est;
    }
}

static int run_translate_chunks(srv_worker *w, srv_model *model, const int32_t **ids, const size_t *lens,
                                size_t n, const nz_tr_opts *o, srv_batch *b, nz_tr_result *res, nz_error *e) {
    srv_server *s = w->s;
    srv_budget_stats bs;
    srv_budget_get_stats(s->budget, &bs);
    int rc = NZ_OK;
    for (size_t k0 = 0; k0 < n && !rc;) {
        size_t k1 = k0 + 1;
        uint64_t est = nz_translator_peak_bytes(model->impl, lens + k0, 1, o);
        while (k1 < n) {
            uint64_t more = nz_translator_peak_bytes(model->impl, lens + k0, k1 + 1 - k0, o);
            if (more > bs.total) break;
            est = more;
            k1++;
        }
        if (srv_budget_reserve(s->budget, est, srv_batch_all_stopped, b))
            return nz_fail(e, NZ_E_CANCELLED, "stopped while waiting for memory");
        chunk_mem cm = {s->budget, model->impl, lens + k0, k1 - k0, o, est};
        nz_tr_opts co = *o;
        co.nat.on_width = chunk_width;
        co.nat.width_arg = &cm;
        rc = nz_translator_run_ids(w->mc, model->impl, ids + k0, lens + k0, k1 - k0, &co, 1, res + k0, e);
        srv_budget_release(s->budget, cm.reserved);
        if (k1 < n) nz_mem_trim(SRV_TRIM_FREE_BYTES); /* the next chunk reuses the memory */
        k0 = k1;
    }
    return rc;
}

/* Decode the live members of b as one nz_translator_run and answer each of them. */
static void run_translate(srv_worker *w, srv_batch *b) {
    size_t cnt[SRV_BATCH_MAX], total = 0; /* texts of each member, as laid out in the batch */
    for (size_t i = 0; i < b->n; i++)
        if (b->m[i] && srv_req_should_stop(b->m[i])) srv_release_member(b, i);
    for (size_t i = 0; i < b->n; i++) total += cnt[i] = b->m[i] ? TR(b->m[i])->q.n : 0;
    if (!b->live) return;
    const srv_req *r0 = NULL;
    for (size_t i = 0; !r0; i++) r0 = b->m[i];
    srv_model *model = r0->model;
    nz_tr_opts o = TR(r0)->o;
    nz_tr_opts_set_stop(&o, srv_batch_should_stop, b);
    nz_tr_result *res = nz_calloc(total, sizeof *res, NZ_MEM_OTHER);
    const int32_t **ids = nz_calloc(total, sizeof *ids, NZ_MEM_OTHER);
    size_t *lens = nz_calloc(total, sizeof *lens, NZ_MEM_OTHER);
    if (!res || !ids || !lens) {
        for (size_t i = 0; i < b->n; i++)
            if (b->m[i]) srv_respond_fail(b->m[i], 500, "out of memory");
        goto out;
    }
    for (size_t i = 0, k = 0; i < b->n; i++)
        for (size_t j = 0; j < cnt[i]; j++, k++) {
            ids[k] = b->m[i]->ids[j];
            lens[k] = b->m[i]->n_ids[j];
        }
    nz_error e = {0};
    int rc = run_translate_chunks(w, model, ids, lens, total, &o, b, res, &e);
    int fail_status = rc && rc != NZ_E_CANCELLED ? srv_job_failed(model, &e) : 500;
    for (size_t i = 0, k = 0; i < b->n; k += cnt[i], i++) {
        srv_req *r = b->m[i];
        if (!r) continue; /* released early */
        int reason = atomic_load(&r->cancel);
        r->batch_texts = total;
        if (reason || rc == NZ_E_CANCELLED)
            srv_respond_cancelled(r, reason ? reason : CANCEL_SHUTDOWN);
        else if (rc)
            srv_respond_fail(r, fail_status, "translation failed: %s", e.msg);
        else
            respond_translations(r, res + k);
    }
out:
    nz_tr_results_free(res, res ? total : 0);
    nz_free(res);
    nz_free(ids);
    nz_free(lens);
}

/* ------------------------------------------------------------------ continuous batching (AT greedy and beam)
 */

static int cont_joins(const srv_req *r) { return TR(r)->joins; }

static void *cont_create(const srv_req *lead, nz_error *e) {
    nz_tr_batch *tb = NULL;
    if (nz_tr_batch_create(lead->model->impl, &tb, e)) nz_fail_prefix(e, "translation failed: ");
    return tb;
}

static void cont_free(void *c) { nz_tr_batch_free(c); }

static uint64_t cont_estimate(const srv_req *r) {
    return nz_translator_peak_bytes(r->model->impl, r->n_ids, TR(r)->q.n, &TR(r)->o);
}

static uint64_t cont_bound(const void *c, const srv_req *join) {
    if (!join) return c ? nz_tr_batch_bound(NULL, c, NULL, 0, NULL) : 0;
    return nz_tr_batch_bound(join->model->impl, c, join->n_ids, TR(join)->q.n, &TR(join)->o);
}

/* Once its lengths are predicted, a mask-predict request needs only its actual candidates' width. */
static uint64_t cont_estimate_now(const void *c, const srv_req *r) { return nz_tr_batch_member_bytes(c, r); }

static int cont_add(void *c, srv_req *r) {
    nz_error e = {0};
    int rc = nz_tr_batch_add(c, (const int32_t *const *)r->ids, r->n_ids, TR(r)->q.n, &TR(r)->o, 1, r, &e);
    if (rc) srv_respond_fail(r, rc == NZ_E_NOMEM ? 500 : 422, "translation failed: %s", e.msg);
    return rc;
}

static void cont_step(void *c, nz_matmul_ctx *mc) {
    nz_error e = {0};
    nz_tr_batch_step(mc, c, &e); /* a failed step fails every text: each result carries it */
}

static srv_req *cont_take(void *c) {
    void *owner;
    nz_tr_result *res;
    size_t n;
    if (!nz_tr_batch_take(c, &owner, &res, &n)) return NULL;
    srv_req *r = owner;
    const nz_tr_result *bad = NULL; /* a failure of the model or the machine, not of the text */
    for (size_t i = 0; i < n && !bad; i++)
        if (res[i].rc && res[i].rc != NZ_E_RANGE && res[i].rc != NZ_E_INVALID_ARG && res[i].rc != NZ_E_FORMAT)
            bad = &res[i];
    int reason = atomic_load(&r->cancel);
    if (reason || (bad && bad->rc == NZ_E_CANCELLED))
        srv_respond_cancelled(r, reason ? reason : CANCEL_SHUTDOWN);
    else if (bad)
        srv_respond_fail(r, srv_job_failed(r->model, &bad->err), "translation failed: %s", bad->err.msg);
    else
        respond_translations(r, res);
    nz_tr_results_free(res, n);
    nz_free(res);
    return r;
}

static void cont_remove(void *c, srv_req *r) { nz_tr_batch_remove(c, r); }

static size_t cont_size(const void *c) { return nz_tr_batch_size(c); }

/* Every decoder (AT greedy and beam search, mask-predict): continuously batched (srv_run_continuous). */
static const srv_cont_ops CONT = {
    .joins = cont_joins,
    .create = cont_create,
    .free = cont_free,
    .estimate = cont_estimate,
    .bound = cont_bound,
    .estimate_now = cont_estimate_now,
    .add = cont_add,
    .step = cont_step,
    .take = cont_take,
    .remove = cont_remove,
    .size = cont_size,
};

/* Validate a translate request against the model and the token limits and queue it.
 * @return 1 when queued (connection suspended), 0 when a response was decided. */
/* TR(r)->o = m's decoding defaults with r's choices applied (the output cap is max_new_tokens unless
 * the request or the model asks for less). @return 0, or -1 with r's error response decided. */
static int resolve_translate_opts(srv_req *r, const srv_model *m, int max_new_tokens) {
    const srv_translate_req *q = &TR(r)->q;
    nz_tr_choice c;
    nz_tr_choice_init(&c);
    c.decoder = q->use_at;
    c.iterations = q->iterations;
    c.length_beam = q->length_beam;
    c.rerank = q->rerank_at;
    c.adaptive = q->adaptive;
    c.beam_size = q->beam_size;
    TR(r)->o = *nz_translator_defaults(m->impl);
    int model_cap = TR(r)->o.nat.max_len > 2 ? TR(r)->o.nat.max_len - 2 : max_new_tokens;
    c.max_length = q->max_length > 0            ? q->max_length
                   : model_cap < max_new_tokens ? model_cap
                                                : max_new_tokens;
    nz_error e = {0};
    if (nz_tr_choice_apply(&c, &TR(r)->o, &e)) {
        srv_respond_fail(r, 422, "%s", e.msg);
        return -1;
    }
    int at = TR(r)->o.decoder != NZ_TR_NAT;
    if ((at || TR(r)->o.nat.rerank_at) && !nat_config(m)->at_layers) {
        srv_respond_fail(r, 422, "model '%s' has no autoregressive decoder (needed by %s)", m->cfg->name,
                         at ? "decoder \"at\"" : "rerank \"at\"");
        return -1;
    }
    if (q->return_candidates && TR(r)->o.decoder != NZ_TR_NAT) {
        srv_respond_fail(r, 422,
                         "'return_candidates' needs mask-predict: model '%s' decodes with its AT decoder by "
                         "default; add \"decoder\": \"nat\"",
                         m->cfg->name);
        return -1;
    }
    TR(r)->o.return_candidates = q->return_candidates;
    return 0;
}

static int submit_translate(srv_server *s, srv_req *r) {
    const srv_config *cfg = s->cfg;
    srv_error e = {0};
    srv_limits lim = {cfg->max_texts, cfg->max_new_tokens};
    if (!(r->task = nz_calloc(1, sizeof(tr_state), NZ_MEM_OTHER))) {
        srv_respond_fail(r, 500, "out of memory");
        return 0;
    }
    if (srv_parse_translate(r->body, r->body_len, &lim, &TR(r)->q, &e)) {
        srv_respond_error(r, &e);
        return 0;
    }
    srv_model *m = srv_resolve_model(s, r, TR(r)->q.model);
    if (!m) return 0;
    if (resolve_translate_opts(r, m, cfg->max_new_tokens)) return 0;
    r->model = m;
    size_t limit = (size_t)cfg->max_input_tokens;
    const size_t positions = nat_config(m)->max_source_positions;
    if (positions >= 2 && positions - 2 < limit) limit = positions - 2;
    if (srv_alloc_ids(r, TR(r)->q.n)) return 0;
    for (size_t i = 0; i < TR(r)->q.n; i++) {
        nz_error ne = {0};
        if (nz_translator_encode(m->impl, TR(r)->q.texts[i], TR(r)->q.lens[i], &r->ids[i], &r->n_ids[i],
                                 &ne)) {
            srv_respond_fail(r, 422, "%s%zu%s: cannot tokenize: %s", TR(r)->q.single ? "text" : "texts[", i,
                             TR(r)->q.single ? "" : "]", ne.msg);
            return 0;
        }
        size_t n = r->n_ids[i];
        if (n - 2 > limit) {
            if (TR(r)->q.single)
                srv_respond_fail(r, 422, "'text' has %zu tokens; the limit is %zu", n - 2, limit);
            else
                srv_respond_fail(r, 422, "'texts'[%zu] has %zu tokens; the limit is %zu", i, n - 2, limit);
            return 0;
        }
        /* a batch is split into chunks that fit the request pool; a single text must fit on its own */
        if (srv_refuse_oversized(s, r, nz_translator_peak_bytes(m->impl, &r->n_ids[i], 1, &TR(r)->o), i))
            return 0;
    }
    /* a request joins a continuous batch when it fits the pool in a batch of its own (its whole estimate
     * and that batch's bound); one too large runs alone, in chunks that fit */
    srv_budget_stats bs;
    srv_budget_get_stats(s->budget, &bs);
    TR(r)->joins = nz_tr_batch_joins(&TR(r)->o) &&
                   nz_translator_peak_bytes(m->impl, r->n_ids, TR(r)->q.n, &TR(r)->o) <= bs.total &&
                   nz_tr_batch_bound(m->impl, NULL, r->n_ids, TR(r)->q.n, &TR(r)->o) <= bs.total;
    return srv_enqueue(s, r);
}

static size_t texts(const srv_req *r) { return TR(r)->q.n; }

static void label(const srv_req *r, size_t i, char *buf, size_t n) {
    snprintf(buf, n, TR(r)->q.single ? "'text'" : "'texts'[%zu]", i);
}

static void free_req(srv_req *r) {
    tr_state *t = r->task;
    if (!t) return;
    srv_translate_req_free(&t->q);
    nz_free(t);
    r->task = NULL;
}

const srv_handler SRV_TRANSLATE_HANDLER = {
    .path = "/v1/translate",
    .task = &NZ_TASK_TRANSLATE,
    .submit = submit_translate,
    .batchable = batchable,
    .units = texts,
    .texts = texts,
    .label = label,
    .run = run_translate,
    .cont = &CONT,
    .free_req = free_req,
};
