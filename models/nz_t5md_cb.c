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
    size_t start;  /* cache position of its first token */
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
    t5md_run r;         /* the caches and a step's buffers (r.src, dj, slot, x, h, y: [ncap]) */
    size_t rcap, tcap;  /* self caches: rows (slots) x positions */
    size_t ecap, scap;  /* cross caches: encoder slots x positions */
    uint8_t *slot_used; /* [rcap] */
    uint8_t *enc_used;  /* [ecap] */
    cb_row **rows;      /* [ncap] running rows in step order */
    size_t nrows, ncap; /* rows, room in rows and the step buffers */
    int32_t *cur;       /* [ncap] a step's input tokens */
    void *work;         /* nz_sample's work */
    cb_group *groups;   /* every group not taken, newest first */
    size_t ngroups;
};

static size_t grow(size_t have, size_t need) {
    size_t n = have ? have : 8;
    while (n < need) n *= 2;
    return n;
}

/* The array *p (NULL, or from here: NZ_MEM_ACTIVATIONS) resized to m elements of sz bytes.
 * @return 0, or -1 when out of memory (*p unchanged). */
static int resize(void *p, size_t m, size_t sz) {
    void *o = *(void **)p;
    void *n = o ? nz_realloc(o, m * sz + 1) : nz_malloc(m * sz + 1, NZ_MEM_ACTIVATIONS);
    if (!n) return -1;
    *(void **)p = n;
    return 0;
}

int nz_t5md_cb_create(const nz_t5md *t, nz_t5md_cb **out, nz_error *err) {
    *out = NULL;
    const nz_t5md_config *c = &t->c;
    nz_t5md_cb *cb = nz_calloc(1, sizeof *cb, NZ_MEM_ACTIVATIONS);
    if (!cb) return nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch");
    cb->t = t;
    cb->r.t = t;
    cb->r.L = c->dec_layers;
    cb->r.D = c->num_modes;
    cb->r.ncross = c->kind == NZ_T5MD_TRANSFORMER ? c->num_modes * c->dec_layers : c->dec_layers;
    cb->ident = nz_malloc(c->num_modes * sizeof *cb->ident, NZ_MEM_ACTIVATIONS);
    cb->r.cross = nz_calloc(cb->r.ncross, sizeof *cb->r.cross, NZ_MEM_KV);
    cb->r.self = nz_calloc(cb->r.L, sizeof *cb->r.self, NZ_MEM_KV);
    cb->work = nz_malloc(nz_sample_work_bytes(c->vocab), NZ_MEM_ACTIVATIONS);
    if (!cb->ident || !cb->r.cross || !cb->r.self || !cb->work) {
        nz_t5md_cb_free(cb);
        return nz_fail(err, NZ_E_NOMEM, "out of memory for a decoder batch");
    }
    for (size_t k = 0; k < c->num_modes; k++) cb->ident[k] = (int)k;
    cb->r.decs = cb->ident;
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
    t5md_run_free(&cb->r);
    nz_free(cb->ident);
    nz_free(cb->slot_used);
    nz_free(cb->enc_used);
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
    const size_t m = grow(cb->ncap, n), d = cb->t->c.d_model;
    t5md_run *r = &cb->r;
    if (resize(&cb->rows, m, sizeof *cb->rows) || resize(&cb->cur, m, sizeof *cb->cur) ||
        resize(&r->src, m, sizeof *r->src) || resize(&r->dj, m, sizeof *r->dj) ||
        resize(&r->slot, m, sizeof *r->slot) || resize(&r->x, m * d, sizeof *r->x) ||
        resize(&r->h, m * d, sizeof *r->h) || resize(&r->y, m * d, sizeof *r->y))
        return nz_fail(err, NZ_E_NOMEM, "out of memory for %zu decoder rows", m);
    cb->ncap = m;
    return NZ_OK;
}

