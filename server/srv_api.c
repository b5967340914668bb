/* srv_api — see srv_api.h. */
#include "srv_api.h"

#include "nz_alloc.h"

#include <ctype.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

int srv_fail(srv_error *e, int status, const char *type, const char *fmt, ...) {
    if (!e) return -1;
    e->status = status;
    e->type = type ? type : srv_error_type(status);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

const char *srv_error_type(int status) {
    switch (status) {
    case 400:
        return "invalid_request";
    case 401:
        return "unauthorized";
    case 404:
        return "not_found";
    case 405:
        return "method_not_allowed";
    case 413:
        return "payload_too_large";
    case 422:
        return "validation_error";
    case 429:
        return "queue_full";
    case 503:
        return "unavailable";
    case 504:
        return "deadline_exceeded";
    default:
        return status >= 500 ? "internal_error" : "error";
    }
}

char *srv_error_body(const srv_error *e, size_t *len) {
    json_t *j = json_pack("{s:{s:i, s:s, s:s}}", "error", "code", e->status, "type",
                          e->type ? e->type : srv_error_type(e->status), "message", e->message);
    if (!j) { /* the message is not valid UTF-8: keep the rest */
        j = json_pack("{s:{s:i, s:s, s:s}}", "error", "code", e->status, "type",
                      e->type ? e->type : srv_error_type(e->status), "message", "(message not printable)");
        if (!j) return NULL;
    }
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (s && len) *len = strlen(s);
    return s;
}

void srv_translate_req_free(srv_translate_req *r) {
    if (!r) return;
    json_decref(r->root);
    free(r->texts);
    free(r->lens);
    memset(r, 0, sizeof *r);
}

/* An optional integer field in [lo, hi]. @return 0 (absent: *v unchanged) or -1. */
static int opt_int(json_t *o, const char *k, int lo, int hi, int *v, srv_error *e) {
    json_t *x = json_object_get(o, k);
    if (!x || json_is_null(x)) return 0;
    if (!json_is_integer(x)) return srv_fail(e, 400, NULL, "'%s' must be an integer", k);
    json_int_t i = json_integer_value(x);
    if (i < lo || i > hi)
        return srv_fail(e, 422, NULL, "'%s' must be in %d..%d, got %lld", k, lo, hi, (long long)i);
    *v = (int)i;
    return 0;
}

/* An optional string field that must be one of two values. @return 0 or -1; *which = 0 / 1. */
static int opt_choice(json_t *o, const char *k, const char *a, const char *b, int *which, srv_error *e) {
    json_t *x = json_object_get(o, k);
    if (!x || json_is_null(x)) return 0;
    if (!json_is_string(x)) return srv_fail(e, 400, NULL, "'%s' must be a string", k);
    const char *s = json_string_value(x);
    if (!strcmp(s, a))
        *which = 0;
    else if (!strcmp(s, b))
        *which = 1;
    else
        return srv_fail(e, 422, NULL, "'%s' must be \"%s\" or \"%s\"", k, a, b);
    return 0;
}

static int blank(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (!isspace((unsigned char)s[i])) return 0;
    return 1;
}

/* Parse body as a JSON object whose keys are all in known[0..nknown). @return 0 (*root set, owned by
 * the caller also on failure) or -1. */
static int load_object(const char *body, size_t len, const char *const *known, size_t nknown, json_t **root,
                       srv_error *e) {
    if (!len) return srv_fail(e, 400, NULL, "empty request body: expected a JSON object");
    json_error_t je;
    *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!*root)
        return srv_fail(e, 400, NULL, "malformed JSON at line %d column %d: %s", je.line, je.column, je.text);
    if (!json_is_object(*root)) return srv_fail(e, 400, NULL, "the body must be a JSON object");
    const char *k;
    json_t *v;
    json_object_foreach(*root, k, v) {
        size_t i = 0;
        while (i < nknown && strcmp(k, known[i])) i++;
        if (i == nknown) {
            json_t *name = json_string(k); /* keys were UTF-8-checked by jansson */
            char *q = name ? json_dumps(name, JSON_ENCODE_ANY) : NULL;
            srv_fail(e, 422, NULL, "unknown field %.200s", q ? q : "?");
            nz_free(q); /* jansson allocates through nz_alloc */
            json_decref(name);
            return -1;
        }
    }
    return 0;
}

/* An optional boolean field. @return 0 (absent: *v unchanged) or -1. */
static int opt_bool(json_t *o, const char *k, int *v, srv_error *e) {
    json_t *x = json_object_get(o, k);
    if (!x || json_is_null(x)) return 0;
    if (!json_is_boolean(x)) return srv_fail(e, 400, NULL, "'%s' must be true or false", k);
    *v = json_is_true(x);
    return 0;
}

