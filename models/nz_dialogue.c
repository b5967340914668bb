/* nz_dialogue — see nz_dialogue.h. */
#include "nz_dialogue.h"
#include "nz_task.h"

#include "nz_alloc.h"
#include "nz_container.h"
#include "nz_mconfig.h"

#include <math.h>
#include <string.h>

struct nz_dialogue {
    nz_model *model;      /* the mapped .nzp */
    nz_t5md *t5md;        /* network, borrows model */
    nz_t5md_tok *tok;     /* tokenizer from the embedded spm.model + config.json */
    nz_dlg_opts defaults; /* nz_dlg_opts_default + config "generation" */
};

void nz_dlg_opts_default(nz_dlg_opts *o) {
    memset(o, 0, sizeof *o);
    nz_t5md_opts_default(&o->gen);
}

void nz_dlg_choice_init(nz_dlg_choice *c) {
    c->strategy = c->beam_size = c->top_k = c->max_new_tokens = c->no_repeat_ngram = c->distinct = c->rank =
        -1;
    c->temperature = c->top_p = c->length_penalty = NAN;
}

static const char *const STRATEGIES[] = {"greedy", "beam", "sample"}; /* nz_t5md_strategy order */
static const char *const RANKS[] = {"logprob", "consensus"};          /* nz_dlg_rank order */

const char *nz_dlg_rank_name(nz_dlg_rank rank) { return rank == NZ_DLG_RANK_CONSENSUS ? RANKS[1] : RANKS[0]; }

int nz_dlg_rank_parse(const char *name, nz_dlg_rank *rank) {
    for (int i = 0; i < 2; i++)
        if (!strcmp(name, RANKS[i])) {
            *rank = (nz_dlg_rank)i;
            return NZ_OK;
        }
    return NZ_E_INVALID_ARG;
}

int nz_dlg_choice_from_json(const json_t *obj, const char *what, nz_dlg_choice *c, nz_error *err) {
    static const char *const known[] = {"strategy", "beam_size", "length_penalty", "temperature",
                                        "top_k",    "top_p",     "max_new_tokens", "no_repeat_ngram_size",
                                        "distinct", "rank"};
    nz_dlg_choice_init(c);
    if (!obj) return NZ_OK;
    if (!json_is_object(obj)) return nz_fail(err, NZ_E_FORMAT, "%s must be an object", what);
    int rc = nz_gen_keys(obj, what, known, sizeof known / sizeof *known, err);
    if (!rc) rc = nz_gen_enum(obj, what, "strategy", STRATEGIES, 3, &c->strategy, err);
    if (!rc) rc = nz_gen_int(obj, what, "beam_size", 1, NZ_T5MD_MAX_BEAM, &c->beam_size, err);
    if (!rc)
        rc = nz_gen_number(obj, what, "length_penalty", 0, 0, NZ_DLG_MAX_LENGTH_PENALTY, &c->length_penalty,
                           err);
    if (!rc) rc = nz_gen_number(obj, what, "temperature", 0, 0, 100, &c->temperature, err);
    if (!rc) rc = nz_gen_int(obj, what, "top_k", 0, 1000000, &c->top_k, err);
    if (!rc) rc = nz_gen_number(obj, what, "top_p", 0, 1, 1, &c->top_p, err);
    if (!rc) rc = nz_gen_int(obj, what, "max_new_tokens", 1, NZ_T5MD_MAX_NEW_TOKENS, &c->max_new_tokens, err);
    if (!rc)
        rc = nz_gen_int(obj, what, "no_repeat_ngram_size", 0, NZ_T5MD_MAX_NEW_TOKENS, &c->no_repeat_ngram,
                        err);
    if (!rc) rc = nz_gen_bool(obj, what, "distinct", &c->distinct, err);
    if (!rc) rc = nz_gen_enum(obj, what, "rank", RANKS, 2, &c->rank, err);
    return rc;
}

int nz_dlg_choice_apply(const nz_dlg_choice *c, nz_dlg_opts *o, nz_error *err) {
    if (c->strategy > NZ_T5MD_SAMPLE || c->beam_size == 0 || c->beam_size > NZ_T5MD_MAX_BEAM ||
        c->temperature < 0 || c->top_k < -1 || c->top_p <= 0 || c->top_p > 1 || c->max_new_tokens == 0 ||
        c->max_new_tokens > NZ_T5MD_MAX_NEW_TOKENS || c->no_repeat_ngram > NZ_T5MD_MAX_NEW_TOKENS ||
        c->distinct > 1 || c->rank > NZ_DLG_RANK_CONSENSUS || c->length_penalty < 0 ||
        c->length_penalty > NZ_DLG_MAX_LENGTH_PENALTY)
        return nz_fail(err, NZ_E_INVALID_ARG,
                       "dialogue options out of range: strategy %d, beam_size %d, length_penalty %g, "
                       "temperature %g, top_k %d, top_p %g, max_new_tokens %d, no_repeat_ngram_size %d",
                       c->strategy, c->beam_size, (double)c->length_penalty, (double)c->temperature, c->top_k,
                       (double)c->top_p, c->max_new_tokens, c->no_repeat_ngram);
    if (c->strategy >= 0) o->gen.strategy = (nz_t5md_strategy)c->strategy;
    if (c->beam_size > 0) o->gen.beam_size = c->beam_size;
    if (!isnan(c->length_penalty)) o->gen.length_penalty = c->length_penalty;
    if (!isnan(c->temperature)) o->gen.temperature = c->temperature;
    if (c->top_k >= 0) o->gen.top_k = (uint32_t)c->top_k;
    if (!isnan(c->top_p)) o->gen.top_p = c->top_p;
    if (c->max_new_tokens > 0) o->gen.max_new_tokens = c->max_new_tokens;
    if (c->no_repeat_ngram >= 0) o->gen.no_repeat_ngram = c->no_repeat_ngram;
    if (c->distinct >= 0) o->distinct = c->distinct;
    if (c->rank >= 0) o->rank = (nz_dlg_rank)c->rank;
    return NZ_OK;
}

