/*
 * nz_t5md_cb.c — continuous batching of greedy, sampled and beam search decoding (see nz_t5md.h,
 * nz_t5md_cb_*).
 *
 * Rows are (group, requested decoder[, beam]) triples; a group is one source with its options. Every row
 * lives in a slot: a row of the self-attention caches, which all hold positions [0, P) (P = the caches' len).
 * A row that joins at P starts there: its slots [0, P) are padding, never attended; T5's decoder has no
 * absolute positions and its self-attention bias depends only on key - query, so the row's keys, queries
 * and outputs are those it has alone (the attention skips padded keys, the GEMMs are row-invariant).
 * When P reaches the caches' capacity the rows slide left by the earliest start (or the caches grow).
 * The encoder rows of the groups live in slots of the cross-attention caches, of a common width with
 * padding. Each step runs one decoder step over every row, in decoder-major order (the adapters and the
 * transformer variant's decoders see contiguous groups), with t5md_run's code and a slot map.
 *
 * A beam group's (group, decoder) items are t5md_beam's items (nz_t5md_beam.c: the bookkeeping
 * t5md_beam_search runs for the source alone, on the same log-probs): an item holds nb rows in nb slots
 * while it is live; after each step its beams are reordered and so are its slots' caches
 * (nz_kvself_permute: slot of beam m takes its parent's); a done item's slots are given back.
 */
#include "nz_t5md_int.h"

#include "nz_kvslots.h"

#include <math.h>
#include <string.h>

enum { G_PENDING = 0, G_RUNNING, G_DONE };

enum { CB_TCAP0 = 16 }; /* self-attention positions a new batch starts with */

typedef struct cb_group {
    void *owner;
    nz_t5md_opts o;      /* its options; o.decoders = decs */
    int *decs;           /* [D] requested decoders */
    size_t D;            /* requested decoders */
    int32_t *src;        /* [len] its source until encoded */
    size_t len;          /* source ids */
    uint32_t enc;        /* its encoder slot (running) */
    size_t live;         /* rows still generating */
    size_t R;            /* results per decoder (beam: num_return, else 1) */
    nz_t5md_result *res; /* [D x R] */
    t5md_beam *bm;       /* beam search: its items (its D decoders), else NULL */
    uint32_t *bslot;     /* beam: [D x nb] the slot of beam m of item j */
    uint32_t *parent;    /* beam: [nb] an item's reorder */
    int state;           /* G_* */
    struct cb_group *next;
} cb_group;

typedef struct cb_row {
    cb_group *g;
    size_t j;      /* index among the group's decoders (beam: its item) */
    size_t m;      /* beam: the item's beam */
    uint32_t k;    /* decoder */
    uint32_t slot; /* self-attention cache row */
    int32_t *tok;  /* [cap] generated ids (not beam) */
    float *lp;     /* [cap] their log-probs (not beam) */
    size_t n, cap; /* generated, room (max_new_tokens) */
    nz_rng rng;
    int32_t next; /* this step's pick */
    float next_lp;
} cb_row;

struct nz_t5md_cb {
    const nz_t5md *t;
    int *ident;         /* [K] 0..K-1: r.decs (rows carry their decoder k in r.dj) */
    nz_kvself self;     /* the rows' self-attention caches (r.self = self.kv) */
    nz_kvenc cross;     /* the groups' cross-attention caches (r.cross = cross.kv) */
    t5md_run r;         /* a step's buffers (r.src, dj, slot, x, h, y: [ncap]; r.bias: [H x (btcap + 1)]) */
    size_t btcap;       /* positions r.bias has room for */
    cb_row **rows;      /* [ncap] running rows in step order */
    size_t nrows, ncap; /* rows, room in rows and the step buffers */
    int32_t *cur;       /* [ncap] a step's input tokens */
    void *work;         /* nz_sample's work */
    float *tmp;         /* [V] t5md_beam_row's scratch */
    cb_group *groups;   /* every group not taken, newest first */
    size_t ngroups;
};

