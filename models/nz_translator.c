/* nz_translator — see nz_translator.h. */
#include "nz_translator.h"
#include "nz_task.h"

#include "nz_alloc.h"
#include "nz_container.h"
#include "nz_mconfig.h"

#include <math.h>
#include <string.h>

struct nz_translator {
    nz_model *model;     /* the mapped .nzp */
    nz_nat *nat;         /* network, borrows model */
    nz_tok *tok;         /* tokenizer from the embedded spm.model + dict.txt */
    nz_tr_opts defaults; /* nz_tr_opts_default + config "generation" */
    size_t max_sym; /* bytes of the longest dictionary symbol ("<unk>" at least): bounds detokenized text */
};

void nz_tr_opts_default(nz_tr_opts *o) {
    memset(o, 0, sizeof *o);
    o->decoder = NZ_TR_NAT;
    nz_nat_opts_default(&o->nat);
    o->nat.length_beam = 5;
    nz_nat_at_opts_default(&o->at);
    o->at_beam = 1;
    o->lenpen = 1.0f;
}

void nz_tr_opts_set_stop(nz_tr_opts *o, int (*stop)(void *arg), void *arg) {
    o->nat.stop = o->at.stop = stop;
    o->nat.stop_arg = o->at.stop_arg = arg;
}

void nz_tr_choice_init(nz_tr_choice *c) {
    c->decoder = c->iterations = c->length_beam = c->rerank = c->adaptive = c->beam_size = c->max_length = -1;
    c->lenpen = NAN;
}

int nz_tr_choice_from_json(const json_t *obj, const char *what, nz_tr_choice *c, nz_error *err) {
    static const char *const known[] = {"decoder",  "iterations", "length_beam", "rerank",
                                        "adaptive", "beam_size",  "lenpen",      "max_length"};
    static const char *const decoders[] = {"nat", "at"}, *const reranks[] = {"none", "at"};
    nz_tr_choice_init(c);
    if (!obj) return NZ_OK;
    if (!json_is_object(obj)) return nz_fail(err, NZ_E_FORMAT, "%s must be an object", what);
    int rc = nz_gen_keys(obj, what, known, sizeof known / sizeof *known, err);
    if (!rc) rc = nz_gen_enum(obj, what, "decoder", decoders, 2, &c->decoder, err);
    if (!rc) rc = nz_gen_int(obj, what, "iterations", 0, 1000, &c->iterations, err);
    if (!rc) rc = nz_gen_int(obj, what, "length_beam", 1, 100, &c->length_beam, err);
    if (!rc) rc = nz_gen_enum(obj, what, "rerank", reranks, 2, &c->rerank, err);
    if (!rc) rc = nz_gen_int(obj, what, "beam_size", 1, 100, &c->beam_size, err);
    if (!rc) rc = nz_gen_int(obj, what, "max_length", 1, 65535, &c->max_length, err);
    if (!rc) rc = nz_gen_bool(obj, what, "adaptive", &c->adaptive, err);
    if (!rc) rc = nz_gen_number(obj, what, "lenpen", -100, 0, 100, &c->lenpen, err);
    return rc;
}

int nz_tr_choice_apply(const nz_tr_choice *c, nz_tr_opts *o, nz_error *err) {
    if (c->iterations > 1000000 || c->length_beam == 0 || c->length_beam > 4096 || c->beam_size == 0 ||
        c->beam_size > 4096 || c->max_length == 0 || c->max_length > 65535 || c->decoder > 1 ||
        c->rerank > 1 || c->adaptive > 1 || isinf(c->lenpen))
        return nz_fail(err, NZ_E_INVALID_ARG,
                       "translate options out of range: iterations %d, length_beam %d, beam_size %d, "
                       "max_length %d, lenpen %g",
                       c->iterations, c->length_beam, c->beam_size, c->max_length, (double)c->lenpen);
    int at = c->decoder >= 0 ? c->decoder : o->decoder != NZ_TR_NAT;
    if (c->iterations >= 0) o->nat.max_iter = c->iterations;
    if (c->length_beam > 0) o->nat.length_beam = c->length_beam;
    if (c->rerank >= 0) o->nat.rerank_at = c->rerank;
    if (c->adaptive >= 0) o->nat.adaptive = c->adaptive;
    if (c->beam_size > 0) o->at_beam = c->beam_size;
    if (!isnan(c->lenpen)) o->lenpen = c->lenpen;
    if (c->max_length > 0) {
        o->nat.max_len = c->max_length + 2; /* + bos, eos */
        o->at.max_len_a = 0;
        o->at.max_len_b = c->max_length;
    }
    o->decoder = !at ? NZ_TR_NAT : o->at_beam > 1 ? NZ_TR_AT_BEAM : NZ_TR_AT_GREEDY;
    return NZ_OK;
}

