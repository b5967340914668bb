/*
 * nz_nat_at.c — the AT decoder of the fairseq translator (see nz_nat.h): teacher-forced scoring (AT
 * rerank), greedy decoding and beam search over incremental KV caches, and their peak memory; the
 * continuous batch (nz_nat_cb.c) shares the pieces declared in nz_nat_int.h.
 */
#include "nz_nat_int.h"

#include "nz_alloc.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ AT score */

typedef struct score_ctx {
    const int32_t *target; /* [R] token whose log-prob is wanted, per projected row */
    double *acc;           /* [N] */
    const size_t *owner;   /* [R] hypothesis of each row */
} score_ctx;

static void score_row(void *ctx, size_t i, const float *lp) {
    score_ctx *s = ctx;
    s->acc[s->owner[i]] += lp[s->target[i]];
}

int nz_nat_at_score(nz_matmul_ctx *mc, const nz_nat *n, const nz_nat_enc *enc, const int32_t *const *hyp,
                    const size_t *len, const uint32_t *sent, size_t N, float *scores, nz_error *err) {
    int rc = NZ_OK;
    const size_t D = n->c.d_model;
    nz_kv *cross = NULL;
    int32_t *in = NULL, *target = NULL;
    size_t *rows = NULL, *owner = NULL;
    double *acc = NULL;
    float *h = NULL;
    if (!n->c.at_layers) return nz_fail(err, NZ_E_UNSUPPORTED, "the model has no AT decoder");
    if (!N) return NZ_OK;
    size_t W = 1, R = 0;
    for (size_t i = 0; i < N; i++) {
        if (len[i] < 2)
            return nz_fail(err, NZ_E_INVALID_ARG, "AT score: hypothesis %zu has %zu tokens (< 2)", i, len[i]);
        if (sent[i] >= enc->B)
            return nz_fail(err, NZ_E_RANGE, "AT score: encoder row %u of %zu", sent[i], enc->B);
        for (size_t t = 0; t < len[i]; t++)
            if (hyp[i][t] < 0 || (size_t)hyp[i][t] >= n->c.vocab)
                return nz_fail(err, NZ_E_RANGE, "AT score: token id %d outside the vocabulary",
                               (int)hyp[i][t]);
        if (len[i] - 1 > W) W = len[i] - 1;
        R += len[i] - 1;
    }
    /* inputs [eos, y..] (fairseq rerank: [bos, y.., eos] with bos -> eos, minus the last), targets [y.., eos]
     */
    in = nz_malloc(N * W * sizeof *in, NZ_MEM_ACTIVATIONS);
    target = nz_malloc(R * sizeof *target, NZ_MEM_ACTIVATIONS);
    rows = nz_malloc(R * sizeof *rows, NZ_MEM_ACTIVATIONS);
    owner = nz_malloc(R * sizeof *owner, NZ_MEM_ACTIVATIONS);
    acc = nz_calloc(N, sizeof *acc, NZ_MEM_ACTIVATIONS);
    h = nz_malloc(N * W * D * sizeof *h, NZ_MEM_ACTIVATIONS);
    if (!in || !target || !rows || !owner || !acc || !h) NZ_FAIL(NZ_E_NOMEM, "out of memory for AT scoring");
    size_t r = 0;
    for (size_t i = 0; i < N; i++) {
        for (size_t t = 0; t < W; t++) in[i * W + t] = NZ_NAT_PAD;
        in[i * W] = NZ_NAT_EOS;
        for (size_t t = 1; t + 1 < len[i]; t++) in[i * W + t] = hyp[i][t];
        for (size_t t = 0; t + 1 < len[i]; t++, r++) {
            rows[r] = i * W + t;
            target[r] = hyp[i][t + 1];
            owner[r] = i;
        }
    }
    NZ_TRY(nat_cross_kvs(mc, n, &n->at, enc, &cross, err));
    NZ_TRY(nat_decoder_fwd(mc, n, 0, in, N, W, cross, sent, h, err));
    score_ctx sc = {target, acc, owner};
    NZ_TRY(nat_project_rows(mc, n, h, rows, R, score_row, &sc, err));
    for (size_t i = 0; i < N; i++) scores[i] = (float)(acc[i] / (double)(len[i] - 1));
done:
    nat_kvs_free(cross, n->at.nlayers);
    nz_free(in);
    nz_free(target);
    nz_free(rows);
    nz_free(owner);
    nz_free(acc);
    nz_free(h);
    return rc;
}