/* An optional string field naming a model. @return 0 or -1. */
static int opt_model(json_t *o, const char **model, srv_error *e) {
    json_t *x = json_object_get(o, "model");
    if (!x || json_is_null(x)) return 0;
    if (!json_is_string(x)) return srv_fail(e, 400, NULL, "'model' must be a string");
    *model = json_string_value(x);
    return 0;
}

int srv_parse_translate(const char *body, size_t len, const srv_limits *lim, srv_translate_req *r,
                        srv_error *e) {
    static const char *const known[] = {"text",        "texts",      "model",         "iterations",
                                        "length_beam", "rerank",     "adaptive",      "decoder",
                                        "beam_size",   "max_length", "return_tokens", "return_candidates"};
    memset(r, 0, sizeof *r);
    /* decoding options the body leaves out stay -1: the model's defaults decide them */
    r->iterations = r->length_beam = r->rerank_at = r->adaptive = r->use_at = r->beam_size = r->max_length =
        -1;
    if (load_object(body, len, known, sizeof known / sizeof *known, &r->root, e)) return -1;
    json_t *text = json_object_get(r->root, "text"), *texts = json_object_get(r->root, "texts");
    if (text && texts) return srv_fail(e, 422, NULL, "give either 'text' or 'texts', not both");
    if (!text && !texts)
        return srv_fail(e, 422, NULL, "missing 'text' (a string) or 'texts' (an array of strings)");
    if (text && !json_is_string(text)) return srv_fail(e, 400, NULL, "'text' must be a string");
    if (texts && !json_is_array(texts)) return srv_fail(e, 400, NULL, "'texts' must be an array of strings");
    size_t n = text ? 1 : json_array_size(texts);
    if (!n) return srv_fail(e, 422, NULL, "'texts' is empty");
    if (n > (size_t)lim->max_texts)
        return srv_fail(e, 422, NULL, "too many texts: %zu (the limit is %d)", n, lim->max_texts);
    r->single = text != NULL;
    r->texts = calloc(n, sizeof *r->texts);
    r->lens = calloc(n, sizeof *r->lens);
    if (!r->texts || !r->lens) return srv_fail(e, 500, NULL, "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *t = text ? text : json_array_get(texts, i);
        if (!json_is_string(t)) return srv_fail(e, 400, NULL, "'texts'[%zu] must be a string", i);
        r->texts[i] = json_string_value(t);
        r->lens[i] = json_string_length(t);
        if (blank(r->texts[i], r->lens[i]))
            return text ? srv_fail(e, 422, NULL, "'text' is empty")
                        : srv_fail(e, 422, NULL, "'texts'[%zu] is empty", i);
    }
    r->n = n;
    if (opt_model(r->root, &r->model, e)) return -1;
    if (opt_int(r->root, "iterations", 0, 100, &r->iterations, e) ||
        opt_int(r->root, "length_beam", 1, 32, &r->length_beam, e) ||
        opt_int(r->root, "beam_size", 1, 32, &r->beam_size, e) ||
        opt_int(r->root, "max_length", 1, lim->max_new_tokens, &r->max_length, e) ||
        opt_choice(r->root, "rerank", "none", "at", &r->rerank_at, e) ||
        opt_choice(r->root, "decoder", "nat", "at", &r->use_at, e))
        return -1;
    if (opt_bool(r->root, "return_tokens", &r->return_tokens, e) ||
        opt_bool(r->root, "return_candidates", &r->return_candidates, e) ||
        opt_bool(r->root, "adaptive", &r->adaptive, e))
        return -1;
    if (r->use_at == 1 && r->rerank_at == 1)
        return srv_fail(e, 422, NULL, "'rerank' applies to decoder \"nat\" only");
    if (r->use_at == 1 && r->return_candidates)
        return srv_fail(e, 422, NULL, "'return_candidates' applies to decoder \"nat\" only");
    return 0;
}

void srv_dialogue_req_free(srv_dialogue_req *r) {
    if (!r) return;
    json_decref(r->root);
    free(r->turns);
    free(r->lens);
    memset(r, 0, sizeof *r);
}

/* An optional number field (integer or real) in [lo, hi] (lo excluded with lo_open).
 * @return 0 (absent: *v unchanged) or -1. */
