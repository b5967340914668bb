/*
 * nz_t5md_int.h — what the files of the multi-decoder T5 share (not a public
 * API; nz_t5md.h is): the model struct, the decoder rows of a generation
 * (t5md_run) and the searches over them.
 *
 *   nz_t5md.c       config, binding, encoder, results, nz_t5md_generate, memory estimates
 *   nz_t5md_dec.c   decoder rows and steps, the output projection, greedy / sampling
 *   nz_t5md_beam.c  beam search (its bookkeeping also serves nz_t5md_cb's beam groups)
 *   nz_t5md_cb.c    continuous batching
 *   nz_t5md_tok.c   the dialogue tokenizer
 */
#ifndef NZ_T5MD_INT_H
#define NZ_T5MD_INT_H

#include "nz_t5md.h"

#include "nz_alloc.h"

/* rows of the output projection computed per matmul (bounds the logits buffer) */
#define PROJ_CHUNK 64
/* EqHard-EM / t5md_ref: golden-ratio increment separating the decoders' sampling streams */
#define STREAM_GOLDEN 0x9E3779B97F4A7C15ULL

/* Encoder, or one decoder body. */
typedef struct t5_stack {
    size_t nl;
    nz_block *blk;   /* [nl] pre-norm blocks (decoders: has_cross) */
    float *rel;      /* [num_buckets x H] block 0's relative_attention_bias */
    nz_norm fnorm;   /* final_layer_norm */
    nz_weight embed; /* transformer decoders: decoders.{k}.embed_tokens (or shared) */
    char prefix[32]; /* "encoder.", "decoder.", "decoders.3." */
} t5_stack;

struct nz_t5md {
    nz_t5md_config c;
    const nz_model *m;
    nz_weight shared; /* [V x d] shared.weight */
    nz_linear head;   /* [V x d] shared.weight (tied) or lm_head.weight */
    float head_scale; /* d^-0.5 when tied, else 1 */
    t5_stack enc;
    t5_stack *dec; /* [ndec]: 1 (adapter) or K (transformer) */
    size_t ndec;
    nz_adapter *ad; /* adapter variant (not "none"): [dec_layers x 3 x K] */
    uint8_t *used;  /* [ntensors] during nz_t5md_load: tensors bound so far */
};

/* ------------------------------------------------------------------ memory estimate helpers
 * (sizes are doubles, exact below 2^53 bytes; see nz_t5md.c) */

static inline double t5md_dmax(double a, double b) { return a > b ? a : b; }

/* nz_ffn_fwd over M rows: the hidden layer (M d_ff floats, twice that gated, + 1). */
static inline double t5md_ffn_peak(const nz_t5md_config *c, double M) {
    return (c->act == NZ_ACT_GATED_GELU ? 8 : 4) * M * (double)c->d_ff + 1;
}

/* ------------------------------------------------------------------ decoder rows (nz_t5md_dec.c) */

/* The state of one generation call's decoder rows. Rows are decoder-major:
 * the rows of one requested decoder j are contiguous (dj nondecreasing). */
typedef struct t5md_run {
    const nz_t5md *t;
    size_t D;        /* requested decoders */
    const int *decs; /* [D] their ks */
    size_t L;        /* decoder blocks */
    nz_kv *cross;    /* adapter: [L] over the sources; transformer: [D x L] */
    size_t ncross;
    nz_kv *self;      /* [L] self-attention caches of the rows */
    size_t N;         /* rows now */
    uint32_t *src;    /* [N] source (encoder row) of each row */
    uint32_t *dj;     /* [N] requested-decoder index of each row (rows of one index contiguous) */
    uint32_t *slot;   /* [N] self-attention cache row of each row (nz_t5md_cb), or NULL: row i */
    float *x, *h, *y; /* [N0 x d] hidden states, normed input, sublayer output */
    float *bias;      /* [H x (cap + 1)] one step's self-attention position bias */
} t5md_run;

/** Free what r holds and zero it. */
void t5md_run_free(t5md_run *r);

/** Caches and buffers for N0 rows of up to cap positions over enc (D requested decoders decs[D]).
 *  @return NZ_OK or an error (r then holds what was built: t5md_run_free it). */
int t5md_run_init(nz_matmul_ctx *mc, t5md_run *r, const nz_t5md *t, const nz_t5md_enc *enc, const int *decs,
                  size_t D, size_t N0, size_t cap, nz_error *err);

/** The bytes t5md_run_init holds once built (*build: its peak while building). */
double t5md_run_bytes(const nz_t5md *t, double B, double S, double D, double N0, double cap, double *build);

/** t5md_run_select's peak for n rows of caches of cap positions. */
double t5md_select_peak(const nz_t5md *t, double n, double cap);

/** Keep rows keep[0..n) (ascending) of the caches and row maps. @return NZ_OK or an error. */
int t5md_run_select(t5md_run *r, const uint32_t *keep, size_t n, nz_error *err);

