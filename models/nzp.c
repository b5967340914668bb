/*
 * nzp — pack, inspect, verify, benchmark and unpack .nzp model files.
 *
 *   nzp pack [--mode lossless|bf16|lossy-K|raw] [--coder esc|rans|zstd]
 *            [--tile-rows N] [--norm-block B] [--exclude REGEX] [--raw-below N]
 *            [--quiet] SRC OUT.nzp
 *   nzp unpack IN.nzp OUT.safetensors     (the weights as the engine decodes them)
 *   nzp unpack --model-dir IN.nzp DIR     (model.safetensors + config.json + blobs)
 *   nzp info [--json] [--memory] IN.nzp
 *   nzp verify [--quiet] IN.nzp
 *   nzp bench [--seconds S] [--quiet] IN.nzp
 *   nzp translate MODEL.nzp [...] < in.txt > out.txt   (models/nzp_translate.c)
 *   nzp chat MODEL.nzp [...]                         (models/nzp_chat.c)
 *
 * pack, verify and bench report their progress on stderr (models/nzp_progress.h).
 * Exit status: 0 success, 1 failure (bad file, damaged model), 2 usage error.
 */
#include "nz_alloc.h"
#include "nz_codec.h"
#include "nz_container.h"
#include "nz_dialogue.h"
#include "nz_pack.h"
#include "nzp_chat.h"
#include "nzp_progress.h"
#include "nzp_translate.h"
#include "nz_mconfig.h"
#include "nz_translator.h"
#include "nz_rans.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* Each subcommand's usage (`nzp CMD --help` prints its own, `nzp --help` all). */
static const struct {
    const char *cmd, *text;
} USAGES[] = {
    {"pack", "  nzp pack [--mode lossless|bf16|lossy-K|raw] [--coder esc|rans|zstd] [--tile-rows N]\n"
             "           [--norm-block B] [--exclude REGEX] [--raw-below N] [--zstd-level L]\n"
             "           [--set KEY=VALUE]... [--quiet] SRC OUT.nzp\n"
             "      SRC is a .safetensors file or a model directory (model.safetensors, config.json,\n"
             "      tokenizer files). K = kept mantissa bits 0..7; B = elements per lossy normaliser.\n"
             "      --coder: esc (default; fast SIMD decoding, ~0.1 bit/weight over rans), rans\n"
             "      (smallest files, slower to decode) or zstd (baseline).\n"
             "      --set KEY=VALUE sets a key of the embedded config.json (dots name nested objects;\n"
             "      VALUE is JSON, or else a string), e.g. --set generation.iterations=4 sets a\n"
             "      translation model's default decoding (see models/README.md).\n"
             "      pack, verify and bench show their progress on stderr (tensors or tiles and bytes\n"
             "      done, rate, ETA): a line redrawn in place on a terminal; otherwise, once a job has\n"
             "      run 2 s, a line per 10 % done. --quiet: no progress.\n"},
    {"unpack", "  nzp unpack IN.nzp OUT.safetensors | nzp unpack --model-dir IN.nzp DIR\n"},
    {"info", "  nzp info [--json] [--memory] IN.nzp\n"},
    {"verify", "  nzp verify [--quiet] IN.nzp\n"
               "      decode every tile and check every checksum; exit 1 if damaged. Progress on\n"
               "      stderr as for pack (tiles checked); --quiet: none.\n"},
    {"bench", "  nzp bench [--seconds S] [--quiet] IN.nzp\n"
              "      decode throughput per coder on one core: about S seconds of timing (default 0.5)\n"
              "      after re-encoding each tensor with every coder. Progress on stderr as for pack\n"
              "      (tensors measured); --quiet: none.\n"},
    {"translate",
     "  nzp translate MODEL.nzp [--iter T] [--beam B] [--rerank] [--adaptive] [--at | --at-beam K]\n"
     "                [--max-len N] [--batch K] [--cache BYTES] [--threads N] [--tokens]\n"
     "                < in.txt > out.txt   (nzp translate --help: every option)\n"},
    {"chat", "  nzp chat MODEL.nzp [--strategy greedy|beam|sample] [--beam N] [--temperature T] [--top-k K]\n"
             "           [--top-p P] [--seed S] [--decoders 0,2] [--max-new-tokens N] [--no-repeat-ngram N]\n"
             "           [--all] [--distinct] [--history N] [--cache BYTES] [--threads N]\n"
             "           (one user turn per line on stdin; nzp chat --help: every option)\n"},
};
#define N_USAGES (sizeof USAGES / sizeof *USAGES)

/* Print every subcommand's usage (cmd NULL) or one's to f. */
static void print_usage(FILE *f, const char *cmd) {
    fputs("usage:\n", f);
    for (size_t i = 0; i < N_USAGES; i++)
        if (!cmd || !strcmp(cmd, USAGES[i].cmd)) fputs(USAGES[i].text, f);
}

/* The usage error of subcommand cmd (NULL: of nzp itself). @return 2. */
static int usage_of(const char *cmd, const char *msg) {
    if (msg) fprintf(stderr, "nzp: %s\n", msg);
    print_usage(stderr, cmd);
    return 2;
}

