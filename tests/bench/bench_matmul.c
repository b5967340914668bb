/*
 * bench_matmul — the lazy tile matmul (nz_matmul) against plain OpenBLAS on
 * uncompressed fp32 weights, measured in one run, one thread (OpenBLAS set
 * to 1 thread so the comparison is per core).
 *
 * Shapes: the linear layers of a 512-wide and a 1024-wide transformer
 * (d x d attention projections, 4d x d and d x 4d FFN), M = 1, 8, 64, 256
 * rows of activations. Modes:
 *   fp32 BLAS        cblas_sgemv/sgemm on a contiguous fp32 array (baseline)
 *   raw f32          raw fp32 tensor in the .nzp through nz_matmul
 *   raw bf16         raw bf16 tensor (converted per tile)
 *   lossless c=0     bf16 lossless, esc exponents (nzp pack's default), tile
 *                    cache budget 0 (decode every use; M = 1 runs the fused
 *                    decode-and-multiply GEMV)
 *   ll c=0 unfused   the same with the fused GEMV off (decode + sgemv; M = 1 only)
 *   rans c=0         bf16 lossless, rANS exponents, cache budget 0 (fused at M = 1)
 *   lossless c=all   bf16 lossless esc, cache holding the whole model
 *   lossy-3 c=0      lossy-3 from fp32, cache budget 0
 * Each cell: ratio to fp32 BLAS (same run) / ratio to the memory-bandwidth
 * bound (bytes the mode must read: its stored weights, or the cached fp32
 * tiles, plus x and y; at the read bandwidth measured at start with a
 * streaming sum over 512 MiB: bound_time / actual_time; the shapes fit the
 * LLC, so values > 1 mean the mode ran from cache).
 * Then a 2-thread nz_matmul_mt line; a model larger than the LLC (6 layers of
 * the 1024-wide shapes, every weight used once per forward step, so nothing
 * stays cached: what serving sees), 1 and 2 threads; and the peak RSS of
 * each mode serving a 1024-wide layer (a fresh process per mode reporting its
 * VmHWM).
 * Targets (issue 3): M >= 64 lossless c=0 >= 0.9x; M = 1 >= 0.5x.
 */
#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_codec.h"
#include "nz_container.h"
#include "nz_pool.h"
#include "nz_rans.h"
#include "nz_weight.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void openblas_set_num_threads(int);

static uint64_t g_seed = 1;
static double gauss(void) {
    g_seed ^= g_seed << 13;
    g_seed ^= g_seed >> 7;
    g_seed ^= g_seed << 17;
    double u1 = ((g_seed >> 11) + 1.0) / 9007199254740993.0;
    g_seed ^= g_seed << 13;
    g_seed ^= g_seed >> 7;
    g_seed ^= g_seed << 17;
    double u2 = (g_seed >> 11) / 9007199254740992.0;
    return sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2);
}

static void die(const char *what, const nz_error *e) {
    fprintf(stderr, "bench_matmul: %s: %s\n", what, e->msg);
    exit(1);
}

static void add(nz_writer *w, const char *name, nz_dtype dt, const char *mode, nz_coder coder,
                const void *src, int n, int k) {
    nz_error e = {0};
    nz_mode md;
    nz_tensor_desc d;
    int64_t shape[2] = {n, k};
    if (nz_mode_parse(mode, &md, &e) ||
        nz_desc_init(&d, dt, nz_dtype_size(dt), &md, coder, (uint64_t)n, (uint64_t)k,
                     nz_default_tile_rows((uint64_t)k), &e) ||
        nz_tensor_analyze(&d, src, NULL, &e) ||
        nz_writer_add_tensor(w, name, dt == NZ_DT_F32 ? "F32" : "BF16", 2, shape, &d, NULL, src, &e))
        die(name, &e);
}

