#!/usr/bin/python3
"""Evaluate a cmlm_transformer translation model with `nzp translate`: BLEU per
decoding configuration and weight mode, token parity with the PyTorch
reference, and a throughput / peak-RSS benchmark against PyTorch.

    /usr/bin/python3 models/eval/evaluate.py (--checkpoint CK.pt | --model-dir DIR)
        --src test.en --ref test.de --out RESULTS_DIR
        [--nzp build/nzp] [--limit N] [--bleu] [--bench] [--threads N] [--batch K]

Only /usr/bin/python3 with the standard library drives the run; PyTorch, numpy
and sentencepiece (Debian's python3-torch, -numpy, -sentencepiece) are used by
the converter and by the PyTorch reference, which always runs in a child
process of this script (``evaluate.py --torch-worker ...``), so every
measurement is its own process with its own peak RSS.

Steps (everything is printed as it goes, and the commands are recorded in the
JSON files):

1. Model directory. ``--checkpoint``: models/convert/fairseq_cmlm.py converts
   it (fp32) into RESULTS_DIR/work/model-fp32 (spm.model and dict.txt are taken
   from the checkpoint's directory unless --spm/--dict say otherwise).
   ``--model-dir``: used as is (it should be fp32, the converter's default).
2. Weight modes, each packed from that fp32 directory with ``nzp pack``:
     fp32-raw   --mode raw      fp32, uncompressed
     lossless   --mode bf16     weights rounded to bf16 once, then stored
                                bit-exactly (rANS): the demo model's format
                                (models/train/README_train.md packs it so).
                                "lossless" of an fp32 directory would keep
                                fp32; we use the bf16 demo weights instead.
     lossy-K    --mode lossy-K  K-bit block quantisation of the fp32 weights
3. --bleu: `nzp translate` of the source (first --limit lines) for every
   decoding configuration -- NAT mask-predict with iterations 1/2/4/10 x length
   beam 1/3/5 x AT rerank off/on with fixed iterations, two adaptive-stopping
   rows, AT greedy and AT beam 4 -- in every --bleu-modes mode
   (default lossless, lossy-3, lossy-1); corpus BLEU (models/eval/bleu.py,
   sacreBLEU's default 13a/exp-smoothing definition) against --ref.
   Writes RESULTS_DIR/bleu.md (rows: decoding configuration, columns: weight
   modes) and bleu.json, and the hypotheses under RESULTS_DIR/hyp/.
   Parity: for --parity-configs (default nat-i10-b5-rerank, nat-i1-b1,
   at-greedy) and --parity-modes (default lossless) the `nzp translate --tokens`
   ids of the first --parity-lines (50) lines are compared with
   nat_ref.mask_predict / at_greedy on the *same* weights (the .nzp unpacked
   with `nzp unpack`, so bf16/lossy values are exactly what the C engine
   decodes), tokenized with nat_ref.Vocab and batched exactly like nzp
   (--batch consecutive lines, right-padded; the reference runs with
   --parity-threads, default 1, as it is not timed). The text lines are compared too
   (the C detokenizer vs fairseq's Dictionary.string + sentencepiece
   post-processing of the reference ids). Every mismatch is listed (line,
   first differing position, both id sequences) in parity.json and bleu.md.
4. --bench: on the same lines, for --bench-configs (default nat-i4-b3 and
   at-greedy): PyTorch (nat_ref on the fp32 weights) and `nzp translate` with
   fp32-raw cache 0, lossless cache 0, lossless full cache, lossy-3 cache 0
   (nzp pack's default esc exponents), and, on request, lossless with rANS
   exponents cache 0 (nzp-lossless-rans-c0; --bench-systems picks a subset;
   --batch 1 measures one sentence at a time).
   Same --threads (nzp --threads; torch.set_num_threads + OMP/MKL env) and the
   same --batch for everyone. Each run is a child process started with
   subprocess.Popen and reaped with os.wait4, whose rusage gives the child's
   own peak RSS (ru_maxrss). Throughput excludes start-up: for nzp the wall
   time of the same command on empty input (model open + load) is subtracted
   (the lossless full-cache run still pays its cache fills, they happen while
   translating); the PyTorch worker times its own tokenize+decode loop (after
   `import torch` and loading the model). Output tokens = ids of the results
   other than bos/pad/eos. --bench-repeat R runs everything R times,
   interleaved, and reports the fastest (all samples are in bench.json).
   Ratios are to PyTorch fp32 and to nzp fp32-raw of the same configuration
   in the same run. Writes RESULTS_DIR/bench.md and bench.json; the bench also
   notes which outputs are token-identical to which (fp32-raw vs PyTorch fp32,
   lossless cache 0 vs full cache).

Full cache = 2 x the fp32-decoded size of the weights (`nzp info --memory`)
+ 16 MiB. The BLEU runs use the full cache too (--bleu-cache; it only changes
speed, never the output, which the bench cross-checks).

See models/eval/README.md for examples and caveats.
"""

