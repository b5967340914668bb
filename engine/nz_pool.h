/*
 * nz_pool.h — a small fixed thread pool for data-parallel loops (the tiles
 * of one matmul). The calling thread takes part, so a pool of n threads has
 * n - 1 workers. Creating a pool sets OpenBLAS to one thread per call so the
 * pool and BLAS never oversubscribe the cores.
 */
#ifndef NZ_POOL_H
#define NZ_POOL_H

#include "nz_common.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nz_pool nz_pool;

/** Body of a parallel loop: task in [0, ntasks), thread in [0, size). */
typedef void (*nz_pool_fn)(void *ctx, uint64_t task, int thread);

/** @return a pool of n threads in total (n = 0: the number of online CPUs,
 *  capped at 64), or NULL when threads cannot be started. */
nz_pool *nz_pool_create(int n);

/** Make OpenBLAS run on the calling thread only. The engine parallelises over
 * tiles itself (nz_pool); OpenBLAS's own threads would compete with those (and
 * spin in sched_yield on a busy machine). Called by nz_pool_create and
 * nz_matmul_ctx_create, so single-threaded engine users get it too.
 * Idempotent, never fails. */
void nz_blas_serial(void);

/** Stop the workers and free the pool. Accepts NULL. */
void nz_pool_free(nz_pool *p);

/** @return the number of threads, the caller included. */
int nz_pool_size(const nz_pool *p);

/** Run fn over tasks [0, ntasks) on every thread of the pool (tasks are
 *  handed out dynamically) and return when all are done. Calls from several
 *  threads are serialised. A NULL pool runs the loop on the caller. */
void nz_pool_run(nz_pool *p, uint64_t ntasks, nz_pool_fn fn, void *ctx);

#ifdef __cplusplus
}
#endif
#endif /* NZ_POOL_H */
