/* Prometheus metrics: exact rendering after known observations, cumulative
 * buckets, label escaping, one HELP/TYPE per family, every family present,
 * the output valid line by line, exact totals after concurrent updates. */
#include "test_util.h"

#include "srv_metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>

/* Every family the server exposes, with its type. */
static const char *const FAMILIES[][2] = {
    {"nzserve_requests_total", "counter"},
    {"nzserve_request_duration_seconds", "histogram"},
    {"nzserve_input_tokens_total", "counter"},
    {"nzserve_output_tokens_total", "counter"},
    {"nzserve_queue_wait_seconds", "histogram"},
    {"nzserve_queue_depth", "gauge"},
    {"nzserve_requests_in_flight", "gauge"},
    {"nzserve_rejected_total", "counter"},
    {"nzserve_weights_compressed_bytes", "gauge"},
    {"nzserve_weights_decoded_equivalent_bytes", "gauge"},
    {"nzserve_tile_cache_bytes", "gauge"},
    {"nzserve_tile_cache_limit_bytes", "gauge"},
    {"nzserve_kv_cache_bytes", "gauge"},
    {"nzserve_scratch_bytes", "gauge"},
    {"nzserve_activations_bytes", "gauge"},
    {"nzserve_resident_memory_bytes", "gauge"},
    {"nzserve_resident_memory_peak_bytes", "gauge"},
    {"nzserve_mapped_resident_bytes", "gauge"},
    {"nzserve_allocator_free_bytes", "gauge"},
    {"nzserve_code_resident_bytes", "gauge"},
    {"nzserve_memory_budget_bytes", "gauge"},
    {"nzserve_request_memory_pool_bytes", "gauge"},
    {"nzserve_request_memory_reserved_bytes", "gauge"},
    {"nzserve_request_memory_overrun_bytes", "gauge"},
    {"nzserve_request_memory_waits_total", "counter"},
    {"nzserve_tiles_decoded_total", "counter"},
    {"nzserve_tile_cache_hits_total", "counter"},
    {"nzserve_tile_cache_misses_total", "counter"},
    {"nzserve_tile_cache_evictions_total", "counter"},
    {"nzserve_tile_decode_seconds_total", "counter"},
    {"nzserve_ready", "gauge"},
    {"nzserve_uptime_seconds", "gauge"},
};
#define N_FAMILIES (sizeof FAMILIES / sizeof FAMILIES[0])

static const char *const LE[] = {"0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25",
                                 "0.5",   "1",      "2.5",   "5",    "10",    "30",   "+Inf"};
#define N_LE 15

/* ------------------------------------------------- exposition-format check */

static int is_name_start(char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
}
static int is_name_char(char c) { return is_name_start(c) || (c >= '0' && c <= '9'); }

/* Parse a metric (colons allowed) or label name at *p; returns its length. */
static size_t parse_name(const char *p, int colons) {
    size_t n = 0;
    if (!is_name_start(p[0]) || (!colons && p[0] == ':')) return 0;
    while (is_name_char(p[n]) && (colons || p[n] != ':')) n++;
    return n;
}

/* A sample value: a Go-parseable float or +Inf, -Inf, NaN. */
static int valid_value(const char *s, size_t n, double *v) {
    char buf[64];
    if (n == 0 || n >= sizeof buf) return 0;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (!strcmp(buf, "+Inf") || !strcmp(buf, "-Inf") || !strcmp(buf, "NaN")) {
        *v = !strcmp(buf, "NaN") ? NAN : buf[0] == '+' ? INFINITY : -INFINITY;
        return 1;
    }
    for (size_t i = 0; i < n; i++)
        if (!strchr("0123456789+-.eE", buf[i])) return 0; /* no hex, no "inf" spellings */
    char *end;
    *v = strtod(buf, &end);
    return *end == '\0';
}

typedef struct fam {
    char name[128], type[16];
    int help;
} fam;

/* Check text line by line against the text format 0.0.4: "# HELP name
 * text", "# TYPE name type" (once per family, before its samples), samples
 * "name{label="value",...} value" of the family last typed (families
 * contiguous), label values escaped (only \\ \" \n), cumulative histogram
 * buckets ending with le="+Inf" equal to _count. */
