/* nz_t5md_dec.c — the decoder rows of a generation: caches, steps, the output projection, greedy and
 * sampling (see nz_t5md_int.h). */
#include "nz_t5md_int.h"

#include <math.h>
#include <string.h>

/* ------------------------------------------------------------------ decoder */

void t5md_run_free(t5md_run *r) {
    for (size_t i = 0; r->cross && i < r->ncross; i++) nz_kv_free(&r->cross[i]);
    nz_free(r->cross);
    for (size_t l = 0; r->self && l < r->L; l++) nz_kv_free(&r->self[l]);
    nz_free(r->self);
    nz_free(r->src);
    nz_free(r->dj);
    nz_free(r->slot);
    nz_free(r->x);
    nz_free(r->h);
    nz_free(r->y);
    nz_free(r->bias);
    memset(r, 0, sizeof *r);
}

/* Caches and buffers for N0 rows of up to cap positions over enc. */
int t5md_run_init(nz_matmul_ctx *mc, t5md_run *r, const nz_t5md *t, const nz_t5md_enc *enc, const int *decs,
                  size_t D, size_t N0, size_t cap, nz_error *err) {
    int rc = NZ_OK;
    const size_t d = t->c.d_model, I = t->c.inner, L = t->c.dec_layers;
    memset(r, 0, sizeof *r);
    r->t = t;
    r->D = D;
    r->decs = decs;
    r->L = L;
    r->ncross = t->c.kind == NZ_T5MD_TRANSFORMER ? D * L : L;
    r->cross = nz_calloc(r->ncross, sizeof *r->cross, NZ_MEM_KV);
    r->self = nz_calloc(L, sizeof *r->self, NZ_MEM_KV);
    r->src = nz_malloc(N0 * sizeof *r->src, NZ_MEM_ACTIVATIONS);
    r->dj = nz_malloc(N0 * sizeof *r->dj, NZ_MEM_ACTIVATIONS);
    r->x = nz_malloc(N0 * d * sizeof *r->x, NZ_MEM_ACTIVATIONS);
    r->h = nz_malloc(N0 * d * sizeof *r->h, NZ_MEM_ACTIVATIONS);
    r->y = nz_malloc(N0 * d * sizeof *r->y, NZ_MEM_ACTIVATIONS);
    r->bias = nz_malloc(t->c.num_heads * (cap + 1) * sizeof *r->bias, NZ_MEM_ACTIVATIONS);
    if (!r->cross || !r->self || !r->src || !r->dj || !r->x || !r->h || !r->y || !r->bias)
        NZ_FAIL(NZ_E_NOMEM, "out of memory for %zu decoder rows", N0);
    for (size_t i = 0; i < r->ncross; i++) {
        const size_t l = i % L;
        const t5_stack *st = t->c.kind == NZ_T5MD_TRANSFORMER ? &t->dec[decs[i / L]] : &t->dec[0];
        NZ_TRY(nz_kv_init(&r->cross[i], enc->B, enc->S, I, err));
        NZ_TRY(nz_attn_cross_kv(mc, &st->blk[l].cross, enc->x, enc->B, enc->S, enc->pad, &r->cross[i], err));
    }
    for (size_t l = 0; l < L; l++) NZ_TRY(nz_kv_init(&r->self[l], N0, cap, I, err));
    r->N = N0;
done:
    return rc;
}

/* t5md_run_init for N0 rows of cap positions over B x S encoder rows, D requested decoders: the cache arrays
 * (nz_kv each), src and dj (N0 uint32 each), x, h, y (N0 d floats each), bias (H (cap + 1) floats); the
 * cross-attention caches (per (decoder,) layer k, v: B S I floats each, pad: B S bytes), *build: the peak
 * while they are built (+ nz_attn_cross_kv's projections, 2 B S I floats + 1); the self-attention caches
 * (per layer k, v: N0 cap I floats each, pad: N0 cap bytes). @return the bytes held once built. */
double t5md_run_bytes(const nz_t5md *t, double B, double S, double D, double N0, double cap, double *build) {
    const nz_t5md_config *c = &t->c;
    const double d = (double)c->d_model, I = (double)c->inner, L = (double)c->dec_layers;
    const double ncross = c->kind == NZ_T5MD_TRANSFORMER ? D * L : L;
    const double fixed = ncross * sizeof(nz_kv) + L * sizeof(nz_kv) + 4 * N0 + 4 * N0 + 3 * (4 * N0 * d) +
                         4 * (double)c->num_heads * (cap + 1);
    const double cross = ncross * (8 * B * S * I + B * S);
    *build = fixed + cross + 8 * B * S * I + 1;
    return fixed + cross + L * (8 * N0 * cap * I + N0 * cap);
}

