/* Server configuration: defaults, config file, environment, flags,
 * precedence, validation and error messages, the shipped config. */
#include "test_util.h"

#include "srv_config.h"

#include <ftw.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------- helpers */

#define ERRLEN 512
#define MAXARG 32

static char g_dir[64];  /* mkdtemp directory, removed by teardown */
static char g_sub[128]; /* g_dir/sub */

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    return remove(path);
}

static int setup(void **state) {
    strcpy(g_dir, "/tmp/nz_test_srv_config_XXXXXX");
    if (!mkdtemp(g_dir)) return -1;
    snprintf(g_sub, sizeof g_sub, "%s/sub", g_dir);
    return mkdir(g_sub, 0700);
}

static int teardown(void **state) { return nftw(g_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* out = dir/name */
static void tpath(char *out, size_t n, const char *dir, const char *name) {
    snprintf(out, n, "%s/%s", dir, name);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

/* Write g_dir/name and return its path in out. */
static void write_cfg(char *out, size_t n, const char *name, const char *text) {
    tpath(out, n, g_dir, name);
    write_file(out, text);
}

/* srv_config_load with argv = {"nzserve", args..., NULL}. */
static int load(srv_config *c, const char *def, char **env, const char *const *args, char *err) {
    char *argv[MAXARG + 2];
    int argc = 0;
    argv[argc++] = "nzserve";
    for (; args && *args; args++) {
        assert_true(argc <= MAXARG);
        argv[argc++] = (char *)*args;
    }
    argv[argc] = NULL;
    memset(err, 'x', ERRLEN); /* must be overwritten or terminated */
    return srv_config_load(c, def, env, argc, argv, err, ERRLEN);
}

#define ARGS(...) ((const char *const[]){__VA_ARGS__, NULL})
#define ENV(...)  ((char *[]){__VA_ARGS__, NULL})
#define NOARGS    ((const char *const *)NULL)
#define NOENV     ((char **)NULL)
#define MODEL_ARG "--model", "m:translate:m.nzp"

/* rc must be SRV_CFG_ERROR and err must contain want. */
#define EXPECT_ERR(rc, err, want)                                                                            \
    do {                                                                                                     \
        assert_int_equal((rc), SRV_CFG_ERROR);                                                               \
        if (!strstr((err), (want))) fail_msg("error '%s' does not contain '%s'", (err), (want));             \
    } while (0)

/* Load expecting an error containing want; frees the config. */
static void load_err(const char *def, char **env, const char *const *args, const char *want) {
    srv_config c;
    char err[ERRLEN];
    int rc = load(&c, def, env, args, err);
    EXPECT_ERR(rc, err, want);
    assert_true(strchr(err, '\n') == NULL); /* one line */
    srv_config_free(&c);
}

/* Load expecting success. */
static void load_ok(srv_config *c, const char *def, char **env, const char *const *args) {
    char err[ERRLEN];
    int rc = load(c, def, env, args, err);
    if (rc != SRV_CFG_OK) fail_msg("load failed (%d): %s", rc, err);
    assert_string_equal(err, "");
}

/* Every field but models, api keys, config_path and api_key_file has its default. */
static void assert_defaults(const srv_config *c) {
    assert_string_equal(c->host, "127.0.0.1");
    assert_int_equal(c->port, 8080);
    assert_int_equal(c->worker_threads, 0);
    assert_int_equal(c->http_threads, 2);
    assert_int_equal(c->tile_cache_bytes, 0);
    assert_int_equal(c->max_body_bytes, 1048576);
    assert_int_equal(c->max_input_tokens, 256);
    assert_int_equal(c->max_texts, 64);
    assert_int_equal(c->max_new_tokens, 256);
    assert_int_equal(c->max_concurrent_requests, 2);
    assert_int_equal(c->queue_length, 64);
    assert_int_equal(c->request_timeout_ms, 30000);
    assert_int_equal(c->connection_timeout_s, 30);
    assert_int_equal(c->shutdown_grace_ms, 10000);
    assert_int_equal(c->log_level, SRV_LOG_INFO);
    assert_int_equal(c->log_format, SRV_LOG_LOGFMT);
    assert_int_equal(c->metrics, 1);
}

static void assert_model(const srv_config *c, size_t i, const char *name, srv_task task, const char *path) {
    assert_true(i < c->n_models);
    assert_string_equal(c->models[i].name, name);
    assert_ptr_equal(c->models[i].task, task);
    assert_string_equal(c->models[i].path, path);
}

/* ------------------------------------------------------------------ tests */

static void test_defaults(void **state) {
    srv_config c;
    assert_int_equal(srv_config_init(&c), 0);
    assert_defaults(&c);
    assert_int_equal(c.n_models, 0);
    assert_int_equal(c.n_api_keys, 0);
    assert_string_equal(c.api_key_file, "");
    assert_null(c.config_path);
    srv_config_free(&c);
    srv_config_free(&c); /* zeroed: fine */

    /* no file, no env, no flags: defaults, but no model */
    char err[ERRLEN], missing[256];
    tpath(missing, sizeof missing, g_dir, "no-such.json");
    int rc = load(&c, missing, NOENV, NOARGS, err);
    EXPECT_ERR(rc, err, "models: at least one model is required");
    assert_defaults(&c);
    assert_null(c.config_path);
    srv_config_free(&c);
    load_err(NULL, ENV("PATH=/bin"), NOARGS, "at least one model");

    /* with one model from a flag: every default, relative path kept */
    load_ok(&c, missing, ENV("PATH=/usr/bin", "NZSERVE_HOME=/opt/nz", "NZSERVE_CONFIG=", "NZSERVEX=1"),
            ARGS(MODEL_ARG));
    assert_defaults(&c);
    assert_null(c.config_path);
    assert_int_equal(c.n_models, 1);
    assert_model(&c, 0, "m", &NZ_TASK_TRANSLATE, "m.nzp");
    assert_int_equal(c.n_api_keys, 0);
    assert_string_equal(c.api_key_file, "");
    srv_config_free(&c);
}

static const char FULL[] =
    "{\n"
    "  \"host\": \"0.0.0.0\",\n"
    "  \"port\": 9000,\n"
    "  \"worker_threads\": 4,\n"
    "  \"http_threads\": 3,\n"
    "  \"models\": [\n"
    "    {\"name\": \"de-en_1.0\", \"path\": \"/abs/de.nzp\", \"task\": \"translate\"},\n"
    "    {\"task\": \"dialogue\", \"name\": \"chat\", \"path\": \"/abs/chat.nzp\"}\n"
    "  ],\n"
    "  \"tile_cache_bytes\": 123456,\n"
    "  \"max_body_bytes\": \"2MiB\",\n"
    "  \"max_input_tokens\": 100,\n"
    "  \"max_texts\": 10,\n"
    "  \"max_new_tokens\": 50,\n"
    "  \"max_concurrent_requests\": 8,\n"
    "  \"queue_length\": 0,\n"
    "  \"request_timeout_ms\": 1000,\n"
    "  \"connection_timeout_s\": 5,\n"
    "  \"shutdown_grace_ms\": 0,\n"
    "  \"api_keys\": [\"key-aaaa-1111\", \"key-bbbb-2222\"],\n"
    "  \"api_key_file\": \"\",\n"
    "  \"log_level\": \"debug\",\n"
    "  \"log_format\": \"json\",\n"
    "  \"metrics\": false\n"
    "}\n";

static void test_file_values(void **state) {
    char path[256];
    write_cfg(path, sizeof path, "full.json", FULL);
    srv_config c;
    load_ok(&c, path, NOENV, NOARGS);
    assert_string_equal(c.config_path, path);
    assert_string_equal(c.host, "0.0.0.0");
    assert_int_equal(c.port, 9000);
    assert_int_equal(c.worker_threads, 4);
    assert_int_equal(c.http_threads, 3);
    assert_int_equal(c.n_models, 2);
    assert_model(&c, 0, "de-en_1.0", &NZ_TASK_TRANSLATE, "/abs/de.nzp");
    assert_model(&c, 1, "chat", &NZ_TASK_DIALOGUE, "/abs/chat.nzp");
    assert_int_equal(c.tile_cache_bytes, 123456);
    assert_int_equal(c.max_body_bytes, 2 << 20);
    assert_int_equal(c.max_input_tokens, 100);
    assert_int_equal(c.max_texts, 10);
    assert_int_equal(c.max_new_tokens, 50);
    assert_int_equal(c.max_concurrent_requests, 8);
    assert_int_equal(c.queue_length, 0);
    assert_int_equal(c.request_timeout_ms, 1000);
    assert_int_equal(c.connection_timeout_s, 5);
    assert_int_equal(c.shutdown_grace_ms, 0);
    assert_int_equal(c.n_api_keys, 2);
    assert_string_equal(c.api_keys[0], "key-aaaa-1111");
    assert_string_equal(c.api_keys[1], "key-bbbb-2222");
    assert_string_equal(c.api_key_file, "");
    assert_int_equal(c.log_level, SRV_LOG_DEBUG);
    assert_int_equal(c.log_format, SRV_LOG_JSON);
    assert_int_equal(c.metrics, 0);
    srv_config_free(&c);

    /* a file with only some keys keeps the other defaults */
    write_cfg(path, sizeof path, "part.json",
              "{\"models\": [{\"name\": \"a\", \"task\": \"translate\", "
              "\"path\": \"/a.nzp\"}], \"port\": 0}");
    load_ok(&c, path, NOENV, NOARGS);
    assert_int_equal(c.port, 0);
    c.port = 8080;
    assert_defaults(&c);
    srv_config_free(&c);
}

static void test_env_overrides_file(void **state) {
    char path[256], envcfg[300];
    write_cfg(path, sizeof path, "env.json", FULL);
    snprintf(envcfg, sizeof envcfg, "NZSERVE_CONFIG=%s", path);
    srv_config c;
    load_ok(&c, NULL,
            ENV("HOME=/root", envcfg, "NZSERVE_PORT=9100", "NZSERVE_LOG_LEVEL=error", "NZSERVE_METRICS=on",
                "NZSERVE_TILE_CACHE_BYTES=1G", "NZSERVE_API_KEYS=env-key-0001,env-key-0002,env-key-0003",
                "NZSERVE_HOST=::1", "NZSERVE_QUEUE_LENGTH=100000", "NZSERVE_LOG_FORMAT=logfmt"),
            NOARGS);
    assert_string_equal(c.config_path, path);
    assert_int_equal(c.port, 9100);
    assert_string_equal(c.host, "::1");
    assert_int_equal(c.log_level, SRV_LOG_ERROR);
    assert_int_equal(c.log_format, SRV_LOG_LOGFMT);
    assert_int_equal(c.metrics, 1);
    assert_int_equal(c.tile_cache_bytes, 1 << 30);
    assert_int_equal(c.queue_length, 100000);
    assert_int_equal(c.n_api_keys, 3);
    assert_string_equal(c.api_keys[2], "env-key-0003");
    /* not overridden: from the file */
    assert_int_equal(c.max_texts, 10);
    assert_int_equal(c.worker_threads, 4);
    assert_int_equal(c.n_models, 2);
    srv_config_free(&c);
}

static void test_flags_override_env(void **state) {
    char path[256];
    write_cfg(path, sizeof path, "flags.json", FULL);
    srv_config c;
    load_ok(&c, path, ENV("NZSERVE_PORT=9100", "NZSERVE_HTTP_THREADS=4", "NZSERVE_MAX_TEXTS=20"),
            ARGS("--port", "9200", "--http-threads", "8", "--metrics", "yes", "--api-keys", "flag-key-0001",
                 "--log-level", "warn", "--max-body-bytes", "64K", "--shutdown-grace-ms", "3600000"));
    assert_int_equal(c.port, 9200);
    assert_int_equal(c.http_threads, 8);
    assert_int_equal(c.max_texts, 20);      /* env */
    assert_int_equal(c.max_new_tokens, 50); /* file */
    assert_int_equal(c.metrics, 1);
    assert_int_equal(c.n_api_keys, 1);
    assert_string_equal(c.api_keys[0], "flag-key-0001");
    assert_int_equal(c.log_level, SRV_LOG_WARN);
    assert_int_equal(c.max_body_bytes, 64 << 10);
    assert_int_equal(c.shutdown_grace_ms, 3600000);
    srv_config_free(&c);

    /* the last of a repeated flag wins */
    load_ok(&c, NULL, NOENV, ARGS(MODEL_ARG, "--port", "1", "--port", "2"));
    assert_int_equal(c.port, 2);
    srv_config_free(&c);
}

static void test_flag_equals(void **state) {
    srv_config c;
    load_ok(&c, NULL, ENV("NZSERVE_PORT=1"),
            ARGS("--port=9300", "--model=x:dialogue:d/x.nzp", "--api-keys=a=b=c=d=e", "--host=localhost",
                 "--metrics=false", "--log-format=json", "--tile-cache-bytes=3MiB", "--api-keys=", "--port",
                 "-0"));
    assert_int_equal(c.port, 0); /* the later "--port -0" */
    assert_model(&c, 0, "x", &NZ_TASK_DIALOGUE, "d/x.nzp");
    assert_int_equal(c.n_api_keys, 0); /* "--api-keys=" empties the list */
    assert_string_equal(c.host, "localhost");
    assert_int_equal(c.metrics, 0);
    assert_int_equal(c.log_format, SRV_LOG_JSON);
    assert_int_equal(c.tile_cache_bytes, 3 << 20);
    srv_config_free(&c);

    load_ok(&c, NULL, NOENV, ARGS(MODEL_ARG, "--api-keys=--starts-with-dashes"));
    assert_string_equal(c.api_keys[0], "--starts-with-dashes");
    srv_config_free(&c);

    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--port="), "--port: not an integer: ''");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--host="), "--host: must be a non-empty host");
}

static void test_size_suffixes(void **state) {
    static const struct {
        const char *s;
        uint64_t v;
    } ok[] = {
        {"0", 0},
        {"1024", 1024},
        {"1K", 1024},
        {"1KiB", 1024},
        {"2kb", 2048},
        {"64MiB", 64ull << 20},
        {"64M", 64ull << 20},
        {"64mib", 64ull << 20},
        {"3 MiB", 3ull << 20},
        {"2G", 2ull << 30},
        {"2GiB", 2ull << 30},
        {"1T", 1ull << 40},
        {"1024TiB", 1ull << 50},
        {"7B", 7},
        {"18446744073709551615", UINT64_MAX},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        uint64_t v = 1;
        if (srv_config_parse_size(ok[i].s, &v)) fail_msg("'%s' rejected", ok[i].s);
        assert_int_equal(v, ok[i].v);
    }
    static const char *const bad[] = {"",
                                      "-1",
                                      "1.5M",
                                      "64XB",
                                      "M",
                                      "64 ",
                                      " 64",
                                      "64 MiB ",
                                      "1P",
                                      "1Ki",
                                      "0x10",
                                      "64MiBs",
                                      "1e6",
                                      "18446744073709551616",
                                      "17179869184G"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        uint64_t v = 42;
        if (!srv_config_parse_size(bad[i], &v)) fail_msg("'%s' accepted", bad[i]);
        assert_int_equal(v, 42);
    }

    char path[256], want[400];
    write_cfg(path, sizeof path, "size.json",
              "{\"tile_cache_bytes\": \"512 KiB\", \"max_body_bytes\": 2048, "
              "\"models\": [{\"name\": \"a\", \"task\": \"translate\", \"path\": \"/a\"}]}");
    srv_config c;
    load_ok(&c, path, NOENV, NOARGS);
    assert_int_equal(c.tile_cache_bytes, 512 << 10);
    assert_int_equal(c.max_body_bytes, 2048);
    srv_config_free(&c);
    load_ok(&c, path, ENV("NZSERVE_MAX_BODY_BYTES=1GiB", "NZSERVE_TILE_CACHE_BYTES=64MiB"), NOARGS);
    assert_int_equal(c.max_body_bytes, 1 << 30);
    assert_int_equal(c.tile_cache_bytes, 64 << 20);
    srv_config_free(&c);
    /* a size the syntax allows but no machine here has: more than the memory the process may use */
    load_err(path, ENV("NZSERVE_TILE_CACHE_BYTES=1024TiB"), NOARGS,
             "tile_cache_bytes: 1125899906842624 bytes is more than the memory this process may use");

    load_err(path, ENV("NZSERVE_TILE_CACHE_BYTES=1025TiB"), NOARGS,
             "NZSERVE_TILE_CACHE_BYTES: must be a size in 0..1125899906842624 bytes, got '1025TiB'");
    load_err(path, NOENV, ARGS("--max-body-bytes", "1GiB1"), "--max-body-bytes: not a size: '1GiB1'");
    load_err(path, NOENV, ARGS("--max-body-bytes", "0"), "--max-body-bytes: must be a size in 1..1073741824");
    write_cfg(path, sizeof path, "size2.json", "{\"max_body_bytes\": \"2GiB\"}");
    snprintf(want, sizeof want, "%s: 'max_body_bytes': must be a size in 1..1073741824 bytes", path);
    load_err(path, NOENV, ARGS(MODEL_ARG), want);
    write_cfg(path, sizeof path, "size3.json", "{\"tile_cache_bytes\": -1}");
    snprintf(want, sizeof want, "%s: 'tile_cache_bytes': must be a size in 0..1125899906842624 bytes", path);
    load_err(path, NOENV, ARGS(MODEL_ARG), want);
    write_cfg(path, sizeof path, "size4.json", "{\"tile_cache_bytes\": 1.5}");
    load_err(path, NOENV, ARGS(MODEL_ARG), want + strlen(path) + 2);
}

static void test_bad_json(void **state) {
    char path[256], want[400];
    write_cfg(path, sizeof path, "bad.json", "{\n  \"port\": 8080,\n  \"host\": \"a\" \"b\"\n}\n");
    snprintf(want, sizeof want, "%s: line 3, column", path);
    load_err(path, NOENV, ARGS(MODEL_ARG), want);
    load_err(path, NOENV, ARGS(MODEL_ARG), "invalid JSON");

    write_cfg(path, sizeof path, "trailing.json", "{\"port\": 8080,\n}\n");
    load_err(path, NOENV, ARGS(MODEL_ARG), "line 2");
    write_cfg(path, sizeof path, "empty.json", "");
    load_err(path, NOENV, ARGS(MODEL_ARG), "invalid JSON");
    write_cfg(path, sizeof path, "array.json", "[1, 2]");
    snprintf(want, sizeof want, "%s: must contain a JSON object", path);
    load_err(path, NOENV, ARGS(MODEL_ARG), want);
    write_cfg(path, sizeof path, "dup.json", "{\"port\": 1,\n \"port\": 2}");
    load_err(path, NOENV, ARGS(MODEL_ARG), "line 2");
    write_cfg(path, sizeof path, "comment.json", "{\n// no comments in JSON\n}");
    load_err(path, NOENV, ARGS(MODEL_ARG), "line 2");
}

static void test_wrong_type(void **state) {
    static const struct {
        const char *json, *msg;
    } cases[] = {
        {"{\"port\": \"8080\"}", "'port': must be an integer in 0..65535"},
        {"{\"port\": 8080.0}", "'port': must be an integer in 0..65535"},
        {"{\"max_texts\": null}", "'max_texts': must be an integer in 1..4096"},
        {"{\"port\": true}", "'port': must be an integer in 0..65535"},
        {"{\"host\": 5}", "'host': must be a non-empty string of at most 255 characters"},
        {"{\"metrics\": \"yes\"}", "'metrics': must be true or false"},
        {"{\"metrics\": 1}", "'metrics': must be true or false"},
        {"{\"models\": {}}", "'models': must be an array"},
        {"{\"models\": [\"a:translate:b\"]}", "models[0]: must be an object"},
        {"{\"models\": [{\"name\": 1, \"task\": \"translate\", \"path\": \"p\"}]}",
         "models[0].name: must be"},
        {"{\"models\": [{\"name\": \"a\", \"task\": \"translate\", \"path\": 3}]}",
         "models[0].path: must be a non-empty string"},
        {"{\"models\": [{\"name\": \"a\", \"task\": \"translate\"}]}", "models[0].path: missing"},
        {"{\"models\": [{\"task\": \"translate\", \"path\": \"p\"}]}", "models[0].name: missing"},
        {"{\"api_keys\": \"key-aaaa-1111\"}", "'api_keys': must be an array of strings"},
        {"{\"api_keys\": [12345678]}", "api_keys[0]: must be 8..256 printable ASCII"},
        {"{\"api_key_file\": false}", "'api_key_file': must be a string"},
        {"{\"log_level\": \"verbose\"}", "'log_level': must be \"debug\", \"info\", \"warn\" or \"error\""},
        {"{\"log_format\": 1}", "'log_format': must be \"logfmt\" or \"json\""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char path[256], want[400];
        write_cfg(path, sizeof path, "type.json", cases[i].json);
        snprintf(want, sizeof want, "%s: %s", path, cases[i].msg);
        load_err(path, NOENV, ARGS(MODEL_ARG), want);
    }
}

static void test_out_of_range(void **state) {
    char path[256], err[ERRLEN], want[400];
    write_cfg(path, sizeof path, "range.json", "{\"port\": 70000}");
    srv_config c;
    int rc = load(&c, path, NOENV, ARGS(MODEL_ARG), err);
    snprintf(want, sizeof want, "%s: 'port': must be an integer in 0..65535", path);
    assert_int_equal(rc, SRV_CFG_ERROR);
    assert_string_equal(err, want); /* the whole message */
    srv_config_free(&c);

    rc = load(&c, NULL, ENV("NZSERVE_MAX_TEXTS=abc"), ARGS(MODEL_ARG), err);
    assert_int_equal(rc, SRV_CFG_ERROR);
    assert_string_equal(err, "NZSERVE_MAX_TEXTS: not an integer: 'abc'");
    srv_config_free(&c);

    load_err(NULL, ENV("NZSERVE_HTTP_THREADS=0"), ARGS(MODEL_ARG),
             "NZSERVE_HTTP_THREADS: must be an integer in 1..64, got '0'");
    load_err(NULL, ENV("NZSERVE_REQUEST_TIMEOUT_MS=0"), ARGS(MODEL_ARG),
             "NZSERVE_REQUEST_TIMEOUT_MS: must be an integer in 1..3600000");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--queue-length", "-1"),
             "--queue-length: must be an integer in 0..100000");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--queue-length", "100001"), "--queue-length: must be an integer");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--worker-threads", "257"),
             "--worker-threads: must be an integer in 0..256");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--port", "99999999999999999999999"),
             "--port: must be an integer in 0..65535");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--port", " 80"), "--port: not an integer: ' 80'");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--port", "80x"), "--port: not an integer: '80x'");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--port", "0x50"), "--port: not an integer");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--max-texts", "4097"),
             "--max-texts: must be an integer in 1..4096");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--connection-timeout-s", "3601"), "--connection-timeout-s");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--max-concurrent-requests", "0"), "--max-concurrent-requests");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--max-input-tokens", "65537"), "--max-input-tokens");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--max-new-tokens", "0"), "--max-new-tokens");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--shutdown-grace-ms", "-1"), "--shutdown-grace-ms");

    /* the bounds themselves are accepted */
    load_ok(&c, NULL, NOENV,
            ARGS(MODEL_ARG, "--port", "65535", "--worker-threads", "256", "--http-threads", "64",
                 "--max-texts", "4096", "--max-input-tokens", "65536", "--max-concurrent-requests", "1024",
                 "--max-body-bytes", "1", "--request-timeout-ms", "3600000", "--connection-timeout-s", "1",
                 "--max-new-tokens", "+65536"));
    assert_int_equal(c.port, 65535);
    assert_int_equal(c.max_new_tokens, 65536);
    assert_int_equal(c.max_body_bytes, 1);
    srv_config_free(&c);

    /* host length */
    char host[300];
    memset(host, 'h', 255);
    host[255] = 0;
    load_ok(&c, NULL, NOENV, ARGS(MODEL_ARG, "--host", host));
    assert_int_equal(strlen(c.host), 255);
    srv_config_free(&c);
    host[255] = 'h';
    host[256] = 0;
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--host", host), "--host: must be a non-empty host");
}

