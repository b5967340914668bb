/* The request memory pool: immediate grants, waiting in arrival order (a
 * large reservation is not overtaken), stop while waiting, reservations
 * larger than the pool refused, statistics, the overrun check. */
#include "test_util.h"

#include "srv_budget.h"

#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

static void test_grant_and_refuse(void **state) {
    (void)state;
    srv_budget *b = srv_budget_create(100);
    assert_non_null(b);
    assert_int_equal(srv_budget_reserve(b, 60, NULL, NULL), 0);
    assert_int_equal(srv_budget_reserve(b, 40, NULL, NULL), 0);
    assert_int_equal(srv_budget_reserve(b, 101, NULL, NULL), -1); /* never fits */
    srv_budget_stats st;
    srv_budget_get_stats(b, &st);
    assert_int_equal(st.total, 100);
    assert_int_equal(st.reserved, 100);
    assert_int_equal(st.peak, 100);
    assert_int_equal(st.waits, 0);
    srv_budget_release(b, 60);
    srv_budget_release(b, 40);
    srv_budget_get_stats(b, &st);
    assert_int_equal(st.reserved, 0);
    /* try: granted only without waiting */
    assert_int_equal(srv_budget_try_reserve(b, 70), 0);
    assert_int_equal(srv_budget_try_reserve(b, 31), -1);
    assert_int_equal(srv_budget_try_reserve(b, 30), 0);
    srv_budget_get_stats(b, &st);
    assert_int_equal(st.reserved, 100);
    assert_int_equal(st.waits, 0);
    srv_budget_release(b, 100);
    srv_budget_free(b);
    srv_budget_free(NULL);
}

typedef struct job {
    srv_budget *b;
    uint64_t n;
    atomic_int *order; /* next position */
    int pos;           /* granted as the pos-th */
    int rc;
    atomic_int stop;
} job;

static int job_stop(void *arg) { return atomic_load(&((job *)arg)->stop); }

static void *reserve_main(void *arg) {
    job *j = arg;
    j->rc = srv_budget_reserve(j->b, j->n, job_stop, j);
    if (!j->rc) j->pos = atomic_fetch_add(j->order, 1);
    return NULL;
}

static void wait_waiting(srv_budget *b, uint64_t n) {
    srv_budget_stats st;
    for (int i = 0; i < 2000; i++) {
        srv_budget_get_stats(b, &st);
        if (st.waiting == n) return;
        usleep(1000);
    }
    fail_msg("%llu waiting, expected %llu", (unsigned long long)st.waiting, (unsigned long long)n);
}

/* 90 of 100 held; a reservation of 50 waits, then one of 5 (which would fit) must not overtake it. */
static uint64_t fixed_use(void *arg) { return *(const uint64_t *)arg; }

/* srv_budget_check keeps the largest use seen beyond the reservations. */
static void test_overrun(void **state) {
    (void)state;
    srv_budget *b = srv_budget_create(100);
    uint64_t used = 30;
    assert_int_equal(srv_budget_reserve(b, 40, NULL, NULL), 0);
    srv_budget_check(b, fixed_use, &used);
    srv_budget_stats st;
    srv_budget_get_stats(b, &st);
    assert_int_equal(st.overrun, 0);
    used = 55;
    srv_budget_check(b, fixed_use, &used);
    used = 45;
    srv_budget_check(b, fixed_use, &used);
    srv_budget_get_stats(b, &st);
    assert_int_equal(st.overrun, 15);
    srv_budget_release(b, 40);
    srv_budget_free(b);
}

static void test_fifo(void **state) {
    (void)state;
    srv_budget *b = srv_budget_create(100);
    atomic_int order = 0;
    assert_int_equal(srv_budget_reserve(b, 90, NULL, NULL), 0);
    job big = {b, 50, &order, -1, 0, 0}, small = {b, 5, &order, -1, 0, 0};
    pthread_t t1, t2;
    pthread_create(&t1, NULL, reserve_main, &big);
    wait_waiting(b, 1);
    pthread_create(&t2, NULL, reserve_main, &small);
    wait_waiting(b, 2);
    usleep(30000);
    assert_int_equal(atomic_load(&order), 0); /* the small one waits behind the big one */
    srv_budget_release(b, 90);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    assert_int_equal(big.rc, 0);
    assert_int_equal(small.rc, 0);
    srv_budget_stats st;
    srv_budget_get_stats(b, &st);
    assert_int_equal(st.reserved, 55);
    assert_int_equal(st.waits, 2);
    assert_int_equal(st.waiting, 0);
    srv_budget_release(b, 55);
    srv_budget_free(b);
}

/* A waiter that is told to stop leaves the line; the one behind it is granted. */
static void test_stop_while_waiting(void **state) {
    (void)state;
    srv_budget *b = srv_budget_create(100);
    atomic_int order = 0;
    assert_int_equal(srv_budget_reserve(b, 80, NULL, NULL), 0);
    job a = {b, 60, &order, -1, 0, 0}, c = {b, 20, &order, -1, 0, 0};
    pthread_t t1, t2;
    pthread_create(&t1, NULL, reserve_main, &a);
    wait_waiting(b, 1);
    pthread_create(&t2, NULL, reserve_main, &c);
    wait_waiting(b, 2);
    atomic_store(&a.stop, 1);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL); /* 80 + 20 fits once a left the line */
    assert_int_equal(a.rc, -1);
    assert_int_equal(c.rc, 0);
    srv_budget_stats st;
    srv_budget_get_stats(b, &st);
    assert_int_equal(st.reserved, 100);
    srv_budget_release(b, 100);
    /* a shrinking pool refuses a waiter that can no longer fit */
    assert_int_equal(srv_budget_reserve(b, 100, NULL, NULL), 0);
    job d = {b, 80, &order, -1, 0, 0};
    pthread_create(&t1, NULL, reserve_main, &d);
    wait_waiting(b, 1);
    srv_budget_set_total(b, 50);
    pthread_join(t1, NULL);
    assert_int_equal(d.rc, -1);
    srv_budget_release(b, 100);
    srv_budget_free(b);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_grant_and_refuse),
        cmocka_unit_test(test_overrun),
        cmocka_unit_test(test_fifo),
        cmocka_unit_test(test_stop_while_waiting),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