int nz_t5md_cb_create(const nz_t5md *t, nz_t5md_cb **out, nz_error *err) {
    *out = NULL;
    const nz_t5md_config *c = &t->c;
    nz_t5md_cb *cb = nz_calloc(1, sizeof *cb, NZ_MEM_ACTIVATIONS);
    if (!cb) return nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch");
    cb->t = t;
    const size_t ncross = c->kind == NZ_T5MD_TRANSFORMER ? c->num_modes * c->dec_layers : c->dec_layers;
    int rc =
        nz_kvself_init(&cb->self, c->dec_layers, c->inner, CB_TCAP0, err); /* grows to the longest rows */
    if (!rc) rc = nz_kvenc_init(&cb->cross, ncross, c->inner, err);
    cb->ident = nz_malloc(c->num_modes * sizeof *cb->ident, NZ_MEM_ACTIVATIONS);
    cb->work = nz_malloc(nz_sample_work_bytes(c->vocab), NZ_MEM_ACTIVATIONS);
    cb->tmp = nz_malloc(c->vocab * sizeof *cb->tmp, NZ_MEM_ACTIVATIONS);
    if (!rc && (!cb->ident || !cb->work || !cb->tmp))
        rc = nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch");
    if (rc) {
        nz_t5md_cb_free(cb);
        return rc;
    }
    for (size_t k = 0; k < c->num_modes; k++) cb->ident[k] = (int)k;
    cb->r.t = t;
    cb->r.L = c->dec_layers;
    cb->r.D = c->num_modes;
    cb->r.decs = cb->ident;
    cb->r.ncross = ncross;
    cb->r.self = cb->self.kv; /* the arrays stay; their caches grow in place */
    *out = cb;
    return NZ_OK;
}

static void row_free(cb_row *w) {
    if (!w) return;
    nz_free(w->tok);
    nz_free(w->lp);
    nz_free(w);
}

static void group_free(cb_group *g) {
    if (!g) return;
    nz_t5md_results_free(g->res, g->D * g->R);
    nz_free(g->res);
    if (g->bm) t5md_beam_free(g->bm);
    nz_free(g->bm);
    nz_free(g->bslot);
    nz_free(g->parent);
    nz_free(g->decs);
    nz_free(g->src);
    nz_free(g);
}

void nz_t5md_cb_free(nz_t5md_cb *cb) {
    if (!cb) return;
    for (size_t i = 0; i < cb->nrows; i++) row_free(cb->rows[i]);
    for (cb_group *g = cb->groups, *nx; g; g = nx) {
        nx = g->next;
        group_free(g);
    }
    cb->r.self = NULL; /* the slots' caches */
    cb->r.cross = NULL;
    t5md_run_free(&cb->r);
    nz_kvself_free(&cb->self);
    nz_kvenc_free(&cb->cross);
    nz_free(cb->ident);
    nz_free(cb->rows);
    nz_free(cb->cur);
    nz_free(cb->work);
    nz_free(cb->tmp);
    nz_free(cb);
}

size_t nz_t5md_cb_rows(const nz_t5md_cb *cb) { return cb->nrows; }

size_t nz_t5md_cb_groups(const nz_t5md_cb *cb) { return cb->ngroups; }

