/* nzp_args — see nzp_args.h. */
#include "nzp_args.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>

int nzp_parse_size(const char *s, size_t *v) {
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') return -1;
    *v = (size_t)x;
    return 0;
}

int nzp_parse_int(const char *s, long lo, long hi, int *v) {
    size_t x;
    if (nzp_parse_size(s, &x) || x < (size_t)lo || x > (size_t)hi) return -1;
    *v = (int)x;
    return 0;
}

int nzp_parse_float(const char *s, double lo, double hi, float *v) {
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(x) || x < lo || x > hi) return -1;
    *v = (float)x;
    return 0;
}

ssize_t nzp_read_line(char **buf, size_t *cap, FILE *f) {
    ssize_t got = getline(buf, cap, f);
    if (got > 0 && (*buf)[got - 1] == '\n') (*buf)[--got] = 0;
    if (got > 0 && (*buf)[got - 1] == '\r') (*buf)[--got] = 0;
    return got;
}

int nzp_engine_open(nzp_engine *e, size_t cache_bytes, int threads) {
    e->cache = cache_bytes ? nz_cache_create(cache_bytes) : NULL;
    e->pool = nz_pool_create(threads);
    e->mc = nz_matmul_ctx_create(e->pool, e->cache);
    return (cache_bytes && !e->cache) || !e->pool || !e->mc ? -1 : 0;
}

void nzp_engine_close(nzp_engine *e, const nz_model *m) {
    nz_matmul_ctx_free(e->mc);
    nz_pool_free(e->pool);
    if (e->cache && m) nz_cache_forget_model(e->cache, m);
    nz_cache_free(e->cache);
}
