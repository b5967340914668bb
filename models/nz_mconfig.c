/* nz_mconfig — see nz_mconfig.h. */
#include "nz_mconfig.h"

const json_t *nz_cfg_get(const json_t *c, const char *k) {
    const json_t *j = json_object_get(c, k);
    return j && !json_is_null(j) ? j : NULL;
}

int nz_cfg_size(const json_t *c, const char *k, size_t def, size_t lo, size_t *v, nz_error *err) {
    const json_t *j = nz_cfg_get(c, k);
    if (!j) {
        *v = def;
        return NZ_OK;
    }
    if (!json_is_integer(j) || json_integer_value(j) < (json_int_t)lo || json_integer_value(j) > (1 << 30))
        return nz_fail(err, NZ_E_FORMAT, "config.json: '%s' must be an integer in [%zu, 2^30]", k, lo);
    *v = (size_t)json_integer_value(j);
    return NZ_OK;
}

int nz_cfg_flag(const json_t *c, const char *k, int def, int *v, nz_error *err) {
    const json_t *j = nz_cfg_get(c, k);
    if (!j) {
        *v = def;
        return NZ_OK;
    }
    if (json_is_boolean(j)) {
        *v = json_is_true(j);
        return NZ_OK;
    }
    if (json_is_integer(j) && (json_integer_value(j) == 0 || json_integer_value(j) == 1)) {
        *v = (int)json_integer_value(j);
        return NZ_OK;
    }
    return nz_fail(err, NZ_E_FORMAT, "config.json: '%s' must be true or false", k);
}

int nz_cfg_str(const json_t *c, const char *k, const char *def, const char **v, nz_error *err) {
    const json_t *j = nz_cfg_get(c, k);
    if (!j) {
        *v = def;
        return NZ_OK;
    }
    if (!json_is_string(j)) return nz_fail(err, NZ_E_FORMAT, "config.json: '%s' must be a string", k);
    *v = json_string_value(j);
    return NZ_OK;
}

int nz_cfg_fixed(const json_t *c, const char *k, int want, const char *why, nz_error *err) {
    const json_t *j = nz_cfg_get(c, k);
    if (j && (!json_is_integer(j) || json_integer_value(j) != want))
        return nz_fail(err, NZ_E_UNSUPPORTED, "config.json: '%s' must be %d (%s)", k, want, why);
    return NZ_OK;
}
