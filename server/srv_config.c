/*
 * srv_config.c — defaults, config file (jansson), environment and flags,
 * merged in that order into one srv_config; see srv_config.h.
 *
 * One table (SETTINGS) describes every setting: its JSON key (from which the
 * NZSERVE_* and --flag spellings are derived), its kind and, for numbers, its
 * range. Each source parses values into the struct through the same setters,
 * so a value means the same wherever it comes from; srv_config_validate
 * re-checks the result (ranges, models, keys) and the cross-field rules.
 */
#include "srv_config.h"
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

/* ------------------------------------------------------------ the table */

typedef enum {
    K_HOST,    /* char *, 1..255 chars */
    K_INT,     /* int in lo..hi */
    K_SIZE,    /* size_t in lo..hi, integer or "64MiB" */
    K_BOOL,    /* int 0/1 */
    K_LEVEL,   /* srv_log_level */
    K_FORMAT,  /* srv_log_format */
    K_MODELS,  /* models / n_models */
    K_KEYS,    /* api_keys / n_api_keys */
    K_KEYFILE, /* api_key_file */
} kind;

typedef struct setting {
    const char *key; /* JSON key; env = NZSERVE_ + upper, flag = -- + dashes */
    kind k;
    size_t off; /* of the int/size_t field (K_INT, K_SIZE, K_BOOL) */
    long long lo, hi;
} setting;

#define S_INT(f, lo, hi)                                                                                     \
    { #f, K_INT, offsetof(srv_config, f), lo, hi }
#define S_SIZE(f, lo, hi)                                                                                    \
    { #f, K_SIZE, offsetof(srv_config, f), lo, hi }
#define S_BOOL(f)                                                                                            \
    { #f, K_BOOL, offsetof(srv_config, f), 0, 1 }
#define HOST_MAX     255
#define KEY_MIN      8
#define KEY_MAX      256
#define NAME_MAX_LEN 63
#define WHERE_LEN    1024

static const setting SETTINGS[] = {
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
#define N_SETTINGS (sizeof SETTINGS / sizeof SETTINGS[0])

static const char *const LEVEL_NAMES[] = {"debug", "info", "warn", "error"};
static const char *const FORMAT_NAMES[] = {"logfmt", "json"};

#define MSG_NAME "must be 1..63 characters of [A-Za-z0-9._-]"
#define MSG_TASK "must be \"translate\" or \"dialogue\""
#define MSG_KEY  "must be 8..256 printable ASCII characters without spaces"

static int *int_at(srv_config *c, const setting *s) { return (int *)(void *)((char *)c + s->off); }
static size_t *size_at(srv_config *c, const setting *s) { return (size_t *)(void *)((char *)c + s->off); }
static int int_get(const srv_config *c, const setting *s) {
    return *(const int *)(const void *)((const char *)c + s->off);
}
static size_t size_get(const srv_config *c, const setting *s) {
    return *(const size_t *)(const void *)((const char *)c + s->off);
}

/* --------------------------------------------------------------- errors */

typedef struct ctx {
    srv_config *c;
    char *err;
    size_t errlen;
    int flag_models;               /* --model/--models seen: the next --model appends */
    size_t n_model_flags;          /* --model uses so far (for error names) */
    char keyfile_where[WHERE_LEN]; /* source of api_key_file, for its errors */
} ctx;

#define fail          srv_errf
#define XFAIL(x, ...) fail((x)->err, (x)->errlen, __VA_ARGS__)
#define OOM(x)        XFAIL(x, "out of memory")

/* -------------------------------------------------------------- helpers */

static char *dupn(const char *s, size_t n) {
    char *p = malloc(n + 1);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

static void free_models(srv_model_cfg *m, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(m[i].name);
        free(m[i].path);
    }
    free(m);
}

static void free_strs(char **v, size_t n) {
    for (size_t i = 0; i < n; i++) free(v[i]);
    free(v);
}

static int name_ok(const char *s, size_t n) {
    if (n < 1 || n > NAME_MAX_LEN) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x80 || (!isalnum(ch) && ch != '.' && ch != '_' && ch != '-')) return 0;
    }
    return 1;
}

static int key_ok(const char *s, size_t n) {
    if (n < KEY_MIN || n > KEY_MAX) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) return 0;
    return 1;
}

static int host_ok(const char *s) { return s && *s && strlen(s) <= HOST_MAX; }

static int task_parse_n(const char *s, size_t n, srv_task *t) {
    if (n == 9 && !memcmp(s, "translate", 9)) {
        *t = SRV_TASK_TRANSLATE;
        return 0;
    }
    if (n == 8 && !memcmp(s, "dialogue", 8)) {
        *t = SRV_TASK_DIALOGUE;
        return 0;
    }
    return -1;
}

int srv_task_parse(const char *s, srv_task *t) { return s ? task_parse_n(s, strlen(s), t) : -1; }

const char *srv_task_name(srv_task t) {
    return t == SRV_TASK_TRANSLATE ? "translate" : t == SRV_TASK_DIALOGUE ? "dialogue" : "unknown";
}

static int level_parse(const char *s, srv_log_level *l) {
    for (int i = 0; i < 4; i++)
        if (!strcasecmp(s, LEVEL_NAMES[i])) {
            *l = (srv_log_level)i;
            return 0;
        }
    if (!strcasecmp(s, "warning")) {
        *l = SRV_LOG_WARN;
        return 0;
    }
    return -1;
}

static int format_parse(const char *s, srv_log_format *f) {
    for (int i = 0; i < 2; i++)
        if (!strcasecmp(s, FORMAT_NAMES[i])) {
            *f = (srv_log_format)i;
            return 0;
        }
    return -1;
}

static int bool_parse(const char *s, int *b) {
    static const char *const T[] = {"true", "1", "yes", "on"}, *const F[] = {"false", "0", "no", "off"};
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(s, T[i])) return *b = 1, 0;
        if (!strcasecmp(s, F[i])) return *b = 0, 0;
    }
    return -1;
}

