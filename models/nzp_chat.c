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
#include "nz_dialogue.h"

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
    "                [--no-repeat-ngram N] [--rank R] [--all] [--distinct] [--history N] [--cache BYTES]\n"
    "                [--threads N]\n"
    "  one user turn per line on stdin; prints the best-ranked response per turn\n"
    "  Options left out take the model's decoding defaults (its config \"generation\", shown by\n"
    "  `nzp info`), else the built-in ones given here.\n"
    "  --strategy S      greedy (built-in), beam or sample\n"
    "  --beam N          beam size (1..64, default 4; implies --strategy beam)\n"
    "  --length-penalty X  beam score = log-prob sum / length^X (0..10, default 1; more favours longer\n"
    "                    replies; implies beam)\n"
    "  --temperature T   sampling temperature (0..100, default 1; implies --strategy sample)\n"
    "  --top-k K         sample from the K most likely tokens (0: all; implies sample)\n"
    "  --top-p P         nucleus sampling mass (0 < P <= 1, default 1; implies sample)\n"
    "  --seed S          sampling seed (default 0; implies sample)\n"
    "  --decoders LIST   decoders to run, e.g. 0,2 (default: all of the model's)\n"
    "  --max-new-tokens N  response length cap in tokens (1..65536, default 63)\n"
    "  --no-repeat-ngram N  never repeat an N-gram of tokens within a response (HF no_repeat_ngram_size;\n"
    "                    0..65536, default 0 = off; any strategy)\n"
    "  --rank R          logprob (built-in: mean token log-prob) or consensus (the response the other\n"
    "                    decoders' responses agree with most)\n"
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

/* What the command line asked for; the model's defaults ("generation") fill the rest. */
typedef struct chat_args {
    const char *path;
    nz_dlg_choice ch; /* ch.strategy: -1 for the model's default */
    int decs[CHAT_MAX_DECODERS];
    size_t n_decs, cache_bytes;
    uint64_t seed;
    int all, history_n, threads;
} chat_args;

/* One option o into a (v: the argument after it, NULL at the end); *strategy: --strategy's choice;
 * *imp: the strategy the option implies, else -1.
 * @return how many arguments it took (1, or 2 with v), 0 for -h/--help, or -1 when it is bad or
 *         incomplete. */
static int parse_option(chat_args *a, const char *o, const char *v, int *strategy, int *imp) {
    *imp = -1;
    if (!strcmp(o, "-h") || !strcmp(o, "--help")) return 0;
    if (!strcmp(o, "--all")) {
        a->all = 1;
        return 1;
    }
    if (!strcmp(o, "--distinct")) {
        a->ch.distinct = 1;
        return 1;
    }
    if (o[0] != '-' && !a->path) {
        a->path = o;
        return 1;
    }
    if (!v) return -1; /* the options left take a value */
    int bad;
    if (!strcmp(o, "--strategy")) {
        *strategy = !strcmp(v, "greedy")   ? NZ_T5MD_GREEDY
                    : !strcmp(v, "beam")   ? NZ_T5MD_BEAM
                    : !strcmp(v, "sample") ? NZ_T5MD_SAMPLE
                                           : -1;
        bad = *strategy < 0;
    } else if (!strcmp(o, "--beam")) {
        bad = nzp_parse_int(v, 1, 64, &a->ch.beam_size);
        *imp = NZ_T5MD_BEAM;
    } else if (!strcmp(o, "--length-penalty")) {
        bad = nzp_parse_float(v, 0, NZ_DLG_MAX_LENGTH_PENALTY, &a->ch.length_penalty);
        *imp = NZ_T5MD_BEAM;
    } else if (!strcmp(o, "--temperature")) {
        bad = nzp_parse_float(v, 0, 100, &a->ch.temperature);
        *imp = NZ_T5MD_SAMPLE;
    } else if (!strcmp(o, "--top-k")) {
        bad = nzp_parse_int(v, 0, 1000000, &a->ch.top_k);
        *imp = NZ_T5MD_SAMPLE;
    } else if (!strcmp(o, "--top-p")) {
        bad = nzp_parse_float(v, 0, 1, &a->ch.top_p) || !(a->ch.top_p > 0);
        *imp = NZ_T5MD_SAMPLE;
    } else if (!strcmp(o, "--seed")) {
        size_t s = 0;
        bad = nzp_parse_size(v, &s);
        a->seed = (uint64_t)s;
        *imp = NZ_T5MD_SAMPLE;
    } else if (!strcmp(o, "--decoders")) {
        bad = parse_decoders(v, a->decs, &a->n_decs);
    } else if (!strcmp(o, "--max-new-tokens")) {
        bad = nzp_parse_int(v, 1, NZ_T5MD_MAX_NEW_TOKENS, &a->ch.max_new_tokens);
    } else if (!strcmp(o, "--no-repeat-ngram")) {
        bad = nzp_parse_int(v, 0, NZ_T5MD_MAX_NEW_TOKENS, &a->ch.no_repeat_ngram);
    } else if (!strcmp(o, "--rank")) {
        nz_dlg_rank rk;
        bad = nz_dlg_rank_parse(v, &rk) != NZ_OK;
        a->ch.rank = bad ? -1 : (int)rk;
    } else if (!strcmp(o, "--history")) {
        bad = nzp_parse_int(v, 0, INT_MAX, &a->history_n);
    } else if (!strcmp(o, "--cache")) {
        bad = nzp_parse_size(v, &a->cache_bytes);
    } else if (!strcmp(o, "--threads")) {
        bad = nzp_parse_int(v, 1, 64, &a->threads);
    } else {
        return -1;
    }
    return bad ? -1 : 2;
}

