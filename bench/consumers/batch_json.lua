--- sync.sh consumer (lua-pglisten-batch-json): a batch handler that writes
-- each batch with ONE statement.  The rows travel as one JSON parameter (a
-- Lua table parameter is sent as JSON) and json_populate_recordset turns
-- them back into rows on the server: one executor run per batch instead of
-- one per row as with execmany.  ON CONFLICT DO UPDATE may not touch a row
-- twice in one statement, so only the last version of each id in a batch is
-- sent (the others are overwritten by it anyway).  See C.batch_consumer.

local C = dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "common.lua")

local UPSERT = [[INSERT INTO users (id, name, email)
  SELECT id, name, email FROM json_populate_recordset(NULL::users, $1)
  ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email]]

return C.batch_consumer("lua-pglisten-batch-json", function(dst, rows)
  local seen, list = {}, {}
  for i = #rows, 1, -1 do   -- the last version of each id wins
    local r = rows[i]
    if not seen[r.id] then
      seen[r.id] = true
      list[#list + 1] = r
    end
  end
  return dst:exec(UPSERT, list)
end)
