"""Helpers for the nzserve tests (tests/python/test_server.py).

Server: a context manager that writes its own config file (so the shipped
config/nzserve.json never matters), starts $NZSERVE (default build/nzserve)
on 127.0.0.1 with a free port, captures stderr to a file, waits for the
`event=listening` line and always kills the process on exit. A watchdog
kills any server that lives longer than `lifetime` seconds (300 by default),
and every wait and every HTTP call has a timeout, so no test can hang.

Also: a small HTTP client on http.client (exact status, headers and body,
no retries), raw-socket helpers (incl. a chunked reader for event streams and
a server-sent events parser), a Prometheus text parser, and the builders of
the tiny real translation and dialogue models.
"""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
HOST = "127.0.0.1"


def nzserve_path():
    """The nzserve binary under test: env NZSERVE, default build/nzserve."""
    return os.environ.get("NZSERVE", os.path.join(REPO, "build", "nzserve"))


def clean_env(extra=None):
    """os.environ without any NZSERVE_* variable (so the caller's shell cannot
    change a test), plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NZSERVE")}
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def run_nzserve(args, env=None, cwd=None, timeout=20):
    """Run nzserve to completion (for startup failures). @return CompletedProcess."""
    return subprocess.run([nzserve_path(), *map(str, args)], env=clean_env(env), cwd=cwd or tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------- HTTP


class Response:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers  # http.client.HTTPMessage (case-insensitive get)
        self.body = body

    def json(self):
        return json.loads(self.body)

    def header(self, name):
        if isinstance(self.headers, dict):  # from raw_read_response: lower-case names
            return self.headers.get(name.lower())
        return self.headers.get(name)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:300]!r}>"


def http_request(port, method, path, body=None, headers=None, timeout=15, conn=None):
    """One request on a new connection (or on conn, left open). body: bytes,
    str, or any other value sent as JSON."""
    if body is not None and not isinstance(body, (bytes, str)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    own = conn is None
    c = conn or http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=dict(headers or {}))
        r = c.getresponse()
        data = r.read()
        return Response(r.status, r.headers, data)
    finally:
        if own:
            c.close()


def raw_connect(port, timeout=10):
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.settimeout(timeout)
    return s


def raw_read_response(sock, timeout=10):
    """Read one HTTP/1.1 response (Content-Length framed) from a raw socket.
    @return a Response (headers: a dict with lower-case names)."""
    sock.settimeout(timeout)
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete response head: {buf!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = int(headers.get("content-length", "0"))
    while len(rest) < n:
        if time.monotonic() > deadline:
            raise TimeoutError("incomplete body")
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Response(status, headers, rest[:n])


def post_request_bytes(path, body, headers=None):
    """The bytes of a POST with an exact Content-Length."""
    h = {"Host": HOST, "Content-Type": "application/json", "Content-Length": str(len(body))}
    h.update(headers or {})
    return (f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items()) + "\r\n").encode() + body


def read_head(sock, deadline):
    """Read a response head from a raw socket. @return (status, headers dict with
    lower-case names, bytes already read past the head)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete response head: {buf!r}")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, rest


class ChunkedReader:
    """Incremental decoder of a chunked (Transfer-Encoding: chunked) body read from a raw socket."""

    def __init__(self, sock, rest=b""):
        self.sock, self.raw, self.body, self.done = sock, rest, b"", False

    def _parse(self):
        while not self.done:
            line_end = self.raw.find(b"\r\n")
            if line_end < 0:
                return
            size = int(self.raw[:line_end].split(b";")[0], 16)
            if size == 0:
                self.done = True
                return
            if len(self.raw) < line_end + 2 + size + 2:
                return
            self.body += self.raw[line_end + 2:line_end + 2 + size]
            self.raw = self.raw[line_end + 2 + size + 2:]

    def read_until(self, pred, timeout=10):
        """Read until pred(body so far) or the last chunk. @return the body so far."""
        deadline = time.monotonic() + timeout
        self._parse()
        while not self.done and not pred(self.body):
            if time.monotonic() > deadline:
                raise TimeoutError(f"stream incomplete: {self.body[-500:]!r}")
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed inside the stream: {self.body[-500:]!r}")
            self.raw += chunk
            self._parse()
        return self.body


def stream_request(port, path, body, headers=None, timeout=15):
    """POST body (JSON) and read the whole response from a raw socket, chunked
    or Content-Length framed. @return a Response (headers: lower-case dict)."""
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    with raw_connect(port, timeout) as s:
        s.sendall(post_request_bytes(path, data, headers))
        deadline = time.monotonic() + timeout
        status, hdrs, rest = read_head(s, deadline)
        if hdrs.get("transfer-encoding", "").lower() == "chunked":
            body = ChunkedReader(s, rest).read_until(lambda b: False, timeout)
        else:
            n = int(hdrs.get("content-length", "0"))
            while len(rest) < n and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                rest += chunk
            body = rest[:n]
        return Response(status, hdrs, body)


