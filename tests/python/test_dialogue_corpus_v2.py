"""models/train/build_dialogue_corpus_v2.py's speaker rule (assistant_responses): conversations open with
the user and alternate; with fewer context turns than the file's longest the turn count tells the
speaker, a full context continues the pair before it, and a full context that does not (its conversation
cannot be followed back) is unknown."""
import os
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(REPO, "models", "train"))

import build_dialogue_corpus_v2 as C  # noqa: E402


def conversation(turns, max_ctx=4):
    """The pairs of one conversation as the shared files hold them (up to max_ctx turns of context)."""
    return [{"context": turns[max(0, i - max_ctx):i], "response": turns[i]} for i in range(1, len(turns))]


def test_speakers_follow_the_turns():
    a = conversation(["u0", "s1", "u2", "s3", "u4", "s5", "u6", "s7"])  # responses s1 u2 s3 u4 s5 u6 s7
    b = conversation(["v0", "t1", "v2"])
    roles = C.assistant_responses(a + b)
    assert roles == [True, False, True, False, True, False, True] + [True, False]


def test_a_broken_chain_is_unknown():
    a = conversation(["u0", "s1", "u2", "s3", "u4", "s5", "u6"])
    del a[3]  # the first full-context pair removed (a duplicate elsewhere): its follower cannot be told
    roles = C.assistant_responses(a)
    assert roles == [True, False, True, None, None]
    # a new conversation starts known again
    assert C.assistant_responses(a + conversation(["x0", "y1"]))[-1] is True
