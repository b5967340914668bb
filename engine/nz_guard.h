/*
 * nz_guard.h — a mapped model file that changes under the process becomes an
 * error, not a crash.
 *
 * Weights are read straight from a read-only mapping of the .nzp file
 * (nz_map_file). When the file is truncated or rewritten in place while
 * mapped, touching a page past its new end raises SIGBUS, which would kill
 * the process. nz_map_file registers every mapping here; code that reads
 * mapped bytes runs inside NZ_MAPPED(...), which arms a per-thread jump
 * buffer. The SIGBUS handler (installed with SA_NODEFER, so the jump leaves
 * no signal blocked, by every registration where it is not the current
 * handler) checks that the faulting address lies in a registered mapping
 * and that the thread is inside NZ_MAPPED; then it marks the mapping
 * faulted and jumps back, and the statement fails with NZ_E_IO naming the
 * file and offset. Any other SIGBUS goes to the handler ours replaced, or
 * keeps its default action (the access repeats and ends the process).
 *
 * A region inside NZ_MAPPED must hold no lock and own no allocation it has
 * not handed on before touching mapped bytes: the jump abandons the rest of
 * it. Replacing a served file atomically (write a new file, rename over the
 * old one) never faults: the mapping keeps the old inode.
 */
#ifndef NZ_GUARD_H
#define NZ_GUARD_H

#include "nz_common.h"

#include <setjmp.h>

#ifdef __cplusplus
extern "C" {
#endif

#define NZ_GUARD_SLOTS 64 /* mappings registered at once */

/** Register the mapping [base, base + len) of path (kept for messages; the
 *  first 200 bytes) and install the SIGBUS handler on first use.
 *  @return NZ_OK, or NZ_E_RANGE when every slot is taken (the mapping then
 *          works unguarded: a fault on it kills the process as before). */
int nz_guard_register(const void *base, size_t len, const char *path, nz_error *err);

/** Forget the mapping at base (before unmapping it). Accepts NULL. */
void nz_guard_unregister(const void *base);

/** @return 1 when a read inside the mapping that contains p faulted (the
 *  file changed under the process), else 0. */
int nz_guard_faulted(const void *p);

/** Internal to NZ_MAPPED: arm jb for this thread. @return the previous one. */
sigjmp_buf *nz_guard_enter(sigjmp_buf *jb);
/** Internal to NZ_MAPPED: restore prev. */
void nz_guard_leave(sigjmp_buf *prev);
/** Internal to NZ_MAPPED: the error of the fault that jumped back.
 *  @return NZ_E_IO. */
int nz_guard_error(nz_error *err);

/* Run stmt (which sets rc) with faults on mapped files turned into
 * rc = NZ_E_IO. stmt must not return, break or goto out of the macro. */
#define NZ_MAPPED(rc, err, stmt)                                                                             \
    do {                                                                                                     \
        sigjmp_buf nz_jb_;                                                                                   \
        sigjmp_buf *nz_prev_ = nz_guard_enter(&nz_jb_);                                                      \
        if (sigsetjmp(nz_jb_, 0) == 0) {                                                                     \
            stmt;                                                                                            \
        } else {                                                                                             \
            (rc) = nz_guard_error(err);                                                                      \
        }                                                                                                    \
        nz_guard_leave(nz_prev_);                                                                            \
    } while (0)

#ifdef __cplusplus
}
#endif
#endif /* NZ_GUARD_H */
