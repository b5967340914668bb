/*
 * nz_dialogue.h — a dialogue model ready to serve: the opened .nzp, its
 * t5_multidecoder network (nz_t5md) and its tokenizer (nz_t5md_tok, from the
 * embedded spm.model and config.json's dialogue keys), with one call that
 * turns a conversation into K ranked responses. Used by `nzp chat` and by
 * the HTTP server; knows nothing of either.
 *
 * One call = one context (nz_dialogue_run, nz_dialogue_run_ids) or a batch
 * of B contexts that share the decoding options (nz_dialogue_run_batch: one
 * nz_t5md_generate over every context's rows, so each decoder step's weight
 * decode serves all of them; per-context sampling seeds in o->gen.seeds).
 * Per context: the turns are joined as training joins them
 * (nz_t5md_encode_context: stripped, turn separator or " ", the model's
 * max_context_turns / max_source_length truncation, eos), every requested
 * decoder generates its response in one batched nz_t5md_generate (all
 * decoders' rows go through each decoder step together), the responses are
 * decoded to text (nz_t5md_decode_text), ranked (o->rank: by mean token
 * log-prob, EqHard-EM's perplexity ranking, or by consensus, the response the
 * other decoders' responses agree with most, nz_t5md_consensus; descending,
 * ties by mean log-prob, then the requested decoder order) and, with the
 * distinct filter, a response whose normalised text equals a higher-ranked
 * one's is dropped.
 *
 * Consensus with beam search pools the final beams: every decoder returns
 * all beam_size hypotheses, each is scored by its mean agreement with all
 * the others (every decoder's, nz_t5md_consensus_pool), and a decoder's
 * response is its hypothesis with the highest score, not necessarily its
 * best by beam score (minimum Bayes risk with K x beam_size candidates; on
 * the demo model's SGD test replies BLEU 7.34 against 6.69 for the K best
 * hypotheses alone, models/README.md). Greedy and sampling have one
 * hypothesis per decoder.
 *
 * Normalised text (the distinct filter): ASCII whitespace runs collapsed to
 * one space, leading / trailing whitespace removed, ASCII letters lower-cased
 * (other bytes as they are).
 *
 * Streaming: with o->on_token set, every generated token is reported as soon
 * as nz_t5md_generate makes it final (greedy / sampling: every step; beam:
 * the best hypothesis of a decoder once it is settled), together with the
 * piece of response text it adds: the decoder's tokens so far are decoded
 * (nz_t5md_decode_text) and the bytes beyond those already reported are the
 * piece, so for each (context, decoder) the concatenation of its pieces equals its
 * response's text (SentencePiece's decoding of a growing prefix only grows;
 * a trailing U+FFFD, an incomplete byte sequence, is held back until a later
 * token, the decoder's last token or eos flushes it). Every decoder is
 * streamed, also one that the distinct filter drops afterwards; with beam
 * search ranked by consensus each decoder's chosen hypothesis is streamed
 * once every decoder's beams are done (the choice needs them all). The cost is
 * one decode of the response so far per token (quadratic in the response
 * length, negligible next to a decoder step for responses of a few hundred
 * tokens).
 *
 * Per-model decoding defaults: a model's config.json may carry a
 * "generation" object with its recommended decoding options, under the names
 * of the /v1/dialogue request fields:
 *   "strategy":             "greedy" | "beam" | "sample"
 *   "beam_size":            int 1..NZ_T5MD_MAX_BEAM
 *   "length_penalty":       number 0..NZ_DLG_MAX_LENGTH_PENALTY (beam: hypothesis score = sum of
 *                           log-probs / length^length_penalty; HF's; 1 =
 *                           the mean log-prob, more favours longer replies)
 *   "temperature":          number 0..100 (sample)
 *   "top_k":                int 0..1000000 (sample; 0 = no cut)
 *   "top_p":                number in (0, 1] (sample; 1 = no cut)
 *   "max_new_tokens":       int 1..NZ_T5MD_MAX_NEW_TOKENS
 *   "no_repeat_ngram_size": int 0..NZ_T5MD_MAX_NEW_TOKENS (0 = off)
 *   "distinct":             bool
 *   "rank":                 "logprob" | "consensus"
 * Absent keys keep nz_dlg_opts_default's value; an unknown key or a bad value
 * refuses the model at open, naming the key. Options of a strategy the
 * model's default does not use are kept for requests that choose that
 * strategy (e.g. a default temperature for "sample" with greedy by default).
 * `nzp pack --set generation.KEY=VALUE` writes them; callers (nzp chat, the
 * server) start from nz_dialogue_defaults and apply what the user chose
 * (nz_dlg_choice).
 *
 * Memory: the context ids, the responses and the streaming buffers are
 * NZ_MEM_OTHER; nz_t5md_generate's activations and KV caches are
 * NZ_MEM_ACTIVATIONS / NZ_MEM_KV. Nothing here calls exit().
 */
