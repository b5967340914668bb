"""Token parity of the C translation model (models/nz_nat.c, driven by
tests/nat_runner.c) with the PyTorch reference models/train/nat_ref.py.

For each configuration of CONFIGS a random-weight nat_ref.NATModel is built
(weights rounded to bf16 values, so that every weight mode but lossy is exact;
layer norms and biases perturbed; embeddings scaled and the length classifier
shaped so that outputs vary and predicted lengths stay short), saved as a
fairseq-layout checkpoint and converted with models/convert/fairseq_cmlm.py
(so config.json and model.safetensors are exactly what the converter writes),
packed with $NZP (--raw-below 0 --tile-rows 16: every 2-D tensor goes through
the codec in several tiles) in the modes

    raw       fp32 safetensors, --mode raw
    lossless  bf16 safetensors, --mode lossless
    lossy-3   fp32 safetensors, --mode lossy-3; the reference then runs on the
              weights `nzp unpack` gives back (the lossy ones)

and decoded by $NAT_RUNNER. Compared with nat_ref.mask_predict for iterations
1 and 10, length beam 1 and 5, AT rerank on/off, adaptive on/off, batches of 1
and 3 sentences, with nat_ref.at_greedy, and with nat_ref.at_beam (beam 1 and
4, length penalty 1.0 and 0.5, batches of 1 and 3, on a variant of the model
whose eos embedding is scaled up so that hypotheses end at varied lengths, not
only at max_len): tokens and steps must be equal, scores within ATOL (the AT
greedy score is checked against a teacher-forced PyTorch pass). A last test feeds bad lines (empty, unknown id, too long) and
checks that they get "error: ..." lines while the others are still decoded.

NZ_TEST_QUICK=1 (or NZP_REAL, the valgrind run) keeps the lossless mode and
a reduced set of decoding options.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "models", "train"))
sys.path.insert(0, os.path.join(REPO, "models", "convert"))

try:
    import torch

    import fairseq_cmlm
    import nat_ref as R

    torch.set_num_threads(1)
except ImportError as e:  # pragma: no cover - CI installs python3-torch
    torch = None
    TORCH_ERROR = str(e)

ATOL = 1e-4
V = 64  # vocabulary (4 specials + 60 symbols)
PACK_ARGS = ["--raw-below", "0", "--tile-rows", "16"]

BASE = dict(encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_layers=2, encoder_attention_heads=4,
            decoder_layers=2, decoder_attention_heads=4, max_source_positions=24, max_target_positions=40,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)

CONFIGS = {
    # multi-task-nat's defaults: post-norm, learned positions, absolute length classes, AT decoder
    "postnorm-learned-relu-at": dict(encoder_learned_pos=True, decoder_learned_pos=True, at_decoder_layers=2),
    # pre-norm (final layer norms), sinusoidal positions, length offset, gelu, layernorm_embedding, AT decoder
    "prenorm-sinus-offset-gelu-at": dict(encoder_normalize_before=True, decoder_normalize_before=True,
                                         pred_length_offset=True, activation_fn="gelu", layernorm_embedding=True,
                                         at_decoder_layers=1, encoder_embed_dim=48, encoder_ffn_embed_dim=96,
                                         encoder_attention_heads=3, decoder_attention_heads=6),
    # plain cmlm_transformer: no AT decoder, sinusoidal encoder / learned decoder positions, offset
    "postnorm-mixed-offset-noat": dict(decoder_learned_pos=True, pred_length_offset=True, decoder_layers=3),
}

MODES = {
    "raw": ("fp32", ["--mode", "raw"]),
    "lossless": ("bf16", ["--mode", "lossless"]),
    "lossy-3": ("fp32", ["--mode", "lossy-3"]),
}


def quick():
    q = os.environ.get("NZ_TEST_QUICK", "")
    return (q not in ("", "0")) or bool(os.environ.get("NZP_REAL"))


ACTIVE_MODES = ["lossless"] if quick() else list(MODES)

# (max_iter, length_beam, adaptive, rerank, batch)
FULL_OPTIONS = [(it, b, ad, rr, k) for it in (1, 10) for b in (1, 5) for ad in (True, False)
                for rr in (False, True) for k in (1, 3)]
QUICK_OPTIONS = [(1, 1, True, False, 1), (10, 5, True, True, 3), (10, 1, False, False, 3), (1, 5, False, True, 1)]
OPTIONS = QUICK_OPTIONS if quick() else FULL_OPTIONS


def require_torch():
    if torch is None:
        pytest.fail(f"PyTorch is required ({TORCH_ERROR}); install python3-torch")


@pytest.fixture(scope="session")
def nat_runner():
    path = os.environ.get("NAT_RUNNER", os.path.join(REPO, "build", "nat_runner"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"nat runner not found at {path}: run `make build/nat_runner` first")
    return path


def run(cmd, stdin=None):
    p = subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


# ------------------------------------------------------------------ models


def build_model(name, eos_scale=1.0):
    """A random NATModel for CONFIGS[name], bf16-representable, with varied outputs
    (eos_scale: the eos embedding row, also its output logit weights, multiplied by it)."""
    cfg = dict(BASE, **CONFIGS[name])
    seed = sum(map(ord, name))
    torch.manual_seed(seed)
    model = R.NATModel(argparse.Namespace(**cfg), V)
    g = torch.Generator().manual_seed(seed + 1)
    a = model.args
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:  # layer norms: gains around 1, biases around 0
                p.copy_((1.0 if pname.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
            elif pname.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            if pname.endswith(("fc2.weight", "out_proj.weight")):
                p.mul_(2.0)  # sub-layers outweigh the token embedding in the residual stream
            if "embed_positions" in pname:
                p.mul_(4.0)  # position-dependent outputs
        emb = model.encoder.embed_tokens.weight
        emb.mul_(0.3)
        emb[R.UNK].mul_(0.3)  # the mask does not just predict itself through the tied projection
        for dec in (model.decoder, model.at_decoder):  # sharper output distributions
            if dec is not None:
                (dec.layer_norm if dec.layer_norm is not None else dec.layers[-1].final_layer_norm).weight.mul_(4.0)
        # length classes: a few plausible classes get large weights, the others small ones
        L = model.decoder.embed_length.weight
        L.mul_(0.05)
        centre = 128 if a.pred_length_offset else 8
        for c in range(centre - 4, centre + 5):
            L[c] = torch.randn(L.shape[1], generator=g) * 1.5
        emb[R.EOS].mul_(eos_scale)
        for p in model.state_dict().values():
            if p.is_floating_point():
                p.copy_(p.bfloat16().float())
    model.eval()
    return model, cfg


def save_checkpoint(model, cfg, path):
    ns = argparse.Namespace(arch="cmlm_transformer", **vars(model.args))
    torch.save({"args": ns, "model": model.state_dict(), "optimizer_history": [{"num_updates": 0}]}, path)


def make_model_dir(model, cfg, workdir, dtype):
    """Checkpoint -> converter -> model directory (as the real pipeline)."""
    workdir.mkdir(parents=True, exist_ok=True)
    ck = workdir / "checkpoint.pt"
    save_checkpoint(model, cfg, ck)
    (workdir / "dict.txt").write_text("".join(f"w{i} {100 - i}\n" for i in range(V - 4)))
    (workdir / "spm.model").write_bytes(b"not a real sentencepiece model")
    out = workdir / f"model-{dtype}"
    fairseq_cmlm.main([str(ck), str(workdir / "spm.model"), str(workdir / "dict.txt"), str(out), "--dtype", dtype])
    return out


_CACHE = {}


def packed(nzp, name, mode, tmp_path_factory, eos_scale=1.0):
    """(model.nzp, reference NATModel on the weights it holds), cached per session."""
    key = (name, mode, eos_scale)
    if key in _CACHE:
        return _CACHE[key]
    model, cfg = build_model(name, eos_scale)
    work = tmp_path_factory.mktemp(f"{name}-{mode}-eos{eos_scale}")
    dtype, args = MODES[mode]
    mdir = make_model_dir(model, cfg, work, dtype)
    nzpath = work / f"{mode}.nzp"
    run([nzp, "pack", *args, *PACK_ARGS, mdir, nzpath])
    ref, _ = R.load_model_dir(str(mdir))
    if mode.startswith("lossy"):
        back = work / "unpacked.safetensors"
        run([nzp, "unpack", nzpath, back])
        ldir = work / "lossy-dir"
        ldir.mkdir()
        os.replace(back, ldir / "model.safetensors")
        (ldir / "config.json").write_text((mdir / "config.json").read_text())
        ref, _ = R.load_model_dir(str(ldir))
        changed = sum(not torch.equal(a, b) for a, b in zip(ref.state_dict().values(),
                                                             model.state_dict().values()))
        assert changed > 0, "lossy-3 changed no weight"
    else:  # the converter's model directory reloads to the very same network
        for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), k
    _CACHE[key] = (nzpath, ref)
    return _CACHE[key]


def sentences(seed, n=7):
    """Sources [bos, x.., eos] of 0..12 inner tokens (the first is empty)."""
    g = np.random.RandomState(seed)
    out = [[R.BOS, R.EOS]]
    for _ in range(n - 1):
        k = int(g.randint(1, 13))
        out.append([R.BOS] + [int(x) for x in g.randint(4, V, size=k)] + [R.EOS])
    return out


# ------------------------------------------------------------------ decoding


def runner_lines(runner, model_path, sents, extra, batch):
    stdin = "".join(" ".join(map(str, s)) + "\n" for s in sents)
    p = run([runner, model_path, "--steps", "--batch", batch, *extra], stdin)
    lines = p.stdout.splitlines()
    assert len(lines) == len(sents), p.stdout + p.stderr
    return lines


def parse(line):
    assert not line.startswith("error:"), line
    ids, score, steps = line.split("\t")
    return [int(x) for x in ids.split()], float(score), int(steps)


def at_teacher_score(model, src, toks):
    """Mean log-prob of toks ([y.., eos]) given [eos, y..] under the AT decoder."""
    enc = model.encode(torch.tensor([src]))
    t = torch.tensor([[R.EOS] + toks])
    with torch.no_grad():
        lp = model.at_decoder(t[:, :-1], enc, normalize=True)
    return float(lp.gather(2, t[:, 1:, None])[0, :, 0].mean())


# tile-cache / thread variants the runs cycle through (decode on every use; everything cached, 2 threads)
VARIANTS = [["--cache", str(64 << 20)], ["--cache", "0"], ["--cache", str(64 << 20), "--threads", "2"]]


def check_mask_predict(runner, nzpath, ref, sents, it, beam, adaptive, rerank, batch, label, variant=()):
    extra = ["--iter", it, "--beam", beam] + (["--adaptive"] if adaptive else ["--no-adaptive"]) + (["--rerank"] if rerank else [])
    extra += list(variant)
    got = [parse(l) for l in runner_lines(runner, nzpath, sents, extra, batch)]
    want = R.mask_predict(ref, R.pad_batch(sents), max_iter=it, length_beam=beam, adaptive=adaptive,
                          rerank_at=rerank)
    for i, ((toks, score, steps), w) in enumerate(zip(got, want)):
        where = f"{label} sentence {i} {sents[i]}"
        assert toks == w["tokens"], f"{where}: engine {toks} != torch {w['tokens']}"
        assert steps == w["steps"], f"{where}: engine {steps} steps != torch {w['steps']}"
        assert abs(score - w["score"]) <= ATOL, f"{where}: score {score} vs torch {w['score']}"
    return [w["tokens"] for w in want]


@pytest.mark.parametrize("mode", ACTIVE_MODES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_mask_predict(nzp, nat_runner, tmp_path_factory, name, mode):
    require_torch()
    nzpath, ref = packed(nzp, name, mode, tmp_path_factory)
    sents = sentences(sum(map(ord, name)))
    outputs = set()
    for i, (it, beam, adaptive, rerank, batch) in enumerate(OPTIONS):
        if rerank and ref.at_decoder is None:
            continue
        var = VARIANTS[i % len(VARIANTS)]
        label = f"{name} [{mode}] iter {it} beam {beam} adaptive {adaptive} rerank {rerank} batch {batch} {var}"
        for t in check_mask_predict(nat_runner, nzpath, ref, sents, it, beam, adaptive, rerank, batch, label, var):
            outputs.add(tuple(t))
    # the random model is not degenerate: different sentences, several distinct tokens
    assert len(outputs) >= 4, outputs
    assert len({x for t in outputs for x in t[1:-1]}) >= 3, outputs


@pytest.mark.parametrize("mode", ACTIVE_MODES)
@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.get("at_decoder_layers")])
def test_at_greedy(nzp, nat_runner, tmp_path_factory, name, mode):
    require_torch()
    nzpath, ref = packed(nzp, name, mode, tmp_path_factory)
    sents = sentences(sum(map(ord, name)) + 5)
    cases = [([], 1), (["--max-len-b", "6"], 3), (["--max-len-b", "5", "--min-len", "3"], 1)]
    if not quick():
        cases.append((["--max-len-a", "0.5", "--max-len-b", "2"], 3))
    outputs = set()
    for i, (extra, batch) in enumerate(cases):
        extra = extra + VARIANTS[i % len(VARIANTS)]
        a = float(extra[extra.index("--max-len-a") + 1]) if "--max-len-a" in extra else 0
        b = int(extra[extra.index("--max-len-b") + 1]) if "--max-len-b" in extra else 200
        mn = int(extra[extra.index("--min-len") + 1]) if "--min-len" in extra else 1
        got = [parse(l) for l in runner_lines(nat_runner, nzpath, sents, ["--at-greedy", *extra], batch)]
        want = []
        for k in range(0, len(sents), batch):  # max_len depends on the padded width of the batch
            want += R.at_greedy(ref, R.pad_batch(sents[k:k + batch]), max_len_a=a, max_len_b=b, min_len=mn)
        for i, ((toks, score, steps), w) in enumerate(zip(got, want)):
            where = f"{name} [{mode}] AT greedy {extra} batch {batch} sentence {i}"
            assert toks == w, f"{where}: engine {toks} != torch {w}"
            assert steps == len(w)
            ts = at_teacher_score(ref, sents[i], w)
            assert abs(score - ts) <= ATOL, f"{where}: score {score} vs teacher-forced {ts}"
            outputs.add(tuple(w))
    assert len(outputs) >= 4, outputs


# AT beam search: (beam, lenpen, batch, extra runner options); the eos-boosted model
# ends hypotheses at varied lengths, max_len (b = 200 -> max_target_positions - 1 = 39)
# still forces eos for some, --max-len-b / --min-len exercise the bans
EOS_SCALE = 3.0
FULL_BEAM_CASES = [(b, lp, k, []) for b in (1, 4) for lp in (1.0, 0.5) for k in (1, 3)] + [
    (4, 1.0, 3, ["--max-len-b", "6", "--min-len", "3"]), (4, 0.5, 1, ["--max-len-a", "0.5", "--max-len-b", "2"]),
    (6, 1.0, 3, ["--max-len-b", "1"]),
    # beam 63 = vocab - 1: fewer than 2 * beam candidates, so eos candidates are kept as
    # beam rows and fairseq's cands_to_ignore rule applies
    (63, 1.0, 3, ["--max-len-b", "4"])]
QUICK_BEAM_CASES = [(1, 1.0, 3, []), (4, 1.0, 1, []), (4, 0.5, 3, []), (4, 1.0, 3, ["--max-len-b", "6", "--min-len", "3"])]
BEAM_CASES = QUICK_BEAM_CASES if quick() else FULL_BEAM_CASES


@pytest.mark.parametrize("mode", ACTIVE_MODES)
@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.get("at_decoder_layers")])
def test_at_beam(nzp, nat_runner, tmp_path_factory, name, mode):
    require_torch()
    nzpath, ref = packed(nzp, name, mode, tmp_path_factory, EOS_SCALE)
    sents = sentences(sum(map(ord, name)) + 9)
    outputs, lengths, differ = set(), set(), 0
    for i, (beam, lenpen, batch, extra) in enumerate(BEAM_CASES):
        extra = extra + VARIANTS[i % len(VARIANTS)]
        a = float(extra[extra.index("--max-len-a") + 1]) if "--max-len-a" in extra else 0
        b = int(extra[extra.index("--max-len-b") + 1]) if "--max-len-b" in extra else 200
        mn = int(extra[extra.index("--min-len") + 1]) if "--min-len" in extra else 1
        got = [parse(l) for l in runner_lines(nat_runner, nzpath, sents,
                                               ["--at-beam", beam, "--lenpen", lenpen, *extra], batch)]
        want, greedy = [], []
        for k in range(0, len(sents), batch):  # max_len depends on the padded width of the batch
            src = R.pad_batch(sents[k:k + batch])
            want += R.at_beam(ref, src, beam=beam, max_len_a=a, max_len_b=b, min_len=mn, lenpen=lenpen)
            greedy += R.at_greedy(ref, src, max_len_a=a, max_len_b=b, min_len=mn)
        for j, ((toks, score, steps), w, g) in enumerate(zip(got, want, greedy)):
            where = f"{name} [{mode}] AT beam {beam} lenpen {lenpen} {extra} batch {batch} sentence {j}"
            assert toks == w["tokens"], f"{where}: engine {toks} != torch {w['tokens']}"
            assert steps == len(toks), where
            assert abs(score - w["score"]) <= ATOL, f"{where}: score {score} vs torch {w['score']}"
            if beam == 1:
                assert toks == g, f"{where}: beam 1 {toks} != greedy {g}"
            differ += toks != g
            outputs.add(tuple(toks))
            lengths.add(len(toks))
    # not degenerate: varied outputs and lengths, and the beam finds other hypotheses than greedy
    assert len(outputs) >= 4 and len(lengths) >= 3 and differ >= 2, (outputs, lengths, differ)


def test_at_beam_reference_sanity():
    """nat_ref.at_beam with beam 1 is nat_ref.at_greedy; with a larger beam every
    sentence keeps `beam` finalized hypotheses (best first, each ending in eos and
    normalized by its length) unless max_len stopped it earlier."""
    require_torch()
    for name in [n for n, c in CONFIGS.items() if c.get("at_decoder_layers")]:
        for eos_scale in (1.0, EOS_SCALE):
            model, _ = build_model(name, eos_scale)
            src = R.pad_batch(sentences(sum(map(ord, name)) + 9))
            for kw in (dict(), dict(max_len_b=5, min_len=2)):
                greedy = R.at_greedy(model, src, **kw)
                assert [h["tokens"] for h in R.at_beam(model, src, beam=1, **kw)] == greedy, (name, kw)
            for h in R.at_beam(model, src, beam=3, lenpen=0.7, return_all=True):
                scores = [x["score"] for x in h["hypos"]]
                assert scores == sorted(scores, reverse=True) and h["score"] == scores[0]
                assert all(x["tokens"][-1] == R.EOS and R.EOS not in x["tokens"][:-1] for x in h["hypos"])
                assert len(h["hypos"]) == 3 or max(len(x["tokens"]) for x in h["hypos"]) == 40


def test_bad_lines(nzp, nat_runner, tmp_path_factory):
    """A sentence that cannot be decoded gets an error line; the others go on."""
    require_torch()
    name = "postnorm-learned-relu-at"
    nzpath, ref = packed(nzp, name, ACTIVE_MODES[0], tmp_path_factory)
    good = sentences(3, 4)
    too_long = [R.BOS] + [5] * BASE["max_source_positions"] + [R.EOS]
    lines = [good[1], [R.BOS, V, R.EOS], good[2], too_long, [], good[3], [1, 1]]
    stdin_lines = [" ".join(map(str, s)) for s in lines] + ["4 x 2"]
    for extra in ([], ["--rerank", "--beam", "3"], ["--at-greedy"], ["--at-beam", "3"]):
        for batch in (1, 3):
            p = run([nat_runner, nzpath, "--batch", batch, *extra], "\n".join(stdin_lines) + "\n")
            out = p.stdout.splitlines()
            assert len(out) == len(stdin_lines), p.stdout
            assert out[1].startswith("error:") and str(V) in out[1] and "vocabulary" in out[1], out[1]
            assert out[3].startswith("error:") and "max_source_positions 24" in out[3], out[3]
            assert out[4].startswith("error:") and "empty" in out[4], out[4]
            assert out[6].startswith("error:") and "empty" in out[6], out[6]
            assert out[7].startswith("error:") and "'x'" in out[7], out[7]
            ok = [good[1], good[2], good[3]]
            if "--at-greedy" in extra:
                want = [R.at_greedy(ref, R.pad_batch([s]))[0] for s in ok]
            elif "--at-beam" in extra:
                want = [R.at_beam(ref, R.pad_batch([s]), beam=3)[0]["tokens"] for s in ok]
            else:
                beam = 3 if "--beam" in extra else 1
                want = [w["tokens"] for w in R.mask_predict(ref, R.pad_batch(ok), length_beam=beam,
                                                            rerank_at="--rerank" in extra)]
            for j, i in enumerate((0, 2, 5)):
                toks = [int(x) for x in out[i].split("\t")[0].split()]
                assert toks == want[j], f"{extra} batch {batch} line {i}: {toks} != {want[j]}"
    # no AT decoder: rerank and AT greedy are refused per sentence with a message
    nzpath2, _ = packed(nzp, "postnorm-mixed-offset-noat", ACTIVE_MODES[0], tmp_path_factory)
    for extra in (["--rerank"], ["--at-greedy"], ["--at-beam", "2"]):
        p = run([nat_runner, nzpath2, *extra], "0 5 2\n")
        assert p.stdout.startswith("error:") and "AT decoder" in p.stdout, p.stdout


def test_refused_configs(nzp, nat_runner, tmp_path):
    """Configurations the engine does not implement are refused at load with a message."""
    require_torch()
    model, cfg = build_model("postnorm-mixed-offset-noat")
    mdir = make_model_dir(model, cfg, tmp_path / "m", "bf16")
    base = json.loads((mdir / "config.json").read_text())
    cases = [({"activation_fn": "tanh"}, "activation_fn \"tanh\""),
             ({"share_all_embeddings": False}, "share_all_embeddings"),
             ({"architecture": "transformer"}, "cmlm_transformer"),
             ({"decoder_learned_pos": False}, "decoder.embed_positions.weight"),
             ({"encoder_layers": 1}, "encoder.layers.1.fc1.weight"),
             ({"src_embedding_copy": True}, "src_embedding_copy"),
             ({"encoder_attention_heads": 5}, "heads"),
             ({"max_target_positions": 30}, "decoder.embed_positions.weight")]
    for change, msg in cases:
        (mdir / "config.json").write_text(json.dumps(dict(base, **change)))
        out = tmp_path / "bad.nzp"
        run([nzp, "pack", "--mode", "raw", mdir, out])
        p = subprocess.run([nat_runner, out], input="0 5 2\n", capture_output=True, text=True)
        assert p.returncode == 1 and msg in p.stderr, (change, p.stderr)
