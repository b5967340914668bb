/*
 * nz_nat_int.h — what the files of the fairseq translator share (not a public
 * API; nz_nat.h is): the model struct and the pieces of the AT decoder that
 * the continuous batch (nz_nat_cb.c) runs.
 *
 *   nz_nat.c     config, binding, encoder, mask-predict, AT greedy and beam, memory estimates
 *   nz_nat_cb.c  continuous batching of AT greedy decoding
 */
#ifndef NZ_NAT_INT_H
#define NZ_NAT_INT_H

#include "nz_nat.h"

#include "nz_alloc.h"

/* rows of the output projection computed per matmul (bounds the logits buffer) */
#define PROJ_CHUNK 256
/* pred_length_offset: length classes are centred on 128 (fairseq) */
#define LENGTH_OFFSET 128

typedef enum pos_kind { POS_NONE = 0, POS_LEARNED, POS_SINUSOIDAL } pos_kind;

/* Embeddings and layers of the encoder or one decoder. */
typedef struct nat_stack {
    size_t nlayers;
    nz_block *layers; /* [nlayers] */
    pos_kind pos;
    nz_weight pos_table; /* learned: [max_positions + 2 x D] (rows 0, 1 = below / padding) */
    size_t pos_rows;     /* rows of pos_table */
    int has_emb_norm;
    nz_norm emb_norm; /* layernorm_embedding [D] */
    int has_final_norm;
    nz_norm final_norm; /* layer_norm [D] (normalize_before) */
} nat_stack;

struct nz_nat {
    nz_nat_config c;
    const nz_model *m;
    nz_weight embed;    /* [V x D] encoder.embed_tokens.weight, shared by everything */
    nz_linear out_proj; /* [V x D] the same matrix (tied output projection), no bias */
    nz_linear length;   /* [length_classes x D] decoder.embed_length.weight, no bias */
    nat_stack enc, dec, at;
};

/** Token embeddings of tok[B x T] (scaled) plus the positions of stack s (fairseq make_positions from
 *  start, or per sequence from starts[b] when starts is not NULL), then the embedding layer norm when
 *  emb_norm and s has one, into out[B x T x D]. @return NZ_OK or an error. */
int nat_stack_embed(nz_matmul_ctx *mc, const nz_nat *n, const nat_stack *s, const int32_t *tok, size_t B,
                    size_t T, int64_t start, const int64_t *starts, int emb_norm, float *out, nz_error *err);

/** x[B x T x D] through the layers of s (io filled by the caller except the per-layer caches self_kv[l],
 *  cross_kv[l]), then the final layer norm. @return NZ_OK or an error. */
int nat_stack_layers(nz_matmul_ctx *mc, const nat_stack *s, float *x, nz_block_io *io, nz_kv *self_kv,
                     const nz_kv *cross_kv, nz_error *err);

typedef void (*nat_row_fn)(void *ctx, size_t i, const float *lp);

/** Log-probabilities of rows h[rows[0..R)] (rows of D floats), PROJ_CHUNK per matmul: fn(ctx, i, lp[V]).
 *  @return NZ_OK or an error. */
int nat_project_rows(nz_matmul_ctx *mc, const nz_nat *n, const float *h, const size_t *rows, size_t R,
                     nat_row_fn fn, void *ctx, nz_error *err);

/** AT decoding's checks and its max_len for a source of padded width S. @return NZ_OK or an error. */
int nat_at_setup(const nz_nat *n, const nz_nat_at_opts *o, size_t S, size_t *max_len, nz_error *err);

/** h->tokens = a copy of tok[k] (NZ_MEM_OTHER), h->n = k. @return NZ_OK or NZ_E_NOMEM. */
int nat_set_tokens(nz_nat_hyp *h, const int32_t *tok, size_t k, nz_error *err);

/** fairseq SequenceGenerator's greedy choice at step (0-based) from log-probs lp[V]: pad banned, only eos
 *  from max_len on, eos banned before min_len, then the first argmax (tmp: V floats of scratch). */
int32_t nat_greedy_pick(const float *lp, size_t V, size_t step, size_t max_len, size_t min_len, float *tmp);

#endif /* NZ_NAT_INT_H */
