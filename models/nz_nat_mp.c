/*
 * nz_nat_mp.c — mask-predict (CMLM iterative refinement with length beam and optional AT rerank): its
 * continuous batch (nz_nat_mpb_*) and nz_nat_mask_predict, which runs through it (see nz_nat.h).
 *
 * A sentence joins at a pass boundary: the sentences added since the last step are encoded together,
 * their lengths predicted and their length-beam candidates laid out ([bos, mask.., eos]); their encoder
 * states go to slots of the CMLM decoder's cross-attention caches (nz_kvenc). Every step then runs one
 * decoder pass over every active candidate of every sentence, padded to the widest of them (each row
 * reads its sentence's slot: kv_map), then for each candidate its re-masking (fairseq
 * _skeptical_unmasking with its sentence's own pass counter and max_iter) and its termination (after
 * pass max_iter, or adaptive: its tokens did not change). A sentence whose every candidate ended is
 * done: its hypothesis is chosen (first best nat score, or the AT score with rerank: nz_nat_at_score
 * over its kept encoder rows, the sentences done in the same step scored together) and it leaves.
 *
 * Its results are bit for bit those it has alone: the attention skips padded keys (the candidate padding
 * and the encoder slots' padding), every GEMM is row-invariant, every other reduction (mean pooling,
 * positional scores, the re-masking sort) is per candidate over its own positions. nz_nat_mask_predict
 * adds its sentences to a batch of its own and steps it until every sentence is done: it is the batch's
 * one driver of the passes, not a second copy of them. Its memory estimates and bound are in
 * nz_nat_mp_mem.c (the structs both read: nz_nat_mp_int.h).
 */
#include "nz_nat_mp_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ options, lengths */

/* nz_nat_mask_predict's option checks. @return NZ_OK or the error. */
int nat_mp_check_opts(const nz_nat *n, const nz_nat_opts *o, nz_error *err) {
    if (o->max_len < 0 || o->max_len == 1)
        return nz_fail(err, NZ_E_INVALID_ARG,
                       "mask-predict: max_len %d must be 0 (no cap) or >= 2 (bos and eos)", o->max_len);
    if (o->max_iter < 0 || o->max_iter > 1000000 || o->length_beam < 1 || o->length_beam > 4096)
        return nz_fail(err, NZ_E_INVALID_ARG,
                       "mask-predict: max_iter %d (>= 0) or length_beam %d (1..4096) out of range",
                       o->max_iter, o->length_beam);
    if (o->rerank_at && !n->c.at_layers)
        return nz_fail(err, NZ_E_UNSUPPORTED,
                       "AT rerank needs an AT decoder (config.json has no at_decoder_layers)");
    if (o->rerank_at && n->c.at_prepend_bos)
        return nz_fail(
            err, NZ_E_UNSUPPORTED,
            "AT rerank: at_prepend_bos (multi-task-nat's [eos, bos, y..] AT input) is not supported");
    return NZ_OK;
}

/* Length candidate j of a sentence whose predicted length is L0: L0 + j - beam / 2 within [2, maxL]
 * (maxL: max_target_positions, or o->max_len below it). */
size_t nat_mp_cand_len(const nz_nat *n, const nz_nat_opts *o, long L0, size_t j) {
    long maxL = (long)n->c.max_target_positions;
    if (o->max_len >= 2 && o->max_len < maxL) maxL = o->max_len;
    const long L = L0 + (long)j - (long)((size_t)o->length_beam / 2);
    return (size_t)(L < 2 ? 2 : L > maxL ? maxL : L);
}

/* ------------------------------------------------------------------ the batch */

int nz_nat_mpb_create(const nz_nat *n, nz_nat_mpb **out, nz_error *err) {
    *out = NULL;
    nz_nat_mpb *b = nz_calloc(1, sizeof *b, NZ_MEM_ACTIVATIONS);
    if (!b) return nz_fail(err, NZ_E_NOMEM, "out of memory for a mask-predict batch");
    b->n = n;
    int rc = nz_kvenc_init(&b->cross, n->dec.nlayers, n->c.d_model, err);
    if (rc) {
        nz_free(b);
        return rc;
    }
    *out = b;
    return NZ_OK;
}

