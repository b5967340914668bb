/* nz_kvslots — slots of the attention caches of a continuously batched decoder (see nz_kvslots.h). */
#include "nz_kvslots.h"

#include "nz_alloc.h"

#include <string.h>

/* ------------------------------------------------------------------ self-attention */

int nz_kvself_init(nz_kvself *s, size_t L, size_t D, size_t tcap, nz_error *err) {
    memset(s, 0, sizeof *s);
    s->kv = nz_calloc(L ? L : 1, sizeof *s->kv, NZ_MEM_KV);
    if (!s->kv) return nz_fail(err, NZ_E_NOMEM, "out of memory for decoder caches");
    s->L = L;
    s->D = D;
    s->tcap = tcap ? tcap : 1;
    return NZ_OK;
}

void nz_kvself_free(nz_kvself *s) {
    if (!s) return;
    for (size_t l = 0; s->kv && l < s->L; l++) nz_kv_free(&s->kv[l]);
    nz_free(s->kv);
    nz_free(s->used);
    nz_free(s->start);
    memset(s, 0, sizeof *s);
}

size_t nz_kvself_pos(const nz_kvself *s) { return s->rcap ? s->kv[0].len : 0; }

size_t nz_kvself_start(const nz_kvself *s, uint32_t slot) { return s->start[slot]; }

int nz_kvself_take(nz_kvself *s, uint32_t *slot, nz_error *err) {
    size_t i = 0;
    while (i < s->rcap && s->used[i]) i++;
    if (i == s->rcap) { /* every slot is used: twice the slots */
        const size_t m = nz_grow_cap(s->rcap, s->rcap + 1);
        if (nz_resize_array(&s->used, m, 1, NZ_MEM_ACTIVATIONS) ||
            nz_resize_array(&s->start, m, sizeof *s->start, NZ_MEM_ACTIVATIONS))
            return nz_fail(err, NZ_E_NOMEM, "out of memory for decoder slots");
        for (size_t l = 0; l < s->L; l++) {
            int rc = s->rcap ? nz_kv_resize(&s->kv[l], m, s->tcap, err)
                             : nz_kv_init(&s->kv[l], m, s->tcap, s->D, err);
            if (rc) return rc;
        }
        memset(s->used + s->rcap, 0, m - s->rcap);
        s->rcap = m;
    }
    const size_t P = nz_kvself_pos(s);
    for (size_t l = 0; l < s->L; l++) memset(s->kv[l].pad + i * s->tcap, 1, P);
    s->used[i] = 1;
    s->start[i] = P;
    *slot = (uint32_t)i;
    return NZ_OK;
}

void nz_kvself_give(nz_kvself *s, uint32_t slot) { s->used[slot] = 0; }

int nz_kvself_permute(nz_kvself *s, const uint32_t *slots, const uint32_t *src, size_t B, nz_error *err) {
    const size_t P = nz_kvself_pos(s), D = s->D, row = P * D;
    if (!B || !P) return NZ_OK;
    float *tmp = nz_malloc(B * row * sizeof(float), NZ_MEM_KV);
    uint8_t *ptmp = nz_malloc(B * P, NZ_MEM_KV);
    size_t *stmp = nz_malloc(B * sizeof *stmp, NZ_MEM_KV);
    if (!tmp || !ptmp || !stmp) {
        nz_free(tmp);
        nz_free(ptmp);
        nz_free(stmp);
        return nz_fail(err, NZ_E_NOMEM, "out of memory reordering decoder slots");
    }
    for (size_t l = 0; l < s->L; l++) {
        nz_kv *kv = &s->kv[l];
        float *planes[2] = {kv->k, kv->v};
        for (int p = 0; p < 2; p++) {
            for (size_t b = 0; b < B; b++)
                memcpy(tmp + b * row, planes[p] + slots[src[b]] * kv->cap * D, row * sizeof(float));
            for (size_t b = 0; b < B; b++)
                memcpy(planes[p] + slots[b] * kv->cap * D, tmp + b * row, row * sizeof(float));
        }
        for (size_t b = 0; b < B; b++) memcpy(ptmp + b * P, kv->pad + slots[src[b]] * kv->cap, P);
        for (size_t b = 0; b < B; b++) memcpy(kv->pad + slots[b] * kv->cap, ptmp + b * P, P);
    }
    for (size_t b = 0; b < B; b++) stmp[b] = s->start[slots[src[b]]];
    for (size_t b = 0; b < B; b++) s->start[slots[b]] = stmp[b];
    nz_free(tmp);
    nz_free(ptmp);
    nz_free(stmp);
    return NZ_OK;
}

