/* Unit tests for engine/nz_safetensors.c: writer -> reader round trips, a
 * golden image written by tests/python/st_util.py, every reader and writer
 * error path, truncations and single-byte header corruptions. */
#include "test_util.h"

#include "nz_alloc.h"
#include "nz_safetensors.h"

#include <errno.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* helpers                                                                  */
/* ------------------------------------------------------------------------ */

static char g_dir[256]; /* per-run scratch directory */

static const char *tpath(char *buf, size_t cap, const char *name) {
    snprintf(buf, cap, "%s/%s", g_dir, name);
    return buf;
}

static int file_exists(const char *path) {
    struct stat st;
    return stat(path, &st) == 0;
}

static int tmp_exists(const char *path) {
    char tmp[600];
    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    return file_exists(tmp);
}

/* Read a whole file into a malloc'd buffer of exactly its size. */
static uint8_t *read_all(const char *path, size_t *len) {
    FILE *fp = fopen(path, "rb");
    assert_non_null(fp);
    fseek(fp, 0, SEEK_END);
    long n = ftell(fp);
    fseek(fp, 0, SEEK_SET);
    uint8_t *buf = malloc(n ? (size_t)n : 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, fp), (size_t)n);
    fclose(fp);
    *len = (size_t)n;
    return buf;
}

static void write_all(const char *path, const void *data, size_t len) {
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    assert_int_equal(fwrite(data, 1, len, fp), len);
    assert_int_equal(fclose(fp), 0);
}

/* u64 LE length + header text + data, in a malloc'd buffer of exact size
 * (so ASan catches any read past the end). */
static uint8_t *make_image(const char *header, const void *data, size_t dlen, size_t *len) {
    size_t hlen = strlen(header);
    *len = 8 + hlen + dlen;
    uint8_t *buf = malloc(*len);
    assert_non_null(buf);
    for (int i = 0; i < 8; i++) buf[i] = (uint8_t)((uint64_t)hlen >> (8 * i));
    memcpy(buf + 8, header, hlen);
    if (dlen) memcpy(buf + 8 + hlen, data, dlen);
    return buf;
}

/* Parse header + dlen zero bytes of data; expect failure with code and a
 * message containing each of the (NULL-terminated) substrings. */
static void expect_bad_image(const uint8_t *buf, size_t len, int code, const char *const *subs) {
    nz_st_file *f = (nz_st_file *)(uintptr_t)1;
    nz_error err = {0};
    int rc = nz_st_parse(buf, len, &f, &err);
    if (rc != code) fail_msg("expected %d, got %d: %s", code, rc, err.msg);
    assert_int_equal(err.code, code);
    assert_null(f);
    for (; *subs; subs++)
        if (!strstr(err.msg, *subs)) fail_msg("message '%s' lacks '%s'", err.msg, *subs);
    /* err is optional */
    assert_int_equal(nz_st_parse(buf, len, &f, NULL), code);
}

#define SUBS(...) ((const char *const[]){__VA_ARGS__, NULL})

static void expect_bad(const char *header, size_t dlen, int code, const char *const *subs) {
    uint8_t *zeros = calloc(1, dlen ? dlen : 1);
    size_t len;
    uint8_t *buf = make_image(header, zeros, dlen, &len);
    expect_bad_image(buf, len, code, subs);
    free(buf);
    free(zeros);
}

/* Everything the reader promises about a successfully parsed image. */
static void check_consistent(const nz_st_file *f, const uint8_t *buf, size_t len) {
    size_t n = nz_st_count(f);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | buf[i];
    const uint8_t *data = buf + 8 + hlen;
    uint64_t prev_off = 0, busy_end = 0;
    unsigned sum = 0;
    for (size_t i = 0; i < n; i++) {
        const nz_st_tensor *t = nz_st_get(f, i);
        assert_non_null(t);
        assert_non_null(t->name);
        assert_int_equal(t->elem_size, nz_st_dtype_size(t->st_dtype));
        assert_true(t->ndim >= 0 && t->ndim <= NZ_MAX_DIMS);
        uint64_t nelem = 1;
        for (int d = 0; d < t->ndim; d++) {
            assert_true(t->shape[d] >= 0);
            nelem *= (uint64_t)t->shape[d];
        }
        assert_true(nelem == t->nelem);
        assert_true(t->size == t->nelem * t->elem_size);
        assert_ptr_equal(t->data, data + t->offset);
        assert_true(t->data >= buf + 8 && t->offset + t->size <= (uint64_t)(buf + len - data));
        assert_true(t->offset >= prev_off);
        prev_off = t->offset;
        if (t->size) {
            assert_true(t->offset >= busy_end);
            busy_end = t->offset + t->size;
        }
        for (uint64_t k = 0; k < t->size; k++) sum += t->data[k]; /* ASan checks these */
        assert_ptr_equal(nz_st_find(f, t->name), t);
    }
    assert_null(nz_st_get(f, n));
    const json_t *md = nz_st_metadata(f);
    if (md) {
        const char *key;
        json_t *val;
        assert_true(json_is_object(md));
        json_object_foreach((json_t *)md, key, val) assert_true(json_is_string(val));
    }
    (void)sum;
}

/* ------------------------------------------------------------------------ */
/* golden image written by tests/python/st_util.py:                          */
/*   build_safetensors({"w.bf16": ("BF16", [0x3f80, 0xc000, 0x7f80]),        */
/*                      "step": ("I64", np.array(-2)),                       */
/*                      "empty": ("U8", np.zeros((0, 3), np.uint8)),         */
/*                      "f": ("F32", [[1.5], [-0.25]])},                     */
/*                     metadata={"format": "pt", "by": "st_util"})           */
/* ------------------------------------------------------------------------ */

