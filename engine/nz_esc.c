/* The multi-level escape code: tables, encoder, checks, portable decoder and
 * dispatch to the AVX2 kernels (see nz_esc.h). */
#include "nz_esc.h"

#include "nz_rans.h"

#include <math.h>
#include <string.h>

static inline uint8_t rotr1(uint8_t s) { return (uint8_t)(s >> 1 | s << 7); }

static uint64_t level_bytes(int l, uint64_t n) {
    return l < 3 ? (n + NZ_ESC_BLOCK - 1) / NZ_ESC_BLOCK * 32 : n;
}

/* field i of a level: byte i % 32 of block i / 128, bits 2 * (i / 32 % 4) */
static inline unsigned get_field(const uint8_t *blk, uint64_t i) {
    return blk[i / NZ_ESC_BLOCK * 32 + i % 32] >> (2 * (i / 32 % 4)) & 3u;
}

void nz_esc_table_build(const uint32_t freq[256], nz_esc_table *t) {
    int order[256], k = 0;
    for (int s = 0; s < 256; s++)
        if (freq[s]) order[k++] = s;
    /* by frequency, descending; ties by symbol (insertion sort: 256 at most) */
    for (int i = 1; i < k; i++) {
        int s = order[i], j = i;
        while (j > 0 && freq[order[j - 1]] < freq[s]) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = s;
    }
    memset(t->rank, 255, sizeof t->rank);
    for (int r = 0; r < NZ_ESC_RANKS; r++) {
        t->sym[r] = (uint8_t)(r < k ? order[r] : k ? order[0] : 0);
        if (r < k) t->rank[order[r]] = (uint8_t)r;
    }
    for (int rot = 0; rot < 2; rot++)
        for (int l = 0; l < 3; l++) {
            for (int c = 0; c < 4; c++) {
                uint8_t s = c < 3 ? t->sym[3 * l + c] : 0;
                t->lut[rot][l][c] = rot ? rotr1(s) : s;
            }
            for (int nb = 0; nb < 16; nb++) {
                t->nib[rot][l][0][nb] = t->lut[rot][l][nb & 3];
                t->nib[rot][l][1][nb] = t->lut[rot][l][nb >> 2];
            }
        }
}

size_t nz_esc_bound(uint64_t n) { return NZ_ESC_HDR + (size_t)(level_bytes(0, n) * 3 + n); }

int nz_esc_encode(const uint8_t *sym, uint64_t n, const nz_esc_table *t, uint8_t *dst, size_t cap,
                  size_t *len, nz_error *err) {
    uint64_t cnt[NZ_ESC_LEVELS] = {n, 0, 0, 0};
    for (uint64_t i = 0; i < n; i++) {
        unsigned r = t->rank[sym[i]];
        cnt[1] += r >= 3;
        cnt[2] += r >= 6;
        cnt[3] += r >= NZ_ESC_RANKS;
    }
    if (cnt[1] > UINT32_MAX) return nz_fail(err, NZ_E_INVALID_ARG, "too many symbols for one esc section");
    uint64_t total = NZ_ESC_HDR;
    for (int l = 0; l < NZ_ESC_LEVELS; l++) total += level_bytes(l, cnt[l]);
    if (total > cap) return nz_fail(err, NZ_E_INVALID_ARG, "esc output buffer too small");
    memset(dst, 0, total);
    for (int l = 1; l < NZ_ESC_LEVELS; l++) nz_wr32le(dst + 4 * (l - 1), (uint32_t)cnt[l]);
    uint8_t *lv[NZ_ESC_LEVELS];
    lv[0] = dst + NZ_ESC_HDR;
    for (int l = 1; l < NZ_ESC_LEVELS; l++) lv[l] = lv[l - 1] + level_bytes(l - 1, cnt[l - 1]);
    uint64_t pos[NZ_ESC_LEVELS] = {0};
    for (uint64_t i = 0; i < n; i++) {
        unsigned r = t->rank[sym[i]];
        for (int l = 0; l < NZ_ESC_LEVELS; l++) {
            if (l == 3) {
                lv[3][pos[3]++] = sym[i];
                break;
            }
            unsigned f = r >= 3u * l + 3 ? 3 : r - 3u * l;
            uint64_t p = pos[l]++;
            lv[l][p / NZ_ESC_BLOCK * 32 + p % 32] |= (uint8_t)(f << (2 * (p / 32 % 4)));
            if (f != 3) break;
        }
    }
    *len = (size_t)total;
    return NZ_OK;
}

