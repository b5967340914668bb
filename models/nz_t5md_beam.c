/* nz_t5md_beam.c — HF beam search over the decoder rows (see nz_t5md.h, nz_t5md_generate). */
#include "nz_t5md_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ beam search */

/* A kept hypothesis of an item (HF BeamHypotheses entry). */
typedef struct bhyp {
    double score; /* sum / len^length_penalty */
    size_t slot;  /* storage slot of its tokens */
    size_t n;     /* tokens */
    int fin;      /* ended with eos */
} bhyp;

typedef struct beam_cand {
    float s;       /* cumulative score */
    uint32_t flat; /* beam x V + token */
    float lp;      /* the token's log-prob */
} beam_cand;

/* descending scores, ties to the lower flat index (a stable descending sort), NaN last */
static int cand_cmp(const void *pa, const void *pb) {
    const beam_cand *a = pa, *b = pb;
    int na = isnan(a->s), nb = isnan(b->s);
    if (na != nb) return na - nb;
    if (!na && a->s > b->s) return -1;
    if (!na && a->s < b->s) return 1;
    return (a->flat > b->flat) - (a->flat < b->flat);
}

typedef struct beam_state {
    size_t nb, cap, V, kk;
    double lenpen;
    int early;
    /* hypotheses: per item nb + 1 storage slots of cap + 1 tokens */
    bhyp *hy;          /* [items x (nb + 1)] in insertion order */
    size_t *hcnt;      /* [items] */
    double *worst;     /* [items] */
    uint8_t *slot_use; /* [items x (nb + 1)] */
    int32_t *htok;     /* [items x (nb + 1) x (cap + 1)] */
    float *hlp;
    /* per-row candidates of the current step */
    const float *bscore; /* [N] */
    uint32_t *ctok;      /* [N x kk] */
    float *cval, *clp;   /* [N x kk] */
    float *tmp;          /* [V] */
} beam_state;

/* BeamHypotheses.add: tokens tok[n] (+ eos when eos_lp is not NULL). */
static void hyp_add(beam_state *bs, size_t it, size_t hyp_len, double sum, const int32_t *tok,
                    const float *lp, size_t n, const float *eos_lp) {
    const size_t nb = bs->nb, W = bs->cap + 1;
    const double score = sum / pow((double)hyp_len, bs->lenpen);
    bhyp *h = bs->hy + it * (nb + 1);
    size_t *cnt = &bs->hcnt[it];
    if (!(*cnt < nb || score > bs->worst[it])) return;
    uint8_t *use = bs->slot_use + it * (nb + 1);
    size_t slot = 0;
    while (use[slot]) slot++; /* at most nb slots are in use */
    use[slot] = 1;
    int32_t *dt = bs->htok + (it * (nb + 1) + slot) * W;
    float *dl = bs->hlp + (it * (nb + 1) + slot) * W;
    memcpy(dt, tok, n * sizeof *tok);
    memcpy(dl, lp, n * sizeof *lp);
    if (eos_lp) {
        dt[n] = NZ_T5MD_EOS;
        dl[n] = *eos_lp;
    }
    h[*cnt] = (bhyp){score, slot, n + (eos_lp != NULL), eos_lp != NULL};
    (*cnt)++;
    if (*cnt > nb) {
        /* drop the worst (the first added on ties); worst = the next one */
        size_t w = 0;
        for (size_t i = 1; i < *cnt; i++)
            if (h[i].score < h[w].score) w = i;
        use[h[w].slot] = 0;
        memmove(h + w, h + w + 1, (*cnt - w - 1) * sizeof *h);
        (*cnt)--;
        double m = h[0].score;
        for (size_t i = 1; i < *cnt; i++)
            if (h[i].score < m) m = h[i].score;
        bs->worst[it] = m;
    } else if (score < bs->worst[it]) {
        bs->worst[it] = score;
    }
}

/* BeamHypotheses.is_done */
static int hyp_done(const beam_state *bs, size_t it, double best_sum, size_t cur_len) {
    if (bs->hcnt[it] < bs->nb) return 0;
    if (bs->early) return 1;
    return bs->worst[it] >= best_sum / pow((double)cur_len, bs->lenpen);
}

