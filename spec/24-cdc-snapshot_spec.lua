-- The initial snapshot of a replication source (pglisten.snapshot): rows read
-- in the slot's exported snapshot, then the stream from its consistent point,
-- against the real test server (wal_level = logical in scripts/with-pg.sh).
-- Module level: the slot is created here with EXPORT_SNAPSHOT, the stream read
-- with the replication core, as the replication source does it.
local H = require "spec.helpers"
local pg = H.pg
local core = pg.core
local snapshot = require "pglisten.snapshot"

local dbname, conninfo = H.createdb("snap")
local seq = 0

local function sql(s) return H.psql(s, dbname) end

local function newname(prefix)
  seq = seq + 1
  return ("%s%d_%d"):format(prefix, os.time() % 100000, seq)
end

--- A slot with an exported snapshot: repl (idle), consistent point, snapshot name.
local function create_slot(slot)
  local r = assert(core.replication_connect(conninfo, 20))
  local rows = assert(r:command(("CREATE_REPLICATION_SLOT %s LOGICAL pgoutput EXPORT_SNAPSHOT"):format(slot)))
  assert.matches("^%x+/%x+$", rows[1].consistent_point)
  assert.is_true(snapshot.valid_snapshot(rows[1].snapshot_name))
  return r, rows[1].consistent_point, rows[1].snapshot_name
end

