/*
 * nz_nat.c — fairseq CMLM mask-predict + AT decoder (see nz_nat.h): config, binding, the encoder and the
 * decoder forward pieces (the AT decoding is in nz_nat_at.c, mask-predict in nz_nat_mp.c).
 *
 * Layout of the maths (all batch-first, rows of D floats):
 *   encoder      x = scale * E[src] + pos(src) [+ layernorm_embedding]; pad rows
 *                zeroed; layers (self-attention with key padding); [layer_norm]
 *   CMLM decoder x = scale * E[tok] + pos(tok) (no layernorm_embedding, as
 *                fairseq's NATransformerDecoder.forward_embedding); layers with
 *                key padding (not causal) and cross-attention; [layer_norm];
 *                logits = x E^T (tied)
 *   AT decoder   as fairseq's TransformerDecoder: layernorm_embedding applies,
 *                causal self-attention, incremental with a KV cache
 */
#include "nz_nat_int.h"

#include "nz_alloc.h"
#include "nz_mconfig.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ config */

/* Fill c from config.json (nat_ref.ARCH_DEFAULTS for absent keys); refuse
 * what the engine does not implement. */
static int read_config(const json_t *j, nz_nat_config *c, nz_error *err) {
    int rc = NZ_OK, v;
    memset(c, 0, sizeof *c);
    if (!json_is_object(j)) NZ_FAIL(NZ_E_FORMAT, "model has no config.json object");
    const json_t *arch = nz_cfg_get(j, "architecture");
    if (!json_is_string(arch) || strcmp(json_string_value(arch), "cmlm_transformer"))
        NZ_FAIL(NZ_E_UNSUPPORTED, "config.json: 'architecture' is %s%s%s, expected \"cmlm_transformer\"",
                json_is_string(arch) ? "\"" : "", json_is_string(arch) ? json_string_value(arch) : "missing",
                json_is_string(arch) ? "\"" : "");
    size_t dec_dim = 0;
    NZ_TRY(nz_cfg_size(j, "encoder_embed_dim", 512, 0, &c->d_model, err));
    NZ_TRY(nz_cfg_size(j, "encoder_ffn_embed_dim", 2048, 0, &c->enc_ffn, err));
    NZ_TRY(nz_cfg_size(j, "encoder_layers", 6, 0, &c->enc_layers, err));
    NZ_TRY(nz_cfg_size(j, "encoder_attention_heads", 8, 0, &c->enc_heads, err));
    NZ_TRY(nz_cfg_size(j, "decoder_embed_dim", c->d_model, 0, &dec_dim, err));
    NZ_TRY(nz_cfg_size(j, "decoder_ffn_embed_dim", c->enc_ffn, 0, &c->dec_ffn, err));
    NZ_TRY(nz_cfg_size(j, "decoder_layers", 6, 0, &c->dec_layers, err));
    NZ_TRY(nz_cfg_size(j, "decoder_attention_heads", 8, 0, &c->dec_heads, err));
    NZ_TRY(nz_cfg_size(j, "at_decoder_layers", 0, 0, &c->at_layers, err));
    NZ_TRY(nz_cfg_size(j, "max_source_positions", 1024, 0, &c->max_source_positions, err));
    NZ_TRY(nz_cfg_size(j, "max_target_positions", 1024, 0, &c->max_target_positions, err));
    NZ_TRY(nz_cfg_flag(j, "encoder_normalize_before", 0, &c->enc_pre_norm, err));
    NZ_TRY(nz_cfg_flag(j, "decoder_normalize_before", 0, &c->dec_pre_norm, err));
    NZ_TRY(nz_cfg_flag(j, "encoder_learned_pos", 0, &c->enc_learned_pos, err));
    NZ_TRY(nz_cfg_flag(j, "decoder_learned_pos", 0, &c->dec_learned_pos, err));
    NZ_TRY(nz_cfg_flag(j, "no_token_positional_embeddings", 0, &c->no_positions, err));
    NZ_TRY(nz_cfg_flag(j, "layernorm_embedding", 0, &c->layernorm_embedding, err));
    NZ_TRY(nz_cfg_flag(j, "pred_length_offset", 0, &c->pred_length_offset, err));
    NZ_TRY(nz_cfg_flag(j, "at_prepend_bos", 0, &c->at_prepend_bos, err));
    NZ_TRY(nz_cfg_flag(j, "share_all_embeddings", 1, &v, err));
    if (!v)
        NZ_FAIL(NZ_E_UNSUPPORTED, "config.json: share_all_embeddings false is not supported (one joined "
                                  "dictionary and embedding matrix is required)");
    /* share_all_embeddings implies a tied output projection (fairseq forces
     * share_decoder_input_output_embed), whatever the key says */
    NZ_TRY(nz_cfg_flag(j, "src_embedding_copy", 0, &v, err));
    if (v) NZ_FAIL(NZ_E_UNSUPPORTED, "config.json: src_embedding_copy is not supported");
    NZ_TRY(nz_cfg_flag(j, "no_scale_embedding", 0, &v, err));
    c->embed_scale = v ? 1.0f : (float)sqrt((double)c->d_model);
    if (!c->d_model || dec_dim != c->d_model)
        NZ_FAIL(NZ_E_UNSUPPORTED,
                "config.json: encoder_embed_dim %zu and decoder_embed_dim %zu must be equal and > 0",
                c->d_model, dec_dim);
    if (!c->enc_heads || c->d_model % c->enc_heads || !c->dec_heads || c->d_model % c->dec_heads)
        NZ_FAIL(NZ_E_FORMAT,
                "config.json: attention heads (%zu encoder, %zu decoder) must divide the width %zu",
                c->enc_heads, c->dec_heads, c->d_model);
    if (!c->enc_ffn || !c->dec_ffn) NZ_FAIL(NZ_E_FORMAT, "config.json: FFN widths must be > 0");
    if (!c->dec_layers) NZ_FAIL(NZ_E_FORMAT, "config.json: decoder_layers must be > 0");
    if (!c->max_source_positions || c->max_target_positions < 2)
        NZ_FAIL(NZ_E_FORMAT, "config.json: max_source_positions must be > 0 and max_target_positions >= 2");
    const json_t *act = nz_cfg_get(j, "activation_fn");
    const char *an = act ? json_string_value(act) : "relu";
    if (!an) NZ_FAIL(NZ_E_FORMAT, "config.json: 'activation_fn' must be a string");
    if (!strcmp(an, "relu"))
        c->act = NZ_ACT_RELU;
    else if (!strcmp(an, "gelu"))
        c->act = NZ_ACT_GELU;
    else
        NZ_FAIL(NZ_E_UNSUPPORTED, "config.json: activation_fn \"%s\" is not supported (relu, gelu)", an);
    const json_t *eps = nz_cfg_get(j, "layer_norm_eps");
    c->ln_eps = 1e-5f;
    if (eps) {
        if (!json_is_number(eps) || !(json_number_value(eps) > 0))
            NZ_FAIL(NZ_E_FORMAT, "config.json: 'layer_norm_eps' must be a positive number");
        c->ln_eps = (float)json_number_value(eps);
    }
    NZ_TRY(nz_cfg_fixed(j, "bos_index", NZ_NAT_BOS, "fairseq dictionary", err));
    NZ_TRY(nz_cfg_fixed(j, "pad_index", NZ_NAT_PAD, "fairseq dictionary", err));
    NZ_TRY(nz_cfg_fixed(j, "eos_index", NZ_NAT_EOS, "fairseq dictionary", err));
    NZ_TRY(nz_cfg_fixed(j, "unk_index", NZ_NAT_UNK, "fairseq dictionary", err));
    NZ_TRY(nz_cfg_fixed(j, "mask_index", NZ_NAT_MASK, "fairseq dictionary", err));
done:
    return rc;
}