import argparse
import datetime
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BOS, PAD, EOS, UNK = 0, 1, 2, 3

NAT_GRID = [(it, beam, rr) for it in (1, 2, 4, 10) for beam in (1, 3, 5) for rr in (False, True)]
DEFAULT_CONFIGS = (["nat-i%d-b%d%s" % (it, b, "-rerank" if rr else "") for it, b, rr in NAT_GRID]
                   + ["nat-i10-b5-adaptive", "nat-i4-b5-rerank-adaptive", "at-greedy", "at-beam4"])


# ------------------------------------------------------------------ helpers

def log(*a):
    print(*a, flush=True)


def parse_config(name):
    """'nat-iT-bB[-rerank][-adaptive]' | 'at-greedy' | 'at-beamK' ->
    dict(name, at, at_beam, iter, beam, rerank, adaptive, label, args). The nzp flags are explicit,
    so a model's own decoding defaults (config "generation") never change what a row measures."""
    if name == "at-greedy":
        return dict(name=name, at=True, at_beam=1, iter=None, beam=None, rerank=False, adaptive=False,
                    label="AT greedy", args=["--at"])
    if name.startswith("at-beam") and name[7:].isdigit() and int(name[7:]) >= 1:
        k = int(name[7:])
        return dict(name=name, at=True, at_beam=k, iter=None, beam=None, rerank=False, adaptive=False,
                    label="AT beam %d" % k, args=["--at-beam", str(k)])
    parts = name.split("-")
    try:
        flags = parts[3:]
        if parts[0] != "nat" or parts[1][0] != "i" or parts[2][0] != "b" or \
                flags not in ([], ["rerank"], ["adaptive"], ["rerank", "adaptive"]):
            raise ValueError
        it, beam = int(parts[1][1:]), int(parts[2][1:])
    except (ValueError, IndexError):
        raise SystemExit("evaluate.py: bad decoding configuration %r (want nat-iT-bB[-rerank][-adaptive], "
                         "at-greedy or at-beamK)" % name)
    rr, ad = "rerank" in flags, "adaptive" in flags
    args = ["--nat", "--iter", str(it), "--beam", str(beam), "--rerank" if rr else "--no-rerank",
            "--adaptive" if ad else "--fixed"]
    label = "NAT iter %d, beam %d%s%s" % (it, beam, ", AT rerank" if rr else "", ", adaptive" if ad else "")
    return dict(name=name, at=False, at_beam=None, iter=it, beam=beam, rerank=rr, adaptive=ad, label=label,
                args=args)


def pack_args(mode):
    if mode == "fp32-raw":
        return ["--mode", "raw"]
    if mode == "lossless":
        return ["--mode", "bf16"]
    if mode == "lossless-rans":
        return ["--mode", "bf16", "--coder", "rans"]
    if mode.startswith("lossy-") and mode[6:].isdigit():
        return ["--mode", mode]
    raise SystemExit("evaluate.py: unknown weight mode %r (fp32-raw, lossless, lossless-rans, lossy-K)" % mode)


def run(cmd, **kw):
    log("$ " + " ".join(shlex.quote(str(c)) for c in cmd))
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def read_lines(path, limit=0):
    with open(path, encoding="utf-8") as f:
        lines = [l.rstrip("\n").rstrip("\r") for l in f]
    return lines[:limit] if limit else lines


def write_lines(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(l + "\n" for l in lines))


def count_tokens(token_lines):
    """Output tokens: ids other than bos/pad/eos (an empty/failed line counts 0)."""
    n = 0
    for l in token_lines:
        n += sum(1 for x in l.split() if int(x) not in (BOS, PAD, EOS))
    return n


