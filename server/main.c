/*
 * nzserve — HTTP inference server over NeuZip-compressed models.
 *
 *   nzserve [--config FILE] [--<setting> VALUE ...]
 *   nzserve --health-check [--config FILE] [--<setting> VALUE ...]
 *
 * Settings come from the built-in defaults, the config file (--config,
 * $NZSERVE_CONFIG, else NZSERVE_DEFAULT_CONFIG when it exists), NZSERVE_*
 * environment variables and flags, in that order (see server/srv_config.h
 * and server/README.md). Exit status: 0 after a clean shutdown (SIGTERM or
 * SIGINT), 1 when a model cannot be loaded or the server cannot start, 2 for
 * a bad configuration.
 *
 * --health-check (anywhere among the arguments) probes a running server
 * instead of starting one: GET /health on the host and port the same
 * settings give (the loopback address for a wildcard host), exit 0 on a 200
 * and 1 otherwise (also for a bad configuration: a container HEALTHCHECK
 * knows only 0 and 1), e.g. HEALTHCHECK CMD ["/usr/local/bin/nzserve", "--health-check"].
 */
#include "nz_alloc.h"
#include "srv_config.h"
#include "srv_log.h"
#include "srv_probe.h"
#include "srv_server.h"

#include <jansson.h>
#include <malloc.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef NZSERVE_DEFAULT_CONFIG
#define NZSERVE_DEFAULT_CONFIG "config/nzserve.json"
#endif

#define HEALTH_CHECK_TIMEOUT_MS 2000

extern char **environ;

/* `nzserve --health-check`: GET /health from the server cfg describes.
 * @return the exit status: 0 on a 200, else 1 (with a message on stderr). */
static int health_check(const srv_config *cfg) {
    if (cfg->port == 0) {
        fprintf(stderr, "nzserve: health check: port 0 (any free port) is configured; give the server's "
                        "port (--port, NZSERVE_PORT or the config file)\n");
        return 1;
    }
    const char *host = srv_probe_target(cfg->host);
    int v6 = strchr(host, ':') && host[0] != '[';
    char url[400], err[512];
    snprintf(url, sizeof url, "http://%s%s%s:%d/health", v6 ? "[" : "", host, v6 ? "]" : "", cfg->port);
    int status = srv_probe_get(host, cfg->port, "/health", HEALTH_CHECK_TIMEOUT_MS, err, sizeof err);
    if (status == 200) {
        printf("%s: 200\n", url);
        return 0;
    }
    if (status < 0)
        fprintf(stderr, "nzserve: health check: %s: %s\n", url, err);
    else
        fprintf(stderr, "nzserve: health check: %s: status %d, not 200\n", url, status);
    return 1;
}

/* The "starting" log line: where the settings came from and all of them, as JSON. */
static void log_config(const srv_config *cfg) {
    json_t *cj = srv_config_to_json(cfg);
    char *cs = cj ? json_dumps(cj, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    srv_log(SRV_LOG_INFO, "starting", "config_file", SRV_KV_STR,
            cfg->config_path ? cfg->config_path : "(defaults)", "config", SRV_KV_STR, cs, NULL);
    nz_free(cs); /* jansson allocates through nz_alloc (nz_alloc_hook_json) */
    json_decref(cj);
}

/* Block SIGTERM and SIGINT (set: them) for this thread and every thread it starts, and ignore SIGPIPE. */
static void block_signals(sigset_t *set) {
    sigemptyset(set);
    sigaddset(set, SIGTERM);
    sigaddset(set, SIGINT);
    pthread_sigmask(SIG_BLOCK, set, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* Serve until a signal of set arrives, checking s's model loading every 100 ms.
 * @return the exit status: 0 after SIGTERM or SIGINT, 1 when loading a model failed (logged, on stderr). */
static int serve_until_signal(srv_server *s, const sigset_t *set) {
    char err[1024] = {0};
    for (;;) {
        struct timespec tick = {0, 100 * 1000000L};
        int sig = sigtimedwait(set, NULL, &tick);
        if (sig == SIGTERM || sig == SIGINT) {
            srv_log(SRV_LOG_INFO, "signal", "signal", SRV_KV_STR, sig == SIGTERM ? "SIGTERM" : "SIGINT",
                    NULL);
            return 0;
        }
        if (srv_server_load_state(s, err, sizeof err) < 0) {
            srv_log(SRV_LOG_ERROR, "load_failed", "error", SRV_KV_STR, err, NULL);
            fprintf(stderr, "nzserve: %s\n", err);
            return 1;
        }
    }
}

int main(int argc, char **argv) {
    /* one malloc arena for every thread: glibc's per-thread arenas keep a large job's freed memory in their
       top chunks, which malloc_trim does not return; with one arena nz_mem_trim after each large job
       brings the RSS back to its warm level (measured: 93 -> 57 MiB after 64-text NAT and AT-beam requests
       on the demo model, warm 36-41 MiB) */
    mallopt(M_ARENA_MAX, 1);
    srv_config cfg;
    memset(&cfg, 0, sizeof cfg);
    char err[1024] = {0};

    int rc = srv_config_load(&cfg, NZSERVE_DEFAULT_CONFIG, environ, argc, argv, err, sizeof err);
    if (rc == SRV_CFG_HELP) {
        fputs(srv_config_usage(), stdout);
        srv_config_free(&cfg);
        return 0;
    }
    if (cfg.health_check) {
        int status = 1;
        if (rc != SRV_CFG_OK)
            fprintf(stderr, "nzserve: health check: %s\n", err);
        else
            status = health_check(&cfg);
        srv_config_free(&cfg);
        return status;
    }
    if (rc != SRV_CFG_OK) {
        fprintf(stderr, "nzserve: %s\n", err);
        srv_config_free(&cfg);
        return 2;
    }
    srv_log_setup(cfg.log_level, cfg.log_format, stderr);
    log_config(&cfg);

    if (srv_server_check_models(&cfg, err, sizeof err)) {
        srv_log(SRV_LOG_ERROR, "bad_model", "error", SRV_KV_STR, err, NULL);
        fprintf(stderr, "nzserve: %s\n", err);
        srv_config_free(&cfg);
        return 1;
    }

    /* signals are taken synchronously by this thread; every other thread inherits the mask */
    sigset_t set;
    block_signals(&set);
    srv_server *s = NULL;
    if (srv_server_start(&cfg, &s, err, sizeof err)) {
        srv_log(SRV_LOG_ERROR, "start_failed", "error", SRV_KV_STR, err, NULL);
        fprintf(stderr, "nzserve: %s\n", err);
        srv_config_free(&cfg);
        return 1;
    }
    srv_log(SRV_LOG_INFO, "listening", "host", SRV_KV_STR, cfg.host, "port", SRV_KV_INT,
            (long long)srv_server_port(s), NULL);

    int status = serve_until_signal(s, &set);
    srv_server_free(s);
    srv_config_free(&cfg);
    return status;
}