static const char k_golden_header[] = "{\"__metadata__\":{\"format\":\"pt\",\"by\":\"st_util\"},"
                                      "\"w.bf16\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,6]},"
                                      "\"step\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[6,14]},"
                                      "\"empty\":{\"dtype\":\"U8\",\"shape\":[0,3],\"data_offsets\":[14,14]},"
                                      "\"f\":{\"dtype\":\"F32\",\"shape\":[2,1],\"data_offsets\":[14,22]}} ";
static const uint8_t k_golden_data[22] = {0x80, 0x3f, 0x00, 0xc0, 0x80, 0x7f,              /* w.bf16 */
                                          0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,  /* step = -2 */
                                          0x00, 0x00, 0xc0, 0x3f, 0x00, 0x00, 0x80, 0xbe}; /* f */

static uint8_t *golden_image(size_t *len) {
    return make_image(k_golden_header, k_golden_data, sizeof k_golden_data, len);
}

/* ------------------------------------------------------------------------ */
/* tests: reader                                                            */
/* ------------------------------------------------------------------------ */

static void test_dtype_size(void **state) {
    static const struct {
        const char *s;
        size_t n;
    } cases[] = {{"BOOL", 1}, {"U8", 1},   {"I8", 1},  {"F8_E4M3", 1}, {"F8_E5M2", 1},
                 {"I16", 2},  {"U16", 2},  {"F16", 2}, {"BF16", 2},    {"I32", 4},
                 {"U32", 4},  {"F32", 4},  {"I64", 8}, {"U64", 8},     {"F64", 8},
                 {"F7", 0},   {"bf16", 0}, {"", 0},    {"F32 ", 0}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        assert_int_equal(nz_st_dtype_size(cases[i].s), cases[i].n);
    assert_int_equal(nz_st_dtype_size(NULL), 0);
}

static void test_parse_golden(void **state) {
    size_t mem0 = nz_mem_current(NZ_MEM_OTHER);
    size_t len;
    uint8_t *buf = golden_image(&len);
    assert_int_equal(len % 8, 6); /* 8 + 280 header + 22 data */
    nz_st_file *f = NULL;
    nz_error err = {0};
    assert_int_equal(nz_st_parse(buf, len, &f, &err), NZ_OK);
    check_consistent(f, buf, len);
    assert_int_equal(nz_st_count(f), 4);

    /* offset order, ties by name: w.bf16 [0,6], step [6,14], empty [14,14], f [14,22] */
    const char *order[] = {"w.bf16", "step", "empty", "f"};
    for (size_t i = 0; i < 4; i++) assert_string_equal(nz_st_get(f, i)->name, order[i]);

    const nz_st_tensor *w = nz_st_find(f, "w.bf16");
    assert_string_equal(w->st_dtype, "BF16");
    assert_int_equal(w->dt, NZ_DT_BF16);
    assert_int_equal(w->ndim, 1);
    assert_int_equal(w->shape[0], 3);
    assert_int_equal(w->size, 6);
    assert_ptr_equal(w->data, buf + 8 + 280);
    uint16_t bits[3];
    memcpy(bits, w->data, 6);
    assert_int_equal(bits[0], 0x3f80);
    assert_int_equal(bits[1], 0xc000);
    assert_int_equal(bits[2], 0x7f80);

    const nz_st_tensor *s = nz_st_find(f, "step");
    assert_string_equal(s->st_dtype, "I64");
    assert_int_equal(s->dt, NZ_DT_OTHER);
    assert_int_equal(s->ndim, 0);
    assert_int_equal(s->nelem, 1);
    assert_int_equal(s->elem_size, 8);
    int64_t v;
    memcpy(&v, s->data, 8);
    assert_int_equal(v, -2);

    const nz_st_tensor *e = nz_st_find(f, "empty");
    assert_int_equal(e->ndim, 2);
    assert_int_equal(e->shape[0], 0);
    assert_int_equal(e->shape[1], 3);
    assert_int_equal(e->nelem, 0);
    assert_int_equal(e->size, 0);
    assert_int_equal(e->offset, 14);

    const nz_st_tensor *ff = nz_st_find(f, "f");
    assert_int_equal(ff->dt, NZ_DT_F32);
    float fv[2];
    memcpy(fv, ff->data, 8);
    assert_true(fv[0] == 1.5f && fv[1] == -0.25f);

    assert_null(nz_st_find(f, "missing"));
    assert_null(nz_st_find(f, "__metadata__"));
    assert_null(nz_st_find(f, NULL));
    assert_null(nz_st_get(f, 4));

    const json_t *md = nz_st_metadata(f);
    assert_non_null(md);
    assert_int_equal(json_object_size(md), 2);
    assert_string_equal(json_string_value(json_object_get(md, "format")), "pt");
    assert_string_equal(json_string_value(json_object_get(md, "by")), "st_util");

    nz_st_free(f);
    free(buf);
    assert_int_equal(nz_mem_current(NZ_MEM_OTHER), mem0);
}

static void test_parse_by_hand(void **state) {
    /* Tensors listed out of offset order, a gap, empty tensors sharing an
     * offset (ordered by name), no metadata, unknown keys ignored. */
    const char *h = "{\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,16]},"
                    "\"y\":{\"dtype\":\"BOOL\",\"shape\":[4,0],\"data_offsets\":[1,1]},"
                    "\"a\":{\"dtype\":\"I8\",\"shape\":[],\"data_offsets\":[0,1],\"extra\":1},"
                    "\"x\":{\"dtype\":\"F16\",\"shape\":[0],\"data_offsets\":[1,1]},"
                    "\"c\":{\"dtype\":\"U64\",\"shape\":[1,1,1,1,1,1,1,1],\"data_offsets\":[16,24]}}";
    uint8_t data[24];
    for (int i = 0; i < 24; i++) data[i] = (uint8_t)i;
    size_t len;
    uint8_t *buf = make_image(h, data, sizeof data, &len);
    nz_st_file *f = NULL;
    assert_int_equal(nz_st_parse(buf, len, &f, NULL), NZ_OK);
    check_consistent(f, buf, len);
    const char *order[] = {"a", "x", "y", "b", "c"};
    assert_int_equal(nz_st_count(f), 5);
    for (size_t i = 0; i < 5; i++) assert_string_equal(nz_st_get(f, i)->name, order[i]);
    assert_null(nz_st_metadata(f));
    assert_int_equal(nz_st_find(f, "x")->dt, NZ_DT_F16);
    assert_int_equal(nz_st_find(f, "a")->data[0], 0);
    assert_int_equal(nz_st_find(f, "b")->data[0], 8);
    assert_int_equal(nz_st_find(f, "c")->ndim, 8);
    nz_st_free(f);
    free(buf);

    /* An empty header object and "__metadata__": null are fine too. */
    const char *empties[] = {"{}", "{\"__metadata__\":null}   ", "{\"__metadata__\":{}}"};
    for (size_t i = 0; i < 3; i++) {
        buf = make_image(empties[i], NULL, 0, &len);
        assert_int_equal(nz_st_parse(buf, len, &f, NULL), NZ_OK);
        assert_int_equal(nz_st_count(f), 0);
        assert_null(nz_st_get(f, 0));
        nz_st_free(f);
        free(buf);
    }
    nz_st_free(NULL);
    assert_int_equal(nz_st_count(NULL), 0);
    assert_null(nz_st_get(NULL, 0));
    assert_null(nz_st_find(NULL, "a"));
    assert_null(nz_st_metadata(NULL));
}

static void test_parse_errors_framing(void **state) {
    nz_st_file *f = NULL;
    nz_error err = {0};
    assert_int_equal(nz_st_parse(NULL, 0, &f, &err), NZ_E_TRUNCATED);
    assert_non_null(strstr(err.msg, "empty"));
    assert_int_equal(nz_st_parse((const uint8_t *)"", 0, &f, &err), NZ_E_TRUNCATED);
    assert_int_equal(nz_st_parse(NULL, 10, &f, &err), NZ_E_INVALID_ARG);
    assert_int_equal(nz_st_parse((const uint8_t *)"x", 1, NULL, &err), NZ_E_INVALID_ARG);

    uint8_t short_buf[7] = {2, 0, 0, 0, 0, 0, 0};
    expect_bad_image(short_buf, sizeof short_buf, NZ_E_TRUNCATED, SUBS("7 bytes"));

    /* header length larger than what follows */
    size_t len;
    uint8_t *buf = make_image("{}", NULL, 0, &len);
    buf[0] = 3;
    expect_bad_image(buf, len, NZ_E_TRUNCATED, SUBS("header length 3 exceeds file size 10"));
    memset(buf, 0xff, 8);
    expect_bad_image(buf, len, NZ_E_TRUNCATED, SUBS("header length 18446744073709551615"));
    free(buf);

    expect_bad("", 0, NZ_E_FORMAT, SUBS("not valid JSON"));
    expect_bad("{\"a\":", 0, NZ_E_FORMAT, SUBS("not valid JSON", "line 1"));
    expect_bad("{\"a\" 1}", 0, NZ_E_FORMAT, SUBS("not valid JSON", "':' expected"));
    expect_bad("{} {}", 0, NZ_E_FORMAT, SUBS("not valid JSON"));
    expect_bad("{\"a\\u0000b\":{}}", 0, NZ_E_FORMAT, SUBS("not valid JSON"));
    expect_bad("{\"\xff\":{}}", 0, NZ_E_FORMAT, SUBS("not valid JSON"));
    expect_bad("[1,2]", 0, NZ_E_FORMAT, SUBS("must be a JSON object", "array"));
    expect_bad("{\"a\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[0,1]},"
               "\"a\":{\"dtype\":\"U8\",\"shape\":[],\"data_offsets\":[1,2]}}",
               2, NZ_E_FORMAT, SUBS("duplicate"));
}

static void test_parse_errors_metadata(void **state) {
    expect_bad("{\"__metadata__\":{\"k\":1}}", 0, NZ_E_FORMAT,
               SUBS("__metadata__", "'k'", "must be a string"));
    expect_bad("{\"__metadata__\":{\"a\":\"x\",\"k\":{}}}", 0, NZ_E_FORMAT, SUBS("'k'"));
    expect_bad("{\"__metadata__\":[\"x\"]}", 0, NZ_E_FORMAT, SUBS("__metadata__", "an object"));
    expect_bad("{\"__metadata__\":\"x\"}", 0, NZ_E_FORMAT, SUBS("__metadata__"));
}

static void test_parse_errors_dtype_shape(void **state) {
    expect_bad("{\"t\":{\"dtype\":\"F7\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1, NZ_E_UNSUPPORTED,
               SUBS("'t'", "unknown dtype 'F7'"));
    expect_bad("{\"t\":{\"dtype\":\"float32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NZ_E_UNSUPPORTED,
               SUBS("'t'", "'float32'"));
    expect_bad("{\"t\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NZ_E_FORMAT,
               SUBS("'t'", "dtype", "a string"));
    expect_bad("{\"t\":{\"shape\":[1],\"data_offsets\":[0,4]}}", 4, NZ_E_FORMAT,
               SUBS("'t'", "missing \"dtype\""));
    expect_bad("{\"t\":[1]}", 0, NZ_E_FORMAT, SUBS("'t'", "must be an object"));

    /* negative, non-integer and too many dims */
    expect_bad("{\"neg\":{\"dtype\":\"F32\",\"shape\":[2,-3],\"data_offsets\":[0,0]}}", 0, NZ_E_FORMAT,
               SUBS("'neg'", "shape[1] is negative (-3)"));
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[1.5],\"data_offsets\":[0,4]}}", 4, NZ_E_FORMAT,
               SUBS("'t'", "shape[0] must be an integer", "real"));
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8, NZ_E_FORMAT,
               SUBS("'t'", "shape[0]"));
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 8, NZ_E_FORMAT,
               SUBS("'t'", "\"shape\" must be an array"));
    expect_bad("{\"t\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8, NZ_E_FORMAT,
               SUBS("'t'", "missing \"shape\""));
    expect_bad("{\"deep\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
               NZ_E_UNSUPPORTED, SUBS("'deep'", "9 dims"));

    /* element count overflow, with and without a 0 dim that cancels it */
    expect_bad("{\"big\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}}", 0,
               NZ_E_FORMAT, SUBS("'big'", "overflows"));
    expect_bad("{\"big\":{\"dtype\":\"F64\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}", 0,
               NZ_E_FORMAT, SUBS("'big'", "overflows"));
    size_t len;
    uint8_t *buf =
        make_image("{\"z\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,0],\"data_offsets\":[0,0]}}",
                   NULL, 0, &len);
    nz_st_file *f = NULL;
    assert_int_equal(nz_st_parse(buf, len, &f, NULL), NZ_OK);
    assert_int_equal(nz_st_get(f, 0)->nelem, 0);
    nz_st_free(f);
    free(buf);
}