static void check_exposition(const char *text) {
    fam fams[64];
    size_t nf = 0;
    int cur = -1; /* family of the last TYPE line */
    char series[512] = "";
    double last_bucket = -1;
    int have_inf = 0;
    double inf_count = 0;

    assert_true(*text);
    assert_int_equal(text[strlen(text) - 1], '\n');
    for (const char *line = text; *line;) {
        const char *nl = strchr(line, '\n');
        assert_non_null(nl);
        size_t len = (size_t)(nl - line);
        assert_true(len > 0);
        if (line[0] == '#') {
            int is_help = !strncmp(line, "# HELP ", 7), is_type = !strncmp(line, "# TYPE ", 7);
            if (!is_help && !is_type) fail_msg("stray comment: %.*s", (int)len, line);
            size_t n = parse_name(line + 7, 1);
            assert_true(n > 0 && n < sizeof fams[0].name);
            assert_int_equal(line[7 + n], ' ');
            size_t f = 0;
            while (f < nf && (strlen(fams[f].name) != n || memcmp(fams[f].name, line + 7, n))) f++;
            if (f == nf) {
                assert_true(nf < 64);
                memset(&fams[nf], 0, sizeof fams[nf]);
                memcpy(fams[nf].name, line + 7, n);
                nf++;
            }
            const char *rest = line + 8 + n;
            size_t rlen = len - 8 - n;
            if (is_help) {
                if (fams[f].help) fail_msg("HELP repeated: %s", fams[f].name);
                fams[f].help = 1;
                assert_true(rlen > 0);
                for (size_t i = 0; i < rlen; i++)
                    if (rest[i] == '\\') assert_true(rest[i + 1] == '\\' || rest[i + 1] == 'n');
            } else {
                if (fams[f].type[0]) fail_msg("TYPE repeated: %s", fams[f].name);
                assert_true(rlen < sizeof fams[f].type);
                memcpy(fams[f].type, rest, rlen);
                if (strcmp(fams[f].type, "counter") && strcmp(fams[f].type, "gauge") &&
                    strcmp(fams[f].type, "histogram") && strcmp(fams[f].type, "summary") &&
                    strcmp(fams[f].type, "untyped"))
                    fail_msg("bad type: %s", fams[f].type);
                if (cur >= 0 && have_inf) fail_msg("histogram without _count");
                cur = (int)f;
                series[0] = '\0';
                last_bucket = -1;
                have_inf = 0;
            }
            line = nl + 1;
            continue;
        }

        /* sample */
        size_t n = parse_name(line, 1);
        if (!n) fail_msg("bad metric name: %.*s", (int)len, line);
        if (cur < 0) fail_msg("sample before any TYPE: %.*s", (int)len, line);
        const fam *f = &fams[cur];
        size_t fl = strlen(f->name);
        const char *suffix = "";
        if (n == fl && !memcmp(line, f->name, n)) {
            assert_true(strcmp(f->type, "histogram")); /* a histogram has only suffixed samples */
        } else if (!strcmp(f->type, "histogram") && n > fl && !memcmp(line, f->name, fl)) {
            suffix = line + fl;
            size_t sl = n - fl;
            if (!(sl == 7 && !memcmp(suffix, "_bucket", 7)) && !(sl == 4 && !memcmp(suffix, "_sum", 4)) &&
                !(sl == 6 && !memcmp(suffix, "_count", 6)))
                fail_msg("sample outside its family: %.*s", (int)len, line);
        } else {
            fail_msg("sample outside its family %s: %.*s", f->name, (int)len, line);
        }

        const char *p = line + n;
        char labels[512] = ""; /* the labels except le */
        size_t ll = 0;
        int has_le = 0;
        char le[32] = "";
        if (*p == '{') {
            p++;
            while (*p != '}') {
                size_t ln = parse_name(p, 0);
                if (!ln) fail_msg("bad label name: %.*s", (int)len, line);
                const char *lname = p;
                p += ln;
                assert_int_equal(*p, '=');
                p++;
                assert_int_equal(*p, '"');
                p++;
                const char *vstart = p;
                while (*p != '"') {
                    assert_true(p < nl);
                    if (*p == '\\') {
                        p++;
                        if (*p != '\\' && *p != '"' && *p != 'n')
                            fail_msg("bad escape: %.*s", (int)len, line);
                    }
                    p++;
                }
                if (ln == 2 && !memcmp(lname, "le", 2)) {
                    has_le = 1;
                    assert_true((size_t)(p - vstart) < sizeof le);
                    memcpy(le, vstart, (size_t)(p - vstart));
                } else {
                    size_t k = (size_t)(p - lname) + 1;
                    assert_true(ll + k < sizeof labels);
                    memcpy(labels + ll, lname, k);
                    ll += k;
                    labels[ll] = '\0';
                }
                p++;
                if (*p == ',') p++;
                assert_true(p < nl);
            }
            p++;
        }
        assert_int_equal(*p, ' ');
        p++;
        double v;
        if (!valid_value(p, (size_t)(nl - p), &v)) fail_msg("bad value: %.*s", (int)len, line);

        if (!strcmp(f->type, "histogram")) {
            if (!strncmp(suffix, "_bucket", 7)) {
                assert_true(has_le);
                double bound;
                assert_true(valid_value(le, strlen(le), &bound));
                if (strcmp(series, labels)) { /* a new series starts with its smallest bucket */
                    assert_false(have_inf);
                    strcpy(series, labels);
                    last_bucket = -1;
                }
                assert_false(have_inf);
                assert_true(v >= last_bucket); /* cumulative */
                last_bucket = v;
                if (isinf(bound)) {
                    have_inf = 1;
                    inf_count = v;
                }
            } else {
                assert_false(has_le);
                assert_string_equal(series, labels);
                assert_true(have_inf);
                if (!strncmp(suffix, "_count", 6)) {
                    assert_true(v == inf_count);
                    have_inf = 0;
                    series[0] = '\0';
                    last_bucket = -1;
                }
            }
        } else {
            assert_false(has_le);
            if (!strcmp(f->type, "counter")) assert_true(v >= 0);
        }
        line = nl + 1;
    }
    assert_false(have_inf);
    for (size_t f = 0; f < nf; f++) {
        if (!fams[f].help || !fams[f].type[0]) fail_msg("family %s lacks HELP or TYPE", fams[f].name);
    }
}

