/*
 * srv_log.c — see srv_log.h. A line is built in a stack buffer (grown onto
 * the heap when needed), then written with one fwrite under a mutex.
 */
#include "srv_log.h"
#include "srv_text.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static atomic_int g_level = SRV_LOG_INFO;
static atomic_int g_format = SRV_LOG_LOGFMT;
static FILE *g_out; /* NULL: stderr; guarded by g_mu */

static const char *const LEVEL_NAMES[] = {"debug", "info", "warn", "error"};

static int clamp_level(int lvl) {
    return lvl < SRV_LOG_DEBUG ? SRV_LOG_DEBUG : lvl > SRV_LOG_ERROR ? SRV_LOG_ERROR : lvl;
}

/* ------------------------------------------------------------ line buffer */

typedef struct lbuf {
    char *p;
    size_t len, cap;
    int heap; /* p is malloc'ed */
    int oom;  /* an append failed: the line is incomplete */
} lbuf;

static int lb_reserve(lbuf *b, size_t extra) {
    if (b->oom) return -1;
    if (b->len + extra < b->cap) return 0; /* keep room for a NUL */
    size_t cap = b->cap * 2;
    if (cap < b->len + extra + 1) cap = b->len + extra + 1;
    char *p = b->heap ? realloc(b->p, cap) : malloc(cap);
    if (!p) {
        b->oom = 1;
        return -1;
    }
    if (!b->heap) memcpy(p, b->p, b->len);
    b->p = p;
    b->cap = cap;
    b->heap = 1;
    return 0;
}

static void lb_put(lbuf *b, const char *s, size_t n) {
    if (lb_reserve(b, n)) return;
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void lb_putc(lbuf *b, char c) {
    if (lb_reserve(b, 1)) return;
    b->p[b->len++] = c;
}

static void lb_puts(lbuf *b, const char *s) { lb_put(b, s, strlen(s)); }

/* --------------------------------------------------------------- encoding */

static const char HEX[] = "0123456789abcdef";

static void put_u00(lbuf *b, unsigned char c) {
    char e[6] = {'\\', 'u', '0', '0', HEX[c >> 4], HEX[c & 15]};
    lb_put(b, e, 6);
}

/* Shortest "%g" form that reads back as the same double (v finite). */
static void fmt_double(char *buf, size_t n, double v) {
    for (int prec = 15; prec <= 17; prec++) {
        snprintf(buf, n, "%.*g", prec, v);
        if (strtod(buf, NULL) == v) return;
    }
}

/* JSON string with quotes: escapes per RFC 8259, invalid UTF-8 -> \ufffd. */
static void json_str(lbuf *b, const char *str) {
    const unsigned char *s = (const unsigned char *)(str ? str : "");
    size_t n = strlen((const char *)s);
    lb_putc(b, '"');
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        if (c >= 0x80) {
            size_t k = srv_utf8_seq(s + i, n - i);
            if (k) {
                lb_put(b, (const char *)s + i, k);
                i += k;
            } else {
                lb_put(b, "\\ufffd", 6);
                i++;
            }
            continue;
        }
        switch (c) {
        case '"':
            lb_put(b, "\\\"", 2);
            break;
        case '\\':
            lb_put(b, "\\\\", 2);
            break;
        case '\n':
            lb_put(b, "\\n", 2);
            break;
        case '\r':
            lb_put(b, "\\r", 2);
            break;
        case '\t':
            lb_put(b, "\\t", 2);
            break;
        case '\b':
            lb_put(b, "\\b", 2);
            break;
        case '\f':
            lb_put(b, "\\f", 2);
            break;
        default:
            if (c < 0x20 || c == 0x7f)
                put_u00(b, c);
            else
                lb_putc(b, (char)c);
        }
        i++;
    }
    lb_putc(b, '"');
}

/* logfmt value: bare unless empty or holding a space, '"', '=' or a control
 * byte; then quoted with \" \\ \n \t and \u00XX for other control bytes.
 * Invalid UTF-8 becomes U+FFFD either way. */
