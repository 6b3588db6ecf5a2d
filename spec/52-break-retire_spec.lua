-- Breaking 4715c5d: a reload to a script with no `replication` table lets
-- the slot go (M:retire): what was handled is confirmed, the stream is
-- dropped, and the slot keeps the rest for the next script that serves it.
-- GUARD tests pass and would fail if their promise broke; BREAK tests fail
-- on the commit they name.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"
local ids = C.ids

-- a batch handler whose first call waits 2 s on its target (read ahead
-- meanwhile)
local SERVED = [[
local waited = false
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", batch = 10, handler = function(evs)
      if not waited then
        waited = true
        out("waiting")
        for _ = 1, 20 do assert(target:exec("SELECT pg_sleep(0.1)")) end
      end
      for _, ev in ipairs(evs) do out("%s", ev.new.id) end
    end },
  },
}
]]

local PLAIN = [[
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", handler = function(ev) out("%s", ev.new.id) end },
  },
}
]]

local NONE = [[
return { channels = { other = { handler = function() end } } }
]]

local rewrite, reloaded = C.rewrite, C.reloaded

local function setup(prefix)
  local src, dst, slot = C.setup(prefix)
  C.sql("CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE pad (id int)", src)
  C.slot_first(src, slot, "items")
  return src, dst, slot
end

local function inactive(slot)
  return H.eventually(function()
    return C.sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s' AND active"):format(slot)) == "0"
  end, 10)
end

