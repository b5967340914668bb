/*
 * fuzz_server.h — the per-input body of the server's request fuzzer
 * (tests/fuzz/fuzz_srv_request.c), shared with the regression test
 * tests/test_srv_api.c, which replays tests/fuzz/corpus/fuzz_srv_request/.
 *
 *   fuzz_srv_request_one(data, size)  byte 0 picks the limits, bytes 1..:
 *       a request body, parsed both as POST /v1/translate
 *       (srv_parse_translate) and as POST /v1/dialogue (srv_parse_dialogue),
 *       then the error body or the parsed request's invariants (so every
 *       seed of either route exercises both parsers); the same bytes split
 *       at the first NUL as (Authorization, X-API-Key) -> srv_request_key
 *       and srv_key_matches against strcmp.
 *
 * Invariants (FUZZ_FAIL aborts by default; the cmocka test overrides it):
 *   - a refused body gets 400 / 422 / 500 with a non-empty message, and its
 *     error body is JSON {"error": {"code" == status, "type", "message"}};
 *   - an accepted translate body has 1..max_texts non-blank texts whose
 *     lengths match, every option inside its documented range;
 *   - an accepted dialogue body has 1..max_texts turns whose lengths match,
 *     not all blank, distinct decoders in 0..SRV_MAX_DECODERS-1, every
 *     option inside its documented range, and no sampling / beam option
 *     present with another strategy;
 *   - srv_key_matches agrees with plain comparison.
 */
#ifndef NZ_FUZZ_SERVER_H
#define NZ_FUZZ_SERVER_H

#include "nz_alloc.h"
#include "srv_api.h"

#include <ctype.h>
#include <math.h>
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#ifndef FUZZ_FAIL
#include <stdio.h>
#define FUZZ_FAIL(...)                                                                                       \
    do {                                                                                                     \
        fprintf(stderr, "fuzz invariant violated (%s:%d): ", __FILE__, __LINE__);                            \
        fprintf(stderr, __VA_ARGS__);                                                                        \
        fputc('\n', stderr);                                                                                 \
        abort();                                                                                             \
    } while (0)
#endif

/* A refused body: a 400 / 422 / 500 with a message whose error body round-trips. */
static inline void fuzz_srv_check_error(const srv_error *e) {
    if ((e->status != 400 && e->status != 422 && e->status != 500) || !e->message[0] || !e->type)
        FUZZ_FAIL("bad error %d '%s'", e->status, e->message);
    size_t blen = 0;
    char *b = srv_error_body(e, &blen);
    if (!b) FUZZ_FAIL("no error body");
    json_t *j = json_loadb(b, blen, 0, NULL);
    json_t *code = j ? json_object_get(json_object_get(j, "error"), "code") : NULL;
    if (!code || json_integer_value(code) != e->status) FUZZ_FAIL("error body does not round-trip: %s", b);
    json_decref(j);
    nz_free(b);
}

