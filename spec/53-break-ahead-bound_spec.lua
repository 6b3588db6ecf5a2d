-- Breaking 92a84a9 (the read ahead counts the served events queued behind
-- the job in flight against max(M.AHEAD, the largest batch), within the
-- queue's cap of settings.read_ahead items).  BREAK tests fail on 92a84a9;
-- GUARD tests pass there and would fail if the promise they hold broke.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"
local ids = C.ids

-- Script prelude: the queue's largest size (items, served events) seen by
-- the source's room checks (Apply:behind, before every read), through the
-- Apply module the runner uses (its methods are looked up through the
-- metatable).
local PROBE = [[
local Apply = require "pglisten.replication.apply"
local maxlen, maxev = 0, 0
local behind = Apply.behind
assert(behind, "Apply.behind: the room checks changed; the probe must follow them")
Apply.behind = function(self)
  local n = self:len()
  if n > maxlen then maxlen = n end
  if self.events > maxev then maxev = self.events end
  return behind(self)
end
local function probe() return ("probe len=%d events=%d"):format(maxlen, maxev) end
]]

local vm = C.vm

-- Starts a runner on a C.script: `prelude` (Lua text before the script's
-- return), then the channels (the entries of its channels table).
local function run(src, dst, slot, prelude, channels, args)
  return C.run_script(src, dst, slot, channels, { prelude = prelude, args = args })
end

local function last_probe(stdout)
  local l, e
  for a, b in stdout:gmatch("probe len=(%d+) events=(%d+)") do l, e = tonumber(a), tonumber(b) end
  return l, e
end

-- the ids of "id N" lines, strictly increasing (each once, in commit order)?
local increasing = C.increasing

describe("92a84a9: the read-ahead bound", function()
  -- BREAK (fails on 92a84a9; its parent holds it: 768 items at most).  The
  -- bound counts only served events, so changes of a published table no
  -- channel serves (Apply.SKIP) are read ahead without limit up to the
  -- queue's cap: a batch = 1 handler waiting on its target holds ~10,000
  -- decoded changes, none of which fills any batch, where README's bound
  -- ("until the events queued behind the batch in flight would fill the
  -- largest batch, at least 512") and the parent's read ahead hold 512 (and
  -- one read).  With 20 KB values the runner's RSS goes from ~10 MB to
  -- ~210 MB (100 KB values: ~1 GB) while one handler waits.
  it("BREAK: a flood of unserved changes while a handler waits is read ahead within the bound (512, one read)",
    function()
    local src, dst, slot = C.setup("rbsk")
    C.sql("CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE noise (id int PRIMARY KEY, v text)", src)
    C.sql("CREATE TABLE items (id int PRIMARY KEY); CREATE TABLE gate (id int)", dst)
    C.slot_first(src, slot, "items, noise")
    local p = run(src, dst, slot, PROBE, [[
    ["public.items"] = { source = "replication", handler = function(ev)
      if ev.new.id == 0 then
        out("waiting")
        repeat
          local r = assert(target:exec("SELECT count(*) AS n FROM gate, pg_sleep(0.05)"))
          out(probe())
        until r[1].n > 0
      end
      assert(target:exec("INSERT INTO items VALUES ($1) ON CONFLICT DO NOTHING", ev.new.id))
      out("id " .. ev.new.id)
    end },]])
    local rss0 = vm(p, "VmRSS")
    C.sql("INSERT INTO items VALUES (0)", src)
    assert.truthy(H.eventually(function() return p.stdout():find("waiting", 1, true) end, 10), p.stderr())
    for k = 0, 2 do
      C.sql(("INSERT INTO noise SELECT g, repeat('x', 20000) FROM generate_series(%d, %d) g")
        :format(k * 4000 + 1, k * 4000 + 4000), src)
    end
    C.sql("INSERT INTO items SELECT g FROM generate_series(1, 100) g", src)
    C.wait_sent({ slot }, 10)
    H.eventually(function() return (last_probe(p.stdout()) or 0) >= 10000 end, 5)
    local len, ev = last_probe(p.stdout())
    local rss1 = vm(p, "VmRSS")
    C.sql("INSERT INTO gate VALUES (1)", dst)
    assert.truthy(C.same(src, dst, "items", 30), p.stderr())
    local ok, got, why = increasing(p.stdout())
    assert.truthy(ok, why)
    assert.equal(101, #got)
    p.kill("USR1")
    assert.truthy(H.eventually(function()
      if not p.stderr():find("replication stats", 1, true) then return false end
      local f = C.last_stats(p.stderr())
      return f.unrouted == 12000 and f.handled == 101
    end, 10), p.stderr())
    print(("\n  unserved flood during one wait: queue %d items (%d served events); RSS %d kB -> %d kB"):format(
      len, ev, rss0, rss1))
    -- changes behind the one in flight: under 512, then one read (256
    -- messages); items also count that one and the commits (5 transactions)
    assert.is_true(len <= 512 + 256 + 1 + 5, ("read ahead %d items (%d served events) during one handler's wait, "
      .. "RSS %d kB -> %d kB: the bound is 512 changes and one read"):format(len, ev, rss0, rss1))
  end)

  -- BREAK (fails on 92a84a9).  README: "the next batch is decoded, whole,
  -- while the target executes this one".  With wide rows (20 KB) a socket
  -- buffer holds ~100 changes: the wait hook's first read takes them,
  -- returns fewer than M.READ messages, so read_ahead says "no more" and
  -- nothing else is read for the rest of the wait (the walsender refills
  -- the socket meanwhile, unread).  A batch = 1000 handler from a 3,000-row
  -- backlog gets batches of ~100 instead of 1000 (spec 48's test of the
  -- same promise uses 4-byte rows).
  it("BREAK: with 20 KB rows the read ahead fills the next batch whole while the target executes this one", function()
    local src, dst, slot = C.setup("rbfat")
    C.sql("CREATE TABLE items (id int PRIMARY KEY, v text)", src)
    C.sql("CREATE TABLE items (id int PRIMARY KEY, n int)", dst)
    C.slot_first(src, slot, "items")
    for k = 0, 2 do
      C.sql(("INSERT INTO items SELECT g, repeat('y', 20000) FROM generate_series(%d, %d) g")
        :format(k * 1000 + 1, k * 1000 + 1000), src)
    end
    local p = run(src, dst, slot, "", [[
    ["public.items"] = { source = "replication", batch = 1000, handler = function(evs)
      local rows = {}
      for i, ev in ipairs(evs) do rows[i] = { ev.new.id, #ev.new.v } end
      assert(target:exec("SELECT pg_sleep(0.3)")) -- the target at work: the runner reads on
      assert(target:execmany("INSERT INTO items VALUES ($1, $2) ON CONFLICT (id) DO NOTHING", rows))
      out("batch " .. #evs)
    end },]])
    assert.truthy(H.eventually(function()
      return C.sql("SELECT count(*) || ':' || coalesce(sum(n), 0) FROM items", dst) == "3000:60000000"
    end, 40, 0.2), p.stderr())
    local sizes, total = ids(p.stdout(), "batch"), 0
    for _, n in ipairs(sizes) do total = total + n end
    assert.equal(3000, total, table.concat(sizes, " "))
    print(("\n  batch = 1000, 20 KB rows: batches %s"):format(table.concat(sizes, " ")))
    for i = 2, #sizes - 1 do
      assert.equal(1000, sizes[i], "batches: " .. table.concat(sizes, " "))
    end
  end)

  -- GUARD.  A batch far above the queue's cap (batch = 50000) from a
  -- backlog: behind the batch in flight the queue stays within
  -- settings.read_ahead items and one read (so the whole queue within twice
  -- that), every row once, batches as large as the cap allows.
  it("GUARD: batch = 50000 stays within the 10,000-item cap behind the batch in flight (and one read)", function()
    local src, dst, slot = C.setup("rbwide")
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", dst)
    C.slot_first(src, slot, "items")
    C.sql("INSERT INTO items SELECT g FROM generate_series(1, 30000) g", src)
    local p = run(src, dst, slot, PROBE, [[
    ["public.items"] = { source = "replication", batch = 50000, handler = function(evs)
      local rows = {}
      for i, ev in ipairs(evs) do rows[i] = { ev.new.id } end
      assert(target:exec("SELECT pg_sleep(0.3)"))
      assert(target:execmany("INSERT INTO items VALUES ($1) ON CONFLICT (id) DO NOTHING", rows))
      out("batch " .. #evs)
      out("first " .. evs[1].new.id)
      out(probe())
    end },]])
    assert.truthy(C.same(src, dst, "items", 40), p.stderr())
    local ok, firsts = increasing(p.stdout(), "first")
    assert.truthy(ok, p.stdout())
    local sizes, total = ids(p.stdout(), "batch"), 0
    for _, n in ipairs(sizes) do total = total + n end
    assert.equal(30000, total, table.concat(sizes, " "))
    local len, ev = last_probe(p.stdout())
    local hwm = vm(p, "VmHWM")
    print(("\n  batch = 50000, 30,000-row backlog: batches %s; queue at most %d items (%d events); peak RSS %d kB")
      :format(table.concat(sizes, " "), len, ev, hwm))
    assert.is_true(len <= 2 * (10000 + 256), "queue " .. len)
    assert.is_true(#firsts == #sizes)
  end)

  -- GUARD.  Two channels, batch = 1 (slow) and batch = 3000, interleaved in
  -- the same transactions, from a backlog and live: every change handled
  -- once, in commit order (ids are given in that order across both tables).
  it("GUARD: batch = 1 and batch = 3000 channels interleaved in transactions keep commit order", function()
    local src, dst, slot = C.setup("rbmix")
    local ddl = "CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)"
    C.sql(ddl, src)
    C.sql(ddl, dst)
    C.slot_first(src, slot, "a, b")
    local function txns(from, k)
      for t = from, from + k - 1 do
        local base = t * 10000
        C.sql(("BEGIN; INSERT INTO a VALUES (%d); INSERT INTO b SELECT g FROM generate_series(%d, %d) g; "
          .. "INSERT INTO a VALUES (%d); INSERT INTO b SELECT g FROM generate_series(%d, %d) g; "
          .. "INSERT INTO a VALUES (%d); COMMIT"):format(base + 1, base + 2, base + 2001, base + 2002,
          base + 2003, base + 4500, base + 4501), src)
      end
    end
    txns(1, 3) -- a backlog
    local p = run(src, dst, slot, "", [[
    ["public.a"] = { source = "replication", handler = function(ev)
      assert(target:exec("INSERT INTO a SELECT $1 FROM pg_sleep(0.05) ON CONFLICT DO NOTHING", ev.new.id))
      out("id " .. ev.new.id)
    end },
    ["public.b"] = { source = "replication", batch = 3000, handler = function(evs)
      local rows = {}
      for i, ev in ipairs(evs) do rows[i] = { ev.new.id } end
      assert(target:exec("SELECT pg_sleep(0.1)"))
      assert(target:execmany("INSERT INTO b VALUES ($1) ON CONFLICT DO NOTHING", rows))
      for _, ev in ipairs(evs) do out("id " .. ev.new.id) end
      out("batch " .. #evs)
    end },]])
    txns(4, 3) -- live, while the handlers wait
    assert.truthy(C.same(src, dst, "a", 40), p.stderr())
    assert.truthy(C.same(src, dst, "b", 20), p.stderr())
    local ok, got, why = increasing(p.stdout())
    assert.truthy(ok, why)
    assert.equal(6 * 4501, #got)
    print(("\n  interleaved: b's batches %s"):format(table.concat(ids(p.stdout(), "batch"), " ")))
    assert.is_nil(p.stderr():find("handler failed", 1, true), p.stderr())
  end)

  -- GUARD.  HUPs while the stream is read ahead change the largest batch:
  -- 1 -> 3000 (the next batches fill to 3000, which 512 could not), then
  -- 3000 -> none (one event a call).  Every change once, in order.
  it("GUARD: a HUP that changes the batch size while a handler waits: new bound, nothing lost, in order", function()
    local src, dst, slot = C.setup("rbhup")
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
    C.sql("CREATE TABLE gate (id int)", dst)
    C.slot_first(src, slot, "items")
    local V1 = [[
    ["public.items"] = { source = "replication", handler = function(ev)
      if ev.new.id == 0 then
        out("waiting")
        repeat
          local r = assert(target:exec("SELECT count(*) AS n FROM gate, pg_sleep(0.05)"))
        until r[1].n > 0
      end
      out("id " .. ev.new.id)
    end },]]
    local V2 = [[
    ["public.items"] = { source = "replication", batch = 3000, handler = function(evs)
      out("v2 " .. #evs)
      assert(target:exec("SELECT pg_sleep(0.3)"))
      for _, ev in ipairs(evs) do out("id " .. ev.new.id) end
    end },]]
    local V3 = [[
    ["public.items"] = { source = "replication", handler = function(ev)
      assert(target:exec("SELECT 1"))
      out("id " .. ev.new.id)
    end },]]
    local function body(ch)
      return ("return {\n  replication = { slot = %q },\n  channels = {\n%s\n  },\n}\n"):format(slot, ch)
    end
    C.sql("INSERT INTO items VALUES (0)", src)
    for k = 0, 9 do
      C.sql(("INSERT INTO items SELECT g FROM generate_series(%d, %d) g"):format(k * 1000 + 1, k * 1000 + 1000), src)
    end
    local p, path = run(src, dst, slot, "", V1)
    assert.truthy(H.eventually(function() return p.stdout():find("waiting", 1, true) end, 10), p.stderr())
    H.sleep(0.5) -- read ahead meanwhile
    C.rewrite(path, dst, body(V2))
    p.kill("HUP")
    C.sql("INSERT INTO gate VALUES (1)", dst)
    C.reloaded(p, 1)
    assert.truthy(H.eventually(function() return #ids(p.stdout(), "v2") >= 3 end, 20), p.stdout() .. p.stderr())
    C.rewrite(path, dst, body(V3))
    p.kill("HUP")
    C.reloaded(p, 2)
    for k = 10, 11 do
      C.sql(("INSERT INTO items SELECT g FROM generate_series(%d, %d) g"):format(k * 1000 + 1, k * 1000 + 1000), src)
    end
    assert.truthy(H.eventually(function() return #ids(p.stdout(), "id") >= 12001 end, 30), p.stderr())
    H.sleep(0.3)
    local ok, got, why = increasing(p.stdout())
    assert.truthy(ok, why)
    assert.equal(12001, #got)
    local v2 = ids(p.stdout(), "v2")
    local max = 0
    for _, n in ipairs(v2) do max = math.max(max, n) end
    print(("\n  batches after the HUP to batch = 3000: %s"):format(table.concat(v2, " ")))
    assert.equal(3000, max, "v2 batches: " .. table.concat(v2, " "))
  end)

  -- GUARD.  A backlog of big batches (batch = 3000, read ahead meanwhile):
  -- the walsender terminated, the target's backend terminated, the runner
  -- killed (SIGKILL) mid-batch and started again, rows updated meanwhile:
  -- the target equals the source (idempotent upserts: at least once).
  it("GUARD: walsender and target backend terminated, runner SIGKILLed mid-batch: the target equals the source",
    function()
    local src, dst, slot = C.setup("rbkill")
    C.sql("CREATE TABLE items (id int PRIMARY KEY, v text)", src)
    C.sql("CREATE TABLE items (id int PRIMARY KEY, v text)", dst)
    C.slot_first(src, slot, "items")
    for k = 0, 3 do
      C.sql(("INSERT INTO items SELECT g, repeat(md5(g::text), 30) FROM generate_series(%d, %d) g")
        :format(k * 5000 + 1, k * 5000 + 5000), src)
    end
    local path = C.script(dst, ([[
local tgt
return {
  replication = { slot = %q },
  channels = {
    ["public.items"] = { source = "replication", batch = 3000,
      retry = { attempts = 1000, backoff = 0.1, max_backoff = 0.3 },
      handler = function(evs)
        local rows = {}
        for _, ev in ipairs(evs) do if ev.new then rows[#rows + 1] = { ev.new.id, ev.new.v } end end
        tgt = tgt or assert(pglisten.connect(TARGET))
        local ok, err = tgt:exec("SELECT pg_sleep(0.3)")
        if ok and #rows > 0 then
          ok, err = tgt:execmany("INSERT INTO items VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v",
            rows)
        end
        if not ok then tgt = nil; error(err) end
        out("batch " .. #evs)
      end },
  },
}
]]):format(slot))
    local procs = {}
    H.finally(function() C.cleanup(procs, src, slot) end)
    procs[1] = C.start(path, src)
    local p = procs[1]
    local function batches(q) return #ids(q.stdout(), "batch") end
    assert.truthy(H.eventually(function() return batches(p) >= 1 end, 20), p.stderr())
    C.sql(("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot))
    assert.truthy(H.eventually(function() return batches(p) >= 3 end, 20), p.stderr())
    C.sql(("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '%s' AND pid <> pg_backend_pid()")
      :format(dst))
    C.sql("UPDATE items SET v = 'u' || id WHERE id % 7 = 0", src)
    assert.truthy(H.eventually(function() return batches(p) >= 5 end, 20), p.stderr())
    p.kill("KILL")
    p.wait(10)
    C.sql("UPDATE items SET v = 'w' || id WHERE id % 5 = 0; DELETE FROM items WHERE id % 11 = 0", src)
    C.sql("INSERT INTO items SELECT g, 'n' FROM generate_series(20001, 23000) g", src)
    -- deletes: the handler upserts only; the target drops them by hand below
    procs[2] = C.start(path, src)
    local ok = H.eventually(function()
      return C.sql("SELECT count(*) FROM items", dst) == "23000"
        and C.sql("SELECT count(*) FROM items WHERE id <= 20000 AND id % 5 = 0 AND id % 11 <> 0 AND v <> 'w' || id",
          dst) == "0"
    end, 40, 0.2)
    assert.truthy(ok, C.sql("SELECT count(*) || ' rows, ' || count(*) FILTER (WHERE id % 5 = 0 AND id % 11 <> 0 "
      .. "AND v <> 'w' || id) || ' stale' FROM items", dst) .. "\n" .. procs[2].stdout():sub(-300) .. procs[2].stderr())
    C.sql("DELETE FROM items WHERE id % 11 = 0 AND id <= 20000", dst)
    assert.truthy(C.same(src, dst, "items", 5), procs[1].stderr() .. procs[2].stderr())
    print(("\n  lost/reconnects: %d stream(s) lost; batches before the kill %d, after %d"):format(
      H.count_matches(p.stderr(), "replication stream lost"), batches(p), batches(procs[2])))
  end)

  -- GUARD.  A batch that keeps failing after waiting on its target (read
  -- ahead meanwhile), retried and then buried (on_failure = "dead"): its
  -- events, exactly those of the failed job, go to pglisten.dead; every
  -- other change is handled once, in order.
  it('GUARD: a failing batch retried while reading ahead, then on_failure = "dead": nothing else lost, in order',
    function()
    local src, dst, slot = C.setup("rbdead")
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", dst)
    local rc, _, ierr = H.run_runner({ "--install", "--db", "dbname=" .. src })
    assert.equal(0, rc, ierr)
    C.slot_first(src, slot, "items")
    for k = 0, 4 do
      C.sql(("INSERT INTO items SELECT g FROM generate_series(%d, %d) g"):format(k * 1000 + 1, k * 1000 + 1000), src)
    end
    local p = run(src, dst, slot, "", [[
    ["public.items"] = { source = "replication", batch = 600, on_failure = "dead",
      retry = { attempts = 2, backoff = 0.05 }, handler = function(evs)
      assert(target:exec("SELECT pg_sleep(0.2)"))
      local ids = {}
      for i, ev in ipairs(evs) do
        ids[i] = ev.new.id
        if ev.new.id == 2777 then out("failing " .. #evs .. " from " .. evs[1].new.id); error("no 2777") end
      end
      local rows = {}
      for i, id in ipairs(ids) do rows[i] = { id } end
      assert(target:execmany("INSERT INTO items VALUES ($1)", rows))
      for _, id in ipairs(ids) do out("id " .. id) end
    end },]])
    C.insert_commits(src, "items", 5001, 300) -- live, single-row commits
    assert.truthy(H.eventually(function()
      return tonumber(C.sql("SELECT count(*) FROM items", dst))
        + tonumber(C.sql("SELECT count(*) FROM pglisten.dead", src)) >= 5300
    end, 30, 0.2), p.stderr())
    local failing = p.stdout():match("failing (%d+) from")
    local f1, f2 = p.stdout():match("failing (%d+ from %d+)\n.-failing (%d+ from %d+)")
    assert.equal(f1, f2) -- the retry had the same events
    local dead = C.sql("SELECT count(*) || ':' || min((payload::jsonb -> 'new' ->> 'id')::int) || ':' || "
      .. "max((payload::jsonb -> 'new' ->> 'id')::int) FROM pglisten.dead", src)
    local n, lo, hi = dead:match("^(%d+):(%d+):(%d+)$")
    assert.equal(failing, n)
    assert.is_true(tonumber(lo) <= 2777 and tonumber(hi) >= 2777, dead)
    assert.equal(tostring(5300 - tonumber(n)), C.sql("SELECT count(*) FROM items", dst))
    assert.equal("0", C.sql(("SELECT count(*) FROM items WHERE id BETWEEN %s AND %s"):format(lo, hi), dst))
    local ok, got, why = increasing(p.stdout())
    assert.truthy(ok, why)
    assert.equal(5300 - tonumber(n), #got)
    print(("\n  dead: %s events (%s..%s), retried once with the same ones"):format(n, lo, hi))
  end)
end)