/* ------------------------------------------------------------------ binding */

static const char *const ATTN_NAMES[4] = {"q_proj", "k_proj", "v_proj", "out_proj"};

static int bind_norm(const nz_nat *n, nz_norm *no, const char *prefix, const char *name, nz_error *err) {
    char g[256], b[256];
    snprintf(g, sizeof g, "%s%s.weight", prefix, name);
    snprintf(b, sizeof b, "%s%s.bias", prefix, name);
    return nz_norm_bind(no, n->m, NZ_NORM_LAYER, g, b, n->c.d_model, n->c.ln_eps, err);
}

static int bind_attn(const nz_nat *n, nz_attn *a, const char *prefix, size_t H, nz_error *err) {
    int rc = nz_attn_bind(a, n->m, prefix, ATTN_NAMES, 1, n->c.d_model, H, 0, err);
    if (!rc && a->H * a->dh != n->c.d_model)
        rc = nz_fail(err, NZ_E_FORMAT, "'%sq_proj.weight' has %zu rows, expected %zu", prefix, a->H * a->dh,
                     n->c.d_model);
    return rc;
}

/* One fairseq TransformerEncoderLayer / TransformerDecoderLayer (cross). */
static int bind_layer(const nz_nat *n, nz_block *b, const char *stack, size_t i, int cross, int pre_norm,
                      size_t H, size_t ffn, nz_error *err) {
    char p[128], a[256], c[256], d[256], e[256];
    int rc = NZ_OK;
    memset(b, 0, sizeof *b);
    b->pre_norm = pre_norm;
    b->has_cross = cross;
    snprintf(p, sizeof p, "%slayers.%zu.", stack, i);
    snprintf(a, sizeof a, "%sself_attn.", p);
    NZ_TRY(bind_attn(n, &b->self, a, H, err));
    NZ_TRY(bind_norm(n, &b->self_norm, p, "self_attn_layer_norm", err));
    if (cross) {
        snprintf(a, sizeof a, "%sencoder_attn.", p);
        NZ_TRY(bind_attn(n, &b->cross, a, H, err));
        NZ_TRY(bind_norm(n, &b->cross_norm, p, "encoder_attn_layer_norm", err));
    }
    snprintf(a, sizeof a, "%sfc1.weight", p);
    snprintf(c, sizeof c, "%sfc1.bias", p);
    snprintf(d, sizeof d, "%sfc2.weight", p);
    snprintf(e, sizeof e, "%sfc2.bias", p);
    NZ_TRY(nz_ffn_bind(&b->ffn, n->m, n->c.act, a, c, NULL, d, e, n->c.d_model, err));
    if (b->ffn.d_ff != ffn)
        NZ_FAIL(NZ_E_FORMAT, "'%s' has %zu rows, config.json says %zu (ffn_embed_dim)", a, b->ffn.d_ff, ffn);
    NZ_TRY(bind_norm(n, &b->ffn_norm, p, "final_layer_norm", err));
done:
    return rc;
}

