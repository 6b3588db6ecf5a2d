-- The runner never holds up a server shutdown (issue 15).  On a fast
-- shutdown the walsender waits until the client has confirmed everything
-- it sent (or wal_sender_timeout passes, 60 s by default): an idle runner
-- answers the shutdown's keepalive at once, and a runner whose handler
-- cannot finish (its target is the same server, and the shutdown killed
-- that connection first) confirms what is safe and closes the stream.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"
local pg = H.pg

-- Times a fast shutdown of the source server; returns the seconds it took.
-- Leaves the server running again.
local function timed_stop()
  local t0 = H.now()
  local out = H.sh(H.ctl .. " stop")
  local took = H.now() - t0
  -- pg_ctl gives up after 30 s: wait for the postmaster itself then
  H.eventually(function() return not io.open(H.dir .. "/data/postmaster.pid", "r") end, 90, 0.2)
  H.server("start")
  return took, out
end

local ITEMS = "CREATE TABLE items (id int PRIMARY KEY, v text)"

describe("a fast shutdown of the source server with the runner connected", function()
  it("completes within 5 s when the runner is idle", function()
    local src, dst, slot = C.setup("shut")
    C.sql(ITEMS, src); C.sql(ITEMS, dst)
    local p = C.run(src, dst, slot, [[
    ["public.items"] = { source = "replication", batch = 100, handler = function(events, notes)
      assert(pglisten.apply(target, events, notes, function(c, evs)
        for _, ev in ipairs(evs) do assert(c:exec("INSERT INTO items VALUES ($1, $2)", ev.new.id, ev.new.v)) end
      end))
    end },]])
    C.sql("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 200) g", src)
    assert.is_true(C.same(src, dst, "items") and true or false)
    pg.sleep(1.5) -- idle: everything handled and confirmed
    local took, out = timed_stop()
    print(("\n  fast shutdown with an idle runner: %.2f s"):format(took))
    assert.is_true(took < 5, ("took %.1f s: %s"):format(took, out))
    -- and the runner streams again once the server is back
    assert.truthy(H.eventually(function()
      local _, n = p.stderr():gsub("streaming from", "")
      return n >= 2
    end, 30), p.stderr())
    C.sql("INSERT INTO items VALUES (1000, 'after')", src)
    assert.is_true(C.same(src, dst, "items") and true or false, p.stderr())
  end)

  it("completes within 5 s when the target is the same server and its connection died first, events pending",
    function()
      local src, dst, slot = C.setup("shutsame")
      C.sql(ITEMS, src); C.sql(ITEMS, dst)
      local p = C.run(src, dst, slot, [[
    ["public.items"] = { source = "replication", batch = 5, retry = { attempts = 1000, backoff = 0.2, max_backoff = 1 },
      handler = function(events, notes)
        assert(pglisten.apply(target, events, notes, function(c, evs)
          -- slow for the first 100 rows, so that the shutdown (at about row
          -- 20) finds a handler waiting on the target and 480 events pending;
          -- the rest drains at full speed once the server is back
          if evs[1].new.id <= 100 then assert(c:exec("SELECT pg_sleep(0.2)")) end
          for _, ev in ipairs(evs) do
            assert(c:exec("INSERT INTO items VALUES ($1, $2)", ev.new.id, ev.new.v))
          end
        end))
      end },]])
      C.sql("INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 500) g", src)
      -- mid-drain: some handled, many pending
      assert.truthy(H.eventually(function() return tonumber(C.sql("SELECT count(*) FROM items", dst)) >= 20 end, 20))
      local took, out = timed_stop()
      print(("\n  fast shutdown, target on the same server, events pending: %.2f s"):format(took))
      assert.is_true(took < 5, ("took %.1f s: %s"):format(took, out))
      -- nothing lost: the runner comes back and finishes
      assert.is_true(C.same(src, dst, "items", 120) and true or false, p.stderr():sub(-3000))
    end)
end)