/* q's candidate buffers and kept encoder rows (not its result). */
static void seq_drop(mp_seq *q) {
    nz_free(q->src);
    nz_free(q->clen);
    nz_free(q->tok);
    nz_free(q->sc);
    nz_free(q->fn);
    nz_free(q->fscore);
    nz_free(q->ascore);
    nz_free(q->fsteps);
    nz_free(q->fin);
    nz_free(q->ex);
    nz_free(q->epad);
    q->src = NULL;
    q->clen = q->fn = NULL;
    q->tok = NULL;
    q->sc = q->fscore = q->ascore = q->ex = NULL;
    q->fsteps = NULL;
    q->fin = q->epad = NULL;
}

static void seq_free(mp_seq *q) {
    if (!q) return;
    seq_drop(q);
    nz_nat_hyps_free(&q->hyp, 1);
    nz_free(q);
}

void nz_nat_mpb_free(nz_nat_mpb *b) {
    if (!b) return;
    for (mp_seq *q = b->seqs, *nx; q; q = nx) {
        nx = q->link;
        seq_free(q);
    }
    nz_kvenc_free(&b->cross);
    nz_free(b);
}

size_t nz_nat_mpb_size(const nz_nat_mpb *b) { return b->nseqs; }

size_t nz_nat_mpb_candidates(const nz_nat_mpb *b) {
    size_t A = 0;
    for (const mp_seq *q = b->seqs; q; q = q->link) A += q->state == M_RUNNING ? q->active : 0;
    return A;
}

int nz_nat_mpb_add(nz_nat_mpb *b, const int32_t *src, size_t len, const nz_nat_opts *o, void *owner,
                   nz_error *err) {
    nz_nat_opts def;
    if (!o) {
        nz_nat_opts_default(&def);
        o = &def;
    }
    int rc = nat_mp_check_opts(b->n, o, err);
    if (!rc) rc = nz_nat_check_source(b->n, src, len, NULL, err);
    if (rc) return rc;
    mp_seq *q = nz_calloc(1, sizeof *q, NZ_MEM_ACTIVATIONS);
    if (q) q->src = nz_malloc(len * sizeof *src + 1, NZ_MEM_ACTIVATIONS);
    if (!q || !q->src) {
        seq_free(q);
        return nz_fail(err, NZ_E_NOMEM, "out of memory for a mask-predict batch member");
    }
    memcpy(q->src, src, len * sizeof *src);
    q->len = len;
    q->o = *o;
    q->o.on_width = NULL;
    q->o.stop = NULL;
    q->beam = (size_t)o->length_beam;
    q->owner = owner;
    q->link = b->seqs;
    b->seqs = q;
    b->nseqs++;
    return NZ_OK;
}

/* q's candidates for its predicted length L0: lengths (W: the longest). @return NZ_OK or NZ_E_NOMEM. */
static int seq_lengths(const nz_nat *n, mp_seq *q, long L0, nz_error *err) {
    q->clen = nz_malloc(q->beam * sizeof *q->clen, NZ_MEM_ACTIVATIONS);
    if (!q->clen) return nz_fail(err, NZ_E_NOMEM, "out of memory for candidates");
    q->W = 2;
    for (size_t j = 0; j < q->beam; j++) {
        q->clen[j] = nat_mp_cand_len(n, &q->o, L0, j);
        if (q->clen[j] > q->W) q->W = q->clen[j];
    }
    return NZ_OK;
}

/* q's candidate buffers, each candidate [bos, mask x (L-2), eos, pad..]; with rerank its encoder rows
 * (row b of enc) are kept. @return NZ_OK or NZ_E_NOMEM. */
