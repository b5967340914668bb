/* srv_dialogue — the /v1/dialogue handler: options, validation and tokenization, the memory
 * check, running a batch of queued requests (same model and decoding options) as one generation in
 * chunks that fit the memory pool (streamed or not), the responses. */
#include "srv_internal.h"

#include "nz_alloc.h"
#include "nz_dialogue.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* A dialogue request's own state (srv_req.task). */
typedef struct dlg_state {
    srv_dialogue_req q; /* the parsed request */
    nz_dlg_opts o;      /* the model's defaults with the request's choices applied */
} dlg_state;

static dlg_state *DL(const srv_req *r) { return r->task; }

/* The K decoders of model m. */
static size_t num_modes(const srv_model *m) { return nz_dialogue_config(m->impl)->num_modes; }

/* Whether queued b can be decoded together with a: same model, and either both continuously batched
 * (every strategy today: greedy, sampling, beam search; each with its own options) or the same decoding
 * options (a static batch, for a strategy that does not join; streamed and plain requests mix). Never
 * with the config's batching off. */
static int batchable(const srv_req *a, const srv_req *b) {
    if (!a->s->cfg->batching || a->h != b->h || a->model != b->model) return 0;
    const int ja = nz_dlg_batch_joins(&DL(a)->o), jb = nz_dlg_batch_joins(&DL(b)->o);
    return ja || jb ? ja && jb : nz_dlg_opts_same(&DL(a)->o, &DL(b)->o);
}

/* The units of r counted against max_texts when batching: its decoder rows (requested decoders x beam
 * size for beam search, else the decoders), so max_texts bounds the rows a batched decoder step runs. */
static size_t rows(const srv_req *r) {
    const nz_t5md_opts *g = &DL(r)->o.gen;
    const size_t D = g->n_decoders ? g->n_decoders : num_modes(r->model);
    return D * (g->strategy == NZ_T5MD_BEAM ? (size_t)g->beam_size : 1);
}

/* One generation of a dialogue batch: the member each of its contexts belongs to. */
typedef struct dlg_chunk {
    srv_batch *b;
    size_t member[SRV_BATCH_MAX]; /* context c is b->m[member[c]] (NULL once released early) */
} dlg_chunk;

/* One "token" event on r's event stream (nothing for a plain request). */
static void push_token(srv_req *r, int decoder, int32_t token, const char *text, size_t text_len) {
    if (!r || !r->sse) return;
    json_t *j = json_pack("{s:i, s:i, s:o}", "decoder", decoder, "token", (int)token, "text",
                          srv_json_text(text, text_len));
    char *d = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (d) srv_sse_push(r, "token", d, strlen(d));
    nz_free(d); /* jansson allocates through nz_alloc */
}

/* The streaming hook of a dialogue batch: the event goes to the stream of the context's request (none
 * once released early). */
static void dialogue_token(void *arg, size_t context, int decoder, size_t pos, int32_t token, float logprob,
                           const char *text, size_t text_len) {
    dlg_chunk *c = arg;
    (void)pos;
    (void)logprob;
    push_token(c->b->m[c->member[context]], decoder, token, text, text_len);
}

/* The streaming hook of a request in a continuous batch (arg: the request). */
static void request_token(void *arg, size_t context, int decoder, size_t pos, int32_t token, float logprob,
                          const char *text, size_t text_len) {
    (void)context;
    (void)pos;
    (void)logprob;
    push_token(arg, decoder, token, text, text_len);
}

/* Build r's 200 response from its ranked responses. */
static void respond_dialogue(srv_req *r, const nz_dlg_result *res) {
    json_t *arr = json_array();
    for (size_t i = 0; i < res->n; i++) {
        const nz_dlg_response *p = &res->responses[i];
        json_t *o1 = json_pack("{s:i, s:o, s:o, s:o}", "decoder", p->decoder, "text",
                               srv_json_text(p->text, p->text_len), "score",
                               isfinite(p->score) ? json_real(p->score) : json_null(), "consensus",
                               isfinite(p->consensus) ? json_real(p->consensus) : json_null());
        if (o1 && DL(r)->q.return_tokens) {
            json_t *ids = json_array();
            for (size_t k = 0; k < p->n_tokens; k++) json_array_append_new(ids, json_integer(p->tokens[k]));
            json_object_set_new(o1, "tokens", ids);
        }
        json_array_append_new(arr, o1);
    }
    r->tokens_in = res->input_tokens ? res->input_tokens - 1 : 0; /* without eos */
    r->tokens_out = res->output_tokens;
    double t1 = nz_now_s();
    srv_respond_json(r, 200,
                     json_pack("{s:s, s:o, s:{s:I, s:I}, s:{s:f, s:f, s:f}}", "model", r->model->cfg->name,
                               "responses", arr, "usage", "input_tokens", (json_int_t)r->tokens_in,
                               "output_tokens", (json_int_t)r->tokens_out, "timing_ms", "queue",
                               (r->t_start - r->t0) * 1e3, "inference", (t1 - r->t_start) * 1e3, "total",
                               (t1 - r->t0) * 1e3));
}