/* ---------------------------------------------------------------- helpers */

static char *render(const srv_metrics *m, const srv_gauges *g) {
    char *out = NULL;
    size_t len = 0;
    assert_int_equal(srv_metrics_render(m, g, &out, &len), 0);
    assert_non_null(out);
    assert_int_equal(strlen(out), len);
    check_exposition(out);
    return out;
}

/* 1 when text holds exactly this line. */
static int has_line(const char *text, const char *line) {
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)) != NULL; p++)
        if ((p == text || p[-1] == '\n') && p[n] == '\n') return 1;
    return 0;
}

static void expect_line(const char *text, const char *line) {
    if (!has_line(text, line)) fail_msg("missing line: %s", line);
}

static size_t count_prefix(const char *text, const char *prefix) {
    size_t n = 0, pl = strlen(prefix);
    for (const char *p = text; p; p = strchr(p, '\n'), p = p ? p + 1 : NULL)
        if (!strncmp(p, prefix, pl)) n++;
    return n;
}

/* The value of the sample whose name and labels are exactly series. */
static double value_of(const char *text, const char *series) {
    size_t n = strlen(series);
    for (const char *p = text; p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
        if (!strncmp(p, series, n) && p[n] == ' ') return strtod(p + n + 1, NULL);
    }
    fail_msg("no sample %s", series);
    return 0;
}

static void expect_hist(const char *text, const char *name, const char *labels, const uint64_t cum[N_LE],
                        const char *sum) {
    char line[512];
    for (int i = 0; i < N_LE; i++) {
        snprintf(line, sizeof line, "%s_bucket{%s%sle=\"%s\"} %llu", name, labels, *labels ? "," : "", LE[i],
                 (unsigned long long)cum[i]);
        expect_line(text, line);
    }
    const char *open = *labels ? "{" : "", *close = *labels ? "}" : "";
    snprintf(line, sizeof line, "%s_sum%s%s%s %s", name, open, labels, close, sum);
    expect_line(text, line);
    snprintf(line, sizeof line, "%s_count%s%s%s %llu", name, open, labels, close,
             (unsigned long long)cum[N_LE - 1]);
    expect_line(text, line);
}

