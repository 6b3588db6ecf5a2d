-- Breaking 410bf8a: `queued` counts only served changes (reroute moves the
-- count), a status update every STATUS_MIN while anything is queued, and a
-- reload to a script with no `replication` table (since the fix of the
-- breaks below: the runner stops streaming the slot, which keeps what was
-- not handled; nothing is skipped).  BREAK
-- tests fail on the commit they name; GUARD tests pass and would fail if
-- their promise broke.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"
local ids, last_stats = C.ids, C.last_stats

-- asks for a stats line and returns it (the n-th one, n counted before)
local function stats_now(p)
  local n = H.count_matches(p.stderr(), "replication stats")
  p.kill("USR1")
  assert.truthy(H.eventually(function() return H.count_matches(p.stderr(), "replication stats") > n end, 5),
    p.stderr())
  return last_stats(p.stderr())
end

local function confirmed_past(slot, lsn)
  return C.sql(("SELECT confirmed_flush_lsn >= '%s' FROM pg_replication_slots WHERE slot_name = '%s'")
    :format(lsn, slot)) == "t"
end

-- the distinct reply_time values the slot's walsender shows over `secs`;
-- with `idle`, only those whose update reported no new flush position (a
-- runner confirms the walEnd of keepalives that WAL of other databases
-- brings, as the suite's other specs write: those are not idle updates)
local function replies(slot, secs, idle)
  local last, flush, n = nil, nil, 0
  local q = ("SELECT coalesce(r.reply_time::text, '-') || '|' || coalesce(r.flush_lsn::text, '-') "
    .. "FROM pg_stat_replication r JOIN pg_replication_slots s "
    .. "ON s.active_pid = r.pid WHERE s.slot_name = '%s'"):format(slot)
  H.eventually(function()
    local v = C.sql(q)
    local t, f = v:match("^(.*)|(.*)$")
    if t and t ~= last then
      if last and (not idle or f == flush) then n = n + 1 end
      if not last and not idle then n = n + 1 end
      last, flush = t, f
    elseif t then
      flush = f
    end
    return false
  end, secs, 0.05)
  return n
end

local SERVED = [[
local waited = false
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", handler = function(ev)
      if not waited then
        waited = true
        out("waiting")
        for _ = 1, 10 do assert(target:exec("SELECT pg_sleep(0.1)")) end
      end
      out("%s", ev.new.id)
    end },
  },
}
]]

local NONE = [[
return { channels = { other = { handler = function() end } } }
]]

local rewrite, reloaded = C.rewrite, C.reloaded

local function setup(prefix)
  local src, dst, slot = C.setup(prefix)
  C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
  C.slot_first(src, slot, "items")
  return src, dst, slot
end

describe("410bf8a: a reload to a script with no replication table", function()
  it("GUARD: away and back: the slot is let go and keeps the changes, the same slot serves them again, in order",
    function()
    local src, dst, slot = setup("b51ab")
    local path = C.script(dst, SERVED:format(slot, "items"))
    local p = C.start(path, src, { "--stats-interval", "3600" })
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO items VALUES (1)", src)
    assert.truthy(H.eventually(function() return p.stdout():find("waiting", 1, true) end, 10), p.stderr())
    for i = 2, 4 do C.sql(("INSERT INTO items VALUES (%d)"):format(i), src) end
    C.wait_sent({ slot })
    H.sleep(0.3) -- read ahead during the wait
    rewrite(path, dst, NONE)
    p.kill("HUP")
    reloaded(p, 1)
    assert.truthy(H.eventually(function() return p.stdout():find("items 1\n", 1, true) end, 10), p.stdout())
    -- the slot is let go, and what was not handled stays in it
    assert.truthy(H.eventually(function()
      return C.sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s' AND active"):format(slot)) == "0"
    end, 10), p.stderr())
    C.sql("INSERT INTO items VALUES (5)", src)
    local lsn = C.sql("SELECT pg_current_wal_insert_lsn()", src) -- past the insert (commits are asynchronous here)
    H.sleep(1.5)
    assert.is_false(confirmed_past(slot, lsn), C.confirmed(slot) .. " >= " .. lsn)
    -- back to a replication script: the same slot streams 2..5 and what follows to the new handler
    rewrite(path, dst, SERVED:format(slot, "back"))
    p.kill("HUP")
    reloaded(p, 2)
    C.sql("INSERT INTO items VALUES (6)", src)
    assert.truthy(H.eventually(function() return p.stdout():find("back 6\n", 1, true) end, 10),
      p.stdout() .. p.stderr())
    assert.same({ 1 }, ids(p.stdout(), "items"), p.stdout())
    assert.same({ 2, 3, 4, 5, 6 }, ids(p.stdout(), "back"), p.stdout())
    local s = stats_now(p)
    assert.equal(s.received - s.handled, s.queued, s.line)
    assert.equal(0, s.unrouted, s.line)
    p.kill("TERM")
    assert.equal(0, p.wait(10), p.stderr())
    assert.equal("0", C.sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s' AND active")
      :format(slot)))
    assert.equal(1, H.count_matches(p.stderr(), "no channel streams from the replication slot"), p.stderr())
  end)

  it("GUARD: with no channel, SIGTERM stops cleanly, releases the slot; --drop-slot needs the old script", function()
    local src, dst, slot = setup("b51term")
    local path = C.script(dst, SERVED:format(slot, "items"))
    local p = C.start(path, src, { "--stats-interval", "3600" })
    H.finally(function() C.cleanup({ p }, src, slot) end)
    rewrite(path, dst, NONE)
    p.kill("HUP")
    reloaded(p, 1)
    C.sql("INSERT INTO items VALUES (1)", src)
    local lsn = C.sql("SELECT pg_current_wal_insert_lsn()", src) -- past the insert (commits are asynchronous here)
    H.sleep(1.2) -- a status update would have confirmed it by now
    assert.is_false(confirmed_past(slot, lsn), C.confirmed(slot) .. " >= " .. lsn) -- kept, not skipped
    p.kill("TERM")
    assert.equal(0, p.wait(10), p.stderr())
    assert.equal("0", C.sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s' AND active")
      :format(slot)))
    assert.same({}, ids(p.stdout(), "items"))
    -- --drop-slot: the script with no replication table has no slot to name; the old one drops it
    local rc, _, err = H.run_runner({ "--drop-slot", "--db", "dbname=" .. src, path })
    assert.equal(2, rc, err)
    assert.matches("no slot to drop", err, 1, true)
    rewrite(path, dst, SERVED:format(slot, "items"))
    rc, _, err = H.run_runner({ "--drop-slot", "--db", "dbname=" .. src, path })
    assert.equal(0, rc, err)
    assert.equal("0", C.sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot)))
  end)
