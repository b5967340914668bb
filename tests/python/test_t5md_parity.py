"""Token parity of the C dialogue model (models/nz_t5md.c, driven by
tests/t5md_runner.c) with the PyTorch reference models/train/t5md_ref.py.

For each configuration of CONFIGS (adapter and transformer variants, relu and
gated-gelu, tied and untied heads, K = 1 and 3, d_model == and != num_heads x
d_kv, a plain T5 written as K = 1 with zero adapters) a random-weight
t5md_ref.T5MultiDecoder is built (T5 init, adapters and decoder copies
scrambled, decoder matrices and the eos output row scaled so that responses
vary and end at different lengths), written with t5md_ref.save_model_dir,
packed with $NZP (PACK_ARGS: every tensor through the codec, several tiles)
in the modes

    lossless  fp32, bit-exact: the reference runs on the original weights
              (checked equal to what `nzp unpack --model-dir` gives back)
    bf16      rounded to bf16: the reference runs on the unpacked weights
    lossy-3   3 mantissa bits: the reference runs on the unpacked weights

and decoded by $T5MD_RUNNER. Compared with t5md_ref.greedy / beam / sample:
greedy with every decoder batched, with decoders reordered and repeated, and
each decoder alone; beam search (beam 1 == greedy, beam 3 and 4, length
penalties 0.5 / 1 / 2, early stopping, several returns); sampling (several
seeds, temperatures, top-k, top-p, per-context seeds, temperature 0 and
top-k 1 == greedy); batches of 1 to 3 contexts; tile cache budgets 0 and
full, 1 and 2 threads. Tokens must be equal, finished flags equal, token
log-probs, means and beam scores within ATOL, sums within ATOL per token, and the runner's
ranking equal to t5md_ref.rank (where the keys are not within ATOL of each
other). no_repeat_ngram (HF no_repeat_ngram_size) 1, 2 and 3 is compared the
same way for greedy, beam and sampling on every configuration (and
t5md_ref.banned_ngram_tokens against the definition on hand-made and random
sequences). Further tests: the streaming hook, the stop hook, per-line errors,
refused configurations, and text contexts through the embedded
SentencePiece model (join_context with a separator, turn and length
truncation, and the joined-text form; Tokenizer.decode).

NZ_TEST_QUICK=1 keeps the lossless mode, three configurations and a reduced
set of decoding options.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "models", "train"))

try:
    import torch

    import t5md_ref as R

    torch.set_num_threads(1)
except ImportError as e:  # pragma: no cover - CI installs python3-torch
    torch = None
    TORCH_ERROR = str(e)

ATOL = 1e-4
V = 64
MNT = 16  # max_new_tokens of the parity runs
PACK_ARGS = ["--raw-below", "0", "--tile-rows", "16"]

SMALL = dict(vocab_size=V, relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0)
CONFIGS = {
    "adapter-relu-tied-k3": dict(multidecoder="adapter", feed_forward_proj="relu", tie_word_embeddings=True,
                                 num_modes=3, d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=2,
                                 num_decoder_layers=2, adapter_hidden_size=16, **SMALL),
    # d_model 24 != 4 x 8, default buckets (32, 128)
    "transformer-gated-untied-k3": dict(multidecoder="transformer", feed_forward_proj="gated-gelu",
                                        tie_word_embeddings=False, num_modes=3, d_model=24, num_heads=4, d_kv=8,
                                        d_ff=40, num_layers=1, num_decoder_layers=2, vocab_size=V,
                                        dropout_rate=0.0),
    # d_model 32 != 2 x 12
    "adapter-gated-untied-k1": dict(multidecoder="adapter", feed_forward_proj="gated-gelu",
                                    tie_word_embeddings=False, num_modes=1, d_model=32, num_heads=2, d_kv=12,
                                    d_ff=48, num_layers=2, num_decoder_layers=1, adapter_hidden_size=8, **SMALL),
    "transformer-relu-tied-k1": dict(multidecoder="transformer", feed_forward_proj="relu", tie_word_embeddings=True,
                                     num_modes=1, d_model=16, num_heads=2, d_kv=8, d_ff=32, num_layers=1,
                                     num_decoder_layers=1, **SMALL),
    # a plain T5: save_model_dir writes it as adapter K = 1 with zero adapters
    "plain-relu-untied": dict(multidecoder="none", feed_forward_proj="relu", tie_word_embeddings=False,
                              d_model=32, num_heads=4, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=2,
                              adapter_hidden_size=8, **SMALL),
}

MODES = {
    "lossless": ["--mode", "lossless"],
    "bf16": ["--mode", "bf16"],
    "lossy-3": ["--mode", "lossy-3"],
}


def quick():
    q = os.environ.get("NZ_TEST_QUICK", "")
    return (q not in ("", "0")) or bool(os.environ.get("NZP_REAL"))


ACTIVE_MODES = ["lossless"] if quick() else list(MODES)
ACTIVE_CONFIGS = ["adapter-relu-tied-k3", "transformer-gated-untied-k3", "adapter-gated-untied-k1"] if quick() \
    else list(CONFIGS)

# tile-cache / thread variants the runs cycle through (everything cached; decode on every use; 2 threads)
VARIANTS = [["--cache", str(64 << 20)], ["--cache", "0"], ["--cache", str(64 << 20), "--threads", "2"]]


def require_torch():
    if torch is None:
        pytest.fail(f"PyTorch is required ({TORCH_ERROR}); install python3-torch")


@pytest.fixture(scope="session")
def t5md_runner():
    path = os.environ.get("T5MD_RUNNER", os.path.join(REPO, "build", "t5md_runner"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"t5md runner not found at {path}: build build/t5md_runner first")
    return path


def run(cmd, stdin=None, check=True):
    p = subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True, text=True, encoding="utf-8",
                       timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


# ------------------------------------------------------------------ models


def build_model(name, seed=None):
    """A random T5MultiDecoder for CONFIGS[name] whose responses vary: adapters
    and the transformer copies scrambled, decoder matrices scaled by 1.5 (a random T5
    decoder otherwise repeats one token), the eos output row pushed up so that
    some responses end early."""
    cfg = dict(CONFIGS[name])
    seed = sum(map(ord, name)) if seed is None else seed
    m = R.T5MultiDecoder(R.make_config(cfg))
    R.init_weights(m, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if ".adapters." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                continue
            if n.startswith("decoders.") and "embed_tokens" not in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2 * p.std())
            if n.startswith("decoder") and p.dim() == 2 and "relative_attention_bias" not in n \
                    and "embed_tokens" not in n:
                p.mul_(1.5)
        head = m.lm_head.weight if hasattr(m, "lm_head") else m.shared.weight
        d = m.config["d_model"]
        head[R.EOS] += 3.0 * head[R.EOS] / head[R.EOS].norm() * (d ** 0.5 if not hasattr(m, "lm_head") else 1.0)
    return m.eval()


_CACHE = {}


def packed(nzp, name, mode, tmp_path_factory):
    """(model.nzp, reference model on exactly the weights it holds), cached per session."""
    key = (name, mode)
    if key in _CACHE:
        return _CACHE[key]
    model = build_model(name)
    work = tmp_path_factory.mktemp(f"t5md-{name}-{mode}")
    mdir = work / "model"
    R.save_model_dir(model, str(mdir))
    nzpath = work / f"{mode}.nzp"
    run([nzp, "pack", *MODES[mode], *PACK_ARGS, mdir, nzpath])
    back = work / "unpacked"
    run([nzp, "unpack", "--model-dir", nzpath, back])
    ref, _ = R.load_model_dir(str(back))
    orig, _ = R.load_model_dir(str(mdir))
    same = [torch.equal(a, b) for a, b in zip(ref.state_dict().values(), orig.state_dict().values())]
    if mode == "lossless":
        assert all(same), "lossless unpack changed a weight"
        ref = orig
    else:
        assert not all(same), f"{mode} changed no weight"
    _CACHE[key] = (nzpath, ref)
    return _CACHE[key]


def sources(seed, n=5):
    """Contexts [ids.., eos] of 0..11 ids (one is [eos] alone, one holds a 0 inside)."""
    g = np.random.RandomState(seed)
    out = [[R.EOS]]
    for i in range(n - 1):
        k = int(g.randint(1, 12))
        s = [int(x) for x in g.randint(3, V, size=k)]
        if i == 1:
            s[len(s) // 2] = 0  # the pad id inside a source is an ordinary token (masking is by length)
        out.append(s + [R.EOS])
    return out


# ------------------------------------------------------------------ runner output


def runner_out(runner, nzpath, srcs, extra, batch, text=False):
    """{"out": {line: [entries in output order]}, "rank": {line: [k..]}, "consensus": {line: [(k, c)..]},
    "error": [(line, k, msg)], "tok": [(line, k, pos, id, lp)], "ctx": {line: ids}}"""
    if text:
        stdin = "".join("\t".join(s) + "\n" for s in srcs)
    else:
        stdin = "".join(" ".join(map(str, s)) + "\n" for s in srcs)
    p = run([runner, nzpath, "--batch", batch, *extra], stdin)
    res = {"out": {}, "rank": {}, "consensus": {}, "pooled": {}, "error": [], "tok": [], "ctx": {}}
    for ln in p.stdout.splitlines():
        f = ln.split("\t")
        if f[0] == "out":
            e = dict(decoder=int(f[2]), ret=int(f[3]), tokens=[int(x) for x in f[4].split()], mean=float(f[5]),
                     sum=float(f[6]), beam_score=float(f[7]), finished=bool(int(f[8])),
                     lps=[float(x) for x in f[9].split()])
            if len(f) > 10:
                e["text"] = f[10]
            res["out"].setdefault(int(f[1]), []).append(e)
        elif f[0] == "rank":
            res["rank"][int(f[1])] = [int(x) for x in f[2].split()]
        elif f[0] == "consensus":
            res["consensus"][int(f[1])] = [(int(x.split(":")[0]), float(x.split(":")[1])) for x in f[2].split()]
        elif f[0] == "pooled":
            res["pooled"][int(f[1])] = [tuple(t(v) for t, v in zip((int, int, float), x.split(":")))
                                        for x in f[2].split()]
        elif f[0] == "error":
            res["error"].append((int(f[1]), f[2], f[3]))
        elif f[0] == "tok":
            res["tok"].append((int(f[1]), int(f[2]), int(f[3]), int(f[4]), float(f[5])))
        elif f[0] == "ctx":
            res["ctx"][int(f[1])] = [int(x) for x in f[2].split()]
        else:
            raise AssertionError(f"unexpected runner line {ln!r}")
    return res


STATS = {"cases": 0, "results": 0, "max_lp_diff": 0.0}


@pytest.fixture(scope="module", autouse=True)
def dump_stats():
    """T5MD_STATS=FILE: write the comparison counts and the largest log-prob difference there."""
    yield
    if os.environ.get("T5MD_STATS"):
        with open(os.environ["T5MD_STATS"], "w") as f:
            json.dump(STATS, f)


def compare(got, want, label, beam=False):
    """got: runner entries of one context (output order); want: reference results
    (flattened in the same order: decoders, then beam returns)."""
    assert len(got) == len(want), f"{label}: {len(got)} results, reference {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        where = f"{label} result {i} (decoder {w['decoder']})"
        assert g["decoder"] == w["decoder"], where
        assert g["tokens"] == w["tokens"], f"{where}: engine {g['tokens']} != torch {w['tokens']}"
        assert g["finished"] == w["finished"], where
        # per token within ATOL; the sum of n tokens within n * ATOL (the token differences add up: a trained
        # model's sharper logits give a few 1e-5 per token in fp32), the mean within ATOL
        d = max([abs(a - float(b)) for a, b in zip(g["lps"], w["token_logprobs"])] +
                [abs(g["sum"] - w["sum_logprob"]) / max(1, len(g["lps"])), abs(g["mean"] - w["mean_logprob"])])
        if beam:
            d = max(d, abs(g["beam_score"] - w["beam_score"]))
        else:
            assert np.isnan(g["beam_score"]), where
        assert len(g["lps"]) == len(w["token_logprobs"]), where
        assert d <= ATOL, f"{where}: log-prob difference {d}: {g} vs {w}"
        STATS["max_lp_diff"] = max(STATS["max_lp_diff"], d)
        STATS["results"] += 1
    STATS["cases"] += 1


def check_rank(rank, row, key, label):
    """The runner's ranking == t5md_ref.rank where the keys are clearly apart."""
    want = [r["decoder"] for r in R.rank(row, key=key)]
    keys = sorted((r[key] for r in row), reverse=True)
    if all(a - b > 10 * ATOL for a, b in zip(keys, keys[1:])):
        assert rank == want, f"{label}: rank {rank} != torch {want}"


