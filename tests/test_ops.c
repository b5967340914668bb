/* Weight-free kernels (nz_ops.h): norms, activations and the softmax family
 * against double-precision references; picks and the sampler against sorts,
 * exact expectations and empirical frequencies; the generator, sinusoidal
 * positions and T5 buckets against values computed independently (a Python
 * xoshiro256** and PyTorch 1.13 CPU, fp32: fairseq get_embedding and HF
 * _relative_position_bucket in a few lines of torch); attention against a
 * naive double-precision reference. */
#include "test_util.h"

#include "nz_ops.h"

#include <math.h>
#include <stdio.h>

/* |got - want| <= tol, else fail naming what. */
#define assert_close(got, want, tol, ...)                                                                    \
    do {                                                                                                     \
        double g_ = (got), w_ = (want), t_ = (tol);                                                          \
        if (!(fabs(g_ - w_) <= t_)) {                                                                        \
            char m_[160];                                                                                    \
            snprintf(m_, sizeof m_, __VA_ARGS__);                                                            \
            fail_msg("%s: got %.9g, want %.9g (tol %.3g)", m_, g_, w_, t_);                                  \
        }                                                                                                    \
    } while (0)

static float *rand_floats(uint64_t *s, size_t n, double mean, double sd) {
    float *x = xmalloc(n * sizeof *x);
    for (size_t i = 0; i < n; i++) x[i] = (float)(mean + sd * tu_gauss(s));
    return x;
}

/* ------------------------------------------------------------------ norms */

/* LayerNorm and RMSNorm against double references (the stats from the same
 * fp32 inputs), with and without gain/bias, rows with a large offset (where
 * one-pass fp32 variance fails), a constant row, D = 1, and in place: error
 * <= 2e-6 * (1 + |ref|), i.e. a couple of fp32 roundings of the output. */
static void test_norms(void **state) {
    (void)state;
    static const size_t Ds[] = {1, 7, 768};
    uint64_t s = 1;
    for (size_t di = 0; di < 3; di++) {
        const size_t M = 5, D = Ds[di];
        float *x = rand_floats(&s, M * D, 0, 1), *g = rand_floats(&s, D, 1, 0.2),
              *b = rand_floats(&s, D, 0, 0.1);
        for (size_t i = 0; i < D; i++) x[1 * D + i] += 1000.0f; /* row 1: large mean */
        for (size_t i = 0; i < D; i++) x[2 * D + i] = 3.5f;     /* row 2: constant */
        float *y = xmalloc(M * D * sizeof *y), *z = xmalloc(M * D * sizeof *z);
        for (int variant = 0; variant < 2; variant++) {
            const float *gg = variant ? g : NULL, *bb = variant ? b : NULL;
            nz_layernorm(y, x, gg, bb, M, D, 1e-5f);
            for (size_t r = 0; r < M; r++) {
                double mean = 0, var = 0;
                for (size_t i = 0; i < D; i++) mean += x[r * D + i];
                mean /= (double)D;
                for (size_t i = 0; i < D; i++) var += (x[r * D + i] - mean) * (x[r * D + i] - mean);
                var /= (double)D;
                for (size_t i = 0; i < D; i++) {
                    double ref =
                        (x[r * D + i] - mean) / sqrt(var + 1e-5) * (gg ? gg[i] : 1) + (bb ? bb[i] : 0);
                    assert_close(y[r * D + i], ref, 2e-6 * (1 + fabs(ref)), "layernorm D=%zu row %zu col %zu",
                                 D, r, i);
                }
            }
            memcpy(z, x, M * D * sizeof *z);
            nz_layernorm(z, z, gg, bb, M, D, 1e-5f);
            assert_memory_equal(z, y, M * D * sizeof *z);

            nz_rmsnorm(y, x, gg, M, D, 1e-6f);
            for (size_t r = 0; r < M; r++) {
                double ss = 0;
                for (size_t i = 0; i < D; i++) ss += (double)x[r * D + i] * x[r * D + i];
                for (size_t i = 0; i < D; i++) {
                    double ref = x[r * D + i] / sqrt(ss / (double)D + 1e-6) * (gg ? gg[i] : 1);
                    assert_close(y[r * D + i], ref, 2e-6 * (1 + fabs(ref)), "rmsnorm D=%zu row %zu col %zu",
                                 D, r, i);
                }
            }
            memcpy(z, x, M * D * sizeof *z);
            nz_rmsnorm(z, z, gg, M, D, 1e-6f);
            assert_memory_equal(z, y, M * D * sizeof *z);
        }
        free(x);
        free(g);
        free(b);
        free(y);
        free(z);
    }
}

/* ------------------------------------------------------------ activations */

/* GELU (erf) and GELU (tanh, HF gelu_new) against torch 1.13 fp32 values
 * (abs 5e-7 + 3e-7 relative: torch's fp32 erf loses relative accuracy in the
 * negative tail, e.g. gelu(-3) is off by 1.7e-7 there, while nz_gelu rounds
 * the double value once) and against the double formulas on random inputs
 * (1e-7 relative); relu, bias, add, mul, scale exactly. */
