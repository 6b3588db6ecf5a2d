--- sync.sh consumer (lua-pglisten-batch): a batch handler upserting with
-- conn:execmany (pipeline mode, one transaction per batch).
--
-- The runner LISTENs on "users" in BENCH_SRC_DB (its --db) and hands the
-- handler up to BENCH_LUA_BATCH (1000) notes that have already arrived.
-- After BENCH_N notes: RESULT with the target's row count and id sum, secs
-- from the first note to the last batch done, and the mean batch size.

local pg = require "pglisten"
local C = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local N, now, UPSERT = C.N, pg.now, C.UPSERT
local BATCH = math.tointeger(tonumber(os.getenv("BENCH_LUA_BATCH") or "")) or 1000
-- Notes the runner takes from libpq per read (its batch_size; default 256).
local DRAIN = math.tointeger(tonumber(os.getenv("BENCH_LUA_DRAIN") or ""))
local dst, spec
local n, failed, calls, first = 0, 0, 0, 0.0

local function report()
  local secs = now() - first
  local count, sum = C.target_totals(dst)
  local name = spec.batch_size and ("lua-pglisten-batch-drain" .. spec.batch_size) or "lua-pglisten-batch"
  C.finish(name, ("RESULT count=%d sum=%d secs=%.4f rate=%.0f failed=%d calls=%d mean_batch=%.1f"):format(
    count, sum, secs, secs > 0 and n / secs or 0, failed, calls, n / calls))
end

spec = {
  batch_size = DRAIN,
  channels = {
    users = {
      batch = BATCH,
      handler = function(rows)
        if n == 0 then first = now() end
        local params = {}
        for i = 1, #rows do
          local r = rows[i]
          params[i] = { r.id, r.name, r.email }
        end
        local ok, err, code = dst:execmany(UPSERT, params)
        if not ok then
          failed = failed + #rows
          io.stderr:write("execmany failed: ", tostring(err), " ", tostring(code), "\n")
        end
        n, calls = n + #rows, calls + 1
        if n >= N then report() end
      end,
    },
  },
  on_connect = function(db)
    if type(db.execmany) ~= "function" then C.die("conn:execmany is missing from this build") end
    C.check_db(db, os.getenv("BENCH_SRC_DB"))
    dst = dst or C.connect_dst()
    C.ready()
    C.wait_go()   -- sync.sh sets no BENCH_GO; bench.sh's backlog run does
  end,
}

return spec