def check_consensus(got, best, label):
    """The runner's consensus ranking and values (nz_t5md_consensus / NZ_T5MD_RANK_CONSENSUS) == t5md_ref's
    rank(key="consensus") on the engine's own best returns `best` (one per decoder): the same float64
    arithmetic, so the values are equal to the last bit and the order exactly."""
    want = R.rank([dict(r, mean_logprob=r["mean"]) for r in best], key="consensus")
    assert [k for k, _ in got] == [r["decoder"] for r in want], f"{label}: {got} != {want}"
    assert [c for _, c in got] == [r["consensus"] for r in want], f"{label}: {got} != {want}"


def check_pooled(got, outs, label):
    """The runner's pooled line (nz_t5md_consensus_pool, ranked) == t5md_ref.consensus_pool and
    rank(key="consensus") on the engine's own returns `outs` (every decoder's, in output order): each
    decoder's chosen return and its consensus to the last bit, the order exactly."""
    per_dec = {}
    for r in outs:
        per_dec.setdefault(r["decoder"], []).append(dict(r, mean_logprob=r["mean"]))
    want = R.rank(R.consensus_pool(list(per_dec.values())), key="consensus")
    assert got == [(r["decoder"], r["ret"], r["consensus"]) for r in want], f"{label}: {got} != {want}"


