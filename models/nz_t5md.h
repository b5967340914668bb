/*
 * nz_t5md.h — the dialogue model family: a T5 encoder with K decoders
 * trained by EqHard-EM (Wen et al., "An Equal-Size Hard EM Algorithm for
 * Diverse Dialogue Generation"), so that the K decoders give K different
 * responses to one context, ranked by mean token log-probability.
 *
 * Two variants (config.json "multidecoder"):
 *   adapter      EqHard-EM MultiAdapterT5: one decoder body, K adapters per
 *                decoder sublayer, a_k(y) = i2o(relu(o2i(y))) + y applied to
 *                each sublayer's output before its residual add ("none", a
 *                plain T5, is accepted too: K = 1 without adapter tensors);
 *   transformer  EqHard-EM MultiDecoderT5: K full decoder copies, each with
 *                its own input embedding; the output head stays shared /
 *                lm_head.
 *
 * The model directory schema (config.json keys, tensor names) and the
 * decoding contracts are models/train/README_dialogue.md; the PyTorch
 * reference every function here is token-identical to is
 * models/train/t5md_ref.py:
 *
 *   nz_t5md_generate, NZ_T5MD_GREEDY  t5md_ref.greedy
 *   nz_t5md_generate, NZ_T5MD_BEAM    t5md_ref.beam (HF beam_search +
 *                                     BeamSearchScorer semantics)
 *   nz_t5md_generate, NZ_T5MD_SAMPLE  t5md_ref.sample (engine nz_sample, one
 *                                     nz_rng stream per (context, decoder))
 *   nz_t5md_rank                      t5md_ref.rank
 *   nz_t5md_encode_context            t5md_ref.join_context
 *   nz_t5md_decode_text               t5md_ref.Tokenizer.decode
 *
 * Token ids (T5, fixed): pad 0 (also the decoder start token), eos 1, unk 2
 * (banned from every output by default, as EqHard-EM's bad_words_ids).
 * Sources are id sequences of their own lengths (no padding id: 0 inside a
 * source is an ordinary token, as in the reference, which masks by length);
 * a context is normally [ids.., eos] as nz_t5md_encode_context builds it.
 *
 * Batching: every (context, decoder[, beam]) row of a call goes through one
 * decoder pass per step. Rows are decoder-major (all contexts of the first
 * requested decoder, then the next decoder...), so each decoder's rows are a
 * contiguous group: the adapter variant runs the shared body once over all
 * rows (one decode of each weight tile serves every decoder) and applies
 * each group's adapters to its rows; the transformer variant runs each
 * group through its own decoder copy. Finished rows (greedy / sampling) and
 * finished (context, decoder) items (beam) are dropped from the batch and
 * from the KV caches (nz_kv_select).
 *
 * Every context is checked on its own (ids inside the vocabulary, at least
 * one id): a bad context gets its own error in its results and the others
 * are decoded. Memory: activations in NZ_MEM_ACTIVATIONS, self- and
 * cross-attention caches in NZ_MEM_KV, the model struct, tokenizer results
 * and generation results in NZ_MEM_OTHER, small parameters (norm gains,
 * adapter biases, position bias tables) in NZ_MEM_WEIGHTS (through
 * nz_layer.h). The model borrows the nz_model: free the nz_t5md first.
 * Nothing here calls exit(); every failure is an NZ_E_* code with a message.
 */
#ifndef NZ_T5MD_H
#define NZ_T5MD_H

#include "nz_layer.h"
#include "nz_spm.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NZ_T5MD_PAD   0
#define NZ_T5MD_EOS   1
#define NZ_T5MD_UNK   2
#define NZ_T5MD_START NZ_T5MD_PAD /* decoder_start_token_id */

/* Upper bounds the engine accepts (beyond them a request is refused). */
#define NZ_T5MD_MAX_SOURCE     65536 /* ids per context */
#define NZ_T5MD_MAX_NEW_TOKENS 65536
#define NZ_T5MD_MAX_BEAM       1024

typedef enum nz_t5md_kind {
    NZ_T5MD_ADAPTER = 0,    /* "adapter" (or "none": K = 1, no adapters) */
    NZ_T5MD_TRANSFORMER = 1 /* "transformer": K decoder copies */
} nz_t5md_kind;