static int fail(const nz_error *e) {
    fprintf(stderr, "nzp: error: %s\n", e->msg);
    return 1;
}

static int parse_u64(const char *s, uint64_t *v) {
    char *end;
    errno = 0;
    unsigned long long x = strtoull(s, &end, 10);
    if (!*s || *end || errno || s[0] == '-') return -1;
    *v = x;
    return 0;
}

/* ------------------------------------------------------------- pack */

/* Add `--set KEY=VALUE` to the merge patch: dotted KEY names nested objects, VALUE is JSON or else a
 * string. @return 0, or -1 when the argument is malformed. */
static int add_set(json_t *patch, const char *arg) {
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg) return -1;
    json_t *val = json_loads(eq + 1, JSON_DECODE_ANY, NULL);
    if (!val) val = json_string(eq + 1);
    if (!val) return -1;
    json_t *obj = patch;
    const char *k = arg;
    for (;;) {
        const char *dot = memchr(k, '.', (size_t)(eq - k));
        const char *end = dot ? dot : eq;
        char name[256];
        if (end == k || (size_t)(end - k) >= sizeof name) break;
        memcpy(name, k, (size_t)(end - k));
        name[end - k] = 0;
        if (!dot) return json_object_set_new(obj, name, val) ? -1 : 0;
        json_t *next = json_object_get(obj, name);
        if (!json_is_object(next)) {
            next = json_object();
            if (!next || json_object_set_new(obj, name, next)) break;
        }
        obj = next;
        k = dot + 1;
    }
    json_decref(val);
    return -1;
}

/* The decoding defaults a model carries (config "generation") must be readable (translation:
 * nz_tr_choice, dialogue: nz_dlg_choice). @return NZ_OK or NZ_E_FORMAT naming the key. */
static int check_generation(const nz_model *m, nz_error *e) {
    const json_t *cfg = nz_model_config(m);
    const json_t *arch = cfg ? json_object_get(cfg, "architecture") : NULL;
    const char *a = json_is_string(arch) ? json_string_value(arch) : "";
    const json_t *gen = nz_cfg_get(cfg, "generation");
    if (!strcmp(a, "cmlm_transformer")) {
        nz_tr_choice c;
        return nz_tr_choice_from_json(gen, "config.json generation", &c, e);
    }
    if (!strcmp(a, "t5_multidecoder")) {
        nz_dlg_choice c;
        nz_dlg_opts o;
        nz_dlg_opts_default(&o);
        int rc = nz_dlg_choice_from_json(gen, "config.json generation", &c, e);
        return rc ? rc : nz_dlg_choice_apply(&c, &o, e);
    }
    return NZ_OK;
}

/* pack's command line into o (*patch collects the --set keys), pos (SRC and OUT) and *quiet.
 * @return 0, or 2 after a usage error (message on stderr). */
static int pack_args(int argc, char **argv, nz_pack_opts *o, json_t **patch, const char *pos[2], int *quiet) {
    nz_error e = {0};
    int npos = 0;
    uint64_t v;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--mode") && val) {
            uint32_t nb = o->mode.norm_block;
            if (nz_mode_parse(val, &o->mode, &e)) return usage_of("pack", e.msg);
            o->mode.norm_block = nb;
            i++;
        } else if (!strcmp(a, "--coder") && val) {
            if (nz_coder_parse(val, &o->coder, &e) ||
                (o->coder != NZ_CODER_ESC && o->coder != NZ_CODER_RANS && o->coder != NZ_CODER_ZSTD))
                return usage_of("pack", "--coder must be esc, rans or zstd");
            i++;
        } else if (!strcmp(a, "--tile-rows") && val) {
            if (parse_u64(val, &v) || v == 0 || v > UINT32_MAX)
                return usage_of("pack", "--tile-rows needs an integer >= 1");
            o->tile_rows = (uint32_t)v;
            i++;
        } else if (!strcmp(a, "--norm-block") && val) {
            if (parse_u64(val, &v) || v > (1u << 30))
                return usage_of("pack", "--norm-block needs an integer 0..2^30");
            o->mode.norm_block = (uint32_t)v;
            i++;
        } else if (!strcmp(a, "--raw-below") && val) {
            if (parse_u64(val, &v)) return usage_of("pack", "--raw-below needs an integer");
            o->raw_below = v;
            i++;
        } else if (!strcmp(a, "--zstd-level") && val) {
            if (parse_u64(val, &v) || v < 1 || v > 22) return usage_of("pack", "--zstd-level needs 1..22");
            o->zstd_level = (int)v;
            i++;
        } else if (!strcmp(a, "--exclude") && val) {
            o->exclude = val;
            i++;
        } else if (!strcmp(a, "--set") && val) {
            if ((!*patch && !(*patch = json_object())) || add_set(*patch, val))
                return usage_of("pack", "--set needs KEY=VALUE (e.g. generation.iterations=4)");
            o->config_patch = *patch;
            i++;
        } else if (!strcmp(a, "--quiet")) {
            *quiet = 1;
        } else if (a[0] == '-' && a[1]) {
            return usage_of("pack", "unknown or incomplete option for pack");
        } else if (npos < 2) {
            pos[npos++] = a;
        } else {
            return usage_of("pack", "pack takes SRC and OUT");
        }
    }
    if (npos != 2) return usage_of("pack", "pack takes SRC and OUT");
    if (o->mode.norm_block && o->mode.kind != NZ_MODE_LOSSY)
        return usage_of("pack", "--norm-block needs --mode lossy-K");
    return 0;
}

