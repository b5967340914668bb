"""nzserve (the HTTP inference server) end to end, against a real binary
($NZSERVE, default build/nzserve) serving the tiny real translation model of
test_translate_cli (trained SentencePiece, random-weight cmlm_transformer
with an AT decoder, max_source_positions 24).

Every server is started by server_util.Server on 127.0.0.1 with a free port
and its own config file; a watchdog kills it after 60 s and every request
has a timeout. Slow requests use the test hooks NZSERVE_DEBUG_STEP_DELAY_MS
(a sleep before every decoder pass; an AT decode with max_length N makes
about N + 2 passes, the random model never stops early) and
NZSERVE_DEBUG_LOAD_DELAY_MS (a slow model load).

Covered: the GET endpoints and HEAD; translations equal to the PyTorch
reference decoding (nat_ref.mask_predict / at_greedy / at_beam) and to
`nzp translate`; usage and timing; every error class (400 401 404 405 413
422 429 503 504) with the JSON error shape; concurrency; API keys from a
key file, flags, env and the config file; graceful shutdown (drain, and
503 once the grace is over); cancellation when the client disconnects
(running and queued); startup failures and their exit status; JSON logs,
the access log, and that API keys never reach the log.
"""

import http.client
import json
import os
import shutil
import pathlib
import re
import select
import signal
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import server_util as U
from server_util import Server, access_log, log_events

import test_translate_cli as T  # the model builder, words(), fairseq_text(), translate()

R = T.R

# valid inputs (the server refuses empty and blank texts); extra spaces, characters unknown to the model
LINES = T.words(7, 6) + ["  kako  ruda  ", "dä ß ✓"]
SLOW_TEXT = "dateni ko"
LONG_TEXT = " ".join(["kadateni"] * 40)  # far more than max_source_positions (24) tokens

ERROR_TYPES = {400: "invalid_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "payload_too_large", 422: "validation_error", 429: "queue_full", 503: "unavailable",
               504: "deadline_exceeded"}

METRIC_NAMES = ["nzserve_requests_total", "nzserve_request_duration_seconds", "nzserve_queue_depth",
                "nzserve_requests_in_flight", "nzserve_input_tokens_total", "nzserve_output_tokens_total",
                "nzserve_weights_compressed_bytes", "nzserve_weights_decoded_equivalent_bytes",
                "nzserve_tile_cache_bytes", "nzserve_tile_cache_limit_bytes", "nzserve_kv_cache_bytes",
                "nzserve_scratch_bytes", "nzserve_resident_memory_bytes", "nzserve_resident_memory_peak_bytes",
                "nzserve_tiles_decoded_total", "nzserve_tile_cache_hits_total", "nzserve_tile_decode_seconds_total",
                "nzserve_rejected_total", "nzserve_allocator_free_bytes"]


def slow(max_length, **kw):
    """A request whose duration is about (max_length + 2) * step delay: the AT
    decoder runs to max_length on this model."""
    return {"text": SLOW_TEXT, "decoder": "at", "max_length": max_length, **kw}


def slow_nat(iterations, **kw):
    """A mask-predict request of about (iterations + 2) * step delay (non-adaptive: every pass runs); with
    batching on it joins a running batch at the next pass."""
    return {"text": SLOW_TEXT, "decoder": "nat", "iterations": iterations, "adaptive": False, **kw}


def assert_error(r, status, type_=None):
    """r is an error response of this status with the JSON error shape."""
    assert r.status == status, r
    assert r.header("Content-Type") == "application/json", r.header("Content-Type")
    body = r.json()
    assert set(body) >= {"error"}, body
    e = body["error"]
    assert set(e) == {"code", "type", "message"}, e
    assert e["code"] == status, e
    assert e["type"] == (type_ or ERROR_TYPES[status]), e
    assert isinstance(e["message"], str) and e["message"], e
    return e


def background(fn, *args, **kw):
    """Run fn in a thread. @return (thread, result dict: "value" or "error", "t" seconds)."""
    out = {}

    def run():
        t0 = time.monotonic()
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as e:  # reported by the caller
            out["error"] = e
        out["t"] = time.monotonic() - t0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def joined(th, out, timeout=20):
    th.join(timeout)
    assert not th.is_alive(), "request thread still running"
    if "error" in out:
        raise out["error"]
    return out["value"]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def nzserve():
    path = U.nzserve_path()
    if not os.access(path, os.X_OK):
        pytest.fail(f"nzserve binary not found at {path}: run `make build/nzserve` first")
    return path


@pytest.fixture(scope="module")
def model(nzp, nzserve, tmp_path_factory):
    """(path, reference model, vocab) of the tiny translation model."""
    return U.build_translation_model(nzp, tmp_path_factory)


@pytest.fixture(scope="module")
def model_path(model):
    return model[0]


# ------------------------------------------------------------------ GET endpoints


class TestEndpoints:
    @pytest.fixture(scope="class")
    def srv(self, model_path):
        with Server(model_path, config={"tile_cache_bytes": "1MiB"}) as s:
            s.wait_ready()
            yield s

    def test_health_and_ready(self, srv):
        r = srv.get("/health")
        assert r.status == 200 and r.json() == {"status": "ok"}
        assert r.header("Content-Type") == "application/json"
        r = srv.get("/ready")
        assert r.status == 200 and r.json() == {"status": "ready"}
        assert srv.get("/health?probe=1").status == 200  # a query string does not change the route

    def test_models(self, srv, model_path):
        r = srv.get("/v1/models")
        assert r.status == 200, r
        j = r.json()
        assert len(j["models"]) == 1
        m = j["models"][0]
        assert m["name"] == "m" and m["task"] == "translate" and m["loaded"] is True
        assert m["architecture"] == "cmlm_transformer"
        assert m["weight_mode"] == "lossless"
        assert m["compressed_bytes"] > 0
        assert m["decoded_equivalent_bytes"] > m["compressed_bytes"]
        assert 0 < m["ratio"] < 1
        assert m["parameters"] > 0 and m["at_decoder"] is True and m["max_source_positions"] == 24
        assert j["tile_cache"]["budget_bytes"] == 1 << 20
        # the model carries no "generation": the built-in decoding defaults
        assert m["generation"] == {"decoder": "nat", "iterations": 10, "length_beam": 5, "rerank": "none",
                                   "adaptive": False, "beam_size": 1, "lenpen": 1.0}

    def test_memory(self, srv):
        srv.translate({"text": LINES[0]})  # something used the scratch and the cache
        r = srv.get("/v1/memory")
        assert r.status == 200, r
        j = r.json()
        assert j["categories"], j
        for name, c in j["categories"].items():
            assert set(c) >= {"current_bytes", "peak_bytes"}, (name, c)
            assert 0 <= c["current_bytes"] <= c["peak_bytes"], (name, c)
        assert "weights" in j["categories"] and "kv_cache" in j["categories"]
        assert [m["name"] for m in j["models"]] == ["m"]
        models = srv.get("/v1/models").json()["models"][0]
        assert j["models"][0]["compressed_bytes"] == models["compressed_bytes"]
        assert j["models"][0]["decoded_equivalent_bytes"] == models["decoded_equivalent_bytes"]
        assert j["rss_bytes"] > 0 and j["rss_peak_bytes"] > 0
        assert j["tile_cache"]["budget_bytes"] == 1 << 20

    def test_metrics(self, srv):
        tr = srv.translate({"texts": LINES[:3]})
        assert tr.status == 200, tr
        r = srv.get("/metrics")
        assert r.status == 200
        assert r.header("Content-Type").startswith("text/plain; version=0.0.4")
        text = r.body.decode()
        for name in METRIC_NAMES:
            assert re.search(rf"^# TYPE {name} ", text, re.M), f"{name} missing from /metrics"
        s = U.parse_metrics(text)
        assert U.metric(s, "nzserve_weights_compressed_bytes", model="m") == \
            srv.get("/v1/models").json()["models"][0]["compressed_bytes"]
        assert U.metric(s, "nzserve_tile_cache_limit_bytes") == 1 << 20
        assert U.metric(s, "nzserve_resident_memory_bytes") > 0
        assert U.metric(s, "nzserve_tiles_decoded_total") > 0
        assert U.metric(s, "nzserve_queue_depth") == 0 and U.metric(s, "nzserve_requests_in_flight") == 0
        # a request is counted before its response is queued: whatever is read after it includes it
        s = srv.metrics()
        before = U.metric(s, "nzserve_requests_total", route="/v1/models", status="200") or 0
        tokens_in = U.metric(s, "nzserve_input_tokens_total", route="/v1/translate")
        tokens_out = U.metric(s, "nzserve_output_tokens_total", route="/v1/translate")
        assert tokens_in >= tr.json()["usage"]["input_tokens"] > 0
        assert tokens_out >= tr.json()["usage"]["output_tokens"] > 0
        assert srv.get("/v1/models").status == 200
        assert srv.metric("nzserve_requests_total", route="/v1/models", status="200") == before + 1
        tr = srv.translate({"text": LINES[3]})
        s = srv.metrics()
        assert U.metric(s, "nzserve_input_tokens_total", route="/v1/translate") == \
            tokens_in + tr.json()["usage"]["input_tokens"]
        assert U.metric(s, "nzserve_output_tokens_total", route="/v1/translate") == \
            tokens_out + tr.json()["usage"]["output_tokens"]
        s = srv.metrics()
        assert U.metric(s, "nzserve_request_duration_seconds_count", route="/v1/translate") >= 2
        assert U.metric(s, "nzserve_request_duration_seconds_bucket", route="/v1/translate", le="+Inf") >= 2

    def test_head(self, srv):
        for path in ["/health", "/ready", "/v1/models", "/v1/memory", "/metrics"]:
            g = srv.get(path)
            r = srv.request("HEAD", path)
            assert r.status == 200 and r.body == b"", (path, r)
            assert r.header("Content-Type") == g.header("Content-Type"), path
        assert int(srv.request("HEAD", "/health").header("Content-Length")) == len(srv.get("/health").body)


