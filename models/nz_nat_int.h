/*
 * nz_nat_int.h — what the files of the fairseq translator share (not a public
 * API; nz_nat.h is): the model struct and the pieces of the AT decoder that
 * the continuous batch (nz_nat_cb.c) runs.
 *
 *   nz_nat.c     config, binding, encoder, decoder forward pieces, their memory estimates
 *   nz_nat_at.c  the AT decoder: score (rerank), greedy and beam search, their memory estimates
 *   nz_nat_cb.c  continuous batching of AT greedy and beam decoding
 *   nz_nat_mp.c  mask-predict: its continuous batch and nz_nat_mask_predict through it
 *   nz_nat_mp_mem.c  mask-predict's memory estimates and batch bound (nz_nat_mp_int.h: their shared structs)
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

/** Decoder features h[A x W x D] of tok[A x W] (nat: the CMLM decoder, key padding, not causal; else the
 *  AT decoder over the full sequence, causal); row a reads encoder row kv_map[a] of the caches cross[l].
 *  @return NZ_OK or an error. */
int nat_decoder_fwd(nz_matmul_ctx *mc, const nz_nat *n, int nat, const int32_t *tok, size_t A, size_t W,
                    const nz_kv *cross, const uint32_t *kv_map, float *h, nz_error *err);

/** Length prediction of mask-predict: L0[b] = the argmax class of log-softmax(mean-pooled encoder row b x
 *  embed_length^T) (minus 128 plus the source length with pred_length_offset), clamped to >= 2.
 *  @return NZ_OK or an error. */
int nat_predict_lengths(nz_matmul_ctx *mc, const nz_nat *n, const nz_nat_enc *enc, long *L0, nz_error *err);

/** A batch-wide failure: every hyps[0..B) without a result (no rc, no tokens) gets err. */
void nat_fail_all(nz_nat_hyp *hyps, size_t B, const nz_error *err);

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

/* AT beam search (fairseq SequenceGenerator + search.BeamSearch): the bookkeeping of one sentence, run
 * by nz_nat_at_beam for each sentence of its batch and by the continuous batch for each beam member, so
 * both choose the same parents, finalize the same hypotheses and return the same result. */

/** A beam candidate: cumulative score s, and flat = beam row j of the sentence x V + token. */
typedef struct nat_beam_cand {
    float s;
    uint32_t flat;
} nat_beam_cand;

/** Check the beam options as nz_nat_at_beam does (beam 1..4096, lenpen finite): *K = min(beam, vocab - 1)
 *  rows per sentence, *kk = min(2 K, vocab) candidates kept per row. @return NZ_OK or NZ_E_INVALID_ARG. */
int nat_beam_setup(const nz_nat *n, int beam, float lenpen, size_t *K, size_t *kk, nz_error *err);

/** One row's candidates at step (0-based) from its log-probs lp[V]: the bans of nat_greedy_pick, plus its
 *  cumulative score cum (step > 0), then its kk best into ctok[kk] (tokens) and cval[kk] (scores), as
 *  nz_topk orders them (tmp: V floats of scratch). */
void nat_beam_row(const float *lp, size_t V, size_t step, size_t max_len, size_t min_len, float cum,
                  size_t kk, float *tmp, uint32_t *ctok, float *cval);

/** One sentence's beam search: its sizes and (borrowed) buffers. */
typedef struct nat_beam {
    size_t K, kk, V;      /* rows, candidates per row (nat_beam_setup), vocabulary */
    size_t cap, max_len;  /* row stride of hist / ftok (max_len + 1), max_len (nat_at_setup) */
    float lenpen;         /* length penalty */
    const uint32_t *ctok; /* [K x kk] this step's candidates of each row (nat_beam_row): tokens */
    const float *cval;    /* [K x kk] and their cumulative scores */
    const int32_t *hist;  /* [K x cap] each row's tokens before this step */
    uint8_t *ignore;      /* [K] fairseq's cands_to_ignore (zero at step 0), updated */
    int32_t *ftok;        /* [K x cap] the finalized hypotheses' tokens [y.., eos] */
    size_t *fn;           /* [K] their token counts */
    float *fsc;           /* [K] their normalized scores */
    size_t *fcnt;         /* hypotheses finalized so far (zero at step 0) */
    nat_beam_cand *pool;  /* [K x kk] scratch */
    uint8_t *em;          /* [2 K] scratch */
} nat_beam;

