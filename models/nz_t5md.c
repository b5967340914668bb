/*
 * nz_t5md.c — EqHard-EM multi-decoder T5 (see nz_t5md.h).
 *
 * Layout of the maths (rows of d_model floats, batch-first):
 *   encoder  x = shared[src]; blocks (pre-norm RMSNorm, self-attention with the
 *            bidirectional position bias of block 0 and key padding, FFN) through
 *            nz_block_fwd; final RMSNorm
 *   decoder  one token per step with self-attention KV caches: x = E[tok]
 *            (shared, or decoders.{k}.embed_tokens); per block
 *              x += a_k(SelfAttn(norm(x)))     causal bias of block 0, cache
 *              x += a_k(CrossAttn(norm(x)))    cached encoder keys/values, kv_map
 *              x += a_k(FFN(norm(x)))
 *            (a_k: decoder k's adapter on its rows; identity for the
 *            transformer variant and "none"); final RMSNorm; logits =
 *            (x * d^-0.5) shared^T (tied) or x lm_head^T
 *   The adapters sit on each sublayer's output (EqHard-EM), not on the block
 *   output as nz_block's adapter does, and the groups of a batch have
 *   different sizes, so the decoder blocks are run sublayer by sublayer here
 *   with the nz_layer.h pieces.
 */
#include "nz_t5md.h"

#include "nz_alloc.h"
#include "nz_mconfig.h"
#include "nz_spm.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* rows of the output projection computed per matmul (bounds the logits buffer) */
#define PROJ_CHUNK 64
/* EqHard-EM / t5md_ref: golden-ratio increment separating the decoders' sampling streams */
#define STREAM_GOLDEN 0x9E3779B97F4A7C15ULL

/* Encoder, or one decoder body. */
typedef struct t5_stack {
    size_t nl;
    nz_block *blk;   /* [nl] pre-norm blocks (decoders: has_cross) */
    float *rel;      /* [num_buckets x H] block 0's relative_attention_bias */
    nz_norm fnorm;   /* final_layer_norm */
    nz_weight embed; /* transformer decoders: decoders.{k}.embed_tokens (or shared) */
    char prefix[32]; /* "encoder.", "decoder.", "decoders.3." */
} t5_stack;

struct nz_t5md {
    nz_t5md_config c;
    const nz_model *m;
    nz_weight shared; /* [V x d] shared.weight */
    nz_linear head;   /* [V x d] shared.weight (tied) or lm_head.weight */
    float head_scale; /* d^-0.5 when tied, else 1 */
    t5_stack enc;
    t5_stack *dec; /* [ndec]: 1 (adapter) or K (transformer) */
    size_t ndec;
    nz_adapter *ad; /* adapter variant (not "none"): [dec_layers x 3 x K] */
    uint8_t *used;  /* [ntensors] during nz_t5md_load: tensors bound so far */
};

struct nz_t5md_tok {
    nz_spm *sp;
    int32_t sep; /* separator id, -1: turns joined with a space */
    size_t max_turns, max_src, count;
    size_t max_piece; /* bytes of the longest piece: bounds decoded text */
};

/* ------------------------------------------------------------------ config */

/* Fill c from config.json (t5md_ref.make_config's defaults for absent
 * network keys, load_tokenizer's for the dialogue keys). */
static int read_config(const json_t *j, nz_t5md_config *c, nz_error *err) {
    int rc = NZ_OK;
    const char *s = NULL;
    memset(c, 0, sizeof *c);
    if (!json_is_object(j)) NZ_FAIL(NZ_E_FORMAT, "model has no config.json object");
    const json_t *arch = nz_cfg_get(j, "architecture");
    if (!json_is_string(arch) || strcmp(json_string_value(arch), "t5_multidecoder"))
        NZ_FAIL(NZ_E_UNSUPPORTED, "config.json: 'architecture' is %s%s%s, expected \"t5_multidecoder\"",
                json_is_string(arch) ? "\"" : "", json_is_string(arch) ? json_string_value(arch) : "missing",
                json_is_string(arch) ? "\"" : "");
    NZ_TRY(nz_cfg_str(j, "model_type", "t5", &s, err));
    if (strcmp(s, "t5")) NZ_FAIL(NZ_E_UNSUPPORTED, "config.json: 'model_type' is \"%s\", expected \"t5\"", s);
    NZ_TRY(nz_cfg_str(j, "multidecoder", "adapter", &s, err));
    if (!strcmp(s, "adapter"))
        c->kind = NZ_T5MD_ADAPTER;
    else if (!strcmp(s, "transformer"))
        c->kind = NZ_T5MD_TRANSFORMER;
    else if (!strcmp(s, "none"))
        c->kind = NZ_T5MD_ADAPTER, c->plain = 1;
    else
        NZ_FAIL(NZ_E_UNSUPPORTED, "config.json: 'multidecoder' is \"%s\" (adapter, transformer or none)", s);
    NZ_TRY(nz_cfg_size(j, "num_modes", 1, 1, &c->num_modes, err));
    if (c->num_modes > 4096) NZ_FAIL(NZ_E_RANGE, "config.json: 'num_modes' %zu is above 4096", c->num_modes);
    if (c->plain) c->num_modes = 1; /* make_config: a plain T5 has one decoder */
    NZ_TRY(nz_cfg_size(j, "adapter_hidden_size", 128, 1, &c->adapter_hidden, err));
    NZ_TRY(nz_cfg_size(j, "vocab_size", 8000, 3, &c->vocab, err));
    NZ_TRY(nz_cfg_size(j, "d_model", 256, 1, &c->d_model, err));
    NZ_TRY(nz_cfg_size(j, "d_kv", 64, 1, &c->d_kv, err));
    NZ_TRY(nz_cfg_size(j, "d_ff", 1024, 1, &c->d_ff, err));
    NZ_TRY(nz_cfg_size(j, "num_heads", 4, 1, &c->num_heads, err));
    NZ_TRY(nz_cfg_size(j, "num_layers", 4, 1, &c->enc_layers, err));
    NZ_TRY(nz_cfg_size(j, "num_decoder_layers", c->enc_layers, 1, &c->dec_layers, err));
    size_t nb = 0, md = 0;
    NZ_TRY(nz_cfg_size(j, "relative_attention_num_buckets", 32, 1, &nb, err));
    NZ_TRY(nz_cfg_size(j, "relative_attention_max_distance", 128, 1, &md, err));
    c->num_buckets = (int)nb;
    c->max_distance = (int)md;
    if (c->num_heads * c->d_kv > (1u << 30))
        NZ_FAIL(NZ_E_FORMAT, "config.json: num_heads %zu x d_kv %zu is too large", c->num_heads, c->d_kv);
    c->inner = c->num_heads * c->d_kv;
    const json_t *eps = nz_cfg_get(j, "layer_norm_epsilon");
    c->eps = 1e-6f;
    if (eps) {
        if (!json_is_number(eps) || !(json_number_value(eps) >= 0) || !isfinite(json_number_value(eps)))
            NZ_FAIL(NZ_E_FORMAT, "config.json: 'layer_norm_epsilon' must be a finite number >= 0");
        c->eps = (float)json_number_value(eps);
    }
    NZ_TRY(nz_cfg_str(j, "feed_forward_proj", "relu", &s, err));
    if (!strcmp(s, "relu"))
        c->act = NZ_ACT_RELU;
    else if (!strcmp(s, "gated-gelu"))
        c->act = NZ_ACT_GATED_GELU;
    else
        NZ_FAIL(NZ_E_UNSUPPORTED, "config.json: feed_forward_proj \"%s\" is not supported (relu, gated-gelu)",
                s);
    NZ_TRY(nz_cfg_flag(j, "tie_word_embeddings", 1, &c->tied, err));
    NZ_TRY(nz_cfg_fixed(j, "pad_token_id", NZ_T5MD_PAD, "T5 ids: pad 0, eos 1, unk 2", err));
    NZ_TRY(nz_cfg_fixed(j, "eos_token_id", NZ_T5MD_EOS, "T5 ids: pad 0, eos 1, unk 2", err));
    NZ_TRY(nz_cfg_fixed(j, "unk_token_id", NZ_T5MD_UNK, "T5 ids: pad 0, eos 1, unk 2", err));
    NZ_TRY(nz_cfg_fixed(j, "decoder_start_token_id", NZ_T5MD_START, "T5 ids: pad 0, eos 1, unk 2", err));
    NZ_TRY(nz_cfg_str(j, "turn_separator", "", &s, err));
    if (strlen(s) >= sizeof c->turn_separator)
        NZ_FAIL(NZ_E_FORMAT, "config.json: 'turn_separator' is longer than %zu bytes",
                sizeof c->turn_separator - 1);
    snprintf(c->turn_separator, sizeof c->turn_separator, "%s", s);
    NZ_TRY(nz_cfg_size(j, "max_context_turns", 0, 0, &c->max_context_turns, err));
    NZ_TRY(nz_cfg_size(j, "max_source_length", 0, 0, &c->max_source_length, err));
    NZ_TRY(nz_cfg_size(j, "max_target_length", 0, 0, &c->max_target_length, err));
done:
    return rc;
}

/* ------------------------------------------------------------------ binding */

static const char *const ATTN_NAMES[4] = {"q", "k", "v", "o"};

static void mark(nz_t5md *t, const char *name) {
    long i = nz_model_find(t->m, name);
    if (i >= 0) t->used[i] = 1;
}

static int has(const nz_t5md *t, const char *name) { return nz_model_find(t->m, name) >= 0; }

static int bind_norm(nz_t5md *t, nz_norm *n, const char *name, nz_error *err) {
    int rc = nz_norm_bind(n, t->m, NZ_NORM_RMS, name, NULL, t->c.d_model, t->c.eps, err);
    if (!rc) mark(t, name);
    return rc;
}

static int bind_attn(nz_t5md *t, nz_attn *a, const char *prefix, nz_error *err) {
    int rc = nz_attn_bind(a, t->m, prefix, ATTN_NAMES, 0, t->c.d_model, t->c.num_heads, 1.0f, err);
    if (!rc && a->dh != t->c.d_kv)
        rc = nz_fail(err, NZ_E_FORMAT,
                     "'%sq.weight' has %zu rows, config.json says num_heads %zu x d_kv %zu = %zu", prefix,
                     a->H * a->dh, t->c.num_heads, t->c.d_kv, t->c.inner);
    if (!rc) {
        char n[256];
        for (int i = 0; i < 4; i++) {
            snprintf(n, sizeof n, "%s%s.weight", prefix, ATTN_NAMES[i]);
            mark(t, n);
        }
    }
    return rc;
}

/* The relative position bias table [num_buckets x num_heads] of block 0. */
static int bind_rel(nz_t5md *t, t5_stack *s, const char *name, nz_error *err) {
    long i = nz_model_find(t->m, name);
    if (i < 0) return nz_fail(err, NZ_E_NOT_FOUND, "no tensor '%s' in the model", name);
    const nz_tensor *te = nz_model_tensor(t->m, (size_t)i);
    if (te->ndim != 2 || te->shape[0] != (int64_t)t->c.num_buckets || te->shape[1] != (int64_t)t->c.num_heads)
        return nz_fail(err, NZ_E_FORMAT,
                       "tensor '%s' must be [%d x %zu] (relative_attention_num_buckets x num_heads)", name,
                       t->c.num_buckets, t->c.num_heads);
    int rc = nz_param_load(t->m, name, (size_t)t->c.num_buckets * t->c.num_heads, &s->rel, NULL, err);
    if (!rc) mark(t, name);
    return rc;
}

