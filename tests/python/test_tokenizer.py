"""Tokenizer glue (models/nz_spm.h, models/nz_tok.h) against Python
SentencePiece and a transcription of fairseq's code.

The tests train tiny SentencePiece models (python3-sentencepiece) on a few
hundred generated lines, build a fairseq dict.txt from the encoded corpus, and
run $TOK_CLI (tests/tok_cli.c, default build/tok_cli) on tricky inputs. The
expected outputs come from:
  - SentencePiece's Python binding: the pieces and ids of every line, and
    decode_pieces for --spm-detok;
  - the functions below that transcribe fairseq: Dictionary.add_from_file
    (dict.txt), SentencepieceBPE.encode + tokenize_line + encode_line
    (append_eos=True; bos prepended as translation_lev does for NAT models),
    Dictionary.string + post_process(..., "sentencepiece") (what
    fairseq-generate / fairseq-interactive print).
Invalid UTF-8 has no fairseq reference (fairseq reads text as str): there the
C side must match SentencePiece on the same bytes (each bad byte becomes
U+FFFD, i.e. an unknown piece -> unk 3), and must not crash.

TOK_CLI_VALGRIND=1 (default when NZP_REAL is set, i.e. under `make valgrind`)
runs tok_cli under valgrind memcheck; NZ_TEST_QUICK=1 shrinks the random
batches.
"""

import os
import random
import re
import subprocess
from collections import Counter

import numpy as np
import pytest

from st_util import write_safetensors

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

BOS, PAD, EOS, UNK = 0, 1, 2, 3
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]

try:
    import sentencepiece as spm
except ImportError as e:  # pragma: no cover - CI installs python3-sentencepiece
    spm = None
    SPM_ERROR = str(e)


def quick():
    q = os.environ.get("NZ_TEST_QUICK", "")
    return (q not in ("", "0")) or bool(os.environ.get("NZP_REAL"))


# ------------------------------------------------------- fairseq transcription


class FairseqDict:
    """fairseq.data.Dictionary: construction, add_from_file, index, []."""

    def __init__(self):
        self.symbols, self.count, self.indices = [], [], {}
        for s in SPECIALS:
            self.add_symbol(s)

    def add_symbol(self, word, n=1, overwrite=False):
        if word in self.indices and not overwrite:
            idx = self.indices[word]
            self.count[idx] += n
            return idx
        idx = len(self.symbols)
        self.indices[word] = idx
        self.symbols.append(word)
        self.count.append(n)
        return idx

    @classmethod
    def load(cls, path):
        """add_from_file; returns (dict, None) or (None, (kind, 1-based line))."""
        d = cls()
        try:
            with open(path, "r", encoding="utf-8") as fd:
                lines = fd.readlines()
        except UnicodeError:
            return None, ("encoding", None)
        for no, line in enumerate(lines, 1):
            try:
                line, field = line.rstrip().rsplit(" ", 1)
                if field == "#fairseq:overwrite":
                    overwrite = True
                    line, field = line.rsplit(" ", 1)
                else:
                    overwrite = False
                count = int(field)
                word = line
                if word in d.indices and not overwrite:
                    return None, ("duplicate", no)
                d.add_symbol(word, n=count, overwrite=overwrite)
            except ValueError:
                return None, ("format", no)
        return d, None

    def index(self, sym):
        return self.indices.get(sym, UNK)

    def __getitem__(self, idx):
        return self.symbols[idx] if idx < len(self.symbols) else "<unk>"

    def __len__(self):
        return len(self.symbols)


SPACE_NORMALIZER = re.compile(r"\s+")


def tokenize_line(line):  # fairseq.tokenizer.tokenize_line
    line = SPACE_NORMALIZER.sub(" ", line)
    line = line.strip()
    return line.split()


def post_process_sentencepiece(sentence):  # fairseq.data.data_utils.post_process
    return sentence.replace(" ", "").replace("\u2581", " ").strip()


