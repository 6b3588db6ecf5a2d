-- Breaking 01e1399 (repl:read(n, "events"): a row change is its event, its
-- LSN and relation id in a second result at the same index) and a90dee0
-- (256 messages per turn).  Raw connections first, then the runner.
local H = require "spec.helpers"
local C = require "spec.cdc_helpers"
local pg = H.pg
local core = pg.core

local dbname, conninfo = H.createdb("bev")
local function sql(s) return H.psql(s, dbname) end

-- Raw replication connections: stream(pub) streams a new slot on
-- publication `pub`; drop_slot(r, slot) closes r and drops the slot.
local R = C.core(dbname, conninfo, "bev")
local slotname, stream, drop_slot = R.slotname, R.stream_on, R.drop

-- Every read's alignment: info.lsn/relid/size hold exactly the indices
-- of the row changes (no kind), nothing else, and nothing past #msgs;
-- info.bytes is at least their sizes' sum.
local function check_aligned(msgs, info)
  assert.is_table(info, "a read that returned messages returned no info")
  local fields = {}
  for f in pairs(info) do fields[#fields + 1] = f end
  table.sort(fields)
  assert.same({ "bytes", "lsn", "relid", "size", "wal_end" }, fields)
  local sum = 0
  for _, n in pairs(info.size) do
    assert.is_true(math.type(n) == "integer" and n > 0)
    sum = sum + n
  end
  assert.is_true(info.bytes >= sum and (#msgs == 0) == (info.bytes == 0))
  for _, f in ipairs({ "lsn", "relid", "size" }) do
    for k in pairs(info[f]) do
      assert.equal("integer", math.type(k))
      assert.is_true(k >= 1 and k <= #msgs, f .. " has index " .. k .. " past the messages")
      assert.is_nil(msgs[k].kind, f .. "[" .. k .. "] belongs to a " .. tostring(msgs[k].kind))
    end
  end
  for i, m in ipairs(msgs) do
    if m.kind == nil then
      assert.equal("integer", math.type(info.lsn[i]))
      assert.equal("integer", math.type(info.relid[i]))
      assert.is_true(info.wal_end >= info.lsn[i])
    end
  end
end

-- Reads in events mode (reads of `max`) until `commits` commits came.
local function read_events(r, commits, max)
  local out, n = {}, 0
  local deadline = pg.monotonic() + 20
  while n < commits and pg.monotonic() < deadline do
    local msgs, info = assert(r:read(max or 1000, "events"))
    check_aligned(msgs, info)
    for i, m in ipairs(msgs) do
      local lsn = info.lsn[i]
      out[#out + 1] = { m = m, lsn = lsn, text = lsn and core.lsn_format(lsn), relid = info.relid[i],
        size = info.size[i], wal_end = info.wal_end }
      if m.kind == "commit" then n = n + 1 end
    end
    if #msgs == 0 then core.poll({ r:pollfd() }, 0.3) end
  end
  return out
end

-- The changes pg itself decodes for `slot` (an SQL slot on the same
-- publication): { lsn text, first byte } of every Insert/Update/Delete/Truncate.
local function peek(slot, pub)
  local rows = sql(([[SELECT string_agg(lsn::text || ' ' || chr(get_byte(data, 0)), ',' ORDER BY ord)
    FROM (SELECT lsn, data, row_number() OVER () AS ord FROM pg_logical_slot_peek_binary_changes('%s', NULL, NULL,
      'proto_version', '1', 'publication_names', '%s')) s WHERE get_byte(data, 0) IN (73, 85, 68, 84)]])
    :format(slot, pub))
  local out = {}
  for lsn, k in rows:gmatch("(%x+/%x+) (%a)") do out[#out + 1] = { lsn = lsn, k = k } end
  return out
end

describe("events mode, broken on purpose", function()
  it("keeps every change's LSN and relation at its own index past relations, keepalives, truncates (guard)", function()
    sql([[CREATE TABLE ea (id int PRIMARY KEY, v text);
      CREATE TABLE eb (id int PRIMARY KEY, v text);
      CREATE TABLE ef (id int PRIMARY KEY, v text, big text);
      ALTER TABLE ef ALTER COLUMN big SET STORAGE EXTERNAL;
      ALTER TABLE ef REPLICA IDENTITY FULL;
      CREATE PUBLICATION bevpub FOR TABLE ea, eb, ef]])
    local sqlslot = slotname()
    sql(("SELECT pg_create_logical_replication_slot('%s', 'pgoutput')"):format(sqlslot))
    local r, slot = stream("bevpub")
    local r2, slot2 = stream("bevpub") -- the same, read two messages at a time
    H.finally(function()
      drop_slot(r, slot)
      drop_slot(r2, slot2)
      sql(("SELECT pg_drop_replication_slot('%s')"):format(sqlslot))
    end)
    sql([[BEGIN;
      INSERT INTO ea VALUES (1, 'a1');
      INSERT INTO eb VALUES (1, 'b1');
      INSERT INTO ef VALUES (1, 'f1', repeat('x', 200000));
      ALTER TABLE ea ADD COLUMN w int;
      INSERT INTO ea VALUES (2, 'a2', 7);
      UPDATE ea SET id = 3 WHERE id = 1;
      UPDATE ef SET v = 'F1' WHERE id = 1;
      DELETE FROM eb WHERE id = 1;
      TRUNCATE ea, eb;
      COMMIT]])
    sql("INSERT INTO eb VALUES (5, 'b5')")
    C.wait_sent({ slot, slot2 }) -- both transactions in the socket: one read takes them
    local got = read_events(r, 2, 1000)
    local small = read_events(r2, 2, 2)
    local function positions(list)
      local out = {}
      for _, g in ipairs(list) do
        if g.m.kind == nil then out[#out + 1] = g.text .. " " .. g.relid .. " " .. g.m.op end
      end
      return out
    end
    assert.same(positions(got), positions(small))
    -- the 200,000-byte value's change is that large on the wire
    local big = 0
    for _, g in ipairs(got) do big = math.max(big, g.size or 0) end
    assert.is_true(big > 200000, "largest change " .. big)
    local want = peek(sqlslot, "bevpub")
    local changes, truncs = {}, {}
    for _, g in ipairs(got) do
      if g.m.kind == nil then changes[#changes + 1] = g
      elseif g.m.kind == "truncate" then truncs[#truncs + 1] = g end
    end
    -- pg's own decoding: 8 row changes and one Truncate, each at its LSN
    assert.equal(9, #want)
    assert.equal(8, #changes)
    assert.equal(1, #truncs)
    local w = 0
    for _, p in ipairs(want) do
      w = w + 1
      if p.k == "T" then
        assert.equal(p.lsn, truncs[1].m.lsn)
        w = w - 1
      else
        assert.equal(p.lsn, changes[w].text, "change " .. w)
      end
    end
    local ea = tonumber(sql("SELECT 'ea'::regclass::oid"))
    local ef = tonumber(sql("SELECT 'ef'::regclass::oid"))
    -- update with a key change: old is the key; identity FULL: the unchanged
    -- TOAST value is pglisten.unchanged in new, old has the row
    local up = changes[5].m
    assert.same({ op = "UPDATE", schema = "public", table = "ea", old = { id = 1, v = pg.null, w = pg.null },
      new = { id = 3, v = "a1", w = pg.null } }, up)
    assert.equal(ea, changes[5].relid)
    local full = changes[6].m
    assert.equal(ef, changes[6].relid)
    assert.equal(pg.unchanged, full.new.big)
    assert.equal("F1", full.new.v)
    assert.equal("f1", full.old.v)
    assert.same({ "TRUNCATE" }, { truncs[1].m.op })
    assert.equal(2, #truncs[1].m.relations)
  end)

  it("hands the info back with the messages of a read that ends at the stream's end (guard)", function()
    sql([[CREATE TABLE ee (id int PRIMARY KEY); CREATE PUBLICATION bevend FOR TABLE ee]])
    local r, slot = stream("bevend")
    H.finally(function() drop_slot(r, slot) end)
    for i = 1, 3 do sql(("INSERT INTO ee VALUES (%d)"):format(i)) end
    C.wait_sent({ slot }, 10) -- the three transactions in the socket
    pg.sleep(0.3) -- from sent_lsn to the bytes in our socket, under the load of a parallel suite too
    sql(("SELECT pg_terminate_backend(%d)"):format(r:pid()))
    -- and the end of the stream behind them: the walsender is gone
    assert.truthy(H.eventually(function()
      return sql(("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '%s' AND active"):format(slot)) == "0"
    end, 10))
    pg.sleep(0.05)
    local server_end = core.lsn_parse(sql("SELECT pg_current_wal_insert_lsn()"))
    local ids, reads, err = {}, 0, nil
    for _ = 1, 50 do
      local msgs, info = r:read(1000, "events")
      if not msgs then err = info break end
      reads = reads + 1
      check_aligned(msgs, info)
      assert.is_true(info.wal_end <= server_end, "wal_end past what the server wrote")
      for i, m in ipairs(msgs) do
        if m.kind == nil then ids[#ids + 1] = m.new.id; assert.is_truthy(info.lsn[i]) end
      end
    end
    assert.same({ 1, 2, 3 }, ids)
    assert.is_string(err)
    assert.is_nil((r:read(1000, "events")))
  end)

  it("stops a read once its messages reach max_bytes, one message at least, and the next read goes on", function()
    sql([[CREATE TABLE eby (id int PRIMARY KEY, v text); CREATE PUBLICATION bevbytes FOR TABLE eby]])
    local r, slot = stream("bevbytes")
    H.finally(function() drop_slot(r, slot) end)
    sql("INSERT INTO eby SELECT g, repeat('v', 10000) FROM generate_series(1, 3) g")
    C.wait_sent({ slot }, 10)
    local ids, sizes, deadline = {}, {}, pg.monotonic() + 20
    while #ids < 3 and pg.monotonic() < deadline do
      local msgs, info = assert(r:read(1000, "events", 1))
      check_aligned(msgs, info)
      assert.is_true(#msgs <= 1, "a read of max_bytes 1 took " .. #msgs)
      if msgs[1] and msgs[1].kind == nil then ids[#ids + 1], sizes[#sizes + 1] = msgs[1].new.id, info.size[1] end
      if #msgs == 0 then core.poll({ r:pollfd() }, 0.3) end
    end
    assert.same({ 1, 2, 3 }, ids)
    for _, n in ipairs(sizes) do assert.is_true(n > 10000) end
  end)

  it("fails a read whose third message cannot be decoded with nil, err alone: no info, no half read (guard)",
    function()
      sql([[CREATE TABLE xa (id int PRIMARY KEY); CREATE TABLE xb (id int PRIMARY KEY);
        CREATE PUBLICATION bevbad FOR TABLE xa, xb]])
      local r, slot = stream("bevbad")
      H.finally(function() drop_slot(r, slot) end)
      -- Begin, Relation xa, Insert xa, Relation xb, Insert xb, Insert xa, Commit
      sql("BEGIN; INSERT INTO xa VALUES (1); INSERT INTO xb VALUES (1); INSERT INTO xa VALUES (2); COMMIT")
      C.wait_sent({ slot })
      -- read raw (the relation map is not updated) up to and including xa's Insert
      local seen = ""
      local deadline = pg.monotonic() + 20
      while not seen:find("BRI$") and pg.monotonic() < deadline do
        local raw = assert(r:read(1, true))
        if raw[1] and raw[1]:sub(1, 1) == "w" then seen = seen .. raw[1]:sub(26, 26) end
        if not raw[1] then core.poll({ r:pollfd() }, 0.3) end
      end
      assert.equal("BRI", seen)
      -- now Relation xb, Insert xb decode; Insert xa names a relation never seen
      local res = table.pack(r:read(1000, "events"))
      assert.equal(2, res.n)
      assert.is_nil(res[1])
      assert.is_string(res[2])
      assert.matches("relation", res[2])
    end)

  it("raises on a mode it does not know instead of reading raw bytes (\"event\" for \"events\")", function()
    sql([[CREATE TABLE xm (id int PRIMARY KEY); CREATE PUBLICATION bevmode FOR TABLE xm]])
    local r, slot = stream("bevmode")
    H.finally(function() drop_slot(r, slot) end)
    sql("INSERT INTO xm VALUES (1)")
    C.wait_sent({ slot }, 0.5)
    for _, bad in ipairs({ "event", "EVENTS", 1, {} }) do
      local ok, err = pcall(r.read, r, 10, bad)
      assert.is_false(ok, "mode " .. tostring(bad) .. " was taken")
      assert.matches("mode", err)
    end
    -- the known ones still read: raw CopyData payloads, then decoded events
    local got = {}
    local deadline = pg.monotonic() + 10
    while #got == 0 and pg.monotonic() < deadline do
      local raw = assert(r:read(1, "raw"))
      for _, m in ipairs(raw) do got[#got + 1] = m end
      if #got == 0 then core.poll({ r:pollfd() }, 0.3) end
    end
    assert.equal("string", type(got[1]))
    assert.is_table((r:read(10, "events")))
    assert.is_table((r:read(10, false)))
    assert.is_table((r:read(10, true)))
  end)
end)

describe("the replication source in events mode, broken on purpose", function()
  it("gives each routed event its note LSN as pg prints it, skips an unrouted table with one warning (guard)",
    function()
      local src, _, slot = C.setup("bevr")
      C.sql([[CREATE TABLE ra (id int PRIMARY KEY, v text); CREATE TABLE rb (id int PRIMARY KEY, v text);
        CREATE TABLE rc (id int PRIMARY KEY)]], src)
      C.sql(("CREATE PUBLICATION %s FOR TABLE ra, rb, rc"):format(slot), src)
      local peekslot = slot .. "_p"
      C.sql(("SELECT pg_create_logical_replication_slot('%s', 'pgoutput')"):format(peekslot), src)
      local path = H.script(([[
local seen = {}
local function keys(t)
  local k = {}
  for n in pairs(t) do k[#k + 1] = n end
  table.sort(k)
  return table.concat(k, ",")
end
return {
  replication = { slot = %q },
  channels = {
    ["public.ra"] = { source = "replication", retry = { attempts = 5, backoff = 0, max_backoff = 0 },
      handler = function(ev, note)
        local id = ev.new and ev.new.id or ev.old and ev.old.id or "-"
        out("EV", ev.op, id, note.lsn, pglisten.core.lsn_format(note.lsn_int) == note.lsn, keys(ev),
          keys(pglisten.json.decode(pglisten.json.encode(ev))))
        if id == 2 and not seen[2] then seen[2] = true; error("once") end
      end },
    ["public.rc"] = { source = "replication", handler = function(ev, note)
      out("RC", ev.op, note.lsn, note.seq, note.commit_lsn, keys(ev))
    end },
  },
}
]]):format(slot))
      local p = C.start(path, src)
      H.finally(function()
        C.cleanup({ p }, src, slot)
        C.sql(("SELECT pg_drop_replication_slot('%s')"):format(peekslot))
      end)
      C.sql("BEGIN; INSERT INTO ra VALUES (1, 'a'); INSERT INTO rb VALUES (1, 'b'); COMMIT", src)
      C.sql("INSERT INTO ra VALUES (2, 'a')", src)
      C.sql([[BEGIN; UPDATE ra SET id = 10 WHERE id = 1; INSERT INTO rb VALUES (2, 'b');
        DELETE FROM ra WHERE id = 2; COMMIT]], src)
      C.sql("TRUNCATE ra, rb, rc", src)
      local ok = H.eventually(function()
        return H.count_matches(p.stdout(), "EV ") >= 6 and H.count_matches(p.stdout(), "RC ") >= 1
      end, 20)
      assert.is_truthy(ok, p.stdout() .. p.stderr())
      -- pg's LSN of every change of ra (I/U/D with ra's relid) and of the Truncate
      local want = C.sql(([[SELECT string_agg(lsn::text, ' ' ORDER BY ord) FROM (
        SELECT lsn, data, row_number() OVER () AS ord FROM pg_logical_slot_peek_binary_changes('%s', NULL, NULL,
          'proto_version', '1', 'publication_names', '%s')) s
        WHERE (get_byte(data, 0) IN (73, 85, 68) AND ((get_byte(data, 1)::bigint << 24) | (get_byte(data, 2) << 16)
          | (get_byte(data, 3) << 8) | get_byte(data, 4)) = 'ra'::regclass::oid::bigint) OR get_byte(data, 0) = 84]])
        :format(peekslot, slot), src)
      local w = {}
      for l in want:gmatch("%S+") do w[#w + 1] = l end
      table.insert(w, 3, w[2]) -- the retry of id 2: the same change again
      local lines = {}
      for l in p.stdout():gmatch("EV [^\n]*") do lines[#lines + 1] = l end
      local function ev(op, id, i, k)
        return ("EV %s %s %s true %s %s"):format(op, id, w[i], k, k)
      end
      assert.same({
        ev("INSERT", 1, 1, "new,op,schema,table"),
        ev("INSERT", 2, 2, "new,op,schema,table"),
        ev("INSERT", 2, 3, "new,op,schema,table"),
        ev("UPDATE", 10, 4, "new,old,op,schema,table"),
        ev("DELETE", 2, 5, "old,op,schema,table"),
        ev("TRUNCATE", "-", 6, "op,schema,table"),
      }, lines)
      -- the status update's write position: never past what the walsender sent
      assert.is_truthy(H.eventually(function()
        return C.sql(("SELECT write_lsn IS NOT NULL AND write_lsn >= '%s' FROM pg_stat_replication r JOIN "
          .. "pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = '%s'"):format(w[6], slot), src) == "t"
      end, 15))
      assert.equal("t", C.sql(("SELECT bool_and(write_lsn <= sent_lsn AND flush_lsn <= write_lsn) FROM "
        .. "pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = '%s'")
        :format(slot), src))
      -- one TRUNCATE of three tables: rc's event at the same LSN, third in its transaction
      local rc = p.stdout():match("RC [^\n]*")
      assert.matches("^RC TRUNCATE " .. w[6]:gsub("%p", "%%%0") .. " 3 %x+/%x+ op,schema,table$", rc)
      assert.equal(1, H.count_matches(p.stderr(), "no channel serves"), p.stderr())
      assert.truthy(p.stderr():find("public.rb", 1, true))
    end)

end)
