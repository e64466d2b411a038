-- wrk script for the public reports benchmark: every request is the next text/plain body of a pool
-- file (one report per line), so each "with keys" request carries a key no earlier one did.
--
-- wrk -t1 -c32 -d10s -s bench/public.lua URL -- POOL
--   POOL   one report body per line, more than the run will send (done() reports a wrap-around)
-- done() prints one JSON line (prefixed "RESULT ") for bench/public.py to read.

local requests = {}
local threads = {}
sent, issued, bad, last_bad, wrapped = 0, 0, 0, 0, 0

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  for line in io.lines(args[1]) do
    requests[#requests + 1] = wrk.format("POST", nil, {["Content-Type"] = "text/plain"}, line .. "\n")
  end
end

function request()
  issued = issued + 1
  if issued > #requests then wrapped = 1 end
  sent = sent % #requests + 1
  return requests[sent]
end

function response(status, headers, body)
  if status ~= 202 then
    bad = bad + 1
    last_bad = status
  end
end

function done(summary, latency, requests)
  -- done() runs in wrk's main Lua state: the threads' counters are read through thread:get.
  local non_202, status, wrapped = 0, 0, 0
  for _, thread in ipairs(threads) do
    non_202 = non_202 + thread:get("bad")
    if thread:get("last_bad") ~= 0 then status = thread:get("last_bad") end
    if thread:get("wrapped") ~= 0 then wrapped = 1 end
  end
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.6f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f,'
      .. ' "socket_errors": %d, "non_202": %d, "a_non_202_status": %d, "pool_wrapped": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    non_202, status, wrapped))
end