/** The network's hyper-parameters and the dialogue input settings, read
 *  from config.json (README_dialogue.md; absent or null network keys take
 *  t5md_ref.DEFAULT_CONFIG, absent dialogue keys take what
 *  t5md_ref.load_tokenizer uses: no separator, no truncation). */
typedef struct nz_t5md_config {
    nz_t5md_kind kind;
    int plain;             /* multidecoder "none": K = 1 and no adapter tensors */
    size_t num_modes;      /* K decoders */
    size_t adapter_hidden; /* r, adapter bottleneck (adapter variant) */
    size_t vocab;          /* vocab_size (rows of shared.weight) */
    size_t d_model, d_kv, d_ff, num_heads;
    size_t inner; /* num_heads * d_kv (may differ from d_model) */
    size_t enc_layers, dec_layers;
    int num_buckets, max_distance; /* relative_attention_num_buckets / _max_distance */
    float eps;                     /* layer_norm_epsilon */
    nz_act act;                    /* NZ_ACT_RELU ("relu") or NZ_ACT_GATED_GELU ("gated-gelu") */
    int tied;                      /* tie_word_embeddings: logits = (h * d_model^-0.5) shared^T */
    char turn_separator[64];       /* "" (turns joined with a space) or a piece such as "<sep>" */
    size_t max_context_turns;      /* 0: all turns */
    size_t max_source_length;      /* 0: no limit; else the last N - 1 ids, then eos */
    size_t max_target_length;      /* informative (training response length incl. eos) */
} nz_t5md_config;

typedef struct nz_t5md nz_t5md;

/** Read config.json of m (architecture "t5_multidecoder"; every key of the
 *  README schema is checked: types, ranges, the fixed T5 ids, the
 *  feed-forward kind, the variant) and bind every tensor: shared.weight,
 *  the encoder blocks (relative_attention_bias in block 0), the decoder
 *  body with its adapters (adapter variant) or the K decoder copies with
 *  their embeddings (transformer variant; a missing
 *  decoders.{k}.embed_tokens.weight falls back to shared.weight as
 *  t5md_ref.load_model_dir does), the final norms and the head
 *  (shared.weight tied, or lm_head.weight). A tensor of the model that a
 *  model of this configuration does not have (more blocks or decoders than
 *  config.json says, lm_head with tied embeddings, wi_0 with relu, ...) is
 *  refused, as the reference's strict load refuses it. m must outlive the
 *  returned model.
 *  @return NZ_OK and *out, or NZ_E_FORMAT / NZ_E_UNSUPPORTED /
 *          NZ_E_NOT_FOUND / NZ_E_NOMEM with a message naming the key or
 *          tensor. */
int nz_t5md_load(const nz_model *m, nz_t5md **out, nz_error *err);

/** Free a model from nz_t5md_load. Accepts NULL. */
void nz_t5md_free(nz_t5md *t);

/** @return the model's configuration (borrowed, valid while t lives). */
const nz_t5md_config *nz_t5md_get_config(const nz_t5md *t);

/** Check one source src[n]: 1 <= n <= NZ_T5MD_MAX_SOURCE and every id in
 *  [0, vocab).
 *  @return NZ_OK, NZ_E_INVALID_ARG (empty source) or NZ_E_RANGE (naming the
 *          id and its position, or the length). */
int nz_t5md_check_source(const nz_t5md *t, const int32_t *src, size_t n, nz_error *err);

/** Encoder output of B sources. */
typedef struct nz_t5md_enc {
    size_t B, S, D; /* sources, padded width (longest source), d_model */
    float *x;       /* [B x S x D] encoder output (final RMSNorm applied; padding rows unspecified) */
    uint8_t *pad;   /* [B x S] 1 = padding */
    size_t *len;    /* [B] source lengths */
} nz_t5md_enc;

/** Run the encoder over sources src[b][0..len[b]) (b < B), right-padded
 *  into one batch: x = shared[src], blocks (bidirectional T5 position bias,
 *  padding keys masked), final RMSNorm. Every source must pass
 *  nz_t5md_check_source (the first that does not fails the call, naming it).
 *  @return NZ_OK and *enc (free with nz_t5md_enc_free), or an error (then
 *          *enc is zeroed). */