# ------------------------------------------------------------------ translation


class TestTranslate:
    @pytest.fixture(scope="class")
    def srv(self, model_path):
        with Server(model_path, config={"max_concurrent_requests": 4, "queue_length": 64, "worker_threads": 2,
                                        "tile_cache_bytes": "4MiB", "max_new_tokens": 64}) as s:
            s.wait_ready()
            yield s

    # server body options -> the reference decoding of the padded batch
    CASES = {
        "nat-1-1": ({"iterations": 1, "length_beam": 1},
                    lambda ref, src: R.mask_predict(ref, src, max_iter=1, length_beam=1)),
        "nat-defaults": ({}, lambda ref, src: R.mask_predict(ref, src, max_iter=10, length_beam=5)),
        "nat-adaptive": ({"iterations": 4, "adaptive": True},
                         lambda ref, src: R.mask_predict(ref, src, max_iter=4, length_beam=5, adaptive=True)),
        "nat-fixed": ({"iterations": 4, "adaptive": False},
                      lambda ref, src: R.mask_predict(ref, src, max_iter=4, length_beam=5, adaptive=False)),
        "nat-rerank": ({"iterations": 4, "length_beam": 3, "rerank": "at"},
                       lambda ref, src: R.mask_predict(ref, src, max_iter=4, length_beam=3, rerank_at=True)),
        "at-greedy": ({"decoder": "at"}, lambda ref, src: [{"tokens": t} for t in R.at_greedy(ref, src)]),
        "at-greedy-max5": ({"decoder": "at", "max_length": 5},
                           lambda ref, src: [{"tokens": t} for t in R.at_greedy(ref, src, max_len_b=5)]),
        "at-beam4": ({"decoder": "at", "beam_size": 4},
                     lambda ref, src: R.at_beam(ref, src, beam=4, lenpen=1.0)),
    }

    @pytest.mark.parametrize("case", list(CASES))
    def test_tokens_match_reference(self, srv, model, case):
        _, ref, vocab = model
        opts, decode = self.CASES[case]
        want = decode(ref, R.pad_batch([vocab.encode(l) for l in LINES]))
        r = srv.translate({"texts": LINES, "return_tokens": True, **opts})
        assert r.status == 200, r
        j = r.json()
        assert j["model"] == "m"
        got = j["translations"]
        assert len(got) == len(LINES)
        for i, (g, w) in enumerate(zip(got, want)):
            assert g["tokens"] == w["tokens"], f"texts[{i}] {LINES[i]!r}"
            # the text is fairseq's post-processing of the ids (<unk> kept as "<unk>", as `nzp translate`);
            # it is SentencePiece's decode when no unknown piece is involved
            assert g["text"] == T.fairseq_text(vocab, g["tokens"]), f"texts[{i}]"
            if R.UNK not in g["tokens"]:
                assert g["text"] == vocab.decode(g["tokens"]).strip(), f"texts[{i}]"
            assert isinstance(g["score"], float)
        assert j["usage"]["input_tokens"] == sum(len(vocab.encode(l)) - 2 for l in LINES)
        assert j["usage"]["output_tokens"] == sum(
            sum(1 for t in w["tokens"] if t not in (R.BOS, R.EOS, R.PAD)) for w in want)

    @pytest.mark.parametrize("rerank", ["none", "at"])
    def test_length_candidates(self, srv, rerank):
        """return_candidates: every length candidate of each text, in candidate order, with exactly one
        chosen: the translation (its text and score); lengths consecutive around the predicted one."""
        r = srv.translate({"texts": LINES[:4], "decoder": "nat", "length_beam": 3, "rerank": rerank,
                           "return_candidates": True})
        assert r.status == 200, r
        for t in r.json()["translations"]:
            c = t["candidates"]
            assert len(c) == 3, t
            chosen = [x for x in c if x["chosen"]]
            assert len(chosen) == 1 and chosen[0]["text"] == t["text"] and chosen[0]["score"] == t["score"], t
            lens = [x["length"] for x in c]
            assert all(b >= a for a, b in zip(lens, lens[1:])), lens
            best = max(x["score"] for x in c if x["score"] is not None)
            assert chosen[0]["score"] == best, c
            if rerank == "none":
                assert all(x["score"] == x["nat_score"] for x in c), c
        plain = srv.translate({"texts": LINES[:4], "decoder": "nat", "length_beam": 3, "rerank": rerank}).json()
        assert [t["text"] for t in plain["translations"]] == [t["text"] for t in r.json()["translations"]]
        assert "candidates" not in plain["translations"][0]

    def test_nat_max_length_caps_output(self, srv):
        r = srv.translate({"texts": LINES, "max_length": 3, "return_tokens": True})
        assert r.status == 200, r
        for g in r.json()["translations"]:
            assert 1 <= sum(1 for t in g["tokens"] if t not in (R.BOS, R.EOS, R.PAD)) <= 3, g

    @pytest.mark.parametrize("body,cli", [({}, []), ({"iterations": 3, "length_beam": 2}, ["--iter", 3, "--beam", 2]),
                                          ({"decoder": "at"}, ["--at"])])
    def test_text_matches_nzp_translate(self, srv, nzp, model_path, body, cli):
        want = T.translate(nzp, model_path, LINES, *cli).stdout.split("\n")[:-1]
        r = srv.translate({"texts": LINES, **body})
        assert r.status == 200, r
        assert [t["text"] for t in r.json()["translations"]] == want

    def test_single_text_form(self, srv, model):
        _, ref, vocab = model
        r = srv.translate({"text": LINES[2]})
        assert r.status == 200, r
        assert r.header("Content-Type") == "application/json"
        j = r.json()
        assert set(j) == {"model", "translations", "usage", "timing_ms"}
        assert len(j["translations"]) == 1
        t = j["translations"][0]
        assert set(t) == {"text", "score"}  # no tokens unless asked
        want = R.mask_predict(ref, R.pad_batch([vocab.encode(LINES[2])]), max_iter=10, length_beam=5)[0]
        assert t["text"] == T.fairseq_text(vocab, want["tokens"])
        assert j["usage"] == {"input_tokens": len(vocab.encode(LINES[2])) - 2,
                              "output_tokens": sum(1 for x in want["tokens"] if x not in (R.BOS, R.EOS, R.PAD))}
        tm = j["timing_ms"]
        assert set(tm) == {"queue", "inference", "total"}
        assert all(v >= 0 for v in tm.values()) and tm["total"] >= tm["inference"]
        # the explicit default model name and null optional fields are accepted
        r2 = srv.translate({"text": LINES[2], "model": "m", "iterations": None, "return_tokens": False})
        assert r2.status == 200 and r2.json()["translations"][0]["text"] == t["text"]

    def test_concurrent_clients(self, srv):
        bodies = [
            {"texts": LINES[:3]},
            {"text": LINES[3], "iterations": 2, "length_beam": 2},
            {"texts": LINES[4:], "iterations": 4, "length_beam": 3, "rerank": "at"},
            {"text": LINES[1], "decoder": "at", "max_length": 12},
            {"texts": LINES[:2], "decoder": "at", "beam_size": 3, "max_length": 10},
            {"texts": LINES, "iterations": 0, "length_beam": 1},
        ]
        bodies = [dict(b, return_tokens=True) for b in bodies]

        def answer(b):
            r = srv.translate(b, timeout=30)
            assert r.status == 200, r
            j = r.json()
            return j["translations"], j["usage"]

        def same(got, want):
            # texts and tokens are exact; concurrent requests with the same options may be decoded as one
            # batch, and a wider padded batch may move a score in its last bits
            (gt, gu), (wt, wu) = got, want
            return gu == wu and len(gt) == len(wt) and all(
                g["text"] == w["text"] and g["tokens"] == w["tokens"] and abs(g["score"] - w["score"]) < 1e-4
                for g, w in zip(gt, wt))

        want = [answer(b) for b in bodies]

        def client(k):
            return [(i % len(bodies), answer(bodies[i % len(bodies)])) for i in range(k, k + 4)]

        with ThreadPoolExecutor(16) as ex:
            results = list(ex.map(client, range(16), timeout=60))
        assert sum(len(x) for x in results) == 64
        for res in results:
            for i, got in res:
                assert same(got, want[i]), (i, got, want[i])
        assert srv.metric("nzserve_queue_depth") == 0


