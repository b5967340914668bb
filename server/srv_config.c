/*
 * srv_config.c — defaults, config file (jansson), environment and flags,
 * merged in that order into one srv_config; see srv_config.h.
 *
 * One table (SETTINGS) describes every setting: its JSON key (from which the
 * NZSERVE_* and --flag spellings are derived), its kind and, for numbers, its
 * range. Each source parses values into the struct through the same setters,
 * (srv_config_value.c), so a value means the same wherever it comes from; srv_config_validate
 * re-checks the result (ranges, models, keys) and the cross-field rules.
 */
#include "srv_config_int.h"
#include "srv_text.h"

#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

const setting SETTINGS[] = {
    {"host", K_HOST, 0, 1, HOST_MAX},
    S_INT(port, 0, 65535),
    S_INT(worker_threads, 0, 256),
    S_INT(http_threads, 1, 64),
    {"models", K_MODELS, 0, 0, 0},
    S_SIZE(tile_cache_bytes, 0, 1LL << 50),
    S_SIZE(memory_budget_bytes, 0, 1LL << 50),
    S_SIZE(max_body_bytes, 1, 1LL << 30),
    S_INT(max_input_tokens, 1, 65536),
    S_INT(max_texts, 1, 4096),
    S_INT(max_new_tokens, 1, 65536),
    S_INT(max_concurrent_requests, 1, 1024),
    S_INT(queue_length, 0, 100000),
    S_INT(request_timeout_ms, 1, 3600000),
    S_INT(connection_timeout_s, 1, 3600),
    S_INT(read_timeout_ms, 100, 3600000),
    S_INT(max_connections, 16, 1000000),
    S_INT(max_connections_per_client, 0, 1000000),
    S_INT(shutdown_grace_ms, 0, 3600000),
    {"api_keys", K_KEYS, 0, 0, 0},
    {"api_key_file", K_KEYFILE, 0, 0, 0},
    {"log_level", K_LEVEL, 0, 0, 0},
    {"log_format", K_FORMAT, 0, 0, 0},
    S_BOOL(metrics),
    S_BOOL(ui),
    S_BOOL(verify_on_load),
    S_BOOL(batching),
};

const size_t N_SETTINGS = sizeof SETTINGS / sizeof SETTINGS[0];

const char *const LEVEL_NAMES[4] = {"debug", "info", "warn", "error"};
const char *const FORMAT_NAMES[2] = {"logfmt", "json"};

/* ------------------------------------------------------------- sources */

/* source: what named the file ("--config", "NZSERVE_CONFIG", "config file"). */
static int load_file(ctx *x, const char *path, const char *source) {
    FILE *f = fopen(path, "rb");
    if (!f) return XFAIL(x, "%s: cannot open '%s': %s", source, path, strerror(errno));
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && S_ISDIR(st.st_mode)) {
        fclose(f);
        return XFAIL(x, "%s: '%s' is a directory", source, path);
    }
    json_error_t je;
    json_t *root = json_loadf(f, JSON_REJECT_DUPLICATES, &je);
    int rerr = ferror(f);
    fclose(f);
    if (!root) {
        if (rerr) return XFAIL(x, "%s: cannot read '%s'", source, path);
        return XFAIL(x, "%s: line %d, column %d: invalid JSON: %s", path, je.line, je.column, je.text);
    }
    int rc = 0;
    char *dir = NULL;
    if (!json_is_object(root)) {
        rc = XFAIL(x, "%s: must contain a JSON object", path);
        goto out;
    }
    if (cfg_replace_str(&x->c->config_path, path)) {
        rc = OOM(x);
        goto out;
    }
    const char *slash = strrchr(path, '/');
    if (slash && !(dir = cfg_dupn(path, slash == path ? 1 : (size_t)(slash - path)))) {
        rc = OOM(x);
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        const setting *s = cfg_find_key(key);
        if (!s) {
            rc = XFAIL(x, "%s: unknown key '%.80s'", path, key);
            goto out;
        }
        char where[WHERE_LEN], elem[WHERE_LEN];
        snprintf(where, sizeof where, "%s: '%s'", path, key);
        snprintf(elem, sizeof elem, "%s: %s", path, key);
        if ((rc = cfg_apply_json(x, s, where, elem, v, dir))) goto out;
    }