static void test_parse_errors_offsets(void **state) {
    expect_bad("{\"x\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,10]}}", 24, NZ_E_FORMAT,
               SUBS("safetensors: tensor 'x': data_offsets [0, 10] do not match shape [2, 3] x F32 "
                    "(24 bytes)"));
    expect_bad("{\"s\":{\"dtype\":\"I64\",\"shape\":[],\"data_offsets\":[0,4]}}", 8, NZ_E_FORMAT,
               SUBS("'s'", "shape [] x I64 (8 bytes)"));
    /* beyond the data section */
    expect_bad("{\"far\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}", 7, NZ_E_TRUNCATED,
               SUBS("'far'", "[4, 8]", "beyond the data section (7 bytes)"));
    expect_bad("{\"far\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[9,9]}}", 8, NZ_E_TRUNCATED,
               SUBS("'far'"));
    /* malformed offsets */
    expect_bad("{\"o\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[8,4]}}", 8, NZ_E_FORMAT,
               SUBS("'o'", "end before begin"));
    expect_bad("{\"o\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[-4,0]}}", 8, NZ_E_FORMAT,
               SUBS("'o'", "data_offsets[0] is negative"));
    expect_bad("{\"o\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4,8]}}", 8, NZ_E_FORMAT,
               SUBS("'o'", "[begin, end]"));
    expect_bad("{\"o\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,\"4\"]}}", 8, NZ_E_FORMAT,
               SUBS("'o'", "data_offsets[1] must be an integer"));
    expect_bad("{\"o\":{\"dtype\":\"U8\",\"shape\":[4]}}", 8, NZ_E_FORMAT,
               SUBS("'o'", "missing \"data_offsets\""));
    expect_bad("{\"o\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,99999999999999999999]}}", 8,
               NZ_E_FORMAT, SUBS("not valid JSON"));
    /* overlaps, in either header order */
    expect_bad("{\"p\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]},"
               "\"q\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[2,6]}}",
               8, NZ_E_FORMAT, SUBS("'q' [2, 6] overlaps tensor 'p' [0, 4]"));
    expect_bad("{\"q\":{\"dtype\":\"U16\",\"shape\":[2],\"data_offsets\":[4,8]},"
               "\"p\":{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[4,8]}}",
               8, NZ_E_FORMAT, SUBS("overlaps", "'p'", "'q'"));
    /* ... also with an empty tensor between them */
    expect_bad("{\"a\":{\"dtype\":\"U8\",\"shape\":[8],\"data_offsets\":[0,8]},"
               "\"b\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[3,3]},"
               "\"c\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[7,8]}}",
               8, NZ_E_FORMAT, SUBS("'c' [7, 8] overlaps tensor 'a' [0, 8]"));
}