static void test_unknown(void **state) {
    char path[256], want[400];
    write_cfg(path, sizeof path, "unknown.json", "{\"port\": 1, \"prot\": 2}");
    snprintf(want, sizeof want, "%s: unknown key 'prot'", path);
    load_err(path, NOENV, ARGS(MODEL_ARG), want);
    write_cfg(path, sizeof path, "unknown2.json",
              "{\"models\": [{\"name\": \"a\", \"task\": \"translate\", \"path\": \"p\", \"file\": \"q\"}]}");
    snprintf(want, sizeof want, "%s: models[0]: unknown key 'file'", path);
    load_err(path, NOENV, NOARGS, want);
    write_cfg(path, sizeof path, "unknown3.json", "{\"Port\": 1}");
    load_err(path, NOENV, ARGS(MODEL_ARG), "unknown key 'Port'");

    load_err(NULL, ENV("NZSERVE_PROT=1"), ARGS(MODEL_ARG), "NZSERVE_PROT: unknown environment variable");
    load_err(NULL, ENV("NZSERVE_port=1"), ARGS(MODEL_ARG), "NZSERVE_port: unknown environment variable");
    load_err(NULL, ENV("NZSERVE_MODEL=a:translate:b"), NOARGS, "NZSERVE_MODEL: unknown environment variable");
    load_err(NULL, ENV("NZSERVE_=1"), ARGS(MODEL_ARG), "NZSERVE_: unknown environment variable");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--prot", "1"), "--prot: unknown flag");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--prot=1"), "--prot: unknown flag");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--worker_threads", "2"), "--worker_threads: unknown flag");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "-p", "2"), "unexpected argument '-p'");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "serve"), "unexpected argument 'serve'");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--"), "unexpected argument '--'");

    /* not ours, or allowed */
    srv_config c;
    load_ok(&c, NULL,
            ENV("NZSERVEPORT=1", "NZ_PORT=2", "NZSERVE_HOME=/x", "NZSERVE_CONFIG=", "X=NZSERVE_PORT=3"),
            ARGS(MODEL_ARG));
    assert_int_equal(c.port, 8080);
    srv_config_free(&c);
    /* server test hooks and the service links Kubernetes injects for a Service named nzserve */
    load_ok(&c, NULL,
            ENV("NZSERVE_DEBUG_LOAD_DELAY_MS=5", "NZSERVE_SERVICE_HOST=10.0.0.1", "NZSERVE_SERVICE_PORT=8080",
                "NZSERVE_PORT=tcp://10.0.0.1:8080", "NZSERVE_PORT_8080_TCP_ADDR=10.0.0.1"),
            ARGS(MODEL_ARG));
    assert_int_equal(c.port, 8080);
    srv_config_free(&c);
    load_err(NULL, ENV("NZSERVE_PORT=tcp"), ARGS(MODEL_ARG), "NZSERVE_PORT: not an integer");
}

