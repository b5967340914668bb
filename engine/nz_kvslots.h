/*
 * nz_kvslots.h — the caches of a continuously batched decoder: sequences come
 * and go between steps, so their rows of the attention caches are slots that
 * are taken and given back.
 *
 * Self-attention (nz_kvself): L caches (one per decoder layer) of rcap slots
 * x tcap positions that all hold positions [0, P) (P = their len). A slot
 * taken at P has its positions [0, P) marked as padding: its sequence's first
 * key goes to position P, and attention over the slot sees only its own keys
 * (nz_attn_self_rows). When P reaches tcap, every slot in use slides left by
 * the earliest start (or, when a sequence started at 0 is still running, the
 * caches grow). With a position bias that depends only on key - query, or
 * positions the caller counts per sequence, the results are
 * those of the sequence alone.
 *
 * Cross-attention (nz_kvenc): caches (one per layer, or per decoder and
 * layer) of ecap encoder slots x scap positions, filled by the caller for the
 * slots it takes, padding beyond each source.
 *
 * Memory: NZ_MEM_KV (caches) and NZ_MEM_ACTIVATIONS (bookkeeping); it grows
 * with the slots and positions in use and stays until the free call.
 */
#ifndef NZ_KVSLOTS_H
#define NZ_KVSLOTS_H

#include "nz_layer.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Self-attention caches with slots. Zero-initialise, then use. */
typedef struct nz_kvself {
    nz_kv *kv;     /* [L] caches of rcap slots x tcap positions, width D */
    size_t L, D;   /* layers, width (heads x head size) */
    size_t rcap;   /* slots */
    size_t tcap;   /* positions per slot */
    uint8_t *used; /* [rcap] */
    size_t *start; /* [rcap] position of a used slot's first key */
} nz_kvself;

/** Set up s for L layers of width D with room for tcap positions (no slot
 *  yet). @return NZ_OK or NZ_E_NOMEM. */
int nz_kvself_init(nz_kvself *s, size_t L, size_t D, size_t tcap, nz_error *err);

/** Free the caches. Accepts NULL and a zeroed struct. */
void nz_kvself_free(nz_kvself *s);

/** @return P, the position the next step writes (every slot's next key). */
size_t nz_kvself_pos(const nz_kvself *s);

/** Take a free slot (the caches grow when none is) for a sequence starting
 *  at the current position: its earlier positions become padding.
 *  @return NZ_OK and *slot, or NZ_E_NOMEM. */
int nz_kvself_take(nz_kvself *s, uint32_t *slot, nz_error *err);

/** Give slot back. */
void nz_kvself_give(nz_kvself *s, uint32_t slot);

/** @return the position at which slot's sequence started. */
size_t nz_kvself_start(const nz_kvself *s, uint32_t slot);

/** Beam reorder inside B slots: slots[b] takes the keys, values, padding
 *  and start of slots[src[b]] (src[B], each < B), as they were before the
 *  call. Every slots[b] must be in use. @return NZ_OK or NZ_E_NOMEM (the
 *  caches are then unchanged). */
int nz_kvself_permute(nz_kvself *s, const uint32_t *slots, const uint32_t *src, size_t B, nz_error *err);

/** Room for one more step: slides the slots in use left by the earliest
 *  start when the caches are full (or grows them).
 *  @return NZ_OK or NZ_E_NOMEM. */
int nz_kvself_room(nz_kvself *s, nz_error *err);

/** The bytes s can hold (NZ_MEM_KV + NZ_MEM_ACTIVATIONS, as nz_malloc counts them) while it grows from its
 *  state now to serve at most `rows` slots in use at once and sequences of at most `positions` positions,
 *  with nz_kvself_permute calls over at most `permute` slots: the caches at their grown capacities, one
 *  cache's old copy while it is resized, the slot arrays (old and new while resized) and a permute's
 *  copies. *rcap and *tcap (either may be NULL) get those capacities. A bound: the caches never shrink
 *  before nz_kvself_free, so it holds for the rest of s's life if no more rows or positions are needed. */
double nz_kvself_bound(const nz_kvself *s, size_t rows, size_t positions, size_t permute, size_t *rcap,
                       size_t *tcap);

/** Cross-attention caches with encoder slots. Zero-initialise, then use. */
typedef struct nz_kvenc {
    nz_kv *kv;     /* [n] caches of ecap slots x scap positions, width D (len = scap) */
    size_t n, D;   /* caches, width */
    size_t ecap;   /* encoder slots */
    size_t scap;   /* positions per slot */
    uint8_t *used; /* [ecap] */
} nz_kvenc;

/** Set up e with n caches of width D (no slot yet). @return NZ_OK or NZ_E_NOMEM. */
int nz_kvenc_init(nz_kvenc *e, size_t n, size_t D, nz_error *err);

/** Free the caches. Accepts NULL and a zeroed struct. */
void nz_kvenc_free(nz_kvenc *e);

/** Take B free slots into slots[B] with room for S positions each (the
 *  caches grow as needed: to exactly B slots the first time, geometrically
 *  after; the new positions of slots in use are padding).
 *  @return NZ_OK or NZ_E_NOMEM (nothing taken). */
int nz_kvenc_take(nz_kvenc *e, size_t B, size_t S, uint32_t *slots, nz_error *err);

/** Give slot back. */
void nz_kvenc_give(nz_kvenc *e, uint32_t slot);

/** The bytes e can hold (NZ_MEM_KV + NZ_MEM_ACTIVATIONS) while it grows from its state now to hold at
 *  most `slots` slots in use at once, of sources of at most S positions, if the slots it does not hold
 *  yet are taken by one nz_kvenc_take (several takes may grow it further: call again before each): the
 *  caches at their grown capacity, one cache's old copy while it is resized, the slot flags (old and new).
 *  *ecap (may be NULL) gets that capacity. */
double nz_kvenc_bound(const nz_kvenc *e, size_t slots, size_t S, size_t *ecap);

/** Copy sequence b of tmp (keys of B x S, from nz_attn_cross_kv) into slot of
 *  cache i, padding after its S positions. */
void nz_kvenc_fill(nz_kvenc *e, size_t i, uint32_t slot, const nz_kv *tmp, size_t b);

#ifdef __cplusplus
}
#endif
#endif /* NZ_KVSLOTS_H */
