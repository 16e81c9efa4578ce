-- wrk script: every request is a POST with a fresh Idempotency-Key.
--
-- oha sends the same headers on every request, so this is the header-key
-- variant of the unique-key scenario. Keys are RUN-THREAD-COUNTER, with RUN
-- taken from the environment (BENCH_RUN) so two runs never share a key.
-- WRK_MODE=plain sends a keyless GET instead (the wrk pass-through baseline);
-- WRK_MODE=replay sends the same POST with the key WRK_KEY every time.
-- done() prints one JSON line, prefixed "WRK_JSON ", that run.sh parses.

local threads = {}
local counter = 1

function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
  table.insert(threads, thread)
end

function init(args)
  run = os.getenv("BENCH_RUN") or tostring(os.time())
  mode = os.getenv("WRK_MODE") or "unique"
  n = 0
  body = '{"amount":100,"currency":"EUR"}'
  headers = { ["Content-Type"] = "application/json" }
  if mode == "plain" then
    fixed = wrk.format("GET", wrk.path)
  elseif mode == "replay" then
    fixed = wrk.format("POST", wrk.path,
      { ["Content-Type"] = "application/json", ["Idempotency-Key"] = os.getenv("WRK_KEY") }, body)
  end
end

function request()
  if fixed then
    return fixed
  end
  n = n + 1
  headers["Idempotency-Key"] = run .. "-" .. id .. "-" .. n
  return wrk.format("POST", wrk.path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  local non2xx = e.status
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d,"non2xx":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, non2xx))
end
