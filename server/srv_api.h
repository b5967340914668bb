/*
 * srv_api.h — the JSON API of nzserve apart from the HTTP plumbing: request
 * parsing and validation, error bodies, API-key checks. Pure functions over
 * buffers (the fuzz target tests/fuzz/fuzz_srv_request.c drives them).
 *
 * Error body, for every 4xx/5xx:
 *   {"error": {"code": 422, "type": "validation_error", "message": "..."}}
 *
 * POST /v1/translate body:
 *   {"text": "..."} or {"texts": ["...", ...]}   exactly one of the two
 *   "model":        string, a loaded translation model (default: the first)
 *   Decoding options; one left out takes the model's default (its config
 *   "generation", listed by /v1/models; built-in defaults in brackets):
 *   "iterations":   int 0..100, mask-predict refinement iterations T: T + 1
 *                   decoder passes [10]
 *   "length_beam":  int 1..32, length candidates [5]
 *   "rerank":       "none" | "at" ["none"]
 *   "adaptive":     bool, adaptive stopping: a candidate whose tokens did not
 *                   change in a pass stops (fairseq's generator default; can
 *                   leave <unk> masks in the output) [false: T + 1 passes]
 *   "decoder":      "nat" | "at" ["nat"; "at" = the AT decoder, greedy or beam]
 *   "beam_size":    int 1..32, AT beam [1 = greedy]
 *   "max_length":   int 1..max_new_tokens, output tokens [max_new_tokens; a
 *                   model default above it is capped to it]
 *   "return_tokens": bool (default false)
 *   "return_candidates": bool (default false; decoder "nat" only): each
 *                   translation lists every length candidate as
 *                   "candidates": [{"text", "score", "nat_score", "length",
 *                   "chosen"}]
 * Types: a wrong JSON type is 400 (invalid_request); a value out of range,
 * an empty or blank text, too many texts, an unknown field is 422
 * (validation_error). Token limits need the model's tokenizer and are
 * checked by the server after parsing.
 *
 * POST /v1/dialogue body:
 *   "context":      a string (one turn) or an array of 1..max_texts strings
 *                   (turns, oldest first; joined as training joins them);
 *                   at least one turn must hold a non-blank character
 *   "model":        string, a loaded dialogue model (default: the first)
 *   "decoders":     array of 1..SRV_MAX_DECODERS distinct ints, each
 *                   0..SRV_MAX_DECODERS-1 (the server checks them against
 *                   the model's num_modes); default: every decoder
 *   Defaults below are the built-in ones; a model's config "generation"
 *   (nz_dialogue.h) replaces them for the fields it names.
 *   "strategy":     "greedy" | "beam" | "sample" (default "greedy")
 *   "beam_size":    int 1..32 (default 4; strategy "beam" only)
 *   "temperature":  number 0..10 (default 1; 0 = greedy; "sample" only)
 *   "top_k":        int 0..1000000 (default 0 = no cut; "sample" only)
 *   "top_p":        number > 0 and <= 1 (default 1 = no cut; "sample" only)
 *   "seed":         int 0..2^63-1 (default 0; "sample" only)
 *   "max_new_tokens": int 1..max_new_tokens (default min(63, max_new_tokens))
 *   "no_repeat_ngram_size": int 0..SRV_MAX_NO_REPEAT_NGRAM (63), default 0 =
 *                   off; any strategy: no n-gram of tokens occurs twice in a
 *                   response's [start token] + tokens (HF no_repeat_ngram_size,
 *                   nz_t5md_opts.no_repeat_ngram)
 *   "distinct":     bool (default false): drop responses whose normalised
 *                   text equals a higher-ranked one's
 *   "rank":         "logprob" | "consensus" (default "logprob"): order the
 *                   responses by mean token log-prob, or by how much the
 *                   other decoders' responses agree with each (nz_dialogue.h)
 *   "stream":       bool (default false): server-sent events
 *   "return_tokens": bool (default false)
 * Same classes: a wrong type is 400; out of range, blank context, too many
 * turns, repeated decoders, an unknown field, a sampling / beam option with
 * another strategy is 422. Null means absent for every optional field.
 */
#ifndef SRV_API_H
#define SRV_API_H

#include <jansson.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/** An API error: HTTP status, machine type, human message. */
typedef struct srv_error {
    int status;       /* 400, 401, 404, 405, 413, 422, 429, 500, 503, 504 */
    const char *type; /* static: "invalid_request", "validation_error", ... */
    char message[384];
} srv_error;