# ------------------------------------------------------------------ errors

MAX_BODY = 2048
MAX_TEXTS = 4
MAX_NEW = 50

ERROR_CASES = [
    # 400: not a JSON object, invalid UTF-8, wrong types
    ("malformed", b'{"text": "abc"', 400),
    ("trailing-garbage", b'{"text": "abc"} x', 400),
    ("empty-body", b"", 400),
    ("array", b'["abc"]', 400),
    ("duplicate-key", b'{"text": "a", "text": "b"}', 400),
    ("invalid-utf8", b'{"text": "da\xff\xfete"}', 400),
    ("overlong-utf8", b'{"text": "\xc0\xaf"}', 400),
    ("lone-surrogate", b'{"text": "\\ud800"}', 400),
    ("nul-escape", b'{"text": "a\\u0000b"}', 400),
    ("text-int", {"text": 5}, 400),
    ("texts-string", {"texts": "x"}, 400),
    ("texts-int-item", {"texts": ["ok", 1]}, 400),
    ("iterations-string", {"text": "ko", "iterations": "3"}, 400),
    ("iterations-float", {"text": "ko", "iterations": 2.5}, 400),
    ("length_beam-bool", {"text": "ko", "length_beam": True}, 400),
    ("return_tokens-int", {"text": "ko", "return_tokens": 1}, 400),
    ("return_tokens-string", {"text": "ko", "return_tokens": "true"}, 400),
    ("model-int", {"text": "ko", "model": 5}, 400),
    ("rerank-int", {"text": "ko", "rerank": 1}, 400),
    ("decoder-list", {"text": "ko", "decoder": ["at"]}, 400),
    ("beam_size-string", {"text": "ko", "decoder": "at", "beam_size": "2"}, 400),
    ("return_candidates-int", {"text": "ko", "return_candidates": 1}, 400),
    # 404
    ("unknown-model", {"text": "ko", "model": "nope"}, 404),
    # 422: validation
    ("empty-text", {"text": ""}, 422),
    ("blank-text", {"text": " \t\n "}, 422),
    ("empty-texts", {"texts": []}, 422),
    ("blank-in-texts", {"texts": ["ko", "  "]}, 422),
    ("too-many-texts", {"texts": ["ko"] * (MAX_TEXTS + 1)}, 422),
    ("text-and-texts", {"text": "ko", "texts": ["ko"]}, 422),
    ("no-text", {"iterations": 1}, 422),
    ("unknown-field", {"text": "ko", "temperature": 1}, 422),
    ("iterations-high", {"text": "ko", "iterations": 101}, 422),
    ("iterations-negative", {"text": "ko", "iterations": -1}, 422),
    ("length_beam-0", {"text": "ko", "length_beam": 0}, 422),
    ("length_beam-33", {"text": "ko", "length_beam": 33}, 422),
    ("max_length-0", {"text": "ko", "max_length": 0}, 422),
    ("candidates-with-at", {"text": "ko", "decoder": "at", "return_candidates": True}, 422),
    ("max_length-over", {"text": "ko", "max_length": MAX_NEW + 1}, 422),
    ("beam_size-0", {"text": "ko", "decoder": "at", "beam_size": 0}, 422),
    ("beam_size-33", {"text": "ko", "decoder": "at", "beam_size": 33}, 422),
    ("rerank-value", {"text": "ko", "rerank": "maybe"}, 422),
    ("decoder-value", {"text": "ko", "decoder": "ctc"}, 422),
    ("rerank-with-at", {"text": "ko", "decoder": "at", "rerank": "at"}, 422),
    ("too-long-for-model", {"text": LONG_TEXT}, 422),
    ("too-long-in-texts", {"texts": ["ko", LONG_TEXT]}, 422),
]


