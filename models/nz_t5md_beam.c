/* nz_t5md_beam.c — HF beam search over the decoder rows (see nz_t5md.h, nz_t5md_generate): the search's
 * bookkeeping (t5md_beam: hypotheses, candidates, the done test, the returns), shared by nz_t5md_cb's
 * beam groups, and t5md_beam_search, which runs it over the rows of one call. */
#include "nz_t5md_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ bookkeeping */

int t5md_beam_init(t5md_beam *bm, const nz_t5md *t, const nz_t5md_opts *o, size_t items, nz_error *err) {
    memset(bm, 0, sizeof *bm);
    const size_t nb = (size_t)o->beam_size, V = t->c.vocab, mnt = (size_t)o->max_new_tokens;
    const size_t cap = mnt ? mnt : 1, W = cap + 1, N0 = items * nb, kk = 2 * nb < V ? 2 * nb : V;
    bm->items = items;
    bm->nb = nb;
    bm->V = V;
    bm->kk = kk;
    bm->cap = cap;
    bm->max_length = 1 + mnt;
    bm->cur_len = 1;
    bm->lenpen = o->length_penalty;
    bm->early = o->early_stopping != 0;
    bm->ban_unk = o->ban_unk;
    bm->ngram = o->no_repeat_ngram;
    bm->hy = nz_malloc(items * (nb + 1) * sizeof *bm->hy, NZ_MEM_ACTIVATIONS);
    bm->hcnt = nz_calloc(items, sizeof *bm->hcnt, NZ_MEM_ACTIVATIONS);
    bm->worst = nz_malloc(items * sizeof *bm->worst, NZ_MEM_ACTIVATIONS);
    bm->slot_use = nz_calloc(items * (nb + 1), 1, NZ_MEM_ACTIVATIONS);
    bm->htok = nz_malloc(items * (nb + 1) * W * sizeof *bm->htok, NZ_MEM_ACTIVATIONS);
    bm->hlp = nz_malloc(items * (nb + 1) * W * sizeof *bm->hlp, NZ_MEM_ACTIVATIONS);
    bm->done = nz_calloc(items, 1, NZ_MEM_ACTIVATIONS);
    bm->seq = nz_malloc(N0 * cap * sizeof *bm->seq, NZ_MEM_ACTIVATIONS);
    bm->seqlp = nz_malloc(N0 * cap * sizeof *bm->seqlp, NZ_MEM_ACTIVATIONS);
    bm->bscore = nz_malloc(N0 * sizeof *bm->bscore, NZ_MEM_ACTIVATIONS);
    bm->stok = nz_malloc(nb * cap * sizeof *bm->stok, NZ_MEM_ACTIVATIONS);
    bm->slp = nz_malloc(nb * cap * sizeof *bm->slp, NZ_MEM_ACTIVATIONS);
    bm->ctok = nz_malloc(N0 * kk * sizeof *bm->ctok, NZ_MEM_ACTIVATIONS);
    bm->cval = nz_malloc(N0 * kk * sizeof *bm->cval, NZ_MEM_ACTIVATIONS);
    bm->clp = nz_malloc(N0 * kk * sizeof *bm->clp, NZ_MEM_ACTIVATIONS);
    bm->pool = nz_malloc(nb * kk * sizeof *bm->pool, NZ_MEM_ACTIVATIONS);
    bm->nxt = nz_malloc(nb * sizeof *bm->nxt, NZ_MEM_ACTIVATIONS);
    bm->taken = nz_malloc(nb + 1, NZ_MEM_ACTIVATIONS);
    if (!bm->hy || !bm->hcnt || !bm->worst || !bm->slot_use || !bm->htok || !bm->hlp || !bm->done ||
        !bm->seq || !bm->seqlp || !bm->bscore || !bm->stok || !bm->slp || !bm->ctok || !bm->cval ||
        !bm->clp || !bm->pool || !bm->nxt || !bm->taken)
        return nz_fail(err, NZ_E_NOMEM, "out of memory for beam search (%zu rows of up to %zu tokens)", N0,
                       mnt);
    for (size_t it = 0; it < items; it++) {
        bm->worst[it] = 1e9;
        for (size_t m = 0; m < nb; m++) bm->bscore[it * nb + m] = m ? -1e9f : 0.0f;
    }
    return NZ_OK;
}