static void test_activations(void **state) {
    (void)state;
    static const float xs[9] = {-6, -3, -1, -0.5f, 0, 0.5f, 1, 3, 6};
    /* torch.nn.functional.gelu(x) and 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in fp32 */
    static const float gelu_ref[9] = {0.000000000e+00f,  -4.049867392e-03f, -1.586552858e-01f,
                                      -1.542687863e-01f, 0.000000000e+00f,  3.457311988e-01f,
                                      8.413447142e-01f,  2.995950222e+00f,  6.000000000e+00f};
    static const float tanh_ref[9] = {-0.000000000e+00f, -3.637433052e-03f, -1.588079929e-01f,
                                      -1.542859972e-01f, 0.000000000e+00f,  3.457140028e-01f,
                                      8.411920071e-01f,  2.996362686e+00f,  6.000000000e+00f};
    float a[9], c[9];
    memcpy(a, xs, sizeof a);
    memcpy(c, xs, sizeof c);
    nz_gelu(a, 9);
    nz_gelu_tanh(c, 9);
    for (int i = 0; i < 9; i++) {
        assert_close(a[i], gelu_ref[i], 5e-7 + 3e-7 * fabs(gelu_ref[i]), "gelu(%g)", xs[i]);
        assert_close(c[i], tanh_ref[i], 1e-7 + 3e-7 * fabs(tanh_ref[i]), "gelu_tanh(%g)", xs[i]);
    }
    uint64_t s = 2;
    const size_t n = 4096;
    float *x = rand_floats(&s, n, 0, 4), *y = xmalloc(n * sizeof *y), *w = xmalloc(n * sizeof *w);
    memcpy(y, x, n * sizeof *y);
    nz_gelu(y, n);
    memcpy(w, x, n * sizeof *w);
    nz_gelu_tanh(w, n);
    for (size_t i = 0; i < n; i++) {
        double v = x[i];
        double ge = 0.5 * v * (1 + erf(v / sqrt(2.0)));
        double gt = 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
        assert_close(y[i], ge, 1e-7 * (1 + fabs(ge)), "gelu(%g)", v);
        assert_close(w[i], gt, 1e-7 * (1 + fabs(gt)), "gelu_tanh(%g)", v);
    }
    memcpy(y, x, n * sizeof *y);
    nz_relu(y, n);
    for (size_t i = 0; i < n; i++) assert_true(y[i] == (x[i] > 0 ? x[i] : 0.0f));

    const size_t M = 3, N = 5;
    float yb[15], bias[5] = {1, 2, 3, 4, 5};
    for (size_t i = 0; i < M * N; i++) yb[i] = (float)i;
    nz_add_bias(yb, bias, M, N);
    for (size_t i = 0; i < M * N; i++) assert_true(yb[i] == (float)i + bias[i % N]);
    float u[4] = {1, 2, 3, 4}, v[4] = {0.5f, -1, 2, 0};
    nz_add(u, v, 4);
    assert_true(u[0] == 1.5f && u[1] == 1 && u[2] == 5 && u[3] == 4);
    nz_mul(u, v, 4);
    assert_true(u[0] == 0.75f && u[1] == -1 && u[2] == 10 && u[3] == 0);
    nz_scale(u, 3, -2);
    assert_true(u[0] == -1.5f && u[1] == 2 && u[2] == -20 && u[3] == 0);
    free(x);
    free(y);
    free(w);
}

/* ------------------------------------------------------- softmax and picks */

/* Softmax / log-softmax against double references (abs 1e-6 / 1e-5), rows
 * summing to 1, -inf entries giving 0 / -inf, huge logits not overflowing,
 * an all -inf row giving zeros (softmax) / staying -inf (log-softmax), never
 * NaN, and exp(log_softmax) == softmax. */
static void test_softmax(void **state) {
    (void)state;
    const size_t M = 4, N = 1000;
    uint64_t s = 3;
    float *x = rand_floats(&s, M * N, 0, 3), *sm = xmalloc(M * N * sizeof *sm),
          *ls = xmalloc(M * N * sizeof *ls);
    for (size_t i = 0; i < N; i++) x[1 * N + i] += 1e4f; /* row 1: huge logits */
    for (size_t i = 0; i < N; i += 3) x[2 * N + i] = -INFINITY;
    for (size_t i = 0; i < N; i++) x[3 * N + i] = -INFINITY; /* row 3: fully masked */
    memcpy(sm, x, M * N * sizeof *sm);
    memcpy(ls, x, M * N * sizeof *ls);
    nz_softmax(sm, M, N);
    nz_log_softmax(ls, M, N);
    for (size_t r = 0; r < 3; r++) {
        double mx = -INFINITY, sum = 0, got = 0;
        for (size_t i = 0; i < N; i++) mx = fmax(mx, x[r * N + i]);
        for (size_t i = 0; i < N; i++) sum += exp((double)x[r * N + i] - mx);
        for (size_t i = 0; i < N; i++) {
            double lref = (double)x[r * N + i] - mx - log(sum);
            assert_close(sm[r * N + i], exp(lref), 1e-6, "softmax row %zu col %zu", r, i);
            if (isinf(x[r * N + i])) {
                assert_true(sm[r * N + i] == 0.0f);
                assert_true(isinf(ls[r * N + i]) && ls[r * N + i] < 0);
            } else {
                assert_close(ls[r * N + i], lref, 1e-5 * (1 + fabs(lref)), "log_softmax row %zu col %zu", r,
                             i);
                assert_close(expf(ls[r * N + i]), sm[r * N + i], 1e-6, "exp(log_softmax) row %zu col %zu", r,
                             i);
            }
            got += sm[r * N + i];
        }
        assert_close(got, 1.0, 1e-5, "softmax row %zu sum", r);
    }
    for (size_t i = 0; i < N; i++) {
        assert_true(sm[3 * N + i] == 0.0f);
        assert_true(isinf(ls[3 * N + i]) && ls[3 * N + i] < 0);
    }
    /* one finite value among -inf: probability 1, log-probability 0 */
    float one[3] = {-INFINITY, 2.5f, -INFINITY}, lone[3];
    memcpy(lone, one, sizeof lone);
    nz_softmax(one, 1, 3);
    nz_log_softmax(lone, 1, 3);
    assert_true(one[0] == 0 && one[1] == 1 && one[2] == 0);
    assert_true(lone[1] == 0 && isinf(lone[0]) && isinf(lone[2]));
    free(x);
    free(sm);
    free(ls);
}

/* argmax: first index on ties, NaN skipped, all NaN -> 0, all -inf -> 0. */
static void test_argmax(void **state) {
    (void)state;
    float a[6] = {1, 3, 2, 3, -1, 3};
    assert_int_equal(nz_argmax(a, 6), 1);
    assert_int_equal(nz_argmax(a, 1), 0);
    float b[5] = {NAN, -5, NAN, 7, NAN};
    assert_int_equal(nz_argmax(b, 5), 3);
    float c[3] = {NAN, NAN, NAN};
    assert_int_equal(nz_argmax(c, 3), 0);
    float d[3] = {-INFINITY, -INFINITY, -INFINITY};
    assert_int_equal(nz_argmax(d, 3), 0);
    float e[4] = {-INFINITY, NAN, -INFINITY, INFINITY};
    assert_int_equal(nz_argmax(e, 4), 3);
    float f[3] = {NAN, -INFINITY, -2};
    assert_int_equal(nz_argmax(f, 3), 2);
}

/* The reference order of nz_topk, for qsort. */
static const float *g_keys;
static int cmp_rank(const void *pa, const void *pb) {
    uint32_t a = *(const uint32_t *)pa, b = *(const uint32_t *)pb;
    float x = g_keys[a], y = g_keys[b];
    int na = isnan(x), nb = isnan(y);
    if (na != nb) return na ? 1 : -1;
    if (!na && x != y) return x > y ? -1 : 1;
    return a < b ? -1 : 1;
}

