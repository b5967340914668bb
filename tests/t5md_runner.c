/*
 * t5md_runner — generate responses with the dialogue model family
 * (models/nz_t5md.h) for the PyTorch parity tests
 * (tests/python/test_t5md_parity.py).
 *
 *   t5md_runner MODEL.nzp [--greedy | --beam N | --sample] [--lenpen X] [--early-stopping]
 *               [--num-return R] [--temperature T] [--top-k K] [--top-p P] [--seed S]
 *               [--seed-per-line] [--decoders K1,K2,..] [--max-new-tokens N] [--allow-unk]
 *               [--no-repeat-ngram N] [--text] [--stream] [--stop-after N] [--cache BYTES]
 *               [--threads N] [--batch K]
 *
 * stdin: one context a line: space-separated source ids (the encoder input as
 * t5md_ref expects it, normally ending with eos 1), or with --text UTF-8
 * dialogue turns separated by TABs (oldest first), encoded with the model's
 * embedded spm.model (nz_t5md_encode_context). K lines are decoded together.
 * --seed-per-line: context i (0-based line number) samples with seed S + i.
 * --no-repeat-ngram N: nz_t5md_opts.no_repeat_ngram (HF no_repeat_ngram_size; 0 = off,
 * the default); any N >= 0 is passed on, so the engine's range check shows as error lines.
 * stdout (fields separated by TABs; floats %.9g; LINE is the 0-based line number):
 *   ctx    LINE  IDS                       (--text: the encoded context)
 *   tok    LINE  K  POS  ID  LOGPROB       (--stream: the streaming hook, as it fires)
 *   out    LINE  K  R  IDS  MEAN  SUM  BEAM_SCORE  FINISHED  LOGPROBS  [TEXT with --text]
 *          (one per context, requested decoder and beam return R, in that order;
 *          BEAM_SCORE is nan for greedy / sampling)
 *   rank   LINE  K..                       (the decoders ranked by nz_t5md_rank: mean log-prob,
 *                                           beam: beam score of each decoder's best return)
 *   consensus LINE  K:C ..                 (the decoders ranked by NZ_T5MD_RANK_CONSENSUS, each with
 *                                           its nz_t5md_consensus C (%.17g) over the best returns)
 *   pooled LINE  K:R:C ..                  (--num-return > 1: nz_t5md_consensus_pool, the choice of the
 *                                           dialogue's consensus ranking with beam search: each decoder's
 *                                           chosen return R with its consensus C over all returns, ranked)
 *   error  LINE  K|-  MESSAGE              (a result or a line that could not be decoded)
 * Exit status 0 when every line got its output, 1 on usage or model errors, or
 * when engine memory is still allocated at the end (a leak).
 */
#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_container.h"
#include "nz_pool.h"
#include "nz_t5md.h"
#include "nz_weight.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_TOKENS 65536
#define MAX_DECS   4096

typedef struct line {
    int32_t *ids; /* NULL: error (msg) */
    size_t n;
    int nz_owned; /* ids from nz_t5md_encode_context (nz_free) */
    char msg[NZ_ERROR_MSG_MAX + 64];
} line;

typedef struct runner {
    nz_matmul_ctx *mc;
    const nz_t5md *t;
    const nz_t5md_tok *tok;
    nz_t5md_opts o;
    int text, stream, seed_per_line;
    long stop_after, stop_calls;
    size_t line0; /* global number of the batch's first line */
} runner;

