/* Transformer layers over model weights: see nz_layer.h. */
#include "nz_layer.h"

#include "nz_alloc.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

/* ------------------------------------------------------------ parameters */

int nz_param_load(const nz_model *m, const char *name, size_t expect, float **out, size_t *n, nz_error *err) {
    *out = NULL;
    if (n) *n = 0;
    long i = nz_model_find(m, name);
    if (i < 0) return nz_fail(err, NZ_E_NOT_FOUND, "no tensor '%s' in the model", name);
    const nz_tensor *t = nz_model_tensor(m, (size_t)i);
    if (t->desc.dtype == NZ_DT_OTHER)
        return nz_fail(err, NZ_E_UNSUPPORTED, "tensor '%s' (%s) is not a float tensor", name, t->st_dtype);
    uint64_t count = t->desc.rows * t->desc.cols;
    if (expect && count != expect)
        return nz_fail(err, NZ_E_FORMAT, "tensor '%s' has %llu elements, expected %zu", name,
                       (unsigned long long)count, expect);
    float *p = nz_malloc((size_t)count * sizeof(float), NZ_MEM_WEIGHTS);
    nz_dctx *dc = nz_dctx_create();
    if (!p || !dc) {
        nz_free(p);
        nz_dctx_free(dc);
        return nz_fail(err, NZ_E_NOMEM, "out of memory loading tensor '%s'", name);
    }
    for (uint64_t tile = 0; tile < t->ntiles; tile++) {
        int rc =
            nz_model_decode_f32(m, dc, (size_t)i, tile, p + tile * t->desc.tile_rows * t->desc.cols, err);
        if (rc) {
            nz_free(p);
            nz_dctx_free(dc);
            return rc;
        }
    }
    nz_dctx_free(dc);
    *out = p;
    if (n) *n = (size_t)count;
    return NZ_OK;
}

/* ---------------------------------------------------------------- linear */

int nz_linear_bind(nz_linear *l, const nz_model *m, const char *wname, const char *bname, size_t n_in,
                   size_t n_out, nz_error *err) {
    memset(l, 0, sizeof *l);
    int rc = nz_weight_bind(&l->w, m, wname, err);
    if (rc) return rc;
    if (l->w.t->ndim != 2)
        return nz_fail(err, NZ_E_FORMAT, "tensor '%s' is %d-D, a linear weight must be 2-D", wname,
                       l->w.t->ndim);
    if (n_in && l->w.k != n_in)
        return nz_fail(err, NZ_E_FORMAT,
                       "tensor '%s' is [%llu x %llu], expected %zu input features (columns)", wname,
                       (unsigned long long)l->w.n, (unsigned long long)l->w.k, n_in);
    if (n_out && l->w.n != n_out)
        return nz_fail(err, NZ_E_FORMAT, "tensor '%s' is [%llu x %llu], expected %zu output features (rows)",
                       wname, (unsigned long long)l->w.n, (unsigned long long)l->w.k, n_out);
    l->n_in = (size_t)l->w.k;
    l->n_out = (size_t)l->w.n;
    if (bname) return nz_param_load(m, bname, l->n_out, &l->b, NULL, err);
    return NZ_OK;
}

void nz_linear_free(nz_linear *l) {
    if (!l) return;
    nz_free(l->b);
    l->b = NULL;
}

int nz_linear_fwd(nz_matmul_ctx *mc, const nz_linear *l, const float *x, size_t M, float *y, nz_error *err) {
    if (M == 0) return NZ_OK;
    int rc = nz_matmul_mt(mc, &l->w, x, M, y, err);
    if (rc) return rc;
    if (l->b) nz_add_bias(y, l->b, M, l->n_out);
    return NZ_OK;
}

/* ------------------------------------------------------------- embedding */