/* topk against a full qsort of all indices (value descending, ties lower
 * index first, NaN last) on random data with many ties, for n up to a 32k
 * vocabulary and k from 0 to beyond n; val may be NULL. */
static void test_topk(void **state) {
    (void)state;
    static const size_t ns[] = {1, 10, 1000, 32000};
    static const size_t ks[] = {0, 1, 5, 50, 64, 999, 1000, 32000, 40000};
    uint64_t s = 4;
    for (size_t ni = 0; ni < 4; ni++) {
        const size_t n = ns[ni];
        float *x = xmalloc(n * sizeof *x);
        for (int pass = 0; pass < 3; pass++) {
            for (size_t i = 0; i < n; i++) {
                double g = tu_gauss(&s);
                /* pass 0: continuous; 1: few distinct values (ties); 2: ties, NaN and infinities */
                x[i] = pass == 0 ? (float)g : (float)round(g * 4);
                if (pass == 2 && tu_rand(&s) % 7 == 0) x[i] = NAN;
                if (pass == 2 && tu_rand(&s) % 11 == 0) x[i] = tu_rand(&s) & 1 ? INFINITY : -INFINITY;
            }
            uint32_t *ref = xmalloc(n * sizeof *ref);
            for (size_t i = 0; i < n; i++) ref[i] = (uint32_t)i;
            g_keys = x;
            qsort(ref, n, sizeof *ref, cmp_rank);
            for (size_t ki = 0; ki < sizeof ks / sizeof *ks; ki++) {
                const size_t k = ks[ki], want = k < n ? k : n;
                uint32_t *idx = xmalloc((want ? want : 1) * sizeof *idx);
                float *val = xmalloc((want ? want : 1) * sizeof *val);
                assert_int_equal(nz_topk(x, n, k, idx, val), want);
                for (size_t j = 0; j < want; j++) {
                    if (idx[j] != ref[j])
                        fail_msg("n=%zu k=%zu pass %d: rank %zu is %u, want %u", n, k, pass, j, idx[j],
                                 ref[j]);
                    assert_memory_equal(&val[j], &x[ref[j]], sizeof(float));
                }
                assert_int_equal(nz_topk(x, n, k, idx, NULL), want);
                for (size_t j = 0; j < want; j++) assert_int_equal(idx[j], ref[j]);
                free(idx);
                free(val);
            }
            free(ref);
        }
        free(x);
    }
}

/* --------------------------------------------------------------- sampling */

/* xoshiro256** seeded through splitmix64: first outputs as computed by an
 * independent Python implementation of the published algorithms; floats are
 * the top 24 bits / 2^24. */
static void test_rng(void **state) {
    (void)state;
    static const uint64_t seeds[3] = {0, 42, 0xdeadbeefcafebabeULL};
    static const uint64_t want[3][6] = {
        {0x99ec5f36cb75f2b4ULL, 0xbf6e1f784956452aULL, 0x1a5f849d4933e6e0ULL, 0x6aa594f1262d2d2cULL,
         0xbba5ad4a1f842e59ULL, 0xffef8375d9ebcacaULL},
        {0x15780b2e0c2ec716ULL, 0x6104d9866d113a7eULL, 0xae17533239e499a1ULL, 0xecb8ad4703b360a1ULL,
         0xfde6dc7fe2ec5e64ULL, 0xc50da53101795238ULL},
        {0x2299b3421aa78b66ULL, 0x9af6550483e02887ULL, 0xda059cb5eec5c979ULL, 0xcf86bd29360fff98ULL,
         0x5cc883c940089820ULL, 0xb00610aced04900fULL},
    };
    for (int si = 0; si < 3; si++) {
        nz_rng r;
        nz_rng_seed(&r, seeds[si]);
        for (int i = 0; i < 6; i++)
            if (nz_rng_next(&r) != want[si][i]) fail_msg("seed %d output %d", si, i);
        nz_rng_seed(&r, seeds[si]);
        for (int i = 0; i < 6; i++) assert_true(nz_rng_float(&r) == (float)(want[si][i] >> 40) / 16777216.0f);
    }
    nz_rng r;
    nz_rng_seed(&r, 0);
    assert_true(nz_rng_float(&r) == 0.6012629866600037f);
    /* uniform on [0, 1): range and mean over many draws */
    nz_rng_seed(&r, 7);
    double sum = 0;
    const int n = 100000;
    for (int i = 0; i < n; i++) {
        float f = nz_rng_float(&r);
        assert_true(f >= 0.0f && f < 1.0f);
        sum += f;
    }
    assert_close(sum / n, 0.5, 5 * sqrt(1.0 / 12 / n), "mean of nz_rng_float");
}

/* Greedy cases: temperature <= 0, top_k == 1 at any temperature, top_p tiny
 * all give argmax (ties: the first); greedy calls consume no randomness. */
static void test_sample_greedy(void **state) {
    (void)state;
    const size_t n = 1000;
    uint64_t s = 5;
    float *x = rand_floats(&s, n, 0, 2);
    x[700] = x[300] = 9.0f; /* tied maximum: index 300 wins */
    void *work = xmalloc(nz_sample_work_bytes(n));
    nz_rng r, r0;
    nz_rng_seed(&r, 1);
    r0 = r;
    static const float temps[] = {0.0f, -1.0f};
    for (int i = 0; i < 2; i++) {
        nz_sampler sp = {temps[i], 0, 1.0f};
        assert_int_equal(nz_sample(x, n, &sp, &r, work), 300);
        sp.top_k = 5;
        sp.top_p = 0.5f;
        assert_int_equal(nz_sample(x, n, &sp, &r, work), 300);
    }
    static const float hot[] = {1e-3f, 0.7f, 1.0f, 100.0f, 1e30f};
    for (int i = 0; i < 5; i++) {
        nz_sampler sp = {hot[i], 1, 1.0f};
        for (int rep = 0; rep < 20; rep++) assert_int_equal(nz_sample(x, n, &sp, &r, work), 300);
    }
    assert_memory_equal(&r, &r0, sizeof r); /* no draws so far */
    x[700] = 9.5f;                          /* a unique maximum, far above the rest */
    for (int i = 0; i < 5; i++) {
        nz_sampler sp = {hot[i], 0, 1e-7f};
        for (int rep = 0; rep < 20; rep++) assert_int_equal(nz_sample(x, n, &sp, &r, work), 700);
        sp.top_k = 10;
        for (int rep = 0; rep < 20; rep++) assert_int_equal(nz_sample(x, n, &sp, &r, work), 700);
    }
    /* every logit -inf but one: that one, at any setting */
    for (size_t i = 0; i < n; i++) x[i] = -INFINITY;
    x[42] = -3.0f;
    nz_sampler sp = {1.0f, 0, 1.0f};
    for (int rep = 0; rep < 20; rep++) assert_int_equal(nz_sample(x, n, &sp, &r, work), 42);
    sp.top_p = 0.9f;
    for (int rep = 0; rep < 20; rep++) assert_int_equal(nz_sample(x, n, &sp, &r, work), 42);
    free(x);
    free(work);
}

