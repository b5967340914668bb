/*
 * nzp translate — translate a file with a cmlm_transformer .nzp, one
 * sentence per line (stdin -> stdout).
 *
 * Lines are read in batches of --batch; each batch is tokenized (the model's
 * embedded spm.model + dict.txt, source = [bos, pieces.., eos]), decoded
 * together (mask-predict with length beam, or the AT decoder's greedy search
 * with --at, or its beam search with --at-beam K) and written in input
 * order. A line that cannot be translated (too long, empty, a decode error)
 * prints an empty output line and an error on stderr naming its line number;
 * the others continue, and the exit status is then 1.
 */
#include "nzp_translate.h"

#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_container.h"
#include "nz_nat.h"
#include "nz_pool.h"
#include "nz_tok.h"
#include "nz_weight.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char TRANSLATE_USAGE[] =
    "usage: nzp translate MODEL.nzp [--iter T] [--beam B] [--rerank] [--at] [--at-beam K]\n"
    "                     [--lenpen X] [--max-len N] [--batch K] [--cache BYTES] [--threads N]\n"
    "                     [--tokens] < in.txt > out.txt\n"
    "  --iter T      mask-predict refinement iterations (T + 1 decoder passes; default 10)\n"
    "  --beam B      length beam: candidate lengths per sentence (default 5)\n"
    "  --rerank      pick the length candidate by the AT decoder's score\n"
    "  --at          decode with the autoregressive decoder (greedy) instead\n"
    "  --at-beam K   decode with the autoregressive decoder, beam search of K (implies --at)\n"
    "  --lenpen X    AT beam length penalty: score = sum log-prob / length^X (default 1.0)\n"
    "  --max-len N   cap output length (tokens, incl. bos/eos for NAT; default: the model's)\n"
    "  --batch K     sentences decoded together (default 16)\n"
    "  --cache BYTES decoded-tile cache budget (default 0: decode weights on every use)\n"
    "  --threads N   threads (default: all cores)\n"
    "  --tokens      print token ids instead of text\n";

typedef struct opts {
    nz_nat_opts nat;
    nz_nat_at_opts at;
    int use_at, at_beam, tokens, threads; /* at_beam: beam size, 0 = greedy */
    float lenpen;
    size_t batch, cache;
} opts;

static int parse_size(const char *s, size_t *v) {
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-') return -1;
    *v = (size_t)x;
    return 0;
}

static int parse_int(const char *s, int lo, int hi, int *v) {
    size_t x;
    if (parse_size(s, &x) || x < (size_t)lo || x > (size_t)hi) return -1;
    *v = (int)x;
    return 0;
}

static int parse_float(const char *s, float *v) {
    char *end;
    errno = 0;
    double x = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(x) || x < -100 || x > 100) return -1;
    *v = (float)x;
    return 0;
}

/* Print one result line (text or ids); @return 0, or -1 when it failed. */
static int emit(const nz_tok *tok, const opts *o, const nz_nat_hyp *h, size_t lineno) {
    if (h->rc) {
        fprintf(stderr, "nzp translate: line %zu: %s\n", lineno, h->err.msg);
        putchar('\n');
        return -1;
    }
    if (o->tokens) {
        for (size_t i = 0; i < h->n; i++) printf(i ? " %d" : "%d", (int)h->tokens[i]);
        putchar('\n');
        return 0;
    }
    char *text;
    size_t len;
    nz_error e = {0};
    if (nz_tok_decode(tok, h->tokens, h->n, NZ_DETOK_FAIRSEQ, &text, &len, &e)) {
        fprintf(stderr, "nzp translate: line %zu: detokenizing: %s\n", lineno, e.msg);
        putchar('\n');
        return -1;
    }
    fwrite(text, 1, len, stdout);
    putchar('\n');
    nz_free(text);
    return 0;
}

/* Tokenize lines[0..n), decode them as one batch, print the results.
 * @return the number of lines that failed, or -1 on a fatal error. */
static long run_batch(nz_matmul_ctx *mc, const nz_nat *nat, const nz_tok *tok, const opts *o, char **lines,
                      size_t n, size_t first_line) {
    int32_t **ids = nz_calloc(n, sizeof *ids, NZ_MEM_OTHER);
    size_t *len = nz_calloc(n, sizeof *len, NZ_MEM_OTHER);
    nz_nat_hyp *hyps = nz_calloc(n, sizeof *hyps, NZ_MEM_OTHER);
    int32_t *src = NULL;
    long failed = -1;
    if (!ids || !len || !hyps) goto out;
    size_t S = 2;
    for (size_t i = 0; i < n; i++) {
        nz_error e = {0};
        if (nz_tok_encode(tok, lines[i], strlen(lines[i]), NZ_TOK_ADD_BOS | NZ_TOK_ADD_EOS, &ids[i], &len[i],
                          &e)) {
            fprintf(stderr, "nzp translate: line %zu: tokenizing: %s\n", first_line + i, e.msg);
            goto out;
        }
        if (len[i] > S) S = len[i];
    }
    /* right-padded source matrix; a line the model refuses gets its own error in hyps */
    src = nz_malloc(n * S * sizeof *src, NZ_MEM_ACTIVATIONS);
    if (!src) goto out;
    for (size_t i = 0; i < n; i++)
        for (size_t j = 0; j < S; j++) src[i * S + j] = j < len[i] ? ids[i][j] : NZ_TOK_PAD;
    nz_error e = {0};
    int rc = o->at_beam  ? nz_nat_at_beam(mc, nat, src, n, S, &o->at, o->at_beam, o->lenpen, hyps, &e)
             : o->use_at ? nz_nat_at_greedy(mc, nat, src, n, S, &o->at, hyps, &e)
                         : nz_nat_mask_predict(mc, nat, src, n, S, &o->nat, hyps, &e);
    if (rc && (rc == NZ_E_INVALID_ARG || rc == NZ_E_UNSUPPORTED)) {
        fprintf(stderr, "nzp translate: %s\n", e.msg);
        goto out;
    }
    failed = 0;
    for (size_t i = 0; i < n; i++)
        if (emit(tok, o, &hyps[i], first_line + i)) failed++;
    fflush(stdout);
out:
    if (hyps) nz_nat_hyps_free(hyps, n);
    for (size_t i = 0; ids && i < n; i++) nz_free(ids[i]);
    nz_free(ids);
    nz_free(len);
    nz_free(hyps);
    nz_free(src);
    return failed;
}