int nz_t5md_encode(nz_matmul_ctx *mc, const nz_t5md *t, const int32_t *const *src, const size_t *len,
                   size_t B, nz_t5md_enc *enc, nz_error *err);

/** Free the buffers of enc. Accepts NULL and a zeroed struct. */
void nz_t5md_enc_free(nz_t5md_enc *enc);

typedef enum nz_t5md_strategy {
    NZ_T5MD_GREEDY = 0, /* first argmax of the unk-masked logits */
    NZ_T5MD_BEAM = 1,   /* HF beam search (t5md_ref.beam) */
    NZ_T5MD_SAMPLE = 2  /* nz_sample with a per-(context, decoder) nz_rng stream */
} nz_t5md_strategy;

/** Streaming hook: called for every generated token as soon as it is final:
 *  greedy / sampling: after each step, for each (context, decoder) row that
 *  generated a token; beam: the best hypothesis of a (context, decoder)
 *  item, token by token, once that item is settled (it is done, or the
 *  search ended). context is the index in the caller's batch, decoder the
 *  decoder k, pos the token's position in the response (0-based). */
typedef void (*nz_t5md_token_fn)(void *arg, size_t context, int decoder, size_t pos, int32_t token,
                                 float logprob);

/** Generation options (nz_t5md_opts_default: greedy, 63 new tokens, beam 4,
 *  length_penalty 1, no early stopping, 1 return, temperature 1, no top-k /
 *  top-p cut, seed 0, unk banned, no n-gram ban, all decoders, no hooks).
 *
 *  no_repeat_ngram n (HF NoRepeatNGramLogitsProcessor): for a row whose
 *  decoder input is seq = [0 (start)] + its tokens so far, cur_len =
 *  len(seq), nothing is banned while cur_len + 1 < n; otherwise every token
 *  t such that seq[cur_len - n + 1 .. cur_len) + [t] already occurs in seq
 *  (as seq[s .. s + n) with s + n <= cur_len) gets -inf. n = 1 bans every
 *  token of seq, the start token 0 included. */
typedef struct nz_t5md_opts {
    nz_t5md_strategy strategy;
    int max_new_tokens;    /* 0 .. NZ_T5MD_MAX_NEW_TOKENS (EqHard-EM's max_length 64 = 63) */
    int ban_unk;           /* unk logit -inf (EqHard-EM bad_words_ids=[[unk]]) */
    int no_repeat_ngram;   /* 0 = off; else HF no_repeat_ngram_size n (0 .. NZ_T5MD_MAX_NEW_TOKENS): a
                              token that would repeat an n-gram of the row's [start] + tokens gets -inf
                              (greedy / sampling: on the logits with the unk ban; beam: after log_softmax) */
    const int *decoders;   /* [n_decoders] decoder ks in output order (repeats allowed); NULL: 0..K-1 */
    size_t n_decoders;     /* 0 with decoders NULL: all K */
    int beam_size;         /* beam: 1 .. NZ_T5MD_MAX_BEAM */
    double length_penalty; /* beam: hypothesis score = sum / len^length_penalty */
    int early_stopping;    /* beam: an item is done as soon as it holds beam_size hypotheses */
    int num_return;        /* beam: 1 .. beam_size results per (context, decoder), best first */
    float temperature;     /* sample: <= 0 is greedy (no draw) */
    uint32_t top_k;        /* sample: 0 = no cut; 1 is greedy (no draw) */
    float top_p;           /* sample: >= 1 = no nucleus cut */
    uint64_t seed;         /* sample: request seed of every context... */
    const uint64_t *seeds; /* ...or [B] one per context (NULL: seed); decoder k of context b draws from
                              nz_rng_seed(seeds[b] ^ (k * 0x9E3779B97F4A7C15)) */
    int (*stop)(
        void *arg); /* optional: checked before every decoder step; nonzero stops with NZ_E_CANCELLED */
    void *stop_arg;
    nz_t5md_token_fn on_token; /* optional streaming hook */
    void *token_arg;
} nz_t5md_opts;

