/*
 * nz_translator.h — a translation model ready to serve: the opened .nzp,
 * its cmlm_transformer network (nz_nat) and its tokenizer (nz_tok, from the
 * embedded spm.model + dict.txt), with one call that turns texts into
 * translations. Used by `nzp translate` and by the HTTP server; knows
 * nothing of either.
 *
 * A batch of texts is tokenized as [bos, pieces.., eos], right-padded into
 * one source matrix and decoded together (mask-predict with length beam and
 * optional AT rerank, or the AT decoder's greedy / beam search); every text
 * gets its own result or its own error, so one bad text never fails the
 * others. Results are detokenized (fairseq post-processing: SentencePiece
 * pieces joined, bos/eos/pad dropped).
 *
 * Per-model decoding defaults: a model's config.json may carry a
 * "generation" object with the model's recommended decoding options, under
 * the same names as the /v1/translate request fields:
 *   "decoder":     "nat" | "at"  (mask-predict, or the AT decoder)
 *   "iterations":  int 0..1000   mask-predict refinement iterations T
 *   "length_beam": int 1..100    length candidates
 *   "rerank":      "none" | "at" pick the length candidate by the AT score
 *   "adaptive":    bool          adaptive stopping (default false: T + 1 passes)
 *   "beam_size":   int 1..100    AT beam (1 = greedy)
 *   "lenpen":      number        AT beam length penalty
 *   "max_length":  int 1..65535  output tokens (without bos/eos)
 * Absent keys keep nz_tr_opts_default's value; an unknown key or a bad
 * value refuses the model at open, naming the key. `nzp pack --set
 * generation.KEY=VALUE` writes them; callers (nzp translate, the server)
 * start from nz_translator_defaults and apply what the user chose
 * (nz_tr_choice).
 */
#ifndef NZ_TRANSLATOR_H
#define NZ_TRANSLATOR_H

#include "nz_nat.h"
#include "nz_tok.h"

#include <jansson.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nz_translator nz_translator;

/** Which decoder produces the translation. */
typedef enum {
    NZ_TR_NAT = 0,       /* mask-predict (nz_nat_mask_predict) */
    NZ_TR_AT_GREEDY = 1, /* the AT decoder, greedy (nz_nat_at_greedy) */
    NZ_TR_AT_BEAM = 2    /* the AT decoder, beam search of at_beam (nz_nat_at_beam) */
} nz_tr_decoder;

/** Decoding options (nz_tr_opts_default: NAT, 10 fixed iterations, length
 *  beam 5, no rerank; for the AT decoder beam 1 (greedy), lenpen 1). */
typedef struct nz_tr_opts {
    nz_tr_decoder decoder;
    nz_nat_opts nat;       /* mask-predict options (incl. its stop hook) */
    nz_nat_at_opts at;     /* AT options (incl. its stop hook) */
    int at_beam;           /* AT beam size (NZ_TR_AT_BEAM; 1 with NZ_TR_AT_GREEDY) */
    float lenpen;          /* AT beam length penalty */
    int return_candidates; /* NZ_TR_NAT: every length candidate into nz_tr_result.cands (nat.keep_candidates)
                            */
} nz_tr_opts;

/** Fill o with the defaults. */
void nz_tr_opts_default(nz_tr_opts *o);

/** Set the same stop hook on the NAT and AT options. */
void nz_tr_opts_set_stop(nz_tr_opts *o, int (*stop)(void *arg), void *arg);

/** Decoding options a user chose on top of a base (a model's defaults):
 *  a field < 0 (lenpen: NAN) is not chosen and keeps the base's value. */
typedef struct nz_tr_choice {
    int decoder;     /* 0 mask-predict, 1 the AT decoder (greedy or beam by the resulting beam size) */
    int iterations;  /* mask-predict T */
    int length_beam; /* length candidates */
    int rerank;      /* 0/1: AT rerank of the length candidates */
    int adaptive;    /* 0/1: adaptive stopping */
    int beam_size;   /* AT beam, 1 = greedy */
    int max_length;  /* output tokens without bos/eos (NAT and AT) */
    float lenpen;    /* AT beam length penalty */
} nz_tr_choice;

/** Set every field of c to "not chosen". */
void nz_tr_choice_init(nz_tr_choice *c);

