/*
 * nz_nat_cb.c — continuous batching of AT greedy decoding (see nz_nat.h, nz_nat_cb_*).
 *
 * Each sentence is one decoder row in a slot of the self-attention caches (nz_kvself): a sentence that
 * joins when the caches hold P positions writes its keys from P on, its positions [0, P) are padding,
 * and its token positions (fairseq make_positions) count from its own first step, so its keys, queries
 * and log-probs are those it has alone (attention skips padded keys, the GEMMs are row-invariant). Its
 * encoder states live in a slot of the cross-attention caches (nz_kvenc). Sentences added between
 * steps are encoded together at the next step; a sentence leaves at its eos.
 */
#include "nz_nat_int.h"

#include "nz_kvslots.h"

#include <math.h>
#include <string.h>

enum { S_PENDING = 0, S_RUNNING, S_DONE };

typedef struct cb_seq {
    void *owner;
    int32_t *src;   /* [len] its source until encoded */
    size_t len;     /* source ids */
    size_t max_len; /* as decoded alone (nat_at_setup over max(2, len)) */
    size_t min_len;
    uint32_t enc, slot; /* its cross and self cache slots (running) */
    int32_t *tok;       /* [max_len + 1] generated */
    size_t n;           /* generated so far */
    double lpsum;       /* their log-probs, summed */
    int32_t next;       /* this step's pick */
    int state;          /* S_* */
    nz_nat_hyp hyp;     /* its result once done */
    struct cb_seq *link;
} cb_seq;

struct nz_nat_cb {
    const nz_nat *n;
    nz_kvself self; /* the rows' self-attention caches */
    nz_kvenc cross; /* the sentences' cross-attention caches (one per AT layer) */
    cb_seq **rows;  /* [ncap] running sentences in step order */
    size_t nrows, ncap;
    int32_t *cur;    /* [ncap] a step's input tokens */
    int64_t *starts; /* [ncap] their position offsets: tokens generated so far */
    uint32_t *slots; /* [ncap] self cache slot of each row */
    uint32_t *encs;  /* [ncap] cross cache slot of each row */
    size_t *ident;   /* [ncap] 0..: the rows to project */
    float *x;        /* [ncap x D] hidden states */
    float *tmp;      /* [V] nat_greedy_pick's scratch */
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
    int rc = nz_kvself_init(&cb->self, n->at.nlayers, n->c.d_model, 16, err);
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

static void seq_free(cb_seq *q) {
    if (!q) return;
    nz_nat_hyps_free(&q->hyp, 1);
    nz_free(q->src);
    nz_free(q->tok);
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
    nz_free(cb->ident);
    nz_free(cb->x);
    nz_free(cb->tmp);
    nz_free(cb);
}

size_t nz_nat_cb_rows(const nz_nat_cb *cb) { return cb->nrows; }

size_t nz_nat_cb_size(const nz_nat_cb *cb) { return cb->nseqs; }

int nz_nat_cb_add(nz_nat_cb *cb, const int32_t *src, size_t len, const nz_nat_at_opts *o, void *owner,
                  nz_error *err) {
    size_t max_len = 0;
    int rc = nat_at_setup(cb->n, o, len > 2 ? len : 2, &max_len, err); /* the width it has alone */
    if (!rc) rc = nz_nat_check_source(cb->n, src, len, NULL, err);
    if (rc) return rc;
    cb_seq *q = nz_calloc(1, sizeof *q, NZ_MEM_ACTIVATIONS);
    if (q) {
        q->src = nz_malloc(len * sizeof *src + 1, NZ_MEM_ACTIVATIONS);
        q->tok = nz_malloc((max_len + 1) * sizeof *q->tok, NZ_MEM_ACTIVATIONS);
    }
    if (!q || !q->src || !q->tok) {
        seq_free(q);
        return nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch member");
    }
    memcpy(q->src, src, len * sizeof *src);
    q->len = len;
    q->max_len = max_len;
    q->min_len = (size_t)o->min_len;
    q->owner = owner;
    q->link = cb->seqs;
    cb->seqs = q;
    cb->nseqs++;
    return NZ_OK;
}

/* Room for n running rows in rows and the step buffers. */
static int reserve_rows(nz_nat_cb *cb, size_t n, nz_error *err) {
    if (n <= cb->ncap) return NZ_OK;
    const size_t m = nz_grow_cap(cb->ncap, n), D = cb->n->c.d_model;
    if (nz_resize_array(&cb->rows, m, sizeof *cb->rows, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->cur, m, sizeof *cb->cur, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->starts, m, sizeof *cb->starts, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->slots, m, sizeof *cb->slots, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->encs, m, sizeof *cb->encs, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->ident, m, sizeof *cb->ident, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->x, m * D, sizeof *cb->x, NZ_MEM_ACTIVATIONS))
        return nz_fail(err, NZ_E_NOMEM, "out of memory for %zu decoder rows", m);
    for (size_t i = cb->ncap; i < m; i++) cb->ident[i] = i;
    cb->ncap = m;
    return NZ_OK;
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
        qs[b]->state = S_RUNNING; /* its encoder slot is taken: given back when it is done */
    }
    NZ_TRY(nz_kv_init(&tmp, B, S, n->c.d_model, err));
    for (size_t l = 0; l < n->at.nlayers; l++) {
        NZ_TRY(nz_attn_cross_kv(mc, &n->at.layers[l].cross, enc.x, B, S, enc.pad, &tmp, err));
        for (b = 0; b < B; b++) nz_kvenc_fill(&cb->cross, l, slots[b], &tmp, b);
    }
    NZ_TRY(reserve_rows(cb, cb->nrows + B, err));
    for (b = 0; b < B; b++) {
        NZ_TRY(nz_kvself_take(&cb->self, &qs[b]->slot, err));
        nz_free(qs[b]->src);
        qs[b]->src = NULL;
        cb->rows[cb->nrows++] = qs[b];
    }
done:
    nz_kv_free(&tmp);
    nz_nat_enc_free(&enc);
    nz_free(src);
    nz_free(slots);
    nz_free(qs);
    return rc;
}

