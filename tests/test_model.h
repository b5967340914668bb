/* Helpers for tests that build small .nzp models with the writer API. */
#ifndef NZ_TEST_MODEL_H
#define NZ_TEST_MODEL_H

#include "test_util.h"

#include "nz_codec.h"
#include "nz_container.h"

#include <stdio.h>

/* Encode src (rows x cols elements of dt) in mode/coder with tile_rows rows
 * per tile and add it to w as a tensor of ndim dims (2: [rows, cols];
 * 1: [cols]); every step must succeed. */
static inline void tm_add_tensor(nz_writer *w, const char *name, const char *st, nz_dtype dt,
                                 const char *mode, nz_coder coder, uint64_t rows, uint64_t cols,
                                 uint32_t tile_rows, int ndim, const void *src) {
    nz_error e = {0};
    nz_mode m;
    nz_tensor_desc d;
    uint64_t counts[256];
    int64_t shape[2] = {(int64_t)rows, (int64_t)cols};
    if (ndim == 1) shape[0] = (int64_t)cols;
    assert_int_equal(nz_mode_parse(mode, &m, &e), NZ_OK);
    assert_int_equal(nz_desc_init(&d, dt, nz_dtype_size(dt), &m, coder, rows, cols, tile_rows, &e), NZ_OK);
    assert_int_equal(nz_tensor_analyze(&d, src, counts, &e), NZ_OK);
    if (nz_writer_add_tensor(w, name, st, ndim, shape, &d, counts, src, &e) != NZ_OK)
        fail_msg("adding tensor '%s': %s", name, e.msg);
}

/* Read a whole file into a malloc'd block of exactly its size. */
static inline uint8_t *tm_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fseek(f, 0, SEEK_END);
    *len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *p = xmalloc(*len);
    assert_int_equal(fread(p, 1, *len, f), *len);
    fclose(f);
    return p;
}

#endif
