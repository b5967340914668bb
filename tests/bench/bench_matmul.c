/*
 * bench_matmul — the lazy tile matmul (nz_matmul) against plain OpenBLAS on
 * uncompressed fp32 weights, measured in one run, one thread (OpenBLAS set
 * to 1 thread so the comparison is per core).
 *
 * Shapes: the linear layers of a 512-wide and a 1024-wide transformer
 * (d x d attention projections, 4d x d and d x 4d FFN). For M = 1, 8, 64,
 * 256 rows of activations, each mode reports GFLOP/s and the ratio to the
 * fp32 baseline (cblas_sgemm/sgemv on a contiguous fp32 copy of the same
 * weights):
 *   nz raw f32       raw fp32 tensor through the tile interface (checksums on)
 *   lossless c=0     bf16 lossless rANS, tile cache budget 0 (decode every use)
 *   lossless c=all   bf16 lossless rANS, cache holding the whole model
 *   lossy-3 c=0      lossy-3 from fp32, cache budget 0
 * Targets (issue 3): M >= 64 lossless c=0 >= 0.9x; M = 1 >= 0.5x.
 */
#include "nz_alloc.h"
#include "nz_cache.h"
#include "nz_codec.h"
#include "nz_container.h"
#include "nz_weight.h"

#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

void openblas_set_num_threads(int);

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

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

static void add(nz_writer *w, const char *name, nz_dtype dt, const char *mode, const void *src, int n,
                int k) {
    nz_error e = {0};
    nz_mode md;
    nz_tensor_desc d;
    int64_t shape[2] = {n, k};
    if (nz_mode_parse(mode, &md, &e) ||
        nz_desc_init(&d, dt, nz_dtype_size(dt), &md, NZ_CODER_RANS, (uint64_t)n, (uint64_t)k,
                     nz_default_tile_rows((uint64_t)k), &e) ||
        nz_tensor_analyze(&d, src, NULL, &e) ||
        nz_writer_add_tensor(w, name, dt == NZ_DT_F32 ? "F32" : "BF16", 2, shape, &d, NULL, src, &e))
        die(name, &e);
}

/* Best time of 5 runs, each repeating fn for >= 0.05 s. */
#define TIME_BEST(out, stmt)                                                                                 \
    do {                                                                                                     \
        double best_ = 1e30;                                                                                 \
        for (int r_ = 0; r_ < 5; r_++) {                                                                     \
            int reps_ = 0;                                                                                   \
            double t0_ = now_s(), el_;                                                                       \
            do {                                                                                             \
                stmt;                                                                                        \
                reps_++;                                                                                     \
                el_ = now_s() - t0_;                                                                         \
            } while (el_ < 0.05);                                                                            \
            if (el_ / reps_ < best_) best_ = el_ / reps_;                                                    \
        }                                                                                                    \
        out = best_;                                                                                         \
    } while (0)

