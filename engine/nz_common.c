#include "nz_common.h"
#include "nz_guard.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int nz_fail(nz_error *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

uint64_t nz_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int nz_fail_prefix(nz_error *err, const char *fmt, ...) {
    if (!err) return NZ_E_INVALID_ARG;
    char prefix[NZ_ERROR_MSG_MAX], old[NZ_ERROR_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    memcpy(old, err->msg, sizeof old);
    snprintf(err->msg, sizeof err->msg, "%s: %s", prefix, old);
    return err->code;
}

const char *nz_status_name(int code) {
    switch (code) {
    case NZ_OK:
        return "ok";
    case NZ_E_INVALID_ARG:
        return "invalid argument";
    case NZ_E_NOMEM:
        return "out of memory";
    case NZ_E_IO:
        return "i/o error";
    case NZ_E_FORMAT:
        return "bad format";
    case NZ_E_TRUNCATED:
        return "truncated";
    case NZ_E_CHECKSUM:
        return "checksum mismatch";
    case NZ_E_CORRUPT:
        return "corrupt data";
    case NZ_E_UNSUPPORTED:
        return "unsupported";
    case NZ_E_RANGE:
        return "out of range";
    case NZ_E_CANCELLED:
        return "cancelled";
    case NZ_E_NOT_FOUND:
        return "not found";
    default:
        return "unknown error";
    }
}

size_t nz_dtype_size(nz_dtype dt) {
    switch (dt) {
    case NZ_DT_BF16:
        return 2;
    case NZ_DT_F16:
        return 2;
    case NZ_DT_F32:
        return 4;
    default:
        return 0;
    }
}

const char *nz_dtype_name(nz_dtype dt) {
    switch (dt) {
    case NZ_DT_BF16:
        return "bf16";
    case NZ_DT_F16:
        return "f16";
    case NZ_DT_F32:
        return "f32";
    default:
        return "other";
    }
}

int nz_map_file(const char *path, const uint8_t **map, size_t *len, nz_error *err) {
    *map = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return nz_fail(err, NZ_E_IO, "%s: %s", path, strerror(errno));
    struct stat st;
    int rc = NZ_OK;
    if (fstat(fd, &st) != 0)
        rc = nz_fail(err, NZ_E_IO, "%s: fstat: %s", path, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        rc = nz_fail(err, NZ_E_IO, "%s: not a regular file", path);
    else if ((uint64_t)st.st_size > SIZE_MAX)
        rc = nz_fail(err, NZ_E_RANGE, "%s: file too large to map", path);
    else if (st.st_size > 0) {
        void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED)
            rc = nz_fail(err, NZ_E_IO, "%s: mmap: %s", path, strerror(errno));
        else {
            *map = p;
            *len = (size_t)st.st_size;
            nz_guard_register(p, *len, path, NULL); /* no free slot: unguarded, as before */
        }
    }
    close(fd);
    return rc;
}

void nz_unmap_file(const uint8_t *map, size_t len) {
    if (!map || !len) return;
    nz_guard_unregister(map);
    munmap((void *)map, len);
}