/* One T5Block: layer.0 self-attention, [layer.1 cross-attention], FFN. */
static int bind_block(nz_t5md *t, t5_stack *s, size_t i, int dec, nz_error *err) {
    int rc = NZ_OK;
    char p[96], a[256], b[256], c[256];
    nz_block *bl = &s->blk[i];
    memset(bl, 0, sizeof *bl);
    bl->pre_norm = 1;
    bl->has_cross = dec;
    snprintf(p, sizeof p, "%sblock.%zu.", s->prefix, i);
    snprintf(a, sizeof a, "%slayer.0.SelfAttention.", p);
    NZ_TRY(bind_attn(t, &bl->self, a, err));
    snprintf(a, sizeof a, "%slayer.0.layer_norm.weight", p);
    NZ_TRY(bind_norm(t, &bl->self_norm, a, err));
    if (i == 0) {
        snprintf(a, sizeof a, "%slayer.0.SelfAttention.relative_attention_bias.weight", p);
        NZ_TRY(bind_rel(t, s, a, err));
    }
    int f = 1;
    if (dec) {
        snprintf(a, sizeof a, "%slayer.1.EncDecAttention.", p);
        NZ_TRY(bind_attn(t, &bl->cross, a, err));
        snprintf(a, sizeof a, "%slayer.1.layer_norm.weight", p);
        NZ_TRY(bind_norm(t, &bl->cross_norm, a, err));
        f = 2;
    }
    const int gated = t->c.act == NZ_ACT_GATED_GELU;
    snprintf(a, sizeof a, "%slayer.%d.DenseReluDense.%s.weight", p, f, gated ? "wi_0" : "wi");
    snprintf(b, sizeof b, "%slayer.%d.DenseReluDense.wi_1.weight", p, f);
    snprintf(c, sizeof c, "%slayer.%d.DenseReluDense.wo.weight", p, f);
    NZ_TRY(nz_ffn_bind(&bl->ffn, t->m, t->c.act, a, NULL, gated ? b : NULL, c, NULL, t->c.d_model, err));
    if (bl->ffn.d_ff != t->c.d_ff)
        NZ_FAIL(NZ_E_FORMAT, "'%s' has %zu rows, config.json says d_ff %zu", a, bl->ffn.d_ff, t->c.d_ff);
    mark(t, a);
    mark(t, c);
    if (gated) mark(t, b);
    snprintf(a, sizeof a, "%slayer.%d.layer_norm.weight", p, f);
    NZ_TRY(bind_norm(t, &bl->ffn_norm, a, err));
done:
    return rc;
}

static void stack_free(t5_stack *s) {
    for (size_t i = 0; s->blk && i < s->nl; i++) nz_block_free(&s->blk[i]);
    nz_free(s->blk);
    nz_free(s->rel);
    nz_norm_free(&s->fnorm);
    memset(s, 0, sizeof *s);
}

static int bind_stack(nz_t5md *t, t5_stack *s, const char *prefix, size_t nl, int dec, nz_error *err) {
    int rc = NZ_OK;
    char a[256];
    memset(s, 0, sizeof *s);
    snprintf(s->prefix, sizeof s->prefix, "%s", prefix);
    s->blk = nz_calloc(nl, sizeof *s->blk, NZ_MEM_OTHER);
    if (!s->blk) NZ_FAIL(NZ_E_NOMEM, "out of memory for %zu blocks", nl);
    s->nl = nl;
    for (size_t i = 0; i < nl; i++) NZ_TRY(bind_block(t, s, i, dec, err));
    snprintf(a, sizeof a, "%sfinal_layer_norm.weight", prefix);
    NZ_TRY(bind_norm(t, &s->fnorm, a, err));
done:
    return rc;
}

/* The K adapters of every decoder sublayer (adapter variant). */
static int bind_adapters(nz_t5md *t, nz_error *err) {
    int rc = NZ_OK;
    const size_t L = t->c.dec_layers, K = t->c.num_modes;
    char n[4][256];
    t->ad = nz_calloc(L * 3 * K, sizeof *t->ad, NZ_MEM_OTHER);
    if (!t->ad) NZ_FAIL(NZ_E_NOMEM, "out of memory for %zu adapters", L * 3 * K);
    for (size_t l = 0; l < L; l++)
        for (int sub = 0; sub < 3; sub++)
            for (size_t k = 0; k < K; k++) {
                const char *p = "decoder.block";
                snprintf(n[0], sizeof n[0], "%s.%zu.layer.%d.adapters.%zu.o2i.weight", p, l, sub, k);
                snprintf(n[1], sizeof n[1], "%s.%zu.layer.%d.adapters.%zu.o2i.bias", p, l, sub, k);
                snprintf(n[2], sizeof n[2], "%s.%zu.layer.%d.adapters.%zu.i2o.weight", p, l, sub, k);
                snprintf(n[3], sizeof n[3], "%s.%zu.layer.%d.adapters.%zu.i2o.bias", p, l, sub, k);
                nz_adapter *ad = &t->ad[(l * 3 + (size_t)sub) * K + k];
                NZ_TRY(nz_adapter_bind(ad, t->m, n[0], n[1], n[2], n[3], t->c.d_model, err));
                if (ad->down.n_out != t->c.adapter_hidden)
                    NZ_FAIL(NZ_E_FORMAT, "'%s' has %zu rows, config.json says adapter_hidden_size %zu", n[0],
                            ad->down.n_out, t->c.adapter_hidden);
                for (int i = 0; i < 4; i++) mark(t, n[i]);
            }
done:
    return rc;
}

/* A [V x d] embedding-shaped weight. */
static int bind_vd(nz_t5md *t, nz_weight *w, const char *name, nz_error *err) {
    int rc = nz_weight_bind(w, t->m, name, err);
    if (rc) return rc;
    if (w->t->ndim != 2 || w->n != t->c.vocab || w->k != t->c.d_model)
        return nz_fail(err, NZ_E_FORMAT,
                       "tensor '%s' is [%llu x %llu], config.json says vocab_size %zu x d_model %zu", name,
                       (unsigned long long)w->n, (unsigned long long)w->k, t->c.vocab, t->c.d_model);
    mark(t, name);
    return NZ_OK;
}

int nz_t5md_load(const nz_model *m, nz_t5md **out, nz_error *err) {
    int rc = NZ_OK;
    *out = NULL;
    nz_t5md *t = nz_calloc(1, sizeof *t, NZ_MEM_OTHER);
    if (!t) return nz_fail(err, NZ_E_NOMEM, "out of memory for the model");
    t->m = m;
    nz_t5md_config *c = &t->c;
    NZ_TRY(read_config(nz_model_config(m), c, err));
    const size_t nt = nz_model_ntensors(m);
    t->used = nz_calloc(nt ? nt : 1, 1, NZ_MEM_OTHER);
    if (!t->used) NZ_FAIL(NZ_E_NOMEM, "out of memory for the model");
    NZ_TRY(bind_vd(t, &t->shared, "shared.weight", err));
    if (c->tied) {
        NZ_TRY(nz_linear_bind(&t->head, m, "shared.weight", NULL, c->d_model, c->vocab, err));
        t->head_scale = (float)pow((double)c->d_model, -0.5);
    } else {
        NZ_TRY(nz_linear_bind(&t->head, m, "lm_head.weight", NULL, c->d_model, c->vocab, err));
        mark(t, "lm_head.weight");
        t->head_scale = 1.0f;
    }
    NZ_TRY(bind_stack(t, &t->enc, "encoder.", c->enc_layers, 0, err));
    t->ndec = c->kind == NZ_T5MD_TRANSFORMER ? c->num_modes : 1;
    t->dec = nz_calloc(t->ndec, sizeof *t->dec, NZ_MEM_OTHER);
    if (!t->dec) NZ_FAIL(NZ_E_NOMEM, "out of memory for %zu decoders", t->ndec);
    if (c->kind == NZ_T5MD_TRANSFORMER) {
        for (size_t k = 0; k < t->ndec; k++) {
            char p[32], e[64];
            snprintf(p, sizeof p, "decoders.%zu.", k);
            NZ_TRY(bind_stack(t, &t->dec[k], p, c->dec_layers, 1, err));
            snprintf(e, sizeof e, "decoders.%zu.embed_tokens.weight", k);
            /* t5md_ref.load_model_dir: a missing copy is the shared embedding */
            NZ_TRY(bind_vd(t, &t->dec[k].embed, has(t, e) ? e : "shared.weight", err));
        }
    } else {
        NZ_TRY(bind_stack(t, &t->dec[0], "decoder.", c->dec_layers, 1, err));
        t->dec[0].embed = t->shared;
        if (!c->plain) NZ_TRY(bind_adapters(t, err));
    }
    /* the reference loads strictly: a tensor this configuration has no place for is an error */
    for (size_t i = 0; i < nt; i++) {
        if (t->used[i]) continue;
        const char *name = nz_model_tensor(m, i)->name;
        NZ_FAIL(NZ_E_FORMAT,
                "tensor '%s' is not part of the model config.json describes (multidecoder %s, num_modes %zu, "
                "%zu encoder / %zu decoder blocks, feed_forward_proj %s, tie_word_embeddings %s)",
                name,
                c->kind == NZ_T5MD_TRANSFORMER ? "transformer"
                : c->plain                     ? "none"
                                               : "adapter",
                c->num_modes, c->enc_layers, c->dec_layers, c->act == NZ_ACT_RELU ? "relu" : "gated-gelu",
                c->tied ? "true" : "false");
    }
    nz_free(t->used);
    t->used = NULL;
    *out = t;
    return NZ_OK;
done:
    nz_t5md_free(t);
    return rc;
}

void nz_t5md_free(nz_t5md *t) {
    if (!t) return;
    stack_free(&t->enc);
    for (size_t k = 0; t->dec && k < t->ndec; k++) stack_free(&t->dec[k]);
    nz_free(t->dec);
    if (t->ad)
        for (size_t i = 0; i < t->c.dec_layers * 3 * t->c.num_modes; i++) nz_adapter_free(&t->ad[i]);
    nz_free(t->ad);
    nz_linear_free(&t->head);
    nz_free(t->used);
    nz_free(t);
}

const nz_t5md_config *nz_t5md_get_config(const nz_t5md *t) { return &t->c; }

/* ------------------------------------------------------------------ encoder */

int nz_t5md_check_source(const nz_t5md *t, const int32_t *src, size_t n, nz_error *err) {
    if (!n) return nz_fail(err, NZ_E_INVALID_ARG, "empty source (no ids)");
    if (n > NZ_T5MD_MAX_SOURCE)
        return nz_fail(err, NZ_E_RANGE, "source has %zu ids, more than %d", n, NZ_T5MD_MAX_SOURCE);
    for (size_t i = 0; i < n; i++)
        if (src[i] < 0 || (size_t)src[i] >= t->c.vocab)
            return nz_fail(err, NZ_E_RANGE, "source id %d at position %zu is outside the vocabulary [0, %zu)",
                           (int)src[i], i, t->c.vocab);
    return NZ_OK;
}

