/*
 * nat_runner — decode id sequences with the translation model family
 * (models/nz_nat.h) for the PyTorch parity tests (tests/python/test_nat_parity.py).
 *
 *   nat_runner MODEL.nzp [--iter T] [--beam B] [--adaptive | --no-adaptive] [--rerank] [--at-greedy]
 *              [--at-beam K [--lenpen X]] [--max-len-a A] [--max-len-b N] [--min-len N] [--steps]
 *              [--cache BYTES] [--threads N] [--batch K]
 *
 * stdin: one sentence a line, space-separated source ids as nat_ref expects
 * them ([bos, x.., eos]); K lines are decoded together (right-padded).
 * stdout, one line per input line, in order:
 *   "<id> <id> ...\t<score %.6f>"   (mask-predict: [bos, y.., eos]; --at-greedy, --at-beam:
 *   [y.., eos]; the beam score is the normalized one, sum of log-probs / len^lenpen)
 *   with --steps a third field: the pass that finalized it (AT: tokens generated);
 *   "error: <message>"  for a sentence that could not be decoded (the others go on).
 * Exit status 0 when every line got its output line, 1 on usage or model
 * errors, or when engine memory is still allocated at the end (a leak).
 */
#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_container.h"
#include "nz_nat.h"
#include "nz_pool.h"
#include "nz_weight.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS 65536

typedef struct line {
    int32_t *ids; /* NULL: parse error (msg) */
    size_t n;
    char msg[128];
} line;

static int usage(void) {
    fprintf(stderr,
            "usage: nat_runner MODEL.nzp [--iter T] [--beam B] [--adaptive | --no-adaptive] [--rerank] "
            "[--at-greedy]\n"
            "       [--at-beam K [--lenpen X]] [--max-len-a A] [--max-len-b N] [--min-len N] [--steps]\n"
            "       [--cache BYTES] [--threads N] [--batch K]   < ids (one sentence a line)\n");
    return 1;
}

static int parse_long(const char *s, long lo, long hi, long *v) {
    char *end;
    errno = 0;
    long x = strtol(s, &end, 10);
    if (!*s || *end || errno || x < lo || x > hi) return -1;
    *v = x;
    return 0;
}

/* Parse one line of ids into l (l->ids NULL with a message on error). */
static void parse_line(char *s, size_t lineno, line *l) {
    memset(l, 0, sizeof *l);
    size_t cap = 16;
    l->ids = malloc(cap * sizeof *l->ids);
    if (!l->ids) {
        snprintf(l->msg, sizeof l->msg, "line %zu: out of memory", lineno);
        return;
    }
    for (char *tok = strtok(s, " \t\r\n"); tok; tok = strtok(NULL, " \t\r\n")) {
        long v;
        if (parse_long(tok, INT32_MIN, INT32_MAX, &v) || l->n == MAX_TOKENS) {
            snprintf(l->msg, sizeof l->msg, "line %zu: bad token '%.40s'", lineno, tok);
            free(l->ids);
            l->ids = NULL;
            return;
        }
        if (l->n == cap) {
            int32_t *p = realloc(l->ids, 2 * cap * sizeof *p);
            if (!p) {
                snprintf(l->msg, sizeof l->msg, "line %zu: out of memory", lineno);
                free(l->ids);
                l->ids = NULL;
                return;
            }
            l->ids = p;
            cap *= 2;
        }
        l->ids[l->n++] = (int32_t)v;
    }
}

typedef struct opts {
    nz_nat_opts mp;
    nz_nat_at_opts at;
    int at_greedy, at_beam, steps; /* at_beam: beam size, 0 = none */
    float lenpen;
} opts;