/** One decoder step of the r->N rows with input tokens tok[N]: final hidden states into r->x.
 *  @return NZ_OK or an error. */
int t5md_run_step(nz_matmul_ctx *mc, t5md_run *r, const int32_t *tok, nz_error *err);

/** t5md_run_step's largest temporary (n rows per unit, g per adapter group, B x S encoder rows, cap). */
double t5md_step_peak(const nz_t5md *t, double n, double g, double B, double S, double cap);

/** nz_t5md_encode's output for B x S (x, pad, len) and its peak (nz_t5md.c). */
double t5md_enc_bytes(const nz_t5md_config *c, double B, double S);
double t5md_encode_peak(const nz_t5md_config *c, double B, double S);

typedef void (*t5md_row_fn)(void *ctx, size_t row, float *logits);

/** Logits of rows x[0..N) (rows of d floats), PROJ_CHUNK rows per matmul: fn(ctx, row, logits[V]) for each.
 *  @return NZ_OK or an error. */
int t5md_project(nz_matmul_ctx *mc, const nz_t5md *t, const float *x, size_t N, t5md_row_fn fn, void *ctx,
                 nz_error *err);

/** t5md_project's peak for N rows. */
double t5md_project_peak(const nz_t5md *t, double N);

/* Token i of a row's decoder input [start] + gen. */
static inline int32_t t5md_seq_at(const int32_t *gen, size_t i) { return i ? gen[i - 1] : NZ_T5MD_START; }

/** HF NoRepeatNGramLogitsProcessor on one row's scores lg[V] (see nz_t5md_dec.c). */
void t5md_ban_ngrams(float *lg, const int32_t *gen, size_t n_gen, int ngram);

/** t5md_ref._autoregress's choice for one row from its logits lg[V] (modified): unk and repeated n-grams
 *  of its tokens gen[n_gen] masked (o->ban_unk, o->no_repeat_ngram), then the first argmax or nz_sample
 *  with rng (o->strategy; work: nz_sample_work_bytes(V)); *lp from the log_softmax of the masked logits. */
void t5md_pick(const nz_t5md_opts *o, float *lg, size_t V, const int32_t *gen, size_t n_gen, nz_rng *rng,
               void *work, int32_t *tok, float *lp);

/* ------------------------------------------------------------------ searches */

/** Check the options of a generation (strategy, lengths, decoders, beam and sampling settings).
 *  @return NZ_OK, or NZ_E_INVALID_ARG / NZ_E_RANGE naming the option. */
int t5md_check_opts(const nz_t5md *t, const nz_t5md_opts *o, nz_error *err);

/** Fill result r from n tokens / log-probs (copies them; sums in float64). @return NZ_OK or NZ_E_NOMEM. */
int t5md_set_result(nz_t5md_result *r, const int32_t *tok, const float *lp, size_t n, int fin, nz_error *err);

/** Greedy or sampling over enc's rows (valid[b]: the caller's context of encoder row b); results of context
 *  c, decoder j at res[c * D + j]. @return NZ_OK or a batch-wide error. */
int t5md_autoregress(nz_matmul_ctx *mc, const nz_t5md *t, const nz_t5md_enc *enc, const size_t *valid,
                     const nz_t5md_opts *o, const int *decs, size_t D, nz_t5md_result *res, nz_error *err);

/** t5md_autoregress's peak over B encoder rows of S and D decoders. */
double t5md_autoregress_peak(const nz_t5md *t, double B, double S, double D, const nz_t5md_opts *o);

/* ------------------------------------------------------------------ beam search (nz_t5md_beam.c) */

/* A kept hypothesis of an item (HF BeamHypotheses entry). */
typedef struct t5md_bhyp {
    double score; /* sum / len^length_penalty */
    size_t slot;  /* storage slot of its tokens */
    size_t n;     /* tokens */
    int fin;      /* ended with eos */
} t5md_bhyp;

/* A candidate of one step. */
typedef struct t5md_bcand {
    float s;       /* cumulative score */
    uint32_t flat; /* beam x V + token */
    float lp;      /* the token's log-prob */
} t5md_bcand;

/* The beam search of `items` (context, decoder) items of nb beams each (HF beam_search with
 * BeamSearchScorer), whoever runs their decoder rows: t5md_beam_search (the rows of a call, compacted
 * as items finish) or nz_t5md_cb (a beam group's rows in slots of a continuous batch). Beam m of item
 * it is row it x nb + m of the arrays below, wherever its decoder row is. All items take their steps
 * together (one cur_len). A step: t5md_beam_row for every live beam (from its logits), then
 * t5md_beam_item for every live item (in item order), then cur_len++; an item that is not done when the
 * search ends (cur_len >= max_length) gets t5md_beam_end; t5md_beam_results gives an item's returns. */
