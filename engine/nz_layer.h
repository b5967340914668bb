/*
 * nz_layer.h — transformer layers over (compressed) model weights.
 *
 * The pieces a model family assembles: linear projections (nz_matmul over a
 * bound weight, plus an fp32 bias), small parameters decoded once (biases,
 * norm gains), embedding rows fetched tile by tile, multi-head attention
 * (self, causal self with a KV cache, cross attention over cached encoder
 * keys/values), FFNs (ReLU, GELU, gated GELU), residual adapters, and whole
 * pre-/post-norm blocks. Everything is batched: x[M x D] with M = B x T rows
 * (B sequences of T positions each).
 *
 * Binding is by explicit tensor names (the model family knows its layout:
 * fairseq, T5...); the engine only checks shapes. Layers borrow the model:
 * free the layers before the model. Small parameters are decoded into
 * NZ_MEM_WEIGHTS blocks owned by the layer; KV caches live in NZ_MEM_KV;
 * temporaries of a forward call in NZ_MEM_ACTIVATIONS (freed before it
 * returns).
 *
 * Every forward call takes a nz_matmul_ctx (pool + tile cache + per-thread
 * decoders, nz_weight.h); one forward call at a time per context.
 */
#ifndef NZ_LAYER_H
#define NZ_LAYER_H

#include "nz_ops.h"
#include "nz_weight.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ----------------------------------------------------------- parameters */

/** Decode the whole float tensor name into a new fp32 array (NZ_MEM_WEIGHTS;
 *  free with nz_free). When expect > 0 the tensor must have exactly expect
 *  elements. *n (may be NULL) receives the element count.
 *  @return NZ_OK, NZ_E_NOT_FOUND, NZ_E_FORMAT (wrong size), NZ_E_NOMEM or a
 *          decode error. */
int nz_param_load(const nz_model *m, const char *name, size_t expect, float **out, size_t *n, nz_error *err);

/* --------------------------------------------------------------- linear */

/** y = x W^T + b. */
typedef struct nz_linear {
    nz_weight w; /* [n_out x n_in] */
    float *b;    /* [n_out] or NULL; owned */
    size_t n_in, n_out;
} nz_linear;

/** Bind weight wname and (when bname is not NULL) bias bname. When n_in /
 *  n_out are > 0 the weight must be [n_out x n_in].
 *  @return NZ_OK, NZ_E_NOT_FOUND, NZ_E_FORMAT (shape) or a decode error. */
int nz_linear_bind(nz_linear *l, const nz_model *m, const char *wname, const char *bname, size_t n_in,
                   size_t n_out, nz_error *err);

/** Free the bias. Accepts NULL and an unbound (zeroed) linear. */
void nz_linear_free(nz_linear *l);

/** y[M x n_out] = x[M x n_in] W^T + b. @return NZ_OK or a tile error. */
int nz_linear_fwd(nz_matmul_ctx *mc, const nz_linear *l, const float *x, size_t M, float *y, nz_error *err);

/* ------------------------------------------------------------ embedding */

/** out[M x D] = scale * E[ids[i]] for an embedding E[V x D] (fetches only
 *  the tiles holding the wanted rows, through the context's tile cache).
 *  @return NZ_OK, NZ_E_RANGE (an id outside [0, V), naming it) or a tile
 *          error. */
int nz_embed(nz_matmul_ctx *mc, const nz_weight *E, const int32_t *ids, size_t M, float scale, float *out,
             nz_error *err);

/* ----------------------------------------------------------------- norm */

typedef enum nz_norm_kind { NZ_NORM_LAYER = 0, NZ_NORM_RMS } nz_norm_kind;

typedef struct nz_norm {
    nz_norm_kind kind;
    size_t d;
    float eps;
    float *g; /* [d], owned */
    float *b; /* [d] or NULL (LayerNorm only), owned */
} nz_norm;

/** Bind a norm: gain gname, bias bname (NULL for none / RMSNorm).
 *  @return NZ_OK or an error as nz_param_load. */
int nz_norm_bind(nz_norm *n, const nz_model *m, nz_norm_kind kind, const char *gname, const char *bname,
                 size_t d, float eps, nz_error *err);

