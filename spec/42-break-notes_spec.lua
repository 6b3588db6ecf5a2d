-- Breaking the lazy replication notes (c4d738a, a111966): a change's note is
-- made from the queue's arrays and its transaction's table, only for the
-- eyes that can see it.  Each test here was written to break a promise of
-- README's "Change data capture" (complete, correct notes for every handler
-- that can see them, on_error and pglisten.dead; new table shapes decoded
-- mid-stream; reloads that change a handler's arity).
local H = require "spec.helpers"
local pg = H.pg
local core = pg.core

local C = require "spec.cdc_helpers"

-- Starts a runner on `body` (after TARGET and out()), cleaned up at the end.
local function runner(tag, body, tables)
  local src, dst, slot = C.setup(tag)
  for _, t in ipairs(tables or {}) do C.sql(t, src) end
  local path = C.script(dst, (body:gsub("SLOT", slot)))
  local p = C.start(path, src)
  H.finally(function() C.cleanup({ p }, src, slot) end)
  return p, src, dst, slot, path
end

describe("replication notes, broken on purpose", function()
  it("say a change was received when the read that brought it ran, not when its transaction began", function()
    -- 30,000 rows in one transaction: the queue holds at most read_ahead
    -- (10,000) items, so the last rows are read only after the first
    -- batches were handled; their received_at cannot be before that
    local p, src = runner("rcv", [[
return {
  replication = { slot = "SLOT" },
  channels = {
    ["public.big"] = { source = "replication", batch = 1000, handler = function(events, notes)
      out("B", #events, ("%.6f"):format(pglisten.now()), ("%.6f"):format(notes[1].received_at),
        ("%.6f"):format(notes[#notes].received_at))
      pglisten.sleep(0.02)
    end },
  },
}
]], { "CREATE TABLE big (id int PRIMARY KEY)" })
    C.sql("INSERT INTO big SELECT g FROM generate_series(1, 30000) g", src)
    local calls, rows
    assert.truthy(H.eventually(function()
      calls, rows = {}, 0
      for _, l in ipairs(H.lines(p.stdout())) do
        local k, at, r1, rn = l:match("^B (%d+) (%S+) (%S+) (%S+)$")
        if k then
          calls[#calls + 1] = { at = tonumber(at), r1 = tonumber(r1), rn = tonumber(rn) }
          rows = rows + tonumber(k)
        end
      end
      return rows >= 30000
    end, 60), p.stdout() .. p.stderr())
    assert.equal(30000, rows)
    for i, c in ipairs(calls) do
      -- nothing is handled before it is received, and received_at grows
      assert.is_true(c.r1 <= c.at + 1e-3 and c.r1 <= c.rn, "batch " .. i)
      if i > 1 then assert.is_true(c.r1 >= calls[i - 1].rn, "batch " .. i) end
    end
    -- the last rows came in after the first batch was handled
    assert.is_true(calls[#calls].rn > calls[1].at,
      ("the last row's received_at %.6f is before the first batch was handled (%.6f)"):format(calls[#calls].rn,
        calls[1].at))
  end)
end)
