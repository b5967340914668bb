/* nz_guard — see nz_guard.h. The slots are read by the signal handler: only
 * atomics and async-signal-safe calls there. */
#include "nz_guard.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

typedef struct slot {
    _Atomic(uintptr_t) base; /* 0: free */
    _Atomic(size_t) len;
    _Atomic int faulted;
    char path[200];
} slot;

static slot g_slots[NZ_GUARD_SLOTS];
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER; /* registration (not the handler) */
static struct sigaction g_prev;                          /* the handler before ours */

static __thread sigjmp_buf *t_jb;       /* armed by NZ_MAPPED */
static __thread uintptr_t t_fault_addr; /* the last fault that jumped back */
static __thread int t_fault_slot;

static int find(uintptr_t a) {
    for (int i = 0; i < NZ_GUARD_SLOTS; i++) {
        uintptr_t b = atomic_load(&g_slots[i].base);
        if (b && a >= b && a - b < atomic_load(&g_slots[i].len)) return i;
    }
    return -1;
}

static void on_sigbus(int sig, siginfo_t *si, void *uc) {
    sigjmp_buf *jb = t_jb;
    int i = si ? find((uintptr_t)si->si_addr) : -1;
    if (jb && i >= 0) {
        atomic_store(&g_slots[i].faulted, 1);
        t_fault_addr = (uintptr_t)si->si_addr;
        t_fault_slot = i;
        t_jb = NULL;
        siglongjmp(*jb, 1);
    }
    /* not a guarded read: what would have happened without us */
    if (g_prev.sa_flags & SA_SIGINFO && g_prev.sa_sigaction) {
        g_prev.sa_sigaction(sig, si, uc);
        return;
    }
    if (g_prev.sa_handler != SIG_DFL && g_prev.sa_handler != SIG_IGN && g_prev.sa_handler) {
        g_prev.sa_handler(sig);
        return;
    }
    signal(SIGBUS, SIG_DFL); /* returning repeats the access, which now ends the process */
}

/* Install on_sigbus unless it is the handler now (another component, e.g. a test framework, may have
 * replaced it since: then that one becomes the previous handler). */
static int install(void) {
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) == 0 && (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus)
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGBUS, &sa, &g_prev);
}

int nz_guard_register(const void *base, size_t len, const char *path, nz_error *err) {
    if (!base || !len) return NZ_OK;
    int rc = NZ_OK;
    pthread_mutex_lock(&g_mu);
    install();
    int i = 0;
    while (i < NZ_GUARD_SLOTS && atomic_load(&g_slots[i].base)) i++;
    if (i == NZ_GUARD_SLOTS) {
        rc = nz_fail(err, NZ_E_RANGE, "%s: more than %d mapped files at once", path ? path : "?",
                     NZ_GUARD_SLOTS);
    } else {
        slot *s = &g_slots[i];
        snprintf(s->path, sizeof s->path, "%s", path ? path : "?");
        atomic_store(&s->faulted, 0);
        atomic_store(&s->len, len);
        atomic_store(&s->base, (uintptr_t)base); /* published last */
    }
    pthread_mutex_unlock(&g_mu);
    return rc;
}

void nz_guard_unregister(const void *base) {
    if (!base) return;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < NZ_GUARD_SLOTS; i++)
        if (atomic_load(&g_slots[i].base) == (uintptr_t)base) atomic_store(&g_slots[i].base, 0);
    pthread_mutex_unlock(&g_mu);
}

int nz_guard_faulted(const void *p) {
    int i = p ? find((uintptr_t)p) : -1;
    return i >= 0 && atomic_load(&g_slots[i].faulted);
}

sigjmp_buf *nz_guard_enter(sigjmp_buf *jb) {
    sigjmp_buf *prev = t_jb;
    t_jb = jb;
    return prev;
}

void nz_guard_leave(sigjmp_buf *prev) { t_jb = prev; }

int nz_guard_error(nz_error *err) {
    const slot *s = &g_slots[t_fault_slot];
    uintptr_t base = atomic_load(&s->base);
    return nz_fail(err, NZ_E_IO,
                   "%s changed under the running process (truncated or rewritten in place): reading offset "
                   "%llu faulted",
                   s->path, (unsigned long long)(base ? t_fault_addr - base : 0));
}
