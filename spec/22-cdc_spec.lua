-- The logical-replication source (lua/pglisten/sources/replication.lua)
-- through the real runner binary: events in commit order with the right
-- op/new/old, a backlog made while no runner runs, big rows, unchanged
-- TOAST values, TRUNCATE, ALTER TABLE mid-stream, an idle slot that follows
-- other databases' WAL, --drop-slot.
local H = require "spec.helpers"
local pg = H.pg

local C = require "spec.cdc_helpers"

describe("replication source", function()
  it("delivers inserts, updates and deletes in commit order with op, new, old; the target equals the source",
    function()
      local src, dst, slot = C.setup("order")
      local ddl = "CREATE TABLE items (id int PRIMARY KEY, n int, s text, ok bool, j jsonb)"
      C.sql(ddl, src); C.sql(ddl, dst)
      local p = C.run(src, dst, slot, [[
    ["public.items"] = { source = "replication", handler = function(ev, note)
      upsert("items", ev)
      out(ev.op, ev.schema, ev.table, ev.new and ev.new.id or "-", ev.old and ev.old.id or "-",
        ev.new and ev.new.n or "-", note.channel, note.xid, note.lsn, note.commit_lsn, type(note.commit_time))
    end },]])
      -- 60 transactions; the same row changed by several of them
      local stmts = {}
      for i = 1, 60 do
        local k = i % 7
        if i % 3 == 0 then
          stmts[#stmts + 1] = ("BEGIN; UPDATE items SET n = n + %d, s = 'u%d' WHERE id = %d; "
            .. "INSERT INTO items VALUES (%d, %d, 'x', true, '{\"a\": %d}') ON CONFLICT (id) DO NOTHING; COMMIT;")
            :format(i, i, k, 100 + i, i, i)
        elseif i % 5 == 0 then
          stmts[#stmts + 1] = ("DELETE FROM items WHERE id = %d;"):format(k)
        else
          stmts[#stmts + 1] = ("INSERT INTO items VALUES (%d, %d, 's%d', %s, NULL) "
            .. "ON CONFLICT (id) DO UPDATE SET n = EXCLUDED.n;"):format(k, i, i, i % 2 == 0 and "true" or "false")
        end
      end
      C.sql(table.concat(stmts, "\n"), src)
      local ok, want, got = C.same(src, dst, "items")
      assert.is_true(ok and true or false, ("target %s, source %s"):format(got, want))
      -- commit order: xids rise with the commit LSNs, events of one transaction together
      local lines = H.lines(p.stdout())
      local last_commit, seen_x, prev_x = -1, {}, nil
      for _, l in ipairs(lines) do
        local f = {}
        for w in l:gmatch("%S+") do f[#f + 1] = w end
        assert.equal("public", f[2]); assert.equal("items", f[3]); assert.equal("public.items", f[7])
        assert.equal("number", f[11])
        local commit = pg.core.lsn_parse(f[10])
        assert.is_true(commit >= last_commit, l)
        if f[8] ~= prev_x then
          assert.is_nil(seen_x[f[8]], "transaction " .. f[8] .. " interleaved")
          seen_x[f[8]] = true
        end
        prev_x, last_commit = f[8], commit
        if f[1] == "DELETE" then assert.equal("-", f[4]); assert.truthy(tonumber(f[5])) end
        if f[1] == "INSERT" then assert.equal("-", f[5]) end
      end
      assert.is_true(#lines >= 60)
    end)

  it("handles 20,000 changes made while no runner ran, in batches", function()
    local src, dst, slot = C.setup("backlog")
    C.sql("CREATE TABLE big (id int PRIMARY KEY, v text)", src)
    C.sql("CREATE TABLE seen (id int PRIMARY KEY, v text)", dst)
    local path = C.script(dst, ([[
return {
  replication = { slot = %q },
  channels = {
    ["public.big"] = { source = "replication", batch = 500, handler = function(events, notes)
      assert(#events <= 500 and #events == #notes)
      local rows = {}
      for i, ev in ipairs(events) do rows[i] = { ev.new.id, ev.new.v } end
      assert(target:execmany("INSERT INTO seen VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", rows))
    end },
  },
}
]]):format(slot))
    local p = C.start(path, src)
    local procs = { p }
    H.finally(function() C.cleanup(procs, src, slot) end)
    p.kill("TERM")
    assert.equal(0, p.wait(10))
    C.sql("INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 10000) g", src)
    C.sql("INSERT INTO big SELECT g, 'w' || g FROM generate_series(10001, 20000) g", src)
    local t0 = H.now()
    procs[2] = C.start(path, src)
    local want = C.digest(src, "big")
    local ok = H.eventually(function() return C.digest(dst, "seen") == want end, 60, 0.2)
    assert.is_true(ok and true or false, C.digest(dst, "seen") .. " vs " .. want .. " " .. procs[2].stderr())
    print(("\n  20,000 changes caught up in %.2f s"):format(H.now() - t0))
  end)

  it("hands a 1 MB row over whole, an unchanged TOASTed value as pglisten.unchanged, TRUNCATE, and a table "
    .. "altered mid-stream with its new shape", function()
    local src, dst, slot = C.setup("shape")
    C.sql("CREATE TABLE docs (id int PRIMARY KEY, title text, body text)", src)
    C.sql("ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL", src)
    C.sql("CREATE TABLE docs (id int PRIMARY KEY, title text, body text, extra int DEFAULT 5)", dst)
    local p = C.run(src, dst, slot, [[
    docs = { source = "replication", table = "public.docs", handler = function(ev, note)
      upsert("docs", ev)
      local b = ev.new and ev.new.body
      out(ev.op, ev.new and ev.new.id or "-", b == pglisten.unchanged and "UNCHANGED" or (b and #tostring(b) or "-"),
        ev.new and ev.new.extra or "-", note.channel)
    end },]])
    C.sql("INSERT INTO docs VALUES (1, 'one', repeat('é', 300000) || repeat('x', 500000))", src)
    C.sql("UPDATE docs SET title = 'ONE' WHERE id = 1", src)
    C.sql("ALTER TABLE docs ADD COLUMN extra int DEFAULT 5", src)
    C.sql("INSERT INTO docs VALUES (2, 'two', 'short', 9)", src)
    local ok = C.same(src, dst, "docs")
    assert.is_true(ok and true or false, p.stderr())
    assert.equal("1100000", C.sql("SELECT octet_length(body) FROM docs WHERE id = 1", dst))
    assert.equal("ONE", C.sql("SELECT title FROM docs WHERE id = 1", dst))
    C.sql("TRUNCATE docs", src)
    assert.truthy(H.eventually(function() return p.stdout():find("TRUNCATE", 1, true) end, 20))
    assert.equal("0", C.sql("SELECT count(*) FROM docs", dst))
    local lines = H.lines(p.stdout())
    assert.same({ "INSERT 1 1100000 - docs", "UPDATE 1 UNCHANGED - docs", "INSERT 2 5 9 docs",
      "TRUNCATE - - - docs" }, lines)
  end)

  it("with snapshot = true hands the existing rows over first (note.snapshot), then the stream; a runner "
    .. "killed during the snapshot does it again", function()
    local src, dst, slot = C.setup("snap")
    C.sql("CREATE TABLE people (id int PRIMARY KEY, name text)", src)
    C.sql("CREATE TABLE people (id int PRIMARY KEY, name text)", dst)
    C.sql("INSERT INTO people SELECT g, 'p' || g FROM generate_series(1, 3000) g", src)
    local path = C.script(dst, ([[
return {
  replication = { slot = %q, snapshot = true },
  channels = {
    ["public.people"] = { source = "replication", batch = 500, handler = function(events, notes)
      local n = 0
      for _, ev in ipairs(events) do
        upsert("people", ev)
        if ev.op ~= "TRUNCATE" then n = n + 1 end -- a snapshot begins with one (pglisten.snapshot)
      end
      out(n, notes[1].snapshot and "snapshot" or "stream", notes[1].channel)
      if notes[1].snapshot and os.getenv("SLOW") then pglisten.sleep(0.3) end
    end },
  },
}
]]):format(slot))
    -- killed after the first page of the snapshot
    local first = H.start(path, { "--db", "dbname=" .. src }, { SLOW = "1" }, false)
    local procs = { first }
    H.finally(function() C.cleanup(procs, src, slot) end)
    assert.truthy(H.eventually(function() return first.stdout():find("snapshot", 1, true) end, 20), first.stderr())
    first.kill("KILL")
    first.wait(5)
    assert.is_nil(first.stderr():find("streaming", 1, true))
    local p = C.start(path, src)
    procs[2] = p
    assert.matches("the initial snapshot of this slot never finished", p.stderr(), 1, true)
    C.sql("INSERT INTO people VALUES (3001, 'new'); UPDATE people SET name = 'changed' WHERE id = 7", src)
    assert.is_true(C.same(src, dst, "people") and true or false, p.stderr())
    local snap, stream = 0, 0
    for _, l in ipairs(H.lines(p.stdout())) do
      local n, kind, ch = l:match("^(%d+) (%a+) (%S+)$")
      assert.equal("public.people", ch)
      if kind == "snapshot" then snap = snap + tonumber(n) else stream = stream + tonumber(n) end
    end
    assert.equal(3000, snap)
    assert.equal(2, stream)
  end)

  it("confirms an idle slot's position while another database writes", function()
    local src, dst, slot = C.setup("idle")
    C.sql("CREATE TABLE quiet (id int PRIMARY KEY)", src)
    C.sql("CREATE TABLE busy (id int PRIMARY KEY, v text)", dst)
    local path = C.script(dst, ([[
return {
  replication = { slot = %q },
  channels = { ["public.quiet"] = { source = "replication", handler = function() end } },
}
]]):format(slot))
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    local before = pg.core.lsn_parse(C.confirmed(slot))
    local t0 = H.now()
    local ok = H.eventually(function()
      C.sql("INSERT INTO busy SELECT g, repeat('x', 200) FROM generate_series(1, 200) g "
        .. "ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v || 'y'", dst)
      return pg.core.lsn_parse(C.confirmed(slot)) > before
    end, 40, 0.5)
    assert.truthy(ok, "confirmed_flush_lsn stayed at " .. C.confirmed(slot) .. "\n" .. p.stderr())
    print(("\n  idle slot confirmed past other databases' WAL after %.1f s"):format(H.now() - t0))
  end)

  it("creates the slot and publication on first start, extends the publication on reload, and --drop-slot "
    .. "removes both", function()
    local src, dst, slot = C.setup("drop")
    C.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)", src)
    C.sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY)", dst)
    local body = [[
return {
  replication = { slot = %q },
  channels = {
    ["public.a"] = { source = "replication", handler = function(ev) upsert("a", ev) end },
    %s
  },
}
]]
    local path = C.script(dst, body:format(slot, ""))
    local crc, cout = H.run_runner({ "--check", path })
    assert.equal(0, crc)
    assert.equal("public.a\treplication table=public.a\n", cout)
    local p = C.start(path, src)
    H.finally(function() C.cleanup({ p }, src, slot) end)
    assert.equal("public.a", C.sql(("SELECT string_agg(schemaname || '.' || tablename, ',') FROM "
      .. "pg_publication_tables WHERE pubname = '%s'"):format(slot), src))
    -- the reload adds table b to the publication
    local f = assert(io.open(path, "w"))
    f:write(("local TARGET = %q\nlocal pglisten = require 'pglisten'\n"):format("dbname=" .. dst) .. C.HANDLER
      .. body:format(slot, '["public.b"] = { source = "replication", handler = function(ev) upsert("b", ev) end },'))
    f:close()
    p.kill("HUP")
    assert.truthy(H.eventually(function() return p.stderr():find("added tables to publication", 1, true) end, 10),
      p.stderr())
    C.sql("INSERT INTO a VALUES (1); INSERT INTO b VALUES (2)", src)
    assert.is_true(C.same(src, dst, "b") and true or false, p.stderr())
    assert.is_true(C.same(src, dst, "a") and true or false)
    p.kill("TERM")
    assert.equal(0, p.wait(10))
    local rc, out, err = H.run_runner({ "--drop-slot", "--db", "dbname=" .. src, path })
    assert.equal(0, rc, err)
    assert.matches("dropped replication slot " .. slot, out)
    assert.matches("dropped publication " .. slot, out)
    assert.equal("0", C.sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot)))
    assert.equal("0", C.sql(("SELECT count(*) FROM pg_publication WHERE pubname = '%s'"):format(slot), src))
  end)
end)