/* Decide r's response from its outcome: rc (NZ_OK: res is its answer) with e; status: the one to answer
 * a failure that is neither a cancellation nor a bad option (srv_job_failed's). */
static void respond_outcome(srv_req *r, int rc, const nz_error *e, int status, const nz_dlg_result *res) {
    int reason = atomic_load(&r->cancel);
    if (reason || rc == NZ_E_CANCELLED)
        srv_respond_cancelled(r, reason ? reason : CANCEL_SHUTDOWN);
    else if (rc == NZ_E_RANGE || rc == NZ_E_INVALID_ARG)
        srv_respond_fail(r, 422, "%s", e->msg);
    else if (rc)
        srv_respond_fail(r, status, "dialogue failed: %s", e->msg);
    else
        respond_dialogue(r, res);
}

/* Whether a failure rc is the model's or the machine's (not a cancellation or a bad option). */
static int job_error(int rc) {
    return rc && rc != NZ_E_CANCELLED && rc != NZ_E_RANGE && rc != NZ_E_INVALID_ARG;
}

/* Generate the live members of b from index *i0 on that fit the request memory pool together (the longest
 * such run, at least one) as one nz_dialogue_run_batch with options o, reserving its estimate while it runs,
 * and decide each one's response; *i0 moves past them. @return 0, or -1 when the batch was stopped while
 * waiting for memory (every member then released). */
static int run_dialogue_chunk(srv_worker *w, srv_batch *b, const nz_dlg_opts *o, size_t *i0) {
    srv_server *s = w->s;
    srv_model *model = NULL;
    srv_budget_stats bs;
    srv_budget_get_stats(s->budget, &bs);
    dlg_chunk c = {b, {0}};
    nz_dlg_opts co = *o;
    /* streaming costs a text decoding per token: only when a member is streamed */
    for (size_t i = *i0; i < b->n && !co.on_token; i++)
        if (b->m[i] && b->m[i]->sse) {
            co.on_token = dialogue_token;
            co.token_arg = &c;
        }
    const int32_t *ids[SRV_BATCH_MAX];
    size_t lens[SRV_BATCH_MAX], B = 0, i = *i0;
    uint64_t seeds[SRV_BATCH_MAX], est = 0;
    for (; i < b->n; i++) {
        const srv_req *r = b->m[i];
        if (!r) continue; /* released early */
        lens[B] = r->n_ids[0];
        const uint64_t more = nz_dialogue_batch_peak_bytes(r->model->impl, lens, B + 1, &co);
        if (B && more > bs.total) break;
        est = more;
        ids[B] = r->ids[0];
        seeds[B] = (uint64_t)DL(r)->q.seed;
        c.member[B++] = i;
        model = r->model;
    }
    *i0 = i;
    if (!B) return 0;
    if (srv_budget_reserve(s->budget, est, srv_batch_all_stopped, b)) return -1;
    co.gen.seeds = seeds;
    co.gen.stop = srv_batch_should_stop; /* also the NZSERVE_DEBUG_STEP_DELAY_MS sleep before every step */
    co.gen.stop_arg = b;
    nz_dlg_result res[SRV_BATCH_MAX];
    nz_error e = {0};
    int rc = nz_dialogue_run_batch(w->mc, model->impl, ids, lens, B, &co, res, &e);
    srv_budget_release(s->budget, est);
    const int status = job_error(rc) ? srv_job_failed(model, &e) : 500;
    for (size_t k = 0; k < B; k++) {
        srv_req *r = b->m[c.member[k]];
        if (r) {
            r->batch_texts = B;
            if (rc)
                respond_outcome(r, rc, &e, status, NULL);
            else
                respond_outcome(r, res[k].rc, &res[k].err,
                                job_error(res[k].rc) ? srv_job_failed(model, &res[k].err) : 500, &res[k]);
        }
        nz_dlg_result_free(&res[k]);
    }
    return 0;
}

/* ------------------------------------------------------------------ continuous batching */

static int cont_joins(const srv_req *r) { return nz_dlg_batch_joins(&DL(r)->o); }

static void *cont_create(const srv_req *lead, nz_error *e) {
    nz_dlg_batch *db = NULL;
    if (nz_dlg_batch_create(lead->model->impl, &db, e)) nz_fail_prefix(e, "dialogue failed: ");
    return db;
}

