/* test_randmodel.h — small random models written to temporary .nzp files, for the C tests that
 * need a whole model (tests/test_mem_estimate.c, tests/test_t5md_cb.c): a writer over nz_writer, bf16
 * matrices and f32 vectors from a seeded Gaussian, in-memory SentencePiece models, and multi-decoder T5
 * models of a given shape (t5_write), fairseq translators (nat_write). Header-only (static functions), for
 * cmocka test files. */
#ifndef TEST_RANDMODEL_H
#define TEST_RANDMODEL_H

#include "test_model.h"
#include "test_pb.h"

#include "nz_alloc.h"
#include "nz_translator.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------ model writing */

typedef struct mw {
    nz_writer *w;
    uint64_t seed;
    char path[64];
} mw;

static void mw_open(mw *m, uint64_t seed) {
    snprintf(m->path, sizeof m->path, "/tmp/nz_test_model_XXXXXX");
    int fd = mkstemp(m->path);
    assert_true(fd >= 0);
    close(fd);
    nz_error e = {0};
    assert_int_equal(nz_writer_create(m->path, &m->w, &e), NZ_OK);
    m->seed = seed;
}

static void mw_finish(mw *m, json_t *config) {
    nz_error e = {0};
    assert_int_equal(nz_writer_set_config(m->w, config, &e), NZ_OK);
    json_decref(config);
    if (nz_writer_finish(m->w, &e)) fail_msg("writing the model: %s", e.msg);
}

/* bf16 matrix [rows x cols] from data (NULL: scale x N(0, 1)), lossless, esc exponents */
static void w_mat(mw *m, const char *name, uint64_t rows, uint64_t cols, double scale, const float *data) {
    uint16_t *bf = xmalloc(rows * cols * sizeof *bf);
    for (uint64_t i = 0; i < rows * cols; i++)
        bf[i] = nz_f32_to_bf16(data ? data[i] : (float)(scale * tu_gauss(&m->seed)));
    tm_add_tensor(m->w, name, "BF16", NZ_DT_BF16, "lossless", NZ_CODER_ESC, rows, cols, 16, 2, bf);
    free(bf);
}

/* f32 vector [n] = base + noise x N(0, 1), raw */
static void w_vec(mw *m, const char *name, uint64_t n, float base, float noise) {
    float *v = xmalloc(n * sizeof *v);
    for (uint64_t i = 0; i < n; i++) v[i] = base + (float)(noise * tu_gauss(&m->seed));
    tm_add_tensor(m->w, name, "F32", NZ_DT_F32, "raw", NZ_CODER_NONE, 1, n, 8, 1, v);
    free(v);
}

/* ---------------------------------------------- in-memory SentencePiece models (as tests/test_tok.c) */

#define U2581 "\xe2\x96\x81"

/* A unigram ModelProto: pieces (type 1 normal, 2 unknown, 3 control), trainer_spec ids unk/bos/eos/pad. */
static void spm_model(pb *m, const char *const *piece, const int *type, int n, int unk, int bos, int eos,
                      int pad) {
    m->n = 0;
    for (int i = 0; i < n; i++) {
        pb sp = {.n = 0};
        pb_bytes(&sp, 1, piece[i], strlen(piece[i]));
        pb_float(&sp, 2, type[i] == 1 ? -1.0f - (float)i : 0.0f);
        pb_int(&sp, 3, type[i]);
        pb_bytes(m, 1, sp.b, sp.n);
    }
    pb ts = {.n = 0};
    pb_int(&ts, 3, 1); /* UNIGRAM */
    pb_int(&ts, 40, unk);
    pb_int(&ts, 41, bos);
    pb_int(&ts, 42, eos);
    pb_int(&ts, 43, pad);
    pb_bytes(m, 2, ts.b, ts.n);
    pb ns = {.n = 0};
    pb_bytes(&ns, 1, "identity", 8);
    pb_bytes(m, 3, ns.b, ns.n);
}

/* ------------------------------------------------------------ fairseq CMLM translators (+ AT decoder) */

/* The random translators' length predictor picks its largest class (the last encoder layer norm's output
 * is a positive constant, the class's embed_length row a positive vector): tests/test_mem_estimate.c. */