static const char *strategy_name(int strategy) {
    return strategy == NZ_T5MD_GREEDY ? "greedy" : strategy == NZ_T5MD_BEAM ? "beam" : "sample";
}

/* The command line into a; --strategy and the options that imply one must agree.
 * @return -1 to go on, or the exit status to return now: 0 after --help, 2 for a usage error (message
 *         on stderr). */
static int parse_args(int argc, char **argv, chat_args *a) {
    memset(a, 0, sizeof *a);
    nz_dlg_choice_init(&a->ch);
    int strategy = -1, implied = -1;
    const char *implied_by = NULL;
    for (int i = 0; i < argc; i++) {
        int imp, took = parse_option(a, argv[i], i + 1 < argc ? argv[i + 1] : NULL, &strategy, &imp);
        if (took == 0) {
            fputs(CHAT_USAGE, stdout);
            return 0;
        }
        if (took < 0) {
            fprintf(stderr, "nzp chat: bad or incomplete option '%s'\n%s", argv[i], CHAT_USAGE);
            return 2;
        }
        if (imp >= 0) {
            if (implied >= 0 && implied != imp) {
                fprintf(stderr, "nzp chat: %s and %s ask for different strategies\n%s", implied_by, argv[i],
                        CHAT_USAGE);
                return 2;
            }
            implied = imp;
            implied_by = argv[i];
        }
        i += took - 1;
    }
    if (!a->path) {
        fprintf(stderr, "nzp chat: no model given\n%s", CHAT_USAGE);
        return 2;
    }
    if (strategy >= 0 && implied >= 0 && strategy != implied) {
        fprintf(stderr, "nzp chat: %s does not apply to --strategy %s\n%s", implied_by,
                strategy_name(strategy), CHAT_USAGE);
        return 2;
    }
    a->ch.strategy = strategy >= 0 ? strategy : implied; /* -1: the model's default */
    return -1;
}

/* The model, the engine it runs on and the decoding options of the session. */
typedef struct chat_session {
    nz_dialogue *d;
    nzp_engine eng;
    nz_dlg_opts o;
    nz_error e; /* the last error: opening the model, then each turn's */
} chat_session;

/* Open a's model with a's options applied to its defaults, then the engine.
 * @return 0, or the exit status (message on stderr): 1 the model or memory failed, 2 options the
 *         model refuses. */