/* A new group's buffers for o (checked) and D decoders; beam: its search's bookkeeping. */
static int group_alloc(const nz_t5md *t, const nz_t5md_opts *o, size_t D, size_t len, cb_group **out,
                       nz_error *err) {
    const int beam = o->strategy == NZ_T5MD_BEAM;
    const size_t R = beam ? (size_t)o->num_return : 1, nb = beam ? (size_t)o->beam_size : 0;
    cb_group *g = nz_calloc(1, sizeof *g, NZ_MEM_ACTIVATIONS);
    int rc = NZ_OK;
    if (g) {
        g->R = R;
        g->decs = nz_malloc(D * sizeof *g->decs, NZ_MEM_ACTIVATIONS);
        g->res = nz_calloc(D * R, sizeof *g->res, NZ_MEM_OTHER);
        g->src = nz_malloc(len * sizeof *g->src, NZ_MEM_ACTIVATIONS);
        if (beam) {
            g->bm = nz_calloc(1, sizeof *g->bm, NZ_MEM_ACTIVATIONS);
            g->bslot = nz_malloc(D * nb * sizeof *g->bslot, NZ_MEM_ACTIVATIONS);
            g->parent = nz_malloc(nb * sizeof *g->parent, NZ_MEM_ACTIVATIONS);
        }
    }
    if (!g || !g->decs || !g->res || !g->src || (beam && (!g->bm || !g->bslot || !g->parent)))
        rc = nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch member");
    else if (beam)
        rc = t5md_beam_init(g->bm, t, o, D, err);
    if (rc) {
        group_free(g);
        return rc;
    }
    *out = g;
    return NZ_OK;
}

int nz_t5md_cb_add(nz_t5md_cb *cb, const int32_t *src, size_t len, const nz_t5md_opts *o, void *owner,
                   nz_error *err) {
    const nz_t5md *t = cb->t;
    int rc = t5md_check_opts(t, o, err);
    if (!rc) rc = nz_t5md_check_source(t, src, len, err);
    if (rc) return rc;
    const size_t D = o->n_decoders ? o->n_decoders : t->c.num_modes;
    cb_group *g = NULL;
    rc = group_alloc(t, o, D, len, &g, err);
    if (rc) return rc;
    g->owner = owner;
    g->o = *o;
    g->D = D;
    for (size_t j = 0; j < D; j++) g->decs[j] = o->n_decoders ? o->decoders[j] : (int)j;
    for (size_t i = 0; i < D * g->R; i++) {
        g->res[i].decoder = g->decs[i / g->R];
        g->res[i].beam_score = g->res[i].consensus = NAN;
    }
    g->o.decoders = g->decs;
    g->o.n_decoders = D;
    memcpy(g->src, src, len * sizeof *src);
    g->len = len;
    g->state = G_PENDING;
    if (!o->max_new_tokens && !g->bm) { /* greedy / sampling take no step for 0 tokens (beam takes one) */
        for (size_t j = 0; j < D && !rc; j++) rc = t5md_set_result(&g->res[j], NULL, NULL, 0, 0, err);
        if (rc) {
            group_free(g);
            return rc;
        }
        g->state = G_DONE;
    }
    g->next = cb->groups;
    cb->groups = g;
    cb->ngroups++;
    return NZ_OK;
}

/* ------------------------------------------------------------------ slots */

/* Room for n running rows in rows and the step buffers. */
static int reserve_rows(nz_t5md_cb *cb, size_t n, nz_error *err) {
    if (n <= cb->ncap) return NZ_OK;
    const size_t m = nz_grow_cap(cb->ncap, n), d = cb->t->c.d_model;
    t5md_run *r = &cb->r;
    if (nz_resize_array(&cb->rows, m, sizeof *cb->rows, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&cb->cur, m, sizeof *cb->cur, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&r->src, m, sizeof *r->src, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&r->dj, m, sizeof *r->dj, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&r->slot, m, sizeof *r->slot, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&r->x, m * d, sizeof *r->x, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&r->h, m * d, sizeof *r->h, NZ_MEM_ACTIVATIONS) ||
        nz_resize_array(&r->y, m * d, sizeof *r->y, NZ_MEM_ACTIVATIONS))
        return nz_fail(err, NZ_E_NOMEM, "out of memory for %zu decoder rows", m);
    cb->ncap = m;
    return NZ_OK;
}

/* Room for one more step in the self caches and the position bias. */
static int room_for_step(nz_t5md_cb *cb, nz_error *err) {
    int rc = nz_kvself_room(&cb->self, err);
    if (rc) return rc;
    if (cb->btcap < cb->self.tcap) {
        if (nz_resize_array(&cb->r.bias, cb->t->c.num_heads * (cb->self.tcap + 1), sizeof *cb->r.bias,
                            NZ_MEM_ACTIVATIONS))
            return nz_fail(err, NZ_E_NOMEM, "out of memory for the position bias");
        cb->btcap = cb->self.tcap;
    }
    return NZ_OK;
}

