#include "nz_alloc.h"

#include "nz_common.h"

#include <jansson.h>
#include <malloc.h>
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>
#include <stdio.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define NZ_ALLOC_HDR 64

typedef struct {
    size_t size;
    int cat;
    uint32_t magic;
} alloc_hdr;

#define NZ_ALLOC_MAGIC 0x4e5a414cu /* "NZAL" */

static _Atomic int64_t g_cur[NZ_MEM_NCAT];
static _Atomic int64_t g_peak[NZ_MEM_NCAT];

/* The measurement window (nz_mem_window_begin): the categories tracked, their
 * summed bytes relative to the window's start, and that sum's peak. */
static _Atomic unsigned g_win_mask;
static _Atomic int64_t g_win_cur;
static _Atomic int64_t g_win_peak;

static void count(int cat, int64_t delta) {
    int64_t now = atomic_fetch_add(&g_cur[cat], delta) + delta;
    int64_t peak = atomic_load(&g_peak[cat]);
    while (now > peak && !atomic_compare_exchange_weak(&g_peak[cat], &peak, now)) {
    }
    if (atomic_load_explicit(&g_win_mask, memory_order_relaxed) & (1u << cat)) {
        int64_t w = atomic_fetch_add_explicit(&g_win_cur, delta, memory_order_relaxed) + delta;
        int64_t wp = atomic_load_explicit(&g_win_peak, memory_order_relaxed);
        while (w > wp && !atomic_compare_exchange_weak_explicit(&g_win_peak, &wp, w, memory_order_relaxed,
                                                                memory_order_relaxed)) {
        }
    }
}

void nz_mem_window_begin(unsigned mask) {
    atomic_store(&g_win_mask, 0u);
    atomic_store(&g_win_cur, 0);
    atomic_store(&g_win_peak, 0);
    atomic_store(&g_win_mask, mask & ((1u << NZ_MEM_NCAT) - 1));
}

size_t nz_mem_window_peak(void) {
    int64_t p = atomic_load(&g_win_peak);
    return p > 0 ? (size_t)p : 0;
}

void nz_mem_window_end(void) { atomic_store(&g_win_mask, 0u); }

void nz_mem_account(nz_mem_cat cat, int64_t delta) {
    if ((unsigned)cat < NZ_MEM_NCAT) count((int)cat, delta);
}

void *nz_malloc(size_t n, nz_mem_cat cat) {
    if ((unsigned)cat >= NZ_MEM_NCAT || n > SIZE_MAX - 2 * NZ_ALLOC_HDR) return NULL;
    void *raw = NULL;
    if (posix_memalign(&raw, NZ_ALLOC_HDR, NZ_ALLOC_HDR + n) != 0) return NULL;
    alloc_hdr *h = raw;
    h->size = n;
    h->cat = (int)cat;
    h->magic = NZ_ALLOC_MAGIC;
    count((int)cat, (int64_t)n);
    return (char *)raw + NZ_ALLOC_HDR;
}

void *nz_calloc(size_t cnt, size_t size, nz_mem_cat cat) {
    if (size && cnt > SIZE_MAX / size) return NULL;
    void *p = nz_malloc(cnt * size, cat);
    if (p) memset(p, 0, cnt * size);
    return p;
}

void nz_free(void *p) {
    if (!p) return;
    alloc_hdr *h = (alloc_hdr *)((char *)p - NZ_ALLOC_HDR);
    count(h->cat, -(int64_t)h->size);
    h->magic = 0;
    free(h);
}

void *nz_realloc(void *p, size_t n) {
    if (!p) return nz_malloc(n, NZ_MEM_OTHER);
    alloc_hdr *h = (alloc_hdr *)((char *)p - NZ_ALLOC_HDR);
    void *q = nz_malloc(n, (nz_mem_cat)h->cat);
    if (!q) return NULL;
    memcpy(q, p, h->size < n ? h->size : n);
    nz_free(p);
    return q;
}

int nz_resize_array(void *p, size_t n, size_t sz, nz_mem_cat cat) {
    void *o = *(void **)p;
    if (n && sz > (SIZE_MAX - 1) / n) return -1;
    void *q = o ? nz_realloc(o, n * sz + 1) : nz_malloc(n * sz + 1, cat);
    if (!q) return -1;
    *(void **)p = q;
    return 0;
}

size_t nz_grow_cap(size_t have, size_t need) {
    size_t n = have ? have : 8;
    while (n < need && n <= SIZE_MAX / 2) n *= 2;
    return n < need ? need : n;
}

char *nz_strdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = nz_malloc(n, NZ_MEM_OTHER);
    if (d) memcpy(d, s, n);
    return d;
}