static void logfmt_val(lbuf *b, const char *str) {
    const unsigned char *s = (const unsigned char *)(str ? str : "");
    size_t n = strlen((const char *)s);
    int quote = n == 0;
    for (size_t i = 0; i < n && !quote; i++)
        if (s[i] <= ' ' || s[i] == '"' || s[i] == '=' || s[i] == 0x7f) quote = 1;
    if (quote) lb_putc(b, '"');
    for (size_t i = 0; i < n;) {
        unsigned char c = s[i];
        if (c >= 0x80) {
            size_t k = srv_utf8_seq(s + i, n - i);
            if (k) {
                lb_put(b, (const char *)s + i, k);
                i += k;
            } else {
                lb_put(b, "\xef\xbf\xbd", 3);
                i++;
            }
            continue;
        }
        if (quote && c == '"')
            lb_put(b, "\\\"", 2);
        else if (quote && c == '\\')
            lb_put(b, "\\\\", 2);
        else if (c == '\n')
            lb_put(b, "\\n", 2);
        else if (c == '\t')
            lb_put(b, "\\t", 2);
        else if (c < 0x20 || c == 0x7f)
            put_u00(b, c);
        else
            lb_putc(b, (char)c);
        i++;
    }
    if (quote) lb_putc(b, '"');
}

/* logfmt key: printable ASCII other than '=' and '"'; anything else becomes
 * '_' (an empty key becomes "_"). */
static void logfmt_key(lbuf *b, const char *key) {
    const unsigned char *s = (const unsigned char *)key;
    if (!*s) lb_putc(b, '_');
    for (; *s; s++) lb_putc(b, (*s > ' ' && *s < 0x7f && *s != '=' && *s != '"') ? (char)*s : '_');
}

/* ------------------------------------------------------------------ lines */

static void put_key(lbuf *b, int json, const char *key) {
    if (json) {
        lb_putc(b, ',');
        json_str(b, key);
        lb_putc(b, ':');
    } else {
        lb_putc(b, ' ');
        logfmt_key(b, key);
        lb_putc(b, '=');
    }
}

static void put_header(lbuf *b, int json, int lvl, const char *event) {
    struct timespec now;
    struct tm tm;
    char ts[64];
    clock_gettime(CLOCK_REALTIME, &now);
    gmtime_r(&now.tv_sec, &tm);
    snprintf(ts, sizeof ts, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
             tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(now.tv_nsec / 1000000));
    if (json) {
        lb_puts(b, "{\"ts\":\"");
        lb_puts(b, ts);
        lb_puts(b, "\",\"level\":\"");
        lb_puts(b, LEVEL_NAMES[lvl]);
        lb_puts(b, "\",\"event\":");
        json_str(b, event);
    } else {
        lb_puts(b, "ts=");
        lb_puts(b, ts);
        lb_puts(b, " level=");
        lb_puts(b, LEVEL_NAMES[lvl]);
        lb_puts(b, " event=");
        logfmt_val(b, event);
    }
}

static void put_pairs(lbuf *b, int json, va_list ap) {
    char num[64];
    const char *key;
    while ((key = va_arg(ap, const char *)) != NULL) {
        int tag = va_arg(ap, int);
        switch (tag) {
        case SRV_KV_STR: {
            const char *v = va_arg(ap, const char *);
            put_key(b, json, key);
            if (json)
                json_str(b, v);
            else
                logfmt_val(b, v);
            break;
        }
        case SRV_KV_INT:
            snprintf(num, sizeof num, "%lld", va_arg(ap, long long));
            put_key(b, json, key);
            lb_puts(b, num);
            break;
        case SRV_KV_UINT:
            snprintf(num, sizeof num, "%llu", va_arg(ap, unsigned long long));
            put_key(b, json, key);
            lb_puts(b, num);
            break;
        case SRV_KV_DBL: {
            double v = va_arg(ap, double);
            put_key(b, json, key);
            if (isfinite(v)) {
                fmt_double(num, sizeof num, v);
                lb_puts(b, num);
            } else {
                lb_puts(b, json ? "null" : isnan(v) ? "nan" : v > 0 ? "inf" : "-inf");
            }
            break;
        }
        case SRV_KV_BOOL:
            put_key(b, json, key);
            lb_puts(b, va_arg(ap, int) ? "true" : "false");
            break;
        default:
            put_key(b, json, "log_error");
            if (json)
                json_str(b, "bad_kv_type");
            else
                logfmt_val(b, "bad_kv_type");
            return;
        }
    }
}