static int opt_number(json_t *o, const char *k, double lo, int lo_open, double hi, double *v, srv_error *e) {
    json_t *x = json_object_get(o, k);
    if (!x || json_is_null(x)) return 0;
    if (!json_is_number(x)) return srv_fail(e, 400, NULL, "'%s' must be a number", k);
    double d = json_number_value(x);
    if (!(lo_open ? d > lo : d >= lo) || !(d <= hi))
        return srv_fail(e, 422, NULL, "'%s' must be %s %g and <= %g, got %g", k, lo_open ? ">" : ">=", lo, hi,
                        d);
    *v = d;
    return 0;
}

/* A field that only strategy `need` takes: 422 when it is present with another strategy. */
static int only_with(json_t *o, const char *k, srv_strategy have, srv_strategy need, srv_error *e) {
    static const char *const names[] = {"greedy", "beam", "sample"};
    json_t *x = json_object_get(o, k);
    if (!x || json_is_null(x) || have == need) return 0;
    return srv_fail(e, 422, NULL, "'%s' applies to strategy \"%s\" only (this request uses \"%s\")", k,
                    names[need], names[have]);
}

int srv_parse_dialogue(const char *body, size_t len, const srv_limits *lim, srv_dialogue_req *r,
                       srv_error *e) {
    static const char *const known[] = {
        "context",     "model",  "decoders",      "strategy", "beam_size",      "length_penalty",
        "temperature", "top_k",  "top_p",         "seed",     "max_new_tokens", "no_repeat_ngram_size",
        "distinct",    "stream", "return_tokens", "rank"};
    memset(r, 0, sizeof *r);
    r->strategy = r->beam_size = r->top_k = r->max_new_tokens = r->no_repeat_ngram = r->distinct = r->rank =
        -1;
    r->temperature = r->top_p = r->length_penalty = NAN;
    if (load_object(body, len, known, sizeof known / sizeof *known, &r->root, e)) return -1;
    json_t *ctx = json_object_get(r->root, "context");
    if (!ctx || json_is_null(ctx))
        return srv_fail(e, 422, NULL, "missing 'context' (a string, or an array of turns, oldest first)");
    if (!json_is_string(ctx) && !json_is_array(ctx))
        return srv_fail(e, 400, NULL, "'context' must be a string or an array of strings");
    size_t n = json_is_string(ctx) ? 1 : json_array_size(ctx);
    if (!n) return srv_fail(e, 422, NULL, "'context' is empty");
    if (n > (size_t)lim->max_texts)
        return srv_fail(e, 422, NULL, "too many turns in 'context': %zu (the limit is %d)", n,
                        lim->max_texts);
    r->single = json_is_string(ctx);
    r->turns = calloc(n, sizeof *r->turns);
    r->lens = calloc(n, sizeof *r->lens);
    if (!r->turns || !r->lens) return srv_fail(e, 500, NULL, "out of memory");
    int any = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *t = r->single ? ctx : json_array_get(ctx, i);
        if (!json_is_string(t)) return srv_fail(e, 400, NULL, "'context'[%zu] must be a string", i);
        r->turns[i] = json_string_value(t);
        r->lens[i] = json_string_length(t);
        any |= !blank(r->turns[i], r->lens[i]);
    }
    r->n_turns = n;
    if (!any) return srv_fail(e, 422, NULL, "'context' is empty");
    if (opt_model(r->root, &r->model, e)) return -1;
    json_t *decs = json_object_get(r->root, "decoders");
    if (decs && !json_is_null(decs)) {
        if (!json_is_array(decs)) return srv_fail(e, 400, NULL, "'decoders' must be an array of integers");
        size_t nd = json_array_size(decs);
        if (!nd) return srv_fail(e, 422, NULL, "'decoders' is empty (leave it out for every decoder)");
        for (size_t i = 0; i < nd; i++) {
            json_t *x = json_array_get(decs, i);
            if (!json_is_integer(x)) return srv_fail(e, 400, NULL, "'decoders'[%zu] must be an integer", i);
            json_int_t k = json_integer_value(x);
            if (k < 0 || k >= SRV_MAX_DECODERS)
                return srv_fail(e, 422, NULL, "'decoders'[%zu] must be in 0..%d, got %lld", i,
                                SRV_MAX_DECODERS - 1, (long long)k);
            for (size_t j = 0; j < r->n_decoders; j++)
                if (r->decoders[j] == (int)k)
                    return srv_fail(e, 422, NULL, "'decoders' names decoder %lld twice", (long long)k);
            r->decoders[r->n_decoders++] = (int)k; /* distinct values in 0..63: at most 64 of them */
        }
    }
    json_t *st = json_object_get(r->root, "strategy");
    if (st && !json_is_null(st)) {
        if (!json_is_string(st)) return srv_fail(e, 400, NULL, "'strategy' must be a string");
        const char *v = json_string_value(st);
        if (!strcmp(v, "greedy"))
            r->strategy = SRV_GREEDY;
        else if (!strcmp(v, "beam"))
            r->strategy = SRV_BEAM;
        else if (!strcmp(v, "sample"))
            r->strategy = SRV_SAMPLE;
        else
            return srv_fail(e, 422, NULL, "'strategy' must be \"greedy\", \"beam\" or \"sample\"");
    }
    json_t *rk = json_object_get(r->root, "rank");
    if (rk && !json_is_null(rk)) {
        if (!json_is_string(rk)) return srv_fail(e, 400, NULL, "'rank' must be a string");
        if (!strcmp(json_string_value(rk), "logprob"))
            r->rank = 0;
        else if (!strcmp(json_string_value(rk), "consensus"))
            r->rank = 1;
        else
            return srv_fail(e, 422, NULL, "'rank' must be \"logprob\" or \"consensus\"");
    }
    json_t *sd = json_object_get(r->root, "seed");
    if (sd && !json_is_null(sd)) {
        if (!json_is_integer(sd)) return srv_fail(e, 400, NULL, "'seed' must be an integer");
        json_int_t v = json_integer_value(sd);
        if (v < 0) return srv_fail(e, 422, NULL, "'seed' must be >= 0, got %lld", (long long)v);
        r->seed = (unsigned long long)v;
    }
    if (opt_int(r->root, "beam_size", 1, 32, &r->beam_size, e) ||
        opt_int(r->root, "top_k", 0, 1000000, &r->top_k, e) ||
        opt_int(r->root, "max_new_tokens", 1, lim->max_new_tokens, &r->max_new_tokens, e) ||
        opt_int(r->root, "no_repeat_ngram_size", 0, SRV_MAX_NO_REPEAT_NGRAM, &r->no_repeat_ngram, e) ||
        opt_number(r->root, "length_penalty", 0, 0, 10, &r->length_penalty, e) ||
        opt_number(r->root, "temperature", 0, 0, 10, &r->temperature, e) ||
        opt_number(r->root, "top_p", 0, 1, 1, &r->top_p, e) ||
        opt_bool(r->root, "distinct", &r->distinct, e) || opt_bool(r->root, "stream", &r->stream, e) ||
        opt_bool(r->root, "return_tokens", &r->return_tokens, e))
        return -1;
    return 0;
}