int nz_dlg_opts_same(const nz_dlg_opts *a, const nz_dlg_opts *b) {
    const nz_t5md_opts *x = &a->gen, *y = &b->gen;
    const size_t nx = x->decoders ? x->n_decoders : 0, ny = y->decoders ? y->n_decoders : 0;
    if (nx != ny || (nx && memcmp(x->decoders, y->decoders, nx * sizeof *x->decoders))) return 0;
    return x->strategy == y->strategy && x->max_new_tokens == y->max_new_tokens && x->ban_unk == y->ban_unk &&
           x->no_repeat_ngram == y->no_repeat_ngram && x->beam_size == y->beam_size &&
           x->length_penalty == y->length_penalty && x->early_stopping == y->early_stopping &&
           x->num_return == y->num_return && x->temperature == y->temperature && x->top_k == y->top_k &&
           x->top_p == y->top_p && a->distinct == b->distinct && a->rank == b->rank;
}

json_t *nz_dlg_opts_to_json(const nz_dlg_opts *o) {
    const nz_t5md_opts *g = &o->gen;
    int s = g->strategy >= NZ_T5MD_GREEDY && g->strategy <= NZ_T5MD_SAMPLE ? (int)g->strategy : 0;
    return json_pack("{s:s, s:i, s:o, s:o, s:I, s:o, s:i, s:i, s:b, s:s}", "strategy", STRATEGIES[s],
                     "beam_size", g->beam_size, "length_penalty", nz_gen_real(g->length_penalty),
                     "temperature", nz_gen_real(g->temperature), "top_k", (json_int_t)g->top_k, "top_p",
                     nz_gen_real(g->top_p), "max_new_tokens", g->max_new_tokens, "no_repeat_ngram_size",
                     g->no_repeat_ngram, "distinct", o->distinct, "rank", nz_dlg_rank_name(o->rank));
}

/* The model's defaults: nz_dlg_opts_default + its config's "generation". @return NZ_OK or an error. */
static int read_defaults(nz_dialogue *d, nz_error *err) {
    nz_dlg_opts_default(&d->defaults);
    const json_t *cfg = nz_model_config(d->model);
    nz_dlg_choice c;
    int rc = nz_dlg_choice_from_json(cfg ? nz_cfg_get(cfg, "generation") : NULL, "config.json generation", &c,
                                     err);
    return rc ? rc : nz_dlg_choice_apply(&c, &d->defaults, err);
}

void nz_dlg_result_free(nz_dlg_result *r) {
    if (!r) return;
    for (size_t i = 0; r->responses && i < r->n; i++) {
        nz_free(r->responses[i].text);
        nz_free(r->responses[i].tokens);
    }
    nz_free(r->responses);
    memset(r, 0, sizeof *r);
}

int nz_dialogue_open(const char *path, nz_dialogue **out, nz_error *err) {
    *out = NULL;
    nz_dialogue *d = nz_calloc(1, sizeof *d, NZ_MEM_OTHER);
    if (!d) return nz_fail(err, NZ_E_NOMEM, "%s: out of memory", path);
    int rc = nz_model_open(path, &d->model, err);
    if (!rc && (rc = nz_t5md_load(d->model, &d->t5md, err))) nz_fail_prefix(err, "%s: ", path);
    if (!rc && (rc = nz_t5md_tok_load(d->model, nz_t5md_get_config(d->t5md), &d->tok, err)))
        nz_fail_prefix(err, "%s: ", path);
    if (!rc && (rc = read_defaults(d, err))) nz_fail_prefix(err, "%s: ", path);
    if (rc) {
        nz_dialogue_free(d);
        return rc;
    }
    *out = d;
    return NZ_OK;
}

void nz_dialogue_free(nz_dialogue *d) {
    if (!d) return;
    nz_t5md_tok_free(d->tok);
    nz_t5md_free(d->t5md);
    nz_model_free(d->model);
    nz_free(d);
}