/** Fill e (status, type, printf message). @return -1, for `return srv_fail(...)`. */
int srv_fail(srv_error *e, int status, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/** @return the default type name for an HTTP status ("not_found" for 404...). */
const char *srv_error_type(int status);

/** Render e as the error body (NUL-terminated, malloc'd; *len its length).
 *  @return the body, or NULL when out of memory. */
char *srv_error_body(const srv_error *e, size_t *len);

/** Limits that parsing enforces (from the config). */
typedef struct srv_limits {
    int max_texts;      /* texts per request */
    int max_new_tokens; /* cap of max_length */
} srv_limits;

/** A parsed /v1/translate request. Strings point into root (kept alive). */
typedef struct srv_translate_req {
    json_t *root;       /* the parsed body (owned) */
    const char *model;  /* NULL: the default model */
    const char **texts; /* [n] UTF-8, validated by jansson */
    size_t *lens;       /* [n] bytes */
    size_t n;
    int single; /* body used "text" (not "texts") */
    /* decoding options, -1 where the body left them out (the model's defaults apply) */
    int iterations;        /* 0..100 */
    int length_beam;       /* 1..32 */
    int rerank_at;         /* rerank "at" (1) or "none" (0) */
    int adaptive;          /* bool */
    int use_at;            /* decoder "at" (1) or "nat" (0) */
    int beam_size;         /* AT beam, 1 = greedy */
    int max_length;        /* output tokens */
    int return_tokens;     /* bool */
    int return_candidates; /* bool: every mask-predict length candidate (decoder "nat" only) */
} srv_translate_req;

/** Parse and validate a /v1/translate body (len bytes, not necessarily
 *  NUL-terminated). On success *r owns its JSON; free with
 *  srv_translate_req_free (also safe after a failure).
 *  @return 0, or -1 with e filled (400 malformed JSON / invalid UTF-8 /
 *          wrong types, 422 validation). */
int srv_parse_translate(const char *body, size_t len, const srv_limits *lim, srv_translate_req *r,
                        srv_error *e);

/** Free what r holds and zero it. Accepts a zeroed struct. */
void srv_translate_req_free(srv_translate_req *r);

#define SRV_MAX_DECODERS 64 /* decoders a dialogue request may name (and the highest index + 1) */

/* Cap of a dialogue request's no_repeat_ngram_size: the longest n-gram that can
 * repeat within a response of 63 tokens (EqHard-EM's max_length 64; the ban at
 * token i looks at the start token and the i - 1 tokens before it). */
#define SRV_MAX_NO_REPEAT_NGRAM 63

/** Decoding strategy of a dialogue request. */
typedef enum { SRV_GREEDY = 0, SRV_BEAM = 1, SRV_SAMPLE = 2 } srv_strategy;

/** A parsed /v1/dialogue request. Strings point into root (kept alive). */
typedef struct srv_dialogue_req {
    json_t *root;                   /* the parsed body (owned) */
    const char *model;              /* NULL: the default dialogue model */
    const char **turns;             /* [n_turns] UTF-8, NUL-terminated (no NUL inside) */
    size_t *lens;                   /* [n_turns] bytes */
    size_t n_turns;                 /* 1..max_texts */
    int single;                     /* context was a string */
    int decoders[SRV_MAX_DECODERS]; /* [n_decoders] distinct, in request order */
    size_t n_decoders;              /* 0: every decoder of the model */
    /* decoding options, -1 / NAN where the body left them out (the model's defaults apply) */
    int strategy;          /* srv_strategy */
    int beam_size;         /* 1..32 */
    double length_penalty; /* 0..10 (beam) */
    double temperature;    /* 0..10 */
    int top_k;             /* 0..1000000 */
    double top_p;          /* (0, 1] */
    unsigned long long seed;
    int max_new_tokens;  /* 1..limit */
    int no_repeat_ngram; /* no_repeat_ngram_size: 0..SRV_MAX_NO_REPEAT_NGRAM, 0 = off */
    int distinct;        /* bool */
    int rank;            /* nz_dlg_rank order: 0 logprob, 1 consensus */
    int stream;          /* bool */
    int return_tokens;   /* bool */
} srv_dialogue_req;

/** Parse and validate a /v1/dialogue body (len bytes, not necessarily
 *  NUL-terminated) with lim (max_texts caps the turns, max_new_tokens caps
 *  max_new_tokens). On success *r owns its JSON; free with
 *  srv_dialogue_req_free (also safe after a failure).
 *  @return 0, or -1 with e filled (400 / 422 as above). */
int srv_parse_dialogue(const char *body, size_t len, const srv_limits *lim, srv_dialogue_req *r,
                       srv_error *e);

/** The strategy-specific fields of r (beam_size: "beam"; temperature, top_k,
 *  top_p, seed: "sample") against the strategy the request decodes with
 *  (its own, else the model's default).
 *  @return 0, or -1 with e filled (422 naming the field). */
int srv_dialogue_check_strategy(const srv_dialogue_req *r, int strategy, srv_error *e);

/** Free what r holds and zero it. Accepts a zeroed struct. */
void srv_dialogue_req_free(srv_dialogue_req *r);

/** Constant-time comparison of a presented key with the configured keys
 *  (time depends on the number and lengths of the configured keys only).
 *  @return 1 when key (klen bytes) equals one of keys[0..n), else 0. */
int srv_key_matches(const char *key, size_t klen, char *const *keys, size_t n);

/** Extract the API key of a request from its Authorization ("Bearer KEY")
 *  or X-API-Key header values (either may be NULL).
 *  @return the key (pointing into the header value) and *len, or NULL. */
const char *srv_request_key(const char *authorization, const char *x_api_key, size_t *len);

#ifdef __cplusplus
}
#endif
#endif /* SRV_API_H */
