"""models/eval/dialogue_eval.py's pieces that turn a runner's output into what a user sees: the decoding
names (with -pool, every beam return for the consensus ranking) and the pooled choice of each decoder's
response (the runner's pooled line), on hand-made runner output."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "models", "eval"))
import dialogue_eval as E  # noqa: E402


def test_decode_args():
    assert E.decode_args("greedy") == ["--greedy"]
    assert E.decode_args("beam4-nr3-lp1.5") == ["--beam", "4", "--no-repeat-ngram", "3", "--lenpen", "1.5"]
    assert E.decode_args("beam3-lp2-pool") == ["--beam", "3", "--lenpen", "2", "--num-return", "3"]
    for bad in ("greedy-pool", "nucleus0.9-pool", "beam4-pool-nr3", "topk5"):
        with pytest.raises(SystemExit):
            E.decode_args(bad)


def out_line(ctx, k, ret, mean, text):
    return "\t".join(["out", str(ctx), str(k), str(ret), "5 1", str(mean), str(2 * mean), "-0.5", "1", "-1 -1",
                      text])


def test_decoded_pooled_and_plain():
    lines = [out_line(0, 0, 0, -1.0, "a0"), out_line(0, 0, 1, -2.0, "a1"),
             out_line(0, 1, 0, -0.5, "b0"), out_line(0, 1, 1, -3.0, "b1"),
             "rank\t0\t1 0", "consensus\t0\t0:0.25 1:0.125"]
    plain = E.parse_runner("\n".join(lines))
    gens, gens_lp, cons_rank, cons_value, shown = E.decoded(plain, 1)
    assert gens == [[(0, -1.0, "a0"), (1, -0.5, "b0")]] and gens_lp is None
    assert cons_rank == [[0, 1]] and cons_value[0] == {0: 0.25, 1: 0.125}
    pooled = E.parse_runner("\n".join(lines + ["pooled\t0\t1:1:0.5 0:0:0.375"]))
    gens, gens_lp, cons_rank, cons_value, shown = E.decoded(pooled, 1)
    assert gens == [[(0, -1.0, "a0"), (1, -3.0, "b1")]]  # decoder 1 answers with its second return
    assert gens_lp == [[(0, -1.0, "a0"), (1, -0.5, "b0")]]
    assert cons_rank == [[1, 0]] and cons_value[0] == {1: 0.5, 0: 0.375}
    top, top_c = E.top_texts(gens, cons_rank, gens_lp)
    assert top == ["b0"] and top_c == ["b1"]  # by log-prob among the best returns; by pooled consensus
    assert [e["text"] for e in shown[0]] == ["a0", "b1"]
