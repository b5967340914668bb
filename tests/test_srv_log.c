/* Structured logging: logfmt quoting and escaping, JSON validity (checked
 * with jansson), level filtering, whole lines under concurrent writers. */
#include "test_util.h"

#include "srv_log.h"

#include <jansson.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>

/* ---------------------------------------------------------------- helpers */

/* Send the log to a fresh temporary file. */
static FILE *capture(srv_log_level lvl, srv_log_format fmt) {
    FILE *f = tmpfile();
    assert_non_null(f);
    srv_log_setup(lvl, fmt, f);
    return f;
}

/* Restore the default setup, close f and return everything written to it
 * (malloc'ed, NUL-terminated). */
static char *finish(FILE *f) {
    srv_log_setup(SRV_LOG_INFO, SRV_LOG_LOGFMT, NULL);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    char *s = xmalloc((size_t)n + 1);
    assert_int_equal(fread(s, 1, (size_t)n, f), (size_t)n);
    s[n] = '\0';
    fclose(f);
    return s;
}

static size_t count_lines(const char *s) {
    size_t n = 0;
    for (; *s; s++) n += *s == '\n';
    return n;
}

static int is_digits(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9') return 0;
    return 1;
}

/* ts is "YYYY-MM-DDTHH:MM:SS.mmmZ" (24 characters). */
static void check_ts(const char *ts) {
    assert_true(is_digits(ts, 4) && ts[4] == '-' && is_digits(ts + 5, 2) && ts[7] == '-' &&
                is_digits(ts + 8, 2));
    assert_true(ts[10] == 'T' && is_digits(ts + 11, 2) && ts[13] == ':' && is_digits(ts + 14, 2) &&
                ts[16] == ':');
    assert_true(is_digits(ts + 17, 2) && ts[19] == '.' && is_digits(ts + 20, 3) && ts[23] == 'Z');
    assert_true(ts[0] == '2'); /* this millennium */
}

/* A logfmt line: check "ts=<timestamp>" and return what follows it. */
static const char *after_ts(const char *line) {
    assert_memory_equal(line, "ts=", 3);
    check_ts(line + 3);
    return line + 3 + 24;
}

/* Parse every line of s as JSON; returns the array of objects. */
static json_t *parse_lines(const char *s) {
    json_t *arr = json_array();
    while (*s) {
        const char *nl = strchr(s, '\n');
        assert_non_null(nl); /* every line ends with a newline */
        json_error_t err;
        json_t *j = json_loadb(s, (size_t)(nl - s), 0, &err);
        if (!j) fail_msg("invalid JSON line (%s): %.*s", err.text, (int)(nl - s), s);
        assert_true(json_is_object(j));
        const char *ts = json_string_value(json_object_get(j, "ts"));
        assert_non_null(ts);
        assert_int_equal(strlen(ts), 24);
        check_ts(ts);
        json_array_append_new(arr, j);
        s = nl + 1;
    }
    return arr;
}

/* ------------------------------------------------------------------ tests */

