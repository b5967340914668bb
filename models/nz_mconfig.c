/* nz_mconfig — see nz_mconfig.h. */
#include "nz_mconfig.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

int nz_gen_keys(const json_t *obj, const char *what, const char *const *known, size_t n, nz_error *err) {
    const char *k;
    const json_t *v;
    json_object_foreach((json_t *)obj, k, v) {
        size_t i = 0;
        while (i < n && strcmp(k, known[i])) i++;
        if (i < n) continue;
        char list[256] = "";
        for (size_t j = 0, o = 0; j < n && o < sizeof list; j++)
            o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", j ? ", " : "", known[j]);
        return nz_fail(err, NZ_E_FORMAT, "%s: unknown key '%.64s' (known: %s)", what, k, list);
    }
    return NZ_OK;
}

int nz_gen_int(const json_t *obj, const char *what, const char *k, int lo, int hi, int *v, nz_error *err) {
    const json_t *j = nz_cfg_get(obj, k);
    if (!j) return NZ_OK;
    if (!json_is_integer(j) || json_integer_value(j) < lo || json_integer_value(j) > hi)
        return nz_fail(err, NZ_E_FORMAT, "%s: '%s' must be an integer in [%d, %d]", what, k, lo, hi);
    *v = (int)json_integer_value(j);
    return NZ_OK;
}

int nz_gen_number(const json_t *obj, const char *what, const char *k, double lo, int lo_open, double hi,
                  float *v, nz_error *err) {
    const json_t *j = nz_cfg_get(obj, k);
    if (!j) return NZ_OK;
    double x = json_is_number(j) ? json_number_value(j) : NAN;
    if (!(x >= lo && x <= hi) || (lo_open && x == lo))
        return nz_fail(err, NZ_E_FORMAT, "%s: '%s' must be a number in %c%g, %g]", what, k,
                       lo_open ? '(' : '[', lo, hi);
    *v = (float)x;
    return NZ_OK;
}

json_t *nz_gen_real(double v) {
    char b[32];
    snprintf(b, sizeof b, "%.*g", FLT_DIG, v);
    return json_real(isfinite(v) ? strtod(b, NULL) : v);
}

int nz_gen_enum(const json_t *obj, const char *what, const char *k, const char *const *names, size_t n,
                int *v, nz_error *err) {
    const json_t *j = nz_cfg_get(obj, k);
    if (!j) return NZ_OK;
    const char *x = json_is_string(j) ? json_string_value(j) : NULL;
    for (size_t i = 0; x && i < n; i++)
        if (!strcmp(x, names[i])) {
            *v = (int)i;
            return NZ_OK;
        }
    char list[128] = "";
    for (size_t i = 0, o = 0; i < n && o < sizeof list; i++)
        o += (size_t)snprintf(list + o, sizeof list - o, "%s\"%s\"", i ? (i + 1 == n ? " or " : ", ") : "",
                              names[i]);
    return nz_fail(err, NZ_E_FORMAT, "%s: '%s' must be %s", what, k, list);
}

int nz_gen_bool(const json_t *obj, const char *what, const char *k, int *v, nz_error *err) {
    const json_t *j = nz_cfg_get(obj, k);
    if (!j) return NZ_OK;
    if (!json_is_boolean(j)) return nz_fail(err, NZ_E_FORMAT, "%s: '%s' must be true or false", what, k);
    *v = json_is_true(j);
    return NZ_OK;
}