int nz_tr_opts_same(const nz_tr_opts *a, const nz_tr_opts *b) {
    const nz_nat_opts *x = &a->nat, *y = &b->nat;
    int at = a->decoder != NZ_TR_NAT;
    if (a->decoder != b->decoder || x->max_len != y->max_len || a->at.max_len_a != b->at.max_len_a ||
        a->at.max_len_b != b->at.max_len_b || a->at.min_len != b->at.min_len)
        return 0;
    if (at) return a->decoder == NZ_TR_AT_GREEDY || (a->at_beam == b->at_beam && a->lenpen == b->lenpen);
    return x->max_iter == y->max_iter && x->length_beam == y->length_beam && x->adaptive == y->adaptive &&
           x->rerank_at == y->rerank_at && a->return_candidates == b->return_candidates;
}

json_t *nz_tr_opts_to_json(const nz_tr_opts *o) {
    int at = o->decoder != NZ_TR_NAT;
    json_t *j = json_pack("{s:s, s:i, s:i, s:s, s:b, s:i, s:o}", "decoder", at ? "at" : "nat", "iterations",
                          o->nat.max_iter, "length_beam", o->nat.length_beam, "rerank",
                          o->nat.rerank_at ? "at" : "none", "adaptive", o->nat.adaptive, "beam_size",
                          o->at_beam, "lenpen", nz_gen_real(o->lenpen));
    if (j && o->nat.max_len > 2) json_object_set_new(j, "max_length", json_integer(o->nat.max_len - 2));
    return j;
}

/* The model's defaults: nz_tr_opts_default + its config's "generation". @return NZ_OK or an error. */
static int read_defaults(nz_translator *t, const char *path, nz_error *err) {
    nz_tr_opts_default(&t->defaults);
    const json_t *cfg = nz_model_config(t->model);
    nz_tr_choice c;
    int rc =
        nz_tr_choice_from_json(cfg ? nz_cfg_get(cfg, "generation") : NULL, "config.json generation", &c, err);
    if (!rc) rc = nz_tr_choice_apply(&c, &t->defaults, err);
    if (!rc && (t->defaults.decoder != NZ_TR_NAT || t->defaults.nat.rerank_at) &&
        !nz_nat_get_config(t->nat)->at_layers)
        rc =
            nz_fail(err, NZ_E_FORMAT, "config.json generation: %s needs an AT decoder and the model has none",
                    t->defaults.decoder != NZ_TR_NAT ? "decoder \"at\"" : "rerank \"at\"");
    if (rc) {
        char m[sizeof err->msg];
        snprintf(m, sizeof m, "%s", err->msg);
        nz_fail(err, rc, "%s: %s", path, m);
    }
    return rc;
}

void nz_tr_results_free(nz_tr_result *r, size_t n) {
    for (size_t i = 0; r && i < n; i++) {
        nz_free(r[i].text);
        nz_free(r[i].tokens);
        for (size_t j = 0; r[i].cands && j < r[i].n_cands; j++) nz_free(r[i].cands[j].text);
        nz_free(r[i].cands);
        memset(&r[i], 0, sizeof r[i]);
    }
}