static int seq_layout(mp_seq *q, const nz_nat_enc *enc, size_t b, nz_error *err) {
    const size_t beam = q->beam, W = q->W, D = enc->D;
    q->tok = nz_malloc(beam * W * sizeof *q->tok, NZ_MEM_ACTIVATIONS);
    q->sc = nz_calloc(beam * W, sizeof *q->sc, NZ_MEM_ACTIVATIONS);
    q->fn = nz_calloc(beam, sizeof *q->fn, NZ_MEM_ACTIVATIONS);
    q->fscore = nz_malloc(beam * sizeof *q->fscore, NZ_MEM_ACTIVATIONS);
    q->ascore = nz_malloc(beam * sizeof *q->ascore, NZ_MEM_ACTIVATIONS);
    q->fsteps = nz_calloc(beam, sizeof *q->fsteps, NZ_MEM_ACTIVATIONS);
    q->fin = nz_calloc(beam, 1, NZ_MEM_ACTIVATIONS);
    if (q->o.rerank_at) {
        q->ex = nz_malloc(q->len * D * sizeof *q->ex + 1, NZ_MEM_ACTIVATIONS);
        q->epad = nz_malloc(q->len + 1, NZ_MEM_ACTIVATIONS);
    }
    if (!q->tok || !q->sc || !q->fn || !q->fscore || !q->ascore || !q->fsteps || !q->fin ||
        (q->o.rerank_at && (!q->ex || !q->epad)))
        return nz_fail(err, NZ_E_NOMEM, "out of memory for %zu candidates of up to %zu tokens", beam, W);
    for (size_t j = 0; j < beam; j++) {
        int32_t *r = q->tok + j * W;
        for (size_t t = 0; t < W; t++) r[t] = t < q->clen[j] ? NZ_NAT_MASK : NZ_NAT_PAD;
        r[0] = NZ_NAT_BOS;
        r[q->clen[j] - 1] = NZ_NAT_EOS;
        q->ascore[j] = NAN;
    }
    q->active = beam;
    if (q->o.rerank_at) {
        memcpy(q->ex, enc->x + b * enc->S * D, q->len * D * sizeof *q->ex);
        memcpy(q->epad, enc->pad + b * enc->S, q->len);
    }
    return NZ_OK;
}

/* The joiners qs[B] (pending, oldest first) encoded as src[B x S]: lengths predicted, candidates laid
 * out, cross slots taken and filled; they run from now on. @return NZ_OK or an error. */
static int join(nz_matmul_ctx *mc, nz_nat_mpb *b, mp_seq **qs, size_t B, const int32_t *src, size_t S,
                nz_error *err) {
    const nz_nat *n = b->n;
    int rc = NZ_OK;
    long *L0 = nz_malloc(B * sizeof *L0, NZ_MEM_ACTIVATIONS);
    uint32_t *slots = nz_malloc(B * sizeof *slots, NZ_MEM_ACTIVATIONS);
    nz_nat_enc enc;
    memset(&enc, 0, sizeof enc);
    nz_kv tmp;
    memset(&tmp, 0, sizeof tmp);
    if (!L0 || !slots) NZ_FAIL(NZ_E_NOMEM, "out of memory admitting %zu sentences", B);
    NZ_TRY(nz_nat_encode(mc, n, src, B, S, &enc, err));
    NZ_TRY(nat_predict_lengths(mc, n, &enc, L0, err));
    size_t W = 2;
    for (size_t k = 0; k < B; k++) {
        NZ_TRY(seq_lengths(n, qs[k], L0[k], err));
        if (qs[k]->W > W) W = qs[k]->W;
    }
    if (b->on_width) b->on_width(b->width_arg, W); /* before the candidates allocate */
    for (size_t k = 0; k < B; k++) NZ_TRY(seq_layout(qs[k], &enc, k, err));
    NZ_TRY(nz_kvenc_take(&b->cross, B, S, slots, err));
    for (size_t k = 0; k < B; k++) {
        qs[k]->enc = slots[k];
        qs[k]->state = M_RUNNING; /* its slot is taken: given back when it leaves */
        nz_free(qs[k]->src);
        qs[k]->src = NULL;
    }
    NZ_TRY(nz_kv_init(&tmp, B, S, n->c.d_model, err));
    for (size_t l = 0; l < n->dec.nlayers; l++) {
        NZ_TRY(nz_attn_cross_kv(mc, &n->dec.layers[l].cross, enc.x, B, S, enc.pad, &tmp, err));
        for (size_t k = 0; k < B; k++) nz_kvenc_fill(&b->cross, l, slots[k], &tmp, k);
    }
done:
    nz_kv_free(&tmp);
    nz_nat_enc_free(&enc);
    nz_free(L0);
    nz_free(slots);
    return rc;
}

