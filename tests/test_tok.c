/* Tokenizer: fairseq dict.txt parsing (models/nz_tok.h) from in-memory
 * buffers, and the tokenizer on a SentencePiece model built in memory (a
 * hand-serialized ModelProto, so no file is needed). The comparisons with
 * Python SentencePiece and fairseq on trained models are in
 * tests/python/test_tokenizer.py. */
#include "test_util.h"
#include "test_pb.h"

#include "nz_alloc.h"
#include "nz_spm.h"
#include "nz_tok.h"

#include <stdio.h>
#include <unistd.h>

/* ------------------------------------------------------------- helpers */

/* Parse a dict held in an exact-size heap copy (no NUL after it). */
static int parse(const char *txt, size_t len, nz_dict **d, nz_error *e) {
    uint8_t *buf = dup_exact(txt, len);
    memset(e, 0, sizeof *e);
    int rc = nz_dict_parse((const char *)buf, len, NULL, d, e);
    free(buf);
    return rc;
}
#define PARSE(s, d, e) parse(s, sizeof(s) - 1, d, e)

static void expect_error(const char *txt, size_t len, const char *needle1, const char *needle2) {
    nz_dict *d = (nz_dict *)1;
    nz_error e;
    int rc = parse(txt, len, &d, &e);
    if (rc != NZ_E_FORMAT || !strstr(e.msg, needle1) || (needle2 && !strstr(e.msg, needle2)))
        fail_msg("dict %.40s: rc %d, message \"%s\", expected \"%s\"", txt, rc, e.msg, needle1);
    assert_null(d);
    assert_int_equal(e.code, NZ_E_FORMAT);
}
#define EXPECT_ERROR(s, n1, n2) expect_error(s, sizeof(s) - 1, n1, n2)

static void expect_symbol(const nz_dict *d, int32_t id, const char *sym, size_t len) {
    size_t l = 99;
    const char *s = nz_dict_symbol(d, id, &l);
    assert_non_null(s);
    assert_int_equal(l, len);
    assert_memory_equal(s, sym, len);
    assert_int_equal(s[len], '\0');
}
#define EXPECT_SYMBOL(d, id, s) expect_symbol(d, id, s, sizeof(s) - 1)

/* ------------------------------------------------------- dict parsing */

static void test_dict_plain(void **state) {
    (void)state;
    nz_dict *d = NULL;
    nz_error e;
    assert_int_equal(PARSE("hello 5\nworld 3\n\xe2\x96\x81"
                           "der 12\n",
                           &d, &e),
                     NZ_OK);
    assert_int_equal(nz_dict_size(d), 7);
    EXPECT_SYMBOL(d, NZ_TOK_BOS, "<s>");
    EXPECT_SYMBOL(d, NZ_TOK_PAD, "<pad>");
    EXPECT_SYMBOL(d, NZ_TOK_EOS, "</s>");
    EXPECT_SYMBOL(d, NZ_TOK_UNK, "<unk>");
    EXPECT_SYMBOL(d, 4, "hello");
    EXPECT_SYMBOL(d, 5, "world");
    EXPECT_SYMBOL(d, 6,
                  "\xe2\x96\x81"
                  "der");
    assert_int_equal(nz_dict_count(d, 0), 1);
    assert_int_equal(nz_dict_count(d, 4), 5);
    assert_int_equal(nz_dict_count(d, 6), 12);
    assert_int_equal(nz_dict_index(d, "world", 5), 5);
    assert_int_equal(nz_dict_index(d, "</s>", 4), NZ_TOK_EOS);
    assert_int_equal(nz_dict_index(d, "wor", 3), NZ_TOK_UNK);
    assert_int_equal(nz_dict_index(d, "", 0), NZ_TOK_UNK);
    assert_int_equal(nz_dict_index(d, NULL, 0), NZ_TOK_UNK);
    assert_true(nz_dict_contains(d, "hello", 5));
    assert_false(nz_dict_contains(d, "hello ", 6));
    assert_null(nz_dict_symbol(d, 7, NULL));
    assert_null(nz_dict_symbol(d, -1, NULL));
    assert_int_equal(nz_dict_count(d, 7), 0);
    nz_dict_free(d);
}

static void test_dict_empty(void **state) {
    (void)state;
    /* an empty dict.txt is valid in fairseq: the four specials only */
    nz_dict *d = NULL;
    nz_error e = {0};
    assert_int_equal(nz_dict_parse(NULL, 0, NULL, &d, &e), NZ_OK);
    assert_int_equal(nz_dict_size(d), NZ_TOK_NSPECIAL);
    assert_int_equal(nz_dict_index(d, "<unk>", 5), NZ_TOK_UNK);
    nz_dict_free(d);
    assert_int_equal(parse("", 0, &d, &e), NZ_OK);
    assert_int_equal(nz_dict_size(d), 4);
    nz_dict_free(d);
}

