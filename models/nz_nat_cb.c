/*
 * nz_nat_cb.c — continuous batching of AT greedy and beam decoding (see nz_nat.h, nz_nat_cb_*).
 *
 * Each greedy sentence is one decoder row in a slot of the self-attention caches (nz_kvself), each beam
 * sentence K rows in K slots: a sentence that joins when the caches hold P positions writes its keys
 * from P on, its positions [0, P) are padding, and its token positions (fairseq make_positions) count
 * from its own first step, so its keys, queries and log-probs are those it has alone (attention skips
 * padded keys, the GEMMs are row-invariant). Its encoder states live in a slot of the cross-attention
 * caches (nz_kvenc). Sentences added between steps are encoded together at the next step; a sentence
 * leaves at its eos (greedy) or when its search is finished (beam), giving its slots back.
 *
 * A beam sentence runs nz_nat_at_beam's bookkeeping (nat_beam_row, nat_beam_select, nat_beam_result in
 * nz_nat.c) on its own rows: after each step its K rows take their parents' caches (nz_kvself_permute,
 * where nz_nat_at_beam uses nz_kv_select) and tokens. Its rows stay K until it is done, as in
 * nz_nat_at_beam (a sentence's live beam never shrinks there: it keeps K rows until it finishes).
 */
#include "nz_nat_int.h"

#include "nz_kvslots.h"

#include <math.h>
#include <string.h>

enum { S_PENDING = 0, S_RUNNING, S_DONE };

enum { CB_TCAP0 = 16 }; /* self-attention positions a new batch starts with */

/* A beam sentence's search: the buffers of its nat_beam (K rows, kk candidates per row, cap =
 * max_len + 1 tokens per row). */
typedef struct cb_beam {
    size_t kk;             /* candidates kept per row */
    float lenpen;          /* length penalty */
    size_t fcnt;           /* hypotheses finalized */
    int32_t *hist, *hist2; /* [K x cap] the rows' tokens: before this step, after it */
    int32_t *ftok;         /* [K x cap] the finalized hypotheses' tokens */
    size_t *fn;            /* [K] their token counts */
    float *fsc;            /* [K] their normalized scores */
    float *cum, *cum2;     /* [K] the rows' cumulative scores: before this step, after it */
    int32_t *cur;          /* [K] the rows' next input tokens */
    uint32_t *order;       /* [K] each row's parent row after a step */
    uint32_t *ctok;        /* [K x kk] a step's candidates of each row: tokens */
    float *cval;           /* [K x kk] and cumulative scores */
    nat_beam_cand *pool;   /* [K x kk] nat_beam_select's scratch */
    uint8_t *ignore;       /* [K] fairseq's cands_to_ignore */
    uint8_t *em;           /* [2 K] nat_beam_select's scratch */
} cb_beam;

typedef struct cb_seq {
    void *owner;
    int32_t *src;   /* [len] its source until encoded */
    size_t len;     /* source ids */
    size_t max_len; /* as decoded alone (nat_at_setup over max(2, len)) */
    size_t min_len;
    size_t K;        /* decoder rows: 1 (greedy) or its beam (nat_beam_setup) */
    uint32_t enc;    /* its cross cache slot (running) */
    uint32_t *slots; /* [K] its self cache slots (running), nslots of them taken */
    size_t nslots;
    int32_t *tok;   /* greedy: [max_len + 1] generated */
    size_t n;       /* steps run: tokens generated so far */
    double lpsum;   /* greedy: their log-probs, summed */
    int32_t next;   /* greedy: this step's pick */
    cb_beam *bm;    /* beam: its search, else NULL */
    int state;      /* S_* */
    nz_nat_hyp hyp; /* its result once done */
    struct cb_seq *link;
} cb_seq;