const nz_dlg_opts *nz_dialogue_defaults(const nz_dialogue *d) { return &d->defaults; }
const nz_model *nz_dialogue_model(const nz_dialogue *d) { return d->model; }
const nz_t5md *nz_dialogue_t5md(const nz_dialogue *d) { return d->t5md; }
const nz_t5md_tok *nz_dialogue_tok(const nz_dialogue *d) { return d->tok; }
const nz_t5md_config *nz_dialogue_config(const nz_dialogue *d) { return nz_t5md_get_config(d->t5md); }

int nz_dialogue_encode(const nz_dialogue *d, const char *const *turns, size_t n_turns, int32_t **ids,
                       size_t *n, nz_error *err) {
    return nz_t5md_encode_context(d->tok, turns, NULL, n_turns, ids, n, err);
}

static int is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

size_t nz_dlg_normalize(const char *text, size_t len, char *out) {
    size_t o = 0;
    int gap = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        if (is_space(c)) {
            gap = o > 0;
            continue;
        }
        if (gap) out[o++] = ' ';
        gap = 0;
        out[o++] = (char)(c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c);
    }
    out[o] = 0;
    return o;
}

/* ------------------------------------------------------------------ streaming */

/** State of the streaming hook: the tokens so far of every (context, requested decoder) item and the
 *  bytes of its text already reported; item b * D + j is context b's j-th requested decoder. */
typedef struct dlg_stream {
    const nz_dialogue *d;
    const nz_dlg_opts *o;
    const int *slot; /* [K] decoder k -> its slot j, -1 when not requested */
    size_t B, D;     /* contexts, requested decoders */
    int32_t *tok;    /* [B x D x cap] tokens of each item */
    size_t *n;       /* [B x D] tokens so far */
    size_t *shown;   /* [B x D] text bytes reported so far */
    int *broken;     /* [B x D] decoding failed: report tokens without text from then on */
    size_t cap, max; /* tokens an item can hold; max_new_tokens */
} dlg_stream;

/* Streaming state for B contexts of D requested decoders (slot: decoder_slots'). @return NZ_OK or
 * NZ_E_NOMEM. */
static int stream_init(dlg_stream *st, const nz_dialogue *d, const nz_dlg_opts *o, const int *slot, size_t B,
                       size_t D, nz_error *err) {
    st->d = d;
    st->o = o;
    st->slot = slot;
    st->B = B;
    st->D = D;
    st->max = (size_t)o->gen.max_new_tokens;
    st->cap = st->max + 1;
    st->tok = nz_malloc(B * D * st->cap * sizeof *st->tok, NZ_MEM_OTHER);
    st->n = nz_calloc(B * D, sizeof *st->n, NZ_MEM_OTHER);
    st->shown = nz_calloc(B * D, sizeof *st->shown, NZ_MEM_OTHER);
    st->broken = nz_calloc(B * D, sizeof *st->broken, NZ_MEM_OTHER);
    if (!st->tok || !st->n || !st->shown || !st->broken)
        return nz_fail(err, NZ_E_NOMEM, "dialogue: out of memory");
    return NZ_OK;
}

static void stream_free(dlg_stream *st) {
    nz_free(st->tok);
    nz_free(st->n);
    nz_free(st->shown);
    nz_free(st->broken);
    memset(st, 0, sizeof *st);
}

static int ends_with_replacement(const char *s, size_t n) {
    return n >= 3 && (unsigned char)s[n - 3] == 0xEF && (unsigned char)s[n - 2] == 0xBF &&
           (unsigned char)s[n - 1] == 0xBD;
}

static void stream_token(void *arg, size_t context, int k, size_t pos, int32_t token, float logprob) {
    dlg_stream *st = arg;
    const int j = k >= 0 && (size_t)k < nz_t5md_get_config(st->d->t5md)->num_modes ? st->slot[k] : -1;
    if (j < 0 || context >= st->B) return;
    const size_t it = context * st->D + (size_t)j;
    int32_t *toks = st->tok + it * st->cap;
    if (st->n[it] < st->cap) toks[st->n[it]++] = token;
    char *text = NULL;
    size_t len = 0, from = st->shown[it];
    if (!st->broken[it]) {
        nz_error e = {0};
        if (nz_t5md_decode_text(st->d->tok, toks, st->n[it], &text, &len, &e)) {
            st->broken[it] = 1;
            len = 0;
        }
    }
    const int last = token == NZ_T5MD_EOS || pos + 1 >= st->max;
    size_t end = len;
    if (!last)
        while (end > from && ends_with_replacement(text, end)) end -= 3; /* an incomplete character */
    const char *piece = "";
    size_t plen = 0;
    if (text && end > from) {
        piece = text + from;
        plen = end - from;
        text[end] = 0;
        st->shown[it] = end;
    }
    st->o->on_token(st->o->token_arg, context, k, pos, token, logprob, piece, plen);
    nz_free(text);
}

/* ------------------------------------------------------------------ run */