/* The same seed gives the same token sequence whatever the work buffer held
 * before; another seed gives another sequence. */
static void test_sample_determinism(void **state) {
    (void)state;
    const size_t n = 32000;
    uint64_t s = 6;
    float *x = rand_floats(&s, n, 0, 3);
    const size_t wb = nz_sample_work_bytes(n);
    assert_int_equal(wb, n * (sizeof(float) + sizeof(uint32_t)));
    uint8_t *work = xmalloc(wb);
    static const nz_sampler cfg[] = {{1.0f, 0, 1.0f}, {0.8f, 50, 1.0f}, {1.0f, 0, 0.9f}, {1.3f, 40, 0.95f}};
    for (size_t c = 0; c < 4; c++) {
        uint32_t seq[3][50];
        for (int run = 0; run < 3; run++) {
            nz_rng r;
            nz_rng_seed(&r, run == 2 ? 99 : 1234);
            memset(work, run ? 0xff : 0x00, wb);
            for (int i = 0; i < 50; i++) seq[run][i] = nz_sample(x, n, &cfg[c], &r, work);
        }
        assert_memory_equal(seq[0], seq[1], sizeof seq[0]);
        assert_memory_not_equal(seq[0], seq[2], sizeof seq[0]);
    }
    free(x);
    free(work);
}

/* Counts of draws from a 4-way distribution within 5 sigma of the expected
 * (binomial) counts, for plain sampling, temperature, top-k, top-p and both;
 * excluded tokens are never drawn. 200k draws per case (20k when quick). */
static void test_sample_frequencies(void **state) {
    (void)state;
    const double p[4] = {0.1, 0.2, 0.3, 0.4};
    float logits[4];
    for (int i = 0; i < 4; i++) logits[i] = (float)log(p[i]);
    struct {
        nz_sampler sp;
        double want[4];
    } cases[] = {
        {{1.0f, 0, 1.0f}, {0.1, 0.2, 0.3, 0.4}},
        {{2.0f, 0, 1.0f}, {0, 0, 0, 0}}, /* p^(1/2) renormalised, filled below */
        {{1.0f, 2, 1.0f}, {0, 0, 3.0 / 7, 4.0 / 7}},
        {{1.0f, 0, 0.65f}, {0, 0, 3.0 / 7, 4.0 / 7}},             /* 0.4 + 0.3 >= 0.65 */
        {{1.0f, 0, 0.75f}, {0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9}}, /* needs the third */
        {{1.0f, 3, 0.5f}, {0, 0, 3.0 / 7, 4.0 / 7}},              /* of 0.4/0.9, 0.3/0.9, 0.2/0.9 */
        {{1.0f, 4, 1.0f}, {0.1, 0.2, 0.3, 0.4}},
        {{1.0f, 0, 0.3f}, {0, 0, 0, 1}},
    };
    double z = 0;
    for (int i = 0; i < 4; i++) z += sqrt(p[i]);
    for (int i = 0; i < 4; i++) cases[1].want[i] = sqrt(p[i]) / z;
    const int draws = tu_quick() ? 20000 : 200000;
    uint8_t work[4 * 8];
    assert_true(nz_sample_work_bytes(4) <= sizeof work);
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        nz_rng r;
        nz_rng_seed(&r, 100 + c);
        long cnt[4] = {0};
        for (int d = 0; d < draws; d++) {
            uint32_t t = nz_sample(logits, 4, &cases[c].sp, &r, work);
            assert_true(t < 4);
            cnt[t]++;
        }
        for (int i = 0; i < 4; i++) {
            double q = cases[c].want[i];
            if (q == 0) {
                if (cnt[i]) fail_msg("case %zu: excluded token %d drawn %ld times", c, i, cnt[i]);
                continue;
            }
            double sd = sqrt(draws * q * (1 - q));
            assert_close((double)cnt[i], draws * q, 5 * sd, "case %zu token %d count", c, i);
        }
    }
}

/* On a 32k vocabulary: top-k draws stay in the top k, nucleus draws stay in
 * the nucleus computed from a full sort (including a flat distribution whose
 * nucleus holds thousands of tokens), masked (-inf) and NaN logits are never
 * drawn; with every logit tied, top-k and the nucleus keep the lowest
 * indices. */
