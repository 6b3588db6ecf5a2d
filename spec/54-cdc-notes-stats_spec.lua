-- What a replication source tells: the notes of the initial snapshot's rows
-- carry the same position fields as streamed ones (lsn, lsn_int,
-- commit_lsn), with no xid or commit time (no transaction made them); the
-- runner's "stats" line counts the changes no channel serves as unrouted,
-- as the source's own "replication stats" line does; the queue of changes
-- read and not handled is bounded in bytes, not only in items (wide rows);
-- conn:exec_upto, which the snapshot pages with.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"

local function line_of(stderr, what)
  local l = stderr:match(".*\n([^\n]*" .. what .. "[^\n]*)")
  assert(l, stderr)
  return l
end

describe("replication notes and stats", function()
  it("snapshot rows' notes carry lsn, lsn_int and commit_lsn; xid and commit_time are nil", function()
    local src, dst, slot = C.setup("nsnap")
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
    C.sql("INSERT INTO items SELECT g FROM generate_series(1, 3) g", src)
    local path = C.script(dst, ([[
local pglisten = require "pglisten"
return {
  replication = { slot = %q, snapshot = true },
  channels = {
    ["public.items"] = { source = "replication", handler = function(ev, note)
      if ev.op == "TRUNCATE" then return end
      local parsed = pglisten.core.lsn_parse(note.lsn)
      out(("note %%s %%d snapshot=%%s lsn_int=%%s same=%%s commit_lsn=%%s xid=%%s commit_time=%%s"):format(
        ev.op, ev.new.id, tostring(note.snapshot), math.type(note.lsn_int), tostring(parsed == note.lsn_int),
        tostring(note.commit_lsn ~= nil), tostring(note.xid), tostring(note.commit_time)))
    end },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    C.sql("INSERT INTO items VALUES (4)", src)
    assert.truthy(H.eventually(function() return p.stdout():find("note INSERT 4 ", 1, true) end, 20), p.stderr())
    local out = p.stdout()
    for id = 1, 3 do
      assert.truthy(out:find(("note INSERT %d snapshot=true lsn_int=integer same=true commit_lsn=true xid=nil "
        .. "commit_time=nil"):format(id), 1, true), out)
    end
    -- streamed: the same fields, and the transaction's
    local l = out:match("note INSERT 4 [^\n]*")
    assert.matches("snapshot=nil lsn_int=integer same=true commit_lsn=true xid=%d+ commit_time=[%d.]+$", l)
  end)

  it("counts the changes no channel serves in the runner's stats line too", function()
    local src, dst, slot = C.setup("nunr")
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", src)
    C.sql("CREATE TABLE items (id int PRIMARY KEY)", dst)
    C.sql("CREATE TABLE extra (id int PRIMARY KEY)", src)
    C.slot_first(src, slot, "items, extra")
    local p = C.run(src, dst, slot, [[
    ["public.items"] = { source = "replication", handler = function(ev) upsert("items", ev) end },]])
    C.sql("INSERT INTO extra SELECT g FROM generate_series(1, 5) g", src)
    C.sql("INSERT INTO items VALUES (1)", src)
    assert.truthy(C.same(src, dst, "items", 20), p.stderr())
    p.kill("USR1")
    local global
    assert.truthy(H.eventually(function()
      for _, l in ipairs(H.lines(p.stderr())) do
        if l:find(" stats ", 1, true) and not l:find("replication stats", 1, true) then global = l end
      end
      return global and p.stderr():find("replication stats", 1, true)
    end, 10), p.stderr())
    assert.matches(" unrouted=5", line_of(p.stderr(), "replication stats"))
    assert.matches(" unrouted=5", global)
  end)

  it("queues at most about 64 MiB of wide rows, read ahead or not, and loses none", function()
    local src, dst, slot = C.setup("nbyt")
    C.sql("CREATE TABLE docs (id int PRIMARY KEY, body text)", src)
    C.sql("CREATE TABLE docs (id int PRIMARY KEY, body text)", dst)
    C.slot_first(src, slot, "docs")
    -- 160 rows of 1 MiB, a transaction each (compressible: little WAL, the whole MiB on the wire)
    C.sql("DO $$ BEGIN FOR g IN 1..160 LOOP INSERT INTO docs VALUES (g, repeat(md5(g::text), 32768)); COMMIT; "
      .. "END LOOP; END $$", src)
    local gate = os.tmpname()
    os.remove(gate)
    H.finally(function() os.remove(gate) end)
    local path = C.script(dst, ([[
local waited = false
return {
  replication = { slot = %q },
  channels = {
    ["public.docs"] = { source = "replication", batch = 1000, handler = function(events)
      if not waited then
        waited = true
        out("waiting " .. #events)
        repeat -- the target at work, query after query: each wait reads ahead
          assert(target:exec("SELECT pg_sleep(0.05)"))
          local f = io.open(%q)
          if f then f:close() end
        until f
      end
      local rows = {}
      for i, ev in ipairs(events) do rows[i] = { ev.new.id, ev.new.body } end
      assert(target:execmany("INSERT INTO docs VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET body = EXCLUDED.body",
        rows))
      out("batch " .. #events)
    end },
  },
}
]]):format(slot, gate))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    assert.truthy(H.eventually(function() return p.stdout():find("waiting", 1, true) end, 20), p.stderr())
    H.sleep(1.5) -- read ahead by now, as far as it goes (the walsender has sent what the socket takes)
    local rss = C.vm(p, "VmRSS") / 1024
    local f = assert(io.open(gate, "w"))
    f:write("go")
    f:close()
    assert.truthy(C.same(src, dst, "docs", 60), p.stderr())
    -- signals wait for the handler: the batches tell what was queued (the
    -- second one, what was read ahead while the first waited)
    local sizes = C.ids(p.stdout(), "batch")
    print(("\n  1 MiB rows: batches %s; runner RSS %.0f MiB while the first waited"):format(table.concat(sizes, " "),
      rss))
    for _, n in ipairs(sizes) do assert.is_true(n <= 66, "batches " .. table.concat(sizes, " ")) end
    assert.is_true(#sizes >= 3, "batches " .. table.concat(sizes, " "))
    assert.is_true(rss < 400, ("RSS %.0f MiB"):format(rss))
  end)
  it("reads the initial snapshot of wide rows in pages of about 16 MiB, not 1000 rows", function()
    local src, dst, slot = C.setup("nspg")
    C.sql("CREATE TABLE docs (id int PRIMARY KEY, body text)", src)
    C.sql("CREATE TABLE docs (id int PRIMARY KEY, body text)", dst)
    C.sql("INSERT INTO docs SELECT g, repeat(md5(g::text), 32768) FROM generate_series(1, 120) g", src) -- 1 MiB each
    C.sql("INSERT INTO docs SELECT g, 'small' FROM generate_series(121, 2200) g", src)
    local path = C.script(dst, ([[
return {
  replication = { slot = %q, snapshot = true },
  channels = {
    ["public.docs"] = { source = "replication", batch = 5000, handler = function(events, notes)
      local rows = {}
      for _, ev in ipairs(events) do
        if ev.op == "TRUNCATE" then
          assert(target:exec("TRUNCATE docs"))
        else
          rows[#rows + 1] = { ev.new.id, ev.new.body }
        end
      end
      if #rows > 0 then assert(target:execmany("INSERT INTO docs VALUES ($1, $2)", rows)) end
      out((notes[1].snapshot and "snapshot " or "stream ") .. #rows)
    end },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    assert.truthy(C.same(src, dst, "docs", 60), p.stderr())
    local sizes = C.ids(p.stdout(), "snapshot")
    print("\n  snapshot pages of 1 MiB rows, then small ones: " .. table.concat(sizes, " "))
    local total = 0
    for _, n in ipairs(sizes) do total = total + n end
    assert.equal(2200, total)
    assert.is_true(sizes[2] <= 10, table.concat(sizes, " ")) -- after the TRUNCATE's (0 rows)
    for i = 3, #sizes do
      if sizes[i] > 16 then -- only past the wide rows, which end at 120
        local before = 0
        for j = 1, i - 1 do before = before + sizes[j] end
        assert.is_true(before >= 120, "a page of " .. sizes[i] .. " wide rows: " .. table.concat(sizes, " "))
      end
    end
  end)
end)

describe("conn:exec_upto", function()
  local c
  before_each(function() c = H.connect() end)
  after_each(function() c:close() end)

  it("takes rows while their values stay under max_bytes, one at least, and says more were left", function()
    local r = assert(c:exec_upto(100, "SELECT g, repeat('x', 40) AS v FROM generate_series(1, 10) g"))
    -- 41 bytes a row: 3 rows take 123 (the third began under 100)
    assert.same({ 3, 123, true }, { r.n, r.bytes, r.more })
    assert.same({ 1, 2, 3 }, { r[1].g, r[2].g, r[3].g })
    assert.equal(("x"):rep(40), r[3].v)
    r = assert(c:exec_upto(1, "SELECT repeat('y', 1000) AS v"))
    assert.same({ 1, 1000, false }, { r.n, r.bytes, r.more })
    r = assert(c:exec_upto(1 << 40, "SELECT g FROM generate_series(1, $1::int) g WHERE g > $2", 5, 1))
    assert.same({ 4, 4, false, 2 }, { r.n, r.bytes, r.more, r[1].g })
    r = assert(c:exec_upto(10, "SELECT 1 AS x WHERE false"))
    assert.same({ 0, 0, false }, { r.n, r.bytes, r.more })
  end)

  it("returns errors as exec does, refuses what it cannot run, and the connection goes on", function()
    local r, err, code = c:exec_upto(10, "SELECT 1/0")
    assert.same({ nil, "22012" }, { r, code })
    assert.matches("division by zero", err)
    r, err, code = c:exec_upto(10, "SELECT 1; SELECT 2")
    assert.same({ nil, "42601" }, { r, code })
    assert.matches("multiple commands", err)
    r, err = c:exec_upto(10, "COPY (SELECT 1) TO STDOUT")
    assert.is_nil(r)
    assert.matches("COPY TO STDOUT is not supported", err)
    r, err = c:exec_upto(10, "SELECT 1\0")
    assert.is_nil(r)
    assert.matches("zero byte", err)
    -- an error in the middle of the rows: none of them, the error
    r, err, code = c:exec_upto(1 << 20, "SELECT 10 / (3 - g) AS x FROM generate_series(1, 5) g")
    assert.same({ nil, "22012" }, { r, code })
    assert.matches("division by zero", err)
    assert.equal(42, c:exec("SELECT 42 AS x")[1].x)
    assert.has_error(function() c:exec_upto("10", "SELECT 1") end)
  end)

  it("heals a lost connection first, as exec does", function()
    local admin = H.connect()
    H.kill_now(admin, c)
    admin:close()
    local r = assert(c:exec_upto(100, "SELECT 7 AS x"))
    assert.equal(7, r[1].x)
  end)
end)

describe("the initial snapshot of a partitioned table without a key", function()
  it("reads every row once: ctid repeats across partitions, (tableoid, ctid) does not", function()
    local snapshot = require "pglisten.snapshot"
    local db, conninfo = H.createdb("nprt")
    H.psql([[CREATE TABLE pt (id int, v text) PARTITION BY RANGE (id);
      CREATE TABLE pt1 PARTITION OF pt FOR VALUES FROM (0) TO (100);
      CREATE TABLE pt2 PARTITION OF pt FOR VALUES FROM (100) TO (200);
      ALTER TABLE pt REPLICA IDENTITY FULL;
      INSERT INTO pt SELECT g, 'v' || g FROM generate_series(0, 199) g]], db)
    local r = assert(H.pg.core.replication_connect(conninfo, 20))
    local slot = ("nprt_%d"):format(os.time() % 100000)
    local made = assert(r:command(("CREATE_REPLICATION_SLOT %s LOGICAL pgoutput EXPORT_SNAPSHOT"):format(slot)))
    H.finally(function()
      r:close()
      H.psql(("SELECT pg_drop_replication_slot('%s')"):format(slot), db)
    end)
    local seen, n = {}, 0
    local ok, err = snapshot.run(nil, { conninfo = conninfo, snapshot = made[1].snapshot_name, tables = { "pt" },
      page = 7, deliver = function(_, events)
        for _, ev in ipairs(events) do
          if ev.new then n, seen[ev.new.id] = n + 1, (seen[ev.new.id] or 0) + 1 end
        end
        return true
      end })
    assert.truthy(ok, tostring(err))
    local missing, twice = 0, 0
    for id = 0, 199 do
      if not seen[id] then missing = missing + 1 elseif seen[id] > 1 then twice = twice + 1 end
    end
    assert.same({ 200, 0, 0 }, { n, missing, twice }) -- was { 175, 25, 0 }: ctid alone
  end)
end)