int nz_esc_open(const uint8_t *src, size_t len, uint64_t n, int exp_bits, nz_esc_view *v, nz_error *err) {
    if (len < NZ_ESC_HDR) return nz_fail(err, NZ_E_TRUNCATED, "esc section of %zu bytes has no header", len);
    v->n[0] = n;
    for (int l = 1; l < NZ_ESC_LEVELS; l++) {
        v->n[l] = nz_rd32le(src + 4 * (l - 1));
        if (v->n[l] > v->n[l - 1])
            return nz_fail(err, NZ_E_CORRUPT, "esc level %d holds %llu entries, more than level %d's %llu",
                           l + 1, (unsigned long long)v->n[l], l, (unsigned long long)v->n[l - 1]);
    }
    uint64_t total = NZ_ESC_HDR;
    for (int l = 0; l < NZ_ESC_LEVELS; l++) {
        v->lv[l] = src + total;
        total += level_bytes(l, v->n[l]);
    }
    if (total != len)
        return nz_fail(err, len < total ? NZ_E_TRUNCATED : NZ_E_FORMAT,
                       "esc section has %zu bytes, its counts need %llu", len, (unsigned long long)total);
    for (int l = 0; l < 3; l++) {
        uint64_t nl = v->n[l];
        for (uint64_t i = nl; i < (nl + NZ_ESC_BLOCK - 1) / NZ_ESC_BLOCK * NZ_ESC_BLOCK; i++)
            if (get_field(v->lv[l], i))
                return nz_fail(err, NZ_E_CORRUPT, "esc level %d: fields set past its last entry", l + 1);
    }
    if (exp_bits < 8)
        for (uint64_t i = 0; i < v->n[3]; i++)
            if (v->lv[3][i] >> exp_bits)
                return nz_fail(err, NZ_E_CORRUPT, "esc symbol %u wider than %d bits", v->lv[3][i], exp_bits);
    return NZ_OK;
}

/* Scratch regions, each the input of the level above: the raw level-4
 * symbols (then read by level 3), level 3's output (read by level 2), level
 * 2's output (read by level 1). A level reads as many escapes as its fields
 * say, which a corrupt section may make up to one per field, plus 32 bytes:
 * region r is sized for the fields of the level reading it, so no section,
 * however corrupt, reads outside scratch; the decoders then compare the
 * escapes read with the counts. */
static uint64_t region(uint64_t fields) { return (fields + 31) / 32 * 32 + 32; }

size_t nz_esc_scratch_bytes(const nz_esc_view *v) {
    return (size_t)(region(v->n[2]) + region(v->n[1]) + region(v->n[0]));
}

static int count_fail(nz_error *err, int l, uint64_t read, uint64_t want) {
    return nz_fail(err, NZ_E_CORRUPT, "esc level %d has %llu escapes for %llu entries at level %d", l + 1,
                   (unsigned long long)read, (unsigned long long)want, l + 2);
}

uint64_t nz_esc_level_scalar(const uint8_t *blk, uint64_t i0, uint64_t i1, const uint8_t lut[4],
                             const uint8_t *esc, uint8_t *out) {
    uint64_t used = 0, i = i0;
    while (i < i1) {
        if (i % 32 == 0 && i1 - i >= 32) { /* a whole run: one shift for 32 fields */
            const uint8_t *b = blk + i / NZ_ESC_BLOCK * 32;
            unsigned sh = 2 * (unsigned)(i / 32 % 4);
            uint8_t *o = out + (i - i0);
            for (int j = 0; j < 32; j++) { /* branch-free: esc is readable past its last byte */
                unsigned f = b[j] >> sh & 3u, x = f == 3;
                o[j] = x ? esc[used] : lut[f];
                used += x;
            }
            i += 32;
            continue;
        }
        unsigned f = get_field(blk, i);
        out[i - i0] = f == 3 ? esc[used++] : lut[f];
        i++;
    }
    return used;
}

int nz_esc_use_avx2(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    /* the kernels also use FMA (the rANS decoder's AVX2 choice does not check it) */
    return nz_esc_avx2_compiled && nz_rans_active_kernel() != NZ_RANS_SCALAR && __builtin_cpu_supports("fma");
#else
    return nz_esc_avx2_compiled && nz_rans_active_kernel() != NZ_RANS_SCALAR;
#endif
}

/* One level, fields [0, n): AVX2 on whole runs of 32, the rest portable.
 * @return the escapes read. */
static uint64_t level(const uint8_t *blk, uint64_t n, const nz_esc_table *t, int rot, int l,
                      const uint8_t *esc, uint8_t *out) {
    uint64_t n32 = nz_esc_use_avx2() ? n / 32 * 32 : 0, used = 0;
    if (n32) used = nz_esc_level_avx2(blk, 0, n32, t->nib[rot][l], esc, out);
    return used + nz_esc_level_scalar(blk, n32, n, t->lut[rot][l], esc + used, out + n32);
}

