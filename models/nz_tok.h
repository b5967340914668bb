/*
 * nz_tok.h — fairseq tokenization: a fairseq Dictionary (dict.txt) and a
 * tokenizer combining it with a SentencePiece model (nz_spm.h).
 *
 * Dictionary (fairseq.data.Dictionary.load / add_from_file):
 *   ids 0..3 are implicit: bos "<s>", pad "<pad>", eos "</s>", unk "<unk>";
 *   dict.txt's lines follow from id 4 in file order. The file is UTF-8 and is
 *   split into lines as Python's universal newlines do ("\n", "\r\n", "\r").
 *   Each line, after removing trailing whitespace (Python str.rstrip), is
 *   "<symbol> <count>" or "<symbol> <count> #fairseq:overwrite", split at its
 *   last space (the symbol may itself contain spaces, or be empty); <count>
 *   is a Python int literal ([+-]digits, '_' between digits, surrounding
 *   whitespace allowed). A symbol already present (the four specials
 *   included) is an error unless the line carries #fairseq:overwrite: then
 *   the symbol gets a new id, symbol->id answers the new id, and the old id
 *   still maps back to the symbol. A blank line is an error; an empty file
 *   gives the four specials only. Errors name the line ("dict.txt line 7: ...").
 *   Differences from Python: a count beyond int64 is clamped (fairseq keeps
 *   big integers; counts are not used for inference) and non-ASCII digits in
 *   counts are refused.
 *
 * Tokenizer (what fairseq-interactive does with --bpe sentencepiece):
 *   encode: SentencePiece pieces of the text -> " ".join -> fairseq's
 *   tokenize_line (split at whitespace runs) -> Dictionary.index (unknown
 *   -> unk 3) -> optional bos 0 in front (translation_lev / NAT models,
 *   LanguagePairDataset(append_bos=True)) and eos 2 at the end
 *   (encode_line(append_eos=True)).
 *   decode: see nz_tok_decode.
 *
 * All memory handed to callers comes from nz_malloc (NZ_MEM_OTHER) and is
 * freed with nz_free unless stated otherwise. Loaded objects are immutable:
 * const functions may run concurrently on one object.
 */
#ifndef NZ_TOK_H
#define NZ_TOK_H

#include <stddef.h>
#include <stdint.h>

#include "nz_common.h"
#include "nz_container.h"
#include "nz_spm.h"