/* Index (in insertion order) of the best kept hypothesis, ties to the later added. */
static size_t hyp_best(const bhyp *h, size_t cnt, const uint8_t *taken) {
    size_t best = SIZE_MAX;
    for (size_t i = 0; i < cnt; i++) {
        if (taken && taken[i]) continue;
        if (best == SIZE_MAX || h[i].score >= h[best].score) best = i;
    }
    return best;
}

typedef struct beam_ban {
    beam_state *bs;
    int ban_unk;
    int no_repeat_ngram;
    const int32_t *seq; /* [N x cap] tokens of the live beams (the current seq array: set every step) */
    size_t ntok;        /* tokens of every live beam before this step */
} beam_ban;

/* log_softmax (fp32, whole vocabulary), unk and the beam's repeated n-grams
 * -> -inf, + the row's beam score; the row's kk best (score, token)
 * (row-local top-k: an item's best 2 * beam are among its rows' best
 * 2 * beam each) */
static void beam_row(void *ctx, size_t i, float *lg) {
    beam_ban *bb = ctx;
    beam_state *bs = bb->bs;
    const size_t V = bs->V, kk = bs->kk;
    nz_log_softmax(lg, 1, V);
    if (bb->ban_unk) lg[NZ_T5MD_UNK] = -INFINITY;
    if (bb->no_repeat_ngram) t5md_ban_ngrams(lg, bb->seq + i * bs->cap, bb->ntok, bb->no_repeat_ngram);
    float *s = bs->tmp;
    const float b = bs->bscore[i];
    for (size_t v = 0; v < V; v++) s[v] = lg[v] + b;
    uint32_t *ct = bs->ctok + i * kk;
    nz_topk(s, V, kk, ct, bs->cval + i * kk);
    for (size_t q = 0; q < kk; q++) bs->clp[i * kk + q] = lg[ct[q]];
}

/* Deliver the best hypothesis of item it to the streaming hook. */
static void beam_emit(const beam_state *bs, const nz_t5md_opts *o, size_t it, size_t context, int k) {
    if (!o->on_token) return;
    const size_t nb = bs->nb, W = bs->cap + 1;
    const bhyp *h = bs->hy + it * (nb + 1);
    const size_t b = hyp_best(h, bs->hcnt[it], NULL);
    if (b == SIZE_MAX) return;
    const int32_t *tok = bs->htok + (it * (nb + 1) + h[b].slot) * W;
    const float *lp = bs->hlp + (it * (nb + 1) + h[b].slot) * W;
    for (size_t p = 0; p < h[b].n; p++) o->on_token(o->token_arg, context, k, p, tok[p], lp[p]);
}