end)

describe("410bf8a: status updates", function()
  it("GUARD: an idle runner sends no status update every second", function()
    local src, dst, slot = setup("b51idle")
    local path = C.script(dst, SERVED:format(slot, "items"))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO items VALUES (1)", src)
    assert.truthy(H.eventually(function() return p.stdout():find("items 1\n", 1, true) end, 10), p.stderr())
    H.sleep(1.2) -- the flush position reported
    local n = replies(slot, 3.5, true)
    assert.is_true(n <= 2, n .. " status updates with no new position in 3.5 s idle")
  end)

  it("GUARD: while a handler is blocked retrying, status updates go out but the flush never passes it", function()
    local src, dst, slot = setup("b51blk")
    local path = C.script(dst, ([[
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", retry = { attempts = 1000, backoff = 0.2 },
      handler = function(ev)
        if ev.new.id == 2 then error("no 2 today") end
        out("items", ev.new.id)
      end },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO items VALUES (1)", src)
    assert.truthy(H.eventually(function() return p.stdout():find("items 1\n", 1, true) end, 10), p.stderr())
    local before = C.sql("SELECT pg_current_wal_insert_lsn()", src)
    C.sql("INSERT INTO items VALUES (2)", src)
    C.sql("INSERT INTO items VALUES (3)", src)
    assert.truthy(H.eventually(function() return p.stderr():find("no 2 today", 1, true) end, 10), p.stderr())
    -- other WAL meanwhile (keepalives with a later walEnd)
    local other = H.createdb("b51o")
    C.sql("CREATE TABLE w (id int)", other)
    local n = replies(slot, 2.5)
    for i = 1, 5 do C.sql(("INSERT INTO w VALUES (%d)"):format(i), other) end
    n = n + replies(slot, 1.5)
    assert.is_true(n >= 2, n .. " status updates while blocked")
    assert.equal("t", C.sql(("SELECT confirmed_flush_lsn <= '%s' FROM pg_replication_slots WHERE slot_name = '%s'")
      :format(before, slot)), C.confirmed(slot) .. " > " .. before)
    assert.same({ 1 }, ids(p.stdout(), "items"))
  end)
end)

describe("410bf8a: more reloads", function()
  -- BREAK (410bf8a).  A reload to a script with no `replication` table
  -- keeps the source trying for the slot with no channel: a runner that
  -- stood by takes the slot over when the one serving it goes, and then
  -- confirms every change as skipped while a runner that serves the slot
  -- (restarted) stands by behind it.  Before 410bf8a the standby kept its
  -- old channels; a runner with no replication channel should never take a
  -- slot over.
  it("BREAK: a standby reloaded to no replication table does not take the slot over and skip its changes",
    function()
    local src, dst, slot = setup("b51sb")
    local path_a = C.script(dst, SERVED:format(slot, "a"))
    local a = C.start(path_a, src)
    local path_b = C.script(dst, SERVED:format(slot, "b"))
    local b = C.start(path_b, src, nil, "standing by")
    local a2
    H.finally(function() C.cleanup({ a, b, a2 or a }, src, slot) end)
    rewrite(path_b, dst, NONE)
    b.kill("HUP")
    reloaded(b, 1)
    a.kill("KILL")
    a.wait(5)
    -- a runner with no channel gets a second or two to take it over (it does on 410bf8a)
    H.eventually(function() return b.stderr():find("took over", 1, true) end, 3)
    a2 = C.start(path_a, src, nil, "st") -- streaming, or standing by
    for i = 1, 3 do C.sql(("INSERT INTO items VALUES (%d)"):format(i), src) end
    assert.truthy(H.eventually(function() return a2.stdout():find("a 3\n", 1, true) end, 6),
      "the serving runner got: " .. a2.stdout() .. "\nno-channel runner:\n" .. b.stderr())
  end)

  -- BREAK (410bf8a).  The reload restreams (a job is pending): apply:reset
  -- drops the queued changes, which `received` counted as served; they come
  -- again as skipped (unrouted) but `received` still counts them:
  -- received=3 handled=1 queued=0 unrouted=2, nothing pending or failed for
  -- good.  (reroute, the other reload path, moves the count.)
  it("BREAK: a reload to no replication table while a handler is blocked: received - handled = queued after",
    function()
    local src, dst, slot = setup("b51rb")
    local path = C.script(dst, ([[
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", retry = { attempts = 1000, backoff = 0.2 },
      handler = function(ev)
        if ev.new.id == 2 then error("no 2 today") end
        out("items", ev.new.id)
      end },
  },
}
]]):format(slot))
    local p = C.start(path, src, { "--stats-interval", "3600" })
    H.finally(function() C.cleanup({ p }, src, slot) end)
    for i = 1, 3 do C.sql(("INSERT INTO items VALUES (%d)"):format(i), src) end
    assert.truthy(H.eventually(function() return p.stderr():find("no 2 today", 1, true) end, 10), p.stderr())
    rewrite(path, dst, NONE)
    p.kill("HUP")
    reloaded(p, 1)
    local lsn = C.sql("SELECT pg_current_wal_insert_lsn()", src) -- past the insert (commits are asynchronous here)
    H.sleep(1.2)
    assert.is_false(confirmed_past(slot, lsn), C.confirmed(slot) .. " >= " .. lsn) -- 2 failed: kept
    -- the source is gone (no replication stats line): the runner's own line
    -- counts 1 received, 1 handled (2 and 3 come again when a script serves the slot)
    local n = H.count_matches(p.stderr(), "INFO  stats ")
    p.kill("USR1")
    assert.truthy(H.eventually(function() return H.count_matches(p.stderr(), "INFO  stats ") > n end, 5), p.stderr())
    local l = p.stderr():match(".*\n([^\n]*INFO  stats [^\n]*)")
    assert.equal(l:match(" handled=(%d+)"), l:match(" received=(%d+)"), l)
    assert.same({ 1 }, ids(p.stdout(), "items"))
  end)

  -- GUARD.  A reload that gives a channel to changes queued as skipped
  -- during a wait, then SIGTERM during the next wait: queued (served only)
  -- is received - handled, and the skipped ones that got a channel count
  -- as received, not unrouted.
  it("GUARD: a HUP serving skipped changes read ahead, then SIGTERM: received - handled = queued", function()
    local src, dst, slot = C.setup("b51add")
    C.sql("CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE extra (id int PRIMARY KEY)", src)
    C.sql(("SELECT pg_create_logical_replication_slot('%s', 'pgoutput')"):format(slot), src)
    C.sql(("CREATE PUBLICATION %s FOR TABLE items, extra"):format(slot), src)
    local path = C.script(dst, SERVED:format(slot, "items"))
    local p = C.start(path, src, { "--stats-interval", "3600" })
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO items VALUES (1)", src)
    assert.truthy(H.eventually(function() return p.stdout():find("waiting", 1, true) end, 10), p.stderr())
    C.sql("DO $$ BEGIN FOR i IN 1..5 LOOP INSERT INTO extra VALUES (i); COMMIT; END LOOP; END $$", src)
    C.sql("INSERT INTO items VALUES (2)", src)
    C.wait_sent({ slot })
    H.sleep(0.3)
    -- the new script serves extra too, and waits again on its first change
    rewrite(path, dst, (SERVED:format(slot, "items"):gsub("  },\n}\n$", [[
    ["public.extra"] = { source = "replication", handler = function(ev)
      out("extra", ev.new.id)
      if ev.new.id == 1 then for _ = 1, 20 do assert(target:exec("SELECT pg_sleep(0.1)")) end end
    end },
  },
}
]])))
    p.kill("HUP")
    assert.truthy(H.eventually(function() return p.stdout():find("extra 1\n", 1, true) end, 10),
      p.stdout() .. p.stderr())
    H.sleep(0.2)
    p.kill("TERM")
    assert.equal(0, p.wait(10), p.stderr())
    local s = last_stats(p.stderr())
    assert.equal(0, s.unrouted, s.line)
    assert.is_true(s.queued >= 1, s.line)
    assert.equal(s.received - s.handled, s.queued, s.line)
  end)
end)
