"""nzserve's /v1/dialogue end to end, against a real binary ($NZSERVE, default
build/nzserve) serving a tiny real dialogue model: SentencePiece trained here,
a random-weight t5_multidecoder (test_t5md_parity's "transformer-gated-
untied-k3", K = 3 decoders whose responses vary) packed lossless; built by
server_util.build_dialogue_model.

Responses are compared with the PyTorch reference models/train/t5md_ref.py on
exactly the packed weights: greedy / beam / sample tokens of every decoder,
text (Tokenizer.decode), score (mean token log-prob), the ranking
(t5md_ref.rank), usage; the decoders subset, the distinct filter and
no_repeat_ngram_size. Errors:
every class the route has (400 401 404 405 413 422 429 503 504). Streaming
(server-sent events): the token events of each decoder rebuild its final
response (ids and text), the "done" event equals the plain response, errors
after the stream began come as an "error" event; a client that disconnects
mid-stream (or while its streamed request is queued, or abruptly at any
moment, with a FIN or a reset) cancels it: the worker is free at once, the
cancelled counter and the access log (499) say so, and the server still
stops cleanly (every request freed).
Deadlines (504), API keys, readiness, queue limits, metrics and a graceful
shutdown with a stream in flight.

Slow requests use the test hook NZSERVE_DEBUG_STEP_DELAY_MS (a sleep before
every decoder step): SLOW_CONTEXT keeps two decoders generating up to
max_new_tokens on this model, so a request takes about max_new_tokens x delay.
"""

import json
import os
import re
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import server_util as U
from server_util import Server, access_log

import test_t5md_parity as P

R = P.R
MODEL_NAME, MODEL_SEED, K = "transformer-gated-untied-k3", 1, 3
MNT = 16  # max_new_tokens of the parity requests
ATOL = 1e-4
CONTEXTS = [
    "hello there",
    ["hello there", "how are you doing today ?"],
    ["do you like music"],  # two decoders answer with the same (empty) text: the distinct filter drops one
    ["  i am fine ", "thanks , what about you", "the weather is nice"],
    ["yes", "a lot"],
]
DUP_CONTEXT = CONTEXTS[2]
SLOW_CONTEXT = "hello there"  # decoders 0 and 2 never emit eos on this model

ERROR_TYPES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 422: "validation_error", 429: "queue_full", 503: "unavailable",
               504: "deadline_exceeded"}


def slow(n, **kw):
    """A request that takes about n step delays (greedy, every decoder)."""
    return {"context": SLOW_CONTEXT, "max_new_tokens": n, **kw}


def assert_error(r, status, type_=None):
    """r is an error response of this status with the JSON error shape."""
    assert r.status == status, r
    assert r.header("Content-Type") == "application/json", r.header("Content-Type")
    e = r.json()["error"]
    assert set(e) == {"code", "type", "message"} and e["code"] == status, e
    assert e["type"] == (type_ or ERROR_TYPES[status]), e
    assert isinstance(e["message"], str) and e["message"], e
    return e