static void test_parse_long_name(void **state) {
    /* A name longer than the message buffer is shortened, the problem kept. */
    char h[1200], name[1001];
    memset(name, 'n', 1000);
    name[1000] = '\0';
    snprintf(h, sizeof h, "{\"%s\":{\"dtype\":\"F7\",\"shape\":[1],\"data_offsets\":[0,1]}}", name);
    expect_bad(h, 1, NZ_E_UNSUPPORTED, SUBS("nnn...'", "unknown dtype 'F7'"));
}

/* Every proper prefix of a valid image must fail cleanly. */
static void test_truncations(void **state) {
    size_t len;
    uint8_t *full = golden_image(&len);
    for (size_t n = 0; n < len; n++) {
        uint8_t *buf = malloc(n ? n : 1);
        memcpy(buf, full, n);
        nz_st_file *f = NULL;
        nz_error err = {0};
        int rc = nz_st_parse(n ? buf : NULL, n, &f, &err);
        if (rc == NZ_OK) fail_msg("prefix of %zu/%zu bytes parsed", n, len);
        assert_true(rc < 0);
        assert_int_equal(err.code, rc);
        assert_true(strlen(err.msg) > 0);
        assert_null(f);
        free(buf);
    }
    free(full);
}

/* Single-byte changes anywhere in the length or header: either an error or
 * a file that keeps every promise of the reader. */
