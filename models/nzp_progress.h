/*
 * nzp_progress.h — the progress report of long nzp jobs (pack, verify,
 * bench) on stderr: items and bytes done of the total, rate and ETA.
 *
 * On a terminal: one line rewritten in place (\r) at most 10 times a second,
 * erased when the job ends so the subcommand's summary line stands alone.
 * Elsewhere (a pipe, a log file): nothing for jobs under 2 s, then a line
 * each time another 10 % is done (at most 10 lines). --quiet: nothing.
 */
#ifndef NZP_PROGRESS_H
#define NZP_PROGRESS_H

#include "nz_pack.h"

#include <stdint.h>
#include <stdio.h>

typedef enum { NZP_PROGRESS_OFF, NZP_PROGRESS_TTY, NZP_PROGRESS_LINES } nzp_progress_mode;

typedef struct nzp_progress {
    FILE *out; /* stderr */
    nzp_progress_mode mode;
    const char *job;  /* "pack", "verify", "bench": the line's prefix */
    const char *unit; /* what the items are: "tensors", "tiles" */
    double t0, last;  /* start; last line drawn (TTY) */
    int decile;       /* last 10 % step reached (LINES) */
    int drawn;        /* TTY: a line is on the terminal */
} nzp_progress;

/** Start reporting job's progress on stderr: off when quiet, else one line
 *  rewritten in place when stderr is a terminal, else line-based.
 *  @return nothing. */
void nzp_progress_start(nzp_progress *p, const char *job, const char *unit, int quiet);

/** Report items_done of items_total and bytes_done of bytes_total; name (may
 *  be NULL) is what is being worked on. Draws only when it is time to (TTY:
 *  every 0.1 s and at the end; LINES: at each further 10 % after 2 s).
 *  @return nothing. */
void nzp_progress_update(nzp_progress *p, uint64_t items_done, uint64_t items_total, uint64_t bytes_done,
                         uint64_t bytes_total, const char *name);

/** An nz_progress_fn for the engine's walks (nz_pack, nz_verify_with): ud is
 *  the nzp_progress. @return nothing. */
void nzp_progress_engine(void *ud, const nz_progress *pr);

/** Erase the terminal line, if one is drawn, so other output (an error, a
 *  summary) starts on a clean line; the report goes on at the next update.
 *  @return nothing. */
void nzp_progress_clear(nzp_progress *p);

/** The job is over (done or failed): erase the terminal line.
 *  @return nothing. */
void nzp_progress_end(nzp_progress *p);

#endif
