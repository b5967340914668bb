/* .nzp container: writer/loader round trip, laziness, and damage handling. */
#include "test_model.h"

#include "nz_alloc.h"
#include "nz_codec.h"
#include "nz_container.h"
#include "nz_hash.h"
#include "nz_pack.h"

#include <math.h>
#include <stdio.h>
#include <sys/mman.h>
#include <xxhash.h>
#include <unistd.h>

/* ---------------------------------------------------------------- fixture */

#define W_ROWS    37
#define W_COLS    96
#define TILE_ROWS 8

static uint16_t g_w[W_ROWS * W_COLS]; /* bf16 weights, lossless rans */
static float g_f[20 * 300];           /* f32 weights, lossy-4 zstd */
static float g_bias[W_ROWS];          /* raw */
static uint8_t *g_img;                /* the written file */
static size_t g_len;

static void build_fixture(void) {
    uint64_t s = 42;
    for (size_t i = 0; i < W_ROWS * W_COLS; i++) g_w[i] = nz_f32_to_bf16((float)(0.02 * tu_gauss(&s)));
    for (size_t i = 0; i < 20 * 300; i++) g_f[i] = (float)(0.05 * tu_gauss(&s));
    for (size_t i = 0; i < W_ROWS; i++) g_bias[i] = (float)tu_gauss(&s);
    char path[] = "/tmp/nz_test_container_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    nz_writer *w;
    nz_error e = {0};
    assert_int_equal(nz_writer_create(path, &w, &e), NZ_OK);
    json_t *cfg = json_pack("{sssi}", "architecture", "test", "d_model", 96);
    assert_int_equal(nz_writer_set_config(w, cfg, &e), NZ_OK);
    json_decref(cfg);
    static const char spm[] = "fake sentencepiece model bytes";
    assert_int_equal(nz_writer_add_blob(w, "spm.model", spm, sizeof spm, &e), NZ_OK);
    tm_add_tensor(w, "layer.w", "BF16", NZ_DT_BF16, "lossless", NZ_CODER_RANS, W_ROWS, W_COLS, TILE_ROWS, 2,
                  g_w);
    tm_add_tensor(w, "layer.f", "F32", NZ_DT_F32, "lossy-4", NZ_CODER_ZSTD, 20, 300, TILE_ROWS, 2, g_f);
    tm_add_tensor(w, "layer.b", "F32", NZ_DT_F32, "raw", NZ_CODER_NONE, 1, W_ROWS, TILE_ROWS, 1, g_bias);
    assert_int_equal(nz_writer_finish(w, &e), NZ_OK);
    g_img = tm_read_file(path, &g_len);
    unlink(path);
}

static int setup(void **state) {
    (void)state;
    build_fixture();
    return 0;
}

static int teardown(void **state) {
    (void)state;
    free(g_img);
    return 0;
}

/* Load buf and, when it loads, verify it. @return 0 when the image is judged
 * intact, the first error code otherwise; msg receives the message. */
static int load_and_verify(const uint8_t *buf, size_t len, char *msg, size_t cap) {
    nz_model *m = NULL;
    nz_error e = {0};
    int rc = nz_model_load_buffer(buf, len, &m, &e);
    if (rc == NZ_OK) {
        assert_non_null(m);
        uint64_t bad = 0;
        rc = nz_verify(m, NULL, NULL, &bad);
        if (rc == NZ_OK) assert_int_equal(bad, 0);
        /* redo once to fetch a message */
        if (rc) {
            nz_dctx *dc = nz_dctx_create();
            float *out = malloc(TILE_ROWS * 300 * sizeof(float));
            const uint8_t *bp;
            size_t bs;
            int got = nz_model_check_padding(m, &e) || nz_model_blob(m, "spm.model", &bp, &bs, &e);
            for (size_t i = 0; !got && i < nz_model_ntensors(m); i++)
                for (uint64_t t = 0; !got && t < nz_model_tensor(m, i)->ntiles; t++)
                    got = nz_model_decode_f32(m, dc, i, t, out, &e);
            free(out);
            nz_dctx_free(dc);
        }
        nz_model_free(m);
    } else {
        assert_null(m);
        assert_true(rc < 0);
        assert_true(e.msg[0] != 0);
    }
    if (msg) snprintf(msg, cap, "%s", e.msg);
    return rc;
}