/* The body as a /v1/dialogue request. */
static inline void fuzz_srv_dialogue_one(const char *body, size_t len, const srv_limits *lim) {
    srv_dialogue_req r;
    srv_error e = {0};
    if (srv_parse_dialogue(body, len, lim, &r, &e)) {
        fuzz_srv_check_error(&e);
    } else {
        if (r.n_turns < 1 || r.n_turns > (size_t)lim->max_texts) FUZZ_FAIL("%zu turns", r.n_turns);
        int any = 0;
        for (size_t i = 0; i < r.n_turns; i++) {
            if (strlen(r.turns[i]) != r.lens[i]) FUZZ_FAIL("turn %zu length", i);
            for (size_t k = 0; k < r.lens[i]; k++) any |= !isspace((unsigned char)r.turns[i][k]);
        }
        if (!any) FUZZ_FAIL("blank context accepted");
        if (r.n_decoders > SRV_MAX_DECODERS) FUZZ_FAIL("%zu decoders", r.n_decoders);
        for (size_t i = 0; i < r.n_decoders; i++) {
            if (r.decoders[i] < 0 || r.decoders[i] >= SRV_MAX_DECODERS)
                FUZZ_FAIL("decoder %d", r.decoders[i]);
            for (size_t j = 0; j < i; j++)
                if (r.decoders[j] == r.decoders[i]) FUZZ_FAIL("decoder %d twice", r.decoders[i]);
        }
        /* options: in range, or left out (-1 / NAN: the model's defaults apply) */
        if ((r.strategy != -1 && r.strategy != SRV_GREEDY && r.strategy != SRV_BEAM &&
             r.strategy != SRV_SAMPLE) ||
            (r.beam_size != -1 && (r.beam_size < 1 || r.beam_size > 32)) ||
            (!isnan(r.temperature) && !(r.temperature >= 0 && r.temperature <= 10)) || r.top_k < -1 ||
            r.top_k > 1000000 || (!isnan(r.top_p) && !(r.top_p > 0 && r.top_p <= 1)) ||
            (r.max_new_tokens != -1 && (r.max_new_tokens < 1 || r.max_new_tokens > lim->max_new_tokens)) ||
            r.no_repeat_ngram < -1 || r.no_repeat_ngram > SRV_MAX_NO_REPEAT_NGRAM || r.distinct < -1 ||
            r.distinct > 1 || (unsigned)r.stream > 1 || (unsigned)r.return_tokens > 1)
            FUZZ_FAIL("dialogue option out of range");
        /* the strategy options against the strategy in effect (the request's, else a model default) */
        for (int st = SRV_GREEDY; st <= SRV_SAMPLE; st++) {
            int eff = r.strategy >= 0 ? r.strategy : st;
            srv_error se = {0};
            if (srv_dialogue_check_strategy(&r, eff, &se)) {
                fuzz_srv_check_error(&se);
                continue;
            }
            static const char *const sample_only[] = {"temperature", "top_k", "top_p", "seed"};
            for (size_t i = 0; i < 4; i++) {
                json_t *x = json_object_get(r.root, sample_only[i]);
                if (x && !json_is_null(x) && eff != SRV_SAMPLE)
                    FUZZ_FAIL("'%s' without sampling", sample_only[i]);
            }
            json_t *bs = json_object_get(r.root, "beam_size");
            if (bs && !json_is_null(bs) && eff != SRV_BEAM) FUZZ_FAIL("'beam_size' without beam search");
        }
    }
    srv_dialogue_req_free(&r);
}

static inline void fuzz_srv_request_one(const uint8_t *data, size_t size) {
    if (!size) return;
    srv_limits lim = {1 + data[0] % 8, 1 + (data[0] >> 3) * 8};
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    srv_translate_req r;
    srv_error e = {0};
    if (srv_parse_translate(body, len, &lim, &r, &e)) {
        fuzz_srv_check_error(&e);
    } else {
        if (r.n < 1 || r.n > (size_t)lim.max_texts) FUZZ_FAIL("%zu texts", r.n);
        for (size_t i = 0; i < r.n; i++) {
            if (strlen(r.texts[i]) != r.lens[i]) FUZZ_FAIL("text %zu length", i);
            size_t k = 0;
            while (k < r.lens[i] && isspace((unsigned char)r.texts[i][k])) k++;
            if (k == r.lens[i]) FUZZ_FAIL("blank text %zu accepted", i);
        }
        /* -1: left out (the model's default applies) */
        if (r.iterations < -1 || r.iterations > 100 || r.length_beam < -1 || !r.length_beam ||
            r.length_beam > 32 || r.beam_size < -1 || !r.beam_size || r.beam_size > 32 || r.max_length < -1 ||
            !r.max_length || r.max_length > lim.max_new_tokens || r.rerank_at < -1 || r.rerank_at > 1 ||
            r.use_at < -1 || r.use_at > 1 || r.adaptive < -1 || r.adaptive > 1 ||
            (r.use_at == 1 && r.rerank_at == 1))
            FUZZ_FAIL("option out of range");
    }
    srv_translate_req_free(&r);
    fuzz_srv_dialogue_one(body, len, &lim);

    /* header values: the input up to the first NUL, then the rest (NUL-terminated copies) */
    size_t cut = 0;
    while (cut < size && data[cut]) cut++;
    char *a = malloc(cut + 1), *x = malloc(size - cut + 1);
    if (!a || !x) abort();
    memcpy(a, data, cut);
    a[cut] = 0;
    size_t xl = cut < size ? size - cut - 1 : 0;
    if (xl) memcpy(x, data + cut + 1, xl);
    x[xl] = 0;
    size_t kl = 0;
    const char *key = srv_request_key(a, x, &kl);
    if (key) {
        char *keys[2] = {(char *)"0123456789abcdef", x};
        int want = (kl == 16 && !memcmp(key, keys[0], 16)) || (kl == strlen(x) && !memcmp(key, x, kl));
        if (srv_key_matches(key, kl, keys, 2) != want) FUZZ_FAIL("key match disagrees");
    }
    free(a);
    free(x);
}

#endif /* NZ_FUZZ_SERVER_H */