/* The packed file at path must open with readable decoding defaults (else it is removed); then what
 * packing did, on stdout (t0: when it began). @return the exit status: 0, or 1 (message in e, on stderr). */
static int check_packed(const char *path, double t0, nz_error *e) {
    nz_model *m;
    if (nz_model_open(path, &m, e)) return fail(e);
    if (check_generation(m, e)) { /* a model that would be refused at open is not kept */
        nz_model_free(m);
        unlink(path);
        return fail(e);
    }
    uint64_t src = 0, stored = 0;
    for (size_t i = 0; i < nz_model_ntensors(m); i++) {
        const nz_tensor *t = nz_model_tensor(m, i);
        src += t->desc.rows * t->desc.cols * t->desc.elem_size;
        stored += t->stored_bytes;
    }
    printf("packed %zu tensors: %" PRIu64 " -> %" PRIu64 " bytes of tensor data (%.2f%%), file %" PRIu64
           " bytes, %.2f s\n",
           nz_model_ntensors(m), src, stored, src ? 100.0 * (double)stored / (double)src : 0.0,
           nz_model_file_size(m), nz_now_s() - t0);
    nz_model_free(m);
    return 0;
}

/* nzp pack; *patch collects the --set keys (freed by the caller, whatever the outcome). */
static int pack_with(int argc, char **argv, json_t **patch) {
    nz_pack_opts o;
    nz_pack_opts_default(&o);
    const char *pos[2];
    int quiet = 0;
    int rc = pack_args(argc, argv, &o, patch, pos, &quiet);
    if (rc) return rc;
    nz_error e = {0};
    nzp_progress pr;
    nzp_progress_start(&pr, "pack", "tensors", quiet);
    o.progress = nzp_progress_engine;
    o.progress_ud = &pr;
    double t0 = nz_now_s();
    rc = nz_pack(pos[0], pos[1], &o, &e);
    nzp_progress_end(&pr);
    if (rc) return fail(&e);
    return check_packed(pos[1], t0, &e);
}

static int cmd_pack(int argc, char **argv) {
    json_t *patch = NULL;
    int rc = pack_with(argc, argv, &patch);
    json_decref(patch);
    return rc;
}

/* ------------------------------------------------------------- info */

typedef struct {
    uint64_t nelem, src_bytes, stored_bytes;
    double bits, bound; /* per weight */
} tstats;

static tstats tensor_stats(const nz_tensor *t) {
    tstats s;
    s.nelem = t->desc.rows * t->desc.cols;
    s.src_bytes = s.nelem * t->desc.elem_size;
    s.stored_bytes = t->stored_bytes;
    s.bits = s.nelem ? 8.0 * (double)s.stored_bytes / (double)s.nelem : 0;
    if (t->desc.coder == NZ_CODER_NONE)
        s.bound = 8.0 * (double)t->desc.elem_size;
    else
        s.bound = 1 + t->desc.mant_bits + nz_entropy_bits(t->counts);
    return s;
}

static void shape_str(const nz_tensor *t, char *buf, size_t cap) {
    size_t n = (size_t)snprintf(buf, cap, "[");
    for (int i = 0; i < t->ndim && n < cap; i++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%" PRId64, i ? ", " : "", t->shape[i]);
    if (n < cap) snprintf(buf + n, cap - n, "]");
}

/* The engine's memory report plus what the model would take decoded. */
static json_t *memory_json(uint64_t stored, uint64_t decoded) {
    nz_mem_report r;
    nz_mem_get_report(&r);
    json_t *j = nz_mem_report_json(&r);
    if (j) {
        json_object_set_new(j, "weights_compressed_bytes", json_integer((json_int_t)stored));
        json_object_set_new(j, "weights_decoded_equivalent_bytes", json_integer((json_int_t)decoded));
    }
    return j;
}

static void print_memory(uint64_t stored, uint64_t decoded) {
    nz_mem_report r;
    nz_mem_get_report(&r);
    printf("memory: weights compressed %" PRIu64 " bytes, fully decoded (fp32) would be %" PRIu64
           " bytes (%.1fx)\n",
           stored, decoded, stored ? (double)decoded / (double)stored : 0.0);
    for (int c = 0; c < NZ_MEM_NCAT; c++)
        printf("memory: %-12s current %12zu  peak %12zu\n", nz_mem_cat_name((nz_mem_cat)c), r.current[c],
               r.peak[c]);
    printf("memory: mapped model bytes resident %zu of %zu\n", r.mapped_resident, r.current[NZ_MEM_MAPPED]);
    printf("memory: counted heap %zu bytes, RSS %zu bytes, peak RSS %zu bytes\n", r.counted, r.rss,
           r.rss_peak);
}

/* info's command line. @return 0, or 2 after a usage error (message on stderr). */
static int info_args(int argc, char **argv, int *json, int *memory, const char **path) {
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--json"))
            *json = 1;
        else if (!strcmp(argv[i], "--memory"))
            *memory = 1;
        else if (argv[i][0] == '-' && argv[i][1])
            return usage_of("info", "unknown option for info");
        else if (!*path)
            *path = argv[i];
        else
            return usage_of("info", "info takes one file");
    }
    if (!*path) return usage_of("info", "info takes one file");
    return 0;
}