static int session_open(chat_session *s, const chat_args *a) {
    if (nz_dialogue_open(a->path, &s->d, &s->e)) {
        fprintf(stderr, "nzp chat: %s\n", s->e.msg);
        return 1;
    }
    s->o = *nz_dialogue_defaults(s->d);
    if (nz_dlg_choice_apply(&a->ch, &s->o, &s->e)) {
        fprintf(stderr, "nzp chat: %s\n", s->e.msg);
        return 2;
    }
    s->o.gen.decoders = a->n_decs ? a->decs : NULL;
    s->o.gen.n_decoders = a->n_decs;
    s->o.gen.seed = a->seed;
    const nz_t5md_config *c = nz_dialogue_config(s->d);
    for (size_t j = 0; j < s->o.gen.n_decoders; j++)
        if ((size_t)a->decs[j] >= c->num_modes) {
            fprintf(stderr, "nzp chat: --decoders: decoder %d is out of range (the model has %zu)\n",
                    a->decs[j], c->num_modes);
            return 2;
        }
    if (nzp_engine_open(&s->eng, a->cache_bytes, a->threads)) {
        fprintf(stderr, "nzp chat: out of memory\n");
        return 1;
    }
    return 0;
}

static void session_close(chat_session *s) {
    nzp_engine_close(&s->eng, s->d ? nz_dialogue_model(s->d) : NULL);
    nz_dialogue_free(s->d);
}

/* Answer the last turn of h (read at line lineno): print the reply (all: every response, then an
 * empty line) and add the best one to h; when the model fails, the error on stderr, an empty line and
 * the turn dropped from h.
 * @return 0 answered, 1 the turn failed, -1 out of memory: the session ends. */
static int answer_turn(const chat_args *a, chat_session *s, history *h, size_t lineno) {
    size_t first = a->history_n > 0 && h->n > (size_t)a->history_n ? h->n - (size_t)a->history_n : 0;
    nz_dlg_result r;
    int rc = nz_dialogue_run(s->eng.mc, s->d, (const char *const *)h->turns + first, h->n - first, &s->o, &r,
                             &s->e);
    int failed = 0;
    if (rc || !r.n) {
        fprintf(stderr, "nzp chat: line %zu: %s\n", lineno, rc ? s->e.msg : "no response");
        if (!a->all) putchar('\n');
        nz_free(h->turns[--h->n]); /* the failed turn stays out of the conversation */
        failed = 1;
    } else {
        if (a->all)
            for (size_t i = 0; i < r.n; i++)
                printf("%d\t%.6f\t%s\n", r.responses[i].decoder, r.responses[i].score, r.responses[i].text);
        else
            printf("%s\n", r.responses[0].text);
        if (history_add(h, r.responses[0].text)) {
            fprintf(stderr, "nzp chat: out of memory\n");
            nz_dlg_result_free(&r);
            return -1;
        }
    }
    if (a->all) putchar('\n');
    nz_dlg_result_free(&r);
    fflush(stdout);
    return rc == NZ_E_NOMEM ? -1 : failed;
}

/* The conversation: a turn per line of stdin until it ends (see the top of the file).
 * @return the exit status: 0, or 1 when a turn failed or the output could not be written. */
static int chat_loop(const chat_args *a, chat_session *s) {
    const int tty = isatty(0);
    history h = {0};
    char *buf = NULL;
    size_t cap = 0, lineno = 0;
    int status = 0;
    for (;;) {
        if (tty) {
            fputs("> ", stderr);
            fflush(stderr);
        }
        if (nzp_read_line(&buf, &cap, stdin) < 0) break;
        lineno++;
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
        int rc = answer_turn(a, s, &h, lineno);
        if (rc) status = 1;
        if (rc < 0) break;
    }
    if (tty) fputc('\n', stderr);
    if (fflush(stdout) || ferror(stdout)) {
        fprintf(stderr, "nzp chat: writing the output failed\n");
        status = 1;
    }
    free(buf);
    history_clear(&h);
    nz_free(h.turns);
    return status;
}

int nzp_chat(int argc, char **argv) {
    chat_args a;
    int status = parse_args(argc, argv, &a);
    if (status >= 0) return status;
    chat_session s = {0};
    status = session_open(&s, &a);
    if (!status) status = chat_loop(&a, &s);
    session_close(&s);
    return status;
}