static void test_header_corruptions(void **state) {
    size_t mem0 = nz_mem_current(NZ_MEM_OTHER);
    size_t len;
    uint8_t *orig = golden_image(&len);
    size_t hend = 8 + strlen(k_golden_header);
    uint8_t *buf = malloc(len);
    uint64_t seed = 0x5AFE7E25u;
    int values = tu_quick() ? 4 : 256;
    size_t ok = 0, bad = 0;
    for (size_t pos = 0; pos < hend; pos++) {
        for (int k = 0; k < values; k++) {
            uint8_t v = values == 256 ? (uint8_t)k : (uint8_t)tu_rand(&seed);
            memcpy(buf, orig, len);
            buf[pos] = v;
            nz_st_file *f = NULL;
            nz_error err = {0};
            int rc = nz_st_parse(buf, len, &f, &err);
            if (rc == NZ_OK) {
                check_consistent(f, buf, len);
                nz_st_free(f);
                ok++;
            } else {
                assert_true(rc < 0);
                assert_int_equal(err.code, rc);
                assert_null(f);
                bad++;
            }
        }
    }
    /* Random positions with random values, several bytes at once. */
    int rounds = tu_quick() ? 200 : 20000;
    for (int r = 0; r < rounds; r++) {
        memcpy(buf, orig, len);
        int nflip = 1 + (int)(tu_rand(&seed) % 4);
        for (int i = 0; i < nflip; i++) buf[tu_rand(&seed) % hend] = (uint8_t)tu_rand(&seed);
        nz_st_file *f = NULL;
        if (nz_st_parse(buf, len, &f, NULL) == NZ_OK) {
            check_consistent(f, buf, len);
            nz_st_free(f);
        }
    }
    assert_true(ok > 0 && bad > 0);
    free(buf);
    free(orig);
    assert_int_equal(nz_mem_current(NZ_MEM_OTHER), mem0);
}

/* ------------------------------------------------------------------------ */
/* tests: nz_st_open                                                        */
/* ------------------------------------------------------------------------ */

static void test_open_errors(void **state) {
    char p[512];
    nz_st_file *f = (nz_st_file *)(uintptr_t)1;
    nz_error err = {0};

    assert_int_equal(nz_st_open(tpath(p, sizeof p, "nope.safetensors"), &f, &err), NZ_E_IO);
    assert_null(f);
    assert_non_null(strstr(err.msg, p));
    assert_non_null(strstr(err.msg, strerror(ENOENT)));

    write_all(tpath(p, sizeof p, "empty.safetensors"), "", 0);
    assert_int_equal(nz_st_open(p, &f, &err), NZ_E_TRUNCATED);
    assert_non_null(strstr(err.msg, "empty file"));
    assert_non_null(strstr(err.msg, p));

    write_all(tpath(p, sizeof p, "short.safetensors"), "\x02\0\0\0\0", 5);
    assert_int_equal(nz_st_open(p, &f, &err), NZ_E_TRUNCATED);
    assert_non_null(strstr(err.msg, p));
    assert_non_null(strstr(err.msg, "truncated"));

    assert_int_equal(nz_st_open(g_dir, &f, &err), NZ_E_IO);
    assert_non_null(strstr(err.msg, "not a regular file"));

    /* parse errors name the path and the tensor */
    size_t len;
    uint8_t *buf =
        make_image("{\"x\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[0,10]}}", NULL, 0, &len);
    write_all(tpath(p, sizeof p, "bad.safetensors"), buf, len);
    free(buf);
    assert_int_equal(nz_st_open(p, &f, &err), NZ_E_FORMAT);
    assert_non_null(strstr(err.msg, p));
    assert_non_null(strstr(err.msg, "tensor 'x'"));

    assert_int_equal(nz_st_open(NULL, &f, &err), NZ_E_INVALID_ARG);
    assert_int_equal(nz_st_open(p, NULL, &err), NZ_E_INVALID_ARG);
}

static void test_open_golden(void **state) {
    char p[512];
    size_t len;
    uint8_t *buf = golden_image(&len);
    write_all(tpath(p, sizeof p, "golden.safetensors"), buf, len);
    nz_st_file *f = NULL;
    nz_error err = {0};
    assert_int_equal(nz_st_open(p, &f, &err), NZ_OK);
    assert_int_equal(nz_st_count(f), 4);
    const nz_st_tensor *t = nz_st_find(f, "f");
    assert_memory_equal(t->data, k_golden_data + 14, 8);
    nz_st_free(f);
    free(buf);
}