static void cont_free(void *c) { nz_dlg_batch_free(c); }

static uint64_t cont_estimate(const srv_req *r) {
    return nz_dialogue_peak_bytes(r->model->impl, r->n_ids[0], &DL(r)->o);
}

/* The options r generates with (streamed: with its token hook). */
static nz_dlg_opts run_opts(srv_req *r, int stream) {
    nz_dlg_opts o = DL(r)->o;
    o.gen.seed = (uint64_t)DL(r)->q.seed;
    o.on_token = stream ? request_token : NULL;
    o.token_arg = r;
    return o;
}

static uint64_t cont_bound(const void *c, const srv_req *join) {
    if (!join) return nz_dlg_batch_bound(NULL, c, 0, NULL);
    nz_dlg_opts o = DL(join)->o; /* as run_opts gives them; the bound reads only whether it streams */
    o.on_token = join->sse ? request_token : NULL;
    return nz_dlg_batch_bound(join->model->impl, c, join->n_ids[0], &o);
}

static int cont_add(void *c, srv_req *r) {
    const nz_dlg_opts o = run_opts(r, r->sse);
    nz_error e = {0};
    int rc = nz_dlg_batch_add(c, r->ids[0], r->n_ids[0], &o, r, &e);
    if (rc) respond_outcome(r, rc, &e, 500, NULL);
    return rc;
}

static void cont_step(void *c, nz_matmul_ctx *mc) {
    nz_error e = {0};
    nz_dlg_batch_step(mc, c, &e); /* a failed step fails every member: each result carries it */
}

static srv_req *cont_take(void *c) {
    void *owner;
    nz_dlg_result res;
    if (!nz_dlg_batch_take(c, &owner, &res)) return NULL;
    srv_req *r = owner;
    respond_outcome(r, res.rc, &res.err, job_error(res.rc) ? srv_job_failed(r->model, &res.err) : 500, &res);
    nz_dlg_result_free(&res);
    return r;
}

static void cont_remove(void *c, srv_req *r) { nz_dlg_batch_remove(c, r); }

static size_t cont_size(const void *c) { return nz_dlg_batch_size(c); }

/* Greedy and sampled requests: continuously batched (srv_run_continuous). */
static const srv_cont_ops CONT = {
    .joins = cont_joins,
    .create = cont_create,
    .free = cont_free,
    .estimate = cont_estimate,
    .bound = cont_bound,
    .add = cont_add,
    .step = cont_step,
    .take = cont_take,
    .remove = cont_remove,
    .size = cont_size,
};

/* ------------------------------------------------------------------ the handler */

/* Run the live members of b (same model and decoding options; beam search, or anything with batching
 * off) as one generation, in chunks that fit the request memory pool, and decide each one's response;
 * members released early are answered at once and their results ignored. */
static void run_dialogue(srv_worker *w, srv_batch *b) {
    for (size_t i = 0; i < b->n; i++)
        if (b->m[i] && srv_req_should_stop(b->m[i])) srv_release_member(b, i);
    if (!b->live) return;
    const srv_req *r0 = NULL;
    for (size_t i = 0; !r0; i++) r0 = b->m[i];
    /* the shared options, with their decoders copied: r0 may be released (and freed) while they are used */
    int decoders[SRV_MAX_DECODERS];
    nz_dlg_opts o = DL(r0)->o;
    if (o.gen.n_decoders) {
        memcpy(decoders, o.gen.decoders, o.gen.n_decoders * sizeof *decoders);
        o.gen.decoders = decoders;
    }
    for (size_t i0 = 0; i0 < b->n;) {
        if (run_dialogue_chunk(w, b, &o, &i0)) return;   /* stopped while waiting for memory: all released */
        if (i0 < b->n) nz_mem_trim(SRV_TRIM_FREE_BYTES); /* the next chunk reuses the memory */
    }
}

/* DL(r)->o = m's decoding defaults with r's choices applied (max_new_tokens: the request's, else the
 * model's capped by the server's limit); a strategy option is checked against the strategy in effect.
 * @return 0, or -1 with r's error response decided. */