static void test_sample_exclusions(void **state) {
    (void)state;
    const size_t n = 32000;
    uint64_t s = 8;
    float *x = xmalloc(n * sizeof *x);
    double *pr = xmalloc(n * sizeof *pr);
    uint32_t *ord = xmalloc(n * sizeof *ord);
    uint8_t *in = xmalloc(n), *work = xmalloc(nz_sample_work_bytes(n));
    const int draws = tu_quick() ? 50 : 500;
    for (int dist = 0; dist < 2; dist++) {
        /* dist 0: peaked (nucleus of tens of tokens); 1: flat (thousands) */
        for (size_t i = 0; i < n; i++) x[i] = (float)((dist ? 0.3 : 3.0) * tu_gauss(&s));
        for (size_t i = 0; i < n; i += 97) x[i] = -INFINITY;
        x[5] = NAN;
        for (size_t i = 0; i < n; i++) ord[i] = (uint32_t)i;
        g_keys = x;
        qsort(ord, n, sizeof *ord, cmp_rank);
        static const nz_sampler cfg[] = {
            {1.0f, 50, 1.0f}, {1.0f, 0, 0.9f}, {0.7f, 0, 0.5f}, {1.0f, 1000, 0.8f}};
        for (size_t c = 0; c < 4; c++) {
            const nz_sampler *sp = &cfg[c];
            const size_t k = sp->top_k ? sp->top_k : n;
            /* reference kept set: top k by rank, then the nucleus prefix of it */
            double mx = x[ord[0]] / sp->temperature, z = 0;
            for (size_t j = 0; j < k; j++) {
                float l = x[ord[j]];
                pr[j] = isnan(l) ? 0 : expf(l / sp->temperature - (float)mx);
                z += pr[j];
            }
            size_t keep = k;
            if (sp->top_p < 1) {
                double cum = 0;
                for (keep = 0; keep < k && (keep == 0 || cum < sp->top_p * z);) cum += pr[keep++];
            }
            memset(in, 0, n);
            for (size_t j = 0; j < keep; j++) in[ord[j]] = 1;
            /* the rounding of the sums may move the boundary by one token */
            const uint32_t edge = keep < n ? ord[keep] : UINT32_MAX;
            if (dist == 1 && c == 1) assert_true(keep > 1000); /* the growing selection path */
            nz_rng r;
            nz_rng_seed(&r, 5 + c);
            for (int d = 0; d < draws; d++) {
                uint32_t t = nz_sample(x, n, sp, &r, work);
                assert_true(t < n);
                assert_false(isnan(x[t]) || isinf(x[t]));
                if (!in[t] && t != edge)
                    fail_msg("dist %d cfg %zu: token %u (rank outside %zu) drawn", dist, c, t, keep);
            }
        }
    }
    /* all tied: the nucleus is the lowest indices (ties rank by index) */
    for (size_t i = 0; i < n; i++) x[i] = 0.5f;
    static const nz_sampler tied[] = {{1.0f, 0, 0.5f}, {2.0f, 100, 1.0f}, {1.0f, 1000, 0.25f}};
    static const uint32_t bound[] = {16000, 100, 250};
    for (size_t c = 0; c < 3; c++) {
        nz_rng r;
        nz_rng_seed(&r, 77);
        uint32_t hi = 0;
        for (int d = 0; d < draws; d++) {
            uint32_t t = nz_sample(x, n, &tied[c], &r, work);
            if (t >= bound[c]) fail_msg("tied cfg %zu: token %u drawn (nucleus is [0, %u))", c, t, bound[c]);
            if (t > hi) hi = t;
        }
        assert_true(hi >= bound[c] / 2); /* and the draws spread over it */
    }
    free(x);
    free(pr);
    free(ord);
    free(in);
    free(work);
}

/* --------------------------------------------------------------- positions */

/* Sinusoidal rows against torch 1.13 CPU fp32 fairseq get_embedding(1100, D,
 * padding_idx=1): abs error <= 1e-6 (observed <= 6e-8, one ulp of sin/cos;
 * the D = 512 columns are ones where glibc's expf differs from torch's by an
 * ulp, which would show as ~6e-5 at position 1023). Pad rows are zero;
 * sin^2 + cos^2 = 1 elsewhere. */
static void test_sinusoidal(void **state) {
    (void)state;
    static const int64_t pos10[6] = {0, 1, 2, 17, 513, 1024};
    static const float ref10[6][10] = {
        {0, 0, 0, 0, 0, 1, 1, 1, 1, 1},
        {0, 0, 0, 0, 0, 0, 0, 0, 0, 0},
        {9.092974067e-01f, 1.986693144e-01f, 1.999866590e-02f, 1.999998465e-03f, 1.999999804e-04f,
         -4.161468446e-01f, 9.800665975e-01f, 9.998000264e-01f, 9.999980330e-01f, 1.000000000e+00f},
        {-9.613975286e-01f, 9.916648269e-01f, 1.691823453e-01f, 1.699917950e-02f, 1.699998975e-03f,
         -2.751633525e-01f, -1.288444251e-01f, 9.855847955e-01f, 9.998555183e-01f, 9.999985695e-01f},
        {-7.958423495e-01f, 8.596135974e-01f, -9.140604138e-01f, 4.907932281e-01f, 5.127749965e-02f,
         -6.055038571e-01f, 5.109446645e-01f, 4.055780470e-01f, 8.712760806e-01f, 9.986844659e-01f},
        {-1.585333794e-01f, 9.558572769e-01f, -7.278777361e-01f, 8.541946411e-01f, 1.022211239e-01f,
         9.873536229e-01f, -2.938313484e-01f, -6.857069731e-01f, 5.199534297e-01f, 9.947617054e-01f},
    };
    float out10[6 * 10];
    nz_sinusoidal_positions(out10, pos10, 6, 10, 1);
    for (int r = 0; r < 6; r++)
        for (int i = 0; i < 10; i++)
            assert_close(out10[r * 10 + i], ref10[r][i], 1e-6, "D=10 pos %d col %d", (int)pos10[r], i);

    static const float ref7[7] = {8.268795609e-01f,
                                  -5.440211296e-01f,
                                  9.983340651e-02f,
                                  5.623790622e-01f,
                                  -8.390715122e-01f,
                                  9.950041771e-01f,
                                  0.0f};
    const int64_t p7[2] = {1000, 1};
    float out7[14];
    memset(out7, 0xff, sizeof out7);
    nz_sinusoidal_positions(out7, p7, 2, 7, 1);
    for (int i = 0; i < 7; i++) assert_close(out7[i], ref7[i], 1e-6, "D=7 col %d", i);
    for (int i = 7; i < 14; i++) assert_true(out7[i] == 0.0f);

    static const int cols[12] = {5, 8, 11, 27, 45, 51, 52, 74, 261, 264, 267, 283};
    static const float ref512[12] = {-5.141327381e-01f, -2.688899040e-01f, 4.109209180e-01f,
                                     5.892249942e-01f,  3.025757372e-01f,  -9.418924451e-01f,
                                     -6.416653395e-01f, 9.992306828e-01f,  8.577105999e-01f,
                                     9.631709456e-01f,  -9.116709828e-01f, -8.079690337e-01f};
    const size_t M = 40, D = 512;
    int64_t *pos = xmalloc(M * sizeof *pos);
    for (size_t r = 0; r < M; r++) pos[r] = r == 7 ? 1 : (int64_t)(1023 - r * 25);
    float *out = xmalloc(M * D * sizeof *out);
    nz_sinusoidal_positions(out, pos, M, D, 1);
    for (int c = 0; c < 12; c++)
        assert_close(out[cols[c]], ref512[c], 1e-6, "D=512 pos 1023 col %d", cols[c]);
    for (size_t r = 0; r < M; r++)
        for (size_t i = 0; i < D / 2; i++) {
            float sn = out[r * D + i], cs = out[r * D + D / 2 + i];
            if (pos[r] == 1)
                assert_true(sn == 0 && cs == 0);
            else
                assert_close(sn * sn + cs * cs, 1.0, 1e-6, "D=512 pos %d col %zu", (int)pos[r], i);
        }
    free(pos);
    free(out);
}