static void test_dict_newlines_and_whitespace(void **state) {
    (void)state;
    nz_dict *d = NULL;
    nz_error e;
    /* universal newlines (\n, \r\n, \r), no final newline, trailing
     * whitespace (Python str.rstrip: tab, U+3000) */
    assert_int_equal(PARSE("a 1\r\nb 2\rc 3\nd 4  \t\ne 5\xe3\x80\x80\nf 6", &d, &e), NZ_OK);
    assert_int_equal(nz_dict_size(d), 10);
    const char *syms = "abcdef";
    for (int i = 0; i < 6; i++) {
        expect_symbol(d, 4 + i, syms + i, 1);
        assert_int_equal(nz_dict_count(d, 4 + i), i + 1);
    }
    nz_dict_free(d);
    /* the symbol is everything before the last space: it may hold spaces or
     * be empty; a second space before the count belongs to the symbol */
    assert_int_equal(PARSE("New York 7\n 4\na  9\n", &d, &e), NZ_OK);
    EXPECT_SYMBOL(d, 4, "New York");
    EXPECT_SYMBOL(d, 5, "");
    EXPECT_SYMBOL(d, 6, "a ");
    assert_int_equal(nz_dict_index(d, "", 0), 5);
    assert_int_equal(nz_dict_index(d, "a", 1), NZ_TOK_UNK);
    nz_dict_free(d);
    /* a UTF-8 byte-order mark stays part of the first symbol (encoding="utf-8") */
    assert_int_equal(PARSE("\xef\xbb\xbf"
                           "a 1\n",
                           &d, &e),
                     NZ_OK);
    EXPECT_SYMBOL(d, 4,
                  "\xef\xbb\xbf"
                  "a");
    nz_dict_free(d);
    /* NUL and tab inside a symbol are kept */
    assert_int_equal(parse("a\0b 1\nc\td 2\n", 12, &d, &e), NZ_OK);
    expect_symbol(d, 4, "a\0b", 3);
    assert_int_equal(nz_dict_index(d, "a\0b", 3), 4);
    EXPECT_SYMBOL(d, 5, "c\td");
    nz_dict_free(d);
}

static void test_dict_counts(void **state) {
    (void)state;
    nz_dict *d = NULL;
    nz_error e;
    /* Python int(): sign, '_' between digits, leading zeros, surrounding
     * whitespace; beyond int64 clamps */
    assert_int_equal(PARSE("a +7\nb -2\nc 1_000\nd 007\ne \t5\nf 99999999999999999999999\n"
                           "g -99999999999999999999999\nh 9223372036854775807\n",
                           &d, &e),
                     NZ_OK);
    const int64_t want[] = {7, -2, 1000, 7, 5, INT64_MAX, INT64_MIN, INT64_MAX};
    for (int i = 0; i < 8; i++) assert_true(nz_dict_count(d, 4 + i) == want[i]);
    EXPECT_SYMBOL(d, 8, "e");
    nz_dict_free(d);
}

static void test_dict_errors_name_the_line(void **state) {
    (void)state;
    EXPECT_ERROR("a 1\nb\n", "dict.txt line 2:", "expected '<symbol> <count>");
    EXPECT_ERROR("a\t1\n", "line 1:", "\\x09");
    EXPECT_ERROR("a 1\nb 2\nc x\n", "line 3:", "\"c x\"");
    EXPECT_ERROR("a 1.5\n", "line 1:", NULL);
    EXPECT_ERROR("a 1__0\n", "line 1:", NULL);
    EXPECT_ERROR("a 1_\n", "line 1:", NULL);
    EXPECT_ERROR("a _1\n", "line 1:", NULL);
    EXPECT_ERROR("a +\n", "line 1:", NULL);
    EXPECT_ERROR("a 0x10\n", "line 1:", NULL);
    EXPECT_ERROR("a \n", "line 1:", NULL);
    EXPECT_ERROR("a 1\n\nb 2\n", "line 2:", NULL);           /* blank line */
    EXPECT_ERROR("a 1\n \n", "line 2:", NULL);               /* whitespace-only line */
    EXPECT_ERROR("a 1\r\n\r\nb 2\r\n", "line 2:", NULL);     /* blank line, CRLF */
    EXPECT_ERROR("a 1\rb 2\r\rc 3", "line 3:", NULL);        /* blank line, CR */
    EXPECT_ERROR("#fairseq:overwrite\n", "line 1:", NULL);   /* the flag alone */
    EXPECT_ERROR("a #fairseq:overwrite\n", "line 1:", NULL); /* flag without count */
    EXPECT_ERROR("a 1\nb\xff 2\n", "line 2:", "invalid UTF-8");
    EXPECT_ERROR("a 1\n\xed\xa0\x80 3\n", "line 2:", "invalid UTF-8"); /* surrogate */
    EXPECT_ERROR("a 1\n\xc0\xaf 3\n", "line 2:", "invalid UTF-8");     /* overlong */
    EXPECT_ERROR("a 1\n\xf4\x90\x80\x80 3\n", "line 2:", "invalid UTF-8");
    EXPECT_ERROR("a 1\nb 1\xc3", "line 2:", "invalid UTF-8"); /* truncated at the end */
    /* duplicates, the specials included, need the overwrite flag */
    EXPECT_ERROR("a 1\nb 2\na 3\n", "line 3:", "duplicate symbol \"a\" (already id 4)");
    EXPECT_ERROR("x 1\n</s> 1\n", "line 2:", "#fairseq:overwrite");
    EXPECT_ERROR("<unk> 1\n", "line 1:", "already id 3");
    /* a long line is cut in the message */
    char big[400];
    memset(big, 'x', sizeof big);
    nz_dict *d = NULL;
    nz_error e;
    assert_int_equal(parse(big, sizeof big, &d, &e), NZ_E_FORMAT);
    assert_non_null(strstr(e.msg, "..."));
    assert_true(strlen(e.msg) < 200);
}