static void write_line(const char *p, size_t n) {
    pthread_mutex_lock(&g_mu);
    FILE *out = g_out ? g_out : stderr;
    fwrite(p, 1, n, out);
    fflush(out);
    pthread_mutex_unlock(&g_mu);
}

void srv_logv(srv_log_level lvl, const char *event, va_list ap) {
    int l = clamp_level((int)lvl);
    if (l < atomic_load_explicit(&g_level, memory_order_relaxed)) return;
    int json = atomic_load_explicit(&g_format, memory_order_relaxed) == SRV_LOG_JSON;
    char stack[1024];
    lbuf b = {stack, 0, sizeof stack, 0, 0};
    put_header(&b, json, l, event);
    put_pairs(&b, json, ap);
    if (json) lb_putc(&b, '}');
    lb_putc(&b, '\n');
    if (b.oom) {
        /* Out of memory: say so on a short line that fits the stack buffer. */
        if (b.heap) free(b.p);
        b = (lbuf){stack, 0, sizeof stack, 0, 0};
        put_header(&b, json, l, "log_truncated");
        put_key(&b, json, "reason");
        if (json)
            json_str(&b, "out_of_memory");
        else
            logfmt_val(&b, "out_of_memory");
        if (json) lb_putc(&b, '}');
        lb_putc(&b, '\n');
    }
    if (!b.oom) write_line(b.p, b.len);
    if (b.heap) free(b.p);
}

void srv_log(srv_log_level lvl, const char *event, ...) {
    va_list ap;
    va_start(ap, event);
    srv_logv(lvl, event, ap);
    va_end(ap);
}

void srv_log_setup(srv_log_level min_level, srv_log_format fmt, FILE *out) {
    pthread_mutex_lock(&g_mu);
    atomic_store(&g_level, clamp_level((int)min_level));
    atomic_store(&g_format, fmt == SRV_LOG_JSON ? SRV_LOG_JSON : SRV_LOG_LOGFMT);
    g_out = out;
    pthread_mutex_unlock(&g_mu);
}

int srv_log_enabled(srv_log_level lvl) {
    return clamp_level((int)lvl) >= atomic_load_explicit(&g_level, memory_order_relaxed);
}

const char *srv_log_level_name(srv_log_level lvl) { return LEVEL_NAMES[clamp_level((int)lvl)]; }

int srv_log_level_parse(const char *s, srv_log_level *lvl) {
    static const struct {
        const char *name;
        srv_log_level lvl;
    } names[] = {{"debug", SRV_LOG_DEBUG},
                 {"info", SRV_LOG_INFO},
                 {"warn", SRV_LOG_WARN},
                 {"warning", SRV_LOG_WARN},
                 {"error", SRV_LOG_ERROR}};
    if (!s || !lvl) return -1;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (!strcasecmp(s, names[i].name)) {
            *lvl = names[i].lvl;
            return 0;
        }
    }
    return -1;
}

int srv_log_format_parse(const char *s, srv_log_format *fmt) {
    if (!s || !fmt) return -1;
    if (!strcasecmp(s, "logfmt")) {
        *fmt = SRV_LOG_LOGFMT;
        return 0;
    }
    if (!strcasecmp(s, "json")) {
        *fmt = SRV_LOG_JSON;
        return 0;
    }
    return -1;
}
