/*
 * nz_cache.c — decoded-tile cache (see nz_cache.h).
 *
 * Layout: a chained hash table keyed by (model, tensor, tile) plus a doubly
 * linked LRU list (head = most recently used). One mutex protects both and
 * the counters; it is never held while a tile is decoded.
 *
 * Budget accounting: `bytes` is what inserted entries hold; `reserved` is
 * what misses in flight have been promised. A miss reserves its tile's size
 * (evicting unpinned LRU entries to make room) before it decodes, so the
 * decoded tile memory owned by the cache stays within the budget even while
 * several threads decode at once. Insertion re-checks the fit (the budget may
 * have shrunk meanwhile); a tile that no longer fits is handed back in the
 * caller's scratch instead.
 */
#include "nz_cache.h"

#include "nz_alloc.h"

#include <inttypes.h>
#include <pthread.h>
#include <string.h>
#include <time.h>

typedef struct nz_centry {
    const nz_model *model;         /* key */
    size_t ti;                     /* key */
    uint64_t t;                    /* key */
    uint64_t hash;                 /* hash of the key */
    size_t bytes;                  /* nrows * cols * sizeof(float) */
    size_t pins;                   /* outstanding refs; pinned entries are never evicted */
    float *data;                   /* NZ_MEM_TILE_CACHE block */
    struct nz_centry *hnext;       /* hash chain */
    struct nz_centry *prev, *next; /* LRU list */
} nz_centry;

struct nz_tile_cache {
    pthread_mutex_t lock;
    nz_centry **buckets; /* nbuckets chains */
    size_t nbuckets;     /* power of two */
    nz_centry *head;     /* most recently used */
    nz_centry *tail;     /* least recently used */
    size_t reserved;     /* bytes promised to misses being decoded */
    size_t pinned;       /* bytes of entries with pins > 0 */
    nz_cache_stats st;   /* counters, bytes, entries, budget */
};

#define NZ_CACHE_MIN_BUCKETS 64

/* ------------------------------------------------------------ helpers */

static uint64_t key_hash(const nz_model *m, size_t ti, uint64_t t) {
    /* splitmix64 finaliser over a combination of the three key parts */
    uint64_t x = (uint64_t)(uintptr_t)m;
    x ^= (uint64_t)ti * 0x9E3779B97F4A7C15ULL;
    x ^= t * 0xC2B2AE3D27D4EB4FULL + (x << 6) + (x >> 2);
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBULL;
    x ^= x >> 31;
    return x;
}

static nz_centry *find(nz_tile_cache *c, const nz_model *m, size_t ti, uint64_t t, uint64_t h) {
    nz_centry *e = c->buckets[h & (c->nbuckets - 1)];
    for (; e; e = e->hnext)
        if (e->hash == h && e->model == m && e->ti == ti && e->t == t) return e;
    return NULL;
}

static void lru_unlink(nz_tile_cache *c, nz_centry *e) {
    if (e->prev)
        e->prev->next = e->next;
    else
        c->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        c->tail = e->prev;
    e->prev = e->next = NULL;
}

static void lru_push_front(nz_tile_cache *c, nz_centry *e) {
    e->prev = NULL;
    e->next = c->head;
    if (c->head) c->head->prev = e;
    c->head = e;
    if (!c->tail) c->tail = e;
}

/* Double the table when it gets as many entries as buckets. Failure to grow
 * is harmless: the chains just get longer. */
static void maybe_grow(nz_tile_cache *c) {
    if (c->st.entries < c->nbuckets) return;
    size_t n = c->nbuckets * 2;
    nz_centry **b = nz_calloc(n, sizeof *b, NZ_MEM_OTHER);
    if (!b) return;
    for (size_t i = 0; i < c->nbuckets; i++) {
        nz_centry *e = c->buckets[i];
        while (e) {
            nz_centry *next = e->hnext;
            size_t j = e->hash & (n - 1);
            e->hnext = b[j];
            b[j] = e;
            e = next;
        }
    }
    nz_free(c->buckets);
    c->buckets = b;
    c->nbuckets = n;
}

static void table_insert(nz_tile_cache *c, nz_centry *e) {
    maybe_grow(c);
    size_t j = e->hash & (c->nbuckets - 1);
    e->hnext = c->buckets[j];
    c->buckets[j] = e;
    lru_push_front(c, e);
    c->st.entries++;
    c->st.bytes += e->bytes;
    if (c->st.bytes > c->st.peak_bytes) c->st.peak_bytes = c->st.bytes;
}