static void test_dict_overwrite(void **state) {
    (void)state;
    nz_dict *d = NULL;
    nz_error e;
    assert_int_equal(PARSE("a 1\nb 2\na 3 #fairseq:overwrite\n<unk> 0 #fairseq:overwrite\n"
                           "fresh 4 #fairseq:overwrite\na 5 #fairseq:overwrite  \n",
                           &d, &e),
                     NZ_OK);
    assert_int_equal(nz_dict_size(d), 10);
    /* symbol->id answers the latest id; the old ids still map to the symbol */
    assert_int_equal(nz_dict_index(d, "a", 1), 9);
    EXPECT_SYMBOL(d, 4, "a");
    EXPECT_SYMBOL(d, 6, "a");
    EXPECT_SYMBOL(d, 9, "a");
    assert_int_equal(nz_dict_count(d, 6), 3);
    assert_int_equal(nz_dict_count(d, 9), 5);
    assert_int_equal(nz_dict_index(d, "<unk>", 5), 7);
    EXPECT_SYMBOL(d, NZ_TOK_UNK, "<unk>");
    assert_int_equal(nz_dict_index(d, "fresh", 5), 8);
    assert_int_equal(nz_dict_index(d, "b", 1), 5);
    nz_dict_free(d);
}

static void test_dict_many(void **state) {
    (void)state;
    size_t n = tu_quick() ? 20000 : 200000, cap = n * 24, len = 0;
    char *txt = xmalloc(cap);
    for (size_t i = 0; i < n; i++) len += (size_t)snprintf(txt + len, cap - len, "w%zu %zu\n", i, n - i);
    /* every 1000th symbol redefined at the end */
    for (size_t i = 0; i < n; i += 1000)
        len += (size_t)snprintf(txt + len, cap - len, "w%zu 0 #fairseq:overwrite\n", i);
    nz_dict *d = NULL;
    nz_error e;
    assert_int_equal(parse(txt, len, &d, &e), NZ_OK);
    assert_int_equal(nz_dict_size(d), 4 + n + (n + 999) / 1000);
    char w[32];
    for (size_t i = 0; i < n; i++) {
        int l = snprintf(w, sizeof w, "w%zu", i);
        int32_t id = nz_dict_index(d, w, (size_t)l);
        int32_t want = i % 1000 ? (int32_t)(4 + i) : (int32_t)(4 + n + i / 1000);
        if (id != want) fail_msg("%s: id %d, expected %d", w, id, want);
        expect_symbol(d, (int32_t)(4 + i), w, (size_t)l);
    }
    nz_dict_free(d);
    free(txt);
}

static void test_dict_bad_args(void **state) {
    (void)state;
    nz_error e = {0};
    nz_dict *d = (nz_dict *)1;
    assert_int_equal(nz_dict_parse("a 1\n", 4, NULL, NULL, &e), NZ_E_INVALID_ARG);
    assert_int_equal(nz_dict_parse(NULL, 4, "x.txt", &d, &e), NZ_E_INVALID_ARG);
    assert_null(d);
    assert_non_null(strstr(e.msg, "x.txt"));
    assert_int_equal(nz_dict_parse("a", 1, "my.dict", &d, NULL), NZ_E_FORMAT); /* err may be NULL */
    assert_int_equal(nz_dict_parse("a", 1, "my.dict", &d, &e), NZ_E_FORMAT);
    assert_non_null(strstr(e.msg, "my.dict line 1:"));
    nz_dict_free(NULL);
    assert_int_equal(nz_dict_size(NULL), 0);
    assert_int_equal(nz_dict_index(NULL, "a", 1), NZ_TOK_UNK);
    assert_null(nz_dict_symbol(NULL, 0, NULL));
}