int nz_kvself_room(nz_kvself *s, nz_error *err) {
    const size_t P = nz_kvself_pos(s), D = s->D;
    if (!s->rcap || P + 1 <= s->tcap) return NZ_OK;
    size_t m = P;
    for (size_t i = 0; i < s->rcap; i++)
        if (s->used[i] && s->start[i] < m) m = s->start[i];
    if (m > 0) { /* slide: positions [m, P) of the slots in use move to [0, P - m) */
        for (size_t l = 0; l < s->L; l++) {
            nz_kv *kv = &s->kv[l];
            for (size_t i = 0; i < s->rcap; i++) {
                if (!s->used[i]) continue;
                memmove(kv->k + i * kv->cap * D, kv->k + (i * kv->cap + m) * D, (P - m) * D * sizeof(float));
                memmove(kv->v + i * kv->cap * D, kv->v + (i * kv->cap + m) * D, (P - m) * D * sizeof(float));
                memmove(kv->pad + i * kv->cap, kv->pad + i * kv->cap + m, P - m);
            }
            kv->len = P - m;
        }
        for (size_t i = 0; i < s->rcap; i++)
            if (s->used[i]) s->start[i] -= m;
        return NZ_OK;
    }
    const size_t cap = nz_grow_cap(s->tcap, P + 1);
    for (size_t l = 0; l < s->L; l++) {
        int rc = nz_kv_resize(&s->kv[l], s->rcap, cap, err);
        if (rc) return rc;
    }
    s->tcap = cap;
    return NZ_OK;
}

/* Bytes of one cache of B x cap positions of width D (nz_kv_init: k, v, pad). */
static double kv_bytes(double B, double cap, double D) { return B * cap * (8 * D + 1); }

double nz_kvself_bound(const nz_kvself *s, size_t rows, size_t positions, size_t permute, size_t *rcap,
                       size_t *tcap) {
    /* nz_kvself_take doubles the slots when every one is used (the first take allocates 8); nz_kvself_room
     * doubles the positions when a sequence started at position 0 still runs at the capacity (else it
     * slides). A resize holds one layer's old copy with the new caches: at most the last doubling's. */
    const size_t R = rows <= s->rcap ? s->rcap : nz_grow_cap(s->rcap, rows);
    const size_t T = positions <= s->tcap ? s->tcap : nz_grow_cap(s->tcap, positions);
    if (rcap) *rcap = R;
    if (tcap) *tcap = T;
    const size_t first = s->rcap ? s->rcap : nz_grow_cap(0, 1);
    const double oldR = R > s->rcap && R / 2 >= first ? (double)(R / 2) : 0,
                 oldT = T > s->tcap ? (double)(T / 2) : 0;
    const double L = (double)s->L, D = (double)s->D, dR = (double)R, dT = (double)T, B = (double)permute;
    const double arrays = (L ? L : 1) * sizeof(nz_kv) + 2 * dR * (1 + sizeof(size_t)); /* kv; used, start */
    const double old =
        kv_bytes(oldR, dT, D) > kv_bytes(dR, oldT, D) ? kv_bytes(oldR, dT, D) : kv_bytes(dR, oldT, D);
    const double perm = B ? 4 * B * dT * D + B * dT + B * sizeof(size_t) : 0; /* tmp, ptmp, stmp */
    return arrays + L * kv_bytes(dR, dT, D) + old + perm;
}

/* ------------------------------------------------------------------ cross-attention */