typedef struct nat_spec {
    const char *name;
    size_t D, H, F, enc, dec, at, V, C, maxpos;
    int pre_norm, learned, offset, emb_norm, gelu;
} nat_spec;

static const nat_spec NAT_A = {
    "A (post-norm, learned pos, length offset)", 64, 4, 128, 2, 2, 2, 600, 136, 128, 0, 1, 1, 0, 0};
static const nat_spec NAT_B = {"B (pre-norm, sinusoidal, no offset, gelu, layernorm_embedding)",
                               48,
                               4,
                               96,
                               1,
                               2,
                               1,
                               400,
                               48,
                               96,
                               1,
                               0,
                               0,
                               1,
                               1};

static void nat_layer(mw *m, const nat_spec *s, const char *stack, size_t i, int cross, int last_enc_post) {
    static const char *const proj[] = {"q_proj", "k_proj", "v_proj", "out_proj"};
    char n[160];
    const char *att[2] = {"self_attn", "encoder_attn"};
    for (int a = 0; a <= cross; a++) {
        for (int p = 0; p < 4; p++) {
            snprintf(n, sizeof n, "%slayers.%zu.%s.%s.weight", stack, i, att[a], proj[p]);
            w_mat(m, n, s->D, s->D, 0.15, NULL);
            snprintf(n, sizeof n, "%slayers.%zu.%s.%s.bias", stack, i, att[a], proj[p]);
            w_vec(m, n, s->D, 0, 0.02f);
        }
        snprintf(n, sizeof n, "%slayers.%zu.%s_layer_norm.weight", stack, i, att[a]);
        w_vec(m, n, s->D, 1, 0.05f);
        snprintf(n, sizeof n, "%slayers.%zu.%s_layer_norm.bias", stack, i, att[a]);
        w_vec(m, n, s->D, 0, 0.05f);
    }
    snprintf(n, sizeof n, "%slayers.%zu.fc1.weight", stack, i);
    w_mat(m, n, s->F, s->D, 0.15, NULL);
    snprintf(n, sizeof n, "%slayers.%zu.fc1.bias", stack, i);
    w_vec(m, n, s->F, 0, 0.02f);
    snprintf(n, sizeof n, "%slayers.%zu.fc2.weight", stack, i);
    w_mat(m, n, s->D, s->F, 0.15, NULL);
    snprintf(n, sizeof n, "%slayers.%zu.fc2.bias", stack, i);
    w_vec(m, n, s->D, 0, 0.02f);
    /* the encoder's output (post-norm: the last layer's final norm) is ~1 everywhere: see the header */
    snprintf(n, sizeof n, "%slayers.%zu.final_layer_norm.weight", stack, i);
    w_vec(m, n, s->D, last_enc_post ? 0.01f : 1, last_enc_post ? 0 : 0.05f);
    snprintf(n, sizeof n, "%slayers.%zu.final_layer_norm.bias", stack, i);
    w_vec(m, n, s->D, last_enc_post ? 1 : 0, last_enc_post ? 0 : 0.05f);
}

static void nat_stack_w(mw *m, const nat_spec *s, const char *stack, size_t nl, int cross, int emb_norm,
                        size_t maxpos, int enc) {
    char n[160];
    if (s->learned) {
        snprintf(n, sizeof n, "%sembed_positions.weight", stack);
        w_mat(m, n, maxpos + 2, s->D, 0.1, NULL);
    }
    if (emb_norm) {
        snprintf(n, sizeof n, "%slayernorm_embedding.weight", stack);
        w_vec(m, n, s->D, 1, 0.05f);
        snprintf(n, sizeof n, "%slayernorm_embedding.bias", stack);
        w_vec(m, n, s->D, 0, 0.05f);
    }
    for (size_t i = 0; i < nl; i++) nat_layer(m, s, stack, i, cross, enc && !s->pre_norm && i + 1 == nl);
    if (s->pre_norm) {
        snprintf(n, sizeof n, "%slayer_norm.weight", stack);
        w_vec(m, n, s->D, enc ? 0.01f : 1, enc ? 0 : 0.05f);
        snprintf(n, sizeof n, "%slayer_norm.bias", stack);
        w_vec(m, n, s->D, enc ? 1 : 0, enc ? 0 : 0.05f);
    }
}