/* @return 0 and *v, -1 (not an integer) or -2 (an integer beyond long long). */
static int ll_parse(const char *s, long long *v) {
    const char *p = s;
    if (*p == '+' || *p == '-') p++;
    if (!isdigit((unsigned char)*p)) return -1;
    while (isdigit((unsigned char)*p)) p++;
    if (*p) return -1;
    errno = 0;
    long long x = strtoll(s, NULL, 10);
    if (errno == ERANGE) return -2;
    *v = x;
    return 0;
}

int srv_config_parse_size(const char *s, uint64_t *out) {
    if (!s || !isdigit((unsigned char)*s)) return -1;
    uint64_t v = 0;
    const char *p = s;
    for (; isdigit((unsigned char)*p); p++) {
        unsigned d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) return -1;
        v = v * 10 + d;
    }
    if (*p == ' ' && p[1]) p++;
    unsigned shift = 0;
    switch (tolower((unsigned char)*p)) {
    case 'k':
        shift = 10;
        break;
    case 'm':
        shift = 20;
        break;
    case 'g':
        shift = 30;
        break;
    case 't':
        shift = 40;
        break;
    case 'b':
        p++;
        break;
    case 0:
        break;
    default:
        return -1;
    }
    if (shift) {
        p++;
        if (tolower((unsigned char)p[0]) == 'i' && tolower((unsigned char)p[1]) == 'b')
            p += 2;
        else if (tolower((unsigned char)p[0]) == 'b')
            p++;
    }
    if (*p) return -1;
    if (shift && v > (UINT64_MAX >> shift)) return -1;
    *out = v << shift;
    return 0;
}

/* dir + "/" + path for a relative path and a non-NULL dir, else a copy. */
static char *resolve(const char *dir, const char *path) {
    if (!dir || path[0] == '/' || !path[0]) return strdup(path);
    size_t dl = strlen(dir), pl = strlen(path);
    int slash = dl && dir[dl - 1] != '/';
    char *r = malloc(dl + (size_t)slash + pl + 1);
    if (!r) return NULL;
    memcpy(r, dir, dl);
    if (slash) r[dl] = '/';
    memcpy(r + dl + (size_t)slash, path, pl + 1);
    return r;
}