/** Fill o with the defaults (see nz_t5md_opts). */
void nz_t5md_opts_default(nz_t5md_opts *o);

/** One response: (context, decoder[, beam return index]). */
typedef struct nz_t5md_result {
    int rc;              /* NZ_OK, or this result's error (message in err) */
    nz_error err;        /* set when rc != NZ_OK */
    size_t context;      /* index of the context in the batch */
    int decoder;         /* decoder k */
    int32_t *tokens;     /* [n] generated ids, eos included when the response ended with it (NZ_MEM_OTHER) */
    float *logprobs;     /* [n] token log-probs: greedy / sample: log_softmax of the unk-masked logits;
                            beam: the log_softmax values the beam summed (unk masked afterwards) */
    size_t n;            /* tokens */
    double sum_logprob;  /* float64 sum of logprobs */
    double mean_logprob; /* sum_logprob / n (0 when n == 0): the ranking key */
    double beam_score;   /* beam: the hypothesis score (HF sequences_scores); NAN otherwise */
    double consensus;    /* nz_t5md_consensus: mean agreement with the other responses of its context,
                            0..1; NAN until computed */
    int finished;        /* the response ended with eos */
} nz_t5md_result;

/** @return the number of results nz_t5md_generate writes for B contexts:
 *  B x decoders (o->n_decoders, or K) x (beam: o->num_return, else 1). */
size_t nz_t5md_result_count(const nz_t5md *t, const nz_t5md_opts *o, size_t B);

/** Free the buffers of res[0..n) and zero them. Accepts NULL. */
void nz_t5md_results_free(nz_t5md_result *res, size_t n);

/** Generate responses for B contexts src[b][0..len[b]) with every requested
 *  decoder (t5md_ref.greedy / beam / sample, exactly; README_dialogue.md,
 *  "Decoding contracts"). All decoders start from token 0 and decode until
 *  they emit eos (kept in the tokens) or max_new_tokens tokens. The
 *  encoder runs once per call; cross-attention keys/values are computed
 *  once per source (adapter variant) or per source and requested decoder
 *  (transformer variant); self-attention caches hold max_new_tokens
 *  positions per row (NZ_MEM_KV).
 *  res receives nz_t5md_result_count(t, o, B) results, laid out
 *  res[(b * D + j) * R + r] for context b, requested decoder j (D of them)
 *  and beam return r (R = num_return for beam, else 1; r = 0 is the best);
 *  free them with nz_t5md_results_free, also after an error return.
 *  Beam search (per (context, decoder) item, HF semantics): beam scores
 *  start [0, -1e9, ...] (fp32); per step log_softmax of the logits (fp32),
 *  unk -> -inf, no_repeat_ngram bans -> -inf (each beam's own tokens), plus
 *  the beam score; the top 2 * beam (ties: lower
 *  beam x V + token) are taken in order: eos candidates ranked < beam
 *  become hypotheses (score sum / len^length_penalty, len = tokens before
 *  eos + 1), other candidates fill the next beams; an item is done when it
 *  holds beam hypotheses and (early_stopping or its worst score >= best
 *  candidate / cur_len^length_penalty); at the end live beams of unfinished
 *  items are offered with len = 1 + max_new_tokens. beam_size 1 gives the
 *  greedy tokens. (With max_new_tokens 0 beam search still takes one step,
 *  as the reference's loop does; greedy and sampling take none.)
 *  @return NZ_OK when the batch ran (context errors are in their results),
 *          or a batch-wide error (invalid options: NZ_E_INVALID_ARG /
 *          NZ_E_RANGE naming the option; NZ_E_CANCELLED from the stop hook;
 *          out of memory; a weight tile that fails to decode), then copied
 *          into every result that has no tokens. */
int nz_t5md_generate(nz_matmul_ctx *mc, const nz_t5md *t, const int32_t *const *src, const size_t *len,
                     size_t B, const nz_t5md_opts *o, nz_t5md_result *res, nz_error *err);

