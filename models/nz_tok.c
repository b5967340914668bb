/*
 * nz_tok.c — fairseq dictionary and tokenizer (see nz_tok.h).
 */
#include "nz_tok.h"

#include "nz_alloc.h"
#include "nz_hash.h"

#include <stdbool.h>
#include <string.h>

/* ------------------------------------------------------------ UTF-8 */

/* Decode one strictly valid UTF-8 character (Python's "utf-8" codec rules: no
 * overlongs, no surrogates, at most U+10FFFF) from s[0..n).
 * @return its byte length with *cp set, or 0 when s does not start with one. */
static size_t utf8_decode(const unsigned char *s, size_t n, uint32_t *cp) {
    if (!n) return 0;
    unsigned c = s[0];
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    size_t len;
    unsigned lo = 0x80, hi = 0xBF; /* range of the second byte */
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        c &= 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
        c &= 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
        c &= 0x07;
    } else {
        return 0;
    }
    if (n < len || s[1] < lo || s[1] > hi) return 0;
    uint32_t v = c;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        v = (v << 6) | (s[i] & 0x3F);
    }
    *cp = v;
    return len;
}

/* Python's str.isspace() (Py_UNICODE_ISSPACE), also what str.split(),
 * str.strip(), re's \s and int() treat as whitespace. */
static bool py_isspace(uint32_t c) {
    if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F);
    switch (c) {
    case 0x85:
    case 0xA0:
    case 0x1680:
    case 0x2028:
    case 0x2029:
    case 0x202F:
    case 0x205F:
    case 0x3000:
        return true;
    default:
        return c >= 0x2000 && c <= 0x200A;
    }
}

/* Length of the Python whitespace character at s[0..n), 0 if there is none
 * (invalid UTF-8 is never whitespace). */
static size_t space_at(const char *s, size_t n) {
    uint32_t cp;
    size_t k = utf8_decode((const unsigned char *)s, n, &cp);
    return k && py_isspace(cp) ? k : 0;
}

/* End of s[0..n) without its trailing Python whitespace. s must be valid UTF-8
 * or end in ASCII: we step back to the start of the last character. */
static size_t rstrip_len(const char *s, size_t n) {
    while (n) {
        size_t b = n - 1;
        while (b > 0 && n - b < 4 && ((unsigned char)s[b] & 0xC0) == 0x80) b--;
        if (space_at(s + b, n - b) != n - b) break;
        n = b;
    }
    return n;
}

/* ------------------------------------------------------------ dictionary */

struct nz_dict {
    char *text;     /* symbol bytes, each NUL-terminated */
    size_t *off;    /* off[id]: start of the symbol in text */
    size_t *slen;   /* slen[id]: its byte length */
    int64_t *count; /* count[id] */
    size_t n, cap;  /* ids, allocated ids */
    int32_t *slot;  /* open-addressing table of ids, -1 = empty */
    size_t nslot;   /* power of two */
    size_t nlive;   /* occupied slots (distinct symbols) */
};

static const char SPECIALS[] = "<s>\0<pad>\0</s>\0<unk>";

static size_t dict_find_slot(const nz_dict *d, const char *sym, size_t len) {
    size_t mask = d->nslot - 1, i = (size_t)nz_hash(sym, len) & mask;
    for (;; i = (i + 1) & mask) {
        int32_t id = d->slot[i];
        if (id < 0) return i;
        if (d->slen[id] == len && (len == 0 || memcmp(d->text + d->off[id], sym, len) == 0)) return i;
    }
}

static int dict_grow_table(nz_dict *d) {
    size_t nslot = d->nslot ? 2 * d->nslot : 64;
    int32_t *old = d->slot;
    size_t oldn = d->nslot;
    d->slot = nz_malloc(nslot * sizeof *d->slot, NZ_MEM_OTHER);
    if (!d->slot) {
        d->slot = old;
        return NZ_E_NOMEM;
    }
    memset(d->slot, 0xFF, nslot * sizeof *d->slot);
    d->nslot = nslot;
    for (size_t i = 0; i < oldn; i++)
        if (old[i] >= 0) {
            int32_t id = old[i];
            d->slot[dict_find_slot(d, d->text + d->off[id], d->slen[id])] = id;
        }
    nz_free(old);
    return NZ_OK;
}