/* A free self-cache slot (the caches grow when none is). */
static int take_slot(nz_t5md_cb *cb, uint32_t *slot, nz_error *err) {
    for (size_t i = 0; i < cb->rcap; i++)
        if (!cb->slot_used[i]) {
            cb->slot_used[i] = 1;
            *slot = (uint32_t)i;
            return NZ_OK;
        }
    const size_t m = grow(cb->rcap, cb->rcap + 1);
    if (resize(&cb->slot_used, m, 1)) return nz_fail(err, NZ_E_NOMEM, "out of memory for decoder slots");
    for (size_t l = 0; l < cb->r.L; l++) {
        int rc = cb->rcap ? nz_kv_resize(&cb->r.self[l], m, cb->tcap, err)
                          : nz_kv_init(&cb->r.self[l], m, cb->tcap, cb->t->c.inner, err);
        if (rc) return rc;
    }
    memset(cb->slot_used + cb->rcap, 0, m - cb->rcap);
    cb->rcap = m;
    return take_slot(cb, slot, err);
}

/* Positions for one more step: P + 1 <= tcap, by sliding every row left by the earliest start, or by
 * growing the caches (the first call sizes them for need positions). */
static int room_for_step(nz_t5md_cb *cb, size_t need, nz_error *err) {
    t5md_run *r = &cb->r;
    const size_t P = cb->rcap ? r->self[0].len : 0, D = cb->t->c.inner;
    if (cb->rcap && P + 1 <= cb->tcap) return NZ_OK;
    size_t m = P;
    for (size_t i = 0; i < cb->nrows; i++)
        if (cb->rows[i]->start < m) m = cb->rows[i]->start;
    if (cb->rcap && m > 0) { /* slide: positions [m, P) move to [0, P - m) */
        for (size_t l = 0; l < r->L; l++) {
            nz_kv *kv = &r->self[l];
            for (size_t i = 0; i < cb->nrows; i++) {
                const size_t s = cb->rows[i]->slot;
                memmove(kv->k + s * kv->cap * D, kv->k + (s * kv->cap + m) * D, (P - m) * D * sizeof(float));
                memmove(kv->v + s * kv->cap * D, kv->v + (s * kv->cap + m) * D, (P - m) * D * sizeof(float));
                memmove(kv->pad + s * kv->cap, kv->pad + s * kv->cap + m, P - m);
            }
            kv->len = P - m;
        }
        for (size_t i = 0; i < cb->nrows; i++) cb->rows[i]->start -= m;
        return NZ_OK;
    }
    const size_t cap = grow(cb->tcap, need > P + 1 ? need : P + 1);
    for (size_t l = 0; cb->rcap && l < r->L; l++) {
        int rc = nz_kv_resize(&r->self[l], cb->rcap, cap, err);
        if (rc) return rc;
    }
    if (resize(&r->bias, cb->t->c.num_heads * (cap + 1), sizeof *r->bias))
        return nz_fail(err, NZ_E_NOMEM, "out of memory for the position bias");
    cb->tcap = cap;
    return NZ_OK;
}

/* Room for encoder slots up to e (exclusive) of S positions in every cross cache (new positions of the
 * slots in use are padding). */
static int reserve_enc(nz_t5md_cb *cb, size_t e, size_t S, nz_error *err) {
    if (e <= cb->ecap && S <= cb->scap) return NZ_OK;
    const size_t ne = e > cb->ecap ? grow(cb->ecap, e) : cb->ecap, ns = S > cb->scap ? S : cb->scap;
    for (size_t i = 0; i < cb->r.ncross; i++) {
        nz_kv *kv = &cb->r.cross[i];
        int rc = cb->ecap ? nz_kv_resize(kv, ne, ns, err) : nz_kv_init(kv, ne, ns, cb->t->c.inner, err);
        if (rc) return rc;
        for (size_t b = 0; b < ne; b++) memset(kv->pad + b * ns + cb->scap, 1, ns - cb->scap);
        kv->len = ns;
    }
    if (resize(&cb->enc_used, ne, 1)) return nz_fail(err, NZ_E_NOMEM, "out of memory for encoder slots");
    memset(cb->enc_used + cb->ecap, 0, ne - cb->ecap);
    cb->ecap = ne;
    cb->scap = ns;
    return NZ_OK;
}

/* ------------------------------------------------------------------ joining */

/* Cross-attention keys of enc's rows into their groups' encoder slots slots[B]: decoder body st's
 * cross attention of every block into the caches cross[0..L). */