int nz_embed(nz_matmul_ctx *mc, const nz_weight *E, const int32_t *ids, size_t M, float scale, float *out,
             nz_error *err) {
    const uint64_t V = E->n, D = E->k, tr = E->t->desc.tile_rows;
    for (size_t i = 0; i < M; i++)
        if (ids[i] < 0 || (uint64_t)ids[i] >= V)
            return nz_fail(err, NZ_E_RANGE, "token id %d at position %zu is outside the vocabulary [0, %llu)",
                           (int)ids[i], i, (unsigned long long)V);
    /* one fetch per distinct tile: walk the ids, serve every id of the first
     * unserved id's tile, repeat (done[] marks served positions) */
    uint8_t *done = nz_calloc(M ? M : 1, 1, NZ_MEM_ACTIVATIONS);
    if (!done) return nz_fail(err, NZ_E_NOMEM, "out of memory for embedding lookup");
    int rc = NZ_OK;
    for (size_t i = 0; i < M && rc == NZ_OK; i++) {
        if (done[i]) continue;
        uint64_t tile = (uint64_t)ids[i] / tr;
        nz_cache_ref ref;
        rc = nz_matmul_ctx_tile(mc, E, tile, &ref, err);
        if (rc) break;
        for (size_t j = i; j < M; j++) {
            if (done[j] || (uint64_t)ids[j] / tr != tile) continue;
            const float *row = ref.data + ((uint64_t)ids[j] - tile * tr) * D;
            float *o = out + j * D;
            for (uint64_t d = 0; d < D; d++) o[d] = scale * row[d];
            done[j] = 1;
        }
        nz_matmul_ctx_release(mc, &ref);
    }
    nz_free(done);
    return rc;
}

/* ------------------------------------------------------------------ norm */

int nz_norm_bind(nz_norm *n, const nz_model *m, nz_norm_kind kind, const char *gname, const char *bname,
                 size_t d, float eps, nz_error *err) {
    memset(n, 0, sizeof *n);
    n->kind = kind;
    n->d = d;
    n->eps = eps;
    int rc = nz_param_load(m, gname, d, &n->g, NULL, err);
    if (!rc && bname) rc = nz_param_load(m, bname, d, &n->b, NULL, err);
    if (rc) nz_norm_free(n);
    return rc;
}

void nz_norm_free(nz_norm *n) {
    if (!n) return;
    nz_free(n->g);
    nz_free(n->b);
    n->g = n->b = NULL;
}

void nz_norm_fwd(const nz_norm *n, const float *x, size_t M, float *y) {
    if (n->kind == NZ_NORM_RMS)
        nz_rmsnorm(y, x, n->g, M, n->d, n->eps);
    else
        nz_layernorm(y, x, n->g, n->b, M, n->d, n->eps);
}

/* -------------------------------------------------------------- KV cache */

int nz_kv_init(nz_kv *kv, size_t B, size_t cap, size_t D, nz_error *err) {
    memset(kv, 0, sizeof *kv);
    if (!B || !cap || !D) return nz_fail(err, NZ_E_INVALID_ARG, "KV cache of %zu x %zu x %zu", B, cap, D);
    size_t n = B * cap * D;
    if (n / B / cap != D || n > SIZE_MAX / (2 * sizeof(float)))
        return nz_fail(err, NZ_E_NOMEM, "KV cache of %zu x %zu x %zu is too large", B, cap, D);
    kv->k = nz_malloc(n * sizeof(float), NZ_MEM_KV);
    kv->v = nz_malloc(n * sizeof(float), NZ_MEM_KV);
    kv->pad = nz_calloc(B * cap, 1, NZ_MEM_KV);
    if (!kv->k || !kv->v || !kv->pad) {
        nz_kv_free(kv);
        return nz_fail(err, NZ_E_NOMEM, "out of memory for a KV cache of %zu x %zu x %zu", B, cap, D);
    }
    kv->B = B;
    kv->cap = cap;
    kv->D = D;
    return NZ_OK;
}

void nz_kv_free(nz_kv *kv) {
    if (!kv) return;
    nz_free(kv->k);
    nz_free(kv->v);
    nz_free(kv->pad);
    memset(kv, 0, sizeof *kv);
}

