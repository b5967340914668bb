/*
 * make_seeds.c — writes the seed corpora of the libFuzzer targets:
 *   <dir>/fuzz_container/c*   small valid .nzp images written with the
 *                             nz_writer API (several dtypes, modes, coders,
 *                             raw/empty/0-D tensors, blobs, config, metadata)
 *   <dir>/fuzz_tile/t*        fuzz_tile inputs: parameter bytes and frequency
 *                             pairs (see fuzz_tile_parse in fuzz_common.h)
 *                             followed by a valid tile encoded with them
 * Output is deterministic; every seed is checked to load/decode cleanly and is
 * run through fuzz_container_one / fuzz_tile_one before it is written.
 *
 * Not built by the Makefile. To regenerate, from the repository root:
 *   make build/libnzengine.a
 *   cc -O1 -g -std=c11 -D_GNU_SOURCE -Wall -Wextra -Iengine \
 *      tests/fuzz/make_seeds.c build/libnzengine.a -o build/make_seeds \
 *      -ljansson -lzstd -lxxhash -lm -lpthread
 *   build/make_seeds tests/fuzz/corpus
 * (existing files of the same names are overwritten; others are left alone).
 */
#include "fuzz_common.h"
#include "nz_safetensors.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *g_out; /* corpus directory */
static char g_tmp[64];    /* scratch directory for the writer */
static size_t g_total;    /* bytes written */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "make_seeds: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static void check(int rc, const nz_error *err, const char *what) {
    if (rc) die("%s: %s (%s)", what, err->msg, nz_status_name(rc));
}

/* ------------------------------------------------------------ data */

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;

static uint64_t rnd(void) {
    uint64_t x = g_rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    g_rng = x;
    return x * 0x2545F4914F6CDD1Dull;
}

