"""models/eval/retrieval_baseline.py: the model-free reference points of the dialogue BLEU table."""
import json
import os
import sys

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "models", "eval"))
import retrieval_baseline as RB  # noqa: E402

TRAIN = [
    {"context": ["I need a cab.", "Where to?", "To the airport please."], "response": "How many people?", "source": "sgd"},
    {"context": ["Find me a restaurant in Oakland."], "response": "What cuisine do you like?", "source": "sgd"},
    {"context": ["Thanks, that is all."], "response": "Have a nice day.", "source": "sgd"},
    {"context": ["Thanks, that is all."], "response": "Goodbye.", "source": "sgd"},
    {"context": ["What say you, my lord?"], "response": "Nothing, my lord.", "source": "shakespeare"},
]


def test_nearest_weights_rare_words_and_the_previous_turn():
    r = RB.Retriever(TRAIN, max_df=1.0)
    assert r.nearest(["Please find a restaurant in Oakland"]) == 1
    assert r.nearest(["Thanks, that is all."]) == 2  # a tie goes to the earlier pair
    assert r.nearest(["zzz"]) is None
    # the previous turn counts apart from the last one
    assert RB.context_words(["a cab", "to the airport"]) == {"P:a", "P:cab", "to", "the", "airport"}


def test_cli_scores_train_pairs_perfectly(tmp_path, capsys):
    tr, te = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    tr.write_text("".join(json.dumps(d) + "\n" for d in TRAIN))
    te.write_text("".join(json.dumps(d) + "\n" for d in TRAIN[:2]))
    assert RB.main(["--train", str(tr), "--test", str(te), "--source", "sgd"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2 test pairs, 4 training pairs (sgd)"
    assert out[1].startswith("retrieval: BLEU = 100.00")
    with pytest.raises(SystemExit, match="no pairs of source woz"):
        RB.main(["--train", str(tr), "--test", str(te), "--source", "woz"])
