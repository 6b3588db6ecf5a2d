--- sync.sh consumer (lua-pglisten-batch): a batch handler upserting with
-- conn:execmany (pipeline mode, one transaction per batch).  The runner
-- LISTENs on "users" in BENCH_SRC_DB (its --db); see C.batch_consumer.

local C = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

return C.batch_consumer("lua-pglisten-batch", function(dst, rows)
  local params = {}
  for i = 1, #rows do
    local r = rows[i]
    params[i] = { r.id, r.name, r.email }
  end
  return dst:execmany(C.UPSERT, params)
end)
