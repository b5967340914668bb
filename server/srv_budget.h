/*
 * srv_budget.h — the memory that running requests may reserve.
 *
 * The server sizes a pool of bytes once its models are loaded (the memory
 * budget minus what the process already holds and the tile cache may
 * grow to); before a job runs it reserves its estimated peak (activations,
 * KV caches, results: nz_translator_peak_bytes, nz_dialogue_peak_bytes)
 * and releases it when done. Reservations are granted in arrival order: a
 * large one that must wait is not overtaken by later small ones, so nothing
 * starves. A reservation larger than the whole pool is never granted: the
 * caller splits the work or refuses it (413) instead of asking.
 */
#ifndef SRV_BUDGET_H
#define SRV_BUDGET_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct srv_budget srv_budget;

/** @return a budget of total bytes (changeable with srv_budget_set_total),
 *  or NULL when out of memory. */
srv_budget *srv_budget_create(uint64_t total);

/** Free the budget (no reservation may be outstanding). Accepts NULL. */
void srv_budget_free(srv_budget *b);

/** Set the pool's size (when the models are loaded). Waiters are woken. */
void srv_budget_set_total(srv_budget *b, uint64_t total);

/** Reserve n bytes, waiting (in arrival order) until they are free; stop(arg)
 *  is asked every few milliseconds while waiting (NULL: never stop).
 *  @return 0 when reserved, -1 when stop said so or n exceeds the pool
 *          (nothing is then reserved). */
int srv_budget_reserve(srv_budget *b, uint64_t n, int (*stop)(void *arg), void *arg);

/** Reserve n bytes only if that needs no wait (nobody waits and they fit).
 *  @return 0 when reserved, -1 when not (nothing is then reserved). */
int srv_budget_try_reserve(srv_budget *b, uint64_t n);

/** Return n bytes reserved before. */
void srv_budget_release(srv_budget *b, uint64_t n);

/** Check what running requests use against what they reserved: used(arg) (bytes of their activations and
 *  caches now) is read under the budget's lock, when no reservation can be given back and every
 *  allocation follows its reservation, so a use above the reservations means an estimate fell short;
 *  the largest excess seen is kept (srv_budget_stats.overrun). */
void srv_budget_check(srv_budget *b, uint64_t (*used)(void *arg), void *arg);

/** The pool's state. */
typedef struct srv_budget_stats {
    uint64_t total;    /* bytes requests may reserve */
    uint64_t reserved; /* reserved now */
    uint64_t peak;     /* most reserved at once */
    uint64_t waiting;  /* reservations waiting now */
    uint64_t waits;    /* reservations that had to wait, in all */
    uint64_t overrun;  /* most bytes seen in use beyond the reservations (srv_budget_check; 0: none) */
} srv_budget_stats;

/** Fill st with b's state. */
void srv_budget_get_stats(srv_budget *b, srv_budget_stats *st);

#ifdef __cplusplus
}
#endif
#endif /* SRV_BUDGET_H */
