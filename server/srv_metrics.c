/*
 * srv_metrics.c — see srv_metrics.h. Counters and histograms sit behind one
 * mutex (a few updates per request; render copies them under the lock, so a
 * scrape sees a consistent snapshot); the two gauges the admission path
 * reads are lock-free atomics.
 */
#include "srv_metrics.h"
#include "srv_text.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define N_BUCKETS    14              /* finite upper bounds; one more slot for +Inf */
#define N_STATUS     (600 - 100 + 1) /* 100..599, then one slot for anything else */
#define STATUS_OTHER (N_STATUS - 1)

static const double BUCKETS[N_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                          0.25,  0.5,    1,     2.5,  5,     10,   30};

static const char *const FIXED_LABELS[SRV_ROUTE_TASK] = {"/health",  "/ready", "/v1/models", "/v1/memory",
                                                         "/metrics", "/ui",    "other"};

static const char *const REASONS[] = {"queue_full",   "body_too_large", "unauthorized", "deadline",
                                      "cancelled",    "shutdown",       "not_ready",    "bad_request",
                                      "read_timeout", "memory",         "other"};
#define N_REASONS    (sizeof REASONS / sizeof REASONS[0])
#define REASON_OTHER (N_REASONS - 1)

typedef struct hist {
    uint64_t counts[N_BUCKETS + 1]; /* per bucket, not cumulative; last = above 30 s */
    uint64_t count;
    double sum;
} hist;

typedef struct mdata {
    uint64_t requests[SRV_ROUTE_COUNT][N_STATUS];
    hist duration[SRV_ROUTE_COUNT];
    uint64_t tokens_in[SRV_ROUTE_COUNT], tokens_out[SRV_ROUTE_COUNT];
    hist queue_wait;
    uint64_t rejected[N_REASONS];
} mdata;

struct srv_metrics {
    const char *labels[SRV_ROUTE_COUNT]; /* [nroutes] each route's label */
    int nroutes;
    pthread_mutex_t mu; /* guards d */
    atomic_int queue_depth, inflight;
    mdata d;
};

int srv_metrics_routes(const srv_metrics *m) { return m->nroutes; }

const char *srv_metrics_route_label(const srv_metrics *m, srv_route r) {
    return r >= 0 && r < m->nroutes ? m->labels[r] : m->labels[SRV_ROUTE_OTHER];
}

srv_route srv_metrics_route(const srv_metrics *m, const char *path) {
    if (!path) return SRV_ROUTE_OTHER;
    size_t n = strcspn(path, "?");
    if ((n == 1 && path[0] == '/') || !strncmp(path, "/ui/", 4)) return SRV_ROUTE_UI;
    for (int r = 0; r < m->nroutes; r++)
        if (r != SRV_ROUTE_OTHER && strlen(m->labels[r]) == n && !memcmp(path, m->labels[r], n)) return r;
    return SRV_ROUTE_OTHER;
}

srv_metrics *srv_metrics_create(const char *const *task_paths, size_t n_tasks) {
    if (n_tasks > SRV_ROUTE_MAX_TASKS) return NULL;
    srv_metrics *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    for (int r = 0; r < SRV_ROUTE_TASK; r++) m->labels[r] = FIXED_LABELS[r];
    for (size_t i = 0; i < n_tasks; i++) m->labels[SRV_ROUTE_TASK + i] = task_paths[i];
    m->nroutes = SRV_ROUTE_TASK + (int)n_tasks;
    if (pthread_mutex_init(&m->mu, NULL)) {
        free(m);
        return NULL;
    }
    atomic_init(&m->queue_depth, 0);
    atomic_init(&m->inflight, 0);
    return m;
}

void srv_metrics_free(srv_metrics *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m);
}

static double clean_seconds(double s) { return isfinite(s) && s > 0 ? s : 0; }

static void hist_add(hist *h, double v) {
    size_t i = 0;
    while (i < N_BUCKETS && v > BUCKETS[i]) i++;
    h->counts[i]++;
    h->count++;
    h->sum += v;
}