/* nz_nat_at_score's peak for N hypotheses (inputs at most W wide), R scored rows, over an encoder of B x S:
 * in (N W int32), target (R int32), rows and owner (R size_t each), acc (N double), h (N W D floats), then
 * the AT decoder's cross caches (while built; or held, with the forward pass or the projection). */
double nat_at_score_peak(const nz_nat *n, double N, double W, double R, double B, double S) {
    const double D = (double)n->c.d_model;
    const double bufs = 4 * N * W + 4 * R + 8 * R + 8 * R + 8 * N + 4 * N * W * D;
    double build, held = nat_cross_kvs_bytes(n, &n->at, B, S, &build);
    return bufs +
           nat_dmax(build, held + nat_dmax(nat_decoder_fwd_peak(n, 0, N, W, B, S), nat_project_peak(n, R)));
}

/* ------------------------------------------------------------------ AT greedy */

/* Checks shared by the AT searches; *max_len = min(int(a * S + b),
 * max_target_positions - 1) (fairseq SequenceGenerator). */
int nat_at_setup(const nz_nat *n, const nz_nat_at_opts *o, size_t S, size_t *max_len, nz_error *err) {
    if (!n->c.at_layers)
        return nz_fail(err, NZ_E_UNSUPPORTED,
                       "AT decoding needs an AT decoder (config.json has no at_decoder_layers)");
    if (n->c.at_prepend_bos)
        return nz_fail(
            err, NZ_E_UNSUPPORTED,
            "AT decoding: at_prepend_bos (multi-task-nat's [eos, bos, y..] AT input) is not supported");
    double ml = o->max_len_a * (double)S + (double)o->max_len_b;
    if (!(ml >= 0) || ml > 1e9 || o->min_len < 0)
        return nz_fail(err, NZ_E_INVALID_ARG, "AT decoding: max_len %g or min_len %d out of range", ml,
                       o->min_len);
    *max_len = (size_t)ml; /* int(): truncation */
    if (*max_len > n->c.max_target_positions - 1) *max_len = n->c.max_target_positions - 1;
    return NZ_OK;
}

typedef struct greedy_ctx {
    size_t V;
    size_t step, max_len, min_len;
    const size_t *owner; /* [R] sentence of each projected row */
    int32_t *next;       /* [B] chosen token */
    double *lpsum;       /* [B] sum of the chosen tokens' log-probs */
    float *tmp;          /* [V] */
} greedy_ctx;

int32_t nat_greedy_pick(const float *lp, size_t V, size_t step, size_t max_len, size_t min_len, float *tmp) {
    memcpy(tmp, lp, V * sizeof *lp);
    tmp[NZ_NAT_PAD] = -INFINITY;
    if (step >= max_len)
        for (size_t v = 0; v < V; v++)
            if (v != NZ_NAT_EOS) tmp[v] = -INFINITY;
    if (step < min_len) tmp[NZ_NAT_EOS] = -INFINITY;
    return (int32_t)nz_argmax(tmp, V);
}

static void greedy_row(void *ctx, size_t i, const float *lp) {
    greedy_ctx *g = ctx;
    const int32_t k = nat_greedy_pick(lp, g->V, g->step, g->max_len, g->min_len, g->tmp);
    g->next[g->owner[i]] = k;
    g->lpsum[g->owner[i]] += lp[k];
}