void t5md_beam_free(t5md_beam *bm) {
    nz_free(bm->hy);
    nz_free(bm->hcnt);
    nz_free(bm->worst);
    nz_free(bm->slot_use);
    nz_free(bm->htok);
    nz_free(bm->hlp);
    nz_free(bm->done);
    nz_free(bm->seq);
    nz_free(bm->seqlp);
    nz_free(bm->bscore);
    nz_free(bm->stok);
    nz_free(bm->slp);
    nz_free(bm->ctok);
    nz_free(bm->cval);
    nz_free(bm->clp);
    nz_free(bm->pool);
    nz_free(bm->nxt);
    nz_free(bm->taken);
    memset(bm, 0, sizeof *bm);
}

/* t5md_beam_init's allocations, in its order. */
double t5md_beam_bytes(const nz_t5md *t, double items, const nz_t5md_opts *o) {
    const double nb = (double)o->beam_size, V = (double)t->c.vocab, mnt = (double)o->max_new_tokens;
    const double cap = mnt ? mnt : 1, W = cap + 1, N0 = items * nb, kk = 2 * nb < V ? 2 * nb : V;
    return sizeof(t5md_bhyp) * items * (nb + 1)  /* hy */
           + sizeof(size_t) * items + 8 * items  /* hcnt, worst */
           + items * (nb + 1)                    /* slot_use */
           + 2 * (4 * items * (nb + 1) * W)      /* htok, hlp */
           + items                               /* done */
           + 2 * (4 * N0 * cap) + 4 * N0         /* seq, seqlp, bscore */
           + 2 * (4 * nb * cap)                  /* stok, slp */
           + 3 * (4 * N0 * kk)                   /* ctok, cval, clp */
           + sizeof(t5md_bcand) * (nb * kk + nb) /* pool, nxt */
           + (nb + 1);                           /* taken */
}

/* descending scores, ties to the lower flat index (a stable descending sort), NaN last */
static int cand_cmp(const void *pa, const void *pb) {
    const t5md_bcand *a = pa, *b = pb;
    int na = isnan(a->s), nb = isnan(b->s);
    if (na != nb) return na - nb;
    if (!na && a->s > b->s) return -1;
    if (!na && a->s < b->s) return 1;
    return (a->flat > b->flat) - (a->flat < b->flat);
}

/* BeamHypotheses.add to item it: tokens tok[n] (+ eos when eos_lp is not NULL). */
static void hyp_add(t5md_beam *bm, size_t it, size_t hyp_len, double sum, const int32_t *tok, const float *lp,
                    size_t n, const float *eos_lp) {
    const size_t nb = bm->nb, W = bm->cap + 1;
    const double score = sum / pow((double)hyp_len, bm->lenpen);
    t5md_bhyp *h = bm->hy + it * (nb + 1);
    size_t *cnt = &bm->hcnt[it];
    if (!(*cnt < nb || score > bm->worst[it])) return;
    uint8_t *use = bm->slot_use + it * (nb + 1);
    size_t slot = 0;
    while (use[slot]) slot++; /* at most nb slots are in use */
    use[slot] = 1;
    int32_t *dt = bm->htok + (it * (nb + 1) + slot) * W;
    float *dl = bm->hlp + (it * (nb + 1) + slot) * W;
    memcpy(dt, tok, n * sizeof *tok);
    memcpy(dl, lp, n * sizeof *lp);
    if (eos_lp) {
        dt[n] = NZ_T5MD_EOS;
        dl[n] = *eos_lp;
    }
    h[*cnt] = (t5md_bhyp){score, slot, n + (eos_lp != NULL), eos_lp != NULL};
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
        bm->worst[it] = m;
    } else if (score < bm->worst[it]) {
        bm->worst[it] = score;
    }
}

/* BeamHypotheses.is_done */
static int hyp_done(const t5md_beam *bm, size_t it, double best_sum, size_t cur_len) {
    if (bm->hcnt[it] < bm->nb) return 0;
    if (bm->early) return 1;
    return bm->worst[it] >= best_sum / pow((double)cur_len, bm->lenpen);
}

