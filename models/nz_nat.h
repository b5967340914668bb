/*
 * nz_nat.h — the translation model family: fairseq CMLM (mask-predict
 * non-autoregressive) transformer with an optional autoregressive decoder
 * sharing its encoder (multi-task-nat's mt_transformer).
 *
 * The model directory schema (config.json with fairseq argument names,
 * model.safetensors with encoder.* / decoder.* / at_decoder.* tensors) is
 * described in models/train/README_train.md; the PyTorch reference every
 * function here is token-identical to is models/train/nat_ref.py:
 *
 *   nz_nat_mask_predict   nat_ref.mask_predict (fairseq IterativeRefinementGenerator
 *                         + CMLMNATransformerModel.forward_decoder), incl. length
 *                         beam, fixed iterations (fairseq --iter-decode-force-max-iter,
 *                         the default) or adaptive early stop, and AT rerank
 *   nz_nat_at_greedy      nat_ref.at_greedy (fairseq SequenceGenerator, beam 1)
 *   nz_nat_at_beam        nat_ref.at_beam (fairseq SequenceGenerator, beam search)
 *
 * Token conventions (fairseq dictionary): bos 0, pad 1, eos 2, unk 3 (unk is
 * also the CMLM mask). Sources are [bos, x.., eos] rows of a right- or
 * left-padded [B x S] matrix (pad = 1). Results:
 *   mask-predict  [bos, y.., eos] as nat_ref returns them (the length class
 *                 counts bos and eos; with adaptive stopping a hypothesis may
 *                 keep re-masked unk tokens, as fairseq's does: the tokens it
 *                 compares are the re-masked ones);
 *   AT greedy/beam [y.., eos] (no bos, fairseq SequenceGenerator's convention).
 *
 * Every sentence is checked on its own (ids inside the vocabulary, at least
 * one non-pad token, at most max_source_positions of them): a bad sentence
 * gets its own error in its result and the others are decoded. Memory:
 * activations in NZ_MEM_ACTIVATIONS, attention caches in NZ_MEM_KV, the
 * model struct and results in NZ_MEM_OTHER, small parameters in
 * NZ_MEM_WEIGHTS (through nz_layer.h). The model borrows the nz_model: free
 * the nz_nat first.
 */
#ifndef NZ_NAT_H
#define NZ_NAT_H

#include "nz_layer.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NZ_NAT_BOS  0
#define NZ_NAT_PAD  1
#define NZ_NAT_EOS  2
#define NZ_NAT_UNK  3
#define NZ_NAT_MASK NZ_NAT_UNK

/** The network's hyper-parameters, read from config.json (fairseq names;
 *  absent or null keys take nat_ref.ARCH_DEFAULTS). */
typedef struct nz_nat_config {
    size_t d_model; /* encoder_embed_dim (== decoder_embed_dim) */
    size_t vocab;   /* rows of encoder.embed_tokens.weight */
    size_t enc_layers, enc_ffn, enc_heads;
    size_t dec_layers, dec_ffn, dec_heads; /* CMLM decoder; the AT decoder has the same sizes */
    size_t at_layers;                      /* at_decoder_layers, 0: no AT decoder */
    int at_prepend_bos; /* multi-task-nat's AT input [eos, bos, y..]: not supported by the AT functions */
    int enc_pre_norm, dec_pre_norm; /* encoder_/decoder_normalize_before */
    int enc_learned_pos, dec_learned_pos;
    int no_positions;        /* no_token_positional_embeddings */
    int layernorm_embedding; /* encoder and AT decoder (fairseq's NAT decoder does not apply it) */
    int pred_length_offset;  /* length class = target length - source length + 128 */
    size_t length_classes;   /* rows of decoder.embed_length.weight (256) */
    size_t max_source_positions, max_target_positions;
    nz_act act;        /* NZ_ACT_RELU or NZ_ACT_GELU (activation_fn "relu" / "gelu") */
    float embed_scale; /* sqrt(d_model), or 1 with no_scale_embedding */
    float ln_eps;      /* layer_norm_eps (1e-5) */
} nz_nat_config;

typedef struct nz_nat nz_nat;

