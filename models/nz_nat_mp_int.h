/*
 * nz_nat_mp_int.h — what mask-predict's two files share (not a public API; nz_nat.h is):
 *
 *   nz_nat_mp.c      the continuous batch (nz_nat_mpb_*) and nz_nat_mask_predict through it
 *   nz_nat_mp_mem.c  its memory: the alone peak estimate, a member's bytes, the batch's bound
 *
 * The estimates mirror the batch's allocations, so they read its structs: a change to a buffer in
 * nz_nat_mp.c needs the matching change in nz_nat_mp_mem.c (test_nat_mpcb checks both against the
 * allocator at every step).
 */
#ifndef NZ_NAT_MP_INT_H
#define NZ_NAT_MP_INT_H

#include "nz_nat_int.h"

#include "nz_kvslots.h"

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

/* A re-masking sort key: a positional score and its position. */
typedef struct sort_key {
    float s;
    uint32_t i;
} sort_key;

/* nz_nat_mask_predict's option checks. @return NZ_OK or the error. */
int nat_mp_check_opts(const nz_nat *n, const nz_nat_opts *o, nz_error *err);

/* Length candidate j of a sentence whose predicted length is L0: L0 + j - beam / 2 within [2, maxL]
 * (maxL: max_target_positions, or o->max_len below it). @return its length in tokens. */
size_t nat_mp_cand_len(const nz_nat *n, const nz_nat_opts *o, long L0, size_t j);

#endif