def spm_pieces(sp, raw):
    """SentencePiece pieces of raw bytes (str input when it is valid UTF-8,
    as fairseq passes it; otherwise the bytes themselves)."""
    try:
        return sp.encode(raw.decode("utf-8"), out_type=str)
    except UnicodeDecodeError:
        return [p.decode("utf-8") for p in sp.encode(raw, out_type=str)]


def fairseq_encode(sp, d, raw, bos=False, eos=True):
    """SentencepieceBPE.encode -> Dictionary.encode_line(add_if_not_exist=False)."""
    words = tokenize_line(" ".join(spm_pieces(sp, raw)))
    ids = [d.index(w) for w in words]
    return ([BOS] if bos else []) + ids + ([EOS] if eos else [])


def fairseq_decode(d, ids):
    """Dictionary.string(ids) (bos/eos skipped; pads never reach it) +
    post_process(..., "sentencepiece")."""
    syms = [d[i] for i in ids if i not in (BOS, PAD, EOS)]
    return post_process_sentencepiece(" ".join(syms))


def spm_decode(sp, d, ids):
    return sp.decode_pieces([d[i] for i in ids if i not in (BOS, PAD, EOS)])


# ------------------------------------------------------------------ fixtures

WORDS = ("the a quick brown fox jumps over lazy dog and of to in is file open save print cancel "
         "settings window error warning Datei öffnen speichern drucken Abbrechen Einstellungen "
         "Fenster Fehler Warnung Straße Größe über schön Grüße Übersetzung ändern größer "
         "東京 日本語 中文 设置 文件 "
         "2024 3.14 100% (x) [y] \"q\" it's e-mail a/b #1 @home ... ! ? , ; :").split()


def corpus(seed, n):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) for _ in range(n)]


def write_dict(path, lines, min_count=1, extra=()):
    """fairseq-preprocess style dict.txt: piece counts, descending (ties in
    symbol order), then padded to a multiple of 8 with madeupwordNNNN."""
    c = Counter()
    for ps in lines:
        c.update(tokenize_line(" ".join(ps)))
    ranked = Counter(dict(sorted(c.items()))).most_common()
    rows = [f"{w} {n}" for w, n in ranked if n >= min_count] + list(extra)
    i = 0
    while (len(rows) + 4) % 8:
        rows.append(f"madeupword{i:04d} 0")
        i += 1
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(r + "\n" for r in rows))


class Model:
    def __init__(self, name, directory, sp, d):
        self.name, self.dir, self.sp, self.dict = name, directory, sp, d
        self.spm_path = os.path.join(directory, "spm.model")
        self.dict_path = os.path.join(directory, "dict.txt")


MODEL_KINDS = ["unigram", "bpe", "bytefallback"]


@pytest.fixture(scope="session")
def tok_cli():
    path = os.environ.get("TOK_CLI", os.path.join(REPO, "build", "tok_cli"))
    if not os.access(path, os.X_OK):
        pytest.fail(f"tok_cli not found at {path}: run `make build/tok_cli` first")
    return path


