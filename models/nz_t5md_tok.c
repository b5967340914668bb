/* nz_t5md_tok.c — the dialogue tokenizer of a multi-decoder T5 (see nz_t5md.h). */
#include "nz_t5md.h"

#include "nz_alloc.h"
#include "nz_spm.h"

#include <string.h>

struct nz_t5md_tok {
    nz_spm *sp;
    int32_t sep; /* separator id, -1: turns joined with a space */
    size_t max_turns, max_src, count;
    size_t max_piece; /* bytes of the longest piece: bounds decoded text */
};

/* ------------------------------------------------------------------ tokenizer */

int nz_t5md_tok_load(const nz_model *m, const nz_t5md_config *c, nz_t5md_tok **out, nz_error *err) {
    *out = NULL;
    const uint8_t *data = NULL;
    size_t size = 0;
    int rc = nz_model_blob(m, "spm.model", &data, &size, err);
    if (rc) return rc == NZ_E_NOT_FOUND ? nz_fail(err, rc, "the model has no embedded spm.model") : rc;
    nz_t5md_tok *tk = nz_calloc(1, sizeof *tk, NZ_MEM_OTHER);
    if (!tk) return nz_fail(err, NZ_E_NOMEM, "out of memory for the tokenizer");
    rc = nz_spm_load(data, size, &tk->sp, err);
    if (rc) {
        nz_fail_prefix(err, "spm.model: ");
        goto done;
    }
    tk->count = nz_spm_piece_count(tk->sp);
    for (size_t i = 0, l = 0; i < tk->count; i++)
        if (nz_spm_id_to_piece(tk->sp, (int32_t)i, &l) && l > tk->max_piece) tk->max_piece = l;
    if (nz_spm_unk_id(tk->sp) != NZ_T5MD_UNK)
        NZ_FAIL(NZ_E_FORMAT, "spm.model: unk id is %d, not a T5-id SentencePiece model (pad 0, eos 1, unk 2)",
                (int)nz_spm_unk_id(tk->sp));
    tk->sep = -1;
    if (c->turn_separator[0]) {
        tk->sep = nz_spm_piece_to_id(tk->sp, c->turn_separator, strlen(c->turn_separator));
        if (tk->sep == NZ_T5MD_UNK)
            NZ_FAIL(NZ_E_FORMAT, "config.json: turn separator \"%s\" is not a piece of spm.model",
                    c->turn_separator);
    }
    tk->max_turns = c->max_context_turns;
    tk->max_src = c->max_source_length;
    *out = tk;
    return NZ_OK;
done:
    nz_t5md_tok_free(tk);
    return rc;
}

void nz_t5md_tok_free(nz_t5md_tok *tk) {
    if (!tk) return;
    nz_spm_free(tk->sp);
    nz_free(tk);
}

/* Python's str.isspace() code points (Unicode White_Space and the ASCII separators 0x1c..0x1f). */
static int py_space(uint32_t cp) {
    return (cp >= 0x09 && cp <= 0x0d) || (cp >= 0x1c && cp <= 0x20) || cp == 0x85 || cp == 0xa0 ||
           cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200a) || cp == 0x2028 || cp == 0x2029 || cp == 0x202f ||
           cp == 0x205f || cp == 0x3000;
}

/* Decode the UTF-8 character at s[0..n): its code point and byte length, or
 * length 0 when the bytes are not a valid character. */
static size_t utf8_char(const unsigned char *s, size_t n, uint32_t *cp) {
    if (!n) return 0;
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    size_t k = (s[0] & 0xe0) == 0xc0 ? 2 : (s[0] & 0xf0) == 0xe0 ? 3 : (s[0] & 0xf8) == 0xf0 ? 4 : 0;
    if (!k || k > n) return 0;
    uint32_t v = s[0] & (0x7f >> k);
    for (size_t i = 1; i < k; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        v = (v << 6) | (s[i] & 0x3f);
    }
    *cp = v;
    return k;
}

/* str.strip(): [*b, *e) of s[0..n) without surrounding whitespace. */
static void py_strip(const char *str, size_t n, size_t *b, size_t *e) {
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0, j = n;
    uint32_t cp = 0;
    for (;;) {
        size_t k = utf8_char(s + i, j - i, &cp);
        if (!k || !py_space(cp)) break;
        i += k;
    }
    while (j > i) {
        size_t st = j - 1;
        while (st > i && j - st < 4 && (s[st] & 0xc0) == 0x80) st--;
        size_t k = utf8_char(s + st, j - st, &cp);
        if (!k || st + k != j || !py_space(cp)) break;
        j = st;
    }
    *b = i;
    *e = j;
}

/* Room for need more ids in the growing array *ids of *cap. */
static int ids_reserve(int32_t **ids, size_t cnt, size_t need, size_t *cap, nz_error *err) {
    if (cnt + need <= *cap) return NZ_OK;
    size_t nc = (cnt + need) * 2;
    int32_t *q = nz_realloc(*ids, nc * sizeof *q);
    if (!q) return nz_fail(err, NZ_E_NOMEM, "out of memory encoding a context");
    *ids = q;
    *cap = nc;
    return NZ_OK;
}