/** The sentence's selection after step (0-based; at step 0 only row 0's candidates count): its 2 K best
 *  candidates; finite eos among the first K (not ignored) finalized while it has fewer than K.
 *  @return 1 when the sentence is finished (one was finalizable and it has K, or step = max_len), else 0
 *  and the K rows going on: order[K] each one's parent row (0..K-1), hist2[K x cap] its tokens (step + 1
 *  of them), cur[K] its last token, cum2[K] its cumulative score (at step = max_len a sentence that
 *  finalized nothing then still gets rows: its search ends there all the same). */
int nat_beam_select(const nat_beam *b, size_t step, int32_t *hist2, int32_t *cur, float *cum2,
                    uint32_t *order);

/** The sentence's result into hy (fields K, cap, max_len, ftok, fn, fsc, fcnt of b are read): the
 *  finalized hypothesis with the best normalized score (the first on ties), or NZ_E_RANGE in hy->rc when
 *  none was (naming max_len and min_len). @return NZ_OK, or NZ_E_NOMEM for its tokens. */
int nat_beam_result(nz_nat_hyp *hy, const nat_beam *b, int min_len, nz_error *err);

/* Peak memory pieces (bytes as doubles, counted as nz_malloc counts them; nz_nat.c, next to the code whose
 * allocations they mirror). */

/** @return the larger of a and b. */
double nat_dmax(double a, double b);

/** nz_block_fwd over B x T rows of width D (FFN F), self attention stateless or (kv) over a cache of Tk,
 *  cross attention (cross) over kvB x S. @return bytes. */
double nat_block_peak(double B, double T, double D, double F, int kv, double Tk, int cross, double kvB,
                      double S);

/** nz_nat_encode's output for B x S of width D: x, pad, len. @return bytes. */
double nat_enc_bytes(double B, double S, double D);

/** nz_nat_encode's peak over B x S. @return bytes. */
double nat_encode_peak(const nz_nat *n, double B, double S);

/** nat_decoder_fwd's peak over A x W tokens whose rows read cross caches of encB x S. @return bytes. */
double nat_decoder_fwd_peak(const nz_nat *n, int nat, double A, double W, double encB, double S);

/** nat_project_rows' peak for R rows. @return bytes. */
double nat_project_peak(const nz_nat *n, double R);

/** nz_nat_at_score's peak for N hypotheses (inputs at most W wide), R scored rows, over an encoder of
 *  B x S. @return bytes. */
double nat_at_score_peak(const nz_nat *n, double N, double W, double R, double B, double S);

/** One AT decoder step of R rows (T = 1) over self-attention caches of R x cap positions, cross
 *  attention over caches of B x S (nz_nat_at.c). @return bytes. */
double nat_at_step_peak(const nz_nat *n, double R, double cap, double B, double S);

/* Free nl caches kv[nl] (NULL: nothing). */
void nat_kvs_free(nz_kv *kv, size_t nl);

/* Cross-attention keys/values of every layer of decoder s over enc into *out (nat_kvs_free).
 * @return NZ_OK or an error. */
int nat_cross_kvs(nz_matmul_ctx *mc, const nz_nat *n, const nat_stack *s, const nz_nat_enc *enc, nz_kv **out,
                  nz_error *err);

/* nat_cross_kvs of stack s over B x S encoder rows: the bytes held once built; *build: the peak while
 * they are built. */
double nat_cross_kvs_bytes(const nz_nat *n, const nat_stack *s, double B, double S, double *build);

/* Zero hyps[B], check every sentence of src[B x S]; the valid ones are copied into *vsrc [*nv x S]
 * and listed in *vidx (both nz_free). @return NZ_OK or NZ_E_NOMEM. */
int nat_prepare(const nz_nat *n, const int32_t *src, size_t B, size_t S, nz_nat_hyp *hyps, int32_t **vsrc,
                size_t **vidx, size_t *nv, nz_error *err);

/* nat_prepare's buffers for B sources of width S. */
double nat_prepare_bytes(double B, double S);

/* nat_stack_embed's peak over M rows of width D. */
double nat_embed_peak(const nat_stack *s, double M, double D);

#endif /* NZ_NAT_INT_H */