def measured(cmd, stdin_path, stdout_path, stderr_path, env=None):
    """Run cmd as a child, reap it with os.wait4: (exit code, wall s, peak RSS bytes)."""
    with open(stdin_path, "rb") as fi, open(stdout_path, "wb") as fo, open(stderr_path, "wb") as fe:
        t0 = time.perf_counter()
        p = subprocess.Popen([str(c) for c in cmd], stdin=fi, stdout=fo, stderr=fe, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, wall, ru.ru_maxrss * 1024  # Linux: ru_maxrss in KiB


def git_commit():
    try:
        out = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def fmt_bytes(n):
    return "%.1f MiB" % (n / 2 ** 20)


# ------------------------------------------------------------------ PyTorch worker (child process)

def torch_worker(argv):
    """evaluate.py --torch-worker MODEL_DIR IN OUT_TOKENS OUT_TEXT REPORT.json THREADS BATCH CONFIG
    Translates IN with nat_ref, writes ids (nzp --tokens format) and fairseq text."""
    t_start = time.perf_counter()
    mdir, inp, out_tok, out_txt, report, threads, batch, cfgname = argv
    threads, batch = int(threads), int(batch)
    cfg = parse_config(cfgname)
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, os.path.join(REPO, "models", "train"))
    import nat_ref as R
    model, _ = R.load_model_dir(mdir)
    vocab = R.Vocab(os.path.join(mdir, "spm.model"), os.path.join(mdir, "dict.txt"))
    lines = read_lines(inp)
    t_loaded = time.perf_counter()

    def decode(srcs):
        src = R.pad_batch(srcs)
        if cfg["at"] and cfg["at_beam"] == 1:
            return R.at_greedy(model, src)
        if cfg["at"]:
            return [r["tokens"] for r in R.at_beam(model, src, beam=cfg["at_beam"], lenpen=1.0)]
        return [r["tokens"] for r in R.mask_predict(model, src, max_iter=cfg["iter"], length_beam=cfg["beam"],
                                                    rerank_at=cfg["rerank"], adaptive=cfg["adaptive"])]

    toks, failed = [], 0
    for i in range(0, len(lines), batch):
        srcs = [vocab.encode(l) for l in lines[i:i + batch]]
        try:
            toks.extend(decode(srcs))
        except Exception as e:  # noqa: BLE001 -- fall back to one line at a time, as nzp reports per line
            for j, s in enumerate(srcs):
                try:
                    toks.extend(decode([s]))
                except Exception as e1:  # noqa: BLE001
                    sys.stderr.write("torch worker: line %d: %s\n" % (i + j + 1, e1))
                    toks.append(None)
                    failed += 1
    t_done = time.perf_counter()
    with open(out_tok, "w") as f:
        f.write("".join((" ".join(map(str, t)) if t is not None else "") + "\n" for t in toks))
    # fairseq Dictionary.string (bos/eos/pad dropped, unk printed as <unk>) + sentencepiece post-process
    text = []
    for t in toks:
        s = " ".join(vocab.symbols[x] for x in (t or []) if x not in (BOS, EOS, PAD))
        text.append(s.replace(" ", "").replace("\u2581", " ").strip())
    write_lines(out_txt, text)
    with open(report, "w") as f:
        json.dump({"startup_s": t_loaded - t_start, "decode_s": t_done - t_loaded, "lines": len(lines),
                   "failed": failed, "torch_threads": torch.get_num_threads(),
                   "torch_version": torch.__version__}, f)
    return 1 if failed else 0


# ------------------------------------------------------------------ the evaluation

