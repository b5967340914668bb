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
 * one driver of the passes, not a second copy of them.
 */
#include "nz_nat_int.h"

#include "nz_kvslots.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

enum { M_PENDING = 0, M_RUNNING, M_DONE };

/* One sentence and its length candidates (beam of them, the widest W tokens long). */
typedef struct mp_seq {
    void *owner;
    nz_nat_opts o;  /* its options (hooks unused) */
    int32_t *src;   /* [len] its source until encoded */
    size_t len;     /* source ids */
    int state;      /* M_* */
    uint32_t enc;   /* its cross cache slot (running) */
    size_t beam, W; /* candidates, the longest's length (running) */
    size_t pass;    /* passes run */
    size_t active;  /* candidates still refining */
    size_t *clen;   /* [beam] their lengths incl. bos/eos */
    int32_t *tok;   /* [beam x W] tokens (a finished candidate: its fn[j] non-pad tokens first) */
    float *sc;      /* [beam x W] positional scores */
    size_t *fn;     /* [beam] a finished candidate's tokens */
    float *fscore;  /* [beam] its mean positional score */
    float *ascore;  /* [beam] its AT score (rerank) */
    int *fsteps;    /* [beam] the pass that finished it */
    uint8_t *fin;   /* [beam] finished */
    float *ex;      /* rerank: [len x D] its encoder output, until scored */
    uint8_t *epad;  /* rerank: [len] its padding */
    nz_nat_hyp hyp; /* its result once done */
    struct mp_seq *link;
} mp_seq;

struct nz_nat_mpb {
    const nz_nat *n;
    nz_kvenc
        cross;    /* the CMLM decoder's cross-attention caches (one per layer), a slot per running sentence */
    mp_seq *seqs; /* every sentence not taken, newest first */
    size_t nseqs;
    size_t passes; /* steps that ran a pass */
    /* nz_nat_mask_predict's hooks (nz_nat_mpb_add ignores o->on_width and o->stop) */
    void (*on_width)(void *arg, size_t W);
    void *width_arg;
    int (*stop)(void *arg);
    void *stop_arg;
};

/* ------------------------------------------------------------------ options, lengths */

