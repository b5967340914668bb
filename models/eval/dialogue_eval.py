#!/usr/bin/python3
"""Evaluate an EqHard-EM multi-decoder T5 dialogue model (t5_multidecoder model
directory) with the C engine (tests/t5md_runner, the nz_t5md code that serves
`nzp chat` and `/v1/dialogue`): quality table, token parity with the PyTorch
reference, and a tokens/s + peak-RSS benchmark against PyTorch.

    /usr/bin/python3 models/eval/dialogue_eval.py --model-dir DIR [--single-dir DIR1]
        --test test.jsonl --out RESULTS_DIR [--limit N] [--quality] [--parity] [--bench]
        [--threads N] [--bench-lines N] [--parity-lines N]

DIR is the fp32 export of the K-decoder model (train_dialogue.py --export or
models/convert/eqhard_t5.py); DIR1 (optional) a single-decoder model (K = 1,
e.g. the phase-1 checkpoint exported) for the "K decoders vs one" rows.
test.jsonl holds {"context": [turns, oldest first], "response": str} lines.

Only the standard library drives the run; PyTorch (Debian's python3-torch) runs
in child processes (``dialogue_eval.py --torch-worker JOB.json``), so each
measurement has its own process and peak RSS.

1. Weight modes, each packed from the fp32 directory with `nzp pack`:
   lossless (--mode bf16: weights rounded to bf16 once, then stored bit-exactly,
   the demo model's format), lossy-3 (--mode lossy-3), fp32-raw (--mode raw,
   benchmark only). Every .nzp is unpacked again (`nzp unpack --model-dir`) so
   the PyTorch side always runs on exactly the weights the engine decodes.
2. --quality: greedy decoding (EqHard-EM's generate(): unk banned,
   max_new_tokens 63) of every test context by every decoder, all K batched,
   for each model x {lossless, lossy-3}. Metrics (EqHard-EM's
   evaluate_generations.py definitions, our own code; words = lower-cased
   \\w+ / punctuation runs):
     BLEU        corpus BLEU (models/eval/bleu.py, sacreBLEU's 13a/exp, lower-cased)
                 of the top-ranked response (mean token log-prob, EqHard-EM's
                 perplexity ranking) against the held-out response; "consensus":
                 the same for the response the engine ranks first by consensus
                 (nz_t5md_consensus, the runner's consensus line: the response
                 the other decoders' responses agree with most)
     oracle BLEU corpus BLEU of, per context, the response with the best
                 sentence BLEU (EqHard-EM's best_bleu)
     pairwise BLEU  mean over contexts of the mean sentence BLEU over ordered
                 pairs of the K responses (lower = more diverse; K = 1: n/a)
     intra-dist-1/2  mean over contexts of distinct uni/bigrams / all, among the
                 K responses of one context (EqHard-EM's intradist)
     inter-dist-1/2  distinct uni/bigrams / all over every response pooled
     unique      mean number of different response texts per context
     ppl         perplexity of the held-out responses (teacher forcing, PyTorch
                 on the unpacked weights): exp(total NLL / tokens) with, per
                 context, the decoder that fits the response best ("best k",
                 the hard-EM view) and averaged over decoders ("mean k").
   Writes quality.md / quality.json and the responses under RESULTS_DIR/gen/.
3. --parity: the first --parity-lines contexts, lossless and lossy-3 of DIR:
   greedy with all decoders batched, greedy of each decoder k alone, and beam
   search (beam 4) with all decoders; runner ids == t5md_ref ids for every
   decoder k, log-probs within 1e-4, and the runner's context ids ==
   t5md_ref.join_context's. parity.json lists every mismatch.
4. --bench: the first --bench-lines contexts one at a time (batch 1, as a
   server decodes a request), greedy, max 63 new tokens: each decoder alone
   and all K decoders batched, for PyTorch fp32 (t5md_ref, KV cache) and the
   engine on fp32-raw cache 0, lossless cache 0, lossless with a full tile
   cache, lossy-3 cache 0; same --threads for everyone. Tokens/s counts the
   generated tokens (eos included) over the decode time (engine: wall time
   minus the same command's time on empty input, i.e. model open; PyTorch:
   its own timed loop after loading). Peak RSS from os.wait4. Writes
   bench.md / bench.json.
"""

import argparse
import collections
import itertools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "models", "eval"))
import bleu as B  # noqa: E402