/* Append symbol text[off..off+len) with count; it becomes the answer of
 * symbol->id (fairseq's add_symbol(overwrite=True) for a present symbol). */
static int dict_add(nz_dict *d, size_t off, size_t len, int64_t count) {
    if (d->n >= (size_t)INT32_MAX) return NZ_E_RANGE;
    if (d->n == d->cap) {
        size_t cap = d->cap ? 2 * d->cap : 64;
        size_t *o = nz_realloc(d->off, cap * sizeof *o);
        if (!o) return NZ_E_NOMEM;
        d->off = o;
        size_t *l = nz_realloc(d->slen, cap * sizeof *l);
        if (!l) return NZ_E_NOMEM;
        d->slen = l;
        int64_t *c = nz_realloc(d->count, cap * sizeof *c);
        if (!c) return NZ_E_NOMEM;
        d->count = c;
        d->cap = cap;
    }
    if (2 * (d->nlive + 1) > d->nslot && dict_grow_table(d)) return NZ_E_NOMEM;
    int32_t id = (int32_t)d->n++;
    d->off[id] = off;
    d->slen[id] = len;
    d->count[id] = count;
    size_t s = dict_find_slot(d, d->text + off, len);
    if (d->slot[s] < 0) d->nlive++;
    d->slot[s] = id;
    return NZ_OK;
}

/* Python int(field) for base 10 with ASCII digits: optional surrounding
 * whitespace, optional sign, digits with single '_' between them. Values
 * beyond int64 are clamped. @return true when valid. */
static bool parse_count(const char *s, size_t n, int64_t *out) {
    size_t k;
    while (n && (k = space_at(s, n))) {
        s += k;
        n -= k;
    }
    n = rstrip_len(s, n);
    bool neg = false;
    if (n && (*s == '+' || *s == '-')) {
        neg = *s == '-';
        s++;
        n--;
    }
    if (!n || *s < '0' || *s > '9') return false;
    uint64_t v = 0;
    const uint64_t lim = neg ? (uint64_t)INT64_MAX + 1 : (uint64_t)INT64_MAX;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '_') {
            if (i + 1 >= n || s[i + 1] < '0' || s[i + 1] > '9') return false;
            continue;
        }
        if (c < '0' || c > '9') return false;
        unsigned dg = (unsigned)(c - '0');
        v = v > (lim - dg) / 10 ? lim : v * 10 + dg;
    }
    *out = neg ? (v > (uint64_t)INT64_MAX ? INT64_MIN : -(int64_t)v) : (int64_t)v;
    return true;
}

/* Quote at most 60 bytes of a line for an error message (printable ASCII as
 * is, other bytes as \xNN). */
static void excerpt(const char *s, size_t n, char *out, size_t cap) {
    size_t o = 0;
    for (size_t i = 0; i < n && o + 5 < cap; i++) {
        unsigned char c = (unsigned char)s[i];
        if (i == 60) {
            memcpy(out + o, "...", 3);
            o += 3;
            break;
        }
        if (c >= 0x20 && c < 0x7F && c != '\\')
            out[o++] = (char)c;
        else
            o += (size_t)snprintf(out + o, cap - o, "\\x%02x", c);
    }
    out[o] = '\0';
}

static const char OVERWRITE[] = "#fairseq:overwrite";

