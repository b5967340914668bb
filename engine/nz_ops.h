/*
 * nz_ops.h — weight-free transformer kernels on fp32 activations.
 *
 * Everything here works on row-major fp32 matrices with M rows (batch x
 * positions flattened) and touches no model weights: norms take their gain
 * and bias as plain arrays, positions and biases are computed, sampling takes
 * logits. Kernels are straight-line loops (llama2.c style); the reference
 * definitions they follow are named on each function (PyTorch / fairseq /
 * Hugging Face T5), and tests/python/test_parity.py checks them against
 * PyTorch.
 *
 * Conventions: x[M x D] means M rows of D floats, contiguous. In-place use
 * (y == x) is allowed wherever a function says so. Functions that cannot fail
 * return void; those that can return NZ_OK or an NZ_E_* code (nz_common.h).
 */
#ifndef NZ_OPS_H
#define NZ_OPS_H

#include "nz_common.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------ norms */

/** LayerNorm over the last dim (torch.nn.LayerNorm, biased variance):
 *  y = (x - mean) / sqrt(var + eps) * g + b. g[D] (NULL: 1), b[D] (NULL: 0).
 *  x[M x D] -> y[M x D]; y == x allowed. */
void nz_layernorm(float *y, const float *x, const float *g, const float *b, size_t M, size_t D, float eps);

/** RMSNorm (T5LayerNorm): y = x / sqrt(mean(x^2) + eps) * g. g[D] (NULL: 1).
 *  x[M x D] -> y[M x D]; y == x allowed. */
void nz_rmsnorm(float *y, const float *x, const float *g, size_t M, size_t D, float eps);

/* ------------------------------------------------------------ activations */

/** In place over x[n]: max(x, 0). */
void nz_relu(float *x, size_t n);

/** In place over x[n]: exact GELU, x * 0.5 * (1 + erf(x / sqrt(2)))
 *  (torch.nn.functional.gelu, fairseq "gelu"). */
void nz_gelu(float *x, size_t n);

/** In place over x[n]: tanh approximation of GELU,
 *  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (HF "gelu_new", T5 v1.1). */
void nz_gelu_tanh(float *x, size_t n);

/** y[i] += b[i % N] for y[M x N] (bias add per row). */
void nz_add_bias(float *y, const float *b, size_t M, size_t N);

/** y[i] += x[i] for i < n (residual add). */
void nz_add(float *y, const float *x, size_t n);

/** y[i] *= x[i] for i < n (gating). */
void nz_mul(float *y, const float *x, size_t n);

/** x[i] *= s for i < n. */
void nz_scale(float *x, size_t n, float s);

/* ------------------------------------------------------- softmax and picks */

/** Softmax over each row of x[M x N], in place, max-subtracted. */
void nz_softmax(float *x, size_t M, size_t N);

/** Log-softmax over each row of x[M x N], in place:
 *  x - max - log(sum(exp(x - max))). */
void nz_log_softmax(float *x, size_t M, size_t N);

/** @return the index of the largest x[i], i < n (the first one on ties;
 *  NaN never wins unless every value is NaN, then 0). n must be > 0. */
size_t nz_argmax(const float *x, size_t n);

/** The k largest values of x[n] in descending order (ties: lower index
 *  first), their indices in idx[k] and values in val[k] (val may be NULL).
 *  k is clamped to n. @return the number written, min(k, n). */
size_t nz_topk(const float *x, size_t n, size_t k, uint32_t *idx, float *val);

/* --------------------------------------------------------------- sampling */

/** Seeded random generator (xoshiro256**, seeded through splitmix64): the
 *  same seed gives the same sequence on every machine. */
typedef struct nz_rng {
    uint64_t s[4];
} nz_rng;

/** Seed r from seed (any value, 0 included). */
void nz_rng_seed(nz_rng *r, uint64_t seed);

/** @return the next 64 random bits. */
uint64_t nz_rng_next(nz_rng *r);

/** @return a uniform float in [0, 1) with 24 random bits. */
float nz_rng_float(nz_rng *r);

/** Sampling knobs. temperature <= 0 means greedy (argmax); top_k == 0 means
 *  no top-k cut; top_p >= 1 means no nucleus cut. */
typedef struct nz_sampler {
    float temperature; /* logits are divided by it */
    uint32_t top_k;    /* keep the k most likely tokens */
    float top_p;       /* keep the smallest prefix (by probability) whose mass >= top_p */
} nz_sampler;

/** Draw one token from logits[n] with s and rng: divide by temperature,
 *  keep top-k, softmax, keep the nucleus top-p (always at least one token),
 *  renormalise, draw. Deterministic for a given rng state. work holds n
 *  floats + n uint32 (caller-owned; see nz_sample_work_bytes).
 *  @return the token index in [0, n); greedy when temperature <= 0. */
uint32_t nz_sample(const float *logits, size_t n, const nz_sampler *s, nz_rng *rng, void *work);