/* Write a random translator of spec s (length predictor fixed on its last class); @return its path. */
static inline void nat_write(const nat_spec *s, uint64_t seed, char *path, size_t path_len) {
    mw m;
    mw_open(&m, seed);
    w_mat(&m, "encoder.embed_tokens.weight", s->V, s->D, 0.3, NULL);
    const size_t maxsrc = 80;
    nat_stack_w(&m, s, "encoder.", s->enc, 0, s->emb_norm, maxsrc, 1);
    nat_stack_w(&m, s, "decoder.", s->dec, 1, 0, s->maxpos, 0);
    if (s->at) nat_stack_w(&m, s, "at_decoder.", s->at, 1, s->emb_norm, s->maxpos, 0);
    float *len = xmalloc(s->C * s->D * sizeof *len);
    for (size_t i = 0; i < s->C * s->D; i++)
        len[i] = i / s->D == s->C - 1 ? 1.0f : (float)(0.05 * tu_gauss(&m.seed));
    w_mat(&m, "decoder.embed_length.weight", s->C, s->D, 0, len);
    free(len);
    /* tokenizer: a tiny SentencePiece model and a dict.txt of V - 4 symbols */
    static const char *const pieces[] = {"<unk>", U2581 "a", U2581, "a", "b"};
    static const int types[] = {2, 1, 1, 1, 1};
    pb sp;
    spm_model(&sp, pieces, types, 5, 0, -1, -1, -1);
    size_t dl = 0, dcap = 16 * s->V;
    char *dict = xmalloc(dcap);
    for (size_t i = 4; i < s->V; i++) dl += (size_t)snprintf(dict + dl, dcap - dl, "w%zu 1\n", i);
    nz_error e = {0};
    assert_int_equal(nz_writer_add_blob(m.w, "spm.model", sp.b, sp.n, &e), NZ_OK);
    assert_int_equal(nz_writer_add_blob(m.w, "dict.txt", dict, dl, &e), NZ_OK);
    free(dict);
    json_t *c = json_pack(
        "{s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:b, s:b, s:b, s:b, "
        "s:b, s:b, s:b, s:s, s:I, s:I}",
        "architecture", "cmlm_transformer", "encoder_embed_dim", (json_int_t)s->D, "encoder_ffn_embed_dim",
        (json_int_t)s->F, "encoder_layers", (json_int_t)s->enc, "encoder_attention_heads", (json_int_t)s->H,
        "decoder_embed_dim", (json_int_t)s->D, "decoder_ffn_embed_dim", (json_int_t)s->F, "decoder_layers",
        (json_int_t)s->dec, "decoder_attention_heads", (json_int_t)s->H, "at_decoder_layers",
        (json_int_t)s->at, "max_source_positions", (json_int_t)maxsrc, "max_target_positions",
        (json_int_t)s->maxpos, "encoder_normalize_before", s->pre_norm, "decoder_normalize_before",
        s->pre_norm, "encoder_learned_pos", s->learned, "decoder_learned_pos", s->learned,
        "layernorm_embedding", s->emb_norm, "pred_length_offset", s->offset, "share_all_embeddings", 1,
        "activation_fn", s->gelu ? "gelu" : "relu", "vocab_size", (json_int_t)s->V, "length_classes",
        (json_int_t)s->C);
    assert_non_null(c);
    mw_finish(&m, c);
    snprintf(path, path_len, "%s", m.path);
}

/* ------------------------------------------------------------ multi-decoder T5 models */

typedef struct t5_spec {
    const char *name;
    const char *variant;
    size_t K, d, dkv, H, F, enc, dec, V, r;
    int gated, tied;
} t5_spec;

static const t5_spec T5_A = {
    "A (adapter, K=3, relu, tied)", "adapter", 3, 64, 16, 4, 128, 2, 2, 2000, 32, 0, 1};
static const t5_spec T5_B = {"B (transformer, K=2, gated-gelu, lm_head, inner 64 > d 48)",
                             "transformer",
                             2,
                             48,
                             16,
                             4,
                             96,
                             1,
                             2,
                             1500,
                             0,
                             1,
                             0};