FULL_CACHE = 1 << 30
MNT = 63


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def run(cmd, **kw):
    log("$ " + " ".join(shlex.quote(str(c)) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def pack_args(mode):
    return {"fp32-raw": ["--mode", "raw"], "lossless": ["--mode", "bf16"]}.get(mode, ["--mode", mode])


# ------------------------------------------------------------------ metrics

_WORD = re.compile(r"\w+|[^\w\s]+", re.UNICODE)


def words(s):
    return _WORD.findall(s.lower())


def sentence_bleu(hyp, ref):
    """sacreBLEU sentence BLEU (13a, exp smoothing) of lower-cased strings, 0..100."""
    return B.corpus_bleu([hyp.lower()], [[ref.lower()]]).score


def dist(texts):
    uni, bi = [], []
    for t in texts:
        w = words(t)
        uni += w
        bi += list(zip(w, w[1:]))
    d1 = 100.0 * len(set(uni)) / len(uni) if uni else 0.0
    d2 = 100.0 * len(set(bi)) / len(bi) if bi else 0.0
    return d1, d2


def top_texts(gens, cons_rank, gens_lp=None):
    """The top-ranked response of each context: by mean log-prob (ties: decoder order; among gens_lp
    when given: the decoders' best beam returns, where gens holds the consensus-pooled picks) and by the
    engine's consensus ranking (cons_rank[i]: decoders best first, the runner's consensus or pooled line)."""
    top = [max(g, key=lambda r: r[1])[2] for g in (gens_lp or gens)]
    top_c = [next(r[2] for r in g if r[0] == cr[0]) for g, cr in zip(gens, cons_rank)]
    return top, top_c


def quality_metrics(gens, refs, cons_rank, gens_lp=None):
    """gens[i]: list of (decoder, mean_logprob, text) in decoder order; refs[i]: str; cons_rank[i]: the
    decoders in consensus order; gens_lp: top_texts'."""
    top, top_c = top_texts(gens, cons_rank, gens_lp)
    oracle = [max((r[2] for r in g), key=lambda t: sentence_bleu(t, ref)) for g, ref in zip(gens, refs)]
    lref = [r.lower() for r in refs]
    m = {"bleu": B.corpus_bleu([t.lower() for t in top], [lref]).score,
         "bleu_consensus": B.corpus_bleu([t.lower() for t in top_c], [lref]).score,
         "oracle_bleu": B.corpus_bleu([t.lower() for t in oracle], [lref]).score}
    K = len(gens[0])
    if K > 1:
        pw = []
        for g in gens:
            txt = [r[2] for r in g]
            pw.append(statistics.mean(sentence_bleu(txt[a], txt[b]) for a, b in itertools.permutations(range(K), 2)))
        m["pairwise_bleu"] = statistics.mean(pw)
        intra = [dist([r[2] for r in g]) for g in gens]
        m["intra_dist_1"] = statistics.mean(x[0] for x in intra)
        m["intra_dist_2"] = statistics.mean(x[1] for x in intra)
    m["inter_dist_1"], m["inter_dist_2"] = dist([r[2] for g in gens for r in g])
    m["unique"] = statistics.mean(len({r[2] for r in g}) for g in gens)
    m["top_words"] = statistics.mean(len(words(t)) for t in top)
    return m


# ------------------------------------------------------------------ runner

def runner_cmd(args, nzp, extra):
    return [args.runner, nzp, "--text", "--threads", str(args.threads), *extra]


def parse_runner(text):
    res = {"out": {}, "rank": {}, "consensus": {}, "consensus_value": {}, "pooled": {}, "ctx": {}, "error": []}
    for ln in text.splitlines():
        f = ln.split("\t")
        if f[0] == "out":
            e = dict(decoder=int(f[2]), ret=int(f[3]), tokens=[int(x) for x in f[4].split()], mean=float(f[5]),
                     sum=float(f[6]), beam_score=float(f[7]), finished=bool(int(f[8])),
                     lps=[float(x) for x in f[9].split()], text=f[10] if len(f) > 10 else "")
            res["out"].setdefault(int(f[1]), []).append(e)
        elif f[0] == "rank":
            res["rank"][int(f[1])] = [int(x) for x in f[2].split()]
        elif f[0] == "consensus":
            pairs = [x.split(":") for x in f[2].split()]
            res["consensus"][int(f[1])] = [int(k) for k, _ in pairs]
            res["consensus_value"][int(f[1])] = {int(k): float(c) for k, c in pairs}
        elif f[0] == "pooled":
            res["pooled"][int(f[1])] = [(int(k), int(r), float(c)) for k, r, c in (x.split(":") for x in f[2].split())]
        elif f[0] == "ctx":
            res["ctx"][int(f[1])] = [int(x) for x in f[2].split()]
        elif f[0] == "error":
            res["error"].append(f[1:])
    return res


def ctx_line(turns):
    return "\t".join(" ".join(str(t).split()) for t in turns) + "\n"


def measured(cmd, stdin_path, stdout_path):
    """(wall seconds, peak RSS bytes) of one child process."""
    with open(stdin_path, "rb") as fi, open(stdout_path, "wb") as fo:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdin=fi, stdout=fo, stderr=subprocess.PIPE)
        err = p.stderr.read()
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("%s failed: %s" % (" ".join(map(str, cmd)), err.decode(errors="replace")))
    return wall, ru.ru_maxrss * 1024


# ------------------------------------------------------------------ PyTorch worker

def torch_worker(job_path):
    """JOB.json: {model_dir, threads, task: score|parity|bench, ...}; writes job["out"]."""
    with open(job_path) as f:
        job = json.load(f)
    t_start = time.perf_counter()
    import torch
    torch.set_num_threads(job["threads"])
    sys.path.insert(0, os.path.join(REPO, "models", "train"))
    import t5md_ref as R
    model, cfg = R.load_model_dir(job["model_dir"])
    tok = R.load_tokenizer(job["model_dir"], cfg)
    contexts = job["contexts"]
    out = {"load_s": time.perf_counter() - t_start}
    if job["task"] == "score":
        nll = []  # per context: [K] sums; tokens per context
        ntok = []
        for c, resp in zip(contexts, job["responses"]):
            src = tok.encode_context(c)
            ids = tok.encode_response(resp)
            row = R.score_responses(model, src, [ids], ban_unk=False)[0]
            nll.append([-r["sum_logprob"] for r in row])
            ntok.append(len(ids))
        out.update(nll=nll, ntok=ntok)
    elif job["task"] == "parity":
        res = []
        K = model.num_modes
        for c in contexts:
            src = tok.encode_context(c)
            item = {"src": src, "greedy": R.greedy(model, [src], max_new_tokens=MNT)[0],
                    "alone": [R.greedy(model, [src], decoders=[k], max_new_tokens=MNT)[0][0] for k in range(K)],
                    "beam": [rs[0] for rs in R.beam(model, [src], beam_size=4, max_new_tokens=MNT)[0]]}
            res.append(item)
        out["results"] = res
    elif job["task"] == "bench":
        srcs = [tok.encode_context(c) for c in contexts]
        runs = {}
        for name, decs in job["runs"]:
            t0 = time.perf_counter()
            n = 0
            for s in srcs:
                for r in R.greedy(model, [s], decoders=decs, max_new_tokens=MNT)[0]:
                    n += len(r["tokens"])
            runs[name] = {"seconds": time.perf_counter() - t0, "tokens": n}
        out["runs"] = runs
    with open(job["out"], "w") as f:
        json.dump(out, f)


def torch_job(args, job):
    path = os.path.join(args.work, "job-%s-%d.json" % (job["task"], os.getpid()))
    # parity: one thread, so that PyTorch's sums run in one fixed order (not timed)
    threads = 1 if job["task"] == "parity" else args.threads
    job = dict(job, threads=threads, out=path + ".out")
    with open(path, "w") as f:
        json.dump(job, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--torch-worker", path], env=env)
    _, status, ru = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("PyTorch worker (%s) failed" % job["task"])
    with open(path + ".out") as f:
        res = json.load(f)
    res["peak_rss"] = ru.ru_maxrss * 1024
    res["wall_s"] = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------ steps

def prepare(args, name, src_dir, modes):
    """{mode: (nzp path, unpacked dir)} for one model."""
    out = {}
    for mode in modes:
        nzp = os.path.join(args.work, "%s-%s.nzp" % (name, mode))
        back = os.path.join(args.work, "%s-%s-unpacked" % (name, mode))
        if not os.path.exists(nzp):
            run([args.nzp, "pack", *pack_args(mode), src_dir, nzp + ".tmp"])
            os.replace(nzp + ".tmp", nzp)
        if not os.path.exists(os.path.join(back, "config.json")):
            run([args.nzp, "unpack", "--model-dir", nzp, back], stdout=subprocess.DEVNULL)
        out[mode] = (nzp, back, os.path.getsize(nzp))
    return out


def generate(args, nzp, contexts, tag, extra):
    inp = os.path.join(args.work, "contexts-%d.txt" % len(contexts))
    with open(inp, "w", encoding="utf-8") as f:
        f.writelines(ctx_line(c) for c in contexts)
    outp = os.path.join(args.out, "gen", tag + ".tsv")
    os.makedirs(os.path.dirname(outp), exist_ok=True)
    with open(inp) as fi, open(outp, "w") as fo:
        run(runner_cmd(args, nzp, extra), stdin=fi, stdout=fo)
    with open(outp, encoding="utf-8") as f:
        res = parse_runner(f.read())
    if res["error"]:
        raise SystemExit("runner errors for %s: %s" % (tag, res["error"][:5]))
    return res


DECODE = ("greedy", "beamN", "nucleusP", "each + -nrN (no-repeat n-gram) and/or -lpX (beam length penalty), "
          "e.g. beam4-nr3-lp1.5", "beam + -pool: the consensus ranking pools every beam return (the product's "
          "consensus with beam search), e.g. beam4-nr3-lp1.5-pool")


def decode_args(name):
    """t5md_runner's options for a decoding name: greedy | beamN | nucleusP (top-p P, seed 1), then
    optional -nrN (no_repeat_ngram_size N) and -lpX (beam: length_penalty X), then optional -pool (beam:
    every return, --num-return N, for the runner's pooled line)."""
    m = re.fullmatch(r"(greedy|beam(\d+)|nucleus([0-9.]+))((?:-nr\d+|-lp[0-9.]+)*)(-pool)?", name)
    if not m:
        raise SystemExit("unknown decoding %r (%s)" % (name, "; ".join(DECODE)))
    args = ["--greedy"] if m.group(1) == "greedy" else ["--beam", m.group(2)] if m.group(2) else \
        ["--sample", "--top-p", m.group(3), "--seed", "1"]
    for opt, val in re.findall(r"-(nr|lp)([0-9.]+)", m.group(4)):
        if opt == "lp" and not m.group(2):
            raise SystemExit("%s: a length penalty (-lp) needs beam search" % name)
        args += ["--no-repeat-ngram", val] if opt == "nr" else ["--lenpen", val]
    if m.group(5):
        if not m.group(2):
            raise SystemExit("%s: -pool needs beam search" % name)
        args += ["--num-return", m.group(2)]
    return args


def loops(text, n=3, times=3):
    """A response loops when one word n-gram occurs `times` or more times in it."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return any(c >= times for c in collections.Counter(grams).values())


def by_source(gens, refs, sources, ranks, nll, cons_rank, gens_lp=None):
    """Per source: contexts, BLEU of the top-ranked response (by log-prob and by consensus), oracle
    BLEU, loop rate, and the share of contexts whose top-ranked / best-fitting (lowest NLL of the
    reference, EqHard-EM's hard assignment) decoder is k."""
    out = {}
    K = len(gens[0])
    for src in sorted(set(sources)):
        idx = [i for i, s in enumerate(sources) if s == src]
        top, top_c = top_texts([gens[i] for i in idx], [cons_rank[i] for i in idx],
                               [gens_lp[i] for i in idx] if gens_lp else None)
        lref = [refs[i].lower() for i in idx]
        oracle = [max((r[2] for r in gens[i]), key=lambda t: sentence_bleu(t, refs[i])) for i in idx]
        out[src] = {
            "contexts": len(idx),
            "bleu": B.corpus_bleu([t.lower() for t in top], [lref]).score,
            "bleu_consensus": B.corpus_bleu([t.lower() for t in top_c], [lref]).score,
            "oracle_bleu": B.corpus_bleu([t.lower() for t in oracle], [lref]).score,
            "loop_top": sum(loops(t) for t in top) / len(idx),
            "top_share": [sum(1 for i in idx if ranks[i][0] == k) / len(idx) for k in range(K)],
            "best_fit_share": [sum(1 for i in idx if min(range(K), key=lambda j: nll[i][j]) == k) / len(idx)
                               for k in range(K)],
        }
    return out


def decoded(res, n):
    """What a user sees per context from a runner result: (gens, gens_lp, cons_rank, cons_value, shown).
    gens[i]: (decoder, mean log-prob, text) per decoder, in decoder order, of the responses the consensus
    ranking shows (with a pooled line: each decoder's chosen return, else its best); gens_lp: the
    decoders' best returns when they differ from gens (pooled), else None; cons_rank[i]: decoders in
    consensus order; cons_value[i]: decoder -> consensus; shown[i]: the runner entries of gens[i]."""
    best = [[e for e in res["out"][i] if e["ret"] == 0] for i in range(n)]
    if not res["pooled"]:
        gens = [[(e["decoder"], e["mean"], e["text"]) for e in b] for b in best]
        return gens, None, [res["consensus"][i] for i in range(n)], res["consensus_value"], best
    pick = [{k: r for k, r, _ in res["pooled"][i]} for i in range(n)]
    shown = [[e for e in res["out"][i] if e["ret"] == pick[i][e["decoder"]]] for i in range(n)]
    gens = [[(e["decoder"], e["mean"], e["text"]) for e in s] for s in shown]
    gens_lp = [[(e["decoder"], e["mean"], e["text"]) for e in b] for b in best]
    return (gens, gens_lp, [[k for k, _, _ in res["pooled"][i]] for i in range(n)],
            {i: {k: c for k, _, c in res["pooled"][i]} for i in range(n)}, shown)


def quality(args, models, data):
    contexts = [d["context"] for d in data]
    refs = [d["response"] for d in data]
    rows = []
    for name, packs, mode, dec in [(n, p, m, d) for d in args.decode.split(",") for n, p in models.items()
                                   for m in ("lossless", "lossy-3")]:
        nzp, back, size = packs[mode]
        suffix = "" if dec == "greedy" else "-" + dec
        done = os.path.join(args.work, "quality-%s-%s-%d%s.json" % (name, mode, len(contexts), suffix))
        if os.path.exists(done):  # an earlier run of this OUT measured it (same model files)
            with open(done) as f:
                rows.append(json.load(f))
            continue
        res = generate(args, nzp, contexts, "%s-%s-%s" % (name, mode, dec),
                       decode_args(dec) + ["--batch", "8", "--cache", str(FULL_CACHE), "--max-new-tokens", str(MNT)])
        gens, gens_lp, cons_rank, cons_value, shown = decoded(res, len(contexts))
        m = quality_metrics(gens, refs, cons_rank, gens_lp)
        score_path = os.path.join(args.work, "score-%s-%s-%d.json" % (name, mode, len(contexts)))
        if os.path.exists(score_path):  # perplexities do not depend on the decoding
            with open(score_path) as f:
                sc = json.load(f)
        else:
            sc = torch_job(args, {"task": "score", "model_dir": back, "contexts": contexts, "responses": refs})
            with open(score_path, "w") as f:
                json.dump(sc, f)
        tot = sum(sc["ntok"])
        K = len(sc["nll"][0])
        m["ppl_best_k"] = math.exp(sum(min(r) for r in sc["nll"]) / tot)
        m["ppl_mean_k"] = statistics.mean(math.exp(sum(r[k] for r in sc["nll"]) / tot) for k in range(K))
        m["ppl_per_k"] = [math.exp(sum(r[k] for r in sc["nll"]) / tot) for k in range(K)]
        # which decoder the ranking puts first, and which fits the reference best
        m["top_share"] = [sum(1 for i in range(len(contexts)) if res["rank"][i][0] == k) / len(contexts)
                          for k in range(K)]
        m["best_fit_share"] = [sum(1 for r in sc["nll"] if min(range(K), key=lambda j: r[j]) == k) / len(contexts)
                               for k in range(K)]
        m["loop_top"] = sum(loops(t) for t in top_texts(gens, cons_rank, gens_lp)[0]) / len(gens)
        m["loop_any"] = sum(any(loops(r[2]) for r in g) for g in gens) / len(gens)
        m["loop_consensus"] = sum(loops(t) for t in top_texts(gens, cons_rank)[1]) / len(gens)
        sources = [d.get("source", "all") for d in data]
        m["by_source"] = by_source(gens, refs, sources, res["rank"], sc["nll"], cons_rank, gens_lp)
        if args.samples:
            m["samples"] = [{"context": contexts[i], "reference": refs[i], "source": sources[i],
                             "responses": [{"decoder": e["decoder"], "score": e["mean"], "text": e["text"],
                                            "consensus": cons_value[i][e["decoder"]]}
                                           for e in sorted(shown[i], key=lambda e: cons_rank[i].index(e["decoder"]))]}
                            for i in sample_indices(data, args.samples)]
        m.update(model=name, mode=mode, decode=dec, K=K, nzp_bytes=size, contexts=len(contexts))
        rows.append(m)
        with open(done, "w") as f:
            json.dump(m, f)
        log("quality", name, mode, json.dumps({k: (round(v, 3) if isinstance(v, float) else v)
                                               for k, v in m.items()}))
    with open(os.path.join(args.out, "quality.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = ["| decoding | model | weights | K | BLEU (top by log-prob) | BLEU (top by consensus) | oracle BLEU | "
             "pairwise BLEU | intra-dist-1/2 | inter-dist-1/2 | unique / ctx | ppl best k | ppl mean k |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in rows:
        pw = "%.2f" % m["pairwise_bleu"] if "pairwise_bleu" in m else "n/a"
        intra = "%.1f / %.1f" % (m["intra_dist_1"], m["intra_dist_2"]) if "intra_dist_1" in m else "n/a"
        lines.append("| %s | %s | %s | %d | %.2f | %.2f | %.2f | %s | %s | %.1f / %.1f | %.2f | %.1f | %.1f |" % (
            m.get("decode", "greedy"), m["model"], m["mode"], m["K"], m["bleu"], m["bleu_consensus"], m["oracle_bleu"],
            pw, intra, m["inter_dist_1"],
            m["inter_dist_2"], m["unique"], m["ppl_best_k"], m["ppl_mean_k"]))
    lines += ["", "Loops (a word 3-gram 3 or more times in a response; share of contexts):", "",
              "| decoding | model | weights | top by log-prob | top by consensus | any decoder's |",
              "|---|---|---|---:|---:|---:|"]
    for m in rows:
        lines.append("| %s | %s | %s | %.1f %% | %.1f %% | %.1f %% |" % (
            m.get("decode", "greedy"), m["model"], m["mode"], 100 * m["loop_top"], 100 * m["loop_consensus"],
            100 * m["loop_any"]))
    for m in rows:
        if m["mode"] != "lossless" or "by_source" not in m:
            continue
        K = m["K"]
        lines += ["", "By source (%s, %s, lossless): BLEU of the top-ranked response (by log-prob, by consensus), "
                  "oracle BLEU, loops (top by log-prob); share of contexts whose top-ranked (log-prob) / "
                  "best-fitting decoder is k:" % (m["model"], m.get("decode")), "",
                  "| source | contexts | BLEU | BLEU consensus | oracle BLEU | loops | top-ranked " + " / ".join(
                      "k%d" % k for k in range(K)) + " | best-fitting " + " / ".join("k%d" % k for k in range(K)) + " |",
                  "|---|---:|---:|---:|---:|---:|---|---|"]
        for src, b in m["by_source"].items():
            lines.append("| %s | %d | %.2f | %.2f | %.2f | %.1f %% | %s | %s |" % (
                src, b["contexts"], b["bleu"], b["bleu_consensus"], b["oracle_bleu"], 100 * b["loop_top"],
                " / ".join("%.0f" % (100 * x) for x in b["top_share"]),
                " / ".join("%.0f" % (100 * x) for x in b["best_fit_share"])))
    for m in rows:
        if "samples" not in m or m["mode"] != "lossless":
            continue
        lines += ["", "Samples (%s, %s, lossless; fixed contexts, uncurated; ranked by consensus, with each "
                  "response's mean log-prob and consensus):" % (m["model"], m.get("decode")), ""]
        for smp in m["samples"]:
            lines.append("* **%s** (%s; reference: %s)" % (" / ".join(smp["context"][-2:]), smp["source"],
                                                           smp["reference"]))
            for r in smp["responses"]:
                lines.append("  * k%d (%.2f, %.2f): %s" % (r["decoder"], r["score"], r["consensus"], r["text"]))
    with open(os.path.join(args.out, "quality.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def sample_indices(data, n):
    """n contexts spread over the sources (round robin over sources in sorted order, each source's
    contexts in file order at a fixed stride): a fixed, uncurated choice."""
    per = {}
    for i, d in enumerate(data):
        per.setdefault(d.get("source", "all"), []).append(i)
    order, srcs = [], sorted(per)
    for j in range(n):
        src = srcs[j % len(srcs)]
        lst = per[src]
        k = j // len(srcs)
        order.append(lst[(k * 97) % len(lst)])
    return sorted(set(order))[:n]


def parity(args, packs, data):
    contexts = [d["context"] for d in data[:args.parity_lines]]
    report = {"lines": len(contexts), "modes": {}}
    ok = True
    for mode in ("lossless", "lossy-3"):
        nzp, back, _ = packs[mode]
        ref = torch_job(args, {"task": "parity", "model_dir": back, "contexts": contexts})["results"]
        K = len(ref[0]["greedy"])
        runs = {"greedy": generate(args, nzp, contexts, "parity-%s-greedy" % mode, ["--greedy", "--batch", "1"]),
                "beam": generate(args, nzp, contexts, "parity-%s-beam" % mode, ["--beam", "4", "--batch", "1"])}
        alone = [generate(args, nzp, contexts, "parity-%s-alone-%d" % (mode, k),
                          ["--greedy", "--batch", "1", "--decoders", str(k)]) for k in range(K)]
        mism, n, maxd = [], 0, 0.0
        for i, r in enumerate(ref):
            if runs["greedy"]["ctx"][i] != r["src"]:
                mism.append({"line": i, "what": "context ids", "engine": runs["greedy"]["ctx"][i], "torch": r["src"]})
            cases = [("greedy", runs["greedy"]["out"][i], r["greedy"], False),
                     ("beam4", runs["beam"]["out"][i], r["beam"], True)]
            cases += [("alone", alone[k]["out"][i], [r["alone"][k]], False) for k in range(K)]
            for what, got, want, beam in cases:
                for g, w in zip(got, want):
                    n += 1
                    d = max([abs(a - b) for a, b in zip(g["lps"], w["token_logprobs"])] + [0.0])
                    if beam:
                        d = max(d, abs(g["beam_score"] - w["beam_score"]))
                    maxd = max(maxd, d) if g["tokens"] == w["tokens"] else maxd
                    if g["decoder"] != w["decoder"] or g["tokens"] != w["tokens"] or d > 1e-4:
                        mism.append({"line": i, "what": what, "decoder": w["decoder"], "engine": g["tokens"],
                                     "torch": w["tokens"], "lp_diff": d})
                if len(got) != len(want):
                    mism.append({"line": i, "what": what, "count": [len(got), len(want)]})
        report["modes"][mode] = {"results": n, "mismatches": mism, "max_lp_diff": maxd, "K": K}
        log("parity %s: %d results compared (greedy all-K, each decoder alone, beam 4), %d mismatches, "
            "max log-prob diff %.2e" % (mode, n, len(mism), maxd))
        ok = ok and not mism
    with open(os.path.join(args.out, "parity.json"), "w") as f:
        json.dump(report, f, indent=1)
    return ok


def bench(args, packs, data):
    contexts = [d["context"] for d in data[:args.bench_lines]]
    inp = os.path.join(args.work, "bench-contexts.txt")
    with open(inp, "w", encoding="utf-8") as f:
        f.writelines(ctx_line(c) for c in contexts)
    empty = os.path.join(args.work, "empty.txt")
    open(empty, "w").close()
    K = json.load(open(os.path.join(packs["lossless"][1], "config.json")))["num_modes"]
    runs = [("k%d" % k, [k]) for k in range(K)] + [("all", list(range(K)))]
    results = []
    tj = torch_job(args, {"task": "bench", "model_dir": packs["fp32-raw"][1], "contexts": contexts, "runs": runs})
    for name, r in tj["runs"].items():
        results.append({"system": "PyTorch fp32", "run": name, "tokens": r["tokens"], "seconds": r["seconds"],
                        "tok_s": r["tokens"] / r["seconds"], "peak_rss": tj["peak_rss"]})
    systems = [("nzp fp32 uncompressed", "fp32-raw", 0), ("nzp lossless, cache 0", "lossless", 0),
               ("nzp lossless, full cache", "lossless", FULL_CACHE), ("nzp lossy-3, cache 0", "lossy-3", 0)]
    for label, mode, cache in systems:
        nzp = packs[mode][0]
        base = ["--greedy", "--batch", "1", "--cache", str(cache), "--max-new-tokens", str(MNT)]
        for name, decs in runs:
            extra = base + ["--decoders", ",".join(map(str, decs))]
            cmd = runner_cmd(args, nzp, extra)
            t_empty, _ = measured(cmd, empty, os.devnull)
            outp = os.path.join(args.work, "bench-%s-%s-%s.tsv" % (mode, cache, name))
            wall, rss = measured(cmd, inp, outp)
            with open(outp, encoding="utf-8") as f:
                res = parse_runner(f.read())
            n = sum(len(e["tokens"]) for v in res["out"].values() for e in v)
            secs = max(wall - t_empty, 1e-9)
            results.append({"system": label, "run": name, "tokens": n, "seconds": secs, "tok_s": n / secs,
                            "peak_rss": rss})
    torch_tok = {r["run"]: r for r in results if r["system"] == "PyTorch fp32"}
    lines = ["| system | " + " | ".join("decoder %d alone: tok/s (×)" % k for k in range(K)) +
             " | all %d batched: tok/s (×) | peak RSS |" % K,
             "|---|" + "---:|" * (K + 2)]
    for label in ["PyTorch fp32"] + [s[0] for s in systems]:
        rs = {r["run"]: r for r in results if r["system"] == label}
        cells = ["%.0f (%.2f)" % (rs[n]["tok_s"], rs[n]["tok_s"] / torch_tok[n]["tok_s"]) for n, _ in runs]
        rss = max(r["peak_rss"] for r in rs.values())
        lines.append("| %s | %s | %.0f MiB |" % (label, " | ".join(cells), rss / 2 ** 20))
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump({"contexts": len(contexts), "threads": args.threads, "results": results}, f, indent=1)
    with open(os.path.join(args.out, "bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--torch-worker"]:
        return torch_worker(argv[1])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="fp32 model directory of the K-decoder model (omitted: --single-dir "
                   "alone, --quality only; the results are kept in OUT/work and reused by a later full run)")
    p.add_argument("--single-dir", help="fp32 model directory of a single-decoder baseline (K = 1)")
    p.add_argument("--test", required=True, help="JSONL {context: [turns], response: str}")
    p.add_argument("--out", required=True)
    p.add_argument("--nzp", default=os.path.join(REPO, "build", "nzp"))
    p.add_argument("--runner", default=os.path.join(REPO, "build", "t5md_runner"))
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--quality", action="store_true")
    p.add_argument("--parity", action="store_true")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--parity-lines", type=int, default=30)
    p.add_argument("--decode", default="greedy",
                   help="quality decodings, comma-separated: " + "; ".join(DECODE) + " (default greedy)")
    p.add_argument("--bench-lines", type=int, default=50)
    p.add_argument("--samples", type=int, default=10, help="fixed sample contexts shown with every decoder's answer")
    p.add_argument("--per-source", type=int, default=0,
                   help="test contexts per source (deterministic: every source's first N lines; 0: --limit lines)")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)
    args.work = os.path.join(args.out, "work")
    os.makedirs(args.work, exist_ok=True)
    with open(args.test, encoding="utf-8") as f:
        data = [json.loads(ln) for ln in f if ln.strip()]
    if args.per_source:  # the test file is in a fixed shuffled order: each source's first N are a sample
        seen = collections.Counter()
        keep = []
        for d in data:
            src = d.get("source", "all")
            if seen[src] < args.per_source:
                seen[src] += 1
                keep.append(d)
        data = keep
    if args.limit:
        data = data[:args.limit]
    modes = ["lossless", "lossy-3"] + (["fp32-raw"] if args.bench else [])
    if not args.model_dir and not (args.single_dir and args.quality and not args.parity and not args.bench):
        p.error("--model-dir is required (except for --quality of --single-dir alone)")
    models = {"multi": prepare(args, "multi", args.model_dir, modes)} if args.model_dir else {}
    if args.single_dir and args.quality:
        models["single"] = prepare(args, "single", args.single_dir, ["lossless", "lossy-3"])
    for name, packs in models.items():
        for mode, (_, _, size) in packs.items():
            log("%s %s: %d bytes" % (name, mode, size))
    ok = True
    if args.parity:
        ok = parity(args, models["multi"], data)
    if args.quality:
        quality(args, models, data)
    if args.bench:
        bench(args, models["multi"], data)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