/** Upper bound of the bytes nz_t5md_generate(mc, t, src, len, B, o, ...) holds at its peak in
 *  NZ_MEM_ACTIVATIONS + NZ_MEM_KV + its NZ_MEM_OTHER results, from the shape alone: B contexts of len[b]
 *  ids (every one that can be valid counted) and o (NULL: the defaults). Cheap (no allocation, no model
 *  compute). The largest of: the encoder (incl. its H x S x S position bias); the decoder run's caches
 *  (cross: per source, per requested decoder with the transformer variant; self: B x decoders [x beam]
 *  rows of max_new_tokens positions, allocated whole before the first step) with the search's buffers
 *  and a step, the projection chunk (PROJ_CHUNK rows), a cache reorder, the results (every row assumed
 *  to run to max_new_tokens). Not counted: what o->on_token and o->stop allocate, the allocator's
 *  per-block headers, the tile cache and decode scratch. Invalid options give 0 (refused before any
 *  allocation). @return bytes. */
uint64_t nz_t5md_peak_bytes(const nz_t5md *t, const size_t *len, size_t B, const nz_t5md_opts *o);

/* ------------------------------------------------------- continuous batching */

/** A continuously batched decoder (greedy, sampling and beam search, mixed):
 *  groups (one source with its options each) join at step boundaries and
 *  leave when done or removed, and one nz_t5md_cb_step runs one decoder step
 *  for every row of every group, so each weight tile decoded serves all of
 *  them. A greedy / sampled group has one row per requested decoder; a beam
 *  group has beam_size rows per requested decoder (its items) while that
 *  item is live: after each step its beams are chosen as nz_t5md_generate
 *  chooses them and its rows' caches reordered; a done item's rows leave. A
 *  group's results (and streamed tokens) are token-for-token and bit-for-bit
 *  those nz_t5md_generate gives for its source alone with its options
 *  (seed: o->seed), whatever joins or leaves around it. Memory (NZ_MEM_KV /
 *  ACTIVATIONS) grows with the rows and positions in use and stays until
 *  nz_t5md_cb_free. One thread at a time. */
typedef struct nz_t5md_cb nz_t5md_cb;

/** @return NZ_OK and an empty batch over t (t must outlive it), or NZ_E_NOMEM. */
int nz_t5md_cb_create(const nz_t5md *t, nz_t5md_cb **out, nz_error *err);

/** Free a batch and every group in it. Accepts NULL. */
void nz_t5md_cb_free(nz_t5md_cb *cb);

/** Add a group: source src[len] (copied), decoded with o (greedy, sampling
 *  or beam search with every beam option nz_t5md_generate takes; its
 *  decoders are copied; o->on_token is called as nz_t5md_generate calls it,
 *  with context 0: greedy / sampling after each step, beam an item's best
 *  hypothesis once the item is settled; o->seeds and o->stop are not used).
 *  It joins at the next nz_t5md_cb_step (its encoder runs then). owner
 *  identifies it in nz_t5md_cb_take and nz_t5md_cb_remove.
 *  @return NZ_OK; NZ_E_INVALID_ARG / NZ_E_RANGE (options, source);
 *  NZ_E_NOMEM. */
int nz_t5md_cb_add(nz_t5md_cb *cb, const int32_t *src, size_t len, const nz_t5md_opts *o, void *owner,
                   nz_error *err);

/** One step: the groups added since the last step are encoded together and
 *  join; then one decoder step runs over every row (hooks called, rows that
 *  made eos or reached max_new_tokens leave; beam groups choose their next
 *  beams, reorder their rows' caches, and their done items leave; a group
 *  whose rows all left, or whose beam search ended, is done). A greedy /
 *  sampled group is done at once with max_new_tokens 0 (a beam group takes
 *  one step, as alone). A beam search error of a group's own (too few
 *  candidates that are not eos) fails that group alone, each of its results
 *  carrying the error nz_t5md_generate gives it alone.
 *  @return NZ_OK, or an error of the step (NZ_E_CANCELLED from mc, a tile
 *  error, out of memory): every group is then done, each result without
 *  tokens carrying the error, and the batch is empty of rows. */
int nz_t5md_cb_step(nz_matmul_ctx *mc, nz_t5md_cb *cb, nz_error *err);