void nz_kv_reset(nz_kv *kv) {
    kv->len = 0;
    if (kv->pad) memset(kv->pad, 0, kv->B * kv->cap);
}

int nz_kv_reorder(nz_kv *kv, const uint32_t *src, nz_error *err) { return nz_kv_select(kv, src, kv->B, err); }

int nz_kv_resize(nz_kv *kv, size_t B, size_t cap, nz_error *err) {
    if (kv->len > cap)
        return nz_fail(err, NZ_E_RANGE, "KV resize: %zu positions do not fit %zu", kv->len, cap);
    nz_kv n;
    int rc = nz_kv_init(&n, B, cap, kv->D, err);
    if (rc) return rc;
    const size_t keep = B < kv->B ? B : kv->B, D = kv->D;
    for (size_t b = 0; b < keep; b++) {
        memcpy(n.k + b * cap * D, kv->k + b * kv->cap * D, kv->len * D * sizeof(float));
        memcpy(n.v + b * cap * D, kv->v + b * kv->cap * D, kv->len * D * sizeof(float));
        memcpy(n.pad + b * cap, kv->pad + b * kv->cap, kv->len);
    }
    n.len = kv->len;
    nz_kv_free(kv);
    *kv = n;
    return NZ_OK;
}

int nz_kv_select(nz_kv *kv, const uint32_t *src, size_t B, nz_error *err) {
    const size_t rows = kv->len * kv->D;
    if (B > kv->B) return nz_fail(err, NZ_E_RANGE, "KV select: %zu sequences from a cache of %zu", B, kv->B);
    for (size_t b = 0; b < B; b++)
        if (src[b] >= kv->B)
            return nz_fail(err, NZ_E_RANGE, "KV select: source %u of row %zu >= %zu", src[b], b, kv->B);
    if (kv->len && B) {
        float *tmp = nz_malloc(B * rows * sizeof(float), NZ_MEM_KV);
        uint8_t *ptmp = nz_malloc(B * kv->len, NZ_MEM_KV);
        if (!tmp || !ptmp) {
            nz_free(tmp);
            nz_free(ptmp);
            return nz_fail(err, NZ_E_NOMEM, "out of memory reordering a KV cache");
        }
        float *planes[2] = {kv->k, kv->v};
        for (int p = 0; p < 2; p++) {
            for (size_t b = 0; b < B; b++)
                memcpy(tmp + b * rows, planes[p] + src[b] * kv->cap * kv->D, rows * sizeof(float));
            for (size_t b = 0; b < B; b++)
                memcpy(planes[p] + b * kv->cap * kv->D, tmp + b * rows, rows * sizeof(float));
        }
        for (size_t b = 0; b < B; b++) memcpy(ptmp + b * kv->len, kv->pad + src[b] * kv->cap, kv->len);
        for (size_t b = 0; b < B; b++) memcpy(kv->pad + b * kv->cap, ptmp + b * kv->len, kv->len);
        nz_free(tmp);
        nz_free(ptmp);
    }
    kv->B = B;
    return NZ_OK;
}

/* ------------------------------------------------------------- attention */

int nz_attn_bind(nz_attn *a, const nz_model *m, const char *prefix, const char *const names[4], int with_bias,
                 size_t d_model, size_t H, float scale, nz_error *err) {
    memset(a, 0, sizeof *a);
    if (!H) return nz_fail(err, NZ_E_INVALID_ARG, "attention '%s' with 0 heads", prefix);
    nz_linear *proj[4] = {&a->q, &a->k, &a->v, &a->o};
    int rc = NZ_OK;
    size_t inner = 0;
    for (int i = 0; i < 4 && !rc; i++) {
        char wn[512], bn[512];
        snprintf(wn, sizeof wn, "%s%s.weight", prefix, names[i]);
        snprintf(bn, sizeof bn, "%s%s.bias", prefix, names[i]);
        /* q/k/v: [inner x d_model]; o: [d_model x inner] */
        rc = nz_linear_bind(proj[i], m, wn, with_bias ? bn : NULL, i < 3 ? d_model : inner,
                            i < 3 ? inner : d_model, err);
        if (!rc && i == 0) inner = a->q.n_out;
    }
    if (!rc && inner % H)
        rc = nz_fail(err, NZ_E_FORMAT, "attention '%s': %zu projected features do not split into %zu heads",
                     prefix, inner, H);
    if (rc) {
        nz_attn_free(a);
        return rc;
    }
    a->d_model = d_model;
    a->H = H;
    a->dh = inner / H;
    a->scale = scale > 0 ? scale : 1.0f / sqrtf((float)a->dh);
    return NZ_OK;
}

