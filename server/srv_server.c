/* srv_server — see srv_server.h. */
#include "srv_server.h"
#include "srv_text.h"
#include "srv_ui.h"

#include "srv_api.h"
#include "srv_conn.h"
#include "srv_log.h"
#include "srv_metrics.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_codec.h"
#include "nz_container.h"
#include "nz_dialogue.h"
#include "nz_pool.h"
#include "nz_translator.h"
#include "nz_weight.h"

#include <arpa/inet.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <microhttpd.h>
#include <netdb.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------ types */

/** One configured model and what the server knows about it. */
typedef struct srv_model {
    const srv_model_cfg *cfg;    /* name, path, task (borrowed from the config) */
    nz_translator *tr;           /* translate task, set once loaded */
    nz_dialogue *dlg;            /* dialogue task, set once loaded */
    uint64_t params;             /* float weights, elements */
    uint64_t compressed_bytes;   /* stored tile bytes of every tensor */
    uint64_t source_bytes;       /* the tensors as they were packed (bf16/fp32 bytes) */
    uint64_t decoded_bytes;      /* every float tensor decoded to fp32 */
    char mode[32];               /* weight mode of the largest share of the weights */
    char architecture[64];       /* config.json "architecture" */
    int has_at;                  /* translate: an AT decoder is present */
    size_t max_source_positions; /* translate: longest source incl. bos/eos */
    size_t num_modes;            /* dialogue: K decoders */
    const char *variant;         /* dialogue: "adapter", "transformer" or "none" (plain T5) */
    atomic_int lost;             /* its file changed under the server (a read faulted): not served any more */
} srv_model;

enum { RQ_READ = 0, RQ_QUEUED, RQ_RUNNING, RQ_DONE };
enum { CANCEL_NONE = 0, CANCEL_CLIENT, CANCEL_DEADLINE, CANCEL_SHUTDOWN };

/** Per-request state: created on the first callback, freed in on_completed (retire) — or, for a
 *  streamed request whose connection ended while its job still ran, by the job's end (stream_close). */
typedef struct srv_req {
    srv_server *s;
    struct MHD_Connection *conn;
    srv_route route;
    char method[12];
    char path[96];
    double t0;       /* arrival (monotonic seconds) */
    double deadline; /* t0 + request_timeout */
    double t_start;  /* a worker picked it up */
    double t_end;    /* response ready */
    char *body;      /* upload so far (NZ_MEM_OTHER) */
    size_t body_len, body_cap;
    int state;     /* RQ_* */
    int responded; /* status/resp decided */
    int status;
    char *resp; /* response body (nz_malloc'd) */
    size_t resp_len;
    const char *allow; /* Allow header for 405 */
    const srv_ui_asset *asset; /* a playground file to answer with (static, instead of resp) */
    int retry_after;   /* seconds, 0: no header */
    int close;         /* Connection: close */
    srv_translate_req tr;
    int32_t **ids;      /* [tr.n] translate: each text's ids, tokenized once when validated (NZ_MEM_OTHER) */
    size_t *n_ids;      /* [tr.n] their lengths; dialogue: ids[0] / n_ids[0] are the encoded context */
    size_t n_ids_alloc; /* entries of ids / n_ids */
    nz_tr_opts topts;   /* translate: the model's defaults with the request's choices applied */
    srv_dialogue_req dr;
    nz_dlg_opts dopts; /* dialogue: the model's defaults with the request's choices applied */
    srv_model *model;
    atomic_int fd;     /* the client socket, for disconnect checks (-1 once the connection ended) */
    atomic_int cancel; /* CANCEL_* */
    uint64_t tokens_in, tokens_out;
    int counted;                 /* in the request metrics already (count_request) */
    size_t batch_texts;          /* texts decoded together with this request's (its own included) */
    struct srv_req *next, *prev; /* queue / running list */
    struct srv_worker *worker;   /* the worker running it (set with start_running, under s->mu) */
    /* server-sent events (a dialogue request with "stream": true, from queueing on): the worker appends
     * events to sbuf, the content reader (sse_read) hands them to libmicrohttpd; both under smu */
    int sse;             /* the request is answered by an event stream */
    int smu_init;        /* smu was initialised */
    pthread_mutex_t smu; /* guards the fields below */
    char *sbuf;          /* pending event bytes sbuf[soff..slen) (NZ_MEM_OTHER) */
    size_t soff, slen, scap;
    int sdone;      /* the last event is in sbuf: end the stream after it */
    int ssuspended; /* sse_read suspended the connection for want of data */
    int sjob;       /* a queue / worker still holds the request */
    int sorphan;    /* the connection ended while sjob: stream_close retires the request */
    int sterm_ok;   /* how the connection ended (for the orphan's access-log line) */
} srv_req;

typedef struct srv_worker {
    srv_server *s;
    pthread_t thread;
    nz_matmul_ctx *mc;
    int started;
} srv_worker;

struct srv_server {
    const srv_config *cfg;
    srv_model *models; /* [n_models] */
    size_t n_models;
    srv_metrics *metrics;
    nz_tile_cache *cache; /* shared by every model */
    nz_pool *pool;        /* compute threads, shared by the workers */
    struct MHD_Daemon *mhd;
    srv_conns *conns; /* read deadlines of the open connections */
    int port;
    double t_start;

    atomic_int ready; /* 1 loaded, 0 loading, -1 failed */
    char load_err[512];
    pthread_t loader;
    int loader_started;

    pthread_mutex_t mu;
    pthread_cond_t cv;      /* workers wait for work */
    srv_req *qhead, *qtail; /* waiting requests */
    srv_req *running;       /* requests being run */
    int queued, nrunning;
    int stop_workers, stop_reaper;
    atomic_int draining;
    atomic_int live; /* srv_req alive */
    srv_worker *workers;
    int nworkers;
    pthread_t reaper;
    int reaper_started;
    int shut;
    int debug_step_delay_ms; /* NZSERVE_DEBUG_STEP_DELAY_MS: test hook, sleep before every decoder pass */
};

#define SRV_BATCH_MAX  64 /* requests decoded together */
#define SRV_BATCH_SCAN 64 /* queue entries looked at for batch mates */
/* After a job, malloc's free memory beyond this goes back to the OS (nz_mem_trim): a large request's
 * activations and KV caches must not keep the RSS at its peak (glibc keeps freed heap otherwise). */
#define SRV_TRIM_FREE_BYTES (8u << 20)

static void sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ------------------------------------------------------------------ models */

/* Sizes and the dominant weight mode of an opened model. */
static void model_stats(srv_model *sm, const nz_model *m) {
    uint64_t by_mode[8] = {0};
    char names[8][32] = {{0}};
    sm->params = sm->compressed_bytes = sm->source_bytes = sm->decoded_bytes = 0;
    for (size_t i = 0; i < nz_model_ntensors(m); i++) {
        const nz_tensor *t = nz_model_tensor(m, i);
        uint64_t n = 1;
        for (int d = 0; d < t->ndim; d++) n *= (uint64_t)t->shape[d];
        sm->compressed_bytes += t->stored_bytes;
        sm->source_bytes += n * t->desc.elem_size;
        if (t->desc.dtype == NZ_DT_OTHER) {
            sm->decoded_bytes += n * t->desc.elem_size;
            continue;
        }
        sm->params += n;
        sm->decoded_bytes += n * 4;
        char name[32];
        nz_mode_name(&t->desc.mode, name, sizeof name);
        for (int k = 0; k < 8; k++)
            if (!names[k][0] || !strcmp(names[k], name)) {
                snprintf(names[k], sizeof names[k], "%s", name);
                by_mode[k] += n;
                break;
            }
    }
    int best = 0;
    for (int k = 1; k < 8; k++)
        if (by_mode[k] > by_mode[best]) best = k;
    snprintf(sm->mode, sizeof sm->mode, "%s", names[best][0] ? names[best] : "none");
    const json_t *arch = json_object_get(nz_model_config(m), "architecture");
    snprintf(sm->architecture, sizeof sm->architecture, "%s",
             json_is_string(arch) ? json_string_value(arch) : "?");
}