int nz_esc_decode_escapes(const nz_esc_view *v, const nz_esc_table *t, int rotated, uint8_t *scratch,
                          const uint8_t **esc, nz_error *err) {
    uint8_t *s4 = scratch, *s3 = s4 + region(v->n[2]), *s2 = s3 + region(v->n[1]);
    for (uint64_t i = 0; i < v->n[3]; i++) s4[i] = rotated ? rotr1(v->lv[3][i]) : v->lv[3][i];
    memset(s4 + v->n[3], 0, 32);
    uint64_t r = level(v->lv[2], v->n[2], t, rotated, 2, s4, s3);
    if (r != v->n[3]) return count_fail(err, 2, r, v->n[3]);
    memset(s3 + v->n[2], 0, 32);
    r = level(v->lv[1], v->n[1], t, rotated, 1, s3, s2);
    if (r != v->n[2]) return count_fail(err, 1, r, v->n[2]);
    memset(s2 + v->n[1], 0, 32);
    *esc = s2;
    return NZ_OK;
}

int nz_esc_decode(const nz_esc_view *v, const nz_esc_table *t, uint8_t *scratch, uint8_t *out,
                  nz_error *err) {
    const uint8_t *esc;
    int rc = nz_esc_decode_escapes(v, t, 0, scratch, &esc, err);
    if (rc) return rc;
    uint64_t r = level(v->lv[0], v->n[0], t, 0, 0, esc, out);
    return r == v->n[1] ? NZ_OK : count_fail(err, 0, r, v->n[1]);
}

/* the bf16-layout sign+mantissa byte of element i of a plane of mant 7 or 3 bits */
static inline uint8_t sm_byte(const uint8_t *sm, int mant, uint64_t i) {
    if (mant == 7) return sm[i];
    unsigned v = sm[i / 2] >> (4 * (i & 1)) & 15u;
    return (uint8_t)((v >> 3) << 7 | (v & 7) << 4);
}