/* Index (in insertion order) of the best kept hypothesis, ties to the later added. */
static size_t hyp_best(const t5md_bhyp *h, size_t cnt, const uint8_t *taken) {
    size_t best = SIZE_MAX;
    for (size_t i = 0; i < cnt; i++) {
        if (taken && taken[i]) continue;
        if (best == SIZE_MAX || h[i].score >= h[best].score) best = i;
    }
    return best;
}

/* row-local top-k: an item's best 2 * beam are among its rows' best 2 * beam each */
void t5md_beam_row(t5md_beam *bm, size_t it, size_t m, float *lg, float *tmp) {
    const size_t V = bm->V, kk = bm->kk, row = it * bm->nb + m;
    nz_log_softmax(lg, 1, V);
    if (bm->ban_unk) lg[NZ_T5MD_UNK] = -INFINITY;
    if (bm->ngram) t5md_ban_ngrams(lg, bm->seq + row * bm->cap, bm->cur_len - 1, bm->ngram);
    const float b = bm->bscore[row];
    for (size_t v = 0; v < V; v++) tmp[v] = lg[v] + b;
    uint32_t *ct = bm->ctok + row * kk;
    nz_topk(tmp, V, kk, ct, bm->cval + row * kk);
    for (size_t q = 0; q < kk; q++) bm->clp[row * kk + q] = lg[ct[q]];
}

/* Item it's beams continue from bm->nxt: beam m is parent[m]'s tokens and the new one. */
static void beam_reorder(t5md_beam *bm, size_t it, uint32_t *parent) {
    const size_t nb = bm->nb, V = bm->V, cap = bm->cap, row0 = it * nb, ntok = bm->cur_len - 1;
    const size_t keep = ntok < cap ? ntok + 1 : cap;
    for (size_t m = 0; m < nb; m++) {
        const t5md_bcand *c = &bm->nxt[m];
        const size_t p = c->flat / V;
        parent[m] = (uint32_t)p;
        memcpy(bm->stok + m * cap, bm->seq + (row0 + p) * cap, ntok * sizeof *bm->stok);
        memcpy(bm->slp + m * cap, bm->seqlp + (row0 + p) * cap, ntok * sizeof *bm->slp);
        if (ntok < cap) {
            bm->stok[m * cap + ntok] = (int32_t)(c->flat % V);
            bm->slp[m * cap + ntok] = c->lp;
        }
        bm->bscore[row0 + m] = c->s;
    }
    for (size_t m = 0; m < nb; m++) {
        memcpy(bm->seq + (row0 + m) * cap, bm->stok + m * cap, keep * sizeof *bm->seq);
        memcpy(bm->seqlp + (row0 + m) * cap, bm->slp + m * cap, keep * sizeof *bm->seqlp);
    }
}

int t5md_beam_item(t5md_beam *bm, size_t it, uint32_t *parent, nz_error *err) {
    const size_t nb = bm->nb, V = bm->V, kk = bm->kk, cap = bm->cap, row0 = it * nb, ntok = bm->cur_len - 1;
    t5md_bcand *pool = bm->pool;
    size_t np = 0;
    for (size_t m = 0; m < nb; m++) {
        const size_t row = row0 + m;
        for (size_t q = 0; q < kk; q++)
            pool[np++] = (t5md_bcand){bm->cval[row * kk + q], (uint32_t)(m * V + bm->ctok[row * kk + q]),
                                      bm->clp[row * kk + q]};
    }
    qsort(pool, np, sizeof *pool, cand_cmp);
    const size_t top = 2 * nb < np ? 2 * nb : np;
    size_t bi = 0;
    for (size_t rank = 0; rank < top && bi < nb; rank++) {
        const t5md_bcand *c = &pool[rank];
        const size_t row = row0 + c->flat / V;
        if (c->flat % V != NZ_T5MD_EOS)
            bm->nxt[bi++] = *c;
        else if (rank < nb)
            hyp_add(bm, it, bm->cur_len, (double)c->s, bm->seq + row * cap, bm->seqlp + row * cap, ntok,
                    &c->lp);
    }
    if (bi < nb)
        return nz_fail(err, NZ_E_RANGE,
                       "beam search: fewer than beam_size %zu non-eos candidates (vocabulary %zu)", nb, V);
    bm->done[it] = (uint8_t)hyp_done(bm, it, (double)pool[0].s, bm->cur_len);
    if (!bm->done[it]) beam_reorder(bm, it, parent);
    return NZ_OK;
}

