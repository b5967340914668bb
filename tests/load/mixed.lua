-- wrk script for `make loadtest`: mixed traffic against one nzserve.
-- 70 % POST /v1/translate (one sentence from the list below, round robin),
-- 20 % GET /health, 10 % GET /metrics. Counts every response's status
-- class per thread; done() prints the totals as one JSON line (LOADTEST {...})
-- for tests/load/loadtest.sh to check. LOAD_TEXT replaces the sentences
-- (models with another vocabulary).
local sentences = {
  "Open the file in a new window.",
  "The printer is out of paper.",
  "Could not connect to the server.",
  "Save changes to the document before closing?",
  "Select the text you want to copy.",
  "The package could not be installed because of missing dependencies.",
  "Show hidden files",
  "Delete the selected items permanently?",
}
if os.getenv("LOAD_TEXT") then sentences = { os.getenv("LOAD_TEXT") } end
local threads = {}
local n = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  c2xx, c429, c4xx, c5xx, cother = 0, 0, 0, 0, 0
end

function request()
  n = n + 1
  local k = n % 10
  if k < 7 then
    local s = sentences[(n % #sentences) + 1]
    return wrk.format("POST", "/v1/translate", { ["Content-Type"] = "application/json" },
                      '{"text": "' .. s .. '"}')
  elseif k < 9 then
    return wrk.format("GET", "/health")
  else
    return wrk.format("GET", "/metrics")
  end
end

function response(status, headers, body)
  if status >= 200 and status < 300 then c2xx = c2xx + 1
  elseif status == 429 then c429 = c429 + 1
  elseif status >= 400 and status < 500 then c4xx = c4xx + 1
  elseif status >= 500 then c5xx = c5xx + 1
  else cother = cother + 1 end
end

function done(summary, latency, requests)
  local t = { c2xx = 0, c429 = 0, c4xx = 0, c5xx = 0, cother = 0 }
  for _, th in ipairs(threads) do
    for k, _ in pairs(t) do t[k] = t[k] + (th:get(k) or 0) end
  end
  io.write(string.format(
    'LOADTEST {"requests": %d, "duration_s": %.3f, "rps": %.2f, "2xx": %d, "429": %d, "4xx": %d, ' ..
    '"5xx": %d, "other": %d, "socket_errors": %d, "timeouts": %d, "latency_ms": {"p50": %.2f, ' ..
    '"p90": %.2f, "p99": %.2f, "max": %.2f}}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6), t.c2xx, t.c429,
    t.c4xx, t.c5xx, t.cother,
    summary.errors.connect + summary.errors.read + summary.errors.write, summary.errors.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3,
    latency.max / 1e3))
end
