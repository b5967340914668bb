/*
 * nz_pack.h — whole-model operations behind the `nzp` tool: pack a
 * .safetensors file or a model directory into .nzp, unpack .nzp back to
 * .safetensors, verify every tile.
 */
#ifndef NZ_PACK_H
#define NZ_PACK_H

#include "nz_codec.h"
#include "nz_container.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Where a long walk over a model (nz_pack, nz_verify_with) stands; passed to its progress callback. */
typedef struct nz_progress {
    /* bytes: of the source tensor data (pack), of the stored tensor data (verify) */
    uint64_t done, total;
    uint64_t items_done, items_total; /* tensors (pack) or tiles (verify) */
    /* what is being worked on: a tensor's name, or a step ("writing"); NULL once the walk is done */
    const char *name;
} nz_progress;

/** A progress callback: called with its ud as the walk advances and once when
 *  it is done (p->name NULL, p->done == p->total; nz_pack leaves that call out
 *  after an error); it must not call back into the walk. The engine never
 *  prints: the caller decides what to show. @return nothing. */
typedef void (*nz_progress_fn)(void *ud, const nz_progress *p);

typedef struct nz_pack_opts {
    nz_mode mode;        /* weight mode for 2-D float tensors */
    nz_coder coder;      /* exponent coder: NZ_CODER_ESC (default), NZ_CODER_RANS or NZ_CODER_ZSTD */
    uint32_t tile_rows;  /* rows per tile; 0 = nz_default_tile_rows(cols) */
    const char *exclude; /* POSIX extended regex: matching tensor names are stored raw */
    uint64_t raw_below;  /* tensors with fewer elements are stored raw */
    int zstd_level;      /* for coder zstd */
    /* JSON merge patch (RFC 7386; may be NULL) applied to the embedded config: an object's keys
       are merged recursively, a null value removes its key; with no config.json it makes one */
    const json_t *config_patch;
    /* progress (may be NULL): called before each tensor (bytes and tensors done so far, the
       tensor's name), before the file is written ("writing") and once at the end */
    nz_progress_fn progress;
    void *progress_ud;
} nz_pack_opts;

/** Defaults: lossless, rans, automatic tile rows, raw_below 4096, zstd 3. */
void nz_pack_opts_default(nz_pack_opts *o);

/** Pack src (a .safetensors file, or a directory holding model.safetensors,
 *  an optional config.json and tokenizer files, which are embedded) into out,
 *  the config patched with o->config_patch.
 *  1-D tensors, non-float tensors, tensors smaller than raw_below elements and
 *  names matching exclude are stored raw. out is written atomically.
 *  @return NZ_OK or an error naming the file or tensor. */
int nz_pack(const char *src, const char *out, const nz_pack_opts *o, nz_error *err);

/** Write every tensor of m to a .safetensors file (see nz_tile_decode_native
 *  for the dtypes; lossless tensors come back bit-exact), with the metadata.
 *  @return NZ_OK or an error. */
int nz_unpack(const nz_model *m, const char *out, nz_error *err);

/** Decode every tile of every tensor and check every checksum, plus each
 *  blob's checksum. report (may be NULL) is called for each failure; the walk
 *  continues. @return NZ_OK when all is well, else the first error's code;
 *  *nbad (may be NULL) receives the number of failures. */
int nz_verify(const nz_model *m, void (*report)(void *ud, const nz_error *e), void *ud, uint64_t *nbad);

typedef struct nz_verify_opts {
    void (*report)(void *ud, const nz_error *e); /* each failure (may be NULL) */
    nz_progress_fn progress; /* after each tile: stored bytes and tiles checked so far (may be NULL) */
    void *ud;                /* passed to both */
} nz_verify_opts;

/** nz_verify with a progress callback: o (may be NULL: no report, no
 *  progress) holds both callbacks and their argument.
 *  @return NZ_OK when all is well, else the first error's code; *nbad (may
 *  be NULL) receives the number of failures. */
int nz_verify_with(const nz_model *m, const nz_verify_opts *o, uint64_t *nbad);

/** Apply the JSON merge patch (RFC 7386) patch to the object target in
 *  place: objects merge recursively, null removes a key, anything else
 *  replaces. @return NZ_OK, NZ_E_INVALID_ARG (patch or target not an
 *  object) or NZ_E_NOMEM. */
int nz_json_merge_patch(json_t *target, const json_t *patch, nz_error *err);

/** @return the order-0 entropy in bits/symbol of a histogram (0 if empty). */
double nz_entropy_bits(const uint64_t counts[256]);

#ifdef __cplusplus
}
#endif
#endif /* NZ_PACK_H */