#ifdef __cplusplus
extern "C" {
#endif

/* fairseq's special ids (Dictionary() defaults). */
enum { NZ_TOK_BOS = 0, NZ_TOK_PAD = 1, NZ_TOK_EOS = 2, NZ_TOK_UNK = 3, NZ_TOK_NSPECIAL = 4 };

/* ------------------------------------------------------------ dictionary */

/** Opaque fairseq dictionary. */
typedef struct nz_dict nz_dict;

/** Parse a dict.txt held in buf[0..len) (see the header comment). name (may
 *  be NULL: "dict.txt") prefixes error messages.
 *  @return NZ_OK with *out set, NZ_E_FORMAT ("dict.txt line 3: ..."),
 *          NZ_E_INVALID_ARG, NZ_E_RANGE (more than INT32_MAX symbols) or
 *          NZ_E_NOMEM; *out is NULL on failure. */
int nz_dict_parse(const char *buf, size_t len, const char *name, nz_dict **out, nz_error *err);

/** Free a dictionary. Accepts NULL. */
void nz_dict_free(nz_dict *d);

/** @return the number of ids (4 specials + dict.txt lines). */
size_t nz_dict_size(const nz_dict *d);

/** @return the id of a symbol (the latest one for an overwritten symbol), or
 *  NZ_TOK_UNK when absent (Dictionary.index). */
int32_t nz_dict_index(const nz_dict *d, const char *sym, size_t len);

/** @return 1 if the symbol is in the dictionary (`sym in d`), else 0. */
int nz_dict_contains(const nz_dict *d, const char *sym, size_t len);

/** Symbol of an id; *len (if not NULL) gets its byte length.
 *  @return NUL-terminated bytes valid while d lives, or NULL when id is
 *          outside 0 .. size-1 (fairseq's d[id] would give "<unk>" there). */
const char *nz_dict_symbol(const nz_dict *d, int32_t id, size_t *len);

/** @return the count of an id (1 for the specials), 0 when out of range. */
int64_t nz_dict_count(const nz_dict *d, int32_t id);

/* ------------------------------------------------------------- tokenizer */

/** Opaque tokenizer: SentencePiece model + dictionary. */
typedef struct nz_tok nz_tok;

/** Build a tokenizer from the bytes of spm.model and dict.txt (both copied).
 *  @return NZ_OK with *out set, or the code of nz_spm_load / nz_dict_parse
 *          (messages prefixed by "spm.model" / "dict.txt"); *out NULL then. */
int nz_tok_create(const void *spm_model, size_t spm_size, const char *dict_txt, size_t dict_size,
                  nz_tok **out, nz_error *err);

/** Build a tokenizer from the blobs "spm.model" and "dict.txt" of a .nzp.
 *  @return NZ_OK, NZ_E_NOT_FOUND (blob missing), NZ_E_CHECKSUM, or as
 *          nz_tok_create. */
int nz_tok_from_model(const nz_model *m, nz_tok **out, nz_error *err);

/** Free a tokenizer. Accepts NULL. */
void nz_tok_free(nz_tok *t);

/** @return the tokenizer's dictionary (owned by t). */
const nz_dict *nz_tok_dict(const nz_tok *t);

/** @return the tokenizer's SentencePiece model (owned by t). */
const nz_spm *nz_tok_spm(const nz_tok *t);

/* nz_tok_encode flags */
#define NZ_TOK_ADD_BOS 1u /* prepend bos (0): source side of translation_lev (CMLM / NAT) */
#define NZ_TOK_ADD_EOS 2u /* append eos (2): encode_line(append_eos=True), every fairseq source */

/** Encode UTF-8 text[0..len) into fairseq ids (see the header comment).
 *  The text is not stripped first (fairseq-interactive strips each input
 *  line; SentencePiece's default remove_extra_whitespaces makes that moot).
 *  Invalid UTF-8 is not an error: SentencePiece reads each bad byte as
 *  U+FFFD, an unknown piece (see nz_spm.h) that maps to unk 3 unless
 *  dict.txt has that piece.
 *  @return NZ_OK with *ids (nz_malloc block, free with nz_free; never NULL on
 *          success) and *n set, or NZ_E_INVALID_ARG / NZ_E_FORMAT / NZ_E_NOMEM;
 *          *ids is NULL and *n 0 on failure. */
int nz_tok_encode(const nz_tok *t, const char *text, size_t len, unsigned flags, int32_t **ids, size_t *n,
                  nz_error *err);

/** Detokenization modes of nz_tok_decode. */
typedef enum nz_detok_mode {
    /* fairseq's output: Dictionary.string(ids) then post_process(s,
     * "sentencepiece") (= SentencepieceBPE.decode): join the symbols with " ",
     * delete every " ", turn U+2581 into " ", strip surrounding whitespace
     * (Python str.strip). unk prints as "<unk>". This is what fairseq-generate
     * and fairseq-interactive print (the H / D lines). */
    NZ_DETOK_FAIRSEQ = 0,
    /* SentencePiece's DecodePieces on the symbols: the first piece's
     * leading U+2581 dropped, other U+2581 -> " " kept (no strip), unk ->
     * " \u2047 ", control pieces dropped, byte pieces <0xNN> reassembled. */
    NZ_DETOK_SPM = 1
} nz_detok_mode;

/** Decode fairseq ids into text: bos, pad and eos are skipped wherever they
 *  occur (Dictionary.string skips bos and eos; a finished hypothesis has no
 *  pad), every other id maps to its dictionary symbol (ids >= size give
 *  "<unk>", as Dictionary.__getitem__), then mode's detokenization.
 *  @return NZ_OK with *text (NUL-terminated nz_malloc block, free with
 *          nz_free) and *len (if not NULL), or NZ_E_RANGE (negative id, named
 *          by position), NZ_E_INVALID_ARG, NZ_E_FORMAT (SentencePiece refused),
 *          NZ_E_NOMEM; *text is NULL on failure. */
int nz_tok_decode(const nz_tok *t, const int32_t *ids, size_t n, nz_detok_mode mode, char **text, size_t *len,
                  nz_error *err);

#ifdef __cplusplus
}
#endif
#endif /* NZ_TOK_H */
