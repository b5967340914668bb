/*
 * nz_container.h — the .nzp model container.
 *
 * One file holds a whole model: its config, tokenizer files and every tensor,
 * compressed tile by tile (nz_codec.h). It is designed to be mmap-ed and read
 * lazily: opening a model parses the header only; tile bytes are touched when
 * a tile is decoded.
 *
 * File layout, version 1. All integers little-endian.
 *
 *  1. Fixed prefix, 64 bytes:
 *       offset size  field
 *       0      8     magic       89 4E 5A 50 0D 0A 1A 0A  ("\x89NZP\r\n\x1a\n")
 *       8      4     version     1 (a reader refuses other versions by number)
 *       12     4     flags       0 (reserved)
 *       16     8     header_len  bytes of the JSON header
 *       24     8     data_offset start of the data section: a multiple of 64,
 *                                 >= 64 + header_len
 *       32     8     data_size   bytes of the data section;
 *                                 file size == data_offset + data_size
 *       40     8     header_hash XXH3-64 of the JSON header bytes
 *       48     16    reserved    0
 *  2. JSON header (UTF-8, header_len bytes, no NUL), then zero padding up to
 *     data_offset. The header is one object:
 *       "generator": string                 (informative)
 *       "config":    object                 model config.json (optional)
 *       "metadata":  object of strings      safetensors __metadata__ (optional)
 *       "blobs":     {name: {"offset": O, "size": S, "xxh3": "16 hex digits"}}
 *                    embedded files (tokenizer model, dictionaries)
 *       "tensors":   array, in source order, of
 *         {"name": str, "dtype": "bf16"|"f16"|"f32"|"other",
 *          "st_dtype": safetensors dtype ("BF16", "I64", ...),
 *          "shape": [dims], "rows": R, "cols": C   (2-D view, R*C = product)
 *          "mode": "raw"|"lossless"|"bf16"|"lossy-K", "norm_block": B,
 *          "coder": "none"|"esc"|"rans"|"zstd"|"const", "tile_rows": TR,
 *          "freq":   [[exponent, frequency], ...]  (nonzero entries: rANS table, esc ranks)
 *          "counts": [[exponent, count], ...]      (exact histogram, for reports)
 *          "tiles":  [[offset, size, "xxh3 hex"], ...]  ceil(R / TR) entries}
 *  3. Data section: blobs and tiles. Every offset is relative to data_offset
 *     and a multiple of 64; regions lie inside the section and never overlap;
 *     the bytes between them are zero. Each tile is one nz_codec.h tile; its
 *     XXH3-64 is checked before decoding. With the header hash, the blob and
 *     tile hashes and the zero padding (nz_model_check_padding, run by
 *     `nzp verify`), every byte of a file is covered by some check.
 *
 * Limits: a tensor has at most 2^59 elements and tile_rows * cols <= 2^59, so
 * no size derived from a shape can overflow 64 bits.
 *
 * The loader validates everything it reads before use (magic, version,
 * sizes against the buffer, header hash, JSON types and ranges, shapes vs
 * element counts, tile counts, offsets/sizes/alignment/overlap, frequency
 * tables) and refuses a damaged file with a message naming the problem.
 */
#ifndef NZ_CONTAINER_H
#define NZ_CONTAINER_H

#include "nz_codec.h"
#include "nz_common.h"

#include <jansson.h>

