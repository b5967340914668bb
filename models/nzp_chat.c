/*
 * nzp chat — talk to a t5_multidecoder .nzp (the dialogue model family),
 * one user turn per line (stdin -> stdout), interactive or piped.
 *
 * The conversation is kept: each line is the next user turn, the context is
 * every turn so far (the last --history N with N > 0; the model's own
 * max_context_turns / max_source_length apply on top), and the reply of the
 * best-ranked decoder becomes the next turn. Per line the best response is
 * printed, or with --all every response, best first, one per line as
 * `K<TAB>SCORE<TAB>TEXT` (decoder, mean token log-prob %.6f, text) followed
 * by an empty line. Blank lines are skipped; a line `/reset` forgets the
 * conversation. A prompt ("> " on stderr) is shown only when stdin is a
 * terminal. A turn that fails (an error from the model) prints its message
 * on stderr naming the line number and an empty output line (--all: the
 * empty line alone), is left out of the history, and makes the exit status
 * 1; the session goes on.
 */
#include "nzp_chat.h"

#include "nz_alloc.h"
#include "nzp_args.h"
#include "nz_cache.h"
#include "nz_dialogue.h"
#include "nz_pool.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHAT_MAX_DECODERS 256

static const char CHAT_USAGE[] =
    "usage: nzp chat MODEL.nzp [--strategy greedy|beam|sample] [--beam N] [--temperature T]\n"
    "                [--top-k K] [--top-p P] [--seed S] [--decoders K1,K2,..] [--max-new-tokens N]\n"
    "                [--no-repeat-ngram N] [--all] [--distinct] [--history N] [--cache BYTES]\n"
    "                [--threads N]\n"
    "  one user turn per line on stdin; prints the best-ranked response per turn\n"
    "  Options left out take the model's decoding defaults (its config \"generation\", shown by\n"
    "  `nzp info`), else the built-in ones given here.\n"
    "  --strategy S      greedy (built-in), beam or sample\n"
    "  --beam N          beam size (1..64, default 4; implies --strategy beam)\n"
    "  --temperature T   sampling temperature (0..100, default 1; implies --strategy sample)\n"
    "  --top-k K         sample from the K most likely tokens (0: all; implies sample)\n"
    "  --top-p P         nucleus sampling mass (0 < P <= 1, default 1; implies sample)\n"
    "  --seed S          sampling seed (default 0; implies sample)\n"
    "  --decoders LIST   decoders to run, e.g. 0,2 (default: all of the model's)\n"
    "  --max-new-tokens N  response length cap in tokens (1..65536, default 63)\n"
    "  --no-repeat-ngram N  never repeat an N-gram of tokens within a response (HF no_repeat_ngram_size;\n"
    "                    0..65536, default 0 = off; any strategy)\n"
    "  --all             print every response, best first: K<TAB>SCORE<TAB>TEXT, then an empty line\n"
    "  --distinct        drop responses whose text equals a better-ranked one's\n"
    "  --history N       keep only the last N turns as context (default 0: all)\n"
    "  --cache BYTES     decoded-tile cache budget (default 0: decode weights on every use)\n"
    "  --threads N       threads (default: all cores)\n"
    "  -h, --help        this text\n"
    "  a line /reset forgets the conversation\n";

/* "2,0,1" -> decs[n]. @return 0 or -1. */
static int parse_decoders(const char *s, int *decs, size_t *n) {
    *n = 0;
    const char *p = s;
    while (*p) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno || v < 0 || v > INT_MAX || *n == CHAT_MAX_DECODERS || (*end && *end != ','))
            return -1;
        for (size_t i = 0; i < *n; i++)
            if (decs[i] == (int)v) return -1; /* a decoder twice */
        decs[(*n)++] = (int)v;
        p = *end ? end + 1 : end;
        if (*end && !*p) return -1; /* trailing comma */
    }
    return *n ? 0 : -1;
}

/** The conversation so far (turns oldest first, NZ_MEM_OTHER copies). */
typedef struct history {
    char **turns;
    size_t n, cap;
} history;

static int history_add(history *h, const char *s) {
    if (h->n == h->cap) {
        size_t cap = h->cap ? 2 * h->cap : 16;
        char **t =
            h->turns ? nz_realloc(h->turns, cap * sizeof *t) : nz_malloc(cap * sizeof *t, NZ_MEM_OTHER);
        if (!t) return -1;
        h->turns = t;
        h->cap = cap;
    }
    if (!(h->turns[h->n] = nz_strdup(s))) return -1;
    h->n++;
    return 0;
}