/* ------------------------------------------------------------------------ */
/* tests: writer                                                            */
/* ------------------------------------------------------------------------ */

static void test_writer_matches_golden(void **state) {
    char p[512];
    tpath(p, sizeof p, "golden_c.safetensors");
    nz_st_out t[4] = {{"w.bf16", "BF16", 1, {3}},
                      {"step", "I64", 0, {0}},
                      {"empty", "U8", 2, {0, 3}},
                      {"f", "F32", 2, {2, 1}}};
    json_t *md = json_pack("{s:s, s:s}", "format", "pt", "by", "st_util");
    nz_st_writer *w = NULL;
    nz_error err = {0};
    assert_int_equal(nz_st_writer_open(p, t, 4, md, &w, &err), NZ_OK);
    json_decref(md);
    assert_int_equal(nz_st_writer_put(w, k_golden_data, 6, &err), NZ_OK);
    assert_int_equal(nz_st_writer_put(w, k_golden_data + 6, 8, &err), NZ_OK);
    assert_int_equal(nz_st_writer_put(w, k_golden_data + 14, 8, &err), NZ_OK);
    assert_int_equal(nz_st_writer_close(w, &err), NZ_OK);
    assert_false(tmp_exists(p));

    size_t glen, len;
    uint8_t *golden = golden_image(&glen);
    uint8_t *got = read_all(p, &len);
    assert_int_equal(len, glen);
    assert_memory_equal(got, golden, len);
    free(got);
    free(golden);
}

/* Fill n bytes with a pattern that depends on the tensor index. */
static void fill(uint8_t *p, size_t n, int tag) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)(tag * 37 + i * 11);
}

static void test_writer_roundtrip(void **state) {
    size_t mem0 = nz_mem_current(NZ_MEM_OTHER);
    char p[512];
    tpath(p, sizeof p, "rt.safetensors");
    const nz_st_out t[] = {
        {"model.layers.0.w", "BF16", 2, {17, 33}},
        {"scale", "F32", 0, {0}},
        {"ids", "I64", 1, {5}},
        {"nothing", "F16", 3, {4, 0, 2}},
        {"half", "F16", 2, {3, 3}},
        {"mask", "BOOL", 1, {7}},
        {"fp8", "F8_E4M3", 2, {3, 5}},
        {"d", "F64", 1, {2}},
        {"u", "U32", 1, {3}},
        {"\xc3\xa9t\xc3\xa9", "I16", 1, {2}}, /* UTF-8 name */
    };
    const size_t n = sizeof t / sizeof t[0];
    json_t *md = json_pack("{s:s, s:s}", "format", "pt", "note", "a \"quoted\" value");
    nz_st_writer *w = NULL;
    nz_error err = {0};
    assert_int_equal(nz_st_writer_open(p, t, n, md, &w, &err), NZ_OK);
    assert_true(tmp_exists(p));
    assert_false(file_exists(p));

    uint8_t buf[4096];
    uint64_t seed = 42;
    for (size_t i = 0; i < n; i++) {
        size_t size = nz_st_dtype_size(t[i].st_dtype);
        for (int d = 0; d < t[i].ndim; d++) size *= (size_t)t[i].shape[d];
        fill(buf, size, (int)i);
        /* random chunking, including empty puts */
        size_t done = 0;
        while (done < size) {
            size_t k = (size_t)(tu_rand(&seed) % (size - done + 1));
            assert_int_equal(nz_st_writer_put(w, buf + done, k, &err), NZ_OK);
            done += k;
        }
    }
    assert_int_equal(nz_st_writer_close(w, &err), NZ_OK);
    assert_true(file_exists(p));
    assert_false(tmp_exists(p));

    size_t len;
    uint8_t *img = read_all(p, &len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = hlen << 8 | img[i];
    assert_int_equal((8 + hlen) % 8, 0);
    assert_memory_equal(img + 8, "{\"__metadata__\":{\"format\":\"pt\",", 31);
    assert_int_equal(img[8 + hlen - 1] == ' ' || img[8 + hlen - 1] == '}', 1);

    nz_st_file *f = NULL;
    assert_int_equal(nz_st_parse(img, len, &f, &err), NZ_OK);
    check_consistent(f, img, len);
    nz_st_free(f);
    assert_int_equal(nz_st_open(p, &f, &err), NZ_OK);
    assert_int_equal(nz_st_count(f), n);
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        /* consecutive layout in the given order; "nothing" (empty) and
         * "half" share an offset and "half" < "nothing" */
        const nz_st_tensor *r = nz_st_find(f, t[i].name);
        assert_non_null(r);
        assert_string_equal(r->st_dtype, t[i].st_dtype);
        assert_int_equal(r->ndim, t[i].ndim);
        for (int d = 0; d < r->ndim; d++) assert_int_equal(r->shape[d], t[i].shape[d]);
        assert_int_equal(r->offset, off);
        fill(buf, r->size, (int)i);
        if (r->size) assert_memory_equal(r->data, buf, r->size);
        off += r->size;
    }
    assert_int_equal(nz_st_find(f, "model.layers.0.w")->dt, NZ_DT_BF16);
    assert_int_equal(nz_st_find(f, "scale")->nelem, 1);
    assert_int_equal(nz_st_find(f, "ids")->dt, NZ_DT_OTHER);
    assert_int_equal(nz_st_find(f, "nothing")->size, 0);
    assert_string_equal(nz_st_get(f, 3)->name, "half");
    assert_string_equal(nz_st_get(f, 4)->name, "nothing");
    assert_true(json_equal((json_t *)nz_st_metadata(f), md));
    json_decref(md);
    nz_st_free(f);
    free(img);
    assert_int_equal(nz_mem_current(NZ_MEM_OTHER), mem0);
}