static double gauss(void) {
    double u1 = ((rnd() >> 11) + 1.0) / 9007199254740993.0;
    double u2 = (rnd() >> 11) / 9007199254740992.0;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

enum { GAUSS, SPECIAL, SPECIAL_NO_NAN, CONST_EXP };

/* n elements of dtype dt (kind decides the values) into a malloc'd buffer. */
static uint8_t *gen(nz_dtype dt, uint64_t n, int kind, double scale) {
    size_t esz = nz_dtype_size(dt);
    uint8_t *b = fz_malloc(n * esz);
    if (!b) die("out of memory");
    for (uint64_t i = 0; i < n; i++) {
        float v = (float)(gauss() * scale);
        if (kind == CONST_EXP) v = 1.0f + (float)(rnd() % 1000) / 4000.0f; /* [1, 1.25) */
        if ((kind == SPECIAL || kind == SPECIAL_NO_NAN) && rnd() % 4 == 0) {
            static const float sp[] = {0.0f,    -0.0f,   INFINITY, -INFINITY, 1e-40f, -3e-39f,
                                       6.0e-8f, 3.0e38f, 65504.0f, 1e-5f,     -2.0f,  NAN};
            int k = (int)(rnd() % (kind == SPECIAL ? 12 : 11));
            v = sp[k];
        }
        switch (dt) {
        case NZ_DT_BF16: {
            uint16_t h = nz_f32_to_bf16(v);
            memcpy(b + 2 * i, &h, 2);
            break;
        }
        case NZ_DT_F16: {
            uint16_t h = nz_f32_to_f16(v);
            memcpy(b + 2 * i, &h, 2);
            break;
        }
        default:
            memcpy(b + 4 * i, &v, 4);
            break;
        }
    }
    return b;
}

static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die("%s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc(n > 0 ? (size_t)n : 1);
    if (!b || fread(b, 1, (size_t)n, f) != (size_t)n) die("%s: read failed", path);
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void write_seed(const char *sub, const char *name, const uint8_t *data, size_t len) {
    if (len >= 64 * 1024) die("seed %s/%s is %zu bytes (limit 64 KiB)", sub, name, len);
    char path[512];
    snprintf(path, sizeof path, "%s/%s", g_out, sub);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/%s/%s", g_out, sub, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, len, f) != len || fclose(f)) die("%s: write failed", path);
    g_total += len;
    printf("%-60s %6zu bytes\n", path, len);
}

/* The encoder picks 64 rANS lanes only for tiles of NZ_RANS_WIDE_MIN symbols
 * and more (too big for a seed); the decoder takes 64 lanes for any tile.
 * Re-encode the exponent section of a rANS tile with `lanes` lanes.
 * @return a malloc'd tile, its size in *len. */
static uint8_t *relane(const nz_tensor_desc *d, uint64_t t, const uint8_t *tile, size_t *len, int lanes) {
    nz_error err;
    uint64_t n = nz_desc_tile_nrows(d, t) * d->cols;
    uint8_t *ex = fz_malloc(n);
    nz_dctx *dc = nz_dctx_create();
    check(nz_tile_decode_exponents(dc, d, t, tile, *len, ex, &err), &err, "relane: decode");
    nz_dctx_free(dc);
    size_t old = fz_rd32(tile), rest = *len - 8 - old, cap = nz_rans_bound(n), elen = 0;
    uint8_t *out = fz_malloc(8 + cap + rest);
    check(nz_rans_encode(ex, n, d->freq, lanes, out + 8, cap, &elen, &err), &err, "relane: encode");
    for (int i = 0; i < 4; i++) {
        out[i] = (uint8_t)(elen >> (8 * i));
        out[4 + i] = (uint8_t)((uint32_t)lanes >> (8 * i));
    }
    memcpy(out + 8 + elen, tile + 8 + old, rest);
    *len = 8 + elen + rest;
    free(ex);
    return out;
}

/* ------------------------------------------------------------ container seeds */

typedef struct {
    const char *name, *st_dtype;
    int ndim;
    int64_t shape[4];
    const char *mode; /* nz_mode_parse name */
    nz_coder coder;
    uint32_t norm_block, tile_rows;
    int kind;
    double scale;
    int lanes; /* rANS tiles: 0 = encoder's choice, else re-encoded with 32/64 */
} tspec;

static void add_tensor(nz_writer *w, const tspec *s) {
    nz_error err;
    size_t esz = nz_st_dtype_size(s->st_dtype);
    nz_dtype dt = !strcmp(s->st_dtype, "BF16")  ? NZ_DT_BF16
                  : !strcmp(s->st_dtype, "F16") ? NZ_DT_F16
                  : !strcmp(s->st_dtype, "F32") ? NZ_DT_F32
                                                : NZ_DT_OTHER;
    uint64_t rows = 1, cols = 1;
    for (int i = 0; i < s->ndim; i++) {
        if (i == 0 && s->ndim >= 2)
            rows = (uint64_t)s->shape[0];
        else
            cols *= (uint64_t)s->shape[i];
    }
    nz_mode mode;
    check(nz_mode_parse(s->mode, &mode, &err), &err, s->name);
    mode.norm_block = s->norm_block;
    nz_tensor_desc d;
    check(nz_desc_init(&d, dt, esz, &mode, s->coder, rows, cols, s->tile_rows, &err), &err, s->name);
    uint64_t n = rows * cols;
    uint8_t *src;
    if (dt == NZ_DT_OTHER) {
        src = fz_malloc(n * esz);
        for (uint64_t i = 0; i < n * esz; i++) src[i] = (uint8_t)(rnd() % 7);
    } else {
        src = gen(dt, n, s->kind, s->scale);
    }
    uint64_t counts[256];
    check(nz_tensor_analyze(&d, src, counts, &err), &err, s->name);
    check(nz_writer_begin_tensor(w, s->name, s->st_dtype, s->ndim, s->shape, &d, counts, &err), &err,
          s->name);
    for (uint64_t t = 0; t < nz_desc_ntiles(&d); t++) {
        size_t cap = nz_tile_bound(&d, t), len = 0;
        uint8_t *tile = fz_malloc(cap);
        const uint8_t *p = src + t * d.tile_rows * cols * esz;
        check(nz_tile_encode(&d, t, p, tile, cap, &len, &err), &err, s->name);
        if (s->lanes && d.coder == NZ_CODER_RANS) {
            uint8_t *r = relane(&d, t, tile, &len, s->lanes);
            free(tile);
            tile = r;
        }
        check(nz_writer_add_tile(w, tile, len, &err), &err, s->name);
        free(tile);
    }
    free(src);
}

typedef struct {
    const char *name;
    const char *data;
} bspec;

static void container_seed(const char *seed, const char *config, const char *metadata, const bspec *blobs,
                           size_t nblobs, const tspec *ts, size_t nt) {
    nz_error err;
    char path[256];
    snprintf(path, sizeof path, "%s/%s.nzp", g_tmp, seed);
    nz_writer *w;
    check(nz_writer_create(path, &w, &err), &err, "nz_writer_create");
    if (config) {
        json_error_t je;
        json_t *j = json_loads(config, 0, &je);
        if (!j) die("config: %s", je.text);
        check(nz_writer_set_config(w, j, &err), &err, "config");
        json_decref(j);
    }
    if (metadata) {
        json_error_t je;
        json_t *j = json_loads(metadata, 0, &je);
        if (!j) die("metadata: %s", je.text);
        check(nz_writer_set_metadata(w, j, &err), &err, "metadata");
        json_decref(j);
    }
    for (size_t i = 0; i < nblobs; i++)
        check(nz_writer_add_blob(w, blobs[i].name, blobs[i].data, strlen(blobs[i].data), &err), &err,
              blobs[i].name);
    for (size_t i = 0; i < nt; i++) add_tensor(w, &ts[i]);
    check(nz_writer_finish(w, &err), &err, "nz_writer_finish");

    size_t len;
    uint8_t *img = read_file(path, &len);
    unlink(path);
    /* strict check: loads, every tile and blob verifies and decodes */
    nz_model *m;
    check(nz_model_load_buffer(img, len, &m, &err), &err, seed);
    nz_dctx *dc = nz_dctx_create();
    for (size_t i = 0; i < nz_model_ntensors(m); i++) {
        const nz_tensor *x = nz_model_tensor(m, i);
        uint64_t n = x->ntiles ? nz_desc_tile_nrows(&x->desc, 0) * x->desc.cols : 0;
        void *out = malloc(n * 8 + 1);
        for (uint64_t t = 0; t < x->ntiles; t++)
            check(nz_model_decode_native(m, dc, i, t, out, &err), &err, seed);
        free(out);
    }
    for (size_t i = 0; i < nz_model_nblobs(m); i++) {
        const uint8_t *p;
        size_t n;
        check(nz_model_blob(m, nz_model_blob_name(m, i), &p, &n, &err), &err, seed);
    }
    nz_dctx_free(dc);
    nz_model_free(m);
    fuzz_container_one(img, len);
    write_seed("fuzz_container", seed, img, len);
    free(img);
}

static void container_seeds(void) {
    {
        const bspec b[] = {
            {"tokenizer.json",
             "{\"version\":\"1.0\",\"model\":{\"type\":\"BPE\",\"vocab\":{\"a\":0,\"b\":1}}}"}};
        const tspec t[] = {
            {"model.embed_tokens.weight",
             "BF16",
             2,
             {8, 64},
             "lossless",
             NZ_CODER_RANS,
             0,
             3,
             GAUSS,
             0.02,
             0},
            {"model.norm.weight", "BF16", 1, {64}, "raw", NZ_CODER_NONE, 0, 1, GAUSS, 1.0, 0},
        };
        container_seed("c01-bf16-lossless-rans",
                       "{\"model_type\":\"llama\",\"hidden_size\":64,\"num_hidden_layers\":1}",
                       "{\"format\":\"pt\"}", b, 1, t, 2);
    }
    {
        const tspec t[] = {
            {"a.f16.lossless", "F16", 2, {16, 32}, "lossless", NZ_CODER_RANS, 0, 5, GAUSS, 0.05, 0},
            {"b.f16.lossy3", "F16", 2, {4, 40}, "lossy-3", NZ_CODER_ZSTD, 16, 2, GAUSS, 0.1, 0},
            {"c.f16.special", "F16", 2, {3, 8}, "lossless", NZ_CODER_ZSTD, 0, 3, SPECIAL, 1.0, 0},
        };
        container_seed("c02-f16-mixed", NULL, NULL, NULL, 0, t, 3);
    }
    {
        const tspec t[] = {
            {"w.lossless.zstd", "F32", 2, {8, 24}, "lossless", NZ_CODER_ZSTD, 0, 8, GAUSS, 0.02, 0},
            {"w.bf16.rans", "F32", 2, {6, 16}, "bf16", NZ_CODER_RANS, 0, 4, GAUSS, 0.02, 0},
            {"w.lossy0.rans", "F32", 2, {5, 20}, "lossy-0", NZ_CODER_RANS, 0, 2, GAUSS, 1.0, 0},
            {"w.lossy7.norm", "F32", 2, {4, 33}, "lossy-7", NZ_CODER_RANS, 8, 3, GAUSS, 0.5, 0},
        };
        container_seed("c03-f32-mixed", "{\"torch_dtype\":\"float32\"}", NULL, NULL, 0, t, 4);
    }
    {
        const tspec t[] = {
            {"const.bf16", "BF16", 2, {4, 16}, "lossless", NZ_CODER_RANS, 0, 2, CONST_EXP, 1.0, 0},
            {"const.lossy5", "F32", 2, {3, 10}, "lossy-5", NZ_CODER_RANS, 0, 3, CONST_EXP, 1.0, 0},
            {"ids.i64", "I64", 2, {3, 5}, "raw", NZ_CODER_NONE, 0, 2, GAUSS, 1.0, 0},
            {"raw.f32", "F32", 2, {2, 3}, "raw", NZ_CODER_NONE, 0, 1, SPECIAL, 1.0, 0},
            {"scalar.bf16", "BF16", 0, {0}, "raw", NZ_CODER_NONE, 0, 1, GAUSS, 1.0, 0},
            {"empty.f16", "F16", 2, {0, 4}, "raw", NZ_CODER_NONE, 0, 1, GAUSS, 1.0, 0},
            {"mask.u8", "U8", 1, {10}, "raw", NZ_CODER_NONE, 0, 1, GAUSS, 1.0, 0},
            {"flags.bool", "BOOL", 2, {2, 2}, "raw", NZ_CODER_NONE, 0, 1, GAUSS, 1.0, 0},
        };
        container_seed("c04-const-raw", NULL, "{\"format\":\"pt\",\"note\":\"raw and const\"}", NULL, 0, t,
                       8);
    }
    {
        const bspec b[] = {{"tokenizer.json", "{\"a\":1}"},
                           {"empty.txt", ""},
                           {"special_tokens_map.json", "{\"bos_token\":\"<s>\",\"eos_token\":\"</s>\"}"}};
        container_seed("c05-blobs-only", "{}", NULL, b, 3, NULL, 0);
    }
    {
        const tspec t[] = {
            {"conv.bf16", "BF16", 3, {2, 3, 8}, "lossless", NZ_CODER_RANS, 0, 1, GAUSS, 0.1, 0},
            {"k.f32", "F32", 4, {2, 2, 2, 4}, "lossy-2", NZ_CODER_RANS, 4, 1, GAUSS, 0.3, 0},
            {"h.f16", "F16", 3, {1, 1, 16}, "bf16", NZ_CODER_ZSTD, 0, 1, GAUSS, 0.3, 0},
        };
        container_seed("c06-multidim", NULL, NULL, NULL, 0, t, 3);
    }
    {
        const tspec t[] = {
            {"s.bf16", "BF16", 2, {4, 32}, "lossless", NZ_CODER_RANS, 0, 2, SPECIAL, 1.0, 0},
            {"s.f16", "F16", 2, {2, 40}, "lossless", NZ_CODER_RANS, 0, 2, SPECIAL, 1.0, 0},
            {"s.f32.lossy1", "F32", 2, {3, 16}, "lossy-1", NZ_CODER_RANS, 5, 1, SPECIAL, 1.0, 0},
        };
        container_seed("c07-specials", NULL, NULL, NULL, 0, t, 3);
    }
    container_seed("c08-empty", NULL, NULL, NULL, 0, NULL, 0);
    {
        /* 64-lane rANS tiles (what the encoder writes for long tiles) */
        const tspec t[] = {
            {"wide.bf16", "BF16", 2, {8, 128}, "lossless", NZ_CODER_RANS, 0, 4, GAUSS, 0.02, 64},
            {"wide.f16.lossy4", "F16", 2, {4, 100}, "lossy-4", NZ_CODER_RANS, 32, 4, GAUSS, 0.1, 64},
            {"wide.f32", "F32", 2, {2, 96}, "lossless", NZ_CODER_RANS, 0, 1, GAUSS, 0.02, 64},
        };
        container_seed("c10-rans-64-lanes", NULL, NULL, NULL, 0, t, 3);
    }
    {
        /* one larger tile: exercises the AVX-512 groups and the fused path */
        const tspec t[] = {
            {"big.bf16", "BF16", 2, {16, 256}, "lossless", NZ_CODER_RANS, 0, 16, GAUSS, 0.02, 0},
            {"big.f32.bf16", "F32", 2, {4, 256}, "bf16", NZ_CODER_RANS, 0, 4, GAUSS, 0.02, 0},
        };
        container_seed("c09-larger-tiles", NULL, NULL, NULL, 0, t, 2);
    }
    {
        /* the escape code (nzp pack's default): every level, fused and plain paths */
        const tspec t[] = {
            {"esc.bf16", "BF16", 2, {16, 256}, "lossless", NZ_CODER_ESC, 0, 16, GAUSS, 0.3, 0},
            {"esc.f16.short", "F16", 2, {5, 33}, "lossless", NZ_CODER_ESC, 0, 2, SPECIAL, 1.0, 0},
            {"esc.f32.lossy2", "F32", 2, {4, 40}, "lossy-2", NZ_CODER_ESC, 8, 3, GAUSS, 0.05, 0},
        };
        container_seed("c11-esc", NULL, NULL, NULL, 0, t, 3);
    }
}

/* ------------------------------------------------------------ tile seeds */

typedef struct {
    const char *name;
    int dtype; /* 0 bf16, 1 f16, 2 f32 */
    int mode;  /* 0 lossless, 1 bf16, 2 + k lossy-k */
    int norm;  /* byte 2 */
    int coder; /* 0 rans, 1 zstd, 2 const, 3 esc */
    int rows, cols, tile_rows, t;
    int kernel; /* byte 9: 0 auto, 1 scalar, 2 avx2, 3 avx512 */
    int kind;
    double scale;
    int lanes; /* rANS: 0 = encoder's choice, else re-encoded with 32/64 lanes */
} tile_spec;

static void tile_seed(const tile_spec *s) {
    static const nz_dtype dts[3] = {NZ_DT_BF16, NZ_DT_F16, NZ_DT_F32};
    uint8_t hdr[FUZZ_TILE_HDR + 512];
    hdr[0] = (uint8_t)s->dtype;
    hdr[1] = (uint8_t)s->mode;
    hdr[2] = (uint8_t)s->norm;
    hdr[3] = (uint8_t)s->coder;
    hdr[4] = (uint8_t)(s->rows - 1);
    hdr[5] = (uint8_t)((s->cols - 1) & 0xff);
    hdr[6] = (uint8_t)((s->cols - 1) >> 8);
    hdr[7] = (uint8_t)(s->tile_rows - 1);
    hdr[8] = (uint8_t)s->t;
    hdr[9] = (uint8_t)s->kernel;
    hdr[10] = 0;
    fuzz_tile_params p;
    if (!fuzz_tile_parse(hdr, FUZZ_TILE_HDR, &p)) die("%s: parse", s->name);
    if (p.d.rows != (uint64_t)s->rows || p.d.cols != (uint64_t)s->cols || p.t != (uint64_t)s->t)
        die("%s: parameters out of range", s->name);
    /* histogram of the data under the mode: the pairs */
    uint64_t n = p.d.rows * p.d.cols, counts[256], maxc = 0;
    nz_dtype dt = dts[s->dtype];
    uint8_t *src = gen(dt, n, s->kind, s->scale);
    nz_tensor_desc a = p.d;
    nz_error err;
    check(nz_tensor_analyze(&a, src, counts, &err), &err, s->name);
    for (int i = 0; i < 256; i++)
        if (counts[i] > maxc) maxc = counts[i];
    size_t K = 0;
    for (int i = 0; i < 256; i++) {
        if (!counts[i]) continue;
        if (K == 255) die("%s: too many exponents", s->name);
        uint64_t wgt = counts[i] * 255 / maxc;
        hdr[FUZZ_TILE_HDR + 2 * K] = (uint8_t)i;
        hdr[FUZZ_TILE_HDR + 2 * K + 1] = (uint8_t)(wgt ? wgt - 1 : 0);
        K++;
    }
    if (s->coder == 2 && K != 1) die("%s: const seed has %zu exponents", s->name, K);
    hdr[10] = (uint8_t)K;
    size_t hlen = FUZZ_TILE_HDR + 2 * K;
    if (!fuzz_tile_parse(hdr, hlen, &p)) die("%s: parse", s->name);
    size_t cap = nz_tile_bound(&p.d, p.t), len = 0;
    uint8_t *seed = malloc(hlen + cap);
    memcpy(seed, hdr, hlen);
    const uint8_t *tsrc = src + p.t * p.d.tile_rows * p.d.cols * nz_dtype_size(dt);
    check(nz_tile_encode(&p.d, p.t, tsrc, seed + hlen, cap, &len, &err), &err, s->name);
    if (s->lanes && p.d.coder == NZ_CODER_RANS) {
        uint8_t *r = relane(&p.d, p.t, seed + hlen, &len, s->lanes);
        uint8_t *q = malloc(hlen + len);
        memcpy(q, seed, hlen);
        memcpy(q + hlen, r, len);
        free(r);
        free(seed);
        seed = q;
    }
    /* strict check: the tile decodes */
    uint64_t tn = nz_desc_tile_nrows(&p.d, p.t) * p.d.cols;
    float *f = malloc(tn * 4);
    nz_dctx *dc = nz_dctx_create();
    check(nz_tile_decode_f32(dc, &p.d, p.t, seed + hlen, len, f, &err), &err, s->name);
    nz_dctx_free(dc);
    free(f);
    fuzz_tile_one(seed, hlen + len);
    write_seed("fuzz_tile", s->name, seed, hlen + len);
    free(seed);
    free(src);
}

static void tile_seeds(void) {
    static const tile_spec specs[] = {
        /* name                          dt md nb cd rows cols tr  t kern kind scale lanes */
        {"t01-bf16-lossless-rans-avx512", 0, 0, 0, 0, 8, 64, 4, 1, 3, GAUSS, 0.02, 0},
        {"t02-bf16-lossless-rans-scalar", 0, 0, 0, 0, 3, 100, 3, 0, 1, GAUSS, 0.02, 0},
        {"t03-f16-lossless-rans-avx2", 1, 0, 0, 0, 4, 48, 4, 0, 2, GAUSS, 0.05, 0},
        {"t04-f16-lossless-zstd-special", 1, 0, 0, 1, 4, 24, 2, 1, 0, SPECIAL, 1.0, 0},
        {"t05-f32-lossless-rans-scalar", 2, 0, 0, 0, 4, 32, 4, 0, 1, GAUSS, 0.02, 0},
        {"t06-f32-lossless-zstd", 2, 0, 0, 1, 6, 20, 3, 1, 0, GAUSS, 0.3, 0},
        {"t07-f32-bf16-rans-fused-avx2", 2, 1, 0, 0, 8, 64, 8, 0, 2, GAUSS, 0.02, 0},
        {"t08-f16-bf16-zstd", 1, 1, 0, 1, 5, 30, 5, 0, 1, GAUSS, 0.1, 0},
        {"t09-f32-lossy0-rans-avx512", 2, 2, 0, 0, 4, 50, 4, 0, 3, SPECIAL_NO_NAN, 1.0, 0},
        {"t10-bf16-lossy3-norm16-rans", 0, 5, 16, 0, 6, 40, 3, 1, 1, GAUSS, 0.05, 0},
        {"t11-f16-lossy7-norm2p30-rans", 1, 9, 255, 0, 2, 64, 2, 0, 2, GAUSS, 0.05, 0},
        {"t12-f32-lossy4-norm7-zstd", 2, 6, 7, 1, 3, 45, 3, 0, 0, SPECIAL, 1.0, 0},
        {"t13-bf16-lossless-const", 0, 0, 0, 2, 4, 16, 4, 0, 0, CONST_EXP, 1.0, 0},
        {"t14-f32-lossy2-const", 2, 4, 0, 2, 3, 21, 2, 1, 1, CONST_EXP, 1.0, 0},
        {"t15-bf16-lossless-rans-special", 0, 0, 0, 0, 2, 512, 2, 0, 3, SPECIAL, 1.0, 0},
        {"t16-f16-lossless-rans-large", 1, 0, 0, 0, 16, 256, 16, 0, 2, GAUSS, 0.02, 0},
        {"t17-bf16-lossy1-rans-shorttile", 0, 3, 0, 0, 5, 7, 2, 2, 1, GAUSS, 1.0, 0},
        {"t18-f32-bf16-rans-fused-scalar", 2, 1, 0, 0, 3, 96, 3, 0, 1, SPECIAL, 1.0, 0},
        {"t19-bf16-lossless-rans64-fused", 0, 0, 0, 0, 8, 128, 8, 0, 3, GAUSS, 0.02, 64},
        {"t20-f16-lossless-rans64-scalar", 1, 0, 0, 0, 5, 77, 5, 0, 1, SPECIAL, 1.0, 64},
        {"t24-bf16-lossless-esc-fused-avx2", 0, 0, 0, 3, 8, 256, 8, 0, 2, GAUSS, 0.02, 0},
        {"t25-bf16-lossless-esc-scalar", 0, 0, 0, 3, 3, 100, 3, 0, 1, GAUSS, 0.02, 0},
        {"t26-f16-lossless-esc-special", 1, 0, 0, 3, 4, 96, 2, 1, 2, SPECIAL, 1.0, 0},
        {"t27-f32-lossy3-norm16-esc", 2, 5, 16, 3, 6, 40, 3, 1, 2, GAUSS, 0.05, 0},
        {"t28-f32-bf16-esc-fused-odd", 2, 1, 0, 3, 5, 33, 5, 0, 2, SPECIAL, 1.0, 0},
        {"t29-bf16-lossless-esc-wide", 0, 0, 0, 3, 16, 512, 16, 0, 2, GAUSS, 0.3, 0},
        {"t21-f32-lossy3-norm9-rans64", 2, 5, 9, 0, 4, 90, 2, 1, 2, GAUSS, 0.1, 64},
        {"t22-bf16-lossy6-rans64-short", 0, 8, 0, 0, 3, 40, 2, 1, 0, GAUSS, 1.0, 64},
        {"t23-bf16-lossless-rans64-avx2", 0, 0, 0, 0, 6, 200, 6, 0, 2, GAUSS, 0.02, 64},
    };
    for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++) tile_seed(&specs[i]);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s CORPUS_DIR   (e.g. tests/fuzz/corpus)\n", argv[0]);
        return 2;
    }
    g_out = argv[1];
    mkdir(g_out, 0755);
    nz_alloc_hook_json(); /* before any json_t is made: the writer frees through nz_free */
    snprintf(g_tmp, sizeof g_tmp, "/tmp/nz_seeds.XXXXXX");
    if (!mkdtemp(g_tmp)) die("mkdtemp: %s", strerror(errno));
    container_seeds();
    tile_seeds();
    rmdir(g_tmp);
    printf("total %zu bytes\n", g_total);
    return 0;
}