void nz_t5md_enc_free(nz_t5md_enc *enc) {
    if (!enc) return;
    nz_free(enc->x);
    nz_free(enc->pad);
    nz_free(enc->len);
    memset(enc, 0, sizeof *enc);
}

int nz_t5md_encode(nz_matmul_ctx *mc, const nz_t5md *t, const int32_t *const *src, const size_t *len,
                   size_t B, nz_t5md_enc *enc, nz_error *err) {
    int rc = NZ_OK;
    const nz_t5md_config *c = &t->c;
    const size_t D = c->d_model, H = c->num_heads;
    int32_t *ids = NULL;
    float *bias = NULL;
    memset(enc, 0, sizeof *enc);
    if (!B) return nz_fail(err, NZ_E_INVALID_ARG, "encode: empty batch");
    size_t S = 0;
    for (size_t b = 0; b < B; b++) {
        rc = nz_t5md_check_source(t, src[b], len[b], err);
        if (rc) return nz_fail_prefix(err, "context %zu: ", b);
        if (len[b] > S) S = len[b];
    }
    enc->B = B;
    enc->S = S;
    enc->D = D;
    enc->x = nz_malloc(B * S * D * sizeof *enc->x, NZ_MEM_ACTIVATIONS);
    enc->pad = nz_malloc(B * S, NZ_MEM_ACTIVATIONS);
    enc->len = nz_malloc(B * sizeof *enc->len, NZ_MEM_ACTIVATIONS);
    ids = nz_malloc(B * S * sizeof *ids, NZ_MEM_ACTIVATIONS);
    bias = (H * S * S) / S / S == H ? nz_malloc(H * S * S * sizeof *bias, NZ_MEM_ACTIVATIONS) : NULL;
    if (!enc->x || !enc->pad || !enc->len || !ids || !bias)
        NZ_FAIL(NZ_E_NOMEM, "out of memory encoding %zu sources of up to %zu ids", B, S);
    int any = 0;
    for (size_t b = 0; b < B; b++) {
        enc->len[b] = len[b];
        for (size_t s = 0; s < S; s++) {
            const int p = s >= len[b];
            ids[b * S + s] = p ? NZ_T5MD_PAD : src[b][s];
            enc->pad[b * S + s] = (uint8_t)p;
            any |= p;
        }
    }
    NZ_TRY(nz_embed(mc, &t->shared, ids, B * S, 1.0f, enc->x, err));
    nz_t5_position_bias(bias, t->enc.rel, H, S, S, 0, 0, 1, c->num_buckets, c->max_distance);
    nz_block_io io;
    memset(&io, 0, sizeof io);
    io.B = B;
    io.T = S;
    io.self_pad = any ? enc->pad : NULL;
    io.self_bias = bias;
    for (size_t l = 0; l < t->enc.nl; l++) NZ_TRY(nz_block_fwd(mc, &t->enc.blk[l], enc->x, &io, err));
    nz_norm_fwd(&t->enc.fnorm, enc->x, B * S, enc->x);
done:
    nz_free(ids);
    nz_free(bias);
    if (rc) nz_t5md_enc_free(enc);
    return rc;
}

/* ------------------------------------------------------------------ peak memory estimates
 *
 * nz_t5md_peak_bytes: the bytes nz_t5md_generate holds at its peak in NZ_MEM_ACTIVATIONS + NZ_MEM_KV (+
 * its NZ_MEM_OTHER results), counted as nz_malloc counts them, as the sum of the buffers alive together
 * at the worst point. Each helper stands next to the code whose allocations it mirrors (the engine's
 * layers: engine/nz_layer.c, nz_attn_self_peak and nz_attn_cross_peak): a change to those allocations must
 * change the helper (tests/test_mem_estimate.c checks measured <= estimate <= 1.3 x measured + 256 KiB).
 * Sizes are doubles (exact below 2^53 bytes), saturated on return. */

static double dmax(double a, double b) { return a > b ? a : b; }

/* nz_ffn_fwd over M rows: the hidden layer (M d_ff floats, twice that gated, + 1). */
static double ffn_peak(const nz_t5md_config *c, double M) {
    return (c->act == NZ_ACT_GATED_GELU ? 8 : 4) * M * (double)c->d_ff + 1;
}

/* nz_t5md_encode's output for B x S: x (B S d floats), pad (B S bytes), len (B size_t). */
static double enc_bytes(const nz_t5md_config *c, double B, double S) {
    return 4 * B * S * (double)c->d_model + B * S + 8 * B;
}

/* nz_t5md_encode's peak: its output, ids (B S int32), the position bias (H S S floats), and the larger of
 * nz_embed's flags (B S bytes) and one nz_block_fwd (h, y: 2 M d floats + 1; then stateless self attention
 * or the FFN; no cross attention, no adapter). */
static double encode_peak(const nz_t5md_config *c, double B, double S) {
    const double M = B * S, d = (double)c->d_model, I = (double)c->inner;
    const double block = 8 * M * d + 1 + dmax(nz_attn_self_peak(B, S, I, 0, S), ffn_peak(c, M));
    return enc_bytes(c, B, S) + 4 * M + 4 * (double)c->num_heads * S * S + dmax(dmax(M, 1), block);
}

/* ------------------------------------------------------------------ decoder */

/* The state of one generation call's decoder rows. Rows are decoder-major:
 * the rows of one requested decoder j are contiguous (dj nondecreasing). */
typedef struct run {
    const nz_t5md *t;
    size_t D;        /* requested decoders */
    const int *decs; /* [D] their ks */
    size_t L;        /* decoder blocks */
    nz_kv *cross;    /* adapter: [L] over the sources; transformer: [D x L] */
    size_t ncross;
    nz_kv *self;      /* [L] self-attention caches of the rows */
    size_t N;         /* rows now */
    uint32_t *src;    /* [N] source (encoder row) of each row */
    uint32_t *dj;     /* [N] requested-decoder index of each row */
    float *x, *h, *y; /* [N0 x d] hidden states, normed input, sublayer output */
    float *bias;      /* [H x (cap + 1)] one step's self-attention position bias */
} run;

static void run_free(run *r) {
    for (size_t i = 0; r->cross && i < r->ncross; i++) nz_kv_free(&r->cross[i]);
    nz_free(r->cross);
    for (size_t l = 0; r->self && l < r->L; l++) nz_kv_free(&r->self[l]);
    nz_free(r->self);
    nz_free(r->src);
    nz_free(r->dj);
    nz_free(r->x);
    nz_free(r->h);
    nz_free(r->y);
    nz_free(r->bias);
    memset(r, 0, sizeof *r);
}

/* Caches and buffers for N0 rows of up to cap positions over enc. */
static int run_init(nz_matmul_ctx *mc, run *r, const nz_t5md *t, const nz_t5md_enc *enc, const int *decs,
                    size_t D, size_t N0, size_t cap, nz_error *err) {
    int rc = NZ_OK;
    const size_t d = t->c.d_model, I = t->c.inner, L = t->c.dec_layers;
    memset(r, 0, sizeof *r);
    r->t = t;
    r->D = D;
    r->decs = decs;
    r->L = L;
    r->ncross = t->c.kind == NZ_T5MD_TRANSFORMER ? D * L : L;
    r->cross = nz_calloc(r->ncross, sizeof *r->cross, NZ_MEM_KV);
    r->self = nz_calloc(L, sizeof *r->self, NZ_MEM_KV);
    r->src = nz_malloc(N0 * sizeof *r->src, NZ_MEM_ACTIVATIONS);
    r->dj = nz_malloc(N0 * sizeof *r->dj, NZ_MEM_ACTIVATIONS);
    r->x = nz_malloc(N0 * d * sizeof *r->x, NZ_MEM_ACTIVATIONS);
    r->h = nz_malloc(N0 * d * sizeof *r->h, NZ_MEM_ACTIVATIONS);
    r->y = nz_malloc(N0 * d * sizeof *r->y, NZ_MEM_ACTIVATIONS);
    r->bias = nz_malloc(t->c.num_heads * (cap + 1) * sizeof *r->bias, NZ_MEM_ACTIVATIONS);
    if (!r->cross || !r->self || !r->src || !r->dj || !r->x || !r->h || !r->y || !r->bias)
        NZ_FAIL(NZ_E_NOMEM, "out of memory for %zu decoder rows", N0);
    for (size_t i = 0; i < r->ncross; i++) {
        const size_t l = i % L;
        const t5_stack *st = t->c.kind == NZ_T5MD_TRANSFORMER ? &t->dec[decs[i / L]] : &t->dec[0];
        NZ_TRY(nz_kv_init(&r->cross[i], enc->B, enc->S, I, err));
        NZ_TRY(nz_attn_cross_kv(mc, &st->blk[l].cross, enc->x, enc->B, enc->S, enc->pad, &r->cross[i], err));
    }
    for (size_t l = 0; l < L; l++) NZ_TRY(nz_kv_init(&r->self[l], N0, cap, I, err));
    r->N = N0;
done:
    return rc;
}

/* run_init for N0 rows of cap positions over B x S encoder rows, D requested decoders: the cache arrays
 * (nz_kv each), src and dj (N0 uint32 each), x, h, y (N0 d floats each), bias (H (cap + 1) floats); the
 * cross-attention caches (per (decoder,) layer k, v: B S I floats each, pad: B S bytes), *build: the peak
 * while they are built (+ nz_attn_cross_kv's projections, 2 B S I floats + 1); the self-attention caches
 * (per layer k, v: N0 cap I floats each, pad: N0 cap bytes). @return the bytes held once built. */
static double run_bytes(const nz_t5md *t, double B, double S, double D, double N0, double cap,
                        double *build) {
    const nz_t5md_config *c = &t->c;
    const double d = (double)c->d_model, I = (double)c->inner, L = (double)c->dec_layers;
    const double ncross = c->kind == NZ_T5MD_TRANSFORMER ? D * L : L;
    const double fixed = ncross * sizeof(nz_kv) + L * sizeof(nz_kv) + 4 * N0 + 4 * N0 + 3 * (4 * N0 * d) +
                         4 * (double)c->num_heads * (cap + 1);
    const double cross = ncross * (8 * B * S * I + B * S);
    *build = fixed + cross + 8 * B * S * I + 1;
    return fixed + cross + L * (8 * N0 * cap * I + N0 * cap);
}

/* nz_kv_select's copies (engine/nz_layer.c, NZ_MEM_KV) in run_select of n rows whose caches hold up to
 * cap positions: tmp (n len I floats) and ptmp (n len bytes). */
static double select_peak(const nz_t5md *t, double n, double cap) {
    return 4 * n * cap * (double)t->c.inner + n * cap;
}

/* Keep rows keep[0..n) (ascending: the groups stay contiguous) of the caches and row maps. */
static int run_select(run *r, const uint32_t *keep, size_t n, nz_error *err) {
    for (size_t l = 0; l < r->L; l++) {
        int rc = nz_kv_select(&r->self[l], keep, n, err);
        if (rc) return rc;
    }
    for (size_t i = 0; i < n; i++) {
        r->src[i] = r->src[keep[i]];
        r->dj[i] = r->dj[keep[i]];
    }
    r->N = n;
    return NZ_OK;
}