/* nz_kv_select's copies (engine/nz_layer.c, NZ_MEM_KV) in t5md_run_select of n rows whose caches hold up to
 * cap positions: tmp (n len I floats) and ptmp (n len bytes). */
double t5md_select_peak(const nz_t5md *t, double n, double cap) {
    return 4 * n * cap * (double)t->c.inner + n * cap;
}

/* Keep rows keep[0..n) (ascending: the groups stay contiguous) of the caches and row maps. */
int t5md_run_select(t5md_run *r, const uint32_t *keep, size_t n, nz_error *err) {
    for (size_t l = 0; l < r->L; l++) {
        int rc = nz_kv_select(&r->self[l], keep, n, err);
        if (rc) return rc;
    }
    for (size_t i = 0; i < n; i++) {
        r->src[i] = r->src[keep[i]];
        r->dj[i] = r->dj[keep[i]];
    }
    r->N = n;
    return NZ_OK;
}

/* The adapters of sublayer sub of block l on the rows [s, e) of y (their groups). */
static int apply_adapters(nz_matmul_ctx *mc, const t5md_run *r, size_t l, int sub, float *y, size_t s,
                          size_t e, nz_error *err) {
    const nz_t5md *t = r->t;
    if (!t->ad) return NZ_OK;
    const size_t d = t->c.d_model, K = t->c.num_modes;
    for (size_t g = s; g < e;) {
        size_t ge = g + 1;
        while (ge < e && r->dj[ge] == r->dj[g]) ge++;
        const nz_adapter *ad = &t->ad[(l * 3 + (size_t)sub) * K + (size_t)r->decs[r->dj[g]]];
        int rc = nz_adapter_fwd(mc, ad, y + g * d, ge - g, err);
        if (rc) return rc;
        g = ge;
    }
    return NZ_OK;
}

/* Rows [s, e) through decoder body st (one token each at position pos):
 * embedding, blocks, final norm into r->x. */
static int run_unit(nz_matmul_ctx *mc, t5md_run *r, const t5_stack *st, const int32_t *tok, size_t s,
                    size_t e, size_t pos, nz_error *err) {
    const nz_t5md *t = r->t;
    const nz_t5md_config *c = &t->c;
    const size_t d = c->d_model, n = e - s, H = c->num_heads;
    float *x = r->x + s * d, *h = r->h + s * d, *y = r->y + s * d;
    const int tr = c->kind == NZ_T5MD_TRANSFORMER;
    int rc = nz_embed(mc, &st->embed, tok + s, n, 1.0f, x, err);
    if (rc) return rc;
    nz_t5_position_bias(r->bias, st->rel, H, 1, pos + 1, (int64_t)pos, 0, 0, c->num_buckets, c->max_distance);
    for (size_t l = 0; l < r->L; l++) {
        const nz_block *b = &st->blk[l];
        /* the layer's cache as this unit sees it (its length advances for the whole step in run_step) */
        nz_kv view = r->self[l];
        nz_norm_fwd(&b->self_norm, x, n, h);
        if (r->slot) {
            rc = nz_attn_self_rows(mc, &b->self, h, n, &view, r->slot + s, r->bias, y, err);
        } else { /* rows [s, e) of the cache */
            view.k += s * view.cap * view.D;
            view.v += s * view.cap * view.D;
            view.pad += s * view.cap;
            view.B = n;
            rc = nz_attn_self(mc, &b->self, h, n, 1, NULL, 1, &view, r->bias, y, err);
        }
        if (!rc) rc = apply_adapters(mc, r, l, 0, r->y, s, e, err);
        if (rc) return rc;
        nz_add(x, y, n * d);
        const nz_kv *ckv = tr ? &r->cross[r->dj[s] * r->L + l] : &r->cross[l];
        nz_norm_fwd(&b->cross_norm, x, n, h);
        rc = nz_attn_cross(mc, &b->cross, h, n, 1, ckv, r->src + s, NULL, y, err);
        if (!rc) rc = apply_adapters(mc, r, l, 1, r->y, s, e, err);
        if (rc) return rc;
        nz_add(x, y, n * d);
        nz_norm_fwd(&b->ffn_norm, x, n, h);
        rc = nz_ffn_fwd(mc, &b->ffn, h, n, y, err);
        if (!rc) rc = apply_adapters(mc, r, l, 2, r->y, s, e, err);
        if (rc) return rc;
        nz_add(x, y, n * d);
    }
    nz_norm_fwd(&st->fnorm, x, n, x);
    return NZ_OK;
}

