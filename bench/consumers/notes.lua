--- run.sh consumer (lua-pglisten): the per-note hot path.
--
-- Channel "bench": the runner decodes each JSON payload; the handler sums
-- `id` and takes latency = handler-call time minus the payload's `ts`
-- (microseconds since the epoch), like peers/drain.c does per PQnotifies.
-- After BENCH_N notes: RESULT count sum secs rate p50_us p99_us max_us.
--
-- Latencies go into a histogram, exact to 1 us below 10 ms (100 us buckets
-- to 1 s, 10 ms beyond), not into an array of BENCH_N numbers: such an array
-- (16 bytes a number, grown by doubling, and the garbage the collector lets
-- accumulate in proportion to it) would add about 9 MiB to the peak RSS the
-- bench reports for the runner.  BENCH_LAT_ARRAY=1 keeps every latency.

local pg = require "pglisten"
local C = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local N, now = C.N, pg.now
local n, sum, first, last, max = 0, 0, 0.0, 0.0, -math.huge
local hist, lat = {}, {}
local ARRAY = os.getenv("BENCH_LAT_ARRAY") == "1"

-- A histogram bucket (see the handler) back to microseconds.
local function value(b)
  if b < 1e4 then return b end
  if b < 19900 then return (b - 9900) * 100 end
  return (b - 19900) * 1e4
end

-- latencies at 0-based ranks n//2 and floor(n*0.99), as the peers index them
local function percentiles()
  local r50, r99 = n // 2 + 1, math.floor(n * 0.99) + 1
  if ARRAY then
    table.sort(lat)
    return lat[r50], lat[r99]
  end
  local keys = {}
  for b in pairs(hist) do keys[#keys + 1] = b end
  table.sort(keys)
  local seen, p50, p99 = 0, nil, nil
  for _, b in ipairs(keys) do
    seen = seen + hist[b]
    if not p50 and seen >= r50 then p50 = value(b) end
    if not p99 and seen >= r99 then p99 = value(b) end
  end
  return p50, p99
end

local function report()
  local secs = last - first
  local p50, p99 = percentiles()
  C.finish("lua-pglisten", ("RESULT count=%d sum=%d secs=%.4f rate=%.0f p50_us=%.0f p99_us=%.0f max_us=%.0f"):format(
    n, sum, secs, secs > 0 and n / secs or 0, p50, p99, max))
end

-- The handler: kept minimal, it runs once per note in the runner's hot path.
local handler
if ARRAY then
  handler = function(row)
    local t = now()
    n = n + 1
    if n == 1 then first = t end
    last = t
    sum = sum + row.id
    local d = t * 1e6 - row.ts
    if d > max then max = d end
    lat[n] = d
    if n == N then report() end
  end
else
  handler = function(row)
    local t = now()
    n = n + 1
    if n == 1 then first = t end
    last = t
    sum = sum + row.id
    local d = t * 1e6 - row.ts
    if d > max then max = d end
    local b = d < 1e4 and (d < 0 and 0 or d // 1) or d < 1e6 and 9900 + d // 100 or 19900 + d // 1e4
    hist[b] = (hist[b] or 0) + 1
    if n == N then report() end
  end
end

return {
  channels = { bench = handler },
  on_connect = function()
    C.ready()
    C.wait_go()
  end,
}