/* ------------------------------------------- in-memory SentencePiece model */

#define U2581 "\xe2\x96\x81"
#define NEL   "\xc2\x85"     /* U+0085, Python whitespace */
#define IDSP  "\xe3\x80\x80" /* U+3000 */

/* A unigram model (sentencepiece_model.proto: ModelProto.pieces = 1
 * {piece = 1, score = 2, type = 3}, trainer_spec = 2 {model_type = 3,
 * unk_id = 40, bos_id = 41, eos_id = 42, pad_id = 43}, normalizer_spec = 3
 * {name = 1}): no normalisation rules, so text is only whitespace-escaped. */
static const struct {
    const char *piece;
    float score;
    int type; /* 1 normal, 2 unknown, 3 control */
} PIECES[] = {
    {"<unk>", 0, 2}, {U2581 "ab", -1, 1}, {U2581, -2, 1},          {"a", -2, 1},    {"b", -2, 1},
    {"c", -2, 1},    {"\xc3\x9f", -2, 1}, {"\xe6\x9d\xb1", -2, 1}, {"<ctl>", 0, 3},
};
enum { NPIECES = sizeof PIECES / sizeof PIECES[0] };

static pb *make_model(void) {
    pb *m = xmalloc(sizeof *m);
    m->n = 0;
    for (int i = 0; i < NPIECES; i++) {
        pb sp = {.n = 0};
        pb_bytes(&sp, 1, PIECES[i].piece, strlen(PIECES[i].piece));
        pb_float(&sp, 2, PIECES[i].score);
        pb_int(&sp, 3, PIECES[i].type);
        pb_bytes(m, 1, sp.b, sp.n);
    }
    pb ts = {.n = 0};
    pb_int(&ts, 3, 1); /* UNIGRAM */
    pb_int(&ts, 40, 0);
    pb_int(&ts, 41, -1);
    pb_int(&ts, 42, -1);
    pb_int(&ts, 43, -1);
    pb_bytes(m, 2, ts.b, ts.n);
    pb ns = {.n = 0};
    pb_bytes(&ns, 1, "identity", 8);
    pb_bytes(m, 3, ns.b, ns.n);
    return m;
}

/* dict: "▁ab" 4, "▁" 5, "c" 6, "a" 7, "ß" 8, "<0x41>" 9, NEL 10, "\u3000c" 11
 * ("b", "東" are not in it) */
static const char DICT[] =
    U2581 "ab 10\n" U2581 " 9\nc 8\na 7\n\xc3\x9f 6\n<0x41> 1\n" NEL " 1\n" IDSP "c 1\n";

static nz_tok *make_tok(void) {
    pb *m = make_model();
    uint8_t *spm = dup_exact(m->b, m->n);
    uint8_t *dict = dup_exact(DICT, sizeof DICT - 1);
    nz_tok *t = NULL;
    nz_error e = {0};
    int rc = nz_tok_create(spm, m->n, (const char *)dict, sizeof DICT - 1, &t, &e);
    if (rc) fail_msg("nz_tok_create: %s", e.msg);
    free(spm); /* the tokenizer keeps copies */
    free(dict);
    free(m);
    return t;
}

