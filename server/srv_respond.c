/* srv_respond — deciding a request's response (JSON bodies, errors, cancellations), server-sent
 * events, and handing responses and streams to libmicrohttpd. */
#include "srv_internal.h"

#include "nz_alloc.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

/* Decide the response of r: status and a body (nz_malloc'd via jansson or ours). */
void srv_respond_body(srv_req *r, int status, char *body, size_t len) {
    nz_free(r->resp);
    r->status = status;
    r->resp = body;
    r->resp_len = len;
    r->responded = 1;
}

void srv_respond_json(srv_req *r, int status, json_t *j) {
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!s) {
        static const char oom[] =
            "{\"error\":{\"code\":500,\"type\":\"internal_error\",\"message\":\"out of memory\"}}";
        char *b = nz_malloc(sizeof oom, NZ_MEM_OTHER);
        if (b) memcpy(b, oom, sizeof oom);
        srv_respond_body(r, 500, b, b ? sizeof oom - 1 : 0);
        return;
    }
    srv_respond_body(r, status, s, strlen(s));
}

void srv_respond_error(srv_req *r, const srv_error *e) {
    size_t len = 0;
    char *b = srv_error_body(e, &len);
    srv_respond_body(r, e->status, b, b ? len : 0);
    if (e->status == 429 || e->status == 503) r->retry_after = 1;
}

void srv_respond_fail(srv_req *r, int status, const char *fmt, ...) {
    srv_error e = {status, srv_error_type(status), {0}};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    srv_respond_error(r, &e);
}

/* Count r once in the request metrics (requests, duration, tokens) with the given status. Called just
 * before r's response is queued, so whatever a client reads after its response (/metrics) includes it;
 * retire counts a request that never got that far (the client left first: 499). */
void srv_count_request(srv_req *r, int status) {
    if (r->counted) return;
    r->counted = 1;
    srv_metrics_observe(r->s->metrics, r->route, status, nz_now_s() - r->t0, r->tokens_in, r->tokens_out);
}

