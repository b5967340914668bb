/*
 * bench_peers — batch-1 GEMV (y = W x, one input row) over matrices far
 * larger than the last-level cache, our compressed modes side by side with
 * uncompressed peers, in one run (`make bench-peers`; not part of CI).
 *
 * Workload: NMAT matrices of DIM x DIM (default 4 x 4096 x 4096: 256 MiB of
 * fp32, 8x a 32 MiB L3), Gaussian weights (std 0.02) rounded to bf16 so that
 * every system multiplies the same values; one pass = all NMAT products, so
 * nothing stays cached between uses of a matrix (as in serving a model).
 * Systems, each at 1 and 2 threads:
 *   fp32 OpenBLAS      cblas_sgemv on fp32 weights
 *   bf16 ours          a straightforward AVX2 bf16 GEMV (4 rows at a time,
 *                      bf16 -> fp32 by a 16-bit shift, FMA), no compression
 *   ggml bf16/f16/q8_0 llama.cpp's CPU kernels (ggml_mul_mat through its C
 *                      API) from the prebuilt libraries npm's node-llama-cpp
 *                      ships (libggml-base.so + the best libggml-cpu-*.so
 *                      this CPU runs), loaded with dlopen; the declarations
 *                      below are the handful of ggml.h entry points used
 *   nz esc lossless    nzp pack's default: esc exponents, cache 0, fused GEMV
 *   nz esc lossy-3     esc exponents, 3 mantissa bits, cache 0, fused GEMV
 *   nz rans lossless   rANS exponents, cache 0, fused GEMV
 * Timing: REPS interleaved rounds (every system once per round, in turn),
 * the median pass time per system; G weights/s = NMAT DIM^2 / time. Each
 * system's product with the last matrix is checked against fp64 (max error
 * relative to max |y|: ~1e-6 for the exact modes, larger for ggml's q8_0 and
 * f16 activations and for lossy-3).
 * Output: a table on stdout and TSV (system, threads, bits/weight, Gw/s)
 * into the file named by --tsv, for tests/bench/plot_peers.py.
 *
 *   bench_peers --ggml DIR [--dim N] [--mats K] [--reps R] [--tsv FILE]
 */
#include "nz_alloc.h"
#include "nz_codec.h"
#include "nz_container.h"
#include "nz_pool.h"
#include "nz_weight.h"

#include <cblas.h>
#include <dlfcn.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void openblas_set_num_threads(int);

static void die(const char *what, const char *msg) {
    fprintf(stderr, "bench_peers: %s: %s\n", what, msg);
    exit(1);
}

/* ------------------------------------------------------------------ ggml */

/* The entry points of ggml.h / ggml-cpu.h used here (ggml's public C API;
 * enum values as in ggml.h: F32 0, F16 1, Q8_0 8, BF16 30). */
struct ggml_init_params {
    size_t mem_size;
    void *mem_buffer;
    bool no_alloc;
};
enum { GGML_F32 = 0, GGML_F16 = 1, GGML_Q8_0 = 8, GGML_BF16 = 30 };
typedef struct {
    void *(*init)(struct ggml_init_params);
    void (*free)(void *ctx);
    void *(*new_tensor_2d)(void *ctx, int type, int64_t ne0, int64_t ne1);
    void *(*mul_mat)(void *ctx, void *a, void *b);
    void *(*new_graph)(void *ctx);
    void (*build_forward_expand)(void *graph, void *tensor);
    int (*graph_compute_with_ctx)(void *ctx, void *graph, int n_threads);
    void *(*get_data)(const void *tensor);
    size_t (*quantize_chunk)(int type, const float *src, void *dst, int64_t start, int64_t nrows,
                             int64_t n_per_row, const float *imatrix);
    void (*fp32_to_bf16_row)(const float *x, void *y, int64_t n);
    void (*fp32_to_fp16_row)(const float *x, void *y, int64_t n);
    void (*cpu_init)(void);
    char variant[64];
} ggml_api;

static void *sym(void *h, const char *name) {
    void *p = dlsym(h, name);
    if (!p) die("dlsym", name);
    return p;
}