static void test_spm_shim(void **state) {
    (void)state;
    pb *m = make_model();
    nz_spm *sp = NULL;
    nz_error e = {0};
    assert_int_equal(nz_spm_load(m->b, m->n, &sp, &e), NZ_OK);
    free(m);
    assert_int_equal(nz_spm_piece_count(sp), NPIECES);
    assert_int_equal(nz_spm_unk_id(sp), 0);
    for (int i = 0; i < NPIECES; i++) {
        size_t l;
        const char *p = nz_spm_id_to_piece(sp, i, &l);
        assert_string_equal(p, PIECES[i].piece);
        assert_int_equal(l, strlen(PIECES[i].piece));
        assert_int_equal(nz_spm_piece_to_id(sp, p, l), i);
    }
    assert_null(nz_spm_id_to_piece(sp, NPIECES, NULL));
    assert_null(nz_spm_id_to_piece(sp, -1, NULL));
    assert_int_equal(nz_spm_piece_to_id(sp, "zz", 2), 0);

    nz_spm_pieces *p = NULL;
    const char text[] = "  ab  c b\xe6\x9d\xb1x ";
    assert_int_equal(nz_spm_encode(sp, text, sizeof text - 1, &p, &e), NZ_OK);
    /* extra whitespace removed, dummy prefix added: "▁ab▁c▁b東x" */
    const char *want[] = {U2581 "ab", U2581, "c", U2581, "b", "\xe6\x9d\xb1", "x"};
    const int32_t want_id[] = {1, 2, 5, 2, 4, 7, 0};
    assert_int_equal(p->n, 7);
    for (size_t i = 0; i < p->n; i++) {
        assert_int_equal(p->len[i], strlen(want[i]));
        assert_string_equal(p->piece[i], want[i]);
        assert_int_equal(p->id[i], want_id[i]);
    }
    char *out = NULL;
    size_t len = 0;
    assert_int_equal(nz_spm_decode_pieces(sp, p->piece, p->len, p->n, &out, &len, &e), NZ_OK);
    assert_string_equal(out, "ab c b\xe6\x9d\xb1x");
    assert_int_equal(len, strlen(out));
    nz_free(out);
    nz_spm_pieces_free(p);

    /* empty text: no pieces; decode of nothing: "" */
    assert_int_equal(nz_spm_encode(sp, NULL, 0, &p, &e), NZ_OK);
    assert_int_equal(p->n, 0);
    nz_spm_pieces_free(p);
    assert_int_equal(nz_spm_decode_pieces(sp, NULL, NULL, 0, &out, NULL, &e), NZ_OK);
    assert_string_equal(out, "");
    nz_free(out);
    /* decode: control pieces vanish, unk -> " ⁇ ", pieces not in the
     * vocabulary are copied; NUL-terminated pieces (lens NULL) */
    const char *pcs[] = {U2581 "ab", "<ctl>", "<unk>", "<0x41>", "c"};
    assert_int_equal(nz_spm_decode_pieces(sp, pcs, NULL, 5, &out, &len, &e), NZ_OK);
    assert_string_equal(out, "ab \xe2\x81\x87 <0x41>c");
    nz_free(out);

    /* invalid UTF-8: not an error; each bad byte is U+FFFD, unknown (the
     * unigram model merges consecutive unknown characters into one piece) */
    const char bad[] = "a\xff\xc3";
    assert_int_equal(nz_spm_encode(sp, bad, 3, &p, &e), NZ_OK);
    assert_int_equal(p->n, 3);
    assert_string_equal(p->piece[2], "\xef\xbf\xbd\xef\xbf\xbd");
    assert_int_equal(p->id[2], 0);
    nz_spm_pieces_free(p);

    /* bad arguments */
    assert_int_equal(nz_spm_encode(sp, NULL, 3, &p, &e), NZ_E_INVALID_ARG);
    assert_null(p);
    assert_int_equal(nz_spm_encode(sp, "a", 1, NULL, &e), NZ_E_INVALID_ARG);
    assert_int_equal(nz_spm_decode_pieces(sp, NULL, NULL, 2, &out, NULL, &e), NZ_E_INVALID_ARG);
    assert_null(out);
    const char *nul[] = {"a", NULL};
    assert_int_equal(nz_spm_decode_pieces(sp, nul, NULL, 2, &out, NULL, &e), NZ_E_INVALID_ARG);
    assert_non_null(strstr(e.msg, "piece 1"));
    nz_spm_free(sp);
    nz_spm_free(NULL);
    nz_spm_pieces_free(NULL);
}

static void test_spm_bad_models(void **state) {
    (void)state;
    nz_spm *sp = (nz_spm *)1;
    nz_error e = {0};
    assert_int_equal(nz_spm_load("", 0, &sp, &e), NZ_E_FORMAT);
    assert_null(sp);
    assert_non_null(strstr(e.msg, "sentencepiece load"));
    const char junk[] = "\x00\x01 definitely not a protobuf \xff\xff\xff\xff";
    assert_int_equal(nz_spm_load(junk, sizeof junk - 1, &sp, &e), NZ_E_FORMAT);
    assert_null(sp);
    assert_int_equal(nz_spm_load(NULL, 5, &sp, &e), NZ_E_INVALID_ARG);
    assert_int_equal(nz_spm_load("x", 1, NULL, &e), NZ_E_INVALID_ARG);
    /* every truncation of a valid model is refused or loads; never crashes */
    pb *m = make_model();
    for (size_t n = 0; n < m->n; n++) {
        uint8_t *b = dup_exact(m->b, n);
        if (nz_spm_load(b, n, &sp, NULL) == NZ_OK) nz_spm_free(sp);
        free(b);
    }
    /* a model without an unknown piece is refused */
    pb bad = {.n = 0}, piece = {.n = 0};
    pb_bytes(&piece, 1, "a", 1);
    pb_float(&piece, 2, -1);
    pb_bytes(&bad, 1, piece.b, piece.n);
    assert_int_not_equal(nz_spm_load(bad.b, bad.n, &sp, &e), NZ_OK);
    free(m);

    nz_tok *t = (nz_tok *)1;
    assert_int_equal(nz_tok_create(junk, sizeof junk - 1, "a 1\n", 4, &t, &e), NZ_E_FORMAT);
    assert_null(t);
    assert_non_null(strstr(e.msg, "spm.model: "));
    m = make_model();
    assert_int_equal(nz_tok_create(m->b, m->n, "a 1\nb\n", 6, &t, &e), NZ_E_FORMAT);
    assert_null(t);
    assert_non_null(strstr(e.msg, "dict.txt line 2:"));
    free(m);
    nz_tok_free(NULL);
}