def background(fn, *args, **kw):
    out = {}

    def run():
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as e:  # reported by joined()
            out["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def joined(th, out, timeout=30):
    th.join(timeout)
    assert not th.is_alive(), "request thread still running"
    if "error" in out:
        raise out["error"]
    return out["value"]


# ------------------------------------------------------------------ reference


@pytest.fixture(scope="module", autouse=True)
def nzserve():
    path = U.nzserve_path()
    if not os.access(path, os.X_OK):
        pytest.fail(f"nzserve binary not found at {path}: run `make build/nzserve` first")
    return path


@pytest.fixture(scope="module")
def dmodel(nzp, tmp_path_factory):
    """(path, reference model, tokenizer) of the tiny dialogue model."""
    P.require_torch()
    return U.build_dialogue_model(nzp, tmp_path_factory.mktemp("dialogue"), name=MODEL_NAME, seed=MODEL_SEED)


def reference(dmodel, context, strategy="greedy", decoders=None, mnt=MNT, beam_size=4, temperature=1.0, top_k=0,
              top_p=1.0, seed=0, no_repeat_ngram=0, length_penalty=1.0, rank="logprob"):
    """t5md_ref's responses of one context, in decoder order (decoders or 0..K-1); beam search ranked by
    consensus: each decoder's return chosen by t5md_ref.consensus_pool (with its "consensus")."""
    _, ref, tok = dmodel
    ids = tok.encode_context(context)
    kw = dict(max_new_tokens=mnt, no_repeat_ngram=no_repeat_ngram)
    if strategy == "greedy":
        return R.greedy(ref, [ids], decoders, **kw)[0]
    if strategy == "beam":
        pool = rank == "consensus"
        beams = R.beam(ref, [ids], decoders, beam_size=beam_size, length_penalty=length_penalty,
                       num_return=beam_size if pool else 1, **kw)[0]
        return R.consensus_pool(beams) if pool else [d[0] for d in beams]
    return R.sample(ref, [ids], decoders, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, **kw)[0]


def normalise(text):
    """nz_dlg_normalize: ASCII whitespace runs -> one space, trimmed, ASCII lower-case."""
    ws = " \t\n\v\f\r"
    t = re.sub(f"[{re.escape(ws)}]+", " ", text).strip(ws)
    return t.translate(str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz"))


def expected(dmodel, want, distinct=False, rank="logprob"):
    """The ranked (and filtered) reference responses: [(result with its "consensus", text)]."""
    tok = dmodel[2]
    out, seen = [], set()
    given = all("consensus" in w for w in want)  # consensus_pool's
    cons = dict(zip((w["decoder"] for w in want),
                    [w["consensus"] for w in want] if given else R.consensus([w["tokens"] for w in want])))
    for w in (R.rank(want, key="consensus") if rank == "consensus" else R.rank(want)):
        w = dict(w, consensus=cons[w["decoder"]])
        text = tok.decode(w["tokens"])
        if distinct and normalise(text) in seen:
            continue
        seen.add(normalise(text))
        out.append((w, text))
    return out


def check(dmodel, j, context, want, distinct=False, tokens=True, rank="logprob"):
    """A 200 body j equals the reference responses want (ranked, filtered, usage)."""
    tok = dmodel[2]
    exp = expected(dmodel, want, distinct, rank)
    got = j["responses"]
    assert [g["decoder"] for g in got] == [w["decoder"] for w, _ in exp] or \
        sorted(g["decoder"] for g in got) == sorted(w["decoder"] for w, _ in exp), (got, exp)
    by_dec = {w["decoder"]: (w, t) for w, t in exp}
    for g in got:
        w, text = by_dec[g["decoder"]]
        assert set(g) == {"decoder", "text", "score", "consensus"} | ({"tokens"} if tokens else set()), g
        if tokens:
            assert g["tokens"] == w["tokens"], (context, g, w["tokens"])
        assert g["text"] == text, (context, g["text"], text)
        assert abs(g["score"] - w["mean_logprob"]) <= ATOL, (g, w["mean_logprob"])
        assert abs(g["consensus"] - w["consensus"]) <= 1e-12, (g, w["consensus"])  # same tokens, same float64 sums
    # ranking: keys descending; where the reference keys are clearly apart the order is t5md_ref.rank's
    key = "consensus" if rank == "consensus" else "score"
    scores = [g[key] for g in got]
    assert scores == sorted(scores, reverse=True), scores
    keys = [w["consensus" if rank == "consensus" else "mean_logprob"] for w, _ in exp]
    if all(a - b > 10 * ATOL for a, b in zip(keys, keys[1:])):
        assert [g["decoder"] for g in got] == [w["decoder"] for w, _ in exp]
    ids = tok.encode_context(context)
    assert j["usage"] == {"input_tokens": len(ids) - 1,
                          "output_tokens": sum(len(w["tokens"]) - int(w["finished"]) for w in want)}, j["usage"]


# ------------------------------------------------------------------ responses


class TestDialogue:
    @pytest.fixture(scope="class")
    def srv(self, dmodel):
        with Server(dmodel[0], task="dialogue",
                    config={"max_concurrent_requests": 2, "worker_threads": 2, "tile_cache_bytes": "4MiB"}) as s:
            s.wait_ready()
            yield s

    def test_models(self, srv):
        m = srv.get("/v1/models").json()["models"][0]
        assert m["name"] == "m" and m["task"] == "dialogue" and m["loaded"] is True, m
        assert m["architecture"] == "t5_multidecoder" and m["weight_mode"] == "lossless"
        assert m["num_modes"] == K and m["variant"] == "transformer", m
        assert m["max_context_turns"] == 0 and m["max_source_length"] == 0
        assert "at_decoder" not in m
        # the model carries no "generation": the built-in decoding defaults
        assert m["generation"] == {"strategy": "greedy", "beam_size": 4, "length_penalty": 1.0,
                                   "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 63,
                                   "no_repeat_ngram_size": 0, "distinct": False, "rank": "logprob"}, m

    @pytest.mark.parametrize("i", range(len(CONTEXTS)))
    def test_greedy_matches_reference(self, srv, dmodel, i):
        c = CONTEXTS[i]
        r = srv.dialogue({"context": c, "max_new_tokens": MNT, "return_tokens": True})
        assert r.status == 200, r
        j = r.json()
        assert j["model"] == "m" and len(j["responses"]) == K
        check(dmodel, j, c, reference(dmodel, c))

    @pytest.mark.parametrize("i", [0, 1, 4])
    def test_beam_matches_reference(self, srv, dmodel, i):
        c = CONTEXTS[i]
        r = srv.dialogue({"context": c, "strategy": "beam", "beam_size": 3, "max_new_tokens": MNT,
                          "return_tokens": True})
        assert r.status == 200, r
        check(dmodel, r.json(), c, reference(dmodel, c, "beam", beam_size=3))

    @pytest.mark.parametrize("lp", [0.0, 2.5])
    def test_beam_length_penalty_matches_reference(self, srv, dmodel, lp):
        changed = False
        for c in CONTEXTS:
            r = srv.dialogue({"context": c, "strategy": "beam", "beam_size": 3, "length_penalty": lp,
                              "max_new_tokens": MNT, "return_tokens": True})
            assert r.status == 200, r
            want = reference(dmodel, c, "beam", beam_size=3, length_penalty=lp)
            check(dmodel, r.json(), c, want)
            changed |= [x["tokens"] for x in want] != [x["tokens"] for x in reference(dmodel, c, "beam", beam_size=3)]
        assert changed  # the option reaches the search: some response differs from length_penalty 1's

    @pytest.mark.parametrize("opts", [dict(temperature=1.0, top_k=10, top_p=0.9, seed=7),
                                      dict(temperature=1.3, seed=12345678901),
                                      dict(temperature=0.0, seed=3)])
    def test_sample_matches_reference(self, srv, dmodel, opts):
        for c in CONTEXTS[:2]:
            r = srv.dialogue({"context": c, "strategy": "sample", "max_new_tokens": MNT, "return_tokens": True,
                              **opts})
            assert r.status == 200, r
            check(dmodel, r.json(), c, reference(dmodel, c, "sample", **opts))

    def test_sample_seed_changes_responses(self, srv):
        body = {"context": CONTEXTS[1], "strategy": "sample", "max_new_tokens": MNT, "return_tokens": True}
        a = srv.dialogue(dict(body, seed=1)).json()["responses"]
        b = srv.dialogue(dict(body, seed=2)).json()["responses"]
        assert srv.dialogue(dict(body, seed=1)).json()["responses"] == a  # reproducible
        assert {x["decoder"]: x["tokens"] for x in a} != {x["decoder"]: x["tokens"] for x in b}

    def test_defaults_and_shape(self, srv, dmodel):
        c = CONTEXTS[4]
        r = srv.dialogue({"context": c})
        assert r.status == 200 and r.header("Content-Type") == "application/json", r
        j = r.json()
        assert set(j) == {"model", "responses", "usage", "timing_ms"}
        tm = j["timing_ms"]
        assert set(tm) == {"queue", "inference", "total"} and all(v >= 0 for v in tm.values())
        assert tm["total"] >= tm["inference"]
        check(dmodel, j, c, reference(dmodel, c, mnt=63), tokens=False)  # max_new_tokens 63 by default
        # null optional fields are absent ones; the explicit model name is the default
        r2 = srv.dialogue({"context": c, "model": "m", "strategy": None, "decoders": None, "distinct": None,
                           "stream": False, "max_new_tokens": None})
        assert r2.status == 200 and r2.json()["responses"] == j["responses"]

    @pytest.mark.parametrize("strategy,n,extra", [("greedy", 2, {}), ("greedy", 1, {}),
                                                  ("beam", 3, {"beam_size": 3}),
                                                  ("sample", 2, {"seed": 7, "top_k": 10, "top_p": 0.9})])
    def test_no_repeat_ngram(self, srv, dmodel, strategy, n, extra):
        """no_repeat_ngram_size == t5md_ref's no_repeat_ngram: no response repeats an n-gram of
        [start] + tokens, and the option changes what this (repetitive) model says."""
        changed = False
        for c in (SLOW_CONTEXT, CONTEXTS[1], CONTEXTS[3]):
            body = {"context": c, "strategy": strategy, "max_new_tokens": MNT, "return_tokens": True, **extra}
            r = srv.dialogue(dict(body, no_repeat_ngram_size=n))
            assert r.status == 200, r
            j = r.json()
            check(dmodel, j, c, reference(dmodel, c, strategy, no_repeat_ngram=n, **extra))
            assert not any(P.repeats_ngram(g["tokens"], n) for g in j["responses"]), j["responses"]
            plain = srv.dialogue(dict(body, no_repeat_ngram_size=0)).json()["responses"]
            assert plain == srv.dialogue(body).json()["responses"]  # 0 = off = the default
            changed |= {g["decoder"]: g["tokens"] for g in plain} != {g["decoder"]: g["tokens"]
                                                                      for g in j["responses"]}
        assert changed

    @pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
    def test_decoders_subset(self, srv, dmodel, strategy):
        c = CONTEXTS[1]
        extra = {"seed": 4} if strategy == "sample" else {"beam_size": 2} if strategy == "beam" else {}
        for decs in ([2, 0], [1]):
            r = srv.dialogue({"context": c, "decoders": decs, "strategy": strategy, "max_new_tokens": MNT,
                              "return_tokens": True, **extra})
            assert r.status == 200, r
            j = r.json()
            assert sorted(g["decoder"] for g in j["responses"]) == sorted(decs)
            want = reference(dmodel, c, strategy, decoders=decs, **extra)
            check(dmodel, j, c, want)
            # a decoder's response does not depend on which others run with it
            full = {w["decoder"]: w["tokens"] for w in reference(dmodel, c, strategy, **extra)}
            assert all(g["tokens"] == full[g["decoder"]] for g in j["responses"])

    @pytest.mark.parametrize("strategy", ["greedy", "beam"])
    def test_rank_consensus(self, srv, dmodel, strategy):
        """"rank": "consensus" orders the responses by nz_t5md_consensus (t5md_ref.consensus on the same
        tokens: equal to 1e-12), ties by log-prob; with distinct the dropped response still counts. Greedy:
        the same responses as by log-prob. Beam: every hypothesis of the final beams is evidence and
        candidate (t5md_ref.consensus_pool), so a decoder may answer with a return other than its best."""
        extra = {"beam_size": 3} if strategy == "beam" else {}
        picked = []
        for c in CONTEXTS[:3] + [DUP_CONTEXT]:
            want = reference(dmodel, c, strategy, rank="consensus", **extra)
            picked += [w.get("ret", 0) for w in want]
            body = {"context": c, "max_new_tokens": MNT, "return_tokens": True, "strategy": strategy, **extra}
            for distinct in (False, True):
                r = srv.dialogue({**body, "rank": "consensus", "distinct": distinct})
                assert r.status == 200, r
                check(dmodel, r.json(), c, want, distinct=distinct, rank="consensus")
            plain = srv.dialogue(body).json()["responses"]
            cons = srv.dialogue({**body, "rank": "consensus"}).json()["responses"]
            if strategy == "greedy":
                assert sorted(map(json.dumps, plain)) == sorted(map(json.dumps, cons))  # the same responses
        if strategy == "beam":
            assert any(picked), picked  # some decoder answers with a return other than its best

    def test_distinct(self, srv, dmodel):
        want = reference(dmodel, DUP_CONTEXT)
        texts = [dmodel[2].decode(w["tokens"]) for w in want]
        assert len(set(map(normalise, texts))) < len(texts), texts  # the model repeats itself here
        r = srv.dialogue({"context": DUP_CONTEXT, "max_new_tokens": MNT, "return_tokens": True, "distinct": True})
        assert r.status == 200, r
        j = r.json()
        assert len(j["responses"]) == len(set(map(normalise, texts)))
        check(dmodel, j, DUP_CONTEXT, want, distinct=True)  # usage counts the dropped response's tokens too
        plain = srv.dialogue({"context": DUP_CONTEXT, "max_new_tokens": MNT}).json()
        assert len(plain["responses"]) == K
        # nothing to drop: the filter changes nothing
        c = CONTEXTS[1]
        a = srv.dialogue({"context": c, "max_new_tokens": MNT, "distinct": True}).json()["responses"]
        b = srv.dialogue({"context": c, "max_new_tokens": MNT}).json()["responses"]
        assert a == b

    @pytest.mark.parametrize("strategy", ["greedy", "beam", "sample", "beam-consensus"])
    def test_stream(self, srv, dmodel, strategy):
        """Streamed tokens and text add up to the final responses; beam ranked by consensus streams each
        decoder's chosen return once every decoder is done."""
        c = CONTEXTS[1]
        rank = "consensus" if strategy == "beam-consensus" else "logprob"
        strategy = strategy.split("-")[0]
        extra = {"seed": 5, "top_p": 0.95} if strategy == "sample" else {"beam_size": 3} if strategy == "beam" else {}
        body = {"context": c, "strategy": strategy, "max_new_tokens": MNT, "return_tokens": True, "rank": rank,
                **extra}
        r = srv.stream(dict(body, stream=True))
        assert r.status == 200, r
        assert r.header("Content-Type").startswith("text/event-stream"), r.headers
        assert r.header("Transfer-Encoding") == "chunked" and r.header("Cache-Control") == "no-store"
        events = U.parse_sse(r.body)
        assert [e for e, _ in events[:-1]] == ["token"] * (len(events) - 1), events
        ev, done = events[-1]
        assert ev == "done", events[-1]
        streamed = {}
        for _, d in events[:-1]:
            assert set(d) == {"decoder", "token", "text"}, d
            ids, text = streamed.setdefault(d["decoder"], ([], []))
            ids.append(d["token"])
            text.append(d["text"])
        assert sorted(streamed) == list(range(K))
        for g in done["responses"]:
            ids, text = streamed[g["decoder"]]
            assert ids == g["tokens"], (g, ids)
            assert "".join(text) == g["text"], (g, text)
        check(dmodel, done, c, reference(dmodel, c, strategy, rank=rank, **extra), rank=rank)
        plain = srv.dialogue(body).json()
        assert done["responses"] == plain["responses"] and done["usage"] == plain["usage"]
        if strategy != "beam":  # greedy / sampling: the decoders' tokens interleave, as generated
            first = [d["decoder"] for _, d in events[:K]]
            assert sorted(first) == list(range(K)), first

    def test_stream_distinct_and_subset(self, srv, dmodel):
        r = srv.stream({"context": DUP_CONTEXT, "max_new_tokens": MNT, "distinct": True, "stream": True,
                        "decoders": [2, 1, 0]})
        events = U.parse_sse(r.body)
        done = events[-1][1]
        assert events[-1][0] == "done" and len(done["responses"]) == K - 1
        # every decoder streams; the filter applies to the final responses only
        assert {d["decoder"] for e, d in events if e == "token"} == {0, 1, 2}
        r = srv.stream({"context": CONTEXTS[0], "max_new_tokens": 4, "decoders": [1], "stream": True})
        events = U.parse_sse(r.body)
        assert {d["decoder"] for e, d in events if e == "token"} == {1}
        assert [g["decoder"] for g in events[-1][1]["responses"]] == [1]

    def test_stream_validation_errors_are_plain(self, srv):
        r = srv.stream({"context": "", "stream": True})
        assert r.status == 422 and r.header("content-type") == "application/json"
        assert r.json()["error"]["code"] == 422
        r = srv.stream(b'{"context": "hi", "stream": true')
        assert r.status == 400, r

    def test_concurrent_plain_and_streamed(self, srv):
        bodies = [{"context": c, "max_new_tokens": MNT, "return_tokens": True} for c in CONTEXTS]
        bodies += [{"context": CONTEXTS[1], "strategy": "sample", "seed": 9, "max_new_tokens": MNT,
                    "return_tokens": True}]
        want = [srv.dialogue(b).json()["responses"] for b in bodies]

        def one(i):
            b = bodies[i % len(bodies)]
            if i % 2:
                ev = U.parse_sse(srv.stream(dict(b, stream=True), timeout=30).body)
                assert ev[-1][0] == "done", ev[-1]
                return i % len(bodies), ev[-1][1]["responses"]
            r = srv.dialogue(b, timeout=30)
            assert r.status == 200, r
            return i % len(bodies), r.json()["responses"]

        with ThreadPoolExecutor(8) as ex:
            for i, got in ex.map(one, range(24), timeout=90):
                assert got == want[i], i
        assert srv.metric("nzserve_queue_depth") == 0 and srv.metric("nzserve_requests_in_flight") == 0

    def test_zz_metrics(self, srv):
        s0 = srv.metrics()
        tin = U.metric(s0, "nzserve_input_tokens_total", route="/v1/dialogue")
        tout = U.metric(s0, "nzserve_output_tokens_total", route="/v1/dialogue")
        n200 = U.metric(s0, "nzserve_requests_total", route="/v1/dialogue", status="200")
        assert tin > 0 and tout > 0 and n200 > 0
        u = srv.dialogue({"context": CONTEXTS[1], "max_new_tokens": MNT}).json()["usage"]
        ev = U.parse_sse(srv.stream({"context": CONTEXTS[3], "max_new_tokens": MNT, "stream": True}).body)
        u2 = ev[-1][1]["usage"]
        # counted before the response (the stream's last event) was queued
        assert srv.metric("nzserve_requests_total", route="/v1/dialogue", status="200") == n200 + 2
        s1 = srv.metrics()
        assert U.metric(s1, "nzserve_input_tokens_total", route="/v1/dialogue") == \
            tin + u["input_tokens"] + u2["input_tokens"]
        assert U.metric(s1, "nzserve_output_tokens_total", route="/v1/dialogue") == \
            tout + u["output_tokens"] + u2["output_tokens"]
        assert U.metric(s1, "nzserve_request_duration_seconds_count", route="/v1/dialogue") >= n200 + 2
        # the access log has the dialogue requests, streamed ones marked
        ok = lambda ls: [l for l in ls if l["path"] == "/v1/dialogue" and l["status"] == "200"]
        lines = ok(srv.wait_access(lambda ls: len(ok(ls)) >= n200 + 2))
        assert any(l["stream"] == "1" for l in lines) and any(l["stream"] == "0" for l in lines)
        assert all(l["model"] == "m" and int(l["tokens_in"]) > 0 for l in lines)


# ------------------------------------------------------------------ errors

MAX_BODY, MAX_TURNS, MAX_NEW, MAX_IN = 2048, 4, 50, 30

ERROR_CASES = [
    ("malformed", b'{"context": "hi"', 400),
    ("empty-body", b"", 400),
    ("array", b'["hi"]', 400),
    ("duplicate-key", b'{"context": "a", "context": "b"}', 400),
    ("invalid-utf8", b'{"context": "h\xffi"}', 400),
    ("nul-escape", b'{"context": "a\\u0000b"}', 400),
    ("context-int", {"context": 5}, 400),
    ("context-object", {"context": {"turn": "hi"}}, 400),
    ("context-int-item", {"context": ["hi", 3]}, 400),
    ("decoders-int", {"context": "hi", "decoders": 1}, 400),
    ("decoders-float-item", {"context": "hi", "decoders": [0.5]}, 400),
    ("decoders-string-item", {"context": "hi", "decoders": ["0"]}, 400),
    ("strategy-int", {"context": "hi", "strategy": 1}, 400),
    ("beam_size-string", {"context": "hi", "strategy": "beam", "beam_size": "2"}, 400),
    ("temperature-string", {"context": "hi", "strategy": "sample", "temperature": "1"}, 400),
    ("top_k-float", {"context": "hi", "strategy": "sample", "top_k": 2.5}, 400),
    ("top_p-bool", {"context": "hi", "strategy": "sample", "top_p": True}, 400),
    ("seed-float", {"context": "hi", "strategy": "sample", "seed": 1.5}, 400),
    ("max_new_tokens-string", {"context": "hi", "max_new_tokens": "5"}, 400),
    ("distinct-int", {"context": "hi", "distinct": 1}, 400),
    ("rank-int", {"context": "hi", "rank": 1}, 400),
    ("rank-unknown", {"context": "hi", "rank": "bleu"}, 422),
    ("stream-string", {"context": "hi", "stream": "yes"}, 400),
    ("return_tokens-int", {"context": "hi", "return_tokens": 0}, 400),
    ("model-int", {"context": "hi", "model": 1}, 400),
    ("unknown-model", {"context": "hi", "model": "nope"}, 404),
    ("no-context", {"max_new_tokens": 3}, 422),
    ("text-not-context", {"text": "hi"}, 422),
    ("empty-context", {"context": ""}, 422),
    ("blank-context", {"context": " \t\n"}, 422),
    ("empty-turns", {"context": []}, 422),
    ("blank-turns", {"context": ["", "  "]}, 422),
    ("too-many-turns", {"context": ["hi"] * (MAX_TURNS + 1)}, 422),
    ("unknown-field", {"context": "hi", "top_n": 3}, 422),
    ("strategy-value", {"context": "hi", "strategy": "nucleus"}, 422),
    ("decoders-empty", {"context": "hi", "decoders": []}, 422),
    ("decoders-negative", {"context": "hi", "decoders": [-1]}, 422),
    ("decoders-repeat", {"context": "hi", "decoders": [1, 1]}, 422),
    ("decoders-over-model", {"context": "hi", "decoders": [0, K]}, 422),
    ("decoders-over-limit", {"context": "hi", "decoders": [64]}, 422),
    ("beam_size-0", {"context": "hi", "strategy": "beam", "beam_size": 0}, 422),
    ("beam_size-33", {"context": "hi", "strategy": "beam", "beam_size": 33}, 422),
    ("beam_size-greedy", {"context": "hi", "beam_size": 2}, 422),
    ("temperature-negative", {"context": "hi", "strategy": "sample", "temperature": -0.5}, 422),
    ("temperature-high", {"context": "hi", "strategy": "sample", "temperature": 10.5}, 422),
    ("temperature-greedy", {"context": "hi", "temperature": 0.7}, 422),
    ("top_k-negative", {"context": "hi", "strategy": "sample", "top_k": -1}, 422),
    ("top_p-0", {"context": "hi", "strategy": "sample", "top_p": 0}, 422),
    ("top_p-over", {"context": "hi", "strategy": "sample", "top_p": 1.01}, 422),
    ("top_p-beam", {"context": "hi", "strategy": "beam", "top_p": 0.5}, 422),
    ("seed-negative", {"context": "hi", "strategy": "sample", "seed": -1}, 422),
    ("seed-greedy", {"context": "hi", "seed": 3}, 422),
    ("max_new_tokens-0", {"context": "hi", "max_new_tokens": 0}, 422),
    ("max_new_tokens-over", {"context": "hi", "max_new_tokens": MAX_NEW + 1}, 422),
    ("no_repeat_ngram_size-string", {"context": "hi", "no_repeat_ngram_size": "x"}, 400),
    ("no_repeat_ngram_size-real", {"context": "hi", "no_repeat_ngram_size": 2.0}, 400),
    ("no_repeat_ngram_size-negative", {"context": "hi", "no_repeat_ngram_size": -1}, 422),
    ("no_repeat_ngram_size-64", {"context": "hi", "strategy": "beam", "no_repeat_ngram_size": 64}, 422),
    ("no_repeat_ngram_size-1000", {"context": "hi", "strategy": "sample", "no_repeat_ngram_size": 1000}, 422),
    ("too-long", {"context": " ".join(["hello there how are you"] * 10)}, 422),
    ("too-long-turns", {"context": ["hello there how are you doing today"] * 4}, 422),
    ("translate-model", {"context": "hi", "model": "tr"}, 422),
]


class TestErrors:
    @pytest.fixture(scope="class")
    def srv(self, dmodel, nzp, tmp_path_factory):
        tr, _, _ = U.build_translation_model(nzp, tmp_path_factory)
        with Server(models=[{"name": "m", "task": "dialogue", "path": str(dmodel[0])},
                            {"name": "tr", "task": "translate", "path": str(tr)}],
                    config={"max_body_bytes": MAX_BODY, "max_texts": MAX_TURNS, "max_new_tokens": MAX_NEW,
                            "max_input_tokens": MAX_IN}) as s:
            s.wait_ready()
            yield s

    @pytest.mark.parametrize("name,body,status", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
    def test_dialogue_errors(self, srv, name, body, status):
        for stream in (False, True):  # the same answer before a stream begins
            b = body
            if stream and isinstance(body, dict) and "stream" not in body:
                b = dict(body, stream=True)
            e = assert_error(srv.dialogue(b), status)
        if name == "unknown-field":
            assert "top_n" in e["message"]
        if name.endswith("-greedy") or name == "top_p-beam":
            assert "applies to strategy" in e["message"], e
        if name == "decoders-over-model":
            assert "no decoder 3" in e["message"], e
        if name.startswith("too-long"):
            assert f"limit is {MAX_IN}" in e["message"], e
        if name == "translate-model":
            assert "serves translate" in e["message"], e
        if name.startswith("no_repeat_ngram_size"):
            assert "'no_repeat_ngram_size' must be" in e["message"], e

    def test_limits_boundary(self, srv, dmodel):
        tok = dmodel[2]
        words = ("hello there how are you " * 10).split()
        n = max(k for k in range(1, len(words)) if len(tok.encode_context(" ".join(words[:k]))) - 1 <= MAX_IN)
        assert srv.dialogue({"context": " ".join(words[:n]), "max_new_tokens": 2}).status == 200
        assert_error(srv.dialogue({"context": " ".join(words[:n + 1]), "max_new_tokens": 2}), 422)
        assert srv.dialogue({"context": ["hi"] * MAX_TURNS, "max_new_tokens": MAX_NEW}).status == 200
        body = json.dumps({"context": "hi", "max_new_tokens": 2}).encode()
        exact = body[:-1] + b" " * (MAX_BODY - len(body)) + b"}"
        assert srv.dialogue(exact).status == 200
        assert_error(srv.dialogue(exact + b" "), 413)

    def test_routes(self, srv):
        for m in ("GET", "PUT", "DELETE"):
            r = srv.request(m, "/v1/dialogue", body=b"{}" if m == "PUT" else None)
            assert_error(r, 405)
            assert r.header("Allow") == "POST"
        # the translate route refuses the dialogue model and vice versa
        e = assert_error(srv.translate({"text": "hi", "model": "m"}), 422)
        assert "serves dialogue" in e["message"]

    def test_zz_no_5xx(self, srv):
        s = srv.metrics()
        seen = {dict(k[1])["status"] for k in s if k[0] == "nzserve_requests_total" and
                dict(k[1]).get("route") == "/v1/dialogue"}
        assert {"200", "400", "404", "405", "413", "422"} <= seen, seen
        assert not [x for x in seen if x.startswith("5")], seen


def test_no_dialogue_model_404(nzp, tmp_path_factory):
    tr, _, _ = U.build_translation_model(nzp, tmp_path_factory)
    with Server(tr) as s:
        s.wait_ready()
        e = assert_error(s.dialogue({"context": "hi"}), 404)
        assert "no dialogue model" in e["message"]


def test_api_keys(dmodel):
    key = "dialogue-key-0001"
    with Server(dmodel[0], task="dialogue", config={"api_keys": [key]}) as s:
        s.wait_ready()
        body = {"context": "hi", "max_new_tokens": 3}
        assert_error(s.dialogue(body), 401)
        assert_error(s.dialogue(body, headers={"X-API-Key": key + "x"}), 401)
        r = s.stream(dict(body, stream=True))
        assert r.status == 401 and r.json()["error"]["type"] == "unauthorized"
        assert s.dialogue(body, headers={"Authorization": f"Bearer {key}"}).status == 200
        r = s.stream(dict(body, stream=True), headers={"X-API-Key": key})
        assert r.status == 200 and U.parse_sse(r.body)[-1][0] == "done"
        assert key not in s.log()


def test_not_ready_503(dmodel):
    with Server(dmodel[0], task="dialogue", env={"NZSERVE_DEBUG_LOAD_DELAY_MS": 1500}) as s:
        e = assert_error(s.dialogue({"context": "hi"}), 503)
        assert "loading" in e["message"]
        r = s.stream({"context": "hi", "stream": True})
        assert r.status == 503 and r.header("content-type") == "application/json"
        m = s.get("/v1/models").json()["models"][0]
        assert m["loaded"] is False and "num_modes" not in m
        s.wait_ready()
        assert s.dialogue({"context": "hi", "max_new_tokens": 2}).status == 200


# ------------------------------------------------------------------ queue, deadlines, disconnects


def test_queue_full_429(dmodel):
    with Server(dmodel[0], task="dialogue", config={"max_concurrent_requests": 1, "queue_length": 0},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 50}) as s:
        s.wait_ready()
        a = background(s.dialogue, slow(20))
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        r = s.dialogue({"context": "hi"})
        assert_error(r, 429)
        assert int(r.header("Retry-After")) >= 1
        r = s.stream({"context": "hi", "stream": True})
        assert r.status == 429 and r.json()["error"]["type"] == "queue_full"
        assert joined(*a).status == 200
        assert s.metric("nzserve_rejected_total", reason="queue_full") == 2


def test_deadline_504(dmodel):
    with Server(dmodel[0], task="dialogue", config={"request_timeout_ms": 500},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 100}) as s:
        s.wait_ready()
        t0 = time.monotonic()
        e = assert_error(s.dialogue(slow(30)), 504)  # about 3 s of decoding
        assert "500 ms" in e["message"] and time.monotonic() - t0 < 2.0
        # streamed: the stream has begun, the deadline comes as an error event after some tokens
        t0 = time.monotonic()
        r = s.stream(slow(30, stream=True))
        assert r.status == 200 and time.monotonic() - t0 < 2.0
        events = U.parse_sse(r.body)
        assert events[-1][0] == "error" and events[-1][1]["error"]["code"] == 504, events[-1]
        assert events[-1][1]["error"]["type"] == "deadline_exceeded"
        assert all(e == "token" for e, _ in events[:-1])
        assert s.metric("nzserve_rejected_total", reason="deadline") == 2
        assert s.metric("nzserve_requests_total", route="/v1/dialogue", status="504") == 2
        assert s.metric("nzserve_requests_in_flight") == 0
        assert s.dialogue({"context": "hi", "max_new_tokens": 2}).status == 200  # the worker is free


def open_stream(port, body):
    """Send a streamed request on a raw socket and read its head. @return (socket, ChunkedReader)."""
    sock = U.raw_connect(port)
    sock.sendall(U.post_request_bytes("/v1/dialogue", json.dumps(dict(body, stream=True)).encode()))
    status, headers, rest = U.read_head(sock, time.monotonic() + 10)
    assert status == 200 and headers["content-type"].startswith("text/event-stream"), (status, headers)
    return sock, U.ChunkedReader(sock, rest)


def test_disconnect_mid_stream(dmodel):
    with Server(dmodel[0], task="dialogue", config={"max_concurrent_requests": 1, "queue_length": 4},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 100}) as s:
        s.wait_ready()
        sock, rd = open_stream(s.port, slow(50))  # about 5 s
        body = rd.read_until(lambda b: b.count(b"event: token") >= 4)
        assert b"event: token" in body and b"event: done" not in body
        assert s.metric("nzserve_requests_in_flight") == 1
        t0 = time.monotonic()
        sock.close()  # the client leaves mid-stream: the worker stops at its next step
        r = s.dialogue({"context": "hi", "max_new_tokens": 2})
        dt = time.monotonic() - t0
        assert r.status == 200, r
        assert dt < 1.5, f"the next request took {dt:.2f} s: the cancelled stream kept the worker"
        s.wait_metric("nzserve_rejected_total", lambda v: v == 1, reason="cancelled")
        s.wait_metric("nzserve_requests_total", lambda v: v == 1, route="/v1/dialogue", status="499")
        assert s.metric("nzserve_requests_in_flight") == 0 and s.metric("nzserve_queue_depth") == 0
        lines = [l for l in access_log(s.log()) if l["status"] == "499"]
        assert len(lines) == 1 and lines[0]["path"] == "/v1/dialogue" and lines[0]["stream"] == "1", lines
        # a streamed request whose client leaves while it is queued is dropped from the queue
        busy = background(s.dialogue, slow(15))
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        sock, rd = open_stream(s.port, slow(40))  # the head comes at once, while the request waits
        s.wait_metric("nzserve_queue_depth", lambda v: v == 1)
        sock.close()
        s.wait_metric("nzserve_rejected_total", lambda v: v == 2, timeout=2, reason="cancelled")
        assert s.metric("nzserve_queue_depth") == 0
        assert joined(*busy).status == 200
        s.wait_metric("nzserve_requests_total", lambda v: v == 2, route="/v1/dialogue", status="499")
        assert s.stop() == 0  # nothing left behind: the drain finds no live request