static void stack_free(nat_stack *s) {
    for (size_t i = 0; s->layers && i < s->nlayers; i++) nz_block_free(&s->layers[i]);
    nz_free(s->layers);
    nz_norm_free(&s->emb_norm);
    nz_norm_free(&s->final_norm);
    memset(s, 0, sizeof *s);
}

/* Bind the positions, norms and layers of stack prefix ("encoder." ...). */
static int bind_stack(nz_nat *n, nat_stack *s, const char *prefix, size_t nlayers, int cross, int pre_norm,
                      int learned, size_t max_pos, size_t H, size_t ffn, int emb_norm, nz_error *err) {
    int rc = NZ_OK;
    char a[256];
    memset(s, 0, sizeof *s);
    if (!n->c.no_positions) {
        s->pos = learned ? POS_LEARNED : POS_SINUSOIDAL;
        snprintf(a, sizeof a, "%sembed_positions.weight", prefix);
        if (learned) {
            NZ_TRY(nz_weight_bind(&s->pos_table, n->m, a, err));
            if (s->pos_table.k != n->c.d_model || s->pos_table.n != max_pos + NZ_NAT_PAD + 1)
                NZ_FAIL(NZ_E_FORMAT, "'%s' is %llu x %llu, expected %zu x %zu (max positions %zu + 2)", a,
                        (unsigned long long)s->pos_table.n, (unsigned long long)s->pos_table.k,
                        max_pos + NZ_NAT_PAD + 1, n->c.d_model, max_pos);
            s->pos_rows = (size_t)s->pos_table.n;
        } else if (nz_model_find(n->m, a) >= 0) {
            NZ_FAIL(NZ_E_FORMAT, "'%s' exists but the config says sinusoidal positions (learned_pos false)",
                    a);
        }
    }
    if (emb_norm) {
        NZ_TRY(bind_norm(n, &s->emb_norm, prefix, "layernorm_embedding", err));
        s->has_emb_norm = 1;
    }
    if (pre_norm) {
        NZ_TRY(bind_norm(n, &s->final_norm, prefix, "layer_norm", err));
        s->has_final_norm = 1;
    }
    snprintf(a, sizeof a, "%slayers.%zu.fc1.weight", prefix, nlayers);
    if (nz_model_find(n->m, a) >= 0)
        NZ_FAIL(NZ_E_FORMAT, "'%s' exists: the model has more %slayers than config.json says (%zu)", a,
                prefix, nlayers);
    s->layers = nz_calloc(nlayers ? nlayers : 1, sizeof *s->layers, NZ_MEM_OTHER);
    if (!s->layers) NZ_FAIL(NZ_E_NOMEM, "out of memory for %zu layers", nlayers);
    s->nlayers = nlayers;
    for (size_t i = 0; i < nlayers; i++)
        NZ_TRY(bind_layer(n, &s->layers[i], prefix, i, cross, pre_norm, H, ffn, err));
done:
    return rc;
}

