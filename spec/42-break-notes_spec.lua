-- Breaking the lazy replication notes (c4d738a, a111966): a change's note is
-- made from the queue's arrays and its transaction's table, only for the
-- eyes that can see it.  Each test here was written to break a promise of
-- README's "Change data capture" (complete, correct notes for every handler
-- that can see them, on_error and pglisten.dead; new table shapes decoded
-- mid-stream; reloads that change a handler's arity).  The first test
-- failed on c4d738a (received_at kept in the transaction's one table: every
-- row of a long transaction "received" at its Begin's read); the others are
-- guards that held.
local H = require "spec.helpers"

local C = require "spec.cdc_helpers"

-- Starts a runner on `body` (after TARGET and out()) once the SQL of
-- `tables` ran (SLOT in either: the slot's name, also the publication's),
-- cleaned up at the end.
local function runner(tag, body, tables, install)
  local src, dst, slot = C.setup(tag)
  for _, t in ipairs(tables or {}) do C.sql((t:gsub("SLOT", slot)), src) end
  if install then
    local rc, _, ierr = H.run_runner({ "--install", "--db", "dbname=" .. src })
    assert.equal(0, rc, ierr)
  end
  local path = C.script(dst, (body:gsub("SLOT", slot)))
  local p = C.start(path, src)
  H.finally(function() C.cleanup({ p }, src, slot) end)
  return p, src, dst, slot, path
end

describe("replication notes, broken on purpose", function()
  it("say a change was received when the read that brought it ran, not when its transaction began", function()
    -- 30,000 rows in one transaction: the queue holds at most read_ahead
    -- (10,000) items, so the last rows are read only after the first
    -- batches were handled; their received_at cannot be before that
    local p, src = runner("rcv", [[
return {
  replication = { slot = "SLOT" },
  channels = {
    ["public.big"] = { source = "replication", batch = 1000, handler = function(events, notes)
      out("B", #events, ("%.6f"):format(pglisten.now()), ("%.6f"):format(notes[1].received_at),
        ("%.6f"):format(notes[#notes].received_at))
      for i, n in ipairs(notes) do
        if n.seq ~= events[i].new.id or not (n.xid and n.system_id) then out("BADSEQ", events[i].new.id, n.seq) end
      end
      pglisten.sleep(0.02)
    end },
  },
}
]], { "CREATE TABLE big (id int PRIMARY KEY)" })
    C.sql("INSERT INTO big SELECT g FROM generate_series(1, 30000) g", src)
    local calls, rows
    assert.truthy(H.eventually(function()
      calls, rows = {}, 0
      for _, l in ipairs(H.lines(p.stdout())) do
        local k, at, r1, rn = l:match("^B (%d+) (%S+) (%S+) (%S+)$")
        if k then
          calls[#calls + 1] = { at = tonumber(at), r1 = tonumber(r1), rn = tonumber(rn) }
          rows = rows + tonumber(k)
        end
      end
      return rows >= 30000
    end, 60), p.stdout() .. p.stderr())
    assert.equal(30000, rows)
    -- a table per read, yet seq counts on across the reads
    assert.is_nil(p.stdout():find("BADSEQ"), p.stdout():match("BADSEQ[^\n]*"))
    for i, c in ipairs(calls) do
      -- nothing is handled before it is received, and received_at grows
      assert.is_true(c.r1 <= c.at + 1e-3 and c.r1 <= c.rn, "batch " .. i)
      if i > 1 then assert.is_true(c.r1 >= calls[i - 1].rn, "batch " .. i) end
    end
    -- the last rows came in after the first batch was handled
    assert.is_true(calls[#calls].rn > calls[1].at,
      ("the last row's received_at %.6f is before the first batch was handled (%.6f)"):format(calls[#calls].rn,
        calls[1].at))
  end)

  -- The check a handler runs on every note it gets: all 11 fields, of their
  -- kinds, seq == the row's id (one table per transaction, ids in order).
  local CHECK = [[
local KINDS = { channel = "string", lsn = "string", lsn_int = "integer", commit_lsn = "string", xid = "integer",
  commit_time = "float", received_at = "float", seq = "integer", slot = "string", system_id = "string",
  database = "string" }
local function check(tag, ev, note)
  local n = 0
  for k in pairs(note) do n = n + 1 end
  for k, kind in pairs(KINDS) do
    local v = note[k]
    if (math.type(v) or type(v)) ~= kind then out("BAD", tag, ev.new.id, k, tostring(v)) end
  end
  if n ~= 11 then out("BAD", tag, ev.new.id, "fields", n) end
  if note.seq ~= ev.new.id then out("BAD", tag, ev.new.id, "seq", note.seq) end
  if note.lsn ~= pglisten.core.lsn_format(note.lsn_int) then out("BAD", tag, ev.new.id, "lsn", note.lsn) end
  if note.slot ~= "SLOT" then out("BAD", tag, ev.new.id, "slot", note.slot) end
end
]]

  -- ids handled, from lines "TAG n first last"
  local function spans(out, tags)
    local got, total = {}, 0
    for _, l in ipairs(H.lines(out)) do
      local t, n, a, b = l:match("^(%u%w*) (%d+) (%d+) (%d+)$")
      if t and tags[t] then
        got[#got + 1] = { t, tonumber(a), tonumber(b) }
        total = total + tonumber(n)
        assert.equal(tonumber(b) - tonumber(a) + 1, tonumber(n), l)
      end
    end
    return got, total
  end

  it("reach a handler whose reload mid-transaction makes it take them, whole and counted on", function()
    local V1 = [[
return {
  replication = { slot = "SLOT" },
  channels = {
    ["public.r"] = { source = "replication", batch = 500, handler = function(events)
      out("V1", #events, events[1].new.id, events[#events].new.id)
      pglisten.sleep(0.03)
    end },
  },
}
]]
    local V2 = CHECK .. [[
return {
  replication = { slot = "SLOT" },
  channels = {
    ["public.r"] = { source = "replication", batch = 500, handler = function(events, notes)
      for i, ev in ipairs(events) do check("V2", ev, notes[i]) end
      out("V2", #events, events[1].new.id, events[#events].new.id)
      pglisten.sleep(0.03)
    end },
  },
}
]]
    local p, src, _, slot, path = runner("arity", V1, { "CREATE TABLE r (id int PRIMARY KEY)" })
    C.sql("INSERT INTO r SELECT g FROM generate_series(1, 30000) g", src)
    assert.truthy(H.eventually(function() return p.stdout():find("V1 ") end, 20), p.stderr())
    H.rewrite(path, (V2:gsub("SLOT", slot)))
    p.kill("HUP")
    local got, total
    assert.truthy(H.eventually(function()
      got, total = spans(p.stdout(), { V1 = true, V2 = true })
      return total >= 30000
    end, 60), p.stdout() .. p.stderr())
    assert.equal(30000, total)
    local nexti, v2 = 1, 0
    for _, g in ipairs(got) do
      assert.equal(nexti, g[2], "in order, none twice")
      nexti = g[3] + 1
      if g[1] == "V2" then v2 = v2 + 1 end
    end
    assert.is_true(v2 > 0, "the reload came after the whole transaction was read: " .. p.stdout())
    assert.is_nil(p.stdout():find("BAD"), p.stdout():match("BAD[^\n]*"))
    assert.is_true(p.running(), p.stderr())
  end)

  it("decode every shape an ALTER TABLE gives a table mid-transaction", function()
    local p, src = runner("alter", CHECK .. [[
return {
  replication = { slot = "SLOT" },
  channels = {
    ["public.s"] = { source = "replication", handler = function(ev, note)
      check("S", ev, note)
      local keys = {}
      for k, v in pairs(ev.new) do keys[#keys + 1] = k .. "=" .. (math.type(v) or type(v)) .. ":" .. tostring(v) end
      table.sort(keys)
      out("S", ev.op, ev.new.id, table.concat(keys, ","))
    end },
  },
}
]], { "CREATE TABLE s (id int PRIMARY KEY, a int, b text)" })
    C.sql("BEGIN; INSERT INTO s VALUES (1, 10, 'x');"
      .. " ALTER TABLE s ADD COLUMN c int DEFAULT 5; INSERT INTO s VALUES (2, 20, 'y', 7);"
      .. " ALTER TABLE s DROP COLUMN a; INSERT INTO s VALUES (3, 'z', 8);"
      .. " ALTER TABLE s RENAME COLUMN b TO bb; INSERT INTO s VALUES (4, 'w', 9);"
      .. " ALTER TABLE s ALTER COLUMN c TYPE text; INSERT INTO s VALUES (5, 'v', 't');"
      .. " ALTER TABLE s ALTER COLUMN bb TYPE int USING length(bb), ADD COLUMN n numeric;"
      .. " INSERT INTO s VALUES (6, 42, 'u', 1.5); COMMIT", src)
    assert.truthy(H.eventually(function() return p.stdout():find("S INSERT 6") end, 20), p.stdout() .. p.stderr())
    local want = {
      "S INSERT 1 a=integer:10,b=string:x,id=integer:1",
      "S INSERT 2 a=integer:20,b=string:y,c=integer:7,id=integer:2",
      "S INSERT 3 b=string:z,c=integer:8,id=integer:3",
      "S INSERT 4 bb=string:w,c=integer:9,id=integer:4",
      "S INSERT 5 bb=string:v,c=string:t,id=integer:5",
    }
    local lines = H.lines(p.stdout())
    for i, w in ipairs(want) do assert.equal(w, lines[i]) end
    assert.matches("^S INSERT 6 bb=integer:42,c=string:u,id=integer:6,n=", lines[6])
    assert.is_nil(p.stdout():find("BAD"), p.stdout():match("BAD[^\n]*"))
  end)

  it("decode a table of 1600 columns, and columns named like the event's and the relation's own fields",
    function()
      local cols, vals = {}, {}
      for i = 1, 1599 do cols[i], vals[i] = ("c%d int"):format(i), tostring(i) end
      local p, src = runner("wide", CHECK .. [[
return {
  replication = { slot = "SLOT" },
  channels = {
    ["public.w"] = { source = "replication", handler = function(ev, note)
      local n, sum = 0, 0
      for _, v in pairs(ev.new) do n = n + 1; sum = sum + v end
      local o = 0
      for _ in pairs(ev.old or {}) do o = o + 1 end
      out("W", ev.op, n, sum, o, note.seq)
    end },
    ["public.f"] = { source = "replication", handler = function(ev, note)
      out("F", ev.op, ev.schema, ev.table, ev.new and ev.new.op, ev.new and ev.new.names, ev.new and ev.new.types,
        ev.new and ev.new.new, ev.old and ev.old.old, ev.new and ev.new.kind, ev.new and ev.new.relid,
        ev.new and math.type(ev.new.seq), note.seq)
    end },
  },
}
]], { "CREATE TABLE w (id int PRIMARY KEY, " .. table.concat(cols, ", ") .. ")",
        "ALTER TABLE w REPLICA IDENTITY FULL",
        [[CREATE TABLE f (id int PRIMARY KEY, op text, schema text, "table" text, new text, old text, kind text,
          names text, types text, columns text, relid int, lsn text, seq int, __index text, __name text)]],
        "ALTER TABLE f REPLICA IDENTITY FULL" })
      C.sql("INSERT INTO w VALUES (1, " .. table.concat(vals, ", ") .. ")", src)
      C.sql("INSERT INTO w VALUES (2, " .. table.concat(vals, ", ") .. "); UPDATE w SET c1 = 0 WHERE id = 1", src)
      C.sql("INSERT INTO f VALUES (1, 'o', 's', 't', 'n', 'x', 'k', 'nm', 'ty', 'co', 7, '0/1', 3, 'i', 'nn');"
        .. " UPDATE f SET old = 'y'; DELETE FROM f", src)
      assert.truthy(H.eventually(function()
        return H.count_matches(p.stdout(), "\nW ") + H.count_matches(p.stdout(), "\nF ") >= 4
          and p.stdout():find("F DELETE")
      end, 20), p.stdout() .. p.stderr())
      local sum = 1 + 1599 * 1600 // 2
      assert.matches("W INSERT 1600 " .. sum .. " 0 1\n", p.stdout(), 1, true)
      assert.matches("W INSERT 1600 " .. (sum + 1) .. " 0 1\n", p.stdout(), 1, true)
      assert.matches("W UPDATE 1600 " .. (sum - 1) .. " 1600 2\n", p.stdout(), 1, true)
      assert.matches("F INSERT public f o nm ty n nil k 7 integer 1\n", p.stdout(), 1, true)
      assert.matches("F UPDATE public f o nm ty n x k 7 integer 2\n", p.stdout(), 1, true)
      assert.matches("F DELETE public f nil nil nil nil y nil nil nil 3\n", p.stdout(), 1, true)
      assert.is_nil(p.stdout():find("BAD"), p.stdout():match("BAD[^\n]*"))
    end)

  it("are the same notes at every retry of a handler that fails and then succeeds, whatever its arity", function()
    local p, src = runner("retry", [[
local calls = {}
local function digest(notes)
  local t = {}
  for _, n in ipairs(notes) do t[#t + 1] = n.lsn .. "/" .. n.seq .. "/" .. n.xid .. "/" .. n.commit_lsn end
  return table.concat(t, ";")
end
return {
  replication = { slot = "SLOT" },
  on_error = function(err, note) out("ONERR", note.channel) end,
  channels = {
    ["public.ra"] = { source = "replication", batch = 10, retry = { attempts = 3, backoff = 0.05 },
      handler = function(events, notes)
        calls.a = (calls.a or 0) + 1
        out("A", calls.a, tostring(notes), digest(notes))
        if calls.a < 3 then error("not yet") end
      end },
    ["public.rb"] = { source = "replication", batch = 10, retry = { attempts = 3, backoff = 0.05 },
      handler = function(events)
        calls.b = (calls.b or 0) + 1
        out("B", calls.b, #events)
        if calls.b < 3 then error("not yet b") end
      end },
    ["public.rc"] = { source = "replication", retry = { attempts = 3, backoff = 0.05 },
      handler = function(ev, note, unused)
        calls.c = (calls.c or 0) + 1
        out("C", calls.c, tostring(note), digest({ note }))
        if calls.c < 3 then error("not yet c") end
      end },
  },
}
]], { "CREATE TABLE ra (id int PRIMARY KEY)", "CREATE TABLE rb (id int PRIMARY KEY)",
      "CREATE TABLE rc (id int PRIMARY KEY)" })
    C.sql("BEGIN; INSERT INTO ra SELECT generate_series(1, 3); INSERT INTO rb SELECT generate_series(1, 3);"
      .. " INSERT INTO rc VALUES (1); COMMIT", src)
    assert.truthy(H.eventually(function() return p.stdout():find("\nC 3 ") end, 20), p.stdout() .. p.stderr())
    local a, c = {}, {}
    for _, l in ipairs(H.lines(p.stdout())) do
      local t, k, id, d = l:match("^(%u) (%d) table: (%S+) (%S+)$")
      if t == "A" then a[tonumber(k)] = { id, d } elseif t == "C" then c[tonumber(k)] = { id, d } end
    end
    -- (ra's rows 2 and 3 may come in a later read: a batch is what is queued)
    for _, seen in ipairs({ a, c }) do
      assert.is_true(#seen >= 3, p.stdout())
      for k = 2, 3 do assert.same(seen[1], seen[k]) end
    end
    assert.matches("/1/", a[1][2]); assert.matches("/7/", c[1][2])
    assert.is_nil(p.stdout():find("ONERR"))
    -- the log names the same position at each retry of the handler without notes
    local lsns = {}
    for l in p.stderr():gmatch("[^\n]*channel=public.rb[^\n]*") do lsns[#lsns + 1] = l:match("lsn=(%x+/%x+)") end
    assert.equal(2, #lsns, p.stderr())
    assert.equal(lsns[1], lsns[2])
  end)

  it("apply exactly once through pglisten.apply from a vararg handler across walsender kills and a SIGKILL",
    function()
      local body = [[
local target = assert(pglisten.connect(TARGET))
local UPSERT = "INSERT INTO ap (id, v) VALUES ($1, $2) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v"
local function sync(events, notes)
  assert(pglisten.apply(target, events, notes, function(conn, evs)
    local list = {}
    for i, ev in ipairs(evs) do list[i] = { ev.new.id, ev.new.v } end
    assert(conn:execmany(UPSERT, list, { savepoint = false }))
  end))
  pglisten.sleep(0.01)
end
return {
  replication = { slot = "SLOT" },
  channels = {
    ["public.ap"] = { source = "replication", batch = 150, retry = { attempts = 1000, backoff = 0.05 },
      handler = function(...) return sync(...) end },
  },
}
]]
      local p, src, dst, slot, path = runner("apv", body, { "CREATE TABLE ap (id int PRIMARY KEY, v int)",
        "CREATE TABLE noise (id int PRIMARY KEY)", "CREATE PUBLICATION SLOT FOR TABLE ap, noise" })
      C.sql([[CREATE TABLE ap (id int PRIMARY KEY, v int); CREATE TABLE apps (id int, v int);
        CREATE FUNCTION count_app() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO apps VALUES (NEW.id, NEW.v); RETURN NEW; END $$;
        CREATE TRIGGER count_app AFTER INSERT OR UPDATE ON ap FOR EACH ROW EXECUTE FUNCTION count_app()]], dst)
      -- transactions whose unrouted changes lie between routed ones, so seq has gaps
      for t = 0, 3 do
        C.sql(("BEGIN; INSERT INTO ap SELECT g, %d FROM generate_series(%d, %d) g;"
          .. " INSERT INTO noise SELECT g FROM generate_series(%d, %d) g;"
          .. " UPDATE ap SET v = v + 100 WHERE id %% 7 = 0 AND id BETWEEN %d AND %d; COMMIT"):format(
          t, t * 3000 + 1, t * 3000 + 3000, t * 3000 + 1, t * 3000 + 500, t * 3000 + 1, t * 3000 + 3000), src)
      end
      local function walsender()
        C.sql(("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '%s'"):format(slot))
      end
      local function applied() return tonumber(C.sql("SELECT count(*) FROM apps", dst)) or 0 end
      assert.truthy(H.eventually(function() return applied() > 1500 end, 30), p.stderr())
      walsender()
      local function lost(q) return q.stderr():find("replication stream lost", 1, true) end
      assert.truthy(H.eventually(function() return lost(p) end, 30), p.stderr())
      assert.truthy(H.eventually(function() return applied() > 5000 end, 30), p.stderr())
      p.kill("KILL")
      p.wait(5)
      local p2 = C.start(path, src)
      H.finally(function() p2.stop() end)
      assert.truthy(H.eventually(function() return applied() > 8000 end, 30), p2.stderr())
      walsender()
      local ok, want, got = C.same(src, dst, "ap", 60)
      assert.is_true(ok, ("source %s, target %s\n%s"):format(want, got, p2.stderr()))
      -- every row version was applied once
      assert.equal("0", C.sql("SELECT count(*) FROM (SELECT id, v FROM apps GROUP BY 1, 2 HAVING count(*) > 1) d",
        dst))
      assert.equal(C.sql("SELECT 12000 + count(*) FROM ap WHERE id % 7 = 0", src), C.sql("SELECT count(*) FROM apps",
        dst))
    end)

  it("count seq over 40 tables of one transaction, half unrouted, for handlers of either arity and on_error",
    function()
      local tables, chans, all = {}, {}, {}
      for k = 1, 40 do
        tables[k], all[k] = ("CREATE TABLE m%d (id int PRIMARY KEY)"):format(k), "m" .. k
        if k % 4 == 1 then
          chans[#chans + 1] = ([[["public.m%d"] = { source = "replication", batch = 20,
    handler = function(events, notes)
      for i, ev in ipairs(events) do
        local n = notes[i]
        if n.seq ~= %d + ev.new.id or n.channel ~= "public.m%d" then out("BAD", %d, ev.new.id, n.seq) end
      end
      out("OK", %d, #events)
    end },]]):format(k, (k - 1) * 50, k, k, k)
        elseif k % 4 == 3 then
          chans[#chans + 1] = ([[["public.m%d"] = { source = "replication", batch = 10, on_failure = "dead",
      retry = { attempts = 1 }, handler = function(events)
        for _, ev in ipairs(events) do if ev.new.id == 50 then error("no 50") end end
        out("OK", %d, #events)
      end },]]):format(k, k)
        end
      end
      -- the publication sends every table; only the odd ones have a channel
      tables[#tables + 1] = "CREATE PUBLICATION SLOT FOR TABLE " .. table.concat(all, ", ")
      local p, src = runner("many", [[
return {
  replication = { slot = "SLOT" },
  on_error = function(err, note) out("ERR", note.channel, note.seq) end,
  channels = {
    ]] .. table.concat(chans, "\n    ") .. [[

  },
}
]], tables, true)
      local ins = {}
      for k = 1, 40 do ins[k] = ("INSERT INTO m%d SELECT generate_series(1, 50);"):format(k) end
      C.sql("BEGIN; " .. table.concat(ins, " ") .. " COMMIT", src)
      -- the last failure: m39's id 50, the transaction's change 1950
      assert.truthy(H.eventually(function() return p.stdout():find("ERR public.m39 1950\n", 1, true) end, 30),
        p.stderr())
      local out = p.stdout()
      assert.is_nil(out:find("BAD"), out:match("BAD[^\n]*"))
      local ok = {}
      for k, n in out:gmatch("OK (%d+) (%d+)") do ok[tonumber(k)] = (ok[tonumber(k)] or 0) + tonumber(n) end
      local errs = 0
      for k = 1, 40, 2 do
        if k % 4 == 1 then
          assert.equal(50, ok[k], "m" .. k)
        else
          -- on_error: the notes of the failed batch (the run queued with id 50), their seq counting the
          -- unrouted tables' changes before them too
          local seqs = {}
          for q in out:gmatch("ERR public%.m" .. k .. " (%d+)") do seqs[#seqs + 1] = tonumber(q) end
          assert.is_true(#seqs >= 1, "m" .. k)
          assert.equal(50, (ok[k] or 0) + #seqs, "m" .. k)
          for i = 1, #seqs do assert.equal((k - 1) * 50 + 50 - #seqs + i, seqs[i], "m" .. k) end
          errs = errs + #seqs
        end
      end
      assert.equal(tostring(errs), C.sql("SELECT count(*) FROM pglisten.dead", src))
    end)

  it("are whole and counted again after the source server crashes mid-transaction and restarts", function()
    local p, src = runner("restart", CHECK .. [[
return {
  replication = { slot = "SLOT" },
  channels = {
    ["public.rr"] = { source = "replication", batch = 500, handler = function(events, notes)
      for i, ev in ipairs(events) do check("R", ev, notes[i]) end
      out("R", #events, events[1].new.id, events[#events].new.id)
      pglisten.sleep(0.02)
    end },
  },
}
]], { "CREATE TABLE rr (id int PRIMARY KEY)" })
    C.sql("INSERT INTO rr SELECT g FROM generate_series(1, 30000) g", src)
    assert.truthy(H.eventually(function() return select(2, spans(p.stdout(), { R = true })) > 3000 end, 30),
      p.stderr())
    H.server("crash") -- immediate: a fast shutdown waits until the runner confirmed what it was sent
    H.server("start")
    local got
    assert.truthy(H.eventually(function()
      got = spans(p.stdout(), { R = true })
      return #got > 0 and got[#got][3] == 30000
    end, 60), p.stdout() .. p.stderr())
    -- from the restart on, the transaction came again from its first row
    local restarted
    for i = 2, #got do
      if got[i][2] ~= got[i - 1][3] + 1 then
        assert.equal(1, got[i][2], "the transaction resent from its start")
        restarted = i
      end
    end
    assert.truthy(restarted, "the restart came after the whole transaction was handled: " .. p.stdout()
      .. p.stderr())
    for i = restarted + 1, #got do assert.equal(got[i - 1][3] + 1, got[i][2]) end
    assert.is_nil(p.stdout():find("BAD"), p.stdout():match("BAD[^\n]*"))
  end)
end)