int t5md_beam_search(nz_matmul_ctx *mc, const nz_t5md *t, const nz_t5md_enc *enc, const size_t *valid,
                     const nz_t5md_opts *o, const int *decs, size_t D, nz_t5md_result *res, nz_error *err) {
    int rc = NZ_OK;
    const size_t Bv = enc->B, items = Bv * D, nb = (size_t)o->beam_size, N0 = items * nb, V = t->c.vocab;
    const size_t mnt = (size_t)o->max_new_tokens, max_length = 1 + mnt, cap = mnt ? mnt : 1, W = cap + 1;
    const size_t R = (size_t)o->num_return, kk = 2 * nb < V ? 2 * nb : V;
    t5md_run r;
    memset(&r, 0, sizeof r);
    beam_state bs;
    memset(&bs, 0, sizeof bs);
    int32_t *cur = NULL, *seq = NULL, *seq2 = NULL;
    float *seqlp = NULL, *seqlp2 = NULL, *bscore = NULL, *bscore2 = NULL;
    size_t *act = NULL;
    uint32_t *order = NULL;
    uint8_t *done = NULL, *taken = NULL;
    beam_cand *pool = NULL, *nxt = NULL;
    NZ_TRY(t5md_run_init(mc, &r, t, enc, decs, D, N0, cap, err));
    bs.nb = nb;
    bs.cap = cap;
    bs.V = V;
    bs.kk = kk;
    bs.lenpen = o->length_penalty;
    bs.early = o->early_stopping != 0;
    bs.hy = nz_malloc(items * (nb + 1) * sizeof *bs.hy, NZ_MEM_ACTIVATIONS);
    bs.hcnt = nz_calloc(items, sizeof *bs.hcnt, NZ_MEM_ACTIVATIONS);
    bs.worst = nz_malloc(items * sizeof *bs.worst, NZ_MEM_ACTIVATIONS);
    bs.slot_use = nz_calloc(items * (nb + 1), 1, NZ_MEM_ACTIVATIONS);
    bs.htok = nz_malloc(items * (nb + 1) * W * sizeof *bs.htok, NZ_MEM_ACTIVATIONS);
    bs.hlp = nz_malloc(items * (nb + 1) * W * sizeof *bs.hlp, NZ_MEM_ACTIVATIONS);
    bs.ctok = nz_malloc(N0 * kk * sizeof *bs.ctok, NZ_MEM_ACTIVATIONS);
    bs.cval = nz_malloc(N0 * kk * sizeof *bs.cval, NZ_MEM_ACTIVATIONS);
    bs.clp = nz_malloc(N0 * kk * sizeof *bs.clp, NZ_MEM_ACTIVATIONS);
    bs.tmp = nz_malloc(V * sizeof *bs.tmp, NZ_MEM_ACTIVATIONS);
    cur = nz_malloc(N0 * sizeof *cur, NZ_MEM_ACTIVATIONS);
    seq = nz_malloc(N0 * cap * sizeof *seq, NZ_MEM_ACTIVATIONS);
    seq2 = nz_malloc(N0 * cap * sizeof *seq2, NZ_MEM_ACTIVATIONS);
    seqlp = nz_malloc(N0 * cap * sizeof *seqlp, NZ_MEM_ACTIVATIONS);
    seqlp2 = nz_malloc(N0 * cap * sizeof *seqlp2, NZ_MEM_ACTIVATIONS);
    bscore = nz_malloc(N0 * sizeof *bscore, NZ_MEM_ACTIVATIONS);
    bscore2 = nz_malloc(N0 * sizeof *bscore2, NZ_MEM_ACTIVATIONS);
    act = nz_malloc(items * sizeof *act, NZ_MEM_ACTIVATIONS);
    order = nz_malloc(N0 * sizeof *order, NZ_MEM_ACTIVATIONS);
    done = nz_calloc(items, 1, NZ_MEM_ACTIVATIONS);
    taken = nz_malloc(nb + 1, NZ_MEM_ACTIVATIONS);
    pool = nz_malloc(nb * kk * sizeof *pool, NZ_MEM_ACTIVATIONS);
    nxt = nz_malloc(N0 * sizeof *nxt, NZ_MEM_ACTIVATIONS);
    if (!bs.hy || !bs.hcnt || !bs.worst || !bs.slot_use || !bs.htok || !bs.hlp || !bs.ctok || !bs.cval ||
        !bs.clp || !bs.tmp || !cur || !seq || !seq2 || !seqlp || !seqlp2 || !bscore || !bscore2 || !act ||
        !order || !done || !taken || !pool || !nxt)
        NZ_FAIL(NZ_E_NOMEM, "out of memory for beam search (%zu rows of up to %zu tokens)", N0, mnt);
    /* item j * Bv + b (decoder decs[j], source b), its rows item * nb + beam */
    for (size_t it = 0; it < items; it++) {
        act[it] = it;
        bs.worst[it] = 1e9;
        for (size_t m = 0; m < nb; m++) {
            const size_t row = it * nb + m;
            r.src[row] = (uint32_t)(it % Bv);
            r.dj[row] = (uint32_t)(it / Bv);
            cur[row] = NZ_T5MD_START;
            bscore[row] = m ? -1e9f : 0.0f;
        }
    }
    size_t A = items, cur_len = 1;
    beam_ban bb = {&bs, o->ban_unk, o->no_repeat_ngram, NULL, 0};
    for (;;) {
        if (o->stop && o->stop(o->stop_arg))
            NZ_FAIL(NZ_E_CANCELLED, "generation cancelled before step %zu", cur_len - 1);
        NZ_TRY(t5md_run_step(mc, &r, cur, err));
        const size_t ntok = cur_len - 1; /* tokens of every live beam before this step */
        bs.bscore = bscore;
        bb.seq = seq; /* row a * nb + m: beam m of the a-th live item (seq / seq2 swap every step) */
        bb.ntok = ntok;
        NZ_TRY(t5md_project(mc, t, r.x, r.N, beam_row, &bb, err));
        size_t A2 = 0;
        for (size_t a = 0; a < A; a++) {
            const size_t it = act[a];
            size_t np = 0;
            for (size_t m = 0; m < nb; m++) {
                const size_t row = a * nb + m;
                for (size_t q = 0; q < kk; q++)
                    pool[np++] = (beam_cand){bs.cval[row * kk + q], (uint32_t)(m * V + bs.ctok[row * kk + q]),
                                             bs.clp[row * kk + q]};
            }
            qsort(pool, np, sizeof *pool, cand_cmp);
            const size_t top = 2 * nb < np ? 2 * nb : np;
            size_t bi = 0;
            for (size_t rank = 0; rank < top; rank++) {
                const beam_cand *c = &pool[rank];
                const size_t tok = c->flat % V, row = a * nb + c->flat / V;
                if (tok == NZ_T5MD_EOS) {
                    if (rank >= nb) continue;
                    hyp_add(&bs, it, cur_len, (double)c->s, seq + row * cap, seqlp + row * cap, ntok, &c->lp);
                } else {
                    nxt[a * nb + bi] = (beam_cand){c->s, (uint32_t)(row * V + tok), c->lp};
                    bi++;
                }
                if (bi == nb) break;
            }
            if (bi < nb)
                NZ_FAIL(NZ_E_RANGE,
                        "beam search: fewer than beam_size %zu non-eos candidates (vocabulary %zu)", nb, V);
            done[it] = (uint8_t)hyp_done(&bs, it, (double)pool[0].s, cur_len);
            if (done[it]) {
                beam_emit(&bs, o, it, valid[it % Bv], decs[it / Bv]);
                continue;
            }
            /* the item goes on: its nb new beams */
            for (size_t m = 0; m < nb; m++) {
                const beam_cand *c = &nxt[a * nb + m];
                const size_t parent = c->flat / V, row2 = A2 * nb + m;
                const int32_t tok = (int32_t)(c->flat % V);
                order[row2] = (uint32_t)parent;
                memcpy(seq2 + row2 * cap, seq + parent * cap, ntok * sizeof *seq);
                memcpy(seqlp2 + row2 * cap, seqlp + parent * cap, ntok * sizeof *seqlp);
                if (ntok < cap) {
                    seq2[row2 * cap + ntok] = tok;
                    seqlp2[row2 * cap + ntok] = c->lp;
                }
                bscore2[row2] = c->s;
                cur[row2] = tok;
            }
            act[A2++] = it; /* A2 <= a: in place */
        }
        int32_t *ts = seq;
        seq = seq2;
        seq2 = ts;
        float *tl = seqlp;
        seqlp = seqlp2;
        seqlp2 = tl;
        tl = bscore;
        bscore = bscore2;
        bscore2 = tl;
        A = A2;
        cur_len++;
        if (!A || cur_len >= max_length) break;
        NZ_TRY(t5md_run_select(&r, order, A * nb, err));
    }
    /* items not done: their live beams are offered (no eos) */
    for (size_t a = 0; a < A; a++) {
        const size_t it = act[a];
        const size_t ntok = cur_len - 1 < cap ? cur_len - 1 : cap;
        for (size_t m = 0; m < nb; m++) {
            const size_t row = a * nb + m;
            hyp_add(&bs, it, cur_len, (double)bscore[row], seq + row * cap, seqlp + row * cap, ntok, NULL);
        }
        beam_emit(&bs, o, it, valid[it % Bv], decs[it / Bv]);
    }
    /* the best R of every item, best first (ties: the later added) */
    for (size_t it = 0; it < items; it++) {
        const bhyp *h = bs.hy + it * (nb + 1);
        memset(taken, 0, nb + 1);
        for (size_t q = 0; q < R; q++) {
            nz_t5md_result *re = &res[(valid[it % Bv] * D + it / Bv) * R + q];
            const size_t b = hyp_best(h, bs.hcnt[it], taken);
            if (b == SIZE_MAX) {
                re->rc = nz_fail(&re->err, NZ_E_RANGE, "beam search kept only %zu hypotheses", bs.hcnt[it]);
                continue;
            }
            taken[b] = 1;
            const size_t at = (it * (nb + 1) + h[b].slot) * W;
            NZ_TRY(t5md_set_result(re, bs.htok + at, bs.hlp + at, h[b].n, h[b].fin, err));
            re->beam_score = h[b].score;
        }
    }
done:
    t5md_run_free(&r);
    nz_free(bs.hy);
    nz_free(bs.hcnt);
    nz_free(bs.worst);
    nz_free(bs.slot_use);
    nz_free(bs.htok);
    nz_free(bs.hlp);
    nz_free(bs.ctok);
    nz_free(bs.cval);
    nz_free(bs.clp);
    nz_free(bs.tmp);
    nz_free(cur);
    nz_free(seq);
    nz_free(seq2);
    nz_free(seqlp);
    nz_free(seqlp2);
    nz_free(bscore);
    nz_free(bscore2);
    nz_free(act);
    nz_free(order);
    nz_free(done);
    nz_free(taken);
    nz_free(pool);
    nz_free(nxt);
    return rc;
}