static void expect_all_families(const char *text) {
    char line[256];
    for (size_t i = 0; i < N_FAMILIES; i++) {
        snprintf(line, sizeof line, "# TYPE %s %s", FAMILIES[i][0], FAMILIES[i][1]);
        expect_line(text, line);
        snprintf(line, sizeof line, "# TYPE %s ", FAMILIES[i][0]);
        assert_int_equal(count_prefix(text, line), 1);
        snprintf(line, sizeof line, "# HELP %s ", FAMILIES[i][0]);
        assert_int_equal(count_prefix(text, line), 1);
    }
    assert_int_equal(count_prefix(text, "# TYPE "), N_FAMILIES);
    assert_int_equal(count_prefix(text, "# HELP "), N_FAMILIES);
}

/* ------------------------------------------------------------------ tests */

static const char *const TASK_PATHS[] = {"/v1/translate", "/v1/dialogue"};
#define SRV_ROUTE_TRANSLATE SRV_ROUTE_TASK
#define SRV_ROUTE_DIALOGUE  (SRV_ROUTE_TASK + 1)
#define N_ROUTES            (SRV_ROUTE_TASK + 2) /* the routes of a registry over TASK_PATHS */

static srv_metrics *metrics_create(void) { return srv_metrics_create(TASK_PATHS, 2); }

static void test_routes(void **state) {
    static const char *const want[N_ROUTES] = {"/health",    "/ready",        "/v1/models",
                                               "/v1/memory", "/metrics",      "/ui",
                                               "other",      "/v1/translate", "/v1/dialogue"};
    srv_metrics *m = metrics_create();
    assert_int_equal(srv_metrics_routes(m), N_ROUTES);
    for (int r = 0; r < N_ROUTES; r++) {
        assert_string_equal(srv_metrics_route_label(m, r), want[r]);
        if (r != SRV_ROUTE_OTHER) assert_int_equal(srv_metrics_route(m, want[r]), r);
    }
    assert_string_equal(srv_metrics_route_label(m, N_ROUTES), "other");
    assert_string_equal(srv_metrics_route_label(m, -1), "other");
    assert_int_equal(srv_metrics_route(m, "/v1/translate?x=1"), SRV_ROUTE_TRANSLATE);
    assert_int_equal(srv_metrics_route(m, "/v1/translatex"), SRV_ROUTE_OTHER);
    assert_int_equal(srv_metrics_route(m, "/v1"), SRV_ROUTE_OTHER);
    assert_int_equal(srv_metrics_route(m, "other"), SRV_ROUTE_OTHER);
    assert_int_equal(srv_metrics_route(m, ""), SRV_ROUTE_OTHER);
    assert_int_equal(srv_metrics_route(m, NULL), SRV_ROUTE_OTHER);
    /* the playground: "/" and everything under "/ui/" */
    assert_int_equal(srv_metrics_route(m, "/"), SRV_ROUTE_UI);
    assert_int_equal(srv_metrics_route(m, "/?tab=chat"), SRV_ROUTE_UI);
    assert_int_equal(srv_metrics_route(m, "/ui/app.js"), SRV_ROUTE_UI);
    assert_int_equal(srv_metrics_route(m, "/uix"), SRV_ROUTE_OTHER);
    srv_metrics_free(m);
    /* no task: only the fixed routes; more tasks than a registry holds: refused */
    m = srv_metrics_create(NULL, 0);
    assert_int_equal(srv_metrics_routes(m), SRV_ROUTE_TASK);
    assert_int_equal(srv_metrics_route(m, "/v1/translate"), SRV_ROUTE_OTHER);
    srv_metrics_free(m);
    const char *many[SRV_ROUTE_MAX_TASKS + 1] = {0};
    assert_null(srv_metrics_create(many, SRV_ROUTE_MAX_TASKS + 1));
}

static void test_empty(void **state) {
    srv_metrics_free(NULL);
    srv_metrics *m = metrics_create();
    assert_non_null(m);
    assert_int_equal(srv_metrics_queue_depth(m), 0);
    assert_int_equal(srv_metrics_inflight(m), 0);
    char *t = render(m, NULL);
    expect_all_families(t);
    assert_null(strstr(t, "nzserve_requests_total{"));
    assert_null(strstr(t, "nzserve_request_duration_seconds_bucket{route"));
    assert_null(strstr(t, "nzserve_input_tokens_total{"));
    assert_null(strstr(t, "nzserve_weights_compressed_bytes{"));
    static const uint64_t zero[N_LE];
    expect_hist(t, "nzserve_queue_wait_seconds", "", zero, "0");
    expect_line(t, "nzserve_queue_depth 0");
    expect_line(t, "nzserve_requests_in_flight 0");
    expect_line(t, "nzserve_rejected_total{reason=\"queue_full\"} 0");
    expect_line(t, "nzserve_rejected_total{reason=\"other\"} 0");
    expect_line(t, "nzserve_tile_cache_bytes 0");
    expect_line(t, "nzserve_ready 0");
    expect_line(t, "nzserve_uptime_seconds 0");
    expect_line(t, "nzserve_tile_decode_seconds_total 0");
    free(t);

    char *out = (char *)1;
    size_t len = 7;
    assert_int_equal(srv_metrics_render(NULL, NULL, &out, &len), -1);
    assert_null(out);
    assert_int_equal(len, 0);
    srv_metrics_free(m);
}