out:
    free(dir);
    json_decref(root);
    return rc;
}

static const char *env_get(char *const *envp, const char *name) {
    size_t n = strlen(name);
    for (char *const *e = envp; e && *e; e++)
        if (!strncmp(*e, name, n) && (*e)[n] == '=') return *e + n + 1;
    return NULL;
}

static int load_env(ctx *x, char *const *envp) {
    for (char *const *e = envp; e && *e; e++) {
        if (strncmp(*e, "NZSERVE_", 8)) continue;
        const char *name = *e + 8, *eq = strchr(name, '=');
        if (!eq) continue;
        size_t n = (size_t)(eq - name);
        if ((n == 6 && !memcmp(name, "CONFIG", 6)) || (n == 4 && !memcmp(name, "HOME", 4))) continue;
        /* test hooks (NZSERVE_DEBUG_*, read by the server) and the variables Kubernetes injects for a
           Service named nzserve (NZSERVE_SERVICE_HOST, NZSERVE_PORT=tcp://..., NZSERVE_PORT_8080_TCP...) */
        if (!strncmp(name, "DEBUG_", 6) || !strncmp(name, "SERVICE_", 8) || !strncmp(name, "PORT_", 5) ||
            (n == 4 && !memcmp(name, "PORT", 4) && strstr(eq + 1, "://")))
            continue;
        const setting *s = cfg_find_env(name, n);
        char where[WHERE_LEN];
        snprintf(where, sizeof where, "NZSERVE_%.*s", (int)n, name);
        if (!s)
            return XFAIL(x, "%s: unknown environment variable (see --help for the NZSERVE_* names)", where);
        if (cfg_apply_string(x, s, where, eq + 1)) return -1;
    }
    return 0;
}

typedef enum { ARG_FLAG, ARG_HELP, ARG_PROBE, ARG_OTHER } arg_kind;

typedef struct arg {
    const char *name; /* after "--" */
    size_t nlen;      /* up to '=' */
    const char *value;
    int known, missing;
} arg;

static int flag_like(const char *s) { return s[0] == '-' && s[1] == '-' && isalpha((unsigned char)s[2]); }

static int flag_known(const char *name, size_t n) {
    return cfg_find_flag(name, n) || (n == 6 && !memcmp(name, "config", 6)) ||
           (n == 5 && !memcmp(name, "model", 5));
}

/* Read argv[*i] (and its value, advancing *i) into *a. Both passes over argv
 * use this, so they agree on which arguments are values. */
static arg_kind next_arg(int argc, char *const *argv, int *i, arg *a) {
    const char *s = argv[*i];
    memset(a, 0, sizeof *a);
    if (!strcmp(s, "-h")) return ARG_HELP;
    if (s[0] != '-' || s[1] != '-' || !s[2]) return ARG_OTHER;
    a->name = s + 2;
    const char *eq = strchr(a->name, '=');
    a->nlen = eq ? (size_t)(eq - a->name) : strlen(a->name);
    if (a->nlen == 4 && !memcmp(a->name, "help", 4)) return ARG_HELP;
    if (!strcmp(a->name, "health-check")) return ARG_PROBE;
    a->known = flag_known(a->name, a->nlen);
    if (eq)
        a->value = eq + 1;
    else if (a->known) {
        if (*i + 1 < argc && !flag_like(argv[*i + 1]))
            a->value = argv[++*i];
        else
            a->missing = 1;
    }
    return ARG_FLAG;
}