/* Decode lines[0..k) as one batch and print their results. */
static int run_batch(nz_matmul_ctx *mc, const nz_nat *nat, const opts *o, line *lines, size_t k) {
    size_t S = 1, nb = 0;
    for (size_t i = 0; i < k; i++)
        if (lines[i].ids && lines[i].n) {
            nb++;
            if (lines[i].n > S) S = lines[i].n;
        }
    int32_t *src = malloc((nb ? nb : 1) * S * sizeof *src);
    size_t *slot = malloc((nb ? nb : 1) * sizeof *slot);
    nz_nat_hyp *hyps = calloc(nb ? nb : 1, sizeof *hyps);
    if (!src || !slot || !hyps) {
        free(src);
        free(slot);
        free(hyps);
        fprintf(stderr, "nat_runner: out of memory\n");
        return 1;
    }
    size_t j = 0;
    for (size_t i = 0; i < k; i++) {
        if (!lines[i].ids || !lines[i].n) continue;
        for (size_t t = 0; t < S; t++) src[j * S + t] = t < lines[i].n ? lines[i].ids[t] : NZ_NAT_PAD;
        slot[j++] = i;
    }
    nz_error err;
    memset(&err, 0, sizeof err);
    if (nb) {
        if (o->at_beam)
            nz_nat_at_beam(mc, nat, src, nb, S, &o->at, o->at_beam, o->lenpen, hyps, &err);
        else if (o->at_greedy)
            nz_nat_at_greedy(mc, nat, src, nb, S, &o->at, hyps, &err);
        else
            nz_nat_mask_predict(mc, nat, src, nb, S, &o->mp, hyps, &err);
    }
    /* (a batch-wide error is copied into every hyps[i]) */
    for (size_t i = 0, h = 0; i < k; i++) {
        if (!lines[i].ids) {
            printf("error: %s\n", lines[i].msg);
            continue;
        }
        if (!lines[i].n) {
            printf("error: empty source line\n");
            continue;
        }
        const nz_nat_hyp *r = &hyps[h++];
        if (r->rc) {
            printf("error: %s\n", r->err.msg);
            continue;
        }
        for (size_t t = 0; t < r->n; t++) printf(t ? " %d" : "%d", (int)r->tokens[t]);
        printf("\t%.6f", (double)r->score);
        if (o->steps) printf("\t%d", r->steps);
        printf("\n");
    }
    fflush(stdout);
    nz_nat_hyps_free(hyps, nb);
    free(hyps);
    free(src);
    free(slot);
    return 0;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    long budget = 64L << 20, threads = 1, batch = 1, v;
    opts o;
    memset(&o, 0, sizeof o);
    nz_nat_opts_default(&o.mp);
    nz_nat_at_opts_default(&o.at);
    o.lenpen = 1.0f;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--iter") && next) {
            if (parse_long(argv[++i], 0, 1000000, &v)) return usage();
            o.mp.max_iter = (int)v;
        } else if (!strcmp(a, "--beam") && next) {
            if (parse_long(argv[++i], 1, 4096, &v)) return usage();
            o.mp.length_beam = (int)v;
        } else if (!strcmp(a, "--no-adaptive") || !strcmp(a, "--adaptive")) {
            o.mp.adaptive = !strcmp(a, "--adaptive");
        } else if (!strcmp(a, "--rerank")) {
            o.mp.rerank_at = 1;
        } else if (!strcmp(a, "--at-greedy")) {
            o.at_greedy = 1;
        } else if (!strcmp(a, "--at-beam") && next) {
            if (parse_long(argv[++i], 1, 4096, &v)) return usage();
            o.at_beam = (int)v;
        } else if (!strcmp(a, "--lenpen") && next) {
            char *end;
            o.lenpen = strtof(argv[++i], &end);
            if (*end || !*argv[i]) return usage();
        } else if (!strcmp(a, "--steps")) {
            o.steps = 1;
        } else if (!strcmp(a, "--max-len-a") && next) {
            char *end;
            o.at.max_len_a = strtod(argv[++i], &end);
            if (*end || !*argv[i]) return usage();
        } else if (!strcmp(a, "--max-len-b") && next) {
            if (parse_long(argv[++i], 0, 1000000, &v)) return usage();
            o.at.max_len_b = (int)v;
        } else if (!strcmp(a, "--min-len") && next) {
            if (parse_long(argv[++i], 0, 1000000, &v)) return usage();
            o.at.min_len = (int)v;
        } else if (!strcmp(a, "--cache") && next) {
            if (parse_long(argv[++i], 0, LONG_MAX, &budget)) return usage();
        } else if (!strcmp(a, "--threads") && next) {
            if (parse_long(argv[++i], 1, 64, &threads)) return usage();
        } else if (!strcmp(a, "--batch") && next) {
            if (parse_long(argv[++i], 1, 4096, &batch)) return usage();
        } else if (a[0] == '-' || path) {
            return usage();
        } else {
            path = a;
        }
    }
    if (!path) return usage();

    nz_error err;
    memset(&err, 0, sizeof err);
    nz_model *m = NULL;
    nz_nat *nat = NULL;
    nz_tile_cache *cache = NULL;
    nz_pool *pool = NULL;
    nz_matmul_ctx *mc = NULL;
    line *lines = NULL;
    char *buf = NULL;
    size_t bufcap = 0, k = 0, lineno = 0;
    int rc = nz_model_open(path, &m, &err);
    if (!rc) rc = nz_nat_load(m, &nat, &err);
    if (!rc) {
        cache = nz_cache_create((size_t)budget);
        pool = threads > 1 ? nz_pool_create((int)threads) : NULL;
        mc = cache && (threads == 1 || pool) ? nz_matmul_ctx_create(pool, cache) : NULL;
        lines = calloc((size_t)batch, sizeof *lines);
        if (!mc || !lines) rc = nz_fail(&err, NZ_E_NOMEM, "cannot create the cache, pool or matmul context");
    }
    int status = rc ? 1 : 0;
    while (!rc && getline(&buf, &bufcap, stdin) >= 0) {
        parse_line(buf, ++lineno, &lines[k++]);
        if (k == (size_t)batch) {
            status |= run_batch(mc, nat, &o, lines, k);
            for (size_t i = 0; i < k; i++) free(lines[i].ids);
            k = 0;
        }
    }
    if (!rc && k) status |= run_batch(mc, nat, &o, lines, k);
    for (size_t i = 0; lines && i < k; i++) free(lines[i].ids);
    free(lines);
    free(buf);
    nz_nat_free(nat);
    nz_matmul_ctx_free(mc);
    nz_cache_free(cache);
    nz_pool_free(pool);
    nz_model_free(m);
    if (rc) {
        fprintf(stderr, "nat_runner: error: %s\n", err.msg);
        return 1;
    }
    static const nz_mem_cat cats[] = {NZ_MEM_WEIGHTS, NZ_MEM_TILE_CACHE,  NZ_MEM_SCRATCH,
                                      NZ_MEM_KV,      NZ_MEM_ACTIVATIONS, NZ_MEM_OTHER};
    for (size_t i = 0; i < sizeof cats / sizeof cats[0]; i++)
        if (nz_mem_current(cats[i])) {
            fprintf(stderr, "nat_runner: error: %zu bytes still allocated in category %s\n",
                    nz_mem_current(cats[i]), nz_mem_cat_name(cats[i]));
            status = 1;
        }
    return status;
}