struct nz_nat_cb {
    const nz_nat *n;
    nz_kvself self;  /* the rows' self-attention caches */
    nz_kvenc cross;  /* the sentences' cross-attention caches (one per AT layer) */
    cb_seq **rows;   /* [ncap] running sentences in step order (nrows) */
    size_t nrows;    /* running sentences */
    size_t ndec;     /* their decoder rows (sum of K) */
    size_t ncap;     /* room of the per-row arrays (>= ndec) */
    int32_t *cur;    /* [ncap] a step's input tokens */
    int64_t *starts; /* [ncap] their position offsets: tokens generated so far */
    uint32_t *slots; /* [ncap] self cache slot of each row */
    uint32_t *encs;  /* [ncap] cross cache slot of each row */
    cb_seq **rseq;   /* [ncap] sentence of each row */
    uint32_t *rj;    /* [ncap] and its row in the sentence (0..K-1) */
    size_t *prow;    /* [ncap] the rows to project */
    float *x;        /* [ncap x D] hidden states */
    float *tmp;      /* [V] scratch of nat_greedy_pick / nat_beam_row */
    cb_seq *seqs;    /* every sentence not taken, newest first */
    size_t nseqs;
};

int nz_nat_cb_create(const nz_nat *n, nz_nat_cb **out, nz_error *err) {
    *out = NULL;
    if (!n->c.at_layers)
        return nz_fail(err, NZ_E_UNSUPPORTED,
                       "AT decoding needs an AT decoder (config.json has no at_decoder_layers)");
    nz_nat_cb *cb = nz_calloc(1, sizeof *cb, NZ_MEM_ACTIVATIONS);
    if (!cb) return nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch");
    cb->n = n;
    int rc = nz_kvself_init(&cb->self, n->at.nlayers, n->c.d_model, CB_TCAP0, err);
    if (!rc) rc = nz_kvenc_init(&cb->cross, n->at.nlayers, n->c.d_model, err);
    cb->tmp = nz_malloc(n->c.vocab * sizeof *cb->tmp, NZ_MEM_ACTIVATIONS);
    if (!rc && !cb->tmp) rc = nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch");
    if (rc) {
        nz_nat_cb_free(cb);
        return rc;
    }
    *out = cb;
    return NZ_OK;
}

static void beam_free(cb_beam *b) {
    if (!b) return;
    nz_free(b->hist);
    nz_free(b->hist2);
    nz_free(b->ftok);
    nz_free(b->fn);
    nz_free(b->fsc);
    nz_free(b->cum);
    nz_free(b->cum2);
    nz_free(b->cur);
    nz_free(b->order);
    nz_free(b->ctok);
    nz_free(b->cval);
    nz_free(b->pool);
    nz_free(b->ignore);
    nz_free(b->em);
    nz_free(b);
}

/* A beam search of K rows, kk candidates each, cap tokens per row. @return it, or NULL (out of memory). */
static cb_beam *beam_new(size_t K, size_t kk, size_t cap, float lenpen) {
    cb_beam *b = nz_calloc(1, sizeof *b, NZ_MEM_ACTIVATIONS);
    if (!b) return NULL;
    b->kk = kk;
    b->lenpen = lenpen;
    b->hist = nz_malloc(K * cap * sizeof *b->hist, NZ_MEM_ACTIVATIONS);
    b->hist2 = nz_malloc(K * cap * sizeof *b->hist2, NZ_MEM_ACTIVATIONS);
    b->ftok = nz_malloc(K * cap * sizeof *b->ftok, NZ_MEM_ACTIVATIONS);
    b->fn = nz_calloc(K, sizeof *b->fn, NZ_MEM_ACTIVATIONS);
    b->fsc = nz_calloc(K, sizeof *b->fsc, NZ_MEM_ACTIVATIONS);
    b->cum = nz_calloc(K, sizeof *b->cum, NZ_MEM_ACTIVATIONS);
    b->cum2 = nz_calloc(K, sizeof *b->cum2, NZ_MEM_ACTIVATIONS);
    b->cur = nz_malloc(K * sizeof *b->cur, NZ_MEM_ACTIVATIONS);
    b->order = nz_malloc(K * sizeof *b->order, NZ_MEM_ACTIVATIONS);
    b->ctok = nz_malloc(K * kk * sizeof *b->ctok, NZ_MEM_ACTIVATIONS);
    b->cval = nz_malloc(K * kk * sizeof *b->cval, NZ_MEM_ACTIVATIONS);
    b->pool = nz_malloc(K * kk * sizeof *b->pool, NZ_MEM_ACTIVATIONS);
    b->ignore = nz_calloc(K, 1, NZ_MEM_ACTIVATIONS);
    b->em = nz_malloc(2 * K, NZ_MEM_ACTIVATIONS);
    if (!b->hist || !b->hist2 || !b->ftok || !b->fn || !b->fsc || !b->cum || !b->cum2 || !b->cur ||
        !b->order || !b->ctok || !b->cval || !b->pool || !b->ignore || !b->em) {
        beam_free(b);
        return NULL;
    }
    return b;
}