static int load_flags(ctx *x, int argc, char *const *argv) {
    for (int i = 1; i < argc; i++) {
        arg a;
        arg_kind k = next_arg(argc, argv, &i, &a);
        if (k == ARG_HELP || k == ARG_PROBE) continue; /* pass 1 handled these */
        if (k == ARG_OTHER) return XFAIL(x, "unexpected argument '%.80s' (flags are --name VALUE)", argv[i]);
        char where[WHERE_LEN];
        snprintf(where, sizeof where, "--%.*s", (int)a.nlen, a.name);
        if (!a.known) return XFAIL(x, "%s: unknown flag (see --help)", where);
        if (a.missing) return XFAIL(x, "%s: missing value", where);
        if (!strcmp(where, "--config")) continue; /* pass 1 */
        if (!strcmp(where, "--model")) {
            srv_model_cfg m;
            snprintf(where, sizeof where, "--model[%zu]", x->n_model_flags++);
            if (cfg_model_from_spec(x, where, a.value, strlen(a.value), &m)) return -1;
            srv_config *c = x->c;
            if (!x->flag_models) cfg_set_models(c, NULL, 0);
            srv_model_cfg *nm = realloc(c->models, (c->n_models + 1) * sizeof *nm);
            if (!nm) {
                free(m.name);
                free(m.path);
                return OOM(x);
            }
            nm[c->n_models] = m;
            c->models = nm;
            c->n_models++;
            x->flag_models = 1;
            continue;
        }
        const setting *s = cfg_find_flag(a.name, a.nlen);
        if (cfg_apply_string(x, s, where, a.value)) return -1;
        if (s->k == K_MODELS) x->flag_models = 1;
    }
    return 0;
}

/* Append the keys of c->api_key_file (one per line; blank and '#' lines
 * skipped); a file without any key is an error. */
static int load_key_file(ctx *x) {
    srv_config *c = x->c;
    const char *path = c->api_key_file, *where = x->keyfile_where[0] ? x->keyfile_where : "api_key_file";
    if (!path || !*path) return 0;
    FILE *f = fopen(path, "r");
    if (!f) return XFAIL(x, "%s: cannot open '%s': %s", where, path, strerror(errno));
    char *line = NULL;
    size_t cap = 0, lineno = 0, before = c->n_api_keys;
    ssize_t len;
    int rc = 0;
    errno = 0;
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        char *p = line, *e = line + len;
        while (e > p && isspace((unsigned char)e[-1])) e--;
        while (p < e && isspace((unsigned char)*p)) p++;
        if (p == e || *p == '#') continue;
        if (!cfg_key_ok(p, (size_t)(e - p))) {
            rc = XFAIL(x, "%s: '%s' line %zu: " MSG_KEY, where, path, lineno);
            break;
        }
        char **nk = realloc(c->api_keys, (c->n_api_keys + 1) * sizeof *nk);
        char *k = nk ? cfg_dupn(p, (size_t)(e - p)) : NULL;
        if (nk) c->api_keys = nk;
        if (!k) {
            rc = OOM(x);
            break;
        }
        c->api_keys[c->n_api_keys++] = k;
    }
    if (!rc && ferror(f)) rc = XFAIL(x, "%s: cannot read '%s': %s", where, path, strerror(errno));
    /* a key file that names no key would leave the API open: an operator who points at one wants auth */
    if (!rc && c->n_api_keys == before)
        rc = XFAIL(
            x, "%s: '%s' holds no API key (only blank or '#' lines); remove the setting to run without keys",
            where, path);
    free(line);
    fclose(f);
    return rc;
}

/* ------------------------------------------------------------- the API */

int srv_config_init(srv_config *c) {
    memset(c, 0, sizeof *c);
    c->host = strdup("127.0.0.1");
    c->api_key_file = strdup("");
    c->port = 8080;
    c->worker_threads = 0;
    c->http_threads = 2;
    c->tile_cache_bytes = 0;
    c->max_body_bytes = 1048576;
    c->max_input_tokens = 256;
    c->max_texts = 64;
    c->max_new_tokens = 256;
    c->max_concurrent_requests = 2;
    c->queue_length = 64;
    c->request_timeout_ms = 30000;
    c->connection_timeout_s = 30;
    c->read_timeout_ms = 30000;
    c->max_connections = 4096;
    c->max_connections_per_client = 64;
    c->shutdown_grace_ms = 10000;
    c->log_level = SRV_LOG_INFO;
    c->log_format = SRV_LOG_LOGFMT;
    c->metrics = 1;
    c->ui = 1;
    c->verify_on_load = 1;
    c->batching = 1;
    return c->host && c->api_key_file ? 0 : -1;
}