size_t nz_mem_current(nz_mem_cat cat) {
    if ((unsigned)cat >= NZ_MEM_NCAT) return 0;
    int64_t v = atomic_load(&g_cur[cat]);
    return v > 0 ? (size_t)v : 0;
}

size_t nz_mem_peak(nz_mem_cat cat) {
    if ((unsigned)cat >= NZ_MEM_NCAT) return 0;
    int64_t v = atomic_load(&g_peak[cat]);
    return v > 0 ? (size_t)v : 0;
}

const char *nz_mem_cat_name(nz_mem_cat cat) {
    static const char *names[NZ_MEM_NCAT] = {"weights",  "mapped",      "tile_cache", "scratch",
                                             "kv_cache", "activations", "other"};
    return (unsigned)cat < NZ_MEM_NCAT ? names[cat] : "invalid";
}

static void *json_malloc(size_t n) { return nz_malloc(n, NZ_MEM_OTHER); }

void nz_alloc_hook_json(void) {
    static atomic_int done;
    if (atomic_exchange(&done, 1)) return;
    json_set_alloc_funcs(json_malloc, nz_free);
}

/* Install the hook before main(): a JSON value allocated by plain malloc
 * before the hook and freed after it would corrupt the heap. */
__attribute__((constructor)) static void hook_json_at_start(void) { nz_alloc_hook_json(); }

/* ------------------------------------------------------ file mappings */

#define MAX_MAPS 256
static struct {
    const void *addr;
    size_t len;
} g_maps[MAX_MAPS];
static pthread_mutex_t g_maps_lock = PTHREAD_MUTEX_INITIALIZER;

int nz_mem_map_register(const void *addr, size_t len) {
    nz_mem_account(NZ_MEM_MAPPED, (int64_t)len);
    pthread_mutex_lock(&g_maps_lock);
    for (int i = 0; i < MAX_MAPS; i++)
        if (!g_maps[i].addr) {
            g_maps[i].addr = addr;
            g_maps[i].len = len;
            break;
        }
    pthread_mutex_unlock(&g_maps_lock);
    return 0;
}

void nz_mem_map_unregister(const void *addr, size_t len) {
    nz_mem_account(NZ_MEM_MAPPED, -(int64_t)len);
    pthread_mutex_lock(&g_maps_lock);
    for (int i = 0; i < MAX_MAPS; i++)
        if (g_maps[i].addr == addr && g_maps[i].len == len) {
            g_maps[i].addr = NULL;
            g_maps[i].len = 0;
            break;
        }
    pthread_mutex_unlock(&g_maps_lock);
}

/* Resident pages of one mapping, counted with mincore in 64 MiB windows. */
static size_t resident_bytes(const void *addr, size_t len) {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    uintptr_t start = (uintptr_t)addr & ~(uintptr_t)(page - 1);
    uintptr_t end = (uintptr_t)addr + len;
    unsigned char vec[16384];
    size_t total = 0;
    for (uintptr_t p = start; p < end;) {
        size_t n = (end - p + page - 1) / page;
        if (n > sizeof vec) n = sizeof vec;
        if (mincore((void *)p, n * page, vec) != 0) return total;
        for (size_t i = 0; i < n; i++) total += (vec[i] & 1) ? page : 0;
        p += n * page;
    }
    return total > len ? len : total;
}

size_t nz_mem_mapped_resident(void) {
    size_t total = 0;
    pthread_mutex_lock(&g_maps_lock);
    for (int i = 0; i < MAX_MAPS; i++)
        if (g_maps[i].addr) total += resident_bytes(g_maps[i].addr, g_maps[i].len);
    pthread_mutex_unlock(&g_maps_lock);
    return total;
}

/* VmRSS / VmHWM lines of /proc/self/status, in bytes. */
/* The malloc in use, for the memory report: a sanitizer replaces glibc's (and keeps freed memory in its
 * quarantine, so RSS does not follow frees). */
#if defined(__SANITIZE_ADDRESS__)
#define ALLOCATOR "asan"
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define ALLOCATOR "asan"
#endif
#endif
#ifndef ALLOCATOR
#define ALLOCATOR "glibc"
#endif

#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
#define HAVE_MALLINFO2 1
#endif

static size_t allocator_free(void) {
#ifdef HAVE_MALLINFO2
    return mallinfo2().fordblks;
#else
    return 0;
#endif
}

/* The [heap] mapping (malloc's main arena, grown with brk) from /proc/self/maps: *len its bytes.
 * @return its start, or NULL when there is none (or maps cannot be read). */