static void expect_ids(const nz_tok *t, const char *text, size_t len, unsigned flags, const int32_t *want,
                       size_t nwant) {
    int32_t *ids = NULL;
    size_t n = 99;
    nz_error e = {0};
    uint8_t *buf = dup_exact(text, len);
    int rc = nz_tok_encode(t, (const char *)buf, len, flags, &ids, &n, &e);
    free(buf);
    if (rc) fail_msg("encode \"%s\": %s", text, e.msg);
    assert_non_null(ids);
    if (n != nwant) fail_msg("encode \"%s\": %zu ids, expected %zu", text, n, nwant);
    for (size_t i = 0; i < n; i++)
        if (ids[i] != want[i]) fail_msg("encode \"%s\": id %zu is %d, expected %d", text, i, ids[i], want[i]);
    nz_free(ids);
}
#define EXPECT_IDS(t, s, f, ...)                                                                             \
    do {                                                                                                     \
        const int32_t w_[] = {__VA_ARGS__};                                                                  \
        expect_ids(t, s, sizeof(s) - 1, f, w_, sizeof w_ / sizeof w_[0]);                                    \
    } while (0)

static void test_tok_encode(void **state) {
    (void)state;
    nz_tok *t = make_tok();
    const unsigned EOS = NZ_TOK_ADD_EOS, BOTH = NZ_TOK_ADD_BOS | NZ_TOK_ADD_EOS;
    /* pieces ▁ab ▁ c ▁ b 東 x -> 4 5 6 5 unk unk unk, then eos */
    EXPECT_IDS(t, "  ab  c b\xe6\x9d\xb1x ", EOS, 4, 5, 6, 5, 3, 3, 3, 2);
    EXPECT_IDS(t, "ab", BOTH, 0, 4, 2);
    EXPECT_IDS(t, "ab", 0, 4);
    EXPECT_IDS(t,
               "\xc3\x9f"
               "a",
               EOS, 5, 8, 7, 2);
    EXPECT_IDS(t, "", EOS, 2);
    EXPECT_IDS(t, "   ", BOTH, 0, 2);
    /* a U+2581 character in the input is kept: dummy prefix + "▁▁ab" */
    EXPECT_IDS(t, U2581 U2581 "ab", EOS, 5, 5, 4, 2);
    /* pieces holding whitespace other than ' ' (the identity normaliser
     * keeps tab and NEL; unknown runs are one piece): fairseq joins the
     * pieces with spaces and splits at whitespace, so whitespace-only pieces
     * vanish and "z\tz" gives two words */
    EXPECT_IDS(t, "c\tc", EOS, 5, 6, 6, 2);
    EXPECT_IDS(t, "z\tz", EOS, 5, 3, 3, 2);
    EXPECT_IDS(t, "z" NEL "z" NEL, EOS, 5, 3, 3, 2);
    /* invalid UTF-8: U+FFFD pieces -> unk; no crash */
    EXPECT_IDS(t, "a\xff\xc3", EOS, 5, 7, 3, 2);
    int32_t *ids = NULL;
    size_t n = 0;
    nz_error e = {0};
    /* 10k characters without a space: one id per character */
    size_t big = 10000;
    char *txt = xmalloc(big);
    memset(txt, 'c', big);
    assert_int_equal(nz_tok_encode(t, txt, big, EOS, &ids, &n, &e), NZ_OK);
    assert_int_equal(n, big + 2);
    assert_int_equal(ids[0], 5);
    assert_int_equal(ids[big], 6);
    assert_int_equal(ids[big + 1], 2);
    nz_free(ids);
    free(txt);
    /* bad arguments */
    assert_int_equal(nz_tok_encode(t, NULL, 1, EOS, &ids, &n, &e), NZ_E_INVALID_ARG);
    assert_null(ids);
    assert_int_equal(n, 0);
    assert_int_equal(nz_tok_encode(NULL, "a", 1, EOS, &ids, &n, &e), NZ_E_INVALID_ARG);
    assert_int_equal(nz_tok_encode(t, "a", 1, EOS, NULL, &n, &e), NZ_E_INVALID_ARG);
    assert_non_null(nz_tok_dict(t));
    assert_non_null(nz_tok_spm(t));
    assert_int_equal(nz_dict_size(nz_tok_dict(t)), 12);
    nz_tok_free(t);
}