/* Beam returns generated per (context, decoder): the consensus ranking of beam search pools every
 * hypothesis of the final beams (beam_size each); otherwise 1. */
static size_t pooled_returns(const nz_dlg_opts *o) {
    return o->rank == NZ_DLG_RANK_CONSENSUS && o->gen.strategy == NZ_T5MD_BEAM && o->gen.beam_size > 1
               ? (size_t)o->gen.beam_size
               : 1;
}

/* The generation options nz_dialogue passes on: num_return pooled_returns(o); the streaming hook only
 * when tokens can be reported as generated (R == 1; pooled responses are reported once chosen). */
static nz_t5md_opts gen_opts(const nz_dlg_opts *o, dlg_stream *st) {
    nz_t5md_opts gen = o->gen;
    gen.num_return = (int)pooled_returns(o);
    gen.on_token = st && gen.num_return == 1 ? stream_token : NULL;
    gen.token_arg = gen.on_token ? st : NULL;
    return gen;
}

/* The requested decoders of o: slot[k] (K entries) = j for the j-th, -1 for the others; *D their count.
 * @return NZ_OK, or NZ_E_INVALID_ARG / NZ_E_RANGE (none, one out of range or repeated, max_new_tokens). */
static int decoder_slots(const nz_dialogue *d, const nz_dlg_opts *o, int *slot, size_t *D, nz_error *err) {
    const size_t K = nz_t5md_get_config(d->t5md)->num_modes;
    const int all = !o->gen.decoders || !o->gen.n_decoders;
    *D = all ? K : o->gen.n_decoders;
    if (!*D) return nz_fail(err, NZ_E_INVALID_ARG, "dialogue: no decoder requested");
    if (o->gen.max_new_tokens < 0 || o->gen.max_new_tokens > NZ_T5MD_MAX_NEW_TOKENS)
        return nz_fail(err, NZ_E_RANGE, "dialogue: max_new_tokens %d is outside 0..%d", o->gen.max_new_tokens,
                       NZ_T5MD_MAX_NEW_TOKENS);
    for (size_t k = 0; k < K; k++) slot[k] = -1;
    for (size_t j = 0; j < *D; j++) {
        const int k = all ? (int)j : o->gen.decoders[j];
        if (k < 0 || (size_t)k >= K)
            return nz_fail(err, NZ_E_RANGE,
                           "dialogue: decoder %d is out of range (the model has %zu decoder%s)", k, K,
                           K == 1 ? "" : "s");
        if (slot[k] >= 0) return nz_fail(err, NZ_E_INVALID_ARG, "dialogue: decoder %d is requested twice", k);
        slot[k] = (int)j;
    }
    return NZ_OK;
}

/* Report the chosen responses g[0..D) of context b through the streaming hook (pooled responses are
 * known only once every decoder is done), decoder by decoder. */
static void stream_chosen(dlg_stream *st, size_t b, const nz_t5md_result *g, size_t D) {
    for (size_t j = 0; j < D; j++)
        for (size_t t = 0; t < g[j].n; t++)
            stream_token(st, b, g[j].decoder, t, g[j].tokens[t], g[j].logprobs[t]);
}

/* One context's answer from its generated results g[0..D x R) (R beam returns per decoder: pooled
 * consensus; a context error there becomes res->rc): choose, rank, decode, filter; the kept responses'
 * tokens move into res. st (NULL: not streaming) reports pooled responses as context b. order, norm:
 * scratch of D entries (norm's strings are freed here).
 * @return NZ_OK, or an error (res then holds what it has: the caller frees it). */
