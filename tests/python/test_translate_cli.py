"""`nzp translate` end to end: text in, text out, through the model's embedded
SentencePiece model and dict.txt, against the PyTorch reference decoding the
same ids (models/train/nat_ref.py, whose Vocab is Python SentencePiece + the
fairseq dictionary).

The model is test_nat_parity's random-weight post-norm configuration with a
real (tiny) SentencePiece model trained here on generated text, packed
lossless. Checked: --tokens ids equal nat_ref.mask_predict / at_greedy on the
Python-tokenized lines (several option sets), text output equals
Vocab.decode of those ids, a line that cannot be translated (longer than
max_source_positions) gets an empty output line and an error naming its line
number while the others are translated, exit status 1 then; usage errors exit 2.
"""

import os
import random
import subprocess

import pytest

import test_nat_parity as P

R = P.R
NAME = "postnorm-learned-relu-at"


def words(seed, n):
    rnd = random.Random(seed)
    syll = ["da", "te", "ni", "ko", "ru", "sa", "mi", "lo", "ve", "pu", "ka", "zi"]
    return [" ".join("".join(rnd.choice(syll) for _ in range(rnd.randint(1, 3)))
                     for _ in range(rnd.randint(1, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def model(nzp, tmp_path_factory):
    P.require_torch()
    import sentencepiece as spm

    work = tmp_path_factory.mktemp("translate")
    corpus = work / "corpus.txt"
    corpus.write_text("\n".join(words(1, 400)) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(work / "spm"), vocab_size=50,
                                   model_type="unigram", character_coverage=1.0, seed_sentencepiece_size=1000,
                                   num_threads=1, minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(work / "spm.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_unknown(i) or sp.is_control(i))]
    # fairseq dict: the pieces, then filler symbols up to the model's vocabulary
    syms = pieces + [f"madeupword{i:04d}" for i in range(P.V - 4 - len(pieces))]
    assert len(syms) == P.V - 4
    m, cfg = P.build_model(NAME)
    mdir = P.make_model_dir(m, cfg, work / "ck", "bf16")
    (mdir / "spm.model").write_bytes((work / "spm.model").read_bytes())
    (mdir / "dict.txt").write_text("".join(f"{s} {1000 - i}\n" for i, s in enumerate(syms)), encoding="utf-8")
    out = work / "model.nzp"
    P.run([nzp, "pack", "--mode", "lossless", *P.PACK_ARGS, mdir, out])
    ref, _ = R.load_model_dir(str(mdir))
    vocab = R.Vocab(str(mdir / "spm.model"), str(mdir / "dict.txt"))
    return out, ref, vocab


def fairseq_text(vocab, ids):
    """What fairseq prints: Dictionary.string (bos/eos/pad dropped, unk as <unk>)
    then post_process(..., "sentencepiece")."""
    s = " ".join(vocab.symbols[i] for i in ids if i not in (R.BOS, R.EOS, R.PAD))
    return s.replace(" ", "").replace("\u2581", " ").strip()


def translate(nzp, path, lines, *args, check=True):
    p = subprocess.run([str(nzp), "translate", str(path), *map(str, args)], input="".join(l + "\n" for l in lines),
                       capture_output=True, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


LINES = words(7, 6) + ["", "  kako  ruda  ", "dä ß ✓"]  # empty, extra spaces, unknown characters


@pytest.mark.parametrize("opts", [("--iter", 1, "--beam", 1), ("--iter", 10, "--beam", 5, "--batch", 4),
                                  ("--iter", 4, "--beam", 3, "--rerank", "--cache", 1 << 26, "--threads", 2)])
def test_tokens_and_text_match_reference(nzp, model, opts):
    path, ref, vocab = model
    it, beam = opts[1], opts[3]
    srcs = [vocab.encode(l) for l in LINES]
    want = R.mask_predict(ref, R.pad_batch(srcs), max_iter=it, length_beam=beam, rerank_at="--rerank" in opts)
    got = translate(nzp, path, LINES, "--tokens", *opts).stdout.splitlines()
    assert len(got) == len(LINES)
    for i, (g, w) in enumerate(zip(got, want)):
        assert [int(x) for x in g.split()] == w["tokens"], f"line {i + 1}: {LINES[i]!r}"
    text = translate(nzp, path, LINES, *opts).stdout.split("\n")[:-1]
    assert text == [fairseq_text(vocab, w["tokens"]) for w in want]


def test_at_greedy(nzp, model):
    path, ref, vocab = model
    srcs = [vocab.encode(l) for l in LINES]
    want = R.at_greedy(ref, R.pad_batch(srcs))
    got = translate(nzp, path, LINES, "--tokens", "--at", "--batch", 3).stdout.splitlines()
    # batches of 3 pad to their own width; the reference pads all lines together, and
    # max_len depends only on max_len_b here (max_len_a = 0), so tokens agree
    assert [[int(x) for x in g.split()] for g in got] == want


def test_bad_line_reported_others_continue(nzp, model):
    path, ref, vocab = model
    long = " ".join(["kadateni"] * 40)  # far more than max_source_positions (24) tokens
    lines = [LINES[0], long, LINES[1]]
    p = translate(nzp, path, lines, "--tokens", "--batch", 3, check=False)
    assert p.returncode == 1
    out = p.stdout.split("\n")[:-1]
    assert len(out) == 3 and out[1] == ""
    assert "line 2:" in p.stderr and "24" in p.stderr
    good = R.mask_predict(ref, R.pad_batch([vocab.encode(LINES[0]), vocab.encode(LINES[1])]), max_iter=10,
                          length_beam=5)
    assert [int(x) for x in out[0].split()] == good[0]["tokens"]
    assert [int(x) for x in out[2].split()] == good[1]["tokens"]


def test_usage_errors(nzp, model, tmp_path):
    path, _, _ = model
    assert translate(nzp, path, [], "--beam", 0, check=False).returncode == 2
    assert translate(nzp, path, [], "--bogus", check=False).returncode == 2
    p = translate(nzp, tmp_path / "missing.nzp", ["x"], check=False)
    assert p.returncode == 1 and "missing.nzp" in p.stderr
    assert translate(nzp, path, [], check=False).stdout == ""  # no input, no output


def test_at_beam(nzp, model):
    path, ref, vocab = model
    srcs = [vocab.encode(l) for l in LINES]
    want = R.at_beam(ref, R.pad_batch(srcs), beam=4, lenpen=1.0)
    got = translate(nzp, path, LINES, "--tokens", "--at-beam", 4, "--batch", len(LINES)).stdout.splitlines()
    assert [[int(x) for x in g.split()] for g in got] == [w["tokens"] for w in want]


def test_fixed_iterations_by_default_adaptive_on_request(nzp, model):
    """The default runs exactly T + 1 passes (fairseq --iter-decode-force-max-iter); --adaptive
    is fairseq's generator default. Both equal nat_ref in their mode."""
    path, ref, vocab = model
    srcs = [vocab.encode(l) for l in LINES]
    for flags, adaptive in (((), False), (("--fixed",), False), (("--adaptive",), True)):
        want = R.mask_predict(ref, R.pad_batch(srcs), max_iter=10, length_beam=5, adaptive=adaptive)
        got = translate(nzp, path, LINES, "--tokens", "--batch", len(LINES), *flags).stdout.splitlines()
        assert [[int(x) for x in g.split()] for g in got] == [w["tokens"] for w in want], flags
    fixed = R.mask_predict(ref, R.pad_batch(srcs), max_iter=10, length_beam=5)
    assert all(R.UNK not in w["tokens"] for w in fixed)  # every mask is filled after the last pass


def repack(nzp, tmp_path, model_path, *sets):
    """model_path's model directory packed again with `--set` pairs. @return the new .nzp."""
    mdir = tmp_path / "mdir"
    mdir.mkdir(parents=True, exist_ok=True)
    P.run([nzp, "unpack", "--model-dir", model_path, mdir])
    out = tmp_path / "gen.nzp"
    args = [a for kv in sets for a in ("--set", kv)]
    P.run([nzp, "pack", "--mode", "lossless", *P.PACK_ARGS, *args, mdir, out])
    return out


def test_model_generation_defaults(nzp, model, tmp_path):
    """A model's config "generation" decides what the command line leaves out; flags override it."""
    path, ref, vocab = model
    gen = repack(nzp, tmp_path, path, "generation.iterations=2", "generation.length_beam=3",
                 "generation.rerank=at")
    info = subprocess.run([str(nzp), "info", str(gen)], capture_output=True, text=True, check=True).stdout
    assert 'generation: {"iterations":2,"length_beam":3,"rerank":"at"}' in info
    srcs = [vocab.encode(l) for l in LINES]
    want = R.mask_predict(ref, R.pad_batch(srcs), max_iter=2, length_beam=3, rerank_at=True)
    got = translate(nzp, gen, LINES, "--tokens", "--batch", len(LINES)).stdout.splitlines()
    assert [[int(x) for x in g.split()] for g in got] == [w["tokens"] for w in want]
    # flags win over the model's defaults
    want = R.mask_predict(ref, R.pad_batch(srcs), max_iter=1, length_beam=3, rerank_at=False)
    got = translate(nzp, gen, LINES, "--tokens", "--batch", len(LINES), "--iter", 1, "--no-rerank").stdout
    assert [[int(x) for x in g.split()] for g in got.splitlines()] == [w["tokens"] for w in want]
    # a model whose default decoder is the AT decoder's beam search
    at = repack(nzp, tmp_path, path, "generation.decoder=at", "generation.beam_size=4")
    want = R.at_beam(ref, R.pad_batch(srcs), beam=4, lenpen=1.0)
    got = translate(nzp, at, LINES, "--tokens", "--batch", len(LINES)).stdout.splitlines()
    assert [[int(x) for x in g.split()] for g in got] == [w["tokens"] for w in want]
    got = translate(nzp, at, LINES[:2], "--tokens", "--nat", "--iter", 1, "--beam", 1).stdout.splitlines()
    want = R.mask_predict(ref, R.pad_batch(srcs[:2]), max_iter=1, length_beam=1)
    assert [[int(x) for x in g.split()] for g in got] == [w["tokens"] for w in want]


@pytest.mark.parametrize("kv,msg", [("generation.iterations=-1", "'iterations' must be an integer in [0, 1000]"),
                                    ("generation.colour=blue", "unknown key 'colour'"),
                                    ("generation.decoder=rnn", "'decoder' must be \"nat\" or \"at\""),
                                    ("generation.adaptive=1", "'adaptive' must be true or false"),
                                    ("generation=[1]", "config.json generation must be an object")])
def test_bad_generation_refused(nzp, model, tmp_path, kv, msg):
    path, _, _ = model
    mdir = tmp_path / "mdir"
    mdir.mkdir()
    P.run([nzp, "unpack", "--model-dir", path, mdir])
    out = tmp_path / "bad.nzp"
    p = subprocess.run([str(nzp), "pack", "--set", kv, str(mdir), str(out)], capture_output=True, text=True)
    assert p.returncode == 1 and msg in p.stderr, p.stderr  # checked before the file is kept
    assert not out.exists()


def test_subcommand_help(nzp):
    """`nzp CMD --help` / `-h`: that subcommand's usage on stdout, exit 0."""
    for cmd in ("pack", "unpack", "info", "verify", "bench", "translate", "chat"):
        for flag in ("--help", "-h"):
            p = subprocess.run([str(nzp), cmd, flag], capture_output=True, text=True, timeout=30)
            assert p.returncode == 0 and p.stderr == "", (cmd, flag, p.stderr)
            assert f"nzp {cmd}" in p.stdout and "bad or incomplete" not in p.stdout, (cmd, flag)
    p = subprocess.run([str(nzp), "translate", "--help"], capture_output=True, text=True)
    assert "--adaptive" in p.stdout and "generation" in p.stdout