int nz_nat_at_greedy(nz_matmul_ctx *mc, const nz_nat *n, const int32_t *src, size_t B, size_t S,
                     const nz_nat_at_opts *o, nz_nat_hyp *hyps, nz_error *err) {
    int rc = NZ_OK;
    nz_nat_at_opts def;
    if (!o) {
        nz_nat_at_opts_default(&def);
        o = &def;
    }
    const size_t D = n->c.d_model, V = n->c.vocab;
    int32_t *vsrc = NULL, *cur = NULL, *obuf = NULL, *next = NULL;
    size_t *vidx = NULL, *on = NULL, *rows = NULL;
    uint8_t *pad = NULL, *fin = NULL;
    double *lpsum = NULL;
    float *x = NULL, *tmp = NULL;
    nz_kv *cross = NULL, *self = NULL;
    nz_nat_enc enc;
    memset(&enc, 0, sizeof enc);
    size_t nv = 0;
    NZ_TRY(nat_prepare(n, src, B, S, hyps, &vsrc, &vidx, &nv, err));
    size_t max_len = 0;
    NZ_TRY(nat_at_setup(n, o, S, &max_len, err));
    if (!nv) goto done;

    NZ_TRY(nz_nat_encode(mc, n, vsrc, nv, S, &enc, err));
    NZ_TRY(nat_cross_kvs(mc, n, &n->at, &enc, &cross, err));
    const size_t cap = max_len + 1, nl = n->at.nlayers;
    self = nz_calloc(nl, sizeof *self, NZ_MEM_KV);
    if (!self) NZ_FAIL(NZ_E_NOMEM, "out of memory for the AT caches");
    for (size_t l = 0; l < nl; l++) NZ_TRY(nz_kv_init(&self[l], nv, cap, D, err));
    cur = nz_malloc(nv * sizeof *cur, NZ_MEM_ACTIVATIONS);
    next = nz_malloc(nv * sizeof *next, NZ_MEM_ACTIVATIONS);
    obuf = nz_malloc(nv * cap * sizeof *obuf, NZ_MEM_ACTIVATIONS);
    on = nz_calloc(nv, sizeof *on, NZ_MEM_ACTIVATIONS);
    rows = nz_malloc(nv * sizeof *rows, NZ_MEM_ACTIVATIONS);
    pad = nz_malloc(nv, NZ_MEM_ACTIVATIONS);
    fin = nz_calloc(nv, 1, NZ_MEM_ACTIVATIONS);
    lpsum = nz_calloc(nv, sizeof *lpsum, NZ_MEM_ACTIVATIONS);
    x = nz_malloc(nv * D * sizeof *x, NZ_MEM_ACTIVATIONS);
    tmp = nz_malloc(V * sizeof *tmp, NZ_MEM_ACTIVATIONS);
    if (!cur || !next || !obuf || !on || !rows || !pad || !fin || !lpsum || !x || !tmp)
        NZ_FAIL(NZ_E_NOMEM, "out of memory for AT decoding");
    for (size_t b = 0; b < nv; b++) cur[b] = NZ_NAT_EOS;
    size_t ndone = 0;
    for (size_t step = 0; step <= max_len && ndone < nv; step++) {
        if (o->stop && o->stop(o->stop_arg))
            NZ_FAIL(NZ_E_CANCELLED, "AT greedy: cancelled before step %zu", step);
        for (size_t b = 0; b < nv; b++) pad[b] = cur[b] == NZ_NAT_PAD;
        NZ_TRY(nat_stack_embed(mc, n, &n->at, cur, nv, 1, (int64_t)step, NULL, 1, x, err));
        nz_block_io io;
        memset(&io, 0, sizeof io);
        io.B = nv;
        io.T = 1;
        io.self_pad = pad;
        io.causal = 1;
        NZ_TRY(nat_stack_layers(mc, &n->at, x, &io, self, cross, err));
        size_t R = 0;
        for (size_t b = 0; b < nv; b++)
            if (!fin[b]) rows[R++] = b;
        greedy_ctx g = {V, step, max_len, (size_t)o->min_len, rows, next, lpsum, tmp};
        NZ_TRY(nat_project_rows(mc, n, x, rows, R, greedy_row, &g, err));
        for (size_t b = 0; b < nv; b++) {
            if (fin[b]) {
                cur[b] = NZ_NAT_PAD;
                continue;
            }
            cur[b] = next[b];
            obuf[b * cap + on[b]++] = next[b];
            if (next[b] == NZ_NAT_EOS) {
                fin[b] = 1;
                ndone++;
            }
        }
    }
    for (size_t b = 0; b < nv; b++) {
        nz_nat_hyp *hy = &hyps[vidx[b]];
        if (!fin[b]) {
            hy->rc =
                nz_fail(&hy->err, NZ_E_RANGE, "no eos within max_len %zu (min_len %d)", max_len, o->min_len);
            continue;
        }
        NZ_TRY(nat_set_tokens(hy, obuf + b * cap, on[b], err));
        hy->score = (float)(lpsum[b] / (double)on[b]);
        hy->nat_score = NAN;
        hy->steps = (int)on[b];
    }
done:
    if (rc) nat_fail_all(hyps, B, err);
    nat_kvs_free(cross, n->at.nlayers);
    nat_kvs_free(self, n->at.nlayers);
    nz_nat_enc_free(&enc);
    nz_free(vsrc);
    nz_free(vidx);
    nz_free(cur);
    nz_free(next);
    nz_free(obuf);
    nz_free(on);
    nz_free(rows);
    nz_free(pad);
    nz_free(fin);
    nz_free(lpsum);
    nz_free(x);
    nz_free(tmp);
    return rc;
}