@pytest.fixture(scope="session", params=MODEL_KINDS)
def model(request, tmp_path_factory):
    if spm is None:
        pytest.fail(f"python3-sentencepiece is required ({SPM_ERROR})")
    kind = request.param
    d = str(tmp_path_factory.mktemp(f"spm_{kind}"))
    lines = corpus(7, 600)
    train = os.path.join(d, "train.txt")
    with open(train, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    opts = dict(input=train, model_prefix=os.path.join(d, "spm"), hard_vocab_limit=False,
                character_coverage=1.0, bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, minloglevel=2,
                num_threads=1, seed_sentencepiece_size=10000)
    if kind == "unigram":
        spm.SentencePieceTrainer.train(model_type="unigram", vocab_size=200, **opts)
    elif kind == "bpe":
        spm.SentencePieceTrainer.train(model_type="bpe", vocab_size=200, **opts)
    else:
        spm.SentencePieceTrainer.train(model_type="unigram", vocab_size=400, byte_fallback=True, **opts)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(d, "spm.model"))
    encoded = [sp.encode(x, out_type=str) for x in lines]
    if kind == "unigram":
        # rare pieces left out of the dictionary: they must map to unk; symbols
        # holding Python whitespace (never produced by tokenize_line, but legal
        # in dict.txt) exercise the detokenizer's strip
        write_dict(os.path.join(d, "dict.txt"), encoded, min_count=3,
                   extra=["\u0085 1", "\u3000x 1", "a\u00a0b 1", "y\u2009 1"])
    elif kind == "bpe":
        # a redefined symbol: index() answers the new id, the old id still decodes
        top = Counter(p for ps in encoded for p in ps).most_common(1)[0][0]
        write_dict(os.path.join(d, "dict.txt"), encoded, extra=[f"{top} 1 #fairseq:overwrite"])
    else:
        # dictionary = the whole SentencePiece vocabulary (byte pieces <0xNN> included)
        rows = [f"{sp.id_to_piece(i)} 1" for i in range(sp.get_piece_size()) if i != sp.unk_id()]
        with open(os.path.join(d, "dict.txt"), "w", encoding="utf-8") as f:
            f.write("".join(r + "\n" for r in rows))
    fd, err = FairseqDict.load(os.path.join(d, "dict.txt"))
    assert err is None
    return Model(kind, d, sp, fd)


def valgrind_prefix():
    v = os.environ.get("TOK_CLI_VALGRIND", "1" if os.environ.get("NZP_REAL") else "")
    if v in ("", "0"):
        return []
    return ["valgrind", "-q", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"]


def run_cli(tok_cli, args, lines=(), ok=True):
    """Run tok_cli; lines are bytes (no b'\\n' inside). Returns (stdout lines
    as bytes, completed process)."""
    data = b"".join(x + b"\n" for x in lines)
    p = subprocess.run(valgrind_prefix() + [tok_cli] + [str(a) for a in args], input=data,
                       capture_output=True, timeout=600)
    if ok:
        assert p.returncode == 0, p.stderr.decode(errors="replace")
        out = p.stdout.split(b"\n")
        assert out[-1] == b""
        out = out[:-1]
        assert len(out) == len(lines)
        return out, p
    return None, p


def parse_ids(line):
    assert not line.startswith(b"ERROR"), line
    return [int(x) for x in line.split()] if line else []


# -------------------------------------------------------------------- inputs

TRICKY = [
    "",
    " ",
    "   ",
    "the fox",
    "the   quick    brown  fox",
    "   leading spaces",
    "trailing spaces   ",
    "  both  ",
    "\ttabs\tand\ttabs\t",
    "Straße über Größe, schön! Grüße.",
    "ÄÖÜ äöü ß ẞ",
    "東京 日本語 中文设置文件",
    "emoji 😀 👍🏽 🇩🇪 family 👨‍👩‍👧",
    "unknown: Привет мир Ωμέγα עברית العربية",
    "\u00a0nbsp\u00a0inside\u00a0",
    "full\u3000width\u3000space",
    "line\u2028separator and nel\u0085x and fs\x1cy",
    # NEL survives normalisation; inside a run of unknown characters (one
    # unigram piece) fairseq's whitespace split cuts the piece in two
    "Ω\u0085Ω ж\u0085ж\u0085 \u0085ΩΩ",
    "e\u0301 combining vs é precomposed, ﬁ ligature, ①, Ｆｕｌｌｗｉｄｔｈ",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "already \u2581 marker\u2581inside",
    "<unk> <s> </s> <pad> literal specials",
    "madeupword0000 literal",
    "\r carriage \r return",
    "a",
    "ß",
    "😀",
    "x" * 10000,
    " ".join(["Datei öffnen"] * 900)[:10000],
    "".join(random.Random(5).choice("abcäöüß東京😀 ") for _ in range(10000)),
]

INVALID_UTF8 = [
    b"ab\xffcd",
    b"\xc3",
    b"trailing \xc3",
    b"\xc0\xaf overlong",
    b"\xed\xa0\x80 surrogate",
    b"\xf4\x90\x80\x80 beyond U+10FFFF",
    b"\x80\x80\x80 stray continuation",
    b"\xe6\x9d truncated CJK",
    b"a\x00b embedded NUL",
    bytes(range(1, 10)) + bytes(range(11, 256)),
]


def random_lines(seed, n):
    rng = random.Random(seed)
    pool = list("abcdefghijklmnopqrstuvwxyz     äöüßÄÖÜ東京日本語😀Ωж\t.,!?-'\"0123456789") + ["\u00a0", "\u3000"]
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 80))) for _ in range(n)]