int main(void) {
    openblas_set_num_threads(1);
    static const int widths[] = {512, 1024};
    static const int Ms[] = {1, 8, 64, 256};
    static const char *modes[] = {"nz raw f32", "lossless c=0", "lossless c=all", "lossy-3 c=0"};
    double worst_m1 = 1e9, worst_m64 = 1e9;
    printf(
        "nzserve matmul benchmark: y[M x N] = x[M x K] W^T, one thread, GFLOP/s (ratio to fp32 OpenBLAS)\n");
    for (int wi = 0; wi < 2; wi++) {
        int d = widths[wi];
        int shapes[3][2] = {{d, d}, {4 * d, d}, {d, 4 * d}};
        for (int si = 0; si < 3; si++) {
            int n = shapes[si][0], k = shapes[si][1];
            float *w32 = malloc((size_t)n * k * sizeof *w32);
            uint16_t *wbf = malloc((size_t)n * k * sizeof *wbf);
            for (size_t i = 0; i < (size_t)n * k; i++) {
                wbf[i] = nz_f32_to_bf16((float)(0.02 * gauss()));
                w32[i] = nz_bf16_to_f32(wbf[i]); /* same values in every mode */
            }
            char path[] = "/tmp/nz_bench_matmul_XXXXXX";
            int fd = mkstemp(path);
            close(fd);
            nz_writer *wr;
            nz_error e = {0};
            if (nz_writer_create(path, &wr, &e)) die("create", &e);
            add(wr, "raw", NZ_DT_F32, "raw", w32, n, k);
            add(wr, "lossless", NZ_DT_BF16, "lossless", wbf, n, k);
            add(wr, "lossy", NZ_DT_F32, "lossy-3", w32, n, k);
            if (nz_writer_finish(wr, &e)) die("finish", &e);
            nz_model *m;
            if (nz_model_open(path, &m, &e)) die("open", &e);
            unlink(path);
            nz_weight wr32, wl, wy;
            if (nz_weight_bind(&wr32, m, "raw", &e) || nz_weight_bind(&wl, m, "lossless", &e) ||
                nz_weight_bind(&wy, m, "lossy", &e))
                die("bind", &e);
            nz_dctx *dc = nz_dctx_create();
            size_t maxt = wr32.max_tile > wl.max_tile ? wr32.max_tile : wl.max_tile;
            float *scratch = malloc(maxt * sizeof(float));
            nz_tile_cache *c0 = nz_cache_create(0), *call = nz_cache_create((size_t)4 << 30);
            printf("\n== %d-wide: W %d x %d (bf16 lossless stored %.1f%% of bf16)\n", d, n, k,
                   100.0 * (double)wl.t->stored_bytes / ((double)n * k * 2));
            printf("  %-5s %16s", "M", "fp32 baseline");
            for (int mi = 0; mi < 4; mi++) printf(" %22s", modes[mi]);
            printf("\n");
            for (int mi = 0; mi < 4; mi++) {
                int M = Ms[mi];
                float *x = malloc((size_t)M * k * sizeof *x), *y = malloc((size_t)M * n * sizeof *y);
                for (size_t i = 0; i < (size_t)M * k; i++) x[i] = (float)gauss();
                double flops = 2.0 * M * n * k, tb, t[4];
                if (M == 1)
                    TIME_BEST(tb, cblas_sgemv(CblasRowMajor, CblasNoTrans, n, k, 1, w32, k, x, 1, 0, y, 1));
                else
                    TIME_BEST(tb, cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, n, k, 1, x, k, w32,
                                              k, 0, y, n));
                TIME_BEST(t[0], nz_matmul(c0, dc, scratch, &wr32, x, (size_t)M, y, &e));
                TIME_BEST(t[1], nz_matmul(c0, dc, scratch, &wl, x, (size_t)M, y, &e));
                TIME_BEST(t[2], nz_matmul(call, dc, scratch, &wl, x, (size_t)M, y, &e));
                TIME_BEST(t[3], nz_matmul(c0, dc, scratch, &wy, x, (size_t)M, y, &e));
                printf("  %-5d %16.2f", M, flops / tb / 1e9);
                for (int j = 0; j < 4; j++) printf(" %14.2f (%4.2fx)", flops / t[j] / 1e9, tb / t[j]);
                printf("\n");
                if (M == 1 && tb / t[1] < worst_m1) worst_m1 = tb / t[1];
                if (M >= 64 && tb / t[1] < worst_m64) worst_m64 = tb / t[1];
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
    printf("\ntarget: lossless c=0 at M >= 64 >= 0.9x fp32: worst %.2fx (%s)\n", worst_m64,
           worst_m64 >= 0.9 ? "PASS" : "FAIL");
    printf("target: lossless c=0 at M = 1 >= 0.5x fp32: worst %.2fx (%s)\n", worst_m1,
           worst_m1 >= 0.5 ? "PASS" : "FAIL");
    return 0;
}
