#!/usr/bin/python3
"""make capacity — the numbers of the capacity guide (config/k8s/README.md):
memory of one nzserve replica per model, weight mode and tile-cache budget, and
throughput per core of each endpoint, all measured in one run on loopback.

    /usr/bin/python3 tests/load/capacity.py [--seconds 15] [--out DIR]
        [--translate-model models/demo/nat-ende.nzp] [--dialogue-model models/demo/dialogue.nzp]

Memory: for each model (translation, dialogue) in two weight modes (the
shipped lossless bf16 file, and lossy-3 repacked from its weights with
`nzp unpack --model-dir` + `nzp pack --mode lossy-3`) and three tile-cache
budgets (0, 64 MiB, and "full" = the model's decoded fp32 size + 16 MiB),
one server with that model alone, 1 compute thread and 1 worker: RSS when
ready (idle), then after 40 sequential warm-up requests with different
inputs, the peak RSS (VmHWM), and from /v1/memory the tile cache and counted
heap. RSS includes the mapped model pages that were touched (the whole file
once every weight has been used).

Throughput: for 1 and 2 cores (server pinned with taskset to that many cores,
--worker-threads and --max-concurrent-requests = cores, tile cache 64 MiB),
wrk (tests/load/rotate.lua, 1 thread, 2 x cores + 2 connections) sends one
request shape for --seconds after a warm-up:
  translate-1   /v1/translate one sentence, default options (iter 10, beam 5)
  translate-8   /v1/translate 8 sentences in one request
  translate-at  /v1/translate one sentence, "decoder": "at" (AT greedy)
  dialogue      /v1/dialogue one context, greedy, all K decoders
  dialogue-beam /v1/dialogue one context, beam 4, all K decoders
Reports requests/s, requests/s per core, and latency p50/p99. Every response
must be 2xx. Writes OUT/capacity.md and OUT/capacity.json.
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SENTENCES = ["Open the file in a new window.", "The printer is out of paper.", "Could not connect to the server.",
             "Save changes to the document before closing?", "Select the text you want to copy.",
             "The package could not be installed because of missing dependencies.", "Show hidden files",
             "Delete the selected items permanently?"]
CONTEXTS = [["Where are you going?"], ["I have not seen you for a long time.", "Yes, I was away at sea."],
            ["What is the matter with the printer?"], ["Do you think it will rain tomorrow?"],
            ["Tell me about the whale.", "It was white, and very large."], ["Can you help me with this?"]]


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def http(url, body=None, timeout=120):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def proc_status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for ln in f:
            k, _, v = ln.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
    return out


class Server:
    def __init__(self, args, models, cores, cache, workers=None, extra=()):
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.log = tempfile.TemporaryFile()
        cmd = [args.nzserve, "--host", "127.0.0.1", "--port", str(self.port), "--worker-threads", str(cores),
               "--max-concurrent-requests", str(workers or cores), "--tile-cache-bytes", str(cache),
               "--queue-length", "256", "--request-timeout-ms", "120000", "--log-level", "warn", *extra]
        for m in models:
            cmd += ["--model", m]
        if shutil.which("taskset"):
            cmd = ["taskset", "-c", "0" if cores == 1 else "0-%d" % (cores - 1)] + cmd
        self.p = subprocess.Popen(cmd, stderr=self.log)
        t0 = time.time()
        while time.time() - t0 < 120:
            try:
                urllib.request.urlopen(self.url + "/ready", timeout=2).read()
                return
            except Exception:
                if self.p.poll() is not None:
                    break
                time.sleep(0.1)
        self.stop()
        self.log.seek(0)
        raise SystemExit("capacity: server did not become ready:\n" + self.log.read().decode(errors="replace"))

    def status(self):
        return proc_status(self.p.pid)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                rc = self.p.wait(60)
            except subprocess.TimeoutExpired:
                self.p.kill()
                rc = self.p.wait()
            if rc != 0:
                raise SystemExit("capacity: nzserve exited %d on SIGTERM" % rc)


def request_of(shape, i):
    if shape == "translate-1":
        return "/v1/translate", {"text": SENTENCES[i % len(SENTENCES)]}
    if shape == "translate-8":
        return "/v1/translate", {"texts": SENTENCES}
    if shape == "translate-at":
        return "/v1/translate", {"text": SENTENCES[i % len(SENTENCES)], "decoder": "at"}
    if shape == "dialogue":
        return "/v1/dialogue", {"context": CONTEXTS[i % len(CONTEXTS)]}
    if shape == "dialogue-beam":
        return "/v1/dialogue", {"context": CONTEXTS[i % len(CONTEXTS)], "strategy": "beam", "beam_size": 4}
    raise ValueError(shape)


def run_wrk(url, path, bodies, conns, seconds, threads=2):
    """wrk with tests/load/rotate.lua: POST path with bodies in rotation over conns connections for seconds.
    @return its CAPACITY result; exits on a failed run or any non-2xx response."""
    env = dict(os.environ, CAP_PATH=path, CAP_BODIES="\x1e".join(json.dumps(b) for b in bodies))
    p = subprocess.run(["wrk", "-t%d" % threads, "-c%d" % conns, "-d%ds" % seconds, "--timeout", "120s",
                        "-s", os.path.join(ROOT, "tests", "load", "rotate.lua"), url],
                       capture_output=True, text=True, env=env)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("CAPACITY ")]
    if p.returncode != 0 or not line:
        raise SystemExit("wrk failed:\n" + p.stdout + p.stderr)
    r = json.loads(line[0][len("CAPACITY "):])
    if r["non_2xx"] or r["socket_errors"] or not r["2xx"]:
        raise SystemExit("%s: bad responses %s" % (path, r))
    return r


def derived_modes(args, work, path, name):
    """{mode: path}: the shipped (lossless) file and a lossy-3 repack of its weights."""
    out = {"lossless": path}
    d = os.path.join(work, name + "-dir")
    lossy = os.path.join(work, name + "-lossy-3.nzp")
    subprocess.run([args.nzp, "unpack", "--model-dir", path, d], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([args.nzp, "pack", "--mode", "lossy-3", d, lossy], check=True, stdout=subprocess.DEVNULL)
    out["lossy-3"] = lossy
    return out


def memory(args, work, models):
    rows = []
    for task, path in models.items():
        name = "translate" if task == "translate" else "dialogue"
        for mode, p in derived_modes(args, work, path, name).items():
            for cache_label in ("0", "64MiB", "full"):
                probe = Server(args, ["m:%s:%s" % (task, p)], 1, 0)
                info = http(probe.url + "/v1/memory")["models"][0]
                probe.stop()
                decoded = info["decoded_equivalent_bytes"]
                cache = {"0": 0, "64MiB": 64 << 20, "full": decoded + (16 << 20)}[cache_label]
                s = Server(args, ["m:%s:%s" % (task, p)], 1, cache, workers=1)
                idle = s.status()["VmRSS"]
                for i in range(40):
                    path_, body = request_of("translate-1" if task == "translate" else "dialogue", i)
                    if task == "translate" and i % 2:
                        body["decoder"] = "at"
                    http(s.url + path_, body)
                st = s.status()
                mem = http(s.url + "/v1/memory")
                s.stop()
                row = {"task": task, "mode": mode, "cache": cache_label, "cache_budget": cache,
                       "file_bytes": os.path.getsize(p), "decoded_bytes": decoded,
                       "compressed_bytes": info["compressed_bytes"], "rss_idle": idle, "rss_warm": st["VmRSS"],
                       "rss_peak": st["VmHWM"], "tile_cache": mem["tile_cache"]["bytes"],
                       "counted_heap": mem["counted_heap_bytes"], "mapped_resident": mem["mapped_resident_bytes"]}
                rows.append(row)
                log("memory %s %s cache %s: idle %.1f MiB, warm %.1f MiB, peak %.1f MiB, tile cache %.1f MiB" % (
                    task, mode, cache_label, idle / 2**20, st["VmRSS"] / 2**20, st["VmHWM"] / 2**20,
                    row["tile_cache"] / 2**20))
    return rows


def throughput(args, models):
    shapes = [s for s in ("translate-1", "translate-8", "translate-at") if "translate" in models]
    shapes += [s for s in ("dialogue", "dialogue-beam") if "dialogue" in models]
    rows = []
    for cores in (1, 2):
        s = Server(args, ["%s:%s:%s" % (t, t, p) for t, p in models.items()], cores, 64 << 20)
        try:
            for shape in shapes:
                path, body = request_of(shape, 0)
                for i in range(6):  # warm-up: tile cache and allocator
                    http(s.url + request_of(shape, i)[0], request_of(shape, i)[1])
                conns = 2 * cores + 2
                r = run_wrk(s.url, path, [body], conns, args.seconds, threads=1)
                rps = r["2xx"] / r["duration_s"]
                row = {"shape": shape, "cores": cores, "connections": conns, "requests": r["2xx"], "rps": rps,
                       "rps_per_core": rps / cores, "p50_ms": r["latency_ms"]["p50"],
                       "p99_ms": r["latency_ms"]["p99"], "rss_peak": s.status()["VmHWM"]}
                rows.append(row)
                log("throughput %s, %d core(s): %.2f req/s (%.2f per core), p50 %.0f ms, p99 %.0f ms" % (
                    shape, cores, rps, rps / cores, row["p50_ms"], row["p99_ms"]))
        finally:
            s.stop()
    return rows


def report(out, mem, thr, meta):
    mib = lambda b: "%.1f" % (b / 2**20)  # noqa: E731
    lines = ["Measured by `make capacity` (tests/load/capacity.py) on %s, %d CPUs, one run." % (
        meta["cpu"], meta["cpus"]), ""]
    if mem:
        lines += ["| model | weights | file MiB | decoded fp32 MiB | tile cache budget | RSS idle MiB | "
                  "RSS warm MiB | peak RSS MiB | tile cache MiB | counted heap MiB |",
                  "|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in mem:
            budget = "0" if not r["cache_budget"] else mib(r["cache_budget"]) + " MiB"
            lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                r["task"], r["mode"], mib(r["file_bytes"]), mib(r["decoded_bytes"]), budget, mib(r["rss_idle"]),
                mib(r["rss_warm"]), mib(r["rss_peak"]), mib(r["tile_cache"]), mib(r["counted_heap"])))
        lines.append("")
    if thr:
        lines += ["| request | cores | connections | req/s | req/s per core | p50 ms | p99 ms | peak RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in thr:
            lines.append("| %s | %d | %d | %.2f | %.2f | %.0f | %.0f | %s |" % (
                r["shape"], r["cores"], r["connections"], r["rps"], r["rps_per_core"], r["p50_ms"], r["p99_ms"],
                mib(r["rss_peak"])))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "capacity.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "capacity.json"), "w") as f:
        json.dump({"meta": meta, "memory": mem, "throughput": thr}, f, indent=1)
    print(text)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--out", default=os.path.join(ROOT, "build", "capacity"))
    p.add_argument("--nzserve", default=os.path.join(ROOT, "build", "nzserve"))
    p.add_argument("--nzp", default=os.path.join(ROOT, "build", "nzp"))
    p.add_argument("--translate-model", default=os.path.join(ROOT, "models", "demo", "nat-ende.nzp"))
    p.add_argument("--dialogue-model", default=os.path.join(ROOT, "models", "demo", "dialogue.nzp"))
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    a = p.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("capacity: wrk is not installed (make deps)")
    models = {t: m for t, m in (("translate", a.translate_model), ("dialogue", a.dialogue_model))
              if m and os.path.exists(m)}
    if not models:
        raise SystemExit("capacity: no model found")
    os.makedirs(a.out, exist_ok=True)
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for ln in f:
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    meta = {"cpu": cpu, "cpus": os.cpu_count(), "seconds": a.seconds, "models": models,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory() as work:
        mem = [] if a.skip_memory else memory(a, work, models)
    thr = [] if a.skip_throughput else throughput(a, models)
    report(a.out, mem, thr, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