void nz_attn_free(nz_attn *a) {
    if (!a) return;
    nz_linear_free(&a->q);
    nz_linear_free(&a->k);
    nz_linear_free(&a->v);
    nz_linear_free(&a->o);
}

/* attend's tasks: consecutive (batch row, head) pairs of one attention */
typedef struct {
    const nz_attn_args *a;
    size_t per_task; /* pairs per task */
} attn_job;

static void attn_task(void *ctx, uint64_t task, float *work) {
    const attn_job *j = ctx;
    nz_attention_pairs(j->a, (size_t)task * j->per_task, (size_t)(task + 1) * j->per_task, work);
}

/* Attention of projected queries q[B x T x inner] over keys/values, then
 * the output projection into out[B x T x d_model]. kp is the contiguous
 * [nkv x Tk] padding (or NULL). The (batch row, head) pairs run on mc's
 * threads in tasks of about ATTN_TASK_MACS multiply-adds (one task, on the
 * caller, for a small attention such as one decoder step of one sequence),
 * and stop between tasks when mc is cancelled: same bits however split. */
#define ATTN_TASK_MACS (1u << 18)
static int attend(nz_matmul_ctx *mc, const nz_attn *a, const float *q, size_t B, size_t T, const float *k,
                  const float *v, size_t kv_bstride, const uint32_t *kv_map, const uint8_t *kp, size_t Tk,
                  int causal, int64_t q0, const float *bias, float *out, nz_error *err) {
    const size_t inner = a->H * a->dh;
    float *ctx = nz_malloc(B * T * inner * sizeof(float), NZ_MEM_ACTIVATIONS);
    if (!ctx) return nz_fail(err, NZ_E_NOMEM, "out of memory for attention");
    nz_attn_args args = {.q = q,
                         .ldq = inner,
                         .k = k,
                         .v = v,
                         .ldkv = inner,
                         .kv_bstride = kv_bstride,
                         .kv_map = kv_map,
                         .key_pad = kp,
                         .bias = bias,
                         .B = B,
                         .Tq = T,
                         .Tk = Tk,
                         .H = a->H,
                         .dh = a->dh,
                         .causal = causal,
                         .q0 = q0,
                         .scale = a->scale,
                         .out = ctx,
                         .ldo = inner};
    const size_t pairs = B * a->H, pair_macs = 2 * T * Tk * a->dh + 1;
    attn_job job = {.a = &args, .per_task = ATTN_TASK_MACS / pair_macs + 1};
    int rc = nz_matmul_ctx_run(mc, (pairs + job.per_task - 1) / job.per_task, nz_attention_work_floats(Tk),
                               attn_task, &job, err);
    if (!rc) rc = nz_linear_fwd(mc, &a->o, ctx, B * T, out, err);
    nz_free(ctx);
    return rc;
}

/* Contiguous [B x len] copy of a cache's padding rows. */
static uint8_t *kv_pad_rows(const nz_kv *kv, size_t B) {
    uint8_t *p = nz_malloc(B * kv->len + 1, NZ_MEM_ACTIVATIONS);
    if (p)
        for (size_t b = 0; b < B; b++) memcpy(p + b * kv->len, kv->pad + b * kv->cap, kv->len);
    return p;
}

