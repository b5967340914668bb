/* srv_dialogue — the /v1/dialogue handler: options, validation and tokenization, the memory
 * check, running a context with every requested decoder (streamed or not), the response. */
#include "srv_internal.h"

#include "nz_alloc.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* The stop hook of a dialogue request (checked before every decoder step). */
static int dialogue_should_stop(void *arg) {
    srv_req *r = arg;
    for (int t = 0; t < r->s->debug_step_delay_ms; t += 5) srv_sleep_ms(5);
    return srv_req_should_stop(r);
}

/* The streaming hook of a dialogue request: one "token" event per generated token. */
static void dialogue_token(void *arg, int decoder, size_t pos, int32_t token, float logprob, const char *text,
                           size_t text_len) {
    srv_req *r = arg;
    (void)pos;
    (void)logprob;
    json_t *j = json_pack("{s:i, s:i, s:o}", "decoder", decoder, "token", (int)token, "text",
                          srv_json_text(text, text_len));
    char *d = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (d) srv_sse_push(r, "token", d, strlen(d));
    nz_free(d); /* jansson allocates through nz_alloc */
}

/* Build r's 200 response from its ranked responses. */
static void respond_dialogue(srv_req *r, const nz_dlg_result *res) {
    json_t *arr = json_array();
    for (size_t i = 0; i < res->n; i++) {
        const nz_dlg_response *p = &res->responses[i];
        json_t *o1 =
            json_pack("{s:i, s:o, s:o}", "decoder", p->decoder, "text", srv_json_text(p->text, p->text_len),
                      "score", isfinite(p->score) ? json_real(p->score) : json_null());
        if (o1 && r->dr.return_tokens) {
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

/* Run one dialogue request (a job of its own: b has one member) and decide its response. */
static void run_dialogue(srv_worker *w, srv_batch *b) {
    srv_req *r = b->m[0];
    if (srv_req_should_stop(r)) {
        srv_respond_cancelled(r, atomic_load(&r->cancel));
        return;
    }
    const srv_dialogue_req *q = &r->dr;
    nz_dlg_opts o = r->dopts;
    o.gen.decoders = q->n_decoders ? q->decoders : NULL;
    o.gen.n_decoders = q->n_decoders;
    o.gen.seed = (uint64_t)q->seed;
    o.gen.stop = dialogue_should_stop;
    o.gen.stop_arg = r;
    if (r->sse) {
        o.on_token = dialogue_token;
        o.token_arg = r;
    }
    nz_dlg_result res;
    nz_error e = {0};
    const uint64_t est = nz_dialogue_peak_bytes(r->model->dlg, r->n_ids[0], &o);
    const int reserved = !srv_budget_reserve(w->s->budget, est, srv_req_stop_hook, r);
    int rc = reserved ? nz_dialogue_run_ids(w->mc, r->model->dlg, r->ids[0], r->n_ids[0], &o, &res, &e)
                      : nz_fail(&e, NZ_E_CANCELLED, "stopped while waiting for memory");
    if (reserved) srv_budget_release(w->s->budget, est);
    int reason = atomic_load(&r->cancel);
    if (reason || rc == NZ_E_CANCELLED) {
        srv_respond_cancelled(r, reason ? reason : CANCEL_SHUTDOWN);
    } else if (rc == NZ_E_RANGE || rc == NZ_E_INVALID_ARG) {
        srv_respond_fail(r, 422, "%s", e.msg);
    } else if (rc) {
        srv_respond_fail(r, srv_job_failed(r->model, &e), "dialogue failed: %s", e.msg);
    } else {
        respond_dialogue(r, &res);
    }
    nz_dlg_result_free(&res);
}

/* r->dopts = m's decoding defaults with r's choices applied (max_new_tokens: the request's, else the
 * model's capped by the server's limit); a strategy option is checked against the strategy in effect.
 * @return 0, or -1 with r's error response decided. */
static int resolve_dialogue_opts(srv_req *r, const srv_model *m, int max_new_tokens) {
    const srv_dialogue_req *q = &r->dr;
    r->dopts = *nz_dialogue_defaults(m->dlg);
    nz_dlg_choice c;
    nz_dlg_choice_init(&c);
    c.strategy = q->strategy;
    c.beam_size = q->beam_size;
    c.temperature = (float)q->temperature;
    c.top_k = q->top_k;
    c.top_p = (float)q->top_p;
    c.no_repeat_ngram = q->no_repeat_ngram;
    c.distinct = q->distinct;
    int model_cap = r->dopts.gen.max_new_tokens;
    c.max_new_tokens = q->max_new_tokens > 0        ? q->max_new_tokens
                       : model_cap < max_new_tokens ? model_cap
                                                    : max_new_tokens;
    srv_error se = {0};
    if (srv_dialogue_check_strategy(q, c.strategy >= 0 ? c.strategy : (int)r->dopts.gen.strategy, &se)) {
        srv_respond_error(r, &se);
        return -1;
    }
    nz_error e = {0};
    if (nz_dlg_choice_apply(&c, &r->dopts, &e)) {
        srv_respond_fail(r, 422, "%s", e.msg);
        return -1;
    }
    return 0;
}

/* Validate a dialogue request against the model and the token limit and queue it.
 * @return 1 when queued, 0 when a response was decided. */
static int submit_dialogue(srv_server *s, srv_req *r) {
    const srv_config *cfg = s->cfg;
    srv_error e = {0};
    srv_limits lim = {cfg->max_texts, cfg->max_new_tokens};
    if (srv_parse_dialogue(r->body, r->body_len, &lim, &r->dr, &e)) {
        srv_respond_error(r, &e);
        return 0;
    }
    const srv_dialogue_req *q = &r->dr;
    srv_model *m = srv_resolve_model(s, r, q->model, SRV_TASK_DIALOGUE);
    if (!m) return 0;
    r->model = m;
    if (resolve_dialogue_opts(r, m, cfg->max_new_tokens)) return 0;
    for (size_t j = 0; j < q->n_decoders; j++)
        if ((size_t)q->decoders[j] >= m->num_modes) {
            srv_respond_fail(r, 422, "'decoders'[%zu]: model '%s' has no decoder %d (it has %zu: 0..%zu)", j,
                             m->cfg->name, q->decoders[j], m->num_modes, m->num_modes - 1);
            return 0;
        }
    nz_error ne = {0};
    if (srv_alloc_ids(r, 1)) return 0;
    if (nz_dialogue_encode(m->dlg, q->turns, q->n_turns, &r->ids[0], &r->n_ids[0], &ne)) {
        srv_respond_fail(r, 422, "'context': cannot tokenize: %s", ne.msg);
        return 0;
    }
    size_t n = r->n_ids[0];
    if (n - 1 > (size_t)cfg->max_input_tokens) { /* the model's own truncation applied, eos not counted */
        srv_respond_fail(r, 422, "'context' has %zu tokens; the limit is %d", n - 1, cfg->max_input_tokens);
        return 0;
    }
    if (srv_refuse_oversized(s, r, nz_dialogue_peak_bytes(m->dlg, n, &r->dopts), 0)) return 0;
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

static size_t one(const srv_req *r) { return 1; }

const srv_handler SRV_DIALOGUE_HANDLER = {SRV_ROUTE_DIALOGUE, submit_dialogue, NULL, one, run_dialogue};