int nz_translator_open(const char *path, nz_translator **out, nz_error *err) {
    *out = NULL;
    nz_translator *t = nz_calloc(1, sizeof *t, NZ_MEM_OTHER);
    if (!t) return nz_fail(err, NZ_E_NOMEM, "%s: out of memory", path);
    int rc = nz_model_open(path, &t->model, err);
    if (!rc) rc = nz_nat_load(t->model, &t->nat, err);
    if (!rc) rc = nz_tok_from_model(t->model, &t->tok, err);
    if (!rc && nz_dict_size(nz_tok_dict(t->tok)) != nz_nat_get_config(t->nat)->vocab)
        rc = nz_fail(err, NZ_E_FORMAT, "%s: dict.txt has %zu symbols but the embeddings have %zu rows", path,
                     nz_dict_size(nz_tok_dict(t->tok)), nz_nat_get_config(t->nat)->vocab);
    if (!rc) rc = read_defaults(t, path, err);
    if (!rc) {
        const nz_dict *d = nz_tok_dict(t->tok);
        t->max_sym = 5; /* "<unk>", printed for ids beyond the dictionary */
        for (size_t i = 0, l = 0; i < nz_dict_size(d); i++)
            if (nz_dict_symbol(d, (int32_t)i, &l) && l > t->max_sym) t->max_sym = l;
    }
    if (rc) {
        nz_translator_free(t);
        return rc;
    }
    *out = t;
    return NZ_OK;
}

void nz_translator_free(nz_translator *t) {
    if (!t) return;
    nz_tok_free(t->tok);
    nz_nat_free(t->nat);
    nz_model_free(t->model);
    nz_free(t);
}

const nz_tr_opts *nz_translator_defaults(const nz_translator *t) { return &t->defaults; }
const nz_model *nz_translator_model(const nz_translator *t) { return t->model; }
const nz_nat *nz_translator_nat(const nz_translator *t) { return t->nat; }

int nz_translator_encode(const nz_translator *t, const char *text, size_t len, int32_t **ids, size_t *n,
                         nz_error *err) {
    return nz_tok_encode(t->tok, text, len, NZ_TOK_ADD_BOS | NZ_TOK_ADD_EOS, ids, n, err);
}

/* The length candidates of h into r->cands (detokenized when detok). */
static void take_cands(const nz_translator *t, const nz_nat_hyp *h, int detok, nz_tr_result *r) {
    r->cands = nz_calloc(h->n_cands, sizeof *r->cands, NZ_MEM_OTHER);
    if (!r->cands) {
        r->rc = NZ_E_NOMEM;
        nz_fail(&r->err, NZ_E_NOMEM, "out of memory for the length candidates");
        return;
    }
    r->n_cands = h->n_cands;
    for (size_t j = 0; j < h->n_cands; j++) {
        const nz_nat_cand *c = &h->cands[j];
        nz_tr_cand *o = &r->cands[j];
        o->score = c->score;
        o->nat_score = c->nat_score;
        o->length = c->length;
        o->chosen = j == h->candidate;
        nz_error e = {0};
        if (detok && nz_tok_decode(t->tok, c->tokens, c->n, NZ_DETOK_FAIRSEQ, &o->text, &o->text_len, &e)) {
            r->rc = e.code;
            nz_fail(&r->err, e.code, "detokenizing candidate %zu: %s", j, e.msg);
            return;
        }
    }
}

/* Move hyp h into result r (tokens, score, text). */
static void take_hyp(const nz_translator *t, nz_nat_hyp *h, int detok, nz_tr_result *r) {
    if (h->rc) {
        r->rc = h->rc;
        r->err = h->err;
        return;
    }
    r->tokens = h->tokens;
    r->n_tokens = h->n;
    h->tokens = NULL;
    h->n = 0;
    r->score = h->score;
    for (size_t i = 0; i < r->n_tokens; i++) {
        int32_t id = r->tokens[i];
        r->output_tokens += id != NZ_NAT_BOS && id != NZ_NAT_EOS && id != NZ_NAT_PAD;
    }
    if (detok) {
        nz_error e = {0};
        if (nz_tok_decode(t->tok, r->tokens, r->n_tokens, NZ_DETOK_FAIRSEQ, &r->text, &r->text_len, &e)) {
            r->rc = e.code;
            nz_fail(&r->err, e.code, "detokenizing: %s", e.msg);
        }
    }
    if (!r->rc && h->cands) take_cands(t, h, detok, r);
}

/* A batch-wide failure rc (message in err) becomes the result of every text that has no error of its own. */
static void fail_all(nz_tr_result *res, size_t n, int rc, const nz_error *err) {
    for (size_t i = 0; i < n; i++)
        if (!res[i].rc) {
            res[i].rc = rc;
            res[i].err = err ? *err : (nz_error){rc, "batch failed"};
        }
}

/* Decode the texts whose ids[i] is set (a NULL entry's result already holds its error) as one batch. ids are
 * read only while the source matrix is built, before the decoder's first stop check. */