def greedy_cases(K):
    """(decoders, batch, max_new_tokens): all batched, reordered with a repeat, each alone."""
    cases = [(None, 3, MNT), ([2, 0, 2] if K == 3 else [0, 0], 2, MNT)]
    cases += [([k], 1, MNT) for k in range(K)]
    if not quick():
        cases += [(None, 2, 1), (None, 3, 0)]
    return cases


# (beam, lenpen, early_stopping, num_return, batch, decoders)
FULL_BEAM = [(1, 1.0, False, 1, 3, None), (3, 1.0, False, 2, 3, None), (3, 0.5, True, 1, 2, None),
             (4, 2.0, False, 3, 1, None), (3, 1.0, False, 1, 1, "last")]
QUICK_BEAM = [(1, 1.0, False, 1, 3, None), (3, 1.0, False, 2, 3, None), (3, 0.5, True, 1, 2, "last")]
BEAM = QUICK_BEAM if quick() else FULL_BEAM

# (temperature, top_k, top_p, seed, seed_per_line, batch, decoders): "last" = the last decoder alone
# (its stream is seeded from its k, not from its place in the request)
FULL_SAMPLE = [(1.0, 0, 1.0, 0, False, 3, None), (0.7, 10, 1.0, 1, False, 2, None),
               (1.3, 0, 0.8, 2, True, 3, None), (1.0, 5, 0.9, 12345678901234567, False, 1, None),
               (0.0, 0, 1.0, 5, False, 3, None), (1.0, 1, 1.0, 3, False, 2, None), (2.0, 0, 0.5, 9, False, 3, None),
               (1.0, 0, 1.0, 0, False, 2, "last")]