/** Read config.json of m, check it (architecture "cmlm_transformer",
 *  share_all_embeddings, equal encoder/decoder widths, heads dividing the
 *  width, relu/gelu, no src_embedding_copy, fairseq special ids) and bind
 *  every tensor: shared embed_tokens (also the tied output projection),
 *  positions, layernorm_embedding, encoder / CMLM decoder / AT decoder
 *  layers, final layer norms (normalize_before), embed_length.
 *  m must outlive the returned model.
 *  @return NZ_OK and *out, or NZ_E_FORMAT / NZ_E_UNSUPPORTED /
 *          NZ_E_NOT_FOUND with a message naming the key or tensor. */
int nz_nat_load(const nz_model *m, nz_nat **out, nz_error *err);

/** Free a model from nz_nat_load. Accepts NULL. */
void nz_nat_free(nz_nat *n);

/** @return the model's configuration (borrowed). */
const nz_nat_config *nz_nat_get_config(const nz_nat *n);

/** Check one source row src[S] (pad = 1 anywhere): ids inside [0, vocab),
 *  at least one non-pad token, at most max_source_positions of them.
 *  *len (may be NULL) receives the non-pad count.
 *  @return NZ_OK, NZ_E_RANGE (naming the id or the limit) or
 *          NZ_E_INVALID_ARG (empty source). */
int nz_nat_check_source(const nz_nat *n, const int32_t *src, size_t S, size_t *len, nz_error *err);

/** Encoder output of B sentences. */
typedef struct nz_nat_enc {
    size_t B, S, D;
    float *x;     /* [B x S x D] encoder output (padding rows are unspecified) */
    uint8_t *pad; /* [B x S] 1 = padding */
    size_t *len;  /* [B] non-pad tokens */
} nz_nat_enc;

/** Run the shared encoder over src[B x S] (every row must pass
 *  nz_nat_check_source; the first that does not fails the call, naming it).
 *  @return NZ_OK and *enc (free with nz_nat_enc_free), or an error. */
int nz_nat_encode(nz_matmul_ctx *mc, const nz_nat *n, const int32_t *src, size_t B, size_t S, nz_nat_enc *enc,
                  nz_error *err);

/** Free the buffers of enc. Accepts NULL and a zeroed struct. */
void nz_nat_enc_free(nz_nat_enc *enc);

/** Mask-predict options (nz_nat_opts_default: 10, 1, 0, 0, 0, no stop hook). */
typedef struct nz_nat_opts {
    int max_iter;    /* T >= 0: T + 1 decoder passes */
    int length_beam; /* >= 1 length candidates per sentence */
    int adaptive;    /* 0: exactly T + 1 passes (fairseq --iter-decode-force-max-iter, as
                        multi-task-nat and the mask-predict paper decode); 1: stop a candidate
                        whose tokens did not change in a pass (fairseq's generator default;
                        it can leave re-masked unk tokens in the output) */
    int rerank_at;   /* score the candidates with the AT decoder (teacher forcing) */
    int max_len; /* > 0: candidate lengths (incl. bos/eos) capped here too; 0: max_target_positions only */
    int keep_candidates; /* fill nz_nat_hyp.cands with every length candidate (not only the chosen one) */
    /* optional: called once the lengths are predicted, before the passes allocate, with W = the longest
     * candidate (incl. bos/eos): the run's memory is then nz_nat_mask_predict_peak_bytes with max_len = W
     * at most (a caller that reserved memory for the worst length gives the rest back) */
    void (*on_width)(void *arg, size_t W);
    void *width_arg;
    int (*stop)(
        void *arg); /* optional: checked before every decoder pass; nonzero stops with NZ_E_CANCELLED */
    void *stop_arg;
} nz_nat_opts;

/** Fill o with the defaults. */
void nz_nat_opts_default(nz_nat_opts *o);

/** AT greedy / beam options (nz_nat_at_opts_default: 0, 200, 1, no stop hook). */
typedef struct nz_nat_at_opts {
    double max_len_a; /* max_len = min(a * S + b, max_target_positions - 1), S = padded source width */
    int max_len_b;
    int min_len; /* eos banned before this many tokens */
    int (*stop)(
        void *arg); /* optional: checked before every decoder step; nonzero stops with NZ_E_CANCELLED */
    void *stop_arg;
} nz_nat_at_opts;

