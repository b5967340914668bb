/* Weight-free transformer kernels: see nz_ops.h. */
#include "nz_ops.h"

#include <math.h>
#include <string.h>

/* ------------------------------------------------------------------ norms */

/* torch.nn.LayerNorm: biased variance over the last dim, y = (x - mean) *
 * rsqrt(var + eps) * g + b. Two passes in double (mean, then the centred sum
 * of squares), so the statistics are exact to well below fp32 rounding. */
void nz_layernorm(float *y, const float *x, const float *g, const float *b, size_t M, size_t D, float eps) {
    if (D == 0) return;
    for (size_t r = 0; r < M; r++) {
        const float *xr = x + r * D;
        float *yr = y + r * D;
        double mean = 0;
        for (size_t i = 0; i < D; i++) mean += xr[i];
        mean /= (double)D;
        double var = 0;
        for (size_t i = 0; i < D; i++) {
            double d = xr[i] - mean;
            var += d * d;
        }
        var /= (double)D;
        double rstd = 1.0 / sqrt(var + (double)eps);
        for (size_t i = 0; i < D; i++) {
            float v = (float)((xr[i] - mean) * rstd);
            if (g) v *= g[i];
            if (b) v += b[i];
            yr[i] = v;
        }
    }
}

/* HF T5LayerNorm (RMSNorm, no mean subtraction, no bias):
 * y = x * rsqrt(mean(x^2) + eps) * g, the mean of squares in double. */
void nz_rmsnorm(float *y, const float *x, const float *g, size_t M, size_t D, float eps) {
    if (D == 0) return;
    for (size_t r = 0; r < M; r++) {
        const float *xr = x + r * D;
        float *yr = y + r * D;
        double ss = 0;
        for (size_t i = 0; i < D; i++) ss += (double)xr[i] * xr[i];
        double rstd = 1.0 / sqrt(ss / (double)D + (double)eps);
        for (size_t i = 0; i < D; i++) {
            float v = (float)(xr[i] * rstd);
            yr[i] = g ? v * g[i] : v;
        }
    }
}

/* ------------------------------------------------------------ activations */

/* torch.relu. NaN stays NaN (as in torch). */
void nz_relu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (x[i] < 0.0f) x[i] = 0.0f;
}

/* torch.nn.functional.gelu (approximate="none"): x * 0.5 * (1 + erf(x / sqrt 2)),
 * evaluated in double and rounded once. */
void nz_gelu(float *x, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double v = x[i];
        x[i] = (float)(0.5 * v * (1.0 + erf(v * M_SQRT1_2)));
    }
}

/* HF NewGELUActivation ("gelu_new"):
 * 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), in double. */
void nz_gelu_tanh(float *x, size_t n) {
    const double c = sqrt(2.0 / M_PI);
    for (size_t i = 0; i < n; i++) {
        double v = x[i];
        x[i] = (float)(0.5 * v * (1.0 + tanh(c * (v + 0.044715 * v * v * v))));
    }
}

/* Broadcast bias add over rows (nn.Linear's + b). */
void nz_add_bias(float *y, const float *b, size_t M, size_t N) {
    for (size_t r = 0; r < M; r++) {
        float *yr = y + r * N;
        for (size_t i = 0; i < N; i++) yr[i] += b[i];
    }
}

/* Residual add. */
void nz_add(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] += x[i];
}

/* Elementwise product (gated FFN: act(x W0) * (x W1)). */
void nz_mul(float *y, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) y[i] *= x[i];
}

/* Scalar scale. */
void nz_scale(float *x, size_t n, float s) {
    for (size_t i = 0; i < n; i++) x[i] *= s;
}

/* ------------------------------------------------------- softmax and picks */

/* @return the largest of x[n], -INFINITY when n == 0 or every value is -inf
 * or NaN (NaN is skipped). */