/** Take the oldest done group: its nz_t5md_result_count(t, o, 1) results
 *  laid out as nz_t5md_generate's for one context (res[j * R + r] for
 *  requested decoder j and beam return r, R = o->num_return for beam, else
 *  1; context 0; free with nz_t5md_results_free) and its owner.
 *  @return 1, or 0 when none is done. */
int nz_t5md_cb_take(nz_t5md_cb *cb, void **owner, nz_t5md_result *res);

/** Remove owner's group now (cancelled): its rows leave, its results are
 *  freed. An unknown owner is ignored. */
void nz_t5md_cb_remove(nz_t5md_cb *cb, void *owner);

/** @return the most bytes (NZ_MEM_ACTIVATIONS + NZ_MEM_KV + NZ_MEM_OTHER, as nz_malloc counts them) cb
 *  (NULL: a batch not created yet, counted from its nz_t5md_cb_create) can hold from now until every
 *  source in it is done and taken, if no other joins: its caches at the capacities they can grow to (they
 *  never shrink before nz_t5md_cb_free) with a resize's old copy, the step buffers, the encoder pass of
 *  the sources not yet encoded, the groups' bookkeeping and results; with a source of len ids and
 *  options o joining now (before the next step) unless o is NULL. An upper bound (tests/test_t5md_cb.c
 *  checks it against the allocator's peak); options cb would refuse add nothing. */
uint64_t nz_t5md_cb_bound(const nz_t5md *t, const nz_t5md_cb *cb, size_t len, const nz_t5md_opts *o);

/** @return decoder rows generating now (a live beam item counts beam_size). */
size_t nz_t5md_cb_rows(const nz_t5md_cb *cb);

/** @return groups in the batch (waiting to join, generating, or done and not taken). */
size_t nz_t5md_cb_groups(const nz_t5md_cb *cb);

typedef enum nz_t5md_rank_key {
    NZ_T5MD_RANK_MEAN_LOGPROB = 0, /* EqHard-EM's perplexity ranking (greedy / sampled outputs) */
    NZ_T5MD_RANK_BEAM_SCORE = 1,   /* beam outputs: HF sequences_scores */
    NZ_T5MD_RANK_CONSENSUS = 2     /* nz_t5md_consensus descending, ties by mean log-prob (minimum Bayes
                                      risk over the decoders' responses) */
} nz_t5md_rank_key;

/** Agreement of response h[0..nh) with response r[0..nr) (token ids, eos
 *  left out): token-level sentence BLEU with add-one smoothing ("BLEU+1",
 *  Lin & Och 2004), h as the hypothesis and r as the reference:
 *    exp( (log p1 + log p2 + log p3 + log p4) / 4 + min(0, 1 - nr / nh) ),
 *  p1 = m1 / nh, pn = (mn + 1) / (tn + 1) for n = 2..4, where tn = the
 *  n-grams of h (nh - n + 1, or 0) and mn = those matched in r, each
 *  distinct n-gram counted at most as often as it occurs in r.
 *  t5md_ref.agreement computes the same (float64).
 *  @return a value in [0, 1]: 1 for h == r (nh > 0), 0 when nh == 0 or
 *          no token of h occurs in r. */
double nz_t5md_agreement(const int32_t *h, size_t nh, const int32_t *r, size_t nr);

/** Set res[i].consensus for the n responses of one context: the mean of
 *  nz_t5md_agreement(res[i], res[j]) over the other responses j (tokens
 *  without a final eos; results with an error are skipped on both sides
 *  and get NAN; a response alone gets 0). Ranking by it
 *  (NZ_T5MD_RANK_CONSENSUS) picks the response the other decoders agree
 *  with most: a minimum-Bayes-risk choice with the K decoders as
 *  equally likely modes. Cost: O(n^2 x len^2) compares (t5md_ref.consensus). */
void nz_t5md_consensus(nz_t5md_result *res, size_t n);