/* Parse one line, text[s..e) of d->text (no newline). */
static int dict_line(nz_dict *d, size_t s, size_t e, const char *name, size_t lineno, nz_error *err) {
    char *t = d->text;
    char ex[256];
    uint32_t cp;
    for (size_t i = s; i < e;) {
        size_t k = utf8_decode((const unsigned char *)t + i, e - i, &cp);
        if (!k) {
            excerpt(t + s, e - s, ex, sizeof ex);
            return nz_fail(err, NZ_E_FORMAT, "%s line %zu: invalid UTF-8 at byte %zu: \"%s\"", name, lineno,
                           i - s + 1, ex);
        }
        i += k;
    }
    e = s + rstrip_len(t + s, e - s);
    const size_t e0 = e;
    size_t sp = e;
    while (sp > s && t[sp - 1] != ' ') sp--;
    bool overwrite = false;
    if (sp > s && e - sp == sizeof OVERWRITE - 1 && !memcmp(t + sp, OVERWRITE, sizeof OVERWRITE - 1)) {
        overwrite = true;
        e = sp - 1;
        sp = e;
        while (sp > s && t[sp - 1] != ' ') sp--;
    }
    int64_t count = 0;
    if (sp == s || !parse_count(t + sp, e - sp, &count)) {
        excerpt(t + s, e0 - s, ex, sizeof ex);
        return nz_fail(err, NZ_E_FORMAT,
                       "%s line %zu: expected '<symbol> <count> [#fairseq:overwrite]': \"%s\"", name, lineno,
                       ex);
    }
    size_t wlen = sp - 1 - s;
    size_t slot = dict_find_slot(d, t + s, wlen);
    if (d->slot[slot] >= 0 && !overwrite) {
        excerpt(t + s, wlen, ex, sizeof ex);
        return nz_fail(
            err, NZ_E_FORMAT,
            "%s line %zu: duplicate symbol \"%s\" (already id %d); add the flag #fairseq:overwrite "
            "to the line to redefine it",
            name, lineno, ex, (int)d->slot[slot]);
    }
    t[sp - 1] = '\0'; /* the separating space ends the symbol */
    int rc = dict_add(d, s, wlen, count);
    if (rc == NZ_E_RANGE)
        return nz_fail(err, rc, "%s line %zu: more than %d symbols", name, lineno, INT32_MAX);
    if (rc) return nz_fail(err, rc, "%s: out of memory", name);
    return NZ_OK;
}

int nz_dict_parse(const char *buf, size_t len, const char *name, nz_dict **out, nz_error *err) {
    if (!name) name = "dict.txt";
    if (!out) return nz_fail(err, NZ_E_INVALID_ARG, "%s: NULL output", name);
    *out = NULL;
    if (!buf && len) return nz_fail(err, NZ_E_INVALID_ARG, "%s: NULL buffer", name);
    const size_t nsp = sizeof SPECIALS; /* includes the final NUL */
    if (len > SIZE_MAX - nsp - 1) return nz_fail(err, NZ_E_RANGE, "%s: too large", name);
    nz_dict *d = nz_calloc(1, sizeof *d, NZ_MEM_OTHER);
    if (!d) return nz_fail(err, NZ_E_NOMEM, "%s: out of memory", name);
    d->text = nz_malloc(nsp + len + 1, NZ_MEM_OTHER);
    if (!d->text) {
        nz_free(d);
        return nz_fail(err, NZ_E_NOMEM, "%s: out of memory", name);
    }
    memcpy(d->text, SPECIALS, nsp);
    if (len) memcpy(d->text + nsp, buf, len);
    d->text[nsp + len] = '\0';
    int rc = NZ_OK;
    for (size_t off = 0; off < nsp && rc == NZ_OK; off += strlen(SPECIALS + off) + 1)
        rc = dict_add(d, off, strlen(SPECIALS + off), 1);
    if (rc) rc = nz_fail(err, rc, "%s: out of memory", name);
    /* lines as Python's universal newlines split them: \n, \r\n or \r */
    size_t lineno = 0, s = nsp, end = nsp + len;
    while (rc == NZ_OK && s < end) {
        size_t e = s;
        while (e < end && d->text[e] != '\n' && d->text[e] != '\r') e++;
        size_t next = e;
        if (next < end)
            next += (d->text[next] == '\r' && next + 1 < end && d->text[next + 1] == '\n') ? 2 : 1;
        rc = dict_line(d, s, e, name, ++lineno, err);
        s = next;
    }
    if (rc) {
        nz_dict_free(d);
        return rc;
    }
    *out = d;
    return NZ_OK;
}

void nz_dict_free(nz_dict *d) {
    if (!d) return;
    nz_free(d->text);
    nz_free(d->off);
    nz_free(d->slen);
    nz_free(d->count);
    nz_free(d->slot);
    nz_free(d);
}

size_t nz_dict_size(const nz_dict *d) { return d ? d->n : 0; }

int32_t nz_dict_index(const nz_dict *d, const char *sym, size_t len) {
    if (!d || (!sym && len)) return NZ_TOK_UNK;
    int32_t id = d->slot[dict_find_slot(d, sym ? sym : "", len)];
    return id >= 0 ? id : NZ_TOK_UNK;
}

