/* Thread pool: every task runs exactly once, on a valid thread index, for
 * many job sizes, repeated jobs and concurrent callers. */
#include "test_util.h"

#include "nz_alloc.h"
#include "nz_pool.h"

#include <pthread.h>
#include <stdatomic.h>

#define MAXT 5000

typedef struct {
    _Atomic int count[MAXT];
    _Atomic int bad_thread;
    int size;
} job;

static void body(void *ctx, uint64_t task, int thread) {
    job *j = ctx;
    atomic_fetch_add(&j->count[task], 1);
    if (thread < 0 || thread >= j->size) atomic_store(&j->bad_thread, 1);
}

static void check_run(nz_pool *p, uint64_t ntasks) {
    static job j;
    memset(&j, 0, sizeof j);
    j.size = nz_pool_size(p);
    nz_pool_run(p, ntasks, body, &j);
    for (uint64_t t = 0; t < ntasks; t++)
        if (atomic_load(&j.count[t]) != 1)
            fail_msg("task %llu ran %d times", (unsigned long long)t, j.count[t]);
    assert_int_equal(atomic_load(&j.bad_thread), 0);
}

static void test_pool_sizes(void **state) {
    (void)state;
    size_t mem0 = nz_mem_current(NZ_MEM_OTHER);
    for (int n = 1; n <= 4; n++) {
        nz_pool *p = nz_pool_create(n);
        assert_non_null(p);
        assert_int_equal(nz_pool_size(p), n);
        static const uint64_t sizes[] = {0, 1, 2, 3, 7, 64, 1000, MAXT};
        for (int rep = 0; rep < (tu_quick() ? 2 : 20); rep++)
            for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) check_run(p, sizes[k]);
        nz_pool_free(p);
    }
    nz_pool *p = nz_pool_create(0); /* the number of CPUs */
    assert_true(nz_pool_size(p) >= 1);
    nz_pool_free(p);
    nz_pool_free(NULL);
    check_run(NULL, 100); /* no pool: the caller runs everything */
    assert_int_equal(nz_mem_current(NZ_MEM_OTHER), mem0);
}

typedef struct {
    nz_pool *p;
    _Atomic long total;
} shared;

static void add_one(void *ctx, uint64_t task, int thread) {
    (void)task;
    (void)thread;
    atomic_fetch_add(&((shared *)ctx)->total, 1);
}

static void *caller(void *arg) {
    shared *s = arg;
    for (int i = 0; i < (tu_quick() ? 20 : 200); i++) nz_pool_run(s->p, 100, add_one, s);
    return NULL;
}

/* Two threads submitting jobs to one pool: the jobs are serialised, none is
 * lost. */
static void test_concurrent_callers(void **state) {
    (void)state;
    shared s = {nz_pool_create(3), 0};
    pthread_t a, b;
    pthread_create(&a, NULL, caller, &s);
    pthread_create(&b, NULL, caller, &s);
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    assert_int_equal(atomic_load(&s.total), 2L * (tu_quick() ? 20 : 200) * 100);
    nz_pool_free(s.p);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pool_sizes),
        cmocka_unit_test(test_concurrent_callers),
    };
    return cmocka_run_group_tests_name("pool", tests, NULL, NULL);
}