int srv_config_load(srv_config *c, const char *default_path, char *const *envp, int argc, char *const *argv,
                    char *err, size_t errlen) {
    if (err && errlen) err[0] = 0;
    ctx x = {.c = c, .err = err, .errlen = errlen};
    if (srv_config_init(c)) return OOM(&x), SRV_CFG_ERROR;

    /* pass 1 over argv: --help wins over everything, --config picks the file */
    const char *cfg = NULL;
    int help = 0, cfg_missing = 0;
    for (int i = 1; i < argc; i++) {
        arg a;
        arg_kind k = next_arg(argc, argv, &i, &a);
        if (k == ARG_HELP) help = 1;
        if (k == ARG_PROBE) c->health_check = 1;
        if (k == ARG_FLAG && a.nlen == 6 && !memcmp(a.name, "config", 6)) {
            cfg = a.value;
            cfg_missing = a.missing;
        }
    }
    if (help) return SRV_CFG_HELP;
    if (cfg_missing) return XFAIL(&x, "--config: missing value"), SRV_CFG_ERROR;
    if (cfg && !*cfg) return XFAIL(&x, "--config: must not be empty"), SRV_CFG_ERROR;

    const char *env_cfg = env_get(envp, "NZSERVE_CONFIG");
    int rc = 0;
    if (cfg)
        rc = load_file(&x, cfg, "--config");
    else if (env_cfg && *env_cfg)
        rc = load_file(&x, env_cfg, "NZSERVE_CONFIG");
    else if (default_path && *default_path && access(default_path, F_OK) == 0)
        rc = load_file(&x, default_path, "config file");
    if (rc || load_env(&x, envp) || load_flags(&x, argc, argv) || load_key_file(&x)) return SRV_CFG_ERROR;
    return srv_config_validate(c, err, errlen) ? SRV_CFG_ERROR : SRV_CFG_OK;
}

uint64_t srv_config_memory_limit(void) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    uint64_t lim = pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
    FILE *f = fopen("/sys/fs/cgroup/memory.max", "r"); /* "max" or a byte count */
    unsigned long long cg = 0;
    if (f) {
        if (fscanf(f, "%llu", &cg) == 1 && cg > 0 && (!lim || cg < lim)) lim = cg;
        fclose(f);
    }
    return lim;
}