/* One decoder step of the r->N rows with input tokens tok[N]: final hidden
 * states into r->x. Adapter variant: one pass of the shared body over every
 * row; transformer variant: each decoder's group through its own copy. */
int t5md_run_step(nz_matmul_ctx *mc, t5md_run *r, const int32_t *tok, nz_error *err) {
    const nz_t5md *t = r->t;
    const size_t pos = r->self[0].len, N = r->N;
    int rc = NZ_OK;
    if (t->c.kind == NZ_T5MD_TRANSFORMER) {
        for (size_t s = 0; s < N && !rc;) {
            size_t e = s + 1;
            while (e < N && r->dj[e] == r->dj[s]) e++;
            rc = run_unit(mc, r, &t->dec[r->decs[r->dj[s]]], tok, s, e, pos, err);
            s = e;
        }
    } else if (N) {
        rc = run_unit(mc, r, &t->dec[0], tok, 0, N, pos, err);
    }
    if (rc) return rc;
    for (size_t l = 0; l < r->L; l++) r->self[l].len = pos + 1;
    return NZ_OK;
}

/* One t5md_run_step's largest temporary: run_unit over n rows at a time (adapter variant: all the rows;
 * transformer variant: one decoder's), with g rows per adapter group (one decoder's rows), caches of up to
 * cap positions, cross attention over B x S: nz_embed's flags (n bytes), cached self attention, an
 * adapter (g r + g d floats + 1), cross attention, the FFN. r->x, h, y are t5md_run_init's. */
double t5md_step_peak(const nz_t5md *t, double n, double g, double B, double S, double cap) {
    const nz_t5md_config *c = &t->c;
    const double I = (double)c->inner, d = (double)c->d_model;
    double p = t5md_dmax(t5md_dmax(n, 1), nz_attn_self_peak(n, 1, I, 1, cap));
    p = t5md_dmax(p, nz_attn_cross_peak(n, I, B, S));
    p = t5md_dmax(p, t5md_ffn_peak(c, n));
    if (t->ad) p = t5md_dmax(p, 4 * (g * (double)c->adapter_hidden + g * d) + 1);
    return p;
}

/* Logits of rows x[0..N) (rows of d floats), PROJ_CHUNK rows per matmul:
 * fn(ctx, row, logits[V]) for each (logits may be modified). */
int t5md_project(nz_matmul_ctx *mc, const nz_t5md *t, const float *x, size_t N, t5md_row_fn fn, void *ctx,
                 nz_error *err) {
    const size_t d = t->c.d_model, V = t->c.vocab, C = N < PROJ_CHUNK ? N : PROJ_CHUNK;
    if (!N) return NZ_OK;
    float *g = nz_malloc(C * d * sizeof *g, NZ_MEM_ACTIVATIONS);
    float *lg = nz_malloc(C * V * sizeof *lg, NZ_MEM_ACTIVATIONS);
    int rc = NZ_OK;
    if (!g || !lg) rc = nz_fail(err, NZ_E_NOMEM, "out of memory for the output projection");
    for (size_t r0 = 0; r0 < N && !rc; r0 += C) {
        const size_t n = N - r0 < C ? N - r0 : C;
        memcpy(g, x + r0 * d, n * d * sizeof *g);
        if (t->head_scale != 1.0f) nz_scale(g, n * d, t->head_scale);
        rc = nz_linear_fwd(mc, &t->head, g, n, lg, err);
        if (rc) break;
        for (size_t i = 0; i < n; i++) fn(ctx, r0 + i, lg + i * V);
    }
    nz_free(g);
    nz_free(lg);
    return rc;
}

/* t5md_project's peak for N rows: g (C d floats) and lg (C V floats), C = min(N, PROJ_CHUNK). */
double t5md_project_peak(const nz_t5md *t, double N) {
    const double C = N < PROJ_CHUNK ? N : PROJ_CHUNK;
    return C > 0 ? 4 * C * (double)t->c.d_model + 4 * C * (double)t->c.vocab : 0;
}

/* ------------------------------------------------------------------ n-gram ban */

/* HF NoRepeatNGramLogitsProcessor on one row's scores lg[V] (t5md_ref.banned_ngram_tokens):
 * seq = [start] + gen[0..n_gen), cur_len = 1 + n_gen; unless cur_len + 1 < ngram, every
 * token t such that seq[cur_len - ngram + 1 .. cur_len) + [t] already occurs in seq
 * (seq[s .. s + ngram), s + ngram <= cur_len) gets -inf. ngram 0: nothing. O(ngram x cur_len). */