static const setting *find_key(const char *key) {
    for (size_t i = 0; i < N_SETTINGS; i++)
        if (!strcmp(SETTINGS[i].key, key)) return &SETTINGS[i];
    return NULL;
}

/* NZSERVE_<NAME>: name (n chars, upper snake) against the lower snake keys. */
static const setting *find_env(const char *name, size_t n) {
    for (size_t i = 0; i < N_SETTINGS; i++) {
        const char *k = SETTINGS[i].key;
        size_t j = 0;
        while (j < n && k[j] && name[j] == (char)toupper((unsigned char)k[j])) j++;
        if (j == n && !k[j]) return &SETTINGS[i];
    }
    return NULL;
}

/* --<name-with-dashes>: name (n chars) against the keys. */
static int flag_matches(const char *name, size_t n, const char *key) {
    size_t j = 0;
    while (j < n && key[j] && name[j] == (key[j] == '_' ? '-' : key[j])) j++;
    return j == n && !key[j];
}

static const setting *find_flag(const char *name, size_t n) {
    for (size_t i = 0; i < N_SETTINGS; i++)
        if (flag_matches(name, n, SETTINGS[i].key)) return &SETTINGS[i];
    return NULL;
}

static int replace_str(char **dst, const char *src) {
    char *p = strdup(src);
    if (!p) return -1;
    free(*dst);
    *dst = p;
    return 0;
}

static void set_models(srv_config *c, srv_model_cfg *m, size_t n) {
    free_models(c->models, c->n_models);
    c->models = m;
    c->n_models = n;
}

static void set_keys(srv_config *c, char **k, size_t n) {
    free_strs(c->api_keys, c->n_api_keys);
    c->api_keys = k;
    c->n_api_keys = n;
}

/* ---------------------------------------------------- values as strings */

/* Parse one "name:task:path" entry (s[0..n)); where names it in errors. */
static int model_from_spec(ctx *x, const char *where, const char *s, size_t n, srv_model_cfg *out) {
    const char *c1 = memchr(s, ':', n);
    const char *c2 = c1 ? memchr(c1 + 1, ':', n - (size_t)(c1 + 1 - s)) : NULL;
    if (!c2) return XFAIL(x, "%s: must be name:task:path, got '%.*s'", where, (int)(n > 200 ? 200 : n), s);
    srv_task t;
    if (!name_ok(s, (size_t)(c1 - s))) return XFAIL(x, "%s.name: " MSG_NAME, where);
    if (task_parse_n(c1 + 1, (size_t)(c2 - c1 - 1), &t)) return XFAIL(x, "%s.task: " MSG_TASK, where);
    if (c2 + 1 == s + n) return XFAIL(x, "%s.path: must not be empty", where);
    out->name = dupn(s, (size_t)(c1 - s));
    out->path = dupn(c2 + 1, n - (size_t)(c2 + 1 - s));
    out->task = t;
    if (!out->name || !out->path) {
        free(out->name);
        free(out->path);
        return OOM(x);
    }
    return 0;
}

/* Comma-separated "name:task:path" entries replacing the list ("" = none). */
static int models_from_string(ctx *x, const char *where, const char *v) {
    size_t cap = 1;
    for (const char *p = v; *p; p++) cap += *p == ',';
    srv_model_cfg *m = calloc(cap, sizeof *m);
    if (!m) return OOM(x);
    size_t n = 0;
    for (const char *p = v; *v; n++) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        char w[WHERE_LEN];
        snprintf(w, sizeof w, "%s[%zu]", where, n);
        if (model_from_spec(x, w, p, len, &m[n])) {
            free_models(m, n);
            return -1;
        }
        if (!e) {
            n++;
            break;
        }
        p = e + 1;
    }
    set_models(x->c, m, n);
    return 0;
}