/* Replace the JSON header of g_img by hdr (re-hashed), keeping the data. */
static uint8_t *with_header(const char *hdr, size_t *len) {
    uint64_t doff = nz_rd64le(g_img + 24), dsize = nz_rd64le(g_img + 32), hlen = strlen(hdr);
    uint64_t ndoff = (64 + hlen + 63) / 64 * 64;
    *len = ndoff + dsize;
    uint8_t *img = calloc(1, *len);
    memcpy(img, g_img, 64);
    memcpy(img + 64, hdr, hlen);
    memcpy(img + ndoff, g_img + doff, dsize);
    nz_wr64le(img + 16, hlen);
    nz_wr64le(img + 24, ndoff);
    nz_wr64le(img + 40, nz_hash(hdr, hlen));
    return img;
}

static char *header_copy(void) {
    uint64_t hlen = nz_rd64le(g_img + 16);
    char *h = malloc(hlen + 1);
    memcpy(h, g_img + 64, hlen);
    h[hlen] = 0;
    return h;
}

/* Substitute the first occurrence of from by to in the header; expect a load
 * error whose message contains want. */
static void expect_header_error(const char *from, const char *to, const char *want) {
    char *h = header_copy();
    char *at = strstr(h, from);
    if (!at) fail_msg("fixture header lacks '%s'", from);
    size_t n = strlen(h) - strlen(from) + strlen(to) + 1;
    char *nh = malloc(n);
    snprintf(nh, n, "%.*s%s%s", (int)(at - h), h, to, at + strlen(from));
    size_t len;
    uint8_t *img = with_header(nh, &len);
    nz_model *m = NULL;
    nz_error e = {0};
    int rc = nz_model_load_buffer(img, len, &m, &e);
    if (rc == NZ_OK) {
        nz_model_free(m);
        fail_msg("header edit '%s' -> '%s' was accepted", from, to);
    }
    if (!strstr(e.msg, want)) fail_msg("error '%s' does not mention '%s'", e.msg, want);
    free(img);
    free(nh);
    free(h);
}

/* ---------------------------------------------------------------- tests */