/* q's search as nat_beam sees it. */
static nat_beam beam_view(const cb_seq *q, size_t V) {
    cb_beam *b = q->bm;
    return (nat_beam){.K = q->K,
                      .kk = b->kk,
                      .V = V,
                      .cap = q->max_len + 1,
                      .max_len = q->max_len,
                      .lenpen = b->lenpen,
                      .ctok = b->ctok,
                      .cval = b->cval,
                      .hist = b->hist,
                      .ignore = b->ignore,
                      .ftok = b->ftok,
                      .fn = b->fn,
                      .fsc = b->fsc,
                      .fcnt = &b->fcnt,
                      .pool = b->pool,
                      .em = b->em};
}

static void seq_free(cb_seq *q) {
    if (!q) return;
    nz_nat_hyps_free(&q->hyp, 1);
    nz_free(q->src);
    nz_free(q->slots);
    nz_free(q->tok);
    beam_free(q->bm);
    nz_free(q);
}

void nz_nat_cb_free(nz_nat_cb *cb) {
    if (!cb) return;
    for (cb_seq *q = cb->seqs, *nx; q; q = nx) {
        nx = q->link;
        seq_free(q);
    }
    nz_kvself_free(&cb->self);
    nz_kvenc_free(&cb->cross);
    nz_free(cb->rows);
    nz_free(cb->cur);
    nz_free(cb->starts);
    nz_free(cb->slots);
    nz_free(cb->encs);
    nz_free(cb->rseq);
    nz_free(cb->rj);
    nz_free(cb->prow);
    nz_free(cb->x);
    nz_free(cb->tmp);
    nz_free(cb);
}

size_t nz_nat_cb_rows(const nz_nat_cb *cb) { return cb->nrows; }

size_t nz_nat_cb_decoder_rows(const nz_nat_cb *cb) { return cb->ndec; }

size_t nz_nat_cb_size(const nz_nat_cb *cb) { return cb->nseqs; }

/* Add a sentence: greedy, or (is_beam) a beam search of beam, lenpen. */
static int add_seq(nz_nat_cb *cb, const int32_t *src, size_t len, const nz_nat_at_opts *o, int is_beam,
                   int beam, float lenpen, void *owner, nz_error *err) {
    size_t max_len = 0, K = 1, kk = 0;
    int rc = nat_at_setup(cb->n, o, len > 2 ? len : 2, &max_len, err); /* the width it has alone */
    if (!rc && is_beam) rc = nat_beam_setup(cb->n, beam, lenpen, &K, &kk, err);
    if (!rc) rc = nz_nat_check_source(cb->n, src, len, NULL, err);
    if (rc) return rc;
    cb_seq *q = nz_calloc(1, sizeof *q, NZ_MEM_ACTIVATIONS);
    if (q) {
        q->src = nz_malloc(len * sizeof *src + 1, NZ_MEM_ACTIVATIONS);
        q->slots = nz_malloc(K * sizeof *q->slots, NZ_MEM_ACTIVATIONS);
        if (is_beam)
            q->bm = beam_new(K, kk, max_len + 1, lenpen);
        else
            q->tok = nz_malloc((max_len + 1) * sizeof *q->tok, NZ_MEM_ACTIVATIONS);
    }
    if (!q || !q->src || !q->slots || !(is_beam ? (void *)q->bm : (void *)q->tok)) {
        seq_free(q);
        return nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch member");
    }
    memcpy(q->src, src, len * sizeof *src);
    q->len = len;
    q->max_len = max_len;
    q->min_len = (size_t)o->min_len;
    q->K = K;
    q->owner = owner;
    q->link = cb->seqs;
    cb->seqs = q;
    cb->nseqs++;
    return NZ_OK;
}