class TestErrors:
    @pytest.fixture(scope="class")
    def srv(self, model_path):
        with Server(model_path, config={"max_body_bytes": MAX_BODY, "max_texts": MAX_TEXTS,
                                        "max_new_tokens": MAX_NEW}) as s:
            s.wait_ready()
            yield s

    @pytest.mark.parametrize("name,body,status", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
    def test_translate_errors(self, srv, name, body, status):
        r = srv.translate(body)
        e = assert_error(r, status)
        if name.startswith("too-long"):
            assert "22" in e["message"], e  # the model's limit: 24 positions - bos - eos
        if name == "unknown-field":
            assert "temperature" in e["message"]
        if name == "unknown-model":
            assert "nope" in e["message"]

    def test_input_limit_boundary(self, srv, model):
        vocab = model[2]
        words = LONG_TEXT.split()
        n = max(k for k in range(1, len(words)) if len(vocab.encode(" ".join(words[:k]))) - 2 <= 22)
        assert srv.translate({"text": " ".join(words[:n])}).status == 200
        assert len(vocab.encode(" ".join(words[:n + 1]))) - 2 > 22
        assert_error(srv.translate({"text": " ".join(words[:n + 1])}), 422)

    @pytest.mark.parametrize("method,path,status,allow", [
        ("GET", "/nope", 404, None), ("POST", "/nope", 404, None), ("GET", "/ui/nope", 404, None), ("POST", "/", 405, "GET, HEAD"),
        ("GET", "/v1/translate/", 404, None), ("GET", "/v1", 404, None), ("GET", "/healthz", 404, None),
        ("GET", "/v1/translate", 405, "POST"), ("PUT", "/v1/translate", 405, "POST"),
        ("HEAD", "/v1/translate", 405, "POST"), ("GET", "/v1/dialogue", 405, "POST"),
        ("POST", "/health", 405, "GET, HEAD"), ("PUT", "/ready", 405, "GET, HEAD"),
        ("DELETE", "/v1/models", 405, "GET, HEAD"), ("POST", "/v1/memory", 405, "GET, HEAD"),
        ("POST", "/metrics", 405, "GET, HEAD"), ("OPTIONS", "/health", 405, "GET, HEAD")])
    def test_routes(self, srv, method, path, status, allow):
        r = srv.request(method, path, body=b"{}" if method in ("POST", "PUT") else None)
        if method == "HEAD":
            assert r.status == status and r.body == b""
        else:
            assert_error(r, status)
        assert r.header("Allow") == allow

    def test_dialogue_without_dialogue_model(self, srv):
        # /v1/dialogue itself is served (tests/python/test_dialogue_server.py); this server has no dialogue model
        e = assert_error(srv.post("/v1/dialogue", {"context": "hello"}), 404)
        assert "no dialogue model is configured" in e["message"]

    def test_413_from_content_length_before_the_body(self, srv):
        # only the head is sent: the answer must come without waiting for the body
        with U.raw_connect(srv.port, timeout=5) as s:
            s.sendall(f"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode())
            r = U.raw_read_response(s, timeout=5)
        assert_error(r, 413)
        assert r.header("Connection") == "close"
        with U.raw_connect(srv.port, timeout=5) as s:
            s.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n")
            assert_error(U.raw_read_response(s, timeout=5), 413)

    def test_413_body_size_boundary(self, srv):
        body = json.dumps({"text": LINES[0]}).encode()
        exact = body[:-1] + b" " * (MAX_BODY - len(body)) + b"}"
        assert len(exact) == MAX_BODY
        assert srv.translate(exact).status == 200
        assert_error(srv.translate(exact + b" "), 413)
        assert_error(srv.translate(b"x" * (100 * MAX_BODY)), 413)

    def chunked(self, srv, chunks):
        with U.raw_connect(srv.port, timeout=10) as s:
            s.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            for c in chunks:
                s.sendall(b"%x\r\n%s\r\n" % (len(c), c))
            s.sendall(b"0\r\n\r\n")
            return U.raw_read_response(s, timeout=10)

    def test_chunked_upload(self, srv):
        body = json.dumps({"text": LINES[0], "return_tokens": True}).encode()
        r = self.chunked(srv, [body[i:i + 7] for i in range(0, len(body), 7)])
        assert r.status == 200, r
        assert r.json()["translations"][0]["tokens"] == srv.translate(body).json()["translations"][0]["tokens"]

    def test_413_chunked_over_the_cap(self, srv):
        body = json.dumps({"text": LINES[0]}).encode()
        big = body[:-1] + b" " * (MAX_BODY + 100) + b"}"
        assert_error(self.chunked(srv, [big[i:i + 500] for i in range(0, len(big), 500)]), 413)

    def test_zz_no_5xx_and_rejections_counted(self, srv):
        s = srv.metrics()
        seen = [dict(k[1]) for k in s if k[0] == "nzserve_requests_total"]
        assert {"400", "404", "405", "413", "422"} <= {l["status"] for l in seen}, seen
        # /ready answered 503 while the model loaded (wait_ready); nothing else may be a 5xx
        bad = [l for l in seen if l["status"].startswith("5") and l["route"] != "/ready"]
        assert not bad, bad
        assert U.metric(s, "nzserve_rejected_total", reason="body_too_large") >= 4


def test_model_generation_defaults(model_path, model, nzp, tmp_path):
    """A model's config "generation" decides the options a request leaves out, /v1/models lists them,
    and a request's own options win."""
    _, ref, vocab = model
    src = R.pad_batch([vocab.encode(l) for l in LINES])
    nat = T.repack(nzp, tmp_path / "nat", model_path, "generation.iterations=2", "generation.length_beam=3",
                   "generation.rerank=at")
    at = T.repack(nzp, tmp_path / "at", model_path, "generation.decoder=at", "generation.beam_size=3",
                  "generation.max_length=6")
    runs = [(nat, {"decoder": "nat", "iterations": 2, "length_beam": 3, "rerank": "at", "adaptive": False,
                   "beam_size": 1, "lenpen": 1.0},
             [({}, R.mask_predict(ref, src, max_iter=2, length_beam=3, rerank_at=True)),
              ({"iterations": 1, "rerank": "none"}, R.mask_predict(ref, src, max_iter=1, length_beam=3)),
              ({"decoder": "at"}, [{"tokens": t} for t in R.at_greedy(ref, src)])]),
            (at, {"decoder": "at", "iterations": 10, "length_beam": 5, "rerank": "none", "adaptive": False,
                  "beam_size": 3, "lenpen": 1.0, "max_length": 6},
             [({}, R.at_beam(ref, src, beam=3, lenpen=1.0, max_len_b=6)),
              ({"beam_size": 1, "max_length": 9}, [{"tokens": t} for t in R.at_greedy(ref, src, max_len_b=9)]),
              ({"decoder": "nat", "iterations": 1, "length_beam": 1, "max_length": 64},
               R.mask_predict(ref, src, max_iter=1, length_beam=1))])]
    for path, listed, cases in runs:
        with Server(path, config={"max_new_tokens": 64}) as s:
            s.wait_ready()
            assert s.get("/v1/models").json()["models"][0]["generation"] == listed
            for body, want in cases:
                r = s.translate({"texts": LINES, "return_tokens": True, **body})
                assert r.status == 200, (body, r)
                assert [g["tokens"] for g in r.json()["translations"]] == [w["tokens"] for w in want], body


def test_max_input_tokens_and_metrics_off(model_path, model):
    vocab = model[2]
    with Server(model_path, config={"max_input_tokens": 3, "metrics": False}) as s:
        s.wait_ready()
        text = LINES[0]
        assert len(vocab.encode(text)) - 2 > 3
        e = assert_error(s.translate({"texts": ["ko", text]}), 422)
        assert "texts'[1]" in e["message"] and "limit is 3" in e["message"], e
        short = "ko"
        assert len(vocab.encode(short)) - 2 <= 3
        assert s.translate({"text": short}).status == 200
        assert_error(s.get("/metrics"), 404)  # metrics: false
        assert s.request("HEAD", "/metrics").status == 404


# ------------------------------------------------------------------ API keys

KEY_A, KEY_B, KEY_C = "alpha-key-0001", "beta-key-0002", "gamma-key-0003"


def check_keys(s, good, bad):
    body = {"text": LINES[0]}
    e = assert_error(s.translate(body), 401)
    assert "missing" in e["message"]
    for k in bad:
        assert_error(s.translate(body, headers={"Authorization": f"Bearer {k}"}), 401)
        assert_error(s.translate(body, headers={"X-API-Key": k}), 401)
    for k in good:
        assert s.translate(body, headers={"Authorization": f"Bearer {k}"}).status == 200
        assert s.translate(body, headers={"X-API-Key": k}).status == 200
    assert_error(s.translate(body, headers={"Authorization": f"Basic {good[0]}"}), 401)
    assert_error(s.translate(body, headers={"Authorization": f"Bearer {good[0]}x"}), 401)
    assert_error(s.translate(body, headers={"Authorization": f"Bearer {good[0][:-1]}"}), 401)
    # the key is checked before anything else of an inference route
    assert_error(s.post("/v1/dialogue", {"text": "hi"}), 401)
    assert_error(s.post("/v1/dialogue", {"context": "hi"}, headers={"X-API-Key": good[0]}), 404)  # no dialogue model
    assert_error(s.translate(b"{bad json", headers={"X-API-Key": bad[0]}), 401)
    # exempt routes: probes and the scraper
    for path in ["/health", "/ready", "/metrics"]:
        assert s.get(path).status == 200, path
    # the other API routes need the key too
    for path in ["/v1/models", "/v1/memory"]:
        assert_error(s.get(path), 401)
        assert s.get(path, headers={"X-API-Key": good[0]}).status == 200, path
    s.wait_metric("nzserve_rejected_total", lambda v: v == 1 + 2 * len(bad) + 3 + 2 + 2, reason="unauthorized")
    log = s.log()
    for k in good + bad:
        assert k not in log, f"API key {k} in the log"


def test_api_keys_from_file(tmp_path, model_path):
    kf = tmp_path / "keys.txt"
    kf.write_text(f"# nzserve API keys\n{KEY_A}\n\n   {KEY_B}   \n#{KEY_C}\n  # indented comment\n")
    with Server(model_path, config={"api_key_file": str(kf)}) as s:
        s.wait_ready()
        check_keys(s, [KEY_A, KEY_B], [KEY_C, "#" + KEY_C, "wrong-key-9999"])
        assert s.stop() == 0
        assert KEY_A not in s.log() and KEY_B not in s.log()


@pytest.mark.parametrize("source", ["flag", "env", "config", "file-and-flag"])
def test_api_keys_from_settings(tmp_path, model_path, source):
    flags, env, config = [], {}, {}
    if source == "flag":
        flags = ["--api-keys", f"{KEY_A},{KEY_B}"]
    elif source == "env":
        env = {"NZSERVE_API_KEYS": f"{KEY_A},{KEY_B}"}
    elif source == "config":
        config = {"api_keys": [KEY_A, KEY_B]}
    else:
        kf = tmp_path / "keys"
        kf.write_text(KEY_B + "\n")
        config = {"api_key_file": str(kf)}
        flags = ["--api-keys", KEY_A]
    with Server(model_path, config=config, flags=flags, env=env) as s:
        s.wait_ready()
        check_keys(s, [KEY_A, KEY_B], [KEY_C])


# ------------------------------------------------------------------ load, queue, deadlines


def test_not_ready_while_loading(model_path):
    with Server(model_path, env={"NZSERVE_DEBUG_LOAD_DELAY_MS": 1500}) as s:
        t0 = time.monotonic()
        r = s.get("/ready")
        assert r.status == 503, r
        j = r.json()
        assert j["status"] == "loading" and j["error"]["code"] == 503
        assert s.get("/health").status == 200
        r = s.translate({"text": LINES[0]})
        e = assert_error(r, 503)
        assert "loading" in e["message"]
        assert int(r.header("Retry-After")) >= 1
        m = s.get("/v1/models").json()["models"][0]
        assert m["name"] == "m" and m["loaded"] is False
        assert s.metric("nzserve_ready") == 0
        s.wait_ready(timeout=15)
        assert time.monotonic() - t0 > 1.0
        assert s.translate({"text": LINES[0]}).status == 200
        assert s.metric("nzserve_ready") == 1
        assert s.stop() == 0


def test_sigterm_while_loading(model_path):
    with Server(model_path, env={"NZSERVE_DEBUG_LOAD_DELAY_MS": 20000}) as s:
        assert s.get("/ready").status == 503
        t0 = time.monotonic()
        assert s.stop(timeout=10) == 0
        assert time.monotonic() - t0 < 5
        assert log_events(s.log(), "stopped")


def test_queue_full_429(model_path):
    with Server(model_path, config={"max_concurrent_requests": 1, "queue_length": 0},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 100}) as s:
        s.wait_ready()
        th, out = background(s.translate, slow(20))
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        r = s.translate({"text": LINES[0]})
        e = assert_error(r, 429)
        assert int(r.header("Retry-After")) >= 1, r.headers
        assert "queue" in e["message"]
        assert th.is_alive()
        assert joined(th, out).status == 200
        assert s.translate({"text": LINES[0]}).status == 200  # room again
        assert s.metric("nzserve_rejected_total", reason="queue_full") == 1


def test_queue_admits_up_to_queue_length(model_path):
    with Server(model_path, config={"max_concurrent_requests": 1, "queue_length": 2, "batching": False},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 50}) as s:
        s.wait_ready()
        # batching off (the queue is under test): these wait for a
        a = background(s.translate, slow_nat(20))
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        b = background(s.translate, slow_nat(2))
        c = background(s.translate, slow_nat(2))
        s.wait_metric("nzserve_queue_depth", lambda v: v == 2)
        assert_error(s.translate({"text": LINES[0]}), 429)
        for th, out in (a, b, c):
            assert joined(th, out).status == 200


