/* server/srv_api: request parsing and validation (translate and dialogue), error bodies, API keys;
 * plus a replay of the request fuzzer's corpus (tests/fuzz/corpus/fuzz_srv_request)
 * through its own body with invariant checks. Run from the repository root
 * (make test does) or with NZ_REPO_ROOT set. */
#include "test_util.h"

#include <stdio.h>

#define FUZZ_FAIL(...)                                                                                       \
    do {                                                                                                     \
        print_error("fuzz invariant violated (%s:%d): ", __FILE__, __LINE__);                                \
        print_error(__VA_ARGS__);                                                                            \
        print_error("\n");                                                                                   \
        fail();                                                                                              \
    } while (0)
#include "fuzz/fuzz_server.h"

#include <dirent.h>

static const srv_limits LIM = {4, 50};

/* Parse s; @return the status (0 accepted) and keep r for inspection. */
static int parse(const char *s, srv_translate_req *r, srv_error *e) {
    memset(e, 0, sizeof *e);
    return srv_parse_translate(s, strlen(s), &LIM, r, e) ? e->status : 0;
}

static int status_of(const char *s) {
    srv_translate_req r;
    srv_error e;
    int st = parse(s, &r, &e);
    srv_translate_req_free(&r);
    return st;
}

static void test_accepts(void **state) {
    (void)state;
    srv_translate_req r;
    srv_error e;
    assert_int_equal(parse("{\"text\": \"Hallo Welt\"}", &r, &e), 0);
    assert_int_equal(r.n, 1);
    assert_true(r.single);
    assert_string_equal(r.texts[0], "Hallo Welt");
    assert_int_equal(r.lens[0], 10);
    /* options left out stay -1: the model's decoding defaults decide them */
    assert_int_equal(r.iterations, -1);
    assert_int_equal(r.length_beam, -1);
    assert_int_equal(r.rerank_at, -1);
    assert_int_equal(r.adaptive, -1);
    assert_int_equal(r.use_at, -1);
    assert_int_equal(r.beam_size, -1);
    assert_int_equal(r.max_length, -1);
    assert_null(r.model);
    srv_translate_req_free(&r);

    assert_int_equal(
        parse("{\"texts\": [\"a\", \"b c\"], \"model\": \"m\", \"iterations\": 0, \"length_beam\": 32,"
              " \"rerank\": \"at\", \"max_length\": 50, \"return_tokens\": true, \"adaptive\": true}",
              &r, &e),
        0);
    assert_int_equal(r.n, 2);
    assert_false(r.single);
    assert_string_equal(r.model, "m");
    assert_int_equal(r.iterations, 0);
    assert_int_equal(r.length_beam, 32);
    assert_int_equal(r.rerank_at, 1);
    assert_int_equal(r.adaptive, 1);
    assert_int_equal(r.max_length, 50);
    assert_true(r.return_tokens);
    srv_translate_req_free(&r);

    assert_int_equal(
        parse("{\"text\": \"\\u00e4\", \"decoder\": \"at\", \"beam_size\": 4, \"rerank\": null}", &r, &e), 0);
    assert_int_equal(r.use_at, 1);
    assert_int_equal(r.rerank_at, -1); /* null means absent */
    assert_int_equal(r.beam_size, 4);
    assert_int_equal(r.lens[0], 2); /* UTF-8 bytes */
    srv_translate_req_free(&r);
}