static void test_writer_empty_file(void **state) {
    char p[512];
    tpath(p, sizeof p, "none.safetensors");
    nz_st_writer *w = NULL;
    assert_int_equal(nz_st_writer_open(p, NULL, 0, NULL, &w, NULL), NZ_OK);
    assert_int_equal(nz_st_writer_put(w, NULL, 0, NULL), NZ_OK);
    assert_int_equal(nz_st_writer_close(w, NULL), NZ_OK);
    size_t len;
    uint8_t *img = read_all(p, &len);
    assert_int_equal(len, 16);
    assert_memory_equal(img, "\x08\0\0\0\0\0\0\0{}      ", 16);
    free(img);
    nz_st_file *f = NULL;
    assert_int_equal(nz_st_open(p, &f, NULL), NZ_OK);
    assert_int_equal(nz_st_count(f), 0);
    nz_st_free(f);
}

static void expect_open_fail(const nz_st_out *t, size_t n, const json_t *md, int code, const char *sub) {
    char p[512];
    tpath(p, sizeof p, "fail.safetensors");
    nz_st_writer *w = (nz_st_writer *)(uintptr_t)1;
    nz_error err = {0};
    int rc = nz_st_writer_open(p, t, n, md, &w, &err);
    if (rc != code) fail_msg("expected %d, got %d: %s", code, rc, err.msg);
    assert_null(w);
    if (!strstr(err.msg, sub)) fail_msg("message '%s' lacks '%s'", err.msg, sub);
    assert_false(file_exists(p));
    assert_false(tmp_exists(p));
}

static void test_writer_open_errors(void **state) {
    size_t mem0 = nz_mem_current(NZ_MEM_OTHER);
    nz_st_out t[3] = {{"a", "F32", 1, {2}}, {"b", "F8", 1, {2}}, {"a", "F32", 1, {2}}};
    expect_open_fail(t, 2, NULL, NZ_E_UNSUPPORTED, "tensor 'b': unknown dtype 'F8'");
    t[1].st_dtype = NULL;
    expect_open_fail(t, 2, NULL, NZ_E_UNSUPPORTED, "'b'");
    t[1].st_dtype = "U8";
    expect_open_fail(t, 3, NULL, NZ_E_INVALID_ARG, "duplicate tensor name 'a'");
    t[2].name = "__metadata__";
    expect_open_fail(t, 3, NULL, NZ_E_INVALID_ARG, "reserved");
    t[2].name = NULL;
    expect_open_fail(t, 3, NULL, NZ_E_INVALID_ARG, "tensor 2 has no name");
    t[2].name = "\xff\xfe";
    expect_open_fail(t, 3, NULL, NZ_E_INVALID_ARG, "not valid UTF-8");
    t[2].name = "c";
    t[2].shape[0] = -1;
    expect_open_fail(t, 3, NULL, NZ_E_INVALID_ARG, "tensor 'c': shape[0] is negative");
    t[2].shape[0] = 2;
    t[2].ndim = NZ_MAX_DIMS + 1;
    expect_open_fail(t, 3, NULL, NZ_E_INVALID_ARG, "tensor 'c': ndim 9");
    t[2].ndim = 2;
    t[2].shape[0] = t[2].shape[1] = INT64_MAX;
    expect_open_fail(t, 3, NULL, NZ_E_RANGE, "tensor 'c': size overflows");
    t[2].ndim = 1;
    t[2].shape[0] = 2;

    json_t *md = json_pack("{s:s, s:i}", "ok", "x", "n", 3);
    expect_open_fail(t, 3, md, NZ_E_INVALID_ARG, "value for key 'n' must be a string");
    json_decref(md);
    md = json_pack("[s]", "x");
    expect_open_fail(t, 3, md, NZ_E_INVALID_ARG, "must be an object");
    json_decref(md);

    nz_st_writer *w = NULL;
    nz_error err = {0};
    assert_int_equal(nz_st_writer_open(NULL, t, 3, NULL, &w, &err), NZ_E_INVALID_ARG);
    assert_int_equal(nz_st_writer_open("x", NULL, 3, NULL, &w, &err), NZ_E_INVALID_ARG);
    assert_int_equal(nz_st_writer_open("x", t, 3, NULL, NULL, &err), NZ_E_INVALID_ARG);

    char p[512];
    tpath(p, sizeof p, "no/such/dir/x.safetensors");
    assert_int_equal(nz_st_writer_open(p, t, 3, NULL, &w, &err), NZ_E_IO);
    assert_null(w);
    assert_non_null(strstr(err.msg, p));
    assert_non_null(strstr(err.msg, strerror(ENOENT)));
    assert_int_equal(nz_mem_current(NZ_MEM_OTHER), mem0);
}

