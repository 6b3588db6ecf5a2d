-- The replication core (src/repl.c, src/pgoutput.c): a replication=database
-- connection streaming a logical slot with pgoutput, decoded into Lua tables,
-- against the real test server (wal_level = logical in scripts/with-pg.sh).
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"
local pg = H.pg
local core = pg.core

local dbname, conninfo = H.createdb("repl")
local R = C.core(dbname, conninfo, "s")
local stream, drop, collect = R.stream, R.drop, R.collect
local count, commits = C.count, C.commits

local function connect()
  return assert(core.replication_connect(conninfo, 20))
end

local function sql(s)
  return H.psql(s, dbname)
end

local function changes(got)
  local out = {}
  for _, m in ipairs(got) do
    if m.op then out[#out + 1] = m end
  end
  return out
end

describe("replication core", function()
  it("parses and formats LSNs", function()
    assert.equal(0x16B3748, core.lsn_parse("0/16B3748"))
    assert.equal((0x1F << 32) | 0xA, core.lsn_parse("1F/A"))
    assert.equal("1F/A", core.lsn_format((0x1F << 32) | 0xA))
    assert.equal("0/0", core.lsn_format(0))
    for _, bad in ipairs { "", "1", "x/1", "1/", "1/2/3", "-1/2", "1/ 2", "123456789/1" } do
      local v, err = core.lsn_parse(bad)
      assert.is_nil(v, bad)
      assert.matches("not an LSN", err)
    end
  end)

  it("is created closed-safe: close is idempotent, a closed object raises", function()
    local r = connect()
    assert.matches("^pglisten.replication %(pid %d+, ok%)$", tostring(r))
    assert.is_true(r:pid() > 0)
    assert.equal("r", r:events())
    assert.is_nil(r:timeout())
    assert.is_false(r:streaming())
    assert.is_true(r:close()); assert.is_true(r:close())
    assert.is_true(r:isclosed())
    assert.equal("pglisten.replication (closed)", tostring(r))
    assert.has_error(function() r:read() end, "attempt to use a closed connection")
    local bad, err = core.replication_connect("host=127.0.0.1 port=1", 5)
    assert.is_nil(bad); assert.is_string(err)
  end)

  it("runs replication commands and plain SQL", function()
    local r = connect()
    local id = assert(r:command("IDENTIFY_SYSTEM"))
    assert.matches("^%d+$", id[1].systemid)
    assert.equal(1, id[1].timeline)
    assert.equal(dbname, id[1].dbname)
    assert.equal(42, assert(r:command("SELECT 42 AS x"))[1].x)
    local v, err, state = r:command("DROP_REPLICATION_SLOT no_such_slot_here")
    assert.is_nil(v); assert.matches("does not exist", err); assert.equal("42704", state)
    assert.has_error(function() r:read() end, "replication connection is not streaming: start() it first")
    -- a COPY is not a command result: refused, not waited on forever
    v, err = r:command("COPY (SELECT 1) TO STDOUT")
    assert.is_nil(v); assert.equal("command returned PGRES_COPY_OUT, which command() does not handle "
      .. "(the connection is abandoned)", err)
    r:close()
  end)

  it("refuses a bad start clearly and quotes names", function()
    local r = connect()
    assert.has_error(function() r:start("x", 0, {}) end)
    assert.has_error(function() r:start("x", 0, { publication = "p", streaming = true }) end)
    assert.has_error(function() r:start("x", 0, { publication = "p", proto_version = 3 }) end)
    local v, err, state = r:start([[no"such'slot\]], 0, { publication = "p" })
    assert.is_nil(v)
    assert.equal("invalid replication slot name: only a-z, 0-9 and _, 1 to 63 of them", err)
    assert.equal("42602", state)
    -- names that need quoting reach the server intact (it finds no such slot, not a syntax error)
    v, err, state = r:start("no_such_slot", "0/0", { publications = { [[p'1"\]], "p2" } })
    assert.is_nil(v)
    assert.matches([[replication slot "no_such_slot" does not exist]], err, 1, true)
    assert.equal("42704", state)
    r:close()
  end)

  it("streams inserts, updates, deletes and truncate in commit order, typed", function()
    sql([[CREATE TABLE t1 (id int PRIMARY KEY, b bigint, n numeric, f float8, ok bool,
      s text, j json, jb jsonb, big text, z text)]])
    sql("ALTER TABLE t1 ALTER COLUMN big SET STORAGE EXTERNAL")
    local r, slot = stream("t1")
    H.finally(function() drop(r, slot) end)
    local bigval = ("é"):rep(300000) .. ("x"):rep(500000) -- > 1 MB
    sql([[BEGIN;
      INSERT INTO t1 VALUES (1, 9007199254740993, 12345678901234567890.5, 0.1, true, 'héllo ✓',
        '{"a":[1,2]}', '{"k":"v"}', NULL, NULL);
      INSERT INTO t1 (id, s) VALUES (2, 'two');
      COMMIT]])
    sql("INSERT INTO t1 (id, big, s) VALUES (3, repeat('é', 300000) || repeat('x', 500000), 'three')")
    sql("UPDATE t1 SET s = 'THREE' WHERE id = 3")                 -- big is unchanged TOAST
    sql("UPDATE t1 SET id = 20, ok = false WHERE id = 2")         -- key changes: old has the key
    sql("DELETE FROM t1 WHERE id = 1")
    sql("TRUNCATE t1")
    local got, err = collect(r, commits(6))
    assert.is_nil(err)
    local ch = changes(got)
    assert.equal(7, #ch)
    local ops = {}
    for i, m in ipairs(ch) do ops[i] = m.op end
    assert.same({ "INSERT", "INSERT", "INSERT", "UPDATE", "UPDATE", "DELETE", "TRUNCATE" },
      { ops[1], ops[2], ops[3], ops[4], ops[5], ops[6], ops[7] })
    local a = ch[1]
    assert.equal("insert", a.kind); assert.equal("public", a.schema); assert.equal("t1", a.table)
    assert.equal(1, a.new.id); assert.equal(9007199254740993, a.new.b)
    assert.equal("12345678901234567890.5", a.new.n); assert.equal(0.1, a.new.f)
    assert.is_true(a.new.ok); assert.equal("héllo ✓", a.new.s)
    assert.same({ a = { 1, 2 } }, a.new.j); assert.same({ k = "v" }, a.new.jb)
    assert.equal(pg.null, a.new.big); assert.equal(pg.null, a.new.z)
    assert.matches("^%x+/%x+$", a.lsn); assert.equal(core.lsn_parse(a.lsn), a.lsn_int)
    assert.equal(bigval, ch[3].new.big)
    assert.equal(core.unchanged, ch[4].new.big)
    assert.equal("pglisten.unchanged", tostring(core.unchanged))
    assert.equal("THREE", ch[4].new.s)
    assert.is_nil(ch[4].old)
    assert.same({ id = 2, b = pg.null, n = pg.null, f = pg.null, ok = pg.null, s = pg.null, j = pg.null,
      jb = pg.null, big = pg.null, z = pg.null }, ch[5].old)
    assert.equal("key", ch[5].old_kind)
    assert.equal(20, ch[5].new.id); assert.is_false(ch[5].new.ok)
    assert.equal(1, ch[6].old.id); assert.is_nil(ch[6].new)
    assert.equal("t1", ch[7].relations[1].table); assert.is_false(ch[7].cascade)
    -- transactions: begin ... commit, lsns rising
    local kinds, last = {}, 0
    for _, m in ipairs(got) do
      if m.kind ~= "relation" and m.kind ~= "keepalive" then kinds[#kinds + 1] = m.kind end
      if m.kind == "commit" then
        assert.is_true(m.end_lsn_int > last); last = m.end_lsn_int
        assert.is_true(math.abs(m.commit_time - os.time()) < 600)
      end
    end
    assert.same({ "begin", "insert", "insert", "commit", "begin", "insert", "commit" },
      { table.unpack(kinds, 1, 7) })
    local rel
    for _, m in ipairs(got) do if m.kind == "relation" then rel = m end end
    assert.equal(rel, r:relations()[rel.relid])
    assert.equal(ch[1].relid, rel.relid)
    r:close()
  end)

  it("in events mode hands a row change as its event, its position beside it", function()
    sql("CREATE TABLE tev (id int PRIMARY KEY, v text, n numeric, big text)")
    sql("ALTER TABLE tev ALTER COLUMN big SET STORAGE EXTERNAL")
    sql("ALTER TABLE tev REPLICA IDENTITY FULL")
    -- two slots on one publication: one read as messages, one as events
    local r1, slot = stream("tev")
    H.finally(function() drop(r1, slot) end)
    local r2, slot2 = R.stream_on(slot)
    H.finally(function() drop(r2, slot2) end)
    sql("INSERT INTO tev VALUES (1, 'one', 1.50, repeat('x', 100000)), (2, 'two', NULL, NULL)")
    sql("UPDATE tev SET v = 'ONE' WHERE id = 1")
    sql("DELETE FROM tev WHERE id = 2")
    sql("TRUNCATE tev")
    local msgs = collect(r1, commits(4))
    local evs, info = {}, { lsn = {}, relid = {}, wal_end = 0 }
    local deadline = pg.monotonic() + 20
    local ncommits = 0
    while ncommits < 4 and pg.monotonic() < deadline do
      local got, inf = assert(r2:read(3, "events")) -- small reads: the arrays are per read
      assert.is_table(inf); assert.equal("integer", math.type(inf.wal_end))
      for i, m in ipairs(got) do
        evs[#evs + 1] = m
        info.lsn[#evs], info.relid[#evs] = inf.lsn[i], inf.relid[i]
        if m.kind == "commit" then ncommits = ncommits + 1 end
        if m.kind == nil then assert.is_true(inf.wal_end >= inf.lsn[i]) end
      end
      if inf.wal_end > info.wal_end then info.wal_end = inf.wal_end end
      if #got == 0 then core.poll({ r2:pollfd() }, 0.5) end
    end
    -- keepalives come when they come on each slot, and a walsender may send a
    -- relation's description again when it likes (an invalidation): both
    -- streams are compared without them
    local function drop_keepalives(list, inf)
      local out, oi = {}, { lsn = {}, relid = {} }
      for i, m in ipairs(list) do
        if m.kind ~= "keepalive" and m.kind ~= "relation" then
          out[#out + 1] = m
          if inf then oi.lsn[#out], oi.relid[#out] = inf.lsn[i], inf.relid[i] end
        end
      end
      oi.wal_end = inf and inf.wal_end
      return out, oi
    end
    msgs = drop_keepalives(msgs)
    evs, info = drop_keepalives(evs, info)
    local function kinds(list)
      local k = {}
      for i, m in ipairs(list) do k[i] = m.kind or m.op end
      return table.concat(k, " ")
    end
    assert.equal(kinds(msgs):gsub("insert", "INSERT"):gsub("update", "UPDATE"):gsub("delete", "DELETE"), kinds(evs))
    local nchanges = 0
    for i, m in ipairs(msgs) do
      local e = evs[i]
      if m.op and m.kind ~= "truncate" then
        nchanges = nchanges + 1
        assert.is_nil(e.kind)
        local keys = {}
        for k in pairs(e) do keys[#keys + 1] = k end
        table.sort(keys)
        -- exactly the handler contract, nothing of the wire
        assert.same(m.kind == "insert" and { "new", "op", "schema", "table" }
          or m.kind == "delete" and { "old", "op", "schema", "table" }
          or { "new", "old", "op", "schema", "table" }, keys)
        assert.same({ op = m.op, schema = m.schema, table = m.table, new = m.new, old = m.old }, e)
        assert.equal(m.lsn_int, info.lsn[i]); assert.equal(m.lsn, core.lsn_format(info.lsn[i]))
        assert.equal(m.relid, info.relid[i])
      else
        assert.equal(m.kind, e.kind)
        assert.is_nil(info.lsn[i])
        if m.kind == "commit" then assert.equal(m.end_lsn_int, e.end_lsn_int) end
      end
    end
    assert.equal(4, nchanges)
    assert.is_true(info.wal_end > 0)
  end)

  it("decodes a relation altered mid-stream with its new shape", function()
    sql("CREATE TABLE t2 (id int PRIMARY KEY, a text)")
    local r, slot = stream("t2")
    H.finally(function() drop(r, slot) end)
    sql("INSERT INTO t2 VALUES (1, 'x')")
    sql("CREATE TYPE mood AS ENUM ('ok', 'sad')")
    sql("ALTER TABLE t2 ADD COLUMN c int DEFAULT 7, ADD COLUMN m mood")
    sql("INSERT INTO t2 VALUES (2, 'y', 8, 'sad')")
    local got, err = collect(r, commits(2))
    assert.is_nil(err)
    local ch = changes(got)
    assert.same({ id = 1, a = "x" }, ch[1].new)
    assert.same({ id = 2, a = "y", c = 8, m = "sad" }, ch[2].new)
    local ty
    for _, m in ipairs(got) do if m.kind == "type" then ty = m end end
    assert.equal("mood", ty.name); assert.equal("public", ty.schema)
    assert.equal(tonumber(sql("SELECT 'mood'::regtype::oid")), ty.type)
    local rels = 0
    for _, m in ipairs(got) do
      if m.kind == "relation" then
        rels = rels + 1
        assert.equal("t2", m.table); assert.equal("d", m.replident)
        assert.is_true(m.columns[1].key); assert.equal("id", m.columns[1].name); assert.equal(23, m.columns[1].type)
      end
    end
    assert.equal(2, rels)
    assert.equal(4, #r:relations()[ch[2].relid].columns)
    r:close()
  end)

  it("sends keepalives, confirm advances confirmed_flush_lsn, finish ends cleanly", function()
    sql("CREATE TABLE t3 (id int PRIMARY KEY)")
    local r, slot = stream("t3")
    H.finally(function() drop(r, slot) end)
    sql("INSERT INTO t3 VALUES (1)")
    local got = collect(r, commits(1))
    local commit
    for _, m in ipairs(got) do if m.kind == "commit" then commit = m end end
    assert(commit)
    assert.is_true(r:confirm(commit.end_lsn_int, commit.end_lsn, nil, false))
    assert.truthy(H.eventually(function()
      local v = sql(("SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot))
      return core.lsn_parse(v) >= commit.end_lsn_int
    end, 15))
    -- the server asks for a reply at wal_sender_timeout / 2 at the latest
    r:confirm(commit.end_lsn_int)
    got = collect(r, function(g) return count("keepalive")(g) > 0 end, 30)
    local k
    for _, m in ipairs(got) do if m.kind == "keepalive" then k = m end end
    assert(k, "no keepalive")
    assert.is_boolean(k.reply_requested); assert.is_true(k.wal_end_int >= commit.end_lsn_int)
    assert.is_true(r:finish())
    assert.is_false(r:streaming())
    local v, err = r:read()
    assert.is_nil(v); assert.equal("replication stream ended", err)
    assert.equal(1, assert(r:command("SELECT 1 AS one"))[1].one) -- usable again
    r:close()
  end)

  it("reports a terminated walsender clearly from read", function()
    sql("CREATE TABLE t4 (id int PRIMARY KEY)")
    local r, slot = stream("t4")
    H.finally(function() drop(r, slot) end)
    local pid = r:pid()
    sql(("SELECT pg_terminate_backend(%d)"):format(pid))
    local got, err, state = collect(r, function() return false end, 20)
    assert.equal(0, #changes(got))
    assert.is_string(err)
    assert.matches("terminat", err)
    assert.is_truthy(state == "57P01" or state == "08006", state)
    assert.is_false(r:streaming())
    r:close()
  end)
end)

-- The decoder fed real messages, truncated and mutated.
describe("pgoutput decoder", function()
  local samples
  setup(function()
    sql([[CREATE TABLE tf (id int PRIMARY KEY, n numeric, j jsonb, s text, f float8)]])
    sql("ALTER TABLE tf REPLICA IDENTITY FULL")
    local r, slot = stream("tf", { messages = true })
    sql([[INSERT INTO tf VALUES (1, 1.5, '{"a":[1,{"b":null}]}', 'é', 1e300), (2, NULL, NULL, NULL, NULL)]])
    sql("UPDATE tf SET s = 'x' WHERE id = 1")
    sql("DELETE FROM tf WHERE id = 2")
    sql("SELECT pg_logical_emit_message(true, 'pfx', 'payload')")
    sql("TRUNCATE tf")
    samples = {}
    local deadline = pg.monotonic() + 20
    local ncommit = 0
    while ncommit < 5 and pg.monotonic() < deadline do
      local msgs = assert(r:read(100, true))
      for _, raw in ipairs(msgs) do
        samples[#samples + 1] = raw
        if raw:byte(1) == 119 and raw:byte(26) == 67 then ncommit = ncommit + 1 end
      end
      core.poll({ r:pollfd() }, 0.5)
    end
    r:close()
    drop(nil, slot)
  end)

  it("decodes the captured messages whole", function()
    local rels, kinds = {}, {}
    for _, raw in ipairs(samples) do
      local m = assert(core.pgoutput_decode(raw, rels))
      kinds[m.kind] = (kinds[m.kind] or 0) + 1
      if m.kind == "update" then
        assert.equal("full", m.old_kind); assert.equal("é", m.old.s); assert.equal("x", m.new.s)
        assert.equal(1e300, m.new.f); assert.equal(pg.null, m.new.j.a[2].b)
      elseif m.kind == "message" then
        assert.equal("pfx", m.prefix); assert.equal("payload", m.content); assert.is_true(m.transactional)
      end
    end
    for _, k in ipairs { "begin", "commit", "relation", "insert", "update", "delete", "truncate", "message" } do
      assert.truthy(kinds[k], k)
    end
  end)

  it("refuses unknown relations, unknown kinds, binary and streamed messages clearly", function()
    local hdr = "w" .. ("\0"):rep(24)
    local v, err = core.pgoutput_decode(hdr .. "I" .. string.pack(">I4", 99) .. "N\0\0", {})
    assert.is_nil(v); assert.matches("relation 99, which no Relation message described", err)
    v, err = core.pgoutput_decode(hdr .. "S" .. string.pack(">I4B", 5, 1), {})
    assert.is_nil(v); assert.matches("streamed or prepared transaction", err)
    v, err = core.pgoutput_decode(hdr .. "Z", {})
    assert.is_nil(v); assert.matches("unknown message type 0x5a", err)
    v, err = core.pgoutput_decode("x", {})
    assert.is_nil(v); assert.matches("unknown CopyData message type", err)
    v, err = core.pgoutput_decode(hdr .. "B" .. ("\0"):rep(10), {})
    assert.is_nil(v); assert.equal("pgoutput: truncated Begin message at byte 34", err)
    local function relation(relid, natts)
      local cols = ""
      for i = 1, natts do cols = cols .. string.pack(">BzI4i4", 1, "c" .. i, 25, -1) end
      return hdr .. "R" .. string.pack(">I4zzBI2", relid, "s", "t", 100, natts) .. cols
    end
    local function insert(relid, ...)
      local cols = ""
      for _, c in ipairs { ... } do
        cols = cols .. (#c == 1 and c or c:sub(1, 1) .. string.pack(">s4", c:sub(2)))
      end
      return hdr .. "I" .. string.pack(">I4BI2", relid, 78, select("#", ...)) .. cols
    end
    local rels = {}
    assert(core.pgoutput_decode(relation(7, 1), rels))
    assert.same({ c1 = "x" }, assert(core.pgoutput_decode(insert(7, "tx"), rels)).new)
    v, err = core.pgoutput_decode(insert(7, "bx"), rels)
    assert.is_nil(v); assert.matches("binary column value in Insert message", err)
    v, err = core.pgoutput_decode(insert(7, "tx") .. "y", rels)
    assert.is_nil(v); assert.equal("pgoutput: 1 unexpected bytes after the Insert message", err)
    v, err = core.pgoutput_decode(insert(7, "tx", "n"), rels)
    assert.is_nil(v); assert.equal("pgoutput: Insert message has 2 columns, its relation 1", err)
    v, err = core.pgoutput_decode(insert(7, "\0"), rels)
    assert.is_nil(v); assert.matches("unknown column kind 0x00 in Insert message at byte 33", err, 1, true)
    -- a count beyond the bytes left is refused before anything is built
    v, err = core.pgoutput_decode(relation(8, 2):sub(1, 40) .. string.pack(">I2", 65535), rels)
    assert.is_nil(v); assert.matches("^pgoutput: truncated Relation message at byte", err)
    v, err = core.pgoutput_decode(hdr .. "T" .. string.pack(">I4B", 1000000, 0), rels)
    assert.is_nil(v); assert.equal("pgoutput: truncated Truncate message at byte 31", err)
    -- a new Relation message replaces the old shape
    assert(core.pgoutput_decode(relation(7, 2), rels))
    assert.same({ c1 = "a", c2 = pg.null }, assert(core.pgoutput_decode(insert(7, "ta", "n"), rels)).new)
    assert.equal(core.unchanged, assert(core.pgoutput_decode(insert(7, "ta", "u"), rels)).new.c2)
  end)

  it("returns a value or nil, err for 30,000 truncated and bit-flipped messages", function()
    assert.is_true(#samples >= 10)
    local rng = 4242
    local function rand(n) rng = (rng * 1103515245 + 12345) % 2147483648; return rng % n + 1 end
    local ok, bad = 0, 0
    local base = {}
    for _, raw in ipairs(samples) do assert(core.pgoutput_decode(raw, base)) end
    for i = 1, 30000 do
      local s = samples[i % #samples + 1]
      if rand(3) == 1 then
        s = s:sub(1, rand(#s) - 1)                                 -- truncated
      else
        for _ = 1, rand(4) do                                      -- bits flipped
          local at = rand(#s)
          s = s:sub(1, at - 1) .. string.char(s:byte(at) ~ (1 << (rand(8) - 1))) .. s:sub(at + 1)
        end
      end
      local rels = {}
      for k, rel in pairs(base) do rels[k] = rel end
      local v, err = core.pgoutput_decode(s, rels)
      if v == nil then
        bad = bad + 1
        assert.is_string(err)
        assert.matches("^[%a ]+: ", err, 1, false, s)
      else
        ok = ok + 1
        assert.is_table(v); assert.is_string(v.kind)
      end
    end
    assert.is_true(ok > 100 and bad > 1000, ("decoded %d, refused %d"):format(ok, bad))
  end)
end)
