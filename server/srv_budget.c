/* srv_budget — see srv_budget.h. Waiting reservations form a FIFO of nodes on their own stacks; only the
 * head may take bytes, so a large reservation is not overtaken. */
#include "srv_budget.h"

#include "nz_alloc.h"

#include <pthread.h>
#include <time.h>

typedef struct waiter {
    struct waiter *next;
} waiter;

struct srv_budget {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    uint64_t total, reserved, peak;
    waiter *head, *tail; /* reservations waiting, in arrival order */
    uint64_t waiting, waits;
    uint64_t overrun;
};

srv_budget *srv_budget_create(uint64_t total) {
    srv_budget *b = nz_calloc(1, sizeof *b, NZ_MEM_OTHER);
    if (!b) return NULL;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    int bad = pthread_mutex_init(&b->mu, NULL) || pthread_cond_init(&b->cv, &ca);
    pthread_condattr_destroy(&ca);
    if (bad) {
        nz_free(b);
        return NULL;
    }
    b->total = total;
    return b;
}

void srv_budget_free(srv_budget *b) {
    if (!b) return;
    pthread_cond_destroy(&b->cv);
    pthread_mutex_destroy(&b->mu);
    nz_free(b);
}

void srv_budget_set_total(srv_budget *b, uint64_t total) {
    pthread_mutex_lock(&b->mu);
    b->total = total;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

/* Remove w (the head or not) from the queue. */
static void unlink_waiter(srv_budget *b, waiter *w) {
    waiter **pp = &b->head, *prev = NULL;
    while (*pp && *pp != w) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    if (!*pp) return;
    *pp = w->next;
    if (b->tail == w) b->tail = prev;
}

int srv_budget_reserve(srv_budget *b, uint64_t n, int (*stop)(void *arg), void *arg) {
    int rc = 0;
    pthread_mutex_lock(&b->mu);
    if (!b->head && b->reserved + n <= b->total) { /* nobody waits and it fits */
        b->reserved += n;
    } else if (n > b->total) {
        rc = -1;
    } else {
        waiter w = {NULL};
        if (b->tail)
            b->tail->next = &w;
        else
            b->head = &w;
        b->tail = &w;
        b->waiting++;
        b->waits++;
        while (b->head != &w || b->reserved + n > b->total) {
            if (n > b->total || (stop && stop(arg))) {
                rc = -1;
                break;
            }
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_nsec += 10 * 1000 * 1000; /* stop is asked every 10 ms */
            if (ts.tv_nsec >= 1000000000L) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000L;
            }
            pthread_cond_timedwait(&b->cv, &b->mu, &ts);
        }
        unlink_waiter(b, &w);
        b->waiting--;
        if (!rc) b->reserved += n;
        pthread_cond_broadcast(&b->cv); /* the next in line may fit now */
    }
    if (b->reserved > b->peak) b->peak = b->reserved;
    pthread_mutex_unlock(&b->mu);
    return rc;
}

int srv_budget_try_reserve(srv_budget *b, uint64_t n) {
    pthread_mutex_lock(&b->mu);
    const int ok = !b->head && b->reserved + n <= b->total;
    if (ok) b->reserved += n;
    if (b->reserved > b->peak) b->peak = b->reserved;
    pthread_mutex_unlock(&b->mu);
    return ok ? 0 : -1;
}

void srv_budget_release(srv_budget *b, uint64_t n) {
    pthread_mutex_lock(&b->mu);
    b->reserved = n < b->reserved ? b->reserved - n : 0;
    pthread_cond_broadcast(&b->cv);
    pthread_mutex_unlock(&b->mu);
}

void srv_budget_check(srv_budget *b, uint64_t (*used)(void *arg), void *arg) {
    pthread_mutex_lock(&b->mu);
    const uint64_t u = used(arg);
    if (u > b->reserved && u - b->reserved > b->overrun) b->overrun = u - b->reserved;
    pthread_mutex_unlock(&b->mu);
}

void srv_budget_get_stats(srv_budget *b, srv_budget_stats *st) {
    pthread_mutex_lock(&b->mu);
    st->total = b->total;
    st->reserved = b->reserved;
    st->peak = b->peak;
    st->waiting = b->waiting;
    st->waits = b->waits;
    st->overrun = b->overrun;
    pthread_mutex_unlock(&b->mu);
}