static void test_known(void **state) {
    srv_metrics *m = metrics_create();
    assert_non_null(m);
    /* translate: 2^-8 s (le 0.005), 0.5 s (exactly on a bound), 40 s (+Inf) */
    srv_metrics_observe(m, SRV_ROUTE_TRANSLATE, 200, 0.00390625, 10, 20);
    srv_metrics_observe(m, SRV_ROUTE_TRANSLATE, 200, 0.5, 5, 7);
    srv_metrics_observe(m, SRV_ROUTE_TRANSLATE, 503, 40, 0, 0);
    /* health: exactly 0.001, and a negative and a NaN duration (count as 0) */
    srv_metrics_observe(m, SRV_ROUTE_HEALTH, 200, 0.001, 0, 0);
    srv_metrics_observe(m, SRV_ROUTE_HEALTH, 200, -1, 0, 0);
    srv_metrics_observe(m, SRV_ROUTE_HEALTH, 200, NAN, 0, 0);
    /* odd statuses and routes */
    srv_metrics_observe(m, SRV_ROUTE_METRICS, 99, 0.0625, 0, 0);
    srv_metrics_observe(m, SRV_ROUTE_METRICS, 600, 0.0625, 0, 0);
    srv_metrics_observe(m, SRV_ROUTE_METRICS, 100, 0.0625, 0, 0);
    srv_metrics_observe(m, SRV_ROUTE_METRICS, 599, 0.0625, 0, 0);
    srv_metrics_observe(m, (srv_route)77, 404, 2, 1, 1);
    srv_metrics_observe(m, SRV_ROUTE_OTHER, 404, 3, 0, 2);

    srv_metrics_queue_wait(m, 0.25);
    srv_metrics_queue_wait(m, 100);
    srv_metrics_queue_wait(m, 0.0078125);

    srv_metrics_rejected(m, "queue_full");
    srv_metrics_rejected(m, "queue_full");
    srv_metrics_rejected(m, "body_too_large");
    srv_metrics_rejected(m, "unauthorized");
    srv_metrics_rejected(m, "deadline");
    srv_metrics_rejected(m, "cancelled");
    srv_metrics_rejected(m, "shutdown");
    srv_metrics_rejected(m, "bogus\"reason");
    srv_metrics_rejected(m, NULL);

    srv_metrics_queue_add(m, 3);
    srv_metrics_queue_add(m, -1);
    srv_metrics_inflight_add(m, 2);
    assert_int_equal(srv_metrics_queue_depth(m), 2);
    assert_int_equal(srv_metrics_inflight(m), 2);

    char *t = render(m, NULL);
    expect_all_families(t);

    /* requests_total: only the label sets seen, in route (fixed routes, then the tasks') then status order */
    const char *req = strstr(t, "# TYPE nzserve_requests_total counter\n");
    assert_non_null(req);
    req += strlen("# TYPE nzserve_requests_total counter\n");
    static const char want_req[] = "nzserve_requests_total{route=\"/health\",status=\"200\"} 3\n"
                                   "nzserve_requests_total{route=\"/metrics\",status=\"100\"} 1\n"
                                   "nzserve_requests_total{route=\"/metrics\",status=\"599\"} 1\n"
                                   "nzserve_requests_total{route=\"/metrics\",status=\"other\"} 2\n"
                                   "nzserve_requests_total{route=\"other\",status=\"404\"} 2\n"
                                   "nzserve_requests_total{route=\"/v1/translate\",status=\"200\"} 2\n"
                                   "nzserve_requests_total{route=\"/v1/translate\",status=\"503\"} 1\n"
                                   "# HELP nzserve_request_duration_seconds ";
    assert_memory_equal(req, want_req, strlen(want_req));
    assert_int_equal(count_prefix(t, "nzserve_requests_total{"), 7);

    static const uint64_t tr[N_LE] = {0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 3};
    expect_hist(t, "nzserve_request_duration_seconds", "route=\"/v1/translate\"", tr, "40.50390625");
    static const uint64_t he[N_LE] = {3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3};
    expect_hist(t, "nzserve_request_duration_seconds", "route=\"/health\"", he, "0.001");
    static const uint64_t me[N_LE] = {0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4, 4};
    expect_hist(t, "nzserve_request_duration_seconds", "route=\"/metrics\"", me, "0.25");
    static const uint64_t ot[N_LE] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 2, 2, 2};
    expect_hist(t, "nzserve_request_duration_seconds", "route=\"other\"", ot, "5");
    assert_null(strstr(t, "route=\"/v1/dialogue\""));
    assert_null(strstr(t, "route=\"/ready\""));
    assert_int_equal(count_prefix(t, "nzserve_request_duration_seconds_bucket{"), 4 * N_LE);

    static const uint64_t qw[N_LE] = {0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3};
    expect_hist(t, "nzserve_queue_wait_seconds", "", qw, "100.2578125");

    expect_line(t, "nzserve_input_tokens_total{route=\"/v1/translate\"} 15");
    expect_line(t, "nzserve_output_tokens_total{route=\"/v1/translate\"} 27");
    expect_line(t, "nzserve_input_tokens_total{route=\"/health\"} 0");
    expect_line(t, "nzserve_input_tokens_total{route=\"other\"} 1");
    expect_line(t, "nzserve_output_tokens_total{route=\"other\"} 3");
    assert_int_equal(count_prefix(t, "nzserve_input_tokens_total{"), 4);
    assert_int_equal(count_prefix(t, "nzserve_output_tokens_total{"), 4);

    expect_line(t, "nzserve_queue_depth 2");
    expect_line(t, "nzserve_requests_in_flight 2");

    expect_line(t, "nzserve_rejected_total{reason=\"queue_full\"} 2");
    expect_line(t, "nzserve_rejected_total{reason=\"body_too_large\"} 1");
    expect_line(t, "nzserve_rejected_total{reason=\"unauthorized\"} 1");
    expect_line(t, "nzserve_rejected_total{reason=\"deadline\"} 1");
    expect_line(t, "nzserve_rejected_total{reason=\"cancelled\"} 1");
    expect_line(t, "nzserve_rejected_total{reason=\"shutdown\"} 1");
    expect_line(t, "nzserve_rejected_total{reason=\"not_ready\"} 0");
    expect_line(t, "nzserve_rejected_total{reason=\"other\"} 2");
    assert_null(strstr(t, "bogus"));
    free(t);
    srv_metrics_free(m);
}