/* Sums over a model's tensors. */
typedef struct {
    uint64_t elems, src_bytes, stored_bytes, decoded_bytes; /* decoded: as fp32 */
    double bound_bits;                                      /* entropy bound x elements */
} info_totals;

/* One tensor's line of info. */
typedef struct {
    tstats s;
    char shape[128], mode[32];
    double ratio; /* stored / source bytes */
} info_row;

/* t's line of info, its numbers added to *tot. */
static void info_row_of(const nz_tensor *t, info_row *r, info_totals *tot) {
    r->s = tensor_stats(t);
    shape_str(t, r->shape, sizeof r->shape);
    nz_mode_name(&t->desc.mode, r->mode, sizeof r->mode);
    r->ratio = r->s.src_bytes ? (double)r->s.stored_bytes / (double)r->s.src_bytes : 0;
    tot->elems += r->s.nelem;
    tot->src_bytes += r->s.src_bytes;
    tot->stored_bytes += r->s.stored_bytes;
    if (t->desc.dtype != NZ_DT_OTHER) tot->decoded_bytes += r->s.nelem * 4;
    tot->bound_bits += r->s.bound * (double)r->s.nelem;
}

/* nzp info --json: the model's tensors, totals, blobs, config (and memory) as one JSON object. */
static void info_json(const nz_model *m, int memory) {
    info_totals tot = {0};
    json_t *out = json_object(), *arr = json_array();
    for (size_t i = 0; i < nz_model_ntensors(m); i++) {
        const nz_tensor *t = nz_model_tensor(m, i);
        info_row r;
        info_row_of(t, &r, &tot);
        json_array_append_new(
            arr,
            json_pack("{s:s, s:s, s:s, s:s, s:I, s:s, s:I, s:I, s:I, s:f, s:f, s:f, s:I}", "name", t->name,
                      "dtype", t->st_dtype, "shape", r.shape, "mode", r.mode, "norm_block",
                      (json_int_t)t->desc.mode.norm_block, "coder", nz_coder_name(t->desc.coder), "elements",
                      (json_int_t)r.s.nelem, "source_bytes", (json_int_t)r.s.src_bytes, "stored_bytes",
                      (json_int_t)r.s.stored_bytes, "bits_per_weight", r.s.bits, "entropy_bound_bits",
                      r.s.bound, "ratio", r.ratio, "tiles", (json_int_t)t->ntiles));
    }
    uint64_t tn = tot.elems, tst = tot.stored_bytes;
    json_object_set_new(out, "tensors", arr);
    json_object_set_new(out, "total",
                        json_pack("{s:I, s:I, s:I, s:I, s:f, s:f, s:f}", "elements", (json_int_t)tn,
                                  "source_bytes", (json_int_t)tot.src_bytes, "stored_bytes", (json_int_t)tst,
                                  "file_bytes", (json_int_t)nz_model_file_size(m), "ratio",
                                  tot.src_bytes ? (double)tst / (double)tot.src_bytes : 0, "bits_per_weight",
                                  tn ? 8.0 * (double)tst / (double)tn : 0.0, "entropy_bound_bits",
                                  tn ? tot.bound_bits / (double)tn : 0.0));
    json_t *blobs = json_array();
    for (size_t i = 0; i < nz_model_nblobs(m); i++)
        json_array_append_new(blobs, json_string(nz_model_blob_name(m, i)));
    json_object_set_new(out, "blobs", blobs);
    if (nz_model_config(m)) json_object_set(out, "config", (json_t *)nz_model_config(m));
    if (memory) json_object_set_new(out, "memory", memory_json(tst, tot.decoded_bytes));
    char *s = json_dumps(out, JSON_INDENT(1) | JSON_PRESERVE_ORDER);
    if (s) puts(s);
    nz_free(s);
    json_decref(out);
}