static void test_round_trip(void **state) {
    (void)state;
    nz_model *m;
    nz_error e = {0};
    assert_int_equal(nz_model_load_buffer(g_img, g_len, &m, &e), NZ_OK);
    assert_int_equal(nz_model_ntensors(m), 3);
    assert_int_equal(nz_model_find(m, "layer.f"), 1);
    assert_int_equal(nz_model_find(m, "nope"), -1);
    const json_t *cfg = nz_model_config(m);
    assert_string_equal(json_string_value(json_object_get(cfg, "architecture")), "test");
    const uint8_t *b;
    size_t bs;
    assert_int_equal(nz_model_blob(m, "spm.model", &b, &bs, &e), NZ_OK);
    assert_string_equal((const char *)b, "fake sentencepiece model bytes");
    assert_int_equal(nz_model_blob(m, "dict.txt", &b, &bs, &e), NZ_E_NOT_FOUND);

    const nz_tensor *t = nz_model_tensor(m, 0);
    assert_string_equal(t->name, "layer.w");
    assert_int_equal(t->ntiles, (W_ROWS + TILE_ROWS - 1) / TILE_ROWS);
    assert_int_equal(t->desc.coder, NZ_CODER_RANS);
    nz_dctx *dc = nz_dctx_create();
    uint16_t nat[TILE_ROWS * W_COLS];
    float f[TILE_ROWS * 300];
    for (uint64_t i = 0; i < t->ntiles; i++) {
        uint64_t n = nz_desc_tile_nrows(&t->desc, i) * W_COLS;
        assert_int_equal(nz_model_decode_native(m, dc, 0, i, nat, &e), NZ_OK);
        assert_memory_equal(nat, g_w + i * TILE_ROWS * W_COLS, n * 2);
        assert_int_equal(nz_model_decode_f32(m, dc, 0, i, f, &e), NZ_OK);
        for (uint64_t k = 0; k < n; k++) assert_true(f[k] == nz_bf16_to_f32(g_w[i * TILE_ROWS * W_COLS + k]));
    }
    t = nz_model_tensor(m, 1); /* lossy-4: within half an ulp at 4 bits */
    assert_int_equal(t->desc.coder, NZ_CODER_ZSTD);
    for (uint64_t i = 0; i < t->ntiles; i++) {
        assert_int_equal(nz_model_decode_f32(m, dc, 1, i, f, &e), NZ_OK);
        for (uint64_t k = 0; k < nz_desc_tile_nrows(&t->desc, i) * 300; k++) {
            float x = g_f[i * TILE_ROWS * 300 + k];
            assert_true(fabsf(f[k] - x) <= fabsf(x) * (1.0f / 32) + 1e-30f);
        }
    }
    t = nz_model_tensor(m, 2);
    assert_int_equal(t->ndim, 1);
    assert_int_equal(t->desc.coder, NZ_CODER_NONE);
    assert_int_equal(nz_model_decode_f32(m, dc, 2, 0, f, &e), NZ_OK);
    assert_memory_equal(f, g_bias, sizeof g_bias);
    uint64_t bad = 1;
    assert_int_equal(nz_verify(m, NULL, NULL, &bad), NZ_OK);
    assert_int_equal(bad, 0);
    nz_dctx_free(dc);
    nz_model_free(m);
}

/* Opening must read the header only: the data section is made unreadable. */
static void test_lazy_load(void **state) {
    (void)state;
    long pg = sysconf(_SC_PAGESIZE);
    uint64_t doff = nz_rd64le(g_img + 24);
    size_t shift = (size_t)(pg - (long)(doff % (uint64_t)pg)) % (size_t)pg;
    size_t total = (shift + g_len + (size_t)pg - 1) / (size_t)pg * (size_t)pg + (size_t)pg;
    uint8_t *area = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    assert_true(area != MAP_FAILED);
    uint8_t *img = area + shift;
    memcpy(img, g_img, g_len);
    assert_int_equal(((uintptr_t)(img + doff)) % (uintptr_t)pg, 0);
    assert_int_equal(mprotect(img + doff, total - shift - doff, PROT_NONE), 0);
    nz_model *m;
    nz_error e = {0};
    assert_int_equal(nz_model_load_buffer(img, g_len, &m, &e), NZ_OK);
    assert_int_equal(nz_model_ntensors(m), 3);
    nz_model_free(m);
    munmap(area, total);
}

static void test_empty_and_magic(void **state) {
    (void)state;
    nz_model *m;
    nz_error e = {0};
    assert_int_equal(nz_model_load_buffer(g_img, 0, &m, &e), NZ_E_TRUNCATED);
    assert_string_equal(e.msg, "empty file");
    uint8_t *img = malloc(g_len);
    memcpy(img, g_img, g_len);
    img[1] = 'X';
    assert_int_equal(nz_model_load_buffer(img, g_len, &m, &e), NZ_E_FORMAT);
    assert_non_null(strstr(e.msg, "bad magic"));
    memcpy(img, g_img, g_len);
    img[8] = 2; /* version */
    assert_int_equal(nz_model_load_buffer(img, g_len, &m, &e), NZ_E_UNSUPPORTED);
    assert_non_null(strstr(e.msg, "version 2"));
    memcpy(img, g_img, g_len);
    img[64] ^= 1; /* header byte */
    assert_int_equal(nz_model_load_buffer(img, g_len, &m, &e), NZ_E_CHECKSUM);
    assert_non_null(strstr(e.msg, "header checksum"));
    free(img);
    /* a safetensors file gets a hint */
    static const uint8_t st[] = {2, 0, 0, 0, 0, 0, 0, 0, '{', '}'};
    assert_int_equal(nz_model_load_buffer(st, sizeof st, &m, &e), NZ_E_FORMAT);
    assert_non_null(strstr(e.msg, "safetensors"));
    assert_int_equal(nz_model_open("/nonexistent/x.nzp", &m, &e), NZ_E_IO);
    assert_non_null(strstr(e.msg, "/nonexistent/x.nzp"));
}