static void *heap_mapping(size_t *len) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[512];
    unsigned long lo, hi;
    void *start = NULL;
    *len = 0;
    if (!f) return NULL;
    while (fgets(line, sizeof line, f))
        if (strstr(line, "[heap]") && sscanf(line, "%lx-%lx", &lo, &hi) == 2 && hi > lo) {
            start = (void *)(uintptr_t)lo;
            *len = (size_t)(hi - lo);
            break;
        }
    fclose(f);
    return start;
}

/* malloc's side of r (glibc; zeros elsewhere, e.g. under a sanitizer): allocator_free (fordblks),
 * other_heap (bytes in use, in arenas and mmapped chunks, less r->counted) and allocator_free_resident:
 * the main arena's resident pages (mincore over [heap]) plus any other arena's bytes (taken as resident:
 * an upper bound; exact with M_ARENA_MAX 1) less the bytes in use there, within [0, fordblks].
 * malloc_trim gives free pages back to the OS but keeps their chunks in its free lists, so fordblks
 * alone can far exceed what is resident. */
static void allocator_report(nz_mem_report *r) {
#ifdef HAVE_MALLINFO2
    size_t len;
    const void *heap = heap_mapping(&len);
    struct mallinfo2 mi = mallinfo2();
    size_t resident = (heap ? resident_bytes(heap, len) : 0) + (mi.arena > len ? mi.arena - len : 0);
    size_t free_res = resident > mi.uordblks ? resident - mi.uordblks : 0;
    size_t in_use = mi.uordblks + mi.hblkhd;
    r->allocator_free = mi.fordblks;
    r->allocator_free_resident = free_res < mi.fordblks ? free_res : mi.fordblks;
    r->other_heap = in_use > r->counted ? in_use - r->counted : 0;
#else
    (void)r;
#endif
}

size_t nz_mem_trim(size_t min_free) {
    size_t f = allocator_free();
#ifdef __GLIBC__
    if (f > min_free) malloc_trim(0);
#endif
    return f;
}

int nz_mem_get_report(nz_mem_report *r) {
    memset(r, 0, sizeof *r);
    for (int c = 0; c < NZ_MEM_NCAT; c++) {
        r->current[c] = nz_mem_current((nz_mem_cat)c);
        r->peak[c] = nz_mem_peak((nz_mem_cat)c);
        if (c != NZ_MEM_MAPPED) r->counted += r->current[c];
    }
    r->mapped_resident = nz_mem_mapped_resident();
    allocator_report(r);
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return NZ_E_IO;
    char line[256];
    unsigned long long kb;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "VmRSS: %llu kB", &kb) == 1)
            r->rss = (size_t)kb * 1024;
        else if (sscanf(line, "VmHWM: %llu kB", &kb) == 1)
            r->rss_peak = (size_t)kb * 1024;
        else if (sscanf(line, "RssFile: %llu kB", &kb) == 1)
            r->file_resident = (size_t)kb * 1024;
        else if (sscanf(line, "RssAnon: %llu kB", &kb) == 1)
            r->anon_resident = (size_t)kb * 1024;
    }
    fclose(f);
    r->code_resident = r->file_resident > r->mapped_resident ? r->file_resident - r->mapped_resident : 0;
    r->accounted = r->counted + r->other_heap + r->allocator_free_resident + r->file_resident;
    return r->rss ? NZ_OK : NZ_E_IO;
}

json_t *nz_mem_report_json(const nz_mem_report *r) {
    json_t *cats = json_object();
    for (int c = 0; cats && c < NZ_MEM_NCAT; c++)
        json_object_set_new(cats, nz_mem_cat_name((nz_mem_cat)c),
                            json_pack("{s:I, s:I}", "current_bytes", (json_int_t)r->current[c], "peak_bytes",
                                      (json_int_t)r->peak[c]));
    return json_pack(
        "{s:o, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:f, s:s}", "categories", cats,
        "counted_heap_bytes", (json_int_t)r->counted, "other_heap_bytes", (json_int_t)r->other_heap,
        "mapped_resident_bytes", (json_int_t)r->mapped_resident, "rss_bytes", (json_int_t)r->rss,
        "rss_peak_bytes", (json_int_t)r->rss_peak, "anon_resident_bytes", (json_int_t)r->anon_resident,
        "allocator_free_bytes", (json_int_t)r->allocator_free, "allocator_free_resident_bytes",
        (json_int_t)r->allocator_free_resident, "code_resident_bytes", (json_int_t)r->code_resident,
        "accounted_bytes", (json_int_t)r->accounted, "accounted_fraction",
        r->rss ? (double)r->accounted / (double)r->rss : 0.0, "allocator", ALLOCATOR);
}