static void test_gauges(void **state) {
    srv_metrics *m = metrics_create();
    assert_non_null(m);
    const srv_model_gauges models[] = {
        {"opus-mt-en-de", 123456789, 987654321},
        {"we\"ird\\na\nme", 1, 2},
        {NULL, 3, 4},
        {"bad\xff utf8", 5, 6},
    };
    srv_gauges g = {
        .models = models,
        .n_models = 4,
        .tile_cache_bytes = 1,
        .tile_cache_limit_bytes = 2,
        .kv_cache_bytes = 3,
        .scratch_bytes = 4,
        .activations_bytes = 5,
        .resident_bytes = 6,
        .resident_peak_bytes = 18446744073709551615ULL,
        .mapped_resident_bytes = 8,
        .tiles_decoded_total = 9,
        .tile_cache_hits_total = 10,
        .tile_cache_misses_total = 11,
        .tile_cache_evictions_total = 12,
        .tile_decode_seconds_total = 0.1,
        .ready = 7,
        .uptime_seconds = 12345.5,
    };
    char *t = render(m, &g);
    expect_all_families(t);
    expect_line(t, "nzserve_weights_compressed_bytes{model=\"opus-mt-en-de\"} 123456789");
    expect_line(t, "nzserve_weights_decoded_equivalent_bytes{model=\"opus-mt-en-de\"} 987654321");
    expect_line(t, "nzserve_weights_compressed_bytes{model=\"we\\\"ird\\\\na\\nme\"} 1");
    expect_line(t, "nzserve_weights_decoded_equivalent_bytes{model=\"we\\\"ird\\\\na\\nme\"} 2");
    expect_line(t, "nzserve_weights_compressed_bytes{model=\"\"} 3");
    expect_line(t, "nzserve_weights_compressed_bytes{model=\"bad\xef\xbf\xbd utf8\"} 5");
    assert_int_equal(count_prefix(t, "nzserve_weights_compressed_bytes{"), 4);
    assert_int_equal(count_prefix(t, "nzserve_weights_decoded_equivalent_bytes{"), 4);
    expect_line(t, "nzserve_tile_cache_bytes 1");
    expect_line(t, "nzserve_tile_cache_limit_bytes 2");
    expect_line(t, "nzserve_kv_cache_bytes 3");
    expect_line(t, "nzserve_scratch_bytes 4");
    expect_line(t, "nzserve_activations_bytes 5");
    expect_line(t, "nzserve_resident_memory_bytes 6");
    expect_line(t, "nzserve_resident_memory_peak_bytes 18446744073709551615");
    expect_line(t, "nzserve_mapped_resident_bytes 8");
    expect_line(t, "nzserve_tiles_decoded_total 9");
    expect_line(t, "nzserve_tile_cache_hits_total 10");
    expect_line(t, "nzserve_tile_cache_misses_total 11");
    expect_line(t, "nzserve_tile_cache_evictions_total 12");
    expect_line(t, "nzserve_tile_decode_seconds_total 0.1");
    expect_line(t, "nzserve_ready 1");
    expect_line(t, "nzserve_uptime_seconds 12345.5");
    free(t);

    /* non-finite figures render as Prometheus spells them; no models */
    g = (srv_gauges){
        .models = NULL, .n_models = 3, .tile_decode_seconds_total = INFINITY, .uptime_seconds = NAN};
    t = render(m, &g);
    expect_line(t, "nzserve_tile_decode_seconds_total +Inf");
    expect_line(t, "nzserve_uptime_seconds NaN");
    expect_line(t, "nzserve_ready 0");
    assert_null(strstr(t, "nzserve_weights_compressed_bytes{"));
    free(t);
    srv_metrics_free(m);
}