/* make_positions: pads keep padding_idx, the others count from
 * padding_idx + 1 (+ start) over the row's non-pad tokens. */
static void test_fairseq_positions(void **state) {
    (void)state;
    const int32_t tok[3 * 5] = {1, 1, 7, 8, 9, /* left padded */
                                5, 6, 7, 1, 1, /* right padded */
                                4, 1, 4, 1, 4};
    int64_t out[15];
    nz_fairseq_positions(out, tok, 3, 5, 1, 0);
    const int64_t want0[15] = {1, 1, 2, 3, 4, 2, 3, 4, 1, 1, 2, 1, 3, 1, 4};
    assert_memory_equal(out, want0, sizeof out);
    nz_fairseq_positions(out, tok, 3, 5, 1, 10);
    const int64_t want10[15] = {1, 1, 12, 13, 14, 12, 13, 14, 1, 1, 12, 1, 13, 1, 14};
    assert_memory_equal(out, want10, sizeof out);
    const int32_t tz[4] = {0, 3, 0, 3};
    nz_fairseq_positions(out, tz, 1, 4, 0, 0);
    const int64_t wz[4] = {0, 1, 0, 2};
    assert_memory_equal(out, wz, sizeof wz);
}

/* HF _relative_position_bucket on torch 1.13 CPU for rel = -200..200: exact
 * (integers; the large branch is replicated in fp32, and the implementation
 * also matched torch on -5000..5000 for several more configurations). */
static void test_t5_bucket(void **state) {
    (void)state;
    static const signed char bi32[401] = {
        15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
        15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
        15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
        15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15,
        15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 15, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14,
        14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 14, 13, 13, 13, 13, 13, 13, 13,
        13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 13, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12,
        12, 11, 11, 11, 11, 11, 11, 11, 11, 11, 10, 10, 10, 10, 10, 10, 10, 9,  9,  9,  9,  8,  8,  8,
        8,  7,  6,  5,  4,  3,  2,  1,  0,  17, 18, 19, 20, 21, 22, 23, 24, 24, 24, 24, 25, 25, 25, 25,
        26, 26, 26, 26, 26, 26, 26, 27, 27, 27, 27, 27, 27, 27, 27, 27, 28, 28, 28, 28, 28, 28, 28, 28,
        28, 28, 28, 28, 28, 28, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29,
        30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30, 30,
        30, 30, 30, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31,
        31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31,
        31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31,
        31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31,
        31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31};
    static const signed char uni32[401] = {
        31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31,
        31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31,
        31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31,
        31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 31, 30, 30, 30, 30, 30, 30, 30, 30,
        30, 30, 30, 30, 30, 30, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 29, 28, 28, 28, 28, 28, 28,
        28, 28, 28, 28, 27, 27, 27, 27, 27, 27, 27, 27, 27, 27, 26, 26, 26, 26, 26, 26, 26, 26, 25, 25,
        25, 25, 25, 25, 25, 24, 24, 24, 24, 24, 24, 23, 23, 23, 23, 23, 23, 22, 22, 22, 22, 22, 21, 21,
        21, 21, 20, 20, 20, 20, 19, 19, 19, 18, 18, 18, 17, 17, 16, 16, 16, 15, 14, 13, 12, 11, 10, 9,
        8,  7,  6,  5,  4,  3,  2,  1,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
        0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
        0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
        0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
        0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
        0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
        0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
        0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,
        0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0,  0};
    for (int rel = -200; rel <= 200; rel++) {
        int b1 = nz_t5_bucket(rel, 1, 32, 128), b0 = nz_t5_bucket(rel, 0, 32, 128);
        if (b1 != bi32[rel + 200])
            fail_msg("bidirectional rel %d: bucket %d, want %d", rel, b1, bi32[rel + 200]);
        if (b0 != uni32[rel + 200])
            fail_msg("unidirectional rel %d: bucket %d, want %d", rel, b0, uni32[rel + 200]);
    }
    /* far distances clamp; degenerate settings stay in range */
    assert_int_equal(nz_t5_bucket(INT64_MAX, 1, 32, 128), 31);
    assert_int_equal(nz_t5_bucket(INT64_MIN, 1, 32, 128), 15);
    assert_int_equal(nz_t5_bucket(INT64_MIN, 0, 32, 128), 31);
    assert_int_equal(nz_t5_bucket(INT64_MAX, 0, 32, 128), 0);
    static const int nbs[] = {1, 2, 3, 4, 5, 8};
    static const int mds[] = {0, 1, 2, 3, 128};
    static const int64_t rels[] = {INT64_MIN, -1000, -3, -2, -1, 0, 1, 2, 3, 1000, INT64_MAX};
    for (size_t a = 0; a < 6; a++)
        for (size_t m = 0; m < 5; m++)
            for (size_t r = 0; r < 11; r++)
                for (int bi = 0; bi < 2; bi++) {
                    int v = nz_t5_bucket(rels[r], bi, nbs[a], mds[m]);
                    assert_true(v >= 0 && v < nbs[a]);
                }
}

/* out[h][i][j] = table[bucket(k0 + j - q0 - i)][h], including incremental
 * decoding (q0 > 0, one query row) and a key offset. */
static void test_t5_position_bias(void **state) {
    (void)state;
    const size_t H = 3, NB = 32;
    float table[32 * 3];
    for (size_t b = 0; b < NB; b++)
        for (size_t h = 0; h < H; h++) table[b * H + h] = (float)(b * 10 + h);
    static const struct {
        size_t Tq, Tk;
        int64_t q0, k0;
        int bi;
    } cs[] = {{7, 9, 0, 0, 1}, {1, 40, 39, 0, 0}, {5, 5, 100, 3, 0}, {4, 200, 0, 0, 1}};
    for (size_t c = 0; c < 4; c++) {
        float *out = xmalloc(H * cs[c].Tq * cs[c].Tk * sizeof *out);
        nz_t5_position_bias(out, table, H, cs[c].Tq, cs[c].Tk, cs[c].q0, cs[c].k0, cs[c].bi, 32, 128);
        for (size_t h = 0; h < H; h++)
            for (size_t i = 0; i < cs[c].Tq; i++)
                for (size_t j = 0; j < cs[c].Tk; j++) {
                    int64_t rel = cs[c].k0 + (int64_t)j - cs[c].q0 - (int64_t)i;
                    int b = nz_t5_bucket(rel, cs[c].bi, 32, 128);
                    assert_true(out[(h * cs[c].Tq + i) * cs[c].Tk + j] == (float)(b * 10 + (int)h));
                }
        free(out);
    }
}

