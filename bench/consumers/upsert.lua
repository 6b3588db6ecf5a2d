--- sync.sh consumer (lua-pglisten-upsert): one upsert per note with conn:exec.
--
-- The runner LISTENs on "users" in BENCH_SRC_DB (its --db); each decoded row
-- is upserted into users of BENCH_DST_DB in autocommit, as the psycopg2 peer
-- does.  After BENCH_N notes: RESULT with the target's row count and id sum,
-- secs from the first note to the last upsert done.

local pg = require "pglisten"
local C = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local N, now, UPSERT = C.N, pg.now, C.UPSERT
local dst
local n, failed, first = 0, 0, 0.0

local function report()
  local secs = now() - first
  local count, sum = C.target_totals(dst)
  C.finish("lua-pglisten-upsert", ("RESULT count=%d sum=%d secs=%.4f rate=%.0f failed=%d"):format(
    count, sum, secs, secs > 0 and n / secs or 0, failed))
end

return {
  channels = {
    users = function(row)
      if n == 0 then first = now() end
      local ok, err, code = dst:exec(UPSERT, row.id, row.name, row.email)
      if not ok then
        failed = failed + 1
        if failed == 1 then io.stderr:write("upsert failed: ", tostring(err), " ", tostring(code), "\n") end
      end
      n = n + 1
      if n == N then report() end
    end,
  },
  on_connect = function(db)
    C.check_db(db, os.getenv("BENCH_SRC_DB"))
    dst = dst or C.connect_dst()
    C.ready()
    C.wait_go()   -- sync.sh sets no BENCH_GO; bench.sh's backlog run does
  end,
}
