/* XXH3-64 built for AVX-512 (the Makefile adds -mavx512f; without it this is
 * the portable build, still correct). Called only when the CPU has AVX-512F. */
#include "nz_hash.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

uint64_t nz_hash_avx512(const void *data, size_t size) { return XXH3_64bits(data, size); }