int nz_nat_cb_add(nz_nat_cb *cb, const int32_t *src, size_t len, const nz_nat_at_opts *o, void *owner,
                  nz_error *err) {
    return add_seq(cb, src, len, o, 0, 1, 0.0f, owner, err);
}

int nz_nat_cb_add_beam(nz_nat_cb *cb, const int32_t *src, size_t len, const nz_nat_at_opts *o, int beam,
                       float lenpen, void *owner, nz_error *err) {
    return add_seq(cb, src, len, o, 1, beam, lenpen, owner, err);
}

/* Room for n decoder rows in rows and the step buffers. */
static int reserve_rows(nz_nat_cb *cb, size_t n, nz_error *err) {
    if (n <= cb->ncap) return NZ_OK;
    const size_t m = nz_grow_cap(cb->ncap, n), D = cb->n->c.d_model;
    if (nz_resize_array(&cb->rows, m, sizeof *cb->rows, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->cur, m, sizeof *cb->cur, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->starts, m, sizeof *cb->starts, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->slots, m, sizeof *cb->slots, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->encs, m, sizeof *cb->encs, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->rseq, m, sizeof *cb->rseq, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->rj, m, sizeof *cb->rj, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->prow, m, sizeof *cb->prow, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->x, m * D, sizeof *cb->x, NZ_MEM_ACTIVATIONS))
        return nz_fail(err, NZ_E_NOMEM, "out of memory for %zu decoder rows", m);
    cb->ncap = m;
    return NZ_OK;
}

/* q's cache slots (those taken) are free again. */
static void seq_release(nz_nat_cb *cb, cb_seq *q) {
    if (q->state != S_RUNNING) return;
    for (size_t j = 0; j < q->nslots; j++) nz_kvself_give(&cb->self, q->slots[j]);
    q->nslots = 0;
    nz_kvenc_give(&cb->cross, q->enc);
}

/* The B pending sentences qs[B] (encoded, their cross slots taken) take their self cache slots and join
 * the running rows. */
static int join_rows(nz_nat_cb *cb, cb_seq **qs, size_t B, nz_error *err) {
    size_t rows = 0;
    for (size_t b = 0; b < B; b++) rows += qs[b]->K;
    int rc = reserve_rows(cb, cb->ndec + rows, err);
    for (size_t b = 0; b < B && !rc; b++) {
        cb_seq *q = qs[b];
        while (q->nslots < q->K && !rc) {
            rc = nz_kvself_take(&cb->self, &q->slots[q->nslots], err);
            if (!rc) q->nslots++;
        }
        if (rc) break;
        nz_free(q->src);
        q->src = NULL;
        cb->rows[cb->nrows++] = q;
        cb->ndec += q->K;
    }
    return rc;
}