/* Unlink e from the table and the list and free it. e must be unpinned. */
static void table_remove(nz_tile_cache *c, nz_centry *e) {
    nz_centry **pp = &c->buckets[e->hash & (c->nbuckets - 1)];
    while (*pp != e) pp = &(*pp)->hnext;
    *pp = e->hnext;
    lru_unlink(c, e);
    c->st.entries--;
    c->st.bytes -= e->bytes;
    nz_free(e->data);
    nz_free(e);
}

static int fits(const nz_tile_cache *c, size_t held, size_t need) {
    return need <= c->st.budget && held + c->reserved <= c->st.budget - need;
}

/* Evict unpinned entries, least recently used first, until held plus
 * reserved bytes plus need fit the budget (or nothing evictable is left). */
static void evict_to(nz_tile_cache *c, size_t need) {
    nz_centry *e = c->tail;
    while (e && !fits(c, c->st.bytes, need)) {
        nz_centry *prev = e->prev;
        if (e->pins == 0) {
            table_remove(c, e);
            c->st.evictions++;
        }
        e = prev;
    }
}

/* Make room for need more bytes. Evicts nothing for a tile that cannot fit
 * even with every unpinned entry gone (beyond trimming to the budget).
 * @return 1 when need bytes fit now. */
static int make_room(nz_tile_cache *c, size_t need) {
    if (!fits(c, c->pinned, need)) {
        evict_to(c, 0);
        return 0;
    }
    evict_to(c, need);
    return fits(c, c->st.bytes, need);
}

static void pin(nz_tile_cache *c, nz_centry *e) {
    if (e->pins++ == 0) c->pinned += e->bytes;
    lru_unlink(c, e);
    lru_push_front(c, e);
}

/* -------------------------------------------------------------- public */

nz_tile_cache *nz_cache_create(size_t budget) {
    nz_tile_cache *c = nz_calloc(1, sizeof *c, NZ_MEM_OTHER);
    if (!c) return NULL;
    c->nbuckets = NZ_CACHE_MIN_BUCKETS;
    c->buckets = nz_calloc(c->nbuckets, sizeof *c->buckets, NZ_MEM_OTHER);
    if (!c->buckets || pthread_mutex_init(&c->lock, NULL) != 0) {
        nz_free(c->buckets);
        nz_free(c);
        return NULL;
    }
    c->st.budget = budget;
    return c;
}

void nz_cache_free(nz_tile_cache *c) {
    if (!c) return;
    nz_centry *e = c->head;
    while (e) {
        nz_centry *next = e->next;
        nz_free(e->data);
        nz_free(e);
        e = next;
    }
    nz_free(c->buckets);
    pthread_mutex_destroy(&c->lock);
    nz_free(c);
}