int nz_nat_load(const nz_model *m, nz_nat **out, nz_error *err) {
    int rc = NZ_OK;
    *out = NULL;
    nz_nat *n = nz_calloc(1, sizeof *n, NZ_MEM_OTHER);
    if (!n) return nz_fail(err, NZ_E_NOMEM, "out of memory for the model");
    n->m = m;
    nz_nat_config *c = &n->c;
    NZ_TRY(read_config(nz_model_config(m), c, err));
    const char *ename = "encoder.embed_tokens.weight";
    NZ_TRY(nz_weight_bind(&n->embed, m, ename, err));
    if (n->embed.k != c->d_model)
        NZ_FAIL(NZ_E_FORMAT, "'%s' is %llu wide, config.json says encoder_embed_dim %zu", ename,
                (unsigned long long)n->embed.k, c->d_model);
    if (n->embed.n <= NZ_NAT_UNK || n->embed.n > INT32_MAX)
        NZ_FAIL(NZ_E_FORMAT, "'%s' has %llu rows", ename, (unsigned long long)n->embed.n);
    c->vocab = (size_t)n->embed.n;
    size_t vs = 0;
    NZ_TRY(nz_cfg_size(nz_model_config(m), "vocab_size", c->vocab, 0, &vs, err));
    if (vs != c->vocab)
        NZ_FAIL(NZ_E_FORMAT, "config.json: vocab_size %zu but '%s' has %zu rows", vs, ename, c->vocab);
    static const char *const untied[] = {"decoder.embed_tokens.weight", "decoder.output_projection.weight",
                                         "at_decoder.embed_tokens.weight",
                                         "at_decoder.output_projection.weight"};
    for (size_t i = 0; i < sizeof untied / sizeof untied[0]; i++)
        if (nz_model_find(m, untied[i]) >= 0)
            NZ_FAIL(NZ_E_UNSUPPORTED,
                    "'%s' exists: with share_all_embeddings every embedding and output "
                    "projection is '%s' (the converter stores it once)",
                    untied[i], ename);
    NZ_TRY(nz_linear_bind(&n->out_proj, m, ename, NULL, c->d_model, c->vocab, err));
    NZ_TRY(nz_linear_bind(&n->length, m, "decoder.embed_length.weight", NULL, c->d_model, 0, err));
    c->length_classes = n->length.n_out;
    size_t lc = 0;
    NZ_TRY(nz_cfg_size(nz_model_config(m), "length_classes", c->length_classes, 0, &lc, err));
    if (lc != c->length_classes)
        NZ_FAIL(NZ_E_FORMAT, "config.json: length_classes %zu but decoder.embed_length.weight has %zu rows",
                lc, c->length_classes);
    NZ_TRY(bind_stack(n, &n->enc, "encoder.", c->enc_layers, 0, c->enc_pre_norm, c->enc_learned_pos,
                      c->max_source_positions, c->enc_heads, c->enc_ffn, c->layernorm_embedding, err));
    NZ_TRY(bind_stack(n, &n->dec, "decoder.", c->dec_layers, 1, c->dec_pre_norm, c->dec_learned_pos,
                      c->max_target_positions, c->dec_heads, c->dec_ffn, 0, err));
    if (c->at_layers)
        NZ_TRY(bind_stack(n, &n->at, "at_decoder.", c->at_layers, 1, c->dec_pre_norm, c->dec_learned_pos,
                          c->max_target_positions, c->dec_heads, c->dec_ffn, c->layernorm_embedding, err));
    else if (nz_model_find(m, "at_decoder.layers.0.fc1.weight") >= 0)
        NZ_FAIL(NZ_E_FORMAT, "the model has at_decoder.* layers but config.json has no at_decoder_layers");
    *out = n;
    return NZ_OK;
done:
    nz_nat_free(n);
    return rc;
}

void nz_nat_free(nz_nat *n) {
    if (!n) return;
    stack_free(&n->enc);
    stack_free(&n->dec);
    stack_free(&n->at);
    nz_linear_free(&n->out_proj);
    nz_linear_free(&n->length);
    nz_free(n);
}

const nz_nat_config *nz_nat_get_config(const nz_nat *n) { return &n->c; }

void nz_nat_opts_default(nz_nat_opts *o) {
    memset(o, 0, sizeof *o); /* keep_candidates, on_width and the hook arguments too */
    o->max_iter = 10;
    o->length_beam = 1;
    o->adaptive = 0;
    o->rerank_at = 0;
    o->max_len = 0;
    o->stop = NULL;
    o->stop_arg = NULL;
}

void nz_nat_at_opts_default(nz_nat_at_opts *o) {
    o->max_len_a = 0;
    o->max_len_b = 200;
    o->min_len = 1;
    o->stop = NULL;
    o->stop_arg = NULL;
}

/* ------------------------------------------------------------------ forward pieces */

/* out[B*T x D] = scale * E[tok] + pos(tok) [+ layernorm_embedding when emb_norm];
 * positions are fairseq's make_positions + start (incremental decoding). */