/* ------------------------------------------------------------------ joining */

/* Cross-attention keys of enc's rows into their groups' encoder slots slots[B]: decoder body st's
 * cross attention of every block into the caches first..first + L of cb->cross. */
static int fill_cross(nz_matmul_ctx *mc, nz_t5md_cb *cb, const t5_stack *st, size_t first,
                      const nz_t5md_enc *enc, const uint32_t *slots, nz_error *err) {
    nz_kv tmp;
    int rc = nz_kv_init(&tmp, enc->B, enc->S, cb->t->c.inner, err);
    for (size_t l = 0; !rc && l < cb->r.L; l++) {
        rc = nz_attn_cross_kv(mc, &st->blk[l].cross, enc->x, enc->B, enc->S, enc->pad, &tmp, err);
        for (size_t b = 0; !rc && b < enc->B; b++) nz_kvenc_fill(&cb->cross, first + l, slots[b], &tmp, b);
    }
    nz_kv_free(&tmp);
    return rc;
}

/* A row of decoder j of g (beam: beam m of item j) joining at the current position, placed after the
 * rows of decoders <= its own (the rows stay decoder-major, in joining order). */
static int add_row(nz_t5md_cb *cb, cb_group *g, size_t j, size_t m, nz_error *err) {
    cb_row *w = nz_calloc(1, sizeof *w, NZ_MEM_ACTIVATIONS);
    const size_t cap = (size_t)g->o.max_new_tokens;
    if (w && !g->bm) {
        w->tok = nz_malloc(cap * sizeof *w->tok, NZ_MEM_ACTIVATIONS);
        w->lp = nz_malloc(cap * sizeof *w->lp, NZ_MEM_ACTIVATIONS);
    }
    int rc = w && (g->bm || (w->tok && w->lp)) ? reserve_rows(cb, cb->nrows + 1, err)
                                               : nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder row");
    if (!rc) rc = nz_kvself_take(&cb->self, &w->slot, err);
    if (rc) {
        row_free(w);
        return rc;
    }
    w->g = g;
    w->j = j;
    w->m = m;
    if (g->bm) g->bslot[j * g->bm->nb + m] = w->slot;
    w->k = (uint32_t)g->decs[j];
    w->cap = cap;
    nz_rng_seed(&w->rng, g->o.seed ^ ((uint64_t)w->k * STREAM_GOLDEN));
    size_t at = cb->nrows;
    while (at > 0 && cb->rows[at - 1]->k > w->k) at--;
    memmove(cb->rows + at + 1, cb->rows + at, (cb->nrows - at) * sizeof *cb->rows);
    cb->rows[at] = w;
    cb->nrows++;
    g->live++;
    return NZ_OK;
}

