/*
 * nz_cache.h — decoded-tile cache: an LRU of fp32 tiles with a byte budget,
 * shared by every model in the process and safe to use from any thread.
 *
 * The budget is the user's memory/speed knob: 0 decodes on every use (least
 * memory), a budget at least the models' decoded size decodes each tile once
 * (fastest), anything between keeps the most recently used tiles.
 *
 * A lookup pins the entry it returns; pinned entries are never evicted, so a
 * caller can read a tile while other threads insert and evict. When a new
 * tile does not fit (everything evictable is gone and the budget is still
 * exceeded), the tile is decoded into the caller's scratch buffer instead and
 * not cached: the budget is never exceeded by cached bytes.
 *
 * A decode error (checksum mismatch, corrupt data) is returned to the caller
 * and nothing is inserted: a damaged tile never poisons the cache.
 */
#ifndef NZ_CACHE_H
#define NZ_CACHE_H

#include "nz_codec.h"
#include "nz_container.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct nz_tile_cache nz_tile_cache;

/** Counters (monotonic except bytes/entries). */
typedef struct nz_cache_stats {
    uint64_t hits;          /* lookups served from the cache */
    uint64_t misses;        /* lookups that decoded */
    uint64_t evictions;     /* entries dropped to make room */
    uint64_t uncached;      /* misses decoded into scratch because nothing fitted */
    uint64_t decode_ns;     /* total time spent decoding on misses */
    uint64_t tiles_decoded; /* tiles decoded (= misses that succeeded) */
    size_t bytes;           /* bytes of decoded tiles held now */
    size_t peak_bytes;      /* highest bytes seen */
    size_t budget;          /* byte budget */
    size_t entries;         /* tiles held now */
} nz_cache_stats;

/** A lookup's result: the fp32 tile and what to release. */
typedef struct nz_cache_ref {
    const float *data; /* nrows(t) * cols floats */
    void *entry;       /* pinned entry, or NULL when data is the caller's scratch */
} nz_cache_ref;

/** @return a cache holding at most budget bytes of decoded tiles, or NULL
 *  when out of memory. */
nz_tile_cache *nz_cache_create(size_t budget);

/** Free the cache and every entry. All refs must have been released.
 *  Accepts NULL. */
void nz_cache_free(nz_tile_cache *c);

/** Get tile t of tensor ti of model m as fp32. On a hit the cached copy is
 *  pinned; on a miss the tile is decoded with dc (checksum verified) into a
 *  new cache entry when it fits the budget, else into scratch (which must
 *  hold nz_desc_tile_nrows * cols floats). Release every successful ref with
 *  nz_cache_release.
 *  @return NZ_OK and *ref, or the decoder's error (nothing cached). */
int nz_cache_get(nz_tile_cache *c, const nz_model *m, size_t ti, uint64_t t, nz_dctx *dc, float *scratch,
                 nz_cache_ref *ref, nz_error *err);

/** Unpin a ref from nz_cache_get (no-op for scratch refs). */
void nz_cache_release(nz_tile_cache *c, nz_cache_ref *ref);

/** Drop every unpinned entry of model m (call before freeing the model; the
 *  model must have no pinned refs left). */
void nz_cache_forget_model(nz_tile_cache *c, const nz_model *m);

/** Change the budget, evicting unpinned entries down to it. */
void nz_cache_set_budget(nz_tile_cache *c, size_t budget);

/** Snapshot the counters. */
void nz_cache_get_stats(nz_tile_cache *c, nz_cache_stats *s);

#ifdef __cplusplus
}
#endif
#endif /* NZ_CACHE_H */