static int load_ggml(const char *dir, ggml_api *g) {
    char path[4096];
    snprintf(path, sizeof path, "%s/libggml-base.so", dir);
    void *base = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
    if (!base) return fprintf(stderr, "bench_peers: %s\n", dlerror()), -1;
    /* the best CPU variant this machine runs */
    static const char *const order[] = {"zen4", "icelake", "skylakex", "haswell", "x64"};
    void *cpu = NULL;
    for (size_t i = 0; i < sizeof order / sizeof *order && !cpu; i++) {
        const char *v = order[i];
        int ok = !strcmp(v, "x64") ||
                 (!strcmp(v, "haswell") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("f16c") && __builtin_cpu_supports("bmi2")) ||
                 (strcmp(v, "haswell") && __builtin_cpu_supports("avx512f") &&
                  __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                  (!strcmp(v, "skylakex") || __builtin_cpu_supports("avx512vnni")));
        if (!ok) continue;
        snprintf(path, sizeof path, "%s/libggml-cpu-%s.so", dir, v);
        cpu = dlopen(path, RTLD_NOW | RTLD_GLOBAL);
        if (cpu) snprintf(g->variant, sizeof g->variant, "%s", v);
    }
    if (!cpu) return fprintf(stderr, "bench_peers: no libggml-cpu-*.so loads: %s\n", dlerror()), -1;
    g->init = (void *(*)(struct ggml_init_params))sym(base, "ggml_init");
    g->free = (void (*)(void *))sym(base, "ggml_free");
    g->new_tensor_2d = (void *(*)(void *, int, int64_t, int64_t))sym(base, "ggml_new_tensor_2d");
    g->mul_mat = (void *(*)(void *, void *, void *))sym(base, "ggml_mul_mat");
    g->new_graph = (void *(*)(void *))sym(base, "ggml_new_graph");
    g->build_forward_expand = (void (*)(void *, void *))sym(base, "ggml_build_forward_expand");
    g->get_data = (void *(*)(const void *))sym(base, "ggml_get_data");
    g->quantize_chunk = (size_t(*)(int, const float *, void *, int64_t, int64_t, int64_t, const float *))sym(
        base, "ggml_quantize_chunk");
    g->fp32_to_bf16_row = (void (*)(const float *, void *, int64_t))sym(cpu, "ggml_fp32_to_bf16_row");
    g->fp32_to_fp16_row = (void (*)(const float *, void *, int64_t))sym(cpu, "ggml_fp32_to_fp16_row");
    g->graph_compute_with_ctx = (int (*)(void *, void *, int))sym(cpu, "ggml_graph_compute_with_ctx");
    g->cpu_init = (void (*)(void))sym(cpu, "ggml_cpu_init");
    g->cpu_init();
    return 0;
}

/* One ggml type: the NMAT weights in a context, one graph of NMAT products. */
typedef struct {
    void *ctx, *graph;
    void *last;  /* the last product's result tensor [dim] */
    double bits; /* per weight */
} ggml_case;

static void ggml_case_init(ggml_api *g, ggml_case *c, int type, float *const *w32, int nmat, int dim) {
    size_t row = type == GGML_F32 ? 4u * dim : type == GGML_Q8_0 ? (size_t)dim / 32 * 34 : 2u * dim;
    c->bits = 8.0 * (double)row / dim;
    struct ggml_init_params p = {(size_t)nmat * dim * row + (size_t)nmat * dim * 4 * 4 + (64u << 20), NULL,
                                 false};
    c->ctx = g->init(p);
    if (!c->ctx) die("ggml_init", "out of memory");
    c->graph = g->new_graph(c->ctx);
    void *x = g->new_tensor_2d(c->ctx, GGML_F32, dim, 1);
    float *xd = g->get_data(x);
    for (int i = 0; i < dim; i++) xd[i] = 1.0f / (float)(1 + i % 13) - 0.3f;
    for (int m = 0; m < nmat; m++) {
        void *a = g->new_tensor_2d(c->ctx, type, dim, dim); /* ne0 = K (a row), ne1 = N */
        uint8_t *d = g->get_data(a);
        for (int r = 0; r < dim; r++) {
            const float *src = w32[m] + (size_t)r * dim;
            if (type == GGML_BF16)
                g->fp32_to_bf16_row(src, d + (size_t)r * row, dim);
            else if (type == GGML_F16)
                g->fp32_to_fp16_row(src, d + (size_t)r * row, dim);
        }
        if (type == GGML_Q8_0) g->quantize_chunk(GGML_Q8_0, w32[m], d, 0, dim, dim, NULL);
        c->last = g->mul_mat(c->ctx, a, x);
        g->build_forward_expand(c->graph, c->last);
    }
}