/* Encode the pending groups (one encoder batch), fill their cross caches and add their rows. */
static int admit(nz_matmul_ctx *mc, nz_t5md_cb *cb, nz_error *err) {
    const nz_t5md *t = cb->t;
    size_t B = 0;
    for (cb_group *g = cb->groups; g; g = g->next) B += g->state == G_PENDING;
    if (!B) return NZ_OK;
    int rc = NZ_OK;
    const int32_t **src = nz_malloc(B * sizeof *src, NZ_MEM_ACTIVATIONS);
    size_t *len = nz_malloc(B * sizeof *len, NZ_MEM_ACTIVATIONS);
    uint32_t *slots = nz_malloc(B * sizeof *slots, NZ_MEM_ACTIVATIONS);
    cb_group **gs = nz_malloc(B * sizeof *gs, NZ_MEM_ACTIVATIONS);
    nz_t5md_enc enc;
    memset(&enc, 0, sizeof enc);
    if (!src || !len || !slots || !gs) NZ_FAIL(NZ_E_NOMEM, "out of memory admitting %zu contexts", B);
    size_t b = B;
    for (cb_group *g = cb->groups; g; g = g->next) /* oldest first: the list is newest first */
        if (g->state == G_PENDING) gs[--b] = g;
    for (b = 0; b < B; b++) {
        src[b] = gs[b]->src;
        len[b] = gs[b]->len;
    }
    NZ_TRY(nz_t5md_encode(mc, t, src, len, B, &enc, err));
    NZ_TRY(nz_kvenc_take(&cb->cross, B, enc.S, slots, err));
    for (b = 0; b < B; b++) {
        gs[b]->enc = slots[b];
        gs[b]->state = G_RUNNING; /* its encoder slot is taken: given back when it is done */
    }
    cb->r.cross = cb->cross.kv;
    if (t->c.kind == NZ_T5MD_TRANSFORMER) {
        for (size_t k = 0; k < t->c.num_modes; k++) {
            int used = 0;
            for (b = 0; b < B && !used; b++)
                for (size_t j = 0; j < gs[b]->D && !used; j++) used = gs[b]->decs[j] == (int)k;
            if (used) NZ_TRY(fill_cross(mc, cb, &t->dec[k], k * cb->r.L, &enc, slots, err));
        }
    } else {
        NZ_TRY(fill_cross(mc, cb, &t->dec[0], 0, &enc, slots, err));
    }
    for (b = 0; b < B; b++) {
        cb_group *g = gs[b];
        nz_free(g->src);
        g->src = NULL;
        for (size_t j = 0; j < g->D; j++)
            for (size_t m = 0; m < (g->bm ? g->bm->nb : 1); m++) NZ_TRY(add_row(cb, g, j, m, err));
    }
done:
    nz_t5md_enc_free(&enc);
    nz_free(src);
    nz_free(len);
    nz_free(slots);
    nz_free(gs);
    return rc;
}

/* ------------------------------------------------------------------ leaving */

/* Row i leaves (its slot is free again). */
static void drop_row(nz_t5md_cb *cb, size_t i) {
    cb_row *w = cb->rows[i];
    nz_kvself_give(&cb->self, w->slot);
    w->g->live--;
    row_free(w);
    memmove(cb->rows + i, cb->rows + i + 1, (cb->nrows - i - 1) * sizeof *cb->rows);
    cb->nrows--;
}

/* g is done: its encoder slot is free again. */
static void group_done(nz_t5md_cb *cb, cb_group *g) {
    if (g->state == G_RUNNING) nz_kvenc_give(&cb->cross, g->enc);
    g->state = G_DONE;
}

/* Unlink g from the groups. */
static void unlink_group(nz_t5md_cb *cb, cb_group *g) {
    for (cb_group **p = &cb->groups; *p; p = &(*p)->next)
        if (*p == g) {
            *p = g->next;
            cb->ngroups--;
            return;
        }
}

void nz_t5md_cb_remove(nz_t5md_cb *cb, void *owner) {
    for (cb_group *g = cb->groups; g; g = g->next) {
        if (g->owner != owner) continue;
        for (size_t i = cb->nrows; i-- > 0;)
            if (cb->rows[i]->g == g) drop_row(cb, i);
        group_done(cb, g);
        unlink_group(cb, g);
        group_free(g);
        return;
    }
}

int nz_t5md_cb_take(nz_t5md_cb *cb, void **owner, nz_t5md_result *res) {
    cb_group *last = NULL; /* the oldest done group */
    for (cb_group *g = cb->groups; g; g = g->next)
        if (g->state == G_DONE) last = g;
    if (!last) return 0;
    *owner = last->owner;
    memcpy(res, last->res, last->D * last->R * sizeof *res);
    memset(last->res, 0, last->D * last->R * sizeof *last->res);
    unlink_group(cb, last);
    group_free(last);
    return 1;
}