int nzp_translate(int argc, char **argv) {
    opts o;
    memset(&o, 0, sizeof o);
    nz_nat_opts_default(&o.nat);
    nz_nat_at_opts_default(&o.at);
    o.nat.length_beam = 5;
    o.lenpen = 1.0f;
    o.batch = 16;
    const char *path = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "--iter") && v)
            bad = parse_int(v, 0, 1000, &o.nat.max_iter), i++;
        else if (!strcmp(a, "--beam") && v)
            bad = parse_int(v, 1, 100, &o.nat.length_beam), i++;
        else if (!strcmp(a, "--max-len") && v) {
            bad = parse_int(v, 2, 1 << 20, &o.nat.max_len), i++;
            o.at.max_len_b = o.nat.max_len;
        } else if (!strcmp(a, "--batch") && v)
            bad = parse_size(v, &o.batch) || !o.batch || o.batch > 4096, i++;
        else if (!strcmp(a, "--cache") && v)
            bad = parse_size(v, &o.cache), i++;
        else if (!strcmp(a, "--threads") && v)
            bad = parse_int(v, 1, 64, &o.threads), i++;
        else if (!strcmp(a, "--rerank"))
            o.nat.rerank_at = 1;
        else if (!strcmp(a, "--at"))
            o.use_at = 1;
        else if (!strcmp(a, "--at-beam") && v) {
            bad = parse_int(v, 1, 100, &o.at_beam), i++;
            o.use_at = 1;
        } else if (!strcmp(a, "--lenpen") && v)
            bad = parse_float(v, &o.lenpen), i++;
        else if (!strcmp(a, "--tokens"))
            o.tokens = 1;
        else if (a[0] != '-' && !path)
            path = a;
        else
            bad = 1;
        if (bad) {
            fprintf(stderr, "nzp translate: bad or incomplete option '%s'\n%s", a, TRANSLATE_USAGE);
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "nzp translate: no model given\n%s", TRANSLATE_USAGE);
        return 2;
    }

    nz_error e = {0};
    nz_model *m = NULL;
    nz_nat *nat = NULL;
    nz_tok *tok = NULL;
    nz_tile_cache *cache = NULL;
    nz_pool *pool = NULL;
    nz_matmul_ctx *mc = NULL;
    char **lines = NULL;
    int status = 1;
    if (nz_model_open(path, &m, &e) || nz_nat_load(m, &nat, &e) || nz_tok_from_model(m, &tok, &e)) {
        fprintf(stderr, "nzp translate: %s\n", e.msg);
        goto out;
    }
    if (nz_dict_size(nz_tok_dict(tok)) != nz_nat_get_config(nat)->vocab) {
        fprintf(stderr, "nzp translate: %s: dict.txt has %zu symbols but the embeddings have %zu rows\n",
                path, nz_dict_size(nz_tok_dict(tok)), nz_nat_get_config(nat)->vocab);
        goto out;
    }
    cache = o.cache ? nz_cache_create(o.cache) : NULL;
    pool = nz_pool_create(o.threads);
    mc = nz_matmul_ctx_create(pool, cache);
    lines = nz_calloc(o.batch, sizeof *lines, NZ_MEM_OTHER);
    if ((o.cache && !cache) || !pool || !mc || !lines) {
        fprintf(stderr, "nzp translate: out of memory\n");
        goto out;
    }
    size_t n = 0, lineno = 0, cap = 0;
    long failed = 0;
    char *buf = NULL;
    ssize_t got;
    status = 0;
    while ((got = getline(&buf, &cap, stdin)) >= 0) {
        if (got > 0 && buf[got - 1] == '\n') buf[--got] = 0;
        if (got > 0 && buf[got - 1] == '\r') buf[--got] = 0;
        lineno++;
        if (!(lines[n] = nz_strdup(buf))) {
            status = 1;
            break;
        }
        if (++n == o.batch) {
            long f = run_batch(mc, nat, tok, &o, lines, n, lineno - n + 1);
            for (size_t i = 0; i < n; i++) nz_free(lines[i]);
            n = 0;
            if (f < 0) {
                status = 1;
                break;
            }
            failed += f;
        }
    }
    free(buf);
    if (status == 0 && n) {
        long f = run_batch(mc, nat, tok, &o, lines, n, lineno - n + 1);
        if (f < 0) status = 1;
        failed += f > 0 ? f : 0;
    }
    for (size_t i = 0; i < n; i++) nz_free(lines[i]);
    if (failed) status = 1;
    if (fflush(stdout) || ferror(stdout)) {
        fprintf(stderr, "nzp translate: writing the output failed\n");
        status = 1;
    }
out:
    nz_free(lines);
    nz_matmul_ctx_free(mc);
    nz_pool_free(pool);
    if (cache && m) nz_cache_forget_model(cache, m);
    nz_cache_free(cache);
    nz_tok_free(tok);
    nz_nat_free(nat);
    nz_model_free(m);
    return status;
}