/* The adapters of sublayer sub of block l on the rows [s, e) of y (their groups). */
static int apply_adapters(nz_matmul_ctx *mc, const run *r, size_t l, int sub, float *y, size_t s, size_t e,
                          nz_error *err) {
    const nz_t5md *t = r->t;
    if (!t->ad) return NZ_OK;
    const size_t d = t->c.d_model, K = t->c.num_modes;
    for (size_t g = s; g < e;) {
        size_t ge = g + 1;
        while (ge < e && r->dj[ge] == r->dj[g]) ge++;
        const nz_adapter *ad = &t->ad[(l * 3 + (size_t)sub) * K + (size_t)r->decs[r->dj[g]]];
        int rc = nz_adapter_fwd(mc, ad, y + g * d, ge - g, err);
        if (rc) return rc;
        g = ge;
    }
    return NZ_OK;
}

/* Rows [s, e) through decoder body st (one token each at position pos):
 * embedding, blocks, final norm into r->x. */
static int run_unit(nz_matmul_ctx *mc, run *r, const t5_stack *st, const int32_t *tok, size_t s, size_t e,
                    size_t pos, nz_error *err) {
    const nz_t5md *t = r->t;
    const nz_t5md_config *c = &t->c;
    const size_t d = c->d_model, n = e - s, H = c->num_heads;
    float *x = r->x + s * d, *h = r->h + s * d, *y = r->y + s * d;
    const int tr = c->kind == NZ_T5MD_TRANSFORMER;
    int rc = nz_embed(mc, &st->embed, tok + s, n, 1.0f, x, err);
    if (rc) return rc;
    nz_t5_position_bias(r->bias, st->rel, H, 1, pos + 1, (int64_t)pos, 0, 0, c->num_buckets, c->max_distance);
    for (size_t l = 0; l < r->L; l++) {
        const nz_block *b = &st->blk[l];
        /* this unit's rows of the layer's cache */
        nz_kv view = r->self[l];
        view.k += s * view.cap * view.D;
        view.v += s * view.cap * view.D;
        view.pad += s * view.cap;
        view.B = n;
        nz_norm_fwd(&b->self_norm, x, n, h);
        rc = nz_attn_self(mc, &b->self, h, n, 1, NULL, 1, &view, r->bias, y, err);
        if (!rc) rc = apply_adapters(mc, r, l, 0, r->y, s, e, err);
        if (rc) return rc;
        nz_add(x, y, n * d);
        const nz_kv *ckv = tr ? &r->cross[r->dj[s] * r->L + l] : &r->cross[l];
        nz_norm_fwd(&b->cross_norm, x, n, h);
        rc = nz_attn_cross(mc, &b->cross, h, n, 1, ckv, r->src + s, NULL, y, err);
        if (!rc) rc = apply_adapters(mc, r, l, 1, r->y, s, e, err);
        if (rc) return rc;
        nz_add(x, y, n * d);
        nz_norm_fwd(&b->ffn_norm, x, n, h);
        rc = nz_ffn_fwd(mc, &b->ffn, h, n, y, err);
        if (!rc) rc = apply_adapters(mc, r, l, 2, r->y, s, e, err);
        if (rc) return rc;
        nz_add(x, y, n * d);
    }
    nz_norm_fwd(&st->fnorm, x, n, x);
    return NZ_OK;
}

/* One decoder step of the r->N rows with input tokens tok[N]: final hidden
 * states into r->x. Adapter variant: one pass of the shared body over every
 * row; transformer variant: each decoder's group through its own copy. */
static int run_step(nz_matmul_ctx *mc, run *r, const int32_t *tok, nz_error *err) {
    const nz_t5md *t = r->t;
    const size_t pos = r->self[0].len, N = r->N;
    int rc = NZ_OK;
    if (t->c.kind == NZ_T5MD_TRANSFORMER) {
        for (size_t s = 0; s < N && !rc;) {
            size_t e = s + 1;
            while (e < N && r->dj[e] == r->dj[s]) e++;
            rc = run_unit(mc, r, &t->dec[r->decs[r->dj[s]]], tok, s, e, pos, err);
            s = e;
        }
    } else if (N) {
        rc = run_unit(mc, r, &t->dec[0], tok, 0, N, pos, err);
    }
    if (rc) return rc;
    for (size_t l = 0; l < r->L; l++) r->self[l].len = pos + 1;
    return NZ_OK;
}

/* One run_step's largest temporary: run_unit over n rows at a time (adapter variant: all the rows;
 * transformer variant: one decoder's), with g rows per adapter group (one decoder's rows), caches of up to
 * cap positions, cross attention over B x S: nz_embed's flags (n bytes), cached self attention, an
 * adapter (g r + g d floats + 1), cross attention, the FFN. r->x, h, y are run_init's. */
static double step_peak(const nz_t5md *t, double n, double g, double B, double S, double cap) {
    const nz_t5md_config *c = &t->c;
    const double I = (double)c->inner, d = (double)c->d_model;
    double p = dmax(dmax(n, 1), nz_attn_self_peak(n, 1, I, 1, cap));
    p = dmax(p, nz_attn_cross_peak(n, I, B, S));
    p = dmax(p, ffn_peak(c, n));
    if (t->ad) p = dmax(p, 4 * (g * (double)c->adapter_hidden + g * d) + 1);
    return p;
}

typedef void (*row_fn)(void *ctx, size_t row, float *logits);

/* Logits of rows x[0..N) (rows of d floats), PROJ_CHUNK rows per matmul:
 * fn(ctx, row, logits[V]) for each (logits may be modified). */
static int project(nz_matmul_ctx *mc, const nz_t5md *t, const float *x, size_t N, row_fn fn, void *ctx,
                   nz_error *err) {
    const size_t d = t->c.d_model, V = t->c.vocab, C = N < PROJ_CHUNK ? N : PROJ_CHUNK;
    if (!N) return NZ_OK;
    float *g = nz_malloc(C * d * sizeof *g, NZ_MEM_ACTIVATIONS);
    float *lg = nz_malloc(C * V * sizeof *lg, NZ_MEM_ACTIVATIONS);
    int rc = NZ_OK;
    if (!g || !lg) rc = nz_fail(err, NZ_E_NOMEM, "out of memory for the output projection");
    for (size_t r0 = 0; r0 < N && !rc; r0 += C) {
        const size_t n = N - r0 < C ? N - r0 : C;
        memcpy(g, x + r0 * d, n * d * sizeof *g);
        if (t->head_scale != 1.0f) nz_scale(g, n * d, t->head_scale);
        rc = nz_linear_fwd(mc, &t->head, g, n, lg, err);
        if (rc) break;
        for (size_t i = 0; i < n; i++) fn(ctx, r0 + i, lg + i * V);
    }
    nz_free(g);
    nz_free(lg);
    return rc;
}

/* project's peak for N rows: g (C d floats) and lg (C V floats), C = min(N, PROJ_CHUNK). */
static double project_peak(const nz_t5md *t, double N) {
    const double C = N < PROJ_CHUNK ? N : PROJ_CHUNK;
    return C > 0 ? 4 * C * (double)t->c.d_model + 4 * C * (double)t->c.vocab : 0;
}

/* ------------------------------------------------------------------ results */

void nz_t5md_opts_default(nz_t5md_opts *o) {
    memset(o, 0, sizeof *o);
    o->strategy = NZ_T5MD_GREEDY;
    o->max_new_tokens = 63;
    o->ban_unk = 1;
    o->beam_size = 4;
    o->length_penalty = 1.0;
    o->num_return = 1;
    o->temperature = 1.0f;
    o->top_k = 0;
    o->top_p = 1.0f;
}

static size_t n_decoders(const nz_t5md *t, const nz_t5md_opts *o) {
    return o->decoders && o->n_decoders ? o->n_decoders : t->c.num_modes;
}

size_t nz_t5md_result_count(const nz_t5md *t, const nz_t5md_opts *o, size_t B) {
    nz_t5md_opts def;
    if (!o) {
        nz_t5md_opts_default(&def);
        o = &def;
    }
    const size_t R = o->strategy == NZ_T5MD_BEAM && o->num_return > 1 ? (size_t)o->num_return : 1;
    return B * n_decoders(t, o) * R;
}

void nz_t5md_results_free(nz_t5md_result *res, size_t n) {
    for (size_t i = 0; res && i < n; i++) {
        nz_free(res[i].tokens);
        nz_free(res[i].logprobs);
        memset(&res[i], 0, sizeof res[i]);
    }
}

/* Copy n tokens and log-probs into a result (sums in float64, in order). */
static int set_result(nz_t5md_result *r, const int32_t *tok, const float *lp, size_t n, int fin,
                      nz_error *err) {
    r->tokens = nz_malloc(n * sizeof *r->tokens + 1, NZ_MEM_OTHER);
    r->logprobs = nz_malloc(n * sizeof *r->logprobs + 1, NZ_MEM_OTHER);
    if (!r->tokens || !r->logprobs) {
        nz_free(r->tokens);
        nz_free(r->logprobs);
        r->tokens = NULL;
        r->logprobs = NULL;
        return nz_fail(err, NZ_E_NOMEM, "out of memory for a result");
    }
    double s = 0;
    for (size_t i = 0; i < n; i++) {
        r->tokens[i] = tok[i];
        r->logprobs[i] = lp[i];
        s += (double)lp[i];
    }
    r->n = n;
    r->sum_logprob = s;
    r->mean_logprob = n ? s / (double)n : 0.0;
    r->finished = fin;
    return NZ_OK;
}

/* A batch-wide failure: every result without tokens (and no error of its own) gets it. */
static void fail_all(nz_t5md_result *res, size_t n, const nz_error *err) {
    for (size_t i = 0; i < n; i++) {
        if (res[i].rc || res[i].tokens) continue;
        res[i].rc = err->code ? err->code : NZ_E_INVALID_ARG;
        res[i].err = *err;
    }
}

static int key_nan(const nz_t5md_result *r, nz_t5md_rank_key key) {
    return r->rc || isnan(key == NZ_T5MD_RANK_BEAM_SCORE ? r->beam_score : r->mean_logprob);
}

void nz_t5md_rank(const nz_t5md_result *res, size_t n, nz_t5md_rank_key key, size_t *order) {
    for (size_t i = 0; i < n; i++) order[i] = i;
    /* stable insertion sort: key descending, unrankable results last */
    for (size_t i = 1; i < n; i++)
        for (size_t j = i; j > 0; j--) {
            const nz_t5md_result *a = &res[order[j - 1]], *b = &res[order[j]];
            const int na = key_nan(a, key), nb = key_nan(b, key);
            int swap;
            if (na || nb)
                swap = na && !nb;
            else if (key == NZ_T5MD_RANK_BEAM_SCORE)
                swap = b->beam_score > a->beam_score;
            else
                swap = b->mean_logprob > a->mean_logprob;
            if (!swap) break;
            size_t tmp = order[j];
            order[j] = order[j - 1];
            order[j - 1] = tmp;
        }
}

