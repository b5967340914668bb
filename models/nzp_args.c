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
