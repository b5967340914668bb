"""Batch invariance of the engine ("same tokens as alone", issue 16 item 3):
the demo translator (models/demo/nat-ende.nzp) gives every sentence of its
test sample (models/demo/nat-ende.sample.en) the same output tokens, and the
same scores, whether the sentences are decoded one at a time (--batch 1) or
16 (or 7) at a time, each batch padded to its longest sentence: the matmul kernels compute each row by a fixed sequence that does not
depend on the batch (engine/nz_gemm.h, engine/nz_esc.h) and attention skips
padded keys (nz_attention). Checked through `nzp translate --tokens` (decode-
every-use and with a tile cache; the model's default decoding, AT beam 4)
and through $NAT_RUNNER (tests/nat_runner.c, which prints each result's
score) for the AT beam, AT greedy and mask-predict with a length beam and AT
rerank.

Before the kernels were made batch-invariant, a quarter of the sample's
scores differed between --batch 1 and --batch 16 (OpenBLAS's sgemm rounds a
row differently with the rows around it; sgemv over padded keys changes its
blocking with Tk). NZ_TEST_QUICK=1 and an ASan build use 24 lines; under valgrind
(NZP_REAL set by `make valgrind`) two lines, uncached, nzp only."""

import os
import subprocess

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEMO = os.path.join(REPO, "models", "demo", "nat-ende.nzp")
SAMPLE_EN = os.path.join(REPO, "models", "demo", "nat-ende.sample.en")
VALGRIND = bool(os.environ.get("NZP_REAL"))
QUICK = os.environ.get("NZ_TEST_QUICK", "") not in ("", "0")


def sanitized():
    """Whether the binaries under test are an ASan build (`make asan`): ~10x slower, so fewer lines."""
    nzp = os.environ.get("NZP", os.path.join(REPO, "build", "nzp"))
    try:
        out = subprocess.run(["ldd", nzp], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "libasan" in out


NLINES = 2 if VALGRIND else 24 if QUICK or sanitized() else 0  # 0: the whole sample (100 lines)


def binary(env, name):
    path = os.environ.get(env, os.path.join(REPO, "build", name))
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} not found at {path}: run `make` first")
    return path


def sample():
    with open(SAMPLE_EN, encoding="utf-8") as f:
        lines = [l.rstrip("\n") for l in f]
    return lines[:NLINES] if NLINES else lines


def run(cmd, stdin):
    p = subprocess.run([str(c) for c in cmd], input=stdin, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    return p.stdout.split("\n")[:-1]


@pytest.mark.parametrize("cache", ["0", "67108864"], ids=["uncached", "cached"])
def test_translate_tokens_same_in_any_batch(nzp, cache):
    """The model's default decoding (AT beam 4), as `nzp translate` and the server run it."""
    if VALGRIND and cache != "0":
        pytest.skip("under valgrind: the uncached run only")
    src = sample()
    stdin = "".join(l + "\n" for l in src)
    outs = {b: run([nzp, "translate", DEMO, "--tokens", "--threads", "2", "--cache", cache, "--batch", b],
                   stdin) for b in (1, 16)}
    assert len(outs[1]) == len(src) == len(outs[16])
    diff = [i for i, (a, b) in enumerate(zip(outs[1], outs[16])) if a != b]
    assert not diff, f"--batch 16 changes the tokens of lines {diff[:10]} (of {len(src)})"


@pytest.fixture(scope="module")
def sample_ids():
    """The sample's source ids ([bos, x.., eos]), from the model's own tokenizer."""
    if VALGRIND:
        pytest.skip("nat_runner and tok_cli are not run under valgrind here")
    tok = binary("TOK_CLI", "tok_cli")
    ids = run([tok, "--bos", "encode", DEMO], "".join(l + "\n" for l in sample()))
    assert ids and not any(l.startswith("ERROR") for l in ids)
    return ids


# (decoding, batch sizes, lines: mask-predict with a length beam of 5 is the slow one at --batch 1)
@pytest.mark.parametrize("decoding,batches,n", [(["--at-beam", "4"], (1, 16), 0), (["--at-greedy"], (1, 7, 16), 0),
                                                (["--iter", "4", "--beam", "5", "--rerank"], (1, 16), 40)],
                         ids=["at-beam4", "at-greedy", "mask-predict"])
def test_scores_same_in_any_batch(sample_ids, decoding, batches, n):
    runner = binary("NAT_RUNNER", "nat_runner")
    ids = sample_ids[:n] if n else sample_ids
    stdin = "".join(l + "\n" for l in ids)
    outs = {b: run([runner, DEMO, "--threads", "2", "--batch", b, *decoding], stdin) for b in batches}
    assert all("\t" in l for l in outs[1])  # "<ids>\t<score>": the scores are compared too
    for batch in batches[1:]:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(outs[1], outs[batch])) if a != b]
        assert not diff, f"--batch {batch} vs 1: {len(diff)} of {len(ids)} lines differ, first {diff[0]}"