/* Encode the pending sentences together, fill their cross caches and add their rows. */
static int admit(nz_matmul_ctx *mc, nz_nat_cb *cb, nz_error *err) {
    const nz_nat *n = cb->n;
    size_t B = 0, S = 2;
    for (cb_seq *q = cb->seqs; q; q = q->link)
        if (q->state == S_PENDING) {
            B++;
            if (q->len > S) S = q->len;
        }
    if (!B) return NZ_OK;
    int rc = NZ_OK;
    int32_t *src = nz_malloc(B * S * sizeof *src, NZ_MEM_ACTIVATIONS);
    uint32_t *slots = nz_malloc(B * sizeof *slots, NZ_MEM_ACTIVATIONS);
    cb_seq **qs = nz_malloc(B * sizeof *qs, NZ_MEM_ACTIVATIONS);
    nz_nat_enc enc;
    memset(&enc, 0, sizeof enc);
    nz_kv tmp;
    memset(&tmp, 0, sizeof tmp);
    if (!src || !slots || !qs) NZ_FAIL(NZ_E_NOMEM, "out of memory admitting %zu sentences", B);
    size_t b = B;
    for (cb_seq *q = cb->seqs; q; q = q->link) /* oldest first: the list is newest first */
        if (q->state == S_PENDING) qs[--b] = q;
    for (b = 0; b < B; b++) /* right-padded, as nz_translator batches */
        for (size_t j = 0; j < S; j++) src[b * S + j] = j < qs[b]->len ? qs[b]->src[j] : NZ_NAT_PAD;
    NZ_TRY(nz_nat_encode(mc, n, src, B, S, &enc, err));
    NZ_TRY(nz_kvenc_take(&cb->cross, B, S, slots, err));
    for (b = 0; b < B; b++) {
        qs[b]->enc = slots[b];
        qs[b]->state = S_RUNNING; /* its slots are taken: given back when it is done (seq_release) */
    }
    NZ_TRY(nz_kv_init(&tmp, B, S, n->c.d_model, err));
    for (size_t l = 0; l < n->at.nlayers; l++) {
        NZ_TRY(nz_attn_cross_kv(mc, &n->at.layers[l].cross, enc.x, B, S, enc.pad, &tmp, err));
        for (b = 0; b < B; b++) nz_kvenc_fill(&cb->cross, l, slots[b], &tmp, b);
    }
    NZ_TRY(join_rows(cb, qs, B, err));
done:
    nz_kv_free(&tmp);
    nz_nat_enc_free(&enc);
    nz_free(src);
    nz_free(slots);
    nz_free(qs);
    return rc;
}

/* Running sentence i leaves: its slots are free again, it is done. */
static void leave(nz_nat_cb *cb, size_t i) {
    cb_seq *q = cb->rows[i];
    seq_release(cb, q);
    q->state = S_DONE;
    cb->ndec -= q->K;
    memmove(cb->rows + i, cb->rows + i + 1, (cb->nrows - i - 1) * sizeof *cb->rows);
    cb->nrows--;
}

/* A failed step: every sentence not done is, with the error. */
static void fail_all_seqs(nz_nat_cb *cb, int rc, const nz_error *err) {
    for (cb_seq *q = cb->seqs; q; q = q->link)
        if (q->state != S_DONE) {
            q->hyp.rc = rc;
            q->hyp.err = *err;
        }
    while (cb->nrows) leave(cb, cb->nrows - 1);
    for (cb_seq *q = cb->seqs; q; q = q->link) {
        seq_release(cb, q); /* one that failed to join */
        q->state = S_DONE;
    }
}

/* The step's decoder rows, each running sentence's K in turn: inputs, positions, slots; *P receives the
 * rows to project (a beam sentence's row 0 only at its first step, as nz_nat_at_beam). @return the rows. */
static size_t gather_rows(nz_nat_cb *cb, size_t *P) {
    size_t r = 0, p = 0;
    for (size_t i = 0; i < cb->nrows; i++) {
        cb_seq *q = cb->rows[i];
        const size_t proj = q->bm && !q->n ? 1 : q->K;
        for (size_t j = 0; j < q->K; j++, r++) {
            /* fairseq starts from eos */
            cb->cur[r] = !q->n ? NZ_NAT_EOS : q->bm ? q->bm->cur[j] : q->tok[q->n - 1];
            cb->starts[r] = (int64_t)q->n;
            cb->slots[r] = q->slots[j];
            cb->encs[r] = q->enc;
            cb->rseq[r] = q;
            cb->rj[r] = (uint32_t)j;
            if (j < proj) cb->prow[p++] = r;
        }
    }
    *P = p;
    return r;
}

static void pick_row(void *ctx, size_t i, const float *lp) {
    nz_nat_cb *cb = ctx;
    const size_t r = cb->prow[i], V = cb->n->c.vocab;
    cb_seq *q = cb->rseq[r];
    if (q->bm) {
        cb_beam *b = q->bm;
        const size_t j = cb->rj[r];
        nat_beam_row(lp, V, q->n, q->max_len, q->min_len, b->cum[j], b->kk, cb->tmp, b->ctok + j * b->kk,
                     b->cval + j * b->kk);
        return;
    }
    q->next = nat_greedy_pick(lp, V, q->n, q->max_len, q->min_len, cb->tmp);
    q->lpsum += lp[q->next];
}