/* The embedded config's architecture and decoding defaults ("generation"), as info prints them. */
static void print_config(const json_t *config) {
    const json_t *arch = json_object_get(config, "architecture");
    printf("config: %s\n", json_is_string(arch) ? json_string_value(arch) : "(present)");
    /* the model's recommended decoding options (config "generation"), as embedded */
    const json_t *gen = json_object_get(config, "generation");
    char *g = gen ? json_dumps(gen, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    if (g) printf("generation: %s\n", g);
    nz_free(g);
}

/* nzp info: a table of the model's tensors, totals, blobs, config (and memory). */
static void info_text(const nz_model *m, int memory) {
    info_totals tot = {0};
    printf("%-48s %-5s %-16s %-9s %-5s %8s %8s %8s\n", "tensor", "dtype", "shape", "mode", "coder", "bits/w",
           "bound", "ratio");
    for (size_t i = 0; i < nz_model_ntensors(m); i++) {
        const nz_tensor *t = nz_model_tensor(m, i);
        info_row r;
        info_row_of(t, &r, &tot);
        if (t->desc.mode.norm_block) /* lossy with normalisers: "lossy-3/64" */
            snprintf(r.mode + strlen(r.mode), sizeof r.mode - strlen(r.mode), "/%u", t->desc.mode.norm_block);
        printf("%-48.48s %-5s %-16.16s %-9s %-5s %8.3f %8.3f %7.2f%%\n", t->name, t->st_dtype, r.shape,
               r.mode, nz_coder_name(t->desc.coder), r.s.bits, r.s.bound, 100 * r.ratio);
    }
    uint64_t tn = tot.elems, ts = tot.src_bytes, tst = tot.stored_bytes;
    printf("total: %zu tensors, %" PRIu64 " elements, source %" PRIu64 " bytes, stored %" PRIu64
           " bytes (%.2f%%), %.3f bits/weight (bound %.3f), file %" PRIu64 " bytes, header %" PRIu64
           " bytes\n",
           nz_model_ntensors(m), tn, ts, tst, 100 * (ts ? (double)tst / (double)ts : 0),
           tn ? 8.0 * (double)tst / (double)tn : 0, tn ? tot.bound_bits / (double)tn : 0,
           nz_model_file_size(m), nz_model_header_size(m));
    for (size_t i = 0; i < nz_model_nblobs(m); i++) printf("embedded: %s\n", nz_model_blob_name(m, i));
    if (nz_model_config(m)) print_config(nz_model_config(m));
    if (memory) print_memory(tst, tot.decoded_bytes);
}

static int cmd_info(int argc, char **argv) {
    int json = 0, memory = 0;
    const char *path = NULL;
    int rc = info_args(argc, argv, &json, &memory, &path);
    if (rc) return rc;
    nz_model *m;
    nz_error e = {0};
    if (nz_model_open(path, &m, &e)) return fail(&e);
    if (json)
        info_json(m, memory);
    else
        info_text(m, memory);
    nz_model_free(m);
    return 0;
}

/* ------------------------------------------------------------- verify / unpack */

/* A failure verify found (ud: the nzp_progress, whose line goes first). */
static void report(void *ud, const nz_error *e) {
    nzp_progress_clear(ud);
    fprintf(stderr, "nzp: verify: %s\n", e->msg);
}

static int cmd_verify(int argc, char **argv) {
    const char *path = NULL;
    int quiet = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--quiet"))
            quiet = 1;
        else if (argv[i][0] == '-' || path)
            return usage_of("verify", "verify takes one file");
        else
            path = argv[i];
    }
    if (!path) return usage_of("verify", "verify takes one file");
    nz_model *m;
    nz_error e = {0};
    if (nz_model_open(path, &m, &e)) return fail(&e);
    uint64_t bad = 0, tiles = 0;
    for (size_t i = 0; i < nz_model_ntensors(m); i++) tiles += nz_model_tensor(m, i)->ntiles;
    double t0 = nz_now_s();
    nzp_progress pr;
    nzp_progress_start(&pr, "verify", "tiles", quiet);
    nz_verify_opts vo = {report, nzp_progress_engine, &pr};
    nz_verify_with(m, &vo, &bad);
    nzp_progress_end(&pr);
    if (bad)
        printf("%s: DAMAGED: %" PRIu64 " of %" PRIu64 " tiles/blobs failed\n", path, bad, tiles);
    else
        printf("%s: OK: %zu tensors, %" PRIu64 " tiles, %zu blobs verified in %.2f s\n", path,
               nz_model_ntensors(m), tiles, nz_model_nblobs(m), nz_now_s() - t0);
    nz_model_free(m);
    return bad ? 1 : 0;
}

/* Write len bytes to dir/name. @return 0 or -1 (message on stderr). */
static int write_file(const char *dir, const char *name, const void *data, size_t len) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *fp = fopen(path, "wb");
    if (!fp || fwrite(data, 1, len, fp) != len || fclose(fp)) {
        fprintf(stderr, "nzp: unpack: cannot write %s: %s\n", path, strerror(errno));
        if (fp) fclose(fp);
        return -1;
    }
    return 0;
}

/* nzp unpack IN.nzp OUT.safetensors, or nzp unpack --model-dir IN.nzp DIR:
 * the model directory again (model.safetensors, config.json, every blob). */