#ifndef NZ_DIALOGUE_H
#define NZ_DIALOGUE_H

#include "nz_t5md.h"

#include <jansson.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nz_dialogue nz_dialogue;

#define NZ_DLG_MAX_LENGTH_PENALTY 10 /* "length_penalty" range: 0 .. this */

/** Streaming hook: decoder k of context `context` (its index in the batch;
 *  0 with nz_dialogue_run / nz_dialogue_run_ids) made token `token`
 *  (position pos in its response, 0-based) with log-prob logprob;
 *  text[0..text_len) is the text it adds to the decoder's response (may be
 *  empty: eos, control pieces, a held-back partial character;
 *  NUL-terminated, valid during the call). */
typedef void (*nz_dlg_token_fn)(void *arg, size_t context, int decoder, size_t pos, int32_t token,
                                float logprob, const char *text, size_t text_len);

/** How the responses of a context are ordered. */
typedef enum nz_dlg_rank {
    NZ_DLG_RANK_LOGPROB = 0, /* mean token log-prob descending (EqHard-EM's perplexity ranking) */
    NZ_DLG_RANK_CONSENSUS =
        1 /* consensus descending (nz_t5md_consensus: minimum Bayes risk), ties by log-prob */
} nz_dlg_rank;

/** Options of nz_dialogue_run (nz_dlg_opts_default: nz_t5md_opts_default's
 *  greedy decoding of every decoder with 63 new tokens, ranked by log-prob,
 *  no distinct filter, no hooks). */
typedef struct nz_dlg_opts {
    nz_t5md_opts gen;         /* strategy, max_new_tokens, decoders (distinct ks), beam / sampling settings,
                                 no_repeat_ngram, seed or seeds[B] (one per context of a batch), the stop
                                 hook; gen.num_return is set by the ranking (beam with consensus: beam_size,
                                 else 1) and gen.on_token is replaced */
    int distinct;             /* drop responses whose normalised text equals a higher-ranked one's */
    nz_dlg_rank rank;         /* the ranking */
    nz_dlg_token_fn on_token; /* optional streaming hook (with the tokens' text) */
    void *token_arg;
} nz_dlg_opts;

/** Fill o with the defaults. */
void nz_dlg_opts_default(nz_dlg_opts *o);

/** Decoding options chosen by a request, a command line or a model's
 *  "generation" object; -1 / NAN = not chosen (nz_dlg_choice_init). */
typedef struct nz_dlg_choice {
    int strategy;         /* nz_t5md_strategy */
    int beam_size;        /* 1..NZ_T5MD_MAX_BEAM */
    float length_penalty; /* 0..NZ_DLG_MAX_LENGTH_PENALTY (beam) */
    float temperature;    /* >= 0 */
    int top_k;            /* >= 0 */
    float top_p;          /* (0, 1] */
    int max_new_tokens;   /* 1..NZ_T5MD_MAX_NEW_TOKENS */
    int no_repeat_ngram;  /* 0..NZ_T5MD_MAX_NEW_TOKENS */
    int distinct;         /* 0/1 */
    int rank;             /* nz_dlg_rank */
} nz_dlg_choice;

/** Set every field of c to "not chosen". */
void nz_dlg_choice_init(nz_dlg_choice *c);

/** @return the name of a ranking ("logprob", "consensus"). */
const char *nz_dlg_rank_name(nz_dlg_rank rank);

/** Parse a ranking name (as nz_dlg_rank_name gives). @return NZ_OK and *rank, or NZ_E_INVALID_ARG. */
int nz_dlg_rank_parse(const char *name, nz_dlg_rank *rank);