# --------------------------------------------------------------------- tests


def test_pieces_match_sentencepiece(tok_cli, model):
    inputs = [x.encode() for x in TRICKY + random_lines(1, 50 if quick() else 300)] + INVALID_UTF8
    out, _ = run_cli(tok_cli, ["pieces", model.spm_path, model.dict_path], inputs)
    for raw, got in zip(inputs, out):
        assert not got.startswith(b"ERROR"), (raw, got)
        pieces = model.sp.encode(raw, out_type=str)  # bytes in -> bytes pieces
        ids = model.sp.encode(raw)
        items = [x.split(b":") for x in got.split()] if got else []
        assert [bytes.fromhex(h.decode()) for _, h in items] == pieces, raw[:80]
        assert [int(i) for i, _ in items] == ids, raw[:80]


@pytest.mark.parametrize("bos", [False, True])
def test_encode_matches_fairseq(tok_cli, model, bos):
    inputs = [x.encode() for x in TRICKY + random_lines(2, 50 if quick() else 300)] + INVALID_UTF8
    args = (["--bos"] if bos else []) + ["encode", model.spm_path, model.dict_path]
    out, _ = run_cli(tok_cli, args, inputs)
    n_unk = 0
    for raw, got in zip(inputs, out):
        want = fairseq_encode(model.sp, model.dict, raw, bos=bos)
        assert parse_ids(got) == want, raw[:80]
        n_unk += want.count(UNK)
    if model.name != "bytefallback":  # there unknown text becomes byte pieces, all in dict.txt
        assert n_unk > 0  # the inputs do exercise unknown pieces
    # without eos
    out, _ = run_cli(tok_cli, ["--no-eos", "encode", model.spm_path, model.dict_path], inputs[:5])
    for raw, got in zip(inputs, out):
        assert parse_ids(got) == fairseq_encode(model.sp, model.dict, raw, eos=False)


def test_empty_and_invalid_lines(tok_cli, model):
    bad = [b"\xff\xfe", b"\xc3", b"ok \xe6\x9d end", b"\xed\xa0\x80"]
    out, _ = run_cli(tok_cli, ["encode", model.spm_path, model.dict_path], [b"", b"   "] + bad)
    assert parse_ids(out[0]) == [EOS]
    assert parse_ids(out[1]) == [EOS]
    # SentencePiece reads each malformed byte as U+FFFD, which is not in its
    # vocabulary: unk, or with byte fallback the pieces <0xEF> <0xBF> <0xBD>
    fffd = [model.dict.index(f"<0x{b:02X}>") for b in "\ufffd".encode()]
    for got in out[2:]:
        ids = parse_ids(got)
        assert ids[-1] == EOS
        if model.name == "bytefallback":
            assert any(ids[i:i + 3] == fffd for i in range(len(ids))), ids
        else:
            assert UNK in ids