describe("4715c5d: a reload to a script with no replication table", function()
  -- The commit of the first transaction comes after its change (pgoutput
  -- sends each message as it decodes it; the 200,000 rows of an unpublished
  -- table between them take a while), so the first job ends at the change
  -- and the commit mark is read ahead while the handler waits.  The signal
  -- stops Apply:handle right after the job (host.pending()), before the
  -- mark; retire confirms `flushed` without it and resets the queue: row 1,
  -- handled, is not confirmed, and a new runner gets it again (1, 2, 3, 4).
  it("BREAK: mid-batch: the batch handled is confirmed on the server (its commit read ahead), the rest "
    .. "kept for a new runner; USR1, metrics and TERM after it", function()
    local src, dst, slot = setup("b52a")
    local path = C.script(dst, SERVED:format(slot, "items"))
    local p = C.start(path, src, { "--stats-interval", "3600", "--metrics", "127.0.0.1:0" })
    local q
    H.finally(function() C.cleanup({ p, q }, src, slot) end)
    local url = "http://" .. H.metrics_address(p) .. "/metrics"
    C.sql("BEGIN; INSERT INTO items VALUES (1); INSERT INTO pad SELECT generate_series(1, 200000); COMMIT", src)
    assert.truthy(H.eventually(function() return p.stdout():find("waiting", 1, true) end, 10), p.stderr())
    for i = 2, 4 do C.sql(("INSERT INTO items VALUES (%d)"):format(i), src) end
    C.wait_sent({ slot })
    H.sleep(0.2)
    rewrite(path, dst, NONE)
    p.kill("HUP")
    reloaded(p, 1)
    assert.truthy(inactive(slot), p.stderr())
    assert.same({ 1 }, ids(p.stdout(), "items"), p.stdout())
    -- stats and metrics after it: no crash, no replication line
    local n = H.count_matches(p.stderr(), "INFO  stats ")
    p.kill("USR1")
    assert.truthy(H.eventually(function() return H.count_matches(p.stderr(), "INFO  stats ") > n end, 5), p.stderr())
    local body_m = H.sh("env -u LD_PRELOAD curl -s -m 10 " .. url) -- not under make check's sanitizer preload
    assert.truthy(body_m:find("pglisten", 1, true), body_m)
    assert.is_nil(body_m:find("slot=\"" .. slot, 1, true), body_m)
    assert.truthy(p.running(), p.stderr())
    p.kill("TERM")
    assert.equal(0, p.wait(10), p.stderr())
    assert.truthy(p.stderr():find("INFO  stopped", 1, true), p.stderr())
    assert.is_nil(p.stderr():find("ERROR", 1, true), p.stderr())
    -- a new runner gets exactly 2..4: 1 was confirmed, nothing else was
    rewrite(path, dst, PLAIN:format(slot, "again"))
    q = C.start(path, src)
    assert.truthy(H.eventually(function() return q.stdout():find("again 4\n", 1, true) end, 10),
      q.stdout() .. q.stderr())
    H.sleep(0.2)
    assert.same({ 2, 3, 4 }, ids(q.stdout(), "again"), q.stdout() .. p.stderr() .. q.stderr())
  end)

  it("GUARD: away and back twice quickly, then away while reconnecting: nothing lost, nothing twice, "
    .. "the slot let go", function()
    local src, dst, slot = setup("b52b")
    local path = C.script(dst, PLAIN:format(slot, "a"))
    local p = C.start(path, src, { "--stats-interval", "3600" })
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO items VALUES (1)", src)
    assert.truthy(H.eventually(function() return p.stdout():find("a 1\n", 1, true) end, 10), p.stderr())
    local k = 1
    for round = 1, 2 do
      rewrite(path, dst, NONE)
      p.kill("HUP")
      reloaded(p, 2 * round - 1)
      k = k + 1
      C.sql(("INSERT INTO items VALUES (%d)"):format(k), src)
      rewrite(path, dst, PLAIN:format(slot, "a"))
      p.kill("HUP")
      reloaded(p, 2 * round)
      k = k + 1
      C.sql(("INSERT INTO items VALUES (%d)"):format(k), src)
    end
    assert.truthy(H.eventually(function() return p.stdout():find("a " .. k .. "\n", 1, true) end, 15),
      p.stdout() .. p.stderr())
    assert.same({ 1, 2, 3, 4, 5 }, ids(p.stdout(), "a"), p.stdout())
    -- the stream lost, and a reload to none before it streams again
    C.sql(("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot))
    rewrite(path, dst, NONE)
    p.kill("HUP")
    reloaded(p, 5)
    C.sql("INSERT INTO items VALUES (6)", src)
    H.sleep(1.5)
    assert.truthy(inactive(slot), p.stderr())
    assert.same({ 1, 2, 3, 4, 5 }, ids(p.stdout(), "a"), p.stdout())
    rewrite(path, dst, PLAIN:format(slot, "a"))
    p.kill("HUP")
    reloaded(p, 6)
    assert.truthy(H.eventually(function() return p.stdout():find("a 6\n", 1, true) end, 10),
      p.stdout() .. p.stderr())
    assert.same({ 1, 2, 3, 4, 5, 6 }, ids(p.stdout(), "a"), p.stdout())
    p.kill("TERM")
    assert.equal(0, p.wait(10), p.stderr())
  end)
  -- Apply:deliver (the snapshot's rows) handles signals between its jobs,
  -- so the reload runs M:retire in the middle of the snapshot: the stream
  -- and the plain connection are closed and self.cfg is nil under the
  -- snapshot's feet; its next page (start.lua: self.cfg.slot) kills the
  -- runner ("fatal: ... attempt to index a nil value (field 'cfg')").
  it("BREAK: during the initial snapshot: the runner lives on, the slot is let go; back, every row is there",
    function()
    local src, dst, slot = C.setup("b52c")
    local rc, _, ierr = H.run_runner({ "--install", "--db", "dbname=" .. src })
    assert.equal(0, rc, ierr)
    C.sql("CREATE TABLE items (id int PRIMARY KEY); INSERT INTO items SELECT generate_series(1, 3)", src)
    local snap = [[
local waited = false
return {
  replication = { slot = %q, snapshot = true },
  channels = {
    ["public.items"] = { source = "replication", handler = function(ev)
      if ev.op ~= "INSERT" then return end
      if not waited then
        waited = true
        out("waiting")
        for _ = 1, 20 do assert(target:exec("SELECT pg_sleep(0.1)")) end
      end
      out("%s", ev.new.id)
    end },
  },
}
]]
    local path = C.script(dst, snap:format(slot, "s"))
    local p = H.start(path, { "--db", "dbname=" .. src, "--stats-interval", "3600" }, nil, false)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    assert.truthy(H.eventually(function() return p.stdout():find("waiting", 1, true) end, 20), p.stderr())
    rewrite(path, dst, NONE)
    p.kill("HUP")
    reloaded(p, 1)
    H.sleep(1)
    assert.truthy(p.running(), p.stderr())
    assert.truthy(inactive(slot), p.stderr())
    C.sql("INSERT INTO items VALUES (4)", src)
    rewrite(path, dst, snap:format(slot, "s"))
    p.kill("HUP")
    reloaded(p, 2)
    assert.truthy(H.eventually(function() return p.stdout():find("s 4\n", 1, true) end, 10),
      p.stdout() .. p.stderr())
    H.sleep(0.3)
    local seen = {}
    for _, id in ipairs(ids(p.stdout(), "s")) do seen[id] = true end
    assert.same({ true, true, true, true }, seen, p.stdout())
    p.kill("TERM")
    assert.equal(0, p.wait(10), p.stderr())
  end)
end)
