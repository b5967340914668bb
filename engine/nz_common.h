/*
 * nz_common.h — status codes, error reporting and element types shared by
 * every engine module.
 *
 * Error contract (zstd-like): every public engine function that can fail
 * returns an `int` status, NZ_OK (0) on success or a negative NZ_E* code, and
 * takes an optional `nz_error *err` as its last argument. When err is not
 * NULL, a failing call fills it with the code and a one-line message naming
 * what is wrong ("tensor 'x' tile 3: checksum mismatch"). The engine never
 * calls exit() or abort().
 */
#ifndef NZ_COMMON_H
#define NZ_COMMON_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    NZ_OK = 0,
    NZ_E_INVALID_ARG = -1, /* caller passed something unusable */
    NZ_E_NOMEM = -2,       /* allocation failed */
    NZ_E_IO = -3,          /* open/read/write/mmap failed */
    NZ_E_FORMAT = -4,      /* input is malformed (bad magic, bad JSON, bad field) */
    NZ_E_TRUNCATED = -5,   /* input ends before a declared size */
    NZ_E_CHECKSUM = -6,    /* stored checksum does not match the data */
    NZ_E_CORRUPT = -7,     /* entropy-coded data does not decode consistently */
    NZ_E_UNSUPPORTED = -8, /* valid but not supported (version, dtype, mode) */
    NZ_E_RANGE = -9,       /* a value is out of range for the requested mode */
    NZ_E_NOT_FOUND = -10,  /* a named tensor or blob does not exist */
    NZ_E_CANCELLED = -11   /* the caller's stop hook asked to stop (client gone, deadline) */
};

#define NZ_ERROR_MSG_MAX 320

/** Error details filled by a failing call. */
typedef struct nz_error {
    int code;                   /* one of NZ_E_* */
    char msg[NZ_ERROR_MSG_MAX]; /* NUL-terminated human-readable message */
} nz_error;

/* Error forwarding inside a function that has `int rc`, `nz_error *err` and a
 * `done:` label where it cleans up and returns rc (zstd's FORWARD_IF_ERROR). */
#define NZ_TRY(x)                                                                                            \
    do {                                                                                                     \
        if ((rc = (x)) != NZ_OK) goto done;                                                                  \
    } while (0)
#define NZ_FAIL(code, ...)                                                                                   \
    do {                                                                                                     \
        rc = nz_fail(err, code, __VA_ARGS__);                                                                \
        goto done;                                                                                           \
    } while (0)

/** @return the little-endian u32 at p (any alignment). */
static inline uint32_t nz_rd32le(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/** Store v at p as a little-endian u32 (any alignment). */
static inline void nz_wr32le(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/** @return the little-endian u16 at p (any alignment). */
static inline uint16_t nz_rd16le(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/** @return the little-endian u64 at p (any alignment). */
static inline uint64_t nz_rd64le(const uint8_t *p) { return nz_rd32le(p) | (uint64_t)nz_rd32le(p + 4) << 32; }

/** Store v at p as a little-endian u64 (any alignment). */
static inline void nz_wr64le(uint8_t *p, uint64_t v) {
    nz_wr32le(p, (uint32_t)v);
    nz_wr32le(p + 4, (uint32_t)(v >> 32));
}

/** @return a monotonic clock (CLOCK_MONOTONIC) in nanoseconds. */
uint64_t nz_now_ns(void);

/** @return the same clock in seconds. */
static inline double nz_now_s(void) { return (double)nz_now_ns() * 1e-9; }

/** Fill err (if not NULL) with code and a printf-style message.
 *  @return code, so callers can write `return nz_fail(err, NZ_E_FORMAT, ...)`. */
int nz_fail(nz_error *err, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/** Prefix an already-filled message with more context ("tensor 'x': ...").
 *  @return err->code (or NZ_E_INVALID_ARG when err is NULL). */
int nz_fail_prefix(nz_error *err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/** @return a static name for a status code ("checksum", "truncated", ...). */
const char *nz_status_name(int code);

/** Map a whole regular file read-only (MAP_SHARED; the file may be larger
 *  than memory). An empty file gives *map = NULL and *len = 0. Messages name
 *  the path. @return NZ_OK, or NZ_E_IO (open/stat/mmap failed, not a
 *  regular file) / NZ_E_RANGE (too large for the address space). */
int nz_map_file(const char *path, const uint8_t **map, size_t *len, nz_error *err);

/** Undo nz_map_file. Accepts NULL / 0. */
void nz_unmap_file(const uint8_t *map, size_t len);

/** Element types of source tensors. */
typedef enum nz_dtype {
    NZ_DT_BF16 = 0,
    NZ_DT_F16 = 1,
    NZ_DT_F32 = 2,
    NZ_DT_OTHER = 3 /* any other safetensors dtype: stored raw, never decoded to fp32 */
} nz_dtype;

/** @return bytes per element of a float dtype (2, 2, 4), 0 for NZ_DT_OTHER. */
size_t nz_dtype_size(nz_dtype dt);

/** @return "bf16", "f16", "f32" or "other". */
const char *nz_dtype_name(nz_dtype dt);

#ifdef __cplusplus
}
#endif
#endif /* NZ_COMMON_H */