/* One decoder step over the N rows gathered, the P listed in prow projected into the sentences' picks. */
static int decode(nz_matmul_ctx *mc, nz_nat_cb *cb, size_t N, size_t P, nz_error *err) {
    const nz_nat *n = cb->n;
    int rc = nat_stack_embed(mc, n, &n->at, cb->cur, N, 1, 0, cb->starts, 1, cb->x, err);
    if (rc) return rc;
    nz_block_io io;
    memset(&io, 0, sizeof io);
    io.B = N;
    io.T = 1;
    io.causal = 1;
    io.self_rows = cb->slots;
    io.kv_map = cb->encs;
    rc = nat_stack_layers(mc, &n->at, cb->x, &io, cb->self.kv, cb->cross.kv, err);
    if (rc) return rc;
    return nat_project_rows(mc, n, cb->x, cb->prow, P, pick_row, cb, err);
}

/* A greedy sentence takes its pick. @return whether it is done (eos, or no eos within max_len). */
static int greedy_next(cb_seq *q) {
    q->tok[q->n++] = q->next;
    if (q->next != NZ_NAT_EOS) {
        if (q->n <= q->max_len) return 0;
        /* step max_len made no eos (min_len > max_len): as nz_nat_at_greedy */
        q->hyp.rc = nz_fail(&q->hyp.err, NZ_E_RANGE, "no eos within max_len %zu (min_len %d)", q->max_len,
                            (int)q->min_len);
        return 1;
    }
    nz_error e = {0};
    if (nat_set_tokens(&q->hyp, q->tok, q->n, &e)) {
        q->hyp.rc = e.code;
        q->hyp.err = e;
    }
    q->hyp.score = (float)(q->lpsum / (double)q->n);
    q->hyp.nat_score = NAN;
    q->hyp.steps = (int)q->n;
    return 1;
}

/* Whether order[K] is 0..K-1. */
static int is_identity(const uint32_t *order, size_t K) {
    for (size_t j = 0; j < K; j++)
        if (order[j] != j) return 0;
    return 1;
}

/* A beam sentence's selection after its step: done (its result set), or its rows take their parents'
 * caches and tokens. @return NZ_OK or the reorder's error. */
static int beam_next(nz_nat_cb *cb, cb_seq *q, int *done, nz_error *err) {
    cb_beam *b = q->bm;
    const nat_beam v = beam_view(q, cb->n->c.vocab);
    *done = nat_beam_select(&v, q->n, b->hist2, b->cur, b->cum2, b->order) || q->n == q->max_len;
    if (*done) {
        nz_error e = {0};
        if (nat_beam_result(&q->hyp, &v, (int)q->min_len, &e)) {
            q->hyp.rc = e.code;
            q->hyp.err = e;
        }
        return NZ_OK;
    }
    /* beam reorder of the self-attention caches: row j takes its parent order[j]'s */
    if (!is_identity(b->order, q->K)) {
        int rc = nz_kvself_permute(&cb->self, q->slots, b->order, q->K, err);
        if (rc) return rc;
    }
    int32_t *th = b->hist;
    b->hist = b->hist2;
    b->hist2 = th;
    float *tc = b->cum;
    b->cum = b->cum2;
    b->cum2 = tc;
    q->n++;
    return NZ_OK;
}

/* After a step: each running sentence takes its pick(s); those done leave. @return NZ_OK or an error. */
static int advance(nz_nat_cb *cb, nz_error *err) {
    for (size_t i = cb->nrows; i-- > 0;) { /* backwards: rows leave */
        cb_seq *q = cb->rows[i];
        int done = 0;
        if (q->bm) {
            int rc = beam_next(cb, q, &done, err);
            if (rc) return rc;
        } else {
            done = greedy_next(q);
        }
        if (done) leave(cb, i);
    }
    return NZ_OK;
}