void t5md_ban_ngrams(float *lg, const int32_t *gen, size_t n_gen, int ngram) {
    const size_t n = (size_t)ngram, cur_len = 1 + n_gen;
    if (!n || cur_len + 1 < n) return;
    const size_t tail = cur_len + 1 - n; /* seq[tail .. cur_len): the last n - 1 tokens */
    for (size_t s = 0; s + n <= cur_len; s++) {
        size_t m = 0;
        while (m + 1 < n && t5md_seq_at(gen, s + m) == t5md_seq_at(gen, tail + m)) m++;
        if (m + 1 == n) lg[t5md_seq_at(gen, s + n - 1)] = -INFINITY;
    }
}

/* ------------------------------------------------------------------ greedy / sampling */

typedef struct ar_ctx {
    const nz_t5md_opts *o;
    size_t V;
    const size_t *orig;  /* [N] original row of each active row */
    const int32_t *otok; /* [N0 x cap] tokens so far of each original row */
    const size_t *cnt;   /* [N0] how many */
    size_t cap;          /* row stride of otok */
    nz_rng *rng;         /* [N0] */
    void *work;          /* nz_sample work */
    int32_t *next;       /* [N] chosen token */
    float *lp;           /* [N] its log-prob */
} ar_ctx;

void t5md_pick(const nz_t5md_opts *o, float *lg, size_t V, const int32_t *gen, size_t n_gen, nz_rng *rng,
               void *work, int32_t *tok, float *lp) {
    if (o->ban_unk) lg[NZ_T5MD_UNK] = -INFINITY;
    if (o->no_repeat_ngram) t5md_ban_ngrams(lg, gen, n_gen, o->no_repeat_ngram);
    size_t t;
    if (o->strategy == NZ_T5MD_SAMPLE) {
        nz_sampler sp = {o->temperature, o->top_k, o->top_p};
        t = nz_sample(lg, V, &sp, rng, work);
    } else {
        t = nz_argmax(lg, V);
    }
    nz_log_softmax(lg, 1, V);
    *tok = (int32_t)t;
    *lp = lg[t];
}

static void ar_row(void *ctx, size_t i, float *lg) {
    ar_ctx *a = ctx;
    const size_t w = a->orig[i];
    t5md_pick(a->o, lg, a->V, a->otok + w * a->cap, a->cnt[w], &a->rng[w], a->work, &a->next[i], &a->lp[i]);
}

/* Greedy or sampling over nv valid sources (valid[b]: the caller's context
 * index of encoder row b); results of context c, decoder j at res[c * D + j]. */
