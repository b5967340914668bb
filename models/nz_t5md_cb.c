/*
 * nz_t5md_cb.c — continuous batching of greedy and sampled decoding (see nz_t5md.h, nz_t5md_cb_*).
 *
 * Rows are (group, requested decoder) pairs; a group is one source with its options. Every row lives in
 * a slot: a row of the self-attention caches, which all hold positions [0, P) (P = the caches' len). A
 * row that joins at P starts there: its slots [0, P) are padding, never attended; T5's decoder has no
 * absolute positions and its self-attention bias depends only on key - query, so the row's keys, queries
 * and outputs are those it has alone (the attention skips padded keys, the GEMMs are row-invariant).
 * When P reaches the caches' capacity the rows slide left by the earliest start (or the caches grow).
 * The encoder rows of the groups live in slots of the cross-attention caches, of a common width with
 * padding. Each step runs one decoder step over every row, in decoder-major order (the adapters and the
 * transformer variant's decoders see contiguous groups), with t5md_run's code and a slot map.
 */
#include "nz_t5md_int.h"

#include "nz_kvslots.h"

#include <math.h>
#include <string.h>

enum { G_PENDING = 0, G_RUNNING, G_DONE };

typedef struct cb_group {
    void *owner;
    nz_t5md_opts o;      /* its options; o.decoders = decs */
    int *decs;           /* [D] requested decoders */
    size_t D;            /* requested decoders */
    int32_t *src;        /* [len] its source until encoded */
    size_t len;          /* source ids */
    uint32_t enc;        /* its encoder slot (running) */
    size_t live;         /* rows still generating */
    nz_t5md_result *res; /* [D] */
    int state;           /* G_* */
    struct cb_group *next;
} cb_group;

typedef struct cb_row {
    cb_group *g;
    size_t j;      /* index among the group's decoders */
    uint32_t k;    /* decoder */
    uint32_t slot; /* self-attention cache row */
    int32_t *tok;  /* [cap] generated ids */
    float *lp;     /* [cap] their log-probs */
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
    int rc = nz_kvself_init(&cb->self, c->dec_layers, c->inner, 16, err); /* grows to the longest rows */
    if (!rc) rc = nz_kvenc_init(&cb->cross, ncross, c->inner, err);
    cb->ident = nz_malloc(c->num_modes * sizeof *cb->ident, NZ_MEM_ACTIVATIONS);
    cb->work = nz_malloc(nz_sample_work_bytes(c->vocab), NZ_MEM_ACTIVATIONS);
    if (!rc && (!cb->ident || !cb->work)) rc = nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch");
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
    nz_t5md_results_free(g->res, g->D);
    nz_free(g->res);
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
    nz_free(cb);
}

size_t nz_t5md_cb_rows(const nz_t5md_cb *cb) { return cb->nrows; }

size_t nz_t5md_cb_groups(const nz_t5md_cb *cb) { return cb->ngroups; }