static void test_missing_value(void **state) {
    srv_config c;
    char err[ERRLEN];
    int rc = load(&c, NULL, NOENV, ARGS(MODEL_ARG, "--queue-length"), err);
    assert_int_equal(rc, SRV_CFG_ERROR);
    assert_string_equal(err, "--queue-length: missing value");
    srv_config_free(&c);
    load_err(NULL, NOENV, ARGS("--queue-length", "--port", "1", MODEL_ARG), "--queue-length: missing value");
    load_err(NULL, NOENV, ARGS("--model"), "--model: missing value");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--host", "--metrics", "true"), "--host: missing value");
    rc = load(&c, NULL, NOENV, ARGS(MODEL_ARG, "--config"), err);
    assert_int_equal(rc, SRV_CFG_ERROR);
    assert_string_equal(err, "--config: missing value");
    srv_config_free(&c);
    load_err(NULL, NOENV, ARGS("--config", "--port", "1"), "--config: missing value");
    /* a single dash is a value */
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--port", "-"), "--port: not an integer: '-'");
}

static void test_bad_task(void **state) {
    char path[256], err[ERRLEN], want[400];
    write_cfg(path, sizeof path, "task.json",
              "{\"models\": [\n"
              "  {\"name\": \"a\", \"task\": \"translate\", \"path\": \"a.nzp\"},\n"
              "  {\"name\": \"b\", \"task\": \"summarize\", \"path\": \"b.nzp\"}\n"
              "]}");
    srv_config c;
    int rc = load(&c, path, NOENV, NOARGS, err);
    snprintf(want, sizeof want, "%s: models[1].task: must be \"translate\" or \"dialogue\"", path);
    assert_int_equal(rc, SRV_CFG_ERROR);
    assert_string_equal(err, want);
    srv_config_free(&c);

    write_cfg(path, sizeof path, "task2.json",
              "{\"models\": [{\"name\": \"a\", \"task\": \"Translate\", \"path\": \"a.nzp\"}]}");
    load_err(path, NOENV, NOARGS, "models[0].task: must be \"translate\" or \"dialogue\"");
    write_cfg(path, sizeof path, "task3.json",
              "{\"models\": [{\"name\": \"a\", \"task\": 1, \"path\": \"a.nzp\"}]}");
    load_err(path, NOENV, NOARGS, "models[0].task: must be");
    write_cfg(path, sizeof path, "task4.json", "{\"models\": [{\"name\": \"a\", \"path\": \"a.nzp\"}]}");
    load_err(path, NOENV, NOARGS, "models[0].task: missing");
    load_err(NULL, ENV("NZSERVE_MODELS=a:translate:x,b:chat:y"), NOARGS,
             "NZSERVE_MODELS[1].task: must be \"translate\" or \"dialogue\"");
    load_err(NULL, NOENV, ARGS("--model", "a:translate:x", "--model", "b::y"),
             "--model[1].task: must be \"translate\" or \"dialogue\"");
    load_err(NULL, NOENV, ARGS("--models", "a:dialog:x"), "--models[0].task: must be");
}