typedef struct t5md_beam {
    size_t items, nb, V, kk; /* items, beams per item, vocabulary, candidates per row (min(2 nb, V)) */
    size_t cap;              /* tokens a live beam holds: max(max_new_tokens, 1) */
    size_t max_length;       /* 1 + max_new_tokens: the search ends when cur_len reaches it */
    size_t cur_len;          /* HF cur_len: 1 + the tokens of every live beam */
    double lenpen;           /* length_penalty */
    int early, ban_unk, ngram;
    /* hypotheses: per item nb + 1 storage slots of cap + 1 tokens */
    t5md_bhyp *hy;          /* [items x (nb + 1)] kept hypotheses in insertion order */
    size_t *hcnt;           /* [items] how many */
    double *worst;          /* [items] the worst kept score (1e9 while none) */
    uint8_t *slot_use;      /* [items x (nb + 1)] */
    int32_t *htok;          /* [items x (nb + 1) x (cap + 1)] their tokens */
    float *hlp;             /* [items x (nb + 1) x (cap + 1)] their log-probs */
    uint8_t *done;          /* [items] HF is_done */
    int32_t *seq;           /* [items x nb x cap] the live beams' tokens */
    float *seqlp;           /* [items x nb x cap] their log-probs */
    float *bscore;          /* [items x nb] the live beams' scores (start [0, -1e9, ...]) */
    int32_t *stok;          /* [nb x cap] one item's beams while reordered */
    float *slp;             /* [nb x cap] */
    uint32_t *ctok;         /* [items x nb x kk] a step's candidates per row: tokens */
    float *cval, *clp;      /* [items x nb x kk] cumulative scores, log-probs */
    t5md_bcand *pool, *nxt; /* [nb x kk] one item's candidates, [nb] its next beams */
    uint8_t *taken;         /* [nb + 1] t5md_beam_results' scratch */
} t5md_beam;

/** Set up bm for items items with o's beam settings (o checked by t5md_check_opts).
 *  @return NZ_OK or NZ_E_NOMEM (bm then holds what was allocated: t5md_beam_free it). */
int t5md_beam_init(t5md_beam *bm, const nz_t5md *t, const nz_t5md_opts *o, size_t items, nz_error *err);

/** Free what bm holds and zero it. Accepts a zeroed struct. */
void t5md_beam_free(t5md_beam *bm);

/** The bytes t5md_beam_init allocates. */
double t5md_beam_bytes(const nz_t5md *t, double items, const nz_t5md_opts *o);

/* The decoder input of beam m of item it for the next step (its last token, or the start token). */
static inline int32_t t5md_beam_input(const t5md_beam *bm, size_t it, size_t m) {
    const size_t n = bm->cur_len - 1;
    return n ? bm->seq[(it * bm->nb + m) * bm->cap + n - 1] : NZ_T5MD_START;
}

/** Score beam m of item it from its logits lg[V] (modified): log_softmax (fp32), unk and the beam's
 *  repeated n-grams -> -inf, + the beam's score; its kk best candidates (tmp: [V] scratch). */
void t5md_beam_row(t5md_beam *bm, size_t it, size_t m, float *lg, float *tmp);

/** The step of item it once all its beams are scored: its best 2 nb candidates in order (eos ones
 *  ranked < nb become hypotheses, the others the next beams), the done test (bm->done[it]); when not
 *  done the beams are reordered: beam m continues beam parent[m] (parent[nb]) with a new token.
 *  @return NZ_OK, or NZ_E_RANGE when fewer than nb candidates are not eos. */
int t5md_beam_item(t5md_beam *bm, size_t it, uint32_t *parent, nz_error *err);

/** The search ended with item it not done: its live beams are offered as hypotheses (no eos). */
void t5md_beam_end(t5md_beam *bm, size_t it);

/** Deliver the best hypothesis of item it to o->on_token (context, decoder k), token by token. */
void t5md_beam_emit(const t5md_beam *bm, const nz_t5md_opts *o, size_t it, size_t context, int k);

/** The best R hypotheses of item it into res[0..R), best first (ties: the later added); a missing one
 *  gets NZ_E_RANGE in its result. @return NZ_OK or NZ_E_NOMEM. */
int t5md_beam_results(t5md_beam *bm, size_t it, nz_t5md_result *res, size_t R, nz_error *err);

/** Beam search over enc's rows (as t5md_autoregress; R = num_return results per (context, decoder)).
 *  @return NZ_OK or a batch-wide error. */
int t5md_beam_search(nz_matmul_ctx *mc, const nz_t5md *t, const nz_t5md_enc *enc, const size_t *valid,
                     const nz_t5md_opts *o, const int *decs, size_t D, nz_t5md_result *res, nz_error *err);

/** t5md_beam_search's peak. */
double t5md_beam_search_peak(const nz_t5md *t, double B, double S, double D, const nz_t5md_opts *o);

#endif /* NZ_T5MD_INT_H */
