#!/usr/bin/python3
"""nzserve under valgrind memcheck (make valgrind): start the server on a tiny
random-weight translation model (the fixture of test_translate_cli.py) and a
tiny random-weight dialogue model (server_util.build_dialogue_model, when
PyTorch is there to build it), drive every route and error class, a batch
translation, dialogue requests (greedy, beam, sampling with the distinct
filter, a streamed one), a running translation and a running stream whose
clients disconnect, then SIGTERM with a request in flight; valgrind's exit
status (99 on an error or a definite leak) must be 0, like the server's.

    NZP=build/nzp NZSERVE=build/nzserve /usr/bin/python3 tests/python/valgrind_server.py
"""
import json
import os
import pathlib
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import server_util as U  # noqa: E402
import test_translate_cli as T  # noqa: E402

REPO = os.path.abspath(os.path.join(HERE, "..", ".."))


def call(port, method, path, body=None, headers=None, timeout=120):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method,
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def raw_status(port, head):
    """Send raw request bytes, return (status, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def metric(port, name):
    m = re.search(rb"^" + re.escape(name.encode()) + rb" (\S+)$", call(port, "GET", "/metrics")[1], re.M)
    return float(m.group(1)) if m else 0.0


def main():
    nzp = os.environ.get("NZP_REAL") or os.environ.get("NZP", os.path.join(REPO, "build", "nzp"))
    nzserve = os.environ.get("NZSERVE", os.path.join(REPO, "build", "nzserve"))
    work = pathlib.Path(tempfile.mkdtemp(prefix="vg-server-"))

    class Factory:
        def mktemp(self, name):
            d = work / name
            d.mkdir()
            return d

    model, _, _ = T.model.__wrapped__(nzp, Factory())
    try:
        dialogue, _, _ = U.build_dialogue_model(nzp, Factory().mktemp("dialogue"), name="transformer-gated-untied-k3",
                                                seed=1)
    except ImportError as e:  # no PyTorch: the translation session alone
        print(f"valgrind_server: no dialogue model ({e}); /v1/dialogue is checked for its 404 only")
        dialogue = None
    log = work / "server.log"
    models = ["--model", f"tiny:translate:{model}"] + (["--model", f"chat:dialogue:{dialogue}"] if dialogue else [])
    cmd = ["valgrind", "-q", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite",
           nzserve, "--port", "0", *models, "--api-keys", "valgrind-key-1",
           "--max-concurrent-requests", "1", "--queue-length", "2", "--tile-cache-bytes", "64KiB",
           "--request-timeout-ms", "20000", "--shutdown-grace-ms", "60000"]
    env = dict(os.environ, NZSERVE_DEBUG_STEP_DELAY_MS="20")
    with open(log, "w") as lf:
        p = subprocess.Popen(cmd, stderr=lf, env=env, cwd=work)
    try:
        port = None
        for _ in range(600):
            m = re.search(r"event=listening .*port=(\d+)", log.read_text())
            if m:
                port = int(m.group(1))
                break
            time.sleep(0.1)
        assert port, log.read_text()
        for _ in range(600):
            if call(port, "GET", "/ready")[0] == 200:
                break
            time.sleep(0.1)
        key = {"Authorization": "Bearer valgrind-key-1"}
        texts = T.words(3, 4)
        checks = [
            (call(port, "GET", "/health"), 200),
            (call(port, "GET", "/v1/models", None, key), 200),
            (call(port, "GET", "/v1/models"), 401),
            (call(port, "GET", "/v1/memory", None, key), 200),
            (call(port, "POST", "/v1/translate", {"texts": texts, "return_tokens": True}, key), 200),
            (call(port, "POST", "/v1/translate", {"text": texts[0], "decoder": "at", "beam_size": 3}, key), 200),
            (call(port, "POST", "/v1/translate", {"text": texts[0], "rerank": "at", "iterations": 2}, key), 200),
            (call(port, "POST", "/v1/translate", {"text": texts[0], "adaptive": True, "iterations": 3}, key), 200),
            (call(port, "POST", "/v1/translate", {"text": texts[0]}), 401),
            (call(port, "POST", "/v1/translate", b"{bad json", key), 400),
            (call(port, "POST", "/v1/translate", b'{"text": "\xff"}', key), 400),
            (call(port, "POST", "/v1/translate", {"text": ""}, key), 422),
            (call(port, "POST", "/v1/translate", {"text": " ".join(["kadateni"] * 40)}, key), 422),
            (call(port, "POST", "/v1/translate", {"text": "x", "model": "nope"}, key), 404),
            (raw_status(port, b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer valgrind-key-1\r\n"
                              b"Content-Length: 2000000\r\n\r\n"), 413),
            (call(port, "DELETE", "/health"), 405),
            (call(port, "GET", "/nowhere"), 404),
            (call(port, "GET", "/metrics"), 200),
        ]
        if dialogue:
            ctx = ["hello there", "how are you doing today ?"]
            streamed = call(port, "POST", "/v1/dialogue", {"context": ctx, "max_new_tokens": 6, "stream": True}, key)
            pooled = call(port, "POST", "/v1/dialogue", {"context": ctx, "strategy": "beam", "beam_size": 3,
                                                         "rank": "consensus", "distinct": True,
                                                         "max_new_tokens": 6, "stream": True}, key)
            checks += [
                (call(port, "POST", "/v1/dialogue", {"context": ctx, "max_new_tokens": 8, "return_tokens": True},
                      key), 200),
                (call(port, "POST", "/v1/dialogue", {"context": "hi", "strategy": "beam", "beam_size": 3,
                                                     "decoders": [2, 0], "max_new_tokens": 6}, key), 200),
                (call(port, "POST", "/v1/dialogue", {"context": ["do you like music"], "strategy": "sample",
                                                     "seed": 3, "top_p": 0.9, "distinct": True,
                                                     "max_new_tokens": 6}, key), 200),
                (streamed, 200),
                (pooled, 200),  # every beam return pooled, the chosen ones streamed at the end
                (call(port, "POST", "/v1/dialogue", {"context": "hi", "decoders": [7]}, key), 422),
                (call(port, "POST", "/v1/dialogue", {"context": "hi", "temperature": 2}, key), 422),
                (call(port, "POST", "/v1/dialogue", b'{"context": 3}', key), 400),
                (call(port, "POST", "/v1/dialogue", {"context": "hi", "model": "tiny"}, key), 422),
                (call(port, "POST", "/v1/dialogue", {"context": "hi", "stream": True}), 401),
            ]
        else:
            checks.append((call(port, "POST", "/v1/dialogue", {"context": "hi"}, key), 404))
        for i, ((got, body), want) in enumerate(checks):
            assert got == want, (i, got, want, body[:300])
        if dialogue:
            events = U.parse_sse(streamed[1])
            assert events[-1][0] == "done" and all(e == "token" for e, _ in events[:-1]), events[-1]
        # a client that leaves while its request runs
        s = socket.create_connection(("127.0.0.1", port))
        b = json.dumps({"texts": texts * 8, "iterations": 50}).encode()
        s.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer valgrind-key-1\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(b), b))
        time.sleep(0.5)
        s.close()
        for _ in range(600):  # the worker notices and stops
            if metric(port, 'nzserve_rejected_total{reason="cancelled"}') >= 1 and \
                    metric(port, "nzserve_requests_in_flight") == 0:
                break
            time.sleep(0.05)
        assert metric(port, 'nzserve_rejected_total{reason="cancelled"}') >= 1
        if dialogue:  # clients that leave while their streams run (after the first token, at once, with a reset)
            before = metric(port, 'nzserve_rejected_total{reason="cancelled"}')
            for i in range(3):
                b = json.dumps({"context": "hello there", "max_new_tokens": 60, "stream": True,
                                "strategy": ("greedy", "sample")[i % 2]}).encode()
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"POST /v1/dialogue HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer valgrind-key-1\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(b), b))
                got = b""
                while i < 2 and b"event: token" not in got:
                    chunk = s.recv(65536)
                    assert chunk, got
                    got += chunk
                if i == 1:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()
                for _ in range(600):  # one at a time: the queue holds 2
                    if metric(port, 'nzserve_rejected_total{reason="cancelled"}') >= before + i + 1 and \
                            metric(port, "nzserve_requests_in_flight") == 0:
                        break
                    time.sleep(0.05)
                assert metric(port, 'nzserve_rejected_total{reason="cancelled"}') >= before + i + 1
        # SIGTERM with a request in flight: it completes, then the process exits 0
        res = {}
        t = threading.Thread(target=lambda: res.update(
            r=call(port, "POST", "/v1/translate", {"texts": texts, "iterations": 10}, key)))
        t.start()
        for _ in range(600):  # until it runs
            if metric(port, "nzserve_requests_in_flight") == 1:
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        t.join(300)
        assert res.get("r", (0,))[0] == 200, res
        rc = p.wait(300)
    finally:
        if p.poll() is None:
            p.kill()
    text = log.read_text()
    if rc != 0:
        print(text[-6000:])
        print(f"valgrind_server: nzserve under valgrind exited {rc}")
        sys.exit(1)
    print(f"valgrind_server: OK ({len(checks)} requests + cancel + drain, valgrind clean)")


if __name__ == "__main__":
    main()