/* ------------------------------------------------------------------ n-gram ban */

/* Token i of a row's decoder input [start] + gen. */
static inline int32_t seq_at(const int32_t *gen, size_t i) { return i ? gen[i - 1] : NZ_T5MD_START; }

/* HF NoRepeatNGramLogitsProcessor on one row's scores lg[V] (t5md_ref.banned_ngram_tokens):
 * seq = [start] + gen[0..n_gen), cur_len = 1 + n_gen; unless cur_len + 1 < ngram, every
 * token t such that seq[cur_len - ngram + 1 .. cur_len) + [t] already occurs in seq
 * (seq[s .. s + ngram), s + ngram <= cur_len) gets -inf. ngram 0: nothing. O(ngram x cur_len). */
static void ban_repeated_ngrams(float *lg, const int32_t *gen, size_t n_gen, int ngram) {
    const size_t n = (size_t)ngram, cur_len = 1 + n_gen;
    if (!n || cur_len + 1 < n) return;
    const size_t tail = cur_len + 1 - n; /* seq[tail .. cur_len): the last n - 1 tokens */
    for (size_t s = 0; s + n <= cur_len; s++) {
        size_t m = 0;
        while (m + 1 < n && seq_at(gen, s + m) == seq_at(gen, tail + m)) m++;
        if (m + 1 == n) lg[seq_at(gen, s + n - 1)] = -INFINITY;
    }
}

/* ------------------------------------------------------------------ greedy / sampling */

typedef struct ar_ctx {
    const nz_t5md_opts *o;
    size_t V;
    const size_t *orig;  /* [N] original row of each active row */
    const int32_t *otok; /* [N0 x cap] tokens so far of each original row */
    const size_t *cnt;   /* [N0] how many */
    size_t cap;          /* row stride of otok */
    nz_rng *rng;         /* [N0] */
    void *work;          /* nz_sample work */
    int32_t *next;       /* [N] chosen token */
    float *lp;           /* [N] its log-prob */
} ar_ctx;

/* t5md_ref._autoregress: unk and repeated n-grams masked, the pick (first
 * argmax or nz_sample) on the masked logits, the log-prob from their log_softmax */
static void ar_row(void *ctx, size_t i, float *lg) {
    ar_ctx *a = ctx;
    if (a->o->ban_unk) lg[NZ_T5MD_UNK] = -INFINITY;
    if (a->o->no_repeat_ngram) {
        const size_t w = a->orig[i];
        ban_repeated_ngrams(lg, a->otok + w * a->cap, a->cnt[w], a->o->no_repeat_ngram);
    }
    size_t tok;
    if (a->o->strategy == NZ_T5MD_SAMPLE) {
        nz_sampler s = {a->o->temperature, a->o->top_k, a->o->top_p};
        tok = nz_sample(lg, a->V, &s, &a->rng[a->orig[i]], a->work);
    } else {
        tok = nz_argmax(lg, a->V);
    }
    nz_log_softmax(lg, 1, a->V);
    a->next[i] = (int32_t)tok;
    a->lp[i] = lg[tok];
}

/* Greedy or sampling over nv valid sources (valid[b]: the caller's context
 * index of encoder row b); results of context c, decoder j at res[c * D + j]. */
static int autoregress(nz_matmul_ctx *mc, const nz_t5md *t, const nz_t5md_enc *enc, const size_t *valid,
                       const nz_t5md_opts *o, const int *decs, size_t D, nz_t5md_result *res, nz_error *err) {
    int rc = NZ_OK;
    const size_t Bv = enc->B, N0 = Bv * D, V = t->c.vocab, mnt = (size_t)o->max_new_tokens;
    const size_t cap = mnt ? mnt : 1;
    run r;
    memset(&r, 0, sizeof r);
    int32_t *cur = NULL, *next = NULL, *otok = NULL;
    float *olp = NULL, *lp = NULL;
    size_t *orig = NULL, *cnt = NULL;
    uint32_t *keep = NULL;
    uint8_t *fin = NULL;
    nz_rng *rng = NULL;
    void *work = NULL;
    NZ_TRY(run_init(mc, &r, t, enc, decs, D, N0, cap, err));
    cur = nz_malloc(N0 * sizeof *cur, NZ_MEM_ACTIVATIONS);
    next = nz_malloc(N0 * sizeof *next, NZ_MEM_ACTIVATIONS);
    lp = nz_malloc(N0 * sizeof *lp, NZ_MEM_ACTIVATIONS);
    otok = nz_malloc(N0 * cap * sizeof *otok, NZ_MEM_ACTIVATIONS);
    olp = nz_malloc(N0 * cap * sizeof *olp, NZ_MEM_ACTIVATIONS);
    orig = nz_malloc(N0 * sizeof *orig, NZ_MEM_ACTIVATIONS);
    cnt = nz_calloc(N0, sizeof *cnt, NZ_MEM_ACTIVATIONS);
    keep = nz_malloc(N0 * sizeof *keep, NZ_MEM_ACTIVATIONS);
    fin = nz_calloc(N0, 1, NZ_MEM_ACTIVATIONS);
    rng = nz_malloc(N0 * sizeof *rng, NZ_MEM_ACTIVATIONS);
    work = nz_malloc(nz_sample_work_bytes(V), NZ_MEM_ACTIVATIONS);
    if (!cur || !next || !lp || !otok || !olp || !orig || !cnt || !keep || !fin || !rng || !work)
        NZ_FAIL(NZ_E_NOMEM, "out of memory for %zu decoder rows of up to %zu tokens", N0, mnt);
    /* row j * Bv + b: decoder decs[j] on source b (t5md_ref._prepare's order) */
    for (size_t j = 0; j < D; j++)
        for (size_t b = 0; b < Bv; b++) {
            const size_t i = j * Bv + b;
            r.src[i] = (uint32_t)b;
            r.dj[i] = (uint32_t)j;
            orig[i] = i;
            cur[i] = NZ_T5MD_START;
            const uint64_t s = o->seeds ? o->seeds[valid[b]] : o->seed;
            nz_rng_seed(&rng[i], s ^ ((uint64_t)decs[j] * STREAM_GOLDEN));
        }
    for (size_t step = 0; step < mnt && r.N; step++) {
        if (o->stop && o->stop(o->stop_arg))
            NZ_FAIL(NZ_E_CANCELLED, "generation cancelled before step %zu", step);
        NZ_TRY(run_step(mc, &r, cur, err));
        ar_ctx a = {o, V, orig, otok, cnt, cap, rng, work, next, lp};
        NZ_TRY(project(mc, t, r.x, r.N, ar_row, &a, err));
        size_t n = 0;
        for (size_t i = 0; i < r.N; i++) {
            const size_t w = orig[i];
            otok[w * cap + cnt[w]] = next[i];
            olp[w * cap + cnt[w]] = lp[i];
            cnt[w]++;
            if (o->on_token)
                o->on_token(o->token_arg, valid[w % Bv], decs[w / Bv], cnt[w] - 1, next[i], lp[i]);
            if (next[i] == NZ_T5MD_EOS)
                fin[w] = 1;
            else
                keep[n++] = (uint32_t)i;
        }
        if (n < r.N) { /* finished rows leave the batch (keep is ascending: in place) */
            NZ_TRY(run_select(&r, keep, n, err));
            for (size_t i = 0; i < n; i++) orig[i] = orig[keep[i]];
        }
        for (size_t i = 0; i < n; i++) cur[i] = next[keep[i]];
    }
    for (size_t w = 0; w < N0; w++) {
        nz_t5md_result *re = &res[valid[w % Bv] * D + w / Bv];
        NZ_TRY(set_result(re, otok + w * cap, olp + w * cap, cnt[w], fin[w], err));
    }
done:
    run_free(&r);
    nz_free(cur);
    nz_free(next);
    nz_free(lp);
    nz_free(otok);
    nz_free(olp);
    nz_free(orig);
    nz_free(cnt);
    nz_free(keep);
    nz_free(fin);
    nz_free(rng);
    nz_free(work);
    return rc;
}

/* autoregress' peak over B encoder rows of S and D decoders: the run (while its cross caches are built, or
 * held with the caches), its buffers, and the largest of a step, the projection, a run_select and the
 * results. */
static double autoregress_peak(const nz_t5md *t, double B, double S, double D, const nz_t5md_opts *o) {
    const double N0 = B * D, mnt = (double)o->max_new_tokens, cap = mnt ? mnt : 1;
    double build, held = run_bytes(t, B, S, D, N0, cap, &build);
    const double bufs = 4 * N0 * 3                                  /* cur, next, lp */
                        + 4 * N0 * cap * 2                          /* otok, olp */
                        + 8 * N0 + 8 * N0                           /* orig, cnt */
                        + 4 * N0 + N0                               /* keep, fin */
                        + sizeof(nz_rng) * N0                       /* rng */
                        + (double)nz_sample_work_bytes(t->c.vocab); /* work */
    const int tr = t->c.kind == NZ_T5MD_TRANSFORMER;
    double step = step_peak(t, tr ? B : N0, B, B, S, cap);
    step = dmax(step, dmax(project_peak(t, N0), select_peak(t, N0, cap)));
    const double results = N0 * 2 * (4 * cap + 1); /* set_result: tokens, logprobs (NZ_MEM_OTHER) */
    return dmax(build, held + bufs + dmax(step, results));
}

/* ------------------------------------------------------------------ beam search */

/* A kept hypothesis of an item (HF BeamHypotheses entry). */
typedef struct bhyp {
    double score; /* sum / len^length_penalty */
    size_t slot;  /* storage slot of its tokens */
    size_t n;     /* tokens */
    int fin;      /* ended with eos */
} bhyp;

typedef struct beam_cand {
    float s;       /* cumulative score */
    uint32_t flat; /* beam x V + token */
    float lp;      /* the token's log-prob */
} beam_cand;

/* descending scores, ties to the lower flat index (a stable descending sort), NaN last */
static int cand_cmp(const void *pa, const void *pb) {
    const beam_cand *a = pa, *b = pb;
    int na = isnan(a->s), nb = isnan(b->s);
    if (na != nb) return na - nb;
    if (!na && a->s > b->s) return -1;
    if (!na && a->s < b->s) return 1;
    return (a->flat > b->flat) - (a->flat < b->flat);
}

typedef struct beam_state {
    size_t nb, cap, V, kk;
    double lenpen;
    int early;
    /* hypotheses: per item nb + 1 storage slots of cap + 1 tokens */
    bhyp *hy;          /* [items x (nb + 1)] in insertion order */
    size_t *hcnt;      /* [items] */
    double *worst;     /* [items] */
    uint8_t *slot_use; /* [items x (nb + 1)] */
    int32_t *htok;     /* [items x (nb + 1) x (cap + 1)] */
    float *hlp;
    /* per-row candidates of the current step */
    const float *bscore; /* [N] */
    uint32_t *ctok;      /* [N x kk] */
    float *cval, *clp;   /* [N x kk] */
    float *tmp;          /* [V] */
} beam_state;