int nat_stack_embed(nz_matmul_ctx *mc, const nz_nat *n, const nat_stack *s, const int32_t *tok, size_t B,
                    size_t T, int64_t start, const int64_t *starts, int emb_norm, float *out, nz_error *err) {
    const size_t M = B * T, D = n->c.d_model;
    int rc = nz_embed(mc, &n->embed, tok, M, n->c.embed_scale, out, err);
    if (rc || s->pos == POS_NONE || !M) goto norm;
    int64_t *pos = nz_malloc(M * sizeof *pos, NZ_MEM_ACTIVATIONS);
    float *pe = nz_malloc(M * D * sizeof *pe, NZ_MEM_ACTIVATIONS);
    int32_t *ids = nz_malloc(M * sizeof *ids, NZ_MEM_ACTIVATIONS);
    if (!pos || !pe || !ids) {
        rc = nz_fail(err, NZ_E_NOMEM, "out of memory for positions");
    } else {
        for (size_t b = 0; b < B; b++) /* each sequence's positions from its own start */
            nz_fairseq_positions(pos + b * T, tok + b * T, 1, T, NZ_NAT_PAD, starts ? starts[b] : start);
        if (s->pos == POS_LEARNED) {
            for (size_t i = 0; i < M && !rc; i++) {
                if (pos[i] < 0 || (uint64_t)pos[i] >= s->pos_rows)
                    rc = nz_fail(err, NZ_E_RANGE,
                                 "position %lld is beyond the learned position table (%zu rows)",
                                 (long long)pos[i], s->pos_rows);
                ids[i] = (int32_t)pos[i];
            }
            if (!rc) rc = nz_embed(mc, &s->pos_table, ids, M, 1.0f, pe, err);
        } else {
            nz_sinusoidal_positions(pe, pos, M, D, NZ_NAT_PAD);
        }
        if (!rc) nz_add(out, pe, M * D);
    }
    nz_free(pos);
    nz_free(pe);
    nz_free(ids);
norm:
    if (!rc && emb_norm && s->has_emb_norm) nz_norm_fwd(&s->emb_norm, out, M, out);
    return rc;
}

/* x[B x T x D] through the layers of s (io filled by the caller except the
 * per-layer caches), then the final layer norm. */
int nat_stack_layers(nz_matmul_ctx *mc, const nat_stack *s, float *x, nz_block_io *io, nz_kv *self_kv,
                     const nz_kv *cross_kv, nz_error *err) {
    for (size_t l = 0; l < s->nlayers; l++) {
        io->self_kv = self_kv ? &self_kv[l] : NULL;
        io->cross_kv = cross_kv ? &cross_kv[l] : NULL;
        int rc = nz_block_fwd(mc, &s->layers[l], x, io, err);
        if (rc) return rc;
    }
    if (s->has_final_norm) nz_norm_fwd(&s->final_norm, x, io->B * io->T, x);
    return NZ_OK;
}

/* ------------------------------------------------------------------ peak memory estimates
 *
 * nz_nat_*_peak_bytes: the bytes a call holds at its peak in NZ_MEM_ACTIVATIONS + NZ_MEM_KV (+ its
 * NZ_MEM_OTHER results), counted as nz_malloc counts them, as the sum of the buffers alive together at the
 * worst point of the call. Each helper stands next to the code whose allocations it mirrors (the engine's
 * layers: engine/nz_layer.c, nz_attn_self_peak and nz_attn_cross_peak): a change to those allocations must
 * change the helper (tests/test_mem_estimate.c checks measured <= estimate <= 1.3 x measured + 256 KiB).
 * Sizes are doubles (exact below 2^53 bytes), saturated on return. */

double nat_dmax(double a, double b) { return a > b ? a : b; }

/* nz_block_fwd over B x T rows of width D, no adapter: h and y (2 M D floats + 1) plus the largest
 * sub-layer: self attention (stateless: over the T positions; kv: over Tk, the cache length after the
 * step), cross attention (when cross: over a kvB x S cache), the FFN's hidden layer (M F floats + 1). */
double nat_block_peak(double B, double T, double D, double F, int kv, double Tk, int cross, double kvB,
                      double S) {
    const double M = B * T;
    double sub = nz_attn_self_peak(B, T, D, kv, kv ? Tk : T);
    if (cross) sub = nat_dmax(sub, nz_attn_cross_peak(M, D, kvB, S));
    sub = nat_dmax(sub, 4 * M * F + 1);
    return 8 * M * D + 1 + sub;
}

/* stack_embed over M rows: nz_embed's done flags (M bytes, freed before the positions), then pos (M int64),
 * pe (M x D floats) and ids (M int32); the embedding norm runs in place. */
double nat_embed_peak(const nat_stack *s, double M, double D) {
    const double done = nat_dmax(M, 1);
    if (s->pos == POS_NONE || !M) return done;
    return nat_dmax(done, 8 * M + 4 * M * D + 4 * M);
}