static void test_rejects(void **state) {
    (void)state;
    /* 400: not JSON, not an object, wrong types, invalid UTF-8, NUL */
    assert_int_equal(status_of(""), 400);
    assert_int_equal(status_of("{\"text\": "), 400);
    assert_int_equal(status_of("[\"x\"]"), 400);
    assert_int_equal(status_of("{\"text\": 5}"), 400);
    assert_int_equal(status_of("{\"texts\": \"x\"}"), 400);
    assert_int_equal(status_of("{\"texts\": [\"x\", 1]}"), 400);
    assert_int_equal(status_of("{\"text\": \"x\", \"iterations\": \"3\"}"), 400);
    assert_int_equal(status_of("{\"text\": \"x\", \"iterations\": 2.5}"), 400);
    assert_int_equal(status_of("{\"text\": \"x\", \"adaptive\": 1}"), 400);
    assert_int_equal(status_of("{\"text\": \"x\", \"return_tokens\": 1}"), 400);
    assert_int_equal(status_of("{\"text\": \"x\", \"model\": 3}"), 400);
    assert_int_equal(status_of("{\"text\": \"\xff\"}"), 400);
    assert_int_equal(status_of("{\"text\": \"a\\u0000b\"}"), 400);
    assert_int_equal(status_of("{\"text\": \"a\", \"text\": \"b\"}"), 400);
    /* 422: validation */
    assert_int_equal(status_of("{}"), 422);
    assert_int_equal(status_of("{\"text\": \"\"}"), 422);
    assert_int_equal(status_of("{\"text\": \" \\n\\t\"}"), 422);
    assert_int_equal(status_of("{\"texts\": []}"), 422);
    assert_int_equal(status_of("{\"texts\": [\"a\", \"b\", \"c\", \"d\", \"e\"]}"), 422);
    assert_int_equal(status_of("{\"text\": \"a\", \"texts\": [\"b\"]}"), 422);
    assert_int_equal(status_of("{\"text\": \"x\", \"iterations\": 101}"), 422);
    assert_int_equal(status_of("{\"text\": \"x\", \"iterations\": -1}"), 422);
    assert_int_equal(status_of("{\"text\": \"x\", \"length_beam\": 0}"), 422);
    assert_int_equal(status_of("{\"text\": \"x\", \"max_length\": 51}"), 422);
    assert_int_equal(status_of("{\"text\": \"x\", \"rerank\": \"yes\"}"), 422);
    assert_int_equal(status_of("{\"text\": \"x\", \"decoder\": \"at\", \"rerank\": \"at\"}"), 422);
    assert_int_equal(status_of("{\"text\": \"x\", \"temperature\": 1}"), 422);

    srv_translate_req r;
    srv_error e;
    assert_int_equal(parse("{\"text\": \"x\", \"bogus\\\"field\": 1}", &r, &e), 422);
    assert_non_null(strstr(e.message, "unknown field \"bogus\\\"field\""));
    srv_translate_req_free(&r);
    assert_int_equal(parse("{\"texts\": [\"a\", \"  \"]}", &r, &e), 422);
    assert_non_null(strstr(e.message, "'texts'[1] is empty"));
    srv_translate_req_free(&r);
    assert_int_equal(parse("{\"text\": ", &r, &e), 400);
    assert_non_null(strstr(e.message, "malformed JSON at line 1"));
    srv_translate_req_free(&r);
}

/* Parse s as a dialogue body and check its strategy options against the strategy in effect (its own,
 * else a model default of greedy); @return the status (0 accepted) and keep r for inspection. */
static int dparse(const char *s, srv_dialogue_req *r, srv_error *e) {
    memset(e, 0, sizeof *e);
    if (srv_parse_dialogue(s, strlen(s), &LIM, r, e)) return e->status;
    return srv_dialogue_check_strategy(r, r->strategy >= 0 ? r->strategy : SRV_GREEDY, e) ? e->status : 0;
}

static int dstatus(const char *s) {
    srv_dialogue_req r;
    srv_error e;
    int st = dparse(s, &r, &e);
    srv_dialogue_req_free(&r);
    return st;
}