/* The AT searches' common part: the encoder, then (held through the search) its output and the AT
 * decoder's cross caches over B x S. *held receives those; @return the peak until the search starts. */
static double at_front(const nz_nat *n, double B, double S, double *held) {
    double build, cross = nat_cross_kvs_bytes(n, &n->at, B, S, &build);
    const double enc = nat_enc_bytes(B, S, (double)n->c.d_model);
    *held = enc + cross;
    return nat_dmax(nat_encode_peak(n, B, S), enc + build);
}

/* One AT step of R rows (T = 1) with self-attention caches of cap positions: the larger of the
 * embedding, a layer (cached self attention, cross attention over B x S) and the projection. */
double nat_at_step_peak(const nz_nat *n, double R, double cap, double B, double S) {
    const double D = (double)n->c.d_model;
    const double layer = nat_block_peak(R, 1, D, (double)n->c.dec_ffn, 1, cap, 1, B, S);
    return nat_dmax(nat_dmax(nat_embed_peak(&n->at, R, D), layer), nat_project_peak(n, R));
}

/* The self-attention caches of R rows x cap positions: the nz_kv array and per AT layer k, v (R cap D
 * floats each) and pad (R cap bytes). */
static double at_self_bytes(const nz_nat *n, double R, double cap) {
    const double nl = (double)n->at.nlayers, D = (double)n->c.d_model;
    return nl * sizeof(nz_kv) + nl * (8 * R * cap * D + R * cap);
}

/* What both AT estimates start from for B sources of S ids with o (NULL: the defaults): *prep, nat_prepare's
 * vsrc and vidx, and *max_len. @return 0, or 1 when nothing decodes (the estimate is then *prep). */
static int at_peak_setup(const nz_nat *n, size_t B, size_t S, const nz_nat_at_opts *o, double *prep,
                         size_t *max_len) {
    nz_nat_at_opts def;
    if (!o) {
        nz_nat_at_opts_default(&def);
        o = &def;
    }
    *prep = nat_prepare_bytes((double)B, (double)S);
    *max_len = 0;
    nz_error e;
    return nat_at_setup(n, o, S, max_len, &e) || !B || !S;
}

uint64_t nz_nat_at_greedy_peak_bytes(const nz_nat *n, size_t B, size_t S, const nz_nat_at_opts *o) {
    const double dB = (double)B, dS = (double)S, D = (double)n->c.d_model, V = (double)n->c.vocab;
    double prep;
    size_t max_len;
    if (at_peak_setup(n, B, S, o, &prep, &max_len)) return nz_mem_bytes(prep);
    const double cap = (double)max_len + 1;
    double held, front = at_front(n, dB, dS, &held);
    const double bufs = 4 * dB + 4 * dB       /* cur, next */
                        + 4 * dB * cap        /* obuf */
                        + 8 * dB + 8 * dB     /* on, rows */
                        + dB + dB + 8 * dB    /* pad, fin, lpsum */
                        + 4 * dB * D + 4 * V; /* x, tmp */
    /* nat_set_tokens: the results (NZ_MEM_OTHER), <= max_len + 1 tokens each */
    const double hyps = dB * (4 * cap + 1);
    const double search =
        held + at_self_bytes(n, dB, cap) + bufs + nat_dmax(nat_at_step_peak(n, dB, cap, dB, dS), hyps);
    return nz_mem_bytes(prep + nat_dmax(front, search));
}

/* ------------------------------------------------------------------ AT beam search */

typedef struct beam_ctx {
    size_t V, step, max_len, min_len, kk;
    const size_t *rows; /* [R] decoder row of each projected row */
    const float *cum;   /* [N] cumulative score of each row */
    float *tmp;         /* [V] */
    uint32_t *ctok;     /* [N x kk] each row's best candidates: token */
    float *cval;        /* [N x kk] and cumulative score */
} beam_ctx;