/* Comma-separated API keys replacing the list ("" = none). */
static int keys_from_string(ctx *x, const char *where, const char *v) {
    size_t cap = 1;
    for (const char *p = v; *p; p++) cap += *p == ',';
    char **k = calloc(cap, sizeof *k);
    if (!k) return OOM(x);
    size_t n = 0;
    for (const char *p = v; *v;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (!key_ok(p, len)) {
            free_strs(k, n);
            return XFAIL(x, "%s: key %zu (%zu characters): " MSG_KEY, where, n + 1, len);
        }
        if (!(k[n++] = dupn(p, len))) {
            free_strs(k, n);
            return OOM(x);
        }
        if (!e) break;
        p = e + 1;
    }
    set_keys(x->c, k, n);
    return 0;
}

/* A value from the environment or a flag (where = "NZSERVE_X" or "--x"). */
static int apply_string(ctx *x, const setting *s, const char *where, const char *v) {
    srv_config *c = x->c;
    switch (s->k) {
    case K_HOST:
        if (!host_ok(v)) return XFAIL(x, "%s: must be a non-empty host of at most 255 characters", where);
        return replace_str(&c->host, v) ? OOM(x) : 0;
    case K_INT: {
        long long n = 0;
        int r = ll_parse(v, &n);
        if (r == -1) return XFAIL(x, "%s: not an integer: '%.80s'", where, v);
        if (r || n < s->lo || n > s->hi)
            return XFAIL(x, "%s: must be an integer in %lld..%lld, got '%.80s'", where, s->lo, s->hi, v);
        *int_at(c, s) = (int)n;
        return 0;
    }
    case K_SIZE: {
        uint64_t n = 0;
        if (srv_config_parse_size(v, &n))
            return XFAIL(x, "%s: not a size: '%.80s' (an integer or a string like \"64MiB\")", where, v);
        if (n < (uint64_t)s->lo || n > (uint64_t)s->hi)
            return XFAIL(x, "%s: must be a size in %lld..%lld bytes, got '%.80s'", where, s->lo, s->hi, v);
        *size_at(c, s) = (size_t)n;
        return 0;
    }
    case K_BOOL:
        if (bool_parse(v, int_at(c, s)))
            return XFAIL(x, "%s: must be true/false/1/0/yes/no/on/off, got '%.80s'", where, v);
        return 0;
    case K_LEVEL:
        if (level_parse(v, &c->log_level))
            return XFAIL(x, "%s: must be debug, info, warn or error, got '%.80s'", where, v);
        return 0;
    case K_FORMAT:
        if (format_parse(v, &c->log_format))
            return XFAIL(x, "%s: must be logfmt or json, got '%.80s'", where, v);
        return 0;
    case K_MODELS:
        return models_from_string(x, where, v);
    case K_KEYS:
        return keys_from_string(x, where, v);
    case K_KEYFILE:
        snprintf(x->keyfile_where, sizeof x->keyfile_where, "%s", where);
        return replace_str(&c->api_key_file, v) ? OOM(x) : 0;
    }
    return XFAIL(x, "%s: internal error", where);
}

/* ------------------------------------------------------- values as JSON */

/* One model object of the config file; elem = "<file>: models[i]". */
static int model_from_json(ctx *x, const char *elem, json_t *o, const char *dir, srv_model_cfg *out) {
    if (!json_is_object(o))
        return XFAIL(x, "%s: must be an object with \"name\", \"task\" and \"path\"", elem);
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v) {
        if (strcmp(k, "name") && strcmp(k, "task") && strcmp(k, "path"))
            return XFAIL(x, "%s: unknown key '%.80s' (expected \"name\", \"task\" and \"path\")", elem, k);
    }
    json_t *name = json_object_get(o, "name"), *task = json_object_get(o, "task"),
           *path = json_object_get(o, "path");
    if (!name) return XFAIL(x, "%s.name: missing", elem);
    if (!json_is_string(name) || !name_ok(json_string_value(name), json_string_length(name)))
        return XFAIL(x, "%s.name: " MSG_NAME, elem);
    srv_task t;
    if (!task) return XFAIL(x, "%s.task: missing", elem);
    if (!json_is_string(task) || srv_task_parse(json_string_value(task), &t))
        return XFAIL(x, "%s.task: " MSG_TASK, elem);
    if (!path) return XFAIL(x, "%s.path: missing", elem);
    if (!json_is_string(path) || !json_string_length(path) ||
        strlen(json_string_value(path)) != json_string_length(path))
        return XFAIL(x, "%s.path: must be a non-empty string", elem);
    out->name = strdup(json_string_value(name));
    out->path = resolve(dir, json_string_value(path));
    out->task = t;
    if (!out->name || !out->path) {
        free(out->name);
        free(out->path);
        return OOM(x);
    }
    return 0;
}