def test_many_disconnects(dmodel):
    """Streams whose clients vanish at every moment (before the head, after the first token, with a reset):
    whichever side notices first (the worker's stop hook, or libmicrohttpd's failed write, which leaves
    the request to its job), every one is cancelled and freed once."""
    n = 24
    with Server(dmodel[0], task="dialogue", config={"max_concurrent_requests": 2, "queue_length": 64,
                                                    "log_level": "debug"}) as s:
        s.wait_ready()
        for i in range(n):
            strategy = ("greedy", "sample", "beam")[i % 3]
            k = U.raw_connect(s.port)
            k.sendall(U.post_request_bytes("/v1/dialogue", json.dumps(
                {"context": SLOW_CONTEXT, "max_new_tokens": 200, "strategy": strategy, "stream": True}).encode()))
            if i % 4:
                got = b""
                while b"event: token" not in got and b"event: done" not in got:
                    chunk = k.recv(65536)
                    assert chunk, got
                    got += chunk
            if i % 2:
                k.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, not FIN
            k.close()
        s.wait_metric("nzserve_rejected_total", lambda v: v == n, reason="cancelled")
        s.wait_metric("nzserve_requests_total", lambda v: v == n, route="/v1/dialogue", status="499")
        assert s.metric("nzserve_requests_in_flight") == 0 and s.metric("nzserve_queue_depth") == 0
        assert s.dialogue({"context": "hi", "max_new_tokens": 3}).status == 200
        assert s.stop() == 0