/* BeamHypotheses.add: tokens tok[n] (+ eos when eos_lp is not NULL). */
static void hyp_add(beam_state *bs, size_t it, size_t hyp_len, double sum, const int32_t *tok,
                    const float *lp, size_t n, const float *eos_lp) {
    const size_t nb = bs->nb, W = bs->cap + 1;
    const double score = sum / pow((double)hyp_len, bs->lenpen);
    bhyp *h = bs->hy + it * (nb + 1);
    size_t *cnt = &bs->hcnt[it];
    if (!(*cnt < nb || score > bs->worst[it])) return;
    uint8_t *use = bs->slot_use + it * (nb + 1);
    size_t slot = 0;
    while (use[slot]) slot++; /* at most nb slots are in use */
    use[slot] = 1;
    int32_t *dt = bs->htok + (it * (nb + 1) + slot) * W;
    float *dl = bs->hlp + (it * (nb + 1) + slot) * W;
    memcpy(dt, tok, n * sizeof *tok);
    memcpy(dl, lp, n * sizeof *lp);
    if (eos_lp) {
        dt[n] = NZ_T5MD_EOS;
        dl[n] = *eos_lp;
    }
    h[*cnt] = (bhyp){score, slot, n + (eos_lp != NULL), eos_lp != NULL};
    (*cnt)++;
    if (*cnt > nb) {
        /* drop the worst (the first added on ties); worst = the next one */
        size_t w = 0;
        for (size_t i = 1; i < *cnt; i++)
            if (h[i].score < h[w].score) w = i;
        use[h[w].slot] = 0;
        memmove(h + w, h + w + 1, (*cnt - w - 1) * sizeof *h);
        (*cnt)--;
        double m = h[0].score;
        for (size_t i = 1; i < *cnt; i++)
            if (h[i].score < m) m = h[i].score;
        bs->worst[it] = m;
    } else if (score < bs->worst[it]) {
        bs->worst[it] = score;
    }
}

/* BeamHypotheses.is_done */
static int hyp_done(const beam_state *bs, size_t it, double best_sum, size_t cur_len) {
    if (bs->hcnt[it] < bs->nb) return 0;
    if (bs->early) return 1;
    return bs->worst[it] >= best_sum / pow((double)cur_len, bs->lenpen);
}

/* Index (in insertion order) of the best kept hypothesis, ties to the later added. */
static size_t hyp_best(const bhyp *h, size_t cnt, const uint8_t *taken) {
    size_t best = SIZE_MAX;
    for (size_t i = 0; i < cnt; i++) {
        if (taken && taken[i]) continue;
        if (best == SIZE_MAX || h[i].score >= h[best].score) best = i;
    }
    return best;
}

typedef struct beam_ban {
    beam_state *bs;
    int ban_unk;
    int no_repeat_ngram;
    const int32_t *seq; /* [N x cap] tokens of the live beams (the current seq array: set every step) */
    size_t ntok;        /* tokens of every live beam before this step */
} beam_ban;

/* log_softmax (fp32, whole vocabulary), unk and the beam's repeated n-grams
 * -> -inf, + the row's beam score; the row's kk best (score, token)
 * (row-local top-k: an item's best 2 * beam are among its rows' best
 * 2 * beam each) */
static void beam_row(void *ctx, size_t i, float *lg) {
    beam_ban *bb = ctx;
    beam_state *bs = bb->bs;
    const size_t V = bs->V, kk = bs->kk;
    nz_log_softmax(lg, 1, V);
    if (bb->ban_unk) lg[NZ_T5MD_UNK] = -INFINITY;
    if (bb->no_repeat_ngram) ban_repeated_ngrams(lg, bb->seq + i * bs->cap, bb->ntok, bb->no_repeat_ngram);
    float *s = bs->tmp;
    const float b = bs->bscore[i];
    for (size_t v = 0; v < V; v++) s[v] = lg[v] + b;
    uint32_t *ct = bs->ctok + i * kk;
    nz_topk(s, V, kk, ct, bs->cval + i * kk);
    for (size_t q = 0; q < kk; q++) bs->clp[i * kk + q] = lg[ct[q]];
}

/* Deliver the best hypothesis of item it to the streaming hook. */
static void beam_emit(const beam_state *bs, const nz_t5md_opts *o, size_t it, size_t context, int k) {
    if (!o->on_token) return;
    const size_t nb = bs->nb, W = bs->cap + 1;
    const bhyp *h = bs->hy + it * (nb + 1);
    const size_t b = hyp_best(h, bs->hcnt[it], NULL);
    if (b == SIZE_MAX) return;
    const int32_t *tok = bs->htok + (it * (nb + 1) + h[b].slot) * W;
    const float *lp = bs->hlp + (it * (nb + 1) + h[b].slot) * W;
    for (size_t p = 0; p < h[b].n; p++) o->on_token(o->token_arg, context, k, p, tok[p], lp[p]);
}

static int beam_search(nz_matmul_ctx *mc, const nz_t5md *t, const nz_t5md_enc *enc, const size_t *valid,
                       const nz_t5md_opts *o, const int *decs, size_t D, nz_t5md_result *res, nz_error *err) {
    int rc = NZ_OK;
    const size_t Bv = enc->B, items = Bv * D, nb = (size_t)o->beam_size, N0 = items * nb, V = t->c.vocab;
    const size_t mnt = (size_t)o->max_new_tokens, max_length = 1 + mnt, cap = mnt ? mnt : 1, W = cap + 1;
    const size_t R = (size_t)o->num_return, kk = 2 * nb < V ? 2 * nb : V;
    run r;
    memset(&r, 0, sizeof r);
    beam_state bs;
    memset(&bs, 0, sizeof bs);
    int32_t *cur = NULL, *seq = NULL, *seq2 = NULL;
    float *seqlp = NULL, *seqlp2 = NULL, *bscore = NULL, *bscore2 = NULL;
    size_t *act = NULL;
    uint32_t *order = NULL;
    uint8_t *done = NULL, *taken = NULL;
    beam_cand *pool = NULL, *nxt = NULL;
    NZ_TRY(run_init(mc, &r, t, enc, decs, D, N0, cap, err));
    bs.nb = nb;
    bs.cap = cap;
    bs.V = V;
    bs.kk = kk;
    bs.lenpen = o->length_penalty;
    bs.early = o->early_stopping != 0;
    bs.hy = nz_malloc(items * (nb + 1) * sizeof *bs.hy, NZ_MEM_ACTIVATIONS);
    bs.hcnt = nz_calloc(items, sizeof *bs.hcnt, NZ_MEM_ACTIVATIONS);
    bs.worst = nz_malloc(items * sizeof *bs.worst, NZ_MEM_ACTIVATIONS);
    bs.slot_use = nz_calloc(items * (nb + 1), 1, NZ_MEM_ACTIVATIONS);
    bs.htok = nz_malloc(items * (nb + 1) * W * sizeof *bs.htok, NZ_MEM_ACTIVATIONS);
    bs.hlp = nz_malloc(items * (nb + 1) * W * sizeof *bs.hlp, NZ_MEM_ACTIVATIONS);
    bs.ctok = nz_malloc(N0 * kk * sizeof *bs.ctok, NZ_MEM_ACTIVATIONS);
    bs.cval = nz_malloc(N0 * kk * sizeof *bs.cval, NZ_MEM_ACTIVATIONS);
    bs.clp = nz_malloc(N0 * kk * sizeof *bs.clp, NZ_MEM_ACTIVATIONS);
    bs.tmp = nz_malloc(V * sizeof *bs.tmp, NZ_MEM_ACTIVATIONS);
    cur = nz_malloc(N0 * sizeof *cur, NZ_MEM_ACTIVATIONS);
    seq = nz_malloc(N0 * cap * sizeof *seq, NZ_MEM_ACTIVATIONS);
    seq2 = nz_malloc(N0 * cap * sizeof *seq2, NZ_MEM_ACTIVATIONS);
    seqlp = nz_malloc(N0 * cap * sizeof *seqlp, NZ_MEM_ACTIVATIONS);
    seqlp2 = nz_malloc(N0 * cap * sizeof *seqlp2, NZ_MEM_ACTIVATIONS);
    bscore = nz_malloc(N0 * sizeof *bscore, NZ_MEM_ACTIVATIONS);
    bscore2 = nz_malloc(N0 * sizeof *bscore2, NZ_MEM_ACTIVATIONS);
    act = nz_malloc(items * sizeof *act, NZ_MEM_ACTIVATIONS);
    order = nz_malloc(N0 * sizeof *order, NZ_MEM_ACTIVATIONS);
    done = nz_calloc(items, 1, NZ_MEM_ACTIVATIONS);
    taken = nz_malloc(nb + 1, NZ_MEM_ACTIVATIONS);
    pool = nz_malloc(nb * kk * sizeof *pool, NZ_MEM_ACTIVATIONS);
    nxt = nz_malloc(N0 * sizeof *nxt, NZ_MEM_ACTIVATIONS);
    if (!bs.hy || !bs.hcnt || !bs.worst || !bs.slot_use || !bs.htok || !bs.hlp || !bs.ctok || !bs.cval ||
        !bs.clp || !bs.tmp || !cur || !seq || !seq2 || !seqlp || !seqlp2 || !bscore || !bscore2 || !act ||
        !order || !done || !taken || !pool || !nxt)
        NZ_FAIL(NZ_E_NOMEM, "out of memory for beam search (%zu rows of up to %zu tokens)", N0, mnt);
    /* item j * Bv + b (decoder decs[j], source b), its rows item * nb + beam */
    for (size_t it = 0; it < items; it++) {
        act[it] = it;
        bs.worst[it] = 1e9;
        for (size_t m = 0; m < nb; m++) {
            const size_t row = it * nb + m;
            r.src[row] = (uint32_t)(it % Bv);
            r.dj[row] = (uint32_t)(it / Bv);
            cur[row] = NZ_T5MD_START;
            bscore[row] = m ? -1e9f : 0.0f;
        }
    }
    size_t A = items, cur_len = 1;
    beam_ban bb = {&bs, o->ban_unk, o->no_repeat_ngram, NULL, 0};
    for (;;) {
        if (o->stop && o->stop(o->stop_arg))
            NZ_FAIL(NZ_E_CANCELLED, "generation cancelled before step %zu", cur_len - 1);
        NZ_TRY(run_step(mc, &r, cur, err));
        const size_t ntok = cur_len - 1; /* tokens of every live beam before this step */
        bs.bscore = bscore;
        bb.seq = seq; /* row a * nb + m: beam m of the a-th live item (seq / seq2 swap every step) */
        bb.ntok = ntok;
        NZ_TRY(project(mc, t, r.x, r.N, beam_row, &bb, err));
        size_t A2 = 0;
        for (size_t a = 0; a < A; a++) {
            const size_t it = act[a];
            size_t np = 0;
            for (size_t m = 0; m < nb; m++) {
                const size_t row = a * nb + m;
                for (size_t q = 0; q < kk; q++)
                    pool[np++] = (beam_cand){bs.cval[row * kk + q], (uint32_t)(m * V + bs.ctok[row * kk + q]),
                                             bs.clp[row * kk + q]};
            }
            qsort(pool, np, sizeof *pool, cand_cmp);
            const size_t top = 2 * nb < np ? 2 * nb : np;
            size_t bi = 0;
            for (size_t rank = 0; rank < top; rank++) {
                const beam_cand *c = &pool[rank];
                const size_t tok = c->flat % V, row = a * nb + c->flat / V;
                if (tok == NZ_T5MD_EOS) {
                    if (rank >= nb) continue;
                    hyp_add(&bs, it, cur_len, (double)c->s, seq + row * cap, seqlp + row * cap, ntok, &c->lp);
                } else {
                    nxt[a * nb + bi] = (beam_cand){c->s, (uint32_t)(row * V + tok), c->lp};
                    bi++;
                }
                if (bi == nb) break;
            }
            if (bi < nb)
                NZ_FAIL(NZ_E_RANGE,
                        "beam search: fewer than beam_size %zu non-eos candidates (vocabulary %zu)", nb, V);
            done[it] = (uint8_t)hyp_done(&bs, it, (double)pool[0].s, cur_len);
            if (done[it]) {
                beam_emit(&bs, o, it, valid[it % Bv], decs[it / Bv]);
                continue;
            }
            /* the item goes on: its nb new beams */
            for (size_t m = 0; m < nb; m++) {
                const beam_cand *c = &nxt[a * nb + m];
                const size_t parent = c->flat / V, row2 = A2 * nb + m;
                const int32_t tok = (int32_t)(c->flat % V);
                order[row2] = (uint32_t)parent;
                memcpy(seq2 + row2 * cap, seq + parent * cap, ntok * sizeof *seq);
                memcpy(seqlp2 + row2 * cap, seqlp + parent * cap, ntok * sizeof *seqlp);
                if (ntok < cap) {
                    seq2[row2 * cap + ntok] = tok;
                    seqlp2[row2 * cap + ntok] = c->lp;
                }
                bscore2[row2] = c->s;
                cur[row2] = tok;
            }
            act[A2++] = it; /* A2 <= a: in place */
        }
        int32_t *ts = seq;
        seq = seq2;
        seq2 = ts;
        float *tl = seqlp;
        seqlp = seqlp2;
        seqlp2 = tl;
        tl = bscore;
        bscore = bscore2;
        bscore2 = tl;
        A = A2;
        cur_len++;
        if (!A || cur_len >= max_length) break;
        NZ_TRY(run_select(&r, order, A * nb, err));
    }
    /* items not done: their live beams are offered (no eos) */
    for (size_t a = 0; a < A; a++) {
        const size_t it = act[a];
        const size_t ntok = cur_len - 1 < cap ? cur_len - 1 : cap;
        for (size_t m = 0; m < nb; m++) {
            const size_t row = a * nb + m;
            hyp_add(&bs, it, cur_len, (double)bscore[row], seq + row * cap, seqlp + row * cap, ntok, NULL);
        }
        beam_emit(&bs, o, it, valid[it % Bv], decs[it / Bv]);
    }
    /* the best R of every item, best first (ties: the later added) */
    for (size_t it = 0; it < items; it++) {
        const bhyp *h = bs.hy + it * (nb + 1);
        memset(taken, 0, nb + 1);
        for (size_t q = 0; q < R; q++) {
            nz_t5md_result *re = &res[(valid[it % Bv] * D + it / Bv) * R + q];
            const size_t b = hyp_best(h, bs.hcnt[it], taken);
            if (b == SIZE_MAX) {
                re->rc = nz_fail(&re->err, NZ_E_RANGE, "beam search kept only %zu hypotheses", bs.hcnt[it]);
                continue;
            }
            taken[b] = 1;
            const size_t at = (it * (nb + 1) + h[b].slot) * W;
            NZ_TRY(set_result(re, bs.htok + at, bs.hlp + at, h[b].n, h[b].fin, err));
            re->beam_score = h[b].score;
        }
    }
done:
    run_free(&r);
    nz_free(bs.hy);
    nz_free(bs.hcnt);
    nz_free(bs.worst);
    nz_free(bs.slot_use);
    nz_free(bs.htok);
    nz_free(bs.hlp);
    nz_free(bs.ctok);
    nz_free(bs.cval);
    nz_free(bs.clp);
    nz_free(bs.tmp);
    nz_free(cur);
    nz_free(seq);
    nz_free(seq2);
    nz_free(seqlp);
    nz_free(seqlp2);
    nz_free(bscore);
    nz_free(bscore2);
    nz_free(act);
    nz_free(order);
    nz_free(done);
    nz_free(taken);
    nz_free(pool);
    nz_free(nxt);
    return rc;
}

