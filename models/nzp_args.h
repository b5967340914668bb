/* nzp_args.h — number parsing for the nzp subcommands' options. */
#ifndef NZP_ARGS_H
#define NZP_ARGS_H

#include <stddef.h>

/** A whole decimal number, no sign. @return 0 and *v, or -1. */
int nzp_parse_size(const char *s, size_t *v);

/** A whole number in [lo, hi] (lo >= 0). @return 0 and *v, or -1. */
int nzp_parse_int(const char *s, long lo, long hi, int *v);

/** A finite number in [lo, hi]. @return 0 and *v, or -1. */
int nzp_parse_float(const char *s, double lo, double hi, float *v);

#endif