def parse_sse(body):
    """Server-sent events text -> [(event, data parsed as JSON)]; every event must
    have a single data line and end with an empty line."""
    text = body.decode() if isinstance(body, bytes) else body
    assert text.endswith("\n\n") or not text, f"stream does not end with an empty line: {text[-200:]!r}"
    out = []
    for block in text.split("\n\n")[:-1]:
        ev, data = None, None
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            k, _, v = line.partition(": ")
            if k == "event":
                ev = v
            elif k == "data":
                assert data is None, f"two data lines: {block!r}"
                data = json.loads(v)
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        out.append((ev, data))
    return out


# ---------------------------------------------------------------- metrics

_METRIC = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Prometheus text format -> {(name, frozenset of (label, value)): float}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _METRIC.match(line)
        assert m, f"unparsable metrics line: {line!r}"
        labels = frozenset(_LABEL.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric(samples, name, **labels):
    """The value of the sample name{labels} (labels must match exactly), or None."""
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))


# ---------------------------------------------------------------- the server


class ServerError(RuntimeError):
    pass


class Server:
    """A running nzserve.

        with Server(model_path, config={"max_texts": 4}, flags=["--log-level", "debug"],
                    env={"NZSERVE_DEBUG_STEP_DELAY_MS": 50}) as s:
            s.wait_ready()
            r = s.post("/v1/translate", {"text": "..."})

    config: settings written into the temp config file (on top of host
    127.0.0.1, port 0, the model as "m" with task `task` and a few small
    defaults). models: the config's "models" list instead of the single model.
    """

    def __init__(self, model=None, config=None, flags=(), env=None, models=None, lifetime=300, start_timeout=15,
                 wait_listening=True, task="translate"):
        self.dir = tempfile.mkdtemp(prefix="nzserve-test-")
        cfg = {"host": HOST, "port": 0, "worker_threads": 1, "http_threads": 4, "connection_timeout_s": 10,
               "shutdown_grace_ms": 5000}
        if models is not None:
            cfg["models"] = models
        elif model is not None:
            cfg["models"] = [{"name": "m", "task": task, "path": str(model)}]
        cfg.update(config or {})
        self.config_path = os.path.join(self.dir, "nzserve.json")
        with open(self.config_path, "w") as f:
            json.dump(cfg, f)
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        self.port = None
        self.rc = None
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([nzserve_path(), "--config", self.config_path, *map(str, flags)],
                                     env=clean_env(env), cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self._stderr)
        self._watchdog = threading.Timer(lifetime, self._kill)
        self._watchdog.daemon = True
        self._watchdog.start()
        if wait_listening:
            try:
                self._wait_listening(start_timeout)
            except BaseException:
                self.close()
                raise

    # -- lifecycle

    def _kill(self):
        if self.proc.poll() is None:
            self.proc.kill()

    def _wait_listening(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                port = listening_port(line)
                if port:
                    self.port = port
                    return
            if self.proc.poll() is not None:
                raise ServerError(f"nzserve exited with {self.proc.returncode} before listening:\n{self.log()}")
            time.sleep(0.01)
        raise ServerError(f"nzserve did not log event=listening within {timeout} s:\n{self.log()}")

    def wait_ready(self, timeout=15):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"nzserve exited with {self.proc.returncode}:\n{self.log()}")
            last = self.get("/ready", timeout=5)
            if last.status == 200:
                return last
            time.sleep(0.02)
        raise ServerError(f"not ready within {timeout} s (last: {last}):\n{self.log()}")

    def wait_loaded(self, timeout=15):
        """Poll /ready until loading ended, served or not (a model that failed to load leaves it 503
        "degraded"). @return the last /ready response."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"nzserve exited with {self.proc.returncode}:\n{self.log()}")
            last = self.get("/ready", timeout=5)
            if last.status == 200 or last.json().get("status") != "loading":
                return last
            if time.monotonic() > deadline:
                raise ServerError(f"still loading after {timeout} s:\n{self.log()}")
            time.sleep(0.02)

    def signal(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)

    def wait(self, timeout=20):
        """Wait for the process to exit. @return its exit status."""
        try:
            self.rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            self.proc.wait(timeout=10)
            raise ServerError(f"nzserve did not exit within {timeout} s:\n{self.log()}")
        return self.rc

    def stop(self, timeout=20):
        """SIGTERM, wait. @return the exit status."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        rc = self.wait(timeout)
        if rc:  # shown by pytest with the failing assertion
            print(f"nzserve exited with {rc}; its log ends:\n{self.log()[-4000:]}")
        return rc

    def alive(self):
        return self.proc.poll() is None

    def close(self):
        self._watchdog.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        finally:
            self._stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    # -- I/O

    def log(self):
        with open(self.stderr_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def url(self, path="/"):
        return f"http://{HOST}:{self.port}{path}"

    def request(self, method, path, body=None, headers=None, timeout=15, conn=None):
        return http_request(self.port, method, path, body, headers, timeout, conn)

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def post(self, path, body, **kw):
        return self.request("POST", path, body, **kw)

    def translate(self, body, headers=None, timeout=15):
        return self.post("/v1/translate", body, headers=headers, timeout=timeout)

    def dialogue(self, body, headers=None, timeout=15):
        return self.post("/v1/dialogue", body, headers=headers, timeout=timeout)

    def stream(self, body, headers=None, timeout=15, path="/v1/dialogue"):
        """POST a streamed request; the whole response (chunked body decoded)."""
        return stream_request(self.port, path, body, headers, timeout)

    def metrics(self):
        r = self.get("/metrics")
        assert r.status == 200, r
        return parse_metrics(r.body.decode())

    def metric(self, name, **labels):
        return metric(self.metrics(), name, **labels)

    def wait_metric(self, name, pred, timeout=10, **labels):
        """Poll /metrics until pred(value of name{labels}) (None when absent). @return the value."""
        deadline = time.monotonic() + timeout
        v = None
        while time.monotonic() < deadline:
            v = self.metric(name, **labels)
            if pred(v):
                return v
            time.sleep(0.02)
        raise AssertionError(f"{name}{labels} = {v} did not satisfy the condition within {timeout} s")

    def wait_access(self, pred, timeout=10):
        """Poll the access log until pred(lines) holds: a request's line is written when its connection
        ends, which may trail the response the client read. @return the lines."""
        deadline = time.monotonic() + timeout
        while True:
            lines = access_log(self.log())
            if pred(lines):
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"access log did not satisfy the condition within {timeout} s:\n{lines}")
            time.sleep(0.02)

    def access_lines(self, keep, n=1, timeout=10):
        """The access-log lines keep(line) accepts, once there are at least n of them (wait_access)."""
        return [l for l in self.wait_access(lambda ls: sum(map(keep, ls)) >= n, timeout) if keep(l)]

    def wait_log(self, pattern, timeout=10):
        """Poll the log until the regex pattern matches. @return the match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            time.sleep(0.02)
        raise AssertionError(f"{pattern!r} not logged within {timeout} s:\n{self.log()}")


def log_events(log, event):
    """logfmt lines of one event."""
    return [l for l in log.splitlines() if re.search(rf"\bevent={event}\b", l)]


def logfmt(line):
    """The key=value fields of a logfmt line (quoted values unescaped)."""
    out = {}
    for k, v in re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)', line):
        out[k] = json.loads(v) if v.startswith('"') else v
    return out


def access_log(log):
    """The fields of every access-log (event=request) line."""
    return [logfmt(l) for l in log_events(log, "request")]


def listening_port(line):
    """The port of an event=listening log line (logfmt or json), else None."""
    if line.startswith("{"):
        try:
            j = json.loads(line)
        except ValueError:
            return None
        return int(j["port"]) if j.get("event") == "listening" else None
    m = re.search(r"\bevent=listening\b.*\bport=(\d+)", line)
    return int(m.group(1)) if m else None


def build_translation_model(nzp, tmp_path_factory):
    """The tiny real translation model of test_translate_cli (SentencePiece
    trained here, random-weight cmlm_transformer with an AT decoder, packed
    lossless). @return (path, reference model, nat_ref.Vocab)."""
    import test_translate_cli as T

    return T.model.__wrapped__(nzp, tmp_path_factory)


def build_dialogue_model(nzp, workdir, name="adapter-relu-tied-k3", seed=5, extra_config=None):
    """A tiny real dialogue model, as test_t5md_parity.test_text_contexts builds
    it: SentencePiece trained here (T5 ids, <sep> control piece), a random-weight
    t5md_ref.T5MultiDecoder of test_t5md_parity.CONFIGS[name] whose responses
    vary, written with t5md_ref.save_model_dir (turn separator "<sep>", no
    truncation unless extra_config says otherwise) and packed lossless.
    workdir: an empty pathlib.Path. @return (path of the .nzp, reference model on
    exactly its weights, t5md_ref.Tokenizer)."""
    import test_t5md_parity as P

    R = P.R
    spm_path = P.train_spm(workdir / "spm.model")
    model = P.build_model(name, seed=seed)
    mdir = workdir / "model"
    extra = dict(turn_separator=R.SEP_PIECE, max_context_turns=0, max_source_length=0)
    extra.update(extra_config or {})
    R.save_model_dir(model, str(mdir), spm_path=str(spm_path), extra_config=extra)
    path = workdir / "dialogue.nzp"
    P.run([nzp, "pack", "--mode", "lossless", *P.PACK_ARGS, mdir, path])
    ref, _ = R.load_model_dir(str(mdir))
    return path, ref, R.load_tokenizer(str(mdir))
