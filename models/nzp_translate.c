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
#include "nzp_args.h"
#include "nz_container.h"
#include "nz_translator.h"
#include "nz_weight.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char TRANSLATE_USAGE[] =
    "usage: nzp translate MODEL.nzp [--iter T] [--beam B] [--rerank | --no-rerank] [--adaptive | --fixed]\n"
    "                     [--nat | --at | --at-beam K] [--lenpen X] [--max-len N] [--batch K]\n"
    "                     [--cache BYTES] [--threads N] [--tokens] < in.txt > out.txt\n"
    "  Options left out take the model's decoding defaults (its config \"generation\", shown by\n"
    "  `nzp info`), else the built-in ones given here.\n"
    "  --iter T      mask-predict refinement iterations: T + 1 decoder passes (built-in 10)\n"
    "  --beam B      length beam: candidate lengths per sentence (built-in 5)\n"
    "  --rerank      pick the length candidate by the AT decoder's score (--no-rerank: by its own)\n"
    "  --adaptive    stop a candidate whose tokens did not change in a pass (fairseq's generator\n"
    "                default; it can leave <unk> masks in the output). --fixed: always T + 1 passes\n"
    "                (built-in; fairseq --iter-decode-force-max-iter)\n"
    "  --nat         decode with mask-predict (built-in)\n"
    "  --at          decode with the autoregressive decoder, greedy\n"
    "  --at-beam K   decode with the autoregressive decoder, beam search of K\n"
    "  --lenpen X    AT beam length penalty: score = sum log-prob / length^X (built-in 1.0)\n"
    "  --max-len N   cap output length (tokens without bos/eos; built-in: the model's)\n"
    "  --batch K     sentences decoded together (default 16)\n"
    "  --cache BYTES decoded-tile cache budget (default 0: decode weights on every use)\n"
    "  --threads N   threads (default: all cores)\n"
    "  --tokens      print token ids instead of text\n"
    "  -h, --help    this text\n";

typedef struct opts {
    nz_tr_opts tr; /* the model's defaults with the command line's choices applied */
    int tokens, threads;
    size_t batch, cache;
} opts;

/* Print one result line (text or ids); @return 0, or -1 when it failed. */
static int emit(const opts *o, const nz_tr_result *r, size_t lineno) {
    if (r->rc) {
        fprintf(stderr, "nzp translate: line %zu: %s\n", lineno, r->err.msg);
        putchar('\n');
        return -1;
    }
    if (o->tokens)
        for (size_t i = 0; i < r->n_tokens; i++) printf(i ? " %d" : "%d", (int)r->tokens[i]);
    else
        fwrite(r->text, 1, r->text_len, stdout);
    putchar('\n');
    return 0;
}

/* Translate lines[0..n) as one batch and print the results.
 * @return the number of lines that failed, or -1 on a fatal error. */
static long run_batch(nz_matmul_ctx *mc, const nz_translator *t, const opts *o, char **lines, size_t n,
                      size_t first_line) {
    nz_tr_result *res = nz_calloc(n, sizeof *res, NZ_MEM_OTHER);
    if (!res) {
        fprintf(stderr, "nzp translate: out of memory\n");
        return -1;
    }
    nz_error e = {0};
    int rc = nz_translator_run(mc, t, (const char *const *)lines, NULL, n, &o->tr, !o->tokens, res, &e);
    long failed = -1;
    if (rc == NZ_E_INVALID_ARG || rc == NZ_E_UNSUPPORTED) {
        fprintf(stderr, "nzp translate: %s\n", e.msg);
    } else {
        failed = 0;
        for (size_t i = 0; i < n; i++)
            if (emit(o, &res[i], first_line + i)) failed++;
        fflush(stdout);
    }
    nz_tr_results_free(res, n);
    nz_free(res);
    return failed;
}

/* The command line into o (its batch, cache, threads and tokens), *ch (the decoding choices) and *path.
 * @return -1 to go on, or the exit status to return now: 0 after --help, 2 for a usage error (message
 *         on stderr). */