static int cmd_unpack(int argc, char **argv) {
    int dir = argc == 3 && !strcmp(argv[0], "--model-dir");
    if (dir) argc--, argv++;
    if (argc != 2 || argv[0][0] == '-' || argv[1][0] == '-')
        return usage_of("unpack", "unpack takes IN.nzp OUT.safetensors, or --model-dir IN.nzp DIR");
    nz_model *m;
    nz_error e = {0};
    if (nz_model_open(argv[0], &m, &e)) return fail(&e);
    char st[4096];
    snprintf(st, sizeof st, dir ? "%s/model.safetensors" : "%s", argv[1]);
    if (dir && mkdir(argv[1], 0777) && errno != EEXIST) {
        fprintf(stderr, "nzp: unpack: cannot create %s: %s\n", argv[1], strerror(errno));
        nz_model_free(m);
        return 1;
    }
    int rc = nz_unpack(m, st, &e);
    if (rc) {
        nz_model_free(m);
        return fail(&e);
    }
    int bad = 0;
    if (dir && nz_model_config(m)) {
        char *js = json_dumps(nz_model_config(m), JSON_INDENT(1) | JSON_PRESERVE_ORDER);
        bad |= !js || write_file(argv[1], "config.json", js, strlen(js));
        nz_free(js);
    }
    for (size_t i = 0; dir && !bad && i < nz_model_nblobs(m); i++) {
        const char *name = nz_model_blob_name(m, i);
        const uint8_t *data;
        size_t size;
        if (strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, "..")) {
            fprintf(stderr, "nzp: unpack: blob name '%s' is not a plain file name\n", name);
            bad = 1;
        } else if (nz_model_blob(m, name, &data, &size, &e)) {
            nz_model_free(m);
            return fail(&e);
        } else {
            bad |= write_file(argv[1], name, data, size);
        }
    }
    nz_model_free(m);
    return bad;
}

/* ------------------------------------------------------------- bench */

typedef struct {
    nz_tensor_desc d;
    uint8_t **tiles;
    size_t *len;
} encoded;

static void encoded_free(encoded *x) {
    for (uint64_t i = 0; x->tiles && i < nz_desc_ntiles(&x->d); i++) nz_free(x->tiles[i]);
    nz_free(x->tiles);
    nz_free(x->len);
}

static int keep_tile(void *ud, uint64_t t, const uint8_t *tile, size_t len, nz_error *e) {
    encoded *x = ud;
    if (!(x->tiles[t] = nz_malloc(len, NZ_MEM_OTHER))) return nz_fail(e, NZ_E_NOMEM, "out of memory");
    memcpy(x->tiles[t], tile, len);
    x->len[t] = len;
    return NZ_OK;
}

/* Re-encode a tensor's decoded values with another coder (same mode). */
static int reencode(const nz_tensor *t, const void *native, nz_coder coder, encoded *x, nz_error *e) {
    memset(x, 0, sizeof *x);
    nz_mode mode = t->desc.mode;
    nz_dtype nd = nz_desc_native_dtype(&t->desc);
    if (mode.kind == NZ_MODE_BF16) mode.kind = NZ_MODE_LOSSLESS;
    int rc = nz_desc_init(&x->d, nd, nz_dtype_size(nd), &mode, coder, t->desc.rows, t->desc.cols,
                          t->desc.tile_rows, e);
    if (!rc) rc = nz_tensor_analyze(&x->d, native, NULL, e);
    if (rc) return rc;
    uint64_t nt = nz_desc_ntiles(&x->d);
    x->tiles = nz_calloc(nt ? nt : 1, sizeof *x->tiles, NZ_MEM_OTHER);
    x->len = nz_calloc(nt ? nt : 1, sizeof *x->len, NZ_MEM_OTHER);
    if (!x->tiles || !x->len) return nz_fail(e, NZ_E_NOMEM, "out of memory");
    return nz_tensor_encode(&x->d, native, keep_tile, x, e);
}

/* Time decoding every tile of x (to fp32, or exponents only) for at least
 * min_s seconds. @return seconds per pass, or a negative value on error. */
static double time_tiles(nz_dctx *dc, const encoded *x, int exps_only, float *out, uint8_t *ex, double min_s,
                         nz_error *e) {
    uint64_t nt = nz_desc_ntiles(&x->d), reps = 0;
    double t0 = nz_now_s(), el;
    do {
        for (uint64_t j = 0; j < nt; j++) {
            int rc = exps_only ? nz_tile_decode_exponents(dc, &x->d, j, x->tiles[j], x->len[j], ex, e)
                               : nz_tile_decode_f32(dc, &x->d, j, x->tiles[j], x->len[j], out, e);
            if (rc) return -1;
        }
        reps++;
        el = nz_now_s() - t0;
    } while (el < min_s);
    return el / (double)reps;
}