def test_deadline_504_while_running(model_path):
    with Server(model_path, config={"request_timeout_ms": 500}, env={"NZSERVE_DEBUG_STEP_DELAY_MS": 100}) as s:
        s.wait_ready()
        t0 = time.monotonic()
        r = s.translate(slow(30))  # about 3.2 s of decoding
        dt = time.monotonic() - t0
        e = assert_error(r, 504)
        assert "500 ms" in e["message"]
        assert 0.4 < dt < 2.0, dt
        assert s.metric("nzserve_rejected_total", reason="deadline") == 1
        assert s.metric("nzserve_requests_in_flight") == 0
        assert s.translate({"text": LINES[0], "iterations": 0}).status == 200  # the worker is free


def test_deadline_504_while_queued(model_path):
    # the running request sleeps 1 s before its first pass; the queued one must not wait for it
    with Server(model_path, config={"request_timeout_ms": 300, "max_concurrent_requests": 1, "queue_length": 4},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 1000}) as s:
        s.wait_ready()
        a = background(s.translate, slow(5))
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        t0 = time.monotonic()
        r = s.translate({"text": LINES[0]})
        dt = time.monotonic() - t0
        assert_error(r, 504)
        assert dt < 0.9, dt
        assert a[0].is_alive()
        assert_error(joined(*a), 504)
        assert s.metric("nzserve_rejected_total", reason="deadline") == 2
        assert s.metric("nzserve_queue_depth") == 0


# ------------------------------------------------------------------ shutdown


def test_graceful_shutdown_drains(model_path):
    with Server(model_path, config={"max_concurrent_requests": 3, "queue_length": 8, "shutdown_grace_ms": 20000,
                                    "batching": False},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 100}) as s:
        s.wait_ready()
        keep = http.client.HTTPConnection(U.HOST, s.port, timeout=10)  # an idle keep-alive connection
        assert s.request("GET", "/health", conn=keep).status == 200
        # 3 running + 1 queued, ~1 s each (batching off: the queue is under test)
        reqs = [background(s.translate, slow_nat(8 + i)) for i in range(4)]
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 3)
        s.wait_metric("nzserve_queue_depth", lambda v: v == 1)
        s.signal(signal.SIGTERM)
        # the listening socket goes away at once: new connections are refused
        deadline = time.monotonic() + 3
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                socket.create_connection((U.HOST, s.port), timeout=1).close()
                time.sleep(0.01)
            except (ConnectionRefusedError, ConnectionResetError):
                # refused; or reset: a connect that raced the listening socket's close
                refused = True
        assert refused, "still accepting connections after SIGTERM"
        assert any(th.is_alive() for th, _ in reqs), "requests finished before the check"
        # a request on an existing connection is turned away
        r = s.request("GET", "/health", conn=keep)
        assert_error(r, 503)
        assert r.header("Connection") == "close"
        keep.close()
        for th, out in reqs:
            r = joined(th, out)
            assert r.status == 200, r
            assert len(r.json()["translations"][0]["text"]) > 0
        assert s.wait(timeout=20) == 0
        log = s.log()
        # the 4 translations, plus at most one request (a /metrics poll of wait_metric, the keep-alive
        # /health) whose completion libmicrohttpd has not reported yet
        m = re.search(r"event=draining in_flight=(\d+)\b", log)
        assert m and 4 <= int(m.group(1)) <= 5, log
        assert re.search(r"event=stopped cancelled=0\b", log), log
        assert len([l for l in access_log(log) if l["path"] == "/v1/translate" and l["status"] == "200"]) == 4


def test_shutdown_grace_over_503(model_path):
    with Server(model_path, config={"max_concurrent_requests": 2, "queue_length": 4, "shutdown_grace_ms": 300,
                                    "batching": False},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 100}) as s:
        s.wait_ready()
        # ~4 s each: 2 running, 1 queued (batching off: one waits its turn)
        reqs = [background(s.translate, slow_nat(40 + i)) for i in range(3)]
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 2)
        s.wait_metric("nzserve_queue_depth", lambda v: v == 1)
        t0 = time.monotonic()
        s.signal(signal.SIGTERM)
        for th, out in reqs:
            r = joined(th, out, timeout=10)
            e = assert_error(r, 503)
            assert "shutting down" in e["message"]
        assert s.wait(timeout=10) == 0
        assert time.monotonic() - t0 < 3.0
        log = s.log()
        assert re.search(r"event=stopped cancelled=3\b", log), log


# ------------------------------------------------------------------ disconnects


def test_disconnect_cancels_running_and_queued(model_path):
    with Server(model_path, config={"max_concurrent_requests": 1, "queue_length": 4},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 100}) as s:
        s.wait_ready()
        a = U.raw_connect(s.port)
        a.sendall(U.post_request_bytes("/v1/translate", json.dumps(slow(40)).encode()))  # ~4 s
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        b = U.raw_connect(s.port)
        b.sendall(U.post_request_bytes("/v1/translate", json.dumps(slow(41)).encode()))
        s.wait_metric("nzserve_queue_depth", lambda v: v == 1)
        # the queued one leaves: it is dropped from the queue, the running one goes on
        b.close()
        s.wait_metric("nzserve_rejected_total", lambda v: v == 1, timeout=5, reason="cancelled")
        assert s.metric("nzserve_queue_depth") == 0 and s.metric("nzserve_requests_in_flight") == 1
        # the running one leaves: its worker stops at the next decoder pass
        t0 = time.monotonic()
        a.close()
        r = s.translate({"text": LINES[0], "iterations": 0})
        dt = time.monotonic() - t0
        assert r.status == 200, r
        assert dt < 2.0, f"the next request took {dt:.2f} s: the cancelled one kept the worker"
        assert s.metric("nzserve_rejected_total", reason="cancelled") == 2
        s.wait_metric("nzserve_requests_total", lambda v: v == 2, route="/v1/translate", status="499")
        lines = [l for l in access_log(s.log()) if l["status"] == "499"]
        assert len(lines) == 2 and all(l["path"] == "/v1/translate" for l in lines), lines
        assert s.stop() == 0


def test_batched_request_released_alone(model_path):
    """Requests that arrive while a batch runs join it (mask-predict: at the next pass); a member whose
    client leaves (or whose deadline passes) is answered and released at once, and its batch mates still
    get their translations."""
    with Server(model_path, config={"max_concurrent_requests": 1, "queue_length": 8, "request_timeout_ms": 30000},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 100}) as s:
        s.wait_ready()
        busy = U.raw_connect(s.port)
        busy.sendall(U.post_request_bytes("/v1/translate", json.dumps(slow_nat(30)).encode()))  # ~3.2 s
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        # three more join its batch (each with its own options would do too)
        socks = [U.raw_connect(s.port) for _ in range(3)]
        for k in socks:
            k.sendall(U.post_request_bytes("/v1/translate", json.dumps(slow_nat(12)).encode()))  # ~1.4 s
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 4)
        assert s.metric("nzserve_queue_depth") == 0
        t0 = time.monotonic()
        socks[1].close()  # leaves while its batch runs: released at the next pass
        s.wait_metric("nzserve_rejected_total", lambda v: v == 1, timeout=5, reason="cancelled")
        assert time.monotonic() - t0 < 1.5  # a pass (0.1 s + its work), not the batch (~1.4 s more)
        assert s.metric("nzserve_requests_in_flight") == 3
        for k in (socks[0], socks[2]):
            r = U.raw_read_response(k)
            assert r.status == 200, r
            assert json.loads(r.body)["translations"][0]["text"] is not None
        assert U.raw_read_response(busy).status == 200
        ok = lambda ls: [l for l in ls if l["path"] == "/v1/translate" and l["status"] == "200"]
        lines = ok(s.wait_access(lambda ls: len(ok(ls)) >= 3))
        assert sum(int(l["batch_texts"]) >= 2 for l in lines) >= 2, lines  # the joiners ended with busy
    # a batch member whose deadline passes gets its 504 on time, not when the batch ends
    with Server(model_path, config={"max_concurrent_requests": 1, "queue_length": 8, "request_timeout_ms": 3000},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 100}) as s:
        s.wait_ready()
        busy = U.raw_connect(s.port)
        busy.sendall(U.post_request_bytes("/v1/translate", json.dumps(slow_nat(20)).encode()))  # ~2.2 s
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        late = U.raw_connect(s.port)
        late.sendall(U.post_request_bytes("/v1/translate", json.dumps(slow_nat(40)).encode()))  # ~4.2 s > 3 s
        t0 = time.monotonic()
        r = U.raw_read_response(late, timeout=10)
        assert r.status == 504, r
        assert time.monotonic() - t0 < 3.6  # its deadline (3 s from arrival), not the end of the run
        assert U.raw_read_response(busy).status == 200
        for k in socks + [busy, late]:
            k.close()
        assert s.stop() == 0