static void t5_block(mw *m, const t5_spec *s, const char *stack, size_t i, int dec) {
    static const char *const qkvo[] = {"q", "k", "v", "o"};
    const size_t I = s->H * s->dkv;
    char n[200];
    const char *att[2] = {"SelfAttention", "EncDecAttention"};
    for (int a = 0; a <= dec; a++) {
        for (int p = 0; p < 4; p++) {
            snprintf(n, sizeof n, "%sblock.%zu.layer.%d.%s.%s.weight", stack, i, a, att[a], qkvo[p]);
            w_mat(m, n, p < 3 ? I : s->d, p < 3 ? s->d : I, 0.1, NULL);
        }
        snprintf(n, sizeof n, "%sblock.%zu.layer.%d.layer_norm.weight", stack, i, a);
        w_vec(m, n, s->d, 1, 0.05f);
    }
    if (i == 0) {
        snprintf(n, sizeof n, "%sblock.0.layer.0.SelfAttention.relative_attention_bias.weight", stack);
        float *rel = xmalloc(32 * s->H * sizeof *rel);
        for (size_t j = 0; j < 32 * s->H; j++) rel[j] = (float)(0.1 * tu_gauss(&m->seed));
        tm_add_tensor(m->w, n, "F32", NZ_DT_F32, "raw", NZ_CODER_NONE, 32, s->H, 8, 2, rel);
        free(rel);
    }
    const int f = dec ? 2 : 1;
    if (s->gated) {
        snprintf(n, sizeof n, "%sblock.%zu.layer.%d.DenseReluDense.wi_0.weight", stack, i, f);
        w_mat(m, n, s->F, s->d, 0.1, NULL);
        snprintf(n, sizeof n, "%sblock.%zu.layer.%d.DenseReluDense.wi_1.weight", stack, i, f);
        w_mat(m, n, s->F, s->d, 0.1, NULL);
    } else {
        snprintf(n, sizeof n, "%sblock.%zu.layer.%d.DenseReluDense.wi.weight", stack, i, f);
        w_mat(m, n, s->F, s->d, 0.1, NULL);
    }
    snprintf(n, sizeof n, "%sblock.%zu.layer.%d.DenseReluDense.wo.weight", stack, i, f);
    w_mat(m, n, s->d, s->F, 0.1, NULL);
    snprintf(n, sizeof n, "%sblock.%zu.layer.%d.layer_norm.weight", stack, i, f);
    w_vec(m, n, s->d, 1, 0.05f);
    if (dec && !strcmp(s->variant, "adapter"))
        for (int sub = 0; sub < 3; sub++)
            for (size_t k = 0; k < s->K; k++) {
                snprintf(n, sizeof n, "%sblock.%zu.layer.%d.adapters.%zu.o2i.weight", stack, i, sub, k);
                w_mat(m, n, s->r, s->d, 0.1, NULL);
                snprintf(n, sizeof n, "%sblock.%zu.layer.%d.adapters.%zu.o2i.bias", stack, i, sub, k);
                w_vec(m, n, s->r, 0, 0.02f);
                snprintf(n, sizeof n, "%sblock.%zu.layer.%d.adapters.%zu.i2o.weight", stack, i, sub, k);
                w_mat(m, n, s->d, s->r, 0.1, NULL);
                snprintf(n, sizeof n, "%sblock.%zu.layer.%d.adapters.%zu.i2o.bias", stack, i, sub, k);
                w_vec(m, n, s->d, 0, 0.02f);
            }
}