static int finish_context(const nz_dialogue *d, const nz_dlg_opts *o, nz_t5md_result *g, size_t D, size_t R,
                          dlg_stream *st, size_t b, size_t *order, char **norm, nz_dlg_result *res,
                          nz_error *err) {
    for (size_t i = 0; i < D * R; i++)
        if (g[i].rc) {
            res->rc = g[i].rc;
            res->err = g[i].err;
            nz_fail_prefix(&res->err, "dialogue: ");
            return NZ_OK;
        }
    int rc = NZ_OK;
    res->responses = nz_calloc(D, sizeof *res->responses, NZ_MEM_OTHER);
    if (!res->responses) return nz_fail(err, NZ_E_NOMEM, "dialogue: out of memory");
    res->generated = D;
    if (R > 1) {
        nz_t5md_consensus_pool(g, D, R);
        if (st) stream_chosen(st, b, g, D);
    } else
        nz_t5md_consensus(g, D);
    for (size_t i = 0; i < D; i++) res->output_tokens += g[i].n - (g[i].finished ? 1 : 0);
    nz_t5md_rank(g, D, o->rank == NZ_DLG_RANK_CONSENSUS ? NZ_T5MD_RANK_CONSENSUS : NZ_T5MD_RANK_MEAN_LOGPROB,
                 order);
    for (size_t q = 0; q < D; q++) {
        nz_t5md_result *gr = &g[order[q]];
        nz_dlg_response *r = &res->responses[res->n];
        if ((rc = nz_t5md_decode_text(d->tok, gr->tokens, gr->n, &r->text, &r->text_len, err))) {
            nz_fail_prefix(err, "dialogue: decoder %d: ", gr->decoder);
            break;
        }
        if (o->distinct) {
            char *nt = nz_malloc(r->text_len + 1, NZ_MEM_OTHER);
            if (!nt) {
                rc = nz_fail(err, NZ_E_NOMEM, "dialogue: out of memory");
                break;
            }
            nz_dlg_normalize(r->text, r->text_len, nt);
            int dup = 0;
            for (size_t i = 0; i < res->n && !dup; i++) dup = !strcmp(norm[i], nt);
            if (dup) {
                nz_free(nt);
                nz_free(r->text);
                memset(r, 0, sizeof *r);
                continue;
            }
            norm[res->n] = nt;
        }
        r->decoder = gr->decoder;
        r->tokens = gr->tokens;
        r->n_tokens = gr->n;
        gr->tokens = NULL;
        gr->n = 0;
        r->output_tokens = r->n_tokens - (gr->finished ? 1 : 0);
        r->score = gr->mean_logprob;
        r->beam_score = gr->beam_score;
        r->consensus = gr->consensus;
        r->finished = gr->finished;
        res->n++;
    }
    if (rc) { /* the failed response's text, not yet counted in res->n */
        nz_free(res->responses[res->n].text);
        res->responses[res->n].text = NULL;
    }
    for (size_t i = 0; i < D; i++) {
        nz_free(norm[i]);
        norm[i] = NULL;
    }
    return rc;
}

int nz_dialogue_run_batch(nz_matmul_ctx *mc, const nz_dialogue *d, const int32_t *const *ids,
                          const size_t *n_ids, size_t B, const nz_dlg_opts *o, nz_dlg_result *res,
                          nz_error *err) {
    for (size_t b = 0; b < B; b++) memset(&res[b], 0, sizeof res[b]);
    if (!B) return nz_fail(err, NZ_E_INVALID_ARG, "dialogue: no context");
    const size_t K = nz_t5md_get_config(d->t5md)->num_modes;
    int rc = NZ_OK;
    nz_t5md_result *gres = NULL;
    size_t nres = 0, D = 0, *order = NULL;
    char **norm = NULL;
    dlg_stream st;
    memset(&st, 0, sizeof st);
    int *slot = nz_malloc(K * sizeof *slot, NZ_MEM_OTHER);
    if (!slot) {
        rc = nz_fail(err, NZ_E_NOMEM, "dialogue: out of memory");
        goto done;
    }
    if ((rc = decoder_slots(d, o, slot, &D, err))) goto done;
    for (size_t b = 0; b < B; b++) res[b].input_tokens = n_ids[b];

    if (o->on_token && (rc = stream_init(&st, d, o, slot, B, D, err))) goto done;
    const nz_t5md_opts gen = gen_opts(o, o->on_token ? &st : NULL);
    const size_t R = (size_t)gen.num_return;
    nres = nz_t5md_result_count(d->t5md, &gen, B); /* B x D x R: res[(b * D + j) * R + r] */
    gres = nz_calloc(nres, sizeof *gres, NZ_MEM_OTHER);
    order = nz_calloc(D, sizeof *order, NZ_MEM_OTHER);
    norm = nz_calloc(D, sizeof *norm, NZ_MEM_OTHER);
    if (!gres || !order || !norm) {
        rc = nz_fail(err, NZ_E_NOMEM, "dialogue: out of memory");
        goto done;
    }
    if ((rc = nz_t5md_generate(mc, d->t5md, ids, n_ids, B, &gen, gres, err))) goto done;
    for (size_t b = 0; b < B; b++) {
        nz_error e = {0};
        int crc = finish_context(d, o, gres + b * D * R, D, R, o->on_token ? &st : NULL, b, order, norm,
                                 &res[b], &e);
        if (crc) {
            nz_dlg_result_free(&res[b]);
            res[b].rc = crc;
            res[b].err = e;
        }
    }
done:
    if (rc)
        for (size_t b = 0; b < B; b++) {
            nz_dlg_result_free(&res[b]);
            res[b].rc = rc;
            res[b].err = *err;
        }
    if (gres) nz_t5md_results_free(gres, nres); /* what was not moved into res */
    nz_free(norm);
    nz_free(order);
    nz_free(gres);
    nz_free(slot);
    stream_free(&st);
    return rc;
}

int nz_dialogue_run_ids(nz_matmul_ctx *mc, const nz_dialogue *d, const int32_t *ids, size_t n_ids,
                        const nz_dlg_opts *o, nz_dlg_result *res, nz_error *err) {
    int rc = nz_dialogue_run_batch(mc, d, &ids, &n_ids, 1, o, res, err);
    if (!rc && res->rc) {
        rc = res->rc;
        *err = res->err;
    }
    if (rc) nz_dlg_result_free(res);
    return rc;
}

