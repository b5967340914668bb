"""Same tokens as alone under concurrency (issue 16): 50 mixed requests sent at once to a server with both
demo models (continuously batched greedy and seeded sampled dialogue with per-request options, beam-search
dialogue, AT greedy and beam translation, mask-predict translation, streamed and plain) get exactly the
tokens, texts and scores each gets when sent alone afterwards. Two workers, so continuous batches, static
batches and lone jobs run side by side. Under a sanitizer or valgrind-like slowness the requests are
shorter (fewer tokens), not fewer."""

import os
import random
import threading

import server_util as U
from server_util import Server

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEMO_TR = os.path.join(REPO, "models", "demo", "nat-ende.nzp")
DEMO_DLG = os.path.join(REPO, "models", "demo", "dialogue.nzp")

CONTEXTS = [["Where are you going?"], ["I have not seen you for a long time.", "Yes, I was away at sea."],
            ["What is the matter with the printer?"], ["Do you think it will rain tomorrow?"],
            ["Can you book a table for two tonight?"], ["Tell me about the whale.", "It was white."]]
SENTENCES = ["Open the file in a new window.", "The printer is out of paper.", "Could not connect to the server.",
             "Save changes to the document before closing?", "Select the text you want to copy.",
             "Show hidden files"]


def mixed_requests(n, mnt):
    """n (route, body) pairs of every kind, reproducible."""
    rng = random.Random(16)
    out = []
    for i in range(n):
        kind = i % 7
        if kind <= 3:  # dialogue: greedy with varied options, seeded sampling, beam
            body = {"model": "dlg", "context": rng.choice(CONTEXTS), "max_new_tokens": rng.randint(2, mnt),
                    "return_tokens": True, "strategy": "greedy"}  # explicit: the model's default may be beam
            if kind == 1:
                body.update(strategy="sample", seed=rng.randint(0, 1000), temperature=rng.choice([0.7, 1.0]),
                            top_p=rng.choice([0.9, 1.0]))
            elif kind == 2:
                body.update(strategy="beam", beam_size=rng.choice([2, 3]))
            elif kind == 3:
                body.update(no_repeat_ngram_size=rng.choice([0, 2, 3]), decoders=rng.sample(range(5), 2))
            if i % 3 == 0:
                body["stream"] = True
            out.append(("/v1/dialogue", body))
        else:  # translation: AT greedy, AT beam, mask-predict
            body = {"model": "tr", "text": rng.choice(SENTENCES), "return_tokens": True}
            if kind == 4:
                body.update(decoder="at")
            elif kind == 5:
                body.update(decoder="at", beam_size=rng.choice([2, 4]))
            else:
                body.update(decoder="nat", iterations=rng.choice([2, 4]), length_beam=rng.choice([1, 3]))
            out.append(("/v1/translate", body))
    return out


def answer(s, route, body):
    """The response JSON's comparable part (a stream: its done event)."""
    if body.get("stream"):
        r = s.stream(body, timeout=120)
        assert r.status == 200, (body, r)
        ev = U.parse_sse(r.body)
        assert [e for e, _ in ev] == ["token"] * (len(ev) - 1) + ["done"], ev
        j = ev[-1][1]
    else:
        r = s.post(route, body, timeout=120)
        assert r.status == 200, (body, r.text)
        j = r.json()
    return j["responses"] if route == "/v1/dialogue" else j["translations"]


def test_fifty_mixed_concurrent_requests_as_alone():
    models = [{"name": "tr", "task": "translate", "path": DEMO_TR},
              {"name": "dlg", "task": "dialogue", "path": DEMO_DLG}]
    with Server(models=models, config={"max_concurrent_requests": 2, "worker_threads": 2, "queue_length": 64,
                                       "request_timeout_ms": 600000}, lifetime=900) as s:
        s.wait_ready()
        slow = s.get("/v1/memory").json()["allocator"] != "glibc"  # a sanitizer build
        reqs = mixed_requests(50, 6 if slow else 16)
        got = [None] * len(reqs)
        errors = []

        def send(i):
            try:
                got[i] = answer(s, *reqs[i])
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append((i, repr(e)))

        ths = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
        for t in ths:
            t.start()
        for t in ths:
            t.join(600)
        assert not errors, errors
        lines = s.access_lines(lambda l: l["path"] in ("/v1/dialogue", "/v1/translate"), len(reqs))
        assert max(int(l["batch_texts"]) for l in lines) >= 4, "nothing was batched"
        # the batches never held more memory than their members had reserved (their bounds held)
        assert s.get("/v1/memory").json()["requests"]["overrun_bytes"] == 0
        for i, (route, body) in enumerate(reqs):
            alone = answer(s, route, body)
            assert got[i] == alone, (i, body, got[i], alone)