static int fill_cross(nz_matmul_ctx *mc, nz_t5md_cb *cb, const t5_stack *st, nz_kv *cross,
                      const nz_t5md_enc *enc, const uint32_t *slots, nz_error *err) {
    const size_t I = cb->t->c.inner;
    nz_kv tmp;
    int rc = nz_kv_init(&tmp, enc->B, enc->S, I, err);
    for (size_t l = 0; !rc && l < cb->r.L; l++) {
        rc = nz_attn_cross_kv(mc, &st->blk[l].cross, enc->x, enc->B, enc->S, enc->pad, &tmp, err);
        nz_kv *kv = &cross[l];
        for (size_t b = 0; !rc && b < enc->B; b++) {
            const size_t e = slots[b];
            memcpy(kv->k + e * kv->cap * I, tmp.k + b * enc->S * I, enc->S * I * sizeof(float));
            memcpy(kv->v + e * kv->cap * I, tmp.v + b * enc->S * I, enc->S * I * sizeof(float));
            memcpy(kv->pad + e * kv->cap, tmp.pad + b * enc->S, enc->S);
            memset(kv->pad + e * kv->cap + enc->S, 1, kv->cap - enc->S);
        }
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
    if (!rc) rc = take_slot(cb, &w->slot, err);
    if (rc) {
        row_free(w);
        return rc;
    }
    w->g = g;
    w->j = j;
    w->k = (uint32_t)g->decs[j];
    w->cap = cap;
    w->start = cb->r.self[0].len;
    nz_rng_seed(&w->rng, g->o.seed ^ ((uint64_t)w->k * STREAM_GOLDEN));
    for (size_t l = 0; l < cb->r.L; l++) memset(cb->r.self[l].pad + w->slot * cb->tcap, 1, w->start);
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
    size_t b = B, need = 1;
    for (cb_group *g = cb->groups; g; g = g->next) /* oldest first: the list is newest first */
        if (g->state == G_PENDING) {
            gs[--b] = g;
            if ((size_t)g->o.max_new_tokens > need) need = (size_t)g->o.max_new_tokens;
        }
    for (b = 0; b < B; b++) {
        src[b] = gs[b]->src;
        len[b] = gs[b]->len;
    }
    NZ_TRY(nz_t5md_encode(mc, t, src, len, B, &enc, err));
    size_t e = 0;
    for (b = 0; b < B; b++) { /* free encoder slots (enc_used grows with reserve_enc) */
        while (e < cb->ecap && cb->enc_used[e]) e++;
        slots[b] = (uint32_t)e++;
    }
    NZ_TRY(reserve_enc(cb, e, enc.S, err));
    if (t->c.kind == NZ_T5MD_TRANSFORMER) {
        for (size_t k = 0; k < t->c.num_modes; k++) {
            int used = 0;
            for (b = 0; b < B && !used; b++)
                for (size_t j = 0; j < gs[b]->D && !used; j++) used = gs[b]->decs[j] == (int)k;
            if (used) NZ_TRY(fill_cross(mc, cb, &t->dec[k], cb->r.cross + k * cb->r.L, &enc, slots, err));
        }
    } else {
        NZ_TRY(fill_cross(mc, cb, &t->dec[0], cb->r.cross, &enc, slots, err));
    }
    NZ_TRY(room_for_step(cb, need, err)); /* sizes the self caches before the first slot */
    for (b = 0; b < B; b++) {
        cb_group *g = gs[b];
        g->enc = slots[b];
        cb->enc_used[slots[b]] = 1;
        g->state = G_RUNNING;
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
    cb->slot_used[w->slot] = 0;
    w->g->live--;
    row_free(w);
    memmove(cb->rows + i, cb->rows + i + 1, (cb->nrows - i - 1) * sizeof *cb->rows);
    cb->nrows--;
}

/* g is done: its encoder slot is free again. */
static void group_done(nz_t5md_cb *cb, cb_group *g) {
    if (g->state == G_RUNNING) cb->enc_used[g->enc] = 0;
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
    if (!rc && cb->nrows) rc = room_for_step(cb, 1, err);
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