static void test_every_truncation(void **state) {
    (void)state;
    for (size_t len = 0; len < g_len; len++) {
        uint8_t *img = malloc(len ? len : 1); /* exact size: ASan catches overreads */
        memcpy(img, g_img, len);
        char msg[NZ_ERROR_MSG_MAX];
        int rc = load_and_verify(img, len, msg, sizeof msg);
        if (rc == NZ_OK) fail_msg("truncation to %zu of %zu bytes was accepted", len, g_len);
        free(img);
    }
}

static void test_every_bit_flip_detected(void **state) {
    (void)state;
    uint64_t s = 7;
    size_t step = tu_quick() ? 37 : 1;
    size_t flips = 0;
    for (size_t pos = 0; pos < g_len; pos += step) {
        int bit = (int)(tu_rand(&s) % 8);
        uint8_t *img = malloc(g_len);
        memcpy(img, g_img, g_len);
        img[pos] ^= (uint8_t)(1u << bit);
        char msg[NZ_ERROR_MSG_MAX];
        if (load_and_verify(img, g_len, msg, sizeof msg) == NZ_OK)
            fail_msg("bit %d of byte %zu flipped and nothing noticed", bit, pos);
        free(img);
        flips++;
    }
    assert_true(flips > 100);
}

static void test_tile_damage_message(void **state) {
    (void)state;
    nz_model *m;
    nz_error e = {0};
    uint8_t *img = malloc(g_len);
    memcpy(img, g_img, g_len);
    assert_int_equal(nz_model_load_buffer(img, g_len, &m, &e), NZ_OK);
    const nz_tensor *t = nz_model_tensor(m, 0);
    uint64_t doff = nz_rd64le(g_img + 24);
    img[doff + t->tiles[3].offset + 20] ^= 0x10;
    nz_dctx *dc = nz_dctx_create();
    float f[TILE_ROWS * W_COLS];
    assert_int_equal(nz_model_decode_f32(m, dc, 0, 2, f, &e), NZ_OK);
    assert_int_equal(nz_model_decode_f32(m, dc, 0, 3, f, &e), NZ_E_CHECKSUM);
    assert_string_equal(e.msg, "tensor 'layer.w' tile 3: checksum mismatch");
    /* an error does not poison the context: the next tile decodes */
    assert_int_equal(nz_model_decode_f32(m, dc, 0, 4, f, &e), NZ_OK);
    uint64_t bad = 0;
    assert_int_equal(nz_verify(m, NULL, NULL, &bad), NZ_E_CHECKSUM);
    assert_int_equal(bad, 1);
    nz_dctx_free(dc);
    nz_model_free(m);
    free(img);
}