static void test_writer_put_errors(void **state) {
    size_t mem0 = nz_mem_current(NZ_MEM_OTHER);
    char p[512];
    tpath(p, sizeof p, "put.safetensors");
    const nz_st_out t[] = {{"a", "F32", 1, {2}}, {"e", "U8", 1, {0}}, {"b", "U16", 1, {3}}};
    uint8_t data[16] = {0};
    nz_st_writer *w = NULL;
    nz_error err = {0};

    assert_int_equal(nz_st_writer_open(p, t, 3, NULL, &w, &err), NZ_OK);
    assert_int_equal(nz_st_writer_put(w, data, 5, &err), NZ_OK);
    /* 3 bytes left in 'a': a put may not spill into the next tensor */
    assert_int_equal(nz_st_writer_put(w, data, 4, &err), NZ_E_RANGE);
    assert_non_null(strstr(err.msg, "tensor 'a': 4 bytes given but only 3 of 8 remain"));
    assert_int_equal(nz_st_writer_put(w, data, 3, &err), NZ_OK);
    /* 'e' is empty and skipped; 'b' wants 6 */
    assert_int_equal(nz_st_writer_put(w, data, 7, &err), NZ_E_RANGE);
    assert_non_null(strstr(err.msg, "tensor 'b'"));
    assert_int_equal(nz_st_writer_put(w, NULL, 2, &err), NZ_E_INVALID_ARG);
    assert_int_equal(nz_st_writer_put(w, data, 2, &err), NZ_OK);
    /* close with 'b' incomplete: error, nothing at path, temp gone */
    assert_int_equal(nz_st_writer_close(w, &err), NZ_E_TRUNCATED);
    assert_non_null(strstr(err.msg, "tensor 'b': received 2 of 6 bytes"));
    assert_false(file_exists(p));
    assert_false(tmp_exists(p));

    /* bytes after the last tensor */
    assert_int_equal(nz_st_writer_open(p, t, 3, NULL, &w, &err), NZ_OK);
    assert_int_equal(nz_st_writer_put(w, data, 8, &err), NZ_OK);
    assert_int_equal(nz_st_writer_put(w, data, 6, &err), NZ_OK);
    assert_int_equal(nz_st_writer_put(w, data, 1, &err), NZ_E_RANGE);
    assert_non_null(strstr(err.msg, "after all 3 tensors are complete"));
    assert_int_equal(nz_st_writer_close(w, &err), NZ_OK);
    assert_true(file_exists(p));

    assert_int_equal(nz_st_writer_put(NULL, data, 1, &err), NZ_E_INVALID_ARG);
    assert_int_equal(nz_st_writer_close(NULL, &err), NZ_E_INVALID_ARG);
    assert_int_equal(nz_mem_current(NZ_MEM_OTHER), mem0);
}

/* A failed or aborted rewrite leaves the previous file untouched. */
static void test_writer_abort_keeps_old_file(void **state) {
    size_t mem0 = nz_mem_current(NZ_MEM_OTHER);
    char p[512];
    tpath(p, sizeof p, "keep.safetensors");
    write_all(p, "old contents", 12);
    const nz_st_out t[] = {{"a", "U8", 1, {4}}};
    nz_st_writer *w = NULL;

    assert_int_equal(nz_st_writer_open(p, t, 1, NULL, &w, NULL), NZ_OK);
    assert_int_equal(nz_st_writer_put(w, "ab", 2, NULL), NZ_OK);
    assert_true(tmp_exists(p));
    nz_st_writer_abort(w);
    assert_false(tmp_exists(p));

    assert_int_equal(nz_st_writer_open(p, t, 1, NULL, &w, NULL), NZ_OK);
    assert_int_equal(nz_st_writer_put(w, "abc", 3, NULL), NZ_OK);
    assert_int_equal(nz_st_writer_close(w, NULL), NZ_E_TRUNCATED);
    assert_false(tmp_exists(p));

    size_t len;
    uint8_t *img = read_all(p, &len);
    assert_int_equal(len, 12);
    assert_memory_equal(img, "old contents", 12);
    free(img);

    /* and a successful one replaces it */
    assert_int_equal(nz_st_writer_open(p, t, 1, NULL, &w, NULL), NZ_OK);
    assert_int_equal(nz_st_writer_put(w, "abcd", 4, NULL), NZ_OK);
    assert_int_equal(nz_st_writer_close(w, NULL), NZ_OK);
    nz_st_file *f = NULL;
    assert_int_equal(nz_st_open(p, &f, NULL), NZ_OK);
    assert_memory_equal(nz_st_find(f, "a")->data, "abcd", 4);
    nz_st_free(f);

    nz_st_writer_abort(NULL);
    assert_int_equal(nz_mem_current(NZ_MEM_OTHER), mem0);
}

/* ------------------------------------------------------------------------ */

static int setup(void **state) {
    nz_alloc_hook_json(); /* before the tests build any json_t themselves */
    const char *base = getenv("TMPDIR");
    snprintf(g_dir, sizeof g_dir, "%s/nz_st_test.XXXXXX", base && *base ? base : "/tmp");
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state) {
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    return system(cmd) == 0 ? 0 : -1;
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dtype_size),
        cmocka_unit_test(test_parse_golden),
        cmocka_unit_test(test_parse_by_hand),
        cmocka_unit_test(test_parse_errors_framing),
        cmocka_unit_test(test_parse_errors_metadata),
        cmocka_unit_test(test_parse_errors_dtype_shape),
        cmocka_unit_test(test_parse_errors_offsets),
        cmocka_unit_test(test_parse_long_name),
        cmocka_unit_test(test_truncations),
        cmocka_unit_test(test_header_corruptions),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_open_golden),
        cmocka_unit_test(test_writer_matches_golden),
        cmocka_unit_test(test_writer_roundtrip),
        cmocka_unit_test(test_writer_empty_file),
        cmocka_unit_test(test_writer_open_errors),
        cmocka_unit_test(test_writer_put_errors),
        cmocka_unit_test(test_writer_abort_keeps_old_file),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
