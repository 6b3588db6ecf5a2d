--- bench/cdc.sh consumer (lua-pglisten-repl-batch): end-to-end sync from the
-- WAL.  source = "replication" on public.users of the runner's database, a
-- batch handler (BENCH_LUA_BATCH, 1000) upserting each batch into
-- $BENCH_DST_DB with conn:execmany (one pipelined transaction), the same
-- statement as the NOTIFY consumers (consumers/batch.lua).  Slot
-- $BENCH_SLOT, publication $BENCH_PUB: created when missing, no snapshot.
-- After BENCH_N inserts: RESULT with the target's row count and id sum,
-- secs from the first event to the last batch done, then exit.

local C = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")
local pg = require "pglisten"

local now = pg.now
local name = "lua-pglisten-repl-batch"
local batch = math.tointeger(tonumber(os.getenv("BENCH_LUA_BATCH") or "")) or 1000
local dst
local n, failed, calls, first = 0, 0, 0, 0.0

local function report()
  local secs = now() - first
  local count, sum = C.target_totals(dst)
  C.finish(name, ("RESULT count=%d sum=%d secs=%.4f rate=%.0f failed=%d calls=%d mean_batch=%.1f"):format(
    count, sum, secs, secs > 0 and n / secs or 0, failed, calls, n / calls))
end

return {
  replication = { slot = os.getenv("BENCH_SLOT") or "bench_cdc", publication = os.getenv("BENCH_PUB") or "bench_cdc" },
  channels = {
    ["public.users"] = {
      source = "replication",
      batch = batch,
      handler = function(events)
        if n == 0 then first = now() end
        dst = dst or C.connect_dst()
        local params = {}
        for i = 1, #events do
          local r = events[i].new
          params[i] = { r.id, r.name, r.email }
        end
        local ok, err, code = dst:execmany(C.UPSERT, params)
        if not ok then
          failed = failed + #events
          io.stderr:write(name, ": write failed: ", tostring(err), " ", tostring(code), "\n")
          error(err, 0) -- retried: nothing is skipped
        end
        n, calls = n + #events, calls + 1
        if n >= C.N then report() end
      end,
    },
  },
}