#ifdef __cplusplus
extern "C" {
#endif

/* the prefix's first 8 bytes (a string literal: compare or copy 8 bytes, not its NUL) */
#define NZ_CONTAINER_MAGIC   "\x89NZP\r\n\x1a\n"
#define NZ_CONTAINER_VERSION 1
#define NZ_CONTAINER_ALIGN   64
#define NZ_CONTAINER_PREFIX  64
#define NZ_MAX_DIMS_C        8

/** One tile's place in the data section. */
typedef struct nz_tile_ref {
    uint64_t offset; /* relative to the data section */
    uint64_t size;   /* bytes */
    uint64_t hash;   /* XXH3-64 of the tile bytes */
} nz_tile_ref;

/** A tensor of a loaded model (read-only for callers). */
typedef struct nz_tensor {
    const char *name;
    char st_dtype[8]; /* safetensors dtype name */
    int ndim;
    int64_t shape[NZ_MAX_DIMS_C]; /* [ndim] */
    nz_tensor_desc desc;          /* codec parameters: dtype, mode, coder, rows, cols, tiles */
    uint64_t counts[256];         /* exponent histogram (zeros for raw tensors) */
    uint64_t ntiles;
    nz_tile_ref *tiles;    /* [ntiles] */
    uint64_t stored_bytes; /* sum of tile sizes */
} nz_tensor;

typedef struct nz_model nz_model;

/** Open path, mmap it read-only and validate its header. Tile data is not
 *  read. @return NZ_OK and *out, or an error naming the path and problem. */
int nz_model_open(const char *path, nz_model **out, nz_error *err);

/** Validate and load a model image held in buf[0..len) (borrowed: buf must
 *  outlive the model). @return NZ_OK and *out, or an error. */
int nz_model_load_buffer(const uint8_t *buf, size_t len, nz_model **out, nz_error *err);

/** Free a model (unmapping its file). Accepts NULL. */
void nz_model_free(nz_model *m);

/** @return number of tensors. */
size_t nz_model_ntensors(const nz_model *m);

/** @return tensor i, or NULL when out of range. */
const nz_tensor *nz_model_tensor(const nz_model *m, size_t i);

/** @return index of the tensor named name, or -1. */
long nz_model_find(const nz_model *m, const char *name);

/** @return the "config" object (borrowed), or NULL when absent. */
const json_t *nz_model_config(const nz_model *m);

/** @return the "metadata" object (borrowed), or NULL when absent. */
const json_t *nz_model_metadata(const nz_model *m);

/** @return total file (image) size in bytes. */
uint64_t nz_model_file_size(const nz_model *m);

/** @return the JSON header size in bytes. */
uint64_t nz_model_header_size(const nz_model *m);

/** @return number of embedded blobs; nz_model_blob_name(m, i) names blob i. */
size_t nz_model_nblobs(const nz_model *m);
const char *nz_model_blob_name(const nz_model *m, size_t i);

/** Get an embedded file's bytes (pointing into the image), checking its
 *  hash. @return NZ_OK, NZ_E_NOT_FOUND or NZ_E_CHECKSUM. */
int nz_model_blob(const nz_model *m, const char *name, const uint8_t **data, size_t *size, nz_error *err);

/** Get tile t of tensor ti, checking its XXH3 checksum.
 *  @return NZ_OK, NZ_E_INVALID_ARG or NZ_E_CHECKSUM ("tensor 'x' tile 3:
 *          checksum mismatch"). */
int nz_model_tile(const nz_model *m, size_t ti, uint64_t t, const uint8_t **data, size_t *size,
                  nz_error *err);

/** Checksum policy of nz_model_tile_once. */
typedef enum nz_verify_policy {
    NZ_VERIFY_ONCE = 0, /* check a tile's XXH3 on its first use by this loaded model (default) */
    NZ_VERIFY_ALWAYS    /* check it on every use (environment NZ_VERIFY=always at load) */
} nz_verify_policy;

/** Get tile t of tensor ti for serving (the matmul path): like nz_model_tile,
 *  but under NZ_VERIFY_ONCE the XXH3 checksum is computed only until it has
 *  matched once for this loaded model; the tile's bit is then set in an
 *  atomic per-model bitmap and later calls return the bytes directly. A
 *  mismatch is never remembered (every call checks again and fails), so a
 *  tile damaged before its first use is always refused and never reaches a
 *  cache. What verify-once gives up: damage to the image *after* a tile was
 *  verified (the mapping is read-only; this would take a file rewritten
 *  under the map, or a memory fault) is no longer caught by the checksum,
 *  only by the decoder's own structural checks. nz_model_tile and
 *  nz_model_decode_f32/native (nz_verify, `nzp verify`, the tile cache's
 *  misses) keep checking on every call. Thread-safe.
 *  @return as nz_model_tile. */
int nz_model_tile_once(const nz_model *m, size_t ti, uint64_t t, const uint8_t **data, size_t *size,
                       nz_error *err);

/** Check every tile's checksum now (nz_model_tile_once: a tile that matches
 *  is not hashed again when served). A server calls it while loading, so a
 *  damaged model is refused before it is reported ready.
 *  @return NZ_OK, or the first damaged tile's error (tensor and tile named). */
int nz_model_verify_tiles(const nz_model *m, nz_error *err);

/** @return 1 when a read of m's mapped file faulted (the file was truncated
 *  or rewritten in place under the process: every read that touches the
 *  lost pages fails with NZ_E_IO, see nz_guard.h), else 0 (also for a model
 *  loaded from a buffer). */
int nz_model_faulted(const nz_model *m);

/** Set m's nz_model_tile_once policy (default NZ_VERIFY_ONCE, or
 *  NZ_VERIFY_ALWAYS when the environment has NZ_VERIFY=always at load).
 *  Accepts NULL. */
void nz_model_set_verify(nz_model *m, nz_verify_policy p);

/** Verify and decode tile t of tensor ti into out (nrows * cols floats).
 *  @return NZ_OK or an error prefixed with the tensor name and tile. */
int nz_model_decode_f32(const nz_model *m, nz_dctx *dc, size_t ti, uint64_t t, float *out, nz_error *err);

/** Verify and decode tile t of tensor ti in its native dtype (see
 *  nz_tile_decode_native). @return as nz_model_decode_f32. */
int nz_model_decode_native(const nz_model *m, nz_dctx *dc, size_t ti, uint64_t t, void *out, nz_error *err);

/** Check that every byte of the data section outside blobs and tiles (the
 *  alignment padding) is zero, so that verification covers every byte of the
 *  file. Reads the whole data section. @return NZ_OK or NZ_E_FORMAT naming
 *  the offset. */
int nz_model_check_padding(const nz_model *m, nz_error *err);

/* ------------------------------------------------------------- writer */

typedef struct nz_writer nz_writer;

/** Start writing path (through a temporary file renamed on finish).
 *  @return NZ_OK and *out, or NZ_E_IO. */
int nz_writer_create(const char *path, nz_writer **out, nz_error *err);

/** Set the config / metadata objects (copied). @return NZ_OK or an error. */
int nz_writer_set_config(nz_writer *w, const json_t *config, nz_error *err);
int nz_writer_set_metadata(nz_writer *w, const json_t *metadata, nz_error *err);

/** Embed a file. @return NZ_OK or an error (duplicate name, I/O). */
int nz_writer_add_blob(nz_writer *w, const char *name, const void *data, size_t size, nz_error *err);

/** Begin a tensor; its tiles follow with nz_writer_add_tile (exactly
 *  nz_desc_ntiles(desc) of them, in order). desc must be analysed (freq set).
 *  counts may be NULL. @return NZ_OK or an error. */
int nz_writer_begin_tensor(nz_writer *w, const char *name, const char *st_dtype, int ndim,
                           const int64_t *shape, const nz_tensor_desc *desc, const uint64_t counts[256],
                           nz_error *err);

/** Add a whole tensor: nz_writer_begin_tensor, then every tile of src (the
 *  tensor's source elements, rows x cols) encoded with nz_tensor_encode.
 *  desc must be analysed. @return NZ_OK or the first error. */
int nz_writer_add_tensor(nz_writer *w, const char *name, const char *st_dtype, int ndim, const int64_t *shape,
                         const nz_tensor_desc *desc, const uint64_t counts[256], const void *src,
                         nz_error *err);

/** Append the next tile of the current tensor. @return NZ_OK or an error. */
int nz_writer_add_tile(nz_writer *w, const uint8_t *data, size_t size, nz_error *err);

/** Write the header and data, rename into place, free w (also on error).
 *  @return NZ_OK or an error (missing tiles, I/O). */
int nz_writer_finish(nz_writer *w, nz_error *err);

/** Abandon the file: remove temporaries, free w. Accepts NULL. */
void nz_writer_abort(nz_writer *w);

#ifdef __cplusplus
}
#endif
#endif /* NZ_CONTAINER_H */