int nz_cache_get(nz_tile_cache *c, const nz_model *m, size_t ti, uint64_t t, nz_dctx *dc, float *scratch,
                 nz_cache_ref *ref, nz_error *err) {
    if (!c || !m || !dc || !ref) return nz_fail(err, NZ_E_INVALID_ARG, "nz_cache_get: NULL argument");
    ref->data = NULL;
    ref->entry = NULL;

    const nz_tensor *x = nz_model_tensor(m, ti);
    if (!x || t >= x->ntiles) {
        const uint8_t *p; /* let the container name the bad index */
        size_t n;
        return nz_model_tile(m, ti, t, &p, &n, err);
    }
    size_t need = (size_t)(nz_desc_tile_nrows(&x->desc, t) * x->desc.cols * sizeof(float));
    uint64_t h = key_hash(m, ti, t);

    /* Lookup; on a miss, reserve room for the tile if it can fit. */
    pthread_mutex_lock(&c->lock);
    nz_centry *e = find(c, m, ti, t, h);
    if (e) {
        pin(c, e);
        c->st.hits++;
        pthread_mutex_unlock(&c->lock);
        ref->data = e->data;
        ref->entry = e;
        return NZ_OK;
    }
    c->st.misses++;
    int reserve = c->st.budget > 0 && make_room(c, need);
    if (reserve) c->reserved += need;
    pthread_mutex_unlock(&c->lock);

    /* Buffers for a new entry, allocated outside the lock. Out of memory is
     * not an error: the tile goes to scratch. */
    nz_centry *ne = NULL;
    if (reserve) {
        ne = nz_calloc(1, sizeof *ne, NZ_MEM_OTHER);
        if (ne) ne->data = nz_malloc(need, NZ_MEM_TILE_CACHE);
        if (ne && !ne->data) {
            nz_free(ne);
            ne = NULL;
        }
    }
    if (!ne && !scratch) {
        if (reserve) {
            pthread_mutex_lock(&c->lock);
            c->reserved -= need;
            pthread_mutex_unlock(&c->lock);
        }
        return nz_fail(err, NZ_E_INVALID_ARG, "tensor '%s' tile %" PRIu64 ": tile not cached and no scratch",
                       x->name, t);
    }

    /* Decode, unlocked. */
    float *out = ne ? ne->data : scratch;
    uint64_t t0 = nz_now_ns();
    int rc = nz_model_decode_f32(m, dc, ti, t, out, err);
    uint64_t dt = nz_now_ns() - t0;

    pthread_mutex_lock(&c->lock);
    c->st.decode_ns += dt;
    if (reserve) c->reserved -= need;
    if (rc != NZ_OK) {
        pthread_mutex_unlock(&c->lock);
        if (ne) {
            nz_free(ne->data);
            nz_free(ne);
        }
        return rc;
    }
    c->st.tiles_decoded++;

    if (ne) {
        nz_centry *old = find(c, m, ti, t, h);
        if (old) { /* another thread inserted it meanwhile: use theirs */
            pin(c, old);
            pthread_mutex_unlock(&c->lock);
            nz_free(ne->data);
            nz_free(ne);
            ref->data = old->data;
            ref->entry = old;
            return NZ_OK;
        }
        if (make_room(c, need)) { /* re-check: the budget may have shrunk */
            ne->model = m;
            ne->ti = ti;
            ne->t = t;
            ne->hash = h;
            ne->bytes = need;
            ne->pins = 1;
            c->pinned += need;
            table_insert(c, ne);
            pthread_mutex_unlock(&c->lock);
            ref->data = ne->data;
            ref->entry = ne;
            return NZ_OK;
        }
        if (!scratch) {
            pthread_mutex_unlock(&c->lock);
            nz_free(ne->data);
            nz_free(ne);
            return nz_fail(err, NZ_E_INVALID_ARG,
                           "tensor '%s' tile %" PRIu64 ": tile not cached and no scratch", x->name, t);
        }
        c->st.uncached++;
        pthread_mutex_unlock(&c->lock);
        memcpy(scratch, ne->data, need);
        nz_free(ne->data);
        nz_free(ne);
        ref->data = scratch;
        return NZ_OK;
    }

    c->st.uncached++;
    pthread_mutex_unlock(&c->lock);
    ref->data = scratch;
    return NZ_OK;
}

void nz_cache_release(nz_tile_cache *c, nz_cache_ref *ref) {
    if (!c || !ref) return;
    nz_centry *e = ref->entry;
    ref->entry = NULL;
    ref->data = NULL;
    if (!e) return;
    pthread_mutex_lock(&c->lock);
    if (e->pins && --e->pins == 0) c->pinned -= e->bytes;
    /* entries pinned across a budget cut are evicted as they are unpinned */
    if (c->st.bytes > c->st.budget) evict_to(c, 0);
    pthread_mutex_unlock(&c->lock);
}

void nz_cache_forget_model(nz_tile_cache *c, const nz_model *m) {
    if (!c) return;
    pthread_mutex_lock(&c->lock);
    nz_centry *e = c->head;
    while (e) {
        nz_centry *next = e->next;
        if (e->model == m && e->pins == 0) table_remove(c, e);
        e = next;
    }
    pthread_mutex_unlock(&c->lock);
}

void nz_cache_set_budget(nz_tile_cache *c, size_t budget) {
    if (!c) return;
    pthread_mutex_lock(&c->lock);
    c->st.budget = budget;
    evict_to(c, 0);
    pthread_mutex_unlock(&c->lock);
}

void nz_cache_get_stats(nz_tile_cache *c, nz_cache_stats *s) {
    if (!s) return;
    if (!c) {
        memset(s, 0, sizeof *s);
        return;
    }
    pthread_mutex_lock(&c->lock);
    *s = c->st;
    pthread_mutex_unlock(&c->lock);
}