/* Append the SentencePiece ids of text[0..n) to the growing array *ids. */
static int append_encoded(const nz_t5md_tok *tk, const char *text, size_t n, int32_t **ids, size_t *cnt,
                          size_t *cap, nz_error *err) {
    nz_spm_pieces *p = NULL;
    int rc = nz_spm_encode(tk->sp, text, n, &p, err);
    if (!rc) rc = ids_reserve(ids, *cnt, p->n, cap, err);
    if (!rc)
        for (size_t i = 0; i < p->n; i++) (*ids)[(*cnt)++] = p->id[i];
    nz_spm_pieces_free(p);
    return rc;
}

int nz_t5md_encode_context(const nz_t5md_tok *tk, const char *const *turns, const size_t *lens,
                           size_t n_turns, int32_t **ids, size_t *n, nz_error *err) {
    int rc = NZ_OK;
    *ids = NULL;
    *n = 0;
    size_t cap = 16, cnt = 0;
    char *joined = NULL;
    int32_t *out = nz_malloc(cap * sizeof *out, NZ_MEM_OTHER);
    if (!out) return nz_fail(err, NZ_E_NOMEM, "out of memory encoding a context");
    if (n_turns && !turns) NZ_FAIL(NZ_E_INVALID_ARG, "encode context: NULL turns");
    const size_t first = tk->max_turns && n_turns > tk->max_turns ? n_turns - tk->max_turns : 0;
    if (tk->sep < 0) {
        /* " ".join(stripped turns), encoded once */
        size_t total = 1;
        for (size_t i = first; i < n_turns; i++) total += (lens ? lens[i] : strlen(turns[i])) + 1;
        joined = nz_malloc(total, NZ_MEM_OTHER); /* a string, on the HTTP side before any reservation */
        if (!joined) NZ_FAIL(NZ_E_NOMEM, "out of memory encoding a context");
        size_t jl = 0;
        for (size_t i = first; i < n_turns; i++) {
            size_t b, e;
            py_strip(turns[i], lens ? lens[i] : strlen(turns[i]), &b, &e);
            if (i > first) joined[jl++] = ' ';
            memcpy(joined + jl, turns[i] + b, e - b);
            jl += e - b;
        }
        NZ_TRY(append_encoded(tk, joined, jl, &out, &cnt, &cap, err));
    } else {
        for (size_t i = first; i < n_turns; i++) {
            size_t b, e;
            py_strip(turns[i], lens ? lens[i] : strlen(turns[i]), &b, &e);
            if (i > first) {
                NZ_TRY(ids_reserve(&out, cnt, 1, &cap, err));
                out[cnt++] = tk->sep;
            }
            NZ_TRY(append_encoded(tk, turns[i] + b, e - b, &out, &cnt, &cap, err));
        }
    }
    if (tk->max_src && cnt > tk->max_src - 1) {
        const size_t keep = tk->max_src - 1;
        memmove(out, out + (cnt - keep), keep * sizeof *out);
        cnt = keep;
    }
    NZ_TRY(ids_reserve(&out, cnt, 1, &cap, err));
    out[cnt++] = NZ_T5MD_EOS;
    *ids = out;
    *n = cnt;
    out = NULL;
done:
    nz_free(out);
    nz_free(joined);
    return rc;
}

int nz_t5md_decode_text(const nz_t5md_tok *tk, const int32_t *ids, size_t n, char **text, size_t *len,
                        nz_error *err) {
    *text = NULL;
    if (len) *len = 0;
    const char **pieces = nz_malloc(n * sizeof *pieces + 1, NZ_MEM_ACTIVATIONS);
    size_t *plen = nz_malloc(n * sizeof *plen + 1, NZ_MEM_ACTIVATIONS);
    int rc = NZ_OK;
    if (!pieces || !plen) {
        rc = nz_fail(err, NZ_E_NOMEM, "out of memory decoding a response");
    } else {
        size_t k = 0;
        for (size_t i = 0; i < n && ids[i] != NZ_T5MD_EOS; i++) {
            if (ids[i] == NZ_T5MD_PAD || ids[i] == NZ_T5MD_UNK || ids[i] < 0 || (size_t)ids[i] >= tk->count)
                continue;
            pieces[k] = nz_spm_id_to_piece(tk->sp, ids[i], &plen[k]);
            if (pieces[k]) k++;
        }
        /* DecodePieces drops control pieces (<sep>, <mask>, ...) itself */
        rc = nz_spm_decode_pieces(tk->sp, pieces, plen, k, text, len, err);
    }
    nz_free(pieces);
    nz_free(plen);
    return rc;
}

size_t nz_t5md_decode_text_bound(const nz_t5md_tok *tk, size_t n) {
    /* SentencePiece's decoding does not lengthen a piece ("▁" becomes a space, a byte piece one byte);
     * 5 bytes at least: an unknown piece's " ⁇ " */
    return n * (tk->max_piece > 5 ? tk->max_piece : 5);
}