QUICK_SAMPLE = [(1.0, 0, 1.0, 0, False, 3, None), (1.3, 5, 0.8, 2, True, 2, "last"),
                (0.0, 0, 1.0, 5, False, 1, None)]
SAMPLE = QUICK_SAMPLE if quick() else FULL_SAMPLE


@pytest.mark.parametrize("mode", ACTIVE_MODES)
@pytest.mark.parametrize("name", ACTIVE_CONFIGS)
def test_parity(nzp, t5md_runner, tmp_path_factory, name, mode):
    require_torch()
    nzpath, ref = packed(nzp, name, mode, tmp_path_factory)
    K = ref.num_modes
    srcs = sources(sum(map(ord, name)) + len(mode))
    seen, lengths, finished = set(), set(), set()
    vi = 0

    def variant():
        nonlocal vi
        vi += 1
        return VARIANTS[vi % len(VARIANTS)]

    # greedy (the reference batched over every decoder; rows are independent)
    g_all = R.greedy(ref, srcs, max_new_tokens=MNT)
    for decs, batch, mnt in greedy_cases(K):
        want_rows = g_all if mnt == MNT else R.greedy(ref, srcs, max_new_tokens=mnt)
        opt = ["--decoders", ",".join(map(str, decs))] if decs else []
        out = runner_out(t5md_runner, nzpath, srcs, ["--greedy", "--max-new-tokens", mnt, *opt, *variant()], batch)
        assert not out["error"], out["error"]
        for b in range(len(srcs)):
            want = [want_rows[b][k] for k in (decs or range(K))]
            compare(out["out"][b], want, f"{name} [{mode}] greedy decoders {decs} batch {batch} mnt {mnt} ctx {b}")
            if decs is None:
                check_rank(out["rank"][b], want, "mean_logprob", f"{name} [{mode}] greedy rank ctx {b}")
                check_consensus(out["consensus"][b], out["out"][b], f"{name} [{mode}] greedy consensus ctx {b}")
            for w in want:
                seen.add(tuple(w["tokens"]))
                lengths.add(len(w["tokens"]))
                finished.add(w["finished"])

    # beam search
    for beam, lenpen, early, nret, batch, decs in BEAM:
        decs = [K - 1] if decs == "last" else None
        want = R.beam(ref, srcs, decs, beam_size=beam, max_new_tokens=MNT, length_penalty=lenpen,
                      num_return=nret, early_stopping=early)
        opt = ["--beam", beam, "--lenpen", lenpen, "--num-return", nret] + (["--early-stopping"] if early else [])
        opt += ["--decoders", ",".join(map(str, decs))] if decs else []
        out = runner_out(t5md_runner, nzpath, srcs, [*opt, "--max-new-tokens", MNT, *variant()], batch)
        assert not out["error"], out["error"]
        label = f"{name} [{mode}] beam {beam} lenpen {lenpen} early {early} return {nret} decoders {decs}"
        for b in range(len(srcs)):
            flat = [r for per_dec in want[b] for r in per_dec]
            compare(out["out"][b], flat, f"{label} ctx {b}", beam=True)
            check_rank(out["rank"][b], [per_dec[0] for per_dec in want[b]], "beam_score", f"{label} rank ctx {b}")
            check_consensus(out["consensus"][b], [r for r in out["out"][b] if r["ret"] == 0], f"{label} consensus ctx {b}")
            if nret > 1:
                check_pooled(out["pooled"][b], out["out"][b], f"{label} pooled ctx {b}")
            else:
                assert b not in out["pooled"], label
            if beam == 1:  # beam 1 gives greedy's tokens
                assert [r["tokens"] for r in flat] == [r["tokens"] for r in g_all[b]], f"{label} ctx {b}"
            for r in flat:
                seen.add(tuple(r["tokens"]))
                lengths.add(len(r["tokens"]))
                finished.add(r["finished"])

    # sampling
    for temp, top_k, top_p, seed, per_line, batch, decs in SAMPLE:
        decs = [K - 1] if decs == "last" else None
        seeds = [seed + i for i in range(len(srcs))] if per_line else seed
        want = R.sample(ref, srcs, decs, temperature=temp, top_k=top_k, top_p=top_p, seed=seeds,
                        max_new_tokens=MNT)
        opt = ["--sample", "--temperature", temp, "--top-k", top_k, "--top-p", top_p, "--seed", seed]
        opt += ["--seed-per-line"] if per_line else []
        opt += ["--decoders", ",".join(map(str, decs))] if decs else []
        out = runner_out(t5md_runner, nzpath, srcs, [*opt, "--max-new-tokens", MNT, *variant()], batch)
        assert not out["error"], out["error"]
        label = f"{name} [{mode}] sample T {temp} top_k {top_k} top_p {top_p} seed {seed} per-line {per_line} " \
                f"decoders {decs}"
        for b in range(len(srcs)):
            compare(out["out"][b], want[b], f"{label} ctx {b}")
            if (temp == 0 or top_k == 1) and decs is None:  # no draw: greedy
                assert [r["tokens"] for r in want[b]] == [r["tokens"] for r in g_all[b]], f"{label} ctx {b}"
            for r in want[b]:
                seen.add(tuple(r["tokens"]))
                lengths.add(len(r["tokens"]))
                finished.add(r["finished"])

    # the random model is not degenerate: varied responses and lengths, some end with eos
    assert len(seen) >= 6 and len(lengths) >= 3 and finished == {True, False}, (len(seen), lengths, finished)


