/*
 * nz_mconfig.h — readers for a model's config.json (nz_model_config): typed
 * lookups with defaults and one-line errors naming the key, shared by the
 * model families (nz_nat, nz_t5md). Absent and null keys both take the
 * default.
 */
#ifndef NZ_MCONFIG_H
#define NZ_MCONFIG_H

#include "nz_common.h"

#include <jansson.h>

#ifdef __cplusplus
extern "C" {
#endif

/** @return the value of key k of c, or NULL when absent or null. */
const json_t *nz_cfg_get(const json_t *c, const char *k);

/** An integer in [lo, 2^30] (absent: def).
 *  @return NZ_OK and *v, or NZ_E_FORMAT naming k. */
int nz_cfg_size(const json_t *c, const char *k, size_t def, size_t lo, size_t *v, nz_error *err);

/** A boolean (true/false, or 0/1; absent: def).
 *  @return NZ_OK and *v, or NZ_E_FORMAT naming k. */
int nz_cfg_flag(const json_t *c, const char *k, int def, int *v, nz_error *err);

/** A string (absent: def; *v points into c).
 *  @return NZ_OK and *v, or NZ_E_FORMAT naming k. */
int nz_cfg_str(const json_t *c, const char *k, const char *def, const char **v, nz_error *err);

/** A key that, when present, must equal want (a fixed special id; why
 *  explains it in the message).
 *  @return NZ_OK, or NZ_E_UNSUPPORTED naming k. */
int nz_cfg_fixed(const json_t *c, const char *k, int want, const char *why, nz_error *err);

/* Readers of a "generation" object (a model's recommended decoding options:
 * nz_translator.h, nz_dialogue.h). what names the object in messages (e.g.
 * "config.json generation"); an absent or null key leaves *v unchanged. */

/** Every key of obj must be one of known[0..n).
 *  @return NZ_OK, or NZ_E_FORMAT naming the unknown key and listing the known. */
int nz_gen_keys(const json_t *obj, const char *what, const char *const *known, size_t n, nz_error *err);

/** An integer key in [lo, hi]. @return NZ_OK, or NZ_E_FORMAT naming k and the range. */
int nz_gen_int(const json_t *obj, const char *what, const char *k, int lo, int hi, int *v, nz_error *err);

/** A number key in [lo, hi] (lo_open: lo itself excluded).
 *  @return NZ_OK, or NZ_E_FORMAT naming k and the range. */
int nz_gen_number(const json_t *obj, const char *what, const char *k, double lo, int lo_open, double hi,
                  float *v, nz_error *err);

/** A string key that must be one of names[0..n): *v = its index.
 *  @return NZ_OK, or NZ_E_FORMAT naming k and the allowed strings. */
int nz_gen_enum(const json_t *obj, const char *what, const char *k, const char *const *names, size_t n,
                int *v, nz_error *err);

/** A boolean key (true / false): *v = 1 / 0. @return NZ_OK, or NZ_E_FORMAT naming k. */
int nz_gen_bool(const json_t *obj, const char *what, const char *k, int *v, nz_error *err);

/** A generation option stored as a float, as JSON: the number its shortest decimal (FLT_DIG
 *  significant digits) names, so 1.3 reads back as 1.3, not 1.2999999523.
 *  @return a new reference, or NULL when v is not finite (jansson's json_real). */
json_t *nz_gen_real(double v);

#ifdef __cplusplus
}
#endif
#endif /* NZ_MCONFIG_H */