int srv_server_check_models(const srv_config *cfg, char *err, size_t errlen) {
    for (size_t i = 0; i < cfg->n_models; i++) {
        const srv_model_cfg *mc = &cfg->models[i];
        nz_model *m = NULL;
        nz_error e = {0};
        if (nz_model_open(mc->path, &m, &e)) {
            snprintf(err, errlen, "model '%s': %s", mc->name, e.msg);
            return -1;
        }
        const json_t *arch = json_object_get(nz_model_config(m), "architecture");
        const char *a = json_is_string(arch) ? json_string_value(arch) : NULL;
        int ok = 1;
        if (mc->task == SRV_TASK_TRANSLATE && (!a || strcmp(a, "cmlm_transformer"))) {
            snprintf(err, errlen,
                     "model '%s': %s: task translate needs architecture \"cmlm_transformer\", found %s%s%s",
                     mc->name, mc->path, a ? "\"" : "", a ? a : "none", a ? "\"" : "");
            ok = 0;
        } else if (mc->task == SRV_TASK_DIALOGUE && (!a || strcmp(a, "t5_multidecoder"))) {
            snprintf(err, errlen,
                     "model '%s': %s: task dialogue needs architecture \"t5_multidecoder\", found %s%s%s",
                     mc->name, mc->path, a ? "\"" : "", a ? a : "none", a ? "\"" : "");
            ok = 0;
        }
        nz_model_free(m);
        if (!ok) return -1;
    }
    return 0;
}

static void *loader_main(void *arg) {
    srv_server *s = arg;
    const char *delay = getenv("NZSERVE_DEBUG_LOAD_DELAY_MS"); /* test hook: a slow model load */
    if (delay && atoi(delay) > 0) {
        int ms = atoi(delay);
        for (int t = 0; t < ms && !atomic_load(&s->draining); t += 10) sleep_ms(10);
    }
    for (size_t i = 0; i < s->n_models && !atomic_load(&s->draining); i++) {
        srv_model *sm = &s->models[i];
        double t0 = nz_now_s();
        nz_error e = {0};
        int rc = sm->cfg->task == SRV_TASK_DIALOGUE ? nz_dialogue_open(sm->cfg->path, &sm->dlg, &e)
                                                    : nz_translator_open(sm->cfg->path, &sm->tr, &e);
        if (!rc && s->cfg->verify_on_load)
            rc =
                nz_model_verify_tiles(sm->dlg ? nz_dialogue_model(sm->dlg) : nz_translator_model(sm->tr), &e);
        if (rc) {
            snprintf(s->load_err, sizeof s->load_err, "model '%s': %s", sm->cfg->name, e.msg);
            atomic_store(&s->ready, -1);
            return NULL;
        }
        if (sm->dlg) {
            model_stats(sm, nz_dialogue_model(sm->dlg));
            const nz_t5md_config *dc = nz_dialogue_config(sm->dlg);
            sm->num_modes = dc->num_modes;
            sm->variant = dc->plain ? "none" : dc->kind == NZ_T5MD_TRANSFORMER ? "transformer" : "adapter";
        } else {
            model_stats(sm, nz_translator_model(sm->tr));
            const nz_nat_config *nc = nz_nat_get_config(nz_translator_nat(sm->tr));
            sm->has_at = nc->at_layers > 0;
            sm->max_source_positions = nc->max_source_positions;
        }
        srv_log(SRV_LOG_INFO, "model_loaded", "model", SRV_KV_STR, sm->cfg->name, "path", SRV_KV_STR,
                sm->cfg->path, "architecture", SRV_KV_STR, sm->architecture, "weight_mode", SRV_KV_STR,
                sm->mode, "compressed_bytes", SRV_KV_UINT, (unsigned long long)sm->compressed_bytes,
                "decoded_equivalent_bytes", SRV_KV_UINT, (unsigned long long)sm->decoded_bytes, "load_ms",
                SRV_KV_DBL, (nz_now_s() - t0) * 1e3, NULL);
    }
    if (!atomic_load(&s->draining)) {
        atomic_store(&s->ready, 1);
        srv_log(SRV_LOG_INFO, "ready", "models", SRV_KV_UINT, (unsigned long long)s->n_models, "startup_ms",
                SRV_KV_DBL, (nz_now_s() - s->t_start) * 1e3, NULL);
    }
    return NULL;
}

static srv_model *find_model(srv_server *s, const char *name, srv_task task) {
    for (size_t i = 0; i < s->n_models; i++)
        if (name ? !strcmp(s->models[i].cfg->name, name) : s->models[i].cfg->task == task)
            return &s->models[i];
    return NULL;
}

/* The container of a loaded model. */
static const nz_model *model_container(const srv_model *m) {
    return m->tr ? nz_translator_model(m->tr) : m->dlg ? nz_dialogue_model(m->dlg) : NULL;
}

/* A job of model m failed with e: log it; when a read of its file faulted (the file was truncated or
 * rewritten in place), the model is lost: logged once, /ready answers 503 and its requests 503.
 * @return the status to answer: 503 for a lost model, else 500. */
static int job_failed(srv_model *m, const nz_error *e) {
    srv_log(SRV_LOG_ERROR, "inference_failed", "model", SRV_KV_STR, m->cfg->name, "error", SRV_KV_STR, e->msg,
            NULL);
    if (!nz_model_faulted(model_container(m))) return 500;
    if (!atomic_exchange(&m->lost, 1))
        srv_log(SRV_LOG_ERROR, "model_file_changed", "model", SRV_KV_STR, m->cfg->name, "path", SRV_KV_STR,
                m->cfg->path, "action", SRV_KV_STR, "not served until the server restarts", NULL);
    return 503;
}

/* ------------------------------------------------------------------ responses */

/* Decide the response of r: status and a body (nz_malloc'd via jansson or ours). */
static void respond_body(srv_req *r, int status, char *body, size_t len) {
    nz_free(r->resp);
    r->status = status;
    r->resp = body;
    r->resp_len = len;
    r->responded = 1;
}

static void respond_json(srv_req *r, int status, json_t *j) {
    char *s = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!s) {
        static const char oom[] =
            "{\"error\":{\"code\":500,\"type\":\"internal_error\",\"message\":\"out of memory\"}}";
        char *b = nz_malloc(sizeof oom, NZ_MEM_OTHER);
        if (b) memcpy(b, oom, sizeof oom);
        respond_body(r, 500, b, b ? sizeof oom - 1 : 0);
        return;
    }
    respond_body(r, status, s, strlen(s));
}

static void respond_error(srv_req *r, const srv_error *e) {
    size_t len = 0;
    char *b = srv_error_body(e, &len);
    respond_body(r, e->status, b, b ? len : 0);
    if (e->status == 429 || e->status == 503) r->retry_after = 1;
}