int srv_dialogue_check_strategy(const srv_dialogue_req *r, int strategy, srv_error *e) {
    srv_strategy s = strategy == SRV_BEAM ? SRV_BEAM : strategy == SRV_SAMPLE ? SRV_SAMPLE : SRV_GREEDY;
    if (only_with(r->root, "beam_size", s, SRV_BEAM, e) ||
        only_with(r->root, "length_penalty", s, SRV_BEAM, e) ||
        only_with(r->root, "temperature", s, SRV_SAMPLE, e) ||
        only_with(r->root, "top_k", s, SRV_SAMPLE, e) || only_with(r->root, "top_p", s, SRV_SAMPLE, e) ||
        only_with(r->root, "seed", s, SRV_SAMPLE, e))
        return -1;
    return 0;
}

int srv_key_matches(const char *key, size_t klen, char *const *keys, size_t n) {
    int found = 0;
    for (size_t i = 0; i < n; i++) {
        size_t kl = strlen(keys[i]);
        /* walk the configured key's length whatever the presented one is */
        unsigned diff = (unsigned)(kl ^ klen) != 0;
        for (size_t j = 0; j < kl; j++) {
            unsigned char a = (unsigned char)keys[i][j];
            unsigned char b = j < klen ? (unsigned char)key[j] : 0;
            diff |= (unsigned)(a ^ b);
        }
        found |= diff == 0;
    }
    return found;
}

const char *srv_request_key(const char *authorization, const char *x_api_key, size_t *len) {
    if (authorization) {
        const char *p = authorization;
        while (*p == ' ') p++;
        if (!strncasecmp(p, "Bearer ", 7)) {
            p += 7;
            while (*p == ' ') p++;
            size_t n = strlen(p);
            while (n && p[n - 1] == ' ') n--;
            if (n) {
                *len = n;
                return p;
            }
        }
    }
    if (x_api_key && *x_api_key) {
        *len = strlen(x_api_key);
        return x_api_key;
    }
    *len = 0;
    return NULL;
}
