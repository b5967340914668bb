/*
 * srv_internal.h — what the server's files share (not a public API): the
 * served models, a request's state, workers and the server itself, and the
 * functions one file calls in another.
 *
 *   srv_server.c     libmicrohttpd callbacks and the lifecycle
 *   srv_respond.c    responses, errors, server-sent events
 *   srv_sched.c      queue, workers, batching, deadlines and cancellation, memory reservations
 *   srv_models.c     model loading, readiness, lookup, /v1/models, /v1/memory, /metrics
 *   srv_handlers.c   the served tasks' request handlers (the list a new task joins)
 *   srv_translate.c  the /v1/translate handler
 *   srv_dialogue.c   the /v1/dialogue handler
 *
 * The scheduler, the HTTP side and the model views know a task only through its srv_handler (and the
 * models' nz_task descriptor, models/nz_task.h); only a task's handler file calls its model family's API.
 */
#ifndef SRV_INTERNAL_H
#define SRV_INTERNAL_H

#include "srv_server.h"

#include "srv_api.h"
#include "srv_budget.h"
#include "srv_conn.h"
#include "srv_log.h"
#include "srv_metrics.h"
#include "srv_text.h"
#include "srv_ui.h"

#include "nz_pool.h"
#include "nz_task.h"
#include "nz_weight.h"

#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

/** One configured model and what the server knows about it. */
typedef struct srv_model {
    const srv_model_cfg *cfg; /* name, path, task (borrowed from the config) */
    void *impl;        /* the loaded model (cfg->task's: nz_translator, nz_dialogue), set once loaded */
    nz_task_info info; /* its sizes, weight mode and architecture (set with impl) */
    atomic_int lost;   /* not served: it failed to load, or its file changed under the server */
    char why[400];     /* why it is lost (written before lost is set) */
} srv_model;

enum { RQ_READ = 0, RQ_QUEUED, RQ_RUNNING, RQ_DONE };
enum { CANCEL_NONE = 0, CANCEL_CLIENT, CANCEL_DEADLINE, CANCEL_SHUTDOWN };

/** Per-request state: created on the first callback, freed in on_completed (srv_retire) — or, for a
 *  streamed request whose connection ended while its job still ran, by the job's end (srv_stream_close). */
typedef struct srv_req {
    srv_server *s;
    struct MHD_Connection *conn;
    srv_route route;
    const struct srv_handler *h; /* an inference route's handler, else NULL */
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
    const char *allow;         /* Allow header for 405 */
    const srv_ui_asset *asset; /* a playground file to answer with (static, instead of resp) */
    int retry_after;           /* seconds, 0: no header */
    int close;                 /* Connection: close */
    void *task;         /* the handler's own state of the request (parsed body, options; h->free_req) */
    int32_t **ids;      /* [n_ids_alloc] the inputs, tokenized once when validated (NZ_MEM_OTHER) */
    size_t *n_ids;      /* [n_ids_alloc] their lengths */
    size_t n_ids_alloc; /* entries of ids / n_ids */
    srv_model *model;
    atomic_int fd;     /* the client socket, for disconnect checks (-1 once the connection ended) */
    atomic_int cancel; /* CANCEL_* */
    uint64_t tokens_in, tokens_out;
    int counted;                 /* in the request metrics already (srv_count_request) */
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
    /* the continuous batch it runs (under s->mu): requests that join it are left in the queue for it */
    const struct srv_model *cont_model;
    const struct srv_handler *cont_h;
} srv_worker;