def test_edges(nzp, t5md_runner, tmp_path_factory):
    """Beams wider than half the vocabulary (rows with fewer than 2 x beam
    candidates), beam search with max_new_tokens 0 (the reference still takes
    one step) and 1, length penalty 0, unk allowed, and a batch of one context
    with every decoder."""
    require_torch()
    nzpath, ref = packed(nzp, "transformer-gated-untied-k3", ACTIVE_MODES[0], tmp_path_factory)
    srcs = sources(3)
    for beam, mnt, nret, lenpen, early, unk in [(33, 6, 5, 1.0, False, False), (2, 0, 2, 1.0, False, False),
                                                (3, 1, 3, 1.0, True, False), (5, 12, 5, 0.0, False, False),
                                                (3, 10, 1, 1.0, False, True)]:
        want = R.beam(ref, srcs, beam_size=beam, max_new_tokens=mnt, num_return=nret, length_penalty=lenpen,
                      early_stopping=early, ban_unk=not unk)
        opt = ["--beam", beam, "--max-new-tokens", mnt, "--num-return", nret, "--lenpen", lenpen]
        opt += (["--early-stopping"] if early else []) + (["--allow-unk"] if unk else [])
        out = runner_out(t5md_runner, nzpath, srcs, opt, len(srcs))
        for b in range(len(srcs)):
            compare(out["out"][b], [r for d in want[b] for r in d], f"edges {opt} ctx {b}", beam=True)
    want = R.greedy(ref, srcs, max_new_tokens=10, ban_unk=False)
    out = runner_out(t5md_runner, nzpath, srcs, ["--max-new-tokens", 10, "--allow-unk"], 1)
    for b in range(len(srcs)):
        compare(out["out"][b], want[b], f"edges greedy allow-unk ctx {b}")


def test_stream_and_stop(nzp, t5md_runner, tmp_path_factory):
    """The streaming hook delivers every result token once (greedy / sampling: as
    generated; beam: the best hypothesis once settled); the stop hook cancels
    the whole batch with NZ_E_CANCELLED."""
    require_torch()
    nzpath, ref = packed(nzp, "adapter-relu-tied-k3", ACTIVE_MODES[0], tmp_path_factory)
    srcs = sources(7)
    for opt in (["--greedy"], ["--sample", "--top-p", "0.9", "--seed", "4"], ["--beam", "3", "--num-return", "2"]):
        out = runner_out(t5md_runner, nzpath, srcs, ["--stream", "--max-new-tokens", MNT, *opt], 2)
        assert not out["error"]
        streamed = {}
        for line, k, pos, tok, lp in out["tok"]:
            seq = streamed.setdefault((line, k), [])
            assert pos == len(seq), (opt, line, k, pos)
            seq.append((tok, lp))
        for line, entries in out["out"].items():
            for e in entries:
                if e["ret"]:
                    continue
                s = streamed[(line, e["decoder"])]
                assert [t for t, _ in s] == e["tokens"], (opt, line, e)
                assert all(abs(a - b) <= 1e-6 for (_, a), b in zip(s, e["lps"])), (opt, line, e)
        assert len(streamed) == len(srcs) * ref.num_modes
    for opt in (["--greedy"], ["--beam", "2"], ["--sample"]):
        for stop in (0, 1):
            p = run([t5md_runner, nzpath, "--stop-after", stop, "--batch", 2, *opt], "5 6 7 1\n8 9 1\n4 1\n")
            lines = p.stdout.splitlines()
            errs = [ln for ln in lines if ln.startswith("error")]
            assert len(errs) == 3 * ref.num_modes and all("cancelled" in ln for ln in errs), p.stdout
            assert not [ln for ln in lines if ln.startswith("out")], p.stdout


