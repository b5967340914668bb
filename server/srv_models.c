/* srv_models — the served models: loading and readiness, the request memory pool, model lookup, the
 * /v1/models, /v1/memory and /metrics views. */
#include "srv_internal.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_weight.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

int srv_server_check_models(const srv_config *cfg, char *err, size_t errlen) {
    for (size_t i = 0; i < cfg->n_models; i++) {
        const srv_model_cfg *mc = &cfg->models[i];
        nz_error e = {0};
        if (nz_task_check_file(mc->task, mc->path, &e)) {
            snprintf(err, errlen, "model '%s': %s", mc->name, e.msg);
            return -1;
        }
    }
    return 0;
}

/* Size the request memory pool once the models are loaded: the budget less what the process holds now
 * (its resident set: code, the loaded models' headers and parameters, their mapped tiles) and what the
 * tile cache may grow to, less 5 % for the allocator's overhead.
 * @return 0, or -1 with load_err set when nothing would be left for requests. */
static int size_request_pool(srv_server *s) {
    nz_mem_report r;
    nz_mem_get_report(&r);
    const uint64_t lim = srv_config_memory_limit();
    s->memory_budget = s->cfg->memory_budget_bytes ? s->cfg->memory_budget_bytes : lim / 5 * 4;
    const uint64_t held = (uint64_t)r.rss + s->cfg->tile_cache_bytes + s->memory_budget / 20;
    if (!s->memory_budget || s->memory_budget <= held) {
        snprintf(s->load_err, sizeof s->load_err,
                 "memory_budget_bytes %llu leaves nothing for requests: the loaded process holds %llu bytes, "
                 "the tile cache may take %zu",
                 (unsigned long long)s->memory_budget, (unsigned long long)r.rss, s->cfg->tile_cache_bytes);
        return -1;
    }
    srv_budget_set_total(s->budget, s->memory_budget - held);
    s->idle_request_bytes = r.current[NZ_MEM_ACTIVATIONS] + r.current[NZ_MEM_KV];
    srv_log(SRV_LOG_INFO, "memory_budget", "budget_bytes", SRV_KV_UINT, (unsigned long long)s->memory_budget,
            "resident_bytes", SRV_KV_UINT, (unsigned long long)r.rss, "tile_cache_bytes", SRV_KV_UINT,
            (unsigned long long)s->cfg->tile_cache_bytes, "request_pool_bytes", SRV_KV_UINT,
            (unsigned long long)(s->memory_budget - held), NULL);
    return 0;
}

/* Take m out of service for the reason fmt...: its requests and /ready answer 503 with it.
 * @return 1 the first time (the caller logs it), 0 when it was lost already. */
static int lose_model(srv_model *m, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int lose_model(srv_model *m, const char *fmt, ...) {
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER; /* one writer of why per model */
    pthread_mutex_lock(&mu);
    int first = !atomic_load(&m->lost);
    if (first) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(m->why, sizeof m->why, fmt, ap);
        va_end(ap);
        atomic_store(&m->lost, 1); /* after why: readers test lost first */
    }
    pthread_mutex_unlock(&mu);
    return first;
}

void *srv_loader_main(void *arg) {
    srv_server *s = arg;
    const char *delay = getenv("NZSERVE_DEBUG_LOAD_DELAY_MS"); /* test hook: a slow model load */
    if (delay && atoi(delay) > 0) {
        int ms = atoi(delay);
        for (int t = 0; t < ms && !atomic_load(&s->draining); t += 10) srv_sleep_ms(10);
    }
    for (size_t i = 0; i < s->n_models && !atomic_load(&s->draining); i++) {
        srv_model *sm = &s->models[i];
        double t0 = nz_now_s();
        nz_error e = {0};
        nz_task_info info;
        void *impl = NULL;
        if (nz_task_open(sm->cfg->task, sm->cfg->path, s->cfg->verify_on_load, &impl, &info, &e)) {
            /* this model is not served; the others are */
            lose_model(sm, "failed to load: %s", e.msg);
            srv_log(SRV_LOG_ERROR, "load_failed", "model", SRV_KV_STR, sm->cfg->name, "path", SRV_KV_STR,
                    sm->cfg->path, "error", SRV_KV_STR, e.msg, NULL);
            continue;
        }
        sm->info = info;
        sm->impl = impl;
        srv_log(SRV_LOG_INFO, "model_loaded", "model", SRV_KV_STR, sm->cfg->name, "path", SRV_KV_STR,
                sm->cfg->path, "architecture", SRV_KV_STR, info.architecture, "weight_mode", SRV_KV_STR,
                info.mode, "compressed_bytes", SRV_KV_UINT, (unsigned long long)info.compressed_bytes,
                "decoded_equivalent_bytes", SRV_KV_UINT, (unsigned long long)info.decoded_bytes, "load_ms",
                SRV_KV_DBL, (nz_now_s() - t0) * 1e3, NULL);
    }
    if (!atomic_load(&s->draining) && size_request_pool(s)) {
        atomic_store(&s->ready, -1);
        return NULL;
    }
    if (!atomic_load(&s->draining)) {
        atomic_store(&s->ready, 1);
        srv_log(SRV_LOG_INFO, "ready", "models", SRV_KV_UINT, (unsigned long long)s->n_models, "startup_ms",
                SRV_KV_DBL, (nz_now_s() - s->t_start) * 1e3, NULL);
    }
    return NULL;
}

