/*
 * tok_cli — drive models/nz_tok.h and models/nz_spm.h from the command line,
 * for tests/python/test_tokenizer.py.
 *
 *   tok_cli [--bos] [--no-eos] encode SPM_MODEL DICT_TXT < lines
 *       each input line -> its fairseq ids, space-separated
 *   tok_cli pieces SPM_MODEL DICT_TXT < lines
 *       each input line -> SentencePiece "id:hex(piece)" items, space-separated
 *   tok_cli [--spm-detok] [--hex] decode SPM_MODEL DICT_TXT < lines of ids
 *       each line of space-separated ids -> detokenized text (fairseq's, or
 *       SentencePiece's DecodePieces with --spm-detok); --hex prints it as hex
 *   tok_cli dict DICT_TXT
 *       one line per id: "id count hex(symbol) index(symbol)"
 *
 * Instead of SPM_MODEL DICT_TXT, encode/pieces/decode also take one MODEL.nzp
 * and use its embedded spm.model and dict.txt (nz_tok_from_model).
 *
 * Input lines end at '\n' (the '\n' is not part of the text; every other
 * byte, '\r' and NUL included, is). A line that fails prints "ERROR: message"
 * in its place and the rest continue. Exit status: 0, 1 when a file cannot be
 * loaded, 2 on bad usage.
 */
#include "nz_alloc.h"
#include "nz_common.h"
#include "nz_container.h"
#include "nz_spm.h"
#include "nz_tok.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int usage(void) {
    fputs("usage: tok_cli [--bos] [--no-eos] [--spm-detok] [--hex] encode|pieces|decode SPM_MODEL DICT_TXT\n"
          "       tok_cli [options] encode|pieces|decode MODEL.nzp\n"
          "       tok_cli dict DICT_TXT\n",
          stderr);
    return 2;
}

static void put_hex(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) printf("%02x", (unsigned char)s[i]);
}

static int load_dict(const char *path, nz_dict **d) {
    const uint8_t *map = NULL;
    size_t len = 0;
    nz_error e = {0};
    int rc = nz_map_file(path, &map, &len, &e);
    if (!rc) rc = nz_dict_parse((const char *)map, len, path, d, &e);
    nz_unmap_file(map, len);
    if (rc) fprintf(stderr, "tok_cli: %s\n", e.msg);
    return rc;
}

static int load_tok(const char *spm_path, const char *dict_path, nz_tok **t) {
    const uint8_t *spm = NULL, *dict = NULL;
    size_t spm_len = 0, dict_len = 0;
    nz_error e = {0};
    int rc = nz_map_file(spm_path, &spm, &spm_len, &e);
    if (!rc) rc = nz_map_file(dict_path, &dict, &dict_len, &e);
    if (!rc) rc = nz_tok_create(spm, spm_len, (const char *)dict, dict_len, t, &e);
    nz_unmap_file(spm, spm_len);
    nz_unmap_file(dict, dict_len);
    if (rc) fprintf(stderr, "tok_cli: %s\n", e.msg);
    return rc;
}

static int load_nzp(const char *path, nz_tok **t) {
    nz_model *m = NULL;
    nz_error e = {0};
    int rc = nz_model_open(path, &m, &e);
    if (!rc) rc = nz_tok_from_model(m, t, &e);
    nz_model_free(m);
    if (rc) fprintf(stderr, "tok_cli: %s: %s\n", path, e.msg);
    return rc;
}

static int cmd_dict(const char *path) {
    nz_dict *d = NULL;
    if (load_dict(path, &d)) return 1;
    for (size_t i = 0; i < nz_dict_size(d); i++) {
        size_t len;
        const char *s = nz_dict_symbol(d, (int32_t)i, &len);
        printf("%zu %lld ", i, (long long)nz_dict_count(d, (int32_t)i));
        put_hex(s, len);
        printf(" %d\n", nz_dict_index(d, s, len));
    }
    nz_dict_free(d);
    return 0;
}