/* The streaming state of nres items of up to mnt new tokens (stream_init: tok, n, shown, broken). */
static uint64_t stream_bytes(uint64_t nres, uint64_t mnt) {
    return nres * ((mnt + 1) * sizeof(int32_t) + 2 * sizeof(size_t) + sizeof(int));
}

/* One stream_token's temporaries (called while the decoder's buffers are held): nz_t5md_decode_text of
 * the <= mnt + 1 tokens so far (pieces and plen: 8 bytes a token + 1 each; the text + 1). */
static uint64_t hook_bytes(const nz_dialogue *d, uint64_t mnt) {
    return 2 * (8 * (mnt + 1) + 1) + nz_t5md_decode_text_bound(d->tok, mnt + 1) + 1;
}

/* finish_context of D results of up to mnt new tokens, without their tokens and logprobs (moved, not
 * copied): the responses, each one's text (+ 1) and with distinct its normalised copy (+ 1); one
 * nz_t5md_decode_text's pieces and plen. */
static uint64_t finish_bytes(const nz_dialogue *d, const nz_dlg_opts *o, uint64_t D, uint64_t mnt) {
    const uint64_t tmax = (mnt ? mnt : 1) + 1, text = nz_t5md_decode_text_bound(d->tok, tmax) + 1;
    return D * (sizeof(nz_dlg_response) + text) + (o->distinct ? D * text : 0) + 2 * (8 * tmax + 1);
}

uint64_t nz_dialogue_batch_peak_bytes(const nz_dialogue *d, const size_t *n_ids, size_t B,
                                      const nz_dlg_opts *o) {
    if (!o) o = &d->defaults;
    const size_t K = nz_t5md_get_config(d->t5md)->num_modes;
    const size_t D = !o->gen.decoders || !o->gen.n_decoders ? K : o->gen.n_decoders;
    if (!B || !D || o->gen.max_new_tokens < 0 || o->gen.max_new_tokens > NZ_T5MD_MAX_NEW_TOKENS) return 0;
    for (size_t b = 0; b < B; b++)
        if (!n_ids[b]) return 0;
    const nz_t5md_opts gen = gen_opts(o, NULL); /* as nz_dialogue_run_batch passes it on */
    const uint64_t mnt = (uint64_t)gen.max_new_tokens, cap = mnt ? mnt : 1;
    const uint64_t nres = nz_t5md_result_count(d->t5md, &gen, B); /* B x D x R */
    /* slot, gres, the responses of every context; order and norm (D each, reused per context) */
    const uint64_t arrays = K * sizeof(int) + nres * (sizeof(nz_t5md_result) + sizeof(nz_dlg_response)) +
                            D * (sizeof(size_t) + sizeof(char *));
    const uint64_t stream = o->on_token ? stream_bytes((uint64_t)B * D, mnt) : 0,
                   hook = o->on_token ? hook_bytes(d, mnt) : 0;
    const uint64_t gen_peak = nz_t5md_peak_bytes(d->t5md, n_ids, B, &gen);
    /* after generating: every result's tokens and logprobs (<= cap + 1 each, + 1 byte) and its text (+ 1),
     * with distinct one context's normalised copies (+ 1); one nz_t5md_decode_text's pieces and plen; pooled
     * responses are streamed then (the hook's temporaries) */
    const uint64_t tmax = cap + 1, text = nz_t5md_decode_text_bound(d->tok, tmax) + 1;
    const uint64_t texts = nres * (2 * (4 * tmax + 1) + text) + (o->distinct ? D * text : 0) +
                           2 * (8 * tmax + 1) + (gen.num_return > 1 ? hook : 0);
    const uint64_t during = gen_peak + (gen.num_return > 1 ? 0 : hook);
    return arrays + stream + (during > texts ? during : texts);
}

uint64_t nz_dialogue_peak_bytes(const nz_dialogue *d, size_t n_ids, const nz_dlg_opts *o) {
    return nz_dialogue_batch_peak_bytes(d, &n_ids, 1, o);
}

int nz_dialogue_run(nz_matmul_ctx *mc, const nz_dialogue *d, const char *const *turns, size_t n_turns,
                    const nz_dlg_opts *o, nz_dlg_result *res, nz_error *err) {
    memset(res, 0, sizeof *res);
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = nz_dialogue_encode(d, turns, n_turns, &ids, &n, err);
    if (!rc) rc = nz_dialogue_run_ids(mc, d, ids, n, o, res, err);
    nz_free(ids);
    return rc;
}

/* ------------------------------------------------------------------ continuous batching */

/* One request of a nz_dlg_batch. */
typedef struct dlg_member {
    void *owner;
    nz_dlg_opts o; /* its options, o.gen.decoders = decs */
    int *decs;     /* [D] */
    int *slot;     /* [K] decoder k -> its j, -1 */
    size_t D;      /* requested decoders */
    size_t input_tokens;
    dlg_stream st; /* with o.on_token: its tokens' text */
    struct dlg_member *next;
} dlg_member;

struct nz_dlg_batch {
    const nz_dialogue *d;
    nz_t5md_cb *cb;
    dlg_member *members; /* newest first */
    size_t n;
};