/* beam_search's peak over B encoder rows of S and D decoders: the run of items x beam rows, the search's
 * buffers, and the largest of a step, the projection, a run_select and the results. */
static double beam_search_peak(const nz_t5md *t, double B, double S, double D, const nz_t5md_opts *o) {
    const double items = B * D, nb = (double)o->beam_size, N0 = items * nb, V = (double)t->c.vocab;
    const double mnt = (double)o->max_new_tokens, cap = mnt ? mnt : 1, W = cap + 1;
    const double kk = 2 * nb < V ? 2 * nb : V, R = (double)o->num_return;
    double build, held = run_bytes(t, B, S, D, N0, cap, &build);
    const double bufs = sizeof(bhyp) * items * (nb + 1)       /* hy */
                        + 8 * items + 8 * items               /* hcnt, worst */
                        + items * (nb + 1)                    /* slot_use */
                        + 2 * (4 * items * (nb + 1) * W)      /* htok, hlp */
                        + 3 * (4 * N0 * kk)                   /* ctok, cval, clp */
                        + 4 * V + 4 * N0                      /* tmp, cur */
                        + 4 * (4 * N0 * cap)                  /* seq, seq2, seqlp, seqlp2 */
                        + 4 * N0 * 2                          /* bscore, bscore2 */
                        + 8 * items + 4 * N0 + items          /* act, order, done */
                        + (nb + 1)                            /* taken */
                        + sizeof(beam_cand) * (nb * kk + N0); /* pool, nxt */
    const int tr = t->c.kind == NZ_T5MD_TRANSFORMER;
    double step = step_peak(t, tr ? B * nb : N0, B * nb, B, S, cap);
    step = dmax(step, dmax(project_peak(t, N0), select_peak(t, N0, cap)));
    /* set_result: R per item, tokens and logprobs of <= cap + 1 tokens (NZ_MEM_OTHER) */
    const double results = items * R * 2 * (4 * (cap + 1) + 1);
    return dmax(build, held + bufs + dmax(step, results));
}

/* ------------------------------------------------------------------ generate */

static int check_opts(const nz_t5md *t, const nz_t5md_opts *o, nz_error *err) {
    if (o->strategy != NZ_T5MD_GREEDY && o->strategy != NZ_T5MD_BEAM && o->strategy != NZ_T5MD_SAMPLE)
        return nz_fail(err, NZ_E_INVALID_ARG, "unknown decoding strategy %d", (int)o->strategy);
    if (o->max_new_tokens < 0 || o->max_new_tokens > NZ_T5MD_MAX_NEW_TOKENS)
        return nz_fail(err, NZ_E_RANGE, "max_new_tokens %d is outside [0, %d]", o->max_new_tokens,
                       NZ_T5MD_MAX_NEW_TOKENS);
    if (o->n_decoders && !o->decoders)
        return nz_fail(err, NZ_E_INVALID_ARG, "%zu decoders requested with a NULL list", o->n_decoders);
    if (o->n_decoders > 65536)
        return nz_fail(err, NZ_E_RANGE, "%zu decoders requested (at most 65536)", o->n_decoders);
    for (size_t j = 0; o->decoders && j < o->n_decoders; j++)
        if (o->decoders[j] < 0 || (size_t)o->decoders[j] >= t->c.num_modes)
            return nz_fail(err, NZ_E_RANGE, "decoder %d is out of range (the model has %zu decoders)",
                           o->decoders[j], t->c.num_modes);
    if (o->strategy == NZ_T5MD_BEAM) {
        if (o->beam_size < 1 || o->beam_size > NZ_T5MD_MAX_BEAM)
            return nz_fail(err, NZ_E_RANGE, "beam_size %d is outside [1, %d]", o->beam_size,
                           NZ_T5MD_MAX_BEAM);
        if (o->num_return < 1 || o->num_return > o->beam_size)
            return nz_fail(err, NZ_E_RANGE, "num_return %d is outside [1, beam_size %d]", o->num_return,
                           o->beam_size);
        if (!isfinite(o->length_penalty))
            return nz_fail(err, NZ_E_INVALID_ARG, "length_penalty %g is not finite", o->length_penalty);
    }
    if (o->no_repeat_ngram < 0 || o->no_repeat_ngram > NZ_T5MD_MAX_NEW_TOKENS)
        return nz_fail(err, NZ_E_RANGE,
                       "no_repeat_ngram %d is outside [0, %d] (0 = off; longer n-grams cannot repeat)",
                       o->no_repeat_ngram, NZ_T5MD_MAX_NEW_TOKENS);
    if (o->strategy == NZ_T5MD_SAMPLE && (isnan(o->temperature) || isnan(o->top_p)))
        return nz_fail(err, NZ_E_INVALID_ARG, "temperature and top_p must be numbers");
    return NZ_OK;
}

int nz_t5md_generate(nz_matmul_ctx *mc, const nz_t5md *t, const int32_t *const *src, const size_t *len,
                     size_t B, const nz_t5md_opts *o, nz_t5md_result *res, nz_error *err) {
    int rc = NZ_OK;
    nz_t5md_opts def;
    if (!o) {
        nz_t5md_opts_default(&def);
        o = &def;
    }
    const size_t D = n_decoders(t, o),
                 R = o->strategy == NZ_T5MD_BEAM && o->num_return > 1 ? (size_t)o->num_return : 1;
    const size_t NR = B * D * R;
    int *decs = NULL;
    size_t *valid = NULL, nv = 0;
    const int32_t **vsrc = NULL;
    size_t *vlen = NULL;
    nz_t5md_enc enc;
    memset(&enc, 0, sizeof enc);
    for (size_t i = 0; i < NR; i++) {
        memset(&res[i], 0, sizeof res[i]);
        res[i].context = i / (D * R);
        res[i].beam_score = NAN;
    }
    NZ_TRY(check_opts(t, o, err));
    decs = nz_malloc(D * sizeof *decs + 1, NZ_MEM_ACTIVATIONS);
    valid = nz_malloc(B * sizeof *valid + 1, NZ_MEM_ACTIVATIONS);
    vsrc = nz_malloc(B * sizeof *vsrc + 1, NZ_MEM_ACTIVATIONS);
    vlen = nz_malloc(B * sizeof *vlen + 1, NZ_MEM_ACTIVATIONS);
    if (!decs || !valid || !vsrc || !vlen) NZ_FAIL(NZ_E_NOMEM, "out of memory for the batch");
    for (size_t j = 0; j < D; j++) decs[j] = o->decoders && o->n_decoders ? o->decoders[j] : (int)j;
    for (size_t i = 0; i < NR; i++) res[i].decoder = decs[(i / R) % D];
    for (size_t b = 0; b < B; b++) {
        nz_error e;
        int crc = nz_t5md_check_source(t, src[b], len[b], &e);
        if (crc) {
            for (size_t i = b * D * R; i < (b + 1) * D * R; i++) {
                res[i].rc = crc;
                res[i].err = e;
            }
            continue;
        }
        vsrc[nv] = src[b];
        vlen[nv] = len[b];
        valid[nv++] = b;
    }
    if (!nv || !D) goto done;
    NZ_TRY(nz_t5md_encode(mc, t, vsrc, vlen, nv, &enc, err));
    if (o->strategy == NZ_T5MD_BEAM)
        NZ_TRY(beam_search(mc, t, &enc, valid, o, decs, D, res, err));
    else
        NZ_TRY(autoregress(mc, t, &enc, valid, o, decs, D, res, err));
done:
    if (rc) fail_all(res, NR, err);
    nz_t5md_enc_free(&enc);
    nz_free(decs);
    nz_free(valid);
    nz_free(vsrc);
    nz_free(vlen);
    return rc;
}

