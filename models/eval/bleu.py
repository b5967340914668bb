#!/usr/bin/python3
"""Corpus BLEU as sacreBLEU computes it by default (13a tokenizer, case-sensitive,
exponential smoothing, up to 4-grams, closest reference length), written from the
published definitions (Papineni et al. 2002; Post 2018, "A Call for Clarity in
Reporting BLEU Scores") because Debian 12 ships no python3-sacrebleu.

    bleu.py HYP.txt REF.txt [REF2.txt ...]      prints "BLEU = 48.53 82.4/50.0/45.5/37.5 (BP = ...)"

As a module: corpus_bleu(hyps, [refs1, refs2, ...]) -> BLEUScore.
"""

import math
import re
import sys
from collections import Counter
from dataclasses import dataclass

# mteval-v13a tokenisation (sacreBLEU's "13a"): punctuation and symbols split off,
# periods and commas split unless between digits, a dash after a digit split.
_13A_RULES = [
    (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),
    (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),
    (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
]


def tokenize_13a(line):
    """Tokenise one line the mteval-v13a way."""
    line = line.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    if "&" in line:
        line = line.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    line = f" {line} "
    for rx, sub in _13A_RULES:
        line = rx.sub(sub, line)
    return " ".join(line.split())


def ngrams(words, n_max=4):
    """Counter of every n-gram (tuple) of words for n = 1..n_max."""
    c = Counter()
    for n in range(1, n_max + 1):
        for i in range(len(words) - n + 1):
            c[tuple(words[i:i + n])] += 1
    return c


@dataclass
class BLEUScore:
    score: float
    precisions: list
    bp: float
    ratio: float
    sys_len: int
    ref_len: int
    counts: list
    totals: list

    def __str__(self):
        p = "/".join(f"{x:.1f}" for x in self.precisions)
        return (f"BLEU = {self.score:.2f} {p} (BP = {self.bp:.3f} ratio = {self.ratio:.3f} "
                f"hyp_len = {self.sys_len} ref_len = {self.ref_len})")


def corpus_bleu(hyps, ref_streams, max_n=4):
    """BLEU of hyps (list of str) against one or more reference streams (lists of
    str, each as long as hyps). Counts are clipped by the maximum count over the
    references; the reference length is the closest one (shorter on ties)."""
    if any(len(r) != len(hyps) for r in ref_streams):
        raise ValueError("every reference stream must have as many lines as the hypotheses")
    correct, total = [0] * max_n, [0] * max_n
    sys_len = ref_len = 0
    for i, hyp in enumerate(hyps):
        h = tokenize_13a(hyp.strip()).split()
        refs = [tokenize_13a(r[i].strip()).split() for r in ref_streams]
        sys_len += len(h)
        closest = min(refs, key=lambda r: (abs(len(r) - len(h)), len(r)))
        ref_len += len(closest)
        max_ref = Counter()
        for r in refs:
            for g, c in ngrams(r, max_n).items():
                if c > max_ref[g]:
                    max_ref[g] = c
        for g, c in ngrams(h, max_n).items():
            n = len(g) - 1
            total[n] += c
            correct[n] += min(c, max_ref.get(g, 0))
    # sacreBLEU's default "exp" smoothing: each n-gram order without a match gets
    # precision 100 / (2^k * total), k counting such orders so far
    precisions = [0.0] * max_n
    if not any(correct):  # sacreBLEU stops early: no matches at all scores 0
        ratio = sys_len / ref_len if ref_len else 0.0
        bp = math.exp(1 - ref_len / sys_len) if 0 < sys_len < ref_len else float(sys_len > 0)
        return BLEUScore(0.0, precisions, bp, ratio, sys_len, ref_len, correct, total)
    smooth = 1.0
    for n in range(max_n):
        if total[n] == 0:
            break
        if correct[n] == 0:
            smooth *= 2
            precisions[n] = 100.0 / (smooth * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    if sys_len == 0:
        bp = 0.0
    elif sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len)
    else:
        bp = 1.0
    if min(precisions) <= 0:
        score = 0.0
    else:
        score = bp * math.exp(sum(math.log(p) for p in precisions) / max_n)
    ratio = sys_len / ref_len if ref_len else 0.0
    return BLEUScore(score, precisions, bp, ratio, sys_len, ref_len, correct, total)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


def main(argv):
    if len(argv) < 3:
        sys.stderr.write(__doc__)
        return 2
    hyps = _read(argv[1])
    refs = [_read(p) for p in argv[2:]]
    print(corpus_bleu(hyps, refs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