/* g failed: its rows leave, it is done with the error in each result it has not finished. */
static void group_fail(nz_t5md_cb *cb, cb_group *g, int rc, const nz_error *err) {
    for (size_t i = cb->nrows; i-- > 0;)
        if (cb->rows[i]->g == g) drop_row(cb, i);
    for (size_t q = 0; q < g->D * g->R; q++)
        if (!g->res[q].tokens) {
            g->res[q].rc = rc;
            g->res[q].err = *err;
        }
    group_done(cb, g);
}

/* A failed step: every group is done with the error in each result it has not finished. */
static void fail_groups(nz_t5md_cb *cb, int rc, const nz_error *err) {
    for (cb_group *g = cb->groups; g; g = g->next)
        if (g->state != G_DONE) group_fail(cb, g, rc, err);
}

/* ------------------------------------------------------------------ a step */

static void cb_pick(void *ctx, size_t i, float *lg) {
    nz_t5md_cb *cb = ctx;
    cb_row *w = cb->rows[i];
    if (w->g->bm)
        t5md_beam_row(w->g->bm, w->j, w->m, lg, cb->tmp);
    else
        t5md_pick(&w->g->o, lg, cb->t->c.vocab, w->tok, w->n, &w->rng, cb->work, &w->next, &w->next_lp);
}

/* The greedy / sampled rows take their picks; those that ended leave (a group whose rows all left is
 * done). */
static void rows_advance(nz_t5md_cb *cb) {
    for (size_t i = 0; i < cb->nrows; i++) {
        cb_row *w = cb->rows[i];
        if (w->g->bm) continue;
        w->tok[w->n] = w->next;
        w->lp[w->n] = w->next_lp;
        w->n++;
        if (w->g->o.on_token)
            w->g->o.on_token(w->g->o.token_arg, 0, (int)w->k, w->n - 1, w->next, w->next_lp);
    }
    for (size_t i = cb->nrows; i-- > 0;) { /* the rows that ended leave (backwards: the order stays) */
        cb_row *w = cb->rows[i];
        cb_group *g = w->g;
        if (g->bm) continue;
        const int fin = w->tok[w->n - 1] == NZ_T5MD_EOS;
        if (!fin && w->n < w->cap) continue;
        nz_error e = {0};
        if (t5md_set_result(&g->res[w->j], w->tok, w->lp, w->n, fin, &e)) {
            g->res[w->j].rc = NZ_E_NOMEM;
            g->res[w->j].err = e;
        }
        drop_row(cb, i);
        if (!g->live) group_done(cb, g);
    }
}

/* Item j of beam group g leaves: its rows' slots are free again. */
static void drop_item(nz_t5md_cb *cb, cb_group *g, size_t j) {
    for (size_t i = cb->nrows; i-- > 0;)
        if (cb->rows[i]->g == g && cb->rows[i]->j == j) drop_row(cb, i);
}

/* Beam group g's search ended (t5md_beam_search's end): the items not done offer their live beams, every
 * item's returns become its results, its rows leave. */
static void beam_finish(nz_t5md_cb *cb, cb_group *g) {
    t5md_beam *bm = g->bm;
    for (size_t j = 0; j < g->D; j++) {
        if (bm->done[j]) continue;
        t5md_beam_end(bm, j);
        t5md_beam_emit(bm, &g->o, j, 0, g->decs[j]);
    }
    for (size_t j = 0; j < g->D; j++) {
        nz_error e = {0};
        if (!t5md_beam_results(bm, j, &g->res[j * g->R], g->R, &e)) continue;
        for (size_t q = j * g->R; q < (j + 1) * g->R; q++)
            if (!g->res[q].tokens && !g->res[q].rc) {
                g->res[q].rc = e.code ? e.code : NZ_E_NOMEM;
                g->res[q].err = e;
            }
    }
    for (size_t i = cb->nrows; i-- > 0;)
        if (cb->rows[i]->g == g) drop_row(cb, i);
    group_done(cb, g);
}

/* Beam group g after its rows were scored (t5md_beam_row): each live item's step (t5md_beam_item, in item
 * order, as alone); a done item is streamed and leaves; a live one's slots take their beams' parents'
 * caches. The group ends when no item is live or the search reached max_length. A search error (too
 * few candidates) fails g alone, as it fails the call alone. @return NZ_OK or a reorder's error. */
