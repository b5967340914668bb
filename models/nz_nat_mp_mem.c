/*
 * nz_nat_mp_mem.c — mask-predict's memory (see nz_nat_mp_int.h): the peak of a run alone
 * (nz_nat_mask_predict_peak_bytes), what a batch member holds (nz_nat_mpb_member_bytes) and the most a
 * batch can hold until its members are done (nz_nat_mpb_bound). Each counts the buffers nz_nat_mp.c
 * allocates, at the sizes they can reach.
 */
#include "nz_nat_mp_int.h"

#include <string.h>

/* ------------------------------------------------------------------ peak memory estimates */

/* The longest candidates mask-predict can make for sources of len[0..B) non-pad tokens: the length
 * predictor's largest class (length_classes - 1; with pred_length_offset that - 128 + the source length;
 * at least 2) is L0, candidate j is mp_cand_len (the prediction itself is only known after the encoder
 * ran). *sum receives the sum of the candidates' lengths. @return the widest (>= 2). */
static size_t mp_max_width(const nz_nat *n, const size_t *len, size_t B, const nz_nat_opts *o, double *sum) {
    size_t W = 2;
    *sum = 0;
    for (size_t b = 0; b < B; b++) {
        long L0 = (long)n->c.length_classes - 1;
        if (n->c.pred_length_offset) L0 = L0 - LENGTH_OFFSET + (long)(len ? len[b] : 0);
        L0 = L0 < 2 ? 2 : L0;
        for (size_t j = 0; j < (size_t)o->length_beam; j++) {
            const size_t L = nat_mp_cand_len(n, o, L0, j);
            *sum += (double)L;
            if (L > W) W = L;
        }
    }
    return W;
}

/* The shape of B sentences of options o in a batch: sources of S ids (padded), their N candidates (sumL
 * tokens, the widest W; pass rows padded to Wp >= W), their cross cache slots (own of them) in caches of
 * ecap slots x scap positions. */
typedef struct mp_shape {
    double B, S, N, W, Wp, sumL, own, ecap, scap;
} mp_shape;

/* The sentences' own buffers while they run: their structs, candidate buffers (clen, tok, sc, fn, fscore,
 * ascore, fsteps, fin), kept encoder rows (rerank). */
static double cand_bytes(const nz_nat *n, const nz_nat_opts *o, const mp_shape *s) {
    const double D = (double)n->c.d_model, N = s->N;
    const double cand = 8 * N + 2 * (4 * N * s->W) + 8 * N + 3 * (4 * N) + 4 * N + N;
    const double ex = o->rerank_at ? s->B * (4 * s->S * D + 1 + s->S + 1) : 0;
    return s->B * sizeof(mp_seq) + cand + ex;
}

/* What the sentences hold while they run: cand_bytes and their cross cache slots. */
static double held_bytes(const nz_nat *n, const nz_nat_opts *o, const mp_shape *s) {
    const double D = (double)n->c.d_model, nl = (double)n->dec.nlayers;
    const double slots = nl * (8 * s->own * s->scap * D + s->own * s->scap) + s->own + 1;
    return cand_bytes(n, o, s) + slots;
}

/* A pass over the N candidates padded to Wp (pass_layout's buffers: bt, kvmap, aseq, aj, rows of the
 * masked cells (the first pass: all L - 2 inner ones), h, keys), then the decoder or the projection. */
static double pass_bytes(const nz_nat *n, const mp_shape *s) {
    const double D = (double)n->c.d_model, N = s->N, Wp = s->Wp, R = s->sumL - 2 * N;
    const double bufs =
        4 * N * Wp + 4 * N + 8 * N + 4 * N + 8 * R + 4 * N * Wp * D + sizeof(sort_key) * Wp + 7;
    return bufs + nat_dmax(nat_decoder_fwd_peak(n, 1, N, Wp, s->ecap, s->scap), nat_project_peak(n, R));
}

/* The AT rerank of the B sentences of s (finish: qs; rerank: the encoder rows regathered, hp, ml, ms, as,
 * nz_nat_at_score over the N candidates of <= W tokens). */
static double rerank_bytes(const nz_nat *n, const mp_shape *s) {
    const double N = s->N;
    const double bufs = nat_enc_bytes(s->B, s->S, (double)n->c.d_model) + 8 * N + 8 * N + 4 * N + 4 * N;
    return 8 * s->B + bufs + nat_at_score_peak(n, N, s->W - 1, s->sumL - N, s->B, s->S);
}

/* The end: the rerank or the results (tokens, NZ_MEM_OTHER; keep_candidates' are not counted). */
static double end_bytes(const nz_nat *n, const nz_nat_opts *o, const mp_shape *s) {
    const double hyps = s->B * (4 * s->W + 1);
    return o->rerank_at ? nat_dmax(hyps, rerank_bytes(n, s)) : hyps;
}