def test_bad_lines(nzp, t5md_runner, tmp_path_factory):
    """A context that cannot be decoded gets its error; the others in its batch go on."""
    require_torch()
    nzpath, ref = packed(nzp, "transformer-gated-untied-k3", ACTIVE_MODES[0], tmp_path_factory)
    good = sources(11, 4)[1:]
    stdin = [" ".join(map(str, good[0])), f"5 {V} 1", " ".join(map(str, good[1])), "", "4 x 1", "-3 1",
             " ".join(map(str, good[2]))]
    want = R.greedy(ref, good, max_new_tokens=MNT)
    for batch in (1, 3):
        p = run([t5md_runner, nzpath, "--batch", batch, "--max-new-tokens", MNT], "\n".join(stdin) + "\n")
        errs = {}
        for ln in p.stdout.splitlines():
            f = ln.split("\t")
            if f[0] == "error":
                errs.setdefault(int(f[1]), []).append(f[3])
        assert sorted(errs) == [1, 3, 4, 5], p.stdout
        assert all(f"id {V} at position 1" in m and "vocabulary" in m for m in errs[1]) and len(errs[1]) == 3
        assert all("empty source" in m for m in errs[3])
        assert errs[4] == ["line 5: bad token 'x'"]
        assert all("id -3 at position 0" in m for m in errs[5])
        got = {}
        for ln in p.stdout.splitlines():
            f = ln.split("\t")
            if f[0] == "out":
                got.setdefault(int(f[1]), []).append([int(x) for x in f[4].split()])
        for i, line in ((0, 0), (1, 2), (2, 6)):
            assert got[line] == [r["tokens"] for r in want[i]], (batch, line)
    # options out of range are refused for the whole batch
    for opt, msg in ((["--decoders", "3"], "decoder 3 is out of range"),
                     (["--beam", "2", "--num-return", "3"], "num_return 3"),
                     (["--max-new-tokens", "70000"], "max_new_tokens 70000"),
                     (["--no-repeat-ngram", "70000"], "no_repeat_ngram 70000 is outside [0, 65536]")):
        p = run([t5md_runner, nzpath, *opt], "5 6 1\n")
        assert p.stdout.startswith("error") and msg in p.stdout, (opt, p.stdout)


# ------------------------------------------------------------------ no_repeat_ngram


def repeats_ngram(tokens, n):
    """[start] + tokens holds some n-gram twice."""
    seq = [R.DECODER_START] + list(tokens)
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return len(grams) != len(set(grams))


def naive_banned(seq, n):
    """The definition, written out: t is banned when seq[cur_len-n+1:] + [t] == seq[s:s+n] for an s."""
    cur_len = len(seq)
    if n == 0 or cur_len + 1 < n:
        return set()
    tail = list(seq[cur_len - n + 1:])
    return {seq[s + n - 1] for s in range(cur_len - n + 1) if list(seq[s:s + n - 1]) == tail}


def test_banned_ngram_tokens():
    require_torch()
    b = R.banned_ngram_tokens
    assert b([0], 1) == {0}  # n = 1: the start token (pad) itself is banned
    assert b([0, 5, 6, 5], 1) == {0, 5, 6}
    assert b([0, 5, 6, 5], 2) == {6}  # (5, 6) seen: after 5 comes no 6 again
    assert b([0, 5, 6, 7], 2) == set()
    assert b([0], 2) == set()  # cur_len + 1 == n: no complete bigram yet
    assert b([0, 0], 2) == {0}  # (0, 0) seen
    assert b([0, 5, 0], 2) == {5}  # the start token takes part in the n-grams
    assert b([0], 3) == set() and b([0, 5], 4) == set()  # cur_len + 1 < n: nothing
    assert b([0, 5], 3) == set()
    assert b([0, 5, 6, 7, 5, 6], 3) == {7}
    assert b([0, 5, 6, 7, 5, 6, 8, 5, 6], 3) == {7, 8}
    assert b([0, 5, 5, 5], 3) == {5}
    assert b([0, 5, 6, 5, 6], 0) == set()  # off
    g = np.random.RandomState(1)
    for _ in range(400):
        seq = [0] + [int(x) for x in g.randint(0, 4, size=g.randint(0, 12))]
        for n in range(0, 6):
            assert b(seq, n) == naive_banned(seq, n), (seq, n)


# (strategy options, no_repeat_ngram, batch, decoders): "last" = the last decoder alone
NGRAM_CASES = [(["--greedy"], 1, 3, None), (["--greedy"], 2, 3, None), (["--greedy"], 3, 2, None),
               (["--greedy"], 2, 1, "last"), (["--greedy"], 3, 1, "last"),
               (["--beam", 3, "--num-return", 2], 2, 3, None), (["--beam", 4], 3, 2, None),
               (["--beam", 3, "--num-return", 3, "--lenpen", 0.5], 1, 1, "last"),
               (["--sample", "--seed", 4, "--top-k", 10, "--top-p", 0.9], 2, 3, None),
               (["--sample", "--seed", 11, "--temperature", 1.3], 3, 2, "last"),
               (["--sample", "--seed", 7], 1, 3, None)]


