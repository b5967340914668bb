/* XXH3-64 built for AVX2 (the Makefile adds -mavx2; without it this is the
 * portable build, still correct). Called only when the CPU has AVX2. */
#include "nz_hash.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

uint64_t nz_hash_avx2(const void *data, size_t size) { return XXH3_64bits(data, size); }