static void test_model_names(void **state) {
    char path[256];
    write_cfg(path, sizeof path, "dupname.json",
              "{\"models\": [\n"
              "  {\"name\": \"a\", \"task\": \"translate\", \"path\": \"a.nzp\"},\n"
              "  {\"name\": \"b\", \"task\": \"dialogue\", \"path\": \"b.nzp\"},\n"
              "  {\"name\": \"a\", \"task\": \"dialogue\", \"path\": \"c.nzp\"}\n"
              "]}");
    load_err(path, NOENV, NOARGS, "models[2].name: duplicate model name 'a' (also models[0])");
    load_err(NULL, NOENV, ARGS("--model", "x:translate:1", "--model", "x:dialogue:2"),
             "models[1].name: duplicate model name 'x'");
    load_err(NULL, ENV("NZSERVE_MODELS=x:translate:1,y:translate:2,y:translate:3"), NOARGS,
             "models[2].name: duplicate model name 'y'");

    load_err(NULL, NOENV, ARGS("--model", "bad name:translate:p"),
             "--model[0].name: must be 1..63 characters of [A-Za-z0-9._-]");
    load_err(NULL, NOENV, ARGS("--model", ":translate:p"), "--model[0].name: must be");
    load_err(NULL, NOENV, ARGS("--model", "a/b:translate:p"), "--model[0].name: must be");
    load_err(NULL, NOENV, ARGS("--model", "caf\xc3\xa9:translate:p"), "--model[0].name: must be");
    char spec[128];
    memset(spec, 'n', 63);
    strcpy(spec + 63, ":translate:p");
    srv_config c;
    load_ok(&c, NULL, NOENV, ARGS("--model", spec));
    assert_int_equal(strlen(c.models[0].name), 63);
    srv_config_free(&c);
    memset(spec, 'n', 64);
    strcpy(spec + 64, ":translate:p");
    load_err(NULL, NOENV, ARGS("--model", spec), "--model[0].name: must be");
    write_cfg(path, sizeof path, "name.json",
              "{\"models\": [{\"name\": \"\", \"task\": \"translate\", \"path\": \"p\"}]}");
    load_err(path, NOENV, NOARGS, "models[0].name: must be 1..63 characters");
    write_cfg(path, sizeof path, "path.json",
              "{\"models\": [{\"name\": \"a\", \"task\": \"translate\", \"path\": \"\"}]}");
    load_err(path, NOENV, NOARGS, "models[0].path: must be a non-empty string");
}