static srv_model *find_model(srv_server *s, const char *name, const nz_task *task) {
    for (size_t i = 0; i < s->n_models; i++)
        if (name ? !strcmp(s->models[i].cfg->name, name) : s->models[i].cfg->task == task)
            return &s->models[i];
    return NULL;
}

/* A job of model m failed with e: log it; when a read of its file faulted (the file was truncated or
 * rewritten in place), the model is lost: logged once, /ready answers 503 and its requests 503.
 * @return the status to answer: 503 for a lost model, else 500. */
int srv_job_failed(srv_model *m, const nz_error *e) {
    srv_log(SRV_LOG_ERROR, "inference_failed", "model", SRV_KV_STR, m->cfg->name, "error", SRV_KV_STR, e->msg,
            NULL);
    if (!nz_task_faulted(m->cfg->task, m->impl)) return 500;
    if (lose_model(m,
                   "its file %s changed under the server (truncated or rewritten in place); restart the "
                   "server (replace model files by renaming a new file over the old one)",
                   m->cfg->path))
        srv_log(SRV_LOG_ERROR, "model_file_changed", "model", SRV_KV_STR, m->cfg->name, "path", SRV_KV_STR,
                m->cfg->path, "action", SRV_KV_STR, "not served until the server restarts", NULL);
    return 503;
}

/* The model a request names (or the first of its task): NULL after answering 404 (none), 422 (another
 * task) or 503 (its file changed under the server). */
srv_model *srv_resolve_model(srv_server *s, srv_req *r, const char *name) {
    const nz_task *task = r->h->task;
    srv_model *m = find_model(s, name, task);
    if (!m) {
        if (name)
            srv_respond_fail(r, 404, "model '%.100s' not found", name);
        else
            srv_respond_fail(r, 404, "no %s model is configured", task->noun);
        return NULL;
    }
    if (m->cfg->task != task) {
        srv_respond_fail(r, 422, "model '%s' serves %s, not %s", m->cfg->name, srv_task_name(m->cfg->task),
                         srv_task_name(task));
        return NULL;
    }
    if (atomic_load(&m->lost)) {
        srv_respond_fail(r, 503, "model '%s' is unavailable: %s", m->cfg->name, m->why);
        return NULL;
    }
    return m;
}

/* @return the first model whose file changed under the server, or NULL. */
const srv_model *srv_lost_model(srv_server *s) {
    for (size_t i = 0; i < s->n_models; i++)
        if (atomic_load(&s->models[i].lost)) return &s->models[i];
    return NULL;
}

json_t *srv_models_json(srv_server *s) {
    json_t *arr = json_array();
    nz_cache_stats cs;
    nz_cache_get_stats(s->cache, &cs);
    int ready = atomic_load(&s->ready) == 1;
    for (size_t i = 0; i < s->n_models; i++) {
        srv_model *m = &s->models[i];
        int loaded = ready || m->impl; /* the loader fills models in order */
        const int lost = atomic_load(&m->lost);
        json_t *o = json_pack("{s:s, s:s, s:s, s:b, s:b}", "name", m->cfg->name, "task",
                              srv_task_name(m->cfg->task), "path", m->cfg->path, "loaded",
                              loaded && ready && m->impl, "available", loaded && ready && !lost);
        if (lost) json_object_set_new(o, "error", json_string(m->why));
        if (ready && m->impl) {
            const nz_task_info *in = &m->info;
            json_object_set_new(o, "architecture", json_string(in->architecture));
            json_object_set_new(o, "weight_mode", json_string(in->mode));
            json_object_set_new(o, "parameters", json_integer((json_int_t)in->params));
            json_object_set_new(o, "compressed_bytes", json_integer((json_int_t)in->compressed_bytes));
            json_object_set_new(o, "source_bytes", json_integer((json_int_t)in->source_bytes));
            json_object_set_new(o, "decoded_equivalent_bytes", json_integer((json_int_t)in->decoded_bytes));
            json_object_set_new(
                o, "ratio",
                json_real(in->source_bytes ? (double)in->compressed_bytes / (double)in->source_bytes : 0.0));
            json_object_set_new(
                o, "bits_per_weight",
                json_real(in->params ? 8.0 * (double)in->compressed_bytes / (double)in->params : 0.0));
            json_t *facts = m->cfg->task->describe(m->impl); /* the task's own: generation defaults, limits */
            if (facts) json_object_update(o, facts);
            json_decref(facts);
        }
        json_array_append_new(arr, o);
    }
    return json_pack("{s:o, s:{s:I, s:b, s:I}}", "models", arr, "tile_cache", "budget_bytes",
                     (json_int_t)cs.budget, "shared", 1, "bytes", (json_int_t)cs.bytes);
}