static float row_max(const float *x, size_t n) {
    float m = -INFINITY;
    for (size_t i = 0; i < n; i++)
        if (x[i] > m) m = x[i];
    return m;
}

/* torch.softmax(x, -1): exp(x - max) / sum. A row with no value above -inf
 * (all -inf, e.g. fully masked) becomes all zeros instead of NaN. */
void nz_softmax(float *x, size_t M, size_t N) {
    for (size_t r = 0; r < M; r++) {
        float *xr = x + r * N;
        float m = row_max(xr, N);
        if (m == -INFINITY) {
            memset(xr, 0, N * sizeof *xr);
            continue;
        }
        float sum = 0.0f;
        for (size_t i = 0; i < N; i++) {
            xr[i] = expf(xr[i] - m);
            sum += xr[i];
        }
        float inv = 1.0f / sum;
        for (size_t i = 0; i < N; i++) xr[i] *= inv;
    }
}

/* torch.log_softmax(x, -1): (x - max) - log(sum(exp(x - max))). A row with no
 * value above -inf stays all -inf (log of zero probabilities) instead of
 * NaN. */
void nz_log_softmax(float *x, size_t M, size_t N) {
    for (size_t r = 0; r < M; r++) {
        float *xr = x + r * N;
        float m = row_max(xr, N);
        if (m == -INFINITY) continue;
        float sum = 0.0f;
        for (size_t i = 0; i < N; i++) sum += expf(xr[i] - m);
        const float ls = logf(sum);
        for (size_t i = 0; i < N; i++) xr[i] = (xr[i] - m) - ls; /* torch's order: exact for large x */
    }
}

/* torch.argmax without NaN propagation: the first largest non-NaN value. */
size_t nz_argmax(const float *x, size_t n) {
    size_t best = 0;
    int found = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(x[i])) continue;
        if (!found || x[i] > x[best]) {
            best = i;
            found = 1;
        }
    }
    return best;
}

/* The order of nz_topk: a comes before b when x[a] is larger, or equal with
 * the lower index; NaN comes after every number. */
static int topk_before(const float *x, uint32_t a, uint32_t b) {
    int na = isnan(x[a]), nb = isnan(x[b]);
    if (na != nb) return nb;
    if (!na && x[a] != x[b]) return x[a] > x[b];
    return a < b;
}

/* Restore the heap below position i of h[n], a heap whose root is the
 * element that comes last in topk order (the weakest kept candidate). */
static void topk_sift_down(const float *x, uint32_t *h, size_t n, size_t i) {
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && topk_before(x, h[w], h[l])) w = l;
        if (r < n && topk_before(x, h[w], h[r])) w = r;
        if (w == i) return;
        uint32_t t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

/* torch.topk(x, k, sorted=True) with a deterministic tie order (lower index
 * first). Partial selection with a k-entry heap built in idx: O(n log k),
 * and most elements are rejected by one compare against the heap root. */
size_t nz_topk(const float *x, size_t n, size_t k, uint32_t *idx, float *val) {
    if (k > n) k = n;
    if (k == 0) return 0;
    /* heapify the first k indices */
    for (size_t i = 0; i < k; i++) idx[i] = (uint32_t)i;
    for (size_t i = k / 2; i-- > 0;) topk_sift_down(x, idx, k, i);
    /* each later element replaces the root when it comes before it */
    for (size_t i = k; i < n; i++) {
        if (topk_before(x, (uint32_t)i, idx[0])) {
            idx[0] = (uint32_t)i;
            topk_sift_down(x, idx, k, 0);
        }
    }
    /* heap sort: pop the weakest to the back, leaving descending order */
    for (size_t end = k; end > 1; end--) {
        uint32_t t = idx[0];
        idx[0] = idx[end - 1];
        idx[end - 1] = t;
        topk_sift_down(x, idx, end - 1, 0);
    }
    if (val)
        for (size_t i = 0; i < k; i++) val[i] = x[idx[i]];
    return k;
}