int nat_beam_setup(const nz_nat *n, int beam, float lenpen, size_t *K, size_t *kk, nz_error *err) {
    if (beam < 1 || beam > 4096 || !isfinite(lenpen))
        return nz_fail(err, NZ_E_INVALID_ARG,
                       "AT beam search: beam %d (1..4096) or length penalty %g out of range", beam,
                       (double)lenpen);
    /* fairseq: beam_size = min(beam, vocab - 1); 2 * beam candidates a step */
    const size_t V = n->c.vocab;
    *K = (size_t)beam < V - 1 ? (size_t)beam : V - 1;
    *kk = 2 * *K < V ? 2 * *K : V;
    return NZ_OK;
}

/* fairseq SequenceGenerator's bans on lprobs, plus the row's cumulative score
 * (BeamSearch.step, t > 0), then the row's kk best (row-local topk: the
 * sentence's best 2 * beam are among its rows' best 2 * beam each) */
void nat_beam_row(const float *lp, size_t V, size_t step, size_t max_len, size_t min_len, float cum,
                  size_t kk, float *tmp, uint32_t *ctok, float *cval) {
    memcpy(tmp, lp, V * sizeof *lp);
    tmp[NZ_NAT_PAD] = -INFINITY;
    if (step >= max_len)
        for (size_t v = 0; v < V; v++)
            if (v != NZ_NAT_EOS) tmp[v] = -INFINITY;
    if (step < min_len) tmp[NZ_NAT_EOS] = -INFINITY;
    if (step)
        for (size_t v = 0; v < V; v++) tmp[v] += cum;
    nz_topk(tmp, V, kk, ctok, cval);
}

static void beam_row(void *ctx, size_t i, const float *lp) {
    beam_ctx *b = ctx;
    const size_t r = b->rows[i];
    nat_beam_row(lp, b->V, b->step, b->max_len, b->min_len, b->cum[r], b->kk, b->tmp, b->ctok + r * b->kk,
                 b->cval + r * b->kk);
}

/* nz_topk's order: descending scores, ties to the lower flat index, NaN last */
static int cand_cmp(const void *pa, const void *pb) {
    const nat_beam_cand *a = pa, *b = pb;
    int na = isnan(a->s), nb = isnan(b->s);
    if (na != nb) return na - nb;
    if (!na && a->s > b->s) return -1;
    if (!na && a->s < b->s) return 1;
    return (a->flat > b->flat) - (a->flat < b->flat);
}

/* The first K candidates of b's sentence at step (pool[k], sorted; em[k] the finalizable eos) are
 * finalized while it has fewer than K. @return whether one was finalizable. */
static int beam_finalize(const nat_beam *b, size_t step, const nat_beam_cand *pool, const uint8_t *em,
                         size_t k) {
    const size_t K = b->K, V = b->V, cap = b->cap;
    const float norm = (float)pow((double)(step + 1), (double)b->lenpen);
    int seen = 0;
    for (size_t c = 0; c < K && c < k; c++) {
        if (!em[c]) continue;
        seen = 1;
        if (*b->fcnt == K) continue;
        const size_t parent = pool[c].flat / V, f = (*b->fcnt)++;
        memcpy(b->ftok + f * cap, b->hist + parent * cap, step * sizeof *b->ftok);
        b->ftok[f * cap + step] = NZ_NAT_EOS;
        b->fn[f] = step + 1;
        b->fsc[f] = pool[c].s / norm;
    }
    return seen;
}

int nat_beam_select(const nat_beam *b, size_t step, int32_t *hist2, int32_t *cur, float *cum2,
                    uint32_t *order) {
    const size_t K = b->K, V = b->V, cap = b->cap, kk = b->kk;
    /* step 0: only row 0 (fairseq's lprobs[:, ::beam_size]) */
    const size_t nr = step ? K : 1, cand = 2 * K;
    nat_beam_cand *pool = b->pool;
    uint8_t *em = b->em;
    size_t np = 0;
    for (size_t j = 0; j < nr; j++)
        for (size_t q = 0; q < kk; q++)
            pool[np++] = (nat_beam_cand){b->cval[j * kk + q], (uint32_t)(j * V + b->ctok[j * kk + q])};
    qsort(pool, np, sizeof *pool, cand_cmp);
    size_t k = nr * V - 1 < cand ? nr * V - 1 : cand;
    if (k > np) k = np;
    /* eos candidates with a finite score among the first K, not ignored, are finalized */
    for (size_t c = 0; c < k; c++) {
        em[c] = pool[c].flat % V == NZ_NAT_EOS && pool[c].s != -INFINITY;
        if (c < K && b->ignore[c]) em[c] = 0;
    }
    const int seen = beam_finalize(b, step, pool, em, k);
    if (seen && (*b->fcnt == K || step == b->max_len)) return 1; /* sentence finished */
    /* go on with the first K candidates, finalizable eos and ignored positions last */
    for (size_t c = 0; c < K && c < k; c++) em[c] |= b->ignore[c];
    size_t j = 0;
    for (int back = 0; back < 2; back++)
        for (size_t c = 0; c < k && j < K; c++) {
            if (em[c] != back) continue;
            const size_t parent = pool[c].flat / V;
            const int32_t t = (int32_t)(pool[c].flat % V);
            order[j] = (uint32_t)parent;
            memcpy(hist2 + j * cap, b->hist + parent * cap, step * sizeof *hist2);
            hist2[j * cap + step] = t;
            cur[j] = t;
            cum2[j] = pool[c].s;
            b->ignore[j] = (uint8_t)back;
            j++;
        }
    return 0;
}