static void test_no_models(void **state) {
    char path[256];
    write_cfg(path, sizeof path, "nomodels.json", "{\"port\": 1234}");
    load_err(path, NOENV, NOARGS, "models: at least one model is required");
    write_cfg(path, sizeof path, "emptymodels.json", "{\"models\": []}");
    load_err(path, NOENV, NOARGS, "models: at least one model is required");
    /* the environment can empty the file's list */
    write_cfg(path, sizeof path, "onemodel.json",
              "{\"models\": [{\"name\": \"a\", \"task\": \"translate\", \"path\": \"p\"}]}");
    load_err(path, ENV("NZSERVE_MODELS="), NOARGS, "models: at least one model is required");
    load_err(path, NOENV, ARGS("--models="), "models: at least one model is required");
}

/* --health-check: anywhere among the flags, no value, no model needed; the
 * port still comes from file < env < flags and is still validated. */
static void test_health_check(void **state) {
    (void)state;
    char path[256], err[ERRLEN];
    srv_config c;
    write_cfg(path, sizeof path, "probe.json", "{\"port\": 1234}");
    assert_int_equal(load(&c, path, NOENV, ARGS("--health-check"), err), SRV_CFG_OK);
    assert_true(c.health_check);
    assert_int_equal(c.port, 1234);
    srv_config_free(&c);
    assert_int_equal(
        load(&c, path, ENV("NZSERVE_PORT=2345"), ARGS("--host", "0.0.0.0", "--health-check"), err),
        SRV_CFG_OK);
    assert_true(c.health_check);
    assert_int_equal(c.port, 2345);
    assert_string_equal(c.host, "0.0.0.0");
    srv_config_free(&c);
    assert_int_equal(load(&c, path, NOENV, ARGS(MODEL_ARG), err), SRV_CFG_OK);
    assert_false(c.health_check);
    srv_config_free(&c);
    load_err(path, NOENV, ARGS("--health-check", "--port", "70000"), "port: must be an integer in 0..65535");
    load_err(path, NOENV, ARGS("--health-check=yes"), "--health-check: unknown flag");
}

static void test_bad_api_key(void **state) {
    char path[256], err[ERRLEN], want[400];
    write_cfg(path, sizeof path, "shortkey.json", "{\"api_keys\": [\"good-key-0001\", \"short\"]}");
    snprintf(want, sizeof want, "%s: api_keys[1]: must be 8..256 printable ASCII characters without spaces",
             path);
    load_err(path, NOENV, ARGS(MODEL_ARG), want);

    srv_config c;
    int rc = load(&c, NULL, ENV("NZSERVE_API_KEYS=good-key-0001,bad key here"), ARGS(MODEL_ARG), err);
    EXPECT_ERR(rc, err, "NZSERVE_API_KEYS: key 2 (12 characters): must be 8..256 printable ASCII");
    assert_null(strstr(err, "bad key")); /* keys are never echoed */
    srv_config_free(&c);
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--api-keys", "good-key-0001,"),
             "--api-keys: key 2 (0 characters)");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--api-keys", ",good-key-0001"),
             "--api-keys: key 1 (0 characters)");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--api-keys", "tab\tkey-0001"), "--api-keys: key 1");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--api-keys", "caf\xc3\xa9-key-0001"), "--api-keys: key 1");
    write_cfg(path, sizeof path, "nulkey.json", "{\"api_keys\": [\"abcd\\u0000efghijk\"]}");
    load_err(path, NOENV, ARGS(MODEL_ARG), "invalid JSON"); /* jansson rejects NUL */

    char key[300];
    memset(key, 'k', 256);
    key[256] = 0;
    load_ok(&c, NULL, NOENV, ARGS(MODEL_ARG, "--api-keys", key));
    assert_int_equal(strlen(c.api_keys[0]), 256);
    srv_config_free(&c);
    key[256] = 'k';
    key[257] = 0;
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--api-keys", key), "key 1 (257 characters)");
    load_ok(&c, NULL, NOENV, ARGS(MODEL_ARG, "--api-keys", "12345678,!\"#$%&'()*+-./:;<=>?@[\\]^_`{|}~"));
    assert_int_equal(c.n_api_keys, 2);
    srv_config_free(&c);
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--api-keys", "1234567"), "key 1 (7 characters)");
}

static void test_api_key_file(void **state) {
    char cfg[256], keys[256], want[400], env[300];
    tpath(keys, sizeof keys, g_sub, "keys.txt");
    write_file(keys, "# API keys of the demo\n"
                     "\n"
                     "key-one-12345\r\n"
                     "   \n"
                     "  # an indented comment\n"
                     "\tkey-two-67890  \n"
                     "key-three-abc"); /* no final newline */
    tpath(cfg, sizeof cfg, g_sub, "keys.json");
    write_file(cfg, "{\"api_keys\": [\"config-key-1\"], \"api_key_file\": \"keys.txt\"}");
    srv_config c;
    load_ok(&c, cfg, NOENV, ARGS(MODEL_ARG));
    assert_string_equal(c.api_key_file, keys); /* resolved against the config's directory */
    assert_int_equal(c.n_api_keys, 4);
    assert_string_equal(c.api_keys[0], "config-key-1");
    assert_string_equal(c.api_keys[1], "key-one-12345");
    assert_string_equal(c.api_keys[2], "key-two-67890");
    assert_string_equal(c.api_keys[3], "key-three-abc");
    srv_config_free(&c);

    /* the environment replaces api_keys; the file's keys are still appended */
    load_ok(&c, cfg, ENV("NZSERVE_API_KEYS=env-key-00001"), ARGS(MODEL_ARG));
    assert_int_equal(c.n_api_keys, 4);
    assert_string_equal(c.api_keys[0], "env-key-00001");
    assert_string_equal(c.api_keys[3], "key-three-abc");
    srv_config_free(&c);

    /* only comments: no keys would leave the API open, so it is an error (an absolute path from a flag) */
    char only[256];
    tpath(only, sizeof only, g_dir, "comments.txt");
    write_file(only, "# nothing\n\n#key-not-really\n");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--api-key-file", only), "holds no API key");
    /* "" disables the file */
    load_ok(&c, cfg, NOENV, ARGS(MODEL_ARG, "--api-key-file="));
    assert_int_equal(c.n_api_keys, 1);
    srv_config_free(&c);

    /* a bad key names the file and line, not the key */
    char bad[256];
    tpath(bad, sizeof bad, g_dir, "badkeys.txt");
    write_file(bad, "# header\ngood-key-00001\nshort key\n");
    snprintf(env, sizeof env, "NZSERVE_API_KEY_FILE=%s", bad);
    srv_config c2;
    char err[ERRLEN];
    int rc = load(&c2, NULL, ENV(env), ARGS(MODEL_ARG), err);
    snprintf(want, sizeof want, "NZSERVE_API_KEY_FILE: '%s' line 3: must be 8..256 printable ASCII", bad);
    EXPECT_ERR(rc, err, want);
    assert_null(strstr(err, "short key"));
    srv_config_free(&c2);

    /* relative paths from the environment are kept (relative to the working directory) */
    load_err(NULL, ENV("NZSERVE_API_KEY_FILE=nz-test-no-such-keys.txt"), ARGS(MODEL_ARG),
             "NZSERVE_API_KEY_FILE: cannot open 'nz-test-no-such-keys.txt'");
}