/* Every quoting and escaping rule, checked against the exact line. */
static void test_logfmt_quoting(void **state) {
    FILE *f = capture(SRV_LOG_DEBUG, SRV_LOG_LOGFMT);
    srv_log(SRV_LOG_INFO, "request", "method", SRV_KV_STR, "POST", "path", SRV_KV_STR, "/v1/translate", "sp",
            SRV_KV_STR, "a b", "q", SRV_KV_STR, "say \"hi\"", "eq", SRV_KV_STR, "a=b", "nl", SRV_KV_STR,
            "x\ny\tz\\w", "ctl", SRV_KV_STR, "\x01\x1f\x7f\r", "empty", SRV_KV_STR, "", "null", SRV_KV_STR,
            (const char *)NULL, "bs", SRV_KV_STR, "C:\\dir", "utf", SRV_KV_STR, "h\xc3\xa9llo\xe2\x82\xac",
            "bad", SRV_KV_STR,
            "a\xff"
            "z",
            "n", SRV_KV_INT, -5LL, "u", SRV_KV_UINT, 18446744073709551615ULL, "d", SRV_KV_DBL, 1.5, "d2",
            SRV_KV_DBL, 0.1, "big", SRV_KV_DBL, 1e300, "b", SRV_KV_BOOL, 1, "f", SRV_KV_BOOL, 0, "inf",
            SRV_KV_DBL, INFINITY, "ninf", SRV_KV_DBL, -INFINITY, "nan", SRV_KV_DBL, NAN, NULL);
    srv_log(SRV_LOG_WARN, "two words", "a b=\"c", SRV_KV_STR, "v", "", SRV_KV_INT, 1LL, NULL);
    srv_log(SRV_LOG_ERROR, "bare", NULL);
    srv_log(SRV_LOG_DEBUG, "macros", SRV_KVS("s", "x"), SRV_KVI("i", 200), SRV_KVU("u", 7u), SRV_KVD("d", 2),
            SRV_KVB("b", 5), NULL);
    srv_log(SRV_LOG_INFO, "badtag", "ok", SRV_KV_INT, 1LL, "oops", 99, 123, NULL);
    srv_log(SRV_LOG_INFO, "sp ace\"=", "k", SRV_KV_STR, "tab\there", NULL);
    char *s = finish(f);
    assert_int_equal(count_lines(s), 6);

    static const char *const want[] = {
        " level=info event=request method=POST path=/v1/translate sp=\"a b\" q=\"say \\\"hi\\\"\" eq=\"a=b\""
        " nl=\"x\\ny\\tz\\\\w\" ctl=\"\\u0001\\u001f\\u007f\\u000d\" empty=\"\" null=\"\" bs=C:\\dir"
        " utf=h\xc3\xa9llo\xe2\x82\xac bad=a\xef\xbf\xbdz n=-5 u=18446744073709551615 d=1.5 d2=0.1 big=1e+300"
        " b=true f=false inf=inf ninf=-inf nan=nan",
        " level=warn event=\"two words\" a_b__c=v _=1",
        " level=error event=bare",
        " level=debug event=macros s=x i=200 u=7 d=2 b=true",
        " level=info event=badtag ok=1 log_error=bad_kv_type",
        " level=info event=\"sp ace\\\"=\" k=\"tab\\there\"",
    };
    char *save = NULL, *line = strtok_r(s, "\n", &save);
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        assert_non_null(line);
        assert_string_equal(after_ts(line), want[i]);
        line = strtok_r(NULL, "\n", &save);
    }
    assert_null(line);
    free(s);
}