static inline void t5_write(const t5_spec *s, uint64_t seed, char *path, size_t path_len) {
    mw m;
    mw_open(&m, seed);
    char n[128];
    w_mat(&m, "shared.weight", s->V, s->d, 0.5, NULL);
    for (size_t i = 0; i < s->enc; i++) t5_block(&m, s, "encoder.", i, 0);
    w_vec(&m, "encoder.final_layer_norm.weight", s->d, 1, 0.05f);
    if (!s->tied) w_mat(&m, "lm_head.weight", s->V, s->d, 0.1, NULL);
    const int tr = !strcmp(s->variant, "transformer");
    for (size_t k = 0; k < (tr ? s->K : 1); k++) {
        char p[32];
        snprintf(p, sizeof p, tr ? "decoders.%zu." : "decoder.", k);
        if (tr) {
            snprintf(n, sizeof n, "%sembed_tokens.weight", p);
            w_mat(&m, n, s->V, s->d, 0.5, NULL);
        }
        for (size_t i = 0; i < s->dec; i++) t5_block(&m, s, p, i, 1);
        snprintf(n, sizeof n, "%sfinal_layer_norm.weight", p);
        w_vec(&m, n, s->d, 1, 0.05f);
    }
    static const char *const pieces[] = {"<pad>", "</s>", "<unk>", U2581 "ab", U2581, "a", "b", "c"};
    static const int types[] = {3, 3, 2, 1, 1, 1, 1, 1};
    pb sp;
    spm_model(&sp, pieces, types, 8, 2, -1, 1, 0);
    nz_error e = {0};
    assert_int_equal(nz_writer_add_blob(m.w, "spm.model", sp.b, sp.n, &e), NZ_OK);
    json_t *c = json_pack(
        "{s:s, s:s, s:s, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:s, s:b}", "architecture",
        "t5_multidecoder", "model_type", "t5", "multidecoder", s->variant, "num_modes", (json_int_t)s->K,
        "adapter_hidden_size", (json_int_t)(s->r ? s->r : 1), "vocab_size", (json_int_t)s->V, "d_model",
        (json_int_t)s->d, "d_kv", (json_int_t)s->dkv, "d_ff", (json_int_t)s->F, "num_heads", (json_int_t)s->H,
        "num_layers", (json_int_t)s->enc, "num_decoder_layers", (json_int_t)s->dec,
        "relative_attention_num_buckets", (json_int_t)32, "relative_attention_max_distance", (json_int_t)128,
        "feed_forward_proj", s->gated ? "gated-gelu" : "relu", "tie_word_embeddings", s->tied);
    assert_non_null(c);
    mw_finish(&m, c);
    snprintf(path, path_len, "%s", m.path);
}

/* ------------------------------------------------------------ a translation batch's memory bound */

/* nz_tr_batch_bound against the allocator (tests/test_nat_cb.c, tests/test_nat_mpcb.c): the batch's bytes
 * at a step's start (activations + KV + other now, less what they were before it was created) plus the
 * allocator window's peak during the step stay <= the bound computed before the step; the bound with a
 * joiner covers the state the join leads to (b NULL: the batch created for it); without a joiner it never
 * grows across a step, a take or a removal. tb_report prints how tight it was. */
#define TB_WINDOW (NZ_MEM_MASK(NZ_MEM_ACTIVATIONS) | NZ_MEM_MASK(NZ_MEM_KV) | NZ_MEM_MASK(NZ_MEM_OTHER))
#define TB_STEPS  512
#define TB_FACTOR 2.0 /* the largest bound of a run <= TB_FACTOR x its largest peak + TB_SLACK */
#define TB_SLACK  (1024.0 * 1024)

typedef struct tb_meter {
    const nz_translator *tr;
    int64_t base;            /* the categories' bytes before the batch was created */
    uint64_t bound;          /* the bound now */
    size_t n;                /* steps measured */
    uint64_t pre[TB_STEPS];  /* the bound before step i */
    uint64_t peak[TB_STEPS]; /* the batch's peak during step i */
    int join[TB_STEPS];      /* a request joined before step i (after step i - 1) */
    int joined;              /* one did since the last step */
} tb_meter;

static inline int64_t tb_now(void) {
    return (int64_t)(nz_mem_current(NZ_MEM_ACTIVATIONS) + nz_mem_current(NZ_MEM_KV) +
                     nz_mem_current(NZ_MEM_OTHER));
}

/* Start measuring: nothing of the batch exists yet. */
static inline void tb_open(tb_meter *m, const nz_translator *tr) {
    memset(m, 0, sizeof *m);
    m->tr = tr;
    m->base = tb_now();
}

/* @return the bound of b (NULL: not created yet) with a request joining, before it is added. */
static inline uint64_t tb_join(const tb_meter *m, const nz_tr_batch *b, const size_t *lens, size_t n,
                               const nz_tr_opts *o) {
    return nz_tr_batch_bound(m->tr, b, lens, n, o);
}

/* After the request joined b (or failed to): the bound covers the state it led to. */
static inline void tb_joined(tb_meter *m, const nz_tr_batch *b, uint64_t join) {
    const uint64_t now = nz_tr_batch_bound(m->tr, b, NULL, 0, NULL);
    if (now > join)
        fail_msg("bound after a join %llu > its bound before it %llu", (unsigned long long)now,
                 (unsigned long long)join);
    m->bound = now;
    m->joined = 1;
}