local function drop_slot(slot)
  H.eventually(function()
    return sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s' AND active"):format(slot)) == "0"
  end, 10)
  sql(("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot))
end

--- Streams from `lsn` and hands every row change to `apply` until `stop(ev)`.
local function stream(r, slot, lsn, pub, apply, stop, timeout)
  assert(r:start(slot, lsn, { publication = pub }))
  local deadline = pg.monotonic() + (timeout or 60)
  while pg.monotonic() < deadline do
    local msgs, err = r:read(1000)
    assert(msgs, err)
    local last
    for _, m in ipairs(msgs) do
      if m.op then
        apply(m)
        if stop(m) then return true end
      end
      if m.kind == "commit" then last = m end
    end
    if last then r:confirm(last.end_lsn_int) end
    if #msgs == 0 then core.poll({ r:pollfd() }, 0.2) end
  end
  error("the stream did not reach the end within the time")
end

--- A model of the target: rows by id, and how many times each id was inserted.
local function model()
  local m = { rows = {}, inserts = {}, missing = {} }
  function m.apply(ev)
    if ev.op == "TRUNCATE" then
      m.rows = {}
    elseif ev.op == "INSERT" then
      m.inserts[ev.new.id] = (m.inserts[ev.new.id] or 0) + 1
      m.rows[ev.new.id] = ev.new
    elseif ev.op == "UPDATE" then
      local old = ev.old and ev.old.id or ev.new.id
      if not m.rows[old] then m.missing[#m.missing + 1] = old end
      m.rows[old] = nil
      m.rows[ev.new.id] = ev.new
    elseif ev.op == "DELETE" then
      if not m.rows[ev.old.id] then m.missing[#m.missing + 1] = ev.old.id end
      m.rows[ev.old.id] = nil
    end
  end
  return m
end

local function source_rows(tbl)
  local c = H.connect(conninfo)
  local rows = assert(c:exec(("SELECT * FROM %s ORDER BY id"):format(tbl)))
  c:close()
  local by = {}
  for i = 1, rows.n do by[rows[i].id] = rows[i] end
  return by, rows.n
end

local function dst_ci_of(db) return "dbname=" .. db end

local function count(t)
  local n = 0
  for _ in pairs(t) do n = n + 1 end
  return n
end

describe("cdc snapshot", function()
  it("refuses a snapshot name that is not one, before it reaches SQL", function()
    for _, bad in ipairs { "x'; DROP TABLE t; --", "", "00000003-0000001A-1'", "0000-", 42 } do
      local ok, err, code = snapshot.run(nil, { conninfo = conninfo, snapshot = bad, tables = {},
        deliver = function() return true end })
      assert.is_nil(ok, tostring(bad))
      assert.matches("invalid snapshot name", err)
      assert.equal("22023", code)
    end
    assert.is_true(snapshot.valid_snapshot("00000003-0000001A-1"))
    assert.is_true(snapshot.valid_snapshot("00000003-1"))
  end)

  it("types snapshot rows exactly as the stream types them", function()
    sql([[CREATE DOMAIN posint AS int CHECK (VALUE > 0);
      CREATE DOMAIN flag AS bool;
      CREATE TYPE colour AS ENUM ('red', 'blue');
      CREATE TABLE typed (id int PRIMARY KEY, b bigint, n numeric, nb numeric, f float8, ok bool,
        j json, jb jsonb, d posint, fl flag, c colour, arr int[], ip inet, ch char(4),
        g int GENERATED ALWAYS AS (id * 2) STORED, z text);
      CREATE PUBLICATION typed_pub FOR TABLE typed]])
    local vals = [[9007199254740993, 12345678901234567890.5, 2.5, 0.1, true, '{"a":[1,2]}',
      '{"k":"v"}', 5, true, 'blue', '{1,2}', '10.0.0.1', 'ab', NULL]]
    sql("INSERT INTO typed (id, b, n, nb, f, ok, j, jb, d, fl, c, arr, ip, ch, z) VALUES (1, " .. vals .. ")")
    local slot = newname("typed")
    local r, lsn, name = create_slot(slot)
    local snap = {}
    assert(snapshot.run(nil, { conninfo = conninfo, snapshot = name, tables = { "typed" },
      publication = "typed_pub",
      deliver = function(tbl, events, notes)
        assert.equal("typed", tbl)
        for i, ev in ipairs(events) do
          assert.is_true(notes[i].snapshot)
          if ev.op == "INSERT" then snap[#snap + 1] = ev end
        end
        return true
      end }))
    sql("INSERT INTO typed (id, b, n, nb, f, ok, j, jb, d, fl, c, arr, ip, ch, z) VALUES (2, " .. vals .. ")")
    local streamed
    stream(r, slot, lsn, "typed_pub", function(ev) streamed = ev end, function() return true end)
    r:close()
    assert.equal(1, #snap)
    local a, b = snap[1], streamed
    assert.equal("public", a.schema); assert.equal("typed", a.table)
    assert.equal(b.schema, a.schema); assert.equal(b.table, a.table); assert.equal(b.op, a.op)
    assert.equal(1, a.new.id); assert.equal(2, b.new.id)
    a.new.id, b.new.id = nil, nil
    assert.same(b.new, a.new)
    assert.equal("5", a.new.d)                  -- a domain: text, as pgoutput sends it
    assert.equal("t", a.new.fl)
    assert.equal(pg.null, a.new.z)
    assert.is_nil(a.new.g)                      -- generated: not published
    assert.equal(9007199254740993, a.new.b)
    assert.same({ k = "v" }, a.new.jb)
    drop_slot(slot)
  end)

  it("50,000 rows with writes going on: the target equals the source, each row inserted once", function()
    sql([[CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL, n numeric NOT NULL, tags jsonb);
      INSERT INTO users SELECT i, 'user ' || i, i * 1.5, jsonb_build_object('i', i) FROM generate_series(1, 50000) i;
      CREATE PUBLICATION users_pub FOR TABLE users]])
    -- the writer: 600 transactions of an insert, an update and a delete
    local w = {}
    for i = 1, 600 do
      w[#w + 1] = ([[BEGIN;
INSERT INTO users VALUES (%d, 'new %d', %d, '{"w": true}');
UPDATE users SET name = name || ' upd', n = n + 1 WHERE id = %d;
DELETE FROM users WHERE id = %d;
COMMIT;
SELECT pg_sleep(0.005);]]):format(50000 + i, i, i, (i * 37) % 50000 + 1, (i * 101) % 50000 + 1)
    end
    local wf = H.file("writer.sql", table.concat(w, "\n") .. "\n")
    local writer = H.spawn({ "psql", "-qtAX", "-v", "ON_ERROR_STOP=1", "-d", dbname, "-f", wf })
    H.finally(function() writer.stop() end)
    assert(H.eventually(function() return tonumber(sql("SELECT count(*) FROM users WHERE id > 50000")) >= 20 end, 20))

    local slot = newname("users")
    local r, lsn, name = create_slot(slot)
    local m, pages, snapped_max = model(), 0, 0
    local ok, counts = snapshot.run(nil, { conninfo = conninfo, snapshot = name, tables = { "public.users" },
      page = 1000,
      deliver = function(tbl, events, notes)
        assert.equal("public.users", tbl)
        for i, ev in ipairs(events) do
          assert.is_true(notes[i].snapshot)
          m.apply(ev)
          if ev.op == "INSERT" and ev.new.id > snapped_max then snapped_max = ev.new.id end
        end
        pages = pages + 1
        pg.sleep(0.01) -- a handler that takes its time: the writer goes on meanwhile
        return true
      end })
    assert.is_true(ok, counts)
    local written_by_now = tonumber(sql("SELECT max(id) FROM users"))
    assert.is_true(pages >= 50)
    assert.is_true(counts["public.users"] > 50000 - 600)
    assert.is_true(snapped_max > 50000, "the snapshot holds some of the writer's rows")
    assert.is_true(written_by_now > snapped_max, "the writer committed more during the snapshot")
    assert(writer.wait(60) == 0, writer.stderr())
    sql("INSERT INTO users VALUES (-1, 'end', 0, NULL)")
    stream(r, slot, lsn, "users_pub", m.apply, function(ev) return ev.op == "INSERT" and ev.new.id == -1 end)
    r:close()

    local src, n = source_rows("users")
    assert.equal(n, count(m.rows))
    for id, row in pairs(src) do assert.same(row, m.rows[id]) end
    for id, times in pairs(m.inserts) do
      if times ~= 1 then error(("id %d was inserted %d times"):format(id, times)) end
    end
    assert.same({}, m.missing) -- no update or delete of a row the target lacked
    drop_slot(slot)
  end)
  it("SIGKILL during the snapshot: pending, the slot dropped and recreated, the target converges "
    .. "(parents first)", function()
    local ddl = [[CREATE TABLE users (id int PRIMARY KEY, name text NOT NULL);
      CREATE TABLE orders (id int PRIMARY KEY, user_id int NOT NULL REFERENCES users, amount numeric(12,2) NOT NULL);]]
    local src, src_ci = H.createdb("snapkill")
    local dst, dst_ci = H.createdb("snapkilldst")
    H.psql(ddl .. [[
      INSERT INTO users SELECT i, 'user ' || i FROM generate_series(1, 20000) i;
      INSERT INTO orders SELECT i, (i % 20000) + 1, i * 0.25 FROM generate_series(1, 20000) i;
      CREATE PUBLICATION kill_pub FOR TABLE users, orders]], src)
    H.psql(ddl, dst)
    -- the target's side, shared by the killed child and this spec
    local apply_file = H.file("apply.lua", [[
local UPSERT = {
  users = "INSERT INTO users (id, name) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name",
  orders = "INSERT INTO orders (id, user_id, amount) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE "
    .. "SET user_id = EXCLUDED.user_id, amount = EXCLUDED.amount",
}
local function tuple(ev)
  local r = ev.new
  if ev.table == "users" then return { r.id, r.name } end
  return { r.id, r.user_id, r.amount }
end
return function(dst, events)
  local i = 1
  while i <= #events do
    local ev = events[i]
    if ev.op == "TRUNCATE" then
      for _, rel in ipairs(ev.relations) do
        assert(dst:exec("TRUNCATE " .. dst:escape_identifier(rel.table) .. " CASCADE"))
      end
      i = i + 1
    elseif ev.op == "DELETE" then
      assert(dst:exec(("DELETE FROM %s WHERE id = $1"):format(dst:escape_identifier(ev.table)), ev.old.id))
      i = i + 1
    else -- INSERT or UPDATE: consecutive ones of a table in one execmany
      local list, t = {}, ev.table
      while events[i] and events[i].table == t and (events[i].op == "INSERT" or events[i].op == "UPDATE") do
        list[#list + 1] = tuple(events[i]); i = i + 1
      end
      assert(dst:execmany(UPSERT[t], list))
    end
  end
  return true
end
]])
    local child = H.file("snapchild.lua", ([[
local pg = require "pglisten"
local snapshot = require "pglisten.snapshot"
local apply = dofile(%q)
local src = assert(pg.connect(%q))
local dst = assert(pg.connect(%q))
assert(snapshot.begin(src, "kill_slot"))
local r = assert(pg.core.replication_connect(%q, 20))
local row = assert(r:command("CREATE_REPLICATION_SLOT kill_slot LOGICAL pgoutput EXPORT_SNAPSHOT"))[1]
print("created " .. row.consistent_point); io.stdout:flush()
assert(snapshot.run(nil, { conninfo = %q, snapshot = row.snapshot_name, tables = { "public.orders", "public.users" },
  page = 500, deliver = function(_, events) pg.sleep(0.05); return apply(dst, events) end }))
print("finished"); io.stdout:flush()
]]):format(apply_file, src_ci, dst_ci, src_ci, src_ci))
    local p = H.spawn({ "lua5.4", child }, {
      LUA_PATH = H.root .. "/lua/?.lua;" .. H.root .. "/lua/?/init.lua;;",
      LUA_CPATH = H.root .. "/" .. H.build .. "/?.so;;" })
    H.finally(function() p.stop() end)
    assert(H.eventually(function()
      return not p.running() or tonumber(H.psql("SELECT count(*) FROM users", dst)) >= 3000
    end, 60), p.stderr())
    assert(p.running(), p.stderr() .. p.stdout())
    p.kill("KILL"); p.wait(10)
    assert.not_matches("finished", p.stdout())
    local part = tonumber(H.psql("SELECT count(*) FROM users", dst))
    assert.is_true(part >= 3000 and part < 20000, "half a snapshot: " .. part)
    -- meanwhile the source changes, some of it in rows the half snapshot copied
    H.psql([[DELETE FROM orders WHERE user_id <= 500; DELETE FROM users WHERE id <= 500;
      UPDATE users SET name = 'renamed' WHERE id BETWEEN 501 AND 700]], src)

    local conn = H.connect(src_ci)
    assert.is_true(snapshot.pending(conn, "kill_slot"))
    assert.is_false(snapshot.pending(conn, "no_such_slot"))
    assert.equal("1", H.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kill_slot'", src))
    H.eventually(function()
      return H.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kill_slot' AND active", src) == "0"
    end, 10)
    H.psql("SELECT pg_drop_replication_slot('kill_slot')", src)
    -- again, all of it
    local dstc = H.connect(dst_ci)
    local apply = dofile(apply_file)
    assert(snapshot.begin(conn, "kill_slot"))
    local r = assert(core.replication_connect(src_ci, 20))
    local row = assert(r:command("CREATE_REPLICATION_SLOT kill_slot LOGICAL pgoutput EXPORT_SNAPSHOT"))[1]
    local order = {}
    assert(snapshot.run(nil, { conninfo = src_ci, snapshot = row.snapshot_name,
      tables = { "public.orders", "public.users" },
      deliver = function(tbl, events)
        if order[#order] ~= tbl then order[#order + 1] = tbl end
        return apply(dstc, events)
      end }))
    assert.same({ "public.users", "public.orders" }, order) -- parents first
    assert.is_true(snapshot.pending(conn, "kill_slot"))
    assert(snapshot.done(conn, "kill_slot"))
    assert.is_false(snapshot.pending(conn, "kill_slot"))
    H.psql([[INSERT INTO users VALUES (30000, 'late'); INSERT INTO orders VALUES (30000, 30000, 1.5);
      DELETE FROM orders WHERE id = 1000; UPDATE users SET name = 'x' WHERE id = 900]], src)
    assert(r:start("kill_slot", row.consistent_point, { publication = "kill_pub" }))
    local seen = {}
    local deadline = pg.monotonic() + 30
    while #seen < 4 and pg.monotonic() < deadline do
      local msgs = assert(r:read(1000))
      for _, m in ipairs(msgs) do if m.op then seen[#seen + 1] = m end end
      if #msgs == 0 then core.poll({ r:pollfd() }, 0.2) end
    end
    assert.equal(4, #seen)
    apply(dstc, seen)
    r:close()
    local sum = "SELECT (SELECT count(*) || ' ' || md5(string_agg(u::text, ',' ORDER BY id)) FROM users u) || ' ' || "
      .. "(SELECT count(*) || ' ' || md5(string_agg(o::text, ',' ORDER BY id)) FROM orders o)"
    assert.equal(H.psql(sum, src), H.psql(sum, dst))
    assert(snapshot.forget(conn, "kill_slot"))
    assert.is_false(snapshot.pending(conn, "kill_slot"))
    conn:close(); dstc:close()
    H.eventually(function()
      return H.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'kill_slot' AND active", src) == "0"
    end, 10)
    H.psql("SELECT pg_drop_replication_slot('kill_slot')", src)
  end)
end)

---------------------------------------------------------------------------
-- With the runner (pglisten.sources.replication, snapshot = true)
---------------------------------------------------------------------------

--- A runner script syncing public.items into `dst_ci`; every INSERT event is
-- counted per id in `applied` (snapshot or stream), `delay` seconds per batch.
local function items_script(slot, dst_ci, delay)
  return H.script(([[
local target = assert(pglisten.connect(%q))
local function x(sql, ...) local r, err = target:exec(sql, ...); if not r then error(err, 0) end; return r end
return {
  replication = { slot = %q, publication = %q, snapshot = true },
  channels = {
    ["public.items"] = { source = "replication", batch = 500, retry = { attempts = 3, backoff = 0.1 },
      handler = function(events, notes)
        local snap, up, ins = 0, {}, {}
        local function flush()
          if #up > 0 then assert(target:execmany("INSERT INTO items (id, v) VALUES ($1, $2) "
            .. "ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v", up)) end
          if #ins > 0 then assert(target:execmany("INSERT INTO applied VALUES ($1, 1, $2) "
            .. "ON CONFLICT (id) DO UPDATE SET n = applied.n + 1", ins)) end
          up, ins = {}, {}
        end
        for i, ev in ipairs(events) do
          if notes[i].snapshot then snap = snap + 1 end
          if ev.op == "TRUNCATE" then flush(); x("TRUNCATE items")
          elseif ev.op == "DELETE" then flush(); x("DELETE FROM items WHERE id = $1", ev.old.id)
          else
            up[#up + 1] = { ev.new.id, ev.new.v }
            if ev.op == "INSERT" then ins[#ins + 1] = { ev.new.id, notes[i].snapshot == true } end
          end
        end
        flush()
        if snap > 0 then out("snapshot", snap) end
        if %s > 0 then pglisten.sleep(%s) end
      end },
  },
}
]]):format(dst_ci, slot, slot, delay, delay))
end

local function items_dbs(prefix, rows)
  local src, src_ci = H.createdb(prefix)
  local dst, dst_ci = H.createdb(prefix .. "dst")
  H.psql(([[CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
    INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, %d) i]]):format(rows), src)
  H.psql([[CREATE TABLE items (id int PRIMARY KEY, v text NOT NULL);
    CREATE TABLE applied (id int PRIMARY KEY, n int, snap bool)]], dst)
  return src, src_ci, dst, dst_ci
end

local DIGEST = "SELECT count(*) || ' ' || md5(coalesce(string_agg(id || ':' || v, ',' ORDER BY id), '')) FROM items"

local function stop_runner(p, src, slot)
  p.kill("TERM"); p.wait(10); p.stop()
  H.eventually(function()
    return H.psql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s' AND active")
      :format(slot), src) == "0"
  end, 10)
  H.psql(("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '%s'")
    :format(slot), src)
end

describe("cdc snapshot, in the runner", function()
  it("50,000 rows with a writer going on: the target equals the source, no row inserted twice", function()
    local src, src_ci, dst = items_dbs("rsnap", 50000)
    local slot = newname("rsnap")
    -- the writer: 1000 transactions, about 5 s; the snapshot is done after
    -- 3.6 s and about 600 of them (measured), the rest come from the stream
    local w = {}
    for i = 1, 1000 do
      w[#w + 1] = ([[BEGIN; INSERT INTO items VALUES (%d, 'w%d'); UPDATE items SET v = v || '+' WHERE id = %d;
DELETE FROM items WHERE id = %d; COMMIT; SELECT pg_sleep(0.005);]]):format(50000 + i, i, (i * 37) % 50000 + 1,
        (i * 101) % 50000 + 1)
    end
    local writer = H.spawn({ "psql", "-qtAX", "-v", "ON_ERROR_STOP=1", "-d", src, "-f",
      H.file("rwriter.sql", table.concat(w, "\n") .. "\n") })
    H.finally(function() writer.stop() end)
    assert(H.eventually(function()
      return tonumber(H.psql("SELECT count(*) FROM items WHERE id > 50000", src)) >= 10
    end, 20))
    local p = H.start(items_script(slot, dst_ci_of(dst), 0.02), { "--db", src_ci }, {}, false)
    H.finally(function() stop_runner(p, src, slot) end)
    assert(H.eventually(function() return p.stderr():find("initial snapshot done", 1, true) end, 90), p.stderr())
    assert(writer.wait(90) == 0, writer.stderr())
    assert(H.eventually(function() return H.psql(DIGEST, src) == H.psql(DIGEST, dst) end, 60), p.stderr())
    assert.equal("0", H.psql("SELECT count(*) FROM applied WHERE n <> 1", dst))
    -- the writer's rows straddle the boundary: some came in the snapshot, the rest from the stream
    assert.not_equal("0", H.psql("SELECT count(*) FROM applied WHERE id > 50000 AND snap", dst))
    assert.not_equal("0", H.psql("SELECT count(*) FROM applied WHERE id > 50000 AND NOT snap", dst))
    assert.equal(H.psql("SELECT count(*) FROM items WHERE id > 50000", src),
      H.psql("SELECT count(*) FROM items WHERE id > 50000", dst))
  end)

  it("SIGKILL during the snapshot: the next start does it again, whole, and the target converges", function()
    local src, src_ci, dst = items_dbs("rkill", 20000)
    local slot = newname("rkill")
    local path = items_script(slot, dst_ci_of(dst), 0.1)
    local p = H.start(path, { "--db", src_ci }, {}, false)
    H.finally(function() p.stop() end)
    assert(H.eventually(function() return tonumber(H.psql("SELECT count(*) FROM items", dst)) >= 3000 end, 60),
      p.stderr())
    assert.is_nil(p.stderr():find("initial snapshot done", 1, true))
    p.kill("KILL"); p.wait(10)
    -- rows the half snapshot copied are deleted or changed meanwhile
    H.psql("DELETE FROM items WHERE id <= 1000; UPDATE items SET v = 'changed' WHERE id BETWEEN 1001 AND 1500", src)
    -- the second run at full speed: only the first needs to be slow to be killed mid-snapshot
    local p2 = H.start(items_script(slot, dst_ci_of(dst), 0), { "--db", src_ci }, {}, false)
    H.finally(function() stop_runner(p2, src, slot) end)
    assert(H.eventually(function() return p2.stderr():find("initial snapshot done", 1, true) end, 90), p2.stderr())
    H.psql("INSERT INTO items VALUES (-1, 'after')", src)
    assert(H.eventually(function() return H.psql(DIGEST, src) == H.psql(DIGEST, dst) end, 60), p2.stderr())
  end)
end)