/* -------------------------------------------------------------- attention */

/* Naive double-precision attention for one (b, h, i) following the
 * nz_attn_args contract; fills ref[dh]. */
static void attn_ref(const nz_attn_args *a, size_t b, size_t h, size_t i, double *ref) {
    const size_t kvr = a->kv_map ? a->kv_map[b] : b;
    double *sc = xmalloc((a->Tk ? a->Tk : 1) * sizeof *sc);
    double mx = -INFINITY;
    for (size_t j = 0; j < a->Tk; j++) {
        const float *q = a->q + (b * a->Tq + i) * a->ldq + h * a->dh;
        const float *k = a->k + kvr * a->kv_bstride + j * a->ldkv + h * a->dh;
        double d = 0;
        for (size_t e = 0; e < a->dh; e++) d += (double)q[e] * k[e];
        sc[j] = a->scale * d + (a->bias ? a->bias[(h * a->Tq + i) * a->Tk + j] : 0);
        if (a->key_pad && a->key_pad[kvr * a->Tk + j]) sc[j] = -INFINITY;
        if (a->causal && (int64_t)j > a->q0 + (int64_t)i) sc[j] = -INFINITY;
        mx = fmax(mx, sc[j]);
    }
    for (size_t e = 0; e < a->dh; e++) ref[e] = 0;
    if (mx == -INFINITY) {
        free(sc);
        return;
    }
    double z = 0;
    for (size_t j = 0; j < a->Tk; j++) z += exp(sc[j] - mx);
    for (size_t j = 0; j < a->Tk; j++) {
        const float *v = a->v + kvr * a->kv_bstride + j * a->ldkv + h * a->dh;
        double w = exp(sc[j] - mx) / z;
        for (size_t e = 0; e < a->dh; e++) ref[e] += w * v[e];
    }
    free(sc);
}

/* One attention configuration against attn_ref: outputs within 2e-5
 * (|v| ~ 1, fp32 dot products of dh terms), fully masked rows exactly zero,
 * and the stride gaps of out untouched. @return rows fully masked. */
static size_t check_attention(nz_attn_args *a, size_t nkv, uint64_t *s) {
    const size_t HD = a->H * a->dh;
    float *q = rand_floats(s, a->B * a->Tq * a->ldq, 0, 1);
    float *k = rand_floats(s, nkv * a->kv_bstride, 0, 1), *v = rand_floats(s, nkv * a->kv_bstride, 0, 1);
    float *out = xmalloc(a->B * a->Tq * a->ldo * sizeof *out);
    for (size_t i = 0; i < a->B * a->Tq * a->ldo; i++) out[i] = 12345.0f;
    float *work = xmalloc(nz_attention_work_floats(a->Tk) * sizeof *work);
    double *ref = xmalloc((a->dh ? a->dh : 1) * sizeof *ref);
    a->q = q;
    a->k = k;
    a->v = v;
    a->out = out;
    nz_attention(a, work);
    size_t masked = 0;
    for (size_t b = 0; b < a->B; b++)
        for (size_t i = 0; i < a->Tq; i++) {
            const float *o = out + (b * a->Tq + i) * a->ldo;
            for (size_t h = 0; h < a->H; h++) {
                attn_ref(a, b, h, i, ref);
                int zero = 1;
                for (size_t e = 0; e < a->dh; e++) {
                    assert_close(o[h * a->dh + e], ref[e], 2e-5, "b=%zu h=%zu i=%zu e=%zu", b, h, i, e);
                    zero &= ref[e] == 0;
                }
                if (zero) {
                    for (size_t e = 0; e < a->dh; e++) assert_true(o[h * a->dh + e] == 0.0f);
                    masked++;
                }
            }
            for (size_t e = HD; e < a->ldo; e++) assert_true(o[e] == 12345.0f);
        }
    free(q);
    free(k);
    free(v);
    free(out);
    free(work);
    free(ref);
    return masked;
}

/* Attention against the naive reference: B > 1 and H > 1 with strides
 * larger than H*dh and a gap between kv batch rows, a kv_map sharing two
 * encoders between three query rows, key padding (one encoder fully padded:
 * zero outputs), a per-head bias, causal masks with q0 = 0, q0 > 0
 * (incremental: one query at the end of the cache) and q0 < 0 (first queries
 * see nothing), and Tk = 1. */