/* Encode the sentences added since the last step together (right-padded) and let them join. */
static int admit(nz_matmul_ctx *mc, nz_nat_mpb *b, nz_error *err) {
    size_t B = 0, S = 2;
    for (mp_seq *q = b->seqs; q; q = q->link)
        if (q->state == M_PENDING) {
            B++;
            if (q->len > S) S = q->len;
        }
    if (!B) return NZ_OK;
    int rc = NZ_OK;
    int32_t *src = nz_malloc(B * S * sizeof *src, NZ_MEM_ACTIVATIONS);
    mp_seq **qs = nz_malloc(B * sizeof *qs, NZ_MEM_ACTIVATIONS);
    if (!src || !qs) {
        rc = nz_fail(err, NZ_E_NOMEM, "out of memory admitting %zu sentences", B);
    } else {
        size_t k = B;
        for (mp_seq *q = b->seqs; q; q = q->link) /* oldest first: the list is newest first */
            if (q->state == M_PENDING) qs[--k] = q;
        for (k = 0; k < B; k++)
            for (size_t j = 0; j < S; j++) src[k * S + j] = j < qs[k]->len ? qs[k]->src[j] : NZ_NAT_PAD;
        rc = join(mc, b, qs, B, src, S, err);
    }
    nz_free(src);
    nz_free(qs);
    return rc;
}

/* q leaves: its slot is free again, its candidates are dropped, it is done. */
static void leave(nz_nat_mpb *b, mp_seq *q) {
    if (q->state == M_RUNNING) nz_kvenc_give(&b->cross, q->enc);
    seq_drop(q);
    q->state = M_DONE;
}

/* A failed step: every sentence not done is, with the error. */
static void fail_seqs(nz_nat_mpb *b, int rc, const nz_error *err) {
    for (mp_seq *q = b->seqs; q; q = q->link)
        if (q->state != M_DONE) {
            nz_nat_hyps_free(&q->hyp, 1);
            q->hyp.rc = rc;
            q->hyp.err = *err;
            leave(b, q);
        }
}

/* ------------------------------------------------------------------ a pass */

/* ascending scores, ties by position (a stable sort); NaN last as torch.sort */
static int key_cmp(const void *pa, const void *pb) {
    const sort_key *a = pa, *b = pb;
    int na = isnan(a->s), nb = isnan(b->s);
    if (na != nb) return na - nb;
    if (!na && a->s < b->s) return -1;
    if (!na && a->s > b->s) return 1;
    return (a->i > b->i) - (a->i < b->i);
}

/* One pass over the A active candidates, padded to Wa tokens. */
typedef struct mp_pass {
    size_t A, Wa, R, V;
    int32_t *bt;     /* [A x Wa] the candidates' tokens before the pass */
    uint32_t *kvmap; /* [A] each one's cross cache slot */
    mp_seq **aseq;   /* [A] its sentence */
    uint32_t *aj;    /* [A] and its index there */
    size_t *rows;    /* [R] the masked cells (a x Wa + t) */
    float *h;        /* [A x Wa x D] decoder features */
    sort_key *keys;  /* [Wa] re-masking scratch */
} mp_pass;

static void pass_free(mp_pass *p) {
    nz_free(p->bt);
    nz_free(p->kvmap);
    nz_free(p->aseq);
    nz_free(p->aj);
    nz_free(p->rows);
    nz_free(p->h);
    nz_free(p->keys);
}