static void test_api_key_file_missing(void **state) {
    char cfg[256], want[600], missing[256];
    tpath(missing, sizeof missing, g_sub, "missing-keys.txt");
    write_cfg(cfg, sizeof cfg, "missingkeys.json", "{\"api_key_file\": \"sub/missing-keys.txt\"}");
    snprintf(want, sizeof want, "%s: 'api_key_file': cannot open '%s': No such file or directory", cfg,
             missing);
    load_err(cfg, NOENV, ARGS(MODEL_ARG), want);
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--api-key-file", "/nonexistent/nz/keys"),
             "--api-key-file: cannot open '/nonexistent/nz/keys': No such file or directory");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--api-key-file", g_dir), "--api-key-file: cannot read");
}

static void test_relative_model_path(void **state) {
    char cfg[256], want[300];
    tpath(cfg, sizeof cfg, g_sub, "rel.json");
    write_file(cfg, "{\"models\": [\n"
                    "  {\"name\": \"a\", \"task\": \"translate\", \"path\": \"a.nzp\"},\n"
                    "  {\"name\": \"b\", \"task\": \"dialogue\", \"path\": \"../models/b.nzp\"},\n"
                    "  {\"name\": \"c\", \"task\": \"dialogue\", \"path\": \"/abs/c.nzp\"}\n"
                    "]}");
    srv_config c;
    load_ok(&c, cfg, NOENV, NOARGS);
    assert_int_equal(c.n_models, 3);
    snprintf(want, sizeof want, "%s/a.nzp", g_sub);
    assert_model(&c, 0, "a", &NZ_TASK_TRANSLATE, want);
    snprintf(want, sizeof want, "%s/../models/b.nzp", g_sub);
    assert_model(&c, 1, "b", &NZ_TASK_DIALOGUE, want);
    assert_model(&c, 2, "c", &NZ_TASK_DIALOGUE, "/abs/c.nzp");
    srv_config_free(&c);

    /* a config file named without a directory: paths stay relative to the cwd (= its directory) */
    char cwd[4096];
    assert_non_null(getcwd(cwd, sizeof cwd));
    assert_int_equal(chdir(g_sub), 0);
    char err[ERRLEN];
    int rc = load(&c, "rel.json", NOENV, NOARGS, err);
    assert_int_equal(chdir(cwd), 0);
    assert_int_equal(rc, SRV_CFG_OK);
    assert_string_equal(c.config_path, "rel.json");
    assert_model(&c, 0, "a", &NZ_TASK_TRANSLATE, "a.nzp");
    assert_model(&c, 1, "b", &NZ_TASK_DIALOGUE, "../models/b.nzp");
    srv_config_free(&c);

    /* paths from the environment and flags are kept as given */
    load_ok(&c, cfg, ENV("NZSERVE_MODELS=e:translate:rel/e.nzp"), NOARGS);
    assert_model(&c, 0, "e", &NZ_TASK_TRANSLATE, "rel/e.nzp");
    srv_config_free(&c);
    load_ok(&c, cfg, NOENV, ARGS("--models", "f:dialogue:rel/f.nzp"));
    assert_model(&c, 0, "f", &NZ_TASK_DIALOGUE, "rel/f.nzp");
    srv_config_free(&c);
}

static void test_help(void **state) {
    srv_config c;
    char err[ERRLEN];
    assert_int_equal(load(&c, NULL, NOENV, ARGS("--help"), err), SRV_CFG_HELP);
    srv_config_free(&c);
    assert_int_equal(load(&c, NULL, NOENV, ARGS("-h"), err), SRV_CFG_HELP);
    srv_config_free(&c);
    /* --help wins over anything else wrong */
    assert_int_equal(load(&c, "/nonexistent.json", ENV("NZSERVE_PORT=abc", "NZSERVE_PROT=1"),
                          ARGS("--prot", "--port", "x", "--config", "/nonexistent.json", "--help"), err),
                     SRV_CFG_HELP);
    srv_config_free(&c);
    assert_int_equal(load(&c, NULL, NOENV, ARGS("--queue-length", "--help"), err), SRV_CFG_HELP);
    srv_config_free(&c);

    const char *u = srv_config_usage();
    assert_non_null(u);
    static const char *const flags[] = {
        "--config",
        "--host",
        "--port",
        "--worker-threads",
        "--http-threads",
        "--models",
        "--model ",
        "--tile-cache-bytes",
        "--max-body-bytes",
        "--max-input-tokens",
        "--max-texts",
        "--max-new-tokens",
        "--max-concurrent-requests",
        "--queue-length",
        "--request-timeout-ms",
        "--connection-timeout-s",
        "--shutdown-grace-ms",
        "--api-keys",
        "--api-key-file",
        "--log-level",
        "--log-format",
        "--metrics",
        "--help",
        "NZSERVE_",
    };
    for (size_t i = 0; i < sizeof flags / sizeof flags[0]; i++)
        if (!strstr(u, flags[i])) fail_msg("usage lacks %s", flags[i]);
}

static void test_models_env(void **state) {
    char path[256];
    write_cfg(path, sizeof path, "menv.json",
              "{\"models\": [{\"name\": \"file\", \"task\": \"translate\", \"path\": \"/f.nzp\"}]}");
    srv_config c;
    load_ok(&c, path,
            ENV("NZSERVE_MODELS=a:translate:/m/a.nzp,b.2:dialogue:rel/b.nzp,c-3:translate:C:/x:y.nzp"),
            NOARGS);
    assert_int_equal(c.n_models, 3);
    assert_model(&c, 0, "a", &NZ_TASK_TRANSLATE, "/m/a.nzp");
    assert_model(&c, 1, "b.2", &NZ_TASK_DIALOGUE, "rel/b.nzp");
    assert_model(&c, 2, "c-3", &NZ_TASK_TRANSLATE, "C:/x:y.nzp"); /* the path keeps its colons */
    srv_config_free(&c);
    load_ok(&c, path, ENV("NZSERVE_MODELS=solo:dialogue:s.nzp"), NOARGS);
    assert_int_equal(c.n_models, 1);
    assert_model(&c, 0, "solo", &NZ_TASK_DIALOGUE, "s.nzp");
    srv_config_free(&c);

    load_err(path, ENV("NZSERVE_MODELS=a:translate"), NOARGS,
             "NZSERVE_MODELS[0]: must be name:task:path, got 'a:translate'");
    load_err(path, ENV("NZSERVE_MODELS=a"), NOARGS, "NZSERVE_MODELS[0]: must be name:task:path");
    load_err(path, ENV("NZSERVE_MODELS=a:translate:"), NOARGS, "NZSERVE_MODELS[0].path: must not be empty");
    load_err(path, ENV("NZSERVE_MODELS=a:translate:x,,b:dialogue:y"), NOARGS,
             "NZSERVE_MODELS[1]: must be name:task:path, got ''");
    load_err(path, ENV("NZSERVE_MODELS=a:translate:x,"), NOARGS, "NZSERVE_MODELS[1]: must be name:task:path");
    load_err(path, NOENV, ARGS("--models", "a:translate:x,b"),
             "--models[1]: must be name:task:path, got 'b'");
}