/* What /v1/memory and /metrics report, read at one moment. */
typedef struct snapshot {
    nz_mem_report mem;
    nz_cache_stats cache;
    uint64_t uncached_tiles, uncached_ns; /* tiles decoded without the cache, and the time it took */
    srv_budget_stats budget;
    int ready;
} snapshot;

static void take_snapshot(srv_server *s, snapshot *x) {
    nz_mem_get_report(&x->mem);
    nz_cache_get_stats(s->cache, &x->cache);
    nz_weight_uncached_stats(&x->uncached_tiles, &x->uncached_ns);
    srv_budget_get_stats(s->budget, &x->budget);
    x->ready = atomic_load(&s->ready) == 1;
}

json_t *srv_memory_json(srv_server *s) {
    snapshot x;
    take_snapshot(s, &x);
    const nz_mem_report r = x.mem;
    const nz_cache_stats cs = x.cache;
    const uint64_t ut = x.uncached_tiles, uns = x.uncached_ns;
    json_t *models = json_array();
    int ready = x.ready;
    for (size_t i = 0; ready && i < s->n_models; i++) {
        srv_model *m = &s->models[i];
        json_array_append_new(models,
                              json_pack("{s:s, s:s, s:I, s:I, s:f}", "name", m->cfg->name, "weight_mode",
                                        m->info.mode, "compressed_bytes",
                                        (json_int_t)m->info.compressed_bytes, "decoded_equivalent_bytes",
                                        (json_int_t)m->info.decoded_bytes, "decoded_over_compressed",
                                        m->info.compressed_bytes
                                            ? (double)m->info.decoded_bytes / (double)m->info.compressed_bytes
                                            : 0.0));
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
    const srv_budget_stats bs = x.budget;
    json_object_set_new(j, "requests",
                        json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "budget_bytes",
                                  (json_int_t)s->memory_budget, "pool_bytes", (json_int_t)bs.total,
                                  "reserved_bytes", (json_int_t)bs.reserved, "peak_reserved_bytes",
                                  (json_int_t)bs.peak, "waiting", (json_int_t)bs.waiting, "waits",
                                  (json_int_t)bs.waits, "overrun_bytes", (json_int_t)bs.overrun));
    return j;
}

void srv_respond_metrics(srv_server *s, srv_req *r) {
    snapshot x;
    take_snapshot(s, &x);
    const nz_mem_report mr = x.mem;
    const nz_cache_stats cs = x.cache;
    const uint64_t ut = x.uncached_tiles, uns = x.uncached_ns;
    const int ready = x.ready;
    srv_model_gauges mg[s->n_models ? s->n_models : 1];
    size_t nm = 0;
    for (size_t i = 0; ready && i < s->n_models; i++)
        mg[nm++] = (srv_model_gauges){s->models[i].cfg->name, s->models[i].info.compressed_bytes,
                                      s->models[i].info.decoded_bytes};
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
    g.allocator_free_bytes = mr.allocator_free_resident;
    g.code_resident_bytes = mr.code_resident;
    g.tiles_decoded_total = cs.tiles_decoded + ut;
    g.tile_cache_hits_total = cs.hits;
    g.tile_cache_misses_total = cs.misses;
    g.tile_cache_evictions_total = cs.evictions;
    g.tile_decode_seconds_total = (double)(cs.decode_ns + uns) * 1e-9;
    const srv_budget_stats bs = x.budget;
    g.memory_budget_bytes = s->memory_budget;
    g.request_memory_pool_bytes = bs.total;
    g.request_memory_reserved_bytes = bs.reserved;
    g.request_memory_waits_total = bs.waits;
    g.request_memory_overrun_bytes = bs.overrun;
    g.ready = ready;
    g.uptime_seconds = nz_now_s() - s->t_start;
    char *text = NULL;
    size_t len = 0;
    if (srv_metrics_render(s->metrics, &g, &text, &len)) {
        srv_respond_fail(r, 500, "out of memory rendering the metrics");
        return;
    }
    char *b = nz_malloc(len + 1, NZ_MEM_OTHER);
    if (b) memcpy(b, text, len + 1);
    free(text);
    if (!b) {
        srv_respond_fail(r, 500, "out of memory rendering the metrics");
        return;
    }
    srv_respond_body(r, 200, b, len);
}