static int beam_advance(nz_t5md_cb *cb, cb_group *g, nz_error *err) {
    t5md_beam *bm = g->bm;
    const size_t nb = bm->nb;
    size_t live = 0;
    for (size_t j = 0; j < g->D; j++) {
        if (bm->done[j]) continue;
        nz_error e = {0};
        int rc = t5md_beam_item(bm, j, g->parent, &e);
        if (rc) {
            group_fail(cb, g, rc, &e);
            return NZ_OK;
        }
        if (bm->done[j]) {
            t5md_beam_emit(bm, &g->o, j, 0, g->decs[j]);
            drop_item(cb, g, j);
            continue;
        }
        live++;
        size_t m = 0;
        while (m < nb && g->parent[m] == m) m++;
        if (m < nb && (rc = nz_kvself_permute(&cb->self, g->bslot + j * nb, g->parent, nb, err))) return rc;
    }
    bm->cur_len++;
    if (!live || bm->cur_len >= bm->max_length) beam_finish(cb, g);
    return NZ_OK;
}

int nz_t5md_cb_step(nz_matmul_ctx *mc, nz_t5md_cb *cb, nz_error *err) {
    int rc = admit(mc, cb, err);
    if (!rc && cb->nrows) rc = room_for_step(cb, err);
    if (rc) {
        fail_groups(cb, rc, err);
        return rc;
    }
    if (!cb->nrows) return NZ_OK;
    t5md_run *r = &cb->r;
    for (size_t i = 0; i < cb->nrows; i++) {
        const cb_row *w = cb->rows[i];
        r->src[i] = w->g->enc;
        r->dj[i] = w->k;
        r->slot[i] = w->slot;
        if (w->g->bm)
            cb->cur[i] = t5md_beam_input(w->g->bm, w->j, w->m);
        else
            cb->cur[i] = w->n ? w->tok[w->n - 1] : NZ_T5MD_START;
    }
    r->N = cb->nrows;
    rc = t5md_run_step(mc, r, cb->cur, err);
    if (!rc) rc = t5md_project(mc, cb->t, r->x, r->N, cb_pick, cb, err);
    if (!rc) rows_advance(cb);
    for (cb_group *g = cb->groups; g && !rc; g = g->next)
        if (g->bm && g->state == G_RUNNING) rc = beam_advance(cb, g, err);
    if (rc) fail_groups(cb, rc, err);
    return rc;
}

/* ------------------------------------------------------------------ memory bound */

/* What a group of D decoders with options o (len source ids) holds at most until taken: group_alloc's
 * buffers (the beam bookkeeping of t5md_beam_init), its rows (cb_row; tok and lp of max_new_tokens each
 * unless beam) and its results (tokens and logprobs of up to max_new_tokens + 1 each, + 1 byte). */
static double group_bytes(const nz_t5md *t, const nz_t5md_opts *o, double D, double len) {
    const int beam = o->strategy == NZ_T5MD_BEAM;
    const double R = beam ? (double)o->num_return : 1, nb = beam ? (double)o->beam_size : 1;
    const double cap = (double)o->max_new_tokens;
    double b = sizeof(cb_group) + 4 * D + D * R * sizeof(nz_t5md_result) + 4 * len;
    if (beam) b += sizeof(t5md_beam) + 4 * D * nb + 4 * nb + t5md_beam_bytes(t, D, o);
    b += D * nb * (sizeof(cb_row) + (beam ? 0 : 8 * cap));
    return b + D * R * 2 * (4 * (cap + 1) + 1);
}

/* The demand of cb's groups (and a joiner) on the shared buffers. */
typedef struct cb_need {
    double groups;          /* group_bytes of every group */
    size_t rows;            /* rows in use at once: running + to be admitted */
    size_t enc;             /* encoder slots in use at once */
    size_t Bp, Sp;          /* sources to encode at the next step, the longest */
    size_t positions, perm; /* the longest a row runs; the largest beam */
} cb_need;