struct srv_server {
    const srv_config *cfg;
    srv_model *models; /* [n_models] */
    size_t n_models;
    srv_metrics *metrics;
    nz_tile_cache *cache; /* shared by every model */
    nz_pool *pool;        /* compute threads, shared by the workers */
    struct MHD_Daemon *mhd;
    srv_conns *conns;            /* read deadlines of the open connections */
    srv_budget *budget;          /* memory that running requests reserve (sized once the models are loaded) */
    uint64_t memory_budget;      /* the process's budget in bytes (config, or 80 % of the machine / cgroup) */
    uint64_t idle_request_bytes; /* activations + KV caches held when the pool was sized (no request yet) */
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

#define SRV_BATCH_MAX 64 /* requests decoded together */

#define SRV_BATCH_SCAN 64 /* queue entries looked at for batch mates */

/* After a job, malloc's free memory beyond this goes back to the OS (nz_mem_trim): a large request's
 * activations and KV caches must not keep the RSS at its peak (glibc keeps freed heap otherwise). */
#define SRV_TRIM_FREE_BYTES (8u << 20)

static inline void srv_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/** Requests decoded together: same model, same decoding options. */
typedef struct srv_batch {
    srv_server *s;
    srv_req *m[SRV_BATCH_MAX]; /* members, in queue order; NULL once released early */
    size_t n;
    size_t live; /* members not released */
} srv_batch;

/** Continuous batching of a task (srv_handler.cont): the scheduler's loop (srv_run_continuous) runs one
 *  step of every member at a time, answering finished members and taking in queued requests that join
 *  between steps. The state is the task's (nz_dlg_batch, nz_tr_batch). */
typedef struct srv_cont_ops {
    /** Whether r is served continuously. */
    int (*joins)(const srv_req *r);
    /** @return a new empty batch for lead's model, or NULL with e set. */
    void *(*create)(const srv_req *lead, nz_error *e);
    /** Free a batch (its remaining members are the caller's). Accepts NULL. */
    void (*free)(void *c);
    /** @return the memory r reserves while it is in a batch (its estimated share). */
    uint64_t (*estimate)(const srv_req *r);
    /** NULL, or the most memory batch c (NULL: a batch not created yet) can hold from now until its
     *  members are done if nobody else joins, with join (NULL: nobody) joining now: its shared caches at
     *  the capacities they can grow to (they never shrink before free) and its steps' buffers. The
     *  scheduler keeps the larger of this and the members' estimates reserved. */
    uint64_t (*bound)(const void *c, const srv_req *join);
    /** NULL, or r's estimate now that it is in batch c (after a step: e.g. once its output lengths are
     *  known); the scheduler gives back what r reserved beyond it. */
    uint64_t (*estimate_now)(const void *c, const srv_req *r);
    /** r joins at the next step. @return NZ_OK, or an error (r's response then decided). */
    int (*add)(void *c, srv_req *r);
    /** One step of every member (failures end up in the members' results). */
    void (*step)(void *c, nz_matmul_ctx *mc);
    /** @return a finished member with its response decided (it has left the batch), or NULL. */
    srv_req *(*take)(void *c);
    /** r leaves now (cancelled). */
    void (*remove)(void *c, srv_req *r);
    /** @return members in the batch. */
    size_t (*size)(const void *c);
} srv_cont_ops;

/** A served task's request handler (srv_translate.c, srv_dialogue.c): the scheduler and the HTTP side
 *  know tasks only through it. Adding a task: its model family and nz_task descriptor in models/, one
 *  handler file here, and its handler in the list in srv_handlers.c. */
typedef struct srv_handler {
    const char *path;    /* its route, e.g. "/v1/translate" (POST) */
    const nz_task *task; /* the models it serves (a model's configured task) */
    /** Parse and validate r's body (its state in r->task), resolve its model (srv_resolve_model) and
     *  options, tokenize (srv_alloc_ids), check limits and memory (srv_refuse_oversized), then queue it
     *  (srv_enqueue). @return 1 when queued, 0 when a response was decided. */
    int (*submit)(srv_server *s, srv_req *r);
    /** NULL: every request is a job of its own. Else whether queued b can join a batch led by a. */
    int (*batchable)(const srv_req *a, const srv_req *b);
    /** The units of r counted against max_texts when batching. */
    size_t (*units)(const srv_req *r);
    /** The inputs of r (texts, turns) for the access log. */
    size_t (*texts)(const srv_req *r);
    /** Name input i of r in a message, e.g. "'texts'[2]", into buf[n]. */
    void (*label)(const srv_req *r, size_t i, char *buf, size_t n);
    /** Run the batch b (one member without batchable) and decide the response of every member still in
     *  it (members may be released early, srv_release_member). */
    void (*run)(srv_worker *w, srv_batch *b);
    /** Continuous batching, or NULL: batches whose first member joins run through srv_run_continuous
     *  (batchable must then group only such requests together). */
    const srv_cont_ops *cont;
    /** Free r->task (set or not). */
    void (*free_req)(srv_req *r);
} srv_handler;

/* srv_handlers.c */

/** The served tasks' handlers: handler i answers route SRV_ROUTE_TASK + i. */
extern const srv_handler *const SRV_HANDLERS[];
extern const size_t SRV_N_HANDLERS;

/** @return the handler of an inference route, or NULL for other routes. */
const srv_handler *srv_handler_for(srv_route r);

/** @return the handler serving task t, or NULL. */
const srv_handler *srv_handler_of_task(const nz_task *t);

/* srv_respond.c */

/* Count r once in the request metrics (requests, duration, tokens) with the given status. Called just
 * before r's response is queued, so whatever a client reads after its response (/metrics) includes it;
 * retire counts a request that never got that far (the client left first: 499). */
void srv_count_request(srv_req *r, int status);

/* A JSON string of s[0..n), replacing invalid UTF-8 with U+FFFD. */
json_t *srv_json_text(const char *s, size_t n);

enum MHD_Result srv_queue_response(struct MHD_Connection *c, srv_req *r);

/* The event stream of a queued streamed request (200, text/event-stream, chunked): sse_read feeds it
 * from the worker's events. */
enum MHD_Result srv_queue_stream(struct MHD_Connection *c, srv_req *r);

/* Decide the response of r: status and a body (nz_malloc'd via jansson or ours). */
void srv_respond_body(srv_req *r, int status, char *body, size_t len);

/* The response of a request stopped by reason (CANCEL_*). */
void srv_respond_cancelled(srv_req *r, int reason);

void srv_respond_error(srv_req *r, const srv_error *e);
void srv_respond_fail(srv_req *r, int status, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

void srv_respond_json(srv_req *r, int status, json_t *j);

/* Worker side: add an event and wake the connection if sse_read suspended it for want of data. */
void srv_sse_push(srv_req *r, const char *event, const char *data, size_t len);

/* The job of a streamed request is over: its decided response (status 200: the full JSON response,
 * else the error body) becomes the last event, "done" or "error", and the stream ends after it. The
 * queue / worker lets go of r here: if the connection already ended, r is retired now, else
 * on_completed retires it when the stream has been sent. r must not be touched after. */
void srv_stream_close(srv_req *r);

/* srv_sched.c */

/* Room for n tokenized inputs of r (freed by srv_retire). @return 0, or -1 with a 500 response decided. */
int srv_alloc_ids(srv_req *r, size_t n);

/* The stop hook of a batch: a member that was cancelled, passed its deadline or lost its client
 * is answered and released at once (its ids are no longer read: nz_translator_run_ids reads
 * them only before its first stop check); the batch stops when no member is left. */
int srv_batch_all_stopped(void *arg);

int srv_batch_should_stop(void *arg);

/* Queue r for a worker (429 when the queue is full). A plain request's connection is suspended until
 * srv_finish(); a streamed one (r->sse) keeps its connection: its event stream is queued by on_request and
 * the queue / worker holds r until stream_close.
 * @return 1 when queued, 0 when a response was decided. */
int srv_enqueue(srv_server *s, srv_req *r);

/* Hand a finished request back to libmicrohttpd (a streamed one: its decided response becomes the
 * stream's last event). r must not be touched after. */
void srv_finish(srv_req *r);

/* Unlink r from a doubly linked list. Caller holds s->mu. */
void srv_list_remove(srv_req **head, srv_req **tail, srv_req *r);

/* Completes queued requests whose deadline passed or whose client left; stops running jobs whose every
 * request did (cancel_stopped_jobs). */
void *srv_reaper_main(void *arg);

/* A job estimated to need est bytes at its peak (input i of r) can never run when est exceeds the request
 * pool: answer 413 naming the limit. @return 1 when refused. */
int srv_refuse_oversized(srv_server *s, srv_req *r, uint64_t est, size_t i);

/* Answer member i of b with its cancellation and hand it back now; the batch goes on without it. */
void srv_release_member(srv_batch *b, size_t i);

/* Hand member i of b back now with the response decided for it; the batch goes on without it. */
void srv_complete_member(srv_batch *b, size_t i);

/* Run b (members of one model that h->cont->joins) as a continuous batch: each step serves every member;
 * finished members are answered at once, stopped ones (deadline, client gone, shutdown) leave at once, and
 * queued requests of the same route and model that join are taken in between, from the head of the queue
 * up to the first that cannot (first come, first served: a request of another kind is not overtaken, so
 * a long batch cannot starve it). Each member reserves its estimate while in the batch. */
void srv_run_continuous(srv_worker *w, srv_batch *b, const srv_handler *h);

/* Whether a running request should stop: cancelled, past its deadline, or its client left
 * (sets r->cancel to the reason). */
int srv_req_should_stop(srv_req *r);

/* req_should_stop as a hook (waiting for memory). */
int srv_req_stop_hook(void *arg);

void *srv_worker_main(void *arg);

/* srv_models.c */

/* A job of model m failed with e: log it; when a read of its file faulted (the file was truncated or
 * rewritten in place), the model is lost: logged once, /ready answers 503 and its requests 503.
 * @return the status to answer: 503 for a lost model, else 500. */
int srv_job_failed(srv_model *m, const nz_error *e);

void *srv_loader_main(void *arg);

/* ------------------------------------------------------------------ HTTP */

/* @return the first model whose file changed under the server, or NULL. */
const srv_model *srv_lost_model(srv_server *s);

json_t *srv_memory_json(srv_server *s);

/* ------------------------------------------------------------------ GET endpoints */

json_t *srv_models_json(srv_server *s);

/* The model a request names (or the first of its handler's task): NULL after answering 404 (none), 422
 * (another task) or 503 (its file changed under the server). */
srv_model *srv_resolve_model(srv_server *s, srv_req *r, const char *name);

void srv_respond_metrics(srv_server *s, srv_req *r);

/* srv_translate.c */

/* srv_dialogue.c */

/* srv_server.c */

/* The end of a request: access-log line, request metrics unless counted when its response was queued,
 * free. term_ok: the response was sent in full (else the access log says 499, the client left first). */
void srv_retire(srv_req *r, int term_ok);

#endif /* SRV_INTERNAL_H */