/* Best time of 5 runs, each repeating stmt for >= 0.04 s. */
#define TIME_BEST(out, stmt)                                                                                 \
    do {                                                                                                     \
        double best_ = 1e30;                                                                                 \
        for (int r_ = 0; r_ < 5; r_++) {                                                                     \
            int reps_ = 0;                                                                                   \
            double t0_ = nz_now_s(), el_;                                                                    \
            do {                                                                                             \
                stmt;                                                                                        \
                reps_++;                                                                                     \
                el_ = nz_now_s() - t0_;                                                                      \
            } while (el_ < 0.04);                                                                            \
            if (el_ / reps_ < best_) best_ = el_ / reps_;                                                    \
        }                                                                                                    \
        out = best_;                                                                                         \
    } while (0)

/* Read bandwidth: best of 4 streaming sums over 512 MiB (>> LLC). */
static double read_bandwidth(void) {
    size_t n = (size_t)512 << 20 >> 3;
    uint64_t *b = malloc(n * sizeof *b);
    if (!b) return 1e10;
    for (size_t i = 0; i < n; i++) b[i] = i;
    double best = 1e30;
    volatile uint64_t sink = 0;
    for (int r = 0; r < 4; r++) {
        double t0 = nz_now_s();
        uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (size_t i = 0; i < n; i += 4) {
            s0 += b[i];
            s1 += b[i + 1];
            s2 += b[i + 2];
            s3 += b[i + 3];
        }
        sink += s0 + s1 + s2 + s3;
        double t = nz_now_s() - t0;
        if (t < best) best = t;
    }
    (void)sink;
    free(b);
    return (double)n * 8 / best;
}

/* The weights of one shape: same bf16-representable values in every mode. */
static void make_weights(int n, int k, float **w32, uint16_t **wbf) {
    *w32 = malloc((size_t)n * k * sizeof **w32);
    *wbf = malloc((size_t)n * k * sizeof **wbf);
    for (size_t i = 0; i < (size_t)n * k; i++) {
        (*wbf)[i] = nz_f32_to_bf16((float)(0.02 * gauss()));
        (*w32)[i] = nz_bf16_to_f32((*wbf)[i]);
    }
}

enum { RAW32, RAWBF, LL, LLUNF, LLRANS, LLALL, LOSSY, NMODE };
static const char *const MODE_NAME[NMODE] = {"raw f32",  "raw bf16",       "lossless c=0", "ll c=0 unfused",
                                             "rans c=0", "lossless c=all", "lossy-3 c=0"};
static const char *const TENSOR[NMODE] = {"raw",  "rawbf",    "lossless", "lossless",
                                          "rans", "lossless", "lossy"};

/* Write the model of one shape (every mode's tensor) to path. */
static void write_model(const char *path, const float *w32, const uint16_t *wbf, int n, int k) {
    nz_writer *wr;
    nz_error e = {0};
    if (nz_writer_create(path, &wr, &e)) die("create", &e);
    add(wr, "raw", NZ_DT_F32, "raw", NZ_CODER_NONE, w32, n, k);
    add(wr, "rawbf", NZ_DT_BF16, "raw", NZ_CODER_NONE, wbf, n, k);
    add(wr, "lossless", NZ_DT_BF16, "lossless", NZ_CODER_ESC, wbf, n, k);
    add(wr, "rans", NZ_DT_BF16, "lossless", NZ_CODER_RANS, wbf, n, k);
    add(wr, "lossy", NZ_DT_F32, "lossy-3", NZ_CODER_ESC, w32, n, k);
    if (nz_writer_finish(wr, &e)) die("finish", &e);
}

/* ----------------------------------------------------------- peak RSS child */

/* Serve the 1024-wide layer (3 weights) in one mode (-1: fp32 BLAS, -2:
 * nothing) at M = 1 and 64; the parent reads this process's ru_maxrss. */
static int rss_child_run(int mode, const char *dir);

/* Run one mode, then print this process's peak RSS (VmHWM: it belongs to
 * the address space exec created, unlike ru_maxrss, which Linux carries over
 * from the forking parent). */
static int rss_child(int mode, const char *dir) {
    int rc = rss_child_run(mode, dir);
    nz_mem_report r;
    nz_mem_get_report(&r);
    printf("%zu\n", r.rss_peak);
    return rc;
}