int nz_dlg_batch_joins(const nz_dlg_opts *o) {
    return o->gen.strategy == NZ_T5MD_GREEDY || o->gen.strategy == NZ_T5MD_SAMPLE ||
           o->gen.strategy == NZ_T5MD_BEAM;
}

int nz_dlg_batch_create(const nz_dialogue *d, nz_dlg_batch **out, nz_error *err) {
    *out = NULL;
    nz_dlg_batch *b = nz_calloc(1, sizeof *b, NZ_MEM_OTHER);
    if (!b) return nz_fail(err, NZ_E_NOMEM, "dialogue: out of memory");
    b->d = d;
    int rc = nz_t5md_cb_create(d->t5md, &b->cb, err);
    if (rc) {
        nz_free(b);
        return rc;
    }
    *out = b;
    return NZ_OK;
}

static void member_free(dlg_member *m) {
    if (!m) return;
    stream_free(&m->st);
    nz_free(m->decs);
    nz_free(m->slot);
    nz_free(m);
}

void nz_dlg_batch_free(nz_dlg_batch *b) {
    if (!b) return;
    nz_t5md_cb_free(b->cb);
    for (dlg_member *m = b->members, *nx; m; m = nx) {
        nx = m->next;
        member_free(m);
    }
    nz_free(b);
}

size_t nz_dlg_batch_size(const nz_dlg_batch *b) { return b->n; }

int nz_dlg_batch_add(nz_dlg_batch *b, const int32_t *ids, size_t n_ids, const nz_dlg_opts *o, void *owner,
                     nz_error *err) {
    const size_t K = nz_t5md_get_config(b->d->t5md)->num_modes;
    if (!nz_dlg_batch_joins(o))
        return nz_fail(err, NZ_E_UNSUPPORTED, "dialogue: strategy %d is not continuously batched",
                       (int)o->gen.strategy);
    dlg_member *m = nz_calloc(1, sizeof *m, NZ_MEM_OTHER);
    int rc = m && (m->slot = nz_malloc(K * sizeof *m->slot, NZ_MEM_OTHER))
                 ? decoder_slots(b->d, o, m->slot, &m->D, err)
                 : nz_fail(err, NZ_E_NOMEM, "dialogue: out of memory");
    if (!rc && !(m->decs = nz_malloc(m->D * sizeof *m->decs, NZ_MEM_OTHER)))
        rc = nz_fail(err, NZ_E_NOMEM, "dialogue: out of memory");
    if (rc) {
        member_free(m);
        return rc;
    }
    m->owner = owner;
    m->o = *o;
    m->input_tokens = n_ids;
    for (size_t k = 0; k < K; k++)
        if (m->slot[k] >= 0) m->decs[m->slot[k]] = (int)k;
    m->o.gen.decoders = m->decs;
    m->o.gen.n_decoders = m->D;
    if (o->on_token) rc = stream_init(&m->st, b->d, &m->o, m->slot, 1, m->D, err);
    nz_t5md_opts gen = gen_opts(&m->o, o->on_token ? &m->st : NULL);
    gen.seeds = NULL;
    gen.stop = NULL;
    if (!rc) rc = nz_t5md_cb_add(b->cb, ids, n_ids, &gen, m, err);
    if (rc) {
        nz_fail_prefix(err, "dialogue: ");
        member_free(m);
        return rc;
    }
    m->next = b->members;
    b->members = m;
    b->n++;
    return NZ_OK;
}

int nz_dlg_batch_step(nz_matmul_ctx *mc, nz_dlg_batch *b, nz_error *err) {
    return nz_t5md_cb_step(mc, b->cb, err);
}

/* Unlink m from b's members. */
static void unlink_member(nz_dlg_batch *b, dlg_member *m) {
    for (dlg_member **p = &b->members; *p; p = &(*p)->next)
        if (*p == m) {
            *p = m->next;
            b->n--;
            return;
        }
}

int nz_dlg_batch_take(nz_dlg_batch *b, void **owner, nz_dlg_result *res) {
    memset(res, 0, sizeof *res);
    void *mp = NULL;
    nz_t5md_result *g = NULL;
    size_t n = 0; /* the most results a member has */
    for (dlg_member *m = b->members; m; m = m->next)
        if (m->D * pooled_returns(&m->o) > n) n = m->D * pooled_returns(&m->o);
    if (!n || !(g = nz_calloc(n, sizeof *g, NZ_MEM_OTHER))) return 0;
    if (!nz_t5md_cb_take(b->cb, &mp, g)) {
        nz_free(g);
        return 0;
    }
    dlg_member *m = mp;
    *owner = m->owner;
    res->input_tokens = m->input_tokens;
    size_t *order = nz_calloc(m->D, sizeof *order, NZ_MEM_OTHER);
    char **norm = nz_calloc(m->D, sizeof *norm, NZ_MEM_OTHER);
    nz_error e = {0};
    const size_t R = pooled_returns(&m->o);
    int rc = order && norm ? finish_context(b->d, &m->o, g, m->D, R, m->o.on_token ? &m->st : NULL, 0, order,
                                            norm, res, &e)
                           : nz_fail(&e, NZ_E_NOMEM, "dialogue: out of memory");
    if (rc) {
        nz_dlg_result_free(res);
        res->rc = rc;
        res->err = e;
    }
    nz_t5md_results_free(g, m->D * R);
    nz_free(g);
    nz_free(order);
    nz_free(norm);
    unlink_member(b, m);
    member_free(m);
    return 1;
}