int srv_config_validate(const srv_config *c, char *err, size_t errlen) {
    const uint64_t mem = srv_config_memory_limit();
    const struct {
        const char *key;
        size_t v;
    } sizes[] = {{"tile_cache_bytes", c->tile_cache_bytes}, {"memory_budget_bytes", c->memory_budget_bytes}};
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
        if (mem && sizes[i].v > mem)
            return fail(err, errlen,
                        "%s: %zu bytes is more than the memory this process may use (%llu bytes: the "
                        "machine's, or its container's limit)",
                        sizes[i].key, sizes[i].v, (unsigned long long)mem);
    if (c->memory_budget_bytes && c->memory_budget_bytes <= c->tile_cache_bytes)
        return fail(err, errlen,
                    "memory_budget_bytes: %zu bytes leaves nothing beside tile_cache_bytes (%zu)",
                    c->memory_budget_bytes, c->tile_cache_bytes);
    if (!cfg_host_ok(c->host))
        return fail(err, errlen, "host: must be a non-empty string of at most 255 characters");
    for (size_t i = 0; i < N_SETTINGS; i++) {
        const setting *s = &SETTINGS[i];
        if (s->k == K_INT && (int_get(c, s) < s->lo || int_get(c, s) > s->hi))
            return fail(err, errlen, "%s: must be an integer in %lld..%lld, got %d", s->key, s->lo, s->hi,
                        int_get(c, s));
        if (s->k == K_SIZE && (size_get(c, s) < (size_t)s->lo || size_get(c, s) > (size_t)s->hi))
            return fail(err, errlen, "%s: must be a size in %lld..%lld bytes, got %zu", s->key, s->lo, s->hi,
                        size_get(c, s));
    }
    if ((unsigned)c->log_level > SRV_LOG_ERROR) return fail(err, errlen, "log_level: out of range");
    if ((unsigned)c->log_format > SRV_LOG_JSON) return fail(err, errlen, "log_format: out of range");
    if ((!c->n_models || !c->models) && !c->health_check)
        return fail(err, errlen,
                    "models: at least one model is required (\"models\" in the config file, NZSERVE_MODELS, "
                    "--models or --model)");
    for (size_t i = 0; i < c->n_models; i++) {
        const srv_model_cfg *m = &c->models[i];
        if (!m->name || !cfg_name_ok(m->name, strlen(m->name)))
            return fail(err, errlen, "models[%zu].name: " MSG_NAME, i);
        char names[128];
        if (!m->task || nz_task_find(m->task->name, strlen(m->task->name)) != m->task)
            return fail(err, errlen, "models[%zu].task: must be %s", i, nz_task_names(names, sizeof names));
        if (!m->path || !*m->path) return fail(err, errlen, "models[%zu].path: must not be empty", i);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(c->models[j].name, m->name))
                return fail(err, errlen, "models[%zu].name: duplicate model name '%s' (also models[%zu])", i,
                            m->name, j);
    }
    if (c->n_api_keys && !c->api_keys) return fail(err, errlen, "api_keys: missing");
    for (size_t i = 0; i < c->n_api_keys; i++)
        if (!c->api_keys[i] || !cfg_key_ok(c->api_keys[i], strlen(c->api_keys[i])))
            return fail(err, errlen, "api_keys[%zu]: " MSG_KEY, i);
    return 0;
}

void srv_config_free(srv_config *c) {
    if (!c) return;
    free(c->host);
    cfg_free_models(c->models, c->n_models);
    cfg_free_strs(c->api_keys, c->n_api_keys);
    free(c->api_key_file);
    free(c->config_path);
    memset(c, 0, sizeof *c);
}

json_t *srv_config_to_json(const srv_config *c) {
    json_t *o = json_object(), *models = json_array();
    int bad = !o || !models;
    for (size_t i = 0; !bad && i < c->n_models; i++) {
        const srv_model_cfg *m = &c->models[i];
        json_t *e =
            json_pack("{s:s?, s:s, s:s?}", "name", m->name, "task", srv_task_name(m->task), "path", m->path);
        bad |= json_array_append_new(models, e) != 0;
    }
    if (bad) {
        json_decref(o);
        json_decref(models);
        return NULL;
    }
    for (size_t i = 0; i < N_SETTINGS; i++) {
        const setting *s = &SETTINGS[i];
        json_t *v = NULL;
        switch (s->k) {
        case K_HOST:
            v = c->host ? json_string(c->host) : json_null();
            break;
        case K_INT:
            v = json_integer(int_get(c, s));
            break;
        case K_SIZE:
            v = json_integer((json_int_t)size_get(c, s));
            break;
        case K_BOOL:
            v = json_boolean(int_get(c, s));
            break;
        case K_LEVEL:
            v = json_string((unsigned)c->log_level <= SRV_LOG_ERROR ? LEVEL_NAMES[c->log_level] : "unknown");
            break;
        case K_FORMAT:
            v = json_string((unsigned)c->log_format <= SRV_LOG_JSON ? FORMAT_NAMES[c->log_format]
                                                                    : "unknown");
            break;
        case K_MODELS:
            v = json_incref(models);
            break;
        case K_KEYS:
            v = json_integer((json_int_t)c->n_api_keys);
            break;
        case K_KEYFILE:
            v = json_string(c->api_key_file ? c->api_key_file : "");
            break;
        }
        bad |= json_object_set_new(o, s->key, v) != 0;
    }
    bad |= json_object_set_new(o, "config_path",
                               c->config_path ? json_string(c->config_path) : json_null()) != 0;
    json_decref(models);
    if (bad) {
        json_decref(o);
        return NULL;
    }
    return o;
}

