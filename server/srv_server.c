/* srv_server — see srv_server.h: the libmicrohttpd callbacks (routing, auth, reading bodies, answering
 * GET routes, handing inference requests to their handler) and the server's lifecycle. */
#include "srv_internal.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_pool.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* Decisions possible before the body is read: method, route, auth, body size, draining. */
static void first_call(srv_server *s, srv_req *r, struct MHD_Connection *c, const char *method) {
    const srv_config *cfg = s->cfg;
    int get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    int post = !strcmp(method, "POST");
    if (atomic_load(&s->draining)) {
        r->close = 1;
        srv_respond_fail(r, 503, "the server is shutting down");
        return;
    }
    if (r->route == SRV_ROUTE_OTHER || (r->route == SRV_ROUTE_METRICS && !cfg->metrics) ||
        (r->route == SRV_ROUTE_UI && (!cfg->ui || !srv_ui_find(r->path)))) {
        srv_respond_fail(r, 404, "no route %.80s %.80s", method, r->path);
        return;
    }
    if (r->h ? !post : !get) {
        r->allow = r->h ? "POST" : "GET, HEAD";
        srv_respond_fail(r, 405, "%s does not accept %.20s (allowed: %s)", r->path, method, r->allow);
        return;
    }
    /* probes, the scraper and the playground's files need no key; the API routes (inference, models,
     * memory) do */
    int open_route = r->route == SRV_ROUTE_HEALTH || r->route == SRV_ROUTE_READY ||
                     r->route == SRV_ROUTE_METRICS || r->route == SRV_ROUTE_UI;
    if (cfg->n_api_keys && !open_route) {
        size_t klen;
        const char *key =
            srv_request_key(MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization"),
                            MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-API-Key"), &klen);
        if (!key || !srv_key_matches(key, klen, cfg->api_keys, cfg->n_api_keys)) {
            srv_metrics_rejected(s->metrics, "unauthorized");
            srv_respond_fail(
                r, 401, key ? "invalid API key" : "missing API key (Authorization: Bearer KEY or X-API-Key)");
            return;
        }
    }
    if (!r->h) return;
    size_t i = 0;
    while (i < cfg->n_models && cfg->models[i].task != r->h->task) i++;
    if (i == cfg->n_models) {
        srv_respond_fail(r, 404, "no %s model is configured (%s needs a model with task %s)",
                         r->h->task->noun, r->h->path, r->h->task->name);
        return;
    }
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
    if (cl) {
        char *end;
        errno = 0;
        unsigned long long n = strtoull(cl, &end, 10);
        if (!errno && end != cl && n > cfg->max_body_bytes) {
            srv_metrics_rejected(s->metrics, "body_too_large");
            r->close = 1;
            srv_respond_fail(r, 413, "request body of %llu bytes exceeds the limit of %zu", n,
                             cfg->max_body_bytes);
            return;
        }
    }
}

/* Everything is read: answer a GET or validate and queue an inference request. */
static void final_call(srv_server *s, srv_req *r) {
    int ready = atomic_load(&s->ready);
    switch (r->route) {
    case SRV_ROUTE_HEALTH:
        srv_respond_json(r, 200, json_pack("{s:s}", "status", "ok"));
        return;
    case SRV_ROUTE_READY:
        if (ready == 1 && srv_lost_model(s)) {
            const srv_model *m = srv_lost_model(s);
            char msg[sizeof m->why + 160];
            snprintf(msg, sizeof msg, "model '%s' is unavailable: %s", m->cfg->name, m->why);
            srv_respond_json(r, 503,
                             json_pack("{s:s, s:{s:i, s:s, s:s}}", "status", "degraded", "error", "code", 503,
                                       "type", "not_ready", "message", msg));
        } else if (ready == 1) {
            srv_respond_json(r, 200, json_pack("{s:s}", "status", "ready"));
        } else {
            char msg[sizeof s->load_err + 32] = "models are loading";
            if (ready < 0) /* load_err was written before ready became -1 */
                snprintf(msg, sizeof msg, "a model failed to load: %s", s->load_err);
            srv_respond_json(r, 503,
                             json_pack("{s:s, s:{s:i, s:s, s:s}}", "status", ready < 0 ? "failed" : "loading",
                                       "error", "code", 503, "type", "not_ready", "message", msg));
        }
        return;
    case SRV_ROUTE_MODELS:
        srv_respond_json(r, 200, srv_models_json(s));
        return;
    case SRV_ROUTE_MEMORY:
        srv_respond_json(r, 200, srv_memory_json(s));
        return;
    case SRV_ROUTE_METRICS:
        srv_respond_metrics(s, r);
        return;
    case SRV_ROUTE_UI:
        r->asset = srv_ui_find(r->path);
        r->status = 200;
        r->responded = 1;
        return;
    default:
        break;
    }
    if (ready != 1) {
        srv_respond_fail(r, 503, "models are %s; retry when /ready answers 200",
                         ready < 0 ? "not loaded" : "loading");
        return;
    }
    r->h->submit(s, r); /* queued: suspended, or streamed */
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                  const char *version, const char *upload, size_t *upload_size,
                                  void **con_cls) {
    srv_server *s = cls;
    srv_req *r = *con_cls;
    (void)version;
    if (!r) {
        r = nz_calloc(1, sizeof *r, NZ_MEM_OTHER);
        if (!r) return MHD_NO;
        atomic_fetch_add(&s->live, 1);
        r->s = s;
        r->conn = c;
        r->t0 = nz_now_s();
        r->deadline = r->t0 + s->cfg->request_timeout_ms * 1e-3;
        r->route = srv_metrics_route(s->metrics, url);
        r->h = srv_handler_for(r->route);
        r->fd = -1;
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->path, sizeof r->path, "%s", url);
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        if (ci) r->fd = ci->connect_fd;
        *con_cls = r;
        first_call(s, r, c, method);
        if (r->responded) { /* an early answer (401, 404, 405, 413, 503): don't read a body for it */
            const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
            const char *te =
                MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_TRANSFER_ENCODING);
            if (te || (cl && strcmp(cl, "0"))) r->close = 1;
        }
        return r->responded && r->close ? srv_queue_response(c, r) : MHD_YES;
    }
    if (*upload_size) {
        if (!r->responded) {
            size_t n = *upload_size;
            if (r->body_len + n > s->cfg->max_body_bytes) {
                srv_metrics_rejected(s->metrics, "body_too_large");
                r->close = 1;
                srv_respond_fail(r, 413, "request body exceeds the limit of %zu bytes",
                                 s->cfg->max_body_bytes);
                nz_free(r->body);
                r->body = NULL;
                r->body_len = r->body_cap = 0;
                /* the rest is read and dropped (libmicrohttpd cannot answer mid-upload), then 413 */
            } else {
                if (r->body_len + n + 1 > r->body_cap) {
                    size_t cap = r->body_cap ? r->body_cap : 1024;
                    while (cap < r->body_len + n + 1) cap *= 2;
                    char *b = r->body ? nz_realloc(r->body, cap) : nz_malloc(cap, NZ_MEM_OTHER);
                    if (!b) return MHD_NO;
                    r->body = b;
                    r->body_cap = cap;
                }
                memcpy(r->body + r->body_len, upload, n);
                r->body_len += n;
                r->body[r->body_len] = 0;
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    srv_conns_request_read(s->conns, c); /* headers and body are in: no read deadline until it is answered */
    if (r->state == RQ_QUEUED || r->state == RQ_RUNNING) return MHD_YES; /* not ours to answer yet */
    if (!r->responded) {
        final_call(s, r);
        if (r->sse && r->state != RQ_READ) return srv_queue_stream(c, r); /* queued, streamed */
        if (r->state != RQ_READ)
            return MHD_YES; /* queued: a worker may already run it (state RUNNING/DONE) */
    }
    return srv_queue_response(c, r);
}

/* The end of a request: access-log line, request metrics unless counted when its response was queued,
 * free. term_ok: the response was sent in full (else the access log says 499, the client left first). */
void srv_retire(srv_req *r, int term_ok) {
    srv_server *s = r->s;
    double t = nz_now_s();
    /* 499 (nginx's "client closed request"): the client left before the response was sent; a stream
     * records the status of its outcome (200 "done", or the code of its "error" event) */
    int status = r->responded && term_ok ? r->status : 499;
    srv_log_level lvl =
        r->route == SRV_ROUTE_HEALTH || r->route == SRV_ROUTE_READY || r->route == SRV_ROUTE_METRICS
            ? SRV_LOG_DEBUG
            : SRV_LOG_INFO;
    if (srv_log_enabled(lvl))
        srv_log(lvl, "request", "method", SRV_KV_STR, r->method, "path", SRV_KV_STR, r->path, "status",
                SRV_KV_INT, (long long)status, "latency_ms", SRV_KV_DBL, (t - r->t0) * 1e3, "queue_ms",
                SRV_KV_DBL, r->t_start > 0 ? (r->t_start - r->t0) * 1e3 : 0.0, "model", SRV_KV_STR,
                r->model ? r->model->cfg->name : NULL, "texts", SRV_KV_UINT,
                (unsigned long long)(r->h && r->task ? r->h->texts(r) : 0), "batch_texts", SRV_KV_UINT,
                (unsigned long long)r->batch_texts, "stream", SRV_KV_INT, (long long)r->sse, "tokens_in",
                SRV_KV_UINT, (unsigned long long)r->tokens_in, "tokens_out", SRV_KV_UINT,
                (unsigned long long)r->tokens_out, NULL);
    /* after the log line: whoever sees the count (a 499) finds the line */
    srv_count_request(r, status); /* no-op when the response was counted as it was queued */
    for (size_t i = 0; i < r->n_ids_alloc; i++) nz_free(r->ids[i]);
    nz_free(r->ids);
    nz_free(r->n_ids);
    if (r->h) r->h->free_req(r);
    nz_free(r->body);
    nz_free(r->resp);
    nz_free(r->sbuf);
    if (r->smu_init) pthread_mutex_destroy(&r->smu);
    nz_free(r);
    atomic_fetch_sub(&s->live, 1);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe) {
    srv_server *s = cls;
    srv_req *r = *con_cls;
    srv_conns_request_done(s->conns, c); /* the next request's read deadline starts now */
    if (!r) return;
    *con_cls = NULL;
    const int ok = toe == MHD_REQUEST_TERMINATED_COMPLETED_OK;
    if (r->sse) {
        /* a stream whose connection ends while the queue or a worker still holds the request (the client
         * left, a write failed): cancel the job; its end (srv_stream_close) retires the request */
        pthread_mutex_lock(&r->smu);
        const int job = r->sjob;
        if (job) {
            r->sorphan = 1;
            r->sterm_ok = ok;
            atomic_store(&r->fd, -1); /* the socket is closed after this callback: never poll a reused fd */
            int none = CANCEL_NONE;
            atomic_compare_exchange_strong(&r->cancel, &none, CANCEL_CLIENT);
        }
        pthread_mutex_unlock(&r->smu);
        if (job) {
            srv_log(SRV_LOG_DEBUG, "stream_orphaned", "path", SRV_KV_STR, r->path, "completed", SRV_KV_INT,
                    (long long)ok, NULL);
            return;
        }
    }
    srv_retire(r, ok);
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = 0;
    srv_log(SRV_LOG_WARN, "http", "message", SRV_KV_STR, msg, NULL);
}

static int resolve(const char *host, int port, struct sockaddr_storage *ss, socklen_t *len, char *err,
                   size_t errlen) {
    struct addrinfo hints = {0}, *ai = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    char ps[8];
    snprintf(ps, sizeof ps, "%d", port);
    int rc = getaddrinfo(host, ps, &hints, &ai);
    if (rc || !ai) {
        snprintf(err, errlen, "host '%s': cannot resolve: %s", host, gai_strerror(rc));
        return -1;
    }
    memcpy(ss, ai->ai_addr, ai->ai_addrlen);
    *len = ai->ai_addrlen;
    freeaddrinfo(ai);
    return 0;
}

int srv_server_start(const srv_config *cfg, srv_server **out, char *err, size_t errlen) {
    *out = NULL;
    srv_server *s = nz_calloc(1, sizeof *s, NZ_MEM_OTHER);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    s->cfg = cfg;
    s->t_start = nz_now_s();
    const char *dd = getenv("NZSERVE_DEBUG_STEP_DELAY_MS");
    s->debug_step_delay_ms = dd && atoi(dd) > 0 ? atoi(dd) : 0;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->n_models = cfg->n_models;
    s->models = nz_calloc(cfg->n_models ? cfg->n_models : 1, sizeof *s->models, NZ_MEM_OTHER);
    const char *paths[SRV_ROUTE_MAX_TASKS];
    for (size_t i = 0; i < SRV_N_HANDLERS && i < SRV_ROUTE_MAX_TASKS; i++) paths[i] = SRV_HANDLERS[i]->path;
    s->metrics = srv_metrics_create(paths, SRV_N_HANDLERS);
    s->cache = nz_cache_create(cfg->tile_cache_bytes);
    s->pool = nz_pool_create(cfg->worker_threads);
    s->nworkers = cfg->max_concurrent_requests;
    s->workers = nz_calloc((size_t)s->nworkers, sizeof *s->workers, NZ_MEM_OTHER);
    s->conns = srv_conns_create(cfg->read_timeout_ms * 1e-3);
    s->budget = srv_budget_create(0);
    if (!s->models || !s->metrics || !s->cache || !s->pool || !s->workers || !s->conns || !s->budget) {
        snprintf(err, errlen, "out of memory (or cannot start the compute threads)");
        goto fail;
    }
    for (size_t i = 0; i < s->n_models; i++) s->models[i].cfg = &cfg->models[i];
    for (int i = 0; i < s->nworkers; i++) {
        s->workers[i].s = s;
        if (!(s->workers[i].mc = nz_matmul_ctx_create(s->pool, s->cache))) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
    }
    struct sockaddr_storage ss;
    socklen_t sl;
    if (resolve(cfg->host, cfg->port, &ss, &sl, err, errlen)) goto fail;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_EPOLL |
                     MHD_USE_ERROR_LOG | (ss.ss_family == AF_INET6 ? MHD_USE_IPv6 : 0);
    s->mhd = MHD_start_daemon(
        flags, (uint16_t)cfg->port, NULL, NULL, on_request, s, MHD_OPTION_EXTERNAL_LOGGER, mhd_log,
        s, /* first, so every message goes through srv_log */
        MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss, MHD_OPTION_THREAD_POOL_SIZE,
        (unsigned)cfg->http_threads, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)cfg->connection_timeout_s,
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_NOTIFY_CONNECTION, srv_conns_notify,
        s->conns, MHD_OPTION_CONNECTION_LIMIT, (unsigned)cfg->max_connections,
        MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)cfg->max_connections_per_client,
        MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024u, MHD_OPTION_END);
    if (!s->mhd) {
        snprintf(err, errlen, "cannot listen on %s:%d (address in use, or not permitted)", cfg->host,
                 cfg->port);
        goto fail;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : cfg->port;
    for (int i = 0; i < s->nworkers; i++) {
        if (pthread_create(&s->workers[i].thread, NULL, srv_worker_main, &s->workers[i])) {
            snprintf(err, errlen, "cannot start worker threads");
            goto fail;
        }
        s->workers[i].started = 1;
    }
    if (pthread_create(&s->reaper, NULL, srv_reaper_main, s)) {
        snprintf(err, errlen, "cannot start the reaper thread");
        goto fail;
    }
    s->reaper_started = 1;
    if (pthread_create(&s->loader, NULL, srv_loader_main, s)) {
        snprintf(err, errlen, "cannot start the loader thread");
        goto fail;
    }
    s->loader_started = 1;
    *out = s;
    return 0;
fail:
    srv_server_free(s);
    return -1;
}

int srv_server_port(const srv_server *s) { return s->port; }

int srv_server_load_state(srv_server *s, char *err, size_t errlen) {
    int st = atomic_load(&s->ready);
    if (st < 0 && err) snprintf(err, errlen, "%s", s->load_err);
    return st;
}

void srv_server_shutdown(srv_server *s) {
    if (!s || s->shut) return;
    s->shut = 1;
    atomic_store(&s->draining, 1);
    double t0 = nz_now_s(), grace = s->cfg->shutdown_grace_ms * 1e-3;
    if (s->mhd) {
        MHD_socket ls = MHD_quiesce_daemon(s->mhd);
        if (ls != MHD_INVALID_SOCKET) close(ls);
    }
    /* every request that has begun (reading its body, queued, running, writing) counts */
    int busy = atomic_load(&s->live);
    if (s->mhd)
        srv_log(SRV_LOG_INFO, "draining", "in_flight", SRV_KV_INT, (long long)busy, "grace_ms", SRV_KV_INT,
                (long long)s->cfg->shutdown_grace_ms, NULL);
    while (busy && nz_now_s() - t0 < grace) {
        srv_sleep_ms(10);
        busy = atomic_load(&s->live);
    }
    /* grace over: cancel what is left */
    pthread_mutex_lock(&s->mu);
    int cancelled = s->queued + s->nrunning;
    while (s->qhead) {
        srv_req *r = s->qhead;
        srv_list_remove(&s->qhead, &s->qtail, r);
        s->queued--;
        srv_metrics_queue_add(s->metrics, -1);
        srv_respond_cancelled(r, CANCEL_SHUTDOWN);
        srv_finish(r);
    }
    for (srv_req *r = s->running; r; r = r->next) atomic_store(&r->cancel, CANCEL_SHUTDOWN);
    for (int i = 0; i < s->nworkers; i++) nz_matmul_ctx_cancel(s->workers[i].mc, 1); /* stop mid-pass */
    s->stop_workers = 1;
    s->stop_reaper = 1;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    for (int i = 0; i < s->nworkers; i++)
        if (s->workers[i].started) pthread_join(s->workers[i].thread, NULL), s->workers[i].started = 0;
    if (s->reaper_started) pthread_join(s->reaper, NULL), s->reaper_started = 0;
    if (s->loader_started) pthread_join(s->loader, NULL), s->loader_started = 0;
    /* let the resumed connections write their responses: libmicrohttpd refuses to stop (it aborts) while a
     * connection is still suspended, and a resumed one waits for its event loop; under a heavy load that
     * takes a while, so up to 5 s (nothing waits here once every request is retired) */
    for (int i = 0; i < 500 && atomic_load(&s->live) > 0; i++) srv_sleep_ms(10);
    if (!s->mhd) return;
    MHD_stop_daemon(s->mhd);
    s->mhd = NULL;
    srv_log(SRV_LOG_INFO, "stopped", "cancelled", SRV_KV_INT, (long long)cancelled, "drain_ms", SRV_KV_DBL,
            (nz_now_s() - t0) * 1e3, NULL);
}

void srv_server_free(srv_server *s) {
    if (!s) return;
    srv_server_shutdown(s);
    for (int i = 0; s->workers && i < s->nworkers; i++) nz_matmul_ctx_free(s->workers[i].mc);
    nz_free(s->workers);
    for (size_t i = 0; s->models && i < s->n_models; i++)
        nz_task_close(s->models[i].cfg->task, s->models[i].impl, s->cache);
    nz_free(s->models);
    nz_pool_free(s->pool);
    nz_cache_free(s->cache);
    srv_metrics_free(s->metrics);
    srv_conns_free(s->conns);
    srv_budget_free(s->budget);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    nz_free(s);
}