int nat_beam_result(nz_nat_hyp *hy, const nat_beam *b, int min_len, nz_error *err) {
    const size_t fcnt = *b->fcnt;
    if (!fcnt) {
        hy->rc = nz_fail(&hy->err, NZ_E_RANGE, "no hypothesis ended with eos within max_len %zu (min_len %d)",
                         b->max_len, min_len);
        return NZ_OK;
    }
    /* best normalized score, the first finalized on ties (a stable sort) */
    size_t best = 0;
    for (size_t f = 1; f < fcnt; f++)
        if (b->fsc[f] > b->fsc[best]) best = f;
    int rc = nat_set_tokens(hy, b->ftok + best * b->cap, b->fn[best], err);
    if (rc) return rc;
    hy->score = b->fsc[best];
    hy->nat_score = NAN;
    hy->steps = (int)b->fn[best];
    return NZ_OK;
}

int nz_nat_at_beam(nz_matmul_ctx *mc, const nz_nat *n, const int32_t *src, size_t B, size_t S,
                   const nz_nat_at_opts *o, int beam, float lenpen, nz_nat_hyp *hyps, nz_error *err) {
    int rc = NZ_OK;
    nz_nat_at_opts def;
    if (!o) {
        nz_nat_at_opts_default(&def);
        o = &def;
    }
    const size_t D = n->c.d_model, V = n->c.vocab;
    int32_t *vsrc = NULL, *cur = NULL, *hist = NULL, *hist2 = NULL, *ftok = NULL;
    size_t *vidx = NULL, *rows = NULL, *asent = NULL, *fn = NULL, *fcnt = NULL;
    uint32_t *kvmap = NULL, *ctok = NULL, *order = NULL;
    uint8_t *ignore = NULL, *em = NULL;
    float *cum = NULL, *cum2 = NULL, *cval = NULL, *fsc = NULL, *x = NULL, *tmp = NULL;
    nat_beam_cand *pool = NULL;
    nz_kv *cross = NULL, *self = NULL;
    nz_nat_enc enc;
    memset(&enc, 0, sizeof enc);
    size_t nv = 0;
    NZ_TRY(nat_prepare(n, src, B, S, hyps, &vsrc, &vidx, &nv, err));
    size_t max_len = 0;
    NZ_TRY(nat_at_setup(n, o, S, &max_len, err));
    size_t K = 0, kk = 0;
    NZ_TRY(nat_beam_setup(n, beam, lenpen, &K, &kk, err));
    if (!nv) goto done;

    const size_t N = nv * K, cap = max_len + 1, cand = 2 * K, nl = n->at.nlayers;
    NZ_TRY(nz_nat_encode(mc, n, vsrc, nv, S, &enc, err));
    NZ_TRY(nat_cross_kvs(mc, n, &n->at, &enc, &cross, err));
    self = nz_calloc(nl, sizeof *self, NZ_MEM_KV);
    if (!self) NZ_FAIL(NZ_E_NOMEM, "out of memory for the AT caches");
    for (size_t l = 0; l < nl; l++) NZ_TRY(nz_kv_init(&self[l], N, cap, D, err));
    cur = nz_malloc(N * sizeof *cur, NZ_MEM_ACTIVATIONS);
    hist = nz_malloc(N * cap * sizeof *hist, NZ_MEM_ACTIVATIONS);
    hist2 = nz_malloc(N * cap * sizeof *hist2, NZ_MEM_ACTIVATIONS);
    ftok = nz_malloc(N * cap * sizeof *ftok, NZ_MEM_ACTIVATIONS);
    rows = nz_malloc(N * sizeof *rows, NZ_MEM_ACTIVATIONS);
    asent = nz_malloc(nv * sizeof *asent, NZ_MEM_ACTIVATIONS);
    fn = nz_calloc(N, sizeof *fn, NZ_MEM_ACTIVATIONS);
    fcnt = nz_calloc(nv, sizeof *fcnt, NZ_MEM_ACTIVATIONS);
    kvmap = nz_malloc(N * sizeof *kvmap, NZ_MEM_ACTIVATIONS);
    order = nz_malloc(N * sizeof *order, NZ_MEM_ACTIVATIONS);
    ctok = nz_malloc(N * kk * sizeof *ctok, NZ_MEM_ACTIVATIONS);
    cval = nz_malloc(N * kk * sizeof *cval, NZ_MEM_ACTIVATIONS);
    ignore = nz_calloc(N, 1, NZ_MEM_ACTIVATIONS);
    em = nz_malloc(cand, NZ_MEM_ACTIVATIONS);
    cum = nz_calloc(N, sizeof *cum, NZ_MEM_ACTIVATIONS);
    cum2 = nz_malloc(N * sizeof *cum2, NZ_MEM_ACTIVATIONS);
    fsc = nz_malloc(N * sizeof *fsc, NZ_MEM_ACTIVATIONS);
    x = nz_malloc(N * D * sizeof *x, NZ_MEM_ACTIVATIONS);
    tmp = nz_malloc(V * sizeof *tmp, NZ_MEM_ACTIVATIONS);
    pool = nz_malloc(K * kk * sizeof *pool, NZ_MEM_ACTIVATIONS);
    if (!cur || !hist || !hist2 || !ftok || !rows || !asent || !fn || !fcnt || !kvmap || !order || !ctok ||
        !cval || !ignore || !em || !cum || !cum2 || !fsc || !x || !tmp || !pool)
        NZ_FAIL(NZ_E_NOMEM, "out of memory for AT beam search (%zu rows of up to %zu tokens)", N, cap);
    /* rows a * K .. a * K + K - 1 belong to active sentence asent[a]; all start from [eos] */
    size_t A = nv;
    for (size_t a = 0; a < nv; a++) asent[a] = a;
    for (size_t r = 0; r < N; r++) {
        cur[r] = NZ_NAT_EOS;
        kvmap[r] = (uint32_t)(r / K);
    }
    for (size_t step = 0; step <= max_len && A; step++) {
        if (o->stop && o->stop(o->stop_arg))
            NZ_FAIL(NZ_E_CANCELLED, "AT beam: cancelled before step %zu", step);
        const size_t R = A * K;
        NZ_TRY(nat_stack_embed(mc, n, &n->at, cur, R, 1, (int64_t)step, NULL, 1, x, err));
        nz_block_io io;
        memset(&io, 0, sizeof io);
        io.B = R;
        io.T = 1;
        io.causal = 1;
        io.kv_map = kvmap;
        NZ_TRY(nat_stack_layers(mc, &n->at, x, &io, self, cross, err));
        /* step 0: only row 0 of each sentence (fairseq's lprobs[:, ::beam_size]) */
        const size_t nr = step ? K : 1;
        size_t P = 0;
        for (size_t a = 0; a < A; a++)
            for (size_t j = 0; j < nr; j++) rows[P++] = a * K + j;
        beam_ctx bc = {V, step, max_len, (size_t)o->min_len, kk, rows, cum, tmp, ctok, cval};
        NZ_TRY(nat_project_rows(mc, n, x, rows, P, beam_row, &bc, err));
        size_t A2 = 0;
        for (size_t a = 0; a < A; a++) {
            const size_t s = asent[a], r2 = A2 * K;
            const nat_beam bm = {.K = K,
                                 .kk = kk,
                                 .V = V,
                                 .cap = cap,
                                 .max_len = max_len,
                                 .lenpen = lenpen,
                                 .ctok = ctok + a * K * kk,
                                 .cval = cval + a * K * kk,
                                 .hist = hist + a * K * cap,
                                 .ignore = ignore + s * K,
                                 .ftok = ftok + s * K * cap,
                                 .fn = fn + s * K,
                                 .fsc = fsc + s * K,
                                 .fcnt = &fcnt[s],
                                 .pool = pool,
                                 .em = em};
            if (nat_beam_select(&bm, step, hist2 + r2 * cap, cur + r2, cum2 + r2, order + r2)) continue;
            for (size_t j = 0; j < K; j++) order[r2 + j] += (uint32_t)(a * K); /* the sentence's rows */
            asent[A2++] = s;                                                   /* A2 <= a: in place */
        }
        if (step == max_len || !A2) break;
        /* beam reorder of the self-attention caches, finished sentences' rows
         * dropped: the A2 * K surviving rows take their parents' rows */
        for (size_t l = 0; l < nl; l++) NZ_TRY(nz_kv_select(&self[l], order, A2 * K, err));
        for (size_t r = 0; r < A2 * K; r++) kvmap[r] = (uint32_t)asent[r / K];
        int32_t *th = hist;
        hist = hist2;
        hist2 = th;
        float *tc = cum;
        cum = cum2;
        cum2 = tc;
        A = A2;
    }
    for (size_t s = 0; s < nv; s++) {
        const nat_beam bm = {.K = K,
                             .V = V,
                             .cap = cap,
                             .max_len = max_len,
                             .ftok = ftok + s * K * cap,
                             .fn = fn + s * K,
                             .fsc = fsc + s * K,
                             .fcnt = &fcnt[s]};
        NZ_TRY(nat_beam_result(&hyps[vidx[s]], &bm, o->min_len, err));
    }
done:
    if (rc) nat_fail_all(hyps, B, err);
    nat_kvs_free(cross, n->at.nlayers);
    nat_kvs_free(self, n->at.nlayers);
    nz_nat_enc_free(&enc);
    nz_free(vsrc);
    nz_free(vidx);
    nz_free(cur);
    nz_free(hist);
    nz_free(hist2);
    nz_free(ftok);
    nz_free(rows);
    nz_free(asent);
    nz_free(fn);
    nz_free(fcnt);
    nz_free(kvmap);
    nz_free(order);
    nz_free(ctok);
    nz_free(cval);
    nz_free(ignore);
    nz_free(em);
    nz_free(cum);
    nz_free(cum2);
    nz_free(fsc);
    nz_free(x);
    nz_free(tmp);
    nz_free(pool);
    return rc;
}