static int usage(void) {
    fprintf(stderr,
            "usage: t5md_runner MODEL.nzp [--greedy | --beam N | --sample] [--lenpen X] [--early-stopping]\n"
            "       [--num-return R] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--seed-per-line]\n"
            "       [--decoders K1,K2,..] [--max-new-tokens N] [--allow-unk] [--no-repeat-ngram N]\n"
            "       [--text] [--stream] [--stop-after N] [--cache BYTES] [--threads N] [--batch K]\n"
            "       < contexts (one a line)\n");
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

static int parse_float(const char *s, double *v) {
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (!*s || *end || errno) return -1;
    *v = x;
    return 0;
}

/* Parse one line of ids into l (l->ids NULL with a message on error). */
static void parse_ids(char *s, size_t lineno, line *l) {
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

/* Split a text line into TAB-separated turns and encode them. */
static void parse_text(const nz_t5md_tok *tk, char *s, size_t lineno, line *l) {
    memset(l, 0, sizeof *l);
    size_t len = strlen(s);
    while (len && (s[len - 1] == '\n' || s[len - 1] == '\r')) s[--len] = '\0';
    size_t n = 1;
    for (size_t i = 0; i < len; i++) n += s[i] == '\t';
    const char **turns = malloc(n * sizeof *turns);
    if (!turns) {
        snprintf(l->msg, sizeof l->msg, "line %zu: out of memory", lineno);
        return;
    }
    size_t k = 0;
    turns[k++] = s;
    for (size_t i = 0; i < len; i++)
        if (s[i] == '\t') {
            s[i] = '\0';
            turns[k++] = s + i + 1;
        }
    nz_error err;
    memset(&err, 0, sizeof err);
    if (nz_t5md_encode_context(tk, turns, NULL, n, &l->ids, &l->n, &err))
        snprintf(l->msg, sizeof l->msg, "line %zu: %s", lineno, err.msg);
    else
        l->nz_owned = 1;
    free(turns);
}

static void free_line(line *l) {
    if (l->nz_owned)
        nz_free(l->ids);
    else
        free(l->ids);
    l->ids = NULL;
}

static int stop_hook(void *arg) {
    runner *r = arg;
    return r->stop_after >= 0 && r->stop_calls++ >= r->stop_after;
}

typedef struct stream_ctx {
    const size_t *slot; /* batch context -> line in the batch */
    size_t line0;
} stream_ctx;

static void on_token(void *arg, size_t context, int k, size_t pos, int32_t token, float lp) {
    const stream_ctx *s = arg;
    printf("tok\t%zu\t%d\t%zu\t%d\t%.9g\n", s->line0 + s->slot[context], k, pos, (int)token, (double)lp);
}

static void print_ids(const int32_t *ids, size_t n) {
    for (size_t t = 0; t < n; t++) printf(t ? " %d" : "%d", (int)ids[t]);
}

/* Decode lines[0..k) as one batch and print their results. */
static int run_batch(runner *rn, line *lines, size_t k) {
    const nz_t5md_config *c = nz_t5md_get_config(rn->t);
    nz_t5md_opts o = rn->o;
    const size_t D = o.decoders && o.n_decoders ? o.n_decoders : c->num_modes;
    const size_t R = o.strategy == NZ_T5MD_BEAM ? (size_t)o.num_return : 1;
    size_t nb = 0;
    for (size_t i = 0; i < k; i++) nb += lines[i].ids != NULL;
    const int32_t **src = malloc((nb ? nb : 1) * sizeof *src);
    size_t *len = malloc((nb ? nb : 1) * sizeof *len);
    size_t *slot = malloc((nb ? nb : 1) * sizeof *slot);
    uint64_t *seeds = malloc((nb ? nb : 1) * sizeof *seeds);
    size_t *order = malloc(D * sizeof *order + 1);
    nz_t5md_result *res = calloc(nb * D * R + 1, sizeof *res), *best = calloc(D * R + 1, sizeof *best);
    if (!src || !len || !slot || !seeds || !order || !res || !best) {
        fprintf(stderr, "t5md_runner: out of memory\n");
        free(src), free(len), free(slot), free(seeds), free(order), free(res), free(best);
        return 1;
    }
    size_t j = 0;
    for (size_t i = 0; i < k; i++) {
        if (!lines[i].ids) continue;
        src[j] = lines[i].ids;
        len[j] = lines[i].n;
        seeds[j] = o.seed + (uint64_t)(rn->line0 + i);
        slot[j++] = i;
    }
    if (rn->seed_per_line) o.seeds = seeds;
    stream_ctx sc = {slot, rn->line0};
    if (rn->stream) {
        o.on_token = on_token;
        o.token_arg = &sc;
    }
    o.stop = stop_hook;
    o.stop_arg = rn;
    nz_error err;
    memset(&err, 0, sizeof err);
    if (nb) nz_t5md_generate(rn->mc, rn->t, src, len, nb, &o, res, &err); /* batch errors are in res */
    for (size_t i = 0, h = 0; i < k; i++) {
        const size_t ln = rn->line0 + i;
        if (!lines[i].ids) {
            printf("error\t%zu\t-\t%s\n", ln, lines[i].msg);
            continue;
        }
        if (rn->text) {
            printf("ctx\t%zu\t", ln);
            print_ids(lines[i].ids, lines[i].n);
            printf("\n");
        }
        const nz_t5md_result *rs = &res[h * D * R];
        for (size_t q = 0; q < D * R; q++) {
            const nz_t5md_result *r = &rs[q];
            if (r->rc) {
                printf("error\t%zu\t%d\t%s\n", ln, r->decoder, r->err.msg);
                continue;
            }
            printf("out\t%zu\t%d\t%zu\t", ln, r->decoder, q % R);
            print_ids(r->tokens, r->n);
            printf("\t%.9g\t%.9g\t%.9g\t%d\t", r->mean_logprob, r->sum_logprob, r->beam_score, r->finished);
            for (size_t t = 0; t < r->n; t++) printf(t ? " %.9g" : "%.9g", (double)r->logprobs[t]);
            if (rn->text && rn->tok) {
                char *txt = NULL;
                nz_error e2;
                if (nz_t5md_decode_text(rn->tok, r->tokens, r->n, &txt, NULL, &e2))
                    printf("\terror: %s", e2.msg);
                else
                    printf("\t%s", txt);
                nz_free(txt);
            }
            printf("\n");
        }
        /* rank each decoder's best return */
        for (size_t q = 0; q < D; q++) best[q] = rs[q * R];
        nz_t5md_rank(best, D,
                     o.strategy == NZ_T5MD_BEAM ? NZ_T5MD_RANK_BEAM_SCORE : NZ_T5MD_RANK_MEAN_LOGPROB, order);
        printf("rank\t%zu\t", ln);
        for (size_t q = 0; q < D; q++) printf(q ? " %d" : "%d", best[order[q]].decoder);
        nz_t5md_consensus(best, D);
        nz_t5md_rank(best, D, NZ_T5MD_RANK_CONSENSUS, order);
        printf("\nconsensus\t%zu\t", ln);
        for (size_t q = 0; q < D; q++)
            printf("%s%d:%.17g", q ? " " : "", best[order[q]].decoder, best[order[q]].consensus);
        printf("\n");
        if (R > 1) { /* shallow copies: the pool only reorders them */
            memcpy(best, rs, D * R * sizeof *best);
            nz_t5md_consensus_pool(best, D, R);
            nz_t5md_rank(best, D, NZ_T5MD_RANK_CONSENSUS, order);
            printf("pooled\t%zu\t", ln);
            for (size_t q = 0; q < D; q++) {
                const nz_t5md_result *ch = &best[order[q]];
                size_t r = 0;
                while (r + 1 < D * R && rs[r].tokens != ch->tokens) r++;
                printf("%s%d:%zu:%.17g", q ? " " : "", ch->decoder, r % R, ch->consensus);
            }
            printf("\n");
        }
        h++;
    }
    fflush(stdout);
    nz_t5md_results_free(res, nb * D * R);
    free(src), free(len), free(slot), free(seeds), free(order), free(res), free(best);
    return 0;
}

/* "2,0,1" -> decs */
static int parse_decoders(const char *s, int *decs, size_t *n) {
    char buf[4 * MAX_DECS];
    if (strlen(s) >= sizeof buf) return -1;
    strcpy(buf, s);
    *n = 0;
    for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
        long v;
        if (*n == MAX_DECS || parse_long(tok, 0, INT_MAX, &v)) return -1;
        decs[(*n)++] = (int)v;
    }
    return *n ? 0 : -1;
}

int main(int argc, char **argv) {
    const char *path = NULL;
    long budget = 64L << 20, threads = 1, batch = 1, v;
    double f;
    static int decs[MAX_DECS];
    runner rn;
    memset(&rn, 0, sizeof rn);
    nz_t5md_opts_default(&rn.o);
    rn.stop_after = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--greedy")) {
            rn.o.strategy = NZ_T5MD_GREEDY;
        } else if (!strcmp(a, "--beam") && next) {
            if (parse_long(argv[++i], 1, NZ_T5MD_MAX_BEAM, &v)) return usage();
            rn.o.strategy = NZ_T5MD_BEAM;
            rn.o.beam_size = (int)v;
        } else if (!strcmp(a, "--sample")) {
            rn.o.strategy = NZ_T5MD_SAMPLE;
        } else if (!strcmp(a, "--lenpen") && next) {
            if (parse_float(argv[++i], &rn.o.length_penalty)) return usage();
        } else if (!strcmp(a, "--early-stopping")) {
            rn.o.early_stopping = 1;
        } else if (!strcmp(a, "--num-return") && next) {
            if (parse_long(argv[++i], 1, NZ_T5MD_MAX_BEAM, &v)) return usage();
            rn.o.num_return = (int)v;
        } else if (!strcmp(a, "--temperature") && next) {
            if (parse_float(argv[++i], &f)) return usage();
            rn.o.temperature = (float)f;
        } else if (!strcmp(a, "--top-k") && next) {
            if (parse_long(argv[++i], 0, INT32_MAX, &v)) return usage();
            rn.o.top_k = (uint32_t)v;
        } else if (!strcmp(a, "--top-p") && next) {
            if (parse_float(argv[++i], &f)) return usage();
            rn.o.top_p = (float)f;
        } else if (!strcmp(a, "--seed") && next) {
            char *end;
            errno = 0;
            rn.o.seed = strtoull(argv[++i], &end, 0);
            if (!*argv[i] || *end || errno) return usage();
        } else if (!strcmp(a, "--seed-per-line")) {
            rn.seed_per_line = 1;
        } else if (!strcmp(a, "--decoders") && next) {
            if (parse_decoders(argv[++i], decs, &rn.o.n_decoders)) return usage();
            rn.o.decoders = decs;
        } else if (!strcmp(a, "--max-new-tokens") && next) {
            if (parse_long(argv[++i], 0, INT_MAX, &v)) return usage();
            rn.o.max_new_tokens = (int)v;
        } else if (!strcmp(a, "--allow-unk")) {
            rn.o.ban_unk = 0;
        } else if (!strcmp(a, "--no-repeat-ngram") && next) {
            if (parse_long(argv[++i], 0, INT_MAX, &v)) return usage();
            rn.o.no_repeat_ngram = (int)v;
        } else if (!strcmp(a, "--text")) {
            rn.text = 1;
        } else if (!strcmp(a, "--stream")) {
            rn.stream = 1;
        } else if (!strcmp(a, "--stop-after") && next) {
            if (parse_long(argv[++i], 0, LONG_MAX, &rn.stop_after)) return usage();
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
    nz_t5md *t = NULL;
    nz_t5md_tok *tk = NULL;
    nz_tile_cache *cache = NULL;
    nz_pool *pool = NULL;
    nz_matmul_ctx *mc = NULL;
    line *lines = NULL;
    char *buf = NULL;
    size_t bufcap = 0, k = 0, lineno = 0;
    int rc = nz_model_open(path, &m, &err);
    if (!rc) rc = nz_t5md_load(m, &t, &err);
    if (!rc && rn.text) rc = nz_t5md_tok_load(m, nz_t5md_get_config(t), &tk, &err);
    if (!rc) {
        cache = nz_cache_create((size_t)budget);
        pool = threads > 1 ? nz_pool_create((int)threads) : NULL;
        mc = cache && (threads == 1 || pool) ? nz_matmul_ctx_create(pool, cache) : NULL;
        lines = calloc((size_t)batch, sizeof *lines);
        if (!mc || !lines) rc = nz_fail(&err, NZ_E_NOMEM, "cannot create the cache, pool or matmul context");
    }
    rn.mc = mc;
    rn.t = t;
    rn.tok = tk;
    int status = rc ? 1 : 0;
    while (!rc && getline(&buf, &bufcap, stdin) >= 0) {
        lineno++;
        if (rn.text)
            parse_text(tk, buf, lineno, &lines[k++]);
        else
            parse_ids(buf, lineno, &lines[k++]);
        if (k == (size_t)batch) {
            status |= run_batch(&rn, lines, k);
            for (size_t i = 0; i < k; i++) free_line(&lines[i]);
            rn.line0 += k;
            k = 0;
        }
    }
    if (!rc && k) status |= run_batch(&rn, lines, k);
    for (size_t i = 0; lines && i < k; i++) free_line(&lines[i]);
    free(lines);
    free(buf);
    nz_t5md_tok_free(tk);
    nz_t5md_free(t);
    nz_matmul_ctx_free(mc);
    nz_cache_free(cache);
    nz_pool_free(pool);
    nz_model_free(m);
    if (rc) {
        fprintf(stderr, "t5md_runner: error: %s\n", err.msg);
        return 1;
    }
    static const nz_mem_cat cats[] = {NZ_MEM_WEIGHTS, NZ_MEM_TILE_CACHE,  NZ_MEM_SCRATCH,
                                      NZ_MEM_KV,      NZ_MEM_ACTIVATIONS, NZ_MEM_OTHER};
    for (size_t i = 0; i < sizeof cats / sizeof cats[0]; i++)
        if (nz_mem_current(cats[i])) {
            fprintf(stderr, "t5md_runner: error: %zu bytes still allocated in category %s\n",
                    nz_mem_current(cats[i]), nz_mem_cat_name(cats[i]));
            status = 1;
        }
    return status;
}
