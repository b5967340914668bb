/*
 * nz_alloc.h — counted allocator (redis zmalloc style).
 *
 * Every engine allocation goes through nz_malloc()/nz_free() with a category,
 * so the process can report current and peak bytes per category. Blocks are
 * 64-byte aligned (cache line / AVX-512 friendly); a 64-byte hidden header
 * before each block records its size and category, so nz_free() needs only
 * the pointer. Counters are atomic: safe from any thread.
 */
#ifndef NZ_ALLOC_H
#define NZ_ALLOC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum nz_mem_cat {
    NZ_MEM_WEIGHTS = 0, /* compressed weights read into memory (not mmap) */
    NZ_MEM_MAPPED,      /* model files mapped read-only (address space; see RSS for residency) */
    NZ_MEM_TILE_CACHE,  /* decoded tile cache */
    NZ_MEM_SCRATCH,     /* decode scratch buffers, codec work space */
    NZ_MEM_KV,          /* attention key/value caches */
    NZ_MEM_ACTIVATIONS, /* activations */
    NZ_MEM_OTHER,       /* headers, directories, strings, everything else */
    NZ_MEM_NCAT
} nz_mem_cat;

/** Allocate n bytes (64-byte aligned) counted under cat.
 *  @return the block, or NULL when out of memory (n == 0 gives a valid block). */
void *nz_malloc(size_t n, nz_mem_cat cat);

/** Like nz_malloc, zero-filled; count*size overflow returns NULL.
 *  @return the block or NULL. */
void *nz_calloc(size_t count, size_t size, nz_mem_cat cat);

/** Resize a block keeping its category and contents (up to the smaller size).
 *  @return the new block, or NULL (the old block is then left untouched). */
void *nz_realloc(void *p, size_t n);

/** Resize the array *p (void ** in disguise: NULL, or a block from here) to
 *  n elements of sz bytes; a new block is counted under cat, a resized one
 *  keeps its category.
 *  @return 0, or -1 when out of memory or n x sz overflows (*p unchanged). */
int nz_resize_array(void *p, size_t n, size_t sz, nz_mem_cat cat);

/** @return the capacity an array of have elements grows to for need: have
 *  (8 when 0) doubled until it holds need. */
size_t nz_grow_cap(size_t have, size_t need);

/** Free a block from nz_malloc/nz_calloc/nz_realloc. Accepts NULL. */
void nz_free(void *p);

/** Duplicate a string into an NZ_MEM_OTHER block. @return copy or NULL. */
char *nz_strdup(const char *s);

/** @return bytes currently allocated in cat. */
size_t nz_mem_current(nz_mem_cat cat);

/** @return the highest value nz_mem_current(cat) has reached. */
size_t nz_mem_peak(nz_mem_cat cat);

/** Bit of category cat in a category mask (nz_mem_window_begin). */
#define NZ_MEM_MASK(cat) (1u << (unsigned)(cat))

/** Start the measurement window: from now on, the sum of the current bytes
 *  of the categories in mask (NZ_MEM_MASK(cat) bits, e.g.
 *  NZ_MEM_MASK(NZ_MEM_ACTIVATIONS) | NZ_MEM_MASK(NZ_MEM_KV)) is tracked
 *  relative to its value now, with its peak. One window per process: a new
 *  call restarts it (with the new mask). It counts every thread's
 *  allocations in those categories, so measure one piece of work at a time;
 *  allocations racing with this call may or may not be counted. The cost
 *  is one atomic add and compare per counted allocation while a window is
 *  open, one relaxed load otherwise. mask 0 closes the window. */
void nz_mem_window_begin(unsigned mask);

/** @return the highest sum of the window's categories seen since
 *  nz_mem_window_begin, minus the sum at its start (0 when it never rose
 *  above it, e.g. only frees of older blocks; 0 without a window). */
size_t nz_mem_window_peak(void);

/** Stop tracking (nz_mem_window_peak keeps the peak reached so far). */
void nz_mem_window_end(void);

/** Add (or with a negative delta, remove) bytes that are held outside
 *  nz_malloc, e.g. an mmap of a model file, so reports include them. */
void nz_mem_account(nz_mem_cat cat, int64_t delta);

