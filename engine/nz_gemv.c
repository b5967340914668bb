/* Fused decode-and-multiply GEMV: dispatch and the portable kernel (see nz_gemv.h). */
#include "nz_gemv.h"

#include "nz_rans.h"

#include <string.h>

#define RANS_L    (1u << 16)
#define SLOT_MASK (NZ_RANS_PROB_SCALE - 1)

static inline float bf16_f32(uint32_t e, uint32_t sm) {
    uint32_t b = (sm & 0x80u) << 24 | (e & 0xffu) << 23 | (sm & 0x7fu) << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* Portable fast path: whole groups while 2 * lanes bytes of words are left
 * (branch-free renormalisation as in nz_rans.c's dec_fast); dot products
 * per group into the current row. */
static void run_portable(nz_gemv_run *r) {
    const int lanes = r->lanes;
    const uint8_t *p = r->p, *end = r->end, *sm = r->sm;
    const uint32_t *dtab = r->dtab;
    const float *x = r->x;
    float *y = r->y;
    const uint64_t cols = r->cols, n = r->n;
    uint64_t i = r->i, row = r->row, col = r->col;
    float part = r->part, w[64];
    uint32_t st[64];
    memcpy(st, r->st, sizeof st);
    while (n - i >= (uint64_t)lanes && end - p >= 2 * lanes) {
        for (int j = 0; j < lanes; j++) {
            uint32_t e = dtab[st[j] & SLOT_MASK];
            st[j] = (e >> 20) * (st[j] >> NZ_RANS_PROB_BITS) + ((e >> 8) & SLOT_MASK);
            w[j] = bf16_f32(e, sm[i + (uint64_t)j]);
        }
        for (int j = 0; j < lanes; j++) {
            uint32_t need = st[j] < RANS_L, word = (uint32_t)p[0] | (uint32_t)p[1] << 8;
            st[j] = need ? st[j] << 16 | word : st[j];
            p += 2 * need;
        }
        for (int j = 0; j < lanes;) { /* the group's elements, row piece by row piece */
            uint64_t take = cols - col < (uint64_t)(lanes - j) ? cols - col : (uint64_t)(lanes - j);
            float s = 0;
            for (uint64_t k = 0; k < take; k++) s += w[j + (int)k] * x[col + k];
            part += s;
            j += (int)take;
            col += take;
            if (col == cols) {
                y[row++] = part;
                part = 0;
                col = 0;
            }
        }
        i += (uint64_t)lanes;
    }
    memcpy(r->st, st, sizeof st);
    r->p = p;
    r->i = i;
    r->row = row;
    r->col = col;
    r->part = part;
}

/* Symbol by symbol with bounds checks: the tail after the fast paths. */
static int run_checked(nz_gemv_run *r, nz_error *err) {
    for (; r->i < r->n; r->i++) {
        uint32_t *xs = &r->st[r->i & (uint64_t)(r->lanes - 1)];
        uint32_t e = r->dtab[*xs & SLOT_MASK];
        *xs = (e >> 20) * (*xs >> NZ_RANS_PROB_BITS) + ((e >> 8) & SLOT_MASK);
        r->part += bf16_f32(e, r->sm[r->i]) * r->x[r->col];
        if (++r->col == r->cols) {
            r->y[r->row++] = r->part;
            r->part = 0;
            r->col = 0;
        }
        if (*xs < RANS_L) {
            if (r->end - r->p < 2)
                return nz_fail(err, NZ_E_TRUNCATED, "rANS stream ends early (symbol %llu of %llu)",
                               (unsigned long long)r->i, (unsigned long long)r->n);
            *xs = *xs << 16 | (uint32_t)r->p[0] | (uint32_t)r->p[1] << 8;
            r->p += 2;
        }
    }
    return NZ_OK;
}

static int run_init(const nz_gemv_job *j, nz_gemv_run *r, nz_error *err) {
    memset(r, 0, sizeof *r);
    if (j->lanes != 32 && j->lanes != 64)
        return nz_fail(err, NZ_E_INVALID_ARG, "rANS: %d lanes (32 or 64)", j->lanes);
    size_t hdr = 4 * (size_t)j->lanes;
    if (j->len < hdr)
        return nz_fail(err, NZ_E_TRUNCATED, "rANS stream of %zu bytes is shorter than its %zu-byte header",
                       j->len, hdr);
    if ((j->len - hdr) % 2)
        return nz_fail(err, NZ_E_CORRUPT, "rANS stream length %zu is not header + whole words", j->len);
    for (int k = 0; k < j->lanes; k++) {
        r->st[k] = nz_rd32le(j->src + 4 * k);
        if (r->st[k] < RANS_L) return nz_fail(err, NZ_E_CORRUPT, "rANS initial state %d out of range", k);
    }
    r->p = j->src + hdr;
    r->end = j->src + j->len;
    r->dtab = j->dtab;
    r->sm = j->sm;
    r->x = j->x;
    r->y = j->y;
    r->cols = j->cols;
    r->n = j->cols ? j->rows * j->cols : 0;
    r->lanes = j->lanes;
    if (!j->cols)
        for (uint64_t i = 0; i < j->rows; i++) j->y[i] = 0;
    return NZ_OK;
}

/* After the vector kernels: the portable paths, then the stream checks. */
static int run_finish(nz_gemv_run *r, nz_error *err) {
    run_portable(r);
    int rc = run_checked(r, err);
    if (rc) return rc;
    if (r->p != r->end)
        return nz_fail(err, NZ_E_CORRUPT, "rANS stream has %zu unread bytes", (size_t)(r->end - r->p));
    for (int j = 0; j < r->lanes; j++)
        if (r->st[j] != RANS_L) return nz_fail(err, NZ_E_CORRUPT, "rANS final state %d is wrong", j);
    return NZ_OK;
}

/* The vector kernel to use: the rANS decoder's choice (AVX2 also needs FMA). */
static nz_rans_kernel pick(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    nz_rans_kernel k = nz_rans_active_kernel();
    if (k == NZ_RANS_AVX2 && !__builtin_cpu_supports("fma")) k = NZ_RANS_SCALAR;
    return k;
#else
    return NZ_RANS_SCALAR;
#endif
}

static void run_vector(nz_gemv_run *r, nz_rans_kernel k) {
    if (k == NZ_RANS_AVX512) nz_gemv_run_avx512(r);
    if (k == NZ_RANS_AVX2) nz_gemv_run_avx2(r);
}

int nz_gemv_rans_bf16(const uint8_t *src, size_t len, int lanes, const uint32_t *dtab, const uint8_t *sm,
                      uint64_t rows, uint64_t cols, const float *x, float *y, nz_error *err) {
    nz_gemv_job j = {src, len, lanes, dtab, sm, rows, cols, x, y};
    nz_gemv_run r;
    int rc = run_init(&j, &r, err);
    if (rc) return rc;
    run_vector(&r, pick());
    return run_finish(&r, err);
}