/* The coders bench re-encodes with, and the decoders it times: a coder with one of its kernels. */
enum { BENCH_NV = 6, BENCH_NC = 3 };
static const nz_coder BENCH_CODERS[BENCH_NC] = {NZ_CODER_ESC, NZ_CODER_RANS, NZ_CODER_ZSTD};
static const struct {
    const char *name;
    int c; /* index in BENCH_CODERS */
    nz_rans_kernel kernel;
} BENCH_VARIANTS[BENCH_NV] = {{"esc avx2", 0, NZ_RANS_AVX2},      {"esc scalar", 0, NZ_RANS_SCALAR},
                              {"rans avx512", 1, NZ_RANS_AVX512}, {"rans avx2", 1, NZ_RANS_AVX2},
                              {"rans scalar", 1, NZ_RANS_SCALAR}, {"zstd", 2, NZ_RANS_AUTO}};

/* What bench measured, summed over the tensors. */
typedef struct {
    int ok[BENCH_NV]; /* the CPU runs the variant's kernel */
    double weights, secs[BENCH_NV], exps_secs[BENCH_NV], stored_secs;
    uint64_t bytes[BENCH_NV];
} bench_sums;

/* bench's command line. @return 0, or 2 after a usage error (message on stderr). */
static int bench_args(int argc, char **argv, double *seconds, const char **path, int *quiet) {
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            *seconds = atof(argv[++i]);
        else if (!strcmp(argv[i], "--quiet"))
            *quiet = 1;
        else if (argv[i][0] == '-')
            return usage_of("bench", "unknown option for bench");
        else
            *path = argv[i];
    }
    if (!*path || *seconds <= 0) return usage_of("bench", "bench takes one file");
    return 0;
}

/* Time every variant on x (the tensor re-encoded with each coder), at least per seconds each way (the
 * last variant's kernel stays set); out and ex: a tile's room. @return NZ_OK or the error (in e). */
static int time_variants(nz_dctx *dc, const encoded x[BENCH_NC], float *out, uint8_t *ex, double per,
                         bench_sums *b, nz_error *e) {
    int rc = NZ_OK;
    for (int v = 0; v < BENCH_NV && !rc; v++) {
        if (!b->ok[v]) continue;
        const encoded *xv = &x[BENCH_VARIANTS[v].c];
        nz_rans_set_kernel(BENCH_VARIANTS[v].kernel);
        for (uint64_t j = 0; j < nz_desc_ntiles(&xv->d); j++) b->bytes[v] += xv->len[j];
        double ta = time_tiles(dc, xv, 0, out, ex, per, e), tb = time_tiles(dc, xv, 1, out, ex, per, e);
        if (ta < 0 || tb < 0) rc = e->code ? e->code : NZ_E_CORRUPT;
        b->secs[v] += ta;
        b->exps_secs[v] += tb;
    }
    return rc;
}

/* Bench tensor i of m (coded): decoding as stored, then re-encoded with each coder, at least per
 * seconds a measurement. @return NZ_OK or the error (in e). */
static int bench_tensor(const nz_model *m, nz_dctx *dc, size_t i, double per, bench_sums *b, nz_error *e) {
    const nz_tensor *t = nz_model_tensor(m, i);
    nz_dtype nd = nz_desc_native_dtype(&t->desc);
    uint64_t n = t->desc.rows * t->desc.cols, tile_n = nz_desc_tile_nrows(&t->desc, 0) * t->desc.cols;
    uint8_t *native = nz_malloc(n * nz_dtype_size(nd), NZ_MEM_SCRATCH);
    float *out = nz_malloc(tile_n * sizeof(float), NZ_MEM_SCRATCH);
    uint8_t *ex = nz_malloc(tile_n, NZ_MEM_SCRATCH);
    encoded x[BENCH_NC] = {0};
    int rc = NZ_OK;
    if (!native || !out || !ex) rc = nz_fail(e, NZ_E_NOMEM, "out of memory");
    /* as stored and served: checksum + decode of the file's own tiles */
    double t0 = nz_now_s(), el;
    uint64_t reps = 0;
    do {
        for (uint64_t j = 0; j < t->ntiles && !rc; j++) rc = nz_model_decode_f32(m, dc, i, j, out, e);
        reps++;
        el = nz_now_s() - t0;
    } while (!rc && el < per);
    b->stored_secs += el / (double)reps;
    for (uint64_t j = 0; j < t->ntiles && !rc; j++)
        rc = nz_model_decode_native(m, dc, i, j, native + j * tile_n * nz_dtype_size(nd), e);
    for (int c = 0; c < BENCH_NC && !rc; c++) rc = reencode(t, native, BENCH_CODERS[c], &x[c], e);
    if (!rc) rc = time_variants(dc, x, out, ex, per, b, e);
    nz_rans_set_kernel(NZ_RANS_AUTO);
    b->weights += (double)n;
    for (int c = 0; c < BENCH_NC; c++) encoded_free(&x[c]);
    nz_free(native);
    nz_free(out);
    nz_free(ex);
    return rc;
}