static void test_model_flag_repeat(void **state) {
    char path[256];
    write_cfg(path, sizeof path, "mflag.json",
              "{\"models\": [{\"name\": \"f1\", \"task\": \"translate\", \"path\": \"/f1\"},"
              " {\"name\": \"f2\", \"task\": \"translate\", \"path\": \"/f2\"}]}");
    srv_config c;
    /* the first --model replaces the file's list */
    load_ok(&c, path, NOENV, ARGS("--model", "a:translate:/a"));
    assert_int_equal(c.n_models, 1);
    assert_model(&c, 0, "a", &NZ_TASK_TRANSLATE, "/a");
    srv_config_free(&c);
    /* later uses append */
    load_ok(&c, path, NOENV,
            ARGS("--model", "a:translate:/a", "--port", "1", "--model=b:dialogue:/b", "--model",
                 "c:translate:/c"));
    assert_int_equal(c.n_models, 3);
    assert_model(&c, 0, "a", &NZ_TASK_TRANSLATE, "/a");
    assert_model(&c, 1, "b", &NZ_TASK_DIALOGUE, "/b");
    assert_model(&c, 2, "c", &NZ_TASK_TRANSLATE, "/c");
    srv_config_free(&c);
    /* ... and replaces the environment's list too */
    load_ok(&c, path, ENV("NZSERVE_MODELS=e1:translate:/e1,e2:translate:/e2"),
            ARGS("--model", "a:translate:/a"));
    assert_int_equal(c.n_models, 1);
    assert_model(&c, 0, "a", &NZ_TASK_TRANSLATE, "/a");
    srv_config_free(&c);
    /* flags in order: --models replaces, a later --model appends to it */
    load_ok(&c, path, NOENV, ARGS("--models", "x:translate:/x,y:translate:/y", "--model", "z:dialogue:/z"));
    assert_int_equal(c.n_models, 3);
    assert_model(&c, 2, "z", &NZ_TASK_DIALOGUE, "/z");
    srv_config_free(&c);
    load_ok(&c, path, NOENV, ARGS("--model", "z:dialogue:/z", "--models", "x:translate:/x"));
    assert_int_equal(c.n_models, 1);
    assert_model(&c, 0, "x", &NZ_TASK_TRANSLATE, "/x");
    srv_config_free(&c);
    /* no --model: the file's list */
    load_ok(&c, path, NOENV, NOARGS);
    assert_int_equal(c.n_models, 2);
    assert_model(&c, 1, "f2", &NZ_TASK_TRANSLATE, "/f2");
    srv_config_free(&c);
}

static void test_shipped_config(void **state) {
    srv_config c;
    load_ok(&c, "config/nzserve.json", NOENV, NOARGS);
    assert_string_equal(c.config_path, "config/nzserve.json");
    assert_int_equal(c.n_models, 2); /* both demo models */
    assert_model(&c, 0, "nat-ende", &NZ_TASK_TRANSLATE, "config/../models/demo/nat-ende.nzp");
    assert_model(&c, 1, "dialogue", &NZ_TASK_DIALOGUE, "config/../models/demo/dialogue.nzp");
    assert_int_equal(c.tile_cache_bytes, 64 << 20);
    c.tile_cache_bytes = 0;
    assert_defaults(&c);
    assert_int_equal(c.n_api_keys, 0);
    assert_string_equal(c.api_key_file, "");
    srv_config_free(&c);

    load_ok(&c, NULL, NOENV, ARGS("--config", "config/nzserve.json"));
    assert_string_equal(c.config_path, "config/nzserve.json");
    srv_config_free(&c);
}

static void test_config_selection(void **state) {
    char a[256], b[256], d[256], envb[300];
    write_cfg(a, sizeof a, "a.json", "{\"port\": 1001}");
    write_cfg(b, sizeof b, "b.json", "{\"port\": 1002}");
    write_cfg(d, sizeof d, "d.json", "{\"port\": 1003}");
    snprintf(envb, sizeof envb, "NZSERVE_CONFIG=%s", b);
    srv_config c;
    load_ok(&c, a, NOENV, ARGS(MODEL_ARG));
    assert_int_equal(c.port, 1001);
    assert_string_equal(c.config_path, a);
    srv_config_free(&c);
    load_ok(&c, a, ENV(envb), ARGS(MODEL_ARG));
    assert_int_equal(c.port, 1002);
    assert_string_equal(c.config_path, b);
    srv_config_free(&c);
    load_ok(&c, a, ENV(envb), ARGS(MODEL_ARG, "--config", d));
    assert_int_equal(c.port, 1003);
    assert_string_equal(c.config_path, d);
    srv_config_free(&c);
    char eq[300];
    snprintf(eq, sizeof eq, "--config=%s", d);
    load_ok(&c, a, ENV(envb), ARGS(eq, MODEL_ARG));
    assert_int_equal(c.port, 1003);
    srv_config_free(&c);
    /* an empty NZSERVE_CONFIG is unset */
    load_ok(&c, a, ENV("NZSERVE_CONFIG="), ARGS(MODEL_ARG));
    assert_int_equal(c.port, 1001);
    srv_config_free(&c);

    /* a named file must exist; the default one may not */
    char missing[256], want[400];
    tpath(missing, sizeof missing, g_dir, "missing.json");
    snprintf(want, sizeof want, "--config: cannot open '%s': No such file or directory", missing);
    load_err(a, NOENV, ARGS(MODEL_ARG, "--config", missing), want);
    snprintf(envb, sizeof envb, "NZSERVE_CONFIG=%s", missing);
    snprintf(want, sizeof want, "NZSERVE_CONFIG: cannot open '%s'", missing);
    load_err(a, ENV(envb), ARGS(MODEL_ARG), want);
    load_ok(&c, missing, NOENV, ARGS(MODEL_ARG));
    assert_null(c.config_path);
    srv_config_free(&c);
    load_err(a, NOENV, ARGS(MODEL_ARG, "--config="), "--config: must not be empty");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--config", g_dir), "is a directory");
    load_err(g_dir, NOENV, ARGS(MODEL_ARG), "is a directory");
}

static void test_bools_and_logs(void **state) {
    static const struct {
        const char *v;
        int b;
    } vals[] = {{"true", 1}, {"false", 0}, {"1", 1},   {"0", 0},    {"yes", 1},
                {"no", 0},   {"on", 1},    {"off", 0}, {"TRUE", 1}, {"Off", 0}};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        char env[64], flag[64];
        srv_config c;
        snprintf(env, sizeof env, "NZSERVE_METRICS=%s", vals[i].v);
        load_ok(&c, NULL, ENV(env), ARGS(MODEL_ARG));
        assert_int_equal(c.metrics, vals[i].b);
        srv_config_free(&c);
        snprintf(flag, sizeof flag, "--metrics=%s", vals[i].v);
        load_ok(&c, NULL, ENV(vals[i].b ? "NZSERVE_METRICS=0" : "NZSERVE_METRICS=1"), ARGS(MODEL_ARG, flag));
        assert_int_equal(c.metrics, vals[i].b);
        srv_config_free(&c);
    }
    load_err(NULL, ENV("NZSERVE_METRICS=2"), ARGS(MODEL_ARG),
             "NZSERVE_METRICS: must be true/false/1/0/yes/no/on/off, got '2'");
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--metrics", ""), "--metrics: must be true/false");

    srv_config c;
    load_ok(&c, NULL, ENV("NZSERVE_LOG_LEVEL=warning"), ARGS(MODEL_ARG, "--log-format", "JSON"));
    assert_int_equal(c.log_level, SRV_LOG_WARN);
    assert_int_equal(c.log_format, SRV_LOG_JSON);
    srv_config_free(&c);
    load_ok(&c, NULL, ENV("NZSERVE_LOG_LEVEL=debug", "NZSERVE_LOG_FORMAT=json"),
            ARGS(MODEL_ARG, "--log-format", "logfmt"));
    assert_int_equal(c.log_level, SRV_LOG_DEBUG);
    assert_int_equal(c.log_format, SRV_LOG_LOGFMT);
    srv_config_free(&c);
    load_err(NULL, NOENV, ARGS(MODEL_ARG, "--log-level", "verbose"),
             "--log-level: must be debug, info, warn or error, got 'verbose'");
    load_err(NULL, ENV("NZSERVE_LOG_FORMAT=text"), ARGS(MODEL_ARG),
             "NZSERVE_LOG_FORMAT: must be logfmt or json, got 'text'");
}