static int rss_child_run(int mode, const char *dir) {
    openblas_set_num_threads(1);
    static const int shapes[3][2] = {{1024, 1024}, {4096, 1024}, {1024, 4096}};
    float *x = malloc(64 * 4096 * sizeof *x), *y = malloc(64 * 4096 * sizeof *y);
    for (int i = 0; i < 64 * 4096; i++) x[i] = 0.001f * (float)(i % 1000);
    if (mode == -2) return 0;
    if (mode == -1) {
        for (int s = 0; s < 3; s++) {
            float *w32;
            uint16_t *wbf;
            make_weights(shapes[s][0], shapes[s][1], &w32, &wbf);
            free(wbf);
            cblas_sgemv(CblasRowMajor, CblasNoTrans, shapes[s][0], shapes[s][1], 1, w32, shapes[s][1], x, 1,
                        0, y, 1);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, 64, shapes[s][0], shapes[s][1], 1, x,
                        shapes[s][1], w32, shapes[s][1], 0, y, shapes[s][0]);
            /* w32 stays allocated: a server holds every layer's weights */
        }
        return 0;
    }
    nz_tile_cache *c = nz_cache_create(mode == LLALL ? (size_t)1 << 30 : 0);
    nz_dctx *dc = nz_dctx_create();
    if (mode == LLUNF) nz_matmul_set_fused(0);
    for (int s = 0; s < 3; s++) {
        char path[512];
        snprintf(path, sizeof path, "%s/layer%d.nzp", dir, s);
        nz_model *m;
        nz_weight w;
        nz_error e = {0};
        if (nz_model_open(path, &m, &e) || nz_weight_bind(&w, m, TENSOR[mode], &e)) die("rss child", &e);
        float *scratch = nz_malloc(w.max_tile * sizeof(float), NZ_MEM_SCRATCH);
        for (int rep = 0; rep < 2; rep++)
            if (nz_matmul(c, dc, scratch, &w, x, 1, y, &e) || nz_matmul(c, dc, scratch, &w, x, 64, y, &e))
                die("rss child matmul", &e);
        nz_free(scratch);
        /* the model stays open (mapped): a server holds every layer */
    }
    return 0;
}

static double child_rss_mib(const char *self, int mode, const char *dir) {
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "'%s' --rss %d '%s'", self, mode, dir);
    FILE *f = popen(cmd, "r");
    if (!f) return -1;
    unsigned long long bytes = 0;
    int ok = fscanf(f, "%llu", &bytes) == 1;
    if (pclose(f) != 0 || !ok) return -1;
    return (double)bytes / (1024.0 * 1024.0);
}

static double g_stack_m1, g_stack_m64, g_stack_m1_2t;

/* ------------------------------------------------- a model larger than LLC */

/* A stack of 1024-wide layers (q, k, v, o: 1024 x 1024; fc1 4096 x 1024;
 * fc2 1024 x 4096) whose fp32 weights are ~10x the LLC, run as a forward
 * pass would: every weight once per step, so nothing stays cached between
 * uses. This is what serving a real model looks like; the per-shape tables
 * above measure the opposite extreme (one matrix, hot in L2/L3). */
#define STACK_LAYERS 6
/* q, k, v, o, fc1, fc2 of one 1024-wide layer */
static const int shp[6][2] = {{1024, 1024}, {1024, 1024}, {1024, 1024},
                              {1024, 1024}, {4096, 1024}, {1024, 4096}};

/* One forward step of the fp32 baseline: every weight of the stack once. */
static void fp32_pass(float *const *w32, int nt, const float *x, int M, float *y) {
    for (int i = 0; i < nt; i++) {
        int n = shp[i % 6][0], k = shp[i % 6][1];
        if (M == 1)
            cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1, w32[i], k, x, 1, 0, y, 1);
        else
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, n, k, 1, x, k, w32[i], k, 0, y, n);
    }
}