void nz_norm_free(nz_norm *n);

/** y[M x d] = norm(x); y == x allowed. */
void nz_norm_fwd(const nz_norm *n, const float *x, size_t M, float *y);

/* ------------------------------------------------------------- KV cache */

/** Keys and values of one attention layer for B sequences: rows [0, len)
 *  hold positions 0.. len-1 of every sequence (all sequences advance
 *  together; shorter prompts are handled with key_pad). */
typedef struct nz_kv {
    float *k;     /* [B x cap x D], D = H * dh of the attention */
    float *v;     /* [B x cap x D] */
    uint8_t *pad; /* [B x cap], 1 = padding key */
    size_t B, cap, D, len;
} nz_kv;

/** Allocate a cache for B sequences of up to cap positions of width D
 *  (D = heads x head size of the attention it serves)
 *  (NZ_MEM_KV). @return NZ_OK, NZ_E_INVALID_ARG (zero size) or NZ_E_NOMEM. */
int nz_kv_init(nz_kv *kv, size_t B, size_t cap, size_t D, nz_error *err);

/** Free the buffers. Accepts NULL and a zeroed cache. */
void nz_kv_free(nz_kv *kv);

/** Forget every position (len = 0). */
void nz_kv_reset(nz_kv *kv);

/** Beam reorder: sequence b takes the rows of old sequence src[b] (src[B],
 *  each < B). @return NZ_OK, NZ_E_RANGE or NZ_E_NOMEM. */
int nz_kv_reorder(nz_kv *kv, const uint32_t *src, nz_error *err);

/** Keep B <= kv->B sequences: new sequence b takes the rows of old sequence
 *  src[b] (src[B], each < kv->B), and the cache then serves B sequences
 *  (finished beams dropped; the memory stays until nz_kv_free).
 *  @return NZ_OK, NZ_E_RANGE or NZ_E_NOMEM (the cache is then unchanged). */
int nz_kv_select(nz_kv *kv, const uint32_t *src, size_t B, nz_error *err);

/** Resize kv to B sequences of cap positions (kv->len <= cap): sequences
 *  below both sizes keep their positions [0, len); the rest is unset, its
 *  padding marks 0 (NZ_MEM_KV; old and new are held together while copying).
 *  @return NZ_OK, NZ_E_RANGE, NZ_E_INVALID_ARG (a zero size) or NZ_E_NOMEM
 *  (kv is then unchanged). */
int nz_kv_resize(nz_kv *kv, size_t B, size_t cap, nz_error *err);

/* ------------------------------------------------------------ attention */

/** Multi-head attention weights. q/k/v: [H*dh x d_model], o: [d_model x H*dh]. */
typedef struct nz_attn {
    nz_linear q, k, v, o;
    size_t d_model, H, dh;
    float scale; /* scores = scale * q.k: 1/sqrt(dh) (fairseq), 1 (T5) */
} nz_attn;

/** Bind the four projections: projection i is the tensor
 *  "<prefix><names[i]>.weight" (+ "<prefix><names[i]>.bias" when with_bias),
 *  names = {q, k, v, o}: fairseq {"q_proj", "k_proj", "v_proj", "out_proj"},
 *  T5 {"q", "k", "v", "o"}. H*dh is read from q's rows. scale <= 0 means
 *  1/sqrt(dh). @return NZ_OK or the first bind error. */
int nz_attn_bind(nz_attn *a, const nz_model *m, const char *prefix, const char *const names[4], int with_bias,
                 size_t d_model, size_t H, float scale, nz_error *err);

void nz_attn_free(nz_attn *a);

/** Self-attention over x[B x T x d_model] -> out[B x T x d_model].
 *  key_pad[B x T] (NULL: none) marks padding positions of x.
 *  causal: query i sees keys <= its own position.
 *  kv: NULL for a stateless call; otherwise the T new keys/values are
 *  appended at kv->len (kv->len + T <= kv->cap) and queries attend to all
 *  kv->len + T keys (incremental decoding: T = 1 per step); key_pad then
 *  marks the new positions and is remembered in the cache.
 *  bias: [H x T x Tk] position bias (T5) or NULL, Tk = keys attended.
 *  @return NZ_OK, NZ_E_RANGE (cache full) or a tile/alloc error. */