/* Lay out the active candidates of every running sentence. @return NZ_OK or NZ_E_NOMEM. */
static int pass_layout(const nz_nat_mpb *b, mp_pass *p, nz_error *err) {
    size_t A = 0, Wa = 0, R = 0;
    for (mp_seq *q = b->seqs; q; q = q->link)
        for (size_t j = 0; q->state == M_RUNNING && j < q->beam; j++) {
            if (q->fin[j]) continue;
            A++;
            if (q->clen[j] > Wa) Wa = q->clen[j]; /* trailing pads change nothing */
            for (size_t t = 0; t < q->clen[j]; t++) R += q->tok[j * q->W + t] == NZ_NAT_MASK;
        }
    const size_t D = b->n->c.d_model;
    p->A = A, p->Wa = Wa, p->R = R, p->V = b->n->c.vocab;
    p->bt = nz_malloc(A * Wa * sizeof *p->bt + 1, NZ_MEM_ACTIVATIONS);
    p->kvmap = nz_malloc(A * sizeof *p->kvmap + 1, NZ_MEM_ACTIVATIONS);
    p->aseq = nz_malloc(A * sizeof *p->aseq + 1, NZ_MEM_ACTIVATIONS);
    p->aj = nz_malloc(A * sizeof *p->aj + 1, NZ_MEM_ACTIVATIONS);
    p->rows = nz_malloc(R * sizeof *p->rows + 1, NZ_MEM_ACTIVATIONS);
    p->h = nz_malloc(A * Wa * D * sizeof *p->h + 1, NZ_MEM_ACTIVATIONS);
    p->keys = nz_malloc(Wa * sizeof *p->keys + 1, NZ_MEM_ACTIVATIONS);
    if (!p->bt || !p->kvmap || !p->aseq || !p->aj || !p->rows || !p->h || !p->keys)
        return nz_fail(err, NZ_E_NOMEM, "out of memory for %zu candidates of up to %zu tokens", A, Wa);
    size_t a = 0, r = 0;
    for (mp_seq *q = b->seqs; q; q = q->link)
        for (size_t j = 0; q->state == M_RUNNING && j < q->beam; j++) {
            if (q->fin[j]) continue;
            const int32_t *src = q->tok + j * q->W;
            int32_t *dst = p->bt + a * Wa;
            for (size_t t = 0; t < Wa; t++) dst[t] = t < q->clen[j] ? src[t] : NZ_NAT_PAD;
            for (size_t t = 0; t < q->clen[j]; t++)
                if (src[t] == NZ_NAT_MASK) p->rows[r++] = a * Wa + t;
            p->kvmap[a] = q->enc;
            p->aseq[a] = q;
            p->aj[a++] = (uint32_t)j;
        }
    return NZ_OK;
}

/* fairseq CMLM forward_decoder: a masked position takes the argmax token and its log-prob */
static void mp_row(void *ctx, size_t i, const float *lp) {
    const mp_pass *p = ctx;
    const size_t r = p->rows[i], a = r / p->Wa, t = r % p->Wa;
    mp_seq *q = p->aseq[a];
    const size_t cell = p->aj[a] * q->W + t, k = nz_argmax(lp, p->V);
    q->tok[cell] = (int32_t)k;
    q->sc[cell] = lp[k];
}

/* Re-mask the floor((L - 2) * p) lowest scores of candidate j of q after its pass (fairseq
 * _skeptical_unmasking, p = float32(1 - (pass + 1) / (T + 1))). */
static void cand_remask(mp_seq *q, size_t j, sort_key *keys) {
    const size_t T = (size_t)q->o.max_iter, cl = q->clen[j];
    if (q->pass >= T) return;
    const float p = (float)(1.0 - (double)(q->pass + 1) / (double)(T + 1));
    int32_t *r = q->tok + j * q->W;
    float *s = q->sc + j * q->W;
    long L = 0;
    for (size_t t = 0; t < cl; t++) L += r[t] != NZ_NAT_PAD;
    const float prod = (float)(L - 2) * p;
    const long bound = (long)prod; /* .long(): truncation toward zero */
    if (bound <= 0) return;
    /* positions >= clen are pads scoring 0 behind every in-length position (all scores <= 0): sorting
     * [0, clen) is enough */
    for (size_t t = 0; t < cl; t++) keys[t] = (sort_key){s[t], (uint32_t)t};
    qsort(keys, cl, sizeof *keys, key_cmp);
    for (long k = 0; k < bound && (size_t)k < cl; k++) {
        r[keys[k].i] = NZ_NAT_MASK;
        s[keys[k].i] = 0.0f;
    }
}