class Evaluation:
    def __init__(self, o):
        self.o = o
        self.out = os.path.abspath(o.out)
        self.work = os.path.join(self.out, "work")
        os.makedirs(self.work, exist_ok=True)
        self.nzp = os.path.abspath(o.nzp)
        self.packs = {}
        self.unpacked = {}
        self.meta = {}

    # ---- model directory, packs, data
    def prepare(self):
        o = self.o
        if not os.access(self.nzp, os.X_OK):
            raise SystemExit("evaluate.py: %s is not executable (make build/nzp first)" % self.nzp)
        if o.checkpoint:
            ckdir = os.path.dirname(os.path.abspath(o.checkpoint))
            spm = o.spm or os.path.join(ckdir, "spm.model")
            dic = o.dict or os.path.join(ckdir, "dict.txt")
            self.mdir = os.path.join(self.work, "model-fp32")
            # convert a private copy: a training run may replace the checkpoint meanwhile
            ck = os.path.join(self.work, "checkpoint.pt")
            shutil.copyfile(o.checkpoint, ck)
            run([sys.executable, os.path.join(REPO, "models", "convert", "fairseq_cmlm.py"), ck, spm, dic,
                 self.mdir])
        else:
            self.mdir = os.path.abspath(o.model_dir)
        with open(os.path.join(self.mdir, "config.json")) as f:
            cfg = json.load(f)
        if cfg.get("torch_dtype", "float32") != "float32":
            log("WARNING: %s holds %s weights: 'fp32-raw' is then %s raw and every mode starts from them"
                % (self.mdir, cfg.get("torch_dtype"), cfg.get("torch_dtype")))
        self.meta["model_dir"] = self.mdir
        self.meta["model_config"] = {k: cfg.get(k) for k in (
            "encoder_embed_dim", "encoder_layers", "decoder_layers", "at_decoder_layers", "vocab_size",
            "torch_dtype", "converted_from")}
        src = read_lines(o.src, o.limit)
        ref = read_lines(o.ref, o.limit)
        if len(src) != len(ref):
            raise SystemExit("evaluate.py: %s and %s differ in length" % (o.src, o.ref))
        self.src, self.ref = src, ref
        self.src_path = os.path.join(self.work, "src.txt")
        write_lines(self.src_path, src)
        npar = min(o.parity_lines, len(src))
        self.par_path = os.path.join(self.work, "src-parity.txt")
        write_lines(self.par_path, src[:npar])
        self.empty_path = os.path.join(self.work, "empty.txt")
        write_lines(self.empty_path, [])
        self.meta.update(src=os.path.abspath(o.src), ref=os.path.abspath(o.ref), lines=len(src),
                         threads=o.threads, batch=o.batch, nzp=self.nzp, git=git_commit(),
                         date=datetime.datetime.now().isoformat(timespec="seconds"),
                         host_cpus=os.cpu_count(), loadavg_start=os.getloadavg(),
                         torch_env=["OMP_NUM_THREADS=%d" % o.threads, "MKL_NUM_THREADS=%d" % o.threads] + o.torch_env)
        log("model %s, %d lines of %s, threads %d, batch %d" % (self.mdir, len(src), o.src, o.threads, o.batch))

    def pack(self, mode):
        if mode in self.packs:
            return self.packs[mode]["path"]
        path = os.path.join(self.work, mode + ".nzp")
        run([self.nzp, "pack", *pack_args(mode), self.mdir, path], stdout=subprocess.DEVNULL)
        info = json.loads(subprocess.run([self.nzp, "info", "--json", "--memory", path], check=True,
                                         capture_output=True, text=True).stdout)
        tot, mem = info["total"], info["memory"]
        self.packs[mode] = dict(path=path, pack=" ".join(pack_args(mode)), file_bytes=tot["file_bytes"],
                                stored_bytes=tot["stored_bytes"], bits_per_weight=tot["bits_per_weight"],
                                decoded_bytes=mem["weights_decoded_equivalent_bytes"])
        log("  %s: %s, %.2f bits/weight" % (mode, fmt_bytes(tot["file_bytes"]), tot["bits_per_weight"]))
        return path

    def full_cache(self, mode):
        self.pack(mode)
        return 2 * self.packs[mode]["decoded_bytes"] + (16 << 20)

    def unpacked_dir(self, mode):
        """A model directory holding exactly the weights the .nzp decodes to."""
        if mode in self.unpacked:
            return self.unpacked[mode]
        d = os.path.join(self.work, "unpacked-" + mode)
        os.makedirs(d, exist_ok=True)
        run([self.nzp, "unpack", self.pack(mode), os.path.join(d, "model.safetensors")])
        for f in ("config.json", "dict.txt", "spm.model"):
            shutil.copyfile(os.path.join(self.mdir, f), os.path.join(d, f))
        self.unpacked[mode] = d
        return d

    def nzp_cmd(self, mode, cfg, cache, tokens=False):
        cmd = [self.nzp, "translate", self.pack(mode), *cfg["args"], "--threads", str(self.o.threads),
               "--batch", str(self.o.batch), "--cache", str(cache)]
        if self.o.max_len:
            cmd += ["--max-len", str(self.o.max_len)]
        return cmd + (["--tokens"] if tokens else [])

    def torch_cmd(self, mdir, inp, out_tok, out_txt, report, cfg, threads):
        return [sys.executable, os.path.abspath(__file__), "--torch-worker", mdir, inp, out_tok, out_txt, report,
                str(threads), str(self.o.batch), cfg["name"]]

    def torch_env(self, threads):
        env = dict(os.environ)
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        for kv in self.o.torch_env:
            k, _, v = kv.partition("=")
            env[k] = v
        return env

    def run_nzp(self, mode, cfg, cache, inp, out, tokens=False):
        err = out + ".stderr"
        cmd = self.nzp_cmd(mode, cfg, cache, tokens)
        rc, wall, rss = measured(cmd, inp, out, err)
        msgs = open(err, encoding="utf-8", errors="replace").read().splitlines()
        if rc not in (0, 1) or (rc == 1 and not any(": line " in m for m in msgs)):
            raise SystemExit("evaluate.py: %s failed (exit %d):\n%s" % (" ".join(cmd), rc, "\n".join(msgs[-20:])))
        failed = sum(1 for m in msgs if ": line " in m)
        return dict(cmd=" ".join(shlex.quote(str(c)) for c in cmd), rc=rc, wall_s=wall, peak_rss=rss,
                    failed_lines=failed, errors=msgs[:10])

    def run_torch(self, mdir, cfg, inp, stem, threads):
        tok, txt, rep = stem + ".tok", stem + ".txt", stem + ".json"
        cmd = self.torch_cmd(mdir, inp, tok, txt, rep, cfg, threads)
        log("  (PyTorch reference %s, %d thread(s), %d lines ...)" % (cfg["name"], threads, len(read_lines(inp))))
        rc, wall, rss = measured(cmd, os.devnull, stem + ".stdout", stem + ".stderr", env=self.torch_env(threads))
        if rc not in (0, 1):
            raise SystemExit("evaluate.py: PyTorch worker failed (exit %d), see %s.stderr" % (rc, stem))
        with open(rep) as f:
            r = json.load(f)
        r.update(cmd=" ".join(shlex.quote(str(c)) for c in cmd), rc=rc, wall_s=wall, peak_rss=rss)
        return r

    # ---- BLEU + parity
    def bleu(self):
        sys.path.insert(0, HERE)
        from bleu import corpus_bleu
        o = self.o
        configs = [parse_config(c) for c in o.configs.split(",")]
        modes = o.bleu_modes.split(",")
        log("\n== packing: %s" % ", ".join(modes))
        for m in modes:
            self.pack(m)
        hypdir = os.path.join(self.out, "hyp")
        os.makedirs(hypdir, exist_ok=True)
        results = {}
        log("\n== BLEU: %d configurations x %d weight modes on %d lines" % (len(configs), len(modes), len(self.src)))
        t_all = time.perf_counter()
        for cfg in configs:
            for m in modes:
                out = os.path.join(hypdir, "%s.%s.txt" % (m, cfg["name"]))
                cache = self.full_cache(m) if o.bleu_cache == "full" else int(o.bleu_cache)
                r = self.run_nzp(m, cfg, cache, self.src_path, out)
                hyps = read_lines(out)
                if len(hyps) != len(self.src):
                    raise SystemExit("evaluate.py: %s: %d output lines for %d inputs" % (out, len(hyps), len(self.src)))
                b = corpus_bleu(hyps, [self.ref])
                r.update(bleu=b.score, bleu_str=str(b), hyp=os.path.relpath(out, self.out))
                results.setdefault(cfg["name"], {})[m] = r
                log("  %-32s %-9s BLEU %6.2f  (%5.1f s%s)  %s" % (
                    cfg["label"], m, b.score, r["wall_s"],
                    ", %d lines failed" % r["failed_lines"] if r["failed_lines"] else "", str(b)[5:]))
        t_bleu = time.perf_counter() - t_all
        parity = self.parity()
        doc = dict(meta=self.meta, packs=self.packs, modes=modes,
                   configs=[dict(c, args=" ".join(c["args"])) for c in configs], results=results,
                   parity=parity, bleu_wall_s=t_bleu, bleu_cache=o.bleu_cache)
        with open(os.path.join(self.out, "bleu.json"), "w") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(self.out, "parity.json"), "w") as f:
            json.dump(parity, f, indent=1)
        md = self.bleu_md(configs, modes, results, parity)
        with open(os.path.join(self.out, "bleu.md"), "w") as f:
            f.write(md)
        log("\n" + md)
        log("wrote %s/bleu.md, bleu.json, parity.json (BLEU runs %.0f s)" % (self.out, t_bleu))

    def parity(self):
        o = self.o
        configs = [parse_config(c) for c in o.parity_configs.split(",") if c]
        modes = [m for m in o.parity_modes.split(",") if m]
        n = len(read_lines(self.par_path))
        res = []
        if not configs or not modes or not n:
            return res
        log("\n== parity: nzp translate --tokens vs PyTorch nat_ref on the same (unpacked) weights, first %d lines"
            % n)
        pdir = os.path.join(self.work, "parity")
        os.makedirs(pdir, exist_ok=True)
        for m in modes:
            mdir = self.unpacked_dir(m)
            for cfg in configs:
                stem = os.path.join(pdir, "%s.%s" % (m, cfg["name"]))
                c_tok = self.run_nzp(m, cfg, self.full_cache(m), self.par_path, stem + ".nzp.tok", tokens=True)
                c_txt = self.run_nzp(m, cfg, self.full_cache(m), self.par_path, stem + ".nzp.txt")
                t = self.run_torch(mdir, cfg, self.par_path, stem + ".torch", o.parity_threads)
                a = read_lines(stem + ".nzp.tok")
                b = read_lines(stem + ".torch.tok")
                at_ = read_lines(stem + ".nzp.txt")
                bt = read_lines(stem + ".torch.txt")
                mism = []
                for i, (x, y) in enumerate(zip(a, b)):
                    if x != y:
                        xs, ys = x.split(), y.split()
                        pos = next((k for k in range(min(len(xs), len(ys))) if xs[k] != ys[k]), min(len(xs), len(ys)))
                        mism.append(dict(line=i + 1, first_diff=pos, nzp=x, torch=y, nzp_len=len(xs),
                                         torch_len=len(ys)))
                if len(a) != len(b):
                    mism.append(dict(line=None, note="line counts differ: nzp %d, torch %d" % (len(a), len(b))))
                text_diff = [i + 1 for i, (x, y) in enumerate(zip(at_, bt)) if x != y]
                r = dict(mode=m, config=cfg["name"], label=cfg["label"], lines=n, identical=n - len(mism),
                         token_mismatches=mism, text_mismatch_lines=text_diff, nzp_cmd=c_tok["cmd"],
                         torch_cmd=t["cmd"], torch_weights=mdir)
                res.append(r)
                log("  %-9s %-32s tokens identical %d/%d, text identical %d/%d%s" % (
                    m, cfg["label"], r["identical"], n, n - len(text_diff), n,
                    "" if not mism else "  first mismatch: line %s pos %s" % (mism[0]["line"],
                                                                              mism[0].get("first_diff"))))
        return res

    def bleu_md(self, configs, modes, results, parity):
        o, me = self.o, self.meta
        L = ["# BLEU of `nzp translate`", "",
             "Model `%s` (%s), %d lines of `%s` vs `%s`; corpus BLEU by models/eval/bleu.py "
             "(sacreBLEU default: 13a, exp smoothing). `--threads %d --batch %d`, cache %s; git %s, %s." % (
                 me["model_dir"], json.dumps(me["model_config"].get("converted_from")), me["lines"], me["src"],
                 me["ref"], o.threads, o.batch, o.bleu_cache, me["git"], me["date"]), "",
             "Each cell: BLEU, and in brackets sentences/s of that run (wall time of the whole "
             "`nzp translate` process, start-up included; one run on a shared machine).", "",
             "| decoding | " + " | ".join(modes) + " |",
             "|---|" + "---:|" * len(modes)]
        for c in configs:
            row = results[c["name"]]
            cells = []
            for m in modes:
                r = row[m]
                cells.append("%.2f%s (%.0f)" % (r["bleu"], "*" if r["failed_lines"] else "",
                                                me["lines"] / max(r["wall_s"], 1e-9)))
            L.append("| %s | %s |" % (c["label"], " | ".join(cells)))
        if any(r["failed_lines"] for row in results.values() for r in row.values()):
            L += ["", "\\* some lines failed to translate (empty output, counted in BLEU); see bleu.json."]
        L += ["", self.packs_md(modes)]
        if parity:
            L += ["", "## Parity with the PyTorch reference",
                  "", "`nzp translate --tokens` vs models/train/nat_ref.py on the same weights (`nzp unpack` of the "
                      ".nzp), same batching; first %d lines." % parity[0]["lines"], "",
                  "| weights | decoding | tokens identical | text identical | mismatching lines (line:first differing position) |",
                  "|---|---|---:|---:|---|"]
            for p in parity:
                mm = ", ".join("%s:%s" % (x["line"], x.get("first_diff")) for x in p["token_mismatches"][:20])
                if len(p["token_mismatches"]) > 20:
                    mm += ", ..."
                L.append("| %s | %s | %d/%d | %d/%d | %s |" % (
                    p["mode"], p["label"], p["identical"], p["lines"], p["lines"] - len(p["text_mismatch_lines"]),
                    p["lines"], mm or "none"))
        return "\n".join(L) + "\n"

    def packs_md(self, modes):
        L = ["| weights | `nzp pack` | file | bits/weight |", "|---|---|---:|---:|"]
        for m in (m for m in modes if m in self.packs):  # the bench packs only what its systems use
            p = self.packs[m]
            L.append("| %s | `%s` | %s | %.2f |" % (m, p["pack"], fmt_bytes(p["file_bytes"]), p["bits_per_weight"]))
        return "\n".join(L)

    # ---- benchmark
    def bench(self):
        o = self.o
        configs = [parse_config(c) for c in o.bench_configs.split(",")]
        log("\n== packing for the benchmark")
        systems = [s for s in [
            dict(name="pytorch-fp32", label="PyTorch (nat_ref), fp32", kind="torch", mdir=self.mdir),
            dict(name="nzp-fp32-raw", label="nzp fp32 raw, cache 0", kind="nzp", mode="fp32-raw", cache=0),
            dict(name="nzp-lossless-c0", label="nzp lossless (bf16), cache 0", kind="nzp", mode="lossless",
                 cache=0),
            dict(name="nzp-lossless-full", label="nzp lossless (bf16), full cache", kind="nzp", mode="lossless",
                 cache=self.full_cache("lossless")),
            dict(name="nzp-lossless-rans-c0", label="nzp lossless (bf16) rANS exponents, cache 0", kind="nzp",
                 mode="lossless-rans", cache=0),
            dict(name="nzp-lossy-3-c0", label="nzp lossy-3, cache 0", kind="nzp", mode="lossy-3", cache=0),
        ] if s["name"] in o.bench_systems.split(",")]
        for m in sorted({s["mode"] for s in systems if s["kind"] == "nzp"}):
            self.pack(m)
        bdir = os.path.join(self.work, "bench")
        os.makedirs(bdir, exist_ok=True)
        n = len(self.src)
        samples = {}
        log("\n== bench: %d lines, threads %d, batch %d, %d repeat(s), load average now %.2f"
            % (n, o.threads, o.batch, o.bench_repeat, os.getloadavg()[0]))
        for rep in range(o.bench_repeat):
            for cfg in configs:
                for s in systems:
                    stem = os.path.join(bdir, "%s.%s" % (s["name"], cfg["name"]))
                    if s["kind"] == "torch":
                        r = self.run_torch(s["mdir"], cfg, self.src_path, stem, o.threads)
                        out = stem + ".tok"
                    else:
                        out = stem + ".tok"
                        st = self.run_nzp(s["mode"], cfg, s["cache"], self.empty_path, stem + ".startup")
                        r = self.run_nzp(s["mode"], cfg, s["cache"], self.src_path, out, tokens=True)
                        r.update(startup_s=st["wall_s"], startup_peak_rss=st["peak_rss"],
                                 decode_s=max(r["wall_s"] - st["wall_s"], 1e-9))
                    toks = read_lines(out)
                    r.update(out_tokens=count_tokens(toks), tokens_file=out)
                    samples.setdefault((cfg["name"], s["name"]), []).append(r)
                    log("  [%d] %-14s %-32s %6.2f s decode (%5.2f s wall, %.2f s start-up)  %6.1f sent/s  "
                        "%7.1f tok/s  peak RSS %s" % (
                            rep + 1, cfg["name"], s["label"], r["decode_s"], r["wall_s"], r["startup_s"],
                            n / r["decode_s"], r["out_tokens"] / r["decode_s"], fmt_bytes(r["peak_rss"])))
        table = {}
        for cfg in configs:
            rows = {}
            for s in systems:
                ss = samples[(cfg["name"], s["name"])]
                best = min(ss, key=lambda r: r["decode_s"])
                rows[s["name"]] = dict(
                    label=s["label"], cache=s.get("cache"), decode_s=best["decode_s"],
                    decode_s_all=[r["decode_s"] for r in ss],
                    decode_s_median=statistics.median(r["decode_s"] for r in ss),
                    wall_s=best["wall_s"], startup_s=best["startup_s"], out_tokens=best["out_tokens"],
                    sent_per_s=n / best["decode_s"], tok_per_s=best["out_tokens"] / best["decode_s"],
                    peak_rss=max(r["peak_rss"] for r in ss), cmd=best["cmd"],
                    failed_lines=best.get("failed_lines", best.get("failed", 0)),
                    tokens_file=os.path.relpath(best["tokens_file"], self.out))
            for base in ("pytorch-fp32", "nzp-fp32-raw"):
                for r in rows.values():
                    r["sent_ratio_vs_" + base] = r["sent_per_s"] / rows[base]["sent_per_s"] if base in rows else None
                    r["tok_ratio_vs_" + base] = r["tok_per_s"] / rows[base]["tok_per_s"] if base in rows else None
            same = {}

            def eq(a, b):
                return read_lines(os.path.join(self.out, rows[a]["tokens_file"])) == \
                    read_lines(os.path.join(self.out, rows[b]["tokens_file"]))
            for a_, b_ in (("nzp-fp32-raw", "pytorch-fp32"), ("nzp-lossless-c0", "nzp-lossless-full")):
                if a_ in rows and b_ in rows:
                    same["%s == %s" % (a_, b_)] = eq(a_, b_)
            table[cfg["name"]] = dict(label=cfg["label"], args=" ".join(cfg["args"]), rows=rows, identical=same)
        self.meta["loadavg_end"] = os.getloadavg()
        doc = dict(meta=self.meta, packs=self.packs, repeat=o.bench_repeat, results=table)
        with open(os.path.join(self.out, "bench.json"), "w") as f:
            json.dump(doc, f, indent=1)
        md = self.bench_md(table, n)
        with open(os.path.join(self.out, "bench.md"), "w") as f:
            f.write(md)
        log("\n" + md)
        log("wrote %s/bench.md, bench.json" % self.out)

    def bench_md(self, table, n):
        o, me = self.o, self.meta
        L = ["# Throughput and peak RSS of `nzp translate` vs PyTorch", "",
             "%d lines of `%s`; model `%s`; every system with %d thread(s) and batch %d; best of %d run(s); "
             "host %d CPUs, load average %.2f at the start and %.2f at the end; git %s, %s." % (
                 n, me["src"], me["model_dir"], o.threads, o.batch, o.bench_repeat, me["host_cpus"],
                 me["loadavg_start"][0], me["loadavg_end"][0], me["git"], me["date"]), "",
             "Decode time excludes start-up (nzp: the same command on empty input; PyTorch: import + model load). "
             "Output tokens exclude bos/eos. Peak RSS: the child's ru_maxrss (os.wait4).", ""]
        for name, t in table.items():
            L += ["## %s (`%s`)" % (t["label"], t["args"]), "",
                  "| system | sent/s | tok/s | × PyTorch fp32 | × nzp fp32 raw | decode s | start-up s | peak RSS |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
            ratio = lambda x: "%.2f" % x if x is not None else "–"  # noqa: E731
            for r in t["rows"].values():
                L.append("| %s | %.1f | %.0f | %s | %s | %.2f | %.2f | %s |" % (
                    r["label"], r["sent_per_s"], r["tok_per_s"], ratio(r["sent_ratio_vs_pytorch-fp32"]),
                    ratio(r["sent_ratio_vs_nzp-fp32-raw"]), r["decode_s"], r["startup_s"],
                    fmt_bytes(r["peak_rss"])))
            L += ["", "Identical outputs: " + ", ".join("%s: %s" % (k, "yes" if v else "NO")
                                                          for k, v in t["identical"].items()), ""]
        L += [self.packs_md(["fp32-raw", "lossless", "lossy-3"]),
              "", "Full cache = %s (2 × fp32-decoded weights + 16 MiB)." % fmt_bytes(self.full_cache("lossless"))]
        return "\n".join(L) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--torch-worker"]:
        return torch_worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="fairseq CMLM / multi-task-nat checkpoint (.pt)")
    g.add_argument("--model-dir", help="converted model directory (fp32)")
    p.add_argument("--spm", help="spm.model for --checkpoint (default: next to the checkpoint)")
    p.add_argument("--dict", help="dict.txt for --checkpoint (default: next to the checkpoint)")
    p.add_argument("--src", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--nzp", default=os.path.join(REPO, "build", "nzp"))
    p.add_argument("--limit", type=int, default=0, help="first N lines only (0: all)")
    p.add_argument("--bleu", action="store_true")
    p.add_argument("--bench", action="store_true")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=16, help="sentences per batch, nzp and PyTorch (default 16)")
    p.add_argument("--max-len", type=int, default=0, help="nzp translate --max-len (default: none)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help="BLEU decoding configurations (default: %(default)s)")
    p.add_argument("--bleu-modes", default="lossless,lossy-3,lossy-1",
                   help="BLEU weight modes: fp32-raw, lossless, lossy-K (default: %(default)s)")
    p.add_argument("--bleu-cache", default="full", help="--cache of the BLEU runs: full or bytes (default full)")
    p.add_argument("--parity-configs", default="nat-i10-b5-rerank,nat-i1-b1,at-greedy")
    p.add_argument("--parity-modes", default="lossless")
    p.add_argument("--parity-lines", type=int, default=50)
    p.add_argument("--parity-threads", type=int, default=1,
                   help="torch threads of the parity reference runs (default 1; not timed)")
    p.add_argument("--bench-configs", default="nat-i4-b3,at-greedy")
    p.add_argument("--bench-repeat", type=int, default=1)
    p.add_argument("--bench-systems", default="pytorch-fp32,nzp-fp32-raw,nzp-lossless-c0,nzp-lossless-full,"
                   "nzp-lossy-3-c0",
                   help="which systems the bench runs (comma list; default all but nzp-lossless-rans-c0)")
    p.add_argument("--torch-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of the PyTorch child (repeatable), e.g. OMP_WAIT_POLICY=PASSIVE")
    o = p.parse_args(argv)
    if not (o.bleu or o.bench):
        p.error("nothing to do: give --bleu and/or --bench")
    if min(o.threads, o.batch, o.bench_repeat, o.parity_threads) < 1:
        p.error("--threads, --batch, --bench-repeat and --parity-threads must be >= 1")
    for c in (o.configs + "," + o.parity_configs + "," + o.bench_configs).split(","):
        if c:
            parse_config(c)
    for m in (o.bleu_modes + "," + o.parity_modes).split(","):
        if m:
            pack_args(m)
    e = Evaluation(o)
    t0 = time.perf_counter()
    e.prepare()
    if o.bleu:
        e.bleu()
    if o.bench:
        e.bench()
    log("done in %.0f s" % (time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