/** Read a "generation" object (keys as in the header comment) into c (NULL
 *  obj: nothing chosen); what names the object in messages.
 *  @return NZ_OK, or NZ_E_FORMAT naming the unknown key or bad value. */
int nz_dlg_choice_from_json(const json_t *obj, const char *what, nz_dlg_choice *c, nz_error *err);

/** Apply the chosen fields of c to o (ranges checked as in the header).
 *  @return NZ_OK, or NZ_E_INVALID_ARG naming the field (o unchanged). */
int nz_dlg_choice_apply(const nz_dlg_choice *c, nz_dlg_opts *o, nz_error *err);

/** @return 1 when contexts decoded with a and with b can share one batch:
 *  every option that shapes generation is equal (strategy, max_new_tokens,
 *  ban_unk, no_repeat_ngram, the decoders by value, beam_size,
 *  length_penalty, early_stopping, num_return, temperature, top_k, top_p,
 *  distinct, rank); the seed(s) and the hooks may differ. Else 0. */
int nz_dlg_opts_same(const nz_dlg_opts *a, const nz_dlg_opts *b);

/** Describe o's decoding options as a "generation" object (every key set).
 *  @return a new JSON object, or NULL when out of memory. */
json_t *nz_dlg_opts_to_json(const nz_dlg_opts *o);

/** One decoder's response. */
typedef struct nz_dlg_response {
    int decoder;          /* decoder k */
    char *text;           /* response text (NUL-terminated, NZ_MEM_OTHER) */
    size_t text_len;      /* bytes of text */
    int32_t *tokens;      /* [n_tokens] generated ids, eos included when the response ended with it */
    size_t n_tokens;      /* (NZ_MEM_OTHER) */
    size_t output_tokens; /* n_tokens without the eos */
    double score;         /* mean token log-prob: the ranking key of NZ_DLG_RANK_LOGPROB */
    double consensus;     /* mean agreement with the context's other responses, 0..1 (nz_t5md_consensus;
                             over every generated response, dropped ones too; beam with consensus ranking:
                             over every beam hypothesis, nz_t5md_consensus_pool): NZ_DLG_RANK_CONSENSUS's key */
    double beam_score;    /* beam: the hypothesis score (HF sequences_scores); NAN otherwise */
    int finished;         /* the response ended with eos */
} nz_dlg_response;

/** The ranked responses of one context. */
typedef struct nz_dlg_result {
    int rc; /* nz_dialogue_run_batch: NZ_OK, or this context's error (message in err) */
    nz_error err;
    nz_dlg_response *responses; /* [n] best first (NZ_MEM_OTHER) */
    size_t n;                   /* responses kept (after the distinct filter) */
    size_t generated;           /* responses generated (the requested decoders) */
    size_t input_tokens;        /* context ids fed to the encoder, eos included */
    size_t output_tokens;       /* generated tokens of every decoder (dropped ones too), eos excluded */
} nz_dlg_result;

/** Free what r holds and zero it. Accepts NULL and a zeroed struct. */
void nz_dlg_result_free(nz_dlg_result *r);

/** Open a t5_multidecoder .nzp (path): the network (nz_t5md_load) and its
 *  tokenizer (nz_t5md_tok_load: the embedded spm.model with T5 ids).
 *  @return NZ_OK and *out, or the first error (messages name the file). */
int nz_dialogue_open(const char *path, nz_dialogue **out, nz_error *err);

/** Free a dialogue model (tokenizer, network, mapping). Accepts NULL. */
void nz_dialogue_free(nz_dialogue *d);

/** @return the model's decoding defaults: nz_dlg_opts_default with its
 *  config's "generation" applied (no decoders, hooks or stop). */
const nz_dlg_opts *nz_dialogue_defaults(const nz_dialogue *d);

/** @return the opened container (for cache and memory accounting). */
const nz_model *nz_dialogue_model(const nz_dialogue *d);
/** @return the network. */
const nz_t5md *nz_dialogue_t5md(const nz_dialogue *d);
/** @return the tokenizer. */
const nz_t5md_tok *nz_dialogue_tok(const nz_dialogue *d);
/** @return the network's configuration (num_modes, variant, dialogue keys). */
const nz_t5md_config *nz_dialogue_config(const nz_dialogue *d);

