/* The progress report of long nzp jobs: see nzp_progress.h. */
#include "nzp_progress.h"

#include "nz_common.h"

#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define TTY_INTERVAL_S 0.1 /* at most 10 redraws a second */
#define LINES_AFTER_S  2.0 /* off a terminal, jobs shorter than this print nothing */

void nzp_progress_start(nzp_progress *p, const char *job, const char *unit, int quiet) {
    memset(p, 0, sizeof *p);
    p->out = stderr;
    p->job = job;
    p->unit = unit;
    p->mode = quiet ? NZP_PROGRESS_OFF : isatty(fileno(stderr)) ? NZP_PROGRESS_TTY : NZP_PROGRESS_LINES;
    p->t0 = nz_now_s();
    p->last = -1;
}

/* The binary unit to show b in: its scale (1, 1024, ...) and name. */
static double unit_of(double b, const char **name) {
    static const char *const UNITS[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    double scale = 1;
    while (b >= 1024 * scale && u < 4) {
        scale *= 1024;
        u++;
    }
    *name = UNITS[u];
    return scale;
}

/* "13.2/24.1 MiB": done and total in the total's unit */
static void fmt_bytes_of(char *buf, size_t cap, double done, double total) {
    const char *u;
    double scale = unit_of(total, &u);
    if (scale == 1)
        snprintf(buf, cap, "%.0f/%.0f %s", done, total, u);
    else
        snprintf(buf, cap, "%.1f/%.1f %s", done / scale, total / scale, u);
}

/* "60.2 MiB/s" */
static void fmt_rate(char *buf, size_t cap, double bps) {
    const char *u;
    double scale = unit_of(bps, &u);
    snprintf(buf, cap, scale == 1 ? "%.0f %s/s" : "%.1f %s/s", bps / scale, u);
}

/* "m:ss" or "h:mm:ss"; "--" when unknown */
static void fmt_time(char *buf, size_t cap, double s) {
    if (!(s >= 0 && s < 360000)) {
        snprintf(buf, cap, "--");
        return;
    }
    unsigned t = (unsigned)(s + 0.5);
    if (t >= 3600)
        snprintf(buf, cap, "%u:%02u:%02u", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(buf, cap, "%u:%02u", t / 60, t % 60);
}

/* The terminal's width in columns (80 when unknown). */
static int tty_columns(FILE *f) {
    struct winsize ws;
    if (ioctl(fileno(f), TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0) return ws.ws_col;
    return 80;
}

void nzp_progress_update(nzp_progress *p, uint64_t items_done, uint64_t items_total, uint64_t bytes_done,
                         uint64_t bytes_total, const char *name) {
    if (p->mode == NZP_PROGRESS_OFF) return;
    double now = nz_now_s(), el = now - p->t0;
    double frac = bytes_total   ? (double)bytes_done / (double)bytes_total
                  : items_total ? (double)items_done / (double)items_total
                                : 1.0;
    int end = items_done >= items_total && bytes_done >= bytes_total;
    if (p->mode == NZP_PROGRESS_TTY && !end && p->last >= 0 && now - p->last < TTY_INTERVAL_S) return;
    int decile = (int)(frac * 10 + 1e-9);
    if (p->mode == NZP_PROGRESS_LINES && (el < LINES_AFTER_S || decile <= p->decile)) return;

    char bytes[64], rate[32], eta[16], elapsed[32] = "";
    fmt_bytes_of(bytes, sizeof bytes, (double)bytes_done, (double)bytes_total);
    double bps = el > 0 ? (double)bytes_done / el : 0;
    fmt_rate(rate, sizeof rate, bps);
    fmt_time(eta, sizeof eta, end ? 0 : bps > 0 ? (double)(bytes_total - bytes_done) / bps : -1);
    if (p->mode == NZP_PROGRESS_LINES) { /* a log line says when; the terminal line has room for the name */
        char t[16];
        fmt_time(t, sizeof t, el);
        snprintf(elapsed, sizeof elapsed, "  %s elapsed", t);
    }
    char line[512];
    int n = snprintf(line, sizeof line, "nzp %s: %3.0f%%  %llu/%llu %s  %s  %s%s  ETA %s", p->job, 100 * frac,
                     (unsigned long long)items_done, (unsigned long long)items_total, p->unit, bytes, rate,
                     elapsed, eta);
    if (p->mode == NZP_PROGRESS_LINES) {
        p->decile = decile;
        fprintf(p->out, "%s\n", line);
    } else {
        if (name && n > 0 && (size_t)n < sizeof line)
            snprintf(line + n, sizeof line - (size_t)n, "  %s", name);
        int cols = tty_columns(p->out);
        if (cols > 1 && strlen(line) >= (size_t)cols)
            line[cols - 1] = 0; /* one row: \r must reach its start */
        fprintf(p->out, "\r%s\033[K", line);
        p->drawn = 1;
        p->last = now;
    }
    fflush(p->out);
}

void nzp_progress_engine(void *ud, const nz_progress *pr) {
    nzp_progress_update(ud, pr->items_done, pr->items_total, pr->done, pr->total, pr->name);
}

void nzp_progress_clear(nzp_progress *p) {
    if (p->mode != NZP_PROGRESS_TTY || !p->drawn) return;
    fputs("\r\033[K", p->out);
    fflush(p->out);
    p->drawn = 0;
    p->last = -1;
}

void nzp_progress_end(nzp_progress *p) {
    nzp_progress_clear(p);
    p->mode = NZP_PROGRESS_OFF;
}