/* After a take or a removal (b NULL: freed): the bound did not grow. */
static inline void tb_left(tb_meter *m, const nz_tr_batch *b, const char *what) {
    const uint64_t now = b ? nz_tr_batch_bound(m->tr, b, NULL, 0, NULL) : 0;
    if (now > m->bound)
        fail_msg("bound grew after a %s: %llu > %llu", what, (unsigned long long)now,
                 (unsigned long long)m->bound);
    m->bound = now;
    if (!b && tb_now() > m->base) /* (it may be lower: a pool's worker frees its start argument) */
        fail_msg("a freed batch left %lld bytes", (long long)(tb_now() - m->base));
}

/* One step of b measured. @return its rc. */
static inline int tb_step(tb_meter *m, nz_matmul_ctx *mc, nz_tr_batch *b, nz_error *e) {
    const uint64_t pre = nz_tr_batch_bound(m->tr, b, NULL, 0, NULL);
    if (pre > m->bound)
        fail_msg("bound grew before step %zu: %llu > %llu", m->n, (unsigned long long)pre,
                 (unsigned long long)m->bound);
    const int64_t held = tb_now() - m->base;
    nz_mem_window_begin(TB_WINDOW);
    const int rc = nz_tr_batch_step(mc, b, e);
    const uint64_t peak = (uint64_t)(held > 0 ? held : 0) + nz_mem_window_peak();
    nz_mem_window_end();
    if (peak > pre)
        fail_msg("step %zu: the batch's peak %llu > its bound %llu (held %lld at the start)", m->n,
                 (unsigned long long)peak, (unsigned long long)pre, (long long)held);
    assert_true(m->n < TB_STEPS);
    m->pre[m->n] = pre;
    m->peak[m->n] = peak;
    m->join[m->n++] = m->joined;
    m->joined = 0;
    m->bound = nz_tr_batch_bound(m->tr, b, NULL, 0, NULL);
    if (m->bound > pre)
        fail_msg("bound grew across step %zu: %llu > %llu", m->n - 1, (unsigned long long)m->bound,
                 (unsigned long long)pre);
    return rc;
}

/* Print how tight the bound was: before each step against the largest peak of the steps it covers (to
 * the next join: a join ends what it covers, though growth it foresaw may come after), the mean and the
 * worst ratio; and the largest bound against the largest peak of the run, which must stay under
 * TB_FACTOR x it + TB_SLACK when strict (a run whose sentences go on to their max_len: the bound must
 * allow for that, however soon they end). TB_DEBUG=1 prints every step. */
static inline void tb_report(const tb_meter *m, const char *label, int strict) {
    double worst = 0, sum = 0, most_b = 0, most_p = 0;
    uint64_t cover = 0;
    for (size_t i = m->n; i-- > 0;) { /* backwards: cover = the largest peak from step i to the next join */
        if (i + 1 < m->n && m->join[i + 1]) cover = 0;
        if (m->peak[i] > cover) cover = m->peak[i];
        const double r = (double)m->pre[i] / (double)cover;
        if (getenv("TB_DEBUG"))
            printf("  step %3zu%s bound %10llu peak %10llu cover %10llu  %.2f\n", i, m->join[i] ? " +" : "  ",
                   (unsigned long long)m->pre[i], (unsigned long long)m->peak[i], (unsigned long long)cover,
                   r);
        worst = r > worst ? r : worst;
        sum += r;
        most_b = (double)m->pre[i] > most_b ? (double)m->pre[i] : most_b;
        most_p = (double)m->peak[i] > most_p ? (double)m->peak[i] : most_p;
    }
    printf("%s: %zu steps, bound / the peak it covers: mean %.2f, worst %.2f; largest bound %.0f KiB / "
           "largest peak %.0f KiB = %.2f\n",
           label, m->n, m->n ? sum / (double)m->n : 0, worst, most_b / 1024, most_p / 1024,
           most_p ? most_b / most_p : 0);
    if (strict && most_b > TB_FACTOR * most_p + TB_SLACK)
        fail_msg("%s: the largest bound %.0f > %.1f x the largest peak %.0f + 1 MiB", label, most_b,
                 TB_FACTOR, most_p);
}

#endif /* TEST_RANDMODEL_H */
