-- wrk script for bench/http.py: POST pre-signed DT events, each one once.
--
--   wrk -t1 -c64 -d10s -s bench/post.lua URL -- BODIES_FILE HEADER_NAME
--
-- BODIES_FILE has one request per line: "<token>\t<compact JSON body>". Every request is
-- built once in init(), so the per-request Lua cost is a table lookup. If the run outlasts
-- the file, the list starts over (repeating eventIds, which dedup short-circuits); done()
-- reports how often that happened so the driver can refuse such a run.

local requests = {}
local count = 0
local index = 0
wrapped = 0 -- global: read from the main Lua state through thread:get() in done()

function init(args)
  local path, header = args[1], args[2]
  for line in io.lines(path) do
    local tab = line:find("\t", 1, true)
    local headers = {}
    headers[header] = line:sub(1, tab - 1)
    headers["Content-Type"] = "application/json"
    count = count + 1
    requests[count] = wrk.format("POST", nil, headers, line:sub(tab + 1))
  end
  if count == 0 then
    error("no requests in " .. path)
  end
end

function request()
  index = index + 1
  if index > count then
    index = 1
    wrapped = wrapped + 1
  end
  return requests[index]
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, _)
  local wraps = 0
  for _, thread in ipairs(threads) do
    wraps = wraps + thread:get("wrapped")
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,"wrapped":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, wraps, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
