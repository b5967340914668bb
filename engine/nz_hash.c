/*
 * nz_hash — XXH3-64, the checksum of tiles, blobs and the .nzp header,
 * dispatched at run time to the widest vector unit the CPU has. XXH3 gives
 * the same value whatever the implementation; the AVX2/AVX-512 builds
 * (nz_hash_avx2.c, nz_hash_avx512.c, compiled with -mavx2 / -mavx512f by the
 * Makefile) just run 2-3x faster than the portable SSE2 one, which matters
 * because every tile decode first checks its checksum.
 */
#include "nz_hash.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

#include <stdatomic.h>

static uint64_t hash_portable(const void *data, size_t size) { return XXH3_64bits(data, size); }

typedef uint64_t (*hash_fn)(const void *, size_t);

static hash_fn pick(void) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return nz_hash_avx512;
    if (__builtin_cpu_supports("avx2")) return nz_hash_avx2;
#endif
    return hash_portable;
}

uint64_t nz_hash(const void *data, size_t size) {
    static _Atomic(hash_fn) fn;
    hash_fn f = atomic_load_explicit(&fn, memory_order_relaxed);
    if (!f) {
        f = pick();
        atomic_store_explicit(&fn, f, memory_order_relaxed);
    }
    return f(data, size);
}