static void bench_stack(double bw, const char *dir) {
    enum { NT = STACK_LAYERS * 6 };
    float *w32[NT];
    char path[512];
    snprintf(path, sizeof path, "%s/stack.nzp", dir);
    nz_writer *wr;
    nz_error e = {0};
    if (nz_writer_create(path, &wr, &e)) die("create", &e);
    double params = 0;
    for (int i = 0; i < NT; i++) {
        int n = shp[i % 6][0], k = shp[i % 6][1];
        uint16_t *wbf;
        make_weights(n, k, &w32[i], &wbf);
        char name[64];
        snprintf(name, sizeof name, "ll.%d", i);
        add(wr, name, NZ_DT_BF16, "lossless", NZ_CODER_ESC, wbf, n, k);
        snprintf(name, sizeof name, "rans.%d", i);
        add(wr, name, NZ_DT_BF16, "lossless", NZ_CODER_RANS, wbf, n, k);
        snprintf(name, sizeof name, "lossy.%d", i);
        add(wr, name, NZ_DT_F32, "lossy-3", NZ_CODER_ESC, w32[i], n, k);
        free(wbf);
        params += (double)n * k;
    }
    if (nz_writer_finish(wr, &e)) die("finish", &e);
    nz_model *m;
    if (nz_model_open(path, &m, &e)) die("open", &e);
    unlink(path);
    nz_weight ll[NT], rans[NT], lossy[NT];
    uint64_t maxt = 0, ll_bytes = 0;
    for (int i = 0; i < NT; i++) {
        char name[64];
        snprintf(name, sizeof name, "ll.%d", i);
        if (nz_weight_bind(&ll[i], m, name, &e)) die("bind", &e);
        snprintf(name, sizeof name, "rans.%d", i);
        if (nz_weight_bind(&rans[i], m, name, &e)) die("bind", &e);
        snprintf(name, sizeof name, "lossy.%d", i);
        if (nz_weight_bind(&lossy[i], m, name, &e)) die("bind", &e);
        if (ll[i].max_tile > maxt) maxt = ll[i].max_tile;
        ll_bytes += ll[i].t->stored_bytes;
    }
    nz_dctx *dc = nz_dctx_create();
    float *scratch = malloc(maxt * sizeof(float));
    printf(
        "\n== a model larger than the LLC: %d layers of the 1024-wide shapes, %.1f M params, fp32 %.0f MB, "
        "lossless %.0f MB; one forward step = all %d matmuls, one thread\n",
        STACK_LAYERS, params / 1e6, 4 * params / 1e6, (double)ll_bytes / 1e6, NT);
    printf("  %-4s %13s %15s %15s %15s %15s %15s %22s\n", "M", "fp32 GFLOP/s", "lossless c=0",
           "ll c=0 unfused", "rans c=0", "lossy-3 c=0", "fp32 bw bound", "2 threads: ll c=0 / fp32");
    nz_pool *pool = nz_pool_create(2);
    nz_matmul_ctx *mc = nz_matmul_ctx_create(pool, NULL);
    static const int Ms[] = {1, 8, 64};
    for (int mi = 0; mi < 3; mi++) {
        int M = Ms[mi];
        float *x = malloc((size_t)M * 4096 * sizeof *x), *y = malloc((size_t)M * 4096 * sizeof *y);
        for (int i = 0; i < M * 4096; i++) x[i] = (float)gauss();
        double tb = 1e30, tl = 1e30, tu = 1e30, tq = 1e30, tr = 1e30;
        for (int rep = 0; rep < 3; rep++) {
            double t0 = nz_now_s();
            fp32_pass(w32, NT, x, M, y);
            double t1 = nz_now_s();
            for (int i = 0; i < NT; i++)
                if (nz_matmul(NULL, dc, scratch, &ll[i], x, (size_t)M, y, &e)) die("matmul", &e);
            double t2 = nz_now_s();
            nz_matmul_set_fused(0);
            if (M == 1)
                for (int i = 0; i < NT; i++)
                    if (nz_matmul(NULL, dc, scratch, &ll[i], x, (size_t)M, y, &e)) die("matmul", &e);
            nz_matmul_set_fused(1);
            double t3 = nz_now_s();
            for (int i = 0; i < NT; i++)
                if (nz_matmul(NULL, dc, scratch, &lossy[i], x, (size_t)M, y, &e)) die("matmul", &e);
            double t4 = nz_now_s();
            for (int i = 0; i < NT; i++)
                if (nz_matmul(NULL, dc, scratch, &rans[i], x, (size_t)M, y, &e)) die("matmul", &e);
            double t5 = nz_now_s();
            tr = fmin(tr, t5 - t4);
            tb = fmin(tb, t1 - t0);
            tl = fmin(tl, t2 - t1);
            if (M == 1) tu = fmin(tu, t3 - t2);
            tq = fmin(tq, t4 - t3);
        }
        /* both sides on 2 threads: OpenBLAS's own threads for fp32, the pool for ours */
        double tb2 = 1e30, tl2 = 1e30;
        for (int rep = 0; rep < 3; rep++) {
            openblas_set_num_threads(2);
            double t0 = nz_now_s();
            fp32_pass(w32, NT, x, M, y);
            openblas_set_num_threads(1);
            double t1 = nz_now_s();
            usleep(300000); /* OpenBLAS's idle workers spin for a while: let them sleep before timing ours */
            double t1b = nz_now_s();
            for (int i = 0; i < NT; i++)
                if (nz_matmul_mt(mc, &ll[i], x, (size_t)M, y, &e)) die("matmul_mt", &e);
            double t2 = nz_now_s() - (t1b - t1);
            tb2 = fmin(tb2, t1 - t0);
            tl2 = fmin(tl2, t2 - t1);
        }
        char unf[32] = "-", two[64];
        if (M == 1) snprintf(unf, sizeof unf, "%.2fx", tb / tu);
        snprintf(two, sizeof two, "%.2fx (%.1f / %.1f GFLOP/s)", tb2 / tl2, 2.0 * M * params / tl2 / 1e9,
                 2.0 * M * params / tb2 / 1e9);
        printf("  %-4d %13.2f %14.2fx %15s %14.2fx %14.2fx %15.2f %26s\n", M, 2.0 * M * params / tb / 1e9,
               tb / tl, unf, tb / tr, tb / tq, 4 * params / bw / tb, two);
        if (M == 1) g_stack_m1_2t = tb2 / tl2;
        if (M == 1) g_stack_m1 = tb / tl;
        if (M == 64) g_stack_m64 = tb / tl;
        free(x);
        free(y);
    }
    nz_matmul_ctx_free(mc);
    nz_pool_free(pool);
    free(scratch);
    nz_dctx_free(dc);
    nz_model_free(m);
    for (int i = 0; i < NT; i++) free(w32[i]);
}

