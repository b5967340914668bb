/* srv_config_value.c — one value of a setting, from a string (environment, flags, model specs) or from
 * JSON (the config file), checked and set into the srv_config (see srv_config_int.h). */
#include "srv_config_int.h"
#include "srv_text.h"

#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* -------------------------------------------------------------- helpers */

char *cfg_dupn(const char *s, size_t n) {
    char *p = malloc(n + 1);
    if (!p) return NULL;
    memcpy(p, s, n);
    p[n] = 0;
    return p;
}

void cfg_free_models(srv_model_cfg *m, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(m[i].name);
        free(m[i].path);
    }
    free(m);
}

void cfg_free_strs(char **v, size_t n) {
    for (size_t i = 0; i < n; i++) free(v[i]);
    free(v);
}

int cfg_name_ok(const char *s, size_t n) {
    if (n < 1 || n > NAME_MAX_LEN) return 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch >= 0x80 || (!isalnum(ch) && ch != '.' && ch != '_' && ch != '-')) return 0;
    }
    return 1;
}

int cfg_key_ok(const char *s, size_t n) {
    if (n < KEY_MIN || n > KEY_MAX) return 0;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x21 || (unsigned char)s[i] > 0x7e) return 0;
    return 1;
}

int cfg_host_ok(const char *s) { return s && *s && strlen(s) <= HOST_MAX; }

static int task_parse_n(const char *s, size_t n, srv_task *t) {
    const nz_task *k = nz_task_find(s, n);
    if (!k) return -1;
    *t = k;
    return 0;
}

int srv_task_parse(const char *s, srv_task *t) { return s ? task_parse_n(s, strlen(s), t) : -1; }

const char *srv_task_name(srv_task t) { return t ? t->name : "unknown"; }

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

const setting *cfg_find_key(const char *key) {
    for (size_t i = 0; i < N_SETTINGS; i++)
        if (!strcmp(SETTINGS[i].key, key)) return &SETTINGS[i];
    return NULL;
}

/* NZSERVE_<NAME>: name (n chars, upper snake) against the lower snake keys. */
const setting *cfg_find_env(const char *name, size_t n) {
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

const setting *cfg_find_flag(const char *name, size_t n) {
    for (size_t i = 0; i < N_SETTINGS; i++)
        if (flag_matches(name, n, SETTINGS[i].key)) return &SETTINGS[i];
    return NULL;
}

int cfg_replace_str(char **dst, const char *src) {
    char *p = strdup(src);
    if (!p) return -1;
    free(*dst);
    *dst = p;
    return 0;
}

void cfg_set_models(srv_config *c, srv_model_cfg *m, size_t n) {
    cfg_free_models(c->models, c->n_models);
    c->models = m;
    c->n_models = n;
}

static void set_keys(srv_config *c, char **k, size_t n) {
    cfg_free_strs(c->api_keys, c->n_api_keys);
    c->api_keys = k;
    c->n_api_keys = n;
}

/* ---------------------------------------------------- values as strings */

/* Parse one "name:task:path" entry (s[0..n)); where names it in errors. */
int cfg_model_from_spec(ctx *x, const char *where, const char *s, size_t n, srv_model_cfg *out) {
    const char *c1 = memchr(s, ':', n);
    const char *c2 = c1 ? memchr(c1 + 1, ':', n - (size_t)(c1 + 1 - s)) : NULL;
    if (!c2) return XFAIL(x, "%s: must be name:task:path, got '%.*s'", where, (int)(n > 200 ? 200 : n), s);
    srv_task t;
    if (!cfg_name_ok(s, (size_t)(c1 - s))) return XFAIL(x, "%s.name: " MSG_NAME, where);
    char names[128];
    if (task_parse_n(c1 + 1, (size_t)(c2 - c1 - 1), &t))
        return XFAIL(x, "%s.task: must be %s", where, nz_task_names(names, sizeof names));
    if (c2 + 1 == s + n) return XFAIL(x, "%s.path: must not be empty", where);
    out->name = cfg_dupn(s, (size_t)(c1 - s));
    out->path = cfg_dupn(c2 + 1, n - (size_t)(c2 + 1 - s));
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
        if (cfg_model_from_spec(x, w, p, len, &m[n])) {
            cfg_free_models(m, n);
            return -1;
        }
        if (!e) {
            n++;
            break;
        }
        p = e + 1;
    }
    cfg_set_models(x->c, m, n);
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
        if (!cfg_key_ok(p, len)) {
            cfg_free_strs(k, n);
            return XFAIL(x, "%s: key %zu (%zu characters): " MSG_KEY, where, n + 1, len);
        }
        if (!(k[n++] = cfg_dupn(p, len))) {
            cfg_free_strs(k, n);
            return OOM(x);
        }
        if (!e) break;
        p = e + 1;
    }
    set_keys(x->c, k, n);
    return 0;
}

/* A value from the environment or a flag (where = "NZSERVE_X" or "--x"). */
int cfg_apply_string(ctx *x, const setting *s, const char *where, const char *v) {
    srv_config *c = x->c;
    switch (s->k) {
    case K_HOST:
        if (!cfg_host_ok(v)) return XFAIL(x, "%s: must be a non-empty host of at most 255 characters", where);
        return cfg_replace_str(&c->host, v) ? OOM(x) : 0;
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
        return cfg_replace_str(&c->api_key_file, v) ? OOM(x) : 0;
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
    if (!json_is_string(name) || !cfg_name_ok(json_string_value(name), json_string_length(name)))
        return XFAIL(x, "%s.name: " MSG_NAME, elem);
    srv_task t;
    if (!task) return XFAIL(x, "%s.task: missing", elem);
    char names[128];
    if (!json_is_string(task) || srv_task_parse(json_string_value(task), &t))
        return XFAIL(x, "%s.task: must be %s", elem, nz_task_names(names, sizeof names));
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
int cfg_apply_json(ctx *x, const setting *s, const char *where, const char *elem, json_t *v,
                   const char *dir) {
    srv_config *c = x->c;
    switch (s->k) {
    case K_HOST:
        if (!json_is_string(v) || !cfg_host_ok(json_string_value(v)))
            return XFAIL(x, "%s: must be a non-empty string of at most 255 characters", where);
        return cfg_replace_str(&c->host, json_string_value(v)) ? OOM(x) : 0;
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
                cfg_free_models(m, i);
                return -1;
            }
        }
        cfg_set_models(c, m, n);
        return 0;
    }
    case K_KEYS: {
        if (!json_is_array(v)) return XFAIL(x, "%s: must be an array of strings", where);
        size_t n = json_array_size(v);
        char **k = calloc(n ? n : 1, sizeof *k);
        if (!k) return OOM(x);
        for (size_t i = 0; i < n; i++) {
            json_t *e = json_array_get(v, i);
            if (!json_is_string(e) || !cfg_key_ok(json_string_value(e), json_string_length(e))) {
                cfg_free_strs(k, i);
                return XFAIL(x, "%s[%zu]: " MSG_KEY, elem, i);
            }
            if (!(k[i] = strdup(json_string_value(e)))) {
                cfg_free_strs(k, i);
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