int nz_nat_cb_step(nz_matmul_ctx *mc, nz_nat_cb *cb, nz_error *err) {
    int rc = admit(mc, cb, err);
    if (!rc && cb->nrows) rc = nz_kvself_room(&cb->self, err);
    if (!rc && cb->nrows) {
        size_t P = 0;
        const size_t N = gather_rows(cb, &P);
        rc = decode(mc, cb, N, P, err);
    }
    if (!rc) rc = advance(cb, err);
    if (rc) {
        fail_all_seqs(cb, rc, err);
        return rc;
    }
    return NZ_OK;
}

/* Unlink q from the sentences. */
static void unlink_seq(nz_nat_cb *cb, cb_seq *q) {
    for (cb_seq **p = &cb->seqs; *p; p = &(*p)->link)
        if (*p == q) {
            *p = q->link;
            cb->nseqs--;
            return;
        }
}

int nz_nat_cb_take(nz_nat_cb *cb, void **owner, nz_nat_hyp *hyp) {
    cb_seq *last = NULL; /* the oldest done sentence */
    for (cb_seq *q = cb->seqs; q; q = q->link)
        if (q->state == S_DONE) last = q;
    if (!last) return 0;
    *owner = last->owner;
    *hyp = last->hyp;
    memset(&last->hyp, 0, sizeof last->hyp);
    unlink_seq(cb, last);
    seq_free(last);
    return 1;
}

void nz_nat_cb_remove(nz_nat_cb *cb, void *owner) {
    for (cb_seq *q = cb->seqs; q; q = q->link) {
        if (q->owner != owner) continue;
        for (size_t i = 0; i < cb->nrows; i++)
            if (cb->rows[i] == q) {
                leave(cb, i);
                break;
            }
        unlink_seq(cb, q);
        seq_free(q);
        return;
    }
}

/* ------------------------------------------------------------------ memory bound */

/* What a sentence holds from nz_nat_cb_add(_beam) until it is taken (every buffer allocated whole when it
 * is added), counted as nz_malloc counts it: its struct, its source until it joins (pending), its slots
 * (K), greedy its tokens (max_len + 1), beam its search (beam_new: cb_beam; hist, hist2, ftok of K x cap
 * int32; fn (K size_t); fsc, cum, cum2, cur, order (K x 4 each); ctok, cval (K x kk x 4 each); pool (K x
 * kk); ignore (K); em (2 K)); then its result (nat_set_tokens: <= cap tokens + 1, NZ_MEM_OTHER) and the out
 * bytes a token (+ 1) its caller adds when it takes it. */
static double cb_seq_bytes(double len, int pending, int beam, double K, double kk, double max_len,
                           double out) {
    const double cap = max_len + 1;
    double b = sizeof(cb_seq) + (pending ? 4 * len + 1 : 0) + 4 * K;
    if (beam)
        b += sizeof(cb_beam) + 3 * (4 * K * cap) + 8 * K + 5 * (4 * K) + 2 * (4 * K * kk) +
             sizeof(nat_beam_cand) * K * kk + K + 2 * K;
    else
        b += 4 * cap;
    return b + 4 * cap + 1 + out * cap + 1;
}

/* The demand of a batch's sentences (and joiners) on its shared buffers. */
typedef struct cb_need {
    double seqs;    /* cb_seq_bytes of every sentence */
    size_t rows;    /* decoder rows in use at once (self cache slots): running + to be admitted */
    size_t enc;     /* sentences not done (cross cache slots) */
    size_t Bp, Sp;  /* sentences admitted at the next step, their source width (admit: >= 2) */
    size_t pos;     /* the most positions a sentence runs (max_len + 1) */
    size_t permute; /* the widest beam (nz_kvself_permute) */
} cb_need;

static void need_seq(cb_need *u, int state, size_t len, int beam, size_t K, size_t kk, size_t max_len,
                     double out) {
    u->seqs +=
        cb_seq_bytes((double)len, state == S_PENDING, beam, (double)K, (double)kk, (double)max_len, out);
    if (state == S_DONE) return; /* its slots are given back */
    u->rows += K;
    u->enc++;
    if (max_len + 1 > u->pos) u->pos = max_len + 1;
    if (beam && K > u->permute) u->permute = K;
    if (state == S_PENDING) {
        u->Bp++;
        if (len > u->Sp) u->Sp = len;
    }
}