def test_at_greedy_joins_a_running_batch(model_path):
    """AT greedy translations are batched continuously: a short request sent while a long one runs joins
    its batch at the next decoder step and is answered long before the long one ends, with the translation
    it gets alone; a leaving member does not disturb the other."""
    with Server(model_path, config={"max_concurrent_requests": 1, "queue_length": 8},
                env={"NZSERVE_DEBUG_STEP_DELAY_MS": 50}) as s:
        s.wait_ready()
        busy = background(s.translate, slow(80))  # ~4 s of 50 ms steps
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        gone = U.raw_connect(s.port)
        gone.sendall(U.post_request_bytes("/v1/translate", json.dumps(slow(30)).encode()))
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 2)
        t0 = time.monotonic()
        short = {"texts": LINES[:2], "decoder": "at", "max_length": 4, "return_tokens": True}
        r = s.translate(short)
        dt = time.monotonic() - t0
        assert r.status == 200, r
        assert busy[0].is_alive(), ("the long request ended first", r.json(), dt, joined(*busy).json())
        assert r.json()["timing_ms"]["queue"] < 200 and dt < 1.5, (r.json()["timing_ms"], dt)
        gone.close()
        s.wait_metric("nzserve_rejected_total", lambda v: v == 1, timeout=5, reason="cancelled")
        assert joined(*busy).status == 200
        line = s.access_lines(lambda l: l["path"] == "/v1/translate" and l["texts"] == "2")
        assert int(line[0]["batch_texts"]) >= 2, line
        alone = s.translate(short)
        assert r.json()["translations"] == alone.json()["translations"]


# ------------------------------------------------------------------ startup failures


def write_config(tmp_path, cfg, name="bad.json"):
    p = tmp_path / name
    p.write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    return p


