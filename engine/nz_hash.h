/*
 * nz_hash.h — XXH3-64, the checksum of the .nzp header, blobs and tiles
 * (nz_container) and a general-purpose hash (nz_tok's symbol table). The
 * value is XXH3's whatever the build: nz_hash.c picks an AVX-512, AVX2 or
 * portable build of the same function at run time.
 */
#ifndef NZ_HASH_H
#define NZ_HASH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/** @return XXH3-64 of data[0..size) (seed 0). Thread-safe. */
uint64_t nz_hash(const void *data, size_t size);

/* The vector builds nz_hash dispatches to (nz_hash_avx2.c, nz_hash_avx512.c). */
uint64_t nz_hash_avx2(const void *data, size_t size);
uint64_t nz_hash_avx512(const void *data, size_t size);

#ifdef __cplusplus
}
#endif
#endif /* NZ_HASH_H */