static void respond_fail(srv_req *r, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void respond_fail(srv_req *r, int status, const char *fmt, ...) {
    srv_error e = {status, srv_error_type(status), {0}};
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    respond_error(r, &e);
}

/* Count r once in the request metrics (requests, duration, tokens) with the given status. Called just
 * before r's response is queued, so whatever a client reads after its response (/metrics) includes it;
 * retire counts a request that never got that far (the client left first: 499). */
static void count_request(srv_req *r, int status) {
    if (r->counted) return;
    r->counted = 1;
    srv_metrics_observe(r->s->metrics, r->route, status, nz_now_s() - r->t0, r->tokens_in, r->tokens_out);
}

/* A JSON string of s[0..n), replacing invalid UTF-8 with U+FFFD. */
static json_t *json_text(const char *s, size_t n) {
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

/* ------------------------------------------------------------------ GET endpoints */

static json_t *models_json(srv_server *s) {
    json_t *arr = json_array();
    nz_cache_stats cs;
    nz_cache_get_stats(s->cache, &cs);
    int ready = atomic_load(&s->ready) == 1;
    for (size_t i = 0; i < s->n_models; i++) {
        srv_model *m = &s->models[i];
        int loaded = ready || m->tr || m->dlg; /* the loader fills models in order */
        json_t *o = json_pack("{s:s, s:s, s:s, s:b, s:b}", "name", m->cfg->name, "task",
                              srv_task_name(m->cfg->task), "path", m->cfg->path, "loaded", loaded && ready,
                              "available", loaded && ready && !atomic_load(&m->lost));
        if (ready) {
            json_object_set_new(o, "architecture", json_string(m->architecture));
            json_object_set_new(o, "weight_mode", json_string(m->mode));
            json_object_set_new(o, "parameters", json_integer((json_int_t)m->params));
            json_object_set_new(o, "compressed_bytes", json_integer((json_int_t)m->compressed_bytes));
            json_object_set_new(o, "source_bytes", json_integer((json_int_t)m->source_bytes));
            json_object_set_new(o, "decoded_equivalent_bytes", json_integer((json_int_t)m->decoded_bytes));
            json_object_set_new(
                o, "ratio",
                json_real(m->source_bytes ? (double)m->compressed_bytes / (double)m->source_bytes : 0.0));
            json_object_set_new(
                o, "bits_per_weight",
                json_real(m->params ? 8.0 * (double)m->compressed_bytes / (double)m->params : 0.0));
            if (m->cfg->task == SRV_TASK_TRANSLATE) {
                json_object_set_new(o, "generation", nz_tr_opts_to_json(nz_translator_defaults(m->tr)));
                json_object_set_new(o, "at_decoder", json_boolean(m->has_at));
                json_object_set_new(o, "max_source_positions",
                                    json_integer((json_int_t)m->max_source_positions));
            } else if (m->dlg) {
                const nz_t5md_config *dc = nz_dialogue_config(m->dlg);
                json_object_set_new(o, "generation", nz_dlg_opts_to_json(nz_dialogue_defaults(m->dlg)));
                json_object_set_new(o, "num_modes", json_integer((json_int_t)m->num_modes));
                json_object_set_new(o, "variant", json_string(m->variant));
                json_object_set_new(o, "max_context_turns", json_integer((json_int_t)dc->max_context_turns));
                json_object_set_new(o, "max_source_length", json_integer((json_int_t)dc->max_source_length));
            }
        }
        json_array_append_new(arr, o);
    }
    return json_pack("{s:o, s:{s:I, s:b, s:I}}", "models", arr, "tile_cache", "budget_bytes",
                     (json_int_t)cs.budget, "shared", 1, "bytes", (json_int_t)cs.bytes);
}

static json_t *memory_json(srv_server *s) {
    nz_mem_report r;
    nz_mem_get_report(&r);
    nz_cache_stats cs;
    nz_cache_get_stats(s->cache, &cs);
    uint64_t ut, uns;
    nz_weight_uncached_stats(&ut, &uns);
    json_t *models = json_array();
    int ready = atomic_load(&s->ready) == 1;
    for (size_t i = 0; ready && i < s->n_models; i++) {
        srv_model *m = &s->models[i];
        json_array_append_new(
            models,
            json_pack("{s:s, s:s, s:I, s:I, s:f}", "name", m->cfg->name, "weight_mode", m->mode,
                      "compressed_bytes", (json_int_t)m->compressed_bytes, "decoded_equivalent_bytes",
                      (json_int_t)m->decoded_bytes, "decoded_over_compressed",
                      m->compressed_bytes ? (double)m->decoded_bytes / (double)m->compressed_bytes : 0.0));
    }
    json_t *j = nz_mem_report_json(&r);
    if (!j) {
        json_decref(models);
        return NULL;
    }
    json_object_set_new(j, "models", models);
    json_object_set_new(j, "tile_cache",
                        json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f}", "bytes",
                                  (json_int_t)cs.bytes, "peak_bytes", (json_int_t)cs.peak_bytes,
                                  "budget_bytes", (json_int_t)cs.budget, "entries", (json_int_t)cs.entries,
                                  "hits", (json_int_t)cs.hits, "misses", (json_int_t)cs.misses, "evictions",
                                  (json_int_t)cs.evictions, "tiles_decoded_uncached", (json_int_t)ut,
                                  "decode_seconds", (double)(cs.decode_ns + uns) * 1e-9));
    return j;
}

static void respond_metrics(srv_server *s, srv_req *r) {
    nz_mem_report mr;
    nz_mem_get_report(&mr);
    nz_cache_stats cs;
    nz_cache_get_stats(s->cache, &cs);
    uint64_t ut, uns;
    nz_weight_uncached_stats(&ut, &uns);
    int ready = atomic_load(&s->ready) == 1;
    srv_model_gauges mg[s->n_models ? s->n_models : 1];
    size_t nm = 0;
    for (size_t i = 0; ready && i < s->n_models; i++)
        mg[nm++] = (srv_model_gauges){s->models[i].cfg->name, s->models[i].compressed_bytes,
                                      s->models[i].decoded_bytes};
    srv_gauges g = {0};
    g.models = mg;
    g.n_models = nm;
    g.tile_cache_bytes = cs.bytes;
    g.tile_cache_limit_bytes = cs.budget;
    g.kv_cache_bytes = mr.current[NZ_MEM_KV];
    g.scratch_bytes = mr.current[NZ_MEM_SCRATCH];
    g.activations_bytes = mr.current[NZ_MEM_ACTIVATIONS];
    g.resident_bytes = mr.rss;
    g.resident_peak_bytes = mr.rss_peak;
    g.mapped_resident_bytes = mr.mapped_resident;
    g.allocator_free_bytes = mr.allocator_free;
    g.tiles_decoded_total = cs.tiles_decoded + ut;
    g.tile_cache_hits_total = cs.hits;
    g.tile_cache_misses_total = cs.misses;
    g.tile_cache_evictions_total = cs.evictions;
    g.tile_decode_seconds_total = (double)(cs.decode_ns + uns) * 1e-9;
    g.ready = ready;
    g.uptime_seconds = nz_now_s() - s->t_start;
    char *text = NULL;
    size_t len = 0;
    if (srv_metrics_render(s->metrics, &g, &text, &len)) {
        respond_fail(r, 500, "out of memory rendering the metrics");
        return;
    }
    char *b = nz_malloc(len + 1, NZ_MEM_OTHER);
    if (b) memcpy(b, text, len + 1);
    free(text);
    if (!b) {
        respond_fail(r, 500, "out of memory rendering the metrics");
        return;
    }
    respond_body(r, 200, b, len);
}

/* ------------------------------------------------------------------ server-sent events */