/* --------------------------------------------------------------- sampling */

/* splitmix64 (Steele, Lea, Flood 2014; Vigna's public-domain reference):
 * advances *x and returns the next output. */
static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* xoshiro256** seeding as Vigna recommends: the four state words are four
 * consecutive splitmix64 outputs (never all zero). */
void nz_rng_seed(nz_rng *r, uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

/* xoshiro256** 1.0 (Blackman and Vigna, public-domain reference). */
uint64_t nz_rng_next(nz_rng *r) {
    uint64_t *s = r->s;
    const uint64_t result = rotl64(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* The top 24 bits as a float in [0, 1) (exact: 24 bits fit the mantissa). */
float nz_rng_float(nz_rng *r) { return (float)(nz_rng_next(r) >> 40) * 0x1p-24f; }

size_t nz_sample_work_bytes(size_t n) { return n * (sizeof(float) + sizeof(uint32_t)); }

/* The unnormalised probability of logit l: exp(l / T - mx), 0 for NaN. */
static inline float sample_weight(float l, float T, float mx) { return isnan(l) ? 0.0f : expf(l / T - mx); }

/* Swap candidates i and j (weight and index). */
static inline void cand_swap(float *p, uint32_t *idx, size_t i, size_t j) {
    float tp = p[i];
    p[i] = p[j];
    p[j] = tp;
    uint32_t ti = idx[i];
    idx[i] = idx[j];
    idx[j] = ti;
}

/* The nucleus of candidates idx[cnt] with weights p[cnt]: the shortest
 * prefix in rank order (topk_before on logits) whose weight reaches want,
 * at least one candidate. Quickselect on mass (median-of-three pivots,
 * expected O(cnt)) instead of sorting: it moves the nucleus, unordered, to
 * the front and @return its size. Deterministic (no random pivots). */
static size_t nucleus_select(const float *logits, float *p, uint32_t *idx, size_t cnt, double want) {
    if (!(want > 0)) want = 1e-300; /* at least the first-ranked candidate */
    size_t lo = 0, hi = cnt;        /* [0, lo) is in, [hi, cnt) is out */
    double acc = 0;                 /* the weight of [0, lo), < want */
    while (hi - lo > 16) {
        /* order lo, mid, hi - 1 by rank and pivot on the median, parked at hi - 1 */
        const size_t mid = lo + (hi - lo) / 2;
        if (topk_before(logits, idx[mid], idx[lo])) cand_swap(p, idx, mid, lo);
        if (topk_before(logits, idx[hi - 1], idx[lo])) cand_swap(p, idx, hi - 1, lo);
        if (topk_before(logits, idx[mid], idx[hi - 1])) cand_swap(p, idx, mid, hi - 1);
        const uint32_t piv = idx[hi - 1];
        size_t store = lo;
        double before = 0;
        for (size_t j = lo; j < hi - 1; j++)
            if (topk_before(logits, idx[j], piv)) {
                before += p[j];
                cand_swap(p, idx, j, store++);
            }
        cand_swap(p, idx, store, hi - 1);
        if (acc + before >= want) {
            hi = store; /* the boundary is before the pivot */
        } else if (acc + before + p[store] >= want) {
            return store + 1; /* the pivot completes the nucleus */
        } else {
            acc += before + p[store];
            lo = store + 1;
        }
    }
    /* a few left: insertion sort by rank, then the prefix */
    for (size_t i = lo + 1; i < hi; i++)
        for (size_t j = i; j > lo && topk_before(logits, idx[j], idx[j - 1]); j--)
            cand_swap(p, idx, j, j - 1);
    for (size_t j = lo; j < hi; j++) {
        acc += p[j];
        if (acc >= want) return j + 1;
    }
    return hi > 0 ? hi : 1; /* rounding: all that is left */
}

/* Hugging Face sampling (TemperatureLogitsWarper, TopKLogitsWarper,
 * TopPLogitsWarper, then multinomial), in the order the header gives:
 * candidates are ranked by logit (descending, ties lower index first; a
 * positive temperature does not change the order, so ranking the raw logits
 * avoids ties created by rounding l / T). Probabilities are
 * exp(l / T - max); the nucleus is the shortest ranked prefix whose mass
 * reaches top_p of the mass kept by top-k (nucleus_select: no full sort of
 * the vocabulary). One nz_rng_float per draw; greedy calls (temperature
 * <= 0, top_k == 1) draw nothing. */
uint32_t nz_sample(const float *logits, size_t n, const nz_sampler *s, nz_rng *rng, void *work) {
    const float T = s->temperature;
    size_t k = s->top_k ? s->top_k : n;
    if (k > n) k = n;
    const size_t best = nz_argmax(logits, n);
    /* greedy, a single candidate, or no finite maximum to subtract */
    if (!(T > 0.0f) || k <= 1 || !isfinite(logits[best])) return (uint32_t)best;
    float *p = work;
    uint32_t *idx = (uint32_t *)(p + n);
    const float mx = logits[best] / T;
    size_t cnt; /* the candidates idx[0..cnt), their logits in p */
    if (k < n) {
        cnt = nz_topk(logits, n, k, idx, p);
    } else {
        for (size_t i = 0; i < n; i++) {
            idx[i] = (uint32_t)i;
            p[i] = logits[i];
        }
        cnt = n;
    }
    /* unnormalised probabilities of the candidates */
    double z = 0;
    for (size_t j = 0; j < cnt; j++) {
        p[j] = sample_weight(p[j], T, mx);
        z += p[j];
    }
    if (s->top_p < 1.0f) {
        cnt = nucleus_select(logits, p, idx, cnt, (double)s->top_p * z);
        z = 0;
        for (size_t j = 0; j < cnt; j++) z += p[j];
    }
    /* draw: the first candidate whose cumulative mass exceeds u * z */
    const double u = (double)nz_rng_float(rng) * z;
    double cum = 0;
    size_t last = 0; /* the last candidate with a non-zero probability */
    for (size_t j = 0; j < cnt; j++) {
        if (p[j] <= 0.0f) continue;
        cum += p[j];
        last = j;
        if (u < cum) return idx[j];
    }
    return idx[last]; /* rounding left u at the very end */
}

/* --------------------------------------------------------------- positions */

/* exp(d) in fp32 exactly as torch's CPU kernels compute it on AVX2 / AVX-512
 * (SLEEF's expf u10, Sleef_expf8_u10: Cody-Waite reduction by ln 2, degree-6
 * polynomial, all steps fused multiply-adds). glibc's expf is correctly
 * rounded and differs from it by 1 ulp for ~10% of arguments, which p * f
 * turns into 6e-5 errors at p ~ 1000. For |d| < 100 (no overflow handling). */
static float torch_expf(float d) {
    const int q = (int)rintf(d * 1.442695040888963407359924681001892137426645954152985934135449406931f);
    float s = fmaf((float)q, -0.693145751953125f, d);  /* ln 2, high part */
    s = fmaf((float)q, -1.428606765330187045e-06f, s); /* ln 2, low part */
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    return ldexpf(u, q);
}

/* fairseq SinusoidalPositionalEmbedding.get_embedding, evaluated in fp32 as
 * torch does on the CPU: f_i = exp((float)i * (float)-(log(10000) / (half -
 * 1))) (torch_expf), then sin / cos of (float)p * f_i. half == 1 (D = 2 or 3,
 * a division by zero in fairseq) uses f_0 = 1. Column by column, so each
 * frequency is computed once per call. */
void nz_sinusoidal_positions(float *out, const int64_t *pos, size_t M, size_t D, int64_t padding_idx) {
    const size_t half = D / 2;
    const float emb = half > 1 ? (float)-(log(10000.0) / (double)(half - 1)) : 0.0f;
    for (size_t i = 0; i < half; i++) {
        const float f = torch_expf((float)i * emb);
        for (size_t r = 0; r < M; r++) {
            const float a = (float)pos[r] * f;
            out[r * D + i] = sinf(a);
            out[r * D + half + i] = cosf(a);
        }
    }
    for (size_t r = 0; r < M; r++) {
        if (D % 2) out[r * D + D - 1] = 0.0f;
        if (pos[r] == padding_idx)
            memset(out + r * D, 0, D * sizeof *out); /* fairseq zeroes the padding row */
    }
}

/* fairseq utils.make_positions: pad tokens get padding_idx, the others
 * padding_idx + start + (their 1-based count among the row's non-pad
 * tokens). */
void nz_fairseq_positions(int64_t *out, const int32_t *tokens, size_t B, size_t T, int32_t padding_idx,
                          int64_t start) {
    for (size_t b = 0; b < B; b++) {
        int64_t c = 0;
        for (size_t t = 0; t < T; t++) {
            size_t i = b * T + t;
            out[i] = tokens[i] == padding_idx ? padding_idx : padding_idx + start + ++c;
        }
    }
}

/* HF T5Attention._relative_position_bucket for one rel, with the large-
 * distance branch in fp32 in torch's order: max_exact + (long)(log((float)n /
 * max_exact) / (float)log(max_distance / max_exact) * (num_buckets -
 * max_exact)), clamped to num_buckets - 1. Degenerate settings (fewer than
 * 2 buckets per side, max_distance <= max_exact) stay in range without
 * undefined casts. */
int nz_t5_bucket(int64_t rel, int bidirectional, int num_buckets, int max_distance) {
    int ret = 0;
    uint64_t n;
    if (bidirectional) {
        num_buckets /= 2;
        if (rel > 0) ret += num_buckets;
        n = rel < 0 ? 0 - (uint64_t)rel : (uint64_t)rel;
    } else {
        n = rel < 0 ? 0 - (uint64_t)rel : 0;
    }
    if (num_buckets <= 0) return 0; /* no buckets on this side: nothing meaningful */
    const int max_exact = num_buckets / 2;
    if (n < (uint64_t)max_exact) return ret + (int)n;
    if (max_exact == 0) return ret + num_buckets - 1;
    const float lg = logf((float)n / (float)max_exact);
    const float den = (float)log((double)max_distance / (double)max_exact);
    const float f = lg / den * (float)(num_buckets - max_exact);
    int v;
    if (f >= 0.0f && f < (float)(num_buckets - 1 - max_exact))
        v = max_exact + (int)f;
    else if (f >= 0.0f) /* the clamp; +inf included */
        v = num_buckets - 1;
    else /* NaN or negative: max_distance <= max_exact, no meaningful bucket */
        v = max_exact;
    return ret + v;
}

/* HF T5Attention.compute_bias: values[h][i][j] = table[bucket(k0 + j - (q0 + i))][h],
 * table = relative_attention_bias.weight [num_buckets x H]. */
void nz_t5_position_bias(float *out, const float *table, size_t H, size_t Tq, size_t Tk, int64_t q0,
                         int64_t k0, int bidirectional, int num_buckets, int max_distance) {
    for (size_t i = 0; i < Tq; i++)
        for (size_t j = 0; j < Tk; j++) {
            int64_t rel = (k0 + (int64_t)j) - (q0 + (int64_t)i);
            const float *t = table + (size_t)nz_t5_bucket(rel, bidirectional, num_buckets, max_distance) * H;
            for (size_t h = 0; h < H; h++) out[(h * Tq + i) * Tk + j] = t[h];
        }
}

/* -------------------------------------------------------------- attention */

size_t nz_attention_work_floats(size_t Tk) { return Tk ? Tk : 1; }

/* <a, b> over n floats in a fixed order: 8 partial sums (lane d % 8, in
 * order of d), a fixed tree, then the n % 8 last terms in order (the
 * compiler may vectorise the lanes; no reassociation in ISO C mode). */
static float dot_fixed(const float *a, const float *b, size_t n) {
    float s[8] = {0};
    size_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int l = 0; l < 8; l++) {
            float p = a[d + (size_t)l] * b[d + (size_t)l];
            s[l] += p;
        }
    float r = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
    for (; d < n; d++) {
        float p = a[d] * b[d];
        r += p;
    }
    return r;
}

/* torch scaled_dot_product_attention / fairseq MultiheadAttention core, one
 * (batch row, head, query) at a time, over its visible keys only (padded
 * keys and keys past the causal limit are never touched, not multiplied by
 * a zero probability): scores s_j = scale <q, k_j> (+ bias), softmax with
 * max and sum over the visible keys in key order, out = (sum_j p_j v_j) /
 * sum, accumulated in key order and vectorised over dh. Each output is
 * thus one fixed sequence of operations on its own visible keys: the same
 * bits whatever Tk (how far its batch is padded), the other batch rows or
 * the batch size. */
void nz_attention_pairs(const nz_attn_args *a, size_t p0, size_t p1, float *work) {
    const size_t H = a->H, dh = a->dh, Tq = a->Tq, Tk = a->Tk;
    if (dh == 0 || H == 0) return;
    for (size_t p = p0; p < p1 && p < a->B * H; p++) {
        const size_t b = p / H, h = p % H;
        const size_t kvr = a->kv_map ? a->kv_map[b] : b;
        const uint8_t *pad = a->key_pad ? a->key_pad + kvr * Tk : NULL;
        const float *kb = a->k + kvr * a->kv_bstride + h * dh;
        const float *vb = a->v + kvr * a->kv_bstride + h * dh;
        const float *bias = a->bias ? a->bias + h * Tq * Tk : NULL;
        for (size_t i = 0; i < Tq; i++) {
            const float *qi = a->q + (b * Tq + i) * a->ldq + h * dh;
            float *oi = a->out + (b * Tq + i) * a->ldo + h * dh;
            /* keys j < nk are visible to the causal mask */
            size_t nk = Tk;
            if (a->causal) {
                int64_t lim = a->q0 + (int64_t)i + 1;
                nk = lim <= 0 ? 0 : (uint64_t)lim < Tk ? (size_t)lim : Tk;
            }
            float m = -INFINITY;
            for (size_t j = 0; j < nk; j++) {
                if (pad && pad[j]) continue;
                float sj = dot_fixed(qi, kb + j * a->ldkv, dh) * a->scale;
                if (bias) sj += bias[i * Tk + j];
                work[j] = sj;
                if (sj > m) m = sj;
            }
            if (m == -INFINITY) { /* every key masked */
                memset(oi, 0, dh * sizeof *oi);
                continue;
            }
            float sum = 0.0f;
            for (size_t j = 0; j < nk; j++) {
                if (pad && pad[j]) continue;
                work[j] = expf(work[j] - m);
                sum += work[j];
            }
            /* q is read: oi may now be written (even where out aliases q) */
            memset(oi, 0, dh * sizeof *oi);
            for (size_t j = 0; j < nk; j++) {
                if (pad && pad[j]) continue;
                const float pj = work[j];
                const float *restrict vj = vb + j * a->ldkv;
                float *restrict o = oi;
                for (size_t d = 0; d < dh; d++) {
                    float t = pj * vj[d];
                    o[d] += t;
                }
            }
            const float inv = 1.0f / sum;
            for (size_t d = 0; d < dh; d++) oi[d] *= inv;
        }
    }
}

void nz_attention(const nz_attn_args *a, float *work) { nz_attention_pairs(a, 0, a->B * a->H, work); }