static void test_attention(void **state) {
    (void)state;
    uint64_t s = 9;
    const size_t H = 3, dh = 8, HD = H * dh;
    /* cross attention: 3 query rows over 2 encoders, padding, bias */
    {
        const size_t B = 3, Tq = 4, Tk = 6, nkv = 2;
        const uint32_t map[3] = {1, 0, 1};
        const uint8_t pad[2 * 6] = {0, 0, 0, 0, 1, 1,  /* encoder 0: 4 real keys */
                                    1, 1, 1, 1, 1, 1}; /* encoder 1: all padding */
        float *bias = rand_floats(&s, H * Tq * Tk, 0, 0.5);
        nz_attn_args a = {.ldq = HD + 3,
                          .ldkv = HD + 5,
                          .kv_bstride = Tk * (HD + 5) + 7,
                          .kv_map = map,
                          .key_pad = pad,
                          .bias = bias,
                          .B = B,
                          .Tq = Tq,
                          .Tk = Tk,
                          .H = H,
                          .dh = dh,
                          .scale = 1.0f / sqrtf((float)dh),
                          .ldo = HD + 2};
        assert_int_equal(check_attention(&a, nkv, &s), 2 * Tq * H); /* query rows 0 and 2 */
        uint8_t pad2[12] = {0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
        a.key_pad = pad2;
        assert_int_equal(check_attention(&a, nkv, &s), 0);
        a.bias = NULL;
        a.kv_map = NULL;
        a.B = 2;
        assert_int_equal(check_attention(&a, nkv, &s), 0);
        free(bias);
    }
    /* causal self attention */
    static const struct {
        size_t Tq, Tk;
        int64_t q0;
        size_t masked; /* per (b, h): queries that see no key */
    } cs[] = {{5, 5, 0, 0}, {1, 9, 8, 0}, {3, 9, 4, 0}, {4, 4, -2, 2}, {2, 1, 0, 0}, {1, 1, 0, 0}};
    for (size_t c = 0; c < sizeof cs / sizeof *cs; c++) {
        const size_t B = 2, Tq = cs[c].Tq, Tk = cs[c].Tk;
        float *bias = rand_floats(&s, H * Tq * Tk, 0, 0.5);
        nz_attn_args a = {.ldq = HD + 1,
                          .ldkv = HD,
                          .kv_bstride = Tk * HD,
                          .B = B,
                          .Tq = Tq,
                          .Tk = Tk,
                          .H = H,
                          .dh = dh,
                          .causal = 1,
                          .q0 = cs[c].q0,
                          .scale = 0.3f,
                          .ldo = HD};
        assert_int_equal(check_attention(&a, B, &s), B * H * cs[c].masked);
        a.bias = bias;
        assert_int_equal(check_attention(&a, B, &s), B * H * cs[c].masked);
        free(bias);
    }
}

/* Batch invariance of nz_attention: one sequence (L keys, Tq queries) gets
 * bit-identical outputs alone (B = 1, Tk = L, no padding mask) and as row 1
 * of a batch of 3 padded to Tk = L .. L + 7 keys, the extra keys masked at
 * the end or in front (left padding), the other rows and the padded keys'
 * contents random; with a bias (row stride Tk), and causally (the queries
 * the last Tq positions); dh with and without a tail past a multiple of 8. */
static void test_attention_padding_invariant(void **state) {
    (void)state;
    uint64_t s = 17;
    const size_t H = 2, L = 5, Tq = 3, B = 3;
    static const size_t dhs[] = {8, 12, 64};
    for (size_t di = 0; di < sizeof dhs / sizeof *dhs; di++) {
        const size_t dh = dhs[di], HD = H * dh;
        float *q0 = rand_floats(&s, Tq * HD, 0, 1), *k0 = rand_floats(&s, L * HD, 0, 1);
        float *v0 = rand_floats(&s, L * HD, 0, 1), *bias0 = rand_floats(&s, H * Tq * L, 0, 0.5);
        for (int cfg = 0; cfg < 6; cfg++) {
            const int causal = cfg & 1, left = cfg >> 1 & 1, with_bias = cfg < 4;
            if (causal && left) continue; /* left padding moves the causal limit: not the same sequence */
            float *ref = xmalloc(Tq * HD * sizeof *ref), *work = xmalloc(nz_attention_work_floats(L + 7) * 4);
            nz_attn_args a = {.q = q0,
                              .ldq = HD,
                              .k = k0,
                              .v = v0,
                              .ldkv = HD,
                              .kv_bstride = L * HD,
                              .bias = with_bias ? bias0 : NULL,
                              .B = 1,
                              .Tq = Tq,
                              .Tk = L,
                              .H = H,
                              .dh = dh,
                              .causal = causal,
                              .q0 = (int64_t)(L - Tq),
                              .scale = 0.4f,
                              .out = ref,
                              .ldo = HD};
            nz_attention(&a, work);
            for (size_t pad = 0; pad < 8; pad++) {
                const size_t Tk = L + pad, off = left ? pad : 0; /* the sequence's keys: off .. off + L */
                float *q = rand_floats(&s, B * Tq * HD, 0, 1), *k = rand_floats(&s, B * Tk * HD, 0, 1);
                float *v = rand_floats(&s, B * Tk * HD, 0, 1), *bias = rand_floats(&s, H * Tq * Tk, 0, 0.5);
                float *out = xmalloc(B * Tq * HD * sizeof *out);
                uint8_t *kp = xmalloc(B * Tk);
                for (size_t i = 0; i < B * Tk; i++) kp[i] = tu_rand(&s) % 3 == 0;
                memcpy(q + Tq * HD, q0, Tq * HD * sizeof *q);
                for (size_t j = 0; j < Tk; j++) kp[Tk + j] = j < off || j >= off + L;
                memcpy(k + (Tk + off) * HD, k0, L * HD * sizeof *k);
                memcpy(v + (Tk + off) * HD, v0, L * HD * sizeof *v);
                for (size_t h = 0; h < H; h++)
                    for (size_t i = 0; i < Tq; i++)
                        memcpy(bias + (h * Tq + i) * Tk + off, bias0 + (h * Tq + i) * L, L * sizeof *bias);
                nz_attn_args p = a;
                p.q = q;
                p.k = k;
                p.v = v;
                p.kv_bstride = Tk * HD;
                p.key_pad = kp;
                p.bias = with_bias ? bias : NULL;
                p.B = B;
                p.Tk = Tk;
                p.out = out;
                nz_attention(&p, work);
                if (memcmp(out + Tq * HD, ref, Tq * HD * sizeof *ref))
                    fail_msg("dh %zu causal %d left %d bias %d: padded to Tk = %zu, the outputs differ", dh,
                             causal, left, with_bias, Tk);
                /* split into (row, head) pairs, run last to first: the same bits */
                float *split = xmalloc(B * Tq * HD * sizeof *split);
                p.out = split;
                for (size_t pr = B * H; pr > 0; pr--) nz_attention_pairs(&p, pr - 1, pr, work);
                nz_attention_pairs(&p, B * H, B * H + 5, work); /* past the end: nothing */
                assert_memory_equal(split, out, B * Tq * HD * sizeof *out);
                free(split);
                free(q);
                free(k);
                free(v);
                free(bias);
                free(out);
                free(kp);
            }
            free(ref);
            free(work);
        }
        free(q0);
        free(k0);
        free(v0);
        free(bias0);
    }
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_norms),
        cmocka_unit_test(test_activations),
        cmocka_unit_test(test_softmax),
        cmocka_unit_test(test_argmax),
        cmocka_unit_test(test_topk),
        cmocka_unit_test(test_rng),
        cmocka_unit_test(test_sample_greedy),
        cmocka_unit_test(test_sample_determinism),
        cmocka_unit_test(test_sample_frequencies),
        cmocka_unit_test(test_sample_exclusions),
        cmocka_unit_test(test_sinusoidal),
        cmocka_unit_test(test_fairseq_positions),
        cmocka_unit_test(test_t5_bucket),
        cmocka_unit_test(test_t5_position_bias),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_padding_invariant),
    };
    return cmocka_run_group_tests_name("ops", tests, NULL, NULL);
}