/** @return bytes of work nz_sample needs for a vocabulary of n. */
size_t nz_sample_work_bytes(size_t n);

/* --------------------------------------------------------------- positions */

/** fairseq SinusoidalPositionalEmbedding for position numbers pos[M]:
 *  half = D/2, f_i = exp(-i * log(10000) / (half - 1)), row = [sin(p f_0..),
 *  cos(p f_0..)] (sin half first, then cos half; a zero column when D is
 *  odd). Rows whose pos == padding_idx are zero (fairseq zeroes the padding
 *  row). out[M x D]. */
void nz_sinusoidal_positions(float *out, const int64_t *pos, size_t M, size_t D, int64_t padding_idx);

/** fairseq make_positions: position numbers for tokens[B x T] where pad
 *  tokens get padding_idx and the others padding_idx + 1, + 2, ... counting
 *  non-pad tokens from the left (what LearnedPositionalEmbedding and
 *  SinusoidalPositionalEmbedding look up). start adds an offset for
 *  incremental decoding (the number of tokens already decoded). out[B x T]. */
void nz_fairseq_positions(int64_t *out, const int32_t *tokens, size_t B, size_t T, int32_t padding_idx,
                          int64_t start);

/** T5 relative position bucket (HF T5Attention._relative_position_bucket)
 *  for rel = key_pos - query_pos. Bidirectional: half the buckets per sign.
 *  Exact buckets for |rel| < num_buckets/2 (or /4 bidirectional), then
 *  logarithmic up to max_distance. @return the bucket in [0, num_buckets). */
int nz_t5_bucket(int64_t rel, int bidirectional, int num_buckets, int max_distance);

/** T5 position bias: out[H x Tq x Tk][h][i][j] = table[bucket(j + k0 - (i + q0))][h]
 *  where table is the relative_attention_bias embedding [num_buckets x H].
 *  q0 / k0 are the absolute positions of the first query / key (q0 = step
 *  during incremental decoding). */
void nz_t5_position_bias(float *out, const float *table, size_t H, size_t Tq, size_t Tk, int64_t q0,
                         int64_t k0, int bidirectional, int num_buckets, int max_distance);

/* -------------------------------------------------------------- attention */

/** Scaled dot-product attention core, all heads, all batch rows.
 *
 *  q[B x Tq x H*dh] (row stride ldq), k and v: key/value rows of batch row b
 *  start at k + kv_row(b) * kv_bstride, rows of stride ldkv, Tk of them;
 *  kv_row(b) = kv_map ? kv_map[b] : b (lets many query rows share one
 *  encoder's keys: length beam, several decoders).
 *  For each b, head h, query i:
 *    s_j = scale * <q_i, k_j> + bias[h][i][j]       (bias may be NULL)
 *    s_j = -inf when key_pad[kv_row(b) * Tk + j]   (key_pad may be NULL; 1 = padding)
 *    s_j = -inf when causal and j > q0 + i          (q0 = position of query 0 among the keys)
 *    out_i = sum_j softmax(s)_j v_j
 *  A query row whose keys are all masked gets zeros (no NaN).
 *  out[B x Tq x H*dh] (row stride ldo). work holds nz_attention_work_floats(Tk)
 *  floats (caller-owned).
 *  Batch-invariant: masked keys are skipped, not weighted by zero, and each
 *  output is one fixed sequence of fp32 operations over its visible keys in
 *  key order, so a sequence gets bit-identical outputs whatever Tk (how far
 *  its batch is padded), B and the other batch rows.
 */
typedef struct nz_attn_args {
    const float *q;
    size_t ldq;
    const float *k, *v;
    size_t ldkv;
    size_t kv_bstride; /* floats between consecutive kv batch rows (>= Tk * ldkv) */
    const uint32_t *kv_map;
    const uint8_t *key_pad; /* [nkv x Tk] */
    const float *bias;      /* [H x Tq x Tk] shared by every batch row */
    size_t B, Tq, Tk, H, dh;
    int causal;
    int64_t q0;
    float scale;
    float *out;
    size_t ldo;
} nz_attn_args;

/** Run the attention of a (see nz_attn_args). work: nz_attention_work_floats(a->Tk). */
void nz_attention(const nz_attn_args *a, float *work);

/** The part of nz_attention for (batch row, head) pairs p in [p0, p1),
 *  p = b * H + h (pairs past B * H are ignored): pairs write disjoint parts of
 *  out, so threads may run disjoint ranges at once, each with its own work
 *  (nz_attention_work_floats(a->Tk)), with the same bits as one call. */
void nz_attention_pairs(const nz_attn_args *a, size_t p0, size_t p1, float *work);

/** @return floats of work nz_attention needs for Tk keys. */
size_t nz_attention_work_floats(size_t Tk);

#ifdef __cplusplus
}
#endif
#endif /* NZ_OPS_H */
