-- wrk script for tests/load/capacity.py and batching.py: POST CAP_PATH with
-- the JSON bodies of CAP_BODIES (separated by ASCII record separators, 0x1e)
-- in rotation, each wrk thread from its own offset. Counts every response's
-- status class per thread; done() prints totals and latency percentiles as
-- one JSON line (CAPACITY {...}).
local path = os.getenv("CAP_PATH") or "/v1/dialogue"
local bodies = {}
for b in string.gmatch(os.getenv("CAP_BODIES") or '{"context": ["Hello."]}', "[^\30]+") do
  table.insert(bodies, b)
end
local threads = {}
local n = 0

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  c2xx, cbad = 0, 0
  n = id * 7
end

function request()
  n = n + 1
  return wrk.format("POST", path, { ["Content-Type"] = "application/json" }, bodies[(n % #bodies) + 1])
end

function response(status, headers, body)
  if status >= 200 and status < 300 then c2xx = c2xx + 1 else cbad = cbad + 1 end
end

function done(summary, latency, requests)
  local ok, bad = 0, 0
  for _, t in ipairs(threads) do
    ok = ok + t:get("c2xx")
    bad = bad + t:get("cbad")
  end
  local errs = summary.errors
  io.write(string.format(
    'CAPACITY {"requests": %d, "duration_s": %.3f, "2xx": %d, "non_2xx": %d, "socket_errors": %d, ' ..
    '"latency_ms": {"p50": %.2f, "p90": %.2f, "p99": %.2f, "mean": %.2f}}\n',
    summary.requests, summary.duration / 1e6, ok, bad,
    errs.connect + errs.read + errs.write + errs.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.mean / 1e3))
end