static void test_dialogue_accepts(void **state) {
    (void)state;
    srv_dialogue_req r;
    srv_error e;
    assert_int_equal(dparse("{\"context\": \"hello there\"}", &r, &e), 0);
    assert_int_equal(r.n_turns, 1);
    assert_true(r.single);
    assert_string_equal(r.turns[0], "hello there");
    assert_int_equal(r.lens[0], 11);
    assert_null(r.model);
    assert_int_equal(r.n_decoders, 0);
    /* options left out: -1 / NAN (the model's defaults apply, resolved by the server) */
    assert_int_equal(r.strategy, -1);
    assert_int_equal(r.beam_size, -1);
    assert_true(isnan(r.temperature) && isnan(r.top_p) && isnan(r.length_penalty) && r.top_k == -1 &&
                r.seed == 0);
    assert_int_equal(r.max_new_tokens, -1);
    assert_int_equal(r.no_repeat_ngram, -1);
    assert_int_equal(r.distinct, -1);
    assert_false(r.stream || r.return_tokens);
    srv_dialogue_req_free(&r);
    /* a strategy option is checked against the strategy in effect: the model's default counts */
    assert_int_equal(dparse("{\"context\": \"a\", \"temperature\": 0.5}", &r, &e), 422);
    assert_non_null(strstr(e.message, "(this request uses \"greedy\")"));
    assert_int_equal(srv_dialogue_check_strategy(&r, SRV_SAMPLE, &e), 0);
    assert_int_equal(srv_dialogue_check_strategy(&r, SRV_BEAM, &e), -1);
    assert_non_null(
        strstr(e.message, "'temperature' applies to strategy \"sample\" only (this request uses \"beam\")"));
    srv_dialogue_req_free(&r);

    assert_int_equal(
        dparse("{\"context\": [\"hi\", \"  \", \"\\u00e4 ?\"], \"model\": \"chat\", \"decoders\": [3, 0, 63],"
               " \"strategy\": \"beam\", \"beam_size\": 32, \"length_penalty\": 0, \"max_new_tokens\": 1, "
               "\"distinct\": true,"
               " \"stream\": true, \"return_tokens\": true}",
               &r, &e),
        0);
    assert_int_equal(r.n_turns, 3);
    assert_false(r.single);
    assert_string_equal(r.turns[1], "  "); /* a blank turn among others is kept */
    assert_int_equal(r.lens[2], 4);        /* UTF-8 bytes */
    assert_string_equal(r.model, "chat");
    assert_int_equal(r.n_decoders, 3);
    assert_int_equal(r.decoders[0], 3);
    assert_int_equal(r.decoders[2], 63);
    assert_int_equal(r.strategy, SRV_BEAM);
    assert_int_equal(r.beam_size, 32);
    assert_true(r.length_penalty == 0.0);
    assert_int_equal(r.max_new_tokens, 1);
    assert_true(r.distinct && r.stream && r.return_tokens);
    srv_dialogue_req_free(&r);

    assert_int_equal(
        dparse("{\"context\": [\"a\"], \"strategy\": \"sample\", \"temperature\": 0, \"top_k\": 1000000,"
               " \"top_p\": 1, \"seed\": 9223372036854775807, \"beam_size\": null}",
               &r, &e),
        0);
    assert_int_equal(r.strategy, SRV_SAMPLE);
    assert_true(r.temperature == 0.0 && r.top_p == 1.0);
    assert_int_equal(r.top_k, 1000000);
    assert_true(r.seed == 9223372036854775807ULL);
    srv_dialogue_req_free(&r);
    assert_int_equal(
        dstatus("{\"context\": \"a\", \"strategy\": \"sample\", \"temperature\": 10, \"top_p\": 1e-9}"), 0);
    assert_int_equal(dstatus("{\"context\": [\"a\", \"b\", \"c\", \"d\"], \"max_new_tokens\": 50}"), 0);

    /* no_repeat_ngram_size: any strategy, 0..SRV_MAX_NO_REPEAT_NGRAM, null = absent */
    assert_int_equal(
        dparse("{\"context\": \"a\", \"strategy\": \"beam\", \"no_repeat_ngram_size\": 3}", &r, &e), 0);
    assert_int_equal(r.no_repeat_ngram, 3);
    srv_dialogue_req_free(&r);
    assert_int_equal(
        dparse("{\"context\": \"a\", \"strategy\": \"sample\", \"no_repeat_ngram_size\": 63}", &r, &e), 0);
    assert_int_equal(r.no_repeat_ngram, SRV_MAX_NO_REPEAT_NGRAM);
    srv_dialogue_req_free(&r);
    assert_int_equal(dparse("{\"context\": \"a\", \"no_repeat_ngram_size\": null}", &r, &e), 0);
    assert_int_equal(r.no_repeat_ngram, -1); /* absent: the model's default */
    srv_dialogue_req_free(&r);
    assert_int_equal(dstatus("{\"context\": \"a\", \"no_repeat_ngram_size\": 0}"), 0);
}

