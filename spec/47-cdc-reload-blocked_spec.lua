-- A replication handler that keeps failing blocks its slot (nothing is
-- skipped).  Fixing the script and sending HUP must unblock it: the stream
-- starts again from the position handled, and the failed change -- and
-- those behind it -- go to the new handler, in order, none lost.
local H = require "spec.helpers"

local C = require "spec.cdc_helpers"

local BODY = [[
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", retry = { attempts = 1, backoff = 0.1 },
      handler = function(ev)
        %s
        out("%s", ev.new.id)
      end },
  },
}
]]

describe("a reload while a replication handler blocks its slot", function()
  it("hands the failed change and those behind it to the new handler, in order", function()
    local src, dst, slot = C.setup("rblk")
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
    local path = C.script(dst, BODY:format(slot, 'if ev.new.id == 3 then error("no 3 today") end', "old"))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    for i = 1, 5 do C.sql(("INSERT INTO items VALUES (%d)"):format(i), src) end
    assert.truthy(H.eventually(function()
      return H.count_matches(p.stderr(), "the slot waits until it succeeds") >= 2
    end, 20), p.stderr())
    assert.matches("old 1\nold 2\n", p.stdout(), 1, true)
    -- the fix, and HUP
    H.rewrite(path, ("local TARGET = %q\n"):format("dbname=" .. dst) .. C.HANDLER .. BODY:format(slot, "", "new"))
    p.kill("HUP")
    for i = 6, 7 do C.sql(("INSERT INTO items VALUES (%d)"):format(i), src) end
    assert.truthy(H.eventually(function() return p.stdout():find("new 7", 1, true) end, 20),
      p.stdout() .. p.stderr())
    assert.matches("reload: the changes of the failing handler go to the new script", p.stderr(), 1, true)
    local news = {}
    for _, l in ipairs(H.lines(p.stdout())) do
      local id = l:match("^new (%d+)$")
      if id then news[#news + 1] = tonumber(id) end
    end
    -- 3, 4, 5 (failed and behind it), 6, 7; 1 and 2 were confirmed before
    assert.same({ 3, 4, 5, 6, 7 }, news)
    assert.is_nil(p.stdout():find("old 3", 1, true))
  end)
end)
