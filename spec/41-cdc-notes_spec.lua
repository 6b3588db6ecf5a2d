-- The replication source makes a change's note only when something can see
-- it (c4d738a): a handler declaring a second parameter or `...` gets every
-- note; a handler taking only the events gets none made, yet when it fails
-- the log, on_error and pglisten.dead see the same full notes.  And the
-- relation map's flat `names`/`types` arrays the tuples are decoded with.
local H = require "spec.helpers"
local pg = H.pg
local core = pg.core

local C = require "spec.cdc_helpers"

-- The fields a replication note carries, and their kinds.
local FIELDS = { channel = "string", lsn = "string", lsn_int = "integer", commit_lsn = "string", xid = "integer",
  commit_time = "number", received_at = "number", seq = "integer", slot = "string", system_id = "string",
  database = "string" }

-- A line of note fields, in FIELDS' key order, for out(...)
local NOTE_LINE = [[
local KEYS = { "channel", "lsn", "lsn_int", "commit_lsn", "xid", "commit_time", "received_at", "seq", "slot",
  "system_id", "database" }
local function note_line(tag, id, note)
  local t = { tag, tostring(id) }
  for _, k in ipairs(KEYS) do
    local v = note[k]
    t[#t + 1] = k .. "=" .. (math.type(v) or type(v)) .. ":" .. tostring(v)
  end
  local n = 0
  for _ in pairs(note) do n = n + 1 end
  t[#t + 1] = "fields=" .. n
  return table.concat(t, " ")
end
]]

-- The notes of `tag` lines in `out`, by id: { field = { kind, value } }.
local function notes_of(out, tag)
  local by = {}
  for _, l in ipairs(H.lines(out)) do
    local t, id, rest = l:match("^(%S+) (%S+) (.*)$")
    if t == tag then
      local n = {}
      for k, kind, v in rest:gmatch("([%w_]+)=(%w+):(%S*)") do n[k] = { kind, v } end
      n.count = tonumber(rest:match("fields=(%d+)"))
      by[tonumber(id) or id] = n
    end
  end
  return by
end

local function check_note(n, slot, channel, what)
  assert.is_table(n, what .. ": no note")
  for k, kind in pairs(FIELDS) do
    local got = n[k]
    assert.is_table(got, what .. ": no " .. k)
    if kind == "number" then
      assert.is_truthy(got[1] == "float" or got[1] == "integer", what .. ": " .. k .. " is " .. got[1])
    else
      assert.equal(kind, got[1], what .. ": " .. k)
    end
  end
  assert.equal(11, n.count, what .. ": field count")
  assert.equal(channel, n.channel[2])
  assert.equal(slot, n.slot[2])
  assert.matches("^%x+/%x+$", n.lsn[2])
  assert.equal(core.lsn_parse(n.lsn[2]), math.tointeger(tonumber(n.lsn_int[2])), what)
  assert.matches("^%x+/%x+$", n.commit_lsn[2])
  assert.is_true(core.lsn_parse(n.commit_lsn[2]) >= core.lsn_parse(n.lsn[2]), what)
end

describe("replication notes", function()
  it("go whole to handlers that take them, and to the log, on_error and pglisten.dead of handlers that do not",
    function()
      local src, dst, slot = C.setup("notes")
      for _, t in ipairs({ "ta", "tb", "tc", "td" }) do
        C.sql(("CREATE TABLE %s (id int PRIMARY KEY, v text)"):format(t), src)
      end
      local rc, _, ierr = H.run_runner({ "--install", "--db", "dbname=" .. src })
      assert.equal(0, rc, ierr)
      local path = C.script(dst, NOTE_LINE .. ([[
return {
  replication = { slot = %q },
  on_error = function(err, note, info)
    out(note_line("ERR", note.channel == "public.tc" and "c" or "d", note), info.final and "final" or "")
  end,
  channels = {
    -- takes the notes: gets them, whole
    ["public.ta"] = { source = "replication", batch = 50, handler = function(events, notes)
      for i, ev in ipairs(events) do out(note_line("A", ev.new.id, notes[i])) end
    end },
    -- ...: gets them too
    ["public.tb"] = { source = "replication", batch = 50, handler = function(...)
      local events, notes = ...
      for i, ev in ipairs(events) do out(note_line("B", ev.new.id, notes[i])) end
      out("NARGS", select("#", ...))
    end },
    -- a single handler without a note parameter that fails for id 3: the log
    -- and on_error see the note, pglisten.dead records its position
    ["public.tc"] = { source = "replication", on_failure = "dead", retry = { attempts = 1 },
      handler = function(ev) if ev.new.id == 3 then error("no 3 today") end out("C", ev.new.id) end },
    -- a batch handler taking only the events, failing on a batch with id 7
    ["public.td"] = { source = "replication", batch = 50, on_failure = "dead", retry = { attempts = 1 },
      handler = function(events)
        for _, ev in ipairs(events) do if ev.new.id == 7 then error("no 7 today") end end
        out("D", #events)
      end },
  },
}
]]):format(slot))
      local p = C.start(path, src)
      finally(function() C.cleanup({ p }, src, slot) end)
      -- one transaction over all four tables, so their notes share xid and commit_lsn
      C.sql("BEGIN; INSERT INTO ta SELECT g, 'a' FROM generate_series(1, 5) g;"
        .. " INSERT INTO tb SELECT g, 'b' FROM generate_series(1, 5) g;"
        .. " INSERT INTO tc SELECT g, 'c' FROM generate_series(1, 5) g;"
        .. " INSERT INTO td SELECT g, 'd' FROM generate_series(6, 8) g; COMMIT;", src)
      assert.truthy(H.eventually(function()
        local o = p.stdout()
        return #H.lines(o) >= 5 + 5 + 1 + 4 + 1 and tonumber(C.sql("SELECT count(*) FROM pglisten.dead", src)) == 4
      end, 20), p.stdout() .. p.stderr())
      local out = p.stdout()
      local A, B, E = notes_of(out, "A"), notes_of(out, "B"), notes_of(out, "ERR")
      local xid, commit
      for id = 1, 5 do
        check_note(A[id], slot, "public.ta", "ta " .. id)
        check_note(B[id], slot, "public.tb", "tb " .. id)
        xid, commit = xid or A[id].xid[2], commit or A[id].commit_lsn[2]
        assert.equal(xid, A[id].xid[2]); assert.equal(xid, B[id].xid[2])
        assert.equal(commit, B[id].commit_lsn[2])
      end
      -- seq counts every change of the transaction, in order
      assert.equal("1", A[1].seq[2]); assert.equal("6", B[1].seq[2])
      -- at their first call: no failure, no retry
      assert.equal(1, H.count_matches(out, "NARGS 2"))
      assert.is_nil(p.stderr():find("channel=public.t[ab]"), p.stderr())
      -- the failing single handler: its note in on_error, whole, the 13th change
      check_note(E.c, slot, "public.tc", "on_error of tc")
      assert.equal("13", E.c.seq[2]); assert.equal(xid, E.c.xid[2]); assert.equal(commit, E.c.commit_lsn[2])
      -- the failing batch: on_error once per note, the last one's kept (id 8 of the batch 6, 7, 8)
      check_note(E.d, slot, "public.td", "on_error of td")
      assert.equal("18", E.d.seq[2]); assert.equal(xid, E.d.xid[2])
      -- the log names the failed change's position
      assert.matches("channel=public.tc[^\n]*lsn=%x+/%x+", p.stderr())
      assert.matches("channel=public.td[^\n]*lsn=%x+/%x+", p.stderr())
      -- pglisten.dead: each event with the position its note had
      local rows = C.sql("SELECT string_agg(channel || ' ' || (payload::jsonb -> 'new' ->> 'id') || ' ' || "
        .. "(payload::jsonb ->> 'lsn') || ' ' || (payload::jsonb ->> 'commit_lsn') || ' ' || "
        .. "(payload::jsonb ->> 'xid'), ',' ORDER BY id) FROM pglisten.dead", src)
      local dead = {}
      for ch, id, lsn, cl, x in rows:gmatch("([^,%s]+) (%d+) (%x+/%x+) (%x+/%x+) (%d+)") do
        dead[#dead + 1] = { ch, tonumber(id), lsn, cl, x }
      end
      assert.equal(4, #dead, rows)
      assert.same({ "public.tc", 3 }, { dead[1][1], dead[1][2] })
      assert.equal(E.c.lsn[2], dead[1][3])
      for i = 2, 4 do
        assert.same({ "public.td", i + 4 }, { dead[i][1], dead[i][2] })
        assert.equal(commit, dead[i][4]); assert.equal(xid, dead[i][5])
      end
      assert.equal(E.d.lsn[2], dead[4][3])
      assert.is_true(core.lsn_parse(dead[2][3]) < core.lsn_parse(dead[3][3]))
    end)

  it("decodes tuples with the relation's names and types, and refuses a map entry without them", function()
    local hdr = "w" .. string.pack(">I8I8I8", 0x100, 0x200, 0)
    local rel = hdr .. "R" .. string.pack(">I4", 9) .. "public\0t\0d" .. string.pack(">I2", 2)
      .. "\1id\0" .. string.pack(">I4i4", 23, -1) .. "\0v\0" .. string.pack(">I4i4", 25, -1)
    local ins = hdr .. "I" .. string.pack(">I4", 9) .. "N" .. string.pack(">I2", 2)
      .. "t" .. string.pack(">s4", "42") .. "t" .. string.pack(">s4", "x")
    local rels = {}
    local r = assert(core.pgoutput_decode(rel, rels))
    assert.same({ "id", "v" }, r.names); assert.same({ 23, 25 }, r.types)
    assert.same({ key = true, name = "id", type = 23, typmod = -1 }, r.columns[1])
    local m = assert(core.pgoutput_decode(ins, rels))
    assert.same({ id = 42, v = "x" }, m.new)
    assert.equal("integer", math.type(m.new.id))
    -- a map entry made by hand: no names/types, names and types that differ,
    -- a name that is not a string -- each a clear error
    for _, bad in ipairs({
      { schema = "public", table = "t", columns = r.columns },
      { schema = "public", table = "t", names = { "id", "v" }, types = { 23 } },
      { schema = "public", table = "t", names = { "id", {} }, types = { 23, 25 } },
    }) do
      local v, err = core.pgoutput_decode(ins, { [9] = bad })
      assert.is_nil(v)
      assert.matches("^pgoutput: Insert message for a relation", err)
    end
  end)
end)