@pytest.mark.parametrize("name,cfg,args,env,needle", [
    ("port-type", {"port": "abc"}, [], {}, "'port'"),
    ("port-range", {"port": 70000}, [], {}, "'port'"),
    ("unknown-key", {"prot": 1}, [], {}, "prot"),
    ("not-json", "{\"port\": ", [], {}, "bad.json"),
    ("task", {"models": [{"name": "m", "task": "summarize", "path": "x.nzp"}]}, [], {}, "models[0].task"),
    ("model-name", {"models": [{"name": "a b", "task": "translate", "path": "x.nzp"}]}, [], {}, "models[0].name"),
    ("no-models", {"models": []}, [], {}, "models"),
    ("queue-length", {"queue_length": -1}, [], {}, "queue_length"),
    ("log-format", {"log_format": "xml"}, [], {}, "log_format"),
    ("flag-value", {}, ["--max-texts", "abc"], {}, "--max-texts"),
    ("flag-missing-value", {}, ["--queue-length"], {}, "--queue-length"),
    ("unknown-flag", {}, ["--bogus", "1"], {}, "--bogus"),
    ("env-value", {}, [], {"NZSERVE_QUEUE_LENGTH": "-1"}, "NZSERVE_QUEUE_LENGTH"),
    ("env-unknown", {}, [], {"NZSERVE_QUEUE_LENGHT": "1"}, "NZSERVE_QUEUE_LENGHT"),
    ("short-api-key", {"api_keys": ["sh0rt!"]}, [], {}, "api_keys"),
    ("missing-key-file", {"api_key_file": "/nonexistent/keys.txt"}, [], {}, "/nonexistent/keys.txt"),
    ("empty-key-file", {}, ["--api-key-file", "empty-keys.txt"], {}, "holds no API key"),
])
def test_bad_config_exit_2(tmp_path, model_path, name, cfg, args, env, needle):
    empty = tmp_path / "empty-keys.txt"  # the "empty-key-file" case: comments and blanks only
    empty.write_text("# keys go here\n\n   \n")
    if isinstance(cfg, dict):
        cfg = {"models": [{"name": "m", "task": "translate", "path": str(model_path)}], "port": 0, **cfg}
    p = write_config(tmp_path, cfg)
    r = U.run_nzserve(["--config", p, *args], env=env, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert needle in r.stderr, r.stderr
    assert "sh0rt!" not in r.stderr  # an API key is never echoed


def test_missing_model_file_exit_1(tmp_path, model_path):
    missing = tmp_path / "nowhere" / "model.nzp"
    p = write_config(tmp_path, {"port": 0, "models": [{"name": "m", "task": "translate", "path": str(missing)}]})
    r = U.run_nzserve(["--config", p], cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert str(missing) in r.stderr
    # not a model at all
    junk = tmp_path / "junk.nzp"
    junk.write_bytes(b"not a model" * 100)
    r = U.run_nzserve(["--config", p, "--model", f"m:translate:{junk}"], cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert str(junk) in r.stderr


def test_port_in_use_exit_1(tmp_path, model_path):
    with socket.socket() as busy:
        busy.bind((U.HOST, 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = write_config(tmp_path, {"models": [{"name": "m", "task": "translate", "path": str(model_path)}]})
        r = U.run_nzserve(["--config", p, "--port", port], cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert str(port) in r.stderr and "listen" in r.stderr


def test_help_exit_0():
    r = U.run_nzserve(["--help"])
    assert r.returncode == 0 and "--max-concurrent-requests" in r.stdout


# ------------------------------------------------------------------ logs


def test_json_logs(tmp_path, model_path):
    kf = tmp_path / "keys.txt"
    kf.write_text(KEY_B + "\n")
    with Server(model_path, config={"log_format": "json", "api_keys": [KEY_A], "api_key_file": str(kf)}) as s:
        s.wait_ready()
        assert s.translate({"text": LINES[0]}, headers={"X-API-Key": KEY_A}).status == 200
        assert s.translate({"text": LINES[0]}, headers={"Authorization": f"Bearer {KEY_B}"}).status == 200
        assert s.translate({"text": LINES[0]}, headers={"X-API-Key": KEY_C}).status == 401
        assert s.translate({"text": ""}, headers={"X-API-Key": KEY_A}).status == 422
        assert s.get("/nope").status == 404
        assert s.stop() == 0
        log = s.log()
    lines = [l for l in log.splitlines() if l.strip()]
    events = []
    for l in lines:
        j = json.loads(l)  # every line is one JSON object
        assert isinstance(j, dict) and "event" in j and "level" in j, l
        events.append(j)
    names = [e["event"] for e in events]
    for ev in ["starting", "listening", "model_loaded", "ready", "signal", "draining", "stopped"]:
        assert ev in names, names
    starting = events[names.index("starting")]
    assert json.loads(starting["config"])["api_keys"] == 2  # a count, not the keys
    access = [e for e in events if e["event"] == "request"]
    by_status = {}
    for e in access:
        assert isinstance(e["status"], int) and isinstance(e["latency_ms"], (int, float)) and e["latency_ms"] >= 0
        assert e["method"] in ("GET", "POST") and e["path"].startswith("/")
        by_status.setdefault(e["status"], []).append(e)
    ok = [e for e in by_status.get(200, []) if e["path"] == "/v1/translate"]
    assert len(ok) == 2 and all(e["model"] == "m" and e["tokens_in"] > 0 for e in ok), ok
    assert {401, 422, 404} <= set(by_status), by_status.keys()
    for k in (KEY_A, KEY_B, KEY_C):
        assert k not in log, f"API key {k} in the log"


def test_logfmt_access_log(model_path):
    with Server(model_path) as s:
        s.wait_ready()
        r = s.translate({"texts": LINES[:2]})
        assert r.status == 200
        assert s.translate({"text": ""}).status == 422
        assert s.stop() == 0
        lines = access_log(s.log())
    ok = [l for l in lines if l["path"] == "/v1/translate" and l["status"] == "200"]
    assert len(ok) == 1, lines
    l = ok[0]
    assert l["method"] == "POST" and l["model"] == "m" and l["texts"] == "2"
    assert float(l["latency_ms"]) >= 0 and float(l["queue_ms"]) >= 0
    assert int(l["tokens_in"]) == r.json()["usage"]["input_tokens"]
    assert int(l["tokens_out"]) == r.json()["usage"]["output_tokens"]
    assert sorted(l["status"] for l in lines if l["path"] == "/v1/translate") == ["200", "422"]


def damage_tile(src, dst, suffix="fc1.weight"):
    """Copy the .nzp src to dst with one bit flipped in the middle of the first tile of the mask-predict
    decoder's first compressed tensor named *suffix (read on every translation, decoded lazily).
    @return that tensor's name."""
    b = bytearray(src.read_bytes())
    hlen, doff = struct.unpack_from("<QQ", b, 16)
    t = [x for x in json.loads(b[64:64 + hlen])["tensors"]
         if x["name"].startswith("decoder.") and x["name"].endswith(suffix) and x["mode"] != "raw"][0]
    off, size = t["tiles"][0][0], t["tiles"][0][1]
    b[doff + off + size // 2] ^= 0x10
    dst.write_bytes(b)
    return t["name"]


def test_damaged_tile_refused_at_load(tmp_path, model_path):
    """verify_on_load (default): every tile's checksum is checked while loading; a damaged model is not
    served: /ready answers 503 naming it, the tensor and the tile, its requests 503 with the same, a
    load_failed log line names them, and the other model is served. Off: the server starts and the
    request that touches the tile gets a JSON 500 naming it."""
    bad = tmp_path / "bad.nzp"
    name = damage_tile(model_path, bad)
    models = [{"name": "good", "task": "translate", "path": str(model_path)},
              {"name": "bad", "task": "translate", "path": str(bad)}]
    with Server(models=models) as s:
        r = s.wait_loaded()
        msg = r.json()["error"]["message"]
        assert r.status == 503 and r.json()["status"] == "degraded", r.body
        assert "'bad'" in msg and f"tensor '{name}'" in msg and "checksum mismatch" in msg, msg
        e = assert_error(s.translate({"texts": LINES[:2], "model": "bad"}), 503)
        assert f"tensor '{name}'" in e["message"] and "failed to load" in e["message"], e
        assert s.translate({"texts": LINES[:2], "model": "good"}).status == 200
        ms = {m["name"]: m for m in s.get("/v1/models").json()["models"]}
        assert ms["good"]["available"] and not ms["bad"]["available"] and not ms["bad"]["loaded"]
        assert f"tensor '{name}'" in ms["bad"]["error"]
        s.wait_log(r"event=load_failed .*model=bad\b")
        assert s.get("/health").status == 200
    with Server(bad, config={"verify_on_load": False}) as s:
        s.wait_ready()
        e = assert_error(s.translate({"texts": LINES[:2]}), 500, "internal_error")
        assert f"tensor '{name}'" in e["message"] and "checksum mismatch" in e["message"], e
        assert s.get("/health").status == 200


def test_file_truncated_under_the_server(tmp_path, model_path):
    """A served .nzp truncated in place (SIGBUS on its mapping) fails the requests that touch it with a
    JSON 503 and a log line, /ready turns 503 naming the model, and the server keeps serving the other
    model (nz_guard.h)."""
    a, b = tmp_path / "a.nzp", tmp_path / "b.nzp"
    shutil.copy(model_path, a)
    shutil.copy(model_path, b)
    models = [{"name": "a", "task": "translate", "path": str(a)}, {"name": "b", "task": "translate", "path": str(b)}]
    with Server(models=models, config={"tile_cache_bytes": 0}) as s:
        s.wait_ready()
        assert s.translate({"texts": LINES[:2], "model": "a"}).status == 200
        os.truncate(a, 4096)
        e = assert_error(s.translate({"texts": LINES[:2], "model": "a"}), 503)
        assert str(a) in e["message"] and "changed under" in e["message"], e
        s.wait_log(r"event=model_file_changed .*model=a\b")
        e = assert_error(s.translate({"texts": LINES[:2], "model": "a"}), 503)  # refused before it runs
        assert "unavailable" in e["message"], e
        r = s.get("/ready")
        assert r.status == 503 and "'a'" in r.json()["error"]["message"], r.body
        assert s.translate({"texts": LINES[:2], "model": "b"}).status == 200
        avail = {m["name"]: m["available"] for m in s.get("/v1/models").json()["models"]}
        assert avail == {"a": False, "b": True}
        assert s.get("/health").status == 200
        assert s.proc.poll() is None


def sigterm_exits_within(s, limit):
    """SIGTERM s: it must exit 0 within limit seconds."""
    t0 = time.monotonic()
    s.signal(signal.SIGTERM)
    assert s.wait(timeout=10) == 0
    dt = time.monotonic() - t0
    assert dt < limit, f"exited {dt:.2f} s after SIGTERM (limit {limit} s)"


TILE_DELAY_US = 20000  # NZ_DEBUG_TILE_DELAY_US: one mask-predict pass of LINES takes about a second


def test_cancel_within_a_pass(model_path):
    """Deadlines, a client that leaves and shutdown stop a request inside its forward pass (the reaper
    cancels the worker's matmul context; it stops within a tile), not at the next pass: with every
    weight tile slowed to 20 ms a single pass of this request takes about a second."""
    body = {"texts": LINES[:6], "iterations": 0, "length_beam": 1}
    with Server(model_path, config={"max_concurrent_requests": 1, "request_timeout_ms": 300},
                env={"NZ_DEBUG_TILE_DELAY_US": TILE_DELAY_US}) as s:
        s.wait_ready()
        t0 = time.monotonic()
        assert_error(s.translate(body), 504)
        dt = time.monotonic() - t0
        assert dt < 0.8, f"504 after {dt:.2f} s for a 0.3 s deadline"
    with Server(model_path, config={"max_concurrent_requests": 1, "shutdown_grace_ms": 200},
                env={"NZ_DEBUG_TILE_DELAY_US": TILE_DELAY_US}) as s:
        s.wait_ready()
        # a client that leaves: the worker is free again within half a second
        a = U.raw_connect(s.port)
        a.sendall(U.post_request_bytes("/v1/translate", json.dumps(body).encode()))
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        time.sleep(0.1)  # inside the first pass
        t0 = time.monotonic()
        a.close()
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 0, timeout=5)
        dt = time.monotonic() - t0
        assert dt < 0.5, f"the worker went on {dt:.2f} s after its client left"
        assert s.metric("nzserve_rejected_total", reason="cancelled") == 1
        # SIGTERM with a long request running: answered 503 and exited within the grace period
        th, out = background(s.translate, dict(body, iterations=10))
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        sigterm_exits_within(s, 0.2 + 0.6)
        assert_error(joined(th, out), 503)


def test_rss_returns_to_warm_level_after_large_jobs():
    """After large jobs the RSS goes back to its warm level (one malloc arena, malloc_trim after each large
    job) instead of keeping their peak: the demo model, warmed by a small request of each kind on each
    worker, then a mixed run of large NAT and AT-beam requests, two at a time."""
    demo = pathlib.Path(U.REPO) / "models" / "demo" / "nat-ende.nzp"
    src = [l.strip() for l in demo.with_name("nat-ende.sample.en").read_text().splitlines()][:32]
    nat = {"texts": src, "decoder": "nat", "iterations": 1, "length_beam": 6}
    at = {"texts": src, "decoder": "at", "beam_size": 6}
    with Server(demo, config={"max_concurrent_requests": 2, "max_texts": 64}) as s:
        s.wait_ready()
        mem = s.get("/v1/memory").json()
        if mem["allocator"] != "glibc":
            pytest.skip("a sanitizer's allocator keeps freed memory (quarantine): RSS is checked with glibc malloc")
        small = [dict(b, texts=src[:4]) for b in (nat, at, at, nat)]
        with ThreadPoolExecutor(2) as ex:  # warm: both workers have run a (small) job of each kind
            assert all(r.status == 200 for r in ex.map(s.translate, small))
        warm = s.get("/v1/memory").json()["rss_bytes"]
        with ThreadPoolExecutor(2) as ex:
            rs = list(ex.map(s.translate, [nat, at, at, nat, nat, nat]))
        assert all(r.status == 200 for r in rs)
        mem = s.get("/v1/memory").json()
        assert mem["rss_peak_bytes"] > 1.3 * warm  # the jobs did need memory
        assert mem["rss_bytes"] <= 1.15 * warm, (mem["rss_bytes"] >> 20, warm >> 20, mem["rss_peak_bytes"] >> 20)
        # the report explains the resident set: counted heap + the libraries' heap + malloc's resident free
        # memory + file-backed pages, each counted once (malloc's free lists keep trimmed, non-resident chunks)
        assert 0.9 <= mem["accounted_fraction"] <= 1.01, mem
        assert mem["accounted_bytes"] == (mem["counted_heap_bytes"] + mem["other_heap_bytes"]
                                          + mem["allocator_free_resident_bytes"]
                                          + mem["mapped_resident_bytes"] + mem["code_resident_bytes"]), mem
        assert mem["allocator_free_resident_bytes"] <= mem["allocator_free_bytes"], mem
        assert mem["counted_heap_bytes"] + mem["other_heap_bytes"] <= mem["anon_resident_bytes"], mem


DEMO_TR = pathlib.Path(U.REPO) / "models" / "demo" / "nat-ende.nzp"


def demo_long_text(n_words=130):
    """About 220 tokens of the demo translator's sample text (the limit is 254)."""
    words = " ".join(l.strip() for l in DEMO_TR.with_name("nat-ende.sample.en").read_text().splitlines()).split()
    return " ".join(words[:n_words])


def test_memory_budget_bounds_worst_case_requests():
    """memory_budget_bytes 512 MiB: the worst-case requests of issue 17 (64 long texts with 32 length-beam
    candidates and 100 iterations; AT beam 32 over 64 long texts), alone and two at once, run in chunks that
    fit the request pool (estimated peaks reserved before each chunk) and end with a JSON answer (here the
    deadline's 504), while the process's peak RSS stays under the budget + 10 %. Without the budget the NAT
    request alone reached 1.37 GiB."""
    text = demo_long_text()
    nat = {"texts": [text] * 64, "decoder": "nat", "length_beam": 32, "iterations": 100}
    at = {"texts": [text] * 64, "decoder": "at", "beam_size": 32}
    budget = 512 << 20
    with Server(DEMO_TR, config={"memory_budget_bytes": budget, "max_concurrent_requests": 2,
                                 "request_timeout_ms": 4000, "max_texts": 64}) as s:
        s.wait_ready()
        mem = s.get("/v1/memory").json()
        pool = mem["requests"]["pool_bytes"]
        assert mem["requests"]["budget_bytes"] == budget and 0 < pool < budget
        for bodies in ([nat], [at], [nat, at]):
            with ThreadPoolExecutor(2) as ex:
                rs = list(ex.map(lambda b: s.translate(b, timeout=30), bodies))
            for r in rs:
                assert r.status in (200, 504), r
                assert r.status == 200 or r.json()["error"]["type"] == "deadline_exceeded"
        # a 504 is answered at once; its job gives its reservation back when it has stopped (a pass later)
        deadline = time.monotonic() + 5
        while s.get("/v1/memory").json()["requests"]["reserved_bytes"] and time.monotonic() < deadline:
            time.sleep(0.02)
        mem = s.get("/v1/memory").json()
        req = mem["requests"]
        assert 0 < req["peak_reserved_bytes"] <= pool and req["reserved_bytes"] == 0
        assert s.metric("nzserve_request_memory_pool_bytes") == pool
        if mem["allocator"] == "glibc":  # a sanitizer's allocator and shadow memory are not the process's own
            assert mem["rss_peak_bytes"] <= 1.1 * budget, (mem["rss_peak_bytes"] >> 20, budget >> 20)


def test_mask_predict_gives_back_its_unused_reservation():
    """Before it runs, a mask-predict chunk reserves its peak for the longest target a length prediction
    could give; once the lengths are predicted it gives back what its actual candidates cannot use."""
    body = {"texts": ["Open the file in a new window."] * 16, "decoder": "nat", "iterations": 20}
    # generous timeouts: 16 texts x 20 passes take minutes under ASan on busy cores (tests/load/asan_soak.sh)
    with Server(DEMO_TR, config={"memory_budget_bytes": 1 << 30, "request_timeout_ms": 300000}) as s:
        s.wait_ready()
        th, out = background(s.translate, body, timeout=300)
        seen = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and th.is_alive():
            seen.append(s.get("/v1/memory").json()["requests"]["reserved_bytes"])
            if len(seen) > 2 and 0 < seen[-1] < max(seen) / 4:
                break
            time.sleep(0.02)
        peak = s.get("/v1/memory").json()["requests"]["peak_reserved_bytes"]
        assert 0 < seen[-1] < peak / 4, (seen, peak)
        assert joined(th, out, timeout=300).status == 200


def test_worst_case_requests_stop_on_time():
    """The worst-case requests of issue 17 stop promptly: a deadline is overshot by < 0.5 s, a client that
    leaves frees its worker within 0.5 s, and SIGTERM with two of them running exits 0 within the grace."""
    text = demo_long_text()
    nat = {"texts": [text] * 64, "decoder": "nat", "length_beam": 32, "iterations": 100}
    at = {"texts": [text] * 64, "decoder": "at", "beam_size": 32}
    with Server(DEMO_TR, config={"memory_budget_bytes": 512 << 20, "max_concurrent_requests": 2,
                                 "request_timeout_ms": 1500, "shutdown_grace_ms": 500}) as s:
        s.wait_ready()
        for body in (nat, at):
            t0 = time.monotonic()
            assert_error(s.translate(body, timeout=30), 504)
            dt = time.monotonic() - t0
            assert dt < 1.5 + 0.5 * (2.0 if s.get("/v1/memory").json()["allocator"] != "glibc" else 1.0), \
                f"504 after {dt:.2f} s for a 1.5 s deadline"
        # a tile of these requests' passes is large: under a sanitizer (every other instruction checked) it
        # takes longer than the 0.5 s the issue asks of a plain build
        slack = 2.0 if s.get("/v1/memory").json()["allocator"] != "glibc" else 1.0
        a = U.raw_connect(s.port)
        a.sendall(U.post_request_bytes("/v1/translate", json.dumps(nat).encode()))
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 1)
        time.sleep(0.2)
        t0 = time.monotonic()
        a.close()
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 0, timeout=5)
        assert time.monotonic() - t0 < 0.5 * slack
        ths = [background(s.translate, b) for b in (nat, at)]
        s.wait_metric("nzserve_requests_in_flight", lambda v: v == 2)
        sigterm_exits_within(s, (0.5 + 0.5) * slack)
        for th, out in ths:
            assert_error(joined(th, out), 503)


def test_memory_budget_refuses_what_never_fits(tmp_path):
    """A request whose estimated peak exceeds the whole request pool gets a JSON 413 naming the limit at
    once; small requests on the same server run; a budget below what the loaded model holds is a load
    failure (exit 1) naming it."""
    p = write_config(tmp_path, {"port": 0, "memory_budget_bytes": "24MiB",
                                "models": [{"name": "m", "task": "translate", "path": str(DEMO_TR)}]})
    r = U.run_nzserve(["--config", p], cwd=tmp_path)
    assert r.returncode == 1 and "memory_budget_bytes" in r.stderr, r.stderr
    with Server(DEMO_TR) as s:  # the default budget: the resident set once loaded
        s.wait_ready()
        rss = s.get("/v1/memory").json()["rss_bytes"]
    budget = int((rss + (40 << 20)) / 0.95)  # a request pool of about 40 MiB
    with Server(DEMO_TR, config={"memory_budget_bytes": budget}) as s:
        s.wait_ready()
        t0 = time.monotonic()
        e = assert_error(s.translate({"texts": [demo_long_text()], "decoder": "nat", "length_beam": 32,
                                      "iterations": 1}), 413)
        assert time.monotonic() - t0 < 1.0
        assert "'texts'[0]" in e["message"] and "memory_budget_bytes" in e["message"], e
        assert s.metric("nzserve_rejected_total", reason="memory") == 1
        assert s.translate({"texts": ["Open the file."]}).status == 200


def test_read_deadline_is_absolute(model_path):
    """read_timeout_ms bounds the time to send a request's headers and body, however often bytes trickle
    in (libmicrohttpd's connection timeout is an idle timeout, reset by every byte); a keep-alive client
    that sends its next request in time is served, and the closures are counted."""

    def trickle(first, then, s):
        """Send first, then one byte of then every 50 ms; @return seconds until the server closed."""
        k = socket.create_connection((U.HOST, s.port), timeout=5)
        k.sendall(first)
        t0 = time.monotonic()
        try:
            for i in range(80):  # 4 s at most
                k.sendall(then[i % len(then):i % len(then) + 1])
                r, _, _ = select.select([k], [], [], 0.05)
                if r and not k.recv(4096):
                    return time.monotonic() - t0
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - t0
        finally:
            k.close()
        return None

    with Server(model_path, config={"read_timeout_ms": 500, "connection_timeout_s": 60}) as s:
        s.wait_ready()
        dt = trickle(b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X-Slow: aaaaaaaa\r\n", s)
        assert dt is not None and dt < 1.2, f"headers trickled for {dt} s"
        body = json.dumps({"text": LINES[0]}).encode()
        head = b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (len(body) + 200)
        dt = trickle(head, b" ", s)
        assert dt is not None and dt < 1.2, f"body trickled for {dt} s"
        c = http.client.HTTPConnection(U.HOST, s.port, timeout=5)
        for _ in range(3):  # keep-alive: each request in time, 0.3 s apart
            c.request("GET", "/health")
            r = c.getresponse()
            assert r.status == 200 and r.read()
            time.sleep(0.3)
        c.close()
        assert s.metric("nzserve_rejected_total", reason="read_timeout") >= 2


def test_connection_flood_from_one_client(model_path):
    """Thousands of idle sockets from one address (a slowloris client) take at most
    max_connections_per_client of the server: /health and a translation from another loopback address
    are answered at once."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = 4500
    if soft < n + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 200), hard))
        n = min(n, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200)
    socks = []
    with Server(model_path, config={"max_connections_per_client": 16, "connection_timeout_s": 60}) as s:
        s.wait_ready()
        try:
            for _ in range(n):
                k = socket.socket()
                k.setblocking(False)
                k.connect_ex((U.HOST, s.port))
                socks.append(k)
            time.sleep(0.3)  # the server accepts (and drops what is beyond the per-client limit)

            def from_other_address(method, path, body=None):
                c = http.client.HTTPConnection(U.HOST, s.port, timeout=5, source_address=("127.0.0.2", 0))
                t0 = time.monotonic()
                c.request(method, path, body=json.dumps(body) if body else None,
                          headers={"Content-Type": "application/json"} if body else {})
                r = c.getresponse()
                out = (r.status, r.read(), time.monotonic() - t0)
                c.close()
                return out
            st, _, dt = from_other_address("GET", "/health")
            assert st == 200 and dt < 0.1, (st, dt)
            st, b, _ = from_other_address("POST", "/v1/translate", {"text": LINES[0]})
            assert st == 200 and json.loads(b)["translations"][0]["text"], b
        finally:
            for k in socks:
                k.close()
        assert s.get("/health").status == 200  # and the flooding address is served again