static void test_header_validation(void **state) {
    (void)state;
    expect_header_error("\"tile_rows\":8", "\"tile_rows\":0", "tile_rows");
    expect_header_error("\"tile_rows\":8", "\"tile_rows\":16", "expected 3 tiles, found 5");
    expect_header_error("\"rows\":37", "\"rows\":36", "do not match the shape");
    expect_header_error("\"dtype\":\"bf16\"", "\"dtype\":\"f32\"", "does not match st_dtype");
    expect_header_error("\"dtype\":\"bf16\"", "\"dtype\":\"int4\"", "unknown dtype");
    expect_header_error("\"mode\":\"lossless\"", "\"mode\":\"lossy-9\"", "bad mode");
    expect_header_error("\"coder\":\"rans\"", "\"coder\":\"none\"", "coder");
    expect_header_error("\"name\":\"layer.f\"", "\"name\":\"layer.w\"", "duplicate tensor name");
    expect_header_error("\"tiles\":[[", "\"tiles\":[[1", "not 64-byte aligned");
    expect_header_error("\"tiles\":[[64,", "\"tiles\":[[999999936,", "outside");
    expect_header_error("\"freq\":[[", "\"freq\":[[300,1],[", "freq");
    expect_header_error("\"tensors\":[", "\"tensors\":7,\"x\":[", "\"tensors\" must be an array");
    expect_header_error("\"offset\":0", "\"offset\":-64", "offset");
    expect_header_error("\"blobs\":{", "\"blobs\":{\"a\":{\"offset\":0,\"size\":1,\"xxh3\":\"00\"},", "xxh3");
    expect_header_error("\"generator\"", "\"generator\"\"", "header JSON");
    size_t len;
    uint8_t *img = with_header("[1, 2]", &len);
    nz_model *m = NULL;
    nz_error e = {0};
    assert_int_equal(nz_model_load_buffer(img, len, &m, &e), NZ_E_FORMAT);
    assert_string_equal(e.msg, "header JSON is not an object");
    free(img);
}

static void test_overlap_detected(void **state) {
    (void)state;
    /* make tile 1 of layer.w point at tile 0's bytes */
    char *h = header_copy();
    char *tiles = strstr(h, "\"tiles\":[[");
    assert_non_null(tiles);
    unsigned long long o0, s0;
    assert_int_equal(sscanf(tiles, "\"tiles\":[[%llu,%llu,", &o0, &s0), 2);
    char *second = strstr(tiles + 10, "],[") + 3;
    char *comma = strchr(second, ',');
    char nh[65536];
    snprintf(nh, sizeof nh, "%.*s%llu%s", (int)(second - h), h, o0, comma);
    size_t len;
    uint8_t *img = with_header(nh, &len);
    nz_model *m = NULL;
    nz_error e = {0};
    int rc = nz_model_load_buffer(img, len, &m, &e);
    nz_model_free(m);
    assert_true(rc != NZ_OK);
    assert_true(strstr(e.msg, "overlap") || strstr(e.msg, "fixed bytes"));
    free(img);
    free(h);
}

static void test_writer_errors(void **state) {
    (void)state;
    nz_writer *w;
    nz_error e = {0};
    assert_int_equal(nz_writer_create("/nonexistent-dir/x.nzp", &w, &e), NZ_E_IO);
    char path[] = "/tmp/nz_test_writer_XXXXXX";
    int fd = mkstemp(path);
    close(fd);
    assert_int_equal(nz_writer_create(path, &w, &e), NZ_OK);
    assert_int_equal(nz_writer_add_blob(w, "a", "x", 1, &e), NZ_OK);
    assert_int_equal(nz_writer_add_blob(w, "a", "y", 1, &e), NZ_E_INVALID_ARG);
    nz_mode m = {NZ_MODE_LOSSLESS, 0, 0};
    nz_tensor_desc d;
    assert_int_equal(nz_desc_init(&d, NZ_DT_BF16, 2, &m, NZ_CODER_RANS, W_ROWS, W_COLS, TILE_ROWS, &e),
                     NZ_OK);
    assert_int_equal(nz_tensor_analyze(&d, g_w, NULL, &e), NZ_OK);
    int64_t shape[2] = {W_ROWS, W_COLS};
    assert_int_equal(nz_writer_begin_tensor(w, "t", "BF16", 2, shape, &d, NULL, &e), NZ_OK);
    assert_int_equal(nz_writer_finish(w, &e), NZ_E_INVALID_ARG); /* no tiles written */
    assert_non_null(strstr(e.msg, "missing tiles"));
    assert_int_equal(access(path, F_OK), 0); /* the old file is untouched... */
    unlink(path);
    char tmp[64];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    assert_int_equal(access(tmp, F_OK), -1); /* ...and no temporary is left */
}