static void need_group(const nz_t5md *t, cb_need *n, const nz_t5md_opts *o, size_t D, size_t len, int state,
                       int beam) {
    n->groups += group_bytes(t, o, (double)D, (double)len);
    if (state == G_DONE) return;
    const size_t nb = beam ? (size_t)o->beam_size : 1, run = (size_t)o->max_new_tokens + 1;
    n->enc++;
    if (state == G_PENDING) {
        n->rows += D * nb;
        n->Bp++;
        if (len > n->Sp) n->Sp = len;
    }
    if (run > n->positions) n->positions = run;
    if (beam && nb > n->perm) n->perm = nb;
}

uint64_t nz_t5md_cb_bound(const nz_t5md *t, const nz_t5md_cb *cb, size_t len, const nz_t5md_opts *o) {
    const nz_t5md_config *c = &t->c;
    nz_t5md_cb fresh; /* cb as nz_t5md_cb_create leaves it */
    if (!cb) {
        memset(&fresh, 0, sizeof fresh);
        fresh.self.L = c->dec_layers;
        fresh.self.D = c->inner;
        fresh.self.tcap = CB_TCAP0;
        fresh.cross.n = c->kind == NZ_T5MD_TRANSFORMER ? c->num_modes * c->dec_layers : c->dec_layers;
        fresh.cross.D = c->inner;
        cb = &fresh;
    }
    cb_need n = {0};
    n.rows = cb->nrows;
    for (const cb_group *g = cb->groups; g; g = g->next)
        need_group(t, &n, &g->o, g->D, g->len, g->state, !!g->bm);
    nz_error e;
    if (o && !t5md_check_opts(t, o, &e) && len >= 1 && len <= NZ_T5MD_MAX_SOURCE)
        need_group(t, &n, o, o->n_decoders ? o->n_decoders : c->num_modes, len, G_PENDING,
                   o->strategy == NZ_T5MD_BEAM);
    const double d = (double)c->d_model, I = (double)c->inner, V = (double)c->vocab;
    const double fixed = sizeof(nz_t5md_cb) + 4 * (double)c->num_modes +
                         (double)nz_sample_work_bytes(c->vocab) + 4 * V; /* the batch, ident, work, tmp */
    size_t R, T, E;
    const double self = nz_kvself_bound(&cb->self, n.rows, n.positions, n.perm, &R, &T);
    const double cross = nz_kvenc_bound(&cb->cross, n.enc, n.Sp, &E);
    const double S = (double)(n.Sp > cb->cross.scap ? n.Sp : cb->cross.scap), dR = (double)n.rows;
    /* reserve_rows' arrays (rows, cur, src, dj, slot; x, h, y) and the position bias (room_for_step),
     * old and new while they grow */
    const double ncap = (double)(n.rows <= cb->ncap ? cb->ncap : nz_grow_cap(cb->ncap, n.rows));
    const double arrays = 2 * ncap * (sizeof(cb_row *) + 4 * sizeof(int32_t) + 3 * 4 * d) +
                          2 * 4 * (double)c->num_heads * ((double)T + 1);
    /* admit: its arrays, the encoder, then its output with fill_cross' tmp cache and projections */
    const double dB = (double)n.Bp, dS = (double)n.Sp;
    const double admit =
        n.Bp ? dB * (2 * sizeof(void *) + sizeof(size_t) + 4) +
                   t5md_dmax(t5md_encode_peak(c, dB, dS),
                             t5md_enc_bytes(c, dB, dS) + dB * dS * (8 * I + 1) + 8 * dB * dS * I + 1)
             : 0;
    /* a step over every row (the self attention's padding copy covers all R slots), or the projection */
    const double step =
        n.rows ? t5md_dmax(t5md_step_peak(t, dR, dR, (double)E, S, (double)T) + (double)R * (double)T,
                           t5md_project_peak(t, dR))
               : 0;
    return nz_mem_bytes(fixed + n.groups + self + cross + arrays + t5md_dmax(admit, step));
}