int nz_nat_check_source(const nz_nat *n, const int32_t *src, size_t S, size_t *len, nz_error *err) {
    size_t k = 0;
    for (size_t t = 0; t < S; t++) {
        if (src[t] < 0 || (size_t)src[t] >= n->c.vocab)
            return nz_fail(err, NZ_E_RANGE,
                           "source token id %d at position %zu is outside the vocabulary [0, %zu)",
                           (int)src[t], t, n->c.vocab);
        k += src[t] != NZ_NAT_PAD;
    }
    if (len) *len = k;
    if (!k) return nz_fail(err, NZ_E_INVALID_ARG, "empty source (no token other than padding)");
    if (k > n->c.max_source_positions)
        return nz_fail(err, NZ_E_RANGE, "source has %zu tokens, more than max_source_positions %zu", k,
                       n->c.max_source_positions);
    return NZ_OK;
}

void nz_nat_enc_free(nz_nat_enc *enc) {
    if (!enc) return;
    nz_free(enc->x);
    nz_free(enc->pad);
    nz_free(enc->len);
    memset(enc, 0, sizeof *enc);
}

int nz_nat_encode(nz_matmul_ctx *mc, const nz_nat *n, const int32_t *src, size_t B, size_t S, nz_nat_enc *enc,
                  nz_error *err) {
    int rc = NZ_OK;
    const size_t D = n->c.d_model;
    memset(enc, 0, sizeof *enc);
    if (!B || !S) return nz_fail(err, NZ_E_INVALID_ARG, "encode: empty batch (%zu x %zu)", B, S);
    enc->B = B;
    enc->S = S;
    enc->D = D;
    enc->x = nz_malloc(B * S * D * sizeof *enc->x, NZ_MEM_ACTIVATIONS);
    enc->pad = nz_malloc(B * S, NZ_MEM_ACTIVATIONS);
    enc->len = nz_malloc(B * sizeof *enc->len, NZ_MEM_ACTIVATIONS);
    if (!enc->x || !enc->pad || !enc->len) NZ_FAIL(NZ_E_NOMEM, "out of memory for the encoder output");
    for (size_t b = 0; b < B; b++) {
        rc = nz_nat_check_source(n, src + b * S, S, &enc->len[b], err);
        if (rc) {
            nz_fail_prefix(err, "sentence %zu: ", b);
            goto done;
        }
    }
    int any = 0;
    for (size_t i = 0; i < B * S; i++) any |= enc->pad[i] = src[i] == NZ_NAT_PAD;
    NZ_TRY(nat_stack_embed(mc, n, &n->enc, src, B, S, 0, NULL, 1, enc->x, err));
    for (size_t i = 0; i < B * S; i++)
        if (enc->pad[i]) memset(enc->x + i * D, 0, D * sizeof *enc->x);
    nz_block_io io;
    memset(&io, 0, sizeof io);
    io.B = B;
    io.T = S;
    io.self_pad = any ? enc->pad : NULL;
    NZ_TRY(nat_stack_layers(mc, &n->enc, enc->x, &io, NULL, NULL, err));
done:
    if (rc) nz_nat_enc_free(enc);
    return rc;
}

/* Length prediction (mask-predict): L0[b] for every encoder row (clamped >= 2, not above). */
int nat_predict_lengths(nz_matmul_ctx *mc, const nz_nat *n, const nz_nat_enc *enc, long *L0, nz_error *err) {
    const size_t B = enc->B, S = enc->S, D = enc->D, C = n->c.length_classes;
    float *pooled = nz_calloc(B * D, sizeof *pooled, NZ_MEM_ACTIVATIONS);
    float *lo = nz_malloc(B * C * sizeof *lo, NZ_MEM_ACTIVATIONS);
    int rc = NZ_OK;
    if (!pooled || !lo) NZ_FAIL(NZ_E_NOMEM, "out of memory for length prediction");
    /* fairseq _mean_pooling: sum over positions of (x / count) * mask */
    for (size_t b = 0; b < B; b++) {
        const float cnt = (float)enc->len[b];
        float *p = pooled + b * D;
        for (size_t t = 0; t < S; t++) {
            if (enc->pad[b * S + t]) continue;
            const float *x = enc->x + (b * S + t) * D;
            for (size_t d = 0; d < D; d++) p[d] += x[d] / cnt;
        }
    }
    NZ_TRY(nz_linear_fwd(mc, &n->length, pooled, B, lo, err));
    nz_log_softmax(lo, B, C);
    for (size_t b = 0; b < B; b++) {
        long L = (long)nz_argmax(lo + b * C, C);
        if (n->c.pred_length_offset) L = L - LENGTH_OFFSET + (long)enc->len[b];
        L0[b] = L < 2 ? 2 : L;
    }
done:
    nz_free(pooled);
    nz_free(lo);
    return rc;
}

