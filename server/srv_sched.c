/* srv_sched — the scheduler: the bounded queue, the workers that run jobs (batching requests a
 * handler can decode together), deadlines, disconnects and cancellation (the reaper), memory reservations. */
#include "srv_internal.h"

#include "nz_alloc.h"
#include "nz_weight.h"

#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

/* Whether the client of r closed its side (poll without waiting). */
static int client_gone(int fd) {
    if (fd < 0) return 0;
    struct pollfd p = {fd, POLLRDHUP, 0};
    if (poll(&p, 1, 0) <= 0) return 0;
    return (p.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0;
}

/* Whether a running request should stop: cancelled, past its deadline, or its client left
 * (sets r->cancel to the reason). */
int srv_req_should_stop(srv_req *r) {
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

/* req_should_stop as a hook (waiting for memory). */
int srv_req_stop_hook(void *arg) { return srv_req_should_stop(arg); }

/* The stop hook of a batch: a member that was cancelled, passed its deadline or lost its client
 * is answered and released at once (its ids are no longer read: nz_translator_run_ids reads
 * them only before its first stop check); the batch stops when no member is left. */
int srv_batch_all_stopped(void *arg) {
    srv_batch *b = arg;
    for (size_t i = 0; i < b->n; i++)
        if (b->m[i] && srv_req_should_stop(b->m[i])) srv_release_member(b, i);
    return b->live == 0;
}

int srv_batch_should_stop(void *arg) {
    srv_batch *b = arg;
    for (int t = 0; t < b->s->debug_step_delay_ms; t += 5) srv_sleep_ms(5);
    return srv_batch_all_stopped(b);
}

/* Unlink r from a doubly linked list. Caller holds s->mu. */
void srv_list_remove(srv_req **head, srv_req **tail, srv_req *r) {
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
void srv_finish(srv_req *r) {
    r->t_end = nz_now_s();
    if (r->sse) {
        srv_stream_close(r);
        return;
    }
    r->state = RQ_DONE;
    MHD_resume_connection(r->conn);
}

/* Move r from the queue to the running list. Caller holds s->mu. */
static void start_running(srv_server *s, srv_req *r) {
    srv_list_remove(&s->qhead, &s->qtail, r);
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
    srv_list_remove(&s->running, NULL, r);
    s->nrunning--;
    srv_metrics_inflight_add(s->metrics, -1);
    pthread_mutex_unlock(&s->mu);
}

/* Answer member i of b with its cancellation and hand it back now; the batch goes on without it. */
void srv_release_member(srv_batch *b, size_t i) {
    srv_req *r = b->m[i];
    srv_respond_cancelled(r, atomic_load(&r->cancel));
    stop_running(b->s, r);
    b->m[i] = NULL;
    b->live--;
    srv_finish(r);
}

void srv_complete_member(srv_batch *b, size_t i) {
    srv_req *r = b->m[i];
    stop_running(b->s, r);
    b->m[i] = NULL;
    b->live--;
    srv_finish(r);
}

/* Move the queued requests of route and model that h->cont->joins, from the head of the queue up to the
 * first that does not, into free member slots of b (their slots into added). @return how many. */
static size_t join_queued(srv_worker *w, srv_batch *b, const srv_handler *h, const srv_model *model,
                          size_t *added) {
    srv_server *s = w->s;
    size_t n = 0, slot = 0;
    pthread_mutex_lock(&s->mu);
    for (srv_req *r = s->qhead, *nx; r && !s->stop_workers; r = nx) {
        nx = r->next;
        if (r->h != h || r->model != model || !h->cont->joins(r)) break; /* first come, first served */
        while (slot < SRV_BATCH_MAX && slot < b->n && b->m[slot]) slot++;
        if (slot == SRV_BATCH_MAX) break;
        r->worker = w;
        start_running(s, r);
        r->t_start = nz_now_s();
        srv_metrics_queue_wait(s->metrics, r->t_start - r->t0);
        b->m[slot] = r;
        if (slot == b->n) b->n++;
        b->live++;
        added[n++] = slot;
    }
    if (n) nz_matmul_ctx_cancel(w->mc, 0); /* live members again: re-armed (the reaper cancels under s->mu) */
    pthread_mutex_unlock(&s->mu);
    return n;
}

/* A continuous batch: member i of b is in c once its memory is reserved (reserved[i] bytes, its estimate).
 * The batch holds held bytes of the pool in all: the larger of its members' estimates (sum) and its bound
 * (srv_cont_ops.bound: shared caches rounded up, and kept until the batch is freed). */
typedef struct cont_run {
    srv_worker *w;
    srv_batch *b;
    const srv_cont_ops *ops;
    void *c;
    uint64_t reserved[SRV_BATCH_MAX];
    int in[SRV_BATCH_MAX];
    uint64_t sum;  /* reserved[i] of the members in c */
    uint64_t held; /* reserved for c in all, >= sum */
} cont_run;

/* The bytes x must hold with its members, plus join (estimate est) when not NULL. */
static uint64_t cont_need(const cont_run *x, const srv_req *join, uint64_t est) {
    const uint64_t sum = x->sum + est, bound = x->ops->bound ? x->ops->bound(x->c, join) : 0;
    return bound > sum ? bound : sum;
}

/* Give back what x holds beyond what its members need now (all of it once the batch is freed). */
static void cont_settle(cont_run *x) {
    const uint64_t need = x->c ? cont_need(x, NULL, 0) : 0;
    if (need >= x->held) return; /* a bound never grows without a joiner */
    srv_budget_release(x->w->s->budget, x->held - need);
    x->held = need;
}

/* An empty batch is freed and its memory trimmed and given back, so that whatever a client reads next sees
 * it back (the batch is created again for the next joiner). */
static void cont_close_if_empty(cont_run *x) {
    if (!x->c || x->ops->size(x->c)) return;
    x->ops->free(x->c);
    x->c = NULL;
    nz_mem_trim(SRV_TRIM_FREE_BYTES);
    cont_settle(x);
}

/* Member i joins the batch when its memory can be reserved (what the batch's need grows by): at once, or
 * (the batch empty: nothing else would free memory for it here) waiting in line; a member that cannot
 * join yet tries again next step. */
static void cont_admit(cont_run *x, size_t i) {
    srv_server *s = x->w->s;
    srv_req *r = x->b->m[i];
    const uint64_t est = x->ops->estimate(r), need = cont_need(x, r, est);
    const uint64_t more = need > x->held ? need - x->held : 0;
    if (srv_budget_try_reserve(s->budget, more)) {
        if (x->ops->size(x->c)) return;
        if (srv_budget_reserve(s->budget, more, srv_req_stop_hook, r)) {
            if (atomic_load(&r->cancel)) {
                srv_release_member(x->b, i);
            } else { /* larger than the pool (handlers let only requests that fit join) */
                srv_refuse_oversized(s, r, need, 0);
                srv_complete_member(x->b, i);
            }
            return;
        }
    }
    x->held += more;
    if (x->ops->add(x->c, r)) { /* refused: its response is decided */
        cont_settle(x);
        srv_complete_member(x->b, i);
        return;
    }
    x->reserved[i] = est;
    x->sum += est;
    x->in[i] = 1;
}

/* Members' estimates now (ops->estimate_now) replace what they reserved; what the batch no longer needs
 * goes back. */
static void cont_shrink(cont_run *x) {
    for (size_t i = 0; x->ops->estimate_now && i < x->b->n; i++) {
        if (!x->b->m[i] || !x->in[i]) continue;
        const uint64_t now = x->ops->estimate_now(x->c, x->b->m[i]);
        if (now >= x->reserved[i]) continue;
        x->sum -= x->reserved[i] - now;
        x->reserved[i] = now;
    }
    cont_settle(x);
}

/* Member i is out of the batch: its estimate leaves the sum. */
static void cont_out(cont_run *x, size_t i) {
    x->sum -= x->reserved[i];
    x->reserved[i] = 0;
    x->in[i] = 0;
}

/* Member i leaves the batch (if in it); what the batch no longer needs goes back. */
static void cont_leave(cont_run *x, size_t i) {
    if (!x->in[i]) return;
    x->ops->remove(x->c, x->b->m[i]);
    cont_out(x, i);
    cont_settle(x);
    cont_close_if_empty(x);
}

/* The batch of x exists (created for the first member not in it yet when none does). @return 0, or -1 when
 * it cannot be created: every member not in it is then answered (500) and released. */
static int cont_ensure(cont_run *x) {
    if (x->c) return 0;
    const srv_req *lead = NULL;
    for (size_t i = 0; i < x->b->n && !lead; i++)
        if (x->b->m[i]) lead = x->b->m[i];
    if (!lead) return 0;
    nz_error e = {0};
    if ((x->c = x->ops->create(lead, &e))) return 0;
    for (size_t i = 0; i < x->b->n; i++)
        if (x->b->m[i]) {
            srv_respond_fail(x->b->m[i], 500, "%s", e.msg);
            srv_complete_member(x->b, i);
        }
    return -1;
}

/* Bytes of the requests' activations and caches now (srv_budget_check). */
static uint64_t request_bytes(void *arg) {
    const srv_server *s = arg;
    const uint64_t now = nz_mem_current(NZ_MEM_ACTIVATIONS) + nz_mem_current(NZ_MEM_KV);
    return now > s->idle_request_bytes ? now - s->idle_request_bytes : 0;
}

/* One step of x's batch; the members that finished are answered. When none is left in the batch, its
 * memory (caches, buffers) is freed and trimmed before their responses go, so whatever a client reads
 * next sees it back (the batch is created again for the next joiner). */
static void cont_step(cont_run *x) {
    srv_batch *b = x->b;
    size_t done[SRV_BATCH_MAX], nd = 0;
    x->ops->step(x->c, x->w->mc);
    srv_budget_check(x->w->s->budget, request_bytes, x->w->s);
    for (srv_req *r; (r = x->ops->take(x->c));) {
        size_t i = 0;
        while (b->m[i] != r) i++;
        r->batch_texts = x->ops->size(x->c) + 1;
        cont_out(x, i);
        done[nd++] = i;
    }
    cont_shrink(x);
    cont_close_if_empty(x);
    for (size_t k = 0; k < nd; k++) srv_complete_member(b, done[k]);
}

void srv_run_continuous(srv_worker *w, srv_batch *b, const srv_handler *h) {
    srv_server *s = w->s;
    cont_run x = {.w = w, .b = b, .ops = h->cont};
    const srv_req *lead = NULL;
    for (size_t i = 0; !lead; i++) lead = b->m[i];
    srv_model *model = lead->model;
    for (;;) {
        for (size_t i = 0; i < b->n; i++)
            if (b->m[i] && srv_req_should_stop(b->m[i])) {
                cont_leave(&x, i);
                srv_release_member(b, i);
            }
        for (int t = 0; t < s->debug_step_delay_ms; t += 5) srv_sleep_ms(5);
        if (!cont_ensure(&x))
            for (size_t i = 0; i < b->n; i++)
                if (b->m[i] && !x.in[i]) cont_admit(&x, i);
        if (x.c && x.ops->size(x.c)) cont_step(&x);
        size_t added[SRV_BATCH_MAX];
        if (!join_queued(w, b, h, model, added) && !b->live) break;
    }
    x.ops->free(x.c);
    x.c = NULL;
    cont_settle(&x);
}

/* Whether queued r will join a continuous batch that a worker runs (that worker takes it between steps,
 * so another worker must not start a second batch with it). Caller holds s->mu. */
static int joins_running(const srv_server *s, const srv_req *r) {
    const srv_handler *h = r->h;
    if (!h->cont || !s->cfg->batching || !h->cont->joins(r)) return 0;
    for (int i = 0; i < s->nworkers; i++)
        if (s->workers[i].cont_model == r->model && s->workers[i].cont_h == h) return 1;
    return 0;
}

/* The oldest queued request no running continuous batch will take, or NULL. Caller holds s->mu. */
static srv_req *next_job(const srv_server *s) {
    for (srv_req *r = s->qhead; r; r = r->next)
        if (!joins_running(s, r)) return r;
    return NULL;
}

void *srv_worker_main(void *arg) {
    srv_worker *w = arg;
    srv_server *s = w->s;
    srv_batch b = {s, {0}, 0, 0};
    for (;;) {
        pthread_mutex_lock(&s->mu);
        srv_req *r0;
        while (!(r0 = next_job(s)) && !s->stop_workers) pthread_cond_wait(&s->cv, &s->mu);
        if (!r0) {
            pthread_mutex_unlock(&s->mu);
            break;
        }
        b.n = 0;
        nz_matmul_ctx_cancel(w->mc, 0); /* re-armed for this job (the reaper cancels under s->mu too) */
        r0->worker = w;
        start_running(s, r0);
        /* the oldest request, and queued requests its handler can decode with it (up to max_texts units) */
        const srv_handler *h = r0->h;
        size_t units = h->units(r0), scanned = 0;
        b.m[b.n++] = r0;
        const int cont = h->cont && s->cfg->batching && h->cont->joins(r0);
        if (cont) { /* this worker runs the model's continuous batch: the others leave its requests to it */
            w->cont_model = r0->model;
            w->cont_h = h;
        }
        for (srv_req *r = s->qhead, *nx; h->batchable && r && b.n < SRV_BATCH_MAX && scanned < SRV_BATCH_SCAN;
             r = nx, scanned++) {
            nx = r->next;
            if (r->h != h || !h->batchable(r0, r) || units + h->units(r) > (size_t)s->cfg->max_texts)
                continue;
            r->worker = w;
            start_running(s, r);
            b.m[b.n++] = r;
            units += h->units(r);
        }
        b.live = b.n;
        pthread_mutex_unlock(&s->mu);

        double t = nz_now_s();
        for (size_t i = 0; i < b.n; i++) {
            b.m[i]->t_start = t;
            srv_metrics_queue_wait(s->metrics, t - b.m[i]->t0);
        }
        if (cont) {
            srv_run_continuous(w, &b, h);
            pthread_mutex_lock(&s->mu); /* the batch ended: the other workers may take its requests again */
            w->cont_model = NULL;
            pthread_cond_broadcast(&s->cv);
            pthread_mutex_unlock(&s->mu);
        } else {
            h->run(w, &b);
        }
        nz_mem_trim(SRV_TRIM_FREE_BYTES); /* before the responses go: what a client reads next is trimmed */

        for (size_t i = 0; i < b.n; i++) {
            if (!b.m[i]) continue; /* released early */
            stop_running(s, b.m[i]);
            srv_finish(b.m[i]); /* nobody else holds it now */
        }
    }
    return NULL;
}

/* Running jobs: marks each running request that passed its deadline or lost its client (r->cancel), and
 * cancels the matmul context of a worker whose every member is stopping, so its forward pass ends within a
 * tile's work instead of at the next pass or step boundary (a member of a batch that goes on is released
 * at the next boundary, as before). Caller holds s->mu (running requests cannot be freed meanwhile). */
static void cancel_stopped_jobs(srv_server *s) {
    for (srv_req *r = s->running; r; r = r->next) srv_req_should_stop(r);
    for (int i = 0; i < s->nworkers; i++) {
        int members = 0, live = 0;
        for (srv_req *r = s->running; r; r = r->next)
            if (r->worker == &s->workers[i]) members++, live += !atomic_load(&r->cancel);
        if (members && !live) nz_matmul_ctx_cancel(s->workers[i].mc, 1);
    }
}

/* Completes queued requests whose deadline passed or whose client left; stops running jobs whose every
 * request did (cancel_stopped_jobs). */
void *srv_reaper_main(void *arg) {
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
            srv_list_remove(&s->qhead, &s->qtail, r);
            s->queued--;
            srv_metrics_queue_add(s->metrics, -1);
            srv_respond_cancelled(r, reason);
            srv_finish(r);
        }
        cancel_stopped_jobs(s);
        pthread_mutex_unlock(&s->mu);
        for (size_t n = srv_conns_sweep(s->conns, t); n; n--)
            srv_metrics_rejected(s->metrics, "read_timeout");
        srv_sleep_ms(20);
        pthread_mutex_lock(&s->mu);
    }
    pthread_mutex_unlock(&s->mu);
    return NULL;
}

/* Queue r for a worker (429 when the queue is full). A plain request's connection is suspended until
 * srv_finish(); a streamed one (r->sse) keeps its connection: its event stream is queued by on_request and
 * the queue / worker holds r until stream_close.
 * @return 1 when queued, 0 when a response was decided. */
int srv_enqueue(srv_server *s, srv_req *r) {
    const srv_config *cfg = s->cfg;
    pthread_mutex_lock(&s->mu);
    int busy = s->nrunning + s->queued >= s->nworkers; /* no idle worker */
    if (busy && s->queued >= cfg->queue_length) {
        pthread_mutex_unlock(&s->mu);
        srv_metrics_rejected(s->metrics, "queue_full");
        srv_respond_fail(r, 429, "the request queue is full (%d waiting); retry later", cfg->queue_length);
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

/* Room for n tokenized inputs of r (freed by srv_retire). @return 0, or -1 with a 500 response decided. */
int srv_alloc_ids(srv_req *r, size_t n) {
    r->ids = nz_calloc(n, sizeof *r->ids, NZ_MEM_OTHER);
    r->n_ids = nz_calloc(n, sizeof *r->n_ids, NZ_MEM_OTHER);
    r->n_ids_alloc = r->ids && r->n_ids ? n : 0;
    if (r->n_ids_alloc) return 0;
    srv_respond_fail(r, 500, "out of memory");
    return -1;
}

/* A job estimated to need est bytes at its peak (text i of a translate request) can never run when est
 * exceeds the request pool: answer 413 naming the limit. @return 1 when refused. */
int srv_refuse_oversized(srv_server *s, srv_req *r, uint64_t est, size_t i) {
    srv_budget_stats bs;
    srv_budget_get_stats(s->budget, &bs);
    if (est <= bs.total) return 0;
    char what[48];
    r->h->label(r, i, what, sizeof what);
    srv_metrics_rejected(s->metrics, "memory");
    srv_respond_fail(
        r, 413,
        "%s needs an estimated %.1f MiB of activations and KV caches with these options, more than the "
        "%.1f MiB requests may use (memory_budget_bytes %llu less the loaded models and the tile cache); "
        "ask for a smaller beam, fewer candidates or fewer tokens",
        what, (double)est / 1048576.0, (double)bs.total / 1048576.0, (unsigned long long)s->memory_budget);
    return 1;
}
