-- wrk script for the ack benchmarks: every request is the next pre-signed alert of a pool file, so
-- each one carries a fresh key-shaped token and a valid signature, and wrk spends no time on crypto.
--
-- wrk -t1 -c32 -d60s -s bench/alerts.lua URL -- POOL IDENTIFIER COUNT
--   POOL        lines of "<base64 signature>\t<JSON body>", one alert each
--   IDENTIFIER  the Github-Public-Key-Identifier of the key that signed them
--   COUNT       answers to wait for; the pool must hold COUNT plus the connections' worth of
--               alerts, so that the requests still in flight at the stop are fresh ones too
-- done() prints one JSON line (prefixed "RESULT ") for bench/ack.py to read.

local ffi = require("ffi")
ffi.cdef("int kill(int pid, int sig); int getpid(void);")

local requests = {}
local threads = {}
sent, answered, wanted, bad, last_bad = 0, 0, 0, 0, 0

function setup(thread)
  threads[#threads + 1] = thread
end

function init(args)
  local pool, identifier = args[1], args[2]
  wanted = tonumber(args[3])
  for line in io.lines(pool) do
    local signature, body = line:match("^([^\t]+)\t(.*)$")
    requests[#requests + 1] = wrk.format("POST", nil, {
      ["Content-Type"] = "application/json",
      ["Github-Public-Key-Identifier"] = identifier,
      ["Github-Public-Key-Signature"] = signature,
    }, body)
  end
  if #requests < wanted then
    error("pool " .. pool .. " holds " .. #requests .. " alerts, " .. wanted .. " wanted")
  end
end

function request()
  -- Wraps around only if the pool is short of COUNT plus what is in flight (bench/ack.py sizes it).
  sent = sent % #requests + 1
  return requests[sent]
end

function response(status, headers, body)
  answered = answered + 1
  if status ~= 200 then
    bad = bad + 1
    last_bad = status
  end
  if answered == wanted then
    -- wrk's main thread sleeps for the whole -d duration; SIGINT is its own way to end a run early
    -- (it then stops the threads and reports the time actually run).
    wrk.thread:stop()
    ffi.C.kill(ffi.C.getpid(), 2)
  end
end

function done(summary, latency, requests)
  -- done() runs in wrk's main Lua state: the threads' counters are read through thread:get.
  local non_200, status, wrapped = 0, 0, 0
  for _, thread in ipairs(threads) do
    non_200 = non_200 + thread:get("bad")
    if thread:get("last_bad") ~= 0 then status = thread:get("last_bad") end
    if thread:get("sent") < thread:get("answered") then wrapped = 1 end
  end
  io.write(string.format(
    'RESULT {"requests": %d, "seconds": %.6f, "p50_ms": %.3f, "p99_ms": %.3f, "max_ms": %.3f,'
      .. ' "socket_errors": %d, "non_200": %d, "a_non_200_status": %d, "pool_wrapped": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1e3,
    latency:percentile(99) / 1e3, latency.max / 1e3,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    non_200, status, wrapped))
end