/** Fill o with the defaults. */
void nz_nat_at_opts_default(nz_nat_at_opts *o);

/** One sentence's result. */
/** One length candidate of a mask-predict hypothesis (nz_nat_opts.keep_candidates). */
typedef struct nz_nat_cand {
    int32_t *tokens; /* [n] as nz_nat_hyp.tokens, NZ_MEM_OTHER */
    size_t n;        /* tokens */
    float score;     /* its ranking score: the AT score with rerank (NaN when unscorable), else nat_score */
    float nat_score; /* mean positional score */
    size_t length;   /* its length incl. bos/eos */
} nz_nat_cand;

typedef struct nz_nat_hyp {
    int rc;             /* NZ_OK, or this sentence's error (message in err) */
    nz_error err;       /* set when rc != NZ_OK */
    int32_t *tokens;    /* [n] (see the conventions above), NZ_MEM_OTHER */
    size_t n;           /* tokens */
    float score;        /* mask-predict: mean positional score, or the AT score with rerank;
                           AT greedy: mean log-prob of the n tokens;
                           AT beam: sum of the n log-probs / n^lenpen */
    float nat_score;    /* mask-predict: mean positional score (== score without rerank) */
    int steps;          /* mask-predict: pass that finalized it (0-based); AT: tokens generated */
    size_t length;      /* mask-predict: the chosen candidate's length (incl. bos/eos) */
    size_t candidate;   /* mask-predict: index of the chosen length candidate (0 .. length_beam-1) */
    nz_nat_cand *cands; /* [n_cands] every length candidate in candidate order (keep_candidates), else NULL */
    size_t n_cands;
} nz_nat_hyp;

/** Free the tokens of hyps[0..B) and zero them. Accepts NULL. */
void nz_nat_hyps_free(nz_nat_hyp *hyps, size_t B);

/** Mask-predict decoding of src[B x S] (nat_ref.mask_predict), run as a
 *  nz_nat_mpb batch of its own (every sentence joins at its first step):
 *  encoder once per sentence; length = argmax of log-softmax(mean-pooled encoder output x
 *  embed_length^T) (minus 128 plus the source length with
 *  pred_length_offset), clamped to >= 2; length-beam candidates L0 - b/2 + j
 *  clamped to [2, max_target_positions] (the upper clamp is ours: fairseq
 *  has none and fails beyond its position table); all candidates of all
 *  sentences go through the decoder together, each candidate row reading
 *  its sentence's encoder keys (kv_map); after pass t < T the
 *  floor((L-2) * p) lowest-scoring tokens are re-masked (p = float32(1 -
 *  (t+1)/(T+1)), stable ascending sort: ties lower position first); a
 *  candidate stops when its tokens did not change (adaptive) or after pass
 *  T; candidate score = mean positional score; the first best candidate
 *  wins (after the AT rerank when asked). o->stop is checked before every
 *  pass, o->on_width called once, after the encoder and length prediction.
 *  hyps[B] receives every sentence's result or error (free with
 *  nz_nat_hyps_free, also after an error return).
 *  @return NZ_OK when the batch ran (sentence errors are in hyps), or a
 *          batch-wide error (invalid options, out of memory, a weight tile
 *          that fails to decode), then copied into every hyps[i].rc. */
int nz_nat_mask_predict(nz_matmul_ctx *mc, const nz_nat *n, const int32_t *src, size_t B, size_t S,
                        const nz_nat_opts *o, nz_nat_hyp *hyps, nz_error *err);

/** Greedy decoding with the AT decoder (nat_ref.at_greedy, fairseq
 *  SequenceGenerator with beam 1): incremental (KV cache), starting from
 *  [eos]; pad never chosen; eos banned while step < min_len and forced at
 *  step max_len. hyps as in nz_nat_mask_predict.
 *  @return NZ_OK, NZ_E_UNSUPPORTED (no AT decoder, or at_prepend_bos) or a
 *          batch-wide error. */
int nz_nat_at_greedy(nz_matmul_ctx *mc, const nz_nat *n, const int32_t *src, size_t B, size_t S,
                     const nz_nat_at_opts *o, nz_nat_hyp *hyps, nz_error *err);