/* Row i leaves: its slots are free again, it is done. */
static void leave(nz_nat_cb *cb, size_t i) {
    cb_seq *q = cb->rows[i];
    nz_kvself_give(&cb->self, q->slot);
    nz_kvenc_give(&cb->cross, q->enc);
    q->state = S_DONE;
    memmove(cb->rows + i, cb->rows + i + 1, (cb->nrows - i - 1) * sizeof *cb->rows);
    cb->nrows--;
}

/* A failed step: every sentence not done is, with the error. */
static void fail_all_seqs(nz_nat_cb *cb, int rc, const nz_error *err) {
    while (cb->nrows) leave(cb, cb->nrows - 1);
    for (cb_seq *q = cb->seqs; q; q = q->link)
        if (q->state != S_DONE) {
            q->state = S_DONE;
            q->hyp.rc = rc;
            q->hyp.err = *err;
        }
}

static void pick_row(void *ctx, size_t i, const float *lp) {
    nz_nat_cb *cb = ctx;
    cb_seq *q = cb->rows[i];
    q->next = nat_greedy_pick(lp, cb->n->c.vocab, q->n, q->max_len, q->min_len, cb->tmp);
    q->lpsum += lp[q->next];
}

int nz_nat_cb_step(nz_matmul_ctx *mc, nz_nat_cb *cb, nz_error *err) {
    const nz_nat *n = cb->n;
    int rc = admit(mc, cb, err);
    if (!rc && cb->nrows) rc = nz_kvself_room(&cb->self, err);
    const size_t N = cb->nrows;
    for (size_t i = 0; i < N; i++) {
        const cb_seq *q = cb->rows[i];
        cb->cur[i] = q->n ? q->tok[q->n - 1] : NZ_NAT_EOS; /* fairseq starts from eos */
        cb->starts[i] = (int64_t)q->n;
        cb->slots[i] = q->slot;
        cb->encs[i] = q->enc;
    }
    if (!rc && N) rc = nat_stack_embed(mc, n, &n->at, cb->cur, N, 1, 0, cb->starts, 1, cb->x, err);
    if (!rc && N) {
        nz_block_io io;
        memset(&io, 0, sizeof io);
        io.B = N;
        io.T = 1;
        io.causal = 1;
        io.self_rows = cb->slots;
        io.kv_map = cb->encs;
        rc = nat_stack_layers(mc, &n->at, cb->x, &io, cb->self.kv, cb->cross.kv, err);
    }
    if (!rc && N) rc = nat_project_rows(mc, n, cb->x, cb->ident, N, pick_row, cb, err);
    if (rc) {
        fail_all_seqs(cb, rc, err);
        return rc;
    }
    for (size_t i = N; i-- > 0;) { /* backwards: rows leave */
        cb_seq *q = cb->rows[i];
        q->tok[q->n++] = q->next;
        if (q->next != NZ_NAT_EOS) continue;
        nz_error e = {0};
        if (nat_set_tokens(&q->hyp, q->tok, q->n, &e)) {
            q->hyp.rc = e.code;
            q->hyp.err = e;
        }
        q->hyp.score = (float)(q->lpsum / (double)q->n);
        q->hyp.nat_score = NAN;
        q->hyp.steps = (int)q->n;
        leave(cb, i);
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