const char *srv_config_usage(void) {
    return "usage: nzserve [--config PATH] [--name VALUE | --name=VALUE]...\n"
           "\n"
           "Settings come from built-in defaults < the config file < NZSERVE_<NAME> environment\n"
           "variables < flags. The config file is --config PATH, else $NZSERVE_CONFIG, else the\n"
           "default config file when it exists. Each flag --some-name has the JSON key some_name\n"
           "and the environment variable NZSERVE_SOME_NAME.\n"
           "\n"
           "  --config PATH                    JSON config file\n"
           "  --host ADDR                      listen address (127.0.0.1)\n"
           "  --port N                         listen port, 0 = pick a free one (8080)\n"
           "  --worker-threads N               compute threads 0..256, 0 = all cores (0)\n"
           "  --http-threads N                 HTTP threads 1..64 (2)\n"
           "  --models NAME:TASK:PATH,...      models to serve, replacing the list (TASK: translate or\n"
           "                                   dialogue; at least one model is required)\n"
           "  --model NAME:TASK:PATH           one model; the first use replaces the list, later uses "
           "append\n"
           "  --tile-cache-bytes SIZE          decoded-tile cache budget, e.g. 64MiB; 0 = no cache (0)\n"
           "  --memory-budget-bytes SIZE       memory the process may use; requests reserve their estimated\n"
           "                                   peak from what the loaded models and the tile cache leave\n"
           "                                   (0 = 80%% of the machine's or the container's memory) (0)\n"
           "  --max-body-bytes SIZE            largest request body (1MiB)\n"
           "  --max-input-tokens N             tokens per input text, 1..65536 (256)\n"
           "  --max-texts N                    texts per request, 1..4096 (64)\n"
           "  --max-new-tokens N               generated tokens per text, 1..65536 (256)\n"
           "  --max-concurrent-requests N      inference requests running at once, 1..1024 (2)\n"
           "  --queue-length N                 requests waiting beyond those, 0..100000 (64)\n"
           "  --request-timeout-ms N           deadline of a request from arrival (30000)\n"
           "  --connection-timeout-s N         connection timeout in seconds, 1..3600 (30)\n"
           "  --read-timeout-ms N              deadline for a request's headers and body, from when the\n"
           "                                   connection is ready to read it; bytes do not extend it "
           "(30000)\n"
           "  --max-connections N              open connections in all, 16..1000000 (4096)\n"
           "  --max-connections-per-client N   open connections from one IP address, 0 = no limit (64)\n"
           "  --shutdown-grace-ms N            time to finish requests at shutdown (10000)\n"
           "  --api-keys KEY,...               accepted API keys, 8..256 printable characters (none)\n"
           "  --api-key-file PATH              file of API keys, one a line, '#' comments (none)\n"
           "  --log-level LEVEL                debug, info, warn or error (info)\n"
           "  --log-format FORMAT              logfmt or json (logfmt)\n"
           "  --metrics BOOL                   enable metrics: true/false/1/0/yes/no/on/off (true)\n"
           "  --ui BOOL                        serve the web playground at / (true)\n"
           "  --verify-on-load BOOL            check every weight tile's checksum while loading (true)\n"
           "  --health-check                   probe a running server instead of starting one: GET /health\n"
           "                                   on the configured host and port (127.0.0.1 or ::1 for a\n"
           "                                   wildcard host), 2 s timeout; exit 0 on a 200, else 1 (a\n"
           "                                   container HEALTHCHECK); models are not required\n"
           "  -h, --help                       print this help\n"
           "\n"
           "SIZE: an integer number of bytes or one with a binary suffix K, M, G (KiB, MiB, GiB).\n";
}