static void test_dialogue_rejects(void **state) {
    (void)state;
    /* 400: not JSON, not an object, wrong types */
    assert_int_equal(dstatus(""), 400);
    assert_int_equal(dstatus("{\"context\": "), 400);
    assert_int_equal(dstatus("[\"x\"]"), 400);
    assert_int_equal(dstatus("{\"context\": 5}"), 400);
    assert_int_equal(dstatus("{\"context\": {}}"), 400);
    assert_int_equal(dstatus("{\"context\": [\"a\", null]}"), 400);
    assert_int_equal(dstatus("{\"context\": \"\xff\"}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\\u0000b\"}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"decoders\": 1}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"decoders\": [1.0]}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": true}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"sample\", \"temperature\": \"1\"}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"sample\", \"seed\": 1.5}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"stream\": 1}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"distinct\": \"yes\"}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"model\": []}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"no_repeat_ngram_size\": \"x\"}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"no_repeat_ngram_size\": 2.5}"), 400);
    assert_int_equal(dstatus("{\"context\": \"a\", \"no_repeat_ngram_size\": true}"), 400);
    /* 422: validation */
    assert_int_equal(dstatus("{}"), 422);
    assert_int_equal(dstatus("{\"context\": null}"), 422);
    assert_int_equal(dstatus("{\"context\": \" \\n\"}"), 422);
    assert_int_equal(dstatus("{\"context\": []}"), 422);
    assert_int_equal(dstatus("{\"context\": [\"\", \" \"]}"), 422);
    assert_int_equal(dstatus("{\"context\": [\"a\", \"b\", \"c\", \"d\", \"e\"]}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"text\": \"b\"}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"decoders\": []}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"decoders\": [64]}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"decoders\": [-1]}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"top-k\"}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"beam\", \"beam_size\": 33}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"beam\", \"length_penalty\": 10.5}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"beam\", \"length_penalty\": -0.5}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"length_penalty\": 2}"), 422); /* greedy in effect */
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"sample\", \"temperature\": 10.01}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"sample\", \"top_p\": 0}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"sample\", \"top_p\": 1.5}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"sample\", \"top_k\": 1000001}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"sample\", \"seed\": -2}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"max_new_tokens\": 0}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"max_new_tokens\": 51}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"top_k\": 5}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"strategy\": \"beam\", \"seed\": 5}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"no_repeat_ngram_size\": -1}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"no_repeat_ngram_size\": 64}"), 422);
    assert_int_equal(dstatus("{\"context\": \"a\", \"no_repeat_ngram_size\": 1000}"), 422);

    srv_dialogue_req r;
    srv_error e;
    assert_int_equal(dparse("{\"context\": \"a\", \"decoders\": [2, 0, 2]}", &r, &e), 422);
    assert_non_null(strstr(e.message, "decoder 2 twice"));
    srv_dialogue_req_free(&r);
    assert_int_equal(dparse("{\"context\": \"a\", \"strategy\": \"greedy\", \"temperature\": 0.5}", &r, &e),
                     422);
    assert_non_null(strstr(e.message, "'temperature' applies to strategy \"sample\""));
    srv_dialogue_req_free(&r);
    assert_int_equal(dparse("{\"context\": [\"a\", 1]}", &r, &e), 400);
    assert_non_null(strstr(e.message, "'context'[1] must be a string"));
    srv_dialogue_req_free(&r);
    assert_int_equal(dparse("{\"context\": \"a\", \"no_repeat_ngram_size\": 1000}", &r, &e), 422);
    assert_non_null(strstr(e.message, "'no_repeat_ngram_size' must be in 0..63, got 1000"));
    srv_dialogue_req_free(&r);
    assert_int_equal(dparse("{\"context\": \"a\", \"no_repeat_ngram_size\": \"x\"}", &r, &e), 400);
    assert_non_null(strstr(e.message, "'no_repeat_ngram_size' must be an integer"));
    srv_dialogue_req_free(&r);
    assert_int_equal(dparse("{\"context\": \"a\", \"topp\": 1}", &r, &e), 422);
    assert_non_null(strstr(e.message, "unknown field \"topp\""));
    srv_dialogue_req_free(&r);
}

