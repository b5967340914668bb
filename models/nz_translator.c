/* nz_translator — see nz_translator.h. */
#include "nz_translator.h"

#include "nz_alloc.h"
#include "nz_container.h"

#include <string.h>

struct nz_translator {
    nz_model *model; /* the mapped .nzp */
    nz_nat *nat;     /* network, borrows model */
    nz_tok *tok;     /* tokenizer from the embedded spm.model + dict.txt */
};

void nz_tr_opts_default(nz_tr_opts *o) {
    memset(o, 0, sizeof *o);
    o->decoder = NZ_TR_NAT;
    nz_nat_opts_default(&o->nat);
    o->nat.length_beam = 5;
    nz_nat_at_opts_default(&o->at);
    o->at_beam = 5;
    o->lenpen = 1.0f;
}

void nz_tr_opts_set_stop(nz_tr_opts *o, int (*stop)(void *arg), void *arg) {
    o->nat.stop = o->at.stop = stop;
    o->nat.stop_arg = o->at.stop_arg = arg;
}

void nz_tr_results_free(nz_tr_result *r, size_t n) {
    for (size_t i = 0; r && i < n; i++) {
        nz_free(r[i].text);
        nz_free(r[i].tokens);
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

const nz_model *nz_translator_model(const nz_translator *t) { return t->model; }
const nz_nat *nz_translator_nat(const nz_translator *t) { return t->nat; }
const nz_tok *nz_translator_tok(const nz_translator *t) { return t->tok; }

int nz_translator_encode(const nz_translator *t, const char *text, size_t len, int32_t **ids, size_t *n,
                         nz_error *err) {
    return nz_tok_encode(t->tok, text, len, NZ_TOK_ADD_BOS | NZ_TOK_ADD_EOS, ids, n, err);
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
}

int nz_translator_run(nz_matmul_ctx *mc, const nz_translator *t, const char *const *texts, const size_t *lens,
                      size_t n, const nz_tr_opts *o, int detok, nz_tr_result *res, nz_error *err) {
    memset(res, 0, n * sizeof *res);
    if (!n) return NZ_OK;
    int32_t **ids = nz_calloc(n, sizeof *ids, NZ_MEM_OTHER);
    size_t *len = nz_calloc(n, sizeof *len, NZ_MEM_OTHER);
    size_t *live = nz_calloc(n, sizeof *live, NZ_MEM_OTHER); /* res index of each decoded row */
    nz_nat_hyp *hyps = nz_calloc(n, sizeof *hyps, NZ_MEM_OTHER);
    int32_t *src = NULL;
    int rc = NZ_OK;
    size_t B = 0, S = 2;
    if (!ids || !len || !live || !hyps) {
        rc = nz_fail(err, NZ_E_NOMEM, "translate: out of memory");
        goto done;
    }
    /* tokenize; a text that fails keeps its error and stays out of the batch */
    for (size_t i = 0; i < n; i++) {
        size_t l = lens ? lens[i] : strlen(texts[i]);
        nz_error e = {0};
        if (nz_translator_encode(t, texts[i], l, &ids[i], &len[i], &e)) {
            res[i].rc = e.code;
            nz_fail(&res[i].err, e.code, "tokenizing: %s", e.msg);
            continue;
        }
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
    case NZ_TR_NAT:
        rc = nz_nat_mask_predict(mc, t->nat, src, B, S, &o->nat, hyps, err);
        break;
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
    if (rc)
        for (size_t i = 0; i < n; i++)
            if (!res[i].rc) {
                res[i].rc = rc;
                res[i].err = err ? *err : (nz_error){rc, "batch failed"};
            }
    if (hyps) nz_nat_hyps_free(hyps, B);
    for (size_t i = 0; ids && i < n; i++) nz_free(ids[i]);
    nz_free(ids);
    nz_free(len);
    nz_free(live);
    nz_free(hyps);
    nz_free(src);
    return rc;
}