/* B sentences of sources S wide joining (admit, join): the source matrix and pointers, then the encoder,
 * the length prediction, the candidates laid out with the encoder held (held: the bytes the sentences
 * hold by then), the cross caches filled (tmp and nz_attn_cross_kv's projections). */
static double admit_bytes(const nz_nat *n, double B, double S, double held) {
    const double D = (double)n->c.d_model;
    const double bufs = 4 * B * S + 8 * B + 8 * B + 4 * B; /* src, qs, L0, slots */
    const double enc = nat_enc_bytes(B, S, D);
    const double lenpred = 4 * B * D + 4 * B * (double)n->c.length_classes; /* pooled, lo */
    const double fill = enc + held + 8 * B * S * D + B * S + 8 * B * S * D + 1;
    return bufs + nat_dmax(nat_dmax(nat_encode_peak(n, B, S), enc + lenpred), fill);
}

/* Joining: admit_bytes with the sentences' candidates and cross cache slots held. */
static double join_bytes(const nz_nat *n, const nz_nat_opts *o, const mp_shape *s) {
    return admit_bytes(n, s->B, s->S, held_bytes(n, o, s));
}

/* The batch's peak for shape s: while it joins (front), or held + a pass or the end. */
static double run_bytes(const nz_nat *n, const nz_nat_opts *o, const mp_shape *s, int front) {
    const double held = held_bytes(n, o, s);
    double peak = held + nat_dmax(pass_bytes(n, s), end_bytes(n, o, s));
    if (front) peak = nat_dmax(peak, join_bytes(n, o, s) + s->B * (4 * s->S + 1));
    return sizeof(nz_nat_mpb) + (double)(n->dec.nlayers ? n->dec.nlayers : 1) * sizeof(nz_kv) + peak;
}

uint64_t nz_nat_mask_predict_peak_bytes(const nz_nat *n, const size_t *len, size_t B, size_t S,
                                        const nz_nat_opts *o) {
    nz_nat_opts def;
    if (!o) {
        nz_nat_opts_default(&def);
        o = &def;
    }
    nz_error e;
    if (nat_mp_check_opts(n, o, &e) || !B || !S) return 0; /* refused before anything is allocated */
    mp_shape s = {.B = (double)B,
                  .S = (double)S,
                  .N = (double)B * o->length_beam,
                  .own = (double)B,
                  .ecap = (double)B,
                  .scap = (double)S};
    s.W = s.Wp = (double)mp_max_width(n, len, B, o, &s.sumL);
    return nz_mem_bytes(run_bytes(n, o, &s, 1));
}

uint64_t nz_nat_mpb_member_bytes(const nz_nat_mpb *b, const void *owner) {
    const mp_seq *q = b->seqs;
    while (q && q->owner != owner) q = q->link;
    if (!q) return 0;
    if (q->state == M_DONE) { /* its result */
        double r = sizeof *q + 4.0 * (double)q->hyp.n + 1 + (double)q->hyp.n_cands * sizeof(nz_nat_cand);
        for (size_t j = 0; j < q->hyp.n_cands; j++) r += 4.0 * (double)q->hyp.cands[j].n + 1;
        return nz_mem_bytes(r);
    }
    const double S = (double)(q->len > 2 ? q->len : 2);
    mp_shape s = {.B = 1, .S = S, .N = (double)q->beam, .own = 1, .ecap = 1, .scap = S};
    if (b->cross.ecap) s.ecap = (double)b->cross.ecap;
    if ((double)b->cross.scap > s.scap) s.scap = (double)b->cross.scap;
    if (q->state == M_PENDING) {
        s.W = s.Wp = (double)mp_max_width(b->n, &q->len, 1, &q->o, &s.sumL);
        return nz_mem_bytes(run_bytes(b->n, &q->o, &s, 1));
    }
    /* running: its candidates are known; a pass pads them to the batch's widest active candidate */
    s.W = s.Wp = (double)q->W;
    for (size_t j = 0; j < q->beam; j++) s.sumL += (double)q->clen[j];
    for (const mp_seq *r = b->seqs; r; r = r->link)
        for (size_t j = 0; r->state == M_RUNNING && j < r->beam; j++)
            if (!r->fin[j] && (double)r->clen[j] > s.Wp) s.Wp = (double)r->clen[j];
    return nz_mem_bytes(run_bytes(b->n, &q->o, &s, 0));
}

/* ------------------------------------------------------------------ the batch's bound */

/* The demand of a batch's sentences (and joiners) on its shared buffers and its steps. */
typedef struct mp_need {
    double seqs;   /* every sentence's own bytes (mp_seq_bytes) */
    size_t enc;    /* sentences not done (cross cache slots) */
    size_t Bp, Sp; /* sentences admitted at the next step, their source width (admit: >= 2) */
    mp_shape pass; /* a pass over every candidate not ended: N, Wp (the widest), sumL */
    mp_shape rr;   /* the rerank of every sentence with rerank_at not done: B, S, N, W, sumL */
} mp_need;