static void test_error_body(void **state) {
    (void)state;
    srv_error e;
    srv_fail(&e, 429, NULL, "queue \"full\" (%d)", 3);
    assert_string_equal(e.type, "queue_full");
    size_t len;
    char *b = srv_error_body(&e, &len);
    assert_non_null(b);
    assert_int_equal(strlen(b), len);
    json_t *j = json_loads(b, 0, NULL);
    assert_non_null(j);
    json_t *err = json_object_get(j, "error");
    assert_int_equal(json_integer_value(json_object_get(err, "code")), 429);
    assert_string_equal(json_string_value(json_object_get(err, "type")), "queue_full");
    assert_string_equal(json_string_value(json_object_get(err, "message")), "queue \"full\" (3)");
    json_decref(j);
    nz_free(b);
    /* a message that is not UTF-8 still gives a JSON body */
    srv_fail(&e, 400, NULL, "bad \xff byte");
    b = srv_error_body(&e, &len);
    assert_non_null(b);
    j = json_loads(b, 0, NULL);
    assert_non_null(j);
    json_decref(j);
    nz_free(b);
    assert_string_equal(srv_error_type(401), "unauthorized");
    assert_string_equal(srv_error_type(413), "payload_too_large");
    assert_string_equal(srv_error_type(504), "deadline_exceeded");
}

static void test_keys(void **state) {
    (void)state;
    char *keys[] = {(char *)"secret-key-one", (char *)"another-secret"};
    assert_true(srv_key_matches("secret-key-one", 14, keys, 2));
    assert_true(srv_key_matches("another-secret", 14, keys, 2));
    assert_false(srv_key_matches("secret-key-on", 13, keys, 2));
    assert_false(srv_key_matches("secret-key-onee", 15, keys, 2));
    assert_false(srv_key_matches("", 0, keys, 2));
    assert_false(srv_key_matches("secret-key-one", 14, keys, 0));
    size_t n;
    const char *k = srv_request_key("Bearer  abc-def ", NULL, &n);
    assert_non_null(k);
    assert_int_equal(n, 7);
    assert_memory_equal(k, "abc-def", 7);
    k = srv_request_key("bearer xyz", "ignored", &n);
    assert_memory_equal(k, "xyz", 3);
    k = srv_request_key("Basic abc", "from-header", &n);
    assert_string_equal(k, "from-header");
    assert_null(srv_request_key("Bearer ", NULL, &n));
    assert_null(srv_request_key(NULL, "", &n));
}

/* Every corpus file through the fuzzer's body; the counted heap returns to its level. */
static void test_fuzz_corpus(void **state) {
    (void)state;
    const char *root = getenv("NZ_REPO_ROOT");
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/tests/fuzz/corpus/fuzz_srv_request", root && *root ? root : ".");
    DIR *d = opendir(dir);
    assert_non_null(d);
    size_t before = nz_mem_current(NZ_MEM_OTHER), files = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char path[8192];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        FILE *fp = fopen(path, "rb");
        assert_non_null(fp);
        uint8_t buf[1 << 16];
        size_t n = fread(buf, 1, sizeof buf, fp);
        fclose(fp);
        fuzz_srv_request_one(buf, n);
        files++;
    }
    closedir(d);
    assert_true(files >= 12);
    assert_int_equal(nz_mem_current(NZ_MEM_OTHER), before);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accepts),          cmocka_unit_test(test_rejects),
        cmocka_unit_test(test_dialogue_accepts), cmocka_unit_test(test_dialogue_rejects),
        cmocka_unit_test(test_error_body),       cmocka_unit_test(test_keys),
        cmocka_unit_test(test_fuzz_corpus),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