/* Candidate j of q ends after pass max_iter, or (adaptive) when its tokens are still before[] (its row
 * before the pass): its non-pad tokens move to the front, its score is their mean positional score. */
static void cand_end(mp_seq *q, size_t j, const int32_t *before) {
    int32_t *r = q->tok + j * q->W;
    const float *s = q->sc + j * q->W;
    const size_t cl = q->clen[j];
    if (q->pass != (size_t)q->o.max_iter && !(q->o.adaptive && !memcmp(before, r, cl * sizeof *r))) return;
    size_t k = 0;
    double sum = 0;
    for (size_t t = 0; t < cl; t++)
        if (r[t] != NZ_NAT_PAD) {
            r[k++] = r[t];
            sum += s[t];
        }
    q->fn[j] = k;
    q->fscore[j] = k ? (float)(sum / (double)k) : NAN;
    q->fsteps[j] = (int)q->pass;
    q->fin[j] = 1;
    q->active--;
}

/* One decoder pass over every active candidate, then each one's re-masking and termination.
 * @return NZ_OK or an error. */
static int pass_run(nz_matmul_ctx *mc, nz_nat_mpb *b, nz_error *err) {
    mp_pass p;
    memset(&p, 0, sizeof p);
    int rc = pass_layout(b, &p, err);
    if (!rc) rc = nat_decoder_fwd(mc, b->n, 1, p.bt, p.A, p.Wa, b->cross.kv, p.kvmap, p.h, err);
    if (!rc) rc = nat_project_rows(mc, b->n, p.h, p.rows, p.R, mp_row, &p, err);
    for (size_t a = 0; a < p.A && !rc; a++) {
        cand_remask(p.aseq[a], p.aj[a], p.keys);
        cand_end(p.aseq[a], p.aj[a], p.bt + a * p.Wa);
    }
    if (!rc)
        for (mp_seq *q = b->seqs; q; q = q->link) q->pass += q->state == M_RUNNING;
    pass_free(&p);
    return rc;
}

/* ------------------------------------------------------------------ results */

/* np.argmax over s[0..k): the first maximum; a NaN wins (first NaN). */
static size_t first_best(const float *s, size_t k) {
    size_t best = 0;
    for (size_t j = 1; j < k && !isnan(s[best]); j++)
        if (isnan(s[j]) || s[j] > s[best]) best = j;
    return best;
}

/* Every candidate of q into h->cands: tokens, ranking score score[j], nat score, length. */
static int keep_candidates(nz_nat_hyp *h, const mp_seq *q, const float *score, nz_error *err) {
    h->cands = nz_calloc(q->beam, sizeof *h->cands, NZ_MEM_OTHER);
    if (!h->cands) return nz_fail(err, NZ_E_NOMEM, "out of memory for the length candidates");
    h->n_cands = q->beam;
    for (size_t j = 0; j < q->beam; j++) {
        nz_nat_cand *c = &h->cands[j];
        c->tokens = nz_malloc(q->fn[j] * sizeof *c->tokens + 1, NZ_MEM_OTHER);
        if (!c->tokens) return nz_fail(err, NZ_E_NOMEM, "out of memory for the length candidates");
        if (q->fn[j]) memcpy(c->tokens, q->tok + j * q->W, q->fn[j] * sizeof *c->tokens);
        c->n = q->fn[j];
        c->score = score[j];
        c->nat_score = q->fscore[j];
        c->length = q->clen[j];
    }
    return NZ_OK;
}

/* q's hypothesis: the first best candidate (nat score, or AT score with rerank). @return NZ_OK or
 * NZ_E_NOMEM. */