def test_decode_matches_fairseq_and_spm(tok_cli, model):
    inputs = [x.encode() for x in TRICKY + random_lines(3, 30 if quick() else 200)] + INVALID_UTF8
    id_lines = [fairseq_encode(model.sp, model.dict, raw, bos=True) for raw in inputs]
    n = len(model.dict)
    rng = random.Random(11)
    # hand-made sequences: specials anywhere, unk, ids past the dictionary, every symbol
    id_lines += [
        [],
        [BOS, EOS],
        [PAD, PAD, BOS, 5, PAD, 6, EOS, PAD],
        [UNK, 4, UNK, 5],
        [4, n, n + 7, 2**31 - 1],
        list(range(n)),
    ]
    id_lines += [[rng.randrange(n + 3) for _ in range(rng.randint(0, 40))] for _ in range(100)]
    lines = [" ".join(map(str, ids)).encode() for ids in id_lines]
    fs, _ = run_cli(tok_cli, ["--hex", "decode", model.spm_path, model.dict_path], lines)
    sd, _ = run_cli(tok_cli, ["--hex", "--spm-detok", "decode", model.spm_path, model.dict_path], lines)
    for ids, got_fs, got_sd in zip(id_lines, fs, sd):
        assert not got_fs.startswith(b"ERROR") and not got_sd.startswith(b"ERROR"), ids
        assert bytes.fromhex(got_fs.decode()).decode() == fairseq_decode(model.dict, ids), ids
        assert bytes.fromhex(got_sd.decode()).decode() == spm_decode(model.sp, model.dict, ids), ids


def test_round_trip_of_known_text(tok_cli, model):
    # text made only of pieces in the dictionary detokenizes back to its
    # whitespace-normalised self (what fairseq prints for a perfect translation)
    lines = corpus(99, 50)
    out, _ = run_cli(tok_cli, ["encode", model.spm_path, model.dict_path], [x.encode() for x in lines])
    back, _ = run_cli(tok_cli, ["decode", model.spm_path, model.dict_path], out)
    for x, ids, y in zip(lines, out, back):
        if UNK in parse_ids(ids):
            continue
        assert y.decode() == " ".join(x.split())


def test_bad_decode_input_is_reported_per_line(tok_cli, model):
    out, _ = run_cli(tok_cli, ["decode", model.spm_path, model.dict_path], [b"4 -1 5", b"4 5", b"4 x"])
    assert out[0].startswith(b"ERROR") and b"position 1" in out[0]
    assert not out[1].startswith(b"ERROR")
    assert out[2].startswith(b"ERROR")