void nz_nat_cb_bound(const nz_nat *n, const nz_nat_cb *cb, const size_t *lens, size_t nj,
                     const nz_nat_at_opts *o, int beam, size_t out, nz_nat_bound *r) {
    nz_nat_cb fresh; /* cb as nz_nat_cb_create leaves it */
    if (!cb) {
        memset(&fresh, 0, sizeof fresh);
        fresh.self.L = n->at.nlayers;
        fresh.self.D = n->c.d_model;
        fresh.self.tcap = CB_TCAP0;
        fresh.cross.n = n->at.nlayers;
        fresh.cross.D = n->c.d_model;
        cb = &fresh;
    }
    nz_nat_at_opts def;
    if (nj && !o) {
        nz_nat_at_opts_default(&def);
        o = &def;
    }
    cb_need u = {.Sp = 2};
    for (const cb_seq *q = cb->seqs; q; q = q->link)
        need_seq(&u, q->state, q->len, !!q->bm, q->K, q->bm ? q->bm->kk : 0, q->max_len, (double)out);
    for (size_t i = 0; i < nj; i++) { /* as add_seq sets them up (a joiner it refuses holds nothing) */
        size_t max_len = 0, K = 1, kk = 0;
        nz_error e;
        if (nat_at_setup(n, o, lens[i] > 2 ? lens[i] : 2, &max_len, &e) ||
            (beam && nat_beam_setup(n, beam, 0.0f, &K, &kk, &e)))
            continue;
        need_seq(&u, S_PENDING, lens[i], beam > 0, K, kk, max_len, (double)out);
    }
    const double D = (double)n->c.d_model, V = (double)n->c.vocab;
    size_t R, T, E;
    const double self = nz_kvself_bound(&cb->self, u.rows, u.pos, u.permute, &R, &T);
    const double cross = nz_kvenc_bound(&cb->cross, u.enc, u.Bp ? u.Sp : 0, &E);
    const double W = (double)(u.Bp && u.Sp > cb->cross.scap ? u.Sp : cb->cross.scap);
    /* reserve_rows' arrays (rows, cur, starts, slots, encs, rseq, rj, prow; x of D floats a row), + 1 byte
     * each; while they grow, the new ones and the old x (the largest) */
    const size_t nc = u.rows <= cb->ncap ? cb->ncap : nz_grow_cap(cb->ncap, u.rows);
    const double row = 2 * sizeof(cb_seq *) + sizeof(int32_t) + sizeof(int64_t) + 3 * sizeof(uint32_t) +
                       sizeof(size_t) + 4 * D;
    const double arrays =
        (nc ? (double)nc * row + 9 : 0) + (nc > cb->ncap && cb->ncap ? 4 * (double)cb->ncap * D + 1 : 0);
    const double held = sizeof(nz_nat_cb) + 4 * V + self + cross + arrays + u.seqs; /* the batch, tmp */
    /* admit: src, slots, qs; the encoder, then its output with the tmp cache and nz_attn_cross_kv's
     * projections (the cross and self caches and the arrays grow meanwhile: in held) */
    const double B = (double)u.Bp, S = (double)u.Sp;
    const double admit = u.Bp ? 4 * B * S + 4 * B + 8 * B +
                                    nat_dmax(nat_encode_peak(n, B, S),
                                             nat_enc_bytes(B, S, D) + B * S * (8 * D + 1) + 8 * B * S * D + 1)
                              : 0;
    /* a decoder step over every row: the self attention's padding copy spans all R x T slots' positions
     * (kv_pad_rows over the whole cache), the cross attention's all E x W; nz_kvself_permute: in self */
    const double N = (double)u.rows;
    const double step = u.rows ? nat_at_step_peak(n, N, 0, (double)E, W) + (double)R * (double)T : 0;
    r->held = nz_mem_bytes(held);
    r->step = nz_mem_bytes(nat_dmax(admit, step));
}