/* The projected q, k, v [B x T x inner] of B sequences: k and v appended at kv->len of cache rows rows[b]
 * (rows NULL: row b), then the queries attend over those rows' keys. */
static int attend_cached(nz_matmul_ctx *mc, const nz_attn *a, const float *q, const float *k, const float *v,
                         size_t B, size_t T, const uint8_t *key_pad, int causal, nz_kv *kv,
                         const uint32_t *rows, const float *bias, float *out, nz_error *err) {
    const size_t inner = a->H * a->dh;
    for (size_t b = 0; b < B; b++) {
        const size_t row = rows ? rows[b] : b;
        size_t dst = (row * kv->cap + kv->len) * inner;
        memcpy(kv->k + dst, k + b * T * inner, T * inner * sizeof(float));
        memcpy(kv->v + dst, v + b * T * inner, T * inner * sizeof(float));
        for (size_t t = 0; t < T; t++)
            kv->pad[row * kv->cap + kv->len + t] = key_pad ? key_pad[b * T + t] != 0 : 0;
    }
    int64_t q0 = (int64_t)kv->len;
    kv->len += T;
    uint8_t *kp = kv_pad_rows(kv, rows ? kv->B : B);
    int rc = kp ? attend(mc, a, q, B, T, kv->k, kv->v, kv->cap * inner, rows, kp, kv->len, causal, q0, bias,
                         out, err)
                : nz_fail(err, NZ_E_NOMEM, "out of memory for attention padding");
    nz_free(kp);
    return rc;
}

/* nz_attn_self and nz_attn_self_rows: rows NULL is the former. */
static int attn_self(nz_matmul_ctx *mc, const nz_attn *a, const float *x, size_t B, size_t T,
                     const uint8_t *key_pad, int causal, nz_kv *kv, const uint32_t *rows, const float *bias,
                     float *out, nz_error *err) {
    const size_t inner = a->H * a->dh, M = B * T;
    if (kv && (rows ? kv->B < B : kv->B != B || kv->D != inner))
        return nz_fail(err, NZ_E_INVALID_ARG, "KV cache is %zu x %zu, attention needs %zu x %zu", kv->B,
                       kv->D, B, inner);
    if (kv && kv->D != inner)
        return nz_fail(err, NZ_E_INVALID_ARG, "KV cache is %zu wide, attention needs %zu", kv->D, inner);
    if (kv && kv->len + T > kv->cap)
        return nz_fail(err, NZ_E_RANGE, "KV cache full: %zu + %zu positions > capacity %zu", kv->len, T,
                       kv->cap);
    for (size_t b = 0; rows && b < B; b++)
        if (rows[b] >= kv->B)
            return nz_fail(err, NZ_E_RANGE, "sequence %zu maps to KV row %u of %zu", b, rows[b], kv->B);
    float *q = nz_malloc(3 * M * inner * sizeof(float), NZ_MEM_ACTIVATIONS);
    if (!q) return nz_fail(err, NZ_E_NOMEM, "out of memory for attention projections");
    float *k = q + M * inner, *v = k + M * inner;
    int rc = nz_linear_fwd(mc, &a->q, x, M, q, err);
    if (!rc) rc = nz_linear_fwd(mc, &a->k, x, M, k, err);
    if (!rc) rc = nz_linear_fwd(mc, &a->v, x, M, v, err);
    if (!rc && !kv)
        rc = attend(mc, a, q, B, T, k, v, T * inner, NULL, key_pad, T, causal, 0, bias, out, err);
    else if (!rc)
        rc = attend_cached(mc, a, q, k, v, B, T, key_pad, causal, kv, rows, bias, out, err);
    nz_free(q);
    return rc;
}

int nz_attn_self(nz_matmul_ctx *mc, const nz_attn *a, const float *x, size_t B, size_t T,
                 const uint8_t *key_pad, int causal, nz_kv *kv, const float *bias, float *out,
                 nz_error *err) {
    return attn_self(mc, a, x, B, T, key_pad, causal, kv, NULL, bias, out, err);
}