int nz_attn_self(nz_matmul_ctx *mc, const nz_attn *a, const float *x, size_t B, size_t T,
                 const uint8_t *key_pad, int causal, nz_kv *kv, const float *bias, float *out, nz_error *err);

/** nz_attn_self of one new position of B sequences kept in any rows of kv
 *  (a continuously batched decoder step): x[B x d_model], sequence b's key
 *  and value go to row rows[b] (distinct, < kv->B) at position kv->len,
 *  which every row passes (kv->len + 1 <= kv->cap; the rows not named keep
 *  their keys), and its query attends causally over that row's keys that
 *  are not padding: a sequence that joined at position p has its keys
 *  [0, p) marked as padding, and with a position bias that depends only on
 *  key - query (T5) it gets the bits it gets alone. bias [H x 1 x
 *  (kv->len + 1)] or NULL. out[B x d_model].
 *  @return NZ_OK, NZ_E_RANGE (cache full, a row out of range) or a tile /
 *  alloc error. */
int nz_attn_self_rows(nz_matmul_ctx *mc, const nz_attn *a, const float *x, size_t B, nz_kv *kv,
                      const uint32_t *rows, const float *bias, float *out, nz_error *err);

/** Project encoder states enc[B x S x d_model] into kv (keys and values of
 *  cross-attention; kv->len = S, pad copied from enc_pad[B x S] or zeros).
 *  kv must have been created with at least B sequences and cap >= S.
 *  @return NZ_OK or an error. */
int nz_attn_cross_kv(nz_matmul_ctx *mc, const nz_attn *a, const float *enc, size_t B, size_t S,
                     const uint8_t *enc_pad, nz_kv *kv, nz_error *err);

/** Cross-attention of x[B x T x d_model] over kv (from nz_attn_cross_kv);
 *  kv_map[B] (NULL: identity) picks the encoder row of each query row.
 *  bias as in nz_attn_self ([H x T x S]). out[B x T x d_model].
 *  @return NZ_OK or an error. */
int nz_attn_cross(nz_matmul_ctx *mc, const nz_attn *a, const float *x, size_t B, size_t T, const nz_kv *kv,
                  const uint32_t *kv_map, const float *bias, float *out, nz_error *err);

/* ------------------------------------------------------------------ FFN */

typedef enum nz_act {
    NZ_ACT_RELU = 0,  /* wo(relu(wi x + b1)) + b2 */
    NZ_ACT_GELU,      /* wo(gelu(wi x + b1)) + b2 (exact erf GELU) */
    NZ_ACT_GELU_TANH, /* tanh-approximate GELU */
    NZ_ACT_GATED_GELU /* wo(gelu_tanh(wi x) * (wg x)) (T5 v1.1) */
} nz_act;

typedef struct nz_ffn {
    nz_act act;
    nz_linear wi; /* [d_ff x d_model] */
    nz_linear wg; /* gate [d_ff x d_model], gated only */
    nz_linear wo; /* [d_model x d_ff] */
    size_t d_model, d_ff;
} nz_ffn;

/** Bind an FFN from full tensor names (weights; biases may be NULL; gname
 *  only for NZ_ACT_GATED_GELU). d_ff is read from wi.
 *  @return NZ_OK or the first bind error. */
int nz_ffn_bind(nz_ffn *f, const nz_model *m, nz_act act, const char *wi_w, const char *wi_b,
                const char *wg_w, const char *wo_w, const char *wo_b, size_t d_model, nz_error *err);

void nz_ffn_free(nz_ffn *f);

/** out[M x d_model] = ffn(x[M x d_model]). @return NZ_OK or an error. */
int nz_ffn_fwd(nz_matmul_ctx *mc, const nz_ffn *f, const float *x, size_t M, float *out, nz_error *err);

/* -------------------------------------------------------------- adapter */

