/* Shared helpers for the cmocka unit tests. */
#ifndef NZ_TEST_UTIL_H
#define NZ_TEST_UTIL_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

/* Deterministic xorshift64* generator: tests are reproducible. */
static inline uint64_t tu_rand(uint64_t *s) {
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* Standard normal sample (Box-Muller). */
static inline double tu_gauss(uint64_t *s) {
    double u1 = ((tu_rand(s) >> 11) + 1.0) / 9007199254740993.0;
    double u2 = (tu_rand(s) >> 11) / 9007199254740992.0;
    return __builtin_sqrt(-2.0 * __builtin_log(u1)) * __builtin_cos(6.283185307179586 * u2);
}

/* NZ_TEST_QUICK=1 (set under valgrind) shrinks the slow loops. */
static inline int tu_quick(void) {
    const char *q = getenv("NZ_TEST_QUICK");
    return q && *q && *q != '0';
}

/* malloc that fails the test instead of returning NULL (n = 0 allowed). */
static inline void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    assert_non_null(p);
    return p;
}

/* Copy buf[0..n) into a fresh heap block of exactly n bytes, so ASan catches
 * any read past the end. */
static inline uint8_t *dup_exact(const void *buf, size_t n) {
    uint8_t *p = xmalloc(n);
    if (n) memcpy(p, buf, n);
    return p;
}

#endif
