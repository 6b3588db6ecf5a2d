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
    finally(function() writer.stop() end)
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
end)