/** Read a "generation" object (keys as in the header comment) into c;
 *  what names the object in messages (e.g. "config.json generation").
 *  @return NZ_OK, or NZ_E_FORMAT naming the unknown key or bad value. */
int nz_tr_choice_from_json(const json_t *obj, const char *what, nz_tr_choice *c, nz_error *err);

/** Apply the chosen fields of c to o (ranges checked: iterations
 *  0..1000000, length_beam and beam_size 1..4096, max_length 1..65535,
 *  lenpen finite). The AT decoder becomes greedy at beam 1, beam search
 *  above. @return NZ_OK, or NZ_E_INVALID_ARG naming the field (o unchanged). */
int nz_tr_choice_apply(const nz_tr_choice *c, nz_tr_opts *o, nz_error *err);

/** @return 1 when a and b decode alike (every option but the stop hooks
 *  equal: texts decoded with either can share one batch), else 0. */
int nz_tr_opts_same(const nz_tr_opts *a, const nz_tr_opts *b);

/** Describe o as a "generation" object (the header's keys, every one set).
 *  @return a new JSON object, or NULL when out of memory. */
json_t *nz_tr_opts_to_json(const nz_tr_opts *o);

/** One text's result. */
/** One mask-predict length candidate of a translation (nz_tr_opts.return_candidates). */
typedef struct nz_tr_cand {
    char *text;      /* detokenized (NUL-terminated, NZ_MEM_OTHER); NULL without detok */
    size_t text_len; /* bytes of text */
    float score;     /* its ranking score (the AT score with rerank: NaN when unscorable) */
    float nat_score; /* mean positional score */
    size_t length;   /* candidate length incl. bos/eos */
    int chosen;      /* the candidate the translation is */
} nz_tr_cand;

typedef struct nz_tr_result {
    int rc;               /* NZ_OK, or this text's error (message in err) */
    nz_error err;         /* set when rc != NZ_OK */
    char *text;           /* detokenized translation (NUL-terminated, NZ_MEM_OTHER), NULL on error */
    size_t text_len;      /* bytes of text */
    int32_t *tokens;      /* [n_tokens] fairseq ids as the decoder returned them (NZ_MEM_OTHER) */
    size_t n_tokens;      /* see nz_nat.h for the bos/eos conventions of each decoder */
    size_t input_tokens;  /* source tokens incl. bos/eos (0 when tokenizing failed) */
    size_t output_tokens; /* generated tokens: n_tokens without bos/eos/pad */
    float score;          /* the decoder's score (nz_nat_hyp.score) */
    nz_tr_cand *cands;    /* [n_cands] the length candidates (return_candidates, mask-predict), or NULL */
    size_t n_cands;
} nz_tr_result;

/** Free what results r[0..n) hold and zero them. Accepts NULL. */
void nz_tr_results_free(nz_tr_result *r, size_t n);

/** Open a cmlm_transformer .nzp (path), load its network and tokenizer,
 *  check that dict.txt matches the embeddings and read the model's
 *  decoding defaults (config "generation"; an AT choice or rerank needs an
 *  AT decoder).
 *  @return NZ_OK and *out, or the first error (messages name the file). */
int nz_translator_open(const char *path, nz_translator **out, nz_error *err);

/** Free a translator (the network, the tokenizer, the mapping). Accepts NULL. */
void nz_translator_free(nz_translator *t);

/** @return the model's decoding defaults: nz_tr_opts_default with the
 *  config's "generation" object applied (borrowed; no stop hook). */
const nz_tr_opts *nz_translator_defaults(const nz_translator *t);

/** @return the opened container (for cache and memory accounting). */
const nz_model *nz_translator_model(const nz_translator *t);
/** @return the network. */
const nz_nat *nz_translator_nat(const nz_translator *t);

/** Tokenize one text as the translator's source ([bos, ids.., eos]).
 *  *ids is NZ_MEM_OTHER (nz_free). @return NZ_OK or an error. */
int nz_translator_encode(const nz_translator *t, const char *text, size_t len, int32_t **ids, size_t *n,
                         nz_error *err);