/* A sentence's result, its candidates at most W long: tokens (<= W, + 1; NZ_MEM_OTHER), with
 * keep_candidates every candidate's (the nz_nat_cand array, tokens + 1 each), and the out bytes a token
 * (+ 1) its caller adds to the result and to each kept candidate when it takes them. */
static double mp_res_bytes(const nz_nat_opts *o, double beam, double W, double out) {
    const double cands = o->keep_candidates ? beam * (sizeof(nz_nat_cand) + 4 * W + 1 + out * W + 1) : 0;
    return 4 * W + 1 + out * W + 1 + cands;
}

/* What a sentence of options o holds from nz_nat_mpb_add until it is done, its beam candidates at most W
 * long: cand_bytes, its source until it joins (pending), and its result. */
static double mp_seq_bytes(const nz_nat *n, const nz_nat_opts *o, double len, double beam, double W,
                           int pending, double out) {
    const mp_shape s = {.B = 1, .S = len, .N = beam, .W = W};
    return cand_bytes(n, o, &s) + (pending ? 4 * len + 1 : 0) + mp_res_bytes(o, beam, W, out);
}

/* Count a sentence not done (pending: its candidates at the longest, W wide, sumL tokens in all; running:
 * q's): its bytes, its slot, its candidates in the passes (the active ones) and the rerank. */
static void need_seq(const nz_nat *n, mp_need *u, const nz_nat_opts *o, size_t len, const mp_seq *q,
                     double out) {
    const double beam = (double)o->length_beam;
    double W, sumL, A, Wa, La;
    if (!q) {
        W = Wa = (double)mp_max_width(n, &len, 1, o, &sumL);
        A = beam;
        La = sumL;
        u->Bp++;
        if (len > u->Sp) u->Sp = len;
    } else {
        W = (double)q->W;
        sumL = A = Wa = La = 0;
        for (size_t j = 0; j < q->beam; j++) {
            sumL += (double)q->clen[j];
            if (q->fin[j]) continue; /* it ended: in no pass */
            A++;
            La += (double)q->clen[j];
            Wa = nat_dmax(Wa, (double)q->clen[j]);
        }
    }
    u->seqs += mp_seq_bytes(n, o, (double)len, beam, W, !q, out);
    u->enc++;
    u->pass.N += A;
    u->pass.Wp = nat_dmax(u->pass.Wp, Wa);
    u->pass.sumL += La;
    if (!o->rerank_at) return;
    u->rr.B++;
    u->rr.S = nat_dmax(u->rr.S, (double)len);
    u->rr.N += beam;
    u->rr.W = nat_dmax(u->rr.W, W);
    u->rr.sumL += sumL;
}

void nz_nat_mpb_bound(const nz_nat *n, const nz_nat_mpb *b, const size_t *lens, size_t nj,
                      const nz_nat_opts *o, size_t out, nz_nat_bound *r) {
    nz_nat_mpb fresh; /* b as nz_nat_mpb_create leaves it */
    if (!b) {
        memset(&fresh, 0, sizeof fresh);
        fresh.cross.n = n->dec.nlayers;
        fresh.cross.D = n->c.d_model;
        b = &fresh;
    }
    nz_nat_opts def;
    if (nj && !o) {
        nz_nat_opts_default(&def);
        o = &def;
    }
    const double dout = (double)out;
    mp_need u = {.Sp = 2, .rr = {.S = 2}};
    for (const mp_seq *q = b->seqs; q; q = q->link) {
        if (q->state == M_DONE) { /* its struct and result (its candidates are dropped) */
            u.seqs += sizeof(mp_seq) + mp_res_bytes(&q->o, (double)q->beam, (double)q->W, dout);
            continue;
        }
        need_seq(n, &u, &q->o, q->len, q->state == M_RUNNING ? q : NULL, dout);
    }
    nz_error e;
    for (size_t i = 0; nj && !nat_mp_check_opts(n, o, &e) && i < nj; i++)
        need_seq(n, &u, o, lens[i], NULL, dout);
    size_t E;
    const double cross = nz_kvenc_bound(&b->cross, u.enc, u.Bp ? u.Sp : 0, &E);
    const double held = sizeof(nz_nat_mpb) + cross + u.seqs;
    /* a step: the joiners' admission (their candidates and slots: in held), a pass over the active
     * candidates padded to the widest, reading cross caches of E x their width, then the rerank */
    const double admit = u.Bp ? admit_bytes(n, (double)u.Bp, (double)u.Sp, 0) : 0;
    u.pass.ecap = (double)E;
    u.pass.scap = (double)(u.Bp && u.Sp > b->cross.scap ? u.Sp : b->cross.scap);
    const double pass = u.pass.N ? pass_bytes(n, &u.pass) : 0;
    const double rr = u.rr.B ? rerank_bytes(n, &u.rr) : 0;
    r->held = nz_mem_bytes(held);
    r->step = nz_mem_bytes(nat_dmax(admit, nat_dmax(pass, rr)));
}