static void expect_text(const nz_tok *t, nz_detok_mode mode, const int32_t *ids, size_t n, const char *want) {
    char *out = NULL;
    size_t len = 99;
    nz_error e = {0};
    int32_t *buf = n ? (int32_t *)dup_exact(ids, n * sizeof *ids) : NULL;
    int rc = nz_tok_decode(t, buf, n, mode, &out, &len, &e);
    free(buf);
    if (rc) fail_msg("decode: %s", e.msg);
    if (strcmp(out, want)) fail_msg("decode mode %d: \"%s\", expected \"%s\"", (int)mode, out, want);
    assert_int_equal(len, strlen(want));
    nz_free(out);
}
#define EXPECT_TEXT(t, mode, want, ...)                                                                      \
    do {                                                                                                     \
        const int32_t i_[] = {__VA_ARGS__};                                                                  \
        expect_text(t, mode, i_, sizeof i_ / sizeof i_[0], want);                                            \
    } while (0)

static void test_tok_decode(void **state) {
    (void)state;
    nz_tok *t = make_tok();
    const nz_detok_mode FS = NZ_DETOK_FAIRSEQ, SP = NZ_DETOK_SPM;
    /* ▁ab ▁ c ▁ ß a: fairseq joins, U+2581 -> space, strips */
    EXPECT_TEXT(t, FS,
                "ab c \xc3\x9f"
                "a",
                0, 4, 5, 6, 5, 8, 7, 2);
    EXPECT_TEXT(t, SP,
                "ab c \xc3\x9f"
                "a",
                0, 4, 5, 6, 5, 8, 7, 2);
    /* bos / pad / eos skipped anywhere */
    EXPECT_TEXT(t, FS, "abc", 1, 1, 0, 4, 1, 2, 6, 2, 1);
    EXPECT_TEXT(t, SP, "abc", 1, 1, 0, 4, 1, 2, 6, 2, 1);
    /* unk: fairseq prints "<unk>", SentencePiece " ⁇ "; ids past the
     * dictionary are unk for fairseq (Dictionary.__getitem__) */
    EXPECT_TEXT(t, FS, "ab<unk>c<unk><unk>", 4, 3, 6, 12, 2147483647);
    EXPECT_TEXT(t, SP, "ab \xe2\x81\x87 c \xe2\x81\x87  \xe2\x81\x87 ", 4, 3, 6, 12, 2147483647);
    /* leading / trailing / repeated spaces: fairseq strips the ends, keeps inner runs */
    EXPECT_TEXT(t, FS, "c  a", 5, 5, 6, 5, 5, 7, 5, 5);
    EXPECT_TEXT(t, SP, "c  a  ", 5, 5, 6, 5, 5, 7, 5, 5); /* SentencePiece drops leading spaces */
    /* a dictionary symbol SentencePiece does not know is copied by both
     * (byte pieces <0xNN> of byte-fallback models: see test_tokenizer.py) */
    EXPECT_TEXT(t, FS, "a<0x41>", 7, 9);
    EXPECT_TEXT(t, SP, "a<0x41>", 7, 9);
    /* symbols with whitespace: fairseq strips Python whitespace at both ends */
    EXPECT_TEXT(t, FS, "c" NEL "c" NEL "c", 10, 11, 10, 6, 10, 6, 10, 10);
    EXPECT_TEXT(t, SP, NEL IDSP "c" NEL "c" NEL "c" NEL NEL, 10, 11, 10, 6, 10, 6, 10, 10);
    /* nothing */
    EXPECT_TEXT(t, FS, "", 0, 2);
    EXPECT_TEXT(t, SP, "", 1);
    expect_text(t, FS, NULL, 0, "");
    expect_text(t, SP, NULL, 0, "");
    /* a negative id is an error naming its position */
    char *out = (char *)1;
    nz_error e = {0};
    const int32_t neg[] = {4, 5, -7};
    assert_int_equal(nz_tok_decode(t, neg, 3, FS, &out, NULL, &e), NZ_E_RANGE);
    assert_null(out);
    assert_non_null(strstr(e.msg, "id -7 at position 2"));
    assert_int_equal(nz_tok_decode(t, neg, 2, (nz_detok_mode)7, &out, NULL, &e), NZ_E_INVALID_ARG);
    assert_int_equal(nz_tok_decode(t, NULL, 2, FS, &out, NULL, &e), NZ_E_INVALID_ARG);
    assert_int_equal(nz_tok_decode(t, neg, 2, FS, NULL, NULL, &e), NZ_E_INVALID_ARG);
    nz_tok_free(t);
}