static void test_to_json(void **state) {
    srv_config c;
    load_ok(
        &c, NULL, ENV("NZSERVE_API_KEYS=secret-key-AAAA1111,secret-key-BBBB2222"),
        ARGS(MODEL_ARG, "--model", "chat:dialogue:/c.nzp", "--tile-cache-bytes", "2GiB", "--port", "9999"));
    json_t *j = srv_config_to_json(&c);
    assert_non_null(j);
    char *s = json_dumps(j, JSON_COMPACT);
    assert_non_null(s);
    assert_null(strstr(s, "secret-key"));
    assert_non_null(strstr(s, "\"api_keys\":2"));
    assert_int_equal(json_integer_value(json_object_get(j, "api_keys")), 2);
    assert_int_equal(json_integer_value(json_object_get(j, "port")), 9999);
    assert_int_equal(json_integer_value(json_object_get(j, "tile_cache_bytes")), 2ll << 30);
    assert_string_equal(json_string_value(json_object_get(j, "host")), "127.0.0.1");
    assert_string_equal(json_string_value(json_object_get(j, "log_level")), "info");
    assert_string_equal(json_string_value(json_object_get(j, "log_format")), "logfmt");
    assert_true(json_is_true(json_object_get(j, "metrics")));
    assert_true(json_is_null(json_object_get(j, "config_path")));
    json_t *m = json_object_get(j, "models");
    assert_int_equal(json_array_size(m), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(m, 1), "name")), "chat");
    assert_string_equal(json_string_value(json_object_get(json_array_get(m, 1), "task")), "dialogue");
    assert_string_equal(json_string_value(json_object_get(json_array_get(m, 1), "path")), "/c.nzp");
    /* every setting is there */
    static const char *const keys[] = {"host",
                                       "port",
                                       "worker_threads",
                                       "http_threads",
                                       "models",
                                       "tile_cache_bytes",
                                       "max_body_bytes",
                                       "max_input_tokens",
                                       "max_texts",
                                       "max_new_tokens",
                                       "max_concurrent_requests",
                                       "queue_length",
                                       "request_timeout_ms",
                                       "connection_timeout_s",
                                       "shutdown_grace_ms",
                                       "api_keys",
                                       "api_key_file",
                                       "log_level",
                                       "log_format",
                                       "metrics"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        if (!json_object_get(j, keys[i])) fail_msg("no '%s' in %s", keys[i], s);
    json_free_t jfree; /* json_dumps allocates with jansson's allocator (hooked by nz_alloc when linked) */
    json_get_alloc_funcs(NULL, &jfree);
    jfree(s);
    json_decref(j);
    srv_config_free(&c);

    /* the shipped config round-trips through the JSON as a config file */
    load_ok(&c, "config/nzserve.json", NOENV, NOARGS);
    j = srv_config_to_json(&c);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "config_path")), "config/nzserve.json");
    json_object_del(j, "config_path");
    json_object_set_new(j, "api_keys", json_array());
    char path[256];
    tpath(path, sizeof path, g_dir, "roundtrip.json");
    assert_int_equal(json_dump_file(j, path, JSON_INDENT(2)), 0);
    json_decref(j);
    srv_config c2;
    load_ok(&c2, path, NOENV, NOARGS);
    assert_int_equal(c2.tile_cache_bytes, c.tile_cache_bytes);
    assert_int_equal(c2.n_models, 2);
    srv_config_free(&c2);
    srv_config_free(&c);
}

static void test_validate(void **state) {
    srv_config c;
    char err[ERRLEN];
    assert_int_equal(srv_config_init(&c), 0);
    assert_int_equal(srv_config_validate(&c, err, sizeof err), -1);
    assert_non_null(strstr(err, "models: at least one model is required"));
    srv_model_cfg m[2] = {{"a", "/a", &NZ_TASK_TRANSLATE}, {"b", "/b", &NZ_TASK_DIALOGUE}};
    c.models = m;
    c.n_models = 2;
    assert_int_equal(srv_config_validate(&c, err, sizeof err), 0);
    assert_int_equal(srv_config_validate(&c, NULL, 0), 0);
    c.port = 70000;
    assert_int_equal(srv_config_validate(&c, err, sizeof err), -1);
    assert_string_equal(err, "port: must be an integer in 0..65535, got 70000");
    assert_int_equal(srv_config_validate(&c, NULL, 0), -1); /* no buffer: fine */
    c.port = 80;
    c.max_body_bytes = 0;
    assert_int_equal(srv_config_validate(&c, err, sizeof err), -1);
    assert_non_null(strstr(err, "max_body_bytes: must be a size in 1..1073741824"));
    c.max_body_bytes = 1;
    m[1].task = NULL;
    assert_int_equal(srv_config_validate(&c, err, sizeof err), -1);
    assert_string_equal(err, "models[1].task: must be \"translate\" or \"dialogue\"");
    m[1].task = &NZ_TASK_DIALOGUE;
    m[1].name = "a";
    assert_int_equal(srv_config_validate(&c, err, sizeof err), -1);
    assert_string_equal(err, "models[1].name: duplicate model name 'a' (also models[0])");
    m[1].name = "b";
    char *keys[1] = {"short"};
    c.api_keys = keys;
    c.n_api_keys = 1;
    assert_int_equal(srv_config_validate(&c, err, sizeof err), -1);
    assert_non_null(strstr(err, "api_keys[0]: must be 8..256"));
    c.n_api_keys = 0;
    c.log_level = (srv_log_level)9;
    assert_int_equal(srv_config_validate(&c, err, sizeof err), -1);
    assert_non_null(strstr(err, "log_level"));
    c.log_level = SRV_LOG_INFO;
    assert_int_equal(srv_config_validate(&c, err, 8), 0);
    c.port = -1;
    assert_int_equal(srv_config_validate(&c, err, 8), -1); /* truncated, terminated */
    assert_int_equal(strlen(err), 7);
    /* not ours: detach before freeing */
    c.models = NULL;
    c.n_models = 0;
    c.api_keys = NULL;
    srv_config_free(&c);

    assert_string_equal(srv_task_name(&NZ_TASK_TRANSLATE), "translate");
    assert_string_equal(srv_task_name(&NZ_TASK_DIALOGUE), "dialogue");
    assert_string_equal(srv_task_name(NULL), "unknown");
    srv_task t = &NZ_TASK_TRANSLATE;
    assert_int_equal(srv_task_parse("dialogue", &t), 0);
    assert_ptr_equal(t, &NZ_TASK_DIALOGUE);
    assert_int_equal(srv_task_parse("chat", &t), -1);
    assert_int_equal(srv_task_parse(NULL, &t), -1);

    /* a tiny error buffer is never overrun */
    char small[6];
    int rc = srv_config_load(&c, NULL, NULL, 0, NULL, small, sizeof small);
    assert_int_equal(rc, SRV_CFG_ERROR);
    assert_int_equal(strlen(small), 5);
    srv_config_free(&c);
    rc = srv_config_load(&c, NULL, NULL, 0, NULL, NULL, 0);
    assert_int_equal(rc, SRV_CFG_ERROR);
    srv_config_free(&c);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_file_values),
        cmocka_unit_test(test_env_overrides_file),
        cmocka_unit_test(test_flags_override_env),
        cmocka_unit_test(test_flag_equals),
        cmocka_unit_test(test_size_suffixes),
        cmocka_unit_test(test_bad_json),
        cmocka_unit_test(test_wrong_type),
        cmocka_unit_test(test_out_of_range),
        cmocka_unit_test(test_unknown),
        cmocka_unit_test(test_missing_value),
        cmocka_unit_test(test_bad_task),
        cmocka_unit_test(test_model_names),
        cmocka_unit_test(test_no_models),
        cmocka_unit_test(test_bad_api_key),
        cmocka_unit_test(test_api_key_file),
        cmocka_unit_test(test_api_key_file_missing),
        cmocka_unit_test(test_relative_model_path),
        cmocka_unit_test(test_help),
        cmocka_unit_test(test_models_env),
        cmocka_unit_test(test_model_flag_repeat),
        cmocka_unit_test(test_shipped_config),
        cmocka_unit_test(test_config_selection),
        cmocka_unit_test(test_bools_and_logs),
        cmocka_unit_test(test_to_json),
        cmocka_unit_test(test_validate),
        cmocka_unit_test(test_health_check),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