static int parse_args(int argc, char **argv, opts *o, nz_tr_choice *ch, const char **path) {
    memset(o, 0, sizeof *o);
    nz_tr_choice_init(ch);
    o->batch = 16;
    *path = NULL;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int bad = 0;
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            fputs(TRANSLATE_USAGE, stdout);
            return 0;
        } else if (!strcmp(a, "--iter") && v)
            bad = nzp_parse_int(v, 0, 1000, &ch->iterations), i++;
        else if (!strcmp(a, "--beam") && v)
            bad = nzp_parse_int(v, 1, 100, &ch->length_beam), i++;
        else if (!strcmp(a, "--max-len") && v)
            bad = nzp_parse_int(v, 1, 65535, &ch->max_length), i++;
        else if (!strcmp(a, "--batch") && v)
            bad = nzp_parse_size(v, &o->batch) || !o->batch || o->batch > 4096, i++;
        else if (!strcmp(a, "--cache") && v)
            bad = nzp_parse_size(v, &o->cache), i++;
        else if (!strcmp(a, "--threads") && v)
            bad = nzp_parse_int(v, 1, 64, &o->threads), i++;
        else if (!strcmp(a, "--rerank") || !strcmp(a, "--no-rerank"))
            ch->rerank = !strcmp(a, "--rerank");
        else if (!strcmp(a, "--adaptive") || !strcmp(a, "--fixed"))
            ch->adaptive = !strcmp(a, "--adaptive");
        else if (!strcmp(a, "--nat"))
            ch->decoder = 0;
        else if (!strcmp(a, "--at"))
            ch->decoder = 1, ch->beam_size = 1;
        else if (!strcmp(a, "--at-beam") && v)
            bad = nzp_parse_int(v, 1, 100, &ch->beam_size), ch->decoder = 1, i++;
        else if (!strcmp(a, "--lenpen") && v)
            bad = nzp_parse_float(v, -100, 100, &ch->lenpen), i++;
        else if (!strcmp(a, "--tokens"))
            o->tokens = 1;
        else if (a[0] != '-' && !*path)
            *path = a;
        else
            bad = 1;
        if (bad) {
            fprintf(stderr, "nzp translate: bad or incomplete option '%s'\n%s", a, TRANSLATE_USAGE);
            return 2;
        }
    }
    if (!*path) {
        fprintf(stderr, "nzp translate: no model given\n%s", TRANSLATE_USAGE);
        return 2;
    }
    return -1;
}

/* Open the model at path into *tr, with ch applied to its defaults in o->tr.
 * @return 0, or -1 (message on stderr). */
static int open_translator(const char *path, const nz_tr_choice *ch, opts *o, nz_translator **tr) {
    nz_error e = {0};
    if (nz_translator_open(path, tr, &e)) {
        fprintf(stderr, "nzp translate: %s\n", e.msg);
        return -1;
    }
    o->tr = *nz_translator_defaults(*tr);
    if (nz_tr_choice_apply(ch, &o->tr, &e)) {
        fprintf(stderr, "nzp translate: %s\n", e.msg);
        return -1;
    }
    return 0;
}

/* Translate stdin to stdout in batches of o->batch lines (lines: room for a batch).
 * @return the exit status: 0, or 1 when a line or a batch failed or the output could not be written. */
static int translate_lines(nz_matmul_ctx *mc, const nz_translator *tr, const opts *o, char **lines) {
    size_t n = 0, lineno = 0, cap = 0;
    long failed = 0;
    char *buf = NULL;
    int status = 0;
    while (nzp_read_line(&buf, &cap, stdin) >= 0) {
        lineno++;
        if (!(lines[n] = nz_strdup(buf))) {
            status = 1;
            break;
        }
        if (++n == o->batch) {
            long f = run_batch(mc, tr, o, lines, n, lineno - n + 1);
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
        long f = run_batch(mc, tr, o, lines, n, lineno - n + 1);
        if (f < 0) status = 1;
        failed += f > 0 ? f : 0;
    }
    for (size_t i = 0; i < n; i++) nz_free(lines[i]);
    if (failed) status = 1;
    if (fflush(stdout) || ferror(stdout)) {
        fprintf(stderr, "nzp translate: writing the output failed\n");
        status = 1;
    }
    return status;
}

int nzp_translate(int argc, char **argv) {
    opts o;
    nz_tr_choice ch;
    const char *path;
    int status = parse_args(argc, argv, &o, &ch, &path);
    if (status >= 0) return status;
    nz_translator *tr = NULL;
    nzp_engine eng = {0};
    char **lines = NULL;
    status = 1;
    if (!open_translator(path, &ch, &o, &tr)) {
        int engine_failed = nzp_engine_open(&eng, o.cache, o.threads);
        lines = nz_calloc(o.batch, sizeof *lines, NZ_MEM_OTHER);
        if (engine_failed || !lines)
            fprintf(stderr, "nzp translate: out of memory\n");
        else
            status = translate_lines(eng.mc, tr, &o, lines);
    }
    nz_free(lines);
    nzp_engine_close(&eng, tr ? nz_translator_model(tr) : NULL);
    nz_translator_free(tr);
    return status;
}