/* -------------------------------------------------------- our bf16 GEMV */

typedef struct {
    const uint16_t *w; /* [rows x dim] */
    const float *x;
    float *y;
    int r0, r1, dim;
} bf16_job;

/* 4 rows at a time: 16 bf16 weights per row and step, widened by a 16-bit
 * shift (low halves) and a mask (high halves), FMA into 8 accumulators */
static void *bf16_rows(void *p) {
    bf16_job *j = p;
    const int K = j->dim;
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    for (int r = j->r0; r < j->r1; r += 4) {
        __m256 acc[8];
        for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
        for (int c = 0; c < K; c += 16) {
            /* x in the order the widening produces: even then odd elements of each 16 */
            __m256 x0 = _mm256_loadu_ps(j->x + c), x1 = _mm256_loadu_ps(j->x + c + 8);
            __m256 xe = _mm256_shuffle_ps(x0, x1, 0x88), xo = _mm256_shuffle_ps(x0, x1, 0xdd);
            xe = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xe), 0xd8));
            xo = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(xo), 0xd8));
            for (int q = 0; q < 4; q++) {
                __m256i b = _mm256_loadu_si256((const __m256i *)(j->w + (size_t)(r + q) * K + c));
                __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
                __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(b, hi));
                acc[2 * q] = _mm256_fmadd_ps(we, xe, acc[2 * q]);
                acc[2 * q + 1] = _mm256_fmadd_ps(wo, xo, acc[2 * q + 1]);
            }
        }
        for (int q = 0; q < 4; q++) {
            __m256 s = _mm256_add_ps(acc[2 * q], acc[2 * q + 1]);
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            j->y[r + q] = _mm_cvtss_f32(h);
        }
    }
    return NULL;
}

static void bf16_gemv(const uint16_t *w, const float *x, float *y, int dim, int threads) {
    bf16_job jobs[2];
    pthread_t t;
    int half = dim / 2 / 4 * 4;
    if (threads == 1) {
        jobs[0] = (bf16_job){w, x, y, 0, dim, dim};
        bf16_rows(&jobs[0]);
        return;
    }
    jobs[0] = (bf16_job){w, x, y, 0, half, dim};
    jobs[1] = (bf16_job){w, x, y, half, dim, dim};
    pthread_create(&t, NULL, bf16_rows, &jobs[1]);
    bf16_rows(&jobs[0]);
    pthread_join(t, NULL);
}

/* ------------------------------------------------------------------ main */

static uint64_t g_seed = 7;
static double gauss(void) {
    g_seed ^= g_seed << 13, g_seed ^= g_seed >> 7, g_seed ^= g_seed << 17;
    double u1 = ((g_seed >> 11) + 1.0) / 9007199254740993.0;
    g_seed ^= g_seed << 13, g_seed ^= g_seed >> 7, g_seed ^= g_seed << 17;
    return sqrt(-2 * log(u1)) * cos(6.283185307179586 * (g_seed >> 11) / 9007199254740992.0);
}