/** Beam search with the AT decoder (nat_ref.at_beam, fairseq
 *  SequenceGenerator + search.BeamSearch with normalize_scores, no unk
 *  penalty, no repeat-ngram blocking): beam = min(beam, vocab - 1) rows per
 *  sentence, all sentences' rows batched through the decoder with the KV
 *  cache (cross-attention rows mapped to their sentence's encoder row,
 *  self-attention caches reordered to the surviving rows each step,
 *  finished sentences' rows dropped). Step t: pad banned, eos banned while
 *  t < min_len, only eos at t = max_len (as nz_nat_at_greedy); cumulative
 *  float32 scores; the 2 * beam best (row, token) candidates of a sentence
 *  (at t = 0 from its row 0 only; ties to the lower row x vocab + token);
 *  eos candidates with a finite score among the first beam are finalized
 *  with score cum / (t + 1)^lenpen while the sentence has fewer than beam;
 *  a sentence that finalized one stops when it has beam of them or at
 *  t = max_len; the others go on with the first beam non-eos candidates
 *  (fairseq's cands_to_ignore rule included). Result: the finalized
 *  hypothesis with the best normalized score (the first on ties): tokens
 *  [y.., eos], score = its normalized score, steps = its token count.
 *  beam 1 gives nz_nat_at_greedy's tokens. A sentence that finalized
 *  nothing (min_len > max_len) gets NZ_E_RANGE in its result. Memory: the
 *  self-attention caches hold sentences x beam rows of max_len + 1
 *  positions per AT layer (NZ_MEM_KV). hyps as in nz_nat_mask_predict.
 *  @return NZ_OK, NZ_E_UNSUPPORTED (no AT decoder, or at_prepend_bos),
 *          NZ_E_INVALID_ARG (beam outside 1..4096, lenpen not finite, bad
 *          max_len / min_len) or a batch-wide error. */
int nz_nat_at_beam(nz_matmul_ctx *mc, const nz_nat *n, const int32_t *src, size_t B, size_t S,
                   const nz_nat_at_opts *o, int beam, float lenpen, nz_nat_hyp *hyps, nz_error *err);

/** Teacher-forced AT score (fairseq IterativeRefinementGenerator.rerank):
 *  for each of the N hypotheses hyp[i] ([bos, y.., eos], len[i] tokens,
 *  len[i] >= 2) of encoder row sent[i] of enc, the mean log-prob of
 *  [y.., eos] given [eos, y..]. scores[N].
 *  @return NZ_OK, NZ_E_UNSUPPORTED (no AT decoder) or an error. */
int nz_nat_at_score(nz_matmul_ctx *mc, const nz_nat *n, const nz_nat_enc *enc, const int32_t *const *hyp,
                    const size_t *len, const uint32_t *sent, size_t N, float *scores, nz_error *err);

/* Peak memory of a call, from its shape alone (no allocation, no model compute): an upper bound of the
 * bytes the call holds at once in NZ_MEM_ACTIVATIONS + NZ_MEM_KV + the NZ_MEM_OTHER results it makes,
 * for src[B x S] with every sentence valid (invalid ones only lower it), counted as nz_malloc counts
 * them (the allocator's 64-byte headers and malloc's own overhead are not included). Options the call
 * refuses give the little it allocates before refusing them. */

/** Peak of nz_nat_mask_predict(mc, n, src, B, S, o, ...); len[B] (NULL: 0) the non-pad token counts of
 *  the sources (an upper bound of each is enough). The candidates' lengths come from the length
 *  predictor, known only after the encoder ran: the estimate takes the longest it can give
 *  (length_classes - 1, with pred_length_offset that - 128 + the source length) plus the length beam's
 *  spread, capped by max_target_positions and o->max_len; it is tight when a sentence's prediction is
 *  that long, or when o->max_len caps the candidates. Covers the encoder, length prediction, every
 *  mask-predict pass (all candidates active: fixed or adaptive iterations alike), the AT rerank and the
 *  results. @return bytes. */
uint64_t nz_nat_mask_predict_peak_bytes(const nz_nat *n, const size_t *len, size_t B, size_t S,
                                        const nz_nat_opts *o);