def test_shutdown_with_streams(dmodel):
    with Server(dmodel[0], task="dialogue",
                config={"max_concurrent_requests": 2, "queue_length": 4, "shutdown_grace_ms": 800},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 100}) as s:
        s.wait_ready()
        short = background(s.stream, slow(2, stream=True))      # finishes within the grace
        long_ = background(s.stream, slow(40, stream=True))     # cancelled when the grace is over
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 2)
        s.signal(signal.SIGTERM)
        ev = U.parse_sse(joined(*short).body)
        assert ev[-1][0] == "done", ev[-1]
        ev = U.parse_sse(joined(*long_).body)
        assert ev[-1][0] == "error" and ev[-1][1]["error"]["code"] == 503, ev[-1]
        assert s.wait(timeout=10) == 0
        assert re.search(r"event=stopped cancelled=1\b", s.log()), s.log()


def test_model_generation_defaults(dmodel, nzp, tmp_path):
    """A dialogue model's config "generation" decides the options a request leaves out (its max_new_tokens
    capped by the server's), /v1/models lists them, a request's own options win, and a strategy option
    is checked against the strategy in effect."""
    import test_chat_cli as C

    gen, _ = C.repack(nzp, dmodel[0], tmp_path, "generation.strategy=beam", "generation.beam_size=2",
                      "generation.no_repeat_ngram_size=2", "generation.max_new_tokens=40",
                      "generation.temperature=0.5", "generation.distinct=true", "generation.length_penalty=2",
                      "generation.rank=consensus")
    c = CONTEXTS[1]
    with Server(gen, task="dialogue", config={"max_new_tokens": MNT}) as s:
        s.wait_ready()
        assert s.get("/v1/models").json()["models"][0]["generation"] == {
            "strategy": "beam", "beam_size": 2, "length_penalty": 2.0, "temperature": 0.5, "top_k": 0, "top_p": 1.0,
            "max_new_tokens": 40, "no_repeat_ngram_size": 2, "distinct": True, "rank": "consensus"}
        beam_lp2 = dict(no_repeat_ngram=2, length_penalty=2.0, rank="consensus")
        cases = [({}, reference(dmodel, c, "beam", beam_size=2, **beam_lp2), True),
                 ({"strategy": "greedy", "no_repeat_ngram_size": 0, "distinct": False, "max_new_tokens": 9},
                  reference(dmodel, c, mnt=9), False),
                 ({"beam_size": 3}, reference(dmodel, c, "beam", beam_size=3, **beam_lp2), True),
                 ({"length_penalty": 0.5}, reference(dmodel, c, "beam", beam_size=2, no_repeat_ngram=2,
                                                     length_penalty=0.5, rank="consensus"), True),
                 ({"strategy": "sample", "seed": 3},
                  reference(dmodel, c, "sample", temperature=0.5, seed=3, no_repeat_ngram=2), True)]
        cases.append(({"rank": "logprob"}, reference(dmodel, c, "beam", beam_size=2, no_repeat_ngram=2,
                                                     length_penalty=2.0), True))
        for body, want, distinct in cases:
            r = s.dialogue({"context": c, "return_tokens": True, **body})
            assert r.status == 200, (body, r)
            check(dmodel, r.json(), c, want, distinct=distinct, rank=body.get("rank", "consensus"))
        e = assert_error(s.dialogue({"context": c, "temperature": 0.7}), 422)
        assert "'temperature' applies to strategy \"sample\" only (this request uses \"beam\")" in e["message"], e
        assert s.dialogue({"context": c, "strategy": "sample", "temperature": 0.7}).status == 200
        e = assert_error(s.dialogue({"context": c, "strategy": "greedy", "length_penalty": 1.5}), 422)
        assert "'length_penalty' applies to strategy \"beam\" only (this request uses \"greedy\")" in e["message"], e
        e = assert_error(s.dialogue({"context": c, "length_penalty": 11}), 422)
        assert "length_penalty" in e["message"], e
    # options stored as floats are listed as written (1.3, not 1.2999999523)
    frac, _ = C.repack(nzp, dmodel[0], tmp_path / "frac", "generation.length_penalty=1.3",
                       "generation.temperature=0.7", "generation.top_p=0.9")
    with Server(frac, task="dialogue") as s:
        s.wait_ready()
        g = s.get("/v1/models").json()["models"][0]["generation"]
        assert (g["length_penalty"], g["temperature"], g["top_p"]) == (1.3, 0.7, 0.9), g