def _ngram_ref(ref, srcs, opt, n, decs):
    """t5md_ref's results (out[b] flattened in the runner's order) for runner options opt."""
    kw = dict(max_new_tokens=MNT, no_repeat_ngram=n)
    if opt[0] == "--greedy":
        return R.greedy(ref, srcs, decs, **kw), False
    a = dict(zip(opt[1::2], opt[2::2])) if opt[0] == "--sample" else dict(zip(opt[::2], opt[1::2]))
    if opt[0] == "--beam":
        out = R.beam(ref, srcs, decs, beam_size=a["--beam"], num_return=a.get("--num-return", 1),
                     length_penalty=a.get("--lenpen", 1.0), **kw)
        return [[r for d in row for r in d] for row in out], True
    return R.sample(ref, srcs, decs, seed=a["--seed"], top_k=a.get("--top-k", 0), top_p=a.get("--top-p", 1.0),
                    temperature=a.get("--temperature", 1.0), **kw), False


@pytest.mark.parametrize("name", ACTIVE_CONFIGS)
def test_no_repeat_ngram(nzp, t5md_runner, tmp_path_factory, name):
    """--no-repeat-ngram 1 / 2 / 3 (HF no_repeat_ngram_size) == t5md_ref(no_repeat_ngram=n) for greedy
    (every decoder batched, one decoder alone), beam (3 and 4 beams, several returns) and sampling;
    no returned response repeats an n-gram of [start] + tokens, and the option changes what the
    random model (which repeats itself) says."""
    require_torch()
    nzpath, ref = packed(nzp, name, ACTIVE_MODES[0], tmp_path_factory)
    K = ref.num_modes
    srcs = sources(sum(map(ord, name)) + 7)
    plain = R.greedy(ref, srcs, max_new_tokens=MNT)
    assert any(repeats_ngram(r["tokens"], 2) for row in plain for r in row), "the model never repeats a bigram"
    changed = set()
    for i, (opt, n, batch, decs) in enumerate(NGRAM_CASES):
        decs = [K - 1] if decs == "last" else None
        want, beam = _ngram_ref(ref, srcs, opt, n, decs)
        extra = ["--decoders", ",".join(map(str, decs))] if decs else []
        out = runner_out(t5md_runner, nzpath, srcs, [*opt, "--no-repeat-ngram", n, "--max-new-tokens", MNT, *extra,
                                                     *VARIANTS[i % len(VARIANTS)]], batch)
        assert not out["error"], out["error"]
        label = f"{name} no_repeat_ngram {n} {opt} decoders {decs}"
        for b in range(len(srcs)):
            compare(out["out"][b], want[b], f"{label} ctx {b}", beam=beam)
            for r in want[b]:
                assert not repeats_ngram(r["tokens"], n), (label, b, r["tokens"])
            if opt[0] == "--greedy" and decs is None:
                changed |= {(n, b) for r, p in zip(want[b], plain[b]) if r["tokens"] != p["tokens"]}
    # greedy with n = 2 and n = 3 answers differently from plain greedy
    assert {n for n, _ in changed} >= {2, 3}, changed


def test_refused_configs(nzp, t5md_runner, tmp_path):
    """Configurations and tensor sets the engine does not take are refused at load, naming the key or tensor."""
    require_torch()
    model = build_model("adapter-relu-tied-k3")
    mdir = tmp_path / "m"
    R.save_model_dir(model, str(mdir))
    base = json.loads((mdir / "config.json").read_text())
    cases = [({"architecture": "t5"}, "\"t5_multidecoder\""),
             ({"model_type": "bart"}, "'model_type' is \"bart\""),
             ({"multidecoder": "mixture"}, "'multidecoder' is \"mixture\""),
             ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj \"gated-silu\""),
             ({"feed_forward_proj": "gated-gelu"}, "'encoder.block.0.layer.1.DenseReluDense.wi_0.weight'"),
             ({"num_layers": 3}, "'encoder.block.2.layer.0.SelfAttention.q.weight'"),
             ({"num_layers": 1}, "tensor 'encoder.block.1.layer.0.SelfAttention.q.weight' is not part"),
             ({"num_decoder_layers": 1}, "tensor 'decoder.block.1.layer.0.SelfAttention.q.weight' is not part"),
             ({"num_modes": 2}, "'decoder.block.0.layer.0.adapters.2.o2i.weight' is not part"),
             ({"num_modes": 4}, "'decoder.block.0.layer.0.adapters.3.o2i.weight'"),
             ({"multidecoder": "transformer"}, "'decoders.0.block.0.layer.0.SelfAttention.q.weight'"),
             ({"tie_word_embeddings": False}, "'lm_head.weight'"),
             ({"d_kv": 4}, "num_heads 4 x d_kv 4 = 16"),
             ({"num_heads": 8, "d_kv": 4}, "relative_attention_bias.weight' must be [8 x 8]"),
             ({"relative_attention_num_buckets": 16}, "must be [16 x 4]"),
             ({"adapter_hidden_size": 8}, "adapter_hidden_size 8"),
             ({"d_ff": 10}, "d_ff 10"),
             ({"vocab_size": 65}, "'shared.weight' is [64 x 32]"),
             ({"pad_token_id": 3}, "'pad_token_id' must be 0"),
             ({"unk_token_id": 3}, "'unk_token_id' must be 2"),
             ({"decoder_start_token_id": 1}, "'decoder_start_token_id' must be 0"),
             ({"layer_norm_epsilon": -1}, "'layer_norm_epsilon'"),
             ({"max_source_length": -1}, "'max_source_length'"),
             ({"turn_separator": 5}, "'turn_separator' must be a string"),
             ({"tie_word_embeddings": "yes"}, "'tie_word_embeddings' must be true or false")]
    if quick():  # every pack runs under valgrind in `make valgrind`
        cases = cases[::2]
    for change, msg in cases:
        (mdir / "config.json").write_text(json.dumps(dict(base, **change)))
        out = tmp_path / "bad.nzp"
        run([nzp, "pack", "--mode", "raw", mdir, out])
        p = run([t5md_runner, out], "5 1\n", check=False)
        assert p.returncode == 1 and msg in p.stderr, (change, p.stderr)
    # an untied model's lm_head with tie_word_embeddings true
    m2 = build_model("adapter-gated-untied-k1")
    d2 = tmp_path / "m2"
    R.save_model_dir(m2, str(d2))
    c2 = json.loads((d2 / "config.json").read_text())
    (d2 / "config.json").write_text(json.dumps(dict(c2, tie_word_embeddings=True)))
    run([nzp, "pack", "--mode", "raw", d2, tmp_path / "bad2.nzp"])
    p = run([t5md_runner, tmp_path / "bad2.nzp"], "5 1\n", check=False)
    assert p.returncode == 1 and "tensor 'lm_head.weight' is not part" in p.stderr, p.stderr
    # text mode needs the embedded tokenizer
    (mdir / "config.json").write_text(json.dumps(base))
    run([nzp, "pack", "--mode", "raw", mdir, tmp_path / "nospm.nzp"])
    p = run([t5md_runner, tmp_path / "nospm.nzp", "--text"], "hello\n", check=False)
    assert p.returncode == 1 and "spm.model" in p.stderr, p.stderr


