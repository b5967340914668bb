/*
 * nz_task.h — a served model family ("task") behind one descriptor, so a server or a tool opens,
 * checks, describes and closes models without knowing their family.
 *
 * A family fills one nz_task (open / free / its weights / describe) next to its code and adds it to
 * the list in nz_task.c; the functions here do the rest over the engine (architecture check, tile
 * verification, sizes and weight mode, a faulted file, forgetting cached tiles). Decoding itself stays
 * behind the family's own API (nz_translator.h, nz_dialogue.h), which a server's per-task request
 * handler calls.
 *
 *   translate  nz_translator  config.json architecture "cmlm_transformer"
 *   dialogue   nz_dialogue    config.json architecture "t5_multidecoder"
 */
#ifndef NZ_TASK_H
#define NZ_TASK_H

#include "nz_cache.h"
#include "nz_container.h"

#include <jansson.h>

#ifdef __cplusplus
extern "C" {
#endif

/** What a loaded model is made of (for listings, logs and metrics). */
typedef struct nz_task_info {
    uint64_t params;           /* float weights, elements */
    uint64_t compressed_bytes; /* stored tile bytes of every tensor */
    uint64_t source_bytes;     /* the tensors as they were packed (bf16/fp32 bytes) */
    uint64_t decoded_bytes;    /* every float tensor decoded to fp32 */
    char mode[32];             /* weight mode of the largest share of the weights, e.g. "lossless" */
    char architecture[64];     /* config.json "architecture" */
} nz_task_info;

/** A model family as served. Every field is set. */
typedef struct nz_task {
    const char *name;         /* the task a configuration names: "translate", "dialogue" */
    const char *noun;         /* in messages: "translation", "dialogue" */
    const char *architecture; /* the config.json "architecture" it opens */
    /** Open the model at path. @return NZ_OK and *out, or an error naming what is wrong. */
    int (*open)(const char *path, void **out, nz_error *err);
    /** Free a model. Accepts NULL. */
    void (*free)(void *m);
    /** @return the model's weights (its .nzp container). */
    const nz_model *(*model)(const void *m);
    /** @return a new JSON object of the model's task-specific facts (decoding defaults, limits), or NULL
     *  when out of memory. */
    json_t *(*describe)(const void *m);
} nz_task;

extern const nz_task NZ_TASK_TRANSLATE; /* nz_translator.c */
extern const nz_task NZ_TASK_DIALOGUE;  /* nz_dialogue.c */

/** @return the task called name[0..n) (n: its length), or NULL. */
const nz_task *nz_task_find(const char *name, size_t n);

/** Write the known tasks as a phrase for messages, "\"translate\" or \"dialogue\"", into buf[n]
 *  (truncated to fit, NUL-terminated; n > 0). @return buf. */
char *nz_task_names(char *buf, size_t n);

/** Check, without loading it, that the file at path opens and holds t's architecture.
 *  @return NZ_OK, the container's error, or NZ_E_FORMAT naming the architecture found. */
int nz_task_check_file(const nz_task *t, const char *path, nz_error *err);

/** Open the model at path as task t, verify every tile's checksum when verify is set, and describe its
 *  weights in *info. @return NZ_OK and *out (close with nz_task_close), or the error (nothing open). */
int nz_task_open(const nz_task *t, const char *path, int verify, void **out, nz_task_info *info,
                 nz_error *err);

/** Free m (task t), forgetting its tiles in cache first (cache may be NULL). Accepts m NULL. */
void nz_task_close(const nz_task *t, void *m, nz_tile_cache *cache);

/** @return 1 when a read of m's file faulted (the file was truncated or rewritten in place), else 0. */
int nz_task_faulted(const nz_task *t, const void *m);

#ifdef __cplusplus
}
#endif
#endif /* NZ_TASK_H */
