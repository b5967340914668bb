/*
 * srv_metrics.h — the server's metrics, rendered in the Prometheus text
 * exposition format 0.0.4 for GET /metrics.
 *
 * Request counters and histograms are recorded by the HTTP and worker
 * threads (every function is thread-safe); memory and tile-cache figures
 * are sampled by the caller at scrape time and passed to srv_metrics_render
 * as a srv_gauges.
 *
 * Families (each with one # HELP and one # TYPE line, in this order):
 *   nzserve_requests_total{route,status}                counter (label sets seen so far)
 *   nzserve_request_duration_seconds{route}             histogram (routes seen so far)
 *   nzserve_input_tokens_total{route}                   counter   (routes seen so far)
 *   nzserve_output_tokens_total{route}                  counter   (routes seen so far)
 *   nzserve_queue_wait_seconds                          histogram
 *   nzserve_queue_depth, nzserve_requests_in_flight     gauges
 *   nzserve_rejected_total{reason}                      counter (every known reason, 0 included)
 *   nzserve_weights_compressed_bytes{model}             gauge
 *   nzserve_weights_decoded_equivalent_bytes{model}     gauge
 *   nzserve_tile_cache_bytes, nzserve_tile_cache_limit_bytes, nzserve_kv_cache_bytes,
 *   nzserve_scratch_bytes, nzserve_activations_bytes, nzserve_resident_memory_bytes,
 *   nzserve_resident_memory_peak_bytes, nzserve_mapped_resident_bytes     gauges
 *   nzserve_tiles_decoded_total, nzserve_tile_cache_hits_total, nzserve_tile_cache_misses_total,
 *   nzserve_tile_cache_evictions_total, nzserve_tile_decode_seconds_total counters
 *   nzserve_ready, nzserve_uptime_seconds               gauges
 *
 * Histogram buckets (seconds): 0.001 0.0025 0.005 0.01 0.025 0.05 0.1 0.25
 * 0.5 1 2.5 5 10 30 +Inf.
 */
#ifndef SRV_METRICS_H
#define SRV_METRICS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** The route label of a request: the fixed routes, then one per served task (SRV_ROUTE_TASK + i is
 *  the route of the i-th task path given to srv_metrics_create). */
enum {
    SRV_ROUTE_HEALTH = 0,
    SRV_ROUTE_READY,
    SRV_ROUTE_MODELS,
    SRV_ROUTE_MEMORY,
    SRV_ROUTE_METRICS,
    SRV_ROUTE_UI,
    SRV_ROUTE_OTHER,
    SRV_ROUTE_TASK /* the first task's route */
};
typedef int srv_route;

#define SRV_ROUTE_MAX_TASKS 8                                      /* task routes a registry can hold */
#define SRV_ROUTE_COUNT     (SRV_ROUTE_TASK + SRV_ROUTE_MAX_TASKS) /* routes at most */

typedef struct srv_metrics srv_metrics;

/** @return a new, zeroed metrics registry whose task routes are task_paths[0..n_tasks) (e.g.
 *  "/v1/translate"; borrowed: they must outlive it), or NULL when out of memory or n_tasks exceeds
 *  SRV_ROUTE_MAX_TASKS. */
srv_metrics *srv_metrics_create(const char *const *task_paths, size_t n_tasks);

/** @return the routes m labels: SRV_ROUTE_TASK + its task paths. */
int srv_metrics_routes(const srv_metrics *m);

/** @return the route's label: "/health", "/ready", "/v1/models", "/v1/memory", "/metrics", "/ui" (the
 *  playground: "/" and every path under "/ui/"), "other", or a task's path; "other" for out-of-range
 *  values. */
const char *srv_metrics_route_label(const srv_metrics *m, srv_route r);

/** Map a request path (a query string after '?' is ignored) to its route.
 *  @return the route whose label equals the path, SRV_ROUTE_UI for "/" and
 *  "/ui/...", else SRV_ROUTE_OTHER. */
srv_route srv_metrics_route(const srv_metrics *m, const char *path);

/** Free the registry. Accepts NULL.
 *  @return nothing. */
void srv_metrics_free(srv_metrics *m);

/** Record one finished request: its route (out of range: SRV_ROUTE_OTHER),
 *  HTTP status (100..599; anything else is counted as status="other"),
 *  seconds from arrival to response queued (negative or non-finite: 0), and
 *  tokens in/out (0 if n/a).
 *  @return nothing. */
void srv_metrics_observe(srv_metrics *m, srv_route r, int status, double seconds, uint64_t tokens_in,
                         uint64_t tokens_out);

/** Add delta (may be negative) to the number of requests being executed by
 *  workers.
 *  @return nothing. */
void srv_metrics_inflight_add(srv_metrics *m, int delta);

/** Add delta (may be negative) to the number of requests waiting for a
 *  worker.
 *  @return nothing. */
void srv_metrics_queue_add(srv_metrics *m, int delta);

/** Record the time a request spent queued (negative or non-finite: 0).
 *  @return nothing. */
void srv_metrics_queue_wait(srv_metrics *m, double seconds);

/** Count one rejected request under nzserve_rejected_total{reason}. Known
 *  reasons: "queue_full", "body_too_large", "unauthorized", "deadline",
 *  "cancelled", "shutdown", "not_ready", "bad_request"; anything else
 *  (NULL included) counts as "other".
 *  @return nothing. */
void srv_metrics_rejected(srv_metrics *m, const char *reason);

/** @return the current queue depth (sum of srv_metrics_queue_add deltas). */
int srv_metrics_queue_depth(const srv_metrics *m);

/** @return the current in-flight count (sum of srv_metrics_inflight_add
 *  deltas). */
int srv_metrics_inflight(const srv_metrics *m);

/** Per-model weight sizes, sampled at scrape time. */
typedef struct srv_model_gauges {
    const char *name; /* label value (escaped on output; NULL: "") */
    uint64_t compressed_bytes, decoded_equivalent_bytes;
} srv_model_gauges;

/** Process-wide figures sampled at scrape time, supplied by the caller. */
typedef struct srv_gauges {
    const srv_model_gauges *models;
    size_t n_models;
    uint64_t tile_cache_bytes, tile_cache_limit_bytes, kv_cache_bytes, scratch_bytes, activations_bytes,
        resident_bytes, resident_peak_bytes, mapped_resident_bytes, allocator_free_bytes, code_resident_bytes;
    uint64_t tiles_decoded_total, tile_cache_hits_total, tile_cache_misses_total, tile_cache_evictions_total;
    double tile_decode_seconds_total;
    /* memory admission (srv_budget.h): the process budget, the part requests may reserve, reserved now,
     * reservations that waited, most bytes seen in use beyond the reservations */
    uint64_t memory_budget_bytes, request_memory_pool_bytes, request_memory_reserved_bytes,
        request_memory_waits_total, request_memory_overrun_bytes;
    int ready; /* nonzero: nzserve_ready 1 */
    double uptime_seconds;
} srv_gauges;

/** Render every family in Prometheus text format 0.0.4 (Content-Type
 *  "text/plain; version=0.0.4; charset=utf-8") into a malloc'd
 *  NUL-terminated buffer; the caller frees *out. g = NULL renders the
 *  sampled families as zeros.
 *  @return 0 with *out and *len (bytes, NUL excluded) set, or -1 (out of
 *  memory; *out = NULL, *len = 0). */
int srv_metrics_render(const srv_metrics *m, const srv_gauges *g, char **out, size_t *len);

#ifdef __cplusplus
}
#endif

#endif
