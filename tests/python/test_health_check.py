"""`nzserve --health-check` (server/srv_probe.c): the probe a container
HEALTHCHECK runs. It reads host and port from the same config file,
NZSERVE_* variables and flags as the server, GETs /health over a plain
socket with a 2 s deadline and exits 0 on a 200, 1 on anything else (also
for a bad configuration), with a message naming the URL and the reason.

Against the real binary ($NZSERVE, default build/nzserve) serving the demo
model (models/demo/nat-ende.nzp) on a free loopback port, and against
listeners that are not nzserve: a closed port, one that never answers, one
that speaks another protocol, an HTTP server answering 503.
"""

import http.server
import os
import socket
import threading
import time

import pytest

import server_util as U
from server_util import Server

DEMO = os.path.join(U.REPO, "models", "demo", "nat-ende.nzp")


def probe(*args, env=None, timeout=20):
    """Run `nzserve --health-check ARGS` (clean environment plus env, a temp cwd).
    @return (CompletedProcess, seconds it took)."""
    t0 = time.monotonic()
    r = U.run_nzserve(["--health-check", *args], env=env, timeout=timeout)
    return r, time.monotonic() - t0


def assert_healthy(r, port):
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert f"127.0.0.1:{port}/health: 200" in r.stdout, r.stdout


def assert_unhealthy(r, port, reason):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == "", r.stdout
    assert f"health check: http://127.0.0.1:{port}/health: " in r.stderr, r.stderr
    assert reason in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def free_port():
    """A loopback port nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind((U.HOST, 0))
        return s.getsockname()[1]


class Listener:
    """A loopback TCP listener on a free port; handler(conn) runs for each
    accepted connection in a thread (None: never accept)."""

    def __init__(self, handler=None):
        self.sock = socket.socket()
        self.sock.bind((U.HOST, 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.handler = handler
        if handler:
            threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    self.handler(conn)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.sock.close()
        return False


def http_server(status):
    """An http.server on a free loopback port answering every GET with status;
    .requests collects the request lines. @return the started server."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            srv.requests.append(self.requestline)
            body = b'{"status": "x"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer((U.HOST, 0), Handler)
    srv.requests = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture(scope="module")
def server():
    if not os.path.exists(DEMO):
        pytest.fail(f"the demo model is missing: {DEMO}")
    with Server(DEMO, lifetime=120) as s:
        yield s


def test_healthy_server_port_from_flag_env_and_config(server):
    r, took = probe("--port", server.port)
    assert_healthy(r, server.port)
    assert took < 2, took
    # the same settings as the server: environment, and a config file (the server's own, port overridden)
    assert_healthy(probe(env={"NZSERVE_PORT": server.port})[0], server.port)
    assert_healthy(probe(env={"NZSERVE_CONFIG": server.config_path, "NZSERVE_PORT": server.port})[0], server.port)
    assert_healthy(probe("--config", server.config_path, "--port", server.port)[0], server.port)
    # flags beat the environment, as for the server
    assert_healthy(probe("--port", server.port, env={"NZSERVE_PORT": free_port()})[0], server.port)
    # a models list of its own does not matter (the probe loads nothing)
    assert_healthy(probe("--port", server.port, "--models", "x:translate:/nonexistent.nzp")[0], server.port)


def test_health_check_flag_anywhere(server):
    r = U.run_nzserve(["--port", server.port, "--health-check", "--log-level", "debug"])
    assert_healthy(r, server.port)


def test_alive_while_models_load():
    """Liveness, not readiness: a server still loading its models is healthy."""
    with Server(DEMO, env={"NZSERVE_DEBUG_LOAD_DELAY_MS": 4000}) as s:
        assert s.get("/ready").status == 503
        assert_healthy(probe("--port", s.port)[0], s.port)


def test_wildcard_host_probes_loopback():
    with Server(DEMO, config={"host": "0.0.0.0"}) as s:
        assert_healthy(probe("--host", "0.0.0.0", "--port", s.port)[0], s.port)
        assert_healthy(probe(env={"NZSERVE_HOST": "0.0.0.0", "NZSERVE_PORT": s.port})[0], s.port)


def test_closed_port():
    port = free_port()
    r, took = probe("--port", port)
    assert_unhealthy(r, port, "Connection refused")
    assert took < 2, took


def test_listener_that_never_answers():
    with Listener() as l:
        r, took = probe("--port", l.port)
    assert_unhealthy(r, l.port, "no response within 2000 ms")
    assert 1.9 < took < 6, took


def test_listener_that_is_not_http():
    def ssh(conn):
        conn.sendall(b"SSH-2.0-OpenSSH_9.2p1\r\n")
        time.sleep(0.2)

    with Listener(ssh) as l:
        r, took = probe("--port", l.port)
    assert_unhealthy(r, l.port, "not an HTTP response: 'SSH-2.0-OpenSSH_9.2p1'")
    assert took < 2, took


def test_listener_that_closes_at_once():
    with Listener(lambda conn: None) as l:
        r, _ = probe("--port", l.port)
    assert r.returncode == 1, r
    assert "health check: " in r.stderr and "/health: " in r.stderr, r.stderr


@pytest.mark.parametrize("status,rc", [(503, 1), (500, 1), (404, 1), (204, 1), (200, 0)])
def test_http_status(status, rc):
    srv = http_server(status)
    try:
        port = srv.server_address[1]
        r, took = probe("--port", port)
        assert took < 2, took
        if rc == 0:
            assert_healthy(r, port)
        else:
            assert_unhealthy(r, port, f"status {status}, not 200")
        assert srv.requests == ["GET /health HTTP/1.0"], srv.requests
    finally:
        srv.shutdown()
        srv.server_close()


def test_unusable_settings_exit_1():
    r, _ = probe("--port", "0")
    assert r.returncode == 1, r
    assert "port 0" in r.stderr, r.stderr
    r, _ = probe("--port", "http")
    assert r.returncode == 1, r  # not 2: a HEALTHCHECK knows only 0 and 1
    assert "--port: not an integer" in r.stderr, r.stderr
    r, _ = probe(env={"NZSERVE_CONFIG": "/nonexistent/nzserve.json"})
    assert r.returncode == 1, r
    assert "/nonexistent/nzserve.json" in r.stderr, r.stderr


def test_help_lists_the_health_check():
    r = U.run_nzserve(["--help"])
    assert r.returncode == 0, r
    assert "--health-check" in r.stdout, r.stdout