static void test_json_valid(void **state) {
    FILE *f = capture(SRV_LOG_DEBUG, SRV_LOG_JSON);
    const char *nasty =
        "quote\" back\\ nl\n cr\r tab\t ctl\x01\x1f del\x7f slash/ \xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80";
    srv_log(SRV_LOG_INFO, "request", "method", SRV_KV_STR, "POST", "status", SRV_KV_INT, 200LL, "latency_ms",
            SRV_KV_DBL, 1.5, NULL);
    srv_log(SRV_LOG_WARN, nasty, nasty, SRV_KV_STR, nasty, NULL);
    /* invalid UTF-8: stray continuation, bad lead, truncated, overlong, surrogate, > U+10FFFF */
    srv_log(SRV_LOG_ERROR, "bad\xff", "v1", SRV_KV_STR, "a\x80z", "v2", SRV_KV_STR, "\xfe\xff", "v3",
            SRV_KV_STR, "cut\xe2\x82", "v4", SRV_KV_STR, "\xc0\xaf", "v5", SRV_KV_STR, "\xed\xa0\x80", "v6",
            SRV_KV_STR, "\xf4\x90\x80\x80", "k\xff", SRV_KV_STR, "x", NULL);
    srv_log(SRV_LOG_DEBUG, "numbers", "i", SRV_KV_INT, -9223372036854775807LL - 1, "u", SRV_KV_UINT,
            9223372036854775807ULL, "d", SRV_KV_DBL, -0.25, "tiny", SRV_KV_DBL, 1e-300, "inf", SRV_KV_DBL,
            INFINITY, "nan", SRV_KV_DBL, NAN, "t", SRV_KV_BOOL, 1, "fa", SRV_KV_BOOL, 0, "null", SRV_KV_STR,
            (const char *)NULL, NULL);
    srv_log(SRV_LOG_INFO, "huge", "u", SRV_KV_UINT, 18446744073709551615ULL, NULL);
    srv_log(SRV_LOG_INFO, "badtag", "oops", 42, 1, NULL);
    char *s = finish(f);
    assert_int_equal(count_lines(s), 6);

    /* The largest unsigned value is written exactly: valid JSON, beyond
     * jansson's json_int_t, so check that line as text and parse it as real. */
    char *huge = strstr(s, "\"event\":\"huge\"");
    assert_non_null(huge);
    assert_non_null(strstr(huge, ",\"u\":18446744073709551615}\n"));
    char *huge_line = huge;
    while (huge_line > s && huge_line[-1] != '\n') huge_line--;
    json_error_t err;
    json_t *hj =
        json_loadb(huge_line, (size_t)(strchr(huge, '\n') - huge_line), JSON_DECODE_INT_AS_REAL, &err);
    assert_non_null(hj);
    assert_true(json_real_value(json_object_get(hj, "u")) == 18446744073709551615.0);
    json_decref(hj);
    memmove(huge_line, strchr(huge, '\n') + 1, strlen(strchr(huge, '\n') + 1) + 1); /* drop it */

    json_t *arr = parse_lines(s);
    assert_int_equal(json_array_size(arr), 5);

    json_t *j = json_array_get(arr, 0);
    assert_string_equal(json_string_value(json_object_get(j, "level")), "info");
    assert_string_equal(json_string_value(json_object_get(j, "event")), "request");
    assert_string_equal(json_string_value(json_object_get(j, "method")), "POST");
    assert_int_equal(json_integer_value(json_object_get(j, "status")), 200);
    assert_true(json_real_value(json_object_get(j, "latency_ms")) == 1.5);
    assert_int_equal(json_object_size(j), 6);
    /* the keys come in order: ts, level, event, then the pairs */
    assert_memory_equal(s, "{\"ts\":\"", 7);
    assert_non_null(strstr(s,
                           "\",\"level\":\"info\",\"event\":\"request\",\"method\":\"POST\",\"status\":200,"
                           "\"latency_ms\":1.5}\n"));

    j = json_array_get(arr, 1);
    assert_string_equal(json_string_value(json_object_get(j, "level")), "warn");
    assert_string_equal(json_string_value(json_object_get(j, "event")), nasty);
    assert_string_equal(json_string_value(json_object_get(j, nasty)), nasty);

    j = json_array_get(arr, 2);
    assert_string_equal(json_string_value(json_object_get(j, "level")), "error");
    assert_string_equal(json_string_value(json_object_get(j, "event")), "bad\xef\xbf\xbd");
    assert_string_equal(json_string_value(json_object_get(j, "v1")), "a\xef\xbf\xbdz");
    assert_string_equal(json_string_value(json_object_get(j, "v2")), "\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(json_string_value(json_object_get(j, "v3")), "cut\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(json_string_value(json_object_get(j, "v4")), "\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(json_string_value(json_object_get(j, "v5")), "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(json_string_value(json_object_get(j, "v6")),
                        "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd");
    assert_string_equal(json_string_value(json_object_get(j, "k\xef\xbf\xbd")), "x");

    j = json_array_get(arr, 3);
    assert_string_equal(json_string_value(json_object_get(j, "level")), "debug");
    assert_true(json_integer_value(json_object_get(j, "i")) == -9223372036854775807LL - 1);
    assert_true(json_integer_value(json_object_get(j, "u")) == 9223372036854775807LL);
    assert_true(json_real_value(json_object_get(j, "d")) == -0.25);
    assert_true(json_real_value(json_object_get(j, "tiny")) == 1e-300);
    assert_true(json_is_null(json_object_get(j, "inf")));
    assert_true(json_is_null(json_object_get(j, "nan")));
    assert_true(json_is_true(json_object_get(j, "t")));
    assert_true(json_is_false(json_object_get(j, "fa")));
    assert_string_equal(json_string_value(json_object_get(j, "null")), "");

    j = json_array_get(arr, 4);
    assert_string_equal(json_string_value(json_object_get(j, "log_error")), "bad_kv_type");

    json_decref(arr);
    free(s);
}

static void test_levels(void **state) {
    /* defaults */
    assert_false(srv_log_enabled(SRV_LOG_DEBUG));
    assert_true(srv_log_enabled(SRV_LOG_INFO));
    assert_true(srv_log_enabled(SRV_LOG_ERROR));

    FILE *f = capture(SRV_LOG_WARN, SRV_LOG_LOGFMT);
    assert_false(srv_log_enabled(SRV_LOG_DEBUG));
    assert_false(srv_log_enabled(SRV_LOG_INFO));
    assert_true(srv_log_enabled(SRV_LOG_WARN));
    assert_true(srv_log_enabled(SRV_LOG_ERROR));
    srv_log(SRV_LOG_DEBUG, "d", NULL);
    srv_log(SRV_LOG_INFO, "i", NULL);
    srv_log(SRV_LOG_WARN, "w", NULL);
    srv_log(SRV_LOG_ERROR, "e", NULL);
    char *s = finish(f);
    assert_int_equal(count_lines(s), 2);
    char *save = NULL;
    assert_string_equal(after_ts(strtok_r(s, "\n", &save)), " level=warn event=w");
    assert_string_equal(after_ts(strtok_r(NULL, "\n", &save)), " level=error event=e");
    free(s);

    f = capture(SRV_LOG_DEBUG, SRV_LOG_JSON);
    assert_true(srv_log_enabled(SRV_LOG_DEBUG));
    srv_log(SRV_LOG_DEBUG, "d", NULL);
    srv_log(SRV_LOG_INFO, "i", NULL);
    s = finish(f);
    json_t *arr = parse_lines(s);
    assert_int_equal(json_array_size(arr), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 0), "level")), "debug");
    assert_string_equal(json_string_value(json_object_get(json_array_get(arr, 1), "level")), "info");
    json_decref(arr);
    free(s);

    f = capture(SRV_LOG_ERROR, SRV_LOG_JSON);
    srv_log(SRV_LOG_WARN, "w", NULL);
    s = finish(f);
    assert_string_equal(s, "");
    free(s);

    /* back to the defaults */
    assert_false(srv_log_enabled(SRV_LOG_DEBUG));
    assert_true(srv_log_enabled(SRV_LOG_INFO));
}