static void history_clear(history *h) {
    for (size_t i = 0; i < h->n; i++) nz_free(h->turns[i]);
    h->n = 0;
}

static int is_blank(const char *s) {
    for (; *s; s++)
        if (*s != ' ' && (*s < '\t' || *s > '\r')) return 0;
    return 1;
}

int nzp_chat(int argc, char **argv) {
    nz_dlg_opts o;
    nz_dlg_choice ch; /* what the flags chose; the model's defaults ("generation") fill the rest */
    nz_dlg_choice_init(&ch);
    size_t n_decs = 0;
    uint64_t seed = 0;
    int strategy = -1, implied = -1, threads = 0, all = 0, history_n = 0;
    const char *implied_by = NULL;
    size_t cache_bytes = 0;
    static int decs[CHAT_MAX_DECODERS];
    const char *path = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0, imp = -1;
        if (!strcmp(a, "--strategy") && v) {
            i++;
            strategy = !strcmp(v, "greedy")   ? NZ_T5MD_GREEDY
                       : !strcmp(v, "beam")   ? NZ_T5MD_BEAM
                       : !strcmp(v, "sample") ? NZ_T5MD_SAMPLE
                                              : -1;
            bad = strategy < 0;
        } else if (!strcmp(a, "--beam") && v) {
            bad = nzp_parse_int(v, 1, 64, &ch.beam_size), i++;
            imp = NZ_T5MD_BEAM;
        } else if (!strcmp(a, "--temperature") && v) {
            bad = nzp_parse_float(v, 0, 100, &ch.temperature), i++;
            imp = NZ_T5MD_SAMPLE;
        } else if (!strcmp(a, "--top-k") && v) {
            bad = nzp_parse_int(v, 0, 1000000, &ch.top_k), i++;
            imp = NZ_T5MD_SAMPLE;
        } else if (!strcmp(a, "--top-p") && v) {
            bad = nzp_parse_float(v, 0, 1, &ch.top_p) || !(ch.top_p > 0), i++;
            imp = NZ_T5MD_SAMPLE;
        } else if (!strcmp(a, "--seed") && v) {
            size_t s = 0;
            bad = nzp_parse_size(v, &s), i++;
            seed = (uint64_t)s;
            imp = NZ_T5MD_SAMPLE;
        } else if (!strcmp(a, "--decoders") && v) {
            bad = parse_decoders(v, decs, &n_decs), i++;
        } else if (!strcmp(a, "--max-new-tokens") && v) {
            bad = nzp_parse_int(v, 1, NZ_T5MD_MAX_NEW_TOKENS, &ch.max_new_tokens), i++;
        } else if (!strcmp(a, "--no-repeat-ngram") && v) {
            bad = nzp_parse_int(v, 0, NZ_T5MD_MAX_NEW_TOKENS, &ch.no_repeat_ngram), i++;
        } else if (!strcmp(a, "--history") && v) {
            bad = nzp_parse_int(v, 0, INT_MAX, &history_n), i++;
        } else if (!strcmp(a, "--cache") && v) {
            bad = nzp_parse_size(v, &cache_bytes), i++;
        } else if (!strcmp(a, "--threads") && v) {
            bad = nzp_parse_int(v, 1, 64, &threads), i++;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(CHAT_USAGE, stdout);
            return 0;
        } else if (!strcmp(a, "--all")) {
            all = 1;
        } else if (!strcmp(a, "--distinct")) {
            ch.distinct = 1;
        } else if (a[0] != '-' && !path) {
            path = a;
        } else {
            bad = 1;
        }
        if (bad) {
            fprintf(stderr, "nzp chat: bad or incomplete option '%s'\n%s", a, CHAT_USAGE);
            return 2;
        }
        if (imp >= 0) {
            if (implied >= 0 && implied != imp) {
                fprintf(stderr, "nzp chat: %s and %s ask for different strategies\n%s", implied_by, a,
                        CHAT_USAGE);
                return 2;
            }
            implied = imp;
            implied_by = a;
        }
    }
    if (!path) {
        fprintf(stderr, "nzp chat: no model given\n%s", CHAT_USAGE);
        return 2;
    }
    if (strategy >= 0 && implied >= 0 && strategy != implied) {
        fprintf(stderr, "nzp chat: %s does not apply to --strategy %s\n%s", implied_by,
                strategy == NZ_T5MD_GREEDY ? "greedy"
                : strategy == NZ_T5MD_BEAM ? "beam"
                                           : "sample",
                CHAT_USAGE);
        return 2;
    }
    ch.strategy = strategy >= 0 ? strategy : implied; /* -1: the model's default */

    nz_error e = {0};
    nz_dialogue *d = NULL;
    nz_tile_cache *cache = NULL;
    nz_pool *pool = NULL;
    nz_matmul_ctx *mc = NULL;
    history h = {0};
    char *buf = NULL;
    int status = 1;
    if (nz_dialogue_open(path, &d, &e)) {
        fprintf(stderr, "nzp chat: %s\n", e.msg);
        goto out;
    }
    o = *nz_dialogue_defaults(d);
    if (nz_dlg_choice_apply(&ch, &o, &e)) {
        fprintf(stderr, "nzp chat: %s\n", e.msg);
        status = 2;
        goto out;
    }
    o.gen.decoders = n_decs ? decs : NULL;
    o.gen.n_decoders = n_decs;
    o.gen.seed = seed;
    const nz_t5md_config *c = nz_dialogue_config(d);
    for (size_t j = 0; j < o.gen.n_decoders; j++)
        if ((size_t)decs[j] >= c->num_modes) {
            fprintf(stderr, "nzp chat: --decoders: decoder %d is out of range (the model has %zu)\n", decs[j],
                    c->num_modes);
            status = 2;
            goto out;
        }
    cache = cache_bytes ? nz_cache_create(cache_bytes) : NULL;
    pool = nz_pool_create(threads);
    mc = nz_matmul_ctx_create(pool, cache);
    if ((cache_bytes && !cache) || !pool || !mc) {
        fprintf(stderr, "nzp chat: out of memory\n");
        goto out;
    }
    const int tty = isatty(0);
    size_t cap = 0, lineno = 0;
    ssize_t got;
    status = 0;
    for (;;) {
        if (tty) {
            fputs("> ", stderr);
            fflush(stderr);
        }
        if ((got = getline(&buf, &cap, stdin)) < 0) break;
        lineno++;
        if (got > 0 && buf[got - 1] == '\n') buf[--got] = 0;
        if (got > 0 && buf[got - 1] == '\r') buf[--got] = 0;
        if (is_blank(buf)) continue;
        if (!strcmp(buf, "/reset")) {
            history_clear(&h);
            continue;
        }
        if (history_add(&h, buf)) {
            fprintf(stderr, "nzp chat: out of memory\n");
            status = 1;
            break;
        }
        size_t first = history_n > 0 && h.n > (size_t)history_n ? h.n - (size_t)history_n : 0;
        nz_dlg_result r;
        int rc = nz_dialogue_run(mc, d, (const char *const *)h.turns + first, h.n - first, &o, &r, &e);
        if (rc || !r.n) {
            fprintf(stderr, "nzp chat: line %zu: %s\n", lineno, rc ? e.msg : "no response");
            if (!all) putchar('\n');
            nz_free(h.turns[--h.n]); /* the failed turn stays out of the conversation */
            status = 1;
        } else {
            if (all)
                for (size_t i = 0; i < r.n; i++)
                    printf("%d\t%.6f\t%s\n", r.responses[i].decoder, r.responses[i].score,
                           r.responses[i].text);
            else
                printf("%s\n", r.responses[0].text);
            if (history_add(&h, r.responses[0].text)) {
                fprintf(stderr, "nzp chat: out of memory\n");
                status = 1;
                nz_dlg_result_free(&r);
                break;
            }
        }
        if (all) putchar('\n');
        nz_dlg_result_free(&r);
        fflush(stdout);
        if (rc == NZ_E_NOMEM) break;
    }
    if (tty) fputc('\n', stderr);
    if (fflush(stdout) || ferror(stdout)) {
        fprintf(stderr, "nzp chat: writing the output failed\n");
        status = 1;
    }
out:
    free(buf);
    history_clear(&h);
    nz_free(h.turns);
    nz_matmul_ctx_free(mc);
    nz_pool_free(pool);
    if (cache && d) nz_cache_forget_model(cache, nz_dialogue_model(d));
    nz_cache_free(cache);
    nz_dialogue_free(d);
    return status;
}
