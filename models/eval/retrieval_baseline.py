#!/usr/bin/python3
"""Reference points for dialogue BLEU: what a model-free system scores on the same
held-out contexts, so a model's BLEU can be read on a scale.

    /usr/bin/python3 models/eval/retrieval_baseline.py --train TRAIN.jsonl --test TEST.jsonl \
        [--source sgd] [--limit N]

* retrieval: the response of the training pair whose context is nearest: words of
  the last turn plus (marked apart) words of the turn before, scored by the sum of
  their inverse document frequencies (words in more than 10 % of the pairs,
  and more than 2, ignored); ties go to the earlier pair.
* constant: the most frequent training response, for every context.

BLEU as models/eval/dialogue_eval.py reports it (corpus BLEU, 13a, lower-cased).
Pairs are JSONL {"context": [turns], "response": str, "source": str}; --source
keeps one source on both sides.
"""

import argparse
import collections
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bleu as B  # noqa: E402

_W = re.compile(r"[a-z0-9']+")


def context_words(context):
    """The last turn's words and the previous turn's (prefixed 'P:')."""
    turns = [context] if isinstance(context, str) else list(context)
    w = set(_W.findall(turns[-1].lower())) if turns else set()
    if len(turns) > 1:
        w |= {"P:" + x for x in _W.findall(turns[-2].lower())}
    return w


def read_pairs(path, source, limit=0):
    out = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            d = json.loads(line)
            if source and d.get("source") != source:
                continue
            out.append(d)
            if limit and len(out) >= limit:
                break
    return out


class Retriever:
    """IDF-weighted word overlap over an inverted index of the training contexts."""

    def __init__(self, train, max_df=0.1):
        self.train = train
        self.index = collections.defaultdict(list)
        for i, d in enumerate(train):
            for w in context_words(d["context"]):
                self.index[w].append(i)
        n = len(train)
        cap = max(2.0, max_df * n)
        self.idf = {w: math.log(n / len(ix)) for w, ix in self.index.items() if len(ix) <= cap}

    def nearest(self, context):
        """@return the index of the nearest training pair, or None when no word is shared."""
        score = collections.defaultdict(float)
        for w in context_words(context):
            idf = self.idf.get(w)
            if idf is None:
                continue
            for i in self.index[w]:
                score[i] += idf
        return min(score, key=lambda i: (-score[i], i)) if score else None


def bleu(hyps, refs):
    return B.corpus_bleu([h.lower() for h in hyps], [[r.lower() for r in refs]])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--source", default="", help="keep this source only (e.g. sgd)")
    p.add_argument("--limit", type=int, default=0, help="first N test pairs")
    a = p.parse_args(argv)
    train = read_pairs(a.train, a.source)
    test = read_pairs(a.test, a.source, a.limit)
    if not train or not test:
        raise SystemExit("no pairs%s in %s" % (" of source " + a.source if a.source else "",
                                               a.train if not train else a.test))
    constant = collections.Counter(d["response"] for d in train).most_common(1)[0][0]
    r = Retriever(train)
    hyps = []
    for d in test:
        i = r.nearest(d["context"])
        hyps.append(train[i]["response"] if i is not None else constant)
    refs = [d["response"] for d in test]
    print("%d test pairs, %d training pairs%s" % (len(test), len(train), " (%s)" % a.source if a.source else ""))
    print("retrieval: %s" % bleu(hyps, refs))
    print("constant %r: %s" % (constant, bleu([constant] * len(refs), refs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