void t5md_beam_end(t5md_beam *bm, size_t it) {
    const size_t nb = bm->nb, cap = bm->cap, ntok = bm->cur_len - 1 < cap ? bm->cur_len - 1 : cap;
    for (size_t m = 0; m < nb; m++) {
        const size_t row = it * nb + m;
        hyp_add(bm, it, bm->cur_len, (double)bm->bscore[row], bm->seq + row * cap, bm->seqlp + row * cap,
                ntok, NULL);
    }
}

void t5md_beam_emit(const t5md_beam *bm, const nz_t5md_opts *o, size_t it, size_t context, int k) {
    if (!o->on_token) return;
    const size_t nb = bm->nb, W = bm->cap + 1;
    const t5md_bhyp *h = bm->hy + it * (nb + 1);
    const size_t b = hyp_best(h, bm->hcnt[it], NULL);
    if (b == SIZE_MAX) return;
    const int32_t *tok = bm->htok + (it * (nb + 1) + h[b].slot) * W;
    const float *lp = bm->hlp + (it * (nb + 1) + h[b].slot) * W;
    for (size_t p = 0; p < h[b].n; p++) o->on_token(o->token_arg, context, k, p, tok[p], lp[p]);
}

int t5md_beam_results(t5md_beam *bm, size_t it, nz_t5md_result *res, size_t R, nz_error *err) {
    const size_t nb = bm->nb, W = bm->cap + 1;
    const t5md_bhyp *h = bm->hy + it * (nb + 1);
    memset(bm->taken, 0, nb + 1);
    for (size_t q = 0; q < R; q++) {
        nz_t5md_result *re = &res[q];
        const size_t b = hyp_best(h, bm->hcnt[it], bm->taken);
        if (b == SIZE_MAX) {
            re->rc = nz_fail(&re->err, NZ_E_RANGE, "beam search kept only %zu hypotheses", bm->hcnt[it]);
            continue;
        }
        bm->taken[b] = 1;
        const size_t at = (it * (nb + 1) + h[b].slot) * W;
        int rc = t5md_set_result(re, bm->htok + at, bm->hlp + at, h[b].n, h[b].fin, err);
        if (rc) return rc;
        re->beam_score = h[b].score;
    }
    return NZ_OK;
}

/* ------------------------------------------------------------------ over the rows of a call */

typedef struct beam_proj {
    t5md_beam *bm;
    const size_t *act; /* [A] the live items: row a * nb + m is beam m of item act[a] */
    float *tmp;        /* [V] */
} beam_proj;

static void beam_proj_row(void *ctx, size_t i, float *lg) {
    beam_proj *p = ctx;
    t5md_beam_row(p->bm, p->act[i / p->bm->nb], i % p->bm->nb, lg, p->tmp);
}

/* Items: item j * Bv + b is decoder decs[j] on source b; its rows (while it is live, the a-th live item)
 * a * nb + m. Finished items leave the rows (t5md_run_select keeps the live items' rows in order). */
