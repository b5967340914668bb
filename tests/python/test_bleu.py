"""models/eval/bleu.py against values published by sacreBLEU's documentation and
hand-computed cases."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "models", "eval"))
import bleu  # noqa: E402


def test_sacrebleu_readme_example():
    # sacreBLEU README: two reference streams -> "BLEU = 48.53 82.4/50.0/45.5/37.5
    # (BP = 0.943 ratio = 0.944 hyp_len = 17 ref_len = 18)"
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = [["The dog bit the man.", "It was not unexpected.", "The man bit him first."],
            ["The dog had bit the man.", "No one was surprised.", "The man had bitten the dog."]]
    s = bleu.corpus_bleu(hyps, refs)
    assert s.score == pytest.approx(48.530827009929865, abs=1e-9)
    assert [round(p, 1) for p in s.precisions] == [82.4, 50.0, 45.5, 37.5]
    assert (s.sys_len, s.ref_len) == (17, 18)
    assert str(s).startswith("BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = 0.943 ratio = 0.944")


def test_13a_tokenizer():
    assert bleu.tokenize_13a("Hello, world! 3.14 and 1,000 -- 5-6 a&amp;b") == \
        "Hello , world ! 3.14 and 1,000 -- 5 - 6 a & b"  # a dash splits only after a digit
    assert bleu.tokenize_13a("  spaced   out  ") == "spaced out"


def test_identity_and_empty():
    lines = ["Die Datei wurde nicht gefunden.", "Speichern unter …", "Fehler: %s"]
    assert bleu.corpus_bleu(lines, [lines]).score == pytest.approx(100.0)
    assert bleu.corpus_bleu(["x y z"] * 3, [lines]).score == 0.0
    assert bleu.corpus_bleu([""] * 3, [lines]).score == 0.0
    with pytest.raises(ValueError):
        bleu.corpus_bleu(lines, [lines[:2]])


def test_brevity_penalty_and_smoothing():
    # a 3-word hypothesis has no 4-grams: sacreBLEU stops at total == 0 and scores 0;
    # the brevity penalty is exp(1 - 6/3)
    s = bleu.corpus_bleu(["a b c"], [["a b c d e f"]])
    assert s.bp == pytest.approx(2.718281828459045 ** (1 - 6 / 3))
    assert s.score == 0.0
    # 4-word hypothesis, 4-gram present but wrong: smoothed p4 = 100 / (2 * 1)
    s = bleu.corpus_bleu(["a b c x"], [["a b c d"]])
    assert s.precisions == pytest.approx([75.0, 200 / 3, 50.0, 50.0])
    assert s.score == pytest.approx((75.0 * 200 / 3 * 50.0 * 50.0) ** 0.25)