static void test_names(void **state) {
    assert_string_equal(srv_log_level_name(SRV_LOG_DEBUG), "debug");
    assert_string_equal(srv_log_level_name(SRV_LOG_INFO), "info");
    assert_string_equal(srv_log_level_name(SRV_LOG_WARN), "warn");
    assert_string_equal(srv_log_level_name(SRV_LOG_ERROR), "error");
    assert_string_equal(srv_log_level_name((srv_log_level)42), "error");

    srv_log_level l = SRV_LOG_INFO;
    assert_int_equal(srv_log_level_parse("DEBUG", &l), 0);
    assert_int_equal(l, SRV_LOG_DEBUG);
    assert_int_equal(srv_log_level_parse("warning", &l), 0);
    assert_int_equal(l, SRV_LOG_WARN);
    assert_int_equal(srv_log_level_parse("error", &l), 0);
    assert_int_equal(l, SRV_LOG_ERROR);
    assert_int_equal(srv_log_level_parse("verbose", &l), -1);
    assert_int_equal(l, SRV_LOG_ERROR);
    assert_int_equal(srv_log_level_parse(NULL, &l), -1);

    srv_log_format fmt = SRV_LOG_LOGFMT;
    assert_int_equal(srv_log_format_parse("Json", &fmt), 0);
    assert_int_equal(fmt, SRV_LOG_JSON);
    assert_int_equal(srv_log_format_parse("logfmt", &fmt), 0);
    assert_int_equal(fmt, SRV_LOG_LOGFMT);
    assert_int_equal(srv_log_format_parse("xml", &fmt), -1);
    assert_int_equal(fmt, SRV_LOG_LOGFMT);
}

/* A line much longer than the stack buffer goes through the heap. */
static void test_long_line(void **state) {
    size_t n = 100000;
    char *big = xmalloc(n + 1);
    for (size_t i = 0; i < n; i++) big[i] = (char)('a' + i % 26);
    big[n] = '\0';
    big[n / 2] = ' ';

    FILE *f = capture(SRV_LOG_INFO, SRV_LOG_JSON);
    srv_log(SRV_LOG_INFO, big, "v", SRV_KV_STR, big, NULL);
    char *s = finish(f);
    json_t *arr = parse_lines(s);
    assert_int_equal(json_array_size(arr), 1);
    json_t *j = json_array_get(arr, 0);
    assert_string_equal(json_string_value(json_object_get(j, "event")), big);
    assert_string_equal(json_string_value(json_object_get(j, "v")), big);
    json_decref(arr);
    free(s);

    f = capture(SRV_LOG_INFO, SRV_LOG_LOGFMT);
    srv_log(SRV_LOG_INFO, "big", "v", SRV_KV_STR, big, NULL);
    s = finish(f);
    const char *rest = after_ts(s);
    assert_memory_equal(rest, " level=info event=big v=\"", 25);
    assert_memory_equal(rest + 25, big, n);
    assert_string_equal(rest + 25 + n, "\"\n");
    free(s);
    free(big);
}

/* ---------------------------------------------------------------- threads */

#define N_THREADS 4

typedef struct worker {
    int id, lines;
} worker;

static void *log_thread(void *arg) {
    const worker *w = arg;
    char pad[3000];
    memset(pad, 'a' + w->id, sizeof pad - 1);
    pad[sizeof pad - 1] = '\0';
    for (int i = 0; i < w->lines; i++) {
        /* alternate short lines (stack buffer) and long ones (heap) */
        srv_log(SRV_LOG_INFO, "tick", "thread", SRV_KV_INT, (long long)w->id, "seq", SRV_KV_INT, (long long)i,
                "pad", SRV_KV_STR, (i & 1) ? pad : "x y", "ok", SRV_KV_BOOL, 1, NULL);
    }
    return NULL;
}