/** Translate texts[0..n) (lens[i] bytes each; lens NULL: NUL-terminated)
 *  as one batch with o. res[n] receives every text's result; free it with
 *  nz_tr_results_free, also after an error return. detok 0 skips the text
 *  (tokens only). texts are read only while tokenizing, before the stop
 *  hook is first called (a caller may free them from inside the hook).
 *  @return NZ_OK when the batch ran (per-text errors are in res), or a
 *          batch-wide error (bad options, no AT decoder for an AT decoder
 *          choice, out of memory, a damaged weight tile, NZ_E_CANCELLED
 *          from the stop hook), also copied into every res[i]. */
int nz_translator_run(nz_matmul_ctx *mc, const nz_translator *t, const char *const *texts, const size_t *lens,
                      size_t n, const nz_tr_opts *o, int detok, nz_tr_result *res, nz_error *err);

/** nz_translator_run on sources already tokenized: ids[i][0..lens[i]) as
 *  nz_translator_encode returns them (a caller that tokenized to check
 *  limits hands its ids on instead of the texts: each text is tokenized
 *  once). ids are read only before the stop hook is first called.
 *  @return as nz_translator_run; NZ_E_INVALID_ARG for a NULL or too short
 *          source (nothing decoded; copied into every res[i]). */
int nz_translator_run_ids(nz_matmul_ctx *mc, const nz_translator *t, const int32_t *const *ids,
                          const size_t *lens, size_t n, const nz_tr_opts *o, int detok, nz_tr_result *res,
                          nz_error *err);

/** Upper bound of the bytes nz_translator_run_ids(mc, t, ids, lens, n, o, ...) holds at its peak in
 *  NZ_MEM_ACTIVATIONS + NZ_MEM_KV (+ the NZ_MEM_OTHER it allocates for the run: results, id copies),
 *  from the shape alone: n sources of lens[i] ids each (as nz_translator_encode returns them, bos/eos
 *  included) and the options o (NULL: the model's defaults; decoder NAT/AT, iterations, length_beam,
 *  beam size, max new tokens, rerank, ...). Cheap (no allocation, no model compute). The batch is
 *  decoded as one (no internal chunks): the estimate grows with n, the longest source (the batch's
 *  width) and the options, never shrinks when n grows. It is the largest of: the encoder over n x S;
 *  mask-predict's candidates (n x length_beam rows of the longest length the length predictor can give
 *  plus the beam's spread, capped by max_target_positions and o->nat.max_len: see
 *  nz_nat_mask_predict_peak_bytes; a model predicting shorter lengths makes it loose, a max_length
 *  choice makes it tight) through a decoder pass, the projection chunk, the AT rerank; the AT decoder's
 *  caches of n x beam rows of max_len + 1 positions with a step; the results and their text. Not
 *  counted: the allocator's per-block headers, the tile cache and decode scratch (NZ_MEM_TILE_CACHE,
 *  NZ_MEM_SCRATCH), the caller's stop hook, and with nz_translator_run the tokenizer's id arrays (about
 *  4 x (ids + 2) bytes a text + 16 x n). @return the estimate in bytes. */
uint64_t nz_translator_peak_bytes(const nz_translator *t, const size_t *lens, size_t n, const nz_tr_opts *o);

/* ------------------------------------------------------- continuous batching */

/** Requests translated together as they come and go (mask-predict, AT greedy
 *  and AT beam search mixed, each request with its own options; nz_nat_mpb and
 *  nz_nat_cb underneath, one pass of the first and one step of the second
 *  per nz_tr_batch_step): each text of a request joins at a pass or decoder
 *  step boundary and leaves when its decoding ends; a request is finished
 *  when its every text is. Each text's result is the one
 *  nz_translator_run_ids gives it alone (as a batch of one: detokenized
 *  text, score, length candidates with return_candidates). One thread at a
 *  time. */
typedef struct nz_tr_batch nz_tr_batch;

/** @return whether requests with o can join a nz_tr_batch (every decoder: mask-predict with any of its
 *  options, the AT decoder greedy or beam). */
int nz_tr_batch_joins(const nz_tr_opts *o);

/** @return NZ_OK and an empty batch over t (t must outlive it; without an AT decoder its AT texts get
 *  NZ_E_UNSUPPORTED, as alone), or NZ_E_NOMEM. */
int nz_tr_batch_create(const nz_translator *t, nz_tr_batch **out, nz_error *err);

/** Free a batch and every request in it. Accepts NULL. */
void nz_tr_batch_free(nz_tr_batch *b);