int nz_dict_contains(const nz_dict *d, const char *sym, size_t len) {
    if (!d || (!sym && len)) return 0;
    return d->slot[dict_find_slot(d, sym ? sym : "", len)] >= 0;
}

const char *nz_dict_symbol(const nz_dict *d, int32_t id, size_t *len) {
    if (len) *len = 0;
    if (!d || id < 0 || (size_t)id >= d->n) return NULL;
    if (len) *len = d->slen[id];
    return d->text + d->off[id];
}

int64_t nz_dict_count(const nz_dict *d, int32_t id) {
    if (!d || id < 0 || (size_t)id >= d->n) return 0;
    return d->count[id];
}

/* ------------------------------------------------------------- tokenizer */

struct nz_tok {
    nz_spm *spm;
    nz_dict *dict;
};

int nz_tok_create(const void *spm_model, size_t spm_size, const char *dict_txt, size_t dict_size,
                  nz_tok **out, nz_error *err) {
    if (!out) return nz_fail(err, NZ_E_INVALID_ARG, "tokenizer: NULL output");
    *out = NULL;
    nz_tok *t = nz_calloc(1, sizeof *t, NZ_MEM_OTHER);
    if (!t) return nz_fail(err, NZ_E_NOMEM, "tokenizer: out of memory");
    int rc = nz_spm_load(spm_model, spm_size, &t->spm, err);
    if (rc) {
        nz_fail_prefix(err, "spm.model");
    } else {
        rc = nz_dict_parse(dict_txt, dict_size, "dict.txt", &t->dict, err);
    }
    if (rc) {
        nz_tok_free(t);
        return rc;
    }
    *out = t;
    return NZ_OK;
}

int nz_tok_from_model(const nz_model *m, nz_tok **out, nz_error *err) {
    if (!out) return nz_fail(err, NZ_E_INVALID_ARG, "tokenizer: NULL output");
    *out = NULL;
    if (!m) return nz_fail(err, NZ_E_INVALID_ARG, "tokenizer: NULL model");
    const uint8_t *spm = NULL, *dict = NULL;
    size_t spm_size = 0, dict_size = 0;
    int rc = nz_model_blob(m, "spm.model", &spm, &spm_size, err);
    if (!rc) rc = nz_model_blob(m, "dict.txt", &dict, &dict_size, err);
    if (rc) return rc;
    return nz_tok_create(spm, spm_size, (const char *)dict, dict_size, out, err);
}

void nz_tok_free(nz_tok *t) {
    if (!t) return;
    nz_spm_free(t->spm);
    nz_dict_free(t->dict);
    nz_free(t);
}

const nz_dict *nz_tok_dict(const nz_tok *t) { return t ? t->dict : NULL; }

const nz_spm *nz_tok_spm(const nz_tok *t) { return t ? t->spm : NULL; }

/* Split s[0..n) at runs of Python whitespace (str.split()) and store each
 * word's dictionary id in ids (just count the words when ids is NULL).
 * @return the number of words. */
static size_t split_words(const nz_dict *d, const char *s, size_t n, int32_t *ids) {
    size_t nw = 0, i = 0;
    while (i < n) {
        size_t k;
        while (i < n && (k = space_at(s + i, n - i))) i += k;
        if (i >= n) break;
        size_t w = i;
        while (i < n && !space_at(s + i, n - i)) i++;
        if (ids) ids[nw] = nz_dict_index(d, s + w, i - w);
        nw++;
    }
    return nw;
}

int nz_tok_encode(const nz_tok *t, const char *text, size_t len, unsigned flags, int32_t **ids, size_t *n,
                  nz_error *err) {
    if (!ids || !n) return nz_fail(err, NZ_E_INVALID_ARG, "tokenizer encode: NULL output");
    *ids = NULL;
    *n = 0;
    if (!t || (!text && len)) return nz_fail(err, NZ_E_INVALID_ARG, "tokenizer encode: NULL argument");
    nz_spm_pieces *p = NULL;
    int rc = nz_spm_encode(t->spm, text, len, &p, err);
    if (rc) return rc;
    /* fairseq: " ".join(pieces), then tokenize_line splits at whitespace.
     * SentencePiece pieces hold no whitespace in practice (it becomes U+2581),
     * but a piece that does is split the same way. */
    size_t nw = 0;
    for (size_t i = 0; i < p->n; i++) nw += split_words(t->dict, p->piece[i], p->len[i], NULL);
    int32_t *out = nz_malloc((nw + 2) * sizeof *out, NZ_MEM_OTHER);
    if (!out) {
        nz_spm_pieces_free(p);
        return nz_fail(err, NZ_E_NOMEM, "tokenizer encode: out of memory");
    }
    size_t k = 0;
    if (flags & NZ_TOK_ADD_BOS) out[k++] = NZ_TOK_BOS;
    for (size_t i = 0; i < p->n; i++) k += split_words(t->dict, p->piece[i], p->len[i], out + k);
    if (flags & NZ_TOK_ADD_EOS) out[k++] = NZ_TOK_EOS;
    nz_spm_pieces_free(p);
    *ids = out;
    *n = k;
    return NZ_OK;
}

