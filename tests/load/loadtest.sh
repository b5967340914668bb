#!/usr/bin/env bash
# make loadtest — a bounded load test of nzserve on loopback:
# mixed translate / health / metrics traffic (tests/load/mixed.lua) for
# LOAD_SECONDS (60) at LOAD_CONNECTIONS (64) connections with wrk, against
# the demo translation model (LOAD_MODEL). Fails on any non-2xx response
# other than 429 (with LOAD_ALLOW_429=1), on a socket error, or when the
# server crashes or does not exit 0 on SIGTERM. Reports throughput,
# latency percentiles and the server's RSS over the run (drift = last
# sample minus the sample after warm-up).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
NZSERVE=${NZSERVE:-$ROOT/build/nzserve}
MODEL=${LOAD_MODEL:-$ROOT/models/demo/nat-ende.nzp}
SECONDS_=${LOAD_SECONDS:-60}
CONNS=${LOAD_CONNECTIONS:-64}
WRK_THREADS=${LOAD_WRK_THREADS:-2}
command -v wrk >/dev/null || { echo "loadtest: wrk not installed (make deps)"; exit 1; }
[ -f "$MODEL" ] || { echo "loadtest: model $MODEL not found"; exit 1; }
WORK=$(mktemp -d)
PID=""
cleanup() { [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$WORK"; }
trap cleanup EXIT

# queue deep enough for every connection: the test is about stability, not shedding
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$NZSERVE" --host 127.0.0.1 --port "$PORT" --model "demo:translate:$MODEL" --queue-length $((CONNS * 2)) \
  --max-concurrent-requests "${LOAD_WORKERS:-2}" --tile-cache-bytes "${LOAD_CACHE:-64MiB}" \
  --request-timeout-ms 60000 --log-level warn 2> "$WORK/server.log" &
PID=$!
URL="http://127.0.0.1:$PORT"
for _ in $(seq 1 300); do curl -sf "$URL/ready" >/dev/null && break; sleep 0.1; done
curl -sf "$URL/ready" >/dev/null || { cat "$WORK/server.log"; echo "loadtest: not ready"; exit 1; }

rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$PID/status"; }
# warm-up: a few requests so the tile cache and allocator reach their working set
for _ in $(seq 1 20); do
  curl -sf -XPOST "$URL/v1/translate" -d "{\"text\": \"${LOAD_TEXT:-Open the file in a new window.}\"}" >/dev/null
done
RSS0=$(rss)
( while kill -0 "$PID" 2>/dev/null; do rss >> "$WORK/rss.txt" || true; sleep 2; done ) &
SAMPLER=$!
wrk -t"$WRK_THREADS" -c"$CONNS" -d"${SECONDS_}s" --timeout 30s -s "$ROOT/tests/load/mixed.lua" "$URL" \
  > "$WORK/wrk.txt" 2>&1 || { cat "$WORK/wrk.txt"; echo "loadtest: wrk failed"; exit 1; }
kill "$SAMPLER" 2>/dev/null || true
kill -0 "$PID" 2>/dev/null || { cat "$WORK/server.log"; echo "loadtest: the server died"; exit 1; }
RSS1=$(rss)
curl -sf "$URL/health" >/dev/null || { echo "loadtest: /health failed after the run"; exit 1; }
METRICS=$(curl -sf "$URL/metrics")
CACHE=$(awk '$1 == "nzserve_tile_cache_bytes" {print $2}' <<< "$METRICS")
HEAP=$(curl -sf "$URL/v1/memory" | python3 -c 'import json, sys; print(json.load(sys.stdin)["counted_heap_bytes"])')
kill -TERM "$PID"
RC=0
wait "$PID" || RC=$?
PID=""
cat "$WORK/wrk.txt" | grep -v '^LOADTEST'
LINE=$(grep '^LOADTEST' "$WORK/wrk.txt" | sed 's/^LOADTEST //')
RSSMAX=$(sort -n "$WORK/rss.txt" | tail -1)
python3 - "$LINE" "$RSS0" "$RSS1" "${RSSMAX:-0}" "$RC" "${LOAD_ALLOW_429:-0}" "${CACHE:-0}" "${HEAP:-0}" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); rss0, rss1, rssmax, rc, allow429 = map(int, sys.argv[2:7])
cache, heap = int(float(sys.argv[7])), int(sys.argv[8])
mib = lambda b: b / 2**20
print(f"loadtest: {r['requests']} requests in {r['duration_s']:.1f} s = {r['rps']:.1f} req/s; "
      f"2xx {r['2xx']}, 429 {r['429']}, other 4xx {r['4xx']}, 5xx {r['5xx']}, socket errors {r['socket_errors']}")
print(f"loadtest: latency p50 {r['latency_ms']['p50']:.1f} ms, p90 {r['latency_ms']['p90']:.1f} ms, "
      f"p99 {r['latency_ms']['p99']:.1f} ms, max {r['latency_ms']['max']:.1f} ms")
print(f"loadtest: RSS after warm-up {mib(rss0):.1f} MiB, at the end {mib(rss1):.1f} MiB, max {mib(rssmax):.1f} MiB, "
      f"drift {mib(rss1 - rss0):+.1f} MiB (at the end: tile cache {mib(cache):.1f} MiB, counted heap {mib(heap):.1f} MiB); "
      f"exit status on SIGTERM {rc}")
bad = r['4xx'] + r['5xx'] + r['other'] + r['socket_errors'] + (0 if allow429 else r['429'])
if bad or rc != 0 or r['2xx'] == 0:
    print("loadtest: FAILED"); sys.exit(1)
print("loadtest: OK")
PY
