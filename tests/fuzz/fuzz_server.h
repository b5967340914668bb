/*
 * fuzz_server.h — the per-input body of the server's request fuzzer
 * (tests/fuzz/fuzz_srv_request.c), shared with the regression test
 * tests/test_srv_api.c, which replays tests/fuzz/corpus/fuzz_srv_request/.
 *
 *   fuzz_srv_request_one(data, size)  byte 0 picks the limits, bytes 1..:
 *       the POST /v1/translate body -> srv_parse_translate, then the error
 *       body or the parsed request's invariants; the same bytes split at
 *       the first NUL as (Authorization, X-API-Key) -> srv_request_key and
 *       srv_key_matches against strcmp.
 *
 * Invariants (FUZZ_FAIL aborts by default; the cmocka test overrides it):
 *   - a refused body gets 400 / 422 / 500 with a non-empty message, and its
 *     error body is JSON {"error": {"code" == status, "type", "message"}};
 *   - an accepted body has 1..max_texts non-blank texts whose lengths match,
 *     every option inside its documented range;
 *   - srv_key_matches agrees with plain comparison.
 */
#ifndef NZ_FUZZ_SERVER_H
#define NZ_FUZZ_SERVER_H

#include "nz_alloc.h"
#include "srv_api.h"

#include <ctype.h>
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

static inline void fuzz_srv_request_one(const uint8_t *data, size_t size) {
    if (!size) return;
    srv_limits lim = {1 + data[0] % 8, 1 + (data[0] >> 3) * 8};
    const char *body = (const char *)data + 1;
    size_t len = size - 1;
    srv_translate_req r;
    srv_error e = {0};
    if (srv_parse_translate(body, len, &lim, &r, &e)) {
        if ((e.status != 400 && e.status != 422 && e.status != 500) || !e.message[0] || !e.type)
            FUZZ_FAIL("bad error %d '%s'", e.status, e.message);
        size_t blen = 0;
        char *b = srv_error_body(&e, &blen);
        if (!b) FUZZ_FAIL("no error body");
        json_t *j = json_loadb(b, blen, 0, NULL);
        json_t *code = j ? json_object_get(json_object_get(j, "error"), "code") : NULL;
        if (!code || json_integer_value(code) != e.status) FUZZ_FAIL("error body does not round-trip: %s", b);
        json_decref(j);
        nz_free(b);
    } else {
        if (r.n < 1 || r.n > (size_t)lim.max_texts) FUZZ_FAIL("%zu texts", r.n);
        for (size_t i = 0; i < r.n; i++) {
            if (strlen(r.texts[i]) != r.lens[i]) FUZZ_FAIL("text %zu length", i);
            size_t k = 0;
            while (k < r.lens[i] && isspace((unsigned char)r.texts[i][k])) k++;
            if (k == r.lens[i]) FUZZ_FAIL("blank text %zu accepted", i);
        }
        if (r.iterations < 0 || r.iterations > 100 || r.length_beam < 1 || r.length_beam > 32 ||
            r.beam_size < 1 || r.beam_size > 32 || r.max_length < 1 || r.max_length > lim.max_new_tokens ||
            (r.use_at && r.rerank_at))
            FUZZ_FAIL("option out of range");
    }
    srv_translate_req_free(&r);

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