static const char UNK_WORD[] = "<unk>";

/* Symbol of an output id: NULL for the skipped specials. */
static const char *out_symbol(const nz_dict *d, int32_t id, size_t *len) {
    if (id == NZ_TOK_BOS || id == NZ_TOK_PAD || id == NZ_TOK_EOS) return NULL;
    const char *s = nz_dict_symbol(d, id, len);
    if (!s) {
        s = UNK_WORD;
        *len = sizeof UNK_WORD - 1;
    }
    return s;
}

static int decode_fairseq(const nz_dict *d, const int32_t *ids, size_t n, char **text, size_t *len,
                          nz_error *err) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l;
        if (out_symbol(d, ids[i], &l)) total += l;
    }
    char *o = nz_malloc(total + 1, NZ_MEM_OTHER);
    if (!o) return nz_fail(err, NZ_E_NOMEM, "tokenizer decode: out of memory");
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        size_t l;
        const char *s = out_symbol(d, ids[i], &l);
        if (!s) continue;
        /* post_process(" ".join(symbols), "sentencepiece"):
         * .replace(" ", "").replace("\u2581", " ").strip() */
        for (size_t j = 0; j < l; j++) {
            if (s[j] == ' ') continue;
            if (j + 2 < l && !memcmp(s + j, "\xE2\x96\x81", 3)) {
                o[k++] = ' ';
                j += 2;
                continue;
            }
            o[k++] = s[j];
        }
    }
    size_t a = 0, w;
    while (a < k && (w = space_at(o + a, k - a))) a += w;
    size_t b = a + rstrip_len(o + a, k - a);
    if (a) memmove(o, o + a, b - a);
    o[b - a] = '\0';
    *text = o;
    if (len) *len = b - a;
    return NZ_OK;
}

int nz_tok_decode(const nz_tok *t, const int32_t *ids, size_t n, nz_detok_mode mode, char **text, size_t *len,
                  nz_error *err) {
    if (!text) return nz_fail(err, NZ_E_INVALID_ARG, "tokenizer decode: NULL output");
    *text = NULL;
    if (len) *len = 0;
    if (!t || (!ids && n)) return nz_fail(err, NZ_E_INVALID_ARG, "tokenizer decode: NULL argument");
    if (mode != NZ_DETOK_FAIRSEQ && mode != NZ_DETOK_SPM)
        return nz_fail(err, NZ_E_INVALID_ARG, "tokenizer decode: unknown mode %d", (int)mode);
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0) return nz_fail(err, NZ_E_RANGE, "tokenizer decode: id %d at position %zu", ids[i], i);
    if (mode == NZ_DETOK_FAIRSEQ) return decode_fairseq(t->dict, ids, n, text, len, err);
    const char **pieces = nz_malloc((n ? n : 1) * sizeof *pieces, NZ_MEM_OTHER);
    size_t *lens = nz_malloc((n ? n : 1) * sizeof *lens, NZ_MEM_OTHER);
    int rc = NZ_OK;
    if (!pieces || !lens) {
        rc = nz_fail(err, NZ_E_NOMEM, "tokenizer decode: out of memory");
    } else {
        size_t m = 0;
        for (size_t i = 0; i < n; i++)
            if ((pieces[m] = out_symbol(t->dict, ids[i], &lens[m]))) m++;
        rc = nz_spm_decode_pieces(t->spm, pieces, lens, m, text, len, err);
    }
    nz_free(pieces);
    nz_free(lens);
    return rc;
}