/* nz_nat_encode's output for B x S: x (B S D floats), pad (B S bytes), len (B size_t). */
double nat_enc_bytes(double B, double S, double D) { return 4 * B * S * D + B * S + 8 * B; }

/* nz_nat_encode's peak: its output + the larger of the embedding and one (stateless) layer. */
double nat_encode_peak(const nz_nat *n, double B, double S) {
    const double D = (double)n->c.d_model;
    return nat_enc_bytes(B, S, D) + nat_dmax(nat_embed_peak(&n->enc, B * S, D),
                                             nat_block_peak(B, S, D, (double)n->c.enc_ffn, 0, 0, 0, 0, 0));
}

void nat_kvs_free(nz_kv *kv, size_t nl) {
    for (size_t l = 0; kv && l < nl; l++) nz_kv_free(&kv[l]);
    nz_free(kv);
}

/* Cross-attention keys/values of every layer of decoder s over enc. */
int nat_cross_kvs(nz_matmul_ctx *mc, const nz_nat *n, const nat_stack *s, const nz_nat_enc *enc, nz_kv **out,
                  nz_error *err) {
    int rc = NZ_OK;
    nz_kv *kv = nz_calloc(s->nlayers, sizeof *kv, NZ_MEM_KV);
    if (!kv) return nz_fail(err, NZ_E_NOMEM, "out of memory for cross-attention caches");
    for (size_t l = 0; l < s->nlayers && !rc; l++) {
        rc = nz_kv_init(&kv[l], enc->B, enc->S, n->c.d_model, err);
        if (!rc)
            rc = nz_attn_cross_kv(mc, &s->layers[l].cross, enc->x, enc->B, enc->S, enc->pad, &kv[l], err);
    }
    if (rc) {
        nat_kvs_free(kv, s->nlayers);
        kv = NULL;
    }
    *out = kv;
    return rc;
}

/* cross_kvs of stack s over B x S encoder rows: the nz_kv array and per layer k, v (B S D floats each) and
 * pad (B S bytes). *build: the peak while they are built (+ the last layer's nz_attn_cross_kv projections,
 * 2 B S D floats + 1). @return the bytes held once built. */
double nat_cross_kvs_bytes(const nz_nat *n, const nat_stack *s, double B, double S, double *build) {
    const double D = (double)n->c.d_model, nl = (double)s->nlayers;
    const double held = nl * sizeof(nz_kv) + nl * (8 * B * S * D + B * S);
    *build = held + (nl ? 8 * B * S * D + 1 : 0);
    return held;
}

/* Decoder features h[A x W x D] of tok[A x W] (nat: CMLM decoder, else AT
 * decoder, full sequence, causal); row a reads encoder row kv_map[a]. */
int nat_decoder_fwd(nz_matmul_ctx *mc, const nz_nat *n, int nat, const int32_t *tok, size_t A, size_t W,
                    const nz_kv *cross, const uint32_t *kv_map, float *h, nz_error *err) {
    const nat_stack *s = nat ? &n->dec : &n->at;
    uint8_t *pad = nz_malloc(A * W + 1, NZ_MEM_ACTIVATIONS);
    if (!pad) return nz_fail(err, NZ_E_NOMEM, "out of memory for decoder padding");
    int any = 0;
    for (size_t i = 0; i < A * W; i++) any |= pad[i] = tok[i] == NZ_NAT_PAD;
    int rc = nat_stack_embed(mc, n, s, tok, A, W, 0, NULL, !nat, h, err);
    if (!rc) {
        nz_block_io io;
        memset(&io, 0, sizeof io);
        io.B = A;
        io.T = W;
        io.self_pad = any ? pad : NULL;
        io.causal = !nat;
        io.kv_map = kv_map;
        rc = nat_stack_layers(mc, s, h, &io, NULL, cross, err);
    }
    nz_free(pad);
    return rc;
}

/* decoder_fwd's peak over A x W tokens whose rows read cross caches of encB x S: pad (A W bytes + 1) + the
 * larger of the embedding and one layer (stateless self attention, cross attention, FFN). */
double nat_decoder_fwd_peak(const nz_nat *n, int nat, double A, double W, double encB, double S) {
    const nat_stack *s = nat ? &n->dec : &n->at;
    const double D = (double)n->c.d_model;
    return A * W + 1 +
           nat_dmax(nat_embed_peak(s, A * W, D),
                    nat_block_peak(A, W, D, (double)n->c.dec_ffn, 0, 0, 1, encB, S));
}

