/*
 * srv_config_int.h — what the files of the configuration share (not a public
 * API; srv_config.h is): the table of settings, the parsing context and the
 * value parsers.
 *
 *   srv_config.c        the table, the sources (file, environment, flags, key file) and the API
 *   srv_config_value.c  one value of a setting, from a string or from JSON, into the struct
 */
#ifndef SRV_CONFIG_INT_H
#define SRV_CONFIG_INT_H

#include "srv_config.h"

#include <stddef.h>

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

/* every setting (srv_config.c) */
extern const setting SETTINGS[];
extern const size_t N_SETTINGS;

extern const char *const LEVEL_NAMES[4];
extern const char *const FORMAT_NAMES[2];

#define MSG_NAME "must be 1..63 characters of [A-Za-z0-9._-]"
#define MSG_KEY  "must be 8..256 printable ASCII characters without spaces"

static inline int *int_at(srv_config *c, const setting *s) { return (int *)(void *)((char *)c + s->off); }
static inline size_t *size_at(srv_config *c, const setting *s) {
    return (size_t *)(void *)((char *)c + s->off);
}
static inline int int_get(const srv_config *c, const setting *s) {
    return *(const int *)(const void *)((const char *)c + s->off);
}
static inline size_t size_get(const srv_config *c, const setting *s) {
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

/* ------------------------------------------------------------- srv_config_value.c */

/* @return a NUL-terminated copy of s[0..n) (malloc), or NULL. */
char *cfg_dupn(const char *s, size_t n);

/* Free n model entries and their array. */
void cfg_free_models(srv_model_cfg *m, size_t n);

/* Free n strings and their array. */
void cfg_free_strs(char **v, size_t n);

/* @return whether s[0..n) is a valid model name (MSG_NAME). */
int cfg_name_ok(const char *s, size_t n);

/* @return whether s[0..n) is a valid API key (MSG_KEY). */
int cfg_key_ok(const char *s, size_t n);

/* @return whether s is a valid host setting (1..HOST_MAX characters). */
int cfg_host_ok(const char *s);

/* @return the setting of JSON key key, or NULL. */
const setting *cfg_find_key(const char *key);

/* NZSERVE_<NAME>: name (n chars, upper snake) against the lower snake keys. */
const setting *cfg_find_env(const char *name, size_t n);

/* @return the setting of --name (name[0..n), dashes for underscores), or NULL. */
const setting *cfg_find_flag(const char *name, size_t n);

/* *dst = a copy of src (the old one freed). @return 0, or -1 when out of memory (*dst unchanged). */
int cfg_replace_str(char **dst, const char *src);

/* c's models = m[0..n) (owned from now on; the old ones freed). */
void cfg_set_models(srv_config *c, srv_model_cfg *m, size_t n);

/* Parse one "name:task:path" entry (s[0..n)); where names it in errors. */
int cfg_model_from_spec(ctx *x, const char *where, const char *s, size_t n, srv_model_cfg *out);

/* A value from the environment or a flag (where = "NZSERVE_X" or "--x"). */
int cfg_apply_string(ctx *x, const setting *s, const char *where, const char *v);

/* A value of the config file: where = "<file>: 'key'" for the value,
 * elem = "<file>: key" for its elements; dir resolves relative paths. */
int cfg_apply_json(ctx *x, const setting *s, const char *where, const char *elem, json_t *v, const char *dir);

#endif /* SRV_CONFIG_INT_H */
