"""The shipped demo translation model (models/demo/nat-ende.nzp, EN->DE,
trained by models/train/train_nat.py): it verifies, and `nzp translate` is
token-identical to the PyTorch reference (models/train/nat_ref.py) run on the
very weights the .nzp decodes to (`nzp unpack --model-dir`), for mask-predict
with iterations 1/4/10, length beam 1/5, AT rerank on and off, and AT greedy,
on the first lines of the shipped test sample (models/demo/nat-ende.sample.en).
Quality floor: BLEU of the sample well above a random model's (which scores ~0).
NZ_TEST_QUICK=1 uses fewer lines; under valgrind (make valgrind) one
configuration on two lines (the code paths are the tiny models' ones)."""

import json
import os
import subprocess
import sys

import pytest

import test_nat_parity as P

R = P.R
REPO = P.REPO
DEMO = os.path.join(REPO, "models", "demo", "nat-ende.nzp")
SAMPLE_EN = os.path.join(REPO, "models", "demo", "nat-ende.sample.en")
SAMPLE_DE = os.path.join(REPO, "models", "demo", "nat-ende.sample.de")
VALGRIND = bool(os.environ.get("NZP_REAL"))  # make valgrind: every nzp call runs under memcheck (~50x slower)
NLINES = 2 if VALGRIND else 8 if P.quick() else 32

sys.path.insert(0, os.path.join(REPO, "models", "eval"))
import bleu as B  # noqa: E402


def lines(path, n=0):
    with open(path, encoding="utf-8") as f:
        out = [l.rstrip("\n") for l in f]
    return out[:n] if n else out


@pytest.fixture(scope="module")
def demo(nzp, tmp_path_factory):
    P.require_torch()
    d = tmp_path_factory.mktemp("demo") / "model"
    P.run([nzp, "unpack", "--model-dir", DEMO, d])
    ref, _ = R.load_model_dir(str(d))
    vocab = R.Vocab(str(d / "spm.model"), str(d / "dict.txt"))
    return ref, vocab


def translate(nzp, src, *args):
    p = subprocess.run([nzp, "translate", DEMO, "--threads", "2", *map(str, args)],
                       input="".join(l + "\n" for l in src), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return p.stdout.split("\n")[:-1]


def test_verify_and_info(nzp):
    p = subprocess.run([nzp, "verify", DEMO], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr
    info = json.loads(subprocess.run([nzp, "info", "--json", DEMO], capture_output=True, text=True,
                                     check=True).stdout)
    assert info["config"]["architecture"] == "cmlm_transformer"
    assert info["config"]["at_decoder_layers"] > 0
    # its decoding defaults: the valid split's best setting (models/README.md)
    assert info["config"]["generation"] == {"decoder": "at", "beam_size": 4}
    assert sorted(info["blobs"]) == ["dict.txt", "spm.model"]
    # bf16 weights, exponents entropy-coded: ~2/3 of the bf16 bytes
    assert 0.60 < info["total"]["stored_bytes"] / (info["total"]["elements"] * 2) < 0.72
    assert os.path.getsize(DEMO) < 25 * 2**20


# (iterations, length beam, AT rerank, adaptive stopping)
CONFIGS = [(1, 1, False, False), (4, 1, False, False), (10, 5, False, False), (10, 5, True, False),
           (4, 5, True, False), (1, 1, True, False), (10, 5, False, True), (4, 3, True, True)]


@pytest.mark.parametrize("it,beam,rerank,adaptive", CONFIGS[3:4] if VALGRIND else CONFIGS)
def test_mask_predict_matches_reference(nzp, demo, it, beam, rerank, adaptive):
    ref, vocab = demo
    src = lines(SAMPLE_EN, NLINES)
    want = R.mask_predict(ref, R.pad_batch([vocab.encode(l) for l in src]), max_iter=it, length_beam=beam,
                          rerank_at=rerank, adaptive=adaptive)
    # every option explicit: the model's own defaults (config "generation") must not change the row
    args = ["--nat", "--iter", it, "--beam", beam, "--batch", 16, "--rerank" if rerank else "--no-rerank",
            "--adaptive" if adaptive else "--fixed"]
    got = translate(nzp, src, "--tokens", *args)
    assert len(got) == len(src)
    for i, (g, w) in enumerate(zip(got, want)):
        assert [int(x) for x in g.split()] == w["tokens"], f"line {i + 1}: {src[i]!r}"


def test_at_greedy_matches_reference(nzp, demo):
    ref, vocab = demo
    src = lines(SAMPLE_EN, NLINES)
    want = R.at_greedy(ref, R.pad_batch([vocab.encode(l) for l in src]))
    got = translate(nzp, src, "--tokens", "--at", "--batch", len(src))
    assert [[int(x) for x in g.split()] for g in got] == want


def test_sample_bleu_floor(nzp):
    """A trained model, not a random one: the AT decoder and mask-predict with
    rerank both clear a floor on the 100-line sample (the README table has the
    full test split)."""
    src, refs = lines(SAMPLE_EN), lines(SAMPLE_DE)
    at = B.corpus_bleu(translate(nzp, src, "--at", "--batch", 50), [refs]).score
    nat = B.corpus_bleu(translate(nzp, src, "--nat", "--iter", 10, "--beam", 5, "--rerank", "--fixed", "--batch", 50),
                        [refs]).score
    assert at > 5.0, at
    assert nat > 2.0, nat


README_TEXTS = ["Open the file in a new window.", "Save changes?", "Show hidden files", "Open the file."]


def test_default_decoding_fills_every_mask(nzp):
    """The model's default decoding (its config "generation", fixed iterations) leaves no <unk> in
    the README's and the container smoke test's examples nor in the sample, and clears the floor.
    Under valgrind: the README's examples and NLINES sample lines, no BLEU (the whole sample in beam
    search under memcheck takes over ten minutes)."""
    n = NLINES if VALGRIND else 0
    src, refs = lines(SAMPLE_EN, n), lines(SAMPLE_DE, n)
    out = translate(nzp, README_TEXTS + src, "--batch", 16)
    assert len(out) == len(README_TEXTS) + len(src)
    assert all(o.strip() and "<unk>" not in o for o in out[:len(README_TEXTS)]), out[:len(README_TEXTS)]
    assert sum("<unk>" in o for o in out[len(README_TEXTS):]) <= 2, [o for o in out if "<unk>" in o]
    if not VALGRIND:
        assert B.corpus_bleu(out[len(README_TEXTS):], [refs]).score > 5.0