/* Log-softmax of the output projection of the R rows h[rows[i]] (rows of
 * D floats): calls fn(ctx, i, lp[V]) for each, PROJ_CHUNK rows per matmul. */

int nat_project_rows(nz_matmul_ctx *mc, const nz_nat *n, const float *h, const size_t *rows, size_t R,
                     nat_row_fn fn, void *ctx, nz_error *err) {
    const size_t D = n->c.d_model, V = n->c.vocab, C = R < PROJ_CHUNK ? R : PROJ_CHUNK;
    if (!R) return NZ_OK;
    float *g = nz_malloc(C * D * sizeof *g, NZ_MEM_ACTIVATIONS);
    float *lp = nz_malloc(C * V * sizeof *lp, NZ_MEM_ACTIVATIONS);
    int rc = NZ_OK;
    if (!g || !lp) rc = nz_fail(err, NZ_E_NOMEM, "out of memory for the output projection");
    for (size_t r0 = 0; r0 < R && !rc; r0 += C) {
        size_t c = R - r0 < C ? R - r0 : C;
        for (size_t i = 0; i < c; i++) memcpy(g + i * D, h + rows[r0 + i] * D, D * sizeof *g);
        rc = nz_linear_fwd(mc, &n->out_proj, g, c, lp, err);
        if (rc) break;
        nz_log_softmax(lp, c, V);
        for (size_t i = 0; i < c; i++) fn(ctx, r0 + i, lp + i * V);
    }
    nz_free(g);
    nz_free(lp);
    return rc;
}

/* nat_project_rows' peak for R rows: g (C x D floats) and lp (C x V floats), C = min(R, PROJ_CHUNK). */
double nat_project_peak(const nz_nat *n, double R) {
    const double C = R < PROJ_CHUNK ? R : PROJ_CHUNK;
    return C > 0 ? 4 * C * (double)n->c.d_model + 4 * C * (double)n->c.vocab : 0;
}

/* ------------------------------------------------------------------ results */

void nz_nat_hyps_free(nz_nat_hyp *hyps, size_t B) {
    for (size_t i = 0; hyps && i < B; i++) {
        nz_free(hyps[i].tokens);
        for (size_t j = 0; hyps[i].cands && j < hyps[i].n_cands; j++) nz_free(hyps[i].cands[j].tokens);
        nz_free(hyps[i].cands);
        memset(&hyps[i], 0, sizeof hyps[i]);
    }
}

/* Zero hyps, check every sentence; the valid ones are copied into *vsrc
 * [*nv x S] and listed in *vidx. */
int nat_prepare(const nz_nat *n, const int32_t *src, size_t B, size_t S, nz_nat_hyp *hyps, int32_t **vsrc,
                size_t **vidx, size_t *nv, nz_error *err) {
    *vsrc = NULL;
    *vidx = NULL;
    *nv = 0;
    for (size_t b = 0; b < B; b++) memset(&hyps[b], 0, sizeof hyps[b]);
    *vsrc = nz_malloc(B * S * sizeof **vsrc + 1, NZ_MEM_ACTIVATIONS);
    *vidx = nz_malloc(B * sizeof **vidx + 1, NZ_MEM_ACTIVATIONS);
    if (!*vsrc || !*vidx) return nz_fail(err, NZ_E_NOMEM, "out of memory for the batch");
    for (size_t b = 0; b < B; b++) {
        hyps[b].rc = nz_nat_check_source(n, src + b * S, S, NULL, &hyps[b].err);
        if (hyps[b].rc) continue;
        memcpy(*vsrc + *nv * S, src + b * S, S * sizeof **vsrc);
        (*vidx)[(*nv)++] = b;
    }
    return NZ_OK;
}

/* prepare's buffers for B sources of width S: vsrc (B S int32 + 1), vidx (B size_t + 1). */
double nat_prepare_bytes(double B, double S) { return 4 * B * S + 1 + 8 * B + 1; }

/* A batch-wide failure: every sentence without a result gets it. */
void nat_fail_all(nz_nat_hyp *hyps, size_t B, const nz_error *err) {
    for (size_t b = 0; b < B; b++) {
        if (hyps[b].rc || hyps[b].tokens) continue;
        hyps[b].rc = err->code ? err->code : NZ_E_INVALID_ARG;
        hyps[b].err = *err;
    }
}

int nat_set_tokens(nz_nat_hyp *h, const int32_t *tok, size_t k, nz_error *err) {
    h->tokens = nz_malloc(k * sizeof *h->tokens + 1, NZ_MEM_OTHER);
    if (!h->tokens) return nz_fail(err, NZ_E_NOMEM, "out of memory for a result");
    if (k) memcpy(h->tokens, tok, k * sizeof *tok);
    h->n = k;
    return NZ_OK;
}
