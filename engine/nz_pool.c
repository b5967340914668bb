/* Thread pool: see nz_pool.h. One job at a time: the caller publishes it
 * under the mutex with a new generation number, every thread (caller
 * included) takes tasks from an atomic counter, and the caller waits until
 * every worker has left the job.
 *
 * Waking a sleeping thread costs tens of microseconds (more in a VM), as
 * long as a whole tile decode, so both sides spin before they sleep: an idle
 * worker polls the generation for spin_ns before it waits on the condition
 * variable, and the caller polls busy likewise. Matmuls of one forward pass
 * follow each other within microseconds, so workers stay awake through a
 * pass and sleep between requests. NZ_POOL_SPIN_US sets the window
 * (default 200; 0 = always sleep). */
#include "nz_pool.h"

#include "nz_alloc.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

void openblas_set_num_threads(int); /* OpenBLAS; declared here to avoid its header */

struct nz_pool {
    int size;                    /* threads, the caller included */
    pthread_t *workers;          /* [size - 1] */
    pthread_mutex_t run;         /* serialises nz_pool_run callers */
    pthread_mutex_t lock;        /* protects the fields below */
    pthread_cond_t wake;         /* workers wait for a new generation */
    pthread_cond_t done;         /* the caller waits for busy == 0 */
    _Atomic uint64_t generation; /* bumped for each job (written under lock, polled without) */
    _Atomic int busy;            /* workers still in the current job */
    _Atomic int stop;            /* set by nz_pool_free */
    uint64_t spin_ns;            /* how long a thread polls before it sleeps */
    nz_pool_fn fn;               /* current job */
    void *ctx;
    uint64_t ntasks;
    _Atomic uint64_t next; /* next task to hand out */
};

typedef struct {
    nz_pool *p;
    int index;
} worker_arg;

static void work(nz_pool *p, nz_pool_fn fn, void *ctx, uint64_t ntasks, int thread) {
    for (;;) {
        uint64_t t = atomic_fetch_add(&p->next, 1);
        if (t >= ntasks) break;
        fn(ctx, t, thread);
    }
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Poll until *v != old (or stop) for at most ns. @return 1 when it changed. */
static int spin_until_changed(nz_pool *p, const _Atomic uint64_t *v, uint64_t old, uint64_t ns) {
    if (!ns) return 0;
    uint64_t end = nz_now_ns() + ns;
    for (unsigned i = 1;; i++) {
        if (atomic_load(v) != old || atomic_load(&p->stop)) return 1;
        cpu_relax();
        if (!(i & 63) && nz_now_ns() > end) return 0;
    }
}

static void *worker(void *argp) {
    worker_arg a = *(worker_arg *)argp;
    nz_free(argp);
    nz_pool *p = a.p;
    uint64_t seen = 0;
    for (;;) {
        spin_until_changed(p, &p->generation, seen, p->spin_ns);
        pthread_mutex_lock(&p->lock);
        while (!p->stop && p->generation == seen) pthread_cond_wait(&p->wake, &p->lock);
        if (p->stop) break;
        seen = p->generation;
        nz_pool_fn fn = p->fn;
        void *ctx = p->ctx;
        uint64_t ntasks = p->ntasks;
        pthread_mutex_unlock(&p->lock);
        work(p, fn, ctx, ntasks, a.index);
        pthread_mutex_lock(&p->lock);
        if (--p->busy == 0) pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

nz_pool *nz_pool_create(int n) {
    if (n <= 0) {
        long c = sysconf(_SC_NPROCESSORS_ONLN);
        n = c > 0 ? (int)c : 1;
    }
    if (n > 64) n = 64;
    nz_pool *p = nz_calloc(1, sizeof *p, NZ_MEM_OTHER);
    if (!p) return NULL;
    p->size = 1;
    const char *spin = getenv("NZ_POOL_SPIN_US");
    p->spin_ns = (spin && *spin ? strtoull(spin, NULL, 10) : 200) * 1000u;
    pthread_mutex_init(&p->run, NULL);
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->next, 0);
    p->workers = nz_calloc((size_t)n, sizeof *p->workers, NZ_MEM_OTHER);
    if (!p->workers) {
        nz_pool_free(p);
        return NULL;
    }
    for (int i = 1; i < n; i++) {
        worker_arg *a = nz_malloc(sizeof *a, NZ_MEM_OTHER);
        if (!a) break;
        a->p = p;
        a->index = i;
        if (pthread_create(&p->workers[i - 1], NULL, worker, a) != 0) {
            nz_free(a);
            break;
        }
        p->size++;
    }
    if (p->size != n) {
        nz_pool_free(p);
        return NULL;
    }
    nz_blas_serial();
    return p;
}

void nz_blas_serial(void) { openblas_set_num_threads(1); }

void nz_pool_free(nz_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->lock);
    p->stop = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    for (int i = 0; i < p->size - 1; i++) pthread_join(p->workers[i], NULL);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->lock);
    pthread_mutex_destroy(&p->run);
    nz_free(p->workers);
    nz_free(p);
}

int nz_pool_size(const nz_pool *p) { return p ? p->size : 1; }

void nz_pool_run(nz_pool *p, uint64_t ntasks, nz_pool_fn fn, void *ctx) {
    if (!p || p->size == 1 || ntasks <= 1) {
        for (uint64_t t = 0; t < ntasks; t++) fn(ctx, t, 0);
        return;
    }
    pthread_mutex_lock(&p->run);
    pthread_mutex_lock(&p->lock);
    p->fn = fn;
    p->ctx = ctx;
    p->ntasks = ntasks;
    atomic_store(&p->next, 0);
    p->busy = p->size - 1;
    p->generation++;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->lock);
    work(p, fn, ctx, ntasks, 0);
    if (p->spin_ns) { /* the workers are finishing their last task: poll before sleeping */
        uint64_t end = nz_now_ns() + p->spin_ns;
        for (unsigned i = 1; atomic_load(&p->busy) > 0; i++) {
            cpu_relax();
            if (!(i & 63) && nz_now_ns() > end) break;
        }
    }
    pthread_mutex_lock(&p->lock);
    while (p->busy > 0) pthread_cond_wait(&p->done, &p->lock);
    pthread_mutex_unlock(&p->lock);
    pthread_mutex_unlock(&p->run);
}