int t5md_autoregress(nz_matmul_ctx *mc, const nz_t5md *t, const nz_t5md_enc *enc, const size_t *valid,
                     const nz_t5md_opts *o, const int *decs, size_t D, nz_t5md_result *res, nz_error *err) {
    int rc = NZ_OK;
    const size_t Bv = enc->B, N0 = Bv * D, V = t->c.vocab, mnt = (size_t)o->max_new_tokens;
    const size_t cap = mnt ? mnt : 1;
    t5md_run r;
    memset(&r, 0, sizeof r);
    int32_t *cur = NULL, *next = NULL, *otok = NULL;
    float *olp = NULL, *lp = NULL;
    size_t *orig = NULL, *cnt = NULL;
    uint32_t *keep = NULL;
    uint8_t *fin = NULL;
    nz_rng *rng = NULL;
    void *work = NULL;
    NZ_TRY(t5md_run_init(mc, &r, t, enc, decs, D, N0, cap, err));
    cur = nz_malloc(N0 * sizeof *cur, NZ_MEM_ACTIVATIONS);
    next = nz_malloc(N0 * sizeof *next, NZ_MEM_ACTIVATIONS);
    lp = nz_malloc(N0 * sizeof *lp, NZ_MEM_ACTIVATIONS);
    otok = nz_malloc(N0 * cap * sizeof *otok, NZ_MEM_ACTIVATIONS);
    olp = nz_malloc(N0 * cap * sizeof *olp, NZ_MEM_ACTIVATIONS);
    orig = nz_malloc(N0 * sizeof *orig, NZ_MEM_ACTIVATIONS);
    cnt = nz_calloc(N0, sizeof *cnt, NZ_MEM_ACTIVATIONS);
    keep = nz_malloc(N0 * sizeof *keep, NZ_MEM_ACTIVATIONS);
    fin = nz_calloc(N0, 1, NZ_MEM_ACTIVATIONS);
    rng = nz_malloc(N0 * sizeof *rng, NZ_MEM_ACTIVATIONS);
    work = nz_malloc(nz_sample_work_bytes(V), NZ_MEM_ACTIVATIONS);
    if (!cur || !next || !lp || !otok || !olp || !orig || !cnt || !keep || !fin || !rng || !work)
        NZ_FAIL(NZ_E_NOMEM, "out of memory for %zu decoder rows of up to %zu tokens", N0, mnt);
    /* row j * Bv + b: decoder decs[j] on source b (t5md_ref._prepare's order) */
    for (size_t j = 0; j < D; j++)
        for (size_t b = 0; b < Bv; b++) {
            const size_t i = j * Bv + b;
            r.src[i] = (uint32_t)b;
            r.dj[i] = (uint32_t)j;
            orig[i] = i;
            cur[i] = NZ_T5MD_START;
            const uint64_t s = o->seeds ? o->seeds[valid[b]] : o->seed;
            nz_rng_seed(&rng[i], s ^ ((uint64_t)decs[j] * STREAM_GOLDEN));
        }
    for (size_t step = 0; step < mnt && r.N; step++) {
        if (o->stop && o->stop(o->stop_arg))
            NZ_FAIL(NZ_E_CANCELLED, "generation cancelled before step %zu", step);
        NZ_TRY(t5md_run_step(mc, &r, cur, err));
        ar_ctx a = {o, V, orig, otok, cnt, cap, rng, work, next, lp};
        NZ_TRY(t5md_project(mc, t, r.x, r.N, ar_row, &a, err));
        size_t n = 0;
        for (size_t i = 0; i < r.N; i++) {
            const size_t w = orig[i];
            otok[w * cap + cnt[w]] = next[i];
            olp[w * cap + cnt[w]] = lp[i];
            cnt[w]++;
            if (o->on_token)
                o->on_token(o->token_arg, valid[w % Bv], decs[w / Bv], cnt[w] - 1, next[i], lp[i]);
            if (next[i] == NZ_T5MD_EOS)
                fin[w] = 1;
            else
                keep[n++] = (uint32_t)i;
        }
        if (n < r.N) { /* finished rows leave the batch (keep is ascending: in place) */
            NZ_TRY(t5md_run_select(&r, keep, n, err));
            for (size_t i = 0; i < n; i++) orig[i] = orig[keep[i]];
        }
        for (size_t i = 0; i < n; i++) cur[i] = next[keep[i]];
    }
    for (size_t w = 0; w < N0; w++) {
        nz_t5md_result *re = &res[valid[w % Bv] * D + w / Bv];
        NZ_TRY(t5md_set_result(re, otok + w * cap, olp + w * cap, cnt[w], fin[w], err));
    }
done:
    t5md_run_free(&r);
    nz_free(cur);
    nz_free(next);
    nz_free(lp);
    nz_free(otok);
    nz_free(olp);
    nz_free(orig);
    nz_free(cnt);
    nz_free(keep);
    nz_free(fin);
    nz_free(rng);
    nz_free(work);
    return rc;
}

/* t5md_autoregress' peak over B encoder rows of S and D decoders: the run (while its cross caches are
 * built, or held with the caches), its buffers, and the largest of a step, the projection, a t5md_run_select
 * and the results. */
double t5md_autoregress_peak(const nz_t5md *t, double B, double S, double D, const nz_t5md_opts *o) {
    const double N0 = B * D, mnt = (double)o->max_new_tokens, cap = mnt ? mnt : 1;
    double build, held = t5md_run_bytes(t, B, S, D, N0, cap, &build);
    const double bufs = 4 * N0 * 3                                  /* cur, next, lp */
                        + 4 * N0 * cap * 2                          /* otok, olp */
                        + 8 * N0 + 8 * N0                           /* orig, cnt */
                        + 4 * N0 + N0                               /* keep, fin */
                        + sizeof(nz_rng) * N0                       /* rng */
                        + (double)nz_sample_work_bytes(t->c.vocab); /* work */
    const int tr = t->c.kind == NZ_T5MD_TRANSFORMER;
    double step = t5md_step_peak(t, tr ? B : N0, B, B, S, cap);
    step = t5md_dmax(step, t5md_dmax(t5md_project_peak(t, N0), t5md_select_peak(t, N0, cap)));
    const double results = N0 * 2 * (4 * cap + 1); /* t5md_set_result: tokens, logprobs (NZ_MEM_OTHER) */
    return t5md_dmax(build, held + bufs + t5md_dmax(step, results));
}