/** Encoder input of a context (nz_t5md_encode_context): turns[0..n_turns)
 *  oldest first, NUL-terminated UTF-8. *ids is NZ_MEM_OTHER (nz_free).
 *  @return NZ_OK or an error. */
int nz_dialogue_encode(const nz_dialogue *d, const char *const *turns, size_t n_turns, int32_t **ids,
                       size_t *n, nz_error *err);

/** Normalise text[0..len) for the distinct filter (see above) into out
 *  (at least len + 1 bytes). @return the normalised length. */
size_t nz_dlg_normalize(const char *text, size_t len, char *out);

/** Answer one context: encode turns[0..n_turns) (NUL-terminated; read only
 *  before the first stop-hook call), generate with every decoder of
 *  o->gen (NULL decoders: all K; repeats are refused), decode, rank and
 *  filter. res receives the ranked responses; free it with
 *  nz_dlg_result_free, also after an error return.
 *  @return NZ_OK, or an error: NZ_E_INVALID_ARG / NZ_E_RANGE (bad options,
 *          a decoder out of range or repeated, an unencodable context),
 *          NZ_E_CANCELLED (the stop hook), NZ_E_NOMEM, a damaged weight
 *          tile's error. */
int nz_dialogue_run(nz_matmul_ctx *mc, const nz_dialogue *d, const char *const *turns, size_t n_turns,
                    const nz_dlg_opts *o, nz_dlg_result *res, nz_error *err);

/** nz_dialogue_run on a context already encoded (nz_dialogue_encode's
 *  ids[0..n_ids), eos included; read only before the first stop-hook call):
 *  a caller that encoded the context to check its limits hands the ids on,
 *  so a context is tokenized once. @return as nz_dialogue_run. */
int nz_dialogue_run_ids(nz_matmul_ctx *mc, const nz_dialogue *d, const int32_t *ids, size_t n_ids,
                        const nz_dlg_opts *o, nz_dlg_result *res, nz_error *err);

/** Answer B contexts already encoded (ids[b][0..n_ids[b]), eos included; read only before the first
 *  stop-hook call) with the same options o: one nz_t5md_generate over every (context, decoder[, beam])
 *  row (o->gen.seeds, when set, holds B sampling seeds, one per context; NULL: o->gen.seed for each),
 *  then per context the ranking, decoding and distinct filter of nz_dialogue_run into res[b]. With
 *  o->on_token every context's tokens are streamed, the hook told the context's index. Each context's
 *  responses are those it gets alone, up to the engine's batch invariance (same tokens with
 *  batch-invariant numerics). res[0..B) receive the results; free each with nz_dlg_result_free, also
 *  after an error return. nz_dialogue_run_ids is the B = 1 case.
 *  @return NZ_OK when the batch ran (a context that failed on its own, e.g. an id outside the
 *          vocabulary, has res[b].rc and res[b].err and no responses), or a batch-wide error (as
 *          nz_dialogue_run: bad options, NZ_E_CANCELLED, NZ_E_NOMEM, a damaged tile; then every
 *          res[b] is empty with that error). */
int nz_dialogue_run_batch(nz_matmul_ctx *mc, const nz_dialogue *d, const int32_t *const *ids,
                          const size_t *n_ids, size_t B, const nz_dlg_opts *o, nz_dlg_result *res,
                          nz_error *err);

/** Upper bound of the bytes nz_dialogue_run_ids(mc, d, ids, n_ids, o, ...) holds at its peak in
 *  NZ_MEM_ACTIVATIONS + NZ_MEM_KV (+ its NZ_MEM_OTHER for the run), from the context length n_ids and
 *  the options o (NULL: the model's defaults; strategy, beam size, decoders, max new tokens, ...).
 *  Cheap (no allocation, no model compute). It is nz_t5md_peak_bytes for the one context (the encoder;
 *  the decoders' caches of max_new_tokens positions, allocated whole before the first step, with a step
 *  and the projection chunk; every decoder assumed to run to max_new_tokens) plus this call's own
 *  buffers: the result arrays, the streaming state and one streamed token's text decoding (with
 *  o->on_token), the responses' texts. Not counted: what o->on_token and the stop hook allocate, the
 *  allocator's per-block headers, the tile cache and decode scratch, and with nz_dialogue_run the
 *  context's ids (4 bytes an id). @return bytes (0 for options refused before any allocation). */