/* The dispatched checksum equals the reference XXH3-64 of libxxhash. */
static void test_hash_matches_reference(void **state) {
    (void)state;
    uint64_t s = 3;
    uint8_t *buf = malloc(70000 + 2); /* sizes up to 69999 at offsets up to 2 */
    for (size_t i = 0; i < 70002; i++) buf[i] = (uint8_t)tu_rand(&s);
    static const size_t sizes[] = {0, 1, 3, 16, 17, 128, 129, 240, 241, 1000, 1024, 4096, 65536, 69999};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++)
        for (size_t off = 0; off < 3; off++)
            if (nz_hash(buf + off, sizes[k]) != XXH3_64bits(buf + off, sizes[k]))
                fail_msg("nz_hash differs from XXH3_64bits at size %zu offset %zu", sizes[k], off);
    free(buf);
}

/* An opened model's mapping is accounted under "mapped"; the report adds
 * the OS's resident set. */
static void test_memory_report(void **state) {
    (void)state;
    char path[] = "/tmp/nz_test_mapped_XXXXXX";
    int fd = mkstemp(path);
    assert_int_equal(write(fd, g_img, g_len), (ssize_t)g_len);
    close(fd);
    nz_mem_report r0, r1, r2;
    nz_mem_get_report(&r0);
    nz_model *m;
    nz_error e = {0};
    assert_int_equal(nz_model_open(path, &m, &e), NZ_OK);
    assert_int_equal(nz_mem_get_report(&r1), NZ_OK);
    assert_int_equal(r1.current[NZ_MEM_MAPPED], r0.current[NZ_MEM_MAPPED] + g_len);
    assert_true(r1.peak[NZ_MEM_MAPPED] >= r1.current[NZ_MEM_MAPPED]);
    assert_true(r1.rss > 0 && r1.rss_peak >= r1.rss);
    assert_true(r1.counted > r0.counted); /* the parsed header */
    /* the file was just written, so its pages sit in the page cache: mincore
     * sees all of it resident (capped at the file's length) */
    assert_int_equal(r1.mapped_resident, r0.mapped_resident + g_len);
    nz_model_free(m);
    nz_mem_get_report(&r2);
    assert_int_equal(r2.current[NZ_MEM_MAPPED], r0.current[NZ_MEM_MAPPED]);
    assert_int_equal(r2.mapped_resident, r0.mapped_resident);
    assert_int_equal(r2.counted, r0.counted);
    assert_string_equal(nz_mem_cat_name(NZ_MEM_MAPPED), "mapped");
    unlink(path);
}

/* malloc's free memory after malloc_trim: its chunks stay in the free lists (allocator_free) but their
 * pages go back to the OS, so the report's resident part drops and the accounted bytes never exceed
 * the RSS by counting them. 64 MiB in 100 KiB blocks (below the mmap threshold: in the arena) behind a
 * live fence block, freed: a hole that only a trim returns. Skipped where malloc is not glibc's
 * (a sanitizer or valgrind replaces it and mallinfo2 does not see the blocks). */