/* A value of the config file: where = "<file>: 'key'" for the value,
 * elem = "<file>: key" for its elements; dir resolves relative paths. */
static int apply_json(ctx *x, const setting *s, const char *where, const char *elem, json_t *v,
                      const char *dir) {
    srv_config *c = x->c;
    switch (s->k) {
    case K_HOST:
        if (!json_is_string(v) || !host_ok(json_string_value(v)))
            return XFAIL(x, "%s: must be a non-empty string of at most 255 characters", where);
        return replace_str(&c->host, json_string_value(v)) ? OOM(x) : 0;
    case K_INT:
        if (!json_is_integer(v) || json_integer_value(v) < s->lo || json_integer_value(v) > s->hi)
            return XFAIL(x, "%s: must be an integer in %lld..%lld", where, s->lo, s->hi);
        *int_at(c, s) = (int)json_integer_value(v);
        return 0;
    case K_SIZE: {
        uint64_t n = 0;
        int ok = 0;
        if (json_is_integer(v) && json_integer_value(v) >= 0) {
            n = (uint64_t)json_integer_value(v);
            ok = 1;
        } else if (json_is_string(v)) {
            ok = !srv_config_parse_size(json_string_value(v), &n);
        }
        if (!ok || n < (uint64_t)s->lo || n > (uint64_t)s->hi)
            return XFAIL(x, "%s: must be a size in %lld..%lld bytes (an integer or a string like \"64MiB\")",
                         where, s->lo, s->hi);
        *size_at(c, s) = (size_t)n;
        return 0;
    }
    case K_BOOL:
        if (!json_is_boolean(v)) return XFAIL(x, "%s: must be true or false", where);
        *int_at(c, s) = json_is_true(v);
        return 0;
    case K_LEVEL:
        if (!json_is_string(v) || level_parse(json_string_value(v), &c->log_level))
            return XFAIL(x, "%s: must be \"debug\", \"info\", \"warn\" or \"error\"", where);
        return 0;
    case K_FORMAT:
        if (!json_is_string(v) || format_parse(json_string_value(v), &c->log_format))
            return XFAIL(x, "%s: must be \"logfmt\" or \"json\"", where);
        return 0;
    case K_MODELS: {
        if (!json_is_array(v))
            return XFAIL(x, "%s: must be an array of {\"name\", \"task\", \"path\"}", where);
        size_t n = json_array_size(v);
        srv_model_cfg *m = calloc(n ? n : 1, sizeof *m);
        if (!m) return OOM(x);
        for (size_t i = 0; i < n; i++) {
            char w[WHERE_LEN];
            snprintf(w, sizeof w, "%s[%zu]", elem, i);
            if (model_from_json(x, w, json_array_get(v, i), dir, &m[i])) {
                free_models(m, i);
                return -1;
            }
        }
        set_models(c, m, n);
        return 0;
    }
    case K_KEYS: {
        if (!json_is_array(v)) return XFAIL(x, "%s: must be an array of strings", where);
        size_t n = json_array_size(v);
        char **k = calloc(n ? n : 1, sizeof *k);
        if (!k) return OOM(x);
        for (size_t i = 0; i < n; i++) {
            json_t *e = json_array_get(v, i);
            if (!json_is_string(e) || !key_ok(json_string_value(e), json_string_length(e))) {
                free_strs(k, i);
                return XFAIL(x, "%s[%zu]: " MSG_KEY, elem, i);
            }
            if (!(k[i] = strdup(json_string_value(e)))) {
                free_strs(k, i);
                return OOM(x);
            }
        }
        set_keys(c, k, n);
        return 0;
    }
    case K_KEYFILE: {
        if (!json_is_string(v) || strlen(json_string_value(v)) != json_string_length(v))
            return XFAIL(x, "%s: must be a string", where);
        char *p = resolve(dir, json_string_value(v));
        if (!p) return OOM(x);
        free(c->api_key_file);
        c->api_key_file = p;
        snprintf(x->keyfile_where, sizeof x->keyfile_where, "%s", where);
        return 0;
    }
    }
    return XFAIL(x, "%s: internal error", where);
}

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
    if (replace_str(&x->c->config_path, path)) {
        rc = OOM(x);
        goto out;
    }
    const char *slash = strrchr(path, '/');
    if (slash && !(dir = dupn(path, slash == path ? 1 : (size_t)(slash - path)))) {
        rc = OOM(x);
        goto out;
    }
    const char *key;
    json_t *v;
    json_object_foreach(root, key, v) {
        const setting *s = find_key(key);
        if (!s) {
            rc = XFAIL(x, "%s: unknown key '%.80s'", path, key);
            goto out;
        }
        char where[WHERE_LEN], elem[WHERE_LEN];
        snprintf(where, sizeof where, "%s: '%s'", path, key);
        snprintf(elem, sizeof elem, "%s: %s", path, key);
        if ((rc = apply_json(x, s, where, elem, v, dir))) goto out;
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
        const setting *s = find_env(name, n);
        char where[WHERE_LEN];
        snprintf(where, sizeof where, "NZSERVE_%.*s", (int)n, name);
        if (!s)
            return XFAIL(x, "%s: unknown environment variable (see --help for the NZSERVE_* names)", where);
        if (apply_string(x, s, where, eq + 1)) return -1;
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
    return find_flag(name, n) || (n == 6 && !memcmp(name, "config", 6)) ||
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
            if (model_from_spec(x, where, a.value, strlen(a.value), &m)) return -1;
            srv_config *c = x->c;
            if (!x->flag_models) set_models(c, NULL, 0);
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
        const setting *s = find_flag(a.name, a.nlen);
        if (apply_string(x, s, where, a.value)) return -1;
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
        if (!key_ok(p, (size_t)(e - p))) {
            rc = XFAIL(x, "%s: '%s' line %zu: " MSG_KEY, where, path, lineno);
            break;
        }
        char **nk = realloc(c->api_keys, (c->n_api_keys + 1) * sizeof *nk);
        char *k = nk ? dupn(p, (size_t)(e - p)) : NULL;
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
    if (!host_ok(c->host))
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
        if (!m->name || !name_ok(m->name, strlen(m->name)))
            return fail(err, errlen, "models[%zu].name: " MSG_NAME, i);
        if (m->task != SRV_TASK_TRANSLATE && m->task != SRV_TASK_DIALOGUE)
            return fail(err, errlen, "models[%zu].task: " MSG_TASK, i);
        if (!m->path || !*m->path) return fail(err, errlen, "models[%zu].path: must not be empty", i);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(c->models[j].name, m->name))
                return fail(err, errlen, "models[%zu].name: duplicate model name '%s' (also models[%zu])", i,
                            m->name, j);
    }
    if (c->n_api_keys && !c->api_keys) return fail(err, errlen, "api_keys: missing");
    for (size_t i = 0; i < c->n_api_keys; i++)
        if (!c->api_keys[i] || !key_ok(c->api_keys[i], strlen(c->api_keys[i])))
            return fail(err, errlen, "api_keys[%zu]: " MSG_KEY, i);
    return 0;
}

void srv_config_free(srv_config *c) {
    if (!c) return;
    free(c->host);
    free_models(c->models, c->n_models);
    free_strs(c->api_keys, c->n_api_keys);
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