static void retire(srv_req *r, int term_ok);

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
static void sse_push(srv_req *r, const char *event, const char *data, size_t len) {
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
static void stream_close(srv_req *r) {
    static const char oom[] =
        "{\"error\":{\"code\":500,\"type\":\"internal_error\",\"message\":\"out of memory\"}}";
    const int ok = r->status == 200 && r->resp;
    pthread_mutex_lock(&r->smu);
    if (!r->sorphan &&
        sse_append(r, ok ? "done" : "error", r->resp ? r->resp : oom, r->resp ? r->resp_len : sizeof oom - 1))
        srv_log(SRV_LOG_WARN, "stream_truncated", "path", SRV_KV_STR, r->path, "reason", SRV_KV_STR,
                "out of memory", NULL);
    if (!r->sorphan) count_request(r, r->status); /* an orphan is counted when retired (499) */
    r->sdone = 1;
    r->sjob = 0;
    const int resume = r->ssuspended, orphan = r->sorphan, term_ok = r->sterm_ok;
    r->ssuspended = 0;
    pthread_mutex_unlock(&r->smu);
    if (orphan)
        retire(r, term_ok);
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

/* ------------------------------------------------------------------ inference */

/* Whether the client of r closed its side (poll without waiting). */
static int client_gone(int fd) {
    if (fd < 0) return 0;
    struct pollfd p = {fd, POLLRDHUP, 0};
    if (poll(&p, 1, 0) <= 0) return 0;
    return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

/* Whether a running request should stop: cancelled, past its deadline, or its client left
 * (sets r->cancel to the reason). */
static int req_should_stop(srv_req *r) {
    if (atomic_load(&r->cancel)) return 1;
    if (nz_now_s() > r->deadline) {
        atomic_store(&r->cancel, CANCEL_DEADLINE);
        return 1;
    }
    if (client_gone(atomic_load(&r->fd))) {
        atomic_store(&r->cancel, CANCEL_CLIENT);
        return 1;
    }
    return 0;
}

/** Requests decoded together: same model, same decoding options. */
typedef struct srv_batch {
    srv_server *s;
    srv_req *m[SRV_BATCH_MAX]; /* members, in queue order; NULL once released early */
    size_t n;
    size_t live; /* members not released */
} srv_batch;

static void release_member(srv_batch *b, size_t i);

/* The stop hook of a batch: a member that was cancelled, passed its deadline or lost its client
 * is answered and released at once (its ids are no longer read: nz_translator_run_ids reads
 * them only before its first stop check); the batch stops when no member is left. */
static int batch_should_stop(void *arg) {
    srv_batch *b = arg;
    for (int t = 0; t < b->s->debug_step_delay_ms; t += 5) sleep_ms(5);
    for (size_t i = 0; i < b->n; i++)
        if (b->m[i] && req_should_stop(b->m[i])) release_member(b, i);
    return b->live == 0;
}

/* The response of a request stopped by reason (CANCEL_*). */
static void respond_cancelled(srv_req *r, int reason) {
    switch (reason) {
    case CANCEL_DEADLINE:
        respond_fail(r, 504, "the request did not finish within %d ms", r->s->cfg->request_timeout_ms);
        srv_metrics_rejected(r->s->metrics, "deadline");
        break;
    case CANCEL_SHUTDOWN:
        respond_fail(r, 503, "the server is shutting down");
        r->close = 1;
        srv_metrics_rejected(r->s->metrics, "shutdown");
        break;
    default: /* nobody reads this: the client is gone */
        respond_fail(r, 499, "client closed the connection");
        r->close = 1;
        srv_metrics_rejected(r->s->metrics, "cancelled");
    }
}

/* Whether b can be decoded in one batch with a (same model and options). */
static int batchable(const srv_req *a, const srv_req *b) {
    return a->route == SRV_ROUTE_TRANSLATE && b->route == SRV_ROUTE_TRANSLATE && a->model == b->model &&
           nz_tr_opts_same(&a->topts, &b->topts);
}

/* Build r's 200 response from its results res[0..r->tr.n), or its error response. */
static void respond_translations(srv_req *r, const nz_tr_result *res) {
    const srv_translate_req *q = &r->tr;
    json_t *arr = json_array();
    uint64_t tin = 0, tout = 0;
    for (size_t i = 0; i < q->n; i++) {
        const nz_tr_result *t = &res[i];
        if (t->rc) {
            int st = t->rc == NZ_E_RANGE || t->rc == NZ_E_INVALID_ARG || t->rc == NZ_E_FORMAT ? 422 : 500;
            if (q->single)
                respond_fail(r, st, "%s", t->err.msg);
            else
                respond_fail(r, st, "texts[%zu]: %s", i, t->err.msg);
            json_decref(arr);
            return;
        }
        tin += t->input_tokens >= 2 ? t->input_tokens - 2 : 0;
        tout += t->output_tokens;
        json_t *o1 =
            json_pack("{s:o, s:f}", "text", json_text(t->text, t->text_len), "score", (double)t->score);
        if (o1 && q->return_tokens) {
            json_t *ids = json_array();
            for (size_t k = 0; k < t->n_tokens; k++) json_array_append_new(ids, json_integer(t->tokens[k]));
            json_object_set_new(o1, "tokens", ids);
        }
        json_array_append_new(arr, o1);
    }
    r->tokens_in = tin;
    r->tokens_out = tout;
    double t1 = nz_now_s();
    respond_json(r, 200,
                 json_pack("{s:s, s:o, s:{s:I, s:I}, s:{s:f, s:f, s:f}}", "model", r->model->cfg->name,
                           "translations", arr, "usage", "input_tokens", (json_int_t)tin, "output_tokens",
                           (json_int_t)tout, "timing_ms", "queue", (r->t_start - r->t0) * 1e3, "inference",
                           (t1 - r->t_start) * 1e3, "total", (t1 - r->t0) * 1e3));
}

/* Decode the live members of b as one nz_translator_run and answer each of them. */
static void run_translate(srv_worker *w, srv_batch *b) {
    size_t cnt[SRV_BATCH_MAX], total = 0; /* texts of each member, as laid out in the batch */
    for (size_t i = 0; i < b->n; i++)
        if (b->m[i] && req_should_stop(b->m[i])) release_member(b, i);
    for (size_t i = 0; i < b->n; i++) total += cnt[i] = b->m[i] ? b->m[i]->tr.n : 0;
    if (!b->live) return;
    const srv_req *r0 = NULL;
    for (size_t i = 0; !r0; i++) r0 = b->m[i];
    srv_model *model = r0->model;
    nz_tr_opts o = r0->topts;
    nz_tr_opts_set_stop(&o, batch_should_stop, b);
    nz_tr_result *res = nz_calloc(total, sizeof *res, NZ_MEM_OTHER);
    const int32_t **ids = nz_calloc(total, sizeof *ids, NZ_MEM_OTHER);
    size_t *lens = nz_calloc(total, sizeof *lens, NZ_MEM_OTHER);
    if (!res || !ids || !lens) {
        for (size_t i = 0; i < b->n; i++)
            if (b->m[i]) respond_fail(b->m[i], 500, "out of memory");
        goto out;
    }
    for (size_t i = 0, k = 0; i < b->n; i++)
        for (size_t j = 0; j < cnt[i]; j++, k++) {
            ids[k] = b->m[i]->ids[j];
            lens[k] = b->m[i]->n_ids[j];
        }
    nz_error e = {0};
    int rc = nz_translator_run_ids(w->mc, model->tr, ids, lens, total, &o, 1, res, &e);
    int fail_status = rc && rc != NZ_E_CANCELLED ? job_failed(model, &e) : 500;
    for (size_t i = 0, k = 0; i < b->n; k += cnt[i], i++) {
        srv_req *r = b->m[i];
        if (!r) continue; /* released early */
        int reason = atomic_load(&r->cancel);
        r->batch_texts = total;
        if (reason || rc == NZ_E_CANCELLED)
            respond_cancelled(r, reason ? reason : CANCEL_SHUTDOWN);
        else if (rc)
            respond_fail(r, fail_status, "translation failed: %s", e.msg);
        else
            respond_translations(r, res + k);
    }
out:
    nz_tr_results_free(res, res ? total : 0);
    nz_free(res);
    nz_free(ids);
    nz_free(lens);
}

/* The stop hook of a dialogue request (checked before every decoder step). */
static int dialogue_should_stop(void *arg) {
    srv_req *r = arg;
    for (int t = 0; t < r->s->debug_step_delay_ms; t += 5) sleep_ms(5);
    return req_should_stop(r);
}

/* The streaming hook of a dialogue request: one "token" event per generated token. */
static void dialogue_token(void *arg, int decoder, size_t pos, int32_t token, float logprob, const char *text,
                           size_t text_len) {
    srv_req *r = arg;
    (void)pos;
    (void)logprob;
    json_t *j = json_pack("{s:i, s:i, s:o}", "decoder", decoder, "token", (int)token, "text",
                          json_text(text, text_len));
    char *d = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (d) sse_push(r, "token", d, strlen(d));
    nz_free(d); /* jansson allocates through nz_alloc */
}

/* Build r's 200 response from its ranked responses. */
static void respond_dialogue(srv_req *r, const nz_dlg_result *res) {
    json_t *arr = json_array();
    for (size_t i = 0; i < res->n; i++) {
        const nz_dlg_response *p = &res->responses[i];
        json_t *o1 =
            json_pack("{s:i, s:o, s:o}", "decoder", p->decoder, "text", json_text(p->text, p->text_len),
                      "score", isfinite(p->score) ? json_real(p->score) : json_null());
        if (o1 && r->dr.return_tokens) {
            json_t *ids = json_array();
            for (size_t k = 0; k < p->n_tokens; k++) json_array_append_new(ids, json_integer(p->tokens[k]));
            json_object_set_new(o1, "tokens", ids);
        }
        json_array_append_new(arr, o1);
    }
    r->tokens_in = res->input_tokens ? res->input_tokens - 1 : 0; /* without eos */
    r->tokens_out = res->output_tokens;
    double t1 = nz_now_s();
    respond_json(r, 200,
                 json_pack("{s:s, s:o, s:{s:I, s:I}, s:{s:f, s:f, s:f}}", "model", r->model->cfg->name,
                           "responses", arr, "usage", "input_tokens", (json_int_t)r->tokens_in,
                           "output_tokens", (json_int_t)r->tokens_out, "timing_ms", "queue",
                           (r->t_start - r->t0) * 1e3, "inference", (t1 - r->t_start) * 1e3, "total",
                           (t1 - r->t0) * 1e3));
}

/* Run one dialogue request (a job of its own) and decide its response. */
static void run_dialogue(srv_worker *w, srv_req *r) {
    if (req_should_stop(r)) {
        respond_cancelled(r, atomic_load(&r->cancel));
        return;
    }
    const srv_dialogue_req *q = &r->dr;
    nz_dlg_opts o = r->dopts;
    o.gen.decoders = q->n_decoders ? q->decoders : NULL;
    o.gen.n_decoders = q->n_decoders;
    o.gen.seed = (uint64_t)q->seed;
    o.gen.stop = dialogue_should_stop;
    o.gen.stop_arg = r;
    if (r->sse) {
        o.on_token = dialogue_token;
        o.token_arg = r;
    }
    nz_dlg_result res;
    nz_error e = {0};
    int rc = nz_dialogue_run_ids(w->mc, r->model->dlg, r->ids[0], r->n_ids[0], &o, &res, &e);
    int reason = atomic_load(&r->cancel);
    if (reason || rc == NZ_E_CANCELLED) {
        respond_cancelled(r, reason ? reason : CANCEL_SHUTDOWN);
    } else if (rc == NZ_E_RANGE || rc == NZ_E_INVALID_ARG) {
        respond_fail(r, 422, "%s", e.msg);
    } else if (rc) {
        respond_fail(r, job_failed(r->model, &e), "dialogue failed: %s", e.msg);
    } else {
        respond_dialogue(r, &res);
    }
    nz_dlg_result_free(&res);
}

/* Unlink r from a doubly linked list. Caller holds s->mu. */
static void list_remove(srv_req **head, srv_req **tail, srv_req *r) {
    if (r->prev)
        r->prev->next = r->next;
    else
        *head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else if (tail)
        *tail = r->prev;
    r->next = r->prev = NULL;
}

/* Hand a finished request back to libmicrohttpd (a streamed one: its decided response becomes the
 * stream's last event). r must not be touched after. */
static void finish(srv_req *r) {
    r->t_end = nz_now_s();
    if (r->sse) {
        stream_close(r);
        return;
    }
    r->state = RQ_DONE;
    MHD_resume_connection(r->conn);
}

/* Move r from the queue to the running list. Caller holds s->mu. */
static void start_running(srv_server *s, srv_req *r) {
    list_remove(&s->qhead, &s->qtail, r);
    s->queued--;
    r->state = RQ_RUNNING;
    r->next = s->running;
    if (s->running) s->running->prev = r;
    s->running = r;
    s->nrunning++;
    srv_metrics_queue_add(s->metrics, -1);
    srv_metrics_inflight_add(s->metrics, 1);
}

/* Take r off the running list. */
static void stop_running(srv_server *s, srv_req *r) {
    pthread_mutex_lock(&s->mu);
    list_remove(&s->running, NULL, r);
    s->nrunning--;
    srv_metrics_inflight_add(s->metrics, -1);
    pthread_mutex_unlock(&s->mu);
}

/* Answer member i of b with its cancellation and hand it back now; the batch goes on without it. */
static void release_member(srv_batch *b, size_t i) {
    srv_req *r = b->m[i];
    respond_cancelled(r, atomic_load(&r->cancel));
    stop_running(b->s, r);
    b->m[i] = NULL;
    b->live--;
    finish(r);
}

static void *worker_main(void *arg) {
    srv_worker *w = arg;
    srv_server *s = w->s;
    srv_batch b = {s, {0}, 0, 0};
    for (;;) {
        pthread_mutex_lock(&s->mu);
        while (!s->qhead && !s->stop_workers) pthread_cond_wait(&s->cv, &s->mu);
        if (!s->qhead) {
            pthread_mutex_unlock(&s->mu);
            break;
        }
        b.n = 0;
        srv_req *r0 = s->qhead;
        nz_matmul_ctx_cancel(w->mc, 0); /* re-armed for this job (the reaper cancels under s->mu too) */
        r0->worker = w;
        start_running(s, r0);
        if (r0->route == SRV_ROUTE_DIALOGUE) { /* a job of its own */
            pthread_mutex_unlock(&s->mu);
            r0->t_start = nz_now_s();
            srv_metrics_queue_wait(s->metrics, r0->t_start - r0->t0);
            run_dialogue(w, r0);
            nz_mem_trim(
                SRV_TRIM_FREE_BYTES); /* before the response goes: what the client reads next is trimmed */
            stop_running(s, r0);
            finish(r0);
            continue;
        }
        /* the oldest request, and queued requests it can be decoded with (up to max_texts texts) */
        size_t texts = r0->tr.n, scanned = 0;
        b.m[b.n++] = r0;
        for (srv_req *r = s->qhead, *nx; r && b.n < SRV_BATCH_MAX && scanned < SRV_BATCH_SCAN;
             r = nx, scanned++) {
            nx = r->next;
            if (!batchable(r0, r) || texts + r->tr.n > (size_t)s->cfg->max_texts) continue;
            r->worker = w;
            start_running(s, r);
            b.m[b.n++] = r;
            texts += r->tr.n;
        }
        b.live = b.n;
        pthread_mutex_unlock(&s->mu);

        double t = nz_now_s();
        for (size_t i = 0; i < b.n; i++) {
            b.m[i]->t_start = t;
            srv_metrics_queue_wait(s->metrics, t - b.m[i]->t0);
        }
        run_translate(w, &b);
        nz_mem_trim(SRV_TRIM_FREE_BYTES);

        for (size_t i = 0; i < b.n; i++) {
            if (!b.m[i]) continue; /* released early */
            stop_running(s, b.m[i]);
            finish(b.m[i]); /* nobody else holds it now */
        }
    }
    return NULL;
}

/* Running jobs: marks each running request that passed its deadline or lost its client (r->cancel), and
 * cancels the matmul context of a worker whose every member is stopping, so its forward pass ends within a
 * tile's work instead of at the next pass or step boundary (a member of a batch that goes on is released
 * at the next boundary, as before). Caller holds s->mu (running requests cannot be freed meanwhile). */
static void cancel_stopped_jobs(srv_server *s) {
    for (srv_req *r = s->running; r; r = r->next) req_should_stop(r);
    for (int i = 0; i < s->nworkers; i++) {
        int members = 0, live = 0;
        for (srv_req *r = s->running; r; r = r->next)
            if (r->worker == &s->workers[i]) members++, live += !atomic_load(&r->cancel);
        if (members && !live) nz_matmul_ctx_cancel(s->workers[i].mc, 1);
    }
}

/* Completes queued requests whose deadline passed or whose client left; stops running jobs whose every
 * request did (cancel_stopped_jobs). */
static void *reaper_main(void *arg) {
    srv_server *s = arg;
    pthread_mutex_lock(&s->mu);
    while (!s->stop_reaper) {
        double t = nz_now_s();
        for (srv_req *r = s->qhead, *nx; r; r = nx) {
            nx = r->next;
            int reason = atomic_load(&r->cancel)            ? atomic_load(&r->cancel)
                         : t > r->deadline                  ? CANCEL_DEADLINE
                         : client_gone(atomic_load(&r->fd)) ? CANCEL_CLIENT
                                                            : CANCEL_NONE;
            if (!reason) continue;
            list_remove(&s->qhead, &s->qtail, r);
            s->queued--;
            srv_metrics_queue_add(s->metrics, -1);
            respond_cancelled(r, reason);
            finish(r);
        }
        cancel_stopped_jobs(s);
        pthread_mutex_unlock(&s->mu);
        for (size_t n = srv_conns_sweep(s->conns, t); n; n--) srv_metrics_rejected(s->metrics, "read_timeout");
        sleep_ms(20);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

static int enqueue(srv_server *s, srv_req *r);

/* The model a request names (or the first of its task): NULL after answering 404 (none), 422 (another
 * task) or 503 (its file changed under the server). */
static srv_model *resolve_model(srv_server *s, srv_req *r, const char *name, srv_task task) {
    srv_model *m = find_model(s, name, task);
    if (!m) {
        if (name)
            respond_fail(r, 404, "model '%.100s' not found", name);
        else
            respond_fail(r, 404, "no %s model is configured", task == SRV_TASK_DIALOGUE ? "dialogue" : "translation");
        return NULL;
    }
    if (m->cfg->task != task) {
        respond_fail(r, 422, "model '%s' serves %s, not %s", m->cfg->name, srv_task_name(m->cfg->task),
                     srv_task_name(task));
        return NULL;
    }
    if (atomic_load(&m->lost)) {
        respond_fail(r, 503, "model '%s' is unavailable: its file %s changed under the server; restart it (replace "
                     "model files by renaming a new file over the old one)", m->cfg->name, m->cfg->path);
        return NULL;
    }
    return m;
}


/* Validate a translate request against the model and the token limits and queue it.
 * @return 1 when queued (connection suspended), 0 when a response was decided. */
/* r->topts = m's decoding defaults with r's choices applied (the output cap is max_new_tokens unless
 * the request or the model asks for less). @return 0, or -1 with r's error response decided. */
static int resolve_translate_opts(srv_req *r, const srv_model *m, int max_new_tokens) {
    const srv_translate_req *q = &r->tr;
    nz_tr_choice c;
    nz_tr_choice_init(&c);
    c.decoder = q->use_at;
    c.iterations = q->iterations;
    c.length_beam = q->length_beam;
    c.rerank = q->rerank_at;
    c.adaptive = q->adaptive;
    c.beam_size = q->beam_size;
    r->topts = *nz_translator_defaults(m->tr);
    int model_cap = r->topts.nat.max_len > 2 ? r->topts.nat.max_len - 2 : max_new_tokens;
    c.max_length = q->max_length > 0            ? q->max_length
                   : model_cap < max_new_tokens ? model_cap
                                                : max_new_tokens;
    nz_error e = {0};
    if (nz_tr_choice_apply(&c, &r->topts, &e)) {
        respond_fail(r, 422, "%s", e.msg);
        return -1;
    }
    int at = r->topts.decoder != NZ_TR_NAT;
    if ((at || r->topts.nat.rerank_at) && !m->has_at) {
        respond_fail(r, 422, "model '%s' has no autoregressive decoder (needed by %s)", m->cfg->name,
                     at ? "decoder \"at\"" : "rerank \"at\"");
        return -1;
    }
    return 0;
}

/* Room for n tokenized inputs of r (freed by retire). @return 0, or -1 with a 500 response decided. */
static int alloc_ids(srv_req *r, size_t n) {
    r->ids = nz_calloc(n, sizeof *r->ids, NZ_MEM_OTHER);
    r->n_ids = nz_calloc(n, sizeof *r->n_ids, NZ_MEM_OTHER);
    r->n_ids_alloc = r->ids && r->n_ids ? n : 0;
    if (r->n_ids_alloc) return 0;
    respond_fail(r, 500, "out of memory");
    return -1;
}

/* r->dopts = m's decoding defaults with r's choices applied (max_new_tokens: the request's, else the
 * model's capped by the server's limit); a strategy option is checked against the strategy in effect.
 * @return 0, or -1 with r's error response decided. */
static int resolve_dialogue_opts(srv_req *r, const srv_model *m, int max_new_tokens) {
    const srv_dialogue_req *q = &r->dr;
    r->dopts = *nz_dialogue_defaults(m->dlg);
    nz_dlg_choice c;
    nz_dlg_choice_init(&c);
    c.strategy = q->strategy;
    c.beam_size = q->beam_size;
    c.temperature = (float)q->temperature;
    c.top_k = q->top_k;
    c.top_p = (float)q->top_p;
    c.no_repeat_ngram = q->no_repeat_ngram;
    c.distinct = q->distinct;
    int model_cap = r->dopts.gen.max_new_tokens;
    c.max_new_tokens = q->max_new_tokens > 0        ? q->max_new_tokens
                       : model_cap < max_new_tokens ? model_cap
                                                    : max_new_tokens;
    srv_error se = {0};
    if (srv_dialogue_check_strategy(q, c.strategy >= 0 ? c.strategy : (int)r->dopts.gen.strategy, &se)) {
        respond_error(r, &se);
        return -1;
    }
    nz_error e = {0};
    if (nz_dlg_choice_apply(&c, &r->dopts, &e)) {
        respond_fail(r, 422, "%s", e.msg);
        return -1;
    }
    return 0;
}

static int submit_translate(srv_server *s, srv_req *r) {
    const srv_config *cfg = s->cfg;
    srv_error e = {0};
    srv_limits lim = {cfg->max_texts, cfg->max_new_tokens};
    if (srv_parse_translate(r->body, r->body_len, &lim, &r->tr, &e)) {
        respond_error(r, &e);
        return 0;
    }
    srv_model *m = resolve_model(s, r, r->tr.model, SRV_TASK_TRANSLATE);
    if (!m) return 0;
    if (resolve_translate_opts(r, m, cfg->max_new_tokens)) return 0;
    r->model = m;
    size_t limit = (size_t)cfg->max_input_tokens;
    if (m->max_source_positions >= 2 && m->max_source_positions - 2 < limit)
        limit = m->max_source_positions - 2;
    if (alloc_ids(r, r->tr.n)) return 0;
    for (size_t i = 0; i < r->tr.n; i++) {
        nz_error ne = {0};
        if (nz_translator_encode(m->tr, r->tr.texts[i], r->tr.lens[i], &r->ids[i], &r->n_ids[i], &ne)) {
            respond_fail(r, 422, "%s%zu%s: cannot tokenize: %s", r->tr.single ? "text" : "texts[", i,
                         r->tr.single ? "" : "]", ne.msg);
            return 0;
        }
        size_t n = r->n_ids[i];
        if (n - 2 > limit) {
            if (r->tr.single)
                respond_fail(r, 422, "'text' has %zu tokens; the limit is %zu", n - 2, limit);
            else
                respond_fail(r, 422, "'texts'[%zu] has %zu tokens; the limit is %zu", i, n - 2, limit);
            return 0;
        }
    }
    return enqueue(s, r);
}

/* Queue r for a worker (429 when the queue is full). A plain request's connection is suspended until
 * finish(); a streamed one (r->sse) keeps its connection: its event stream is queued by on_request and
 * the queue / worker holds r until stream_close.
 * @return 1 when queued, 0 when a response was decided. */
static int enqueue(srv_server *s, srv_req *r) {
    const srv_config *cfg = s->cfg;
    pthread_mutex_lock(&s->mu);
    int busy = s->nrunning + s->queued >= s->nworkers; /* no idle worker */
    if (busy && s->queued >= cfg->queue_length) {
        pthread_mutex_unlock(&s->mu);
        srv_metrics_rejected(s->metrics, "queue_full");
        respond_fail(r, 429, "the request queue is full (%d waiting); retry later", cfg->queue_length);
        return 0;
    }
    r->state = RQ_QUEUED;
    if (r->sse) {
        pthread_mutex_lock(&r->smu);
        r->sjob = 1;
        pthread_mutex_unlock(&r->smu);
    } else {
        MHD_suspend_connection(r->conn);
    }
    r->prev = s->qtail;
    r->next = NULL;
    if (s->qtail)
        s->qtail->next = r;
    else
        s->qhead = r;
    s->qtail = r;
    s->queued++;
    srv_metrics_queue_add(s->metrics, 1);
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 1;
}

/* Validate a dialogue request against the model and the token limit and queue it.
 * @return 1 when queued, 0 when a response was decided. */
static int submit_dialogue(srv_server *s, srv_req *r) {
    const srv_config *cfg = s->cfg;
    srv_error e = {0};
    srv_limits lim = {cfg->max_texts, cfg->max_new_tokens};
    if (srv_parse_dialogue(r->body, r->body_len, &lim, &r->dr, &e)) {
        respond_error(r, &e);
        return 0;
    }
    const srv_dialogue_req *q = &r->dr;
    srv_model *m = resolve_model(s, r, q->model, SRV_TASK_DIALOGUE);
    if (!m) return 0;
    r->model = m;
    if (resolve_dialogue_opts(r, m, cfg->max_new_tokens)) return 0;
    for (size_t j = 0; j < q->n_decoders; j++)
        if ((size_t)q->decoders[j] >= m->num_modes) {
            respond_fail(r, 422, "'decoders'[%zu]: model '%s' has no decoder %d (it has %zu: 0..%zu)", j,
                         m->cfg->name, q->decoders[j], m->num_modes, m->num_modes - 1);
            return 0;
        }
    nz_error ne = {0};
    if (alloc_ids(r, 1)) return 0;
    if (nz_dialogue_encode(m->dlg, q->turns, q->n_turns, &r->ids[0], &r->n_ids[0], &ne)) {
        respond_fail(r, 422, "'context': cannot tokenize: %s", ne.msg);
        return 0;
    }
    size_t n = r->n_ids[0];
    if (n - 1 > (size_t)cfg->max_input_tokens) { /* the model's own truncation applied, eos not counted */
        respond_fail(r, 422, "'context' has %zu tokens; the limit is %d", n - 1, cfg->max_input_tokens);
        return 0;
    }
    if (q->stream) {
        if (pthread_mutex_init(&r->smu, NULL)) {
            respond_fail(r, 500, "cannot create the event stream");
            return 0;
        }
        r->smu_init = 1;
        r->sse = 1;
    }
    return enqueue(s, r);
}

/* ------------------------------------------------------------------ HTTP */

/* @return the first model whose file changed under the server, or NULL. */
static const srv_model *lost_model(srv_server *s) {
    for (size_t i = 0; i < s->n_models; i++)
        if (atomic_load(&s->models[i].lost)) return &s->models[i];
    return NULL;
}

static int is_inference(srv_route r) { return r == SRV_ROUTE_TRANSLATE || r == SRV_ROUTE_DIALOGUE; }

/* Decisions possible before the body is read: method, route, auth, body size, draining. */
static void first_call(srv_server *s, srv_req *r, struct MHD_Connection *c, const char *method) {
    const srv_config *cfg = s->cfg;
    int get = !strcmp(method, "GET") || !strcmp(method, "HEAD");
    int post = !strcmp(method, "POST");
    if (atomic_load(&s->draining)) {
        r->close = 1;
        respond_fail(r, 503, "the server is shutting down");
        return;
    }
    if (r->route == SRV_ROUTE_OTHER || (r->route == SRV_ROUTE_METRICS && !cfg->metrics) ||
        (r->route == SRV_ROUTE_UI && (!cfg->ui || !srv_ui_find(r->path)))) {
        respond_fail(r, 404, "no route %.80s %.80s", method, r->path);
        return;
    }
    if (is_inference(r->route) ? !post : !get) {
        r->allow = is_inference(r->route) ? "POST" : "GET, HEAD";
        respond_fail(r, 405, "%s does not accept %.20s (allowed: %s)", r->path, method, r->allow);
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
            respond_fail(
                r, 401, key ? "invalid API key" : "missing API key (Authorization: Bearer KEY or X-API-Key)");
            return;
        }
    }
    if (!is_inference(r->route)) return;
    if (r->route == SRV_ROUTE_DIALOGUE) {
        size_t i = 0;
        while (i < cfg->n_models && cfg->models[i].task != SRV_TASK_DIALOGUE) i++;
        if (i == cfg->n_models) {
            respond_fail(r, 404,
                         "no dialogue model is configured (/v1/dialogue needs a model with task dialogue)");
            return;
        }
    }
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
    if (cl) {
        char *end;
        errno = 0;
        unsigned long long n = strtoull(cl, &end, 10);
        if (!errno && end != cl && n > cfg->max_body_bytes) {
            srv_metrics_rejected(s->metrics, "body_too_large");
            r->close = 1;
            respond_fail(r, 413, "request body of %llu bytes exceeds the limit of %zu", n,
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
        respond_json(r, 200, json_pack("{s:s}", "status", "ok"));
        return;
    case SRV_ROUTE_READY:
        if (ready == 1 && lost_model(s)) {
            const srv_model *m = lost_model(s);
            char msg[400];
            snprintf(msg, sizeof msg, "model '%s' is unavailable: its file %s changed under the server", m->cfg->name,
                     m->cfg->path);
            respond_json(r, 503,
                         json_pack("{s:s, s:{s:i, s:s, s:s}}", "status", "degraded", "error", "code", 503, "type",
                                   "not_ready", "message", msg));
        } else if (ready == 1) {
            respond_json(r, 200, json_pack("{s:s}", "status", "ready"));
        } else {
            char msg[sizeof s->load_err + 32] = "models are loading";
            if (ready < 0) /* load_err was written before ready became -1 */
                snprintf(msg, sizeof msg, "a model failed to load: %s", s->load_err);
            respond_json(r, 503,
                         json_pack("{s:s, s:{s:i, s:s, s:s}}", "status", ready < 0 ? "failed" : "loading",
                                   "error", "code", 503, "type", "not_ready", "message", msg));
        }
        return;
    case SRV_ROUTE_MODELS:
        respond_json(r, 200, models_json(s));
        return;
    case SRV_ROUTE_MEMORY:
        respond_json(r, 200, memory_json(s));
        return;
    case SRV_ROUTE_METRICS:
        respond_metrics(s, r);
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
        respond_fail(r, 503, "models are %s; retry when /ready answers 200",
                     ready < 0 ? "not loaded" : "loading");
        return;
    }
    if (r->route == SRV_ROUTE_DIALOGUE)
        submit_dialogue(s, r); /* queued: suspended, or streamed */
    else
        submit_translate(s, r); /* queued: suspended */
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

static enum MHD_Result queue_response(struct MHD_Connection *c, srv_req *r) {
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
    count_request(r, r->status);
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)r->status, resp);
    MHD_destroy_response(resp);
    return ok;
}

/* The event stream of a queued streamed request (200, text/event-stream, chunked): sse_read feeds it
 * from the worker's events. */
static enum MHD_Result queue_stream(struct MHD_Connection *c, srv_req *r) {
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, sse_read, r, NULL);
    if (!resp) return MHD_NO; /* the connection closes; on_completed cancels the job */
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream; charset=utf-8");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    MHD_add_response_header(resp, "X-Accel-Buffering", "no"); /* proxies: pass events on at once */
    enum MHD_Result ok = MHD_queue_response(c, MHD_HTTP_OK, resp);
    MHD_destroy_response(resp);
    return ok;
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
        r->route = srv_route_from_path(url);
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
        return r->responded && r->close ? queue_response(c, r) : MHD_YES;
    }
    if (*upload_size) {
        if (!r->responded) {
            size_t n = *upload_size;
            if (r->body_len + n > s->cfg->max_body_bytes) {
                srv_metrics_rejected(s->metrics, "body_too_large");
                r->close = 1;
                respond_fail(r, 413, "request body exceeds the limit of %zu bytes", s->cfg->max_body_bytes);
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
        if (r->sse && r->state != RQ_READ) return queue_stream(c, r); /* queued, streamed */
        if (r->state != RQ_READ)
            return MHD_YES; /* queued: a worker may already run it (state RUNNING/DONE) */
    }
    return queue_response(c, r);
}

/* The end of a request: access-log line, request metrics unless counted when its response was queued,
 * free. term_ok: the response was sent in full (else the access log says 499, the client left first). */
static void retire(srv_req *r, int term_ok) {
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
                (unsigned long long)(r->route == SRV_ROUTE_DIALOGUE ? r->dr.n_turns : r->tr.n), "batch_texts",
                SRV_KV_UINT, (unsigned long long)r->batch_texts, "stream", SRV_KV_INT, (long long)r->sse,
                "tokens_in", SRV_KV_UINT, (unsigned long long)r->tokens_in, "tokens_out", SRV_KV_UINT,
                (unsigned long long)r->tokens_out, NULL);
    /* after the log line: whoever sees the count (a 499) finds the line */
    count_request(r, status); /* no-op when the response was counted as it was queued */
    for (size_t i = 0; i < r->n_ids_alloc; i++) nz_free(r->ids[i]);
    nz_free(r->ids);
    nz_free(r->n_ids);
    srv_translate_req_free(&r->tr);
    srv_dialogue_req_free(&r->dr);
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
         * left, a write failed): cancel the job; its end (stream_close) retires the request */
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
    retire(r, ok);
}

static void mhd_log(void *cls, const char *fmt, va_list ap) {
    (void)cls;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r')) msg[--n] = 0;
    srv_log(SRV_LOG_WARN, "http", "message", SRV_KV_STR, msg, NULL);
}

/* ------------------------------------------------------------------ lifecycle */

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
    s->metrics = srv_metrics_create();
    s->cache = nz_cache_create(cfg->tile_cache_bytes);
    s->pool = nz_pool_create(cfg->worker_threads);
    s->nworkers = cfg->max_concurrent_requests;
    s->workers = nz_calloc((size_t)s->nworkers, sizeof *s->workers, NZ_MEM_OTHER);
    s->conns = srv_conns_create(cfg->read_timeout_ms * 1e-3);
    if (!s->models || !s->metrics || !s->cache || !s->pool || !s->workers || !s->conns) {
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
        MHD_OPTION_NOTIFY_COMPLETED, on_completed, s, MHD_OPTION_NOTIFY_CONNECTION, srv_conns_notify, s->conns,
        MHD_OPTION_CONNECTION_LIMIT,
        (unsigned)cfg->max_connections, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
        (unsigned)cfg->max_connections_per_client, MHD_OPTION_LISTEN_BACKLOG_SIZE, 1024u, MHD_OPTION_END);
    if (!s->mhd) {
        snprintf(err, errlen, "cannot listen on %s:%d (address in use, or not permitted)", cfg->host,
                 cfg->port);
        goto fail;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(s->mhd, MHD_DAEMON_INFO_BIND_PORT);
    s->port = di ? di->port : cfg->port;
    for (int i = 0; i < s->nworkers; i++) {
        if (pthread_create(&s->workers[i].thread, NULL, worker_main, &s->workers[i])) {
            snprintf(err, errlen, "cannot start worker threads");
            goto fail;
        }
        s->workers[i].started = 1;
    }
    if (pthread_create(&s->reaper, NULL, reaper_main, s)) {
        snprintf(err, errlen, "cannot start the reaper thread");
        goto fail;
    }
    s->reaper_started = 1;
    if (pthread_create(&s->loader, NULL, loader_main, s)) {
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
        sleep_ms(10);
        busy = atomic_load(&s->live);
    }
    /* grace over: cancel what is left */
    pthread_mutex_lock(&s->mu);
    int cancelled = s->queued + s->nrunning;
    while (s->qhead) {
        srv_req *r = s->qhead;
        list_remove(&s->qhead, &s->qtail, r);
        s->queued--;
        srv_metrics_queue_add(s->metrics, -1);
        respond_cancelled(r, CANCEL_SHUTDOWN);
        finish(r);
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
    /* let the resumed connections write their responses */
    for (int i = 0; i < 200 && atomic_load(&s->live) > 0; i++) sleep_ms(10);
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
    for (size_t i = 0; s->models && i < s->n_models; i++) {
        if (s->models[i].tr && s->cache)
            nz_cache_forget_model(s->cache, nz_translator_model(s->models[i].tr));
        if (s->models[i].dlg && s->cache)
            nz_cache_forget_model(s->cache, nz_dialogue_model(s->models[i].dlg));
        nz_translator_free(s->models[i].tr);
        nz_dialogue_free(s->models[i].dlg);
    }
    nz_free(s->models);
    nz_pool_free(s->pool);
    nz_cache_free(s->cache);
    srv_metrics_free(s->metrics);
    srv_conns_free(s->conns);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    nz_free(s);
}