uint64_t nz_nat_at_beam_peak_bytes(const nz_nat *n, size_t B, size_t S, const nz_nat_at_opts *o, int beam) {
    const double dB = (double)B, dS = (double)S, D = (double)n->c.d_model, V = (double)n->c.vocab;
    double prep;
    size_t max_len;
    if (at_peak_setup(n, B, S, o, &prep, &max_len) || beam < 1 || beam > 4096) return nz_mem_bytes(prep);
    const size_t Kz = (size_t)beam < n->c.vocab - 1 ? (size_t)beam : n->c.vocab - 1;
    const double K = (double)Kz, N = dB * K, cap = (double)max_len + 1;
    const double kk = 2 * K < V ? 2 * K : V;
    double held, front = at_front(n, dB, dS, &held);
    const double bufs = 4 * N                             /* cur */
                        + 3 * (4 * N * cap)               /* hist, hist2, ftok */
                        + 8 * N + 8 * dB                  /* rows, asent */
                        + 8 * N + 8 * dB                  /* fn, fcnt */
                        + 4 * N + 4 * N                   /* kvmap, order */
                        + 4 * N * kk + 4 * N * kk         /* ctok, cval */
                        + N + 2 * K                       /* ignore, em */
                        + 4 * N + 4 * N + 4 * N           /* cum, cum2, fsc */
                        + 4 * N * D + 4 * V               /* x, tmp */
                        + sizeof(nat_beam_cand) * K * kk; /* pool */
    /* nz_kv_select's copies (engine/nz_layer.c, NZ_MEM_KV) when the caches are reordered after a step:
     * tmp (rows x len x D floats) and ptmp (rows x len bytes), len <= max_len */
    const double select = 4 * N * (double)max_len * D + N * (double)max_len;
    const double hyps = dB * (4 * cap + 1); /* nat_set_tokens: the results (NZ_MEM_OTHER) */
    const double step = nat_dmax(nat_at_step_peak(n, N, cap, dB, dS), select);
    const double search = held + at_self_bytes(n, N, cap) + bufs + nat_dmax(step, hyps);
    return nz_mem_bytes(prep + nat_dmax(front, search));
}
