--- capture.sh reader (lua-pglisten-repl): the runner itself drains the
-- slot's backlog, source = "replication" on public.users, each change
-- decoded into a Lua table and handed to a Lua handler that sums new.id.
-- BENCH_REPL_BATCH=N makes it a batch handler (N events per call); unset,
-- one call per event.  Uses slot $BENCH_SLOT and publication $BENCH_PUB as
-- capture.sh made them (create = false).  After BENCH_N events: RESULT
-- (secs from the first event handled to the last), and exit.

local C = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
local pg = require "pglisten"

local now = pg.now
local batch = math.tointeger(tonumber(os.getenv("BENCH_REPL_BATCH") or ""))
local name = batch and "lua-pglisten-repl-batch" or "lua-pglisten-repl"
local n, sum, calls, first = 0, 0, 0, nil

local function report()
  local secs = now() - first
  C.finish(name, ("RESULT count=%d sum=%d secs=%.4f rate=%.0f calls=%d"):format(
    n, sum, secs, secs > 0 and n / secs or 0, calls))
end

local function one(ev)
  if ev.op == "INSERT" then
    n = n + 1
    sum = sum + ev.new.id
  end
end

local handler
if batch then
  handler = function(events)
    first = first or now()
    calls = calls + 1
    for i = 1, #events do one(events[i]) end
    if n >= C.N then report() end
  end
else
  handler = function(ev)
    first = first or now()
    calls = calls + 1
    one(ev)
    if n >= C.N then report() end
  end
end

return {
  replication = { slot = os.getenv("BENCH_SLOT") or "bench_slot", publication = os.getenv("BENCH_PUB") or "bench_pub",
    create = false },
  channels = {
    ["public.users"] = { source = "replication", batch = batch, handler = handler },
  },
}