/* The checker itself rejects what it should. */
static void test_checker(void **state) {
    /* sanity: a handwritten valid exposition passes */
    check_exposition(
        "# HELP a_total x\n# TYPE a_total counter\na_total{l=\"v\\\"\\\\\\n\"} 1\n"
        "# HELP h y\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\n"
        "h_count 2\n");
    assert_true(has_line("a\nb c\n", "b c"));
    assert_false(has_line("a\nxb c\n", "b c"));
    assert_false(has_line("a\nb cd\n", "b c"));
}

/* ---------------------------------------------------------------- threads */

#define N_THREADS 8
static const char *const REASONS[] = {"queue_full", "deadline", "nope"};

typedef struct worker {
    srv_metrics *m;
    int id, n;
} worker;

static void *observe_thread(void *arg) {
    const worker *w = arg;
    for (int i = 0; i < w->n; i++) {
        srv_metrics_queue_add(w->m, 1);
        srv_metrics_queue_wait(w->m, 0.125);
        srv_metrics_queue_add(w->m, -1);
        srv_metrics_inflight_add(w->m, 1);
        srv_route r = (srv_route)((w->id + i) % N_ROUTES);
        srv_metrics_observe(w->m, r, 200 + (i % 3) * 100, (i % 4) * 0.25, 3, (uint64_t)(i % 5));
        srv_metrics_inflight_add(w->m, -1);
        if (i % 10 == 0) srv_metrics_rejected(w->m, REASONS[(i / 10) % 3]);
    }
    return NULL;
}

typedef struct scraper {
    srv_metrics *m;
    atomic_int stop;
    int renders;
} scraper;

static void *scrape_thread(void *arg) {
    scraper *s = arg;
    while (!atomic_load(&s->stop) || s->renders == 0) {
        char *t = render(s->m, NULL);
        free(t);
        s->renders++;
    }
    return NULL;
}