# ------------------------------------------------------------------ text contexts

WORDS = ("hello there how are you doing today i am fine thanks what about the weather it is nice "
         "and sunny do you like music yes a lot").split()


def train_spm(path):
    import sentencepiece as spm
    g = np.random.RandomState(3)
    lines = [" ".join(g.choice(WORDS, size=g.randint(3, 9))) for _ in range(300)]
    txt = path.parent / "spm-train.txt"
    txt.write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(input=str(txt), model_prefix=str(path.with_suffix("")), vocab_size=50,
                                   hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   control_symbols=[R.SEP_PIECE, R.MASK_PIECE], minloglevel=2, num_threads=1)
    return path


CONTEXTS = [
    ["hello there", "how are you doing today ?"],
    ["  i am fine\u00a0", "\u3000thanks , what about you", " the weather is nice  "],
    ["do you like music"],
    [""],
    ["yes", "", "a lot \x0b"],
    ["what about the weather today it is nice and sunny do you like it", "yes i like it a lot",
     "and music ? \u00e9t\u00e9"],
]


@pytest.mark.parametrize("sep,max_turns,max_src", [("<sep>", 2, 12), ("<sep>", 0, 0), ("", 0, 9)])
def test_text_contexts(nzp, t5md_runner, tmp_path, sep, max_turns, max_src):
    """--text: contexts through the embedded spm.model (join_context) and responses
    decoded to text (Tokenizer.decode), equal to the reference."""
    require_torch()
    spm_path = train_spm(tmp_path / "spm.model")
    model = build_model("adapter-relu-tied-k3", seed=5)
    mdir = tmp_path / "m"
    R.save_model_dir(model, str(mdir), spm_path=str(spm_path),
                     extra_config=dict(turn_separator=sep, max_context_turns=max_turns, max_source_length=max_src))
    nzpath = tmp_path / "m.nzp"
    run([nzp, "pack", "--mode", "lossless", *PACK_ARGS, mdir, nzpath])
    ref, cfg = R.load_model_dir(str(mdir))
    tok = R.load_tokenizer(str(mdir))
    ids = [tok.encode_context(c) for c in CONTEXTS]
    if max_src:
        assert max(len(x) for x in ids) == max_src  # truncation is exercised
    for extra in ([], ["--allow-unk", "--sample", "--temperature", "1.5", "--seed", "3"]):
        out = runner_out(t5md_runner, nzpath, CONTEXTS, ["--text", "--max-new-tokens", MNT, *extra], 2, text=True)
        assert not out["error"], out["error"]
        if extra:
            want = R.sample(ref, ids, temperature=1.5, seed=3, max_new_tokens=MNT, ban_unk=False)
        else:
            want = R.greedy(ref, ids, max_new_tokens=MNT)
        for b, c in enumerate(CONTEXTS):
            assert out["ctx"][b] == ids[b], (c, out["ctx"][b], ids[b])
            compare(out["out"][b], want[b], f"text {sep!r} {max_turns} {max_src} {extra} ctx {b}")
            for e, w in zip(out["out"][b], want[b]):
                assert e["text"] == tok.decode(w["tokens"]), (e, w)
