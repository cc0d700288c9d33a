-- wrk script for bench/accept.py: every request POSTs a unique form (a fresh captcha token,
-- a fresh visitor), counts the answers by status, and prints one JSON line at the end.
-- BENCH_PATH, BENCH_BODY (with {i} where the unique number goes) and BENCH_HEADERS
-- ("Name:value|Name:value") come from the environment.
-- With BENCH_STOP_AFTER=N (and BENCH_THREADS, BENCH_DONE_DIR) each thread stops after its
-- share of N answers and leaves a file "done.<tid>" in BENCH_DONE_DIR; wrk itself runs until
-- its duration or a SIGINT, which bench/burst.py sends once every thread's file is there.
local path = os.getenv("BENCH_PATH") or "/form"
local template = os.getenv("BENCH_BODY") or "x={i}"
local extra = os.getenv("BENCH_HEADERS") or ""
local stop_after = tonumber(os.getenv("BENCH_STOP_AFTER") or "0")
local thread_count = tonumber(os.getenv("BENCH_THREADS") or "1")
local done_dir = os.getenv("BENCH_DONE_DIR") or "."
local threads = {}
local next_id = 0

function setup(thread)
  next_id = next_id + 1
  thread:set("tid", next_id)
  table.insert(threads, thread)
end

function init(args)
  counter = 0
  answered = 0
  stopped = false
  share = math.ceil(stop_after / thread_count)
  statuses = {}
  headers = {}
  headers["Content-Type"] = "application/x-www-form-urlencoded"
  for name, value in string.gmatch(extra, "([^:|]+):([^|]*)") do
    headers[name] = value
  end
end

function request()
  counter = counter + 1
  local i = string.format("%d%07d", tid, counter)
  local body = string.gsub(template, "{i}", i)
  return wrk.format("POST", path, headers, body)
end

function response(status, hdrs, body)
  statuses[status] = (statuses[status] or 0) + 1
  answered = answered + 1
  if stop_after > 0 and not stopped and answered >= share then
    stopped = true
    local marker = io.open(done_dir .. "/done." .. tid, "w")
    if marker then
      marker:write(answered)
      marker:close()
    end
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, n in pairs(s) do
      counts[code] = (counts[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(counts) do
    table.insert(parts, string.format('"%d":%d', code, n))
  end
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"statuses":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    latency.mean, summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout, table.concat(parts, ",")))
end
