-- Breaking the replication source's promises (issue 12): a LATIN1 source
-- database, a table renamed mid-stream.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"

describe("replication source, broken on purpose", function()
  it("hands a LATIN1 database's text over in UTF-8, streamed and from the snapshot alike", function()
    local src = ("lat_%d"):format(os.time() % 100000)
    H.psql(("CREATE DATABASE %s ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"):format(src))
    local dst = H.createdb("latt")
    local slot = ("cdc_lat_%d"):format(os.time() % 100000)
    C.sql("CREATE TABLE w (id int PRIMARY KEY, s text)", src)
    C.sql("CREATE TABLE w (id int PRIMARY KEY, s text)", dst)
    C.sql("INSERT INTO w VALUES (1, convert_from('\\xe9'::bytea, 'LATIN1'))", src) -- before: the snapshot
    local path = C.script(dst, ([[
return {
  replication = { slot = %q, snapshot = true },
  channels = {
    ["public.w"] = { source = "replication", handler = function(ev, note)
      if ev.op ~= "TRUNCATE" then
        local hex = ev.new.s:gsub(".", function(c) return ("%%02x"):format(c:byte()) end)
        out(ev.new.id, hex, tostring(note.snapshot))
      end
      upsert("w", ev)
    end },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO w VALUES (2, convert_from('\\xe9'::bytea, 'LATIN1'))", src)
    local ok = H.eventually(function() return #H.lines(p.stdout()) >= 2 end, 15)
    assert.is_true(ok, p.stdout() .. p.stderr())
    local lines = H.lines(p.stdout())
    assert.equal("1 c3a9 true", lines[1])
    assert.equal("2 c3a9 nil", lines[2])
    assert.equal("2", C.sql("SELECT count(*) FROM w WHERE s = 'é'", dst))
  end)

  it("says so when a served table is renamed mid-stream instead of dropping its changes in silence", function()
    local src, dst, slot = C.setup("ren")
    C.sql("CREATE TABLE r (id int PRIMARY KEY)", src)
    local p = C.run(src, dst, slot, [[
    ["public.r"] = { source = "replication", handler = function(ev) out(ev.op, ev.table, ev.new.id) end },]])
    C.sql("INSERT INTO r VALUES (1)", src)
    assert.is_true(H.eventually(function() return #H.lines(p.stdout()) >= 1 end, 15))
    C.sql("ALTER TABLE r RENAME TO r2; INSERT INTO r2 VALUES (2)", src)
    local ok = H.eventually(function() return p.stderr():find("no channel serves", 1, true) end, 15)
    assert.is_truthy(ok, p.stderr())
    assert.truthy(p.stderr():find("public.r2", 1, true))
  end)

  it("says at ERROR that a slot dropped by hand while streaming lost the changes in between", function()
    local src, dst, slot = C.setup("gone")
    C.sql("CREATE TABLE g (id int PRIMARY KEY)", src)
    local p = C.run(src, dst, slot, [[
    ["public.g"] = { source = "replication", handler = function(ev) out(ev.op, ev.new.id) end },]])
    C.sql("INSERT INTO g VALUES (1)", src)
    assert.is_true(H.eventually(function() return #H.lines(p.stdout()) >= 1 end, 15))
    -- the walsender killed and the slot dropped while the runner is stopped
    p.kill("STOP")
    local ok, err = pcall(C.sql, ([[
DO $$ DECLARE p int; BEGIN
  SELECT active_pid INTO p FROM pg_replication_slots WHERE slot_name = '%s';
  IF p IS NOT NULL THEN PERFORM pg_terminate_backend(p, 5000); END IF;
  PERFORM pg_drop_replication_slot('%s');
END $$]]):format(slot, slot))
    p.kill("CONT")
    assert.is_true(ok, tostring(err))
    assert.is_truthy(H.eventually(function() return p.stderr():find("slot disappeared", 1, true) end, 15),
      p.stderr())
    C.sql("INSERT INTO g VALUES (2)", src)
    assert.is_true(H.eventually(function() return #H.lines(p.stdout()) >= 2 end, 15), p.stderr())
  end)

  it("a standby takes the slot of a SIGSTOPped runner once wal_sender_timeout ends its walsender", function()
    local src, dst, slot = C.setup("stop")
    C.sql("CREATE TABLE s (id int PRIMARY KEY)", src)
    local path = C.script(dst, ([[
return {
  replication = { slot = %q },
  channels = {
    ["public.s"] = { source = "replication", handler = function(ev) out(ev.new.id) end },
  },
}
]]):format(slot))
    local db = src .. " options=-cwal_sender_timeout=3s"
    local a = C.start(path, db)
    local procs = { a }
    H.finally(function()
      a.kill("CONT")
      C.cleanup(procs, src, slot)
    end)
    local b = C.start(path, db, nil, "standing by")
    procs[2] = b
    C.sql("INSERT INTO s VALUES (1)", src)
    assert.is_true(H.eventually(function() return #H.lines(a.stdout()) >= 1 end, 15))
    a.kill("STOP")
    local t0 = H.now()
    C.sql("INSERT INTO s VALUES (2)", src)
    assert.truthy(H.eventually(function() return b.stderr():find("took over", 1, true) end, 20), b.stderr())
    local took = H.now() - t0
    print(("\n  standby took the slot %.2f s after SIGSTOP (wal_sender_timeout 3 s)"):format(took))
    assert.is_true(took < 3 + 5, tostring(took))
    assert.truthy(H.eventually(function() return b.stdout():find("2", 1, true) end, 15), b.stderr())
    -- the stopped runner, continued, finds its stream gone and stands by
    a.kill("CONT")
    assert.truthy(H.eventually(function() return a.stderr():find("standing by", 1, true) end, 20), a.stderr())
    C.sql("INSERT INTO s VALUES (3)", src)
    assert.truthy(H.eventually(function() return b.stdout():find("3", 1, true) end, 15), b.stderr())
    assert.is_nil(a.stdout():find("3", 1, true))
  end)

  it("routes two schemas' tables of one name apart and decodes a column whose type changed mid-stream", function()
    local src, dst, slot = C.setup("typ")
    C.sql("CREATE SCHEMA a; CREATE SCHEMA b; CREATE TABLE a.t (id int PRIMARY KEY, n int); "
      .. "CREATE TABLE b.t (id int PRIMARY KEY, n int)", src)
    local path = C.script(dst, ([[
local function h(ev, note) out(note.channel, ev.schema, ev.new.id, math.type(ev.new.n) or type(ev.new.n), ev.new.n) end
return {
  replication = { slot = %q },
  channels = {
    ["a.t"] = { source = "replication", handler = h },
    bt = { source = "replication", table = "b.t", handler = h },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO a.t VALUES (1, 10); INSERT INTO b.t VALUES (1, 20)", src)
    assert.truthy(H.eventually(function() return #H.lines(p.stdout()) >= 2 end, 15), p.stderr())
    C.sql("ALTER TABLE a.t ALTER COLUMN n TYPE text USING n::text; INSERT INTO a.t VALUES (2, 'x y');"
      .. "ALTER TABLE b.t ALTER COLUMN n TYPE float8; INSERT INTO b.t VALUES (2, 2.5)", src)
    assert.truthy(H.eventually(function() return #H.lines(p.stdout()) >= 4 end, 15), p.stderr())
    assert.same({ "a.t a 1 integer 10", "bt b 1 integer 20", "a.t a 2 string x y", "bt b 2 float 2.5" },
      H.lines(p.stdout()))
  end)
  it("backs off and says what to do when the publication was dropped by hand while streaming", function()
    local src, dst, slot = C.setup("pub")
    C.sql("CREATE TABLE q (id int PRIMARY KEY)", src)
    local p = C.run(src, dst, slot, [[
    ["public.q"] = { source = "replication", handler = function(ev) out(ev.op, ev.new.id) end },]])
    C.sql("INSERT INTO q VALUES (1)", src)
    assert.truthy(H.eventually(function() return #H.lines(p.stdout()) >= 1 end, 15), p.stderr())
    C.sql(("DROP PUBLICATION %s; INSERT INTO q VALUES (2)"):format(slot), src)
    -- the walsender fails on the change after the drop at every start: the
    -- runner backs off instead of reconnecting 100 times a second, and says
    -- what to do
    H.sleep(3)
    local _, lost = p.stderr():gsub("replication stream lost", "")
    assert.is_true(lost >= 1 and lost <= 8, "streams lost in 3 s: " .. tostring(lost))
    assert.truthy(p.stderr():find("drop the slot", 1, true), p.stderr())
    assert.truthy(p.running())
  end)

  it("streams a transaction of 100,000 rows with memory bounded by read_ahead, not the transaction", function()
    local src, dst, slot = C.setup("huge")
    C.sql("CREATE TABLE h (id int PRIMARY KEY, v text)", src)
    local path = C.script(dst, ([[
local n, hold = 0, nil
return {
  replication = { slot = %q },
  channels = {
    ["public.h"] = { source = "replication", batch = 500, retry = { attempts = 100, backoff = 0.5, max_backoff = 0.5 },
      handler = function(events)
      -- the target is down for the first 4 s: the runner reads ahead meanwhile
      hold = hold or pglisten.monotonic() + 4
      if pglisten.monotonic() < hold then error("target down") end
      n = n + #events
      if n %% 20000 == 0 or n == 100000 then out(n) end
    end },
  },
}
]]):format(slot))
    -- under make check, AddressSanitizer keeps freed memory in a quarantine
    -- (256 MB by default) before reusing it: the peak would measure that
    local asan = os.getenv("ASAN_OPTIONS")
    local env = asan and { ASAN_OPTIONS = asan .. ":quarantine_size_mb=1" } or nil
    local p = C.start(path, src, nil, nil, env)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    local function hwm()
      local f = io.open("/proc/" .. p.pid .. "/status")
      local kb = f and f:read("a"):match("VmHWM:%s*(%d+)")
      if f then f:close() end
      return tonumber(kb)
    end
    local before = hwm()
    C.sql("INSERT INTO h SELECT g, repeat('x', 200) FROM generate_series(1, 100000) g", src)
    assert.truthy(H.eventually(function() return p.stdout():find("100000", 1, true) end, 60), p.stderr():sub(-2000))
    local grew = (hwm() - before) / 1024
    print(("\n  100,000-row transaction: the runner's peak RSS grew %.1f MB"):format(grew))
    assert.is_true(grew < 40, ("%.1f MB"):format(grew))
  end)

  it("with REPLICA IDENTITY FULL an untouched TOASTed value is in old, as README says", function()
    local src, dst, slot = C.setup("full")
    C.sql("CREATE TABLE f (id int PRIMARY KEY, n int, big text); ALTER TABLE f REPLICA IDENTITY FULL; "
      .. "ALTER TABLE f ALTER COLUMN big SET STORAGE EXTERNAL", src)
    local p = C.run(src, dst, slot, [[
    ["public.f"] = { source = "replication", handler = function(ev)
      if ev.op == "UPDATE" then
        out(ev.op, ev.new.big == pglisten.unchanged and "unchanged" or #ev.new.big, type(ev.old.big) == "string"
          and #ev.old.big or tostring(ev.old.big))
      end
    end },]])
    C.sql("INSERT INTO f VALUES (1, 0, repeat(md5('a'), 1000)); UPDATE f SET n = 1 WHERE id = 1", src)
    assert.truthy(H.eventually(function() return #H.lines(p.stdout()) >= 1 end, 15), p.stderr())
    assert.same({ "UPDATE unchanged 32000" }, H.lines(p.stdout()))
  end)

  it("a DELETE of a row whose key is TOASTed carries the whole key in old", function()
    local src, dst, slot = C.setup("tkey")
    C.sql("CREATE TABLE k (id text PRIMARY KEY, n int); ALTER TABLE k ALTER COLUMN id SET STORAGE EXTERNAL", src)
    local p = C.run(src, dst, slot, [[
    ["public.k"] = { source = "replication", handler = function(ev)
      local row = ev.old or ev.new
      out(ev.op, type(row.id) == "string" and #row.id or tostring(row.id))
    end },]])
    C.sql("INSERT INTO k VALUES (repeat(md5('k'), 78), 1); UPDATE k SET n = 2; DELETE FROM k", src)
    assert.truthy(H.eventually(function() return #H.lines(p.stdout()) >= 3 end, 15), p.stderr())
    assert.same({ "INSERT 2496", "UPDATE 2496", "DELETE 2496" }, H.lines(p.stdout()))
  end)
end)
