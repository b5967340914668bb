/*
 * nz_safetensors.h — read and write the safetensors format.
 *
 * Layout: u64 little-endian N, then N bytes of UTF-8 JSON
 *   { "__metadata__": {str: str, ...},            (optional)
 *     "<name>": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ... }
 * then the data section; offsets are relative to its start (8 + N).
 *
 * The reader works on a caller-owned buffer (tests, fuzzers) or on a file it
 * maps read-only. It validates everything before use: header length within
 * the buffer, JSON syntax, dtype names, shape products (no overflow), that
 * end - begin == product(shape) * dtype size, offsets within the data
 * section, and that tensors do not overlap.
 */
#ifndef NZ_SAFETENSORS_H
#define NZ_SAFETENSORS_H

#include "nz_common.h"

#include <jansson.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NZ_MAX_DIMS 8

typedef struct nz_st_tensor {
    const char *name;           /* tensor name (owned by the file object) */
    char st_dtype[8];           /* safetensors dtype string: "BF16", "F32", "I64", ... */
    nz_dtype dt;                /* NZ_DT_BF16/F16/F32, or NZ_DT_OTHER */
    size_t elem_size;           /* bytes per element of st_dtype (1 for BOOL/U8/I8...) */
    int ndim;                   /* 0..NZ_MAX_DIMS */
    int64_t shape[NZ_MAX_DIMS]; /* [ndim] */
    uint64_t nelem;             /* product of shape (1 for ndim 0) */
    uint64_t offset;            /* begin, relative to the data section */
    uint64_t size;              /* bytes = nelem * elem_size */
    const uint8_t *data;        /* [size] points into the buffer/mapping */
} nz_st_tensor;

typedef struct nz_st_file nz_st_file;

/** Parse a safetensors image held in buf (not copied: buf must outlive the
 *  result). @return NZ_OK and *out, or an error naming the problem. */
int nz_st_parse(const uint8_t *buf, size_t len, nz_st_file **out, nz_error *err);

/** Map path read-only and parse it. @return NZ_OK and *out, or an error. */
int nz_st_open(const char *path, nz_st_file **out, nz_error *err);

/** Free a parsed file (unmaps it when opened by nz_st_open). Accepts NULL. */
void nz_st_free(nz_st_file *f);

/** @return number of tensors. */
size_t nz_st_count(const nz_st_file *f);

/** @return tensor i (0 <= i < count) in ascending data-offset order, or NULL. */
const nz_st_tensor *nz_st_get(const nz_st_file *f, size_t i);

/** @return the tensor named name, or NULL. */
const nz_st_tensor *nz_st_find(const nz_st_file *f, const char *name);

/** @return the "__metadata__" object (borrowed; NULL when absent). */
const json_t *nz_st_metadata(const nz_st_file *f);

/** Description of one tensor to write. */
typedef struct nz_st_out {
    const char *name;
    const char *st_dtype; /* "BF16", "F16", "F32", ... */
    int ndim;
    int64_t shape[NZ_MAX_DIMS];
} nz_st_out;

typedef struct nz_st_writer nz_st_writer;

/** Create path and write the header for tensors t[0..n) laid out in that
 *  order; metadata (string values only) may be NULL.
 *  @return NZ_OK and *out, or an error (unknown dtype, duplicate name, I/O). */
int nz_st_writer_open(const char *path, const nz_st_out *t, size_t n, const json_t *metadata,
                      nz_st_writer **out, nz_error *err);

/** Append the data of the next tensor (tensors must be put in order, in one or
 *  more calls; a tensor is complete when its byte count is reached).
 *  @return NZ_OK or an error (too many bytes, I/O). */
int nz_st_writer_put(nz_st_writer *w, const void *data, size_t size, nz_error *err);

/** Finish: checks that every tensor received all its bytes, flushes, closes,
 *  and frees w (also on error). @return NZ_OK or an error. */
int nz_st_writer_close(nz_st_writer *w, nz_error *err);

/** Abort: close and delete the partial file, free w. Accepts NULL. */
void nz_st_writer_abort(nz_st_writer *w);

/** @return element size in bytes of a safetensors dtype string, 0 if unknown. */
size_t nz_st_dtype_size(const char *st_dtype);

#ifdef __cplusplus
}
#endif
#endif /* NZ_SAFETENSORS_H */
