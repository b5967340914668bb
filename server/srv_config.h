/*
 * srv_config.h — configuration of the nzserve HTTP server.
 *
 * Every setting has one name in three spellings: the JSON key of the config
 * file (lower snake case, "max_texts"), an environment variable (NZSERVE_ and
 * upper case, "NZSERVE_MAX_TEXTS") and a command-line flag ("--max-texts VALUE"
 * or "--max-texts=VALUE"). Later sources override earlier ones:
 *
 *   built-in defaults < config file < environment < command-line flags
 *
 * The config file is the one named by --config PATH, else by NZSERVE_CONFIG,
 * else default_path when that file exists, else none (defaults only).
 * Relative model paths and a relative api_key_file written in a config file
 * are resolved against the directory of that file; relative paths from the
 * environment or flags are kept as given (relative to the working directory).
 *
 * Unknown JSON keys, unknown NZSERVE_* variables (other than NZSERVE_CONFIG
 * and NZSERVE_HOME) and unknown flags are errors, so a typo never silently
 * falls back to a default. Error messages name the setting and its source
 * but never echo an API key.
 */
#ifndef SRV_CONFIG_H
#define SRV_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "nz_task.h"
#include "srv_log.h" /* srv_log_level, srv_log_format */

#ifdef __cplusplus
extern "C" {
#endif

/** What a model serves. */
typedef const nz_task *srv_task; /* NZ_TASK_TRANSLATE, NZ_TASK_DIALOGUE, ... (models/nz_task.h) */

/** One model to load: a unique name (1..63 chars of [A-Za-z0-9._-]), the
 *  .nzp file and its task. */
typedef struct srv_model_cfg {
    char *name;
    char *path;
    srv_task task;
} srv_model_cfg;

/** The effective configuration (see the table in srv_config_usage()). */
typedef struct srv_config {
    char *host;         /* listen address, default "127.0.0.1" */
    int port;           /* 0..65535, 0 = pick a free port */
    int worker_threads; /* compute threads, 0 = all cores */
    int http_threads;   /* 1..64 */
    srv_model_cfg *models;
    size_t n_models;
    size_t tile_cache_bytes, max_body_bytes;
    size_t memory_budget_bytes; /* the process's memory budget, 0 = 80 % of srv_config_memory_limit() */
    int max_input_tokens, max_texts, max_new_tokens, max_concurrent_requests, queue_length;
    int request_timeout_ms, connection_timeout_s, shutdown_grace_ms;
    int read_timeout_ms;            /* a request's headers and body must arrive within it (srv_conn.h) */
    int max_connections;            /* open connections in all (libmicrohttpd's limit) */
    int max_connections_per_client; /* open connections from one IP address (0: no limit) */
    char **api_keys;                /* api_keys plus the keys read from api_key_file */
    size_t n_api_keys;
    char *api_key_file; /* "" when unset; resolved as described above */
    srv_log_level log_level;
    srv_log_format log_format;
    int metrics;        /* 0 or 1 */
    int ui;             /* 0 or 1: the web playground at GET / */
    int verify_on_load; /* 0 or 1: every tile's checksum checked while loading (a damaged model is not ready)
                         */
    int batching;       /* 0 or 1: requests decoded together (dialogue greedy / sampling continuously) */
    char *config_path;  /* the file that was read, or NULL */
    int health_check;   /* 1: --health-check was given (probe a running server; no model is required) */
} srv_config;

/** Return codes of srv_config_load. */
enum { SRV_CFG_OK = 0, SRV_CFG_ERROR = -1, SRV_CFG_HELP = 1 };

/** Build the configuration from defaults, the config file, envp (NULL-terminated "K=V" array, e.g. environ;
 *  may be NULL) and argv[1..argc).
 *  On error writes a one-line message naming the setting and its source into err (e.g.
 *  "config/nzserve.json: 'port': must be an integer in 0..65535", "NZSERVE_MAX_TEXTS: not an integer: 'abc'",
 *  "--queue-length: missing value", "config/nzserve.json: models[1].task: must be \"translate\" or
 *  \"dialogue\""). A flag's value is missing when it is absent or the next argument starts with "--" and a
 *  letter (use --name=VALUE for such values). The api_key_file is read here. Does not check that model files
 *  exist (the server does that when loading). Ends with srv_config_validate.
 *  @return SRV_CFG_OK, SRV_CFG_HELP (--help or -h seen; nothing else is checked) or SRV_CFG_ERROR; *c must be
 *  freed with srv_config_free in every case. */
int srv_config_load(srv_config *c, const char *default_path, char *const *envp, int argc, char *const *argv,
                    char *err, size_t errlen);

/** Validate c: every setting in its range, well-formed models and API keys, and the cross-field rules (at
 *  least one model, unique model names).
 *  @return 0, or -1 with a one-line message in err. */
int srv_config_validate(const srv_config *c, char *err, size_t errlen);

/** @return the memory this process may use: the machine's physical memory,
 *  or its cgroup v2 limit (/sys/fs/cgroup/memory.max) when lower; 0 when
 *  unknown. */
uint64_t srv_config_memory_limit(void);

/** Free everything inside c (not c itself) and zero it; accepts a zeroed struct.
 *  @return nothing. */
void srv_config_free(srv_config *c);

/** @return a JSON object of the effective config with api_keys replaced by their count ("api_keys": 2) — for
 *  a startup log line — or NULL when out of memory. Caller json_decref's. */
json_t *srv_config_to_json(const srv_config *c);

/** @return the usage text (every flag, its default and its environment variable), a static string. */
const char *srv_config_usage(void);

/** @return the task's name ("translate", "dialogue"), or "unknown" for NULL. */
const char *srv_task_name(srv_task t);

/* ------------------------------------------------------------- helpers */

/** Fill c with the built-in defaults (no models, no API keys, config_path NULL); c's previous contents are
 *  not freed.
 *  @return 0, or -1 when out of memory (c is still safe to srv_config_free). */
int srv_config_init(srv_config *c);

/** Parse a byte size: decimal digits, optionally followed by a binary suffix K, M, G, T (also KiB/KB,
 *  MiB/MB, ..., case-insensitive; an optional space before it) or B. "64MiB" = 67108864.
 *  @return 0 and *out, or -1 (malformed or above 2^64-1). */
int srv_config_parse_size(const char *s, uint64_t *out);

/** Parse a task name (one of nz_task_find's: "translate", "dialogue").
 *  @return 0 and *t, or -1. */
int srv_task_parse(const char *s, srv_task *t);

#ifdef __cplusplus
}
#endif

#endif /* SRV_CONFIG_H */