/* nz_nat_mask_predict's option checks. @return NZ_OK or the error. */
static int mp_check_opts(const nz_nat *n, const nz_nat_opts *o, nz_error *err) {
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
static size_t mp_cand_len(const nz_nat *n, const nz_nat_opts *o, long L0, size_t j) {
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
    int rc = mp_check_opts(b->n, o, err);
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
        q->clen[j] = mp_cand_len(n, &q->o, L0, j);
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

typedef struct sort_key {
    float s;
    uint32_t i;
} sort_key;

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
    int rc = mp_check_opts(n, o, err);
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

/* ------------------------------------------------------------------ peak memory estimates */

/* The longest candidates mask-predict can make for sources of len[0..B) non-pad tokens: the length
 * predictor's largest class (length_classes - 1; with pred_length_offset that - 128 + the source length;
 * at least 2) is L0, candidate j is mp_cand_len (the prediction itself is only known after the encoder
 * ran). *sum receives the sum of the candidates' lengths. @return the widest (>= 2). */
static size_t mp_max_width(const nz_nat *n, const size_t *len, size_t B, const nz_nat_opts *o, double *sum) {
    size_t W = 2;
    *sum = 0;
    for (size_t b = 0; b < B; b++) {
        long L0 = (long)n->c.length_classes - 1;
        if (n->c.pred_length_offset) L0 = L0 - LENGTH_OFFSET + (long)(len ? len[b] : 0);
        L0 = L0 < 2 ? 2 : L0;
        for (size_t j = 0; j < (size_t)o->length_beam; j++) {
            const size_t L = mp_cand_len(n, o, L0, j);
            *sum += (double)L;
            if (L > W) W = L;
        }
    }
    return W;
}

/* The shape of B sentences of options o in a batch: sources of S ids (padded), their N candidates (sumL
 * tokens, the widest W; pass rows padded to Wp >= W), their cross cache slots (own of them) in caches of
 * ecap slots x scap positions. */
typedef struct mp_shape {
    double B, S, N, W, Wp, sumL, own, ecap, scap;
} mp_shape;

/* The sentences' own buffers while they run: their structs, candidate buffers (clen, tok, sc, fn, fscore,
 * ascore, fsteps, fin), kept encoder rows (rerank). */
static double cand_bytes(const nz_nat *n, const nz_nat_opts *o, const mp_shape *s) {
    const double D = (double)n->c.d_model, N = s->N;
    const double cand = 8 * N + 2 * (4 * N * s->W) + 8 * N + 3 * (4 * N) + 4 * N + N;
    const double ex = o->rerank_at ? s->B * (4 * s->S * D + 1 + s->S + 1) : 0;
    return s->B * sizeof(mp_seq) + cand + ex;
}

/* What the sentences hold while they run: cand_bytes and their cross cache slots. */
static double held_bytes(const nz_nat *n, const nz_nat_opts *o, const mp_shape *s) {
    const double D = (double)n->c.d_model, nl = (double)n->dec.nlayers;
    const double slots = nl * (8 * s->own * s->scap * D + s->own * s->scap) + s->own + 1;
    return cand_bytes(n, o, s) + slots;
}

/* A pass over the N candidates padded to Wp (pass_layout's buffers: bt, kvmap, aseq, aj, rows of the
 * masked cells (the first pass: all L - 2 inner ones), h, keys), then the decoder or the projection. */
static double pass_bytes(const nz_nat *n, const mp_shape *s) {
    const double D = (double)n->c.d_model, N = s->N, Wp = s->Wp, R = s->sumL - 2 * N;
    const double bufs =
        4 * N * Wp + 4 * N + 8 * N + 4 * N + 8 * R + 4 * N * Wp * D + sizeof(sort_key) * Wp + 7;
    return bufs + nat_dmax(nat_decoder_fwd_peak(n, 1, N, Wp, s->ecap, s->scap), nat_project_peak(n, R));
}

/* The AT rerank of the B sentences of s (finish: qs; rerank: the encoder rows regathered, hp, ml, ms, as,
 * nz_nat_at_score over the N candidates of <= W tokens). */
static double rerank_bytes(const nz_nat *n, const mp_shape *s) {
    const double N = s->N;
    const double bufs = nat_enc_bytes(s->B, s->S, (double)n->c.d_model) + 8 * N + 8 * N + 4 * N + 4 * N;
    return 8 * s->B + bufs + nat_at_score_peak(n, N, s->W - 1, s->sumL - N, s->B, s->S);
}

/* The end: the rerank or the results (tokens, NZ_MEM_OTHER; keep_candidates' are not counted). */
static double end_bytes(const nz_nat *n, const nz_nat_opts *o, const mp_shape *s) {
    const double hyps = s->B * (4 * s->W + 1);
    return o->rerank_at ? nat_dmax(hyps, rerank_bytes(n, s)) : hyps;
}

/* B sentences of sources S wide joining (admit, join): the source matrix and pointers, then the encoder,
 * the length prediction, the candidates laid out with the encoder held (held: the bytes the sentences
 * hold by then), the cross caches filled (tmp and nz_attn_cross_kv's projections). */
static double admit_bytes(const nz_nat *n, double B, double S, double held) {
    const double D = (double)n->c.d_model;
    const double bufs = 4 * B * S + 8 * B + 8 * B + 4 * B; /* src, qs, L0, slots */
    const double enc = nat_enc_bytes(B, S, D);
    const double lenpred = 4 * B * D + 4 * B * (double)n->c.length_classes; /* pooled, lo */
    const double fill = enc + held + 8 * B * S * D + B * S + 8 * B * S * D + 1;
    return bufs + nat_dmax(nat_dmax(nat_encode_peak(n, B, S), enc + lenpred), fill);
}

/* Joining: admit_bytes with the sentences' candidates and cross cache slots held. */
static double join_bytes(const nz_nat *n, const nz_nat_opts *o, const mp_shape *s) {
    return admit_bytes(n, s->B, s->S, held_bytes(n, o, s));
}

/* The batch's peak for shape s: while it joins (front), or held + a pass or the end. */
static double run_bytes(const nz_nat *n, const nz_nat_opts *o, const mp_shape *s, int front) {
    const double held = held_bytes(n, o, s);
    double peak = held + nat_dmax(pass_bytes(n, s), end_bytes(n, o, s));
    if (front) peak = nat_dmax(peak, join_bytes(n, o, s) + s->B * (4 * s->S + 1));
    return sizeof(nz_nat_mpb) + (double)(n->dec.nlayers ? n->dec.nlayers : 1) * sizeof(nz_kv) + peak;
}

uint64_t nz_nat_mask_predict_peak_bytes(const nz_nat *n, const size_t *len, size_t B, size_t S,
                                        const nz_nat_opts *o) {
    nz_nat_opts def;
    if (!o) {
        nz_nat_opts_default(&def);
        o = &def;
    }
    nz_error e;
    if (mp_check_opts(n, o, &e) || !B || !S) return 0; /* refused before anything is allocated */
    mp_shape s = {.B = (double)B,
                  .S = (double)S,
                  .N = (double)B * o->length_beam,
                  .own = (double)B,
                  .ecap = (double)B,
                  .scap = (double)S};
    s.W = s.Wp = (double)mp_max_width(n, len, B, o, &s.sumL);
    return nz_mem_bytes(run_bytes(n, o, &s, 1));
}

uint64_t nz_nat_mpb_member_bytes(const nz_nat_mpb *b, const void *owner) {
    const mp_seq *q = b->seqs;
    while (q && q->owner != owner) q = q->link;
    if (!q) return 0;
    if (q->state == M_DONE) { /* its result */
        double r = sizeof *q + 4.0 * (double)q->hyp.n + 1 + (double)q->hyp.n_cands * sizeof(nz_nat_cand);
        for (size_t j = 0; j < q->hyp.n_cands; j++) r += 4.0 * (double)q->hyp.cands[j].n + 1;
        return nz_mem_bytes(r);
    }
    const double S = (double)(q->len > 2 ? q->len : 2);
    mp_shape s = {.B = 1, .S = S, .N = (double)q->beam, .own = 1, .ecap = 1, .scap = S};
    if (b->cross.ecap) s.ecap = (double)b->cross.ecap;
    if ((double)b->cross.scap > s.scap) s.scap = (double)b->cross.scap;
    if (q->state == M_PENDING) {
        s.W = s.Wp = (double)mp_max_width(b->n, &q->len, 1, &q->o, &s.sumL);
        return nz_mem_bytes(run_bytes(b->n, &q->o, &s, 1));
    }
    /* running: its candidates are known; a pass pads them to the batch's widest active candidate */
    s.W = s.Wp = (double)q->W;
    for (size_t j = 0; j < q->beam; j++) s.sumL += (double)q->clen[j];
    for (const mp_seq *r = b->seqs; r; r = r->link)
        for (size_t j = 0; r->state == M_RUNNING && j < r->beam; j++)
            if (!r->fin[j] && (double)r->clen[j] > s.Wp) s.Wp = (double)r->clen[j];
    return nz_mem_bytes(run_bytes(b->n, &q->o, &s, 0));
}

/* ------------------------------------------------------------------ the batch's bound */

/* The demand of a batch's sentences (and joiners) on its shared buffers and its steps. */
typedef struct mp_need {
    double seqs;   /* every sentence's own bytes (mp_seq_bytes) */
    size_t enc;    /* sentences not done (cross cache slots) */
    size_t Bp, Sp; /* sentences admitted at the next step, their source width (admit: >= 2) */
    mp_shape pass; /* a pass over every candidate not ended: N, Wp (the widest), sumL */
    mp_shape rr;   /* the rerank of every sentence with rerank_at not done: B, S, N, W, sumL */
} mp_need;

/* A sentence's result, its candidates at most W long: tokens (<= W, + 1; NZ_MEM_OTHER), with
 * keep_candidates every candidate's (the nz_nat_cand array, tokens + 1 each), and the out bytes a token
 * (+ 1) its caller adds to the result and to each kept candidate when it takes them. */
static double mp_res_bytes(const nz_nat_opts *o, double beam, double W, double out) {
    const double cands = o->keep_candidates ? beam * (sizeof(nz_nat_cand) + 4 * W + 1 + out * W + 1) : 0;
    return 4 * W + 1 + out * W + 1 + cands;
}

/* What a sentence of options o holds from nz_nat_mpb_add until it is done, its beam candidates at most W
 * long: cand_bytes, its source until it joins (pending), and its result. */
static double mp_seq_bytes(const nz_nat *n, const nz_nat_opts *o, double len, double beam, double W,
                           int pending, double out) {
    const mp_shape s = {.B = 1, .S = len, .N = beam, .W = W};
    return cand_bytes(n, o, &s) + (pending ? 4 * len + 1 : 0) + mp_res_bytes(o, beam, W, out);
}

/* Count a sentence not done (pending: its candidates at the longest, W wide, sumL tokens in all; running:
 * q's): its bytes, its slot, its candidates in the passes (the active ones) and the rerank. */
static void need_seq(const nz_nat *n, mp_need *u, const nz_nat_opts *o, size_t len, const mp_seq *q,
                     double out) {
    const double beam = (double)o->length_beam;
    double W, sumL, A, Wa, La;
    if (!q) {
        W = Wa = (double)mp_max_width(n, &len, 1, o, &sumL);
        A = beam;
        La = sumL;
        u->Bp++;
        if (len > u->Sp) u->Sp = len;
    } else {
        W = (double)q->W;
        sumL = A = Wa = La = 0;
        for (size_t j = 0; j < q->beam; j++) {
            sumL += (double)q->clen[j];
            if (q->fin[j]) continue; /* it ended: in no pass */
            A++;
            La += (double)q->clen[j];
            Wa = nat_dmax(Wa, (double)q->clen[j]);
        }
    }
    u->seqs += mp_seq_bytes(n, o, (double)len, beam, W, !q, out);
    u->enc++;
    u->pass.N += A;
    u->pass.Wp = nat_dmax(u->pass.Wp, Wa);
    u->pass.sumL += La;
    if (!o->rerank_at) return;
    u->rr.B++;
    u->rr.S = nat_dmax(u->rr.S, (double)len);
    u->rr.N += beam;
    u->rr.W = nat_dmax(u->rr.W, W);
    u->rr.sumL += sumL;
}

void nz_nat_mpb_bound(const nz_nat *n, const nz_nat_mpb *b, const size_t *lens, size_t nj,
                      const nz_nat_opts *o, size_t out, nz_nat_bound *r) {
    nz_nat_mpb fresh; /* b as nz_nat_mpb_create leaves it */
    if (!b) {
        memset(&fresh, 0, sizeof fresh);
        fresh.cross.n = n->dec.nlayers;
        fresh.cross.D = n->c.d_model;
        b = &fresh;
    }
    nz_nat_opts def;
    if (nj && !o) {
        nz_nat_opts_default(&def);
        o = &def;
    }
    const double dout = (double)out;
    mp_need u = {.Sp = 2, .rr = {.S = 2}};
    for (const mp_seq *q = b->seqs; q; q = q->link) {
        if (q->state == M_DONE) { /* its struct and result (its candidates are dropped) */
            u.seqs += sizeof(mp_seq) + mp_res_bytes(&q->o, (double)q->beam, (double)q->W, dout);
            continue;
        }
        need_seq(n, &u, &q->o, q->len, q->state == M_RUNNING ? q : NULL, dout);
    }
    nz_error e;
    for (size_t i = 0; nj && !mp_check_opts(n, o, &e) && i < nj; i++) need_seq(n, &u, o, lens[i], NULL, dout);
    size_t E;
    const double cross = nz_kvenc_bound(&b->cross, u.enc, u.Bp ? u.Sp : 0, &E);
    const double held = sizeof(nz_nat_mpb) + cross + u.seqs;
    /* a step: the joiners' admission (their candidates and slots: in held), a pass over the active
     * candidates padded to the widest, reading cross caches of E x their width, then the rerank */
    const double admit = u.Bp ? admit_bytes(n, (double)u.Bp, (double)u.Sp, 0) : 0;
    u.pass.ecap = (double)E;
    u.pass.scap = (double)(u.Bp && u.Sp > b->cross.scap ? u.Sp : b->cross.scap);
    const double pass = u.pass.N ? pass_bytes(n, &u.pass) : 0;
    const double rr = u.rr.B ? rerank_bytes(n, &u.rr) : 0;
    r->held = nz_mem_bytes(held);
    r->step = nz_mem_bytes(nat_dmax(admit, nat_dmax(pass, rr)));
}