/** Peak of nz_nat_at_greedy(mc, n, src, B, S, o, ...): the encoder, the AT cross and self caches of
 *  max_len + 1 positions (allocated whole before the first step), a step, the results (every sentence
 *  assumed to run to max_len). @return bytes. */
uint64_t nz_nat_at_greedy_peak_bytes(const nz_nat *n, size_t B, size_t S, const nz_nat_at_opts *o);

/** Peak of nz_nat_at_beam(mc, n, src, B, S, o, beam, ...): as nz_nat_at_greedy_peak_bytes for B x beam
 *  rows, plus the search's buffers and the caches' reorder copies (at max_len positions). With B = 1 and
 *  S = max(2, len) it is also what a beam sentence of nz_nat_cb_add_beam adds to a continuous batch, as
 *  nz_nat_at_greedy_peak_bytes is for nz_nat_cb_add (the batch's own rounding of its caches' rows and
 *  positions aside). @return bytes. */
uint64_t nz_nat_at_beam_peak_bytes(const nz_nat *n, size_t B, size_t S, const nz_nat_at_opts *o, int beam);

/* ------------------------------------------------------- continuous batching */

/** A continuously batched AT decoder, greedy and beam search mixed:
 *  sentences join at step boundaries and leave when done (greedy: at their
 *  eos; beam: when their search is finished) or when removed, and one
 *  nz_nat_cb_step runs one decoder step for every running sentence, so each
 *  weight tile decoded serves all of them. A greedy sentence is one decoder
 *  row, a beam sentence min(beam, vocab - 1) rows (its beam, reordered
 *  after each step as nz_nat_at_beam reorders it) until it is done. A
 *  sentence's result is bit for bit what nz_nat_at_greedy / nz_nat_at_beam
 *  gives it alone (batch of one: max_len from its own length), whatever
 *  joins or leaves around it. Memory (NZ_MEM_KV / ACTIVATIONS) grows with
 *  the rows and positions in use and stays until nz_nat_cb_free (a beam
 *  sentence also holds its search's buffers, as nz_nat_at_beam's for one
 *  sentence, from nz_nat_cb_add_beam until it is taken or removed). One
 *  thread at a time. */
typedef struct nz_nat_cb nz_nat_cb;

/** @return NZ_OK and an empty batch over n (n must outlive it), NZ_E_UNSUPPORTED (no AT decoder) or
 *  NZ_E_NOMEM. */
int nz_nat_cb_create(const nz_nat *n, nz_nat_cb **out, nz_error *err);

/** Free a batch and every sentence in it. Accepts NULL. */
void nz_nat_cb_free(nz_nat_cb *cb);

/** Add a sentence: src[len] (no padding; copied), AT greedy with o (o->stop unused). It joins at the
 *  next nz_nat_cb_step. owner identifies it in nz_nat_cb_take and nz_nat_cb_remove.
 *  @return NZ_OK, or the error nz_nat_at_greedy gives it (bad source or options), or NZ_E_NOMEM. */
int nz_nat_cb_add(nz_nat_cb *cb, const int32_t *src, size_t len, const nz_nat_at_opts *o, void *owner,
                  nz_error *err);

/** Add a sentence decoded by beam search: as nz_nat_cb_add, with nz_nat_at_beam's beam and lenpen (o
 *  as there: min_len, max_len_a / max_len_b over its own length). It takes min(beam, vocab - 1) decoder
 *  rows while it runs; its result is nz_nat_at_beam's for it alone (beam 1 included: a beam search of
 *  one, scored as nz_nat_at_beam scores it, not nz_nat_cb_add's greedy score).
 *  @return NZ_OK, or the error nz_nat_at_beam gives it (bad source, options, beam outside 1..4096, lenpen
 *  not finite), or NZ_E_NOMEM. */
int nz_nat_cb_add_beam(nz_nat_cb *cb, const int32_t *src, size_t len, const nz_nat_at_opts *o, int beam,
                       float lenpen, void *owner, nz_error *err);

/** One step: the sentences added since the last step are encoded together and join; then one decoder
 *  step over every running sentence (a greedy sentence that made eos, or went max_len steps without, is
 *  done; a beam sentence is done when nz_nat_at_beam's search of it ends).
 *  @return NZ_OK, or the step's error (NZ_E_CANCELLED from mc, a tile error, out of memory): every
 *  sentence is then done with it in its result. */