int nz_attn_self_rows(nz_matmul_ctx *mc, const nz_attn *a, const float *x, size_t B, nz_kv *kv,
                      const uint32_t *rows, const float *bias, float *out, nz_error *err) {
    return attn_self(mc, a, x, B, 1, NULL, 1, kv, rows, bias, out, err);
}

int nz_attn_cross_kv(nz_matmul_ctx *mc, const nz_attn *a, const float *enc, size_t B, size_t S,
                     const uint8_t *enc_pad, nz_kv *kv, nz_error *err) {
    const size_t inner = a->H * a->dh, M = B * S;
    if (kv->B < B || kv->cap < S || kv->D != inner)
        return nz_fail(err, NZ_E_INVALID_ARG, "KV cache %zu x %zu x %zu cannot hold %zu x %zu x %zu", kv->B,
                       kv->cap, kv->D, B, S, inner);
    float *k = nz_malloc(2 * M * inner * sizeof(float) + 1, NZ_MEM_ACTIVATIONS);
    if (!k) return nz_fail(err, NZ_E_NOMEM, "out of memory for cross-attention keys");
    float *v = k + M * inner;
    int rc = nz_linear_fwd(mc, &a->k, enc, M, k, err);
    if (!rc) rc = nz_linear_fwd(mc, &a->v, enc, M, v, err);
    if (!rc) {
        for (size_t b = 0; b < B; b++) {
            memcpy(kv->k + b * kv->cap * inner, k + b * S * inner, S * inner * sizeof(float));
            memcpy(kv->v + b * kv->cap * inner, v + b * S * inner, S * inner * sizeof(float));
            for (size_t s = 0; s < S; s++) kv->pad[b * kv->cap + s] = enc_pad ? enc_pad[b * S + s] != 0 : 0;
        }
        kv->len = S;
    }
    nz_free(k);
    return rc;
}

int nz_attn_cross(nz_matmul_ctx *mc, const nz_attn *a, const float *x, size_t B, size_t T, const nz_kv *kv,
                  const uint32_t *kv_map, const float *bias, float *out, nz_error *err) {
    const size_t inner = a->H * a->dh, M = B * T;
    if (kv->D != inner || !kv->len)
        return nz_fail(err, NZ_E_INVALID_ARG, "cross-attention cache is empty or %zu wide (need %zu)", kv->D,
                       inner);
    for (size_t b = 0; b < B; b++) {
        size_t r = kv_map ? kv_map[b] : b;
        if (r >= kv->B)
            return nz_fail(err, NZ_E_RANGE, "cross-attention row %zu maps to encoder row %zu of %zu", b, r,
                           kv->B);
    }
    float *q = nz_malloc(M * inner * sizeof(float), NZ_MEM_ACTIVATIONS);
    uint8_t *kp = kv_pad_rows(kv, kv->B);
    int rc;
    if (!q || !kp)
        rc = nz_fail(err, NZ_E_NOMEM, "out of memory for cross-attention");
    else
        rc = nz_linear_fwd(mc, &a->q, x, M, q, err);
    if (!rc)
        rc = attend(mc, a, q, B, T, kv->k, kv->v, kv->cap * inner, kv_map, kp, kv->len, 0, 0, bias, out, err);
    nz_free(q);
    nz_free(kp);
    return rc;
}

/* ------------------------------------------------------------------- FFN */