/* What member m (options o, D decoders) holds in the batch: dlg_member, slot (K), decs (D), streaming. */
static uint64_t member_bytes(const nz_dlg_opts *o, uint64_t K, uint64_t D) {
    return sizeof(dlg_member) + K * sizeof(int) + D * sizeof(int) +
           (o->on_token ? stream_bytes(D, (uint64_t)o->gen.max_new_tokens) : 0);
}

/* A batch's bound beyond its decoder batch: the members' own state, the largest take and streaming hook. */
typedef struct dlg_bound {
    uint64_t held, take, hook, nmax; /* nmax: the most results (D x R) a member generates */
} dlg_bound;

/* Count a member with options o (o->gen.n_decoders: its decoder count) in bd. */
static void bound_member(const nz_dialogue *d, const nz_dlg_opts *o, uint64_t K, dlg_bound *bd) {
    const uint64_t D = o->gen.n_decoders, mnt = (uint64_t)o->gen.max_new_tokens;
    const uint64_t take =
        D * (sizeof(size_t) + sizeof(char *)) + finish_bytes(d, o, D, mnt); /* order, norm */
    bd->held += member_bytes(o, K, D);
    if (take > bd->take) bd->take = take;
    if (o->on_token && hook_bytes(d, mnt) > bd->hook) bd->hook = hook_bytes(d, mnt);
    if (D * pooled_returns(o) > bd->nmax) bd->nmax = D * pooled_returns(o);
}

uint64_t nz_dlg_batch_bound(const nz_dialogue *d, const nz_dlg_batch *b, size_t n_ids, const nz_dlg_opts *o) {
    if (b) d = b->d;
    if (!d || (!b && !o)) return 0;
    const uint64_t K = nz_t5md_get_config(d->t5md)->num_modes;
    dlg_bound bd = {sizeof(nz_dlg_batch), 0, 0, 0};
    for (const dlg_member *m = b ? b->members : NULL; m; m = m->next) bound_member(d, &m->o, K, &bd);
    const int join = o && nz_dlg_batch_joins(o) && o->gen.max_new_tokens >= 0 &&
                     o->gen.max_new_tokens <= NZ_T5MD_MAX_NEW_TOKENS;
    nz_t5md_opts gen; /* as nz_dlg_batch_add passes it on */
    if (join) {
        const int all = !o->gen.decoders || !o->gen.n_decoders;
        nz_dlg_opts jo = *o;
        jo.gen.n_decoders = all ? K : o->gen.n_decoders;
        bound_member(d, &jo, K, &bd);
        gen = gen_opts(o, NULL);
        gen.decoders = all ? NULL : o->gen.decoders;
        gen.n_decoders = all ? 0 : o->gen.n_decoders;
    }
    const uint64_t take = bd.take + bd.nmax * sizeof(nz_t5md_result); /* nz_dlg_batch_take's g */
    return bd.held + take + bd.hook + nz_t5md_cb_bound(d->t5md, b ? b->cb : NULL, n_ids, join ? &gen : NULL);
}

void nz_dlg_batch_remove(nz_dlg_batch *b, void *owner) {
    for (dlg_member *m = b->members; m; m = m->next)
        if (m->owner == owner) {
            nz_t5md_cb_remove(b->cb, m);
            unlink_member(b, m);
            member_free(m);
            return;
        }
}

/* ------------------------------------------------------------------ the served task */

static int task_open(const char *path, void **out, nz_error *err) {
    return nz_dialogue_open(path, (nz_dialogue **)out, err);
}

static void task_free(void *m) { nz_dialogue_free(m); }

static const nz_model *task_model(const void *m) { return nz_dialogue_model(m); }

static json_t *task_describe(const void *m) {
    const nz_t5md_config *c = nz_dialogue_config(m);
    const char *variant = c->plain ? "none" : c->kind == NZ_T5MD_TRANSFORMER ? "transformer" : "adapter";
    return json_pack("{s:o, s:I, s:s, s:I, s:I}", "generation", nz_dlg_opts_to_json(nz_dialogue_defaults(m)),
                     "num_modes", (json_int_t)c->num_modes, "variant", variant, "max_context_turns",
                     (json_int_t)c->max_context_turns, "max_source_length", (json_int_t)c->max_source_length);
}

const nz_task NZ_TASK_DIALOGUE = {"dialogue", "dialogue", "t5_multidecoder", task_open,
                                  task_free,  task_model, task_describe};
