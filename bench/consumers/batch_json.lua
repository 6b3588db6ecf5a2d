--- sync.sh consumer (lua-pglisten-batch-json): a batch handler that writes
-- each batch with ONE statement.  The rows travel as one JSON parameter (a
-- Lua table parameter is sent as JSON) and json_populate_recordset turns
-- them back into rows on the server: one executor run per batch instead of
-- one per row as with execmany.  ON CONFLICT DO UPDATE may not touch a row
-- twice in one statement, so only the last version of each id in a batch is
-- sent (the others are overwritten by it anyway).
--
-- Same environment and RESULT line as batch.lua.

local pg = require "pglisten"
local C = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local N, now = C.N, pg.now
local BATCH = math.tointeger(tonumber(os.getenv("BENCH_LUA_BATCH") or "")) or 1000
local UPSERT = [[INSERT INTO users (id, name, email)
  SELECT id, name, email FROM json_populate_recordset(NULL::users, $1)
  ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email]]
local dst
local n, failed, calls, first = 0, 0, 0, 0.0

local function report()
  local secs = now() - first
  local count, sum = C.target_totals(dst)
  C.finish("lua-pglisten-batch-json", ("RESULT count=%d sum=%d secs=%.4f rate=%.0f failed=%d calls=%d mean_batch=%.1f"):format(
    count, sum, secs, secs > 0 and n / secs or 0, failed, calls, n / calls))
end

return {
  channels = {
    users = {
      batch = BATCH,
      handler = function(rows)
        if n == 0 then first = now() end
        local seen, list = {}, {}
        for i = #rows, 1, -1 do          -- the last version of each id wins
          local r = rows[i]
          if not seen[r.id] then
            seen[r.id] = true
            list[#list + 1] = r
          end
        end
        local ok, err, code = dst:exec(UPSERT, list)
        if not ok then
          failed = failed + #rows
          io.stderr:write("upsert failed: ", tostring(err), " ", tostring(code), "\n")
        end
        n, calls = n + #rows, calls + 1
        if n >= N then report() end
      end,
    },
  },
  on_connect = function(db)
    C.check_db(db, os.getenv("BENCH_SRC_DB"))
    dst = dst or C.connect_dst()
    C.ready()
    C.wait_go()
  end,
}