int nz_ffn_bind(nz_ffn *f, const nz_model *m, nz_act act, const char *wi_w, const char *wi_b,
                const char *wg_w, const char *wo_w, const char *wo_b, size_t d_model, nz_error *err) {
    memset(f, 0, sizeof *f);
    f->act = act;
    f->d_model = d_model;
    int rc = nz_linear_bind(&f->wi, m, wi_w, wi_b, d_model, 0, err);
    if (!rc) f->d_ff = f->wi.n_out;
    if (!rc && act == NZ_ACT_GATED_GELU) {
        if (!wg_w)
            rc = nz_fail(err, NZ_E_INVALID_ARG, "gated FFN '%s' needs a gate weight", wi_w);
        else
            rc = nz_linear_bind(&f->wg, m, wg_w, NULL, d_model, f->d_ff, err);
    }
    if (!rc) rc = nz_linear_bind(&f->wo, m, wo_w, wo_b, f->d_ff, d_model, err);
    if (rc) nz_ffn_free(f);
    return rc;
}

void nz_ffn_free(nz_ffn *f) {
    if (!f) return;
    nz_linear_free(&f->wi);
    nz_linear_free(&f->wg);
    nz_linear_free(&f->wo);
}

int nz_ffn_fwd(nz_matmul_ctx *mc, const nz_ffn *f, const float *x, size_t M, float *out, nz_error *err) {
    const int gated = f->act == NZ_ACT_GATED_GELU;
    const size_t n = M * f->d_ff;
    float *h = nz_malloc((gated ? 2 : 1) * n * sizeof(float) + 1, NZ_MEM_ACTIVATIONS);
    if (!h) return nz_fail(err, NZ_E_NOMEM, "out of memory for the FFN");
    int rc = nz_linear_fwd(mc, &f->wi, x, M, h, err);
    if (!rc) {
        switch (f->act) {
        case NZ_ACT_RELU:
            nz_relu(h, n);
            break;
        case NZ_ACT_GELU:
            nz_gelu(h, n);
            break;
        case NZ_ACT_GELU_TANH:
            nz_gelu_tanh(h, n);
            break;
        case NZ_ACT_GATED_GELU:
            rc = nz_linear_fwd(mc, &f->wg, x, M, h + n, err);
            if (!rc) {
                nz_gelu_tanh(h, n);
                nz_mul(h, h + n, n);
            }
            break;
        }
    }
    if (!rc) rc = nz_linear_fwd(mc, &f->wo, h, M, out, err);
    nz_free(h);
    return rc;
}

/* --------------------------------------------------------------- adapter */

int nz_adapter_bind(nz_adapter *ad, const nz_model *m, const char *down_w, const char *down_b,
                    const char *up_w, const char *up_b, size_t d_model, nz_error *err) {
    memset(ad, 0, sizeof *ad);
    int rc = nz_linear_bind(&ad->down, m, down_w, down_b, d_model, 0, err);
    if (!rc) rc = nz_linear_bind(&ad->up, m, up_w, up_b, ad->down.n_out, d_model, err);
    if (rc) nz_adapter_free(ad);
    return rc;
}

void nz_adapter_free(nz_adapter *ad) {
    if (!ad) return;
    nz_linear_free(&ad->down);
    nz_linear_free(&ad->up);
}

int nz_adapter_fwd(nz_matmul_ctx *mc, const nz_adapter *ad, float *x, size_t M, nz_error *err) {
    const size_t r = ad->down.n_out, d = ad->up.n_out;
    float *h = nz_malloc((M * r + M * d) * sizeof(float) + 1, NZ_MEM_ACTIVATIONS);
    if (!h) return nz_fail(err, NZ_E_NOMEM, "out of memory for the adapter");
    float *u = h + M * r;
    int rc = nz_linear_fwd(mc, &ad->down, x, M, h, err);
    if (!rc) {
        nz_relu(h, M * r);
        rc = nz_linear_fwd(mc, &ad->up, h, M, u, err);
    }
    if (!rc) nz_add(x, u, M * d);
    nz_free(h);
    return rc;
}

/* ----------------------------------------------------------------- block */

void nz_block_free(nz_block *b) {
    if (!b) return;
    nz_attn_free(&b->self);
    nz_norm_free(&b->self_norm);
    nz_attn_free(&b->cross);
    nz_norm_free(&b->cross_norm);
    nz_ffn_free(&b->ffn);
    nz_norm_free(&b->ffn_norm);
}