int nz_kvenc_init(nz_kvenc *e, size_t n, size_t D, nz_error *err) {
    memset(e, 0, sizeof *e);
    e->kv = nz_calloc(n ? n : 1, sizeof *e->kv, NZ_MEM_KV);
    if (!e->kv) return nz_fail(err, NZ_E_NOMEM, "out of memory for cross-attention caches");
    e->n = n;
    e->D = D;
    return NZ_OK;
}

void nz_kvenc_free(nz_kvenc *e) {
    if (!e) return;
    for (size_t i = 0; e->kv && i < e->n; i++) nz_kv_free(&e->kv[i]);
    nz_free(e->kv);
    nz_free(e->used);
    memset(e, 0, sizeof *e);
}

int nz_kvenc_take(nz_kvenc *e, size_t B, size_t S, uint32_t *slots, nz_error *err) {
    size_t need = 0, free_ = 0;
    for (size_t i = 0; i < e->ecap; i++) free_ += !e->used[i];
    need = e->ecap + (B > free_ ? B - free_ : 0);
    if (need > e->ecap || S > e->scap) {
        /* the first take gets exactly its slots (a batch of one holds one source's caches), later ones
         * grow geometrically */
        const size_t ne = need > e->ecap ? (e->ecap ? nz_grow_cap(e->ecap, need) : need) : e->ecap,
                     ns = S > e->scap ? S : e->scap;
        for (size_t i = 0; i < e->n; i++) {
            nz_kv *kv = &e->kv[i];
            int rc = e->ecap ? nz_kv_resize(kv, ne, ns, err) : nz_kv_init(kv, ne, ns, e->D, err);
            if (rc) return rc;
            for (size_t b = 0; b < ne; b++) memset(kv->pad + b * ns + e->scap, 1, ns - e->scap);
            kv->len = ns;
        }
        if (nz_resize_array(&e->used, ne, 1, NZ_MEM_ACTIVATIONS))
            return nz_fail(err, NZ_E_NOMEM, "out of memory for encoder slots");
        memset(e->used + e->ecap, 0, ne - e->ecap);
        e->ecap = ne;
        e->scap = ns;
    }
    size_t i = 0;
    for (size_t b = 0; b < B; b++) {
        while (e->used[i]) i++;
        e->used[i] = 1;
        slots[b] = (uint32_t)i;
    }
    return NZ_OK;
}

void nz_kvenc_give(nz_kvenc *e, uint32_t slot) { e->used[slot] = 0; }

double nz_kvenc_bound(const nz_kvenc *e, size_t slots, size_t S, size_t *ecap) {
    /* nz_kvenc_take: exactly the slots the first time, then geometrically; positions: the widest source; one
     * resize, holding one cache's old copy with the new caches */
    const size_t E = slots <= e->ecap ? e->ecap : e->ecap ? nz_grow_cap(e->ecap, slots) : slots;
    const size_t W = S > e->scap ? S : e->scap;
    if (ecap) *ecap = E;
    const double n = (double)(e->n ? e->n : 1), dE = (double)E, D = (double)e->D;
    const double old = (E > e->ecap || W > e->scap) ? kv_bytes((double)e->ecap, (double)e->scap, D) : 0;
    return n * sizeof(nz_kv) + 2 * dE + (double)e->n * kv_bytes(dE, (double)W, D) + old;
}

void nz_kvenc_fill(nz_kvenc *e, size_t i, uint32_t slot, const nz_kv *tmp, size_t b) {
    nz_kv *kv = &e->kv[i];
    const size_t D = e->D, S = tmp->len;
    memcpy(kv->k + slot * kv->cap * D, tmp->k + b * tmp->cap * D, S * D * sizeof(float));
    memcpy(kv->v + slot * kv->cap * D, tmp->v + b * tmp->cap * D, S * D * sizeof(float));
    memcpy(kv->pad + slot * kv->cap, tmp->pad + b * tmp->cap, S);
    memset(kv->pad + slot * kv->cap + S, 1, kv->cap - S);
}