static void test_tok_round_trip_random(void **state) {
    (void)state;
    /* random text over the model's characters plus unknown ones: decode
     * (fairseq) of encode gives the text with whitespace runs collapsed and
     * unknown characters as "<unk>" per piece; never crashes */
    nz_tok *t = make_tok();
    static const char *alpha[] = {"a", "b", "c", " ", "  ", "\xc3\x9f", "z", "\xf0\x9f\x98\x80", "\xff"};
    uint64_t seed = 42;
    int rounds = tu_quick() ? 200 : 2000;
    for (int r = 0; r < rounds; r++) {
        char txt[512];
        size_t len = 0;
        int k = (int)(tu_rand(&seed) % 60);
        for (int i = 0; i < k; i++) {
            const char *s = alpha[tu_rand(&seed) % 9];
            memcpy(txt + len, s, strlen(s));
            len += strlen(s);
        }
        int32_t *ids = NULL;
        size_t n = 0;
        nz_error e = {0};
        assert_int_equal(nz_tok_encode(t, txt, len, NZ_TOK_ADD_BOS | NZ_TOK_ADD_EOS, &ids, &n, &e), NZ_OK);
        assert_true(n >= 2 && ids[0] == NZ_TOK_BOS && ids[n - 1] == NZ_TOK_EOS);
        for (size_t i = 1; i + 1 < n; i++) assert_true(ids[i] >= 3 && ids[i] < 10);
        for (int mode = 0; mode < 2; mode++) {
            char *out = NULL;
            assert_int_equal(nz_tok_decode(t, ids, n, (nz_detok_mode)mode, &out, NULL, &e), NZ_OK);
            if (mode == NZ_DETOK_FAIRSEQ) {
                /* no leading/trailing space, no character outside the input's and "<unk>" */
                size_t l = strlen(out);
                assert_true(l == 0 || (out[0] != ' ' && out[l - 1] != ' '));
            }
            nz_free(out);
        }
        nz_free(ids);
    }
    nz_tok_free(t);
}

static void test_tok_from_model(void **state) {
    (void)state;
    /* a .nzp with the two blobs (written to a temporary file) */
    char path[] = "/tmp/nz_test_tok_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    pb *m = make_model();
    nz_writer *w = NULL;
    nz_error e = {0};
    assert_int_equal(nz_writer_create(path, &w, &e), NZ_OK);
    assert_int_equal(nz_writer_add_blob(w, "dict.txt", DICT, sizeof DICT - 1, &e), NZ_OK);
    assert_int_equal(nz_writer_add_blob(w, "spm.model", m->b, m->n, &e), NZ_OK);
    assert_int_equal(nz_writer_finish(w, &e), NZ_OK);
    free(m);
    nz_model *model = NULL;
    assert_int_equal(nz_model_open(path, &model, &e), NZ_OK);
    nz_tok *t = NULL;
    assert_int_equal(nz_tok_from_model(model, &t, &e), NZ_OK);
    nz_model_free(model); /* the tokenizer holds copies */
    EXPECT_IDS(t, "ab c", NZ_TOK_ADD_EOS, 4, 5, 6, 2);
    nz_tok_free(t);
    unlink(path);

    /* without spm.model */
    assert_int_equal(nz_writer_create(path, &w, &e), NZ_OK);
    assert_int_equal(nz_writer_add_blob(w, "dict.txt", DICT, sizeof DICT - 1, &e), NZ_OK);
    assert_int_equal(nz_writer_finish(w, &e), NZ_OK);
    assert_int_equal(nz_model_open(path, &model, &e), NZ_OK);
    t = (nz_tok *)1;
    assert_int_equal(nz_tok_from_model(model, &t, &e), NZ_E_NOT_FOUND);
    assert_null(t);
    assert_non_null(strstr(e.msg, "spm.model"));
    nz_model_free(model);
    unlink(path);
    assert_int_equal(nz_tok_from_model(NULL, &t, &e), NZ_E_INVALID_ARG);
}

static void test_no_leak(void **state) {
    (void)state;
    /* every nz_malloc block of this file's tests was returned */
    assert_int_equal(nz_mem_current(NZ_MEM_OTHER), 0);
}

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dict_plain),
        cmocka_unit_test(test_dict_empty),
        cmocka_unit_test(test_dict_newlines_and_whitespace),
        cmocka_unit_test(test_dict_counts),
        cmocka_unit_test(test_dict_errors_name_the_line),
        cmocka_unit_test(test_dict_overwrite),
        cmocka_unit_test(test_dict_many),
        cmocka_unit_test(test_dict_bad_args),
        cmocka_unit_test(test_spm_shim),
        cmocka_unit_test(test_spm_bad_models),
        cmocka_unit_test(test_tok_encode),
        cmocka_unit_test(test_tok_decode),
        cmocka_unit_test(test_tok_round_trip_random),
        cmocka_unit_test(test_tok_from_model),
        cmocka_unit_test(test_no_leak),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
