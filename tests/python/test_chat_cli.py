"""`nzp chat` (models/nzp_chat.c) on the tiny real dialogue model of
test_dialogue_server (server_util.build_dialogue_model), piped: every printed
reply equals what the PyTorch reference (t5md_ref) answers to the same
conversation, where the conversation grows by the user's line and the
best-ranked reply each turn (or the last --history turns of it); --all prints
every decoder's response ranked (decoder, score, text, then an empty line);
greedy, beam and sampling; --decoders, --distinct, --no-repeat-ngram, /reset, blank lines; and
the errors: usage (exit 2), a model that is not a dialogue model or missing
(exit 1).
"""

import subprocess

import pytest

import server_util as U
import test_dialogue_server as D
import test_t5md_parity as P

MNT = 12
LINES = ["hello there", "how are you doing today ?", "do you like music", "yes a lot"]


@pytest.fixture(scope="module")
def dmodel(nzp, tmp_path_factory):
    P.require_torch()
    return U.build_dialogue_model(nzp, tmp_path_factory.mktemp("chat"), name=D.MODEL_NAME, seed=D.MODEL_SEED)


def chat(nzp, model, lines, *args, check=True):
    p = subprocess.run([nzp, "chat", str(model), "--max-new-tokens", str(MNT), *map(str, args)],
                       input="".join(l + "\n" for l in lines), capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, (p.returncode, p.stderr)
    return p


def conversation(dmodel, lines, history=0, distinct=False, rank="logprob", **ref_opts):
    """The reference session: [(ranked [(result, text)] of each answered line)]."""
    hist, out = [], []
    for line in lines:
        if not line.strip():
            continue
        if line == "/reset":
            hist = []
            continue
        hist.append(line)
        ctx = hist[-history:] if history else hist
        exp = D.expected(dmodel, D.reference(dmodel, list(ctx), mnt=MNT, rank=rank, **ref_opts), distinct, rank)
        out.append(exp)
        hist.append(exp[0][1])
    return out


def check_all(stdout, want):
    """--all output (groups of K<TAB>SCORE<TAB>TEXT lines, each followed by an empty line) == want."""
    groups = stdout.split("\n\n")
    assert groups[-1] == "", stdout
    groups = groups[:-1]
    assert len(groups) == len(want), stdout
    for g, exp in zip(groups, want):
        rows = [l.split("\t") for l in g.split("\n")]
        assert all(len(r) == 3 for r in rows), g
        assert len(rows) == len(exp), (g, exp)
        by_dec = {w["decoder"]: (w, t) for w, t in exp}
        for k, score, text in rows:
            w, t = by_dec[int(k)]
            assert text == t, (k, text, t)
            assert abs(float(score) - w["mean_logprob"]) <= 2e-6 + D.ATOL, (k, score, w["mean_logprob"])
        scores = [float(r[1]) for r in rows]
        assert scores == sorted(scores, reverse=True), scores
        assert int(rows[0][0]) == exp[0][0]["decoder"], (rows, exp)


def test_rank_consensus(nzp, dmodel):
    """--rank consensus answers each turn with the response the other decoders agree with most (and that
    answer goes into the history)."""
    p = chat(nzp, dmodel[0], LINES, "--rank", "consensus")
    want = conversation(dmodel, LINES, rank="consensus")
    assert p.stdout.split("\n") == [exp[0][1] for exp in want] + [""], (p.stdout, want)
    assert want != conversation(dmodel, LINES)  # the test model's two rankings differ somewhere


def test_piped_session_greedy(nzp, dmodel):
    p = chat(nzp, dmodel[0], LINES)
    want = conversation(dmodel, LINES)
    assert p.stdout.split("\n") == [exp[0][1] for exp in want] + [""], (p.stdout, want)
    assert p.stderr == ""  # no prompt when stdin is not a terminal


def test_all_ranked(nzp, dmodel):
    p = chat(nzp, dmodel[0], LINES, "--all")
    check_all(p.stdout, conversation(dmodel, LINES))


def test_history_window(nzp, dmodel):
    # only the last turn: every line is answered as if the conversation began there
    p = chat(nzp, dmodel[0], LINES, "--history", 1, "--all")
    want = conversation(dmodel, LINES, history=1)
    check_all(p.stdout, want)
    assert want == [conversation(dmodel, [l])[0] for l in LINES]
    # the history matters: with all of it, the later answers differ
    assert [e[0][1] for e in conversation(dmodel, LINES)] != [e[0][1] for e in want]
    p = chat(nzp, dmodel[0], LINES, "--history", 3)
    assert p.stdout.split("\n")[:-1] == [e[0][1] for e in conversation(dmodel, LINES, history=3)]


def test_reset_and_blank_lines(nzp, dmodel):
    lines = ["hello there", "", "   ", "how are you doing today ?", "/reset", "how are you doing today ?"]
    p = chat(nzp, dmodel[0], lines)
    want = conversation(dmodel, lines)
    assert len(want) == 3
    assert p.stdout.split("\n")[:-1] == [e[0][1] for e in want]
    assert want[2] == conversation(dmodel, ["how are you doing today ?"])[0]


@pytest.mark.parametrize("args,ref", [
    (["--strategy", "beam", "--beam", 3], dict(strategy="beam", beam_size=3)),
    (["--beam", 2], dict(strategy="beam", beam_size=2)),
    (["--strategy", "sample", "--seed", 7, "--top-k", 10, "--top-p", 0.9],
     dict(strategy="sample", seed=7, top_k=10, top_p=0.9)),
    (["--temperature", 1.3, "--seed", 3], dict(strategy="sample", temperature=1.3, seed=3)),
    (["--decoders", "2,0"], dict(decoders=[2, 0])),
    (["--decoders", "1", "--strategy", "sample"], dict(decoders=[1], strategy="sample")),
])
def test_strategies(nzp, dmodel, args, ref):
    p = chat(nzp, dmodel[0], LINES[:3], "--all", *args)
    check_all(p.stdout, conversation(dmodel, LINES[:3], **ref))


@pytest.mark.parametrize("args,ref", [
    (["--no-repeat-ngram", 2], dict(no_repeat_ngram=2)),
    (["--no-repeat-ngram", 1, "--beam", 3], dict(no_repeat_ngram=1, strategy="beam", beam_size=3)),
    (["--no-repeat-ngram", 3, "--seed", 5], dict(no_repeat_ngram=3, strategy="sample", seed=5)),
])
def test_no_repeat_ngram(nzp, dmodel, args, ref):
    """--no-repeat-ngram N == t5md_ref's no_repeat_ngram=N, and it changes the (repetitive) answers."""
    p = chat(nzp, dmodel[0], LINES, "--all", *args)
    want = conversation(dmodel, LINES, **ref)
    check_all(p.stdout, want)
    plain = dict(ref, no_repeat_ngram=0)
    assert [[w["tokens"] for w, _ in e] for e in want] != \
        [[w["tokens"] for w, _ in e] for e in conversation(dmodel, LINES, **plain)]
    assert chat(nzp, dmodel[0], LINES, "--all", *args[2:], "--no-repeat-ngram", 0).stdout == \
        chat(nzp, dmodel[0], LINES, "--all", *args[2:]).stdout  # 0 = off = the default


def test_distinct(nzp, dmodel):
    lines = [D.DUP_CONTEXT[0]]
    want = conversation(dmodel, lines, distinct=True)
    assert len(want[0]) < D.K
    check_all(chat(nzp, dmodel[0], lines, "--all", "--distinct").stdout, want)
    check_all(chat(nzp, dmodel[0], lines, "--all").stdout, conversation(dmodel, lines))


def test_threads_and_cache_same_answers(nzp, dmodel):
    base = chat(nzp, dmodel[0], LINES).stdout
    assert chat(nzp, dmodel[0], LINES, "--threads", 2, "--cache", 1 << 20).stdout == base
    assert chat(nzp, dmodel[0], LINES, "--threads", 1, "--cache", 0).stdout == base


@pytest.mark.parametrize("args,needle", [
    ([], "no model given"),
    (["MODEL", "--strategy", "nucleus"], "--strategy"),
    (["MODEL", "--beam", 0], "--beam"),
    (["MODEL", "--top-p", 0], "--top-p"),
    (["MODEL", "--top-p", 1.5], "--top-p"),
    (["MODEL", "--temperature", -1], "--temperature"),
    (["MODEL", "--max-new-tokens", 0], "--max-new-tokens"),
    (["MODEL", "--no-repeat-ngram", -1], "--no-repeat-ngram"),
    (["MODEL", "--no-repeat-ngram", "x"], "--no-repeat-ngram"),
    (["MODEL", "--no-repeat-ngram", 65537], "--no-repeat-ngram"),
    (["MODEL", "--no-repeat-ngram"], "--no-repeat-ngram"),
    (["MODEL", "--decoders", "0,0"], "--decoders"),
    (["MODEL", "--decoders", "1,"], "--decoders"),
    (["MODEL", "--decoders", "x"], "--decoders"),
    (["MODEL", "--history"], "--history"),
    (["MODEL", "--rank", "bleu"], "--rank"),
    (["MODEL", "--bogus"], "--bogus"),
    (["MODEL", "--strategy", "greedy", "--seed", 3], "does not apply to --strategy greedy"),
    (["MODEL", "--beam", 3, "--temperature", 0.5], "different strategies"),
    (["MODEL", "--decoders", "0,3"], "decoder 3 is out of range"),
])
def test_usage_errors(nzp, dmodel, args, needle):
    args = [str(dmodel[0]) if a == "MODEL" else str(a) for a in args]
    p = subprocess.run([nzp, "chat", *args], input="hi\n", capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert needle in p.stderr, p.stderr
    assert p.stdout == ""


def test_model_errors(nzp, dmodel, tmp_path, tmp_path_factory):
    p = subprocess.run([nzp, "chat", str(tmp_path / "missing.nzp")], input="hi\n", capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and "missing.nzp" in p.stderr, p.stderr
    tr, _, _ = U.build_translation_model(nzp, tmp_path_factory)
    p = subprocess.run([nzp, "chat", str(tr)], input="hi\n", capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "t5_multidecoder" in p.stderr, p.stderr
    assert p.stdout == ""


def test_help_lists_chat(nzp):
    p = subprocess.run([nzp, "help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "nzp chat MODEL.nzp" in p.stdout


def repack(nzp, model_path, out_dir, *sets, check=True):
    """The dialogue model packed again with `--set` pairs. @return (the new .nzp, the pack's process)."""
    mdir = out_dir / "mdir"
    mdir.mkdir(parents=True, exist_ok=True)
    P.run([nzp, "unpack", "--model-dir", model_path, mdir])
    out = out_dir / "gen.nzp"
    args = [a for kv in sets for a in ("--set", kv)]
    p = subprocess.run([str(nzp), "pack", "--mode", "lossless", *map(str, P.PACK_ARGS), *args, str(mdir),
                        str(out)], capture_output=True, text=True)
    if check:
        assert p.returncode == 0, p.stderr
    return out, p


def test_model_generation_defaults(nzp, dmodel, tmp_path):
    """A dialogue model's config "generation" decides what the command line leaves out; flags override it."""
    gen, _ = repack(nzp, dmodel[0], tmp_path, "generation.strategy=beam", "generation.beam_size=3",
                    "generation.no_repeat_ngram_size=2", "generation.temperature=0.5")
    info = P.run([nzp, "info", gen]).stdout
    assert 'generation: {"strategy":"beam","beam_size":3,"no_repeat_ngram_size":2,"temperature":0.5}' in info
    check_all(chat(nzp, gen, LINES, "--all").stdout,
              conversation(dmodel, LINES, strategy="beam", beam_size=3, no_repeat_ngram=2))
    check_all(chat(nzp, gen, LINES, "--all", "--strategy", "greedy").stdout,
              conversation(dmodel, LINES, no_repeat_ngram=2))
    check_all(chat(nzp, gen, LINES, "--all", "--no-repeat-ngram", 0, "--beam", 2).stdout,
              conversation(dmodel, LINES, strategy="beam", beam_size=2))
    check_all(chat(nzp, gen, LINES[:2], "--all", "--length-penalty", 2.5).stdout,  # implies beam
              conversation(dmodel, LINES[:2], strategy="beam", beam_size=3, no_repeat_ngram=2, length_penalty=2.5))
    # a sampling flag switches to sampling, with the model's temperature
    check_all(chat(nzp, gen, LINES[:2], "--all", "--seed", 4).stdout,
              conversation(dmodel, LINES[:2], strategy="sample", seed=4, temperature=0.5, no_repeat_ngram=2))


@pytest.mark.parametrize("kv,msg", [
    ("generation.strategy=nucleus", "'strategy' must be \"greedy\", \"beam\" or \"sample\""),
    ("generation.top_p=0", "'top_p' must be a number in (0, 1]"),
    ("generation.beam_size=0", "'beam_size' must be an integer in [1, 1024]"),
    ("generation.no_repeat=3", "unknown key 'no_repeat' (known: strategy, beam_size,"),
    ("generation.distinct=1", "'distinct' must be true or false"),
    ("generation.length_penalty=-1", "'length_penalty' must be a number in [0, 10]"),
    ("generation.rank=bleu", "'rank' must be"),
])
def test_bad_generation_refused(nzp, dmodel, tmp_path, kv, msg):
    out, p = repack(nzp, dmodel[0], tmp_path, kv, check=False)
    assert p.returncode == 1 and msg in p.stderr, p.stderr  # checked before the file is kept
    assert not out.exists()