static int run_batch(nz_matmul_ctx *mc, const nz_translator *t, const int32_t *const *ids, const size_t *len,
                     size_t n, const nz_tr_opts *o, int detok, nz_tr_result *res, nz_error *err) {
    size_t *live = nz_calloc(n, sizeof *live, NZ_MEM_OTHER); /* res index of each decoded row */
    nz_nat_hyp *hyps = nz_calloc(n, sizeof *hyps, NZ_MEM_OTHER);
    int32_t *src = NULL;
    int rc = NZ_OK;
    size_t B = 0, S = 2;
    if (!live || !hyps) {
        rc = nz_fail(err, NZ_E_NOMEM, "translate: out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        if (!ids[i]) continue;
        res[i].input_tokens = len[i];
        if (len[i] > S) S = len[i];
        live[B++] = i;
    }
    if (!B) goto done;
    src = nz_malloc(B * S * sizeof *src, NZ_MEM_ACTIVATIONS);
    if (!src) {
        rc = nz_fail(err, NZ_E_NOMEM, "translate: out of memory");
        goto done;
    }
    for (size_t b = 0; b < B; b++)
        for (size_t j = 0; j < S; j++) src[b * S + j] = j < len[live[b]] ? ids[live[b]][j] : NZ_NAT_PAD;
    switch (o->decoder) {
    case NZ_TR_NAT: {
        nz_nat_opts no = o->nat;
        no.keep_candidates = o->return_candidates;
        rc = nz_nat_mask_predict(mc, t->nat, src, B, S, &no, hyps, err);
        break;
    }
    case NZ_TR_AT_GREEDY:
        rc = nz_nat_at_greedy(mc, t->nat, src, B, S, &o->at, hyps, err);
        break;
    case NZ_TR_AT_BEAM:
        rc = nz_nat_at_beam(mc, t->nat, src, B, S, &o->at, o->at_beam, o->lenpen, hyps, err);
        break;
    default:
        rc = nz_fail(err, NZ_E_INVALID_ARG, "translate: unknown decoder %d", (int)o->decoder);
    }
    for (size_t b = 0; b < B; b++) {
        if (rc && !hyps[b].rc) { /* a batch-wide failure is every text's */
            hyps[b].rc = rc;
            hyps[b].err = err ? *err : (nz_error){rc, "batch failed"};
        }
        take_hyp(t, &hyps[b], detok, &res[live[b]]);
    }
done:
    if (rc) fail_all(res, n, rc, err);
    if (hyps) nz_nat_hyps_free(hyps, B);
    nz_free(live);
    nz_free(hyps);
    nz_free(src);
    return rc;
}

int nz_translator_run_ids(nz_matmul_ctx *mc, const nz_translator *t, const int32_t *const *ids,
                          const size_t *lens, size_t n, const nz_tr_opts *o, int detok, nz_tr_result *res,
                          nz_error *err) {
    memset(res, 0, n * sizeof *res);
    if (!n) return NZ_OK;
    for (size_t i = 0; i < n; i++)
        if (!ids[i] || lens[i] < 2) {
            int rc =
                nz_fail(err, NZ_E_INVALID_ARG, "translate: source %zu has %zu ids (at least bos and eos)", i,
                        ids[i] ? lens[i] : 0);
            fail_all(res, n, rc, err);
            return rc;
        }
    return run_batch(mc, t, ids, lens, n, o, detok, res, err);
}

uint64_t nz_translator_peak_bytes(const nz_translator *t, const size_t *lens, size_t n, const nz_tr_opts *o) {
    if (!n) return 0;
    if (!o) o = &t->defaults;
    const nz_nat_config *c = nz_nat_get_config(t->nat);
    size_t S = 2; /* run_batch's source width */
    for (size_t i = 0; i < n; i++)
        if (lens[i] > S) S = lens[i];
    /* run_batch: live and hyps (NZ_MEM_OTHER), src (n x S int32) */
    const uint64_t batch = n * sizeof(size_t) + n * sizeof(nz_nat_hyp) + (uint64_t)n * S * sizeof(int32_t);
    uint64_t dec = 0;
    switch (o->decoder) {
    case NZ_TR_NAT:
        dec = nz_nat_mask_predict_peak_bytes(t->nat, lens, n, S, &o->nat);
        break;
    case NZ_TR_AT_GREEDY:
        dec = nz_nat_at_greedy_peak_bytes(t->nat, n, S, &o->at);
        break;
    case NZ_TR_AT_BEAM:
        dec = nz_nat_at_beam_peak_bytes(t->nat, n, S, &o->at, o->at_beam);
        break;
    default:
        return batch;
    }
    /* after decoding, take_hyp: every result's tokens (at most max_target_positions: the mask-predict
     * candidates' and the AT searches' bound, + 1 byte each) and its detokenized text (nz_tok_decode's
     * NZ_DETOK_FAIRSEQ: at most the symbols' bytes + 1) */
    const uint64_t out = c->max_target_positions;
    uint64_t detok = n * (out * sizeof(int32_t) + 1) + n * (out * t->max_sym + 1);
    if (o->decoder == NZ_TR_NAT &&
        o->return_candidates) { /* every candidate's tokens and text, held at once */
        const uint64_t cb = (uint64_t)(o->nat.length_beam > 0 ? o->nat.length_beam : 1);
        const uint64_t cands =
            n * cb *
            (sizeof(nz_nat_cand) + sizeof(nz_tr_cand) + out * sizeof(int32_t) + 1 + out * t->max_sym + 1);
        dec += cands;
        detok += cands;
    }
    return batch + (dec > detok ? dec : detok);
}

int nz_translator_run(nz_matmul_ctx *mc, const nz_translator *t, const char *const *texts, const size_t *lens,
                      size_t n, const nz_tr_opts *o, int detok, nz_tr_result *res, nz_error *err) {
    memset(res, 0, n * sizeof *res);
    if (!n) return NZ_OK;
    int32_t **ids = nz_calloc(n, sizeof *ids, NZ_MEM_OTHER);
    size_t *len = nz_calloc(n, sizeof *len, NZ_MEM_OTHER);
    int rc = NZ_OK;
    if (!ids || !len) {
        rc = nz_fail(err, NZ_E_NOMEM, "translate: out of memory");
        fail_all(res, n, rc, err);
    } else {
        /* tokenize; a text that fails keeps its error and stays out of the batch */
        for (size_t i = 0; i < n; i++) {
            nz_error e = {0};
            if (nz_translator_encode(t, texts[i], lens ? lens[i] : strlen(texts[i]), &ids[i], &len[i], &e)) {
                ids[i] = NULL;
                res[i].rc = e.code;
                nz_fail(&res[i].err, e.code, "tokenizing: %s", e.msg);
            }
        }
        rc = run_batch(mc, t, (const int32_t *const *)ids, len, n, o, detok, res, err);
    }
    for (size_t i = 0; ids && i < n; i++) nz_free(ids[i]);
    nz_free(ids);
    nz_free(len);
    return rc;
}

/* ------------------------------------------------------------------ continuous batching */

/* One text of a batched request: the nz_nat_cb / nz_nat_mpb owner of its sentence. */
typedef struct tr_text {
    struct tr_member *m;
    size_t i; /* its index in the request */
} tr_text;

/* One request of a nz_tr_batch. */
typedef struct tr_member {
    void *owner;
    size_t n, pending; /* texts, texts still decoding */
    int detok;
    nz_tr_opts o;      /* its options (stop hooks unused) */
    size_t *lens;      /* [n] its texts' ids */
    tr_text *texts;    /* [n] */
    nz_tr_result *res; /* [n] */
    struct tr_member *next;
} tr_member;

struct nz_tr_batch {
    const nz_translator *t;
    nz_nat_cb *cb;      /* AT greedy and beam texts (NULL: the model has no AT decoder) */
    nz_nat_mpb *mpb;    /* mask-predict texts */
    tr_member *members; /* newest first */
    size_t size;
};

int nz_tr_batch_joins(const nz_tr_opts *o) {
    return o->decoder == NZ_TR_NAT || o->decoder == NZ_TR_AT_GREEDY || o->decoder == NZ_TR_AT_BEAM;
}

int nz_tr_batch_create(const nz_translator *t, nz_tr_batch **out, nz_error *err) {
    *out = NULL;
    nz_tr_batch *b = nz_calloc(1, sizeof *b, NZ_MEM_OTHER);
    if (!b) return nz_fail(err, NZ_E_NOMEM, "translate: out of memory");
    b->t = t;
    int rc = nz_nat_mpb_create(t->nat, &b->mpb, err);
    if (!rc && nz_nat_get_config(t->nat)->at_layers) rc = nz_nat_cb_create(t->nat, &b->cb, err);
    if (rc) {
        nz_tr_batch_free(b);
        return rc;
    }
    *out = b;
    return NZ_OK;
}

static void member_free(tr_member *m) {
    if (!m) return;
    nz_tr_results_free(m->res, m->n);
    nz_free(m->res);
    nz_free(m->texts);
    nz_free(m->lens);
    nz_free(m);
}

void nz_tr_batch_free(nz_tr_batch *b) {
    if (!b) return;
    nz_nat_cb_free(b->cb);
    nz_nat_mpb_free(b->mpb);
    for (tr_member *m = b->members, *nx; m; m = nx) {
        nx = m->next;
        member_free(m);
    }
    nz_free(b);
}

size_t nz_tr_batch_size(const nz_tr_batch *b) { return b->size; }

void nz_tr_batch_remove(nz_tr_batch *b, void *owner) {
    for (tr_member **p = &b->members; *p; p = &(*p)->next) {
        tr_member *m = *p;
        if (m->owner != owner) continue;
        for (size_t i = 0; i < m->n; i++) {
            if (b->cb) nz_nat_cb_remove(b->cb, &m->texts[i]);
            nz_nat_mpb_remove(b->mpb, &m->texts[i]);
        }
        *p = m->next;
        b->size--;
        member_free(m);
        return;
    }
}

/* Add one text to the decoder batch of its options o (the AT ones need an AT decoder, as alone).
 * @return as nz_nat_cb_add / nz_nat_mpb_add. */
static int add_text(nz_tr_batch *b, const int32_t *ids, size_t len, const nz_tr_opts *o, void *owner,
                    nz_error *e) {
    if (o->decoder == NZ_TR_NAT) {
        nz_nat_opts no = o->nat;
        no.keep_candidates = o->return_candidates;
        return nz_nat_mpb_add(b->mpb, ids, len, &no, owner, e);
    }
    if (!b->cb)
        return nz_fail(e, NZ_E_UNSUPPORTED,
                       "AT decoding needs an AT decoder (config.json has no at_decoder_layers)");
    if (o->decoder == NZ_TR_AT_BEAM)
        return nz_nat_cb_add_beam(b->cb, ids, len, &o->at, o->at_beam, o->lenpen, owner, e);
    return nz_nat_cb_add(b->cb, ids, len, &o->at, owner, e);
}

int nz_tr_batch_add(nz_tr_batch *b, const int32_t *const *ids, const size_t *lens, size_t n,
                    const nz_tr_opts *o, int detok, void *owner, nz_error *err) {
    if (!nz_tr_batch_joins(o))
        return nz_fail(err, NZ_E_UNSUPPORTED, "translate: unknown decoder %d", (int)o->decoder);
    if (!n) return nz_fail(err, NZ_E_INVALID_ARG, "translate: no text");
    for (size_t i = 0; i < n; i++)
        if (!ids[i] || lens[i] < 2)
            return nz_fail(err, NZ_E_INVALID_ARG, "translate: source %zu has %zu ids (at least bos and eos)",
                           i, ids[i] ? lens[i] : 0);
    tr_member *m = nz_calloc(1, sizeof *m, NZ_MEM_OTHER);
    if (m) {
        m->texts = nz_calloc(n, sizeof *m->texts, NZ_MEM_OTHER);
        m->res = nz_calloc(n, sizeof *m->res, NZ_MEM_OTHER);
        m->lens = nz_malloc(n * sizeof *m->lens, NZ_MEM_OTHER);
    }
    if (!m || !m->texts || !m->res || !m->lens) {
        member_free(m);
        return nz_fail(err, NZ_E_NOMEM, "translate: out of memory");
    }
    m->owner = owner;
    m->n = n;
    m->detok = detok;
    m->o = *o;
    nz_tr_opts_set_stop(&m->o, NULL, NULL);
    m->o.nat.on_width = NULL;
    memcpy(m->lens, lens, n * sizeof *lens);
    m->next = b->members;
    b->members = m;
    b->size++;
    for (size_t i = 0; i < n; i++) {
        m->texts[i] = (tr_text){m, i};
        m->res[i].input_tokens = lens[i];
        nz_error e = {0};
        int rc = add_text(b, ids[i], lens[i], &m->o, &m->texts[i], &e);
        if (rc == NZ_E_NOMEM) {
            *err = e;
            nz_tr_batch_remove(b, owner);
            return rc;
        }
        if (rc) { /* this text's own error, as a batch of one would give it */
            m->res[i].rc = rc;
            m->res[i].err = e;
        } else {
            m->pending++;
        }
    }
    return NZ_OK;
}

/* A text's result h (taken from a decoder batch) into its request. */
static void text_done(const nz_translator *t, tr_text *x, nz_nat_hyp *h) {
    take_hyp(t, h, x->m->detok, &x->m->res[x->i]);
    nz_nat_hyps_free(h, 1);
    x->m->pending--;
}

int nz_tr_batch_step(nz_matmul_ctx *mc, nz_tr_batch *b, nz_error *err) {
    nz_error e2 = {0};
    int rc = b->cb && nz_nat_cb_size(b->cb) ? nz_nat_cb_step(mc, b->cb, err) : NZ_OK;
    int rc2 = nz_nat_mpb_size(b->mpb) ? nz_nat_mpb_step(mc, b->mpb, &e2) : NZ_OK;
    if (!rc && rc2) {
        rc = rc2;
        if (err) *err = e2;
    }
    void *owner;
    nz_nat_hyp h;
    while (b->cb && nz_nat_cb_take(b->cb, &owner, &h)) text_done(b->t, owner, &h); /* a failed step's */
    while (nz_nat_mpb_take(b->mpb, &owner, &h)) text_done(b->t, owner, &h);        /* come with its error */
    return rc;
}

/* The bytes result r holds (tokens, text, candidates). */
static uint64_t result_bytes(const nz_tr_result *r) {
    uint64_t k = r->n_tokens * sizeof(int32_t) + 1 + (r->text ? r->text_len + 1 : 0);
    for (size_t j = 0; j < r->n_cands; j++)
        k += sizeof(nz_tr_cand) + (r->cands[j].text ? r->cands[j].text_len + 1 : 0);
    return k;
}

uint64_t nz_tr_batch_member_bytes(const nz_tr_batch *b, const void *owner) {
    const tr_member *m = b->members;
    while (m && m->owner != owner) m = m->next;
    if (!m) return 0;
    const nz_nat_config *c = nz_nat_get_config(b->t->nat);
    uint64_t k = 0;
    if (m->o.decoder != NZ_TR_NAT) {
        /* the AT texts: the request's estimate while one decodes (nz_nat_cb keeps no per-text account) */
        if (m->pending) return nz_translator_peak_bytes(b->t, m->lens, m->n, &m->o);
    }
    for (size_t i = 0; i < m->n; i++) {
        const nz_tr_result *r = &m->res[i];
        if (m->o.decoder != NZ_TR_NAT || r->rc || r->tokens) { /* a result: what it holds */
            k += result_bytes(r);
            continue;
        }
        /* decoding: its share of the batch, then its result and text (as nz_translator_peak_bytes) */
        const uint64_t out = c->max_target_positions;
        uint64_t cand = m->o.return_candidates
                            ? (uint64_t)m->o.nat.length_beam * (sizeof(nz_tr_cand) + out * b->t->max_sym + 1)
                            : 0;
        k += nz_nat_mpb_member_bytes(b->mpb, &m->texts[i]) + out * sizeof(int32_t) + 1 + out * b->t->max_sym +
             1 + cand;
    }
    return k + m->n * (sizeof(tr_text) + sizeof(nz_tr_result) + sizeof(size_t));
}

/* What result r holds once taken (take_hyp): its tokens (+ 1), its text (decode_fairseq allocates every
 * symbol's bytes + 1 before it drops their spaces: at most max_sym a token, more than text_len), and its
 * candidates (nz_tr_cand, each one's text: at most its length's symbols + 1). */
static double result_held(const nz_translator *t, const nz_tr_result *r) {
    const double sym = (double)t->max_sym;
    double k = 4 * (double)r->n_tokens + 1 + (r->text ? sym * (double)r->n_tokens + 1 : 0);
    for (size_t j = 0; j < r->n_cands; j++)
        k += sizeof(nz_tr_cand) + (r->cands[j].text ? sym * (double)r->cands[j].length + 1 : 0);
    return k;
}

/* A request of n texts: nz_tr_batch_add's tr_member, texts, res and lens. */
static double member_held(size_t n) {
    return sizeof(tr_member) + (double)n * (sizeof(tr_text) + sizeof(nz_tr_result) + sizeof(size_t));
}

/* What a text decoding with o adds when it is taken beyond what its decoder batch counts (its result's
 * tokens and texts): take_cands' array. */
static double text_held(const nz_tr_opts *o) {
    return o->decoder == NZ_TR_NAT && o->return_candidates ? (double)o->nat.length_beam * sizeof(nz_tr_cand)
                                                           : 0;
}

uint64_t nz_tr_batch_bound(const nz_translator *t, const nz_tr_batch *b, const size_t *lens, size_t n,
                           const nz_tr_opts *o) {
    if (b) t = b->t;
    const nz_nat *nat = t->nat;
    if (n && !o) o = &t->defaults;
    int join = n && nz_tr_batch_joins(o); /* as nz_tr_batch_add checks the request */
    for (size_t i = 0; join && i < n; i++) join = lens[i] >= 2;
    double held = sizeof(nz_tr_batch);
    for (const tr_member *m = b ? b->members : NULL; m; m = m->next) {
        held += member_held(m->n);
        for (size_t i = 0; i < m->n; i++) { /* a result: what it holds (its decoder batch forgot it) */
            const nz_tr_result *r = &m->res[i];
            held += r->rc || r->tokens ? result_held(t, r) : text_held(&m->o);
        }
    }
    if (join) held += member_held(n) + (double)n * text_held(o);
    /* the decoder batches, the texts of their results counted with them (max_sym a token) */
    const int mp_join = join && o->decoder == NZ_TR_NAT, at_join = join && !mp_join;
    nz_nat_opts no;
    if (mp_join) { /* as add_text passes it on */
        no = o->nat;
        no.keep_candidates = o->return_candidates;
    }
    nz_nat_bound mp, cb = {0, 0};
    nz_nat_mpb_bound(nat, b ? b->mpb : NULL, lens, mp_join ? n : 0, mp_join ? &no : NULL, t->max_sym, &mp);
    if (nz_nat_get_config(nat)->at_layers)
        nz_nat_cb_bound(nat, b ? b->cb : NULL, lens, at_join ? n : 0, at_join ? &o->at : NULL,
                        at_join && o->decoder == NZ_TR_AT_BEAM ? o->at_beam : 0, t->max_sym, &cb);
    /* the AT step runs before the mask-predict one: the larger of their transients */
    const double step = (double)(cb.step > mp.step ? cb.step : mp.step);
    return nz_mem_bytes(held + (double)cb.held + (double)mp.held + step);
}

int nz_tr_batch_take(nz_tr_batch *b, void **owner, nz_tr_result **res, size_t *n) {
    tr_member **done = NULL; /* the oldest finished request */
    for (tr_member **p = &b->members; *p; p = &(*p)->next)
        if (!(*p)->pending) done = p;
    if (!done) return 0;
    tr_member *m = *done;
    *done = m->next;
    b->size--;
    *owner = m->owner;
    *res = m->res;
    *n = m->n;
    m->res = NULL;
    m->n = 0;
    member_free(m);
    return 1;
}

/* ------------------------------------------------------------------ the served task */

static int task_open(const char *path, void **out, nz_error *err) {
    return nz_translator_open(path, (nz_translator **)out, err);
}

static void task_free(void *m) { nz_translator_free(m); }

static const nz_model *task_model(const void *m) { return nz_translator_model(m); }

static json_t *task_describe(const void *m) {
    const nz_nat_config *c = nz_nat_get_config(nz_translator_nat(m));
    return json_pack("{s:o, s:b, s:I}", "generation", nz_tr_opts_to_json(nz_translator_defaults(m)),
                     "at_decoder", c->at_layers > 0, "max_source_positions",
                     (json_int_t)c->max_source_positions);
}

const nz_task NZ_TASK_TRANSLATE = {"translate", "translation", "cmlm_transformer", task_open,
                                   task_free,   task_model,    task_describe};