/* Parse a line of space-separated decimal ids. @return 0, or -1 (message in e). */
static int parse_ids(char *line, size_t len, int32_t **ids, size_t *n, nz_error *e) {
    *n = 0;
    *ids = nz_malloc((len / 2 + 1) * sizeof **ids, NZ_MEM_OTHER);
    if (!*ids) return nz_fail(e, NZ_E_NOMEM, "out of memory");
    char *p = line, *end = line + len;
    while (p < end) {
        while (p < end && *p == ' ') p++;
        if (p >= end) break;
        errno = 0;
        char *q;
        long v = strtol(p, &q, 10);
        if (q == p || errno || v < INT32_MIN || v > INT32_MAX || (q < end && *q != ' '))
            return nz_fail(e, NZ_E_FORMAT, "bad id at column %zu", (size_t)(p - line) + 1);
        (*ids)[(*n)++] = (int32_t)v;
        p = q;
    }
    return 0;
}

int main(int argc, char **argv) {
    unsigned flags = NZ_TOK_ADD_EOS;
    nz_detok_mode mode = NZ_DETOK_FAIRSEQ;
    int hex = 0, a = 1;
    for (; a < argc && !strncmp(argv[a], "--", 2); a++) {
        if (!strcmp(argv[a], "--bos"))
            flags |= NZ_TOK_ADD_BOS;
        else if (!strcmp(argv[a], "--no-eos"))
            flags &= ~NZ_TOK_ADD_EOS;
        else if (!strcmp(argv[a], "--spm-detok"))
            mode = NZ_DETOK_SPM;
        else if (!strcmp(argv[a], "--hex"))
            hex = 1;
        else
            return usage();
    }
    if (a < argc && !strcmp(argv[a], "dict")) return a + 2 == argc ? cmd_dict(argv[a + 1]) : usage();
    if (a + 2 != argc && a + 3 != argc) return usage();
    const char *cmd = argv[a];
    if (strcmp(cmd, "encode") && strcmp(cmd, "pieces") && strcmp(cmd, "decode")) return usage();
    nz_tok *t = NULL;
    if (a + 2 == argc ? load_nzp(argv[a + 1], &t) : load_tok(argv[a + 1], argv[a + 2], &t)) return 1;

    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    while ((got = getline(&line, &cap, stdin)) >= 0) {
        size_t len = (size_t)got;
        if (len && line[len - 1] == '\n') line[--len] = '\0';
        nz_error e = {0};
        int rc = NZ_OK;
        if (!strcmp(cmd, "encode")) {
            int32_t *ids = NULL;
            size_t n = 0;
            rc = nz_tok_encode(t, line, len, flags, &ids, &n, &e);
            for (size_t i = 0; !rc && i < n; i++) printf(i ? " %d" : "%d", ids[i]);
            nz_free(ids);
        } else if (!strcmp(cmd, "pieces")) {
            nz_spm_pieces *p = NULL;
            rc = nz_spm_encode(nz_tok_spm(t), line, len, &p, &e);
            for (size_t i = 0; !rc && i < p->n; i++) {
                printf(i ? " %d:" : "%d:", p->id[i]);
                put_hex(p->piece[i], p->len[i]);
            }
            nz_spm_pieces_free(p);
        } else {
            int32_t *ids = NULL;
            size_t n = 0;
            char *text = NULL;
            size_t tlen = 0;
            rc = parse_ids(line, len, &ids, &n, &e);
            if (!rc) rc = nz_tok_decode(t, ids, n, mode, &text, &tlen, &e);
            if (!rc && hex)
                put_hex(text, tlen);
            else if (!rc)
                fwrite(text, 1, tlen, stdout);
            nz_free(text);
            nz_free(ids);
        }
        if (rc) printf("ERROR: %s", e.msg);
        putchar('\n');
    }
    free(line);
    nz_tok_free(t);
    return fflush(stdout) ? 1 : 0;
}
