#include "nz_common.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

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
    case NZ_OK: return "ok";
    case NZ_E_INVALID_ARG: return "invalid argument";
    case NZ_E_NOMEM: return "out of memory";
    case NZ_E_IO: return "i/o error";
    case NZ_E_FORMAT: return "bad format";
    case NZ_E_TRUNCATED: return "truncated";
    case NZ_E_CHECKSUM: return "checksum mismatch";
    case NZ_E_CORRUPT: return "corrupt data";
    case NZ_E_UNSUPPORTED: return "unsupported";
    case NZ_E_RANGE: return "out of range";
    case NZ_E_NOT_FOUND: return "not found";
    default: return "unknown error";
    }
}

size_t nz_dtype_size(nz_dtype dt) {
    switch (dt) {
    case NZ_DT_BF16: return 2;
    case NZ_DT_F16: return 2;
    case NZ_DT_F32: return 4;
    default: return 0;
    }
}

const char *nz_dtype_name(nz_dtype dt) {
    switch (dt) {
    case NZ_DT_BF16: return "bf16";
    case NZ_DT_F16: return "f16";
    case NZ_DT_F32: return "f32";
    default: return "other";
    }
}