/** Residual adapter: x + up(relu(down x + b1)) + b2. down [r x d], up [d x r]. */
typedef struct nz_adapter {
    nz_linear down, up;
} nz_adapter;

int nz_adapter_bind(nz_adapter *ad, const nz_model *m, const char *down_w, const char *down_b,
                    const char *up_w, const char *up_b, size_t d_model, nz_error *err);

void nz_adapter_free(nz_adapter *ad);

/** x[M x d] += up(relu(down x + b1)) + b2, in place. @return NZ_OK or an error. */
int nz_adapter_fwd(nz_matmul_ctx *mc, const nz_adapter *ad, float *x, size_t M, nz_error *err);

/* ---------------------------------------------------------------- block */

/** One encoder or decoder layer:
 *    pre-norm:  x += SA(n1(x)); [x += CA(n2(x), enc)]; x += FFN(n3(x)); [adapter]
 *    post-norm: x = n1(x + SA(x)); [x = n2(x + CA(x, enc))]; x = n3(x + FFN(x)); [adapter]
 *  The adapter (when present) runs on the block output. */
typedef struct nz_block {
    int pre_norm;
    nz_attn self;
    nz_norm self_norm;
    int has_cross;
    nz_attn cross;
    nz_norm cross_norm;
    nz_ffn ffn;
    nz_norm ffn_norm;
    nz_adapter *adapter; /* NULL: none; borrowed (owned by the model) */
} nz_block;

void nz_block_free(nz_block *b);

/** Inputs of a block forward call besides x. */
typedef struct nz_block_io {
    size_t B, T;               /* x is [B x T x d_model] */
    const uint8_t *self_pad;   /* [B x T] padding of x, or NULL */
    int causal;                /* causal self-attention */
    nz_kv *self_kv;            /* incremental self-attention cache, or NULL */
    const uint32_t *self_rows; /* [B] the cache row of each sequence (T = 1: nz_attn_self_rows), or NULL */
    const float *self_bias;    /* [H x T x Tk] or NULL */
    const nz_kv *cross_kv;     /* encoder keys/values (has_cross) */
    const uint32_t *kv_map;    /* [B] encoder row per query row, or NULL */
    const float *cross_bias;   /* [H x T x S] or NULL */
    /* per-group adapters (several decoders batched in one call): sequences
     * [g * group_B, (g + 1) * group_B) use adapters[g] (NULL entry: none)
     * instead of b->adapter; adapters NULL: b->adapter for every row */
    const nz_adapter *const *adapters; /* [B / group_B] */
    size_t group_B;
} nz_block_io;

/** x[B x T x d_model] = block(x), in place. @return NZ_OK or an error. */
int nz_block_fwd(nz_matmul_ctx *mc, const nz_block *b, float *x, const nz_block_io *io, nz_error *err);

/* ---------------------------------------------------- memory estimates */
/* Peak bytes (NZ_MEM_ACTIVATIONS) the layer calls above allocate, from their
 * shapes alone, for the model families' per-request estimates
 * (nz_nat_*_peak_bytes, nz_t5md_peak_bytes). Doubles: estimates add many
 * terms (exact below 2^53 bytes); nz_mem_bytes saturates the sum. A change
 * to the allocations of these calls must change these functions
 * (tests/test_mem_estimate.c checks the estimates against measured peaks). */

/** nz_attn_self over B x T rows of attention width I (heads x head size)
 *  attending Tk keys (with a cache, kv != 0: its length after the step):
 *  q, k, v, the key padding copy (with a cache) and attend's context.
 *  @return bytes. */
double nz_attn_self_peak(double B, double T, double I, int kv, double Tk);

/** nz_attn_cross of M query rows over a cache of kvB x S keys: q, the
 *  padding copy of the cache and attend's context. @return bytes. */
double nz_attn_cross_peak(double M, double I, double kvB, double S);

/** @return v bytes as an integer, saturated at UINT64_MAX (v >= 0). */
static inline uint64_t nz_mem_bytes(double v) {
    return v >= 18446744073709551615.0 ? UINT64_MAX : (uint64_t)v;
}

#ifdef __cplusplus
}
#endif
#endif /* NZ_LAYER_H */