static void test_threads(void **state) {
    int lines = tu_quick() ? 200 : 2000;
    FILE *f = capture(SRV_LOG_INFO, SRV_LOG_JSON);
    pthread_t th[N_THREADS];
    worker w[N_THREADS];
    for (int t = 0; t < N_THREADS; t++) {
        w[t] = (worker){t, lines};
        assert_int_equal(pthread_create(&th[t], NULL, log_thread, &w[t]), 0);
    }
    for (int t = 0; t < N_THREADS; t++) pthread_join(th[t], NULL);
    char *s = finish(f);
    assert_int_equal(count_lines(s), (size_t)N_THREADS * lines);

    json_t *arr = parse_lines(s); /* every line whole and valid */
    assert_int_equal(json_array_size(arr), (size_t)N_THREADS * lines);
    int *next = calloc(N_THREADS, sizeof *next);
    assert_non_null(next);
    for (size_t i = 0; i < json_array_size(arr); i++) {
        json_t *j = json_array_get(arr, i);
        int t = (int)json_integer_value(json_object_get(j, "thread"));
        int seq = (int)json_integer_value(json_object_get(j, "seq"));
        assert_true(t >= 0 && t < N_THREADS);
        assert_int_equal(seq, next[t]); /* each thread's lines in order, none lost */
        next[t]++;
        const char *pad = json_string_value(json_object_get(j, "pad"));
        assert_non_null(pad);
        if (seq & 1) {
            assert_int_equal(strlen(pad), 2999);
            for (size_t k = 0; k < 2999; k++) assert_int_equal(pad[k], 'a' + t);
        } else {
            assert_string_equal(pad, "x y");
        }
        assert_true(json_is_true(json_object_get(j, "ok")));
    }
    for (int t = 0; t < N_THREADS; t++) assert_int_equal(next[t], lines);
    free(next);
    json_decref(arr);
    free(s);
}

/* Threads logging while another thread switches formats and streams: every
 * line is whole, in one of the two formats. */
typedef struct switcher {
    FILE *a, *b;
    int rounds;
} switcher;

static void *switch_thread(void *arg) {
    const switcher *sw = arg;
    for (int i = 0; i < sw->rounds; i++)
        srv_log_setup(SRV_LOG_INFO, (i & 1) ? SRV_LOG_JSON : SRV_LOG_LOGFMT, (i & 2) ? sw->a : sw->b);
    return NULL;
}

static void check_mixed(const char *s) {
    while (*s) {
        const char *nl = strchr(s, '\n');
        assert_non_null(nl);
        if (*s == '{') {
            json_error_t err;
            json_t *j = json_loadb(s, (size_t)(nl - s), 0, &err);
            assert_non_null(j);
            assert_string_equal(json_string_value(json_object_get(j, "event")), "tick");
            json_decref(j);
        } else {
            const char *rest = after_ts(s);
            assert_memory_equal(rest, " level=info event=tick thread=", 30);
            assert_memory_equal(nl - 8, " ok=true", 8);
        }
        s = nl + 1;
    }
}

static void test_threads_switching(void **state) {
    int lines = tu_quick() ? 100 : 1000;
    FILE *a = tmpfile(), *b = tmpfile();
    assert_non_null(a);
    assert_non_null(b);
    srv_log_setup(SRV_LOG_INFO, SRV_LOG_LOGFMT, a);
    pthread_t th[N_THREADS + 1];
    worker w[N_THREADS];
    switcher sw = {a, b, lines};
    for (int t = 0; t < N_THREADS; t++) {
        w[t] = (worker){t, lines};
        assert_int_equal(pthread_create(&th[t], NULL, log_thread, &w[t]), 0);
    }
    assert_int_equal(pthread_create(&th[N_THREADS], NULL, switch_thread, &sw), 0);
    for (int t = 0; t <= N_THREADS; t++) pthread_join(th[t], NULL);
    srv_log_setup(SRV_LOG_INFO, SRV_LOG_LOGFMT, NULL);
    char *sa = finish(a), *sb = finish(b);
    assert_int_equal(count_lines(sa) + count_lines(sb), (size_t)N_THREADS * lines);
    check_mixed(sa);
    check_mixed(sb);
    free(sa);
    free(sb);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_levels), /* first: checks the defaults */
        cmocka_unit_test(test_logfmt_quoting), cmocka_unit_test(test_json_valid),
        cmocka_unit_test(test_names),          cmocka_unit_test(test_long_line),
        cmocka_unit_test(test_threads),        cmocka_unit_test(test_threads_switching),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
