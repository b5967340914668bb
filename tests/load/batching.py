#!/usr/bin/python3
"""make loadtest, second part — batching against no batching, measured in one run:

    /usr/bin/python3 tests/load/batching.py [--seconds 60] [--clients 32] [--scenario dialogue at at-beam]
        [--no-check]

For each scenario, a server with batching (the default) and then one with
`--batching false` (every request a job of its own), both with 2 workers on 2
compute threads and a 64 MiB tile cache, get CLIENTS concurrent connections of
wrk (tests/load/rotate.lua) for SECONDS after a warm-up; the batching server
first answers LONE sequential requests alone (median latency):
  dialogue  /v1/dialogue one context (rotating), greedy, every decoder of the
            model (continuous batching: requests join the running batch at the
            next decoder step)
  at        /v1/translate one sentence (rotating), "decoder": "at",
            "beam_size": 1 (AT greedy, continuous batching too)
  at-beam   /v1/translate one sentence (rotating) with the model's defaults
            (the demo model's: AT beam search, beam 4; continuous batching)
Prints requests/s, p50 / p99 latency and peak RSS of both, and the ratios;
every response must be 2xx. Exits 1 unless requests/s with batching >= 3 x
without and p50 with batching <= 1.5 x a lone request's (issue 16's targets;
--no-check: report only).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from capacity import CONTEXTS, ROOT, SENTENCES, Server, http, log, run_wrk  # noqa: E402

SCENARIOS = {
    "dialogue": ("/v1/dialogue", "dialogue", [{"context": c, "strategy": "greedy"} for c in CONTEXTS]),
    "at": ("/v1/translate", "translate", [{"text": t, "decoder": "at", "beam_size": 1} for t in SENTENCES]),
    "at-beam": ("/v1/translate", "translate", [{"text": t} for t in SENTENCES]),
}


def run(args, name):
    path, task, bodies = SCENARIOS[name]
    model = args.dialogue_model if task == "dialogue" else args.translate_model
    out = {}
    for batching in (True, False):
        s = Server(args, ["m:%s:%s" % (task, model)], 2, 64 << 20, workers=2,
                   extra=() if batching else ("--batching", "false"))
        try:
            for i in range(2 * len(bodies)):  # warm-up: tile cache and allocator
                http(s.url + path, bodies[i % len(bodies)])
            if batching:
                lone = []
                for i in range(args.lone):
                    t0 = time.monotonic()
                    http(s.url + path, bodies[i % len(bodies)])
                    lone.append(time.monotonic() - t0)
                out["lone_ms"] = statistics.median(lone) * 1e3
            r = run_wrk(s.url, path, bodies, args.clients, args.seconds)
            key = "on" if batching else "off"
            out[key] = {"rps": r["2xx"] / r["duration_s"], "p50_ms": r["latency_ms"]["p50"],
                        "p99_ms": r["latency_ms"]["p99"], "rss_peak": s.status()["VmHWM"], "requests": r["2xx"]}
            log("%s, batching %s: %.2f req/s, p50 %.0f ms, p99 %.0f ms, peak RSS %.1f MiB" % (
                name, key, out[key]["rps"], out[key]["p50_ms"], out[key]["p99_ms"], out[key]["rss_peak"] / 2**20))
        finally:
            s.stop()
    out["rps_ratio"] = out["on"]["rps"] / out["off"]["rps"]
    out["p50_vs_lone"] = out["on"]["p50_ms"] / out["lone_ms"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=int(os.environ.get("LOAD_SECONDS", 60)))
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--lone", type=int, default=15, help="sequential requests for the lone latency")
    p.add_argument("--scenario", nargs="+", default=["dialogue", "at", "at-beam"], choices=sorted(SCENARIOS))
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--nzserve", default=os.environ.get("NZSERVE", os.path.join(ROOT, "build", "nzserve")))
    p.add_argument("--translate-model", default=os.path.join(ROOT, "models", "demo", "nat-ende.nzp"))
    p.add_argument("--dialogue-model", default=os.path.join(ROOT, "models", "demo", "dialogue.nzp"))
    a = p.parse_args()
    ok = True
    rows = []
    for name in a.scenario:
        r = run(a, name)
        rows.append("| %s | %d | %.2f | %.2f | %.2fx | %.0f | %.0f | %.0f | %.2fx | %.1f | %.1f |" % (
            name, a.clients, r["on"]["rps"], r["off"]["rps"], r["rps_ratio"], r["lone_ms"], r["on"]["p50_ms"],
            r["off"]["p50_ms"], r["p50_vs_lone"], r["on"]["rss_peak"] / 2**20, r["off"]["rss_peak"] / 2**20))
        good = r["rps_ratio"] >= 3 and r["p50_vs_lone"] <= 1.5
        ok &= good
        log("%s: req/s %.2fx without batching (target >= 3x), p50 %.2fx a lone request's (target <= 1.5x): %s" % (
            name, r["rps_ratio"], r["p50_vs_lone"], "OK" if good else "BELOW TARGET"))
    print("\n| scenario | clients | req/s batching | req/s without | ratio | lone p50 ms | p50 ms batching | "
          "p50 ms without | p50 / lone | peak RSS MiB batching | peak RSS MiB without |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if not ok and not a.no_check:
        sys.exit(1)


if __name__ == "__main__":
    main()