int nz_nat_cb_step(nz_matmul_ctx *mc, nz_nat_cb *cb, nz_error *err);

/** Take the oldest done sentence: its result (as nz_nat_at_greedy's or nz_nat_at_beam's, an NZ_E_RANGE
 *  in it included; free with nz_nat_hyps_free) and its owner. @return 1, or 0 when none is done. */
int nz_nat_cb_take(nz_nat_cb *cb, void **owner, nz_nat_hyp *hyp);

/** Remove owner's sentence now (cancelled). An unknown owner is ignored. */
void nz_nat_cb_remove(nz_nat_cb *cb, void *owner);

/** @return sentences decoding now. */
size_t nz_nat_cb_rows(const nz_nat_cb *cb);

/** @return their decoder rows (self-attention cache slots in use): 1 per greedy sentence, min(beam,
 *  vocab - 1) per beam sentence. */
size_t nz_nat_cb_decoder_rows(const nz_nat_cb *cb);

/** @return sentences in the batch (waiting to join, decoding, or done and not taken). */
size_t nz_nat_cb_size(const nz_nat_cb *cb);

/** The memory bound of a continuous batch (nz_nat_cb_bound, nz_nat_mpb_bound), bytes in
 *  NZ_MEM_ACTIVATIONS + NZ_MEM_KV + NZ_MEM_OTHER counted as nz_malloc counts them, from now until every
 *  sentence in it is done and taken if no other sentence joins: held, the most it holds between steps
 *  and through them (its caches at the capacities they can grow to with a resize's old copy, its step
 *  buffers, every sentence's own buffers and its result with the caller's text); step, the most one step
 *  adds on top while it runs (the joiners' encoder pass, a decoder step or pass with its projection, a
 *  rerank). A bound: the batch's memory never exceeds held + step, and neither grows across a step, a
 *  take or a removal. */
typedef struct nz_nat_bound {
    uint64_t held; /* bytes held, at most */
    uint64_t step; /* the largest transient of one step */
} nz_nat_bound;

/** The bound of cb (NULL: a batch not created yet, nz_nat_cb_create's allocations included) with nj
 *  sentences of lens[i] ids joining now (before the next nz_nat_cb_step) with o, greedy (beam 0, as
 *  nz_nat_cb_add) or beam search of beam (nz_nat_cb_add_beam); lens and o ignored when nj is 0; a joiner
 *  its options refuse adds nothing. out: the bytes a token the caller adds to each result it takes (its
 *  detokenized text: the longest symbol; 0: none), counted with one more byte for every sentence's
 *  result. Cheap (no allocation). */
void nz_nat_cb_bound(const nz_nat *n, const nz_nat_cb *cb, const size_t *lens, size_t nj,
                     const nz_nat_at_opts *o, int beam, size_t out, nz_nat_bound *r);

/** Continuously batched mask-predict: sentences join at pass boundaries and leave when done or removed.
 *  A step encodes the sentences added since the last one together, predicts their lengths and lays out
 *  their length-beam candidates ([bos, mask.., eos]), then runs one CMLM decoder pass over every active
 *  candidate of every sentence (padded to the widest; each reads its sentence's encoder slot), then per
 *  candidate the re-masking and termination with its own sentence's options and pass count (max_iter,
 *  adaptive, max_len, length_beam). A sentence whose every candidate ended is done: its hypothesis is
 *  chosen as nz_nat_mask_predict chooses it (first best nat score, or with rerank_at the AT decoder's
 *  score, over its kept encoder rows; keep_candidates as there). A sentence's result is bit for bit
 *  nz_nat_mask_predict's for it alone (a batch of one), whatever joins or leaves around it
 *  (nz_nat_mask_predict runs through this batch). Memory: NZ_MEM_ACTIVATIONS and NZ_MEM_KV; a sentence
 *  holds its source until it joins, its candidates, its cross cache slot (and with rerank_at its encoder
 *  rows) until it is done, then its result until taken; a step allocates its pass's buffers and frees
 *  them (nz_nat_mpb_member_bytes). The cross caches keep their slots until nz_nat_mpb_free. One thread at
 *  a time. */