int t5md_beam_search(nz_matmul_ctx *mc, const nz_t5md *t, const nz_t5md_enc *enc, const size_t *valid,
                     const nz_t5md_opts *o, const int *decs, size_t D, nz_t5md_result *res, nz_error *err) {
    int rc = NZ_OK;
    const size_t Bv = enc->B, items = Bv * D, nb = (size_t)o->beam_size, N0 = items * nb;
    const size_t R = (size_t)o->num_return, mnt = (size_t)o->max_new_tokens;
    t5md_run r;
    memset(&r, 0, sizeof r);
    t5md_beam bm;
    memset(&bm, 0, sizeof bm);
    int32_t *cur = NULL;
    size_t *act = NULL;
    uint32_t *order = NULL, *parent = NULL;
    float *tmp = NULL;
    NZ_TRY(t5md_run_init(mc, &r, t, enc, decs, D, N0, mnt ? mnt : 1, err));
    NZ_TRY(t5md_beam_init(&bm, t, o, items, err));
    cur = nz_malloc(N0 * sizeof *cur, NZ_MEM_ACTIVATIONS);
    act = nz_malloc(items * sizeof *act, NZ_MEM_ACTIVATIONS);
    order = nz_malloc(N0 * sizeof *order, NZ_MEM_ACTIVATIONS);
    parent = nz_malloc(nb * sizeof *parent, NZ_MEM_ACTIVATIONS);
    tmp = nz_malloc(t->c.vocab * sizeof *tmp, NZ_MEM_ACTIVATIONS);
    if (!cur || !act || !order || !parent || !tmp)
        NZ_FAIL(NZ_E_NOMEM, "out of memory for beam search (%zu rows of up to %zu tokens)", N0, mnt);
    for (size_t it = 0; it < items; it++) {
        act[it] = it;
        for (size_t m = 0; m < nb; m++) {
            r.src[it * nb + m] = (uint32_t)(it % Bv);
            r.dj[it * nb + m] = (uint32_t)(it / Bv);
        }
    }
    size_t A = items;
    for (;;) {
        if (o->stop && o->stop(o->stop_arg))
            NZ_FAIL(NZ_E_CANCELLED, "generation cancelled before step %zu", bm.cur_len - 1);
        for (size_t a = 0; a < A; a++)
            for (size_t m = 0; m < nb; m++) cur[a * nb + m] = t5md_beam_input(&bm, act[a], m);
        NZ_TRY(t5md_run_step(mc, &r, cur, err));
        beam_proj bp = {&bm, act, tmp};
        NZ_TRY(t5md_project(mc, t, r.x, r.N, beam_proj_row, &bp, err));
        size_t A2 = 0;
        for (size_t a = 0; a < A; a++) {
            const size_t it = act[a];
            NZ_TRY(t5md_beam_item(&bm, it, parent, err));
            if (bm.done[it]) {
                t5md_beam_emit(&bm, o, it, valid[it % Bv], decs[it / Bv]);
                continue;
            }
            for (size_t m = 0; m < nb; m++) order[A2 * nb + m] = (uint32_t)(a * nb + parent[m]);
            act[A2++] = it; /* A2 <= a: in place */
        }
        A = A2;
        bm.cur_len++;
        if (!A || bm.cur_len >= bm.max_length) break;
        NZ_TRY(t5md_run_select(&r, order, A * nb, err));
    }
    for (size_t a = 0; a < A; a++) { /* items not done: their live beams are offered (no eos) */
        t5md_beam_end(&bm, act[a]);
        t5md_beam_emit(&bm, o, act[a], valid[act[a] % Bv], decs[act[a] / Bv]);
    }
    for (size_t it = 0; it < items; it++)
        NZ_TRY(t5md_beam_results(&bm, it, &res[(valid[it % Bv] * D + it / Bv) * R], R, err));
done:
    t5md_run_free(&r);
    t5md_beam_free(&bm);
    nz_free(cur);
    nz_free(act);
    nz_free(order);
    nz_free(parent);
    nz_free(tmp);
    return rc;
}

/* t5md_beam_search's peak over B encoder rows of S and D decoders: the run of items x beam rows (while
 * its cross caches are built, or held with the caches), the search's bookkeeping and buffers, and the
 * largest of a step, the projection, a t5md_run_select and the results. */
double t5md_beam_search_peak(const nz_t5md *t, double B, double S, double D, const nz_t5md_opts *o) {
    const double items = B * D, nb = (double)o->beam_size, N0 = items * nb, V = (double)t->c.vocab;
    const double mnt = (double)o->max_new_tokens, cap = mnt ? mnt : 1, R = (double)o->num_return;
    const double bufs = t5md_beam_bytes(t, items, o)                    /* the bookkeeping */
                        + 4 * N0 + 8 * items + 4 * N0 + 4 * nb + 4 * V; /* cur, act, order, parent, tmp */
    double build, held = t5md_run_bytes(t, B, S, D, N0, cap, &build);
    const int tr = t->c.kind == NZ_T5MD_TRANSFORMER;
    double step = t5md_step_peak(t, tr ? B * nb : N0, B * nb, B, S, cap);
    step = t5md_dmax(step, t5md_dmax(t5md_project_peak(t, N0), t5md_select_peak(t, N0, cap)));
    /* t5md_set_result: R per item, tokens and logprobs of <= cap + 1 tokens (NZ_MEM_OTHER) */
    const double results = items * R * 2 * (4 * (cap + 1) + 1);
    return t5md_dmax(build, held + bufs + t5md_dmax(step, results));
}
