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
 *   different sizes, so the decoder blocks are t5md_run sublayer by sublayer here
 *   with the nz_layer.h pieces.
 */
#include "nz_t5md_int.h"

#include "nz_mconfig.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* nz_t5md_encode's output for B x S: x (B S d floats), pad (B S bytes), len (B size_t). */
double t5md_enc_bytes(const nz_t5md_config *c, double B, double S) {
    return 4 * B * S * (double)c->d_model + B * S + 8 * B;
}

/* nz_t5md_encode's peak: its output, ids (B S int32), the position bias (H S S floats), and the larger of
 * nz_embed's flags (B S bytes) and one nz_block_fwd (h, y: 2 M d floats + 1; then stateless self attention
 * or the FFN; no cross attention, no adapter). */
double t5md_encode_peak(const nz_t5md_config *c, double B, double S) {
    const double M = B * S, d = (double)c->d_model, I = (double)c->inner;
    const double block = 8 * M * d + 1 + t5md_dmax(nz_attn_self_peak(B, S, I, 0, S), t5md_ffn_peak(c, M));
    return t5md_enc_bytes(c, B, S) + 4 * M + 4 * (double)c->num_heads * S * S +
           t5md_dmax(t5md_dmax(M, 1), block);
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
int t5md_set_result(nz_t5md_result *r, const int32_t *tok, const float *lp, size_t n, int fin,
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
    return r->rc || isnan(key == NZ_T5MD_RANK_BEAM_SCORE  ? r->beam_score
                          : key == NZ_T5MD_RANK_CONSENSUS ? r->consensus
                                                          : r->mean_logprob);
}

/* Occurrences of the n-gram a[0..n) in s[0..ns). */
static size_t ngram_count(const int32_t *a, size_t n, const int32_t *s, size_t ns) {
    size_t c = 0;
    for (size_t i = 0; i + n <= ns; i++) c += !memcmp(a, s + i, n * sizeof *s);
    return c;
}

double nz_t5md_agreement(const int32_t *h, size_t nh, const int32_t *r, size_t nr) {
    if (!nh) return 0.0;
    double logp = 0.0;
    for (size_t n = 1; n <= 4; n++) {
        size_t match = 0, total = nh >= n ? nh - n + 1 : 0;
        for (size_t i = 0; i < total; i++) {
            size_t first = 1; /* count each distinct n-gram of h once, at its first position */
            for (size_t j = 0; j < i && first; j++) first = memcmp(h + j, h + i, n * sizeof *h) != 0;
            if (!first) continue;
            size_t ch = ngram_count(h + i, n, h, nh), cr = ngram_count(h + i, n, r, nr);
            match += ch < cr ? ch : cr;
        }
        if (n == 1) {
            if (!match) return 0.0;
            logp += log((double)match / (double)total);
        } else {
            logp += log((double)(match + 1) / (double)(total + 1));
        }
    }
    const double bp = 1.0 - (double)nr / (double)nh;
    return exp(logp / 4.0 + (bp < 0.0 ? bp : 0.0));
}

/* Tokens of a result without its final eos. */
static size_t content_len(const nz_t5md_result *r) { return r->n - (r->finished && r->n ? 1 : 0); }

void nz_t5md_consensus(nz_t5md_result *res, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (res[i].rc) {
            res[i].consensus = NAN;
            continue;
        }
        double sum = 0.0;
        size_t others = 0;
        for (size_t j = 0; j < n; j++) {
            if (j == i || res[j].rc) continue;
            sum +=
                nz_t5md_agreement(res[i].tokens, content_len(&res[i]), res[j].tokens, content_len(&res[j]));
            others++;
        }
        res[i].consensus = others ? sum / (double)others : 0.0;
    }
}

void nz_t5md_consensus_pool(nz_t5md_result *res, size_t D, size_t R) {
    nz_t5md_consensus(res, D * R);
    for (size_t j = 0; j < D; j++) {
        size_t best = j * R;
        for (size_t r = 1; r < R; r++) {
            const double c = res[j * R + r].consensus, cb = res[best].consensus;
            if (!isnan(c) && (isnan(cb) || c > cb)) best = j * R + r; /* NAN: an errored return */
        }
        const nz_t5md_result t = res[j]; /* j <= j * R: an earlier decoder's return not chosen (or itself) */
        res[j] = res[best];
        res[best] = t;
    }
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
            else if (key == NZ_T5MD_RANK_CONSENSUS)
                swap = b->consensus > a->consensus ||
                       (b->consensus == a->consensus && b->mean_logprob > a->mean_logprob);
            else
                swap = b->mean_logprob > a->mean_logprob;
            if (!swap) break;
            size_t tmp = order[j];
            order[j] = order[j - 1];
            order[j - 1] = tmp;
        }
}

/* ------------------------------------------------------------------ generate */

int t5md_check_opts(const nz_t5md *t, const nz_t5md_opts *o, nz_error *err) {
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
        res[i].beam_score = res[i].consensus = NAN;
    }
    NZ_TRY(t5md_check_opts(t, o, err));
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
        NZ_TRY(t5md_beam_search(mc, t, &enc, valid, o, decs, D, res, err));
    else
        NZ_TRY(t5md_autoregress(mc, t, &enc, valid, o, decs, D, res, err));
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
    if (t5md_check_opts(t, o, &e)) return 0; /* refused before any allocation */
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
    const double gen = o->strategy == NZ_T5MD_BEAM ? t5md_beam_search_peak(t, dBv, dS, D, o)
                                                   : t5md_autoregress_peak(t, dBv, dS, D, o);
    return nz_mem_bytes(base +
                        t5md_dmax(t5md_encode_peak(&t->c, dBv, dS), t5md_enc_bytes(&t->c, dBv, dS) + gen));
}