/* fp32 of a rotated symbol r and a sign+mantissa byte */
static inline float bf16r_f32(uint8_t r, uint8_t sm) {
    uint32_t e = (uint32_t)(uint8_t)(r << 1 | r >> 7);
    uint32_t b = (uint32_t)(sm & 0x80u) << 24 | e << 23 | (uint32_t)(sm & 0x7fu) << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* Portable level 1 of the bf16 layout, fields [i0, n), 32 at a time:
 * calls fn(ud, i, w, m) with m weights of fields i.. */
typedef void (*weights_fn)(void *ud, uint64_t i, const float *w, uint64_t m);

static uint64_t bf16_portable(const nz_esc_view *v, const nz_esc_table *t, uint64_t i0, const uint8_t *esc,
                              const uint8_t *sm, int mant, weights_fn fn, void *ud) {
    const uint8_t *e0 = esc;
    uint8_t e[32];
    float w[32];
    for (uint64_t i = i0; i < v->n[0]; i += 32) {
        uint64_t m = v->n[0] - i < 32 ? v->n[0] - i : 32;
        esc += nz_esc_level_scalar(v->lv[0], i, i + m, t->lut[1][0], esc, e);
        for (uint64_t j = 0; j < m; j++) w[j] = bf16r_f32(e[j], sm_byte(sm, mant, i + j));
        fn(ud, i, w, m);
    }
    return (uint64_t)(esc - e0);
}

static void store_weights(void *ud, uint64_t i, const float *w, uint64_t m) {
    memcpy((float *)ud + i, w, m * 4);
}

int nz_esc_decode_bf16(const nz_esc_view *v, const nz_esc_table *t, uint8_t *scratch, const uint8_t *sm,
                       int mant, float *out, nz_error *err) {
    const uint8_t *esc;
    int rc = nz_esc_decode_escapes(v, t, 1, scratch, &esc, err);
    if (rc) return rc;
    uint64_t n32 = nz_esc_use_avx2() ? v->n[0] / 32 * 32 : 0, used = 0;
    if (n32) used = nz_esc_bf16_avx2(v->lv[0], n32, t->nib[1][0], esc, sm, mant, out);
    used += bf16_portable(v, t, n32, esc + used, sm, mant, store_weights, out);
    return used == v->n[1] ? NZ_OK : count_fail(err, 0, used, v->n[1]);
}

/* The portable fused multiply of up to NZ_ESC_GEMM_MAX input rows: the
 * arithmetic of the AVX2 kernels (nz_esc.h) emulated lane by lane (fmaf
 * rounds once, as vfmadd does), weights fed in element order. */
typedef struct {
    const float *x;                    /* [M * cols] */
    float *y;                          /* y[m * ldy + row] */
    uint64_t cols, runs_end, row, col; /* runs_end: the columns in whole runs of 32 */
    size_t M, ldy;
    float run[32];                    /* the weights of the row's current run */
    float acc[NZ_ESC_GEMM_MAX][2][8]; /* per input row: the accumulators of its even and odd runs */
    float s[NZ_ESC_GEMM_MAX];         /* per input row: the sum, then the tail added */
} dot_state;

/* column (within its run) of lane l of the AVX2 kernels' weight vector k (weights32_eo) */
static inline unsigned eo_col(unsigned k, unsigned l) {
    return 16 * (l / 4) + 8 * (k / 2) + 2 * (l % 4) + k % 2;
}

/* The run of 32 weights starting at column c0 (run c0 / 32 of the row) into
 * every input row's accumulator of that run's parity, its four vectors in
 * order. */
static void dot_run(dot_state *d, uint64_t c0) {
    for (size_t m = 0; m < d->M; m++) {
        const float *x = d->x + m * d->cols + c0;
        float *a = d->acc[m][c0 / 32 % 2];
        for (unsigned k = 0; k < 4; k++)
            for (unsigned l = 0; l < 8; l++) a[l] = fmaf(d->run[eo_col(k, l)], x[eo_col(k, l)], a[l]);
    }
}

static void dot_weights(void *ud, uint64_t i, const float *w, uint64_t n) {
    dot_state *d = ud;
    (void)i;
    for (uint64_t j = 0; j < n; j++) {
        const uint64_t c = d->col;
        if (c == 0)
            for (size_t m = 0; m < d->M; m++) {
                memset(d->acc[m], 0, sizeof d->acc[m]);
                d->s[m] = 0;
            }
        if (c < d->runs_end) {
            d->run[c % 32] = w[j];
            if (c % 32 == 31) dot_run(d, c - 31);
            if (c + 1 == d->runs_end)
                for (size_t m = 0; m < d->M; m++) {
                    float v[8];
                    for (int l = 0; l < 8; l++) v[l] = d->acc[m][0][l] + d->acc[m][1][l];
                    float lo = (v[0] + v[4]) + (v[2] + v[6]);
                    float hi = (v[1] + v[5]) + (v[3] + v[7]);
                    d->s[m] = lo + hi;
                }
        } else {
            for (size_t m = 0; m < d->M; m++) d->s[m] = fmaf(w[j], d->x[m * d->cols + c], d->s[m]);
        }
        if (++d->col == d->cols) {
            for (size_t m = 0; m < d->M; m++) d->y[m * d->ldy + d->row] = d->s[m];
            d->row++;
            d->col = 0;
        }
    }
}

int nz_esc_gemm_bf16(const nz_esc_view *v, const nz_esc_table *t, uint8_t *scratch, const uint8_t *sm,
                     int mant, uint64_t rows, uint64_t cols, const float *x, size_t M, float *xp, float *wt,
                     float *y, size_t ldy, nz_error *err) {
    const uint8_t *esc;
    int rc = nz_esc_decode_escapes(v, t, 1, scratch, &esc, err);
    if (rc) return rc;
    const int simd = cols % 32 == 0 && rows && nz_esc_use_avx2();
    if (simd && wt && M > NZ_ESC_GEMM_MAX) { /* decode once, then the register-blocked kernel */
        uint64_t used = nz_esc_bf16eo_avx2(v->lv[0], rows * cols, t->nib[1][0], esc, sm, mant, wt);
        if (used != v->n[1]) return count_fail(err, 0, used, v->n[1]);
        nz_esc_gemm_eo_avx2(wt, rows, cols, x, M, xp, y, ldy);
        return NZ_OK;
    }
    /* passes of at most NZ_ESC_GEMM_MAX rows, nearly equal (17 rows: 9 + 8, not 16 + 1) */
    const size_t passes = (M + NZ_ESC_GEMM_MAX - 1) / NZ_ESC_GEMM_MAX;
    for (size_t pi = 0, m0 = 0; pi < passes; pi++) {
        const size_t mc = M / passes + (pi < M % passes);
        const float *xc = x + m0 * cols;
        float *yc = y + m0 * ldy;
        uint64_t used;
        if (simd) {
            nz_esc_permute_x_avx2(xc, cols, mc, xp);
            if (mc == 1)
                used = nz_esc_gemv_avx2(v->lv[0], rows, cols, t->nib[1][0], esc, sm, mant, xp, yc);
            else
                used = nz_esc_gemm_avx2(v->lv[0], rows, cols, t->nib[1][0], esc, sm, mant, xp, mc, yc, ldy);
        } else {
            dot_state d = {.x = xc, .y = yc, .cols = cols, .runs_end = cols / 32 * 32, .M = mc, .ldy = ldy};
            used = bf16_portable(v, t, 0, esc, sm, mant, dot_weights, &d);
        }
        if (used != v->n[1]) return count_fail(err, 0, used, v->n[1]);
        m0 += mc;
    }
    return NZ_OK;
}