/* bench's table: bits per weight and decode rates of each variant, then esc against the others. */
static void bench_print(const char *path, uint64_t ncoded, const bench_sums *b) {
    double weights = b->weights;
    printf("decode throughput, one core, the %" PRIu64 " coded tensors of %s (%.0f weights)\n", ncoded, path,
           weights);
    printf("%-26s %12s %16s %18s\n", "coder", "bits/weight", "to fp32 (Gw/s)", "exponents (Gs/s)");
    if (b->stored_secs > 0)
        printf("%-26s %12s %16.3f %18s\n", "as stored (with checksum)", "-", weights / b->stored_secs / 1e9,
               "-");
    for (int v = 0; v < BENCH_NV; v++) {
        if (!b->ok[v]) {
            printf("%-26s %12s\n", BENCH_VARIANTS[v].name, "(not supported by this CPU)");
            continue;
        }
        printf("%-26s %12.3f %16.3f %18.3f\n", BENCH_VARIANTS[v].name,
               weights ? 8.0 * (double)b->bytes[v] / weights : 0,
               b->secs[v] > 0 ? weights / b->secs[v] / 1e9 : 0,
               b->exps_secs[v] > 0 ? weights / b->exps_secs[v] / 1e9 : 0);
    }
    int esc = b->ok[0] ? 0 : 1, rans = b->ok[2] ? 2 : b->ok[3] ? 3 : 4, vs[2] = {rans, BENCH_NV - 1};
    for (int k = 0; k < 2; k++)
        if (b->secs[vs[k]] > 0 && b->secs[esc] > 0)
            printf("ratio %s / %s: to fp32 %.2fx, exponents %.2fx\n", BENCH_VARIANTS[esc].name,
                   BENCH_VARIANTS[vs[k]].name, b->secs[vs[k]] / b->secs[esc],
                   b->exps_secs[vs[k]] / b->exps_secs[esc]);
}

static int cmd_bench(int argc, char **argv) {
    double seconds = 0.5;
    const char *path = NULL;
    int quiet = 0;
    int rc = bench_args(argc, argv, &seconds, &path, &quiet);
    if (rc) return rc;
    nz_model *m;
    nz_error e = {0};
    if (nz_model_open(path, &m, &e)) return fail(&e);
    bench_sums b = {0};
    for (int v = 0; v < BENCH_NV; v++) b.ok[v] = nz_rans_set_kernel(BENCH_VARIANTS[v].kernel) == NZ_OK;
    nz_rans_set_kernel(NZ_RANS_AUTO);
    uint64_t ncoded = 0, done = 0, src_total = 0, src_done = 0;
    for (size_t i = 0; i < nz_model_ntensors(m); i++) {
        const nz_tensor *t = nz_model_tensor(m, i);
        if (t->desc.coder == NZ_CODER_NONE) continue;
        ncoded++;
        src_total += t->desc.rows * t->desc.cols * t->desc.elem_size;
    }
    nzp_progress pr;
    nzp_progress_start(&pr, "bench", "tensors", quiet);
    double per = seconds / (double)(ncoded ? ncoded : 1) / (2 * BENCH_NV + 1);
    nz_dctx *dc = nz_dctx_create();
    for (size_t i = 0; i < nz_model_ntensors(m) && !rc && dc; i++) {
        const nz_tensor *t = nz_model_tensor(m, i);
        if (t->desc.coder == NZ_CODER_NONE) continue;
        nzp_progress_update(&pr, done, ncoded, src_done, src_total, t->name);
        rc = bench_tensor(m, dc, i, per, &b, &e);
        done++;
        src_done += t->desc.rows * t->desc.cols * t->desc.elem_size;
    }
    if (!dc) rc = nz_fail(&e, NZ_E_NOMEM, "out of memory");
    if (!rc) nzp_progress_update(&pr, done, ncoded, src_done, src_total, NULL);
    nzp_progress_end(&pr);
    nz_dctx_free(dc);
    nz_model_free(m);
    if (rc) return fail(&e);
    bench_print(path, ncoded, &b);
    return 0;
}

int main(int argc, char **argv) {
    nz_alloc_hook_json();
    if (argc < 2) return usage_of(NULL, NULL);
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        print_usage(stdout,
                    argc > 2 && strcmp(argv[2], "translate") && strcmp(argv[2], "chat") ? argv[2] : NULL);
        return 0;
    }
    /* `nzp CMD -h|--help`: that subcommand's usage on stdout (translate and chat print their long ones) */
    for (int i = 2; i < argc && strcmp(cmd, "translate") && strcmp(cmd, "chat"); i++)
        if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
            for (size_t k = 0; k < N_USAGES; k++)
                if (!strcmp(cmd, USAGES[k].cmd)) {
                    print_usage(stdout, cmd);
                    return 0;
                }
            break;
        }
    if (!strcmp(cmd, "pack")) return cmd_pack(argc - 2, argv + 2);
    if (!strcmp(cmd, "unpack")) return cmd_unpack(argc - 2, argv + 2);
    if (!strcmp(cmd, "info")) return cmd_info(argc - 2, argv + 2);
    if (!strcmp(cmd, "verify")) return cmd_verify(argc - 2, argv + 2);
    if (!strcmp(cmd, "translate")) return nzp_translate(argc - 2, argv + 2);
    if (!strcmp(cmd, "chat")) return nzp_chat(argc - 2, argv + 2);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 2, argv + 2);
    return usage_of(NULL, "unknown command");
}