# ------------------------------------------------------------------ batching across requests


def streamed_done(r):
    """The "done" body of a streamed response, after checking that its token events rebuild each
    decoder's final tokens and text (so no other request's tokens came on this stream)."""
    assert r.status == 200, r
    events = U.parse_sse(r.body)
    assert [e for e, _ in events[:-1]] == ["token"] * (len(events) - 1), events
    ev, done = events[-1]
    assert ev == "done", events[-1]
    streamed = {}
    for _, d in events[:-1]:
        ids, text = streamed.setdefault(d["decoder"], ([], []))
        ids.append(d["token"])
        text.append(d["text"])
    assert sorted(streamed) == sorted(g["decoder"] for g in done["responses"])
    for g in done["responses"]:
        ids, text = streamed[g["decoder"]]
        assert ids == g["tokens"], (g, ids)
        assert "".join(text) == g["text"], (g, text)
    return done


def is_dialogue(line):
    """An access-log line of /v1/dialogue."""
    return line["path"] == "/v1/dialogue"


class TestBatching:
    """Greedy and sampled requests of a model are batched continuously: a request joins the running batch at
    the next decoder step (each step's weight decode serves every member's rows) and leaves when its
    decoders are done, each with its own options; beam-search requests with the same options queued
    together are generated together. Either way every response (tokens, texts, scores, usage; a stream's
    events) is the one the same request gets alone. One worker and a step delay make a batch run long."""

    @pytest.fixture(scope="class")
    def srv(self, dmodel):
        with Server(dmodel[0], task="dialogue", config={"max_concurrent_requests": 1, "queue_length": 16},
                    env={"NZSERVE_DEBUG_STEP_DELAY_MS": 25}) as s:
            s.wait_ready()
            yield s

    @staticmethod
    def dialogue_lines(srv):
        return [l for l in access_log(srv.log()) if is_dialogue(l)]

    def batched(self, srv, calls, joins=True):
        """Send calls (functions sending one request each) concurrently while a slow greedy request runs:
        with joins they join its batch (the access log's batch_texts, requests in the batch when one ends,
        shows it), else they queue behind it and are taken together. @return their results."""
        busy = background(srv.dialogue, slow(60))  # ~1.5 s
        srv.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        ths = [background(c) for c in calls]
        if not joins:
            srv.wait_metric("nzserve_queue_depth", lambda v: v == len(calls))
            assert srv.metric("nzserve_requests_in_flight") == 1  # they queued behind the busy request
        out = [joined(*t) for t in ths]
        assert joined(*busy).status == 200
        return out

    def mark(self, srv):
        """The number of /v1/dialogue access-log lines once every request answered so far has its line: a
        line is written when the connection ends, after the client has read the response (and after
        nzserve_requests_total counted it), so a line of the previous test may still be due."""
        answered = sum(v for (name, labels), v in srv.metrics().items()
                       if name == "nzserve_requests_total" and ("route", "/v1/dialogue") in labels)
        return len(srv.access_lines(is_dialogue, int(answered)))

    def lines_after(self, srv, n0, n):
        return srv.access_lines(is_dialogue, n0 + n)[n0:]

    @pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
    def test_same_as_alone(self, srv, strategy):
        n0 = self.mark(srv)
        base = {"strategy": strategy, "max_new_tokens": MNT, "return_tokens": True}
        if strategy == "beam":
            base["beam_size"] = 3
        bodies = [dict(base, context=c) for c in CONTEXTS[:4]]
        if strategy == "sample":  # a seed and a temperature each; the same context with two seeds differs
            bodies[2]["context"] = bodies[1]["context"]
            for i, b in enumerate(bodies):
                b["seed"] = 1 + i
                b["temperature"] = 0.7 + 0.1 * i
        if strategy != "sample":  # options differ from member to member
            bodies[1]["no_repeat_ngram_size"] = 2
            bodies[2]["decoders"] = [1, 0]
            bodies[3]["max_new_tokens"] = MNT - 3
        if strategy == "beam":
            bodies[0]["beam_size"] = 2
        got = self.batched(srv, [lambda b=b: srv.dialogue(b) for b in bodies], joins=True)
        lines = self.lines_after(srv, n0, len(bodies) + 1)
        # every strategy is batched continuously: each shared its batch with the busy request at least
        assert sum(int(l["batch_texts"]) >= 2 for l in lines) >= len(bodies), lines
        for b, r in zip(bodies, got):
            assert r.status == 200, r
            alone = srv.dialogue(b)
            assert alone.status == 200, alone
            assert r.json()["responses"] == alone.json()["responses"], (b, r.json(), alone.json())
            assert r.json()["usage"] == alone.json()["usage"]
        assert all(l["batch_texts"] == "1" for l in self.dialogue_lines(srv)[n0 + len(bodies) + 1:])
        if strategy == "sample":
            a, c = (got[i].json()["responses"] for i in (1, 2))
            assert {x["decoder"]: x["tokens"] for x in a} != {x["decoder"]: x["tokens"] for x in c}

    def test_joins_a_running_batch(self, srv):
        """A short request sent while a long one runs joins it at once and is answered long before the
        long one ends (no waiting for the batch to finish): continuous batching."""
        busy = background(srv.dialogue, slow(60))  # ~1.5 s of 25 ms steps
        srv.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        t0 = time.monotonic()
        r = srv.dialogue({"context": CONTEXTS[0], "max_new_tokens": 4})
        dt = time.monotonic() - t0
        assert r.status == 200, r
        assert busy[0].is_alive(), "the long request ended first"
        assert r.json()["timing_ms"]["queue"] < 100 and dt < 1.0, (r.json()["timing_ms"], dt)
        assert joined(*busy).status == 200

    def test_beam_joins_a_greedy_batch(self, srv):
        """A beam request joins a running greedy batch (its beams take rows next to the greedy ones) and
        gets what it gets alone."""
        n0 = self.mark(srv)
        body = {"context": CONTEXTS[1], "strategy": "beam", "beam_size": 2, "max_new_tokens": 5}
        # consensus with beam: every return generated and pooled, the chosen ones streamed at the end
        pooled = dict(body, context=CONTEXTS[2], rank="consensus", beam_size=3, stream=True, return_tokens=True)
        got = self.batched(srv, [lambda: srv.dialogue(body), lambda: srv.stream(pooled)])
        lines = self.lines_after(srv, n0, 3)
        assert all(int(l["batch_texts"]) >= 2 for l in lines[:2]), lines  # they ended in the busy one's batch
        assert got[0].status == 200 and got[0].json()["responses"] == srv.dialogue(body).json()["responses"]
        assert streamed_done(got[1])["responses"] == srv.dialogue(dict(pooled, stream=False)).json()["responses"]

    def test_stream_and_plain_share_a_batch(self, srv):
        n0 = self.mark(srv)
        bodies = [{"context": c, "max_new_tokens": MNT, "return_tokens": True} for c in CONTEXTS[:4]]
        calls = [(lambda b=b: srv.stream(dict(b, stream=True))) if i % 2 else (lambda b=b: srv.dialogue(b))
                 for i, b in enumerate(bodies)]
        got = self.batched(srv, calls)
        lines = self.lines_after(srv, n0, 5)
        assert sorted(l["stream"] for l in lines) == ["0", "0", "0", "1", "1"], lines
        assert sum(int(l["batch_texts"]) >= 2 for l in lines) >= len(bodies), lines
        for i, (b, r) in enumerate(zip(bodies, got)):
            j = streamed_done(r) if i % 2 else r.json()
            alone = srv.dialogue(b).json()
            assert j["responses"] == alone["responses"] and j["usage"] == alone["usage"], (b, j, alone)

    def test_cancelled_member(self, srv):
        """A batch member whose client leaves mid-generation is released (499) and the others' responses
        are unchanged."""
        c499 = srv.metric("nzserve_requests_total", route="/v1/dialogue", status="499") or 0
        n0 = self.mark(srv)
        bodies = [{"context": c, "max_new_tokens": 30, "return_tokens": True}
                  for c in (SLOW_CONTEXT, CONTEXTS[1], CONTEXTS[3])]
        busy = background(srv.dialogue, slow(60))
        srv.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        sock, rd = open_stream(srv.port, bodies[0])
        ths = [background(srv.dialogue, b) for b in bodies[1:]]
        srv.wait_metric("nzserve_requests_in_flight", lambda v: v >= 2)  # the stream joined the batch
        got = rd.read_until(lambda x: x.count(b"event: token") >= 3)  # its rows run
        assert b"event: done" not in got
        sock.close()
        srv.wait_metric("nzserve_requests_total", lambda v: v == c499 + 1, route="/v1/dialogue", status="499")
        out = [joined(*t) for t in ths]
        assert joined(*busy).status == 200
        lines = self.lines_after(srv, n0, 4)
        assert sorted(l["status"] for l in lines) == ["200", "200", "200", "499"], lines
        for b, r in zip(bodies[1:], out):
            assert r.status == 200, r
            assert r.json()["responses"] == srv.dialogue(b).json()["responses"], b
        assert srv.metric("nzserve_requests_in_flight") == 0 and srv.metric("nzserve_queue_depth") == 0