static int resolve_dialogue_opts(srv_req *r, const srv_model *m, int max_new_tokens) {
    const srv_dialogue_req *q = &DL(r)->q;
    DL(r)->o = *nz_dialogue_defaults(m->impl);
    nz_dlg_choice c;
    nz_dlg_choice_init(&c);
    c.strategy = q->strategy;
    c.beam_size = q->beam_size;
    c.length_penalty = (float)q->length_penalty;
    c.temperature = (float)q->temperature;
    c.top_k = q->top_k;
    c.top_p = (float)q->top_p;
    c.no_repeat_ngram = q->no_repeat_ngram;
    c.distinct = q->distinct;
    c.rank = q->rank;
    int model_cap = DL(r)->o.gen.max_new_tokens;
    c.max_new_tokens = q->max_new_tokens > 0        ? q->max_new_tokens
                       : model_cap < max_new_tokens ? model_cap
                                                    : max_new_tokens;
    srv_error se = {0};
    if (srv_dialogue_check_strategy(q, c.strategy >= 0 ? c.strategy : (int)DL(r)->o.gen.strategy, &se)) {
        srv_respond_error(r, &se);
        return -1;
    }
    nz_error e = {0};
    if (nz_dlg_choice_apply(&c, &DL(r)->o, &e)) {
        srv_respond_fail(r, 422, "%s", e.msg);
        return -1;
    }
    DL(r)->o.gen.decoders = q->n_decoders ? q->decoders : NULL; /* r's own array: valid while r lives */
    DL(r)->o.gen.n_decoders = q->n_decoders;
    return 0;
}

/* Validate a dialogue request against the model and the token limit and queue it.
 * @return 1 when queued, 0 when a response was decided. */
static int submit_dialogue(srv_server *s, srv_req *r) {
    const srv_config *cfg = s->cfg;
    srv_error e = {0};
    srv_limits lim = {cfg->max_texts, cfg->max_new_tokens};
    if (!(r->task = nz_calloc(1, sizeof(dlg_state), NZ_MEM_OTHER))) {
        srv_respond_fail(r, 500, "out of memory");
        return 0;
    }
    if (srv_parse_dialogue(r->body, r->body_len, &lim, &DL(r)->q, &e)) {
        srv_respond_error(r, &e);
        return 0;
    }
    const srv_dialogue_req *q = &DL(r)->q;
    srv_model *m = srv_resolve_model(s, r, q->model);
    if (!m) return 0;
    r->model = m;
    if (resolve_dialogue_opts(r, m, cfg->max_new_tokens)) return 0;
    for (size_t j = 0; j < q->n_decoders; j++)
        if ((size_t)q->decoders[j] >= num_modes(m)) {
            srv_respond_fail(r, 422, "'decoders'[%zu]: model '%s' has no decoder %d (it has %zu: 0..%zu)", j,
                             m->cfg->name, q->decoders[j], num_modes(m), num_modes(m) - 1);
            return 0;
        }
    nz_error ne = {0};
    if (srv_alloc_ids(r, 1)) return 0;
    if (nz_dialogue_encode(m->impl, q->turns, q->n_turns, &r->ids[0], &r->n_ids[0], &ne)) {
        srv_respond_fail(r, 422, "'context': cannot tokenize: %s", ne.msg);
        return 0;
    }
    size_t n = r->n_ids[0];
    if (n - 1 > (size_t)cfg->max_input_tokens) { /* the model's own truncation applied, eos not counted */
        srv_respond_fail(r, 422, "'context' has %zu tokens; the limit is %d", n - 1, cfg->max_input_tokens);
        return 0;
    }
    uint64_t est = nz_dialogue_peak_bytes(m->impl, n, &DL(r)->o);
    if (s->cfg->batching && cont_joins(r)) { /* it runs in a continuous batch: one of its own at least */
        const nz_dlg_opts o = run_opts(r, q->stream);
        const uint64_t fresh = nz_dlg_batch_bound(m->impl, NULL, n, &o);
        est = fresh > est ? fresh : est;
    }
    if (srv_refuse_oversized(s, r, est, 0)) return 0;
    if (q->stream) {
        if (pthread_mutex_init(&r->smu, NULL)) {
            srv_respond_fail(r, 500, "cannot create the event stream");
            return 0;
        }
        r->smu_init = 1;
        r->sse = 1;
    }
    return srv_enqueue(s, r);
}

static size_t turns(const srv_req *r) { return DL(r)->q.n_turns; }

static void label(const srv_req *r, size_t i, char *buf, size_t n) {
    (void)r;
    (void)i;
    snprintf(buf, n, "the context");
}

static void free_req(srv_req *r) {
    dlg_state *d = r->task;
    if (!d) return;
    srv_dialogue_req_free(&d->q);
    nz_free(d);
    r->task = NULL;
}

const srv_handler SRV_DIALOGUE_HANDLER = {
    .path = "/v1/dialogue",
    .task = &NZ_TASK_DIALOGUE,
    .submit = submit_dialogue,
    .batchable = batchable,
    .units = rows,
    .texts = turns,
    .label = label,
    .run = run_dialogue,
    .cont = &CONT,
    .free_req = free_req,
};