int nz_block_fwd(nz_matmul_ctx *mc, const nz_block *b, float *x, const nz_block_io *io, nz_error *err) {
    const size_t d = b->self.d_model, M = io->B * io->T;
    if (b->has_cross && !io->cross_kv)
        return nz_fail(err, NZ_E_INVALID_ARG, "decoder block without encoder states");
    if (io->adapters && (!io->group_B || io->B % io->group_B))
        return nz_fail(err, NZ_E_INVALID_ARG, "%zu sequences do not split into adapter groups of %zu", io->B,
                       io->group_B);
    float *h = nz_malloc(2 * M * d * sizeof(float) + 1, NZ_MEM_ACTIVATIONS);
    if (!h) return nz_fail(err, NZ_E_NOMEM, "out of memory for a transformer block");
    float *y = h + M * d; /* sub-layer output */
    int rc;

    /* self-attention */
    const float *in = x;
    if (b->pre_norm) {
        nz_norm_fwd(&b->self_norm, x, M, h);
        in = h;
    }
    if (io->self_rows)
        rc = io->T == 1 && io->self_kv
                 ? nz_attn_self_rows(mc, &b->self, in, io->B, io->self_kv, io->self_rows, io->self_bias, y,
                                     err)
                 : nz_fail(err, NZ_E_INVALID_ARG, "self_rows needs one position per sequence and a cache");
    else
        rc = nz_attn_self(mc, &b->self, in, io->B, io->T, io->self_pad, io->causal, io->self_kv,
                          io->self_bias, y, err);
    if (!rc) {
        nz_add(x, y, M * d);
        if (!b->pre_norm) nz_norm_fwd(&b->self_norm, x, M, x);
    }

    /* cross-attention */
    if (!rc && b->has_cross) {
        in = x;
        if (b->pre_norm) {
            nz_norm_fwd(&b->cross_norm, x, M, h);
            in = h;
        }
        rc = nz_attn_cross(mc, &b->cross, in, io->B, io->T, io->cross_kv, io->kv_map, io->cross_bias, y, err);
        if (!rc) {
            nz_add(x, y, M * d);
            if (!b->pre_norm) nz_norm_fwd(&b->cross_norm, x, M, x);
        }
    }

    /* feed-forward */
    if (!rc) {
        in = x;
        if (b->pre_norm) {
            nz_norm_fwd(&b->ffn_norm, x, M, h);
            in = h;
        }
        rc = nz_ffn_fwd(mc, &b->ffn, in, M, y, err);
        if (!rc) {
            nz_add(x, y, M * d);
            if (!b->pre_norm) nz_norm_fwd(&b->ffn_norm, x, M, x);
        }
    }

    if (!rc && io->adapters) {
        const size_t rows = io->group_B * io->T; /* rows per group */
        for (size_t g = 0; !rc && g * io->group_B < io->B; g++)
            if (io->adapters[g]) rc = nz_adapter_fwd(mc, io->adapters[g], x + g * rows * d, rows, err);
    } else if (!rc && b->adapter) {
        rc = nz_adapter_fwd(mc, b->adapter, x, M, err);
    }
    nz_free(h);
    return rc;
}

/* ------------------------------------------------------------ memory estimates */

/* nz_attn_self: q, k, v (3 M I floats), with a cache kv_pad_rows (B x Tk bytes + 1) and attend's ctx (M I
 * floats); attend's work is the matmul context's scratch. */
double nz_attn_self_peak(double B, double T, double I, int kv, double Tk) {
    const double M = B * T;
    return 12 * M * I + (kv ? B * Tk + 1 : 0) + 4 * M * I;
}

/* nz_attn_cross: q (M I floats), the padding copy of the whole cache (kvB x S bytes + 1) and attend's ctx
 * (M I floats). */
double nz_attn_cross_peak(double M, double I, double kvB, double S) {
    return 4 * M * I + kvB * S + 1 + 4 * M * I;
}