def test_embedded_in_nzp(tok_cli, nzp, model, tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    write_safetensors(d / "model.safetensors", {"w": ("F32", np.zeros((4, 8), np.float32))})
    (d / "config.json").write_text('{"architecture": "cmlm_transformer"}')
    (d / "spm.model").write_bytes(open(model.spm_path, "rb").read())
    (d / "dict.txt").write_bytes(open(model.dict_path, "rb").read())
    out = tmp_path / "m.nzp"
    p = subprocess.run([nzp, "pack", d, out], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    inputs = [x.encode() for x in TRICKY[:20]]
    a, _ = run_cli(tok_cli, ["--bos", "encode", model.spm_path, model.dict_path], inputs)
    b, _ = run_cli(tok_cli, ["--bos", "encode", out], inputs)
    assert a == b
    # a .nzp without the tokenizer blobs is refused with a message
    os.remove(d / "spm.model")
    p = subprocess.run([nzp, "pack", d, tmp_path / "n.nzp"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    _, q = run_cli(tok_cli, ["encode", tmp_path / "n.nzp"], ok=False)
    assert q.returncode == 1 and b"spm.model" in q.stderr


def test_bad_model_files_are_refused(tok_cli, model, tmp_path):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01 not a sentencepiece model")
    _, p = run_cli(tok_cli, ["encode", junk, model.dict_path], ok=False)
    assert p.returncode == 1 and b"spm.model" in p.stderr
    empty = tmp_path / "empty.model"
    empty.write_bytes(b"")
    _, p = run_cli(tok_cli, ["encode", empty, model.dict_path], ok=False)
    assert p.returncode == 1 and b"spm.model" in p.stderr
    bad = tmp_path / "dict.txt"
    bad.write_bytes(b"a 1\nb\n")
    _, p = run_cli(tok_cli, ["encode", model.spm_path, bad], ok=False)
    assert p.returncode == 1 and b"line 2" in p.stderr


# dict.txt parsing against the add_from_file transcription
DICTS = {
    "plain": b"hello 5\nworld 3\n",
    "no_final_newline": b"hello 5\nworld 3",
    "empty": b"",
    "crlf": b"hello 5\r\nworld 3\r\n",
    "cr_only": b"hello 5\rworld 3\r",
    "mixed_newlines": b"a 1\r\nb 2\rc 3\nd 4",
    "trailing_ws": b"hello 5  \t\nworld 3\xe3\x80\x80\n",
    "spaces_in_symbol": b"New York 7\na  b 2\n",
    "empty_symbol": b" 4\n",
    "symbol_trailing_space": b"a  9\n",
    "python_ints": b"a +7\nb -2\nc 1_000\nd 007\ne \t5\nf 99999999999999999999999\n",
    "overwrite": b"a 1\nb 2\na 3 #fairseq:overwrite\n<unk> 0 #fairseq:overwrite\n",
    "overwrite_twice": b"a 1\na 2 #fairseq:overwrite\na 3 #fairseq:overwrite\nb 1\n",
    "overwrite_new": b"fresh 1 #fairseq:overwrite\n",
    "bom": b"\xef\xbb\xbfa 1\nb 2\n",
    "unicode": "▁der 10\nß 3\n東京 2\n😀 1\n\u2581 100\n".encode(),
    "nul_in_symbol": b"a\x00b 1\n",
    "tab_in_symbol": b"a\tb 1\n",
    "many": b"".join(b"w%d %d\n" % (i, 10000 - i) for i in range(3000)),
    # errors
    "blank_line": b"a 1\n\nb 2\n",
    "blank_last_line": b"a 1\n \n",
    "missing_count": b"a 1\nb\n",
    "tab_separated": b"a\t1\n",
    "bad_count": b"a 1\nb x\n",
    "double_underscore": b"a 1__0\n",
    "trailing_underscore": b"a 1_\n",
    "float_count": b"a 1.5\n",
    "empty_count": b"a \n",
    "duplicate": b"a 1\nb 2\na 3\n",
    "duplicate_special": b"x 1\n</s> 1\n",
    "overwrite_without_count": b"a #fairseq:overwrite\n",
    "only_flag": b"#fairseq:overwrite\n",
    "flag_then_space": b"a 1 #fairseq:overwrite \n",
    "invalid_utf8": b"a 1\nb\xff 2\n",
    "surrogate": b"a 1\nb 2\n\xed\xa0\x80 3\n",
}


@pytest.mark.parametrize("name", sorted(DICTS))
def test_dict_matches_fairseq(tok_cli, tmp_path, name):
    path = tmp_path / "dict.txt"
    path.write_bytes(DICTS[name])
    want, err = FairseqDict.load(str(path))
    out, p = run_cli(tok_cli, ["dict", path], ok=False)
    if err is not None:
        assert p.returncode == 1, (name, p.stdout)
        msg = p.stderr.decode(errors="replace")
        if err[1] is not None:
            assert f"line {err[1]}:" in msg, msg
        if err[0] == "duplicate":
            assert "duplicate" in msg and "#fairseq:overwrite" in msg, msg
        if err[0] == "encoding":
            assert "UTF-8" in msg, msg
        return
    assert p.returncode == 0, p.stderr
    rows = [r.split(b" ") for r in p.stdout.split(b"\n")[:-1]]
    assert len(rows) == len(want)
    for i, (rid, cnt, sym, idx) in enumerate(rows):
        s = bytes.fromhex(sym.decode()).decode()
        assert int(rid) == i
        assert s == want.symbols[i], (name, i)
        assert int(cnt) == max(min(want.count[i], 2**63 - 1), -(2**63)), (name, i)
        assert int(idx) == want.index(s), (name, i)