int main(int argc, char **argv) {
    if (argc == 4 && !strcmp(argv[1], "--rss")) return rss_child(atoi(argv[2]), argv[3]);
    openblas_set_num_threads(1);
    double t_start = nz_now_s();
    double bw = read_bandwidth();
    static const int widths[] = {512, 1024};
    static const int Ms[] = {1, 8, 64, 256};
    double worst_m1 = 1e9, worst_m64 = 1e9, m1_unf = 1e9;
    char dir[] = "/tmp/nz_bench_matmul_XXXXXX";
    if (!mkdtemp(dir)) return 1;
    printf("nzserve matmul benchmark: y[M x N] = x[M x K] W^T, one thread, kernels %s\n",
           nz_rans_decoder_name());
    printf("read bandwidth (streaming sum over 512 MiB): %.1f GB/s\n", bw / 1e9);
    printf("cells: speed ratio to fp32 BLAS (same run) / ratio to the bandwidth bound (bound time / time)\n");
    for (int wi = 0; wi < 2; wi++) {
        int d = widths[wi];
        int shapes[3][2] = {{d, d}, {4 * d, d}, {d, 4 * d}};
        for (int si = 0; si < 3; si++) {
            int n = shapes[si][0], k = shapes[si][1];
            float *w32;
            uint16_t *wbf;
            make_weights(n, k, &w32, &wbf);
            char path[512];
            snprintf(path, sizeof path, "%s/layer%d.nzp", dir, si);
            write_model(path, w32, wbf, n, k);
            nz_model *m;
            nz_error e = {0};
            if (nz_model_open(path, &m, &e)) die("open", &e);
            if (wi == 0) unlink(path); /* the 1024-wide files stay for the RSS children */
            nz_weight w[NMODE];
            for (int j = 0; j < NMODE; j++)
                if (nz_weight_bind(&w[j], m, TENSOR[j], &e)) die("bind", &e);
            nz_dctx *dc = nz_dctx_create();
            float *scratch = malloc(w[RAW32].max_tile * sizeof(float));
            nz_tile_cache *c0 = nz_cache_create(0), *call = nz_cache_create((size_t)4 << 30);
            double wbytes[NMODE] = {4.0 * n * k,
                                    2.0 * n * k,
                                    (double)w[LL].t->stored_bytes,
                                    (double)w[LL].t->stored_bytes,
                                    (double)w[LLRANS].t->stored_bytes,
                                    4.0 * n * k,
                                    (double)w[LOSSY].t->stored_bytes};
            printf("\n== %d-wide: W %d x %d (lossless stored %.1f%% of bf16, lossy-3 %.1f%%)\n", d, n, k,
                   100.0 * (double)w[LL].t->stored_bytes / ((double)n * k * 2),
                   100.0 * (double)w[LOSSY].t->stored_bytes / ((double)n * k * 2));
            printf("  %-4s %13s", "M", "fp32 GFLOP/s");
            for (int j = 0; j < NMODE; j++) printf(" %15s", MODE_NAME[j]);
            printf("\n");
            for (int mi = 0; mi < 4; mi++) {
                int M = Ms[mi];
                float *x = malloc((size_t)M * k * sizeof *x), *y = malloc((size_t)M * n * sizeof *y);
                for (size_t i = 0; i < (size_t)M * k; i++) x[i] = (float)gauss();
                double flops = 2.0 * M * n * k, tb, t[NMODE];
                double io = 4.0 * M * (n + k);
                if (M == 1)
                    TIME_BEST(tb, cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1, w32, k, x, 1, 0, y, 1));
                else
                    TIME_BEST(tb, cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, n, k, 1, x, k, w32,
                                              k, 0, y, n));
                for (int j = 0; j < NMODE; j++) {
                    if (j == LLUNF && M != 1) {
                        t[j] = 0;
                        continue;
                    }
                    nz_tile_cache *c = j == LLALL ? call : c0;
                    if (j == LLUNF) nz_matmul_set_fused(0);
                    TIME_BEST(t[j],
                              if (nz_matmul(c, dc, scratch, &w[j], x, (size_t)M, y, &e)) die("matmul", &e));
                    if (j == LLUNF) nz_matmul_set_fused(1);
                }
                printf("  %-4d %13.2f", M, flops / tb / 1e9);
                for (int j = 0; j < NMODE; j++) {
                    if (!t[j])
                        printf(" %15s", "-");
                    else
                        printf("    %5.2fx/%5.2f", tb / t[j], (wbytes[j] + io) / bw / t[j]);
                }
                printf("   (fp32 bound %.2f)\n", (4.0 * n * k + io) / bw / tb);
                if (M == 1 && tb / t[LL] < worst_m1) worst_m1 = tb / t[LL];
                if (M == 1 && tb / t[LLUNF] < m1_unf) m1_unf = tb / t[LLUNF];
                if (M >= 64 && tb / t[LL] < worst_m64) worst_m64 = tb / t[LL];
                free(x);
                free(y);
            }
            nz_cache_free(c0);
            nz_cache_free(call);
            free(scratch);
            nz_dctx_free(dc);
            nz_model_free(m);
            free(w32);
            free(wbf);
        }
    }

    /* two threads: nz_matmul_mt against nz_matmul, lossless c=0, 1024-wide */
    printf("\n== 2 threads (nz_matmul_mt, lossless c=0) vs 1 thread, 1024-wide layer (all 3 weights)\n");
    nz_pool *pool = nz_pool_create(2);
    nz_matmul_ctx *mc = nz_matmul_ctx_create(pool, NULL);
    nz_dctx *dc = nz_dctx_create();
    nz_model *lm[3];
    nz_weight lw[3];
    uint64_t maxt = 0;
    for (int s = 0; s < 3; s++) {
        char path[512];
        nz_error e = {0};
        snprintf(path, sizeof path, "%s/layer%d.nzp", dir, s);
        if (nz_model_open(path, &lm[s], &e) || nz_weight_bind(&lw[s], lm[s], "lossless", &e)) die("open", &e);
        if (lw[s].max_tile > maxt) maxt = lw[s].max_tile;
    }
    float *scratch = malloc(maxt * sizeof(float));
    for (int M = 1; M <= 64; M += 63) {
        float *x = malloc((size_t)M * 4096 * sizeof *x), *y = malloc((size_t)M * 4096 * sizeof *y);
        for (int i = 0; i < M * 4096; i++) x[i] = (float)gauss();
        double t1, t2;
        nz_error e = {0};
        TIME_BEST(t1, for (int s = 0; s < 3; s++) if (nz_matmul(NULL, dc, scratch, &lw[s], x, (size_t)M, y,
                                                                &e)) die("matmul", &e));
        TIME_BEST(t2, for (int s = 0; s < 3; s++) if (nz_matmul_mt(mc, &lw[s], x, (size_t)M, y, &e))
                          die("matmul_mt", &e));
        printf("  M=%-3d 1 thread %.2f GFLOP/s, 2 threads %.2f GFLOP/s: %.2fx\n", M,
               2.0 * M * 9 * 1024 * 1024 / t1 / 1e9, 2.0 * M * 9 * 1024 * 1024 / t2 / 1e9, t1 / t2);
        free(x);
        free(y);
    }
    free(scratch);
    for (int s = 0; s < 3; s++) nz_model_free(lm[s]);
    nz_dctx_free(dc);
    nz_matmul_ctx_free(mc);
    nz_pool_free(pool);

    bench_stack(bw, dir);

    /* peak RSS per mode, each in a fresh process */
    printf("\n== peak RSS serving the 1024-wide layer (3 weights, 9.4 M params; M = 1 and 64), fresh process "
           "per mode\n");
    char self[4096];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof self - 1);
    self[sl > 0 ? sl : 0] = 0;
    printf("  %-16s %8.1f MiB\n", "(empty process)", child_rss_mib(self, -2, dir));
    printf("  %-16s %8.1f MiB\n", "fp32 BLAS", child_rss_mib(self, -1, dir));
    for (int j = 0; j < NMODE; j++) printf("  %-16s %8.1f MiB\n", MODE_NAME[j], child_rss_mib(self, j, dir));
    for (int s = 0; s < 3; s++) {
        char path[512];
        snprintf(path, sizeof path, "%s/layer%d.nzp", dir, s);
        unlink(path);
    }
    rmdir(dir);

    printf("\ntarget: lossless c=0 at M >= 64 >= 0.9x fp32: worst %.2fx (%s)\n", worst_m64,
           worst_m64 >= 0.9 ? "PASS" : "FAIL");
    printf("target: lossless c=0 at M = 1 >= 0.5x fp32: worst %.2fx (%s; unfused decode + sgemv: %.2fx)\n",
           worst_m1, worst_m1 >= 0.5 ? "PASS" : "FAIL", m1_unf);
    printf(
        "model larger than the LLC (every weight cold, as in serving): lossless c=0 M = 1 %.2fx (2 threads "
        "%.2fx), M = 64 %.2fx fp32\n",
        g_stack_m1, g_stack_m1_2t, g_stack_m64);
    printf("bench time %.0f s\n", nz_now_s() - t_start);
    return 0;
}
