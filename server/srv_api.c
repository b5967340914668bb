/* srv_api — see srv_api.h. */
#include "srv_api.h"

#include "nz_alloc.h"

#include <ctype.h>
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

int srv_parse_translate(const char *body, size_t len, const srv_limits *lim, srv_translate_req *r,
                        srv_error *e) {
    static const char *const known[] = {"text",   "texts",   "model",     "iterations", "length_beam",
                                        "rerank", "decoder", "beam_size", "max_length", "return_tokens"};
    memset(r, 0, sizeof *r);
    r->iterations = 10;
    r->length_beam = 5;
    r->beam_size = 1;
    r->max_length = lim->max_new_tokens;
    if (!len) return srv_fail(e, 400, NULL, "empty request body: expected a JSON object");
    json_error_t je;
    r->root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &je);
    if (!r->root)
        return srv_fail(e, 400, NULL, "malformed JSON at line %d column %d: %s", je.line, je.column, je.text);
    if (!json_is_object(r->root)) return srv_fail(e, 400, NULL, "the body must be a JSON object");
    const char *k;
    json_t *v;
    json_object_foreach(r->root, k, v) {
        size_t i = 0;
        while (i < sizeof known / sizeof *known && strcmp(k, known[i])) i++;
        if (i == sizeof known / sizeof *known) {
            json_t *name = json_string(k); /* keys were UTF-8-checked by jansson */
            char *q = name ? json_dumps(name, JSON_ENCODE_ANY) : NULL;
            srv_fail(e, 422, NULL, "unknown field %.200s", q ? q : "?");
            nz_free(q); /* jansson allocates through nz_alloc */
            json_decref(name);
            return -1;
        }
    }
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
    json_t *model = json_object_get(r->root, "model");
    if (model && !json_is_null(model)) {
        if (!json_is_string(model)) return srv_fail(e, 400, NULL, "'model' must be a string");
        r->model = json_string_value(model);
    }
    if (opt_int(r->root, "iterations", 0, 100, &r->iterations, e) ||
        opt_int(r->root, "length_beam", 1, 32, &r->length_beam, e) ||
        opt_int(r->root, "beam_size", 1, 32, &r->beam_size, e) ||
        opt_int(r->root, "max_length", 1, lim->max_new_tokens, &r->max_length, e) ||
        opt_choice(r->root, "rerank", "none", "at", &r->rerank_at, e) ||
        opt_choice(r->root, "decoder", "nat", "at", &r->use_at, e))
        return -1;
    json_t *rt = json_object_get(r->root, "return_tokens");
    if (rt && !json_is_null(rt)) {
        if (!json_is_boolean(rt)) return srv_fail(e, 400, NULL, "'return_tokens' must be true or false");
        r->return_tokens = json_is_true(rt);
    }
    if (r->use_at && r->rerank_at) return srv_fail(e, 422, NULL, "'rerank' applies to decoder \"nat\" only");
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