/* t5md_beam_search's peak over B encoder rows of S and D decoders: the run of items x beam rows, the
 * search's buffers, and the largest of a step, the projection, a t5md_run_select and the results. */
double t5md_beam_search_peak(const nz_t5md *t, double B, double S, double D, const nz_t5md_opts *o) {
    const double items = B * D, nb = (double)o->beam_size, N0 = items * nb, V = (double)t->c.vocab;
    const double mnt = (double)o->max_new_tokens, cap = mnt ? mnt : 1, W = cap + 1;
    const double kk = 2 * nb < V ? 2 * nb : V, R = (double)o->num_return;
    double build, held = t5md_run_bytes(t, B, S, D, N0, cap, &build);
    const double bufs = sizeof(bhyp) * items * (nb + 1)       /* hy */
                        + 8 * items + 8 * items               /* hcnt, worst */
                        + items * (nb + 1)                    /* slot_use */
                        + 2 * (4 * items * (nb + 1) * W)      /* htok, hlp */
                        + 3 * (4 * N0 * kk)                   /* ctok, cval, clp */
                        + 4 * V + 4 * N0                      /* tmp, cur */
                        + 4 * (4 * N0 * cap)                  /* seq, seq2, seqlp, seqlp2 */
                        + 4 * N0 * 2                          /* bscore, bscore2 */
                        + 8 * items + 4 * N0 + items          /* act, order, done */
                        + (nb + 1)                            /* taken */
                        + sizeof(beam_cand) * (nb * kk + N0); /* pool, nxt */
    const int tr = t->c.kind == NZ_T5MD_TRANSFORMER;
    double step = t5md_step_peak(t, tr ? B * nb : N0, B * nb, B, S, cap);
    step = t5md_dmax(step, t5md_dmax(t5md_project_peak(t, N0), t5md_select_peak(t, N0, cap)));
    /* t5md_set_result: R per item, tokens and logprobs of <= cap + 1 tokens (NZ_MEM_OTHER) */
    const double results = items * R * 2 * (4 * (cap + 1) + 1);
    return t5md_dmax(build, held + bufs + t5md_dmax(step, results));
}