static void test_threads(void **state) {
    int n = tu_quick() ? 2000 : 10000;
    srv_metrics *m = metrics_create();
    assert_non_null(m);
    pthread_t th[N_THREADS], sc;
    worker w[N_THREADS];
    scraper s = {.m = m, .renders = 0};
    atomic_init(&s.stop, 0);
    assert_int_equal(pthread_create(&sc, NULL, scrape_thread, &s), 0);
    for (int t = 0; t < N_THREADS; t++) {
        w[t] = (worker){m, t, n};
        assert_int_equal(pthread_create(&th[t], NULL, observe_thread, &w[t]), 0);
    }
    for (int t = 0; t < N_THREADS; t++) pthread_join(th[t], NULL);
    atomic_store(&s.stop, 1);
    pthread_join(sc, NULL);
    assert_true(s.renders > 0);
    assert_int_equal(srv_metrics_queue_depth(m), 0);
    assert_int_equal(srv_metrics_inflight(m), 0);

    /* the expected totals, replayed */
    uint64_t req[N_ROUTES][3] = {{0}}, cnt[N_ROUTES] = {0}, le025[N_ROUTES] = {0}, le05[N_ROUTES] = {0},
             zero[N_ROUTES] = {0}, tin[N_ROUTES] = {0}, tout[N_ROUTES] = {0}, rej[3] = {0};
    double sum[N_ROUTES] = {0};
    for (int t = 0; t < N_THREADS; t++) {
        for (int i = 0; i < n; i++) {
            int r = (t + i) % N_ROUTES;
            double sec = (i % 4) * 0.25;
            req[r][i % 3]++;
            cnt[r]++;
            zero[r] += sec == 0;
            le025[r] += sec <= 0.25;
            le05[r] += sec <= 0.5;
            sum[r] += sec;
            tin[r] += 3;
            tout[r] += (uint64_t)(i % 5);
            if (i % 10 == 0) rej[(i / 10) % 3]++;
        }
    }

    char *txt = render(m, NULL);
    char series[256];
    uint64_t total = 0;
    for (int r = 0; r < N_ROUTES; r++) {
        const char *route = srv_metrics_route_label(m, r);
        for (int k = 0; k < 3; k++) {
            snprintf(series, sizeof series, "nzserve_requests_total{route=\"%s\",status=\"%d\"}", route,
                     200 + k * 100);
            assert_true(value_of(txt, series) == (double)req[r][k]);
            total += req[r][k];
        }
        uint64_t cum[N_LE];
        for (int i = 0; i < N_LE; i++) {
            double bound = i < N_LE - 1 ? strtod(LE[i], NULL) : INFINITY;
            cum[i] = bound < 0.25 ? zero[r] : bound < 0.5 ? le025[r] : bound < 0.75 ? le05[r] : cnt[r];
        }
        char labels[64], sumtxt[64];
        snprintf(labels, sizeof labels, "route=\"%s\"", route);
        snprintf(sumtxt, sizeof sumtxt, "%.15g", sum[r]); /* multiples of 1/4: exact */
        expect_hist(txt, "nzserve_request_duration_seconds", labels, cum, sumtxt);
        snprintf(series, sizeof series, "nzserve_input_tokens_total{route=\"%s\"}", route);
        assert_true(value_of(txt, series) == (double)tin[r]);
        snprintf(series, sizeof series, "nzserve_output_tokens_total{route=\"%s\"}", route);
        assert_true(value_of(txt, series) == (double)tout[r]);
    }
    assert_int_equal(total, (uint64_t)N_THREADS * n);
    assert_int_equal(count_prefix(txt, "nzserve_requests_total{"), N_ROUTES * 3);

    uint64_t qw[N_LE];
    for (int i = 0; i < N_LE; i++) qw[i] = i < 7 ? 0 : (uint64_t)N_THREADS * n; /* 0.125 s: le 0.25 on */
    char qsum[64];
    snprintf(qsum, sizeof qsum, "%.15g", 0.125 * N_THREADS * n);
    expect_hist(txt, "nzserve_queue_wait_seconds", "", qw, qsum);

    assert_true(value_of(txt, "nzserve_rejected_total{reason=\"queue_full\"}") == (double)rej[0]);
    assert_true(value_of(txt, "nzserve_rejected_total{reason=\"deadline\"}") == (double)rej[1]);
    assert_true(value_of(txt, "nzserve_rejected_total{reason=\"other\"}") == (double)rej[2]);
    expect_line(txt, "nzserve_queue_depth 0");
    expect_line(txt, "nzserve_requests_in_flight 0");
    free(txt);
    srv_metrics_free(m);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_checker), cmocka_unit_test(test_routes), cmocka_unit_test(test_empty),
        cmocka_unit_test(test_known),   cmocka_unit_test(test_gauges), cmocka_unit_test(test_threads),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
