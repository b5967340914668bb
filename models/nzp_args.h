/* nzp_args.h — what nzp translate and nzp chat share: number parsing for
 * their options, reading stdin line by line, and the engine they decode on. */
#ifndef NZP_ARGS_H
#define NZP_ARGS_H

#include "nz_weight.h"

#include <stddef.h>
#include <stdio.h>
#include <sys/types.h>

/** A whole decimal number, no sign. @return 0 and *v, or -1. */
int nzp_parse_size(const char *s, size_t *v);

/** A whole number in [lo, hi] (lo >= 0). @return 0 and *v, or -1. */
int nzp_parse_int(const char *s, long lo, long hi, int *v);

/** A finite number in [lo, hi]. @return 0 and *v, or -1. */
int nzp_parse_float(const char *s, double lo, double hi, float *v);

/** The next line of f into *buf (getline's buffer, *cap its size), less a
 *  trailing '\n' and then a trailing '\r'.
 *  @return its length, or -1 at the end of f (or when reading failed). */
ssize_t nzp_read_line(char **buf, size_t *cap, FILE *f);

/** What a subcommand decodes on: a decoded-tile cache (NULL without a
 *  budget), a thread pool and the matmul context over them. */
typedef struct nzp_engine {
    nz_tile_cache *cache;
    nz_pool *pool;
    nz_matmul_ctx *mc;
} nzp_engine;

/** Create *e: a cache of cache_bytes (0: none) and threads threads (0: all
 *  cores). What was created stays in *e for nzp_engine_close.
 *  @return 0, or -1 when out of memory. */
int nzp_engine_open(nzp_engine *e, size_t cache_bytes, int threads);

/** Free *e (any part may be NULL), first dropping model m's tiles (m may be
 *  NULL) from its cache. */
void nzp_engine_close(nzp_engine *e, const nz_model *m);

#endif