static void test_allocator_free_resident(void **state) {
    (void)state;
    enum { N = 640, SZ = 100 << 10 };
    static char *blocks[N];
    for (int i = 0; i < N; i++) {
        blocks[i] = malloc(SZ);
        assert_non_null(blocks[i]);
        memset(blocks[i], i & 0xff, SZ);
    }
    char *fence = malloc(SZ); /* after the blocks (a small one could come from an earlier hole) */
    assert_non_null(fence);
    for (int i = 0; i < N; i++) free(blocks[i]);
    nz_mem_report r1, r2;
    assert_int_equal(nz_mem_get_report(&r1), NZ_OK);
    if (r1.allocator_free < (size_t)N * SZ) {
        free(fence);
        skip();
    }
    assert_true(r1.allocator_free_resident >= (size_t)N * SZ * 9 / 10); /* touched, freed, not trimmed */
    assert_true(nz_mem_trim(0) >= (size_t)N * SZ);
    assert_int_equal(nz_mem_get_report(&r2), NZ_OK);
    assert_true(r2.allocator_free >= (size_t)N * SZ);             /* still in the free lists */
    assert_true(r2.allocator_free_resident < (size_t)N * SZ / 8); /* but no longer resident */
    assert_true(r2.rss + ((size_t)N * SZ) / 2 < r1.rss);
    assert_true(r2.accounted <= r2.rss + (1u << 20));
    free(fence);
}

/* A served file truncated in place (SIGBUS on the mapping) fails the reads
 * that touch it with NZ_E_IO naming the file, and the process lives on. */
static void test_truncated_under_us(void **state) {
    (void)state;
    char path[] = "/tmp/nz_test_trunc_XXXXXX";
    int fd = mkstemp(path);
    assert_int_equal(write(fd, g_img, g_len), (ssize_t)g_len);
    nz_model *m;
    nz_error e = {0};
    assert_int_equal(nz_model_open(path, &m, &e), NZ_OK);
    nz_dctx *dc = nz_dctx_create();
    float f[TILE_ROWS * W_COLS];
    assert_int_equal(nz_model_decode_f32(m, dc, 0, 2, f, &e), NZ_OK);
    assert_false(nz_model_faulted(m));
    assert_int_equal(ftruncate(fd, 0), 0);
    assert_int_equal(nz_model_decode_f32(m, dc, 0, 3, f, &e), NZ_E_IO);
    assert_non_null(strstr(e.msg, path));
    assert_non_null(strstr(e.msg, "changed under the running process"));
    assert_non_null(strstr(e.msg, "tensor 'layer.w' tile 3"));
    assert_true(nz_model_faulted(m));
    /* every later read fails the same way; nothing else is affected */
    uint64_t bad = 0;
    assert_int_equal(nz_verify(m, NULL, NULL, &bad), NZ_E_IO);
    nz_dctx_free(dc);
    nz_model_free(m);
    close(fd);
    unlink(path);
}

static void test_memory_returns(void **state) {
    (void)state;
    size_t before = nz_mem_current(NZ_MEM_OTHER) + nz_mem_current(NZ_MEM_SCRATCH);
    nz_model *m;
    nz_error e = {0};
    assert_int_equal(nz_model_load_buffer(g_img, g_len, &m, &e), NZ_OK);
    assert_true(nz_mem_current(NZ_MEM_OTHER) > 0);
    uint64_t bad;
    nz_verify(m, NULL, NULL, &bad);
    nz_model_free(m);
    assert_int_equal(nz_mem_current(NZ_MEM_OTHER) + nz_mem_current(NZ_MEM_SCRATCH), before);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_lazy_load),
        cmocka_unit_test(test_empty_and_magic),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_every_bit_flip_detected),
        cmocka_unit_test(test_tile_damage_message),
        cmocka_unit_test(test_header_validation),
        cmocka_unit_test(test_overlap_detected),
        cmocka_unit_test(test_writer_errors),
        cmocka_unit_test(test_hash_matches_reference),
        cmocka_unit_test(test_memory_report),
        cmocka_unit_test(test_memory_returns),
        cmocka_unit_test(test_allocator_free_resident),
        cmocka_unit_test(test_truncated_under_us),
    };
    return cmocka_run_group_tests_name("container", tests, setup, teardown);
}