typedef struct nz_nat_mpb nz_nat_mpb;

/** @return NZ_OK and an empty batch over n (n must outlive it), or NZ_E_NOMEM. */
int nz_nat_mpb_create(const nz_nat *n, nz_nat_mpb **out, nz_error *err);

/** Free a batch and every sentence in it. Accepts NULL. */
void nz_nat_mpb_free(nz_nat_mpb *b);

/** Add a sentence: src[len] (pad = 1 anywhere; copied), mask-predict with o (NULL: the defaults; o->stop
 *  and o->on_width unused: cancel through mc, read the widths through nz_nat_mpb_member_bytes). It joins
 *  at the next nz_nat_mpb_step; owner identifies it in nz_nat_mpb_take, _remove and _member_bytes.
 *  @return NZ_OK, or the error nz_nat_mask_predict gives it (bad options: NZ_E_INVALID_ARG,
 *  NZ_E_UNSUPPORTED for rerank_at without an AT decoder; bad source: NZ_E_RANGE, NZ_E_INVALID_ARG), or
 *  NZ_E_NOMEM; nothing is added then. */
int nz_nat_mpb_add(nz_nat_mpb *b, const int32_t *src, size_t len, const nz_nat_opts *o, void *owner,
                   nz_error *err);

/** One step: the sentences added since the last step join (encoded together); one decoder pass over
 *  every active candidate; the sentences whose candidates all ended are done (reranked together).
 *  @return NZ_OK, or the step's error (NZ_E_CANCELLED from mc, a tile error, out of memory): every
 *  sentence not done is then done with it in its result. */
int nz_nat_mpb_step(nz_matmul_ctx *mc, nz_nat_mpb *b, nz_error *err);

/** Take the oldest done sentence: its result (as nz_nat_mask_predict's; free with nz_nat_hyps_free) and
 *  its owner. @return 1, or 0 when none is done. */
int nz_nat_mpb_take(nz_nat_mpb *b, void **owner, nz_nat_hyp *hyp);

/** Remove owner's sentence now (cancelled), at any step. An unknown owner is ignored. */
void nz_nat_mpb_remove(nz_nat_mpb *b, void *owner);

/** @return sentences in the batch (waiting to join, decoding, or done and not taken). */
size_t nz_nat_mpb_size(const nz_nat_mpb *b);

/** @return the candidates still refining (the rows of the next pass, before joiners). */
size_t nz_nat_mpb_candidates(const nz_nat_mpb *b);

/** Owner's memory in the batch given what is known now (0 for an unknown owner): waiting to join, as
 *  nz_nat_mask_predict_peak_bytes for it alone (its candidates at the longest length the predictor can
 *  give) with the batch's cross cache width; decoding, with its candidates' actual lengths, its pass
 *  rows padded to the batch's widest active candidate (its share of a pass: the pass's buffers, the
 *  decoder and the projection chunk), its rerank and its result; done, its result. It only shrinks
 *  while the sentence runs, except when a wider candidate joins (its pass rows are padded to it). The
 *  batch's own rounding of its cross cache slots (nz_kvenc's doubling) is not included. @return bytes. */
uint64_t nz_nat_mpb_member_bytes(const nz_nat_mpb *b, const void *owner);

/** The bound of b (NULL: a batch not created yet, nz_nat_mpb_create's allocations included) with nj
 *  sentences of lens[i] ids joining now (before the next nz_nat_mpb_step) with o (NULL: the defaults;
 *  o->keep_candidates as nz_nat_mpb_add takes it); lens and o ignored when nj is 0; joiners their
 *  options refuse add nothing. A sentence's candidates are taken at the longest the length predictor can
 *  give until its lengths are predicted, then at their lengths: the bound shrinks then. out: as
 *  nz_nat_cb_bound, for every result and every kept candidate. Cheap (no allocation). */
void nz_nat_mpb_bound(const nz_nat *n, const nz_nat_mpb *b, const size_t *lens, size_t nj,
                      const nz_nat_opts *o, size_t out, nz_nat_bound *r);

#ifdef __cplusplus
}
#endif
#endif /* NZ_NAT_H */
