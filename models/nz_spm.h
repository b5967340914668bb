/*
 * nz_spm.h — minimal C interface to SentencePiece (Debian's libsentencepiece,
 * C++), so the C code never sees C++ or exceptions.
 *
 * Only what the tokenizer needs: load a model from memory (the spm.model blob
 * embedded in a .nzp), encode UTF-8 text to pieces and ids, decode pieces back
 * to text, and look pieces/ids up. Errors follow the engine's contract
 * (nz_common.h): functions that can fail return NZ_OK or a negative NZ_E_*
 * code and fill the optional nz_error. No exception escapes and nothing calls
 * exit() or abort().
 *
 * Memory: everything returned to the caller comes from nz_malloc (category
 * NZ_MEM_OTHER) and is released with the function named in its comment.
 * SentencePiece's own allocations (the loaded model) are not counted.
 *
 * Threads: a loaded nz_spm is immutable; every function taking a const
 * nz_spm * may run concurrently on the same handle.
 *
 * Invalid UTF-8 input is not an error: SentencePiece reads each malformed
 * byte as U+FFFD, which is normally not in the vocabulary, so it becomes an
 * unknown piece (a unigram model merges consecutive unknown characters into
 * one piece; a byte-fallback model emits <0xEF><0xBF><0xBD> instead).
 */
#ifndef NZ_SPM_H
#define NZ_SPM_H

#include <stddef.h>
#include <stdint.h>

#include "nz_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/** Opaque loaded SentencePiece model. */
typedef struct nz_spm nz_spm;

/** Result of nz_spm_encode: n pieces, in text order. One allocation; release
 *  it with nz_spm_pieces_free. */
typedef struct nz_spm_pieces {
    size_t n;           /* number of pieces */
    const char **piece; /* piece[i]: the piece's UTF-8 bytes, NUL-terminated */
    const size_t *len;  /* len[i]: byte length of piece[i] (without the NUL) */
    const int32_t *id;  /* id[i]: the piece's SentencePiece id (unk_id for unknown text) */
} nz_spm_pieces;

/** Load a model from its serialized protobuf (the bytes of an spm.model file).
 *  The bytes are copied; data may be freed afterwards.
 *  @return NZ_OK with *out set, NZ_E_INVALID_ARG (NULL out, or NULL data with
 *          size > 0), NZ_E_FORMAT (not a valid SentencePiece model; message
 *          from SentencePiece) or NZ_E_NOMEM. *out is NULL on failure. */
int nz_spm_load(const void *data, size_t size, nz_spm **out, nz_error *err);

/** Free a model. Accepts NULL. */
void nz_spm_free(nz_spm *sp);

/** @return the number of pieces in the vocabulary (ids are 0 .. count-1). */
size_t nz_spm_piece_count(const nz_spm *sp);

/** @return the id of the piece with these bytes, or the model's unk id when
 *  the vocabulary has no such piece (SentencePiece's PieceToId). */
int32_t nz_spm_piece_to_id(const nz_spm *sp, const char *piece, size_t len);

/** @return the model's unknown-piece id (0 for models trained with defaults). */
int32_t nz_spm_unk_id(const nz_spm *sp);

/** Piece of an id. *len (if len is not NULL) receives its byte length.
 *  @return the piece's NUL-terminated bytes, valid as long as sp lives, or
 *          NULL when id is outside 0 .. count-1. */
const char *nz_spm_id_to_piece(const nz_spm *sp, int32_t id, size_t *len);

/** Encode text[0..len) (UTF-8; embedded NULs allowed) into pieces and ids,
 *  exactly as SentencePieceProcessor::Encode (Python: sp.encode(text,
 *  out_type=str) and sp.encode(text)). Empty or all-space text gives n = 0.
 *  @return NZ_OK with *out set (free with nz_spm_pieces_free), or
 *          NZ_E_INVALID_ARG / NZ_E_FORMAT (SentencePiece refused) / NZ_E_NOMEM;
 *          *out is NULL on failure. */
int nz_spm_encode(const nz_spm *sp, const char *text, size_t len, nz_spm_pieces **out, nz_error *err);

/** Free an encode result. Accepts NULL. */
void nz_spm_pieces_free(nz_spm_pieces *p);

/** Decode n pieces (pieces[i] of lens[i] bytes; lens may be NULL when every
 *  piece is NUL-terminated) back to text, exactly as
 *  SentencePieceProcessor::DecodePieces: the leading U+2581 of the first
 *  piece is dropped (dummy prefix), U+2581 becomes a space, control pieces
 *  vanish, the unknown piece becomes " \u2047 ", byte pieces <0xNN> are
 *  reassembled. Pieces not in the vocabulary are copied as they are.
 *  @return NZ_OK with *text a NUL-terminated nz_malloc block (free with
 *          nz_free) and *len (if not NULL) its length, or
 *          NZ_E_INVALID_ARG / NZ_E_FORMAT / NZ_E_NOMEM; *text is NULL on failure. */
int nz_spm_decode_pieces(const nz_spm *sp, const char *const *pieces, const size_t *lens, size_t n,
                         char **text, size_t *len, nz_error *err);

#ifdef __cplusplus
}
#endif
#endif /* NZ_SPM_H */