/* A JSON string of s[0..n), replacing invalid UTF-8 with U+FFFD. */
json_t *srv_json_text(const char *s, size_t n) {
    json_t *j = json_stringn(s, n);
    if (j) return j;
    char *b = malloc(3 * n + 1);
    if (!b) return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t k = srv_utf8_seq((const unsigned char *)s + i, n - i);
        if (k && s[i]) {
            memcpy(b + o, s + i, k);
            o += k;
            i += k;
        } else {
            memcpy(b + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    j = json_stringn(b, o);
    free(b);
    return j;
}

/* The response of a request stopped by reason (CANCEL_*). */
void srv_respond_cancelled(srv_req *r, int reason) {
    switch (reason) {
    case CANCEL_DEADLINE:
        srv_respond_fail(r, 504, "the request did not finish within %d ms", r->s->cfg->request_timeout_ms);
        srv_metrics_rejected(r->s->metrics, "deadline");
        break;
    case CANCEL_SHUTDOWN:
        srv_respond_fail(r, 503, "the server is shutting down");
        r->close = 1;
        srv_metrics_rejected(r->s->metrics, "shutdown");
        break;
    default: /* nobody reads this: the client is gone */
        srv_respond_fail(r, 499, "client closed the connection");
        r->close = 1;
        srv_metrics_rejected(r->s->metrics, "cancelled");
    }
}

/* Append one event to r's stream buffer. Caller holds r->smu. @return 0, or -1 out of memory. */
static int sse_append(srv_req *r, const char *event, const char *data, size_t len) {
    size_t need = r->slen + len + strlen(event) + 16; /* "event: E\ndata: D\n\n" */
    if (need > r->scap) {
        size_t cap = r->scap ? r->scap : 4096;
        while (cap < need) cap *= 2;
        char *b = r->sbuf ? nz_realloc(r->sbuf, cap) : nz_malloc(cap, NZ_MEM_OTHER);
        if (!b) return -1;
        r->sbuf = b;
        r->scap = cap;
    }
    r->slen += (size_t)sprintf(r->sbuf + r->slen, "event: %s\ndata: ", event);
    memcpy(r->sbuf + r->slen, data, len);
    r->slen += len;
    memcpy(r->sbuf + r->slen, "\n\n", 2);
    r->slen += 2;
    return 0;
}

/* Worker side: add an event and wake the connection if sse_read suspended it for want of data. */
void srv_sse_push(srv_req *r, const char *event, const char *data, size_t len) {
    pthread_mutex_lock(&r->smu);
    if (!r->sorphan) sse_append(r, event, data, len);
    int resume = r->ssuspended;
    r->ssuspended = 0;
    pthread_mutex_unlock(&r->smu);
    if (resume) MHD_resume_connection(r->conn); /* suspended: the connection (and r) cannot end before */
}

/* The job of a streamed request is over: its decided response (status 200: the full JSON response,
 * else the error body) becomes the last event, "done" or "error", and the stream ends after it. The
 * queue / worker lets go of r here: if the connection already ended, r is retired now, else
 * on_completed retires it when the stream has been sent. r must not be touched after. */
void srv_stream_close(srv_req *r) {
    static const char oom[] =
        "{\"error\":{\"code\":500,\"type\":\"internal_error\",\"message\":\"out of memory\"}}";
    const int ok = r->status == 200 && r->resp;
    pthread_mutex_lock(&r->smu);
    if (!r->sorphan &&
        sse_append(r, ok ? "done" : "error", r->resp ? r->resp : oom, r->resp ? r->resp_len : sizeof oom - 1))
        srv_log(SRV_LOG_WARN, "stream_truncated", "path", SRV_KV_STR, r->path, "reason", SRV_KV_STR,
                "out of memory", NULL);
    if (!r->sorphan) srv_count_request(r, r->status); /* an orphan is counted when retired (499) */
    r->sdone = 1;
    r->sjob = 0;
    const int resume = r->ssuspended, orphan = r->sorphan, term_ok = r->sterm_ok;
    r->ssuspended = 0;
    pthread_mutex_unlock(&r->smu);
    if (orphan)
        srv_retire(r, term_ok);
    else if (resume)
        MHD_resume_connection(r->conn);
}

/* libmicrohttpd's content reader of a stream: the pending bytes, the end after the last event, or
 * (nothing ready) suspend the connection until the worker pushes more: no polling, no busy wait. */
static ssize_t sse_read(void *cls, uint64_t pos, char *buf, size_t max) {
    srv_req *r = cls;
    (void)pos;
    ssize_t n;
    pthread_mutex_lock(&r->smu);
    size_t avail = r->slen - r->soff;
    if (avail) {
        n = (ssize_t)(avail < max ? avail : max);
        memcpy(buf, r->sbuf + r->soff, (size_t)n);
        r->soff += (size_t)n;
        if (r->soff == r->slen) r->soff = r->slen = 0;
    } else if (r->sdone) {
        n = MHD_CONTENT_READER_END_OF_STREAM;
    } else {
        r->ssuspended = 1;
        MHD_suspend_connection(r->conn);
        n = 0;
    }
    pthread_mutex_unlock(&r->smu);
    return n;
}

/* A playground file (static bytes; only its own origin's scripts, styles and API calls allowed). */
static struct MHD_Response *asset_response(const srv_ui_asset *a) {
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(a->len, (void *)(uintptr_t)a->data, MHD_RESPMEM_PERSISTENT);
    if (!resp) return NULL;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, a->content_type);
    MHD_add_response_header(resp, "Content-Security-Policy", SRV_UI_CSP);
    MHD_add_response_header(resp, "X-Content-Type-Options", "nosniff");
    MHD_add_response_header(resp, "Referrer-Policy", "no-referrer");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache");
    return resp;
}

enum MHD_Result srv_queue_response(struct MHD_Connection *c, srv_req *r) {
    struct MHD_Response *resp;
    if (r->asset) {
        resp = asset_response(r->asset);
        if (!resp) return MHD_NO;
    } else {
        resp = MHD_create_response_from_buffer_with_free_callback(r->resp_len, r->resp, nz_free);
        if (!resp) return MHD_NO;
        r->resp = NULL; /* the response owns it now */
        int metrics = r->route == SRV_ROUTE_METRICS && r->status == 200;
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                                metrics ? "text/plain; version=0.0.4; charset=utf-8" : "application/json");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    }
    if (r->allow) MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, r->allow);
    if (r->retry_after) {
        char v[16];
        snprintf(v, sizeof v, "%d", r->retry_after);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, v);
    }
    if (r->close) MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
    srv_count_request(r, r->status);
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)r->status, resp);
    MHD_destroy_response(resp);
    return ok;
}

/* The event stream of a queued streamed request (200, text/event-stream, chunked): sse_read feeds it
 * from the worker's events. */
enum MHD_Result srv_queue_stream(struct MHD_Connection *c, srv_req *r) {
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, sse_read, r, NULL);
    if (!resp) return MHD_NO; /* the connection closes; on_completed cancels the job */
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream; charset=utf-8");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no"); /* proxies: pass events on at once */
    enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return ok;
}