/** Pooled consensus over the beam returns of one context: res[j * R + r]
 *  is requested decoder j's return r (nz_t5md_generate's layout, R =
 *  num_return). Every return's consensus is computed over all D x R
 *  (nz_t5md_consensus), then each decoder's return with the highest one
 *  (ties: the better beam return; an errored one only when all are) is
 *  moved to res[j], swapping places with what was there, so res[0..D)
 *  holds one response per decoder in decoder order and res[D..D x R) the
 *  returns not chosen (all still to be freed). Minimum Bayes risk with
 *  every hypothesis of the final beams as evidence and candidate
 *  (t5md_ref.consensus_pool); R = 1 is nz_t5md_consensus. Cost:
 *  nz_t5md_consensus over D x R responses, measured at 2 ms for 20 of 15
 *  tokens and 39 ms for 20 of 63 tokens (one core): small next to the beam
 *  search that made them, but it grows with (D x R)^2 x len^2. */
void nz_t5md_consensus_pool(nz_t5md_result *res, size_t D, size_t R);

/** Rank n responses (normally the D results of one context, e.g.
 *  &res[b * D] for greedy): order[0..n) receives indices into res, best
 *  first: key descending, ties keep the given order (a stable sort, as
 *  t5md_ref.rank); results with an error (or a NaN key) come last, in
 *  their given order. */
void nz_t5md_rank(const nz_t5md_result *res, size_t n, nz_t5md_rank_key key, size_t *order);

/* ------------------------------------------------------------------ text */

/** The dialogue tokenizer: the model's embedded SentencePiece model
 *  ("spm.model" blob, T5 ids) and config.json's turn_separator,
 *  max_context_turns and max_source_length. */
typedef struct nz_t5md_tok nz_t5md_tok;

/** Load the tokenizer of model m (c: its nz_t5md_get_config). Checks that
 *  the SentencePiece model has unk id 2 (T5 ids) and that a non-empty
 *  turn_separator is one of its pieces.
 *  @return NZ_OK and *out, NZ_E_NOT_FOUND (no spm.model blob),
 *          NZ_E_FORMAT (not a SentencePiece model, wrong ids, unknown
 *          separator) or NZ_E_NOMEM. */
int nz_t5md_tok_load(const nz_model *m, const nz_t5md_config *c, nz_t5md_tok **out, nz_error *err);

/** Free a tokenizer. Accepts NULL. */
void nz_t5md_tok_free(nz_t5md_tok *tk);

/** Model input ids of a dialogue context (t5md_ref.join_context): turns
 *  turns[0..n_turns) oldest first, turn i of lens[i] bytes (lens NULL:
 *  NUL-terminated), UTF-8. 1. each turn is stripped of surrounding
 *  whitespace (Python str.strip: Unicode White_Space incl. U+00A0, U+3000
 *  ...); with max_context_turns > 0 only the last N turns stay; 2. with a
 *  turn separator each turn is encoded by SentencePiece on its own and the
 *  separator id goes between turns, without one the turns are joined with
 *  " " and encoded once; 3. with max_source_length > 0 only the last
 *  max_source_length - 1 ids stay; 4. eos is appended. n_turns 0 is one
 *  empty turn's result ([eos]).
 *  @return NZ_OK with *ids (nz_malloc NZ_MEM_OTHER, free with nz_free) and
 *          *n, or an error (then *ids NULL, *n 0). */
int nz_t5md_encode_context(const nz_t5md_tok *tk, const char *const *turns, const size_t *lens,
                           size_t n_turns, int32_t **ids, size_t *n, nz_error *err);

/** Text of a response (t5md_ref.Tokenizer.decode): ids up to the first eos;
 *  pad, unk, ids outside the SentencePiece vocabulary and control pieces
 *  dropped (HF skip_special_tokens), the rest decoded by SentencePiece.
 *  @return NZ_OK with *text (NUL-terminated, nz_malloc NZ_MEM_OTHER, free
 *          with nz_free) and *len (may be NULL), or an error. */
int nz_t5md_decode_text(const nz_t5md_tok *tk, const int32_t *ids, size_t n, char **text, size_t *len,
                        nz_error *err);

/** @return an upper bound of the text bytes (without the NUL) nz_t5md_decode_text gives for n ids. */
size_t nz_t5md_decode_text_bound(const nz_t5md_tok *tk, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* NZ_T5MD_H */