int nz_t5md_cb_add(nz_t5md_cb *cb, const int32_t *src, size_t len, const nz_t5md_opts *o, void *owner,
                   nz_error *err) {
    const nz_t5md *t = cb->t;
    if (o->strategy == NZ_T5MD_BEAM)
        return nz_fail(err, NZ_E_UNSUPPORTED, "beam search is not continuously batched");
    int rc = t5md_check_opts(t, o, err);
    if (!rc) rc = nz_t5md_check_source(t, src, len, err);
    if (rc) return rc;
    const size_t D = o->n_decoders ? o->n_decoders : t->c.num_modes;
    cb_group *g = nz_calloc(1, sizeof *g, NZ_MEM_ACTIVATIONS);
    if (g) {
        g->decs = nz_malloc(D * sizeof *g->decs, NZ_MEM_ACTIVATIONS);
        g->res = nz_calloc(D, sizeof *g->res, NZ_MEM_OTHER);
        g->src = nz_malloc(len * sizeof *g->src, NZ_MEM_ACTIVATIONS);
    }
    if (!g || !g->decs || !g->res || !g->src) {
        group_free(g);
        return nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch member");
    }
    g->owner = owner;
    g->o = *o;
    g->D = D;
    for (size_t j = 0; j < D; j++) {
        g->decs[j] = o->n_decoders ? o->decoders[j] : (int)j;
        g->res[j].decoder = g->decs[j];
        g->res[j].beam_score = NAN;
    }
    g->o.decoders = g->decs;
    g->o.n_decoders = D;
    memcpy(g->src, src, len * sizeof *src);
    g->len = len;
    g->state = G_PENDING;
    if (!o->max_new_tokens) { /* greedy / sampling take no step for 0 tokens */
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

/* A row of decoder j of g joining at the current position, placed after the rows of decoders <= its own
 * (the rows stay decoder-major, in joining order). */
static int add_row(nz_t5md_cb *cb, cb_group *g, size_t j, nz_error *err) {
    cb_row *w = nz_calloc(1, sizeof *w, NZ_MEM_ACTIVATIONS);
    const size_t cap = (size_t)g->o.max_new_tokens;
    if (w) {
        w->tok = nz_malloc(cap * sizeof *w->tok, NZ_MEM_ACTIVATIONS);
        w->lp = nz_malloc(cap * sizeof *w->lp, NZ_MEM_ACTIVATIONS);
    }
    int rc = w && w->tok && w->lp ? reserve_rows(cb, cb->nrows + 1, err)
                                  : nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder row");
    if (!rc) rc = nz_kvself_take(&cb->self, &w->slot, err);
    if (rc) {
        row_free(w);
        return rc;
    }
    w->g = g;
    w->j = j;
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
        for (size_t j = 0; j < g->D; j++) NZ_TRY(add_row(cb, g, j, err));
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
    memcpy(res, last->res, last->D * sizeof *res);
    memset(last->res, 0, last->D * sizeof *last->res);
    unlink_group(cb, last);
    group_free(last);
    return 1;
}

/* A failed step: every group is done with the error in each result it has not finished. */
static void fail_groups(nz_t5md_cb *cb, int rc, const nz_error *err) {
    while (cb->nrows) drop_row(cb, cb->nrows - 1);
    for (cb_group *g = cb->groups; g; g = g->next) {
        if (g->state == G_DONE) continue;
        for (size_t j = 0; j < g->D; j++)
            if (!g->res[j].tokens) {
                g->res[j].rc = rc;
                g->res[j].err = *err;
            }
        group_done(cb, g);
    }
}

/* ------------------------------------------------------------------ a step */

static void cb_pick(void *ctx, size_t i, float *lg) {
    nz_t5md_cb *cb = ctx;
    cb_row *w = cb->rows[i];
    t5md_pick(&w->g->o, lg, cb->t->c.vocab, w->tok, w->n, &w->rng, cb->work, &w->next, &w->next_lp);
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
        cb->cur[i] = w->n ? w->tok[w->n - 1] : NZ_T5MD_START;
    }
    r->N = cb->nrows;
    rc = t5md_run_step(mc, r, cb->cur, err);
    if (!rc) rc = t5md_project(mc, cb->t, r->x, r->N, cb_pick, cb, err);
    if (rc) {
        fail_groups(cb, rc, err);
        return rc;
    }
    for (size_t i = 0; i < cb->nrows; i++) {
        cb_row *w = cb->rows[i];
        w->tok[w->n] = w->next;
        w->lp[w->n] = w->next_lp;
        w->n++;
        if (w->g->o.on_token)
            w->g->o.on_token(w->g->o.token_arg, 0, (int)w->k, w->n - 1, w->next, w->next_lp);
    }
    for (size_t i = cb->nrows; i-- > 0;) { /* the rows that ended leave (backwards: the order stays) */
        cb_row *w = cb->rows[i];
        cb_group *g = w->g;
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
    return NZ_OK;
}