uint64_t nz_t5md_peak_bytes(const nz_t5md *t, const size_t *len, size_t B, const nz_t5md_opts *o) {
    nz_t5md_opts def;
    if (!o) {
        nz_t5md_opts_default(&def);
        o = &def;
    }
    nz_error e;
    if (check_opts(t, o, &e)) return 0; /* refused before any allocation */
    const double D = (double)n_decoders(t, o), dB = (double)B;
    const double base = 4 * D + 1 + 3 * (8 * dB + 1); /* decs, valid, vsrc, vlen */
    /* the contexts that can pass nz_t5md_check_source: the encoder's batch and width */
    size_t Bv = 0, S = 0;
    for (size_t b = 0; b < B; b++)
        if (len[b] >= 1 && len[b] <= NZ_T5MD_MAX_SOURCE) {
            Bv++;
            if (len[b] > S) S = len[b];
        }
    if (!Bv || !D) return nz_mem_bytes(base);
    const double dBv = (double)Bv, dS = (double)S;
    const double gen =
        o->strategy == NZ_T5MD_BEAM ? beam_search_peak(t, dBv, dS, D, o) : autoregress_peak(t, dBv, dS, D, o);
    return nz_mem_bytes(base + dmax(encode_peak(&t->c, dBv, dS), enc_bytes(&t->c, dBv, dS) + gen));
}

/* ------------------------------------------------------------------ tokenizer */

int nz_t5md_tok_load(const nz_model *m, const nz_t5md_config *c, nz_t5md_tok **out, nz_error *err) {
    *out = NULL;
    const uint8_t *data = NULL;
    size_t size = 0;
    int rc = nz_model_blob(m, "spm.model", &data, &size, err);
    if (rc) return rc == NZ_E_NOT_FOUND ? nz_fail(err, rc, "the model has no embedded spm.model") : rc;
    nz_t5md_tok *tk = nz_calloc(1, sizeof *tk, NZ_MEM_OTHER);
    if (!tk) return nz_fail(err, NZ_E_NOMEM, "out of memory for the tokenizer");
    rc = nz_spm_load(data, size, &tk->sp, err);
    if (rc) {
        nz_fail_prefix(err, "spm.model: ");
        goto done;
    }
    tk->count = nz_spm_piece_count(tk->sp);
    for (size_t i = 0, l = 0; i < tk->count; i++)
        if (nz_spm_id_to_piece(tk->sp, (int32_t)i, &l) && l > tk->max_piece) tk->max_piece = l;
    if (nz_spm_unk_id(tk->sp) != NZ_T5MD_UNK)
        NZ_FAIL(NZ_E_FORMAT, "spm.model: unk id is %d, not a T5-id SentencePiece model (pad 0, eos 1, unk 2)",
                (int)nz_spm_unk_id(tk->sp));
    tk->sep = -1;
    if (c->turn_separator[0]) {
        tk->sep = nz_spm_piece_to_id(tk->sp, c->turn_separator, strlen(c->turn_separator));
        if (tk->sep == NZ_T5MD_UNK)
            NZ_FAIL(NZ_E_FORMAT, "config.json: turn separator \"%s\" is not a piece of spm.model",
                    c->turn_separator);
    }
    tk->max_turns = c->max_context_turns;
    tk->max_src = c->max_source_length;
    *out = tk;
    return NZ_OK;
done:
    nz_t5md_tok_free(tk);
    return rc;
}

void nz_t5md_tok_free(nz_t5md_tok *tk) {
    if (!tk) return;
    nz_spm_free(tk->sp);
    nz_free(tk);
}

/* Python's str.isspace() code points (Unicode White_Space and the ASCII separators 0x1c..0x1f). */
static int py_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 ||
           cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f ||
           cp == 0x205f || cp == 0x3000;
}

/* Decode the UTF-8 character at s[0..n): its code point and byte length, or
 * length 0 when the bytes are not a valid character. */
static size_t utf8_char(const unsigned char *s, size_t n, uint32_t *cp) {
    if (!n) return 0;
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    size_t k = (s[0] & 0xe0) == 0xc0 ? 2 : (s[0] & 0xf0) == 0xe0 ? 3 : (s[0] & 0xf8) == 0xf0 ? 4 : 0;
    if (!k || k > n) return 0;
    uint32_t v = s[0] & (0x7f >> k);
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        v = (v << 6) | (s[i] & 0x3f);
    }
    *cp = v;
    return k;
}

/* str.strip(): [*b, *e) of s[0..n) without surrounding whitespace. */
static void py_strip(const char *str, size_t n, size_t *b, size_t *e) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, j = n;
    uint32_t cp = 0;
    for (;;) {
        size_t k = utf8_char(s + i, j - i, &cp);
        if (!k || !py_space(cp)) break;
        i += k;
    }
    while (j > i) {
        size_t st = j - 1;
        while (st > i && j - st < 4 && (s[st] & 0xc0) == 0x80) st--;
        size_t k = utf8_char(s + st, j - st, &cp);
        if (!k || st + k != j || !py_space(cp)) break;
        j = st;
    }
    *b = i;
    *e = j;
}

/* Room for need more ids in the growing array *ids of *cap. */
static int ids_reserve(int32_t **ids, size_t cnt, size_t need, size_t *cap, nz_error *err) {
    if (cnt + need <= *cap) return NZ_OK;
    size_t nc = (cnt + need) * 2;
    int32_t *q = nz_realloc(*ids, nc * sizeof *q);
    if (!q) return nz_fail(err, NZ_E_NOMEM, "out of memory encoding a context");
    *ids = q;
    *cap = nc;
    return NZ_OK;
}

/* Append the SentencePiece ids of text[0..n) to the growing array *ids. */
static int append_encoded(const nz_t5md_tok *tk, const char *text, size_t n, int32_t **ids, size_t *cnt,
                          size_t *cap, nz_error *err) {
    nz_spm_pieces *p = NULL;
    int rc = nz_spm_encode(tk->sp, text, n, &p, err);
    if (!rc) rc = ids_reserve(ids, *cnt, p->n, cap, err);
    if (!rc)
        for (size_t i = 0; i < p->n; i++) (*ids)[(*cnt)++] = p->id[i];
    nz_spm_pieces_free(p);
    return rc;
}

int nz_t5md_encode_context(const nz_t5md_tok *tk, const char *const *turns, const size_t *lens,
                           size_t n_turns, int32_t **ids, size_t *n, nz_error *err) {
    int rc = NZ_OK;
    *ids = NULL;
    *n = 0;
    size_t cap = 16, cnt = 0;
    char *joined = NULL;
    int32_t *out = nz_malloc(cap * sizeof *out, NZ_MEM_OTHER);
    if (!out) return nz_fail(err, NZ_E_NOMEM, "out of memory encoding a context");
    if (n_turns && !turns) NZ_FAIL(NZ_E_INVALID_ARG, "encode context: NULL turns");
    const size_t first = tk->max_turns && n_turns > tk->max_turns ? n_turns - tk->max_turns : 0;
    if (tk->sep < 0) {
        /* " ".join(stripped turns), encoded once */
        size_t total = 1;
        for (size_t i = first; i < n_turns; i++) total += (lens ? lens[i] : strlen(turns[i])) + 1;
        joined = nz_malloc(total, NZ_MEM_ACTIVATIONS);
        if (!joined) NZ_FAIL(NZ_E_NOMEM, "out of memory encoding a context");
        size_t jl = 0;
        for (size_t i = first; i < n_turns; i++) {
            size_t b, e;
            py_strip(turns[i], lens ? lens[i] : strlen(turns[i]), &b, &e);
            if (i > first) joined[jl++] = ' ';
            memcpy(joined + jl, turns[i] + b, e - b);
            jl += e - b;
        }
        NZ_TRY(append_encoded(tk, joined, jl, &out, &cnt, &cap, err));
    } else {
        for (size_t i = first; i < n_turns; i++) {
            size_t b, e;
            py_strip(turns[i], lens ? lens[i] : strlen(turns[i]), &b, &e);
            if (i > first) {
                NZ_TRY(ids_reserve(&out, cnt, 1, &cap, err));
                out[cnt++] = tk->sep;
            }
            NZ_TRY(append_encoded(tk, turns[i] + b, e - b, &out, &cnt, &cap, err));
        }
    }
    if (tk->max_src && cnt > tk->max_src - 1) {
        const size_t keep = tk->max_src - 1;
        memmove(out, out + (cnt - keep), keep * sizeof *out);
        cnt = keep;
    }
    NZ_TRY(ids_reserve(&out, cnt, 1, &cap, err));
    out[cnt++] = NZ_T5MD_EOS;
    *ids = out;
    *n = cnt;
    out = NULL;
done:
    nz_free(out);
    nz_free(joined);
    return rc;
}

int nz_t5md_decode_text(const nz_t5md_tok *tk, const int32_t *ids, size_t n, char **text, size_t *len,
                        nz_error *err) {
    *text = NULL;
    if (len) *len = 0;
    const char **pieces = nz_malloc(n * sizeof *pieces + 1, NZ_MEM_ACTIVATIONS);
    size_t *plen = nz_malloc(n * sizeof *plen + 1, NZ_MEM_ACTIVATIONS);
    int rc = NZ_OK;
    if (!pieces || !plen) {
        rc = nz_fail(err, NZ_E_NOMEM, "out of memory decoding a response");
    } else {
        size_t k = 0;
        for (size_t i = 0; i < n && ids[i] != NZ_T5MD_EOS; i++) {
            if (ids[i] == NZ_T5MD_PAD || ids[i] == NZ_T5MD_UNK || ids[i] < 0 || (size_t)ids[i] >= tk->count)
                continue;
            pieces[k] = nz_spm_id_to_piece(tk->sp, ids[i], &plen[k]);
            if (pieces[k]) k++;
        }
        /* DecodePieces drops control pieces (<sep>, <mask>, ...) itself */
        rc = nz_spm_decode_pieces(tk->sp, pieces, plen, k, text, len, err);
    }
    nz_free(pieces);
    nz_free(plen);
    return rc;
}

size_t nz_t5md_decode_text_bound(const nz_t5md_tok *tk, size_t n) {
    /* SentencePiece's decoding does not lengthen a piece ("▁" becomes a space, a byte piece one byte);
     * 5 bytes at least: an unknown piece's " ⁇ " */
    return n * (tk->max_piece > 5 ? tk->max_piece : 5);
}