enum { S_FP32, S_BF16, S_GGML_BF16, S_GGML_F16, S_GGML_Q8, S_ESC, S_ESC3, S_RANS, NSYS };
static const char *const NAME[NSYS] = {
    "fp32 OpenBLAS sgemv", "bf16 ours (AVX2)", "ggml bf16",      "ggml f16",
    "ggml q8_0",           "nz esc lossless",  "nz esc lossy-3", "nz rans lossless"};

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    const char *gdir = NULL, *tsv = NULL;
    int dim = 4096, nmat = 4, reps = 7;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--ggml") && i + 1 < argc)
            gdir = argv[++i];
        else if (!strcmp(argv[i], "--dim") && i + 1 < argc)
            dim = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--mats") && i + 1 < argc)
            nmat = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc)
            reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--tsv") && i + 1 < argc)
            tsv = argv[++i];
        else
            die("usage", "bench_peers --ggml DIR [--dim N] [--mats K] [--reps R] [--tsv FILE]");
    }
    if (dim % 128 || dim <= 0 || nmat < 1 || nmat > 64 || reps < 1) die("usage", "--dim a multiple of 128");
    ggml_api g;
    int have_ggml = gdir && load_ggml(gdir, &g) == 0;
    /* weights: bf16-representable Gaussians */
    float *w32[64];
    uint16_t *wbf[64];
    for (int m = 0; m < nmat; m++) {
        w32[m] = malloc((size_t)dim * dim * 4);
        wbf[m] = malloc((size_t)dim * dim * 2);
        if (!w32[m] || !wbf[m]) die("weights", "out of memory");
        for (size_t i = 0; i < (size_t)dim * dim; i++) {
            wbf[m][i] = nz_f32_to_bf16((float)(0.02 * gauss()));
            w32[m][i] = nz_bf16_to_f32(wbf[m][i]);
        }
    }
    /* our modes in one .nzp */
    char path[] = "/tmp/nz_bench_peers_XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) die("mkstemp", path);
    close(fd);
    nz_writer *wr;
    nz_error e = {0};
    if (nz_writer_create(path, &wr, &e)) die("writer", e.msg);
    static const char *const tname[3] = {"esc", "esc3", "rans"};
    for (int m = 0; m < nmat; m++)
        for (int k = 0; k < 3; k++) {
            nz_mode md = {k == 1 ? NZ_MODE_LOSSY : NZ_MODE_LOSSLESS, 3, 0};
            nz_tensor_desc d;
            int64_t shape[2] = {dim, dim};
            char name[32];
            snprintf(name, sizeof name, "%s.%d", tname[k], m);
            const void *src = k == 1 ? (const void *)w32[m] : (const void *)wbf[m];
            if (nz_desc_init(&d, k == 1 ? NZ_DT_F32 : NZ_DT_BF16, 0, &md,
                             k == 2 ? NZ_CODER_RANS : NZ_CODER_ESC, (uint64_t)dim, (uint64_t)dim,
                             nz_default_tile_rows((uint64_t)dim), &e) ||
                nz_tensor_analyze(&d, src, NULL, &e) ||
                nz_writer_add_tensor(wr, name, k == 1 ? "F32" : "BF16", 2, shape, &d, NULL, src, &e))
                die(name, e.msg);
        }
    if (nz_writer_finish(wr, &e)) die("finish", e.msg);
    nz_model *model;
    if (nz_model_open(path, &model, &e)) die("open", e.msg);
    unlink(path);
    nz_weight W[3][64];
    double bits[NSYS] = {32, 16, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < 3; k++) {
        uint64_t stored = 0;
        for (int m = 0; m < nmat; m++) {
            char name[32];
            snprintf(name, sizeof name, "%s.%d", tname[k], m);
            if (nz_weight_bind(&W[k][m], model, name, &e)) die(name, e.msg);
            stored += W[k][m].t->stored_bytes;
        }
        bits[S_ESC + k] = 8.0 * (double)stored / ((double)nmat * dim * dim);
    }
    ggml_case gc[3];
    static const int gtype[3] = {GGML_BF16, GGML_F16, GGML_Q8_0};
    for (int k = 0; have_ggml && k < 3; k++) {
        ggml_case_init(&g, &gc[k], gtype[k], w32, nmat, dim);
        bits[S_GGML_BF16 + k] = gc[k].bits;
    }
    float *x = malloc((size_t)dim * 4), *y = malloc((size_t)dim * 4);
    for (int i = 0; i < dim; i++) x[i] = 1.0f / (float)(1 + i % 13) - 0.3f;
    nz_pool *pool = nz_pool_create(2);
    nz_matmul_ctx *mc = nz_matmul_ctx_create(pool, NULL);
    nz_dctx *dc = nz_dctx_create();
    float *scratch = nz_malloc(W[0][0].max_tile * sizeof(float), NZ_MEM_SCRATCH);
    double *t = calloc((size_t)NSYS * 2 * reps, sizeof *t), err[NSYS] = {0};
    double *yref = calloc((size_t)dim, sizeof *yref);
    for (int i = 0; i < dim; i++)
        for (int c = 0; c < dim; c++) yref[i] += (double)w32[nmat - 1][(size_t)i * dim + c] * x[c];
    printf(
        "batch-1 GEMV over %d matrices of %d x %d (fp32 %.0f MiB), %d interleaved rounds, median; ggml: %s\n",
        nmat, dim, dim, (double)nmat * dim * dim * 4 / 1048576.0, reps,
        have_ggml ? g.variant : "not loaded (--ggml DIR)");
    for (int r = 0; r < reps; r++)
        for (int th = 1; th <= 2; th++)
            for (int s = 0; s < NSYS; s++) {
                if (s >= S_GGML_BF16 && s <= S_GGML_Q8 && !have_ggml) continue;
                openblas_set_num_threads(th);
                double t0 = nz_now_s();
                for (int m = 0; m < nmat; m++) {
                    if (s == S_FP32)
                        cblas_sgemv(CblasRowMajor, CblasNoTrans, dim, dim, 1, w32[m], dim, x, 1, 0, y, 1);
                    else if (s == S_BF16)
                        bf16_gemv(wbf[m], x, y, dim, th);
                    else if (s >= S_ESC) {
                        const nz_weight *w = &W[s - S_ESC][m];
                        int rc = th == 1 ? nz_matmul(NULL, dc, scratch, w, x, 1, y, &e)
                                         : nz_matmul_mt(mc, w, x, 1, y, &e);
                        if (rc) die("nz_matmul", e.msg);
                    }
                }
                if (s >= S_GGML_BF16 && s <= S_GGML_Q8)
                    g.graph_compute_with_ctx(gc[s - S_GGML_BF16].ctx, gc[s - S_GGML_BF16].graph, th);
                t[((size_t)s * 2 + (size_t)(th - 1)) * (size_t)reps + (size_t)r] = nz_now_s() - t0;
                if (r == 0 && th == 1) { /* the last matrix's product against fp64 */
                    const float *ys =
                        s >= S_GGML_BF16 && s <= S_GGML_Q8 ? g.get_data(gc[s - S_GGML_BF16].last) : y;
                    double worst = 0, scale = 0;
                    for (int i = 0; i < dim; i++) scale = fmax(scale, fabs(yref[i]));
                    for (int i = 0; i < dim; i++) worst = fmax(worst, fabs(ys[i] - yref[i]));
                    err[s] = worst / scale;
                }
                openblas_set_num_threads(1);
                usleep(20000); /* let spinning BLAS / ggml workers sleep before the next system */
            }
    FILE *out = tsv ? fopen(tsv, "w") : NULL;
    if (out) fprintf(out, "system\tthreads\tbits_per_weight\tgweights_per_s\n");
    printf("%-22s %9s %14s %14s %12s\n", "system", "bits/w", "1 thread Gw/s", "2 threads Gw/s",
           "max |dy|/|y|");
    double gw[NSYS][2] = {{0}};
    for (int s = 0; s < NSYS; s++) {
        if (s >= S_GGML_BF16 && s <= S_GGML_Q8 && !have_ggml) continue;
        for (int th = 0; th < 2; th++) {
            double *v = t + ((size_t)s * 2 + (size_t)th) * (size_t)reps;
            qsort(v, (size_t)reps, sizeof *v, cmp_d);
            gw[s][th] = (double)nmat * dim * dim / v[reps / 2] / 1e9;
            if (out) fprintf(out, "%s\t%d\t%.3f\t%.3f\n", NAME[s], th + 1, bits[s], gw[s][th]);
        }
        printf("%-22s %9.2f %14.2f %14.2f %12.1e\n", NAME[s], bits[s], gw[s][0], gw[s][1], err[s]);
    }
    printf("esc lossless / fp32 OpenBLAS: %.2fx (1 thread), %.2fx (2 threads)\n",
           gw[S_ESC][0] / gw[S_FP32][0], gw[S_ESC][1] / gw[S_FP32][1]);
    if (have_ggml)
        printf("esc lossless / ggml bf16: %.2fx (1 thread), %.2fx (2 threads); lossy-3 / lossless %.2fx, "
               "%.2fx\n",
               gw[S_ESC][0] / gw[S_GGML_BF16][0], gw[S_ESC][1] / gw[S_GGML_BF16][1],
               gw[S_ESC3][0] / gw[S_ESC][0], gw[S_ESC3][1] / gw[S_ESC][1]);
    if (out) fclose(out);
    for (int k = 0; have_ggml && k < 3; k++) g.free(gc[k].ctx);
    nz_free(scratch);
    nz_dctx_free(dc);
    nz_matmul_ctx_free(mc);
    nz_pool_free(pool);
    nz_model_free(model);
    for (int m = 0; m < nmat; m++) free(w32[m]), free(wbf[m]);
    free(x), free(y), free(t), free(yref);
    return 0;
}