static int seq_select(mp_seq *q, nz_error *err) {
    const float *score = q->o.rerank_at ? q->ascore : q->fscore;
    const size_t j = first_best(score, q->beam);
    nz_nat_hyp *hy = &q->hyp;
    int rc = nat_set_tokens(hy, q->tok + j * q->W, q->fn[j], err);
    if (rc) return rc;
    hy->score = score[j];
    hy->nat_score = q->fscore[j];
    hy->steps = q->fsteps[j];
    hy->length = q->clen[j];
    hy->candidate = j;
    return q->o.keep_candidates ? keep_candidates(hy, q, score, err) : NZ_OK;
}

/* fairseq rerank of the G sentences qs[G] done this step: the AT decoder's teacher-forced mean log-prob
 * of each candidate of >= 2 tokens (the others keep NaN), over their kept encoder rows, together.
 * @return NZ_OK or an error. */
static int rerank(nz_matmul_ctx *mc, const nz_nat *n, mp_seq **qs, size_t G, nz_error *err) {
    const size_t D = n->c.d_model;
    size_t S = 2, N = 0;
    for (size_t g = 0; g < G; g++) {
        if (qs[g]->len > S) S = qs[g]->len;
        N += qs[g]->beam;
    }
    int rc = NZ_OK;
    nz_nat_enc enc = {.B = G, .S = S, .D = D};
    enc.x = nz_calloc(G * S * D, sizeof *enc.x, NZ_MEM_ACTIVATIONS);
    enc.pad = nz_malloc(G * S, NZ_MEM_ACTIVATIONS);
    enc.len = nz_calloc(G, sizeof *enc.len, NZ_MEM_ACTIVATIONS);
    const int32_t **hp = nz_malloc(N * sizeof *hp, NZ_MEM_ACTIVATIONS);
    size_t *ml = nz_malloc(N * sizeof *ml, NZ_MEM_ACTIVATIONS);
    uint32_t *ms = nz_malloc(N * sizeof *ms, NZ_MEM_ACTIVATIONS);
    float *as = nz_malloc(N * sizeof *as, NZ_MEM_ACTIVATIONS);
    if (!enc.x || !enc.pad || !enc.len || !hp || !ml || !ms || !as)
        NZ_FAIL(NZ_E_NOMEM, "out of memory for reranking");
    size_t M = 0;
    for (size_t g = 0; g < G; g++) {
        mp_seq *q = qs[g];
        memcpy(enc.x + g * S * D, q->ex, q->len * D * sizeof *enc.x);
        memset(enc.pad + g * S, 1, S);
        memcpy(enc.pad + g * S, q->epad, q->len);
        for (size_t t = 0; t < q->len; t++) enc.len[g] += !q->epad[t];
        for (size_t j = 0; j < q->beam; j++)
            if (q->fn[j] >= 2) {
                hp[M] = q->tok + j * q->W;
                ml[M] = q->fn[j];
                ms[M++] = (uint32_t)g;
            }
        nz_free(q->ex); /* copied */
        nz_free(q->epad);
        q->ex = NULL;
        q->epad = NULL;
    }
    NZ_TRY(nz_nat_at_score(mc, n, &enc, hp, ml, ms, M, as, err));
    for (size_t g = 0, m = 0; g < G; g++)
        for (size_t j = 0; j < qs[g]->beam; j++)
            if (qs[g]->fn[j] >= 2) qs[g]->ascore[j] = as[m++];
done:
    nz_nat_enc_free(&enc);
    nz_free(hp);
    nz_free(ml);
    nz_free(ms);
    nz_free(as);
    return rc;
}

/* The running sentences whose every candidate ended are done: reranked (together), their hypotheses
 * chosen, and they leave. @return NZ_OK or an error. */