/** Add a request of n texts ids[i][0..lens[i]) (copied; bos .. eos), options o (the stop hooks and
 *  o->nat.on_width unused), detokenized when detok; owner identifies it. Its texts join at the next
 *  nz_tr_batch_step. A text refused on its own (e.g. too long, options its decoder refuses, an AT
 *  decoder choice on a model without one) gets its error in its result, as alone.
 *  @return NZ_OK; NZ_E_UNSUPPORTED (an unknown decoder); NZ_E_INVALID_ARG (no text, fewer than 2 ids);
 *  NZ_E_NOMEM (nothing added). */
int nz_tr_batch_add(nz_tr_batch *b, const int32_t *const *ids, const size_t *lens, size_t n,
                    const nz_tr_opts *o, int detok, void *owner, nz_error *err);

/** One decoder step of every AT text and one mask-predict pass of every NAT text (new ones encoded
 *  first).
 *  @return NZ_OK, or the step's error: every text not finished then has it in its result. */
int nz_tr_batch_step(nz_matmul_ctx *mc, nz_tr_batch *b, nz_error *err);

/** Take the oldest finished request: its owner and its results *res[*n] (in text order; free with
 *  nz_tr_results_free, then nz_free). @return 1, or 0 when none is finished. */
int nz_tr_batch_take(nz_tr_batch *b, void **owner, nz_tr_result **res, size_t *n);

/** Remove owner's request now (cancelled). An unknown owner is ignored. */
void nz_tr_batch_remove(nz_tr_batch *b, void *owner);

/** @return requests in the batch (not yet taken). */
size_t nz_tr_batch_size(const nz_tr_batch *b);

/** Owner's memory in the batch given what is known now (0 for an unknown owner), to reserve while it is
 *  in the batch and to call again after each nz_tr_batch_step, giving back what it no longer needs. A
 *  mask-predict request: per text, before it joins, as nz_translator_peak_bytes for it alone (the longest
 *  candidates the length predictor can give); once its lengths are predicted, nz_nat_mpb_member_bytes
 *  (its actual candidates, padded to the batch's widest active one) plus its result bound; once done,
 *  what its result holds. An AT request: nz_translator_peak_bytes of the whole request while a text
 *  decodes (nz_nat_cb keeps no per-text account), then what its results hold. The batch's shared
 *  footprint (its caches rounded up and kept until it is freed, resize copies) can exceed the sum of its
 *  members': nz_tr_batch_bound bounds it. @return bytes. */
uint64_t nz_tr_batch_member_bytes(const nz_tr_batch *b, const void *owner);

/** The most bytes (NZ_MEM_ACTIVATIONS + NZ_MEM_KV + NZ_MEM_OTHER, as nz_malloc counts them) b can hold
 *  from now until every request in it is done and taken, if no other request joins: its caches at the
 *  capacities they can grow to (they never shrink before nz_tr_batch_free) with a resize's old copy, the
 *  buffers of its steps and passes, the encoder pass of texts not yet admitted, and the results it holds
 *  (their detokenized texts at the longest symbol a token); with a request of n texts of lens[i] ids and
 *  options o (NULL: the model's defaults) joining now (before the next nz_tr_batch_step) when n > 0
 *  (lens and o ignored when n is 0; a request or text nz_tr_batch_add would refuse for its options adds
 *  little or nothing). b may be NULL (a batch over t not created yet: then the bound of a fresh batch
 *  with that request alone, nz_tr_batch_create's allocations included); else t is b's translator. The
 *  sum of nz_nat_cb_bound and nz_nat_mpb_bound (the larger of their steps: they run one after the other)
 *  and the requests' own state. It never grows across a step, a take or a removal (a mask-predict text's
 *  candidates count at the longest the length predictor can give until its lengths are predicted, then
 *  at those). It can exceed the sum of the members' estimates by far: an AT batch's self-attention caches
 *  are rectangular (every slot has the positions of the longest text, each text's max_len + 1 counted in
 *  full, however soon it ends). Cheap (no allocation). @return bytes (an upper bound: tests/test_nat_cb.c
 *  and test_nat_mpcb.c check measured peak <= bound). */
uint64_t nz_tr_batch_bound(const nz_translator *t, const nz_tr_batch *b, const size_t *lens, size_t n,
                           const nz_tr_opts *o);

#ifdef __cplusplus
}
#endif
#endif /* NZ_TRANSLATOR_H */
