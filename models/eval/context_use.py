#!/usr/bin/python3
"""How much a dialogue model (t5_multidecoder model directory) uses its context: the perplexity of the
held-out responses (teacher forcing, models/train/t5md_ref.py, unk not banned, every decoder averaged) given their own
context, another test pair's context (a fixed shuffle), and an empty one. A model that has learned to
answer its context scores the true context far better than a shuffled one; one that only models
responses (a language model of the replies) scores them alike.

    /usr/bin/python3 models/eval/context_use.py --model-dir DIR --test test.jsonl [--source sgd] [--limit 80]

test.jsonl holds {"context": [turns], "response": str, "source": name} lines (build_dialogue_corpus_v2.py's
splits); --source keeps one source's lines. Prints one line per context kind: perplexity and tokens.
"""

import argparse
import json
import math
import os
import random
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "models", "train"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--source", help="keep this source's lines only")
    p.add_argument("--limit", type=int, default=80)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    import torch
    import t5md_ref as R
    torch.set_num_threads(a.threads)
    model, _ = R.load_model_dir(a.model_dir)
    tok = R.load_tokenizer(a.model_dir)
    with open(a.test, encoding="utf-8") as f:
        data = [json.loads(ln) for ln in f if ln.strip()]
    if a.source:
        data = [d for d in data if d.get("source") == a.source]
    data = data[:a.limit]
    if len(data) < 2:
        p.error("fewer than 2 test pairs")
    perm = list(range(len(data)))
    random.Random(0).shuffle(perm)
    kinds = {"true context": lambda i: data[i]["context"],
             "another pair's context": lambda i: data[perm[i] if perm[i] != i else (i + 1) % len(data)]["context"],
             "empty context": lambda i: [""]}
    for name, ctx in kinds.items():
        nll, ntok = 0.0, 0
        for i, d in enumerate(data):
            resp = tok.encode_response(d["response"])
            rows = R.score_responses(model, tok.encode_context(ctx(i)), [resp], ban_unk=False)[0]
            nll -= sum(sum(r["token_logprobs"]) for r in rows) / len(rows)
            ntok += len(resp)
        print("%-24s perplexity %8.2f  (%d pairs, %d tokens)" % (name, math.exp(nll / ntok), len(data), ntok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