static int finish(nz_matmul_ctx *mc, nz_nat_mpb *b, nz_error *err) {
    size_t G = 0;
    for (mp_seq *q = b->seqs; q; q = q->link) G += q->state == M_RUNNING && !q->active && q->o.rerank_at;
    int rc = NZ_OK;
    if (G) {
        mp_seq **qs = nz_malloc(G * sizeof *qs, NZ_MEM_ACTIVATIONS);
        if (!qs) return nz_fail(err, NZ_E_NOMEM, "out of memory for reranking");
        G = 0;
        for (mp_seq *q = b->seqs; q; q = q->link)
            if (q->state == M_RUNNING && !q->active && q->o.rerank_at) qs[G++] = q;
        rc = rerank(mc, b->n, qs, G, err);
        nz_free(qs);
    }
    for (mp_seq *q = b->seqs; q && !rc; q = q->link) {
        if (q->state != M_RUNNING || q->active) continue;
        rc = seq_select(q, err);
        if (!rc) leave(b, q);
    }
    return rc;
}

int nz_nat_mpb_step(nz_matmul_ctx *mc, nz_nat_mpb *b, nz_error *err) {
    int rc = admit(mc, b, err);
    size_t running = 0;
    for (mp_seq *q = b->seqs; q; q = q->link) running += q->state == M_RUNNING;
    if (!rc && running && b->stop && b->stop(b->stop_arg))
        rc = nz_fail(err, NZ_E_CANCELLED, "mask-predict: cancelled before pass %zu", b->passes);
    if (!rc && running) {
        rc = pass_run(mc, b, err);
        b->passes++;
    }
    if (!rc) rc = finish(mc, b, err);
    if (rc) fail_seqs(b, rc, err);
    return rc;
}

/* Unlink q from the sentences. */
static void unlink_seq(nz_nat_mpb *b, mp_seq *q) {
    for (mp_seq **p = &b->seqs; *p; p = &(*p)->link)
        if (*p == q) {
            *p = q->link;
            b->nseqs--;
            return;
        }
}

int nz_nat_mpb_take(nz_nat_mpb *b, void **owner, nz_nat_hyp *hyp) {
    mp_seq *last = NULL; /* the oldest done sentence */
    for (mp_seq *q = b->seqs; q; q = q->link)
        if (q->state == M_DONE) last = q;
    if (!last) return 0;
    *owner = last->owner;
    *hyp = last->hyp;
    memset(&last->hyp, 0, sizeof last->hyp);
    unlink_seq(b, last);
    seq_free(last);
    return 1;
}

void nz_nat_mpb_remove(nz_nat_mpb *b, void *owner) {
    for (mp_seq *q = b->seqs; q; q = q->link)
        if (q->owner == owner) {
            leave(b, q);
            unlink_seq(b, q);
            seq_free(q);
            return;
        }
}

/* ------------------------------------------------------------------ mask-predict alone */

int nz_nat_mask_predict(nz_matmul_ctx *mc, const nz_nat *n, const int32_t *src, size_t B, size_t S,
                        const nz_nat_opts *o, nz_nat_hyp *hyps, nz_error *err) {
    nz_nat_opts def;
    if (!o) {
        nz_nat_opts_default(&def);
        o = &def;
    }
    size_t nv = 0;
    for (size_t k = 0; k < B; k++) {
        memset(&hyps[k], 0, sizeof hyps[k]);
        hyps[k].rc = nz_nat_check_source(n, src + k * S, S, NULL, &hyps[k].err);
        nv += !hyps[k].rc;
    }
    nz_nat_mpb *b = NULL;
    int rc = nat_mp_check_opts(n, o, err);
    if (!rc && nv) rc = nz_nat_mpb_create(n, &b, err);
    if (rc || !nv) goto done;
    b->on_width = o->on_width;
    b->width_arg = o->width_arg;
    b->stop = o->stop;
    b->stop_arg = o->stop_arg;
    for (size_t k = 0; k < B && !rc; k++)
        if (!hyps[k].rc) rc = nz_nat_mpb_add(b, src + k * S, S, o, &hyps[k], err);
    while (!rc && nz_nat_mpb_size(b)) {
        rc = nz_nat_mpb_step(mc, b, err);
        void *owner;
        nz_nat_hyp h;
        while (nz_nat_mpb_take(b, &owner, &h)) *(nz_nat_hyp *)owner = h;
    }
done:
    if (rc) nat_fail_all(hyps, B, err);
    nz_nat_mpb_free(b);
    return rc;
}
