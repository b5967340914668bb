/*
 * srv_log.h — structured logging for the server: one line per event, in
 * logfmt or JSON, to a FILE* (stderr by default).
 *
 *   srv_log(SRV_LOG_INFO, "request", "method", SRV_KV_STR, "POST", "status", SRV_KV_INT, 200LL,
 *           "latency_ms", SRV_KV_DBL, 1.5, NULL);
 *
 * logfmt:  ts=2026-11-29T03:40:00.123Z level=info event=request method=POST status=200 latency_ms=1.5
 * JSON:    {"ts":"2026-11-29T03:40:00.123Z","level":"info","event":"request","method":"POST",...}
 *
 * After the event name come key/value pairs, ended by a NULL key. Every
 * value is preceded by its type tag (SRV_KV_*), and the value must have
 * exactly the tag's C type (varargs do not convert: pass 200LL, not 200, for
 * SRV_KV_INT); the SRV_KVS/SRV_KVI/... macros below add the tag and the cast.
 *
 * Each line is built in memory and written with one fwrite under a mutex,
 * then flushed, so lines from concurrent threads never interleave. Every
 * function is thread-safe. Invalid UTF-8 in keys or values is replaced by
 * U+FFFD, so JSON lines are always valid JSON.
 */
#ifndef SRV_LOG_H
#define SRV_LOG_H

#include <stdarg.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The enums live here only; srv_config.h includes this header. */
/** Severity of an event; events below the configured minimum are dropped. */
typedef enum { SRV_LOG_DEBUG = 0, SRV_LOG_INFO, SRV_LOG_WARN, SRV_LOG_ERROR } srv_log_level;

/** Line format. */
typedef enum { SRV_LOG_LOGFMT = 0, SRV_LOG_JSON } srv_log_format;

/** Type tag preceding each value in srv_log's pairs. */
enum {
    SRV_KV_STR = 1, /* const char * (NULL prints as an empty string) */
    SRV_KV_INT,     /* long long */
    SRV_KV_UINT,    /* unsigned long long */
    SRV_KV_DBL,     /* double (non-finite: nan/inf/-inf in logfmt, null in JSON) */
    SRV_KV_BOOL     /* int (0 false, anything else true) */
};

/* Convenience: one key/value pair with its tag and the right C type. */
#define SRV_KVS(k, v) (k), SRV_KV_STR, (const char *)(v)
#define SRV_KVI(k, v) (k), SRV_KV_INT, (long long)(v)
#define SRV_KVU(k, v) (k), SRV_KV_UINT, (unsigned long long)(v)
#define SRV_KVD(k, v) (k), SRV_KV_DBL, (double)(v)
#define SRV_KVB(k, v) (k), SRV_KV_BOOL, (int)((v) != 0)

/** Configure the process-wide logger (default: SRV_LOG_INFO, SRV_LOG_LOGFMT,
 *  stderr). out = NULL means stderr. The logger never closes out: a caller
 *  that closes it must first switch to another stream.
 *  @return nothing. */
void srv_log_setup(srv_log_level min_level, srv_log_format fmt, FILE *out);

/** Log one event: a line with ts, level and event, then the pairs (key,
 *  tag, value, ..., NULL). A pair with an unknown tag ends the list (its
 *  value cannot be read) and adds log_error="bad_kv_type".
 *  @return nothing. */
void srv_log(srv_log_level lvl, const char *event, ...);

/** srv_log with the pairs in a va_list (consumed; the caller va_end's it).
 *  @return nothing. */
void srv_logv(srv_log_level lvl, const char *event, va_list ap);

/** @return 1 when events of level lvl are written under the current setup,
 *  else 0 (use it to skip expensive argument preparation). */
int srv_log_enabled(srv_log_level lvl);

/** @return "debug", "info", "warn" or "error" (out-of-range levels are
 *  clamped to the nearest). */
const char *srv_log_level_name(srv_log_level lvl);

/** Parse a level name ("debug", "info", "warn"/"warning", "error",
 *  case-insensitive) into *lvl.
 *  @return 0, or -1 (unknown name; *lvl untouched). */
int srv_log_level_parse(const char *s, srv_log_level *lvl);

/** Parse a format name ("logfmt", "json", case-insensitive) into *fmt.
 *  @return 0, or -1 (unknown name; *fmt untouched). */
int srv_log_format_parse(const char *s, srv_log_format *fmt);

#ifdef __cplusplus
}
#endif

#endif