/** Register a read-only file mapping [addr, addr + len) held outside
 *  nz_malloc (a model file): counted under NZ_MEM_MAPPED, and the report
 *  measures how much of it is resident (mincore). At most 256 mappings are
 *  tracked for residency; beyond that they are only counted.
 *  @return NZ_OK (always; residency tracking is best effort). */
int nz_mem_map_register(const void *addr, size_t len);

/** Forget a mapping registered with nz_mem_map_register (before munmap). */
void nz_mem_map_unregister(const void *addr, size_t len);

/** @return bytes of the registered mappings now resident in memory
 *  (page-cache pages mapped by this process, from mincore). */
size_t nz_mem_mapped_resident(void);

/** @return a static name for a category ("weights", "tile_cache", ...). */
const char *nz_mem_cat_name(nz_mem_cat cat);

/** The memory report: every category's current and peak bytes plus the
 *  process's resident set from the OS. */
typedef struct nz_mem_report {
    size_t current[NZ_MEM_NCAT];    /* bytes now, per category */
    size_t peak[NZ_MEM_NCAT];       /* highest bytes seen, per category */
    size_t counted;                 /* sum of current over the heap categories (all but mapped) */
    size_t other_heap;              /* bytes malloc has in use beyond counted: other libraries' own
                                       allocations (e.g. a tokenizer's, OpenBLAS's) and chunk headers
                                       (glibc mallinfo2 uordblks + hblkhd - counted), 0 if unknown */
    size_t mapped_resident;         /* bytes of mapped model files resident now (mincore) */
    size_t rss;                     /* resident set size (VmRSS), 0 if unknown */
    size_t rss_peak;                /* peak resident set size (VmHWM), 0 if unknown */
    size_t allocator_free;          /* bytes in malloc's free lists (glibc mallinfo2 fordblks), resident or
                                       not (malloc_trim returns pages but keeps the chunks), 0 if unknown
                                       (e.g. under a sanitizer) */
    size_t allocator_free_resident; /* the resident part of allocator_free: the main arena's resident
                                       pages (mincore over [heap]) less malloc's bytes in use, 0 if unknown */
    size_t anon_resident;           /* anonymous resident bytes (RssAnon: heap, stacks, libraries' buffers) */
    size_t file_resident;           /* file-backed resident bytes (RssFile: the mapped models, code and
                                       libraries), 0 if unknown */
    size_t code_resident;           /* file_resident less mapped_resident: executable, shared libraries */
    size_t accounted;               /* counted + other_heap + allocator_free_resident + file_resident: the
                                       part of rss the report explains (the rest: thread stacks and memory
                                       libraries map themselves, such as OpenBLAS's buffers) */
} nz_mem_report;

/** Fill r. @return NZ_OK, or NZ_E_IO when /proc/self/status cannot be read
 *  (the counters are filled anyway; rss fields are then 0). */
int nz_mem_get_report(nz_mem_report *r);

/** Return malloc's free memory to the OS (glibc malloc_trim) when it holds
 *  more than min_free bytes free: a long-running server calls it after a
 *  large job, so its RSS goes back to its warm level instead of keeping the
 *  job's peak. @return the bytes held free before (0 where unknown). */
size_t nz_mem_trim(size_t min_free);

/** r as a JSON object, the one layout of every memory report (`nzp info
 *  --memory --json`, the server's /v1/memory): {"categories": {NAME:
 *  {"current_bytes", "peak_bytes"}}, "counted_heap_bytes", "other_heap_bytes",
 *  "mapped_resident_bytes", "rss_bytes", "rss_peak_bytes", "anon_resident_bytes",
 *  "allocator_free_bytes", "allocator_free_resident_bytes",
 *  "code_resident_bytes", "accounted_bytes",
 *  "accounted_fraction" (of rss), "allocator": "glibc" or "asan"}; callers add
 *  their own keys. @return a new object, or NULL when out of memory. */
struct json_t *nz_mem_report_json(const nz_mem_report *r);

/** Route jansson's allocations through the counter (category other).
 *  Runs automatically before main() (a constructor in nz_alloc.c); calling it
 *  again is harmless. */
void nz_alloc_hook_json(void);

#ifdef __cplusplus
}
#endif
#endif /* NZ_ALLOC_H */