void srv_metrics_observe(srv_metrics *m, srv_route r, int status, double seconds, uint64_t tokens_in,
                         uint64_t tokens_out) {
    if (!m) return;
    unsigned ri = r >= 0 && r < m->nroutes ? (unsigned)r : SRV_ROUTE_OTHER;
    size_t si = status >= 100 && status <= 599 ? (size_t)(status - 100) : STATUS_OTHER;
    double s = clean_seconds(seconds);
    pthread_mutex_lock(&m->mu);
    m->d.requests[ri][si]++;
    hist_add(&m->d.duration[ri], s);
    m->d.tokens_in[ri] += tokens_in;
    m->d.tokens_out[ri] += tokens_out;
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_inflight_add(srv_metrics *m, int delta) {
    if (m) atomic_fetch_add(&m->inflight, delta);
}

void srv_metrics_queue_add(srv_metrics *m, int delta) {
    if (m) atomic_fetch_add(&m->queue_depth, delta);
}

void srv_metrics_queue_wait(srv_metrics *m, double seconds) {
    if (!m) return;
    double s = clean_seconds(seconds);
    pthread_mutex_lock(&m->mu);
    hist_add(&m->d.queue_wait, s);
    pthread_mutex_unlock(&m->mu);
}

void srv_metrics_rejected(srv_metrics *m, const char *reason) {
    if (!m) return;
    size_t i = REASON_OTHER;
    for (size_t k = 0; reason && k < REASON_OTHER; k++) {
        if (!strcmp(reason, REASONS[k])) {
            i = k;
            break;
        }
    }
    pthread_mutex_lock(&m->mu);
    m->d.rejected[i]++;
    pthread_mutex_unlock(&m->mu);
}

int srv_metrics_queue_depth(const srv_metrics *m) { return m ? atomic_load(&m->queue_depth) : 0; }

int srv_metrics_inflight(const srv_metrics *m) { return m ? atomic_load(&m->inflight) : 0; }

/* ----------------------------------------------------------------- render */

typedef struct obuf {
    char *p;
    size_t len, cap;
    int oom;
} obuf;

static int ob_reserve(obuf *b, size_t extra) {
    if (b->oom) return -1;
    if (b->len + extra < b->cap) return 0; /* keep room for the NUL */
    size_t cap = b->cap ? b->cap * 2 : 4096;
    while (cap < b->len + extra + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        b->oom = 1;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static void ob_put(obuf *b, const char *s, size_t n) {
    if (ob_reserve(b, n)) return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void ob_puts(obuf *b, const char *s) { ob_put(b, s, strlen(s)); }

static void ob_printf(obuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void ob_printf(obuf *b, const char *fmt, ...) {
    char tmp[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n < sizeof tmp) {
        ob_put(b, tmp, (size_t)n);
        return;
    }
    if (ob_reserve(b, (size_t)n)) return;
    va_start(ap, fmt);
    vsnprintf(b->p + b->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    b->len += (size_t)n;
}

/* A label value: \\, \" and \n escaped; invalid UTF-8 becomes U+FFFD (the
 * format requires UTF-8). */
static void ob_label_value(obuf *b, const char *str) {
    const unsigned char *s = (const unsigned char *)(str ? str : "");
    size_t n = strlen((const char *)s);
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        size_t k = c < 0x80 ? 1 : srv_utf8_seq(s + i, n - i);
        if (c == '\\')
            ob_put(b, "\\\\", 2);
        else if (c == '"')
            ob_put(b, "\\\"", 2);
        else if (c == '\n')
            ob_put(b, "\\n", 2);
        else if (!k)
            ob_put(b, "\xef\xbf\xbd", 3);
        else
            ob_put(b, (const char *)s + i, k);
        i += k ? k : 1;
    }
}

/* A sample value or le bound the way Prometheus clients write it: the
 * shortest "%g" that reads back exactly; +Inf, -Inf, NaN. */
static void fmt_value(char *buf, size_t n, double v) {
    if (isnan(v)) {
        snprintf(buf, n, "NaN");
        return;
    }
    if (isinf(v)) {
        snprintf(buf, n, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) return;
    }
}

static void family(obuf *b, const char *name, const char *type, const char *help) {
    ob_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* name{lname="lval"} (no braces when lname is NULL), no value */
static void sample_name(obuf *b, const char *name, const char *suffix, const char *lname, const char *lval) {
    ob_puts(b, name);
    ob_puts(b, suffix);
    if (!lname) return;
    ob_printf(b, "{%s=\"", lname);
    ob_label_value(b, lval);
    ob_puts(b, "\"}");
}

static void sample_u64(obuf *b, const char *name, const char *lname, const char *lval, uint64_t v) {
    sample_name(b, name, "", lname, lval);
    ob_printf(b, " %llu\n", (unsigned long long)v);
}

static void sample_dbl(obuf *b, const char *name, const char *lname, const char *lval, double v) {
    char num[64];
    fmt_value(num, sizeof num, v);
    sample_name(b, name, "", lname, lval);
    ob_printf(b, " %s\n", num);
}

static void gauge_u64(obuf *b, const char *name, const char *type, const char *help, uint64_t v) {
    family(b, name, type, help);
    sample_u64(b, name, NULL, NULL, v);
}

/* The _bucket, _sum and _count lines of one histogram (lname NULL: no label). */
static void hist_lines(obuf *b, const char *name, const char *lname, const char *lval, const hist *h) {
    char num[64];
    uint64_t cum = 0;
    for (size_t i = 0; i <= N_BUCKETS; i++) {
        cum += h->counts[i];
        fmt_value(num, sizeof num, i < N_BUCKETS ? BUCKETS[i] : INFINITY);
        ob_printf(b, "%s_bucket{", name);
        if (lname) {
            ob_printf(b, "%s=\"", lname);
            ob_label_value(b, lval);
            ob_puts(b, "\",");
        }
        ob_printf(b, "le=\"%s\"} %llu\n", num, (unsigned long long)cum);
    }
    fmt_value(num, sizeof num, h->sum);
    sample_name(b, name, "_sum", lname, lval);
    ob_printf(b, " %s\n", num);
    sample_name(b, name, "_count", lname, lval);
    ob_printf(b, " %llu\n", (unsigned long long)h->count);
}

/* Requests answered, by route and status; their durations and tokens, by route. */
static void render_requests(obuf *b, const srv_metrics *m, const mdata *d) {
    family(b, "nzserve_requests_total", "counter",
           "Answered HTTP requests by route and status code (counted as the response is queued).");
    for (int r = 0; r < m->nroutes; r++) {
        for (size_t s = 0; s < N_STATUS; s++) {
            if (!d->requests[r][s]) continue;
            ob_puts(b, "nzserve_requests_total{route=\"");
            ob_label_value(b, m->labels[r]);
            if (s == STATUS_OTHER)
                ob_printf(b, "\",status=\"other\"} %llu\n", (unsigned long long)d->requests[r][s]);
            else
                ob_printf(b, "\",status=\"%d\"} %llu\n", (int)s + 100, (unsigned long long)d->requests[r][s]);
        }
    }

    family(b, "nzserve_request_duration_seconds", "histogram",
           "Seconds from request arrival to response queued, by route.");
    for (int r = 0; r < m->nroutes; r++)
        if (d->duration[r].count)
            hist_lines(b, "nzserve_request_duration_seconds", "route", m->labels[r], &d->duration[r]);

    family(b, "nzserve_input_tokens_total", "counter", "Input tokens of answered requests, by route.");
    for (int r = 0; r < m->nroutes; r++)
        if (d->duration[r].count)
            sample_u64(b, "nzserve_input_tokens_total", "route", m->labels[r], d->tokens_in[r]);
    family(b, "nzserve_output_tokens_total", "counter", "Output tokens of answered requests, by route.");
    for (int r = 0; r < m->nroutes; r++)
        if (d->duration[r].count)
            sample_u64(b, "nzserve_output_tokens_total", "route", m->labels[r], d->tokens_out[r]);
}

/* The queue: waits, depth, requests in flight, rejections by reason. */
static void render_queue(obuf *b, const mdata *d, int queue, int inflight) {
    family(b, "nzserve_queue_wait_seconds", "histogram",
           "Seconds requests spent queued before a worker took them.");
    hist_lines(b, "nzserve_queue_wait_seconds", NULL, NULL, &d->queue_wait);

    family(b, "nzserve_queue_depth", "gauge", "Requests waiting for a worker.");
    ob_printf(b, "nzserve_queue_depth %d\n", queue);
    family(b, "nzserve_requests_in_flight", "gauge", "Requests being executed by workers.");
    ob_printf(b, "nzserve_requests_in_flight %d\n", inflight);

    family(b, "nzserve_rejected_total", "counter",
           "Requests rejected before or during execution, by reason.");
    for (size_t i = 0; i < N_REASONS; i++)
        sample_u64(b, "nzserve_rejected_total", "reason", REASONS[i], d->rejected[i]);
}

/* Memory: each model's weights, the caches and buffers, the process, the request memory budget. */
static void render_memory(obuf *b, const srv_gauges *g) {
    family(b, "nzserve_weights_compressed_bytes", "gauge", "Bytes of a model's compressed weights.");
    for (size_t i = 0; g->models && i < g->n_models; i++)
        sample_u64(b, "nzserve_weights_compressed_bytes", "model", g->models[i].name,
                   g->models[i].compressed_bytes);
    family(b, "nzserve_weights_decoded_equivalent_bytes", "gauge",
           "Bytes a model's weights would take fully decoded.");
    for (size_t i = 0; g->models && i < g->n_models; i++)
        sample_u64(b, "nzserve_weights_decoded_equivalent_bytes", "model", g->models[i].name,
                   g->models[i].decoded_equivalent_bytes);

    gauge_u64(b, "nzserve_tile_cache_bytes", "gauge", "Bytes of decoded tiles held by the tile cache.",
              g->tile_cache_bytes);
    gauge_u64(b, "nzserve_tile_cache_limit_bytes", "gauge", "Byte budget of the tile cache.",
              g->tile_cache_limit_bytes);
    gauge_u64(b, "nzserve_kv_cache_bytes", "gauge", "Bytes of attention key/value caches.",
              g->kv_cache_bytes);
    gauge_u64(b, "nzserve_scratch_bytes", "gauge", "Bytes of worker scratch buffers.", g->scratch_bytes);
    gauge_u64(b, "nzserve_activations_bytes", "gauge", "Bytes of activation buffers.", g->activations_bytes);
    gauge_u64(b, "nzserve_resident_memory_bytes", "gauge", "Resident set size of the process in bytes.",
              g->resident_bytes);
    gauge_u64(b, "nzserve_resident_memory_peak_bytes", "gauge",
              "Peak resident set size of the process in bytes.", g->resident_peak_bytes);
    gauge_u64(b, "nzserve_mapped_resident_bytes", "gauge", "Resident bytes of memory-mapped model files.",
              g->mapped_resident_bytes);
    gauge_u64(b, "nzserve_allocator_free_bytes", "gauge",
              "Resident bytes malloc holds free (not yet returned to the OS; trimmed after large jobs).",
              g->allocator_free_bytes);
    gauge_u64(b, "nzserve_code_resident_bytes", "gauge",
              "Resident bytes of the executable and shared libraries (file-backed, not the models).",
              g->code_resident_bytes);
    gauge_u64(b, "nzserve_memory_budget_bytes", "gauge", "Memory the process may use (memory_budget_bytes).",
              g->memory_budget_bytes);
    gauge_u64(b, "nzserve_request_memory_pool_bytes", "gauge",
              "Bytes requests may reserve for their estimated peak (the budget less the loaded process and "
              "the tile cache).",
              g->request_memory_pool_bytes);
    gauge_u64(b, "nzserve_request_memory_reserved_bytes", "gauge",
              "Bytes reserved now by running requests (estimated peaks).", g->request_memory_reserved_bytes);
    gauge_u64(
        b, "nzserve_request_memory_overrun_bytes", "gauge",
        "Most bytes of activations and KV caches seen in use beyond the requests' reservations (0 while "
        "the estimates hold).",
        g->request_memory_overrun_bytes);
    gauge_u64(b, "nzserve_request_memory_waits_total", "counter",
              "Requests (or batch chunks) that waited for memory before running.",
              g->request_memory_waits_total);
}

/* Tile decoding and the tile cache's traffic; then whether the server is ready, and its uptime. */
static void render_tiles_and_state(obuf *b, const srv_gauges *g) {
    gauge_u64(b, "nzserve_tiles_decoded_total", "counter", "Weight tiles decoded.", g->tiles_decoded_total);
    gauge_u64(b, "nzserve_tile_cache_hits_total", "counter", "Tile cache lookups served from the cache.",
              g->tile_cache_hits_total);
    gauge_u64(b, "nzserve_tile_cache_misses_total", "counter", "Tile cache lookups that decoded.",
              g->tile_cache_misses_total);
    gauge_u64(b, "nzserve_tile_cache_evictions_total", "counter", "Tiles evicted from the tile cache.",
              g->tile_cache_evictions_total);
    family(b, "nzserve_tile_decode_seconds_total", "counter", "Seconds spent decoding weight tiles.");
    sample_dbl(b, "nzserve_tile_decode_seconds_total", NULL, NULL, g->tile_decode_seconds_total);

    gauge_u64(b, "nzserve_ready", "gauge", "1 when the server is ready to take requests, else 0.",
              g->ready != 0);
    family(b, "nzserve_uptime_seconds", "gauge", "Seconds since the server started.");
    sample_dbl(b, "nzserve_uptime_seconds", NULL, NULL, g->uptime_seconds);
}

int srv_metrics_render(const srv_metrics *m, const srv_gauges *g, char **out, size_t *len) {
    static const srv_gauges zero;
    if (out) *out = NULL;
    if (len) *len = 0;
    if (!m || !out) return -1;
    if (!g) g = &zero;

    mdata *d = malloc(sizeof *d);
    if (!d) return -1;
    srv_metrics *mm = (srv_metrics *)m; /* the lock, not the data, changes */
    pthread_mutex_lock(&mm->mu);
    memcpy(d, &m->d, sizeof *d);
    pthread_mutex_unlock(&mm->mu);
    int queue = atomic_load(&m->queue_depth), inflight = atomic_load(&m->inflight);

    obuf b = {0};
    ob_reserve(&b, 16384);
    render_requests(&b, m, d);
    render_queue(&b, d, queue, inflight);
    render_memory(&b, g);
    render_tiles_and_state(&b, g);

    free(d);
    if (b.oom) {
        free(b.p);
        return -1;
    }
    *out = b.p;
    if (len) *len = b.len;
    return 0;
}
