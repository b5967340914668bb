/*
 * nz_rans.h — 32-way interleaved order-0 rANS for byte symbols (the exponent
 * plane coder).
 *
 * Parameters: probabilities quantised to NZ_RANS_PROB_BITS = 12 bits (sum of
 * frequencies = 4096, every present symbol >= 1, a lone symbol is not coded
 * here: the codec stores it as a constant); 32-bit states kept in
 * [2^16, 2^32); 16-bit renormalisation words; N = 32 or 64 interleaved
 * states ("lanes", chosen by the encoder, stored by the caller: the codec
 * keeps it in the tile header).
 *
 * Stream layout (little-endian):
 *   u32 state[N]           final encoder states = initial decoder states
 *   u16 word[...]          renormalisation words in decoder read order
 * Symbol i belongs to lane i % N. The decoder walks groups of N symbols;
 * within a group lane 0 first; after decoding a lane's symbol, a state below
 * 2^16 reads exactly one next word. The decoder checks that it consumed the
 * whole stream and that every state ends at 2^16 (the encoder's start), so
 * most corruptions are detected even without the tile checksum.
 *
 * Why 64 lanes: decoding is bound by the latency of the table lookup of each
 * state (about 30 cycles on current x86); 64 states give 4 independent
 * 16-wide chains, which doubles throughput over 32. Each state costs ~3 bytes
 * of stream, so the encoder uses 64 lanes only for runs of at least
 * NZ_RANS_WIDE_MIN symbols, keeping the overhead under 0.02 bits/symbol.
 *
 * Decoders: portable scalar, AVX2 (8 lanes per vector, permutation-table
 * renormalisation) and AVX-512 (16 lanes per vector, expand renormalisation);
 * the SIMD ones look the table up with scalar loads, which beat vpgatherdd on
 * AMD Zen 4/5. Chosen at run time; all read and write exactly the same bytes.
 */
#ifndef NZ_RANS_H
#define NZ_RANS_H

#include "nz_common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define NZ_RANS_PROB_BITS  12
#define NZ_RANS_PROB_SCALE (1u << NZ_RANS_PROB_BITS)
#define NZ_RANS_MAX_LANES  64
#define NZ_RANS_WIDE_MIN   98304 /* symbols from which the encoder picks 64 lanes */

/** Quantise symbol counts to frequencies summing to NZ_RANS_PROB_SCALE,
 *  keeping every present symbol >= 1 and minimising the coding cost.
 *  @return the number of distinct symbols present (0 when all counts are 0;
 *          freq is then all zero), or NZ_E_INVALID_ARG when more than
 *          NZ_RANS_PROB_SCALE symbols are present (impossible for bytes). */
int nz_rans_normalize(const uint64_t counts[256], uint32_t freq[256]);

/** Validate a frequency table (sum == NZ_RANS_PROB_SCALE, at least 2 symbols).
 *  @return NZ_OK or NZ_E_FORMAT with a message. */
int nz_rans_check_freq(const uint32_t freq[256], nz_error *err);

/** Build the decoder table: dtab[slot] = freq << 20 | (slot - cum) << 8 | sym.
 *  freq must pass nz_rans_check_freq. */
void nz_rans_build_dtab(const uint32_t freq[256], uint32_t dtab[NZ_RANS_PROB_SCALE]);

/** @return the lane count the encoder policy picks for n symbols (32 or 64). */
int nz_rans_lanes_for(size_t n);

/** @return the most bytes nz_rans_encode can write for n symbols. */
size_t nz_rans_bound(size_t n);

/** Encode sym[0..n) with the given frequencies and lanes (32 or 64) into
 *  dst[0..cap). @return NZ_OK and *out_len, or NZ_E_INVALID_ARG (symbol with
 *  zero frequency, cap too small, bad lane count). */
int nz_rans_encode(const uint8_t *sym, size_t n, const uint32_t freq[256], int lanes, uint8_t *dst,
                   size_t cap, size_t *out_len, nz_error *err);

/** Decode n symbols coded with lanes (32 or 64) from src[0..len) into out[0..n).
 *  @return NZ_OK, NZ_E_TRUNCATED (stream too short), NZ_E_CORRUPT, or
 *          NZ_E_INVALID_ARG (bad lane count). */
int nz_rans_decode(const uint8_t *src, size_t len, int lanes, const uint32_t *dtab, uint8_t *out, size_t n,
                   nz_error *err);

/** Fused bf16 decode: out[i] = float with sign and mantissa from sm[i]
 *  (bit 7 sign, bits 0-6 mantissa) and exponent from the decoded symbol.
 *  @return as nz_rans_decode. */
int nz_rans_decode_bf16(const uint8_t *src, size_t len, int lanes, const uint32_t *dtab, const uint8_t *sm,
                        float *out, size_t n, nz_error *err);

/** Decoder kernels. */
typedef enum nz_rans_kernel {
    NZ_RANS_AUTO = 0, /* the best the CPU supports (default) */
    NZ_RANS_SCALAR,   /* portable C */
    NZ_RANS_AVX2,     /* x86-64 AVX2 */
    NZ_RANS_AVX512    /* x86-64 AVX-512 F/BW/VL */
} nz_rans_kernel;

/** Choose the decoder kernel for the whole process (tests, benchmarks; the
 *  environment variable NZ_SIMD=scalar|avx2|avx512 does the same at first
 *  use). @return NZ_OK, or NZ_E_UNSUPPORTED when this CPU lacks it. */
int nz_rans_set_kernel(nz_rans_kernel k);

/** Shorthand: force the scalar kernel (1) or go back to automatic (0).
 *  @return 1 if the scalar kernel was forced before the call, else 0. */
int nz_rans_force_scalar(int on);

/** @return the kernel that will run (never NZ_RANS_AUTO); the fused
 *  decode-and-multiply kernels (nz_gemv.h) follow the same choice. */
nz_rans_kernel nz_rans_active_kernel(void);

/** @return "avx512", "avx2" or "scalar": the kernel that will run. */
const char *nz_rans_decoder_name(void);

#ifdef __cplusplus
}
#endif
#endif /* NZ_RANS_H */