uint64_t nz_dialogue_peak_bytes(const nz_dialogue *d, size_t n_ids, const nz_dlg_opts *o);

/** nz_dialogue_peak_bytes for nz_dialogue_run_batch(mc, d, ids, n_ids, B, o, ...): B contexts of
 *  n_ids[b] ids (nz_t5md_peak_bytes of the batch, every context's streaming state and results).
 *  @return bytes (0 for options refused before any allocation, or B = 0). */
uint64_t nz_dialogue_batch_peak_bytes(const nz_dialogue *d, const size_t *n_ids, size_t B,
                                      const nz_dlg_opts *o);

/* ------------------------------------------------------- continuous batching */

/** Requests decoded together as they come and go (nz_t5md_cb underneath):
 *  each joins at a step boundary with its own options and leaves when its
 *  every decoder is done; its responses (ranking, text, distinct filter,
 *  streamed text) are those nz_dialogue_run_ids gives it alone. One thread
 *  at a time. */
typedef struct nz_dlg_batch nz_dlg_batch;

/** @return whether o can join a nz_dlg_batch (greedy, sampling or beam search: every strategy). */
int nz_dlg_batch_joins(const nz_dlg_opts *o);

/** @return NZ_OK and an empty batch over d (d must outlive it), or NZ_E_NOMEM. */
int nz_dlg_batch_create(const nz_dialogue *d, nz_dlg_batch **out, nz_error *err);

/** Free a batch and every request in it. Accepts NULL. */
void nz_dlg_batch_free(nz_dlg_batch *b);

/** Add a request: context ids[n_ids] (copied), options o (greedy,
 *  sampling with seed o->gen.seed, or beam search; o->on_token is called
 *  with context 0 and o->token_arg; o->gen.seeds and o->gen.stop are not
 *  used). It joins at the next nz_dlg_batch_step.
 *  @return NZ_OK; NZ_E_UNSUPPORTED (another strategy); NZ_E_INVALID_ARG / NZ_E_RANGE
 *  (options, an id outside the vocabulary); NZ_E_NOMEM. */
int nz_dlg_batch_add(nz_dlg_batch *b, const int32_t *ids, size_t n_ids, const nz_dlg_opts *o, void *owner,
                     nz_error *err);

/** One decoder step of every request (the new ones encoded first); see
 *  nz_t5md_cb_step. @return NZ_OK, or the step's error: every request is
 *  then done with it (nz_dlg_batch_take gives each its error). */
int nz_dlg_batch_step(nz_matmul_ctx *mc, nz_dlg_batch *b, nz_error *err);

/** Take the oldest finished request: its owner and its ranked responses
 *  (res->rc set when it failed; free with nz_dlg_result_free).
 *  @return 1, or 0 when none is finished. */
int nz_dlg_batch_take(nz_dlg_batch *b, void **owner, nz_dlg_result *res);

/** Remove owner's request now (cancelled). An unknown owner is ignored. */
void nz_dlg_batch_remove(nz_dlg_batch *b, void *owner);

/** @return the most bytes (NZ_MEM_ACTIVATIONS + NZ_MEM_KV + NZ_MEM_OTHER) b (NULL: a batch of d not created
 *  yet) can hold from now until its members are done and taken, if no other joins, with a request of
 *  n_ids ids and options o joining now unless o is NULL (options the batch would refuse add nothing):
 *  nz_t5md_cb_bound of its decoder batch plus the members' own state and one take's texts. The caches
 *  never shrink before nz_dlg_batch_free, so members leaving lower it only by their own share. */
uint64_t nz_dlg_batch_bound(const nz_dialogue *d, const nz_dlg_batch *b, size_t n_ids, const nz_dlg_opts *o);

/** @return requests in the batch (not yet taken). */
size_t nz_dlg_batch_size(const nz_dlg_batch *b);

#ifdef __cplusplus
}
#endif
#endif /* NZ_DIALOGUE_H */
